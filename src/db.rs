//! `Db`: the library API for embedded use, shared as `Arc<Db>`.
//!
//! Validation and encoding happen on the caller's thread; the storage writer
//! only checks ids and writes. Later layers (indexes, queries) hang off this
//! type, so storage stays ignorant of them.

use std::path::Path;
use std::sync::Arc;

use crate::event::Event;
use crate::limits::{self, Invalid, Limits};
use crate::storage::dir::FileSystem;
use crate::storage::{self, Appended, Log, Position, Prepared, StorageConfig, StorageError};

/// Everything `Db::open` needs to know.
#[derive(Clone, Debug, Default)]
pub struct Config {
    pub storage: StorageConfig,
    pub limits: Limits,
}

/// Errors of the library API.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The request as a whole is refused (e.g. too many events).
    #[error("{0}")]
    TooLarge(Invalid),
}

/// What happened to one event of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppendOutcome {
    Stored(Position),
    /// The id was stored already (at this position): nothing was written.
    Duplicate(Position),
    Invalid(Invalid),
}

pub struct Db {
    log: Log,
    config: Config,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("log", &self.log).finish()
    }
}

const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Db>();
};

impl Db {
    /// Opens or creates the database in `path`, recovering after a crash.
    pub fn open(path: impl AsRef<Path>, config: Config) -> Result<Db, DbError> {
        let log = Log::open(path.as_ref(), config.storage.clone())?;
        Ok(Db { log, config })
    }

    /// Opens with a chosen file-system seam (fault injection in tests).
    pub fn open_with(
        path: impl AsRef<Path>,
        config: Config,
        fs: Arc<dyn FileSystem>,
    ) -> Result<Db, DbError> {
        let log = Log::open_with(path.as_ref(), config.storage.clone(), fs)?;
        Ok(Db { log, config })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Validates and stores a batch; one outcome per event, in order.
    /// Invalid events are reported and never stop the valid ones. Returns
    /// once the stored events are acknowledged (durable under
    /// `--fsync always`).
    pub fn append_batch(&self, events: Vec<Event>) -> Result<Vec<AppendOutcome>, DbError> {
        let max = self.config.limits.batch_events_max;
        if events.len() > max {
            return Err(DbError::TooLarge(Invalid::new(
                "events",
                format!("batch holds {} events, at most {max} allowed", events.len()),
            )));
        }
        let mut outcomes: Vec<Option<AppendOutcome>> = Vec::with_capacity(events.len());
        let mut prepared = Prepared::with_capacity(events.len());
        let limit = self.config.limits.event_size_max;
        for event in &events {
            let checked = limits::validate(event).and_then(|()| {
                prepared
                    .push(event, limit)
                    .map(|_| ())
                    .map_err(|size| limits::too_large(size, limit))
            });
            outcomes.push(checked.err().map(AppendOutcome::Invalid));
        }
        drop(events);
        let mut appended = self.log.append(prepared)?.into_iter();
        let mut out = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            let outcome = match outcome {
                Some(invalid) => invalid,
                None => match appended.next() {
                    Some(Appended::Stored(pos)) => AppendOutcome::Stored(pos),
                    Some(Appended::Duplicate(pos)) => AppendOutcome::Duplicate(pos),
                    None => {
                        return Err(StorageError::Poisoned(
                            "the writer answered fewer events than it was given".into(),
                        )
                        .into());
                    }
                },
            };
            out.push(outcome);
        }
        Ok(out)
    }

    /// Stores one event.
    pub fn append(&self, event: Event) -> Result<AppendOutcome, DbError> {
        let mut outcomes = self.append_batch(vec![event])?;
        outcomes.pop().ok_or_else(|| {
            DbError::Storage(StorageError::Poisoned("no outcome for the event".into()))
        })
    }

    /// The event with this id, if stored.
    pub fn get(&self, event_id: &str) -> Result<Option<Event>, DbError> {
        Ok(self.log.get(event_id)?)
    }

    /// Every event in arrival order.
    pub fn scan(&self) -> storage::Scan {
        self.log.scan()
    }

    /// Number of stored events.
    pub fn len(&self) -> u64 {
        self.log.segments().total_rows()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes everything appended durable (useful under `interval`/`never`).
    pub fn sync(&self) -> Result<(), DbError> {
        Ok(self.log.sync()?)
    }

    /// Rolls and seals the active segment now.
    pub fn seal(&self) -> Result<(), DbError> {
        Ok(self.log.seal()?)
    }

    /// The storage log, for tools that inspect segments.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// Seals, syncs and stops the background threads.
    pub fn close(&self) -> Result<(), DbError> {
        Ok(self.log.close()?)
    }
}
