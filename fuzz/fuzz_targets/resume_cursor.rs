//! Fuzz target `resume_cursor`: a one-way client's resume cursor (`Last-Event-ID` or
//! `?since=`) into `oneway::parse_cursor`. Never panics; an accepted cursor has exactly one
//! position per channel, each with an alphanumeric epoch, and formatting those positions with
//! `format_cursor` gives a cursor that parses back to them; a refusal is `bad request`.
//!
//! Input: the first byte is the channel count (mod 65, as one connection follows at most 64),
//! the rest is the cursor.

#![no_main]

use std::sync::Arc;

use herald_core::ErrorCode;
use herald_transport::oneway::{format_cursor, parse_cursor};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let count = usize::from(count % 65);
    match parse_cursor(text, count) {
        Ok(positions) => {
            assert_eq!(positions.len(), count);
            let tuples: Vec<(Arc<str>, u64, Arc<str>)> = positions
                .iter()
                .map(|p| {
                    assert!(p.epoch.bytes().all(|b| b.is_ascii_alphanumeric()));
                    (Arc::from("c"), p.offset, Arc::from(p.epoch.as_str()))
                })
                .collect();
            let again = format_cursor(&tuples);
            assert_eq!(parse_cursor(&again, count).ok(), Some(positions));
        }
        Err(err) => assert_eq!(err.code, ErrorCode::BadRequest),
    }
});
