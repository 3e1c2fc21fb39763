//! The APNs sender: Apple's HTTP/2 provider API with token (JWT) authentication.
//!
//! One `reqwest` client (HTTP/2 only: prior knowledge on `http://` test URLs, ALPN `h2` on
//! the real `https://` endpoints) carries every app's requests, multiplexed on one connection
//! per host. Each attempt is one `POST {base}/3/device/{token}`; what can be known to fail
//! (payload over Apple's size limit, a collapse id over 64 bytes, a background push at
//! priority 10, an unknown header) is refused before anything is sent. Answers are classified
//! as Apple's documentation asks (see [`classify`]).
//!
//! Owns: the apps' keys and provider tokens ([`token`]) and the HTTP client. May touch: the
//! network (the configured APNs hosts), the key files named in the config (read once, at
//! construction), the [`Clock`].

mod token;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_core::device::Provider;
use herald_core::duration::HumanDuration;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::clock::{Clock, SystemClock};
use crate::push_http;
use crate::sender::{ApnsNotification, Destination, SendError, Sender, Sent, Target};

use token::ProviderToken;

pub use token::REFRESH_AFTER;

/// Apple's payload limit for every push type but VoIP.
pub const MAX_PAYLOAD: usize = 4096;
/// Apple's payload limit for VoIP pushes.
pub const MAX_VOIP_PAYLOAD: usize = 5120;
/// Apple's limit on `apns-collapse-id`.
pub const MAX_COLLAPSE_ID: usize = 64;

const PRODUCTION_URL: &str = "https://api.push.apple.com";
const SANDBOX_URL: &str = "https://api.sandbox.push.apple.com";

/// The topic suffix each push type needs after the bundle id (used when the notification
/// does not name its topic and the app's `topic` is the bare bundle id).
const TOPIC_SUFFIXES: &[(&str, &str)] = &[
    ("voip", ".voip"),
    ("complication", ".complication"),
    ("fileprovider", ".pushkit.fileprovider"),
    ("location", ".location-query"),
    ("liveactivity", ".push-type.liveactivity"),
    ("pushtotalk", ".voip-ptt"),
    ("widgets", ".push-type.widgets"),
    ("controls", ".push-type.controls"),
];

/// Which APNs service an app's tokens belong to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApnsEnvironment {
    #[default]
    Production,
    Sandbox,
}

/// `[push.apns]`: the apps Herald sends to through APNs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsConfig {
    #[serde(default)]
    pub apps: Vec<ApnsAppConfig>,
}

/// One app's APNs credentials (a token-auth key from the Apple developer account).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsAppConfig {
    /// The name [`Target::app`] selects it by; empty: the default app.
    #[serde(default)]
    pub app: String,
    /// Path of the `.p8` key file (PKCS#8 PEM). Exactly one of `key_file`, `key_pem`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The `.p8` contents inline.
    #[serde(default)]
    pub key_pem: Option<String>,
    pub key_id: String,
    pub team_id: String,
    /// The bundle id: the `apns-topic` of notifications that do not set one.
    pub topic: String,
    #[serde(default)]
    pub environment: ApnsEnvironment,
    /// Overrides the environment's URL (tests, proxies).
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default = "default_timeout")]
    pub request_timeout: HumanDuration,
}

fn default_timeout() -> HumanDuration {
    HumanDuration::from_secs(10)
}

impl fmt::Debug for ApnsAppConfig {
    /// Without the key itself.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApnsAppConfig")
            .field("app", &self.app)
            .field("key_file", &self.key_file)
            .field("key_pem", &self.key_pem.as_ref().map(|_| "<redacted>"))
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .field("topic", &self.topic)
            .field("environment", &self.environment)
            .field("base_url", &self.base_url)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// Why an [`ApnsSender`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ApnsConfigError {
    #[error("apns app {app:?}: {reason}")]
    App { app: String, reason: String },
    #[error("apns: app {0:?} is configured twice")]
    DuplicateApp(String),
    #[error("apns: HTTP client: {0}")]
    Client(String),
}

struct App {
    topic: String,
    base_url: String,
    timeout: Duration,
    token: ProviderToken,
}

