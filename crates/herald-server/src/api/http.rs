//! The HTTP adapter of the server API: `POST /api/<method>` with an API key, Centrifugo's
//! server API shape. It reads the key and the body, decodes the JSON into a typed
//! [`Request`], lets the layer ([`super`]) admit and run it, and writes `{"result": ...}`
//! (or `batch`'s `{"replies": [...]}`) or the error.
//!
//! Status codes, from the layer's [`Fault`]: API-level errors are `200` with
//! `{"error":{code,message,detail}}` (what Centrifugo's clients expect) except an unreachable
//! engine, `503`; malformed JSON is `400`, a bad or missing key `401`, a method outside the
//! key's scope `403`, an unknown method `404`, a body or publication over the limit `413`,
//! over the publish rate `429` — each with the same JSON error body.
//!
//! May touch: the request and response; everything else through the layer.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_core::error::{ErrorCode, HeraldError};
use serde::Serialize;
use serde_json::value::RawValue;

use super::{CallError, ErrorBody, Fault, Method, Reply, Request};
use crate::app::AppState;

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
        CallError::from(error).into()
    }

    pub fn bad_json(err: &serde_json::Error) -> Self {
        super::malformed(err).into()
    }
}

impl From<CallError> for ApiError {
    fn from(call: CallError) -> Self {
        let status = match call.fault {
            Fault::Method if call.error.unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Fault::Method => StatusCode::OK,
            Fault::Malformed => StatusCode::BAD_REQUEST,
            Fault::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Fault::Unauthenticated => StatusCode::UNAUTHORIZED,
            Fault::UnknownMethod => StatusCode::NOT_FOUND,
            Fault::OutOfScope => StatusCode::FORBIDDEN,
            Fault::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        };
        Self {
            status,
            error: call.error,
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
        && let Some(key) = apikey_scheme(value)
    {
        return Some(key);
    }
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("api_key="))
}

/// The key in an `Authorization: apikey <key>` value (scheme case-insensitive), shared with
/// the gRPC adapter's `authorization` metadata.
pub fn apikey_scheme(value: &str) -> Option<&str> {
    let mut parts = value.trim().splitn(2, ' ');
    match (parts.next(), parts.next()) {
        (Some(scheme), Some(key)) if scheme.eq_ignore_ascii_case("apikey") => Some(key.trim()),
        _ => None,
    }
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
    Path(name): Path<String>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let method = Method::from_name(&name);
    let response = match handle_inner(&state, &name, method, uri.query(), &headers, body).await {
        Ok(response) => response,
        Err(err) => err.into_response(),
    };
    state
        .metrics
        .api_request(method, response.status().as_u16(), started.elapsed());
    response
}

async fn handle_inner(
    state: &AppState,
    name: &str,
    method: Option<Method>,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = super::authenticate(
        &state.api_keys.read(),
        presented_key(headers, query),
        "send X-API-Key or Authorization: apikey <key>",
    )?;
    let method = method.ok_or_else(|| super::unknown_method(name))?;
    super::admit(state, &key, method)?;
    let body = read_body(body, state.config.server.max_body_size).await?;
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &body
    };
    let params: &RawValue = serde_json::from_slice(body).map_err(|e| ApiError::bad_json(&e))?;
    super::available(state, method)?;
    let request = Request::from_json(method, params).map_err(|e| ApiError::bad_json(&e))?;
    let reply = super::execute(state, &key, request).await?;
    Ok(match &reply {
        // `batch` answers `{"replies": [...]}` at the top level, as Centrifugo does.
        Reply::Batch(_) => json_response(StatusCode::OK, &reply),
        _ => json_response(StatusCode::OK, &ResultEnvelope { result: &reply }),
    })
}

#[derive(Serialize)]
struct ResultEnvelope<'a> {
    result: &'a Reply,
}
