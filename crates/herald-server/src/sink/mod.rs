//! Sinks in the server: `[[sinks]]` config, the brokers' clients built from it, the publish
//! observer that queues one delivery per (sink, publication), and one outbound-queue worker
//! per sink.
//!
//! Delivery guarantees come from the queue (`herald_core::outbound`): the observer enqueues
//! before the publish call returns, so an acknowledged publication is durable in the queue;
//! a channel's deliveries to a sink share an `order_key` (one in flight, in enqueue order);
//! the job id `<sink>:<channel>:<epoch>:<offset>` makes a re-enqueue a no-op; a job is done
//! only once the broker acknowledged it, so a crash or a broker outage delays, never loses.
//!
//! Owns: [`SinkRuntime`] (the sinks and their worker tasks) and [`SinkObserver`].
//! May touch: the outbound queue it is given, the brokers through `herald_outbound::sink`.

pub mod config;
mod sequence;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use herald_core::device::PageRequest;
use herald_core::node::{PublishObserver, Published};
use herald_core::outbound::{JobState, NewJob, OutboundQueue, StatusFilter};
use herald_core::time::now_ms;
use herald_core::{ChannelName, HeraldError, NamespaceOptions, Payload, StreamPosition};
use herald_outbound::sink::kafka::{KafkaSink, KafkaSinkConfig};
use herald_outbound::sink::nats::{NatsSink, NatsSinkConfig};
use herald_outbound::sink::rabbitmq::{RabbitmqSink, RabbitmqSinkConfig};
use herald_outbound::sink::{
    Sink, SinkHandler, SinkMessage, SinkStats, Template, job_id, job_kind, order_key,
};
use herald_outbound::worker::{Backoff, Retry, Wakeup, WorkerConfig, run_worker};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use config::{SinkConfig, SinkKind};

/// One configured, enabled sink.
struct RunningSink {
    config: SinkConfig,
    sink: Arc<dyn Sink>,
    stats: Arc<SinkStats>,
}

/// The sinks and their workers.
pub struct SinkRuntime {
    queue: Arc<dyn OutboundQueue>,
    wakeup: Arc<Wakeup>,
    sinks: Vec<RunningSink>,
    sequence: sequence::ChannelSequence,
    /// Publications a sink should have had but that could not be queued (the queue failed).
    enqueue_errors: AtomicU64,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for SinkRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkRuntime")
            .field("sinks", &self.sinks.len())
            .finish_non_exhaustive()
    }
}

/// Checks what builds without side effects (templates, URLs); for `check-config`.
pub fn check(configs: &[SinkConfig]) -> Result<(), String> {
    config::validate(configs)?;
    for sink in configs
        .iter()
        .filter(|sink| sink.kind() == SinkKind::Rabbitmq)
    {
        RabbitmqSink::new(rabbitmq_config(sink)?)
            .map_err(|e| format!("sink {}: {e}", sink.name))?;
    }
    Ok(())
}

fn rabbitmq_config(sink: &SinkConfig) -> Result<RabbitmqSinkConfig, String> {
    Ok(RabbitmqSinkConfig {
        url: sink.url.clone(),
        exchange: sink.exchange.clone(),
        routing_key: Template::parse(&sink.routing_key)
            .map_err(|e| format!("sink {}: routing_key: {e}", sink.name))?,
        timeout: sink.timeout.as_duration(),
    })
}

/// Builds one sink's broker client (no connection is required yet: each connects on first
/// use and keeps reconnecting).
async fn build_sink(config: &SinkConfig) -> Result<Arc<dyn Sink>, String> {
    let named = |e: String| format!("sink {}: {e}", config.name);
    Ok(match config.kind() {
        SinkKind::Kafka => Arc::new(
            KafkaSink::new(&KafkaSinkConfig {
                brokers: config.url.clone(),
                topic: config.topic.clone(),
                timeout: config.timeout.as_duration(),
                options: config.kafka_options.clone(),
            })
            .map_err(named)?,
        ),
        SinkKind::Rabbitmq => Arc::new(RabbitmqSink::new(rabbitmq_config(config)?).map_err(named)?),
        SinkKind::Nats => Arc::new(
            NatsSink::connect(NatsSinkConfig {
                url: config.url.clone(),
                subject: Template::parse(&config.subject).map_err(named)?,
                mode: config.nats_mode,
                timeout: config.timeout.as_duration(),
            })
            .await
            .map_err(named)?,
        ),
    })
}

