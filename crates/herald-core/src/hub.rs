//! The hub: in-process fan-out from channels to local subscribers.
//!
//! The registry is sharded by channel so that subscribes and broadcasts on different
//! channels do not contend. Delivery is a non-blocking call into each subscriber (which
//! queues the event for its connection); a subscriber that reports itself closed is removed.
//! The channel's first subscriber and its last one leaving (however it left: unsubscribed or
//! found closed) are told to the [`ChannelInterest`] under the channel's lock, so those calls
//! reach the engine in the order they happened.
//!
//! Besides subscribers of one channel, the hub holds *pattern* subscribers
//! ([`PatternSubscriber`]): each says which channels it wants (MQTT's wildcard filters) and
//! gets every run of events of a matching channel, after the channel's own subscribers. They
//! see only what reaches this node's hub: every channel with a single-node engine; with a
//! [`ChannelInterest`] (a cluster) the channels this node has subscribers of, and those
//! whose names start with a *prefix* the node wants ([`Hub::want_prefix`], counted like a
//! channel's subscribers: the engine hears the first want of a prefix and the last release).
//! A pattern subscriber holds a [`PrefixHold`] for every prefix it needs before it counts on
//! other nodes' channels.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;
use tokio::sync::watch;

use crate::publication::ChannelEvent;
use crate::store::StoreError;

/// What a subscriber waits for before it may count on the channel's events from other
/// nodes: `Some(Ok)` once they reach this node, `Some(Err)` if they cannot.
pub type InterestWait = watch::Receiver<Option<Result<(), StoreError>>>;

/// The engine's side of an [`InterestWait`]: resolved once, when the channel's events reach
/// this node (or cannot). Dropped unresolved, the wait fails.
#[derive(Debug)]
pub struct InterestReady(watch::Sender<Option<Result<(), StoreError>>>);

impl InterestReady {
    pub fn resolve(self, result: Result<(), StoreError>) {
        self.0.send_replace(Some(result));
    }
}

/// A connected ready/wait pair.
pub fn interest_wait() -> (InterestReady, InterestWait) {
    let (tx, rx) = watch::channel(None);
    (InterestReady(tx), rx)
}

/// Waits for `wait` to resolve.
pub async fn interest_ready(mut wait: InterestWait) -> Result<(), StoreError> {
    match wait.wait_for(Option::is_some).await {
        Ok(result) => result
            .clone()
            .unwrap_or_else(|| Err(StoreError::Unavailable("engine stopped".into()))),
        Err(_) => Err(StoreError::Unavailable(
            "the engine stopped before the channel was subscribed".into(),
        )),
    }
}

/// Told which channels this node has local subscribers of (the engine, in a cluster).
/// Both calls are made under the hub's lock of the channel: they must not block, only queue.
pub trait ChannelInterest: Send + Sync + 'static {
    /// `channel` gained its first local subscriber: resolve `ready` once the node receives
    /// the channel's events from other nodes. Every subscriber that arrives meanwhile waits
    /// on it too.
    fn gained(&self, channel: &Arc<str>, ready: InterestReady);
    /// `channel` lost its last local subscriber.
    fn lost(&self, channel: &Arc<str>);
    /// This node wants every channel whose name starts with `prefix` (a pattern subscriber
    /// needs them): resolve `ready` once those channels' events reach the node.
    fn gained_prefix(&self, prefix: &Arc<str>, ready: InterestReady);
    /// Nothing on this node wants the channels of `prefix` any more.
    fn lost_prefix(&self, prefix: &Arc<str>);
}

pub type SubscriberId = u64;

/// What happened to one delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for the subscriber.
    Queued,
    /// Not queued (e.g. the subscriber is over its budget and will be disconnected).
    Dropped,
    /// The subscriber is gone; the hub removes it.
    Closed,
}

/// Something that receives channel events without blocking.
pub trait Subscriber: Send + Sync + 'static {
    fn deliver(&self, event: &ChannelEvent) -> Delivery;

    /// Delivers `events`, all of one channel and in its order, adding what happened to each
    /// to `outcome`; false if the subscriber is gone (the hub removes it). Subscribers that
    /// can take a run of events at once (one lock, one wake-up) override this.
    fn deliver_many(&self, events: &[ChannelEvent], outcome: &mut BroadcastOutcome) -> bool {
        for event in events {
            match self.deliver(event) {
                Delivery::Queued => outcome.queued += 1,
                Delivery::Dropped => outcome.dropped += 1,
                Delivery::Closed => return false,
            }
        }
        true
    }
}

