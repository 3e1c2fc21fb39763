//! Server-Sent Events end to end with a plain HTTP client: live events with `id:` cursors,
//! resumption of several channels at once with `Last-Event-ID`, explicit "not recovered",
//! and requests refused before streaming.

mod common;

use std::time::Duration;

use common::TestServer;
use futures::StreamExt;
use herald_server::config::{Config, Engine};
use serde_json::{Value, json};

const SECRET: &str = "sse-test-secret-0123456789abcdef0123";

fn config() -> Config {
    let mut config = common::test_config(Engine::Memory);
    config.token.hmac_secret = SECRET.into();
    config.client.recovery_max_publications = 20;
    config
}

fn token(user: &str) -> String {
    let now = herald_core::time::now_ms() / 1000;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user, "exp": now + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

#[derive(Debug, Clone, Default)]
struct Event {
    id: Option<String>,
    event: String,
    data: Value,
}

/// A minimal SSE reader over a streaming response.
struct EventStream {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
    last_id: Option<String>,
}

impl EventStream {
    async fn open(
        server: &TestServer,
        query: &str,
        last_event_id: Option<&str>,
    ) -> Result<(Self, reqwest::header::HeaderMap), (u16, Value)> {
        let mut request = server
            .http
            .get(format!("{}/connection/sse?{query}", server.url))
            .bearer_auth(token("alice"));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        if status != 200 {
            return Err((status, response.json().await.expect("JSON error body")));
        }
        let headers = response.headers().clone();
        Ok((
            Self {
                body: Box::pin(response.bytes_stream()),
                buffer: String::new(),
                last_id: None,
            },
            headers,
        ))
    }

    async fn next(&mut self) -> Event {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = Event::default();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        event.id = Some(v.to_owned());
                        self.last_id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event.event = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if event.event.is_empty() {
                    continue; // retry field or comment
                }
                event.data = serde_json::from_str(&data).expect("JSON data");
                return event;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(5), self.body.next())
                .await
                .expect("an event within 5s")
                .expect("stream open")
                .expect("no error");
            self.buffer
                .push_str(std::str::from_utf8(&chunk).expect("utf-8"));
        }
    }

    async fn publication(&mut self) -> Event {
        loop {
            let event = self.next().await;
            if event.event == "publication" {
                return event;
            }
        }
    }
}

async fn publish(server: &TestServer, channel: &str, n: u64) {
    server
        .ok("publish", json!({"channel": channel, "data": {"n": n}}))
        .await;
}

#[tokio::test]
async fn live_events_and_headers() {
    let server = TestServer::start_with(config(), None).await;
    let (mut stream, headers) = EventStream::open(&server, "channel=a&channel=b", None)
        .await
        .expect("open");
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers["x-accel-buffering"], "no");
    let connected = stream.next().await;
    assert_eq!(connected.event, "connected");
    assert_eq!(connected.data["channels"]["a"]["offset"], 0);
    assert!(
        connected.id.is_some(),
        "the first event carries the starting cursor"
    );
    publish(&server, "a", 1).await;
    publish(&server, "b", 2).await;
    let first = stream.publication().await;
    assert_eq!(first.data["channel"], "a");
    assert_eq!(first.data["data"]["n"], 1);
    let second = stream.publication().await;
    assert_eq!(second.data["channel"], "b");
    let id = second.id.expect("id");
    let parts: Vec<&str> = id.split(',').collect();
    assert_eq!(parts.len(), 2, "one position per channel: {id}");
    assert!(
        parts[0].starts_with("1:") && parts[1].starts_with("1:"),
        "{id}"
    );
}

#[tokio::test]
async fn last_event_id_resumes_every_channel_exactly() {
    let server = TestServer::start_with(config(), None).await;
    let (mut stream, _) = EventStream::open(&server, "channel=a&channel=b", None)
        .await
        .expect("open");
    stream.next().await;
    publish(&server, "a", 1).await;
    stream.publication().await;
    publish(&server, "b", 1).await;
    stream.publication().await;
    let last = stream.last_id.clone().expect("id");
    drop(stream);

    for n in 2..=4 {
        publish(&server, "a", n).await;
        publish(&server, "b", n).await;
    }
    let (mut resumed, _) = EventStream::open(&server, "channel=a&channel=b", Some(&last))
        .await
        .expect("resume");
    let connected = resumed.next().await;
    assert_eq!(
        connected.data["channels"]["a"]["recovered"], true,
        "{:?}",
        connected.data
    );
    assert_eq!(connected.data["channels"]["b"]["recovered"], true);
    let mut seen = Vec::new();
    for _ in 0..6 {
        let event = resumed.publication().await;
        seen.push((
            event.data["channel"].as_str().expect("channel").to_owned(),
            event.data["offset"].as_u64().expect("offset"),
        ));
    }
    let a: Vec<u64> = seen
        .iter()
        .filter(|(c, _)| c == "a")
        .map(|(_, o)| *o)
        .collect();
    let b: Vec<u64> = seen
        .iter()
        .filter(|(c, _)| c == "b")
        .map(|(_, o)| *o)
        .collect();
    assert_eq!(a, vec![2, 3, 4]);
    assert_eq!(b, vec![2, 3, 4]);
    publish(&server, "a", 5).await;
    let live = resumed.publication().await;
    assert_eq!(
        live.data["offset"], 5,
        "live follows recovery without repeats"
    );
    assert!(live.id.expect("id").starts_with("5:"));
}

