//! The single writer thread: group commit, retention, idempotency and the periodic prune.
//!
//! Owns: the write connection, the cache of each channel's top offset and epoch, and the
//! order in which publications are stored and handed to the [`CommitListener`].
//!
//! May touch: the database through its one connection, the listener (after commit only) and
//! the reply channels of the commands it receives. It never blocks an async worker: callers
//! send a [`Command`] and await a oneshot.
//!
//! Why one thread: SQLite allows one writer at a time anyway, and funnelling every write
//! through one owner lets many publications share one transaction (one fsync under
//! `synchronous=FULL`, one WAL append under `NORMAL`), keeps offsets contiguous without
//! locks, and lets stream tops live in memory instead of being re-read on every append.
//!
//! The writer never checkpoints the WAL (its connection has `wal_autocheckpoint=0`), so a
//! commit never waits for an fsync under `NORMAL`; the checkpointer thread does that work.
//! Each transaction holds [`WalControl::gate`], which the checkpointer takes to restart the
//! WAL between two transactions.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use herald_core::publication::{PublicationEvent, StreamPosition};
use herald_core::store::{AppendRequest, Appended, CommitListener, StoreError};
use herald_core::time::now_ms;
use parking_lot::MutexGuard;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use super::checkpoint::WalControl;
use super::codec::{encode_extras, millis, to_i64, to_u64};
use super::inbox::CommandInbox;
use super::schema::SELECT_STREAM;
use super::stats::Counters;

/// Most channels whose top/epoch the writer keeps in memory. Past it the cache is emptied
/// and refilled lazily, so millions of short-lived channels cannot grow memory unbounded.
const STREAM_CACHE_CAPACITY: usize = 100_000;

/// Most rows one prune step deletes per table, so a large expiry wave is spread over several
/// short transactions with appends in between instead of one long stall.
const PRUNE_CHUNK: i64 = 10_000;

/// How often the writer checks the WAL's size (see [`WalControl::after_batch`]).
const WAL_CHECK_INTERVAL: Duration = Duration::from_millis(5);

/// Under load, how long the writer waits for more commands before committing a batch that
/// already holds [`LINGER_MIN_BATCH`] of them and has nothing more queued. Every batch
/// costs a commit and writes each channel's last page once, whatever the number of
/// publications in it, so a slightly later, bigger commit writes less per publication. Only
/// a batch that is already several commands long waits: a lone publication (low load) is
/// committed at once. Measured (`bench/publish`, server on one core, 64 connections): about
/// 10% more publications per second and less server CPU per publication, the same p50 with
/// one connection.
const LINGER: Duration = Duration::from_micros(150);
const LINGER_MIN_BATCH: usize = 4;

