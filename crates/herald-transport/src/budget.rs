//! The process-wide budget for bytes queued to clients. Each connection's queue is bounded
//! (`max_queue_bytes`), but nothing bounded the sum: ten thousand readers that stop reading
//! could hold ten thousand times the per-connection bound. Every connection's
//! [`Outbound`] reports what it holds (queued frames, plus what its writer has handed to the
//! socket and not yet flushed) here; when the total goes over the limit, the connections
//! holding the most are closed as slow (3008) — they recover from history on reconnect —
//! until the total is back under 90% of the limit.
//!
//! Reporting is coarse on purpose: a queue reports only when what it holds moved by
//! [`GRANULE`] bytes since its last report (or emptied), so a healthy connection, whose queue
//! empties on every write, never touches the shared counter. The total is therefore exact to
//! within `GRANULE` per connection.
//!
//! May touch: the queues registered with it (to measure and close them).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
#[cfg(test)]
use std::task::Context;

use parking_lot::Mutex;

use crate::outbound::{CloseReason, Outbound};

/// Changes smaller than this are not reported to the shared total.
pub const GRANULE: usize = 8 * 1024;

/// What enforcement brings the total down to, as a fraction of the limit (per mille).
const LOW_WATERMARK_PER_MILLE: usize = 900;

/// The budget every connection's queue reports to.
pub struct QueueBudget {
    limit: usize,
    used: AtomicUsize,
    /// Queues holding at least [`GRANULE`] bytes, by address: the only candidates for
    /// closing (a queue is listed on its first report and unlisted when it empties).
    queues: Mutex<HashMap<usize, Weak<Outbound>>>,
    enforcing: AtomicBool,
    closed: AtomicU64,
}

impl std::fmt::Debug for QueueBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueBudget")
            .field("limit", &self.limit)
            .field("used", &self.used())
            .finish_non_exhaustive()
    }
}

impl QueueBudget {
    /// A budget of `limit` bytes; 0 means no limit (the total is still measured).
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit: if limit == 0 { usize::MAX } else { limit },
            used: AtomicUsize::new(0),
            queues: Mutex::new(HashMap::new()),
            enforcing: AtomicBool::new(false),
            closed: AtomicU64::new(0),
        })
    }

    /// The limit in bytes (`usize::MAX`: none).
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes the connections reported holding (exact to within [`GRANULE`] per connection).
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Connections closed as slow because the total went over the limit.
    pub fn closed_over_budget(&self) -> u64 {
        self.closed.load(Ordering::Relaxed)
    }

    pub(crate) fn register(&self, key: usize, queue: Weak<Outbound>) {
        self.queues.lock().insert(key, queue);
    }

    pub(crate) fn deregister(&self, key: usize) {
        self.queues.lock().remove(&key);
    }

    /// Queues listed as holding something (for tests).
    #[cfg(test)]
    fn listed(&self) -> usize {
        self.queues.lock().len()
    }

    /// A queue that reported `from` bytes now holds `to`.
    pub(crate) fn report(&self, from: usize, to: usize) {
        if to > from {
            self.used.fetch_add(to - from, Ordering::Relaxed);
        } else {
            self.used.fetch_sub(from - to, Ordering::Relaxed);
        }
    }

    pub(crate) fn over(&self) -> bool {
        self.used() > self.limit
    }

    /// Closes the queues holding the most until the total is under the low watermark. Called
    /// by whoever saw the total go over, with no queue locked; one caller at a time does the
    /// work, the others return at once.
    pub(crate) fn enforce(&self) {
        if self.enforcing.swap(true, Ordering::AcqRel) {
            return;
        }
        let queues: Vec<Arc<Outbound>> = self
            .queues
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        // Queues already closed free what they hold as their connections end (a writer stuck
        // on a stalled socket gives its bytes back when the socket is dropped): count them as
        // gone, or every enforcement until then would close more connections than needed.
        let mut projected = self.used();
        let mut open: Vec<(usize, Arc<Outbound>)> = Vec::with_capacity(queues.len());
        for queue in queues {
            let bytes = queue.held_bytes();
            if queue.closed().is_some() {
                projected = projected.saturating_sub(bytes);
            } else if bytes > 0 {
                open.push((bytes, queue));
            }
        }
        open.sort_unstable_by_key(|(bytes, _)| std::cmp::Reverse(*bytes));
        let target = self.limit / 1000 * LOW_WATERMARK_PER_MILLE;
        let mut closed = 0;
        for (bytes, queue) in &open {
            if projected <= target {
                break;
            }
            if queue.close_if_open(CloseReason::SLOW) {
                closed += 1;
                projected = projected.saturating_sub(*bytes);
            }
        }
        if closed > 0 {
            self.closed.fetch_add(closed, Ordering::Relaxed);
            tracing::warn!(
                closed,
                limit = self.limit,
                "queued outbound bytes over the process budget: closed the slowest connections (3008)"
            );
        }
        self.enforcing.store(false, Ordering::Release);
        // Dropped after the flag is clear: a last reference may deregister its queue.
        drop(open);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn kib(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n * 1024])
    }

    #[test]
    fn over_the_budget_the_queues_holding_the_most_are_closed_first() {
        let budget = QueueBudget::new(100 * 1024);
        let small: Vec<_> = (0..5)
            .map(|_| Outbound::with_budget(1 << 20, &budget))
            .collect();
        let big: Vec<_> = (0..3)
            .map(|_| Outbound::with_budget(1 << 20, &budget))
            .collect();
        for queue in &small {
            assert!(queue.push(kib(10)));
        }
        assert_eq!(budget.used(), 50 * 1024);
        // Readers that stopped reading: their queues grow until the total is over budget.
        for _ in 0..4 {
            for queue in &big {
                queue.push(kib(16));
            }
        }
        assert!(budget.used() <= 100 * 1024, "{}", budget.used());
        for queue in &small {
            assert_eq!(queue.closed(), None, "a queue holding little stays");
        }
        let closed = big
            .iter()
            .filter(|q| q.closed() == Some(CloseReason::SLOW))
            .count();
        assert!(closed >= 1, "the big queues are closed as slow");
        assert_eq!(budget.closed_over_budget(), closed as u64);
        drop(big);
        drop(small);
        assert_eq!(budget.used(), 0, "dropped queues give their bytes back");
    }

    #[test]
    fn small_changes_do_not_touch_the_shared_total() {
        let budget = QueueBudget::new(0);
        let queue = Outbound::with_budget(1 << 20, &budget);
        queue.push(Bytes::from_static(b"a small frame"));
        assert_eq!(budget.used(), 0, "below the granule");
        assert_eq!(budget.listed(), 0, "a queue holding little is not listed");
        queue.push(kib(GRANULE / 1024));
        assert!(budget.used() >= GRANULE);
        assert_eq!(budget.listed(), 1, "listed once it holds a granule");
        // The writer takes it all, writes it, and takes again: nothing is held.
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(queue.poll_take(&mut cx, usize::MAX).is_ready());
        assert!(budget.used() >= GRANULE, "in flight until written");
        assert!(queue.poll_take(&mut cx, usize::MAX).is_pending());
        assert_eq!(budget.used(), 0);
        assert_eq!(budget.listed(), 0, "unlisted once empty");
    }
}
