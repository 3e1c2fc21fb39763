//! The control API, for tests that are not written in Rust (Python): JSON over HTTP on its
//! own port, so the emulated services' paths stay exactly Apple's and Google's.
//!
//! | method and path | body | does |
//! |---|---|---|
//! | `GET /health` | | `{"ok": true}` |
//! | `GET /apns/records`, `GET /fcm/records` | | `{"records": [...]}` (oldest first) |
//! | `GET /apns/stats`, `GET /fcm/stats` | | counters, refusals by reason |
//! | `POST /apns/keys` | `{key_id, team_id, public_key_pem, topics}` | accept a key |
//! | `POST /apns/generate-key` | `{key_id, team_id, topics}` | new key, accepted; answers it with its private PEM |
//! | `POST /apns/unregistered` | `{token, timestamp?}` (ms, default now) | 410 for the token |
//! | `POST /apns/unknown-tokens` | `{token}` | 400 `BadDeviceToken` for it |
//! | `POST /apns/token-topics` | `{token, topic}` | 400 `DeviceTokenNotForTopic` for other topics |
//! | `POST /apns/failures` | `{token?, count, status, reason, retry_after?}` | inject failures |
//! | `POST /apns/expire-next` | `{count}` | next requests get `ExpiredProviderToken` |
//! | `POST /fcm/accounts` | `{project_id, client_email, public_key_pem}` | accept an account |
//! | `POST /fcm/generate-account` | `{project_id}` | new account; answers its key file JSON |
//! | `POST /fcm/unregistered` | `{token}` | 404 `UNREGISTERED` for it |
//! | `POST /fcm/token-projects` | `{token, project}` | 403 `SENDER_ID_MISMATCH` from other projects |
//! | `POST /fcm/failures` | `{target?, count, error, retry_after?}` | inject failures |
//! | `POST /fcm/revoke-tokens` | | every access token issued so far gets 401 |
//! | `POST /fcm/token-expires-in` | `{secs}` | lifetime of tokens issued from now on |
//! | `POST /apns/latency`, `POST /fcm/latency` | `{ms}` | delay every answer |
//! | `POST /clock/advance` | `{secs}` | move both emulators' clock forward |
//! | `POST /reset` | | forget records, counters, script, issued tokens, clock offset |
//!
//! Errors are `{"error": "..."}` with 400 or 404.
//!
//! Owns: nothing; it drives the emulators through their Rust API.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::http::{Method, StatusCode, request::Parts};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::apns::{ApnsFailure, ApnsMock, ApnsMockKey};
use crate::clock::MockClock;
use crate::fcm::{FcmFailure, FcmMock, FcmMockAccount};
use crate::http::{self, Response, Service};
use crate::keys::{ApnsKey, ServiceAccount};

/// The control API's service.
pub struct Control {
    pub apns: ApnsMock,
    pub fcm: FcmMock,
    pub clock: MockClock,
}

fn ok() -> Response {
    http::json(StatusCode::OK, &json!({"ok": true}))
}

/// A refused control request: status and message.
struct Refused(StatusCode, String);

impl Refused {
    fn into_response(self) -> Response {
        http::json(self.0, &json!({"error": self.1}))
    }
}