/// Work for the writer thread.
pub enum Command {
    Append {
        request: AppendRequest,
        reply: oneshot::Sender<Result<Appended, StoreError>>,
    },
    Remove {
        channel: Box<str>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Completed once everything queued before it is committed.
    Flush {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Commit what is queued before it, then stop.
    Shutdown,
}

impl Command {
    fn into_reply(self) -> Option<Reply> {
        match self {
            Self::Append { reply, .. } => Some(Reply::Append {
                reply,
                result: Err(StoreError::Backend("not applied".to_owned())),
            }),
            Self::Remove { reply, .. } | Self::Flush { reply } => Some(Reply::Done { reply }),
            Self::Shutdown => None,
        }
    }
}

/// A caller waiting for the batch its command is in.
enum Reply {
    Append {
        reply: oneshot::Sender<Result<Appended, StoreError>>,
        result: Result<Appended, StoreError>,
    },
    Done {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

impl Reply {
    // A send fails only when the caller stopped waiting (its future was dropped); the
    // command took effect all the same, so there is nobody left to tell.
    fn complete(self) {
        match self {
            Self::Append { reply, result } => {
                let _ = reply.send(result);
            }
            Self::Done { reply } => {
                let _ = reply.send(Ok(()));
            }
        }
    }

    fn fail(self, message: &str) {
        let error = StoreError::Backend(message.to_owned());
        match self {
            Self::Append { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::Done { reply } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// A channel's stream as the database has it (or will, once the open batch commits).
struct StreamMeta {
    /// Row id in `streams`; `None` until the channel's first append creates the row.
    id: Option<i64>,
    top: u64,
    epoch: Arc<str>,
    /// Offsets up to here are known to be deleted by size retention (0 when not known, after
    /// loading: the first trim then finds out).
    trimmed: u64,
    /// `streams.keep`: the size retention of the latest append.
    keep: u32,
    /// `streams.head_expires`: when the oldest stored publication expires, or earlier;
    /// `None` when the stream stores none.
    head_expires: Option<u64>,
    /// Bytes the latest stored publication takes in a page, roughly: sizes the trim slack.
    row_bytes: usize,
    /// `keep` or `head_expires` changed (or the top must be written because the newest
    /// publication is deleted): the `streams` row is written at the end of the batch.
    dirty: bool,
}

/// What one batch produced, kept apart from the writer so a failed batch can be undone.
#[derive(Default)]
struct Batch {
    replies: Vec<Reply>,
    /// Stored publications, in the order they were assigned offsets.
    events: Vec<PublicationEvent>,
    /// Channels appended to in this batch, with the retention size of their last request.
    touched: HashMap<Arc<str>, u32>,
    /// Idempotency keys stored in this batch, which the database cannot see until commit.
    keys: HashMap<(Arc<str>, String), StreamPosition>,
}

/// The state the writer thread owns.
pub struct Writer {
    conn: Connection,
    listener: Arc<dyn CommitListener>,
    default_epoch: Arc<str>,
    streams: HashMap<Arc<str>, StreamMeta>,
    max_batch: usize,
    prune_interval: Duration,
    counters: Arc<Counters>,
    control: Arc<WalControl>,
}

impl Writer {
    pub fn new(
        conn: Connection,
        listener: Arc<dyn CommitListener>,
        default_epoch: Arc<str>,
        max_batch: usize,
        prune_interval: Duration,
        counters: Arc<Counters>,
        control: Arc<WalControl>,
    ) -> Self {
        Self {
            conn,
            listener,
            default_epoch,
            streams: HashMap::new(),
            max_batch,
            prune_interval,
            counters,
            control,
        }
    }

    /// The thread's body: batch, commit, notify; prune when due; ask for a WAL restart when
    /// the WAL is over its bound. Returns on [`Command::Shutdown`] or when the sender is gone,
    /// after committing what came before.
    pub fn run(mut self, commands: CommandInbox) {
        let mut batch: Vec<Command> = Vec::with_capacity(self.max_batch);
        let mut next_prune = Instant::now() + self.prune_interval;
        let mut next_wal_check = Instant::now();
        loop {
            // Waking at the prune deadline even when idle is what makes TTL pruning happen
            // on a quiet server.
            let stop = match commands.recv_until(next_prune) {
                Ok(first) => self.gather(first, &commands, &mut batch),
                Err(RecvTimeoutError::Disconnected) => true,
                Err(RecvTimeoutError::Timeout) => false,
            };
            if !batch.is_empty() {
                self.run_batch(&mut batch);
                // A `stat` per batch was 2% of the writer's time; the WAL grows by a few MB
                // at most between two checks.
                let now = Instant::now();
                if now >= next_wal_check {
                    self.control.after_batch();
                    next_wal_check = now + WAL_CHECK_INTERVAL;
                }
            }
            if stop {
                break;
            }
            if Instant::now() >= next_prune {
                let more = self.prune();
                // A full chunk means more is expired: continue right after the next batch.
                next_prune = if more {
                    Instant::now()
                } else {
                    Instant::now() + self.prune_interval
                };
            }
        }
        // Commands queued after Shutdown are dropped with the receiver; their callers see
        // the store as closed.
        tracing::debug!("sqlite history writer stopped");
    }

    /// Group commit: fills `batch` with `first`, everything that queued up while the
    /// previous batch was committing, and under load what arrives within [`LINGER`]. True
    /// when a [`Command::Shutdown`] was met: what came before it is in the batch, what came
    /// after it is dropped (those callers see the store as closed).
    fn gather(&self, first: Command, commands: &CommandInbox, batch: &mut Vec<Command>) -> bool {
        if matches!(first, Command::Shutdown) {
            return true;
        }
        batch.push(first);
        let mut linger_until = None;
        while batch.len() < self.max_batch {
            let before = batch.len();
            commands.take_queued(batch, self.max_batch - before);
            if let Some(at) = batch[before..]
                .iter()
                .position(|command| matches!(command, Command::Shutdown))
            {
                batch.truncate(before + at);
                return true;
            }
            if batch.len() > before {
                continue;
            }
            if batch.len() < LINGER_MIN_BATCH {
                break;
            }
            let until = *linger_until.get_or_insert_with(|| Instant::now() + LINGER);
            match commands.recv_until(until) {
                Ok(Command::Shutdown) => return true,
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        false
    }

    fn run_batch(&mut self, batch: &mut Vec<Command>) {
        if self.streams.len() > STREAM_CACHE_CAPACITY {
            self.streams.clear();
        }
        let now = now_ms();
        let mut work = Batch::default();
        let mut commands = batch.drain(..);
        let control = self.control.clone();
        let gate = control.gate.lock();
        let applied = self.apply(&mut commands, &mut work, now);
        if applied.is_err() && !self.conn.is_autocommit() {
            // If even the rollback fails, the next BEGIN reports the problem.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        // Fair: a checkpointer waiting to restart the WAL goes before the next batch.
        MutexGuard::unlock_fair(gate);
        match applied {
            Ok(()) => {
                self.counters.batch(work.replies.len());
                // After commit, in offset order: fan-out never runs ahead of history.
                for event in work.events {
                    let event = Arc::new(event);
                    let listener = &self.listener;
                    if catch_unwind(AssertUnwindSafe(|| listener.committed(event))).is_err() {
                        // A broken listener must not take history down with it.
                        tracing::error!("history commit listener panicked");
                    }
                }
                for reply in work.replies {
                    reply.complete();
                }
            }
            Err(error) => {
                // The cached tops of these channels counted publications that were rolled
                // back; forget them so they are re-read and offsets stay contiguous.
                for channel in work.touched.keys() {
                    self.streams.remove(channel);
                }
                let message = format!("sqlite write failed: {error}");
                tracing::error!(error = %error, commands = work.replies.len(), "sqlite history batch failed");
                for reply in work.replies {
                    reply.fail(&message);
                }
                for reply in commands.filter_map(Command::into_reply) {
                    reply.fail(&message);
                }
            }
        }
    }

    /// Applies commands in one transaction and commits it. On error the transaction is left
    /// open for the caller to roll back, and `commands` holds those not yet applied.
    fn apply(
        &mut self,
        commands: &mut impl Iterator<Item = Command>,
        work: &mut Batch,
        now: u64,
    ) -> rusqlite::Result<()> {
        self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        for command in commands.by_ref() {
            match command {
                Command::Append { request, reply } => {
                    // Both outcomes queue the reply, so a database failure still answers
                    // this caller (with the batch's error) instead of dropping it.
                    let outcome = self.append(request, work, now);
                    let (result, failure) = match outcome {
                        Ok(result) => (result, None),
                        Err(error) => (Err(StoreError::Backend(error.to_string())), Some(error)),
                    };
                    work.replies.push(Reply::Append { reply, result });
                    if let Some(error) = failure {
                        return Err(error);
                    }
                }
                Command::Remove { channel, reply } => {
                    work.replies.push(Reply::Done { reply });
                    // In command order, so appends queued after the remove survive it.
                    let channel: Arc<str> = channel.into();
                    let meta = match self.streams.entry(channel.clone()) {
                        Entry::Occupied(entry) => entry.into_mut(),
                        Entry::Vacant(entry) => {
                            entry.insert(load_meta(&self.conn, &channel, &self.default_epoch)?)
                        }
                    };
                    if let Some(id) = meta.id {
                        self.conn
                            .prepare_cached("DELETE FROM publications WHERE stream = ?1")?
                            .execute(params![id])?;
                        // The newest publication is gone: `finish_streams` writes the top.
                        meta.trimmed = meta.top;
                        meta.head_expires = None;
                        meta.dirty = true;
                        work.touched.entry(channel).or_insert(meta.keep);
                    }
                }
                Command::Flush { reply } => work.replies.push(Reply::Done { reply }),
                // `run` never puts it in a batch.
                Command::Shutdown => {}
            }
        }
        self.finish_streams(work)?;
        self.conn.prepare_cached("COMMIT")?.execute([]).map(drop)
    }

    /// Assigns the next offset and stores one publication, unless its idempotency key was
    /// seen. The outer error is the database's (fails the batch); the inner one is this
    /// request's alone.
    fn append(
        &mut self,
        request: AppendRequest,
        work: &mut Batch,
        now: u64,
    ) -> rusqlite::Result<Result<Appended, StoreError>> {
        let AppendRequest {
            channel,
            mut publication,
            retention,
            idempotency,
        } = request;
        let extras = match encode_extras(&publication) {
            Ok(extras) => extras,
            Err(error) => {
                return Ok(Err(StoreError::Backend(format!(
                    "cannot encode publication: {error}"
                ))));
            }
        };
        if let Some((key, _)) = &idempotency
            && let Some(position) = self.seen_key(work, &channel, key, now)?
        {
            return Ok(Ok(Appended {
                position,
                duplicate: true,
            }));
        }

        // Recorded before the cached top changes, so a failure below resets this channel.
        work.touched.insert(channel.clone(), retention.size);
        let meta = match self.streams.entry(channel.clone()) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                entry.insert(load_meta(&self.conn, &channel, &self.default_epoch)?)
            }
        };
        let stream = match meta.id {
            Some(id) => id,
            None => {
                // The top is written once per batch in `finish_streams`; the row is created
                // now because its id keys the publication.
                self.conn
                    .prepare_cached(
                        "INSERT INTO streams (channel, top, epoch, keep) VALUES (?1, 0, ?2, ?3)",
                    )?
                    .execute(params![&*channel, &*meta.epoch, retention.size])?;
                meta.keep = retention.size;
                let id = self.conn.last_insert_rowid();
                meta.id = Some(id);
                id
            }
        };
        let offset = meta.top + 1;
        let expires = now.saturating_add(millis(retention.ttl));
        let data = publication.data.bytes();
        self.conn
            .prepare_cached(
                "INSERT INTO publications (stream, seq, time_ms, expires_ms, is_binary, data, tags, info)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                stream,
                to_i64(offset),
                to_i64(publication.time_ms),
                to_i64(expires),
                publication.data.is_binary(),
                &data[..],
                extras.tags,
                extras.info,
            ])?;
        meta.top = offset;
        meta.row_bytes = data.len()
            + extras.tags.as_ref().map_or(0, String::len)
            + extras.info.as_ref().map_or(0, String::len)
            + ROW_OVERHEAD;
        if meta.head_expires.is_none() {
            // The first publication the stream stores (again): the TTL prune must see it.
            meta.head_expires = Some(expires);
            meta.dirty = true;
        }
        let epoch = meta.epoch.clone();
        let position = StreamPosition::new(offset, &*epoch);

        if let Some((key, window)) = idempotency {
            let until = now.saturating_add(millis(window));
            self.conn
                .prepare_cached(
                    "INSERT OR REPLACE INTO idempotency (channel, key, seq, epoch, expires_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![
                    &*channel,
                    &key,
                    to_i64(offset),
                    &*epoch,
                    to_i64(until)
                ])?;
            work.keys.insert((channel.clone(), key), position.clone());
        }

        publication.offset = offset;
        work.events
            .push(PublicationEvent::new(channel, epoch, publication));
        Ok(Ok(Appended {
            position,
            duplicate: false,
        }))
    }

    /// The first result for `key` on `channel`, if it is still inside its window: from this
    /// batch (not yet visible in the database) or from the database.
    fn seen_key(
        &self,
        work: &Batch,
        channel: &Arc<str>,
        key: &str,
        now: u64,
    ) -> rusqlite::Result<Option<StreamPosition>> {
        if let Some(position) = work.keys.get(&(channel.clone(), key.to_owned())) {
            return Ok(Some(position.clone()));
        }
        self.conn
            .prepare_cached("SELECT seq, epoch FROM idempotency WHERE channel = ?1 AND key = ?2 AND expires_ms > ?3")?
            .query_row(params![&**channel, key, to_i64(now)], |row| {
                Ok(StreamPosition::new(to_u64(row.get(0)?), row.get::<_, String>(1)?))
            })
            .optional()
    }

    /// Once per channel per batch: apply size retention, and write the `streams` row if it
    /// changed. Appends alone do not change it: the top is the newest stored `seq`.
    ///
    /// Size retention runs in chunks: a channel is trimmed only once it holds more than
    /// [`trim_slack`] rows (about a quarter of a page) beyond its size, and then the whole
    /// excess goes in one range delete on the channel's first page. Reads never see the extra
    /// rows: they return only offsets above `top - keep`. A trim leaves `head_expires` as it
    /// was (an earlier time than the new head's, which the TTL prune allows for), so it
    /// writes nothing to `streams`.
    fn finish_streams(&mut self, work: &Batch) -> rusqlite::Result<()> {
        for (channel, size) in &work.touched {
            let meta = self
                .streams
                .get_mut(channel)
                .expect("a channel touched in this batch has cached meta");
            let id = meta.id.expect("a channel touched has a streams row");
            if meta.keep != *size {
                meta.keep = *size;
                meta.dirty = true;
            }
            let cut = meta.top.saturating_sub(u64::from(*size));
            if cut > meta.trimmed.saturating_add(trim_slack(meta.row_bytes)) {
                self.conn
                    .prepare_cached("DELETE FROM publications WHERE stream = ?1 AND seq <= ?2")?
                    .execute(params![id, to_i64(cut)])?;
                meta.trimmed = cut;
                if cut >= meta.top {
                    // Nothing left: the top must be written, and the TTL prune has nothing to do.
                    meta.head_expires = None;
                    meta.dirty = true;
                }
            }
            if meta.dirty {
                // `max`: a top written by the TTL prune is never lowered.
                self.conn
                    .prepare_cached(
                        "UPDATE streams SET top = max(top, ?2), keep = ?3, head_expires = ?4
                         WHERE id = ?1",
                    )?
                    .execute(params![
                        id,
                        to_i64(meta.top),
                        meta.keep,
                        meta.head_expires.map(to_i64)
                    ])?;
                meta.dirty = false;
            }
        }
        Ok(())
    }

    /// Deletes one chunk of expired publications and idempotency keys in its own short
    /// transaction. Returns whether there may be more to delete right away.
    ///
    /// Expired publications are found per stream: `streams.head_expires` says when a stream's
    /// oldest publication expires (or earlier: size retention moves the head without
    /// updating it, so a visit may find nothing expired, and then records the real head's
    /// expiry). The expired ones are deleted from the head as one range, up to the first that
    /// has not expired. Within a stream expiry grows with the offset while its TTL stays the
    /// same; if a namespace's TTL is lowered, newer rows can expire before older ones and
    /// stay on disk (never in reads, which check `expires_ms`) until the older ones expire
    /// too.
    fn prune(&mut self) -> bool {
        let now = now_ms();
        let control = self.control.clone();
        let _gate = control.gate.lock();
        let result = (|| -> rusqlite::Result<(usize, usize, bool)> {
            self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
            let (publications, more) = self.prune_publications(now)?;
            let keys = self
                .conn
                .prepare_cached(
                    "DELETE FROM idempotency WHERE (channel, key) IN
                     (SELECT channel, key FROM idempotency WHERE expires_ms <= ?1 LIMIT ?2)",
                )?
                .execute(params![to_i64(now), PRUNE_CHUNK])?;
            self.conn.prepare_cached("COMMIT")?.execute([])?;
            let full = i64::try_from(keys).is_ok_and(|n| n >= PRUNE_CHUNK);
            Ok((publications, keys, more || full))
        })();
        match result {
            Ok((publications, keys, more)) => {
                if publications > 0 || keys > 0 {
                    tracing::debug!(publications, keys, "pruned expired history");
                }
                more
            }
            Err(error) => {
                if !self.conn.is_autocommit() {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                // The cached heads of pruned streams may be wrong now; reload them all.
                self.streams.clear();
                // Expired rows are already invisible to reads; the next prune retries.
                tracing::warn!(error = %error, "pruning expired sqlite history failed");
                false
            }
        }
    }

    /// The publications half of [`Self::prune`]: at most [`PRUNE_CHUNK`] rows. Returns the
    /// rows deleted and whether more may be expired.
    fn prune_publications(&mut self, now: u64) -> rusqlite::Result<(usize, bool)> {
        let due: Vec<(i64, String)> = self
            .conn
            .prepare_cached(
                "SELECT id, channel FROM streams WHERE head_expires <= ?1
                 ORDER BY head_expires LIMIT ?2",
            )?
            .query_map(params![to_i64(now), PRUNE_CHUNK], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let mut budget = usize::try_from(PRUNE_CHUNK).unwrap_or(usize::MAX);
        let mut deleted = 0;
        for (id, channel) in &due {
            if budget == 0 {
                return Ok((deleted, true));
            }
            // The expired run at the head, oldest first, read up to the budget.
            let mut last_expired = None;
            let mut expired = 0;
            {
                let mut head = self.conn.prepare_cached(
                    "SELECT seq, expires_ms FROM publications WHERE stream = ?1
                     ORDER BY seq LIMIT ?2",
                )?;
                let mut rows =
                    head.query(params![id, i64::try_from(budget).unwrap_or(i64::MAX)])?;
                while let Some(row) = rows.next()? {
                    if to_u64(row.get(1)?) > now {
                        break;
                    }
                    last_expired = Some(row.get::<_, i64>(0)?);
                    expired += 1;
                }
            }
            if let Some(last) = last_expired {
                self.conn
                    .prepare_cached("DELETE FROM publications WHERE stream = ?1 AND seq <= ?2")?
                    .execute(params![id, last])?;
            }
            // If that was the newest publication, its offset stays the top.
            self.conn
                .prepare_cached(
                    "UPDATE streams SET head_expires = ?2, top = max(top, ?3) WHERE id = ?1",
                )?
                .execute(params![
                    id,
                    head_expiry(&self.conn, *id)?.map(to_i64),
                    last_expired.unwrap_or(0)
                ])?;
            // Reloaded on its next append, with the head as it is now.
            self.streams.remove(channel.as_str());
            budget -= expired;
            deleted += expired;
        }
        let full = i64::try_from(due.len()).is_ok_and(|n| n >= PRUNE_CHUNK);
        Ok((deleted, full || budget == 0))
    }
}

/// When the stream's oldest stored publication expires; `None` if it stores none.
fn head_expiry(conn: &Connection, stream: i64) -> rusqlite::Result<Option<u64>> {
    conn.prepare_cached(
        "SELECT expires_ms FROM publications WHERE stream = ?1 ORDER BY seq LIMIT 1",
    )?
    .query_row(params![stream], |row| row.get::<_, i64>(0))
    .optional()
    .map(|expires| expires.map(to_u64))
}

/// What a row costs in a page besides its data, tags and info, roughly (key, times, record
/// header, cell pointer).
const ROW_OVERHEAD: usize = 32;

/// About a quarter of a page: how much a channel may hold beyond its size before size
/// retention deletes the excess. See [`trim_slack`].
const TRIM_SLACK_BYTES: usize = 1024;

/// How many rows over its size a channel may hold before size retention deletes them, for
/// rows of `row_bytes`: about [`TRIM_SLACK_BYTES`] worth, at least one.
///
/// Measured (`sqlite_throughput`, 100-byte publications, 4 KiB pages; WAL bytes per append
/// with channels written in turn / at random): trimming every batch costs a DELETE per
/// channel per batch (4.5 / 5.7 KB); letting a channel run `max(size/8, 32)` rows over
/// makes each channel's run of rows grow by several pages between trims, and a page that
/// fills up in the middle of the b-tree is split by rebalancing it with its neighbours
/// (7.9 / 6.7 KB). A slack of about a quarter of a page fits in the free space b-tree pages
/// keep anyway (4.8 / 4.6 KB) with 6 times fewer DELETEs than trimming every batch.
fn trim_slack(row_bytes: usize) -> u64 {
    u64::try_from(TRIM_SLACK_BYTES / row_bytes.max(ROW_OVERHEAD))
        .unwrap_or(1)
        .max(1)
}

/// A channel's stream from the database; a channel never appended to is at offset 0 in the
/// store-wide default epoch (the same answer readers give for it).
fn load_meta(
    conn: &Connection,
    channel: &str,
    default_epoch: &Arc<str>,
) -> rusqlite::Result<StreamMeta> {
    let row: Option<(i64, i64, String, u32, Option<i64>)> = conn
        .prepare_cached(SELECT_STREAM)?
        .query_row(params![channel], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
            ))
        })
        .optional()?;
    Ok(match row {
        Some((id, top, epoch, keep, head_expires)) => {
            // Most streams share the default epoch; sharing the Arc saves an allocation each.
            let epoch = if *epoch == **default_epoch {
                default_epoch.clone()
            } else {
                Arc::from(epoch)
            };
            StreamMeta {
                id: Some(id),
                top: to_u64(top),
                epoch,
                trimmed: 0,
                keep,
                head_expires: head_expires.map(to_u64),
                row_bytes: 0,
                dirty: false,
            }
        }
        None => StreamMeta {
            id: None,
            top: 0,
            epoch: default_epoch.clone(),
            trimmed: 0,
            keep: 0,
            head_expires: None,
            row_bytes: 0,
            dirty: false,
        },
    })
}
