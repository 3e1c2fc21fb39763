//! The `publish` scenario: sustained `POST /api/publish` (or `/api/batch` with `--batch N`)
//! over keep-alive HTTP/1.1 connections, each with exactly one request in flight (closed loop).
//!
//! Owns the load loop, the latency histogram and the report. It is built to cost the client
//! as little as possible per request: every request is encoded once up front, the default
//! [`crate::rawhttp`] client writes it with one syscall and parses only the reply head, and
//! the reply is checked by status and its first bytes instead of being decoded (`--client
//! hyper` swaps in a bare hyper connection per socket as a cross-check). What it cannot avoid
//! (syscalls, loopback TCP) it measures: the report includes its own CPU use so a reader can
//! tell whether the client was the limit.
//!
//! May touch: the network (only the URL it is given) and `/proc` through [`crate::sysstat`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST, HeaderMap, HeaderValue};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;

use crate::rawhttp::{RawConnection, encode_post};
use crate::sysstat::{self, CoreUsage, CpuSample, SystemSample};

/// Flags of `herald-bench publish`.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    /// Server base URL, e.g. http://127.0.0.1:8000.
    #[arg(long)]
    pub url: String,
    /// Server API key (sent as X-API-Key).
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    pub api_key: String,
    /// Keep-alive HTTP/1.1 connections, each with one request in flight.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// How long to measure, e.g. 15s, 500ms, 1m.
    #[arg(long, default_value = "15s", value_parser = crate::parse_duration)]
    pub duration: Duration,
    /// Load before measuring starts (not counted).
    #[arg(long, default_value = "2s", value_parser = crate::parse_duration)]
    pub warmup: Duration,
    /// Publishes go round-robin over this many channels.
    #[arg(long, default_value_t = 100)]
    pub channels: usize,
    /// Channel names are PREFIX-0 … PREFIX-(N-1) (default namespace unless PREFIX has `ns:`).
    #[arg(long, default_value = "bench")]
    pub channel_prefix: String,
    /// Approximate size in bytes of each publication's JSON `data`.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Publications per request: 1 uses `/api/publish`; above 1, `/api/batch` with that many
    /// `publish` commands run in parallel (spreads HTTP costs; a different scenario).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Pin the load generator (all its threads) to this CPU.
    #[arg(long)]
    pub cpu: Option<usize>,
    /// HTTP client: `raw` (pre-encoded requests, the leanest) or `hyper` (a cross-check).
    #[arg(long, value_enum, default_value_t = ClientKind::Raw)]
    pub client: ClientKind,
    /// Runtime worker threads (1: a single-threaded runtime, the leanest).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Also report this process's CPU and memory over the measured window (the server's).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

/// The server's resource use over the measured window.
#[derive(Debug, Serialize)]
pub struct ServerUsage {
    /// The first process measured.
    pub pid: u32,
    /// Every process measured (each with its descendants); their use is added up.
    pub pids: Vec<u32>,
    /// Percent of one core (above 100 when it used several).
    pub cpu_percent: f64,
    /// RSS when measuring ended.
    pub rss_bytes_end: u64,
    /// Largest RSS sampled during the window (every 250 ms).
    pub rss_bytes_peak: u64,
    /// Server CPU time per successful publication, in microseconds: the cost that does not
    /// depend on how much CPU the server got. `1e6 / this` is what one busy core could do.
    pub cpu_us_per_publication: f64,
}

