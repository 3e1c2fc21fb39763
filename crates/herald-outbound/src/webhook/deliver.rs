//! The `webhook` jobs: one signed POST of one event to one endpoint, and what follows from
//! the answer — success on 2xx only; `Retry-After` honoured; 410 Gone disables the endpoint;
//! an endpoint failing without a success for longer than `disable_after` is disabled; the
//! endpoint's rate limit defers (without failing) what is over it. Every attempt is logged
//! (status, duration) in the [`WebhookStore`](herald_core::webhook_store::WebhookStore), and a
//! delivery that fails for good is kept as a dead letter for replay.
//!
//! Owns: [`WebhookHandler`] and the attempt log's writer ([`record_attempts`]).
//!
//! May touch: the endpoints' URLs over HTTP — only public addresses unless
//! `allow_private_addresses` (hosts through [`PublicOnlyResolver`], IP literals through
//! [`literal_host_reason`]) — and the service's queue and store.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use herald_core::outbound::Job;
use herald_core::time::now_ms;
use herald_core::webhook_store::{AttemptRecord, WebhookStore};
use tokio::sync::mpsc;

use super::endpoint::EndpointState;
use super::endpoints::Entry;
use super::event::unframe;
use super::sign::signature_header;
use super::{DeadLetter, WebhookService, WebhookStats};
use crate::egress::{PublicOnlyResolver, forbidden_in_chain, literal_host_reason};
use crate::sender::SendError;
use crate::worker::{JobHandler, JobResult};

/// Response bodies are read up to this much (and shown in the attempt log up to 256 bytes).
const MAX_BODY: usize = 4096;

/// The window of an endpoint's rate limit.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// Delivers `webhook` jobs.
pub struct WebhookHandler {
    service: Arc<WebhookService>,
    client: reqwest::Client,
    attempts: mpsc::UnboundedSender<AttemptRecord>,
    /// Requests in flight, shared by single deliveries and the members of batches.
    slots: Arc<tokio::sync::Semaphore>,
}

/// How one attempt went.
enum Answer {
    Delivered(u16),
    /// Worth retrying: the status (0: none), why, and the far side's `Retry-After`.
    Failed {
        status: u16,
        reason: String,
        after: Option<Duration>,
    },
    Gone,
    /// Refused before sending (egress policy, a bad URL): retrying cannot help.
    Refused(String),
}

impl WebhookHandler {
    /// The handler and the channel its attempt log goes through (drain it with
    /// [`record_attempts`]). `concurrency` is the deliveries in flight: as many connections
    /// per endpoint host are kept open between deliveries, so a busy endpoint is not
    /// reconnected to for every request (HTTP/1.1 needs one connection per request in
    /// flight).
    pub fn new(
        service: Arc<WebhookService>,
        concurrency: usize,
    ) -> Result<(Self, mpsc::UnboundedReceiver<AttemptRecord>), String> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("Herald-Webhooks/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(concurrency.max(1));
        if !service.settings.allow_private_addresses {
            builder = builder.dns_resolver(Arc::new(PublicOnlyResolver));
        }
        let client = builder
            .build()
            .map_err(|e| format!("webhook HTTP client: {e}"))?;
        let (attempts, log) = mpsc::unbounded_channel();
        Ok((
            Self {
                service,
                client,
                attempts,
                slots: Arc::new(tokio::sync::Semaphore::new(concurrency.max(1))),
            },
            log,
        ))
    }

