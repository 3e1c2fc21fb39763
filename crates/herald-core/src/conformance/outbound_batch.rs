//! The outbound queue suite's batch rules: a batch job and its held members
//! ([`OutboundQueue::enqueue_batch`], [`OutboundQueue::held`],
//! [`OutboundQueue::finish_members`]), as the contract in [`crate::outbound`] states them.
//!
//! Owns: [`batch_rules`], called by [`super::outbound::run_outbound_suite`].
//!
//! May touch: only the queue it is given.

use bytes::Bytes;

use crate::outbound::{JobState, MemberFinished, NewJob, OutboundQueue, Outcome, StatusFilter};

use super::outbound::{KIND, T0, claim, claim_ids, finish, job, sent, state_of, statuses};

const BATCH_KIND: &str = "push.test.batch";

fn batch(id: &str, group: &str) -> NewJob {
    NewJob {
        kind: BATCH_KIND.to_owned(),
        ..job(id, group, "", T0)
    }
}

fn members(group: &str, ids: &[&str]) -> Vec<NewJob> {
    ids.iter()
        .map(|id| job(id, group, &format!("device {id}"), T0))
        .collect()
}

async fn enqueue_batch(queue: &dyn OutboundQueue, id: &str, group: &str, ids: &[&str]) -> usize {
    queue
        .enqueue_batch(batch(id, group), members(group, ids))
        .await
        .unwrap_or_else(|err| panic!("enqueue_batch of {id} failed: {err}"))
}

async fn held(queue: &dyn OutboundQueue, ids: &[&str], rule: &str) -> Vec<String> {
    let mut held = queue
        .held(ids.iter().map(|id| (*id).to_owned()).collect())
        .await
        .unwrap_or_else(|err| panic!("{rule}: held failed: {err}"));
    held.sort();
    held
}

async fn settle(queue: &dyn OutboundQueue, id: &str, outcome: Outcome, now: u64, rule: &str) {
    queue
        .finish_members(
            vec![MemberFinished {
                id: id.to_owned(),
                outcome,
                payload: Bytes::from(format!("retry payload of {id}")),
            }],
            now,
        )
        .await
        .unwrap_or_else(|err| panic!("{rule}: finish_members failed: {err}"));
}

