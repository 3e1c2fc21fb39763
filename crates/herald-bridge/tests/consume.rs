//! The consume loop against a scripted source and a real (in-memory) node: order per
//! channel, settling only after publish, rejection without blocking, reconnect with backoff,
//! and redelivery made harmless by the idempotency key. The brokers themselves are tested
//! end to end in `tests/interop/python/test_sources.py`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use herald_bridge::{
    ConsumeConfig, Mapping, Outcome, Received, Source, SourceError, SourceStats, spawn_source,
};
use herald_core::Node;
use herald_core::duration::HumanDuration;
use herald_core::namespace::{NamespaceOptions, Namespaces};
use herald_core::node::NodeConfig;
use herald_core::store::HistoryQuery;
use herald_outbound::worker::Backoff;
use parking_lot::Mutex;

#[derive(Default)]
struct Script {
    /// Messages the broker holds, in order.
    queue: VecDeque<(u64, Received)>,
    /// Delivered, not settled (given back on disconnect, like a broker would).
    in_flight: Vec<(u64, Received)>,
    settled: Vec<(u64, Outcome)>,
    connect_failures: u32,
    settle_failures: u32,
    connects: u32,
}

#[derive(Clone, Default)]
struct ScriptedSource(Arc<Mutex<Script>>);

#[async_trait]
impl Source for ScriptedSource {
    type Receipt = u64;

    async fn connect(&mut self) -> Result<(), SourceError> {
        let mut script = self.0.lock();
        if script.connect_failures > 0 {
            script.connect_failures -= 1;
            return Err(SourceError::Connect("refused".into()));
        }
        script.connects += 1;
        Ok(())
    }

    async fn receive(&mut self, max: usize) -> Result<Vec<(u64, Received)>, SourceError> {
        let batch: Vec<_> = {
            let mut script = self.0.lock();
            let take = max.min(script.queue.len());
            let batch: Vec<_> = script.queue.drain(..take).collect();
            script.in_flight.extend(batch.iter().cloned());
            batch
        };
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(batch)
    }

    async fn settle(&mut self, settled: Vec<(u64, Outcome)>) -> Result<(), SourceError> {
        let mut script = self.0.lock();
        if script.settle_failures > 0 {
            script.settle_failures -= 1;
            return Err(SourceError::Settle("connection lost".into()));
        }
        for (tag, outcome) in settled {
            script.in_flight.retain(|(t, _)| *t != tag);
            script.settled.push((tag, outcome));
        }
        Ok(())
    }

    async fn disconnect(&mut self) {
        let mut script = self.0.lock();
        let back: Vec<_> = script.in_flight.drain(..).collect();
        for message in back.into_iter().rev() {
            script.queue.push_front(message);
        }
    }
}

fn node() -> Node {
    let options = NamespaceOptions {
        history_size: 1000,
        history_ttl: HumanDuration::from_secs(3600),
        ..NamespaceOptions::default()
    };
    Node::in_memory(NodeConfig {
        namespaces: Namespaces::new(options, Vec::new()).expect("namespaces"),
        max_publication_size: 1024,
        ..NodeConfig::default()
    })
}

async fn history(node: &Node, channel: &str) -> Vec<serde_json::Value> {
    let page = node
        .history(
            channel,
            HistoryQuery {
                since: None,
                limit: None,
                reverse: false,
            },
        )
        .await
        .expect("history");
    page.publications
        .iter()
        .map(|p| serde_json::from_slice(p.data.bytes()).expect("json"))
        .collect()
}

fn config(batch: usize) -> ConsumeConfig {
    let mut config = ConsumeConfig::new("test");
    config.batch = batch;
    config.backoff = Backoff {
        base: Duration::from_millis(5),
        max: Duration::from_millis(20),
        attempts: u32::MAX,
    };
    config
}

