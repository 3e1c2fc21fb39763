//! `herald-bench fanout-worker`: one process holding a share of the fan-out and idle
//! subscribers, started by [`crate::spawn`] (never by hand).
//!
//! Owns its subscribers' connections (WebSocket through tokio-tungstenite, or SSE through
//! [`crate::sseclient`]), each bound to the source address it was given, and what they count:
//! deliveries, publish-to-receive latency, missed/duplicate offsets (Herald) or sequence
//! numbers (peers), pings answered and disconnects. Herald's protocols are here; the peers'
//! (NATS, Socket.IO, Pusher, Pushpin over SSE and WebSocket, the plain WebSocket of the
//! ceiling and Node `ws`) are in [`crate::peersub`]. It runs one single-threaded runtime;
//! everything is on one thread, so the shared state is a `RefCell`.
//!
//! Talks to its parent over stdio, one JSON object per line ([`WorkerMessage`] out,
//! [`Command`] in): `ready` once every subscriber is subscribed (or has failed), `window`
//! in, the measured window, `progress` in and out while deliveries drain, and `stop` in, with each channel's final offset, answered by a
//! `report`. Standard input closing means the parent is gone: the worker exits.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::peersub;
use crate::push::{self, Received, SeqTracker, Tracker, WsLine};
use crate::spawn::WorkerShare;
use crate::sseclient::{SseClient, connect_from};

mod sse;
use crate::sysstat::{self, CpuSample};

/// How subscribers reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// `/connection/websocket`, Centrifugo protocol v2 JSON.
    Ws,
    /// `/connection/sse?channel=…`.
    Sse,
    /// Peers: a plain WebSocket on `/sub/<channel>`, every text frame one publication (the
    /// ceiling server, the Node `ws` server).
    Plain,
    /// NATS core protocol over NATS's WebSocket listener (`SUB <channel>`).
    Nats,
    /// Socket.IO v5 over Engine.IO v4 WebSocket, joining room `<channel>`.
    Socketio,
    /// The Pusher protocol (`/app/<key>`, `pusher:subscribe`): Sockudo.
    Pusher,
    /// SSE through Pushpin (`/stream/<channel>`, held by the GRIP origin).
    PushpinSse,
    /// WebSocket through Pushpin (`/ws/<channel>`, subscribed by the GRIP origin).
    PushpinWs,
    /// MQTT 3.1.1 over TCP, topic `<channel>` at QoS 0: Mosquitto, Herald's MQTT listener.
    Mqtt,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ws => "ws",
            Self::Sse => "sse",
            Self::Plain => "plain",
            Self::Nats => "nats",
            Self::Socketio => "socketio",
            Self::Pusher => "pusher",
            Self::PushpinSse => "pushpin-sse",
            Self::PushpinWs => "pushpin-ws",
            Self::Mqtt => "mqtt",
        }
    }

    /// A peer's protocol: no offsets, publications counted by sequence number.
    pub fn is_peer(self) -> bool {
        !matches!(self, Self::Ws | Self::Sse)
    }
}

/// Flags of `herald-bench fanout-worker` (set by the parent).
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub share: WorkerShare,
    #[arg(long, value_enum)]
    pub transport: Transport,
    /// Subscriber i listens on channel i % CHANNELS.
    #[arg(long)]
    pub channels: usize,
    /// Time one connection may take to connect and subscribe.
    #[arg(long, default_value = "20s", value_parser = crate::parse_duration)]
    pub connect_timeout: Duration,
    /// Connection token (JWT); without it subscribers connect anonymously.
    #[arg(long, env = "HERALD_BENCH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// WebSocket: send `connect` only, no `subscribe` (to tell what a subscription costs).
    #[arg(long)]
    pub connect_only: bool,
    /// Pusher: the application key (the WebSocket path is `/app/<key>`).
    #[arg(long)]
    pub app_key: Option<String>,
}

/// A line from a worker to its parent.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMessage {
    Ready(Ready),
    /// The answer to `progress`.
    Progress {
        deliveries: u64,
        missed: u64,
    },
    Report(WorkerReport),
}

/// Sent once every subscriber is subscribed or has given up.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Ready {
    pub subscribed: u64,
    pub failed: u64,
    /// From the worker's start to its last subscriber's outcome.
    pub setup_s: f64,
    pub first_error: Option<String>,
}

