//! An open (active or sealing) segment: its `.log` file read through
//! `pread`, and the in-memory row offsets and id map that make it readable
//! and deduplicable without a scan.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use parking_lot::RwLock;

use super::StorageError;
use super::frame;
use super::ids::{IdHash, IdTable};

#[derive(Debug, Default)]
pub(crate) struct OpenRows {
    /// Offset of each row's frame in the file.
    pub offsets: Vec<u64>,
    /// End of the last frame.
    pub end: u64,
    /// Rows by id hash (several rows share a hash only by a collision: a
    /// stored duplicate never happens).
    pub ids: IdTable,
    pub min_ts: i64,
    pub max_ts: i64,
}

impl OpenRows {
    /// Empty tables sized for `rows` rows (the previous segment's count:
    /// the id map then never rehashes on the append path), frames from
    /// `end`.
    pub fn with_capacity(rows: usize, end: u64) -> OpenRows {
        OpenRows {
            offsets: Vec::with_capacity(rows),
            end,
            ids: IdTable::with_capacity(rows),
            ..OpenRows::default()
        }
    }

    pub fn push(&mut self, offset: u64, len: u64, hash: IdHash, ts: i64) -> u32 {
        let row = self.offsets.len() as u32;
        self.offsets.push(offset);
        self.end = offset + len;
        self.ids.insert(hash, row);
        if row == 0 {
            (self.min_ts, self.max_ts) = (ts, ts);
        } else {
            self.min_ts = self.min_ts.min(ts);
            self.max_ts = self.max_ts.max(ts);
        }
        row
    }

    /// The byte range of `row`'s frame.
    pub fn range(&self, row: u32) -> (u64, u64) {
        let offset = self.offsets[row as usize];
        let end = self
            .offsets
            .get(row as usize + 1)
            .copied()
            .unwrap_or(self.end);
        (offset, end)
    }

    /// Reads the id table where a lookup of `hash` starts (a warm-up: see
    /// [`IdTable::home_slot`]).
    pub fn touch_id(&self, hash: IdHash) -> u64 {
        self.ids.home_slot(hash)
    }

    /// The rows whose id hash may be `hash` (callers compare the ids).
    pub fn rows_with_hash(&self, hash: IdHash) -> impl Iterator<Item = u32> + '_ {
        self.ids.rows(hash)
    }
}

/// A segment whose data is still its `.log` file.
pub struct OpenSegment {
    pub id: u64,
    pub first_seq: u64,
    /// The salt of the log's frame checksums (`segment::FLAG_SALTED`).
    pub salt: u32,
    pub(crate) file: File,
    pub(crate) rows: RwLock<OpenRows>,
    /// Rows that readers may see: acknowledged (durable under
    /// `--fsync always`) rows only.
    visible: AtomicU32,
}

impl std::fmt::Debug for OpenSegment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenSegment")
            .field("id", &self.id)
            .field("visible", &self.visible_rows())
            .finish()
    }
}

impl OpenSegment {
    pub(crate) fn new(
        path: &Path,
        id: u64,
        first_seq: u64,
        salt: u32,
        rows: OpenRows,
    ) -> Result<OpenSegment, StorageError> {
        let file = File::open(path).map_err(|e| StorageError::io(path, e))?;
        let visible = rows.offsets.len() as u32;
        Ok(OpenSegment {
            id,
            first_seq,
            salt,
            file,
            rows: RwLock::new(rows),
            visible: AtomicU32::new(visible),
        })
    }

    pub fn visible_rows(&self) -> u32 {
        self.visible.load(Ordering::Acquire)
    }

    pub(crate) fn publish(&self, rows: u32) {
        self.visible.store(rows, Ordering::Release);
    }

    /// The frame of `row`, read from the file and checked. Rows past the
    /// visible count are not served.
    pub fn read_payload(&self, row: u32) -> Result<Option<Vec<u8>>, StorageError> {
        if row >= self.visible_rows() {
            return Ok(None);
        }
        let (offset, end) = self.rows.read().range(row);
        self.read_frame_at(offset, end)
            .map(|(_, payload)| Some(payload))
    }

    /// Reads the frame in `[offset, end)` regardless of visibility (the
    /// writer uses this to compare ids of rows it wrote itself).
    pub(crate) fn read_frame_at(
        &self,
        offset: u64,
        end: u64,
    ) -> Result<(frame::FrameKind, Vec<u8>), StorageError> {
        let mut buf = vec![0u8; (end - offset) as usize];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|e| StorageError::corrupted(self.id, offset, format!("read: {e}")))?;
        let (frame, used) = frame::decode_salted(&buf, self.salt)
            .map_err(|e| StorageError::corrupted(self.id, offset, e.to_string()))?;
        if used != buf.len() {
            return Err(StorageError::corrupted(
                self.id,
                offset,
                "frame length disagrees with the row table",
            ));
        }
        let kind = frame.kind;
        let header = frame::FRAME_HEADER_SIZE;
        buf.drain(..header);
        Ok((kind, buf))
    }

    /// Bytes of the log (frames and header).
    pub fn file_bytes(&self) -> u64 {
        self.rows.read().end
    }
}