pub(super) async fn batch_rules(queue: &dyn OutboundQueue) {
    let rule = "batch: enqueue_batch adds the batch and counts its new members";
    assert_eq!(
        enqueue_batch(queue, "b1", "g", &["m1", "m2", "m3"]).await,
        3,
        "{rule}"
    );

    let rule = "batch: members are reported queued, with their group and recipient";
    let listed = statuses(
        queue,
        &StatusFilter {
            group: "g".into(),
            ..StatusFilter::default()
        },
        10,
        rule,
    )
    .await;
    let ids: Vec<&str> = listed.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["b1", "m1", "m2", "m3"], "{rule}");
    assert!(
        listed.iter().all(|s| s.state == JobState::Queued),
        "{rule}: {listed:?}"
    );
    assert_eq!(listed[1].recipient, "device m1", "{rule}");

    let rule = "batch: members are never claimed themselves; the batch is, by its kind";
    assert!(
        claim_ids(queue, 10, T0 + 1, rule).await.is_empty(),
        "{rule}"
    );
    let claimed = queue
        .claim(BATCH_KIND, 10, super::outbound::LEASE, T0 + 1)
        .await
        .unwrap_or_else(|err| panic!("{rule}: claim failed: {err}"));
    assert_eq!(
        claimed.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        ["b1"],
        "{rule}"
    );

    let rule = "batch: held lists the members not yet settled";
    assert_eq!(
        held(queue, &["m1", "m2", "m3", "nope"], rule).await,
        ["m1", "m2", "m3"],
        "{rule}"
    );

    let rule = "batch: a member settled as sent is final, with the detail as its reason";
    settle(queue, "m1", sent("provider-id-1"), T0 + 2, rule).await;
    assert_eq!(
        state_of(queue, "m1", rule).await,
        (JobState::Sent, "provider-id-1".to_owned()),
        "{rule}"
    );
    assert_eq!(
        held(queue, &["m1", "m2", "m3"], rule).await,
        ["m2", "m3"],
        "{rule}"
    );

    let rule = "batch: the first settle of a member wins";
    settle(
        queue,
        "m1",
        Outcome::Failed {
            reason: "late".into(),
        },
        T0 + 3,
        rule,
    )
    .await;
    assert_eq!(
        state_of(queue, "m1", rule).await.0,
        JobState::Sent,
        "{rule}"
    );

    let rule = "batch: a failed member is final with its reason";
    settle(
        queue,
        "m2",
        Outcome::Failed {
            reason: "BadDeviceToken".into(),
        },
        T0 + 2,
        rule,
    )
    .await;
    assert_eq!(
        state_of(queue, "m2", rule).await,
        (JobState::Failed, "BadDeviceToken".to_owned()),
        "{rule}"
    );

    let rule = "batch: a member settled for a retry becomes a queued job of its kind, due then, \
                with the payload given and its first attempt counted";
    settle(
        queue,
        "m3",
        Outcome::Retry {
            at: T0 + 5_000,
            reason: "503".into(),
        },
        T0 + 2,
        rule,
    )
    .await;
    assert!(held(queue, &["m3"], rule).await.is_empty(), "{rule}");
    assert_eq!(
        state_of(queue, "m3", rule).await,
        (JobState::Queued, "503".to_owned()),
        "{rule}"
    );
    assert!(
        claim_ids(queue, 10, T0 + 4_999, rule).await.is_empty(),
        "{rule}: not before its time"
    );
    let retried = claim(queue, 10, T0 + 5_000, rule).await;
    assert_eq!(retried.len(), 1, "{rule}");
    assert_eq!(retried[0].id, "m3", "{rule}");
    assert_eq!(retried[0].kind, KIND, "{rule}");
    assert_eq!(retried[0].attempt, 2, "{rule}");
    assert_eq!(retried[0].last_error, "503", "{rule}");
    assert_eq!(&retried[0].payload[..], b"retry payload of m3", "{rule}");
    finish(queue, "m3", 2, sent("ok"), T0 + 5_001, rule).await;
    assert_eq!(
        state_of(queue, "m3", rule).await.0,
        JobState::Sent,
        "{rule}"
    );

    let rule = "batch: known members are skipped, and a batch with no new member is not added";
    assert_eq!(
        enqueue_batch(queue, "b2", "g", &["m1", "m4"]).await,
        1,
        "{rule}"
    );
    assert_eq!(held(queue, &["m1", "m4"], rule).await, ["m4"], "{rule}");
    assert_eq!(
        enqueue_batch(queue, "b3", "g", &["m1", "m4"]).await,
        0,
        "{rule}"
    );
    let batches = queue
        .claim(BATCH_KIND, 10, super::outbound::LEASE, T0 + 10)
        .await
        .unwrap_or_else(|err| panic!("{rule}: claim failed: {err}"));
    assert_eq!(
        batches.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        ["b2"],
        "{rule}: b3 had nothing new"
    );

    let rule = "batch: a known batch id adds nothing";
    assert_eq!(enqueue_batch(queue, "b2", "g", &["m9"]).await, 0, "{rule}");
    assert!(held(queue, &["m9"], rule).await.is_empty(), "{rule}");

    let rule = "batch: cancelling the group cancels held members and queued batches";
    assert_eq!(
        enqueue_batch(queue, "c1", "h", &["n1", "n2"]).await,
        2,
        "{rule}"
    );
    let cancelled = queue
        .cancel("h", T0 + 20)
        .await
        .unwrap_or_else(|err| panic!("{rule}: cancel failed: {err}"));
    assert_eq!(cancelled, 3, "{rule}");
    assert!(held(queue, &["n1", "n2"], rule).await.is_empty(), "{rule}");
    assert_eq!(
        state_of(queue, "n1", rule).await.0,
        JobState::Cancelled,
        "{rule}"
    );
    settle(queue, "n2", sent("too late"), T0 + 21, rule).await;
    assert_eq!(
        state_of(queue, "n2", rule).await.0,
        JobState::Cancelled,
        "{rule}: a cancelled member is not settled"
    );
}
