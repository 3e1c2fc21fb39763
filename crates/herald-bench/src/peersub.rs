//! The fan-out worker's subscribers to Herald's peers, one protocol each: set up a
//! subscription, then read publications until the connection ends.
//!
//! Owns the protocol details, nothing else; counting is [`crate::worker`]'s (`State`), and
//! publications are recognised by the payload's time and sequence number
//! ([`crate::push::peer_fields`]), wherever the protocol puts them.
//!
//! - **Plain** (the ceiling server, the Node `ws` server): WebSocket on `/sub/<channel>`;
//!   subscribed once the handshake is done (both servers subscribe before replying `101`);
//!   every text frame is one publication.
//! - **NATS** over its WebSocket listener: `CONNECT`, `SUB <channel> 1` and `PING` in one
//!   frame, subscribed at the `PONG`; `MSG` lines and their payloads are parsed from the byte
//!   stream (frames may split them anywhere); `PING` is answered with `PONG`.
//! - **Socket.IO** v5 on Engine.IO v4, WebSocket only: `0{…}` open, `40` connect,
//!   `420["join","<channel>"]` answered by the ack `430[…]`; Engine.IO ping `2` is answered
//!   with `3`; publications are `42["m","<payload>"]` events.
//! - **Pusher** (Sockudo): `/app/<key>?protocol=7`, `pusher:connection_established`, then
//!   `pusher:subscribe` until `pusher_internal:subscription_succeeded`; `pusher:ping` is
//!   answered with `pusher:pong`.
//! - **Pushpin**, SSE: `GET /stream/<channel>` through Pushpin; the GRIP origin holds it on
//!   the channel and its first event is `subscribed`.
//! - **Pushpin**, WebSocket: `/ws/<channel>` through Pushpin, which hands the opening to the
//!   GRIP origin over WebSocket-over-HTTP; the origin subscribes the connection to the
//!   channel and its first message is `subscribed`; after that it is read as **Plain**.
//! - **MQTT** 3.1.1 over TCP (Mosquitto, Herald's MQTT listener): `CONNECT` (the token, if
//!   any, as the password) and `SUBSCRIBE <channel>` at QoS 0 in one write, subscribed at the
//!   `SUBACK`; every `PUBLISH` on the topic is one publication (QoS 1 ones are acknowledged);
//!   a `PINGREQ` goes out every half keep-alive.

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::mqtt::{self, MqttEvent, MqttReader};
use crate::push;
use crate::sseclient::SseClient;
use crate::worker::{Ctx, Transport, Ws};

/// A subscribed connection to a peer.
pub enum PeerConnection {
    Ws(Box<Ws>, Protocol),
    Sse(SseClient),
    Mqtt(TcpStream, MqttReader),
}

/// Per-connection protocol state.
pub enum Protocol {
    Plain,
    Nats(NatsReader),
    Socketio,
    Pusher,
}

/// Subscribes to `channel` on the peer `ctx.transport` names.
pub async fn setup(ctx: &Ctx, channel: &str) -> Result<PeerConnection, String> {
    match ctx.transport {
        Transport::Plain => {
            let ws = ctx.ws_connect(&format!("/sub/{channel}")).await?;
            Ok(PeerConnection::Ws(Box::new(ws), Protocol::Plain))
        }
        Transport::Nats => nats_setup(ctx, channel).await,
        Transport::Socketio => socketio_setup(ctx, channel).await,
        Transport::Pusher => pusher_setup(ctx, channel).await,
        Transport::PushpinSse => pushpin_setup(ctx, channel).await,
        Transport::PushpinWs => pushpin_ws_setup(ctx, channel).await,
        Transport::Mqtt => mqtt_setup(ctx, channel).await,
        Transport::Ws | Transport::Sse => Err("not a peer's transport".to_owned()),
    }
}

