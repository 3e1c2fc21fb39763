//! Kafka source: a consumer group on one or more topics (librdkafka's `StreamConsumer`), every
//! Herald node configured with the same group sharing the partitions, offsets committed only
//! up to what is durable in history.
//!
//! Offsets: automatic offset *storing* is off. After a batch is published, `settle` stores, per
//! partition, the offset after the longest run of the batch's messages (from the first)
//! that were settled — a message left for redelivery stops its partition's run there, and the
//! loop reconnects, so the new consumer starts again from the committed offset. librdkafka
//! commits the stored offsets every `commit_interval`; a partition being revoked (a rebalance)
//! and a disconnect commit them synchronously first, so the next owner starts exactly after
//! what this node published. Whatever a kill -9 left uncommitted comes again, and the
//! idempotency key (`<source>:<topic>:<partition>:<offset>` unless the message names one)
//! makes it a duplicate instead of a second publication.
//!
//! Order: librdkafka hands a partition's messages over in offset order and the consume loop
//! publishes a channel's messages in the order received, so a channel fed from one partition
//! (the usual: the channel in the record key) keeps the partition's order.
//!
//! Rebalances happen inside `receive` (librdkafka serves them while polling), never while a
//! batch is being published: messages of a partition revoked during `receive` are dropped
//! from the batch unpublished (the next owner reads them from the committed offset).
//!
//! A message's attributes: `topic`, `partition`, `offset`, `key` (when it is UTF-8),
//! `header.NAME` (UTF-8 values); its id is `<topic>:<partition>:<offset>`.
//!
//! Owns: one librdkafka consumer while connected (librdkafka keeps its own connections).
//! May touch: the configured Kafka brokers (its group's offsets, reading its topics).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::FutureExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::mapping::Received;
use crate::source::{Outcome, PartitionLag, Source, SourceError};

/// What a Kafka source reads.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    pub topics: Vec<String>,
    /// The consumer group, the same on every node that shares the work.
    pub group: String,
    /// Where a group without committed offsets starts: the oldest message or only new ones.
    pub from_beginning: bool,
    /// How often stored offsets are committed.
    pub commit_interval: Duration,
    /// The client id the brokers see (to find the connection in their logs).
    pub client_id: String,
    /// More librdkafka properties (`security.protocol`, `sasl.*`, `session.timeout.ms`, …);
    /// they override Herald's defaults, except the offset handling this module relies on.
    pub options: BTreeMap<String, String>,
}

/// The attributes templates may name.
pub const ATTRIBUTES: &[&str] = &["topic", "partition", "offset", "key", "header.", "id"];

/// librdkafka properties the offset handling depends on; `options` may not change them.
pub const RESERVED_OPTIONS: &[&str] = &[
    "group.id",
    "enable.auto.offset.store",
    "enable.auto.commit",
    "auto.commit.interval.ms",
    "auto.offset.reset",
    "bootstrap.servers",
    "partition.assignment.strategy",
    "group.protocol",
];

/// How long a broker call (metadata, watermarks, a commit) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `receive` waits for a first message.
const RECEIVE_WAIT: Duration = Duration::from_secs(1);
/// How long `receive` waits for more once the records librdkafka held are taken.
const BATCH_LINGER: Duration = Duration::from_millis(5);

/// A received message's place, for settling.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KafkaReceipt {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
}

/// Partitions revoked by a rebalance since `receive` last looked.
type Revoked = Arc<Mutex<Vec<(String, i32)>>>;

/// The consumer's callbacks: a synchronous commit of the stored offsets before partitions
/// are revoked, and a note of which were.
struct GroupContext {
    revoked: Revoked,
    group: String,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            commit_stored(consumer, &self.group);
            let mut revoked = lock(&self.revoked);
            for element in partitions.elements() {
                revoked.push((element.topic().to_owned(), element.partition()));
            }
            tracing::info!(group = %self.group, partitions = partitions.count(), "Kafka partitions revoked");
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                tracing::info!(group = %self.group, partitions = partitions.count(), "Kafka partitions assigned");
            }
            Rebalance::Error(error) => {
                tracing::warn!(group = %self.group, %error, "Kafka rebalance failed");
            }
            Rebalance::Revoke(_) => {}
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Commits what `settle` stored, waiting for the broker. Nothing stored is not an error.
fn commit_stored<C: ConsumerContext>(consumer: &impl Consumer<C>, group: &str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => {}
        Err(error) if error.rdkafka_error_code() == Some(RDKafkaErrorCode::NoOffset) => {}
        Err(error) => {
            // The next owner reads again from the last commit; the keys make that harmless.
            tracing::warn!(%group, %error, "committing Kafka offsets failed");
        }
    }
}