/// What one run measured.
#[derive(Debug, Serialize)]
pub struct PublishReport {
    pub scenario: &'static str,
    pub url: String,
    pub connections: usize,
    pub channels: usize,
    pub payload_bytes: usize,
    /// Size of one request body.
    pub request_body_bytes: usize,
    /// Publications per request (1: `/api/publish`, more: `/api/batch`).
    pub batch: usize,
    /// Successful requests inside the measured window.
    pub requests: u64,
    pub warmup_s: f64,
    pub duration_s: f64,
    /// Successful publishes completed inside the measured window.
    pub publications: u64,
    pub publications_per_sec: f64,
    /// Non-200 replies, bodies that are not `{"result"…`, and transport failures.
    pub errors: u64,
    pub first_error: Option<String>,
    pub latency: Latency,
    /// The load generator's own CPU, percent of one core.
    pub loadgen_cpu_percent: f64,
    /// The load generator's CPU time per successful request, in microseconds.
    pub loadgen_cpu_us_per_request: f64,
    pub loadgen_cpu: Option<usize>,
    pub loadgen_threads: usize,
    pub client: ClientKind,
    pub server: Option<ServerUsage>,
    /// How busy every core of the machine was over the window (everything on it, not only
    /// the server and the load generator): the check that nothing else competed.
    pub cores: Vec<CoreUsage>,
}

impl PublishReport {
    pub fn print_text(&self) {
        println!(
            "publish {}: {} connections, {} per request, {} channels, {}-byte data ({}-byte bodies), {:.1}s after {:.1}s warm-up",
            self.url,
            self.connections,
            self.batch,
            self.channels,
            self.payload_bytes,
            self.request_body_bytes,
            self.duration_s,
            self.warmup_s
        );
        println!(
            "  publications/s: {:.0}  ({} ok in {} requests, {} failed requests)",
            self.publications_per_sec, self.publications, self.requests, self.errors
        );
        if let Some(error) = &self.first_error {
            println!("  first error:    {error}");
        }
        let l = &self.latency;
        println!(
            "  latency:        p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {}",
            fmt_us(l.p50_us),
            fmt_us(l.p90_us),
            fmt_us(l.p99_us),
            fmt_us(l.p999_us),
            fmt_us(l.max_us),
            fmt_us(l.mean_us.round() as u64)
        );
        let pinned = self
            .loadgen_cpu
            .map(|c| format!(", pinned to CPU {c}"))
            .unwrap_or_default();
        println!(
            "  load generator: {:.0}% of one core, {:.1} µs CPU/request ({} thread{}{pinned})",
            self.loadgen_cpu_percent,
            self.loadgen_cpu_us_per_request,
            self.loadgen_threads,
            if self.loadgen_threads == 1 { "" } else { "s" }
        );
        if let Some(server) = &self.server {
            println!(
                "  server pid {}:  {:.0}% CPU (of one core), {:.1} µs CPU/publication, RSS {:.1} MiB (peak {:.1} MiB)",
                server.pid,
                server.cpu_percent,
                server.cpu_us_per_publication,
                server.rss_bytes_end as f64 / 1048576.0,
                server.rss_bytes_peak as f64 / 1048576.0
            );
        }
        let cores: Vec<String> = self
            .cores
            .iter()
            .map(|c| {
                format!(
                    "cpu{} {:.0}% busy ({:.0}% steal)",
                    c.cpu, c.busy_percent, c.steal_percent
                )
            })
            .collect();
        println!("  machine:        {}", cores.join(", "));
    }
}

fn fmt_us(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.1}ms", us as f64 / 1000.0)
    } else {
        format!("{:.2}ms", us as f64 / 1000.0)
    }
}

/// Which HTTP client drives the connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientKind {
    /// Pre-encoded requests written in one syscall, replies parsed with `httparse`: the
    /// leanest, and the default.
    Raw,
    /// A hyper HTTP/1.1 client connection per socket: a cross-check for the raw client.
    Hyper,
}

/// Where to send and what: shared by every connection task.
struct Target {
    addr: SocketAddr,
    client: ClientKind,
    /// Publications per request.
    batch: usize,
    path: Uri,
    headers: HeaderMap,
    /// One pre-encoded body per channel (for the hyper client).
    bodies: Vec<Bytes>,
    /// One complete pre-encoded request per channel (for the raw client).
    requests: Vec<Vec<u8>>,
    /// Round-robin cursor over the channels, shared so the spread is even across connections.
    next: AtomicUsize,
}

impl Target {
    fn next_index(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.bodies.len()
    }

