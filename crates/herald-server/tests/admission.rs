//! The one admission path, against a real HTTP backend (an axum app in the test): in a
//! namespace with `proxy_subscribe`, every transport — the WebSocket, SSE, HTTP streaming,
//! long-poll and the uni-directional WebSocket — gets the backend's decision (grant, refusal
//! with the backend's code, disconnect, down, timed out), and the backend is told which
//! transport asks. In a namespace with `proxy_publish`, client publications get the backend's
//! decision too. Before the admission path was one, the one-way transports decided with the
//! permission rules alone and streamed channels the backend refused.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::http::HeaderMap;
use common::TestServer;
use common::subscribe::{Outcome, Transport, subscribe};
use common::ws::command;
use futures::StreamExt;
use herald_server::config::{Config, Engine};
use parking_lot::Mutex;
use serde_json::{Value, json};

const SECRET: &str = "admission-test-secret-0123456789abcdef";

/// Subscribe requests the backend saw: (transport, channel, user, the `x-trace` header).
type Seen = Arc<Mutex<Vec<(String, String, String, String)>>>;

/// The application's backend. Subscriptions: `secret:open` granted with `chan_info`,
/// `secret:payroll` refused with the backend's own code 403, `secret:banned` answered with a
/// disconnect (4501), `secret:slow` answered after the proxy timeout. Publications:
/// `secret:open` rewritten, `secret:payroll` refused (4004), `secret:slow` too late.
async fn backend(seen: Seen) -> String {
    let app = axum::Router::new()
        .route(
            "/subscribe",
            axum::routing::post(move |headers: HeaderMap, Json(body): Json<Value>| {
                let seen = seen.clone();
                async move {
                    let text = |key: &str| body[key].as_str().unwrap_or_default().to_owned();
                    let trace = headers
                        .get("x-trace")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    seen.lock()
                        .push((text("transport"), text("channel"), text("user"), trace));
                    Json(match body["channel"].as_str() {
                        Some("secret:open") => json!({"result": {"info": {"role": "reader"}}}),
                        Some("secret:banned") => {
                            json!({"disconnect": {"code": 4501, "reason": "banned"}})
                        }
                        Some("secret:slow") => {
                            tokio::time::sleep(Duration::from_secs(3)).await;
                            json!({"result": {}})
                        }
                        _ => json!({"error": {"code": 403, "message": "not for you"}}),
                    })
                }
            }),
        )
        .route(
            "/publish",
            axum::routing::post(|Json(body): Json<Value>| async move {
                Json(match body["channel"].as_str() {
                    Some("secret:open") => json!({"result": {"data": {"checked": body["data"]}}}),
                    Some("secret:slow") => {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        json!({"result": {}})
                    }
                    _ => json!({"error": {"code": 4004, "message": "not allowed"}}),
                })
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    url
}

/// An address where nothing listens (bound, then released).
async fn nobody_listening() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    url
}

fn config(backend: &str) -> Config {
    let mut config = common::test_config(Engine::Memory);
    config.token.hmac_secret = SECRET.into();
    config.proxy.subscribe_endpoint = format!("{backend}/subscribe");
    config.proxy.publish_endpoint = format!("{backend}/publish");
    config.proxy.timeout = herald_core::duration::HumanDuration(Duration::from_millis(300));
    config.proxy.http_headers = vec!["X-Trace".into()];
    config
        .namespaces
        .push(herald_core::namespace::NamedNamespace {
            name: "secret".into(),
            options: herald_core::NamespaceOptions {
                proxy_subscribe: true,
                proxy_publish: true,
                ..Default::default()
            },
        });
    config
}

fn token(user: &str) -> String {
    let claims = json!({"sub": user, "exp": herald_core::time::now_ms() / 1000 + 600});
    common::hs256(SECRET, &claims)
}

/// What each transport must answer, per channel: the WebSocket's error code, and a one-way
/// transport's HTTP status with the same code in its body.
fn refused(transport: Transport, code: u64, status: u16) -> Outcome {
    Outcome::Refused {
        status: (transport != Transport::WebSocket).then_some(status),
        code,
    }
}

#[tokio::test]
async fn every_transport_gets_the_backends_subscribe_decision() {
    let seen = Seen::default();
    let server = TestServer::start_with(config(&backend(seen.clone()).await), None).await;
    let mut failures = Vec::new();
    for transport in Transport::ALL {
        let cases = [
            ("secret:open", Outcome::Allowed),
            // The reproduction: refused over the WebSocket, streamed over SSE.
            ("secret:payroll", refused(transport, 403, 403)),
            // A disconnect: the WebSocket closes with the backend's code; a one-way request
            // is refused with it.
            ("secret:banned", refused(transport, 4501, 403)),
            // Timed out: temporary (100), 503 before streaming.
            ("secret:slow", refused(transport, 100, 503)),
            // A user-limited channel admits only its user, whatever the backend would say.
            ("secret:#bob", refused(transport, 103, 403)),
        ];
        for (channel, expected) in cases {
            let outcome = subscribe(&server, transport, Some(token("alice")), channel).await;
            if outcome != expected {
                failures.push(format!(
                    "{transport:?} on {channel}: {outcome:?}, expected {expected:?}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The backend was asked by every transport, under its own name, as alice; never for the
    // user-limited channel.
    let seen = seen.lock().clone();
    for transport in Transport::ALL {
        for channel in [
            "secret:open",
            "secret:payroll",
            "secret:banned",
            "secret:slow",
        ] {
            assert!(
                seen.iter().any(|(t, c, u, _)| t == transport.proxy_name()
                    && c == channel
                    && u == "alice"),
                "the backend never saw {transport:?} ({}) ask for {channel}: {seen:?}",
                transport.proxy_name()
            );
        }
    }
    assert!(
        !seen.iter().any(|(_, c, _, _)| c == "secret:#bob"),
        "{seen:?}"
    );
}

/// A one-way request passes the configured headers to the backend, and a refused channel's
/// publications never reach the client.
#[tokio::test]
async fn a_refused_one_way_client_gets_nothing_and_the_backend_sees_its_headers() {
    let seen = Seen::default();
    let server = TestServer::start_with(config(&backend(seen.clone()).await), None).await;
    let response = reqwest::Client::new()
        .get(format!("{}/connection/sse", server.url))
        .query(&[("channel", "secret:payroll")])
        .bearer_auth(token("alice"))
        .header("X-Trace", "trace-42")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 403);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], 403, "{body}");
    assert_eq!(body["error"]["message"], "not for you", "{body}");
    assert!(
        seen.lock()
            .iter()
            .any(|(t, c, _, trace)| t == "sse" && c == "secret:payroll" && trace == "trace-42"),
        "{:?}",
        seen.lock()
    );

    // Granted: the stream opens, with the backend's info as chan_info in the join.
    let response = reqwest::Client::new()
        .get(format!("{}/connection/stream", server.url))
        .query(&[("channel", "secret:open")])
        .bearer_auth(token("alice"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 200);
    let mut body = response.bytes_stream();
    let _connected = tokio::time::timeout(Duration::from_secs(5), body.next())
        .await
        .expect("connected within 5s");
    server
        .ok(
            "publish",
            json!({"channel": "secret:payroll", "data": {"salary": 1}}),
        )
        .await;
    server
        .ok(
            "publish",
            json!({"channel": "secret:open", "data": {"n": 1}}),
        )
        .await;
    let mut text = String::new();
    while !text.contains("\"n\":1") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.next())
            .await
            .expect("the open channel's publication within 5s")
            .expect("open")
            .expect("chunk");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(!text.contains("salary"), "{text}");
}

/// With the backend down, every transport refuses temporarily (100; 503 before streaming):
/// nothing falls back to the permission rules.
#[tokio::test]
async fn a_backend_that_is_down_refuses_temporarily_on_every_transport() {
    let server = TestServer::start_with(config(&nobody_listening().await), None).await;
    for transport in Transport::ALL {
        let outcome = subscribe(&server, transport, Some(token("alice")), "secret:open").await;
        assert_eq!(outcome, refused(transport, 100, 503), "{transport:?}");
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A connected WebSocket as `user`.
async fn connected(server: &TestServer, user: &str) -> Socket {
    let url = format!(
        "{}/connection/websocket",
        server.url.replace("http://", "ws://")
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.expect("ws");
    let reply = command(&mut socket, 1, json!({"connect": {"token": token(user)}})).await;
    assert!(reply["connect"].is_object(), "{reply}");
    socket
}

/// Client publications in a `proxy_publish` namespace: granted (and rewritten), refused with
/// the backend's code, timed out and down (100, temporary).
#[tokio::test]
async fn client_publications_get_the_backends_decision() {
    let server = TestServer::start_with(config(&backend(Seen::default()).await), None).await;
    let mut socket = connected(&server, "alice").await;
    let publish = |channel: &str| json!({"publish": {"channel": channel, "data": {"v": 1}}});
    let granted = command(&mut socket, 2, publish("secret:open")).await;
    assert!(granted["publish"].is_object(), "{granted}");
    let history = server
        .ok("history", json!({"channel": "secret:open", "limit": 10}))
        .await;
    assert_eq!(
        history["publications"][0]["data"],
        json!({"checked": {"v": 1}}),
        "the backend's rewrite is what was published: {history}"
    );
    let refused = command(&mut socket, 3, publish("secret:payroll")).await;
    assert_eq!(refused["error"]["code"], 4004, "{refused}");
    let slow = command(&mut socket, 4, publish("secret:slow")).await;
    assert_eq!(slow["error"]["code"], 100, "{slow}");
    assert_eq!(slow["error"]["temporary"], true, "{slow}");
    let nothing = server
        .ok("history", json!({"channel": "secret:payroll", "limit": 10}))
        .await;
    assert_eq!(nothing["publications"], json!([]), "{nothing}");

    let down = TestServer::start_with(config(&nobody_listening().await), None).await;
    let mut socket = connected(&down, "alice").await;
    let reply = command(&mut socket, 2, publish("secret:open")).await;
    assert_eq!(reply["error"]["code"], 100, "{reply}");
}
