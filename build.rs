//! Compiles the protobuf contracts in `proto/` with the vendored `protoc`
//! (no system protoc is needed):
//! * the Chaukas spec 1.0.5 and `evdb.v1` (messages, clients, the `evdb.v1`
//!   server, and the descriptor set served by reflection);
//! * `proto/wire/chaukas_server.proto`, the Chaukas server side whose
//!   `QueryEventsResponse` carries the stored event bytes unchanged.

use std::io;
use std::path::PathBuf;

const PROTOS: [&str; 4] = [
    "proto/chaukas/spec/common/v1/events.proto",
    "proto/chaukas/spec/common/v1/query.proto",
    "proto/chaukas/spec/server/v1/server.proto",
    "proto/evdb/v1/evdb.proto",
];
const WIRE: &str = "proto/wire/chaukas_server.proto";

fn config() -> io::Result<tonic_prost_build::Config> {
    let protoc = protoc_bin_vendored::protoc_bin_path().map_err(io::Error::other)?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    Ok(config)
}

fn main() -> io::Result<()> {
    let include = protoc_bin_vendored::include_path().map_err(io::Error::other)?;
    let include = include.to_string_lossy().into_owned();
    for p in PROTOS.iter().chain([&WIRE]) {
        println!("cargo:rerun-if-changed={p}");
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").map_err(io::Error::other)?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("descriptors.bin"))
        .build_server(true)
        .build_client(true)
        .compile_with_config(config()?, &PROTOS, &["proto", include.as_str()])?;
    let wire_dir = out_dir.join("wire");
    std::fs::create_dir_all(&wire_dir)?;
    tonic_prost_build::configure()
        .out_dir(&wire_dir)
        .build_server(true)
        .build_client(true)
        .extern_path(
            ".chaukas.spec.common.v1",
            "crate::api::proto::chaukas::common::v1",
        )
        .compile_with_config(config()?, &[WIRE], &["proto", include.as_str()])?;
    Ok(())
}
