//! The push side's embedded database: the device registry and the outbound queue (jobs and
//! rate windows) in `<data_dir>/outbound.db`, apart from the history database.
//!
//! Owns: [`OutboundDb`] (opening the file, its writer thread and read connections, and its
//! lifecycle), [`SqliteDeviceStore`], [`SqliteOutboundQueue`] and [`SqliteWebhookStore`] (in
//! `devices.rs`, `queue.rs` and `webhooks.rs`), and the error type their database work shares.
//!
//! May touch: `<data_dir>/outbound.db` (and its WAL), one OS thread (the writer) and tokio's
//! blocking pool for reads. Async callers never block: writes queue a closure for the writer
//! thread and await its reply; reads run on a blocking thread with a pooled connection.
//!
//! Why a separate file: the history writer's group commit holds SQLite's single write lock
//! for its whole transaction; push traffic (enqueue, claim and finish of thousands of jobs
//! per second, every `take_rate`) sharing that lock would add its transactions to every
//! publish's latency. Two files are two independent write locks and WALs, so neither
//! waits for the other. Devices, jobs and rate windows share one file because the push
//! pipeline's own writes are few, large transactions that group commit fine together.
//!
//! Durability: every call that changes something returns after the transaction holding it
//! committed under the configured [`SyncPolicy`] (WAL mode: survives a process crash; `full`
//! also a power loss). Reads see every write that returned before they started.

mod devices;
mod queue;
mod schema;
mod webhooks;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use herald_core::device::DeviceError;
use herald_core::outbound::QueueError;
use parking_lot::Mutex;
use rusqlite::Connection;
use tokio::sync::{Semaphore, oneshot};

pub use devices::SqliteDeviceStore;
pub use queue::SqliteOutboundQueue;
pub use schema::{OUTBOUND_FILE, OUTBOUND_SCHEMA_VERSION};
pub use webhooks::SqliteWebhookStore;

use super::config::{SqliteConfig, SyncPolicy};
use super::schema::OpenError;
use writer::{Call, Command, CommandSender};

/// Why database work failed, before it is told in the port's own error type.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DbError {
    /// The caller's input (the port's `Invalid`).
    #[error("{0}")]
    Invalid(String),
    /// A device that is not there (the device port's `NotFound`).
    #[error("{0}")]
    NotFound(String),
    /// The database is closed or its writer stopped.
    #[error("{0}")]
    Unavailable(String),
    #[error("sqlite: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("{0}")]
    Backend(String),
}

impl From<DbError> for DeviceError {
    fn from(error: DbError) -> Self {
        match error {
            DbError::Invalid(message) => DeviceError::Invalid(message),
            DbError::NotFound(id) => DeviceError::NotFound(id),
            DbError::Unavailable(message) => DeviceError::Unavailable(message),
            other => DeviceError::Backend(other.to_string()),
        }
    }
}

impl From<DeviceError> for DbError {
    fn from(error: DeviceError) -> Self {
        match error {
            DeviceError::Invalid(message) => DbError::Invalid(message),
            DeviceError::NotFound(id) => DbError::NotFound(id),
            DeviceError::Unavailable(message) => DbError::Unavailable(message),
            DeviceError::Backend(message) => DbError::Backend(message),
        }
    }
}

impl From<DbError> for QueueError {
    fn from(error: DbError) -> Self {
        match error {
            DbError::Invalid(message) => QueueError::Invalid(message),
            // The queue has no "not found"; nothing of it returns one.
            DbError::NotFound(message) => QueueError::Backend(message),
            DbError::Unavailable(message) => QueueError::Unavailable(message),
            other => QueueError::Backend(other.to_string()),
        }
    }
}

/// Read connections, each used by one read at a time on a blocking thread.
struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    /// One permit per connection: at most that many reads hold a blocking thread, the rest
    /// wait asynchronously.
    permits: Arc<Semaphore>,
}

struct Shared {
    path: PathBuf,
    commands: CommandSender,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: Readers,
}

impl Shared {
    fn close(&self) {
        let Some(handle) = self.writer.lock().take() else {
            return;
        };
        self.commands.shutdown();
        // Never join from the writer itself (a handle dropped by work it runs): that would
        // wait forever. The closures this module queues capture no handle, but a guard
        // costs nothing.
        if handle.thread().id() != thread::current().id() && handle.join().is_err() {
            tracing::error!(path = %self.path.display(), "sqlite outbound writer panicked");
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.close();
    }
}

/// `<data_dir>/outbound.db`, open. Cheap to clone; every clone and every store taken from it
/// share the one writer thread. Dropping the last of them closes the database.
///
/// Build one per process and take both stores from it ([`OutboundDb::devices`],
/// [`OutboundDb::queue`]): two `OutboundDb`s on one file would still be correct (SQLite
/// locks the file) but would wait on each other's write lock.
#[derive(Clone)]
pub struct OutboundDb {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for OutboundDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundDb")
            .field("path", &self.shared.path)
            .finish()
    }
}

