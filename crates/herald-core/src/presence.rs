//! The presence port: who is subscribed to a channel right now.
//!
//! A shared store (a cluster's) expires each entry unless the node that wrote it refreshes
//! it, so a dead node's clients disappear within a bounded time; the node refreshes its own
//! entries every [`PresenceStore::refresh_interval`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::publication::ClientInfo;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("presence store error: {0}")]
pub struct PresenceError(pub String);

/// Counts of distinct clients and users in a channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PresenceStats {
    pub num_clients: u64,
    pub num_users: u64,
}

/// Tracks presence per channel, keyed by client id.
#[async_trait]
pub trait PresenceStore: Send + Sync + 'static {
    async fn add(&self, channel: &str, info: ClientInfo) -> Result<(), PresenceError>;
    async fn remove(&self, channel: &str, client_id: &str) -> Result<(), PresenceError>;
    async fn get(&self, channel: &str) -> Result<HashMap<String, ClientInfo>, PresenceError>;
    async fn stats(&self, channel: &str) -> Result<PresenceStats, PresenceError>;

    /// How often a node must re-add its own entries, for stores that expire them (a shared
    /// store outlives the node that wrote an entry); `None` for stores that never expire
    /// entries (one node's memory).
    fn refresh_interval(&self) -> Option<Duration> {
        None
    }

    /// Re-adds a node's entries so they do not expire while it lives.
    async fn refresh(&self, entries: &[(Arc<str>, Arc<ClientInfo>)]) -> Result<(), PresenceError> {
        for (channel, info) in entries {
            self.add(channel, (**info).clone()).await?;
        }
        Ok(())
    }
}
