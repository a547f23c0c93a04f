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

/// `evdb --version`: the commit, target, profile and compiler of this build.
fn build_info() {
    let run = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let commit =
        run("git", &["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = run("git", &["status", "--porcelain", "--untracked-files=no"]).is_some();
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc = run(&rustc, &["--version"]).unwrap_or_else(|| "rustc unknown".into());
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| "unknown".into());
    println!(
        "cargo:rustc-env=EVDB_BUILD_INFO=commit {commit}{}, {}, {} profile, {rustc}",
        if dirty { "-dirty" } else { "" },
        var("TARGET"),
        var("PROFILE"),
    );
    // Rebuild the line when the checked-out commit moves.
    for git in [".git/HEAD", ".git/index"] {
        if std::path::Path::new(git).exists() {
            println!("cargo:rerun-if-changed={git}");
        }
    }
}

fn main() -> io::Result<()> {
    build_info();
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