impl OutboundDb {
    /// Opens (creating if needed) `outbound.db` in `config.data_dir`, with `config.sync`,
    /// `config.max_batch` calls per group commit and `config.readers` read connections.
    ///
    /// Blocking (file I/O, possibly WAL recovery): call it at startup, not on a busy async
    /// worker. Fails with a message naming the path.
    pub fn open(config: &SqliteConfig) -> Result<Self, OpenError> {
        config.validate().map_err(OpenError::Config)?;
        super::schema::private_dir(&config.data_dir).map_err(|source| OpenError::CreateDir {
            path: config.data_dir.display().to_string(),
            source,
        })?;
        let path = config.data_dir.join(OUTBOUND_FILE);
        let conn = schema::open_writer(&path, config.sync)?;
        let mut idle = Vec::with_capacity(config.readers);
        for _ in 0..config.readers {
            idle.push(
                schema::open_reader(&path).map_err(|source| OpenError::Database {
                    path: path.display().to_string(),
                    source,
                })?,
            );
        }
        let (commands, inbox) = writer::channel();
        let max_batch = config.max_batch;
        let handle = thread::Builder::new()
            .name("herald-sqlite-outbound".to_owned())
            .spawn(move || writer::run(conn, inbox, max_batch))
            .map_err(OpenError::Thread)?;
        tracing::info!(path = %path.display(), sync = ?config.sync, "opened sqlite outbound database");
        Ok(Self {
            shared: Arc::new(Shared {
                path: path.clone(),
                commands,
                writer: Mutex::new(Some(handle)),
                readers: Readers {
                    path,
                    idle: Mutex::new(idle),
                    permits: Arc::new(Semaphore::new(config.readers)),
                },
            }),
        })
    }

    /// A default configuration's database in `data_dir` with `sync` (tests, tools).
    pub fn open_dir(data_dir: impl Into<PathBuf>, sync: SyncPolicy) -> Result<Self, OpenError> {
        Self::open(&SqliteConfig {
            sync,
            ..SqliteConfig::new(data_dir)
        })
    }

    /// The device registry in this database.
    pub fn devices(&self) -> SqliteDeviceStore {
        SqliteDeviceStore::new(self.clone())
    }

    /// The outbound queue in this database.
    pub fn queue(&self) -> SqliteOutboundQueue {
        SqliteOutboundQueue::new(self.clone())
    }

    /// Webhook endpoints and the attempt log in this database.
    pub fn webhooks(&self) -> SqliteWebhookStore {
        SqliteWebhookStore::new(self.clone())
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Commits what is queued, stops the writer and waits for it. Later writes fail with
    /// `Unavailable`; reads keep working. Idempotent; dropping the last handle does it too.
    /// Blocks for at most one batch.
    pub fn close(&self) {
        self.shared.close();
    }

    /// Runs `work` on the writer thread inside its transaction (rolled back alone if it
    /// fails); returns its result once the transaction committed.
    pub(crate) async fn write<T, F>(&self, work: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
    {
        let (reply, result) = oneshot::channel();
        let call = Call::new(work, reply);
        self.shared
            .commands
            .send(Command::Run(Box::new(call)))
            .map_err(|_| closed())?;
        // The writer drops a call unanswered only when it stops before running it.
        result.await.map_err(|_| closed())?
    }

    /// Runs `work` in one read transaction (one consistent snapshot) on a blocking thread.
    pub(crate) async fn read<T, F>(&self, work: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
    {
        let permit = Arc::clone(&self.shared.readers.permits)
            .acquire_owned()
            .await
            .map_err(|_| DbError::Unavailable("the outbound reader pool is closed".to_owned()))?;
        let shared = Arc::clone(&self.shared);
        // The closure puts its connection back itself, so a caller that stops waiting (a
        // dropped future) does not leak it.
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let readers = &shared.readers;
            let mut conn = match readers.idle.lock().pop() {
                Some(conn) => conn,
                // Only after a read panicked and took its connection with it.
                None => schema::open_reader(&readers.path)?,
            };
            let result = (|| {
                let tx = conn.transaction()?;
                let value = work(&tx)?;
                tx.commit()?;
                Ok(value)
            })();
            readers.idle.lock().push(conn);
            result
        });
        task.await
            .map_err(|error| DbError::Backend(format!("outbound read task failed: {error}")))?
    }
}

fn closed() -> DbError {
    DbError::Unavailable("the sqlite outbound database is closed".to_owned())
}

/// A list as the JSON array text `json_each(?)` expands in SQL: one statement for any
/// number of values, so the statement cache holds one entry per shape of filter.
pub(crate) fn json_list<T: serde::Serialize>(values: &[T]) -> Result<String, DbError> {
    serde_json::to_string(values).map_err(|e| DbError::Backend(format!("encode a list: {e}")))
}

/// The `WHERE` terms of a filter built from the fields that are set, and their parameters,
/// numbered in the order they are added.
#[derive(Default)]
pub(crate) struct Terms {
    pub sql: String,
    pub values: Vec<rusqlite::types::Value>,
}

impl Terms {
    /// Adds ` AND <term>`, where `#` in `term` stands for the new parameter `value`.
    pub fn add(&mut self, term: &str, value: impl Into<rusqlite::types::Value>) {
        self.add_many(term, [value.into()]);
    }

    /// Adds ` AND <term>`, where the `#`s in `term` stand for `values`, in order.
    pub fn add_many<const N: usize>(&mut self, term: &str, values: [rusqlite::types::Value; N]) {
        self.sql.push_str(" AND ");
        let mut values = values.into_iter();
        for (i, part) in term.split('#').enumerate() {
            if i > 0
                && let Some(value) = values.next()
            {
                self.values.push(value);
                self.sql.push_str(&format!("?{}", self.values.len()));
            }
            self.sql.push_str(part);
        }
    }

    /// `term IN (the list)`, one parameter however long the list.
    pub fn add_list<T: serde::Serialize>(
        &mut self,
        column: &str,
        list: &[T],
    ) -> Result<(), DbError> {
        self.add(
            &format!("{column} IN (SELECT value FROM json_each(#))"),
            json_list(list)?,
        );
        Ok(())
    }
}
