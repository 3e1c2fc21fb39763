//! The server HTTP API end to end over real HTTP, on both engines.

mod common;

use common::{API_KEY, TestServer};
use herald_server::config::Engine;
use serde_json::json;

async fn publish_history_round_trip(engine: Engine) {
    let server = TestServer::start(engine).await;
    let first = server
        .ok(
            "publish",
            json!({"channel": "news", "data": {"n": 1}, "tags": {"k": "v"}}),
        )
        .await;
    assert_eq!(first["offset"], 1);
    let epoch = first["epoch"].as_str().expect("epoch").to_owned();
    for n in 2..=5 {
        let result = server
            .ok("publish", json!({"channel": "news", "data": {"n": n}}))
            .await;
        assert_eq!(result["offset"], n);
        assert_eq!(result["epoch"], epoch.as_str());
    }
    let history = server
        .ok("history", json!({"channel": "news", "limit": -1}))
        .await;
    let publications = history["publications"].as_array().expect("array");
    let ns: Vec<i64> = publications
        .iter()
        .map(|p| p["data"]["n"].as_i64().expect("n"))
        .collect();
    assert_eq!(ns, vec![1, 2, 3, 4, 5]);
    assert_eq!(publications[0]["tags"]["k"], "v");
    assert_eq!(history["offset"], 5);
    assert_eq!(history["epoch"], epoch.as_str());

    let page = server
        .ok(
            "history",
            json!({"channel": "news", "limit": 2, "since": {"offset": 2, "epoch": epoch}}),
        )
        .await;
    let offsets: Vec<u64> = page["publications"]
        .as_array()
        .expect("array")
        .iter()
        .map(|p| p["offset"].as_u64().expect("offset"))
        .collect();
    assert_eq!(offsets, vec![3, 4]);
    let back = server
        .ok("history", json!({"channel": "news", "limit": 2, "reverse": true, "since": {"offset": 4, "epoch": epoch}}))
        .await;
    let offsets: Vec<u64> = back["publications"]
        .as_array()
        .expect("array")
        .iter()
        .map(|p| p["offset"].as_u64().expect("offset"))
        .collect();
    assert_eq!(offsets, vec![3, 2]);

    let position_only = server.ok("history", json!({"channel": "news"})).await;
    assert_eq!(position_only["publications"], json!([]));
    assert_eq!(position_only["offset"], 5);

    server
        .ok("history_remove", json!({"channel": "news"}))
        .await;
    let removed = server
        .ok("history", json!({"channel": "news", "limit": -1}))
        .await;
    assert_eq!(removed["publications"], json!([]));
    assert_eq!(removed["offset"], 5, "remove keeps the offset");
}

#[tokio::test]
async fn publish_and_history_memory() {
    publish_history_round_trip(Engine::Memory).await;
}

#[tokio::test]
async fn publish_and_history_sqlite() {
    publish_history_round_trip(Engine::Sqlite).await;
}

#[tokio::test]
async fn idempotency_key_publishes_once() {
    let server = TestServer::start(Engine::Sqlite).await;
    let params = json!({"channel": "orders", "data": "x", "idempotency_key": "order-42"});
    let first = server.ok("publish", params.clone()).await;
    let again = server.ok("publish", params).await;
    assert_eq!(first, again);
    let history = server
        .ok("history", json!({"channel": "orders", "limit": -1}))
        .await;
    assert_eq!(history["publications"].as_array().expect("array").len(), 1);
}

#[tokio::test]
async fn binary_payloads_skip_history_and_no_history_namespaces() {
    let server = TestServer::start(Engine::Memory).await;
    let result = server
        .ok("publish", json!({"channel": "bin", "b64data": "AAEC/w=="}))
        .await;
    assert_eq!(result["offset"], 1);
    let history = server
        .ok("history", json!({"channel": "bin", "limit": 1}))
        .await;
    assert_eq!(history["publications"][0]["b64data"], "AAEC/w==");
    assert!(history["publications"][0]["data"].is_null());

    let skipped = server
        .ok(
            "publish",
            json!({"channel": "bin", "data": 1, "skip_history": true}),
        )
        .await;
    assert_eq!(skipped, json!({}), "skip_history returns no position");
    let live = server
        .ok("publish", json!({"channel": "live:x", "data": 1}))
        .await;
    assert_eq!(live, json!({}));
    server
        .err("history", json!({"channel": "live:x"}), 200, 108)
        .await;
    server
        .err(
            "publish",
            json!({"channel": "bin", "b64data": "***"}),
            200,
            107,
        )
        .await;
}

