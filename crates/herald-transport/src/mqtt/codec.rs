//! MQTT packets on the wire: decoding what clients send, encoding what the server sends.
//!
//! Decoding uses the packet modules of the maintained `rumqttc` crate (`mqttbytes::v4` for
//! MQTT 3.1.1, `v5::mqttbytes::v5` for MQTT 5, properties included): they frame a packet
//! only once all of it is buffered, check its remaining length against our limit before
//! reading it, and return errors instead of panicking. What they return is turned into the
//! version-neutral [`Packet`] here, so the session is written once for both levels. A
//! DISCONNECT without a reason code (MQTT 5 allows a remaining length of 0) is read here,
//! as are the protocol level of a CONNECT and the framing of a packet too large to accept.
//!
//! Encoding is our own: the server sends few packet kinds (CONNACK, SUBACK, UNSUBACK, the
//! publish acknowledgements, PINGRESP, DISCONNECT, PUBLISH), each a few lines, and a
//! delivered PUBLISH is encoded once per publication as a *template* (no packet id) that
//! [`finish_publish`] turns into each subscriber's packet with its QoS and packet id. The
//! tests decode every encoded packet with `rumqttc`'s decoders.
//!
//! May touch: nothing; pure functions over buffers.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

/// The protocol level a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5 (protocol level 5).
    V5,
}

/// MQTT 5 reason codes the server uses (3.1.1 maps the few it has).
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const GRANTED_QOS_1: u8 = 0x01;
    pub const GRANTED_QOS_2: u8 = 0x02;
    pub const UNSPECIFIED: u8 = 0x80;
    pub const MALFORMED_PACKET: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const IMPLEMENTATION_SPECIFIC: u8 = 0x83;
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    pub const CLIENT_ID_NOT_VALID: u8 = 0x85;
    pub const BAD_USERNAME_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_ID_IN_USE: u8 = 0x91;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
    pub const SUBSCRIPTION_IDS_NOT_SUPPORTED: u8 = 0xA1;
    pub const WILDCARDS_NOT_SUPPORTED: u8 = 0xA2;
    pub const MAXIMUM_CONNECT_TIME: u8 = 0xA0;
}

/// A CONNECT, whatever its level.
#[derive(Clone, Debug, Default)]
pub struct Connect {
    pub client_id: String,
    pub clean_start: bool,
    /// Seconds; 0 disables the keep-alive.
    pub keep_alive: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// MQTT 5 session expiry interval (seconds); 3.1.1: 0 with clean session, "never"
    /// (`u32::MAX`) without.
    pub session_expiry: u32,
    /// Most unacknowledged QoS 1/2 deliveries the client takes (MQTT 5; 3.1.1: none said).
    pub receive_maximum: Option<u16>,
    /// Largest packet the client accepts (MQTT 5).
    pub max_packet_size: Option<u32>,
    /// Topic aliases the client accepts in the server's PUBLISHes (MQTT 5).
    pub topic_alias_maximum: u16,
    pub will: Option<Will>,
}

/// A will message.
#[derive(Clone, Debug)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 will delay interval (seconds).
    pub delay: u32,
}

/// A PUBLISH from a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    pub qos: u8,
    pub dup: bool,
    pub retain: bool,
    pub pkid: u16,
    pub topic: String,
    pub payload: Bytes,
    /// MQTT 5 topic alias (up to the Topic Alias Maximum of the CONNACK).
    pub topic_alias: Option<u16>,
    /// MQTT 5 message expiry interval, seconds.
    pub message_expiry: Option<u32>,
    /// MQTT 5 user properties.
    pub user_properties: Vec<(String, String)>,
}

/// One filter of a SUBSCRIBE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscribeAsk {
    pub filter: String,
    pub qos: u8,
    /// MQTT 5 options.
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0: send retained on subscribe, 1: only for a new subscription, 2: never.
    pub retain_handling: u8,
    /// MQTT 5 subscription identifier (the SUBSCRIBE's, for each of its filters).
    pub subscription_id: Option<u32>,
}

