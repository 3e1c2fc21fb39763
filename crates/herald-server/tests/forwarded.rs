//! Clients behind a trusted proxy, against a real server: the per-IP limits apply to the
//! client the proxy's header names (X-Forwarded-For, or `Forwarded` when configured), the
//! proxy's own sockets are not limited per IP, a header from anyone else changes nothing, and
//! malformed headers are ignored safely. Source addresses 127.0.0.x stand for hosts: 127.0.0.2
//! is the trusted proxy, 127.0.0.3 an untrusted peer.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::TestServer;
use herald_server::config::{Config, Engine};
use herald_server::forwarded::ForwardedHeader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const PROXY: [u8; 4] = [127, 0, 0, 2];
const STRANGER: [u8; 4] = [127, 0, 0, 3];

fn config(per_ip: usize) -> Config {
    let mut config = common::test_config(Engine::Memory);
    config.server.trusted_proxies = vec!["127.0.0.2/32".into(), "10.0.0.0/8".into()];
    config.server.max_connections_per_ip = per_ip;
    config
}

async fn connect_from(server: &TestServer, source: [u8; 4]) -> TcpStream {
    let addr: SocketAddr = server
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("address");
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(IpAddr::from(source), 0))
        .expect("bind source address");
    socket.connect(addr).await.expect("connect")
}

/// Reads one response head (or what arrives before the socket closes) and returns its status
/// line, or "closed".
async fn read_status(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("an answer within 5s")
            .unwrap_or(0);
        if read == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    text.lines().next().unwrap_or("closed").to_owned()
}

/// Opens a WebSocket from `source` with `headers` (each `name: value`) and returns the socket
/// (held open) and the status line: 101 when admitted.
async fn websocket(server: &TestServer, source: [u8; 4], headers: &[&str]) -> (TcpStream, String) {
    let mut stream = connect_from(server, source).await;
    let mut request = String::from(
        "GET /connection/websocket HTTP/1.1\r\nhost: herald\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n",
    );
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    let _ = stream.write_all(request.as_bytes()).await;
    let status = read_status(&mut stream).await;
    (stream, status)
}

