//! The write half of a connection, driven from the connection's one task: takes everything
//! queued in the connection's [`Outbound`] and hands it to the [`FrameIo`] as one batch (one
//! WebSocket message: newline-separated JSON or back-to-back length-delimited Protobuf, as the
//! protocol allows), and tracks whether the last server ping has reached the socket, so the pong deadline starts
//! when the client could first see the ping rather than when it was queued.
//!
//! Reading and writing share one task (no `split`, no second task): every wait of the
//! connection polls [`SocketWriter::poll_write`] next to whatever else it waits for, so writes
//! keep flowing while a command is being handled and a stalled write never stops reads.
//!
//! May touch: the connection's write side and its queue.

use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::frames::FrameIo;
use crate::outbound::{CloseReason, MAX_TAKE_BYTES, Outbound};

/// Batches written in one poll before giving other work of the connection a turn.
const BATCHES_PER_POLL: usize = 16;

/// How the write side ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum WriteEnd {
    /// The queue was closed and everything in it was written: the close frame is next.
    Closed(CloseReason),
    /// The socket failed.
    Failed,
}

/// Where the last server ping is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PingState {
    /// No ping waits for a pong.
    Idle,
    /// Queued at this time, not written yet.
    Queued(Instant),
    /// Taken from the queue at `queued`; the write with it is in progress.
    Writing(Instant),
    /// Written to the socket at this time.
    Written(Instant),
}

/// What a ping that is still unanswered means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PongDeadline {
    /// The client has had the ping since it was written: no pong by then is 3012.
    Pong(Instant),
    /// The ping is still stuck behind unwritten frames: by then the client is not reading (3008).
    Stalled(Instant),
}

impl PongDeadline {
    pub(super) fn at(self) -> Instant {
        match self {
            Self::Pong(at) | Self::Stalled(at) => at,
        }
    }
}

pub(super) struct SocketWriter {
    /// A message was handed to the socket and not flushed yet.
    flushing: bool,
    ping: PingState,
    ended: Option<WriteEnd>,
}

impl SocketWriter {
    pub(super) fn new() -> Self {
        Self {
            flushing: false,
            ping: PingState::Idle,
            ended: None,
        }
    }

    /// A server ping was queued (a ping already waiting for its pong keeps its times).
    pub(super) fn ping_queued(&mut self, now: Instant) {
        if self.ping == PingState::Idle {
            self.ping = PingState::Queued(now);
        }
    }

    /// The client answered.
    pub(super) fn pong_received(&mut self) {
        self.ping = PingState::Idle;
    }

    /// When the unanswered ping, if any, runs out: `pong_timeout` after it was written, or
    /// `stall_timeout` after it was queued if it is still not written.
    pub(super) fn pong_deadline(
        &self,
        pong_timeout: Duration,
        stall_timeout: Duration,
    ) -> Option<PongDeadline> {
        match self.ping {
            PingState::Idle => None,
            PingState::Queued(at) | PingState::Writing(at) => {
                Some(PongDeadline::Stalled(at + stall_timeout))
            }
            PingState::Written(at) => Some(PongDeadline::Pong(at + pong_timeout)),
        }
    }

    /// After reading: tungstenite may have queued a control frame of its own (the answer to a
    /// client's ping or close) that only goes out with a flush.
    pub(super) fn flush_soon(&mut self) {
        if self.ended.is_none() {
            self.flushing = true;
        }
    }

    /// Writes what is queued. Pending while there is nothing to write or the socket is
    /// full; ready once the write side has ended (and from then on, with the same end).
    pub(super) fn poll_write<F: FrameIo>(
        &mut self,
        cx: &mut Context<'_>,
        socket: &mut F,
        outbound: &Outbound,
    ) -> Poll<WriteEnd> {
        if let Some(end) = self.ended {
            return Poll::Ready(end);
        }
        for _ in 0..BATCHES_PER_POLL {
            if self.flushing {
                match socket.poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        self.flushing = false;
                        if let PingState::Writing(_) = self.ping {
                            self.ping = PingState::Written(Instant::now());
                        }
                    }
                    Poll::Ready(Err(_)) => return self.end(WriteEnd::Failed),
                    Poll::Pending => return self.stalled(cx, outbound),
                }
            }
            match socket.poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return self.end(WriteEnd::Failed),
                Poll::Pending => return self.stalled(cx, outbound),
            }
            let mut frames = match outbound.poll_take(cx, MAX_TAKE_BYTES) {
                Poll::Ready(Ok(frames)) => frames,
                Poll::Ready(Err(reason)) => return self.end(WriteEnd::Closed(reason)),
                Poll::Pending => return Poll::Pending,
            };
            if let PingState::Queued(at) = self.ping {
                // Everything queued so far is in this batch, the ping included.
                self.ping = PingState::Writing(at);
            }
            let sent = socket.start_send(frames.make_contiguous());
            // Freed before the write: an idle connection keeps no queue capacity.
            drop(frames);
            if sent.is_err() {
                return self.end(WriteEnd::Failed);
            }
            self.flushing = true;
        }
        // More is queued than one turn should write: come back after the other work.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// The socket takes nothing more for now. A queue closed as slow (over its own bound or
    /// the process budget) ends the write side at once: what the socket still holds is
    /// useless to a client that recovers from history, and must be freed.
    fn stalled(&mut self, cx: &mut Context<'_>, outbound: &Outbound) -> Poll<WriteEnd> {
        match outbound.poll_closed(cx) {
            Some(CloseReason::SLOW) => self.end(WriteEnd::Closed(CloseReason::SLOW)),
            _ => Poll::Pending,
        }
    }

    fn end(&mut self, end: WriteEnd) -> Poll<WriteEnd> {
        self.ended = Some(end);
        Poll::Ready(end)
    }

    /// After the connection's loop: writes what is still queued (the queue must be closed),
    /// then the close with the queue's reason ([`FrameIo::close`]). Nothing is written after
    /// a write failure.
    pub(super) async fn finish<F: FrameIo>(&mut self, socket: &mut F, outbound: &Outbound) {
        let end = std::future::poll_fn(|cx| self.poll_write(cx, socket, outbound)).await;
        match end {
            WriteEnd::Closed(reason) => socket.close(reason).await,
            WriteEnd::Failed => {}
        }
    }
}
