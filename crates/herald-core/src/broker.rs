//! The broker port: carries channel events to every node's hub.
//!
//! A single node uses [`LocalBroker`], which hands events straight to the local hub. Cluster
//! brokers (Redis, NATS) implement the same trait and deliver events from other nodes to the
//! local hub themselves.

use std::sync::Arc;

use async_trait::async_trait;

use crate::hub::{BroadcastOutcome, Hub};
use crate::publication::ChannelEvent;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("broker error: {0}")]
pub struct BrokerError(pub String);

/// Moves events between nodes.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Sends a run of events of one channel, in order, to every node subscribed to it
    /// (including this one). The fan-out task hands over what it has queued for a channel at
    /// once, so subscribers take a busy channel's events a run at a time.
    async fn publish(&self, events: &[ChannelEvent]) -> Result<BroadcastOutcome, BrokerError>;
    /// This node gained its first local subscriber to `channel`.
    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError>;
    /// This node lost its last local subscriber to `channel`.
    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError>;
}

/// The single-node broker: events go directly to the local hub.
#[derive(Debug)]
pub struct LocalBroker {
    hub: Arc<Hub>,
}

impl LocalBroker {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

#[async_trait]
impl Broker for LocalBroker {
    async fn publish(&self, events: &[ChannelEvent]) -> Result<BroadcastOutcome, BrokerError> {
        Ok(self.hub.broadcast(events))
    }

    async fn subscribe(&self, _channel: &str) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn unsubscribe(&self, _channel: &str) -> Result<(), BrokerError> {
        Ok(())
    }
}
