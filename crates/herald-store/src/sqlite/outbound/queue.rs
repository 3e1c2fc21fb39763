//! The durable outbound queue on SQLite: [`SqliteOutboundQueue`].
//!
//! Owns: the SQL of the [`OutboundQueue`] contract over the `jobs` and `rates` tables.
//!
//! May touch: `outbound.db` through [`OutboundDb`] only (writes on its writer thread, reads
//! on its read connections).
//!
//! How it stays fast: `enqueue`, `claim` and `finish` each handle a whole batch in one
//! call, which is one savepoint in the writer's group commit. A claim reads only the
//! partial index of claimable jobs (`state < 2`, by kind and due time), so finished jobs and
//! jobs held behind their `order_key` never slow it down. `order_key` costs nothing when
//! unused: a job with a key that has an earlier unfinished job is stored as `HELD`
//! (outside the claimable index), and the job that finishes releases the next of its key,
//! one indexed update. A batch's members are `HELD` rows without an `order_key` (so no line
//! ever releases them) and without a payload; settling one is one update by id.

use std::collections::BTreeSet;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use herald_core::device::{Page, PageRequest};
use herald_core::outbound::{
    Finished, Job, JobState, JobStatus, MemberFinished, NewJob, OutboundQueue, Outcome, QueueError,
    StatusFilter,
};
use rusqlite::{Connection, OptionalExtension, params, params_from_iter};

use super::schema::{
    CANCELLED, DELIVERED, EXPIRED, FAILED, HELD, INTERACTED, QUEUED, SENDING, SENT, state_codes,
    state_of_code,
};
use super::{DbError, OutboundDb, Terms, json_list};
use crate::sqlite::codec::{millis, to_i64, to_u64};

/// The durable outbound queue in `outbound.db`. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SqliteOutboundQueue {
    db: OutboundDb,
}

impl SqliteOutboundQueue {
    /// The queue of an open database (shares its writer with the device store).
    pub fn new(db: OutboundDb) -> Self {
        Self { db }
    }

    /// The database this queue lives in.
    pub fn db(&self) -> &OutboundDb {
        &self.db
    }
}

/// Makes the first job of `order_key` that is not final claimable, if it was held: called
/// whenever a job with that key becomes final.
fn release_next(conn: &Connection, order_key: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE jobs SET state = ?2 WHERE state = ?3 AND seq =
             (SELECT seq FROM jobs WHERE order_key = ?1 AND state < 3 ORDER BY seq LIMIT 1)",
    )?
    .execute(params![order_key, QUEUED, HELD])?;
    Ok(())
}

fn enqueue_all(conn: &Connection, jobs: &[NewJob]) -> Result<usize, DbError> {
    let written = to_i64(herald_core::time::now_ms());
    let mut insert = conn.prepare_cached(
        "INSERT INTO jobs (id, kind, grp, recipient, payload, not_before, expire_at, order_key,
                           state, attempts, due_at, reason, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 0, ?6, '', ?10)
         ON CONFLICT (id) DO NOTHING",
    )?;
    let mut added = 0;
    for job in jobs {
        let state = match &job.order_key {
            Some(key) if has_line(conn, key)? => HELD,
            _ => QUEUED,
        };
        added += insert.execute(params![
            job.id,
            job.kind,
            job.group,
            job.recipient,
            &job.payload[..],
            to_i64(job.not_before),
            job.expire_at.map(to_i64),
            job.order_key,
            state,
            written,
        ])?;
    }
    Ok(added)
}

fn enqueue_batch_all(
    conn: &Connection,
    batch: &NewJob,
    members: &[NewJob],
) -> Result<usize, DbError> {
    let known: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM jobs WHERE id = ?1)")?
        .query_row(params![batch.id], |row| row.get(0))?;
    if known {
        return Ok(0);
    }
    let written = to_i64(herald_core::time::now_ms());
    let mut insert = conn.prepare_cached(
        "INSERT INTO jobs (id, kind, grp, recipient, payload, not_before, expire_at, order_key,
                           state, attempts, due_at, reason, updated_at)
         VALUES (?1, ?2, ?3, ?4, x'', ?5, ?6, NULL, ?7, 0, ?5, '', ?8)
         ON CONFLICT (id) DO NOTHING",
    )?;
    let mut added = 0;
    for member in members {
        added += insert.execute(params![
            member.id,
            member.kind,
            member.group,
            member.recipient,
            to_i64(member.not_before),
            member.expire_at.map(to_i64),
            HELD,
            written,
        ])?;
    }
    if added > 0 {
        enqueue_all(conn, std::slice::from_ref(batch))?;
    }
    Ok(added)
}

