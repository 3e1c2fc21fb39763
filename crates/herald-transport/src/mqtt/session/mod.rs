//! One MQTT connection: CONNECT and authentication, then one task that reads packets, runs
//! them, and writes replies and deliveries.
//!
//! The loop (`Session::drive`) selects over the socket's read side, the write of what is
//! buffered, taking frames from the connection's [`Outbound`] queue, the keep-alive deadline,
//! the token's expiry and the server's shutdown. A packet runs to its end before the next is
//! read (a QoS 1 publish is acknowledged once `Node::publish` returned, so acknowledgements
//! keep the publishes' order). Deliveries are taken from the queue only when the previous
//! take is written and, for QoS 1/2, while the inflight window has room: a client that does
//! not acknowledge leaves its publications in the queue, whose byte bound closes it as slow
//! (guarantee 5) — memory never grows past the queue's bound and one take.
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
use herald_core::hub::SubscriberId;
use herald_core::namespace::NamespaceOptions;
use herald_core::node::PublishRequest;
use herald_core::proxy::ProxyContext;
use herald_core::publication::{ClientInfo, Payload};
use herald_core::{ErrorCode, HeraldError};
use parking_lot::RwLock;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::codec::{self, Ack, ConnAckProperties, Connect, DecodeError, Level, Packet, reason};
use super::delivery::{MqttEncoder, QOS_TAG, Table};
use super::persist::{self, Positions, SessionDocument};
use super::{MqttState, TAKEN_OVER};
use crate::outbound::{CloseReason, Frame, Outbound};
use crate::registry::Control;
use crate::subscription::end_subscription;

mod subscribe;
mod will;

use will::WillPublisher;

/// Bytes read at a time while waiting for the CONNECT.
const READ_CHUNK: usize = 4096;
/// A buffer larger than this is dropped once empty.
const IDLE_BUFFER: usize = 256;
/// Replies and deliveries buffered for the socket before reading pauses (a client that
/// sends without reading cannot grow this).
const MAX_WRITE_BUFFER: usize = 64 * 1024;
/// Bytes taken from the outbound queue at once.
const MAX_TAKE: usize = 64 * 1024;
/// How long the last packets (a DISCONNECT with its reason) may take to write.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves one MQTT connection on `stream` until it ends.
pub async fn run_connection<S>(stream: S, state: Arc<MqttState>)
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut in_buf = BytesMut::with_capacity(IDLE_BUFFER);
    let connect = tokio::time::timeout(
        state.realtime.config.connect_timeout,
        read_connect(&mut reader, &mut in_buf, state.config.max_packet_size),
    )
    .await;
    let (level, connect) = match connect {
        Ok(Ok(Some(connect))) => connect,
        Ok(Ok(None)) => return,
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
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, writer.write_all(&out)).await;
            return;
        }
        Ok(Err(error)) => {
            tracing::debug!(%error, "mqtt: bad CONNECT; closing");
            return;
        }
        Err(_) => {
            tracing::debug!("mqtt: no CONNECT within the connect timeout; closing");
            return;
        }
    };
    let mut out = BytesMut::new();
    let Some(mut session) =
        Box::pin(Session::connect(state, level, connect, in_buf, &mut out)).await
    else {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, writer.write_all(&out)).await;
        return;
    };
    session.out_buf = out;
    let close = session.drive(&mut reader, &mut writer).await;
    // Boxed, like the connect and the packets the loop runs: a connection's future is held
    // for its whole life, and would otherwise be as large as the largest of them.
    Box::pin(session.close(&mut writer, &close)).await;
    Box::pin(session.end(close.will)).await;
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
        buf.reserve(READ_CHUNK);
        match reader.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
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
            CloseReason::FORCE_DISCONNECT => reason::ADMINISTRATIVE_ACTION,
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
    credentials: Credentials,
    info: Arc<ClientInfo>,
    mqtt_client_id: String,
    connection: u64,
    context: ProxyContext,
    outbound: Arc<Outbound>,
    encoder: Arc<MqttEncoder>,
    table: Arc<RwLock<Table>>,
    exact: HashMap<Arc<str>, ExactSub>,
    pattern: Option<SubscriberId>,
    inflight: HashMap<u16, InFlight>,
    next_pkid: u16,
    receive_maximum: usize,
    client_max_packet: usize,
    /// QoS 2 publishes of the client that were published, awaiting PUBREL.
    awaiting_rel: HashSet<u16>,
    /// Frames taken from the queue, waiting for inflight room.
    pending: VecDeque<Frame>,
    in_buf: BytesMut,
    out_buf: BytesMut,
    keep_alive: Option<Duration>,
    last_packet: Instant,
    will: Option<codec::Will>,
    /// Set for a persistent session (boxed: most connections are clean).
    persistence: Option<Box<Persistence>>,
    _registration: Option<Box<crate::realtime::ClientRegistration>>,
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

