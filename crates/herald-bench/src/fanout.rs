//! The `fanout` scenario: N subscribers (WebSocket or SSE, in worker processes) on one
//! channel (broadcast) or one channel each (personal), a publisher at a fixed rate over the
//! HTTP API, and what arrives: deliveries/s, publish-to-receive latency, missed and duplicate
//! publications by offset, set-up rate, errors, and the CPU and memory of the server and of
//! the load generator. The same against a peer or the ceiling server (`--target`,
//! [`crate::target`]): publications then carry a per-channel sequence number instead.
//!
//! Owns the run's timeline: start the workers ([`crate::spawn`]) and wait until every
//! subscriber is subscribed, publish through warm-up and the measured window
//! ([`crate::publisher`]), let deliveries drain, then collect and add up the workers'
//! reports. May touch: the network (only the server it is given) and `/proc`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::publish::{Latency, ServerUsage, sample_usage};
use crate::publisher::{self, PublishOutcome, PublisherConfig};
use crate::redisstat::{self, RedisCommands};
use crate::spawn::{self, WorkerSet, WorkerSpec};
use crate::sysstat::{self, CoreUsage};
use crate::target::{PeerArgs, Target};
use crate::worker::{self, Command, Transport, WorkerReport};

/// Where the subscribers listen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every subscriber on one channel.
    Broadcast,
    /// Every subscriber on a channel of its own.
    Personal,
}

/// Flags of `herald-bench fanout`.
#[derive(Debug, Clone, clap::Args)]
pub struct FanoutArgs {
    /// Server base URL, e.g. http://127.0.0.1:8000. Several (comma-separated or the flag
    /// repeated), e.g. the nodes of a cluster: the subscribers are spread evenly over them,
    /// in order (the first share on the first), and publications go to the first (unless
    /// `--publish-url`).
    #[arg(long, required = true, value_delimiter = ',')]
    pub url: Vec<String>,
    /// Server API key (sent as X-API-Key; Herald only).
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The server under test: Herald, a peer, or the ceiling server.
    #[arg(long, value_enum, default_value_t = Target::Herald)]
    pub target: Target,
    #[command(flatten)]
    pub peer: PeerArgs,
    /// Herald's transport (peers use their own protocol).
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    pub transport: Transport,
    #[arg(long, value_enum, default_value_t = Mode::Broadcast)]
    pub mode: Mode,
    /// Subscribers in total.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Broadcast over this many channels: subscriber i on channel i mod N, publications
    /// taking the channels in turn (personal: one channel per subscriber, always).
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Publications per second, in total over all channels.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Publications per request: 1 uses `/api/publish`, more `/api/batch` (Herald); items per
    /// publish request (Pushpin, SSE or WebSocket); other peers take 1.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Approximate size in bytes of each publication's JSON data.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// How long to measure.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    pub duration: Duration,
    /// Publishing before the measured window (not counted in rates and latency).
    #[arg(long, default_value = "2s", value_parser = crate::parse_duration)]
    pub warmup: Duration,
    /// After the last publication, wait until nothing is missing, or nothing has arrived for
    /// this long, before counting what never arrived.
    #[arg(long, default_value = "2s", value_parser = crate::parse_duration)]
    pub drain: Duration,
    /// Longest wait for deliveries after the last publication.
    #[arg(long, default_value = "30s", value_parser = crate::parse_duration)]
    pub drain_max: Duration,
    /// Most subscribers per worker process (each process may open 20,000 files).
    #[arg(long, default_value_t = 5000)]
    pub per_worker: usize,
    /// Source addresses 127.0.0.1 … 127.0.0.N, one per worker in turn.
    #[arg(long, default_value_t = 4)]
    pub source_addrs: usize,
    /// Connections being set up at once, per worker.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Longest wait for every subscriber to be subscribed.
    #[arg(long, default_value = "120s", value_parser = crate::parse_duration)]
    pub setup_timeout: Duration,
    /// Hold every subscriber idle this long once all are subscribed, before publishing.
    #[arg(long, default_value = "0s", value_parser = crate::parse_duration)]
    pub hold: Duration,
    /// Publisher keep-alive connections (requests in flight at most).
    #[arg(long, default_value_t = 8)]
    pub publisher_connections: usize,
    /// Channel names are PREFIX-<index> (default: unique per run).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Connection token (JWT) for every subscriber; without it they connect anonymously.
    #[arg(long, env = "HERALD_BENCH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Pin the load generator (this process, its workers and all their threads) to this CPU.
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Also report this process's CPU and memory over the measured window (the server's; its
    /// child processes included, for servers made of several). Several (comma-separated or
    /// repeated), e.g. the nodes of a cluster: their use is added up.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Processes measured apart from the server (e.g. the Redis behind a cluster; with
    /// descendants, added up): `aux` in the report.
    #[arg(long, value_delimiter = ',')]
    pub aux_pid: Vec<u32>,
    /// Redis shards (`redis://host:port`, comma-separated or repeated) whose
    /// `INFO commandstats` is read at both edges of the measured window: the commands the
    /// nodes sent per publication.
    #[arg(long, value_delimiter = ',')]
    pub redis: Vec<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Connection set-up.
#[derive(Debug, Serialize)]
pub struct Setup {
    pub subscribed: u64,
    pub failed: u64,
    /// From starting the workers to the last one being ready.
    pub seconds: f64,
    pub per_sec: f64,
    pub first_error: Option<String>,
}

impl std::fmt::Display for Setup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} subscribed, {} failed in {:.2}s ({:.0}/s)",
            self.subscribed, self.failed, self.seconds, self.per_sec
        )?;
        match &self.first_error {
            Some(error) => write!(f, "; first error: {error}"),
            None => Ok(()),
        }
    }
}