/// What a worker counted, sent in answer to `stop`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    pub pid: u32,
    pub subscribed: u64,
    /// Subscribers still connected at `stop`.
    pub open: u64,
    /// Connections that ended after subscribing, by close code (`3008`, …) or `eof`/`error`.
    pub closed: BTreeMap<String, u64>,
    pub first_error: Option<String>,
    /// Distinct publications received, in total.
    pub deliveries: u64,
    /// Of those, the ones published inside the measured window.
    pub deliveries_in_window: u64,
    /// Latency histogram of the window's deliveries: (microseconds, count) pairs.
    pub latency_us: Vec<(u64, u64)>,
    /// Publications up to each channel's final offset that never arrived.
    pub missed: u64,
    pub duplicates: u64,
    pub gaps: u64,
    /// Peers: publications that arrived after a later one of their channel.
    #[serde(default)]
    pub reordered: u64,
    /// Publications for a channel the subscriber did not subscribe to.
    pub foreign: u64,
    /// WebSocket: pings answered. SSE: ping comments received.
    pub pings: u64,
    /// This process's CPU over the window, percent of one core (`None`: window not over).
    pub cpu_percent: Option<f64>,
    pub rss_bytes: u64,
}

/// From the parent to a worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Publications sent in `[from_ns, to_ns)` (Unix ns) are measured.
    Window { from_ns: u64, to_ns: u64 },
    /// Count what has arrived and what is still missing up to `final_offsets`.
    Progress { final_offsets: Vec<u64> },
    /// Report and exit. `final_offsets[c]` is channel c's last offset (empty: none known).
    Stop { final_offsets: Vec<u64> },
}

/// The name of channel `index`.
pub fn channel_name(prefix: &str, index: usize) -> String {
    format!("{prefix}-{index}")
}

/// `host:port` of an `http://` URL (what the Host header and the address lookup need).
pub fn host_of(url: &str) -> anyhow::Result<String> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("--url {url:?} must start with http://"))?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() {
        anyhow::bail!("--url {url:?} has no host");
    }
    Ok(if authority.contains(':') && !authority.ends_with(']') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    })
}

pub async fn resolve(host: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(host)
        .await
        .with_context(|| format!("cannot resolve {host}"))?
        .next()
        .with_context(|| format!("{host} resolves to no address"))
}

pub(crate) struct Slot {
    tracker: Tracker,
    /// Peers: by sequence number instead of offset.
    seqs: SeqTracker,
    channel: usize,
    subscribed: bool,
    open: bool,
}

pub(crate) struct State {
    /// Counting by sequence number (a peer), not by offset.
    peer: bool,
    slots: Vec<Slot>,
    histogram: Histogram<u64>,
    window: (u64, u64),
    deliveries: u64,
    deliveries_in_window: u64,
    foreign: u64,
    pings: u64,
    closed: BTreeMap<String, u64>,
    first_error: Option<String>,
}

impl State {
    fn on_publication(&mut self, slot: usize, channel: &str, received: Received<'_>, now: u64) {
        if received.channel != channel {
            self.foreign += 1;
            return;
        }
        if !self.slots[slot].tracker.record(received.offset) {
            return;
        }
        self.deliveries += 1;
        if let Some(sent) = received.sent_ns
            && sent >= self.window.0
            && sent < self.window.1
        {
            self.deliveries_in_window += 1;
            self.histogram
                .saturating_record(push::latency_us(sent, now));
        }
    }

    /// A message from a peer: a publication when it carries [`push::seq_payload`]'s fields.
    pub(crate) fn on_peer_message(&mut self, slot: usize, text: &str, now: u64) {
        let Some((sent, seq)) = push::peer_fields(text) else {
            return;
        };
        if !self.slots[slot].seqs.record(seq) {
            return;
        }
        self.deliveries += 1;
        if sent >= self.window.0 && sent < self.window.1 {
            self.deliveries_in_window += 1;
            self.histogram
                .saturating_record(push::latency_us(sent, now));
        }
    }

    /// A peer's subscriber is subscribed (nothing published before counts).
    pub(crate) fn on_peer_subscribed(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        s.subscribed = true;
        s.open = true;
    }

    pub(crate) fn on_ping(&mut self) {
        self.pings += 1;
    }

