//! The in-memory outbound queue: [`MemoryOutboundQueue`], for a single ephemeral node
//! (`--memory`) and for tests. Nothing survives a restart, so "durable" holds only for the
//! life of the process.
//!
//! Owns: the jobs, the index of claimable jobs per kind, the per-`order_key` lines of jobs
//! waiting their turn, the jobs of each group and the rate windows, all behind one mutex (every call is short and
//! none awaits while holding it).
//!
//! May touch: nothing outside the process.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

use crate::device::{Page, PageRequest};
use crate::memory_devices::paged;
use crate::outbound::{
    Finished, Job, JobState, JobStatus, MemberFinished, NewJob, OutboundQueue, Outcome, QueueError,
    StatusFilter,
};

/// Whole milliseconds, saturating.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

struct Entry {
    /// Enqueue order.
    seq: u64,
    kind: String,
    group: String,
    recipient: String,
    payload: Bytes,
    not_before: u64,
    expire_at: Option<u64>,
    order_key: Option<String>,
    state: JobState,
    attempts: u32,
    /// While [`JobState::Sending`]: when the lease runs out.
    lease_until: u64,
    /// A batch's member not yet settled: queued, but never claimable itself.
    held: bool,
    /// Last retry reason while queued; the final reason (or the provider's message id) after.
    reason: String,
    updated_at: u64,
}

impl Entry {
    /// How an attempt ended: final with its reason, or queued again for `at`.
    fn end_attempt(&mut self, outcome: Outcome) {
        let (state, reason) = match outcome {
            Outcome::Sent { detail } => (JobState::Sent, detail),
            Outcome::Retry { at, reason } => {
                self.not_before = at;
                (JobState::Queued, reason)
            }
            Outcome::Failed { reason } => (JobState::Failed, reason),
            Outcome::Expired { reason } => (JobState::Expired, reason),
        };
        self.state = state;
        self.reason = reason;
    }
}

/// A claimable job's place in [`State::claimable`]: kind, when it is due (`not_before`, or
/// the end of its lease while sending), enqueue order, id.
type DueKey = (String, u64, u64, String);

#[derive(Default)]
struct State {
    /// By id, which is also the order of status listings.
    jobs: BTreeMap<String, Entry>,
    /// Every job a claim may take once due: queued and first in its `order_key` line, or
    /// sending (claimable again when its lease runs out).
    claimable: BTreeSet<DueKey>,
    /// Per `order_key`, the ids of its jobs that are not final, in enqueue order. Only the
    /// first may be claimed.
    lines: HashMap<String, VecDeque<String>>,
    /// Per group, the ids of its jobs: cancel and every delivery report look up one group,
    /// not every job.
    groups: HashMap<String, BTreeSet<String>>,
    /// Per rate key: the end of its current window and the uses counted in it.
    rates: HashMap<String, (u64, u32)>,
    next_seq: u64,
}

impl State {
    fn first_in_line(&self, id: &str, entry: &Entry) -> bool {
        entry.order_key.as_ref().is_none_or(|key| {
            self.lines
                .get(key)
                .and_then(VecDeque::front)
                .is_some_and(|first| first == id)
        })
    }

    fn due_key(&self, id: &str, entry: &Entry) -> Option<DueKey> {
        let due = match entry.state {
            JobState::Queued if !entry.held && self.first_in_line(id, entry) => entry.not_before,
            JobState::Sending => entry.lease_until,
            _ => return None,
        };
        Some((entry.kind.clone(), due, entry.seq, id.to_owned()))
    }

    /// Changes the job `id` through `change`, keeping the claimable index and the order lines
    /// right: a job that becomes final leaves its line, and the next in the line becomes
    /// claimable.
    fn modify(&mut self, id: &str, change: impl FnOnce(&mut Entry)) {
        let Some(entry) = self.jobs.get(id) else {
            return;
        };
        if let Some(key) = self.due_key(id, entry) {
            self.claimable.remove(&key);
        }
        let Some(entry) = self.jobs.get_mut(id) else {
            return;
        };
        change(entry);
        let finished_line = entry.order_key.clone().filter(|_| entry.state.is_final());
        if let Some(key) = self.due_key(id, &self.jobs[id]) {
            self.claimable.insert(key);
        }
        if let Some(line_key) = finished_line {
            self.leave_line(&line_key, id);
        }
    }

    fn leave_line(&mut self, line_key: &str, id: &str) {
        let Some(line) = self.lines.get_mut(line_key) else {
            return;
        };
        let was_first = line.front().is_some_and(|first| first == id);
        line.retain(|waiting| waiting != id);
        let next = line.front().cloned();
        if line.is_empty() {
            self.lines.remove(line_key);
        }
        if was_first
            && let Some(next) = next
            && let Some(entry) = self.jobs.get(&next)
            && let Some(key) = self.due_key(&next, entry)
        {
            self.claimable.insert(key);
        }
    }