/// A health check on a kept-alive `stream`; returns the status line and drains the body.
async fn health(stream: &mut TcpStream, headers: &[&str]) -> String {
    let mut request = String::from("GET /health HTTP/1.1\r\nhost: herald\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 2048];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..read]).into_owned();
    text.lines().next().unwrap_or("closed").to_owned()
}

async fn metric(server: &TestServer, name: &str) -> String {
    let text = reqwest::get(format!("{}/metrics", server.url))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .find(|line| line.starts_with(name))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_trusted_proxys_x_forwarded_for_is_the_client_for_per_ip_limits() {
    let server = TestServer::start_with(config(2), None).await;
    // The proxy's sockets are not limited per IP: it carries many clients.
    let mut held = Vec::new();
    for client in ["203.0.113.1", "203.0.113.1"] {
        let xff = format!("x-forwarded-for: 6.6.6.6, {client}, 10.0.0.9");
        let (socket, status) = websocket(&server, PROXY, &[&xff]).await;
        assert!(status.contains("101"), "{status}");
        held.push(socket);
    }
    // The client (rightmost untrusted hop) has its two places: a third WebSocket is refused,
    // on the proxy's kept-alive connection, with the usual 429 body.
    let xff = "x-forwarded-for: 203.0.113.1";
    let (mut third, status) = websocket(&server, PROXY, &[xff]).await;
    assert!(status.contains("429"), "{status}");
    let mut body = [0u8; 256];
    let read = third.read(&mut body).await.expect("body");
    assert!(
        String::from_utf8_lossy(&body[..read]).contains("\"code\":111"),
        "JSON reason"
    );
    // Another client through the same proxy, and the proxy's own third socket, are fine.
    let (other, status) = websocket(&server, PROXY, &["x-forwarded-for: 203.0.113.2"]).await;
    assert!(status.contains("101"), "{status}");
    held.push(other);
    // The WebSocket holds its place as long as it is open; closing one frees it.
    drop(held.remove(0));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (socket, status) = websocket(&server, PROXY, &[xff]).await;
        if status.contains("101") {
            held.push(socket);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the place was not released: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        metric(
            &server,
            "herald_connections_refused_total{reason=\"per_ip\"}"
        )
        .await
        .ends_with(" 1"),
        "the refusal is counted"
    );
}

#[tokio::test]
async fn a_spoofed_header_from_an_untrusted_peer_changes_nothing() {
    let server = TestServer::start_with(config(2), None).await;
    let mut held = Vec::new();
    for fake in ["198.51.100.1", "198.51.100.2"] {
        let header = format!("x-forwarded-for: {fake}");
        let (socket, status) = websocket(&server, STRANGER, &[&header]).await;
        assert!(status.contains("101"), "{status}");
        held.push(socket);
    }
    // The stranger is counted by its own address, whatever it claims: refused before reading.
    let (_, status) = websocket(&server, STRANGER, &["x-forwarded-for: 198.51.100.3"]).await;
    assert!(status.contains("429"), "{status}");
    let (_, status) = websocket(&server, STRANGER, &["forwarded: for=198.51.100.4"]).await;
    assert!(status.contains("429"), "{status}");
    // And it used none of the addresses it named: a proxied client with one of them is fine.
    let (_, status) = websocket(&server, PROXY, &["x-forwarded-for: 198.51.100.1"]).await;
    assert!(status.contains("101"), "{status}");
}

#[tokio::test]
async fn the_accept_rate_applies_per_forwarded_client() {
    let mut config = config(0);
    config.server.connection_rate_per_ip = 5;
    let server = TestServer::start_with(config, None).await;
    // The proxy opens more sockets than the rate allows one IP: none is refused.
    let mut sockets = Vec::new();
    for i in 0..10 {
        let mut socket = connect_from(&server, PROXY).await;
        let xff = format!("x-forwarded-for: 203.0.113.{}", 100 + i);
        assert!(health(&mut socket, &[&xff]).await.contains("200"));
        sockets.push(socket);
    }
    // Through one kept-alive socket, one client's requests are limited; another's are not.
    let mut proxied = sockets.pop().expect("a socket");
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..20 {
        let status = health(&mut proxied, &["x-forwarded-for: 203.0.113.5"]).await;
        if status.contains("200") {
            ok += 1;
        } else {
            assert!(status.contains("429"), "{status}");
            refused += 1;
        }
    }
    assert!(
        (5..=7).contains(&ok) && refused >= 13,
        "ok {ok}, refused {refused}"
    );
    let status = health(&mut proxied, &["x-forwarded-for: 203.0.113.6"]).await;
    assert!(status.contains("200"), "{status}");
    assert!(
        metric(
            &server,
            "herald_connections_refused_total{reason=\"accept_rate\"}"
        )
        .await
        .ends_with(&format!(" {refused}"))
    );
}

#[tokio::test]
async fn the_forwarded_header_when_configured() {
    let mut config = config(1);
    config.server.forwarded_header = ForwardedHeader::Forwarded;
    let server = TestServer::start_with(config, None).await;
    let v6 = "forwarded: for=\"[2001:db8::1]:4711\";proto=https;by=10.0.0.1";
    let (_first, status) = websocket(&server, PROXY, &[v6, "x-forwarded-for: 203.0.113.1"]).await;
    assert!(status.contains("101"), "{status}");
    let (_, status) = websocket(&server, PROXY, &[v6]).await;
    assert!(status.contains("429"), "the same client: {status}");
    // Several header lines are one list; the rightmost untrusted `for=` is the client.
    let (_second, status) = websocket(
        &server,
        PROXY,
        &[
            "forwarded: for=2.2.2.2",
            "Forwarded: for=192.0.2.60, for=10.0.0.7",
        ],
    )
    .await;
    assert!(status.contains("101"), "{status}");
    let (_, status) = websocket(&server, PROXY, &["forwarded: for=192.0.2.60;proto=http"]).await;
    assert!(status.contains("429"), "{status}");
    // X-Forwarded-For is not read in this mode: both requests are the proxy's own.
    let (_third, status) = websocket(&server, PROXY, &["x-forwarded-for: 203.0.113.1"]).await;
    assert!(status.contains("101"), "{status}");
    let (_, status) = websocket(&server, PROXY, &["x-forwarded-for: 203.0.113.2"]).await;
    assert!(status.contains("429"), "{status}");
}

#[tokio::test]
async fn malformed_headers_are_ignored_safely() {
    let server = TestServer::start_with(config(1), None).await;
    let long = format!("x-forwarded-for: {}", "1.1.1.1,".repeat(1000));
    let bad = [
        "x-forwarded-for: <script>",
        "x-forwarded-for: ,,,",
        "x-forwarded-for: 203.0.113.1,",
        "x-forwarded-for: 203.0.113.1, unknown",
        "x-forwarded-for: 203.0.113.1, _hidden",
        "x-forwarded-for: 999.1.1.1",
        long.as_str(),
    ];
    // Each is answered (none crashes anything), and each counts as the proxy's own request,
    // never as the address it pretends: one place for all of them together.
    let (_held, status) = websocket(&server, PROXY, &[bad[0]]).await;
    assert!(status.contains("101"), "{status}");
    for header in &bad[1..] {
        let (_, status) = websocket(&server, PROXY, &[header]).await;
        assert!(status.contains("429"), "{header}: {status}");
    }
    let mut raw = connect_from(&server, PROXY).await;
    let request = b"GET /connection/websocket HTTP/1.1\r\nhost: herald\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\nx-forwarded-for: 203.0.113.1\xff\r\n\r\n".to_vec();
    raw.write_all(&request).await.expect("write");
    assert!(
        read_status(&mut raw).await.contains("429"),
        "non-UTF-8 is ignored"
    );
    // A well-formed client is unaffected.
    let (_ok, status) = websocket(&server, PROXY, &["x-forwarded-for: 203.0.113.1"]).await;
    assert!(status.contains("101"), "{status}");
    let (status, _) = server.call("info", serde_json::json!({})).await;
    assert_eq!(status, 200, "the server is fine");
}

#[test]
fn bad_trusted_proxies_stop_start_up() {
    for (entry, says) in [("10.0.0.1/8", "10.0.0.0/8"), ("localhost", "localhost")] {
        let mut config = config(0);
        config.server.trusted_proxies = vec![entry.into()];
        let error = herald_server::build::check(&config)
            .expect_err("bad entry")
            .to_string();
        assert!(
            error.contains("server.trusted_proxies") && error.contains(says),
            "{error}"
        );
    }
}
