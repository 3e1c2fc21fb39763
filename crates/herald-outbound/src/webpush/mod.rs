//! The Web Push sender: one encrypted, VAPID-signed `POST` to the endpoint of a browser's
//! `PushSubscription` (RFC 8030 delivery, RFC 8291 message encryption, RFC 8292 VAPID).
//!
//! UnifiedPush endpoints take this same path: a UnifiedPush distributor exposes a Web Push
//! endpoint (with the same `p256dh`/`auth` keys and VAPID), so a UnifiedPush device is stored
//! as a `PushSubscription` and sent to exactly like a browser.
//!
//! Owns: [`WebpushConfig`], [`WebpushSender`] (one HTTP client for all apps, one VAPID signer
//! per app), and the mapping from push-service responses to [`SendError`].
//!
//! May touch: the network, only towards endpoints that pass the endpoint rules: https, no
//! redirects, no proxy, and — unless `allow_private_endpoints` — only public addresses, checked
//! on the addresses the connection actually uses ([`crate::egress`]).

mod message;
mod vapid;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use herald_core::device::Provider;
use herald_core::duration::HumanDuration;
use herald_core::error::error_chain;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, LOCATION, RETRY_AFTER};
use serde::{Deserialize, Serialize};

pub use self::message::{DEFAULT_TTL, MAX_PAYLOAD, PushHeaders, Subscription, Urgency};
pub use self::vapid::{
    JWT_VALIDITY, RESIGN_MARGIN, VapidKey, VapidKeyError, VapidSigner, generate_vapid_keys,
};
use crate::egress::{PublicOnlyResolver, forbidden_in_chain};
use crate::sender::{Destination, SendError, Sender, Sent, Target, WebpushNotification};

/// How much of an error response body is kept for the `Rejected`/`Retry` reason.
const ERROR_BODY_LIMIT: usize = 1024;

fn default_request_timeout() -> HumanDuration {
    HumanDuration::from_secs(10)
}

/// `[push.webpush]`: the VAPID identities Herald sends Web Push (and UnifiedPush) with.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebpushConfig {
    /// One entry per application server identity; `app = ""` is the default app.
    #[serde(default)]
    pub apps: Vec<WebpushAppConfig>,
    /// Lets endpoints be plain http and on private, loopback or link-local addresses. Off by
    /// default: a subscription's endpoint comes from a client, and following it into the
    /// operator's network would be a server-side request forgery hole. Turn it on for tests
    /// or a push service on your own network only.
    #[serde(default)]
    pub allow_private_endpoints: bool,
}

/// One application server identity.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebpushAppConfig {
    /// The app name devices are registered under (empty: the default app).
    #[serde(default)]
    pub app: String,
    /// The VAPID private key: base64url of the raw 32-byte P-256 scalar, as
    /// `web-push generate-vapid-keys` and `herald genconfig` print it (or a PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vapid_private_key: Option<String>,
    /// Or a file holding that key (base64url or PEM `EC PRIVATE KEY` / `PRIVATE KEY`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vapid_key_file: Option<PathBuf>,
    /// The contact RFC 8292 requires: `mailto:…` or `https://…`.
    pub subject: String,
    /// Bound on one attempt (connect, send, response).
    #[serde(default = "default_request_timeout")]
    pub request_timeout: HumanDuration,
}

impl std::fmt::Debug for WebpushAppConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebpushAppConfig")
            .field("app", &self.app)
            .field(
                "vapid_private_key",
                &self.vapid_private_key.as_ref().map(|_| "<redacted>"),
            )
            .field("vapid_key_file", &self.vapid_key_file)
            .field("subject", &self.subject)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// A configuration that cannot be used, found when the sender is built.
