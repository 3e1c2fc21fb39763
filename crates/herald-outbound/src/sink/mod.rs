//! Sinks: publications delivered to brokers (Kafka, RabbitMQ, NATS) through the durable
//! outbound queue.
//!
//! Owns: the job payload a sink delivers ([`SinkMessage`]), the [`Sink`] port every broker
//! module implements (publish, return once the broker acknowledged), the [`SinkHandler`] that
//! runs a sink's jobs for the queue's workers, per-sink counters, and the routing templates
//! (`{channel}` in a routing key or subject).
//!
//! How delivery is ordered and made durable is the queue's contract, not this module's: the
//! server's publish observer enqueues one job per (sink, publication) with
//! `order_key = "<sink>:<channel>"` and `id = "<sink>:<channel>:<epoch>:<offset>"` (see
//! [`job_id`]), so a channel's jobs run one at a time in enqueue order and a re-enqueued
//! publication is the same job. A job carries its publication (not a pointer into history):
//! history may be pruned by size or age before a broker that was down for a while comes
//! back, and the queue must not lose what it acknowledged.
//!
//! May touch: the network (the brokers, through the modules below).

pub mod kafka;
pub mod nats;
pub mod rabbitmq;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use herald_core::outbound::Job;
use serde::{Deserialize, Serialize};

use crate::worker::{JobHandler, JobResult};

/// The job kind of sink `name`'s deliveries (one worker loop per sink, so a broker that is
/// down never holds up another).
pub fn job_kind(name: &str) -> String {
    format!("sink.{name}")
}

/// The queue key that keeps a channel's deliveries to one sink in enqueue order.
pub fn order_key(sink: &str, channel: &str) -> String {
    format!("{sink}:{channel}")
}

/// The job id of a stored publication's delivery to `sink`: enqueueing it again adds nothing.
/// Also the message id the brokers see (AMQP `message_id`, NATS `Nats-Msg-Id`), so a
/// consumer or JetStream can drop a redelivery.
pub fn job_id(sink: &str, channel: &str, epoch: &str, offset: u64) -> String {
    format!("{sink}:{channel}:{epoch}:{offset}")
}

/// A publication on its way to a broker: the job's payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkMessage {
    pub channel: String,
    /// The channel stream's epoch and the publication's offset in it (offset 0 and an empty
    /// epoch for a publication that was not stored in history).
    pub epoch: String,
    pub offset: u64,
    /// When Herald accepted it (milliseconds since the Unix epoch).
    pub time_ms: u64,
    /// The publication's data, as published.
    #[serde(with = "base64_bytes")]
    pub data: Bytes,
    /// True when `data` is binary rather than JSON text.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub binary: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

impl SinkMessage {
    pub fn to_payload(&self) -> Bytes {
        // A struct of strings, numbers and a map of strings always serializes.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    pub fn from_payload(payload: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(payload).map_err(|e| format!("bad sink job payload: {e}"))
    }

    pub fn content_type(&self) -> &'static str {
        if self.binary {
            "application/octet-stream"
        } else {
            "application/json"
        }
    }

    /// The metadata every broker gets as message headers, so a consumer can order, dedupe
    /// and route without parsing the body.
    pub fn headers(&self, id: &str) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            (HEADER_ID, id.to_string()),
            (HEADER_CHANNEL, self.channel.clone()),
            (HEADER_OFFSET, self.offset.to_string()),
            (HEADER_EPOCH, self.epoch.clone()),
            (HEADER_TIME, self.time_ms.to_string()),
        ];
        if !self.tags.is_empty() {
            // A map of strings always serializes.
            headers.push((
                HEADER_TAGS,
                serde_json::to_string(&self.tags).unwrap_or_default(),
            ));
        }
        headers
    }
}

pub const HEADER_ID: &str = "herald-id";
pub const HEADER_CHANNEL: &str = "herald-channel";
pub const HEADER_OFFSET: &str = "herald-offset";
pub const HEADER_EPOCH: &str = "herald-epoch";
pub const HEADER_TIME: &str = "herald-time-ms";
pub const HEADER_TAGS: &str = "herald-tags";

mod base64_bytes {
    use base64::Engine as _;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Bytes, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Bytes, D::Error> {
        let text = String::deserialize(deserializer)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map(Bytes::from)
            .map_err(serde::de::Error::custom)
    }
}

/// Why a publish to a broker did not happen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// The broker is unreachable, timed out or refused for now: retried with backoff (later
    /// jobs of the channel wait, so order holds).
    #[error("{0}")]
    Unavailable(String),
    /// This message can never be published (a subject or routing key the broker refuses):
    /// a dead letter, and the channel's next job goes on.
    #[error("{0}")]
    Rejected(String),
}

/// One broker destination.
#[async_trait]
pub trait Sink: Send + Sync + 'static {
    /// Publishes `message` under message id `id` and returns once the broker acknowledged it
    /// (what that means per broker is in its module); the result is kept as the job's detail
    /// (a partition and offset, a stream sequence).
    async fn publish(&self, id: &str, message: &SinkMessage) -> Result<String, SinkError>;
}

