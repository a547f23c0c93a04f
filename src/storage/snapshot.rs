//! Point-in-time snapshots of the log: a new data directory whose sealed
//! segments are hard links of ours (no data copied), whose open segments'
//! acknowledged prefixes are sealed into new files, and whose catalog names
//! exactly those segments plus an empty active one.
//!
//! The cut: sealed segments are immutable; each open segment contributes the
//! rows visible when it is read. Rows become visible a whole group commit at
//! a time, in arrival order, so the snapshot holds a prefix of the arrival
//! order with no partial batch.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use roaring::RoaringBitmap;

use super::catalog::{Catalog, SegmentMeta, SegmentState};
use super::dir::sync_dir;
use super::recovery::create_log;
use super::segment;
use super::{Log, OpenSegment, StorageError, segment_path};

/// What a snapshot holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotSummary {
    /// Segment ids, all sealed in the snapshot.
    pub segments: Vec<u64>,
    /// Rows (deleted ones included).
    pub rows: u64,
    /// Rows minus deleted rows.
    pub events: u64,
}

/// Hard-links `from` to `to`, copying when the file system cannot link.
pub fn link_or_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    match fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(_) => fs::copy(from, to).map(|_| ()),
    }
}

impl OpenSegment {
    /// The log bytes (header included) up to the end of the visible rows,
    /// with those rows' offsets. Read through the segment's own file handle,
    /// so a concurrent seal that unlinks the log does not matter.
    pub(crate) fn visible_prefix(&self) -> Result<(Vec<u8>, Vec<u64>), StorageError> {
        use std::os::unix::fs::FileExt;
        let visible = self.visible_rows() as usize;
        let (offsets, end) = {
            let rows = self.rows.read();
            let offsets = rows.offsets[..visible.min(rows.offsets.len())].to_vec();
            let end = rows.offsets.get(visible).copied().unwrap_or(rows.end);
            (offsets, end)
        };
        let mut bytes = vec![0u8; end as usize];
        self.file
            .read_exact_at(&mut bytes, 0)
            .map_err(|e| StorageError::corrupted(self.id, 0, format!("snapshot read: {e}")))?;
        Ok((bytes, offsets))
    }
}

impl Log {
    /// Writes a snapshot of the store into the new directory `dest` (which
    /// must not exist), with `tombstones` (per segment) as its deletions.
    pub fn snapshot_into(
        &self,
        dest: &Path,
        tombstones: &[(u64, RoaringBitmap)],
    ) -> Result<SnapshotSummary, StorageError> {
        let io = |p: &Path| {
            let p = p.to_owned();
            move |e| StorageError::io(&p, e)
        };
        // Everything acknowledged is durable before it is linked or copied.
        self.sync()?;
        let set = self.segments();
        let seg_dir = dest.join("segments");
        fs::create_dir_all(&seg_dir).map_err(io(&seg_dir))?;
        let mut metas: Vec<(u64, Option<SegmentMeta>)> = Vec::new();
        let mut summary = SnapshotSummary::default();
        for s in &set.sealed {
            let from = self.shared.seg_path(s.id);
            let to = segment_path(dest, s.id, "seg");
            link_or_copy(&from, &to).map_err(io(&to))?;
            let bytes = fs::metadata(&to).map_err(io(&to))?.len();
            metas.push((
                s.id,
                Some(SegmentMeta {
                    state: SegmentState::Sealed,
                    first_seq: s.first_seq,
                    rows: s.rows,
                    min_ts_us: s.min_ts.as_micros(),
                    max_ts_us: s.max_ts.as_micros(),
                    bytes,
                }),
            ));
            summary.segments.push(s.id);
            summary.rows += u64::from(s.rows);
        }
        let open: Vec<&Arc<OpenSegment>> = set
            .sealing
            .iter()
            .chain(std::iter::once(&set.active))
            .collect();
        let mut next_seq = set.active.first_seq;
        for o in open {
            let (bytes, offsets) = o.visible_prefix()?;
            next_seq = o.first_seq + offsets.len() as u64;
            if offsets.is_empty() {
                continue;
            }
            let to = segment_path(dest, o.id, "seg");
            let sealed = segment::write_sealed(
                &to,
                o.id,
                o.salt,
                &bytes,
                &offsets,
                self.shared.config.compression,
                self.shared.config.block_size_bytes,
            )?;
            let check = segment::SealedSegment::open(&to, o.id)?;
            if check.rows as usize != offsets.len() {
                return Err(StorageError::corrupted(
                    o.id,
                    0,
                    "the snapshot's sealed copy lost rows",
                ));
            }
            let _ = sealed;
            metas.push((
                o.id,
                Some(SegmentMeta {
                    state: SegmentState::Sealed,
                    first_seq: o.first_seq,
                    rows: check.rows,
                    min_ts_us: check.min_ts.as_micros(),
                    max_ts_us: check.max_ts.as_micros(),
                    bytes: fs::metadata(&to).map_err(io(&to))?.len(),
                }),
            ));
            summary.segments.push(o.id);
            summary.rows += offsets.len() as u64;
        }
        let active_id = set.max_id() + 1;
        create_log(dest, active_id)?;
        metas.push((
            active_id,
            Some(SegmentMeta {
                state: SegmentState::Active,
                first_seq: next_seq,
                rows: 0,
                min_ts_us: 0,
                max_ts_us: 0,
                bytes: 0,
            }),
        ));
        sync_dir(&seg_dir).map_err(io(&seg_dir))?;
        let catalog = Catalog::open(&dest.join(super::CATALOG_FILE))?;
        catalog.apply(&metas)?;
        let mut deleted: Vec<(u64, RoaringBitmap)> = Vec::new();
        let mut gone = 0u64;
        for (segment, rows) in tombstones {
            let Some((_, Some(meta))) = metas.iter().find(|(id, _)| id == segment) else {
                continue;
            };
            let mut kept = rows.clone();
            kept.remove_range(meta.rows..);
            if !kept.is_empty() {
                gone += kept.len();
                deleted.push((*segment, kept));
            }
        }
        if !deleted.is_empty() {
            catalog.add_tombstones(&deleted, crate::event::Timestamp::now().as_micros())?;
        }
        drop(catalog);
        sync_dir(dest).map_err(io(dest))?;
        summary.events = summary.rows - gone;
        Ok(summary)
    }
}