/// A subscriber of every channel it matches (an MQTT connection's wildcard filters).
pub trait PatternSubscriber: Subscriber {
    /// Whether the subscriber wants the events of `channel`. Called for every broadcast
    /// run while the subscriber is registered: keep it cheap and non-blocking.
    fn matches(&self, channel: &str) -> bool;
}

/// One channel's local subscribers, and (with a [`ChannelInterest`]) what each of them waits
/// for before counting on events from other nodes.
#[derive(Default)]
struct Channel {
    subs: Vec<(SubscriberId, Arc<dyn Subscriber>)>,
    ready: Option<InterestWait>,
}

type Shard = RwLock<HashMap<Arc<str>, Channel>>;

const SHARDS: usize = 64;

/// Local subscriptions by channel.
pub struct Hub {
    shards: Box<[Shard]>,
    hasher: RandomState,
    next_id: AtomicU64,
    interest: Option<Arc<dyn ChannelInterest>>,
    /// Pattern subscribers; `pattern_count` lets a broadcast skip the lock when there are
    /// none (the common case).
    patterns: RwLock<Vec<(SubscriberId, Arc<dyn PatternSubscriber>)>>,
    pattern_count: std::sync::atomic::AtomicUsize,
    /// Channel-name prefixes wanted by pattern subscribers (with a [`ChannelInterest`] only):
    /// how many holds each has, and what they wait for.
    prefixes: parking_lot::Mutex<HashMap<Arc<str>, (usize, InterestWait)>>,
}

/// A want of a channel-name prefix ([`Hub::want_prefix`]); released when dropped.
pub struct PrefixHold {
    hub: Option<Arc<Hub>>,
    prefix: Arc<str>,
}

impl std::fmt::Debug for PrefixHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PrefixHold").field(&self.prefix).finish()
    }
}

impl PrefixHold {
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl Drop for PrefixHold {
    fn drop(&mut self) {
        if let Some(hub) = &self.hub {
            hub.release_prefix(&self.prefix);
        }
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("channels", &self.num_channels())
            .finish()
    }
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

/// Counts from one broadcast.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BroadcastOutcome {
    pub queued: usize,
    pub dropped: usize,
}

impl Hub {
    pub fn new() -> Self {
        Self::with_interest(None)
    }

    /// A hub that tells `interest` about each channel's first and last local subscriber.
    pub fn with_interest(interest: Option<Arc<dyn ChannelInterest>>) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            next_id: AtomicU64::new(1),
            interest,
            patterns: RwLock::new(Vec::new()),
            pattern_count: std::sync::atomic::AtomicUsize::new(0),
            prefixes: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    fn shard(&self, channel: &str) -> &Shard {
        let index = (self.hasher.hash_one(channel) as usize) % SHARDS;
        &self.shards[index]
    }

    /// Adds a subscriber; returns its id and, when it is the channel's first local one and
    /// the hub has a [`ChannelInterest`], what to wait for before the subscriber can count
    /// on events from other nodes.
    pub fn subscribe(
        &self,
        channel: &Arc<str>,
        subscriber: Arc<dyn Subscriber>,
    ) -> (SubscriberId, Option<InterestWait>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut shard = self.shard(channel).write();
        let entry = shard.entry(channel.clone()).or_default();
        let subs = &mut entry.subs;
        if subs.len() == subs.capacity() {
            // Personal channels have one subscriber: room for one, not the default four.
            subs.reserve_exact(subs.len().max(1));
        }
        subs.push((id, subscriber));
        if let Some(interest) = &self.interest
            && subs.len() == 1
        {
            let (ready, wait) = interest_wait();
            entry.ready = Some(wait);
            interest.gained(channel, ready);
        }
        (id, entry.ready.clone())
    }

    /// Removes a subscriber; returns true if the channel has no local subscribers left.
    pub fn unsubscribe(&self, channel: &str, id: SubscriberId) -> bool {
        let mut shard = self.shard(channel).write();
        let Some(entry) = shard.get_mut(channel) else {
            return false;
        };
        entry.subs.retain(|(sid, _)| *sid != id);
        if !entry.subs.is_empty() {
            return false;
        }
        if let Some((name, _)) = shard.remove_entry(channel)
            && let Some(interest) = &self.interest
        {
            interest.lost(&name);
        }
        true
    }

