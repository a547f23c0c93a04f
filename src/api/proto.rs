//! Generated protobuf and gRPC code (see `build.rs` and `proto/`).

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod chaukas {
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("chaukas.spec.common.v1");
        }
    }
    pub mod server {
        pub mod v1 {
            tonic::include_proto!("chaukas.spec.server.v1");
        }
    }
    /// The server side, with `QueryEventsResponse` carrying encoded events.
    pub mod wire {
        include!(concat!(env!("OUT_DIR"), "/wire/chaukas.spec.server.v1.rs"));
    }
}

pub mod evdb {
    pub mod v1 {
        tonic::include_proto!("evdb.v1");
    }
}

/// The encoded `FileDescriptorSet` of every public proto above (for JSON
/// rendering and gRPC reflection).
pub const DESCRIPTORS: &[u8] = tonic::include_file_descriptor_set!("descriptors");
