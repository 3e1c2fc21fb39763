//! The bookkeeping rules of the outbound queue suite: cancel, the app's reports, status
//! queries, purge, the due counts and the rate windows.
//!
//! Owns: the rules [`super::run_outbound_suite`] runs after the job-life rules. Panics with a
//! message naming the broken rule.
//!
//! May touch: only the queues the suite hands it.

use std::time::Duration;

use crate::device::PageRequest;
use crate::outbound::{JobState, NewJob, OutboundQueue, Outcome, QueueError, StatusFilter};

use super::outbound::{
    KIND, LEASE_MS, T0, claim, claim_ids, enqueue, finish, job, sent, state_of, status, statuses,
};

pub(super) async fn cancel_rules(queue: &dyn OutboundQueue) {
    let rule = "cancel: cancels the group's queued jobs, not those being sent";
    enqueue(
        queue,
        vec![
            job("a", "g", "ra", T0),
            job("b", "g", "rb", T0),
            job("c", "g", "rc", T0 + 1_000),
            job("d", "h", "rd", T0),
        ],
        rule,
    )
    .await;
    assert_eq!(claim_ids(queue, 1, T0, rule).await, vec!["a"], "{rule}");
    let cancelled = queue
        .cancel("g", T0 + 1)
        .await
        .unwrap_or_else(|err| panic!("{rule}: cancel failed: {err}"));
    assert_eq!(
        cancelled, 2,
        "{rule}: b and c (not yet due) are queued, a is being sent"
    );
    for id in ["b", "c"] {
        let status = status(queue, id, rule).await;
        assert_eq!(
            (status.state, status.updated_at),
            (JobState::Cancelled, T0 + 1),
            "{rule}: {id}"
        );
    }
    assert_eq!(
        state_of(queue, "a", rule).await.0,
        JobState::Sending,
        "{rule}"
    );
    assert_eq!(
        state_of(queue, "d", rule).await.0,
        JobState::Queued,
        "{rule}: another group"
    );
    assert_eq!(
        claim_ids(queue, 10, T0 + 2_000, rule).await,
        vec!["d"],
        "{rule}: cancelled jobs are never handed out"
    );
    finish(queue, "a", 1, sent("m"), T0 + 3, rule).await;
    assert_eq!(
        state_of(queue, "a", rule).await.0,
        JobState::Sent,
        "{rule}: the job being sent still finishes"
    );
    for group in ["g", "nobody"] {
        let again = queue
            .cancel(group, T0 + 4)
            .await
            .unwrap_or_else(|err| panic!("{rule}: cancel failed: {err}"));
        assert_eq!(again, 0, "{rule}: nothing left to cancel in {group:?}");
    }
}

