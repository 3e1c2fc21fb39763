//! The gRPC wire format for `herald-bench grpc`, by hand: the few Protobuf fields the
//! scenario writes (`PublishRequest`, `BatchRequest`, the uni stream's `ConnectRequest`) and
//! reads (which fields a reply has), and gRPC's 5-byte message framing. No generated code:
//! the load generator stays small and cheap per request.
//!
//! May touch: nothing (pure functions).

use bytes::{Buf, Bytes, BytesMut};

pub(crate) fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A length-delimited field (strings, bytes, messages).
pub(crate) fn put_field(out: &mut Vec<u8>, number: u32, bytes: &[u8]) {
    put_varint(out, u64::from(number << 3 | 2));
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

pub(crate) fn publish_request(channel: &str, data: &str) -> Vec<u8> {
    let mut out = Vec::new();
    put_field(&mut out, 1, channel.as_bytes());
    put_field(&mut out, 2, data.as_bytes());
    out
}

/// `BatchRequest { commands: [Command { publish }], parallel: true }`.
pub(crate) fn batch_request(channels: &[String], data: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for channel in channels {
        let mut command = Vec::new();
        put_field(&mut command, 4, &publish_request(channel, data));
        put_field(&mut out, 1, &command);
    }
    out.extend_from_slice(&[2 << 3, 1]);
    out
}

/// `ConnectRequest { token, subs: { channel: SubscribeRequest {} } }`.
pub(crate) fn consume_request(token: &str, channel: &str) -> Vec<u8> {
    let mut out = Vec::new();
    if !token.is_empty() {
        put_field(&mut out, 1, token.as_bytes());
    }
    let mut entry = Vec::new();
    put_field(&mut entry, 1, channel.as_bytes());
    put_field(&mut entry, 2, &[]);
    put_field(&mut out, 3, &entry);
    out
}

pub(crate) fn get_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(value);
        }
    }
    None
}

/// The numbers of a message's top-level fields, and the bytes of length-delimited ones.
pub(crate) fn fields(mut buf: &[u8]) -> Option<Vec<(u32, &[u8])>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = get_varint(&mut buf)?;
        let number = (key >> 3) as u32;
        match key & 7 {
            0 => {
                get_varint(&mut buf)?;
                out.push((number, &[][..]));
            }
            2 => {
                let len = usize::try_from(get_varint(&mut buf)?).ok()?;
                let (value, rest) = (buf.get(..len)?, buf.get(len..)?);
                buf = rest;
                out.push((number, value));
            }
            _ => return None,
        }
    }
    Some(out)
}

/// The gRPC message framing: uncompressed, 4-byte big-endian length.
pub(crate) fn grpc_frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(message.len() + 5);
    out.extend_from_slice(&[0]);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out.freeze()
}

/// Splits whole gRPC messages off the front of `buf`.
pub(crate) fn next_message(buf: &mut BytesMut) -> Option<Bytes> {
    if buf.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return None;
    }
    buf.advance(5);
    Some(buf.split_to(len).freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_encoded_messages_read_back() {
        let request = publish_request("news", "{\"a\":1}");
        let top = fields(&request).expect("decodes");
        assert_eq!(top, vec![(1, &b"news"[..]), (2, &b"{\"a\":1}"[..])]);
        let batch = batch_request(&["a".into(), "b".into()], "1");
        let top = fields(&batch).expect("decodes");
        assert_eq!(top.iter().filter(|(n, _)| *n == 1).count(), 2);
        assert!(top.iter().any(|(n, _)| *n == 2));
        let mut framed = BytesMut::from(&grpc_frame(&request)[..]);
        assert_eq!(next_message(&mut framed).as_deref(), Some(&request[..]));
        assert!(framed.is_empty());
    }
}
