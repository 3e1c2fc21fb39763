//! The `grpc` scenario (docs/benchmarks.md, "gRPC"): in one run against one server,
//!
//! 1. publishes/s over the HTTP API (`POST /api/publish`, and `/api/batch` with `--batch`
//!    publications) and over the gRPC API (`CentrifugoApi.Publish`, and `Batch` with the same
//!    count): the same closed loop — `--connections` connections, one request in flight each,
//!    the same channels and data — so the four numbers compare;
//! 2. fan-out to `--subscribers` subscribers over the uni gRPC stream
//!    (`CentrifugoUniStream.Consume`) beside as many over the WebSocket (JSON client
//!    protocol), each subscriber on its own TCP connection, with a publisher at `--rate`
//!    publications/s: publish-to-receive latency (p50, p99, max) and deliveries missed.
//!
//! gRPC is spoken directly over a hyper HTTP/2 connection, messages encoded by hand (a few
//! fields, [`crate::grpcwire`]), so the client costs little and needs no generated code. A publication's data
//! carries its send time (`{"t":<µs since the run started>,…}`), found in the received bytes
//! with a substring search, without decoding.
//!
//! May touch: the network (only the URL it is given).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};

use crate::grpcwire::{
    batch_request, consume_request, fields, grpc_frame, next_message, publish_request,
};
use crate::publish::data_of_size;
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const PUBLISH_PATH: &str = "/centrifugal.centrifugo.api.CentrifugoApi/Publish";
const BATCH_PATH: &str = "/centrifugal.centrifugo.api.CentrifugoApi/Batch";
const CONSUME_PATH: &str = "/centrifugal.centrifugo.unistream.CentrifugoUniStream/Consume";

