//! The outbound queue suite: the rules every [`OutboundQueue`] backend keeps (the contract
//! in [`crate::outbound`]).
//!
//! Owns: [`run_outbound_suite`] and the rules of the job's life: enqueue, claim, lease,
//! finish, retry, expiry, `order_key` and racing claimers. The bookkeeping rules (cancel,
//! report, statuses, purge, due, rates) are in `outbound_status.rs`. Backends call the suite
//! with a factory that builds a fresh, empty queue. Times are explicit (`now` arguments), so
//! no rule sleeps or depends on the clock. Panics with a message naming the broken rule.
//!
//! May touch: only the queues the factory builds.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::device::{MAX_PAGE, PageRequest};
use crate::outbound::{
    Finished, Job, JobState, JobStatus, NewJob, OutboundQueue, Outcome, QueueError, StatusFilter,
};

use super::outbound_status;

/// A start time far from zero, so `now - x` never underflows in the rules.
pub(super) const T0: u64 = 1_700_000_000_000;

/// A lease that holds for the whole of a rule unless the rule moves `now` past it.
pub(super) const LEASE: Duration = Duration::from_secs(60);
pub(super) const LEASE_MS: u64 = 60_000;

pub(super) const KIND: &str = "push.test";

/// A job of [`KIND`], due at `not_before`.
pub(super) fn job(id: &str, group: &str, recipient: &str, not_before: u64) -> NewJob {
    NewJob {
        id: id.to_owned(),
        kind: KIND.to_owned(),
        group: group.to_owned(),
        recipient: recipient.to_owned(),
        payload: Bytes::from(format!("payload of {id}")),
        not_before,
        expire_at: None,
        order_key: None,
    }
}

pub(super) async fn enqueue(queue: &dyn OutboundQueue, jobs: Vec<NewJob>, rule: &str) -> usize {
    queue
        .enqueue(jobs)
        .await
        .unwrap_or_else(|err| panic!("{rule}: enqueue failed: {err}"))
}

pub(super) async fn claim(
    queue: &dyn OutboundQueue,
    limit: usize,
    now: u64,
    rule: &str,
) -> Vec<Job> {
    queue
        .claim(KIND, limit, LEASE, now)
        .await
        .unwrap_or_else(|err| panic!("{rule}: claim failed: {err}"))
}

pub(super) async fn claim_ids(
    queue: &dyn OutboundQueue,
    limit: usize,
    now: u64,
    rule: &str,
) -> Vec<String> {
    claim(queue, limit, now, rule)
        .await
        .into_iter()
        .map(|j| j.id)
        .collect()
}

pub(super) async fn finish(
    queue: &dyn OutboundQueue,
    id: &str,
    attempt: u32,
    outcome: Outcome,
    now: u64,
    rule: &str,
) {
    queue
        .finish(
            vec![Finished {
                id: id.to_owned(),
                attempt,
                outcome,
            }],
            now,
        )
        .await
        .unwrap_or_else(|err| panic!("{rule}: finish failed: {err}"));
}

pub(super) fn sent(detail: &str) -> Outcome {
    Outcome::Sent {
        detail: detail.to_owned(),
    }
}

/// Every status matching `filter`, paging through [`OutboundQueue::statuses`].
pub(super) async fn statuses(
    queue: &dyn OutboundQueue,
    filter: &StatusFilter,
    limit: usize,
    rule: &str,
) -> Vec<JobStatus> {
    super::devices::every_page(
        limit,
        |page| async move {
            queue
                .statuses(filter, &page)
                .await
                .unwrap_or_else(|err| panic!("{rule}: statuses failed: {err}"))
        },
        |s: &JobStatus| s.id.clone(),
        rule,
    )
    .await
}

/// The status of job `id`; panics (naming `rule`) when it has none.
pub(super) async fn status(queue: &dyn OutboundQueue, id: &str, rule: &str) -> JobStatus {
    let all = queue
        .statuses(
            &StatusFilter::default(),
            &PageRequest {
                limit: MAX_PAGE,
                ..PageRequest::default()
            },
        )
        .await
        .unwrap_or_else(|err| panic!("{rule}: statuses failed: {err}"));
    all.items
        .into_iter()
        .find(|s| s.id == id)
        .unwrap_or_else(|| panic!("{rule}: job {id:?} has no status"))
}

pub(super) async fn state_of(
    queue: &dyn OutboundQueue,
    id: &str,
    rule: &str,
) -> (JobState, String) {
    let status = status(queue, id, rule).await;
    (status.state, status.reason)
}

