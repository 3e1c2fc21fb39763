//! The process-wide budget for queued outbound bytes, on the real binary: many readers that
//! stop reading against a small `max_total_queue_bytes`. The server's memory stays within the
//! budget (plus what it held before), readers that keep reading get every publication in
//! order, and the readers closed as slow recover everything from history on reconnect.

mod common;

use std::time::Duration;

use common::process::ServerProcess;
use common::ws::command;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const API_KEY: &str = "budget-test-api-key-0123456789";
const BUDGET: u64 = 12 * 1024 * 1024;
/// Per connection: generous, so that the sum is what the budget has to bound.
const QUEUE: u64 = 16 * 1024 * 1024;
/// Each stalled reader has its own channel, so what it is sent is its own (a broadcast
/// channel's frames are shared by every queue holding them).
const STALLED: usize = 10;
const HEALTHY: usize = 3;
/// 10 MiB per channel: more than the kernel's socket buffers take (up to 4 MiB).
const PUBLICATIONS: u64 = 320;
const PAYLOAD: usize = 32 * 1024;

type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

fn config(budget: u64) -> String {
    format!(
        r#"
        [api]
        keys = ["{API_KEY}"]
        [client]
        allow_anonymous = true
        max_total_queue_bytes = {budget}
        max_queue_bytes = {QUEUE}
        [namespace]
        allow_subscribe_for_anonymous = true
        history_size = 1000
        history_ttl = "1h"
        "#
    )
}

/// `VmRSS` or `VmHWM` (peak) of `pid`, in bytes.
fn memory(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .expect("field present");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("a number");
    kib * 1024
}

/// A WebSocket client whose socket takes little: with a 4 KiB receive buffer (no kernel
/// autotuning) a reader that stops reading stalls the server's writes at once.
async fn connect(url: &str) -> Socket {
    let address: std::net::SocketAddr = url.trim_start_matches("http://").parse().expect("address");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = socket.connect(address).await.expect("connect");
    let ws_url = format!("ws://{address}/connection/websocket");
    tokio_tungstenite::client_async(ws_url, stream)
        .await
        .expect("handshake")
        .0
}

/// Connects and subscribes to `channel`; returns the socket and the subscription's epoch.
async fn subscriber(url: &str, channel: &str) -> (Socket, String) {
    let mut socket = connect(url).await;
    let connected = command(&mut socket, 1, json!({"connect": {}})).await;
    assert!(connected["connect"].is_object(), "{connected}");
    let subscribed = command(&mut socket, 2, json!({"subscribe": {"channel": channel}})).await;
    let epoch = subscribed["subscribe"]["epoch"]
        .as_str()
        .expect("an epoch")
        .to_owned();
    (socket, epoch)
}

