//! Fuzz target `ws_protobuf_frame`: one WebSocket binary frame from a Protobuf-protocol
//! client into `Encoding::Protobuf.decode_binary` and `proto::decode_commands`. Never panics
//! (prost's recursion limit bounds nested groups); both entry points agree; every
//! length-delimited command takes at least one byte; a frame cut short at any byte that is not
//! a message boundary is refused; a JSON connection refuses every binary frame.

#![no_main]

use herald_transport::ws::codec::Encoding;
use herald_transport::ws::proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let by_codec = Encoding::Protobuf.decode_binary(data);
    let direct = proto::decode_commands(data);
    assert_eq!(
        by_codec.as_ref().map(Vec::len).ok(),
        direct.as_ref().map(Vec::len).ok()
    );
    if let Ok(commands) = &direct {
        assert!(commands.len() <= data.len());
        assert_eq!(commands.is_empty(), data.is_empty());
        // Dropping the last byte of an accepted frame leaves an incomplete last message
        // (unless it was a lone empty command, `0x00`), which must be refused.
        if let Some((&last, rest)) = data.split_last()
            && last != 0
        {
            // Only a last message of its own (a zero length prefix) could leave a whole frame.
            assert!(
                proto::decode_commands(rest).is_err(),
                "a frame missing its last byte still decoded"
            );
        }
    }
    assert!(Encoding::Json.decode_binary(data).is_err());
});
