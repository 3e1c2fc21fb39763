//! Uni-directional WebSocket with a stock client: JSON messages, resume from a cursor in the
//! URL, refusal before the upgrade.

mod common;

use std::time::Duration;

use common::TestServer;
use futures::StreamExt;
use herald_server::config::{Config, Engine};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "uniws-test-secret-0123456789abcdef012";

fn config() -> Config {
    let mut config = common::test_config(Engine::Memory);
    config.token.hmac_secret = SECRET.into();
    config
}

fn token() -> String {
    let now = herald_core::time::now_ms() / 1000;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "alice", "exp": now + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(server: &TestServer, query: &str) -> Socket {
    let url = format!(
        "{}/connection/uni_websocket?{query}&token={}",
        server.url.replace("http://", "ws://"),
        token()
    );
    tokio_tungstenite::connect_async(url)
        .await
        .expect("connect")
        .0
}

async fn next(socket: &mut Socket) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("within 5s")
            .expect("open")
            .expect("ok");
        if let Message::Text(text) = message {
            let value: Value =
                serde_json::from_str(text.as_str()).expect("one JSON object per message");
            if value["type"] != "ping" {
                return value;
            }
        }
    }
}

#[tokio::test]
async fn receives_and_resumes() {
    let server = TestServer::start_with(config(), None).await;
    let mut socket = open(&server, "channel=a").await;
    let connected = next(&mut socket).await;
    assert_eq!(connected["type"], "connected");
    server
        .ok("publish", json!({"channel": "a", "data": {"n": 1}}))
        .await;
    let publication = next(&mut socket).await;
    assert_eq!(publication["data"]["n"], 1);
    let cursor = format!("1:{}", publication["epoch"].as_str().expect("epoch"));
    drop(socket);
    server
        .ok("publish", json!({"channel": "a", "data": {"n": 2}}))
        .await;
    let mut resumed = open(&server, &format!("channel=a&since={cursor}")).await;
    assert_eq!(next(&mut resumed).await["channels"]["a"]["recovered"], true);
    assert_eq!(next(&mut resumed).await["data"]["n"], 2);
}

#[tokio::test]
async fn refused_before_upgrade() {
    let server = TestServer::start_with(config(), None).await;
    let url = format!(
        "{}/connection/uni_websocket?channel=unknown:x&token={}",
        server.url.replace("http://", "ws://"),
        token()
    );
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 404)
        }
        other => panic!("expected an HTTP refusal, got {:?}", other.map(|_| ())),
    }
}
