//! Bounded, stable-toolchain fuzzing of the parsers a client controls in herald-transport:
//! the WebSocket command decoders (`Encoding::Json.decode_text`,
//! `Encoding::Protobuf.decode_binary` / `proto::decode_commands`), the one-way resume cursor
//! (`oneway::parse_cursor` / `format_cursor`) and the one-way request line
//! (`OneWayRequest::from_parts`, `Encoding::negotiate`). The nightly `cargo fuzz` targets in
//! `fuzz/` drive the same entry points without a case limit.
//!
//! Properties go beyond "does not panic": structured commands keep every field they were sent
//! with, a truncated frame is refused unless it was cut between whole messages, and a cursor
//! parses back to the positions it was made from. Each runs a fixed number of cases (2000 by
//! default, `PROPTEST_CASES=N` for more), well under ten seconds for the file in debug.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue};
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use herald_core::ErrorCode;
use herald_core::publication::Payload;
use herald_transport::oneway::{OneWayRequest, format_cursor, parse_cursor};
use herald_transport::ws::codec::Encoding;
use herald_transport::ws::proto;
use herald_transport::ws::protocol::{self, Command};
use proptest::prelude::*;
use prost::Message as _;
use serde_json::{Value, json};

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Generators

/// Offsets over the whole `u64` range, with the edges drawn often.
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1u64),
        Just(u64::MAX),
        Just(u64::MAX - 1),
        0u64..1000,
        any::<u64>(),
    ]
}

/// Any JSON value, nested a few levels, with strings from all of Unicode.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A subscribe request as the JSON model knows it.
#[derive(Clone, Debug)]
struct Sub {
    channel: String,
    token: String,
    recover: bool,
    epoch: String,
    offset: u64,
    data: Option<Value>,
    positioned: bool,
    recoverable: bool,
    join_leave: bool,
    flag: u64,
}

fn sub() -> impl Strategy<Value = Sub> {
    (
        any::<String>(),
        any::<String>(),
        any::<bool>(),
        any::<String>(),
        offset(),
        proptest::option::of(json_value()),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(0u64), Just(2u64), any::<u64>()],
    )
        .prop_map(
            |(
                channel,
                token,
                recover,
                epoch,
                offset,
                data,
                positioned,
                recoverable,
                join_leave,
                flag,
            )| Sub {
                channel,
                token,
                recover,
                epoch,
                offset,
                data,
                positioned,
                recoverable,
                join_leave,
                flag,
            },
        )
}

/// One JSON command method with its field values.
#[derive(Clone, Debug)]
enum Method {
    Pong,
    Ping,
    Connect {
        token: String,
        data: Option<Value>,
        subs: BTreeMap<String, Sub>,
        name: String,
        version: String,
    },
    Subscribe(Sub),
    Unsubscribe(String),
    Publish {
        channel: String,
        data: Value,
    },
    Presence(String),
    PresenceStats(String),
    History {
        channel: String,
        limit: i32,
        since: Option<(u64, String)>,
        reverse: bool,
    },
    Send(Option<Value>),
    Rpc {
        method: String,
        data: Option<Value>,
    },
    Refresh(String),
    SubRefresh {
        channel: String,
        token: String,
    },
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::Pong),
        Just(Method::Ping),
        (
            any::<String>(),
            proptest::option::of(json_value()),
            prop::collection::btree_map(any::<String>(), sub(), 0..3),
            any::<String>(),
            any::<String>(),
        )
            .prop_map(|(token, data, subs, name, version)| Method::Connect {
                token,
                data,
                subs,
                name,
                version,
            }),
        sub().prop_map(Method::Subscribe),
        any::<String>().prop_map(Method::Unsubscribe),
        (any::<String>(), json_value())
            .prop_map(|(channel, data)| Method::Publish { channel, data }),
        any::<String>().prop_map(Method::Presence),
        any::<String>().prop_map(Method::PresenceStats),
        (
            any::<String>(),
            any::<i32>(),
            proptest::option::of((offset(), any::<String>())),
            any::<bool>(),
        )
            .prop_map(|(channel, limit, since, reverse)| Method::History {
                channel,
                limit,
                since,
                reverse,
            }),
        proptest::option::of(json_value()).prop_map(Method::Send),
        (any::<String>(), proptest::option::of(json_value()))
            .prop_map(|(method, data)| Method::Rpc { method, data }),
        any::<String>().prop_map(Method::Refresh),
        (any::<String>(), any::<String>())
            .prop_map(|(channel, token)| Method::SubRefresh { channel, token }),
    ]
}

fn data_json(data: &Option<Value>) -> Value {
    data.clone().unwrap_or(Value::Null)
}

fn sub_json(s: &Sub) -> Value {
    let mut v = json!({
        "channel": s.channel,
        "token": s.token,
        "recover": s.recover,
        "epoch": s.epoch,
        "offset": s.offset,
        "positioned": s.positioned,
        "recoverable": s.recoverable,
        "join_leave": s.join_leave,
        "flag": s.flag,
    });
    if s.data.is_some() {
        v["data"] = data_json(&s.data);
    }
    v
}

