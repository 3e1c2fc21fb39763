//! The embedded, durable stores: history in `<data_dir>/herald.db`, and the push side's
//! device registry and outbound queue in `<data_dir>/outbound.db` (module `outbound`).
//!
//! Owns: [`SqliteHistoryStore`], the [`HistoryStore`] implementation that wires callers to
//! the writer thread (appends, removes, flushes) and to the reader pool (reads), and the
//! store's lifecycle (open, close, drop) including the checkpointer thread's.
//!
//! May touch: the data directory (through `schema`), two OS threads (the writer, and the
//! checkpointer that copies the WAL back into the database file) and tokio's blocking pool
//! for reads. Async callers never block: they queue a command and await its reply.
//!
//! Durability: `append` returns after the transaction holding the publication committed
//! under the configured [`SyncPolicy`], and the listener sees it only after that commit.

mod checkpoint;
mod codec;
mod config;
mod inbox;
mod outbound;
mod reader;
mod schema;
mod stats;
mod writer;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};

use async_trait::async_trait;
use herald_core::store::{
    AppendRequest, Appended, CommitListener, HistoryPage, HistoryQuery, HistoryStore, StoreError,
};
use parking_lot::Mutex;
use tokio::sync::oneshot;

pub use checkpoint::{WAL_HARD_LIMIT_BYTES, WAL_RESTART_BYTES};
pub use config::{DATABASE_FILE, LOCK_FILE, SqliteConfig, SyncPolicy};
pub use outbound::{
    OUTBOUND_FILE, OUTBOUND_SCHEMA_VERSION, OutboundDb, SqliteDeviceStore, SqliteOutboundQueue,
    SqliteWebhookStore,
};
pub use schema::{OpenError, SCHEMA_VERSION};
pub use stats::StoreStats;

use checkpoint::{Checkpointer, Signal, WalControl};
use inbox::CommandSender;
use reader::ReaderPool;
use stats::Counters;
use writer::{Command, Writer};

/// History kept in `<data_dir>/herald.db`, written by one group-committing thread.
pub struct SqliteHistoryStore {
    commands: CommandSender,
    writer: Mutex<Option<JoinHandle<()>>>,
    checkpointer: Mutex<Option<(mpsc::Sender<Signal>, JoinHandle<()>)>>,
    readers: Arc<ReaderPool>,
    counters: Arc<Counters>,
    default_epoch: Arc<str>,
    path: PathBuf,
    closed: AtomicBool,
    /// Held until the store is dropped (after the writer has stopped), keeping other
    /// processes off this data directory.
    _lock: File,
}