pub(super) async fn report_rules(queue: &dyn OutboundQueue) {
    let rule = "report: the app's report moves a sent job to delivered, then interacted";
    enqueue(
        queue,
        vec![
            job("s1", "p", "dev1", T0),
            job("q1", "p", "dev2", T0 + 1_000),
            job("f1", "p", "dev3", T0),
            job("s2", "p2", "dev1", T0),
        ],
        rule,
    )
    .await;
    assert_eq!(claim(queue, 10, T0, rule).await.len(), 3, "{rule}");
    finish(queue, "s1", 1, sent("m1"), T0 + 1, rule).await;
    finish(queue, "s2", 1, sent("m2"), T0 + 1, rule).await;
    finish(
        queue,
        "f1",
        1,
        Outcome::Failed {
            reason: "400".to_owned(),
        },
        T0 + 1,
        rule,
    )
    .await;
    let report = |group: &'static str, recipient: &'static str, state: JobState, now: u64| async move {
        queue
            .report(group, recipient, state, now)
            .await
            .unwrap_or_else(|err| panic!("{rule}: report failed: {err}"))
    };
    assert!(
        report("p", "dev1", JobState::Delivered, T0 + 2).await,
        "{rule}"
    );
    let s1 = status(queue, "s1", rule).await;
    assert_eq!(
        (s1.state, s1.updated_at),
        (JobState::Delivered, T0 + 2),
        "{rule}"
    );
    assert!(
        report("p", "dev1", JobState::Interacted, T0 + 3).await,
        "{rule}"
    );
    assert_eq!(
        state_of(queue, "s1", rule).await.0,
        JobState::Interacted,
        "{rule}"
    );

    let rule = "report: interacted wins over delivered";
    assert!(
        report("p", "dev1", JobState::Delivered, T0 + 4).await,
        "{rule}: the job still matches"
    );
    assert_eq!(
        state_of(queue, "s1", rule).await.0,
        JobState::Interacted,
        "{rule}"
    );
    assert!(
        report("p2", "dev1", JobState::Interacted, T0 + 5).await,
        "{rule}"
    );
    assert_eq!(
        state_of(queue, "s2", rule).await.0,
        JobState::Interacted,
        "{rule}: straight from sent to interacted"
    );

    let rule = "report: only sent (or delivered) jobs take a report";
    assert!(
        !report("p", "dev2", JobState::Delivered, T0 + 6).await,
        "{rule}: queued"
    );
    assert_eq!(
        state_of(queue, "q1", rule).await.0,
        JobState::Queued,
        "{rule}"
    );
    assert!(
        !report("p", "dev3", JobState::Interacted, T0 + 6).await,
        "{rule}: failed"
    );
    assert_eq!(
        state_of(queue, "f1", rule).await.0,
        JobState::Failed,
        "{rule}"
    );
    assert!(
        !report("p", "nobody", JobState::Delivered, T0 + 6).await,
        "{rule}: no such recipient"
    );
    assert!(
        !report("p3", "dev1", JobState::Delivered, T0 + 6).await,
        "{rule}: no such group"
    );
    for state in [JobState::Sent, JobState::Queued, JobState::Failed] {
        let result = queue.report("p", "dev1", state, T0 + 7).await;
        assert!(
            matches!(result, Err(QueueError::Invalid(_))),
            "report: a report of {state} is Invalid, got {result:?}"
        );
    }
}

pub(super) async fn status_rules(queue: &dyn OutboundQueue) {
    let rule = "statuses: each job's state, attempts and reason, by id";
    let jobs: Vec<NewJob> = (0..10)
        .map(|i| {
            let group = if i % 2 == 0 { "g1" } else { "g2" };
            let recipient = if i < 5 { "r1" } else { "r2" };
            job(&format!("j{i:02}"), group, recipient, T0)
        })
        .chain([job("j10", "g1", "r2", T0 + 1_000)])
        .collect();
    enqueue(queue, jobs, rule).await;
    assert_eq!(claim(queue, 100, T0, rule).await.len(), 10, "{rule}");
    let retry = Outcome::Retry {
        at: T0 + 500,
        reason: "timeout".to_owned(),
    };
    for (id, outcome) in [
        ("j00", sent("m0")),
        (
            "j01",
            Outcome::Failed {
                reason: "400".to_owned(),
            },
        ),
        ("j02", retry),
        ("j03", sent("m3")),
        (
            "j04",
            Outcome::Expired {
                reason: "ttl".to_owned(),
            },
        ),
        ("j06", sent("m6")),
    ] {
        finish(queue, id, 1, outcome, T0 + 1, rule).await;
    }
    use JobState::{Expired, Failed, Queued, Sending, Sent};
    let expected = [
        ("j00", Sent, 1, "m0"),
        ("j01", Failed, 1, "400"),
        ("j02", Queued, 1, "timeout"),
        ("j03", Sent, 1, "m3"),
        ("j04", Expired, 1, "ttl"),
        ("j05", Sending, 1, ""),
        ("j06", Sent, 1, "m6"),
        ("j07", Sending, 1, ""),
        ("j08", Sending, 1, ""),
        ("j09", Sending, 1, ""),
        ("j10", Queued, 0, ""),
    ];
    let all = statuses(queue, &StatusFilter::default(), 3, rule).await;
    let seen: Vec<(&str, JobState, u32, &str)> = all
        .iter()
        .map(|s| (s.id.as_str(), s.state, s.attempts, s.reason.as_str()))
        .collect();
    assert_eq!(seen, expected, "{rule}");
    let j05 = &all[5];
    assert_eq!(
        (
            j05.kind.as_str(),
            j05.group.as_str(),
            j05.recipient.as_str()
        ),
        (KIND, "g2", "r2"),
        "{rule}: kind, group and recipient"
    );

    let rule = "statuses: filters by group, recipient and states (AND across, OR within states)";
    let cases = [
        StatusFilter {
            group: "g1".to_owned(),
            ..StatusFilter::default()
        },
        StatusFilter {
            recipient: "r2".to_owned(),
            ..StatusFilter::default()
        },
        StatusFilter {
            states: vec![Sent],
            ..StatusFilter::default()
        },
        StatusFilter {
            states: vec![Sent, Failed, Queued],
            ..StatusFilter::default()
        },
        StatusFilter {
            group: "g2".to_owned(),
            states: vec![Sending],
            ..StatusFilter::default()
        },
        StatusFilter {
            group: "g1".to_owned(),
            recipient: "r2".to_owned(),
            ..StatusFilter::default()
        },
        StatusFilter {
            group: "g1".to_owned(),
            recipient: "r1".to_owned(),
            states: vec![Sent, Expired],
        },
        StatusFilter {
            group: "nobody".to_owned(),
            ..StatusFilter::default()
        },
    ];
    for filter in cases {
        let wanted: Vec<String> = all
            .iter()
            .filter(|s| filter.matches(s))
            .map(|s| s.id.clone())
            .collect();
        for limit in [1, 2, 100] {
            let got: Vec<String> = statuses(queue, &filter, limit, rule)
                .await
                .into_iter()
                .map(|s| s.id)
                .collect();
            assert_eq!(got, wanted, "{rule}: {filter:?}, pages of {limit}");
        }
        let page = queue
            .statuses(
                &filter,
                &PageRequest {
                    include_total: true,
                    limit: 1,
                    ..PageRequest::default()
                },
            )
            .await
            .unwrap_or_else(|err| panic!("{rule}: statuses failed: {err}"));
        assert_eq!(
            page.total,
            Some(wanted.len() as u64),
            "statuses: include_total counts every match of {filter:?}"
        );
    }
}

