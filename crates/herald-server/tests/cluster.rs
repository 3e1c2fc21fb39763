//! Several real `herald` processes sharing Redis (`storage.engine = "redis"`), driven from
//! outside: publications through any node reach subscribers on every node in one order per
//! channel; a Redis SIGKILL + restart (AOF), lost pub/sub connections and a Sentinel failover
//! lose nothing that was acknowledged; `/api/info` and presence forget a SIGKILLed node within
//! their TTLs; a node cut off from Redis by a network partition (a network namespace) says
//! so, hands its subscribers over and comes back by itself. Each test starts its own redis-server(s) (`common::redis`) and nodes
//! (`common::cluster`) and kills them on drop; none takes more than about 40 s.
//!
//! The `harness_*` tests check the Redis harness itself (start, commands, SIGKILL, restart on
//! the same port, AOF, replica, Sentinel failover).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use common::cluster::{
    Attempt, ClusterSpec, HeraldNode, PublishOutcome, Publisher, RedisTarget, Subscriber,
    describe_attempts, runs,
};
use common::netns::Netns;
use common::redis::{RedisOptions, RedisProcess, Resp, Sentinels, wait_until};
use serde_json::{Value, json};
use tokio::task::block_in_place;

/// Longest wait for a subscriber to catch up.
const CATCH_UP: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Checks

/// `sub` received exactly `expected` (offset → data): same offsets in the same order, no
/// gap, no duplicate, same data; and nothing it must never see.
fn assert_received_exactly(sub: &Subscriber, expected: &BTreeMap<u64, Value>) {
    let received = sub.received();
    let offsets: Vec<u64> = received.iter().map(|r| r.offset).collect();
    let want: Vec<u64> = expected.keys().copied().collect();
    assert_eq!(
        offsets,
        want,
        "{}: got offsets {}, want {}\n{}",
        sub.label,
        runs(&offsets),
        runs(&want),
        sub.summary()
    );
    for r in &received {
        assert_eq!(
            Some(&r.data),
            expected.get(&r.offset),
            "{}: data at offset {}\n{}",
            sub.label,
            r.offset,
            sub.summary()
        );
    }
    assert_no_failures(sub);
}

/// `sub` received offsets 1, 2, 3, ... without a gap or a duplicate, in order, up to at least
/// the last acknowledged one, with the acknowledged data at each acknowledged offset.
/// (Publications that were not acknowledged — a 503 after Redis had stored them — may be
/// there too: nothing promises they are not.)
fn assert_received_every_acked(sub: &Subscriber, acked: &BTreeMap<u64, Value>) {
    let received = sub.received();
    let offsets: Vec<u64> = received.iter().map(|r| r.offset).collect();
    let top = offsets
        .last()
        .copied()
        .max(acked.keys().last().copied())
        .unwrap_or(0);
    let want: Vec<u64> = (1..=top).collect();
    assert_eq!(
        offsets,
        want,
        "{}: offsets must run 1..={top} in order without gap or duplicate; got {}\n{}",
        sub.label,
        runs(&offsets),
        sub.summary()
    );
    for r in &received {
        if let Some(data) = acked.get(&r.offset) {
            assert_eq!(
                &r.data,
                data,
                "{}: acknowledged data at offset {}\n{}",
                sub.label,
                r.offset,
                sub.summary()
            );
        }
    }
    assert_no_failures(sub);
}

fn assert_no_failures(sub: &Subscriber) {
    let failures = sub.with_log(|log| log.failures.clone());
    assert!(
        failures.is_empty(),
        "{}: {failures:?}\n{}",
        sub.label,
        sub.summary()
    );
}

/// The subscriber was never closed nor unsubscribed by the server.
fn assert_never_disconnected(sub: &Subscriber) {
    let (closes, pushes) = sub.with_log(|log| (log.closes.clone(), log.other_pushes.clone()));
    assert!(
        closes.is_empty(),
        "{}: disconnected with {closes:?}\n{}",
        sub.label,
        sub.summary()
    );
    let dropped: Vec<&Value> = pushes
        .iter()
        .filter(|p| p["push"]["unsubscribe"].is_object() || p["push"]["disconnect"].is_object())
        .collect();
    assert!(
        dropped.is_empty(),
        "{}: unsubscribed or disconnected by push: {dropped:?}\n{}",
        sub.label,
        sub.summary()
    );
}

/// The acknowledged publishes of `attempts` as offset → data, checking on the way that every
/// attempt was either acknowledged or refused with 503 / code 100 (`unavailable_ok`), that
/// offsets grow with each acknowledgement of this one sequential publisher, and that every
/// acknowledgement names the same epoch.
fn acked_publications(
    attempts: &[Attempt],
    unavailable_ok: bool,
    elapsed: Duration,
) -> BTreeMap<u64, Value> {
    let story = || describe_attempts(attempts, elapsed);
    let mut acked = BTreeMap::new();
    let mut epoch: Option<&str> = None;
    let mut last = 0;
    for attempt in attempts {
        match &attempt.outcome {
            PublishOutcome::Acked { offset, epoch: e } => {
                assert!(
                    *offset > last,
                    "publish n={} acknowledged at offset {offset} after offset {last}\n{}",
                    attempt.n,
                    story()
                );
                last = *offset;
                assert_eq!(
                    *epoch.get_or_insert(e),
                    e.as_str(),
                    "the epoch changed at n={}: the stream was lost\n{}",
                    attempt.n,
                    story()
                );
                acked.insert(*offset, json!({"n": attempt.n}));
            }
            PublishOutcome::Unavailable(body) => {
                assert!(
                    unavailable_ok,
                    "publish n={} refused with 503 while Redis was up: {body}\n{}",
                    attempt.n,
                    story()
                );
                assert!(
                    body["error"]["message"].is_string(),
                    "a 503 carries the usual error body: {body}"
                );
            }
            PublishOutcome::Failed(why) => panic!(
                "publish n={} neither acknowledged nor refused with 503 / code 100: {why}\n{}",
                attempt.n,
                story()
            ),
        }
    }
    acked
}

