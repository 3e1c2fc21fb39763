//! The node facade: the one entry point transports and APIs use to publish, read history and
//! presence, list channels and subscribe local subscribers.
//!
//! It applies channel and namespace rules, publishes through the [`Engine`] (which stores and
//! delivers in one step), owns the fan-out task that drains the ordered queue of events the
//! engine delivers into the hub, and keeps this node's presence entries fresh where the
//! presence store expires them. It holds no transport or storage specifics.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::task::JoinHandle;

use crate::channel::{ChannelName, ChannelRules};
use crate::engine::{Engine, LocalEngine, Publish};
use crate::error::{ErrorCode, HeraldError};
use crate::events::{ClientEvent, ClientEventKind, ClientEventObserver};
use crate::fanout::{FanoutFeed, FanoutQueue, Queued};
use crate::hub::{Hub, Subscriber, SubscriberId};
use crate::namespace::{NamespaceOptions, Namespaces};
use crate::presence::{PresenceStats, PresenceStore};
use crate::publication::{ChannelEvent, ClientInfo, Payload, Publication, StreamPosition};
use crate::store::{HistoryPage, HistoryQuery, Retention};
use crate::time::now_ms;

/// Node-wide settings.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Human-readable node name (shown by `info`).
    pub name: String,
    pub channel_rules: ChannelRules,
    pub namespaces: Namespaces,
    /// Largest accepted publication payload in bytes.
    pub max_publication_size: usize,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: "herald".into(),
            channel_rules: ChannelRules::default(),
            namespaces: Namespaces::default(),
            max_publication_size: 64 * 1024,
        }
    }
}

/// The ports a node runs on.
pub struct Backends {
    pub engine: Arc<dyn Engine>,
    pub presence: Arc<dyn PresenceStore>,
}

/// A publish as the node sees it, whatever API it came from.
#[derive(Clone, Debug)]
pub struct PublishRequest {
    pub channel: String,
    pub data: Payload,
    pub tags: BTreeMap<String, String>,
    pub skip_history: bool,
    pub idempotency_key: Option<String>,
    pub info: Option<Arc<ClientInfo>>,
    /// The server API's `push` section, handed as is to the [`PublishObserver`] (the node
    /// does not read it).
    pub push: Option<Arc<serde_json::Value>>,
}

impl PublishRequest {
    pub fn new(channel: impl Into<String>, data: Payload) -> Self {
        Self {
            channel: channel.into(),
            data,
            tags: BTreeMap::new(),
            skip_history: false,
            idempotency_key: None,
            info: None,
            push: None,
        }
    }
}

/// A publication that was just published (not a duplicate), for what follows a publish
/// outside the node: push notifications to users who are offline.
#[derive(Debug)]
pub struct Published<'a> {
    pub channel: &'a ChannelName,
    pub options: &'a NamespaceOptions,
    /// Its place in history, when stored.
    pub position: Option<&'a StreamPosition>,
    pub publication: &'a Publication,
    /// The request's `push` section.
    pub push: Option<&'a serde_json::Value>,
}

/// Told about every publication after it is published and before `publish` returns, so what
/// it queues is queued when the publisher hears "published". Its errors are its own to report:
/// the publication stands.
#[async_trait::async_trait]
pub trait PublishObserver: Send + Sync + 'static {
    /// Whether [`PublishObserver::published`] needs to see a publication with these options
    /// and `push` section (so publications nobody watches cost nothing).
    /// Checked before publishing: a `push` section it cannot use is the publisher's error
    /// and nothing is published.
    fn wants(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        push: Option<&serde_json::Value>,
    ) -> Result<bool, HeraldError>;

    async fn published(&self, published: Published<'_>);
}

/// A checked publish waiting for the engine: what its observers need afterwards.
struct Prepared {
    channel: ChannelName,
    options: Arc<NamespaceOptions>,
    wanting: Vec<Arc<dyn PublishObserver>>,
    observed: Option<Publication>,
    stored: bool,
    push: Option<Arc<serde_json::Value>>,
}

/// Where a publication landed; `position` is `None` when it was not stored in history.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishResult {
    pub position: Option<StreamPosition>,
    /// The idempotency key was seen before: nothing was published this time.
    pub duplicate: bool,
}

/// The outcome of resuming a channel from a position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The missed publications, oldest first (empty when not recovered).
    pub publications: Vec<Publication>,
    /// The stream's top when history was read.
    pub position: StreamPosition,
    /// True when `publications` is exactly what was missed.
    pub recovered: bool,
}

