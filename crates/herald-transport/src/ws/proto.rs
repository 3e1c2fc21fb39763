//! The Protobuf encoding of the Centrifugo client protocol v2 (`client.proto`, package
//! `centrifugal.centrifuge.protocol`), selected with the WebSocket subprotocol
//! `centrifuge-protobuf`. Messages are declared here with `prost` derives, so no `protoc` is
//! needed at build time; only the fields Herald reads or writes are declared (unknown fields
//! are skipped on decode, as Protobuf requires).
//!
//! Framing: a WebSocket binary message holds one or more varint-length-delimited messages.
//! An empty `Reply` (the single byte `0x00`) is the server's ping; an empty `Command` is the
//! client's pong. This module owns only the wire types and their conversion to and from the
//! encoding-neutral types in [`super::protocol`]; it touches nothing else.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use herald_core::publication::{ClientInfo as CoreClientInfo, Payload, StreamPosition};
use prost::Message;

use super::protocol as neutral;

#[derive(Clone, PartialEq, Message)]
pub struct Command {
    #[prost(uint32, tag = "1")]
    pub id: u32,
    #[prost(message, optional, tag = "4")]
    pub connect: Option<ConnectRequest>,
    #[prost(message, optional, tag = "5")]
    pub subscribe: Option<SubscribeRequest>,
    #[prost(message, optional, tag = "6")]
    pub unsubscribe: Option<ChannelRequest>,
    #[prost(message, optional, tag = "7")]
    pub publish: Option<PublishRequest>,
    #[prost(message, optional, tag = "8")]
    pub presence: Option<ChannelRequest>,
    #[prost(message, optional, tag = "9")]
    pub presence_stats: Option<ChannelRequest>,
    #[prost(message, optional, tag = "10")]
    pub history: Option<HistoryRequest>,
    #[prost(message, optional, tag = "11")]
    pub ping: Option<EmptyMessage>,
    #[prost(message, optional, tag = "12")]
    pub send: Option<DataRequest>,
    #[prost(message, optional, tag = "13")]
    pub rpc: Option<RpcRequest>,
    #[prost(message, optional, tag = "14")]
    pub refresh: Option<TokenRequest>,
    #[prost(message, optional, tag = "15")]
    pub sub_refresh: Option<SubRefreshRequest>,
}

#[derive(Clone, PartialEq, Message)]
pub struct EmptyMessage {}

