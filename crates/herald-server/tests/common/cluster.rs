//! Herald clusters for multi-process tests: several real `herald serve` processes with
//! `storage.engine = "redis"`, the same `[redis]`, API key and token secret, each with its own
//! listen port (127.0.0.1:0), name and data dir; the server API of each node; and WebSocket
//! subscribers (Centrifugo JSON protocol) that read in the background, answer pings, and can
//! reconnect with recovery, recording everything they get.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::netns::Netns;
use super::process::ServerProcess;
use super::redis::{RedisProcess, Sentinels};

/// The API key every node of a test cluster accepts.
pub const CLUSTER_API_KEY: &str = "cluster-test-api-key-0123456789";
/// The HMAC secret every node of a test cluster verifies tokens with.
pub const CLUSTER_SECRET: &str = "cluster-test-hmac-secret-0123456789abcdef";

/// Where the nodes find Redis.
#[derive(Clone, Debug)]
pub enum RedisTarget {
    /// `redis.addresses`: one URL per shard.
    Addresses(Vec<String>),
    /// One `[[redis.sentinels]]` group.
    Sentinel {
        master_name: String,
        addresses: Vec<String>,
    },
}

/// What every node of one test cluster shares. Durations are config strings ("2s").
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub redis: RedisTarget,
    /// `redis.prefix`, unique per test.
    pub prefix: String,
    pub command_timeout: String,
    pub connect_timeout: String,
    pub ping_interval: String,
    pub presence_ttl: String,
    pub node_ttl: String,
    /// `redis.outage_disconnect` (None: the default).
    pub outage_disconnect: Option<String>,
    /// TOML appended to each node's config.
    pub extra: String,
    /// More `[redis]` keys (`key = value` lines).
    pub redis_extra: String,
}

impl ClusterSpec {
    fn with_target(redis: RedisTarget, test: &str) -> Self {
        Self {
            redis,
            prefix: unique_prefix(test),
            command_timeout: "1s".into(),
            connect_timeout: "1s".into(),
            ping_interval: "500ms".into(),
            presence_ttl: "60s".into(),
            node_ttl: "10s".into(),
            outage_disconnect: None,
            extra: String::new(),
            redis_extra: String::new(),
        }
    }

    /// Nodes on one Redis (one shard).
    pub fn new(redis: &RedisProcess, test: &str) -> Self {
        Self::with_target(RedisTarget::Addresses(vec![redis.url()]), test)
    }

    /// Nodes that find the primary through `sentinels`.
    pub fn sentinel(sentinels: &Sentinels, test: &str) -> Self {
        Self::with_target(
            RedisTarget::Sentinel {
                master_name: sentinels.master_name.clone(),
                addresses: sentinels.addresses(),
            },
            test,
        )
    }

    /// The config file of node `name`.
    pub fn toml(&self, name: &str, data_dir: &Path) -> String {
        self.toml_listening(name, data_dir, "127.0.0.1:0")
    }