/// Counters exported as metrics.
#[derive(Debug, Default)]
pub struct NodeStats {
    pub publications: AtomicU64,
    pub duplicate_publications: AtomicU64,
    pub history_writes: AtomicU64,
    pub deliveries: AtomicU64,
    pub dropped_deliveries: AtomicU64,
    pub errors: AtomicU64,
}

/// A snapshot for the `info` API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub uid: String,
    pub name: String,
    pub version: String,
    pub num_channels: u64,
    pub num_subscriptions: u64,
    pub uptime: Duration,
}

struct Inner {
    uid: String,
    config: NodeConfig,
    backends: Backends,
    hub: Arc<Hub>,
    feed: FanoutFeed,
    stats: Arc<NodeStats>,
    started: Instant,
    fanout_task: Mutex<Option<JoinHandle<()>>>,
    /// This node's presence entries, re-added before they expire (only where the presence
    /// store expires entries: a shared store outlives the node that wrote them).
    own_presence: Option<Arc<OwnPresence>>,
    presence_task: Mutex<Option<JoinHandle<()>>>,
    /// Added after the node is built (push, webhooks and bridges are built on top of it);
    /// each sees every publication it wants, in the order they were added.
    observers: parking_lot::RwLock<Arc<[Arc<dyn PublishObserver>]>>,
    /// Hear client lifecycle events (webhooks), added after the node is built.
    event_observers: parking_lot::RwLock<Arc<[Arc<dyn ClientEventObserver>]>>,
}

/// Presence entries this node wrote, by channel and client id.
type OwnPresence = Mutex<HashMap<(Arc<str>, String), Arc<ClientInfo>>>;

/// The node facade; cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("uid", &self.inner.uid)
            .field("name", &self.inner.config.name)
            .finish()
    }
}

impl Node {
    /// Builds a node and starts its fan-out task. `feed` must be the handler the engine was
    /// built with, `queue` its other end. Needs a Tokio runtime.
    pub fn new(
        config: NodeConfig,
        backends: Backends,
        feed: FanoutFeed,
        queue: FanoutQueue,
    ) -> Self {
        let stats = Arc::new(NodeStats::default());
        let hub = Arc::new(Hub::with_interest(backends.engine.interest()));
        let fanout_task = tokio::spawn(run_fanout(queue, hub.clone(), stats.clone()));
        let refresh = backends.presence.refresh_interval();
        let own_presence = refresh.map(|_| Arc::new(OwnPresence::default()));
        let presence_task = refresh.zip(own_presence.clone()).map(|(every, own)| {
            tokio::spawn(refresh_presence(backends.presence.clone(), own, every))
        });
        Self {
            inner: Arc::new(Inner {
                uid: uuid::Uuid::new_v4().to_string(),
                config,
                backends,
                hub,
                feed,
                stats,
                started: Instant::now(),
                fanout_task: Mutex::new(Some(fanout_task)),
                own_presence,
                presence_task: Mutex::new(presence_task),
                observers: parking_lot::RwLock::new(Arc::from(Vec::new())),
                event_observers: parking_lot::RwLock::new(Arc::from(Vec::new())),
            }),
        }
    }

    /// A node with in-memory history and presence.
    pub fn in_memory(config: NodeConfig) -> Self {
        let (feed, queue) = crate::fanout::channel();
        let history = Arc::new(crate::memory::MemoryHistoryStore::new(Arc::new(
            feed.clone(),
        )));
        let backends = Backends {
            engine: Arc::new(LocalEngine::new(history, feed.clone())),
            presence: Arc::new(crate::memory::MemoryPresenceStore::new()),
        };
        Self::new(config, backends, feed, queue)
    }

    /// This node's unique id.
    pub fn uid(&self) -> &str {
        &self.inner.uid
    }

    /// False while the engine cannot be reached.
    pub fn engine_healthy(&self) -> bool {
        self.inner.backends.engine.healthy()
    }

    pub fn config(&self) -> &NodeConfig {
        &self.inner.config
    }

    pub fn stats(&self) -> &Arc<NodeStats> {
        &self.inner.stats
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.inner.hub
    }

    /// Validates a channel name and resolves its namespace options.
    pub fn resolve(
        &self,
        channel: &str,
    ) -> Result<(ChannelName, Arc<NamespaceOptions>), HeraldError> {
        let name = ChannelName::parse(channel, &self.inner.config.channel_rules)?;
        let options = self.inner.config.namespaces.resolve(&name)?.clone();
        Ok((name, options))
    }

