//! Conformance suites: the rules every backend of a port keeps, checked the same way for all.
//!
//! Owns: the suites, one file each, and what they share (the `Probe` that records what an
//! engine delivers to a node's feed, publish and subscribe helpers, the bounds on waiting):
//! - [`run_history_suite`] (`history.rs`): a [`HistoryStore`](crate::store::HistoryStore);
//! - [`run_engine_suite`] (`engine.rs`): one [`Engine`] handle, whatever the backend;
//! - [`run_cluster_suite`] (`cluster.rs`): several handles on one shared backend, standing for
//!   the nodes of a cluster ([`ClusterBackend`]);
//! - [`run_presence_suite`] (`presence.rs`): a shared
//!   [`PresenceStore`](crate::presence::PresenceStore) seen from two nodes, expiry included;
//! - [`run_device_suite`] (`devices.rs`, `device_removals.rs`, `device_topics.rs`): a
//!   [`DeviceStore`](crate::device::DeviceStore);
//! - [`run_outbound_suite`] (`outbound.rs`, `outbound_status.rs`): an
//!   [`OutboundQueue`](crate::outbound::OutboundQueue), racing claimers included;
//! - [`run_webhook_store_suite`] (`webhook_store.rs`): a
//!   [`WebhookStore`](crate::webhook_store::WebhookStore).
//!
//! Backends call them from their tests with a factory that builds fresh, empty backends.
//! Every panic names the broken rule first. Every wait is bounded ([`WAIT`] for each expected
//! event or interest); no rule asserts how fast anything is. Where a rule says that something
//! is *not* delivered, the suite publishes a marker after it and checks that the marker is
//! what arrives next, instead of sleeping: on the same channel where it can (a duplicate), on
//! another channel the node is subscribed to where it cannot (a channel the node lost
//! interest in, after giving the engine [`SETTLE`] to act on `lost`, which has nothing to
//! wait on).
//!
//! May touch: only what the factories build.

mod cluster;
mod device_removals;
mod device_topics;
mod devices;
mod engine;
#[cfg(test)]
mod fake;
mod history;
mod outbound;
mod outbound_batch;
mod outbound_status;
mod presence;
mod webhook_store;

pub use cluster::{ClusterBackend, run_cluster_suite};
pub use devices::run_device_suite;
pub use engine::run_engine_suite;
pub use history::{RecordingListener, run_history_suite};
pub use outbound::run_outbound_suite;
pub use presence::{MAX_REFRESH_INTERVAL, run_presence_suite};
pub use webhook_store::run_webhook_store_suite;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::task::JoinHandle;

use crate::engine::{Engine, Publish, Published};
use crate::fanout::{FanoutFeed, FanoutQueue, Queued};
use crate::hub::{ChannelInterest, InterestWait, interest_ready, interest_wait};
use crate::publication::{ChannelEvent, ClientInfo, Payload, Publication, PublicationEvent};
use crate::store::{Retention, StoreError};

/// Longest the suites wait for one expected event, interest or expiry step.
pub const WAIT: Duration = Duration::from_secs(5);

/// How long the suites let an engine act on `lost` (which has nothing to wait on) before
/// checking that it did.
pub const SETTLE: Duration = Duration::from_millis(500);

/// Retention long enough that nothing expires during a suite.
const KEEP: Retention = Retention {
    size: 1000,
    ttl: Duration::from_secs(3600),
};

/// Idempotency window long enough that no key is forgotten during a suite.
const WINDOW: Duration = Duration::from_secs(60);

/// JSON data labelled `label` (a JSON string), so deliveries can be matched to publishes.
fn json(label: &str) -> Payload {
    Payload::Json(Bytes::from(format!("\"{label}\"")))
}

fn publication(label: &str) -> Publication {
    Publication {
        offset: 0,
        time_ms: crate::time::now_ms(),
        data: json(label),
        tags: BTreeMap::new(),
        info: None,
    }
}