/// Sends [`ApnsNotification`]s; cheap to share (`Arc`) and to call concurrently.
pub struct ApnsSender {
    client: reqwest::Client,
    apps: HashMap<String, App>,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for ApnsSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApnsSender")
            .field("apps", &self.apps.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl ApnsSender {
    /// Reads the keys and signs a first provider token per app: a bad key fails here.
    pub fn new(config: &ApnsConfig) -> Result<Self, ApnsConfigError> {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// As [`ApnsSender::new`], with the clock tokens are dated by.
    pub fn with_clock(config: &ApnsConfig, clock: Arc<dyn Clock>) -> Result<Self, ApnsConfigError> {
        let mut apps = HashMap::new();
        for app in &config.apps {
            let built = build_app(app, clock.as_ref()).map_err(|reason| ApnsConfigError::App {
                app: app.app.clone(),
                reason,
            })?;
            if apps.insert(app.app.clone(), built).is_some() {
                return Err(ApnsConfigError::DuplicateApp(app.app.clone()));
            }
        }
        let client = reqwest::Client::builder()
            // APNs speaks HTTP/2 only: h2c on http:// (the emulator), ALPN h2 on https://.
            .http2_prior_knowledge()
            .http2_keep_alive_interval(Some(Duration::from_secs(60)))
            .http2_keep_alive_timeout(Duration::from_secs(20))
            .http2_keep_alive_while_idle(true)
            .build()
            .map_err(|e| ApnsConfigError::Client(e.to_string()))?;
        Ok(Self {
            client,
            apps,
            clock,
        })
    }

    /// Provider tokens signed so far for `app` (start-up included); `None` for an unknown
    /// app. For metrics and tests.
    pub fn signatures(&self, app: &str) -> Option<u64> {
        self.apps.get(app).map(|a| a.token.signatures())
    }
}

fn build_app(config: &ApnsAppConfig, clock: &dyn Clock) -> Result<App, String> {
    let pem = match (&config.key_file, &config.key_pem) {
        (Some(path), None) => std::fs::read_to_string(path)
            .map_err(|e| format!("key_file {}: {e}", path.display()))?,
        (None, Some(pem)) => pem.clone(),
        _ => return Err("set exactly one of key_file and key_pem".to_owned()),
    };
    if config.key_id.is_empty() || config.team_id.is_empty() || config.topic.is_empty() {
        return Err("key_id, team_id and topic must not be empty".to_owned());
    }
    let base_url = match &config.base_url {
        Some(url) => push_http::base_url(url)?,
        None => match config.environment {
            ApnsEnvironment::Production => PRODUCTION_URL.to_owned(),
            ApnsEnvironment::Sandbox => SANDBOX_URL.to_owned(),
        },
    };
    let token = ProviderToken::new(&pem, &config.key_id, &config.team_id, clock)?;
    Ok(App {
        topic: config.topic.clone(),
        base_url,
        timeout: config.request_timeout.as_duration(),
        token,
    })
}

fn rejected(reason: impl Into<String>) -> SendError {
    SendError::Rejected {
        reason: reason.into(),
    }
}

/// The push type Apple should be told: the notification's, else `background` for a payload
/// whose `aps` holds only `content-available`, else `alert`.
fn push_type(headers: &BTreeMap<String, String>, payload: &serde_json::Value) -> String {
    if let Some(push_type) = headers.get("apns-push-type") {
        return push_type.clone();
    }
    let silent = payload
        .get("aps")
        .and_then(|aps| aps.as_object())
        .is_some_and(|aps| aps.len() == 1 && aps.contains_key("content-available"));
    if silent { "background" } else { "alert" }.to_owned()
}

/// The request headers of one notification, checked before sending.
fn request_headers(
    app: &App,
    notification: &ApnsNotification,
    payload_len: usize,
) -> Result<HeaderMap, SendError> {
    let mut given = BTreeMap::new();
    for (name, value) in &notification.headers {
        // Only `apns-*` headers (Apple adds new ones now and then), so no notification can
        // set `authorization` or anything else of the transport's.
        let name = name.to_ascii_lowercase();
        if !name.starts_with("apns-") {
            return Err(rejected(format!("header {name:?} is not an APNs header")));
        }
        if given.insert(name.clone(), value.clone()).is_some() {
            return Err(rejected(format!("DuplicateHeaders: {name}")));
        }
    }
    let push_type = push_type(&given, &notification.payload);
    let priority = match given.get("apns-priority") {
        Some(p) if push_type == "background" && p == "10" => {
            return Err(rejected(
                "BadPriority: a background push must have priority 5",
            ));
        }
        Some(p) => p.clone(),
        None if push_type == "background" => "5".to_owned(),
        None => "10".to_owned(),
    };
    let limit = if push_type == "voip" {
        MAX_VOIP_PAYLOAD
    } else {
        MAX_PAYLOAD
    };
    if payload_len > limit {
        return Err(rejected(format!(
            "PayloadTooLarge: {payload_len} bytes, the limit for {push_type} pushes is {limit}"
        )));
    }
    if given
        .get("apns-collapse-id")
        .is_some_and(|id| id.len() > MAX_COLLAPSE_ID)
    {
        return Err(rejected(format!(
            "BadCollapseId: apns-collapse-id is over {MAX_COLLAPSE_ID} bytes"
        )));
    }
    let topic = match given.get("apns-topic") {
        Some(topic) => topic.clone(),
        None => {
            let suffix = TOPIC_SUFFIXES
                .iter()
                .find(|(t, _)| *t == push_type)
                .map_or("", |(_, suffix)| suffix);
            if app.topic.ends_with(suffix) {
                app.topic.clone()
            } else {
                format!("{}{suffix}", app.topic)
            }
        }
    };
    given.insert("apns-push-type".to_owned(), push_type);
    given.insert("apns-priority".to_owned(), priority);
    given.insert("apns-topic".to_owned(), topic);

    let mut headers = HeaderMap::with_capacity(given.len() + 2);
    for (name, value) in given {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| rejected(format!("invalid header name {name:?}")))?;
        let value = HeaderValue::from_str(&value)
            .map_err(|_| rejected(format!("invalid value for header {name}")))?;
        headers.insert(header, value);
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(headers)
}

/// Apple's error body.
#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    timestamp: Option<u64>,
}

/// What an answer other than 200 means (Apple's "Handling notification responses from
/// APNs"): 410 — the token is gone since `timestamp`; 400 `BadDeviceToken` /
/// `DeviceTokenNotForTopic` — the token will never work for this app; 429 and 5xx — try
/// again, after `Retry-After` if given; any other 4xx — this notification is wrong.
/// (403 `ExpiredProviderToken` is handled by the caller: it re-signs.)
fn classify(status: StatusCode, body: &ErrorBody, after: Option<Duration>) -> SendError {
    let reason = if body.reason.is_empty() {
        status.to_string()
    } else {
        body.reason.clone()
    };
    match status.as_u16() {
        410 => SendError::Unregistered {
            reason,
            since: body.timestamp,
        },
        400 if matches!(
            body.reason.as_str(),
            "BadDeviceToken" | "DeviceTokenNotForTopic"
        ) =>
        {
            SendError::Unregistered {
                reason,
                since: None,
            }
        }
        429 | 500..=599 => SendError::Retry { reason, after },
        _ => SendError::Rejected {
            reason: format!("{} {reason}", status.as_u16()),
        },
    }
}

#[async_trait]
impl Sender for ApnsSender {
    type Notification = ApnsNotification;

    async fn send(
        &self,
        target: &Target,
        notification: &ApnsNotification,
    ) -> Result<Sent, SendError> {
        if target.provider != Provider::Apns {
            return Err(rejected(format!(
                "the APNs sender cannot send to {}",
                target.provider
            )));
        }
        let Some(app) = self.apps.get(&target.app) else {
            return Err(SendError::NotConfigured {
                reason: format!("no APNs credentials for app {:?}", target.app),
            });
        };
        let Destination::Token(device) = &target.to else {
            return Err(rejected("APNs sends to device tokens only"));
        };
        // APNs tokens are hexadecimal; anything else is what Apple answers BadDeviceToken
        // for, and could not be put in the URL path safely anyway.
        if device.is_empty() || !device.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(SendError::Unregistered {
                reason: "BadDeviceToken: not a hexadecimal device token".to_owned(),
                since: None,
            });
        }
        let payload = serde_json::to_vec(&notification.payload)
            .map_err(|e| rejected(format!("payload: {e}")))?;
        let mut headers = request_headers(app, notification, payload.len())?;
        let jwt = app
            .token
            .current(self.clock.as_ref())
            .map_err(|reason| SendError::NotConfigured { reason })?;
        let bearer = HeaderValue::from_str(&format!("bearer {jwt}"))
            .map_err(|_| rejected("provider token is not a valid header value"))?;
        headers.insert(AUTHORIZATION, bearer);

        let url = format!("{}/3/device/{device}", app.base_url);
        let response = self
            .client
            .post(url)
            .headers(headers)
            .timeout(app.timeout)
            .body(payload)
            .send()
            .await
            .map_err(|e| push_http::transport_error("apns", &e))?;
        let status = response.status();
        if status == StatusCode::OK {
            let message_id = response
                .headers()
                .get("apns-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            return Ok(Sent { message_id });
        }
        let after = push_http::retry_after(response.headers(), self.clock.now());
        let raw = push_http::error_body(response).await;
        let body: ErrorBody = serde_json::from_slice(&raw).unwrap_or_default();
        if status == StatusCode::FORBIDDEN && body.reason == "ExpiredProviderToken" {
            app.token
                .rejected(&jwt, self.clock.as_ref())
                .map_err(|reason| SendError::NotConfigured { reason })?;
            return Err(SendError::Retry {
                reason: "ExpiredProviderToken: re-signed the provider token".to_owned(),
                after: Some(Duration::ZERO),
            });
        }
        Err(classify(status, &body, after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_payload_is_background() {
        let silent = serde_json::json!({"aps": {"content-available": 1}, "x": 1});
        assert_eq!(push_type(&BTreeMap::new(), &silent), "background");
        let alert = serde_json::json!({"aps": {"content-available": 1, "alert": "hi"}});
        assert_eq!(push_type(&BTreeMap::new(), &alert), "alert");
        let typed = BTreeMap::from([("apns-push-type".to_owned(), "voip".to_owned())]);
        assert_eq!(push_type(&typed, &silent), "voip");
    }

    #[test]
    fn classification_follows_apple() {
        let body = |reason: &str, timestamp| ErrorBody {
            reason: reason.to_owned(),
            timestamp,
        };
        assert!(matches!(
            classify(StatusCode::GONE, &body("Unregistered", Some(7)), None),
            SendError::Unregistered { since: Some(7), .. }
        ));
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, &body("BadTopic", None), None),
            SendError::Rejected { .. }
        ));
        assert!(matches!(
            classify(StatusCode::BAD_GATEWAY, &body("", None), None),
            SendError::Retry { .. }
        ));
    }
}