/// Runs every rule against fresh queues from `factory`.
pub async fn run_outbound_suite<S, F, Fut>(factory: F)
where
    S: OutboundQueue,
    F: Fn() -> Fut,
    Fut: Future<Output = Result<S, QueueError>>,
{
    let fresh = || async {
        factory()
            .await
            .unwrap_or_else(|err| panic!("the factory must build a queue: {err}"))
    };
    enqueue_rules(&fresh().await).await;
    claim_rules(&fresh().await).await;
    lease_rules(&fresh().await).await;
    outcome_rules(&fresh().await).await;
    expiry_rules(&fresh().await).await;
    order_key_rules(&fresh().await).await;
    racing_claimers(Arc::new(fresh().await)).await;
    super::outbound_batch::batch_rules(&fresh().await).await;
    outbound_status::cancel_rules(&fresh().await).await;
    outbound_status::report_rules(&fresh().await).await;
    outbound_status::status_rules(&fresh().await).await;
    outbound_status::purge_rules(&fresh().await).await;
    outbound_status::due_rules(&fresh().await).await;
    outbound_status::rate_rules(&fresh().await).await;
}

async fn enqueue_rules(queue: &dyn OutboundQueue) {
    let rule = "enqueue: a known id is not added again";
    assert_eq!(
        enqueue(
            queue,
            vec![job("a", "g", "r", T0), job("b", "g", "r", T0)],
            rule
        )
        .await,
        2,
        "{rule}: two new jobs"
    );
    let mut changed = job("a", "other", "other", T0);
    changed.payload = Bytes::from_static(b"changed");
    assert_eq!(
        enqueue(queue, vec![changed, job("c", "g", "r", T0)], rule).await,
        1,
        "{rule}: only c is new"
    );
    assert_eq!(
        enqueue(
            queue,
            vec![job("d", "g", "r", T0), job("d", "g", "r", T0)],
            rule
        )
        .await,
        1,
        "{rule}: twice in one call counts once"
    );
    assert_eq!(
        enqueue(queue, vec![], rule).await,
        0,
        "{rule}: nothing to add"
    );
    let jobs = claim(queue, 100, T0, rule).await;
    let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(
        ids.len(),
        4,
        "{rule}: each job is handed out once, got {ids:?}"
    );
    assert_eq!(
        ids.iter().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from(["a", "b", "c", "d"]),
        "{rule}"
    );
    let a = jobs.iter().find(|j| j.id == "a").expect("a was claimed");
    assert_eq!(
        (a.group.as_str(), a.payload.as_ref()),
        ("g", b"payload of a".as_slice()),
        "{rule}: the second enqueue of a changed nothing"
    );
}

async fn claim_rules(queue: &dyn OutboundQueue) {
    let rule = "claim: hands out due jobs of the kind, oldest not_before first";
    let mut early = job("early", "g1", "dev-1", T0 - 50);
    early.expire_at = Some(T0 + 1_000);
    early.payload = Bytes::from_static(&[0, 255, 1, 254]);
    let other_kind = NewJob {
        kind: "push.other".to_owned(),
        ..job("other-kind", "g1", "dev-9", T0 - 100)
    };
    enqueue(
        queue,
        vec![
            job("later", "g1", "dev-2", T0 - 10),
            early,
            job("future", "g1", "dev-3", T0 + 100),
            other_kind,
            job("middle", "g1", "dev-4", T0 - 20),
        ],
        rule,
    )
    .await;
    let first = claim(queue, 2, T0, rule).await;
    let expected = Job {
        id: "early".to_owned(),
        kind: KIND.to_owned(),
        group: "g1".to_owned(),
        recipient: "dev-1".to_owned(),
        payload: Bytes::from_static(&[0, 255, 1, 254]),
        not_before: T0 - 50,
        expire_at: Some(T0 + 1_000),
        attempt: 1,
        last_error: String::new(),
    };
    assert_eq!(
        first.first(),
        Some(&expected),
        "{rule}: the job as enqueued, attempt 1, no last error"
    );
    assert_eq!(
        first.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        vec!["early", "middle"],
        "{rule}: at most `limit`, the oldest first"
    );
    assert_eq!(
        claim_ids(queue, 10, T0, rule).await,
        vec!["later"],
        "{rule}: not a job before its not_before, nor one of another kind"
    );
    assert_eq!(
        claim_ids(queue, 10, T0 + 99, rule).await,
        Vec::<String>::new(),
        "{rule}: not before not_before"
    );
    assert_eq!(
        claim_ids(queue, 10, T0 + 100, rule).await,
        vec!["future"],
        "{rule}: due exactly at not_before"
    );
    let others = queue
        .claim("push.other", 10, LEASE, T0)
        .await
        .unwrap_or_else(|err| panic!("{rule}: claim failed: {err}"));
    assert_eq!(
        others.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        vec!["other-kind"],
        "{rule}: the other kind's claimer gets its job"
    );
    let result = queue.claim(KIND, 10, Duration::ZERO, T0).await;
    assert!(
        matches!(result, Err(QueueError::Invalid(_))),
        "claim: a zero lease is Invalid, got {result:?}"
    );
}