    async fn post(&self, entry: &Entry, message: &str, body: Bytes) -> Answer {
        let endpoint = &entry.endpoint;
        let url = match reqwest::Url::parse(&endpoint.url) {
            Ok(url) => url,
            Err(error) => return Answer::Refused(format!("bad url: {error}")),
        };
        if !self.service.settings.allow_private_addresses
            && let Some(reason) = literal_host_reason(&url)
        {
            return Answer::Refused(format!(
                "egress refused: {} is a {reason} address (webhooks.allow_private_addresses is off)",
                url.host_str().unwrap_or_default()
            ));
        }
        let timestamp = now_ms() / 1000;
        let signature = signature_header(&entry.secrets, message, timestamp, &body);
        let timeout = endpoint
            .timeout
            .map_or(self.service.settings.timeout, |t| t.as_duration());
        let sent = self
            .client
            .post(url)
            .timeout(timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", message)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(error) => {
                if let Some(forbidden) = forbidden_in_chain(&error) {
                    return Answer::Refused(format!("egress refused: {forbidden}"));
                }
                return match crate::push_http::transport_error("webhook", &error) {
                    SendError::Retry { reason, .. } => Answer::Failed {
                        status: 0,
                        reason,
                        after: None,
                    },
                    other => Answer::Refused(other.to_string()),
                };
            }
        };
        let status = response.status();
        if status.is_success() {
            return Answer::Delivered(status.as_u16());
        }
        if status == reqwest::StatusCode::GONE {
            return Answer::Gone;
        }
        let after = crate::push_http::retry_after(response.headers(), SystemTime::now());
        let body = crate::push_http::error_body(response).await;
        let shown = String::from_utf8_lossy(&body[..body.len().min(256).min(MAX_BODY)]);
        Answer::Failed {
            status: status.as_u16(),
            reason: format!("HTTP {}: {}", status.as_u16(), shown.trim()),
            after,
        }
    }

    fn log(&self, job: &Job, message: &str, status: u16, started: Instant, error: &str) {
        let _ = self.attempts.send(AttemptRecord {
            message: message.to_owned(),
            endpoint: job.recipient.clone(),
            attempt: job.attempt,
            at: now_ms().saturating_sub(started.elapsed().as_millis() as u64),
            status,
            duration_ms: started.elapsed().as_millis() as u64,
            error: error.to_owned(),
        });
    }

    /// Gives up on the delivery: keeps it as a dead letter and says so to the worker.
    async fn dead(&self, job: &Job, message: &str, body: &Bytes, reason: String) -> JobResult {
        let letter = DeadLetter {
            message: message.to_owned(),
            endpoint: job.recipient.clone(),
            event: job.group.clone(),
            body: String::from_utf8_lossy(body).into_owned(),
            failed_at: now_ms(),
            reason: reason.clone(),
        };
        self.service.keep_dead_letter(&letter).await;
        JobResult::Failed { reason }
    }

    /// A failed attempt: starts or continues the endpoint's run of failures, and disables it
    /// once the run is longer than `disable_after`. Returns whether it was disabled.
    async fn failing(&self, entry: &Entry) -> bool {
        let now = now_ms();
        let id = &entry.endpoint.id;
        match entry.state.failing_since {
            None => {
                let state = EndpointState {
                    failing_since: Some(now),
                    ..entry.state.clone()
                };
                if let Err(error) = self.service.endpoints.set_state(id, state).await {
                    tracing::warn!(endpoint = %id, %error, "could not record a webhook failure run");
                }
                false
            }
            Some(since)
                if now.saturating_sub(since)
                    >= self.service.settings.disable_after.as_millis() as u64 =>
            {
                let reason = format!(
                    "failing without a success since {} (webhooks.disable_after)",
                    super::event::rfc3339(since)
                );
                self.service.disable(id, reason).await;
                true
            }
            Some(_) => false,
        }
    }

    async fn succeeded(&self, entry: &Entry) {
        if entry.state.failing_since.is_some() {
            let state = EndpointState {
                failing_since: None,
                ..entry.state.clone()
            };
            if let Err(error) = self
                .service
                .endpoints
                .set_state(&entry.endpoint.id, state)
                .await
            {
                tracing::warn!(endpoint = %entry.endpoint.id, %error, "could not clear a webhook failure run");
            }
        }
    }
}

#[async_trait]
impl JobHandler for WebhookHandler {
    async fn run(&self, job: &Job) -> JobResult {
        let _slot = self.slot().await;
        self.deliver(job).await
    }
}