type GroupConsumer = StreamConsumer<GroupContext>;

pub struct KafkaSource {
    config: KafkaConfig,
    consumer: Option<Arc<GroupConsumer>>,
    revoked: Revoked,
    /// The last batch's offsets per partition, in the order received.
    in_flight: HashMap<(Arc<str>, i32), Vec<i64>>,
    /// Next offset to read per partition, as stored by `settle` (fresher than the commit).
    stored: HashMap<(Arc<str>, i32), i64>,
    topic_names: HashMap<String, Arc<str>>,
    partition_lags: Vec<PartitionLag>,
    last_lag: Option<u64>,
    /// A lag measurement running in the background.
    lag_task: Option<tokio::task::JoinHandle<Measured>>,
}

impl KafkaSource {
    pub fn new(config: KafkaConfig) -> Self {
        Self {
            config,
            consumer: None,
            revoked: Arc::default(),
            in_flight: HashMap::new(),
            stored: HashMap::new(),
            topic_names: HashMap::new(),
            partition_lags: Vec::new(),
            last_lag: None,
            lag_task: None,
        }
    }

    fn client_config(&self) -> ClientConfig {
        let mut client = ClientConfig::new();
        client
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "2000")
            .set("reconnect.backoff.max.ms", "2000")
            .set("client.id", &self.config.client_id);
        for (key, value) in &self.config.options {
            client.set(key, value);
        }
        let commit_ms = self.config.commit_interval.as_millis().max(1).to_string();
        client
            .set("bootstrap.servers", &self.config.brokers)
            .set("group.id", &self.config.group)
            .set("enable.auto.offset.store", "false")
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", commit_ms)
            .set(
                "auto.offset.reset",
                if self.config.from_beginning {
                    "earliest"
                } else {
                    "latest"
                },
            )
            // Eager rebalancing: every partition is revoked, committed and handed out again.
            .set("partition.assignment.strategy", "range,roundrobin")
            .set("enable.partition.eof", "false");
        client
    }

    /// Keeps a measurement: each partition's lag from the committed offset or, when fresher,
    /// the one this node stored.
    fn record_lag(&mut self, measured: Vec<(String, i32, i64, i64)>) {
        let mut lags = Vec::with_capacity(measured.len());
        for (topic, partition, committed, high) in measured {
            let name = self.topic_name(&topic);
            let position = self
                .stored
                .get(&(name, partition))
                .map_or(committed, |stored| (*stored).max(committed));
            lags.push(PartitionLag {
                topic,
                partition,
                lag: u64::try_from(high - position).unwrap_or(0),
            });
        }
        lags.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        self.last_lag = Some(lags.iter().map(|p| p.lag).sum());
        self.partition_lags = lags;
    }

    fn topic_name(&mut self, topic: &str) -> Arc<str> {
        if let Some(name) = self.topic_names.get(topic) {
            return name.clone();
        }
        let name: Arc<str> = Arc::from(topic);
        self.topic_names.insert(topic.to_owned(), name.clone());
        name
    }

    /// Drops the messages of partitions a rebalance revoked while they were being received.
    fn drop_revoked(&mut self, batch: &mut Vec<(KafkaReceipt, Received)>) {
        let revoked: HashSet<(String, i32)> = lock(&self.revoked).drain(..).collect();
        if revoked.is_empty() {
            return;
        }
        let before = batch.len();
        batch.retain(|(receipt, _)| {
            !revoked.contains(&(receipt.topic.to_string(), receipt.partition))
        });
        self.stored
            .retain(|(topic, partition), _| !revoked.contains(&(topic.to_string(), *partition)));
        if batch.len() < before {
            tracing::info!(
                group = %self.config.group,
                dropped = before - batch.len(),
                "messages of revoked Kafka partitions left to their next owner"
            );
        }
    }

    fn received(
        &mut self,
        message: &rdkafka::message::BorrowedMessage<'_>,
    ) -> (KafkaReceipt, Received) {
        let topic = self.topic_name(message.topic());
        let (partition, offset) = (message.partition(), message.offset());
        let mut out = Received::new(Bytes::copy_from_slice(
            message.payload().unwrap_or_default(),
        ))
        .with("topic", topic.to_string())
        .with("partition", partition.to_string())
        .with("offset", offset.to_string())
        .with_id(format!("{topic}:{partition}:{offset}"));
        if let Some(key) = message.key().and_then(|key| std::str::from_utf8(key).ok()) {
            out.attributes.push(("key".into(), key.to_owned()));
        }
        if let Some(headers) = message.headers() {
            for header in headers.iter() {
                if let Some(value) = header.value.and_then(|v| std::str::from_utf8(v).ok()) {
                    out.attributes
                        .push((format!("header.{}", header.key), value.to_owned()));
                }
            }
        }
        (
            KafkaReceipt {
                topic,
                partition,
                offset,
            },
            out,
        )
    }
}

