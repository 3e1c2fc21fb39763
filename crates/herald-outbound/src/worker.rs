//! The outbound queue's workers: for each job kind, claim due jobs while there is room, run
//! them with bounded concurrency, and record how each attempt ended — with backoff and
//! jitter for retries and a dead letter once retries run out.
//!
//! Owns: the claim/run/finish loop, the retry policies ([`Backoff`], [`RetrySchedule`]), and the [`JobHandler`] seam every kind of
//! outbound work (push deliveries, the push fan-out, webhooks next) plugs into. One loop per
//! kind, so a slow provider never holds up another.
//!
//! May touch: the [`OutboundQueue`] it is given and the handlers; tokio tasks.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_core::outbound::{Finished, Job, OutboundQueue, Outcome};
use herald_core::time::now_ms;
use rand::Rng;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;

/// How one run of a job ended, as the handler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobResult {
    /// Done; `detail` is kept as the job's reason (a provider message id, a count).
    Done { detail: String },
    /// Try again later (the worker picks the time: `after` when the far side said, else
    /// backoff), unless attempts are used up.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// Give up now (a dead letter).
    Failed { reason: String },
    /// Not attempted (the far side's rate limit here): run again after `after`, whatever the
    /// attempt count — a deferral never makes a dead letter. The queue still counts it as an
    /// attempt, so a retry schedule moves on by one step.
    Defer { reason: String, after: Duration },
}

/// One kind of outbound work.
#[async_trait]
pub trait JobHandler: Send + Sync + 'static {
    async fn run(&self, job: &Job) -> JobResult;
}

/// When retries happen: exponential from `base`, capped at `max`, with full jitter over the
/// upper half (so retries of many jobs failing together spread out), at most `attempts`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    pub attempts: u32,
}

impl Backoff {
    /// The delay before the attempt after `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let capped = exp.min(self.max);
        let half = capped / 2;
        let jitter = rand::rng().random_range(0..=half.as_millis() as u64);
        half + Duration::from_millis(jitter)
    }
}

/// When retries happen: delays in a fixed list, one per failed attempt (Standard Webhooks'
/// schedule: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h), each stretched by up to a tenth at
/// random so jobs failing together do not retry together. The first attempt is immediate;
/// after the last delay's attempt fails, the job is a dead letter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetrySchedule {
    delays: Arc<[Duration]>,
}

impl RetrySchedule {
    pub fn new(delays: Vec<Duration>) -> Self {
        Self {
            delays: delays.into(),
        }
    }

    /// Attempts in all: the first and one after each delay.
    pub fn attempts(&self) -> u32 {
        u32::try_from(self.delays.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1)
    }

    /// The delay before the attempt after `attempt` (1-based); the last delay repeats past
    /// the end (only reached by deferrals, which do not give up).
    pub fn delay(&self, attempt: u32) -> Duration {
        let index = (attempt.saturating_sub(1) as usize).min(self.delays.len().saturating_sub(1));
        let Some(delay) = self.delays.get(index).copied() else {
            return Duration::ZERO;
        };
        let spread = (delay / 10).as_millis() as u64;
        delay + Duration::from_millis(rand::rng().random_range(0..=spread))
    }
}

/// Which retry policy a kind follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Exponential with jitter (push).
    Exponential(Backoff),
    /// A fixed list of delays (webhooks).
    Schedule(RetrySchedule),
}

impl Retry {
    fn attempts(&self) -> u32 {
        match self {
            Retry::Exponential(backoff) => backoff.attempts,
            Retry::Schedule(schedule) => schedule.attempts(),
        }
    }

    fn delay(&self, attempt: u32) -> Duration {
        match self {
            Retry::Exponential(backoff) => backoff.delay(attempt),
            Retry::Schedule(schedule) => schedule.delay(attempt),
        }
    }
}

impl From<Backoff> for Retry {
    fn from(backoff: Backoff) -> Self {
        Retry::Exponential(backoff)
    }
}