#[tokio::test]
async fn unrecoverable_positions_are_said_not_skipped() {
    let server = TestServer::start_with(config(), None).await;
    let (mut stream, _) = EventStream::open(&server, "channel=a", None)
        .await
        .expect("open");
    let start = stream.next().await.id.expect("id");
    drop(stream);
    for n in 1..=30 {
        publish(&server, "a", n).await;
    }
    let (mut resumed, _) = EventStream::open(&server, "channel=a", Some(&start))
        .await
        .expect("resume");
    let connected = resumed.next().await;
    assert_eq!(
        connected.data["channels"]["a"]["recovered"], false,
        "30 missed > recovery limit 20"
    );
    assert_eq!(connected.data["channels"]["a"]["offset"], 30);
    assert!(connected.id.expect("id").starts_with("30:"));

    let epoch = start.split(':').nth(1).expect("epoch");
    let (mut stale, _) = EventStream::open(&server, "channel=a", Some("3:Stale000"))
        .await
        .expect("resume");
    assert_eq!(stale.next().await.data["channels"]["a"]["recovered"], false);
    assert!(!epoch.is_empty());
}

#[tokio::test]
async fn refused_before_streaming_with_json_errors() {
    let server = TestServer::start_with(config(), None).await;
    let no_token = server
        .http
        .get(format!("{}/connection/sse?channel=a", server.url))
        .send()
        .await
        .expect("send");
    assert_eq!(no_token.status().as_u16(), 401);
    let body: Value = no_token.json().await.expect("json");
    assert_eq!(body["error"]["code"], 101);
    let by_query = server
        .http
        .get(format!(
            "{}/connection/sse?channel=a&token={}",
            server.url,
            token("bob")
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(
        by_query.status().as_u16(),
        200,
        "token in the query (EventSource cannot set headers)"
    );
    let by_cookie = server
        .http
        .get(format!("{}/connection/sse?channel=a", server.url))
        .header(
            "Cookie",
            format!("theme=dark; herald_token={}", token("bob")),
        )
        .send()
        .await
        .expect("send");
    assert_eq!(by_cookie.status().as_u16(), 200, "token in a cookie");
    assert_eq!(
        EventStream::open(&server, "", None)
            .await
            .err()
            .map(|e| e.0),
        Some(400),
        "no channel"
    );
    assert_eq!(
        EventStream::open(&server, "channel=bad%20name", None)
            .await
            .err()
            .map(|e| e.0),
        Some(400)
    );
    assert_eq!(
        EventStream::open(&server, "channel=nope:x", None)
            .await
            .err()
            .map(|e| e.0),
        Some(404)
    );
    assert_eq!(
        EventStream::open(&server, "channel=%23bob", None)
            .await
            .err()
            .map(|e| e.0),
        Some(403)
    );
    assert_eq!(
        EventStream::open(&server, "channel=a", Some("garbage"))
            .await
            .err()
            .map(|e| e.0),
        Some(400)
    );
    assert_eq!(
        EventStream::open(&server, "channel=a&channel=b", Some("1:abc"))
            .await
            .err()
            .map(|e| e.0),
        Some(400),
        "cursor for another channel list"
    );
}

#[tokio::test]
async fn streams_end_on_token_expiry_and_shutdown() {
    let server = TestServer::start_with(config(), None).await;
    let now = herald_core::time::now_ms() / 1000;
    let short = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "alice", "exp": now + 1}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign");
    let response = server
        .http
        .get(format!(
            "{}/connection/sse?channel=a&token={short}",
            server.url
        ))
        .send()
        .await
        .expect("send");
    let mut expiring = EventStream {
        body: Box::pin(response.bytes_stream()),
        buffer: String::new(),
        last_id: None,
    };
    let disconnect = loop {
        let event = tokio::time::timeout(Duration::from_secs(5), expiring.next())
            .await
            .expect("within 5s");
        if event.event == "disconnect" {
            break event;
        }
    };
    assert_eq!(disconnect.data["code"], 3005, "connection expired");

    let (mut stream, _) = EventStream::open(&server, "channel=a", None)
        .await
        .expect("open");
    stream.next().await;
    server.state.realtime.shut_down();
    let event = loop {
        let event = stream.next().await;
        if event.event == "disconnect" {
            break event;
        }
    };
    assert_eq!(event.data["code"], 3001, "shutdown");
    assert_eq!(event.data["reconnect"], true);
}
