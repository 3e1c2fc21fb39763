//! A small async client for Herald's server HTTP API (`POST /api/<method>` with an API key).
//!
//! Used by the `herald` CLI, the tests and the benchmarks. It speaks only HTTP; it knows the
//! API's JSON shapes but nothing of the server's internals.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// What went wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid server URL {0:?}")]
    Url(String),
    #[error("request failed: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("server answered HTTP {status}: {body}")]
    Http { status: u16, body: String },
    #[error("server error {code} ({message}){}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    Api {
        code: u32,
        message: String,
        detail: String,
    },
    #[error("unexpected response: {0}")]
    Decode(String),
}

/// Options for [`Client::publish`].
#[derive(Clone, Debug, Default)]
pub struct PublishOptions {
    pub idempotency_key: Option<String>,
    pub skip_history: bool,
    pub tags: std::collections::BTreeMap<String, String>,
}

/// Options for [`Client::history`].
#[derive(Clone, Debug, Default)]
pub struct HistoryOptions {
    /// 0: position only; negative: all retained; N: at most N.
    pub limit: i64,
    /// `(offset, epoch)`; an empty epoch is not checked.
    pub since: Option<(u64, String)>,
    pub reverse: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishResult {
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub epoch: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HistoryPage {
    pub publications: Vec<Value>,
    pub offset: u64,
    pub epoch: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    code: u32,
    message: String,
    #[serde(default)]
    detail: String,
}

#[derive(Deserialize)]
struct Envelope {
    result: Option<Value>,
    error: Option<ErrorBody>,
}

/// A server API client; cheap to clone (shares one connection pool).
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    api_key: String,
}

impl Client {
    /// `url` is the server's base URL, e.g. `http://127.0.0.1:8000`.
    pub fn new(url: &str, api_key: &str) -> Result<Self, ClientError> {
        let base = url.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::Url(url.to_owned()));
        }
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()?;
        Ok(Self {
            http,
            base: base.to_owned(),
            api_key: api_key.to_owned(),
        })
    }

    /// Calls `method` with `params` and returns its `result`.
    pub async fn call(&self, method: &str, params: &Value) -> Result<Value, ClientError> {
        let response = self
            .http
            .post(format!("{}/api/{method}", self.base))
            .header("X-API-Key", &self.api_key)
            .json(params)
            .send()
            .await?;
        let status = response.status();
        let body = response.bytes().await?;
        let envelope: Envelope = match serde_json::from_slice(&body) {
            Ok(envelope) => envelope,
            Err(_) if !status.is_success() => {
                return Err(ClientError::Http {
                    status: status.as_u16(),
                    body: String::from_utf8_lossy(&body).into(),
                });
            }
            Err(err) => return Err(ClientError::Decode(err.to_string())),
        };
        if let Some(error) = envelope.error {
            return Err(ClientError::Api {
                code: error.code,
                message: error.message,
                detail: error.detail,
            });
        }
        if !status.is_success() {
            return Err(ClientError::Http {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body).into(),
            });
        }
        Ok(envelope.result.unwrap_or(Value::Null))
    }

    pub async fn publish(
        &self,
        channel: &str,
        data: &Value,
        options: &PublishOptions,
    ) -> Result<PublishResult, ClientError> {
        let mut params = json!({ "channel": channel, "data": data });
        if let Some(key) = &options.idempotency_key {
            params["idempotency_key"] = json!(key);
        }
        if options.skip_history {
            params["skip_history"] = json!(true);
        }
        if !options.tags.is_empty() {
            params["tags"] = json!(options.tags);
        }
        let result = self.call("publish", &params).await?;
        serde_json::from_value(result).map_err(|e| ClientError::Decode(e.to_string()))
    }

    pub async fn history(
        &self,
        channel: &str,
        options: &HistoryOptions,
    ) -> Result<HistoryPage, ClientError> {
        let mut params =
            json!({ "channel": channel, "limit": options.limit, "reverse": options.reverse });
        if let Some((offset, epoch)) = &options.since {
            params["since"] = json!({ "offset": offset, "epoch": epoch });
        }
        let result = self.call("history", &params).await?;
        serde_json::from_value(result).map_err(|e| ClientError::Decode(e.to_string()))
    }
}
