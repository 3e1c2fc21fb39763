//! The `storm` scenario: a reconnect storm. N WebSocket clients (in worker processes, over
//! several 127.0.0.x source addresses) each subscribe to a channel of their own; then every
//! client drops its connection at once, M publications go to every channel while they are
//! away, and every client reconnects at the same moment and resumes from where it was
//! (`recover` with its offset and epoch). Reported: the time from the reconnect signal until
//! each client has every missed publication (p50/p99/max), how many recovered, failed or
//! were told "not recovered", and the server's CPU and memory.
//!
//! Owns the storm's timeline and its worker protocol (`storm-worker`, one JSON object per
//! line each way). May touch: the network (only the server it is given) and `/proc`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::rawhttp::{RawConnection, encode_post};
use crate::spawn::{self, WorkerPlan, WorkerShare};
use crate::sysstat::{self, CpuSample};
use crate::worker::{emit, host_of, resolve};

/// Flags of `herald-bench storm`.
#[derive(Debug, Clone, clap::Args)]
pub struct StormArgs {
    /// Server base URL, e.g. http://127.0.0.1:8000.
    #[arg(long)]
    pub url: String,
    /// API key for the publications sent while the clients are away.
    #[arg(long, env = "HERALD_BENCH_API_KEY", hide_env_values = true)]
    pub api_key: String,
    /// Clients, each on a channel of its own (one server process here holds at most about
    /// 19,900 connections: the open-file limit is 20,000).
    #[arg(long, default_value_t = 19_800)]
    pub clients: usize,
    /// Publications per channel while the clients are away.
    #[arg(long, default_value_t = 5)]
    pub missed: usize,
    /// Bytes of padding in each publication.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Clients per worker process.
    #[arg(long, default_value_t = 10_000)]
    pub per_worker: usize,
    /// Source addresses 127.0.0.1 … 127.0.0.N, one per worker in turn.
    #[arg(long, default_value_t = 4)]
    pub source_addrs: usize,
    /// Connections each worker sets up at once, in the first set-up and in the storm.
    #[arg(long, default_value_t = 512)]
    pub connect_concurrency: usize,
    /// Longest the storm may take before the clients still missing something count as failed.
    #[arg(long, default_value = "60s", value_parser = crate::parse_duration)]
    pub deadline: Duration,
    /// Channel names are PREFIX-<index> (default: a fresh prefix per run).
    #[arg(long)]
    pub prefix: Option<String>,
    /// The server's process id, for its CPU and memory.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Pin this process and its workers to this CPU.
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `herald-bench storm-worker` (set by the parent).
#[derive(Debug, Clone, clap::Args)]
pub struct StormWorkerArgs {
    #[command(flatten)]
    pub share: WorkerShare,
    #[arg(long)]
    pub missed: usize,
    #[arg(long, value_parser = crate::parse_duration)]
    pub deadline: Duration,
}

/// From a worker to the parent.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    Ready {
        subscribed: u64,
        failed: u64,
        first_error: Option<String>,
    },
    Dropped,
    Report(WorkerReport),
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct WorkerReport {
    /// Clients that got every missed publication, with `recovered: true`.
    recovered: u64,
    /// Clients the server told "not recovered".
    not_recovered: u64,
    /// Clients that could not reconnect or resume in time.
    failed: u64,
    /// Missed publications that never arrived, and ones that arrived twice.
    missing: u64,
    duplicates: u64,
    first_error: Option<String>,
    /// Time from the reconnect signal until each recovered client had everything: (ms, count).
    done_ms: Vec<(u64, u64)>,
    /// Time from the signal until each client's WebSocket handshake finished: (ms, count).
    connected_ms: Vec<(u64, u64)>,
}

