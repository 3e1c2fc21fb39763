//! The port every broker implements: connect, receive a batch, settle it, report lag. What
//! a message means and when it is settled is the consume loop's business (`consume`), not
//! the source's.
//!
//! May touch: nothing itself (a trait and its error).

use async_trait::async_trait;

use crate::mapping::Received;

/// How the consume loop settles one received message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Published (or a duplicate of a publication that is already durable): acknowledge.
    Done,
    /// Cannot become a publication (bad envelope, unknown namespace, too large): never
    /// retried. Sources with a dead-letter path (RabbitMQ's reject without requeue) use it;
    /// the others acknowledge it.
    Rejected,
}

/// One partition's lag, for sources whose broker partitions the stream (Kafka).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    pub lag: u64,
}

/// Why a source call failed. Every error is treated the same way by the loop (drop the
/// connection, back off, connect again); the text is for the log.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("connecting: {0}")]
    Connect(String),
    #[error("receiving: {0}")]
    Receive(String),
    #[error("acknowledging: {0}")]
    Settle(String),
    #[error("not connected")]
    NotConnected,
}

/// A broker or table Herald consumes. A source is used by one task at a time: `receive`,
/// then `settle` for that batch, then `receive` again.
///
/// Settling is at-least-once: a message not settled (the process died, the connection
/// dropped, a publish failed) is delivered again later, to this node or another — each
/// broker's own redelivery (JetStream's ack wait, RabbitMQ's requeue of unacknowledged
/// deliveries, Redis's pending entries list, the outbox row lock released by a rollback).
/// The idempotency key makes that redelivery harmless.
#[async_trait]
pub trait Source: Send + 'static {
    /// What identifies a received message when it is settled.
    type Receipt: Send + 'static;

    /// Connects (again), creating what the source needs when it is missing (the durable
    /// consumer, the consumer group). Called before the first `receive` and after any error.
    async fn connect(&mut self) -> Result<(), SourceError>;

    /// Waits a short while (about a second) for up to `max` messages, so the loop can notice
    /// a stop between calls. An empty batch is not an error.
    async fn receive(&mut self, max: usize) -> Result<Vec<(Self::Receipt, Received)>, SourceError>;

    /// Settles messages of the last batch. Messages of the batch left out are not
    /// acknowledged and will be delivered again.
    async fn settle(&mut self, settled: Vec<(Self::Receipt, Outcome)>) -> Result<(), SourceError>;

    /// Messages waiting for this consumer, when the broker tells it.
    async fn lag(&mut self) -> Option<u64> {
        None
    }

    /// Each partition's lag as the last `lag` call measured it (empty for sources without
    /// partitions).
    fn partition_lags(&self) -> Vec<PartitionLag> {
        Vec::new()
    }

    /// Partitions this node holds now, for sources whose broker hands partitions to the
    /// members of a group (Kafka); `None` for the others.
    fn assigned_partitions(&self) -> Option<u64> {
        None
    }

    /// Drops the connection (after an error, or on stop), giving unsettled messages back
    /// where the broker allows it.
    async fn disconnect(&mut self) {}
}