pub(super) async fn purge_rules(queue: &dyn OutboundQueue) {
    let rule = "purge: removes finished jobs last updated before `before`, nothing else";
    enqueue(
        queue,
        vec![
            job("old-sent", "g", "r1", T0),
            job("old-failed", "g", "r2", T0),
            job("old-sending", "g", "r3", T0),
            job("new-sent", "g", "r4", T0),
            job("queued", "g", "r5", T0 + 100 * LEASE_MS),
        ],
        rule,
    )
    .await;
    assert_eq!(claim(queue, 10, T0, rule).await.len(), 4, "{rule}");
    finish(queue, "old-sent", 1, sent("m"), T0 + 1, rule).await;
    finish(
        queue,
        "old-failed",
        1,
        Outcome::Failed {
            reason: "x".to_owned(),
        },
        T0 + 1,
        rule,
    )
    .await;
    finish(queue, "new-sent", 1, sent("m"), T0 + 100, rule).await;
    let purge = |before: u64| async move {
        queue
            .purge(before)
            .await
            .unwrap_or_else(|err| panic!("{rule}: purge failed: {err}"))
    };
    assert_eq!(
        purge(T0 + 1).await,
        0,
        "{rule}: updated exactly at `before` is kept"
    );
    assert_eq!(purge(T0 + 50).await, 2, "{rule}: old-sent and old-failed");
    let left: Vec<String> = statuses(queue, &StatusFilter::default(), 100, rule)
        .await
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(left, vec!["new-sent", "old-sending", "queued"], "{rule}");
    assert_eq!(
        purge(u64::MAX).await,
        1,
        "{rule}: never a job that is queued or being sent, however old"
    );

    let rule = "enqueue: an id is unique only while its job is retained";
    assert_eq!(
        enqueue(queue, vec![job("old-sent", "g", "r1", T0 + 200)], rule).await,
        1,
        "{rule}: a purged id can be enqueued again"
    );
    assert_eq!(
        state_of(queue, "old-sent", rule).await.0,
        JobState::Queued,
        "{rule}"
    );
}