    fn count_error<T>(&self, result: Result<T, HeraldError>) -> Result<T, HeraldError> {
        if result.is_err() {
            self.inner.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Publishes to one channel: stored in history first (when enabled), then fanned out.
    pub async fn publish(&self, request: PublishRequest) -> Result<PublishResult, HeraldError> {
        let result = self.publish_inner(request).await;
        self.count_error(result)
    }

    async fn publish_inner(&self, request: PublishRequest) -> Result<PublishResult, HeraldError> {
        let (prepared, publish) = self.prepare(request)?;
        let published = self.inner.backends.engine.publish(publish).await?;
        Ok(self.finish(prepared, published).await)
    }

    /// Publishes several publications as consecutive [`Node::publish`] calls would — a
    /// channel's offsets and deliveries in the order given, each checked on its own — but
    /// stored with one durable write where the engine can (one group commit with SQLite).
    /// One result per request, in order; a request that fails does not stop the others.
    pub async fn publish_many(
        &self,
        requests: Vec<PublishRequest>,
    ) -> Vec<Result<PublishResult, HeraldError>> {
        let mut results: Vec<Option<Result<PublishResult, HeraldError>>> =
            (0..requests.len()).map(|_| None).collect();
        let mut prepared = Vec::with_capacity(requests.len());
        let mut publishes = Vec::with_capacity(requests.len());
        for (index, request) in requests.into_iter().enumerate() {
            match self.prepare(request) {
                Ok((ready, publish)) => {
                    prepared.push((index, ready));
                    publishes.push(publish);
                }
                Err(error) => results[index] = Some(Err(error)),
            }
        }
        let published = self.inner.backends.engine.publish_many(publishes).await;
        for ((index, ready), outcome) in prepared.into_iter().zip(published) {
            results[index] = Some(match outcome {
                Ok(published) => Ok(self.finish(ready, published).await),
                Err(error) => Err(error.into()),
            });
        }
        results
            .into_iter()
            .map(|result| {
                let result = result.unwrap_or_else(|| {
                    Err(HeraldError::new(
                        ErrorCode::Internal,
                        "the engine returned fewer results than publications",
                    ))
                });
                self.count_error(result)
            })
            .collect()
    }

    /// Checks a request and builds what the engine stores; what `finish` needs afterwards.
    fn prepare(&self, request: PublishRequest) -> Result<(Prepared, Publish), HeraldError> {
        let (channel, options) = self.resolve(&request.channel)?;
        let max = self.inner.config.max_publication_size;
        if request.data.len() > max {
            return Err(HeraldError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "publication data is {} bytes; the limit is {max}",
                    request.data.len()
                ),
            ));
        }
        if let Some(key) = &request.idempotency_key
            && key.len() > 256
        {
            return Err(HeraldError::bad_request(
                "idempotency_key is longer than 256 bytes",
            ));
        }
        let publication = Publication {
            offset: 0,
            time_ms: now_ms(),
            data: request.data,
            tags: request.tags,
            info: request.info,
        };
        let observers = self.inner.observers.read().clone();
        let mut wanting: Vec<Arc<dyn PublishObserver>> = Vec::new();
        for observer in observers.iter() {
            if observer.wants(&channel, &options, request.push.as_deref())? {
                wanting.push(observer.clone());
            }
        }
        let observed = (!wanting.is_empty()).then(|| publication.clone());
        let window = options.idempotency_window.as_duration();
        let stored = options.history_enabled() && !request.skip_history;
        let publish = Publish {
            channel: channel.as_arc().clone(),
            publication,
            history: stored.then(|| Retention {
                size: options.history_size,
                ttl: options.history_ttl.as_duration(),
            }),
            idempotency: request.idempotency_key.map(|key| (key, window)),
        };
        Ok((
            Prepared {
                channel,
                options,
                wanting,
                observed,
                stored,
                push: request.push,
            },
            publish,
        ))
    }

