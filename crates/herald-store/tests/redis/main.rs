//! The Redis engine against a real Redis (`HERALD_TEST_REDIS_URL`, default
//! `redis://127.0.0.1:6379`), each test under its own key prefix: two engines stand for two
//! nodes. The push side's queue and registry are in `push.rs`.

mod push;
mod server;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use herald_core::engine::{Engine, Publish};
use herald_core::fanout::{self, FanoutQueue};
use herald_core::publication::{ChannelEvent, Payload, Publication};
use herald_core::store::Retention;
use herald_store::redis::{RedisConfig, RedisEngine};

fn redis_url() -> String {
    std::env::var("HERALD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn config(prefix: &str) -> RedisConfig {
    RedisConfig {
        addresses: vec![redis_url()],
        prefix: format!("herald-test-{prefix}-{}", uuid_like()),
        ping_interval: herald_core::duration::HumanDuration::from_secs(1),
        ..RedisConfig::default()
    }
}

fn uuid_like() -> String {
    herald_core::publication::new_epoch()
}

async fn node(config: &RedisConfig) -> (Arc<RedisEngine>, FanoutQueue) {
    let (feed, queue) = fanout::channel();
    let (engine, _presence) = RedisEngine::connect(config, feed)
        .await
        .unwrap_or_else(|e| panic!("redis at {} must be reachable: {e}", redis_url()));
    (Arc::new(engine), queue)
}

async fn want(engine: &RedisEngine, channel: &str) {
    wait_for(engine, |interest, ready| {
        interest.gained(&Arc::from(channel), ready)
    })
    .await;
}

/// Asks the engine's interest for something and waits until it is ready.
async fn wait_for(
    engine: &RedisEngine,
    ask: impl FnOnce(&dyn herald_core::hub::ChannelInterest, herald_core::hub::InterestReady),
) {
    let interest = engine.interest().expect("a cluster engine has interest");
    let (ready, wait) = herald_core::hub::interest_wait();
    ask(&*interest, ready);
    herald_core::hub::interest_ready(wait)
        .await
        .expect("subscribed");
}

fn publish(channel: &str, n: u64) -> Publish {
    Publish {
        channel: Arc::from(channel),
        publication: Publication {
            offset: 0,
            time_ms: 0,
            data: Payload::Json(Bytes::from(n.to_string())),
            tags: Default::default(),
            info: None,
        },
        history: Some(Retention {
            size: 1000,
            ttl: Duration::from_secs(60),
        }),
        idempotency: None,
    }
}

async fn offsets(queue: &mut FanoutQueue, count: usize) -> Vec<u64> {
    received(queue, count)
        .await
        .into_iter()
        .map(|(_, offset)| offset)
        .collect()
}

#[tokio::test]
async fn publications_of_one_node_reach_the_other_in_order() {
    let config = config("order");
    let (a, _qa) = node(&config).await;
    let (b, mut qb) = node(&config).await;
    want(&b, "news").await;
    for n in 1..=50 {
        let published = a.publish(publish("news", n)).await.expect("publish");
        assert_eq!(published.position.map(|p| p.offset), Some(n));
    }
    assert_eq!(offsets(&mut qb, 50).await, (1..=50).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_killed_pubsub_connection_is_healed_from_the_stream() {
    // A Redis of its own: killing every pub/sub connection of the shared one would cut the
    // connections of the tests running beside this one.
    let server = server::RedisServer::start();
    let mut config = config("heal");
    config.addresses = vec![server.url()];
    let (a, _qa) = node(&config).await;
    let (b, mut qb) = node(&config).await;
    want(&b, "feed").await;
    for n in 1..=10 {
        a.publish(publish("feed", n)).await.expect("publish");
    }
    assert_eq!(offsets(&mut qb, 10).await, (1..=10).collect::<Vec<_>>());
    // Kill every pub/sub connection of this Redis: what is published until B is back on
    // pub/sub must still reach B, in order, from the stream.
    kill_pubsub_connections(&server.url()).await;
    for n in 11..=40 {
        a.publish(publish("feed", n)).await.expect("publish");
    }
    assert_eq!(offsets(&mut qb, 30).await, (11..=40).collect::<Vec<_>>());
    let (reconnects, _, unrecoverable) = b.pubsub_totals();
    assert!(reconnects >= 1, "B noticed the lost connection");
    assert_eq!(unrecoverable, 0);
}

/// Kills every pub/sub connection of the Redis at `url`.
async fn kill_pubsub_connections(url: &str) {
    let client = redis::Client::open(url).expect("url");
    let mut admin = client
        .get_multiplexed_async_connection()
        .await
        .expect("admin connection");
    let _: redis::Value = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut admin)
        .await
        .expect("client kill");
}

/// Nodes on one Redis under one fresh prefix.
struct RedisCluster {
    config: RedisConfig,
}

#[async_trait::async_trait]
impl herald_core::conformance::ClusterBackend for RedisCluster {
    async fn node(
        &self,
        feed: herald_core::fanout::FanoutFeed,
    ) -> Result<Arc<dyn Engine>, herald_core::store::StoreError> {
        let (engine, _) = RedisEngine::connect(&self.config, feed).await?;
        Ok(Arc::new(engine))
    }

    async fn presence(
        &self,
    ) -> Result<Arc<dyn herald_core::presence::PresenceStore>, herald_core::store::StoreError> {
        let (feed, _queue) = fanout::channel();
        let (_, presence) = RedisEngine::connect(&self.config, feed).await?;
        Ok(Arc::new(presence))
    }
}

fn fresh_cluster() -> RedisCluster {
    let mut config = config("cluster");
    config.presence_ttl = herald_core::duration::HumanDuration::from_secs(1);
    RedisCluster { config }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_passes_the_engine_suite() {
    herald_core::conformance::run_engine_suite(|feed| async move {
        let (engine, _) = RedisEngine::connect(&config("engine"), feed).await?;
        Ok(Arc::new(engine) as Arc<dyn Engine>)
    })
    .await;
}

/// The Redis engine seen as a history store, so the history suite (offsets, epochs,
/// retention, paging, position errors) runs on it: appends publish with history, and what
/// the engine delivers goes to the suite's listener (the node subscribes to a channel before
/// its first append, as a node with a subscriber would). An append returns once the
/// listener has seen it, as a local store's does.
struct EngineHistory {
    engine: Arc<RedisEngine>,
    subscribed: parking_lot::Mutex<HashMap<Arc<str>, Arc<tokio::sync::OnceCell<()>>>>,
    delivered: Arc<Delivered>,
    _drain: tokio::task::JoinHandle<()>,
}

/// The highest offset delivered per channel.
#[derive(Default)]
struct Delivered {
    offsets: parking_lot::Mutex<HashMap<Arc<str>, u64>>,
    changed: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl herald_core::store::HistoryStore for EngineHistory {
    async fn append(
        &self,
        request: herald_core::store::AppendRequest,
    ) -> Result<herald_core::store::Appended, herald_core::store::StoreError> {
        let once = self
            .subscribed
            .lock()
            .entry(request.channel.clone())
            .or_default()
            .clone();
        once.get_or_init(|| want(&self.engine, &request.channel))
            .await;
        let channel = request.channel.clone();
        let published = self
            .engine
            .publish(Publish {
                channel: request.channel,
                publication: request.publication,
                history: Some(request.retention),
                idempotency: request.idempotency,
            })
            .await?;
        let position = published.position.expect("stored");
        if !published.duplicate {
            let wait = async {
                loop {
                    let changed = self.delivered.changed.notified();
                    let seen = self.delivered.offsets.lock().get(&channel).copied();
                    if seen >= Some(position.offset) {
                        return;
                    }
                    changed.await;
                }
            };
            tokio::time::timeout(Duration::from_secs(5), wait)
                .await
                .expect("the engine delivers what it stored");
        }
        Ok(herald_core::store::Appended {
            position,
            duplicate: published.duplicate,
        })
    }

    async fn read(
        &self,
        channel: &str,
        query: herald_core::store::HistoryQuery,
    ) -> Result<herald_core::store::HistoryPage, herald_core::store::StoreError> {
        self.engine.read(channel, query).await
    }

    async fn remove(&self, channel: &str) -> Result<(), herald_core::store::StoreError> {
        self.engine.remove(channel).await
    }

    async fn flush(&self) -> Result<(), herald_core::store::StoreError> {
        self.engine.flush().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_passes_the_history_suite() {
    herald_core::conformance::run_history_suite(|listener| async move {
        let (feed, mut queue) = fanout::channel();
        let (engine, _) = RedisEngine::connect(&config("history"), feed).await?;
        let delivered = Arc::new(Delivered::default());
        let seen = delivered.clone();
        let drain = tokio::spawn(async move {
            while let Some(event) = queue.next_event().await {
                if let ChannelEvent::Publication(publication) = event {
                    let (channel, offset) =
                        (publication.channel.clone(), publication.publication.offset);
                    listener.committed(publication);
                    seen.offsets.lock().insert(channel, offset);
                    seen.changed.notify_waiters();
                }
            }
        });
        Ok(Arc::new(EngineHistory {
            engine: Arc::new(engine),
            subscribed: Default::default(),
            delivered,
            _drain: drain,
        }) as Arc<dyn herald_core::store::HistoryStore>)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_passes_the_cluster_suite() {
    herald_core::conformance::run_cluster_suite(|| async { fresh_cluster() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_passes_the_presence_suite() {
    herald_core::conformance::run_presence_suite(|| async { fresh_cluster() }).await;
}

/// Two shards (two databases of the test Redis: separate keyspaces) under one prefix.
fn fresh_sharded_cluster() -> RedisCluster {
    let mut config = config("sharded");
    let base = redis_url();
    let base = base.trim_end_matches('/');
    config.addresses = vec![format!("{base}/1"), format!("{base}/2")];
    config.presence_ttl = herald_core::duration::HumanDuration::from_secs(1);
    RedisCluster { config }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_pass_the_cluster_and_presence_suites() {
    herald_core::conformance::run_cluster_suite(|| async { fresh_sharded_cluster() }).await;
    herald_core::conformance::run_presence_suite(|| async { fresh_sharded_cluster() }).await;
}

#[tokio::test]
async fn channels_are_spread_over_the_shards() {
    let cluster = fresh_sharded_cluster();
    let (a, _qa) = node(&cluster.config).await;
    for n in 0..40 {
        a.publish(publish(&format!("spread:{n}"), 1))
            .await
            .expect("publish");
    }
    let mut per_shard = Vec::new();
    for db in [1, 2] {
        let client = redis::Client::open(format!("{}/{db}", redis_url().trim_end_matches('/')))
            .expect("url");
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:s:*", cluster.config.prefix))
            .query_async(&mut connection)
            .await
            .expect("keys");
        per_shard.push(keys.len());
    }
    assert_eq!(per_shard.iter().sum::<usize>(), 40, "{per_shard:?}");
    assert!(
        per_shard.iter().all(|n| *n >= 8),
        "both shards hold channels: {per_shard:?}"
    );
}

#[tokio::test]
async fn a_publication_no_replica_confirmed_is_not_acknowledged() {
    let mut config = config("wait");
    config.wait_replicas = 1;
    config.wait_timeout = herald_core::duration::HumanDuration(Duration::from_millis(100));
    let (a, _qa) = node(&config).await;
    let error = a
        .publish(publish("durable", 1))
        .await
        .expect_err("the test Redis has no replica: nothing may be acknowledged");
    match error {
        herald_core::store::StoreError::Unavailable(detail) => {
            assert!(detail.contains("confirmed by 0 of 1 replicas"), "{detail}");
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
}

async fn want_prefix(engine: &RedisEngine, prefix: &str) {
    wait_for(engine, |interest, ready| {
        interest.gained_prefix(&Arc::from(prefix), ready);
    })
    .await;
}

/// Publications received, as (channel, offset), until `count` arrived; a channel that
/// became unrecoverable fails the test.
async fn received(queue: &mut FanoutQueue, count: usize) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    while out.len() < count {
        let event = tokio::time::timeout(Duration::from_secs(5), queue.next_event())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} events arrived: {out:?}", out.len()))
            .expect("feed open");
        match event {
            ChannelEvent::Publication(p) => {
                out.push((p.channel.to_string(), p.publication.offset));
            }
            ChannelEvent::Unrecoverable { channel } => panic!("{channel} became unrecoverable"),
            _ => {}
        }
    }
    out
}

async fn nothing_more(queue: &mut FanoutQueue) {
    if let Ok(event) = tokio::time::timeout(Duration::from_millis(300), queue.next_event()).await {
        panic!("unexpected {event:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wanted_prefix_brings_every_shards_channels_once_each() {
    // A Redis of its own: no other test kills its pub/sub connections (it kills them itself).
    let server = server::RedisServer::start();
    let mut cluster = fresh_sharded_cluster();
    cluster.config.addresses = vec![format!("{}/1", server.url()), format!("{}/2", server.url())];
    let (a, _qa) = node(&cluster.config).await;
    let (b, mut qb) = node(&cluster.config).await;
    let interest = b.interest().expect("interest");
    want_prefix(&b, "p:").await;
    // Overlapping interests: a shorter prefix and the channel itself; one delivery each.
    want_prefix(&b, "p").await;
    want(&b, "p:3").await;
    for round in 1..=2 {
        for n in 0..6 {
            a.publish(publish(&format!("p:{n}"), round))
                .await
                .expect("publish");
        }
        a.publish(publish("q:0", round)).await.expect("publish");
    }
    let mut got = received(&mut qb, 12).await;
    got.sort();
    let expected: Vec<(String, u64)> = (0..6)
        .flat_map(|n| [(format!("p:{n}"), 1), (format!("p:{n}"), 2)])
        .collect();
    assert_eq!(got, expected);
    nothing_more(&mut qb).await;
    // The channel loses its own subscription, the prefixes still bring it, without a gap.
    interest.lost(&Arc::from("p:3"));
    interest.lost_prefix(&Arc::from("p"));
    a.publish(publish("p:3", 3)).await.expect("publish");
    assert_eq!(received(&mut qb, 1).await, [("p:3".to_owned(), 3)]);
    // A lost pub/sub connection: channels seen through the prefix are healed from history.
    kill_pubsub_connections(&server.url()).await;
    for n in 4..=6 {
        a.publish(publish("p:3", n)).await.expect("publish");
    }
    let got = received(&mut qb, 3).await;
    assert_eq!(got.iter().map(|(_, o)| *o).collect::<Vec<_>>(), [4, 5, 6]);
    interest.lost_prefix(&Arc::from("p:"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.publish(publish("p:1", 3)).await.expect("publish");
    nothing_more(&mut qb).await;
}
