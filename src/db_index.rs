//! The indexes of every segment, kept beside the log: in-memory ones for
//! open segments (updated on the append path), files for sealed ones
//! (written by the seal hook, opened on first use, rebuilt if missing or
//! damaged).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{RawRwLock, RwLock, lock_api::ArcRwLockReadGuard};

use crate::event::Event;
use roaring::RoaringBitmap;

use crate::index::file::SMALL_DIM_TERMS_MAX;
use crate::index::numeric::{SUMMARY_ALL, Summary, SummaryRef, summarize};
use crate::index::{
    BatchTerms, Column, Dim, IndexError, IndexView, MemIndex, NumericFile, SealedIndex,
    write_index_file, write_numeric_file,
};
use crate::storage::{SealHook, SealedSegment, SegmentRef, SegmentSet, StorageError, record};

pub(crate) fn index_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}.idx"))
}

pub(crate) fn numeric_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}.num"))
}

/// A sealed segment's rows indexed in memory (with `fields` extracted),
/// checked to cover every row.
fn index_rows(segment: &SealedSegment, fields: &[String]) -> Result<MemIndex, String> {
    let mut mem = MemIndex::with_fields(fields);
    segment
        .for_each_payload(|row, payload| {
            let event = record::decode(payload)
                .map_err(|e| StorageError::corrupted(segment.id, 0, e.to_string()))?;
            mem.insert(row, &event);
            Ok(())
        })
        .map_err(|e| e.to_string())?;
    if mem.rows() != u64::from(segment.rows) {
        return Err(format!(
            "indexed {} rows of segment {}, which holds {}",
            mem.rows(),
            segment.id,
            segment.rows
        ));
    }
    Ok(mem)
}

/// Writes `index/N.num` from a segment's in-memory index.
fn write_numeric(dir: &Path, segment: &SealedSegment, mem: &MemIndex) -> Result<(), String> {
    write_numeric_file(
        &numeric_path(dir, segment.id),
        segment.id,
        segment.rows,
        &mem.numeric_columns(),
        &summaries_of(mem),
    )
    .map_err(|e| e.to_string())
}

/// Builds the index of a sealed segment from its records and writes it,
/// with the numeric file when fields are declared (first, so an index
/// file never exists without the columns it was sealed with).
pub(crate) fn build_index_file(
    dir: &Path,
    segment: &SealedSegment,
    fields: &[String],
) -> Result<(), String> {
    let mem = index_rows(segment, fields)?;
    if !fields.is_empty() {
        write_numeric(dir, segment, &mem)?;
    }
    write_index_file(
        &index_path(dir, segment.id),
        segment.id,
        mem.timestamps(),
        &mem.sorted_terms(),
    )
    .map_err(|e| e.to_string())
}

/// The seal hook: writes `index/N.idx` before the catalog seals N.
pub(crate) struct IndexSealer {
    pub dir: PathBuf,
    /// Declared numeric fields (JSON pointers).
    pub fields: Arc<[String]>,
    /// The in-memory indexes of open segments (shared with [`Indexes`]).
    pub mems: IndexMap,
}

impl SealHook for IndexSealer {
    /// Written from the segment's in-memory index when it holds every row
    /// (appenders index what they stored before the sealer gets there,
    /// almost always); from the records otherwise.
    fn sealed(&self, segment: &SealedSegment) -> Result<(), String> {
        let mem = match self.mems.read().get(&segment.id) {
            Some(Entry::Mem(m)) => Some(m.clone()),
            _ => None,
        };
        if let Some(mem) = mem {
            let mem = mem.read();
            if mem.rows() == u64::from(segment.rows)
                && mem.timestamps().len() == segment.rows as usize
            {
                if !self.fields.is_empty() {
                    write_numeric(&self.dir, segment, &mem)?;
                }
                return write_index_file(
                    &index_path(&self.dir, segment.id),
                    segment.id,
                    mem.timestamps(),
                    &mem.sorted_terms(),
                )
                .map_err(|e| e.to_string());
            }
        }
        build_index_file(&self.dir, segment, &self.fields)
    }

