//! One WebSocket connection speaking the Centrifugo protocol (JSON or Protobuf, see
//! [`super::codec`]): connect, subscribe with
//! recovery, unsubscribe, publish, history, presence, presence_stats, refresh, rpc, send,
//! server pings with pong checks, and disconnects with the protocol's close codes.
//!
//! The connection has two halves: this reader task, which handles commands and owns the
//! subscriptions, and a writer task that drains the connection's [`Outbound`] queue and writes
//! everything queued in one frame (newline-separated JSON or back-to-back length-delimited
//! Protobuf, as the protocol allows).

mod backend;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::Uri;
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use herald_core::auth::{self, Action, Authenticator, Credentials, SubscriptionGrant};
use herald_core::hub::SubscriberId;
use herald_core::namespace::NamespaceOptions;
use herald_core::node::PublishRequest as NodePublish;
use herald_core::publication::{ClientInfo, StreamPosition};
use herald_core::store::HistoryQuery;
use herald_core::{ChannelName, ErrorCode, HeraldError, Node};

use super::codec::{Encoding, JSON_SUBPROTOCOL, PROTOBUF_SUBPROTOCOL, PushEncoder};
use super::protocol::{
    self, Command, ResultBody, SubscribeRequest, SubscribeResult, WirePublication,
};
use crate::outbound::{ChannelSink, CloseReason, EventEncoder, Frame, Outbound};
use crate::registry::{Control, ControlMessage, Inbox, Registration, Sessions};
use herald_core::proxy::BackendProxy;
use herald_core::rate::{KeyedLimiter, TokenBucket};

/// Real-time settings shared by every connection (`[client]` in config).
#[derive(Clone, Debug)]
pub struct RealtimeConfig {
    /// Connections without a token are allowed (as anonymous users).
    pub allow_anonymous: bool,
    /// How often the server pings; 0 disables pings.
    pub ping_interval: Duration,
    /// How long after a ping the client's pong may take.
    pub pong_timeout: Duration,
    /// Bytes queued for one connection before it is disconnected as slow.
    pub max_queue_bytes: usize,
    /// Largest accepted incoming WebSocket message.
    pub max_message_size: usize,
    /// Most publications one subscribe may recover; more means "not recovered".
    pub recovery_max_publications: usize,
    /// Most channels one connection may subscribe to.
    pub max_subscriptions: usize,
    /// Time a client has to send its connect command.
    pub connect_timeout: Duration,
    /// How long after its token's `exp` a bidirectional connection that did not `refresh` is
    /// closed with 3005.
    pub expired_close_delay: Duration,
    /// Commands per second one WebSocket connection may send (bursts of the same size);
    /// 0: no limit. Over it, a command gets error 111.
    pub commands_per_second: u32,
    /// Client publications per second per user (anonymous: per connection); 0: no limit.
    pub publications_per_second_per_user: u32,
    /// Request headers (lowercase names) passed to the backend proxy.
    pub proxy_headers: Vec<String>,
}

impl Default for RealtimeConfig {
    fn default() -> Self {
        Self {
            allow_anonymous: false,
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(8),
            max_queue_bytes: 1024 * 1024,
            max_message_size: 64 * 1024,
            recovery_max_publications: 1000,
            max_subscriptions: 1024,
            connect_timeout: Duration::from_secs(10),
            expired_close_delay: Duration::from_secs(25),
            commands_per_second: 0,
            publications_per_second_per_user: 0,
            proxy_headers: Vec::new(),
        }
    }
}

/// Shared by every real-time connection.
pub struct RealtimeState {
    pub node: Node,
    pub authenticator: Arc<dyn Authenticator>,
    pub config: RealtimeConfig,
    /// Open real-time connections (the `herald_connections` gauge).
    pub connections: AtomicU64,
    /// Flips to true when the server shuts down: every connection closes with 3001.
    pub closing: tokio::sync::watch::Sender<bool>,
    /// Connections by user, for the server API's disconnect and unsubscribe.
    pub sessions: Arc<Sessions>,
    /// Client publications per user (`publications_per_second_per_user`).
    pub publish_rate: KeyedLimiter<String>,
    /// The application's backend, when `[proxy]` is configured.
    pub proxy: Option<Arc<dyn BackendProxy>>,
}

impl RealtimeState {
    pub fn new(node: Node, authenticator: Arc<dyn Authenticator>, config: RealtimeConfig) -> Self {
        Self {
            node,
            authenticator,
            connections: AtomicU64::new(0),
            closing: tokio::sync::watch::channel(false).0,
            sessions: Arc::new(Sessions::default()),
            publish_rate: KeyedLimiter::new(config.publications_per_second_per_user, 65_536),
            proxy: None,
            config,
        }
    }

