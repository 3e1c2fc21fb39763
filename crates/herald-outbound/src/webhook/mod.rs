//! Webhooks out: signed HTTP POSTs of Herald's events to the endpoints operators register,
//! through the one outbound queue (durable, retried on the Standard Webhooks schedule, at
//! least once with the same `webhook-id`).
//!
//! Owns: the endpoint model ([`endpoint`]), the endpoints this node knows ([`endpoints`]),
//! signing ([`sign`]), the events and their bodies ([`event`]), the delivery job handler
//! ([`deliver`]), what turns publications, client lifecycle events and push failures into
//! jobs ([`observe`]), and [`WebhookService`], which enqueues, disables and replays.
//!
//! May touch: the [`OutboundQueue`] and [`WebhookStore`] it is given; the endpoints' URLs
//! (through [`deliver`] only, behind the egress check).

pub mod batch;
pub mod deliver;
pub mod endpoint;
pub mod endpoints;
pub mod event;
pub mod observe;
pub mod sign;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use herald_core::outbound::{NewJob, OutboundQueue, QueueError};
use herald_core::time::now_ms;
use herald_core::webhook_store::WebhookStore;
use serde::{Deserialize, Serialize};

use crate::worker::Wakeup;
use endpoint::{Disabled, EndpointState};
use endpoints::Endpoints;
use event::{Event, EventType};

/// The store collection of deliveries that failed for good (what a replay sends again).
pub const DEAD_LETTERS: &str = "dead_letters";

/// Most dead letters one replay of a whole endpoint re-sends.
pub const MAX_REPLAY: usize = 10_000;

/// How deliveries run (from `[webhooks]`).
#[derive(Clone, Debug)]
pub struct WebhookSettings {
    /// Let endpoints be on private, loopback or link-local addresses (tests, private
    /// networks); off: such addresses are refused.
    pub allow_private_addresses: bool,
    /// How long one request may take, when the endpoint does not say.
    pub timeout: Duration,
    /// An endpoint failing without a success for this long is disabled.
    pub disable_after: Duration,
    /// Attempts per delivery (the retry schedule's, for knowing the last one).
    pub attempts: u32,
    /// Deliveries to one endpoint queued together as one `webhook.batch` job (1: none).
    pub batch: usize,
}

/// Counters exported as metrics.
#[derive(Debug, Default)]
pub struct WebhookStats {
    /// Deliveries queued.
    pub enqueued: AtomicU64,
    /// Deliveries the endpoint accepted (2xx).
    pub delivered: AtomicU64,
    /// Attempts that failed (each retry counts).
    pub failed_attempts: AtomicU64,
    /// Deliveries given up (dead letters).
    pub dead: AtomicU64,
    /// Endpoints Herald disabled (410, or failing too long).
    pub disabled_endpoints: AtomicU64,
    /// Lifecycle events dropped because the buffer was full or queueing failed.
    pub dropped_events: AtomicU64,
}

impl WebhookStats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A delivery that failed for good, kept so it can be replayed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeadLetter {
    pub message: String,
    pub endpoint: String,
    /// The event id (the job's group).
    pub event: String,
    pub body: String,
    pub failed_at: u64,
    pub reason: String,
}

/// Enqueues events, disables endpoints, replays dead letters.
pub struct WebhookService {
    pub endpoints: Arc<Endpoints>,
    pub queue: Arc<dyn OutboundQueue>,
    pub store: Arc<dyn WebhookStore>,
    pub wakeup: Arc<Wakeup>,
    pub stats: Arc<WebhookStats>,
    pub settings: WebhookSettings,
}

impl std::fmt::Debug for WebhookService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookService").finish_non_exhaustive()
    }
}

impl WebhookService {
    /// Queues one delivery per (event, endpoint that wants it), durably; returns how many
    /// were new. Several deliveries to an endpoint that is neither ordered nor rate limited
    /// go as `webhook.batch` jobs of up to `batch` deliveries ([`batch`]).
    pub async fn enqueue(&self, events: &[Event]) -> Result<usize, QueueError> {
        let now = now_ms();
        let mut jobs: Vec<NewJob> = Vec::new();
        let mut batchable: std::collections::BTreeMap<String, Vec<NewJob>> = Default::default();
        for event in events {
            let targets = self
                .endpoints
                .matching(event.kind, event.channel.as_deref());
            if targets.is_empty() {
                continue;
            }
            let body = event
                .body()
                .map_err(|e| QueueError::Invalid(format!("webhook body: {e}")))?;
            for entry in &targets {
                let job = event.job(&body, &entry.endpoint, now);
                let endpoint = &entry.endpoint;
                if self.settings.batch > 1 && !endpoint.ordered && endpoint.rate_limit == 0 {
                    batchable.entry(endpoint.id.clone()).or_default().push(job);
                } else {
                    jobs.push(job);
                }
            }
        }
        let mut added = 0;
        for (endpoint, mut waiting) in batchable {
            while !waiting.is_empty() {
                let rest = waiting.split_off(waiting.len().min(self.settings.batch));
                let chunk = std::mem::replace(&mut waiting, rest);
                if chunk.len() == 1 {
                    jobs.extend(chunk);
                    continue;
                }
                match batch::batch_jobs(&endpoint, chunk, now) {
                    Ok((job, members)) => added += self.queue.enqueue_batch(job, members).await?,
                    Err(chunk) => jobs.extend(chunk),
                }
            }
        }
        if !jobs.is_empty() {
            added += self.queue.enqueue(jobs).await?;
        }
        if added == 0 {
            return Ok(0);
        }
        WebhookStats::add(&self.stats.enqueued, added as u64);
        self.wakeup.wake();
        Ok(added)
    }