    /// The index of a compacted segment comes from its inputs' index
    /// files, renumbered, instead of from decoding every record again.
    /// With numeric fields declared (their summaries are per segment), or
    /// when an input's index cannot be read, it is built from the records.
    fn compacted(
        &self,
        segment: &SealedSegment,
        inputs: &[(&SealedSegment, &RoaringBitmap)],
    ) -> Result<(), String> {
        if !self.fields.is_empty() {
            return build_index_file(&self.dir, segment, &self.fields);
        }
        match remap_index(&self.dir, segment, inputs) {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(segment = segment.id, error = %e, "indexing the compacted segment from its records");
                build_index_file(&self.dir, segment, &self.fields)
            }
        }
    }
}

/// Writes the index of `segment` from its inputs' index files: each input
/// row that was kept moves to its new row number, in order.
fn remap_index(
    dir: &Path,
    segment: &SealedSegment,
    inputs: &[(&SealedSegment, &RoaringBitmap)],
) -> Result<(), IndexError> {
    let mut timestamps: Vec<i64> = Vec::with_capacity(segment.rows as usize);
    let mut terms: HashMap<(Dim, String), RoaringBitmap> = HashMap::new();
    for (input, drop) in inputs {
        let old = SealedIndex::open(&index_path(dir, input.id), input.id)?;
        if old.rows() != input.rows {
            return Err(IndexError::Corrupted {
                segment: input.id,
                offset: 0,
                reason: "index and segment disagree on rows".into(),
            });
        }
        // Old row -> new row (u32::MAX: left out).
        let base = timestamps.len() as u32;
        let mut next = base;
        let mut map = Vec::with_capacity(input.rows as usize);
        for row in 0..input.rows {
            if drop.contains(row) {
                map.push(u32::MAX);
            } else {
                map.push(next);
                next += 1;
                timestamps.push(old.timestamp(row)?);
            }
        }
        for dim in Dim::ALL {
            for (term, rows) in old.terms(dim)? {
                let moved = RoaringBitmap::from_sorted_iter(
                    rows.iter()
                        .filter_map(|r| map.get(r as usize).copied())
                        .filter(|&r| r != u32::MAX),
                )
                .map_err(|e| IndexError::Corrupted {
                    segment: input.id,
                    offset: 0,
                    reason: format!("renumbered rows out of order: {e}"),
                })?;
                if !moved.is_empty() {
                    *terms.entry((dim, term)).or_default() |= moved;
                }
            }
        }
    }
    // Invariant: the index covers exactly the segment's rows.
    assert_eq!(
        timestamps.len(),
        segment.rows as usize,
        "compacted index and segment disagree on rows"
    );
    let mut sorted: Vec<(Dim, &str, &RoaringBitmap)> = terms
        .iter()
        .map(|((d, t), b)| (*d, t.as_str(), b))
        .collect();
    sorted.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    write_index_file(
        &index_path(dir, segment.id),
        segment.id,
        &timestamps,
        &sorted,
    )
}

/// The sealed-time summaries of each declared field: over every row, and
/// over each term of the small dimensions (source, type, severity, and
/// tags when the segment has at most `SMALL_DIM_TERMS_MAX` of them).
fn summaries_of(mem: &MemIndex) -> Vec<(u16, u8, &str, Summary)> {
    let mut out = Vec::new();
    let terms = mem.sorted_terms();
    let rows = mem.timestamps().len() as u32;
    for (f, (_, values)) in mem.numeric_columns().into_iter().enumerate() {
        let f = f as u16;
        if let Some(s) = summarize(values, 0..rows) {
            out.push((f, SUMMARY_ALL, "", s));
        }
        for dim in [Dim::Source, Dim::Type, Dim::Severity, Dim::Tag] {
            let of_dim: Vec<_> = terms.iter().filter(|(d, _, _)| *d == dim).collect();
            if of_dim.len() > SMALL_DIM_TERMS_MAX {
                continue;
            }
            for (_, term, bitmap) in of_dim {
                if let Some(s) = summarize(values, bitmap.iter()) {
                    out.push((f, dim as u8, *term, s));
                }
            }
        }
    }
    out
}

