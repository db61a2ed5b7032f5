//! Generates the gRPC code from `proto/*.proto` with a vendored `protoc`, so no
//! system protobuf compiler is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure().compile_protos(&["proto/client.proto"], &["proto"])?;
    // peer.proto uses client messages: one Rust type serves both.
    tonic_prost_build::configure()
        .extern_path(".fishchat.client.v1", "crate::client")
        .compile_protos(&["proto/peer.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