#[tokio::test]
async fn broadcast_reports_per_channel() {
    let server = TestServer::start(Engine::Memory).await;
    let result = server
        .ok(
            "broadcast",
            json!({"channels": ["a", "b", "nope:c", ""], "data": {"x": 1}}),
        )
        .await;
    let responses = result["responses"].as_array().expect("responses");
    assert_eq!(responses.len(), 4);
    assert_eq!(responses[0]["result"]["offset"], 1);
    assert_eq!(responses[1]["result"]["offset"], 1);
    assert_eq!(responses[2]["error"]["code"], 102);
    assert_eq!(responses[3]["error"]["code"], 107);
    server
        .err("broadcast", json!({"channels": [], "data": 1}), 200, 107)
        .await;
}

#[tokio::test]
async fn batch_runs_commands_in_order() {
    let server = TestServer::start(Engine::Memory).await;
    let (status, body) = server
        .call(
            "batch",
            json!({"commands": [
                {"publish": {"channel": "a", "data": 1}},
                {"publish": {"channel": "a", "data": 2}},
                {"history": {"channel": "a", "limit": -1}},
                {"presence_stats": {"channel": "room:1"}},
                {"nope": {}},
                {"publish": {"channel": "bad channel", "data": 1}}
            ], "parallel": false}),
        )
        .await;
    assert_eq!(status, 200);
    let replies = body["replies"].as_array().expect("replies");
    assert_eq!(replies[0]["publish"]["offset"], 1);
    assert_eq!(replies[1]["publish"]["offset"], 2);
    assert_eq!(
        replies[2]["history"]["publications"]
            .as_array()
            .expect("array")
            .len(),
        2
    );
    assert_eq!(
        replies[3]["presence_stats"],
        json!({"num_clients": 0, "num_users": 0})
    );
    assert_eq!(replies[4]["error"]["code"], 104);
    assert_eq!(replies[5]["error"]["code"], 107);
    let (_, parallel) = server
        .call(
            "batch",
            json!({"commands": [{"info": {}}, {"channels": {}}], "parallel": true}),
        )
        .await;
    assert_eq!(parallel["replies"][1]["channels"], json!({"channels": {}}));
    let (_, empty) = server.call("batch", json!({"commands": []})).await;
    assert_eq!(empty, json!({"replies": []}));
}

#[tokio::test]
async fn presence_of_an_empty_channel() {
    let server = TestServer::start(Engine::Memory).await;
    assert_eq!(
        server.ok("presence", json!({"channel": "room:1"})).await,
        json!({"presence": {}})
    );
    assert_eq!(
        server
            .ok("presence_stats", json!({"channel": "room:1"}))
            .await,
        json!({"num_clients": 0, "num_users": 0})
    );
    server
        .err("presence", json!({"channel": "news"}), 200, 108)
        .await;
    assert_eq!(
        server.ok("channels", json!({"pattern": "room:*"})).await,
        json!({"channels": {}})
    );
    let (status, body) = server.raw("info", "").await;
    assert_eq!(status, 200, "an empty body means no parameters: {body}");
}

const SECRET: &str = "api-test-secret-0123456789abcdef0123";

/// An SSE connection of `user` to `channels`, open once its `connected` event has arrived
/// (its subscriptions are in place then). Dropping it closes the connection.
async fn subscriber(
    server: &TestServer,
    user: &str,
    channels: &[&str],
) -> impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin {
    use futures::StreamExt;
    let now = herald_core::time::now_ms() / 1000;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user, "exp": now + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign");
    let query: Vec<String> = channels.iter().map(|c| format!("channel={c}")).collect();
    let response = server
        .http
        .get(format!("{}/connection/sse?{}", server.url, query.join("&")))
        .bearer_auth(token)
        .send()
        .await
        .expect("sse");
    assert_eq!(response.status().as_u16(), 200, "{user} {channels:?}");
    let mut body = Box::pin(response.bytes_stream());
    let mut seen = String::new();
    while !seen.contains("event: connected") {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(5), body.next())
            .await
            .expect("the connected event within 5s")
            .expect("stream open")
            .expect("chunk");
        seen.push_str(std::str::from_utf8(&chunk).expect("utf-8"));
    }
    body
}