fn envelope(tag: u64, channel: &str, n: u64) -> (u64, Received) {
    let body = format!(r#"{{"channel":"{channel}","data":{{"n":{n}}}}}"#);
    (
        tag,
        Received::new(body.into_bytes()).with_id(tag.to_string()),
    )
}

async fn settled_count(source: &ScriptedSource, want: usize) {
    for _ in 0..500 {
        if source.0.lock().settled.len() >= want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("only {} of {want} settled", source.0.lock().settled.len());
}

fn count(stats: &SourceStats) -> (u64, u64, u64) {
    (
        stats.published.load(Ordering::Relaxed),
        stats.duplicates.load(Ordering::Relaxed),
        stats.rejected.load(Ordering::Relaxed),
    )
}

#[tokio::test]
async fn messages_publish_in_order_per_channel_and_bad_ones_are_rejected_without_blocking() {
    let source = ScriptedSource::default();
    {
        let mut script = source.0.lock();
        for n in 1..=40u64 {
            let channel = if n % 2 == 0 { "even" } else { "odd" };
            script.queue.push_back(envelope(n, channel, n));
        }
        script
            .queue
            .insert(5, (100, Received::new(&b"not an envelope"[..])));
        script.queue.insert(9, envelope(101, "nope:x", 0));
        script.queue.insert(13, envelope(102, "big", 0));
        if let Some((_, message)) = script.queue.get_mut(13) {
            message.body = format!(r#"{{"channel":"big","data":"{}"}}"#, "x".repeat(2000))
                .into_bytes()
                .into();
        }
    }
    let node = node();
    let mapping = Mapping::new("test", None, None, &["id"]).expect("mapping");
    let handle = spawn_source(source.clone(), mapping, node.clone(), config(7));
    settled_count(&source, 43).await;
    let odd: Vec<_> = (1..=40)
        .filter(|n| n % 2 == 1)
        .map(|n| serde_json::json!({"n": n}))
        .collect();
    let even: Vec<_> = (1..=40)
        .filter(|n| n % 2 == 0)
        .map(|n| serde_json::json!({"n": n}))
        .collect();
    assert_eq!(history(&node, "odd").await, odd);
    assert_eq!(history(&node, "even").await, even);
    let settled = source.0.lock().settled.clone();
    let rejected: Vec<u64> = settled
        .iter()
        .filter(|(_, outcome)| *outcome == Outcome::Rejected)
        .map(|(tag, _)| *tag)
        .collect();
    assert_eq!(rejected, vec![100, 101, 102]);
    assert_eq!(count(&handle.stats), (40, 0, 3));
    handle.stop();
    handle.join(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_lost_acknowledgement_redelivers_and_the_idempotency_key_absorbs_it() {
    let source = ScriptedSource::default();
    {
        let mut script = source.0.lock();
        script.connect_failures = 3;
        script.settle_failures = 1;
        for n in 1..=20u64 {
            script.queue.push_back(envelope(n, "c", n));
        }
    }
    let node = node();
    let mapping = Mapping::new("test", None, None, &["id"]).expect("mapping");
    let handle = spawn_source(source.clone(), mapping, node.clone(), config(5));
    settled_count(&source, 20).await;
    let want: Vec<_> = (1..=20).map(|n| serde_json::json!({"n": n})).collect();
    assert_eq!(
        history(&node, "c").await,
        want,
        "each message once, in order"
    );
    // The first batch of 5 was published, its acknowledgement lost, and delivered again.
    assert_eq!(count(&handle.stats), (20, 5, 0));
    assert_eq!(handle.stats.reconnects.load(Ordering::Relaxed), 1);
    assert_eq!(
        source.0.lock().connects,
        2,
        "three refusals, then two connections"
    );
    handle.stop();
    handle.join(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_stop_waits_for_the_batch_in_flight_then_disconnects() {
    let source = ScriptedSource::default();
    {
        let mut script = source.0.lock();
        for n in 1..=3u64 {
            script.queue.push_back(envelope(n, "s", n));
        }
    }
    let node = node();
    let mapping = Mapping::new("test", None, None, &["id"]).expect("mapping");
    let handle = spawn_source(source.clone(), mapping, node.clone(), config(10));
    settled_count(&source, 3).await;
    let stats = handle.stats.clone();
    handle.stop();
    handle.join(Duration::from_secs(5)).await;
    assert!(!stats.connected.load(Ordering::Relaxed));
    assert!(source.0.lock().in_flight.is_empty());
}