/// The next text or binary message, answering nothing; errors as text.
async fn next_data(ws: &mut Ws, what: &str) -> Result<Vec<u8>, String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => return Ok(text.as_bytes().to_vec()),
            Some(Ok(Message::Binary(data))) => return Ok(data.to_vec()),
            Some(Ok(Message::Close(frame))) => {
                return Err(format!(
                    "closed while {what}: {}",
                    frame.map_or_else(
                        || "no reason".to_owned(),
                        |f| format!("{} {}", f.code, f.reason)
                    )
                ));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("read while {what}: {e}")),
            None => return Err(format!("the server closed the connection while {what}")),
        }
    }
}

async fn send(ws: &mut Ws, message: Message) -> Result<(), String> {
    ws.send(message).await.map_err(|e| format!("send: {e}"))
}

/// What the NATS protocol stream held.
#[derive(Debug, PartialEq, Eq)]
pub enum NatsEvent {
    Msg {
        subject: String,
        payload: Vec<u8>,
    },
    Ping,
    Pong,
    Err(String),
    /// `INFO`, `+OK`.
    Other,
}

/// NATS server-to-client protocol, parsed from a byte stream that may be split anywhere.
#[derive(Debug, Default)]
pub struct NatsReader {
    buf: Vec<u8>,
}

impl NatsReader {
    /// Adds `data` and hands every complete operation to `on_event`.
    pub fn feed(
        &mut self,
        data: &[u8],
        on_event: &mut impl FnMut(NatsEvent),
    ) -> Result<(), String> {
        self.buf.extend_from_slice(data);
        let mut used = 0;
        while let Some(end) = find_crlf(&self.buf[used..]) {
            let line = &self.buf[used..used + end];
            let Some(args) = line.strip_prefix(b"MSG ") else {
                on_event(match line {
                    b"PING" => NatsEvent::Ping,
                    b"PONG" => NatsEvent::Pong,
                    _ if line.starts_with(b"-ERR") => {
                        NatsEvent::Err(String::from_utf8_lossy(line).into_owned())
                    }
                    _ => NatsEvent::Other,
                });
                used += end + 2;
                continue;
            };
            // MSG <subject> <sid> [reply-to] <#bytes>
            let args = String::from_utf8_lossy(args);
            let parts: Vec<&str> = args.split_ascii_whitespace().collect();
            let (Some(subject), Some(size)) = (parts.first(), parts.last()) else {
                return Err(format!("bad MSG line: {args}"));
            };
            let size: usize = size.parse().map_err(|_| format!("bad MSG size: {args}"))?;
            let start = used + end + 2;
            if self.buf.len() < start + size + 2 {
                break;
            }
            on_event(NatsEvent::Msg {
                subject: (*subject).to_owned(),
                payload: self.buf[start..start + size].to_vec(),
            });
            used = start + size + 2;
        }
        self.buf.drain(..used);
        if self.buf.len() > 1 << 20 {
            return Err("a NATS operation larger than 1 MiB".to_owned());
        }
        // Give back a buffer grown by a burst.
        if self.buf.is_empty() && self.buf.capacity() > 4096 {
            self.buf = Vec::new();
        }
        Ok(())
    }
}

fn find_crlf(data: &[u8]) -> Option<usize> {
    data.windows(2).position(|w| w == b"\r\n")
}

async fn nats_setup(ctx: &Ctx, channel: &str) -> Result<PeerConnection, String> {
    let mut ws = ctx.ws_connect("/").await?;
    let hello = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"echo\":false,\"name\":\"herald-bench\"}}\r\nSUB {channel} 1\r\nPING\r\n"
    );
    send(&mut ws, Message::binary(hello.into_bytes())).await?;
    let mut reader = NatsReader::default();
    loop {
        let data = next_data(&mut ws, "subscribing").await?;
        let mut pong = false;
        let mut error = None;
        reader.feed(&data, &mut |event| match event {
            NatsEvent::Pong => pong = true,
            NatsEvent::Err(e) => error = Some(e),
            _ => {}
        })?;
        if let Some(error) = error {
            return Err(format!("NATS: {error}"));
        }
        if pong {
            return Ok(PeerConnection::Ws(Box::new(ws), Protocol::Nats(reader)));
        }
    }
}

