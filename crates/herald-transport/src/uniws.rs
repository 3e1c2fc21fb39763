//! Uni-directional WebSocket at `GET /connection/uni_websocket?channel=…&since=<cursor>`:
//! the server sends, the client only listens — for stock WebSocket clients with no SDK.
//!
//! Every text message is one JSON object, the same objects as the HTTP streaming lines
//! (`connected` first with the starting `cursor`, then `publication`/`join`/`leave`, `ping`
//! keep-alives); the stream ends with a close frame carrying the protocol code (3008 slow, …).
//! Channels, token and resume cursor come from the URL (or `Authorization: Bearer`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocketUpgrade};
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use herald_core::Publication;
use herald_core::namespace::NamespaceOptions;

use crate::oneway::{OneWayRequest, OneWaySession, format_cursor};
use crate::outbound::EventEncoder;
use crate::stream::{NdjsonEncoder, line, publication_frame, publication_line};
use crate::ws::RealtimeState;

fn text(bytes: &Bytes) -> Utf8Bytes {
    let trimmed = bytes
        .strip_suffix(b"\n")
        .map_or_else(|| bytes.clone(), |t| bytes.slice(..t.len()));
    // Every frame is JSON we produced, hence UTF-8.
    Utf8Bytes::try_from(trimmed).unwrap_or_else(|_| Utf8Bytes::from_static("{}"))
}

/// `GET /connection/uni_websocket`.
pub async fn uni_websocket_handler(
    ws: WebSocketUpgrade,
    State(state): State<Arc<RealtimeState>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let request = OneWayRequest::from_parts(uri.query(), &headers);
    let encoder = |options: &NamespaceOptions| -> Arc<dyn EventEncoder> {
        Arc::new(NdjsonEncoder {
            join_leave: options.join_leave,
        })
    };
    let recovered = |channel: &Arc<str>, epoch: &Arc<str>, publication: &Publication| {
        publication_frame(
            channel,
            epoch,
            publication,
            publication_line(channel, epoch, publication),
        )
    };
    // Checked before the upgrade, so a refused client gets an HTTP status and a JSON body.
    let mut started = match OneWaySession::start(state.clone(), request, encoder, recovered).await {
        Ok(started) => started,
        Err(response) => return response,
    };
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
    let ping_every = if state.config.ping_interval.is_zero() {
        Duration::from_secs(25)
    } else {
        state.config.ping_interval
    };
    ws.read_buffer_size(1024)
        .write_buffer_size(0)
        .max_message_size(1024)
        .on_upgrade(move |socket| async move {
            let session = started.session;
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
                    _ = crate::ws::session::shutdown_signal(session.state.closing.subscribe()) => {
                        session.outbound.close(crate::outbound::CloseReason::SHUTDOWN);
                    }
                    _ = crate::ws::session::expiry(session.expires_at), if session.expires_at.is_some() => {
                        session.outbound.close(crate::outbound::CloseReason::EXPIRED);
                    }
                    _ = ping.tick(), if !session.state.config.ping_interval.is_zero() => {
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
        })
}
