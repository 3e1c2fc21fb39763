//! The one consume loop every source runs: receive a batch → map and publish each message →
//! settle only what `Node::publish_many` returned for → again; reconnect with jittered, capped
//! backoff when the source fails; refresh the lag now and then; count everything.
//!
//! Order: a batch's messages of one channel go to the node in one `Node::publish_many`, which
//! stores them in the order given (with one durable write where the engine can), so a
//! channel's publications keep the source's order whatever the engine; different channels
//! of a batch publish concurrently.
//!
//! A message that cannot become a publication (bad envelope, unknown namespace or channel,
//! too large, a key over 256 bytes) is settled as [`Outcome::Rejected`] with a log line and
//! counted: it never blocks the stream. Any other publish error (the engine is unreachable)
//! leaves the message and the rest of its channel unsettled, drops the connection and backs
//! off, so the broker delivers them again; the idempotency key makes the ones that did
//! publish harmless.
//!
//! Stop: a stop waits for the batch in flight to be published and settled, then disconnects.
//!
//! May touch: the node it is given, through `publish`; its source.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use herald_core::Node;
use herald_core::error::{ErrorCode, HeraldError};
use herald_core::node::PublishRequest;
use herald_outbound::worker::Backoff;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::mapping::{Mapping, Received};
use crate::source::{Outcome, PartitionLag, Source};

/// How one source's loop runs.
#[derive(Clone, Debug)]
pub struct ConsumeConfig {
    /// The source's name (logs, metrics, derived idempotency keys).
    pub name: String,
    /// Most messages received and published per batch.
    pub batch: usize,
    /// Delay between reconnect attempts (`attempts` is ignored: a source retries forever).
    pub backoff: Backoff,
    /// How often the lag is asked for.
    pub lag_interval: Duration,
}

impl ConsumeConfig {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            batch: 100,
            backoff: Backoff {
                base: Duration::from_millis(200),
                max: Duration::from_secs(10),
                attempts: u32::MAX,
            },
            lag_interval: Duration::from_secs(2),
        }
    }
}

/// What a source's loop did, read by the metrics at scrape time.
#[derive(Debug)]
pub struct SourceStats {
    pub published: AtomicU64,
    /// Redelivered messages whose idempotency key had already published.
    pub duplicates: AtomicU64,
    pub rejected: AtomicU64,
    /// Publishes that failed for a reason that may pass (left for redelivery).
    pub failed: AtomicU64,
    /// Connections dropped after an error (each followed by a reconnect).
    pub reconnects: AtomicU64,
    /// Messages waiting, as the broker last said; `u64::MAX` when it cannot tell.
    pub lag: AtomicU64,
    /// Each partition's share of `lag`, for sources with partitions.
    pub partition_lags: Mutex<Vec<PartitionLag>>,
    /// Partitions this node holds (Kafka); `u64::MAX` for sources without partitions.
    pub assigned_partitions: AtomicU64,
    pub connected: AtomicBool,
}

impl Default for SourceStats {
    fn default() -> Self {
        Self {
            published: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            lag: AtomicU64::new(u64::MAX),
            partition_lags: Mutex::new(Vec::new()),
            assigned_partitions: AtomicU64::new(u64::MAX),
            connected: AtomicBool::new(false),
        }
    }
}

impl SourceStats {
    /// The lag, when the broker reports one.
    pub fn lag(&self) -> Option<u64> {
        Some(self.lag.load(Ordering::Relaxed)).filter(|lag| *lag != u64::MAX)
    }

    /// Partitions this node holds, for sources with partitions.
    pub fn assigned_partitions(&self) -> Option<u64> {
        Some(self.assigned_partitions.load(Ordering::Relaxed)).filter(|n| *n != u64::MAX)
    }