/// What `storm` reports.
#[derive(Debug, Serialize)]
pub struct StormReport {
    pub clients: usize,
    pub subscribed: u64,
    pub missed_per_client: usize,
    pub recovered: u64,
    pub not_recovered: u64,
    pub failed: u64,
    pub missing: u64,
    pub duplicates: u64,
    /// Seconds from the reconnect signal until every recovered client had everything.
    pub all_recovered_s: f64,
    pub recovered_p50_ms: u64,
    pub recovered_p99_ms: u64,
    /// Seconds until every client's handshake finished, and the set-up rate that gives.
    pub all_connected_s: f64,
    pub connections_per_s: f64,
    pub server_cpu_percent: Option<f64>,
    pub server_rss_bytes: Option<u64>,
    pub first_error: Option<String>,
}

pub async fn run(args: &StormArgs) -> anyhow::Result<StormReport> {
    let prefix = args
        .prefix
        .clone()
        .unwrap_or_else(|| crate::fanout::unique_prefix("storm"));
    let plans = spawn::plan(0, args.clients, args.per_worker, args.source_addrs, 0);
    let mut workers = Vec::new();
    for plan in &plans {
        workers.push(StormWorker::spawn(args, &prefix, plan)?);
    }
    // 1. Everyone connects and subscribes.
    let mut subscribed = 0;
    let mut first_error = None;
    for worker in &mut workers {
        match worker.next_event(Duration::from_secs(300)).await? {
            Event::Ready {
                subscribed: s,
                failed,
                first_error: e,
            } => {
                subscribed += s;
                if failed > 0 && first_error.is_none() {
                    first_error = e;
                }
            }
            other => anyhow::bail!("worker: expected ready, got {other:?}"),
        }
    }
    eprintln!("storm: {subscribed} of {} clients subscribed", args.clients);
    // 2. Everyone drops at once.
    for worker in &mut workers {
        worker.send("drop").await?;
    }
    for worker in &mut workers {
        match worker.next_event(Duration::from_secs(60)).await? {
            Event::Dropped => {}
            other => anyhow::bail!("worker: expected dropped, got {other:?}"),
        }
    }
    // 3. Publications while they are away.
    let published = Instant::now();
    publish_missed(args, &prefix).await?;
    eprintln!(
        "storm: {} publications sent in {:.1}s while the clients were away",
        args.clients * args.missed,
        published.elapsed().as_secs_f64()
    );
    // Let the server finish closing the dropped connections before the storm.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // 4. Everyone reconnects at once.
    let cpu_before = args.server_pid.map(CpuSample::read_tree).transpose()?;
    for worker in &mut workers {
        worker.send("reconnect").await?;
    }
    let mut done = Histogram::<u64>::new(3)?;
    let mut connected = Histogram::<u64>::new(3)?;
    let mut total = WorkerReport::default();
    for worker in &mut workers {
        let timeout = args.deadline + Duration::from_secs(30);
        match worker.next_event(timeout).await? {
            Event::Report(report) => {
                for &(ms, count) in &report.done_ms {
                    done.record_n(ms, count)?;
                }
                for &(ms, count) in &report.connected_ms {
                    connected.record_n(ms, count)?;
                }
                total.recovered += report.recovered;
                total.not_recovered += report.not_recovered;
                total.failed += report.failed;
                total.missing += report.missing;
                total.duplicates += report.duplicates;
                if total.first_error.is_none() {
                    total.first_error = report.first_error;
                }
            }
            other => anyhow::bail!("worker: expected a report, got {other:?}"),
        }
    }
    let server_cpu_percent = match (args.server_pid, cpu_before) {
        (Some(pid), Some(before)) => Some(CpuSample::read_tree(pid)?.percent_since(&before)),
        _ => None,
    };
    let server_rss_bytes = args.server_pid.map(sysstat::tree_rss_bytes).transpose()?;
    for worker in &mut workers {
        let _ = worker.send("stop").await;
        let _ = worker.child.wait().await;
    }
    let all_connected_s = connected.max() as f64 / 1000.0;
    Ok(StormReport {
        clients: args.clients,
        subscribed,
        missed_per_client: args.missed,
        recovered: total.recovered,
        not_recovered: total.not_recovered,
        failed: total.failed,
        missing: total.missing,
        duplicates: total.duplicates,
        all_recovered_s: done.max() as f64 / 1000.0,
        recovered_p50_ms: done.value_at_quantile(0.5),
        recovered_p99_ms: done.value_at_quantile(0.99),
        all_connected_s,
        connections_per_s: if all_connected_s > 0.0 {
            connected.len() as f64 / all_connected_s
        } else {
            0.0
        },
        server_cpu_percent,
        server_rss_bytes,
        first_error: first_error.or(total.first_error),
    })
}