/// The command as a client SDK would send it; an `id` of 0 is sometimes left out, and an
/// unknown field (which must be ignored) is sometimes added.
fn command_json(id: u32, method: &Method, unknown: Option<&Value>) -> Value {
    let (key, body) = match method {
        Method::Pong => ("", Value::Null),
        Method::Ping => ("ping", json!({})),
        Method::Connect {
            token,
            data,
            subs,
            name,
            version,
        } => {
            let subs: serde_json::Map<String, Value> =
                subs.iter().map(|(k, s)| (k.clone(), sub_json(s))).collect();
            let mut body = json!({"token": token, "subs": subs, "name": name, "version": version});
            if data.is_some() {
                body["data"] = data_json(data);
            }
            ("connect", body)
        }
        Method::Subscribe(s) => ("subscribe", sub_json(s)),
        Method::Unsubscribe(c) => ("unsubscribe", json!({ "channel": c })),
        Method::Publish { channel, data } => {
            ("publish", json!({ "channel": channel, "data": data }))
        }
        Method::Presence(c) => ("presence", json!({ "channel": c })),
        Method::PresenceStats(c) => ("presence_stats", json!({ "channel": c })),
        Method::History {
            channel,
            limit,
            since,
            reverse,
        } => {
            let mut body = json!({"channel": channel, "limit": limit, "reverse": reverse});
            if let Some((offset, epoch)) = since {
                body["since"] = json!({"offset": offset, "epoch": epoch});
            }
            ("history", body)
        }
        Method::Send(data) => ("send", json!({ "data": data_json(data) })),
        Method::Rpc { method, data } => ("rpc", json!({"method": method, "data": data_json(data)})),
        Method::Refresh(token) => ("refresh", json!({ "token": token })),
        Method::SubRefresh { channel, token } => {
            ("sub_refresh", json!({"channel": channel, "token": token}))
        }
    };
    let mut command = serde_json::Map::new();
    if id != 0 || unknown.is_some() {
        command.insert("id".into(), json!(id));
    }
    if !key.is_empty() {
        command.insert(key.into(), body);
    }
    if let Some(extra) = unknown {
        command.insert("x_unknown_field".into(), extra.clone());
    }
    Value::Object(command)
}

// ---------------------------------------------------------------------------------------------
// Checks: a decoded command against what was sent

/// JSON `data`: kept as the exact JSON text that was sent.
fn check_json_data(payload: &Payload, sent: &Value) -> Result<(), TestCaseError> {
    let expected = serde_json::to_vec(sent).expect("a Value serialises");
    prop_assert!(matches!(payload, Payload::Json(_)), "{:?}", payload);
    prop_assert_eq!(&payload.bytes()[..], &expected[..]);
    Ok(())
}

/// An optional JSON `data`: absent and `null` both mean "no data".
fn check_optional_json_data(
    payload: &Option<Payload>,
    sent: &Option<Value>,
) -> Result<(), TestCaseError> {
    match sent {
        None | Some(Value::Null) => prop_assert!(payload.is_none(), "{:?}", payload),
        Some(value) => check_json_data(payload.as_ref().expect("data kept"), value)?,
    }
    Ok(())
}

fn check_sub(
    decoded: &protocol::SubscribeRequest,
    sent: &Sub,
    check_data: bool,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(&decoded.channel, &sent.channel);
    prop_assert_eq!(&decoded.token, &sent.token);
    prop_assert_eq!(decoded.recover, sent.recover);
    prop_assert_eq!(&decoded.epoch, &sent.epoch);
    prop_assert_eq!(decoded.offset, sent.offset);
    prop_assert_eq!(decoded.positioned, sent.positioned);
    prop_assert_eq!(decoded.recoverable, sent.recoverable);
    prop_assert_eq!(decoded.join_leave, sent.join_leave);
    prop_assert_eq!(decoded.flag, sent.flag);
    if check_data {
        check_optional_json_data(&decoded.data, &sent.data)?;
    }
    Ok(())
}

/// Which methods a decoded command carries, in field order.
fn methods_of(c: &Command) -> [bool; 12] {
    [
        c.connect.is_some(),
        c.subscribe.is_some(),
        c.unsubscribe.is_some(),
        c.publish.is_some(),
        c.presence.is_some(),
        c.presence_stats.is_some(),
        c.history.is_some(),
        c.ping.is_some(),
        c.send.is_some(),
        c.rpc.is_some(),
        c.refresh.is_some(),
        c.sub_refresh.is_some(),
    ]
}