    /// The config file of node `name` listening on `listen` (`server.listen`).
    pub fn toml_listening(&self, name: &str, data_dir: &Path, listen: &str) -> String {
        let quote = |items: &[String]| {
            items
                .iter()
                .map(|item| format!("{item:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (addresses, sentinels) = match &self.redis {
            RedisTarget::Addresses(urls) => {
                (format!("addresses = [{}]\n", quote(urls)), String::new())
            }
            RedisTarget::Sentinel {
                master_name,
                addresses,
            } => (
                String::new(),
                format!(
                    "[[redis.sentinels]]\nmaster_name = {master_name:?}\naddresses = [{}]\n",
                    quote(addresses)
                ),
            ),
        };
        format!(
            r#"[server]
name = "{name}"
listen = "{listen}"

[api]
keys = ["{CLUSTER_API_KEY}"]

[token]
hmac_secret = "{CLUSTER_SECRET}"

[storage]
engine = "redis"
data_dir = {data_dir:?}

[client]
recovery_max_publications = 10000

[namespace]
history_size = 10000
history_ttl = "1h"

[[namespaces]]
name = "room"
presence = true
history_size = 1000
history_ttl = "1h"

[redis]
{addresses}prefix = "{prefix}"
command_timeout = "{command_timeout}"
connect_timeout = "{connect_timeout}"
ping_interval = "{ping_interval}"
presence_ttl = "{presence_ttl}"
node_ttl = "{node_ttl}"
{outage_disconnect}{redis_extra}
{sentinels}
{extra}
"#,
            data_dir = data_dir.display().to_string(),
            prefix = self.prefix,
            command_timeout = self.command_timeout,
            connect_timeout = self.connect_timeout,
            ping_interval = self.ping_interval,
            presence_ttl = self.presence_ttl,
            node_ttl = self.node_ttl,
            redis_extra = self.redis_extra,
            outage_disconnect = self
                .outage_disconnect
                .as_ref()
                .map(|d| format!("outage_disconnect = \"{d}\"\n"))
                .unwrap_or_default(),
            extra = self.extra,
        )
    }
}

/// A Redis key prefix no other test (or earlier run) uses.
pub fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("herald-test-{test}-{}-{nanos:x}", std::process::id())
}

/// A connection token for `user`, valid for an hour, signed with [`CLUSTER_SECRET`].
pub fn token(user: &str) -> String {
    let now = herald_core::time::now_ms() / 1000;
    super::hs256(
        CLUSTER_SECRET,
        &json!({"sub": user, "exp": now + 3600, "info": {"name": user}}),
    )
}

// ---------------------------------------------------------------------------------------------
// Server API

/// How a `publish` through the server API ended.
#[derive(Clone, Debug, PartialEq)]
pub enum PublishOutcome {
    /// 200 with a result: the publication is acknowledged.
    Acked { offset: u64, epoch: String },
    /// 503 with `{"error":{"code":100,...}}`: the engine could not be reached.
    Unavailable(Value),
    /// Anything else (another status, another body, no answer).
    Failed(String),
}

/// One node's server API (cheap to clone into tasks).
#[derive(Clone, Debug)]
pub struct Api {
    pub url: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(url: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("http client");
        Self {
            url: url.trim_end_matches('/').to_owned(),
            http,
        }
    }

    /// POST `/api/{method}` with the key: status and JSON body, or why there was none.
    pub async fn call(&self, method: &str, params: Value) -> Result<(u16, Value), String> {
        let response = self
            .http
            .post(format!("{}/api/{method}", self.url))
            .header("X-API-Key", CLUSTER_API_KEY)
            .json(&params)
            .send()
            .await
            .map_err(|e| format!("{method} on {}: no response: {e}", self.url))?;
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .map_err(|e| format!("{method} on {}: body: {e}", self.url))?;
        let body = serde_json::from_str(&text).map_err(|_| {
            format!(
                "{method} on {}: HTTP {status} with a non-JSON body {text:?}",
                self.url
            )
        })?;
        Ok((status, body))
    }

    /// A method that must succeed: its `result`.
    pub async fn ok(&self, method: &str, params: Value) -> Value {
        let (status, body) = self
            .call(method, params.clone())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            status == 200 && body.get("error").is_none() && body.get("result").is_some(),
            "{method} {params} on {}: HTTP {status} {body}",
            self.url
        );
        body["result"].clone()
    }

    pub async fn publish(&self, channel: &str, data: Value) -> PublishOutcome {
        match self
            .call("publish", json!({"channel": channel, "data": data}))
            .await
        {
            Err(e) => PublishOutcome::Failed(e),
            Ok((200, body)) => {
                let result = &body["result"];
                match (result["offset"].as_u64(), result["epoch"].as_str()) {
                    (Some(offset), Some(epoch)) if body.get("error").is_none() => {
                        PublishOutcome::Acked {
                            offset,
                            epoch: epoch.to_owned(),
                        }
                    }
                    _ => PublishOutcome::Failed(format!("HTTP 200 without a position: {body}")),
                }
            }
            Ok((503, body)) if body["error"]["code"] == 100 => PublishOutcome::Unavailable(body),
            Ok((status, body)) => PublishOutcome::Failed(format!("HTTP {status} {body}")),
        }
    }

