//! `[[sinks]]`: where publications go out to brokers — one entry per destination (a Kafka
//! topic, a RabbitMQ exchange, a NATS subject), the channels it takes, and how its outbound
//! queue worker retries.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use herald_core::duration::HumanDuration;
use herald_outbound::sink::Template;
use herald_outbound::sink::nats::NatsMode;
use serde::{Deserialize, Serialize};

/// Which broker a sink publishes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    Kafka,
    Rabbitmq,
    Nats,
}

impl SinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Kafka => "kafka",
            SinkKind::Rabbitmq => "rabbitmq",
            SinkKind::Nats => "nats",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// Names the sink in job ids, metrics and logs: letters, digits, `-` and `_`. Renaming a
    /// sink starts it afresh (jobs queued under the old name are not taken over).
    pub name: String,
    /// `kafka`, `rabbitmq` or `nats`.
    pub kind: Option<SinkKind>,
    /// Off: nothing is queued for it, and its queued jobs wait.
    pub enabled: bool,
    /// Kafka: `host:port[,host:port…]` (or `kafka://…`); RabbitMQ: `amqp://user:pass@host/vhost`;
    /// NATS: `nats://host:port`.
    pub url: String,
    /// Channel patterns (`*` matches any run of characters); a publication on a matching
    /// channel is delivered.
    pub channels: Vec<String>,
    /// Kafka: the topic (the record key is the channel).
    pub topic: String,
    /// RabbitMQ: the exchange (`""`: the default exchange).
    pub exchange: String,
    /// RabbitMQ: the routing key, with `{channel}`, `{namespace}` and `{name}`.
    pub routing_key: String,
    /// NATS: the subject, with `{channel}`, `{namespace}` and `{name}`.
    pub subject: String,
    /// NATS: `auto` (JetStream when a stream captures the subject, else core), `jetstream`
    /// or `core`.
    pub nats_mode: NatsMode,
    /// Kafka: more librdkafka producer properties (`security.protocol`, `sasl.username`, …).
    pub kafka_options: BTreeMap<String, String>,
    /// How long one publish may take, until the broker acknowledged it.
    pub timeout: HumanDuration,
    /// Deliveries running at once on this node (one per channel at most: a channel's
    /// deliveries go in order).
    pub concurrency: usize,
    /// Attempts before a delivery becomes a dead letter; 0 retries for ever (a dead letter
    /// lets the channel's next publication go first, so order holds only without them).
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt (with jitter) up to `retry_max`.
    pub retry_base: HumanDuration,
    pub retry_max: HumanDuration,
    /// How long a claimed delivery belongs to the node that claimed it: after a crash, the
    /// deliveries in flight are retried once this runs out. Above `timeout`.
    pub lease: HumanDuration,
    /// How often an idle worker looks for deliveries other nodes queued.
    pub poll_interval: HumanDuration,
    /// Most deliveries claimed at once.
    pub batch: usize,
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            kind: None,
            enabled: true,
            url: String::new(),
            channels: Vec::new(),
            topic: String::new(),
            exchange: String::new(),
            routing_key: "{channel}".into(),
            subject: "{channel}".into(),
            nats_mode: NatsMode::Auto,
            kafka_options: BTreeMap::new(),
            timeout: HumanDuration::from_secs(10),
            concurrency: 64,
            max_attempts: 0,
            retry_base: HumanDuration(Duration::from_millis(500)),
            retry_max: HumanDuration::from_secs(30),
            lease: HumanDuration::from_secs(30),
            poll_interval: HumanDuration(Duration::from_millis(500)),
            batch: 64,
        }
    }
}

impl SinkConfig {
    /// The kind, once [`validate`] has checked there is one.
    pub fn kind(&self) -> SinkKind {
        self.kind.unwrap_or(SinkKind::Kafka)
    }

    /// Whether publications on `channel` go to this sink.
    pub fn takes(&self, channel: &str) -> bool {
        self.channels
            .iter()
            .any(|pattern| herald_core::node::glob_match(pattern, channel))
    }