fn check_json_command(decoded: &Command, id: u32, sent: &Method) -> Result<(), TestCaseError> {
    prop_assert_eq!(decoded.id, id);
    let mut expected = [false; 12];
    let slot = match sent {
        Method::Pong => None,
        Method::Connect { .. } => Some(0),
        Method::Subscribe(_) => Some(1),
        Method::Unsubscribe(_) => Some(2),
        Method::Publish { .. } => Some(3),
        Method::Presence(_) => Some(4),
        Method::PresenceStats(_) => Some(5),
        Method::History { .. } => Some(6),
        Method::Ping => Some(7),
        Method::Send(_) => Some(8),
        Method::Rpc { .. } => Some(9),
        Method::Refresh(_) => Some(10),
        Method::SubRefresh { .. } => Some(11),
    };
    if let Some(i) = slot {
        expected[i] = true;
    }
    prop_assert_eq!(
        methods_of(decoded),
        expected,
        "exactly the method that was sent"
    );
    match sent {
        Method::Pong | Method::Ping => {}
        Method::Connect {
            token,
            data,
            subs,
            name,
            version,
        } => {
            let c = decoded.connect.as_ref().expect("connect");
            prop_assert_eq!(&c.token, token);
            prop_assert_eq!(&c.name, name);
            prop_assert_eq!(&c.version, version);
            check_optional_json_data(&c.data, data)?;
            prop_assert_eq!(c.subs.len(), subs.len());
            for (channel, s) in subs {
                check_sub(c.subs.get(channel).expect("every sub kept"), s, true)?;
            }
        }
        Method::Subscribe(s) => check_sub(decoded.subscribe.as_ref().expect("sub"), s, true)?,
        Method::Unsubscribe(c) => {
            prop_assert_eq!(&decoded.unsubscribe.as_ref().expect("unsub").channel, c);
        }
        Method::Publish { channel, data } => {
            let p = decoded.publish.as_ref().expect("publish");
            prop_assert_eq!(&p.channel, channel);
            check_json_data(&p.data, data)?;
        }
        Method::Presence(c) => {
            prop_assert_eq!(&decoded.presence.as_ref().expect("presence").channel, c);
        }
        Method::PresenceStats(c) => {
            prop_assert_eq!(&decoded.presence_stats.as_ref().expect("stats").channel, c);
        }
        Method::History {
            channel,
            limit,
            since,
            reverse,
        } => {
            let h = decoded.history.as_ref().expect("history");
            prop_assert_eq!(&h.channel, channel);
            prop_assert_eq!(h.limit, *limit);
            prop_assert_eq!(h.reverse, *reverse);
            prop_assert_eq!(
                h.since.as_ref().map(|p| (p.offset, p.epoch.clone())),
                since.clone()
            );
        }
        Method::Send(data) => {
            check_optional_json_data(&decoded.send.as_ref().expect("send").data, data)?;
        }
        Method::Rpc { method, data } => {
            let r = decoded.rpc.as_ref().expect("rpc");
            prop_assert_eq!(&r.method, method);
            check_optional_json_data(&r.data, data)?;
        }
        Method::Refresh(token) => {
            prop_assert_eq!(&decoded.refresh.as_ref().expect("refresh").token, token);
        }
        Method::SubRefresh { channel, token } => {
            let r = decoded.sub_refresh.as_ref().expect("sub_refresh");
            prop_assert_eq!(&r.channel, channel);
            prop_assert_eq!(&r.token, token);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Protobuf generators and checks

/// Publication data as clients send it: JSON text, or any bytes.
fn data_bytes() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        json_value().prop_map(|v| Bytes::from(serde_json::to_vec(&v).expect("serialises"))),
        prop::collection::vec(any::<u8>(), 0..48).prop_map(Bytes::from),
    ]
}

fn proto_sub() -> impl Strategy<Value = proto::SubscribeRequest> {
    (
        any::<String>(),
        any::<String>(),
        any::<bool>(),
        any::<String>(),
        offset(),
        data_bytes(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(0i64), Just(2i64), Just(-1i64), any::<i64>()],
    )
        .prop_map(
            |(
                channel,
                token,
                recover,
                epoch,
                offset,
                data,
                positioned,
                recoverable,
                join_leave,
                flag,
            )| proto::SubscribeRequest {
                channel,
                token,
                recover,
                epoch,
                offset,
                data,
                positioned,
                recoverable,
                join_leave,
                flag,
            },
        )
}

fn proto_command() -> impl Strategy<Value = proto::Command> {
    let channel = || any::<String>().prop_map(|channel| proto::ChannelRequest { channel });
    let body = prop_oneof![
        Just(proto::Command::default()),
        Just(proto::Command {
            ping: Some(proto::EmptyMessage {}),
            ..Default::default()
        }),
        (
            any::<String>(),
            data_bytes(),
            prop::collection::hash_map(any::<String>(), proto_sub(), 0..3),
            any::<String>(),
        )
            .prop_map(|(token, data, subs, name)| proto::Command {
                connect: Some(proto::ConnectRequest {
                    token,
                    data,
                    subs,
                    name,
                    version: "1.0".into(),
                }),
                ..Default::default()
            }),
        proto_sub().prop_map(|s| proto::Command {
            subscribe: Some(s),
            ..Default::default()
        }),
        channel().prop_map(|c| proto::Command {
            unsubscribe: Some(c),
            ..Default::default()
        }),
        (any::<String>(), data_bytes()).prop_map(|(channel, data)| proto::Command {
            publish: Some(proto::PublishRequest { channel, data }),
            ..Default::default()
        }),
        channel().prop_map(|c| proto::Command {
            presence: Some(c),
            ..Default::default()
        }),
        channel().prop_map(|c| proto::Command {
            presence_stats: Some(c),
            ..Default::default()
        }),
        (
            any::<String>(),
            any::<i32>(),
            proptest::option::of((offset(), any::<String>())),
            any::<bool>(),
        )
            .prop_map(|(channel, limit, since, reverse)| proto::Command {
                history: Some(proto::HistoryRequest {
                    channel,
                    limit,
                    since: since
                        .map(|(offset, epoch)| proto::StreamPositionMessage { offset, epoch }),
                    reverse,
                }),
                ..Default::default()
            }),
        data_bytes().prop_map(|data| proto::Command {
            send: Some(proto::DataRequest { data }),
            ..Default::default()
        }),
        (data_bytes(), any::<String>()).prop_map(|(data, method)| proto::Command {
            rpc: Some(proto::RpcRequest { data, method }),
            ..Default::default()
        }),
        any::<String>().prop_map(|token| proto::Command {
            refresh: Some(proto::TokenRequest { token }),
            ..Default::default()
        }),
        (any::<String>(), any::<String>()).prop_map(|(channel, token)| proto::Command {
            sub_refresh: Some(proto::SubRefreshRequest { channel, token }),
            ..Default::default()
        }),
    ];
    (any::<u32>(), body).prop_map(|(id, mut command)| {
        command.id = id;
        command
    })
}

fn frame_of(commands: &[proto::Command]) -> (BytesMut, Vec<usize>) {
    let mut frame = BytesMut::new();
    let mut boundaries = vec![0];
    for command in commands {
        command
            .encode_length_delimited(&mut frame)
            .expect("a growable buffer");
        boundaries.push(frame.len());
    }
    (frame, boundaries)
}

/// What a JSON subscriber is sent for a publication's data: Protobuf publishers' bytes must
/// reach it intact — JSON as itself (surrounding whitespace aside), anything else as base64.
fn check_json_view(payload: &Payload, sent: &Bytes) -> Result<(), TestCaseError> {
    let shown = protocol::data_json(payload);
    match payload {
        Payload::Json(_) => {
            let text = std::str::from_utf8(sent);
            prop_assert!(text.is_ok(), "JSON payload that is not UTF-8: {:?}", sent);
            let trimmed = text
                .unwrap_or_default()
                .trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r'));
            prop_assert_eq!(shown.get(), trimmed);
        }
        Payload::Binary(_) => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(sent);
            prop_assert_eq!(shown.get(), format!("\"{b64}\""));
        }
    }
    Ok(())
}

