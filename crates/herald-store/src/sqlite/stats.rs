//! Counters of the store's work, for benchmarks and diagnostics.
//!
//! Owns: [`StoreStats`] (a plain snapshot) and the atomic counters behind it.
//!
//! May touch: nothing; the writer and the checkpointer bump the counters with relaxed atomics
//! (once per batch, once per checkpoint).

use std::sync::atomic::{AtomicU64, Ordering};

/// What the store has done since it was opened. Counters only grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Transactions committed by the writer for commands (group commits).
    pub batches: u64,
    /// Commands (appends, removes, flushes) in those transactions.
    pub commands: u64,
    /// WAL checkpoints run by the checkpointer thread (of any kind).
    pub checkpoints: u64,
    /// Times the checkpointer paused the writer to restart an oversized WAL.
    pub wal_restarts: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    batches: AtomicU64,
    commands: AtomicU64,
    checkpoints: AtomicU64,
    wal_restarts: AtomicU64,
}

impl Counters {
    pub(crate) fn batch(&self, commands: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.commands.fetch_add(
            u64::try_from(commands).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    pub(crate) fn checkpoint(&self) {
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn wal_restart(&self) {
        self.wal_restarts.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> StoreStats {
        StoreStats {
            batches: self.batches.load(Ordering::Relaxed),
            commands: self.commands.load(Ordering::Relaxed),
            checkpoints: self.checkpoints.load(Ordering::Relaxed),
            wal_restarts: self.wal_restarts.load(Ordering::Relaxed),
        }
    }
}
