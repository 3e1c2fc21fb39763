//! The outbound queue on Redis, shared by every node of a cluster: [`RedisOutboundQueue`].
//!
//! Owns: the [`OutboundQueue`] contract over the keys and scripts of `queue_scripts.rs`
//! (argument encoding, reply parsing, splitting big calls into bounded script calls).
//!
//! May touch: the first shard's Redis, through its [`Link`] (the engine's own connections).
//!
//! Every key lives on one Redis (the first shard) under one hash tag, so that each change —
//! a batch enqueue, a claim of up to 256 jobs, a batch finish — is one Lua script, atomic
//! against every other node. The queue therefore does not shard: its throughput is what one
//! Redis core runs (the scripts do a handful of O(log n) commands per job) and its size what
//! one Redis holds; more shards spread channels, not jobs. The first entry of
//! `redis.addresses` (or `redis.sentinels`) holds them: reordering that list moves the
//! queue and the registry to an empty Redis.
//!
//! Durability is Redis's: run it with AOF (`appendfsync everysec` or `always`) and
//! `maxmemory-policy noeviction` — the queue is the only copy of a job, and an evicted key
//! would break the indexes. With `redis.wait_replicas`, an enqueue returns only once that
//! many replicas have it (as a publish does), so a failover does not lose accepted jobs;
//! claims and finishes are not waited for (one lost in a failover sends a job again, which
//! at-least-once allows).
//!
//! Work whose size the caller does not bound (cancel of a whole group, purge, status scans)
//! runs as several scripts of at most [`SCAN`] ids each, so Redis never stalls on one
//! call; each job's change is still atomic, and a concurrent claim sees each job either
//! before or after. A status query walks the group's or the recipient's index when the
//! filter names one; by state alone it walks every retained job, so it costs O(jobs).
//!
//! Measured (`examples/outbound_throughput.rs redis=URL`, one local Redis 7, a shared
//! 2-core machine): about 30,000 jobs/s enqueue + claim + finish; a finished job keeps about
//! 1.2 KB until purged.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use herald_core::device::{Page, PageRequest};
use herald_core::outbound::{
    Finished, Job, JobState, JobStatus, MemberFinished, NewJob, OutboundQueue, Outcome, QueueError,
    StatusFilter,
};
use herald_core::store::StoreError;
use redis::{FromRedisValue, ScriptInvocation, Value};

use super::conn::Link;
use super::queue_scripts::{
    CANCEL, CLAIM, CLAIM_FIELDS, DUE, ENQUEUE, FINISH, FINISH_MEMBERS, HELD, PURGE, REPORT,
    STATUS_FIELDS, STATUSES, TAKE_RATE,
};

/// Jobs per `enqueue` script call (a push fan-out writes batches of about this size).
const ENQUEUE_CHUNK: usize = 1_000;
/// Outcomes per `finish` script call.
const FINISH_CHUNK: usize = 1_000;
/// Most jobs one claim hands out (a bigger `limit` is cut to this).
const MAX_CLAIM: usize = 10_000;
/// Ids one cancel, purge or status script looks at before it returns.
const SCAN: usize = 1_000;
/// How long a rate window's counter outlives the end of its window (other nodes' clocks
/// may be a little behind).
const RATE_GRACE_MS: u64 = 1_000;

/// The outbound queue of a cluster, in Redis. Cheap to clone.
#[derive(Clone)]
pub struct RedisOutboundQueue {
    link: Arc<Link>,
    base: String,
    /// Replicas an enqueue must reach (0: the primary's answer is enough), and how long to
    /// wait for them.
    replicas: (u32, Duration),
}

impl std::fmt::Debug for RedisOutboundQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOutboundQueue")
            .field("redis", &self.link.name())
            .field("base", &self.base)
            .finish()
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A connection problem is `Unavailable` (the caller retries later); anything else is a
/// backend error.
pub(crate) fn queue_error(error: StoreError) -> QueueError {
    match error {
        StoreError::Unavailable(message) => QueueError::Unavailable(message),
        StoreError::Backend(message) | StoreError::UnrecoverablePosition(message) => {
            QueueError::Backend(message)
        }
    }
}

