//! The `idle` scenario: what an idle subscribed connection costs the server. Opens a few
//! warm-up connections, waits for the server's RSS to settle (the "before"), opens the
//! rest, holds them all past a server ping round (the workers answer every ping, so nothing
//! is dropped), waits for RSS to settle again (the "after"), and reports the growth per
//! connection with a breakdown from `/proc` (anonymous vs file memory, open files, the
//! kernel's TCP buffers).
//!
//! Owns the timeline and the report; the connections live in worker processes
//! ([`crate::spawn`], [`crate::worker`]). May touch: the network (only the server it is
//! given) and `/proc`.

use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;

use crate::fanout::{Mode, Setup, unique_prefix};
use crate::spawn::{self, WorkerSet, WorkerSpec};
use crate::sysstat::{self, MemoryDetail};
use crate::target::Target;
use crate::worker::{self, Transport, WorkerReport};

/// Flags of `herald-bench idle`.
#[derive(Debug, Clone, clap::Args)]
pub struct IdleArgs {
    /// Server base URL, e.g. http://127.0.0.1:8000.
    #[arg(long)]
    pub url: String,
    /// The server's process id (required: its memory is what is measured).
    #[arg(long)]
    pub server_pid: u32,
    /// The server under test: Herald, a peer, or the ceiling server.
    #[arg(long, value_enum, default_value_t = Target::Herald)]
    pub target: Target,
    /// Pusher application key (Sockudo).
    #[arg(long)]
    pub app_key: Option<String>,
    /// Herald's transport (peers use their own protocol).
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    pub transport: Transport,
    /// `personal`: a channel per connection; `broadcast`: one channel for all.
    #[arg(long, value_enum, default_value_t = Mode::Personal)]
    pub mode: Mode,
    /// Connections in total, warm-up ones included.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Connections opened before the "before" measurement.
    #[arg(long, default_value_t = 100)]
    pub warmup_connections: usize,
    /// How long to hold every connection before measuring (longer than the server's ping
    /// interval plus pong timeout shows that pings are answered).
    #[arg(long, default_value = "35s", value_parser = crate::parse_duration)]
    pub hold: Duration,
    /// Longest extra wait for the RSS to stop changing.
    #[arg(long, default_value = "20s", value_parser = crate::parse_duration)]
    pub settle_timeout: Duration,
    /// Most connections per worker process (each process may open 20,000 files).
    #[arg(long, default_value_t = 5000)]
    pub per_worker: usize,
    /// Source addresses 127.0.0.1 … 127.0.0.N, one per worker in turn.
    #[arg(long, default_value_t = 4)]
    pub source_addrs: usize,
    /// Connections being set up at once, per worker.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Longest wait for every connection to be subscribed.
    #[arg(long, default_value = "120s", value_parser = crate::parse_duration)]
    pub setup_timeout: Duration,
    /// Channel names are PREFIX-<index> (default: unique per run).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Connection token (JWT) for every connection; without it they connect anonymously.
    #[arg(long, env = "HERALD_BENCH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// WebSocket: connect without subscribing (what the connection alone costs).
    #[arg(long)]
    pub connect_only: bool,
    /// The goal, in bytes of server RSS per connection, reported as met or not.
    #[arg(long, default_value_t = 4096)]
    pub target_bytes: u64,
    /// Pin the load generator (this process and its workers) to this CPU.
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What one run measured.
#[derive(Debug, Serialize)]
pub struct IdleReport {
    pub scenario: &'static str,
    pub target: Target,
    pub url: String,
    pub transport: Transport,
    pub mode: Mode,
    pub connect_only: bool,
    pub connections: usize,
    pub warmup_connections: usize,
    /// Connections opened between "before" and "after".
    pub measured_connections: u64,
    pub channels: usize,
    pub workers: usize,
    pub source_addrs: usize,
    pub setup: Setup,
    pub hold_s: f64,
    pub before: MemoryDetail,
    pub after: MemoryDetail,
    pub rss_peak_bytes: u64,
    /// Whether the RSS stopped changing before each measurement.
    pub settled: bool,
    /// (after − before) RSS ÷ measured connections.
    pub bytes_per_connection: f64,
    pub anon_bytes_per_connection: f64,
    /// Machine-wide TCP socket buffer growth ÷ measured connections (client and server ends;
    /// kernel memory, not in the server's RSS).
    pub tcp_kernel_bytes_per_connection: f64,
    pub target_bytes_per_connection: u64,
    pub target_met: bool,
    /// Connections still open when the workers stopped, warm-up included.
    pub still_open: u64,
    pub closed: std::collections::BTreeMap<String, u64>,
    pub pings_answered: u64,
    pub first_error: Option<String>,
    pub loadgen_rss_bytes: u64,
}

/// Samples the RSS every 500 ms until four samples in a row (2 s) are within 0.2% (at least
/// 64 KiB) of each other, or `timeout` passes. Returns (last RSS, peak, settled).
async fn settle(pid: u32, timeout: Duration) -> anyhow::Result<(u64, u64, bool)> {
    let deadline = Instant::now() + timeout;
    let mut recent: Vec<u64> = Vec::new();
    let mut peak = 0;
    loop {
        let rss = sysstat::tree_rss_bytes(pid)?;
        peak = peak.max(rss);
        recent.push(rss);
        if recent.len() > 4 {
            recent.remove(0);
        }
        let (low, high) = recent
            .iter()
            .fold((u64::MAX, 0), |(l, h), &v| (l.min(v), h.max(v)));
        if recent.len() == 4 && high - low <= (high / 500).max(64 * 1024) {
            return Ok((rss, peak, true));
        }
        if Instant::now() >= deadline {
            return Ok((rss, peak, false));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs the scenario and returns what it measured.
pub async fn run(args: &IdleArgs) -> anyhow::Result<IdleReport> {
    let transport = args.target.transport(args.transport);
    if args.connect_only && transport != Transport::Ws {
        bail!("--connect-only is for Herald's WebSocket connections");
    }
    if args.connections <= args.warmup_connections {
        bail!("--connections must be above --warmup-connections");
    }
    let channels = match args.mode {
        Mode::Broadcast => 1,
        Mode::Personal => args.connections,
    };
    let host = worker::host_of(&args.url)?;
    worker::resolve(&host).await?;
    let spec = WorkerSpec {
        url: args.url.clone(),
        transport,
        prefix: args.prefix.clone().unwrap_or_else(|| unique_prefix("idle")),
        channels,
        connect_concurrency: args.connect_concurrency,
        token: args.token.clone(),
        connect_only: args.connect_only,
        app_key: args.app_key.clone(),
    };
    let pid = args.server_pid;

    let warm_plans = spawn::plan(
        0,
        args.warmup_connections,
        args.per_worker,
        args.source_addrs,
        0,
    );
    let mut warm = WorkerSet::spawn(&spec, &warm_plans)?;
    let warm_ready = warm.ready(args.setup_timeout).await?;
    if warm_ready.iter().any(|r| r.failed > 0) {
        bail!(
            "warm-up connections failed: {}",
            warm_ready
                .iter()
                .find_map(|r| r.first_error.clone())
                .unwrap_or_default()
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, _, settled_before) = settle(pid, args.settle_timeout).await?;
    let before = sysstat::tree_memory_detail(pid)?;

    let measured = args.connections - args.warmup_connections;
    let plans = spawn::plan(
        args.warmup_connections,
        measured,
        args.per_worker,
        args.source_addrs,
        warm_plans.len(),
    );
    let setup_started = Instant::now();
    let mut workers = WorkerSet::spawn(&spec, &plans)?;
    let readies = workers.ready(args.setup_timeout).await?;
    let setup_s = setup_started.elapsed().as_secs_f64();
    let subscribed: u64 = readies.iter().map(|r| r.subscribed).sum();
    let setup = Setup {
        subscribed,
        failed: readies.iter().map(|r| r.failed).sum(),
        seconds: setup_s,
        per_sec: subscribed as f64 / setup_s.max(1e-9),
        first_error: readies.iter().find_map(|r| r.first_error.clone()),
    };

    // Hold (sampling the peak), then wait for the RSS to settle.
    let hold_started = Instant::now();
    let mut peak = before.rss_bytes;
    while hold_started.elapsed() < args.hold {
        peak = peak.max(sysstat::tree_rss_bytes(pid)?);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (_, settle_peak, settled_after) = settle(pid, args.settle_timeout).await?;
    let after = sysstat::tree_memory_detail(pid)?;
    let hold_s = hold_started.elapsed().as_secs_f64();

    let worker_count = warm.len() + workers.len();
    let mut reports: Vec<WorkerReport> = warm.stop(Vec::new(), Duration::from_secs(60)).await?;
    reports.extend(workers.stop(Vec::new(), Duration::from_secs(60)).await?);
    let mut closed = std::collections::BTreeMap::new();
    for report in &reports {
        for (how, n) in &report.closed {
            *closed.entry(how.clone()).or_insert(0) += n;
        }
    }
    let per = |after: u64, before: u64| (after as f64 - before as f64) / subscribed.max(1) as f64;
    let bytes_per_connection = per(after.rss_bytes, before.rss_bytes);
    Ok(IdleReport {
        scenario: "idle",
        target: args.target,
        url: args.url.clone(),
        transport,
        mode: args.mode,
        connect_only: args.connect_only,
        connections: args.connections,
        warmup_connections: args.warmup_connections,
        measured_connections: subscribed,
        channels,
        workers: worker_count,
        source_addrs: args.source_addrs.min(worker_count),
        setup,
        hold_s,
        rss_peak_bytes: peak.max(settle_peak).max(after.rss_bytes),
        settled: settled_before && settled_after,
        bytes_per_connection,
        anon_bytes_per_connection: per(after.rss_anon_bytes, before.rss_anon_bytes),
        tcp_kernel_bytes_per_connection: per(after.tcp_kernel_bytes, before.tcp_kernel_bytes),
        target_bytes_per_connection: args.target_bytes,
        target_met: bytes_per_connection <= args.target_bytes as f64,
        still_open: reports.iter().map(|r| r.open).sum(),
        closed,
        pings_answered: reports.iter().map(|r| r.pings).sum(),
        first_error: reports.iter().find_map(|r| r.first_error.clone()),
        loadgen_rss_bytes: reports.iter().map(|r| r.rss_bytes).sum(),
        before,
        after,
    })
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

impl IdleReport {
    pub fn print_text(&self) {
        println!(
            "idle {} {}: {} connections ({} warm-up) on {} channel(s) in {} worker(s), held {:.0}s",
            self.url,
            self.transport.name(),
            self.connections,
            self.warmup_connections,
            self.channels,
            self.workers,
            self.hold_s
        );
        println!("  set-up:         {}", self.setup);
        println!(
            "  server RSS:     {} → {} (peak {}){}",
            mib(self.before.rss_bytes),
            mib(self.after.rss_bytes),
            mib(self.rss_peak_bytes),
            if self.settled {
                ""
            } else {
                " (did not settle)"
            }
        );
        println!(
            "  per connection: {:.0} bytes RSS ({:.0} anonymous), target {} bytes: {}",
            self.bytes_per_connection,
            self.anon_bytes_per_connection,
            self.target_bytes_per_connection,
            if self.target_met { "met" } else { "NOT met" }
        );
        println!(
            "  server:         {} → {} open files, {} → {} threads; kernel TCP buffers {:.0} bytes/connection (both ends)",
            self.before.open_files,
            self.after.open_files,
            self.before.threads,
            self.after.threads,
            self.tcp_kernel_bytes_per_connection
        );
        println!(
            "  connections:    {} still open at the end, ended early: {:?}, pings answered {}{}",
            self.still_open,
            self.closed,
            self.pings_answered,
            self.first_error
                .as_ref()
                .map(|e| format!("; first error: {e}"))
                .unwrap_or_default()
        );
        println!("  load generator: RSS {}", mib(self.loadgen_rss_bytes));
    }
}