/// `missed` publications to every channel over `/api/batch`, 500 per request, on 8
/// connections at once.
async fn publish_missed(args: &StormArgs, prefix: &str) -> anyhow::Result<()> {
    let host = host_of(&args.url)?;
    let address = resolve(&host).await?;
    let pad = "x".repeat(args.payload);
    let mut commands = Vec::new();
    for round in 0..args.missed {
        for client in 0..args.clients {
            commands.push(json!({"publish": {
                "channel": format!("{prefix}-{client}"),
                "data": {"round": round, "pad": pad},
            }}));
        }
    }
    let bodies: Vec<Vec<u8>> = commands
        .chunks(500)
        .map(|chunk| {
            let body = json!({ "commands": chunk }).to_string();
            encode_post("/api/batch", &host, &args.api_key, body.as_bytes())
        })
        .collect();
    let bodies = std::sync::Arc::new(bodies);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (bodies, next) = (bodies.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut connection = RawConnection::connect(address)
                .await
                .map_err(anyhow::Error::msg)?;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(request) = bodies.get(i) else {
                    return anyhow::Ok(());
                };
                let reply = connection
                    .round_trip(request)
                    .await
                    .map_err(anyhow::Error::msg)?;
                if reply.status != 200 || reply.body.windows(8).any(|w| w == b"\"error\":") {
                    anyhow::bail!(
                        "batch publish: {} {}",
                        reply.status,
                        String::from_utf8_lossy(reply.body)
                    );
                }
            }
        }));
    }
    for task in tasks {
        task.await.context("publisher task")??;
    }
    Ok(())
}

struct StormWorker {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl StormWorker {
    fn spawn(args: &StormArgs, prefix: &str, plan: &WorkerPlan) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("own executable")?;
        let mut command = tokio::process::Command::new(exe);
        command
            .arg("storm-worker")
            .args(WorkerShare::new(&args.url, prefix, plan, args.connect_concurrency).to_args())
            .args(["--missed", &args.missed.to_string()])
            .args(["--deadline", &format!("{}s", args.deadline.as_secs_f64())])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command.spawn().context("start storm-worker")?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("worker stdout")?).lines();
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    async fn send(&mut self, command: &str) -> anyhow::Result<()> {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        self.stdin.flush().await.context("worker stdin")
    }

    async fn next_event(&mut self, timeout: Duration) -> anyhow::Result<Event> {
        let line = tokio::time::timeout(timeout, self.stdout.next_line())
            .await
            .context("worker took too long")??
            .context("worker exited")?;
        serde_json::from_str(&line).with_context(|| format!("worker said {line:?}"))
    }
}

pub fn print(report: &StormReport) {
    println!(
        "reconnect storm: {} clients ({} subscribed), {} missed publications each",
        report.clients, report.subscribed, report.missed_per_client
    );
    println!(
        "  recovered:  {} (not recovered {}, failed {}), missing {}, duplicates {}",
        report.recovered, report.not_recovered, report.failed, report.missing, report.duplicates
    );
    println!(
        "  time until every client had everything: {:.2}s (p50 {} ms, p99 {} ms)",
        report.all_recovered_s, report.recovered_p50_ms, report.recovered_p99_ms
    );
    println!(
        "  all reconnected within {:.2}s ({:.0} connections/s)",
        report.all_connected_s, report.connections_per_s
    );
    if let (Some(cpu), Some(rss)) = (report.server_cpu_percent, report.server_rss_bytes) {
        println!(
            "  server: {cpu:.0}% CPU during the storm, RSS {:.1} MiB after",
            rss as f64 / 1048576.0
        );
    }
    if let Some(error) = &report.first_error {
        println!("  first error: {error}");
    }
}

