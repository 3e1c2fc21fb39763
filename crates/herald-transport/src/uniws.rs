//! Uni-directional WebSocket at `GET /connection/uni_websocket?channel=…&since=<cursor>`:
//! the server sends, the client only listens — for stock WebSocket clients with no SDK.
//!
//! Every text message is one JSON object, the same objects as the HTTP streaming lines
//! (`connected` first with the starting `cursor`, then `publication`/`join`/`leave`, `ping`
//! keep-alives); the stream ends with a close frame carrying the protocol code (3008 slow, …).
//! Channels, token and resume cursor come from the URL (or `Authorization: Bearer`), or, when
//! the URL names no channel, from the client's first message (`{"channels":[…],"token":…,
//! "since":…}`), which keeps tokens out of URLs and access logs.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use herald_core::namespace::NamespaceOptions;
use herald_core::{ErrorCode, HeraldError, Publication};
use serde::Deserialize;

use crate::oneway::{OneWayRequest, OneWaySession, Started, format_cursor};
use crate::outbound::{CloseReason, EventEncoder, Frame};
use crate::realtime::RealtimeState;
use crate::stream::{NdjsonEncoder, line, publication_frame, publication_line};
use herald_core::admission::Refusal;

fn text(bytes: &Bytes) -> Utf8Bytes {
    let trimmed = bytes
        .strip_suffix(b"\n")
        .map_or_else(|| bytes.clone(), |t| bytes.slice(..t.len()));
    // Every frame is JSON we produced, hence UTF-8.
    Utf8Bytes::try_from(trimmed).unwrap_or_else(|_| Utf8Bytes::from_static("{}"))
}

/// The first message of a client that named no channel in the URL: the same fields as the
/// query parameters. Unknown fields are refused so a typo does not silently subscribe to less.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FirstFrame {
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    sub_tokens: Vec<String>,
    #[serde(default)]
    since: Option<String>,
}

fn recovered_frame(channel: &Arc<str>, epoch: &Arc<str>, publication: &Publication) -> Frame {
    publication_frame(
        channel,
        epoch,
        publication,
        publication_line(channel, epoch, publication),
    )
}

fn encoder(options: &NamespaceOptions) -> Arc<dyn EventEncoder> {
    Arc::new(NdjsonEncoder {
        join_leave: options.join_leave,
    })
}

/// `GET /connection/uni_websocket`. Channels, token and cursor come from the URL (and
/// headers); with no channel in the URL, from the client's first message.
pub async fn uni_websocket_handler(
    ws: WebSocketUpgrade,
    State(state): State<Arc<RealtimeState>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let request = OneWayRequest::read("uni_websocket", &state, uri.query(), &headers);
    let ws = ws.read_buffer_size(1024).write_buffer_size(0);
    if request.channels.is_empty() {
        return ws
            .max_message_size(FIRST_FRAME_MAX)
            .on_upgrade(move |socket| first_frame_connection(socket, state, request));
    }
    // Checked before the upgrade, so a refused client gets an HTTP status and a JSON body.
    let started = match OneWaySession::start(state.clone(), request, encoder, recovered_frame).await
    {
        Ok(started) => started,
        Err(response) => return response,
    };
    ws.max_message_size(1024)
        .on_upgrade(move |socket| run(socket, started))
}

/// Largest first message (a token and up to 64 channels with their cursor fit easily).
const FIRST_FRAME_MAX: usize = 16 * 1024;

