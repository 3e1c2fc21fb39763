//! Measures the SQLite outbound queue: enqueue, claim and finish of many jobs in batches (not
//! a test; no assertions).
//!
//! `cargo run --release -p herald-store --example outbound_throughput -- [key=value ...]`
//!
//! Keys: `jobs=50000`, `enqueue_batch=1000` (jobs per `enqueue` call, as one push's fan-out
//! writes them), `claim_batch=256` (jobs per `claim`, and per `finish`), `workers=2`
//! (claim-and-finish loops in the pipelined run), `payload=200` (bytes per job),
//! `sync=normal` (or `full`).
//!
//! Two runs on fresh databases:
//! - phases: all enqueues, then claim and finish until the queue is empty, timed apart;
//! - pipelined: one producer enqueues while `workers` tasks claim and finish, as the push
//!   pipeline runs; timed from the first enqueue until the last job is finished.
//!
//! Prints jobs/s for each phase and end to end (enqueue + claim + finish of every job).
//!
//! May touch: a temporary directory, removed at exit.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_core::outbound::{Finished, NewJob, OutboundQueue, Outcome};
use herald_store::sqlite::{OutboundDb, SqliteOutboundQueue, SyncPolicy};

const KIND: &str = "push.fcm";
const LEASE: Duration = Duration::from_secs(60);

struct Options {
    jobs: usize,
    enqueue_batch: usize,
    claim_batch: usize,
    workers: usize,
    payload: usize,
    sync: SyncPolicy,
}

fn options() -> Options {
    let mut options = Options {
        jobs: 50_000,
        enqueue_batch: 1_000,
        claim_batch: 256,
        workers: 2,
        payload: 200,
        sync: SyncPolicy::Normal,
    };
    for arg in std::env::args().skip(1) {
        let Some((key, value)) = arg.split_once('=') else {
            eprintln!("ignoring {arg:?}: expected key=value");
            continue;
        };
        let number = || {
            value
                .parse::<usize>()
                .unwrap_or_else(|_| panic!("{key}={value}: not a number"))
        };
        match key {
            "jobs" => options.jobs = number(),
            "enqueue_batch" => options.enqueue_batch = number().max(1),
            "claim_batch" => options.claim_batch = number().max(1),
            "workers" => options.workers = number().max(1),
            "payload" => options.payload = number(),
            "sync" if value == "full" => options.sync = SyncPolicy::Full,
            "sync" => options.sync = SyncPolicy::Normal,
            other => eprintln!("ignoring unknown key {other:?}"),
        }
    }
    options
}

fn batches(options: &Options) -> Vec<Vec<NewJob>> {
    let payload = Bytes::from(vec![b'x'; options.payload]);
    (0..options.jobs)
        .collect::<Vec<_>>()
        .chunks(options.enqueue_batch)
        .map(|chunk| {
            chunk
                .iter()
                .map(|i| NewJob {
                    id: format!("push-{}:{i:08}", i / 10_000),
                    kind: KIND.to_owned(),
                    group: format!("push-{}", i / 10_000),
                    recipient: format!("0b6c2a1e-5f0d-4c59-9d1e-{i:012}"),
                    payload: payload.clone(),
                    not_before: 0,
                    expire_at: None,
                    order_key: None,
                })
                .collect()
        })
        .collect()
}

fn now() -> u64 {
    herald_core::time::now_ms()
}

/// Claims and finishes (as sent) until `done` is set and the queue has nothing due; returns
/// how many jobs it finished.
async fn worker(queue: SqliteOutboundQueue, limit: usize, done: Arc<AtomicBool>) -> usize {
    let mut finished = 0;
    loop {
        let jobs = queue.claim(KIND, limit, LEASE, now()).await.expect("claim");
        if jobs.is_empty() {
            if done.load(Ordering::Acquire) {
                return finished;
            }
            tokio::task::yield_now().await;
            continue;
        }
        finished += jobs.len();
        let outcomes = jobs
            .into_iter()
            .map(|job| Finished {
                id: job.id,
                attempt: job.attempt,
                outcome: Outcome::Sent {
                    detail: "projects/p/messages/0".to_owned(),
                },
            })
            .collect();
        queue.finish(outcomes, now()).await.expect("finish");
    }
}

fn rate(jobs: usize, took: Duration) -> String {
    format!(
        "{:>9.0} jobs/s ({:.3} s)",
        jobs as f64 / took.as_secs_f64(),
        took.as_secs_f64()
    )
}

async fn phases(options: &Options) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = OutboundDb::open_dir(dir.path(), options.sync).expect("open");
    let queue = db.queue();
    let batches = batches(options);
    let started = Instant::now();
    for batch in batches {
        queue.enqueue(batch).await.expect("enqueue");
    }
    let enqueued = started.elapsed();
    let mut claimed_total = Duration::ZERO;
    let mut finished_total = Duration::ZERO;
    let mut count = 0;
    loop {
        let at = Instant::now();
        let jobs = queue
            .claim(KIND, options.claim_batch, LEASE, now())
            .await
            .expect("claim");
        claimed_total += at.elapsed();
        if jobs.is_empty() {
            break;
        }
        count += jobs.len();
        let outcomes = jobs
            .into_iter()
            .map(|job| Finished {
                id: job.id,
                attempt: job.attempt,
                outcome: Outcome::Sent {
                    detail: "projects/p/messages/0".to_owned(),
                },
            })
            .collect();
        let at = Instant::now();
        queue.finish(outcomes, now()).await.expect("finish");
        finished_total += at.elapsed();
    }
    let total = started.elapsed();
    assert_eq!(count, options.jobs, "every job was claimed once");
    println!("phases ({} jobs, sync={:?}):", options.jobs, options.sync);
    println!(
        "  enqueue  (batches of {:>5}) {}",
        options.enqueue_batch,
        rate(options.jobs, enqueued)
    );
    println!(
        "  claim    (batches of {:>5}) {}",
        options.claim_batch,
        rate(options.jobs, claimed_total)
    );
    println!(
        "  finish   (batches of {:>5}) {}",
        options.claim_batch,
        rate(options.jobs, finished_total)
    );
    println!(
        "  enqueue + claim + finish     {}",
        rate(options.jobs, total)
    );
    let size = std::fs::metadata(db.path()).map(|m| m.len()).unwrap_or(0);
    println!("  database file {:.1} MB", size as f64 / 1e6);
}

async fn pipelined(options: &Options) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = OutboundDb::open_dir(dir.path(), options.sync).expect("open");
    let batches = batches(options);
    let done = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..options.workers)
        .map(|_| tokio::spawn(worker(db.queue(), options.claim_batch, done.clone())))
        .collect();
    let queue = db.queue();
    for batch in batches {
        queue.enqueue(batch).await.expect("enqueue");
    }
    done.store(true, Ordering::Release);
    let mut finished = 0;
    for worker in workers {
        finished += worker.await.expect("worker");
    }
    let took = started.elapsed();
    assert_eq!(finished, options.jobs, "every job was finished once");
    println!(
        "pipelined (1 producer, {} workers): enqueue + claim + finish {}",
        options.workers,
        rate(options.jobs, took)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let options = options();
    phases(&options).await;
    pipelined(&options).await;
}
