//! One shard's pub/sub connection: events of other nodes in, in order, with gaps healed.
//!
//! Owns: the task that holds the shard's pub/sub connection and the channels this node wants
//! (commands from the hub, applied in the order they were made), and what the node has
//! delivered of each channel ([`ChannelOrder`]). It:
//! - subscribes a channel, then reads the stream's top, so the node knows where the channel
//!   stands; publications up to it are the subscribers' to recover, later ones come from here;
//! - runs every stored publication through [`sequence::heal`]: a gap (a message pub/sub lost)
//!   is read back from the stream before anything newer is delivered;
//! - probes an idle connection with PING; a connection that fails or stops answering is
//!   replaced (through the sentinels, when configured), every channel subscribed again and
//!   caught up from the stream, so nothing published meanwhile is missed;
//! - says whether it is connected (`/ready`);
//! - receives, besides its channels, every channel whose name starts with a wanted *prefix*
//!   (PSUBSCRIBE, for pattern subscribers): each such channel gets its [`ChannelOrder`] at its
//!   first publication received and is healed from then on like the others. A channel that is
//!   both subscribed and under a prefix is taken from its own subscription only, a channel
//!   under several prefixes from the shortest one only, so each event is delivered once; its
//!   order moves between the two when it gains or loses its own subscription.
//!
//! May touch: the shard's Redis (pub/sub connection, and reads through [`ShardStore`]), the
//! node's [`FanoutFeed`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use herald_core::fanout::FanoutFeed;
use herald_core::hub::InterestReady;
use herald_core::publication::ChannelEvent;
use herald_core::sequence::{self, ChannelOrder};
use herald_core::store::{HistoryQuery, StoreError};
use redis::aio::PubSubSink;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::codec;
use super::engine::shard_index;
use super::history::ShardStore;

/// What the hub asks of a shard's subscriber, in the order it asked.
#[derive(Debug)]
pub(crate) enum Command {
    Gained(Arc<str>, InterestReady),
    Lost(Arc<str>),
    GainedPrefix(Arc<str>, InterestReady),
    LostPrefix(Arc<str>),
}

/// Counters of one shard's subscriber.
#[derive(Debug, Default)]
pub struct PubSubStats {
    pub reconnects: AtomicU64,
    pub healed: AtomicU64,
    pub unrecoverable: AtomicU64,
    pub undecodable: AtomicU64,
}

