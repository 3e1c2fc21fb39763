//! Gap healing: one order per channel, even when the transport between nodes loses messages.
//!
//! Owns: [`ChannelOrder`], what a node knows of a channel's stream (epoch and the last offset
//! it delivered), and [`heal`], which turns an incoming publication into what the node must
//! deliver so that its subscribers never see a gap: the publications it missed read back from
//! history, then the new one; or, when history no longer holds them,
//! [`ChannelEvent::Unrecoverable`] (subscribers then recover from their own positions).
//!
//! Offsets are contiguous per channel, so a gap shows at once. A cluster engine keeps one
//! `ChannelOrder` per channel it receives, starting from the stream's top read right after it
//! subscribed, and runs every stored publication it receives through [`heal`].
//!
//! May touch: history, only through the [`History`] it is given.

use std::sync::Arc;

use async_trait::async_trait;

use crate::engine::Engine;
use crate::publication::{ChannelEvent, PublicationEvent, StreamPosition};
use crate::store::{HistoryPage, HistoryQuery, StoreError};

/// Where missed publications are read back from (an engine, or one shard of it).
#[async_trait]
pub trait History: Send + Sync {
    async fn read(&self, channel: &str, query: HistoryQuery) -> Result<HistoryPage, StoreError>;
}

#[async_trait]
impl<T: Engine + ?Sized> History for T {
    async fn read(&self, channel: &str, query: HistoryQuery) -> Result<HistoryPage, StoreError> {
        Engine::read(self, channel, query).await
    }
}

/// Most publications read back to heal one gap; a larger gap makes subscribers recover.
pub const MAX_HEAL: usize = 10_000;

/// What a node has delivered of one channel's stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelOrder {
    pub epoch: Arc<str>,
    /// The last offset delivered (or the top when the node subscribed).
    pub last: u64,
}

impl ChannelOrder {
    pub fn at(top: &StreamPosition) -> Self {
        Self {
            epoch: Arc::from(top.epoch.as_str()),
            last: top.offset,
        }
    }
}

/// What to do with a publication, given the order so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// The next one: deliver it.
    Deliver,
    /// Delivered already (read back while healing, or before the node subscribed): drop it.
    Duplicate,
    /// Offsets `last + 1 .. offset` are missing: heal first.
    Missing,
    /// The stream was reset (another epoch): whatever was missed cannot be told.
    NewEpoch,
}

impl ChannelOrder {
    pub fn next(&self, event: &PublicationEvent) -> Next {
        let offset = event.publication.offset;
        if *event.epoch != *self.epoch && !self.epoch.is_empty() {
            Next::NewEpoch
        } else if offset <= self.last {
            Next::Duplicate
        } else if offset == self.last + 1 {
            Next::Deliver
        } else {
            Next::Missing
        }
    }
}

/// Brings `order` up to `top` (read after a reconnect or a resubscribe) by reading what was
/// missed from history; returns what to deliver, in order.
pub async fn catch_up(
    history: &dyn History,
    channel: &Arc<str>,
    order: &mut ChannelOrder,
    top: &StreamPosition,
) -> Vec<ChannelEvent> {
    if *top.epoch != *order.epoch && !order.epoch.is_empty() {
        *order = ChannelOrder::at(top);
        return vec![ChannelEvent::Unrecoverable {
            channel: channel.clone(),
        }];
    }
    if top.offset <= order.last {
        return Vec::new();
    }
    let mut out = Vec::new();
    read_missing(history, channel, order, top.offset, &mut out).await;
    out
}

/// What to deliver for a stored publication `event` received from the engine, in order:
/// nothing (a duplicate), the publication, or the missed ones read back from history before
/// it; [`ChannelEvent::Unrecoverable`] first when they cannot be read back. Updates `order`.
pub async fn heal(
    history: &dyn History,
    order: &mut ChannelOrder,
    event: Arc<PublicationEvent>,
) -> Vec<ChannelEvent> {
    let mut out = Vec::new();
    match order.next(&event) {
        Next::Duplicate => return out,
        Next::Deliver => {}
        Next::NewEpoch => {
            out.push(ChannelEvent::Unrecoverable {
                channel: event.channel.clone(),
            });
            order.epoch = event.epoch.clone();
        }
        Next::Missing => {
            let before = event.publication.offset;
            read_missing(history, &event.channel, order, before - 1, &mut out).await;
        }
    }
    order.last = event.publication.offset;
    out.push(ChannelEvent::Publication(event));
    out
}

