//! One connection speaking the Centrifugo protocol (JSON or Protobuf, see [`super::codec`])
//! over a WebSocket or any other [`FrameIo`] (the gRPC bidirectional stream): connect, subscribe with recovery, unsubscribe, publish, history,
//! presence, presence_stats, refresh, rpc, send, server pings with pong checks, and
//! disconnects with the protocol's close codes.
//!
//! A connection is one task and one future (idle connections are what a server holds most
//! of, so their size is the server's memory): [`Session::drive`] reads and handles commands,
//! owns the subscriptions, and polls the [`writer`] that writes the connection's [`Outbound`]
//! queue, next to one timer for every deadline. Command handling lives in `commands`, the
//! backend proxy glue in `backend`, the seam to what carries the messages in `frames`.
//!
//! May touch: the connection's [`FrameIo`], the node (subscribe, publish, history, presence), the
//! authenticator, the registry of sessions and the backend proxy.

mod backend;
mod commands;
mod frames;
mod writer;

pub use frames::{FrameIo, Incoming, WriteFailed, WsFrames};

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::Uri;
use axum::response::Response;
use herald_core::ChannelName;
use herald_core::auth::Credentials;
use herald_core::hub::SubscriberId;
use herald_core::namespace::NamespaceOptions;
use herald_core::publication::ClientInfo;

use self::writer::{PongDeadline, SocketWriter, WriteEnd};
use super::codec::{Encoding, JSON_SUBPROTOCOL, PROTOBUF_SUBPROTOCOL};
use crate::chanmap::ChannelMap;
use crate::outbound::{CloseReason, Outbound};
use crate::realtime::ClientRegistration;
use crate::realtime::RealtimeState;
use crate::registry::{ControlMessage, Inbox};
use herald_core::rate::TokenBucket;

/// `GET /connection/websocket`. The subprotocol `centrifuge-protobuf` (echoed back) or
/// `?format=protobuf` selects the Protobuf encoding; JSON otherwise.
pub async fn websocket_handler(
    ws: WebSocketUpgrade,
    uri: Uri,
    headers: axum::http::HeaderMap,
    State(state): State<Arc<RealtimeState>>,
) -> Response {
    // Only the headers the backend proxy is configured to see are kept.
    let proxy_headers = state.proxy_headers(&headers);
    let max = state.config.max_message_size;
    let ws = ws.protocols([PROTOBUF_SUBPROTOCOL, JSON_SUBPROTOCOL]);
    let subprotocol = ws.selected_protocol().and_then(|p| p.to_str().ok());
    let encoding = Encoding::negotiate(subprotocol, uri.query());
    // Small buffers: the defaults (128 KiB each way) would dominate per-connection memory.
    // 256 B: clients send little (a pong is 2 bytes), and the buffer lives as long as the
    // connection (larger messages still arrive, in more reads).
    ws.read_buffer_size(256)
        .write_buffer_size(0)
        .max_write_buffer_size(state.config.max_queue_bytes.max(64 * 1024))
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            let frames = WsFrames { socket, encoding };
            run_session(frames, state, encoding, proxy_headers, "websocket")
        })
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
    /// The transport's name for the backend proxy and the registry (`websocket`, `grpc`).
    transport: &'static str,
    outbound: Arc<Outbound>,
    client_id: String,
    credentials: Option<Credentials>,
    info: Option<Arc<ClientInfo>>,
    subscriptions: ChannelMap<Subscription>,
    /// Set by a pong command; the connection's loop tells the writer.
    pong_received: bool,
    /// Handed to the registry at connect, so the server API can reach this connection.
    control: Option<Arc<Inbox>>,
    /// Boxed, like the rate below: most connections have neither (anonymous, no limit).
    registration: Option<Box<ClientRegistration>>,
    /// `commands_per_second`, when set.
    command_rate: Option<Box<TokenBucket>>,
    /// Headers of the upgrade request for the backend proxy.
    proxy_headers: Vec<(String, String)>,
    /// The backend granted the connection with an expiry: refresh through it.
    refresh_via_backend: bool,
}

