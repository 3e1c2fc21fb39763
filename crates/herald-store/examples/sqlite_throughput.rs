//! Measures append throughput of the SQLite history store (not a test; no assertions).
//!
//! `cargo run --release -p herald-store --example sqlite_throughput -- [key=value ...]`
//!
//! Keys (defaults mirror `herald-bench publish`): `sync=normal` (or `full`), `seconds=5`,
//! `producers=64` (each with one append in flight), `channels=100`, `size=1000` (history
//! size), `payload=100` (bytes of JSON data), `pick=shared` (the next channel comes from one
//! round-robin cursor shared by all producers, as `herald-bench publish` does; `random`: each
//! append picks a channel at random), `warmup=` seconds before measuring (default: until
//! every channel's history is full once, so size retention is trimming during the measured
//! window), `rate=` appends per second per producer (default: as fast as they go; at a
//! modest rate every append finds the writer thread idle, as lone publications do on a
//! server). Pin it like the server (`taskset -c 0 …`) to see what one core does; on a shared
//! machine trust the CPU-per-append figures more than appends per second.
//!
//! Prints appends/s, append latency percentiles, CPU per append (writer thread, checkpointer
//! thread, whole process), bytes written per append (`/proc/.../io`: by the writer, which are
//! WAL frames; by the checkpointer, which are pages copied into the database file; and the
//! process's `wchar` and `write_bytes`), the largest WAL file seen, the mean group commit size
//! and the checkpoints run.
//!
//! May touch: a temporary directory, removed at exit.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_core::publication::{Payload, Publication, PublicationEvent};
use herald_core::store::{AppendRequest, CommitListener, HistoryStore, Retention};
use herald_store::sqlite::{SqliteConfig, SqliteHistoryStore, SyncPolicy};

#[derive(Default)]
struct Counter(AtomicU64);