    /// A publish that must be acknowledged: (offset, epoch).
    pub async fn publish_ok(&self, channel: &str, data: Value) -> (u64, String) {
        match self.publish(channel, data.clone()).await {
            PublishOutcome::Acked { offset, epoch } => (offset, epoch),
            other => panic!(
                "publish {data} to {channel} on {} was not acknowledged: {other:?}",
                self.url
            ),
        }
    }

    /// The status of `GET /ready` (None: no answer).
    pub async fn ready(&self) -> Option<u16> {
        let response = self
            .http
            .get(format!("{}/ready", self.url))
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .ok()?;
        Some(response.status().as_u16())
    }

    /// Polls `/ready` every 100 ms until it answers `status`; returns how long that took.
    pub async fn wait_ready_status(&self, status: u16, timeout: Duration) -> Duration {
        let started = Instant::now();
        let mut last = None;
        while started.elapsed() < timeout {
            last = self.ready().await;
            if last == Some(status) {
                return started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "{}/ready did not answer {status} within {timeout:?} (last: {last:?})",
            self.url
        );
    }

    /// `result.nodes` of `/api/info`.
    pub async fn nodes(&self) -> Vec<Value> {
        let result = self.ok("info", json!({})).await;
        result["nodes"]
            .as_array()
            .unwrap_or_else(|| panic!("info without nodes[]: {result}"))
            .clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Nodes

/// One `herald serve` of a test cluster, SIGKILLed on drop.
pub struct HeraldNode {
    pub name: String,
    pub api: Api,
    pub process: ServerProcess,
    pub dir: tempfile::TempDir,
}

impl HeraldNode {
    /// Writes the node's config in a new temp dir and starts it (blocking until it listens).
    pub fn start(spec: &ClusterSpec, name: &str) -> Self {
        Self::start_with_config(name, |data_dir| spec.toml(name, data_dir))
    }

    /// Starts a node inside `netns` (`ip netns exec NS herald serve ...`), listening on the
    /// namespace's address, so it is reachable from the host and its traffic to Redis can be
    /// cut. `spec` must name Redis at an address the namespace reaches (the host side of the
    /// link: [`RedisProcess::url_on`]`(netns.host_ip())`).
    pub fn start_in_netns(spec: &ClusterSpec, name: &str, netns: &Netns) -> Self {
        let listen = format!("{}:0", netns.ns_ip());
        Self::launch(name, &netns.exec_prefix(), |data_dir| {
            spec.toml_listening(name, data_dir, &listen)
        })
    }

    /// Starts a node with the config `config(data_dir)` returns.
    pub fn start_with_config(name: &str, config: impl FnOnce(&Path) -> String) -> Self {
        Self::launch(name, &[], config)
    }

    /// Writes the config `config(data_dir)` returns in a new temp dir and runs
    /// `PREFIX... herald serve --config it`.
    fn launch(name: &str, prefix: &[String], config: impl FnOnce(&Path) -> String) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("herald-{name}-"))
            .tempdir()
            .expect("tempdir");
        let text = config(&dir.path().join("data"));
        let config = dir.path().join("herald.toml");
        std::fs::write(&config, text).expect("write config");
        let config = config.to_str().expect("utf-8 path").to_owned();
        let process = ServerProcess::start_via(prefix, &["--config", &config], dir.path());
        let api = Api::new(&process.url);
        Self {
            name: name.to_owned(),
            api,
            process,
            dir,
        }
    }

    /// Starts one node per name, in parallel.
    pub fn start_many(spec: &ClusterSpec, names: &[&str]) -> Vec<Self> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = names
                .iter()
                .map(|name| scope.spawn(move || Self::start(spec, name)))
                .collect();
            handles
                .into_iter()
                .map(|handle| {
                    // The node's own panic (with herald's exit status) is the message.
                    handle
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        })
    }

    pub fn ws_url(&self) -> String {
        format!(
            "{}/connection/websocket",
            self.api.url.replace("http://", "ws://")
        )
    }

