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

use crate::index::{Dim, IndexError, IndexView, MemIndex, SealedIndex, write_index_file};
use crate::storage::{SealHook, SealedSegment, SegmentRef, SegmentSet, StorageError, record};

pub(crate) fn index_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}.idx"))
}

/// Builds the index of a sealed segment from its records and writes it.
pub(crate) fn build_index_file(dir: &Path, segment: &SealedSegment) -> Result<(), String> {
    let mut mem = MemIndex::new();
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
}

impl SealHook for IndexSealer {
    fn sealed(&self, segment: &SealedSegment) -> Result<(), String> {
        build_index_file(&self.dir, segment)
    }
}

#[derive(Clone)]
enum Entry {
    Mem(Arc<RwLock<MemIndex>>),
    Sealed(Arc<SealedIndex>),
}

enum HeldIndex {
    Mem(ArcRwLockReadGuard<RawRwLock, MemIndex>),
    Sealed(Arc<SealedIndex>),
}

/// A segment's index held for the length of one query, with its deleted
/// rows masked out of [`IndexView::live`].
pub(crate) struct Held {
    index: HeldIndex,
    deleted: Option<Arc<RoaringBitmap>>,
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
}

pub(crate) struct Indexes {
    dir: PathBuf,
    map: RwLock<HashMap<u64, Entry>>,
    /// Segments whose in-memory index was dropped because they are sealed:
    /// never index them in memory again, even for a reader whose older
    /// snapshot still shows them open (their index file is complete).
    retired: parking_lot::Mutex<std::collections::HashSet<u64>>,
    /// Deleted rows per segment (the catalog's tombstones).
    deleted: RwLock<HashMap<u64, Arc<RoaringBitmap>>>,
}

impl Indexes {
    pub fn new(dir: PathBuf) -> Indexes {
        Indexes {
            dir,
            map: RwLock::new(HashMap::new()),
            retired: parking_lot::Mutex::new(std::collections::HashSet::new()),
            deleted: RwLock::new(HashMap::new()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes index files of segments that are not sealed (left by a seal
    /// interrupted before its catalog commit).
    pub fn remove_stale_files(&self, set: &SegmentSet) -> std::io::Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let id = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.split('.').next())
                .and_then(|s| s.parse::<u64>().ok());
            let sealed = id.is_some_and(|id| set.sealed.iter().any(|s| s.id == id));
            let is_idx = path.extension().is_some_and(|e| e == "idx");
            if !(sealed && is_idx) {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    /// Indexes a stored event of an open segment. Events of a segment that
    /// is sealed meanwhile need nothing: its index file was built from its
    /// records.
    pub fn insert(&self, set: &SegmentSet, segment: u64, rows: &[(u32, &Event)]) {
        let entry = self.map.read().get(&segment).cloned();
        let mem = match entry {
            Some(Entry::Mem(m)) => m,
            Some(Entry::Sealed(_)) => return,
            None => {
                if !matches!(set.get(segment), Some(SegmentRef::Open(_)))
                    || self.retired.lock().contains(&segment)
                {
                    return;
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
                match map
                    .entry(segment)
                    .or_insert_with(|| Entry::Mem(Arc::new(RwLock::new(MemIndex::new()))))
                {
                    Entry::Mem(m) => m.clone(),
                    Entry::Sealed(_) => return,
                }
            }
        };
        let mut mem = mem.write();
        for (row, event) in rows {
            mem.insert(*row, event);
        }
    }

    /// Forgets dropped segments: their in-memory entries, deleted rows and
    /// index files.
    pub fn forget(&self, segments: &[u64]) {
        let mut map = self.map.write();
        let mut deleted = self.deleted.write();
        for id in segments {
            map.remove(id);
            deleted.remove(id);
            let _ = std::fs::remove_file(index_path(&self.dir, *id));
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
                    let entry = map
                        .entry(o.id)
                        .or_insert_with(|| Entry::Mem(Arc::new(RwLock::new(MemIndex::new()))));
                    match entry {
                        Entry::Mem(m) => HeldIndex::Mem(m.read_arc()),
                        Entry::Sealed(s) => HeldIndex::Sealed(s.clone()),
                    }
                }
            };
            let deleted = self.deleted.read().get(&seg.id()).cloned();
            out.push((seg.id(), Held { index, deleted }));
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
                build_index_file(&self.dir, seg).map_err(|reason| IndexError::Corrupted {
                    segment: seg.id,
                    offset: 0,
                    reason,
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