    fn check(&self) -> Result<(), String> {
        let name = &self.name;
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid_name {
            return Err(format!(
                "name {name:?} must be 1-64 letters, digits, '-' or '_'"
            ));
        }
        let Some(kind) = self.kind else {
            return Err("kind is missing (kafka, rabbitmq or nats)".into());
        };
        if self.url.is_empty() {
            return Err("url is missing".into());
        }
        if self.channels.is_empty() || self.channels.iter().any(String::is_empty) {
            return Err("channels must list at least one non-empty pattern".into());
        }
        match kind {
            SinkKind::Kafka => {
                herald_outbound::sink::kafka::bootstrap_servers(&self.url)
                    .map_err(|e| format!("url: {e}"))?;
                if self.topic.is_empty() {
                    return Err("topic is missing".into());
                }
            }
            SinkKind::Rabbitmq => {
                Template::parse(&self.routing_key).map_err(|e| format!("routing_key: {e}"))?;
            }
            SinkKind::Nats => {
                Template::parse(&self.subject).map_err(|e| format!("subject: {e}"))?;
            }
        }
        if self.concurrency == 0 || self.batch == 0 {
            return Err("concurrency and batch must be at least 1".into());
        }
        if self.timeout.as_duration().is_zero() || self.poll_interval.as_duration().is_zero() {
            return Err("timeout and poll_interval must be above 0".into());
        }
        if self.lease.as_duration() <= self.timeout.as_duration() {
            return Err("lease must be longer than timeout".into());
        }
        if self.retry_base.as_duration().is_zero()
            || self.retry_max.as_duration() < self.retry_base.as_duration()
        {
            return Err("retry_base must be above 0 and at most retry_max".into());
        }
        Ok(())
    }
}

/// Checks every sink, naming the one at fault; names must be unique.
pub fn validate(sinks: &[SinkConfig]) -> Result<(), String> {
    let mut names = BTreeSet::new();
    for (index, sink) in sinks.iter().enumerate() {
        sink.check()
            .map_err(|e| format!("sinks[{index}] ({:?}): {e}", sink.name))?;
        if !names.insert(sink.name.as_str()) {
            return Err(format!(
                "sinks[{index}]: the name {:?} is used twice",
                sink.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kafka() -> SinkConfig {
        SinkConfig {
            name: "orders".into(),
            kind: Some(SinkKind::Kafka),
            url: "127.0.0.1:9092".into(),
            channels: vec!["orders:*".into()],
            topic: "orders".into(),
            ..SinkConfig::default()
        }
    }

    #[test]
    fn a_complete_sink_passes_and_matches_its_channels() {
        let sink = kafka();
        assert_eq!(validate(std::slice::from_ref(&sink)), Ok(()));
        assert!(sink.takes("orders:1"));
        assert!(!sink.takes("chat:1"));
    }

    #[test]
    fn each_mistake_is_named() {
        let cases: Vec<(SinkConfig, &str)> = vec![
            (
                SinkConfig {
                    name: "a:b".into(),
                    ..kafka()
                },
                "name",
            ),
            (
                SinkConfig {
                    kind: None,
                    ..kafka()
                },
                "kind",
            ),
            (
                SinkConfig {
                    topic: String::new(),
                    ..kafka()
                },
                "topic",
            ),
            (
                SinkConfig {
                    channels: vec![],
                    ..kafka()
                },
                "channels",
            ),
            (
                SinkConfig {
                    url: "nohostport".into(),
                    ..kafka()
                },
                "url",
            ),
            (
                SinkConfig {
                    kind: Some(SinkKind::Nats),
                    subject: "x.{nope}".into(),
                    ..kafka()
                },
                "subject",
            ),
            (
                SinkConfig {
                    lease: HumanDuration::from_secs(1),
                    ..kafka()
                },
                "lease",
            ),
        ];
        for (sink, word) in cases {
            let error = validate(&[sink]).expect_err(word);
            assert!(error.contains(word), "{word}: {error}");
        }
        let twice = validate(&[kafka(), kafka()]).expect_err("duplicate");
        assert!(twice.contains("twice"), "{twice}");
    }
}
