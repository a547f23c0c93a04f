//! The in-memory index of an open segment, updated on the append path.

use std::borrow::Cow;

use roaring::RoaringBitmap;
use rustc_hash::FxHashMap;

use super::{Column, Dim, IndexError, IndexView, terms_of};
use crate::event::Event;

#[derive(Debug, Default)]
pub struct MemIndex {
    /// One map per dimension, in `Dim` order.
    terms: [FxHashMap<Box<str>, RoaringBitmap>; 5],
    /// Timestamp of each row; rows not yet indexed hold 0 and are absent
    /// from `present` (concurrent appends may index rows out of order).
    timestamps: Vec<i64>,
    present: RoaringBitmap,
    /// Rows indexed but not yet visible (see [`MemIndex::stage`]).
    staged: RoaringBitmap,
    deleted: RoaringBitmap,
    zones: Vec<(i64, i64)>,
    min_ts: i64,
    max_ts: i64,
    /// One column per declared numeric field: (JSON pointer, value of each
    /// row, NaN for none).
    numbers: Vec<(Box<str>, Vec<f64>)>,
}

/// A batch's index terms grouped by term before its rows are known (an
/// appender groups them while the writer checks and writes the batch),
/// for [`MemIndex::stage_terms`].
#[derive(Debug, Default)]
pub struct BatchTerms<'a> {
    events: Vec<&'a Event>,
    /// One map per dimension, in `Dim` order: each term with the
    /// positions in `events` of the events that hold it.
    groups: [FxHashMap<&'a str, Vec<u32>>; 5],
}