#[derive(Debug, thiserror::Error)]
pub enum WebpushConfigError {
    #[error("webpush app {0:?} is configured twice")]
    DuplicateApp(String),
    #[error("webpush app {0:?}: set exactly one of vapid_private_key and vapid_key_file")]
    KeySource(String),
    #[error("webpush app {app:?}: cannot read vapid_key_file {path}: {source}")]
    KeyFile {
        app: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("webpush app {app:?}: {source}")]
    Key { app: String, source: VapidKeyError },
    #[error("webpush app {app:?}: {reason}")]
    Subject { app: String, reason: String },
    #[error("webpush app {app:?}: request_timeout must be more than zero")]
    Timeout { app: String },
    #[error("webpush HTTP client: {0}")]
    Client(String),
}

struct App {
    signer: VapidSigner,
    timeout: Duration,
}

/// Sends Web Push messages. Cheap to share (`Arc`) and to call concurrently: one connection
/// pool for every endpoint, VAPID JWTs cached per app and push-service origin.
pub struct WebpushSender {
    client: reqwest::Client,
    apps: HashMap<String, App>,
    allow_private: bool,
}

impl std::fmt::Debug for WebpushSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebpushSender")
            .field("apps", &self.apps.keys().collect::<Vec<_>>())
            .field("allow_private", &self.allow_private)
            .finish_non_exhaustive()
    }
}

impl WebpushSender {
    /// Builds the sender, reading key files and checking every app; any problem is an error
    /// (no app is silently left out).
    pub fn new(config: &WebpushConfig) -> Result<Self, WebpushConfigError> {
        let mut apps = HashMap::new();
        for app in &config.apps {
            if apps.contains_key(&app.app) {
                return Err(WebpushConfigError::DuplicateApp(app.app.clone()));
            }
            let key_text = match (&app.vapid_private_key, &app.vapid_key_file) {
                (Some(key), None) => key.clone(),
                (None, Some(path)) => {
                    std::fs::read_to_string(path).map_err(|source| WebpushConfigError::KeyFile {
                        app: app.app.clone(),
                        path: path.clone(),
                        source,
                    })?
                }
                _ => return Err(WebpushConfigError::KeySource(app.app.clone())),
            };
            let key = VapidKey::parse(&key_text).map_err(|source| WebpushConfigError::Key {
                app: app.app.clone(),
                source,
            })?;
            vapid::validate_subject(&app.subject).map_err(|reason| {
                WebpushConfigError::Subject {
                    app: app.app.clone(),
                    reason,
                }
            })?;
            if app.request_timeout.is_zero() {
                return Err(WebpushConfigError::Timeout {
                    app: app.app.clone(),
                });
            }
            apps.insert(
                app.app.clone(),
                App {
                    signer: VapidSigner::new(key, app.subject.clone()),
                    timeout: app.request_timeout.as_duration(),
                },
            );
        }

        let mut builder = reqwest::Client::builder()
            // A push service answers; it never redirects. Following one would let an endpoint
            // bounce us to an address the checks did not see.
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would connect for us, out of the resolver's sight.
            .no_proxy()
            .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(90));
        if !config.allow_private_endpoints {
            builder = builder
                .https_only(true)
                .dns_resolver(Arc::new(PublicOnlyResolver));
        }
        let client = builder
            .build()
            .map_err(|e| WebpushConfigError::Client(e.to_string()))?;
        Ok(Self {
            client,
            apps,
            allow_private: config.allow_private_endpoints,
        })
    }

    /// The public key (base64url) of an app, for the page's `applicationServerKey`.
    pub fn public_key(&self, app: &str) -> Option<&str> {
        self.apps
            .get(app)
            .map(|a| a.signer.key().public_key_base64url())
    }
}

fn rejected(reason: impl Into<String>) -> SendError {
    SendError::Rejected {
        reason: reason.into(),
    }
}

#[async_trait]
impl Sender for WebpushSender {
    type Notification = WebpushNotification;