/// A packet a client sent after its CONNECT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    Publish(Publish),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<SubscribeAsk>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect {
        /// MQTT 5 reason (0x04: send the will); 0 for 3.1.1.
        reason: u8,
        session_expiry: Option<u32>,
    },
    /// A packet a client must not send here (a second CONNECT, a server's packet, AUTH).
    Unexpected(&'static str),
}

/// Why bytes could not be read as a packet.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The packet is larger than the server accepts (MQTT 5 reason 0x95).
    #[error("the packet is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    /// Not MQTT, or not a valid packet (MQTT 5 reason 0x81).
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// A CONNECT of a protocol level Herald does not speak (3.1, or unknown).
    #[error("unsupported protocol level {0}")]
    UnsupportedLevel(u8),
}

/// The fixed header of the packet at the start of `buf`: (header length, remaining length),
/// or `None` while more bytes are needed.
pub fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut remaining = 0usize;
    for (index, byte) in buf.iter().skip(1).take(4).enumerate() {
        remaining |= usize::from(byte & 0x7F) << (7 * index);
        if byte & 0x80 == 0 {
            return Ok(Some((index + 2, remaining)));
        }
    }
    if buf.len() >= 5 {
        return Err(DecodeError::Malformed(
            "the remaining length is longer than 4 bytes".into(),
        ));
    }
    Ok(None)
}

/// Checks that the packet at the start of `buf` fits `max_size` (whole packet, as MQTT 5's
/// Maximum Packet Size counts), and says whether all of it is buffered.
fn framed(buf: &[u8], max_size: usize) -> Result<bool, DecodeError> {
    match fixed_header(buf)? {
        None => Ok(false),
        Some((header, remaining)) => {
            let size = header + remaining;
            if size > max_size {
                return Err(DecodeError::TooLarge {
                    size,
                    limit: max_size,
                });
            }
            Ok(buf.len() >= size)
        }
    }
}

/// Reads the CONNECT at the start of `buf`, once all of it is buffered (`Ok(None)` before).
pub fn decode_connect(
    buf: &mut BytesMut,
    max_size: usize,
) -> Result<Option<(Level, Connect)>, DecodeError> {
    if !framed(buf, max_size)? {
        return Ok(None);
    }
    if buf[0] != 0x10 {
        return Err(DecodeError::Malformed(
            "the first packet must be a CONNECT".into(),
        ));
    }
    let Some((header, _)) = fixed_header(buf)? else {
        return Ok(None);
    };
    // Protocol name (2-byte length + text), then the level.
    let level = buf
        .get(header..header + 2)
        .map(|len| usize::from(u16::from_be_bytes([len[0], len[1]])))
        .and_then(|name_len| buf.get(header + 2 + name_len).copied())
        .ok_or_else(|| DecodeError::Malformed("CONNECT without a protocol level".into()))?;
    let limit = max_size.saturating_sub(1);
    match level {
        4 => match v4::Packet::read(buf, limit).map_err(malformed)? {
            v4::Packet::Connect(connect) => Ok(Some((Level::V311, connect_v4(connect)))),
            _ => Err(DecodeError::Malformed("expected a CONNECT".into())),
        },
        5 => match v5::Packet::read(buf, Some(max_size as u32)).map_err(malformed_v5)? {
            v5::Packet::Connect(connect, will, login) => {
                Ok(Some((Level::V5, connect_v5(connect, will, login)?)))
            }
            _ => Err(DecodeError::Malformed("expected a CONNECT".into())),
        },
        other => Err(DecodeError::UnsupportedLevel(other)),
    }
}

fn malformed(error: rumqttc::mqttbytes::Error) -> DecodeError {
    DecodeError::Malformed(error.to_string())
}

fn malformed_v5(error: rumqttc::v5::mqttbytes::Error) -> DecodeError {
    DecodeError::Malformed(error.to_string())
}