/// Flags of `herald-bench grpc`.
#[derive(Debug, Clone, clap::Args)]
pub struct GrpcArgs {
    /// Server base URL (`[grpc_api] enabled = true`), e.g. http://127.0.0.1:8000.
    #[arg(long)]
    pub url: String,
    /// Server API key (HTTP `X-API-Key`, gRPC `authorization: apikey`).
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    pub api_key: String,
    /// Connection token (JWT) for every subscriber; without it they connect anonymously.
    #[arg(long)]
    pub token: Option<String>,
    /// Publishing connections, each with one request in flight.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// How long each publish measurement and the fan-out window last.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    pub duration: Duration,
    /// Load before each publish measurement (not counted).
    #[arg(long, default_value = "2s", value_parser = crate::parse_duration)]
    pub warmup: Duration,
    /// Publications per batch request (HTTP `/api/batch`, gRPC `Batch`).
    #[arg(long, default_value_t = 10)]
    pub batch: usize,
    /// Publishes go round-robin over this many channels.
    #[arg(long, default_value_t = 100)]
    pub channels: usize,
    /// Approximate size in bytes of each publication's JSON data.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Subscribers per transport in the fan-out part (0: skip it).
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Publications per second to the fan-out channel.
    #[arg(long, default_value_t = 10)]
    pub rate: u32,
    /// Runtime worker threads of the load generator.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One publish measurement.
#[derive(Debug, Serialize)]
pub struct PublishRun {
    pub api: &'static str,
    pub publications_per_request: usize,
    pub publications_per_sec: f64,
    pub requests: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub p50_us: u64,
    pub p99_us: u64,
}

/// One fan-out measurement.
#[derive(Debug, Serialize)]
pub struct FanoutRun {
    pub transport: &'static str,
    pub subscribers: usize,
    pub published: u64,
    pub delivered: u64,
    /// Deliveries expected (published × subscribers) and not received.
    pub missed: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

#[derive(Debug, Serialize)]
pub struct GrpcReport {
    pub scenario: &'static str,
    pub url: String,
    pub connections: usize,
    pub channels: usize,
    pub payload_bytes: usize,
    pub duration_s: f64,
    pub publish: Vec<PublishRun>,
    pub fanout: Vec<FanoutRun>,
}

impl GrpcReport {
    pub fn print_text(&self) {
        println!(
            "grpc {}: {} connections, {} channels, {}-byte data, {:.1}s windows",
            self.url, self.connections, self.channels, self.payload_bytes, self.duration_s
        );
        for run in &self.publish {
            println!(
                "  publish {:<5} x{:<4} {:>9.0} publications/s  p50 {:>7} µs  p99 {:>7} µs  ({} requests, {} errors{})",
                run.api,
                run.publications_per_request,
                run.publications_per_sec,
                run.p50_us,
                run.p99_us,
                run.requests,
                run.errors,
                run.first_error
                    .as_deref()
                    .map(|e| format!(", first: {e}"))
                    .unwrap_or_default()
            );
        }
        for run in &self.fanout {
            println!(
                "  fan-out {:<9} {} subscribers: {} published, {} delivered, {} missed, p50 {} µs, p99 {} µs, max {} µs",
                run.transport,
                run.subscribers,
                run.published,
                run.delivered,
                run.missed,
                run.p50_us,
                run.p99_us,
                run.max_us
            );
        }
    }
}

pub async fn run(args: &GrpcArgs) -> anyhow::Result<GrpcReport> {
    let uri: Uri = args.url.parse().context("--url")?;
    let authority = uri.authority().context("--url has no host:port")?.clone();
    let addr: SocketAddr = tokio::net::lookup_host(authority.as_str())
        .await?
        .next()
        .context("--url does not resolve")?;
    let data = data_of_size(args.payload);
    let channels: Vec<String> = (0..args.channels.max(1))
        .map(|i| format!("bench-grpc-{i}"))
        .collect();
    let setup = Setup {
        addr,
        authority: authority.to_string(),
        api_key: args.api_key.clone(),
        channels,
        data,
    };
    let mut publish = Vec::new();
    for (api, batch) in [
        (Api::Http, 1),
        (Api::Grpc, 1),
        (Api::Http, args.batch),
        (Api::Grpc, args.batch),
    ] {
        publish.push(measure_publish(&setup, args, api, batch).await?);
    }
    let mut fanout = Vec::new();
    if args.subscribers > 0 {
        for transport in [Transport::WebSocket, Transport::UniGrpc] {
            fanout.push(measure_fanout(&setup, args, transport).await?);
        }
    }
    Ok(GrpcReport {
        scenario: "grpc",
        url: args.url.clone(),
        connections: args.connections,
        channels: setup.channels.len(),
        payload_bytes: args.payload,
        duration_s: args.duration.as_secs_f64(),
        publish,
        fanout,
    })
}

struct Setup {
    addr: SocketAddr,
    authority: String,
    api_key: String,
    channels: Vec<String>,
    data: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    Http,
    Grpc,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    WebSocket,
    UniGrpc,
}

// --- Publishing ------------------------------------------------------------------------------

async fn h2_connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .context("HTTP/2 handshake")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

async fn h1_connect(
    addr: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP/1.1 handshake")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

fn grpc_request(setup: &Setup, path: &str, body: Bytes) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = hyper::Method::POST;
    *request.uri_mut() = Uri::builder()
        .scheme("http")
        .authority(setup.authority.as_str())
        .path_and_query(path)
        .build()
        .unwrap_or_default();
    let headers = request.headers_mut();
    headers.insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/grpc"),
    );
    headers.insert("te", hyper::header::HeaderValue::from_static("trailers"));
    if let Ok(key) = format!("apikey {}", setup.api_key).parse() {
        headers.insert("authorization", key);
    }
    request
}

fn http_request(setup: &Setup, path: &str, body: Bytes) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = hyper::Method::POST;
    *request.uri_mut() = Uri::try_from(path).unwrap_or_default();
    let headers = request.headers_mut();
    headers.insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    if let Ok(host) = setup.authority.parse() {
        headers.insert("host", host);
    }
    if let Ok(key) = setup.api_key.parse() {
        headers.insert("x-api-key", key);
    }
    request
}