    async fn send(
        &self,
        target: &Target,
        notification: &WebpushNotification,
    ) -> Result<Sent, SendError> {
        if target.provider != Provider::Webpush {
            return Err(rejected(format!(
                "the Web Push sender got a target for {}",
                target.provider.as_str()
            )));
        }
        let app = self
            .apps
            .get(&target.app)
            .ok_or_else(|| SendError::NotConfigured {
                reason: format!("no Web Push VAPID key for app {:?}", target.app),
            })?;
        let Destination::Token(token) = &target.to else {
            return Err(rejected("Web Push sends to a subscription token only"));
        };
        let subscription = Subscription::parse(token).map_err(rejected)?;
        message::check_endpoint(&subscription.endpoint, self.allow_private).map_err(rejected)?;
        let headers = PushHeaders::from_notification(notification).map_err(rejected)?;
        let payload = message::payload_bytes(notification).map_err(rejected)?;
        let body = web_push_native::encrypt(payload, &subscription.p256dh, &subscription.auth)
            .map_err(|e| rejected(format!("cannot encrypt the payload: {e}")))?;

        let origin = subscription.endpoint.origin().ascii_serialization();
        let authorization = app.signer.authorization(&origin, SystemTime::now());
        let mut request = self
            .client
            .post(subscription.endpoint.clone())
            .timeout(app.timeout)
            .header("TTL", headers.ttl)
            .header("Content-Encoding", "aes128gcm")
            .header("Content-Type", "application/octet-stream")
            .header("Authorization", authorization);
        if let Some(urgency) = headers.urgency {
            request = request.header("Urgency", urgency.as_str());
        }
        if let Some(topic) = &headers.topic {
            request = request.header("Topic", topic.as_str());
        }

        let response = request.body(body).send().await.map_err(classify_error)?;
        classify_response(response).await
    }
}

/// A request that got no response.
fn classify_error(err: reqwest::Error) -> SendError {
    if let Some(forbidden) = forbidden_in_chain(&err) {
        return rejected(format!("push endpoint refused: {forbidden}"));
    }
    let reason = if err.is_timeout() {
        "push service timed out".to_owned()
    } else if err.is_connect() {
        format!("cannot connect to the push service: {}", error_chain(&err))
    } else {
        format!("push request failed: {}", error_chain(&err))
    };
    SendError::Retry {
        reason,
        after: None,
    }
}

/// The push service's answer, as RFC 8030 §5 and the services' documentation describe it.
async fn classify_response(response: reqwest::Response) -> Result<Sent, SendError> {
    let status = response.status();
    if status.is_success() {
        let message_id = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        return Ok(Sent { message_id });
    }
    let retry_after = parse_retry_after(response.headers(), SystemTime::now());
    let location = response
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = read_body_prefix(response, ERROR_BODY_LIMIT).await;
    let detail = if body.is_empty() {
        status.to_string()
    } else {
        format!("{status}: {body}")
    };
    Err(match status {
        StatusCode::NOT_FOUND | StatusCode::GONE => SendError::Unregistered {
            reason: format!("push subscription expired or unsubscribed ({detail})"),
            since: None,
        },
        StatusCode::PAYLOAD_TOO_LARGE => rejected(format!("push message too large ({detail})")),
        StatusCode::TOO_MANY_REQUESTS => SendError::Retry {
            reason: format!("push service rate limit ({detail})"),
            after: retry_after,
        },
        s if s.is_server_error() => SendError::Retry {
            reason: format!("push service error ({detail})"),
            after: retry_after,
        },
        s if s.is_redirection() => rejected(format!(
            "push endpoint redirected ({status}, to {}); redirects are not followed",
            location.as_deref().unwrap_or("nowhere")
        )),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => rejected(format!(
            "push service refused the VAPID credentials ({detail})"
        )),
        s if s.is_client_error() => {
            rejected(format!("push service rejected the message ({detail})"))
        }
        _ => SendError::Retry {
            reason: format!("unexpected push service response ({detail})"),
            after: retry_after,
        },
    })
}