/// A CONNECT's username and password; empty ones count as absent.
fn login_parts(login: Option<(String, String)>) -> (Option<String>, Option<String>) {
    match login {
        Some((username, password)) => (
            Some(username).filter(|u| !u.is_empty()),
            Some(password).filter(|p| !p.is_empty()),
        ),
        None => (None, None),
    }
}

fn connect_v4(connect: v4::Connect) -> Connect {
    let (username, password) = login_parts(connect.login.map(|l| (l.username, l.password)));
    Connect {
        client_id: connect.client_id,
        clean_start: connect.clean_session,
        keep_alive: connect.keep_alive,
        username,
        password,
        session_expiry: if connect.clean_session { 0 } else { u32::MAX },
        receive_maximum: None,
        max_packet_size: None,
        topic_alias_maximum: 0,
        will: connect.last_will.map(|will| Will {
            topic: will.topic,
            payload: will.message,
            qos: will.qos as u8,
            retain: will.retain,
            delay: 0,
        }),
    }
}

fn connect_v5(
    connect: v5::Connect,
    will: Option<v5::LastWill>,
    login: Option<v5::Login>,
) -> Result<Connect, DecodeError> {
    let (username, password) = login_parts(login.map(|l| (l.username, l.password)));
    let properties = connect.properties.unwrap_or_default();
    let will = match will {
        Some(will) => Some(Will {
            topic: String::from_utf8(will.topic.to_vec())
                .map_err(|_| DecodeError::Malformed("the will topic is not UTF-8".into()))?,
            payload: will.message,
            qos: will.qos as u8,
            retain: will.retain,
            delay: will
                .properties
                .and_then(|p| p.delay_interval)
                .unwrap_or_default(),
        }),
        None => None,
    };
    if properties.receive_maximum == Some(0) {
        return Err(DecodeError::Malformed("a receive maximum of 0".into()));
    }
    Ok(Connect {
        client_id: connect.client_id,
        clean_start: connect.clean_start,
        keep_alive: connect.keep_alive,
        username,
        password,
        session_expiry: properties.session_expiry_interval.unwrap_or(0),
        receive_maximum: properties.receive_maximum,
        max_packet_size: properties.max_packet_size,
        topic_alias_maximum: properties.topic_alias_max.unwrap_or(0),
        will,
    })
}

/// Reads the next packet from `buf` once all of it is buffered (`Ok(None)` before).
pub fn decode(
    level: Level,
    buf: &mut BytesMut,
    max_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    if !framed(buf, max_size)? {
        return Ok(None);
    }
    // DISCONNECT with a remaining length of 0: reason 0 (both levels).
    if buf[0] == 0xE0 && buf.get(1) == Some(&0) {
        buf.advance(2);
        return Ok(Some(Packet::Disconnect {
            reason: reason::SUCCESS,
            session_expiry: None,
        }));
    }
    let packet = match level {
        Level::V311 => from_v4(v4::Packet::read(buf, max_size).map_err(malformed)?),
        Level::V5 => from_v5(v5::Packet::read(buf, Some(max_size as u32)).map_err(malformed_v5)?)?,
    };
    Ok(Some(packet))
}

fn from_v4(packet: v4::Packet) -> Packet {
    match packet {
        v4::Packet::Publish(p) => Packet::Publish(Publish {
            qos: p.qos as u8,
            dup: p.dup,
            retain: p.retain,
            pkid: p.pkid,
            topic: p.topic,
            payload: p.payload,
            topic_alias: None,
            message_expiry: None,
            user_properties: Vec::new(),
        }),
        v4::Packet::PubAck(a) => Packet::PubAck(a.pkid),
        v4::Packet::PubRec(a) => Packet::PubRec(a.pkid),
        v4::Packet::PubRel(a) => Packet::PubRel(a.pkid),
        v4::Packet::PubComp(a) => Packet::PubComp(a.pkid),
        v4::Packet::Subscribe(s) => Packet::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| SubscribeAsk {
                    filter: f.path,
                    qos: f.qos as u8,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                    subscription_id: None,
                })
                .collect(),
        },
        v4::Packet::Unsubscribe(u) => Packet::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => Packet::PingReq,
        v4::Packet::Disconnect => Packet::Disconnect {
            reason: reason::SUCCESS,
            session_expiry: None,
        },
        v4::Packet::Connect(_) => Packet::Unexpected("a second CONNECT"),
        _ => Packet::Unexpected("a packet only a server sends"),
    }
}

