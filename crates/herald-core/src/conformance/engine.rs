//! The engine suite: the rules one [`Engine`] handle keeps, whatever its backend.
//!
//! Owns: [`run_engine_suite`]. Every engine runs it (the single-node [`LocalEngine`] over
//! each history store, and one node of a cluster engine); what only shows with several nodes
//! is the cluster suite's.
//!
//! [`LocalEngine`]: crate::engine::LocalEngine

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use crate::engine::Engine;
use crate::fanout::FanoutFeed;
use crate::publication::{ChannelEvent, StreamPosition};
use crate::store::{HistoryQuery, StoreError};

use super::{
    Probe, WAIT, client, describe, joined, json, keyed, position_of, publish, rethrow_finished,
    stored, subscribe, unstored,
};

const OFFSETS: &str = "engine: offsets are contiguous from 1";
const DELIVERED: &str =
    "engine: the feed receives each stored publication once, in offset order, with its epoch";
const AFTER_STORED: &str = "engine: a publication is delivered only after it is stored";
const EPOCH: &str = "engine: a stream keeps its epoch";
const READS: &str = "engine: reads match what publish returned";
const UNSTORED: &str =
    "engine: a publication without history is delivered with offset 0 and returns no position";
const UNSTORED_ORDER: &str =
    "engine: publications without history from one publisher arrive in the order published";
const UNSTORED_NO_OFFSET: &str = "engine: a publication without history takes no offset";
const ANNOUNCE: &str = "engine: announced join and leave are delivered, in order";
const IDEMPOTENT: &str = "engine: a repeated idempotency key returns the first result";
const NOT_REDELIVERED: &str = "engine: a duplicate is not delivered";
const PER_CHANNEL: &str = "engine: idempotency keys are per channel";
const REMOVE: &str = "engine: remove deletes publications and keeps offset and epoch";
const HEALTHY: &str = "engine: an engine that serves requests reports healthy";
const MANY: &str =
    "engine: publish_many stores and delivers as consecutive publishes would, one result each";

/// Concurrent publishes in the concurrency rule (to one channel; half as many to a second).
const CONCURRENT: u64 = 200;

/// Runs every engine rule against fresh engines from `factory`.
///
/// `factory(feed)` builds a fresh, empty engine (new history; for a cluster engine a fresh
/// backend or key prefix) that delivers what reaches its node to `feed`. When the engine has
/// [`Engine::interest`], the suite tells it of each channel it expects deliveries of
/// (`gained`, awaited) before publishing; engines without deliver everything.
///
/// Rules:
/// - publishes with history return offsets contiguous from 1 per channel, also under
///   200 concurrent publishes, with one epoch per stream;
/// - the feed receives each stored publication once, after it is stored, in offset order per
///   channel, with the data published and the epoch publish returned;
/// - a publish without history returns no position, takes no offset, and is delivered with
///   offset 0; a publisher's publications without history arrive in the order published;
/// - announced join and leave are delivered, in order;
/// - an idempotency key (with or without history) returns the first result the second time
///   and delivers nothing; a key is per channel;
/// - reads (all, paged, reverse) match what publish returned; `remove` empties a stream and
///   keeps its offset and epoch; `flush` succeeds; the engine reports healthy;
/// - `publish_many` gives each channel's publications offsets in the order given, delivers
///   them in that order, and dedupes a key repeated inside the same call.
///
/// Panics with a message that starts with the broken rule.
pub async fn run_engine_suite<F, Fut>(factory: F)
where
    F: Fn(FanoutFeed) -> Fut,
    Fut: Future<Output = Result<Arc<dyn Engine>, StoreError>>,
{
    let fresh = || async {
        let (feed, probe) = Probe::new("the node");
        let engine = factory(feed)
            .await
            .unwrap_or_else(|err| panic!("engine: the factory must build an engine: {err}"));
        (engine, probe)
    };

    let (engine, probe) = fresh().await;
    stored_publications_in_order(engine, probe).await;
    let (engine, probe) = fresh().await;
    concurrent_publishes(engine, probe).await;
    let (engine, probe) = fresh().await;
    publications_without_history(engine, probe).await;
    let (engine, probe) = fresh().await;
    join_and_leave(engine, probe).await;
    let (engine, probe) = fresh().await;
    idempotency(engine, probe).await;
    let (engine, probe) = fresh().await;
    remove_and_flush(engine, probe).await;
    let (engine, probe) = fresh().await;
    publish_many(engine, probe).await;
}

