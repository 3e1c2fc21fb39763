//! The FCM sender: Firebase Cloud Messaging's HTTP v1 API, authorised by a service account.
//!
//! Each attempt is one `POST {base}/v1/projects/{project}/messages:send` carrying one
//! message (the v1 API has no batch call), over one shared `reqwest` client: HTTP/2
//! multiplexed (ALPN on `https://`; prior knowledge when every app's base URL is `http://`,
//! i.e. the emulator). The message is the notification's with its target set from the
//! [`Target`] and every non-string `data` value turned into its JSON text (FCM takes strings
//! only). Errors are classified from the `FcmError` code in the error's `details`, else from
//! the HTTP status (see [`classify`]).
//!
//! Owns: the apps' access tokens ([`oauth`]) and the HTTP client. May touch: the network
//! (FCM and the token endpoints), the credential files named in the config (read once, at
//! construction), the [`Clock`].

mod oauth;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_core::device::Provider;
use herald_core::duration::HumanDuration;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::clock::{Clock, SystemClock};
use crate::push_http;
use crate::sender::{Destination, FcmNotification, SendError, Sender, Sent, Target};

use oauth::{AccessTokens, ServiceAccountKey};

pub use oauth::SCOPE;

const DEFAULT_BASE_URL: &str = "https://fcm.googleapis.com";
const FCM_ERROR_TYPE: &str = "type.googleapis.com/google.firebase.fcm.v1.FcmError";

/// `[push.fcm]`: the Firebase projects Herald sends to.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmConfig {
    #[serde(default)]
    pub apps: Vec<FcmAppConfig>,
}

/// One app's FCM credentials: a service account key file of its Firebase project.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmAppConfig {
    /// The name [`Target::app`] selects it by; empty: the default app.
    #[serde(default)]
    pub app: String,
    /// Path of the service account JSON. Exactly one of `credentials_file`,
    /// `credentials_json`.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// The service account JSON inline.
    #[serde(default)]
    pub credentials_json: Option<String>,
    #[serde(default = "default_base_url")]
    pub base_url: String,
    #[serde(default = "default_timeout")]
    pub request_timeout: HumanDuration,
}

fn default_base_url() -> String {
    DEFAULT_BASE_URL.to_owned()
}

fn default_timeout() -> HumanDuration {
    HumanDuration::from_secs(10)
}

impl fmt::Debug for FcmAppConfig {
    /// Without the credentials themselves.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FcmAppConfig")
            .field("app", &self.app)
            .field("credentials_file", &self.credentials_file)
            .field(
                "credentials_json",
                &self.credentials_json.as_ref().map(|_| "<redacted>"),
            )
            .field("base_url", &self.base_url)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// Why an [`FcmSender`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FcmConfigError {
    #[error("fcm app {app:?}: {reason}")]
    App { app: String, reason: String },
    #[error("fcm: app {0:?} is configured twice")]
    DuplicateApp(String),
    #[error("fcm: HTTP client: {0}")]
    Client(String),
}

struct App {
    project_id: String,
    send_url: String,
    timeout: Duration,
    tokens: AccessTokens,
}