fn from_v5(packet: v5::Packet) -> Result<Packet, DecodeError> {
    Ok(match packet {
        v5::Packet::Publish(p) => {
            let properties = p.properties.unwrap_or_default();
            Packet::Publish(Publish {
                qos: p.qos as u8,
                dup: p.dup,
                retain: p.retain,
                pkid: p.pkid,
                topic: String::from_utf8(p.topic.to_vec())
                    .map_err(|_| DecodeError::Malformed("the topic is not UTF-8".into()))?,
                payload: p.payload,
                topic_alias: properties.topic_alias,
                message_expiry: properties.message_expiry_interval,
                user_properties: properties.user_properties,
            })
        }
        v5::Packet::PubAck(a) => Packet::PubAck(a.pkid),
        v5::Packet::PubRec(a) => Packet::PubRec(a.pkid),
        v5::Packet::PubRel(a) => Packet::PubRel(a.pkid),
        v5::Packet::PubComp(a) => Packet::PubComp(a.pkid),
        v5::Packet::Subscribe(s) => {
            let subscription_id = match s.properties.and_then(|p| p.id) {
                Some(id @ 1..=268_435_455) => u32::try_from(id).ok(),
                Some(_) => {
                    return Err(DecodeError::Malformed(
                        "a subscription identifier must be 1 to 268,435,455".into(),
                    ));
                }
                None => None,
            };
            Packet::Subscribe {
                pkid: s.pkid,
                filters: s
                    .filters
                    .into_iter()
                    .map(|f| SubscribeAsk {
                        filter: f.path,
                        qos: f.qos as u8,
                        no_local: f.nolocal,
                        retain_as_published: f.preserve_retain,
                        retain_handling: match f.retain_forward_rule {
                            v5::RetainForwardRule::OnEverySubscribe => 0,
                            v5::RetainForwardRule::OnNewSubscribe => 1,
                            v5::RetainForwardRule::Never => 2,
                        },
                        subscription_id,
                    })
                    .collect(),
            }
        }
        v5::Packet::Unsubscribe(u) => Packet::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => Packet::PingReq,
        v5::Packet::Disconnect(d) => Packet::Disconnect {
            reason: d.reason_code as u8,
            session_expiry: d.properties.and_then(|p| p.session_expiry_interval),
        },
        v5::Packet::Connect(..) => Packet::Unexpected("a second CONNECT"),
        v5::Packet::Auth(_) => Packet::Unexpected("AUTH (enhanced authentication)"),
        _ => Packet::Unexpected("a packet only a server sends"),
    })
}