/// The subscribers of one server URL (with several `--url`).
#[derive(Debug, Serialize)]
pub struct UrlShare {
    pub url: String,
    pub subscribers: usize,
    pub subscribed: u64,
    /// Deliveries of publications sent inside the window.
    pub deliveries: u64,
    pub missed: u64,
    pub latency: Latency,
}

/// What one run measured.
#[derive(Debug, Serialize)]
pub struct FanoutReport {
    pub scenario: &'static str,
    pub target: Target,
    /// The server URLs, comma-separated.
    pub url: String,
    /// Where publications went.
    pub publish_url: String,
    pub transport: Transport,
    pub mode: Mode,
    pub subscribers: usize,
    pub channels: usize,
    /// Per server URL, in order (only with several).
    pub by_url: Vec<UrlShare>,
    pub hold_s: f64,
    pub workers: usize,
    pub source_addrs: usize,
    pub payload_bytes: usize,
    pub batch: usize,
    pub rate_target: f64,
    pub warmup_s: f64,
    pub duration_s: f64,
    /// How long deliveries took to drain after the last publication.
    pub drain_s: f64,
    pub setup: Setup,
    pub publish: PublishOutcome,
    pub publications_per_sec: f64,
    /// Publications in the window × subscribers per channel ÷ window.
    pub expected_deliveries_per_sec: f64,
    /// Deliveries of publications sent inside the window, per second.
    pub deliveries_per_sec: f64,
    pub deliveries: u64,
    /// Publish (just before the request is written) to receive (the frame read), in µs.
    pub latency: Latency,
    pub missed: u64,
    pub duplicates: u64,
    pub gaps: u64,
    /// Peers: publications that arrived after a later one of their channel.
    pub reordered: u64,
    pub foreign: u64,
    /// Subscriptions that ended before the run did, by close code.
    pub closed: std::collections::BTreeMap<String, u64>,
    pub still_open: u64,
    pub first_error: Option<String>,
    pub pings: u64,
    /// Publisher process plus every worker, percent of one core.
    pub loadgen_cpu_percent: f64,
    pub publisher_cpu_percent: f64,
    pub subscribers_cpu_percent: f64,
    /// Subscriber processes' CPU per delivery, µs.
    pub subscribers_cpu_us_per_delivery: f64,
    pub subscribers_rss_bytes: u64,
    pub loadgen_cpu: Option<usize>,
    pub server: Option<ServerUsage>,
    /// The server's CPU per delivery, µs (`server.cpu_us_per_publication` is per publication).
    pub server_cpu_us_per_delivery: f64,
    /// The `--aux-pid` processes over the window.
    pub aux: Option<ServerUsage>,
    pub aux_cpu_us_per_delivery: f64,
    /// The commands the `--redis` shards ran over the window.
    pub redis: Option<RedisCommands>,
    pub cores: Vec<CoreUsage>,
    /// CPU of every other user-space process on the machine over the window (not the server,
    /// not the load generator, not the `--aux-pid` processes), percent of one core: what
    /// competed.
    pub other_processes_cpu_percent: f64,
}

