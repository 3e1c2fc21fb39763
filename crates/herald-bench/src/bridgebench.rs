//! The `bridge` scenario (issue 15's benchmark): webhook deliveries per second to a local
//! receiver, and messages per second from a Kafka topic and a JetStream stream into durable
//! channels, each beside the broker's (or receiver's) own rate in the same run.
//!
//! Phases, each with a fresh Herald (release binary, SQLite storage, default `sync`):
//! - `webhook`: `--messages` publications over `/api/batch` (parallel batches of 1000) to
//!   `--channels` channels with one `[[webhooks.endpoints]]` taking them all; rate = the
//!   receiver's requests from the first to the last. Beside it, the bare sender posting the
//!   same number of requests to the same receiver (`--bare-connections` keep-alive
//!   connections).
//! - `kafka`: the topic filled first (`--partitions`), then the bare consumer reads it all in
//!   its own group, then Herald's `[[sources]]` entry (`start = "0"`, `--batch`) consumes it
//!   in another; rate = published publications (`herald_source_messages_total`) from the
//!   first to the last, sampled every 20 ms. `--kafka-brokers`, or a tansu broker started
//!   here (`--tansu`).
//! - `nats`: the same with a JetStream stream and durable pull consumers (`--nats-url`).
//!
//! Owns: the orchestration, the report and its text. The brokers' side is in
//! [`crate::bridgesrc`], the receiver and bare sender in [`crate::hookrecv`], the Herald
//! process in [`crate::pushprocs`]. May touch: loopback, the brokers it is given, a temp
//! work directory.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine as _;
use rand::RngCore;
use serde::Serialize;

use crate::bridgesrc;
use crate::hookrecv::{self, Receiver};
use crate::pushapi::Api;
use crate::pushbench::Cpu;
use crate::pushprocs::{self, Herald, WorkDir};

/// The phases, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BridgePhase {
    Webhook,
    Kafka,
    Nats,
}

/// Flags of `herald-bench bridge`.
#[derive(Debug, Clone, clap::Args)]
pub struct BridgeArgs {
    #[arg(long, value_delimiter = ',', default_value = "webhook,kafka,nats")]
    pub phases: Vec<BridgePhase>,
    /// Publications (webhook) or broker messages (sources) per phase.
    #[arg(long, default_value_t = 200_000)]
    pub messages: u64,
    /// Channels the messages are spread over (`bench:c0` …).
    #[arg(long, default_value_t = 64)]
    pub channels: u64,
    /// The sources' `batch` (messages received and published at once).
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Partitions of the Kafka topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Kafka bootstrap servers; unset: a tansu broker is started (`--tansu`).
    #[arg(long)]
    pub kafka_brokers: Option<String>,
    /// The tansu binary (default: where scripts/install-test-tools caches it).
    #[arg(long)]
    pub tansu: Option<PathBuf>,
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Herald's `[webhooks] concurrency` (deliveries in flight).
    #[arg(long, default_value_t = 256)]
    pub webhook_concurrency: usize,
    /// Herald's `[webhooks] batch` (deliveries claimed at once).
    #[arg(long, default_value_t = 256)]
    pub webhook_batch: usize,
    /// Connections of the bare webhook sender.
    #[arg(long, default_value_t = 64)]
    pub bare_connections: usize,
    /// The `herald` binary (default: next to this one).
    #[arg(long)]
    pub herald: Option<PathBuf>,
    /// Core Herald is pinned to (`none`: not pinned).
    #[arg(long, default_value = "none", value_parser = crate::pushbench::parse_cpu)]
    pub herald_cpu: Cpu,
    /// Longest wait for a phase to finish.
    #[arg(long, default_value = "300s", value_parser = crate::parse_duration)]
    pub drain_max: Duration,
    #[arg(long)]
    pub json: bool,
}

