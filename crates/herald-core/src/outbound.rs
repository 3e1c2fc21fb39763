//! The outbound queue port: the one durable queue for everything Herald sends out and must
//! retry — push notifications now, webhooks and broker bridges next.
//!
//! Owns the job model and the [`OutboundQueue`] contract; backends (memory in
//! [`crate::memory_outbound`], SQLite and Redis in `herald-store`) implement it and pass
//! [`crate::conformance::run_outbound_suite`]. What a job means (its `kind` and `payload`) is
//! the sender's business (`herald-outbound`); the queue only stores, leases and records.
//!
//! Contract every backend keeps:
//! - a job id is unique for as long as the job is retained: enqueueing a known id again does
//!   nothing (so a retried API call or a re-run expansion sends nothing twice);
//! - a job is handed out by [`OutboundQueue::claim`] only when due (`not_before <= now`),
//!   of a requested kind, not cancelled, and not leased to anyone else; claiming leases it
//!   until `now + lease` and counts an attempt. A lease that runs out (its holder died) makes
//!   the job claimable again — so a job is delivered at least once, and twice only when its
//!   holder died (or stalled past its lease) after sending and before finishing;
//! - [`OutboundQueue::finish`] applies only to the attempt that holds the lease (a late finish
//!   from an expired lease that was claimed again changes nothing; one whose lease ran out
//!   unclaimed still applies, which spares the provider a duplicate);
//! - a job past `expire_at` is never handed out: the next claim that sees it marks it
//!   [`JobState::Expired`];
//! - jobs with the same `order_key` are handed out one at a time in enqueue order: the next is
//!   claimable only once the one before has finished (sent, failed, expired or cancelled);
//! - finished jobs keep their final state and reason (queryable by group and recipient) until
//!   [`OutboundQueue::purge`] removes them;
//! - a **batch** ([`OutboundQueue::enqueue_batch`]) is an ordinary job that stands for many
//!   *member* jobs, so sending N deliveries costs one claim and one finish instead of N. Its
//!   members are held: never handed out by a claim, reported as queued, cancelled with their
//!   group, and settled by whoever holds the batch ([`OutboundQueue::finish_members`]); the
//!   first settle of a member wins and later ones change nothing. A member settled for a
//!   retry becomes an ordinary queued job of its kind (with the payload the settle gives), so
//!   retries, dead letters and statuses work as for any job. A batch whose holder died is
//!   claimed again and sends only the members still held ([`OutboundQueue::held`]).
//!
//! Times are milliseconds since the Unix epoch.
//!
//! May touch: nothing outside the process.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::device::{Page, PageRequest};

/// A job to add.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewJob {
    /// Unique; a known id is not added again.
    pub id: String,
    /// What the sender dispatches on (`push.apns`, `push.fanout`, `webhook`, …).
    pub kind: String,
    /// The request the job belongs to (a push's `uid`): cancelled and queried together.
    pub group: String,
    /// Whom the job is for (a device id, an endpoint); queried by it.
    pub recipient: String,
    /// The sender's payload, opaque to the queue.
    pub payload: Bytes,
    /// Not handed out before this time.
    pub not_before: u64,
    /// Never handed out after this time (`None`: no expiry).
    pub expire_at: Option<u64>,
    /// Jobs with the same key are handed out one at a time, in enqueue order.
    pub order_key: Option<String>,
}

/// A claimed job, leased to the claimer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub id: String,
    pub kind: String,
    pub group: String,
    pub recipient: String,
    pub payload: Bytes,
    pub not_before: u64,
    pub expire_at: Option<u64>,
    /// 1 for the first claim; fences [`OutboundQueue::finish`].
    pub attempt: u32,
    /// The reason the previous attempt gave for retrying (empty on the first).
    pub last_error: String,
}

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Waiting to be sent (or to be retried).
    Queued,
    /// Leased to a sender.
    Sending,
    /// The provider accepted it.
    Sent,
    /// Given up: a permanent error, or retries exhausted (the dead-letter list).
    Failed,
    /// Past its `expire_at` before it could be sent.
    Expired,
    /// Cancelled before it was sent.
    Cancelled,
    /// The app reported the notification arrived (`update_push_status`).
    Delivered,
    /// The app reported the user opened it.
    Interacted,
}

impl JobState {
    pub const ALL: [JobState; 8] = [
        JobState::Queued,
        JobState::Sending,
        JobState::Sent,
        JobState::Failed,
        JobState::Expired,
        JobState::Cancelled,
        JobState::Delivered,
        JobState::Interacted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Sending => "sending",
            JobState::Sent => "sent",
            JobState::Failed => "failed",
            JobState::Expired => "expired",
            JobState::Cancelled => "cancelled",
            JobState::Delivered => "delivered",
            JobState::Interacted => "interacted",
        }
    }

    /// Whether the job will not be handed out again.
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Sending)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = QueueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| QueueError::Invalid(format!("unknown job state {s:?}")))
    }
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Delivered to the provider; `detail` is what it answered (a message id), kept.
    Sent { detail: String },
    /// Try again at `at` (backoff, `Retry-After`); `reason` is kept for the next attempt and
    /// the status.
    Retry { at: u64, reason: String },
    /// Give up (dead letter) with the provider's reason.
    Failed { reason: String },
    /// The job cannot be sent before its expiry.
    Expired { reason: String },
}

