//! Which encoding a WebSocket connection speaks — JSON in text frames or Protobuf in binary
//! frames, chosen once at the upgrade — and everything that differs between the two:
//! decoding a frame into commands, encoding replies, errors, pings and pushes, and joining
//! queued messages into one frame. The session logic above it is written once for both.

use std::sync::Arc;

use axum::extract::ws::{Message, Utf8Bytes};
use bytes::{Bytes, BytesMut};
use herald_core::HeraldError;
use herald_core::publication::ChannelEvent;

use super::proto;
use super::protocol::{self, Command, ResultBody, WirePublication};
use crate::outbound::{EventEncoder, Frame};

/// The WebSocket subprotocol that selects Protobuf (what the official SDKs send).
pub const PROTOBUF_SUBPROTOCOL: &str = "centrifuge-protobuf";
/// The subprotocol that names JSON explicitly (JSON is also the default without one).
pub const JSON_SUBPROTOCOL: &str = "centrifuge-json";

/// The publication's encoding slot for JSON pushes, shared by every JSON connection.
pub const JSON_PUSH_SLOT: usize = 0;
/// The publication's encoding slot for Protobuf pushes.
pub const PROTOBUF_PUSH_SLOT: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Protobuf,
}

/// A frame the connection cannot accept: wrong frame type or undecodable content.
#[derive(Debug)]
pub struct Malformed;

impl Encoding {
    /// The encoding a client asked for: the `centrifuge-protobuf` subprotocol, or
    /// `?format=protobuf` in the URL (for clients that cannot set subprotocols).
    pub fn negotiate(subprotocol: Option<&str>, query: Option<&str>) -> Self {
        let by_query = query.is_some_and(|q| {
            form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == "format" && v == "protobuf")
        });
        if subprotocol == Some(PROTOBUF_SUBPROTOCOL) || by_query {
            Self::Protobuf
        } else {
            Self::Json
        }
    }

    pub fn reply(self, id: u32, body: &ResultBody<'_>) -> Bytes {
        match self {
            Self::Json => protocol::json_reply(id, body),
            Self::Protobuf => proto::encode_reply(&proto::reply_for(id, body)),
        }
    }

    pub fn error(self, id: u32, error: &HeraldError) -> Bytes {
        let (code, message, temporary) = protocol::error_fields(error);
        self.error_with(id, code, message, temporary)
    }

    /// An error reply with any code and message (a backend's own errors).
    pub fn error_with(self, id: u32, code: u32, message: &str, temporary: bool) -> Bytes {
        match self {
            Self::Json => protocol::error_reply_with(id, code, message, temporary),
            Self::Protobuf => proto::encode_reply(&proto::Reply {
                id,
                error: Some(proto::Error {
                    code,
                    message: message.to_owned(),
                    temporary,
                }),
                ..Default::default()
            }),
        }
    }

    /// The protocol name for the backend proxy.
    pub fn name(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Protobuf => "protobuf",
        }
    }

    /// The server's ping (an empty reply).
    pub fn ping(self) -> Bytes {
        match self {
            Self::Json => Bytes::from_static(protocol::PING),
            Self::Protobuf => Bytes::from_static(proto::PING),
        }
    }

    /// A server-side unsubscribe of `channel` (codes from 2500 ask the client to subscribe
    /// again, e.g. 2501 when a subscription token expired).
    pub fn unsubscribe_push(self, channel: &str, code: u32, reason: &'static str) -> Bytes {
        match self {
            Self::Json => protocol::push(
                channel,
                "unsubscribe",
                &serde_json::json!({ "code": code, "reason": reason }),
            ),
            Self::Protobuf => {
                proto::push_reply(channel, proto::PushBody::Unsubscribe { code, reason })
            }
        }
    }

    /// The commands in one incoming text frame.
    pub fn decode_text(self, text: &str) -> Result<Vec<Command>, Malformed> {
        match self {
            Self::Json => text
                .split('\n')
                .filter(|line| !line.trim().is_empty())
                .map(|line| serde_json::from_str(line).map_err(|_| Malformed))
                .collect(),
            Self::Protobuf => Err(Malformed),
        }
    }

    /// The commands in one incoming binary frame.
    pub fn decode_binary(self, bytes: &[u8]) -> Result<Vec<Command>, Malformed> {
        match self {
            Self::Json => Err(Malformed),
            Self::Protobuf => proto::decode_commands(bytes).map_err(|_| Malformed),
        }
    }

    /// Several queued messages as one WebSocket message: JSON objects one per line in a text
    /// frame, or length-delimited Protobuf replies back to back in a binary frame.
    pub fn message(self, frames: &[Frame]) -> Message {
        let separator: &[u8] = match self {
            Self::Json => b"\n",
            Self::Protobuf => b"",
        };
        let bytes = if let [only] = frames {
            only.bytes.clone()
        } else {
            let size = frames.iter().map(|f| f.bytes.len() + 1).sum();
            let mut out = BytesMut::with_capacity(size);
            for (i, frame) in frames.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(separator);
                }
                out.extend_from_slice(&frame.bytes);
            }
            out.freeze()
        };
        match self {
            // Every JSON frame is text we produced, hence UTF-8.
            Self::Json => Message::Text(
                Utf8Bytes::try_from(bytes).unwrap_or_else(|_| Utf8Bytes::from_static("{}")),
            ),
            Self::Protobuf => Message::Binary(bytes),
        }
    }
}