    /// Disables endpoint `id` (410 Gone, failing too long): stored, logged, counted and
    /// announced as a `webhook.endpoint_disabled` event to the endpoints that want it.
    pub async fn disable(&self, id: &str, reason: String) {
        let Some(entry) = self.endpoints.get(id) else {
            return;
        };
        if entry.state.disabled.is_some() {
            return;
        }
        let at = now_ms();
        let state = EndpointState {
            failing_since: entry.state.failing_since,
            disabled: Some(Disabled {
                at,
                reason: reason.clone(),
            }),
        };
        if let Err(error) = self.endpoints.set_state(id, state).await {
            tracing::warn!(endpoint = %id, %error, "could not store that a webhook endpoint is disabled");
            return;
        }
        WebhookStats::add(&self.stats.disabled_endpoints, 1);
        tracing::warn!(endpoint = %id, url = %entry.endpoint.url, %reason, "webhook endpoint disabled");
        let data = serde_json::json!({
            "endpoint": id,
            "url": entry.endpoint.url,
            "reason": reason,
            "disabled_at": event::rfc3339(at),
        });
        let key = format!("{}:{id}:{at}", EventType::EndpointDisabled.as_str());
        match Event::new(EventType::EndpointDisabled, key, None, at, &data) {
            Ok(event) => {
                if let Err(error) = self.enqueue(&[event]).await {
                    tracing::warn!(%error, "could not queue the endpoint-disabled webhook");
                }
            }
            Err(error) => tracing::warn!(%error, "could not build the endpoint-disabled webhook"),
        }
    }

    /// Keeps a delivery that failed for good, for replay.
    pub async fn keep_dead_letter(&self, letter: &DeadLetter) {
        WebhookStats::add(&self.stats.dead, 1);
        let document = match serde_json::to_vec(letter) {
            Ok(document) => Bytes::from(document),
            Err(error) => {
                tracing::warn!(%error, "could not encode a webhook dead letter");
                return;
            }
        };
        if let Err(error) = self
            .store
            .put_document(DEAD_LETTERS, &letter.message, document)
            .await
        {
            tracing::warn!(message = %letter.message, %error, "could not keep a webhook dead letter");
        }
    }

    /// Queues dead letters again, with their `webhook-id`: `message` alone, or (without it)
    /// every dead letter of `endpoint` (at most [`MAX_REPLAY`]). Returns how many.
    pub async fn replay(&self, endpoint: &str, message: Option<&str>) -> Result<u64, QueueError> {
        let letters: Vec<DeadLetter> = match message {
            Some(message) => self
                .store
                .document(DEAD_LETTERS, message)
                .await?
                .and_then(|doc| serde_json::from_slice(&doc).ok())
                .into_iter()
                .filter(|letter: &DeadLetter| letter.endpoint == endpoint)
                .collect(),
            None => self
                .store
                .documents(DEAD_LETTERS)
                .await?
                .values()
                .filter_map(|doc| serde_json::from_slice::<DeadLetter>(doc).ok())
                .filter(|letter| letter.endpoint == endpoint)
                .take(MAX_REPLAY)
                .collect(),
        };
        if letters.is_empty() {
            return Ok(0);
        }
        let ordered = self
            .endpoints
            .get(endpoint)
            .is_some_and(|e| e.endpoint.ordered);
        let now = now_ms();
        let jobs: Vec<NewJob> = letters
            .iter()
            .map(|letter| NewJob {
                // A new job (the old one is final and its id taken), same webhook-id inside.
                id: format!("{}.replay{now}", letter.message),
                kind: event::KIND.to_owned(),
                group: letter.event.clone(),
                recipient: letter.endpoint.clone(),
                payload: event::frame(&letter.message, letter.body.as_bytes()),
                not_before: now,
                expire_at: None,
                order_key: ordered.then(|| event::order_key(endpoint)),
            })
            .collect();
        let added = self.queue.enqueue(jobs).await?;
        for letter in &letters {
            self.store
                .delete_document(DEAD_LETTERS, &letter.message)
                .await?;
        }
        WebhookStats::add(&self.stats.enqueued, added as u64);
        self.wakeup.wake();
        Ok(added as u64)
    }
}