fn malformed(detail: impl std::fmt::Display) -> QueueError {
    QueueError::Backend(format!("unexpected reply from redis: {detail}"))
}

fn text(value: Value) -> Result<String, QueueError> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).map_err(malformed),
        Value::SimpleString(text) => Ok(text),
        Value::Int(n) => Ok(n.to_string()),
        Value::Nil => Ok(String::new()),
        other => Err(malformed(format!("{other:?} where text was expected"))),
    }
}

fn number<T: std::str::FromStr>(value: Value, what: &str) -> Result<T, QueueError> {
    let text = text(value)?;
    text.parse()
        .map_err(|_| malformed(format!("{what} {text:?} is not a number")))
}

/// A reply that must be an array.
fn array(value: Value) -> Result<Vec<Value>, QueueError> {
    match value {
        Value::Array(items) => Ok(items),
        other => Err(malformed(format!("{other:?} where an array was expected"))),
    }
}

/// The start of a lexicographic range just after `id` (`-`: from the first).
fn after(id: &str) -> String {
    if id.is_empty() {
        "-".to_owned()
    } else {
        format!("({id}")
    }
}

impl RedisOutboundQueue {
    /// The queue under `base` (see `Keys::push`) on the Redis behind `link`; enqueues wait
    /// for `replicas`.
    pub(crate) fn new(link: Arc<Link>, base: String, replicas: (u32, Duration)) -> Self {
        Self {
            link,
            base,
            replicas,
        }
    }

    /// Runs one enqueue script and, when replicas are required, waits for them on the same
    /// connection (WAIT counts the replicas that have every write made on it so far).
    async fn enqueue_chunk(
        &self,
        invocation: ScriptInvocation<'static>,
    ) -> Result<usize, QueueError> {
        let (replicas, timeout) = self.replicas;
        let (added, confirmed): (usize, u32) = self
            .link
            .run(|mut connection| async move {
                let added: usize = invocation.invoke_async(&mut connection).await?;
                if replicas == 0 {
                    return Ok((added, 0));
                }
                let confirmed: u32 = redis::cmd("WAIT")
                    .arg(replicas)
                    .arg(millis(timeout))
                    .query_async(&mut connection)
                    .await?;
                Ok((added, confirmed))
            })
            .await
            .map_err(queue_error)?;
        if confirmed < replicas {
            return Err(QueueError::Unavailable(format!(
                "jobs stored on the primary but confirmed by {confirmed} of {replicas} replicas \
                 within {timeout:?}; enqueue them again (known ids are skipped)"
            )));
        }
        Ok(added)
    }

    async fn run<T: FromRedisValue + Send>(
        &self,
        invocation: ScriptInvocation<'static>,
    ) -> Result<T, QueueError> {
        self.link
            .run(|mut connection| async move { invocation.invoke_async(&mut connection).await })
            .await
            .map_err(queue_error)
    }

    fn index(&self, filter: &StatusFilter) -> String {
        // The narrowest index the filter allows; the script checks every field anyway.
        if !filter.group.is_empty() {
            format!("{}:g:{}", self.base, filter.group)
        } else if !filter.recipient.is_empty() {
            format!("{}:r:{}", self.base, filter.recipient)
        } else {
            format!("{}:all", self.base)
        }
    }

