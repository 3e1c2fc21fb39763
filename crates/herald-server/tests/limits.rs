//! Connection limits against a real server, each with a flood bounded in count and time:
//! connections per IP and in total, new connections per second per IP, and the header
//! deadline (slowloris). Source addresses 127.0.0.x stand for different clients.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::TestServer;
use herald_server::config::{Config, Engine};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn config() -> Config {
    common::test_config(Engine::Memory)
}

fn server_addr(server: &TestServer) -> SocketAddr {
    server
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("socket address")
}

/// A TCP connection from `source` (127.0.0.x).
async fn connect_from(server: &TestServer, source: [u8; 4]) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(IpAddr::from(source), 0))
        .expect("bind source address");
    socket.connect(server_addr(server)).await.expect("connect")
}

/// Sends a health check on `stream` and returns the status line (or "closed").
async fn status_of(stream: &mut TcpStream) -> String {
    let _ = stream
        .write_all(b"GET /health HTTP/1.1\r\nhost: herald\r\n\r\n")
        .await;
    let mut buf = vec![0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("an answer within 5s")
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..read]).into_owned();
    text.lines().next().unwrap_or("closed").to_owned()
}

#[tokio::test]
async fn connections_per_ip_and_in_total() {
    let mut config = config();
    config.server.max_connections_per_ip = 5;
    config.server.max_connections = 8;
    let server = TestServer::start_with(config, None).await;
    let mut first_ip = Vec::new();
    for _ in 0..5 {
        let mut stream = connect_from(&server, [127, 0, 0, 1]).await;
        assert!(status_of(&mut stream).await.contains("200"));
        first_ip.push(stream);
    }
    // The sixth from the same IP is refused with 429 and a JSON reason.
    let mut sixth = connect_from(&server, [127, 0, 0, 1]).await;
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), sixth.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(
        answer.contains("retry-after: 1") && answer.contains("\"code\":111"),
        "{answer}"
    );
    // Other IPs are fine until the total (8) is reached.
    let mut others = Vec::new();
    for last in 2..=4 {
        let mut stream = connect_from(&server, [127, 0, 0, last]).await;
        assert!(status_of(&mut stream).await.contains("200"));
        others.push(stream);
    }
    let mut ninth = connect_from(&server, [127, 0, 0, 9]).await;
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), ninth.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    // Closing one connection frees its place (the count follows the socket's life).
    drop(first_ip.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = connect_from(&server, [127, 0, 0, 1]).await;
        if status_of(&mut again).await.contains("200") {
            break;
        }
        assert!(Instant::now() < deadline, "the place was not released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = reqwest::get(format!("{}/metrics", server.url));
    drop(others);
    drop(first_ip);
    let text = metrics.await.expect("metrics").text().await.expect("text");
    assert!(
        text.contains("herald_connections_refused_total{reason=\"per_ip\"} 1"),
        "{text}"
    );
    assert!(text.contains("herald_connections_refused_total{reason=\"server_full\"} 1"));
}

#[tokio::test]
async fn a_connection_flood_from_one_ip_is_rate_limited() {
    let mut config = config();
    config.server.connection_rate_per_ip = 20;
    let server = TestServer::start_with(config, None).await;
    // 100 connections as fast as possible: about the burst (20) get in.
    let mut admitted = 0;
    let mut refused = 0;
    for _ in 0..100 {
        let mut stream = connect_from(&server, [127, 0, 0, 1]).await;
        let status = status_of(&mut stream).await;
        if status.contains("200") {
            admitted += 1;
        } else {
            assert!(status.contains("429"), "{status}");
            refused += 1;
        }
    }
    assert!((20..=40).contains(&admitted), "admitted {admitted}");
    assert!(refused >= 60, "refused {refused}");
    // Another IP is not affected, and the first recovers after a second.
    let mut other = connect_from(&server, [127, 0, 0, 2]).await;
    assert!(status_of(&mut other).await.contains("200"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut later = connect_from(&server, [127, 0, 0, 1]).await;
    assert!(status_of(&mut later).await.contains("200"));
}

#[tokio::test]
async fn headers_sent_too_slowly_are_cut_off() {
    let mut config = config();
    config.server.header_read_timeout = herald_core::duration::HumanDuration::from_secs(1);
    let server = TestServer::start_with(config, None).await;
    let mut slow = connect_from(&server, [127, 0, 0, 1]).await;
    slow.write_all(b"GET /health HTTP/1.1\r\nhost: her")
        .await
        .expect("write");
    let started = Instant::now();
    let mut buf = [0u8; 256];
    // The server closes (perhaps after a 408): the read ends well before our 5 s limit.
    loop {
        let read = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
            .await
            .expect("closed within 5s")
            .unwrap_or(0);
        if read == 0 {
            break;
        }
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    // A normal request still works.
    let mut fine = connect_from(&server, [127, 0, 0, 1]).await;
    assert!(status_of(&mut fine).await.contains("200"));
}

#[tokio::test]
async fn publish_calls_per_api_key_are_rate_limited_with_retry_after() {
    let mut config = config();
    config.api.publish_rate_per_key = 5;
    let server = TestServer::start_with(config, None).await;
    let client = reqwest::Client::new();
    let publish = || {
        client
            .post(format!("{}/api/publish", server.url))
            .header("x-api-key", "test-api-key-0123456789")
            .json(&serde_json::json!({"channel": "news", "data": 1}))
            .send()
    };
    let mut ok = 0;
    let mut limited = 0;
    for _ in 0..20 {
        let response = publish().await.expect("request");
        match response.status().as_u16() {
            200 => ok += 1,
            429 => {
                assert_eq!(response.headers()["retry-after"], "1");
                let body: serde_json::Value = response.json().await.expect("json");
                assert_eq!(body["error"]["code"], 111, "{body}");
                limited += 1;
            }
            other => panic!("status {other}"),
        }
    }
    assert!((5..=7).contains(&ok), "ok {ok}");
    assert_eq!(ok + limited, 20);
    // Reads are not limited; in a batch each publish is counted and refused on its own.
    let (status, _) = server
        .call("history", serde_json::json!({"channel": "news"}))
        .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let commands: Vec<_> = (0..8)
        .map(|i| serde_json::json!({"publish": {"channel": "news", "data": i}}))
        .collect();
    let (status, body) = server
        .call("batch", serde_json::json!({"commands": commands}))
        .await;
    assert_eq!(status, 200);
    let replies = body["replies"].as_array().expect("replies");
    let refused = replies.iter().filter(|r| r["error"]["code"] == 111).count();
    assert!((2..=3).contains(&refused), "{body}");
    // The publications that were refused are not in history.
    let history = server
        .ok(
            "history",
            serde_json::json!({"channel": "news", "limit": 100}),
        )
        .await;
    let stored = history["publications"].as_array().map_or(0, Vec::len);
    assert_eq!(stored, ok + (8 - refused), "{history}");
}
