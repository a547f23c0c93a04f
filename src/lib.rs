//! evdb: an embedded event database.
//!
//! The library owns everything; `src/main.rs` only parses the command line.
//! Start with [`Db`]. The map of the code is in `ARCHITECTURE.md`, the bytes
//! on disk in `docs/format.md`.
//!
//! ```
//! use evdb::query::Query;
//! use evdb::{AppendOutcome, Config, Db, Event, Severity};
//!
//! let dir = tempfile::tempdir()?;
//! let db = Db::open(dir.path(), Config::default())?;
//! let mut event = Event::new("mahavishnu", "workflow_complete");
//! event.severity = Severity::Error;
//! event.tags = vec!["production".into()];
//! let id = event.id.clone();
//! assert!(matches!(db.append(event.clone())?, AppendOutcome::Stored(_)));
//! // Retrying is safe: the same id is stored once.
//! assert!(matches!(db.append(event)?, AppendOutcome::Duplicate(_)));
//! assert_eq!(db.get(&id)?.map(|e| e.source), Some("mahavishnu".to_owned()));
//!
//! let page = db.query(&Query {
//!     min_severity: Some(Severity::Warning),
//!     tags: vec!["production".into()],
//!     ..Query::default()
//! })?;
//! assert_eq!(page.events.len(), 1);
//! assert_eq!(db.stats(&Query::default())?.total, 1);
//! db.close()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod api;
pub mod bench;
pub mod bench_analytics;
pub mod bench_grpc;
pub mod bench_http;
pub mod bench_maintenance;
pub mod client;
pub mod config;
pub mod db;
mod db_index;
pub mod event;
pub mod generator;
pub mod index;
pub mod limits;
pub mod maintenance;
pub mod par;
pub mod query;
pub mod server;
pub mod snapshot;
pub mod storage;
pub mod tail;

pub use db::{AppendOutcome, Config, Db, DbError};
pub use event::{Event, JsonObject, NativeFormat, NativePayload, Severity, Timestamp};