/// Encodes channel events as protocol pushes in one encoding; publications are encoded once
/// per event and encoding (a slot per encoding) and shared by every such connection.
pub struct PushEncoder {
    pub encoding: Encoding,
    pub join_leave: bool,
}

impl PushEncoder {
    /// The encoder for an encoding and join/leave choice, shared by every subscription that
    /// makes the same choice (one allocation per process instead of one per subscription).
    pub fn shared(encoding: Encoding, join_leave: bool) -> Arc<dyn EventEncoder> {
        static ENCODERS: std::sync::LazyLock<[Arc<dyn EventEncoder>; 4]> =
            std::sync::LazyLock::new(|| {
                let make = |encoding, join_leave| {
                    Arc::new(PushEncoder {
                        encoding,
                        join_leave,
                    }) as Arc<dyn EventEncoder>
                };
                [
                    make(Encoding::Json, false),
                    make(Encoding::Json, true),
                    make(Encoding::Protobuf, false),
                    make(Encoding::Protobuf, true),
                ]
            });
        let index = usize::from(encoding == Encoding::Protobuf) * 2 + usize::from(join_leave);
        ENCODERS[index].clone()
    }
}

impl EventEncoder for PushEncoder {
    fn encode(&self, event: &ChannelEvent) -> Option<Frame> {
        let bytes = match (self.encoding, event) {
            (Encoding::Json, ChannelEvent::Publication(p)) => p.encoded(JSON_PUSH_SLOT, |p| {
                protocol::push(&p.channel, "pub", &WirePublication::from(&p.publication))
            }),
            (Encoding::Protobuf, ChannelEvent::Publication(p)) => {
                p.encoded(PROTOBUF_PUSH_SLOT, |p| {
                    let publication = WirePublication::from(&p.publication);
                    proto::push_reply(
                        &p.channel,
                        proto::PushBody::Publication((&publication).into()),
                    )
                })
            }
            (encoding, ChannelEvent::Join { channel, info }) if self.join_leave => match encoding {
                Encoding::Json => {
                    protocol::push(channel, "join", &serde_json::json!({ "info": &**info }))
                }
                Encoding::Protobuf => {
                    proto::push_reply(channel, proto::PushBody::Join((&**info).into()))
                }
            },
            (encoding, ChannelEvent::Leave { channel, info }) if self.join_leave => {
                match encoding {
                    Encoding::Json => {
                        protocol::push(channel, "leave", &serde_json::json!({ "info": &**info }))
                    }
                    Encoding::Protobuf => {
                        proto::push_reply(channel, proto::PushBody::Leave((&**info).into()))
                    }
                }
            }
            _ => return None,
        };
        Some(bytes.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiates_protobuf_by_subprotocol_or_query() {
        assert_eq!(
            Encoding::negotiate(Some("centrifuge-protobuf"), None),
            Encoding::Protobuf
        );
        assert_eq!(
            Encoding::negotiate(None, Some("format=protobuf")),
            Encoding::Protobuf
        );
        assert_eq!(
            Encoding::negotiate(Some("centrifuge-json"), Some("x=1")),
            Encoding::Json
        );
        assert_eq!(Encoding::negotiate(None, None), Encoding::Json);
    }

    #[test]
    fn joins_frames_per_encoding() {
        let frames: Vec<Frame> = vec![
            Bytes::from_static(b"{\"a\":1}").into(),
            Bytes::from_static(b"{}").into(),
        ];
        match Encoding::Json.message(&frames) {
            Message::Text(text) => assert_eq!(text.as_str(), "{\"a\":1}\n{}"),
            other => panic!("expected text, got {other:?}"),
        }
        let frames: Vec<Frame> = vec![
            Bytes::from_static(&[2, 8, 1]).into(),
            Bytes::from_static(&[0]).into(),
        ];
        match Encoding::Protobuf.message(&frames) {
            Message::Binary(bytes) => assert_eq!(&bytes[..], &[2, 8, 1, 0]),
            other => panic!("expected binary, got {other:?}"),
        }
    }

    #[test]
    fn text_frames_are_malformed_in_protobuf_and_binary_in_json() {
        assert!(Encoding::Protobuf.decode_text("{}").is_err());
        assert!(Encoding::Json.decode_binary(&[0]).is_err());
        assert_eq!(
            Encoding::Protobuf.decode_binary(&[0]).map(|c| c.len()).ok(),
            Some(1)
        );
    }
}
