//! The on-disk layout of the SQLite store and everything needed to open it safely.
//!
//! Owns: the data directory lock, the schema and its version, the store-wide default epoch,
//! the connection settings (pragmas) of the writer and the readers, and the errors opening
//! can fail with.
//!
//! May touch: files under the configured data directory only.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use herald_core::StoreError;
use herald_core::publication::new_epoch;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::checkpoint::WAL_RESTART_BYTES;
use super::config::{SqliteConfig, SyncPolicy};

/// The layout this code writes. Bump it on any change. There is no migration (nothing with
/// an older layout was released): a database with another version is refused, never
/// rewritten.
///
/// - 1: publications in insertion order (`id`) with a separate `(stream, seq)` index.
/// - 2: publications clustered by `(stream, seq)` (`WITHOUT ROWID`) with no secondary index;
///   `streams.keep` for chunked size retention, `streams.head_expires` for the TTL prune, and
///   `streams.top` no longer written on every append.
pub const SCHEMA_VERSION: u32 = 2;

/// How long the writer waits for a lock held by someone else (an operator's `sqlite3` shell)
/// before failing the batch. Herald itself never holds a competing write lock.
const WRITER_BUSY_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a reader waits for the brief locks WAL recovery and checkpoints take.
const READER_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Page cache of the writer, in KiB (negative `cache_size` means KiB in SQLite): the pages
/// appends and trims touch (each active channel's first and last pages, the b-tree's inner
/// pages), not the whole database; the OS page cache holds the rest. Deliberately small:
/// when a split in the middle of the b-tree leaves sibling pages out of order, SQLite swaps
/// their numbers through a temporary one at the 1 GiB mark, and the next commit then scans
/// the whole page-cache hash table to drop pages past the end of the file. Measured with a 64 MiB cache (the whole test
/// database cached): that scan was 6% of the writer's time in `sqlite_throughput` and 16%
/// behind the HTTP API (smaller batches, more commits); with 1–4 MiB it is under 0.5%, and
/// reading the pages that no longer fit costs less than that.
const WRITER_CACHE_KIB: i64 = 4 * 1024;

/// Page cache of each reader, in KiB.
const READER_CACHE_KIB: i64 = 16 * 1024;

/// Size the WAL is truncated to when it restarts, so one burst does not leave a huge file.
const JOURNAL_SIZE_LIMIT: u64 = WAL_RESTART_BYTES;

/// How long the checkpointer's `RESTART` waits for readers to leave the WAL. The writer is
/// paused meanwhile, so this is short; if a long read is still going, the WAL is copied back
/// anyway and restarts on a later commit.
const CHECKPOINTER_BUSY_TIMEOUT: Duration = Duration::from_millis(250);

/// Page size of new databases. Each page a batch dirties costs one WAL frame of this size;
/// 1 KiB and 2 KiB pages were measured to write fewer bytes but to cost more CPU per append
/// (deeper trees, more frames), so SQLite's usual 4 KiB stays.
const PAGE_SIZE: i64 = 4096;

/// Statements each connection keeps prepared; comfortably more than the store uses.
const STATEMENT_CACHE: usize = 32;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- One row per channel ever appended to. Removing or expiring a channel's publications keeps
-- this row, so offsets never go back. `id` names the stream in `publications`, keeping that
-- table's keys small whatever the channel names.
--
-- The row is written only when something other than the top changes, not on every append:
-- `top` is the top offset as of the last time the stream's newest publication was deleted
-- (or the stream was created), and the real top is the larger of it and the stream's newest
-- stored `seq` (SELECT_STREAM in the code). `keep` is the size retention of the latest
-- append: size retention deletes in chunks, so a stream may hold a few more rows, and reads
-- return only the newest `keep`. `head_expires` is when the stream's oldest stored
-- publication expires, or earlier (size retention does not update it); NULL when it stores
-- none. It is all the TTL prune needs to find expired rows, so `publications` needs no
-- expiry index.
CREATE TABLE IF NOT EXISTS streams (
    id           INTEGER PRIMARY KEY,
    channel      TEXT NOT NULL UNIQUE,
    top          INTEGER NOT NULL,
    epoch        TEXT NOT NULL,
    keep         INTEGER NOT NULL,
    head_expires INTEGER
);

CREATE INDEX IF NOT EXISTS streams_by_head_expiry ON streams (head_expires)
    WHERE head_expires IS NOT NULL;