fn finish_members_all(
    conn: &Connection,
    finished: &[MemberFinished],
    now: u64,
) -> Result<(), DbError> {
    // Only held members (HELD without an order key) change: the first settle wins.
    let mut settle = conn.prepare_cached(
        "UPDATE jobs SET state = ?2, reason = ?3, attempts = 1, updated_at = ?4
         WHERE id = ?1 AND state = ?5 AND order_key IS NULL",
    )?;
    let mut retry = conn.prepare_cached(
        "UPDATE jobs SET state = ?2, reason = ?3, attempts = 1, updated_at = ?4, due_at = ?6,
             not_before = ?6, payload = ?7
         WHERE id = ?1 AND state = ?5 AND order_key IS NULL",
    )?;
    let now = to_i64(now);
    for done in finished {
        match &done.outcome {
            Outcome::Retry { at, reason } => retry.execute(params![
                done.id,
                QUEUED,
                reason,
                now,
                HELD,
                to_i64(*at),
                &done.payload[..]
            ])?,
            Outcome::Sent { detail } => {
                settle.execute(params![done.id, SENT, detail, now, HELD])?
            }
            Outcome::Failed { reason } => {
                settle.execute(params![done.id, FAILED, reason, now, HELD])?
            }
            Outcome::Expired { reason } => {
                settle.execute(params![done.id, EXPIRED, reason, now, HELD])?
            }
        };
    }
    Ok(())
}

/// Whether `order_key` has a job that is not final (so a new one must wait).
fn has_line(conn: &Connection, order_key: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM jobs WHERE order_key = ?1 AND state < 3)")?
        .query_row(params![order_key], |row| row.get(0))
}

/// A claimable row as the claim reads it.
struct Due {
    seq: i64,
    job: Job,
    order_key: Option<String>,
    state: i64,
}

fn claim_due(
    conn: &Connection,
    kind: &str,
    limit: usize,
    lease_until: u64,
    now: u64,
) -> Result<Vec<Job>, DbError> {
    let mut claimed = Vec::with_capacity(limit.min(1024));
    while claimed.len() < limit {
        let want = limit - claimed.len();
        let due = select_due(conn, kind, want, now)?;
        let found = due.len();
        let mut expired = 0;
        for row in due {
            if row.job.expire_at.is_some_and(|at| at < now) {
                conn.prepare_cached(
                    "UPDATE jobs SET state = ?2, reason = 'expired before it could be sent',
                         updated_at = ?3 WHERE seq = ?1",
                )?
                .execute(params![row.seq, EXPIRED, to_i64(now)])?;
                if let Some(key) = &row.order_key {
                    release_next(conn, key)?;
                }
                expired += 1;
                continue;
            }
            let mut job = row.job;
            if row.state == SENDING {
                // Its holder died or stalled: say so to the next attempt and in the status.
                job.last_error = "lease expired".to_owned();
            }
            job.attempt += 1;
            conn.prepare_cached(
                "UPDATE jobs SET state = ?2, attempts = ?3, due_at = ?4, reason = ?5,
                     updated_at = ?6 WHERE seq = ?1",
            )?
            .execute(params![
                row.seq,
                SENDING,
                job.attempt,
                to_i64(lease_until),
                job.last_error,
                to_i64(now)
            ])?;
            claimed.push(job);
        }
        // Claimed jobs left the due range (leased past `now`) and expired ones the index;
        // another round only helps when expired jobs took places a claim could fill.
        if found < want || expired == 0 {
            break;
        }
    }
    Ok(claimed)
}