/// Every subscriber catches up to the last acknowledged publication and has received every
/// acknowledged one (in order, no gap or duplicate), and every node's history holds them.
async fn assert_nothing_acknowledged_lost(
    subs: &[Subscriber],
    nodes: &[HeraldNode],
    channel: &str,
    acked: &BTreeMap<u64, Value>,
) {
    let top = *acked.keys().last().expect("acknowledged publications");
    for sub in subs {
        sub.wait_for_offset(top, CATCH_UP).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // a duplicate would arrive now
    for sub in subs {
        assert_received_every_acked(sub, acked);
    }
    for node in nodes {
        assert_history_holds(node, channel, acked).await;
    }
}

/// Every acknowledged publication is in the channel's history as node `api` reads it.
async fn assert_history_holds(node: &HeraldNode, channel: &str, acked: &BTreeMap<u64, Value>) {
    let result = node
        .api
        .ok("history", json!({"channel": channel, "limit": -1}))
        .await;
    let stored: BTreeMap<u64, Value> = result["publications"]
        .as_array()
        .unwrap_or_else(|| panic!("history without publications: {result}"))
        .iter()
        .map(|p| (p["offset"].as_u64().expect("offset"), p["data"].clone()))
        .collect();
    for (offset, data) in acked {
        assert_eq!(
            stored.get(offset),
            Some(data),
            "history on {} lost the acknowledged publication at offset {offset}; it holds {}",
            node.name,
            runs(&stored.keys().copied().collect::<Vec<_>>())
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The harness

#[test]
fn harness_redis_starts_answers_and_restarts_on_the_same_port() {
    let mut redis = RedisProcess::start();
    let port = redis.port();
    assert_eq!(redis.cli(&["SET", "k", "v"]), Resp::Simple("OK".into()));
    assert_eq!(redis.cli(&["GET", "k"]).as_str(), Some("v"));
    assert_eq!(redis.cli(&["GET", "missing"]), Resp::Bulk(None));
    assert!(redis.cli(&["NO-SUCH-COMMAND"]).is_error());
    let appendonly = redis.cli(&["CONFIG", "GET", "appendonly"]);
    assert_eq!(
        appendonly.as_array().and_then(|a| a[1].as_str()),
        Some("no")
    );
    assert_eq!(redis.role().as_deref(), Some("master"));

    redis.kill();
    assert!(!redis.is_running());
    assert!(
        redis.try_cli(&["PING"]).is_err(),
        "nothing answers on {port} after SIGKILL"
    );
    redis.restart();
    assert!(redis.is_running());
    assert_eq!(redis.port(), port, "restarted on the same port");
    assert_eq!(
        redis.cli(&["GET", "k"]),
        Resp::Bulk(None),
        "without persistence nothing survives a SIGKILL"
    );
}

#[test]
fn harness_aof_keeps_every_acknowledged_write_across_sigkill() {
    let mut redis = RedisProcess::start_aof();
    let fsync = redis.cli(&["CONFIG", "GET", "appendfsync"]);
    assert_eq!(fsync.as_array().and_then(|a| a[1].as_str()), Some("always"));
    for i in 0..300i64 {
        assert_eq!(
            redis.cli(&["RPUSH", "list", &i.to_string()]),
            Resp::Int(i + 1)
        );
    }
    let port = redis.port();
    redis.kill();
    redis.restart();
    assert_eq!(redis.port(), port);
    assert_eq!(redis.cli(&["LLEN", "list"]), Resp::Int(300));
    let items = redis.cli(&["LRANGE", "list", "0", "-1"]);
    let items: Vec<&str> = items
        .as_array()
        .expect("array")
        .iter()
        .map(|i| i.as_str().expect("string"))
        .collect();
    let want: Vec<String> = (0..300).map(|i| i.to_string()).collect();
    assert_eq!(items, want);
}

#[test]
fn harness_replica_and_sentinels_fail_over() {
    let primary = RedisProcess::start();
    let replica = RedisProcess::start_replica_of(&primary);
    assert_eq!(replica.role().as_deref(), Some("slave"));
    primary.cli(&["SET", "k", "v"]);
    wait_until(
        "the write to reach the replica",
        Duration::from_secs(5),
        || (replica.cli(&["GET", "k"]).as_str() == Some("v")).then_some(()),
    );
    let sentinels = Sentinels::start(&primary, "mymaster", 1);
    assert_eq!(sentinels.addresses().len(), 3);
    assert_eq!(sentinels.master_port(), Some(primary.port()));
    sentinels.failover();
    let promoted = sentinels.wait_for_new_master(primary.port(), Duration::from_secs(20));
    assert_eq!(promoted, replica.port());
    assert_eq!(replica.role().as_deref(), Some("master"));
    assert_eq!(replica.cli(&["GET", "k"]).as_str(), Some("v"));
    assert_eq!(replica.cli(&["SET", "k2", "v2"]), Resp::Simple("OK".into()));
}

// ---------------------------------------------------------------------------------------------
// (a) One order per channel across nodes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_through_one_node_reaches_subscribers_on_every_node_in_order() {
    let redis = RedisProcess::start();
    let spec = ClusterSpec::new(&redis, "fanout");
    let nodes = block_in_place(|| HeraldNode::start_many(&spec, &["node-a", "node-b", "node-c"]));
    let channel = "news";
    let mut subs = Vec::new();
    // On B and C (other nodes than the publisher's) and on A itself.
    for node in [&nodes[1], &nodes[2], &nodes[0]] {
        subs.push(Subscriber::start(node, "reader", channel, false).await);
    }
    let mut expected = BTreeMap::new();
    let mut epochs = HashSet::new();
    for n in 1..=50u64 {
        let (offset, epoch) = nodes[0].api.publish_ok(channel, json!({"n": n})).await;
        assert_eq!(offset, n, "offsets of one publisher count from 1");
        epochs.insert(epoch);
        expected.insert(offset, json!({"n": n}));
    }
    assert_eq!(epochs.len(), 1, "one epoch: {epochs:?}");
    for sub in &subs {
        sub.wait_for_offset(50, CATCH_UP).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // a duplicate would arrive now
    for sub in &subs {
        assert_received_exactly(sub, &expected);
        assert_never_disconnected(sub);
    }
    // Every node reads the same history.
    for node in &nodes {
        assert_history_holds(node, channel, &expected).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_three_nodes_share_one_contiguous_order() {
    const PER_NODE: u64 = 100;
    let redis = RedisProcess::start();
    let spec = ClusterSpec::new(&redis, "concurrent");
    let nodes = block_in_place(|| HeraldNode::start_many(&spec, &["node-a", "node-b", "node-c"]));
    let channel = "race";
    let mut subs = Vec::new();
    for node in &nodes {
        for user in ["first", "second"] {
            subs.push(Subscriber::start(node, user, channel, false).await);
        }
    }
    let publishers: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let api = node.api.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for k in 1..=PER_NODE {
                    let data = json!({"node": i, "k": k});
                    let (offset, epoch) = api.publish_ok(channel, data.clone()).await;
                    acked.push((offset, epoch, data));
                }
                acked
            })
        })
        .collect();
    let mut expected = BTreeMap::new();
    let mut epochs = HashSet::new();
    for (i, publisher) in publishers.into_iter().enumerate() {
        let acked = publisher.await.expect("publisher task");
        let offsets: Vec<u64> = acked.iter().map(|(o, _, _)| *o).collect();
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "publisher {i}'s own publications got increasing offsets: {}",
            runs(&offsets)
        );
        for (offset, epoch, data) in acked {
            epochs.insert(epoch);
            let earlier = expected.insert(offset, data.clone());
            assert!(
                earlier.is_none(),
                "offset {offset} given twice: {earlier:?} and {data}"
            );
        }
    }
    assert_eq!(epochs.len(), 1, "one epoch: {epochs:?}");
    let total = 3 * PER_NODE;
    let offsets: Vec<u64> = expected.keys().copied().collect();
    assert_eq!(
        offsets,
        (1..=total).collect::<Vec<_>>(),
        "offsets of concurrent publishers must be exactly 1..={total}: {}",
        runs(&offsets)
    );
    for sub in &subs {
        sub.wait_for_offset(total, CATCH_UP).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for sub in &subs {
        assert_received_exactly(sub, &expected);
        assert_never_disconnected(sub);
    }
}

// ---------------------------------------------------------------------------------------------
// (b) Redis SIGKILLed and restarted during a publish stream

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_during_a_publish_stream_loses_nothing_acknowledged() {
    let mut redis = RedisProcess::start_aof();
    let mut spec = ClusterSpec::new(&redis, "restart");
    spec.command_timeout = "500ms".into();
    spec.connect_timeout = "500ms".into();
    spec.ping_interval = "250ms".into();
    let nodes = block_in_place(|| HeraldNode::start_many(&spec, &["node-a", "node-b"]));
    let channel = "durable";
    // Subscribers on the publisher's node and on the other one; they may be disconnected
    // while Redis is away (to recover: 3010), and then reconnect with recovery.
    let subs = [
        Subscriber::start(&nodes[1], "bob", channel, true).await,
        Subscriber::start(&nodes[0], "alice", channel, true).await,
    ];
    let started = Instant::now();
    let publisher = Publisher::spawn(&nodes[0], channel, Duration::from_millis(10));
    publisher.wait_acked(30, Duration::from_secs(10)).await;

    block_in_place(|| redis.kill());
    let killed = Instant::now();
    // While Redis is down: publishes are refused with 503 and code 100 (fast, within the
    // command/connect timeouts), and /ready answers 503 on every node.
    publisher
        .wait_for("503 / code 100 refusals", 1, Duration::from_secs(10), |o| {
            matches!(o, PublishOutcome::Unavailable(_))
        })
        .await;
    for node in &nodes {
        node.api
            .wait_ready_status(503, Duration::from_secs(10))
            .await;
    }
    let down_for = Duration::from_secs(2).saturating_sub(killed.elapsed());
    tokio::time::sleep(down_for).await;
    let refused_while_down = publisher.count(|o| matches!(o, PublishOutcome::Unavailable(_)));

    block_in_place(|| redis.restart());
    for node in &nodes {
        node.api
            .wait_ready_status(200, Duration::from_secs(15))
            .await;
    }
    // Publishing resumes on its own.
    let acked_before_restart = publisher.acked();
    publisher
        .wait_acked(acked_before_restart + 30, Duration::from_secs(15))
        .await;
    let attempts = publisher.stop().await;
    let acked = acked_publications(&attempts, true, started.elapsed());
    assert!(
        refused_while_down > 0,
        "publishes while Redis was down must be refused with 503\n{}",
        describe_attempts(&attempts, started.elapsed())
    );
    // The AOF kept the stream: both nodes read every acknowledged publication back.
    assert_nothing_acknowledged_lost(&subs, &nodes, channel, &acked).await;
}

// ---------------------------------------------------------------------------------------------
// (c) Pub/sub connections killed while publishing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_pubsub_connections_lose_no_publication_and_disconnect_nobody() {
    let redis = RedisProcess::start();
    let mut spec = ClusterSpec::new(&redis, "pubsub-kill");
    spec.ping_interval = "250ms".into();
    let nodes = block_in_place(|| HeraldNode::start_many(&spec, &["node-a", "node-b"]));
    let channel = "steady";
    let subs = [
        Subscriber::start(&nodes[1], "bob", channel, false).await,
        Subscriber::start(&nodes[0], "alice", channel, false).await,
    ];
    let pubsub_clients = || {
        let list = redis.cli(&["CLIENT", "LIST", "TYPE", "pubsub"]);
        list.as_str().map_or(0, |text| text.lines().count())
    };
    wait_until(
        "a pub/sub connection of each node for its subscriber",
        Duration::from_secs(5),
        || (pubsub_clients() >= 2).then_some(()),
    );
    let started = Instant::now();
    let publisher = Publisher::spawn(&nodes[0], channel, Duration::from_millis(10));
    let mut kills = Vec::new();
    for at in [30, 70, 110] {
        publisher.wait_acked(at, Duration::from_secs(15)).await;
        let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        kills.push(killed.clone());
        if at == 30 {
            assert!(
                killed.as_int().is_some_and(|n| n >= 2),
                "CLIENT KILL TYPE pubsub killed both nodes' connections: {killed}"
            );
        }
    }
    publisher.wait_acked(150, Duration::from_secs(15)).await;
    let attempts = publisher.stop().await;
    // And once more after the last publication: it must still arrive.
    kills.push(redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]));
    let acked = acked_publications(&attempts, false, started.elapsed());
    let top = *acked.keys().last().expect("acknowledged");
    assert_eq!(acked.len() as u64, top, "one publisher: offsets 1..={top}");
    for sub in &subs {
        sub.wait_for_offset(top, CATCH_UP).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for sub in &subs {
        assert_received_exactly(sub, &acked);
        assert_never_disconnected(sub);
    }
    // The nodes subscribed again.
    wait_until(
        &format!("the nodes' pub/sub connections back after the kills ({kills:?})"),
        Duration::from_secs(5),
        || (pubsub_clients() >= 2).then_some(()),
    );
}

