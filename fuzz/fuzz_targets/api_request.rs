//! Fuzz target `api_request`: server HTTP API request bodies (`POST /api/<method>`), decoded
//! the way the HTTP adapter (`herald_server::api::http`) does before the typed layer runs
//! them: an all-whitespace body is `{}`, the body must be one JSON value, then
//! [`Request::from_json`] for the method (`batch`: each command decoded on its own), and for
//! publish and broadcast `types::payload` turns `data` / `b64data` into the payload.
//! Never panics; a decoded request calls the method it was decoded for; a batch command
//! names a method other than `batch` exactly when it decoded or failed on its parameters;
//! `b64data` wins over `data` and yields exactly its decoded bytes; `data` is kept as the
//! client's JSON text; a request with neither is refused.
//!
//! Input: the first byte picks the method (any of [`Method::ALL`]), the rest is the body.

#![no_main]

use base64::Engine as _;
use herald_core::publication::Payload;
use herald_server::api::types::payload;
use herald_server::api::{Method, Request};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

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

fn check_request(method: Method, request: Request) {
    assert_eq!(request.method(), method);
    match request {
        Request::Publish(p) => check_payload(p.data, p.b64data),
        Request::Broadcast(p) => check_payload(p.data, p.b64data),
        Request::Batch(batch) => {
            for command in batch.commands {
                match (command.method, command.request) {
                    (Some(method), Ok(request)) => {
                        assert_ne!(method, Method::Batch);
                        check_request(method, request);
                    }
                    (Some(method), Err(_)) => assert_ne!(method, Method::Batch),
                    (None, request) => assert!(request.is_err(), "a command without a method"),
                }
            }
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let method = Method::ALL[usize::from(pick) % Method::ALL.len()];
    assert_eq!(Method::from_name(method.name()), Some(method));
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    if let Ok(params) = serde_json::from_slice::<&RawValue>(body)
        && let Ok(request) = Request::from_json(method, params)
    {
        check_request(method, request);
    }
});
