//! The cluster engine: several Herald nodes sharing one order per channel through Redis.
//!
//! Owns: `[redis]` configuration ([`RedisConfig`], always compiled so every build reads the
//! same configuration file) and, with the `redis` feature, [`RedisEngine`] (the
//! [`Engine`] port: publish = one script that stores and publishes; history in streams;
//! events of other nodes through each shard's pub/sub subscriber), [`RedisPresenceStore`],
//! the node registry, and the push side's [`RedisOutboundQueue`] and [`RedisDeviceStore`]
//! ([`RedisEngine::outbound`]). Channels are spread over shards by a consistent hash of their
//! name, so every node must list the same shards in the same order; the queue and the device
//! registry do not shard: all their keys are on the first shard.
//!
//! May touch: the configured Redis servers.

mod config;
pub use config::{RedisConfig, SentinelConfig};

#[cfg(feature = "redis")]
mod codec;
#[cfg(feature = "redis")]
mod conn;
#[cfg(feature = "redis")]
mod device_listing;
#[cfg(feature = "redis")]
mod device_scripts;
#[cfg(feature = "redis")]
mod devices;
#[cfg(feature = "redis")]
mod history;
#[cfg(feature = "redis")]
mod nodes;
#[cfg(feature = "redis")]
mod presence;
#[cfg(feature = "redis")]
mod pubsub;
#[cfg(feature = "redis")]
mod queue;
#[cfg(feature = "redis")]
mod queue_scripts;
#[cfg(feature = "redis")]
mod scripts;
#[cfg(feature = "redis")]
mod webhooks;

#[cfg(feature = "redis")]
pub use devices::RedisDeviceStore;

#[cfg(feature = "redis")]
pub use engine::{RedisEngine, Shards};
#[cfg(feature = "redis")]
pub use nodes::{NodeRecord, NodeRegistry};
#[cfg(feature = "redis")]
pub use presence::RedisPresenceStore;
#[cfg(feature = "redis")]
pub use pubsub::PubSubStats;
#[cfg(feature = "redis")]
pub use queue::RedisOutboundQueue;
#[cfg(feature = "redis")]
pub use webhooks::RedisWebhookStore;

#[cfg(feature = "redis")]
mod engine {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use async_trait::async_trait;
    use bytes::Bytes;
    use herald_core::engine::{Engine, Publish, Published};
    use herald_core::fanout::FanoutFeed;
    use herald_core::hub::{ChannelInterest, InterestReady, interest_ready, interest_wait};
    use herald_core::publication::ChannelEvent;
    use herald_core::store::{HistoryPage, HistoryQuery, StoreError};
    use tokio::sync::mpsc;

    use super::codec;
    use super::conn::{Link, Source, Timeouts};
    use super::history::ShardStore;
    use super::presence::RedisPresenceStore;
    use super::pubsub::{Subscriber, Timing};
    use super::scripts::Keys;
    use super::{PubSubStats, RedisConfig, RedisDeviceStore, RedisOutboundQueue};

    /// The shards, and which one holds a channel.
    #[derive(Debug)]
    pub struct Shards {
        list: Vec<Arc<ShardStore>>,
    }

    impl Shards {
        pub(crate) fn for_channel(&self, channel: &str) -> &Arc<ShardStore> {
            &self.list[shard_index(channel, self.list.len())]
        }

        pub(crate) fn first(&self) -> &Arc<ShardStore> {
            &self.list[0]
        }

        /// Commands that failed because a shard could not be reached, over all shards.
        pub fn errors(&self) -> usize {
            self.list.iter().map(|s| s.link.errors()).sum()
        }
    }

