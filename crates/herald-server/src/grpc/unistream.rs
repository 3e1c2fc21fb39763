//! `CentrifugoUniStream.Consume`: a server-streaming subscription over gRPC
//! (`proto/centrifugo/unistream.proto`). The request carries the connection token and the
//! channels with the positions to resume from; the stream carries a `connect` push, then
//! publications, join/leave, and a final `disconnect` push.
//!
//! It is one more one-way transport: the session is started by
//! [`herald_transport::oneway::OneWaySession::try_start`] — the one admission path and the
//! one subscribe-with-recovery step every transport uses — and its bounded outbound queue is
//! drained here into the response stream. A consumer that stops reading is bounded in
//! memory like a WebSocket: the queue overflows and the session closes with 3008 (slow),
//! which the client reads as the `disconnect` push once it reads again.
//!
//! Keep-alive: an empty `Push` every `client.ping_interval` (as Centrifugo does on this
//! stream), so a consumer notices a dead server and proxies see traffic; the `connect` push
//! says how often (`ping`). A call with a `grpc-timeout` ends with `DEADLINE_EXCEEDED` when
//! it passes; a cancelled call ends the session at once.
//!
//! May touch: the real-time state (through the one-way session).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use herald_core::ErrorCode;
use herald_core::admission::Refusal;
use herald_core::namespace::NamespaceOptions;
use herald_core::publication::{ChannelEvent, ClientInfo, Publication};
use herald_transport::oneway::{OneWayRequest, OneWaySession, Started};
use herald_transport::outbound::{CloseReason, EventEncoder, Frame, FramePosition};
use herald_transport::realtime::RealtimeState;
use prost::Message as _;
use tonic::{Request, Response, Status};

use super::uniproto as pb;

/// The transport's name, as the backend proxy sees it (Centrifugo's name for it).
pub const TRANSPORT: &str = "uni_grpc";

/// Pushes waiting between the session's queue and the HTTP/2 stream.
const STREAM_BUFFER: usize = 16;

pub struct UniStreamService {
    realtime: Arc<RealtimeState>,
}

impl UniStreamService {
    pub fn new(realtime: Arc<RealtimeState>) -> Self {
        Self { realtime }
    }
}

type PushStream = Pin<Box<dyn Stream<Item = Result<pb::Push, Status>> + Send>>;

#[tonic::async_trait]
impl pb::centrifugo_uni_stream_server::CentrifugoUniStream for UniStreamService {
    type ConsumeStream = PushStream;

