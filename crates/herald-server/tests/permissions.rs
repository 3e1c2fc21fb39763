//! One permission matrix, run through every transport: the bidirectional WebSocket, SSE,
//! HTTP streaming, long-poll and the uni-directional WebSocket must all decide exactly as
//! `herald_core::auth::check` does (they share it; this proves none of them bypasses it).

mod common;

use std::time::Duration;

use common::TestServer;
use common::subscribe::{Outcome, Transport, subscribe};
use futures::{SinkExt, StreamExt};
use herald_server::config::{Config, Engine};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "permissions-test-secret-0123456789abc";

fn config() -> Config {
    let mut config = common::test_config(Engine::Memory);
    config.token.hmac_secret = SECRET.into();
    config.client.allow_anonymous = true;
    let namespace = |name: &str, options: herald_core::NamespaceOptions| {
        herald_core::namespace::NamedNamespace {
            name: name.into(),
            options,
        }
    };
    config.namespaces.push(namespace(
        "public",
        herald_core::NamespaceOptions {
            allow_subscribe_for_anonymous: true,
            ..Default::default()
        },
    ));
    config.namespaces.push(namespace(
        "private",
        herald_core::NamespaceOptions {
            require_subscription_token: true,
            ..Default::default()
        },
    ));
    config
}

/// `claims` signed with the test secret (HS256).
fn sign(claims: &Value) -> String {
    common::hs256(SECRET, &claims)
}

fn now() -> u64 {
    herald_core::time::now_ms() / 1000
}

/// A connection token (None: anonymous), optionally granting `channels`.
fn token(user: Option<&str>, channels: &[&str]) -> Option<String> {
    let user = user?;
    Some(sign(
        &json!({"sub": user, "exp": now() + 600, "channels": channels}),
    ))
}

/// (who, channel, channels granted in the token, allowed?)
fn matrix() -> Vec<(Option<&'static str>, &'static str, Vec<&'static str>, bool)> {
    vec![
        // The default namespace: any user, not anonymous.
        (Some("alice"), "news", vec![], true),
        (None, "news", vec![], false),
        // A namespace open to anonymous users.
        (None, "public:feed", vec![], true),
        (Some("alice"), "public:feed", vec![], true),
        // User-limited channels: only the users listed after `#`.
        (Some("alice"), "room#alice", vec![], true),
        (Some("bob"), "room#alice", vec![], false),
        (Some("bob"), "room#alice,bob", vec![], true),
        (None, "public:#alice", vec![], false),
        // Private namespace: only with the channel granted in the token.
        (Some("alice"), "private:room", vec![], false),
        (Some("alice"), "private:room", vec!["private:room"], true),
        (Some("alice"), "private:room", vec!["private:other"], false),
        // Unknown namespace: refused on every transport.
        (Some("alice"), "nowhere:x", vec![], false),
    ]
}