    /// Jump consistent hash (Lamping and Veach) of FNV-1a of the name: every node agrees
    /// without coordination, and adding a shard moves only about 1/n of the channels.
    pub(crate) fn shard_index(channel: &str, shards: usize) -> usize {
        if shards <= 1 {
            return 0;
        }
        let mut key = channel
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
                (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
            });
        let (mut b, mut j) = (-1_i64, 0_i64);
        while j < shards as i64 {
            b = j;
            key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
            j = ((b + 1) as f64 * ((1_i64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
        }
        b as usize
    }

    /// The Redis engine of one node.
    pub struct RedisEngine {
        shards: Arc<Shards>,
        interest: Arc<Interest>,
        control: parking_lot::Mutex<Option<mpsc::UnboundedReceiver<Bytes>>>,
    }

    impl std::fmt::Debug for RedisEngine {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("RedisEngine")
                .field("shards", &self.shards.list.len())
                .finish()
        }
    }

    /// Routes the hub's interest to the channel's shard subscriber.
    struct Interest {
        subscribers: Vec<Subscriber>,
    }

    impl ChannelInterest for Interest {
        fn gained(&self, channel: &Arc<str>, ready: InterestReady) {
            self.subscribers[shard_index(channel, self.subscribers.len())].gained(channel, ready);
        }

        fn lost(&self, channel: &Arc<str>) {
            self.subscribers[shard_index(channel, self.subscribers.len())].lost(channel);
        }

        /// A prefix's channels are on every shard: each shard's subscriber receives them,
        /// and `ready` resolves once all of them do.
        fn gained_prefix(&self, prefix: &Arc<str>, ready: InterestReady) {
            if let [only] = self.subscribers.as_slice() {
                only.gained_prefix(prefix, ready);
                return;
            }
            let waits: Vec<_> = self
                .subscribers
                .iter()
                .map(|subscriber| {
                    let (shard_ready, wait) = interest_wait();
                    subscriber.gained_prefix(prefix, shard_ready);
                    wait
                })
                .collect();
            tokio::spawn(async move {
                let results = futures::future::join_all(waits.into_iter().map(interest_ready));
                ready.resolve(results.await.into_iter().collect());
            });
        }

        fn lost_prefix(&self, prefix: &Arc<str>) {
            for subscriber in &self.subscribers {
                subscriber.lost_prefix(prefix);
            }
        }
    }

    impl RedisEngine {
        /// Connects to every shard (a command connection and the pub/sub connection) and
        /// starts delivering other nodes' events to `feed`. Fails when any shard cannot be
        /// reached: a node never starts on half an engine.
        pub async fn connect(
            config: &RedisConfig,
            feed: FanoutFeed,
        ) -> Result<(Self, RedisPresenceStore), StoreError> {
            config.validate().map_err(StoreError::Unavailable)?;
            let timeouts = Timeouts {
                command: config.command_timeout.as_duration(),
                connect: config.connect_timeout.as_duration(),
            };
            let keys = Keys::new(&config.prefix);
            let mut list = Vec::new();
            for index in 0..config.shards() {
                let (name, source) =
                    match (config.addresses.get(index), config.sentinels.get(index)) {
                        (Some(url), _) => (redact(url), Source::direct(url)?),
                        (None, Some(sentinel)) => (
                            format!("sentinel:{}", sentinel.master_name),
                            Source::sentinel(&sentinel.master_name, &sentinel.addresses)?,
                        ),
                        (None, None) => break,
                    };
                let link = Arc::new(Link::new(name, source, timeouts, config.connections));
                link.query::<()>(redis::cmd("PING").to_owned()).await?;
                list.push(Arc::new(ShardStore::new(
                    link,
                    keys.clone(),
                    config.history_meta_ttl.as_duration(),
                    (config.wait_replicas, config.wait_timeout.as_duration()),
                )));
            }
            let mut subscribers = Vec::new();
            let (control_tx, control_rx) = mpsc::unbounded_channel();
            let mut control_tx = Some(control_tx);
            for (index, store) in list.iter().enumerate() {
                let (subscriber, connected) = Subscriber::spawn(
                    store.clone(),
                    feed.clone(),
                    control_tx.take(),
                    Timing {
                        ping_interval: config.ping_interval.as_duration(),
                        command_timeout: timeouts.command,
                        outage_disconnect: config.outage_disconnect.as_duration(),
                    },
                    (index, list.len()),
                );
                connected.await.unwrap_or_else(|_| {
                    Err(StoreError::Unavailable("pub/sub task stopped".into()))
                })?;
                subscribers.push(subscriber);
            }
            let shards = Arc::new(Shards { list });
            let presence =
                RedisPresenceStore::new(shards.clone(), config.presence_ttl.as_duration());
            Ok((
                Self {
                    shards,
                    interest: Arc::new(Interest { subscribers }),
                    control: parking_lot::Mutex::new(Some(control_rx)),
                },
                presence,
            ))
        }

        pub fn shards(&self) -> &Arc<Shards> {
            &self.shards
        }

        /// The push side's outbound queue and device registry, on this engine's connections
        /// to the first shard (every node builds them the same way and shares them). Cheap:
        /// call it once per node and clone the handles.
        pub fn outbound(&self) -> (RedisOutboundQueue, RedisDeviceStore) {
            let shard = self.shards.first();
            let base = shard.keys.push();
            (
                RedisOutboundQueue::new(shard.link.clone(), base.clone(), shard.replicas()),
                RedisDeviceStore::new(shard.link.clone(), base),
            )
        }

        /// Webhook endpoints and the attempt log, beside the outbound queue (first shard,
        /// same hash tag).
        pub fn webhooks(&self) -> super::RedisWebhookStore {
            let shard = self.shards.first();
            super::RedisWebhookStore::new(shard.link.clone(), shard.keys.push())
        }

        /// Messages sent with [`RedisEngine::send_control`] by any node, this one included,
        /// in the order Redis received them; only the first call gets the receiver.
        pub fn control_messages(&self) -> Option<mpsc::UnboundedReceiver<Bytes>> {
            self.control.lock().take()
        }

        /// Keeps a cluster-wide command (a revocation) for nodes that start later, until
        /// `until` (Unix seconds).
        pub async fn keep_control(&self, message: Vec<u8>, until: u64) -> Result<(), StoreError> {
            let shard = self.shards.first();
            let key = shard.keys.kept_controls();
            shard
                .link
                .query::<()>(
                    redis::cmd("ZADD")
                        .arg(key)
                        .arg(until)
                        .arg(message)
                        .to_owned(),
                )
                .await
        }

        /// The kept commands that still matter at `now` (Unix seconds); expired ones are
        /// deleted.
        pub async fn kept_controls(&self, now: u64) -> Result<Vec<Vec<u8>>, StoreError> {
            let shard = self.shards.first();
            let key = shard.keys.kept_controls();
            shard
                .link
                .run(|mut connection| async move {
                    let mut pipe = redis::pipe();
                    pipe.cmd("ZREMRANGEBYSCORE")
                        .arg(&key)
                        .arg("-inf")
                        .arg(format!("({now}"))
                        .ignore()
                        .cmd("ZRANGE")
                        .arg(&key)
                        .arg(0)
                        .arg(-1);
                    let (kept,): (Vec<Vec<u8>>,) = pipe.query_async(&mut connection).await?;
                    Ok(kept)
                })
                .await
        }

        /// Records this node's answer to a cluster-wide query (kept for a minute).
        pub async fn answer(
            &self,
            request: &str,
            uid: &str,
            answer: Vec<u8>,
        ) -> Result<(), StoreError> {
            let shard = self.shards.first();
            let key = shard.keys.answers(request);
            let uid = uid.to_owned();
            shard
                .link
                .run(|mut connection| async move {
                    let mut pipe = redis::pipe();
                    pipe.hset(&key, uid, answer)
                        .ignore()
                        .expire(&key, 60)
                        .ignore();
                    pipe.query_async::<()>(&mut connection).await
                })
                .await
        }

        /// The answers recorded so far to a cluster-wide query, by node uid.
        pub async fn answers(&self, request: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            let shard = self.shards.first();
            let key = shard.keys.answers(request);
            shard
                .link
                .query(redis::cmd("HGETALL").arg(key).to_owned())
                .await
        }

        /// Sends a cluster-wide command to every node.
        pub async fn send_control(&self, message: Vec<u8>) -> Result<(), StoreError> {
            let shard = self.shards.first();
            let channel = shard.keys.control();
            shard
                .link
                .query::<()>(redis::cmd("PUBLISH").arg(channel).arg(message).to_owned())
                .await
        }

        /// Counters of each shard's pub/sub subscriber.
        pub fn pubsub_stats(&self) -> Vec<Arc<PubSubStats>> {
            self.interest
                .subscribers
                .iter()
                .map(|s| s.stats.clone())
                .collect()
        }

        /// Reconnects of pub/sub connections, gaps healed from streams and channels whose
        /// subscribers had to recover, over all shards.
        pub fn pubsub_totals(&self) -> (u64, u64, u64) {
            self.pubsub_stats().iter().fold((0, 0, 0), |acc, s| {
                (
                    acc.0 + s.reconnects.load(Ordering::Relaxed),
                    acc.1 + s.healed.load(Ordering::Relaxed),
                    acc.2 + s.unrecoverable.load(Ordering::Relaxed),
                )
            })
        }
    }

    /// The address without a password, for logs.
    fn redact(url: &str) -> String {
        match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}***{}", &url[..scheme + 3], &url[at..])
            }
            _ => url.to_owned(),
        }
    }

    #[async_trait]
    impl Engine for RedisEngine {
        async fn publish(&self, publish: Publish) -> Result<Published, StoreError> {
            self.shards
                .for_channel(&publish.channel)
                .publish(publish)
                .await
        }

        async fn announce(&self, event: ChannelEvent) -> Result<(), StoreError> {
            let message = codec::encode_presence_event(&event)
                .map_err(|e| StoreError::Backend(e.to_string()))?;
            let Some(message) = message else {
                return Ok(());
            };
            let channel = event.channel();
            self.shards
                .for_channel(channel)
                .announce(channel, message)
                .await
        }

        async fn read(
            &self,
            channel: &str,
            query: HistoryQuery,
        ) -> Result<HistoryPage, StoreError> {
            self.shards
                .for_channel(channel)
                .read_page(channel, query)
                .await
        }

        async fn remove(&self, channel: &str) -> Result<(), StoreError> {
            self.shards.for_channel(channel).remove(channel).await
        }

        async fn flush(&self) -> Result<(), StoreError> {
            // Every publish is acknowledged by Redis before it returns: nothing is pending.
            Ok(())
        }

        fn interest(&self) -> Option<Arc<dyn ChannelInterest>> {
            Some(self.interest.clone())
        }

        fn healthy(&self) -> bool {
            self.interest.subscribers.iter().all(Subscriber::connected)
                && self.shards.list.iter().all(|s| s.link.healthy())
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn channels_spread_over_shards_and_move_little_when_one_is_added() {
            let names: Vec<String> = (0..10_000).map(|i| format!("chat:{i}")).collect();
            let mut counts = [0usize; 3];
            for name in &names {
                counts[shard_index(name, 3)] += 1;
            }
            assert!(
                counts.iter().all(|c| (2_900..3_800).contains(c)),
                "{counts:?}"
            );
            let moved = names
                .iter()
                .filter(|n| shard_index(n, 3) != shard_index(n, 4))
                .count();
            assert!(
                (2_000..3_000).contains(&moved),
                "about a quarter moves: {moved}"
            );
            assert_eq!(shard_index("x", 1), 0);
        }

        #[test]
        fn passwords_stay_out_of_logs() {
            assert_eq!(redact("redis://:secret@host:1/0"), "redis://***@host:1/0");
            assert_eq!(redact("redis://host:1"), "redis://host:1");
        }
    }
}