-- Clustered by stream: a channel's publications are one contiguous run of rows ordered by
-- offset, so an append writes to its channel's last page, size retention deletes from its
-- first pages, and a history read is one range scan. (Version 1 kept rows in insertion order
-- with a (stream, seq) index and an expiry index: an append dirtied a page in each, and a
-- trim a random old page of each.) `seq` is the publication's offset
-- (OFFSET is an SQL keyword). `tags` and `info` are JSON text, NULL when absent, so the
-- common publication costs no JSON parsing on read.
CREATE TABLE IF NOT EXISTS publications (
    stream     INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    time_ms    INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    is_binary  INTEGER NOT NULL,
    data       BLOB NOT NULL,
    tags       TEXT,
    info       TEXT,
    PRIMARY KEY (stream, seq)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS idempotency (
    channel    TEXT NOT NULL,
    key        TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    epoch      TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (channel, key)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS idempotency_by_expiry ON idempotency (expires_ms);
";

/// The columns of a `streams` row as the writer and the readers load it, selected by
/// `channel = ?1`: id, top, epoch, keep, head_expires. The top is computed as the schema
/// describes (one extra b-tree descent to the stream's last publication).
pub const SELECT_STREAM: &str = "SELECT id, \
     max(top, coalesce((SELECT max(seq) FROM publications WHERE stream = streams.id), 0)), \
     epoch, keep, head_expires FROM streams WHERE channel = ?1";

/// Why the store could not be opened. Every message names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("invalid sqlite configuration: {0}")]
    Config(String),
    #[error("data directory {path} cannot be created: {source}")]
    CreateDir { path: String, source: io::Error },
    #[error("data directory {path} is not writable: {source}")]
    NotWritable { path: String, source: io::Error },
    #[error("data directory {path} is in use by another herald process (lock file {lock} is held)")]
    Locked { path: String, lock: String },
    #[error("cannot lock {lock}: {source}")]
    Lock { lock: String, source: io::Error },
    #[error("cannot open database {path}: {source}")]
    Database {
        path: String,
        source: rusqlite::Error,
    },
    #[error(
        "database {path} has schema version {found}, newer than this herald supports ({supported}); run a newer herald"
    )]
    NewerSchema {
        path: String,
        found: u32,
        supported: u32,
    },
    #[error(
        "database {path} has schema version {found}, written by an older development build of herald; this herald uses version {supported} and cannot convert it. Move the data directory away (or delete it) to start with empty history"
    )]
    OlderSchema {
        path: String,
        found: u32,
        supported: u32,
    },
    #[error("database {path} is not a usable herald database: {reason}")]
    Invalid { path: String, reason: String },
    #[error("cannot start the sqlite writer thread: {0}")]
    Thread(io::Error),
}

impl From<OpenError> for StoreError {
    fn from(error: OpenError) -> Self {
        StoreError::Unavailable(error.to_string())
    }
}

/// Creates the data directory and takes its exclusive lock. The lock (held for as long as the
/// returned file is open) keeps a second herald process from writing the same database,
/// which would break offset contiguity because each writer caches stream tops.
pub fn lock_data_dir(config: &SqliteConfig) -> Result<File, OpenError> {
    let dir = &config.data_dir;
    let shown = || dir.display().to_string();
    private_dir(dir).map_err(|source| OpenError::CreateDir {
        path: shown(),
        source,
    })?;
    let lock_path = config.lock_path();
    // Creating the lock file doubles as the writability probe, so an unwritable directory
    // fails here with a message naming it, not later with an SQLite code.
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| OpenError::NotWritable {
            path: shown(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(OpenError::Locked {
            path: shown(),
            lock: lock_path.display().to_string(),
        }),
        Err(TryLockError::Error(source)) => Err(OpenError::Lock {
            lock: lock_path.display().to_string(),
            source,
        }),
    }
}

fn database_error(path: &Path) -> impl Fn(rusqlite::Error) -> OpenError + '_ {
    move |source| OpenError::Database {
        path: path.display().to_string(),
        source,
    }
}

