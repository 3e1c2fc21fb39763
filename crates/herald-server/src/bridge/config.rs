//! `[[sources]]`: bridges in — brokers and tables whose messages become publications. One
//! flat table per source: the keys its `kind` uses (the others must stay unset), the mapping,
//! and how the loop runs. Checks here need nothing built; [`super::build_sources`] builds.

use std::collections::BTreeMap;

use herald_core::duration::HumanDuration;
use serde::{Deserialize, Serialize};

/// The brokers a source can read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A NATS JetStream durable pull consumer.
    #[default]
    Nats,
    /// A RabbitMQ (AMQP 0-9-1) queue.
    Rabbitmq,
    /// A Redis stream, through a consumer group.
    Redis,
    /// Kafka topics, through a consumer group.
    Kafka,
    /// A PostgreSQL outbox table.
    Postgres,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nats => "nats",
            Self::Rabbitmq => "rabbitmq",
            Self::Redis => "redis",
            Self::Kafka => "kafka",
            Self::Postgres => "postgres",
        }
    }
}

/// How a source's messages become publications (see `docs/integrations.md`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MappingConfig {
    /// Channel template (`"sensors:{subject.1}"`). Unset: each message is a JSON envelope
    /// naming its channel (for `postgres`, unset means `"{column.channel}"`).
    pub channel: Option<String>,
    /// Template of the idempotency key when the message does not carry one (prefixed with
    /// the source's name); default `"{id}"`, the broker's own message id.
    pub idempotency_key: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// Unique; labels metrics and logs, and prefixes derived idempotency keys.
    pub name: String,
    pub kind: SourceKind,
    pub enabled: bool,
    /// `nats://…`, `amqp://…`, `redis://…`, `kafka://host:port[,host:port…]`, `postgres://…`
    /// (with libpq's `sslmode` and `sslrootcert`, docs/integrations.md).
    pub url: String,
    /// nats: the JetStream stream (must exist). redis: the stream key.
    pub stream: String,
    /// nats: the durable consumer's name; redis, kafka: the consumer group. Default `herald`;
    /// the same on every node that shares the work.
    pub consumer: String,
    /// nats: only these subjects of the stream (empty: all).
    pub subject: String,
    /// nats: how long an unacknowledged message waits before redelivery.
    pub ack_wait: HumanDuration,
    /// rabbitmq: the queue (must exist).
    pub queue: String,
    /// rabbitmq: unacknowledged deliveries at once; nats: `max_ack_pending` of a new
    /// consumer. Default: twice `batch`.
    pub prefetch: Option<u16>,
    /// redis: the entry field holding the body.
    pub body_field: String,
    /// redis, kafka: where a new group starts, `$` (new entries) or `0` (the whole
    /// stream; Kafka's `earliest`).
    pub start: String,
    /// kafka: the topics (must exist).
    pub topics: Vec<String>,
    /// kafka: how often the offsets of published messages are committed (and always before
    /// partitions are handed to another node, and at stop).
    pub commit_interval: HumanDuration,
    /// kafka: more librdkafka consumer properties (`security.protocol`, `sasl.*`,
    /// `session.timeout.ms`, …); the offset and group settings Herald relies on are refused.
    pub kafka_options: BTreeMap<String, String>,
    /// redis: entries another consumer has held unacknowledged this long are claimed.
    pub claim_idle: HumanDuration,
    /// postgres: the outbox table (`name` or `schema.name`).
    pub table: String,
    /// postgres: the `LISTEN` channel its trigger notifies (default: the table's name).
    pub notify_channel: String,
    /// postgres: how often the table is read without a notification.
    pub poll_interval: HumanDuration,
    /// Most messages received and published at once.
    pub batch: usize,
    /// First reconnect delay; doubles (with jitter) up to `reconnect_max`.
    pub reconnect_base: HumanDuration,
    pub reconnect_max: HumanDuration,
    pub mapping: MappingConfig,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            kind: SourceKind::default(),
            enabled: true,
            url: String::new(),
            stream: String::new(),
            consumer: "herald".into(),
            subject: String::new(),
            ack_wait: HumanDuration::from_secs(30),
            queue: String::new(),
            prefetch: None,
            body_field: "data".into(),
            start: "$".into(),
            topics: Vec::new(),
            commit_interval: HumanDuration::from_secs(1),
            kafka_options: BTreeMap::new(),
            claim_idle: HumanDuration::from_secs(30),
            table: String::new(),
            notify_channel: String::new(),
            poll_interval: HumanDuration::from_secs(1),
            batch: 100,
            reconnect_base: HumanDuration(std::time::Duration::from_millis(200)),
            reconnect_max: HumanDuration::from_secs(10),
            mapping: MappingConfig::default(),
        }
    }
}

impl SourceConfig {
    /// `max_ack_pending` / prefetch: `prefetch`, or twice the batch.
    pub fn prefetch(&self) -> u16 {
        self.prefetch
            .unwrap_or_else(|| u16::try_from(self.batch.saturating_mul(2)).unwrap_or(u16::MAX))
    }

    /// The outbox table, default `herald_outbox`.
    pub fn table(&self) -> &str {
        if self.table.is_empty() {
            herald_bridge::outbox::DEFAULT_TABLE
        } else {
            &self.table
        }
    }

    /// The outbox's notify channel, default the table's name (`.` → `_`).
    pub fn notify_channel(&self) -> String {
        if self.notify_channel.is_empty() {
            herald_bridge::outbox::default_notify_channel(self.table())
        } else {
            self.notify_channel.clone()
        }
    }