    pub(crate) fn on_foreign(&mut self) {
        self.foreign += 1;
    }

    pub(crate) fn on_closed(&mut self, slot: usize, how: String, error: Option<String>) {
        self.slots[slot].open = false;
        *self.closed.entry(how).or_default() += 1;
        if let Some(error) = error {
            self.first_error.get_or_insert(error);
        }
    }
}

/// What every subscriber task shares.
pub(crate) struct Ctx {
    addr: SocketAddr,
    pub(crate) host: String,
    source_ip: IpAddr,
    pub(crate) transport: Transport,
    pub(crate) app_key: Option<String>,
    /// The connection token: Herald's `connect`, the MQTT password.
    pub(crate) token: Option<String>,
    /// Numbers this process's connections (unique MQTT client ids).
    client_numbers: Cell<u64>,
    connect_limit: Semaphore,
    connect_timeout: Duration,
    connect_only: bool,
    pub(crate) state: RefCell<State>,
}

pub(crate) type Ws = WebSocketStream<TcpStream>;

impl Ctx {
    /// 1, 2, … for this process's connections.
    pub(crate) fn next_client_number(&self) -> u64 {
        let n = self.client_numbers.get() + 1;
        self.client_numbers.set(n);
        n
    }

    /// A TCP connection to the server from this worker's source address.
    pub(crate) async fn connect(&self) -> Result<TcpStream, String> {
        connect_from(self.source_ip, self.addr).await
    }

    /// A WebSocket connection to `path` (path and query) on the server.
    pub(crate) async fn ws_connect(&self, path: &str) -> Result<Ws, String> {
        let stream = self.connect().await?;
        // Small buffers: the client holds thousands of these per process.
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
            .max_write_buffer_size(64 * 1024);
        let url = format!("ws://{}{path}", self.host);
        let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
            .await
            .map_err(|e| format!("WebSocket handshake: {e}"))?;
        Ok(ws)
    }
}

/// Runs a worker until its parent says `stop` or goes away.
pub fn run(args: &WorkerArgs) -> anyhow::Result<()> {
    run_single_threaded(run_local(args))
}

/// Runs a worker process's main future on one thread (its connections share `Rc` state).
pub(crate) fn run_single_threaded(
    main: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let runtime = crate::runtime(1)?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, main)
}

/// One JSON line to the parent process.
pub(crate) fn emit(message: &impl Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, message)?;
    out.write_all(b"\n")?;
    out.flush().context("cannot write to the parent")
}