/// Builds only the numeric file of a sealed segment (declared fields
/// changed since it was sealed, or the file was lost).
fn build_numeric_file(
    dir: &Path,
    segment: &SealedSegment,
    fields: &[String],
) -> Result<(), String> {
    write_numeric(dir, segment, &index_rows(segment, fields)?)
}

#[derive(Clone)]
pub(crate) enum Entry {
    Mem(Arc<RwLock<MemIndex>>),
    Sealed(Arc<SealedIndex>),
}

/// Each segment's index: in memory while open, its file once sealed.
pub(crate) type IndexMap = Arc<RwLock<HashMap<u64, Entry>>>;

enum HeldIndex {
    Mem(ArcRwLockReadGuard<RawRwLock, MemIndex>),
    Sealed(Arc<SealedIndex>),
}

/// A segment's index held for the length of one query, with its deleted
/// rows masked out of [`IndexView::live`].
pub(crate) struct Held {
    index: HeldIndex,
    deleted: Option<Arc<RoaringBitmap>>,
    /// A sealed segment's numeric columns, when the query asked for them.
    numbers: Option<Arc<NumericFile>>,
}

impl Held {
    pub fn view(&self) -> &dyn IndexView {
        self
    }

    fn inner(&self) -> &dyn IndexView {
        match &self.index {
            HeldIndex::Mem(g) => &**g,
            HeldIndex::Sealed(s) => &**s,
        }
    }
}

impl IndexView for Held {
    fn live(&self) -> Cow<'_, RoaringBitmap> {
        let live = self.inner().live();
        match &self.deleted {
            Some(d) => Cow::Owned(live.as_ref() - d.as_ref()),
            None => live,
        }
    }
    fn bitmap(&self, dim: Dim, term: &str) -> Result<Option<Cow<'_, RoaringBitmap>>, IndexError> {
        self.inner().bitmap(dim, term)
    }
    fn terms(&self, dim: Dim) -> Result<Vec<(String, Cow<'_, RoaringBitmap>)>, IndexError> {
        self.inner().terms(dim)
    }
    fn for_each_term(
        &self,
        dim: Dim,
        f: &mut dyn FnMut(&str, &RoaringBitmap),
    ) -> Result<(), IndexError> {
        self.inner().for_each_term(dim, f)
    }
    fn timestamp(&self, row: u32) -> Result<i64, IndexError> {
        self.inner().timestamp(row)
    }
    fn time_bounds(&self) -> Option<(i64, i64)> {
        self.inner().time_bounds()
    }
    fn zones(&self) -> Result<Cow<'_, [(i64, i64)]>, IndexError> {
        self.inner().zones()
    }
    fn memory_bytes(&self) -> usize {
        self.inner().memory_bytes()
    }
    fn column(&self, pointer: &str) -> Option<Column<'_>> {
        self.inner()
            .column(pointer)
            .or_else(|| self.numbers.as_ref()?.column(pointer))
    }
    fn summary(&self, pointer: &str, dim: u8, term: &str) -> Option<SummaryRef<'_>> {
        self.numbers.as_ref()?.summary(pointer, dim, term)
    }
    fn rows_indexed(&self) -> u64 {
        self.inner().rows_indexed()
    }
}

pub(crate) struct Indexes {
    dir: PathBuf,
    map: IndexMap,
    /// Segments whose in-memory index was dropped because they are sealed:
    /// never index them in memory again, even for a reader whose older
    /// snapshot still shows them open (their index file is complete).
    retired: parking_lot::Mutex<std::collections::HashSet<u64>>,
    /// Deleted rows per segment (the catalog's tombstones).
    deleted: RwLock<HashMap<u64, Arc<RoaringBitmap>>>,
    /// Declared numeric fields (JSON pointers).
    fields: Arc<[String]>,
    /// Sealed segments' numeric files, opened on first use (None: could
    /// not be opened or built; aggregations read JSON instead).
    numeric: RwLock<HashMap<u64, Option<Arc<NumericFile>>>>,
    /// One numeric-file rebuild at a time.
    numeric_build: parking_lot::Mutex<()>,
}