/// The first `limit` bytes of the body as text (lossy): enough for a reason, bounded so a
/// hostile endpoint cannot make us buffer a huge answer.
async fn read_body_prefix(mut response: reqwest::Response, limit: usize) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    bytes.truncate(limit);
    String::from_utf8_lossy(&bytes).trim().to_owned()
}

/// `Retry-After` as delay-seconds or an HTTP date (RFC 9110 §10.2.3).
pub(crate) fn parse_retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(name: &str, key: Option<String>) -> WebpushAppConfig {
        WebpushAppConfig {
            app: name.into(),
            vapid_private_key: key,
            vapid_key_file: None,
            subject: "mailto:ops@example.com".into(),
            request_timeout: default_request_timeout(),
        }
    }

    #[test]
    fn config_deserialises_with_defaults_and_refuses_unknown_fields() {
        let (private, _) = generate_vapid_keys();
        let config: WebpushConfig = serde_json::from_value(serde_json::json!({
            "apps": [{"vapid_private_key": private, "subject": "mailto:a@b.c"}]
        }))
        .expect("config");
        assert!(!config.allow_private_endpoints);
        assert_eq!(config.apps[0].app, "");
        assert_eq!(config.apps[0].request_timeout, HumanDuration::from_secs(10));
        let unknown = serde_json::from_value::<WebpushConfig>(serde_json::json!({
            "apps": [{"vapid_private_key": private, "subject": "mailto:a@b.c", "ttl": 1}]
        }));
        assert!(unknown.is_err());
        // The key never shows in Debug output.
        assert!(!format!("{config:?}").contains(&private));
    }

    #[test]
    fn bad_configs_fail_loudly() {
        let (private, _) = generate_vapid_keys();
        let build = |apps| {
            WebpushSender::new(&WebpushConfig {
                apps,
                allow_private_endpoints: false,
            })
        };
        assert!(matches!(
            build(vec![
                app("", Some(private.clone())),
                app("", Some(private.clone()))
            ]),
            Err(WebpushConfigError::DuplicateApp(_))
        ));
        assert!(matches!(
            build(vec![app("", None)]),
            Err(WebpushConfigError::KeySource(_))
        ));
        assert!(matches!(
            build(vec![app("", Some("short".into()))]),
            Err(WebpushConfigError::Key { .. })
        ));
        let mut no_subject = app("", Some(private.clone()));
        no_subject.subject = "ops@example.com".into();
        assert!(matches!(
            build(vec![no_subject]),
            Err(WebpushConfigError::Subject { .. })
        ));
        let mut missing_file = app("", None);
        missing_file.vapid_key_file = Some("/nonexistent/vapid.key".into());
        assert!(matches!(
            build(vec![missing_file]),
            Err(WebpushConfigError::KeyFile { .. })
        ));
    }

    #[test]
    fn key_files_are_read() {
        let (private, public) = generate_vapid_keys();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vapid.key");
        std::fs::write(&path, format!("{private}\n")).expect("write");
        let mut config = app("web", None);
        config.vapid_key_file = Some(path);
        let sender = WebpushSender::new(&WebpushConfig {
            apps: vec![config],
            allow_private_endpoints: false,
        })
        .expect("sender");
        assert_eq!(sender.public_key("web"), Some(public.as_str()));
        assert_eq!(sender.public_key(""), None);
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = SystemTime::now();
        let mut headers = HeaderMap::new();
        assert_eq!(parse_retry_after(&headers, now), None);
        headers.insert(RETRY_AFTER, "120".parse().expect("value"));
        assert_eq!(
            parse_retry_after(&headers, now),
            Some(Duration::from_secs(120))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(300));
        headers.insert(RETRY_AFTER, later.parse().expect("value"));
        let after = parse_retry_after(&headers, now).expect("date");
        assert!(after > Duration::from_secs(298) && after <= Duration::from_secs(300));
        headers.insert(RETRY_AFTER, "soon".parse().expect("value"));
        assert_eq!(parse_retry_after(&headers, now), None);
    }
}
