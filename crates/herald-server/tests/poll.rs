//! Long-poll end to end: a plain poll, a poll that waits for the next publication, catching up
//! from a cursor, and bad parameters.

mod common;

use std::time::{Duration, Instant};

use common::TestServer;
use herald_server::config::{Config, Engine};
use serde_json::{Value, json};

const SECRET: &str = "poll-test-secret-0123456789abcdef0123";

fn config() -> Config {
    let mut config = common::test_config(Engine::Memory);
    config.token.hmac_secret = SECRET.into();
    config
}

fn token() -> String {
    let now = herald_core::time::now_ms() / 1000;
    common::hs256(SECRET, &json!({"sub": "alice", "exp": now + 3600}))
}

async fn poll(server: &TestServer, query: &str) -> (u16, Value) {
    let response = server
        .http
        .get(format!("{}/connection/poll?{query}", server.url))
        .bearer_auth(token())
        .send()
        .await
        .expect("request");
    (
        response.status().as_u16(),
        response.json().await.expect("JSON"),
    )
}

#[tokio::test]
async fn polls_wait_and_catch_up() {
    let server = TestServer::start_with(config(), None).await;
    let (status, first) = poll(&server, "channel=a&timeout=0").await;
    assert_eq!(status, 200);
    assert_eq!(first["publications"], json!([]));
    let cursor = first["cursor"].as_str().expect("cursor").to_owned();
    assert!(cursor.starts_with("0:"));

    // A waiting poll returns as soon as something is published.
    let publisher = {
        let url = server.url.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            reqwest::Client::new()
                .post(format!("{url}/api/publish"))
                .header("X-API-Key", common::API_KEY)
                .json(&json!({"channel": "a", "data": {"n": 1}}))
                .send()
                .await
                .expect("publish");
        })
    };
    let started = Instant::now();
    let (_, waited) = poll(&server, &format!("channel=a&since={cursor}&timeout=10s")).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "returned when the publication arrived"
    );
    publisher.await.expect("publisher");
    assert_eq!(waited["publications"][0]["data"]["n"], 1);
    assert_eq!(waited["publications"][0]["offset"], 1);
    let cursor = waited["cursor"].as_str().expect("cursor").to_owned();
    assert!(cursor.starts_with("1:"));

    // Catching up returns everything missed at once.
    for n in 2..=4 {
        server
            .ok("publish", json!({"channel": "a", "data": {"n": n}}))
            .await;
    }
    let (_, caught_up) = poll(&server, &format!("channel=a&since={cursor}&timeout=10s")).await;
    let offsets: Vec<u64> = caught_up["publications"]
        .as_array()
        .expect("array")
        .iter()
        .map(|p| p["offset"].as_u64().expect("offset"))
        .collect();
    assert_eq!(offsets, vec![2, 3, 4]);
    assert_eq!(caught_up["channels"]["a"]["recovered"], true);

    // A stale cursor is answered "not recovered" with the present position.
    let (_, stale) = poll(&server, "channel=a&since=1:Stale000&timeout=10s").await;
    assert_eq!(stale["channels"]["a"]["recovered"], false);
    assert!(stale["cursor"].as_str().expect("cursor").starts_with("4:"));
}

#[tokio::test]
async fn bad_parameters() {
    let server = TestServer::start_with(config(), None).await;
    assert_eq!(poll(&server, "channel=a&timeout=soon").await.0, 400);
    assert_eq!(poll(&server, "channel=a&since=x").await.0, 400);
    assert_eq!(poll(&server, "timeout=0").await.0, 400);
}