// ---- the worker ----

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Where a client was when it dropped.
#[derive(Clone, Default)]
struct Position {
    offset: u64,
    epoch: String,
}

/// Runs one storm worker until its parent says `stop` or goes away.
pub fn run_worker(args: &StormWorkerArgs) -> anyhow::Result<()> {
    crate::worker::run_single_threaded(worker(args))
}

async fn worker(args: &StormWorkerArgs) -> anyhow::Result<()> {
    let host = host_of(&args.share.url)?;
    let address = resolve(&host).await?;
    let host = host.as_str();
    // The storm reconnects from other source addresses: the dropped connections' ports sit in
    // TIME_WAIT on the first ones, and binding next to thousands of them makes the kernel's
    // port search (not the server) the bottleneck.
    let storm_ip = match args.share.source_ip {
        IpAddr::V4(ip) => {
            let [a, b, c, d] = ip.octets();
            IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d.wrapping_add(100)))
        }
        other => other,
    };
    let mut stdin = crate::worker::stdin_lines();
    let channels: Vec<String> = (args.share.first..args.share.first + args.share.count)
        .map(|i| format!("{}-{i}", args.share.prefix))
        .collect();
    // 1. Connect and subscribe; keep each connection alive (answering pings) in a task.
    let outcomes = futures::stream::iter(channels.iter().cloned())
        .map(|channel| async move {
            let setup = async {
                let mut ws = connect(address, args.share.source_ip, host).await?;
                let (reply, _) = resume(&mut ws, &channel, None).await?;
                Ok::<_, String>((ws, reply))
            };
            let (ws, reply) = tokio::time::timeout(args.deadline, setup)
                .await
                .map_err(|_| "not subscribed within the deadline".to_owned())??;
            let position = Position {
                offset: reply["offset"].as_u64().unwrap_or(0),
                epoch: reply["epoch"].as_str().unwrap_or("").to_owned(),
            };
            let holder = tokio::task::spawn_local(hold(ws));
            Ok::<_, String>((position, holder))
        })
        .buffered(args.share.connect_concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    let mut positions = Vec::with_capacity(outcomes.len());
    let mut holders = Vec::new();
    let (mut failed, mut first_error) = (0, None);
    for outcome in outcomes {
        match outcome {
            Ok((position, holder)) => {
                positions.push(Some(position));
                holders.push(holder);
            }
            Err(error) => {
                failed += 1;
                first_error.get_or_insert(error);
                positions.push(None);
            }
        }
    }
    emit(&Event::Ready {
        subscribed: holders.len() as u64,
        failed,
        first_error,
    })?;
    // 2. Drop every connection at once (no close frame: as if the network went away).
    expect_line(&mut stdin, "drop").await?;
    for holder in &holders {
        holder.abort();
    }
    for holder in holders {
        let _ = holder.await;
    }
    emit(&Event::Dropped)?;
    // 3. Reconnect all at once and resume.
    expect_line(&mut stdin, "reconnect").await?;
    let signal = Instant::now();
    let deadline = args.deadline;
    let missed = args.missed as u64;
    let results = futures::stream::iter(channels.iter().zip(positions))
        .filter_map(|(channel, position)| async move { position.map(|p| (channel, p)) })
        .map(|(channel, position)| async move {
            let attempt = async {
                let mut ws = connect(address, storm_ip, host).await?;
                let connected = signal.elapsed();
                let (reply, offsets) = resume(&mut ws, channel, Some(&position)).await?;
                Ok::<_, String>((ws, connected, reply, offsets))
            };
            let outcome = tokio::time::timeout_at((signal + deadline).into(), attempt).await;
            (position, signal.elapsed(), outcome)
        })
        .buffer_unordered(args.share.connect_concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    let mut report = WorkerReport::default();
    let mut done = BTreeMap::<u64, u64>::new();
    let mut connected_ms = BTreeMap::<u64, u64>::new();
    let mut kept = Vec::new();
    for (position, elapsed, outcome) in results {
        match outcome {
            Ok(Ok((ws, connected, reply, offsets))) => {
                *connected_ms
                    .entry(connected.as_millis() as u64)
                    .or_default() += 1;
                let expected = (position.offset + 1)..=(position.offset + missed);
                let mut seen = std::collections::HashSet::new();
                for offset in &offsets {
                    if !seen.insert(*offset) {
                        report.duplicates += 1;
                    }
                }
                let missing = expected.filter(|o| !seen.contains(o)).count() as u64;
                report.missing += missing;
                if reply["recovered"] != true {
                    report.not_recovered += 1;
                } else if missing == 0 {
                    report.recovered += 1;
                    *done.entry(elapsed.as_millis() as u64).or_default() += 1;
                } else {
                    report.failed += 1;
                }
                kept.push(ws);
            }
            Ok(Err(error)) => {
                report.failed += 1;
                report.first_error.get_or_insert(error);
            }
            Err(_) => {
                report.failed += 1;
                report
                    .first_error
                    .get_or_insert_with(|| "not resumed within the deadline".to_owned());
            }
        }
    }
    report.done_ms = done.into_iter().collect();
    report.connected_ms = connected_ms.into_iter().collect();
    emit(&Event::Report(report))?;
    // Hold the resumed connections until the parent has read the server's numbers.
    let _ = expect_line(&mut stdin, "stop").await;
    drop(kept);
    Ok(())
}

async fn expect_line(
    stdin: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    want: &str,
) -> anyhow::Result<()> {
    match stdin.recv().await {
        Some(line) if line.trim() == want => Ok(()),
        Some(line) => anyhow::bail!("expected {want:?} from the parent, got {line:?}"),
        None => anyhow::bail!("the parent went away"),
    }
}

async fn connect(address: SocketAddr, source: IpAddr, host: &str) -> Result<Ws, String> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| format!("socket: {e}"))?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| format!("bind {source}: {e}"))?;
    // Closing resets the connection instead of leaving its port in TIME_WAIT for a minute,
    // where it would slow the next run's port search on the same address.
    socket
        .set_zero_linger()
        .map_err(|e| format!("SO_LINGER: {e}"))?;
    let stream = socket
        .connect(address)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let url = format!("ws://{host}/connection/websocket");
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    Ok(ws)
}

