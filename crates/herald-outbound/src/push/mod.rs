//! Push notifications: from one `send_push_notification` to one durable job per device, and
//! from each job to its provider.
//!
//! Owns: [`PushService`] (accept, cancel, report, query), the two job kinds it puts on the
//! outbound queue — `push.fanout` (one per request: expands the recipient into deliveries,
//! at `send_at`) and `push.<provider>` (one per device or raw token) — their handlers, and
//! [`PushStats`]. Accepting a push is one durable enqueue; everything after runs in the
//! queue's workers, on whichever node claims the job. A small explicit request (a few device
//! ids or raw tokens, due now, no limits) is expanded in that enqueue instead of by a
//! `push.fanout` job ([`SendPush::expands_when_accepted`]).
//!
//! May touch: the [`OutboundQueue`] and [`DeviceStore`] it is given, and the senders.

pub mod batch;
pub mod deliver;
pub mod fanout;
pub mod limits;
pub mod request;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use herald_core::device::{DeviceStore, Page, PageRequest, Provider};
use herald_core::outbound::{JobState, JobStatus, NewJob, OutboundQueue, QueueError, StatusFilter};
use herald_core::time::now_ms;
use serde::{Deserialize, Serialize};

use crate::sender::Target;
use crate::worker::Wakeup;
pub use request::SendPush;

/// The job kind that expands a request into deliveries.
pub const FANOUT_KIND: &str = "push.fanout";

/// The job kind of one delivery through `provider`.
pub fn delivery_kind(provider: Provider) -> &'static str {
    match provider {
        Provider::Fcm => "push.fcm",
        Provider::Apns => "push.apns",
        Provider::Webpush => "push.webpush",
        Provider::Email => "push.email",
    }
}

/// What a delivery job carries: where it goes and the provider's part of the notification.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Delivery {
    pub target: Target,
    /// The registered device, when it came from the registry (raw tokens have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The provider's part as JSON text: encoded once per expansion and copied into each
    /// delivery, decoded once by the sender.
    pub notification: Box<serde_json::value::RawValue>,
}

/// Why a push call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// Counters the server exports as metrics.
#[derive(Debug, Default)]
pub struct PushStats {
    pub accepted: AtomicU64,
    /// Per provider (index of [`Provider::ALL`]).
    pub sent: [AtomicU64; 4],
    pub failed: [AtomicU64; 4],
    pub retried: [AtomicU64; 4],
    pub removed_devices: [AtomicU64; 4],
}

impl PushStats {
    pub fn count(counters: &[AtomicU64; 4], provider: Provider) {
        let index = Provider::ALL
            .iter()
            .position(|p| *p == provider)
            .unwrap_or(0);
        counters[index].fetch_add(1, Ordering::Relaxed);
    }
}

/// Accepts pushes and answers questions about them. Cheap to clone.
#[derive(Clone)]
pub struct PushService {
    queue: Arc<dyn OutboundQueue>,
    devices: Arc<dyn DeviceStore>,
    wakeup: Arc<Wakeup>,
    stats: Arc<PushStats>,
    /// Deliveries per batch when a push is expanded as it is accepted.
    batch_size: usize,
}

impl std::fmt::Debug for PushService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushService").finish_non_exhaustive()
    }
}

impl PushService {
    pub fn new(
        queue: Arc<dyn OutboundQueue>,
        devices: Arc<dyn DeviceStore>,
        wakeup: Arc<Wakeup>,
        stats: Arc<PushStats>,
    ) -> Self {
        Self {
            queue,
            devices,
            wakeup,
            stats,
            batch_size: 1,
        }
    }

    /// Deliveries per `push.<provider>.batch` job for the pushes this service expands when
    /// accepting them (default 1: no batches); the fan-out handler has its own setting.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    pub fn queue(&self) -> &Arc<dyn OutboundQueue> {
        &self.queue
    }

    pub fn devices(&self) -> &Arc<dyn DeviceStore> {
        &self.devices
    }

    pub fn stats(&self) -> &Arc<PushStats> {
        &self.stats
    }

    /// Accepts a push: validates it and stores it durably as one fan-out job (a repeated
    /// `uid` is accepted again and sends nothing twice). Returns the uid.
    pub async fn send(&self, request: SendPush) -> Result<String, PushError> {
        let not_before = request.send_at.map(|s| s.saturating_mul(1000));
        self.send_after(request, not_before).await
    }

    /// [`PushService::send`], not before `not_before` (ms; `None`: now) — for pushes that wait
    /// for something to not happen, such as an acknowledgement.
    pub async fn send_after(
        &self,
        mut request: SendPush,
        not_before: Option<u64>,
    ) -> Result<String, PushError> {
        let uid = request.validate().map_err(PushError::Invalid)?;
        request.uid = Some(uid.clone());
        request.analytics_uid = None;
        let now = now_ms();
        let not_before = not_before.unwrap_or(now);
        let expire_at = request
            .notification
            .expire_at
            .map(|s| s.saturating_mul(1000));
        if expire_at.is_some_and(|expire| expire <= now) {
            return Err(PushError::Invalid(
                "notification.expire_at is in the past".into(),
            ));
        }
        if not_before <= now && request.expands_when_accepted() {
            // Delivery ids are `<uid>:<device>`, so a repeated uid adds nothing here either.
            fanout::expand(
                self.queue.as_ref(),
                self.devices.as_ref(),
                &self.wakeup,
                &request,
                &uid,
                expire_at,
                self.batch_size,
            )
            .await
            .map_err(|reason| PushError::Queue(QueueError::Unavailable(reason)))?;
            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
            return Ok(uid);
        }
        let payload =
            serde_json::to_vec(&request).map_err(|e| PushError::Invalid(e.to_string()))?;
        let job = NewJob {
            id: format!("fanout:{uid}"),
            kind: FANOUT_KIND.to_string(),
            group: uid.clone(),
            recipient: String::new(),
            payload: Bytes::from(payload),
            not_before,
            expire_at,
            order_key: None,
        };
        self.queue.enqueue(vec![job]).await?;
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        self.wakeup.wake();
        Ok(uid)
    }

    /// Cancels what of push `uid` has not been sent yet; returns how many jobs.
    pub async fn cancel(&self, uid: &str) -> Result<u64, PushError> {
        if uid.is_empty() {
            return Err(PushError::Invalid("uid is required".into()));
        }
        Ok(self.queue.cancel(uid, now_ms()).await?)
    }

    /// The app's report that push `uid` reached (`delivered`) or was opened (`interacted`)
    /// on `device`. Returns whether such a delivery exists.
    pub async fn report(&self, uid: &str, device: &str, status: &str) -> Result<bool, PushError> {
        let state = match status {
            "delivered" => JobState::Delivered,
            "interacted" => JobState::Interacted,
            other => {
                return Err(PushError::Invalid(format!(
                    "status {other:?}: expected delivered or interacted"
                )));
            }
        };
        if uid.is_empty() || device.is_empty() {
            return Err(PushError::Invalid("uid and device_id are required".into()));
        }
        Ok(self.queue.report(uid, device, state, now_ms()).await?)
    }

    /// Per-recipient states of pushes (by `uid`, by device, by state).
    pub async fn statuses(
        &self,
        filter: &StatusFilter,
        page: &PageRequest,
    ) -> Result<Page<JobStatus>, PushError> {
        Ok(self.queue.statuses(filter, page).await?)
    }
}
