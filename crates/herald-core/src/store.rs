//! The history port: durable, ordered per-channel streams.
//!
//! Contract every backend keeps (checked by [`crate::conformance`]):
//! - offsets per channel start at 1 and grow by exactly 1 per stored publication;
//! - an epoch names one incarnation of a stream; a backend that loses a stream (a fresh memory
//!   store, a new database) reports a different epoch;
//! - `append` returns only after the publication is stored under the backend's durability
//!   policy, and hands every stored publication to the [`CommitListener`] in offset order per
//!   channel, after it is stored (so fan-out never runs ahead of history);
//! - retention drops the oldest publications beyond `size` and any older than `ttl`;
//! - a repeated idempotency key within its window returns the first result and stores nothing.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::publication::{Publication, PublicationEvent, StreamPosition};

/// Backend failures. Position errors are the caller's; the rest are the backend's.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("unrecoverable position: {0}")]
    UnrecoverablePosition(String),
    #[error("history store unavailable: {0}")]
    Unavailable(String),
    #[error("history store error: {0}")]
    Backend(String),
}

/// How much of a stream to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    pub size: u32,
    pub ttl: Duration,
}

/// One publication to store.
#[derive(Clone, Debug)]
pub struct AppendRequest {
    pub channel: Arc<str>,
    /// The publication; its `offset` is ignored and assigned by the store.
    pub publication: Publication,
    pub retention: Retention,
    /// Key and window for deduplication.
    pub idempotency: Option<(String, Duration)>,
}

/// The outcome of an append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    /// Position of the stored publication (or of the first one, for a duplicate).
    pub position: StreamPosition,
    /// True if the idempotency key was seen inside its window and nothing was stored.
    pub duplicate: bool,
}

/// Which part of a stream to read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Read after (forward) or before (reverse) this position. `None`: from the oldest
    /// (forward) or the newest (reverse) retained publication. An empty epoch is not checked.
    pub since: Option<StreamPosition>,
    /// At most this many publications; `None` for all retained.
    pub limit: Option<usize>,
    /// Newest first.
    pub reverse: bool,
}

/// Publications read from a stream, and the stream's current top.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryPage {
    pub publications: Vec<Publication>,
    pub position: StreamPosition,
}

/// Receives every stored publication, in offset order per channel, after it is stored.
pub trait CommitListener: Send + Sync + 'static {
    fn committed(&self, event: Arc<PublicationEvent>);
}

/// A durable, ordered per-channel publication log.
#[async_trait]
pub trait HistoryStore: Send + Sync + 'static {
    /// Stores a publication, assigning the next offset (see the module contract).
    async fn append(&self, request: AppendRequest) -> Result<Appended, StoreError>;

    /// Stores several publications as consecutive `append`s would (a channel's offsets in the
    /// order given), one result per request. Stores that can put them in one write (one group
    /// commit) override it; the default appends one after another.
    async fn append_many(&self, requests: Vec<AppendRequest>) -> Vec<Result<Appended, StoreError>> {
        let mut results = Vec::with_capacity(requests.len());
        for request in requests {
            results.push(self.append(request).await);
        }
        results
    }

    /// Reads a page of a stream. An epoch mismatch or an offset ahead of the top is
    /// [`StoreError::UnrecoverablePosition`].
    async fn read(&self, channel: &str, query: HistoryQuery) -> Result<HistoryPage, StoreError>;

    /// Deletes a stream's publications; its top offset and epoch stay, so readers can tell
    /// that what they missed is gone.
    async fn remove(&self, channel: &str) -> Result<(), StoreError>;

    /// Waits until everything accepted so far is stored (used on shutdown).
    async fn flush(&self) -> Result<(), StoreError>;
}

/// The checks every backend applies to `since` before reading; shared so that the rule is
/// written once.
pub fn check_since(since: &StreamPosition, top: &StreamPosition) -> Result<(), StoreError> {
    if !since.epoch.is_empty() && since.epoch != top.epoch {
        return Err(StoreError::UnrecoverablePosition(format!(
            "epoch {:?} does not match the stream's epoch {:?}",
            since.epoch, top.epoch
        )));
    }
    if since.offset > top.offset {
        return Err(StoreError::UnrecoverablePosition(format!(
            "offset {} is ahead of the stream top {}",
            since.offset, top.offset
        )));
    }
    Ok(())
}

/// Which offsets a query selects, given the retained range `first..=top`
/// (`first > top` when nothing is retained). Returns `(from, to, reverse)` inclusive bounds
/// or `None` when the page is empty. Shared by backends so paging is identical everywhere.
pub fn select_range(query: &HistoryQuery, first: u64, top: u64) -> Option<(u64, u64)> {
    let limit = query.limit.map(|l| l as u64);
    if limit == Some(0) || first > top {
        return None;
    }
    if query.reverse {
        let end = match &query.since {
            Some(since) => since.offset.checked_sub(1)?,
            None => top,
        };
        let end = end.min(top);
        if end < first {
            return None;
        }
        let start = match limit {
            Some(l) => end.saturating_sub(l - 1).max(first),
            None => first,
        };
        Some((start, end))
    } else {
        let start = match &query.since {
            Some(since) => since.offset.saturating_add(1).max(first),
            None => first,
        };
        if start > top {
            return None;
        }
        let end = match limit {
            Some(l) => start.saturating_add(l - 1).min(top),
            None => top,
        };
        Some((start, end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(since: Option<u64>, limit: Option<usize>, reverse: bool) -> HistoryQuery {
        HistoryQuery {
            since: since.map(|o| StreamPosition::new(o, "")),
            limit,
            reverse,
        }
    }

    #[test]
    fn ranges_cover_paging_cases() {
        // retained 5..=10
        assert_eq!(select_range(&q(None, None, false), 5, 10), Some((5, 10)));
        assert_eq!(select_range(&q(None, Some(2), false), 5, 10), Some((5, 6)));
        assert_eq!(select_range(&q(None, Some(2), true), 5, 10), Some((9, 10)));
        assert_eq!(
            select_range(&q(Some(7), Some(2), false), 5, 10),
            Some((8, 9))
        );
        assert_eq!(select_range(&q(Some(1), None, false), 5, 10), Some((5, 10)));
        assert_eq!(select_range(&q(Some(10), None, false), 5, 10), None);
        assert_eq!(
            select_range(&q(Some(7), Some(10), true), 5, 10),
            Some((5, 6))
        );
        assert_eq!(select_range(&q(Some(5), None, true), 5, 10), None);
        assert_eq!(select_range(&q(Some(0), None, true), 5, 10), None);
        assert_eq!(select_range(&q(None, Some(0), false), 5, 10), None);
        assert_eq!(select_range(&q(None, None, false), 11, 10), None);
    }

    #[test]
    fn since_checks_epoch_and_future() {
        let top = StreamPosition::new(5, "e1");
        assert!(check_since(&StreamPosition::new(5, "e1"), &top).is_ok());
        assert!(check_since(&StreamPosition::new(3, ""), &top).is_ok());
        assert!(check_since(&StreamPosition::new(3, "e0"), &top).is_err());
        assert!(check_since(&StreamPosition::new(6, "e1"), &top).is_err());
    }
}
