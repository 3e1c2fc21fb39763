//! The APNs emulator: `POST /3/device/{token}` with token (JWT) authentication, checked the
//! way Apple documents it, answering with Apple's statuses and `{"reason": ...}` bodies.
//!
//! Checks, in order: method (405 `MethodNotAllowed`), path (404 `BadPath`, 400
//! `MissingDeviceToken`), repeated `apns-*` headers (400 `DuplicateHeaders`), the provider
//! token (403 `MissingProviderToken`, `InvalidProviderToken` for a bad signature, unknown key
//! id, wrong team or an `iat` in the future, `ExpiredProviderToken` once `iat` is over an hour
//! old), then scripted failures, then the headers (`MissingTopic`, `BadTopic`,
//! `TopicDisallowed` for a bundle the key's team does not own, `InvalidPushType` also for a
//! topic without the suffix its push type needs, `BadPriority` also for a background push at
//! priority 10, `BadExpirationDate`, `BadCollapseId` over 64 bytes, `BadMessageId` for an
//! `apns-id` that is not a UUID), the device token (`BadDeviceToken` unless 64 hex digits or
//! when scripted as unknown, `DeviceTokenNotForTopic` when scripted to another bundle, 410
//! `Unregistered` with its timestamp when scripted), and the payload (`PayloadEmpty`, 413
//! `PayloadTooLarge` over 4096 bytes or 5120 for VoIP). Apple documents no reason for a body
//! that is not a JSON dictionary; the emulator answers 400 `PayloadEmpty` for it.
//!
//! Owns: its keys, its script (unregistered/unknown tokens, token topics, injected failures,
//! forced expiry, latency) and its records and counters. May touch: the [`MockClock`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hyper::http::{HeaderMap, HeaderValue, Method, StatusCode, request::Parts};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::clock::MockClock;
use crate::http::{self, Response, Service};
use crate::keys::{self, KeyError};
use crate::script::{self, Injected, Ring};

/// Apple's limit for every push type but VoIP.
pub const MAX_PAYLOAD: usize = 4096;
/// Apple's limit for VoIP pushes.
pub const MAX_VOIP_PAYLOAD: usize = 5120;
/// A provider token is refused once its `iat` is older than this.
pub const TOKEN_LIFETIME_SECS: u64 = 3600;
/// Clock skew tolerated for an `iat` in the future.
const FUTURE_SKEW_SECS: u64 = 300;
/// Verified provider tokens remembered (so a signature is checked once, not per request).
const VERIFIED_CACHE: usize = 4096;

/// Push types and the suffix their `apns-topic` must carry after the bundle id.
const PUSH_TYPES: &[(&str, &str)] = &[
    ("alert", ""),
    ("background", ""),
    ("location", ".location-query"),
    ("voip", ".voip"),
    ("complication", ".complication"),
    ("fileprovider", ".pushkit.fileprovider"),
    ("mdm", ""),
    ("liveactivity", ".push-type.liveactivity"),
    ("pushtotalk", ".voip-ptt"),
    ("widgets", ".push-type.widgets"),
    ("controls", ".push-type.controls"),
];

/// A signing key the emulator accepts tokens from, and the bundle ids its team owns.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsMockKey {
    pub key_id: String,
    pub team_id: String,
    /// SPKI PEM, or the PKCS#8 `.p8` itself (its public half is used).
    pub public_key_pem: String,
    #[serde(default)]
    pub topics: Vec<String>,
}

/// Start-up settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApnsMockConfig {
    pub keys: Vec<ApnsMockKey>,
    /// How many accepted notifications are kept for inspection (older ones are dropped).
    pub max_records: usize,
    /// Added before every answer.
    pub latency_ms: u64,
}

impl Default for ApnsMockConfig {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            max_records: 10_000,
            latency_ms: 0,
        }
    }
}

/// One accepted notification.
#[derive(Clone, Debug, Serialize)]
pub struct ApnsRecord {
    pub token: String,
    /// The `apns-*` headers as sent.
    pub headers: BTreeMap<String, String>,
    pub payload: serde_json::Value,
    /// The `apns-id` answered.
    pub apns_id: String,
    pub key_id: String,
    pub team_id: String,
    /// The provider token's `iat`.
    pub jwt_iat: u64,
    /// `HTTP/2.0` from a proper APNs client.
    pub http_version: String,
    pub time_ms: u64,
}