    fn hyper_request(&self, i: usize) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(self.bodies[i].clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.path.clone();
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// How a request went wrong.
enum Failure {
    /// The server answered, but not with success; the connection is still usable.
    Reply(String),
    /// The connection is broken and must be replaced.
    Transport(String),
}

/// The JSON `data` of every publication: `{"n":"xxxx…"}`, `payload` bytes long (at least 8).
pub(crate) fn data_of_size(payload: usize) -> String {
    let pad = payload.saturating_sub(8);
    format!("{{\"n\":\"{}\"}}", "x".repeat(pad))
}

/// `/api/batch` body publishing `data` to each of `channels`, run in parallel so they share
/// group commits.
fn batch_body(channels: &[String], data: &str) -> anyhow::Result<Bytes> {
    let mut out = String::from("{\"parallel\":true,\"commands\":[");
    for (i, channel) in channels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let channel = serde_json::to_string(channel)?;
        out.push_str(&format!(
            "{{\"publish\":{{\"channel\":{channel},\"data\":{data}}}}}"
        ));
    }
    out.push_str("]}");
    Ok(Bytes::from(out))
}

fn body_for(channel: &str, data: &str) -> anyhow::Result<Bytes> {
    let channel = serde_json::to_string(channel)?;
    Ok(Bytes::from(format!(
        "{{\"channel\":{channel},\"data\":{data}}}"
    )))
}

/// One keep-alive connection of either kind.
enum Connection {
    Raw(RawConnection),
    Hyper(SendRequest<Full<Bytes>>),
}

async fn connect(kind: ClientKind, addr: SocketAddr) -> Result<Connection, String> {
    if kind == ClientKind::Raw {
        return RawConnection::connect(addr).await.map(Connection::Raw);
    }
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("set TCP_NODELAY: {e}"))?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        // Ends when the sender is dropped or the server closes; the request side reports it.
        let _ = connection.await;
    });
    Ok(Connection::Hyper(sender))
}

/// Success is HTTP 200 with a body that starts `{"result"` (API errors are 200 with
/// `{"error"…`); checking the prefix keeps JSON decoding off the client's bill.
fn check(status: u16, body: &[u8], batch: bool) -> Result<(), Failure> {
    if status == 200 && !batch && body.starts_with(b"{\"result\"") {
        return Ok(());
    }
    // A batch reply is `{"replies":[…]}` with one `{"publish":…}` or `{"error":…}` each.
    if status == 200 && batch && body.starts_with(b"{\"replies\"") && !contains(body, b"{\"error\"")
    {
        return Ok(());
    }
    let excerpt = String::from_utf8_lossy(&body[..body.len().min(200)]);
    Err(Failure::Reply(if status == 200 {
        format!("error reply: {excerpt}")
    } else {
        format!("HTTP {status}: {excerpt}")
    }))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn send_one(connection: &mut Connection, target: &Target) -> Result<(), Failure> {
    let batch = target.batch > 1;
    let i = target.next_index();
    match connection {
        Connection::Raw(raw) => {
            let reply = raw
                .round_trip(&target.requests[i])
                .await
                .map_err(Failure::Transport)?;
            check(reply.status, reply.body, batch)
        }
        Connection::Hyper(sender) => {
            sender
                .ready()
                .await
                .map_err(|e| Failure::Transport(format!("connection: {e}")))?;
            let response = sender
                .send_request(target.hyper_request(i))
                .await
                .map_err(|e| Failure::Transport(format!("request: {e}")))?;
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| Failure::Transport(format!("reading reply: {e}")))?
                .to_bytes();
            check(status, &body, batch)
        }
    }
}

/// What one connection task counted.
struct Tally {
    histogram: Histogram<u64>,
    ok: u64,
    publications: u64,
    errors: u64,
    first_error: Option<String>,
}

fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    // 1 µs … 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).context("cannot create histogram")
}