/// Several publications of two channels in one call, a key repeated inside it.
async fn publish_many(engine: Arc<dyn Engine>, mut probe: Probe) {
    let (a, b) = ("conf:many-a", "conf:many-b");
    subscribe(&*engine, "the node", a, MANY).await;
    subscribe(&*engine, "the node", b, MANY).await;
    let results = engine
        .publish_many(vec![
            stored(a, "a1"),
            stored(b, "b1"),
            keyed(stored(a, "a2"), "k"),
            stored(a, "a3"),
            keyed(stored(a, "again"), "k"),
            stored(b, "b2"),
        ])
        .await;
    let results: Vec<crate::engine::Published> = results
        .into_iter()
        .map(|r| r.unwrap_or_else(|err| panic!("{MANY}: a publish failed: {err}")))
        .collect();
    let positions: Vec<Option<u64>> = results
        .iter()
        .map(|r| r.position.as_ref().map(|p| p.offset))
        .collect();
    assert_eq!(
        positions,
        [Some(1), Some(1), Some(2), Some(3), Some(2), Some(2)],
        "{MANY}: offsets in the order given (the duplicate returns the first position)"
    );
    let duplicates: Vec<bool> = results.iter().map(|r| r.duplicate).collect();
    assert_eq!(
        duplicates,
        [false, false, false, false, true, false],
        "{MANY}: only the repeated key is a duplicate"
    );
    probe
        .expect(a, &[(1, "a1"), (2, "a2"), (3, "a3")], None, MANY)
        .await;
    probe.expect(b, &[(1, "b1"), (2, "b2")], None, MANY).await;
    let page = read(&*engine, a, HistoryQuery::default()).await;
    assert_eq!(offsets(&page), [1, 2, 3], "{MANY}: reads agree");
}

fn offsets(page: &crate::store::HistoryPage) -> Vec<u64> {
    page.publications.iter().map(|p| p.offset).collect()
}

async fn read(
    engine: &dyn Engine,
    channel: &str,
    query: HistoryQuery,
) -> crate::store::HistoryPage {
    engine
        .read(channel, query)
        .await
        .unwrap_or_else(|err| panic!("{READS}: read of {channel:?} failed: {err}"))
}

