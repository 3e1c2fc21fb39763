//! HTTP streaming (NDJSON) end to end: live lines, resuming with `?since=` built from the
//! lines themselves, and the same refusals as every one-way transport.

mod common;

use std::time::Duration;

use common::TestServer;
use futures::StreamExt;
use herald_server::config::{Config, Engine};
use serde_json::{Value, json};

const SECRET: &str = "stream-test-secret-0123456789abcdef01";

fn config() -> Config {
    let mut config = common::test_config(Engine::Memory);
    config.token.hmac_secret = SECRET.into();
    config
}

fn token() -> String {
    let now = herald_core::time::now_ms() / 1000;
    common::hs256(SECRET, &json!({"sub": "alice", "exp": now + 3600}))
}

struct Lines {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
}

impl Lines {
    async fn open(server: &TestServer, query: &str) -> Result<Self, u16> {
        let response = server
            .http
            .get(format!("{}/connection/stream?{query}", server.url))
            .bearer_auth(token())
            .send()
            .await
            .expect("request");
        if response.status() != 200 {
            return Err(response.status().as_u16());
        }
        assert_eq!(response.headers()["content-type"], "application/x-ndjson");
        Ok(Self {
            body: Box::pin(response.bytes_stream()),
            buffer: String::new(),
        })
    }

    async fn next(&mut self) -> Value {
        loop {
            if let Some(end) = self.buffer.find('\n') {
                let text: String = self.buffer.drain(..=end).collect();
                return serde_json::from_str(text.trim()).expect("one JSON object per line");
            }
            let chunk = tokio::time::timeout(Duration::from_secs(5), self.body.next())
                .await
                .expect("a line within 5s")
                .expect("open")
                .expect("no error");
            self.buffer
                .push_str(std::str::from_utf8(&chunk).expect("utf-8"));
        }
    }

    async fn publication(&mut self) -> Value {
        loop {
            let line = self.next().await;
            if line["type"] == "publication" {
                return line;
            }
        }
    }
}

#[tokio::test]
async fn streams_lines_and_resumes_from_a_cursor() {
    let server = TestServer::start_with(config(), None).await;
    let mut lines = Lines::open(&server, "channels=a,b").await.expect("open");
    let connected = lines.next().await;
    assert_eq!(connected["type"], "connected");
    assert!(
        connected["cursor"]
            .as_str()
            .is_some_and(|c| c.split(',').count() == 2)
    );
    server
        .ok("publish", json!({"channel": "b", "data": {"n": 1}}))
        .await;
    let first = lines.publication().await;
    assert_eq!(
        (first["channel"].as_str(), first["offset"].as_u64()),
        (Some("b"), Some(1))
    );
    let epoch_b = first["epoch"].as_str().expect("epoch").to_owned();
    let epoch_a = connected["channels"]["a"]["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    drop(lines);

    server
        .ok("publish", json!({"channel": "a", "data": {"n": 2}}))
        .await;
    server
        .ok("publish", json!({"channel": "b", "data": {"n": 3}}))
        .await;
    let cursor = format!("0:{epoch_a},1:{epoch_b}");
    let mut resumed = Lines::open(&server, &format!("channels=a,b&since={cursor}"))
        .await
        .expect("resume");
    let connected = resumed.next().await;
    assert_eq!(connected["channels"]["a"]["recovered"], true);
    let mut got = [resumed.publication().await, resumed.publication().await];
    got.sort_by_key(|l| l["channel"].as_str().map(str::to_owned));
    assert_eq!(got[0]["data"]["n"], 2);
    assert_eq!(got[1]["data"]["n"], 3);
}

#[tokio::test]
async fn refuses_bad_requests() {
    let server = TestServer::start_with(config(), None).await;
    assert_eq!(
        Lines::open(&server, "channel=a&since=nonsense").await.err(),
        Some(400)
    );
    assert_eq!(
        Lines::open(&server, "channel=unknown:a").await.err(),
        Some(404)
    );
    let anonymous = server
        .http
        .get(format!("{}/connection/stream?channel=a", server.url))
        .send()
        .await
        .expect("send");
    assert_eq!(anonymous.status().as_u16(), 401);
}