    async fn consume(
        &self,
        request: Request<pb::ConnectRequest>,
    ) -> Result<Response<PushStream>, Status> {
        let headers = request.metadata().clone().into_headers();
        let deadline = super::deadline(request.metadata());
        let connect = request.into_inner();
        let mut one_way = one_way_request(connect)?;
        one_way.proxy_headers = self.realtime.proxy_headers(&headers);
        let started =
            OneWaySession::try_start(self.realtime.clone(), one_way, encoder, recovered_frame)
                .await
                .map_err(|refusal| refusal_status(&refusal))?;
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        tokio::spawn(run(started, tx, deadline));
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|push| (push, rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The channels in the request's (sorted) order, and a cursor when they resume.
fn one_way_request(connect: pb::ConnectRequest) -> Result<OneWayRequest, Status> {
    let recovering = connect.subs.values().filter(|s| s.recover).count();
    if recovering != 0 && recovering != connect.subs.len() {
        return Err(Status::invalid_argument(
            "recover every channel or none (one resume position per channel)",
        ));
    }
    let cursor = (recovering > 0).then(|| {
        connect
            .subs
            .values()
            .map(|s| format!("{}:{}", s.offset, s.epoch))
            .collect::<Vec<_>>()
            .join(",")
    });
    Ok(OneWayRequest {
        transport: TRANSPORT,
        proxy_headers: Vec::new(),
        token: Some(connect.token).filter(|t| !t.is_empty()),
        channels: connect.subs.into_keys().collect(),
        sub_tokens: Vec::new(),
        cursor,
    })
}

/// A refusal as a status; the message keeps Herald's code (`109: token expired: ...`).
fn refusal_status(refusal: &Refusal) -> Status {
    let message = match refusal {
        Refusal::Denied(error) if !error.detail.is_empty() => {
            format!(
                "{}: {}: {}",
                refusal.code(),
                refusal.message(),
                error.detail
            )
        }
        _ => format!("{}: {}", refusal.code(), refusal.message()),
    };
    match refusal {
        Refusal::Denied(error) => match error.code {
            ErrorCode::Unauthorized | ErrorCode::TokenExpired => Status::unauthenticated(message),
            ErrorCode::PermissionDenied => Status::permission_denied(message),
            ErrorCode::LimitExceeded | ErrorCode::TooManyRequests => {
                Status::resource_exhausted(message)
            }
            ErrorCode::Internal => Status::internal(message),
            _ => Status::invalid_argument(message),
        },
        Refusal::Backend { .. } | Refusal::Disconnect { .. } => Status::permission_denied(message),
        Refusal::Unavailable => Status::unavailable(message),
    }
}

fn client_info(info: &ClientInfo) -> pb::ClientInfo {
    pb::ClientInfo {
        user: info.user.clone(),
        client: info.client.clone(),
        conn_info: super::convert::raw_bytes(&info.conn_info),
        chan_info: super::convert::raw_bytes(&info.chan_info),
    }
}

fn publication_push(channel: &str, publication: &Publication) -> pb::Push {
    pb::Push {
        channel: channel.to_owned(),
        r#pub: Some(pb::Publication {
            data: publication.data.bytes().to_vec(),
            info: publication.info.as_deref().map(client_info),
            offset: publication.offset,
            tags: publication.tags.clone(),
        }),
        ..pb::Push::default()
    }
}

/// A publication's frame: the encoded push, and its position (so recovery and live delivery
/// never show it twice).
fn publication_frame(channel: &Arc<str>, epoch: &Arc<str>, publication: &Publication) -> Frame {
    Frame {
        bytes: Bytes::from(publication_push(channel, publication).encode_to_vec()),
        position: (publication.offset > 0).then(|| FramePosition {
            channel: channel.clone(),
            offset: publication.offset,
            epoch: epoch.clone(),
        }),
        conflate_key: None,
        expires_at_ms: 0,
    }
}

fn recovered_frame(channel: &Arc<str>, epoch: &Arc<str>, publication: &Publication) -> Frame {
    publication_frame(channel, epoch, publication)
}

struct PushEncoder {
    join_leave: bool,
}

impl EventEncoder for PushEncoder {
    fn encode(&self, event: &ChannelEvent) -> Option<Frame> {
        let push = match event {
            ChannelEvent::Publication(p) => {
                return Some(publication_frame(&p.channel, &p.epoch, &p.publication));
            }
            ChannelEvent::Join { channel, info } if self.join_leave => pb::Push {
                channel: channel.to_string(),
                join: Some(pb::Join {
                    info: Some(client_info(info)),
                }),
                ..pb::Push::default()
            },
            ChannelEvent::Leave { channel, info } if self.join_leave => pb::Push {
                channel: channel.to_string(),
                leave: Some(pb::Leave {
                    info: Some(client_info(info)),
                }),
                ..pb::Push::default()
            },
            _ => return None,
        };
        Some(Bytes::from(push.encode_to_vec()).into())
    }
}

fn encoder(options: &NamespaceOptions) -> Arc<dyn EventEncoder> {
    Arc::new(PushEncoder {
        join_leave: options.join_leave,
    })
}

fn connect_push(started: &Started, ping: Option<Duration>) -> pb::Push {
    let subs = started
        .starts
        .iter()
        .map(|(channel, start)| {
            let result = pb::SubscribeResult {
                recoverable: !start.epoch.is_empty(),
                epoch: start.epoch.clone(),
                offset: start.offset,
                positioned: !start.epoch.is_empty(),
                was_recovering: start.recovered.is_some(),
                recovered: start.recovered == Some(true),
                ..pb::SubscribeResult::default()
            };
            (channel.clone(), result)
        })
        .collect();
    pb::Push {
        connect: Some(pb::Connect {
            client: started.session.info.client.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            subs,
            ping: ping.map_or(0, |every| {
                u32::try_from(every.as_secs()).unwrap_or(u32::MAX)
            }),
            ..pb::Connect::default()
        }),
        ..pb::Push::default()
    }
}

fn disconnect_push(reason: CloseReason) -> pb::Push {
    pb::Push {
        disconnect: Some(pb::Disconnect {
            code: u32::from(reason.code),
            reason: reason.reason.to_owned(),
            reconnect: reason.reconnect(),
        }),
        ..pb::Push::default()
    }
}

/// The `connect` push, then the session's queue until it closes (its reason is the final
/// `disconnect` push), the call's deadline passes or the client goes away; an empty push
/// every `ping_interval` meanwhile.
async fn run(
    mut started: Started,
    tx: tokio::sync::mpsc::Sender<Result<pb::Push, Status>>,
    deadline: Option<Duration>,
) {
    let ping_every = started.session.state.config.ping_interval;
    let ping = (!ping_every.is_zero()).then_some(ping_every);
    if tx.send(Ok(connect_push(&started, ping))).await.is_err() {
        return;
    }
    started.release();
    let session = started.session;
    let state = session.state.clone();
    let mut frames = Vec::new();
    // One year stands for "never" (no ping, no deadline).
    let never = Duration::from_secs(365 * 24 * 3600);
    let every = ping.unwrap_or(never);
    let mut pings = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let deadline = tokio::time::sleep(deadline.unwrap_or(never));
    tokio::pin!(deadline);
    loop {
        frames.clear();
        tokio::select! {
            result = session.outbound.drain(&mut frames) => match result {
                Ok(()) => {
                    for frame in &frames {
                        // Every frame is a push this module encoded.
                        let Ok(push) = pb::Push::decode(frame.bytes.clone()) else { continue };
                        if tx.send(Ok(push)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(reason) => {
                    let _ = tx.send(Ok(disconnect_push(reason))).await;
                    return;
                }
            },
            _ = state.shutdown.wait() => session.outbound.close(CloseReason::SHUTDOWN),
            _ = herald_transport::realtime::expiry(session.expires_at), if session.expires_at.is_some() => {
                session.outbound.close(CloseReason::EXPIRED);
            }
            _ = pings.tick(), if ping.is_some() => {
                // A consumer that is not reading needs no ping: its queue closes it as slow.
                let _ = tx.try_send(Ok(pb::Push::default()));
            }
            _ = &mut deadline => {
                let _ = tx.try_send(Err(Status::deadline_exceeded("the call's deadline passed")));
                return;
            }
            _ = tx.closed() => return,
        }
    }
}
