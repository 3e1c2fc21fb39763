//! Bridges in, on the server side: `[[sources]]` config ([`config`]), turning it into planned
//! sources without side effects ([`plan`], also what `check-config` runs), and the running
//! loops ([`Sources`]: started with the server, stopped before history is flushed, read by
//! the metrics). The loops themselves are `herald_bridge`'s.
//!
//! May touch: the brokers and databases the config names (through `herald_bridge`), the node.

pub mod config;

use std::sync::Arc;
use std::time::Duration;

use herald_bridge::amqp::{AmqpConfig, AmqpSource};
use herald_bridge::kafka::{KafkaConfig, KafkaSource};
use herald_bridge::nats::{NatsConfig, NatsSource};
use herald_bridge::outbox::{OutboxConfig, OutboxSource};
use herald_bridge::redis_streams::{RedisStreamConfig, RedisStreamSource};
use herald_bridge::{ConsumeConfig, Mapping, SourceHandle, SourceStats, spawn_source};
use herald_core::Node;
use herald_outbound::worker::Backoff;

use self::config::{SourceConfig, SourceKind};

/// A source built from config, not yet connected: starting it spawns its loop.
type Planned = Box<dyn FnOnce(Mapping, Node, ConsumeConfig) -> SourceHandle + Send>;

fn planned<S: herald_bridge::Source>(source: S) -> Planned {
    Box::new(move |mapping, node, consume| spawn_source(source, mapping, node, consume))
}

struct PlannedSource {
    source: Planned,
    mapping: Mapping,
    consume: ConsumeConfig,
}

/// Builds every enabled source without connecting: bad templates and names fail here.
/// `node_uid` makes per-node consumer names unique (Redis consumers, AMQP consumer tags).
fn plan(sources: &[SourceConfig], node_uid: &str) -> Result<Vec<PlannedSource>, String> {
    config::validate(sources)?;
    sources
        .iter()
        .filter(|source| source.enabled)
        .map(|source| plan_one(source, node_uid))
        .collect()
}

fn plan_one(config: &SourceConfig, node_uid: &str) -> Result<PlannedSource, String> {
    let at = |e: &dyn std::fmt::Display| format!("sources {:?}: {e}", config.name);
    let attributes = match config.kind {
        SourceKind::Nats => herald_bridge::nats::ATTRIBUTES,
        SourceKind::Rabbitmq => herald_bridge::amqp::ATTRIBUTES,
        SourceKind::Redis => herald_bridge::redis_streams::ATTRIBUTES,
        SourceKind::Kafka => herald_bridge::kafka::ATTRIBUTES,
        SourceKind::Postgres => herald_bridge::outbox::ATTRIBUTES,
    };
    let mapping = Mapping::new(
        &config.name,
        config.channel_template(),
        config.mapping.idempotency_key.as_deref(),
        attributes,
    )
    .map_err(|e| at(&e))?;
    let source = match config.kind {
        SourceKind::Nats => planned(NatsSource::new(NatsConfig {
            url: config.url.clone(),
            stream: config.stream.clone(),
            consumer: config.consumer.clone(),
            filter_subject: config.subject.clone(),
            ack_wait: config.ack_wait.as_duration(),
            max_ack_pending: i64::from(config.prefetch()),
            connection_name: connection_name(config),
        })),
        SourceKind::Rabbitmq => planned(AmqpSource::new(AmqpConfig {
            url: config.url.clone(),
            queue: config.queue.clone(),
            prefetch: config.prefetch(),
            consumer_tag: format!("herald-{node_uid}"),
            connection_name: connection_name(config),
        })),
        SourceKind::Redis => planned(RedisStreamSource::new(RedisStreamConfig {
            url: config.url.clone(),
            stream: config.stream.clone(),
            group: config.consumer.clone(),
            consumer: format!("herald-{node_uid}"),
            body_field: config.body_field.clone(),
            start: config.start.clone(),
            claim_idle: config.claim_idle.as_duration(),
            connection_name: connection_name(config),
        })),
        SourceKind::Kafka => planned(KafkaSource::new(KafkaConfig {
            brokers: herald_outbound::sink::kafka::bootstrap_servers(&config.url)
                .map_err(|e| at(&e))?,
            topics: config.topics.clone(),
            group: config.consumer.clone(),
            from_beginning: config.start == "0",
            commit_interval: config.commit_interval.as_duration(),
            client_id: connection_name(config),
            options: config.kafka_options.clone(),
        })),
        SourceKind::Postgres => planned(
            OutboxSource::new(OutboxConfig {
                url: config.url.clone(),
                table: config.table().to_owned(),
                notify_channel: config.notify_channel(),
                poll_interval: config.poll_interval.as_duration(),
                connection_name: connection_name(config),
            })
            .map_err(|e| at(&e))?,
        ),
    };
    let mut consume = ConsumeConfig::new(config.name.clone());
    consume.batch = config.batch;
    consume.backoff = Backoff {
        base: config.reconnect_base.as_duration(),
        max: config.reconnect_max.as_duration(),
        attempts: u32::MAX,
    };
    Ok(PlannedSource {
        source,
        mapping,
        consume,
    })
}

/// What a source's connection is called on its broker (`herald-source-<name>`), so operators
/// (and the tests) can find it in the broker's client list.
fn connection_name(config: &SourceConfig) -> String {
    format!("herald-source-{}", config.name)
}

/// Checks `[[sources]]` as far as it can without connecting (for `check-config`).
pub fn check(sources: &[SourceConfig]) -> Result<(), String> {
    plan(sources, "check").map(drop)
}

