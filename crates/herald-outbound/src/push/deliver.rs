//! The `push.<provider>` jobs: one attempt to hand one notification to its provider, and what
//! follows from the answer — recorded, retried, or the device removed because its token is
//! dead (token hygiene, as each provider's documentation asks).
//!
//! Owns: [`DeliveryHandler`], [`AnySender`] (the object-safe face of a provider's
//! [`Sender`] that takes the notification as the job stored it) and [`PushEvents`], the
//! port through which failed deliveries and removed devices are told (webhooks).
//!
//! May touch: the device registry (removing dead tokens), the sender and the events port.

use std::sync::Arc;

use async_trait::async_trait;
use herald_core::device::{DeviceStore, Provider};
use herald_core::outbound::Job;
use herald_core::time::now_ms;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use super::{Delivery, PushStats};
use crate::sender::{SendError, Sender, Sent, Target};
use crate::worker::{JobHandler, JobResult};

/// A [`Sender`] that takes its notification as the JSON text the job stored (decoded
/// straight into the provider's type: no intermediate `Value` tree per send).
#[async_trait]
pub trait AnySender: Send + Sync + 'static {
    async fn send_json(&self, target: &Target, notification: &RawValue) -> Result<Sent, SendError>;
}

#[async_trait]
impl<S> AnySender for S
where
    S: Sender,
    S::Notification: DeserializeOwned,
{
    async fn send_json(&self, target: &Target, notification: &RawValue) -> Result<Sent, SendError> {
        let notification =
            serde_json::from_str::<S::Notification>(notification.get()).map_err(|e| {
                SendError::Rejected {
                    reason: format!("malformed {} notification: {e}", target.provider),
                }
            })?;
        self.send(target, &notification).await
    }
}

/// A delivery that failed for good, or the device removed because of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushFailure {
    /// The push's uid (the job's group).
    pub uid: String,
    /// The registered device, when there was one.
    pub device: Option<String>,
    pub provider: Provider,
    pub app: String,
    pub reason: String,
    /// The device was removed from the registry (its token is dead).
    pub device_removed: bool,
}

/// Hears about failed deliveries and removed devices; awaited before the job's outcome is
/// recorded, so what it queues durably is not lost if the node dies after.
#[async_trait]
pub trait PushEvents: Send + Sync + 'static {
    async fn push_failed(&self, failure: PushFailure);
}

/// Delivers one provider's jobs.
pub struct DeliveryHandler {
    pub provider: Provider,
    pub sender: Option<Arc<dyn AnySender>>,
    pub devices: Arc<dyn DeviceStore>,
    pub stats: Arc<PushStats>,
    /// Told of failures (webhooks), when anyone listens.
    pub events: Option<Arc<dyn PushEvents>>,
    /// The provider's sends in flight, shared with its batches (`None`: only the worker's
    /// concurrency bounds them).
    pub slots: Option<Arc<tokio::sync::Semaphore>>,
}

#[async_trait]
impl JobHandler for DeliveryHandler {
    async fn run(&self, job: &Job) -> JobResult {
        let delivery: Delivery = match serde_json::from_slice(&job.payload) {
            Ok(delivery) => delivery,
            Err(error) => {
                return JobResult::Failed {
                    reason: format!("unreadable delivery: {error}"),
                };
            }
        };
        let _slot = self.slot().await;
        self.deliver(
            &job.group,
            &delivery.target,
            delivery.device.as_deref(),
            &delivery.notification,
        )
        .await
    }
}

impl DeliveryHandler {
    /// One of the provider's sends in flight (`None` when no slots are shared); a batch keeps
    /// it until its member's answer is recorded.
    pub async fn slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        match &self.slots {
            Some(slots) => slots.clone().acquire_owned().await.ok(),
            None => None,
        }
    }

    /// One attempt to hand `notification` (of push `uid`) to `target`, and what follows
    /// from the answer; failures are told to [`PushEvents`] before this returns. Takes no
    /// send slot: the caller holds one ([`DeliveryHandler::slot`]). The
    /// `push.<provider>` jobs and the members of `push.<provider>.batch` jobs both come here.
    pub async fn deliver(
        &self,
        uid: &str,
        target: &Target,
        device: Option<&str>,
        notification: &RawValue,
    ) -> JobResult {
        let result = self.send(target, device, notification).await;
        if let (Some(events), JobResult::Failed { reason }) = (&self.events, &result) {
            events
                .push_failed(PushFailure {
                    uid: uid.to_owned(),
                    device: device.map(str::to_owned),
                    provider: self.provider,
                    app: target.app.clone(),
                    reason: reason.clone(),
                    device_removed: reason.ends_with("; device removed"),
                })
                .await;
        }
        result
    }

    async fn send(
        &self,
        target: &Target,
        device: Option<&str>,
        notification: &RawValue,
    ) -> JobResult {
        let Some(sender) = &self.sender else {
            PushStats::count(&self.stats.failed, self.provider);
            return JobResult::Failed {
                reason: format!("no {} credentials are configured", self.provider),
            };
        };
        match sender.send_json(target, notification).await {
            Ok(sent) => {
                PushStats::count(&self.stats.sent, self.provider);
                JobResult::Done {
                    detail: sent.message_id,
                }
            }
            Err(SendError::Retry { reason, after }) => {
                PushStats::count(&self.stats.retried, self.provider);
                JobResult::Retry { reason, after }
            }
            Err(SendError::Unregistered { reason, since }) => {
                PushStats::count(&self.stats.failed, self.provider);
                let reason = self.forget(target, device, &reason, since).await;
                JobResult::Failed { reason }
            }
            Err(SendError::Rejected { reason } | SendError::NotConfigured { reason }) => {
                PushStats::count(&self.stats.failed, self.provider);
                JobResult::Failed { reason }
            }
        }
    }

    /// Removes the registered device whose token the provider declared dead (unless it
    /// re-registered after `since`); returns the reason to record.
    async fn forget(
        &self,
        target: &Target,
        device: Option<&str>,
        reason: &str,
        since: Option<u64>,
    ) -> String {
        let (Some(_), crate::sender::Destination::Token(token)) = (device, &target.to) else {
            return format!("unregistered: {reason}");
        };
        match self
            .devices
            .remove_token(self.provider, token, reason, since, now_ms())
            .await
        {
            Ok(Some(_)) => {
                PushStats::count(&self.stats.removed_devices, self.provider);
                format!("unregistered: {reason}; device removed")
            }
            Ok(None) => format!("unregistered: {reason}; device kept (re-registered since)"),
            Err(error) => {
                tracing::warn!(%error, provider = %self.provider, "removing a dead token failed");
                format!("unregistered: {reason}; removing the device failed: {error}")
            }
        }
    }
}