impl WebhookHandler {
    /// One of the requests in flight (`None` only if the slots were closed, which they never
    /// are); a batch keeps it until its member's answer is recorded.
    pub async fn slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.slots.clone().acquire_owned().await.ok()
    }

    /// One attempt of a `webhook` job (or a batch's member as the single job it would have
    /// been), without taking a slot: the caller holds one.
    pub async fn deliver(&self, job: &Job) -> JobResult {
        let Some((message, body)) = unframe(&job.payload) else {
            return JobResult::Failed {
                reason: "unreadable webhook job".into(),
            };
        };
        let service = &self.service;
        let Some(entry) = service.endpoints.get(&job.recipient) else {
            return self
                .dead(job, message, &body, "the endpoint was deleted".into())
                .await;
        };
        if let Some(disabled) = &entry.state.disabled {
            let reason = format!("the endpoint is disabled: {}", disabled.reason);
            return self.dead(job, message, &body, reason).await;
        }
        if !entry.endpoint.enabled {
            let reason = "the endpoint is disabled (enabled = false)".to_owned();
            return self.dead(job, message, &body, reason).await;
        }
        if entry.endpoint.rate_limit > 0 {
            let key = format!("webhook:{}", entry.endpoint.id);
            let now = now_ms();
            match service
                .queue
                .take_rate(&key, entry.endpoint.rate_limit, RATE_WINDOW, now)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    let window = RATE_WINDOW.as_millis() as u64;
                    let jitter = rand::random_range(0..50);
                    return JobResult::Defer {
                        reason: "over the endpoint's rate limit".into(),
                        after: Duration::from_millis(window - now % window + jitter),
                    };
                }
                Err(error) => {
                    return JobResult::Defer {
                        reason: format!("rate limit unavailable: {error}"),
                        after: Duration::from_secs(1),
                    };
                }
            }
        }
        let started = Instant::now();
        match self.post(&entry, message, body.clone()).await {
            Answer::Delivered(status) => {
                self.log(job, message, status, started, "");
                WebhookStats::add(&service.stats.delivered, 1);
                self.succeeded(&entry).await;
                JobResult::Done {
                    detail: format!("HTTP {status}"),
                }
            }
            Answer::Gone => {
                let reason = "HTTP 410 Gone: the endpoint asked to stop".to_owned();
                self.log(job, message, 410, started, &reason);
                WebhookStats::add(&service.stats.failed_attempts, 1);
                service.disable(&entry.endpoint.id, reason.clone()).await;
                self.dead(job, message, &body, reason).await
            }
            Answer::Refused(reason) => {
                self.log(job, message, 0, started, &reason);
                WebhookStats::add(&service.stats.failed_attempts, 1);
                self.dead(job, message, &body, reason).await
            }
            Answer::Failed {
                status,
                reason,
                after,
            } => {
                self.log(job, message, status, started, &reason);
                WebhookStats::add(&service.stats.failed_attempts, 1);
                if self.failing(&entry).await {
                    let reason = format!("{reason}; the endpoint was disabled");
                    return self.dead(job, message, &body, reason).await;
                }
                if job.attempt >= service.settings.attempts {
                    let reason = format!("gave up after {} attempts: {reason}", job.attempt);
                    return self.dead(job, message, &body, reason).await;
                }
                JobResult::Retry { reason, after }
            }
        }
    }
}

/// Writes the attempt log in batches until every sender is gone. A store that fails loses
/// those entries (the log is for looking back; the queue's statuses stay exact).
pub async fn record_attempts(
    store: Arc<dyn WebhookStore>,
    mut log: mpsc::UnboundedReceiver<AttemptRecord>,
) {
    let mut batch = Vec::with_capacity(512);
    while log.recv_many(&mut batch, 512).await > 0 {
        if let Err(error) = store.record_attempts(std::mem::take(&mut batch)).await {
            tracing::warn!(%error, "writing the webhook attempt log failed");
        }
    }
}