    /// Adds `job` unless its id is known (`held`: a batch member); true when added.
    fn insert(&mut self, job: NewJob, held: bool, written: u64) -> bool {
        if self.jobs.contains_key(&job.id) {
            return false;
        }
        self.next_seq += 1;
        let entry = Entry {
            seq: self.next_seq,
            kind: job.kind,
            group: job.group,
            recipient: job.recipient,
            payload: job.payload,
            not_before: job.not_before,
            expire_at: job.expire_at,
            order_key: job.order_key,
            state: JobState::Queued,
            attempts: 0,
            lease_until: 0,
            held,
            reason: String::new(),
            updated_at: written,
        };
        if let Some(key) = &entry.order_key {
            self.lines
                .entry(key.clone())
                .or_default()
                .push_back(job.id.clone());
        }
        if let Some(key) = self.due_key(&job.id, &entry) {
            self.claimable.insert(key);
        }
        self.groups
            .entry(entry.group.clone())
            .or_default()
            .insert(job.id.clone());
        self.jobs.insert(job.id, entry);
        true
    }

    fn is_held(&self, id: &str) -> bool {
        self.jobs
            .get(id)
            .is_some_and(|e| e.held && e.state == JobState::Queued)
    }

    fn status(id: &str, entry: &Entry) -> JobStatus {
        JobStatus {
            id: id.to_owned(),
            kind: entry.kind.clone(),
            group: entry.group.clone(),
            recipient: entry.recipient.clone(),
            state: entry.state,
            attempts: entry.attempts,
            reason: entry.reason.clone(),
            updated_at: entry.updated_at,
        }
    }
}

/// The outbound queue kept in process memory.
#[derive(Default)]
pub struct MemoryOutboundQueue {
    state: Mutex<State>,
}

impl std::fmt::Debug for MemoryOutboundQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryOutboundQueue")
            .field("jobs", &self.state.lock().jobs.len())
            .finish()
    }
}

impl MemoryOutboundQueue {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl OutboundQueue for MemoryOutboundQueue {
    async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<usize, QueueError> {
        // `enqueue` takes no `now`: a new job's status shows when it was written.
        let written = crate::time::now_ms();
        let mut state = self.state.lock();
        Ok(jobs
            .into_iter()
            .filter(|job| state.insert(job.clone(), false, written))
            .count())
    }

    async fn enqueue_batch(
        &self,
        batch: NewJob,
        members: Vec<NewJob>,
    ) -> Result<usize, QueueError> {
        let written = crate::time::now_ms();
        let mut state = self.state.lock();
        if state.jobs.contains_key(&batch.id) {
            return Ok(0);
        }
        let added = members
            .into_iter()
            .filter(|member| {
                let member = NewJob {
                    payload: Bytes::new(),
                    order_key: None,
                    ..member.clone()
                };
                state.insert(member, true, written)
            })
            .count();
        if added > 0 {
            state.insert(batch, false, written);
        }
        Ok(added)
    }

    async fn held(&self, ids: Vec<String>) -> Result<Vec<String>, QueueError> {
        let state = self.state.lock();
        Ok(ids.into_iter().filter(|id| state.is_held(id)).collect())
    }

