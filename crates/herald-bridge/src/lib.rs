//! Bridges in: consumers of external brokers and tables whose messages become Herald
//! publications.
//!
//! One [`Source`] per broker (`nats` JetStream pull consumer, `amqp` RabbitMQ queue,
//! `redis_streams` consumer group, `kafka` consumer group, `outbox` PostgreSQL table) only
//! receives and settles;
//! [`mapping`] turns a received message into a channel, data and idempotency key; and the one
//! loop in [`consume`] does the rest for all of them: receive a batch, publish each message
//! through [`herald_core::Node::publish`] (which returns once the publication is durable in
//! history), settle the source only after that, reconnect with jittered backoff when the source
//! fails, and count everything in [`SourceStats`].
//!
//! May touch: the brokers and databases it is configured for; the node it is given.

pub mod amqp;
pub mod consume;
pub mod kafka;
pub mod mapping;
pub mod nats;
pub mod outbox;
pub mod pg_tls;
pub mod redis_streams;
mod source;

pub use consume::{ConsumeConfig, SourceHandle, SourceStats, spawn_source};
pub use mapping::{Mapping, MappingError, Received};
pub use source::{Outcome, PartitionLag, Source, SourceError};