/// One phase's numbers.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub phase: BridgePhase,
    pub messages: u64,
    /// Herald: webhook deliveries/s, or publications/s from the source.
    pub herald_per_sec: f64,
    /// The bare sender's (webhook) or the broker's own consumer's rate.
    pub bare_per_sec: f64,
    /// Webhook: publications/s accepted by the API. Sources: messages/s written into the
    /// broker before the phase.
    pub input_per_sec: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BridgeReport {
    pub messages: u64,
    pub channels: u64,
    pub batch: usize,
    pub phases: Vec<PhaseReport>,
}

impl BridgeReport {
    pub fn print_text(&self) {
        println!(
            "bridge: {} messages over {} channels, source batch {}",
            self.messages, self.channels, self.batch
        );
        println!(
            "| phase | Herald (msg/s) | broker's own / bare (msg/s) | input (msg/s) |\n|---|---:|---:|---:|"
        );
        for phase in &self.phases {
            println!(
                "| {:?} | {:.0} | {:.0} | {:.0} |",
                phase.phase, phase.herald_per_sec, phase.bare_per_sec, phase.input_per_sec
            );
        }
    }
}

pub async fn run(args: &BridgeArgs) -> anyhow::Result<BridgeReport> {
    let herald_exe = match &args.herald {
        Some(path) => path.clone(),
        None => pushprocs::sibling_exe("herald")?,
    };
    let work = WorkDir::new("herald-bench-bridge")?;
    let mut phases = Vec::new();
    for (k, phase) in args.phases.iter().enumerate() {
        let dir = work.path().join(format!("{k}-{phase:?}"));
        std::fs::create_dir_all(&dir)?;
        let report = match phase {
            BridgePhase::Webhook => webhook_phase(args, &herald_exe, &dir).await?,
            BridgePhase::Kafka => kafka_phase(args, &herald_exe, &dir).await?,
            BridgePhase::Nats => nats_phase(args, &herald_exe, &dir).await?,
        };
        if !args.json {
            eprintln!("{report:?}");
        }
        phases.push(report);
    }
    Ok(BridgeReport {
        messages: args.messages,
        channels: args.channels,
        batch: args.batch,
        phases,
    })
}

/// The config every phase starts from: SQLite in `dir/data`, one API key, the `bench`
/// namespace with history large enough for every message of a channel.
fn base_config(dir: &std::path::Path, api_key: &str, args: &BridgeArgs) -> anyhow::Result<String> {
    let quote = |s: &str| serde_json::to_string(s).context("quoting a config value");
    let per_channel = args.messages.div_ceil(args.channels.max(1)) + 10;
    Ok(format!(
        r#"[api]
keys = [{key}]

[storage]
engine = "sqlite"
data_dir = {data}

[log]
level = "warn"

[[namespaces]]
name = "bench"
history_size = {per_channel}
history_ttl = "1h"
"#,
        key = quote(api_key)?,
        data = quote(&dir.join("data").display().to_string())?,
    ))
}

fn api_key() -> String {
    format!("bench-{:016x}", crate::push::now_ns())
}

// --- webhooks ----------------------------------------------------------------------------