/// Appends the variable byte integer `value` (at most 268,435,455).
pub fn put_varint(out: &mut BytesMut, mut value: usize) {
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_string(out: &mut BytesMut, text: &str) {
    // Callers pass texts under 64 KiB (topics, reasons, properties are limited before).
    let len = text.len().min(usize::from(u16::MAX));
    out.put_u16(len as u16);
    out.extend_from_slice(&text.as_bytes()[..len]);
}

/// The server's CONNACK properties (MQTT 5).
#[derive(Clone, Debug, Default)]
pub struct ConnAckProperties {
    pub receive_maximum: Option<u16>,
    pub max_packet_size: Option<u32>,
    pub assigned_client_id: Option<String>,
    pub session_expiry: Option<u32>,
    pub retain_available: bool,
    pub wildcards_available: bool,
    /// Shared subscriptions (`$share/…`) are available.
    pub shared_available: bool,
    /// Topic aliases the client may use in its PUBLISHes (0: none).
    pub topic_alias_maximum: u16,
    pub reason_string: Option<String>,
}

/// A CONNACK. `code` is an MQTT 5 reason; 3.1.1 gets the nearest of its return codes.
pub fn connack(
    out: &mut BytesMut,
    level: Level,
    session_present: bool,
    code: u8,
    properties: &ConnAckProperties,
) {
    out.put_u8(0x20);
    match level {
        Level::V311 => {
            let code = match code {
                reason::SUCCESS => 0,
                reason::UNSUPPORTED_PROTOCOL_VERSION => 1,
                reason::CLIENT_ID_NOT_VALID => 2,
                reason::BAD_USERNAME_OR_PASSWORD => 4,
                reason::NOT_AUTHORIZED => 5,
                _ => 3, // server unavailable
            };
            out.put_u8(2);
            out.put_u8(u8::from(session_present && code == 0));
            out.put_u8(code);
        }
        Level::V5 => {
            let mut props = BytesMut::new();
            if let Some(expiry) = properties.session_expiry {
                props.put_u8(0x11);
                props.put_u32(expiry);
            }
            if let Some(id) = &properties.assigned_client_id {
                props.put_u8(0x12);
                put_string(&mut props, id);
            }
            if let Some(max) = properties.receive_maximum {
                props.put_u8(0x21);
                props.put_u16(max);
            }
            if properties.topic_alias_maximum > 0 {
                props.put_u8(0x22);
                props.put_u16(properties.topic_alias_maximum);
            }
            props.put_u8(0x25);
            props.put_u8(u8::from(properties.retain_available));
            if let Some(max) = properties.max_packet_size {
                props.put_u8(0x27);
                props.put_u32(max);
            }
            if let Some(text) = &properties.reason_string {
                props.put_u8(0x1F);
                put_string(&mut props, text);
            }
            props.put_u8(0x28);
            props.put_u8(u8::from(properties.wildcards_available));
            // Subscription identifiers: available (0x29 absent means 1).
            props.put_u8(0x2A);
            props.put_u8(u8::from(properties.shared_available));
            let remaining = 2 + varint_len(props.len()) + props.len();
            put_varint(out, remaining);
            out.put_u8(u8::from(session_present && code == 0));
            out.put_u8(code);
            put_varint(out, props.len());
            out.extend_from_slice(&props);
        }
    }
}

/// A SUBACK with one MQTT 5 reason per filter (granted QoS 0–2 or a failure ≥ 0x80);
/// 3.1.1 gets 0x80 for every failure.
pub fn suback(out: &mut BytesMut, level: Level, pkid: u16, codes: &[u8]) {
    out.put_u8(0x90);
    match level {
        Level::V311 => {
            put_varint(out, 2 + codes.len());
            out.put_u16(pkid);
            for code in codes {
                out.put_u8(if *code >= 0x80 { 0x80 } else { *code });
            }
        }
        Level::V5 => {
            put_varint(out, 3 + codes.len());
            out.put_u16(pkid);
            out.put_u8(0);
            out.extend_from_slice(codes);
        }
    }
}

/// An UNSUBACK (MQTT 5: one reason per filter).
pub fn unsuback(out: &mut BytesMut, level: Level, pkid: u16, codes: &[u8]) {
    out.put_u8(0xB0);
    match level {
        Level::V311 => {
            out.put_u8(2);
            out.put_u16(pkid);
        }
        Level::V5 => {
            put_varint(out, 3 + codes.len());
            out.put_u16(pkid);
            out.put_u8(0);
            out.extend_from_slice(codes);
        }
    }
}

/// Which acknowledgement of a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ack {
    PubAck = 0x40,
    PubRec = 0x50,
    PubRel = 0x62,
    PubComp = 0x70,
}

