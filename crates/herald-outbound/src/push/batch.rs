//! The `push.<provider>.batch` jobs: up to `[push] batch` deliveries of one push to one
//! provider as one queue job, so a fan-out to N devices costs the queue N / batch claims and
//! finishes instead of N — each device is still its own (held) member job with its own status.
//!
//! Owns: the batch payload ([`Batch`]), [`batch_kind`], the ids of batches, and
//! [`BatchHandler`], which runs a claimed batch through [`crate::batch::run_members`] with
//! each member sent by the provider's [`DeliveryHandler`] (so token hygiene, stats and failure
//! events are the same as for a single delivery); members to retry become ordinary
//! `push.<provider>` jobs.
//!
//! May touch: the queue (through `run_members`) and the provider's delivery handler.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use herald_core::device::Provider;
use herald_core::outbound::{Job, NewJob, OutboundQueue};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::Delivery;
use super::deliver::DeliveryHandler;
use crate::batch::run_members;
use crate::sender::Target;
use crate::worker::{JobHandler, JobResult, Retry};

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
        let members = batch
            .members
            .iter()
            .map(|member| (member.id.clone(), member))
            .collect();
        run_members(
            self.queue.as_ref(),
            &self.retry,
            batch.expire_at,
            members,
            |member: &Member| async {
                let slot = self.delivery.slot().await;
                let result = self
                    .delivery
                    .deliver(
                        &job.group,
                        &member.target,
                        member.device.as_deref(),
                        &batch.notification,
                    )
                    .await;
                // A member to retry goes on as an ordinary delivery, with a payload of its own.
                let payload = if matches!(result, JobResult::Retry { .. } | JobResult::Defer { .. })
                {
                    serde_json::to_vec(&Delivery {
                        target: member.target.clone(),
                        device: member.device.clone(),
                        notification: batch.notification.clone(),
                    })
                    .map(Bytes::from)
                    .unwrap_or_default()
                } else {
                    Bytes::new()
                };
                (result, payload, slot)
            },
        )
        .await
    }
}