impl SinkRuntime {
    /// Builds the enabled sinks of `configs` on `queue`; `None` when none is enabled.
    pub async fn build(
        configs: &[SinkConfig],
        queue: Arc<dyn OutboundQueue>,
    ) -> Result<Option<Self>, String> {
        check(configs)?;
        let mut sinks = Vec::new();
        for config in configs.iter().filter(|sink| sink.enabled) {
            sinks.push(RunningSink {
                config: config.clone(),
                sink: build_sink(config).await?,
                stats: Arc::new(SinkStats::default()),
            });
        }
        if sinks.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self {
            queue,
            wakeup: Arc::new(Wakeup::default()),
            sinks,
            sequence: sequence::ChannelSequence::default(),
            enqueue_errors: AtomicU64::new(0),
            stop: watch::channel(false).0,
        }))
    }

    pub fn queue(&self) -> &Arc<dyn OutboundQueue> {
        &self.queue
    }

    /// Each sink's name, kind and counters (for metrics).
    pub fn stats(&self) -> impl Iterator<Item = (&str, SinkKind, &SinkStats)> {
        self.sinks
            .iter()
            .map(|s| (s.config.name.as_str(), s.config.kind(), s.stats.as_ref()))
    }

    /// Each sink's publications not yet acknowledged by its broker (queued or being sent):
    /// its lag. The queue's `due` misses most of them during an outage — a channel's first
    /// waits for its retry time and the rest wait behind it — so they are counted here.
    /// `None` for a sink whose count failed (logged).
    pub async fn backlogs(&self) -> Vec<(&str, SinkKind, Option<u64>)> {
        let mut out = Vec::with_capacity(self.sinks.len());
        for sink in &self.sinks {
            let name = sink.config.name.as_str();
            let filter = StatusFilter {
                group: name.to_string(),
                recipient: String::new(),
                states: vec![JobState::Queued, JobState::Sending],
            };
            let page = PageRequest {
                cursor: String::new(),
                limit: 1,
                include_total: true,
            };
            let count = match self.queue.statuses(&filter, &page).await {
                Ok(page) => page.total,
                Err(error) => {
                    tracing::warn!(sink = %name, %error, "counting a sink's backlog failed");
                    None
                }
            };
            out.push((name, sink.config.kind(), count));
        }
        out
    }

    pub fn enqueue_errors(&self) -> u64 {
        self.enqueue_errors.load(Ordering::Relaxed)
    }

    /// Starts one worker per sink; they run until [`SinkRuntime::stop`].
    pub fn start(self: &Arc<Self>) -> JoinSet<()> {
        let mut tasks = JoinSet::new();
        for running in &self.sinks {
            let c = &running.config;
            let config = WorkerConfig {
                kind: job_kind(&c.name),
                concurrency: c.concurrency,
                batch: c.batch,
                lease: c.lease.as_duration(),
                poll_interval: c.poll_interval.as_duration(),
                retry: Retry::Exponential(Backoff {
                    base: c.retry_base.as_duration(),
                    max: c.retry_max.as_duration(),
                    attempts: if c.max_attempts == 0 {
                        u32::MAX
                    } else {
                        c.max_attempts
                    },
                }),
            };
            let handler = Arc::new(SinkHandler {
                sink: running.sink.clone(),
                stats: running.stats.clone(),
                timeout: c.timeout.as_duration(),
            });
            let mut stopped = self.stop.subscribe();
            tasks.spawn(run_worker(
                self.queue.clone(),
                handler,
                config,
                self.wakeup.clone(),
                async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                },
            ));
        }
        tasks
    }

    /// Tells the workers to stop claiming; publishes in flight finish and are recorded.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    fn takes(&self, channel: &str) -> bool {
        self.sinks.iter().any(|sink| sink.config.takes(channel))
    }

    fn jobs_per_publication(&self, channel: &str) -> usize {
        self.sinks
            .iter()
            .filter(|sink| sink.config.takes(channel))
            .count()
    }

    /// The jobs that deliver `message` to every sink taking its channel.
    fn jobs(&self, message: &SinkMessage, now: u64) -> Vec<NewJob> {
        let payload = message.to_payload();
        let channel = message.channel.as_str();
        self.sinks
            .iter()
            .filter(|sink| sink.config.takes(channel))
            .map(|sink| {
                let name = sink.config.name.as_str();
                let id = if message.epoch.is_empty() {
                    // Not stored in history: no position to dedupe on; queued once here.
                    format!("{name}:{channel}:-:{now}-{:016x}", rand::random::<u64>())
                } else {
                    job_id(name, channel, &message.epoch, message.offset)
                };
                NewJob {
                    id,
                    kind: job_kind(name),
                    group: name.to_string(),
                    recipient: channel.to_string(),
                    payload: payload.clone(),
                    not_before: now,
                    expire_at: None,
                    order_key: Some(order_key(name, channel)),
                }
            })
            .collect()
    }
}