#[tokio::test]
async fn the_same_matrix_on_every_transport() {
    let server = TestServer::start_with(config(), None).await;
    let mut failures = Vec::new();
    for (who, channel, granted, expected) in matrix() {
        for transport in Transport::ALL {
            let outcome = subscribe(&server, transport, token(who, &granted), channel).await;
            if outcome.allowed() != expected {
                failures.push(format!(
                    "{transport:?}: {who:?} on {channel} (token channels {granted:?}): {outcome:?}, expected allowed={expected}"
                ));
            }
            if let Outcome::Refused {
                status: Some(status),
                ..
            } = outcome
            {
                assert!(
                    matches!(status, 401 | 403 | 404),
                    "{transport:?} {channel}: {status}"
                );
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A subscription token: `user` may subscribe to `channel` for `exp_in` seconds.
fn sub_token(user: &str, channel: &str, exp_in: u64) -> String {
    sign(&json!({"sub": user, "channel": channel, "exp": now() + exp_in}))
}

/// A one-way request to `path` as alice (a connection token granting nothing) with `query`.
async fn as_alice(server: &TestServer, path: &str, query: &[(&str, &str)]) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .get(format!("{}{path}", server.url))
        .query(query)
        .bearer_auth(token(Some("alice"), &[]).expect("token"));
    if path.contains("poll") {
        request = request.query(&[("timeout", "0")]);
    }
    request.send().await.expect("request")
}

/// A one-way request for `channel` as alice with `sub_token`: its HTTP status.
async fn one_way_status(server: &TestServer, path: &str, channel: &str, sub: &str) -> u16 {
    as_alice(server, path, &[("channel", channel), ("sub_token", sub)])
        .await
        .status()
        .as_u16()
}

/// The uni-directional WebSocket with everything in its first message: true when it starts
/// streaming, false when it is closed with a refusal.
async fn uni_websocket_first_message(server: &TestServer, channel: &str, sub: &str) -> bool {
    let url = format!(
        "{}/connection/uni_websocket",
        server.url.replace("http://", "ws://")
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.expect("ws");
    let first =
        json!({"channels": [channel], "token": token(Some("alice"), &[]), "sub_tokens": [sub]});
    socket
        .send(Message::text(first.to_string()))
        .await
        .expect("send");
    loop {
        match tokio::time::timeout(Duration::from_secs(5), socket.next()).await {
            // A refusal is an `error` message, then the close frame.
            Ok(Some(Ok(Message::Text(text)))) if text.as_str().contains("\"error\"") => {}
            Ok(Some(Ok(Message::Text(_)))) => return true,
            Ok(Some(Ok(Message::Close(Some(frame))))) => {
                assert!(
                    matches!(u16::from(frame.code), 3500 | 3501 | 3507),
                    "{frame:?}"
                );
                return false;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// One-way transports take subscription tokens (`?sub_token=`, repeatable, or `sub_tokens`
/// in the uni-directional WebSocket's first message) and decide as the WebSocket does: the
/// user's token for the channel grants it by itself; another user's is refused (403), and so
/// is a token for a channel that was not requested (400).
#[tokio::test]
async fn one_way_transports_take_subscription_tokens() {
    let server = TestServer::start_with(config(), None).await;
    let cases = [
        (sub_token("alice", "private:room", 600), 200),
        (sub_token("bob", "private:room", 600), 403),
        (sub_token("alice", "private:other", 600), 400),
    ];
    let mut failures = Vec::new();
    for (sub, expected) in &cases {
        for path in ["/connection/sse", "/connection/stream", "/connection/poll"] {
            let status = one_way_status(&server, path, "private:room", sub).await;
            if status != *expected {
                failures.push(format!("{path}: {status}, expected {expected}"));
            }
        }
        let url = format!(
            "{}/connection/uni_websocket?channel=private:room&sub_token={sub}&token={}",
            server.url.replace("http://", "ws://"),
            token(Some("alice"), &[]).expect("token")
        );
        let by_url = tokio_tungstenite::connect_async(url).await.is_ok();
        let by_message = uni_websocket_first_message(&server, "private:room", sub).await;
        for (how, allowed) in [("url", by_url), ("first message", by_message)] {
            if allowed != (*expected == 200) {
                failures.push(format!(
                    "uni_websocket by {how}: allowed={allowed}, expected {expected}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Granted, it delivers; and the stream ends (3005) when the subscription token expires,
    // since a one-way client cannot refresh it: it reconnects with fresh tokens.
    let short = sub_token("alice", "private:room", 2);
    let response = as_alice(
        &server,
        "/connection/stream",
        &[("channel", "private:room"), ("sub_token", &short)],
    )
    .await;
    assert_eq!(response.status().as_u16(), 200);
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    let mut published = false;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(chunk)) = body.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if !published {
                published = true;
                server
                    .ok(
                        "publish",
                        json!({"channel": "private:room", "data": {"n": 1}}),
                    )
                    .await;
            }
            if seen.contains("3005") {
                return true;
            }
        }
        false
    })
    .await
    .expect("the stream ends within 10 s");
    assert!(ended, "ended with 3005: {seen}");
    assert!(
        seen.contains("\"n\":1"),
        "the publication arrived first: {seen}"
    );
}

/// A subscription token's `info` is the one-way client's `chan_info` in that channel's
/// presence (as on the WebSocket); a channel without a token shows none.
#[tokio::test]
async fn a_subscription_tokens_info_shows_in_one_way_presence() {
    let server = TestServer::start_with(config(), None).await;
    let with_info = sign(&json!({
        "sub": "alice", "channel": "room:1", "exp": now() + 600, "info": {"role": "mod"}
    }));
    let response = as_alice(
        &server,
        "/connection/stream",
        &[
            ("channel", "room:1"),
            ("channel", "room:2"),
            ("sub_token", &with_info),
        ],
    )
    .await;
    assert_eq!(response.status().as_u16(), 200);
    let mut body = response.bytes_stream();
    let _connected = tokio::time::timeout(Duration::from_secs(5), body.next())
        .await
        .expect("connected within 5s");
    let members = |presence: Value| -> Vec<Value> {
        presence["presence"]
            .as_object()
            .expect("presence map")
            .values()
            .cloned()
            .collect()
    };
    let one = members(server.ok("presence", json!({"channel": "room:1"})).await);
    assert_eq!(one.len(), 1, "{one:?}");
    assert_eq!(one[0]["user"], "alice");
    assert_eq!(one[0]["chan_info"], json!({"role": "mod"}));
    let two = members(server.ok("presence", json!({"channel": "room:2"})).await);
    assert_eq!(two.len(), 1, "{two:?}");
    assert!(two[0]["chan_info"].is_null(), "{two:?}");
    drop(body);
}