async fn webhook_phase(
    args: &BridgeArgs,
    exe: &std::path::Path,
    dir: &std::path::Path,
) -> anyhow::Result<PhaseReport> {
    let receiver = Receiver::start().await?;
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let key = api_key();
    let config = format!(
        r#"{base}
[webhooks]
enabled = true
allow_private_addresses = true
concurrency = {concurrency}
batch = {batch}

[[webhooks.endpoints]]
id = "bench"
url = "{url}"
events = ["publication"]
channels = ["bench:*"]
secrets = ["whsec_{secret}"]
"#,
        base = base_config(dir, &key, args)?,
        concurrency = args.webhook_concurrency,
        batch = args.webhook_batch,
        url = receiver.url(),
        secret = base64::engine::general_purpose::STANDARD.encode(secret),
    );
    let herald = Herald::start(exe, dir, &config, args.herald_cpu.0)?;
    let api = Arc::new(Api::new(&herald.url, &key).await?);
    // Publications over parallel batches of 1000 from 8 connections.
    let start = Instant::now();
    let per_request = 1000u64;
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (api, next, messages, channels) =
            (api.clone(), next.clone(), args.messages, args.channels);
        tasks.push(tokio::spawn(async move {
            let mut conn = api.connect().await?;
            loop {
                let first = next.fetch_add(per_request, std::sync::atomic::Ordering::Relaxed);
                if first >= messages {
                    return Ok::<_, anyhow::Error>(());
                }
                let end = (first + per_request).min(messages);
                let body = publish_batch(first..end, channels);
                api.call(&mut conn, "batch", &body)
                    .await
                    .map_err(|e| anyhow::anyhow!("batch publish: {}", e.message()))?;
            }
        }));
    }
    for task in tasks {
        task.await.context("a publishing task failed")??;
    }
    let input = bridgesrc::per_sec(args.messages, start.elapsed());
    hookrecv::wait_for(&receiver.received, args.messages, args.drain_max).await?;
    let herald_rate = receiver.received.rate();
    herald.stop();
    let sample = String::from_utf8(bridgesrc::body(0))?;
    let bare = hookrecv::bare_send(
        &receiver,
        args.messages,
        args.bare_connections,
        format!(
            r#"{{"type":"publication","timestamp":"2026-12-07T09:30:00.123Z","id":"evt_0000000000000000000000","data":{{"channel":"bench:c0","offset":1,"epoch":"abcdef","data":{sample}}}}}"#
        )
        .as_bytes(),
    )
    .await?;
    Ok(PhaseReport {
        phase: BridgePhase::Webhook,
        messages: args.messages,
        herald_per_sec: herald_rate,
        bare_per_sec: bare,
        input_per_sec: input,
    })
}

/// A parallel `/api/batch` body publishing messages `range` to their channels.
fn publish_batch(range: std::ops::Range<u64>, channels: u64) -> Vec<u8> {
    let mut out = String::from("{\"parallel\":true,\"commands\":[");
    for (k, n) in range.enumerate() {
        if k > 0 {
            out.push(',');
        }
        let data = String::from_utf8_lossy(&bridgesrc::body(n)).into_owned();
        out.push_str(&format!(
            "{{\"publish\":{{\"channel\":\"bench:c{}\",\"data\":{data}}}}}",
            n % channels.max(1)
        ));
    }
    out.push_str("]}");
    out.into_bytes()
}

// --- sources -----------------------------------------------------------------------------