/// How far back the first publication this process queues on a channel looks for
/// publications that were stored but never queued (the process died between the two).
const CATCH_UP_MAX: usize = 64;
/// Only publications younger than this are caught up: older ones' finished jobs may have been
/// purged from the queue, and queueing them again would deliver them twice.
const CATCH_UP_AGE_MS: u64 = 3_600_000;

/// Queues every publication on a channel some sink takes, before the publish returns.
#[derive(Debug)]
pub struct SinkObserver {
    pub runtime: Arc<SinkRuntime>,
    /// Reads back what a crash left stored but not queued.
    pub node: herald_core::Node,
}

fn sink_message(channel: &str, epoch: &str, publication: &herald_core::Publication) -> SinkMessage {
    let (data, binary) = match &publication.data {
        Payload::Json(bytes) => (bytes.clone(), false),
        Payload::Binary(bytes) => (bytes.clone(), true),
    };
    SinkMessage {
        channel: channel.to_string(),
        epoch: epoch.to_string(),
        offset: publication.offset,
        time_ms: publication.time_ms,
        data,
        binary,
        tags: publication.tags.clone(),
    }
}

impl SinkObserver {
    /// The publications just before `position` (same epoch, at most [`CATCH_UP_MAX`], younger
    /// than [`CATCH_UP_AGE_MS`]): queued again with their ids, only those a crash kept from
    /// being queued are added. So a publication in history — one its publisher saw fail, or
    /// retried and got "duplicate" for — still reaches the sinks, in order.
    async fn catch_up(
        &self,
        channel: &str,
        position: &StreamPosition,
        now: u64,
    ) -> Vec<SinkMessage> {
        let query = herald_core::HistoryQuery {
            since: Some(StreamPosition::new(
                position.offset.saturating_sub(CATCH_UP_MAX as u64 + 1),
                "",
            )),
            limit: Some(CATCH_UP_MAX),
            reverse: false,
        };
        match self.node.history(channel, query).await {
            Ok(page) if page.position.epoch == position.epoch => page
                .publications
                .iter()
                .filter(|p| {
                    p.offset < position.offset && p.time_ms.saturating_add(CATCH_UP_AGE_MS) >= now
                })
                .map(|p| sink_message(channel, &position.epoch, p))
                .collect(),
            Ok(_) => Vec::new(),
            Err(error) => {
                tracing::warn!(%channel, %error, "reading history to catch sinks up failed");
                Vec::new()
            }
        }
    }
}

#[async_trait::async_trait]
impl PublishObserver for SinkObserver {
    fn wants(
        &self,
        channel: &ChannelName,
        _options: &NamespaceOptions,
        _push: Option<&serde_json::Value>,
    ) -> Result<bool, HeraldError> {
        Ok(self.runtime.takes(channel.as_str()))
    }

