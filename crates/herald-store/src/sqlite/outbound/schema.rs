//! The on-disk layout of `outbound.db` and how its connections are opened.
//!
//! Owns: the schema and its version, the job state codes stored in `jobs.state`, and the
//! connection settings (pragmas) of the writer and the readers.
//!
//! May touch: `<data_dir>/outbound.db` only.

use std::path::Path;
use std::time::Duration;

use herald_core::outbound::JobState;
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, params};

use crate::sqlite::config::SyncPolicy;
use crate::sqlite::schema::OpenError;

/// Name of the database file inside the data directory.
pub const OUTBOUND_FILE: &str = "outbound.db";

/// The layout this code writes. Bump it on any change. A newer database is refused; an older
/// one is migrated forward in the opening transaction ([`MIGRATIONS`]).
///
/// - 1: devices, device and user topics, removals; jobs with a partial index of claimable
///   jobs; rate windows.
/// - 2: webhook documents (endpoints and their state) and the attempt log.
pub const OUTBOUND_SCHEMA_VERSION: u32 = 2;

/// What takes a database from version `n` to `n + 1`, at index `n - 1`.
const MIGRATIONS: [&str; 1] = [WEBHOOK_TABLES];

/// Version 2: webhooks. Endpoints are JSON documents (their schema is the webhook module's);
/// attempts are one row each, `seq` in the order they were recorded.
const WEBHOOK_TABLES: &str = "
CREATE TABLE IF NOT EXISTS webhook_documents (
    collection TEXT NOT NULL,
    id         TEXT NOT NULL,
    document   BLOB NOT NULL,
    PRIMARY KEY (collection, id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS webhook_attempts (
    seq         INTEGER PRIMARY KEY,
    message     TEXT NOT NULL,
    endpoint    TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    status      INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    error       TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS webhook_attempts_by_message ON webhook_attempts (message, seq);
CREATE INDEX IF NOT EXISTS webhook_attempts_by_time ON webhook_attempts (at);
";

/// How long the writer waits for a lock held by someone else (an operator's `sqlite3` shell,
/// a second `OutboundDb` on the same file) before failing the batch.
const WRITER_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a reader waits for the brief locks WAL recovery and checkpoints take.
const READER_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Page cache of the writer, in KiB: claims and finishes touch the claimable index, the id
/// index and the rows of jobs enqueued shortly before, which stay hot in this much.
const WRITER_CACHE_KIB: i64 = 16 * 1024;

const READER_CACHE_KIB: i64 = 8 * 1024;

/// Size the WAL is truncated to after a checkpoint, so one burst does not leave a huge file.
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// WAL pages after which a commit checkpoints (SQLite's default is 1000, 4 MiB). Push
/// traffic is many small commits that rewrite the same few hot pages (the tail of `jobs`
/// and of its indexes), so a longer WAL holds many copies of each: a checkpoint copies each
/// page once and fsyncs once however many copies there are. At 1000 pages checkpoints were
/// a sixth of Herald's CPU on the request path (`herald-bench push`).
const WAL_AUTOCHECKPOINT_PAGES: i64 = 10_000;

/// Statements each connection keeps prepared. The filters of the listings build their SQL
/// from the fields that are set, so there are a few dozen shapes.
const STATEMENT_CACHE: usize = 128;

// Job states as stored. `HELD` is a queued job waiting for an earlier job of its
// `order_key` to become final: reported as queued, but outside the claimable index so
// claims never look at it. The order makes the partial indexes simple ranges: claimable
// is `state < 2`, not final `state < 3`, final `state >= 3`.
pub const QUEUED: i64 = 0;
pub const SENDING: i64 = 1;
pub const HELD: i64 = 2;
pub const SENT: i64 = 3;
pub const FAILED: i64 = 4;
pub const EXPIRED: i64 = 5;
pub const CANCELLED: i64 = 6;
pub const DELIVERED: i64 = 7;
pub const INTERACTED: i64 = 8;

/// The stored codes of `state` (two for queued: claimable and held).
pub fn state_codes(state: JobState) -> &'static [i64] {
    match state {
        JobState::Queued => &[QUEUED, HELD],
        JobState::Sending => &[SENDING],
        JobState::Sent => &[SENT],
        JobState::Failed => &[FAILED],
        JobState::Expired => &[EXPIRED],
        JobState::Cancelled => &[CANCELLED],
        JobState::Delivered => &[DELIVERED],
        JobState::Interacted => &[INTERACTED],
    }
}

/// The state a stored code stands for; `None` for a code this version does not write.
pub fn state_of_code(code: i64) -> Option<JobState> {
    Some(match code {
        QUEUED | HELD => JobState::Queued,
        SENDING => JobState::Sending,
        SENT => JobState::Sent,
        FAILED => JobState::Failed,
        EXPIRED => JobState::Expired,
        CANCELLED => JobState::Cancelled,
        DELIVERED => JobState::Delivered,
        INTERACTED => JobState::Interacted,
        _ => return None,
    })
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- One row per device; its own topics are in device_topics, its user's in user_topics (joined
-- when read, so a change of a user's topics or of a device's user is one write). `meta` is a
-- JSON object. `provider` and `platform` are the lowercase names the API uses.
CREATE TABLE IF NOT EXISTS devices (
    id         TEXT PRIMARY KEY,
    provider   TEXT NOT NULL,
    token      TEXT NOT NULL,
    platform   TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    app        TEXT NOT NULL,
    timezone   TEXT NOT NULL,
    locale     TEXT NOT NULL,
    meta       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    UNIQUE (provider, token)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS devices_by_user ON devices (user_id);
CREATE INDEX IF NOT EXISTS devices_by_update ON devices (updated_at);

CREATE TABLE IF NOT EXISTS device_topics (
    device TEXT NOT NULL,
    topic  TEXT NOT NULL,
    PRIMARY KEY (device, topic)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS device_topics_by_topic ON device_topics (topic, device);

CREATE TABLE IF NOT EXISTS user_topics (
    user_id TEXT NOT NULL,
    topic   TEXT NOT NULL,
    PRIMARY KEY (user_id, topic)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS user_topics_by_topic ON user_topics (topic, user_id);

-- Removed devices, `seq` in the order they were removed; `device` is the device's JSON.
CREATE TABLE IF NOT EXISTS removals (
    seq        INTEGER PRIMARY KEY,
    device     TEXT NOT NULL,
    reason     TEXT NOT NULL,
    removed_at INTEGER NOT NULL
);

-- One row per job; `seq` (the rowid) is the enqueue order. `due_at` is when a claim may
-- take the job: its not_before while queued, the end of its lease while sending. `state`
-- holds the codes above. `reason` is the last retry's reason while queued, the final reason
-- (or the provider's message id) after.
CREATE TABLE IF NOT EXISTS jobs (
    seq        INTEGER PRIMARY KEY,
    id         TEXT NOT NULL UNIQUE,
    kind       TEXT NOT NULL,
    grp        TEXT NOT NULL,
    recipient  TEXT NOT NULL,
    payload    BLOB NOT NULL,
    not_before INTEGER NOT NULL,
    expire_at  INTEGER,
    order_key  TEXT,
    state      INTEGER NOT NULL,
    attempts   INTEGER NOT NULL,
    due_at     INTEGER NOT NULL,
    reason     TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);

-- What a claim reads: only claimable jobs (queued and not held, or sending), by kind and due
-- time, so finished and held jobs cost a claim nothing however many there are.
CREATE INDEX IF NOT EXISTS jobs_claimable ON jobs (kind, due_at) WHERE state < 2;
-- cancel, report and status queries by group (and recipient).
CREATE INDEX IF NOT EXISTS jobs_by_group ON jobs (grp, recipient);
-- Each order_key's jobs that are not final, in enqueue order; empty when nobody uses keys,
-- so the common path pays nothing for them.
CREATE INDEX IF NOT EXISTS jobs_in_line ON jobs (order_key, seq)
    WHERE order_key IS NOT NULL AND state < 3;
-- purge: finished jobs by age.
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (updated_at) WHERE state >= 3;

-- Fixed-window counters of take_rate: one row per key, for its current window.
CREATE TABLE IF NOT EXISTS rates (
    key        TEXT PRIMARY KEY,
    window_end INTEGER NOT NULL,
    used       INTEGER NOT NULL
) WITHOUT ROWID;
";

fn database_error(path: &Path) -> impl Fn(rusqlite::Error) -> OpenError + '_ {
    move |source| OpenError::Database {
        path: path.display().to_string(),
        source,
    }
}

/// Opens the write connection, creating the database if needed, and applies the schema.
///
/// The WAL is checkpointed by SQLite itself (`wal_autocheckpoint`), inside a commit of this
/// connection now and then: unlike the history writer, nothing latency-critical waits on
/// this thread's commits beyond the push calls of that batch.
pub fn open_writer(path: &Path, sync: SyncPolicy) -> Result<Connection, OpenError> {
    let err = database_error(path);
    let conn = Connection::open(path).map_err(&err)?;
    conn.busy_timeout(WRITER_BUSY_TIMEOUT).map_err(&err)?;
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
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)
        .map_err(&err)?;
    // Plans that do not depend on bound values (the query planner stability guarantee).
    // Without it SQLite marks a parameter that could steer the plan — a bound `LIMIT`, a
    // state compared with a partial index's condition — and re-prepares the statement every
    // time it is bound again: the claim's select once per claim and the finish's update once
    // per job. Every query that needs a partial index states its condition in literals.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map_err(&err)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    initialise(&conn, path)?;
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

/// Creates the schema in a new database, or checks the version of an existing one.
fn initialise(conn: &Connection, path: &Path) -> Result<(), OpenError> {
    let err = database_error(path);
    let shown = || path.display().to_string();
    conn.execute_batch("BEGIN IMMEDIATE").map_err(&err)?;
    let result = (|| {
        // Checked before anything is created, so a database in another layout is left
        // exactly as it was.
        let (has_meta, version) =
            super::super::schema::stored_schema_version(conn).map_err(&err)?;
        match version {
            None if has_meta => Err(OpenError::Invalid {
                path: shown(),
                reason: "it has a meta table without a schema_version".to_owned(),
            }),
            None => {
                conn.execute_batch(SCHEMA).map_err(&err)?;
                for migration in MIGRATIONS {
                    conn.execute_batch(migration).map_err(&err)?;
                }
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)",
                    params![OUTBOUND_SCHEMA_VERSION.to_string()],
                )
                .map_err(&err)?;
                Ok(())
            }
            Some(text) => {
                let found: u32 = text.parse().map_err(|_| OpenError::Invalid {
                    path: shown(),
                    reason: format!("schema_version {text:?} is not a number"),
                })?;
                if found > OUTBOUND_SCHEMA_VERSION {
                    return Err(OpenError::NewerSchema {
                        path: shown(),
                        found,
                        supported: OUTBOUND_SCHEMA_VERSION,
                    });
                }
                if found == 0 {
                    return Err(OpenError::OlderSchema {
                        path: shown(),
                        found,
                        supported: OUTBOUND_SCHEMA_VERSION,
                    });
                }
                if found < OUTBOUND_SCHEMA_VERSION {
                    for migration in &MIGRATIONS[(found as usize - 1)..] {
                        conn.execute_batch(migration).map_err(&err)?;
                    }
                    conn.execute(
                        "UPDATE meta SET value = ?1 WHERE key = 'schema_version'",
                        params![OUTBOUND_SCHEMA_VERSION.to_string()],
                    )
                    .map_err(&err)?;
                    tracing::info!(path = %shown(), from = found, to = OUTBOUND_SCHEMA_VERSION, "outbound database migrated");
                }
                Ok(())
            }
        }
    })();
    match result {
        Ok(()) => conn.execute_batch("COMMIT").map_err(&err),
        Err(error) => {
            // The original error is what the operator needs; a failed rollback adds nothing.
            let _ = conn.execute_batch("ROLLBACK");
            Err(error)
        }
    }
}