    /// Each partition's lag, as last measured.
    pub fn partition_lags(&self) -> Vec<PartitionLag> {
        self.partition_lags
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// A running source loop.
#[derive(Debug)]
pub struct SourceHandle {
    pub name: String,
    pub stats: Arc<SourceStats>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl SourceHandle {
    /// Asks the loop to stop (after the batch in flight is published and settled).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits for the loop to end, at most `timeout`; aborts it after that (what it had not
    /// settled is delivered again later).
    pub async fn join(self, timeout: Duration) {
        let abort = self.task.abort_handle();
        if tokio::time::timeout(timeout, self.task).await.is_err() {
            tracing::warn!(source = %self.name, "source did not stop in time; aborted");
            abort.abort();
        }
    }
}

/// Starts `source`'s loop on the current runtime.
pub fn spawn_source<S: Source>(
    source: S,
    mapping: Mapping,
    node: Node,
    config: ConsumeConfig,
) -> SourceHandle {
    let stats = Arc::new(SourceStats::default());
    let (stop, stopped) = watch::channel(false);
    let name = config.name.clone();
    let task = tokio::spawn(
        Loop {
            source,
            publisher: Publisher {
                mapping,
                node,
                name: config.name.clone(),
                stats: stats.clone(),
            },
            config,
            stats: stats.clone(),
            stopped,
        }
        .run(),
    );
    SourceHandle {
        name,
        stats,
        stop,
        task,
    }
}

struct Loop<S> {
    source: S,
    publisher: Publisher,
    config: ConsumeConfig,
    stats: Arc<SourceStats>,
    stopped: watch::Receiver<bool>,
}

/// What publishing a batch left to do.
struct BatchResult<R> {
    settled: Vec<(R, Outcome)>,
    /// The first error that leaves messages for redelivery.
    retry: Option<HeraldError>,
}

impl<S: Source> Loop<S> {
    async fn run(mut self) {
        let name = self.config.name.clone();
        let mut connected = false;
        let mut failures: u32 = 0;
        let mut lag_asked: Option<Instant> = None;
        while !*self.stopped.borrow() {
            if !connected {
                let connecting = tokio::select! {
                    result = self.source.connect() => result,
                    _ = self.stopped.wait_for(|stop| *stop) => break,
                };
                match connecting {
                    Ok(()) => {
                        connected = true;
                        self.stats.connected.store(true, Ordering::Relaxed);
                        tracing::info!(source = %name, "source connected");
                    }
                    Err(error) => {
                        failures = failures.saturating_add(1);
                        tracing::warn!(source = %name, %error, failures, "source unreachable; retrying");
                        self.pause(failures).await;
                        continue;
                    }
                }
            }
            if lag_asked.is_none_or(|at| at.elapsed() >= self.config.lag_interval) {
                lag_asked = Some(Instant::now());
                let assigned = self.source.assigned_partitions().unwrap_or(u64::MAX);
                self.stats
                    .assigned_partitions
                    .store(assigned, Ordering::Relaxed);
                let lag = self.source.lag().await;
                self.stats
                    .lag
                    .store(lag.unwrap_or(u64::MAX), Ordering::Relaxed);
                if lag.is_some() {
                    *self
                        .stats
                        .partition_lags
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()) =
                        self.source.partition_lags();
                }
            }
            let received = tokio::select! {
                result = self.source.receive(self.config.batch) => result,
                _ = self.stopped.wait_for(|stop| *stop) => break,
            };
            let error = match received {
                Ok(batch) if batch.is_empty() => continue,
                Ok(batch) => {
                    let result = self.publisher.publish_batch(batch).await;
                    match (self.source.settle(result.settled).await, result.retry) {
                        (Ok(()), None) => {
                            failures = 0;
                            continue;
                        }
                        (Ok(()), Some(error)) => {
                            format!("publishing failed, left for redelivery: {error}")
                        }
                        (Err(error), _) => error.to_string(),
                    }
                }
                Err(error) => error.to_string(),
            };
            failures = failures.saturating_add(1);
            tracing::warn!(source = %name, %error, failures, "source error; reconnecting");
            self.source.disconnect().await;
            connected = false;
            self.stats.connected.store(false, Ordering::Relaxed);
            self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            self.pause(failures).await;
        }
        self.source.disconnect().await;
        self.stats.connected.store(false, Ordering::Relaxed);
        tracing::info!(source = %name, "source stopped");
    }

    /// Backs off before the next attempt, cut short by a stop.
    async fn pause(&mut self, failures: u32) {
        let delay = self.config.backoff.delay(failures);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = self.stopped.wait_for(|stop| *stop) => {}
        }
    }
}

/// Maps and publishes batches (apart from the source, which is used by one task at a time).
struct Publisher {
    mapping: Mapping,
    node: Node,
    name: String,
    stats: Arc<SourceStats>,
}

impl Publisher {
    async fn publish_batch<R>(&self, batch: Vec<(R, Received)>) -> BatchResult<R> {
        let name = self.name.as_str();
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
        // Requests grouped by channel, each group in the batch's order.
        let mut groups: HashMap<String, Vec<(usize, PublishRequest)>> = HashMap::new();
        let mut receipts = Vec::with_capacity(batch.len());
        for (index, (receipt, message)) in batch.into_iter().enumerate() {
            receipts.push(receipt);
            match self.mapping.map(&message) {
                Ok(request) => groups
                    .entry(request.channel.clone())
                    .or_default()
                    .push((index, request)),
                Err(error) => {
                    tracing::warn!(source = name, id = ?message.id, %error, "message rejected");
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    outcomes[index] = Some(Outcome::Rejected);
                }
            }
        }
        let runs = groups
            .into_values()
            .map(|group| self.publish_channel(group));
        let mut retry = None;
        for (done, error) in futures::future::join_all(runs).await {
            for (index, outcome) in done {
                outcomes[index] = Some(outcome);
            }
            if retry.is_none() {
                retry = error;
            }
        }
        let settled = receipts
            .into_iter()
            .zip(outcomes)
            .filter_map(|(receipt, outcome)| Some((receipt, outcome?)))
            .collect();
        BatchResult { settled, retry }
    }