fn check_data(decoded: &Payload, sent: &Bytes) -> Result<(), TestCaseError> {
    prop_assert_eq!(decoded.bytes(), sent, "data bytes kept");
    check_json_view(decoded, sent)
}

fn check_optional_data(decoded: &Option<Payload>, sent: &Bytes) -> Result<(), TestCaseError> {
    if sent.is_empty() {
        prop_assert!(decoded.is_none(), "empty data is no data");
    } else {
        check_data(decoded.as_ref().expect("data kept"), sent)?;
    }
    Ok(())
}

fn check_proto_sub(
    decoded: &protocol::SubscribeRequest,
    sent: &proto::SubscribeRequest,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(&decoded.channel, &sent.channel);
    prop_assert_eq!(&decoded.token, &sent.token);
    prop_assert_eq!(decoded.recover, sent.recover);
    prop_assert_eq!(&decoded.epoch, &sent.epoch);
    prop_assert_eq!(decoded.offset, sent.offset);
    prop_assert_eq!(decoded.positioned, sent.positioned);
    prop_assert_eq!(decoded.recoverable, sent.recoverable);
    prop_assert_eq!(decoded.join_leave, sent.join_leave);
    // A negative flag is no capability at all, never a huge bit set.
    prop_assert_eq!(decoded.flag, u64::try_from(sent.flag).unwrap_or(0));
    check_optional_data(&decoded.data, &sent.data)
}

