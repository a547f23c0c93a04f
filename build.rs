//! Compiles the protobuf contracts in `proto/` with the vendored `protoc`
//! (no system protoc is needed).

use std::io;

fn main() -> io::Result<()> {
    let protoc = protoc_bin_vendored::protoc_bin_path().map_err(io::Error::other)?;
    let include = protoc_bin_vendored::include_path().map_err(io::Error::other)?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    let protos = [
        "proto/chaukas/spec/common/v1/events.proto",
        "proto/chaukas/spec/common/v1/query.proto",
        "proto/chaukas/spec/server/v1/server.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let include = include.to_string_lossy().into_owned();
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").map_err(io::Error::other)?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("descriptors.bin"))
        .build_server(true)
        .build_client(true)
        .compile_with_config(config, &protos, &["proto", include.as_str()])?;
    Ok(())
}
