//! `[push]`: push notifications — whether they are on, how the outbound queue's workers run,
//! and the providers' credentials (each provider's section is its sender's own config type).

use herald_core::duration::HumanDuration;
use serde::{Deserialize, Serialize};

/// Jobs of one kind running at once on one node.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Concurrency {
    pub fcm: usize,
    pub apns: usize,
    pub webpush: usize,
    pub email: usize,
    /// Requests being expanded into deliveries at once.
    pub fanout: usize,
}

impl Default for Concurrency {
    fn default() -> Self {
        Self {
            fcm: 256,
            apns: 256,
            webpush: 64,
            email: 8,
            fanout: 64,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// The device registry, the push API methods and the queue's workers.
    pub enabled: bool,
    /// Attempts per delivery before it becomes a dead letter (`failed`).
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt (with jitter) up to `retry_max`.
    pub retry_base: HumanDuration,
    pub retry_max: HumanDuration,
    /// How long a claimed job belongs to the node that claimed it; a node that dies holding
    /// jobs gives them up after this (another node sends them).
    pub lease: HumanDuration,
    /// How often idle workers look for jobs other nodes queued or that became due.
    pub poll_interval: HumanDuration,
    /// Most jobs one worker claims at once.
    pub batch: usize,
    pub concurrency: Concurrency,
    /// How long finished deliveries (and their statuses) are kept.
    pub status_retention: HumanDuration,
    /// Devices not registered or updated for this long are removed (`inactive`); FCM's own
    /// cut-off is 270 days. `0s` keeps them forever.
    pub device_inactive_after: HumanDuration,
    /// How often retention and inactivity are applied.
    pub maintenance_interval: HumanDuration,
    /// APNs (token auth, a `.p8` key per app).
    pub apns: Option<herald_outbound::apns::ApnsConfig>,
    /// FCM HTTP v1 (a service account per app).
    pub fcm: Option<herald_outbound::fcm::FcmConfig>,
    /// Web Push (VAPID key sets per app).
    pub webpush: Option<herald_outbound::webpush::WebpushConfig>,
    /// Email over SMTP, the fallback for users without a device.
    pub email: Option<herald_outbound::email::EmailConfig>,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            max_attempts: 8,
            retry_base: HumanDuration::from_secs(1),
            retry_max: HumanDuration::from_secs(3600),
            lease: HumanDuration::from_secs(60),
            poll_interval: HumanDuration(std::time::Duration::from_millis(500)),
            batch: 256,
            concurrency: Concurrency::default(),
            status_retention: HumanDuration::from_secs(7 * 24 * 3600),
            device_inactive_after: HumanDuration::from_secs(270 * 24 * 3600),
            maintenance_interval: HumanDuration::from_secs(3600),
            apns: None,
            fcm: None,
            webpush: None,
            email: None,
        }
    }
}

impl PushConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        if self.max_attempts == 0 {
            return Err("push.max_attempts must be at least 1".into());
        }
        if self.batch == 0 {
            return Err("push.batch must be at least 1".into());
        }
        if self.lease.as_duration() < std::time::Duration::from_secs(5) {
            return Err("push.lease must be at least 5s (longer than one provider request)".into());
        }
        if self.poll_interval.as_duration().is_zero() {
            return Err("push.poll_interval must be above 0".into());
        }
        let c = &self.concurrency;
        if [c.fcm, c.apns, c.webpush, c.email, c.fanout].contains(&0) {
            return Err("push.concurrency values must be at least 1".into());
        }
        Ok(())
    }
}