    /// One [`STATUSES`] call: the last id it looked at (empty: the index ended), how many
    /// matched, and the matches unless `count_only`.
    async fn scan_statuses(
        &self,
        index: &str,
        start: &str,
        filter: &StatusFilter,
        want: usize,
        count_only: bool,
    ) -> Result<(String, u64, Vec<JobStatus>), QueueError> {
        let states = if filter.states.is_empty() {
            String::new()
        } else {
            let names: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
            format!(",{},", names.join(","))
        };
        let mut invocation = STATUSES.key(&self.base);
        invocation
            .key(index)
            .arg(start)
            .arg(SCAN)
            .arg(&filter.group)
            .arg(&filter.recipient)
            .arg(states)
            .arg(want)
            .arg(if count_only { "1" } else { "0" });
        let mut reply = array(self.run(invocation).await?)?.into_iter();
        let (Some(last), Some(matches)) = (reply.next(), reply.next()) else {
            return Err(malformed("a status reply without its header"));
        };
        let last = text(last)?;
        let matches = number(matches, "match count")?;
        let rest: Vec<Value> = reply.collect();
        if !rest.len().is_multiple_of(STATUS_FIELDS) {
            return Err(malformed("a status reply with a partial status"));
        }
        let mut statuses = Vec::with_capacity(rest.len() / STATUS_FIELDS);
        let mut fields = rest.into_iter();
        while let Some(id) = fields.next() {
            let mut next = || fields.next().unwrap_or(Value::Nil);
            let (id, kind, group, recipient) =
                (text(id)?, text(next())?, text(next())?, text(next())?);
            let state = text(next())?;
            let state = state
                .parse::<JobState>()
                .map_err(|_| malformed(format!("job {id:?} has state {state:?}")))?;
            statuses.push(JobStatus {
                kind,
                group,
                recipient,
                state,
                attempts: number(next(), "attempts")?,
                reason: text(next())?,
                updated_at: number(next(), "updated_at")?,
                id,
            });
        }
        Ok((last, matches, statuses))
    }

    async fn count_statuses(&self, filter: &StatusFilter) -> Result<u64, QueueError> {
        let index = self.index(filter);
        // An index holds exactly the jobs of its group or recipient: only a second field
        // needs a scan.
        if filter.states.is_empty() && (filter.group.is_empty() || filter.recipient.is_empty()) {
            return self
                .link
                .query(redis::cmd("ZCARD").arg(&index).to_owned())
                .await
                .map_err(queue_error);
        }
        let mut total = 0;
        let mut start = "-".to_owned();
        loop {
            let (last, matches, _) = self
                .scan_statuses(&index, &start, filter, u32::MAX as usize, true)
                .await?;
            total += matches;
            if last.is_empty() {
                return Ok(total);
            }
            start = after(&last);
        }
    }
}

/// The 8 [`ENQUEUE`] arguments of `job`, with `order` as its order key argument.
fn job_args(invocation: &mut ScriptInvocation<'static>, job: &NewJob, order: String) {
    invocation
        .arg(&job.id)
        .arg(&job.kind)
        .arg(&job.group)
        .arg(&job.recipient)
        .arg(&job.payload[..])
        .arg(job.not_before)
        .arg(job.expire_at.map(|at| at.to_string()).unwrap_or_default())
        .arg(order);
}

/// An outcome as the finish scripts take it: its name, reason and retry time.
fn outcome_args(outcome: &Outcome) -> (&'static str, &String, u64) {
    match outcome {
        Outcome::Sent { detail } => ("sent", detail, 0),
        Outcome::Retry { at, reason } => ("retry", reason, *at),
        Outcome::Failed { reason } => ("failed", reason, 0),
        Outcome::Expired { reason } => ("expired", reason, 0),
    }
}

fn parse_claimed(kind: &str, reply: Vec<Vec<u8>>) -> Result<Vec<Job>, QueueError> {
    if !reply.len().is_multiple_of(CLAIM_FIELDS) {
        return Err(malformed("a claim reply with a partial job"));
    }
    let string = |bytes: Vec<u8>| String::from_utf8(bytes).map_err(malformed);
    let mut jobs = Vec::with_capacity(reply.len() / CLAIM_FIELDS);
    let mut fields = reply.into_iter();
    while let Some(id) = fields.next() {
        let mut next = || fields.next().unwrap_or_default();
        let (id, group, recipient) = (string(id)?, string(next())?, string(next())?);
        let payload = Bytes::from(next());
        let not_before = string(next())?;
        let expire_at = string(next())?;
        let attempt = string(next())?;
        let parse = |text: &str, what: &str| {
            text.parse::<u64>()
                .map_err(|_| malformed(format!("job {id:?}: {what} {text:?}")))
        };
        jobs.push(Job {
            kind: kind.to_owned(),
            group,
            recipient,
            payload,
            not_before: parse(&not_before, "not_before")?,
            expire_at: match expire_at.as_str() {
                "" => None,
                at => Some(parse(at, "expire_at")?),
            },
            attempt: u32::try_from(parse(&attempt, "attempt")?).unwrap_or(u32::MAX),
            last_error: string(next())?,
            id,
        });
    }
    Ok(jobs)
}

