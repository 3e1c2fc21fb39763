//! The bytes the Redis engine keeps in streams and sends over pub/sub.
//!
//! Owns: the layout of a stored publication (one stream field) and of a pub/sub message
//! (a publication with its position, a join or a leave). The publish script prepends the
//! position it assigned, so a publication is encoded once, before its offset is known.
//!
//! Layouts (integers big-endian):
//! - stored publication (the stream entry's `p` field; its offset is the entry id and its
//!   expiry the `x` field): `1 | flags(1: bit 0 binary) | time_ms(8) | tags_len(4) tags JSON
//!   | info_len(4) info JSON | data`;
//! - pub/sub message: `P<offset>:<epoch>:<stored publication>` (offset 0 and an empty epoch
//!   when not stored), `J<client info JSON>` or `L<client info JSON>`.
//!
//! May touch: nothing; pure functions over values and bytes.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use herald_core::publication::{ChannelEvent, ClientInfo, Payload, Publication, PublicationEvent};

const VERSION: u8 = 1;
const HEADER: usize = 1 + 1 + 8;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("malformed entry: {0}")]
    Malformed(&'static str),
}

/// Encodes a publication for the stream (its offset is the entry id, not in the bytes).
pub fn encode_publication(publication: &Publication) -> Result<Vec<u8>, CodecError> {
    let tags = if publication.tags.is_empty() {
        Vec::new()
    } else {
        serde_json::to_vec(&publication.tags)?
    };
    let info = match &publication.info {
        Some(info) => serde_json::to_vec(&**info)?,
        None => Vec::new(),
    };
    let (binary, data) = match &publication.data {
        Payload::Json(data) => (0u8, data),
        Payload::Binary(data) => (1u8, data),
    };
    let mut out = Vec::with_capacity(HEADER + 8 + tags.len() + info.len() + data.len());
    out.push(VERSION);
    out.push(binary);
    out.extend_from_slice(&publication.time_ms.to_be_bytes());
    for part in [&tags, &info] {
        let len = u32::try_from(part.len()).map_err(|_| CodecError::Malformed("part too long"))?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(part);
    }
    out.extend_from_slice(data);
    Ok(out)
}

/// A stored publication.
pub fn decode_publication(offset: u64, bytes: &Bytes) -> Result<Publication, CodecError> {
    if bytes.len() < HEADER + 8 || bytes[0] != VERSION {
        return Err(CodecError::Malformed("unknown version or short header"));
    }
    let word = |at: usize| {
        let mut buf = [0u8; 8];
        buf.copy_from_slice(&bytes[at..at + 8]);
        u64::from_be_bytes(buf)
    };
    let binary = bytes[1] & 1 == 1;
    let time_ms = word(2);
    let mut at = HEADER;
    let mut part = || -> Result<Bytes, CodecError> {
        let mut len = [0u8; 4];
        len.copy_from_slice(
            bytes
                .get(at..at + 4)
                .ok_or(CodecError::Malformed("short part length"))?,
        );
        let len = u32::from_be_bytes(len) as usize;
        let start = at + 4;
        let end = start
            .checked_add(len)
            .filter(|end| *end <= bytes.len())
            .ok_or(CodecError::Malformed("part past the end"))?;
        at = end;
        Ok(bytes.slice(start..end))
    };
    let tags = part()?;
    let info = part()?;
    let tags: BTreeMap<String, String> = if tags.is_empty() {
        BTreeMap::new()
    } else {
        serde_json::from_slice(&tags)?
    };
    let info = if info.is_empty() {
        None
    } else {
        Some(Arc::new(serde_json::from_slice::<ClientInfo>(&info)?))
    };
    let data = bytes.slice(at..);
    let data = if binary {
        Payload::Binary(data)
    } else {
        Payload::Json(data)
    };
    Ok(Publication {
        offset,
        time_ms,
        data,
        tags,
        info,
    })
}