/// One connection's closed loop: send, wait for the reply, repeat until `end`. Only
/// requests that start after `measure_from` and finish by `end` are counted as successes;
/// failures are counted when they start inside the window.
async fn connection_loop(
    target: Arc<Target>,
    mut connection: Connection,
    measure_from: Instant,
    end: Instant,
) -> anyhow::Result<Tally> {
    let mut tally = Tally {
        histogram: new_histogram()?,
        ok: 0,
        publications: 0,
        errors: 0,
        first_error: None,
    };
    loop {
        let started = Instant::now();
        if started >= end {
            break;
        }
        let outcome = send_one(&mut connection, &target).await;
        let finished = Instant::now();
        let measured = started >= measure_from;
        match outcome {
            Ok(()) => {
                if measured && finished <= end {
                    let micros = u64::try_from(finished.duration_since(started).as_micros())
                        .unwrap_or(u64::MAX);
                    tally.histogram.saturating_record(micros.max(1));
                    tally.ok += 1;
                    tally.publications += target.batch as u64;
                }
            }
            Err(failure) => {
                let (message, broken) = match failure {
                    Failure::Reply(message) => (message, false),
                    Failure::Transport(message) => (message, true),
                };
                if measured {
                    tally.errors += 1;
                    tally.first_error.get_or_insert(message);
                }
                if broken {
                    // Replace the connection; back off a little so a dead server is not spun on.
                    loop {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        if Instant::now() >= end {
                            return Ok(tally);
                        }
                        match connect(target.client, target.addr).await {
                            Ok(fresh) => {
                                connection = fresh;
                                break;
                            }
                            Err(message) => {
                                if Instant::now() >= measure_from {
                                    tally.errors += 1;
                                    tally.first_error.get_or_insert(message);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(tally)
}

/// CPU and memory over the measured window, sampled by a task of its own.
pub(crate) struct Usage {
    pub(crate) loadgen_cpu_percent: f64,
    pub(crate) server: Option<ServerUsage>,
    /// Other processes measured apart from the server (e.g. the Redis behind a cluster).
    pub(crate) aux: Option<ServerUsage>,
    pub(crate) cores: Vec<CoreUsage>,
}

/// CPU and RSS of several process trees added up, from `start` on.
struct TreeSet {
    pids: Vec<u32>,
    start: Option<CpuSample>,
    peak: u64,
}

impl TreeSet {
    fn begin(pids: Vec<u32>) -> anyhow::Result<Self> {
        let start = Self::cpu(&pids)?;
        Ok(Self {
            pids,
            start,
            peak: 0,
        })
    }

    /// Every tree's CPU time in one sample (`None`: no process given).
    fn cpu(pids: &[u32]) -> anyhow::Result<Option<CpuSample>> {
        let mut total: Option<CpuSample> = None;
        for &pid in pids {
            let sample = CpuSample::read_tree(pid)?;
            total = Some(match total {
                Some(sum) => sum.plus(&sample),
                None => sample,
            });
        }
        Ok(total)
    }

    fn rss(&self) -> anyhow::Result<u64> {
        self.pids
            .iter()
            .map(|&pid| sysstat::tree_rss_bytes(pid))
            .sum()
    }

    fn sample_rss(&mut self) -> anyhow::Result<()> {
        if !self.pids.is_empty() {
            self.peak = self.peak.max(self.rss()?);
        }
        Ok(())
    }

    fn finish(self) -> anyhow::Result<Option<ServerUsage>> {
        let (Some(start), Some(end)) = (self.start, Self::cpu(&self.pids)?) else {
            return Ok(None);
        };
        let rss = self.rss()?;
        Ok(Some(ServerUsage {
            pid: self.pids[0],
            pids: self.pids,
            cpu_percent: end.percent_since(&start),
            rss_bytes_end: rss,
            rss_bytes_peak: self.peak.max(rss),
            // Filled in once the publications are counted.
            cpu_us_per_publication: 0.0,
        }))
    }
}

/// Samples this process's CPU, the server's CPU and RSS (every process of `server_pids`, each
/// with its descendants; peak every 250 ms), the same for `aux_pids` apart, and every core's
/// use from `measure_from` to `end`. Also used by the fan-out scenario.
pub(crate) async fn sample_usage(
    server_pids: Vec<u32>,
    aux_pids: Vec<u32>,
    measure_from: Instant,
    end: Instant,
) -> anyhow::Result<Usage> {
    tokio::time::sleep_until(measure_from.into()).await;
    let system_start = SystemSample::read()?;
    let self_start = CpuSample::read(None)?;
    let mut server = TreeSet::begin(server_pids)?;
    let mut aux = TreeSet::begin(aux_pids)?;
    let mut interval = tokio::time::interval(Duration::from_millis(250));
    while Instant::now() < end {
        interval.tick().await;
        server.sample_rss()?;
        aux.sample_rss()?;
    }
    let self_end = CpuSample::read(None)?;
    let cores = SystemSample::read()?.usage_since(&system_start);
    Ok(Usage {
        loadgen_cpu_percent: self_end.percent_since(&self_start),
        server: server.finish()?,
        aux: aux.finish()?,
        cores,
    })
}

fn parse_target(args: &PublishArgs) -> anyhow::Result<(String, HeaderValue, String)> {
    let uri: Uri = args
        .url
        .parse()
        .with_context(|| format!("invalid --url {:?}", args.url))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => bail!("--url scheme {other:?} is not supported (plain http only)"),
        None => bail!("--url needs a scheme, e.g. http://127.0.0.1:8000"),
    }
    let authority = uri.authority().context("--url has no host")?;
    // `host()` keeps an IPv6 literal's brackets, which is what address lookup wants.
    let host = authority.host().to_owned();
    let port = authority.port_u16().unwrap_or(80);
    let base = uri.path().trim_end_matches('/').to_owned();
    let host_header = HeaderValue::from_str(authority.as_str()).context("invalid host in --url")?;
    Ok((
        format!("{host}:{port}"),
        host_header,
        format!(
            "{base}/api/{}",
            if args.batch > 1 { "batch" } else { "publish" }
        ),
    ))
}

/// Runs the scenario and returns what it measured.
pub async fn run(args: &PublishArgs) -> anyhow::Result<PublishReport> {
    if args.connections == 0 || args.channels == 0 {
        bail!("--connections and --channels must be above 0");
    }
    if args.batch == 0 {
        bail!("--batch must be above 0");
    }
    if args.duration.is_zero() {
        bail!("--duration must be above 0");
    }
    let (host_port, host_header, path) = parse_target(args)?;
    let addr = tokio::net::lookup_host(&host_port)
        .await
        .with_context(|| format!("cannot resolve {host_port}"))?
        .next()
        .with_context(|| format!("{host_port} resolves to no address"))?;
    let host = host_header
        .to_str()
        .context("invalid host in --url")?
        .to_owned();
    let mut headers = HeaderMap::new();
    headers.insert(HOST, host_header);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(
        "x-api-key",
        HeaderValue::from_str(&args.api_key).context("the API key is not a valid header value")?,
    );
    let data = data_of_size(args.payload);
    let channel = |i: usize| format!("{}-{}", args.channel_prefix, i % args.channels);
    let bodies = (0..args.channels)
        .map(|i| {
            if args.batch > 1 {
                batch_body(&(i..i + args.batch).map(channel).collect::<Vec<_>>(), &data)
            } else {
                body_for(&channel(i), &data)
            }
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let request_body_bytes = bodies.first().map_or(0, Bytes::len);
    // The key went through `HeaderValue` above, so it cannot smuggle in a line break.
    let requests = bodies
        .iter()
        .map(|body| encode_post(&path, &host, &args.api_key, body))
        .collect();
    let target = Arc::new(Target {
        addr,
        client: args.client,
        batch: args.batch,
        path: path.parse().context("invalid API path")?,
        headers,
        bodies,
        requests,
        next: AtomicUsize::new(0),
    });

    // One request first, so a wrong key or URL fails loudly instead of as a run of errors.
    let mut probe = connect(args.client, addr)
        .await
        .map_err(anyhow::Error::msg)?;
    match send_one(&mut probe, &target).await {
        Ok(()) => {}
        Err(Failure::Reply(message) | Failure::Transport(message)) => {
            bail!("the first publish failed: {message}")
        }
    }
    drop(probe);

    let mut connections = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        connections.push(
            connect(args.client, addr)
                .await
                .map_err(anyhow::Error::msg)?,
        );
    }
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let sampler = tokio::spawn(sample_usage(
        args.server_pid.into_iter().collect(),
        Vec::new(),
        measure_from,
        end,
    ));
    let tasks: Vec<_> = connections
        .into_iter()
        .map(|connection| {
            tokio::spawn(connection_loop(
                target.clone(),
                connection,
                measure_from,
                end,
            ))
        })
        .collect();

    let mut histogram = new_histogram()?;
    let (mut ok, mut publications, mut errors, mut first_error) = (0u64, 0u64, 0u64, None);
    for task in tasks {
        let tally = task.await.context("connection task panicked")??;
        histogram
            .add(&tally.histogram)
            .context("merging histograms")?;
        ok += tally.ok;
        publications += tally.publications;
        errors += tally.errors;
        if first_error.is_none() {
            first_error = tally.first_error;
        }
    }
    let mut usage = sampler.await.context("sampler task panicked")??;
    let seconds = args.duration.as_secs_f64();
    let rate = publications as f64 / seconds;
    // Percent of one core at `per_second` → CPU microseconds per item.
    let cost = |cpu_percent: f64, per_second: f64| {
        if per_second > 0.0 {
            cpu_percent * 1e4 / per_second
        } else {
            0.0
        }
    };
    if let Some(server) = &mut usage.server {
        server.cpu_us_per_publication = cost(server.cpu_percent, rate);
    }
    Ok(PublishReport {
        scenario: "publish",
        url: args.url.clone(),
        connections: args.connections,
        channels: args.channels,
        payload_bytes: args.payload,
        request_body_bytes,
        warmup_s: args.warmup.as_secs_f64(),
        duration_s: seconds,
        batch: args.batch,
        requests: ok,
        publications,
        publications_per_sec: rate,
        errors,
        first_error,
        latency: Latency {
            p50_us: histogram.value_at_quantile(0.50),
            p90_us: histogram.value_at_quantile(0.90),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
            mean_us: histogram.mean(),
        },
        loadgen_cpu_percent: usage.loadgen_cpu_percent,
        loadgen_cpu_us_per_request: cost(usage.loadgen_cpu_percent, ok as f64 / seconds),
        loadgen_cpu: args.cpu,
        loadgen_threads: args.threads,
        client: args.client,
        server: usage.server,
        cores: usage.cores,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_checked() {
        assert!(check(200, b"{\"result\":{}}", false).is_ok());
        assert!(check(200, b"{\"error\":{\"code\":102}}", false).is_err());
        assert!(check(401, b"{\"error\":{}}", false).is_err());
        assert!(check(200, b"{\"replies\":[{\"publish\":{}}]}", true).is_ok());
        assert!(
            check(
                200,
                b"{\"replies\":[{\"publish\":{}},{\"error\":{}}]}",
                true
            )
            .is_err()
        );
    }

    #[test]
    fn payload_has_requested_size_and_is_json() {
        for size in [8, 100, 1000] {
            let data = data_of_size(size);
            assert_eq!(data.len(), size);
            let _: serde_json::Value = serde_json::from_str(&data).expect("valid JSON");
        }
        let body = batch_body(&["a".into(), "b".into()], "{}").expect("body");
        let value: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
        assert_eq!(value["commands"][1]["publish"]["channel"], "b");
        assert_eq!(value["parallel"], true);
        let body = body_for("bench-1", &data_of_size(100)).expect("body");
        let value: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
        assert_eq!(value["channel"], "bench-1");
    }
}