/// Connects and subscribes (resuming from `from`); returns the subscribe result and the
/// offsets of the publications it carried.
async fn resume(
    ws: &mut Ws,
    channel: &str,
    from: Option<&Position>,
) -> Result<(Value, Vec<u64>), String> {
    let mut subscribe = json!({"channel": channel});
    if let Some(position) = from {
        subscribe["recover"] = json!(true);
        subscribe["offset"] = json!(position.offset);
        subscribe["epoch"] = json!(position.epoch);
    }
    let commands = format!(
        "{}\n{}",
        json!({"id": 1, "connect": {}}),
        json!({"id": 2, "subscribe": subscribe})
    );
    ws.send(Message::text(commands))
        .await
        .map_err(|e| format!("send: {e}"))?;
    loop {
        let text = match ws.next().await {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => return Err(format!("closed: {frame:?}")),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("read: {e}")),
            None => return Err("the server closed the connection".to_owned()),
        };
        for line in text.split('\n') {
            let Ok(reply) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if let Some(error) = reply.get("error") {
                return Err(format!("command {} failed: {error}", reply["id"]));
            }
            if reply["id"] == 2 {
                let result = reply["subscribe"].clone();
                let offsets = result["publications"]
                    .as_array()
                    .map(|list| {
                        list.iter()
                            .filter_map(|p| p["offset"].as_u64())
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default();
                return Ok((result, offsets));
            }
        }
    }
}

/// Keeps a connection alive: answers the server's pings until the task is aborted.
async fn hold(mut ws: Ws) {
    while let Some(Ok(message)) = ws.next().await {
        if let Message::Text(text) = message
            && text.split('\n').any(|line| line == "{}")
            && ws.send(Message::text("{}")).await.is_err()
        {
            return;
        }
    }
}