/// Reads offsets `order.last + 1 ..= to` into `out` and moves `order` to `to`; pushes
/// [`ChannelEvent::Unrecoverable`] when history does not hold all of them.
async fn read_missing(
    history: &dyn History,
    channel: &Arc<str>,
    order: &mut ChannelOrder,
    to: u64,
    out: &mut Vec<ChannelEvent>,
) {
    let missing = to.saturating_sub(order.last);
    let read = if missing as usize > MAX_HEAL {
        None
    } else {
        let query = HistoryQuery {
            since: Some(StreamPosition::new(order.last, &*order.epoch)),
            limit: Some(missing as usize),
            reverse: false,
        };
        match history.read(channel, query).await {
            Ok(page) => {
                let contiguous = page
                    .publications
                    .iter()
                    .zip(order.last + 1..)
                    .all(|(p, expected)| p.offset == expected)
                    && page.publications.len() as u64 == missing;
                contiguous.then_some(page)
            }
            Err(err) => {
                tracing::warn!(channel = &**channel, error = %err, "reading missed publications failed");
                None
            }
        }
    };
    match read {
        Some(page) => {
            tracing::debug!(channel = &**channel, missing, "healed a gap from history");
            for publication in page.publications {
                out.push(ChannelEvent::Publication(Arc::new(PublicationEvent::new(
                    channel.clone(),
                    order.epoch.clone(),
                    publication,
                ))));
            }
        }
        None => {
            tracing::warn!(
                channel = &**channel,
                missing,
                "missed publications are no longer in history: subscribers must recover"
            );
            out.push(ChannelEvent::Unrecoverable {
                channel: channel.clone(),
            });
        }
    }
    order.last = to;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{LocalEngine, Publish};
    use crate::memory::MemoryHistoryStore;
    use crate::publication::{Payload, Publication};
    use crate::store::Retention;
    use std::time::Duration;

    fn publication() -> Publication {
        Publication {
            offset: 0,
            time_ms: 0,
            data: Payload::Json(bytes::Bytes::from_static(b"{}")),
            tags: Default::default(),
            info: None,
        }
    }

    /// An engine holding `count` publications of channel `c` (keeping the last `keep`), and
    /// the events it delivered.
    async fn engine(count: u64, keep: u32) -> (LocalEngine, Vec<Arc<PublicationEvent>>) {
        let (feed, mut queue) = crate::fanout::channel();
        let history = Arc::new(MemoryHistoryStore::new(Arc::new(feed.clone())));
        let engine = LocalEngine::new(history, feed);
        for _ in 0..count {
            engine
                .publish(Publish {
                    channel: Arc::from("c"),
                    publication: publication(),
                    history: Some(Retention {
                        size: keep,
                        ttl: Duration::from_secs(60),
                    }),
                    idempotency: None,
                })
                .await
                .expect("publish");
        }
        let mut events = Vec::new();
        while let Ok(crate::fanout::Queued::Event(ChannelEvent::Publication(p))) =
            queue.rx.try_recv()
        {
            events.push(p);
        }
        (engine, events)
    }

    fn offsets(events: &[ChannelEvent]) -> Vec<Option<u64>> {
        events
            .iter()
            .map(|e| match e {
                ChannelEvent::Publication(p) => Some(p.publication.offset),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_gap_is_read_back_from_history_in_order() {
        let (engine, events) = engine(6, 100).await;
        let mut order = ChannelOrder::at(&StreamPosition::new(1, &*events[0].epoch));
        let out = heal(&engine, &mut order, events[1].clone()).await;
        assert_eq!(offsets(&out), [Some(2)]);
        // 3, 4 and 5 were lost on the way: 6 arrives.
        let out = heal(&engine, &mut order, events[5].clone()).await;
        assert_eq!(offsets(&out), [Some(3), Some(4), Some(5), Some(6)]);
        assert_eq!(order.last, 6);
        // A late copy of 4 is a duplicate.
        assert!(
            heal(&engine, &mut order, events[3].clone())
                .await
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_gap_history_no_longer_holds_makes_subscribers_recover() {
        let (engine, events) = engine(10, 2).await;
        let mut order = ChannelOrder::at(&StreamPosition::new(1, &*events[0].epoch));
        let out = heal(&engine, &mut order, events[9].clone()).await;
        assert_eq!(offsets(&out), [None, Some(10)], "unrecoverable, then 10");
        assert!(matches!(out[0], ChannelEvent::Unrecoverable { .. }));
    }

    #[tokio::test]
    async fn catching_up_to_a_top_reads_what_was_missed() {
        let (engine, events) = engine(5, 100).await;
        let epoch = events[0].epoch.to_string();
        let channel: Arc<str> = Arc::from("c");
        let mut order = ChannelOrder::at(&StreamPosition::new(2, &*epoch));
        let out = catch_up(
            &engine,
            &channel,
            &mut order,
            &StreamPosition::new(5, &*epoch),
        )
        .await;
        assert_eq!(offsets(&out), [Some(3), Some(4), Some(5)]);
        let out = catch_up(
            &engine,
            &channel,
            &mut order,
            &StreamPosition::new(5, &*epoch),
        )
        .await;
        assert!(out.is_empty());
        let out = catch_up(
            &engine,
            &channel,
            &mut order,
            &StreamPosition::new(1, "other"),
        )
        .await;
        assert_eq!(offsets(&out), [None], "a reset stream cannot be healed");
        assert_eq!(order.last, 1);
    }
}