/// The pub/sub message for a join or leave.
pub fn encode_presence_event(event: &ChannelEvent) -> Result<Option<Vec<u8>>, CodecError> {
    let (kind, info) = match event {
        ChannelEvent::Join { info, .. } => (b'J', info),
        ChannelEvent::Leave { info, .. } => (b'L', info),
        _ => return Ok(None),
    };
    let mut out = vec![kind];
    serde_json::to_writer(&mut out, &**info)?;
    Ok(Some(out))
}

/// Decodes a pub/sub message of `channel`.
pub fn decode_message(channel: &Arc<str>, bytes: Bytes) -> Result<ChannelEvent, CodecError> {
    let kind = *bytes
        .first()
        .ok_or(CodecError::Malformed("empty message"))?;
    match kind {
        b'P' => {
            let rest = bytes.slice(1..);
            let colon = |from: usize| {
                rest[from..]
                    .iter()
                    .position(|b| *b == b':')
                    .map(|p| p + from)
                    .ok_or(CodecError::Malformed("no position"))
            };
            let first = colon(0)?;
            let second = colon(first + 1)?;
            let offset = std::str::from_utf8(&rest[..first])
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(CodecError::Malformed("bad offset"))?;
            let epoch = std::str::from_utf8(&rest[first + 1..second])
                .map_err(|_| CodecError::Malformed("bad epoch"))?;
            let publication = decode_publication(offset, &rest.slice(second + 1..))?;
            Ok(ChannelEvent::Publication(Arc::new(PublicationEvent::new(
                channel.clone(),
                Arc::from(epoch),
                publication,
            ))))
        }
        b'J' | b'L' => {
            let info = Arc::new(serde_json::from_slice::<ClientInfo>(&bytes[1..])?);
            let channel = channel.clone();
            Ok(if kind == b'J' {
                ChannelEvent::Join { channel, info }
            } else {
                ChannelEvent::Leave { channel, info }
            })
        }
        _ => Err(CodecError::Malformed("unknown message kind")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publication(binary: bool) -> Publication {
        let data = Bytes::from_static(b"{\"a\":1}");
        Publication {
            offset: 0,
            time_ms: 1234,
            data: if binary {
                Payload::Binary(data)
            } else {
                Payload::Json(data)
            },
            tags: BTreeMap::from([("k".to_owned(), "v".to_owned())]),
            info: Some(Arc::new(ClientInfo {
                client: "c".into(),
                user: "u".into(),
                conn_info: None,
                chan_info: None,
            })),
        }
    }

    #[test]
    fn publications_round_trip_through_stream_and_pubsub() {
        for binary in [false, true] {
            let original = publication(binary);
            let stored = encode_publication(&original).expect("encode");
            let decoded = decode_publication(7, &Bytes::from(stored.clone())).expect("decode");
            assert_eq!(
                decoded,
                Publication {
                    offset: 7,
                    ..original.clone()
                }
            );
            let mut message = b"P7:ep:".to_vec();
            message.extend_from_slice(&stored);
            let channel: Arc<str> = Arc::from("ch");
            match decode_message(&channel, Bytes::from(message)).expect("message") {
                ChannelEvent::Publication(event) => {
                    assert_eq!(&*event.epoch, "ep");
                    assert_eq!(event.publication.offset, 7);
                    assert_eq!(event.publication.data, original.data);
                }
                other => panic!("expected a publication, got {other:?}"),
            }
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let channel: Arc<str> = Arc::from("ch");
        for bytes in [&b""[..], b"P", b"P1:", b"Px:e:", b"P1:e:\x01", b"J{", b"Z"] {
            assert!(decode_message(&channel, Bytes::copy_from_slice(bytes)).is_err());
        }
        assert!(decode_publication(1, &Bytes::from_static(&[1; 20])).is_err());
        let mut huge = vec![1u8, 0];
        huge.extend_from_slice(&[0; 8]);
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        huge.extend_from_slice(&[0; 8]);
        assert!(decode_publication(1, &Bytes::from(huge)).is_err());
    }
}