fn bad(message: impl std::fmt::Display) -> Refused {
    Refused(StatusCode::BAD_REQUEST, message.to_string())
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, Refused> {
    serde_json::from_slice(body).map_err(|e| bad(format!("invalid body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    token: String,
    #[serde(default)]
    timestamp: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenTopic {
    token: String,
    topic: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenProject {
    token: String,
    project: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateKey {
    key_id: String,
    team_id: String,
    #[serde(default)]
    topics: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateAccount {
    project_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Count {
    count: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Millis {
    ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Secs {
    secs: u64,
}

impl Control {
    fn route(&self, head: &Parts, body: &Bytes) -> Result<Response, Refused> {
        let path = head.uri.path();
        if head.method == Method::GET {
            return match path {
                "/health" => Ok(ok()),
                "/apns/records" => Ok(records(&self.apns.records())),
                "/fcm/records" => Ok(records(&self.fcm.records())),
                "/apns/stats" => Ok(to_json(&self.apns.stats())),
                "/fcm/stats" => Ok(to_json(&self.fcm.stats())),
                _ => Err(not_found(path)),
            };
        }
        if head.method != Method::POST {
            return Err(Refused(
                StatusCode::METHOD_NOT_ALLOWED,
                "use GET or POST".to_owned(),
            ));
        }
        match path {
            "/apns/keys" => {
                let key: ApnsMockKey = parse(body)?;
                self.apns.add_key(key).map_err(bad)?;
            }
            "/apns/generate-key" => {
                let request: GenerateKey = parse(body)?;
                let key = ApnsKey::generate(&request.key_id, &request.team_id).map_err(bad)?;
                self.apns
                    .add_key(ApnsMockKey {
                        key_id: key.key_id.clone(),
                        team_id: key.team_id.clone(),
                        public_key_pem: key.public_key_pem.clone(),
                        topics: request.topics,
                    })
                    .map_err(bad)?;
                return Ok(to_json(&key));
            }
            "/apns/unregistered" => {
                let request: TokenBody = parse(body)?;
                let at = request.timestamp.unwrap_or_else(|| self.clock.now_ms());
                self.apns.unregister(&request.token, at);
            }
            "/apns/unknown-tokens" => {
                let request: TokenBody = parse(body)?;
                self.apns.set_unknown_token(&request.token);
            }
            "/apns/token-topics" => {
                let request: TokenTopic = parse(body)?;
                self.apns.set_token_topic(&request.token, &request.topic);
            }
            "/apns/failures" => self.apns.inject(parse::<ApnsFailure>(body)?),
            "/apns/expire-next" => self.apns.expire_next(parse::<Count>(body)?.count),
            "/apns/latency" => self
                .apns
                .set_latency(Duration::from_millis(parse::<Millis>(body)?.ms)),
            "/fcm/accounts" => {
                let account: FcmMockAccount = parse(body)?;
                self.fcm.add_account(account).map_err(bad)?;
            }
            "/fcm/generate-account" => {
                let request: GenerateAccount = parse(body)?;
                let account = ServiceAccount::generate(&request.project_id, &self.fcm.token_url())
                    .map_err(bad)?;
                self.fcm
                    .add_account(FcmMockAccount {
                        project_id: account.project_id.clone(),
                        client_email: account.client_email.clone(),
                        public_key_pem: account.public_key_pem.clone(),
                    })
                    .map_err(bad)?;
                return Ok(http::json(StatusCode::OK, &account.to_json()));
            }
            "/fcm/unregistered" => self.fcm.unregister(&parse::<TokenBody>(body)?.token),
            "/fcm/token-projects" => {
                let request: TokenProject = parse(body)?;
                self.fcm.set_token_project(&request.token, &request.project);
            }
            "/fcm/failures" => self.fcm.inject(parse::<FcmFailure>(body)?),
            "/fcm/revoke-tokens" => self.fcm.revoke_all_tokens(),
            "/fcm/token-expires-in" => self.fcm.set_token_expires_in(parse::<Secs>(body)?.secs),
            "/fcm/latency" => self
                .fcm
                .set_latency(Duration::from_millis(parse::<Millis>(body)?.ms)),
            "/clock/advance" => self
                .clock
                .advance(Duration::from_secs(parse::<Secs>(body)?.secs)),
            "/reset" => {
                self.apns.reset();
                self.fcm.reset();
                self.clock.reset();
            }
            _ => return Err(not_found(path)),
        }
        Ok(ok())
    }
}

fn not_found(path: &str) -> Refused {
    Refused(StatusCode::NOT_FOUND, format!("no control endpoint {path}"))
}

fn to_json<T: serde::Serialize>(value: &T) -> Response {
    match serde_json::to_value(value) {
        Ok(value) => http::json(StatusCode::OK, &value),
        Err(e) => http::json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"error": e.to_string()}),
        ),
    }
}

fn records<T: serde::Serialize>(records: &[T]) -> Response {
    let records: Vec<Value> = records
        .iter()
        .filter_map(|r| serde_json::to_value(r).ok())
        .collect();
    http::json(StatusCode::OK, &json!({ "records": records }))
}

impl Service for Control {
    async fn call(self: Arc<Self>, head: Parts, body: Bytes) -> Response {
        self.route(&head, &body)
            .unwrap_or_else(Refused::into_response)
    }
}
