//! The little of MQTT 3.1.1 the benchmark speaks, to Mosquitto and to Herald's MQTT listener
//! alike: the packets a subscriber and a publisher send (CONNECT, SUBSCRIBE, PUBLISH at QoS 0
//! or 1, PUBACK, PINGREQ, DISCONNECT) and a reader for what servers send back, parsed from a
//! byte stream that may be split anywhere.
//!
//! A load generator's own codec, not a client library: no session state, no QoS 2, no
//! properties (MQTT 5 is not needed to compare fan-out and memory). Owns only the wire format.

/// What the server sent.
#[derive(Debug, PartialEq, Eq)]
pub enum MqttEvent {
    /// CONNACK: session present, return code (0 accepted).
    ConnAck {
        session_present: bool,
        code: u8,
    },
    /// SUBACK: one granted QoS (or 0x80, refused) per topic.
    SubAck {
        packet_id: u16,
        granted: Vec<u8>,
    },
    Publish {
        topic: String,
        payload: Vec<u8>,
        qos: u8,
        /// 0 at QoS 0.
        packet_id: u16,
    },
    PubAck {
        packet_id: u16,
    },
    PingResp,
    /// Any other packet type (its fixed header's first byte).
    Other(u8),
}

/// The largest packet the reader accepts; a larger one is an error (the benchmark's payloads
/// are a few hundred bytes).
const MAX_PACKET: usize = 1 << 20;

/// The remaining-length field: 7 bits per byte, low bits first.
fn put_length(out: &mut Vec<u8>, mut length: usize) {
    loop {
        let mut byte = (length % 128) as u8;
        length /= 128;
        if length > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if length == 0 {
            return;
        }
    }
}