    /// Delivers a run of events of one channel (`events[0]`'s; every event must be of it),
    /// in order, to every local subscriber of the channel: each subscriber takes the whole run
    /// at once, so it is locked and woken once per run instead of once per event.
    pub fn broadcast(&self, events: &[ChannelEvent]) -> BroadcastOutcome {
        let mut outcome = BroadcastOutcome::default();
        let Some(first) = events.first() else {
            return outcome;
        };
        let channel = first.channel();
        debug_assert!(events.iter().all(|e| e.channel() == channel));
        let mut closed = Vec::new();
        {
            let shard = self.shard(channel).read();
            if let Some(entry) = shard.get(&**channel) {
                for (id, sub) in &entry.subs {
                    if !sub.deliver_many(events, &mut outcome) {
                        closed.push(*id);
                    }
                }
            }
        }
        for id in closed {
            self.unsubscribe(channel, id);
        }
        if self.pattern_count.load(Ordering::Acquire) > 0 {
            self.broadcast_to_patterns(channel, events, &mut outcome);
        }
        outcome
    }

    fn broadcast_to_patterns(
        &self,
        channel: &str,
        events: &[ChannelEvent],
        outcome: &mut BroadcastOutcome,
    ) {
        let mut closed = Vec::new();
        for (id, sub) in self.patterns.read().iter() {
            if sub.matches(channel) && !sub.deliver_many(events, outcome) {
                closed.push(*id);
            }
        }
        for id in closed {
            self.unsubscribe_pattern(id);
        }
    }

    /// Whether every channel's events reach this hub without asking: true without a
    /// [`ChannelInterest`] (a single node), false in a cluster.
    pub fn sees_every_channel(&self) -> bool {
        self.interest.is_none()
    }

    /// Makes the channels whose names start with `prefix` reach this hub (for pattern
    /// subscribers) for as long as the returned hold lives; with a [`ChannelInterest`], also
    /// what to wait for before counting on them. The engine hears the first hold of a prefix
    /// and the release of its last one (under the hub's lock of the prefixes, in order).
    pub fn want_prefix(self: &Arc<Self>, prefix: &str) -> (PrefixHold, Option<InterestWait>) {
        let prefix: Arc<str> = Arc::from(prefix);
        let Some(interest) = &self.interest else {
            return (PrefixHold { hub: None, prefix }, None);
        };
        let mut prefixes = self.prefixes.lock();
        let wait = match prefixes.get_mut(&prefix) {
            Some((count, wait)) => {
                *count += 1;
                wait.clone()
            }
            None => {
                let (ready, wait) = interest_wait();
                prefixes.insert(prefix.clone(), (1, wait.clone()));
                interest.gained_prefix(&prefix, ready);
                wait
            }
        };
        drop(prefixes);
        let hold = PrefixHold {
            hub: Some(self.clone()),
            prefix,
        };
        (hold, Some(wait))
    }

    fn release_prefix(&self, prefix: &Arc<str>) {
        let mut prefixes = self.prefixes.lock();
        let Some((count, _)) = prefixes.get_mut(prefix) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            prefixes.remove(prefix);
            if let Some(interest) = &self.interest {
                interest.lost_prefix(prefix);
            }
        }
    }

    /// The prefixes wanted now, with their hold counts.
    pub fn prefixes(&self) -> Vec<(Arc<str>, usize)> {
        let mut out: Vec<_> = self
            .prefixes
            .lock()
            .iter()
            .map(|(prefix, (count, _))| (prefix.clone(), *count))
            .collect();
        out.sort();
        out
    }

    /// Adds a pattern subscriber (see [`PatternSubscriber`]).
    pub fn subscribe_pattern(&self, subscriber: Arc<dyn PatternSubscriber>) -> SubscriberId {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut patterns = self.patterns.write();
        patterns.push((id, subscriber));
        self.pattern_count.store(patterns.len(), Ordering::Release);
        id
    }

    /// Removes a pattern subscriber.
    pub fn unsubscribe_pattern(&self, id: SubscriberId) {
        let mut patterns = self.patterns.write();
        patterns.retain(|(sid, _)| *sid != id);
        self.pattern_count.store(patterns.len(), Ordering::Release);
    }