/// A failure to answer instead of accepting.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsFailure {
    /// The device token it applies to; none: any.
    #[serde(default)]
    pub token: Option<String>,
    /// How many requests get it.
    #[serde(default = "one")]
    pub count: u32,
    pub status: u16,
    pub reason: String,
    /// `Retry-After`, in seconds.
    #[serde(default)]
    pub retry_after: Option<u64>,
}

fn one() -> u32 {
    1
}

/// Counters since start (or the last reset).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ApnsStats {
    pub requests: u64,
    pub accepted: u64,
    /// TCP connections accepted (HTTP/2 senders should need one per host).
    pub connections: u64,
    /// Refusals by reason.
    pub rejected: BTreeMap<String, u64>,
    /// Distinct provider tokens (JWTs) presented.
    pub provider_tokens: u64,
}

struct Key {
    team_id: String,
    decoding: DecodingKey,
}

struct Verified {
    key_id: String,
    team_id: String,
    iat: u64,
}

#[derive(Default)]
struct Script {
    unregistered: HashMap<String, u64>,
    unknown_tokens: HashSet<String>,
    token_topics: HashMap<String, String>,
    failures: Vec<Injected<ApnsFailure>>,
}

struct State {
    clock: MockClock,
    keys: RwLock<HashMap<String, Key>>,
    team_topics: RwLock<HashMap<String, HashSet<String>>>,
    verified: Mutex<HashMap<String, Arc<Verified>>>,
    provider_tokens: Mutex<Vec<String>>,
    script: Mutex<Script>,
    records: Mutex<Ring<ApnsRecord>>,
    rejected: Mutex<BTreeMap<String, u64>>,
    requests: AtomicU64,
    accepted: AtomicU64,
    connections: AtomicU64,
    expire_next: AtomicU32,
    latency_ms: AtomicU64,
}

/// The APNs emulator (cheap to clone; clones share state).
#[derive(Clone)]
pub struct ApnsMock {
    state: Arc<State>,
}

impl std::fmt::Debug for ApnsMock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApnsMock").finish_non_exhaustive()
    }
}