    async fn published(&self, published: Published<'_>) {
        let runtime = &self.runtime;
        let channel = published.channel.as_str();
        let position = published.position;
        let epoch = position.map(|p| p.epoch.as_str()).unwrap_or_default();
        let message = sink_message(channel, epoch, published.publication);
        let now = now_ms();
        let mut messages = Vec::new();
        // A channel's publications are queued in offset order even when their publishes
        // finished out of order on this node (the order key keeps enqueue order).
        let _turn = match position {
            Some(position) => {
                let turn = runtime
                    .sequence
                    .turn(channel, &position.epoch, position.offset)
                    .await;
                if turn.first && position.offset > 1 {
                    messages = self.catch_up(channel, position, now).await;
                }
                Some(turn)
            }
            None => None,
        };
        messages.push(message);
        let jobs: Vec<NewJob> = messages
            .iter()
            .flat_map(|message| runtime.jobs(message, now))
            .collect();
        let mut delay = std::time::Duration::from_millis(20);
        for attempt in 1..=4 {
            match runtime.queue.enqueue(jobs.clone()).await {
                Ok(added) => {
                    let expected = runtime.jobs_per_publication(channel);
                    if added > expected {
                        tracing::info!(
                            %channel,
                            caught_up = (added - expected) / expected.max(1),
                            "queued for sinks publications a crash left stored but not queued"
                        );
                    }
                    runtime.wakeup.wake();
                    return;
                }
                Err(error) if attempt == 4 => {
                    runtime.enqueue_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        %channel,
                        offset = position.map_or(0, |p| p.offset),
                        %error,
                        "a publication could not be queued for its sinks; they will not get it"
                    );
                }
                Err(error) => {
                    tracing::warn!(%error, attempt, "queueing a publication for sinks failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use herald_core::memory_outbound::MemoryOutboundQueue;
    use herald_core::namespace::Namespaces;
    use herald_core::{Node, NodeConfig, PublishRequest};
    use herald_outbound::sink::SinkError;

    use super::*;

    struct Nowhere;
    #[async_trait::async_trait]
    impl Sink for Nowhere {
        async fn publish(&self, _id: &str, _message: &SinkMessage) -> Result<String, SinkError> {
            Err(SinkError::Unavailable("not used".into()))
        }
    }

    fn node() -> Node {
        let options = NamespaceOptions {
            history_size: 100,
            history_ttl: herald_core::duration::HumanDuration::from_secs(3600),
            ..NamespaceOptions::default()
        };
        Node::in_memory(NodeConfig {
            namespaces: Namespaces::new(options, Vec::new()).expect("namespaces"),
            ..NodeConfig::default()
        })
    }

    fn runtime(queue: Arc<dyn OutboundQueue>) -> Arc<SinkRuntime> {
        let config = SinkConfig {
            name: "s".into(),
            kind: Some(SinkKind::Nats),
            url: "nats://127.0.0.1:1".into(),
            channels: vec!["c*".into()],
            ..SinkConfig::default()
        };
        Arc::new(SinkRuntime {
            queue,
            wakeup: Arc::new(Wakeup::default()),
            sinks: vec![RunningSink {
                config,
                sink: Arc::new(Nowhere),
                stats: Arc::new(SinkStats::default()),
            }],
            sequence: sequence::ChannelSequence::default(),
            enqueue_errors: AtomicU64::new(0),
            stop: watch::channel(false).0,
        })
    }

    async fn publish(node: &Node, channel: &str, n: u64) -> u64 {
        let data = Payload::Json(bytes::Bytes::from(format!("{{\"n\":{n}}}")));
        let result = node
            .publish(PublishRequest::new(channel, data))
            .await
            .expect("publish");
        result.position.expect("stored").offset
    }

    /// The offsets of the sink's jobs for `channel`, in the order the queue hands them out.
    async fn queued_offsets(queue: &Arc<dyn OutboundQueue>, channel: &str) -> Vec<u64> {
        let mut offsets = Vec::new();
        loop {
            let jobs = queue
                .claim(&job_kind("s"), 10, Duration::from_secs(5), now_ms())
                .await
                .expect("claim");
            let Some(job) = jobs.into_iter().find(|job| job.recipient == channel) else {
                return offsets;
            };
            let message = SinkMessage::from_payload(&job.payload).expect("payload");
            offsets.push(message.offset);
            let finished = herald_core::outbound::Finished {
                id: job.id,
                attempt: job.attempt,
                outcome: herald_core::outbound::Outcome::Sent {
                    detail: String::new(),
                },
            };
            queue
                .finish(vec![finished], now_ms())
                .await
                .expect("finish");
        }
    }

    #[tokio::test]
    async fn publications_stored_but_never_queued_are_caught_up_in_order_once() {
        let node = node();
        let queue: Arc<dyn OutboundQueue> = Arc::new(MemoryOutboundQueue::new());
        let runtime = runtime(queue.clone());
        // Offsets 1 and 2 were queued before the "crash"; 3 was stored but never queued.
        for n in 1..=3 {
            publish(&node, "c1", n).await;
        }
        let epoch = node
            .history("c1", herald_core::HistoryQuery::default())
            .await
            .expect("history")
            .position
            .epoch;
        let queued_before: Vec<NewJob> = [1u64, 2]
            .iter()
            .flat_map(|&offset| {
                let message = SinkMessage {
                    channel: "c1".into(),
                    epoch: epoch.clone(),
                    offset,
                    time_ms: now_ms(),
                    data: bytes::Bytes::new(),
                    binary: false,
                    tags: Default::default(),
                };
                runtime.jobs(&message, now_ms())
            })
            .collect();
        queue.enqueue(queued_before).await.expect("enqueue");
        // The restarted node observes again; its first publication on c1 is offset 4.
        node.observe_publications(Arc::new(SinkObserver {
            runtime: runtime.clone(),
            node: node.clone(),
        }));
        assert_eq!(publish(&node, "c1", 4).await, 4);
        assert_eq!(publish(&node, "c1", 5).await, 5);
        // 1 and 2 once (queued before), then the caught-up 3, then 4 and 5.
        assert_eq!(queued_offsets(&queue, "c1").await, vec![1, 2, 3, 4, 5]);
    }
}