impl<'a> BatchTerms<'a> {
    pub fn of(events: impl IntoIterator<Item = &'a Event>) -> BatchTerms<'a> {
        let mut terms = BatchTerms::default();
        for event in events {
            let k = terms.events.len() as u32;
            terms_of(event, |dim, term| {
                terms.groups[dim as usize].entry(term).or_default().push(k);
            });
            terms.events.push(event);
        }
        terms
    }

    /// The events grouped.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

impl MemIndex {
    pub fn new() -> MemIndex {
        MemIndex::default()
    }

    /// An index that also extracts a numeric column per JSON pointer.
    pub fn with_fields(pointers: &[String]) -> MemIndex {
        MemIndex {
            numbers: pointers
                .iter()
                .map(|p| (p.as_str().into(), Vec::new()))
                .collect(),
            ..MemIndex::default()
        }
    }

    /// The declared numeric columns, for the numeric file.
    pub fn numeric_columns(&self) -> Vec<(&str, &[f64])> {
        self.numbers
            .iter()
            .map(|(p, v)| (&**p, v.as_slice()))
            .collect()
    }

    /// Indexes `event` at `row` and makes the row visible. Re-indexing a
    /// row is harmless.
    pub fn insert(&mut self, row: u32, event: &Event) {
        self.stage(row, event);
        self.commit(row);
    }

    /// Indexes `event` at `row` without making the row visible: it joins
    /// its terms' bitmaps, the timestamp and numeric columns and the time
    /// zones, but not `present` (which every reader intersects with) nor
    /// the segment's time bounds, until [`MemIndex::commit`]. Appenders
    /// stage their rows while the writer syncs them.
    pub fn stage(&mut self, row: u32, event: &Event) {
        terms_of(event, |dim, term| {
            let map = &mut self.terms[dim as usize];
            // Look up by the borrowed term first: most terms already exist.
            match map.get_mut(term) {
                // `insert`, not `try_push`: roaring's push into a bitmap
                // container first scans its 1,024 words for the maximum,
                // which made dense terms (severities, sources, `staged`)
                // the costliest part of staging (docs/PERFORMANCE.md).
                Some(b) => {
                    b.insert(row);
                }
                None => {
                    map.insert(term.into(), RoaringBitmap::from_iter([row]));
                }
            }
        });
        self.stage_columns(row, event);
    }

    /// The per-row part of staging: timestamp, numeric columns, time zone,
    /// and the staged set.
    fn stage_columns(&mut self, row: u32, event: &Event) {
        let ts = event.timestamp.as_micros();
        let i = row as usize;
        if self.timestamps.len() <= i {
            self.timestamps.resize(i + 1, 0);
        }
        self.timestamps[i] = ts;
        for (pointer, values) in &mut self.numbers {
            if values.len() <= i {
                values.resize(i + 1, f64::NAN);
            }
            values[i] = super::numeric::number_at(event.data.as_str(), pointer).unwrap_or(f64::NAN);
        }
        let z = (row / super::ZONE_ROWS) as usize;
        if self.zones.len() <= z {
            self.zones.resize(z + 1, (i64::MAX, i64::MIN));
        }
        self.zones[z] = (self.zones[z].0.min(ts), self.zones[z].1.max(ts));
        self.staged.insert(row);
    }

    /// [`MemIndex::stage`] for a batch, one row per event: see
    /// [`MemIndex::stage_terms`].
    pub fn stage_batch(&mut self, rows: &[(u32, &Event)]) {
        let terms = BatchTerms::of(rows.iter().map(|&(_, event)| event));
        let numbers: Vec<Option<u32>> = rows.iter().map(|&(row, _)| Some(row)).collect();
        self.stage_terms(&terms, &numbers);
    }

    /// Stages the events of `terms` whose row here is known: `rows[k]` is
    /// the row of its `k`th event (`None`: not stored in this segment).
    /// Term by term: the batch's rows of each distinct term go into its
    /// bitmap together, so each bitmap and its map entry are looked up
    /// once per batch instead of once per row.
    pub fn stage_terms(&mut self, terms: &BatchTerms<'_>, rows: &[Option<u32>]) {
        for (k, event) in terms.events.iter().enumerate() {
            if let Some(&Some(row)) = rows.get(k) {
                self.stage_columns(row, event);
            }
        }
        let row_of = |k: &u32| rows.get(*k as usize).copied().flatten();
        for (map, group) in self.terms.iter_mut().zip(&terms.groups) {
            for (&term, keys) in group {
                match map.get_mut(term) {
                    // One container lookup per change of container, not
                    // per row.
                    Some(b) => b.extend(keys.iter().filter_map(row_of)),
                    None => {
                        let b: RoaringBitmap = keys.iter().filter_map(row_of).collect();
                        if !b.is_empty() {
                            map.insert(term.into(), b);
                        }
                    }
                }
            }
        }
    }

    /// Makes the staged rows among `rows` visible at once (rows never
    /// staged are ignored). One bitmap difference and union instead of a
    /// removal per row: removing the rows of a batch one at a time from the
    /// front of `staged` moved the rest of the batch each time, a tenth of
    /// a microsecond per event on the append path.
    pub fn commit_rows(&mut self, rows: &[u32]) {
        let rows: RoaringBitmap = rows.iter().copied().collect();
        let rows = rows & &self.staged;
        if rows.is_empty() {
            return;
        }
        self.staged -= &rows;
        let (lo, hi) = rows.iter().fold((i64::MAX, i64::MIN), |(lo, hi), row| {
            let ts = self.timestamps.get(row as usize).copied().unwrap_or(0);
            (lo.min(ts), hi.max(ts))
        });
        if self.present.is_empty() {
            (self.min_ts, self.max_ts) = (lo, hi);
        } else {
            self.min_ts = self.min_ts.min(lo);
            self.max_ts = self.max_ts.max(hi);
        }
        self.present |= rows;
    }

    /// Makes a staged row visible; a row never staged is ignored.
    pub fn commit(&mut self, row: u32) {
        if !self.staged.remove(row) {
            return;
        }
        let ts = self.timestamps.get(row as usize).copied().unwrap_or(0);
        if self.present.is_empty() {
            (self.min_ts, self.max_ts) = (ts, ts);
        } else {
            self.min_ts = self.min_ts.min(ts);
            self.max_ts = self.max_ts.max(ts);
        }
        self.present.insert(row);
    }

    pub fn rows(&self) -> u64 {
        self.present.len()
    }

    /// Every term and its rows, sorted by (dimension, term): for the file.
    pub fn sorted_terms(&self) -> Vec<(Dim, &str, &RoaringBitmap)> {
        let mut v: Vec<_> = Dim::ALL
            .iter()
            .flat_map(|&d| {
                self.terms[d as usize]
                    .iter()
                    .map(move |(t, b)| (d, &**t, b))
            })
            .collect();
        v.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        v
    }

    pub fn timestamps(&self) -> &[i64] {
        &self.timestamps
    }
}

impl IndexView for MemIndex {
    fn live(&self) -> Cow<'_, RoaringBitmap> {
        if self.deleted.is_empty() {
            Cow::Borrowed(&self.present)
        } else {
            Cow::Owned(&self.present - &self.deleted)
        }
    }

    fn bitmap(&self, dim: Dim, term: &str) -> Result<Option<Cow<'_, RoaringBitmap>>, IndexError> {
        Ok(self.terms[dim as usize].get(term).map(Cow::Borrowed))
    }

    fn terms(&self, dim: Dim) -> Result<Vec<(String, Cow<'_, RoaringBitmap>)>, IndexError> {
        Ok(self.terms[dim as usize]
            .iter()
            .map(|(t, b)| (t.to_string(), Cow::Borrowed(b)))
            .collect())
    }

    fn for_each_term(
        &self,
        dim: Dim,
        f: &mut dyn FnMut(&str, &RoaringBitmap),
    ) -> Result<(), IndexError> {
        for (t, b) in &self.terms[dim as usize] {
            f(t, b);
        }
        Ok(())
    }

    fn timestamp(&self, row: u32) -> Result<i64, IndexError> {
        Ok(self.timestamps.get(row as usize).copied().unwrap_or(0))
    }

    fn time_bounds(&self) -> Option<(i64, i64)> {
        (!self.present.is_empty()).then_some((self.min_ts, self.max_ts))
    }