/// The handle of a shard's subscriber task.
#[derive(Debug)]
pub(crate) struct Subscriber {
    commands: mpsc::UnboundedSender<Command>,
    connected: Arc<AtomicBool>,
    pub(crate) stats: Arc<PubSubStats>,
    task: JoinHandle<()>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Subscriber {
    /// Starts the task; `connected` resolves once the first connection is up (or failed).
    pub(crate) fn spawn(
        store: Arc<ShardStore>,
        feed: FanoutFeed,
        control: Option<mpsc::UnboundedSender<Bytes>>,
        timing: Timing,
        shard: (usize, usize),
    ) -> (Self, oneshot::Receiver<Result<(), StoreError>>) {
        let (commands, receiver) = mpsc::unbounded_channel();
        let connected = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(PubSubStats::default());
        let (first_tx, first_rx) = oneshot::channel();
        let control = control.map(|sender| (store.keys.control(), sender));
        let task = Task {
            store,
            feed,
            control,
            commands: receiver,
            wanted: HashMap::new(),
            prefixes: BTreeMap::new(),
            seen: HashMap::new(),
            shard,
            connected: connected.clone(),
            timing,
            stats: stats.clone(),
        };
        let task = tokio::spawn(task.run(first_tx));
        (
            Self {
                commands,
                connected,
                stats,
                task,
            },
            first_rx,
        )
    }

    pub(crate) fn gained(&self, channel: &Arc<str>, ready: InterestReady) {
        if let Err(mpsc::error::SendError(Command::Gained(_, ready))) =
            self.commands.send(Command::Gained(channel.clone(), ready))
        {
            ready.resolve(Err(StoreError::Unavailable(
                "the redis engine stopped".into(),
            )));
        }
    }

    pub(crate) fn lost(&self, channel: &Arc<str>) {
        let _ = self.commands.send(Command::Lost(channel.clone()));
    }

    pub(crate) fn gained_prefix(&self, prefix: &Arc<str>, ready: InterestReady) {
        if let Err(mpsc::error::SendError(Command::GainedPrefix(_, ready))) = self
            .commands
            .send(Command::GainedPrefix(prefix.clone(), ready))
        {
            ready.resolve(Err(StoreError::Unavailable(
                "the redis engine stopped".into(),
            )));
        }
    }

    pub(crate) fn lost_prefix(&self, prefix: &Arc<str>) {
        let _ = self.commands.send(Command::LostPrefix(prefix.clone()));
    }

    pub(crate) fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

struct Task {
    store: Arc<ShardStore>,
    feed: FanoutFeed,
    /// The cluster's control channel and where its messages go (on the first shard only).
    control: Option<(String, mpsc::UnboundedSender<Bytes>)>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Channels this node wants, with what it delivered of each (`None` until the top was
    /// read after subscribing).
    wanted: HashMap<Arc<str>, Option<ChannelOrder>>,
    /// Channel-name prefixes this node wants, with their pub/sub patterns.
    prefixes: BTreeMap<Arc<str>, String>,
    /// Channels received through a prefix (not in `wanted`), with what was delivered of each.
    seen: HashMap<Arc<str>, ChannelOrder>,
    /// This shard's index and the number of shards: a pattern may match channels of other
    /// shards when shards share a server's pub/sub (databases of one Redis); those are theirs.
    shard: (usize, usize),
    connected: Arc<AtomicBool>,
    timing: Timing,
    stats: Arc<PubSubStats>,
}

/// The subscriber's clocks.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timing {
    /// How often an idle connection is probed.
    pub ping_interval: Duration,
    /// Longest wait for a subscribe, a probe or a read.
    pub command_timeout: Duration,
    /// How long local subscribers are kept through an outage before they are told to go.
    pub outage_disconnect: Duration,
}

/// Why a session ended.
type Lost = StoreError;

impl Task {
    async fn run(mut self, first: oneshot::Sender<Result<(), StoreError>>) {
        let mut first = Some(first);
        let mut backoff = Duration::from_millis(50);
        // When the current outage began, and whether local subscribers were told to go.
        let mut outage: Option<(Instant, bool)> = None;
        loop {
            let error = self.session(&mut first).await;
            let was_connected = self.connected.swap(false, Ordering::Relaxed);
            self.store.link.reset().await;
            if was_connected {
                outage = Some((Instant::now(), false));
            }
            if let Some((since, told)) = &mut outage
                && !*told
                && since.elapsed() >= self.timing.outage_disconnect
            {
                // This node cannot vouch for these channels any more: their subscribers
                // reconnect (to a node that reaches Redis, if the load balancer routes on
                // /ready) and recover from their own positions.
                *told = true;
                tracing::warn!(
                    shard = self.store.link.name(),
                    channels = self.wanted.len(),
                    "redis unreachable for longer than redis.outage_disconnect: closing subscribers (3010) so they recover elsewhere"
                );
                for channel in self.wanted.keys() {
                    self.feed.push(ChannelEvent::Unrecoverable {
                        channel: channel.clone(),
                    });
                }
            }
            if let Some(first) = first.take() {
                let _ = first.send(Err(error));
                // Start-up fails loudly: the engine is dropped, and this task with it.
                return;
            }
            if was_connected {
                self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(shard = self.store.link.name(), error = %error, "redis pub/sub connection lost; reconnecting");
                backoff = Duration::from_millis(50);
            }
            // Subscribes asked for while there is no connection fail at once (the client
            // gets a temporary error and retries) rather than hang.
            let deadline = tokio::time::sleep(backoff);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    () = &mut deadline => break,
                    command = self.commands.recv() => match command {
                        None => return,
                        Some(command) => self.refuse(command),
                    },
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    fn refuse(&mut self, command: Command) {
        match command {
            Command::Gained(channel, ack) => {
                self.wanted.entry(channel).or_insert(None);
                ack.resolve(Err(self.store.link.unavailable("no pub/sub connection")));
            }
            Command::Lost(channel) => self.lose(&channel),
            Command::GainedPrefix(prefix, ack) => {
                let pattern = self.store.keys.pubsub_pattern(&prefix);
                self.prefixes.insert(prefix, pattern);
                ack.resolve(Err(self.store.link.unavailable("no pub/sub connection")));
            }
            Command::LostPrefix(prefix) => {
                self.prefixes.remove(&prefix);
                self.forget_unwanted();
            }
        }
    }

    /// Forgets a channel's own subscription; when a prefix still covers it, its order goes
    /// on from where it is.
    fn lose(&mut self, channel: &Arc<str>) {
        if let Some(Some(order)) = self.wanted.remove(channel)
            && self.under_prefix(channel)
        {
            self.seen.insert(channel.clone(), order);
        }
    }

    /// Whether a wanted prefix covers `channel`.
    fn under_prefix(&self, channel: &str) -> bool {
        self.prefixes.keys().any(|p| channel.starts_with(&**p))
    }

    /// The pattern a channel's events are taken from when they come through prefixes: the
    /// shortest wanted prefix's.
    fn pattern_of(&self, channel: &str) -> Option<&str> {
        self.prefixes
            .iter()
            .filter(|(prefix, _)| channel.starts_with(&***prefix))
            .min_by_key(|(prefix, _)| prefix.len())
            .map(|(_, pattern)| pattern.as_str())
    }

    /// Drops the orders of channels no wanted prefix covers any more.
    fn forget_unwanted(&mut self) {
        let prefixes = &self.prefixes;
        self.seen
            .retain(|channel, _| prefixes.keys().any(|p| channel.starts_with(&**p)));
    }

    async fn timed<T>(
        &self,
        what: &str,
        future: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Lost> {
        match tokio::time::timeout(self.timing.command_timeout, future).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(StoreError::Unavailable(format!("{what}: {error}"))),
            Err(_) => Err(StoreError::Unavailable(format!("{what} timed out"))),
        }
    }

    /// One connection's life; returns why it ended.
    async fn session(
        &mut self,
        first: &mut Option<oneshot::Sender<Result<(), StoreError>>>,
    ) -> Lost {
        let pubsub = match self.store.link.pubsub().await {
            Ok(pubsub) => pubsub,
            Err(error) => return error,
        };
        let (mut sink, mut stream) = pubsub.split();
        let mut channels: Vec<Arc<str>> = self.wanted.keys().cloned().collect();
        if let Err(error) = self.subscribe(&mut sink, &channels).await {
            return error;
        }
        let patterns: Vec<String> = self.prefixes.values().cloned().collect();
        if !patterns.is_empty()
            && let Err(error) = self.timed("psubscribe", sink.psubscribe(patterns)).await
        {
            return error;
        }
        // Channels received through prefixes before are caught up like the others.
        channels.extend(self.seen.keys().cloned());
        if let Some((control, _)) = &self.control
            && let Err(error) = self.timed("subscribe", sink.subscribe(control)).await
        {
            return error;
        }
        if let Err(error) = self.catch_up(&channels).await {
            return error;
        }
        self.connected.store(true, Ordering::Relaxed);
        self.store.link.reachable();
        if let Some(first) = first.take() {
            let _ = first.send(Ok(()));
        }
        if !channels.is_empty() {
            tracing::info!(
                shard = self.store.link.name(),
                channels = channels.len(),
                "redis pub/sub resubscribed"
            );
        }
        let mut last_heard = Instant::now();
        let mut probe = tokio::time::interval(self.timing.ping_interval);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = self.commands.recv() => {
                    let Some(command) = command else {
                        return StoreError::Unavailable("the engine stopped".into());
                    };
                    let mut batch = vec![command];
                    while let Ok(command) = self.commands.try_recv() {
                        batch.push(command);
                    }
                    if let Err(error) = self.apply(&mut sink, batch).await {
                        return error;
                    }
                }
                message = stream.next() => {
                    let Some(message) = message else {
                        return StoreError::Unavailable("pub/sub connection closed".into());
                    };
                    last_heard = Instant::now();
                    let payload = Bytes::copy_from_slice(message.get_payload_bytes());
                    let pattern = message.from_pattern().then(|| message.get_pattern::<String>().ok()).flatten();
                    self.on_message(message.get_channel_name(), pattern.as_deref(), payload).await;
                }
                _ = probe.tick() => {
                    if last_heard.elapsed() >= self.timing.ping_interval {
                        if let Err(error) = self.timed("pub/sub ping", sink.ping::<redis::Value>()).await {
                            return error;
                        }
                        self.store.link.reachable();
                        last_heard = Instant::now();
                    }
                }
            }
        }
    }

    async fn subscribe(&self, sink: &mut PubSubSink, channels: &[Arc<str>]) -> Result<(), Lost> {
        for chunk in channels.chunks(1000) {
            let names: Vec<String> = chunk.iter().map(|c| self.store.keys.pubsub(c)).collect();
            self.timed("subscribe", sink.subscribe(names)).await?;
        }
        Ok(())
    }

    /// Reads each channel's top; brings channels the node knew up to it from the stream.
    async fn catch_up(&mut self, channels: &[Arc<str>]) -> Result<(), Lost> {
        for chunk in channels.chunks(200) {
            let tops = futures::future::join_all(chunk.iter().map(|channel| {
                let query = HistoryQuery {
                    limit: Some(0),
                    ..HistoryQuery::default()
                };
                self.store.read_page(channel, query)
            }))
            .await;
            for (channel, top) in chunk.iter().zip(tops) {
                let top = top?.position;
                let order = match (self.wanted.get_mut(channel), self.seen.get_mut(channel)) {
                    (Some(slot), _) => match slot {
                        None => {
                            *slot = Some(ChannelOrder::at(&top));
                            continue;
                        }
                        Some(order) => order,
                    },
                    (None, Some(order)) => order,
                    (None, None) => continue,
                };
                let events = sequence::catch_up(&*self.store, channel, order, &top).await;
                self.count(&events, 0);
                for event in events {
                    self.feed.push(event);
                }
            }
        }
        Ok(())
    }

    /// Applies a batch of hub commands: each channel ends as its last command left it.
    async fn apply(&mut self, sink: &mut PubSubSink, batch: Vec<Command>) -> Result<(), Lost> {
        let mut want: HashMap<Arc<str>, bool> = HashMap::new();
        let mut want_prefixes: BTreeMap<Arc<str>, bool> = BTreeMap::new();
        let mut acks = Vec::new();
        for command in batch {
            match command {
                Command::Gained(channel, ack) => {
                    want.insert(channel, true);
                    acks.push(ack);
                }
                Command::Lost(channel) => {
                    want.insert(channel, false);
                }
                Command::GainedPrefix(prefix, ack) => {
                    want_prefixes.insert(prefix, true);
                    acks.push(ack);
                }
                Command::LostPrefix(prefix) => {
                    want_prefixes.insert(prefix, false);
                }
            }
        }
        let mut gained_patterns = Vec::new();
        let mut lost_patterns = Vec::new();
        for (prefix, wanted) in want_prefixes {
            match (wanted, self.prefixes.contains_key(&prefix)) {
                (true, false) => {
                    let pattern = self.store.keys.pubsub_pattern(&prefix);
                    gained_patterns.push(pattern.clone());
                    self.prefixes.insert(prefix, pattern);
                }
                (false, true) => {
                    if let Some(pattern) = self.prefixes.remove(&prefix) {
                        lost_patterns.push(pattern);
                    }
                }
                _ => {}
            }
        }
        if !lost_patterns.is_empty() {
            self.forget_unwanted();
        }
        let mut gained = Vec::new();
        let mut lost = Vec::new();
        for (channel, wanted) in want {
            match (wanted, self.wanted.contains_key(&channel)) {
                (true, false) => gained.push(channel),
                (false, true) => lost.push(channel),
                _ => {}
            }
        }
        let result = async {
            if !lost_patterns.is_empty() {
                self.timed("punsubscribe", sink.punsubscribe(lost_patterns))
                    .await?;
            }
            if !gained_patterns.is_empty() {
                // Confirmed before the acks resolve: what is published from now on comes.
                self.timed("psubscribe", sink.psubscribe(gained_patterns))
                    .await?;
            }
            if !lost.is_empty() {
                for channel in &lost {
                    self.lose(channel);
                }
                let names: Vec<String> = lost.iter().map(|c| self.store.keys.pubsub(c)).collect();
                self.timed("unsubscribe", sink.unsubscribe(names)).await?;
            }
            if !gained.is_empty() {
                for channel in &gained {
                    // Received through a prefix until now: caught up from where it was.
                    let order = self.seen.remove(channel);
                    self.wanted.insert(channel.clone(), order);
                }
                self.subscribe(sink, &gained).await?;
                self.catch_up(&gained).await?;
            }
            Ok(())
        }
        .await;
        for ack in acks {
            ack.resolve(result.clone());
        }
        result
    }

    /// A message of `pubsub_channel`, received through `pattern` when it is a pmessage.
    async fn on_message(&mut self, pubsub_channel: &str, pattern: Option<&str>, payload: Bytes) {
        if pattern.is_none()
            && let Some((control, sender)) = &self.control
            && pubsub_channel == control
        {
            let _ = sender.send(payload);
            return;
        }
        let Some(name) = self.store.keys.channel_of(pubsub_channel) else {
            return;
        };
        let channel = match pattern {
            None => match self.wanted.get_key_value(name) {
                Some((key, _)) => key.clone(),
                None => return,
            },
            // Once per event: the channel's own subscription takes it, or the shortest prefix.
            Some(pattern) => {
                if self.wanted.contains_key(name)
                    || self.pattern_of(name) != Some(pattern)
                    || shard_index(name, self.shard.1) != self.shard.0
                {
                    return;
                }
                match self.seen.get_key_value(name) {
                    Some((key, _)) => key.clone(),
                    None => Arc::from(name),
                }
            }
        };
        let event = match codec::decode_message(&channel, payload) {
            Ok(event) => event,
            Err(error) => {
                self.stats.undecodable.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(channel = &*channel, %error, "undecodable pub/sub message dropped");
                return;
            }
        };
        let ChannelEvent::Publication(publication) = &event else {
            self.feed.push(event);
            return;
        };
        if publication.publication.offset == 0 {
            self.feed.push(event);
            return;
        }
        let publication = publication.clone();
        let order = if pattern.is_some() {
            // The first publication received of the channel starts its order.
            self.seen
                .entry(channel.clone())
                .or_insert_with(|| ChannelOrder {
                    epoch: publication.epoch.clone(),
                    last: publication.publication.offset - 1,
                })
        } else {
            let Some(Some(order)) = self.wanted.get_mut(&channel) else {
                // Not possible: the top is read before a channel's messages are looked at.
                return;
            };
            order
        };
        let events = sequence::heal(&*self.store, order, publication).await;
        self.count(&events, 1);
        for event in events {
            self.feed.push(event);
        }
    }

    /// Counts what healing produced; `received` of `events` came from pub/sub itself.
    fn count(&self, events: &[ChannelEvent], received: usize) {
        let unrecoverable = events
            .iter()
            .filter(|e| matches!(e, ChannelEvent::Unrecoverable { .. }))
            .count();
        self.stats
            .unrecoverable
            .fetch_add(unrecoverable as u64, Ordering::Relaxed);
        let healed = events.len().saturating_sub(received + unrecoverable);
        self.stats
            .healed
            .fetch_add(healed as u64, Ordering::Relaxed);
    }
}
