//! One MQTT connection: CONNECT and authentication, then one task that reads packets, runs
//! them, and writes replies and deliveries.
//!
//! A connection is one task and one future (idle connections are what a server holds most
//! of, so their size is its memory): `Session::drive` is one `poll_fn` over the socket (read
//! and write sides, never split), the connection's [`Outbound`] queue, the server API's
//! inbox, the shutdown signal and one timer for every deadline (keep-alive, token expiry,
//! the session's next save). Bytes are read through a scratch buffer on the stack and kept
//! only while they are a partial packet; nothing is buffered while idle. A packet runs to
//! its end before the next is read (a QoS 1 publish is acknowledged once `Node::publish`
//! returned, so acknowledgements keep the publishes' order). Deliveries are taken from the
//! queue only when the previous take is written and, for QoS 1/2, while the inflight window
//! has room: a client that does not acknowledge leaves its publications in the queue, whose
//! byte bound closes it as slow (guarantee 5) — memory never grows past the queue's bound
//! and one take.
//!
//! The CONNECT is in `connect`, PUBLISH in `publish`, deliveries written to the client in
//! `deliver`, SUBSCRIBE/UNSUBSCRIBE and session resumption in `subscribe`, a persistent
//! session's progress and saves in `progress`, the will in `will`.
//!
//! May touch: the socket it is handed, the node and admission through [`MqttState`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use herald_core::admission::Refusal;
use herald_core::auth::Credentials;
use herald_core::channel::ChannelName;
use herald_core::hub::{PrefixHold, SubscriberId};
use herald_core::namespace::NamespaceOptions;
use herald_core::proxy::ProxyContext;
use herald_core::publication::ClientInfo;
use herald_core::{ErrorCode, HeraldError};
use parking_lot::RwLock;
use std::future::Future;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::codec::{self, Ack, ConnAckProperties, Connect, DecodeError, Level, Packet, reason};
use super::delivery::{MqttEncoder, Table};
use super::persist::{self, Positions};
use super::topic::Filter;
use super::{MqttState, TAKEN_OVER};
use crate::chanmap::ChannelMap;
use crate::outbound::{CloseReason, Frame, Outbound};
use crate::registry::{ControlMessage, Inbox};
use crate::subscription::end_subscription;

mod connect;
mod deliver;
mod progress;
mod publish;
mod subscribe;
mod will;

use will::WillPublisher;

/// Bytes read at once, into the stack: the connection's read buffer keeps only a partial
/// packet, so an idle connection holds none.
const READ_SCRATCH: usize = 4096;
/// Replies and deliveries buffered for the socket before reading pauses (a client that
/// sends without reading cannot grow this).
const MAX_WRITE_BUFFER: usize = 64 * 1024;
/// Bytes taken from the outbound queue at once.
const MAX_TAKE: usize = 64 * 1024;
/// How long the last packets (a DISCONNECT with its reason) may take to write.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves one MQTT connection on `stream` until it ends.
///
/// Not an `async fn`: its parameters would be moved into locals, keeping a second copy of the
/// socket's space in every connection's future. The `async move` block uses the captured
/// stream in place (so it is never rebound: `let mut stream = stream` would be that second
/// copy). The stream is never split: one future polls both its sides.
#[allow(clippy::manual_async_fn)]
pub fn run_connection<S>(mut stream: S, state: Arc<MqttState>) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    async move {
        // The CONNECT and its answer run in their own boxed future: what they hold (the
        // decoded CONNECT, the match over it) would otherwise keep its space in every
        // connection's task for the connection's life.
        let Some(mut session) = Box::pin(handshake(&mut stream, state)).await else {
            return;
        };
        let close = session.drive(&mut stream).await;
        Box::pin(session.close(&mut stream, &close)).await;
        Box::pin(session.end(close.will)).await;
    }
}