async fn lease_rules(queue: &dyn OutboundQueue) {
    let rule = "lease: a claimed job is not handed out again while its lease holds";
    enqueue(queue, vec![job("j", "g", "r", T0)], rule).await;
    assert_eq!(claim_ids(queue, 10, T0, rule).await, vec!["j"], "{rule}");
    assert_eq!(
        claim_ids(queue, 10, T0 + LEASE_MS - 1, rule).await,
        Vec::<String>::new(),
        "{rule}"
    );
    assert_eq!(
        state_of(queue, "j", rule).await.0,
        JobState::Sending,
        "{rule}: a leased job is sending"
    );

    let rule = "lease: a lease that runs out makes the job claimable again, as the next attempt";
    let again = claim(queue, 10, T0 + LEASE_MS, rule).await;
    assert_eq!(
        again
            .iter()
            .map(|j| (j.id.as_str(), j.attempt))
            .collect::<Vec<_>>(),
        vec![("j", 2)],
        "{rule}"
    );

    let rule = "finish: a late finish from an attempt that was claimed again changes nothing";
    finish(queue, "j", 1, sent("late"), T0 + LEASE_MS + 1, rule).await;
    assert_eq!(
        state_of(queue, "j", rule).await.0,
        JobState::Sending,
        "{rule}: attempt 2 holds the job"
    );
    finish(queue, "j", 3, sent("future"), T0 + LEASE_MS + 1, rule).await;
    assert_eq!(
        state_of(queue, "j", rule).await.0,
        JobState::Sending,
        "finish: an attempt that was never claimed changes nothing"
    );
    finish(queue, "j", 2, sent("msg-2"), T0 + LEASE_MS + 2, rule).await;
    let status = status(queue, "j", rule).await;
    assert_eq!(
        (status.state, status.reason.as_str(), status.attempts),
        (JobState::Sent, "msg-2", 2),
        "finish: the attempt holding the lease finishes the job"
    );
    finish(queue, "unknown", 1, sent("x"), T0, rule).await;

    let rule = "finish: a lease that ran out but nobody claimed again still finishes";
    enqueue(queue, vec![job("k", "g", "r", T0)], rule).await;
    assert_eq!(claim_ids(queue, 10, T0, rule).await, vec!["k"], "{rule}");
    finish(queue, "k", 1, sent("msg-k"), T0 + 10 * LEASE_MS, rule).await;
    assert_eq!(
        state_of(queue, "k", rule).await,
        (JobState::Sent, "msg-k".to_owned()),
        "{rule}"
    );
    assert!(
        claim_ids(queue, 10, T0 + 20 * LEASE_MS, rule)
            .await
            .is_empty(),
        "{rule}: a sent job is never handed out again"
    );
}

