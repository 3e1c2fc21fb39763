//! A shared in-memory cluster that tests the suites themselves (test builds only).
//!
//! Owns: [`FakeCluster`], a [`ClusterBackend`] whose nodes share one memory history store, a
//! router that hands each stored, unstored or announced event to the nodes interested in its
//! channel, one idempotency window for publications without history, and one presence store
//! that expires entries; and the [`Flaw`]s that break one rule each, to show that the suites
//! catch them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::engine::{Engine, EventSink, LocalEngine, Publish, Published};
use crate::fanout::FanoutFeed;
use crate::hub::{ChannelInterest, InterestReady};
use crate::memory::MemoryHistoryStore;
use crate::presence::{PresenceError, PresenceStats, PresenceStore};
use crate::publication::{ChannelEvent, ClientInfo, PublicationEvent};
use crate::store::{CommitListener, HistoryPage, HistoryQuery, StoreError};

use super::ClusterBackend;

/// A deliberate bug in the nodes of a [`FakeCluster`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flaw {
    None,
    /// `lost` is ignored: the node keeps receiving the channel.
    IgnoresLost,
    /// Every event reaches the node twice.
    DeliversTwice,
}

struct NodeState {
    feed: FanoutFeed,
    channels: Mutex<HashSet<Arc<str>>>,
    flaw: Flaw,
}

/// Hands events to the nodes interested in their channel, in one order.
#[derive(Default)]
struct Router {
    nodes: Mutex<Vec<Arc<NodeState>>>,
}

impl Router {
    fn deliver(&self, event: ChannelEvent) {
        for node in self.nodes.lock().iter() {
            if node.channels.lock().contains(event.channel()) {
                node.feed.push(event.clone());
                if node.flaw == Flaw::DeliversTwice {
                    node.feed.push(event.clone());
                }
            }
        }
    }
}

impl CommitListener for Router {
    fn committed(&self, event: Arc<PublicationEvent>) {
        self.deliver(ChannelEvent::Publication(event));
    }
}

/// The router as the shared engine's sink.
struct RouterSink(Arc<Router>);

impl EventSink for RouterSink {
    fn deliver(&self, event: ChannelEvent) {
        self.0.deliver(event);
    }
}

struct FakeCluster {
    router: Arc<Router>,
    /// History, idempotency and delivery shared by every node: one engine whose sink routes
    /// events to the nodes interested in their channel.
    engine: Arc<LocalEngine>,
    presence: Arc<ExpiringPresence>,
    flaw: Flaw,
}

impl FakeCluster {
    fn new(flaw: Flaw) -> Self {
        let router = Arc::new(Router::default());
        let history = Arc::new(MemoryHistoryStore::new(router.clone()));
        Self {
            engine: Arc::new(LocalEngine::new(history, RouterSink(router.clone()))),
            router,
            presence: Arc::new(ExpiringPresence::new(Duration::from_millis(600))),
            flaw,
        }
    }
}

#[async_trait]
impl ClusterBackend for FakeCluster {
    async fn node(&self, feed: FanoutFeed) -> Result<Arc<dyn Engine>, StoreError> {
        let state = Arc::new(NodeState {
            feed,
            channels: Mutex::new(HashSet::new()),
            flaw: self.flaw,
        });
        self.router.nodes.lock().push(state.clone());
        Ok(Arc::new(FakeNode {
            state,
            engine: self.engine.clone(),
        }))
    }

    async fn presence(&self) -> Result<Arc<dyn PresenceStore>, StoreError> {
        Ok(self.presence.clone())
    }
}

struct FakeNode {
    state: Arc<NodeState>,
    engine: Arc<LocalEngine>,
}

struct Interest(Arc<NodeState>);

impl ChannelInterest for Interest {
    fn gained(&self, channel: &Arc<str>, ready: InterestReady) {
        self.0.channels.lock().insert(channel.clone());
        ready.resolve(Ok(()));
    }

    fn lost(&self, channel: &Arc<str>) {
        if self.0.flaw != Flaw::IgnoresLost {
            self.0.channels.lock().remove(channel);
        }
    }

