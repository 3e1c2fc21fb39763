//! The server HTTP API: `POST /api/<method>` with an API key, Centrifugo's server API shape.
//!
//! Owns request authentication, body limits, JSON decoding, the mapping from
//! [`HeraldError`] to HTTP responses, and `/api/batch`. Method bodies live in
//! [`methods`]; they only call the [`herald_core::Node`] facade.
//!
//! Status codes: API-level errors are `200` with `{"error":{code,message,detail}}` (what
//! Centrifugo's clients expect); malformed JSON is `400`, a bad or missing key `401`, an
//! unknown method `404`, a body or publication over the limit `413` — each with the same
//! JSON error body.

pub mod methods;
pub mod types;

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_core::error::{ErrorCode, HeraldError};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::app::AppState;
use crate::auth::{ApiKeys, KeyMatch};

/// An error on its way to the HTTP client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub error: HeraldError,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, detail: impl Into<String>) -> Self {
        Self {
            status,
            error: HeraldError::new(code, detail),
        }
    }

    /// API-level errors keep HTTP 200 (what Centrifugo's clients expect), except an
    /// unreachable engine: 503, so load balancers and retrying clients see it for what it is.
    pub fn from_node(error: HeraldError) -> Self {
        let status = if error.unavailable {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        Self { status, error }
    }

    /// Publication data over `server.max_publication_size`: 413, like an oversized body.
    pub fn payload_too_large(size: usize, limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::LimitExceeded,
            format!("publication data is {size} bytes; the limit is {limit}"),
        )
    }

    pub fn bad_json(err: &serde_json::Error) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            format!("malformed JSON: {err}"),
        )
    }
}

/// The body every error uses.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub code: u32,
    pub message: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl From<&HeraldError> for ErrorBody {
    fn from(error: &HeraldError) -> Self {
        Self {
            code: error.code.as_u32(),
            message: error.code.message(),
            detail: error.detail.clone(),
        }
    }
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: &'a ErrorBody,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody::from(&self.error);
        let mut response = json_response(self.status, &ErrorEnvelope { error: &body });
        if matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

/// Whether `key` may publish now (`api.publish_rate_per_key`), for `publish` and `broadcast`.
fn publish_allowed(state: &AppState, key: &KeyMatch, method: &str) -> bool {
    !matches!(method, "publish" | "broadcast")
        || state
            .publish_rate
            .try_take(&*key.name, std::time::Instant::now())
}

fn rate_limited() -> HeraldError {
    HeraldError::new(
        ErrorCode::TooManyRequests,
        "over api.publish_rate_per_key for this key",
    )
}

pub fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(bytes) => Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(bytes))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Extracts the API key from `X-API-Key`, `Authorization: apikey <key>` or `?api_key=`.
fn presented_key<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<&'a str> {
    if let Some(value) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(value.trim());
    }
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let mut parts = value.trim().splitn(2, ' ');
        if let (Some(scheme), Some(key)) = (parts.next(), parts.next())
            && scheme.eq_ignore_ascii_case("apikey")
        {
            return Some(key.trim());
        }
    }
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("api_key="))
}

/// The key the request presents, checked: its scope and name.
pub fn authorize(
    keys: &ApiKeys,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<KeyMatch, ApiError> {
    match presented_key(headers, query) {
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "missing API key: send X-API-Key or Authorization: apikey <key>",
        )),
        Some(key) => keys.verify(key).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "invalid API key",
            )
        }),
    }
}

/// A method outside the key's scope: HTTP 403 with error 103.
fn out_of_scope(key: &KeyMatch, method: &str) -> HeraldError {
    HeraldError::new(
        ErrorCode::PermissionDenied,
        format!(
            "the API key {:?} has the {} scope, which does not allow {method:?}",
            key.name, key.scope
        ),
    )
}

/// Reads the body up to the configured limit.
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|err| {
        let too_large = std::error::Error::source(&err)
            .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::LimitExceeded,
                format!("request body is larger than {limit} bytes"),
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                format!("could not read body: {err}"),
            )
        }
    })
}