// ---------------------------------------------------------------------------------------------
// (d) /api/info across nodes

/// The node entries of `info` by name.
async fn nodes_by_name(node: &HeraldNode) -> BTreeMap<String, Value> {
    node.api
        .nodes()
        .await
        .into_iter()
        .map(|entry| {
            let name = entry["name"]
                .as_str()
                .unwrap_or_else(|| panic!("a node entry without a name: {entry}"))
                .to_owned();
            (name, entry)
        })
        .collect()
}

/// Polls `node`'s info until `check` accepts the entries; returns how long it took.
async fn wait_info(
    node: &HeraldNode,
    what: &str,
    timeout: Duration,
    check: impl Fn(&BTreeMap<String, Value>) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let entries = nodes_by_name(node).await;
        if check(&entries) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "{}'s /api/info: waited {timeout:?} for {what}; nodes: {entries:#?}",
            node.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_lists_every_live_node_and_forgets_a_killed_one_within_node_ttl() {
    const NODE_TTL: Duration = Duration::from_secs(2);
    let redis = RedisProcess::start();
    let mut spec = ClusterSpec::new(&redis, "info");
    spec.node_ttl = "2s".into();
    let mut nodes =
        block_in_place(|| HeraldNode::start_many(&spec, &["node-a", "node-b", "node-c"]));
    let all: HashSet<&str> = ["node-a", "node-b", "node-c"].into();
    for node in &nodes {
        wait_info(
            node,
            "all three nodes",
            Duration::from_secs(10),
            |entries| entries.keys().map(String::as_str).collect::<HashSet<_>>() == all,
        )
        .await;
    }
    let entries = nodes_by_name(&nodes[0]).await;
    let uids: HashSet<&str> = entries
        .values()
        .map(|e| e["uid"].as_str().unwrap_or_default())
        .collect();
    assert!(
        uids.len() == 3 && !uids.contains(""),
        "three distinct uids: {entries:#?}"
    );
    for entry in entries.values() {
        for field in [
            "num_clients",
            "num_subs",
            "num_users",
            "num_channels",
            "uptime",
        ] {
            assert!(entry[field].is_u64(), "{field} in {entry}");
        }
        assert!(entry["version"].is_string(), "version in {entry}");
    }

    // Two clients on B, each subscribed once: A sees B's counts.
    let _subs = [
        Subscriber::start(&nodes[1], "bob", "info-x", false).await,
        Subscriber::start(&nodes[1], "carol", "info-x", false).await,
    ];
    wait_info(
        &nodes[0],
        "node-b with 2 clients and 2 subscriptions",
        Duration::from_secs(10),
        |entries| {
            entries
                .get("node-b")
                .is_some_and(|b| b["num_clients"] == 2 && b["num_subs"] == 2)
        },
    )
    .await;

    block_in_place(|| nodes[2].kill());
    let killed = Instant::now();
    for node in &nodes[..2] {
        wait_info(
            node,
            "node-c to disappear",
            NODE_TTL + Duration::from_secs(3),
            |entries| !entries.contains_key("node-c"),
        )
        .await;
    }
    let gone_after = killed.elapsed();
    assert!(
        gone_after <= NODE_TTL + Duration::from_millis(1500),
        "node-c disappeared {gone_after:?} after SIGKILL; node_ttl is {NODE_TTL:?}"
    );
    // The live nodes keep refreshing themselves.
    tokio::time::sleep((2 * NODE_TTL).saturating_sub(killed.elapsed())).await;
    let live: HashSet<&str> = ["node-a", "node-b"].into();
    for node in &nodes[..2] {
        let entries = nodes_by_name(node).await;
        assert_eq!(
            entries.keys().map(String::as_str).collect::<HashSet<_>>(),
            live,
            "{} after 2 x node_ttl",
            node.name
        );
    }
}

// ---------------------------------------------------------------------------------------------
// (e) Presence across nodes

/// `presence` of `channel` through `node`: client id → user.
async fn presence(node: &HeraldNode, channel: &str) -> BTreeMap<String, String> {
    let result = node.api.ok("presence", json!({"channel": channel})).await;
    result["presence"]
        .as_object()
        .unwrap_or_else(|| panic!("presence without a map: {result}"))
        .iter()
        .map(|(client, info)| {
            assert_eq!(info["client"], client.as_str(), "{result}");
            (
                client.clone(),
                info["user"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

async fn wait_presence(
    node: &HeraldNode,
    channel: &str,
    want: &BTreeMap<String, String>,
    timeout: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let got = presence(node, channel).await;
        if &got == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "presence of {channel} on {}: waited {timeout:?} for {want:?}, got {got:?}",
            node.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_spans_nodes_and_a_killed_nodes_clients_expire_within_presence_ttl() {
    const PRESENCE_TTL: Duration = Duration::from_secs(3);
    let redis = RedisProcess::start();
    let mut spec = ClusterSpec::new(&redis, "presence");
    spec.presence_ttl = "3s".into();
    let mut nodes = block_in_place(|| HeraldNode::start_many(&spec, &["node-a", "node-b"]));
    let channel = "room:lobby";
    let alice = Subscriber::start(&nodes[0], "alice", channel, false).await;
    let bob = Subscriber::start(&nodes[1], "bob", channel, false).await;
    let both: BTreeMap<String, String> = [
        (alice.client_id(), "alice".to_owned()),
        (bob.client_id(), "bob".to_owned()),
    ]
    .into();
    for node in &nodes {
        wait_presence(node, channel, &both, Duration::from_secs(5)).await;
        let stats = node
            .api
            .ok("presence_stats", json!({"channel": channel}))
            .await;
        assert_eq!(
            stats,
            json!({"num_clients": 2, "num_users": 2}),
            "{}",
            node.name
        );
    }

    block_in_place(|| nodes[1].kill());
    let killed = Instant::now();
    let only_alice: BTreeMap<String, String> = [(alice.client_id(), "alice".to_owned())].into();
    wait_presence(
        &nodes[0],
        channel,
        &only_alice,
        PRESENCE_TTL + Duration::from_secs(3),
    )
    .await;
    let gone_after = killed.elapsed();
    assert!(
        gone_after <= PRESENCE_TTL + Duration::from_millis(1500),
        "bob's presence outlived node-b by {gone_after:?}; presence_ttl is {PRESENCE_TTL:?}"
    );
    // Alice's node refreshes her entry: she is still there after two TTLs.
    tokio::time::sleep((2 * PRESENCE_TTL).saturating_sub(killed.elapsed())).await;
    assert_eq!(presence(&nodes[0], channel).await, only_alice);
    let stats = nodes[0]
        .api
        .ok("presence_stats", json!({"channel": channel}))
        .await;
    assert_eq!(stats, json!({"num_clients": 1, "num_users": 1}));
    assert_never_disconnected(&alice);
}

// ---------------------------------------------------------------------------------------------
// (f) Sentinel failover

/// How the primary goes away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failover {
    /// `SENTINEL FAILOVER mymaster`: the replica is promoted, the old primary demoted.
    Command,
    /// SIGKILL of the primary: the sentinels notice (down-after 1 s) and promote the replica.
    KillPrimary,
}

async fn publishing_survives_a_sentinel_failover(how: Failover) {
    let mut primary = RedisProcess::start();
    let replica = RedisProcess::start_replica_of(&primary);
    let sentinels = block_in_place(|| Sentinels::start(&primary, "mymaster", 1));
    let mut spec = ClusterSpec::sentinel(&sentinels, "sentinel");
    spec.command_timeout = "500ms".into();
    spec.connect_timeout = "500ms".into();
    spec.ping_interval = "250ms".into();
    let nodes = block_in_place(|| HeraldNode::start_many(&spec, &["node-a", "node-b"]));
    let channel = "failover";
    let subs = [
        Subscriber::start(&nodes[1], "bob", channel, true).await,
        Subscriber::start(&nodes[0], "alice", channel, true).await,
    ];
    let started = Instant::now();
    let publisher = Publisher::spawn(&nodes[0], channel, Duration::from_millis(10));
    publisher.wait_acked(30, Duration::from_secs(10)).await;

    let old_port = primary.port();
    let failed_over = Instant::now();
    match how {
        Failover::Command => sentinels.failover(),
        Failover::KillPrimary => block_in_place(|| primary.kill()),
    }
    let promoted =
        block_in_place(|| sentinels.wait_for_new_master(old_port, Duration::from_secs(15)));
    assert_eq!(promoted, replica.port(), "the replica is the new primary");
    // Publishing resumes without restarting Herald (503s in between are fine): 30 more
    // acknowledged within 15 s of the failover.
    let acked_at_promotion = publisher.acked();
    publisher
        .wait_acked(
            acked_at_promotion + 30,
            Duration::from_secs(15).saturating_sub(failed_over.elapsed()) + Duration::from_secs(1),
        )
        .await;
    let attempts = publisher.stop().await;
    let acked = acked_publications(&attempts, true, started.elapsed());
    assert_nothing_acknowledged_lost(&subs, &nodes, channel, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_command_publishing_resumes_and_nothing_acknowledged_is_lost() {
    publishing_survives_a_sentinel_failover(Failover::Command).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_primary_killed_publishing_resumes_and_nothing_acknowledged_is_lost() {
    publishing_survives_a_sentinel_failover(Failover::KillPrimary).await;
}

// ---------------------------------------------------------------------------------------------
// (g) Server API commands act on every node

/// The `connect` reply of a WebSocket connection to `node` with `token`, or
/// `{"closed": code}` when the server closed it instead (a refused token).
async fn connect_with(node: &HeraldNode, token: &str) -> Value {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (mut socket, _) = tokio_tungstenite::connect_async(node.ws_url())
        .await
        .expect("websocket upgrade");
    let connect = json!({"id": 1, "connect": {"token": token}});
    socket
        .send(Message::text(connect.to_string()))
        .await
        .expect("send");
    loop {
        let next = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("an answer within 5 s");
        match next {
            Some(Ok(Message::Text(text))) => {
                return serde_json::from_str(&text).expect("JSON reply");
            }
            Some(Ok(Message::Close(frame))) => {
                return json!({"closed": frame.map_or(1005, |f| u16::from(f.code))});
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return json!({"closed": 1006}),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_and_revocations_through_one_node_act_on_every_node_and_later_ones() {
    let redis = RedisProcess::start();
    let spec = ClusterSpec::new(&redis, "control");
    let nodes = block_in_place(|| HeraldNode::start_many(&spec, &["node-a", "node-b"]));
    let (a, b) = (&nodes[0], &nodes[1]);

    // A disconnect through A closes the user's connection on B with the code asked for.
    let carol = Subscriber::start(b, "carol", "news", false).await;
    a.api
        .ok(
            "disconnect",
            json!({"user": "carol", "disconnect": {"code": 4500}}),
        )
        .await;
    let closed = async {
        while !carol.with_log(|log| log.closes.contains(&4500)) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .unwrap_or_else(|_| panic!("carol on B not closed with 4500: {}", carol.summary()));

    // A token revoked through A is refused by B.
    let now = herald_core::time::now_ms() / 1000;
    let token = common::hs256(
        common::cluster::CLUSTER_SECRET,
        &json!({"sub": "dave", "exp": now + 3600, "jti": "dave-token-1"}),
    );
    let before = connect_with(b, &token).await;
    assert!(
        before.get("connect").is_some(),
        "the token works before: {before}"
    );
    a.api
        .ok("revoke_token", json!({"uid": "dave-token-1"}))
        .await;
    let refused = async {
        loop {
            let reply = connect_with(b, &token).await;
            if reply.get("connect").is_none() {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let reply = tokio::time::timeout(Duration::from_secs(5), refused)
        .await
        .expect("B refuses the revoked token within 5 s");
    assert_eq!(reply["closed"], 3500, "closed as an invalid token: {reply}");

    // A node that starts after the revocation refuses the token too.
    let c = block_in_place(|| HeraldNode::start(&spec, "node-c"));
    let reply = connect_with(&c, &token).await;
    assert_eq!(reply["closed"], 3500, "a later node refuses it: {reply}");

    // Invalidating a user's tokens through B refuses them on A.
    let erin = common::cluster::token("erin");
    assert!(connect_with(a, &erin).await.get("connect").is_some());
    b.api
        .ok(
            "invalidate_user_tokens",
            json!({"user": "erin", "issued_before": now + 5}),
        )
        .await;
    let refused = async {
        loop {
            let reply = connect_with(a, &erin).await;
            if reply.get("connect").is_none() {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), refused)
        .await
        .expect("A refuses erin's tokens within 5 s");
}

// ---------------------------------------------------------------------------------------------
// (b') Redis restarted without its data: explicit "not recovered", never a silent gap

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_without_its_data_tells_subscribers_they_cannot_recover() {
    let mut redis = RedisProcess::start();
    let spec = ClusterSpec::new(&redis, "dataloss");
    let nodes = block_in_place(|| HeraldNode::start_many(&spec, &["node-a", "node-b"]));
    let channel = "news";
    let sub = Subscriber::start(&nodes[1], "reader", channel, true).await;
    for n in 1..=5u64 {
        nodes[0].api.publish_ok(channel, json!({"n": n})).await;
    }
    sub.wait_for_offset(5, CATCH_UP).await;
    let first_epoch = sub.with_log(|log| log.epochs[0].clone());

    block_in_place(|| {
        redis.kill();
        redis.restart();
    });
    // The node notices, finds every stream gone (a new epoch) and closes the subscriber with
    // 3010; the subscriber comes back asking to recover from offset 5 of the old epoch and is
    // told it cannot be: explicit, not a silent restart at offset 1.
    let told = async {
        loop {
            let (closed, not_recovered, epochs) = sub.with_log(|log| {
                (
                    log.closes.contains(&3010),
                    log.failures
                        .iter()
                        .any(|f| f.contains("resubscribe not recovered")),
                    log.epochs.clone(),
                )
            });
            if closed && not_recovered && epochs.len() >= 2 {
                return epochs;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let epochs = tokio::time::timeout(Duration::from_secs(20), told)
        .await
        .unwrap_or_else(|_| panic!("the subscriber was not told: {}", sub.summary()));
    assert_ne!(
        epochs.last(),
        Some(&first_epoch),
        "the new stream has a new epoch"
    );
    // Publishing goes on in the new stream, delivered to the resubscribed client.
    let published = async {
        loop {
            match nodes[0].api.publish(channel, json!({"n": 6})).await {
                PublishOutcome::Acked { offset, epoch } => return (offset, epoch),
                PublishOutcome::Unavailable(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                PublishOutcome::Failed(error) => panic!("publish failed: {error}"),
            }
        }
    };
    let (offset, epoch) = tokio::time::timeout(Duration::from_secs(10), published)
        .await
        .expect("publishing resumes within 10 s");
    assert_eq!(offset, 1, "the new stream starts at 1");
    assert_eq!(Some(&epoch), epochs.last());
    let arrived = async {
        while !sub.with_log(|log| log.pubs.iter().any(|p| p.data == json!({"n": 6}))) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), arrived)
        .await
        .unwrap_or_else(|_| panic!("the new publication did not arrive: {}", sub.summary()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_counts_subscribers_on_every_node() {
    let redis = RedisProcess::start();
    let spec = ClusterSpec::new(&redis, "channels");
    let nodes = block_in_place(|| HeraldNode::start_many(&spec, &["node-a", "node-b"]));
    let _subs = [
        Subscriber::start(&nodes[0], "u1", "news", false).await,
        Subscriber::start(&nodes[0], "u2", "news", false).await,
        Subscriber::start(&nodes[1], "u3", "news", false).await,
        Subscriber::start(&nodes[1], "u4", "other", false).await,
    ];
    for node in &nodes {
        let result = node.api.ok("channels", json!({})).await;
        assert_eq!(result["channels"]["news"]["num_clients"], 3, "{result}");
        assert_eq!(result["channels"]["other"]["num_clients"], 1, "{result}");
        let filtered = node.api.ok("channels", json!({"pattern": "oth*"})).await;
        assert_eq!(
            filtered["channels"].as_object().map(|c| c.len()),
            Some(1),
            "{filtered}"
        );
    }
}
// (h) A network partition between one node and Redis

/// Polls `check` every 20 ms until it returns `Some`; panics with `what` and `story()` after
/// `timeout`.
async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
    story: impl Fn() -> String,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            started.elapsed() < timeout,
            "waited {timeout:?} for {what}\n{}",
            story()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The offset of the publisher's last acknowledged publish (0: none yet).
fn last_acked_offset(publisher: &Publisher) -> u64 {
    publisher
        .attempts()
        .iter()
        .rev()
        .find_map(|attempt| match attempt.outcome {
            PublishOutcome::Acked { offset, .. } => Some(offset),
            _ => None,
        })
        .unwrap_or(0)
}

/// Node A in the root namespace and node B in a network namespace of its own share one
/// Redis; then only B's traffic to Redis is dropped (both ways, silently) while a publisher
/// keeps publishing through A. B must say it cannot serve (`/ready` 503, publishes 503 / code
/// 100), keep its subscribers through `redis.outage_disconnect` and then close them with
/// 3010; they reconnect to A and recover. A never notices. Once the link is back, B is
/// ready again by itself and serves new subscribers. Nothing acknowledged is lost: every
/// subscriber ends with exactly the channel's stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_partitioned_from_redis_says_so_its_clients_move_and_nothing_acknowledged_is_lost() {
    const PING_INTERVAL: Duration = Duration::from_millis(500);
    const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
    const OUTAGE_DISCONNECT: Duration = Duration::from_secs(2);
    /// The longest pause of a node's pub/sub task between two connection attempts.
    const MAX_BACKOFF: Duration = Duration::from_secs(2);
    const SLACK: Duration = Duration::from_secs(1);
    let test_started = Instant::now();
    let mut timeline: Vec<String> = Vec::new();
    let mut mark = |what: String| {
        let line = format!("{:>6}ms {what}", test_started.elapsed().as_millis());
        eprintln!("partition: {line}");
        timeline.push(line);
    };

    // Declared first, so dropped last (also on a panic): the nodes and Redis go before the
    // namespace and its link.
    let netns = block_in_place(Netns::create);
    let redis = block_in_place(|| {
        RedisProcess::start_with(RedisOptions {
            extra_bind: vec![netns.host_ip().into()],
            ..RedisOptions::default()
        })
    });
    let mut spec = ClusterSpec::new(&redis, "partition");
    spec.command_timeout = "1s".into();
    spec.connect_timeout = "1s".into();
    spec.ping_interval = "500ms".into();
    spec.outage_disconnect = Some("2s".into());
    // B reaches the same Redis (same prefix: one cluster) at the host side of its link.
    let mut spec_b = spec.clone();
    spec_b.redis = RedisTarget::Addresses(vec![redis.url_on(netns.host_ip().into())]);
    let (a, b) = block_in_place(|| {
        std::thread::scope(|scope| {
            let a = scope.spawn(|| HeraldNode::start(&spec, "node-a"));
            let b = HeraldNode::start_in_netns(&spec_b, "node-b", &netns);
            let a = a
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (a, b)
        })
    });
    assert!(
        b.api.url.contains(&netns.ns_ip().to_string()),
        "node-b listens in the namespace: {}",
        b.api.url
    );
    for node in [&a, &b] {
        node.api
            .wait_ready_status(200, Duration::from_secs(10))
            .await;
    }
    mark(format!(
        "node-a at {}, node-b at {} in netns {} (Redis {} and {})",
        a.api.url,
        b.api.url,
        netns.name(),
        redis.url(),
        redis.url_on(netns.host_ip().into())
    ));

    let channel = "partitioned";
    // Bob's node is B; when B closes him, his load balancer sends him to A.
    let bob = Subscriber::start_moving(&b, "bob", channel, &[&a]).await;
    let alice = Subscriber::start(&a, "alice", channel, true).await;
    let started = Instant::now();
    let publisher = Publisher::spawn(&a, channel, Duration::from_millis(10));
    publisher.wait_acked(30, Duration::from_secs(10)).await;
    // B delivers live before the cut.
    bob.wait_for_offset(30, Duration::from_secs(10)).await;

    // ---- The partition: B <-/-> Redis; B's listener, A and Redis untouched.
    block_in_place(|| netns.cut(redis.port()));
    let cut = Instant::now();
    let acked_at_cut = publisher.acked();
    mark(format!(
        "cut node-b <-> Redis port {} ({acked_at_cut} acked)",
        redis.port()
    ));

    // B says so on /ready...
    let ready_bound = PING_INTERVAL + COMMAND_TIMEOUT + Duration::from_secs(2);
    let not_ready_after = b.api.wait_ready_status(503, ready_bound).await;
    mark(format!(
        "node-b /ready 503 after {:?} (bound {ready_bound:?})",
        cut.elapsed()
    ));
    assert_eq!(a.api.ready().await, Some(200), "node-a stays ready");
    // ...and refuses publishes with 503 / code 100, fast.
    let asked = Instant::now();
    let through_b = b
        .api
        .publish(channel, json!({"via": "node-b", "during": "partition"}))
        .await;
    let refusal_took = asked.elapsed();
    mark(format!(
        "publish through node-b answered after {refusal_took:?}: {through_b:?}"
    ));
    assert!(
        matches!(&through_b, PublishOutcome::Unavailable(body) if body["error"]["message"].is_string()),
        "a publish through the partitioned node is refused with 503 / code 100: {through_b:?}"
    );
    let refusal_bound = COMMAND_TIMEOUT + CONNECT_TIMEOUT + SLACK;
    assert!(
        refusal_took <= refusal_bound,
        "the refusal took {refusal_took:?} (bound {refusal_bound:?})"
    );

    // B keeps its subscribers through redis.outage_disconnect, then closes them with 3010.
    let close_bound =
        PING_INTERVAL + COMMAND_TIMEOUT + OUTAGE_DISCONNECT + CONNECT_TIMEOUT + MAX_BACKOFF + SLACK;
    let closes = wait_for(
        "node-b to close bob",
        close_bound.saturating_sub(cut.elapsed()),
        || bob.with_log(|log| (!log.closes.is_empty()).then(|| log.closes.clone())),
        || bob.summary(),
    )
    .await;
    let closed_after = cut.elapsed();
    mark(format!(
        "bob closed with {closes:?} after {closed_after:?} (bound {close_bound:?})"
    ));
    assert_eq!(
        closes,
        [3010],
        "closed with 3010 (reconnect and recover)\n{}",
        bob.summary()
    );
    assert!(
        closed_after >= OUTAGE_DISCONNECT,
        "closed {closed_after:?} after the cut: before redis.outage_disconnect ({OUTAGE_DISCONNECT:?})\n{}",
        bob.summary()
    );
    // He reconnects to A and recovers from his position.
    let moved = wait_for(
        "bob to resubscribe on node-a",
        Duration::from_secs(5),
        || bob.with_log(|log| log.sessions.get(1).cloned()),
        || bob.summary(),
    )
    .await;
    mark(format!("bob resubscribed: {moved:?}"));
    assert_eq!(moved.node, "node-a", "{}", bob.summary());
    assert_eq!(
        moved.recovered,
        Some(true),
        "recovered on node-a\n{}",
        bob.summary()
    );
    // A kept acknowledging throughout; bob follows on A while B is still cut off.
    publisher
        .wait_acked(acked_at_cut + 100, Duration::from_secs(10))
        .await;
    let top_cut = last_acked_offset(&publisher);
    bob.wait_for_offset(top_cut, CATCH_UP).await;
    assert_eq!(
        b.api.ready().await,
        Some(503),
        "node-b is still partitioned"
    );
    let dropped = block_in_place(|| netns.dropped());
    assert!(dropped > 0, "the cut dropped packets");
    mark(format!(
        "{} acked during the partition, bob at {top_cut} on node-a; the cut dropped {dropped} packets",
        publisher.acked() - acked_at_cut
    ));

    // ---- The partition heals: B reconnects and catches up by itself.
    block_in_place(|| netns.restore());
    let restored = Instant::now();
    let back_bound = CONNECT_TIMEOUT + MAX_BACKOFF + COMMAND_TIMEOUT + Duration::from_secs(2);
    b.api.wait_ready_status(200, back_bound).await;
    let back_after = restored.elapsed();
    mark(format!(
        "restored; node-b /ready 200 after {back_after:?} (bound {back_bound:?})"
    ));
    let acked_before_carol = last_acked_offset(&publisher);
    let carol = Subscriber::start(&b, "carol", channel, false).await;
    // The top her subscribe reply names: everything after it must reach her.
    let carol_top = carol
        .with_log(|log| log.sessions.first().and_then(|s| s.offset))
        .unwrap_or_else(|| panic!("carol's subscribe reply has an offset\n{}", carol.summary()));
    assert!(
        carol_top >= acked_before_carol,
        "carol's subscribe reply names offset {carol_top}, before the acknowledged {acked_before_carol}"
    );
    publisher
        .wait_acked(publisher.acked() + 50, Duration::from_secs(10))
        .await;
    let attempts = publisher.stop().await;
    let elapsed = started.elapsed();
    // Every publish through A was acknowledged: A never noticed.
    let acked = acked_publications(&attempts, false, elapsed);
    let top = *acked.keys().last().expect("acknowledged publications");
    for sub in [&bob, &alice, &carol] {
        sub.wait_for_offset(top, CATCH_UP).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    mark(format!(
        "publisher stopped: {} attempts, {} acked, top offset {top}",
        attempts.len(),
        acked.len()
    ));

    // The stream holds every acknowledged publication; anything else in it can only be the
    // publish B refused (a 503 does not promise the command never reached Redis: it may be
    // delivered once the link is back).
    let history = a
        .api
        .ok("history", json!({"channel": channel, "limit": -1}))
        .await;
    let stream: BTreeMap<u64, Value> = history["publications"]
        .as_array()
        .unwrap_or_else(|| panic!("history without publications: {history}"))
        .iter()
        .map(|p| (p["offset"].as_u64().expect("offset"), p["data"].clone()))
        .collect();
    assert_history_holds(&a, channel, &acked).await;
    assert_history_holds(&b, channel, &stream).await;
    let unacknowledged: Vec<(&u64, &Value)> = stream
        .iter()
        .filter(|(offset, _)| !acked.contains_key(offset))
        .collect();
    assert!(
        unacknowledged
            .iter()
            .all(|(_, data)| data["via"] == "node-b"),
        "the stream holds publications nobody published: {unacknowledged:?}"
    );
    if !unacknowledged.is_empty() {
        mark(format!(
            "the publish node-b refused reached Redis after all: {unacknowledged:?}"
        ));
    }
    let want: Vec<u64> = (1..=top).collect();
    assert_eq!(
        stream.keys().copied().collect::<Vec<_>>(),
        want,
        "the stream runs 1..={top}"
    );

    // Bob and alice have exactly the stream, in order, no gap, no duplicate.
    assert_received_exactly(&bob, &stream);
    assert_received_exactly(&alice, &stream);
    let (bob_closes, bob_sessions) = bob.with_log(|log| (log.closes.clone(), log.sessions.len()));
    assert_eq!(
        (bob_closes, bob_sessions),
        (vec![3010], 2),
        "bob moved once\n{}",
        bob.summary()
    );
    assert_never_disconnected(&alice);
    // Carol, new on B after the partition, gets exactly what was published after the top
    // her subscribe reply named.
    let carol_stream: BTreeMap<u64, Value> = stream
        .range(carol_top + 1..)
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    assert!(
        !carol_stream.is_empty(),
        "publications followed carol's subscribe"
    );
    assert_received_exactly(&carol, &carol_stream);
    assert_never_disconnected(&carol);

    mark(format!(
        "done; /ready 503 after {not_ready_after:?}, publish refused after {refusal_took:?}, \
         bob closed after {closed_after:?}, /ready 200 {back_after:?} after the restore"
    ));
    assert!(
        test_started.elapsed() < Duration::from_secs(40),
        "the test took {:?}:\n{}",
        test_started.elapsed(),
        timeline.join("\n")
    );
}