/// The server's sources: planned at build, running between [`Sources::start`] and
/// [`Sources::stop`].
pub struct Sources {
    planned: parking_lot::Mutex<Vec<PlannedSource>>,
    running: parking_lot::Mutex<Vec<SourceHandle>>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("running", &self.running.lock().len())
            .finish_non_exhaustive()
    }
}

impl Sources {
    /// Plans the enabled sources of `config` for the node `node_uid`.
    pub fn new(sources: &[SourceConfig], node_uid: &str) -> Result<Self, String> {
        Ok(Self {
            planned: parking_lot::Mutex::new(plan(sources, node_uid)?),
            running: parking_lot::Mutex::new(Vec::new()),
        })
    }

    /// Starts every planned source's loop (once; later calls start nothing).
    pub fn start(&self, node: &Node) {
        let planned = std::mem::take(&mut *self.planned.lock());
        let mut running = self.running.lock();
        for PlannedSource {
            source,
            mapping,
            consume,
        } in planned
        {
            running.push(source(mapping, node.clone(), consume));
        }
    }

    /// Stops every loop: each finishes publishing and settling its batch in flight, at most
    /// `timeout` (what it could not settle is delivered again later).
    pub async fn stop(&self, timeout: Duration) {
        let running = std::mem::take(&mut *self.running.lock());
        for handle in &running {
            handle.stop();
        }
        futures::future::join_all(running.into_iter().map(|h| h.join(timeout))).await;
    }

    /// Each running source's name and counters (for the metrics).
    pub fn stats(&self) -> Vec<(String, Arc<SourceStats>)> {
        self.running
            .lock()
            .iter()
            .map(|handle| (handle.name.clone(), handle.stats.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::config::{SourceConfig, SourceKind};
    use super::*;

    fn nats() -> SourceConfig {
        SourceConfig {
            name: "s".into(),
            kind: SourceKind::Nats,
            url: "nats://127.0.0.1:4222".into(),
            stream: "S".into(),
            ..SourceConfig::default()
        }
    }

    #[test]
    fn a_valid_source_plans_and_mistakes_are_named() {
        assert!(check(&[nats()]).is_ok());
        let error = |config: SourceConfig| check(&[config]).err().unwrap_or_default();
        assert!(
            error(SourceConfig {
                stream: String::new(),
                ..nats()
            })
            .contains("needs `stream`")
        );
        assert!(
            error(SourceConfig {
                queue: "q".into(),
                ..nats()
            })
            .contains("`queue` is not used")
        );
        assert!(
            error(SourceConfig {
                url: "amqp://x".into(),
                ..nats()
            })
            .contains("url must start")
        );
        assert!(
            error(SourceConfig {
                name: "a b".into(),
                ..nats()
            })
            .contains("name")
        );
        assert!(error(SourceConfig { batch: 0, ..nats() }).contains("batch"));
        let mut bad_template = nats();
        bad_template.mapping.channel = Some("x:{routing_key}".into());
        assert!(error(bad_template).contains("unknown placeholder {routing_key}"));
        let outbox = SourceConfig {
            kind: SourceKind::Postgres,
            url: "postgres://localhost/db".into(),
            stream: String::new(),
            table: "bad;name".into(),
            ..nats()
        };
        assert!(error(outbox).contains("not a usable name"));
        assert!(
            check(&[nats(), nats()])
                .err()
                .unwrap_or_default()
                .contains("used twice")
        );
        // Disabled sources are checked but not planned.
        let disabled = SourceConfig {
            enabled: false,
            ..nats()
        };
        assert!(
            plan(&[disabled], "n")
                .map(|p| p.is_empty())
                .unwrap_or(false)
        );
    }

    #[test]
    fn kafka_needs_topics_and_keeps_its_offset_settings() {
        let kafka = || SourceConfig {
            kind: SourceKind::Kafka,
            url: "kafka://127.0.0.1:9092,127.0.0.1:9093".into(),
            stream: String::new(),
            topics: vec!["clicks".into()],
            ..nats()
        };
        assert!(check(&[kafka()]).is_ok());
        let error = |config: SourceConfig| check(&[config]).err().unwrap_or_default();
        assert!(
            error(SourceConfig {
                topics: Vec::new(),
                ..kafka()
            })
            .contains("needs `topics`")
        );
        assert!(
            error(SourceConfig {
                url: "kafka://nohost".into(),
                ..kafka()
            })
            .contains("host:port")
        );
        assert!(
            error(SourceConfig {
                topics: vec!["bad topic".into()],
                ..kafka()
            })
            .contains("not a Kafka topic name")
        );
        assert!(
            error(SourceConfig {
                start: "latest".into(),
                ..kafka()
            })
            .contains("start must be")
        );
        let mut reserved = kafka();
        reserved
            .kafka_options
            .insert("enable.auto.offset.store".into(), "true".into());
        assert!(error(reserved).contains("may not set"));
        let mut allowed = kafka();
        allowed
            .kafka_options
            .insert("session.timeout.ms".into(), "6000".into());
        assert!(check(&[allowed]).is_ok());
        let mut on_nats = nats();
        on_nats.topics = vec!["t".into()];
        assert!(error(on_nats).contains("`topics` is not used"));
        let mut templated = kafka();
        templated.mapping.channel = Some("clicks:{key}-{header.region}-{partition}".into());
        assert!(check(&[templated]).is_ok());
    }

    #[test]
    fn the_outbox_defaults_to_the_channel_column() {
        let outbox = SourceConfig {
            kind: SourceKind::Postgres,
            url: "postgres://localhost/db".into(),
            stream: String::new(),
            ..nats()
        };
        assert_eq!(outbox.channel_template(), Some("{column.channel}"));
        assert_eq!(outbox.table(), "herald_outbox");
        assert_eq!(outbox.notify_channel(), "herald_outbox");
        assert_eq!(nats().channel_template(), None);
    }
}
