//! Fuzz target `api_request`: server HTTP API request bodies (`POST /api/<method>`), decoded
//! the way `herald_server::api` does before it calls the node: an all-whitespace body is `{}`,
//! the body must be one JSON value, then the method's public request type from
//! `api::types` (`batch`: `BatchParams`, then each command's own type), and for publish and
//! broadcast `types::payload` turns `data` / `b64data` into the publication's payload.
//! Never panics; `b64data` wins over `data` and yields exactly its decoded bytes; `data` is
//! kept as the client's JSON text; a request with neither is refused.
//!
//! Input: the first byte picks the method, the rest is the body.

#![no_main]

use base64::Engine as _;
use herald_core::publication::Payload;
use herald_server::api::methods;
use herald_server::api::types::{
    BatchParams, BroadcastParams, ChannelParams, ChannelsParams, EmptyParams, HistoryParams,
    PublishParams, payload,
};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

const METHODS: [&str; 9] = [
    "publish",
    "broadcast",
    "history",
    "history_remove",
    "presence",
    "presence_stats",
    "channels",
    "info",
    "batch",
];

fn check_payload(data: Option<Box<RawValue>>, b64data: Option<String>) {
    let raw = data.as_ref().map(|d| d.get().to_owned());
    let encoded = b64data.clone().filter(|s| !s.is_empty());
    let result = payload(data, b64data);
    match (encoded, raw) {
        (Some(encoded), _) => {
            let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.as_bytes());
            match (result, decoded) {
                (Ok(Payload::Binary(bytes)), Ok(expected)) => assert_eq!(&bytes[..], &expected[..]),
                (Err(_), Err(_)) => {}
                (result, decoded) => panic!("b64data: {result:?} but base64 says {decoded:?}"),
            }
        }
        (None, Some(raw)) => match result {
            Ok(Payload::Json(bytes)) => assert_eq!(&bytes[..], raw.as_bytes()),
            other => panic!("data {raw:?} gave {other:?}"),
        },
        (None, None) => assert!(result.is_err(), "neither data nor b64data"),
    }
}

fn decode_params(method: &str, params: &RawValue) {
    let text = params.get();
    match method {
        "publish" => {
            if let Ok(p) = serde_json::from_str::<PublishParams>(text) {
                check_payload(p.data, p.b64data);
            }
        }
        "broadcast" => {
            if let Ok(p) = serde_json::from_str::<BroadcastParams>(text) {
                check_payload(p.data, p.b64data);
            }
        }
        "history" => {
            let _ = serde_json::from_str::<HistoryParams>(text);
        }
        "history_remove" | "presence" | "presence_stats" => {
            let _ = serde_json::from_str::<ChannelParams>(text);
        }
        "channels" => {
            let _ = serde_json::from_str::<ChannelsParams>(text);
        }
        "info" => {
            let _ = serde_json::from_str::<EmptyParams>(text);
        }
        other => panic!("not a method: {other}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let method = METHODS[usize::from(pick) % METHODS.len()];
    assert_eq!(methods::is_known(method), method != "batch");
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    if method == "batch" {
        let Ok(batch) = serde_json::from_slice::<BatchParams>(body) else {
            return;
        };
        for command in batch.commands {
            let mut entries = command.into_iter();
            if let (Some((method, params)), None) = (entries.next(), entries.next())
                && method != "batch"
                && methods::is_known(&method)
            {
                decode_params(&method, &params);
            }
        }
        return;
    }
    if let Ok(params) = serde_json::from_slice::<&RawValue>(body) {
        decode_params(method, params);
    }
});