/// Per partition of a batch, the offset to store: the one after the longest run of settled
/// messages from the partition's first in the batch (none when its first is unsettled).
/// Rejected messages count as settled: they are logged and counted, never retried.
fn committable(
    in_flight: HashMap<(Arc<str>, i32), Vec<i64>>,
    settled: Vec<(KafkaReceipt, Outcome)>,
) -> Vec<(Arc<str>, i32, i64)> {
    let done: HashSet<KafkaReceipt> = settled.into_iter().map(|(receipt, _)| receipt).collect();
    let mut out = Vec::new();
    for ((topic, partition), received) in in_flight {
        let run = received
            .iter()
            .take_while(|offset| {
                done.contains(&KafkaReceipt {
                    topic: topic.clone(),
                    partition,
                    offset: **offset,
                })
            })
            .last();
        if let Some(last) = run {
            out.push((topic.clone(), partition, last + 1));
        }
    }
    out.sort();
    out
}

/// Errors after which this consumer is dropped and a new one connected.
fn is_fatal(error: &KafkaError) -> bool {
    match error {
        KafkaError::MessageConsumptionFatal(_) => true,
        KafkaError::MessageConsumption(code) => matches!(
            code,
            RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::Fatal
        ),
        _ => false,
    }
}

/// Per partition of `topics`: (topic, partition, committed offset, high watermark).
type Measured = Result<Vec<(String, i32, i64, i64)>, String>;

/// Asks the brokers for every partition's high watermark and the group's committed offsets
/// (off the async threads: librdkafka's calls block).
async fn measure_lag(
    consumer: Arc<GroupConsumer>,
    topics: Vec<String>,
    from_beginning: bool,
) -> Measured {
    let measured = blocking(
        move || -> Result<Vec<(String, i32, i64, i64)>, KafkaError> {
            let mut partitions = TopicPartitionList::new();
            let mut watermarks = HashMap::new();
            for topic in &topics {
                let metadata = consumer.fetch_metadata(Some(topic), CALL_TIMEOUT)?;
                for t in metadata.topics().iter().filter(|t| t.name() == topic) {
                    for p in t.partitions() {
                        partitions.add_partition(topic, p.id());
                        let (low, high) = consumer.fetch_watermarks(topic, p.id(), CALL_TIMEOUT)?;
                        watermarks.insert((topic.clone(), p.id()), (low, high));
                    }
                }
            }
            let committed = consumer.committed_offsets(partitions, CALL_TIMEOUT)?;
            Ok(committed
                .elements()
                .iter()
                .filter_map(|element| {
                    let key = (element.topic().to_owned(), element.partition());
                    let (low, high) = *watermarks.get(&key)?;
                    let position = match element.offset() {
                        Offset::Offset(n) => n,
                        _ if from_beginning => low,
                        _ => high,
                    };
                    Some((key.0, key.1, position, high))
                })
                .collect())
        },
    )
    .await?;
    measured.map_err(|e| e.to_string())
}

fn consume_error(error: &KafkaError) -> SourceError {
    SourceError::Receive(format!("Kafka: {error}"))
}

/// Runs a blocking librdkafka call off the async threads.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| format!("the Kafka call did not finish: {e}"))
}

