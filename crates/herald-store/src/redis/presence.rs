//! Presence shared by every node, each entry expiring unless its node refreshes it.
//!
//! Owns: [`RedisPresenceStore`]: per channel a hash (client id → client info JSON) and a
//! sorted set (client id → expiry ms) on the channel's shard. Reads drop expired entries
//! first, so a node that died takes its clients with it within `presence_ttl`.
//!
//! May touch: the shards' Redis, through their links.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_core::engine::deadline_after;
use herald_core::presence::{PresenceError, PresenceStats, PresenceStore};
use herald_core::publication::ClientInfo;
use herald_core::time::now_ms;

use super::Shards;
use super::scripts::PRESENCE_GET;

/// Presence in Redis.
#[derive(Debug)]
pub struct RedisPresenceStore {
    shards: Arc<Shards>,
    ttl: Duration,
}

fn error(err: impl std::fmt::Display) -> PresenceError {
    PresenceError(err.to_string())
}

impl RedisPresenceStore {
    pub(crate) fn new(shards: Arc<Shards>, ttl: Duration) -> Self {
        Self { shards, ttl }
    }

    /// Writes entries of one channel in one transaction.
    async fn put(&self, channel: &str, infos: &[&ClientInfo]) -> Result<(), PresenceError> {
        let shard = self.shards.for_channel(channel);
        let keys = &shard.keys;
        let expires = deadline_after(now_ms(), self.ttl);
        let hash = keys.presence(channel);
        let zset = keys.presence_expiry(channel);
        let mut pipe = redis::pipe();
        pipe.atomic();
        for info in infos {
            let json = serde_json::to_string(info).map_err(error)?;
            pipe.hset(&hash, &info.client, json).ignore();
            pipe.zadd(&zset, &info.client, expires).ignore();
        }
        // The keys go when the last entry would have expired.
        let ttl_ms = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX);
        pipe.pexpire(&hash, ttl_ms).ignore();
        pipe.pexpire(&zset, ttl_ms).ignore();
        shard.link.pipeline::<()>(pipe).await.map_err(error)
    }
}

#[async_trait]
impl PresenceStore for RedisPresenceStore {
    async fn add(&self, channel: &str, info: ClientInfo) -> Result<(), PresenceError> {
        self.put(channel, &[&info]).await
    }

    async fn remove(&self, channel: &str, client_id: &str) -> Result<(), PresenceError> {
        let shard = self.shards.for_channel(channel);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hdel(shard.keys.presence(channel), client_id)
            .ignore()
            .zrem(shard.keys.presence_expiry(channel), client_id)
            .ignore();
        shard.link.pipeline::<()>(pipe).await.map_err(error)
    }

    async fn get(&self, channel: &str) -> Result<HashMap<String, ClientInfo>, PresenceError> {
        let shard = self.shards.for_channel(channel);
        let mut invocation = PRESENCE_GET.key(shard.keys.presence(channel));
        invocation
            .key(shard.keys.presence_expiry(channel))
            .arg(now_ms());
        let flat: Vec<(String, String)> = shard
            .link
            .run(|mut connection| async move { invocation.invoke_async(&mut connection).await })
            .await
            .map_err(error)?;
        let mut out = HashMap::with_capacity(flat.len());
        for (client, json) in flat {
            match serde_json::from_str::<ClientInfo>(&json) {
                Ok(info) => {
                    out.insert(client, info);
                }
                Err(err) => {
                    tracing::warn!(channel, client, error = %err, "unreadable presence entry skipped")
                }
            }
        }
        Ok(out)
    }

    async fn stats(&self, channel: &str) -> Result<PresenceStats, PresenceError> {
        let entries = self.get(channel).await?;
        let users: std::collections::HashSet<&str> =
            entries.values().map(|info| info.user.as_str()).collect();
        Ok(PresenceStats {
            num_clients: entries.len() as u64,
            num_users: users.len() as u64,
        })
    }

    fn refresh_interval(&self) -> Option<Duration> {
        Some(self.ttl / 3)
    }

    async fn refresh(&self, entries: &[(Arc<str>, Arc<ClientInfo>)]) -> Result<(), PresenceError> {
        let mut by_channel: HashMap<&str, Vec<&ClientInfo>> = HashMap::new();
        for (channel, info) in entries {
            by_channel.entry(channel).or_default().push(info);
        }
        for (channel, infos) in by_channel {
            for chunk in infos.chunks(500) {
                self.put(channel, chunk).await?;
            }
        }
        Ok(())
    }
}
