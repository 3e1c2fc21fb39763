//! Running a claimed batch job (see the batch rules of [`herald_core::outbound`]): its members
//! still held are sent concurrently and settled in chunks as their answers come, each with the
//! outcome a single job of its kind would get (retry time, dead letter, expiry).
//!
//! Owns: [`run_members`], the loop every batch kind (`push.<provider>.batch`,
//! `webhook.batch`) runs; what a member is and how it is sent is the caller's.
//!
//! Crash safety: answers are recorded as they come (what finished during one write goes in
//! the next), and each send's slot is released only once its answer is written, so what a
//! node that dies mid-batch could send twice is bounded by the slots, as for single jobs; the
//! batch is claimed again when its lease runs out and sends only the members still held.
//!
//! May touch: the queue it is given (held members, settling them).

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use herald_core::outbound::{MemberFinished, OutboundQueue, Outcome};
use herald_core::time::now_ms;

use crate::worker::{JobResult, Retry, outcome_of};

/// Sends the members of a claimed batch that are still held — `members` are `(member job id,
/// member)` — through `send`, which answers with the member's result, the payload the member
/// goes on with as a single job of its kind when that result is a retry or a deferral, and a
/// guard (a send slot) kept until the result is recorded. Results are recorded as they come:
/// whatever finished while the previous write was in flight goes in the next, so the sends not
/// yet recorded — what a crash could send twice — are those the guards bound. Returns the
/// batch's own result: done with counts, or a retry when the queue could not be read or
/// written (the members not settled stay held for the next run).
pub async fn run_members<M, G, F, Fut>(
    queue: &dyn OutboundQueue,
    retry: &Retry,
    expire_at: Option<u64>,
    members: Vec<(String, M)>,
    send: F,
) -> JobResult
where
    F: Fn(M) -> Fut,
    Fut: Future<Output = (JobResult, Bytes, Option<G>)>,
{
    let total = members.len();
    let ids: Vec<String> = members.iter().map(|(id, _)| id.clone()).collect();
    let held: HashSet<String> = match queue.held(ids).await {
        Ok(held) => held.into_iter().collect(),
        Err(error) => {
            return JobResult::Retry {
                reason: format!("reading the batch's members: {error}"),
                after: None,
            };
        }
    };
    let send = &send;
    let mut sends: FuturesUnordered<_> = members
        .into_iter()
        .filter(|(id, _)| held.contains(id))
        .map(|(id, member)| async move {
            if expire_at.is_some_and(|at| at <= now_ms()) {
                let expired = MemberFinished {
                    id,
                    outcome: Outcome::Expired {
                        reason: "expired before it could be sent".to_owned(),
                    },
                    payload: Bytes::new(),
                };
                return (expired, None);
            }
            let (result, payload, guard) = send(member).await;
            let finished = MemberFinished {
                id,
                outcome: outcome_of(1, expire_at, result, retry),
                payload,
            };
            (finished, guard)
        })
        .collect();
    // Sent, to retry, failed or expired.
    let mut counts = [0usize; 3];
    let mut pending: Vec<MemberFinished> = Vec::new();
    let mut guards: Vec<G> = Vec::new();
    let mut writing = None;
    loop {
        if writing.is_none() && !pending.is_empty() {
            let batch = std::mem::take(&mut pending);
            let held_guards = std::mem::take(&mut guards);
            writing = Some(Box::pin(async move {
                let result = settle(queue, batch).await;
                drop(held_guards);
                result
            }));
        }
        tokio::select! {
            Some((done, guard)) = sends.next(), if !sends.is_empty() => {
                counts[match done.outcome {
                    Outcome::Sent { .. } => 0,
                    Outcome::Retry { .. } => 1,
                    _ => 2,
                }] += 1;
                pending.push(done);
                guards.extend(guard);
            }
            Some(result) = async { match writing.as_mut() {
                Some(write) => Some(write.await),
                None => None,
            } }, if writing.is_some() => {
                writing = None;
                if let Err(reason) = result {
                    return JobResult::Retry { reason, after: None };
                }
            }
            else => break,
        }
    }
    JobResult::Done {
        detail: format!(
            "{} sent, {} to retry, {} failed or expired, {} settled before",
            counts[0],
            counts[1],
            counts[2],
            total - held.len()
        ),
    }
}

/// Settles `finished`, retrying the queue for a few seconds; an error means the batch should
/// run again later (its unsettled members are still held).
async fn settle(queue: &dyn OutboundQueue, finished: Vec<MemberFinished>) -> Result<(), String> {
    if finished.is_empty() {
        return Ok(());
    }
    let mut delay = Duration::from_millis(50);
    for _ in 0..6 {
        match queue.finish_members(finished.clone(), now_ms()).await {
            Ok(()) => return Ok(()),
            Err(error) => {
                tracing::warn!(%error, "settling batch members failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
    queue
        .finish_members(finished, now_ms())
        .await
        .map_err(|error| format!("settling batch members: {error}"))
}
