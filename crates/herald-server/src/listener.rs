//! Accepting connections: the HTTP server loop (hyper, HTTP/1.1 and HTTP/2, upgrades) with the
//! limits that must act before any request is parsed — total and per-IP open connections,
//! new connections per second per IP, and a deadline for a request's headers (slowloris).
//!
//! A refused connection gets a short HTTP error (`503` when the server is full, `429` with
//! `Retry-After` for one IP over its share) and is closed. An admitted connection carries its
//! [`Permit`] inside its socket wrapper, so it is counted for as long as the socket lives —
//! also after a WebSocket upgrade. Per-IP rate state is bounded in memory
//! ([`herald_core::rate`]).
//!
//! May touch: the listening socket and accepted sockets.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use herald_core::rate::KeyedLimiter;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// The limits, from `[server]` in config; 0 means no limit.
#[derive(Clone, Debug, Default)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// New connections per second one IP may open (burst: the same number).
    pub accepts_per_ip_per_second: u32,
    pub header_read_timeout: Duration,
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
    /// A complete HTTP/1.1 response: short enough to fit the socket buffer of a new socket.
    fn response(self) -> Vec<u8> {
        let (status, detail) = match self {
            Self::ServerFull => ("503 Service Unavailable", "the server is full"),
            Self::TooManyFromIp => ("429 Too Many Requests", "too many connections from one IP"),
            Self::TooFast => ("429 Too Many Requests", "new connections arrive too fast"),
        };
        let body = format!(
            "{{\"error\":{{\"code\":111,\"message\":\"too many requests\",\"detail\":\"{detail}\"}}}}"
        );
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
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

/// Held by an admitted connection; releases its place when dropped.
#[derive(Debug)]
pub struct Permit {
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = self.gate.state.lock();
        state.total = state.total.saturating_sub(1);
        if let Some(count) = state.per_ip.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                state.per_ip.remove(&self.ip);
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

    /// Admits a connection from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Permit, Refusal> {
        let limits = &self.limits;
        let mut state = self.state.lock();
        if limits.max_connections > 0 && state.total >= limits.max_connections {
            return Err(Refusal::ServerFull);
        }
        let from_ip = state.per_ip.get(&ip).copied().unwrap_or(0);
        if limits.max_connections_per_ip > 0 && from_ip >= limits.max_connections_per_ip {
            return Err(Refusal::TooManyFromIp);
        }
        if !self.accepts.try_take(&ip, now) {
            return Err(Refusal::TooFast);
        }
        state.total += 1;
        *state.per_ip.entry(ip).or_default() += 1;
        Ok(Permit {
            gate: self.clone(),
            ip,
        })
    }

    /// Open connections now (for metrics and tests).
    pub fn open(&self) -> usize {
        self.state.lock().total
    }
}

/// An accepted socket that holds its connection's [`Permit`].
pub struct CountedStream {
    inner: TcpStream,
    _permit: Permit,
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
    tls: Option<Arc<crate::tls::Tls>>,
    on_refusal: impl Fn(&'static str) + Send + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(gate.limits.header_read_timeout);
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
        let permit = match gate.admit(peer.ip(), Instant::now()) {
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
        let counted = CountedStream {
            inner: stream,
            _permit: permit,
        };
        let service = TowerToHyperService::new(app.clone());
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
        let a1 = gate.admit(ip(1), now).expect("first");
        let _a2 = gate.admit(ip(1), now).expect("second");
        assert_eq!(gate.admit(ip(1), now).err(), Some(Refusal::TooManyFromIp));
        let _b1 = gate.admit(ip(2), now).expect("another IP");
        assert_eq!(gate.admit(ip(3), now).err(), Some(Refusal::ServerFull));
        drop(a1);
        assert_eq!(gate.open(), 2);
        assert!(gate.admit(ip(1), now).is_ok(), "a place was released");
    }

    #[test]
    fn accept_rate_refills_over_time() {
        let gate = Gate::new(ConnectionLimits {
            accepts_per_ip_per_second: 2,
            ..Default::default()
        });
        let start = Instant::now();
        let _held = [
            gate.admit(ip(1), start).expect("1"),
            gate.admit(ip(1), start).expect("2"),
        ];
        assert_eq!(gate.admit(ip(1), start).err(), Some(Refusal::TooFast));
        assert!(gate.admit(ip(2), start).is_ok(), "per IP");
        let later = start + Duration::from_millis(600);
        assert!(gate.admit(ip(1), later).is_ok(), "refilled one token");
        assert_eq!(gate.admit(ip(1), later).err(), Some(Refusal::TooFast));
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