#[async_trait]
impl OutboundQueue for RedisOutboundQueue {
    async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<usize, QueueError> {
        // `enqueue` takes no `now`: a new job's status shows when it was written.
        let written = herald_core::time::now_ms();
        let mut added = 0;
        for chunk in jobs.chunks(ENQUEUE_CHUNK) {
            let mut invocation = ENQUEUE.key(&self.base);
            invocation.arg(written).arg("jobs");
            for job in chunk {
                let order = match &job.order_key {
                    Some(key) => format!("+{key}"),
                    None => "-".to_owned(),
                };
                job_args(&mut invocation, job, order);
            }
            added += self.enqueue_chunk(invocation).await?;
        }
        Ok(added)
    }

    async fn enqueue_batch(
        &self,
        batch: NewJob,
        members: Vec<NewJob>,
    ) -> Result<usize, QueueError> {
        if members.is_empty() {
            return Ok(0);
        }
        // One script for the batch and every member: a batch is never stored without the
        // members it stands for, nor members without their batch.
        let mut invocation = ENQUEUE.key(&self.base);
        invocation.arg(herald_core::time::now_ms()).arg("batch");
        job_args(&mut invocation, &batch, "-".to_owned());
        for member in &members {
            let member = NewJob {
                payload: Bytes::new(),
                ..member.clone()
            };
            job_args(&mut invocation, &member, "=".to_owned());
        }
        self.enqueue_chunk(invocation).await
    }

    async fn held(&self, ids: Vec<String>) -> Result<Vec<String>, QueueError> {
        let mut held = Vec::new();
        for chunk in ids.chunks(FINISH_CHUNK) {
            let mut invocation = HELD.key(&self.base);
            for id in chunk {
                invocation.arg(id);
            }
            let found: Vec<String> = self.run(invocation).await?;
            held.extend(found);
        }
        Ok(held)
    }

    async fn finish_members(
        &self,
        finished: Vec<MemberFinished>,
        now: u64,
    ) -> Result<(), QueueError> {
        for chunk in finished.chunks(FINISH_CHUNK) {
            let mut invocation = FINISH_MEMBERS.key(&self.base);
            invocation.arg(now);
            for done in chunk {
                let (outcome, reason, at) = outcome_args(&done.outcome);
                invocation
                    .arg(&done.id)
                    .arg(outcome)
                    .arg(reason)
                    .arg(at)
                    .arg(&done.payload[..]);
            }
            self.run::<()>(invocation).await?;
        }
        Ok(())
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
        // At least a millisecond: a lease that ends at `now` would leave the job due.
        let lease_until = now.saturating_add(millis(lease).max(1));
        if lease_until == now {
            return Err(QueueError::Invalid(format!(
                "a lease from {now} cannot end after it"
            )));
        }
        let mut invocation = CLAIM.key(&self.base);
        invocation
            .arg(kind)
            .arg(limit.min(MAX_CLAIM))
            .arg(now)
            .arg(lease_until);
        let reply: Vec<Vec<u8>> = self.run(invocation).await?;
        parse_claimed(kind, reply)
    }

