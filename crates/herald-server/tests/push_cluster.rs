//! Push notifications in a cluster: every node runs the queue's workers on the shared Redis
//! registry and queue; each push goes out once, whichever node accepted it; a node killed
//! (SIGKILL) while sending loses nothing — its claimed deliveries go out from another node
//! once their lease runs out.
//!
//! Real processes: `herald serve` nodes on a `redis-server` this test starts, and the APNs
//! emulator (`herald-pushmock`) in this process.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::cluster::{Api, ClusterSpec, HeraldNode};
use common::redis::RedisProcess;
use herald_pushmock::PushMock;
use serde_json::json;

const TOPIC: &str = "com.example.herald";

/// `[push]` for every node: APNs to the emulator, short leases so a dead node's jobs move fast.
fn push_config(mock: &PushMock, key_pem: &str, concurrency: usize) -> String {
    format!(
        r#"
[push]
enabled = true
poll_interval = "100ms"
lease = "5s"
retry_base = "100ms"

[push.concurrency]
apns = {concurrency}

[[push.apns.apps]]
key_pem = '''
{key_pem}'''
key_id = "KEY0000001"
team_id = "TEAM000001"
topic = "{TOPIC}"
base_url = "{url}"
"#,
        url = mock.apns_url(),
    )
}

fn device_token(i: usize) -> String {
    format!("{i:064x}")
}

async fn register_devices(api: &Api, count: usize) {
    for i in 0..count {
        api.ok(
            "device_register",
            json!({
                "provider": "apns", "token": device_token(i), "platform": "ios",
                "user": format!("user-{i}"), "topics": ["news"],
            }),
        )
        .await;
    }
}

fn push(uid: &str) -> serde_json::Value {
    json!({
        "recipient": {"filter": {"topics": ["news"]}},
        "notification": {"apns": {"payload": {"aps": {"alert": "news"}, "uid": uid}}},
        "uid": uid,
    })
}

/// (token, uid) → how many times the emulator accepted it.
fn received(mock: &PushMock) -> BTreeMap<(String, String), usize> {
    let mut counts = BTreeMap::new();
    for record in mock.apns.records() {
        let uid = record.payload["uid"].as_str().unwrap_or("").to_string();
        *counts.entry((record.token, uid)).or_insert(0) += 1;
    }
    counts
}

async fn wait_for_accepted(mock: &PushMock, count: u64, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while mock.apns.accepted() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the emulator accepted {} of {count} pushes in {timeout:?}",
            mock.apns.accepted()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `herald_push_sent_total{provider="apns"}` of one node.
async fn sent_by(node: &HeraldNode) -> u64 {
    let text = reqwest::get(format!("{}/metrics", node.api.url))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .find(|l| l.starts_with("herald_push_sent_total{provider=\"apns\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_accepted_by_any_node_go_out_once_and_every_node_sends() {
    let redis = RedisProcess::start();
    let mock = PushMock::start_default().await.expect("emulator");
    let key = mock
        .apns_key("KEY0000001", "TEAM000001", &[TOPIC])
        .expect("key");
    let mut spec = ClusterSpec::new(&redis, "push-once");
    spec.extra = push_config(&mock, &key.private_key_pem, 32);
    let nodes = HeraldNode::start_many(&spec, &["a", "b", "c"]);
    let apis: Vec<&Api> = nodes.iter().map(|n| &n.api).collect();
    const DEVICES: usize = 100;
    register_devices(apis[0], DEVICES).await;
    // The registry is shared: another node sees the devices.
    let listed = apis[2]
        .ok(
            "device_list",
            json!({"filter": {"topics": ["news"]}, "include_total_count": true}),
        )
        .await;
    assert_eq!(listed["total_count"], DEVICES, "{listed}");
    let uids: Vec<String> = (0..6).map(|i| format!("p{i}")).collect();
    for (i, uid) in uids.iter().enumerate() {
        apis[i % 3].ok("send_push_notification", push(uid)).await;
        // The same uid through another node adds nothing.
        apis[(i + 1) % 3]
            .ok("send_push_notification", push(uid))
            .await;
    }
    let total = (DEVICES * uids.len()) as u64;
    wait_for_accepted(&mock, total, Duration::from_secs(60)).await;
    // Whatever is still in flight would show within a moment; give it one poll interval.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counts = received(&mock);
    assert_eq!(counts.len() as u64, total, "every device got every push");
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
    let mut senders = 0;
    for node in &nodes {
        if sent_by(node).await > 0 {
            senders += 1;
        }
    }
    assert!(senders >= 2, "the work is shared: {senders} node(s) sent");
    let status = apis[1]
        .ok("push_status", json!({"uid": "p0", "limit": 1000}))
        .await;
    let items = status["items"].as_array().expect("items");
    let sent = items
        .iter()
        .filter(|s| s["state"] == "sent" && s["kind"] == "push.apns")
        .count();
    assert_eq!(sent, DEVICES, "statuses are shared too: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_while_sending_loses_no_push() {
    let redis = RedisProcess::start();
    let mock = PushMock::start_default().await.expect("emulator");
    let key = mock
        .apns_key("KEY0000001", "TEAM000001", &[TOPIC])
        .expect("key");
    // Slow provider: many deliveries are claimed and in flight when the node dies.
    mock.apns.set_latency(Duration::from_millis(100));
    const CONCURRENCY: usize = 16;
    let mut spec = ClusterSpec::new(&redis, "push-kill");
    spec.extra = push_config(&mock, &key.private_key_pem, CONCURRENCY);
    let mut a = HeraldNode::start(&spec, "a");
    let api_a = a.api.clone();
    const DEVICES: usize = 300;
    register_devices(&api_a, DEVICES).await;
    api_a.ok("send_push_notification", push("k1")).await;
    wait_for_accepted(&mock, 30, Duration::from_secs(30)).await;
    a.kill();
    let at_kill = mock.apns.accepted();
    assert!(
        (at_kill as usize) < DEVICES,
        "the node died mid-stream ({at_kill} of {DEVICES} sent)"
    );
    // Another node takes over: what node a had claimed moves after its lease (5 s).
    let b = HeraldNode::start(&spec, "b");
    let api_b = &b.api;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if received(&mock).len() == DEVICES {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {DEVICES} devices got the push after the kill",
            received(&mock).len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let counts = received(&mock);
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    eprintln!("kill at {at_kill} sent; {duplicates} sent twice (in flight at the kill)");
    assert!(
        duplicates <= CONCURRENCY,
        "only deliveries in flight at the kill may go twice: {duplicates} > {CONCURRENCY}"
    );
    let status = api_b
        .ok("push_status", json!({"uid": "k1", "limit": 1000}))
        .await;
    let items = status["items"].as_array().expect("items");
    let sent = items
        .iter()
        .filter(|s| s["state"] == "sent" && s["kind"] == "push.apns")
        .count();
    assert_eq!(sent, DEVICES, "{status}");
}
