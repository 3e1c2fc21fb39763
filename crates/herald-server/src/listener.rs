//! Accepting connections: the HTTP server loop (hyper, HTTP/1.1 and HTTP/2, upgrades) with the
//! limits that must act before any request is parsed — total and per-IP open connections,
//! new connections per second per IP, and a deadline for a request's headers (slowloris) —
//! and HTTP/2 keep-alive PINGs, which close a connection whose peer stopped answering.
//!
//! A refused connection gets a short HTTP error (`503` when the server is full, `429` with
//! `Retry-After` for one IP over its share) and is closed. An admitted connection carries its
//! [`Permit`] inside its socket wrapper, so it is counted for as long as the socket lives —
//! also after a WebSocket upgrade. Per-IP rate state is bounded in memory
//! ([`herald_core::rate`]).
//!
//! Behind trusted proxies (`server.trusted_proxies`, see [`crate::forwarded`]) the socket's
//! peer is the proxy, which carries many clients, and the client's address is only known once
//! a request's headers are read. So a trusted proxy's socket is exempt from the per-IP checks
//! at accept time (it still counts toward `max_connections`, the process's real limit), and
//! every request it carries is admitted per client by [`client_address`]: it takes one place in
//! the client's per-IP count for as long as it lasts — its response body, or the whole
//! upgraded connection for a WebSocket — and one token of the client's accept rate. Direct
//! and proxied connections of one client share the same count. Every request gets its
//! [`ClientAddr`] (and axum's `ConnectInfo<SocketAddr>` holding the client's address) as a
//! request extension, and runs in a `request` span naming the client.
//!
//! May touch: the listening socket and accepted sockets.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use herald_core::rate::KeyedLimiter;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;
use tracing::Instrument;

use crate::forwarded::ProxyTrust;

/// The limits, from `[server]` in config; 0 means no limit.
#[derive(Clone, Debug, Default)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// New connections per second one IP may open (burst: the same number).
    pub accepts_per_ip_per_second: u32,
    pub header_read_timeout: Duration,
    /// HTTP/2 keep-alive: a PING after this long without a frame from the peer, and the
    /// connection closed when it is not acknowledged within the second duration.
    pub http2_keepalive: Option<(Duration, Duration)>,
}

/// Most IPs whose accept rate is tracked (see [`KeyedLimiter`] for what happens beyond).
const MAX_TRACKED_IPS: usize = 65_536;

#[derive(Debug, Default)]
struct GateState {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Decides whether a new connection is admitted, and counts the admitted ones.
#[derive(Debug)]
pub struct Gate {
    limits: ConnectionLimits,
    state: Mutex<GateState>,
    accepts: KeyedLimiter<IpAddr>,
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    ServerFull,
    TooManyFromIp,
    TooFast,
}

impl Refusal {
    fn status(self) -> StatusCode {
        match self {
            Self::ServerFull => StatusCode::SERVICE_UNAVAILABLE,
            Self::TooManyFromIp | Self::TooFast => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    fn body(self) -> String {
        let detail = match self {
            Self::ServerFull => "the server is full",
            Self::TooManyFromIp => "too many connections from one IP",
            Self::TooFast => "new connections arrive too fast",
        };
        format!(
            "{{\"error\":{{\"code\":111,\"message\":\"too many requests\",\"detail\":\"{detail}\"}}}}"
        )
    }

    /// A complete HTTP/1.1 response: short enough to fit the socket buffer of a new socket.
    fn response(self) -> Vec<u8> {
        let status = self.status();
        let body = self.body();
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            status.as_str(),
            status.canonical_reason().unwrap_or_default(),
            body.len()
        )
        .into_bytes()
    }

    fn label(self) -> &'static str {
        match self {
            Self::ServerFull => "server_full",
            Self::TooManyFromIp => "per_ip",
            Self::TooFast => "accept_rate",
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (
            self.status(),
            [
                (axum::http::header::CONTENT_TYPE, "application/json"),
                (axum::http::header::RETRY_AFTER, "1"),
            ],
            self.body(),
        )
            .into_response()
    }
}

/// Held by an admitted connection (or a request through a trusted proxy); releases its place
/// when dropped.
#[derive(Debug)]
pub struct Permit {
    gate: Arc<Gate>,
    /// The address counted per IP, if any (a trusted proxy's socket is not).
    ip: Option<IpAddr>,
    /// Whether it counts toward `max_connections` (sockets do, proxied requests do not).
    total: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = self.gate.state.lock();
        if self.total {
            state.total = state.total.saturating_sub(1);
        }
        if let Some(ip) = self.ip
            && let Some(count) = state.per_ip.get_mut(&ip)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                state.per_ip.remove(&ip);
            }
        }
    }
}

