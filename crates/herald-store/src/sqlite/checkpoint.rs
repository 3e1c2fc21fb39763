//! The checkpointer thread: copies the write-ahead log back into the database file, off the
//! commit path, and keeps the WAL file bounded.
//!
//! Owns: its own connection to the database, the checkpoint schedule, the decision to
//! restart the WAL, and [`WalControl`], what the writer and the checkpointer share.
//!
//! May touch: the database and its WAL through that connection (checkpoints only, never
//! rows). It holds the writer off (through [`WalControl::gate`]) only while it restarts the
//! WAL.
//!
//! Why a thread of its own: SQLite's automatic checkpoint runs inside `COMMIT` on the
//! connection that commits, and a checkpoint fsyncs the WAL and the database file even under
//! `synchronous=NORMAL`. On the writer thread that stalled every publication in flight for
//! the length of an fsync, many times a second. The writer now runs with
//! `wal_autocheckpoint=0` and never checkpoints; this thread runs a `PASSIVE` checkpoint every
//! [`CHECKPOINT_INTERVAL`], which neither waits for nor blocks the writer or the readers.
//!
//! Why restarts: a `PASSIVE` checkpoint copies the frames that were in the WAL when it
//! started. Under continuous writes new frames always arrive meanwhile, so the WAL is never
//! completely copied back, SQLite never starts writing it from the beginning again, and the
//! file grows without bound. So the writer checks the WAL's size between batches; past
//! [`WAL_RESTART_BYTES`] it asks this thread for a restart, which first catches up (a passive
//! checkpoint and an fsync of the WAL, while the writer goes on), then takes the gate
//! (waiting for the writer's batch in progress to commit) and runs `wal_checkpoint(RESTART)`:
//! it copies the short remainder, syncs, and makes the next commit write the WAL from its
//! start (SQLite then truncates the file to `journal_size_limit`, the same size). The writer
//! waits for that remainder only (two fsyncs of little data); queued publications then go
//! into one bigger batch. If the writer outruns the checkpoints anyway (a slow disk), it
//! stops at [`WAL_HARD_LIMIT_BYTES`] until a restart is done: that is what makes the bound
//! hold.

use std::fs::{self, File};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rusqlite::Connection;

use super::stats::Counters;

/// How often the WAL is copied back into the database file. Shorter keeps the WAL (and the
/// tail a restart has to copy while the writer waits) smaller; longer copies a page that is
/// rewritten many times (a busy channel's last page) once instead of many times.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

/// WAL size past which the writer asks for a restart. Also the size SQLite truncates the WAL
/// file to when it restarts (`journal_size_limit`), so an idle store keeps at most this much.
///
/// Each restart holds the writer for two fsyncs and a short copy (measured behind the HTTP
/// API, server on one core: 12–29 ms, about every 0.7 s at 64 MiB). Twice the size halves
/// how often that happens (p99.9 38 → 32 ms there) for 64 MiB more disk.
pub const WAL_RESTART_BYTES: u64 = 128 * 1024 * 1024;

/// WAL size at which the writer stops and waits for a restart (backpressure); one batch can
/// still be added on top.
pub const WAL_HARD_LIMIT_BYTES: u64 = 2 * WAL_RESTART_BYTES;

/// Before a restart holds the writer off, passive checkpoints are repeated (at most
/// [`CATCH_UP_ROUNDS`]) until one finds no more than this much new in the WAL.
const CATCH_UP_TAIL_BYTES: u64 = 1024 * 1024;
const CATCH_UP_ROUNDS: usize = 4;

/// Longest the writer waits at the hard limit. Reached only if the checkpointer is stuck
/// (a reader that never finishes); the writer then carries on and asks again.
const HARD_LIMIT_WAIT: Duration = Duration::from_secs(10);

/// A message to the checkpointer thread.
pub enum Signal {
    /// The WAL is over [`WAL_RESTART_BYTES`]. `done` is dropped once the restart was tried; the
    /// writer sends one when it waits at the hard limit.
    Restart { done: Option<Sender<()>> },
    /// Stop. `last` is a final checkpoint mode to run first (`TRUNCATE` once the writer has
    /// stopped, so a cleanly closed store leaves an empty WAL behind).
    Stop { last: Option<&'static str> },
}

/// What the writer and the checkpointer share.
pub struct WalControl {
    /// Held by the writer for each transaction and by the checkpointer for a restart, so
    /// neither ever waits in SQLite's busy handler (which sleeps in steps of milliseconds)
    /// for the other. The writer releases it fairly, so a waiting restart gets it next.
    pub gate: Mutex<()>,
    wal: PathBuf,
    signals: Sender<Signal>,
    /// A restart was asked for and has not run yet: ask only once.
    restart_pending: AtomicBool,
}

impl WalControl {
    pub fn new(wal: PathBuf, signals: Sender<Signal>) -> Self {
        Self {
            gate: Mutex::new(()),
            wal,
            signals,
            restart_pending: AtomicBool::new(false),
        }
    }