/// Histogram from the workers' (value, count) pairs.
pub fn merge_latency<'a>(
    reports: impl IntoIterator<Item = &'a WorkerReport>,
) -> anyhow::Result<Histogram<u64>> {
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("cannot create histogram")?;
    for report in reports {
        for &(value, count) in &report.latency_us {
            histogram.saturating_record_n(value.max(1), count);
        }
    }
    Ok(histogram)
}

pub fn latency_of(histogram: &Histogram<u64>) -> Latency {
    Latency {
        p50_us: histogram.value_at_quantile(0.50),
        p90_us: histogram.value_at_quantile(0.90),
        p99_us: histogram.value_at_quantile(0.99),
        p999_us: histogram.value_at_quantile(0.999),
        max_us: histogram.max(),
        mean_us: histogram.mean(),
    }
}

/// A channel prefix no earlier run used (history of old runs would not matter for the
/// counts, which start at each subscription's position, but fresh channels are cleaner).
pub fn unique_prefix(kind: &str) -> String {
    format!(
        "{kind}{}x{}",
        std::process::id(),
        crate::push::now_ns() / 1_000_000 % 1_000_000_000
    )
}

/// Waits until the workers miss nothing up to `final_offsets`, or nothing new arrived for
/// `quiet`, or `max` passed; returns how long that took.
async fn drain(
    workers: &mut WorkerSet,
    final_offsets: &[u64],
    quiet: Duration,
    max: Duration,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut last = None;
    let mut last_change = started;
    loop {
        let (deliveries, missed) = workers.progress(final_offsets).await?;
        let now = Instant::now();
        if missed == 0 || now.duration_since(last_change) >= quiet || now - started >= max {
            return Ok(started.elapsed().as_secs_f64());
        }
        if last != Some(deliveries) {
            last = Some(deliveries);
            last_change = now;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs the scenario and returns what it measured.
pub async fn run(args: &FanoutArgs) -> anyhow::Result<FanoutReport> {
    if args.subscribers == 0 || args.rate <= 0.0 || args.batch == 0 || args.duration.is_zero() {
        bail!("--subscribers, --rate, --batch and --duration must be above 0");
    }
    if args.url.is_empty() {
        bail!("--url is required");
    }
    let channels = match args.mode {
        Mode::Broadcast if args.channels == 0 || args.channels > args.subscribers => {
            bail!("--channels must be between 1 and --subscribers")
        }
        Mode::Broadcast => args.channels,
        Mode::Personal if args.channels != 1 => {
            bail!("--channels is for broadcast (personal: one channel per subscriber)")
        }
        Mode::Personal => args.subscribers,
    };
    let prefix = args.prefix.clone().unwrap_or_else(|| unique_prefix("fan"));
    let transport = args.target.transport(args.transport);
    let publish_url = args.peer.publish_url.as_deref().unwrap_or(&args.url[0]);
    let publish_url = match publish_url
        .strip_prefix("nats://")
        .or_else(|| publish_url.strip_prefix("mqtt://"))
    {
        Some(rest) => format!("http://{rest}"),
        None => publish_url.to_owned(),
    };
    let host = worker::host_of(&publish_url)?;
    let addr = worker::resolve(&host).await?;
    let publisher = Arc::new(PublisherConfig {
        addr,
        host,
        kind: args
            .target
            .publish_kind(args.api_key.as_deref(), &args.peer)?,
        channels: (0..channels)
            .map(|c| worker::channel_name(&prefix, c))
            .collect(),
        rate: args.rate,
        batch: args.batch,
        payload: args.payload,
        connections: args.publisher_connections,
    });
    if args.batch != 1 && !publisher.kind.takes_batches() {
        bail!(publisher::BATCH_ERROR);
    }
    publisher::probe(&publisher, &format!("{prefix}-probe")).await?;

    let spec = WorkerSpec {
        url: args.url[0].clone(),
        transport,
        prefix,
        channels,
        connect_concurrency: args.connect_concurrency,
        token: args.token.clone(),
        connect_only: false,
        app_key: args.peer.app_key.clone(),
    };
    // Subscribers split evenly over the URLs, in order; workers numbered on across them, so
    // they take the source addresses in turn.
    let setup_started = Instant::now();
    let mut workers = WorkerSet::default();
    let mut worker_url = Vec::new();
    let mut url_subscribers = Vec::new();
    let (base, extra) = (
        args.subscribers / args.url.len(),
        args.subscribers % args.url.len(),
    );
    let mut first = 0;
    for (k, url) in args.url.iter().enumerate() {
        let count = base + usize::from(k < extra);
        let plans = spawn::plan(
            first,
            count,
            args.per_worker,
            args.source_addrs,
            worker_url.len(),
        );
        let spec = WorkerSpec {
            url: url.clone(),
            ..spec.clone()
        };
        workers.extend(WorkerSet::spawn(&spec, &plans)?);
        worker_url.extend(std::iter::repeat_n(k, plans.len()));
        url_subscribers.push(count);
        first += count;
    }
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
    if subscribed == 0 {
        bail!(
            "no subscriber could subscribe: {}",
            setup.first_error.as_deref().unwrap_or("no error given")
        );
    }

    if !args.hold.is_zero() {
        tokio::time::sleep(args.hold).await;
    }

    let start = Instant::now();
    let start_ns = crate::push::now_ns();
    let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    let from = start + args.warmup;
    let end = from + args.duration;
    let from_ns = start_ns + nanos(args.warmup);
    let to_ns = from_ns + nanos(args.duration);
    workers.send(&Command::Window { from_ns, to_ns }).await?;
    let sampler = tokio::spawn(sample_usage(
        args.server_pid.clone(),
        args.aux_pid.clone(),
        from,
        end,
    ));
    let redis_urls = args.redis.clone();
    let redis_window = tokio::spawn(async move {
        if redis_urls.is_empty() {
            return Ok(None);
        }
        tokio::time::sleep_until(from.into()).await;
        let before = redisstat::commandstats_all(&redis_urls).await?;
        tokio::time::sleep_until(end.into()).await;
        let after = redisstat::commandstats_all(&redis_urls).await?;
        anyhow::Ok(Some((before, after)))
    });
    let everything = tokio::spawn(async move {
        tokio::time::sleep_until(from.into()).await;
        let start = (Instant::now(), sysstat::all_processes_cpu_seconds());
        tokio::time::sleep_until(end.into()).await;
        let seconds = start.0.elapsed().as_secs_f64().max(1e-9);
        (sysstat::all_processes_cpu_seconds() - start.1) / seconds * 100.0
    });
    let outcome = publisher::run(publisher.clone(), start, end, (from_ns, to_ns)).await?;
    let usage = sampler.await.context("sampler task panicked")??;
    let everything_percent = everything.await.context("sampler task panicked")?;
    let redis_window = redis_window
        .await
        .context("Redis sampler task panicked")?
        .context("cannot read the Redis command counts")?;
    let final_offsets = outcome.final_offsets.clone();
    let drain_s = drain(&mut workers, &final_offsets, args.drain, args.drain_max).await?;
    let worker_count = workers.len();
    let reports = workers.stop(final_offsets, Duration::from_secs(60)).await?;

    let seconds = args.duration.as_secs_f64();
    let histogram = merge_latency(&reports)?;
    let by_url = if args.url.len() > 1 {
        let mut shares = Vec::with_capacity(args.url.len());
        for (k, url) in args.url.iter().enumerate() {
            let mine = |i: &usize| worker_url.get(*i) == Some(&k);
            let own: Vec<&WorkerReport> = reports
                .iter()
                .enumerate()
                .filter(|(i, _)| mine(i))
                .map(|(_, r)| r)
                .collect();
            shares.push(UrlShare {
                url: url.clone(),
                subscribers: url_subscribers[k],
                subscribed: readies
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mine(i))
                    .map(|(_, r)| r.subscribed)
                    .sum(),
                deliveries: own.iter().map(|r| r.deliveries_in_window).sum(),
                missed: own.iter().map(|r| r.missed).sum(),
                latency: latency_of(&merge_latency(own.iter().copied())?),
            });
        }
        shares
    } else {
        Vec::new()
    };
    let deliveries: u64 = reports.iter().map(|r| r.deliveries_in_window).sum();
    let deliveries_per_sec = deliveries as f64 / seconds;
    let publications_per_sec = outcome.publications_in_window as f64 / seconds;
    let subscribers_cpu: f64 = reports.iter().filter_map(|r| r.cpu_percent).sum();
    let per = |cpu_percent: f64, per_second: f64| {
        if per_second > 0.0 {
            cpu_percent * 1e4 / per_second
        } else {
            0.0
        }
    };
    let mut closed = std::collections::BTreeMap::new();
    for report in &reports {
        for (how, n) in &report.closed {
            *closed.entry(how.clone()).or_insert(0) += n;
        }
    }
    let mut server = usage.server;
    let other_processes_cpu_percent = (everything_percent
        - usage.loadgen_cpu_percent
        - subscribers_cpu
        - server.as_ref().map_or(0.0, |s| s.cpu_percent)
        - usage.aux.as_ref().map_or(0.0, |a| a.cpu_percent))
    .max(0.0);
    let server_cpu_us_per_delivery = server
        .as_ref()
        .map_or(0.0, |s| per(s.cpu_percent, deliveries_per_sec));
    if let Some(server) = &mut server {
        server.cpu_us_per_publication = per(server.cpu_percent, publications_per_sec);
    }
    let mut aux = usage.aux;
    let aux_cpu_us_per_delivery = aux
        .as_ref()
        .map_or(0.0, |a| per(a.cpu_percent, deliveries_per_sec));
    if let Some(aux) = &mut aux {
        aux.cpu_us_per_publication = per(aux.cpu_percent, publications_per_sec);
    }
    let redis = redis_window.map(|(before, after)| {
        RedisCommands::between(
            args.redis.len(),
            &before,
            &after,
            outcome.publications_in_window,
        )
    });
    Ok(FanoutReport {
        scenario: "fanout",
        target: args.target,
        url: args.url.join(","),
        publish_url,
        transport,
        mode: args.mode,
        subscribers: args.subscribers,
        channels,
        by_url,
        hold_s: args.hold.as_secs_f64(),
        workers: worker_count,
        source_addrs: args.source_addrs.min(worker_count),
        payload_bytes: args.payload,
        batch: args.batch,
        rate_target: args.rate,
        warmup_s: args.warmup.as_secs_f64(),
        duration_s: seconds,
        drain_s,
        publications_per_sec,
        expected_deliveries_per_sec: publications_per_sec * subscribed as f64 / channels as f64,
        deliveries_per_sec,
        deliveries,
        latency: latency_of(&histogram),
        missed: reports.iter().map(|r| r.missed).sum(),
        duplicates: reports.iter().map(|r| r.duplicates).sum(),
        gaps: reports.iter().map(|r| r.gaps).sum(),
        reordered: reports.iter().map(|r| r.reordered).sum(),
        foreign: reports.iter().map(|r| r.foreign).sum(),
        closed,
        still_open: reports.iter().map(|r| r.open).sum(),
        first_error: reports
            .iter()
            .find_map(|r| r.first_error.clone())
            .or_else(|| outcome.first_error.clone()),
        pings: reports.iter().map(|r| r.pings).sum(),
        loadgen_cpu_percent: usage.loadgen_cpu_percent + subscribers_cpu,
        publisher_cpu_percent: usage.loadgen_cpu_percent,
        subscribers_cpu_percent: subscribers_cpu,
        subscribers_cpu_us_per_delivery: per(subscribers_cpu, deliveries_per_sec),
        subscribers_rss_bytes: reports.iter().map(|r| r.rss_bytes).sum(),
        loadgen_cpu: args.cpu,
        server,
        server_cpu_us_per_delivery,
        aux,
        aux_cpu_us_per_delivery,
        redis,
        cores: usage.cores,
        other_processes_cpu_percent,
        setup,
        publish: outcome,
    })
}

fn ms(us: u64) -> String {
    format!("{:.2}ms", us as f64 / 1000.0)
}

impl FanoutReport {
    pub fn print_text(&self) {
        println!(
            "fanout {} {} {} {}: {} subscribers on {} channel(s) in {} worker(s), {} pubs/s target ({} per request, {}-byte data), {:.1}s after {:.1}s warm-up",
            self.target.name(),
            self.url,
            self.transport.name(),
            match self.mode {
                Mode::Broadcast => "broadcast",
                Mode::Personal => "personal",
            },
            self.subscribers,
            self.channels,
            self.workers,
            self.rate_target,
            self.batch,
            self.payload_bytes,
            self.duration_s,
            self.warmup_s
        );
        println!("  set-up:         {}", self.setup);
        println!(
            "  published:      {:.0}/s ({} errors, max lag {}){}",
            self.publications_per_sec,
            self.publish.errors,
            ms(self.publish.max_lag_us),
            self.publish
                .first_error
                .as_ref()
                .map(|e| format!("; first error: {e}"))
                .unwrap_or_default()
        );
        println!(
            "  delivered:      {:.0}/s of {:.0}/s expected; missed {}, duplicates {}, gaps {}, reordered {}, foreign {}",
            self.deliveries_per_sec,
            self.expected_deliveries_per_sec,
            self.missed,
            self.duplicates,
            self.gaps,
            self.reordered,
            self.foreign
        );
        let l = &self.latency;
        if self.deliveries == 0 {
            println!("  latency:        none: nothing arrived within the drain");
        } else {
            println!(
                "  latency:        p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
                ms(l.p50_us),
                ms(l.p90_us),
                ms(l.p99_us),
                ms(l.p999_us),
                ms(l.max_us)
            );
        }
        println!(
            "  connections:    {} still open, ended early: {:?}, pings {}{}",
            self.still_open,
            self.closed,
            self.pings,
            self.first_error
                .as_ref()
                .map(|e| format!("; first error: {e}"))
                .unwrap_or_default()
        );
        println!(
            "  load generator: {:.0}% of one core (publisher {:.0}%, subscribers {:.0}% = {:.2} µs/delivery), subscriber RSS {:.1} MiB",
            self.loadgen_cpu_percent,
            self.publisher_cpu_percent,
            self.subscribers_cpu_percent,
            self.subscribers_cpu_us_per_delivery,
            self.subscribers_rss_bytes as f64 / 1048576.0
        );
        if let Some(server) = &self.server {
            println!(
                "  server pid {:?}:  {:.0}% CPU, {:.2} µs CPU/delivery, RSS {:.1} MiB (peak {:.1} MiB)",
                server.pids,
                server.cpu_percent,
                self.server_cpu_us_per_delivery,
                server.rss_bytes_end as f64 / 1048576.0,
                server.rss_bytes_peak as f64 / 1048576.0
            );
        }
        for share in &self.by_url {
            let l = &share.latency;
            println!(
                "  via {}: {} of {} subscribed, {} deliveries, missed {}, p50 {} p99 {} max {}",
                share.url,
                share.subscribed,
                share.subscribers,
                share.deliveries,
                share.missed,
                ms(l.p50_us),
                ms(l.p99_us),
                ms(l.max_us)
            );
        }
        if let Some(aux) = &self.aux {
            println!(
                "  aux pids {:?}: {:.0}% CPU, {:.2} µs CPU/delivery, {:.2} µs CPU/publication, RSS {:.1} MiB",
                aux.pids,
                aux.cpu_percent,
                self.aux_cpu_us_per_delivery,
                aux.cpu_us_per_publication,
                aux.rss_bytes_end as f64 / 1048576.0
            );
        }
        if let Some(redis) = &self.redis {
            let calls: Vec<String> = redis
                .per_publication
                .iter()
                .map(|(name, per)| format!("{name} {per:.3}"))
                .collect();
            println!(
                "  redis ({} shard(s)), calls per publication: scripts {:.3}, all {:.3} ({})",
                redis.shards,
                redis.scripts_per_publication,
                redis.all_per_publication,
                calls.join(", ")
            );
        }
        let cores: Vec<String> = self
            .cores
            .iter()
            .map(|c| format!("cpu{} {:.0}%", c.cpu, c.busy_percent))
            .collect();
        println!(
            "  machine:        {}; other processes {:.0}% of one core",
            cores.join(", "),
            self.other_processes_cpu_percent
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_histograms_add_up() {
        let report = |pairs: Vec<(u64, u64)>| WorkerReport {
            latency_us: pairs,
            ..WorkerReport::default()
        };
        let histogram = merge_latency(&[
            report(vec![(100, 98), (5000, 1)]),
            report(vec![(100, 900), (0, 1)]),
        ])
        .expect("histogram");
        assert_eq!(histogram.len(), 1000);
        let latency = latency_of(&histogram);
        assert_eq!(latency.p50_us, 100);
        assert!((4995..=5005).contains(&latency.max_us));
    }
}