/// Reads the CONNECT and answers it: the session, or `None` when the connection ends here
/// (its refusal written).
async fn handshake<S>(stream: &mut S, state: Arc<MqttState>) -> Option<Session>
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let mut in_buf = BytesMut::new();
    let connect = tokio::time::timeout(
        state.realtime.config.connect_timeout,
        read_connect(stream, &mut in_buf, state.config.max_packet_size),
    )
    .await;
    let (level, connect) = match connect {
        Ok(Ok(Some(connect))) => connect,
        Ok(Ok(None)) => return None,
        Ok(Err(DecodeError::UnsupportedLevel(level))) => {
            // MQTT-3.1.2-2: CONNACK 0x01 (the 3.1.1 form every level can read), then close.
            tracing::debug!(level, "mqtt: unsupported protocol level");
            let mut out = BytesMut::new();
            codec::connack(
                &mut out,
                Level::V311,
                false,
                reason::UNSUPPORTED_PROTOCOL_VERSION,
                &ConnAckProperties::default(),
            );
            write_last(stream, &out).await;
            return None;
        }
        Ok(Err(error)) => {
            tracing::debug!(%error, "mqtt: bad CONNECT; closing");
            return None;
        }
        Err(_) => {
            tracing::debug!("mqtt: no CONNECT within the connect timeout; closing");
            return None;
        }
    };
    let mut out = BytesMut::new();
    let Some(mut session) =
        Box::pin(Session::connect(state, level, connect, in_buf, &mut out)).await
    else {
        write_last(stream, &out).await;
        return None;
    };
    session.out_buf = out;
    Some(session)
}

/// Writes the last bytes of a connection refused before its session started, within bounds.
async fn write_last<S: AsyncWrite + Unpin>(stream: &mut S, out: &[u8]) {
    let _ = Box::pin(tokio::time::timeout(CLOSE_TIMEOUT, stream.write_all(out))).await;
}

async fn read_connect<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    max_packet_size: usize,
) -> Result<Option<(Level, Connect)>, DecodeError> {
    loop {
        if let Some(connect) = codec::decode_connect(buf, max_packet_size)? {
            return Ok(Some(connect));
        }
        match std::future::poll_fn(|cx| poll_read_into(reader, cx, buf)).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// Reads what the socket has into `buf` through a scratch buffer on the stack.
fn poll_read_into<S: AsyncRead + Unpin>(
    stream: &mut S,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<std::io::Result<usize>> {
    let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); READ_SCRATCH];
    let mut read = ReadBuf::uninit(&mut scratch);
    ready!(Pin::new(stream).poll_read(cx, &mut read))?;
    buf.extend_from_slice(read.filled());
    Poll::Ready(Ok(read.filled().len()))
}

/// What woke the connection's loop.
enum Wake {
    Shutdown,
    Timer,
    Written(std::io::Result<usize>),
    Taken(Result<VecDeque<Frame>, CloseReason>),
    Control(ControlMessage),
    Read(std::io::Result<usize>),
}

/// Why the connection ends: an MQTT 5 reason with its text, and whether the will is sent.
#[derive(Clone, Debug)]
struct Close {
    code: u8,
    reason: String,
    /// Write a DISCONNECT (MQTT 5 only; not when the client ended it).
    send_disconnect: bool,
    /// Publish the will: every end but a client's DISCONNECT with reason 0.
    will: bool,
}

impl Close {
    fn new(code: u8, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            send_disconnect: true,
            will: true,
        }
    }

    /// The client went: its socket closed or failed (the will is published).
    fn by_client() -> Self {
        Self {
            code: reason::SUCCESS,
            reason: String::new(),
            send_disconnect: false,
            will: true,
        }
    }

    /// The client sent DISCONNECT: the will is published only for MQTT 5's reason 0x04.
    fn disconnected(reason: u8) -> Self {
        Self {
            will: reason == 0x04,
            ..Self::by_client()
        }
    }

    /// The MQTT form of a queue's close reason.
    fn from_queue(close: CloseReason) -> Self {
        let code = match close {
            CloseReason::SHUTDOWN => reason::SERVER_SHUTTING_DOWN,
            CloseReason::SLOW => reason::QUOTA_EXCEEDED,
            CloseReason::EXPIRED => reason::MAXIMUM_CONNECT_TIME,
            // By code: a server API disconnect may carry its own reason text.
            _ if close.code == CloseReason::FORCE_DISCONNECT.code => reason::ADMINISTRATIVE_ACTION,
            TAKEN_OVER => reason::SESSION_TAKEN_OVER,
            CloseReason::CONNECTION_CLOSED => return Self::by_client(),
            _ => reason::UNSPECIFIED,
        };
        Self::new(code, close.reason)
    }
}

