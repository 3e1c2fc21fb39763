//! The node registry: which Herald nodes are alive, and what each holds.
//!
//! Owns: [`NodeRegistry`]: every node writes its [`NodeRecord`] into one hash on the first
//! shard every heartbeat; readers skip (and delete) records not refreshed within the node
//! TTL, so a node killed without a word disappears from `/api/info` within it.
//!
//! May touch: the first shard's Redis.

use std::sync::Arc;
use std::time::Duration;

use herald_core::store::StoreError;
use herald_core::time::now_ms;
use serde::{Deserialize, Serialize};

use super::Shards;

/// What a node reports about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub uid: String,
    pub name: String,
    pub version: String,
    pub num_clients: u64,
    pub num_users: u64,
    pub num_channels: u64,
    pub num_subs: u64,
    pub uptime_secs: u64,
    /// When the record was written (ms since the Unix epoch).
    pub updated_ms: u64,
}

/// The registry of live nodes.
#[derive(Debug, Clone)]
pub struct NodeRegistry {
    shards: Arc<Shards>,
    ttl: Duration,
}

impl NodeRegistry {
    pub fn new(shards: Arc<Shards>, ttl: Duration) -> Self {
        Self { shards, ttl }
    }

    /// How often a node should write its record.
    pub fn heartbeat_interval(&self) -> Duration {
        self.ttl / 3
    }

    /// Writes this node's record.
    pub async fn heartbeat(&self, mut record: NodeRecord) -> Result<(), StoreError> {
        record.updated_ms = now_ms();
        let json =
            serde_json::to_string(&record).map_err(|e| StoreError::Backend(e.to_string()))?;
        let shard = self.shards.first();
        let key = shard.keys.nodes();
        shard
            .link
            .query::<()>(
                redis::cmd("HSET")
                    .arg(key)
                    .arg(record.uid)
                    .arg(json)
                    .to_owned(),
            )
            .await
    }

    /// Removes this node's record (on a clean shutdown).
    pub async fn leave(&self, uid: &str) -> Result<(), StoreError> {
        let shard = self.shards.first();
        let key = shard.keys.nodes();
        let uid = uid.to_owned();
        shard
            .link
            .query::<()>(redis::cmd("HDEL").arg(key).arg(uid).to_owned())
            .await
    }

    /// Every live node, sorted by name then uid; records older than the TTL are deleted.
    pub async fn live(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let shard = self.shards.first();
        let key = shard.keys.nodes();
        let all: Vec<(String, String)> = {
            let key = key.clone();
            shard
                .link
                .query(redis::cmd("HGETALL").arg(key).to_owned())
                .await?
        };
        let now = now_ms();
        let ttl = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let mut live = Vec::new();
        let mut stale = Vec::new();
        for (uid, json) in all {
            match serde_json::from_str::<NodeRecord>(&json) {
                Ok(record) if record.updated_ms.saturating_add(ttl) > now => live.push(record),
                _ => stale.push(uid),
            }
        }
        if !stale.is_empty() {
            let result = shard
                .link
                .query::<()>(redis::cmd("HDEL").arg(key).arg(stale).to_owned())
                .await;
            if let Err(error) = result {
                tracing::debug!(%error, "could not delete stale node records");
            }
        }
        live.sort_by(|a, b| (&a.name, &a.uid).cmp(&(&b.name, &b.uid)));
        Ok(live)
    }
}