    fn zones(&self) -> Result<Cow<'_, [(i64, i64)]>, IndexError> {
        Ok(Cow::Borrowed(&self.zones))
    }

    fn rows_indexed(&self) -> u64 {
        self.present.len()
    }

    fn column(&self, pointer: &str) -> Option<Column<'_>> {
        self.numbers
            .iter()
            .find(|(p, _)| &**p == pointer)
            .map(|(_, v)| Column::Mem(v))
    }

    fn memory_bytes(&self) -> usize {
        let bitmaps: usize = self
            .terms
            .iter()
            .flat_map(|m| m.iter())
            .map(|(t, b)| t.len() + 48 + b.serialized_size())
            .sum();
        let numbers: usize = self.numbers.iter().map(|(_, v)| v.len() * 8).sum();
        bitmaps + self.timestamps.len() * 8 + self.present.serialized_size() + numbers
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::event::{Event, Timestamp};

    fn event(ts: i64, source: &str) -> Event {
        let mut e = Event::new(source, "t");
        e.timestamp = Timestamp(ts);
        e
    }

    #[test]
    fn staged_rows_are_invisible_until_committed() {
        let mut m = MemIndex::new();
        m.insert(0, &event(10, "a"));
        m.stage(1, &event(5, "a"));
        m.stage(2, &event(50, "b"));
        // Staged rows are in the term bitmaps but not live, and the time
        // bounds are those of the committed rows.
        assert_eq!(m.live().iter().collect::<Vec<_>>(), vec![0]);
        assert_eq!(m.time_bounds(), Some((10, 10)));
        assert_eq!(m.rows_indexed(), 1);
        let a = m.bitmap(Dim::Source, "a").unwrap().unwrap().into_owned();
        assert_eq!((a & m.live().as_ref()).len(), 1);
        m.commit(2);
        assert_eq!(m.live().iter().collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(m.time_bounds(), Some((10, 50)));
        // A row never staged is ignored; committing twice changes nothing.
        m.commit(7);
        m.commit(2);
        assert_eq!(m.rows_indexed(), 2);
        m.commit(1);
        assert_eq!(m.time_bounds(), Some((5, 50)));
        assert_eq!(m.live().len(), 3);
    }

    proptest::proptest! {
        /// Staging a batch term by term is staging its rows one by one,
        /// whatever their order (concurrent appenders) and with repeated
        /// tags, rows past a container's 65,536 and dense terms.
        #[test]
        fn staging_a_batch_is_staging_each_row(
            rows in proptest::collection::vec(
                (0u32..140_000, 0u8..3, proptest::collection::vec(0u8..4, 0..4), proptest::option::of(0u8..5), proptest::bool::weighted(0.8)),
                0..200,
            ),
        ) {
            let events: Vec<(u32, Event, bool)> = rows
                .iter()
                .map(|(row, source, tags, corr, stored)| {
                    let mut e = event(i64::from(*row) * 3, &format!("s{source}"));
                    e.tags = tags.iter().map(|t| format!("t{t}")).collect();
                    e.correlation_id = corr.map(|c| format!("c{c}"));
                    (*row, e, *stored)
                })
                .collect();
            // Events not stored here (duplicates, another segment) are
            // grouped with the batch but leave no trace in the index.
            let (mut each, mut batch) = (MemIndex::new(), MemIndex::new());
            for (row, e, stored) in &events {
                if *stored {
                    each.stage(*row, e);
                }
            }
            let terms = BatchTerms::of(events.iter().map(|(_, e, _)| e));
            let numbers: Vec<Option<u32>> =
                events.iter().map(|(r, _, stored)| stored.then_some(*r)).collect();
            batch.stage_terms(&terms, &numbers);
            for dim in Dim::ALL {
                let mut a = each.terms(dim).unwrap();
                let mut b = batch.terms(dim).unwrap();
                a.sort_by(|x, y| x.0.cmp(&y.0));
                b.sort_by(|x, y| x.0.cmp(&y.0));
                proptest::prop_assert_eq!(a, b);
            }
            proptest::prop_assert_eq!(&each.staged, &batch.staged);
            proptest::prop_assert_eq!(&each.timestamps, &batch.timestamps);
            proptest::prop_assert_eq!(&each.zones, &batch.zones);
        }

        /// Committing a batch at once is committing its rows one by one:
        /// same live rows, same time bounds, same rows left staged.
        #[test]
        fn committing_rows_at_once_is_committing_each(
            staged in proptest::collection::vec((0u32..300, -1000i64..1000), 0..120),
            batches in proptest::collection::vec(proptest::collection::vec(0u32..320, 0..40), 0..6),
        ) {
            let (mut each, mut once) = (MemIndex::new(), MemIndex::new());
            for (row, ts) in &staged {
                each.stage(*row, &event(*ts, "s"));
                once.stage(*row, &event(*ts, "s"));
            }
            for batch in &batches {
                for row in batch {
                    each.commit(*row);
                }
                once.commit_rows(batch);
                proptest::prop_assert_eq!(each.live().into_owned(), once.live().into_owned());
                proptest::prop_assert_eq!(each.time_bounds(), once.time_bounds());
                proptest::prop_assert_eq!(&each.staged, &once.staged);
            }
        }
    }
}