async fn outcome_rules(queue: &dyn OutboundQueue) {
    let rule = "finish: Retry reschedules; its reason is the next attempt's last_error";
    enqueue(
        queue,
        vec![
            job("retry", "g", "r1", T0),
            job("fail", "g", "r2", T0),
            job("expire", "g", "r3", T0),
            job("send", "g", "r4", T0),
        ],
        rule,
    )
    .await;
    assert_eq!(claim(queue, 10, T0, rule).await.len(), 4, "{rule}");
    queue
        .finish(
            vec![
                Finished {
                    id: "retry".to_owned(),
                    attempt: 1,
                    outcome: Outcome::Retry {
                        at: T0 + 500,
                        reason: "503 Service Unavailable".to_owned(),
                    },
                },
                Finished {
                    id: "fail".to_owned(),
                    attempt: 1,
                    outcome: Outcome::Failed {
                        reason: "BadDeviceToken".to_owned(),
                    },
                },
                Finished {
                    id: "expire".to_owned(),
                    attempt: 1,
                    outcome: Outcome::Expired {
                        reason: "ttl passed".to_owned(),
                    },
                },
                Finished {
                    id: "send".to_owned(),
                    attempt: 1,
                    outcome: sent("projects/p/messages/1"),
                },
            ],
            T0 + 1,
        )
        .await
        .unwrap_or_else(|err| panic!("{rule}: finish failed: {err}"));
    assert_eq!(
        state_of(queue, "retry", rule).await,
        (JobState::Queued, "503 Service Unavailable".to_owned()),
        "{rule}: a job to retry is queued with its reason"
    );
    assert!(
        claim_ids(queue, 10, T0 + 499, rule).await.is_empty(),
        "{rule}: not before the retry time"
    );
    let retried = claim(queue, 10, T0 + 500, rule).await;
    assert_eq!(
        retried
            .iter()
            .map(|j| (j.id.as_str(), j.attempt, j.last_error.as_str()))
            .collect::<Vec<_>>(),
        vec![("retry", 2, "503 Service Unavailable")],
        "{rule}"
    );

    finish(queue, "retry", 2, sent("m"), T0 + 501, rule).await;

    let rule = "finish: Sent, Failed and Expired are final, with their reason";
    for (id, state, reason) in [
        ("send", JobState::Sent, "projects/p/messages/1"),
        ("fail", JobState::Failed, "BadDeviceToken"),
        ("expire", JobState::Expired, "ttl passed"),
    ] {
        let status = status(queue, id, rule).await;
        assert_eq!(
            (
                status.state,
                status.reason.as_str(),
                status.attempts,
                status.updated_at
            ),
            (state, reason, 1, T0 + 1),
            "{rule}: {id}"
        );
    }
    assert!(
        claim_ids(queue, 10, T0 + 100 * LEASE_MS, rule)
            .await
            .is_empty(),
        "{rule}: no final job is handed out again"
    );
    finish(queue, "fail", 1, sent("x"), T0 + 2, rule).await;
    assert_eq!(
        state_of(queue, "fail", rule).await.0,
        JobState::Failed,
        "{rule}: a second finish of a final job changes nothing"
    );
}

async fn expiry_rules(queue: &dyn OutboundQueue) {
    let rule = "expiry: a job past expire_at is never handed out; the claim marks it expired";
    let expiring = |id: &str, expire_at: u64| NewJob {
        expire_at: Some(expire_at),
        ..job(id, "g", id, T0 - 100)
    };
    enqueue(
        queue,
        vec![
            expiring("gone-1", T0 - 1),
            expiring("gone-2", T0 - 50),
            expiring("edge", T0),
            expiring("ok", T0 + 1_000),
            job("plain", "g", "p", T0 - 10),
        ],
        rule,
    )
    .await;
    let claimed = claim_ids(queue, 2, T0, rule).await;
    assert_eq!(
        claimed.iter().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(["edge".to_owned(), "ok".to_owned()]),
        "{rule}: expired jobs do not count against the limit; a job at exactly its expire_at \
         is still handed out"
    );
    for id in ["gone-1", "gone-2"] {
        assert_eq!(
            state_of(queue, id, rule).await.0,
            JobState::Expired,
            "{rule}: {id}"
        );
    }
    assert_eq!(
        claim_ids(queue, 10, T0, rule).await,
        vec!["plain"],
        "{rule}"
    );

    let rule = "expiry: a job whose lease ran out after its expire_at expires, not handed out";
    let again = claim(queue, 10, T0 + LEASE_MS, rule).await;
    assert_eq!(
        again
            .iter()
            .map(|j| (j.id.as_str(), j.attempt))
            .collect::<Vec<_>>(),
        vec![("plain", 2)],
        "{rule}: only the job without expire_at is handed out again"
    );
    assert_eq!(
        state_of(queue, "ok", rule).await.0,
        JobState::Expired,
        "{rule}: ok"
    );
    assert_eq!(
        state_of(queue, "edge", rule).await.0,
        JobState::Expired,
        "{rule}: edge"
    );
}

fn keyed(id: &str, key: &str, not_before: u64) -> NewJob {
    NewJob {
        order_key: Some(key.to_owned()),
        ..job(id, "g", key, not_before)
    }
}