/// Calls `method` until its result equals `want` (state that settles after a disconnect),
/// failing with the last result after 5 s.
async fn settles(
    server: &TestServer,
    method: &str,
    params: serde_json::Value,
    want: serde_json::Value,
) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let got = server.ok(method, params.clone()).await;
        if got == want || tokio::time::Instant::now() > deadline {
            assert_eq!(got, want, "{method} {params}");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

fn info_counts(info: &serde_json::Value) -> serde_json::Value {
    let node = &info["nodes"][0];
    json!({
        "num_clients": node["num_clients"],
        "num_users": node["num_users"],
        "num_channels": node["num_channels"],
        "num_subs": node["num_subs"],
    })
}

#[tokio::test]
async fn channels_and_info_count_real_subscribers() {
    let started = std::time::Instant::now();
    let mut config = common::test_config(Engine::Memory);
    config.token.hmac_secret = SECRET.into();
    config.server.name = "node-a".into();
    let server = TestServer::start_with(config, None).await;

    let _alice = subscriber(&server, "alice", &["room:1", "room:2", "news"]).await;
    let alice_again = subscriber(&server, "alice", &["room:1"]).await;
    let _bob = subscriber(&server, "bob", &["room:1", "chat-x"]).await;

    assert_eq!(
        server.ok("channels", json!({})).await,
        json!({"channels": {
            "chat-x": {"num_clients": 1},
            "news": {"num_clients": 1},
            "room:1": {"num_clients": 3},
            "room:2": {"num_clients": 1},
        }})
    );
    assert_eq!(
        server.ok("channels", json!({"pattern": ""})).await,
        server.ok("channels", json!({})).await,
        "an empty pattern is no filter"
    );
    assert_eq!(
        server.ok("channels", json!({"pattern": "room:*"})).await,
        json!({"channels": {"room:1": {"num_clients": 3}, "room:2": {"num_clients": 1}}})
    );
    assert_eq!(
        server.ok("channels", json!({"pattern": "*s"})).await,
        json!({"channels": {"news": {"num_clients": 1}}})
    );
    assert_eq!(
        server.ok("channels", json!({"pattern": "room:2"})).await,
        json!({"channels": {"room:2": {"num_clients": 1}}}),
        "without `*` the pattern is the whole name"
    );
    assert_eq!(
        server.ok("channels", json!({"pattern": "room"})).await,
        json!({"channels": {}})
    );
    assert_eq!(
        server
            .ok("presence_stats", json!({"channel": "room:1"}))
            .await,
        json!({"num_clients": 3, "num_users": 2})
    );

    let info = server.ok("info", json!({})).await;
    assert_eq!(info["nodes"].as_array().map(Vec::len), Some(1), "{info}");
    assert_eq!(
        info_counts(&info),
        json!({"num_clients": 3, "num_users": 2, "num_channels": 4, "num_subs": 6})
    );
    let node = &info["nodes"][0];
    assert_eq!(node["name"], "node-a");
    assert_eq!(node["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(node["uid"], server.state.node.info().uid.as_str());
    let uid = node["uid"].as_str().expect("uid");
    assert_eq!(uid.len(), 36, "a UUID: {uid}");
    assert_eq!(uid.matches('-').count(), 4, "a UUID: {uid}");
    let uptime = node["uptime"].as_u64().expect("uptime");
    assert!(
        uptime <= started.elapsed().as_secs(),
        "uptime {uptime}s is longer than this test has run"
    );

    // One connection of alice goes: her other one keeps her a user.
    drop(alice_again);
    settles(
        &server,
        "channels",
        json!({"pattern": "room:1"}),
        json!({"channels": {"room:1": {"num_clients": 2}}}),
    )
    .await;
    // The server API closes bob's connection: his channel and user are gone.
    server.ok("disconnect", json!({"user": "bob"})).await;
    settles(
        &server,
        "channels",
        json!({}),
        json!({"channels": {
            "news": {"num_clients": 1},
            "room:1": {"num_clients": 1},
            "room:2": {"num_clients": 1},
        }}),
    )
    .await;
    let info = server.ok("info", json!({})).await;
    assert_eq!(
        info_counts(&info),
        json!({"num_clients": 1, "num_users": 1, "num_channels": 3, "num_subs": 3})
    );
    // The same through batch.
    let (_, batch) = server
        .call(
            "batch",
            json!({"commands": [{"info": {}}, {"channels": {"pattern": "n*"}}]}),
        )
        .await;
    assert_eq!(
        info_counts(&batch["replies"][0]["info"]),
        info_counts(&info)
    );
    assert_eq!(
        batch["replies"][1]["channels"],
        json!({"channels": {"news": {"num_clients": 1}}})
    );
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let server = TestServer::start(Engine::Memory).await;
    // Malformed JSON and unknown fields: 400 with a JSON body.
    let (status, body) = server
        .raw("publish", "{\"channel\": \"a\", \"data\": ")
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], 107);
    let (status, body) = server
        .call(
            "publish",
            json!({"channel": "a", "data": 1, "skip_hisotry": true}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["detail"]
            .as_str()
            .expect("detail")
            .contains("skip_hisotry")
    );
    let (status, _) = server
        .call("publish", json!({"channel": 5, "data": 1}))
        .await;
    assert_eq!(status, 400, "wrong type");
    // Channel names.
    server
        .err(
            "publish",
            json!({"channel": "a".repeat(256), "data": 1}),
            200,
            107,
        )
        .await;
    server
        .err(
            "publish",
            json!({"channel": "has space", "data": 1}),
            200,
            107,
        )
        .await;
    server
        .err("publish", json!({"channel": "", "data": 1}), 200, 107)
        .await;
    server
        .err(
            "publish",
            json!({"channel": "unknown:x", "data": 1}),
            200,
            102,
        )
        .await;
    server
        .err("publish", json!({"channel": "a"}), 200, 107)
        .await;
    // Payload and body limits: 413 with a JSON body, nothing stored.
    let big = "x".repeat(2000);
    server
        .err("publish", json!({"channel": "a", "data": big}), 413, 106)
        .await;
    let huge = "y".repeat(10_000);
    server
        .err("publish", json!({"channel": "a", "data": huge}), 413, 106)
        .await;
    let history = server
        .ok("history", json!({"channel": "a", "limit": -1}))
        .await;
    assert_eq!(
        history["publications"],
        json!([]),
        "rejected publishes store nothing"
    );
    // Impossible positions.
    server
        .ok("publish", json!({"channel": "h", "data": 1}))
        .await;
    server
        .err(
            "history",
            json!({"channel": "h", "limit": 10, "since": {"offset": 1, "epoch": "stale"}}),
            200,
            112,
        )
        .await;
    let future = server
        .err(
            "history",
            json!({"channel": "h", "limit": 10, "since": {"offset": 99, "epoch": ""}}),
            200,
            112,
        )
        .await;
    assert!(future["detail"].as_str().expect("detail").contains("ahead"));
    server.err("history", json!({"channel": "h", "limit": 10, "reverse": true, "since": {"offset": 0, "epoch": ""}}), 200, 107).await;
    let (status, _) = server
        .call(
            "history",
            json!({"channel": "h", "since": {"offset": -1, "epoch": ""}}),
        )
        .await;
    assert_eq!(status, 400, "negative offset");
    // Unknown method and wrong HTTP method.
    let (status, body) = server.call("nope", json!({})).await;
    assert_eq!((status, body["error"]["code"].as_u64()), (404, Some(104)));
    let response = server
        .http
        .get(format!("{}/api/publish", server.url))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .expect("get");
    assert_eq!(response.status().as_u16(), 405);
    assert_eq!(
        response.headers()["allow"],
        "POST",
        "a 405 names the allowed method"
    );
    let body: serde_json::Value = response.json().await.expect("JSON error body");
    assert_eq!(body["error"]["code"], 107);
    // Integers: 2.0 is the integer 2; a fraction or a value beyond the field's range is 400.
    server
        .ok("publish", json!({"channel": "ints", "data": 1}))
        .await;
    server
        .ok("publish", json!({"channel": "ints", "data": 2}))
        .await;
    let page = server
        .ok("history", json!({"channel": "ints", "limit": 1.0}))
        .await;
    assert_eq!(page["publications"].as_array().map(Vec::len), Some(1));
    let page = server
        .ok(
            "history",
            json!({"channel": "ints", "limit": -1, "since": {"offset": 1.0, "epoch": ""}}),
        )
        .await;
    assert_eq!(page["publications"][0]["offset"], 2);
    for (method, body) in [
        ("history", r#"{"channel":"ints","limit":1.5}"#),
        (
            "history",
            r#"{"channel":"ints","limit":9223372036854775808}"#,
        ),
        (
            "invalidate_user_tokens",
            r#"{"user":"u","expire_at":18446744073709551616}"#,
        ),
        (
            "invalidate_user_tokens",
            r#"{"user":"u","issued_before":-1}"#,
        ),
        ("revoke_token", r#"{"uid":"j","expire_at":1e30}"#),
    ] {
        let (status, reply) = server.raw(method, body).await;
        assert_eq!(
            (status, reply["error"]["code"].as_u64()),
            (400, Some(107)),
            "{body}"
        );
    }
    server
        .ok(
            "invalidate_user_tokens",
            json!({"user": "u", "expire_at": 4_000_000_000.0}),
        )
        .await;
}

#[tokio::test]
async fn api_key_is_required() {
    let server = TestServer::start(Engine::Memory).await;
    let url = format!("{}/api/publish", server.url);
    let body = json!({"channel": "a", "data": 1}).to_string();
    let missing = server
        .http
        .post(&url)
        .body(body.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(missing.status().as_u16(), 401);
    let json: serde_json::Value = missing.json().await.expect("json body");
    assert_eq!(json["error"]["code"], 101);
    let wrong = server
        .http
        .post(&url)
        .header("X-API-Key", "wrong-key-wrong-key")
        .body(body.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(wrong.status().as_u16(), 401);
    let scheme = server
        .http
        .post(&url)
        .header("Authorization", format!("apikey {API_KEY}"))
        .body(body.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(scheme.status().as_u16(), 200);
    let bearer = server
        .http
        .post(&url)
        .header("Authorization", format!("Bearer {API_KEY}"))
        .body(body)
        .send()
        .await
        .expect("send");
    assert_eq!(
        bearer.status().as_u16(),
        401,
        "only the apikey scheme carries API keys"
    );
    let history = server
        .ok("history", json!({"channel": "a", "limit": -1}))
        .await;
    assert_eq!(
        history["publications"].as_array().expect("array").len(),
        1,
        "only the authorised publish landed"
    );
}

#[tokio::test]
async fn operations_endpoints() {
    let server = TestServer::start(Engine::Memory).await;
    server
        .ok("publish", json!({"channel": "m", "data": 1}))
        .await;
    let health = server
        .http
        .get(format!("{}/health", server.url))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status().as_u16(), 200);
    let ready = server
        .http
        .get(format!("{}/ready", server.url))
        .send()
        .await
        .expect("ready");
    assert_eq!(ready.status().as_u16(), 200);
    let metrics = server
        .http
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains("herald_publications_total 1"), "{metrics}");
    assert!(
        metrics.contains("herald_history_writes_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("herald_api_requests_total{method=\"publish\",status=\"200\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("herald_connections"), "{metrics}");
    let openapi: serde_json::Value = server
        .http
        .get(format!("{}/api/openapi.json", server.url))
        .send()
        .await
        .expect("openapi")
        .json()
        .await
        .expect("json");
    assert!(
        openapi["openapi"]
            .as_str()
            .expect("version")
            .starts_with("3.")
    );
}