/// Closes a consumer off the async threads (closing commits and leaves the group, which
/// waits for the brokers), without waiting longer than `CALL_TIMEOUT` for it.
async fn close(consumer: Arc<GroupConsumer>, group: String) {
    let closing = blocking(move || {
        commit_stored(&*consumer, &group);
        drop(consumer);
    });
    if tokio::time::timeout(CALL_TIMEOUT, closing).await.is_err() {
        tracing::warn!("closing the Kafka consumer is taking long; left to finish on its own");
    }
}

#[async_trait]
impl Source for KafkaSource {
    type Receipt = KafkaReceipt;

    async fn connect(&mut self) -> Result<(), SourceError> {
        let fail = |e: &dyn std::fmt::Display| SourceError::Connect(e.to_string());
        self.revoked = Arc::default();
        self.in_flight.clear();
        self.stored.clear();
        self.last_lag = None;
        if let Some(task) = self.lag_task.take() {
            task.abort();
        }
        let context = GroupContext {
            revoked: self.revoked.clone(),
            group: self.config.group.clone(),
        };
        let consumer: GroupConsumer = self
            .client_config()
            .create_with_context(context)
            .map_err(|e| fail(&e))?;
        let consumer = Arc::new(consumer);
        // librdkafka connects lazily and retries by itself; asking for the topics' metadata
        // shows now whether the brokers answer and the topics exist.
        let topics = self.config.topics.clone();
        let probe = consumer.clone();
        let checked = blocking(move || -> Result<(), String> {
            for topic in &topics {
                let metadata = probe
                    .fetch_metadata(Some(topic), CALL_TIMEOUT)
                    .map_err(|e| format!("brokers unreachable: {e}"))?;
                let found = metadata.topics().iter().find(|t| t.name() == topic);
                match found {
                    Some(t) if t.error().is_none() && !t.partitions().is_empty() => {}
                    Some(t) => {
                        return Err(format!(
                            "topic {topic:?}: {}",
                            t.error()
                                .map(|e| RDKafkaErrorCode::from(e).to_string())
                                .unwrap_or_else(|| "no partitions".into())
                        ));
                    }
                    None => return Err(format!("topic {topic:?} does not exist")),
                }
            }
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            probe.subscribe(&names).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| fail(&e))?;
        if let Err(error) = checked {
            close(consumer, self.config.group.clone()).await;
            return Err(fail(&error));
        }
        self.consumer = Some(consumer);
        Ok(())
    }

    async fn receive(&mut self, max: usize) -> Result<Vec<(KafkaReceipt, Received)>, SourceError> {
        let consumer = self.consumer.clone().ok_or(SourceError::NotConnected)?;
        let max = max.max(1);
        let deadline = Instant::now() + RECEIVE_WAIT;
        let mut batch = Vec::new();
        let mut lingering: Option<Instant> = None;
        while batch.len() < max {
            let next = if batch.is_empty() {
                // Wait for the first message (rebalances and errors come this way too).
                match tokio::time::timeout_at(deadline.into(), consumer.recv()).await {
                    Ok(next) => next,
                    Err(_) => break,
                }
            } else if let Some(next) = consumer.recv().now_or_never() {
                // Then take what librdkafka already holds,
                next
            } else {
                // and what the next fetch responses bring within a short linger: records
                // come a fetch response (one partition's slice) at a time, and every batch
                // costs a durable write, so a batch per response would cap the rate.
                let linger = *lingering.get_or_insert_with(|| Instant::now() + BATCH_LINGER);
                match tokio::time::timeout_at(linger.into(), consumer.recv()).await {
                    Ok(next) => next,
                    Err(_) => break,
                }
            };
            match next {
                Ok(message) => {
                    let received = self.received(&message);
                    batch.push(received);
                }
                // The brokers are gone, or the consumer cannot go on: drop it and connect
                // again (what was received is not stored, so it comes again).
                Err(error) if is_fatal(&error) => return Err(consume_error(&error)),
                // librdkafka reports a dropped broker connection, then reconnects by itself.
                Err(error) => {
                    tracing::warn!(group = %self.config.group, %error, "Kafka consumer error");
                }
            }
            self.drop_revoked(&mut batch);
        }
        self.drop_revoked(&mut batch);
        self.in_flight.clear();
        for (receipt, _) in &batch {
            self.in_flight
                .entry((receipt.topic.clone(), receipt.partition))
                .or_default()
                .push(receipt.offset);
        }
        Ok(batch)
    }

    async fn settle(&mut self, settled: Vec<(KafkaReceipt, Outcome)>) -> Result<(), SourceError> {
        let consumer = self.consumer.clone().ok_or(SourceError::NotConnected)?;
        let in_flight = std::mem::take(&mut self.in_flight);
        let mut offsets = TopicPartitionList::new();
        for (topic, partition, next) in committable(in_flight, settled) {
            offsets
                .add_partition_offset(&topic, partition, Offset::Offset(next))
                .map_err(|e| SourceError::Settle(e.to_string()))?;
            self.stored.insert((topic, partition), next);
        }
        if offsets.count() == 0 {
            return Ok(());
        }
        // Stored only: librdkafka commits them every `commit_interval` (and before a
        // revoke or a close), so a batch costs no round trip to the group coordinator.
        consumer
            .store_offsets(&offsets)
            .map_err(|e| SourceError::Settle(format!("storing Kafka offsets: {e}")))
    }

    /// The group's lag over every partition of its topics: the high watermark minus the
    /// committed offset (or the offset this node stored, when fresher). With several nodes
    /// each reports the whole group's lag, as JetStream and Redis do.
    /// The first call after a connect measures and waits; later ones start a measurement in
    /// the background and report the last finished one, so the brokers' answers (several
    /// requests per topic) never hold up the stream.
    async fn lag(&mut self) -> Option<u64> {
        let consumer = self.consumer.clone()?;
        let finished = match self.lag_task.take() {
            None if self.last_lag.is_none() => {
                let task = tokio::spawn(measure_lag(
                    consumer.clone(),
                    self.config.topics.clone(),
                    self.config.from_beginning,
                ));
                Some(tokio::time::timeout(CALL_TIMEOUT * 3, task).await)
            }
            Some(task) if task.is_finished() => Some(Ok(task.await)),
            running => {
                self.lag_task = running;
                None
            }
        };
        match finished {
            Some(Ok(Ok(Ok(measured)))) => self.record_lag(measured),
            Some(Ok(Ok(Err(error)))) => {
                tracing::debug!(group = %self.config.group, %error, "Kafka lag not measured");
            }
            _ => {}
        }
        if self.lag_task.is_none() {
            self.lag_task = Some(tokio::spawn(measure_lag(
                consumer,
                self.config.topics.clone(),
                self.config.from_beginning,
            )));
        }
        self.last_lag
    }

    fn partition_lags(&self) -> Vec<PartitionLag> {
        self.partition_lags.clone()
    }

    fn assigned_partitions(&self) -> Option<u64> {
        let consumer = self.consumer.as_ref()?;
        consumer
            .assignment()
            .ok()
            .map(|assignment| assignment.count() as u64)
    }

    async fn disconnect(&mut self) {
        self.in_flight.clear();
        if let Some(consumer) = self.consumer.take() {
            close(consumer, self.config.group.clone()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(topic: &Arc<str>, partition: i32, offset: i64) -> KafkaReceipt {
        KafkaReceipt {
            topic: topic.clone(),
            partition,
            offset,
        }
    }

    #[test]
    fn only_the_settled_prefix_of_each_partition_is_committable() {
        let topic: Arc<str> = Arc::from("t");
        let in_flight = HashMap::from([
            ((topic.clone(), 0), vec![10, 11, 12, 13]),
            ((topic.clone(), 1), vec![5, 7]),
            ((topic.clone(), 2), vec![0, 1]),
        ]);
        let settled = vec![
            // Partition 0: 12 is missing, so 13 (settled) cannot be committed past.
            (receipt(&topic, 0, 10), Outcome::Done),
            (receipt(&topic, 0, 11), Outcome::Rejected),
            (receipt(&topic, 0, 13), Outcome::Done),
            // Partition 1: a gap in offsets (compaction) is not a missing message.
            (receipt(&topic, 1, 5), Outcome::Done),
            (receipt(&topic, 1, 7), Outcome::Done),
            // Partition 2: its first message is unsettled: nothing to commit.
            (receipt(&topic, 2, 1), Outcome::Done),
        ];
        assert_eq!(
            committable(in_flight, settled),
            vec![(topic.clone(), 0, 12), (topic.clone(), 1, 8)]
        );
    }
}