/// The request bodies, one per starting channel (a batch takes the next `batch` channels).
fn bodies(setup: &Setup, api: Api, batch: usize) -> anyhow::Result<Vec<Bytes>> {
    let n = setup.channels.len();
    (0..n)
        .map(|i| {
            let chosen: Vec<String> = (0..batch)
                .map(|k| setup.channels[(i + k) % n].clone())
                .collect();
            Ok(match (api, batch) {
                (Api::Grpc, 1) => grpc_frame(&publish_request(&chosen[0], &setup.data)),
                (Api::Grpc, _) => grpc_frame(&batch_request(&chosen, &setup.data)),
                (Api::Http, 1) => Bytes::from(format!(
                    "{{\"channel\":{},\"data\":{}}}",
                    serde_json::to_string(&chosen[0])?,
                    setup.data
                )),
                (Api::Http, _) => {
                    let commands: Vec<String> = chosen
                        .iter()
                        .map(|c| {
                            format!(
                                "{{\"publish\":{{\"channel\":{},\"data\":{}}}}}",
                                serde_json::to_string(c).unwrap_or_default(),
                                setup.data
                            )
                        })
                        .collect();
                    Bytes::from(format!(
                        "{{\"parallel\":true,\"commands\":[{}]}}",
                        commands.join(",")
                    ))
                }
            })
        })
        .collect()
}

/// How many publications a reply says succeeded (`Err`: none, and why).
fn succeeded(api: Api, batch: usize, status: u16, body: &[u8]) -> Result<u64, String> {
    if status != 200 {
        return Err(format!("HTTP status {status}"));
    }
    match api {
        Api::Http => {
            let ok = if batch == 1 {
                u64::from(body.starts_with(b"{\"result\""))
            } else {
                memchr::memmem::find_iter(body, b"{\"publish\"").count() as u64
            };
            if ok == 0 {
                return Err(String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
            }
            Ok(ok)
        }
        Api::Grpc => {
            let mut buf = BytesMut::from(body);
            let message = next_message(&mut buf).ok_or("no gRPC message (see grpc-status)")?;
            let top = fields(&message).ok_or("undecodable reply")?;
            let ok = if batch == 1 {
                u64::from(top.iter().any(|(n, _)| *n == 2))
            } else {
                top.iter()
                    .filter(|(n, reply)| {
                        *n == 1 && fields(reply).is_some_and(|f| f.iter().any(|(n, _)| *n == 4))
                    })
                    .count() as u64
            };
            if ok == 0 {
                return Err("the reply carries an error".to_owned());
            }
            Ok(ok)
        }
    }
}

/// How many publications a response says succeeded, once its body is read.
async fn judge(
    response: Result<hyper::Response<hyper::body::Incoming>, hyper::Error>,
    api: Api,
    batch: usize,
) -> Result<u64, String> {
    let response = response.map_err(|error| error.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|error| error.to_string())?
        .to_bytes();
    succeeded(api, batch, status, &body)
}

struct Tally {
    requests: u64,
    publications: u64,
    errors: u64,
    first_error: Option<String>,
    latency: Histogram<u64>,
}

async fn measure_publish(
    setup: &Setup,
    args: &GrpcArgs,
    api: Api,
    batch: usize,
) -> anyhow::Result<PublishRun> {
    let bodies = Arc::new(bodies(setup, api, batch)?);
    let path = match (api, batch) {
        (Api::Grpc, 1) => PUBLISH_PATH,
        (Api::Grpc, _) => BATCH_PATH,
        (Api::Http, 1) => "/api/publish",
        (Api::Http, _) => "/api/batch",
    };
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let mut tasks = Vec::new();
    for c in 0..args.connections.max(1) {
        let bodies = bodies.clone();
        let setup = Setup {
            addr: setup.addr,
            authority: setup.authority.clone(),
            api_key: setup.api_key.clone(),
            channels: Vec::new(),
            data: String::new(),
        };
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally {
                requests: 0,
                publications: 0,
                errors: 0,
                first_error: None,
                latency: Histogram::new(3)?,
            };
            let mut h1 = None;
            let mut h2 = None;
            match api {
                Api::Http => h1 = Some(h1_connect(setup.addr).await?),
                Api::Grpc => h2 = Some(h2_connect(setup.addr).await?),
            }
            let mut i = c;
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let body = bodies[i % bodies.len()].clone();
                i += 1;
                let sent = Instant::now();
                let response = match (&mut h1, &mut h2) {
                    (Some(sender), _) => {
                        sender.send_request(http_request(&setup, path, body)).await
                    }
                    (_, Some(sender)) => {
                        sender.send_request(grpc_request(&setup, path, body)).await
                    }
                    _ => bail!("no connection"),
                };
                let outcome = judge(response, api, batch).await;
                if sent < measure_from {
                    continue;
                }
                tally.requests += 1;
                match outcome {
                    Ok(n) => {
                        tally.publications += n;
                        let _ = tally.latency.record(sent.elapsed().as_micros() as u64);
                    }
                    Err(error) => {
                        tally.errors += 1;
                        tally.first_error.get_or_insert(error);
                    }
                }
            }
            Ok::<_, anyhow::Error>(tally)
        }));
    }
    let mut total = Tally {
        requests: 0,
        publications: 0,
        errors: 0,
        first_error: None,
        latency: Histogram::new(3)?,
    };
    for task in tasks {
        let tally = task.await??;
        total.requests += tally.requests;
        total.publications += tally.publications;
        total.errors += tally.errors;
        if total.first_error.is_none() {
            total.first_error = tally.first_error;
        }
        total.latency.add(&tally.latency)?;
    }
    Ok(PublishRun {
        api: match api {
            Api::Http => "http",
            Api::Grpc => "grpc",
        },
        publications_per_request: batch,
        publications_per_sec: total.publications as f64 / args.duration.as_secs_f64(),
        requests: total.requests,
        errors: total.errors,
        first_error: total.first_error,
        p50_us: total.latency.value_at_quantile(0.5),
        p99_us: total.latency.value_at_quantile(0.99),
    })
}

