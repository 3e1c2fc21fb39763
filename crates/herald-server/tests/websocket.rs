//! The Centrifugo-protocol WebSocket endpoint end to end, driven by a raw WebSocket client:
//! connect, subscribe, live delivery in order, recovery after a disconnect, permissions,
//! pings, slow consumers and bad input.

mod common;

use std::time::Duration;

use common::TestServer;
use futures::{SinkExt, StreamExt};
use herald_server::config::{Config, Engine};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "websocket-test-secret-0123456789abcdef";

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn config() -> Config {
    let mut config = common::test_config(Engine::Memory);
    config.token.hmac_secret = SECRET.into();
    config.client.ping_interval = herald_core::duration::HumanDuration::from_secs(1);
    config.client.pong_timeout = herald_core::duration::HumanDuration::from_secs(1);
    config.client.max_queue_bytes = 256 * 1024;
    config.client.max_message_size = 8 * 1024;
    config.client.expired_close_delay = herald_core::duration::HumanDuration::from_secs(1);
    config.server.max_body_size = 1 << 20;
    let mut open = herald_core::namespace::NamedNamespace {
        name: "open".into(),
        options: herald_core::NamespaceOptions {
            allow_publish_for_client: true,
            allow_history_for_subscriber: true,
            allow_presence_for_subscriber: true,
            allow_subscribe_for_anonymous: true,
            presence: true,
            join_leave: true,
            ..Default::default()
        },
    };
    open.options.history_size = 100;
    config.namespaces.push(open);
    config
}

fn sub_token(user: &str, channel: &str, exp_in: i64) -> String {
    let now = herald_core::time::now_ms() as i64 / 1000;
    let claims =
        json!({"sub": user, "channel": channel, "exp": now + exp_in, "info": {"role": "member"}});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

fn token(user: &str, exp_in: i64) -> String {
    let now = herald_core::time::now_ms() as i64 / 1000;
    let claims = json!({"sub": user, "exp": now + exp_in, "info": {"name": user}});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

struct Client {
    socket: Socket,
    /// Messages received but not yet consumed (one frame may carry several).
    pending: std::collections::VecDeque<Value>,
    next_id: u32,
}

impl Client {
    async fn open(server: &TestServer) -> Self {
        let url = format!(
            "{}/connection/websocket",
            server.url.replace("http://", "ws://")
        );
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("ws connect");
        Self {
            socket,
            pending: Default::default(),
            next_id: 1,
        }
    }

    async fn connect(server: &TestServer, user: &str) -> Self {
        let mut client = Self::open(server).await;
        let reply = client
            .call("connect", json!({"token": token(user, 3600)}))
            .await;
        assert!(
            reply["connect"]["client"]
                .as_str()
                .is_some_and(|c| !c.is_empty()),
            "{reply}"
        );
        client
    }

    async fn send_raw(&mut self, text: &str) {
        self.socket.send(Message::text(text)).await.expect("send");
    }

    /// Next message; pings are answered with pongs and skipped.
    async fn next(&mut self) -> Value {
        loop {
            if let Some(value) = self.pending.pop_front() {
                if value == json!({}) {
                    self.send_raw("{}").await;
                    continue;
                }
                return value;
            }
            let message = tokio::time::timeout(Duration::from_secs(5), self.socket.next())
                .await
                .expect("a message within 5s")
                .expect("socket open")
                .expect("no socket error");
            match message {
                Message::Text(text) => {
                    for line in text.as_str().split('\n') {
                        assert!(!line.is_empty(), "no empty lines in frames: {text:?}");
                        self.pending
                            .push_back(serde_json::from_str(line).expect("JSON line"));
                    }
                }
                Message::Close(frame) => panic!("unexpected close: {frame:?}"),
                _ => {}
            }
        }
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut command = json!({"id": id});
        command[method] = params;
        self.send_raw(&command.to_string()).await;
        // Pushes that arrive before the reply are kept, in order, for later reads.
        let mut stash = Vec::new();
        let reply = loop {
            let message = self.next().await;
            if message["id"] == id {
                break message;
            }
            stash.push(message);
        };
        for message in stash.into_iter().rev() {
            self.pending.push_front(message);
        }
        reply
    }

    /// Waits for the server to close; returns the close code.
    async fn closed(&mut self) -> u16 {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), self.socket.next())
                .await
                .expect("close within 10s");
            match message {
                Some(Ok(Message::Close(Some(frame)))) => {
                    assert!(!frame.reason.is_empty(), "close frames carry a reason");
                    return u16::from(frame.code);
                }
                Some(Ok(Message::Close(None))) | None => panic!("closed without a code"),
                Some(Ok(_)) => {}
                Some(Err(err)) => panic!("socket error before close: {err}"),
            }
        }
    }

    /// Keeps reading (and answering pings) for `duration`; messages stay pending.
    async fn pump(&mut self, duration: Duration) {
        let until = tokio::time::Instant::now() + duration;
        while let Ok(message) = tokio::time::timeout_at(until, self.next()).await {
            self.pending.push_back(message);
        }
    }

    async fn publication(&mut self) -> Value {
        loop {
            let message = self.next().await;
            if !message["push"]["pub"].is_null() {
                return message["push"].clone();
            }
        }
    }
}

