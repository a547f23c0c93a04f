//! `index/`: which rows of a segment hold this source, type, severity, tag
//! or correlation id, and when did each row happen.
//!
//! One index per segment, over row numbers, with `roaring` bitmaps. The
//! active (and rolled, unsealed) segments have a [`MemIndex`] updated on the
//! append path; a sealed segment has an index file (`index/N.idx`, format
//! in `docs/format.md`) written when it is sealed and read through a memory
//! map, term by term, so memory does not grow with the number of terms.
//! Index knows nothing of HTTP, JSON or how records are encoded.

pub mod file;
mod mem;
pub mod numeric;

use std::borrow::Cow;

use roaring::RoaringBitmap;

pub use file::{SealedIndex, fuzz_index, write_index_file};
pub use mem::{BatchTerms, MemIndex};
pub use numeric::{Column, NumericFile, write_numeric_file};

use crate::event::Event;

/// An indexed dimension of an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dim {
    Source = 0,
    Type = 1,
    Severity = 2,
    Tag = 3,
    Correlation = 4,
}

impl Dim {
    pub const ALL: [Dim; 5] = [
        Dim::Source,
        Dim::Type,
        Dim::Severity,
        Dim::Tag,
        Dim::Correlation,
    ];

    fn from_u8(v: u8) -> Option<Dim> {
        Dim::ALL.get(usize::from(v)).copied()
    }
}

/// Errors of the index layer.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("index of segment {segment} is corrupted at offset {offset}: {reason}")]
    Corrupted {
        segment: u64,
        offset: u64,
        reason: String,
    },
}

impl IndexError {
    fn corrupted(segment: u64, offset: usize, reason: impl Into<String>) -> IndexError {
        IndexError::Corrupted {
            segment,
            offset: offset as u64,
            reason: reason.into(),
        }
    }
}

/// Rows per time zone (see [`IndexView::zones`]).
pub const ZONE_ROWS: u32 = 1024;

/// The zones of a timestamp column.
pub fn zones_of(timestamps: impl Iterator<Item = i64>) -> Vec<(i64, i64)> {
    let mut zones: Vec<(i64, i64)> = Vec::new();
    for (row, ts) in timestamps.enumerate() {
        let z = row / ZONE_ROWS as usize;
        if zones.len() <= z {
            zones.push((i64::MAX, i64::MIN));
        }
        zones[z] = (zones[z].0.min(ts), zones[z].1.max(ts));
    }
    zones
}

/// The severity term of a level (its name).
pub fn severity_term(level: crate::event::Severity) -> &'static str {
    level.as_str()
}

/// Calls `f` with every (dimension, term) of an event.
pub fn terms_of<'a>(event: &'a Event, mut f: impl FnMut(Dim, &'a str)) {
    f(Dim::Source, &event.source);
    f(Dim::Type, &event.event_type);
    f(Dim::Severity, severity_term(event.severity));
    for tag in &event.tags {
        f(Dim::Tag, tag);
    }
    if let Some(c) = &event.correlation_id {
        f(Dim::Correlation, c);
    }
}

/// What the query engine reads of a segment's index (shared by the
/// threads of one aggregation).
pub trait IndexView: Sync {
    /// Rows the index knows of (present and not deleted).
    fn live(&self) -> Cow<'_, RoaringBitmap>;
    /// The rows holding `term` in `dim`; `None` if the term is absent.
    fn bitmap(&self, dim: Dim, term: &str) -> Result<Option<Cow<'_, RoaringBitmap>>, IndexError>;
    /// Every term of `dim` with its rows.
    fn terms(&self, dim: Dim) -> Result<Vec<(String, Cow<'_, RoaringBitmap>)>, IndexError>;
    /// Calls `f` with every term of `dim` and its rows, without collecting
    /// them (a segment may hold many thousands of correlation ids).
    fn for_each_term(
        &self,
        dim: Dim,
        f: &mut dyn FnMut(&str, &RoaringBitmap),
    ) -> Result<(), IndexError> {
        for (term, bitmap) in self.terms(dim)? {
            f(&term, &bitmap);
        }
        Ok(())
    }
    /// The timestamp of `row` (µs); only called for rows in `live`.
    fn timestamp(&self, row: u32) -> Result<i64, IndexError>;
    /// The smallest and largest timestamp of any row.
    fn time_bounds(&self) -> Option<(i64, i64)>;
    /// Smallest and largest timestamp of each run of `ZONE_ROWS` rows
    /// (`(i64::MAX, i64::MIN)` for a run with no row yet): lets a top-k
    /// query visit the newest rows first and stop early.
    fn zones(&self) -> Result<Cow<'_, [(i64, i64)]>, IndexError>;
    /// Bytes of memory the index holds (not counting mapped files).
    fn memory_bytes(&self) -> usize;
    /// The numeric column extracted at ingest for a declared JSON pointer,
    /// if this index has one.
    fn column(&self, _pointer: &str) -> Option<Column<'_>> {
        None
    }
    /// The sealed-time summary of a declared field over the rows of
    /// (`dim` byte, `term`), or every row with `numeric::SUMMARY_ALL`.
    fn summary(&self, _pointer: &str, _dim: u8, _term: &str) -> Option<numeric::SummaryRef<'_>> {
        None
    }
    /// Rows the index covers, deleted ones included.
    fn rows_indexed(&self) -> u64;
}
