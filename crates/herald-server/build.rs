//! Compiles the published `.proto` files (`proto/` at the repository root) into the gRPC
//! server code (`crate::grpc::proto`) with protox, a pure-Rust protobuf compiler, so building
//! needs no system `protoc`. Also writes the encoded descriptor set that server reflection
//! serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let descriptors = protox::compile(
        ["centrifugo/api.proto", "centrifugo/unistream.proto"],
        [&root],
    )?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("herald_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .btree_map(".")
        // Malformed requests are INVALID_ARGUMENT, not prost's INTERNAL (src/grpc/codec.rs).
        .codec_path("crate::grpc::codec::StrictCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
