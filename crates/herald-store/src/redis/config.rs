//! `[redis]`: where the cluster engine finds Redis and how long it waits for it.
//!
//! Owns: [`RedisConfig`] and its validation. May touch: nothing.

use std::time::Duration;

use herald_core::duration::HumanDuration;
use serde::{Deserialize, Serialize};

/// Sentinel-managed Redis: the primary of `master_name`, found through these sentinels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SentinelConfig {
    pub master_name: String,
    /// `redis://host:port` of each sentinel.
    pub addresses: Vec<String>,
}

/// The Redis engine's settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// One `redis://[user:password@]host:port[/db]` per shard: channels are spread over them
    /// by a consistent hash of the channel name, so every node must list the same shards in
    /// the same order.
    pub addresses: Vec<String>,
    /// One sentinel group per shard instead of `addresses` (failover to a new primary).
    pub sentinels: Vec<SentinelConfig>,
    /// Prefix of every key and pub/sub channel, so several Herald clusters (or tests) can
    /// share one Redis.
    pub prefix: String,
    /// Longest wait for any one command; a command that takes longer fails (503 to a
    /// publisher) and its connection is replaced.
    pub command_timeout: HumanDuration,
    /// Longest wait for a new connection.
    pub connect_timeout: HumanDuration,
    /// Connections per shard for commands (each multiplexes any number of requests).
    pub connections: usize,
    /// How often an idle pub/sub connection is probed with a PING.
    pub ping_interval: HumanDuration,
    /// How long a node's presence entries live without a refresh (a dead node's clients
    /// disappear within this); nodes refresh every third of it.
    pub presence_ttl: HumanDuration,
    /// How long a channel's offset and epoch outlive its last publication (must outlive the
    /// stream, so a client that comes back after the stream expired is told it cannot be
    /// recovered instead of silently restarting at offset 1).
    pub history_meta_ttl: HumanDuration,
    /// A node not heard of for this long is gone from `/api/info`.
    pub node_ttl: HumanDuration,
    /// How long a node that cannot reach Redis keeps its clients' subscriptions; then they
    /// are closed with 3010 so they reconnect (to a node that can) and recover.
    pub outage_disconnect: HumanDuration,
    /// Replicas that must hold a publication before it is acknowledged (Redis `WAIT`), so a
    /// failover cannot lose it; 0: the primary's answer is enough.
    pub wait_replicas: u32,
    /// Longest wait for those replicas; a publication they did not confirm in time is
    /// answered 503 (it may still be stored: retry with the same idempotency key).
    pub wait_timeout: HumanDuration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            addresses: Vec::new(),
            sentinels: Vec::new(),
            prefix: "herald".to_owned(),
            command_timeout: HumanDuration::from_secs(2),
            connect_timeout: HumanDuration::from_secs(2),
            connections: 1,
            ping_interval: HumanDuration::from_secs(1),
            presence_ttl: HumanDuration::from_secs(60),
            history_meta_ttl: HumanDuration::from_secs(30 * 24 * 3600),
            node_ttl: HumanDuration::from_secs(10),
            outage_disconnect: HumanDuration::from_secs(5),
            wait_replicas: 0,
            wait_timeout: HumanDuration::from_secs(1),
        }
    }
}

impl RedisConfig {
    /// Why this configuration cannot work, if it cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.addresses.is_empty() && self.sentinels.is_empty() {
            return Err("redis.addresses (or redis.sentinels) must name at least one Redis".into());
        }
        if !self.addresses.is_empty() && !self.sentinels.is_empty() {
            return Err("set either redis.addresses or redis.sentinels, not both".into());
        }
        for sentinel in &self.sentinels {
            if sentinel.master_name.is_empty() || sentinel.addresses.is_empty() {
                return Err("each redis.sentinels entry needs master_name and addresses".into());
            }
        }
        if self.prefix.is_empty() || self.prefix.contains(['{', '}']) {
            return Err("redis.prefix must be non-empty, without braces".into());
        }
        let positive = [
            ("command_timeout", self.command_timeout.as_duration()),
            ("connect_timeout", self.connect_timeout.as_duration()),
            ("ping_interval", self.ping_interval.as_duration()),
            ("presence_ttl", self.presence_ttl.as_duration()),
            ("node_ttl", self.node_ttl.as_duration()),
        ];
        for (name, value) in positive {
            if value < Duration::from_millis(10) {
                return Err(format!("redis.{name} must be at least 10ms"));
            }
        }
        if self.wait_replicas > 0
            && self.wait_timeout.as_duration() >= self.command_timeout.as_duration()
        {
            return Err("redis.wait_timeout must be shorter than redis.command_timeout".into());
        }
        if self.connections == 0 {
            return Err("redis.connections must be above 0".into());
        }
        Ok(())
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.addresses.len().max(self.sentinels.len())
    }
}
