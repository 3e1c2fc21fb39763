//! Fuzz target `ws_json_frame`: one WebSocket text frame from a JSON-protocol client into
//! `Encoding::Json.decode_text`, the decoder every JSON command goes through. Never panics;
//! when the frame is accepted it holds exactly one command per non-blank line, and the same
//! text is always refused on a Protobuf connection.

#![no_main]

use herald_transport::ws::codec::Encoding;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // WebSocket text frames are UTF-8 by the time the session sees them.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(commands) = Encoding::Json.decode_text(text) {
        let lines = text.split('\n').filter(|l| !l.trim().is_empty()).count();
        assert_eq!(commands.len(), lines, "one command per non-blank line");
        for command in &commands {
            if let Some(publish) = &command.publish {
                // JSON `data` is kept as the client's own JSON text.
                assert!(!publish.data.is_binary());
                assert!(text.contains(
                    std::str::from_utf8(publish.data.bytes()).expect("JSON data is UTF-8")
                ));
            }
        }
    }
    assert!(Encoding::Protobuf.decode_text(text).is_err());
});