fn select_due(conn: &Connection, kind: &str, limit: usize, now: u64) -> Result<Vec<Due>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, id, grp, recipient, payload, not_before, expire_at, order_key, state,
                attempts, reason
         FROM jobs WHERE kind = ?1 AND state < 2 AND due_at <= ?2
         ORDER BY due_at, seq LIMIT ?3",
    )?;
    let rows = stmt.query_map(
        params![kind, to_i64(now), i64::try_from(limit).unwrap_or(i64::MAX)],
        |row| {
            Ok(Due {
                seq: row.get(0)?,
                job: Job {
                    id: row.get(1)?,
                    kind: kind.to_owned(),
                    group: row.get(2)?,
                    recipient: row.get(3)?,
                    payload: Bytes::from(row.get::<_, Vec<u8>>(4)?),
                    not_before: to_u64(row.get(5)?),
                    expire_at: row.get::<_, Option<i64>>(6)?.map(to_u64),
                    attempt: row.get(9)?,
                    last_error: row.get(10)?,
                },
                order_key: row.get(7)?,
                state: row.get(8)?,
            })
        },
    )?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn finish_all(conn: &Connection, finished: &[Finished], now: u64) -> Result<(), DbError> {
    // Fenced: only the attempt that holds the job (sending, same attempt count) changes it.
    let mut update = conn.prepare_cached(
        "UPDATE jobs SET state = ?3, reason = ?4, updated_at = ?5,
             due_at = coalesce(?6, due_at), not_before = coalesce(?6, not_before)
         WHERE id = ?1 AND state = ?7 AND attempts = ?2
         RETURNING order_key",
    )?;
    for done in finished {
        let (state, reason, retry_at) = match &done.outcome {
            Outcome::Sent { detail } => (SENT, detail, None),
            Outcome::Retry { at, reason } => (QUEUED, reason, Some(to_i64(*at))),
            Outcome::Failed { reason } => (FAILED, reason, None),
            Outcome::Expired { reason } => (EXPIRED, reason, None),
        };
        let order_key: Option<Option<String>> = update
            .query_row(
                params![
                    done.id,
                    done.attempt,
                    state,
                    reason,
                    to_i64(now),
                    retry_at,
                    SENDING
                ],
                |row| row.get(0),
            )
            .optional()?;
        if state != QUEUED
            && let Some(Some(key)) = order_key
        {
            release_next(conn, &key)?;
        }
    }
    Ok(())
}

fn cancel_group(conn: &Connection, group: &str, now: u64) -> Result<u64, DbError> {
    let mut stmt = conn.prepare_cached(
        "UPDATE jobs SET state = ?2, reason = 'cancelled', updated_at = ?3
         WHERE grp = ?1 AND state IN (?4, ?5) RETURNING order_key",
    )?;
    let keys: Vec<Option<String>> = stmt
        .query_map(
            params![group, CANCELLED, to_i64(now), QUEUED, HELD],
            |row| row.get(0),
        )?
        .collect::<rusqlite::Result<_>>()?;
    let count = keys.len() as u64;
    let keys: BTreeSet<String> = keys.into_iter().flatten().collect();
    for key in keys {
        release_next(conn, &key)?;
    }
    Ok(count)
}

fn report_one(
    conn: &Connection,
    group: &str,
    recipient: &str,
    state: JobState,
    now: u64,
) -> Result<bool, DbError> {
    // Interacted wins: a delivered report moves only sent jobs, an interacted one both.
    let (to, from): (i64, &[i64]) = match state {
        JobState::Delivered => (DELIVERED, &[SENT]),
        JobState::Interacted => (INTERACTED, &[SENT, DELIVERED]),
        other => {
            return Err(DbError::Invalid(format!(
                "a report is delivered or interacted, not {other}"
            )));
        }
    };
    conn.prepare_cached(
        "UPDATE jobs SET state = ?3, updated_at = ?4
         WHERE grp = ?1 AND recipient = ?2 AND state IN (SELECT value FROM json_each(?5))",
    )?
    .execute(params![group, recipient, to, to_i64(now), json_list(from)?])?;
    let matched = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE grp = ?1 AND recipient = ?2
                 AND state IN (?3, ?4, ?5))",
        )?
        .query_row(
            params![group, recipient, SENT, DELIVERED, INTERACTED],
            |row| row.get(0),
        )?;
    Ok(matched)
}

