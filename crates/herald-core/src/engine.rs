//! The engine port: publishing is storing and fanning out, in one step.
//!
//! Owns: the [`Engine`] trait every backend implements (the embedded engines here and in
//! `herald-store`, Redis for a cluster), what a publish asks for ([`Publish`]) and what it
//! gets back ([`Published`]), and [`LocalEngine`], the single-node engine over any
//! [`HistoryStore`].
//!
//! Contract (checked by [`crate::conformance`]):
//! - `publish` stores the publication when asked (offsets per channel contiguous from 1,
//!   idempotency keys deduplicated inside their window, on every node) and delivers it, after
//!   it is stored, to the [`FanoutFeed`] of every node subscribed to its channel (this one
//!   included), in offset order per channel;
//! - `announce` delivers an event that is never stored (join, leave) the same way;
//! - a node says which channels it wants events of through the [`ChannelInterest`] the engine
//!   gives it (none for single-node engines: everything published here is delivered here);
//! - a node that could not deliver every publication of a channel in order (the engine lost
//!   them and history no longer holds them) delivers [`ChannelEvent::Unrecoverable`] instead
//!   of a silent gap.
//!
//! May touch: nothing outside the process itself; backends with network I/O live in
//! `herald-store`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::fanout::FanoutFeed;
use crate::hub::ChannelInterest;
use crate::idempotency::IdempotencyWindow;
use crate::publication::{ChannelEvent, Publication, PublicationEvent, StreamPosition};
use crate::store::{AppendRequest, HistoryPage, HistoryQuery, HistoryStore, Retention, StoreError};
use crate::time::now_ms;

/// One publication to publish.
#[derive(Clone, Debug)]
pub struct Publish {
    pub channel: Arc<str>,
    /// Its `offset` is ignored and assigned by the engine when the publication is stored.
    pub publication: Publication,
    /// Store it in the channel's history, kept as this says; `None`: deliver only.
    pub history: Option<Retention>,
    /// Key and window for deduplication (also when not stored).
    pub idempotency: Option<(String, Duration)>,
}

/// The outcome of a publish.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Published {
    /// Where it was stored (for a duplicate: where the first one was); `None` if not stored.
    pub position: Option<StreamPosition>,
    /// The idempotency key was seen inside its window: nothing was published this time.
    pub duplicate: bool,
}

/// Stores and moves a node's publications.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Stores (when `publish.history` asks) and delivers a publication (see the module
    /// contract). Fails with [`StoreError::Unavailable`] when the engine cannot be reached:
    /// nothing was published then, or (after a timeout) it may have been, which a retry with
    /// the same idempotency key makes harmless.
    async fn publish(&self, publish: Publish) -> Result<Published, StoreError>;

    /// Publishes several publications as consecutive `publish`es would: a channel's offsets
    /// and deliveries in the order given, one result per publish. Engines that can store them
    /// in one write override it; the default publishes one after another.
    async fn publish_many(&self, publishes: Vec<Publish>) -> Vec<Result<Published, StoreError>> {
        let mut results = Vec::with_capacity(publishes.len());
        for publish in publishes {
            results.push(self.publish(publish).await);
        }
        results
    }

    /// Delivers an event that is not stored (join, leave) to every node subscribed to its
    /// channel.
    async fn announce(&self, event: ChannelEvent) -> Result<(), StoreError>;

    /// Reads a page of a stream. An epoch mismatch or an offset ahead of the top is
    /// [`StoreError::UnrecoverablePosition`].
    async fn read(&self, channel: &str, query: HistoryQuery) -> Result<HistoryPage, StoreError>;

    /// Deletes a stream's publications; its top offset and epoch stay.
    async fn remove(&self, channel: &str) -> Result<(), StoreError>;

    /// Waits until everything accepted so far is stored and handed on (used on shutdown).
    async fn flush(&self) -> Result<(), StoreError>;

    /// How the hub tells the engine which channels this node has subscribers of; `None` when
    /// every publication reaches this node anyway (single-node engines).
    fn interest(&self) -> Option<Arc<dyn ChannelInterest>> {
        None
    }

    /// False while the engine cannot be reached (what `/ready` reports).
    fn healthy(&self) -> bool {
        true
    }
}