async fn order_key_rules(queue: &dyn OutboundQueue) {
    let rule = "order_key: jobs with one key are handed out one at a time, in enqueue order";
    // k3 is due before k1 and k2: enqueue order, not not_before, decides within a key.
    enqueue(
        queue,
        vec![keyed("k1", "key", T0 - 10), keyed("k2", "key", T0 - 20)],
        rule,
    )
    .await;
    enqueue(
        queue,
        vec![
            keyed("k3", "key", T0 - 30),
            keyed("other", "other-key", T0),
            job("free", "g", "x", T0),
        ],
        rule,
    )
    .await;
    let first = claim_ids(queue, 10, T0, rule).await;
    assert_eq!(
        first.iter().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(["k1".to_owned(), "other".to_owned(), "free".to_owned()]),
        "{rule}: only the first of each key (other keys and unkeyed jobs are not held up)"
    );

    let rule = "order_key: the next waits while the one before is retried";
    finish(
        queue,
        "k1",
        1,
        Outcome::Retry {
            at: T0 + 100,
            reason: "429".to_owned(),
        },
        T0 + 1,
        rule,
    )
    .await;
    assert!(
        claim_ids(queue, 10, T0 + 50, rule).await.is_empty(),
        "{rule}: k1 is not due and k2 must wait for it"
    );
    assert_eq!(
        claim_ids(queue, 10, T0 + 100, rule).await,
        vec!["k1"],
        "{rule}: k1 again, still not k2"
    );
    assert!(
        claim_ids(queue, 10, T0 + 101, rule).await.is_empty(),
        "{rule}: k2 waits while k1 is being sent again"
    );

    let rule = "order_key: the next is claimable once the one before is final";
    finish(queue, "k1", 2, sent("ok"), T0 + 102, rule).await;
    assert_eq!(
        claim_ids(queue, 10, T0 + 103, rule).await,
        vec!["k2"],
        "{rule}: after sent"
    );
    finish(
        queue,
        "k2",
        1,
        Outcome::Failed {
            reason: "400".to_owned(),
        },
        T0 + 104,
        rule,
    )
    .await;
    assert_eq!(
        claim_ids(queue, 10, T0 + 105, rule).await,
        vec!["k3"],
        "{rule}: after failed"
    );

    let rule = "order_key: an expired job lets the next one through";
    enqueue(
        queue,
        vec![
            NewJob {
                expire_at: Some(T0 + 200),
                ..keyed("e1", "exp", T0 + 150)
            },
            keyed("e2", "exp", T0 + 150),
        ],
        rule,
    )
    .await;
    let mut handed_out = claim_ids(queue, 10, T0 + 300, rule).await;
    handed_out.extend(claim_ids(queue, 10, T0 + 300, rule).await);
    assert_eq!(handed_out, vec!["e2"], "{rule}");
    assert_eq!(
        state_of(queue, "e1", rule).await.0,
        JobState::Expired,
        "{rule}"
    );

    let rule = "order_key: a cancelled job lets the next one through";
    enqueue(
        queue,
        vec![
            NewJob {
                group: "cancel-me".to_owned(),
                ..keyed("c1", "can", T0 + 400)
            },
            keyed("c2", "can", T0),
        ],
        rule,
    )
    .await;
    assert!(
        claim_ids(queue, 10, T0 + 300, rule).await.is_empty(),
        "{rule}: c1 is not due yet, and c2 waits for it"
    );
    queue
        .cancel("cancel-me", T0 + 301)
        .await
        .unwrap_or_else(|err| panic!("{rule}: cancel failed: {err}"));
    assert_eq!(
        claim_ids(queue, 10, T0 + 302, rule).await,
        vec!["c2"],
        "{rule}"
    );
}

/// Claimers racing on one queue never get the same job while leases hold, and between them
/// get every job.
async fn racing_claimers<S: OutboundQueue>(queue: Arc<S>) {
    let rule = "racing claimers never receive the same job while leases hold";
    const JOBS: usize = 2_000;
    let jobs: Vec<NewJob> = (0..JOBS)
        .map(|i| {
            job(
                &format!("race-{i:05}"),
                "race",
                &format!("r{i}"),
                T0 - (i % 7) as u64,
            )
        })
        .collect();
    enqueue(&*queue, jobs, rule).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let batch = claim_ids(&*queue, 7, T0, rule).await;
                if batch.is_empty() {
                    return mine;
                }
                mine.extend(batch);
                tokio::task::yield_now().await;
            }
        }));
    }
    let mut seen = BTreeSet::new();
    for mut task in tasks {
        let mine = super::joined(&mut task).await;
        for id in mine {
            assert!(seen.insert(id.clone()), "{rule}: {id} was handed out twice");
        }
    }
    assert_eq!(
        seen.len(),
        JOBS,
        "{rule}: between them the claimers get every job"
    );
}