    /// Counts a publish the engine took and hands it to the observers that want it.
    async fn finish(
        &self,
        prepared: Prepared,
        published: crate::engine::Published,
    ) -> PublishResult {
        let stats = &self.inner.stats;
        if published.duplicate {
            stats.duplicate_publications.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.publications.fetch_add(1, Ordering::Relaxed);
            if prepared.stored {
                stats.history_writes.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(mut publication) = prepared.observed {
                if let Some(position) = &published.position {
                    publication.offset = position.offset;
                }
                // Awaited before the publish returns: what the publisher saw acknowledged has
                // been handed to every observer (which enqueue durably).
                for observer in &prepared.wanting {
                    observer
                        .published(Published {
                            channel: &prepared.channel,
                            options: &prepared.options,
                            position: published.position.as_ref(),
                            publication: &publication,
                            push: prepared.push.as_deref(),
                        })
                        .await;
                }
            }
        }
        PublishResult {
            position: published.position,
            duplicate: published.duplicate,
        }
    }

    /// Reads history; `not available` if the namespace keeps none.
    pub async fn history(
        &self,
        channel: &str,
        query: HistoryQuery,
    ) -> Result<HistoryPage, HeraldError> {
        let result = async {
            let (channel, options) = self.resolve(channel)?;
            if !options.history_enabled() {
                return Err(HeraldError::new(
                    ErrorCode::NotAvailable,
                    "history is disabled for this namespace",
                ));
            }
            if query.reverse && query.since.as_ref().is_some_and(|s| s.offset == 0) {
                return Err(HeraldError::bad_request(
                    "reverse history needs a since offset above 0",
                ));
            }
            Ok(self
                .inner
                .backends
                .engine
                .read(channel.as_str(), query)
                .await?)
        }
        .await;
        self.count_error(result)
    }

    /// What a client at `since` missed on `channel`: exactly the publications after it, or
    /// `recovered: false` when that cannot be told (another epoch, an offset ahead of the top,
    /// publications already pruned, or more than `max` missed). Never a silent gap.
    pub async fn recover(
        &self,
        channel: &str,
        since: &StreamPosition,
        max: usize,
    ) -> Result<Recovery, HeraldError> {
        let (name, options) = self.resolve(channel)?;
        if !options.history_enabled() {
            return Err(HeraldError::new(
                ErrorCode::NotAvailable,
                "history is disabled for this namespace",
            ));
        }
        let query = HistoryQuery {
            since: Some(StreamPosition::new(since.offset, "")),
            limit: Some(max.saturating_add(1)),
            reverse: false,
        };
        let page = match self.inner.backends.engine.read(name.as_str(), query).await {
            Ok(page) => page,
            Err(crate::store::StoreError::UnrecoverablePosition(_)) => {
                let top = self
                    .inner
                    .backends
                    .engine
                    .read(
                        name.as_str(),
                        HistoryQuery {
                            limit: Some(0),
                            ..HistoryQuery::default()
                        },
                    )
                    .await?;
                return Ok(Recovery {
                    publications: Vec::new(),
                    position: top.position,
                    recovered: false,
                });
            }
            Err(err) => return Err(err.into()),
        };
        let contiguous = page
            .publications
            .first()
            .is_none_or(|p| p.offset == since.offset + 1)
            && page.publications.len() as u64 == page.position.offset.saturating_sub(since.offset);
        let recovered =
            since.epoch == page.position.epoch && contiguous && page.publications.len() <= max;
        let publications = if recovered {
            page.publications
        } else {
            Vec::new()
        };
        Ok(Recovery {
            publications,
            position: page.position,
            recovered,
        })
    }

    /// Deletes a channel's stored publications (its offset and epoch stay).
    pub async fn remove_history(&self, channel: &str) -> Result<(), HeraldError> {
        let result = async {
            let (channel, options) = self.resolve(channel)?;
            if !options.history_enabled() {
                return Err(HeraldError::new(
                    ErrorCode::NotAvailable,
                    "history is disabled for this namespace",
                ));
            }
            Ok(self.inner.backends.engine.remove(channel.as_str()).await?)
        }
        .await;
        self.count_error(result)
    }

    async fn presence_channel(&self, channel: &str) -> Result<ChannelName, HeraldError> {
        let (channel, options) = self.resolve(channel)?;
        if !options.presence {
            return Err(HeraldError::new(
                ErrorCode::NotAvailable,
                "presence is disabled for this namespace",
            ));
        }
        Ok(channel)
    }

    /// Who is in a channel; `not available` if the namespace tracks no presence.
    pub async fn presence(
        &self,
        channel: &str,
    ) -> Result<HashMap<String, ClientInfo>, HeraldError> {
        let result = async {
            let channel = self.presence_channel(channel).await?;
            self.inner
                .backends
                .presence
                .get(channel.as_str())
                .await
                .map_err(|e| HeraldError::internal(e.to_string()))
        }
        .await;
        self.count_error(result)
    }

    pub async fn presence_stats(&self, channel: &str) -> Result<PresenceStats, HeraldError> {
        let result = async {
            let channel = self.presence_channel(channel).await?;
            self.inner
                .backends
                .presence
                .stats(channel.as_str())
                .await
                .map_err(|e| HeraldError::internal(e.to_string()))
        }
        .await;
        self.count_error(result)
    }

    /// Channels with local subscribers whose names match `pattern` (`*` matches any run of
    /// characters), with subscriber counts.
    pub fn channels(&self, pattern: Option<&str>) -> Vec<(Arc<str>, usize)> {
        let mut channels = self.inner.hub.channels();
        if let Some(pattern) = pattern.filter(|p| !p.is_empty()) {
            channels.retain(|(name, _)| glob_match(pattern, name));
        }
        channels.sort();
        channels
    }

    /// Adds a local subscriber to a validated channel.
    pub async fn subscribe(
        &self,
        channel: &ChannelName,
        subscriber: Arc<dyn Subscriber>,
    ) -> Result<SubscriberId, HeraldError> {
        let (id, wait) = self.inner.hub.subscribe(channel.as_arc(), subscriber);
        if let Some(wait) = wait
            && let Err(err) = crate::hub::interest_ready(wait).await
        {
            self.inner.hub.unsubscribe(channel.as_str(), id);
            self.inner.stats.errors.fetch_add(1, Ordering::Relaxed);
            return Err(err.into());
        }
        Ok(id)
    }

    /// Adds a subscriber of every channel it matches (MQTT wildcard filters; admitted with
    /// [`crate::admission::Admission::subscribe_pattern`]). It gets what reaches this node:
    /// in a cluster, hold a [`Node::want_prefix`] for every prefix it needs.
    pub fn subscribe_pattern(
        &self,
        subscriber: Arc<dyn crate::hub::PatternSubscriber>,
    ) -> SubscriberId {
        self.inner.hub.subscribe_pattern(subscriber)
    }

    /// Makes every channel whose name starts with `prefix` reach this node, from every node,
    /// for as long as the hold lives (a pattern subscription's channels; see
    /// [`Hub::want_prefix`]). Returns once they do: what is published after that reaches the
    /// node's pattern subscribers.
    pub async fn want_prefix(&self, prefix: &str) -> Result<crate::hub::PrefixHold, HeraldError> {
        let (hold, wait) = self.inner.hub.want_prefix(prefix);
        if let Some(wait) = wait
            && let Err(err) = crate::hub::interest_ready(wait).await
        {
            self.inner.stats.errors.fetch_add(1, Ordering::Relaxed);
            return Err(err.into());
        }
        Ok(hold)
    }

    pub fn unsubscribe_pattern(&self, id: SubscriberId) {
        self.inner.hub.unsubscribe_pattern(id);
    }

    /// The users with a live subscription to `channel` on any node, from presence (tracked
    /// where [`NamespaceOptions::tracks_presence`]).
    pub async fn live_users(&self, channel: &str) -> Result<Vec<String>, HeraldError> {
        let present = self
            .inner
            .backends
            .presence
            .get(channel)
            .await
            .map_err(|e| HeraldError::unavailable(e.to_string()))?;
        let mut users: Vec<String> = present.into_values().map(|info| info.user).collect();
        users.sort();
        users.dedup();
        Ok(users)
    }

    /// Adds an observer of publications (push, webhooks, bridges out); observers see each
    /// publication in the order they were added.
    pub fn observe_publications(&self, observer: Arc<dyn PublishObserver>) {
        let mut observers = self.inner.observers.write();
        let mut list: Vec<_> = observers.iter().cloned().collect();
        list.push(observer);
        *observers = Arc::from(list);
    }

    /// Adds an observer of client lifecycle events (webhooks).
    pub fn observe_client_events(&self, observer: Arc<dyn ClientEventObserver>) {
        let mut observers = self.inner.event_observers.write();
        let mut list: Vec<_> = observers.iter().cloned().collect();
        list.push(observer);
        *observers = Arc::from(list);
    }

    /// Whether any observer wants `kind` events on some channel (or connection events).
    pub fn wants_client_events(&self, kind: ClientEventKind) -> bool {
        let observers = self.inner.event_observers.read();
        observers.iter().any(|o| o.wants(kind, None))
    }

    /// Tells every observer that wants it of a `kind` event on `channel`, about `info`'s
    /// client. Costs one read lock and nothing else when nobody listens.
    pub fn client_event(
        &self,
        kind: ClientEventKind,
        channel: Option<&Arc<str>>,
        info: &ClientInfo,
        transport: &'static str,
    ) {
        let observers = self.inner.event_observers.read().clone();
        let mut event: Option<ClientEvent> = None;
        for observer in observers.iter() {
            if !observer.wants(kind, channel.map(|c| &**c)) {
                continue;
            }
            let event = event.get_or_insert_with(|| ClientEvent {
                kind,
                client: info.client.clone(),
                user: info.user.clone(),
                channel: channel.cloned(),
                transport,
                time_ms: now_ms(),
            });
            observer.observe(event.clone());
        }
    }

    /// A client joined `channel`: recorded in presence and announced to subscribers, as the
    /// namespace asks.
    pub async fn join(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        info: Arc<ClientInfo>,
    ) {
        if options.tracks_presence() {
            self.client_event(
                ClientEventKind::PresenceJoin,
                Some(channel.as_arc()),
                &info,
                "",
            );
            if let Some(own) = &self.inner.own_presence {
                own.lock().insert(
                    (channel.as_arc().clone(), info.client.clone()),
                    info.clone(),
                );
            }
            if let Err(err) = self
                .inner
                .backends
                .presence
                .add(channel.as_str(), (*info).clone())
                .await
            {
                tracing::warn!(channel = channel.as_str(), error = %err, "presence add failed");
            }
        }
        if options.join_leave {
            self.announce(ChannelEvent::Join {
                channel: channel.as_arc().clone(),
                info,
            })
            .await;
        }
    }

    /// A client left `channel` (the counterpart of [`Node::join`]).
    pub async fn leave(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        info: Arc<ClientInfo>,
    ) {
        if options.tracks_presence() {
            self.client_event(
                ClientEventKind::PresenceLeave,
                Some(channel.as_arc()),
                &info,
                "",
            );
            if let Some(own) = &self.inner.own_presence {
                own.lock()
                    .remove(&(channel.as_arc().clone(), info.client.clone()));
            }
            if let Err(err) = self
                .inner
                .backends
                .presence
                .remove(channel.as_str(), &info.client)
                .await
            {
                tracing::warn!(channel = channel.as_str(), error = %err, "presence remove failed");
            }
        }
        if options.join_leave {
            self.announce(ChannelEvent::Leave {
                channel: channel.as_arc().clone(),
                info,
            })
            .await;
        }
    }

    /// Join and leave are best effort: a failure is logged, the subscription stands.
    async fn announce(&self, event: ChannelEvent) {
        if let Err(err) = self.inner.backends.engine.announce(event).await {
            self.inner.stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %err, "join/leave announcement failed");
        }
    }