    /// The channel template, with the outbox's default.
    pub fn channel_template(&self) -> Option<&str> {
        match (&self.mapping.channel, self.kind) {
            (Some(template), _) => Some(template),
            (None, SourceKind::Postgres) => Some("{column.channel}"),
            (None, _) => None,
        }
    }

    /// The rules that need nothing built.
    pub fn validate(&self) -> Result<(), String> {
        let at = format!("sources {:?}", self.name);
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(format!(
                "sources: name {:?} must be set (letters, digits, `_`, `-`, `.`)",
                self.name
            ));
        }
        let scheme = match self.kind {
            SourceKind::Nats => &["nats://", "tls://"][..],
            SourceKind::Rabbitmq => &["amqp://", "amqps://"][..],
            SourceKind::Redis => &["redis://", "rediss://", "unix://"][..],
            SourceKind::Kafka => &["kafka://"][..],
            SourceKind::Postgres => &["postgres://", "postgresql://"][..],
        };
        if !scheme.iter().any(|s| self.url.starts_with(s)) {
            return Err(format!(
                "{at}: url must start with {} for kind {:?}",
                scheme.join(" or "),
                self.kind.as_str()
            ));
        }
        if matches!(self.kind, SourceKind::Postgres) {
            herald_bridge::pg_tls::split_url(&self.url).map_err(|e| format!("{at}: url: {e}"))?;
        }
        if self.batch == 0 || self.batch > 10_000 {
            return Err(format!("{at}: batch must be 1 to 10000"));
        }
        if self.prefetch == Some(0) {
            return Err(format!("{at}: prefetch must be above 0"));
        }
        if self.reconnect_base.as_duration().is_zero()
            || self.reconnect_max.as_duration() < self.reconnect_base.as_duration()
        {
            return Err(format!(
                "{at}: reconnect_base must be above 0 and at most reconnect_max"
            ));
        }
        let set = |value: &str| !value.is_empty();
        let topics = !self.topics.is_empty();
        let kafka_options = !self.kafka_options.is_empty();
        // (key, whether it is set): keys the kind needs, and keys it does not use.
        type Keys<'a> = &'a [(&'static str, bool)];
        let (needs, unused): (Keys<'_>, Keys<'_>) = match self.kind {
            SourceKind::Nats => (
                &[("stream", set(&self.stream))],
                &[
                    ("queue", set(&self.queue)),
                    ("table", set(&self.table)),
                    ("topics", topics),
                    ("kafka_options", kafka_options),
                ],
            ),
            SourceKind::Rabbitmq => (
                &[("queue", set(&self.queue))],
                &[
                    ("stream", set(&self.stream)),
                    ("subject", set(&self.subject)),
                    ("table", set(&self.table)),
                    ("topics", topics),
                    ("kafka_options", kafka_options),
                ],
            ),
            SourceKind::Redis => (
                &[("stream", set(&self.stream))],
                &[
                    ("queue", set(&self.queue)),
                    ("subject", set(&self.subject)),
                    ("table", set(&self.table)),
                    ("topics", topics),
                    ("kafka_options", kafka_options),
                ],
            ),
            SourceKind::Kafka => (
                &[("topics", topics)],
                &[
                    ("stream", set(&self.stream)),
                    ("queue", set(&self.queue)),
                    ("subject", set(&self.subject)),
                    ("table", set(&self.table)),
                ],
            ),
            SourceKind::Postgres => (
                &[],
                &[
                    ("stream", set(&self.stream)),
                    ("queue", set(&self.queue)),
                    ("subject", set(&self.subject)),
                    ("topics", topics),
                    ("kafka_options", kafka_options),
                ],
            ),
        };
        if let Some((key, _)) = needs.iter().find(|(_, is_set)| !is_set) {
            return Err(format!("{at}: kind {:?} needs `{key}`", self.kind.as_str()));
        }
        if let Some((key, _)) = unused.iter().find(|(_, is_set)| *is_set) {
            return Err(format!(
                "{at}: `{key}` is not used by kind {:?}",
                self.kind.as_str()
            ));
        }
        if matches!(self.kind, SourceKind::Redis | SourceKind::Kafka)
            && !matches!(self.start.as_str(), "$" | "0")
        {
            return Err(format!("{at}: start must be \"$\" or \"0\""));
        }
        if self.kind == SourceKind::Kafka {
            self.validate_kafka(&at)?;
        }
        if self.consumer.is_empty() {
            return Err(format!("{at}: consumer must not be empty"));
        }
        Ok(())
    }
}

impl SourceConfig {
    fn validate_kafka(&self, at: &str) -> Result<(), String> {
        herald_outbound::sink::kafka::bootstrap_servers(&self.url)
            .map_err(|e| format!("{at}: url: {e}"))?;
        if let Some(topic) = self.topics.iter().find(|t| {
            t.is_empty()
                || t.len() > 249
                || !t
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        }) {
            return Err(format!(
                "{at}: topic {topic:?} is not a Kafka topic name (letters, digits, `_`, `-`, `.`)"
            ));
        }
        if let Some(key) = self
            .kafka_options
            .keys()
            .find(|key| herald_bridge::kafka::RESERVED_OPTIONS.contains(&key.as_str()))
        {
            return Err(format!(
                "{at}: kafka_options may not set {key:?} (Herald manages the group and its offsets)"
            ));
        }
        if self.commit_interval.as_duration() < std::time::Duration::from_millis(10) {
            return Err(format!("{at}: commit_interval must be at least 10ms"));
        }
        Ok(())
    }
}

/// Checks every source, and that names are unique.
pub fn validate(sources: &[SourceConfig]) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    for source in sources {
        source.validate()?;
        if !names.insert(source.name.as_str()) {
            return Err(format!("sources: name {:?} is used twice", source.name));
        }
    }
    Ok(())
}