/// Sequential publishes: positions, deliveries and reads agree.
async fn stored_publications_in_order(engine: Arc<dyn Engine>, mut probe: Probe) {
    let channel = "conf:seq";
    subscribe(&*engine, "the node", channel, DELIVERED).await;
    let mut positions: Vec<StreamPosition> = Vec::new();
    for i in 1..=20u64 {
        let published = publish(&*engine, stored(channel, &format!("s{i}")), OFFSETS).await;
        assert!(
            !published.duplicate,
            "{OFFSETS}: a publish without a key is never a duplicate"
        );
        let position = position_of(&published, OFFSETS);
        assert_eq!(position.offset, i, "{OFFSETS}: publish {i} of {channel:?}");
        assert!(
            !position.epoch.is_empty(),
            "{EPOCH}: a stored publication has an epoch"
        );
        if let Some(first) = positions.first() {
            assert_eq!(position.epoch, first.epoch, "{EPOCH}: publish {i}");
        }
        positions.push(position);
    }
    let epoch = positions[0].epoch.clone();
    let labels: Vec<String> = (1..=20).map(|i| format!("s{i}")).collect();
    let expected: Vec<(u64, &str)> = (1..=20).zip(labels.iter().map(String::as_str)).collect();
    probe
        .expect(channel, &expected, Some(&epoch), DELIVERED)
        .await;

    let page = read(&*engine, channel, HistoryQuery::default()).await;
    assert_eq!(offsets(&page), (1..=20).collect::<Vec<_>>(), "{READS}");
    for p in &page.publications {
        assert_eq!(
            p.data,
            json(&format!("s{}", p.offset)),
            "{READS}: data read back at offset {}",
            p.offset
        );
    }
    assert_eq!(
        Some(&page.position),
        positions.last(),
        "{READS}: the top is the last position published"
    );
    let since = |offset: u64| Some(StreamPosition::new(offset, epoch.clone()));
    let paged = read(
        &*engine,
        channel,
        HistoryQuery {
            since: since(15),
            limit: Some(3),
            reverse: false,
        },
    )
    .await;
    assert_eq!(offsets(&paged), [16, 17, 18], "{READS}: a page after 15");
    let newest = read(
        &*engine,
        channel,
        HistoryQuery {
            since: None,
            limit: Some(2),
            reverse: true,
        },
    )
    .await;
    assert_eq!(offsets(&newest), [20, 19], "{READS}: the newest two");

    let deadline = tokio::time::Instant::now() + WAIT;
    while !engine.healthy() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{HEALTHY}: still unhealthy {WAIT:?} after serving publishes and reads"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A publication as published or delivered: offset, data (JSON text) and epoch.
type Seen = (u64, String, Arc<str>);

/// Concurrent publishes to two channels: contiguous offsets, each delivered once, in order,
/// after it was stored.
async fn concurrent_publishes(engine: Arc<dyn Engine>, mut probe: Probe) {
    let channels = [("conf:a", CONCURRENT), ("conf:b", CONCURRENT / 2)];
    for (channel, _) in channels {
        subscribe(&*engine, "the node", channel, DELIVERED).await;
    }
    let mut tasks = Vec::new();
    for i in 0..CONCURRENT {
        for (channel, count) in channels {
            if i < count {
                let engine = engine.clone();
                let label = format!("{channel}-{i}");
                tasks.push(tokio::spawn(async move {
                    let published = publish(&*engine, stored(channel, &label), OFFSETS).await;
                    (channel, label, position_of(&published, OFFSETS))
                }));
            }
        }
    }
    // Taken while publishes are still running: each must be readable once delivered.
    let mut delivered: HashMap<&str, Vec<Seen>> = HashMap::new();
    for (channel, count) in channels {
        for expected in 1..=count {
            let p = match probe.try_next(channel).await {
                Ok(ChannelEvent::Publication(p)) => p,
                Ok(other) => panic!(
                    "{DELIVERED}: expected a publication, got a {}",
                    describe(&other)
                ),
                Err(why) => {
                    rethrow_finished(&mut tasks).await;
                    panic!("{DELIVERED}: {why}");
                }
            };
            assert_eq!(
                p.publication.offset, expected,
                "{DELIVERED}: {channel:?} under concurrent publishes"
            );
            let page = read(
                &*engine,
                channel,
                HistoryQuery {
                    since: Some(StreamPosition::new(expected - 1, "")),
                    limit: Some(1),
                    reverse: false,
                },
            )
            .await;
            assert_eq!(
                offsets(&page),
                [expected],
                "{AFTER_STORED}: offset {expected} of {channel:?} was delivered but is not in \
                 history"
            );
            let label = String::from_utf8_lossy(p.publication.data.bytes()).into_owned();
            delivered
                .entry(channel)
                .or_default()
                .push((expected, label, p.epoch.clone()));
        }
    }
    let mut published: HashMap<&str, Vec<Seen>> = HashMap::new();
    for task in &mut tasks {
        let (channel, label, position) = joined(task).await;
        published.entry(channel).or_default().push((
            position.offset,
            format!("\"{label}\""),
            Arc::from(position.epoch),
        ));
    }
    for (channel, count) in channels {
        let mut got = published.remove(channel).unwrap_or_default();
        got.sort_unstable();
        assert_eq!(
            got.iter().map(|(o, _, _)| *o).collect::<Vec<_>>(),
            (1..=count).collect::<Vec<_>>(),
            "{OFFSETS}: {count} concurrent publishes to {channel:?}"
        );
        let seen = delivered.remove(channel).unwrap_or_default();
        for ((offset, label, epoch), (_, seen_label, seen_epoch)) in got.iter().zip(&seen) {
            assert_eq!(
                seen_label, label,
                "{DELIVERED}: the data delivered at offset {offset} of {channel:?} is not what \
                 publish stored there"
            );
            assert_eq!(
                seen_epoch, epoch,
                "{DELIVERED}: offset {offset} of {channel:?} was delivered with another epoch"
            );
            assert_eq!(epoch, &got[0].2, "{EPOCH}: {channel:?} under concurrency");
        }
        // Nothing was delivered twice: the next delivery is the next publication.
        let marker = format!("{channel}-marker");
        let next = publish(&*engine, stored(channel, &marker), OFFSETS).await;
        assert_eq!(position_of(&next, OFFSETS).offset, count + 1, "{OFFSETS}");
        probe
            .expect(channel, &[(count + 1, &marker)], None, DELIVERED)
            .await;
    }
}

/// Publications that skip history: no position, no offset, delivered with offset 0.
async fn publications_without_history(engine: Arc<dyn Engine>, mut probe: Probe) {
    let channel = "conf:mixed";
    subscribe(&*engine, "the node", channel, UNSTORED).await;
    let first = publish(&*engine, stored(channel, "first"), OFFSETS).await;
    let live = publish(&*engine, unstored(channel, "live"), UNSTORED).await;
    assert_eq!(
        live,
        crate::engine::Published::default(),
        "{UNSTORED}: no position, not a duplicate"
    );
    let second = publish(&*engine, stored(channel, "second"), OFFSETS).await;
    assert_eq!(
        (
            position_of(&first, OFFSETS).offset,
            position_of(&second, OFFSETS).offset
        ),
        (1, 2),
        "{UNSTORED_NO_OFFSET}"
    );
    // The order of stored and unstored publications between each other is not a rule.
    let mut stored_seen = Vec::new();
    let mut live_seen = Vec::new();
    for _ in 0..3 {
        let p = probe.publication(channel, UNSTORED).await;
        if p.publication.offset == 0 {
            live_seen.push(p.publication.data.clone());
        } else {
            stored_seen.push(p.publication.offset);
        }
    }
    assert_eq!(stored_seen, [1, 2], "{DELIVERED}");
    assert_eq!(live_seen, [json("live")], "{UNSTORED}");
    let page = read(&*engine, channel, HistoryQuery::default()).await;
    assert_eq!(
        offsets(&page),
        [1, 2],
        "{UNSTORED_NO_OFFSET}: nor is it stored"
    );

    let channel = "conf:live";
    subscribe(&*engine, "the node", channel, UNSTORED).await;
    for i in 0..10 {
        let published = publish(&*engine, unstored(channel, &format!("l{i}")), UNSTORED).await;
        assert_eq!(published.position, None, "{UNSTORED}");
    }
    for i in 0..10 {
        let p = probe.publication(channel, UNSTORED).await;
        assert_eq!(p.publication.offset, 0, "{UNSTORED}");
        assert_eq!(
            p.publication.data,
            json(&format!("l{i}")),
            "{UNSTORED_ORDER}"
        );
    }
    let page = read(&*engine, channel, HistoryQuery::default()).await;
    assert_eq!(page.position.offset, 0, "{UNSTORED_NO_OFFSET}");
}

async fn join_and_leave(engine: Arc<dyn Engine>, mut probe: Probe) {
    let channel = "conf:room";
    subscribe(&*engine, "the node", channel, ANNOUNCE).await;
    let alice = Arc::new(client("c1", "alice"));
    let events = [
        ChannelEvent::Join {
            channel: Arc::from(channel),
            info: alice.clone(),
        },
        ChannelEvent::Leave {
            channel: Arc::from(channel),
            info: alice.clone(),
        },
    ];
    for event in &events {
        engine
            .announce(event.clone())
            .await
            .unwrap_or_else(|err| panic!("{ANNOUNCE}: announce failed: {err}"));
    }
    for sent in &events {
        let got = probe.next(channel, ANNOUNCE).await;
        let same = match (sent, &got) {
            (ChannelEvent::Join { info: a, .. }, ChannelEvent::Join { info: b, .. })
            | (ChannelEvent::Leave { info: a, .. }, ChannelEvent::Leave { info: b, .. }) => a == b,
            _ => false,
        };
        assert!(
            same,
            "{ANNOUNCE}: sent a {}, received a {}",
            describe(sent),
            describe(&got)
        );
    }
}

async fn idempotency(engine: Arc<dyn Engine>, mut probe: Probe) {
    // With history.
    let channel = "conf:idem";
    subscribe(&*engine, "the node", channel, NOT_REDELIVERED).await;
    let first = publish(&*engine, keyed(stored(channel, "once"), "k1"), IDEMPOTENT).await;
    assert!(!first.duplicate, "{IDEMPOTENT}: the first use of a key");
    let position = position_of(&first, IDEMPOTENT);
    let again = publish(&*engine, keyed(stored(channel, "twice"), "k1"), IDEMPOTENT).await;
    assert!(
        again.duplicate,
        "{IDEMPOTENT}: the second use is a duplicate"
    );
    assert_eq!(
        again.position,
        Some(position.clone()),
        "{IDEMPOTENT}: a duplicate returns the first position"
    );
    let other_key = publish(&*engine, keyed(stored(channel, "other"), "k2"), IDEMPOTENT).await;
    assert!(
        !other_key.duplicate,
        "{IDEMPOTENT}: another key is not a duplicate"
    );
    assert_eq!(
        position_of(&other_key, OFFSETS).offset,
        2,
        "{OFFSETS}: a duplicate takes no offset"
    );
    probe
        .expect(
            channel,
            &[(1, "once"), (2, "other")],
            Some(&position.epoch),
            NOT_REDELIVERED,
        )
        .await;
    let page = read(&*engine, channel, HistoryQuery::default()).await;
    assert_eq!(
        offsets(&page),
        [1, 2],
        "{IDEMPOTENT}: a duplicate stores nothing"
    );

    let elsewhere = "conf:idem-elsewhere";
    subscribe(&*engine, "the node", elsewhere, PER_CHANNEL).await;
    let there = publish(
        &*engine,
        keyed(stored(elsewhere, "there"), "k1"),
        PER_CHANNEL,
    )
    .await;
    assert!(!there.duplicate, "{PER_CHANNEL}");
    assert_eq!(position_of(&there, PER_CHANNEL).offset, 1, "{PER_CHANNEL}");
    probe
        .expect(elsewhere, &[(1, "there")], None, PER_CHANNEL)
        .await;

    // Without history.
    let channel = "conf:idem-live";
    subscribe(&*engine, "the node", channel, NOT_REDELIVERED).await;
    let first = publish(&*engine, keyed(unstored(channel, "once"), "k1"), IDEMPOTENT).await;
    assert_eq!(
        first,
        crate::engine::Published::default(),
        "{IDEMPOTENT}: the first use of a key without history"
    );
    let again = publish(
        &*engine,
        keyed(unstored(channel, "twice"), "k1"),
        IDEMPOTENT,
    )
    .await;
    assert!(
        again.duplicate && again.position.is_none(),
        "{IDEMPOTENT}: the second use of a key without history is a duplicate with no \
         position, got {again:?}"
    );
    publish(&*engine, unstored(channel, "marker"), UNSTORED).await;
    probe
        .expect(
            channel,
            &[(0, "once"), (0, "marker")],
            None,
            NOT_REDELIVERED,
        )
        .await;

    let elsewhere = "conf:idem-live-elsewhere";
    subscribe(&*engine, "the node", elsewhere, PER_CHANNEL).await;
    let there = publish(
        &*engine,
        keyed(unstored(elsewhere, "there"), "k1"),
        PER_CHANNEL,
    )
    .await;
    assert!(!there.duplicate, "{PER_CHANNEL}: without history");
    probe
        .expect(elsewhere, &[(0, "there")], None, PER_CHANNEL)
        .await;
}

async fn remove_and_flush(engine: Arc<dyn Engine>, mut probe: Probe) {
    let channel = "conf:remove";
    subscribe(&*engine, "the node", channel, REMOVE).await;
    let mut last = None;
    for i in 1..=3 {
        last = Some(publish(&*engine, stored(channel, &format!("r{i}")), OFFSETS).await);
    }
    let last = last.map(|p| position_of(&p, OFFSETS));
    engine
        .remove(channel)
        .await
        .unwrap_or_else(|err| panic!("{REMOVE}: remove failed: {err}"));
    let page = read(&*engine, channel, HistoryQuery::default()).await;
    assert!(page.publications.is_empty(), "{REMOVE}: nothing is left");
    assert_eq!(Some(page.position), last, "{REMOVE}: the top stays");
    let next = publish(&*engine, stored(channel, "r4"), OFFSETS).await;
    assert_eq!(
        position_of(&next, OFFSETS).offset,
        4,
        "{REMOVE}: offsets continue"
    );
    probe
        .expect(
            channel,
            &[(1, "r1"), (2, "r2"), (3, "r3"), (4, "r4")],
            None,
            DELIVERED,
        )
        .await;
    engine
        .flush()
        .await
        .unwrap_or_else(|err| panic!("engine: flush must succeed: {err}"));
}