    /// Removes a local subscriber (the engine hears when it was the channel's last).
    pub async fn unsubscribe(&self, channel: &str, id: SubscriberId) {
        self.inner.hub.unsubscribe(channel, id);
    }

    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            uid: self.inner.uid.clone(),
            name: self.inner.config.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            num_channels: self.inner.hub.num_channels() as u64,
            num_subscriptions: self.inner.hub.num_subscriptions() as u64,
            uptime: self.inner.started.elapsed(),
        }
    }

    /// Flushes the engine, then waits until every delivered event has been handed to the
    /// hub (so subscribers still connected get it), then stops the node's tasks.
    pub async fn shutdown(&self) -> Result<(), HeraldError> {
        self.inner.backends.engine.flush().await?;
        self.inner.feed.drained().await;
        let task = self.inner.fanout_task.lock().take();
        if let Some(task) = task {
            task.abort();
        }
        let task = self.inner.presence_task.lock().take();
        if let Some(task) = task {
            task.abort();
        }
        Ok(())
    }
}

/// Re-adds this node's presence entries every `every`, so they outlive their expiry while
/// the node lives and disappear within it once the node is gone.
async fn refresh_presence(
    presence: Arc<dyn PresenceStore>,
    own: Arc<OwnPresence>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let entries: Vec<(Arc<str>, Arc<ClientInfo>)> = own
            .lock()
            .iter()
            .map(|((channel, _), info)| (channel.clone(), info.clone()))
            .collect();
        if let Err(err) = presence.refresh(&entries).await {
            tracing::warn!(error = %err, entries = entries.len(), "presence refresh failed");
        }
    }
}