    /// Lets the application's backend decide connects, subscriptions, publications and rpc.
    pub fn with_proxy(mut self, proxy: Option<Arc<dyn BackendProxy>>) -> Self {
        self.proxy = proxy;
        self
    }

    /// Tells every real-time connection to close with 3001 `shutdown`.
    pub fn shut_down(&self) {
        self.closing.send_replace(true);
    }
}

/// Resolves once the server starts shutting down.
pub async fn shutdown_signal(mut closing: tokio::sync::watch::Receiver<bool>) {
    let _ = closing.wait_for(|closing| *closing).await;
}

/// Resolves when credentials expire (never for tokens without `exp`).
pub async fn expiry(expires_at: Option<u64>) {
    match expires_at {
        Some(at) => {
            let now = herald_core::time::now_ms() / 1000;
            tokio::time::sleep(Duration::from_secs(at.saturating_sub(now))).await;
        }
        None => std::future::pending().await,
    }
}

impl std::fmt::Debug for RealtimeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealtimeState")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// `GET /connection/websocket`. The subprotocol `centrifuge-protobuf` (echoed back) or
/// `?format=protobuf` selects the Protobuf encoding; JSON otherwise.
pub async fn websocket_handler(
    ws: WebSocketUpgrade,
    uri: Uri,
    headers: axum::http::HeaderMap,
    State(state): State<Arc<RealtimeState>>,
) -> Response {
    // Only the headers the backend proxy is configured to see are kept.
    let proxy_headers: Vec<(String, String)> = if state.proxy.is_some() {
        state
            .config
            .proxy_headers
            .iter()
            .filter_map(|name| {
                let value = headers.get(name.as_str())?.to_str().ok()?;
                Some((name.clone(), value.to_owned()))
            })
            .collect()
    } else {
        Vec::new()
    };
    let max = state.config.max_message_size;
    let ws = ws.protocols([PROTOBUF_SUBPROTOCOL, JSON_SUBPROTOCOL]);
    let subprotocol = ws.selected_protocol().and_then(|p| p.to_str().ok());
    let encoding = Encoding::negotiate(subprotocol, uri.query());
    // Small buffers: the defaults (128 KiB each way) would dominate per-connection memory.
    // 512 B: clients send little, and the buffer lives as long as the connection (larger
    // messages still arrive, in more reads).
    ws.read_buffer_size(512)
        .write_buffer_size(0)
        .max_write_buffer_size(state.config.max_queue_bytes.max(64 * 1024))
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| run_connection(socket, state, encoding, proxy_headers))
}

/// Subscribe flag: the SDK prefers error 112 to `recovered: false`.
const FLAG_REJECT_UNRECOVERED: u64 = 2;

struct Subscription {
    name: ChannelName,
    options: Arc<NamespaceOptions>,
    id: SubscriberId,
    /// Who the client is on this channel: the connection's info, plus `chan_info` from a
    /// subscription token.
    info: Option<Arc<ClientInfo>>,
    /// When the subscription token expires (Unix seconds), if one granted it.
    expires_at: Option<u64>,
}

/// Unsubscribe code for a subscription the server API ended; below 2500 the SDKs do not
/// subscribe again.
const UNSUBSCRIBE_BY_SERVER: (u32, &str) = (2000, "server unsubscribe");

/// Unsubscribe code for a subscription whose token expired without `sub_refresh`; from
/// 2500 the SDKs subscribe again (fetching a new token).
const UNSUBSCRIBE_EXPIRED: (u32, &str) = (2501, "subscription expired");

struct Session {
    state: Arc<RealtimeState>,
    encoding: Encoding,
    outbound: Arc<Outbound>,
    client_id: String,
    credentials: Option<Credentials>,
    info: Option<Arc<ClientInfo>>,
    subscriptions: HashMap<Arc<str>, Subscription>,
    pong_deadline: Option<Instant>,
    /// Handed to the registry at connect, so the server API can reach this connection.
    control: Option<Arc<Inbox>>,
    registration: Option<Registration>,
    /// `commands_per_second`, when set.
    command_rate: Option<TokenBucket>,
    /// Headers of the upgrade request for the backend proxy.
    proxy_headers: Vec<(String, String)>,
    /// The backend granted the connection with an expiry: refresh through it.
    refresh_via_backend: bool,
}

