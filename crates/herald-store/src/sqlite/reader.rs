//! History reads: a small pool of read connections used off the async workers.
//!
//! Owns: the read connections and the query that turns a [`HistoryQuery`] into a page.
//!
//! May touch: the database through read-only (`query_only`) connections, and tokio's
//! blocking thread pool. In WAL mode readers see the last committed snapshot and neither
//! block nor are blocked by the writer.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use herald_core::publication::StreamPosition;
use herald_core::store::{HistoryPage, HistoryQuery, StoreError, check_since};
use herald_core::time::now_ms;
use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::Semaphore;

use super::codec::{decode_publication, to_i64, to_u64};
use super::schema::{OpenError, SELECT_STREAM, open_reader};

/// Read connections shared by all reads of one store.
pub struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    /// One permit per connection: at most `size` reads hold a blocking thread at once, the
    /// rest wait asynchronously.
    permits: Arc<Semaphore>,
    default_epoch: Arc<str>,
}

impl ReaderPool {
    /// Opens `size` connections up front so a broken database fails at startup, not on the
    /// first history request.
    pub fn open(path: &Path, size: usize, default_epoch: Arc<str>) -> Result<Arc<Self>, OpenError> {
        let mut idle = Vec::with_capacity(size);
        for _ in 0..size {
            idle.push(open_reader(path).map_err(|source| OpenError::Database {
                path: path.display().to_string(),
                source,
            })?);
        }
        Ok(Arc::new(Self {
            path: path.to_owned(),
            idle: Mutex::new(idle),
            permits: Arc::new(Semaphore::new(size)),
            default_epoch,
        }))
    }

    /// Reads one page on a blocking thread with a pooled connection.
    pub async fn read(
        self: &Arc<Self>,
        channel: &str,
        query: HistoryQuery,
    ) -> Result<HistoryPage, StoreError> {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable("the sqlite reader pool is closed".to_owned()))?;
        let pool = Arc::clone(self);
        let channel = channel.to_owned();
        // The closure returns its connection to the pool itself, so a caller that stops
        // waiting (a dropped future) does not leak a connection.
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut conn = match pool.idle.lock().pop() {
                Some(conn) => conn,
                // Only after a read panicked and took its connection with it.
                None => open_reader(&pool.path).map_err(backend)?,
            };
            let page = read_page(&mut conn, &channel, &query, &pool.default_epoch, now_ms());
            pool.idle.lock().push(conn);
            page
        });
        task.await
            .map_err(|error| StoreError::Backend(format!("history read task failed: {error}")))?
    }
}

/// The page query; the columns are those [`decode_publication`] expects.
macro_rules! select_publications {
    ($order:literal) => {
        concat!(
            "SELECT seq, time_ms, is_binary, data, tags, info FROM publications ",
            "WHERE stream = ?1 AND seq > ?2 AND seq <= ?3 AND expires_ms > ?4 ",
            "ORDER BY seq ",
            $order,
            " LIMIT ?5"
        )
    };
}

fn backend(error: rusqlite::Error) -> StoreError {
    StoreError::Backend(format!("sqlite read failed: {error}"))
}

/// The stream's top and the selected publications, from one consistent snapshot.
fn read_page(
    conn: &mut Connection,
    channel: &str,
    query: &HistoryQuery,
    default_epoch: &str,
    now: u64,
) -> Result<HistoryPage, StoreError> {
    // One read transaction, so the top and the rows come from the same commit.
    let tx = conn.transaction().map_err(backend)?;
    let row: Option<(i64, i64, String, u32)> = tx
        .prepare_cached(SELECT_STREAM)
        .and_then(|mut stmt| {
            stmt.query_row(params![channel], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .optional()
        })
        .map_err(backend)?;
    let (stream, position, keep) = match row {
        Some((id, top, epoch, keep)) => (Some(id), StreamPosition::new(to_u64(top), epoch), keep),
        None => (None, StreamPosition::new(0, default_epoch), 0),
    };
    if let Some(since) = &query.since {
        check_since(since, &position)?;
    }
    let top = position.offset;
    let since = query.since.as_ref().map(|s| s.offset);
    // Offsets in (after, up_to], newest or oldest first, as `herald_core::store::select_range`
    // defines paging; done in SQL so expired rows (filtered by `expires_ms`) and rows beyond
    // the size retention never count against the limit.
    let (after, up_to) = if query.reverse {
        (0, since.map_or(top, |s| s.saturating_sub(1)).min(top))
    } else {
        (since.unwrap_or(0), top)
    };
    // Size retention trims in chunks (see the writer), so up to a chunk of older rows may
    // still be stored: only the newest `keep` offsets are history.
    let after = after.max(top.saturating_sub(u64::from(keep)));
    let mut publications = Vec::new();
    if let Some(stream) = stream
        && query.limit != Some(0)
        && after < up_to
    {
        let limit = query
            .limit
            .map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
        let sql = if query.reverse {
            select_publications!("DESC")
        } else {
            select_publications!("ASC")
        };
        let mut stmt = tx.prepare_cached(sql).map_err(backend)?;
        let rows = stmt
            .query_map(
                params![stream, to_i64(after), to_i64(up_to), to_i64(now), limit],
                decode_publication,
            )
            .map_err(backend)?;
        let expected = usize::try_from(up_to - after).unwrap_or(usize::MAX);
        publications.reserve(query.limit.unwrap_or(expected).min(expected).min(1024));
        for publication in rows {
            publications.push(publication.map_err(backend)?);
        }
    }
    Ok(HistoryPage {
        publications,
        position,
    })
}
