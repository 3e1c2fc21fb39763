//! The presence port: who is subscribed to a channel right now.

use std::collections::HashMap;

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
}
