//! The Redis engine against a real Redis (`HERALD_TEST_REDIS_URL`, default
//! `redis://127.0.0.1:6379`), each test under its own key prefix: two engines stand for two
//! nodes.

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
    let interest = engine.interest().expect("a cluster engine has interest");
    let (ready, wait) = herald_core::hub::interest_wait();
    interest.gained(&Arc::from(channel), ready);
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
    let mut out = Vec::new();
    while out.len() < count {
        let event = tokio::time::timeout(Duration::from_secs(5), queue.next_event())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} events arrived: {out:?}", out.len()))
            .expect("feed open");
        match event {
            ChannelEvent::Publication(p) => out.push(p.publication.offset),
            ChannelEvent::Unrecoverable { channel } => panic!("{channel} became unrecoverable"),
            _ => {}
        }
    }
    out
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
    let config = config("heal");
    let (a, _qa) = node(&config).await;
    let (b, mut qb) = node(&config).await;
    want(&b, "feed").await;
    for n in 1..=10 {
        a.publish(publish("feed", n)).await.expect("publish");
    }
    assert_eq!(offsets(&mut qb, 10).await, (1..=10).collect::<Vec<_>>());
    // Kill every pub/sub connection of this Redis: what is published until B is back on
    // pub/sub must still reach B, in order, from the stream.
    let client = redis::Client::open(redis_url()).expect("url");
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
    for n in 11..=40 {
        a.publish(publish("feed", n)).await.expect("publish");
    }
    assert_eq!(offsets(&mut qb, 30).await, (11..=40).collect::<Vec<_>>());
    let (reconnects, _, unrecoverable) = b.pubsub_totals();
    assert!(reconnects >= 1, "B noticed the lost connection");
    assert_eq!(unrecoverable, 0);
}