    /// Publishes one channel's requests in order, in one `publish_many` (one durable write
    /// where the engine can); settles up to the first error that may pass.
    async fn publish_channel(
        &self,
        group: Vec<(usize, PublishRequest)>,
    ) -> (Vec<(usize, Outcome)>, Option<HeraldError>) {
        let name = self.name.as_str();
        let mut done = Vec::with_capacity(group.len());
        let (indexes, requests): (Vec<usize>, Vec<PublishRequest>) = group.into_iter().unzip();
        let channel = requests
            .first()
            .map(|request| request.channel.clone())
            .unwrap_or_default();
        let results = self.node.publish_many(requests).await;
        for (index, result) in indexes.into_iter().zip(results) {
            match result {
                Ok(result) => {
                    let counter = if result.duplicate {
                        &self.stats.duplicates
                    } else {
                        &self.stats.published
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    done.push((index, Outcome::Done));
                }
                Err(error) if is_permanent(&error) => {
                    tracing::warn!(source = name, %channel, %error, "message rejected");
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    done.push((index, Outcome::Rejected));
                }
                Err(error) => {
                    // Later messages of the channel may have been stored (a later group
                    // commit succeeded): they stay unsettled, come again and are recognised
                    // by their idempotency keys — the failed one then lands after them, the
                    // reordering a redelivery may cause (docs/integrations.md, Order).
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    return (done, Some(error));
                }
            }
        }
        (done, None)
    }
}

/// Errors about the message itself: publishing it again cannot succeed.
fn is_permanent(error: &HeraldError) -> bool {
    matches!(
        error.code,
        ErrorCode::UnknownChannel
            | ErrorCode::BadRequest
            | ErrorCode::LimitExceeded
            | ErrorCode::PermissionDenied
    )
}