/// A PUBACK, PUBREC, PUBREL or PUBCOMP; `code` is an MQTT 5 reason (3.1.1 has none).
pub fn ack(out: &mut BytesMut, level: Level, kind: Ack, pkid: u16, code: u8) {
    out.put_u8(kind as u8);
    if level == Level::V5 && code != reason::SUCCESS {
        // Remaining length 3: the reason, no properties.
        out.put_u8(3);
        out.put_u16(pkid);
        out.put_u8(code);
    } else {
        out.put_u8(2);
        out.put_u16(pkid);
    }
}

pub fn pingresp(out: &mut BytesMut) {
    out.put_u8(0xD0);
    out.put_u8(0);
}

/// An MQTT 5 DISCONNECT with a reason and a reason string (3.1.1 has no server DISCONNECT:
/// the server just closes).
pub fn disconnect(out: &mut BytesMut, code: u8, reason_string: &str) {
    let mut props = BytesMut::new();
    if !reason_string.is_empty() {
        props.put_u8(0x1F);
        put_string(&mut props, reason_string);
    }
    out.put_u8(0xE0);
    put_varint(out, 1 + varint_len(props.len()) + props.len());
    out.put_u8(code);
    put_varint(out, props.len());
    out.extend_from_slice(&props);
}

/// A delivered publication as a PUBLISH template: the fixed header carries the highest QoS
/// it may be delivered at (the publisher's) and the retain flag, and no packet id is
/// written. [`finish_publish`] makes each subscriber's packet from it.
pub fn publish_template(
    level: Level,
    topic: &str,
    payload: &[u8],
    max_qos: u8,
    retain: bool,
    user_properties: &[(&str, &str)],
    message_expiry: Option<u32>,
) -> Bytes {
    let mut props = BytesMut::new();
    if level == Level::V5 {
        if let Some(seconds) = message_expiry {
            props.put_u8(0x02);
            props.put_u32(seconds);
        }
        for (key, value) in user_properties {
            props.put_u8(0x26);
            put_string(&mut props, key);
            put_string(&mut props, value);
        }
    }
    let props_len = match level {
        Level::V311 => 0,
        Level::V5 => varint_len(props.len()) + props.len(),
    };
    let remaining = 2 + topic.len() + props_len + payload.len();
    let mut out = BytesMut::with_capacity(1 + varint_len(remaining) + remaining);
    out.put_u8(0x30 | (max_qos.min(2) << 1) | u8::from(retain));
    put_varint(&mut out, remaining);
    put_string(&mut out, topic);
    if level == Level::V5 {
        put_varint(&mut out, props.len());
        out.extend_from_slice(&props);
    }
    out.extend_from_slice(payload);
    out.freeze()
}

/// The highest QoS a template may be delivered at.
pub fn template_qos(template: &[u8]) -> u8 {
    template.first().map_or(0, |b| (b >> 1) & 0b11)
}

/// Size of the packet [`finish_publish`] writes for `template` at `qos`.
pub fn finished_size(template: &[u8], qos: u8) -> usize {
    match fixed_header(template) {
        Ok(Some((header, remaining))) if qos == 0 => header + remaining,
        Ok(Some((_, remaining))) => 1 + varint_len(remaining + 2) + remaining + 2,
        _ => 0,
    }
}

/// How [`finish_publish`] makes one subscriber's PUBLISH of a template.
#[derive(Clone, Copy, Debug, Default)]
pub struct Finish {
    pub qos: u8,
    /// Ignored at QoS 0.
    pub pkid: u16,
    /// Set DUP (the template's own DUP flag, a redelivery, is kept anyway).
    pub dup: bool,
    /// Keep the template's RETAIN (cleared otherwise).
    pub keep_retain: bool,
    /// Write an empty topic: `extra` carries a topic alias the client knows (MQTT 5).
    pub omit_topic: bool,
}

