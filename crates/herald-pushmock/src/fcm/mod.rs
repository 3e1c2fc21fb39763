//! The FCM HTTP v1 emulator: `POST /v1/projects/{project}/messages:send` with bearer access
//! tokens from its own OAuth endpoint ([`oauth`], `POST /token`), answering with FCM's
//! statuses and `google.rpc.Status` error bodies (with the
//! `type.googleapis.com/google.firebase.fcm.v1.FcmError` detail where FCM sends one).
//!
//! Checks, in order: path (404) and method (405); the access token (401 `UNAUTHENTICATED`
//! when missing, unknown, revoked or expired) and that it belongs to the URL's project
//! (403 `PERMISSION_DENIED`); the body (400 `INVALID_ARGUMENT`: not JSON, unknown fields,
//! not exactly one of `token`/`topic`/`condition`, `data` values that are not strings, a
//! malformed token or topic, a payload over 4096 bytes); scripted failures (any FCM error
//! code, with `Retry-After`); then scripted `UNREGISTERED` tokens (404) and tokens of another
//! project (403 `SENDER_ID_MISMATCH`). Success: `{"name": "projects/{p}/messages/{id}"}`.
//!
//! Owns: its accounts, the access tokens it issued, its script and its records and counters.
//! May touch: the [`MockClock`].

mod message;
mod oauth;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hyper::http::{HeaderMap, Method, StatusCode, request::Parts};
use jsonwebtoken::DecodingKey;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::clock::MockClock;
use crate::http::{self, Response, Service};
use crate::keys::{self, KeyError};
use crate::script::{self, Injected, Ring};

use message::{Target, validate_message};

/// FCM's limit on a message's payload (data keys and values plus the notification).
pub const MAX_PAYLOAD: usize = 4096;
const FCM_ERROR_TYPE: &str = "type.googleapis.com/google.firebase.fcm.v1.FcmError";
const BAD_REQUEST_TYPE: &str = "type.googleapis.com/google.rpc.BadRequest";

/// A service account the token endpoint accepts assertions from.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmMockAccount {
    pub project_id: String,
    pub client_email: String,
    /// SPKI PEM, or the PKCS#8 private key itself (its public half is used).
    pub public_key_pem: String,
}

/// Start-up settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FcmMockConfig {
    pub accounts: Vec<FcmMockAccount>,
    /// `expires_in` of issued access tokens, in seconds (Google: 3599).
    pub token_expires_in: u64,
    /// How many accepted messages are kept for inspection.
    pub max_records: usize,
    /// Added before every answer.
    pub latency_ms: u64,
}

impl Default for FcmMockConfig {
    fn default() -> Self {
        Self {
            accounts: Vec::new(),
            token_expires_in: 3599,
            max_records: 10_000,
            latency_ms: 0,
        }
    }
}

/// One accepted message.
#[derive(Clone, Debug, Serialize)]
pub struct FcmRecord {
    pub project_id: String,
    /// The `message` object as sent.
    pub message: Value,
    pub validate_only: bool,
    /// The `name` answered.
    pub name: String,
    /// The service account whose access token authorised it.
    pub client_email: String,
    pub http_version: String,
    pub time_ms: u64,
}

/// A failure to answer instead of accepting.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmFailure {
    /// The token, topic or condition it applies to; none: any.
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default = "one")]
    pub count: u32,
    /// An FCM error code: `QUOTA_EXCEEDED`, `UNAVAILABLE`, `INTERNAL`, `UNREGISTERED`,
    /// `SENDER_ID_MISMATCH`, `INVALID_ARGUMENT`, `THIRD_PARTY_AUTH_ERROR`,
    /// `UNSPECIFIED_ERROR`.
    pub error: String,
    /// `Retry-After`, in seconds.
    #[serde(default)]
    pub retry_after: Option<u64>,
}

fn one() -> u32 {
    1
}

/// Counters since start (or the last reset).
#[derive(Clone, Debug, Default, Serialize)]
pub struct FcmStats {
    pub requests: u64,
    pub accepted: u64,
    /// TCP connections accepted (HTTP/2 senders should need one per host).
    pub connections: u64,
    /// Refusals by FCM error code (or `google.rpc` status when FCM sends no code).
    pub rejected: BTreeMap<String, u64>,
    pub token_requests: u64,
    pub tokens_issued: u64,
}

struct Account {
    project_id: String,
    decoding: DecodingKey,
}

struct Issued {
    project_id: String,
    client_email: String,
    expires_at_ms: u64,
}

