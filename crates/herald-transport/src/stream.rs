//! HTTP streaming at `GET /connection/stream?channel=…`: newline-delimited JSON, one object
//! per line, for `curl -N` and any HTTP client that reads a body as it arrives.
//!
//! Lines: `{"type":"connected","client","channels":{name:{offset,epoch,recovered?}},"cursor"}`
//! first; then `{"type":"publication","channel","epoch","offset","data",…}`, `join`, `leave`,
//! `{"type":"ping"}` keep-alives, and `{"type":"disconnect","code","reason","reconnect"}` last.
//! Every publication line carries its channel's `offset` and `epoch`, so a client builds the
//! resume cursor (`offset:epoch` per channel, in URL order, joined by `,`) and reconnects
//! with `?since=<cursor>`; the `connected` line's `cursor` is the starting one.

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

/// The encoding slot of NDJSON publication lines (shared by every streaming connection).
pub const NDJSON_SLOT: usize = 2;

#[derive(Serialize)]
struct Line<'a, T: Serialize> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(flatten)]
    body: T,
}

pub(crate) fn line<T: Serialize>(kind: &str, body: T) -> Bytes {
    let mut out = serde_json::to_vec(&Line { kind, body }).unwrap_or_default();
    out.push(b'\n');
    Bytes::from(out)
}

#[derive(Serialize)]
struct PublicationLine<'a> {
    channel: &'a str,
    epoch: &'a str,
    #[serde(flatten)]
    publication: WirePublication,
}

pub(crate) fn publication_line(
    channel: &Arc<str>,
    epoch: &Arc<str>,
    publication: &Publication,
) -> Bytes {
    line(
        "publication",
        PublicationLine {
            channel,
            epoch,
            publication: WirePublication::from(publication),
        },
    )
}

pub(crate) fn publication_frame(
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

pub(crate) struct NdjsonEncoder {
    pub(crate) join_leave: bool,
}

impl EventEncoder for NdjsonEncoder {
    fn encode(&self, event: &ChannelEvent) -> Option<Frame> {
        match event {
            ChannelEvent::Publication(p) => {
                let bytes = p.encoded(NDJSON_SLOT, |p| {
                    publication_line(&p.channel, &p.epoch, &p.publication)
                });
                Some(publication_frame(
                    &p.channel,
                    &p.epoch,
                    &p.publication,
                    bytes,
                ))
            }
            ChannelEvent::Join { channel, info } if self.join_leave => Some(
                line(
                    "join",
                    serde_json::json!({ "channel": &**channel, "info": &**info }),
                )
                .into(),
            ),
            ChannelEvent::Leave { channel, info } if self.join_leave => Some(
                line(
                    "leave",
                    serde_json::json!({ "channel": &**channel, "info": &**info }),
                )
                .into(),
            ),
            _ => None,
        }
    }
}

struct NdjsonFraming;

impl Framing for NdjsonFraming {
    fn render(&self, frames: &[Frame], _positions: &mut [(Arc<str>, u64, Arc<str>)]) -> Bytes {
        let mut out = BytesMut::with_capacity(frames.iter().map(|f| f.bytes.len()).sum());
        for frame in frames {
            out.put_slice(&frame.bytes);
        }
        out.freeze()
    }

    fn ping(&self) -> Bytes {
        Bytes::from_static(b"{\"type\":\"ping\"}\n")
    }

    fn disconnect(&self, reason: CloseReason) -> Bytes {
        line(
            "disconnect",
            serde_json::json!({ "code": reason.code, "reason": reason.reason, "reconnect": reason.reconnect() }),
        )
    }
}

/// `GET /connection/stream`.
pub async fn stream_handler(
    State(state): State<Arc<RealtimeState>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let request = OneWayRequest::read("http_stream", &state, uri.query(), &headers);
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
    let mut response = streaming_response(&state, started, NdjsonFraming);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
}
