//! RabbitMQ (AMQP 0-9-1) source: competing consumers on one existing queue (every node
//! consumes the same queue; the broker gives each message to one of them), `prefetch`
//! unacknowledged deliveries at a time, manual `basic.ack` after publish. A message that
//! cannot be mapped is rejected without requeue (`basic.reject`), which dead-letters it when
//! the queue has a dead-letter exchange (`x-dead-letter-exchange`) and drops it otherwise.
//! Deliveries not acknowledged when the channel closes (the node died, the connection
//! dropped) are requeued by the broker.
//!
//! The queue is the application's (with its arguments: durability, DLX, single active
//! consumer for strict order across nodes); it is not declared here.
//!
//! A message's attributes: `routing_key`, `exchange`, `queue`, `header.NAME` (string and
//! number headers), `message_id`; its id is the `message_id` property when the publisher set
//! one (RabbitMQ has no stable id of its own: without it a redelivered message has no
//! idempotency key and may publish twice).
//!
//! May touch: the configured RabbitMQ server (consuming its queue only).

use std::time::Duration;

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, Consumer};

use crate::mapping::Received;
use crate::source::{Outcome, Source, SourceError};

/// What a RabbitMQ source consumes.
#[derive(Clone, Debug)]
pub struct AmqpConfig {
    /// `amqp://user:password@host:port/vhost` (`%2f` for `/`), or `amqps://`.
    pub url: String,
    pub queue: String,
    /// Unacknowledged deliveries the broker sends this node at once.
    pub prefetch: u16,
    /// This node's consumer tag (visible in the management UI).
    pub consumer_tag: String,
    /// How the connection is named on the broker (to find it in its client list).
    pub connection_name: String,
}

/// The attributes templates may name.
pub const ATTRIBUTES: &[&str] = &[
    "routing_key",
    "exchange",
    "queue",
    "header.",
    "message_id",
    "id",
];

struct Connected {
    connection: Connection,
    channel: Channel,
    consumer: Consumer,
}

pub struct AmqpSource {
    config: AmqpConfig,
    connected: Option<Connected>,
}

impl AmqpSource {
    pub fn new(config: AmqpConfig) -> Self {
        Self {
            config,
            connected: None,
        }
    }

    fn connected(&mut self) -> Result<&mut Connected, SourceError> {
        self.connected.as_mut().ok_or(SourceError::NotConnected)
    }

    fn received(&self, delivery: Delivery) -> (u64, Received) {
        let mut message = Received::new(delivery.data)
            .with("routing_key", delivery.routing_key.as_str())
            .with("exchange", delivery.exchange.as_str())
            .with("queue", self.config.queue.clone());
        if let Some(id) = delivery.properties.message_id() {
            message = message.with("message_id", id.as_str()).with_id(id.as_str());
        }
        if let Some(headers) = delivery.properties.headers() {
            for (name, value) in headers {
                if let Some(text) = header_text(value) {
                    message
                        .attributes
                        .push((format!("header.{}", name.as_str()), text));
                }
            }
        }
        (delivery.delivery_tag, message)
    }
}

/// A header's value as text, for the types a template can use.
fn header_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(text) => String::from_utf8_lossy(text.as_bytes()).into_owned(),
        AMQPValue::ShortString(text) => text.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        _ => return None,
    })
}

#[async_trait]
impl Source for AmqpSource {
    type Receipt = u64;

    async fn connect(&mut self) -> Result<(), SourceError> {
        let fail = |e: lapin::Error| SourceError::Connect(e.to_string());
        let connection = Connection::connect(
            &self.config.url,
            ConnectionProperties::default()
                .with_connection_name(self.config.connection_name.as_str().into()),
        )
        .await
        .map_err(fail)?;
        let channel = connection.create_channel().await.map_err(fail)?;
        channel
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await
            .map_err(fail)?;
        let consumer = channel
            .basic_consume(
                self.config.queue.as_str().into(),
                self.config.consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| SourceError::Connect(format!("queue {:?}: {e}", self.config.queue)))?;
        self.connected = Some(Connected {
            connection,
            channel,
            consumer,
        });
        Ok(())
    }

    async fn receive(&mut self, max: usize) -> Result<Vec<(u64, Received)>, SourceError> {
        let consumer = &mut self.connected()?.consumer;
        let gone = || SourceError::Receive("the broker cancelled the consumer".into());
        let first = match tokio::time::timeout(Duration::from_secs(1), consumer.next()).await {
            Err(_) => return Ok(Vec::new()),
            Ok(None) => return Err(gone()),
            Ok(Some(delivery)) => delivery.map_err(|e| SourceError::Receive(e.to_string()))?,
        };
        let mut deliveries = vec![first];
        // Whatever else has already arrived, without waiting.
        while deliveries.len() < max {
            match consumer.next().now_or_never() {
                Some(Some(delivery)) => {
                    deliveries.push(delivery.map_err(|e| SourceError::Receive(e.to_string()))?);
                }
                Some(None) => return Err(gone()),
                None => break,
            }
        }
        Ok(deliveries.into_iter().map(|d| self.received(d)).collect())
    }

    async fn settle(&mut self, settled: Vec<(u64, Outcome)>) -> Result<(), SourceError> {
        let channel = &self.connected()?.channel;
        let fail = |e: lapin::Error| SourceError::Settle(e.to_string());
        for (tag, outcome) in settled {
            match outcome {
                Outcome::Done => channel.basic_ack(tag, BasicAckOptions::default()).await,
                // To the queue's dead-letter exchange, when it has one.
                Outcome::Rejected => {
                    channel
                        .basic_reject(tag, BasicRejectOptions { requeue: false })
                        .await
                }
            }
            .map_err(fail)?;
        }
        Ok(())
    }

    async fn lag(&mut self) -> Option<u64> {
        let connected = self.connected.as_ref()?;
        // A passive declare reads the queue's ready count without changing it.
        let queue = connected
            .channel
            .queue_declare(
                self.config.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .ok()?;
        Some(u64::from(queue.message_count()))
    }

    async fn disconnect(&mut self) {
        // Closing requeues every delivery not acknowledged.
        if let Some(connected) = self.connected.take() {
            let _ = connected.connection.close(200, "bye".into()).await;
        }
    }
}