/// Starts Herald with `source` (a `[[sources]]` table named `bench`) and waits until it has
/// published `messages`; the rate from the first sample with publications to the last.
async fn herald_source_rate(
    args: &BridgeArgs,
    exe: &std::path::Path,
    dir: &std::path::Path,
    source: &str,
) -> anyhow::Result<f64> {
    let key = api_key();
    let config = format!("{}\n{source}", base_config(dir, &key, args)?);
    let herald = Herald::start(exe, dir, &config, args.herald_cpu.0)?;
    let metrics = format!("{}/metrics", herald.url);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + args.drain_max;
    let mut first: Option<(Instant, u64)> = None;
    loop {
        let text = client
            .get(&metrics)
            .send()
            .await
            .context("reading Herald's metrics")?
            .text()
            .await?;
        let published = source_published(&text);
        let now = Instant::now();
        if published > 0 && first.is_none() {
            first = Some((now, published));
        }
        if published >= args.messages {
            let (at, base) = first.unwrap_or((now, 0));
            herald.stop();
            return Ok(bridgesrc::per_sec(
                args.messages - base,
                now.duration_since(at),
            ));
        }
        if now > deadline {
            bail!(
                "Herald published {published} of {} messages in {:?} (its log: {})",
                args.messages,
                args.drain_max,
                dir.join("herald.stderr").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `herald_source_messages_total{result="published",source="bench"}` in a metrics page.
fn source_published(text: &str) -> u64 {
    text.lines()
        .filter(|line| {
            line.starts_with("herald_source_messages_total{")
                && line.contains("source=\"bench\"")
                && line.contains("result=\"published\"")
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .map(|value| value as u64)
        .sum()
}

/// A tansu broker in `dir` on a free port, killed when dropped.
struct Tansu {
    child: Child,
    bootstrap: String,
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Tansu {
    fn start(binary: &std::path::Path, dir: &std::path::Path) -> anyhow::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let listener = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.join("tansu.log"))?;
        let child = Command::new(binary)
            .args(["broker", "--kafka-cluster-id", "herald-bench"])
            .args(["--kafka-listener-url", &listener])
            .args(["--kafka-advertised-listener-url", &listener])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let tansu = Self {
            child,
            bootstrap: format!("127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&tansu.bootstrap).is_err() {
            if Instant::now() > deadline {
                bail!("tansu did not listen within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(tansu)
    }
}

fn default_tansu() -> PathBuf {
    let cache = std::env::var_os("HERALD_TOOLS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/herald-test-tools")
        });
    cache.join("tansu-0.6.0-libsql/bin/tansu")
}

async fn kafka_phase(
    args: &BridgeArgs,
    exe: &std::path::Path,
    dir: &std::path::Path,
) -> anyhow::Result<PhaseReport> {
    let _tansu;
    let brokers = match &args.kafka_brokers {
        Some(brokers) => brokers.clone(),
        None => {
            let binary = args.tansu.clone().unwrap_or_else(default_tansu);
            let tansu = Tansu::start(&binary, dir)?;
            let bootstrap = tansu.bootstrap.clone();
            _tansu = tansu;
            bootstrap
        }
    };
    let id = format!("{:x}", crate::push::now_ns());
    let topic = format!("herald-bench-{id}");
    let input = bridgesrc::kafka_fill(
        &brokers,
        &topic,
        args.partitions,
        args.messages,
        args.channels,
    )
    .await?;
    let bare =
        bridgesrc::kafka_bare(&brokers, &topic, &format!("bare-{id}"), args.messages).await?;
    let source = format!(
        r#"[[sources]]
name = "bench"
kind = "kafka"
url = "kafka://{brokers}"
topics = ["{topic}"]
consumer = "herald-{id}"
start = "0"
batch = {batch}
[sources.mapping]
channel = "bench:{{key}}"
"#,
        batch = args.batch
    );
    let herald = herald_source_rate(args, exe, dir, &source).await?;
    Ok(PhaseReport {
        phase: BridgePhase::Kafka,
        messages: args.messages,
        herald_per_sec: herald,
        bare_per_sec: bare,
        input_per_sec: input,
    })
}

async fn nats_phase(
    args: &BridgeArgs,
    exe: &std::path::Path,
    dir: &std::path::Path,
) -> anyhow::Result<PhaseReport> {
    let id = format!("{:x}", crate::push::now_ns());
    let stream = format!("BENCH{id}");
    let prefix = format!("bench{id}");
    let result = async {
        let input = bridgesrc::nats_fill(
            &args.nats_url,
            &stream,
            &prefix,
            args.messages,
            args.channels,
        )
        .await?;
        let bare = bridgesrc::nats_bare(&args.nats_url, &stream, "bare", args.messages, args.batch)
            .await?;
        let source = format!(
            r#"[[sources]]
name = "bench"
kind = "nats"
url = "{url}"
stream = "{stream}"
consumer = "herald"
batch = {batch}
[sources.mapping]
channel = "bench:{{subject.1}}"
"#,
            url = args.nats_url,
            batch = args.batch
        );
        let herald = herald_source_rate(args, exe, dir, &source).await?;
        Ok::<_, anyhow::Error>(PhaseReport {
            phase: BridgePhase::Nats,
            messages: args.messages,
            herald_per_sec: herald,
            bare_per_sec: bare,
            input_per_sec: input,
        })
    }
    .await;
    bridgesrc::nats_cleanup(&args.nats_url, &stream).await;
    result
}
