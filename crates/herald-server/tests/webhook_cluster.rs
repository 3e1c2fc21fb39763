//! Webhooks in a cluster: real `herald serve` nodes on a `redis-server` this test starts share
//! the endpoints (created on one node, seen by all) and the queue (each publication's webhook
//! goes out once, whichever node accepted the publication and whichever claimed the job); a
//! Redis SIGKILL + restart (AOF) in the middle of a publish stream loses no acknowledged
//! publication's webhook.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{ClusterSpec, HeraldNode, PublishOutcome};
use common::redis::RedisProcess;
use common::webhooks::receiver;
use parking_lot::Mutex;
use serde_json::json;
use tokio::task::block_in_place;

const WEBHOOKS: &str = r#"
[webhooks]
enabled = true
allow_private_addresses = true
poll_interval = "100ms"
refresh_interval = "200ms"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_are_shared_and_each_publication_is_delivered_once() {
    let redis = RedisProcess::start();
    let (url, seen) = receiver(Arc::new(Mutex::new(200))).await;
    let mut spec = ClusterSpec::new(&redis, "webhooks-once");
    spec.extra = WEBHOOKS.into();
    let nodes = HeraldNode::start_many(&spec, &["a", "b"]);
    nodes[0]
        .api
        .ok(
            "webhook_endpoint_create",
            json!({"id": "shared", "url": url, "events": ["publication"]}),
        )
        .await;
    // Node b learns of it within its refresh interval.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listed = nodes[1].api.ok("webhook_endpoint_list", json!({})).await;
        if listed["items"]
            .as_array()
            .is_some_and(|items| items.len() == 1)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node b never saw the endpoint: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    const PUBLICATIONS: usize = 40;
    for i in 0..PUBLICATIONS {
        nodes[i % 2]
            .api
            .ok(
                "publish",
                json!({"channel": format!("c{}", i % 3), "data": {"i": i}}),
            )
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.lock().len() < PUBLICATIONS {
        assert!(
            Instant::now() < deadline,
            "{} of {PUBLICATIONS} delivered",
            seen.lock().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Whatever would arrive twice arrives within a poll or two.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    let mut values = Vec::new();
    for (id, body) in seen.lock().iter() {
        *per_id.entry(id.clone()).or_default() += 1;
        values.push(body["data"]["data"]["i"].as_u64().expect("i"));
    }
    assert!(
        per_id.values().all(|n| *n == 1),
        "delivered twice: {per_id:?}"
    );
    values.sort_unstable();
    assert_eq!(values, (0..PUBLICATIONS as u64).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_stream_loses_no_acknowledged_publications_webhook() {
    let mut redis = RedisProcess::start_aof();
    let (url, seen) = receiver(Arc::new(Mutex::new(200))).await;
    let mut spec = ClusterSpec::new(&redis, "webhooks-restart");
    spec.command_timeout = "500ms".into();
    spec.connect_timeout = "500ms".into();
    spec.ping_interval = "250ms".into();
    spec.extra = format!(
        "{WEBHOOKS}timeout = \"2s\"\nlease = \"8s\"\n\n[[webhooks.endpoints]]\nid = \"all\"\n\
         url = \"{url}\"\nevents = [\"publication\"]\nsecrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\n"
    );
    let nodes = block_in_place(|| HeraldNode::start_many(&spec, &["a", "b"]));
    let mut acknowledged: BTreeMap<(String, u64), u64> = BTreeMap::new();
    let mut refused = 0;
    let publish = async |i: u64, acknowledged: &mut BTreeMap<(String, u64), u64>| {
        let channel = format!("s{}", i % 3);
        match nodes[(i % 2) as usize]
            .api
            .publish(&channel, json!({"i": i}))
            .await
        {
            PublishOutcome::Acked { offset, .. } => {
                acknowledged.insert((channel, offset), i);
                true
            }
            _ => false,
        }
    };
    let mut i = 0;
    while acknowledged.len() < 30 {
        publish(i, &mut acknowledged).await;
        i += 1;
    }
    block_in_place(|| redis.kill());
    let killed = Instant::now();
    while killed.elapsed() < Duration::from_secs(2) {
        if !publish(i, &mut acknowledged).await {
            refused += 1;
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    block_in_place(|| redis.restart());
    let target = acknowledged.len() + 30;
    let deadline = Instant::now() + Duration::from_secs(30);
    while acknowledged.len() < target {
        assert!(Instant::now() < deadline, "publishing did not resume");
        publish(i, &mut acknowledged).await;
        i += 1;
    }
    assert!(refused > 0, "publishes while Redis was down are refused");
    let delivered = || -> BTreeMap<(String, u64), Vec<String>> {
        let mut by_publication: BTreeMap<(String, u64), Vec<String>> = BTreeMap::new();
        for (id, body) in seen.lock().iter() {
            let key = (
                body["data"]["channel"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                body["data"]["offset"].as_u64().unwrap_or_default(),
            );
            by_publication.entry(key).or_default().push(id.clone());
        }
        by_publication
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = delivered();
        let missing: Vec<_> = acknowledged
            .keys()
            .filter(|k| !got.contains_key(*k))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} acknowledged publications have no webhook: {missing:?}",
            missing.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (key, ids) in delivered() {
        let first = &ids[0];
        assert!(
            ids.iter().all(|id| id == first),
            "{key:?} under several webhook-ids: {ids:?}"
        );
    }
}