    async fn finish_members(
        &self,
        finished: Vec<MemberFinished>,
        now: u64,
    ) -> Result<(), QueueError> {
        let mut state = self.state.lock();
        for done in finished {
            if !state.is_held(&done.id) {
                continue;
            }
            state.modify(&done.id, |entry| {
                entry.held = false;
                entry.attempts = 1;
                entry.updated_at = now;
                if matches!(done.outcome, Outcome::Retry { .. }) {
                    entry.payload = done.payload;
                }
                entry.end_attempt(done.outcome);
            });
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
        let lease_until = now.saturating_add(millis(lease));
        let mut state = self.state.lock();
        let mut claimed = Vec::new();
        let start: DueKey = (kind.to_owned(), 0, 0, String::new());
        while claimed.len() < limit {
            // Each round's jobs leave the due range (leased past `now`, or expired), so the
            // loop ends when nothing due is left.
            let due: Vec<DueKey> = state
                .claimable
                .range(start.clone()..)
                .take_while(|(k, at, _, _)| k == kind && *at <= now)
                .take(limit - claimed.len())
                .cloned()
                .collect();
            if due.is_empty() {
                break;
            }
            for (_, _, _, id) in due {
                let expired = state.jobs[&id].expire_at.is_some_and(|at| at < now);
                if expired {
                    state.modify(&id, |entry| {
                        entry.state = JobState::Expired;
                        entry.reason = "expired before it could be sent".to_owned();
                        entry.updated_at = now;
                    });
                    continue;
                }
                state.modify(&id, |entry| {
                    if entry.state == JobState::Sending {
                        entry.reason = "lease expired".to_owned();
                    }
                    entry.state = JobState::Sending;
                    entry.attempts += 1;
                    entry.lease_until = lease_until;
                    entry.updated_at = now;
                });
                let entry = &state.jobs[&id];
                claimed.push(Job {
                    id,
                    kind: entry.kind.clone(),
                    group: entry.group.clone(),
                    recipient: entry.recipient.clone(),
                    payload: entry.payload.clone(),
                    not_before: entry.not_before,
                    expire_at: entry.expire_at,
                    attempt: entry.attempts,
                    last_error: entry.reason.clone(),
                });
            }
        }
        Ok(claimed)
    }

    async fn finish(&self, finished: Vec<Finished>, now: u64) -> Result<(), QueueError> {
        let mut state = self.state.lock();
        for done in finished {
            let holds_lease = state
                .jobs
                .get(&done.id)
                .is_some_and(|e| e.state == JobState::Sending && e.attempts == done.attempt);
            if !holds_lease {
                continue;
            }
            state.modify(&done.id, |entry| {
                entry.updated_at = now;
                entry.end_attempt(done.outcome);
            });
        }
        Ok(())
    }

    async fn cancel(&self, group: &str, now: u64) -> Result<u64, QueueError> {
        let mut state = self.state.lock();
        let queued: Vec<String> = state
            .groups
            .get(group)
            .into_iter()
            .flatten()
            .filter(|id| state.jobs[*id].state == JobState::Queued)
            .cloned()
            .collect();
        for id in &queued {
            state.modify(id, |entry| {
                entry.state = JobState::Cancelled;
                entry.reason = "cancelled".to_owned();
                entry.updated_at = now;
            });
        }
        Ok(queued.len() as u64)
    }

    async fn report(
        &self,
        group: &str,
        recipient: &str,
        report: JobState,
        now: u64,
    ) -> Result<bool, QueueError> {
        if !matches!(report, JobState::Delivered | JobState::Interacted) {
            return Err(QueueError::Invalid(format!(
                "a report is delivered or interacted, not {report}"
            )));
        }
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let mut matched = false;
        for id in state.groups.get(group).into_iter().flatten() {
            let Some(entry) = state.jobs.get_mut(id) else {
                continue;
            };
            if entry.recipient != recipient {
                continue;
            }
            match entry.state {
                JobState::Sent | JobState::Delivered => {
                    matched = true;
                    if entry.state != report {
                        entry.state = report;
                        entry.updated_at = now;
                    }
                }
                JobState::Interacted => matched = true,
                _ => {}
            }
        }
        Ok(matched)
    }

    async fn statuses(
        &self,
        filter: &StatusFilter,
        page: &PageRequest,
    ) -> Result<Page<JobStatus>, QueueError> {
        let state = self.state.lock();
        let all = state
            .jobs
            .iter()
            .map(|(id, entry)| State::status(id, entry))
            .filter(|status| filter.matches(status));
        let total = page.include_total.then(|| all.clone().count() as u64);
        let after = page.cursor.as_str();
        let items = all.filter(|status| after.is_empty() || status.id.as_str() > after);
        Ok(paged(
            items,
            page.effective_limit(),
            |status: &JobStatus| status.id.clone(),
            total,
        ))
    }

    async fn purge(&self, before: u64) -> Result<u64, QueueError> {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let count = state.jobs.len();
        // Final jobs are in neither the claimable index nor a line; only `groups` needs
        // telling.
        let groups = &mut state.groups;
        state.jobs.retain(|id, entry| {
            let keep = !(entry.state.is_final() && entry.updated_at < before);
            if !keep && let Some(ids) = groups.get_mut(&entry.group) {
                ids.remove(id);
                if ids.is_empty() {
                    groups.remove(&entry.group);
                }
            }
            keep
        });
        state.rates.retain(|_, (end, _)| *end >= before);
        Ok((count - state.jobs.len()) as u64)
    }

    async fn due(&self, now: u64) -> Result<Vec<(String, u64)>, QueueError> {
        let state = self.state.lock();
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for (kind, at, _, _) in &state.claimable {
            if *at <= now {
                *counts.entry(kind.clone()).or_default() += 1;
            }
        }
        Ok(counts.into_iter().collect())
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
        let end = (now - now % window).saturating_add(window);
        let mut state = self.state.lock();
        let (current_end, used) = state.rates.entry(key.to_owned()).or_insert((end, 0));
        if *current_end != end {
            *current_end = end;
            *used = 0;
        }
        if *used >= limit {
            return Ok(false);
        }
        *used += 1;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_queue_passes_conformance() {
        crate::conformance::run_outbound_suite(|| async { Ok(MemoryOutboundQueue::new()) }).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_queue_passes_conformance_on_two_threads() {
        crate::conformance::run_outbound_suite(|| async { Ok(MemoryOutboundQueue::new()) }).await;
    }
}
