//! The cluster suite: the rules several engine handles on one shared backend keep together,
//! each handle standing for one node of a cluster.
//!
//! Owns: [`ClusterBackend`] (how the suite gets nodes and presence stores of one backend) and
//! [`run_cluster_suite`]. Single-node engines do not run it; cluster engines run it beside
//! the engine suite (which checks what one node sees on its own).

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;

use crate::engine::{Engine, Published};
use crate::fanout::FanoutFeed;
use crate::presence::PresenceStore;
use crate::publication::{ChannelEvent, StreamPosition};
use crate::store::{HistoryQuery, StoreError};

use super::{
    Probe, SETTLE, client, describe, gain, joined, keyed, position_of, publish, resolved, stored,
    subscribe, unstored,
};

const REACHES: &str = "cluster: a publication on one node reaches every node subscribed";
const CONCURRENT_ORDER: &str = "cluster: concurrent publishers on several nodes share one \
     contiguous order, and every subscribed node receives all of it in order, once";
const LOST: &str = "cluster: after lost, a node receives nothing more of the channel";
const FLAP_SUBSCRIBED: &str = "cluster: gained, lost, gained in quick succession ends subscribed";
const FLAP_UNSUBSCRIBED: &str = "cluster: gained, lost in quick succession ends unsubscribed";
const WAITS_RESOLVE: &str = "cluster: every interest wait resolves";
const IDEMPOTENT: &str = "cluster: an idempotency key used on one node is a duplicate on another";
const ANNOUNCE: &str = "cluster: join and leave announced on one node reach the others, in order";
const HISTORY: &str = "cluster: history is shared: what one node published, another reads";

/// Publishes from each of two nodes in the concurrency rule.
const PER_NODE: u64 = 100;

/// A fresh shared backend for the cluster and presence suites: every handle it gives out
/// works on the same data, as the nodes of one cluster do.
#[async_trait]
pub trait ClusterBackend: Send + Sync {
    /// A new node's engine on this backend, delivering what reaches the node to `feed`.
    async fn node(&self, feed: FanoutFeed) -> Result<Arc<dyn Engine>, StoreError>;

    /// A new node's presence store on this backend. Stores that expire entries
    /// ([`PresenceStore::refresh_interval`] is `Some`) should be built with a short expiry
    /// (about a second): the presence suite waits for one.
    async fn presence(&self) -> Result<Arc<dyn PresenceStore>, StoreError>;
}

/// One node of the cluster under test: its engine and what it was delivered.
struct Member {
    name: String,
    engine: Arc<dyn Engine>,
    probe: Probe,
}

impl Member {
    async fn start(backend: &impl ClusterBackend, name: &str) -> Self {
        let (feed, probe) = Probe::new(name);
        let engine = backend
            .node(feed)
            .await
            .unwrap_or_else(|err| panic!("cluster: the backend must start {name}: {err}"));
        Self {
            name: name.to_owned(),
            engine,
            probe,
        }
    }

    async fn subscribe(&self, channel: &str, rule: &str) {
        subscribe(&*self.engine, &self.name, channel, rule).await;
    }

    async fn publish(&self, publish: crate::engine::Publish, rule: &str) -> Published {
        publish_on(&self.engine, &self.name, publish, rule).await
    }

    async fn flush(&self) {
        self.engine
            .flush()
            .await
            .unwrap_or_else(|err| panic!("cluster: flush on {} failed: {err}", self.name));
    }
}

async fn publish_on(
    engine: &Arc<dyn Engine>,
    node: &str,
    request: crate::engine::Publish,
    rule: &str,
) -> Published {
    publish(
        &**engine,
        request,
        &format!("{rule} (publishing on {node})"),
    )
    .await
}

