//! `herald.stream.ClientStream.Connect`: the Centrifugo client protocol over one gRPC
//! bidirectional call (`proto/herald/client_stream.proto`). Every gRPC message is one
//! Protobuf `Command` (client to server) or `Reply` (server to client).
//!
//! It is the WebSocket's session, not a copy: [`GrpcFrames`] is a
//! [`FrameIo`](herald_transport::ws::session::FrameIo) adapter and the connection runs
//! [`run_session`] — the same command loop, admission, subscribe-with-recovery, pings,
//! deadlines and bounded queue (a consumer that stops reading is closed with 3008). The
//! messages pass through tonic as raw bytes ([`RawCodec`]): the session decodes commands and
//! its queue already holds encoded replies (shared with Protobuf WebSocket connections), so
//! nothing is decoded or encoded twice.
//!
//! The stream ends with a `disconnect` push (close code, reason, reconnect), then status OK,
//! `INVALID_ARGUMENT` (a message that is not a `Command`, 3501), `RESOURCE_EXHAUSTED` (a
//! message over `client.max_message_size`, 3511), `UNAUTHENTICATED` (a connection or refresh
//! token that is not valid, 3500) or `DEADLINE_EXCEEDED` (the call's `grpc-timeout` passed). A cancelled call ends the session at once.
//!
//! May touch: the real-time state (through the session).

use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes};
use futures::channel::{mpsc, oneshot};
use futures::task::AtomicWaker;
use futures::{FutureExt, Sink, Stream, StreamExt};
use herald_transport::outbound::{CloseReason, Frame};
use herald_transport::realtime::RealtimeState;
use herald_transport::ws::codec::Encoding;
use herald_transport::ws::proto::{self as wire, PushBody};
use herald_transport::ws::session::{FrameIo, Incoming, WriteFailed, run_session};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Request, Response, Status, Streaming};

use super::streamproto::client_stream_server::ClientStream;

/// The transport's name, as the backend proxy and the registry see it.
pub const TRANSPORT: &str = "grpc";

/// Batches of replies waiting between the session and the HTTP/2 stream (each at most one
/// queue take, `MAX_TAKE_BYTES`); beyond them the session's own bounded queue holds.
const WRITE_BATCHES: usize = 1;

/// The protocol's messages as tonic sees them: bytes, decoded and encoded by the session.
pub mod raw {
    use bytes::Bytes;

    /// One `centrifugal.centrifuge.protocol.Command`, undecoded.
    #[derive(Debug, Default)]
    pub struct Command(pub Bytes);

    /// One encoded `centrifugal.centrifuge.protocol.Reply`.
    #[derive(Debug, Default)]
    pub struct Reply(pub Bytes);

    impl From<Bytes> for Command {
        fn from(bytes: Bytes) -> Self {
            Self(bytes)
        }
    }

    impl From<Reply> for Bytes {
        fn from(reply: Reply) -> Self {
            reply.0
        }
    }
}

/// A codec that moves message bytes as they are (see the module header).
#[derive(Debug)]
pub struct RawCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for RawCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for RawCodec<T, U>
where
    T: Into<Bytes> + Send + 'static,
    U: From<Bytes> + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = RawEncoder<T>;
    type Decoder = RawDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder(PhantomData)
    }
}

#[derive(Debug)]
pub struct RawEncoder<T>(PhantomData<T>);

impl<T: Into<Bytes>> Encoder for RawEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item.into());
        Ok(())
    }
}

#[derive(Debug)]
pub struct RawDecoder<U>(PhantomData<U>);

impl<U: From<Bytes>> Decoder for RawDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        Ok(Some(U::from(src.copy_to_bytes(src.remaining()))))
    }
}

pub struct ClientStreamService {
    realtime: Arc<RealtimeState>,
}