/// Where an engine hands the events it delivers (the node's [`FanoutFeed`]).
pub trait EventSink: Send + Sync + 'static {
    fn deliver(&self, event: ChannelEvent);
}

impl EventSink for FanoutFeed {
    fn deliver(&self, event: ChannelEvent) {
        self.push(event);
    }
}

/// The single-node engine: a [`HistoryStore`] whose commit listener is the node's
/// [`FanoutFeed`], so stored publications are delivered by the store after commit, and
/// publications that skip history go straight to the feed.
pub struct LocalEngine {
    history: Arc<dyn HistoryStore>,
    feed: Arc<dyn EventSink>,
    /// Idempotency of publications that are not stored (stored ones are the store's).
    unstored_idempotency: Mutex<IdempotencyWindow<()>>,
}

impl std::fmt::Debug for LocalEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalEngine").finish_non_exhaustive()
    }
}

impl LocalEngine {
    /// `history` must have been built with `feed` as its commit listener.
    pub fn new(history: Arc<dyn HistoryStore>, feed: impl EventSink) -> Self {
        Self {
            history,
            feed: Arc::new(feed),
            unstored_idempotency: Mutex::new(IdempotencyWindow::new(
                crate::memory::IDEMPOTENCY_CAPACITY,
            )),
        }
    }
}

/// Milliseconds after `now` that `window` ends.
pub fn deadline_after(now: u64, window: Duration) -> u64 {
    now.saturating_add(u64::try_from(window.as_millis()).unwrap_or(u64::MAX))
}

#[async_trait]
impl Engine for LocalEngine {
    async fn publish(&self, publish: Publish) -> Result<Published, StoreError> {
        if let Some(retention) = publish.history {
            let appended = self
                .history
                .append(AppendRequest {
                    channel: publish.channel,
                    publication: publish.publication,
                    retention,
                    idempotency: publish.idempotency,
                })
                .await?;
            return Ok(Published {
                position: Some(appended.position),
                duplicate: appended.duplicate,
            });
        }
        if let Some((key, window)) = &publish.idempotency {
            let now = now_ms();
            let mut seen = self.unstored_idempotency.lock();
            if seen.get(&publish.channel, key, now).is_some() {
                return Ok(Published {
                    position: None,
                    duplicate: true,
                });
            }
            seen.insert(&publish.channel, key, (), deadline_after(now, *window));
        }
        let event = PublicationEvent::new(publish.channel, Arc::from(""), publish.publication);
        self.feed
            .deliver(ChannelEvent::Publication(Arc::new(event)));
        Ok(Published::default())
    }

    /// Publications that are all stored go to the history store in one `append_many` (one
    /// group commit with SQLite); any other mix is published one after another.
    async fn publish_many(&self, publishes: Vec<Publish>) -> Vec<Result<Published, StoreError>> {
        if publishes.iter().any(|publish| publish.history.is_none()) {
            let mut results = Vec::with_capacity(publishes.len());
            for publish in publishes {
                results.push(self.publish(publish).await);
            }
            return results;
        }
        let appends = publishes
            .into_iter()
            .filter_map(|publish| {
                Some(AppendRequest {
                    retention: publish.history?,
                    channel: publish.channel,
                    publication: publish.publication,
                    idempotency: publish.idempotency,
                })
            })
            .collect();
        self.history
            .append_many(appends)
            .await
            .into_iter()
            .map(|appended| {
                appended.map(|appended| Published {
                    position: Some(appended.position),
                    duplicate: appended.duplicate,
                })
            })
            .collect()
    }

    async fn announce(&self, event: ChannelEvent) -> Result<(), StoreError> {
        self.feed.deliver(event);
        Ok(())
    }

    async fn read(&self, channel: &str, query: HistoryQuery) -> Result<HistoryPage, StoreError> {
        self.history.read(channel, query).await
    }

    async fn remove(&self, channel: &str) -> Result<(), StoreError> {
        self.history.remove(channel).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.history.flush().await
    }
}