#[derive(Clone, PartialEq, Message)]
pub struct ConnectRequest {
    #[prost(string, tag = "1")]
    pub token: String,
    #[prost(bytes = "bytes", tag = "2")]
    pub data: Bytes,
    #[prost(map = "string, message", tag = "3")]
    pub subs: HashMap<String, SubscribeRequest>,
    #[prost(string, tag = "4")]
    pub name: String,
    #[prost(string, tag = "5")]
    pub version: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct SubscribeRequest {
    #[prost(string, tag = "1")]
    pub channel: String,
    #[prost(string, tag = "2")]
    pub token: String,
    #[prost(bool, tag = "3")]
    pub recover: bool,
    #[prost(string, tag = "6")]
    pub epoch: String,
    #[prost(uint64, tag = "7")]
    pub offset: u64,
    #[prost(bytes = "bytes", tag = "8")]
    pub data: Bytes,
    #[prost(bool, tag = "9")]
    pub positioned: bool,
    #[prost(bool, tag = "10")]
    pub recoverable: bool,
    #[prost(bool, tag = "11")]
    pub join_leave: bool,
    #[prost(int64, tag = "14")]
    pub flag: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct ChannelRequest {
    #[prost(string, tag = "1")]
    pub channel: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct PublishRequest {
    #[prost(string, tag = "1")]
    pub channel: String,
    #[prost(bytes = "bytes", tag = "2")]
    pub data: Bytes,
}

#[derive(Clone, PartialEq, Message)]
pub struct StreamPositionMessage {
    #[prost(uint64, tag = "1")]
    pub offset: u64,
    #[prost(string, tag = "2")]
    pub epoch: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct HistoryRequest {
    #[prost(string, tag = "1")]
    pub channel: String,
    #[prost(int32, tag = "7")]
    pub limit: i32,
    #[prost(message, optional, tag = "8")]
    pub since: Option<StreamPositionMessage>,
    #[prost(bool, tag = "9")]
    pub reverse: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct DataRequest {
    #[prost(bytes = "bytes", tag = "1")]
    pub data: Bytes,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpcRequest {
    #[prost(bytes = "bytes", tag = "1")]
    pub data: Bytes,
    #[prost(string, tag = "2")]
    pub method: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct TokenRequest {
    #[prost(string, tag = "1")]
    pub token: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct SubRefreshRequest {
    #[prost(string, tag = "1")]
    pub channel: String,
    #[prost(string, tag = "2")]
    pub token: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct Reply {
    #[prost(uint32, tag = "1")]
    pub id: u32,
    #[prost(message, optional, tag = "2")]
    pub error: Option<Error>,
    #[prost(message, optional, tag = "4")]
    pub push: Option<Push>,
    #[prost(message, optional, tag = "5")]
    pub connect: Option<ConnectResult>,
    #[prost(message, optional, tag = "6")]
    pub subscribe: Option<SubscribeResult>,
    #[prost(message, optional, tag = "7")]
    pub unsubscribe: Option<EmptyMessage>,
    #[prost(message, optional, tag = "8")]
    pub publish: Option<EmptyMessage>,
    #[prost(message, optional, tag = "9")]
    pub presence: Option<PresenceResult>,
    #[prost(message, optional, tag = "10")]
    pub presence_stats: Option<PresenceStatsResult>,
    #[prost(message, optional, tag = "11")]
    pub history: Option<HistoryResult>,
    #[prost(message, optional, tag = "12")]
    pub ping: Option<EmptyMessage>,
    #[prost(message, optional, tag = "13")]
    pub rpc: Option<RpcResult>,
    #[prost(message, optional, tag = "14")]
    pub refresh: Option<RefreshResult>,
    #[prost(message, optional, tag = "15")]
    pub sub_refresh: Option<SubRefreshResult>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpcResult {
    #[prost(bytes = "bytes", tag = "1")]
    pub data: Bytes,
}

#[derive(Clone, PartialEq, Message)]
pub struct SubRefreshResult {
    #[prost(bool, tag = "1")]
    pub expires: bool,
    #[prost(uint32, tag = "2")]
    pub ttl: u32,
}

#[derive(Clone, PartialEq, Message)]
pub struct Unsubscribe {
    #[prost(uint32, tag = "2")]
    pub code: u32,
    #[prost(string, tag = "3")]
    pub reason: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct Error {
    #[prost(uint32, tag = "1")]
    pub code: u32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(bool, tag = "3")]
    pub temporary: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct Push {
    #[prost(string, tag = "2")]
    pub channel: String,
    #[prost(message, optional, tag = "4")]
    pub publication: Option<Publication>,
    #[prost(message, optional, tag = "5")]
    pub join: Option<JoinLeave>,
    #[prost(message, optional, tag = "6")]
    pub leave: Option<JoinLeave>,
    #[prost(message, optional, tag = "7")]
    pub unsubscribe: Option<Unsubscribe>,
    #[prost(message, optional, tag = "11")]
    pub disconnect: Option<Disconnect>,
}

/// The last push of a connection whose transport has no close frame of its own (gRPC).
#[derive(Clone, PartialEq, Message)]
pub struct Disconnect {
    #[prost(uint32, tag = "1")]
    pub code: u32,
    #[prost(string, tag = "2")]
    pub reason: String,
    #[prost(bool, tag = "3")]
    pub reconnect: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct JoinLeave {
    #[prost(message, optional, tag = "1")]
    pub info: Option<ClientInfo>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ClientInfo {
    #[prost(string, tag = "1")]
    pub user: String,
    #[prost(string, tag = "2")]
    pub client: String,
    #[prost(bytes = "bytes", tag = "3")]
    pub conn_info: Bytes,
    #[prost(bytes = "bytes", tag = "4")]
    pub chan_info: Bytes,
}

#[derive(Clone, PartialEq, Message)]
pub struct Publication {
    #[prost(bytes = "bytes", tag = "4")]
    pub data: Bytes,
    #[prost(message, optional, tag = "5")]
    pub info: Option<ClientInfo>,
    #[prost(uint64, tag = "6")]
    pub offset: u64,
    #[prost(btree_map = "string, string", tag = "7")]
    pub tags: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ConnectResult {
    #[prost(string, tag = "1")]
    pub client: String,
    #[prost(string, tag = "2")]
    pub version: String,
    #[prost(bool, tag = "3")]
    pub expires: bool,
    #[prost(uint32, tag = "4")]
    pub ttl: u32,
    #[prost(bytes = "bytes", tag = "5")]
    pub data: Bytes,
    #[prost(btree_map = "string, message", tag = "6")]
    pub subs: std::collections::BTreeMap<String, SubscribeResult>,
    #[prost(uint32, tag = "7")]
    pub ping: u32,
    #[prost(bool, tag = "8")]
    pub pong: bool,
    #[prost(string, tag = "10")]
    pub node: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct SubscribeResult {
    #[prost(bool, tag = "1")]
    pub expires: bool,
    #[prost(uint32, tag = "2")]
    pub ttl: u32,
    #[prost(bool, tag = "3")]
    pub recoverable: bool,
    #[prost(string, tag = "6")]
    pub epoch: String,
    #[prost(message, repeated, tag = "7")]
    pub publications: Vec<Publication>,
    #[prost(bool, tag = "8")]
    pub recovered: bool,
    #[prost(uint64, tag = "9")]
    pub offset: u64,
    #[prost(bool, tag = "10")]
    pub positioned: bool,
    #[prost(bool, tag = "12")]
    pub was_recovering: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct HistoryResult {
    #[prost(message, repeated, tag = "1")]
    pub publications: Vec<Publication>,
    #[prost(string, tag = "2")]
    pub epoch: String,
    #[prost(uint64, tag = "3")]
    pub offset: u64,
}

#[derive(Clone, PartialEq, Message)]
pub struct PresenceResult {
    #[prost(map = "string, message", tag = "1")]
    pub presence: HashMap<String, ClientInfo>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PresenceStatsResult {
    #[prost(uint32, tag = "1")]
    pub num_clients: u32,
    #[prost(uint32, tag = "2")]
    pub num_users: u32,
}

#[derive(Clone, PartialEq, Message)]
pub struct RefreshResult {
    #[prost(string, tag = "1")]
    pub client: String,
    #[prost(string, tag = "2")]
    pub version: String,
    #[prost(bool, tag = "3")]
    pub expires: bool,
    #[prost(uint32, tag = "4")]
    pub ttl: u32,
}

/// The server's ping: an empty `Reply`, length-delimited (one zero byte).
pub const PING: &[u8] = &[0];

/// Splits one binary WebSocket message into commands. Any malformed or truncated message
/// fails the whole frame (the caller closes the connection as a bad request).
pub fn decode_commands(mut frame: &[u8]) -> Result<Vec<neutral::Command>, prost::DecodeError> {
    let mut commands = Vec::new();
    while !frame.is_empty() {
        let command = Command::decode_length_delimited(&mut frame)?;
        commands.push(command.into());
    }
    Ok(commands)
}

/// One command that is a whole message of its own (a gRPC stream's message), not
/// length-delimited. An empty message is a pong.
pub fn decode_command(message: &[u8]) -> Result<neutral::Command, prost::DecodeError> {
    Command::decode(message).map(Into::into)
}

/// A queued frame (one length-delimited `Reply`, see [`encode_reply`]) as the `Reply` message
/// alone, for transports that frame messages themselves (gRPC). Shares the frame's bytes.
/// `None` for a frame that is not one whole reply.
pub fn reply_message(frame: &Bytes) -> Option<Bytes> {
    let mut rest = &frame[..];
    let len = prost::decode_length_delimiter(&mut rest).ok()?;
    let start = frame.len() - rest.len();
    (rest.len() == len).then(|| frame.slice(start..))
}

/// One reply, length-delimited, ready to be concatenated with others into a frame.
pub fn encode_reply(reply: &Reply) -> Bytes {
    let mut out = BytesMut::with_capacity(reply.encoded_len() + 5);
    // Encoding into a buffer that grows cannot fail.
    let _ = reply.encode_length_delimited(&mut out);
    out.freeze()
}

/// Protobuf data fields carry bytes; bytes that are valid JSON (UTF-8) are kept as JSON so JSON
/// subscribers of the same channel get them natively, anything else is binary.
fn payload_from_bytes(data: Bytes) -> Payload {
    // `IgnoredAny` does not check UTF-8 inside strings: test the text first, or bytes like
    // `"\xff"` would pass as JSON and reach JSON subscribers as `null`.
    if std::str::from_utf8(&data).is_ok()
        && serde_json::from_slice::<serde::de::IgnoredAny>(&data).is_ok()
    {
        Payload::Json(data)
    } else {
        Payload::Binary(data)
    }
}

fn optional_payload(data: Bytes) -> Option<Payload> {
    (!data.is_empty()).then(|| payload_from_bytes(data))
}

impl From<SubscribeRequest> for neutral::SubscribeRequest {
    fn from(r: SubscribeRequest) -> Self {
        Self {
            channel: r.channel,
            token: r.token,
            recover: r.recover,
            epoch: r.epoch,
            offset: r.offset,
            data: optional_payload(r.data),
            positioned: r.positioned,
            recoverable: r.recoverable,
            join_leave: r.join_leave,
            flag: u64::try_from(r.flag).unwrap_or(0),
        }
    }
}

impl From<Command> for neutral::Command {
    fn from(c: Command) -> Self {
        let channel = |r: ChannelRequest| neutral::ChannelRequest { channel: r.channel };
        Self {
            id: c.id,
            connect: c.connect.map(|r| neutral::ConnectRequest {
                token: r.token,
                data: optional_payload(r.data),
                subs: r.subs.into_iter().map(|(k, v)| (k, v.into())).collect(),
                name: r.name,
                version: r.version,
            }),
            subscribe: c.subscribe.map(Into::into),
            unsubscribe: c.unsubscribe.map(channel),
            publish: c.publish.map(|r| neutral::PublishRequest {
                channel: r.channel,
                data: payload_from_bytes(r.data),
            }),
            presence: c.presence.map(channel),
            presence_stats: c.presence_stats.map(channel),
            history: c.history.map(|r| neutral::HistoryRequest {
                channel: r.channel,
                limit: r.limit,
                since: r.since.map(|s| StreamPosition::new(s.offset, s.epoch)),
                reverse: r.reverse,
            }),
            ping: c.ping.map(|_| serde::de::IgnoredAny),
            send: c.send.map(|r| neutral::SendRequest {
                data: optional_payload(r.data),
            }),
            rpc: c.rpc.map(|r| neutral::RpcRequest {
                data: optional_payload(r.data),
                method: r.method,
            }),
            refresh: c
                .refresh
                .map(|r| neutral::RefreshRequest { token: r.token }),
            sub_refresh: c.sub_refresh.map(|r| neutral::SubRefreshRequest {
                channel: r.channel,
                token: r.token,
            }),
        }
    }
}

fn raw_bytes(raw: Option<&serde_json::value::RawValue>) -> Bytes {
    raw.map_or_else(Bytes::new, |r| Bytes::copy_from_slice(r.get().as_bytes()))
}

impl From<&CoreClientInfo> for ClientInfo {
    fn from(info: &CoreClientInfo) -> Self {
        Self {
            user: info.user.clone(),
            client: info.client.clone(),
            conn_info: raw_bytes(info.conn_info.as_deref()),
            chan_info: raw_bytes(info.chan_info.as_deref()),
        }
    }
}

impl From<&neutral::WirePublication> for Publication {
    fn from(p: &neutral::WirePublication) -> Self {
        Self {
            // JSON data travels as its text, binary as itself: no base64 in this encoding.
            data: p.data.bytes().clone(),
            info: p.info.as_ref().map(ClientInfo::from),
            offset: p.offset,
            tags: p.tags.clone(),
        }
    }
}

impl From<&neutral::SubscribeResult> for SubscribeResult {
    fn from(r: &neutral::SubscribeResult) -> Self {
        Self {
            expires: r.expires,
            ttl: r.ttl,
            recoverable: r.recoverable,
            epoch: r.epoch.clone(),
            publications: r.publications.iter().map(Publication::from).collect(),
            recovered: r.recovered,
            offset: r.offset,
            positioned: r.positioned,
            was_recovering: r.was_recovering,
        }
    }
}

/// A `bytes` field for optional data (empty when there is none).
fn optional_bytes(data: Option<&Payload>) -> Bytes {
    data.map_or_else(Bytes::new, |d| d.bytes().clone())
}

/// The Protobuf `Reply` for an encoding-neutral result.
pub fn reply_for(id: u32, body: &neutral::ResultBody<'_>) -> Reply {
    let mut reply = Reply {
        id,
        ..Default::default()
    };
    match body {
        neutral::ResultBody::Connect(r) => {
            reply.connect = Some(ConnectResult {
                client: r.client.clone(),
                version: r.version.clone(),
                expires: r.expires,
                ttl: r.ttl,
                subs: r
                    .subs
                    .iter()
                    .map(|(k, v)| (k.clone(), SubscribeResult::from(v)))
                    .collect(),
                ping: r.ping,
                pong: r.pong,
                node: r.node.clone(),
                data: optional_bytes(r.data.as_ref()),
            });
        }
        neutral::ResultBody::Subscribe(r) => reply.subscribe = Some(SubscribeResult::from(*r)),
        neutral::ResultBody::Unsubscribe => reply.unsubscribe = Some(EmptyMessage {}),
        neutral::ResultBody::Publish => reply.publish = Some(EmptyMessage {}),
        neutral::ResultBody::History(r) => {
            reply.history = Some(HistoryResult {
                publications: r.publications.iter().map(Publication::from).collect(),
                epoch: r.epoch.clone(),
                offset: r.offset,
            });
        }
        neutral::ResultBody::Presence(r) => {
            reply.presence = Some(PresenceResult {
                presence: r
                    .presence
                    .iter()
                    .map(|(k, v)| (k.clone(), ClientInfo::from(v)))
                    .collect(),
            });
        }
        neutral::ResultBody::PresenceStats(r) => {
            reply.presence_stats = Some(PresenceStatsResult {
                num_clients: u32::try_from(r.num_clients).unwrap_or(u32::MAX),
                num_users: u32::try_from(r.num_users).unwrap_or(u32::MAX),
            });
        }
        neutral::ResultBody::Rpc(r) => {
            reply.rpc = Some(RpcResult {
                data: optional_bytes(r.data.as_ref()),
            });
        }
        neutral::ResultBody::SubRefresh(r) => {
            reply.sub_refresh = Some(SubRefreshResult {
                expires: r.expires,
                ttl: r.ttl,
            });
        }
        neutral::ResultBody::Refresh(r) => {
            reply.refresh = Some(RefreshResult {
                client: r.client.clone(),
                version: r.version.clone(),
                expires: r.expires,
                ttl: r.ttl,
            });
        }
    }
    reply
}

/// A push (publication, join or leave) as a length-delimited `Reply`.
pub fn push_reply(channel: &str, push: PushBody) -> Bytes {
    let mut body = Push {
        channel: channel.to_owned(),
        ..Default::default()
    };
    match push {
        PushBody::Publication(p) => body.publication = Some(p),
        PushBody::Join(info) => body.join = Some(JoinLeave { info: Some(info) }),
        PushBody::Leave(info) => body.leave = Some(JoinLeave { info: Some(info) }),
        PushBody::Unsubscribe { code, reason } => {
            body.unsubscribe = Some(Unsubscribe {
                code,
                reason: reason.to_owned(),
            });
        }
        PushBody::Disconnect {
            code,
            reason,
            reconnect,
        } => {
            body.disconnect = Some(Disconnect {
                code,
                reason: reason.to_owned(),
                reconnect,
            });
        }
    }
    encode_reply(&Reply {
        push: Some(body),
        ..Default::default()
    })
}

pub enum PushBody {
    Publication(Publication),
    Join(ClientInfo),
    Leave(ClientInfo),
    Unsubscribe {
        code: u32,
        reason: &'static str,
    },
    Disconnect {
        code: u32,
        reason: &'static str,
        reconnect: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_several_length_delimited_commands_and_a_pong() {
        let mut frame = BytesMut::new();
        Command {
            id: 1,
            subscribe: Some(SubscribeRequest {
                channel: "news".into(),
                recover: true,
                offset: 7,
                epoch: "e".into(),
                flag: 2,
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_length_delimited(&mut frame)
        .expect("encode");
        Command::default()
            .encode_length_delimited(&mut frame)
            .expect("encode");
        let commands = decode_commands(&frame).expect("decode");
        assert_eq!(commands.len(), 2);
        let sub = commands[0].subscribe.as_ref().expect("subscribe");
        assert_eq!((sub.channel.as_str(), sub.offset, sub.flag), ("news", 7, 2));
        assert!(sub.recover);
        assert_eq!(commands[1].id, 0);
        assert!(commands[1].connect.is_none() && commands[1].subscribe.is_none());
    }

    #[test]
    fn a_reply_frame_is_its_message_after_the_length_prefix() {
        let frame = push_reply(
            "news",
            PushBody::Unsubscribe {
                code: 2000,
                reason: "server unsubscribe",
            },
        );
        let message = reply_message(&frame).expect("one reply");
        let reply = Reply::decode(message.clone()).expect("decode");
        assert_eq!(reply.push.expect("push").channel, "news");
        assert_eq!(message.len() + 1, frame.len());
        assert_eq!(
            reply_message(&Bytes::from_static(PING))
                .expect("ping")
                .len(),
            0
        );
        assert!(reply_message(&frame.slice(..frame.len() - 1)).is_none());
        let command = decode_command(&[]).expect("an empty command is a pong");
        assert!(command.id == 0 && command.connect.is_none());
    }

    #[test]
    fn truncated_frames_are_rejected() {
        let mut frame = BytesMut::new();
        Command {
            id: 9,
            publish: Some(PublishRequest {
                channel: "c".into(),
                data: Bytes::from_static(b"{\"a\":1}"),
            }),
            ..Default::default()
        }
        .encode_length_delimited(&mut frame)
        .expect("encode");
        assert!(decode_commands(&frame[..frame.len() - 2]).is_err());
        assert!(decode_commands(&[0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn publish_data_keeps_json_as_json_and_other_bytes_binary() {
        assert!(matches!(
            payload_from_bytes(Bytes::from_static(b"{\"a\":1}")),
            Payload::Json(_)
        ));
        assert!(matches!(
            payload_from_bytes(Bytes::from_static(&[0, 159, 146])),
            Payload::Binary(_)
        ));
    }

    #[test]
    fn ping_is_an_empty_length_delimited_reply() {
        assert_eq!(&encode_reply(&Reply::default())[..], PING);
    }
}