impl Indexes {
    /// The map of indexes, for the seal hook.
    pub fn map(&self) -> IndexMap {
        self.map.clone()
    }

    pub fn new(dir: PathBuf, fields: Arc<[String]>) -> Indexes {
        Indexes {
            dir,
            map: Arc::new(RwLock::new(HashMap::new())),
            retired: parking_lot::Mutex::new(std::collections::HashSet::new()),
            deleted: RwLock::new(HashMap::new()),
            fields,
            numeric: RwLock::new(HashMap::new()),
            numeric_build: parking_lot::Mutex::new(()),
        }
    }

    fn new_mem(&self) -> Entry {
        Entry::Mem(Arc::new(RwLock::new(MemIndex::with_fields(&self.fields))))
    }

    /// Opens (or, when missing, damaged or short of a declared field,
    /// rebuilds) a sealed segment's numeric file.
    fn numeric_file(&self, seg: &Arc<SealedSegment>) -> Option<Arc<NumericFile>> {
        if self.fields.is_empty() {
            return None;
        }
        if let Some(cached) = self.numeric.read().get(&seg.id) {
            return cached.clone();
        }
        let _one = self.numeric_build.lock();
        if let Some(cached) = self.numeric.read().get(&seg.id) {
            return cached.clone();
        }
        let path = numeric_path(&self.dir, seg.id);
        let usable = |f: &NumericFile| {
            f.rows() == seg.rows && self.fields.iter().all(|p| f.column(p).is_some())
        };
        let opened = match NumericFile::open(&path, seg.id) {
            Ok(f) if usable(&f) => Some(f),
            other => {
                if let Err(e) = other {
                    tracing::info!(segment = seg.id, reason = %e, "building the segment's numeric columns");
                }
                match build_numeric_file(&self.dir, seg, &self.fields) {
                    Ok(()) => NumericFile::open(&path, seg.id).ok().filter(usable),
                    Err(e) => {
                        tracing::warn!(segment = seg.id, error = %e, "numeric columns unavailable; reading JSON");
                        None
                    }
                }
            }
        };
        let opened = opened.map(Arc::new);
        self.numeric.write().insert(seg.id, opened.clone());
        opened
    }