/// Saves at most this often while positions move.
const SAVE_INTERVAL: Duration = Duration::from_secs(1);

impl Session {
    /// Authenticates the CONNECT and answers it; `None` when refused (the CONNACK saying
    /// why is in `out`).
    async fn connect(
        state: Arc<MqttState>,
        level: Level,
        connect: Connect,
        in_buf: BytesMut,
        out: &mut BytesMut,
    ) -> Option<Self> {
        let refuse = |out: &mut BytesMut, code: u8, why: &str| {
            tracing::debug!(code, why, "mqtt: connect refused");
            let properties = ConnAckProperties {
                reason_string: Some(why.to_owned()),
                ..ConnAckProperties::default()
            };
            codec::connack(out, level, false, code, &properties);
        };
        let realtime = &state.realtime;
        let herald_client = uuid::Uuid::new_v4().to_string();
        let credentials = match authenticate(realtime, &connect, &herald_client).await {
            Ok(credentials) => credentials,
            Err((code, why)) => {
                refuse(out, code, &why);
                return None;
            }
        };
        let mut assigned = None;
        let client_id = if connect.client_id.is_empty() {
            if level == Level::V311 && !connect.clean_start {
                refuse(
                    out,
                    reason::CLIENT_ID_NOT_VALID,
                    "a persistent session needs a client id",
                );
                return None;
            }
            let id = format!("herald-{}", uuid::Uuid::new_v4().simple());
            assigned = Some(id.clone());
            id
        } else {
            connect.client_id.clone()
        };
        let info = Arc::new(ClientInfo {
            client: herald_client,
            user: credentials.user.clone(),
            conn_info: credentials.info.clone(),
            chan_info: None,
        });
        let context = ProxyContext {
            client: info.client.clone(),
            user: credentials.user.clone(),
            transport: "mqtt",
            protocol: "mqtt",
            headers: Vec::new(),
        };
        realtime.connections.fetch_add(1, Ordering::Relaxed);
        let outbound = realtime.new_outbound();
        let registration = realtime.register(&info, "mqtt", Control::new(outbound.clone(), None));
        let connection = state.connected(&credentials.user, &client_id, &outbound);
        let max_inflight = usize::from(state.config.max_inflight.max(1));
        let receive_maximum = connect
            .receive_maximum
            .map_or(max_inflight, |m| usize::from(m).min(max_inflight));
        // Sessions: kept after the connection for `session_expiry` (capped), resumed unless
        // the client starts clean.
        let max_expiry = u32::try_from(state.config.max_session_expiry.as_duration().as_secs())
            .unwrap_or(u32::MAX);
        let expiry = connect.session_expiry.min(max_expiry);
        let key = persist::session_key(&credentials.user, &client_id);
        let mut saved = None;
        let persistence = match state.sessions.clone() {
            Some(store) => {
                if connect.clean_start {
                    persist::remove(&*store, &key).await;
                } else {
                    saved = persist::load(&*store, &key, herald_core::time::now_ms()).await;
                }
                (expiry > 0 || saved.is_some()).then(|| {
                    Box::new(Persistence {
                        store,
                        key,
                        expiry_secs: expiry,
                        positions: Positions::default(),
                        last_save: Instant::now(),
                    })
                })
            }
            None => None,
        };
        let wildcards_available = realtime.node.hub().sees_every_channel();
        let table = Arc::new(RwLock::new(Table::default()));
        let encoder = Arc::new(MqttEncoder {
            level,
            topics: state.topics.clone(),
            own: (level == Level::V5).then(|| (info.client.clone(), table.clone())),
        });
        let mut session = Self {
            level,
            info,
            mqtt_client_id: client_id,
            connection,
            context,
            outbound,
            encoder,
            table,
            exact: HashMap::new(),
            pattern: None,
            inflight: HashMap::new(),
            next_pkid: 0,
            receive_maximum,
            client_max_packet: connect.max_packet_size.map_or(usize::MAX, |m| m as usize),
            awaiting_rel: HashSet::new(),
            pending: VecDeque::new(),
            in_buf,
            out_buf: BytesMut::new(),
            keep_alive: (connect.keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500)),
            last_packet: Instant::now(),
            will: connect.will,
            persistence,
            _registration: registration,
            credentials,
            state,
        };
        let (session_present, reason_string) = match saved {
            Some(saved) => session.resume(saved).await,
            None => (false, None),
        };
        let kept = session.persistence.as_ref().map_or(0, |p| p.expiry_secs);
        let properties = ConnAckProperties {
            receive_maximum: Some(session.state.config.max_inflight.max(1)),
            max_packet_size: Some(
                u32::try_from(session.state.config.max_packet_size).unwrap_or(u32::MAX),
            ),
            assigned_client_id: assigned,
            // Told when it differs from what the client asked (capped, or no store).
            session_expiry: (connect.session_expiry != kept).then_some(kept),
            retain_available: true,
            wildcards_available,
            reason_string,
        };
        codec::connack(out, level, session_present, reason::SUCCESS, &properties);
        tracing::debug!(client_id = %session.mqtt_client_id, user = %session.credentials.user, ?level, session_present, "mqtt: connected");
        Some(session)
    }

    /// Runs the connection until it ends; returns why.
    async fn drive<R, W>(&mut self, reader: &mut R, writer: &mut W) -> Close
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // Packets that arrived with the CONNECT.
        if let Err(close) = Box::pin(self.handle_buffered()).await {
            return close;
        }
        let state = self.state.clone();
        let expires_at = self.credentials.expires_at;
        let expiry = crate::realtime::expiry(expires_at);
        tokio::pin!(expiry);
        loop {
            self.fill_writes();
            let keep_alive = self
                .keep_alive
                .map(|interval| tokio::time::Instant::from_std(self.last_packet + interval));
            let outbound = self.outbound.clone();
            let next_save = self.next_save();
            tokio::select! {
                biased;
                () = state.realtime.shutdown.wait() => {
                    return Close::new(reason::SERVER_SHUTTING_DOWN, "shutdown");
                }
                () = &mut expiry => {
                    return Close::new(reason::MAXIMUM_CONNECT_TIME, "the connection token expired");
                }
                written = writer.write(&self.out_buf), if !self.out_buf.is_empty() => {
                    match written {
                        Ok(0) | Err(_) => return Close::by_client(),
                        Ok(n) => {
                            self.out_buf.advance(n);
                            // An idle connection keeps no write buffer (most connections are
                            // idle most of the time).
                            if self.out_buf.is_empty() && self.out_buf.capacity() > IDLE_BUFFER {
                                self.out_buf = BytesMut::new();
                            }
                        }
                    }
                }
                taken = std::future::poll_fn(|cx| outbound.poll_take(cx, MAX_TAKE)),
                    if self.pending.is_empty() =>
                {
                    match taken {
                        Ok(frames) => self.pending.extend(frames),
                        Err(close) => return Close::from_queue(close),
                    }
                }
                // While deliveries wait for the inflight window nothing is taken, but the
                // queue may still be closed (over its bound: slow; the server API; takeover).
                close = std::future::poll_fn(|cx| match outbound.poll_closed(cx) {
                    Some(close) => std::task::Poll::Ready(close),
                    None => std::task::Poll::Pending,
                }), if !self.pending.is_empty() => {
                    return Close::from_queue(close);
                }
                read = reader.read_buf(&mut self.in_buf),
                    if self.out_buf.len() < MAX_WRITE_BUFFER =>
                {
                    match read {
                        Ok(0) | Err(_) => return Close::by_client(),
                        Ok(_) => {
                            if let Err(close) = Box::pin(self.handle_buffered()).await {
                                return close;
                            }
                        }
                    }
                    self.size_read_buffer();
                }
                () = sleep_until(next_save) => Box::pin(self.save_session()).await,
                () = sleep_until(keep_alive) => {
                    return Close::new(
                        reason::KEEP_ALIVE_TIMEOUT,
                        "no packet within 1.5 times the keep-alive",
                    );
                }
            }
        }
    }

    /// Sizes the read buffer for what comes next: nothing kept while idle, room for the
    /// rest of a packet whose header is in, a small chunk otherwise.
    fn size_read_buffer(&mut self) {
        if self.in_buf.is_empty() && self.in_buf.capacity() > IDLE_BUFFER {
            self.in_buf = BytesMut::new();
            return;
        }
        let needed = match codec::fixed_header(&self.in_buf) {
            Ok(Some((header, remaining))) => (header + remaining)
                .min(self.state.config.max_packet_size)
                .saturating_sub(self.in_buf.len()),
            _ => 0,
        };
        // A burst of small packets is read 512 bytes at a time at least.
        let want = needed.max(512);
        if self.in_buf.capacity() - self.in_buf.len() < want {
            self.in_buf.reserve(want);
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
                if self
                    .inflight
                    .get(&pkid)
                    .is_some_and(|f| f.stage == Awaiting::Comp)
                {
                    self.inflight.remove(&pkid);
                }
            }
            Packet::PubRel(pkid) => {
                let code = if self.awaiting_rel.remove(&pkid) {
                    reason::SUCCESS
                } else {
                    0x92 // packet identifier not found
                };
                codec::ack(&mut self.out_buf, self.level, Ack::PubComp, pkid, code);
            }
            Packet::Subscribe {
                pkid,
                filters,
                subscription_id,
            } => {
                if subscription_id.is_some() {
                    return Err(Close::new(
                        reason::SUBSCRIPTION_IDS_NOT_SUPPORTED,
                        "subscription identifiers are not supported",
                    ));
                }
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

    /// Ends the connection for a refused publish: MQTT 5 acknowledges QoS 1/2 with the
    /// reason; otherwise (QoS 0, or 3.1.1, which has no negative acknowledgement) the
    /// connection closes with it, so the refusal is never silent.
    fn refuse_publish(&mut self, qos: u8, pkid: u16, code: u8, why: String) -> Result<(), Close> {
        tracing::debug!(code, why = %why, "mqtt: publish refused");
        if self.level == Level::V5 && qos > 0 {
            let kind = if qos == 1 { Ack::PubAck } else { Ack::PubRec };
            codec::ack(&mut self.out_buf, self.level, kind, pkid, code);
            return Ok(());
        }
        Err(Close::new(code, why))
    }

    async fn publish(&mut self, publish: codec::Publish) -> Result<(), Close> {
        let codec::Publish {
            qos,
            pkid,
            topic,
            payload,
            topic_alias,
            user_properties,
            ..
        } = publish;
        if topic_alias.is_some() {
            return Err(Close::new(
                reason::TOPIC_ALIAS_INVALID,
                "the server allows no topic aliases",
            ));
        }
        if qos == 2 && self.awaiting_rel.contains(&pkid) {
            // A resent QoS 2 publish already published: acknowledge again, publish nothing.
            codec::ack(
                &mut self.out_buf,
                self.level,
                Ack::PubRec,
                pkid,
                reason::SUCCESS,
            );
            return Ok(());
        }
        if topic.starts_with('$') {
            return self.refuse_publish(
                qos,
                pkid,
                reason::TOPIC_NAME_INVALID,
                "topics starting with '$' are reserved".into(),
            );
        }
        let channel = match self.state.topics.channel(&topic) {
            Ok(channel) => channel,
            Err(error) => {
                return self.refuse_publish(qos, pkid, reason::TOPIC_NAME_INVALID, error.0);
            }
        };
        if !self.take_publish_token() {
            return self.refuse_publish(
                qos,
                pkid,
                reason::QUOTA_EXCEEDED,
                "publications_per_second_per_user".into(),
            );
        }
        let data = publication_data(payload);
        let subscribed = self.exact.contains_key(channel.as_str());
        let admitted = match self
            .state
            .realtime
            .admission()
            .publish(&self.credentials, &channel, data, subscribed, &self.context)
            .await
        {
            Ok(admitted) => admitted,
            Err(refusal) => {
                let code = match refusal_reason(&refusal) {
                    reason::TOPIC_FILTER_INVALID => reason::TOPIC_NAME_INVALID,
                    code => code,
                };
                return self.refuse_publish(qos, pkid, code, refusal.message());
            }
        };
        let mut request = PublishRequest::new(admitted.name.as_str(), admitted.data);
        request.skip_history = admitted.skip_history;
        request.info = Some(
            self.exact
                .get(admitted.name.as_str())
                .map_or_else(|| self.info.clone(), |sub| sub.info.clone()),
        );
        for (key, value) in user_properties {
            if key != QOS_TAG {
                request.tags.insert(key, value);
            }
        }
        if qos < 2 {
            request.tags.insert(QOS_TAG.into(), qos.to_string());
        }
        match self.state.realtime.node.publish(request).await {
            Ok(_) => {
                match qos {
                    1 => codec::ack(
                        &mut self.out_buf,
                        self.level,
                        Ack::PubAck,
                        pkid,
                        reason::SUCCESS,
                    ),
                    2 => {
                        self.awaiting_rel.insert(pkid);
                        codec::ack(
                            &mut self.out_buf,
                            self.level,
                            Ack::PubRec,
                            pkid,
                            reason::SUCCESS,
                        );
                    }
                    _ => {}
                }
                Ok(())
            }
            Err(error) => {
                let code = match error.code {
                    ErrorCode::LimitExceeded => reason::PACKET_TOO_LARGE,
                    ErrorCode::BadRequest | ErrorCode::UnknownChannel => reason::TOPIC_NAME_INVALID,
                    _ => reason::UNSPECIFIED,
                };
                tracing::warn!(error = %error, channel = admitted.name.as_str(), "mqtt: publish failed");
                self.refuse_publish(qos, pkid, code, error.to_string())
            }
        }
    }

    /// `publications_per_second_per_user`: per user, or per connection when anonymous.
    fn take_publish_token(&self) -> bool {
        let who = if self.credentials.user.is_empty() {
            self.info.client.as_str()
        } else {
            self.credentials.user.as_str()
        };
        self.state
            .realtime
            .publish_rate
            .try_take(who, Instant::now())
    }

    /// Moves taken frames into the write buffer as PUBLISH packets, while the inflight
    /// window and the buffer have room.
    fn fill_writes(&mut self) {
        while self.out_buf.len() < MAX_WRITE_BUFFER {
            let Some(frame) = self.pending.pop_front() else {
                return;
            };
            let Some(position) = &frame.position else {
                continue;
            };
            let granted = self
                .state
                .topics
                .topic(&position.channel)
                .and_then(|topic| self.table.read().granted(&position.channel, topic));
            let Some(granted) = granted else {
                // Unsubscribed since it was queued.
                continue;
            };
            let qos = granted.min(codec::template_qos(&frame.bytes));
            if codec::finished_size(&frame.bytes, qos) > self.client_max_packet {
                // MQTT 5: a packet larger than the client accepts is not sent (MQTT-3.1.2-25).
                tracing::debug!(channel = %position.channel, "mqtt: publication larger than the client's maximum packet size; skipped");
                continue;
            }
            let pkid = if qos == 0 {
                0
            } else {
                if self.inflight.len() >= self.receive_maximum {
                    // Waits for an acknowledgement; nothing more is taken from the queue.
                    self.pending.push_front(frame);
                    return;
                }
                let pkid = self.next_free_pkid();
                let stage = if qos == 1 {
                    Awaiting::Ack
                } else {
                    Awaiting::Rec
                };
                self.inflight.insert(
                    pkid,
                    InFlight {
                        stage,
                        channel: position.channel.clone(),
                        offset: position.offset,
                    },
                );
                pkid
            };
            // Positions are kept for exact topics only: they are what a session recovers,
            // and a `#` subscriber would otherwise save a position for every channel.
            if let Some(persistence) = &mut self.persistence
                && self.exact.contains_key(&position.channel)
            {
                persistence.positions.sent(
                    &position.channel,
                    &position.epoch,
                    position.offset,
                    qos == 0,
                );
            }
            codec::finish_publish(&mut self.out_buf, &frame.bytes, qos, pkid, false);
        }
    }

    /// The client acknowledged delivery `pkid` (PUBACK for QoS 1, PUBREC for QoS 2): it
    /// counts for the session's position. False if no delivery awaited that.
    fn acknowledged(&mut self, pkid: u16, awaited: Awaiting) -> bool {
        let Some(flight) = self.inflight.get_mut(&pkid).filter(|f| f.stage == awaited) else {
            return false;
        };
        if let Some(persistence) = &mut self.persistence {
            persistence
                .positions
                .acknowledged(&flight.channel, flight.offset);
        }
        if awaited == Awaiting::Rec {
            flight.stage = Awaiting::Comp;
        } else {
            self.inflight.remove(&pkid);
        }
        true
    }

    /// The session as saved now.
    fn session_document(&self, persistence: &Persistence) -> SessionDocument {
        let table = self.table.read();
        let mut subscriptions: Vec<(String, u8)> = table
            .exact
            .iter()
            .filter_map(|(channel, qos)| Some((self.state.topics.topic(channel)?.to_owned(), *qos)))
            .collect();
        subscriptions.extend(
            table
                .wildcards
                .iter()
                .map(|(filter, qos)| (filter.as_str().to_owned(), *qos)),
        );
        let expiry_ms = u64::from(persistence.expiry_secs) * 1000;
        SessionDocument {
            expires_at_ms: herald_core::time::now_ms().saturating_add(expiry_ms),
            subscriptions,
            positions: persistence.positions.saved(),
        }
    }

    /// Saves a persistent session (its subscriptions and positions).
    async fn save_session(&mut self) {
        let Some(mut persistence) = self.persistence.take() else {
            return;
        };
        let document = self.session_document(&persistence);
        persist::save(&*persistence.store, &persistence.key, &document).await;
        persistence.positions.dirty = false;
        persistence.last_save = Instant::now();
        self.persistence = Some(persistence);
    }

    /// When positions that moved are saved next, if they moved.
    fn next_save(&self) -> Option<tokio::time::Instant> {
        let persistence = self.persistence.as_ref()?;
        persistence
            .positions
            .dirty
            .then(|| tokio::time::Instant::from_std(persistence.last_save + SAVE_INTERVAL))
    }

    fn next_free_pkid(&mut self) -> u16 {
        // The window is at most 65,535 wide (a u16 receive maximum): a free id exists.
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1);
            if self.next_pkid != 0 && !self.inflight.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
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
        if let Some(id) = self.pattern.take() {
            self.state.realtime.node.unsubscribe_pattern(id);
        }
        for (_, sub) in self.exact.drain() {
            end_subscription(
                &self.state.realtime.node,
                &sub.name,
                &sub.options,
                sub.id,
                Some(sub.info),
            )
            .await;
        }
        self.outbound.close_if_open(CloseReason::CONNECTION_CLOSED);
        let current = self.state.disconnected(
            &self.credentials.user,
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
            let publisher = WillPublisher {
                state: self.state.clone(),
                credentials: self.credentials,
                info: self.info,
                context: self.context,
                client_id: self.mqtt_client_id,
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

/// Who a CONNECT is. A password shaped like a JWT (three dot-separated parts) is the
/// connection token, verified like the WebSocket's. Otherwise, with `[proxy]
/// connect_endpoint`, the application's backend decides: it gets the username, password and
/// MQTT client id as the connect request's `data` and answers as it does for WebSocket
/// connects (user, expiry, info, channels). Otherwise no password means anonymous where the
/// config allows it. Refusals are an MQTT 5 CONNACK reason and a text.
async fn authenticate(
    realtime: &crate::realtime::RealtimeState,
    connect: &Connect,
    herald_client: &str,
) -> Result<Credentials, (u8, String)> {
    let token = connect
        .password
        .as_deref()
        .filter(|p| p.split('.').count() == 3);
    let backend = realtime.proxy.as_ref().filter(|p| p.handles_connect());
    if let Some(token) = token {
        return realtime
            .authenticator
            .authenticate(token)
            .await
            .map_err(|error| (reason::BAD_USERNAME_OR_PASSWORD, error.to_string()));
    }
    if let Some(proxy) = backend
        && (connect.username.is_some() || connect.password.is_some())
    {
        let data = serde_json::json!({
            "username": connect.username,
            "password": connect.password,
            "client_id": connect.client_id,
        });
        let data = Payload::Json(bytes::Bytes::from(data.to_string()));
        let context = ProxyContext {
            client: herald_client.to_owned(),
            user: String::new(),
            transport: "mqtt",
            protocol: "mqtt",
            headers: Vec::new(),
        };
        let answer = proxy.connect(&context, Some(&data)).await;
        return match herald_core::admission::backend_decision(answer) {
            Ok(grant) => Ok(Credentials {
                user: grant.user,
                expires_at: grant.expire_at,
                info: grant.info,
                channels: grant.channels,
            }),
            Err(Refusal::Unavailable) => Err((
                reason::SERVER_UNAVAILABLE,
                "the backend could not be asked".into(),
            )),
            Err(refusal) => Err((reason::NOT_AUTHORIZED, refusal.message())),
        };
    }
    match &connect.password {
        Some(_) => Err((
            reason::BAD_USERNAME_OR_PASSWORD,
            "the password is not a connection token (JWT)".into(),
        )),
        None if realtime.config.allow_anonymous => Ok(Credentials::anonymous()),
        None => Err((
            reason::NOT_AUTHORIZED,
            "the connection token is the CONNECT password".into(),
        )),
    }
}

/// An MQTT payload as publication data: JSON when it parses as JSON, bytes otherwise.
fn publication_data(bytes: bytes::Bytes) -> Payload {
    if serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok() {
        Payload::Json(bytes)
    } else {
        Payload::Binary(bytes)
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

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