/// The end of one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finished {
    pub id: String,
    /// The attempt that was claimed ([`Job::attempt`]).
    pub attempt: u32,
    pub outcome: Outcome,
}

/// How a held member of a batch was settled ([`OutboundQueue::finish_members`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberFinished {
    pub id: String,
    /// `Retry` makes the member an ordinary queued job due at `at`, its first attempt counted.
    pub outcome: Outcome,
    /// For a retry: what the member is sent with on its own (members are stored without a
    /// payload; their batch carries it). Ignored otherwise.
    pub payload: Bytes,
}

/// A job's state, for status queries and the dead-letter list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobStatus {
    pub id: String,
    pub kind: String,
    pub group: String,
    pub recipient: String,
    pub state: JobState,
    pub attempts: u32,
    /// The provider's answer: its error for failed jobs, its message id for sent ones.
    pub reason: String,
    pub updated_at: u64,
}

/// Which statuses: AND across fields; an empty field does not filter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatusFilter {
    pub group: String,
    pub recipient: String,
    pub states: Vec<JobState>,
}

impl StatusFilter {
    pub fn matches(&self, status: &JobStatus) -> bool {
        (self.group.is_empty() || self.group == status.group)
            && (self.recipient.is_empty() || self.recipient == status.recipient)
            && (self.states.is_empty() || self.states.contains(&status.state))
    }
}

/// Why a queue call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("{0}")]
    Invalid(String),
    #[error("outbound queue unavailable: {0}")]
    Unavailable(String),
    #[error("outbound queue error: {0}")]
    Backend(String),
}

/// The durable outbound queue. Backends keep the contract in the module header.
#[async_trait]
pub trait OutboundQueue: Send + Sync + 'static {
    /// Adds jobs durably (known ids are skipped); returns how many were new.
    async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<usize, QueueError>;

    /// Leases up to `limit` due jobs of `kind` until `now + lease`, oldest `not_before`
    /// first. Expired jobs it meets become [`JobState::Expired`] and are not returned. A zero
    /// `lease` is [`QueueError::Invalid`].
    async fn claim(
        &self,
        kind: &str,
        limit: usize,
        lease: Duration,
        now: u64,
    ) -> Result<Vec<Job>, QueueError>;

    /// Records how attempts ended (fenced by attempt; see the module header).
    async fn finish(&self, finished: Vec<Finished>, now: u64) -> Result<(), QueueError>;

    /// Adds `batch` (an ordinary job) and its `members` (held; see the module header) in one
    /// durable step. Members with a known id are skipped, and the batch is added only when at
    /// least one member was new (a known batch id adds nothing). Members' `payload` and
    /// `order_key` are not stored. Returns how many members were new.
    async fn enqueue_batch(&self, batch: NewJob, members: Vec<NewJob>)
    -> Result<usize, QueueError>;

    /// Of `ids`, those of members still held (neither settled nor cancelled), in no
    /// particular order: what a claimed batch has left to send.
    async fn held(&self, ids: Vec<String>) -> Result<Vec<String>, QueueError>;

    /// Settles held members (see [`MemberFinished`]); ids not held are left alone.
    async fn finish_members(
        &self,
        finished: Vec<MemberFinished>,
        now: u64,
    ) -> Result<(), QueueError>;

    /// Cancels every job of `group` that is still queued (not one being sent); returns how
    /// many.
    async fn cancel(&self, group: &str, now: u64) -> Result<u64, QueueError>;

    /// Sets a sent job's state to [`JobState::Delivered`] or [`JobState::Interacted`] (the
    /// app's report); `Interacted` wins over `Delivered`. Returns whether a job matched (one
    /// of `group` and `recipient` that is sent, delivered or interacted). Any other `state`
    /// is [`QueueError::Invalid`].
    async fn report(
        &self,
        group: &str,
        recipient: &str,
        state: JobState,
        now: u64,
    ) -> Result<bool, QueueError>;

    /// Job states matching `filter`, ordered by id.
    async fn statuses(
        &self,
        filter: &StatusFilter,
        page: &PageRequest,
    ) -> Result<Page<JobStatus>, QueueError>;

    /// Removes finished jobs last updated before `before`; returns how many. Backends without
    /// expiring keys also drop here the [`OutboundQueue::take_rate`] windows that ended
    /// before `before`.
    async fn purge(&self, before: u64) -> Result<u64, QueueError>;

    /// Jobs per kind that a claim at `now` would consider (queued and due, or leased with the
    /// lease run out; not those waiting behind an earlier job of their `order_key`), ordered
    /// by kind, kinds with none left out (for lag metrics).
    async fn due(&self, now: u64) -> Result<Vec<(String, u64)>, QueueError>;

    /// Counts one use of `key` in the fixed window of `window` containing `now` and says
    /// whether it is within `limit` (a use over the limit is not counted). Shared by every
    /// node on a shared backend, so a per-user push rate holds across a cluster.
    async fn take_rate(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
        now: u64,
    ) -> Result<bool, QueueError>;
}