#[derive(Default)]
struct Script {
    unregistered: HashSet<String>,
    token_projects: HashMap<String, String>,
    failures: Vec<Injected<FcmFailure>>,
}

struct State {
    clock: MockClock,
    token_url: RwLock<String>,
    accounts: RwLock<HashMap<String, Account>>,
    access_tokens: RwLock<HashMap<String, Issued>>,
    expires_in: AtomicU64,
    script: Mutex<Script>,
    records: Mutex<Ring<FcmRecord>>,
    rejected: Mutex<BTreeMap<String, u64>>,
    requests: AtomicU64,
    accepted: AtomicU64,
    connections: AtomicU64,
    token_requests: AtomicU64,
    tokens_issued: AtomicU64,
    latency_ms: AtomicU64,
}

/// The FCM emulator and its token endpoint (cheap to clone; clones share state).
#[derive(Clone)]
pub struct FcmMock {
    state: Arc<State>,
}

impl std::fmt::Debug for FcmMock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FcmMock").finish_non_exhaustive()
    }
}

/// An error answer: HTTP status, `google.rpc` status, message, FCM error code if any, and
/// any further details.
struct Refusal {
    status: StatusCode,
    message: String,
    code: Option<&'static str>,
    details: Vec<Value>,
}

impl Refusal {
    fn fcm(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: status_of(code),
            message: message.into(),
            code: Some(code),
            details: Vec::new(),
        }
    }

    /// An `INVALID_ARGUMENT` about a field (FCM sends a `BadRequest` detail, no FCM code).
    fn field(field: &str, description: impl Into<String>) -> Self {
        let description = description.into();
        Self {
            status: StatusCode::BAD_REQUEST,
            message: description.clone(),
            code: None,
            details: vec![json!({
                "@type": BAD_REQUEST_TYPE,
                "fieldViolations": [{"field": field, "description": description}],
            })],
        }
    }

    fn plain(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            code: None,
            details: Vec::new(),
        }
    }
}

/// The HTTP status FCM answers each error code with.
fn status_of(code: &str) -> StatusCode {
    match code {
        "INVALID_ARGUMENT" => StatusCode::BAD_REQUEST,
        "UNREGISTERED" => StatusCode::NOT_FOUND,
        "SENDER_ID_MISMATCH" => StatusCode::FORBIDDEN,
        "QUOTA_EXCEEDED" => StatusCode::TOO_MANY_REQUESTS,
        "UNAVAILABLE" => StatusCode::SERVICE_UNAVAILABLE,
        "THIRD_PARTY_AUTH_ERROR" => StatusCode::UNAUTHORIZED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The `google.rpc.Code` name of an HTTP status, as in the `status` field.
fn rpc_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        405 => "UNIMPLEMENTED",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        500 => "INTERNAL",
        _ => "UNKNOWN",
    }
}

fn static_code(code: &str) -> &'static str {
    [
        "INVALID_ARGUMENT",
        "UNREGISTERED",
        "SENDER_ID_MISMATCH",
        "QUOTA_EXCEEDED",
        "UNAVAILABLE",
        "INTERNAL",
        "THIRD_PARTY_AUTH_ERROR",
    ]
    .into_iter()
    .find(|known| *known == code)
    .unwrap_or("UNSPECIFIED_ERROR")
}

impl FcmMock {
    pub fn new(config: FcmMockConfig, clock: MockClock) -> Result<Self, KeyError> {
        let mock = Self {
            state: Arc::new(State {
                clock,
                token_url: RwLock::new(String::new()),
                accounts: RwLock::new(HashMap::new()),
                access_tokens: RwLock::new(HashMap::new()),
                expires_in: AtomicU64::new(config.token_expires_in),
                script: Mutex::new(Script::default()),
                records: Mutex::new(Ring::new(config.max_records)),
                rejected: Mutex::new(BTreeMap::new()),
                requests: AtomicU64::new(0),
                accepted: AtomicU64::new(0),
                connections: AtomicU64::new(0),
                token_requests: AtomicU64::new(0),
                tokens_issued: AtomicU64::new(0),
                latency_ms: AtomicU64::new(config.latency_ms),
            }),
        };
        for account in config.accounts {
            mock.add_account(account)?;
        }
        Ok(mock)
    }

    /// The token endpoint's own URL: assertions must name it as their `aud`.
    pub fn set_token_url(&self, url: &str) {
        *self.state.token_url.write() = url.to_owned();
    }

    pub fn token_url(&self) -> String {
        self.state.token_url.read().clone()
    }

