//! Compiles `closedloop/v1/*.proto` with protox (a protobuf compiler written in Rust), so a
//! fresh machine builds without a system `protoc`. The file descriptor set is kept for gRPC
//! server reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "closedloop/v1/types.proto",
        "closedloop/v1/events.proto",
        "closedloop/v1/ingest_service.proto",
        "closedloop/v1/classify_service.proto",
        "closedloop/v1/work_order_service.proto",
        "closedloop/v1/notification_service.proto",
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("closedloop_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Undecodable requests are INVALID_ARGUMENT, not INTERNAL (src/lib.rs, `codec`).
        .codec_path("crate::codec::Codec")
        .compile_fds(descriptors)?;
    Ok(())
}