async fn socketio_setup(ctx: &Ctx, channel: &str) -> Result<PeerConnection, String> {
    let mut ws = ctx
        .ws_connect("/socket.io/?EIO=4&transport=websocket")
        .await?;
    let open = next_data(&mut ws, "opening").await?;
    if !open.starts_with(b"0") {
        return Err(format!(
            "expected an Engine.IO open packet, got {:.80}",
            String::from_utf8_lossy(&open)
        ));
    }
    send(&mut ws, Message::text("40")).await?;
    let mut joined = false;
    loop {
        let packet = next_data(&mut ws, "connecting").await?;
        match packet.as_slice() {
            b"2" => send(&mut ws, Message::text("3")).await?,
            p if p.starts_with(b"40") && !joined => {
                let join = format!("420[\"join\",{}]", serde_json::Value::from(channel));
                send(&mut ws, Message::text(join)).await?;
                joined = true;
            }
            p if p.starts_with(b"430") => {
                return Ok(PeerConnection::Ws(Box::new(ws), Protocol::Socketio));
            }
            p if p.starts_with(b"44") || p.starts_with(b"41") => {
                return Err(format!(
                    "Socket.IO refused: {:.120}",
                    String::from_utf8_lossy(p)
                ));
            }
            _ => {}
        }
    }
}

async fn pusher_setup(ctx: &Ctx, channel: &str) -> Result<PeerConnection, String> {
    let key = ctx
        .app_key
        .as_deref()
        .ok_or("Pusher needs the application key (--app-key)")?;
    let mut ws = ctx
        .ws_connect(&format!(
            "/app/{key}?protocol=7&client=herald-bench&version=1.0"
        ))
        .await?;
    let mut subscribing = false;
    loop {
        let message = next_data(&mut ws, "subscribing").await?;
        let text = String::from_utf8_lossy(&message);
        if text.contains("\"pusher:connection_established\"") && !subscribing {
            let subscribe = format!(
                "{{\"event\":\"pusher:subscribe\",\"data\":{{\"channel\":{}}}}}",
                serde_json::Value::from(channel)
            );
            send(&mut ws, Message::text(subscribe)).await?;
            subscribing = true;
        } else if text.contains("\"pusher_internal:subscription_succeeded\"") {
            return Ok(PeerConnection::Ws(Box::new(ws), Protocol::Pusher));
        } else if text.contains("\"pusher:error\"") {
            return Err(format!("Pusher error: {text:.200}"));
        } else if text.contains("\"pusher:ping\"") {
            send(&mut ws, Message::text(PUSHER_PONG)).await?;
        }
    }
}

const PUSHER_PONG: &str = "{\"event\":\"pusher:pong\",\"data\":{}}";

async fn pushpin_setup(ctx: &Ctx, channel: &str) -> Result<PeerConnection, String> {
    let stream = ctx.connect().await?;
    let mut client =
        SseClient::open(stream, &ctx.host, &format!("/stream/{channel}"), None).await?;
    let mut subscribed = false;
    while !subscribed {
        let open = client
            .read_events(&mut |kind, _| subscribed |= kind == "subscribed")
            .await?;
        if !open && !subscribed {
            return Err("the stream ended before `subscribed`".to_owned());
        }
    }
    Ok(PeerConnection::Sse(client))
}

async fn pushpin_ws_setup(ctx: &Ctx, channel: &str) -> Result<PeerConnection, String> {
    let mut ws = ctx.ws_connect(&format!("/ws/{channel}")).await?;
    while next_data(&mut ws, "subscribing").await? != b"subscribed" {}
    Ok(PeerConnection::Ws(Box::new(ws), Protocol::Plain))
}

/// MQTT keep-alive the subscribers ask for; they ping at half of it.
const MQTT_KEEP_ALIVE_S: u16 = 60;

/// The MQTT client id of subscriber `channel` in this process: unique per connection.
fn mqtt_client_id(ctx: &Ctx, channel: &str) -> String {
    let n = ctx.next_client_number();
    format!("hb-{}-{n}-{channel}", std::process::id())
}