// --- Fan-out ---------------------------------------------------------------------------------

/// The send time a publication's data carries, in µs since `epoch`.
pub(crate) fn sent_at(bytes: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(bytes, b"\"t\":")? + 4;
    let digits = bytes[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&bytes[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// What every subscriber of one run adds to.
struct Received {
    epoch: Instant,
    delivered: AtomicU64,
    latency: std::sync::Mutex<Histogram<u64>>,
    ready: AtomicU64,
    stop: AtomicBool,
}

impl Received {
    fn record(&self, bytes: &[u8], local: &mut Histogram<u64>) {
        if let Some(sent) = sent_at(bytes) {
            let now = self.epoch.elapsed().as_micros() as u64;
            let _ = local.record(now.saturating_sub(sent));
            self.delivered.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn merge(&self, local: &Histogram<u64>) {
        if let Ok(mut total) = self.latency.lock() {
            let _ = total.add(local);
        }
    }
}

async fn websocket_subscriber(
    setup: Arc<Setup>,
    token: String,
    channel: String,
    received: Arc<Received>,
) -> anyhow::Result<()> {
    let stream = TcpStream::connect(setup.addr).await?;
    stream.set_nodelay(true)?;
    let url = format!("ws://{}/connection/websocket", setup.authority);
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    let connect = serde_json::json!({"id": 1, "connect": {"token": token}});
    let subscribe = serde_json::json!({"id": 2, "subscribe": {"channel": channel}});
    ws.send(Message::text(format!("{connect}\n{subscribe}")))
        .await?;
    let mut local = Histogram::new(3)?;
    let mut subscribed = false;
    while let Some(message) = ws.next().await {
        let text = match message? {
            Message::Text(text) => text,
            Message::Close(_) => break,
            _ => continue,
        };
        for line in text.as_str().split('\n') {
            if line == "{}" {
                ws.send(Message::text("{}")).await?;
            } else if !subscribed && line.contains("\"id\":2") {
                subscribed = true;
                received.ready.fetch_add(1, Ordering::Relaxed);
            } else {
                received.record(line.as_bytes(), &mut local);
            }
        }
        if received.stop.load(Ordering::Relaxed) {
            break;
        }
    }
    received.merge(&local);
    Ok(())
}

async fn grpc_subscriber(
    setup: Arc<Setup>,
    token: String,
    channel: String,
    received: Arc<Received>,
) -> anyhow::Result<()> {
    let mut sender = h2_connect(setup.addr).await?;
    let body = grpc_frame(&consume_request(&token, &channel));
    let response = sender
        .send_request(grpc_request(&setup, CONSUME_PATH, body))
        .await?;
    let mut body = response.into_body();
    let mut buf = BytesMut::new();
    let mut local = Histogram::new(3)?;
    let mut connected = false;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { break };
        buf.extend_from_slice(&data);
        while let Some(message) = next_message(&mut buf) {
            if !connected {
                connected = true;
                received.ready.fetch_add(1, Ordering::Relaxed);
            } else {
                received.record(&message, &mut local);
            }
        }
        if received.stop.load(Ordering::Relaxed) {
            break;
        }
    }
    received.merge(&local);
    Ok(())
}

async fn measure_fanout(
    setup: &Setup,
    args: &GrpcArgs,
    transport: Transport,
) -> anyhow::Result<FanoutRun> {
    let epoch = Instant::now();
    let received = Arc::new(Received {
        epoch,
        delivered: AtomicU64::new(0),
        latency: std::sync::Mutex::new(Histogram::new(3)?),
        ready: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let channel = format!("bench-fanout-{}", uuid_like());
    let shared = Arc::new(Setup {
        addr: setup.addr,
        authority: setup.authority.clone(),
        api_key: setup.api_key.clone(),
        channels: Vec::new(),
        data: String::new(),
    });
    let token = args.token.clone().unwrap_or_default();
    let mut tasks = Vec::new();
    for _ in 0..args.subscribers {
        let (setup, token, channel, received) = (
            shared.clone(),
            token.clone(),
            channel.clone(),
            received.clone(),
        );
        tasks.push(tokio::spawn(async move {
            match transport {
                Transport::WebSocket => websocket_subscriber(setup, token, channel, received).await,
                Transport::UniGrpc => grpc_subscriber(setup, token, channel, received).await,
            }
        }));
    }
    let ready_by = Instant::now() + Duration::from_secs(60);
    while received.ready.load(Ordering::Relaxed) < args.subscribers as u64 {
        if Instant::now() > ready_by {
            bail!(
                "only {} of {} subscribers ready after 60 s",
                received.ready.load(Ordering::Relaxed),
                args.subscribers
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut publisher = h1_connect(setup.addr).await?;
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
    let mut ticks = tokio::time::interval(interval);
    let until = Instant::now() + args.duration;
    let mut published = 0u64;
    while Instant::now() < until {
        ticks.tick().await;
        let t = epoch.elapsed().as_micros();
        let body = Bytes::from(format!(
            "{{\"channel\":\"{channel}\",\"data\":{{\"t\":{t},\"pad\":\"{}\"}}}}",
            "x".repeat(args.payload.saturating_sub(24))
        ));
        let response = publisher
            .send_request(http_request(&shared, "/api/publish", body))
            .await?;
        let ok = response.status().as_u16() == 200;
        let _ = response.into_body().collect().await;
        if ok {
            published += 1;
        }
    }
    // Drain: until everything arrived, or 10 s.
    let expected = published * args.subscribers as u64;
    let drain_by = Instant::now() + Duration::from_secs(10);
    while received.delivered.load(Ordering::Relaxed) < expected && Instant::now() < drain_by {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    received.stop.store(true, Ordering::Relaxed);
    // One more publication wakes every subscriber so it sees `stop` and reports.
    let wake = Bytes::from(format!(
        "{{\"channel\":\"{channel}\",\"data\":{{\"end\":true}}}}"
    ));
    let response = publisher
        .send_request(http_request(&shared, "/api/publish", wake))
        .await?;
    let _ = response.into_body().collect().await;
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    let delivered = received.delivered.load(Ordering::Relaxed);
    let latency = received
        .latency
        .lock()
        .map_err(|_| anyhow::anyhow!("a subscriber panicked"))?;
    Ok(FanoutRun {
        transport: match transport {
            Transport::WebSocket => "websocket",
            Transport::UniGrpc => "uni_grpc",
        },
        subscribers: args.subscribers,
        published,
        delivered,
        missed: expected.saturating_sub(delivered),
        p50_us: latency.value_at_quantile(0.5),
        p99_us: latency.value_at_quantile(0.99),
        max_us: latency.max(),
    })
}

fn uuid_like() -> String {
    format!("{:x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::sent_at;

    #[test]
    fn the_send_time_is_read_from_the_received_bytes() {
        assert_eq!(sent_at(b"{\"t\":12345,\"pad\":\"x\"}"), Some(12345));
        assert_eq!(sent_at(b"{\"end\":true}"), None);
    }
}