async fn publish(server: &TestServer, channel: &str, n: u64) -> Value {
    server
        .ok("publish", json!({"channel": channel, "data": {"n": n}}))
        .await
}

#[tokio::test]
async fn live_delivery_in_order() {
    let server = TestServer::start_with(config(), None).await;
    let mut client = Client::connect(&server, "alice").await;
    let reply = client.call("subscribe", json!({"channel": "news"})).await;
    assert_eq!(reply["subscribe"]["recoverable"], true, "{reply}");
    for n in 1..=50 {
        publish(&server, "news", n).await;
    }
    for n in 1..=50 {
        let push = client.publication().await;
        assert_eq!(push["channel"], "news");
        assert_eq!(push["pub"]["data"]["n"], n);
        assert_eq!(push["pub"]["offset"], n);
    }
}

#[tokio::test]
async fn recovers_exactly_the_missed_publications() {
    let server = TestServer::start_with(config(), None).await;
    let mut client = Client::connect(&server, "alice").await;
    publish(&server, "feed", 1).await;
    let reply = client.call("subscribe", json!({"channel": "feed"})).await;
    let epoch = reply["subscribe"]["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    let offset = reply["subscribe"]["offset"].as_u64().expect("offset");
    assert_eq!(offset, 1);
    publish(&server, "feed", 2).await;
    assert_eq!(client.publication().await["pub"]["offset"], 2);
    drop(client);

    for n in 3..=7 {
        publish(&server, "feed", n).await;
    }
    let mut client = Client::connect(&server, "alice").await;
    let reply = client
        .call(
            "subscribe",
            json!({"channel": "feed", "recover": true, "offset": 2, "epoch": epoch, "flag": 1}),
        )
        .await;
    let result = &reply["subscribe"];
    assert_eq!(result["recovered"], true, "{reply}");
    assert_eq!(result["was_recovering"], true);
    let offsets: Vec<u64> = result["publications"]
        .as_array()
        .expect("publications")
        .iter()
        .map(|p| p["offset"].as_u64().expect("offset"))
        .collect();
    assert_eq!(offsets, vec![3, 4, 5, 6, 7]);
    publish(&server, "feed", 8).await;
    assert_eq!(
        client.publication().await["pub"]["offset"],
        8,
        "live continues after recovery, no repeat"
    );

    // A stale epoch is answered "not recovered", never a silent gap.
    let mut other = Client::connect(&server, "bob").await;
    let reply = other
        .call(
            "subscribe",
            json!({"channel": "feed", "recover": true, "offset": 2, "epoch": "stale"}),
        )
        .await;
    assert_eq!(reply["subscribe"]["was_recovering"], true);
    assert!(
        reply["subscribe"]["recovered"].is_null(),
        "recovered:false is omitted: {reply}"
    );
    assert!(reply["subscribe"]["publications"].is_null());
    // With flag 2 the SDK asks for error 112 instead.
    let reply = other
        .call(
            "subscribe",
            json!({"channel": "feed2", "recover": true, "offset": 9, "epoch": "stale", "flag": 3}),
        )
        .await;
    assert_eq!(reply["error"]["code"], 112, "{reply}");
}

#[tokio::test]
async fn client_publish_history_presence_and_join_leave() {
    let server = TestServer::start_with(config(), None).await;
    let mut alice = Client::connect(&server, "alice").await;
    let mut bob = Client::connect(&server, "bob").await;
    alice
        .call("subscribe", json!({"channel": "open:room"}))
        .await;
    bob.call("subscribe", json!({"channel": "open:room"})).await;
    // Each subscriber sees joins, its own included.
    let join = loop {
        let message = alice.next().await;
        if message["push"]["join"]["info"]["user"] == "bob" {
            break message;
        }
        assert_eq!(
            message["push"]["join"]["info"]["user"], "alice",
            "{message}"
        );
    };
    assert!(join["push"]["join"]["info"]["client"].is_string());
    let published = bob
        .call(
            "publish",
            json!({"channel": "open:room", "data": {"text": "hi"}}),
        )
        .await;
    assert!(published["publish"].is_object(), "{published}");
    let push = alice.publication().await;
    assert_eq!(push["pub"]["data"]["text"], "hi");
    assert_eq!(push["pub"]["info"]["user"], "bob");
    assert_eq!(push["pub"]["info"]["conn_info"]["name"], "bob");
    let history = alice
        .call("history", json!({"channel": "open:room", "limit": 10}))
        .await;
    assert_eq!(history["history"]["publications"][0]["data"]["text"], "hi");
    let presence = alice
        .call("presence", json!({"channel": "open:room"}))
        .await;
    assert_eq!(
        presence["presence"]["presence"]
            .as_object()
            .expect("map")
            .len(),
        2
    );
    let stats = alice
        .call("presence_stats", json!({"channel": "open:room"}))
        .await;
    assert_eq!(
        stats["presence_stats"],
        json!({"num_clients": 2, "num_users": 2})
    );
    drop(bob);
    let leave = loop {
        let message = alice.next().await;
        if !message["push"]["leave"].is_null() {
            break message;
        }
    };
    assert_eq!(leave["push"]["leave"]["info"]["user"], "bob");
    let stats = alice
        .call("presence_stats", json!({"channel": "open:room"}))
        .await;
    assert_eq!(stats["presence_stats"]["num_clients"], 1);
}

#[tokio::test]
async fn permissions_are_enforced() {
    let server = TestServer::start_with(config(), None).await;
    let mut alice = Client::connect(&server, "alice").await;
    let denied = alice
        .call("subscribe", json!({"channel": "inbox:#bob"}))
        .await;
    assert!(
        denied["error"]["code"] == 103 || denied["error"]["code"] == 102,
        "{denied}"
    );
    let mine = alice.call("subscribe", json!({"channel": "#alice"})).await;
    assert!(mine["subscribe"].is_object(), "{mine}");
    let twice = alice.call("subscribe", json!({"channel": "#alice"})).await;
    assert_eq!(twice["error"]["code"], 105);
    let publish = alice
        .call("publish", json!({"channel": "news", "data": 1}))
        .await;
    assert_eq!(
        publish["error"]["code"], 103,
        "clients may not publish in the default namespace"
    );
    let history = alice
        .call("history", json!({"channel": "open:x", "limit": 1}))
        .await;
    assert_eq!(
        history["error"]["code"], 103,
        "history needs a subscription"
    );
    let unknown = alice.call("subscribe", json!({"channel": "nope:x"})).await;
    assert_eq!(unknown["error"]["code"], 102);
    let invalid = alice
        .call("subscribe", json!({"channel": "bad channel"}))
        .await;
    assert_eq!(invalid["error"]["code"], 107);
    let rpc = alice.call("rpc", json!({"method": "x", "data": {}})).await;
    assert_eq!(rpc["error"]["code"], 108);

    // Anonymous: refused unless configured.
    let mut anonymous = Client::open(&server).await;
    anonymous.send_raw(r#"{"id":1,"connect":{}}"#).await;
    assert_eq!(anonymous.closed().await, 3500);
}

#[tokio::test]
async fn bad_input_closes_with_protocol_codes() {
    let server = TestServer::start_with(config(), None).await;
    let mut early = Client::open(&server).await;
    early
        .send_raw(r#"{"id":1,"subscribe":{"channel":"news"}}"#)
        .await;
    assert_eq!(early.closed().await, 3501, "commands before connect");

    let mut garbage = Client::connect(&server, "alice").await;
    garbage.send_raw("{not json").await;
    assert_eq!(garbage.closed().await, 3501);

    let mut forged = Client::open(&server).await;
    forged
        .send_raw(r#"{"id":1,"connect":{"token":"a.b.c"}}"#)
        .await;
    assert_eq!(forged.closed().await, 3500);

    let mut expired = Client::open(&server).await;
    expired
        .send_raw(&json!({"id": 1, "connect": {"token": token("alice", -10)}}).to_string())
        .await;
    assert_eq!(
        expired.next().await["error"]["code"],
        109,
        "expired tokens get 109 so SDKs refresh"
    );

    let mut big = Client::connect(&server, "alice").await;
    let huge = format!(
        r#"{{"id":2,"publish":{{"channel":"open:x","data":"{}"}}}}"#,
        "x".repeat(20_000)
    );
    let _ = big.socket.send(Message::text(huge)).await;
    let code = big.closed().await;
    assert!(
        code == 3511 || code == 3501,
        "oversized message closed with {code}"
    );

    // The server is still fine.
    let mut ok = Client::connect(&server, "alice").await;
    assert!(ok.call("subscribe", json!({"channel": "news"})).await["subscribe"].is_object());
}

#[tokio::test]
async fn missing_pongs_disconnect_and_pongs_keep_alive() {
    let server = TestServer::start_with(config(), None).await;
    let mut silent = Client::connect(&server, "alice").await;
    // Read without answering pings.
    let code = loop {
        let message = tokio::time::timeout(Duration::from_secs(10), silent.socket.next())
            .await
            .expect("within 10s");
        if let Some(Ok(Message::Close(Some(frame)))) = message {
            break u16::from(frame.code);
        }
    };
    assert_eq!(code, 3012, "no pong");

    let mut polite = Client::connect(&server, "bob").await;
    polite.call("subscribe", json!({"channel": "news"})).await;
    polite.pump(Duration::from_millis(3500)).await;
    publish(&server, "news", 1).await;
    assert_eq!(
        polite.publication().await["pub"]["offset"],
        1,
        "a client that pongs stays connected"
    );
}

/// A subscriber to `channel` whose socket has a 4 KiB receive buffer, so that what it does
/// not read waits in the server's queue rather than in the client's kernel.
async fn small_buffer_subscriber(
    server: &TestServer,
    channel: &str,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let address: std::net::SocketAddr = server
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("address");
    let tcp = tokio::net::TcpSocket::new_v4().expect("socket");
    tcp.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = tcp.connect(address).await.expect("connect");
    let url = format!("ws://{address}/connection/websocket");
    let (mut socket, _) = tokio_tungstenite::client_async(url, stream)
        .await
        .expect("upgrade");
    let connect = json!({"id": 1, "connect": {"token": token("alice", 3600)}});
    let subscribe = json!({"id": 2, "subscribe": {"channel": channel}});
    socket
        .send(Message::text(format!("{connect}\n{subscribe}")))
        .await
        .expect("send");
    socket
}

/// Publishes `count` publications of about 1 KB each to `channel`, 100 per batch request.
async fn publish_padded(server: &TestServer, channel: &str, count: usize) {
    let pad = "p".repeat(1000);
    for batch in 0..count / 100 {
        let commands: Vec<Value> = (0..100)
            .map(|i| json!({"publish": {"channel": channel, "data": {"i": batch * 100 + i, "pad": pad}}}))
            .collect();
        let (status, _) = server.call("batch", json!({"commands": commands})).await;
        assert_eq!(status, 200);
    }
}

/// The pong deadline starts when the ping reaches the socket, not when it is queued: a
/// healthy client that is busy reading a backlog longer than `pong_timeout` is not taken for
/// dead (it used to be closed with 3012 while the ping still sat behind the backlog).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_behind_a_backlog_is_not_taken_for_dead() {
    let mut config = config();
    config.client.ping_interval = herald_core::duration::HumanDuration::from_secs(3);
    config.client.pong_timeout = herald_core::duration::HumanDuration::from_secs(2);
    config.client.max_queue_bytes = 32 << 20;
    let server = TestServer::start_with(config, None).await;
    let mut socket = small_buffer_subscriber(&server, "backlog").await;
    let started = tokio::time::Instant::now();
    // ~10 MB while the client reads nothing: past the kernel buffers, inside the queue budget.
    let total = 10_000;
    publish_padded(&server, "backlog", total).await;
    // Stay away past the first ping (3 s) plus its pong timeout (2 s), then read it all.
    tokio::time::sleep_until(started + Duration::from_millis(5500)).await;
    let mut received = 0;
    let mut pongs = 0;
    // Reading ~10 MB takes 2–6 s in a debug build on a busy 2-core machine; the window only
    // bounds the test, what it checks is that no close (3012) comes while the client reads.
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < until {
        let message = match tokio::time::timeout_at(until, socket.next()).await {
            Ok(message) => message,
            Err(_) => break,
        };
        match message {
            Some(Ok(Message::Text(text))) => {
                for line in text.as_str().split('\n') {
                    if line == "{}" {
                        socket.send(Message::text("{}")).await.expect("pong");
                        pongs += 1;
                    } else if line.starts_with("{\"push\"") {
                        received += 1;
                    }
                }
            }
            Some(Ok(Message::Close(frame))) => panic!(
                "closed after {received} of {total} publications and {pongs} pongs: {frame:?}"
            ),
            Some(Ok(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(received, total, "every publication arrived");
    assert!(pongs >= 1, "the ping behind the backlog was answered");
}

/// A client that stops reading while its queue stays under budget is still found out: its
/// ping never reaches the socket, and `ping_interval + pong_timeout` after the ping was queued
/// the server drops it (3008) instead of holding its backlog forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_without_filling_its_queue_is_dropped() {
    let mut config = config();
    config.client.max_queue_bytes = 32 << 20;
    let server = TestServer::start_with(config, None).await;
    let socket = small_buffer_subscriber(&server, "stuck").await;
    // ~8 MB, never read: past the kernel buffers, far under the 32 MiB queue budget.
    publish_padded(&server, "stuck", 8_000).await;
    let connections = || {
        server
            .state
            .realtime
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(connections(), 1);
    // First ping within 1 s, dropped 2 s later, then at most 2 s to give up on the close frame.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while connections() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a client that stopped reading is still held"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(socket);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_is_cut_off_as_slow() {
    let server = TestServer::start_with(config(), None).await;
    let mut stalled = Client::connect(&server, "alice").await;
    stalled
        .call("subscribe", json!({"channel": "firehose"}))
        .await;
    // Publish ~12 MB while the client reads nothing: more than the kernel buffers and the
    // 256 KiB queue budget together.
    publish_padded(&server, "firehose", 12_000).await;
    let dropped = server
        .state
        .node
        .stats()
        .dropped_deliveries
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        dropped > 0,
        "deliveries past the budget are dropped, not queued"
    );
    // Draining what the kernel buffered eventually reaches the close frame.
    let code = loop {
        let message = tokio::time::timeout(Duration::from_secs(20), stalled.socket.next())
            .await
            .expect("close within 20s");
        match message {
            Some(Ok(Message::Close(Some(frame)))) => break u16::from(frame.code),
            Some(Ok(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(code, 3008, "slow");
}

#[tokio::test]
async fn a_stalled_reader_in_a_conflating_namespace_gets_the_latest_and_stays() {
    let mut config = config();
    // No pings: the stalled client cannot answer them, and this test is about the queue.
    config.client.ping_interval = herald_core::duration::HumanDuration::from_secs(0);
    config
        .namespaces
        .push(herald_core::namespace::NamedNamespace {
            name: "ticker".into(),
            options: herald_core::NamespaceOptions {
                conflate: true,
                ..Default::default()
            },
        });
    let server = TestServer::start_with(config, None).await;
    let mut stalled = Client::connect(&server, "alice").await;
    for channel in ["ticker:a", "ticker:b"] {
        stalled.call("subscribe", json!({"channel": channel})).await;
    }
    // ~12 MB over two channels while the client reads nothing: far past the kernel buffers
    // and the 256 KiB queue budget.
    let chunk = "y".repeat(900);
    let batches = 60;
    for batch in 0..batches {
        let commands: Vec<Value> = (0..200)
            .map(|i| {
                let channel = if i % 2 == 0 { "ticker:a" } else { "ticker:b" };
                json!({"publish": {"channel": channel, "data": {"i": batch * 200 + i, "pad": chunk}}})
            })
            .collect();
        let (status, _) = server.call("batch", json!({"commands": commands})).await;
        assert_eq!(status, 200);
    }
    let last_a = batches * 200 - 2;
    let last_b = batches * 200 - 1;
    // Read until both channels' final publications arrived; never a close.
    let mut received = std::collections::HashMap::<String, Vec<(u64, u64)>>::new();
    loop {
        let push = stalled.publication().await;
        let channel = push["channel"].as_str().expect("channel").to_owned();
        let offset = push["pub"]["offset"].as_u64().expect("offset");
        let i = push["pub"]["data"]["i"].as_u64().expect("i");
        received.entry(channel).or_default().push((offset, i));
        let done = |ch: &str, last: u64| {
            received
                .get(ch)
                .and_then(|v| v.last())
                .is_some_and(|&(_, i)| i == last)
        };
        if done("ticker:a", last_a) && done("ticker:b", last_b) {
            break;
        }
    }
    let total: usize = received.values().map(Vec::len).sum();
    assert!(
        total < (batches * 200) as usize,
        "some publications were conflated away ({total} delivered)"
    );
    for (channel, pubs) in &received {
        assert!(
            pubs.windows(2).all(|w| w[0].0 < w[1].0),
            "{channel}: offsets only move forward"
        );
    }
    // Still connected and usable.
    assert!(
        stalled
            .call("presence_stats", json!({"channel": "ticker:a"}))
            .await["error"]["code"]
            == 103
    );
}

#[tokio::test]
async fn subscription_tokens_grant_refresh_and_expire() {
    let mut config = config();
    config
        .namespaces
        .push(herald_core::namespace::NamedNamespace {
            name: "private".into(),
            options: herald_core::NamespaceOptions {
                require_subscription_token: true,
                presence: true,
                allow_presence_for_subscriber: true,
                ..Default::default()
            },
        });
    let server = TestServer::start_with(config, None).await;
    let mut alice = Client::connect(&server, "alice").await;
    let channel = "private:room";
    let code = |reply: &Value| reply["error"]["code"].as_u64();
    // No token: the namespace refuses (103). Tokens for someone else or another channel:
    // 103. Expired: 109 (the SDKs fetch a new one). Garbage: 101.
    let attempts = [
        (json!({"channel": channel}), 103),
        (
            json!({"channel": channel, "token": sub_token("bob", channel, 60)}),
            103,
        ),
        (
            json!({"channel": channel, "token": sub_token("alice", "private:other", 60)}),
            103,
        ),
        (
            json!({"channel": channel, "token": sub_token("alice", channel, -5)}),
            109,
        ),
        (json!({"channel": channel, "token": "not.a.token"}), 101),
        (
            json!({"channel": channel, "token": token("alice", 60)}),
            101,
        ),
    ];
    for (request, expected) in attempts {
        let reply = alice.call("subscribe", request.clone()).await;
        assert_eq!(code(&reply), Some(expected), "{request}: {reply}");
    }
    // A good token (2 s): subscribed, told when it expires; chan_info shows in presence.
    let reply = alice
        .call(
            "subscribe",
            json!({"channel": channel, "token": sub_token("alice", channel, 2)}),
        )
        .await;
    assert_eq!(reply["subscribe"]["expires"], true, "{reply}");
    assert!(
        reply["subscribe"]["ttl"].as_u64().is_some_and(|t| t <= 2),
        "{reply}"
    );
    let presence = alice.call("presence", json!({"channel": channel})).await;
    let me = presence["presence"]["presence"]
        .as_object()
        .and_then(|m| m.values().next().cloned())
        .expect("alice is present");
    assert_eq!(me["chan_info"], json!({"role": "member"}), "{presence}");
    // sub_refresh with a new token extends it; a token for another channel does not.
    let refreshed = alice
        .call(
            "sub_refresh",
            json!({"channel": channel, "token": sub_token("alice", channel, 60)}),
        )
        .await;
    assert_eq!(refreshed["sub_refresh"]["expires"], true, "{refreshed}");
    assert!(
        refreshed["sub_refresh"]["ttl"]
            .as_u64()
            .is_some_and(|t| t > 50)
    );
    let wrong = alice
        .call(
            "sub_refresh",
            json!({"channel": channel, "token": sub_token("alice", "private:x", 60)}),
        )
        .await;
    assert_eq!(code(&wrong), Some(103));
    // Refreshed to 60 s: still subscribed after the first token (2 s + 1 s grace) is gone.
    alice.pump(Duration::from_millis(3500)).await;
    publish(&server, channel, 1).await;
    assert_eq!(alice.publication().await["pub"]["data"]["n"], 1);

    // Bob's token expires and is not refreshed: the server unsubscribes him with 2501.
    let mut bob = Client::connect(&server, "bob").await;
    let reply = bob
        .call(
            "subscribe",
            json!({"channel": channel, "token": sub_token("bob", channel, 1)}),
        )
        .await;
    assert_eq!(reply["subscribe"]["expires"], true, "{reply}");
    let unsubscribed = loop {
        let message = bob.next().await;
        if !message["push"]["unsubscribe"].is_null() {
            break message;
        }
    };
    assert_eq!(unsubscribed["push"]["channel"], channel);
    assert_eq!(unsubscribed["push"]["unsubscribe"]["code"], 2501);
    // Bob is no longer subscribed (presence needs a subscription), but still connected.
    let reply = bob.call("presence", json!({"channel": channel})).await;
    assert_eq!(code(&reply), Some(103), "{reply}");
}

#[tokio::test]
async fn the_server_api_disconnects_and_unsubscribes_users() {
    let server = TestServer::start_with(config(), None).await;
    let mut first = Client::connect(&server, "alice").await;
    let mut second = Client::connect(&server, "alice").await;
    let mut bob = Client::connect(&server, "bob").await;
    for client in [&mut first, &mut second, &mut bob] {
        client.call("subscribe", json!({"channel": "news"})).await;
    }
    let info = server.ok("info", json!({})).await;
    assert_eq!(info["nodes"][0]["num_clients"], 3, "{info}");
    assert_eq!(info["nodes"][0]["num_users"], 2, "alice twice, bob: {info}");

    // Unsubscribe alice (both connections) from news: an unsubscribe push with 2000, and
    // publications stop; bob still gets them.
    server
        .ok("unsubscribe", json!({"user": "alice", "channel": "news"}))
        .await;
    for client in [&mut first, &mut second] {
        let push = loop {
            let message = client.next().await;
            if !message["push"]["unsubscribe"].is_null() {
                break message;
            }
        };
        assert_eq!(push["push"]["channel"], "news");
        assert_eq!(push["push"]["unsubscribe"]["code"], 2000);
    }
    publish(&server, "news", 1).await;
    assert_eq!(bob.publication().await["pub"]["data"]["n"], 1);
    first.pump(Duration::from_millis(300)).await;
    assert!(
        first.pending.iter().all(|m| m["push"]["pub"].is_null()),
        "no publication after the unsubscribe: {:?}",
        first.pending
    );

    // Disconnect alice but keep one connection (whitelist): its client id comes from a
    // second connect reply, so reconnect one to learn it.
    let mut kept = Client::open(&server).await;
    let reply = kept
        .call("connect", json!({"token": token("alice", 3600)}))
        .await;
    let kept_id = reply["connect"]["client"].as_str().expect("id").to_owned();
    server
        .ok(
            "disconnect",
            json!({"user": "alice", "whitelist": [kept_id]}),
        )
        .await;
    assert_eq!(first.closed().await, 3503);
    assert_eq!(second.closed().await, 3503);
    assert!(kept.call("subscribe", json!({"channel": "news"})).await["subscribe"].is_object());
    // A reconnect-asking code, for one client.
    server
        .ok(
            "disconnect",
            json!({"user": "alice", "client": kept_id, "disconnect": {"code": 3000, "reason": "x"}}),
        )
        .await;
    assert_eq!(kept.closed().await, 3000);
    // Bob was never touched.
    publish(&server, "news", 2).await;
    assert_eq!(bob.publication().await["pub"]["data"]["n"], 2);
    // Bad input: no user, a code out of range (API errors: 200 with the code, as cent
    // expects), an unknown field (a malformed request: 400), an unknown channel.
    server.err("disconnect", json!({}), 200, 107).await;
    // A reason longer than a WebSocket close frame holds.
    let long = "x".repeat(124);
    let params = json!({"user": "bob", "disconnect": {"code": 3000, "reason": long}});
    server.err("disconnect", params, 200, 107).await;
    server
        .err(
            "disconnect",
            json!({"user": "bob", "disconnect": {"code": 1000}}),
            200,
            107,
        )
        .await;
    server
        .err(
            "unsubscribe",
            json!({"user": "bob", "channel": "news", "session": "s"}),
            400,
            107,
        )
        .await;
    server
        .err(
            "unsubscribe",
            json!({"user": "bob", "channel": "nope:x"}),
            200,
            102,
        )
        .await;
}

#[tokio::test]
async fn command_and_publication_rates_answer_error_111() {
    let mut config = config();
    config.client.commands_per_second = 10;
    config.client.publications_per_second_per_user = 3;
    let server = TestServer::start_with(config, None).await;
    let mut alice = Client::connect(&server, "alice").await;
    alice
        .call("subscribe", json!({"channel": "open:rate"}))
        .await;
    // Client publications: 3 per second for alice.
    let mut published = 0;
    let mut limited = 0;
    for _ in 0..6 {
        let reply = alice
            .call("publish", json!({"channel": "open:rate", "data": {"x": 1}}))
            .await;
        match reply["error"]["code"].as_u64() {
            None => published += 1,
            Some(111) => limited += 1,
            other => panic!("{other:?}: {reply}"),
        }
    }
    assert_eq!((published, limited), (3, 3));
    // Commands: a burst of 20 in one frame; about 10 minus those already used pass.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let frame: Vec<String> = (100..120)
        .map(|id| json!({"id": id, "presence_stats": {"channel": "open:rate"}}).to_string())
        .collect();
    alice.send_raw(&frame.join("\n")).await;
    let mut errors = 0;
    let mut answered = 0;
    while answered < 20 {
        let message = alice.next().await;
        if message["id"]
            .as_u64()
            .is_some_and(|id| (100..120).contains(&id))
        {
            answered += 1;
            if message["error"]["code"] == 111 {
                errors += 1;
            }
        }
    }
    assert!((9..=11).contains(&errors), "{errors} of 20 refused");
    // The connection stays usable once the bucket refills.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reply = alice
        .call("presence_stats", json!({"channel": "open:rate"}))
        .await;
    assert!(reply["presence_stats"].is_object(), "{reply}");
}

#[tokio::test]
async fn revoked_tokens_and_invalidated_users_cannot_connect() {
    let server = TestServer::start_with(config(), None).await;
    let now = herald_core::time::now_ms() as i64 / 1000;
    let sign = |claims: Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("sign")
    };
    let connects = |token: String| {
        let server = &server;
        async move {
            let mut client = Client::open(server).await;
            client
                .send_raw(&json!({"id": 1, "connect": {"token": token}}).to_string())
                .await;
            match tokio::time::timeout(Duration::from_secs(5), client.socket.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => text.as_str().contains("\"connect\""),
                Ok(Some(Ok(Message::Close(Some(frame))))) => {
                    assert_eq!(u16::from(frame.code), 3500);
                    false
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    let revoked = sign(json!({"sub": "alice", "exp": now + 600, "jti": "token-1", "iat": now}));
    let other = sign(json!({"sub": "alice", "exp": now + 600, "jti": "token-2", "iat": now}));
    assert!(connects(revoked.clone()).await);
    server
        .ok(
            "revoke_token",
            json!({"uid": "token-1", "expire_at": now + 600}),
        )
        .await;
    assert!(!connects(revoked).await, "a revoked jti is refused");
    assert!(
        connects(other).await,
        "another token of the same user is not"
    );

    let old = sign(json!({"sub": "bob", "exp": now + 600, "iat": now - 10}));
    let without_iat = sign(json!({"sub": "bob", "exp": now + 600}));
    let fresh = sign(json!({"sub": "bob", "exp": now + 600, "iat": now + 5}));
    server
        .ok(
            "invalidate_user_tokens",
            json!({"user": "bob", "issued_before": now}),
        )
        .await;
    assert!(!connects(old).await, "issued before the cut-off");
    assert!(
        !connects(without_iat).await,
        "no iat: cannot prove it is newer"
    );
    assert!(connects(fresh).await, "issued after the cut-off");
    server.err("revoke_token", json!({}), 200, 107).await;
    server
        .err(
            "invalidate_user_tokens",
            json!({"user": "bob", "jti": "x"}),
            400,
            107,
        )
        .await;
}

#[tokio::test]
async fn a_burst_of_subscribes_is_bounded() {
    let mut config = config();
    config.client.max_subscriptions = 100;
    let server = TestServer::start_with(config, None).await;
    let mut client = Client::connect(&server, "alice").await;
    // 3000 subscribe commands, 100 per frame, without waiting for replies.
    for chunk in 0..30 {
        let frame: Vec<String> = (0..100)
            .map(|i| {
                let n = chunk * 100 + i;
                json!({"id": 10 + n, "subscribe": {"channel": format!("burst-{n}")}}).to_string()
            })
            .collect();
        client.send_raw(&frame.join("\n")).await;
    }
    let mut ok = 0;
    let mut limited = 0;
    while ok + limited < 3000 {
        let message = client.next().await;
        if message["subscribe"].is_object() {
            ok += 1;
        } else if message["error"]["code"] == 106 {
            limited += 1;
        }
    }
    assert_eq!(ok, 100, "subscriptions stop at the per-connection limit");
    assert_eq!(limited, 2900);
    assert_eq!(server.state.node.hub().num_subscriptions(), 100);
    publish(&server, "burst-5", 1).await;
    assert_eq!(
        client.publication().await["channel"],
        "burst-5",
        "the connection still works"
    );
}

#[tokio::test]
async fn shutdown_closes_with_3001_and_expiry_with_3005() {
    // No pings here: an unanswered ping (3012) must not race the expiry being tested.
    let mut config = config();
    config.client.ping_interval = herald_core::duration::HumanDuration::ZERO;
    // `exp` has whole-second precision: a 2 s grace leaves a refresh sent 1.5 s after
    // connect (always past `exp`) at least 0.5 s of margin.
    config.client.expired_close_delay = herald_core::duration::HumanDuration::from_secs(2);
    let server = TestServer::start_with(config, None).await;
    let mut expiring = Client::open(&server).await;
    let reply = expiring
        .call("connect", json!({"token": token("alice", 1)}))
        .await;
    assert_eq!(reply["connect"]["expires"], true);
    assert_eq!(expiring.closed().await, 3005);

    let mut client = Client::connect(&server, "bob").await;
    server.state.realtime.shut_down();
    assert_eq!(client.closed().await, 3001);
}

/// A raw client of the Protobuf encoding: length-delimited `Command`s in binary frames.
mod protobuf {
    use super::*;
    use herald_transport::ws::proto;
    use prost::Message as _;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    pub async fn open(server: &TestServer, how: &str) -> (Socket, Option<String>) {
        let base = server.url.replace("http://", "ws://");
        let mut request = match how {
            "query" => format!("{base}/connection/websocket?format=protobuf"),
            _ => format!("{base}/connection/websocket"),
        }
        .into_client_request()
        .expect("request");
        if how == "subprotocol" {
            request.headers_mut().insert(
                "sec-websocket-protocol",
                "centrifuge-protobuf".parse().expect("header"),
            );
        }
        let (socket, response) = tokio_tungstenite::connect_async(request)
            .await
            .expect("ws connect");
        let echoed = response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        (socket, echoed)
    }

    pub fn frame(commands: &[proto::Command]) -> Message {
        let mut out = Vec::new();
        for command in commands {
            command.encode_length_delimited(&mut out).expect("encode");
        }
        Message::binary(out)
    }

    /// The next non-ping replies in a binary frame (pings are answered).
    pub async fn replies(socket: &mut Socket) -> Vec<proto::Reply> {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(5), socket.next())
                .await
                .expect("a message within 5s")
                .expect("socket open")
                .expect("no socket error");
            let Message::Binary(bytes) = message else {
                panic!("expected a binary frame, got {message:?}");
            };
            let mut rest = &bytes[..];
            let mut replies = Vec::new();
            while !rest.is_empty() {
                replies.push(proto::Reply::decode_length_delimited(&mut rest).expect("reply"));
            }
            replies.retain(|r| *r != proto::Reply::default());
            if replies.is_empty() {
                socket.send(Message::binary(vec![0u8])).await.expect("pong");
                continue;
            }
            return replies;
        }
    }
}

#[tokio::test]
async fn protobuf_encoding_by_subprotocol_and_by_query() {
    use herald_transport::ws::proto;
    let server = TestServer::start_with(config(), None).await;
    for how in ["subprotocol", "query"] {
        let (mut socket, echoed) = protobuf::open(&server, how).await;
        if how == "subprotocol" {
            assert_eq!(echoed.as_deref(), Some("centrifuge-protobuf"));
        }
        let channel = format!("open:pb-{how}");
        // Connect and subscribe in one frame: commands are batched as in JSON.
        let connect = proto::Command {
            id: 1,
            connect: Some(proto::ConnectRequest {
                token: token("alice", 3600),
                ..Default::default()
            }),
            ..Default::default()
        };
        let subscribe = proto::Command {
            id: 2,
            subscribe: Some(proto::SubscribeRequest {
                channel: channel.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        socket
            .send(protobuf::frame(&[connect, subscribe]))
            .await
            .expect("send");
        let mut replies = Vec::new();
        while replies.len() < 2 {
            replies.extend(protobuf::replies(&mut socket).await);
        }
        let connected = replies[0].connect.as_ref().expect("connect result");
        assert!(!connected.client.is_empty() && connected.ping == 1);
        let subscribed = replies[1].subscribe.as_ref().expect("subscribe result");
        assert!(subscribed.recoverable && !subscribed.epoch.is_empty());

        publish(&server, &channel, 1).await;
        // The namespace has join/leave on: alice's own join push may come first.
        let (push, publication) = loop {
            let push = protobuf::replies(&mut socket).await.remove(0);
            let push = push.push.expect("a push");
            if let Some(publication) = push.publication.clone() {
                break (push, publication);
            }
            assert!(push.join.is_some(), "only a join may precede: {push:?}");
        };
        assert_eq!(push.channel, channel);
        assert_eq!(publication.offset, 1);
        assert_eq!(
            &publication.data[..],
            br#"{"n":1}"#,
            "JSON data as its bytes"
        );

        // Errors carry the protocol's codes: the channel is already subscribed (105).
        let again = proto::Command {
            id: 3,
            subscribe: Some(proto::SubscribeRequest {
                channel: channel.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        socket.send(protobuf::frame(&[again])).await.expect("send");
        let reply = protobuf::replies(&mut socket).await.remove(0);
        assert_eq!((reply.id, reply.error.map(|e| e.code)), (3, Some(105)));
    }
}

#[tokio::test]
async fn protobuf_bad_input_closes_with_3501() {
    let server = TestServer::start_with(config(), None).await;
    let close_code = |socket: Socket| async move {
        let mut client = Client {
            socket,
            pending: Default::default(),
            next_id: 1,
        };
        client.closed().await
    };
    // Not a length-delimited Command.
    let (mut garbage, _) = protobuf::open(&server, "subprotocol").await;
    garbage
        .send(Message::binary(vec![0xff, 0xff, 0xff]))
        .await
        .expect("send");
    assert_eq!(close_code(garbage).await, 3501);
    // A length prefix longer than the frame.
    let (mut truncated, _) = protobuf::open(&server, "subprotocol").await;
    truncated
        .send(Message::binary(vec![40, 8, 1]))
        .await
        .expect("send");
    assert_eq!(close_code(truncated).await, 3501);
    // A text frame on a Protobuf connection, and a binary frame on a JSON one.
    let (mut text, _) = protobuf::open(&server, "subprotocol").await;
    text.send(Message::text("{}")).await.expect("send");
    assert_eq!(close_code(text).await, 3501);
    let mut json_client = Client::open(&server).await;
    json_client
        .socket
        .send(Message::binary(vec![0u8]))
        .await
        .expect("send");
    assert_eq!(json_client.closed().await, 3501);
}