/// A delivery awaiting the client's acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Awaiting {
    /// QoS 1: PUBACK.
    Ack,
    /// QoS 2: PUBREC.
    Rec,
    /// QoS 2, PUBREL sent: PUBCOMP.
    Comp,
}

/// What follows the SUBACK for a granted exact topic.
struct GrantedExact {
    channel: Arc<str>,
    /// For a new subscription: the offset its held live publications continue after.
    last_offset: Option<u64>,
    /// What precedes the live publications: the retained publication, or those a resumed
    /// session missed.
    replies: Vec<Frame>,
    /// Whether a resumed session's position was recovered (`None`: nothing to recover).
    recovered: Option<bool>,
}

/// A publication's place: its channel and offset.
type ChannelOffset = (Arc<str>, u64);

/// A delivery awaiting acknowledgement, and what it delivered.
struct InFlight {
    stage: Awaiting,
    channel: Arc<str>,
    offset: u64,
}

/// An exact-topic subscription.
struct ExactSub {
    name: ChannelName,
    options: Arc<NamespaceOptions>,
    id: SubscriberId,
    info: Arc<ClientInfo>,
}

struct Session {
    state: Arc<MqttState>,
    level: Level,
    /// `None` for an anonymous connection with nothing else in its credentials (most
    /// idle connections of some deployments), see [`Session::credentials`].
    credentials: Option<Box<Credentials>>,
    info: Arc<ClientInfo>,
    mqtt_client_id: Box<str>,
    connection: u64,
    outbound: Arc<Outbound>,
    /// The shared encoder of the connection's protocol level, or its own where MQTT 5
    /// no-local needs the connection's client id and table.
    encoder: Arc<MqttEncoder>,
    table: Arc<RwLock<Table>>,
    exact: ChannelMap<ExactSub>,
    /// The hub's pattern subscription of the wildcard filters (boxed: most connections
    /// have none).
    wildcards: Option<Box<Wildcards>>,
    /// QoS 1 and 2 packet ids in use (`None` while there are none).
    acks: Option<Box<Acks>>,
    next_pkid: u16,
    receive_maximum: u16,
    client_max_packet: u32,
    /// Frames taken from the queue, waiting for inflight room.
    pending: VecDeque<Frame>,
    in_buf: BytesMut,
    out_buf: BytesMut,
    keep_alive: Option<Duration>,
    last_packet: Instant,
    /// Boxed: most connections set none.
    will: Option<Box<codec::Will>>,
    /// Set for a persistent session (boxed: most connections are clean).
    persistence: Option<Box<Persistence>>,
    _registration: Option<Box<crate::realtime::ClientRegistration>>,
    /// Handed to the registry at connect, so the server API can reach this connection
    /// (none for anonymous connections, which the registry does not list).
    control: Option<Arc<Inbox>>,
    /// The client's MQTT 5 topic aliases (boxed: most clients set none, and an empty
    /// `HashMap` inline would cost every connection 48 bytes rather than 8).
    #[allow(clippy::box_collection)]
    topic_aliases: Option<Box<HashMap<u16, String>>>,
    /// Retained publications queued for SUBSCRIBEs, by (channel, offset): written with
    /// RETAIN, while live ones keep it only for retain-as-published (boxed: usually none).
    #[allow(clippy::box_collection)]
    retained_replies: Option<Box<HashSet<ChannelOffset>>>,
    /// Topic aliases given to the client's topics (MQTT 5 clients that accept some).
    out_aliases: Option<Box<OutAliases>>,
}

/// A connection's wildcard subscriptions as the hub and the cluster hold them.
#[derive(Default)]
struct Wildcards {
    pattern: Option<SubscriberId>,
    /// What each wildcard filter needs this node to receive from the cluster
    /// ([`herald_core::Node::want_prefix`]); released with the filter.
    prefix_holds: Vec<(Filter, PrefixHold)>,
}