async fn run_connection(
    socket: WebSocket,
    state: Arc<RealtimeState>,
    encoding: Encoding,
    proxy_headers: Vec<(String, String)>,
) {
    state.connections.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut stream) = socket.split();
    let outbound = Outbound::new(state.config.max_queue_bytes);
    let writer_queue = outbound.clone();
    let writer = tokio::spawn(async move {
        let mut frames = Vec::new();
        loop {
            frames.clear();
            match writer_queue.drain(&mut frames).await {
                Ok(()) => {
                    let sent = sink.send(encoding.message(&frames)).await;
                    // Do not keep a burst's capacity for the rest of an idle connection's life.
                    if frames.capacity() > 64 {
                        frames = Vec::new();
                    }
                    if sent.is_err() {
                        writer_queue.close(CloseReason::WRITE_ERROR);
                        return;
                    }
                }
                Err(reason) => {
                    let frame = CloseFrame {
                        code: reason.code,
                        reason: Utf8Bytes::from_static(reason.reason),
                    };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    let _ = sink.close().await;
                    return;
                }
            }
        }
    });
    let mut session = Session {
        state: state.clone(),
        encoding,
        outbound: outbound.clone(),
        client_id: uuid::Uuid::new_v4().to_string(),
        credentials: None,
        info: None,
        subscriptions: HashMap::new(),
        pong_deadline: None,
        control: None,
        registration: None,
        proxy_headers,
        refresh_via_backend: false,
        command_rate: (state.config.commands_per_second > 0)
            .then(|| TokenBucket::new(state.config.commands_per_second, std::time::Instant::now())),
    };
    session.read_loop(&mut stream).await;
    Box::pin(session.cleanup()).await;
    // Give the writer a moment to flush the close frame, then stop it.
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    state.connections.fetch_sub(1, Ordering::Relaxed);
}

