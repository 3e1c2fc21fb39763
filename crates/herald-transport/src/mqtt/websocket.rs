//! MQTT over WebSocket: the HTTP route (`[mqtt] websocket_path`, subprotocol `mqtt`) and the
//! adapter that turns the WebSocket's binary messages into the byte stream the MQTT
//! connection reads and writes. An MQTT packet may span messages and a message may hold
//! several packets (MQTT 5 §6): the codec frames the bytes, not the messages.
//!
//! May touch: the WebSocket it upgrades.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use bytes::{Buf, Bytes};
use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::MqttState;

/// `GET <websocket_path>`: upgrades to a WebSocket speaking MQTT.
pub async fn mqtt_websocket_handler(
    ws: WebSocketUpgrade,
    State(state): State<Arc<MqttState>>,
) -> Response {
    let max = state.config.max_packet_size;
    ws.protocols(["mqtt"])
        .read_buffer_size(256)
        .write_buffer_size(0)
        .max_write_buffer_size(state.realtime.config.max_queue_bytes.max(64 * 1024))
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| super::run_connection(WebSocketBytes::new(socket), state))
}

/// A WebSocket as a byte stream: binary messages in, one binary message per write out.
pub struct WebSocketBytes {
    socket: WebSocket,
    /// The rest of the last message read.
    pending: Bytes,
}

impl WebSocketBytes {
    pub fn new(socket: WebSocket) -> Self {
        Self {
            socket,
            pending: Bytes::new(),
        }
    }
}

fn broken(error: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, error.to_string())
}

impl AsyncRead for WebSocketBytes {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.socket).poll_next(cx)) {
                Some(Ok(Message::Binary(bytes))) => self.pending = bytes,
                // MQTT is binary only (MQTT 5 §6): a text message is a protocol violation.
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "MQTT over WebSocket uses binary messages",
                    )));
                }
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(_)) => {} // ping/pong: answered by the WebSocket layer
                Some(Err(error)) => return Poll::Ready(Err(broken(error))),
            }
        }
    }
}

impl AsyncWrite for WebSocketBytes {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let socket = Pin::new(&mut self.socket);
        ready!(Sink::<Message>::poll_ready(socket, cx)).map_err(broken)?;
        Pin::new(&mut self.socket)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(broken)?;
        // Flushed by the next poll_ready or poll_flush; a written message must reach the
        // socket without waiting for another write, so push it now (pending is fine).
        let _ = Sink::<Message>::poll_flush(Pin::new(&mut self.socket), cx).map_err(broken)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Sink::<Message>::poll_flush(Pin::new(&mut self.socket), cx).map_err(broken)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Sink::<Message>::poll_close(Pin::new(&mut self.socket), cx).map_err(broken)
    }
}