async fn run_local(args: &WorkerArgs) -> anyhow::Result<()> {
    if args.channels == 0 {
        anyhow::bail!("--channels must be above 0");
    }
    let host = host_of(&args.share.url)?;
    let addr = resolve(&host).await?;
    let ctx = Rc::new(Ctx {
        addr,
        host,
        source_ip: args.share.source_ip,
        transport: args.transport,
        app_key: args.app_key.clone(),
        token: args.token.clone(),
        client_numbers: Cell::new(0),
        connect_limit: Semaphore::new(args.share.connect_concurrency.max(1)),
        connect_timeout: args.connect_timeout,
        connect_only: args.connect_only,
        state: RefCell::new(State {
            peer: args.transport.is_peer(),
            slots: (0..args.share.count)
                .map(|i| Slot {
                    tracker: Tracker::default(),
                    seqs: SeqTracker::default(),
                    channel: (args.share.first + i) % args.channels,
                    subscribed: false,
                    open: false,
                })
                .collect(),
            histogram: Histogram::new_with_bounds(1, 60_000_000, 3)
                .context("cannot create histogram")?,
            window: (0, 0),
            deliveries: 0,
            deliveries_in_window: 0,
            foreign: 0,
            pings: 0,
            closed: BTreeMap::new(),
            first_error: None,
        }),
    });
    let started = Instant::now();
    let (outcomes, mut results) = mpsc::unbounded_channel();
    for slot in 0..args.share.count {
        let channel = channel_name(
            &args.share.prefix,
            (args.share.first + slot) % args.channels,
        );
        tokio::task::spawn_local(subscriber(ctx.clone(), slot, channel, outcomes.clone()));
    }
    drop(outcomes);
    let mut ready = Ready::default();
    while let Some(outcome) = results.recv().await {
        match outcome {
            Ok(()) => ready.subscribed += 1,
            Err(error) => {
                ready.failed += 1;
                ready.first_error.get_or_insert(error);
            }
        }
    }
    ready.setup_s = started.elapsed().as_secs_f64();
    emit(&WorkerMessage::Ready(ready))?;

    let cpu = Rc::new(Cell::new(None));
    let mut lines = stdin_lines();
    while let Some(line) = lines.recv().await {
        match serde_json::from_str::<Command>(&line).context("bad command from the parent")? {
            Command::Window { from_ns, to_ns } => {
                ctx.state.borrow_mut().window = (from_ns, to_ns);
                tokio::task::spawn_local(sample_cpu(from_ns, to_ns, cpu.clone()));
            }
            Command::Progress { final_offsets } => {
                let report = report(&ctx.state.borrow(), &final_offsets, None);
                emit(&WorkerMessage::Progress {
                    deliveries: report.deliveries,
                    missed: report.missed,
                })?;
            }
            Command::Stop { final_offsets } => {
                let report = report(&ctx.state.borrow(), &final_offsets, cpu.get());
                emit(&WorkerMessage::Report(report))?;
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Standard input, line by line, read on a thread of its own (tokio's `io-std` is not
/// enabled in this workspace). The channel closes at end of input or on a read error.
pub(crate) fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (sender, receiver) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { return };
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    receiver
}

/// Sleeps until Unix time `at_ns` (returns at once if it has passed).
async fn sleep_until_ns(at_ns: u64) {
    let now = push::now_ns();
    if at_ns > now {
        tokio::time::sleep(Duration::from_nanos(at_ns - now)).await;
    }
}

async fn sample_cpu(from_ns: u64, to_ns: u64, out: Rc<Cell<Option<f64>>>) {
    sleep_until_ns(from_ns).await;
    let Ok(start) = CpuSample::read(None) else {
        return;
    };
    sleep_until_ns(to_ns).await;
    if let Ok(end) = CpuSample::read(None) {
        out.set(Some(end.percent_since(&start)));
    }
}

fn report(state: &State, final_offsets: &[u64], cpu_percent: Option<f64>) -> WorkerReport {
    let mut report = WorkerReport {
        pid: std::process::id(),
        closed: state.closed.clone(),
        first_error: state.first_error.clone(),
        deliveries: state.deliveries,
        deliveries_in_window: state.deliveries_in_window,
        latency_us: state
            .histogram
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect(),
        foreign: state.foreign,
        pings: state.pings,
        cpu_percent,
        rss_bytes: sysstat::rss_bytes(std::process::id()).unwrap_or(0),
        ..WorkerReport::default()
    };
    for slot in state.slots.iter().filter(|s| s.subscribed) {
        report.subscribed += 1;
        report.open += u64::from(slot.open);
        if state.peer {
            report.duplicates += slot.seqs.duplicates;
            report.reordered += slot.seqs.reordered;
            if let Some(&published) = final_offsets.get(slot.channel) {
                report.missed += slot.seqs.missed(published);
            }
            continue;
        }
        report.duplicates += slot.tracker.duplicates;
        report.gaps += slot.tracker.gaps;
        if let Some(&last) = final_offsets.get(slot.channel) {
            report.missed += slot.tracker.missed(last);
        }
    }
    report
}

/// One subscriber: set up (a few attempts), then read until the connection ends.
async fn subscriber(
    ctx: Rc<Ctx>,
    slot: usize,
    channel: String,
    outcome: mpsc::UnboundedSender<Result<(), String>>,
) {
    let mut last_error = String::new();
    for attempt in 0..3 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
        }
        let permit = ctx.connect_limit.acquire().await;
        if ctx.transport.is_peer() {
            let result =
                tokio::time::timeout(ctx.connect_timeout, peersub::setup(&ctx, &channel)).await;
            drop(permit);
            match result {
                Ok(Ok(connection)) => {
                    ctx.state.borrow_mut().on_peer_subscribed(slot);
                    let _ = outcome.send(Ok(()));
                    drop(outcome);
                    peersub::run(&ctx, slot, &channel, connection).await;
                    return;
                }
                Ok(Err(error)) => last_error = error,
                Err(_) => last_error = format!("no subscription within {:?}", ctx.connect_timeout),
            }
            continue;
        }
        let result = match ctx.transport {
            Transport::Sse => {
                tokio::time::timeout(ctx.connect_timeout, sse::setup(&ctx, slot, &channel))
                    .await
                    .map(|r| r.map(Connection::Sse))
            }
            _ => tokio::time::timeout(ctx.connect_timeout, ws_setup(&ctx, &channel))
                .await
                .map(|r| r.map(|c| Connection::Ws(Box::new(c)))),
        };
        drop(permit);
        match result {
            Ok(Ok(connection)) => {
                let _ = outcome.send(Ok(()));
                drop(outcome);
                match connection {
                    Connection::Ws(ws) => {
                        let (ws, start, rest) = *ws;
                        {
                            let mut state = ctx.state.borrow_mut();
                            let s = &mut state.slots[slot];
                            s.tracker = Tracker::new(start);
                            s.subscribed = true;
                            s.open = true;
                        }
                        ws_run(&ctx, slot, &channel, ws, rest).await;
                    }
                    Connection::Sse(client) => sse::run(&ctx, slot, &channel, client).await,
                }
                return;
            }
            Ok(Err(error)) => last_error = error,
            Err(_) => last_error = format!("no subscription within {:?}", ctx.connect_timeout),
        }
    }
    let _ = outcome.send(Err(last_error));
}

enum Connection {
    /// The socket, the subscribe reply's offset, and what followed the reply in its frame.
    Ws(Box<(Ws, u64, Option<String>)>),
    Sse(SseClient),
}

/// Connects, sends `connect` and `subscribe` in one frame, and waits for the subscribe reply
/// (with `connect_only`, sends `connect` and waits for its reply).
async fn ws_setup(ctx: &Ctx, channel: &str) -> Result<(Ws, u64, Option<String>), String> {
    let mut ws = ctx.ws_connect("/connection/websocket").await?;
    let token = match &ctx.token {
        Some(token) => format!("\"token\":{}", json_string(token)),
        None => String::new(),
    };
    let mut commands = format!("{{\"id\":1,\"connect\":{{{token}}}}}");
    if !ctx.connect_only {
        commands.push_str(&format!(
            "\n{{\"id\":2,\"subscribe\":{{\"channel\":{}}}}}",
            json_string(channel)
        ));
    }
    let last_id = if ctx.connect_only { 1 } else { 2 };
    ws.send(Message::text(commands))
        .await
        .map_err(|e| format!("send connect: {e}"))?;
    loop {
        let text = match ws.next().await {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                return Err(format!(
                    "closed while subscribing: {}",
                    frame.map_or_else(
                        || "no reason".to_owned(),
                        |f| format!("{} {}", f.code, f.reason)
                    )
                ));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("read: {e}")),
            None => return Err("the server closed the connection while subscribing".to_owned()),
        };
        let mut consumed = 0;
        for line in text.split('\n') {
            consumed += line.len() + 1;
            let Ok(reply) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if let Some(error) = reply.get("error") {
                return Err(format!("command {} failed: {error}", reply["id"]));
            }
            if reply.get("id").and_then(serde_json::Value::as_u64) == Some(last_id) {
                let start = reply["subscribe"]["offset"].as_u64().unwrap_or(0);
                let rest = text.get(consumed.min(text.len())..).unwrap_or("");
                let rest = (!rest.is_empty()).then(|| rest.to_owned());
                return Ok((ws, start, rest));
            }
        }
    }
}

fn json_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// Handles one text frame; `true` when it held a ping to answer.
fn ws_text(ctx: &Ctx, slot: usize, channel: &str, text: &str) -> bool {
    let now = push::now_ns();
    let mut ping = false;
    let mut state = ctx.state.borrow_mut();
    for line in text.split('\n') {
        match push::ws_line(line) {
            WsLine::Ping => ping = true,
            WsLine::Publication(received) => state.on_publication(slot, channel, received, now),
            WsLine::Other => {}
        }
    }
    if ping {
        state.pings += 1;
    }
    ping
}

async fn ws_run(ctx: &Ctx, slot: usize, channel: &str, mut ws: Ws, rest: Option<String>) {
    let mut ping = rest.is_some_and(|rest| ws_text(ctx, slot, channel, &rest));
    loop {
        if ping {
            if let Err(e) = ws.send(Message::text("{}")).await {
                ctx.state.borrow_mut().on_closed(
                    slot,
                    "error".to_owned(),
                    Some(format!("sending pong: {e}")),
                );
                return;
            }
            ping = false;
        }
        match ws.next().await {
            Some(Ok(Message::Text(text))) => ping = ws_text(ctx, slot, channel, &text),
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = frame.map_or_else(
                    || ("close".to_owned(), String::new()),
                    |f| (u16::from(f.code).to_string(), f.reason.to_string()),
                );
                let error = format!("closed by the server: {code} {reason}");
                ctx.state.borrow_mut().on_closed(slot, code, Some(error));
                return;
            }
            Some(Ok(Message::Binary(_))) => {
                ctx.state.borrow_mut().on_closed(
                    slot,
                    "error".to_owned(),
                    Some("unexpected binary frame".to_owned()),
                );
                return;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                ctx.state.borrow_mut().on_closed(
                    slot,
                    "error".to_owned(),
                    Some(format!("read: {e}")),
                );
                return;
            }
            None => {
                ctx.state
                    .borrow_mut()
                    .on_closed(slot, "eof".to_owned(), None);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_from_urls() {
        assert_eq!(
            host_of("http://127.0.0.1:8000").expect("ok"),
            "127.0.0.1:8000"
        );
        assert_eq!(host_of("http://localhost/").expect("ok"), "localhost:80");
        assert!(host_of("https://x").is_err());
        assert!(host_of("http://").is_err());
    }

    /// A worker's state with one subscribed slot per channel, window 1,000..2,000 ns.
    fn state(peer: bool, channels: usize, start: u64) -> State {
        State {
            peer,
            slots: (0..channels)
                .map(|channel| Slot {
                    tracker: Tracker::new(start),
                    seqs: SeqTracker::default(),
                    channel,
                    subscribed: true,
                    open: true,
                })
                .collect(),
            histogram: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram"),
            window: (1_000, 2_000),
            deliveries: 0,
            deliveries_in_window: 0,
            foreign: 0,
            pings: 0,
            closed: BTreeMap::new(),
            first_error: None,
        }
    }

    #[test]
    fn report_counts_missed_by_final_offset() {
        let mut state = state(false, 2, 10);
        let publication = |offset, sent_ns| Received {
            channel: "c-0",
            offset,
            sent_ns: Some(sent_ns),
        };
        state.on_publication(0, "c-0", publication(11, 500), 900);
        state.on_publication(0, "c-0", publication(12, 1_500), 3_501_500);
        state.on_publication(0, "c-0", publication(12, 1_500), 3_501_500);
        state.on_publication(1, "c-1", publication(11, 1_500), 2_000);
        state.on_closed(1, "3008".to_owned(), Some("slow".to_owned()));
        let report = report(&state, &[13, 11], None);
        assert_eq!(report.deliveries, 2, "one duplicate, one foreign");
        assert_eq!(report.deliveries_in_window, 1);
        assert_eq!((report.duplicates, report.foreign), (1, 1));
        // Channel 0 published up to 13 (13 missing); channel 1 up to 11 (never received).
        assert_eq!(report.missed, 2);
        assert_eq!((report.subscribed, report.open), (2, 1));
        assert_eq!(report.closed.get("3008"), Some(&1));
        assert_eq!(report.latency_us.len(), 1);
        assert!((3495..=3505).contains(&report.latency_us[0].0));
    }

    #[test]
    fn peers_count_by_sequence_number() {
        let mut state = state(true, 1, 0);
        let message = |sent, seq| push::seq_payload(sent, seq, 80);
        state.on_peer_message(0, &message(1_500, 2), 5_000);
        state.on_peer_message(0, &message(1_600, 1), 5_000);
        state.on_peer_message(0, &message(1_600, 1), 5_000);
        state.on_peer_message(0, &message(2_500, 4), 5_000);
        state.on_peer_message(0, "{\"event\":\"pusher:pong\"}", 5_000);
        // Five published: 3 and 5 never came.
        let report = report(&state, &[5], None);
        assert_eq!((report.deliveries, report.deliveries_in_window), (3, 2));
        assert_eq!(
            (report.duplicates, report.reordered, report.missed),
            (1, 1, 2)
        );
    }
}
