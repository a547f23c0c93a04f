//! `api/`: the only module that knows JSON (and, later, axum, tonic and
//! protobuf). It converts to and from domain types at its edge.

pub mod chaukas;
pub mod http;
pub mod json;
pub mod metrics;
pub mod proto;
