//! The fan-out worker's Herald SSE subscribers (`/connection/sse?channel=…`): open the
//! stream, wait for its `connected` event (the channel's offset), then count `publication`
//! events, ping comments and the `disconnect` event until the stream ends.
//!
//! Owns only the SSE side of a subscriber; the counting state is the worker's (`State`).

use super::{Ctx, Tracker, push};
use crate::sseclient::SseClient;

/// What SSE events said, beyond publications.
#[derive(Default)]
struct SseSeen {
    connected: bool,
    disconnect: Option<String>,
}

fn sse_event(ctx: &Ctx, slot: usize, channel: &str, kind: &str, data: &str, seen: &mut SseSeen) {
    let mut state = ctx.state.borrow_mut();
    match kind {
        "publication" => {
            if let Some(received) = push::sse_publication(data) {
                state.on_publication(slot, channel, received, push::now_ns());
            }
        }
        "connected" => {
            let start = serde_json::from_str::<serde_json::Value>(data)
                .ok()
                .and_then(|v| v["channels"][channel]["offset"].as_u64())
                .unwrap_or(0);
            let s = &mut state.slots[slot];
            s.tracker = Tracker::new(start);
            s.subscribed = true;
            s.open = true;
            seen.connected = true;
        }
        "disconnect" => {
            let code = serde_json::from_str::<serde_json::Value>(data)
                .ok()
                .and_then(|v| v["code"].as_u64())
                .map_or_else(|| "disconnect".to_owned(), |c| c.to_string());
            seen.disconnect = Some(code);
        }
        "comment" => state.pings += 1,
        _ => {}
    }
}

/// Opens the stream and reads until its `connected` event.
pub(super) async fn setup(ctx: &Ctx, slot: usize, channel: &str) -> Result<SseClient, String> {
    let stream = ctx.connect().await?;
    let path = format!("/connection/sse?channel={channel}");
    let mut client = SseClient::open(stream, &ctx.host, &path, ctx.token.as_deref()).await?;
    let mut seen = SseSeen::default();
    while !seen.connected {
        let open = client
            .read_events(&mut |kind, data| sse_event(ctx, slot, channel, kind, data, &mut seen))
            .await?;
        if let Some(code) = seen.disconnect {
            return Err(format!("disconnected while subscribing: {code}"));
        }
        if !open && !seen.connected {
            return Err("the stream ended before `connected`".to_owned());
        }
    }
    Ok(client)
}

pub(super) async fn run(ctx: &Ctx, slot: usize, channel: &str, mut client: SseClient) {
    let mut seen = SseSeen {
        connected: true,
        disconnect: None,
    };
    loop {
        let result = client
            .read_events(&mut |kind, data| sse_event(ctx, slot, channel, kind, data, &mut seen))
            .await;
        let mut state = ctx.state.borrow_mut();
        match result {
            Ok(true) if seen.disconnect.is_none() => continue,
            Ok(_) => {
                let code = seen.disconnect.take().unwrap_or_else(|| "eof".to_owned());
                let error = format!("stream ended: {code}");
                state.on_closed(slot, code, Some(error));
            }
            Err(error) => state.on_closed(slot, "error".to_owned(), Some(error)),
        }
        return;
    }
}