/// Appends the PUBLISH made from `template` as `finish` says to `out`.
/// `extra` are MQTT 5 properties of this delivery (subscription identifiers) added to the
/// template's; empty for 3.1.1. False if the template is not one of ours.
pub fn finish_publish(out: &mut BytesMut, template: &[u8], finish: &Finish, extra: &[u8]) -> bool {
    let Finish {
        qos,
        pkid,
        dup,
        keep_retain,
        omit_topic,
    } = *finish;
    let Ok(Some((header, remaining))) = fixed_header(template) else {
        return false;
    };
    let Some(body) = template.get(header..header + remaining) else {
        return false;
    };
    let Some(topic_end) = body
        .get(..2)
        .map(|len| 2 + usize::from(u16::from_be_bytes([len[0], len[1]])))
        .filter(|end| *end <= body.len())
    else {
        return false;
    };
    // With extra properties, the template's property length is read and rewritten.
    let (props_at, props_len) = if extra.is_empty() {
        (topic_end, None)
    } else {
        match read_varint(&body[topic_end..]) {
            Some((len, size)) if topic_end + size + len <= body.len() => {
                (topic_end + size, Some(len))
            }
            _ => return false,
        }
    };
    let props_growth = props_len.map_or(0, |len| {
        varint_len(len + extra.len()) + extra.len() - varint_len(len)
    });
    let retain = template[0] & u8::from(keep_retain);
    let dup = dup || template[0] & 0x08 != 0;
    let byte1 = 0x30 | (u8::from(dup && qos > 0) << 3) | (qos << 1) | retain;
    out.put_u8(byte1);
    let pkid_len = if qos == 0 { 0 } else { 2 };
    let omitted = if omit_topic { topic_end - 2 } else { 0 };
    put_varint(out, remaining + pkid_len + props_growth - omitted);
    if omit_topic {
        out.put_u16(0);
    } else {
        out.extend_from_slice(&body[..topic_end]);
    }
    if qos > 0 {
        out.put_u16(pkid);
    }
    if let Some(len) = props_len {
        put_varint(out, len + extra.len());
        out.extend_from_slice(&body[props_at..props_at + len]);
        out.extend_from_slice(extra);
        out.extend_from_slice(&body[props_at + len..]);
    } else {
        out.extend_from_slice(&body[topic_end..]);
    }
    true
}

/// Sets the Message Expiry Interval of a finished MQTT 5 PUBLISH `packet` (one
/// [`finish_publish`] wrote) to `seconds`, when it has one: templates write it as the first
/// property. False if it has none.
pub fn set_message_expiry(packet: &mut [u8], seconds: u32) -> bool {
    let Ok(Some((header, _))) = fixed_header(packet) else {
        return false;
    };
    let qos = (packet[0] >> 1) & 0b11;
    let Some(topic_len) = packet
        .get(header..header + 2)
        .map(|len| usize::from(u16::from_be_bytes([len[0], len[1]])))
    else {
        return false;
    };
    let at = header + 2 + topic_len + if qos > 0 { 2 } else { 0 };
    let Some((_, size)) = packet.get(at..).and_then(read_varint) else {
        return false;
    };
    let at = at + size;
    match packet.get_mut(at..at + 5) {
        Some(property) if property[0] == 0x02 => {
            property[1..].copy_from_slice(&seconds.to_be_bytes());
            true
        }
        _ => false,
    }
}

/// Appends an MQTT 5 Topic Alias property (for [`finish_publish`]'s `extra`).
pub fn topic_alias(out: &mut BytesMut, alias: u16) {
    out.put_u8(0x23);
    out.put_u16(alias);
}

/// Appends an MQTT 5 Subscription Identifier property (for [`finish_publish`]'s `extra`).
pub fn subscription_identifier(out: &mut BytesMut, id: u32) {
    out.put_u8(0x0B);
    put_varint(out, id as usize);
}

/// A variable byte integer at the start of `bytes`: its value and its size.
fn read_varint(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, byte) in bytes.iter().take(4).enumerate() {
        value |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
#[path = "codec_tests.rs"]
mod tests;
