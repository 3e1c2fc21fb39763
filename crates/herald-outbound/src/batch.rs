//! Running a claimed batch job (see the batch rules of [`herald_core::outbound`]): its members
//! still held are sent concurrently and settled in chunks as their answers come, each with the
//! outcome a single job of its kind would get (retry time, dead letter, expiry).
//!
//! Owns: [`run_members`], the loop every batch kind (`push.<provider>.batch`,
//! `webhook.batch`) runs; what a member is and how it is sent is the caller's.
//!
//! Crash safety: settling in chunks of [`SETTLE_CHUNK`] bounds what a node that dies
//! mid-batch could send twice (the sends in flight plus one chunk per batch); the batch is
//! claimed again when its lease runs out and sends only the members still held.
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

/// Members settled per queue call while a batch is sent.
pub const SETTLE_CHUNK: usize = 64;

/// Sends the members of a claimed batch that are still held — `members` are `(member job id,
/// member)` — through `send`, which answers with the member's result and, when that is a retry
/// or a deferral, the payload the member goes on with as a single job of its kind. Returns
/// the batch's own result: done with counts, or a retry when the queue could not be read or
/// written (the members not settled stay held for the next run).
pub async fn run_members<M, F, Fut>(
    queue: &dyn OutboundQueue,
    retry: &Retry,
    expire_at: Option<u64>,
    members: Vec<(String, M)>,
    send: F,
) -> JobResult
where
    F: Fn(M) -> Fut,
    Fut: Future<Output = (JobResult, Bytes)>,
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
                return MemberFinished {
                    id,
                    outcome: Outcome::Expired {
                        reason: "expired before it could be sent".to_owned(),
                    },
                    payload: Bytes::new(),
                };
            }
            let (result, payload) = send(member).await;
            MemberFinished {
                id,
                outcome: outcome_of(1, expire_at, result, retry),
                payload,
            }
        })
        .collect();
    // Sent, to retry, failed or expired.
    let mut counts = [0usize; 3];
    let mut settled = Vec::with_capacity(SETTLE_CHUNK);
    while let Some(done) = sends.next().await {
        counts[match done.outcome {
            Outcome::Sent { .. } => 0,
            Outcome::Retry { .. } => 1,
            _ => 2,
        }] += 1;
        settled.push(done);
        if settled.len() >= SETTLE_CHUNK
            && let Err(reason) = settle(queue, std::mem::take(&mut settled)).await
        {
            return JobResult::Retry {
                reason,
                after: None,
            };
        }
    }
    if let Err(reason) = settle(queue, settled).await {
        return JobResult::Retry {
            reason,
            after: None,
        };
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
