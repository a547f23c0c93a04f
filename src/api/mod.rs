//! `api/`: the only module that knows JSON (and, later, axum, tonic and
//! protobuf). It converts to and from domain types at its edge.

pub mod json;