impl Gate {
    pub fn new(limits: ConnectionLimits) -> Arc<Self> {
        Arc::new(Self {
            accepts: KeyedLimiter::new(limits.accepts_per_ip_per_second, MAX_TRACKED_IPS),
            limits,
            state: Mutex::new(GateState::default()),
        })
    }

    /// Admits a connection from `ip`, or says why not. A trusted proxy's connection is
    /// counted in the total only: its clients are admitted per request ([`Gate::admit_client`]).
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        trusted_proxy: bool,
        now: Instant,
    ) -> Result<Permit, Refusal> {
        let mut state = self.state.lock();
        if self.limits.max_connections > 0 && state.total >= self.limits.max_connections {
            return Err(Refusal::ServerFull);
        }
        if !trusted_proxy {
            self.take_ip(&mut state, ip, now)?;
        }
        state.total += 1;
        Ok(Permit {
            gate: self.clone(),
            ip: (!trusted_proxy).then_some(ip),
            total: true,
        })
    }

    /// Admits one request of the client at `ip` that came through a trusted proxy: the same
    /// per-IP count and accept rate as a direct connection, not the total.
    pub fn admit_client(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Permit, Refusal> {
        let mut state = self.state.lock();
        self.take_ip(&mut state, ip, now)?;
        Ok(Permit {
            gate: self.clone(),
            ip: Some(ip),
            total: false,
        })
    }

    /// Checks and takes one place and one accept token of `ip`.
    fn take_ip(&self, state: &mut GateState, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        let from_ip = state.per_ip.get(&ip).copied().unwrap_or(0);
        if self.limits.max_connections_per_ip > 0 && from_ip >= self.limits.max_connections_per_ip {
            return Err(Refusal::TooManyFromIp);
        }
        if !self.accepts.try_take(&ip, now) {
            return Err(Refusal::TooFast);
        }
        *state.per_ip.entry(ip).or_default() += 1;
        Ok(())
    }

    /// Open connections now (for metrics and tests).
    pub fn open(&self) -> usize {
        self.state.lock().total
    }
}

/// One accepted connection, as request handlers see it (a request extension).
#[derive(Debug)]
pub struct Connection {
    pub peer: SocketAddr,
    /// The peer is in `server.trusted_proxies`.
    pub via_trusted_proxy: bool,
    /// The client's place of an upgraded request through a trusted proxy (a WebSocket): the
    /// socket is the client's from then on, so the place lives as long as the socket.
    upgraded: Mutex<Option<Permit>>,
}

/// The client's address for one request: the TCP peer's, or — from a trusted proxy — the one
/// its forwarded header names (see [`crate::forwarded`]). A request extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr {
    pub ip: IpAddr,
    /// The TCP peer (the proxy, when there is one).
    pub peer: SocketAddr,
}

/// State of [`client_address`].
#[derive(Clone)]
pub struct ClientGate {
    gate: Arc<Gate>,
    trust: Arc<ProxyTrust>,
    on_refusal: Arc<dyn Fn(&'static str) + Send + Sync>,
}

/// Resolves every request's client address, and admits requests that came through a trusted
/// proxy under their client's per-IP limits (see the module header).
pub async fn client_address(
    State(clients): State<ClientGate>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(connection) = request.extensions().get::<Arc<Connection>>().cloned() else {
        return next.run(request).await;
    };
    let peer = connection.peer;
    let ip = clients.trust.client_ip(peer.ip(), request.headers());
    let port = if ip == peer.ip().to_canonical() {
        peer.port()
    } else {
        0
    };
    request.extensions_mut().insert(ClientAddr { ip, peer });
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::new(ip, port)));
    let span = tracing::info_span!("request", client = %ip);
    if !connection.via_trusted_proxy {
        return next.run(request).instrument(span).await;
    }
    let permit = match clients.gate.admit_client(ip, Instant::now()) {
        Ok(permit) => permit,
        Err(refusal) => {
            (clients.on_refusal)(refusal.label());
            tracing::debug!(client = %ip, %peer, reason = refusal.label(), "request refused");
            return refusal.into_response();
        }
    };
    let response = next.run(request).instrument(span).await;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        *connection.upgraded.lock() = Some(permit);
        response
    } else {
        // The place is held until the body ends: a stream (SSE, long-poll) keeps it.
        response.map(|body| {
            axum::body::Body::new(body.map_frame(move |frame| {
                let _held = &permit;
                frame
            }))
        })
    }
}