/// A publish of `label` to `channel`, kept in history.
fn stored(channel: &str, label: &str) -> Publish {
    Publish {
        channel: Arc::from(channel),
        publication: publication(label),
        history: Some(KEEP),
        idempotency: None,
    }
}

/// A publish of `label` to `channel` that skips history.
fn unstored(channel: &str, label: &str) -> Publish {
    Publish {
        history: None,
        ..stored(channel, label)
    }
}

/// `publish` with idempotency key `key`.
fn keyed(publish: Publish, key: &str) -> Publish {
    Publish {
        idempotency: Some((key.to_owned(), WINDOW)),
        ..publish
    }
}

fn client(client: &str, user: &str) -> ClientInfo {
    ClientInfo {
        client: client.into(),
        user: user.into(),
        conn_info: serde_json::value::RawValue::from_string(format!("{{\"c\":\"{client}\"}}")).ok(),
        chan_info: None,
    }
}

async fn publish(engine: &dyn Engine, publish: Publish, rule: &str) -> Published {
    let channel = publish.channel.clone();
    engine
        .publish(publish)
        .await
        .unwrap_or_else(|err| panic!("{rule}: publish to {channel:?} failed: {err}"))
}

/// The position a stored publish returned; panics (naming `rule`) when there is none.
fn position_of(published: &Published, rule: &str) -> crate::publication::StreamPosition {
    match &published.position {
        Some(position) => position.clone(),
        None => {
            panic!("{rule}: a publish with history must return its position, got {published:?}")
        }
    }
}

/// Waits for an interest wait to resolve, whatever it resolves to.
async fn resolved(wait: InterestWait, what: &str, rule: &str) -> Result<(), StoreError> {
    match tokio::time::timeout(WAIT, interest_ready(wait)).await {
        Ok(result) => result.map_err(|err| StoreError::Unavailable(format!("{what}: {err}"))),
        Err(_) => panic!("{rule}: {what} did not resolve within {WAIT:?}"),
    }
}

/// Tells `interest` its node gained `channel`; the wait resolves as the engine decides.
fn gain(interest: &dyn ChannelInterest, channel: &Arc<str>) -> InterestWait {
    let (ready, wait) = interest_wait();
    interest.gained(channel, ready);
    wait
}

/// Tells `engine` that its node gained a subscriber of `channel` and waits until the node
/// receives the channel's events (at once for engines without interest: they deliver
/// everything).
async fn subscribe(engine: &dyn Engine, node: &str, channel: &str, rule: &str) {
    let Some(interest) = engine.interest() else {
        return;
    };
    let what = format!("{node}'s interest in {channel:?}");
    let wait = gain(&*interest, &Arc::from(channel));
    if let Err(err) = resolved(wait, &what, rule).await {
        panic!("{rule}: {what} failed: {err}");
    }
}

/// The output of a spawned task; a panic in it is passed on as it is, so that its message
/// (which names the broken rule) is the test's.
async fn joined<T>(task: &mut JoinHandle<T>) -> T {
    match task.await {
        Ok(output) => output,
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        Err(err) => panic!("a task of the suite was cancelled: {err}"),
    }
}

/// Passes on the panic of any of `tasks` that already ended in one (a failed publish explains
/// a missing delivery better than the wait for it).
async fn rethrow_finished(tasks: &mut [JoinHandle<impl Sized>]) {
    for task in tasks.iter_mut().filter(|t| t.is_finished()) {
        joined(task).await;
    }
}

/// One line describing an event, for panic messages.
fn describe(event: &ChannelEvent) -> String {
    match event {
        ChannelEvent::Publication(p) => format!(
            "publication at offset {} (epoch {:?}, data {:?})",
            p.publication.offset,
            p.epoch,
            String::from_utf8_lossy(p.publication.data.bytes())
        ),
        ChannelEvent::Join { info, .. } => format!("join of {:?}", info.client),
        ChannelEvent::Leave { info, .. } => format!("leave of {:?}", info.client),
        ChannelEvent::Unrecoverable { .. } => "unrecoverable (a gap it could not heal)".into(),
    }
}

