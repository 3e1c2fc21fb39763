//! The state every real-time transport shares (WebSocket, SSE, HTTP streaming, long-poll,
//! uni-directional WebSocket, and the ones to come): settings, the node, the authenticator,
//! the backend proxy, the registry of sessions, the server's shutdown signal and token expiry.
//!
//! Also the one place connections are announced: [`RealtimeState::register`] registers a
//! connection after its connect and tells the node's lifecycle observers (`client.connected`),
//! and dropping the [`ClientRegistration`] it returns tells them it went.
//!
//! May touch: nothing but what it holds; transports read it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use herald_core::Node;
use herald_core::admission::Admission;
use herald_core::auth::Authenticator;
use herald_core::events::ClientEventKind;
use herald_core::proxy::BackendProxy;
use herald_core::publication::ClientInfo;
use herald_core::rate::KeyedLimiter;

use crate::budget::QueueBudget;
use crate::outbound::Outbound;
use crate::registry::{Control, Registration, Sessions};

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
    /// Bytes queued for all connections together before the ones holding the most are
    /// disconnected as slow; 0: no limit.
    pub max_total_queue_bytes: usize,
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

impl RealtimeConfig {
    /// Most bytes of publication data one subscription recovers: half the connection's
    /// queue, leaving room for the encoding and for live events behind it. More missed is
    /// answered "not recovered" (the client refetches state) instead of a reply that would
    /// close the connection as slow on every reconnect.
    pub fn max_recovery_bytes(&self) -> usize {
        self.max_queue_bytes / 2
    }
}

impl Default for RealtimeConfig {
    fn default() -> Self {
        Self {
            allow_anonymous: false,
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(8),
            max_queue_bytes: 1024 * 1024,
            max_total_queue_bytes: 0,
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
    /// Triggered when the server shuts down: every connection closes with 3001.
    pub shutdown: Shutdown,
    /// Connections by user, for the server API's disconnect and unsubscribe.
    pub sessions: Arc<Sessions>,
    /// Client publications per user (`publications_per_second_per_user`).
    pub publish_rate: KeyedLimiter<String>,
    /// The application's backend, when `[proxy]` is configured.
    pub proxy: Option<Arc<dyn BackendProxy>>,
    /// Bytes queued for all connections (`max_total_queue_bytes`).
    pub queue_budget: Arc<QueueBudget>,
    /// RPC methods Herald answers itself (`herald.*`: push devices, acknowledgements).
    pub client_methods: Option<Arc<dyn herald_core::client_methods::ClientMethods>>,
}

impl RealtimeState {
    pub fn new(node: Node, authenticator: Arc<dyn Authenticator>, config: RealtimeConfig) -> Self {
        Self {
            node,
            authenticator,
            connections: AtomicU64::new(0),
            shutdown: Shutdown::default(),
            sessions: Arc::new(Sessions::default()),
            publish_rate: KeyedLimiter::new(config.publications_per_second_per_user, 65_536),
            proxy: None,
            queue_budget: QueueBudget::new(config.max_total_queue_bytes),
            client_methods: None,
            config,
        }
    }

    /// Lets the application's backend decide connects, subscriptions, publications and rpc.
    pub fn with_proxy(mut self, proxy: Option<Arc<dyn BackendProxy>>) -> Self {
        self.proxy = proxy;
        self
    }

    pub fn with_client_methods(
        mut self,
        methods: Option<Arc<dyn herald_core::client_methods::ClientMethods>>,
    ) -> Self {
        self.client_methods = methods;
        self
    }

    /// A new connection's outbound queue, bounded by `max_queue_bytes` and counted against
    /// the process budget.
    pub fn new_outbound(&self) -> Arc<Outbound> {
        Outbound::with_budget(self.config.max_queue_bytes, &self.queue_budget)
    }

    /// The one admission path, as this server is configured (see
    /// [`herald_core::admission`]).
    pub fn admission(&self) -> Admission<'_> {
        Admission {
            node: &self.node,
            authenticator: &*self.authenticator,
            proxy: self.proxy.as_deref(),
        }
    }

    /// The request headers the backend proxy is configured to see (none without a proxy).
    pub fn proxy_headers(&self, headers: &axum::http::HeaderMap) -> Vec<(String, String)> {
        if self.proxy.is_none() {
            return Vec::new();
        }
        self.config
            .proxy_headers
            .iter()
            .filter_map(|name| {
                let value = headers.get(name.as_str())?.to_str().ok()?;
                Some((name.clone(), value.to_owned()))
            })
            .collect()
    }

    /// Tells every real-time connection to close with 3001 `shutdown`.
    pub fn shut_down(&self) {
        self.shutdown.trigger();
    }

    /// A connection is connected as `info` over `transport`: registers it (named users only,
    /// so the server API can reach it) and announces `client.connected`. Keep the result for
    /// the connection's life; dropping it unregisters and announces `client.disconnected`.
    /// `None` when there is nothing to hold (an anonymous client nobody listens for).
    pub fn register(
        &self,
        info: &Arc<ClientInfo>,
        transport: &'static str,
        control: Control,
    ) -> Option<Box<ClientRegistration>> {
        let registration = self.sessions.register(&info.user, &info.client, control);
        let announced = self.node.wants_client_events(ClientEventKind::Connected)
            || self.node.wants_client_events(ClientEventKind::Disconnected);
        if announced {
            self.node
                .client_event(ClientEventKind::Connected, None, info, transport);
        }
        if registration.is_none() && !announced {
            return None;
        }
        Some(Box::new(ClientRegistration {
            _registration: registration,
            announced: announced.then(|| (self.node.clone(), info.clone(), transport)),
        }))
    }
}

/// A connected client, as long as it is held (see [`RealtimeState::register`]).
pub struct ClientRegistration {
    _registration: Option<Registration>,
    announced: Option<(Node, Arc<ClientInfo>, &'static str)>,
}

impl Drop for ClientRegistration {
    fn drop(&mut self) {
        if let Some((node, info, transport)) = &self.announced {
            node.client_event(ClientEventKind::Disconnected, None, info, transport);
        }
    }
}

impl std::fmt::Debug for ClientRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientRegistration").finish_non_exhaustive()
    }
}

/// The server's shutdown, as every connection waits for it: a flag and a `Notify`, whose
/// wait is a small future (a `watch` receiver's is about twice the size, in every idle
/// connection).
#[derive(Debug, Default)]
pub struct Shutdown {
    triggered: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl Shutdown {
    pub fn trigger(&self) {
        self.triggered.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Resolves once the server starts shutting down.
    pub async fn wait(&self) {
        // Created before the flag is read: `notify_waiters` wakes a `Notified` from its
        // creation on, so a trigger in between is not missed.
        let notified = self.notify.notified();
        if self.triggered.load(Ordering::SeqCst) {
            return;
        }
        notified.await;
    }
}

/// The monotonic instant of a Unix time in seconds, given the monotonic `now` (`now` itself
/// if the time is past, so that a due deadline compares as due).
pub fn instant_of_unix(at: u64, now: std::time::Instant) -> std::time::Instant {
    let wait_ms = at
        .saturating_mul(1000)
        .saturating_sub(herald_core::time::now_ms());
    now + Duration::from_millis(wait_ms)
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
