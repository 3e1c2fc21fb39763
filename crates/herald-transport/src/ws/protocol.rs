//! The Centrifugo client protocol v2: commands from clients, results and pushes to them, as
//! encoding-neutral types, and their JSON encoding (the Protobuf one is in [`super::proto`]).
//! Field names follow `client.proto`; empty fields are omitted, as the official SDKs expect.
//! Data fields hold a [`Payload`]: JSON text in the JSON encoding, any bytes in Protobuf.

use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use herald_core::publication::{ClientInfo, Payload, Publication, StreamPosition};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// One client command. A command with no method (`{}`) is a pong.
#[derive(Debug, Default, Deserialize)]
pub struct Command {
    #[serde(default)]
    pub id: u32,
    pub connect: Option<ConnectRequest>,
    pub subscribe: Option<SubscribeRequest>,
    pub unsubscribe: Option<ChannelRequest>,
    pub publish: Option<PublishRequest>,
    pub presence: Option<ChannelRequest>,
    pub presence_stats: Option<ChannelRequest>,
    pub history: Option<HistoryRequest>,
    pub ping: Option<serde::de::IgnoredAny>,
    pub send: Option<SendRequest>,
    pub rpc: Option<RpcRequest>,
    pub refresh: Option<RefreshRequest>,
    pub sub_refresh: Option<SubRefreshRequest>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ConnectRequest {
    #[serde(default)]
    pub token: String,
    #[serde(default, deserialize_with = "optional_json_payload")]
    pub data: Option<Payload>,
    #[serde(default)]
    pub subs: HashMap<String, SubscribeRequest>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub version: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct SubscribeRequest {
    #[serde(default)]
    pub channel: String,
    #[serde(default)]
    pub token: String,
    #[serde(default)]
    pub recover: bool,
    #[serde(default)]
    pub epoch: String,
    #[serde(default)]
    pub offset: u64,
    #[serde(default, deserialize_with = "optional_json_payload")]
    pub data: Option<Payload>,
    #[serde(default)]
    pub positioned: bool,
    #[serde(default)]
    pub recoverable: bool,
    #[serde(default)]
    pub join_leave: bool,
    /// SDK capability bits: 1 = channel ids in pushes (ignored; we always send names),
    /// 2 = answer error 112 instead of `recovered: false`.
    #[serde(default)]
    pub flag: u64,
}

#[derive(Debug, Default, Deserialize)]
pub struct ChannelRequest {
    #[serde(default)]
    pub channel: String,
}

#[derive(Debug, Deserialize)]
pub struct PublishRequest {
    #[serde(default)]
    pub channel: String,
    #[serde(deserialize_with = "json_payload")]
    pub data: Payload,
}

#[derive(Debug, Default, Deserialize)]
pub struct HistoryRequest {
    #[serde(default)]
    pub channel: String,
    #[serde(default)]
    pub limit: i32,
    pub since: Option<StreamPosition>,
    #[serde(default)]
    pub reverse: bool,
}

#[derive(Debug, Deserialize)]
pub struct SendRequest {
    #[serde(default, deserialize_with = "optional_json_payload")]
    pub data: Option<Payload>,
}

#[derive(Debug, Deserialize)]
pub struct RpcRequest {
    #[serde(default, deserialize_with = "optional_json_payload")]
    pub data: Option<Payload>,
    #[serde(default)]
    pub method: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct RefreshRequest {
    #[serde(default)]
    pub token: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct SubRefreshRequest {
    #[serde(default)]
    pub channel: String,
    #[serde(default)]
    pub token: String,
}

/// A JSON `data` field, kept as its text.
fn json_payload<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Payload, D::Error> {
    let raw = Box::<RawValue>::deserialize(deserializer)?;
    Ok(Payload::Json(Bytes::from(String::from(Box::<str>::from(
        raw,
    )))))
}

fn optional_json_payload<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Payload>, D::Error> {
    let raw = Option::<Box<RawValue>>::deserialize(deserializer)?;
    Ok(raw.map(|raw| Payload::Json(Bytes::from(String::from(Box::<str>::from(raw))))))
}

fn serialize_payload<S: Serializer>(payload: &Payload, serializer: S) -> Result<S::Ok, S::Error> {
    data_json(payload).serialize(serializer)
}

fn serialize_optional_payload<S: Serializer>(
    payload: &Option<Payload>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match payload {
        Some(payload) => data_json(payload).serialize(serializer),
        None => serializer.serialize_none(),
    }
}

fn is_false(value: &bool) -> bool {
    !*value
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

fn is_zero_u32(value: &u32) -> bool {
    *value == 0
}

#[derive(Debug, Default, Serialize)]
pub struct ConnectResult {
    pub client: String,
    pub version: String,
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub ttl: u32,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub subs: BTreeMap<String, SubscribeResult>,
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub ping: u32,
    #[serde(skip_serializing_if = "is_false")]
    pub pong: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// From the connect proxy's `data`, for the client.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_optional_payload"
    )]
    pub data: Option<Payload>,
}

#[derive(Debug, Default, Serialize)]
pub struct SubscribeResult {
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub ttl: u32,
    #[serde(skip_serializing_if = "is_false")]
    pub recoverable: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub epoch: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub publications: Vec<WirePublication>,
    #[serde(skip_serializing_if = "is_false")]
    pub recovered: bool,
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u64,
    #[serde(skip_serializing_if = "is_false")]
    pub positioned: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub was_recovering: bool,
}

#[derive(Debug, Serialize)]
pub struct HistoryResult {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub publications: Vec<WirePublication>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub epoch: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u64,
}

#[derive(Debug, Serialize)]
pub struct PresenceResult {
    pub presence: HashMap<String, ClientInfo>,
}

#[derive(Debug, Serialize)]
pub struct PresenceStatsResult {
    pub num_clients: u64,
    pub num_users: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct RefreshResult {
    pub client: String,
    pub version: String,
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub ttl: u32,
}

/// The backend's answer to an `rpc` command.
#[derive(Debug, Default, Serialize)]
pub struct RpcResult {
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_optional_payload"
    )]
    pub data: Option<Payload>,
}

#[derive(Debug, Default, Serialize)]
pub struct SubRefreshResult {
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub ttl: u32,
}

#[derive(Debug, Default, Serialize)]
pub struct Empty {}

/// A publication as the protocol carries it.
#[derive(Debug, Serialize)]
pub struct WirePublication {
    #[serde(serialize_with = "serialize_payload")]
    pub data: Payload,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<ClientInfo>,
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// Binary payloads cannot travel in JSON frames verbatim: they go as a base64 JSON string.
pub fn data_json(payload: &Payload) -> Box<RawValue> {
    let text = match payload {
        Payload::Json(bytes) => String::from_utf8(bytes.to_vec()).ok(),
        Payload::Binary(bytes) => {
            serde_json::to_string(&base64::engine::general_purpose::STANDARD.encode(bytes)).ok()
        }
    };
    text.and_then(|t| RawValue::from_string(t).ok())
        .unwrap_or_else(|| RawValue::from_string("null".into()).expect("null is JSON"))
}

impl From<&Publication> for WirePublication {
    fn from(publication: &Publication) -> Self {
        Self {
            data: publication.data.clone(),
            info: publication.info.as_deref().cloned(),
            offset: publication.offset,
            tags: publication.tags.clone(),
        }
    }
}

/// A command's successful result, whatever the encoding.
#[derive(Debug)]
pub enum ResultBody<'a> {
    Connect(&'a ConnectResult),
    Subscribe(&'a SubscribeResult),
    Unsubscribe,
    Publish,
    History(&'a HistoryResult),
    Presence(&'a PresenceResult),
    PresenceStats(&'a PresenceStatsResult),
    Refresh(&'a RefreshResult),
    SubRefresh(&'a SubRefreshResult),
    Rpc(&'a RpcResult),
}

/// The JSON reply for a result.
pub fn json_reply(id: u32, body: &ResultBody<'_>) -> Bytes {
    match body {
        ResultBody::Connect(r) => reply(id, "connect", r),
        ResultBody::Subscribe(r) => reply(id, "subscribe", r),
        ResultBody::Unsubscribe => reply(id, "unsubscribe", &Empty {}),
        ResultBody::Publish => reply(id, "publish", &Empty {}),
        ResultBody::History(r) => reply(id, "history", r),
        ResultBody::Presence(r) => reply(id, "presence", r),
        ResultBody::PresenceStats(r) => reply(id, "presence_stats", r),
        ResultBody::Refresh(r) => reply(id, "refresh", r),
        ResultBody::SubRefresh(r) => reply(id, "sub_refresh", r),
        ResultBody::Rpc(r) => reply(id, "rpc", r),
    }
}

/// `{"id":N,"<key>":<result>}` as bytes.
pub fn reply<T: Serialize>(id: u32, key: &str, result: &T) -> Bytes {
    let mut out = BytesMut::with_capacity(64);
    out.put_slice(b"{\"id\":");
    out.put_slice(id.to_string().as_bytes());
    out.put_slice(b",\"");
    out.put_slice(key.as_bytes());
    out.put_slice(b"\":");
    // Serialising our own result types cannot fail (no maps with non-string keys).
    let body = serde_json::to_vec(result).unwrap_or_else(|_| b"{}".to_vec());
    out.put_slice(&body);
    out.put_u8(b'}');
    out.freeze()
}

#[derive(Debug, Serialize)]
struct ErrorBody<'a> {
    code: u32,
    message: &'a str,
    #[serde(skip_serializing_if = "is_false")]
    temporary: bool,
}

/// What an error reply carries: code, message and whether retrying may help.
pub fn error_fields(error: &herald_core::HeraldError) -> (u32, &'static str, bool) {
    let code = error.code;
    let temporary = error.unavailable
        || matches!(
            code,
            herald_core::ErrorCode::Internal | herald_core::ErrorCode::TooManyRequests
        );
    (code.as_u32(), code.message(), temporary)
}

/// `{"id":N,"error":{"code":C,"message":M}}`.
pub fn error_reply(id: u32, error: &herald_core::HeraldError) -> Bytes {
    let (code, message, temporary) = error_fields(error);
    error_reply_with(id, code, message, temporary)
}

/// An error reply with any code and message (a backend's own errors).
pub fn error_reply_with(id: u32, code: u32, message: &str, temporary: bool) -> Bytes {
    let body = ErrorBody {
        code,
        message,
        temporary,
    };
    let text = serde_json::to_string(&body).unwrap_or_default();
    Bytes::from(format!("{{\"id\":{id},\"error\":{text}}}"))
}

/// The server's ping: an empty JSON object.
pub const PING: &[u8] = b"{}";

/// `{"push":{"channel":C,"<kind>":<body>}}`.
pub fn push<T: Serialize>(channel: &str, kind: &str, body: &T) -> Bytes {
    #[derive(Serialize)]
    struct Push<'a, T> {
        channel: &'a str,
        #[serde(flatten)]
        body: HashMap<&'a str, &'a T>,
    }
    let mut map = HashMap::with_capacity(1);
    map.insert(kind, body);
    let inner = Push { channel, body: map };
    let text = serde_json::to_vec(&inner).unwrap_or_default();
    // Sized exactly: a queued frame holds its whole allocation, and `format!` or a growing
    // buffer would keep up to twice the length (the process budget counts the length).
    let mut out = Vec::with_capacity(text.len() + 9);
    out.extend_from_slice(b"{\"push\":");
    out.extend_from_slice(&text);
    out.push(b'}');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands_and_pong() {
        let cmd: Command = serde_json::from_str(
            r#"{"id":3,"subscribe":{"channel":"c","recover":true,"offset":5,"epoch":"e"}}"#,
        )
        .expect("parse");
        assert_eq!(cmd.id, 3);
        let sub = cmd.subscribe.expect("subscribe");
        assert!(sub.recover);
        assert_eq!(sub.offset, 5);
        let pong: Command = serde_json::from_str("{}").expect("pong");
        assert!(pong.connect.is_none() && pong.id == 0);
    }

    #[test]
    fn encodes_replies_and_pushes() {
        let reply = reply(
            1,
            "subscribe",
            &SubscribeResult {
                recoverable: true,
                epoch: "e".into(),
                offset: 3,
                ..Default::default()
            },
        );
        assert_eq!(
            &reply[..],
            br#"{"id":1,"subscribe":{"recoverable":true,"epoch":"e","offset":3}}"#
        );
        let push = push(
            "c",
            "join",
            &serde_json::json!({"info": {"client": "x", "user": "u"}}),
        );
        assert_eq!(
            &push[..],
            br#"{"push":{"channel":"c","join":{"info":{"client":"x","user":"u"}}}}"#
        );
        let err = error_reply(
            2,
            &herald_core::HeraldError::new(herald_core::ErrorCode::PermissionDenied, "x"),
        );
        assert_eq!(
            &err[..],
            br#"{"id":2,"error":{"code":103,"message":"permission denied"}}"#
        );
    }
}
