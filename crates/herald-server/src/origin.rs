//! Which web pages may open real-time connections, and CORS for them and for the server API.
//!
//! Browsers attach cookies to a cross-site WebSocket handshake or EventSource request, so
//! without an origin check any site a user visits could act as that user (cross-site
//! WebSocket hijacking). The rule for `/connection/*`: a request without `Origin` (not a
//! browser) passes; a browser request passes when its origin is the server's own (same host
//! and port) or matches `[client] allowed_origins`; anything else gets 403 before any upgrade.
//! Allowed cross-origin requests get CORS headers (with credentials, for the token cookie),
//! and their preflights are answered. `[api] cors_origins` does the same for `/api/*`.
//!
//! May touch: request and response headers only.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Origins allowed to connect, as configured: `https://app.example.com` (exact),
/// `https://*.example.com` (any subdomain), or `*` (any origin).
#[derive(Clone, Debug, Default)]
pub struct OriginPolicy {
    patterns: Vec<String>,
    /// Headers a preflight may ask for.
    allow_headers: &'static str,
    allow_methods: &'static str,
}

impl OriginPolicy {
    pub fn realtime(patterns: &[String]) -> Arc<Self> {
        Arc::new(Self {
            patterns: patterns.iter().map(|p| p.to_ascii_lowercase()).collect(),
            allow_headers: "authorization, last-event-id, content-type",
            allow_methods: "GET",
        })
    }

    pub fn api(patterns: &[String]) -> Arc<Self> {
        Arc::new(Self {
            patterns: patterns.iter().map(|p| p.to_ascii_lowercase()).collect(),
            allow_headers: "authorization, x-api-key, content-type",
            allow_methods: "POST",
        })
    }

    /// How the configured patterns admit `origin` (lowercase, no path).
    fn admits(&self, origin: &str) -> Admission {
        if self.listed(origin) {
            Admission::Listed
        } else if self.patterns.iter().any(|p| p == "*") {
            Admission::Anyone
        } else {
            Admission::Refused
        }
    }

    /// Whether a pattern other than `*` names `origin`.
    fn listed(&self, origin: &str) -> bool {
        self.patterns.iter().any(|pattern| {
            if pattern == origin {
                return true;
            }
            // `scheme://*.domain[:port]`: one or more labels in front of `.domain`.
            match pattern.split_once("://*.") {
                Some((scheme, rest)) => origin
                    .strip_prefix(scheme)
                    .and_then(|o| o.strip_prefix("://"))
                    .and_then(|host| host.strip_suffix(rest))
                    .is_some_and(|labels| labels.len() > 1 && labels.ends_with('.')),
                None => false,
            }
        })
    }
}

/// How an origin is let in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Admission {
    /// Named in the config: CORS with credentials (the token cookie may be used).
    Listed,
    /// Only through `*`: any site, so without credentials — the request's cookies are
    /// dropped, and a logged-in user's token cookie cannot be used by whatever site they visit.
    Anyone,
    Refused,
}

/// The authority (`host[:port]`) of an origin like `https://host:port`.
fn authority(origin: &str) -> Option<&str> {
    origin.split_once("://").map(|(_, rest)| rest)
}

/// Same origin: the page was served by this server (its Host).
fn same_origin(origin: &str, headers: &HeaderMap) -> bool {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_ascii_lowercase);
    matches!((authority(origin), host), (Some(a), Some(h)) if a == h)
}

fn refuse(origin: &str) -> Response {
    let body = serde_json::json!({"error": {
        "code": 103,
        "message": "permission denied",
        "detail": format!("origin {origin:?} is not allowed: add it to allowed_origins"),
    }});
    (
        StatusCode::FORBIDDEN,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn add_cors(headers: &mut HeaderMap, origin: &HeaderValue, credentials: bool) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    if credentials {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
}

/// The middleware: checks `Origin`, answers preflights, adds CORS headers.
pub async fn check_origin(
    State(policy): State<Arc<OriginPolicy>>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(origin_value) = request.headers().get(header::ORIGIN).cloned() else {
        return next.run(request).await;
    };
    let origin = origin_value
        .to_str()
        .unwrap_or_default()
        .to_ascii_lowercase();
    if same_origin(&origin, request.headers()) {
        return next.run(request).await;
    }
    let admission = policy.admits(&origin);
    if admission == Admission::Refused {
        tracing::debug!(origin, path = %request.uri().path(), "origin refused");
        return refuse(&origin);
    }
    let credentials = admission == Admission::Listed;
    if !credentials {
        request.headers_mut().remove(header::COOKIE);
    }
    if request.method() == Method::OPTIONS {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::NO_CONTENT;
        let headers = response.headers_mut();
        add_cors(headers, &origin_value, credentials);
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(policy.allow_methods),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(policy.allow_headers),
        );
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        return response;
    }
    let mut response = next.run(request).await;
    add_cors(response.headers_mut(), &origin_value, credentials);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_exact_wildcard_subdomains_and_star() {
        let policy = OriginPolicy::realtime(&[
            "https://app.example.com".into(),
            "https://*.example.org".into(),
            "http://localhost:3000".into(),
        ]);
        assert!(policy.listed("https://app.example.com"));
        assert!(!policy.listed("http://app.example.com"), "scheme matters");
        assert!(!policy.listed("https://app.example.com.evil.net"));
        assert!(policy.listed("https://a.example.org"));
        assert!(policy.listed("https://a.b.example.org"));
        assert!(
            !policy.listed("https://example.org"),
            "a subdomain is required"
        );
        assert!(!policy.listed("https://evilexample.org"));
        assert!(policy.listed("http://localhost:3000"));
        assert!(!policy.listed("http://localhost:3001"));
        assert_eq!(
            OriginPolicy::realtime(&["*".into()]).admits("https://anything.test"),
            Admission::Anyone
        );
        assert_eq!(policy.admits("https://a.example.org"), Admission::Listed);
        assert_eq!(
            OriginPolicy::realtime(&[]).admits("https://anything.test"),
            Admission::Refused
        );
    }

    #[test]
    fn same_origin_compares_the_host_header() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::HOST,
            HeaderValue::from_static("herald.example:8000"),
        );
        assert!(same_origin("https://herald.example:8000", &headers));
        assert!(!same_origin("https://herald.example:8001", &headers));
        assert!(!same_origin("null", &headers));
    }
}