/// The `WHERE` terms of a status filter.
fn status_terms(filter: &StatusFilter, terms: &mut Terms) -> Result<(), DbError> {
    if !filter.group.is_empty() {
        terms.add("grp = #", filter.group.clone());
    }
    if !filter.recipient.is_empty() {
        terms.add("recipient = #", filter.recipient.clone());
    }
    if !filter.states.is_empty() {
        let codes: Vec<i64> = filter
            .states
            .iter()
            .flat_map(|s| state_codes(*s).iter().copied())
            .collect();
        terms.add_list("state", &codes)?;
    }
    Ok(())
}

fn list_statuses(
    conn: &Connection,
    filter: &StatusFilter,
    page: &PageRequest,
) -> Result<Page<JobStatus>, DbError> {
    let mut terms = Terms::default();
    if !page.cursor.is_empty() {
        terms.add("id > #", page.cursor.clone());
    }
    status_terms(filter, &mut terms)?;
    let limit = page.effective_limit();
    let sql = format!(
        "SELECT id, kind, grp, recipient, state, attempts, reason, updated_at FROM jobs
         WHERE 1{} ORDER BY id LIMIT {}",
        terms.sql,
        limit + 1
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut items = stmt
        .query_map(params_from_iter(&terms.values), |row| {
            let code: i64 = row.get(4)?;
            Ok((
                JobStatus {
                    id: row.get(0)?,
                    kind: row.get(1)?,
                    group: row.get(2)?,
                    recipient: row.get(3)?,
                    state: JobState::Queued,
                    attempts: row.get(5)?,
                    reason: row.get(6)?,
                    updated_at: to_u64(row.get(7)?),
                },
                code,
            ))
        })?
        .map(|row| {
            let (mut status, code) = row?;
            status.state = state_of_code(code).ok_or_else(|| {
                DbError::Backend(format!("job {:?} has unknown state {code}", status.id))
            })?;
            Ok(status)
        })
        .collect::<Result<Vec<JobStatus>, DbError>>()?;
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|s| s.id.clone()).unwrap_or_default()
    } else {
        String::new()
    };
    let total = if page.include_total {
        let mut terms = Terms::default();
        status_terms(filter, &mut terms)?;
        let sql = format!("SELECT count(*) FROM jobs WHERE 1{}", terms.sql);
        Some(to_u64(
            conn.prepare_cached(&sql)?
                .query_row(params_from_iter(&terms.values), |row| row.get(0))?,
        ))
    } else {
        None
    };
    Ok(Page {
        items,
        next_cursor,
        total,
    })
}