fn put_str(out: &mut Vec<u8>, text: &[u8]) {
    let length = u16::try_from(text.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(&text[..usize::from(length)]);
}

fn packet(out: &mut Vec<u8>, first: u8, body: &[u8]) {
    out.push(first);
    put_length(out, body.len());
    out.extend_from_slice(body);
}

/// CONNECT, protocol level 4 (3.1.1), clean session; the password (a Herald connection token)
/// goes with a username, as 3.1.1 requires.
pub fn connect(out: &mut Vec<u8>, client_id: &str, keep_alive_s: u16, password: Option<&str>) {
    let mut body = Vec::with_capacity(64 + password.map_or(0, str::len));
    put_str(&mut body, b"MQTT");
    body.push(4);
    let mut flags = 0x02; // clean session
    if password.is_some() {
        flags |= 0x80 | 0x40; // username, password
    }
    body.push(flags);
    body.extend_from_slice(&keep_alive_s.to_be_bytes());
    put_str(&mut body, client_id.as_bytes());
    if let Some(password) = password {
        put_str(&mut body, b"herald-bench");
        put_str(&mut body, password.as_bytes());
    }
    packet(out, 0x10, &body);
}

/// SUBSCRIBE to one topic filter at `qos`.
pub fn subscribe(out: &mut Vec<u8>, packet_id: u16, topic: &str, qos: u8) {
    let mut body = Vec::with_capacity(topic.len() + 5);
    body.extend_from_slice(&packet_id.to_be_bytes());
    put_str(&mut body, topic.as_bytes());
    body.push(qos);
    packet(out, 0x82, &body);
}

/// PUBLISH at QoS 0 (`packet_id` ignored) or 1.
pub fn publish(out: &mut Vec<u8>, topic: &str, payload: &[u8], qos: u8, packet_id: u16) {
    let qos = qos.min(1);
    out.push(0x30 | (qos << 1));
    let id_len = if qos > 0 { 2 } else { 0 };
    put_length(out, 2 + topic.len() + id_len + payload.len());
    put_str(out, topic.as_bytes());
    if qos > 0 {
        out.extend_from_slice(&packet_id.to_be_bytes());
    }
    out.extend_from_slice(payload);
}

pub fn puback(out: &mut Vec<u8>, packet_id: u16) {
    out.extend_from_slice(&[0x40, 2]);
    out.extend_from_slice(&packet_id.to_be_bytes());
}

pub const PINGREQ: [u8; 2] = [0xC0, 0];
pub const DISCONNECT: [u8; 2] = [0xE0, 0];

/// Server-to-client packets from a byte stream.
#[derive(Debug, Default)]
pub struct MqttReader {
    buf: Vec<u8>,
}

impl MqttReader {
    /// Adds `data` and hands every complete packet to `on_event`.
    pub fn feed(
        &mut self,
        data: &[u8],
        on_event: &mut impl FnMut(MqttEvent),
    ) -> Result<(), String> {
        self.buf.extend_from_slice(data);
        let mut used = 0;
        while let Some((first, start, end)) = frame(&self.buf[used..])? {
            let body = &self.buf[used + start..used + end];
            on_event(decode(first, body)?);
            used += end;
        }
        self.buf.drain(..used);
        if self.buf.is_empty() && self.buf.capacity() > 4096 {
            self.buf = Vec::new();
        }
        Ok(())
    }
}

/// The first byte and the body's bounds of the first whole packet in `data`, if there is one.
fn frame(data: &[u8]) -> Result<Option<(u8, usize, usize)>, String> {
    let Some(&first) = data.first() else {
        return Ok(None);
    };
    let mut length = 0usize;
    for (i, &byte) in data.iter().enumerate().skip(1).take(4) {
        length |= usize::from(byte & 0x7F) << (7 * (i - 1));
        if byte & 0x80 == 0 {
            if length > MAX_PACKET {
                return Err(format!("an MQTT packet of {length} bytes"));
            }
            let start = i + 1;
            return Ok((data.len() >= start + length).then_some((first, start, start + length)));
        }
    }
    if data.len() > 4 {
        return Err("a malformed MQTT remaining length".to_owned());
    }
    Ok(None)
}

fn u16_at(body: &[u8], at: usize) -> Result<u16, String> {
    body.get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or_else(|| "a truncated MQTT packet".to_owned())
}

fn decode(first: u8, body: &[u8]) -> Result<MqttEvent, String> {
    Ok(match first >> 4 {
        2 => MqttEvent::ConnAck {
            session_present: body.first().is_some_and(|f| f & 1 == 1),
            code: *body.get(1).ok_or("a truncated CONNACK")?,
        },
        3 => {
            let qos = (first >> 1) & 3;
            let topic_len = usize::from(u16_at(body, 0)?);
            let topic = body
                .get(2..2 + topic_len)
                .ok_or("a truncated PUBLISH topic")?;
            let mut at = 2 + topic_len;
            let packet_id = if qos > 0 {
                at += 2;
                u16_at(body, at - 2)?
            } else {
                0
            };
            MqttEvent::Publish {
                topic: String::from_utf8_lossy(topic).into_owned(),
                payload: body[at.min(body.len())..].to_vec(),
                qos,
                packet_id,
            }
        }
        4 => MqttEvent::PubAck {
            packet_id: u16_at(body, 0)?,
        },
        9 => MqttEvent::SubAck {
            packet_id: u16_at(body, 0)?,
            granted: body.get(2..).unwrap_or_default().to_vec(),
        },
        13 => MqttEvent::PingResp,
        _ => MqttEvent::Other(first),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_length_encoding() {
        for (length, bytes) in [
            (0usize, vec![0u8]),
            (127, vec![0x7F]),
            (128, vec![0x80, 0x01]),
            (16_383, vec![0xFF, 0x7F]),
            (16_384, vec![0x80, 0x80, 0x01]),
        ] {
            let mut out = Vec::new();
            put_length(&mut out, length);
            assert_eq!(out, bytes, "{length}");
        }
    }

    #[test]
    fn connect_and_subscribe_bytes() {
        let mut out = Vec::new();
        connect(&mut out, "c1", 60, None);
        assert_eq!(
            out,
            [
                0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'c', b'1'
            ]
        );
        out.clear();
        subscribe(&mut out, 7, "a/b", 1);
        assert_eq!(out, [0x82, 8, 0, 7, 0, 3, b'a', b'/', b'b', 1]);
    }

    #[test]
    fn a_stream_split_anywhere() {
        let mut stream = vec![0x20, 2, 0, 0, 0x90, 3, 0, 1, 0x80];
        publish(&mut stream, "t/1", b"hello", 0, 0);
        let big = vec![b'x'; 300];
        publish(&mut stream, "t/2", &big, 1, 9);
        stream.extend_from_slice(&[0x40, 2, 0, 9, 0xD0, 0]);
        for split in 0..stream.len() {
            let mut reader = MqttReader::default();
            let mut events = Vec::new();
            reader
                .feed(&stream[..split], &mut |e| events.push(e))
                .expect("first part");
            reader
                .feed(&stream[split..], &mut |e| events.push(e))
                .expect("second part");
            assert_eq!(
                events,
                vec![
                    MqttEvent::ConnAck {
                        session_present: false,
                        code: 0
                    },
                    MqttEvent::SubAck {
                        packet_id: 1,
                        granted: vec![0x80]
                    },
                    MqttEvent::Publish {
                        topic: "t/1".into(),
                        payload: b"hello".to_vec(),
                        qos: 0,
                        packet_id: 0
                    },
                    MqttEvent::Publish {
                        topic: "t/2".into(),
                        payload: big.clone(),
                        qos: 1,
                        packet_id: 9
                    },
                    MqttEvent::PubAck { packet_id: 9 },
                    MqttEvent::PingResp,
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn oversized_and_malformed_lengths_are_errors() {
        let mut reader = MqttReader::default();
        assert!(
            reader
                .feed(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F], &mut |_| {})
                .is_err()
        );
        let mut reader = MqttReader::default();
        assert!(
            reader
                .feed(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF], &mut |_| {})
                .is_err()
        );
    }
}