/// How one kind's loop runs.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub kind: String,
    /// Jobs of this kind running at once (on this node).
    pub concurrency: usize,
    /// Most jobs claimed in one call.
    pub batch: usize,
    /// How long a claimed job is ours; must exceed a job's longest run.
    pub lease: Duration,
    /// How often an idle loop looks for jobs others enqueued or that became due.
    pub poll_interval: Duration,
    pub retry: Retry,
}

/// Wakes the loops when this node enqueues (others find work by polling).
#[derive(Debug, Default)]
pub struct Wakeup(Notify);

impl Wakeup {
    pub fn wake(&self) {
        self.0.notify_waiters();
    }
}

/// Runs one kind's loop until `stop` resolves; jobs running then finish first (their
/// results are recorded), unclaimed ones stay queued.
pub async fn run_worker(
    queue: Arc<dyn OutboundQueue>,
    handler: Arc<dyn JobHandler>,
    config: WorkerConfig,
    wakeup: Arc<Wakeup>,
    stop: impl std::future::Future<Output = ()> + Send,
) {
    let permits = Arc::new(Semaphore::new(config.concurrency.max(1)));
    // A result travels with its concurrency permit, which is released only once the result
    // is written: the sends not yet recorded — what a crash could send twice — never exceed
    // `concurrency`.
    let (done_tx, done_rx) = mpsc::unbounded_channel::<(Finished, OwnedSemaphorePermit)>();
    let recorder = tokio::spawn(record(
        queue.clone(),
        done_rx,
        config.kind.clone(),
        wakeup.clone(),
    ));
    let mut running = JoinSet::new();
    tokio::pin!(stop);
    loop {
        // Wait for room, then claim as many as there is room for.
        let first = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut stop => break,
        };
        let room = 1 + permits
            .available_permits()
            .min(config.batch.saturating_sub(1));
        // Registered before claiming, so an enqueue during the claim still wakes us.
        let notified = wakeup.0.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let jobs = match queue
            .claim(&config.kind, room, config.lease, now_ms())
            .await
        {
            Ok(jobs) => jobs,
            Err(error) => {
                tracing::warn!(kind = %config.kind, %error, "outbound queue claim failed");
                Vec::new()
            }
        };
        if jobs.is_empty() {
            drop(first);
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(config.poll_interval) => {}
                () = &mut stop => break,
            }
            continue;
        }
        let mut first = Some(first);
        for job in jobs {
            let permit = match first.take() {
                Some(permit) => permit,
                // `room` counted free permits, so this does not wait in practice.
                None => match permits.clone().acquire_owned().await {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let handler = handler.clone();
            let done = done_tx.clone();
            let retry = config.retry.clone();
            running.spawn(async move {
                let result = handler.run(&job).await;
                let outcome = outcome(&job, result, &retry);
                let finished = Finished {
                    id: job.id,
                    attempt: job.attempt,
                    outcome,
                };
                let _ = done.send((finished, permit));
            });
        }
        // Reap finished tasks so the set does not grow.
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
    drop(done_tx);
    let _ = recorder.await;
}

/// Turns a handler's result into the queue's outcome (retry time, dead letter).
fn outcome(job: &Job, result: JobResult, retry: &Retry) -> Outcome {
    outcome_of(job.attempt, job.expire_at, result, retry)
}

/// The queue's outcome of attempt `attempt` (1-based) of a job expiring at `expire_at`
/// that ended with `result`: also what a batch's handler records for each of its members.
pub fn outcome_of(
    attempt: u32,
    expire_at: Option<u64>,
    result: JobResult,
    retry: &Retry,
) -> Outcome {
    let (reason, delay) = match result {
        JobResult::Done { detail } => return Outcome::Sent { detail },
        JobResult::Failed { reason } => return Outcome::Failed { reason },
        JobResult::Defer { reason, after } => (reason, after),
        JobResult::Retry { reason, after } => {
            if attempt >= retry.attempts() {
                return Outcome::Failed {
                    reason: format!("gave up after {attempt} attempts: {reason}"),
                };
            }
            let delay = after.unwrap_or_else(|| retry.delay(attempt));
            (reason, delay)
        }
    };
    let at = now_ms().saturating_add(delay.as_millis() as u64);
    if expire_at.is_some_and(|expire| at >= expire) {
        return Outcome::Expired {
            reason: format!("expires before the next attempt: {reason}"),
        };
    }
    Outcome::Retry { at, reason }
}

/// Records results in batches: whatever finished while the previous batch was written goes
/// in the next, so a busy worker writes few, large batches and an idle one writes at once.
async fn record(
    queue: Arc<dyn OutboundQueue>,
    mut done: mpsc::UnboundedReceiver<(Finished, OwnedSemaphorePermit)>,
    kind: String,
    wakeup: Arc<Wakeup>,
) {
    const MAX_BATCH: usize = 1024;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while done.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (finished, permits): (Vec<Finished>, Vec<OwnedSemaphorePermit>) =
            std::mem::take(&mut batch).into_iter().unzip();
        let mut delay = Duration::from_millis(50);
        loop {
            match queue.finish(finished.clone(), now_ms()).await {
                Ok(()) => break,
                Err(error) => {
                    // The jobs stay leased; if the queue stays down their leases run out
                    // and they are sent again (at least once, never lost).
                    tracing::warn!(%kind, %error, "recording outbound results failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        drop(permits);
        // A finished job may have been holding back the next of its `order_key`: look for it
        // now rather than at the next poll (which would cap an ordered stream at one job per
        // poll interval).
        wakeup.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters_within_bounds() {
        let backoff = Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
            attempts: 10,
        };
        for attempt in 1..12 {
            let full = Duration::from_secs(1 << (attempt - 1).min(20)).min(backoff.max);
            let delay = backoff.delay(attempt);
            assert!(delay >= full / 2 && delay <= full, "{attempt}: {delay:?}");
        }
    }

    fn job(attempt: u32, expire_at: Option<u64>) -> Job {
        Job {
            id: "j".into(),
            kind: "k".into(),
            group: "g".into(),
            recipient: "r".into(),
            payload: bytes::Bytes::new(),
            not_before: 0,
            expire_at,
            attempt,
            last_error: String::new(),
        }
    }

    #[test]
    fn retries_stop_at_the_attempt_limit_and_at_expiry() {
        let backoff = Retry::Exponential(Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
            attempts: 3,
        });
        let retry = || JobResult::Retry {
            reason: "503".into(),
            after: None,
        };
        assert!(matches!(
            outcome(&job(2, None), retry(), &backoff),
            Outcome::Retry { .. }
        ));
        assert!(matches!(
            outcome(&job(3, None), retry(), &backoff),
            Outcome::Failed { reason } if reason.contains("gave up after 3")
        ));
        let soon = now_ms() + 100;
        assert!(matches!(
            outcome(
                &job(1, Some(soon)),
                JobResult::Retry {
                    reason: "429".into(),
                    after: Some(Duration::from_secs(30)),
                },
                &backoff
            ),
            Outcome::Expired { .. }
        ));
    }

    #[test]
    fn a_schedule_follows_its_list_then_gives_up_and_deferrals_never_do() {
        let schedule = Retry::Schedule(RetrySchedule::new(vec![
            Duration::from_secs(5),
            Duration::from_secs(300),
        ]));
        let retry = || JobResult::Retry {
            reason: "500".into(),
            after: None,
        };
        let delay_of = |attempt| match outcome(&job(attempt, None), retry(), &schedule) {
            Outcome::Retry { at, .. } => at.saturating_sub(now_ms()),
            other => panic!("attempt {attempt}: {other:?}"),
        };
        let first = delay_of(1);
        assert!((4_900..=5_600).contains(&first), "{first}");
        let second = delay_of(2);
        assert!((299_000..=330_100).contains(&second), "{second}");
        assert!(matches!(
            outcome(&job(3, None), retry(), &schedule),
            Outcome::Failed { reason } if reason.contains("gave up after 3")
        ));
        let deferred = JobResult::Defer {
            reason: "rate limit".into(),
            after: Duration::from_millis(200),
        };
        assert!(matches!(
            outcome(&job(9, None), deferred, &schedule),
            Outcome::Retry { .. }
        ));
    }
}
