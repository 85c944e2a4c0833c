//! Compiles the vendored ext_authz protos to prost messages with protox (pure Rust, no
//! `protoc`), so the wasm filter gets the wire types without tonic or tokio.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let roots = [
        "vendor/envoy/service/auth/v3/external_auth.proto",
        "vendor/envoy/config/core/v3/base.proto",
    ];
    for root in &roots {
        println!("cargo:rerun-if-changed={root}");
    }
    println!("cargo:rerun-if-changed=vendor");
    let files = protox::compile(roots, ["vendor"])?;
    // The same descriptors, encoded, for the policy server's gRPC reflection: what `grpcurl`
    // lists is compiled from exactly the protos the messages are.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("file_descriptor_set.bin"),
        prost::Message::encode_to_vec(&files),
    )?;
    prost_build::Config::new()
        // Only messages: gRPC dispatch in the filter goes through the proxy-wasm host.
        .compile_fds(files)?;
    Ok(())
}
