//! Long-poll at `GET /connection/poll?channel=…&since=<cursor>&timeout=25s`: one JSON answer
//! per request, for clients that can only do plain request/response.
//!
//! Answers `{"publications":[…],"cursor":"…","channels":{name:{offset,epoch,recovered?}}}`.
//! With a `since` cursor, the publications missed since it come back at once; with nothing
//! missed, the request waits up to `timeout` (at most 60 s; `timeout=0` is a plain poll) for
//! the next publications. The next request passes the returned `cursor`. Publications use the
//! same objects as the HTTP streaming lines; a channel that cannot be resumed is reported with
//! `"recovered": false` and its cursor moves to the present.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, BytesMut};
use herald_core::namespace::NamespaceOptions;
use herald_core::{HeraldError, Publication};

use crate::oneway::{OneWayRequest, OneWaySession, error_response, format_cursor};
use crate::outbound::{EventEncoder, Frame};
use crate::realtime::RealtimeState;
use crate::stream::{NdjsonEncoder, publication_frame, publication_line};

/// Longest a poll may wait.
pub const MAX_POLL_WAIT: Duration = Duration::from_secs(60);

fn poll_timeout(query: Option<&str>) -> Result<Duration, HeraldError> {
    let text = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(key, _)| key == "timeout")
        .map(|(_, value)| value.into_owned());
    match text {
        None => Ok(Duration::from_secs(25)),
        Some(text) => herald_core::duration::parse_duration(&text)
            .map(|d| d.min(MAX_POLL_WAIT))
            .map_err(HeraldError::bad_request),
    }
}

/// `GET /connection/poll`.
pub async fn poll_handler(
    State(state): State<Arc<RealtimeState>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let wait = match poll_timeout(uri.query()) {
        Ok(wait) => wait,
        Err(error) => return error_response(StatusCode::BAD_REQUEST, &error),
    };
    let request = OneWayRequest::read("long_poll", &state, uri.query(), &headers);
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
    started.release();
    let unrecovered = started
        .starts
        .iter()
        .any(|(_, start)| start.recovered == Some(false));
    let outbound = started.session.outbound.clone();
    let mut frames = Vec::new();
    if outbound.queued_bytes() > 0 || unrecovered || wait.is_zero() {
        if outbound.queued_bytes() > 0 {
            let _ = outbound.drain(&mut frames).await;
        }
    } else if let Ok(Ok(())) = tokio::time::timeout(wait, outbound.drain(&mut frames)).await {
        // Publications often come in bursts: take what arrives right behind the first.
        tokio::time::sleep(Duration::from_millis(5)).await;
        if outbound.queued_bytes() > 0 {
            let _ = outbound.drain(&mut frames).await;
        }
    }
    let mut positions = started.positions.clone();
    let body = render(&frames, &mut positions, &started.starts);
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn render(
    frames: &[Frame],
    positions: &mut [(Arc<str>, u64, Arc<str>)],
    starts: &[(String, crate::oneway::ChannelStart)],
) -> Vec<u8> {
    let mut out =
        BytesMut::with_capacity(frames.iter().map(|f| f.bytes.len() + 1).sum::<usize>() + 128);
    out.put_slice(b"{\"publications\":[");
    let mut first = true;
    for frame in frames {
        if let Some(position) = &frame.position
            && let Some(entry) = positions
                .iter_mut()
                .find(|(c, _, _)| *c == position.channel)
        {
            entry.1 = position.offset;
            entry.2 = position.epoch.clone();
        }
        if !first {
            out.put_u8(b',');
        }
        first = false;
        // Each frame is one JSON object followed by a newline.
        out.put_slice(frame.bytes.strip_suffix(b"\n").unwrap_or(&frame.bytes));
    }
    let channels: serde_json::Map<String, serde_json::Value> = starts
        .iter()
        .map(|(name, start)| {
            (
                name.clone(),
                serde_json::to_value(start).unwrap_or_default(),
            )
        })
        .collect();
    out.put_slice(b"],\"cursor\":");
    out.put_slice(
        serde_json::to_string(&format_cursor(positions))
            .unwrap_or_default()
            .as_bytes(),
    );
    out.put_slice(b",\"channels\":");
    out.put_slice(
        serde_json::to_string(&channels)
            .unwrap_or_default()
            .as_bytes(),
    );
    out.put_u8(b'}');
    out.to_vec()
}