    /// SIGKILL, then waits until the process is gone.
    pub fn kill(&mut self) {
        self.process.signal(9);
        self.process.wait(Duration::from_secs(10));
    }
}

// ---------------------------------------------------------------------------------------------
// Subscribers

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One publication a subscriber got (live or recovered).
#[derive(Clone, Debug, PartialEq)]
pub struct Received {
    pub offset: u64,
    pub data: Value,
}

/// One successful connect + subscribe of a [`Subscriber`].
#[derive(Clone, Debug)]
pub struct Session {
    /// When the subscribe was answered, since the subscriber started.
    pub at: Duration,
    /// The node it connected to.
    pub node: String,
    pub client: String,
    /// `recovered` of the reply, when it subscribed with recovery (None: a fresh subscribe).
    pub recovered: Option<bool>,
    /// The stream's top in the reply (`offset`): live publications continue after it.
    pub offset: Option<u64>,
}

/// Everything a [`Subscriber`] saw.
#[derive(Debug, Default)]
pub struct SubscriberLog {
    /// The client id of each connection, in order.
    pub client_ids: Vec<String>,
    /// Each connection, in order.
    pub sessions: Vec<Session>,
    pub pubs: Vec<Received>,
    /// The epoch of each successful subscribe, in order.
    pub epochs: Vec<String>,
    /// Close codes the server sent (1006: the connection dropped without one).
    pub closes: Vec<u16>,
    /// Server pushes other than publications (unsubscribe, disconnect, join/leave...).
    pub other_pushes: Vec<Value>,
    /// What must never happen: a recovery answered "not recovered", a terminal close in
    /// reconnect mode, a malformed message.
    pub failures: Vec<String>,
    /// Everything besides publications, timestamped, for failure messages.
    pub events: Vec<String>,
}

/// A WebSocket client subscribed to one channel on one node, reading in the background.
pub struct Subscriber {
    pub label: String,
    pub channel: String,
    started: Instant,
    log: Arc<Mutex<SubscriberLog>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects to `node` at `url` and subscribes (recovering from `position` when given).
async fn session(
    node: &str,
    url: &str,
    user: &str,
    channel: &str,
    position: Option<(u64, String)>,
    log: &Mutex<SubscriberLog>,
    started: Instant,
) -> Result<Socket, String> {
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| format!("connect to {url}: {e}"))?;
    let connected = request(
        &mut socket,
        json!({"id": 1, "connect": {"token": token(user)}}),
    )
    .await?;
    let connect = &connected.reply;
    let client = connect["connect"]["client"]
        .as_str()
        .ok_or_else(|| format!("connect refused: {connect}"))?
        .to_owned();
    let mut subscribe = json!({"channel": channel});
    if let Some((offset, epoch)) = &position {
        subscribe["recover"] = json!(true);
        subscribe["offset"] = json!(offset);
        subscribe["epoch"] = json!(epoch);
    }
    let subscribed = request(&mut socket, json!({"id": 2, "subscribe": subscribe})).await?;
    let reply = &subscribed.reply;
    let result = &reply["subscribe"];
    if !result.is_object() {
        return Err(format!("subscribe refused: {reply}"));
    }
    // What came before the subscribe reply: nothing of the channel may (the server holds its
    // live publications back until the reply is queued).
    for line in connected
        .before
        .iter()
        .chain(&connected.after)
        .chain(&subscribed.before)
    {
        let early: Option<Value> = serde_json::from_str(line).ok();
        if early
            .as_ref()
            .is_some_and(|m| m["push"]["channel"] == channel && m["push"]["pub"].is_object())
        {
            log.lock().failures.push(format!(
                "a publication arrived before the subscribe reply: {line}"
            ));
            continue;
        }
        if !matches!(
            handle_line(&mut socket, line, channel, log, started).await,
            Line::Next
        ) {
            return Err(format!("unsubscribed or dropped while subscribing: {line}"));
        }
    }
    record_subscribed(node, &client, &position, reply, log, started);
    // What came right after the reply in its message: the live publications held back while
    // the subscription recovered, first of all.
    if !subscribed.after.is_empty() {
        log.lock().events.push(format!(
            "{}ms {} more frame(s) in the subscribe reply's message",
            started.elapsed().as_millis(),
            subscribed.after.len()
        ));
    }
    for line in &subscribed.after {
        if !matches!(
            handle_line(&mut socket, line, channel, log, started).await,
            Line::Next
        ) {
            return Err(format!(
                "unsubscribed or dropped right after subscribing: {line}"
            ));
        }
    }
    Ok(socket)
}

