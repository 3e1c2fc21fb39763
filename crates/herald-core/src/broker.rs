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
    /// Sends `event` to every node subscribed to its channel (including this one).
    async fn publish(&self, event: ChannelEvent) -> Result<BroadcastOutcome, BrokerError>;
    /// Sends a run of events of one channel, in order (the fan-out task hands over what it
    /// has queued for a channel at once). By default, one [`Broker::publish`] each.
    async fn publish_many(
        &self,
        events: Vec<ChannelEvent>,
    ) -> Result<BroadcastOutcome, BrokerError> {
        let mut total = BroadcastOutcome::default();
        for event in events {
            let outcome = self.publish(event).await?;
            total.queued += outcome.queued;
            total.dropped += outcome.dropped;
        }
        Ok(total)
    }
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
    async fn publish(&self, event: ChannelEvent) -> Result<BroadcastOutcome, BrokerError> {
        Ok(self.hub.broadcast(&event))
    }

    async fn publish_many(
        &self,
        events: Vec<ChannelEvent>,
    ) -> Result<BroadcastOutcome, BrokerError> {
        Ok(self.hub.broadcast_many(&events))
    }

    async fn subscribe(&self, _channel: &str) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn unsubscribe(&self, _channel: &str) -> Result<(), BrokerError> {
        Ok(())
    }
}
