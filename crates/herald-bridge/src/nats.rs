//! NATS JetStream source: a durable pull consumer on an existing stream, shared by every Herald
//! node configured with the same consumer name (JetStream hands each message to one of them),
//! explicit acknowledgement after publish. A message not acknowledged within `ack_wait` (the
//! node died, the connection dropped) is delivered again by the server.
//!
//! The consumer is created when missing (with `filter_subject`, `ack_wait`, and
//! `max_ack_pending`); an existing one is used as it is. The stream must exist: it is the
//! application's.
//!
//! A message's attributes: `subject`, `stream`, `header.NAME` (first value); its id is the
//! stream sequence (the same on every redelivery).
//!
//! May touch: the configured NATS server (its stream's consumer only).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::message::Acker;
use async_trait::async_trait;
use futures::StreamExt;

use crate::mapping::Received;
use crate::source::{Outcome, Source, SourceError};

/// What a JetStream source reads.
#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// `nats://host:port` (several, comma-separated, for a cluster).
    pub url: String,
    pub stream: String,
    /// The durable consumer's name, the same on every node that shares the work.
    pub consumer: String,
    /// Only subjects matching this (empty: the whole stream).
    pub filter_subject: String,
    /// How long the server waits for an acknowledgement before delivering again.
    pub ack_wait: Duration,
    /// Unacknowledged messages the server lets the consumer have at once.
    pub max_ack_pending: i64,
    /// How the connection is named on the broker (to find it in its client list).
    pub connection_name: String,
}

/// How long one pull waits for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// How long a call may take beyond that before the connection is taken for lost.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The attributes templates may name.
pub const ATTRIBUTES: &[&str] = &["subject", "stream", "header.", "id"];

pub struct NatsSource {
    config: NatsConfig,
    connection: Option<(async_nats::Client, PullConsumer)>,
    /// Set when the client reports its connection lost. The client would reconnect by
    /// itself; the source reports the loss instead, so every source reconnects the same way
    /// (the loop's backoff, logs and `reconnects` count).
    lost: Arc<AtomicBool>,
}

impl NatsSource {
    pub fn new(config: NatsConfig) -> Self {
        Self {
            config,
            connection: None,
            lost: Arc::new(AtomicBool::new(false)),
        }
    }

    fn connected(&self) -> Result<&(async_nats::Client, PullConsumer), SourceError> {
        self.connection.as_ref().ok_or(SourceError::NotConnected)
    }
}

#[async_trait]
impl Source for NatsSource {
    type Receipt = Acker;

    async fn connect(&mut self) -> Result<(), SourceError> {
        let fail = |e: &dyn std::fmt::Display| SourceError::Connect(e.to_string());
        let lost = Arc::new(AtomicBool::new(false));
        self.lost = lost.clone();
        let client = async_nats::ConnectOptions::new()
            .event_callback(move |event| {
                let lost = lost.clone();
                async move {
                    if matches!(event, async_nats::Event::Disconnected) {
                        lost.store(true, Ordering::SeqCst);
                    }
                }
            })
            .connection_timeout(Duration::from_secs(5))
            .name(&self.config.connection_name)
            .connect(self.config.url.as_str())
            .await
            .map_err(|e| fail(&e))?;
        let jetstream = async_nats::jetstream::new(client.clone());
        let stream = jetstream
            .get_stream(&self.config.stream)
            .await
            .map_err(|e| fail(&format!("stream {:?}: {e}", self.config.stream)))?;
        let consumer: PullConsumer = stream
            .get_or_create_consumer(
                &self.config.consumer,
                pull::Config {
                    durable_name: Some(self.config.consumer.clone()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: self.config.ack_wait,
                    max_ack_pending: self.config.max_ack_pending,
                    filter_subject: self.config.filter_subject.clone(),
                    ..pull::Config::default()
                },
            )
            .await
            .map_err(|e| fail(&format!("consumer {:?}: {e}", self.config.consumer)))?;
        self.connection = Some((client, consumer));
        Ok(())
    }

    async fn receive(&mut self, max: usize) -> Result<Vec<(Acker, Received)>, SourceError> {
        // The server ends a pull after `expires`; without a connection nothing would end it.
        tokio::time::timeout(PULL_EXPIRES + CALL_TIMEOUT, self.pull(max))
            .await
            .map_err(|_| SourceError::Receive("the pull did not end in time".into()))?
    }

    async fn settle(&mut self, settled: Vec<(Acker, Outcome)>) -> Result<(), SourceError> {
        let (client, _) = self.connected()?;
        let fail = |e: &dyn std::fmt::Display| SourceError::Settle(e.to_string());
        let acks = async {
            // Rejected messages are acknowledged too: JetStream would only deliver them again.
            for (acker, _) in settled {
                acker.ack().await.map_err(|e| fail(&e))?;
            }
            client.flush().await.map_err(|e| fail(&e))
        };
        tokio::time::timeout(CALL_TIMEOUT, acks)
            .await
            .map_err(|_| SourceError::Settle("acknowledgements not flushed in time".into()))?
    }

    async fn lag(&mut self) -> Option<u64> {
        let (_, consumer) = self.connection.as_ref()?;
        let info = tokio::time::timeout(CALL_TIMEOUT, consumer.get_info())
            .await
            .ok()?
            .ok()?;
        Some(info.num_pending + info.num_ack_pending as u64)
    }

    async fn disconnect(&mut self) {
        // Unacknowledged messages come back after `ack_wait`.
        self.connection = None;
    }
}

impl NatsSource {
    async fn pull(&mut self, max: usize) -> Result<Vec<(Acker, Received)>, SourceError> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(SourceError::Receive("the connection was lost".into()));
        }
        let (_, consumer) = self.connected()?;
        let fail = |e: &dyn std::fmt::Display| SourceError::Receive(e.to_string());
        let mut batch = consumer
            .batch()
            .max_messages(max.max(1))
            .expires(PULL_EXPIRES)
            .messages()
            .await
            .map_err(|e| fail(&e))?;
        let mut received = Vec::new();
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| fail(&e))?;
            let sequence = message.info().map_err(|e| fail(&e))?.stream_sequence;
            let (message, acker) = message.split();
            let mut out = Received::new(message.payload)
                .with("subject", message.subject.as_str())
                .with("stream", self.config.stream.clone())
                .with_id(sequence.to_string());
            if let Some(headers) = &message.headers {
                for (name, values) in headers.iter() {
                    if let Some(value) = values.first() {
                        out.attributes
                            .push((format!("header.{name}"), value.as_str().to_owned()));
                    }
                }
            }
            received.push((acker, out));
        }
        Ok(received)
    }
}
