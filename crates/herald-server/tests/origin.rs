//! Origin checks on every real-time endpoint (cross-site WebSocket hijacking) and CORS for
//! allowed pages and for the server API, against a real server.

mod common;

use common::TestServer;
use herald_server::config::Engine;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "origin-test-secret-0123456789abcdef01";

fn token() -> String {
    let now = herald_core::time::now_ms() / 1000;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "alice", "exp": now + 600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

async fn server() -> TestServer {
    let mut config = common::test_config(Engine::Memory);
    config.token.hmac_secret = SECRET.into();
    config.client.allowed_origins = vec![
        "https://app.example.com".into(),
        "https://*.example.org".into(),
    ];
    config.api.cors_origins = vec!["https://admin.example.com".into()];
    TestServer::start_with(config, None).await
}

/// The WebSocket handshake's HTTP status with this Origin (None: no Origin header).
async fn ws_status(server: &TestServer, path: &str, origin: Option<&str>) -> u16 {
    let url = format!("{}{path}", server.url.replace("http://", "ws://"));
    let mut request = url.into_client_request().expect("request");
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().expect("header"));
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            if response.status().as_u16() == 403 {
                assert!(body.contains("is not allowed"), "a JSON reason: {body}");
            }
            response.status().as_u16()
        }
        Err(other) => panic!("handshake failed: {other}"),
    }
}

#[tokio::test]
async fn websockets_from_other_sites_are_refused_before_the_upgrade() {
    let server = server().await;
    let own = server.url.clone();
    let uni = format!("/connection/uni_websocket?channel=news&token={}", token());
    for path in ["/connection/websocket", uni.as_str()] {
        for (origin, expected) in [
            (None, 101),
            (Some(own.as_str()), 101),
            (Some("https://app.example.com"), 101),
            (Some("https://a.b.example.org"), 101),
            (Some("https://evil.example"), 403),
            (Some("https://app.example.com.evil.example"), 403),
            (Some("http://app.example.com"), 403),
            (Some("null"), 403),
        ] {
            assert_eq!(
                ws_status(&server, path, origin).await,
                expected,
                "{path} from {origin:?}"
            );
        }
    }
}

#[tokio::test]
async fn one_way_streams_get_cors_for_allowed_pages_only() {
    let server = server().await;
    let client = reqwest::Client::new();
    let url = format!("{}/connection/poll?channel=news&timeout=0", server.url);
    let allowed = client
        .get(&url)
        .header("origin", "https://app.example.com")
        .bearer_auth(token())
        .send()
        .await
        .expect("request");
    assert_eq!(allowed.status().as_u16(), 200);
    let headers = allowed.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(headers["access-control-allow-credentials"], "true");
    let refused = client
        .get(&url)
        .header("origin", "https://evil.example")
        .bearer_auth(token())
        .send()
        .await
        .expect("request");
    assert_eq!(refused.status().as_u16(), 403);
    assert!(
        refused
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    // A fetch() with an Authorization header is preflighted.
    let preflight = client
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/connection/stream?channel=news", server.url),
        )
        .header("origin", "https://x.example.org")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .expect("preflight");
    assert_eq!(preflight.status().as_u16(), 204);
    let headers = preflight.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://x.example.org"
    );
    assert!(
        headers["access-control-allow-headers"]
            .to_str()
            .is_ok_and(|h| h.contains("authorization"))
    );
}

#[tokio::test]
async fn the_server_api_answers_listed_origins_only() {
    let server = server().await;
    let client = reqwest::Client::new();
    let publish = |origin: &'static str| {
        client
            .post(format!("{}/api/publish", server.url))
            .header("origin", origin)
            .header("x-api-key", "test-api-key-0123456789")
            .json(&json!({"channel": "news", "data": 1}))
            .send()
    };
    let allowed = publish("https://admin.example.com").await.expect("request");
    assert_eq!(allowed.status().as_u16(), 200);
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://admin.example.com"
    );
    // Real-time origins are not API origins.
    let other = publish("https://app.example.com").await.expect("request");
    assert_eq!(other.status().as_u16(), 403);
    let preflight = client
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/api/publish", server.url),
        )
        .header("origin", "https://admin.example.com")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "x-api-key, content-type")
        .send()
        .await
        .expect("preflight");
    assert_eq!(preflight.status().as_u16(), 204);
    assert_eq!(preflight.headers()["access-control-allow-methods"], "POST");
}

#[tokio::test]
async fn a_star_admits_any_site_but_without_the_users_cookies() {
    let mut config = common::test_config(Engine::Memory);
    config.token.hmac_secret = SECRET.into();
    config.client.allowed_origins = vec!["*".into()];
    let server = TestServer::start_with(config, None).await;
    let url = format!("{}/connection/poll?channel=news&timeout=0", server.url);
    let client = reqwest::Client::new();
    // A token in the cookie, sent by the browser from whatever site the user visits: not
    // used, so the request is anonymous (401).
    let with_cookie = client
        .get(&url)
        .header("origin", "https://any.site")
        .header("cookie", format!("herald_token={}", token()))
        .send()
        .await
        .expect("request");
    assert_eq!(with_cookie.status().as_u16(), 401);
    assert_eq!(
        with_cookie.headers()["access-control-allow-origin"],
        "https://any.site"
    );
    assert!(
        with_cookie
            .headers()
            .get("access-control-allow-credentials")
            .is_none()
    );
    // A token the page holds itself (header or query) works from any site.
    let with_header = client
        .get(&url)
        .header("origin", "https://any.site")
        .bearer_auth(token())
        .send()
        .await
        .expect("request");
    assert_eq!(with_header.status().as_u16(), 200);
    // The server's own pages still use the cookie.
    let own = client
        .get(&url)
        .header("origin", server.url.clone())
        .header("cookie", format!("herald_token={}", token()))
        .send()
        .await
        .expect("request");
    assert_eq!(own.status().as_u16(), 200);
}
