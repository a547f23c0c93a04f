//! evdb: an embedded event database.
//!
//! The library owns everything; `src/main.rs` only parses the command line.
//! Start with [`Db`]. The map of the code is in `ARCHITECTURE.md`, the bytes
//! on disk in `docs/format.md`.

pub mod api;
pub mod bench;
pub mod db;
mod db_index;
pub mod event;
pub mod generator;
pub mod index;
pub mod limits;
pub mod query;
pub mod storage;

pub use db::{AppendOutcome, Config, Db, DbError};
pub use event::{Event, JsonObject, NativeFormat, NativePayload, Severity, Timestamp};