async fn mqtt_setup(ctx: &Ctx, channel: &str) -> Result<PeerConnection, String> {
    let mut stream = ctx.connect().await?;
    let mut hello = Vec::with_capacity(128);
    mqtt::connect(
        &mut hello,
        &mqtt_client_id(ctx, channel),
        MQTT_KEEP_ALIVE_S,
        ctx.token.as_deref(),
    );
    mqtt::subscribe(&mut hello, 1, channel, 0);
    stream
        .write_all(&hello)
        .await
        .map_err(|e| format!("MQTT write: {e}"))?;
    let mut reader = MqttReader::default();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("MQTT read while subscribing: {e}"))?;
        if n == 0 {
            return Err("the server closed the connection while subscribing".to_owned());
        }
        let mut outcome = None;
        reader.feed(&chunk[..n], &mut |event| match event {
            MqttEvent::ConnAck { code, .. } if code != 0 => {
                outcome = Some(Err(format!("CONNACK refused the connection: code {code}")));
            }
            MqttEvent::SubAck { granted, .. } => {
                outcome = Some(match granted.first() {
                    Some(&qos) if qos < 0x80 => Ok(()),
                    other => Err(format!("SUBACK refused the subscription: {other:?}")),
                });
            }
            _ => {}
        })?;
        match outcome {
            Some(Ok(())) => return Ok(PeerConnection::Mqtt(stream, reader)),
            Some(Err(error)) => return Err(error),
            None => {}
        }
    }
}

/// Reads MQTT publications until the connection ends; pings at half the keep-alive.
async fn mqtt_run(
    ctx: &Ctx,
    slot: usize,
    channel: &str,
    mut stream: TcpStream,
    mut reader: MqttReader,
) {
    let closed = |how: &str, error: Option<String>| {
        ctx.state
            .borrow_mut()
            .on_closed(slot, how.to_owned(), error);
    };
    let mut ping = tokio::time::interval(std::time::Duration::from_secs(u64::from(
        MQTT_KEEP_ALIVE_S / 2,
    )));
    ping.tick().await;
    let mut chunk = vec![0u8; 4096];
    let mut answer = Vec::new();
    loop {
        let n = tokio::select! {
            read = stream.read(&mut chunk) => match read {
                Ok(0) => return closed("eof", None),
                Ok(n) => n,
                Err(e) => return closed("error", Some(format!("read: {e}"))),
            },
            _ = ping.tick() => {
                if let Err(e) = stream.write_all(&mqtt::PINGREQ).await {
                    return closed("error", Some(format!("sending PINGREQ: {e}")));
                }
                continue;
            }
        };
        let now = push::now_ns();
        {
            let mut state = ctx.state.borrow_mut();
            let fed = reader.feed(&chunk[..n], &mut |event| match event {
                MqttEvent::Publish {
                    topic,
                    payload,
                    qos,
                    packet_id,
                } => {
                    if qos > 0 {
                        mqtt::puback(&mut answer, packet_id);
                    }
                    if topic == channel {
                        state.on_peer_message(slot, &String::from_utf8_lossy(&payload), now);
                    } else {
                        state.on_foreign();
                    }
                }
                MqttEvent::PingResp => state.on_ping(),
                _ => {}
            });
            if let Err(error) = fed {
                drop(state);
                return closed("error", Some(error));
            }
        }
        if !answer.is_empty() {
            if let Err(e) = stream.write_all(&answer).await {
                return closed("error", Some(format!("sending PUBACK: {e}")));
            }
            answer.clear();
        }
    }
}

/// Reads publications until the connection ends, answering the peer's pings.
pub async fn run(ctx: &Ctx, slot: usize, channel: &str, connection: PeerConnection) {
    match connection {
        PeerConnection::Ws(ws, protocol) => ws_run(ctx, slot, channel, *ws, protocol).await,
        PeerConnection::Mqtt(stream, reader) => mqtt_run(ctx, slot, channel, stream, reader).await,
        PeerConnection::Sse(mut client) => loop {
            let result = client
                .read_events(&mut |_, data| {
                    ctx.state
                        .borrow_mut()
                        .on_peer_message(slot, data, push::now_ns());
                })
                .await;
            let mut state = ctx.state.borrow_mut();
            match result {
                Ok(true) => continue,
                Ok(false) => state.on_closed(slot, "eof".to_owned(), None),
                Err(error) => state.on_closed(slot, "error".to_owned(), Some(error)),
            }
            return;
        },
    }
}

