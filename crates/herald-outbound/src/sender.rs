//! The seam between the push pipeline and the providers: one [`Sender`] per provider, one
//! attempt per call, and a classified outcome the worker acts on (record it, retry it,
//! remove the device, give up).
//!
//! Owns: the per-provider notification payloads as the API accepts them (raw, in each
//! provider's own format), the [`Target`] of one attempt, and [`SendError`].
//!
//! May touch: nothing; the providers' modules implement the trait.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use herald_core::device::Provider;
use serde::{Deserialize, Serialize};

/// FCM: a v1 `Message` object without its target (`token`, `topic` or `condition` are set
/// by the sender from the [`Target`]). `android`, `apns` and `webpush` overrides pass through;
/// `data` values that are not strings are sent as their JSON text (FCM accepts strings only).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FcmNotification {
    pub message: serde_json::Value,
}

/// APNs: request headers (`apns-push-type`, `apns-priority`, `apns-expiration`,
/// `apns-collapse-id`, `apns-topic`, …) and the JSON payload (`{"aps": {...}, ...}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApnsNotification {
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub payload: serde_json::Value,
}

/// Web Push: headers (`ttl`, `urgency`, `topic`, case-insensitive) and the payload, encrypted
/// for the subscription (RFC 8291). A JSON value that is a string is sent as its text, any
/// other value as its JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WebpushNotification {
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub payload: serde_json::Value,
}

/// Email: a plain-text body, optionally an HTML alternative.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmailNotification {
    pub subject: String,
    #[serde(default)]
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
}

/// Where one attempt goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub provider: Provider,
    /// The app whose credentials sign the request (empty: the default app).
    #[serde(default)]
    pub app: String,
    pub to: Destination,
}

/// The provider-side address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Destination {
    /// A device token (FCM, APNs), a `PushSubscription` JSON (Web Push), an email address.
    Token(String),
    /// An FCM topic.
    FcmTopic(String),
    /// An FCM condition (`'a' in topics && 'b' in topics`).
    FcmCondition(String),
}

/// What the provider accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    /// The provider's id for the message (FCM `name`, `apns-id`, Web Push `Location`), if any.
    pub message_id: String,
}

/// Why an attempt did not succeed, classified the way every provider's documentation asks
/// senders to react.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The token is dead: remove the device (FCM `UNREGISTERED`, `SENDER_ID_MISMATCH`; APNs
    /// 410, `BadDeviceToken`, `DeviceTokenNotForTopic`; Web Push 404/410). APNs says since
    /// when (`since`, ms): a device re-registered after that keeps its token.
    #[error("token no longer valid: {reason}")]
    Unregistered { reason: String, since: Option<u64> },
    /// Worth retrying (429, 5xx, timeouts, connection errors), not before `after` when the
    /// provider said so (`Retry-After`).
    #[error("temporary failure: {reason}")]
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// This message will never be accepted (other 4xx: bad payload, too big, bad topic):
    /// do not retry, keep the device.
    #[error("rejected: {reason}")]
    Rejected { reason: String },
    /// The server has no credentials for the target's provider or app.
    #[error("not configured: {reason}")]
    NotConfigured { reason: String },
}

/// One provider's client. `send` makes exactly one attempt (the worker retries), reuses
/// connections, and must be cheap to call concurrently.
#[async_trait]
pub trait Sender: Send + Sync + 'static {
    type Notification: Send + Sync;

    async fn send(
        &self,
        target: &Target,
        notification: &Self::Notification,
    ) -> Result<Sent, SendError>;
}
