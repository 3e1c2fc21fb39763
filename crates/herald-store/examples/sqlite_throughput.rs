//! Measures append throughput of the SQLite history store (not a test; no assertions).
//!
//! `cargo run --release -p herald-store --example sqlite_throughput -- [full|normal] [seconds] [producers] [channels] [history size]`
//!
//! Defaults mirror `herald-bench publish`: 64 producers with one append in flight each, 100
//! channels, 100-byte JSON payloads, history size 1000.
//!
//! May touch: a temporary directory, removed at exit.

use std::collections::BTreeMap;
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

/// CPU seconds (user + system) per thread name, from /proc (Linux only; empty elsewhere).
/// CPU per append is a steadier figure than appends per second on a shared machine.
fn thread_cpu() -> std::collections::HashMap<String, f64> {
    let mut totals = std::collections::HashMap::new();
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
        *totals.entry(name).or_insert(0.0) += (ticks(11) + ticks(12)) / 100.0;
    }
    totals
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let sync = match args.get(1).map(String::as_str) {
        Some("full") => SyncPolicy::Full,
        _ => SyncPolicy::Normal,
    };
    let seconds: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let producers: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(64);
    let channels: usize = args
        .get(4)
        .and_then(|s| s.parse().ok())
        .unwrap_or(100)
        .max(1);
    let size: u32 = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let dir = tempfile::tempdir()?;
    let counter = Arc::new(Counter::default());
    let config = SqliteConfig {
        sync,
        ..SqliteConfig::new(dir.path())
    };
    let store = Arc::new(SqliteHistoryStore::open(&config, counter.clone())?);
    let stop = Arc::new(AtomicBool::new(false));
    let payload = Bytes::from(format!("{{\"text\":\"{}\"}}", "x".repeat(100)));
    let retention = Retention {
        size,
        ttl: Duration::from_secs(24 * 3600),
    };
    let cpu_before = thread_cpu();
    let started = Instant::now();
    let tasks: Vec<_> = (0..producers)
        .map(|i| {
            let store = store.clone();
            let stop = stop.clone();
            let payload = payload.clone();
            let channel: Arc<str> = Arc::from(format!("bench-{}", i % channels));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
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
                    if let Err(error) = store.append(request).await {
                        eprintln!("append failed: {error}");
                        return;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let total = counter.0.load(Ordering::Relaxed);
    let cpu = |name: &str, map: &std::collections::HashMap<String, f64>| {
        map.get(name).copied().unwrap_or(0.0) - cpu_before.get(name).copied().unwrap_or(0.0)
    };
    let cpu_after = thread_cpu();
    let writer = cpu("herald-sqlite-w", &cpu_after);
    let all: f64 = cpu_after.values().sum::<f64>() - cpu_before.values().sum::<f64>();
    println!(
        "sync={sync:?} producers={producers} channels={channels} size={size}: {total} appends in {elapsed:.1}s = {:.0}/s; \
         writer cpu {:.1} us/append, process cpu {:.1} us/append",
        total as f64 / elapsed,
        writer * 1e6 / total as f64,
        all * 1e6 / total as f64,
    );
    Ok(())
}