    /// Number of local subscribers of `channel`.
    pub fn num_subscribers(&self, channel: &str) -> usize {
        self.shard(channel)
            .read()
            .get(channel)
            .map_or(0, |entry| entry.subs.len())
    }

    /// Channels with local subscribers, with their subscriber counts.
    pub fn channels(&self) -> Vec<(Arc<str>, usize)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            out.extend(
                shard
                    .read()
                    .iter()
                    .map(|(name, entry)| (name.clone(), entry.subs.len())),
            );
        }
        out
    }

    pub fn num_channels(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    pub fn num_subscriptions(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().values().map(|e| e.subs.len()).sum::<usize>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publication::{ChannelEvent, ClientInfo};
    use parking_lot::Mutex;

    struct Recorder {
        seen: Mutex<Vec<String>>,
        answer: Delivery,
    }

    fn recorder(answer: Delivery) -> Arc<Recorder> {
        Arc::new(Recorder {
            seen: Mutex::new(vec![]),
            answer,
        })
    }

    impl Subscriber for Recorder {
        fn deliver(&self, event: &ChannelEvent) -> Delivery {
            self.seen.lock().push(event.channel().to_string());
            self.answer
        }
    }

    fn join(channel: &str) -> ChannelEvent {
        ChannelEvent::Join {
            channel: Arc::from(channel),
            info: Arc::new(ClientInfo {
                client: "c".into(),
                user: "u".into(),
                conn_info: None,
                chan_info: None,
            }),
        }
    }

    #[test]
    fn delivers_only_to_the_channel_and_removes_closed() {
        let hub = Hub::new();
        let a = recorder(Delivery::Queued);
        let gone = recorder(Delivery::Closed);
        let ch_a: Arc<str> = Arc::from("a");
        hub.subscribe(&ch_a, a.clone());
        hub.subscribe(&ch_a, gone.clone());
        hub.subscribe(&Arc::from("b"), recorder(Delivery::Queued));

        let outcome = hub.broadcast(&[join("a")]);
        assert_eq!(outcome.queued, 1);
        assert_eq!(a.seen.lock().len(), 1);
        assert_eq!(gone.seen.lock().len(), 1);
        assert_eq!(hub.num_subscribers("a"), 1, "closed subscriber removed");
        hub.broadcast(&[join("a")]);
        assert_eq!(gone.seen.lock().len(), 1);
        assert_eq!(hub.num_channels(), 2);
        assert_eq!(hub.num_subscriptions(), 2);
    }

    #[test]
    fn a_run_goes_to_every_subscriber_in_order_and_closed_ones_are_removed() {
        let hub = Hub::new();
        let a = recorder(Delivery::Queued);
        let gone = recorder(Delivery::Closed);
        let ch: Arc<str> = Arc::from("a");
        hub.subscribe(&ch, a.clone());
        hub.subscribe(&ch, gone.clone());
        let run = [join("a"), join("a"), join("a")];
        let outcome = hub.broadcast(&run);
        assert_eq!(outcome.queued, 3);
        assert_eq!(a.seen.lock().len(), 3);
        assert_eq!(
            gone.seen.lock().len(),
            1,
            "stopped at the first closed answer"
        );
        assert_eq!(hub.num_subscribers("a"), 1, "closed subscriber removed");
        assert_eq!(hub.broadcast(&[]), BroadcastOutcome::default());
    }

    struct Prefix {
        prefix: &'static str,
        inner: Arc<Recorder>,
    }

    impl Subscriber for Prefix {
        fn deliver(&self, event: &ChannelEvent) -> Delivery {
            self.inner.deliver(event)
        }
    }

    impl PatternSubscriber for Prefix {
        fn matches(&self, channel: &str) -> bool {
            channel.starts_with(self.prefix)
        }
    }

    #[test]
    fn pattern_subscribers_get_every_matching_channel_and_closed_ones_are_removed() {
        let hub = Hub::new();
        assert!(hub.sees_every_channel());
        let seen = recorder(Delivery::Queued);
        let id = hub.subscribe_pattern(Arc::new(Prefix {
            prefix: "mqtt:",
            inner: seen.clone(),
        }));
        let gone = recorder(Delivery::Closed);
        hub.subscribe_pattern(Arc::new(Prefix {
            prefix: "mqtt:",
            inner: gone.clone(),
        }));
        // No channel subscriber of `mqtt:a`: the pattern still gets it.
        hub.broadcast(&[join("mqtt:a"), join("mqtt:a")]);
        hub.subscribe(&Arc::from("mqtt:b"), recorder(Delivery::Queued));
        let outcome = hub.broadcast(&[join("mqtt:b")]);
        assert_eq!(outcome.queued, 2, "the channel subscriber and the pattern");
        hub.broadcast(&[join("other")]);
        assert_eq!(seen.seen.lock().len(), 3);
        assert_eq!(gone.seen.lock().len(), 1, "removed after its closed answer");
        hub.unsubscribe_pattern(id);
        hub.broadcast(&[join("mqtt:a")]);
        assert_eq!(seen.seen.lock().len(), 3);
        assert!(!Hub::with_interest(Some(Arc::new(Interest::default()))).sees_every_channel());
    }

    /// Records what the hub tells the engine, in order.
    #[derive(Default)]
    struct Interest(Mutex<Vec<String>>);

    impl ChannelInterest for Interest {
        fn gained(&self, channel: &Arc<str>, ready: InterestReady) {
            self.0.lock().push(format!("+{channel}"));
            ready.resolve(Ok(()));
        }
        fn lost(&self, channel: &Arc<str>) {
            self.0.lock().push(format!("-{channel}"));
        }
        fn gained_prefix(&self, prefix: &Arc<str>, ready: InterestReady) {
            self.0.lock().push(format!("+{prefix}*"));
            ready.resolve(Ok(()));
        }
        fn lost_prefix(&self, prefix: &Arc<str>) {
            self.0.lock().push(format!("-{prefix}*"));
        }
    }

    #[tokio::test]
    async fn prefix_interest_hears_the_first_hold_and_the_last_release() {
        let interest = Arc::new(Interest::default());
        let hub = Arc::new(Hub::with_interest(Some(interest.clone())));
        let (a, wait) = hub.want_prefix("mqtt:a/");
        assert!(interest_ready(wait.expect("waits")).await.is_ok());
        let (b, wait) = hub.want_prefix("mqtt:a/");
        assert!(wait.is_some(), "a later hold waits on the same want");
        let (c, _) = hub.want_prefix("mqtt:");
        assert_eq!(hub.prefixes().len(), 2);
        drop(a);
        drop(c);
        drop(b);
        let (_d, _) = hub.want_prefix("mqtt:a/");
        assert_eq!(
            *interest.0.lock(),
            ["+mqtt:a/*", "+mqtt:*", "-mqtt:*", "-mqtt:a/*", "+mqtt:a/*"]
        );
        let single = Arc::new(Hub::new());
        let (hold, wait) = single.want_prefix("mqtt:");
        assert!(wait.is_none(), "a single node sees every channel");
        assert_eq!(hold.prefix(), "mqtt:");
        assert!(single.prefixes().is_empty());
    }

    #[test]
    fn interest_hears_first_and_last_however_the_last_left() {
        let interest = Arc::new(Interest::default());
        let hub = Hub::with_interest(Some(interest.clone()));
        let ch: Arc<str> = Arc::from("x");
        let (id1, wait) = hub.subscribe(&ch, recorder(Delivery::Queued));
        assert!(wait.is_some(), "the first subscriber waits for the engine");
        let (id2, wait) = hub.subscribe(&ch, recorder(Delivery::Queued));
        assert!(
            wait.is_some(),
            "a later subscriber waits on the same subscription"
        );
        hub.unsubscribe("x", id1);
        hub.unsubscribe("x", id2);
        // A subscriber found closed during a broadcast leaves too.
        hub.subscribe(&ch, recorder(Delivery::Closed));
        hub.broadcast(&[join("x")]);
        assert_eq!(hub.num_channels(), 0);
        assert_eq!(*interest.0.lock(), ["+x", "-x", "+x", "-x"]);
    }

    #[test]
    fn last_unsubscribe_drops_the_channel() {
        let hub = Hub::new();
        let ch: Arc<str> = Arc::from("x");
        let sub = recorder(Delivery::Queued);
        let (id1, _) = hub.subscribe(&ch, sub.clone());
        let (id2, _) = hub.subscribe(&ch, sub);
        assert!(!hub.unsubscribe("x", id1));
        assert!(hub.unsubscribe("x", id2));
        assert_eq!(hub.num_channels(), 0);
    }
}