pub(super) async fn due_rules(queue: &dyn OutboundQueue) {
    let rule = "due: per kind, the jobs a claim at `now` would consider";
    let due = |now: u64| async move {
        queue
            .due(now)
            .await
            .unwrap_or_else(|err| panic!("{rule}: due failed: {err}"))
    };
    assert_eq!(due(T0).await, vec![], "{rule}: an empty queue");
    enqueue(
        queue,
        vec![job("lapsed", "g", "r", T0 - 2 * LEASE_MS)],
        rule,
    )
    .await;
    assert_eq!(
        claim_ids(queue, 10, T0 - LEASE_MS - 1, rule).await,
        vec!["lapsed"],
        "{rule}"
    );
    enqueue(
        queue,
        vec![
            job("leased", "g", "r", T0 - 100),
            job("done", "g", "r", T0 - 100),
        ],
        rule,
    )
    .await;
    assert_eq!(claim(queue, 10, T0 - 2, rule).await.len(), 2, "{rule}");
    finish(queue, "done", 1, sent("m"), T0 - 1, rule).await;
    let keyed = |id: &str| NewJob {
        order_key: Some("k".to_owned()),
        ..job(id, "g", "r", T0 - 5)
    };
    enqueue(
        queue,
        vec![
            job("a1", "g", "r", T0 - 10),
            job("a2", "g", "r", T0),
            job("a3", "g", "r", T0 + 10),
            NewJob {
                kind: "push.b".to_owned(),
                ..job("b1", "g", "r", T0)
            },
            keyed("first-of-k"),
            keyed("second-of-k"),
        ],
        rule,
    )
    .await;
    assert_eq!(
        due(T0).await,
        vec![("push.b".to_owned(), 1), (KIND.to_owned(), 4)],
        "{rule}: a1, a2, first-of-k and `lapsed` (its lease ran out); not a3 (later), \
         `leased`, `done` or second-of-k (waiting for first-of-k)"
    );
    assert_eq!(
        due(T0 + 10).await,
        vec![("push.b".to_owned(), 1), (KIND.to_owned(), 5)],
        "{rule}: a3 is due at T0+10"
    );
}

pub(super) async fn rate_rules(queue: &dyn OutboundQueue) {
    let rule = "take_rate: up to `limit` uses per fixed window, then false until the next window";
    let take = |key: &'static str, limit: u32, window_ms: u64, now: u64| async move {
        queue
            .take_rate(key, limit, Duration::from_millis(window_ms), now)
            .await
            .unwrap_or_else(|err| panic!("{rule}: take_rate failed: {err}"))
    };
    // T0 is a multiple of 2000, so windows of 1000 ms start at T0 and T0 + 1000.
    for i in 0..3 {
        assert!(
            take("user:alice", 3, 1_000, T0 + i * 100).await,
            "{rule}: use {}",
            i + 1
        );
    }
    assert!(
        !take("user:alice", 3, 1_000, T0 + 300).await,
        "{rule}: the 4th use"
    );
    assert!(
        !take("user:alice", 3, 1_000, T0 + 999).await,
        "{rule}: still the same window"
    );
    assert!(
        take("user:bob", 3, 1_000, T0 + 999).await,
        "{rule}: keys count apart"
    );
    for i in 0..3 {
        assert!(
            take("user:alice", 3, 1_000, T0 + 1_000 + i).await,
            "{rule}: the next window starts from zero (use {})",
            i + 1
        );
    }
    assert!(
        !take("user:alice", 3, 1_000, T0 + 1_999).await,
        "{rule}: and fills up again"
    );
    assert!(
        !take("user:carol", 0, 1_000, T0).await,
        "{rule}: a limit of 0 allows nothing"
    );

    let rule = "take_rate: windows are aligned to multiples of their length";
    assert!(take("aligned", 1, 2_000, T0 + 1_500).await, "{rule}");
    assert!(
        !take("aligned", 1, 2_000, T0 + 1_999).await,
        "{rule}: T0+1500 and T0+1999 share the window from T0"
    );
    assert!(
        take("aligned", 1, 2_000, T0 + 2_000).await,
        "{rule}: a new window at T0+2000"
    );
}