/// Reads publication pushes until `count` have arrived; returns their offsets in order.
async fn read_publications(socket: &mut Socket, count: u64) -> Vec<u64> {
    let mut offsets = Vec::new();
    while (offsets.len() as u64) < count {
        let message = tokio::time::timeout(Duration::from_secs(20), socket.next())
            .await
            .expect("publications keep arriving")
            .expect("open")
            .expect("ok");
        let Message::Text(text) = message else {
            continue;
        };
        for line in text.as_str().lines() {
            let push: Value = serde_json::from_str(line).expect("json");
            if let Some(offset) = push["push"]["pub"]["offset"].as_u64() {
                offsets.push(offset);
            }
        }
    }
    offsets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_cannot_take_more_than_the_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("herald.toml");
    let data = dir.path().join("data");
    std::fs::write(&path, config(BUDGET)).expect("config");
    let server = ServerProcess::start(
        &[
            "--data-dir",
            data.to_str().expect("utf-8 path"),
            "--listen",
            "127.0.0.1:0",
            "--config",
            path.to_str().expect("utf-8 path"),
        ],
        dir.path(),
    );
    let url = server.url.clone();
    let http = reqwest::Client::new();
    let padding = "x".repeat(PAYLOAD);
    let channels: Vec<String> = std::iter::once("news".to_owned())
        .chain((0..STALLED).map(|n| format!("inbox{n}")))
        .collect();
    let publish_round = |round: u64| {
        let (http, url, channels, padding) = (&http, &url, &channels, &padding);
        async move {
            for n in 1..=PUBLICATIONS {
                let data = json!({"round": round, "n": n, "pad": padding});
                let response = http
                    .post(format!("{url}/api/broadcast"))
                    .header("X-API-Key", API_KEY)
                    .json(&json!({"channels": channels, "data": data}))
                    .send()
                    .await
                    .expect("publish");
                assert_eq!(response.status().as_u16(), 200);
            }
        }
    };
    // A first round with nobody subscribed warms up what the workload itself needs (the
    // store's caches, the allocator's arenas): the baseline includes it.
    publish_round(1).await;
    let mut healthy = Vec::new();
    for _ in 0..HEALTHY {
        healthy.push(subscriber(&url, "news").await.0);
    }
    let mut stalled = Vec::new();
    for channel in channels.iter().skip(1) {
        let (socket, epoch) = subscriber(&url, channel).await;
        stalled.push((socket, epoch, channel.clone()));
    }
    let baseline = memory(server.pid(), "VmRSS:");

    // The healthy readers read everything while it is published; the others do not read.
    let readers: Vec<_> = healthy
        .into_iter()
        .map(|mut socket| {
            tokio::spawn(async move { read_publications(&mut socket, PUBLICATIONS).await })
        })
        .collect();
    publish_round(2).await;
    for reader in readers {
        let offsets = reader.await.expect("reader");
        assert_eq!(
            offsets,
            (PUBLICATIONS + 1..=2 * PUBLICATIONS).collect::<Vec<_>>(),
            "a reader that keeps reading gets everything, in order"
        );
    }

    // Without the budget each stalled reader would hold what its socket does not take (the
    // kernel takes up to 4 MiB): measured, the peak grew by about 100 MiB (20 MiB with it
    // when this test was written; 24–35 MiB with the workspace-built binary on a 2-core
    // machine, measured 2026-12-07 at several commits — why it grew is not known yet).
    let peak = memory(server.pid(), "VmHWM:");
    let growth = peak.saturating_sub(baseline);
    // History is on disk (SQLite). The slack covers what the budget does not count: the
    // batch a connection's writer is turning into a message, the allocator's rounding.
    let slack = 28 * 1024 * 1024;
    assert!(
        growth <= BUDGET + slack,
        "peak memory grew by {} KiB over a {} KiB budget ({} KiB slack)",
        growth / 1024,
        BUDGET / 1024,
        slack / 1024
    );
    let metrics = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let closed: u64 = metrics
        .lines()
        .find(|l| l.starts_with("herald_slow_disconnects_over_budget_total"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no over-budget counter in {metrics}"));
    assert!(
        closed >= 1,
        "stalled readers were closed over the budget: {metrics}"
    );
    assert!(
        metrics.contains(&format!("herald_outbound_queued_bytes_limit {BUDGET}")),
        "{metrics}"
    );

    // Each stalled reader now reads what reached it. The ones closed as slow (most of them)
    // end before the last publication; one the budget left alone reads on to the end.
    let mut ended = Vec::new();
    for (mut socket, epoch, channel) in stalled {
        let mut last = PUBLICATIONS;
        while last < 2 * PUBLICATIONS {
            let message = tokio::time::timeout(Duration::from_secs(15), socket.next())
                .await
                .expect("a stalled reader's connection either delivers or ends");
            let Some(Ok(Message::Text(text))) = message else {
                if matches!(message, Some(Ok(_))) {
                    continue;
                }
                break;
            };
            for line in text.as_str().lines() {
                let push: Value = serde_json::from_str(line).expect("json");
                if let Some(offset) = push["push"]["pub"]["offset"].as_u64() {
                    assert_eq!(offset, last + 1, "in order, no gap");
                    last = offset;
                }
            }
        }
        if last < 2 * PUBLICATIONS {
            ended.push((last, epoch, channel));
        }
    }
    assert!(
        ended.len() as u64 >= closed,
        "{} readers ended, {closed} were closed over the budget",
        ended.len()
    );

    // The closed readers reconnect and recover exactly what they missed from history.
    for (last, epoch, channel) in ended {
        let mut socket = connect(&url).await;
        let connected = command(&mut socket, 1, json!({"connect": {}})).await;
        assert!(connected["connect"].is_object(), "{connected}");
        let resubscribed = command(
            &mut socket,
            2,
            json!({"subscribe": {"channel": channel, "recover": true, "offset": last, "epoch": epoch}}),
        )
        .await;
        let result = &resubscribed["subscribe"];
        assert_eq!(result["recovered"], true, "{}", result["recovered"]);
        let offsets: Vec<u64> = result["publications"]
            .as_array()
            .expect("publications")
            .iter()
            .filter_map(|p| p["offset"].as_u64())
            .collect();
        assert_eq!(offsets, (last + 1..=2 * PUBLICATIONS).collect::<Vec<_>>());
    }
}
