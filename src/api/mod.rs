//! `api/`: the only module that knows the wire: JSON, HTTP (axum), gRPC
//! (tonic) and protobuf. It converts to and from domain types at its edge.

pub mod auth;
pub mod chaukas;
pub mod grpc;
pub mod http;
pub mod json;
pub mod load;
pub mod metrics;
pub mod proto;
pub mod ratelimit;
pub mod tls;
