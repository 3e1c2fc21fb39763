//! The Kafka sink: each publication becomes a record on one topic, keyed by its channel (the
//! Java client's murmur2 partitioner, so every producer puts a channel in the same partition
//! and a channel's order holds there), with Herald's metadata as record headers.
//!
//! Acknowledged means: the partition leader answered the produce with `acks=all` (every
//! in-sync replica has it), reported by librdkafka's delivery report.
//!
//! The producer is not idempotent by default: a channel's order comes from the outbound
//! queue (one record of a channel in flight at a time, the next sent only after the ack), and
//! a record written twice — an ack lost, then a retry — is the at-least-once duplicate
//! consumers drop by `herald-id` anyway. Idempotence would add fatal producer states that
//! need a new producer, and tansu 0.6 (the broker the tests run) panics on an idempotent
//! produce after it restarts; `kafka_options` can turn it on.
//!
//! Owns: one librdkafka producer per sink (it keeps its own connections and reconnects).
//! May touch: the Kafka brokers named in the sink's URL.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::{Sink, SinkError, SinkMessage};

/// Where and how a Kafka sink publishes.
#[derive(Clone, Debug)]
pub struct KafkaSinkConfig {
    /// Bootstrap servers, `host:port[,host:port…]` (a `kafka://` prefix is allowed).
    pub brokers: String,
    pub topic: String,
    /// How long one record may take to be acknowledged, librdkafka's retries included.
    pub timeout: Duration,
    /// More librdkafka properties (`security.protocol`, `sasl.*`, `compression.type`, …);
    /// they override Herald's defaults.
    pub options: BTreeMap<String, String>,
}

pub struct KafkaSink {
    producer: FutureProducer,
    topic: String,
    timeout: Duration,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// The bootstrap list from a sink URL: `kafka://a:9092,b:9092` or `a:9092,b:9092`.
pub fn bootstrap_servers(url: &str) -> Result<String, String> {
    let list = url
        .strip_prefix("kafka://")
        .unwrap_or(url)
        .trim_end_matches('/');
    if list.is_empty() {
        return Err("no Kafka broker address".into());
    }
    for server in list.split(',') {
        let (host, port) = server
            .rsplit_once(':')
            .ok_or_else(|| format!("{server:?} is not host:port"))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(format!("{server:?} is not host:port"));
        }
    }
    Ok(list.to_string())
}

impl KafkaSink {
    /// Builds the producer (no connection yet: librdkafka connects on first use and keeps
    /// reconnecting while brokers are down).
    pub fn new(config: &KafkaSinkConfig) -> Result<Self, String> {
        let brokers = bootstrap_servers(&config.brokers)?;
        let timeout_ms = config.timeout.as_millis().max(1).to_string();
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", brokers)
            .set("acks", "all")
            .set("enable.idempotence", "false")
            // The Java client's default: a channel lands on the same partition whoever
            // produces it.
            .set("partitioner", "murmur2_random")
            .set("message.timeout.ms", &timeout_ms)
            .set("linger.ms", "1")
            .set("reconnect.backoff.max.ms", "2000")
            .set("client.id", "herald");
        for (key, value) in &config.options {
            client.set(key, value);
        }
        let producer: FutureProducer = client
            .create()
            .map_err(|e| format!("cannot create the Kafka producer: {e}"))?;
        Ok(Self {
            producer,
            topic: config.topic.clone(),
            timeout: config.timeout,
        })
    }
}

#[async_trait]
impl Sink for KafkaSink {
    async fn publish(&self, id: &str, message: &SinkMessage) -> Result<String, SinkError> {
        let mut headers = OwnedHeaders::new();
        for (key, value) in message.headers(id) {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        headers = headers.insert(Header {
            key: "content-type",
            value: Some(message.content_type().as_bytes()),
        });
        let record = FutureRecord::to(&self.topic)
            .key(message.channel.as_bytes())
            .payload(message.data.as_ref())
            .headers(headers)
            .timestamp(i64::try_from(message.time_ms).unwrap_or(i64::MAX));
        // The queue timeout bounds waiting for room in librdkafka's local queue; the
        // delivery itself is bounded by `message.timeout.ms`.
        match self.producer.send(record, self.timeout).await {
            Ok(delivery) => Ok(format!(
                "partition {} offset {}",
                delivery.partition, delivery.offset
            )),
            Err((error, _)) => {
                if let Some((code, reason)) = self.producer.client().fatal_error() {
                    // Only with idempotence turned on in `kafka_options`: the producer stays
                    // broken until Herald restarts; the jobs wait.
                    tracing::error!(?code, %reason, topic = %self.topic, "Kafka producer failed fatally");
                }
                Err(classify(error))
            }
        }
    }
}

fn classify(error: KafkaError) -> SinkError {
    match error.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage,
        ) => SinkError::Rejected(format!("Kafka refused the record: {error}")),
        // Everything else (brokers down, an unknown topic, missing rights) concerns every
        // record alike and can be fixed while the jobs wait.
        _ => SinkError::Unavailable(format!("Kafka: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_servers_accept_a_list_with_or_without_scheme() {
        assert_eq!(
            bootstrap_servers("kafka://a:9092,b:9093").as_deref(),
            Ok("a:9092,b:9093")
        );
        assert_eq!(
            bootstrap_servers("127.0.0.1:9092").as_deref(),
            Ok("127.0.0.1:9092")
        );
        assert!(bootstrap_servers("").is_err());
        assert!(bootstrap_servers("kafka://host").is_err());
        assert!(bootstrap_servers("host:notaport").is_err());
    }
}
