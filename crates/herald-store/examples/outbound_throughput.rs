//! Measures an outbound queue — SQLite, or Redis with `redis=URL` — enqueue, claim and finish
//! of many jobs in batches (not a test; no assertions).
//!
//! `cargo run --release -p herald-store --example outbound_throughput -- [key=value ...]`
//! `cargo run --release -p herald-store --features redis --example outbound_throughput --
//! redis=redis://127.0.0.1:6379 [key=value ...]`
//!
//! Keys: `jobs=50000`, `enqueue_batch=1000` (jobs per `enqueue` call, as one push's fan-out
//! writes them), `claim_batch=256` (jobs per `claim`, and per `finish`), `workers=2`
//! (claim-and-finish loops in the pipelined run), `payload=200` (bytes per job),
//! `sync=normal` (or `full`; SQLite), `redis=URL` (measure the Redis queue there instead,
//! under a fresh key prefix; needs the `redis` feature).
//!
//! Two runs on fresh queues:
//! - phases: all enqueues, then claim and finish until the queue is empty, timed apart;
//! - pipelined: one producer enqueues while `workers` tasks claim and finish, as the push
//!   pipeline runs; timed from the first enqueue until the last job is finished.
//!
//! Prints jobs/s for each phase and end to end (enqueue + claim + finish of every job).
//!
//! May touch: a temporary directory, removed at exit; with `redis=URL`, keys under a fresh
//! prefix on that Redis, deleted at exit.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_core::outbound::{Finished, NewJob, OutboundQueue, Outcome};
use herald_store::sqlite::{OutboundDb, SyncPolicy};

const KIND: &str = "push.fcm";
const LEASE: Duration = Duration::from_secs(60);

struct Options {
    jobs: usize,
    enqueue_batch: usize,
    claim_batch: usize,
    workers: usize,
    payload: usize,
    sync: SyncPolicy,
    /// Measure the Redis queue at this URL.
    redis: Option<String>,
}

fn options() -> Options {
    let mut options = Options {
        jobs: 50_000,
        enqueue_batch: 1_000,
        claim_batch: 256,
        workers: 2,
        payload: 200,
        sync: SyncPolicy::Normal,
        redis: None,
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
            "redis" => options.redis = Some(value.to_owned()),
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
async fn worker(queue: Arc<dyn OutboundQueue>, limit: usize, done: Arc<AtomicBool>) -> usize {
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

/// A fresh queue and what holds its storage (removed when dropped).
enum Storage {
    Sqlite {
        _dir: tempfile::TempDir,
        db: OutboundDb,
        sync: SyncPolicy,
    },
    #[cfg(feature = "redis")]
    Redis(redis_storage::Fresh),
}

impl Storage {
    async fn open(options: &Options) -> Self {
        if let Some(url) = &options.redis {
            #[cfg(feature = "redis")]
            return Storage::Redis(redis_storage::Fresh::connect(url).await);
            #[cfg(not(feature = "redis"))]
            panic!("redis={url}: build the example with --features redis");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let db = OutboundDb::open_dir(dir.path(), options.sync).expect("open");
        Storage::Sqlite {
            _dir: dir,
            db,
            sync: options.sync,
        }
    }

    fn queue(&self) -> Arc<dyn OutboundQueue> {
        match self {
            Storage::Sqlite { db, .. } => Arc::new(db.queue()),
            #[cfg(feature = "redis")]
            Storage::Redis(fresh) => Arc::new(fresh.queue.clone()),
        }
    }

    fn describe(&self) -> String {
        match self {
            Storage::Sqlite { sync, .. } => format!("sqlite, sync={sync:?}"),
            #[cfg(feature = "redis")]
            Storage::Redis(fresh) => format!("redis at {}", fresh.url),
        }
    }

    async fn report(&self) {
        match self {
            Storage::Sqlite { db, .. } => {
                let size = std::fs::metadata(db.path()).map(|m| m.len()).unwrap_or(0);
                println!("  database file {:.1} MB", size as f64 / 1e6);
            }
            #[cfg(feature = "redis")]
            Storage::Redis(fresh) => fresh.report().await,
        }
    }
}

#[cfg(feature = "redis")]
mod redis_storage {
    use herald_store::redis::{RedisConfig, RedisEngine, RedisOutboundQueue};

    /// The Redis queue under a fresh prefix; its keys are deleted when dropped.
    pub struct Fresh {
        pub url: String,
        pub queue: RedisOutboundQueue,
        prefix: String,
        memory_before: u64,
        _engine: RedisEngine,
    }

    impl Fresh {
        pub async fn connect(url: &str) -> Self {
            let prefix = format!(
                "herald-throughput-{}",
                herald_core::publication::new_epoch()
            );
            let config = RedisConfig {
                addresses: vec![url.to_owned()],
                prefix: prefix.clone(),
                ..RedisConfig::default()
            };
            let (feed, _queue) = herald_core::fanout::channel();
            let (engine, _presence) = RedisEngine::connect(&config, feed)
                .await
                .unwrap_or_else(|e| panic!("redis at {url}: {e}"));
            let (queue, _devices) = engine.outbound();
            let mut fresh = Self {
                url: url.to_owned(),
                queue,
                prefix,
                memory_before: 0,
                _engine: engine,
            };
            fresh.memory_before = fresh.used_memory();
            fresh
        }

        fn connection(&self) -> redis::Connection {
            redis::Client::open(self.url.as_str())
                .and_then(|client| client.get_connection())
                .expect("redis connection")
        }

        fn keys(&self, connection: &mut redis::Connection) -> Vec<String> {
            redis::cmd("KEYS")
                .arg(format!("{}:*", self.prefix))
                .query(connection)
                .expect("KEYS")
        }

        /// Redis's `used_memory`, for the difference a run makes (other clients of the same
        /// Redis blur it).
        pub fn used_memory(&self) -> u64 {
            let info: String = redis::cmd("INFO")
                .arg("memory")
                .query(&mut self.connection())
                .expect("INFO");
            info.lines()
                .find_map(|line| line.strip_prefix("used_memory:"))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0)
        }

        pub async fn report(&self) {
            let keys = self.keys(&mut self.connection()).len();
            let grown = self.used_memory().saturating_sub(self.memory_before);
            println!(
                "  redis: {keys} keys, used_memory +{:.1} MB (finished jobs keep their status \
                 until purged)",
                grown as f64 / 1e6
            );
        }
    }

    impl Drop for Fresh {
        fn drop(&mut self) {
            let mut connection = self.connection();
            let keys = self.keys(&mut connection);
            for chunk in keys.chunks(1000) {
                let _: redis::RedisResult<()> =
                    redis::cmd("UNLINK").arg(chunk).query(&mut connection);
            }
        }
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
    let storage = Storage::open(options).await;
    let queue = storage.queue();
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
    println!("phases ({} jobs, {}):", options.jobs, storage.describe());
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
    storage.report().await;
}

async fn pipelined(options: &Options) {
    let storage = Storage::open(options).await;
    let batches = batches(options);
    let done = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..options.workers)
        .map(|_| tokio::spawn(worker(storage.queue(), options.claim_batch, done.clone())))
        .collect();
    let queue = storage.queue();
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