/// Runs every cluster rule, each against a fresh backend from `fresh`.
///
/// Rules (nodes A, B, C are handles from one backend):
/// - B subscribes (`gained`, awaited), A publishes: B receives each publication in order,
///   with the epoch A's publish returned; a publication without history reaches B too;
/// - concurrent publishers on A and B to one channel get offsets contiguous from 1, and A,
///   B and C (all subscribed) each receive exactly those, in order, no duplicates, no
///   unrecoverable gaps;
/// - after `lost` on B (and [`SETTLE`]), B receives nothing more of the channel while C,
///   still subscribed, does;
/// - `gained`, `lost`, `gained` in quick succession (without waiting in between) ends
///   subscribed, and `gained`, `lost` ends unsubscribed: an engine applies them in the order
///   they were made; every wait resolves (to anything but the last `gained`'s, which is `Ok`);
/// - an idempotency key used on A, then on B, is a duplicate on B with A's position (with
///   history) or no position (without), and is delivered once;
/// - join and leave announced on A reach B, in order;
/// - history is shared: what A published B reads; B's `remove` empties it for A, keeping
///   offset and epoch; B's next publish continues the offsets.
///
/// Rules about `lost` apply to engines whose nodes have [`Engine::interest`]; an engine
/// without delivers everything everywhere and skips them.
///
/// Panics with a message that starts with the broken rule.
pub async fn run_cluster_suite<F, Fut, B>(fresh: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
    B: ClusterBackend,
{
    reaches_subscribed_nodes(&fresh().await).await;
    concurrent_publishers(&fresh().await).await;
    lost_interest(&fresh().await).await;
    quick_interest_changes(&fresh().await).await;
    idempotency_across_nodes(&fresh().await).await;
    join_and_leave(&fresh().await).await;
    shared_history(&fresh().await).await;
}

async fn reaches_subscribed_nodes(backend: &impl ClusterBackend) {
    let a = Member::start(backend, "node A").await;
    let mut b = Member::start(backend, "node B").await;
    let channel = "conf:news";
    b.subscribe(channel, REACHES).await;
    let mut epoch = None;
    for i in 1..=10u64 {
        let published = a.publish(stored(channel, &format!("n{i}")), REACHES).await;
        let position = position_of(&published, REACHES);
        assert_eq!(position.offset, i, "{REACHES}: offsets on A");
        epoch.get_or_insert(position.epoch);
    }
    let labels: Vec<String> = (1..=10).map(|i| format!("n{i}")).collect();
    let expected: Vec<(u64, &str)> = (1..=10).zip(labels.iter().map(String::as_str)).collect();
    b.probe
        .expect(channel, &expected, epoch.as_deref(), REACHES)
        .await;
    let live = a.publish(unstored(channel, "live"), REACHES).await;
    assert_eq!(
        live.position, None,
        "{REACHES}: without history, no position"
    );
    b.probe.expect(channel, &[(0, "live")], None, REACHES).await;
    a.flush().await;
    b.flush().await;
}

async fn concurrent_publishers(backend: &impl ClusterBackend) {
    let mut nodes = [
        Member::start(backend, "node A").await,
        Member::start(backend, "node B").await,
        Member::start(backend, "node C").await,
    ];
    let channel = "conf:busy";
    for node in &nodes {
        node.subscribe(channel, CONCURRENT_ORDER).await;
    }
    let mut tasks = Vec::new();
    for i in 0..PER_NODE {
        for node in &nodes[..2] {
            let engine = node.engine.clone();
            let name = node.name.clone();
            let label = format!("{name}-{i}");
            tasks.push(tokio::spawn(async move {
                let published =
                    publish_on(&engine, &name, stored(channel, &label), CONCURRENT_ORDER).await;
                (position_of(&published, CONCURRENT_ORDER), label)
            }));
        }
    }
    let mut published = Vec::new();
    for task in &mut tasks {
        published.push(joined(task).await);
    }
    published.sort_unstable_by_key(|(position, _)| position.offset);
    let total = 2 * PER_NODE;
    assert_eq!(
        published.iter().map(|(p, _)| p.offset).collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>(),
        "{CONCURRENT_ORDER}: offsets returned to the publishers"
    );
    let epoch = published[0].0.epoch.clone();
    assert!(
        published.iter().all(|(p, _)| p.epoch == epoch),
        "{CONCURRENT_ORDER}: one epoch for the stream"
    );
    let expected: Vec<(u64, &str)> = published
        .iter()
        .map(|(p, label)| (p.offset, label.as_str()))
        .collect();
    for node in &mut nodes {
        node.probe
            .expect(channel, &expected, Some(&epoch), CONCURRENT_ORDER)
            .await;
    }
    // No duplicates: the next delivery everywhere is the next publication.
    nodes[2]
        .publish(stored(channel, "after"), CONCURRENT_ORDER)
        .await;
    for node in &mut nodes {
        node.probe
            .expect(channel, &[(total + 1, "after")], None, CONCURRENT_ORDER)
            .await;
    }
}

/// Waits until `node` receives a marker publication on `marker_channel` (which it is
/// subscribed to), published on `from`: what was delivered to it before has arrived.
async fn sync_with(
    node: &mut Member,
    from: &Member,
    marker_channel: &str,
    label: &str,
    rule: &str,
) {
    from.publish(unstored(marker_channel, label), rule).await;
    loop {
        let p = node.probe.publication(marker_channel, rule).await;
        if p.publication.data == super::json(label) {
            return;
        }
    }
}

async fn lost_interest(backend: &impl ClusterBackend) {
    let a = Member::start(backend, "node A").await;
    let mut b = Member::start(backend, "node B").await;
    let mut c = Member::start(backend, "node C").await;
    let Some(b_interest) = b.engine.interest() else {
        return;
    };
    let (channel, marker) = ("conf:leaving", "conf:leaving-marker");
    b.subscribe(channel, LOST).await;
    b.subscribe(marker, LOST).await;
    c.subscribe(channel, LOST).await;
    a.publish(stored(channel, "l1"), LOST).await;
    b.probe.expect(channel, &[(1, "l1")], None, LOST).await;
    c.probe.expect(channel, &[(1, "l1")], None, LOST).await;

    b_interest.lost(&Arc::from(channel));
    tokio::time::sleep(SETTLE).await;
    for i in 2..=5 {
        a.publish(stored(channel, &format!("l{i}")), LOST).await;
    }
    c.probe
        .expect(
            channel,
            &[(2, "l2"), (3, "l3"), (4, "l4"), (5, "l5")],
            None,
            LOST,
        )
        .await;
    sync_with(&mut b, &a, marker, "m1", LOST).await;
    b.probe.expect_none(channel, LOST);
}

async fn quick_interest_changes(backend: &impl ClusterBackend) {
    let a = Member::start(backend, "node A").await;
    let mut b = Member::start(backend, "node B").await;
    let mut c = Member::start(backend, "node C").await;
    let Some(interest) = b.engine.interest() else {
        return;
    };

    // gained, lost, gained, lost, gained: subscribed.
    let channel: Arc<str> = Arc::from("conf:flap");
    let mut waits = Vec::new();
    for _ in 0..2 {
        waits.push(gain(&*interest, &channel));
        interest.lost(&channel);
    }
    let last = gain(&*interest, &channel);
    for (n, wait) in waits.into_iter().enumerate() {
        // Resolving to an error is fine: that subscriber was gone already.
        let _ = resolved(
            wait,
            &format!("node B's gained #{} of {channel:?}", n + 1),
            WAITS_RESOLVE,
        )
        .await;
    }
    if let Err(err) = resolved(last, "node B's last gained of \"conf:flap\"", WAITS_RESOLVE).await {
        panic!("{FLAP_SUBSCRIBED}: the last gained failed: {err}");
    }
    let published = a.publish(stored(&channel, "f1"), FLAP_SUBSCRIBED).await;
    assert_eq!(position_of(&published, FLAP_SUBSCRIBED).offset, 1);
    b.probe
        .expect(&channel, &[(1, "f1")], None, FLAP_SUBSCRIBED)
        .await;

    // gained, lost: unsubscribed (C, subscribed all along, shows the publication went out).
    let (channel, marker) = ("conf:flop", "conf:flop-marker");
    let name: Arc<str> = Arc::from(channel);
    b.subscribe(marker, FLAP_UNSUBSCRIBED).await;
    c.subscribe(channel, FLAP_UNSUBSCRIBED).await;
    let wait = gain(&*interest, &name);
    interest.lost(&name);
    let _ = resolved(wait, "node B's gained of \"conf:flop\"", WAITS_RESOLVE).await;
    tokio::time::sleep(SETTLE).await;
    a.publish(stored(channel, "g1"), FLAP_UNSUBSCRIBED).await;
    c.probe
        .expect(channel, &[(1, "g1")], None, FLAP_UNSUBSCRIBED)
        .await;
    sync_with(&mut b, &a, marker, "m1", FLAP_UNSUBSCRIBED).await;
    b.probe.expect_none(channel, FLAP_UNSUBSCRIBED);
}

async fn idempotency_across_nodes(backend: &impl ClusterBackend) {
    let a = Member::start(backend, "node A").await;
    let b = Member::start(backend, "node B").await;
    let mut c = Member::start(backend, "node C").await;

    let channel = "conf:idem";
    c.subscribe(channel, IDEMPOTENT).await;
    let first = a
        .publish(keyed(stored(channel, "once"), "k"), IDEMPOTENT)
        .await;
    assert!(!first.duplicate, "{IDEMPOTENT}: the first use, on A");
    let position = position_of(&first, IDEMPOTENT);
    let again = b
        .publish(keyed(stored(channel, "twice"), "k"), IDEMPOTENT)
        .await;
    assert_eq!(
        again,
        Published {
            position: Some(position.clone()),
            duplicate: true,
        },
        "{IDEMPOTENT}: with history, B gets A's result"
    );
    let next = b.publish(stored(channel, "next"), IDEMPOTENT).await;
    assert_eq!(
        position_of(&next, IDEMPOTENT).offset,
        2,
        "{IDEMPOTENT}: a duplicate takes no offset"
    );
    c.probe
        .expect(
            channel,
            &[(1, "once"), (2, "next")],
            Some(&position.epoch),
            IDEMPOTENT,
        )
        .await;

    let channel = "conf:idem-live";
    c.subscribe(channel, IDEMPOTENT).await;
    let first = a
        .publish(keyed(unstored(channel, "once"), "k"), IDEMPOTENT)
        .await;
    assert!(
        !first.duplicate,
        "{IDEMPOTENT}: the first use without history, on A"
    );
    let again = b
        .publish(keyed(unstored(channel, "twice"), "k"), IDEMPOTENT)
        .await;
    assert_eq!(
        again,
        Published {
            position: None,
            duplicate: true,
        },
        "{IDEMPOTENT}: without history, B gets a duplicate with no position"
    );
    b.publish(unstored(channel, "marker"), IDEMPOTENT).await;
    c.probe
        .expect(channel, &[(0, "once"), (0, "marker")], None, IDEMPOTENT)
        .await;
}

async fn join_and_leave(backend: &impl ClusterBackend) {
    let a = Member::start(backend, "node A").await;
    let mut b = Member::start(backend, "node B").await;
    let channel = "conf:room";
    b.subscribe(channel, ANNOUNCE).await;
    let bob = Arc::new(client("c2", "bob"));
    let join = ChannelEvent::Join {
        channel: Arc::from(channel),
        info: bob.clone(),
    };
    let leave = ChannelEvent::Leave {
        channel: Arc::from(channel),
        info: bob.clone(),
    };
    for event in [join, leave] {
        a.engine
            .announce(event)
            .await
            .unwrap_or_else(|err| panic!("{ANNOUNCE}: announce on A failed: {err}"));
    }
    match b.probe.next(channel, ANNOUNCE).await {
        ChannelEvent::Join { info, .. } if info == bob => {}
        other => panic!(
            "{ANNOUNCE}: B expected bob's join, got a {}",
            describe(&other)
        ),
    }
    match b.probe.next(channel, ANNOUNCE).await {
        ChannelEvent::Leave { info, .. } if info == bob => {}
        other => panic!(
            "{ANNOUNCE}: B expected bob's leave, got a {}",
            describe(&other)
        ),
    }
}

async fn shared_history(backend: &impl ClusterBackend) {
    let a = Member::start(backend, "node A").await;
    let b = Member::start(backend, "node B").await;
    let channel = "conf:shared";
    let mut last = None;
    for i in 1..=5 {
        let published = a.publish(stored(channel, &format!("h{i}")), HISTORY).await;
        last = Some(position_of(&published, HISTORY));
    }
    let read = |node: &Member, query: HistoryQuery| {
        let engine = node.engine.clone();
        let name = node.name.clone();
        async move {
            engine
                .read(channel, query)
                .await
                .unwrap_or_else(|err| panic!("{HISTORY}: read on {name} failed: {err}"))
        }
    };
    let page = read(&b, HistoryQuery::default()).await;
    let got: Vec<(u64, crate::publication::Payload)> = page
        .publications
        .iter()
        .map(|p| (p.offset, p.data.clone()))
        .collect();
    let expected: Vec<(u64, crate::publication::Payload)> = (1..=5)
        .map(|i| (i, super::json(&format!("h{i}"))))
        .collect();
    assert_eq!(got, expected, "{HISTORY}: B reads A's publications");
    assert_eq!(
        Some(page.position.clone()),
        last,
        "{HISTORY}: B sees A's top"
    );
    let since = Some(StreamPosition::new(3, page.position.epoch.clone()));
    let after = read(
        &b,
        HistoryQuery {
            since,
            limit: None,
            reverse: false,
        },
    )
    .await;
    assert_eq!(
        after
            .publications
            .iter()
            .map(|p| p.offset)
            .collect::<Vec<_>>(),
        [4, 5],
        "{HISTORY}: B pages A's stream with A's epoch"
    );

    b.engine
        .remove(channel)
        .await
        .unwrap_or_else(|err| panic!("{HISTORY}: remove on B failed: {err}"));
    let page = read(&a, HistoryQuery::default()).await;
    assert!(
        page.publications.is_empty(),
        "{HISTORY}: B's remove empties A's view"
    );
    assert_eq!(
        Some(page.position),
        last,
        "{HISTORY}: remove keeps offset and epoch"
    );
    let next = b.publish(stored(channel, "h6"), HISTORY).await;
    assert_eq!(
        position_of(&next, HISTORY).offset,
        6,
        "{HISTORY}: B's publish continues A's offsets"
    );
}