/// An accepted socket that holds its connection's [`Permit`].
pub struct CountedStream {
    inner: TcpStream,
    _permit: Permit,
    /// Only for a trusted proxy's socket, whose upgraded request holds its client's place
    /// here; a direct socket does not keep it (the bytes count in every idle connection).
    _connection: Option<Arc<Connection>>,
}

impl AsyncRead for CountedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts until `shutdown` resolves, then stops accepting and waits for in-flight HTTP
/// exchanges (upgraded connections are closed by the real-time shutdown instead).
pub async fn serve_connections(
    listener: TcpListener,
    app: Router,
    gate: Arc<Gate>,
    trust: Arc<ProxyTrust>,
    tls: Option<Arc<crate::tls::Tls>>,
    on_refusal: Arc<dyn Fn(&'static str) + Send + Sync>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let app = app.layer(axum::middleware::from_fn_with_state(
        ClientGate {
            gate: gate.clone(),
            trust: trust.clone(),
            on_refusal: on_refusal.clone(),
        },
        client_address,
    ));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(gate.limits.header_read_timeout);
    // A dead peer of a long HTTP/2 stream (gRPC, SSE over h2) is found by PINGs it no longer
    // answers; its streams end and their sessions are released.
    if let Some((interval, timeout)) = gate.limits.http2_keepalive {
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(interval)
            .keep_alive_timeout(timeout);
    }
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let trusted = trust.is_trusted(peer.ip());
        let permit = match gate.admit(peer.ip(), trusted, Instant::now()) {
            Ok(permit) => permit,
            Err(refusal) => {
                on_refusal(refusal.label());
                // Best effort, never waiting on the client: a fresh socket's buffer takes it.
                let _ = stream.try_write(&refusal.response());
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let connection = Arc::new(Connection {
            peer,
            via_trusted_proxy: trusted,
            upgraded: Mutex::new(None),
        });
        let service = TowerToHyperService::new(app.clone().map_request({
            let connection = connection.clone();
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(connection.clone());
                request
            }
        }));
        let counted = CountedStream {
            inner: stream,
            _permit: permit,
            _connection: trusted.then_some(connection),
        };
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let handshake_timeout = gate.limits.header_read_timeout;
        let acceptor = tls.as_ref().map(|tls| tls.acceptor());
        tokio::spawn(async move {
            let result = match acceptor {
                None => {
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(counted), service)
                        .into_owned();
                    watcher.watch(connection).await
                }
                Some(acceptor) => {
                    // The handshake gets the same deadline as a request's headers.
                    let handshake =
                        tokio::time::timeout(handshake_timeout, acceptor.accept(counted)).await;
                    let Ok(Ok(tls_stream)) = handshake else {
                        tracing::debug!(%peer, "TLS handshake failed or timed out");
                        return;
                    };
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(tls_stream), service)
                        .into_owned();
                    watcher.watch(connection).await
                }
            };
            if let Err(error) = result {
                tracing::trace!(error = %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[server] http2_keepalive_*` as the listener gets them.
    #[test]
    fn http2_keepalive_defaults_off_switch_and_zero_timeout() {
        use crate::config::{CliOverrides, Config};
        let limits = |text: &str| {
            let file = tempfile::Builder::new()
                .suffix(".toml")
                .tempfile()
                .expect("temp file");
            std::fs::write(file.path(), text).expect("write");
            Config::load(Some(file.path()), &CliOverrides::default())
                .map(|c| c.server.connection_limits().http2_keepalive)
        };
        let (s, ms) = (Duration::from_secs, Duration::from_millis);
        assert_eq!(limits("").expect("default"), Some((s(30), s(20))));
        let text = "[server]\nhttp2_keepalive_interval = \"500ms\"\nhttp2_keepalive_timeout = 1\n";
        assert_eq!(limits(text).expect("set"), Some((ms(500), s(1))));
        let off = limits("[server]\nhttp2_keepalive_interval = 0\n").expect("off");
        assert_eq!(off, None);
        let err = limits("[server]\nhttp2_keepalive_timeout = 0\n").expect_err("zero timeout");
        assert!(err.to_string().contains("http2_keepalive_timeout"), "{err}");
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn counts_per_ip_and_in_total_and_releases_on_drop() {
        let gate = Gate::new(ConnectionLimits {
            max_connections: 3,
            max_connections_per_ip: 2,
            ..Default::default()
        });
        let now = Instant::now();
        let a1 = gate.admit(ip(1), false, now).expect("first");
        let _a2 = gate.admit(ip(1), false, now).expect("second");
        assert_eq!(
            gate.admit(ip(1), false, now).err(),
            Some(Refusal::TooManyFromIp)
        );
        let _b1 = gate.admit(ip(2), false, now).expect("another IP");
        assert_eq!(
            gate.admit(ip(3), false, now).err(),
            Some(Refusal::ServerFull)
        );
        drop(a1);
        assert_eq!(gate.open(), 2);
        assert!(
            gate.admit(ip(1), false, now).is_ok(),
            "a place was released"
        );
    }

    #[test]
    fn accept_rate_refills_over_time() {
        let gate = Gate::new(ConnectionLimits {
            accepts_per_ip_per_second: 2,
            ..Default::default()
        });
        let start = Instant::now();
        let _held = [
            gate.admit(ip(1), false, start).expect("1"),
            gate.admit(ip(1), false, start).expect("2"),
        ];
        assert_eq!(
            gate.admit(ip(1), false, start).err(),
            Some(Refusal::TooFast)
        );
        assert!(gate.admit(ip(2), false, start).is_ok(), "per IP");
        let later = start + Duration::from_millis(600);
        assert!(
            gate.admit(ip(1), false, later).is_ok(),
            "refilled one token"
        );
        assert_eq!(
            gate.admit(ip(1), false, later).err(),
            Some(Refusal::TooFast)
        );
    }

    #[test]
    fn trusted_proxy_sockets_count_in_total_only_and_clients_per_request() {
        let gate = Gate::new(ConnectionLimits {
            max_connections: 3,
            max_connections_per_ip: 1,
            accepts_per_ip_per_second: 2,
            ..Default::default()
        });
        let now = Instant::now();
        let proxy = ip(2);
        let _sockets = [
            gate.admit(proxy, true, now).expect("1"),
            gate.admit(proxy, true, now)
                .expect("2, over the per-IP limit"),
        ];
        let client = ip(9);
        let request = gate.admit_client(client, now).expect("the client's first");
        assert_eq!(gate.open(), 2, "requests do not count as sockets");
        assert_eq!(
            gate.admit_client(client, now).err(),
            Some(Refusal::TooManyFromIp)
        );
        assert_eq!(
            gate.admit(client, false, now).err(),
            Some(Refusal::TooManyFromIp),
            "direct and proxied share the count"
        );
        drop(request);
        let _direct = gate.admit(client, false, now).expect("released");
        assert_eq!(
            gate.admit_client(client, now).err(),
            Some(Refusal::TooManyFromIp)
        );
        assert_eq!(
            gate.admit(proxy, true, now).err(),
            Some(Refusal::ServerFull)
        );
    }

    #[test]
    fn refusal_responses_have_correct_lengths() {
        for refusal in [
            Refusal::ServerFull,
            Refusal::TooManyFromIp,
            Refusal::TooFast,
        ] {
            let bytes = refusal.response();
            let text = std::str::from_utf8(&bytes).expect("utf-8");
            let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.parse().ok())
                .expect("content-length");
            assert_eq!(body.len(), length, "{head}");
            assert!(serde_json::from_str::<serde_json::Value>(body.trim()).is_ok());
        }
    }
}
