//! Server-Sent Events at `GET /connection/sse?channel=a&channel=b`, for the browser's
//! `EventSource` and any stock SSE client.
//!
//! Every event that moves a stream carries `id:` — the resume cursor of all the connection's
//! channels — so the standard `Last-Event-ID` reconnect resumes every channel at once with
//! exactly the missed publications, or says `recovered: false` for a channel whose missed
//! publications cannot be told. Events: `connected` (first, with each channel's position),
//! `publication`, `join`, `leave`, `disconnect` (last, with the protocol code); comments
//! (`: ping`) keep the stream alive.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Uri, header};
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use herald_core::Publication;
use herald_core::namespace::NamespaceOptions;
use herald_core::publication::ChannelEvent;
use serde::Serialize;

use crate::oneway::{Framing, OneWayRequest, OneWaySession, format_cursor, streaming_response};
use crate::outbound::{CloseReason, EventEncoder, Frame, FramePosition};
use crate::realtime::RealtimeState;
use crate::ws::protocol::WirePublication;

/// The encoding slot of SSE publication events (shared by every SSE connection).
pub const SSE_SLOT: usize = 1;

/// What EventSource waits before reconnecting, in milliseconds.
pub const RETRY_MS: u64 = 1000;

#[derive(Serialize)]
struct SsePublication<'a> {
    channel: &'a str,
    #[serde(flatten)]
    publication: WirePublication,
}

fn event_bytes(kind: &str, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + kind.len() + 16);
    out.put_slice(b"event: ");
    out.put_slice(kind.as_bytes());
    out.put_slice(b"\ndata: ");
    // JSON we produce has no raw newlines, so one `data:` line carries it.
    out.put_slice(data);
    out.put_slice(b"\n\n");
    out.freeze()
}

fn publication_frame(
    channel: &Arc<str>,
    epoch: &Arc<str>,
    publication: &Publication,
    bytes: Bytes,
) -> Frame {
    let position = (publication.offset > 0).then(|| FramePosition {
        channel: channel.clone(),
        offset: publication.offset,
        epoch: epoch.clone(),
    });
    Frame {
        bytes,
        position,
        conflate_key: None,
        expires_at_ms: 0,
    }
}

fn encode_publication(channel: &str, publication: &Publication) -> Bytes {
    let body = SsePublication {
        channel,
        publication: WirePublication::from(publication),
    };
    event_bytes(
        "publication",
        &serde_json::to_vec(&body).unwrap_or_default(),
    )
}

struct SseEncoder {
    join_leave: bool,
}

impl EventEncoder for SseEncoder {
    fn encode(&self, event: &ChannelEvent) -> Option<Frame> {
        match event {
            ChannelEvent::Publication(p) => {
                let bytes = p.encoded(SSE_SLOT, |p| encode_publication(&p.channel, &p.publication));
                Some(publication_frame(
                    &p.channel,
                    &p.epoch,
                    &p.publication,
                    bytes,
                ))
            }
            ChannelEvent::Join { channel, info } if self.join_leave => {
                let data = serde_json::json!({ "channel": &**channel, "info": &**info });
                Some(event_bytes("join", data.to_string().as_bytes()).into())
            }
            ChannelEvent::Leave { channel, info } if self.join_leave => {
                let data = serde_json::json!({ "channel": &**channel, "info": &**info });
                Some(event_bytes("leave", data.to_string().as_bytes()).into())
            }
            _ => None,
        }
    }
}

/// `GET /connection/sse`.
pub async fn sse_handler(
    State(state): State<Arc<RealtimeState>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let request = OneWayRequest::read("sse", &state, uri.query(), &headers);
    let encoder = |options: &NamespaceOptions| -> Arc<dyn EventEncoder> {
        Arc::new(SseEncoder {
            join_leave: options.join_leave,
        })
    };
    let recovered = |channel: &Arc<str>, epoch: &Arc<str>, publication: &Publication| {
        publication_frame(
            channel,
            epoch,
            publication,
            encode_publication(channel, publication),
        )
    };
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
    let hello = serde_json::json!({ "client": started.session.info.client, "channels": channels });
    let mut opening = BytesMut::new();
    opening.put_slice(
        format!(
            "retry: {RETRY_MS}\nid: {}\n",
            format_cursor(&started.positions)
        )
        .as_bytes(),
    );
    opening.put_slice(&event_bytes("connected", hello.to_string().as_bytes()));
    started.session.outbound.push(opening.freeze());
    started.release();

    let mut response = streaming_response(&state, started, SseFraming);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    response
}

/// SSE framing: `id:` lines where a frame moves a stream, comments as pings.
struct SseFraming;

impl Framing for SseFraming {
    fn render(&self, frames: &[Frame], positions: &mut [(Arc<str>, u64, Arc<str>)]) -> Bytes {
        let mut out = BytesMut::with_capacity(frames.iter().map(|f| f.bytes.len() + 64).sum());
        for frame in frames {
            if let Some(position) = &frame.position
                && let Some(entry) = positions
                    .iter_mut()
                    .find(|(c, _, _)| *c == position.channel)
            {
                entry.1 = position.offset;
                entry.2 = position.epoch.clone();
                out.put_slice(b"id: ");
                out.put_slice(format_cursor(positions).as_bytes());
                out.put_u8(b'\n');
            }
            out.put_slice(&frame.bytes);
        }
        out.freeze()
    }

    fn ping(&self) -> Bytes {
        Bytes::from_static(b": ping\n\n")
    }

    fn disconnect(&self, reason: CloseReason) -> Bytes {
        let data = serde_json::json!({ "code": reason.code, "reason": reason.reason, "reconnect": reason.reconnect() });
        event_bytes("disconnect", data.to_string().as_bytes())
    }
}