    async fn finish(&self, finished: Vec<Finished>, now: u64) -> Result<(), QueueError> {
        for chunk in finished.chunks(FINISH_CHUNK) {
            let mut invocation = FINISH.key(&self.base);
            invocation.arg(now);
            for done in chunk {
                let (outcome, reason, at) = outcome_args(&done.outcome);
                invocation
                    .arg(&done.id)
                    .arg(done.attempt)
                    .arg(outcome)
                    .arg(reason)
                    .arg(at);
            }
            self.run::<()>(invocation).await?;
        }
        Ok(())
    }

    async fn cancel(&self, group: &str, now: u64) -> Result<u64, QueueError> {
        let mut cancelled = 0;
        let mut start = "-".to_owned();
        loop {
            let mut invocation = CANCEL.key(&self.base);
            invocation.arg(group).arg(now).arg(&start).arg(SCAN);
            let (count, last): (u64, String) = self.run(invocation).await?;
            cancelled += count;
            if last.is_empty() {
                return Ok(cancelled);
            }
            start = after(&last);
        }
    }

    async fn report(
        &self,
        group: &str,
        recipient: &str,
        state: JobState,
        now: u64,
    ) -> Result<bool, QueueError> {
        if !matches!(state, JobState::Delivered | JobState::Interacted) {
            return Err(QueueError::Invalid(format!(
                "a report is delivered or interacted, not {state}"
            )));
        }
        let mut invocation = REPORT.key(&self.base);
        invocation
            .arg(group)
            .arg(recipient)
            .arg(state.as_str())
            .arg(now);
        Ok(self.run::<u8>(invocation).await? == 1)
    }

    async fn statuses(
        &self,
        filter: &StatusFilter,
        page: &PageRequest,
    ) -> Result<Page<JobStatus>, QueueError> {
        let limit = page.effective_limit();
        let index = self.index(filter);
        let mut items = Vec::new();
        let mut start = after(&page.cursor);
        // One more than a page tells whether a next page exists.
        while items.len() <= limit {
            let want = limit + 1 - items.len();
            let (last, _, found) = self
                .scan_statuses(&index, &start, filter, want, false)
                .await?;
            items.extend(found);
            if last.is_empty() {
                break;
            }
            start = after(&last);
        }
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|s| s.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        let total = if page.include_total {
            Some(self.count_statuses(filter).await?)
        } else {
            None
        };
        Ok(Page {
            items,
            next_cursor,
            total,
        })
    }

    async fn purge(&self, before: u64) -> Result<u64, QueueError> {
        // Rate windows are keys that expire by themselves: nothing to drop for them.
        let mut purged = 0;
        loop {
            let mut invocation = PURGE.key(&self.base);
            invocation.arg(before).arg(SCAN);
            let removed: u64 = self.run(invocation).await?;
            purged += removed;
            if removed < SCAN as u64 {
                return Ok(purged);
            }
        }
    }

    async fn due(&self, now: u64) -> Result<Vec<(String, u64)>, QueueError> {
        let mut invocation = DUE.key(&self.base);
        invocation.arg(now);
        let reply = array(self.run(invocation).await?)?;
        if !reply.len().is_multiple_of(2) {
            return Err(malformed("a due reply with a kind and no count"));
        }
        let mut counts = Vec::with_capacity(reply.len() / 2);
        let mut fields = reply.into_iter();
        while let (Some(kind), Some(count)) = (fields.next(), fields.next()) {
            counts.push((text(kind)?, number(count, "due count")?));
        }
        counts.sort();
        Ok(counts)
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
        let end = (now - now % window).saturating_add(window);
        let counter = format!("{}:rate:{window}:{end}:{key}", self.base);
        // The counter's life is relative (PEXPIRE, not PEXPIREAT): `now` is the caller's
        // clock, not Redis's.
        let ttl = end
            .saturating_sub(now)
            .saturating_add(RATE_GRACE_MS)
            .min(i64::MAX as u64);
        let mut invocation = TAKE_RATE.key(&self.base);
        invocation.key(counter).arg(limit).arg(ttl);
        Ok(self.run::<u8>(invocation).await? == 1)
    }
}
