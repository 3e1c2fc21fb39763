//! The seam between a session and what carries its messages: [`FrameIo`] reads commands and
//! writes batches of queued frames. The session (command loop, subscriptions, pings,
//! deadlines) is written once against it; the WebSocket ([`WsFrames`]) is one adapter, the
//! gRPC bidirectional stream (in `herald-server`) another.
//!
//! May touch: the socket (or stream) the adapter wraps.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::{Sink, SinkExt, StreamExt};

use crate::outbound::{CloseReason, Frame};
use crate::ws::codec::Encoding;
use crate::ws::protocol::Command;

/// What one incoming message means to the session.
#[derive(Debug)]
pub enum Incoming {
    /// Commands to handle, in order (an empty command is a pong).
    Commands(Vec<Command>),
    /// Nothing for the session (a WebSocket-level ping, for example).
    Nothing,
    /// The client ended the connection, or it is gone.
    Closed,
    /// A message the session cannot accept: the connection closes with this reason.
    Refused(CloseReason),
}

/// The write side failed; the connection is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteFailed;

/// A connection's two directions, polled from the session's one task. The write side is a
/// sink of batches: everything taken from the queue at once is one `start_send`.
pub trait FrameIo: Send + Unpin {
    /// The next incoming message.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Incoming>;
    /// Ready for [`Self::start_send`].
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteFailed>>;
    /// Hands a batch of frames (each one encoded message) to the write side.
    fn start_send(&mut self, frames: &[Frame]) -> Result<(), WriteFailed>;
    /// Everything handed over has been written.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteFailed>>;
    /// After the queue ended and everything in it was written: tells the client why
    /// (`CONNECTION_CLOSED`: the client closed first, nothing more to say).
    fn close(&mut self, reason: CloseReason) -> impl Future<Output = ()> + Send + '_;
}

/// The WebSocket adapter: a batch is one WebSocket message (see [`Encoding::message`]).
pub struct WsFrames {
    pub socket: WebSocket,
    pub encoding: Encoding,
}

impl FrameIo for WsFrames {
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Incoming> {
        self.socket.poll_next_unpin(cx).map(|message| {
            let commands = match message {
                Some(Ok(Message::Text(text))) => self.encoding.decode_text(text.as_str()),
                Some(Ok(Message::Binary(bytes))) => self.encoding.decode_binary(&bytes),
                Some(Ok(Message::Close(_))) | None => return Incoming::Closed,
                Some(Ok(_)) => return Incoming::Nothing,
                Some(Err(err)) => {
                    let text = err.to_string();
                    return Incoming::Refused(
                        if text.contains("too long") || text.contains("Space limit") {
                            CloseReason::MESSAGE_SIZE_LIMIT
                        } else {
                            CloseReason::BAD_REQUEST
                        },
                    );
                }
            };
            match commands {
                Ok(commands) => Incoming::Commands(commands),
                Err(_) => Incoming::Refused(CloseReason::BAD_REQUEST),
            }
        })
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteFailed>> {
        Pin::new(&mut self.socket)
            .poll_ready(cx)
            .map_err(|_| WriteFailed)
    }

    fn start_send(&mut self, frames: &[Frame]) -> Result<(), WriteFailed> {
        let message = self.encoding.message(frames);
        Pin::new(&mut self.socket)
            .start_send(message)
            .map_err(|_| WriteFailed)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteFailed>> {
        Pin::new(&mut self.socket)
            .poll_flush(cx)
            .map_err(|_| WriteFailed)
    }

    async fn close(&mut self, reason: CloseReason) {
        if reason == CloseReason::CONNECTION_CLOSED {
            // tungstenite has queued its answer to the client's close; send it.
            let _ = self.socket.flush().await;
            return;
        }
        let frame = CloseFrame {
            code: reason.code,
            reason: Utf8Bytes::from_static(reason.reason),
        };
        let _ = self.socket.send(Message::Close(Some(frame))).await;
        let _ = self.socket.close().await;
    }
}
