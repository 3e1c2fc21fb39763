//! The backend proxy against a real HTTP backend (an axum app in the test): connect without a
//! token decided by the backend (with passed-through headers, its errors and disconnects),
//! refresh at expiry, subscribe and publish decisions in proxied namespaces (with `chan_info`
//! and rewritten data), rpc, and a clear temporary error when the backend is down.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::http::HeaderMap;
use common::TestServer;
use futures::{SinkExt, StreamExt};
use herald_server::config::{Config, Engine};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[derive(Default)]
struct Calls {
    refresh: AtomicUsize,
    /// Refreshes of the user whose backend answers with an expiry already past.
    stale_refresh: AtomicUsize,
    publish: AtomicUsize,
}

/// The application's backend: decides from the `Authorization` header Herald passes on.
async fn backend(calls: Arc<Calls>) -> String {
    let refresh_calls = calls.clone();
    let publish_calls = calls.clone();
    let app = axum::Router::new()
        .route(
            "/connect",
            axum::routing::post(|headers: HeaderMap, Json(body): Json<Value>| async move {
                assert_eq!(body["transport"], "websocket");
                assert!(body["client"].as_str().is_some_and(|c| !c.is_empty()));
                let auth = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let now = herald_core::time::now_ms() / 1000;
                Json(match auth.as_str() {
                    "Bearer good" => json!({"result": {
                        "user": "alice", "expire_at": now + 2, "info": {"plan": "pro"},
                        "channels": ["news"], "data": {"hello": body["data"]["name"]}
                    }}),
                    "Bearer banned" => json!({"disconnect": {"code": 4501, "reason": "banned"}}),
                    "Bearer stale" => json!({"result": {"user": "stale", "expire_at": now + 1}}),
                    _ => json!({"error": {"code": 4001, "message": "log in first"}}),
                })
            }),
        )
        .route(
            "/refresh",
            axum::routing::post(move |Json(body): Json<Value>| {
                let calls = refresh_calls.clone();
                async move {
                    let now = herald_core::time::now_ms() / 1000;
                    if body["user"] == "stale" {
                        calls.stale_refresh.fetch_add(1, Ordering::SeqCst);
                        return Json(json!({"result": {"expire_at": now - 5}}));
                    }
                    assert_eq!(body["user"], "alice");
                    calls.refresh.fetch_add(1, Ordering::SeqCst);
                    Json(json!({"result": {"expire_at": now + 60}}))
                }
            }),
        )
        .route(
            "/subscribe",
            axum::routing::post(|Json(body): Json<Value>| async move {
                Json(match body["channel"].as_str() {
                    Some("app:open") => json!({"result": {"info": {"role": "reader"}}}),
                    _ => json!({"error": {"code": 4003, "message": "not yours"}}),
                })
            }),
        )
        .route(
            "/publish",
            axum::routing::post(move |Json(body): Json<Value>| {
                let calls = publish_calls.clone();
                async move {
                    calls.publish.fetch_add(1, Ordering::SeqCst);
                    Json(match body["data"]["text"].as_str() {
                        Some(text) if !text.contains("spam") => json!({"result": {
                            "data": {"text": text.to_uppercase(), "checked": true}
                        }}),
                        _ => json!({"error": {"code": 4004, "message": "spam"}}),
                    })
                }
            }),
        )
        .route(
            "/rpc",
            axum::routing::post(|Json(body): Json<Value>| async move {
                Json(match body["method"].as_str() {
                    Some("sum") => json!({"result": {"data": {
                        "sum": body["data"]["a"].as_i64().unwrap_or(0) + body["data"]["b"].as_i64().unwrap_or(0)
                    }}}),
                    _ => json!({"error": {"code": 4040, "message": "no such method"}}),
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

fn config(backend: &str) -> Config {
    let mut config = common::test_config(Engine::Memory);
    config.proxy.connect_endpoint = format!("{backend}/connect");
    config.proxy.refresh_endpoint = format!("{backend}/refresh");
    config.proxy.subscribe_endpoint = format!("{backend}/subscribe");
    config.proxy.publish_endpoint = format!("{backend}/publish");
    config.proxy.rpc_endpoint = format!("{backend}/rpc");
    config.proxy.http_headers = vec!["Authorization".into()];
    config
        .namespaces
        .push(herald_core::namespace::NamedNamespace {
            name: "app".into(),
            options: herald_core::NamespaceOptions {
                proxy_subscribe: true,
                proxy_publish: true,
                ..Default::default()
            },
        });
    config
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(server: &TestServer, authorization: &str) -> Socket {
    let mut request = format!(
        "{}/connection/websocket",
        server.url.replace("http://", "ws://")
    )
    .into_client_request()
    .expect("request");
    request
        .headers_mut()
        .insert("authorization", authorization.parse().expect("header"));
    tokio_tungstenite::connect_async(request)
        .await
        .expect("ws")
        .0
}

/// Sends one command and returns the reply with its id (skipping pushes and pings); a close
/// frame is returned as `{"closed": code}`.
async fn call(socket: &mut Socket, id: u32, method: &str, params: Value) -> Value {
    let mut command = json!({"id": id});
    command[method] = params;
    socket
        .send(Message::text(command.to_string()))
        .await
        .expect("send");
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("a reply within 5s")
            .expect("open")
            .expect("ok");
        match message {
            Message::Text(text) => {
                for line in text.as_str().lines() {
                    let value: Value = serde_json::from_str(line).expect("json");
                    if value["id"] == id {
                        return value;
                    }
                    if value == json!({}) {
                        socket.send(Message::text("{}")).await.expect("pong");
                    }
                }
            }
            Message::Close(Some(frame)) => return json!({"closed": u16::from(frame.code)}),
            _ => {}
        }
    }
}

/// A refresh answered with an expiry that is already past ends the connection (3005) instead
/// of asking the backend again and again.
#[tokio::test]
async fn a_refresh_with_a_past_expiry_closes_the_connection() {
    let calls = Arc::new(Calls::default());
    let backend = backend(calls.clone()).await;
    let server = TestServer::start_with(config(&backend), None).await;
    let mut stale = open(&server, "Bearer stale").await;
    let reply = call(&mut stale, 1, "connect", json!({})).await;
    assert_eq!(reply["connect"]["expires"], true, "{reply}");
    let code = loop {
        let message = tokio::time::timeout(Duration::from_secs(5), stale.next())
            .await
            .expect("closed within 5s");
        match message {
            Some(Ok(Message::Close(Some(frame)))) => break u16::from(frame.code),
            Some(Ok(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(code, 3005);
    assert_eq!(calls.stale_refresh.load(Ordering::SeqCst), 1, "asked once");
}

#[tokio::test]
async fn the_backend_decides_connect_subscribe_publish_and_rpc() {
    let calls = Arc::new(Calls::default());
    let backend = backend(calls.clone()).await;
    let server = TestServer::start_with(config(&backend), None).await;

    // Connect: the backend sees the Authorization header of the upgrade request.
    let mut refused = open(&server, "Bearer nobody").await;
    let reply = call(&mut refused, 1, "connect", json!({})).await;
    assert_eq!(reply["error"]["code"], 4001, "{reply}");
    assert_eq!(reply["error"]["message"], "log in first");
    let mut banned = open(&server, "Bearer banned").await;
    assert_eq!(
        call(&mut banned, 1, "connect", json!({})).await,
        json!({"closed": 4501})
    );
    let mut alice = open(&server, "Bearer good").await;
    let reply = call(&mut alice, 1, "connect", json!({"data": {"name": "Alice"}})).await;
    assert_eq!(
        reply["connect"]["data"],
        json!({"hello": "Alice"}),
        "{reply}"
    );
    assert_eq!(reply["connect"]["expires"], true);
    // The backend's `channels` are server-side subscriptions.
    assert!(reply["connect"]["subs"]["news"].is_object(), "{reply}");

    // Subscribe in a proxied namespace: granted with chan_info, or the backend's error.
    let reply = call(&mut alice, 2, "subscribe", json!({"channel": "app:open"})).await;
    assert!(reply["subscribe"].is_object(), "{reply}");
    let reply = call(&mut alice, 3, "subscribe", json!({"channel": "app:secret"})).await;
    assert_eq!(reply["error"]["code"], 4003, "{reply}");

    // Publish: rewritten by the backend, or refused with its error.
    let reply = call(
        &mut alice,
        4,
        "publish",
        json!({"channel": "app:open", "data": {"text": "hello"}}),
    )
    .await;
    assert!(reply["publish"].is_object(), "{reply}");
    let history = server
        .ok("history", json!({"channel": "app:open", "limit": 10}))
        .await;
    let stored = &history["publications"][0];
    assert_eq!(stored["data"], json!({"text": "HELLO", "checked": true}));
    assert_eq!(stored["info"]["user"], "alice");
    assert_eq!(stored["info"]["chan_info"], json!({"role": "reader"}));
    let reply = call(
        &mut alice,
        5,
        "publish",
        json!({"channel": "app:open", "data": {"text": "spam!"}}),
    )
    .await;
    assert_eq!(reply["error"]["code"], 4004, "{reply}");
    assert_eq!(calls.publish.load(Ordering::SeqCst), 2);

    // RPC.
    let reply = call(
        &mut alice,
        6,
        "rpc",
        json!({"method": "sum", "data": {"a": 2, "b": 40}}),
    )
    .await;
    assert_eq!(reply["rpc"]["data"], json!({"sum": 42}), "{reply}");
    let reply = call(&mut alice, 7, "rpc", json!({"method": "nope"})).await;
    assert_eq!(reply["error"]["code"], 4040, "{reply}");

    // The connection expires 2 s after connect: Herald asks the refresh endpoint and the
    // connection lives on.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let reply = call(
        &mut alice,
        8,
        "rpc",
        json!({"method": "sum", "data": {"a": 1, "b": 1}}),
    )
    .await;
    assert_eq!(reply["rpc"]["data"], json!({"sum": 2}), "{reply}");
    assert!(calls.refresh.load(Ordering::SeqCst) >= 1);
}

#[tokio::test]
async fn a_backend_that_is_down_gets_a_temporary_error() {
    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    let server = TestServer::start_with(config(&dead), None).await;
    let mut client = open(&server, "Bearer good").await;
    let reply = call(&mut client, 1, "connect", json!({})).await;
    assert_eq!(reply["error"]["code"], 100, "{reply}");
    assert_eq!(
        reply["error"]["temporary"], true,
        "SDKs retry temporary errors"
    );
}

#[test]
fn proxied_namespaces_need_their_endpoint() {
    let mut config = config("http://127.0.0.1:9");
    config.proxy.subscribe_endpoint.clear();
    let error = config.validate().expect_err("no endpoint").to_string();
    assert!(error.contains("proxy_subscribe"), "{error}");
    let mut config = self::config("http://127.0.0.1:9");
    config.proxy.rpc_endpoint = "ftp://x".into();
    assert!(config.validate().is_err());
}
