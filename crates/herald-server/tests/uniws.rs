//! Uni-directional WebSocket with a stock client: JSON messages, resume from a cursor in the
//! URL or in the first message, refusal before the upgrade or (first-message mode) with an
//! error message and a close code.

mod common;

use std::time::Duration;

use common::TestServer;
use futures::{SinkExt, StreamExt};
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
    common::hs256(SECRET, &json!({"sub": "alice", "exp": now + 3600}))
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

/// A connection that names nothing in the URL and sends `first` as its first message.
async fn open_with_first_frame(server: &TestServer, first: Message) -> Socket {
    let url = format!(
        "{}/connection/uni_websocket",
        server.url.replace("http://", "ws://")
    );
    let mut socket = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect")
        .0;
    socket.send(first).await.expect("send first message");
    socket
}

/// Reads to the close frame: the `error` message's code and the close code.
async fn refusal(socket: &mut Socket) -> (Value, u16) {
    let mut error = Value::Null;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("within 5s")
            .expect("open")
            .expect("ok");
        match message {
            Message::Text(text) => error = serde_json::from_str(text.as_str()).expect("JSON"),
            Message::Close(Some(frame)) => return (error, u16::from(frame.code)),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn channels_token_and_cursor_in_the_first_message() {
    let server = TestServer::start_with(config(), None).await;
    let first = json!({"channels": ["a", "b"], "token": token()}).to_string();
    let mut socket = open_with_first_frame(&server, Message::text(first)).await;
    let connected = next(&mut socket).await;
    assert_eq!(connected["type"], "connected");
    assert!(connected["channels"]["a"].is_object() && connected["channels"]["b"].is_object());
    for (channel, n) in [("a", 1), ("b", 2)] {
        server
            .ok("publish", json!({"channel": channel, "data": {"n": n}}))
            .await;
        let publication = next(&mut socket).await;
        assert_eq!(
            (
                publication["channel"].as_str(),
                publication["data"]["n"].as_u64()
            ),
            (Some(channel), Some(n))
        );
    }
    // Each channel now holds one publication, at offset 1.
    let epoch = |ch: &str| {
        connected["channels"][ch]["epoch"]
            .as_str()
            .expect("epoch")
            .to_owned()
    };
    let cursor = format!("1:{},1:{}", epoch("a"), epoch("b"));
    drop(socket);
    server
        .ok("publish", json!({"channel": "b", "data": {"n": 3}}))
        .await;
    // Resume with the cursor in the first message: exactly the missed publication follows.
    let first = json!({"channel": "a", "channels": ["b"], "token": token(), "since": cursor});
    let mut resumed = open_with_first_frame(&server, Message::text(first.to_string())).await;
    let connected = next(&mut resumed).await;
    assert_eq!(connected["channels"]["a"]["recovered"], true);
    assert_eq!(connected["channels"]["b"]["recovered"], true);
    let missed = next(&mut resumed).await;
    assert_eq!(
        (missed["channel"].as_str(), missed["data"]["n"].as_u64()),
        (Some("b"), Some(3))
    );
}

#[tokio::test]
async fn first_message_refusals_say_why_and_close_with_the_protocol_code() {
    let mut config = config();
    config.client.connect_timeout = herald_core::duration::HumanDuration::from_secs(1);
    let server = TestServer::start_with(config, None).await;
    let cases = [
        (Message::text("{not json"), 107, 3501),
        (
            Message::text(json!({"channels": ["a"], "token": "a.b.c"}).to_string()),
            101,
            3500,
        ),
        (
            Message::text(json!({"channels": ["a"]}).to_string()),
            101,
            3500,
        ),
        (
            Message::text(json!({"channels": ["a"], "token": token(), "typo": 1}).to_string()),
            107,
            3501,
        ),
        (
            Message::text(json!({"channels": ["unknown:x"], "token": token()}).to_string()),
            102,
            3501,
        ),
        (
            Message::text(
                json!({"channels": ["a"], "token": token(), "since": "garbage"}).to_string(),
            ),
            107,
            3501,
        ),
        (Message::binary(vec![1, 2, 3]), 107, 3501),
    ];
    for (first, code, close) in cases {
        let shown = format!("{first:?}");
        let mut socket = open_with_first_frame(&server, first).await;
        let (error, close_code) = refusal(&mut socket).await;
        assert_eq!(error["type"], "error", "{shown}: {error}");
        assert_eq!(error["code"], code, "{shown}: {error}");
        assert_eq!(close_code, close, "{shown}");
    }
    // No first message within connect_timeout.
    let url = format!(
        "{}/connection/uni_websocket",
        server.url.replace("http://", "ws://")
    );
    let mut silent = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect")
        .0;
    let (error, close_code) = refusal(&mut silent).await;
    assert_eq!((error["code"].as_u64(), close_code), (Some(107), 3501));
}