/// Records a successful subscribe (and the publications it recovered).
fn record_subscribed(
    node: &str,
    client: &str,
    position: &Option<(u64, String)>,
    reply: &Value,
    log: &Mutex<SubscriberLog>,
    started: Instant,
) {
    let result = &reply["subscribe"];
    let mut log = log.lock();
    let t = started.elapsed().as_millis();
    log.client_ids.push(client.to_owned());
    log.sessions.push(Session {
        at: started.elapsed(),
        node: node.to_owned(),
        client: client.to_owned(),
        recovered: position.as_ref().map(|_| result["recovered"] == true),
        offset: result["offset"].as_u64(),
    });
    log.epochs
        .push(result["epoch"].as_str().unwrap_or_default().to_owned());
    log.events.push(format!(
        "{t}ms connected to {node} as {client}, subscribed (recovering from {position:?}): offset {} epoch {} recovered {}",
        result["offset"], result["epoch"], result["recovered"]
    ));
    if position.is_some() && result["recovered"] != true {
        log.failures
            .push(format!("{t}ms resubscribe not recovered: {reply}"));
    }
    for publication in result["publications"].as_array().into_iter().flatten() {
        match publication["offset"].as_u64() {
            Some(offset) => log.pubs.push(Received {
                offset,
                data: publication["data"].clone(),
            }),
            None => log.failures.push(format!(
                "recovered publication without an offset: {publication}"
            )),
        }
    }
}

/// The reply to one command, and every other line the server sent while it was awaited.
struct Reply {
    reply: Value,
    /// Lines before the reply (in earlier messages, or earlier in its message).
    before: Vec<String>,
    /// Lines after the reply in its message: the server writes several frames in one message
    /// (newline-separated), e.g. a subscribe reply and then the live publications it held
    /// back while the subscription recovered. Dropping them would lose publications.
    after: Vec<String>,
}

