//! The `webhook.batch` jobs: up to `[webhooks] batch` deliveries to one endpoint as one queue
//! job, so a busy endpoint costs the queue one claim and one finish per batch instead of per
//! delivery. Each delivery is still a held member job with the id of its `webhook-id`, its
//! own status, attempt log entry and dead letter; one to retry leaves the batch and goes on as
//! an ordinary `webhook` job on the retry schedule.
//!
//! Only endpoints that are neither ordered nor rate limited get batches (an ordered endpoint's
//! deliveries wait in line one by one; a rate limit defers single jobs).
//!
//! Owns: the batch payload ([`WebhookBatch`]), [`BATCH_KIND`], [`batch_jobs`] and
//! [`WebhookBatchHandler`], which runs a claimed batch through
//! [`crate::batch::run_members`], each member delivered by the [`WebhookHandler`] exactly as a
//! single job would be.
//!
//! May touch: the queue (through `run_members`) and the webhook handler.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use herald_core::outbound::{Job, NewJob, OutboundQueue};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::deliver::WebhookHandler;
use super::event::{KIND, frame};
use crate::batch::run_members;
use crate::worker::{JobHandler, JobResult, Retry};

/// The job kind of webhook batches.
pub const BATCH_KIND: &str = "webhook.batch";

/// What a batch job carries: the endpoint once, and each delivery.
#[derive(Debug, Serialize, Deserialize)]
pub struct WebhookBatch {
    pub endpoint: String,
    pub members: Vec<WebhookMember>,
}

/// One delivery of a batch.
#[derive(Debug, Serialize, Deserialize)]
pub struct WebhookMember {
    /// The `webhook-id`, which is also the member job's id.
    pub message: String,
    /// The event id (the member job's group).
    pub event: String,
    pub body: Box<RawValue>,
}

/// The batch job of `jobs` (single `webhook` jobs of one endpoint, not ordered), and its
/// members, for [`OutboundQueue::enqueue_batch`]; `Err` gives the jobs back when a body is not
/// JSON (they stay single).
pub fn batch_jobs(
    endpoint: &str,
    jobs: Vec<NewJob>,
    now: u64,
) -> Result<(NewJob, Vec<NewJob>), Vec<NewJob>> {
    match batch_of(endpoint, &jobs, now) {
        Some(batch) => Ok((batch, jobs)),
        None => Err(jobs),
    }
}

fn batch_of(endpoint: &str, jobs: &[NewJob], now: u64) -> Option<NewJob> {
    let mut members = Vec::with_capacity(jobs.len());
    let mut digest = Sha256::new();
    for job in jobs {
        let (message, body) = super::event::unframe(&job.payload)?;
        let body = std::str::from_utf8(&body).ok()?;
        let body = RawValue::from_string(body.to_owned()).ok()?;
        digest.update(message.as_bytes());
        digest.update([0]);
        members.push(WebhookMember {
            message: message.to_owned(),
            event: job.group.clone(),
            body,
        });
    }
    let batch = WebhookBatch {
        endpoint: endpoint.to_owned(),
        members,
    };
    let payload = serde_json::to_vec(&batch).ok()?;
    Some(NewJob {
        id: format!("batch_{endpoint}_{}", hex::encode(&digest.finalize()[..12])),
        kind: BATCH_KIND.to_owned(),
        group: format!("batch:{endpoint}"),
        recipient: endpoint.to_owned(),
        payload: Bytes::from(payload),
        not_before: now,
        expire_at: None,
        order_key: None,
    })
}

/// Delivers `webhook.batch` jobs.
pub struct WebhookBatchHandler {
    pub queue: Arc<dyn OutboundQueue>,
    pub handler: Arc<WebhookHandler>,
    /// The retry schedule of single deliveries (what a member to retry gets).
    pub retry: Retry,
}

#[async_trait]
impl JobHandler for WebhookBatchHandler {
    async fn run(&self, job: &Job) -> JobResult {
        let batch: WebhookBatch = match serde_json::from_slice(&job.payload) {
            Ok(batch) => batch,
            Err(error) => {
                return JobResult::Failed {
                    reason: format!("unreadable webhook batch: {error}"),
                };
            }
        };
        let endpoint = &batch.endpoint;
        let members = batch
            .members
            .iter()
            .map(|member| (member.message.clone(), member))
            .collect();
        run_members(
            self.queue.as_ref(),
            &self.retry,
            None,
            members,
            |member: &WebhookMember| async move {
                // The member as the single job it would have been: its first attempt.
                let single = Job {
                    id: member.message.clone(),
                    kind: KIND.to_owned(),
                    group: member.event.clone(),
                    recipient: endpoint.clone(),
                    payload: frame(&member.message, member.body.get().as_bytes()),
                    not_before: job.not_before,
                    expire_at: None,
                    attempt: 1,
                    last_error: String::new(),
                };
                let slot = self.handler.slot().await;
                let result = self.handler.deliver(&single).await;
                let payload = match result {
                    JobResult::Retry { .. } | JobResult::Defer { .. } => single.payload,
                    _ => Bytes::new(),
                };
                (result, payload, slot)
            },
        )
        .await
    }
}