/// The packet ids a connection has in use: made on the first QoS 1 or 2 packet and dropped
/// once none is left, so a QoS 0 connection, or an idle one, keeps none.
#[derive(Default)]
struct Acks {
    /// Deliveries awaiting the client's acknowledgement.
    inflight: HashMap<u16, InFlight>,
    /// QoS 2 publishes of the client that were published, awaiting PUBREL.
    awaiting_rel: HashSet<u16>,
}

/// The topic aliases of the server's PUBLISHes to one client.
struct OutAliases {
    /// The client's Topic Alias Maximum.
    maximum: u16,
    by_channel: HashMap<Arc<str>, u16>,
}

/// A persistent session's store and progress.
struct Persistence {
    store: Arc<dyn herald_core::webhook_store::WebhookStore>,
    key: String,
    /// Kept this long after the connection ends; 0: removed then.
    expiry_secs: u32,
    positions: Positions,
    last_save: Instant,
}

/// The credentials of an anonymous connection that were not kept ([`Session::credentials`]).
static ANONYMOUS: Credentials = Credentials {
    user: String::new(),
    expires_at: None,
    info: None,
    channels: Vec::new(),
};

/// Saves at most this often while positions move.
const SAVE_INTERVAL: Duration = Duration::from_secs(1);

impl Session {
    /// The connection's one loop: reads and runs packets, writes replies and deliveries,
    /// takes frames from the queue, runs the server API's requests, and keeps the
    /// keep-alive, token and session-save deadlines on one timer. Returns why it ends.
    async fn drive<S>(&mut self, stream: &mut S) -> Close
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // Packets that arrived with the CONNECT.
        if let Err(close) = Box::pin(self.handle_buffered()).await {
            return close;
        }
        self.release_read_buffer();
        let state = self.state.clone();
        let mut timer = pin!(tokio::time::sleep(Duration::from_secs(3600)));
        let mut shutdown = pin!(state.realtime.shutdown.wait());
        loop {
            self.fill_writes();
            // Deadlines: whatever is due now ends the loop or runs, the earliest other one
            // sets the timer.
            let now = Instant::now();
            let mut next = now + Duration::from_secs(3600);
            // Computed again each time rather than kept: the loop's state is in every idle
            // connection.
            let token_expiry = self
                .credentials()
                .expires_at
                .map(|at| crate::realtime::instant_of_unix(at, now));
            if let Some(at) = token_expiry {
                if at <= now {
                    return Close::new(
                        reason::MAXIMUM_CONNECT_TIME,
                        "the connection token expired",
                    );
                }
                next = next.min(at);
            }
            if let Some(interval) = self.keep_alive {
                let at = self.last_packet + interval;
                if at <= now {
                    return Close::new(
                        reason::KEEP_ALIVE_TIMEOUT,
                        "no packet within 1.5 times the keep-alive",
                    );
                }
                next = next.min(at);
            }
            if let Some(at) = self.next_save() {
                if at <= now {
                    Box::pin(self.save_session()).await;
                    continue;
                }
                next = next.min(at);
            }
            let next = tokio::time::Instant::from_std(next);
            // Re-armed only when it must fire sooner (or has fired): a packet moves the
            // keep-alive deadline later, and a timer left earlier than needed just wakes the
            // loop once to recompute.
            if timer.is_elapsed() || next < timer.deadline() {
                timer.as_mut().reset(next);
            }
            let may_read = self.out_buf.len() < MAX_WRITE_BUFFER;
            let wake = std::future::poll_fn(|cx| {
                if shutdown.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Shutdown);
                }
                if !self.out_buf.is_empty()
                    && let Poll::Ready(written) =
                        Pin::new(&mut *stream).poll_write(cx, &self.out_buf)
                {
                    return Poll::Ready(Wake::Written(written));
                }
                if self.pending.is_empty() {
                    if let Poll::Ready(taken) = self.outbound.poll_take(cx, MAX_TAKE) {
                        return Poll::Ready(Wake::Taken(taken));
                    }
                } else if let Some(close) = self.outbound.poll_closed(cx) {
                    // While deliveries wait for the inflight window nothing is taken, but the
                    // queue may still be closed (over its bound: slow; the server API;
                    // takeover).
                    return Poll::Ready(Wake::Taken(Err(close)));
                }
                if let Some(Poll::Ready(message)) = self.control.as_deref().map(|i| i.poll_next(cx))
                {
                    return Poll::Ready(Wake::Control(message));
                }
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Timer);
                }
                if may_read {
                    return poll_read_into(stream, cx, &mut self.in_buf).map(Wake::Read);
                }
                Poll::Pending
            })
            .await;
            match wake {
                Wake::Shutdown => return Close::new(reason::SERVER_SHUTTING_DOWN, "shutdown"),
                Wake::Timer => {}
                Wake::Written(Ok(0) | Err(_)) | Wake::Read(Ok(0) | Err(_)) => {
                    return Close::by_client();
                }
                Wake::Written(Ok(n)) => {
                    self.out_buf.advance(n);
                    // An idle connection keeps no write buffer (most connections are idle
                    // most of the time).
                    if self.out_buf.is_empty() {
                        self.out_buf = BytesMut::new();
                    }
                }
                Wake::Taken(Ok(frames)) => self.pending = frames,
                Wake::Taken(Err(close)) => return Close::from_queue(close),
                Wake::Control(ControlMessage::Unsubscribe { channel }) => {
                    Box::pin(self.unsubscribed_by_server(&channel)).await;
                }
                Wake::Read(Ok(_)) => {
                    let handled = Box::pin(self.handle_buffered()).await;
                    if let Err(close) = handled {
                        return close;
                    }
                    self.release_read_buffer();
                }
            }
        }
    }

    /// The connection's credentials.
    fn credentials(&self) -> &Credentials {
        self.credentials.as_deref().unwrap_or(&ANONYMOUS)
    }

    /// Who the connection is, as the backend proxy is told (made when asked: most
    /// connections never need it).
    fn context(&self) -> ProxyContext {
        ProxyContext {
            client: self.info.client.clone(),
            user: self.credentials().user.clone(),
            transport: "mqtt",
            protocol: "mqtt",
            headers: Vec::new(),
        }
    }

    /// Nothing is kept while idle; a partial packet keeps what it has.
    fn release_read_buffer(&mut self) {
        if self.in_buf.is_empty() {
            self.in_buf = BytesMut::new();
        }
    }

    /// Runs every whole packet in the read buffer.
    async fn handle_buffered(&mut self) -> Result<(), Close> {
        loop {
            let packet = match codec::decode(
                self.level,
                &mut self.in_buf,
                self.state.config.max_packet_size,
            ) {
                Ok(Some(packet)) => packet,
                Ok(None) => return Ok(()),
                Err(DecodeError::TooLarge { size, limit }) => {
                    return Err(Close::new(
                        reason::PACKET_TOO_LARGE,
                        format!("the packet is {size} bytes; the limit is {limit}"),
                    ));
                }
                Err(error) => {
                    return Err(Close::new(reason::MALFORMED_PACKET, error.to_string()));
                }
            };
            self.last_packet = Instant::now();
            self.handle(packet).await?;
        }
    }

    async fn handle(&mut self, packet: Packet) -> Result<(), Close> {
        match packet {
            Packet::Publish(publish) => self.publish(publish).await?,
            Packet::PubAck(pkid) => {
                self.acknowledged(pkid, Awaiting::Ack);
            }
            Packet::PubRec(pkid) => {
                if self.acknowledged(pkid, Awaiting::Rec) {
                    codec::ack(
                        &mut self.out_buf,
                        self.level,
                        Ack::PubRel,
                        pkid,
                        reason::SUCCESS,
                    );
                }
            }
            Packet::PubComp(pkid) => {
                self.acks_done(|acks| {
                    acks.inflight
                        .get(&pkid)
                        .is_some_and(|f| f.stage == Awaiting::Comp)
                        && acks.inflight.remove(&pkid).is_some()
                });
            }
            Packet::PubRel(pkid) => {
                let code = if self.acks_done(|acks| acks.awaiting_rel.remove(&pkid)) {
                    reason::SUCCESS
                } else {
                    0x92 // packet identifier not found
                };
                codec::ack(&mut self.out_buf, self.level, Ack::PubComp, pkid, code);
            }
            Packet::Subscribe { pkid, filters } => {
                self.subscribe(pkid, filters).await;
                self.save_session().await;
            }
            Packet::Unsubscribe { pkid, filters } => {
                self.unsubscribe(pkid, filters).await;
                self.save_session().await;
            }
            Packet::PingReq => codec::pingresp(&mut self.out_buf),
            Packet::Disconnect { reason, .. } => return Err(Close::disconnected(reason)),
            Packet::Unexpected(what) => {
                return Err(Close::new(
                    reason::PROTOCOL_ERROR,
                    format!("unexpected packet: {what}"),
                ));
            }
        }
        Ok(())
    }

    /// Writes what is buffered and, for MQTT 5, a DISCONNECT saying why, then closes.
    async fn close<W: AsyncWrite + Unpin>(&mut self, writer: &mut W, close: &Close) {
        if close.send_disconnect {
            tracing::debug!(code = close.code, reason = %close.reason, "mqtt: closing");
            if self.level == Level::V5 {
                codec::disconnect(&mut self.out_buf, close.code, &close.reason);
            }
        }
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            let _ = writer.write_all(&self.out_buf).await;
            let _ = writer.shutdown().await;
        })
        .await;
    }

    /// Leaves every subscription, and publishes the will when `will` says so.
    async fn end(mut self, will: bool) {
        self.leave_shared();
        self.leave_patterns();
        let exact = std::mem::take(&mut self.exact);
        for (_, sub) in exact.iter() {
            end_subscription(
                &self.state.realtime.node,
                &sub.name,
                &sub.options,
                sub.id,
                Some(sub.info.clone()),
            )
            .await;
        }
        self.outbound.close_if_open(CloseReason::CONNECTION_CLOSED);
        let current = self.state.disconnected(
            &self.credentials().user,
            &self.mqtt_client_id,
            self.connection,
        );
        // A session taken over belongs to the new connection now: the old one's last save
        // would overwrite it.
        if current && let Some(persistence) = &self.persistence {
            if persistence.expiry_secs > 0 {
                let document = self.session_document(persistence);
                persist::save(&*persistence.store, &persistence.key, &document).await;
            } else {
                persist::remove(&*persistence.store, &persistence.key).await;
            }
        }
        self.state
            .realtime
            .connections
            .fetch_sub(1, Ordering::Relaxed);
        if let Some(message) = self.will.take().filter(|_| will) {
            let message = *message;
            let publisher = WillPublisher {
                state: self.state.clone(),
                context: self.context(),
                credentials: self.credentials.map_or_else(Credentials::default, |c| *c),
                info: self.info,
                client_id: self.mqtt_client_id.into(),
            };
            if message.delay == 0 {
                publisher.publish(message).await;
            } else {
                // MQTT 5 will delay: published later unless the client connected again.
                let flag = publisher
                    .state
                    .will_pending(&publisher.credentials.user, &publisher.client_id);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(u64::from(message.delay))).await;
                    let due = publisher.state.will_due(
                        &publisher.credentials.user,
                        &publisher.client_id,
                        &flag,
                    );
                    if due {
                        publisher.publish(message).await;
                    }
                });
            }
        }
    }
}

/// The MQTT 5 reason for a refused subscription or publication.
fn refusal_reason(refusal: &Refusal) -> u8 {
    match refusal {
        Refusal::Denied(HeraldError { code, .. }) => match code {
            ErrorCode::PermissionDenied | ErrorCode::Unauthorized | ErrorCode::TokenExpired => {
                reason::NOT_AUTHORIZED
            }
            ErrorCode::UnknownChannel | ErrorCode::BadRequest => reason::TOPIC_FILTER_INVALID,
            ErrorCode::LimitExceeded | ErrorCode::TooManyRequests => reason::QUOTA_EXCEEDED,
            _ => reason::UNSPECIFIED,
        },
        Refusal::Backend { .. } | Refusal::Disconnect { .. } => reason::NOT_AUTHORIZED,
        Refusal::Unavailable => reason::IMPLEMENTATION_SPECIFIC,
    }
}
