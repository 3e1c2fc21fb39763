//! Compiles the published `.proto` files (`proto/` at the repository root) into the gRPC
//! server code (`crate::grpc::proto`, `heraldproto`, `uniproto`, `streamproto`) with protox, a pure-Rust
//! protobuf compiler, so building needs no system `protoc`. Also writes the encoded
//! descriptor set that server reflection serves.

use std::path::PathBuf;

/// The files with services; their imports come along.
const SERVICE_FILES: [&str; 4] = [
    "centrifugo/api.proto",
    "herald/api.proto",
    "centrifugo/unistream.proto",
    "herald/client_stream.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let descriptors = protox::compile(SERVICE_FILES, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("herald_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    // The API and the uni stream: prost messages.
    let mut typed = descriptors.clone();
    typed.file.retain(|file| file.package() != "herald.stream");
    typed
        .file
        .retain(|file| file.package() != "centrifugal.centrifuge.protocol");
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .btree_map(".")
        // Malformed requests are INVALID_ARGUMENT, not prost's INTERNAL (src/grpc/codec.rs).
        .codec_path("crate::grpc::codec::StrictCodec")
        .compile_fds(typed)?;
    // The bidirectional stream: its messages pass through as raw bytes, decoded and encoded
    // by the session that the WebSocket uses too (src/grpc/bidi.rs).
    let mut raw = descriptors;
    raw.file.retain(|file| file.package() == "herald.stream");
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .extern_path(".centrifugal.centrifuge.protocol", "crate::grpc::bidi::raw")
        .codec_path("crate::grpc::bidi::RawCodec")
        .compile_fds(raw)?;
    Ok(())
}
