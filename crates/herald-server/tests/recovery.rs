//! Recovery is bounded in bytes as well as in publications: a client that missed more than
//! its connection's queue can hold is told "not recovered" (and refetches state) instead of
//! getting a reply that closes it as slow, again on every reconnect.

mod common;

use std::time::Duration;

use common::TestServer;
use common::ws::command;
use futures::StreamExt;
use herald_server::config::{Config, Engine};
use serde_json::{Value, json};

const QUEUE: usize = 64 * 1024;

fn config() -> Config {
    let mut config = common::test_config(Engine::Memory);
    config.client.allow_anonymous = true;
    config.namespace.allow_subscribe_for_anonymous = true;
    config.client.max_queue_bytes = QUEUE;
    config
}

/// Publishes `count` publications of about 900 bytes to `channel`; returns the epoch.
async fn publish(server: &TestServer, channel: &str, count: usize) -> String {
    let pad = "p".repeat(900);
    let mut epoch = String::new();
    for n in 0..count {
        let result = server
            .ok(
                "publish",
                json!({"channel": channel, "data": {"n": n, "pad": pad}}),
            )
            .await;
        epoch = result["epoch"].as_str().expect("epoch").to_owned();
    }
    epoch
}

#[tokio::test]
async fn a_recovery_larger_than_the_queue_is_not_recovered_and_the_client_stays() {
    let server = TestServer::start_with(config(), None).await;
    // 100 × ~900 bytes: more than half the 64 KiB queue.
    let epoch = publish(&server, "news", 100).await;
    let url = format!(
        "{}/connection/websocket",
        server.url.replace("http://", "ws://")
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.expect("ws");
    let connected = command(&mut socket, 1, json!({"connect": {}})).await;
    assert!(connected["connect"].is_object(), "{connected}");
    let from_start =
        json!({"subscribe": {"channel": "news", "recover": true, "offset": 0, "epoch": epoch}});
    let reply = command(&mut socket, 2, from_start).await;
    let result = &reply["subscribe"];
    assert_eq!(result["recovered"], Value::Null, "not recovered: {result}");
    assert_eq!(result["offset"], 100, "positioned at the top: {result}");
    assert!(result["publications"].is_null(), "{result}");

    // Still connected: the next publication arrives.
    server
        .ok(
            "publish",
            json!({"channel": "news", "data": {"live": true}}),
        )
        .await;
    let push = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .expect("a push within 5s")
        .expect("open")
        .expect("ok");
    assert!(push.to_string().contains("\"live\":true"), "{push}");

    // What fits is recovered as before.
    let other_epoch = publish(&server, "other", 10).await;
    let near = json!({"subscribe": {"channel": "other", "recover": true, "offset": 0, "epoch": other_epoch}});
    let reply = command(&mut socket, 3, near).await;
    assert_eq!(reply["subscribe"]["recovered"], true, "{reply}");
    assert_eq!(
        reply["subscribe"]["publications"].as_array().map(Vec::len),
        Some(10)
    );
}

#[tokio::test]
async fn a_one_way_stream_that_missed_too_much_opens_unrecovered() {
    let server = TestServer::start_with(config(), None).await;
    let epoch = publish(&server, "news", 100).await;
    let response = reqwest::Client::new()
        .get(format!("{}/connection/stream", server.url))
        .query(&[("channel", "news"), ("since", &format!("0:{epoch}"))])
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 200);
    let mut body = response.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(5), body.next())
        .await
        .expect("connected within 5s")
        .expect("open")
        .expect("chunk");
    let line = String::from_utf8_lossy(&first);
    let connected: Value =
        serde_json::from_str(line.lines().next().expect("a line")).expect("json");
    assert_eq!(
        connected["channels"]["news"]["recovered"], false,
        "{connected}"
    );
    assert_eq!(connected["channels"]["news"]["offset"], 100, "{connected}");
}