/// Handles one message; returns what to answer (a pong), if anything.
fn on_message(
    ctx: &Ctx,
    slot: usize,
    channel: &str,
    protocol: &mut Protocol,
    data: &[u8],
) -> Result<Option<Message>, String> {
    let now = push::now_ns();
    let mut state = ctx.state.borrow_mut();
    match protocol {
        Protocol::Plain => {
            state.on_peer_message(slot, &String::from_utf8_lossy(data), now);
            Ok(None)
        }
        Protocol::Socketio => {
            if data == b"2" {
                state.on_ping();
                return Ok(Some(Message::text("3")));
            }
            if data.starts_with(b"42") {
                state.on_peer_message(slot, &String::from_utf8_lossy(data), now);
            }
            Ok(None)
        }
        Protocol::Pusher => {
            let text = String::from_utf8_lossy(data);
            if text.contains("\"pusher:ping\"") {
                state.on_ping();
                return Ok(Some(Message::text(PUSHER_PONG)));
            }
            state.on_peer_message(slot, &text, now);
            Ok(None)
        }
        Protocol::Nats(reader) => {
            let mut pong = false;
            reader.feed(data, &mut |event| match event {
                NatsEvent::Msg { subject, payload } => {
                    if subject == channel {
                        state.on_peer_message(slot, &String::from_utf8_lossy(&payload), now);
                    } else {
                        state.on_foreign();
                    }
                }
                NatsEvent::Ping => pong = true,
                _ => {}
            })?;
            if pong {
                state.on_ping();
                return Ok(Some(Message::binary(b"PONG\r\n".to_vec())));
            }
            Ok(None)
        }
    }
}

async fn ws_run(ctx: &Ctx, slot: usize, channel: &str, mut ws: Ws, mut protocol: Protocol) {
    let closed = |how: &str, error: Option<String>| {
        ctx.state
            .borrow_mut()
            .on_closed(slot, how.to_owned(), error);
    };
    loop {
        let data = match ws.next().await {
            Some(Ok(Message::Text(text))) => text.as_bytes().to_vec(),
            Some(Ok(Message::Binary(data))) => data.to_vec(),
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = frame.map_or_else(
                    || ("close".to_owned(), String::new()),
                    |f| (u16::from(f.code).to_string(), f.reason.to_string()),
                );
                closed(
                    &code,
                    Some(format!("closed by the server: {code} {reason}")),
                );
                return;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                closed("error", Some(format!("read: {e}")));
                return;
            }
            None => {
                closed("eof", None);
                return;
            }
        };
        match on_message(ctx, slot, channel, &mut protocol, &data) {
            Ok(None) => {}
            Ok(Some(answer)) => {
                if let Err(e) = ws.send(answer).await {
                    closed("error", Some(format!("sending pong: {e}")));
                    return;
                }
            }
            Err(error) => {
                closed("error", Some(error));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_stream_split_anywhere() {
        let stream = b"INFO {\"server_id\":\"x\"}\r\n+OK\r\nMSG fan-1 1 12\r\nhello\r\nworld\r\nPING\r\nMSG fan-2 1 _INBOX.x 2\r\nhi\r\n-ERR 'Slow Consumer'\r\n";
        for split in 0..stream.len() {
            let mut reader = NatsReader::default();
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
                    NatsEvent::Other,
                    NatsEvent::Other,
                    NatsEvent::Msg {
                        subject: "fan-1".into(),
                        payload: b"hello\r\nworld".to_vec()
                    },
                    NatsEvent::Ping,
                    NatsEvent::Msg {
                        subject: "fan-2".into(),
                        payload: b"hi".to_vec()
                    },
                    NatsEvent::Err("-ERR 'Slow Consumer'".into()),
                ],
                "split at {split}"
            );
        }
        let mut reader = NatsReader::default();
        assert!(reader.feed(b"MSG a 1 x\r\n", &mut |_| {}).is_err());
    }
}
