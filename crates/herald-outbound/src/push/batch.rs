//! The `push.<provider>.batch` jobs: up to `[push] batch` deliveries of one push to one
//! provider as one queue job, so a fan-out to N devices costs the queue N / batch claims and
//! finishes instead of N — each device is still its own (held) member job with its own status.
//!
//! Owns: the batch payload ([`Batch`]), [`batch_kind`], the ids of batches, and
//! [`BatchHandler`], which sends a claimed batch's held members concurrently (through the
//! provider's [`DeliveryHandler`], so token hygiene, stats and failure events are the same as
//! for a single delivery) and settles them with
//! [`OutboundQueue::finish_members`](herald_core::outbound::OutboundQueue::finish_members): sent
//! and failed members become final, members to retry become ordinary `push.<provider>` jobs.
//!
//! Crash safety: members are settled in chunks as their sends finish, so what a node that dies
//! mid-batch could send twice is bounded by the chunk size times the batches in flight; the
//! batch is claimed again when its lease runs out and sends only the members still held.
//!
//! May touch: the queue (held members, settling them) and the provider's delivery handler.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use herald_core::device::Provider;
use herald_core::outbound::{Job, MemberFinished, NewJob, OutboundQueue, Outcome};
use herald_core::time::now_ms;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::Delivery;
use super::deliver::DeliveryHandler;
use crate::sender::Target;
use crate::worker::{JobHandler, JobResult, Retry, outcome_of};

/// Members settled per queue call while a batch is sent (and so the most a node that dies
/// mid-batch can send again per batch in flight).
const SETTLE_CHUNK: usize = 64;

/// The job kind of `provider`'s batches.
pub fn batch_kind(provider: Provider) -> &'static str {
    match provider {
        Provider::Fcm => "push.fcm.batch",
        Provider::Apns => "push.apns.batch",
        Provider::Webpush => "push.webpush.batch",
        Provider::Email => "push.email.batch",
    }
}

/// What a batch job carries: the notification once, and where each member goes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Batch {
    pub provider: Provider,
    pub notification: Box<RawValue>,
    /// When the notification expires (ms; members past it are settled as expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_at: Option<u64>,
    pub members: Vec<Member>,
}

/// One delivery of a batch: its member job's id and its destination.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    pub target: Target,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// A batch's id: its push and a digest of its members, so an expansion that runs again
/// (its node died) makes the same batch of the same members, and a different one when the
/// registry changed in between.
pub fn batch_id(uid: &str, provider: Provider, members: &[Member]) -> String {
    let mut digest = Sha256::new();
    for member in members {
        digest.update(member.id.as_bytes());
        digest.update([0]);
    }
    format!(
        "{uid}:{provider}:batch:{}",
        hex::encode(&digest.finalize()[..12])
    )
}

/// The batch job and its member jobs, for [`OutboundQueue::enqueue_batch`].
pub fn batch_jobs(
    uid: &str,
    batch: &Batch,
    recipients: Vec<String>,
    now: u64,
) -> Result<(NewJob, Vec<NewJob>), String> {
    let kind = super::delivery_kind(batch.provider);
    let members = batch
        .members
        .iter()
        .zip(recipients)
        .map(|(member, recipient)| NewJob {
            id: member.id.clone(),
            kind: kind.to_owned(),
            group: uid.to_owned(),
            recipient,
            payload: Bytes::new(),
            not_before: now,
            expire_at: batch.expire_at,
            order_key: None,
        })
        .collect();
    let payload = serde_json::to_vec(batch).map_err(|e| e.to_string())?;
    let job = NewJob {
        id: batch_id(uid, batch.provider, &batch.members),
        kind: batch_kind(batch.provider).to_owned(),
        group: uid.to_owned(),
        recipient: String::new(),
        payload: Bytes::from(payload),
        not_before: now,
        // The members expire, not the batch: a batch that expired unclaimed would leave its
        // members held for ever.
        expire_at: None,
        order_key: None,
    };
    Ok((job, members))
}

/// Sends `push.<provider>.batch` jobs.
pub struct BatchHandler {
    pub queue: Arc<dyn OutboundQueue>,
    pub delivery: Arc<DeliveryHandler>,
    /// The retry policy of the provider's single deliveries (what a member to retry gets).
    pub retry: Retry,
}

#[async_trait]
impl JobHandler for BatchHandler {
    async fn run(&self, job: &Job) -> JobResult {
        let batch: Batch = match serde_json::from_slice(&job.payload) {
            Ok(batch) => batch,
            Err(error) => {
                return JobResult::Failed {
                    reason: format!("unreadable push batch: {error}"),
                };
            }
        };
        let ids: Vec<String> = batch.members.iter().map(|m| m.id.clone()).collect();
        let held = match self.queue.held(ids).await {
            Ok(held) => held,
            Err(error) => {
                return JobResult::Retry {
                    reason: format!("reading the batch's members: {error}"),
                    after: None,
                };
            }
        };
        let held: std::collections::HashSet<String> = held.into_iter().collect();
        let mut counts = [0usize; 3];
        let mut sends = FuturesUnordered::new();
        for member in batch.members.iter().filter(|m| held.contains(&m.id)) {
            sends.push(self.send(job, &batch, member));
        }
        let mut settled = Vec::with_capacity(SETTLE_CHUNK);
        while let Some(done) = sends.next().await {
            counts[match done.outcome {
                Outcome::Sent { .. } => 0,
                Outcome::Retry { .. } => 1,
                _ => 2,
            }] += 1;
            settled.push(done);
            if settled.len() >= SETTLE_CHUNK
                && let Err(reason) = self.settle(std::mem::take(&mut settled)).await
            {
                return JobResult::Retry {
                    reason,
                    after: None,
                };
            }
        }
        if let Err(reason) = self.settle(settled).await {
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
                batch.members.len() - held.len()
            ),
        }
    }
}

impl BatchHandler {
    async fn send(&self, job: &Job, batch: &Batch, member: &Member) -> MemberFinished {
        let outcome = if batch.expire_at.is_some_and(|at| at <= now_ms()) {
            Outcome::Expired {
                reason: "expired before it could be sent".to_owned(),
            }
        } else {
            let result = self
                .delivery
                .deliver(
                    &job.group,
                    &member.target,
                    member.device.as_deref(),
                    &batch.notification,
                )
                .await;
            outcome_of(1, batch.expire_at, result, &self.retry)
        };
        // A member to retry goes on as an ordinary delivery: it needs its own payload.
        let payload = match &outcome {
            Outcome::Retry { .. } => serde_json::to_vec(&Delivery {
                target: member.target.clone(),
                device: member.device.clone(),
                notification: batch.notification.clone(),
            })
            .map(Bytes::from)
            .unwrap_or_default(),
            _ => Bytes::new(),
        };
        MemberFinished {
            id: member.id.clone(),
            outcome,
            payload,
        }
    }

    /// Settles `finished`, retrying the queue for a while; an error means the batch should
    /// be run again later (its unsettled members are still held).
    async fn settle(&self, finished: Vec<MemberFinished>) -> Result<(), String> {
        if finished.is_empty() {
            return Ok(());
        }
        let mut delay = Duration::from_millis(50);
        let mut tries = 0;
        loop {
            match self.queue.finish_members(finished.clone(), now_ms()).await {
                Ok(()) => return Ok(()),
                Err(error) if tries >= 6 => return Err(format!("settling members: {error}")),
                Err(error) => {
                    tracing::warn!(%error, "settling push batch members failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                    tries += 1;
                }
            }
        }
    }
}