impl std::fmt::Debug for SqliteHistoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteHistoryStore")
            .field("path", &self.path)
            .field("default_epoch", &self.default_epoch)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl SqliteHistoryStore {
    /// Opens (creating if needed) the database in `config.data_dir` and starts the writer.
    ///
    /// Fails with [`StoreError::Unavailable`] and a message naming the path when the
    /// configuration is invalid, the directory cannot be created, is not writable or is used
    /// by another process, or the database is unreadable or from a newer Herald.
    ///
    /// Blocking (file I/O, possibly WAL recovery): call it at startup, not on a busy async
    /// worker.
    pub fn open(
        config: &SqliteConfig,
        listener: Arc<dyn CommitListener>,
    ) -> Result<Self, StoreError> {
        config.validate().map_err(OpenError::Config)?;
        let lock = schema::lock_data_dir(config)?;
        let path = config.database_path();
        let (conn, default_epoch) = schema::open_writer(&path, config.sync)?;
        let readers = ReaderPool::open(&path, config.readers, default_epoch.clone())?;
        let counters = Arc::new(Counters::default());
        let checkpointer = schema::open_checkpointer(&path, config.sync)?;
        let (signals, signalled) = mpsc::channel();
        let control = Arc::new(WalControl::new(schema::wal_path(&path), signals.clone()));
        let checkpointer = Checkpointer::new(checkpointer, control.clone(), counters.clone());
        let checkpointer = thread::Builder::new()
            .name("herald-sqlite-checkpoint".to_owned())
            .spawn(move || checkpointer.run(signalled))
            .map_err(OpenError::Thread)?;
        let writer = Writer::new(
            conn,
            listener,
            default_epoch.clone(),
            config.max_batch,
            config.prune_interval,
            counters.clone(),
            control,
        );
        let (commands, queue) = inbox::channel();
        let handle = match thread::Builder::new()
            .name("herald-sqlite-writer".to_owned())
            .spawn(move || writer.run(queue))
        {
            Ok(handle) => handle,
            Err(error) => {
                let _ = signals.send(Signal::Stop { last: None });
                let _ = checkpointer.join();
                return Err(OpenError::Thread(error).into());
            }
        };
        let checkpointer = (signals, checkpointer);
        tracing::info!(
            path = %path.display(),
            sync = ?config.sync,
            epoch = %default_epoch,
            "opened sqlite history store"
        );
        Ok(Self {
            commands,
            writer: Mutex::new(Some(handle)),
            checkpointer: Mutex::new(Some(checkpointer)),
            readers,
            counters,
            default_epoch,
            path,
            closed: AtomicBool::new(false),
            _lock: lock,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The epoch of every stream created in this database (fixed when it was created).
    pub fn default_epoch(&self) -> &str {
        &self.default_epoch
    }

    /// Counters of the work done so far (for benchmarks and diagnostics).
    pub fn stats(&self) -> StoreStats {
        self.counters.snapshot()
    }

    /// Commits everything queued so far, stops the writer and waits for it, then copies the
    /// WAL into the database file and stops the checkpointer. Later appends fail with
    /// [`StoreError::Unavailable`]; reads keep working. Idempotent.
    ///
    /// Blocks for at most one batch and one checkpoint; from async code prefer
    /// `flush().await` first so the wait here is short. Dropping the store calls this.
    pub fn close(&self) {
        let Some(handle) = self.writer.lock().take() else {
            return;
        };
        self.closed.store(true, Ordering::SeqCst);
        // Fails only if the writer already exited, which is what we want anyway.
        let _ = self.commands.send(Command::Shutdown);
        let checkpointer = self.checkpointer.lock().take();
        if handle.thread().id() == thread::current().id() {
            // Dropped from inside the commit listener: the writer stops after the commands
            // queued before the Shutdown, which it cannot wait for from here. The checkpointer
            // just stops (a WAL restart the writer may still ask for is skipped); SQLite
            // checkpoints when the last connection closes.
            if let Some((signals, _)) = checkpointer {
                let _ = signals.send(Signal::Stop { last: None });
            }
            return;
        }
        // While the writer finishes, the checkpointer keeps running: a writer waiting at the
        // WAL's hard limit needs it.
        if handle.join().is_err() {
            tracing::error!(path = %self.path.display(), "sqlite history writer panicked");
        }
        if let Some((signals, thread)) = checkpointer {
            // Nothing writes any more: leave the data in the database file and an empty WAL.
            let _ = signals.send(Signal::Stop {
                last: Some("TRUNCATE"),
            });
            if thread.join().is_err() {
                tracing::error!(path = %self.path.display(), "sqlite checkpointer panicked");
            }
        }
    }

    fn send(&self, command: Command) -> Result<(), StoreError> {
        self.commands.send(command).map_err(|_| self.stopped())
    }

    fn stopped(&self) -> StoreError {
        if self.closed.load(Ordering::SeqCst) {
            StoreError::Unavailable("the sqlite history store is closed".to_owned())
        } else {
            StoreError::Unavailable("the sqlite history writer stopped unexpectedly".to_owned())
        }
    }
}

impl Drop for SqliteHistoryStore {
    fn drop(&mut self) {
        self.close();
    }
}

#[async_trait]
impl HistoryStore for SqliteHistoryStore {
    async fn append(&self, request: AppendRequest) -> Result<Appended, StoreError> {
        let (reply, result) = oneshot::channel();
        self.send(Command::Append { request, reply })?;
        result.await.map_err(|_| self.stopped())?
    }

    /// Every command is queued before any reply is awaited: the writer takes them in order
    /// (offsets in the order given) and into the same group commit.
    async fn append_many(&self, requests: Vec<AppendRequest>) -> Vec<Result<Appended, StoreError>> {
        let mut pending = Vec::with_capacity(requests.len());
        for request in requests {
            let (reply, result) = oneshot::channel();
            pending.push(
                self.send(Command::Append { request, reply })
                    .map(|()| result),
            );
        }
        let mut results = Vec::with_capacity(pending.len());
        for queued in pending {
            results.push(match queued {
                Ok(result) => result.await.map_err(|_| self.stopped()).and_then(|r| r),
                Err(error) => Err(error),
            });
        }
        results
    }

    async fn read(&self, channel: &str, query: HistoryQuery) -> Result<HistoryPage, StoreError> {
        self.readers.read(channel, query).await
    }

    async fn remove(&self, channel: &str) -> Result<(), StoreError> {
        let (reply, result) = oneshot::channel();
        self.send(Command::Remove {
            channel: channel.into(),
            reply,
        })?;
        result.await.map_err(|_| self.stopped())?
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let (reply, result) = oneshot::channel();
        if self.send(Command::Flush { reply }).is_err() {
            // Closing committed everything that was queued: nothing is left to flush.
            return if self.closed.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(self.stopped())
            };
        }
        match result.await {
            Ok(outcome) => outcome,
            Err(_) if self.closed.load(Ordering::SeqCst) => Ok(()),
            Err(_) => Err(self.stopped()),
        }
    }
}