impl Session {
    async fn read_loop(&mut self, stream: &mut futures::stream::SplitStream<WebSocket>) {
        let config = self.state.config.clone();
        let connect_deadline = Instant::now() + config.connect_timeout;
        let ping_every = if config.ping_interval.is_zero() {
            Duration::from_secs(3600)
        } else {
            config.ping_interval
        };
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        loop {
            if self.outbound.closed().is_some() {
                return;
            }
            let inbox = self.control.clone();
            let tick_at = if self.credentials.is_none() {
                Some(connect_deadline)
            } else {
                self.pong_deadline
            };
            let deadline = tick_at.map(tokio::time::Instant::from_std);
            // SDKs send `refresh` exactly `ttl` seconds after connect, so a connection is only
            // closed a grace period after its token expires (as the reference server does).
            // Backend-granted connections are refreshed through the backend at expiry itself.
            let grace = if self.refresh_via_backend {
                0
            } else {
                config.expired_close_delay.as_secs()
            };
            let expires_at = self
                .credentials
                .as_ref()
                .and_then(|c| c.expires_at)
                .map(|at| at.saturating_add(grace));
            // The same grace for subscription tokens: the SDKs send `sub_refresh` at `ttl`.
            let sub_expires_at = self
                .subscriptions
                .values()
                .filter_map(|s| s.expires_at)
                .min()
                .map(|at| at.saturating_add(config.expired_close_delay.as_secs()));
            tokio::select! {
                _ = shutdown_signal(self.state.closing.subscribe()) => {
                    self.outbound.close(CloseReason::SHUTDOWN);
                    return;
                }
                _ = expiry(expires_at), if expires_at.is_some() => {
                    if self.refresh_via_backend && Box::pin(self.refresh_via_backend()).await {
                        continue;
                    }
                    self.outbound.close(CloseReason::EXPIRED);
                    return;
                }
                _ = expiry(sub_expires_at), if sub_expires_at.is_some() => {
                    Box::pin(self.unsubscribe_expired()).await;
                }
                message = next_control(inbox.as_deref()) => match message {
                    ControlMessage::Unsubscribe { channel } => {
                        if let Ok((name, _)) = self.state.node.resolve(&channel)
                            && self.subscriptions.contains_key(name.as_str())
                        {
                            Box::pin(self.unsubscribe(name.as_str())).await;
                            let (code, reason) = UNSUBSCRIBE_BY_SERVER;
                            self.outbound.push(self.encoding.unsubscribe_push(name.as_str(), code, reason));
                        }
                    }
                },
                message = stream.next() => match message {
                    Some(Ok(Message::Text(text))) => {
                        let commands = self.encoding.decode_text(text.as_str());
                        // Boxed: the commands' futures are large, and stored inline they would
                        // make every idle connection's task as large as the largest of them.
                        if let Err(reason) = Box::pin(self.handle_commands(commands)).await {
                            self.outbound.close(reason);
                            return;
                        }
                    }
                    Some(Ok(Message::Binary(bytes))) => {
                        let commands = self.encoding.decode_binary(&bytes);
                        if let Err(reason) = Box::pin(self.handle_commands(commands)).await {
                            self.outbound.close(reason);
                            return;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => return,
                    Some(Ok(_)) => {}
                    Some(Err(err)) => {
                        let reason = if err.to_string().contains("too long") || err.to_string().contains("Space limit") {
                            CloseReason::MESSAGE_SIZE_LIMIT
                        } else {
                            CloseReason::BAD_REQUEST
                        };
                        self.outbound.close(reason);
                        return;
                    }
                },
                _ = ping.tick(), if self.credentials.is_some() && !config.ping_interval.is_zero() => {
                    self.outbound.push(self.encoding.ping());
                    if self.pong_deadline.is_none() {
                        self.pong_deadline = Some(Instant::now() + config.pong_timeout);
                    }
                }
                _ = sleep_until(deadline) => {
                    let reason = if self.credentials.is_none() { CloseReason::BAD_REQUEST } else { CloseReason::NO_PONG };
                    self.outbound.close(reason);
                    return;
                }
            }
        }
    }

    /// A frame that does not decode (wrong frame type for the encoding, bad JSON or
    /// Protobuf) closes the connection as a bad request, after nothing in it was applied.
    async fn handle_commands(
        &mut self,
        commands: Result<Vec<Command>, super::codec::Malformed>,
    ) -> Result<(), CloseReason> {
        let commands = commands.map_err(|_| CloseReason::BAD_REQUEST)?;
        for command in commands {
            self.handle_command(command).await?;
        }
        Ok(())
    }

    fn reply_err(&self, id: u32, error: &HeraldError) {
        self.outbound.push(self.encoding.error(id, error));
    }

    fn reply(&self, id: u32, body: ResultBody<'_>) {
        self.outbound.push(self.encoding.reply(id, &body));
    }

    /// The reply for `outcome`: its result, or its error.
    fn reply_with<T>(
        &self,
        id: u32,
        outcome: Result<T, HeraldError>,
        body: impl for<'r> FnOnce(&'r T) -> ResultBody<'r>,
    ) {
        match outcome {
            Ok(result) => self.reply(id, body(&result)),
            Err(error) => self.reply_err(id, &error),
        }
    }

    async fn handle_command(&mut self, command: Command) -> Result<(), CloseReason> {
        let id = command.id;
        if let Some(connect) = command.connect {
            return self.connect(id, connect).await;
        }
        if self.credentials.is_none() {
            // Anything but connect before connect is a protocol violation.
            return Err(CloseReason::BAD_REQUEST);
        }
        if id == 0 {
            // An empty command is the client's pong (and the only command without an id).
            self.pong_deadline = None;
            return Ok(());
        }
        if let Some(rate) = self.command_rate.as_mut()
            && !rate.try_take(Instant::now())
        {
            self.reply_err(
                id,
                &HeraldError::new(ErrorCode::TooManyRequests, "commands_per_second"),
            );
            return Ok(());
        }
        if let Some(request) = command.subscribe {
            if let Err(error) = self.subscribe(id, request).await {
                self.reply_err(id, &error);
            }
        } else if let Some(request) = command.unsubscribe {
            self.unsubscribe(&request.channel).await;
            self.reply(id, ResultBody::Unsubscribe);
        } else if let Some(request) = command.publish {
            if self.publish_goes_to_backend(&request.channel) {
                self.publish_via_backend(id, request).await;
            } else {
                let outcome = self.publish(request).await;
                self.reply_with(id, outcome, |()| ResultBody::Publish);
            }
        } else if let Some(request) = command.history {
            let outcome = self.history(request).await;
            self.reply_with(id, outcome, |r| ResultBody::History(r));
        } else if let Some(request) = command.presence {
            let outcome = match self.subscribed_for(&request.channel, Action::Presence) {
                Ok(name) => self.state.node.presence(name.as_str()).await,
                Err(error) => Err(error),
            }
            .map(|presence| protocol::PresenceResult { presence });
            self.reply_with(id, outcome, |r| ResultBody::Presence(r));
        } else if let Some(request) = command.presence_stats {
            let outcome = match self.subscribed_for(&request.channel, Action::Presence) {
                Ok(name) => self.state.node.presence_stats(name.as_str()).await,
                Err(error) => Err(error),
            }
            .map(|stats| protocol::PresenceStatsResult {
                num_clients: stats.num_clients,
                num_users: stats.num_users,
            });
            self.reply_with(id, outcome, |r| ResultBody::PresenceStats(r));
        } else if let Some(request) = command.refresh {
            match self.state.authenticator.authenticate(&request.token).await {
                Ok(credentials) if credentials.user == self.user() => {
                    let result = self.refresh_result(&credentials);
                    self.credentials = Some(credentials);
                    self.reply(id, ResultBody::Refresh(&result));
                }
                Ok(_) => return Err(CloseReason::INVALID_TOKEN),
                Err(error) if error.code == ErrorCode::TokenExpired => self.reply_err(id, &error),
                Err(_) => return Err(CloseReason::INVALID_TOKEN),
            }
        } else if let Some(request) = command.rpc {
            if self.state.proxy.as_ref().is_some_and(|p| p.handles_rpc()) {
                self.rpc_via_backend(id, request).await;
            } else {
                self.reply_err(
                    id,
                    &HeraldError::new(ErrorCode::NotAvailable, "no RPC backend is configured"),
                );
            }
        } else if let Some(request) = command.sub_refresh {
            let outcome = self.sub_refresh(request).await;
            self.reply_with(id, outcome, |r| ResultBody::SubRefresh(r));
        } else if command.send.is_some() || command.ping.is_some() {
            // Async messages have no reply and nowhere to go without an RPC backend.
        } else {
            self.reply_err(
                id,
                &HeraldError::new(ErrorCode::MethodNotFound, "unknown command"),
            );
        }
        Ok(())
    }

    fn user(&self) -> &str {
        self.credentials.as_ref().map_or("", |c| c.user.as_str())
    }

    fn refresh_result(&self, credentials: &Credentials) -> protocol::RefreshResult {
        let (expires, ttl) = ttl_of(credentials);
        protocol::RefreshResult {
            client: self.client_id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            expires,
            ttl,
        }
    }

    async fn connect(
        &mut self,
        id: u32,
        request: protocol::ConnectRequest,
    ) -> Result<(), CloseReason> {
        if self.credentials.is_some() {
            return Err(CloseReason::BAD_REQUEST);
        }
        let proxy_connect = self
            .state
            .proxy
            .as_ref()
            .is_some_and(|p| p.handles_connect());
        let mut connect_data = None;
        let credentials = if request.token.is_empty() && proxy_connect {
            match self.connect_via_backend(id, &request).await {
                Some((credentials, data)) => {
                    connect_data = data;
                    credentials
                }
                // Refused: the reply (or close) is queued; the client may try again.
                None => return Ok(()),
            }
        } else if request.token.is_empty() {
            if !self.state.config.allow_anonymous {
                self.reply_err(
                    id,
                    &HeraldError::new(ErrorCode::Unauthorized, "a connection token is required"),
                );
                return Err(CloseReason::INVALID_TOKEN);
            }
            Credentials::anonymous()
        } else {
            match self.state.authenticator.authenticate(&request.token).await {
                Ok(credentials) => credentials,
                Err(error) if error.code == ErrorCode::TokenExpired => {
                    // The SDK refreshes its token and reconnects on this error.
                    self.reply_err(id, &error);
                    return Ok(());
                }
                Err(_) => return Err(CloseReason::INVALID_TOKEN),
            }
        };
        let (expires, ttl) = ttl_of(&credentials);
        self.info = Some(Arc::new(ClientInfo {
            client: self.client_id.clone(),
            user: credentials.user.clone(),
            conn_info: credentials.info.clone(),
            chan_info: None,
        }));
        let server_side = credentials.channels.clone();
        // Only named users can be reached by the server API: anonymous connections get no
        // inbox (and no registry entry).
        if !credentials.is_anonymous() {
            let inbox = Arc::new(Inbox::default());
            self.registration = self.state.sessions.register(
                &credentials.user,
                &self.client_id,
                Control::new(self.outbound.clone(), Some(inbox.clone())),
            );
            self.control = Some(inbox);
        }
        self.credentials = Some(credentials);
        let config = &self.state.config;
        let mut result = protocol::ConnectResult {
            client: self.client_id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            expires,
            ttl,
            ping: u32::try_from(config.ping_interval.as_secs()).unwrap_or(u32::MAX),
            pong: !config.ping_interval.is_zero(),
            data: connect_data,
            ..Default::default()
        };
        // Server-side subscriptions from the token, answered inside the connect reply.
        let mut held = Vec::new();
        for channel in server_side {
            let recover = request.subs.get(&channel);
            let sub = SubscribeRequest {
                channel: channel.clone(),
                recover: recover.is_some_and(|r| r.recover),
                offset: recover.map_or(0, |r| r.offset),
                epoch: recover.map(|r| r.epoch.clone()).unwrap_or_default(),
                ..Default::default()
            };
            match self.prepare_subscription(&sub, None).await {
                Ok((name, sub_result, last)) => {
                    result.subs.insert(channel, sub_result);
                    held.push((name, last));
                }
                Err(error) => {
                    tracing::debug!(channel, error = %error, "server-side subscription refused");
                }
            }
        }
        // The connect reply carries every server-side subscription's recovered publications;
        // each channel's held live events follow it.
        let mut reply = Some(self.encoding.reply(id, &ResultBody::Connect(&result)));
        for (name, last) in held {
            let encoder = self.encoder_for(&name);
            let replies = reply.take().map(Frame::from).into_iter().collect();
            self.outbound
                .finish_recovery(name.as_arc(), replies, last, &*encoder);
        }
        if let Some(reply) = reply {
            self.outbound.push(reply);
        }
        Ok(())
    }

    fn encoder_for(&self, name: &ChannelName) -> Arc<dyn EventEncoder> {
        let join_leave = self
            .subscriptions
            .get(name.as_str())
            .is_some_and(|s| s.options.join_leave);
        Arc::new(PushEncoder {
            encoding: self.encoding,
            join_leave,
        })
    }

    /// Checks, registers and recovers a subscription; the caller queues the reply with
    /// [`Outbound::finish_recovery`] so that held live events follow it.
    async fn prepare_subscription(
        &mut self,
        request: &SubscribeRequest,
        granted: Option<SubscriptionGrant>,
    ) -> Result<(ChannelName, SubscribeResult, u64), HeraldError> {
        if request.channel.is_empty() {
            return Err(HeraldError::bad_request("channel is required"));
        }
        let (name, options) = self.state.node.resolve(&request.channel)?;
        // A subscription token grants the channel by itself; otherwise the namespace rules.
        let grant = if granted.is_some() {
            granted
        } else if request.token.is_empty() {
            auth::check(
                self.credentials(),
                &name,
                &options,
                Action::Subscribe,
                false,
            )?;
            None
        } else {
            Some(
                self.verify_subscription_token(&request.token, &name)
                    .await?,
            )
        };
        if self.subscriptions.contains_key(name.as_str()) {
            return Err(HeraldError::new(ErrorCode::AlreadySubscribed, ""));
        }
        if self.subscriptions.len() >= self.state.config.max_subscriptions {
            return Err(HeraldError::new(
                ErrorCode::LimitExceeded,
                "too many subscriptions on this connection",
            ));
        }
        let channel = name.as_arc().clone();
        self.outbound.begin_recovery(&channel);
        let sink = Arc::new(ChannelSink {
            channel: channel.clone(),
            outbound: self.outbound.clone(),
            encoder: Arc::new(PushEncoder {
                encoding: self.encoding,
                join_leave: options.join_leave,
            }),
            conflate: options.conflate,
        });
        let id = match self.state.node.subscribe(&name, sink).await {
            Ok(id) => id,
            Err(error) => {
                self.outbound.forget(&channel);
                return Err(error);
            }
        };
        let info = match (&self.info, grant.as_ref().and_then(|g| g.info.clone())) {
            (Some(info), Some(chan_info)) => Some(Arc::new(ClientInfo {
                chan_info: Some(chan_info),
                ..(**info).clone()
            })),
            (info, _) => info.clone(),
        };
        let expires_at = grant.as_ref().and_then(|g| g.expires_at);
        self.subscriptions.insert(
            channel.clone(),
            Subscription {
                name: name.clone(),
                options: options.clone(),
                id,
                info: info.clone(),
                expires_at,
            },
        );
        let mut result = SubscribeResult::default();
        if let Some(at) = expires_at {
            result.expires = true;
            result.ttl = ttl_until(at);
        }
        let mut last = 0;
        if options.history_enabled() {
            result.recoverable = true;
            result.positioned = true;
            let outcome = if request.recover {
                result.was_recovering = true;
                let since = StreamPosition::new(request.offset, request.epoch.clone());
                self.state
                    .node
                    .recover(
                        name.as_str(),
                        &since,
                        self.state.config.recovery_max_publications,
                    )
                    .await
            } else {
                let query = HistoryQuery {
                    limit: Some(0),
                    ..HistoryQuery::default()
                };
                self.state
                    .node
                    .history(name.as_str(), query)
                    .await
                    .map(|page| herald_core::node::Recovery {
                        publications: Vec::new(),
                        position: page.position,
                        recovered: false,
                    })
            };
            let recovery = match outcome {
                Ok(recovery) => recovery,
                Err(error) => {
                    self.unsubscribe(&channel).await;
                    return Err(error);
                }
            };
            if request.recover && !recovery.recovered && request.flag & FLAG_REJECT_UNRECOVERED != 0
            {
                self.unsubscribe(&channel).await;
                return Err(HeraldError::new(ErrorCode::UnrecoverablePosition, ""));
            }
            result.recovered = request.recover && recovery.recovered;
            result.epoch = recovery.position.epoch.clone();
            result.offset = recovery.position.offset;
            last = recovery.position.offset;
            result.publications = recovery
                .publications
                .iter()
                .map(WirePublication::from)
                .collect();
        }
        if let Some(info) = info {
            self.state.node.join(&name, &options, info).await;
        }
        Ok((name, result, last))
    }

    async fn subscribe(&mut self, id: u32, request: SubscribeRequest) -> Result<(), HeraldError> {
        // Namespaces with `proxy_subscribe` ask the backend (unless a subscription token
        // grants the channel); a refusal's reply is already queued.
        let mut granted = None;
        if request.token.is_empty()
            && self
                .state
                .proxy
                .as_ref()
                .is_some_and(|p| p.handles_subscribe())
            && let Ok((name, options)) = self.state.node.resolve(&request.channel)
            && options.proxy_subscribe
        {
            match self
                .subscribe_via_backend(id, &name, request.data.as_ref())
                .await
            {
                Some(grant) => granted = Some(grant),
                None => return Ok(()),
            }
        }
        let (name, result, last) = self.prepare_subscription(&request, granted).await?;
        let encoder = self.encoder_for(&name);
        self.outbound.finish_recovery(
            name.as_arc(),
            vec![
                self.encoding
                    .reply(id, &ResultBody::Subscribe(&result))
                    .into(),
            ],
            last,
            &*encoder,
        );
        Ok(())
    }

    async fn unsubscribe(&mut self, channel: &str) {
        if let Some(sub) = self.subscriptions.remove(channel) {
            self.state.node.unsubscribe(sub.name.as_str(), sub.id).await;
            self.outbound.forget(channel);
            if let Some(info) = sub.info {
                self.state.node.leave(&sub.name, &sub.options, info).await;
            }
        }
    }

    /// Verifies a subscription token for `name`: the connection's user, this channel.
    async fn verify_subscription_token(
        &self,
        token: &str,
        name: &ChannelName,
    ) -> Result<SubscriptionGrant, HeraldError> {
        let grant = self
            .state
            .authenticator
            .authenticate_subscription(token)
            .await?;
        if grant.user != self.user() || grant.channel != name.as_str() {
            return Err(HeraldError::new(
                ErrorCode::PermissionDenied,
                "the subscription token is for another user or channel",
            ));
        }
        Ok(grant)
    }

    /// A new subscription token for a subscribed channel extends the subscription.
    async fn sub_refresh(
        &mut self,
        request: protocol::SubRefreshRequest,
    ) -> Result<protocol::SubRefreshResult, HeraldError> {
        let (name, _) = self.state.node.resolve(&request.channel)?;
        if !self.subscriptions.contains_key(name.as_str()) {
            return Err(HeraldError::new(
                ErrorCode::PermissionDenied,
                "not subscribed to this channel",
            ));
        }
        let grant = self
            .verify_subscription_token(&request.token, &name)
            .await?;
        if let Some(sub) = self.subscriptions.get_mut(name.as_str()) {
            sub.expires_at = grant.expires_at;
        }
        Ok(match grant.expires_at {
            Some(at) => protocol::SubRefreshResult {
                expires: true,
                ttl: ttl_until(at),
            },
            None => protocol::SubRefreshResult::default(),
        })
    }

    /// Unsubscribes (and tells the client, with 2501) every subscription whose token expired
    /// more than the grace period ago without a `sub_refresh`.
    async fn unsubscribe_expired(&mut self) {
        let now = herald_core::time::now_ms() / 1000;
        let grace = self.state.config.expired_close_delay.as_secs();
        let expired: Vec<Arc<str>> = self
            .subscriptions
            .iter()
            .filter(|(_, s)| {
                s.expires_at
                    .is_some_and(|at| at.saturating_add(grace) <= now)
            })
            .map(|(channel, _)| channel.clone())
            .collect();
        for channel in expired {
            self.unsubscribe(&channel).await;
            let (code, reason) = UNSUBSCRIBE_EXPIRED;
            self.outbound
                .push(self.encoding.unsubscribe_push(&channel, code, reason));
        }
    }

    fn subscribed_for(&self, channel: &str, action: Action) -> Result<ChannelName, HeraldError> {
        let (name, options) = self.state.node.resolve(channel)?;
        let subscribed = self.subscriptions.contains_key(name.as_str());
        auth::check(self.credentials(), &name, &options, action, subscribed)?;
        Ok(name)
    }

    /// Whether the channel's namespace leaves client publications to the backend.
    fn publish_goes_to_backend(&self, channel: &str) -> bool {
        self.state
            .proxy
            .as_ref()
            .is_some_and(|p| p.handles_publish())
            && self
                .state
                .node
                .resolve(channel)
                .is_ok_and(|(_, options)| options.proxy_publish)
    }

    async fn publish(&mut self, request: protocol::PublishRequest) -> Result<(), HeraldError> {
        self.take_publish_token()?;
        let (name, options) = self.state.node.resolve(&request.channel)?;
        auth::check(
            self.credentials(),
            &name,
            &options,
            Action::Publish,
            self.subscriptions.contains_key(name.as_str()),
        )?;
        self.publish_as_client(&name, request.data, false).await
    }

    /// `publications_per_second_per_user`: per user, or per connection when anonymous.
    fn take_publish_token(&self) -> Result<(), HeraldError> {
        let who = if self.user().is_empty() {
            self.client_id.as_str()
        } else {
            self.user()
        };
        if self.state.publish_rate.try_take(who, Instant::now()) {
            Ok(())
        } else {
            Err(HeraldError::new(
                ErrorCode::TooManyRequests,
                "publications_per_second_per_user",
            ))
        }
    }

    /// Publishes as this client, with its info on the channel (`chan_info` included when a
    /// subscription token or the backend gave one).
    async fn publish_as_client(
        &self,
        name: &ChannelName,
        data: herald_core::Payload,
        skip_history: bool,
    ) -> Result<(), HeraldError> {
        let mut publish = NodePublish::new(name.as_str(), data);
        publish.skip_history = skip_history;
        publish.info = match self.subscriptions.get(name.as_str()) {
            Some(sub) => sub.info.clone(),
            None => self.info.clone(),
        };
        self.state.node.publish(publish).await.map(|_| ())
    }

    /// The connection's credentials (anonymous before `connect`, when no command but
    /// `connect` is accepted anyway).
    fn credentials(&self) -> &Credentials {
        static ANONYMOUS: std::sync::LazyLock<Credentials> =
            std::sync::LazyLock::new(Credentials::anonymous);
        self.credentials.as_ref().unwrap_or(&ANONYMOUS)
    }

    async fn history(
        &mut self,
        request: protocol::HistoryRequest,
    ) -> Result<protocol::HistoryResult, HeraldError> {
        let name = self.subscribed_for(&request.channel, Action::History)?;
        let limit = match usize::try_from(request.limit) {
            Ok(n) => Some(n.min(self.state.config.recovery_max_publications)),
            Err(_) => Some(self.state.config.recovery_max_publications),
        };
        let query = HistoryQuery {
            since: request.since,
            limit,
            reverse: request.reverse,
        };
        let page = self.state.node.history(name.as_str(), query).await?;
        Ok(protocol::HistoryResult {
            publications: page
                .publications
                .iter()
                .map(WirePublication::from)
                .collect(),
            epoch: page.position.epoch,
            offset: page.position.offset,
        })
    }

    async fn cleanup(&mut self) {
        let channels: Vec<Arc<str>> = self.subscriptions.keys().cloned().collect();
        for channel in channels {
            self.unsubscribe(&channel).await;
        }
    }
}

fn ttl_of(credentials: &Credentials) -> (bool, u32) {
    match credentials.expires_at {
        Some(at) => (true, ttl_until(at)),
        None => (false, 0),
    }
}

/// Seconds from now until `at` (Unix seconds), for `ttl` fields.
fn ttl_until(at: u64) -> u32 {
    let now = herald_core::time::now_ms() / 1000;
    u32::try_from(at.saturating_sub(now)).unwrap_or(u32::MAX)
}

/// The next message for this connection from the server API; never, without an inbox.
async fn next_control(inbox: Option<&Inbox>) -> ControlMessage {
    match inbox {
        Some(inbox) => inbox.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