/// Sends [`FcmNotification`]s; cheap to share (`Arc`) and to call concurrently.
pub struct FcmSender {
    client: reqwest::Client,
    apps: HashMap<String, App>,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for FcmSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FcmSender")
            .field("apps", &self.apps.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl FcmSender {
    /// Reads the credentials and checks the keys sign: bad credentials fail here.
    pub fn new(config: &FcmConfig) -> Result<Self, FcmConfigError> {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// As [`FcmSender::new`], with the clock token lifetimes are measured by.
    pub fn with_clock(config: &FcmConfig, clock: Arc<dyn Clock>) -> Result<Self, FcmConfigError> {
        let mut apps = HashMap::new();
        let mut all_cleartext = !config.apps.is_empty();
        for app in &config.apps {
            let error = |reason| FcmConfigError::App {
                app: app.app.clone(),
                reason,
            };
            let built = build_app(app, clock.as_ref()).map_err(error)?;
            all_cleartext &= built.send_url.starts_with("http://");
            if apps.insert(app.app.clone(), built).is_some() {
                return Err(FcmConfigError::DuplicateApp(app.app.clone()));
            }
        }
        let mut builder = reqwest::Client::builder()
            .http2_keep_alive_interval(Some(Duration::from_secs(60)))
            .http2_keep_alive_timeout(Duration::from_secs(20))
            .http2_keep_alive_while_idle(true);
        if all_cleartext {
            // Cleartext has no ALPN to negotiate HTTP/2 with: say it up front (h2c).
            builder = builder.http2_prior_knowledge();
        }
        let client = builder
            .build()
            .map_err(|e| FcmConfigError::Client(e.to_string()))?;
        Ok(Self {
            client,
            apps,
            clock,
        })
    }

    /// Requests made to `app`'s token endpoint so far; `None` for an unknown app.
    pub fn token_fetches(&self, app: &str) -> Option<u64> {
        self.apps.get(app).map(|a| a.tokens.fetches())
    }

    /// The Firebase project `app` sends to.
    pub fn project_id(&self, app: &str) -> Option<&str> {
        self.apps.get(app).map(|a| a.project_id.as_str())
    }
}

fn build_app(config: &FcmAppConfig, clock: &dyn Clock) -> Result<App, String> {
    let json = match (&config.credentials_file, &config.credentials_json) {
        (Some(path), None) => std::fs::read_to_string(path)
            .map_err(|e| format!("credentials_file {}: {e}", path.display()))?,
        (None, Some(json)) => json.clone(),
        _ => return Err("set exactly one of credentials_file and credentials_json".to_owned()),
    };
    let account: ServiceAccountKey =
        serde_json::from_str(&json).map_err(|e| format!("not a service account key file: {e}"))?;
    if account.project_id.is_empty() || account.project_id.contains('/') {
        return Err(format!("invalid project_id {:?}", account.project_id));
    }
    let base = push_http::base_url(&config.base_url)?;
    let timeout = config.request_timeout.as_duration();
    let tokens = AccessTokens::new(&account, timeout, clock)?;
    Ok(App {
        send_url: format!("{base}/v1/projects/{}/messages:send", account.project_id),
        project_id: account.project_id,
        timeout,
        tokens,
    })
}

fn rejected(reason: impl Into<String>) -> SendError {
    SendError::Rejected {
        reason: reason.into(),
    }
}

/// The request body: the notification's message with the target set and `data` values
/// turned into strings.
fn request_body(notification: &FcmNotification, to: &Destination) -> Result<Value, SendError> {
    let Value::Object(message) = &notification.message else {
        return Err(rejected("an FCM message must be a JSON object"));
    };
    let mut message: Map<String, Value> = message.clone();
    // The target comes from the Target alone: a stray one in the message would make two.
    for field in ["token", "topic", "condition"] {
        message.remove(field);
    }
    let (field, value) = match to {
        Destination::Token(token) => ("token", token),
        Destination::FcmTopic(topic) => ("topic", topic),
        Destination::FcmCondition(condition) => ("condition", condition),
    };
    message.insert(field.to_owned(), Value::String(value.clone()));
    if let Some(data) = message.get_mut("data") {
        let Value::Object(data) = data else {
            return Err(rejected("FCM message data must be an object"));
        };
        for value in data.values_mut() {
            if !value.is_string() {
                *value = Value::String(value.to_string());
            }
        }
    }
    Ok(serde_json::json!({ "message": message }))
}

#[derive(Deserialize, Default)]
struct ErrorEnvelope {
    #[serde(default)]
    error: ErrorStatus,
}

#[derive(Deserialize, Default)]
struct ErrorStatus {
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    details: Vec<Value>,
}

impl ErrorStatus {
    /// The `errorCode` of the `FcmError` detail, if FCM sent one.
    fn fcm_code(&self) -> Option<&str> {
        self.details
            .iter()
            .find(|d| d.get("@type").and_then(Value::as_str) == Some(FCM_ERROR_TYPE))
            .and_then(|d| d.get("errorCode"))
            .and_then(Value::as_str)
    }
}

/// What an error answer means, per FCM's v1 error codes: `UNREGISTERED` and
/// `SENDER_ID_MISMATCH` — the token is dead for this project; `QUOTA_EXCEEDED`,
/// `UNAVAILABLE`, `INTERNAL` — retry, after `Retry-After` if given; `INVALID_ARGUMENT` (even
/// about the token: FCM says so for a malformed message too) and `THIRD_PARTY_AUTH_ERROR` —
/// rejected, the device is kept. Without a code, the HTTP status decides (401 is handled by
/// the caller, which refreshes the token).
fn classify(status: StatusCode, error: &ErrorStatus, after: Option<Duration>) -> SendError {
    let code = error.fcm_code().unwrap_or(error.status.as_str());
    let reason = if error.message.is_empty() {
        format!("{} {code}", status.as_u16())
    } else {
        format!("{} {code}: {}", status.as_u16(), error.message)
    };
    match code {
        "UNREGISTERED" | "SENDER_ID_MISMATCH" => SendError::Unregistered {
            reason,
            since: None,
        },
        "QUOTA_EXCEEDED" | "UNAVAILABLE" | "INTERNAL" => SendError::Retry { reason, after },
        "INVALID_ARGUMENT" | "THIRD_PARTY_AUTH_ERROR" => SendError::Rejected { reason },
        _ if status.as_u16() == 429 || status.is_server_error() => {
            SendError::Retry { reason, after }
        }
        _ => SendError::Rejected { reason },
    }
}

#[async_trait]
impl Sender for FcmSender {
    type Notification = FcmNotification;

    async fn send(
        &self,
        target: &Target,
        notification: &FcmNotification,
    ) -> Result<Sent, SendError> {
        if target.provider != Provider::Fcm {
            return Err(rejected(format!(
                "the FCM sender cannot send to {}",
                target.provider
            )));
        }
        let Some(app) = self.apps.get(&target.app) else {
            return Err(SendError::NotConfigured {
                reason: format!("no FCM credentials for app {:?}", target.app),
            });
        };
        let body = request_body(notification, &target.to)?;
        let token = app.tokens.get(&self.client, self.clock.as_ref()).await?;
        let response = self
            .client
            .post(&app.send_url)
            .bearer_auth(&token)
            .timeout(app.timeout)
            .json(&body)
            .send()
            .await
            .map_err(|e| push_http::transport_error("fcm", &e))?;
        let status = response.status();
        if status.is_success() {
            #[derive(Deserialize)]
            struct Name {
                name: String,
            }
            // The message was accepted; an unreadable body does not change that.
            let message_id = response
                .json::<Name>()
                .await
                .map(|n| n.name)
                .unwrap_or_default();
            return Ok(Sent { message_id });
        }
        let after = push_http::retry_after(response.headers(), self.clock.now());
        let raw = push_http::error_body(response).await;
        let envelope: ErrorEnvelope = serde_json::from_slice(&raw).unwrap_or_default();
        let error = envelope.error;
        if status == StatusCode::UNAUTHORIZED && error.fcm_code().is_none() {
            // Our access token was refused (revoked, expired early): fetch a new one.
            app.tokens.rejected(&token);
            return Err(SendError::Retry {
                reason: format!("401 {}: access token refused, refreshed", error.status),
                after: Some(Duration::ZERO),
            });
        }
        Err(classify(status, &error, after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_values_become_strings_and_target_is_set() {
        let notification = FcmNotification {
            message: serde_json::json!({
                "data": {"n": 1, "s": "x", "o": {"a": [1]}, "b": true},
                "topic": "stray",
            }),
        };
        let body =
            request_body(&notification, &Destination::Token("t1".into())).expect("valid message");
        assert_eq!(
            body,
            serde_json::json!({"message": {
                "data": {"n": "1", "s": "x", "o": "{\"a\":[1]}", "b": "true"},
                "token": "t1",
            }})
        );
    }

    #[test]
    fn classification_uses_the_fcm_code_first() {
        let error = |status: &str, code: Option<&str>| ErrorStatus {
            message: String::new(),
            status: status.to_owned(),
            details: code
                .map(|c| vec![serde_json::json!({"@type": FCM_ERROR_TYPE, "errorCode": c})])
                .unwrap_or_default(),
        };
        assert!(matches!(
            classify(
                StatusCode::NOT_FOUND,
                &error("NOT_FOUND", Some("UNREGISTERED")),
                None
            ),
            SendError::Unregistered { .. }
        ));
        assert!(matches!(
            classify(StatusCode::NOT_FOUND, &error("NOT_FOUND", None), None),
            SendError::Rejected { .. }
        ));
        assert!(matches!(
            classify(StatusCode::BAD_GATEWAY, &error("", None), None),
            SendError::Retry { .. }
        ));
    }
}