    /// Accepts assertions from this account, for its project.
    pub fn add_account(&self, account: FcmMockAccount) -> Result<(), KeyError> {
        let public = keys::rsa_public_pem(&account.public_key_pem)?;
        let decoding = DecodingKey::from_rsa_pem(public.as_bytes())
            .map_err(|e| KeyError::Invalid(e.to_string()))?;
        self.state.accounts.write().insert(
            account.client_email,
            Account {
                project_id: account.project_id,
                decoding,
            },
        );
        Ok(())
    }

    /// From now on answers 404 `UNREGISTERED` for this registration token.
    pub fn unregister(&self, token: &str) {
        self.state
            .script
            .lock()
            .unregistered
            .insert(token.to_owned());
    }

    /// Says `token` belongs to `project`: sends from other projects get 403
    /// `SENDER_ID_MISMATCH`.
    pub fn set_token_project(&self, token: &str, project: &str) {
        self.state
            .script
            .lock()
            .token_projects
            .insert(token.to_owned(), project.to_owned());
    }

    /// Answers the next `failure.count` matching messages with this failure.
    pub fn inject(&self, failure: FcmFailure) {
        self.state.script.lock().failures.push(Injected {
            target: failure.target.clone(),
            remaining: failure.count.max(1),
            failure,
        });
    }

    /// Invalidates every access token issued so far (sends with them get 401).
    pub fn revoke_all_tokens(&self) {
        self.state.access_tokens.write().clear();
    }

    /// `expires_in` of access tokens issued from now on, in seconds.
    pub fn set_token_expires_in(&self, secs: u64) {
        self.state.expires_in.store(secs, Ordering::Relaxed);
    }

    pub fn set_latency(&self, latency: Duration) {
        let ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        self.state.latency_ms.store(ms, Ordering::Relaxed);
    }

    pub fn set_max_records(&self, max: usize) {
        self.state.records.lock().set_capacity(max);
    }