    fn gained_prefix(&self, _prefix: &Arc<str>, ready: InterestReady) {
        ready.resolve(Err(StoreError::Unavailable(
            "the fake engine has no prefix interest".into(),
        )));
    }

    fn lost_prefix(&self, _prefix: &Arc<str>) {}
}

#[async_trait]
impl Engine for FakeNode {
    async fn publish(&self, publish: Publish) -> Result<Published, StoreError> {
        self.engine.publish(publish).await
    }

    async fn announce(&self, event: ChannelEvent) -> Result<(), StoreError> {
        self.engine.announce(event).await
    }

    async fn read(&self, channel: &str, query: HistoryQuery) -> Result<HistoryPage, StoreError> {
        Engine::read(&*self.engine, channel, query).await
    }

    async fn remove(&self, channel: &str) -> Result<(), StoreError> {
        self.engine.remove(channel).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.engine.flush().await
    }

    fn interest(&self) -> Option<Arc<dyn ChannelInterest>> {
        Some(Arc::new(Interest(self.state.clone())))
    }
}

/// A channel's presence entries by client id, with when each expires.
type Entries = HashMap<String, (ClientInfo, Instant)>;

/// Presence shared by every node, each entry expiring `ttl` after it was last added.
struct ExpiringPresence {
    ttl: Duration,
    channels: Mutex<HashMap<String, Entries>>,
}

impl ExpiringPresence {
    fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            channels: Mutex::new(HashMap::new()),
        }
    }

    fn live(&self, channel: &str) -> HashMap<String, ClientInfo> {
        let now = Instant::now();
        self.channels
            .lock()
            .get(channel)
            .map(|clients| {
                clients
                    .iter()
                    .filter(|(_, (_, expires))| *expires > now)
                    .map(|(id, (info, _))| (id.clone(), info.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[async_trait]
impl PresenceStore for ExpiringPresence {
    async fn add(&self, channel: &str, info: ClientInfo) -> Result<(), PresenceError> {
        let expires = Instant::now() + self.ttl;
        self.channels
            .lock()
            .entry(channel.to_owned())
            .or_default()
            .insert(info.client.clone(), (info, expires));
        Ok(())
    }

    async fn remove(&self, channel: &str, client_id: &str) -> Result<(), PresenceError> {
        if let Some(clients) = self.channels.lock().get_mut(channel) {
            clients.remove(client_id);
        }
        Ok(())
    }

    async fn get(&self, channel: &str) -> Result<HashMap<String, ClientInfo>, PresenceError> {
        Ok(self.live(channel))
    }

    async fn stats(&self, channel: &str) -> Result<PresenceStats, PresenceError> {
        let live = self.live(channel);
        let users: HashSet<&str> = live.values().map(|c| c.user.as_str()).collect();
        Ok(PresenceStats {
            num_clients: live.len() as u64,
            num_users: users.len() as u64,
        })
    }

    fn refresh_interval(&self) -> Option<Duration> {
        Some(self.ttl / 3)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fake_cluster_passes_the_cluster_suite() {
    super::run_cluster_suite(|| async { FakeCluster::new(Flaw::None) }).await;
}

#[tokio::test]
async fn a_fake_cluster_passes_the_presence_suite() {
    super::run_presence_suite(|| async { FakeCluster::new(Flaw::None) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fake_cluster_node_passes_the_engine_suite() {
    super::run_engine_suite(|feed| async move { FakeCluster::new(Flaw::None).node(feed).await })
        .await;
}

#[tokio::test]
#[should_panic(expected = "cluster: after lost, a node receives nothing more of the channel")]
async fn the_cluster_suite_catches_an_ignored_lost() {
    super::run_cluster_suite(|| async { FakeCluster::new(Flaw::IgnoresLost) }).await;
}

#[tokio::test]
#[should_panic(expected = "engine: the feed receives each stored publication once")]
async fn the_engine_suite_catches_a_double_delivery() {
    super::run_engine_suite(|feed| async move {
        FakeCluster::new(Flaw::DeliversTwice).node(feed).await
    })
    .await;
}