/// Waits (up to `connect_timeout`) for the first message, then streams as if its fields had
/// been in the URL. A refusal is a `{"type":"error"}` message with the error code, then a
/// close frame: 3500 for token problems, 3507 for permissions, 3501 for the rest.
async fn first_frame_connection(
    mut socket: WebSocket,
    state: Arc<RealtimeState>,
    mut request: OneWayRequest,
) {
    let timeout = state.config.connect_timeout;
    let first = match tokio::time::timeout(timeout, socket.next()).await {
        Ok(Some(Ok(Message::Text(text)))) => serde_json::from_str::<FirstFrame>(text.as_str())
            .map_err(|error| {
                HeraldError::bad_request(format!(
                    "the first message must be a JSON object with channel/channels, token and since: {error}"
                ))
            }),
        Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) => return,
        Ok(Some(Ok(_))) => Err(HeraldError::bad_request(
            "the first message must be a JSON text message",
        )),
        Err(_) => Err(HeraldError::bad_request(
            "no channel in the URL and no first message within connect_timeout",
        )),
    };
    let started = match first {
        Ok(first) => {
            request.channels.extend(first.channel);
            request.channels.extend(first.channels);
            if first.token.is_some() {
                request.token = first.token;
            }
            request.sub_tokens.extend(first.sub_tokens);
            if first.since.is_some() {
                request.cursor = first.since;
            }
            OneWaySession::try_start(state, request, encoder, recovered_frame).await
        }
        Err(error) => Err(Refusal::Denied(error)),
    };
    match started {
        Ok(started) => run(socket, started).await,
        Err(refusal) => {
            let reason = match &refusal {
                Refusal::Denied(error) => match error.code {
                    ErrorCode::Unauthorized | ErrorCode::TokenExpired => CloseReason::INVALID_TOKEN,
                    ErrorCode::PermissionDenied => CloseReason::PERMISSION_DENIED,
                    _ => CloseReason::BAD_REQUEST,
                },
                Refusal::Backend { .. } => CloseReason::PERMISSION_DENIED,
                Refusal::Disconnect { code } => CloseReason::from_backend(*code),
                Refusal::Unavailable => CloseReason::INTERNAL,
            };
            let detail = match &refusal {
                Refusal::Denied(error) => error.detail.clone(),
                _ => String::new(),
            };
            let body = serde_json::json!({
                "code": refusal.code(),
                "message": refusal.message(),
                "detail": detail,
                "temporary": refusal.temporary(),
            });
            let _ = socket.send(Message::Text(text(&line("error", body)))).await;
            let frame = CloseFrame {
                code: reason.code,
                reason: Utf8Bytes::from_static(reason.reason),
            };
            let _ = socket.send(Message::Close(Some(frame))).await;
        }
    }
}

/// Streams a started session: the `connected` message, then publications, pings and the
/// closing `disconnect` message with its close frame.
async fn run(socket: WebSocket, mut started: Started) {
    let channels: serde_json::Map<String, serde_json::Value> = started
        .starts
        .iter()
        .map(|(name, start)| {
            (
                name.clone(),
                serde_json::to_value(start).unwrap_or_default(),
            )
        })
        .collect();
    let hello = serde_json::json!({
        "client": started.session.info.client,
        "channels": channels,
        "cursor": format_cursor(&started.positions),
    });
    started.session.outbound.push(line("connected", hello));
    started.release();
    let session = started.session;
    let state = session.state.clone();
    let ping_every = if state.config.ping_interval.is_zero() {
        Duration::from_secs(25)
    } else {
        state.config.ping_interval
    };
    let (mut sink, mut incoming) = socket.split();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    let mut frames = Vec::new();
    loop {
        frames.clear();
        tokio::select! {
            result = session.outbound.drain(&mut frames) => match result {
                Ok(()) => {
                    for frame in &frames {
                        if sink.send(Message::Text(text(&frame.bytes))).await.is_err() {
                            return;
                        }
                    }
                }
                Err(reason) => {
                    let goodbye = line(
                        "disconnect",
                        serde_json::json!({ "code": reason.code, "reason": reason.reason, "reconnect": reason.reconnect() }),
                    );
                    let _ = sink.send(Message::Text(text(&goodbye))).await;
                    let frame = CloseFrame { code: reason.code, reason: Utf8Bytes::from_static(reason.reason) };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    return;
                }
            },
            _ = state.shutdown.wait() => {
                session.outbound.close(CloseReason::SHUTDOWN);
            }
            _ = crate::realtime::expiry(session.expires_at), if session.expires_at.is_some() => {
                session.outbound.close(CloseReason::EXPIRED);
            }
            _ = ping.tick(), if !state.config.ping_interval.is_zero() => {
                if sink.send(Message::Text(Utf8Bytes::from_static("{\"type\":\"ping\"}"))).await.is_err() {
                    return;
                }
            }
            message = incoming.next() => match message {
                // The client only listens; anything but a close is ignored.
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}