/// Runs one connection to its end: the session over `socket` (a WebSocket, a gRPC stream),
/// speaking `encoding`, named `transport` to the backend proxy and the registry.
///
/// Not an `async fn`: its parameters would be moved into locals, keeping a second copy of the
/// socket's space in every connection's future. The `async move` block uses the captured
/// socket in place.
#[allow(clippy::manual_async_fn)]
pub fn run_session<F: FrameIo>(
    mut socket: F,
    state: Arc<RealtimeState>,
    encoding: Encoding,
    proxy_headers: Vec<(String, String)>,
    transport: &'static str,
) -> impl Future<Output = ()> + Send {
    async move {
        state.connections.fetch_add(1, Ordering::Relaxed);
        let outbound = state.new_outbound();
        let mut session = Session {
            state: state.clone(),
            encoding,
            transport,
            outbound: outbound.clone(),
            client_id: uuid::Uuid::new_v4().to_string(),
            credentials: None,
            info: None,
            subscriptions: ChannelMap::new(),
            pong_received: false,
            control: None,
            registration: None,
            proxy_headers,
            refresh_via_backend: false,
            command_rate: (state.config.commands_per_second > 0).then(|| {
                Box::new(TokenBucket::new(
                    state.config.commands_per_second,
                    Instant::now(),
                ))
            }),
        };
        let mut writer = SocketWriter::new();
        let reason = session.drive(&mut socket, &mut writer).await;
        // Stops deliveries into the queue; a reason set earlier (with replies to flush) wins.
        outbound.close(reason);
        Box::pin(session.cleanup()).await;
        // Write what is still queued and the close frame, within bounds. (A queue closed as
        // slow was emptied; what its socket still holds is one taken slice at most.)
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            writer.finish(&mut socket, &outbound),
        )
        .await;
        state.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What woke the connection's loop.
enum Wake {
    Written(WriteEnd),
    Shutdown,
    Control(ControlMessage),
    Timer,
    Read(Incoming),
}

/// Runs `work` (a command, a backend call) while the socket keeps writing what is queued,
/// so replies and deliveries do not wait for it. Reads wait: commands apply in order.
async fn while_writing<T, F: FrameIo>(
    work: Pin<Box<dyn Future<Output = T> + Send + '_>>,
    writer: &mut SocketWriter,
    socket: &mut F,
    outbound: &Outbound,
) -> T {
    let mut work = work;
    std::future::poll_fn(|cx| {
        // An ended write side is picked up by the connection's loop afterwards.
        let _ = writer.poll_write(cx, socket, outbound);
        work.as_mut().poll(cx)
    })
    .await
}

impl Session {
    /// The connection's one loop: reads commands, writes the queue, sends pings and checks
    /// pongs, and enforces the connect, token and subscription deadlines, on one timer.
    /// Returns why the connection ends.
    async fn drive<F: FrameIo>(
        &mut self,
        socket: &mut F,
        writer: &mut SocketWriter,
    ) -> CloseReason {
        let state = self.state.clone();
        let config = &state.config;
        let outbound = self.outbound.clone();
        let pings = !config.ping_interval.is_zero();
        let connect_deadline = Instant::now() + config.connect_timeout;
        let mut next_ping = Instant::now() + first_ping(config.ping_interval, &self.client_id);
        let mut timer = pin!(tokio::time::sleep_until(connect_deadline.into()));
        let mut shutdown = pin!(state.shutdown.wait());
        loop {
            if let Some(reason) = outbound.closed() {
                return reason;
            }
            if std::mem::take(&mut self.pong_received) {
                writer.pong_received();
            }
            // Deadlines: whatever is due now is handled, the earliest other one sets the timer.
            let now = Instant::now();
            let mut next = now + Duration::from_secs(3600);
            if self.credentials.is_none() {
                if now >= connect_deadline {
                    return CloseReason::BAD_REQUEST;
                }
                next = next.min(connect_deadline);
            } else {
                if pings {
                    if now >= next_ping {
                        outbound.push(self.encoding.ping());
                        writer.ping_queued(now);
                        next_ping = now + config.ping_interval;
                    }
                    next = next.min(next_ping);
                }
                match writer.pong_deadline(
                    config.pong_timeout,
                    config.ping_interval + config.pong_timeout,
                ) {
                    Some(PongDeadline::Pong(at)) if now >= at => return CloseReason::NO_PONG,
                    Some(PongDeadline::Stalled(at)) if now >= at => return CloseReason::SLOW,
                    Some(deadline) => next = next.min(deadline.at()),
                    None => {}
                }
                if let Some(at) = self.connection_expiry(now) {
                    if at <= now {
                        if !self.refresh_via_backend {
                            return CloseReason::EXPIRED;
                        }
                        let work = Box::pin(self.refresh_via_backend());
                        if !while_writing(work, writer, socket, &outbound).await {
                            return CloseReason::EXPIRED;
                        }
                        continue;
                    }
                    next = next.min(at);
                }
                if let Some(at) = self.subscription_expiry(now) {
                    if at <= now {
                        let work = Box::pin(self.unsubscribe_expired());
                        while_writing(work, writer, socket, &outbound).await;
                        continue;
                    }
                    next = next.min(at);
                }
            }
            let next = tokio::time::Instant::from_std(next);
            // Re-armed only when it must fire sooner (or has fired): moving the timer wheel
            // entry on every message would cost a timer-driver lock each time. A timer left
            // earlier than needed just wakes the loop once to recompute.
            if timer.is_elapsed() || next < timer.deadline() {
                timer.as_mut().reset(next);
            }
            let inbox = self.control.as_deref();
            let wake = std::future::poll_fn(|cx| {
                if let Poll::Ready(end) = writer.poll_write(cx, socket, &outbound) {
                    return Poll::Ready(Wake::Written(end));
                }
                if shutdown.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Shutdown);
                }
                if let Some(Poll::Ready(message)) = inbox.map(|inbox| inbox.poll_next(cx)) {
                    return Poll::Ready(Wake::Control(message));
                }
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Timer);
                }
                socket.poll_read(cx).map(Wake::Read)
            })
            .await;
            match wake {
                Wake::Written(WriteEnd::Closed(reason)) => return reason,
                Wake::Written(WriteEnd::Failed) => return CloseReason::WRITE_ERROR,
                Wake::Shutdown => return CloseReason::SHUTDOWN,
                Wake::Timer => {}
                Wake::Control(ControlMessage::Unsubscribe { channel }) => {
                    if let Ok((name, _)) = self.state.node.resolve(&channel)
                        && self.subscriptions.contains_key(name.as_str())
                    {
                        let work = Box::pin(self.unsubscribe(name.as_str()));
                        while_writing(work, writer, socket, &outbound).await;
                        let (code, reason) = UNSUBSCRIBE_BY_SERVER;
                        outbound.push(self.encoding.unsubscribe_push(name.as_str(), code, reason));
                    }
                }
                Wake::Read(message) => {
                    writer.flush_soon();
                    let commands = match message {
                        Incoming::Commands(commands) => commands,
                        Incoming::Nothing => continue,
                        Incoming::Closed => return CloseReason::CONNECTION_CLOSED,
                        Incoming::Refused(reason) => return reason,
                    };
                    // Boxed: the commands' futures are large, and stored inline they would
                    // make every idle connection's task as large as the largest of them.
                    let work = Box::pin(self.handle_commands(commands));
                    if let Err(reason) = while_writing(work, writer, socket, &outbound).await {
                        return reason;
                    }
                }
            }
        }
    }

    /// When the connection's token runs out. SDKs send `refresh` exactly `ttl` seconds after
    /// connect, so a connection is only closed a grace period after its token expires (as
    /// the reference server does); backend-granted connections are refreshed through the
    /// backend at expiry itself.
    fn connection_expiry(&self, now: Instant) -> Option<Instant> {
        let grace = if self.refresh_via_backend {
            0
        } else {
            self.state.config.expired_close_delay.as_secs()
        };
        let at = self.credentials.as_ref()?.expires_at?;
        Some(crate::realtime::instant_of_unix(
            at.saturating_add(grace),
            now,
        ))
    }

    /// When the first subscription token runs out, with the same grace: the SDKs send
    /// `sub_refresh` at `ttl`.
    fn subscription_expiry(&self, now: Instant) -> Option<Instant> {
        let grace = self.state.config.expired_close_delay.as_secs();
        let at = self
            .subscriptions
            .values()
            .filter_map(|s| s.expires_at)
            .min()?;
        Some(crate::realtime::instant_of_unix(
            at.saturating_add(grace),
            now,
        ))
    }
}

/// When a connection sends its first ping: somewhere in the second half of `ping_interval`,
/// picked from the client id. Clients that connected together (after a restart, a deploy, a
/// network blip) would otherwise be pinged together for as long as they stay, and every
/// round of thousands of pings and pongs at once delays the publications queued behind it.
fn first_ping(ping_interval: Duration, client_id: &str) -> Duration {
    use std::hash::BuildHasher;
    let spread = std::hash::RandomState::new().hash_one(client_id) % 1000;
    ping_interval / 2 + ping_interval.mul_f64(spread as f64 / 2000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_pings_spread_over_the_second_half_of_the_interval() {
        let interval = Duration::from_secs(20);
        let firsts: Vec<Duration> = (0..200)
            .map(|i| first_ping(interval, &format!("client-{i}")))
            .collect();
        assert!(firsts.iter().all(|d| *d >= interval / 2 && *d <= interval));
        let early = firsts.iter().filter(|d| **d < interval * 3 / 4).count();
        assert!(
            (40..=160).contains(&early),
            "spread, not all at once: {early} of 200 in the first quarter"
        );
    }
}
