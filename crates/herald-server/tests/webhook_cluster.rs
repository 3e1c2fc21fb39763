//! Webhooks in a cluster: real `herald serve` nodes on a `redis-server` this test starts share
//! the endpoints (created on one node, seen by all) and the queue (each publication's webhook
//! goes out once, whichever node accepted the publication and whichever claimed the job).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{ClusterSpec, HeraldNode};
use common::redis::RedisProcess;
use common::webhooks::receiver;
use parking_lot::Mutex;
use serde_json::json;

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