/// Records what an engine delivers to one node: the other end of the node's feed.
struct Probe {
    node: String,
    queue: FanoutQueue,
    /// Received and not yet taken, in arrival order.
    pending: VecDeque<ChannelEvent>,
}

impl Probe {
    /// A feed for the engine of `node` and the probe that reads it.
    fn new(node: &str) -> (FanoutFeed, Self) {
        let (feed, queue) = crate::fanout::channel();
        let probe = Self {
            node: node.to_owned(),
            queue,
            pending: VecDeque::new(),
        };
        (feed, probe)
    }

    fn accept(&mut self, queued: Queued) {
        match queued {
            Queued::Event(event) => self.pending.push_back(event),
            Queued::Drained(done) => {
                let _ = done.send(());
            }
        }
    }

    /// The next event of `channel` delivered to this node (events of other channels stay
    /// pending), waiting up to [`WAIT`] for it; `Err` says why there is none.
    async fn try_next(&mut self, channel: &str) -> Result<ChannelEvent, String> {
        loop {
            if let Some(index) = self.pending.iter().position(|e| &**e.channel() == channel)
                && let Some(event) = self.pending.remove(index)
            {
                return Ok(event);
            }
            match tokio::time::timeout(WAIT, self.queue.rx.recv()).await {
                Ok(Some(queued)) => self.accept(queued),
                Ok(None) => {
                    return Err(format!(
                        "{}'s feed was dropped while waiting for an event of {channel:?}",
                        self.node
                    ));
                }
                Err(_) => {
                    return Err(format!(
                        "{} received no event of {channel:?} within {WAIT:?}",
                        self.node
                    ));
                }
            }
        }
    }

    /// [`Probe::try_next`], panicking (naming `rule`) when there is no event.
    async fn next(&mut self, channel: &str, rule: &str) -> ChannelEvent {
        match self.try_next(channel).await {
            Ok(event) => event,
            Err(why) => panic!("{rule}: {why}"),
        }
    }

    /// The next publication of `channel`; any other event of it breaks `rule`.
    async fn publication(&mut self, channel: &str, rule: &str) -> Arc<PublicationEvent> {
        match self.next(channel, rule).await {
            ChannelEvent::Publication(p) => p,
            other => panic!(
                "{rule}: {} expected a publication of {channel:?}, got a {}",
                self.node,
                describe(&other)
            ),
        }
    }

    /// Checks that the next publications of `channel` are exactly `expected` (offset and
    /// label of each), in that order, with `epoch` (`None`: not checked).
    async fn expect(
        &mut self,
        channel: &str,
        expected: &[(u64, &str)],
        epoch: Option<&str>,
        rule: &str,
    ) {
        for (offset, label) in expected {
            let p = self.publication(channel, rule).await;
            assert!(
                p.publication.offset == *offset && p.publication.data == json(label),
                "{rule}: {} expected publication {label:?} at offset {offset} of {channel:?}, \
                 got a {}",
                self.node,
                describe(&ChannelEvent::Publication(p.clone()))
            );
            if let Some(epoch) = epoch {
                assert_eq!(
                    &*p.epoch, epoch,
                    "{rule}: {} received offset {offset} of {channel:?} with another epoch \
                     than publish returned",
                    self.node
                );
            }
        }
    }

    /// Takes every event of `channel` received so far, without waiting.
    fn received(&mut self, channel: &str) -> Vec<ChannelEvent> {
        while let Ok(queued) = self.queue.rx.try_recv() {
            self.accept(queued);
        }
        let (of_channel, others) = self
            .pending
            .drain(..)
            .partition(|e| &**e.channel() == channel);
        self.pending = others;
        of_channel.into()
    }

    /// Panics (naming `rule`) if any event of `channel` has been received.
    fn expect_none(&mut self, channel: &str, rule: &str) {
        let unexpected = self.received(channel);
        assert!(
            unexpected.is_empty(),
            "{rule}: {} received {} unexpected event(s) of {channel:?}: {}",
            self.node,
            unexpected.len(),
            unexpected
                .iter()
                .map(describe)
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
}