/// `POST /api/{method}`.
pub async fn handle(
    State(state): State<Arc<AppState>>,
    Path(method): Path<String>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let response = handle_inner(&state, &method, uri.query(), &headers, body).await;
    let response = match response {
        Ok(response) => response,
        Err(err) => err.into_response(),
    };
    state
        .metrics
        .api_request(&method, response.status().as_u16(), started.elapsed());
    response
}

async fn handle_inner(
    state: &AppState,
    method: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = authorize(&state.api_keys.read(), headers, query)?;
    if !methods::is_known(method) && method != "batch" {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::MethodNotFound,
            format!("no API method {method:?}"),
        ));
    }
    if method != "batch" && !publish_allowed(state, &key, method) {
        let error = rate_limited();
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            error.code,
            error.detail,
        ));
    }
    if method != "batch" && !key.scope.allows(method) {
        let error = out_of_scope(&key, method);
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            error.code,
            error.detail,
        ));
    }
    let body = read_body(body, state.config.server.max_body_size).await?;
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &body
    };
    if method == "batch" {
        return batch(state, &key, body).await;
    }
    let params: &RawValue = serde_json::from_slice(body).map_err(|e| ApiError::bad_json(&e))?;
    let result = methods::call(state, method, params).await?;
    Ok(raw_envelope("result", &result))
}

fn raw_envelope(key: &str, raw: &RawValue) -> Response {
    let mut out = Vec::with_capacity(raw.get().len() + key.len() + 8);
    out.extend_from_slice(b"{\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
    out.extend_from_slice(raw.get().as_bytes());
    out.push(b'}');
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(out))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Most commands accepted in one batch.
pub const MAX_BATCH_COMMANDS: usize = 1000;

async fn batch(state: &AppState, key: &KeyMatch, body: &[u8]) -> Result<Response, ApiError> {
    let params: types::BatchParams =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_json(&e))?;
    if params.commands.len() > MAX_BATCH_COMMANDS {
        return Err(ApiError::new(
            StatusCode::OK,
            ErrorCode::LimitExceeded,
            format!("a batch holds at most {MAX_BATCH_COMMANDS} commands"),
        ));
    }
    let run = |command: std::collections::HashMap<String, Box<RawValue>>| async move {
        let mut entries = command.into_iter();
        match (entries.next(), entries.next()) {
            (Some((method, _)), None)
                if methods::is_known(&method) && !key.scope.allows(&method) =>
            {
                Err(out_of_scope(key, &method))
            }
            (Some((method, _)), None) if !publish_allowed(state, key, &method) => {
                Err(rate_limited())
            }
            (Some((method, params)), None) if method != "batch" && methods::is_known(&method) => {
                match methods::call(state, &method, &params).await {
                    Ok(result) => Ok((method, result)),
                    Err(err) => Err(err.error),
                }
            }
            (Some((method, _)), None) => Err(HeraldError::new(
                ErrorCode::MethodNotFound,
                format!("no API method {method:?}"),
            )),
            _ => Err(HeraldError::bad_request(
                "each batch command is an object with exactly one method key",
            )),
        }
    };
    let replies: Vec<_> = if params.parallel {
        futures::future::join_all(params.commands.into_iter().map(run)).await
    } else {
        let mut replies = Vec::with_capacity(params.commands.len());
        for command in params.commands {
            replies.push(run(command).await);
        }
        replies
    };
    let mut out = Vec::with_capacity(64 * replies.len() + 16);
    out.extend_from_slice(b"{\"replies\":[");
    for (i, reply) in replies.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match reply {
            Ok((method, raw)) => {
                out.extend_from_slice(b"{\"");
                out.extend_from_slice(method.as_bytes());
                out.extend_from_slice(b"\":");
                out.extend_from_slice(raw.get().as_bytes());
                out.push(b'}');
            }
            Err(error) => {
                let body = ErrorBody::from(error);
                let encoded = serde_json::to_vec(&ErrorEnvelope { error: &body }).map_err(|e| {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        ErrorCode::Internal,
                        e.to_string(),
                    )
                })?;
                out.extend_from_slice(&encoded);
            }
        }
    }
    out.extend_from_slice(b"]}");
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(out))
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                e.to_string(),
            )
        })
}