    /// Attaches each sealed segment's numeric columns to its held index.
    pub fn attach_numbers(&self, set: &SegmentSet, held: &mut [(u64, Held)]) {
        for (id, h) in held.iter_mut() {
            if let Some(SegmentRef::Sealed(s)) = set.get(*id) {
                h.numbers = self.numeric_file(s);
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes index files of segments that are not sealed (left by a seal
    /// or a compaction interrupted before its catalog commit). Files of
    /// segments still being sealed are left alone: the sealer, already
    /// running, may be writing them right now (and rewrites them anyway).
    pub fn remove_stale_files(&self, set: &SegmentSet) -> std::io::Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let id = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.split('.').next())
                .and_then(|s| s.parse::<u64>().ok());
            if id.is_some_and(|id| set.sealing.iter().any(|s| s.id == id)) {
                continue;
            }
            let sealed = id.is_some_and(|id| set.sealed.iter().any(|s| s.id == id));
            let is_idx = path.extension().is_some_and(|e| e == "idx" || e == "num");
            if !(sealed && is_idx) {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Indexes stored events of an open segment and makes them visible
    /// (`rows[k]`: the row of the `k`th event of `terms`, `None` for one
    /// not stored in this segment). Events of a segment that is sealed
    /// meanwhile need nothing: its index file was built from its records.
    pub fn insert_terms(
        &self,
        set: &SegmentSet,
        segment: u64,
        terms: &BatchTerms<'_>,
        rows: &[Option<u32>],
    ) {
        if let Some(mem) = self.open_mem(set, segment) {
            let numbers: Vec<u32> = rows.iter().copied().flatten().collect();
            let mut mem = mem.write();
            mem.stage_terms(terms, rows);
            mem.commit_rows(&numbers);
        }
    }

    /// [`Indexes::insert_terms`] for (row, event) pairs.
    pub fn insert(&self, set: &SegmentSet, segment: u64, rows: &[(u32, &Event)]) {
        let terms = BatchTerms::of(rows.iter().map(|&(_, e)| e));
        let numbers: Vec<Option<u32>> = rows.iter().map(|&(row, _)| Some(row)).collect();
        self.insert_terms(set, segment, &terms, &numbers);
    }

    /// Indexes stored events of an open segment without making them
    /// visible (their bytes may not be durable yet): see
    /// [`MemIndex::stage`]. [`Indexes::commit`] makes them visible.
    pub fn stage_terms(
        &self,
        set: &SegmentSet,
        segment: u64,
        terms: &BatchTerms<'_>,
        rows: &[Option<u32>],
    ) {
        if let Some(mem) = self.open_mem(set, segment) {
            mem.write().stage_terms(terms, rows);
        }
    }

    /// Makes staged rows visible. Rows of a segment sealed meanwhile need
    /// nothing: its index file was built from its records (the in-memory
    /// index did not hold every row).
    pub fn commit(&self, segment: u64, rows: &[u32]) {
        let mem = match self.map.read().get(&segment) {
            Some(Entry::Mem(m)) => m.clone(),
            _ => return,
        };
        mem.write().commit_rows(rows);
    }

    /// The in-memory index of open segment `segment`, created if needed;
    /// `None` once the segment is sealed.
    fn open_mem(&self, set: &SegmentSet, segment: u64) -> Option<Arc<RwLock<MemIndex>>> {
        let entry = self.map.read().get(&segment).cloned();
        let mem = match entry {
            Some(Entry::Mem(m)) => m,
            Some(Entry::Sealed(_)) => return None,
            None => {
                if !matches!(set.get(segment), Some(SegmentRef::Open(_)))
                    || self.retired.lock().contains(&segment)
                {
                    return None;
                }
                let mut map = self.map.write();
                // A new open segment means an earlier one rolled: drop the
                // in-memory indexes of segments sealed since (their index
                // files replace them), so memory stays bounded by the open
                // segments during pure ingest.
                let mut retired = self.retired.lock();
                map.retain(|id, e| {
                    let keep = !matches!(e, Entry::Mem(_))
                        || matches!(set.get(*id), Some(SegmentRef::Open(_)));
                    if !keep {
                        retired.insert(*id);
                    }
                    keep
                });
                drop(retired);
                match map.entry(segment).or_insert_with(|| self.new_mem()) {
                    Entry::Mem(m) => m.clone(),
                    Entry::Sealed(_) => return None,
                }
            }
        };
        Some(mem)
    }

    /// Forgets dropped segments: their in-memory entries, deleted rows and
    /// index files.
    pub fn forget(&self, segments: &[u64]) {
        let mut map = self.map.write();
        let mut deleted = self.deleted.write();
        let mut numeric = self.numeric.write();
        for id in segments {
            map.remove(id);
            deleted.remove(id);
            numeric.remove(id);
            let _ = std::fs::remove_file(index_path(&self.dir, *id));
            let _ = std::fs::remove_file(numeric_path(&self.dir, *id));
        }
    }

    /// Replaces a segment's set of deleted rows.
    pub fn set_deleted(&self, segment: u64, rows: RoaringBitmap) {
        self.deleted.write().insert(segment, Arc::new(rows));
    }

    /// A segment's deleted rows, if any.
    pub fn deleted(&self, segment: u64) -> Option<Arc<RoaringBitmap>> {
        self.deleted.read().get(&segment).cloned()
    }

    /// The index of every segment of `set`, in id order, held for one query.
    pub fn hold_all(&self, set: &SegmentSet) -> Result<Vec<(u64, Held)>, IndexError> {
        let mut out = Vec::new();
        for seg in set.iter() {
            let entry = self.map.read().get(&seg.id()).cloned();
            let index = match (seg, entry) {
                (SegmentRef::Sealed(_), Some(Entry::Sealed(s))) => HeldIndex::Sealed(s),
                (SegmentRef::Sealed(s), _) => HeldIndex::Sealed(self.load_sealed(s)?),
                (SegmentRef::Open(_), Some(Entry::Mem(m))) => HeldIndex::Mem(m.read_arc()),
                (SegmentRef::Open(o), _) if self.retired.lock().contains(&o.id) => {
                    // Sealed since this snapshot was taken: its file is complete.
                    let path = index_path(&self.dir, o.id);
                    HeldIndex::Sealed(Arc::new(SealedIndex::open(&path, o.id)?))
                }
                (SegmentRef::Open(o), _) => {
                    let mut map = self.map.write();
                    let entry = map.entry(o.id).or_insert_with(|| self.new_mem());
                    match entry {
                        Entry::Mem(m) => HeldIndex::Mem(m.read_arc()),
                        Entry::Sealed(s) => HeldIndex::Sealed(s.clone()),
                    }
                }
            };
            let deleted = self.deleted.read().get(&seg.id()).cloned();
            out.push((
                seg.id(),
                Held {
                    index,
                    deleted,
                    numbers: None,
                },
            ));
        }
        Ok(out)
    }

    /// Opens a sealed segment's index file, rebuilding it from the segment
    /// when it is missing or damaged, and drops the in-memory index.
    fn load_sealed(&self, seg: &Arc<SealedSegment>) -> Result<Arc<SealedIndex>, IndexError> {
        let path = index_path(&self.dir, seg.id);
        let opened = SealedIndex::open(&path, seg.id).and_then(|idx| {
            if idx.rows() == seg.rows {
                Ok(idx)
            } else {
                Err(IndexError::Corrupted {
                    segment: seg.id,
                    offset: 0,
                    reason: "index and segment disagree on rows".into(),
                })
            }
        });
        let index = match opened {
            Ok(idx) => idx,
            Err(e) => {
                tracing::warn!(segment = seg.id, error = %e, "rebuilding the segment's index");
                build_index_file(&self.dir, seg, &self.fields).map_err(|reason| {
                    IndexError::Corrupted {
                        segment: seg.id,
                        offset: 0,
                        reason,
                    }
                })?;
                SealedIndex::open(&path, seg.id)?
            }
        };
        let index = Arc::new(index);
        self.map
            .write()
            .insert(seg.id, Entry::Sealed(index.clone()));
        Ok(index)
    }

    /// Bytes of memory held by indexes (not counting mapped files).
    pub fn memory_bytes(&self) -> usize {
        self.map
            .read()
            .values()
            .map(|e| match e {
                Entry::Mem(m) => m.read().memory_bytes(),
                Entry::Sealed(s) => s.memory_bytes(),
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::generator::Generator;
    use crate::{Config, Db, Timestamp};

    /// The seal hook writes index and numeric files from the in-memory
    /// index; they must be byte for byte what decoding the segment gives.
    #[test]
    fn files_from_memory_equal_files_from_records() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            numeric_fields: vec!["/latency_ms".into()],
            ..Config::default()
        };
        let db = Db::open(dir.path(), config.clone()).unwrap();
        let mut generator = Generator::new(3, Timestamp(1_700_000_000_000_000), 100);
        for _ in 0..4 {
            db.append_batch(generator.batch(500)).unwrap();
        }
        db.seal().unwrap();
        let set = db.log().segments();
        assert!(!set.sealed.is_empty());
        let index_dir = dir.path().join("index");
        let fields: Vec<String> = config.numeric_fields.clone();
        for seg in &set.sealed {
            let from_memory = std::fs::read(index_path(&index_dir, seg.id)).unwrap();
            let numbers_from_memory = std::fs::read(numeric_path(&index_dir, seg.id)).unwrap();
            let other = tempfile::tempdir().unwrap();
            build_index_file(other.path(), seg, &fields).unwrap();
            assert_eq!(
                from_memory,
                std::fs::read(index_path(other.path(), seg.id)).unwrap()
            );
            assert_eq!(
                numbers_from_memory,
                std::fs::read(numeric_path(other.path(), seg.id)).unwrap()
            );
        }
        db.close().unwrap();
    }
}