/// Hands the events the engine delivers to the hub in queue order. What is queued is taken in
/// batches (up to 256), and each run of consecutive events of one channel goes to the hub at
/// once, so a subscriber of a busy channel is locked and woken once per run rather than once
/// per event. Events are never reordered, not even across channels.
async fn run_fanout(mut queue: FanoutQueue, hub: Arc<Hub>, stats: Arc<NodeStats>) {
    let mut batch = Vec::with_capacity(256);
    let mut run: Vec<ChannelEvent> = Vec::new();
    while queue.rx.recv_many(&mut batch, 256).await > 0 {
        for queued in batch.drain(..) {
            match queued {
                Queued::Event(event) => {
                    if run
                        .first()
                        .is_some_and(|first| first.channel() != event.channel())
                    {
                        publish_run(&hub, &stats, &mut run);
                    }
                    run.push(event);
                }
                Queued::Drained(done) => {
                    publish_run(&hub, &stats, &mut run);
                    let _ = done.send(());
                }
            }
        }
        publish_run(&hub, &stats, &mut run);
    }
}

/// Hands `run` (events of one channel) to the hub and empties it, keeping its capacity: no
/// allocation per run.
fn publish_run(hub: &Hub, stats: &NodeStats, run: &mut Vec<ChannelEvent>) {
    if run.is_empty() {
        return;
    }
    let outcome = hub.broadcast(run);
    run.clear();
    stats
        .deliveries
        .fetch_add(outcome.queued as u64, Ordering::Relaxed);
    stats
        .dropped_deliveries
        .fetch_add(outcome.dropped as u64, Ordering::Relaxed);
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Delivery;
    use crate::namespace::NamedNamespace;
    use bytes::Bytes;
    use tokio::sync::mpsc;

    struct Forward(mpsc::UnboundedSender<u64>);
    impl Subscriber for Forward {
        fn deliver(&self, event: &ChannelEvent) -> Delivery {
            if let ChannelEvent::Publication(p) = event {
                let _ = self.0.send(p.publication.offset);
            }
            Delivery::Queued
        }
    }

    /// Subscribes a [`Forward`] to `channel`: the offsets it is delivered.
    async fn forwarded(node: &Node, channel: &str) -> mpsc::UnboundedReceiver<u64> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (channel, _) = node.resolve(channel).expect("valid");
        node.subscribe(&channel, Arc::new(Forward(tx)))
            .await
            .expect("subscribe");
        rx
    }

    fn node() -> Node {
        let no_history = NamespaceOptions {
            history_size: 0,
            ..NamespaceOptions::default()
        };
        let presence = NamespaceOptions {
            presence: true,
            ..NamespaceOptions::default()
        };
        let namespaces = Namespaces::new(
            NamespaceOptions::default(),
            vec![
                NamedNamespace {
                    name: "live".into(),
                    options: no_history,
                },
                NamedNamespace {
                    name: "room".into(),
                    options: presence,
                },
            ],
        )
        .expect("namespaces");
        Node::in_memory(NodeConfig {
            namespaces,
            max_publication_size: 16,
            ..NodeConfig::default()
        })
    }

    fn json(text: &'static str) -> Payload {
        Payload::Json(Bytes::from_static(text.as_bytes()))
    }

    #[tokio::test]
    async fn queued_runs_of_several_channels_keep_each_channels_order() {
        let node = node();
        let mut rx_a = forwarded(&node, "a").await;
        let mut rx_b = forwarded(&node, "b").await;
        // Published together, so the fan-out task finds runs of `a` broken up by `b`.
        let channels = ["a", "a", "a", "b", "a", "b", "b", "a"].repeat(20);
        let publishes: Vec<_> = channels
            .iter()
            .map(|channel| {
                let node = node.clone();
                let request = PublishRequest::new(*channel, json("{}"));
                tokio::spawn(async move { node.publish(request).await })
            })
            .collect();
        for publish in publishes {
            publish.await.expect("task").expect("publish");
        }
        node.shutdown().await.expect("drained");
        let count = |name: &str| channels.iter().filter(|c| **c == name).count() as u64;
        for expected in 1..=count("a") {
            assert_eq!(rx_a.recv().await, Some(expected));
        }
        for expected in 1..=count("b") {
            assert_eq!(rx_b.recv().await, Some(expected));
        }
        assert!(
            rx_a.try_recv().is_err() && rx_b.try_recv().is_err(),
            "no repeats"
        );
        assert_eq!(
            node.stats().deliveries.load(Ordering::Relaxed),
            channels.len() as u64
        );
    }

    #[tokio::test]
    async fn publishes_in_order_to_subscribers_after_history() {
        let node = node();
        let mut rx = forwarded(&node, "news").await;
        for expected in 1..=50 {
            let result = node
                .publish(PublishRequest::new("news", json("{}")))
                .await
                .expect("publish");
            assert_eq!(result.position.map(|p| p.offset), Some(expected));
        }
        for expected in 1..=50 {
            assert_eq!(rx.recv().await, Some(expected));
        }
        let page = node
            .history("news", HistoryQuery::default())
            .await
            .expect("history");
        assert_eq!(page.publications.len(), 50);
        assert_eq!(node.stats().deliveries.load(Ordering::Relaxed), 50);
    }

    #[tokio::test]
    async fn rejects_oversized_unknown_and_disabled() {
        let node = node();
        let big = node
            .publish(PublishRequest::new(
                "news",
                json("\"01234567890123456789\""),
            ))
            .await;
        assert_eq!(big.expect_err("too big").code, ErrorCode::LimitExceeded);
        let unknown = node.publish(PublishRequest::new("nope:x", json("1"))).await;
        assert_eq!(
            unknown.expect_err("unknown").code,
            ErrorCode::UnknownChannel
        );
        let history = node.history("live:x", HistoryQuery::default()).await;
        assert_eq!(history.expect_err("disabled").code, ErrorCode::NotAvailable);
        let presence = node.presence("news").await;
        assert_eq!(
            presence.expect_err("disabled").code,
            ErrorCode::NotAvailable
        );
        assert!(node.presence("room:1").await.expect("enabled").is_empty());
        let reverse = HistoryQuery {
            since: Some(StreamPosition::new(0, "")),
            reverse: true,
            ..Default::default()
        };
        assert_eq!(
            node.history("news", reverse).await.expect_err("bad").code,
            ErrorCode::BadRequest
        );
    }

    #[tokio::test]
    async fn idempotency_without_history_publishes_once() {
        let node = node();
        let mut rx = forwarded(&node, "live:x").await;
        let mut request = PublishRequest::new("live:x", json("1"));
        request.idempotency_key = Some("k".into());
        assert!(
            !node
                .publish(request.clone())
                .await
                .expect("first")
                .duplicate
        );
        assert!(node.publish(request).await.expect("second").duplicate);
        assert_eq!(rx.recv().await, Some(0));
        // Everything queued for fan-out so far has been delivered: a duplicate would be here.
        node.inner.feed.drained().await;
        assert!(rx.try_recv().is_err(), "duplicate must not be delivered");
    }

    /// Shutdown hands every committed publication to the subscribers still connected before
    /// it stops the fan-out task (it used to abort it, losing what was still queued).
    #[tokio::test]
    async fn shutdown_delivers_everything_committed() {
        let node = node();
        let mut rx = forwarded(&node, "news").await;
        let count = 2_000;
        for n in 0..count {
            node.publish(PublishRequest::new(
                "news",
                Payload::Json(n.to_string().into()),
            ))
            .await
            .expect("publish");
        }
        node.shutdown().await.expect("shutdown");
        let mut offsets = Vec::new();
        while let Ok(offset) = rx.try_recv() {
            offsets.push(offset);
        }
        assert_eq!(offsets, (1..=count).collect::<Vec<u64>>());
    }

    #[tokio::test]
    async fn recover_is_exact_or_says_not_recovered() {
        let small = NamespaceOptions {
            history_size: 5,
            ..NamespaceOptions::default()
        };
        let namespaces = Namespaces::new(
            NamespaceOptions::default(),
            vec![NamedNamespace {
                name: "small".into(),
                options: small,
            }],
        )
        .expect("namespaces");
        let node = Node::in_memory(NodeConfig {
            namespaces,
            ..NodeConfig::default()
        });
        for _ in 0..10 {
            node.publish(PublishRequest::new("a", json("1")))
                .await
                .expect("publish");
            node.publish(PublishRequest::new("small:a", json("1")))
                .await
                .expect("publish");
        }
        let top = node
            .history(
                "a",
                HistoryQuery {
                    limit: Some(0),
                    ..Default::default()
                },
            )
            .await
            .expect("top")
            .position;
        let at = |offset| StreamPosition::new(offset, top.epoch.clone());

        let exact = node.recover("a", &at(7), 100).await.expect("recover");
        assert!(exact.recovered);
        assert_eq!(
            exact
                .publications
                .iter()
                .map(|p| p.offset)
                .collect::<Vec<_>>(),
            vec![8, 9, 10]
        );
        let current = node.recover("a", &at(10), 100).await.expect("recover");
        assert!(current.recovered && current.publications.is_empty());

        let too_many = node.recover("a", &at(2), 3).await.expect("recover");
        assert!(!too_many.recovered && too_many.publications.is_empty());
        let stale = node
            .recover("a", &StreamPosition::new(7, "other"), 100)
            .await
            .expect("recover");
        assert!(!stale.recovered);
        let future = node.recover("a", &at(11), 100).await.expect("recover");
        assert!(!future.recovered);
        assert_eq!(future.position.offset, 10);
        let small_top = node
            .history(
                "small:a",
                HistoryQuery {
                    limit: Some(0),
                    ..Default::default()
                },
            )
            .await
            .expect("top");
        let pruned = node
            .recover(
                "small:a",
                &StreamPosition::new(2, small_top.position.epoch.clone()),
                100,
            )
            .await
            .expect("recover");
        assert!(
            !pruned.recovered,
            "publications 3..5 were pruned: a gap must not count as recovered"
        );
        let kept = node
            .recover(
                "small:a",
                &StreamPosition::new(6, small_top.position.epoch),
                100,
            )
            .await
            .expect("recover");
        assert!(kept.recovered);
        assert_eq!(kept.publications.len(), 4);
    }

    #[test]
    fn glob_patterns() {
        assert!(glob_match("chat:*", "chat:1"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("a*c*e", "abcde"));
        assert!(!glob_match("chat:*", "news"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
    }
}