type Refusal = (StatusCode, &'static str);

impl ApnsMock {
    pub fn new(config: ApnsMockConfig, clock: MockClock) -> Result<Self, KeyError> {
        let mock = Self {
            state: Arc::new(State {
                clock,
                keys: RwLock::new(HashMap::new()),
                team_topics: RwLock::new(HashMap::new()),
                verified: Mutex::new(HashMap::new()),
                provider_tokens: Mutex::new(Vec::new()),
                script: Mutex::new(Script::default()),
                records: Mutex::new(Ring::new(config.max_records)),
                rejected: Mutex::new(BTreeMap::new()),
                requests: AtomicU64::new(0),
                accepted: AtomicU64::new(0),
                connections: AtomicU64::new(0),
                expire_next: AtomicU32::new(0),
                latency_ms: AtomicU64::new(config.latency_ms),
            }),
        };
        for key in config.keys {
            mock.add_key(key)?;
        }
        Ok(mock)
    }

    /// Accepts tokens signed by this key, for pushes to these bundle ids (added to those of
    /// the key's team).
    pub fn add_key(&self, key: ApnsMockKey) -> Result<(), KeyError> {
        let public = keys::ec_public_pem(&key.public_key_pem)?;
        let decoding = DecodingKey::from_ec_pem(public.as_bytes())
            .map_err(|e| KeyError::Invalid(e.to_string()))?;
        self.state
            .team_topics
            .write()
            .entry(key.team_id.clone())
            .or_default()
            .extend(key.topics);
        self.state.keys.write().insert(
            key.key_id,
            Key {
                team_id: key.team_id,
                decoding,
            },
        );
        // A replaced key must not keep tokens verified with the old one.
        self.state.verified.lock().clear();
        Ok(())
    }

    /// From now on answers 410 `Unregistered` with this timestamp (ms) for `token`.
    pub fn unregister(&self, token: &str, timestamp_ms: u64) {
        self.state
            .script
            .lock()
            .unregistered
            .insert(token.to_owned(), timestamp_ms);
    }

    /// From now on answers 400 `BadDeviceToken` for this well-formed token (as APNs does for
    /// a token of the other environment).
    pub fn set_unknown_token(&self, token: &str) {
        self.state
            .script
            .lock()
            .unknown_tokens
            .insert(token.to_owned());
    }

    /// Binds `token` to the app `bundle_id`: pushes to another topic get 400
    /// `DeviceTokenNotForTopic`.
    pub fn set_token_topic(&self, token: &str, bundle_id: &str) {
        self.state
            .script
            .lock()
            .token_topics
            .insert(token.to_owned(), bundle_id.to_owned());
    }

    /// Answers the next `failure.count` matching requests with this failure.
    pub fn inject(&self, failure: ApnsFailure) {
        self.state.script.lock().failures.push(Injected {
            target: failure.token.clone(),
            remaining: failure.count.max(1),
            failure,
        });
    }

    /// The next `n` requests get 403 `ExpiredProviderToken`, whatever their token's age.
    pub fn expire_next(&self, n: u32) {
        self.state.expire_next.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set_latency(&self, latency: Duration) {
        let ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        self.state.latency_ms.store(ms, Ordering::Relaxed);
    }

    pub fn set_max_records(&self, max: usize) {
        self.state.records.lock().set_capacity(max);
    }

    /// The accepted notifications kept, oldest first.
    pub fn records(&self) -> Vec<ApnsRecord> {
        self.state.records.lock().to_vec()
    }

    /// How many notifications were accepted.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// How many requests arrived (accepted or not).
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// The distinct provider tokens (JWTs) presented, in the order first seen.
    pub fn provider_tokens(&self) -> Vec<String> {
        self.state.provider_tokens.lock().clone()
    }

    pub fn stats(&self) -> ApnsStats {
        ApnsStats {
            requests: self.requests(),
            accepted: self.accepted(),
            connections: self.state.connections.load(Ordering::Relaxed),
            rejected: self.state.rejected.lock().clone(),
            provider_tokens: self.state.provider_tokens.lock().len() as u64,
        }
    }

    /// Forgets records, counters and the script; keeps the keys.
    pub fn reset(&self) {
        *self.state.script.lock() = Script::default();
        self.state.records.lock().clear();
        self.state.rejected.lock().clear();
        self.state.provider_tokens.lock().clear();
        self.state.verified.lock().clear();
        self.state.requests.store(0, Ordering::Relaxed);
        self.state.accepted.store(0, Ordering::Relaxed);
        self.state.expire_next.store(0, Ordering::Relaxed);
        self.state.latency_ms.store(0, Ordering::Relaxed);
    }

    fn refuse(&self, (status, reason): Refusal) -> Response {
        self.count_rejected(reason);
        http::json(status, &serde_json::json!({ "reason": reason }))
    }

    fn count_rejected(&self, reason: &str) {
        *self
            .state
            .rejected
            .lock()
            .entry(reason.to_owned())
            .or_default() += 1;
    }

    /// Verifies the `authorization: bearer <jwt>` header.
    fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Verified>, Refusal> {
        const INVALID: Refusal = (StatusCode::FORBIDDEN, "InvalidProviderToken");
        let Some(value) = headers.get("authorization") else {
            return Err((StatusCode::FORBIDDEN, "MissingProviderToken"));
        };
        let value = value.to_str().map_err(|_| INVALID)?;
        let jwt = match value.split_once(' ') {
            Some((scheme, jwt)) if scheme.eq_ignore_ascii_case("bearer") => jwt.trim(),
            _ => return Err(INVALID),
        };
        if jwt.is_empty() {
            return Err((StatusCode::FORBIDDEN, "MissingProviderToken"));
        }
        let cached = self.state.verified.lock().get(jwt).cloned();
        let verified = match cached {
            Some(verified) => verified,
            None => {
                let verified = Arc::new(self.verify(jwt).ok_or(INVALID)?);
                let mut cache = self.state.verified.lock();
                if cache.len() >= VERIFIED_CACHE {
                    cache.clear();
                }
                cache.insert(jwt.to_owned(), verified.clone());
                drop(cache);
                let mut seen = self.state.provider_tokens.lock();
                if seen.len() < VERIFIED_CACHE && !seen.iter().any(|t| t == jwt) {
                    seen.push(jwt.to_owned());
                }
                verified
            }
        };
        let now = self.state.clock.now_secs();
        if verified.iat > now + FUTURE_SKEW_SECS {
            return Err(INVALID);
        }
        if now.saturating_sub(verified.iat) > TOKEN_LIFETIME_SECS {
            return Err((StatusCode::FORBIDDEN, "ExpiredProviderToken"));
        }
        let forced = self
            .state
            .expire_next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if forced {
            return Err((StatusCode::FORBIDDEN, "ExpiredProviderToken"));
        }
        Ok(verified)
    }

    fn verify(&self, jwt: &str) -> Option<Verified> {
        #[derive(Deserialize)]
        struct Claims {
            iss: String,
            iat: u64,
        }
        let header = jsonwebtoken::decode_header(jwt).ok()?;
        if header.alg != Algorithm::ES256 {
            return None;
        }
        let key_id = header.kid?;
        let keys = self.state.keys.read();
        let key = keys.get(&key_id)?;
        let mut validation = Validation::new(Algorithm::ES256);
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.required_spec_claims = HashSet::new();
        let claims = jsonwebtoken::decode::<Claims>(jwt, &key.decoding, &validation)
            .ok()?
            .claims;
        (claims.iss == key.team_id).then_some(Verified {
            key_id,
            team_id: claims.iss,
            iat: claims.iat,
        })
    }

    /// The header checks; on success the bundle id the topic names.
    fn check_headers(&self, headers: &HeaderMap, team_id: &str) -> Result<String, Refusal> {
        const BAD: StatusCode = StatusCode::BAD_REQUEST;
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let push_type = text("apns-push-type");
        let suffix = match push_type {
            None => "",
            Some(t) => match PUSH_TYPES.iter().find(|(name, _)| *name == t) {
                Some((_, suffix)) => suffix,
                None => return Err((BAD, "InvalidPushType")),
            },
        };
        let topic = match headers.get("apns-topic") {
            None => return Err((BAD, "MissingTopic")),
            Some(value) => value.to_str().map_err(|_| (BAD, "BadTopic"))?,
        };
        if topic.is_empty() || topic.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err((BAD, "BadTopic"));
        }
        let bundle = if suffix.is_empty() {
            topic
        } else {
            topic.strip_suffix(suffix).ok_or((BAD, "InvalidPushType"))?
        };
        let owned = self
            .state
            .team_topics
            .read()
            .get(team_id)
            .is_some_and(|topics| topics.contains(bundle) || topics.contains(topic));
        if !owned {
            return Err((BAD, "TopicDisallowed"));
        }
        if let Some(priority) = headers.get("apns-priority") {
            match priority.to_str() {
                Ok("10") if push_type == Some("background") => return Err((BAD, "BadPriority")),
                Ok("10" | "5" | "1") => {}
                _ => return Err((BAD, "BadPriority")),
            }
        }
        if let Some(expiration) = headers.get("apns-expiration") {
            let valid = expiration
                .to_str()
                .is_ok_and(|v| !v.is_empty() && v.parse::<u64>().is_ok());
            if !valid {
                return Err((BAD, "BadExpirationDate"));
            }
        }
        if headers
            .get("apns-collapse-id")
            .is_some_and(|v| v.as_bytes().len() > 64)
        {
            return Err((BAD, "BadCollapseId"));
        }
        if let Some(id) = headers.get("apns-id") {
            let valid = id
                .to_str()
                .is_ok_and(|v| v.len() == 36 && uuid::Uuid::try_parse(v).is_ok());
            if !valid {
                return Err((BAD, "BadMessageId"));
            }
        }
        Ok(bundle.to_owned())
    }

    async fn handle(&self, head: Parts, body: Bytes) -> Response {
        self.state.requests.fetch_add(1, Ordering::Relaxed);
        let latency = self.state.latency_ms.load(Ordering::Relaxed);
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        match self.check(&head, &body) {
            Ok(response) => response,
            Err(refusal) => self.refuse(refusal),
        }
    }

    fn check(&self, head: &Parts, body: &Bytes) -> Result<Response, Refusal> {
        const BAD: StatusCode = StatusCode::BAD_REQUEST;
        if head.method != Method::POST {
            return Err((StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"));
        }
        let token = head
            .uri
            .path()
            .strip_prefix("/3/device/")
            .ok_or((StatusCode::NOT_FOUND, "BadPath"))?;
        if token.is_empty() {
            return Err((BAD, "MissingDeviceToken"));
        }
        if token.contains('/') {
            return Err((StatusCode::NOT_FOUND, "BadPath"));
        }
        let headers = &head.headers;
        let repeated = headers
            .keys()
            .filter(|name| name.as_str().starts_with("apns-") || *name == "authorization")
            .any(|name| headers.get_all(name).iter().nth(1).is_some());
        if repeated {
            return Err((BAD, "DuplicateHeaders"));
        }
        let auth = self.authenticate(headers)?;

        let injected = script::take(&mut self.state.script.lock().failures, token);
        if let Some(failure) = injected {
            self.count_rejected(&failure.reason);
            let status =
                StatusCode::from_u16(failure.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let response = http::json(status, &serde_json::json!({ "reason": failure.reason }));
            return Ok(http::with_retry_after(response, failure.retry_after));
        }

        let bundle = self.check_headers(headers, &auth.team_id)?;

        let well_formed = token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit());
        if !well_formed {
            return Err((BAD, "BadDeviceToken"));
        }
        {
            let script = self.state.script.lock();
            if script.unknown_tokens.contains(token) {
                return Err((BAD, "BadDeviceToken"));
            }
            if script
                .token_topics
                .get(token)
                .is_some_and(|bound| *bound != bundle)
            {
                return Err((BAD, "DeviceTokenNotForTopic"));
            }
            if let Some(&timestamp) = script.unregistered.get(token) {
                drop(script);
                self.count_rejected("Unregistered");
                return Ok(http::json(
                    StatusCode::GONE,
                    &serde_json::json!({ "reason": "Unregistered", "timestamp": timestamp }),
                ));
            }
        }

        if body.is_empty() {
            return Err((BAD, "PayloadEmpty"));
        }
        let push_type = headers.get("apns-push-type").and_then(|v| v.to_str().ok());
        let limit = if push_type == Some("voip") {
            MAX_VOIP_PAYLOAD
        } else {
            MAX_PAYLOAD
        };
        if body.len() > limit {
            return Err((StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge"));
        }
        let payload: serde_json::Value = match serde_json::from_slice(body) {
            Ok(value @ serde_json::Value::Object(_)) => value,
            _ => return Err((BAD, "PayloadEmpty")),
        };

        let apns_id = headers
            .get("apns-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string().to_uppercase());
        let record = ApnsRecord {
            token: token.to_owned(),
            headers: headers
                .iter()
                .filter(|(name, _)| name.as_str().starts_with("apns-"))
                .map(|(name, value)| {
                    let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                    (name.as_str().to_owned(), value)
                })
                .collect(),
            payload,
            apns_id: apns_id.clone(),
            key_id: auth.key_id.clone(),
            team_id: auth.team_id.clone(),
            jwt_iat: auth.iat,
            http_version: format!("{:?}", head.version),
            time_ms: self.state.clock.now_ms(),
        };
        self.state.records.lock().push(record);
        self.state.accepted.fetch_add(1, Ordering::Relaxed);
        let mut response = http::empty(StatusCode::OK);
        if let Ok(value) = HeaderValue::from_str(&apns_id) {
            response.headers_mut().insert("apns-id", value);
        }
        Ok(response)
    }
}

impl Service for ApnsMock {
    fn connected(&self) {
        self.state.connections.fetch_add(1, Ordering::Relaxed);
    }

    async fn call(self: Arc<Self>, head: Parts, body: Bytes) -> Response {
        self.handle(head, body).await
    }

    fn too_large(&self) -> Response {
        self.refuse((StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge"))
    }
}