/// Counters of one sink, exported as metrics.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Publications the broker acknowledged.
    pub delivered: AtomicU64,
    /// Attempts that failed and will be retried (broker down, timeout).
    pub retried: AtomicU64,
    /// Jobs given up: rejected by the broker or undecodable.
    pub rejected: AtomicU64,
}

/// Runs a sink's jobs: decode the publication, publish it, report.
pub struct SinkHandler {
    pub sink: Arc<dyn Sink>,
    pub stats: Arc<SinkStats>,
    /// The most one run may take, connecting included: kept below the worker's lease, so a
    /// job is never claimed again while its first run still goes on (which could reorder a
    /// channel).
    pub timeout: Duration,
}

#[async_trait]
impl JobHandler for SinkHandler {
    async fn run(&self, job: &Job) -> JobResult {
        let message = match SinkMessage::from_payload(&job.payload) {
            Ok(message) => message,
            Err(reason) => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                return JobResult::Failed { reason };
            }
        };
        let published = tokio::time::timeout(self.timeout, self.sink.publish(&job.id, &message))
            .await
            .unwrap_or_else(|_| {
                Err(SinkError::Unavailable(format!(
                    "no acknowledgement within {:?}",
                    self.timeout
                )))
            });
        match published {
            Ok(detail) => {
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                JobResult::Done { detail }
            }
            Err(SinkError::Unavailable(reason)) => {
                self.stats.retried.fetch_add(1, Ordering::Relaxed);
                JobResult::Retry {
                    reason,
                    after: None,
                }
            }
            Err(SinkError::Rejected(reason)) => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                JobResult::Failed { reason }
            }
        }
    }
}

/// A routing key or subject with `{channel}`, `{namespace}` (the part before `:`, empty
/// without one) and `{name}` (the part after it, or the whole channel) filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<TemplatePart>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TemplatePart {
    Text(String),
    Channel,
    Namespace,
    Name,
}

impl Template {
    /// Parses `text`; an unknown or unclosed `{…}` is an error naming it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TemplatePart::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("{text:?}: unclosed '{{'"))?;
            parts.push(match &after[..close] {
                "channel" => TemplatePart::Channel,
                "namespace" => TemplatePart::Namespace,
                "name" => TemplatePart::Name,
                other => {
                    return Err(format!(
                        "{text:?}: unknown placeholder {{{other}}} (known: {{channel}}, \
                         {{namespace}}, {{name}})"
                    ));
                }
            });
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Text(rest.to_string()));
        }
        Ok(Self { parts })
    }

    pub fn render(&self, channel: &str) -> String {
        let (namespace, name) = match channel.split_once(':') {
            Some((namespace, name)) => (namespace, name),
            None => ("", channel),
        };
        let mut out = String::with_capacity(channel.len() + 16);
        for part in &self.parts {
            out.push_str(match part {
                TemplatePart::Text(text) => text,
                TemplatePart::Channel => channel,
                TemplatePart::Namespace => namespace,
                TemplatePart::Name => name,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_channel_namespace_and_name() {
        let template = Template::parse("herald.{namespace}.{name}").expect("parses");
        assert_eq!(template.render("orders:42"), "herald.orders.42");
        assert_eq!(template.render("plain"), "herald..plain");
        let whole = Template::parse("{channel}").expect("parses");
        assert_eq!(whole.render("a:b:c"), "a:b:c");
        assert_eq!(
            Template::parse("fixed").expect("parses").render("x"),
            "fixed"
        );
    }

    #[test]
    fn bad_templates_name_the_problem() {
        let unknown = Template::parse("x.{chan}").expect_err("unknown placeholder");
        assert!(unknown.contains("{chan}"), "{unknown}");
        let unclosed = Template::parse("x.{channel").expect_err("unclosed");
        assert!(unclosed.contains("unclosed"), "{unclosed}");
    }

    #[test]
    fn payload_round_trips_binary_data_and_tags() {
        let message = SinkMessage {
            channel: "orders:1".into(),
            epoch: "e1".into(),
            offset: 7,
            time_ms: 1_700_000_000_000,
            data: Bytes::from_static(&[0, 159, 146, 150]),
            binary: true,
            tags: BTreeMap::from([("k".to_string(), "v".to_string())]),
        };
        let decoded = SinkMessage::from_payload(&message.to_payload()).expect("decodes");
        assert_eq!(decoded, message);
        assert!(SinkMessage::from_payload(b"{").is_err());
    }

    #[test]
    fn ids_and_keys_name_sink_channel_and_position() {
        assert_eq!(job_id("k", "orders:1", "ep", 5), "k:orders:1:ep:5");
        assert_eq!(order_key("k", "orders:1"), "k:orders:1");
        assert_eq!(job_kind("k"), "sink.k");
    }
}
