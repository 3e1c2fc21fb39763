//! Webhooks through the real server: publications and client lifecycle events delivered to
//! a local receiver, endpoints from the config file and from the server API (with bad
//! input), the delivery and attempt queries, replay — on SQLite (`outbound.db`).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestServer;
use common::webhooks::{of_type, receiver};
use herald_server::config::Engine;
use parking_lot::Mutex;
use serde_json::json;

const SECRET: &str = "webhook-test-token-secret-0123456789abcdef";
const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

async fn server(url: &str) -> TestServer {
    let mut config = common::test_config(Engine::Sqlite);
    config.token.hmac_secret = SECRET.into();
    config.webhooks = toml::from_str(&format!(
        r#"
        enabled = true
        allow_private_addresses = true
        retry_schedule = ["100ms", "100ms"]
        poll_interval = "50ms"
        [[endpoints]]
        id = "from-config"
        url = "{url}"
        events = ["publication", "client.connected", "client.disconnected", "client.subscribed",
                  "client.unsubscribed", "presence.join", "presence.leave", "push.failed"]
        channels = ["room:*"]
        secrets = ["{WHSEC}"]
        "#
    ))
    .expect("webhooks config");
    // Push without provider credentials: every delivery fails for good (push.failed).
    config.push.enabled = true;
    config.push.poll_interval = herald_core::duration::HumanDuration(Duration::from_millis(50));
    let dir = tempfile::tempdir().expect("tempdir");
    config.storage.data_dir = dir.path().to_owned();
    TestServer::start_with(config, Some(dir)).await
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_and_client_events_reach_a_config_endpoint() {
    let (url, seen) = receiver(Arc::new(Mutex::new(200))).await;
    let server = server(&url).await;
    let result = server
        .ok(
            "publish",
            json!({"channel": "room:1", "data": {"text": "hi"}}),
        )
        .await;
    server
        .ok("publish", json!({"channel": "other", "data": 1}))
        .await;
    until("the publication webhook", || {
        !of_type(&seen, "publication").is_empty()
    })
    .await;
    let publication = &of_type(&seen, "publication")[0];
    assert_eq!(publication["data"]["channel"], "room:1");
    assert_eq!(publication["data"]["data"], json!({"text": "hi"}));
    assert_eq!(publication["data"]["offset"], result["offset"]);
    assert_eq!(publication["data"]["epoch"], result["epoch"]);

    // A client connects and subscribes to a presence channel: connected, subscribed, join.
    let token = common::hs256(SECRET, &json!({"sub": "alice", "exp": 4_000_000_000u64}));
    let ws_url = format!("{}/connection/websocket", server.url.replace("http", "ws"));
    let (mut socket, _) = tokio_tungstenite::connect_async(ws_url).await.expect("ws");
    let reply = common::ws::command(&mut socket, 1, json!({"connect": {"token": token}})).await;
    assert!(reply.get("error").is_none(), "{reply}");
    let sub_token = common::hs256(
        SECRET,
        &json!({"sub": "alice", "channel": "room:2", "exp": 4_000_000_000u64}),
    );
    let reply = common::ws::command(
        &mut socket,
        2,
        json!({"subscribe": {"channel": "room:2", "token": sub_token}}),
    )
    .await;
    assert!(reply.get("error").is_none(), "{reply}");
    until("lifecycle webhooks", || {
        ["client.connected", "client.subscribed", "presence.join"]
            .iter()
            .all(|kind| !of_type(&seen, kind).is_empty())
    })
    .await;
    assert_eq!(
        of_type(&seen, "client.connected")[0]["data"]["user"],
        "alice"
    );
    assert_eq!(
        of_type(&seen, "client.connected")[0]["data"]["transport"],
        "websocket"
    );
    assert_eq!(
        of_type(&seen, "client.subscribed")[0]["data"]["channel"],
        "room:2"
    );
    assert_eq!(
        of_type(&seen, "presence.join")[0]["data"]["channel"],
        "room:2"
    );
    // Not asked for: nothing for "other".
    assert!(
        seen.lock()
            .iter()
            .all(|(_, b)| b["data"]["channel"] != "other")
    );
    socket.close(None).await.expect("close");
    until("the way back", || {
        [
            "client.disconnected",
            "client.unsubscribed",
            "presence.leave",
        ]
        .iter()
        .all(|kind| !of_type(&seen, kind).is_empty())
    })
    .await;
    assert_eq!(of_type(&seen, "presence.leave")[0]["data"]["user"], "alice");

    // A push that fails for good is told too.
    server
        .ok(
            "send_push_notification",
            json!({"recipient": {"fcm_tokens": ["dead-token"]},
                   "notification": {"fcm": {"message": {"data": {"k": "v"}}}}, "uid": "p-1"}),
        )
        .await;
    until("push.failed", || !of_type(&seen, "push.failed").is_empty()).await;
    let failed = &of_type(&seen, "push.failed")[0];
    assert_eq!(failed["data"]["uid"], "p-1");
    assert_eq!(failed["data"]["provider"], "fcm");
    assert!(
        failed["data"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("credentials")),
        "{failed}"
    );

    // The deliveries and their attempts are queryable.
    let message = seen.lock()[0].0.clone();
    let deliveries = server
        .ok(
            "webhook_deliveries",
            json!({"endpoint": "from-config", "states": ["sent"]}),
        )
        .await;
    assert!(
        deliveries["items"]
            .as_array()
            .expect("items")
            .iter()
            .any(|d| d["message"] == message.as_str() && d["state"] == "sent"),
        "{deliveries}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let attempts = server
            .ok("webhook_attempts", json!({"message": message}))
            .await;
        if attempts["items"].as_array().is_some_and(|a| !a.is_empty()) {
            assert_eq!(attempts["items"][0]["status"], 200, "{attempts}");
            assert_eq!(attempts["items"][0]["endpoint"], "from-config");
            break;
        }
        assert!(Instant::now() < deadline, "{attempts}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_are_managed_through_the_api_and_bad_input_is_refused() {
    let status = Arc::new(Mutex::new(200));
    let (url, seen) = receiver(status.clone()).await;
    let server = server(&url).await;
    let created = server
        .ok(
            "webhook_endpoint_create",
            json!({"id": "api-1", "url": url, "events": ["publication"], "channels": ["news*"]}),
        )
        .await;
    let secret = created["endpoint"]["secrets"][0]
        .as_str()
        .expect("secret")
        .to_owned();
    assert!(
        secret.starts_with("whsec_") && secret.len() > 30,
        "{created}"
    );
    let listed = server.ok("webhook_endpoint_list", json!({})).await;
    let items = listed["items"].as_array().expect("items");
    assert_eq!(items.len(), 2, "{listed}");
    assert!(
        items.iter().all(|e| e["secrets"][0]
            .as_str()
            .is_some_and(|s| s.starts_with("whsec_…"))),
        "listings hide secrets: {listed}"
    );
    assert!(
        items
            .iter()
            .any(|e| e["id"] == "from-config" && e["from_config"] == true)
    );

    for (params, needle) in [
        (
            json!({"id": "api-1", "url": url, "events": ["publication"]}),
            "already exists",
        ),
        (
            json!({"id": "bad id", "url": url, "events": ["publication"]}),
            "id",
        ),
        (
            json!({"id": "x", "url": "ftp://example.com", "events": ["publication"]}),
            "http",
        ),
        (
            json!({"id": "x", "url": url, "events": ["nope"]}),
            "unknown event type",
        ),
        (json!({"id": "x", "url": url, "events": []}), "events"),
        (
            json!({"id": "x", "url": url, "events": ["*"], "secrets": ["plain"]}),
            "whsec_",
        ),
        (
            json!({"id": "x", "url": url, "events": ["*"], "timeout": "1h"}),
            "timeout",
        ),
    ] {
        let error = server
            .err("webhook_endpoint_create", params, 200, 107)
            .await;
        assert!(
            error["detail"].as_str().is_some_and(|d| d.contains(needle)),
            "{needle}: {error}"
        );
    }
    server
        .err(
            "webhook_endpoint_create",
            json!({"id": "x", "url": url}),
            400,
            107,
        )
        .await;
    server
        .err(
            "webhook_endpoint_create",
            json!({"id": "x", "url": url, "events": ["*"], "colour": 1}),
            400,
            107,
        )
        .await;
    server
        .err("webhook_endpoint_update", json!({"id": "nope"}), 200, 107)
        .await;
    server
        .err(
            "webhook_endpoint_update",
            json!({"id": "from-config", "url": url}),
            200,
            107,
        )
        .await;
    server
        .err(
            "webhook_endpoint_delete",
            json!({"id": "from-config"}),
            200,
            107,
        )
        .await;
    server
        .err("webhook_endpoint_delete", json!({}), 400, 107)
        .await;
    server.err("webhook_deliveries", json!({}), 200, 107).await;
    server
        .err(
            "webhook_deliveries",
            json!({"endpoint": "api-1", "states": ["lost"]}),
            200,
            107,
        )
        .await;
    server
        .err("webhook_attempts", json!({"message": ""}), 200, 107)
        .await;
    server
        .err("webhook_replay", json!({"endpoint": "nope"}), 200, 107)
        .await;
    server
        .err(
            "webhook_replay",
            json!({"endpoint": "api-1", "message": ""}),
            200,
            107,
        )
        .await;

    // Rotation: the new secret first, the old kept; the listing shows both (hidden).
    let rotated = server
        .ok(
            "webhook_endpoint_update",
            json!({"id": "api-1", "secrets": [WHSEC, secret]}),
        )
        .await;
    assert_eq!(
        rotated["endpoint"]["secrets"].as_array().map(Vec::len),
        Some(2)
    );

    // A failing endpoint's deliveries become dead letters; replay sends them again with
    // the same webhook-id.
    *status.lock() = 500;
    server
        .ok("publish", json!({"channel": "news", "data": 1}))
        .await;
    until("three failed attempts", || seen.lock().len() >= 3).await;
    let message = seen.lock()[0].0.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let failed = server
            .ok(
                "webhook_deliveries",
                json!({"endpoint": "api-1", "states": ["failed"]}),
            )
            .await;
        if failed["items"].as_array().is_some_and(|a| a.len() == 1) {
            break;
        }
        assert!(Instant::now() < deadline, "{failed}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    *status.lock() = 200;
    let replayed = server
        .ok("webhook_replay", json!({"endpoint": "api-1"}))
        .await;
    assert_eq!(replayed["replayed"], 1);
    until("the replayed delivery", || seen.lock().len() == 4).await;
    assert_eq!(seen.lock()[3].0, message, "a replay keeps the webhook-id");

    server
        .ok("webhook_endpoint_delete", json!({"id": "api-1"}))
        .await;
    let listed = server.ok("webhook_endpoint_list", json!({})).await;
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_methods_say_when_webhooks_are_off() {
    let server = TestServer::start(Engine::Memory).await;
    server
        .err("webhook_endpoint_list", json!({}), 200, 108)
        .await;
}