fn take(conn: &Connection, key: &str, limit: u32, window: u64, now: u64) -> Result<bool, DbError> {
    let end = to_i64((now - now % window).saturating_add(window));
    let current: Option<(i64, u32)> = conn
        .prepare_cached("SELECT window_end, used FROM rates WHERE key = ?1")?
        .query_row(params![key], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let used = match current {
        Some((window_end, used)) if window_end == end => used,
        _ => 0,
    };
    if used >= limit {
        return Ok(false);
    }
    conn.prepare_cached(
        "INSERT INTO rates (key, window_end, used) VALUES (?1, ?2, ?3)
         ON CONFLICT (key) DO UPDATE SET window_end = excluded.window_end, used = excluded.used",
    )?
    .execute(params![key, end, used + 1])?;
    Ok(true)
}

#[async_trait]
impl OutboundQueue for SqliteOutboundQueue {
    async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<usize, QueueError> {
        if jobs.is_empty() {
            return Ok(0);
        }
        Ok(self.db.write(move |conn| enqueue_all(conn, &jobs)).await?)
    }

    async fn claim(
        &self,
        kind: &str,
        limit: usize,
        lease: Duration,
        now: u64,
    ) -> Result<Vec<Job>, QueueError> {
        if lease.is_zero() {
            return Err(QueueError::Invalid("a claim needs a lease".to_owned()));
        }
        if limit == 0 {
            return Ok(Vec::new());
        }
        let kind = kind.to_owned();
        let lease_until = now.saturating_add(millis(lease));
        Ok(self
            .db
            .write(move |conn| claim_due(conn, &kind, limit, lease_until, now))
            .await?)
    }

    async fn finish(&self, finished: Vec<Finished>, now: u64) -> Result<(), QueueError> {
        if finished.is_empty() {
            return Ok(());
        }
        Ok(self
            .db
            .write(move |conn| finish_all(conn, &finished, now))
            .await?)
    }

    async fn enqueue_batch(
        &self,
        batch: NewJob,
        members: Vec<NewJob>,
    ) -> Result<usize, QueueError> {
        if members.is_empty() {
            return Ok(0);
        }
        Ok(self
            .db
            .write(move |conn| enqueue_batch_all(conn, &batch, &members))
            .await?)
    }

    async fn held(&self, ids: Vec<String>) -> Result<Vec<String>, QueueError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self
            .db
            .read(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT id FROM jobs WHERE id IN (SELECT value FROM json_each(?1))
                         AND state = ?2 AND order_key IS NULL",
                )?;
                let rows = stmt.query_map(params![json_list(&ids)?, HELD], |row| row.get(0))?;
                Ok(rows.collect::<rusqlite::Result<_>>()?)
            })
            .await?)
    }

    async fn finish_members(
        &self,
        finished: Vec<MemberFinished>,
        now: u64,
    ) -> Result<(), QueueError> {
        if finished.is_empty() {
            return Ok(());
        }
        Ok(self
            .db
            .write(move |conn| finish_members_all(conn, &finished, now))
            .await?)
    }

    async fn cancel(&self, group: &str, now: u64) -> Result<u64, QueueError> {
        let group = group.to_owned();
        Ok(self
            .db
            .write(move |conn| cancel_group(conn, &group, now))
            .await?)
    }

    async fn report(
        &self,
        group: &str,
        recipient: &str,
        state: JobState,
        now: u64,
    ) -> Result<bool, QueueError> {
        let (group, recipient) = (group.to_owned(), recipient.to_owned());
        Ok(self
            .db
            .write(move |conn| report_one(conn, &group, &recipient, state, now))
            .await?)
    }

    async fn statuses(
        &self,
        filter: &StatusFilter,
        page: &PageRequest,
    ) -> Result<Page<JobStatus>, QueueError> {
        let (filter, page) = (filter.clone(), page.clone());
        Ok(self
            .db
            .read(move |conn| list_statuses(conn, &filter, &page))
            .await?)
    }

    async fn purge(&self, before: u64) -> Result<u64, QueueError> {
        Ok(self
            .db
            .write(move |conn| {
                let jobs = conn
                    .prepare_cached("DELETE FROM jobs WHERE state >= 3 AND updated_at < ?1")?
                    .execute(params![to_i64(before)])?;
                conn.prepare_cached("DELETE FROM rates WHERE window_end < ?1")?
                    .execute(params![to_i64(before)])?;
                Ok(jobs as u64)
            })
            .await?)
    }

    async fn due(&self, now: u64) -> Result<Vec<(String, u64)>, QueueError> {
        Ok(self
            .db
            .read(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT kind, count(*) FROM jobs WHERE state < 2 AND due_at <= ?1
                     GROUP BY kind ORDER BY kind",
                )?;
                let rows = stmt.query_map(params![to_i64(now)], |row| {
                    Ok((row.get::<_, String>(0)?, to_u64(row.get(1)?)))
                })?;
                Ok(rows.collect::<rusqlite::Result<_>>()?)
            })
            .await?)
    }

    async fn take_rate(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
        now: u64,
    ) -> Result<bool, QueueError> {
        let window = millis(window);
        if window == 0 {
            return Err(QueueError::Invalid(
                "a rate window must not be zero".to_owned(),
            ));
        }
        if limit == 0 {
            return Ok(false);
        }
        let key = key.to_owned();
        Ok(self
            .db
            .write(move |conn| take(conn, &key, limit, window, now))
            .await?)
    }
}