/// Opens the write connection, creating the database if needed, and applies the schema.
/// Returns the connection and the store-wide default epoch.
pub fn open_writer(path: &Path, sync: SyncPolicy) -> Result<(Connection, Arc<str>), OpenError> {
    let err = database_error(path);
    let conn = Connection::open(path).map_err(&err)?;
    conn.busy_timeout(WRITER_BUSY_TIMEOUT).map_err(&err)?;
    // Only takes effect while the file is still empty, so it must come before WAL mode and
    // the schema; an existing database keeps the page size it was created with.
    conn.pragma_update(None, "page_size", PAGE_SIZE)
        .map_err(&err)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(&err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(OpenError::Invalid {
            path: path.display().to_string(),
            reason: format!("cannot switch to WAL journal mode (got {mode:?})"),
        });
    }
    conn.pragma_update(None, "synchronous", sync.pragma_value())
        .map_err(&err)?;
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(&err)?;
    conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)
        .map_err(&err)?;
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)
        .map_err(&err)?;
    // Checkpoints run on the checkpointer thread, never inside the writer's COMMIT.
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .map_err(&err)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    let epoch = initialise(&conn, path)?;
    Ok((conn, epoch))
}

/// The WAL file SQLite keeps next to the database.
pub fn wal_path(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// Opens the checkpointer's connection to an existing database. Its `synchronous` setting
/// decides how a checkpoint syncs, so it follows the store's policy like the writer's.
pub fn open_checkpointer(path: &Path, sync: SyncPolicy) -> Result<Connection, OpenError> {
    let err = database_error(path);
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(&err)?;
    conn.busy_timeout(CHECKPOINTER_BUSY_TIMEOUT).map_err(&err)?;
    conn.pragma_update(None, "synchronous", sync.pragma_value())
        .map_err(&err)?;
    Ok(conn)
}

/// Opens one read connection to an existing database.
pub fn open_reader(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(READER_BUSY_TIMEOUT)?;
    // Readers never write: make that a property of the connection, not just of the code.
    conn.pragma_update(None, "query_only", true)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "cache_size", -READER_CACHE_KIB)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// Creates the schema in a new database, or checks the version of an existing one, and
/// returns the default epoch. The epoch is generated once, when the database is created, so
/// a fresh data directory means a fresh epoch and a reopened one keeps its streams' epochs.
fn initialise(conn: &Connection, path: &Path) -> Result<Arc<str>, OpenError> {
    let err = database_error(path);
    let shown = || path.display().to_string();
    conn.execute_batch("BEGIN IMMEDIATE").map_err(&err)?;
    let result = (|| {
        // The version is checked before anything is created, so a database in another
        // layout is left exactly as it was.
        let (_, version) = stored_schema_version(conn).map_err(&err)?;
        match version {
            None => {
                conn.execute_batch(SCHEMA).map_err(&err)?;
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)",
                    params![SCHEMA_VERSION.to_string()],
                )
                .map_err(&err)?;
            }
            Some(text) => {
                let found: u32 = text.parse().map_err(|_| OpenError::Invalid {
                    path: shown(),
                    reason: format!("schema_version {text:?} is not a number"),
                })?;
                if found > SCHEMA_VERSION {
                    return Err(OpenError::NewerSchema {
                        path: shown(),
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                if found < SCHEMA_VERSION {
                    return Err(OpenError::OlderSchema {
                        path: shown(),
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
            }
        }
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('default_epoch', ?1)",
            params![new_epoch()],
        )
        .map_err(&err)?;
        let epoch: String = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'default_epoch'",
                [],
                |row| row.get(0),
            )
            .map_err(&err)?;
        if epoch.is_empty() {
            return Err(OpenError::Invalid {
                path: shown(),
                reason: "the default epoch is empty".to_owned(),
            });
        }
        Ok(Arc::from(epoch))
    })();
    match result {
        Ok(epoch) => {
            conn.execute_batch("COMMIT").map_err(&err)?;
            Ok(epoch)
        }
        Err(error) => {
            // The original error is what the operator needs; a failed rollback adds nothing.
            let _ = conn.execute_batch("ROLLBACK");
            Err(error)
        }
    }
}

/// Creates `dir` (and missing parents) readable by its owner only: it holds history and
/// secrets. An existing folder keeps its mode.
pub(crate) fn private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// Whether the database has a `meta` table, and the `schema_version` it records: read before
/// anything is created (shared by `herald.db` and `outbound.db`).
pub(super) fn stored_schema_version(conn: &Connection) -> rusqlite::Result<(bool, Option<String>)> {
    let has_meta: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'meta')",
        [],
        |row| row.get(0),
    )?;
    let version = if has_meta {
        conn.query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |row| row.get(0),
        )
        .optional()?
    } else {
        None
    };
    Ok((has_meta, version))
}