    /// Called by the writer after a batch (at most every few milliseconds): asks for a
    /// restart when the WAL is over its bound, and waits for one at the hard limit. One
    /// `stat` when under the bound.
    pub fn after_batch(&self) {
        let len = fs::metadata(&self.wal).map_or(0, |m| m.len());
        // Strictly over: after a restart SQLite truncates the file to exactly the bound.
        if len <= WAL_RESTART_BYTES {
            return;
        }
        if len >= WAL_HARD_LIMIT_BYTES {
            let (done, restarted) = mpsc::channel();
            self.restart_pending.store(true, Ordering::Release);
            if self
                .signals
                .send(Signal::Restart { done: Some(done) })
                .is_ok()
            {
                tracing::debug!(
                    wal_bytes = len,
                    "sqlite WAL at its hard limit; writer waits"
                );
                // Returns when the checkpointer drops `done`, or on timeout.
                let _ = restarted.recv_timeout(HARD_LIMIT_WAIT);
            }
        } else if !self.restart_pending.swap(true, Ordering::AcqRel)
            && self.signals.send(Signal::Restart { done: None }).is_err()
        {
            // The checkpointer has stopped (the store is closing); nothing to wait for.
            self.restart_pending.store(false, Ordering::Release);
        }
    }
}

/// What one `PRAGMA wal_checkpoint` reported.
#[derive(Clone, Copy, Debug)]
struct Outcome {
    /// The checkpoint could not finish (a lock was held) and did what it could.
    busy: bool,
    /// Frames in the WAL when the checkpoint started.
    frames: i64,
}

/// The checkpointer thread's state.
pub struct Checkpointer {
    conn: Connection,
    control: Arc<WalControl>,
    counters: Arc<Counters>,
    /// Bytes one WAL frame takes: the page plus its 24-byte frame header.
    frame_bytes: u64,
}

impl Checkpointer {
    pub fn new(conn: Connection, control: Arc<WalControl>, counters: Arc<Counters>) -> Self {
        let page_size: i64 = conn
            .query_row("PRAGMA page_size", [], |row| row.get(0))
            .unwrap_or(4096);
        Self {
            conn,
            control,
            counters,
            frame_bytes: u64::try_from(page_size).unwrap_or(4096) + 24,
        }
    }

    /// The thread's body: a passive checkpoint every [`CHECKPOINT_INTERVAL`], a restart when
    /// the writer asks, until told to stop (or the store is gone).
    pub fn run(self, signals: Receiver<Signal>) {
        loop {
            match signals.recv_timeout(CHECKPOINT_INTERVAL) {
                Err(RecvTimeoutError::Timeout) => {
                    self.checkpoint("PASSIVE");
                }
                Ok(Signal::Restart { done }) => {
                    // A writer waiting at the hard limit adds nothing: no catching up first.
                    self.restart(done.is_none());
                    // Dropping `done` releases a writer waiting at the hard limit.
                    drop(done);
                }
                Ok(Signal::Stop { last }) => {
                    if let Some(mode) = last {
                        self.checkpoint(mode);
                    }
                    break;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        tracing::debug!("sqlite checkpointer stopped");
    }

    /// Restarts the WAL: catches up without holding the writer, then holds it off between
    /// two transactions for the short remainder.
    ///
    /// What the writer waits for is dominated by fsyncs (a `RESTART` syncs the WAL, copies
    /// the frames added since the last checkpoint, syncs the database file). So the work that
    /// can be done while the writer goes on is done first: a passive checkpoint (when the
    /// writer is not already waiting), then an fsync of the WAL, so that the `RESTART` only has
    /// the last few frames to sync and copy.
    fn restart(&self, catch_up: bool) {
        if catch_up {
            // Repeated while each finds much that the writer added during the one before.
            let mut frames = None;
            for _ in 0..CATCH_UP_ROUNDS {
                let Some(outcome) = self.checkpoint("PASSIVE") else {
                    break;
                };
                let added = frames.map_or(i64::MAX, |before| outcome.frames - before);
                frames = Some(outcome.frames);
                if u64::try_from(added)
                    .unwrap_or(0)
                    .saturating_mul(self.frame_bytes)
                    <= CATCH_UP_TAIL_BYTES
                {
                    break;
                }
            }
        }
        if let Err(error) = File::open(&self.control.wal).and_then(|wal| wal.sync_data()) {
            tracing::debug!(error = %error, "syncing the sqlite WAL before a restart failed");
        }
        let gate = self.control.gate.lock();
        let held = Instant::now();
        if let Some(outcome) = self.checkpoint("RESTART") {
            if outcome.busy {
                // A reader still needed the old WAL: everything is copied, and the WAL
                // restarts with a later commit or the next request.
                tracing::debug!(?outcome, "sqlite WAL restart was busy");
            } else {
                self.counters.wal_restart();
                tracing::debug!(
                    frames = outcome.frames,
                    writer_held_us = held.elapsed().as_micros(),
                    "sqlite WAL restarted"
                );
            }
        }
        self.control.restart_pending.store(false, Ordering::Release);
        drop(gate);
    }

    /// Runs one checkpoint in `mode`; `None` (after logging) if SQLite reported an error.
    fn checkpoint(&self, mode: &str) -> Option<Outcome> {
        let sql = format!("PRAGMA wal_checkpoint({mode})");
        let result = self.conn.query_row(&sql, [], |row| {
            Ok(Outcome {
                busy: row.get::<_, i64>(0)? != 0,
                frames: row.get(1)?,
            })
        });
        match result {
            Ok(outcome) => {
                self.counters.checkpoint();
                tracing::trace!(mode, ?outcome, "sqlite checkpoint");
                Some(outcome)
            }
            Err(error) => {
                // The WAL keeps everything; the next round tries again.
                tracing::warn!(error = %error, mode, "sqlite checkpoint failed");
                None
            }
        }
    }
}