    /// The accepted messages kept, oldest first.
    pub fn records(&self) -> Vec<FcmRecord> {
        self.state.records.lock().to_vec()
    }

    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// How many access tokens the token endpoint issued.
    pub fn tokens_issued(&self) -> u64 {
        self.state.tokens_issued.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> FcmStats {
        let s = &self.state;
        FcmStats {
            requests: s.requests.load(Ordering::Relaxed),
            accepted: s.accepted.load(Ordering::Relaxed),
            connections: s.connections.load(Ordering::Relaxed),
            rejected: s.rejected.lock().clone(),
            token_requests: s.token_requests.load(Ordering::Relaxed),
            tokens_issued: s.tokens_issued.load(Ordering::Relaxed),
        }
    }

    /// Forgets records, counters, the script and issued tokens; keeps the accounts.
    pub fn reset(&self) {
        let s = &self.state;
        *s.script.lock() = Script::default();
        s.records.lock().clear();
        s.rejected.lock().clear();
        s.access_tokens.write().clear();
        for counter in [
            &s.requests,
            &s.accepted,
            &s.token_requests,
            &s.tokens_issued,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
        s.latency_ms.store(0, Ordering::Relaxed);
    }

    fn refuse(&self, refusal: Refusal) -> Response {
        let status_name = rpc_status(refusal.status);
        let counted = refusal.code.unwrap_or(status_name);
        *self
            .state
            .rejected
            .lock()
            .entry(counted.to_owned())
            .or_default() += 1;
        let mut details = refusal.details;
        if let Some(code) = refusal.code {
            details.insert(0, json!({"@type": FCM_ERROR_TYPE, "errorCode": code}));
        }
        let mut error = json!({
            "code": refusal.status.as_u16(),
            "message": refusal.message,
            "status": status_name,
        });
        if !details.is_empty() {
            error["details"] = Value::Array(details);
        }
        http::json(refusal.status, &json!({ "error": error }))
    }

    async fn handle(&self, head: Parts, body: Bytes) -> Response {
        let latency = self.state.latency_ms.load(Ordering::Relaxed);
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        let path = head.uri.path();
        if path == "/token" {
            return self.handle_token(&head, &body);
        }
        self.state.requests.fetch_add(1, Ordering::Relaxed);
        let project = path
            .strip_prefix("/v1/projects/")
            .and_then(|rest| rest.strip_suffix("/messages:send"))
            .filter(|p| !p.is_empty() && !p.contains('/'));
        let Some(project) = project else {
            return self.refuse(Refusal::plain(
                StatusCode::NOT_FOUND,
                format!("The requested URL {path} was not found on this server."),
            ));
        };
        if head.method != Method::POST {
            return self.refuse(Refusal::plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "Method not allowed",
            ));
        }
        match self.send(project, &head, &body) {
            Ok(response) => response,
            Err(refusal) => self.refuse(refusal),
        }
    }

    fn authenticate(&self, headers: &HeaderMap, project: &str) -> Result<String, Refusal> {
        let unauthenticated = || {
            Refusal::plain(
                StatusCode::UNAUTHORIZED,
                "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
            )
        };
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or_else(unauthenticated)?;
        let now = self.state.clock.now_ms();
        let tokens = self.state.access_tokens.read();
        let issued = tokens
            .get(token)
            .filter(|issued| issued.expires_at_ms > now)
            .ok_or_else(unauthenticated)?;
        if issued.project_id != project {
            return Err(Refusal::plain(
                StatusCode::FORBIDDEN,
                format!(
                    "Permission 'cloudmessaging.messages.create' denied on resource '//cloudresourcemanager.googleapis.com/projects/{project}' (or it may not exist)."
                ),
            ));
        }
        Ok(issued.client_email.clone())
    }

    fn send(&self, project: &str, head: &Parts, body: &Bytes) -> Result<Response, Refusal> {
        let client_email = self.authenticate(&head.headers, project)?;
        let request: Value = serde_json::from_slice(body).map_err(|e| {
            Refusal::fcm(
                "INVALID_ARGUMENT",
                format!("Invalid JSON payload received. {e}"),
            )
        })?;
        let Value::Object(request) = request else {
            return Err(Refusal::fcm(
                "INVALID_ARGUMENT",
                "Invalid JSON payload received. Expected an object.",
            ));
        };
        let mut validate_only = false;
        let mut message = None;
        for (name, value) in request {
            match name.as_str() {
                "message" => message = Some(value),
                "validate_only" | "validateOnly" => validate_only = value.as_bool() == Some(true),
                other => {
                    return Err(Refusal::field(
                        other,
                        format!(
                            "Invalid JSON payload received. Unknown name \"{other}\": Cannot find field."
                        ),
                    ));
                }
            }
        }
        let Some(message) = message else {
            return Err(Refusal::fcm(
                "INVALID_ARGUMENT",
                "Request contains an invalid argument.",
            ));
        };
        let target = validate_message(&message)?;

        let injected = script::take(&mut self.state.script.lock().failures, target.text());
        if let Some(failure) = injected {
            let code = static_code(&failure.error);
            let response = self.refuse(Refusal::fcm(code, failure_message(code)));
            return Ok(http::with_retry_after(response, failure.retry_after));
        }
        if let Target::Token(token) = &target {
            let script = self.state.script.lock();
            if script.unregistered.contains(*token) {
                return Err(Refusal::fcm(
                    "UNREGISTERED",
                    failure_message("UNREGISTERED"),
                ));
            }
            if script
                .token_projects
                .get(*token)
                .is_some_and(|owner| owner != project)
            {
                return Err(Refusal::fcm(
                    "SENDER_ID_MISMATCH",
                    failure_message("SENDER_ID_MISMATCH"),
                ));
            }
        }

        let name = if validate_only {
            format!("projects/{project}/messages/fake_message_id")
        } else {
            format!(
                "projects/{project}/messages/0:{}%{}",
                self.state.clock.now_ms(),
                hex::encode(rand::random::<[u8; 8]>())
            )
        };
        self.state.records.lock().push(FcmRecord {
            project_id: project.to_owned(),
            message,
            validate_only,
            name: name.clone(),
            client_email,
            http_version: format!("{:?}", head.version),
            time_ms: self.state.clock.now_ms(),
        });
        self.state.accepted.fetch_add(1, Ordering::Relaxed);
        Ok(http::json(StatusCode::OK, &json!({ "name": name })))
    }
}

fn failure_message(code: &str) -> &'static str {
    match code {
        "UNREGISTERED" => "Requested entity was not found.",
        "SENDER_ID_MISMATCH" => "SenderId mismatch",
        "QUOTA_EXCEEDED" => {
            "Quota exceeded for quota metric 'Send requests' and limit 'Send requests per minute'."
        }
        "UNAVAILABLE" => "The service is currently unavailable.",
        "INTERNAL" => "Internal error encountered.",
        "THIRD_PARTY_AUTH_ERROR" => "Auth error from APNS or Web Push Service",
        "INVALID_ARGUMENT" => "Request contains an invalid argument.",
        _ => "Unknown error.",
    }
}

impl Service for FcmMock {
    fn connected(&self) {
        self.state.connections.fetch_add(1, Ordering::Relaxed);
    }

    async fn call(self: Arc<Self>, head: Parts, body: Bytes) -> Response {
        self.handle(head, body).await
    }
}