fn check_proto_command(decoded: &Command, sent: &proto::Command) -> Result<(), TestCaseError> {
    prop_assert_eq!(decoded.id, sent.id);
    prop_assert_eq!(
        methods_of(decoded),
        [
            sent.connect.is_some(),
            sent.subscribe.is_some(),
            sent.unsubscribe.is_some(),
            sent.publish.is_some(),
            sent.presence.is_some(),
            sent.presence_stats.is_some(),
            sent.history.is_some(),
            sent.ping.is_some(),
            sent.send.is_some(),
            sent.rpc.is_some(),
            sent.refresh.is_some(),
            sent.sub_refresh.is_some(),
        ]
    );
    if let (Some(d), Some(s)) = (&decoded.connect, &sent.connect) {
        prop_assert_eq!(&d.token, &s.token);
        prop_assert_eq!(&d.name, &s.name);
        prop_assert_eq!(&d.version, &s.version);
        check_optional_data(&d.data, &s.data)?;
        prop_assert_eq!(d.subs.len(), s.subs.len());
        for (channel, sub) in &s.subs {
            check_proto_sub(d.subs.get(channel).expect("every sub kept"), sub)?;
        }
    }
    if let (Some(d), Some(s)) = (&decoded.subscribe, &sent.subscribe) {
        check_proto_sub(d, s)?;
    }
    for (d, s) in [
        (&decoded.unsubscribe, &sent.unsubscribe),
        (&decoded.presence, &sent.presence),
        (&decoded.presence_stats, &sent.presence_stats),
    ] {
        if let (Some(d), Some(s)) = (d, s) {
            prop_assert_eq!(&d.channel, &s.channel);
        }
    }
    if let (Some(d), Some(s)) = (&decoded.publish, &sent.publish) {
        prop_assert_eq!(&d.channel, &s.channel);
        check_data(&d.data, &s.data)?;
    }
    if let (Some(d), Some(s)) = (&decoded.history, &sent.history) {
        prop_assert_eq!(&d.channel, &s.channel);
        prop_assert_eq!(d.limit, s.limit);
        prop_assert_eq!(d.reverse, s.reverse);
        prop_assert_eq!(
            d.since.as_ref().map(|p| (p.offset, p.epoch.clone())),
            s.since.as_ref().map(|p| (p.offset, p.epoch.clone()))
        );
    }
    if let (Some(d), Some(s)) = (&decoded.send, &sent.send) {
        check_optional_data(&d.data, &s.data)?;
    }
    if let (Some(d), Some(s)) = (&decoded.rpc, &sent.rpc) {
        prop_assert_eq!(&d.method, &s.method);
        check_optional_data(&d.data, &s.data)?;
    }
    if let (Some(d), Some(s)) = (&decoded.refresh, &sent.refresh) {
        prop_assert_eq!(&d.token, &s.token);
    }
    if let (Some(d), Some(s)) = (&decoded.sub_refresh, &sent.sub_refresh) {
        prop_assert_eq!(&d.channel, &s.channel);
        prop_assert_eq!(&d.token, &s.token);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Properties: arbitrary input

proptest! {
    #![proptest_config(config())]

    /// Any bytes as a binary frame: the Protobuf decoder answers (no panic), agrees with
    /// `proto::decode_commands`, and never finds more commands than there are bytes (each
    /// length-delimited message takes at least its length byte). A JSON connection refuses
    /// every binary frame.
    #[test]
    fn arbitrary_bytes_into_the_protobuf_decoder(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let by_codec = Encoding::Protobuf.decode_binary(&bytes);
        let direct = proto::decode_commands(&bytes);
        prop_assert_eq!(by_codec.as_ref().map(Vec::len).ok(), direct.as_ref().map(Vec::len).ok());
        if let Ok(commands) = &by_codec {
            prop_assert!(commands.len() <= bytes.len());
            prop_assert_eq!(bytes.is_empty(), commands.is_empty());
        }
        prop_assert!(Encoding::Json.decode_binary(&bytes).is_err());
    }

    /// Bytes that start as a valid length prefix followed by random content: reaches the
    /// field decoding (not just the framing) far more often than fully random bytes.
    #[test]
    fn random_message_bodies_into_the_protobuf_decoder(
        bodies in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 1..4),
    ) {
        let mut frame = Vec::new();
        for body in &bodies {
            prost::encoding::encode_varint(body.len() as u64, &mut frame);
            frame.extend_from_slice(body);
        }
        if let Ok(commands) = proto::decode_commands(&frame) {
            prop_assert_eq!(commands.len(), bodies.len());
        }
    }

    /// Any string as a text frame: the JSON decoder answers (no panic); when it accepts,
    /// there is one command per non-blank line. A Protobuf connection refuses every text frame.
    #[test]
    fn arbitrary_strings_into_the_json_decoder(text in any::<String>()) {
        if let Ok(commands) = Encoding::Json.decode_text(&text) {
            let lines = text.split('\n').filter(|l| !l.trim().is_empty()).count();
            prop_assert_eq!(commands.len(), lines);
        }
        prop_assert!(Encoding::Protobuf.decode_text(&text).is_err());
    }

    /// JSON-shaped garbage: random JSON values (objects with protocol keys among them), which
    /// reach the field decoders rather than failing at the first byte.
    #[test]
    fn json_shaped_garbage_into_the_json_decoder(
        fields in prop::collection::btree_map(
            prop::sample::select(vec![
                "id", "connect", "subscribe", "unsubscribe", "publish", "presence",
                "presence_stats", "history", "ping", "send", "rpc", "refresh", "sub_refresh",
                "channel", "data", "offset", "epoch", "since", "subs",
            ]),
            json_value(),
            0..4,
        ),
    ) {
        let object: serde_json::Map<String, Value> =
            fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        let text = Value::Object(object).to_string();
        if let Ok(commands) = Encoding::Json.decode_text(&text) {
            prop_assert_eq!(commands.len(), 1);
        }
    }

    /// Any string as a resume cursor, for any channel count: no panic; an accepted cursor has
    /// exactly `count` positions with alphanumeric epochs, and formatting it again gives a
    /// cursor that parses to the same positions. A refusal is a `bad request`.
    #[test]
    fn arbitrary_strings_into_parse_cursor(
        text in prop_oneof![any::<String>(), "[0-9a-zA-Z:,+-]{0,40}"],
        count in 0usize..8,
    ) {
        match parse_cursor(&text, count) {
            Ok(positions) => {
                prop_assert_eq!(positions.len(), count);
                for p in &positions {
                    prop_assert!(p.epoch.bytes().all(|b| b.is_ascii_alphanumeric()));
                }
                let again = format_cursor(&as_cursor_positions(&positions));
                prop_assert_eq!(parse_cursor(&again, count).ok(), Some(positions));
            }
            Err(err) => prop_assert_eq!(err.code, ErrorCode::BadRequest),
        }
    }

    /// Any query string and header values into the one-way request parser and the WebSocket
    /// encoding negotiation: no panic, and `channels=a,,b` never yields an empty channel name.
    #[test]
    fn arbitrary_one_way_requests(
        query in proptest::option::of(prop_oneof![any::<String>(), "[a-z=&,%+0-9]{0,40}"]),
        last_event_id in proptest::option::of("[ -~]{0,20}"),
        authorization in proptest::option::of("[ -~]{0,30}"),
        cookie in proptest::option::of("[ -~]{0,30}"),
        subprotocol in proptest::option::of(any::<String>()),
    ) {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("last-event-id", &last_event_id),
            ("authorization", &authorization),
            ("cookie", &cookie),
        ] {
            if let Some(v) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
                headers.insert(name, v);
            }
        }
        let request = OneWayRequest::from_parts(query.as_deref(), &headers);
        let singly = form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
            .filter(|(k, _)| k == "channel")
            .count();
        let empty = request.channels.iter().filter(|c| c.is_empty()).count();
        prop_assert!(empty <= singly, "empty names only from an empty `channel=`");
        let _ = Encoding::negotiate(subprotocol.as_deref(), query.as_deref());
    }

    /// A well-formed one-way request: channels in URL order whether named one by one or as a
    /// list; the token from `Authorization: Bearer` over `?token=` over the `herald_token`
    /// cookie; the cursor from a non-empty `Last-Event-ID` over `?since=`.
    #[test]
    fn one_way_requests_read_channels_token_and_cursor(
        groups in prop::collection::vec(
            (any::<bool>(), prop::collection::vec("[a-zA-Z0-9_.:-]{1,12}", 1..4)),
            1..5,
        ),
        query_token in proptest::option::of("[a-zA-Z0-9._-]{1,20}"),
        bearer in proptest::option::of("[a-zA-Z0-9._-]{1,20}"),
        cookie_token in proptest::option::of("[a-zA-Z0-9._-]{1,20}"),
        since in proptest::option::of("[0-9a-zA-Z:,]{1,20}"),
        last_event_id in proptest::option::of("[0-9a-zA-Z:,]{0,20}"),
    ) {
        let mut pairs = Vec::new();
        let mut expected_channels = Vec::new();
        for (as_list, names) in &groups {
            if *as_list {
                pairs.push(format!("channels={}", names.join(",")));
            } else {
                pairs.extend(names.iter().map(|n| format!("channel={n}")));
            }
            expected_channels.extend(names.iter().cloned());
        }
        if let Some(t) = &query_token {
            pairs.push(format!("token={t}"));
        }
        if let Some(s) = &since {
            pairs.push(format!("since={s}"));
        }
        let query = pairs.join("&");
        let mut headers = HeaderMap::new();
        if let Some(b) = &bearer {
            headers.insert("authorization", HeaderValue::from_str(&format!("Bearer {b}")).expect("ASCII"));
        }
        if let Some(c) = &cookie_token {
            headers.insert("cookie", HeaderValue::from_str(&format!("a=1; herald_token={c}")).expect("ASCII"));
        }
        if let Some(l) = &last_event_id {
            headers.insert("last-event-id", HeaderValue::from_str(l).expect("ASCII"));
        }
        let request = OneWayRequest::from_parts(Some(&query), &headers);
        prop_assert_eq!(&request.channels, &expected_channels);
        prop_assert_eq!(request.token, bearer.or(query_token).or(cookie_token));
        let header_cursor = last_event_id.filter(|l| !l.is_empty());
        prop_assert_eq!(request.cursor, header_cursor.or(since));
    }
}

