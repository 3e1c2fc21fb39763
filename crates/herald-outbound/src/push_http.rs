//! What the APNs and FCM senders share about talking HTTP to a provider: classifying
//! transport errors, reading `Retry-After`, reading a bounded error body, normalising base
//! URLs.
//!
//! Owns: nothing. May touch: the response it is given.

use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderMap, RETRY_AFTER};

use crate::sender::SendError;

/// Error bodies are small JSON documents; anything longer is cut here.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// A request that got no answer: worth retrying, except a request we could not even build.
pub(crate) fn transport_error(provider: &str, error: &reqwest::Error) -> SendError {
    if error.is_builder() {
        return SendError::Rejected {
            reason: format!("{provider}: invalid request: {error}"),
        };
    }
    let what = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    SendError::Retry {
        reason: format!("{provider}: {what}: {error}"),
        after: None,
    }
}

/// `Retry-After` as delay-seconds or an HTTP date (relative to `now`).
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The body of an error response, at most [`MAX_ERROR_BODY`] bytes (a failed read yields
/// what arrived: the status alone still classifies the answer).
pub(crate) async fn error_body(mut response: reqwest::Response) -> Bytes {
    let mut body = BytesMut::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = MAX_ERROR_BODY.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    body.freeze()
}

/// A base URL without its trailing slash; only `http` and `https` are accepted.
pub(crate) fn base_url(url: &str) -> Result<String, String> {
    let trimmed = url.trim().trim_end_matches('/');
    let parsed = reqwest::Url::parse(trimmed).map_err(|e| format!("invalid URL {url:?}: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(format!(
            "invalid URL {url:?}: expected http(s)://host[:port]"
        ));
    }
    Ok(trimmed.to_owned())
}
