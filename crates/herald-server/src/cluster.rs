//! This node's place in a cluster (`storage.engine = "redis"`).
//!
//! Owns: [`Cluster`]: the node registry heartbeat (every node writes what it holds; `info`
//! lists every live node) and the engine's cluster counters for `/metrics`.
//!
//! May touch: the Redis engine and registry (through `herald-store`), the application state
//! it reports on.

use std::sync::Arc;
use std::sync::atomic::Ordering;

#[cfg(feature = "redis")]
use herald_store::redis::{NodeRecord, NodeRegistry, RedisEngine};

use crate::app::AppState;

/// The cluster engine and registry of this node.
#[derive(Debug)]
pub struct Cluster {
    #[cfg(feature = "redis")]
    pub engine: Arc<RedisEngine>,
    #[cfg(feature = "redis")]
    pub registry: NodeRegistry,
}

#[cfg(feature = "redis")]
impl Cluster {
    pub fn new(engine: Arc<RedisEngine>, registry: NodeRegistry) -> Self {
        Self { engine, registry }
    }

    /// What this node reports about itself.
    pub fn record(state: &AppState) -> NodeRecord {
        let info = state.node.info();
        NodeRecord {
            uid: info.uid,
            name: info.name,
            version: info.version,
            num_clients: state.realtime.connections.load(Ordering::Relaxed),
            num_users: state.realtime.sessions.user_count() as u64,
            num_channels: info.num_channels,
            num_subs: info.num_subscriptions,
            uptime_secs: info.uptime.as_secs(),
            updated_ms: 0,
        }
    }

    /// Writes this node's record every heartbeat interval until the task is aborted.
    pub async fn heartbeat(state: Arc<AppState>) {
        let Some(cluster) = state.cluster.clone() else {
            return;
        };
        let mut tick = tokio::time::interval(cluster.registry.heartbeat_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(error) = cluster.registry.heartbeat(Self::record(&state)).await {
                tracing::debug!(%error, "node heartbeat failed");
            }
        }
    }

    /// Every live node (this one from memory if the registry cannot be read).
    pub async fn nodes(&self, state: &AppState) -> Vec<NodeRecord> {
        match self.registry.live().await {
            Ok(nodes) if !nodes.is_empty() => nodes,
            Ok(_) => vec![Self::record(state)],
            Err(error) => {
                tracing::warn!(%error, "node registry unreadable; info shows this node only");
                vec![Self::record(state)]
            }
        }
    }
}
