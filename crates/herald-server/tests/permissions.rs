//! One permission matrix, run through every transport: the bidirectional WebSocket, SSE,
//! HTTP streaming, long-poll and the uni-directional WebSocket must all decide exactly as
//! `herald_core::auth::check` does (they share it; this proves none of them bypasses it).

mod common;

use std::time::Duration;

use common::TestServer;
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

/// A connection token (None: anonymous), optionally granting `channels`.
fn token(user: Option<&str>, channels: &[&str]) -> Option<String> {
    let user = user?;
    let now = herald_core::time::now_ms() / 1000;
    Some(
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &json!({"sub": user, "exp": now + 600, "channels": channels}),
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("sign"),
    )
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

async fn websocket(server: &TestServer, token: Option<String>, channel: &str) -> bool {
    let url = format!(
        "{}/connection/websocket",
        server.url.replace("http://", "ws://")
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.expect("ws");
    let connect = json!({"id": 1, "connect": {"token": token.unwrap_or_default()}});
    let subscribe = json!({"id": 2, "subscribe": {"channel": channel}});
    socket
        .send(Message::text(format!("{connect}\n{subscribe}")))
        .await
        .expect("send");
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("a reply within 5s")
            .expect("open")
            .expect("ok");
        let Message::Text(text) = message else {
            continue;
        };
        for line in text.as_str().lines() {
            let reply: Value = serde_json::from_str(line).expect("json");
            if reply["id"] == 2 {
                // 105: the token's `channels` already subscribed it at connect (server-side).
                return reply["subscribe"].is_object() || reply["error"]["code"] == 105;
            }
        }
    }
}

/// One-way transports answer a refused subscription with an HTTP status before streaming.
async fn one_way(server: &TestServer, path: &str, token: Option<String>, channel: &str) -> bool {
    let mut request = reqwest::Client::new()
        .get(format!("{}{path}", server.url))
        .query(&[("channel", channel)]);
    if path.contains("poll") {
        request = request.query(&[("timeout", "0")]);
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    assert!(
        matches!(status, 200 | 401 | 403 | 404),
        "{path} {channel}: {status}"
    );
    status == 200
}

async fn uni_websocket(server: &TestServer, token: Option<String>, channel: &str) -> bool {
    let mut url = format!(
        "{}/connection/uni_websocket?channel={}",
        server.url.replace("http://", "ws://"),
        form_encode(channel)
    );
    if let Some(token) = token {
        url.push_str(&format!("&token={token}"));
    }
    tokio_tungstenite::connect_async(url).await.is_ok()
}

fn form_encode(text: &str) -> String {
    text.replace('#', "%23").replace(',', "%2C")
}

#[tokio::test]
async fn the_same_matrix_on_every_transport() {
    let server = TestServer::start_with(config(), None).await;
    let mut failures = Vec::new();
    for (who, channel, granted, expected) in matrix() {
        let token = || token(who, &granted);
        let results = [
            ("websocket", websocket(&server, token(), channel).await),
            (
                "sse",
                one_way(&server, "/connection/sse", token(), channel).await,
            ),
            (
                "stream",
                one_way(&server, "/connection/stream", token(), channel).await,
            ),
            (
                "poll",
                one_way(&server, "/connection/poll", token(), channel).await,
            ),
            (
                "uni_websocket",
                uni_websocket(&server, token(), channel).await,
            ),
        ];
        for (transport, allowed) in results {
            if allowed != expected {
                failures.push(format!(
                    "{transport}: {who:?} on {channel} (token channels {granted:?}): allowed={allowed}, expected {expected}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