fn as_cursor_positions(
    positions: &[herald_core::publication::StreamPosition],
) -> Vec<(Arc<str>, u64, Arc<str>)> {
    positions
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                Arc::from(format!("ch{i}").as_str()),
                p.offset,
                Arc::from(p.epoch.as_str()),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Properties: structured input

proptest! {
    #![proptest_config(config())]

    /// Valid JSON commands built from random field values (any Unicode strings, offsets up to
    /// `u64::MAX`, nested data), several per frame with blank and CRLF-ended lines among them:
    /// each decodes, in order, with its id and every field it was sent with; unknown fields
    /// are ignored.
    #[test]
    fn valid_json_commands_keep_their_fields(
        commands in prop::collection::vec(
            (any::<u32>(), method(), proptest::option::of(json_value()), 0u8..4),
            1..4,
        ),
    ) {
        let mut text = String::new();
        for (id, method, unknown, layout) in &commands {
            text.push_str(&command_json(*id, method, unknown.as_ref()).to_string());
            match layout {
                0 => text.push('\n'),
                1 => text.push_str("\r\n"),
                2 => text.push_str("\n  \n"),
                _ => text.push_str("\n\n"),
            }
        }
        let decoded = Encoding::Json.decode_text(&text).expect("valid commands decode");
        prop_assert_eq!(decoded.len(), commands.len());
        for (d, (id, method, _, _)) in decoded.iter().zip(&commands) {
            check_json_command(d, *id, method)?;
        }
    }

    /// Numbers out of a field's range are refused, never wrapped or truncated: an id past
    /// `u32::MAX`, an offset past `u64::MAX` or below zero.
    #[test]
    fn out_of_range_numbers_are_refused(
        id_excess in 1u64..=u64::from(u32::MAX),
        offset_excess in 1u128..=u128::from(u64::MAX),
        negative in 1u64..=u64::MAX,
    ) {
        let big_id = u64::from(u32::MAX) + id_excess;
        let big_offset = u128::from(u64::MAX) + offset_excess;
        for text in [
            format!(r#"{{"id":{big_id},"publish":{{"channel":"c","data":1}}}}"#),
            format!(r#"{{"id":1,"subscribe":{{"channel":"c","offset":{big_offset}}}}}"#),
            format!(r#"{{"id":1,"subscribe":{{"channel":"c","offset":-{negative}}}}}"#),
            format!(r#"{{"id":1,"history":{{"channel":"c","since":{{"offset":{big_offset}}}}}}}"#),
        ] {
            prop_assert!(Encoding::Json.decode_text(&text).is_err(), "{}", text);
        }
    }

    /// A valid JSON frame cut anywhere is refused, unless the cut falls exactly at a line
    /// boundary, in which case the whole commands before it decode.
    #[test]
    fn truncated_json_frames_are_refused(
        commands in prop::collection::vec((any::<u32>(), method()), 1..3),
        cut in any::<prop::sample::Index>(),
    ) {
        let lines: Vec<String> = commands
            .iter()
            .map(|(id, m)| command_json(*id, m, None).to_string())
            .collect();
        let text = lines.join("\n");
        let mut boundaries = vec![0];
        let mut at = 0;
        for line in &lines {
            at += line.len();
            boundaries.push(at);
            at += 1;
            boundaries.push(at);
        }
        let mut k = cut.index(text.len() + 1);
        while !text.is_char_boundary(k) {
            k -= 1;
        }
        let result = Encoding::Json.decode_text(&text[..k]);
        match boundaries.iter().position(|b| *b == k) {
            Some(i) => prop_assert_eq!(result.map(|c| c.len()).ok(), Some(i.div_ceil(2))),
            None => prop_assert!(result.is_err(), "cut at {} of {:?}", k, text),
        }
    }

    /// Valid Protobuf commands (any field values, several per frame, length-delimited as the
    /// SDKs send them) round-trip through `decode_commands` and `decode_binary` with every
    /// field; publication data keeps its bytes and reaches JSON subscribers intact.
    #[test]
    fn valid_protobuf_commands_round_trip(commands in prop::collection::vec(proto_command(), 1..5)) {
        let (frame, _) = frame_of(&commands);
        let decoded = proto::decode_commands(&frame).expect("valid frame");
        prop_assert_eq!(decoded.len(), commands.len());
        for (d, sent) in decoded.iter().zip(&commands) {
            check_proto_command(d, sent)?;
        }
        let via_codec = Encoding::Protobuf.decode_binary(&frame).expect("valid frame");
        prop_assert_eq!(
            via_codec.iter().map(|c| c.id).collect::<Vec<_>>(),
            commands.iter().map(|c| c.id).collect::<Vec<_>>()
        );
    }

    /// A valid Protobuf frame cut at any byte is an error — except a cut exactly between two
    /// messages, which leaves the whole messages before it. Never a panic, never a partial
    /// command.
    #[test]
    fn truncated_protobuf_frames_are_refused(commands in prop::collection::vec(proto_command(), 1..4)) {
        let (frame, boundaries) = frame_of(&commands);
        for k in 0..=frame.len() {
            let result = proto::decode_commands(&frame[..k]);
            match boundaries.iter().position(|b| *b == k) {
                Some(whole) => {
                    let decoded = result.expect("a cut between messages");
                    prop_assert_eq!(decoded.len(), whole);
                    for (d, sent) in decoded.iter().zip(&commands) {
                        prop_assert_eq!(d.id, sent.id);
                    }
                }
                None => prop_assert!(result.is_err(), "cut at {} of {}", k, frame.len()),
            }
        }
    }

    /// Protobuf publication data: the bytes are kept exactly, and a JSON subscriber of the
    /// channel gets them intact (JSON as itself, anything else base64).
    #[test]
    fn protobuf_publish_data_reaches_json_subscribers(data in data_bytes()) {
        let (frame, _) = frame_of(&[proto::Command {
            id: 1,
            publish: Some(proto::PublishRequest { channel: "c".into(), data: data.clone() }),
            ..Default::default()
        }]);
        let decoded = proto::decode_commands(&frame).expect("valid frame");
        check_data(&decoded[0].publish.as_ref().expect("publish").data, &data)?;
    }

    /// Cursors made by `format_cursor` (1 to 64 channels, any offsets, alphanumeric epochs,
    /// empty ones too) parse back to the same positions, and only for the same channel count.
    #[test]
    fn formatted_cursors_parse_back(
        positions in prop::collection::vec((offset(), "[a-zA-Z0-9]{0,12}"), 1..=64),
    ) {
        let tuples: Vec<(Arc<str>, u64, Arc<str>)> = positions
            .iter()
            .enumerate()
            .map(|(i, (offset, epoch))| {
                (Arc::from(format!("ch{i}").as_str()), *offset, Arc::from(epoch.as_str()))
            })
            .collect();
        let text = format_cursor(&tuples);
        let parsed = parse_cursor(&text, positions.len()).expect("a cursor we formatted");
        let got: Vec<(u64, String)> = parsed.into_iter().map(|p| (p.offset, p.epoch)).collect();
        prop_assert_eq!(&got, &positions);
        for wrong in [positions.len() - 1, positions.len() + 1] {
            let err = parse_cursor(&text, wrong).expect_err("wrong channel count");
            prop_assert_eq!(err.code, ErrorCode::BadRequest);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fixed cases found by or guarding the properties above

/// Deep nesting cannot overflow the stack: in a typed field it is refused; in `data` (kept as
/// raw JSON text) or an ignored field it is accepted without recursion. Unterminated or deeply
/// nested Protobuf groups in unknown fields hit prost's recursion limit.
#[test]
fn deep_nesting_is_bounded() {
    let depth = 50_000;
    let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let typed = format!(r#"{{"id":1,"subscribe":{deep}}}"#);
    assert!(Encoding::Json.decode_text(&typed).is_err());
    let data = format!(r#"{{"id":1,"publish":{{"channel":"c","data":{deep}}}}}"#);
    let decoded = Encoding::Json.decode_text(&data).expect("raw data");
    let publish = decoded[0].publish.as_ref().expect("publish");
    assert_eq!(publish.data.bytes().len(), 2 * depth);
    let ignored = format!(r#"{{"id":1,"x":{deep}}}"#);
    assert_eq!(
        Encoding::Json.decode_text(&ignored).map(|c| c[0].id).ok(),
        Some(1)
    );

    // Field 100, wire type 3 (start group), nested 10 000 times inside a Command.
    let mut body = vec![0x08, 0x01];
    for _ in 0..10_000 {
        body.extend_from_slice(&[0xA3, 0x06]);
    }
    let mut frame = Vec::new();
    prost::encoding::encode_varint(body.len() as u64, &mut frame);
    frame.extend_from_slice(&body);
    assert!(proto::decode_commands(&frame).is_err());
}

/// Regression (found by the property above): a Protobuf client's publication data that is a
/// JSON string holding bytes that are not UTF-8 (`"\xff"`) was classified as JSON, and JSON
/// subscribers were sent `"data":null`. It is binary now, so they get it as base64.
#[test]
fn protobuf_data_with_invalid_utf8_in_a_json_string_reaches_json_subscribers() {
    let data = Bytes::from_static(b"\"\xff\"");
    let (frame, _) = frame_of(&[proto::Command {
        id: 1,
        publish: Some(proto::PublishRequest {
            channel: "c".into(),
            data: data.clone(),
        }),
        ..Default::default()
    }]);
    let decoded = proto::decode_commands(&frame).expect("valid frame");
    let payload = &decoded[0].publish.as_ref().expect("publish").data;
    assert_eq!(payload.bytes(), &data);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&data);
    assert_eq!(
        protocol::data_json(payload).get(),
        format!("\"{b64}\""),
        "a JSON subscriber must get the bytes (base64), not {payload:?} shown as null"
    );
}