/// Sends `command` and waits (10 s at most) for the reply with its id.
async fn request(socket: &mut Socket, command: Value) -> Result<Reply, String> {
    let id = command["id"].clone();
    socket
        .send(Message::text(command.to_string()))
        .await
        .map_err(|e| format!("send: {e}"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut before = Vec::new();
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .map_err(|_| format!("no reply to {command} within 10s"))?
            .ok_or("closed before replying")?
            .map_err(|e| format!("socket error: {e}"))?;
        match message {
            Message::Text(text) => {
                let mut lines = text.as_str().lines();
                while let Some(line) = lines.next() {
                    let reply: Value =
                        serde_json::from_str(line).map_err(|_| format!("not JSON: {line:?}"))?;
                    if reply["id"] == id {
                        return Ok(Reply {
                            reply,
                            before,
                            after: lines.map(str::to_owned).collect(),
                        });
                    }
                    before.push(line.to_owned());
                }
            }
            Message::Close(frame) => return Err(format!("closed before replying: {frame:?}")),
            _ => {}
        }
    }
}

/// How reading a connection ended.
enum Ended {
    /// A close frame with this code, or 1006 when the connection dropped without one.
    Closed(u16),
    /// An unsubscribe push: the subscription is gone, the connection is not.
    Unsubscribed,
}

async fn read_until_closed(
    socket: &mut Socket,
    channel: &str,
    log: &Mutex<SubscriberLog>,
    started: Instant,
) -> Ended {
    loop {
        let message = match socket.next().await {
            Some(Ok(message)) => message,
            Some(Err(_)) | None => return Ended::Closed(1006),
        };
        let text = match message {
            Message::Text(text) => text,
            Message::Close(frame) => {
                let code = frame.as_ref().map_or(1005, |f| u16::from(f.code));
                log.lock().events.push(format!(
                    "{}ms closed by the server: {frame:?}",
                    started.elapsed().as_millis()
                ));
                return Ended::Closed(code);
            }
            _ => continue,
        };
        for line in text.as_str().lines() {
            match handle_line(socket, line, channel, log, started).await {
                Line::Next => {}
                Line::Unsubscribed => return Ended::Unsubscribed,
                Line::Dropped => return Ended::Closed(1006),
            }
        }
    }
}

/// What one line from the server meant for the subscription.
enum Line {
    Next,
    /// An unsubscribe push for the channel.
    Unsubscribed,
    /// The connection dropped (answering a ping failed).
    Dropped,
}

/// Handles one line (one protocol frame) from the server: answers a ping, records a
/// publication of `channel` or another push.
async fn handle_line(
    socket: &mut Socket,
    line: &str,
    channel: &str,
    log: &Mutex<SubscriberLog>,
    started: Instant,
) -> Line {
    let Ok(message) = serde_json::from_str::<Value>(line) else {
        log.lock().failures.push(format!("not JSON: {line:?}"));
        return Line::Next;
    };
    if message == json!({}) {
        // A ping: answer it.
        if socket.send(Message::text("{}")).await.is_err() {
            return Line::Dropped;
        }
        return Line::Next;
    }
    let push = &message["push"];
    let publication = &push["pub"];
    let mut log = log.lock();
    if publication.is_object() && push["channel"] == channel {
        match publication["offset"].as_u64() {
            Some(offset) => log.pubs.push(Received {
                offset,
                data: publication["data"].clone(),
            }),
            None => log
                .failures
                .push(format!("publication without an offset: {message}")),
        }
        return Line::Next;
    }
    log.events.push(format!(
        "{}ms push {message}",
        started.elapsed().as_millis()
    ));
    if push.is_object() {
        log.other_pushes.push(message.clone());
    }
    if push["unsubscribe"].is_object() && push["channel"] == channel {
        return Line::Unsubscribed;
    }
    Line::Next
}

impl Subscriber {
    /// Connects to `node` as `user`, subscribes to `channel` (panicking unless that succeeds
    /// within 10 s) and reads in the background. With `reconnect`, a close with a reconnect
    /// code (below 3500), a dropped connection or an unsubscribe push is followed by new
    /// connections to the same node (every 200 ms until one works) that subscribe with
    /// recovery from the last publication received; without it the subscriber stays closed.
    pub async fn start(node: &HeraldNode, user: &str, channel: &str, reconnect: bool) -> Self {
        let targets = reconnect.then(|| vec![(node.name.clone(), node.ws_url())]);
        Self::connect(node, user, channel, targets).await
    }

    /// Like [`start`](Self::start) with reconnect, except that every reconnection goes to
    /// the nodes of `reconnect_to` (one attempt each, in turn) instead of `node`: a client
    /// whose load balancer sends it to another node once its node closed it.
    pub async fn start_moving(
        node: &HeraldNode,
        user: &str,
        channel: &str,
        reconnect_to: &[&HeraldNode],
    ) -> Self {
        assert!(!reconnect_to.is_empty(), "start_moving: no node to move to");
        let targets = reconnect_to
            .iter()
            .map(|node| (node.name.clone(), node.ws_url()))
            .collect();
        Self::connect(node, user, channel, Some(targets)).await
    }

    /// Connects to `node` and subscribes; on a reconnect-close, reconnects to `targets` (name,
    /// URL) in turn, or stays closed without them.
    async fn connect(
        node: &HeraldNode,
        user: &str,
        channel: &str,
        targets: Option<Vec<(String, String)>>,
    ) -> Self {
        let url = node.ws_url();
        let label = format!("{user}@{}", node.name);
        let started = Instant::now();
        let log = Arc::new(Mutex::new(SubscriberLog::default()));
        let socket = tokio::time::timeout(
            Duration::from_secs(10),
            session(&node.name, &url, user, channel, None, &log, started),
        )
        .await
        .unwrap_or_else(|_| panic!("{label}: connect and subscribe to {channel} took over 10s"))
        .unwrap_or_else(|e| panic!("{label}: cannot subscribe to {channel}: {e}"));
        let task = {
            let (log, channel, user) = (log.clone(), channel.to_owned(), user.to_owned());
            tokio::spawn(async move {
                let mut socket = socket;
                let mut attempts = 0usize;
                loop {
                    let ended = read_until_closed(&mut socket, &channel, &log, started).await;
                    let code = match ended {
                        Ended::Closed(code) => {
                            log.lock().closes.push(code);
                            Some(code)
                        }
                        Ended::Unsubscribed => None,
                    };
                    let Some(targets) = &targets else {
                        if code.is_none() {
                            // Still connected: keep answering pings.
                            if let Ended::Closed(code) =
                                read_until_closed(&mut socket, &channel, &log, started).await
                            {
                                log.lock().closes.push(code);
                            }
                        }
                        return;
                    };
                    if let Some(code) = code
                        && (3500..=4999).contains(&code)
                    {
                        log.lock()
                            .failures
                            .push(format!("closed for good with {code}: no reconnect allowed"));
                        return;
                    }
                    let _ = socket.close(None).await;
                    socket = loop {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let position = {
                            let log = log.lock();
                            let epoch = log.epochs.last().cloned().unwrap_or_default();
                            let offset = log.pubs.last().map_or(0, |p| p.offset);
                            (offset, epoch)
                        };
                        let (node, url) = &targets[attempts % targets.len()];
                        attempts += 1;
                        match session(node, url, &user, &channel, Some(position), &log, started)
                            .await
                        {
                            Ok(socket) => break socket,
                            Err(e) => log.lock().events.push(format!(
                                "{}ms reconnect failed: {e}",
                                started.elapsed().as_millis()
                            )),
                        }
                    };
                }
            })
        };
        Self {
            label,
            channel: channel.to_owned(),
            started,
            log,
            task,
        }
    }

    /// The client id of the current (last) connection.
    pub fn client_id(&self) -> String {
        self.log
            .lock()
            .client_ids
            .last()
            .cloned()
            .unwrap_or_default()
    }

    pub fn received(&self) -> Vec<Received> {
        self.log.lock().pubs.clone()
    }

    pub fn offsets(&self) -> Vec<u64> {
        self.log.lock().pubs.iter().map(|p| p.offset).collect()
    }

    /// Reads the log under its lock.
    pub fn with_log<T>(&self, read: impl FnOnce(&SubscriberLog) -> T) -> T {
        read(&self.log.lock())
    }

    /// The subscriber's story (offsets compressed into runs, events, failures) for failure
    /// messages.
    pub fn summary(&self) -> String {
        let log = self.log.lock();
        let offsets: Vec<u64> = log.pubs.iter().map(|p| p.offset).collect();
        format!(
            "subscriber {} on {} after {:?}: {} publications, offsets {}\n  closes {:?}\n  failures {:?}\n  events:\n    {}",
            self.label,
            self.channel,
            self.started.elapsed(),
            offsets.len(),
            runs(&offsets),
            log.closes,
            log.failures,
            log.events.join("\n    ")
        )
    }

    /// Waits until the last publication received has at least `offset`.
    pub async fn wait_for_offset(&self, offset: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let top = self.log.lock().pubs.last().map_or(0, |p| p.offset);
            if top >= offset {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "waited {timeout:?} for offset {offset}, got up to {top}\n{}",
                self.summary()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `[1, 2, 3, 5, 7, 8]` as `[1..=3, 5, 7..=8]`: short failure messages for long sequences
/// (a duplicate or a step back starts a new run, so it shows).
pub fn runs(offsets: &[u64]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < offsets.len() {
        let start = offsets[i];
        let mut end = start;
        while i + 1 < offsets.len() && offsets[i + 1] == end + 1 {
            i += 1;
            end += 1;
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}..={end}")
        });
        i += 1;
    }
    format!("[{}]", out.join(", "))
}

// ---------------------------------------------------------------------------------------------
// Publishers

/// One publish of a [`Publisher`]: when it was answered (since the publisher started), the
/// `n` it carried (`{"n": n}`, counting from 1) and how it ended.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub at: Duration,
    pub n: u64,
    pub outcome: PublishOutcome,
}

/// Publishes `{"n": 1}`, `{"n": 2}`, ... to one channel through one node, one request at a
/// time with a pause between them, until stopped; records every outcome.
pub struct Publisher {
    pub label: String,
    started: Instant,
    log: Arc<Mutex<Vec<Attempt>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Publisher {
    pub fn spawn(node: &HeraldNode, channel: &str, pause: Duration) -> Self {
        let started = Instant::now();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = {
            let (api, channel, log, stop) = (
                node.api.clone(),
                channel.to_owned(),
                log.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                for n in 1u64.. {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    let outcome = api.publish(&channel, json!({"n": n})).await;
                    log.lock().push(Attempt {
                        at: started.elapsed(),
                        n,
                        outcome,
                    });
                    tokio::time::sleep(pause).await;
                }
            })
        };
        Self {
            label: format!("publisher to {channel} through {}", node.name),
            started,
            log,
            stop,
            task: Some(task),
        }
    }

    pub fn attempts(&self) -> Vec<Attempt> {
        self.log.lock().clone()
    }

    /// How many publishes were acknowledged so far.
    pub fn acked(&self) -> usize {
        self.count(|o| matches!(o, PublishOutcome::Acked { .. }))
    }

    pub fn count(&self, matches: impl Fn(&PublishOutcome) -> bool) -> usize {
        self.log
            .lock()
            .iter()
            .filter(|a| matches(&a.outcome))
            .count()
    }

    /// Waits until `matches` holds for `count` outcomes in all.
    pub async fn wait_for(
        &self,
        what: &str,
        count: usize,
        timeout: Duration,
        matches: impl Fn(&PublishOutcome) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while self.count(&matches) < count {
            assert!(
                Instant::now() < deadline,
                "{}: waited {timeout:?} for {count} {what}, got {}\n{}",
                self.label,
                self.count(&matches),
                self.summary()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_acked(&self, count: usize, timeout: Duration) {
        self.wait_for("acknowledged publishes", count, timeout, |o| {
            matches!(o, PublishOutcome::Acked { .. })
        })
        .await;
    }

    /// Stops after the publish in flight; returns every attempt.
    pub async fn stop(mut self) -> Vec<Attempt> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("the publisher stops within 15s")
                .expect("publisher task");
        }
        self.attempts()
    }

    /// The outcomes in runs ("12 acked (offsets 1..=12), 5 unavailable, ...").
    pub fn summary(&self) -> String {
        describe_attempts(&self.attempts(), self.started.elapsed())
    }
}

/// `attempts` as runs of the same kind of outcome, for failure messages.
pub fn describe_attempts(attempts: &[Attempt], elapsed: Duration) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < attempts.len() {
        let kind = std::mem::discriminant(&attempts[i].outcome);
        let mut j = i;
        while j + 1 < attempts.len() && std::mem::discriminant(&attempts[j + 1].outcome) == kind {
            j += 1;
        }
        let run = &attempts[i..=j];
        let (first, last) = (&run[0], &run[run.len() - 1]);
        let line = match &first.outcome {
            PublishOutcome::Acked { .. } => {
                let offsets: Vec<u64> = run
                    .iter()
                    .filter_map(|a| match a.outcome {
                        PublishOutcome::Acked { offset, .. } => Some(offset),
                        _ => None,
                    })
                    .collect();
                format!("{} acked, offsets {}", run.len(), runs(&offsets))
            }
            PublishOutcome::Unavailable(body) => {
                format!("{} unavailable (503), first: {body}", run.len())
            }
            PublishOutcome::Failed(why) => format!("{} FAILED, first: {why}", run.len()),
        };
        out.push(format!(
            "n {}..={} ({:?}..{:?}): {line}",
            first.n, last.n, first.at, last.at
        ));
        i = j + 1;
    }
    format!(
        "{} attempts in {elapsed:?}:\n  {}",
        attempts.len(),
        out.join("\n  ")
    )
}