impl CommitListener for Counter {
    fn committed(&self, _event: Arc<PublicationEvent>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// CPU seconds (user + system) and bytes passed to `write` calls (`wchar`), per thread name,
/// from /proc (Linux only; empty elsewhere). CPU per append is a steadier figure than
/// appends per second on a shared machine.
fn thread_usage() -> HashMap<String, (f64, f64)> {
    let mut totals = HashMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return totals;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_owned();
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the name.
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let io = std::fs::read_to_string(task.path().join("io")).unwrap_or_default();
        let wchar = io
            .lines()
            .find_map(|line| line.strip_prefix("wchar:"))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        let entry = totals.entry(name).or_insert((0.0, 0.0));
        entry.0 += (ticks(11) + ticks(12)) / 100.0;
        entry.1 += wchar;
    }
    totals
}

/// `wchar` and `write_bytes` from /proc/self/io (zeros where unavailable).
fn io_written() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (field("wchar:"), field("write_bytes:"))
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[rank]) / 1000.0
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: HashMap<String, String> = std::env::args()
        .skip(1)
        .map(|arg| match arg.split_once('=') {
            Some((key, value)) => (key.to_owned(), value.to_owned()),
            None => (arg, String::new()),
        })
        .collect();
    let arg = |key: &str| args.get(key).and_then(|s| s.parse::<u64>().ok());
    let sync = match args.get("sync").map(String::as_str) {
        Some("full") => SyncPolicy::Full,
        _ => SyncPolicy::Normal,
    };
    let seconds = arg("seconds").unwrap_or(5);
    let producers = arg("producers").unwrap_or(64).max(1) as usize;
    let channels = arg("channels").unwrap_or(100).max(1) as usize;
    let size = u32::try_from(arg("size").unwrap_or(1000)).unwrap_or(u32::MAX);
    let payload_bytes = arg("payload").unwrap_or(100) as usize;
    let random = args.get("pick").is_some_and(|pick| pick == "random");
    let interval = arg("rate")
        .filter(|rate| *rate > 0)
        .map(|rate| Duration::from_secs_f64(1.0 / rate as f64));
    let cursor = Arc::new(AtomicU64::new(0));
    let names: Arc<Vec<Arc<str>>> = Arc::new(
        (0..channels)
            .map(|i| Arc::from(format!("bench-{i}")))
            .collect(),
    );
    let dir = tempfile::tempdir()?;
    let counter = Arc::new(Counter::default());
    let config = SqliteConfig {
        sync,
        ..SqliteConfig::new(dir.path())
    };
    let store = Arc::new(SqliteHistoryStore::open(&config, counter.clone())?);
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let payload = Bytes::from(format!(
        "{{\"text\":\"{}\"}}",
        "x".repeat(payload_bytes.saturating_sub(11))
    ));
    let retention = Retention {
        size,
        ttl: Duration::from_secs(24 * 3600),
    };
    let tasks: Vec<_> = (0..producers)
        .map(|i| {
            let store = store.clone();
            let stop = stop.clone();
            let measuring = measuring.clone();
            let payload = payload.clone();
            let (cursor, names) = (cursor.clone(), names.clone());
            // xorshift64, seeded per producer: reproducible and cheap.
            let mut rng = 0x9E37_79B9_7F4A_7C15_u64 ^ (i as u64 + 1);
            tokio::spawn(async move {
                let mut latencies_us: Vec<u32> = Vec::new();
                let mut next = tokio::time::Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    if let Some(interval) = interval {
                        next += interval;
                        tokio::time::sleep_until(next).await;
                    }
                    let pick = if random {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng
                    } else {
                        cursor.fetch_add(1, Ordering::Relaxed)
                    };
                    let channel = &names[(pick % names.len() as u64) as usize];
                    let request = AppendRequest {
                        channel: channel.clone(),
                        publication: Publication {
                            offset: 0,
                            time_ms: herald_core::time::now_ms(),
                            data: Payload::Json(payload.clone()),
                            tags: BTreeMap::new(),
                            info: None,
                        },
                        retention,
                        idempotency: None,
                    };
                    let started = Instant::now();
                    if let Err(error) = store.append(request).await {
                        eprintln!("append failed: {error}");
                        break;
                    }
                    if measuring.load(Ordering::Relaxed) {
                        let micros = started.elapsed().as_micros();
                        latencies_us.push(u32::try_from(micros).unwrap_or(u32::MAX));
                    }
                }
                latencies_us
            })
        })
        .collect();

    // Warm up until every channel's history is full (size retention trimming) or the given
    // number of seconds.
    let warmup = match arg("warmup") {
        Some(seconds) => Duration::from_secs(seconds),
        None => {
            let fill = u64::from(size).saturating_mul(channels as u64);
            let started = Instant::now();
            while counter.0.load(Ordering::Relaxed) < fill
                && started.elapsed() < Duration::from_secs(60)
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Duration::ZERO
        }
    };
    tokio::time::sleep(warmup).await;

    let wal = config.database_path().with_extension("db-wal");
    let cpu_before = thread_usage();
    let io_before = io_written();
    let stats_before = store.stats();
    let appended_before = counter.0.load(Ordering::Relaxed);
    let started = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    let mut wal_peak = 0;
    let deadline = started + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        wal_peak = wal_peak.max(file_len(&wal));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    measuring.store(false, Ordering::Relaxed);
    let total = counter.0.load(Ordering::Relaxed) - appended_before;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = thread_usage();
    let io_after = io_written();
    let stats_after = store.stats();
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await?);
    }
    latencies.sort_unstable();

    let usage = |name: &str| {
        let after = cpu_after.get(name).copied().unwrap_or_default();
        let before = cpu_before.get(name).copied().unwrap_or_default();
        (after.0 - before.0, after.1 - before.1)
    };
    let (writer, writer_wchar) = usage("herald-sqlite-w");
    let (checkpointer, checkpointer_wchar) = usage("herald-sqlite-c");
    let all: f64 = cpu_after.values().map(|u| u.0).sum::<f64>()
        - cpu_before.values().map(|u| u.0).sum::<f64>();
    let per = |value: f64| value / total.max(1) as f64;
    let batches = stats_after.batches - stats_before.batches;
    let commands = stats_after.commands - stats_before.commands;
    println!(
        "sync={sync:?} producers={producers} channels={channels} pick={} size={size} payload={}B: \
         {total} appends in {elapsed:.1}s = {:.0}/s",
        if random { "random" } else { "shared" },
        payload.len(),
        total as f64 / elapsed,
    );
    println!(
        "  latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 0.999),
        percentile(&latencies, 1.0),
    );
    println!(
        "  cpu us/append: writer {:.1}, checkpointer {:.1}, process {:.1}",
        per(writer * 1e6),
        per(checkpointer * 1e6),
        per(all * 1e6),
    );
    println!(
        "  written per append: {:.0} B to the WAL (writer), {:.0} B to the database file \
         (checkpointer); process total {:.0} B through write calls, {:.0} B dirtied",
        per(writer_wchar),
        per(checkpointer_wchar),
        per((io_after.0 - io_before.0) as f64),
        per((io_after.1 - io_before.1) as f64),
    );
    println!(
        "  WAL peak {:.1} MiB; mean batch {:.1} commands ({batches} batches); {} checkpoints, \
         {} WAL restarts",
        wal_peak as f64 / 1048576.0,
        commands as f64 / batches.max(1) as f64,
        stats_after.checkpoints - stats_before.checkpoints,
        stats_after.wal_restarts - stats_before.wal_restarts,
    );
    Ok(())
}