impl ClientStreamService {
    pub fn new(realtime: Arc<RealtimeState>) -> Self {
        Self { realtime }
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<raw::Reply, Status>> + Send>>;

#[tonic::async_trait]
impl ClientStream for ClientStreamService {
    type ConnectStream = ReplyStream;

    async fn connect(
        &self,
        request: Request<Streaming<raw::Command>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let deadline = super::deadline(request.metadata());
        let proxy_headers = self
            .realtime
            .proxy_headers(&request.metadata().clone().into_headers());
        let (tx, rx) = mpsc::channel(WRITE_BATCHES);
        let (end_tx, end_rx) = oneshot::channel();
        let unsent = Arc::new(Unsent::default());
        let frames = GrpcFrames {
            incoming: request.into_inner(),
            out: tx,
            unsent: unsent.clone(),
            end: Some(end_tx),
            deadline: deadline.map(|at| Box::pin(tokio::time::sleep(at))),
            deadline_passed: false,
        };
        tokio::spawn(run_session(
            frames,
            self.realtime.clone(),
            Encoding::Protobuf,
            proxy_headers,
            TRANSPORT,
        ));
        // The batches in order, then what `close` left for last (after the batches, even
        // when the client was too slow to take them all before the session ended).
        let last = end_rx
            .into_stream()
            .flat_map(|end| futures::stream::iter(end.unwrap_or_default()));
        let replies = rx
            .flat_map(futures::stream::iter)
            .inspect(move |_| unsent.taken())
            .chain(last);
        Ok(Response::new(Box::pin(replies)))
    }
}

/// What the stream yields last.
type Last = Vec<Result<raw::Reply, Status>>;

/// Replies handed to the stream that HTTP/2 has not taken yet. A reply counts as written
/// once taken, which HTTP/2 does only as the client's flow-control window allows: so a
/// server ping to a client that stopped reading stays unwritten, and the session closes
/// the connection as slow (3008) exactly as with a WebSocket whose socket is full.
#[derive(Default)]
struct Unsent {
    count: AtomicUsize,
    all_taken: AtomicWaker,
}

impl Unsent {
    fn taken(&self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.all_taken.wake();
        }
    }
}

/// The gRPC call as the session's frames.
pub struct GrpcFrames {
    incoming: Streaming<raw::Command>,
    out: mpsc::Sender<Vec<Result<raw::Reply, Status>>>,
    unsent: Arc<Unsent>,
    end: Option<oneshot::Sender<Last>>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    deadline_passed: bool,
}

impl FrameIo for GrpcFrames {
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Incoming> {
        if let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            self.deadline_passed = true;
            return Poll::Ready(Incoming::Closed);
        }
        let incoming = match ready!(self.incoming.poll_next_unpin(cx)) {
            // The client ended its side (or cancelled): the connection ends.
            None => Incoming::Closed,
            Some(Ok(command)) => match wire::decode_command(&command.0) {
                Ok(command) => Incoming::Commands(vec![command]),
                Err(_) => Incoming::Refused(CloseReason::BAD_REQUEST),
            },
            Some(Err(status)) => match status.code() {
                Code::OutOfRange | Code::ResourceExhausted => {
                    Incoming::Refused(CloseReason::MESSAGE_SIZE_LIMIT)
                }
                _ => Incoming::Closed,
            },
        };
        Poll::Ready(incoming)
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteFailed>> {
        self.out.poll_ready(cx).map_err(|_| WriteFailed)
    }

    fn start_send(&mut self, frames: &[Frame]) -> Result<(), WriteFailed> {
        // Every frame is one length-delimited reply the session encoded.
        let batch = frames
            .iter()
            .filter_map(|frame| wire::reply_message(&frame.bytes))
            .map(|message| Ok(raw::Reply(message)))
            .collect::<Vec<_>>();
        self.unsent.count.fetch_add(batch.len(), Ordering::AcqRel);
        Pin::new(&mut self.out)
            .start_send(batch)
            .map_err(|_| WriteFailed)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteFailed>> {
        if self.out.is_closed() {
            return Poll::Ready(Err(WriteFailed));
        }
        self.unsent.all_taken.register(cx.waker());
        if self.unsent.count.load(Ordering::Acquire) == 0 {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    async fn close(&mut self, reason: CloseReason) {
        let last = if self.deadline_passed {
            vec![Err(Status::deadline_exceeded("the call's deadline passed"))]
        } else if reason == CloseReason::CONNECTION_CLOSED {
            Vec::new()
        } else {
            last_messages(reason)
        };
        if let Some(end) = self.end.take() {
            let _ = end.send(last);
        }
        self.out.close_channel();
    }
}

/// The `disconnect` push, and the status for a client's mistake.
fn last_messages(reason: CloseReason) -> Last {
    let push = wire::push_reply(
        "",
        PushBody::Disconnect {
            code: u32::from(reason.code),
            reason: reason.reason,
            reconnect: reason.reconnect(),
        },
    );
    let mut last: Last = wire::reply_message(&push)
        .map(|message| Ok(raw::Reply(message)))
        .into_iter()
        .collect();
    let detail = format!("{}: {}", reason.code, reason.reason);
    if reason == CloseReason::BAD_REQUEST {
        last.push(Err(Status::invalid_argument(detail)));
    } else if reason == CloseReason::MESSAGE_SIZE_LIMIT {
        last.push(Err(Status::resource_exhausted(detail)));
    } else if reason == CloseReason::INVALID_TOKEN {
        last.push(Err(Status::unauthenticated(detail)));
    }
    last
}
