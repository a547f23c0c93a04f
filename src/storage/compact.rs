//! Compaction: rewrite sealed segments without their deleted rows, and
//! merge runs of small ones.
//!
//! Three steps, so that a crash anywhere leaves a consistent directory:
//! 1. [`Log::compact_write`] writes and fsyncs the new segment under a
//!    fresh id (and, through the seal hook, its index); nothing visible
//!    changes, and recovery removes the file if no commit follows.
//! 2. [`Log::compact_swap`] replaces the inputs by the new segment in one
//!    redb transaction, then in the segment set readers take.
//! 3. [`Log::compact_unlink`] removes the inputs' files; readers that
//!    still hold an input keep reading their mapping safely.
//!
//! Rows keep their arrival numbers: the new segment starts at the first
//! input's `first_seq` and, when its rows are not arrival-dense, carries a
//! seq table (`docs/format.md`), so cursors and ordering never move.

use std::sync::Arc;
use std::time::{Duration, Instant};

use roaring::RoaringBitmap;

use super::catalog::{SegmentMeta, SegmentState};
use super::dir::{self, sync_dir};
use super::segment::{self, Block, BlockCompressor, SealedSegment, SealedWriter};
use super::{Log, SegmentSet, StorageError};

/// One input of a compaction: a sealed segment and the rows to leave out.
#[derive(Clone, Debug)]
pub struct CompactInput {
    pub segment: Arc<SealedSegment>,
    pub drop: RoaringBitmap,
}

/// A written, not yet visible, compacted segment.
#[derive(Debug)]
pub struct Compacted {
    /// The new segment; `None` when no row survived.
    pub sealed: Option<Arc<SealedSegment>>,
    pub inputs: Vec<CompactInput>,
    /// Compressed bytes read from the inputs.
    pub bytes_read: u64,
    pub bytes_written: u64,
}

impl Compacted {
    pub fn input_ids(&self) -> Vec<u64> {
        self.inputs.iter().map(|i| i.segment.id).collect()
    }

    pub fn rows_removed(&self) -> u64 {
        self.inputs.iter().map(|i| i.drop.len()).sum()
    }

    /// The new segment's rows for rows of the inputs deleted since the
    /// write began (`late`, in the inputs' numbering).
    pub fn renumber(&self, late: &[(u64, RoaringBitmap)]) -> RoaringBitmap {
        let mut out = RoaringBitmap::new();
        let mut base = 0u32;
        for input in &self.inputs {
            if let Some((_, rows)) = late.iter().find(|(id, _)| *id == input.segment.id) {
                for row in rows.iter() {
                    if row < input.segment.rows && !input.drop.contains(row) {
                        // Rows before `row` that were left out.
                        let before = input.drop.rank(row) as u32;
                        out.insert(base + row - before);
                    }
                }
            }
            base += input.segment.rows - input.drop.len() as u32;
        }
        out
    }
}

/// Limits the rate at which compaction reads, so that it never starves
/// ingest of disk bandwidth: after each block it sleeps as long as needed
/// to stay at or under `bytes_per_sec` (0: no limit). Shared by the
/// threads of one compaction run: the limit is for all of them together.
#[derive(Debug)]
pub struct Throttle {
    bytes_per_sec: u64,
    started: Instant,
    bytes: std::sync::atomic::AtomicU64,
}

impl Throttle {
    pub fn new(bytes_per_sec: u64) -> Throttle {
        Throttle {
            bytes_per_sec,
            started: Instant::now(),
            bytes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn account(&self, bytes: u64) {
        let total = self
            .bytes
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed)
            + bytes;
        if self.bytes_per_sec == 0 {
            return;
        }
        let due = Duration::from_secs_f64(total as f64 / self.bytes_per_sec as f64);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

/// Whether `inputs` may become one segment: adjacent in arrival order
/// (each starts where the previous one's arrival numbers ended, holes
/// included) and spanning fewer than 2^32 arrival numbers.
pub fn can_merge(set: &SegmentSet, inputs: &[Arc<SealedSegment>]) -> bool {
    let Some(first) = inputs.first() else {
        return false;
    };
    let positions: Option<Vec<usize>> = inputs
        .iter()
        .map(|s| set.sealed.iter().position(|x| x.id == s.id))
        .collect();
    let Some(positions) = positions else {
        return false;
    };
    if positions.windows(2).any(|w| w[1] != w[0] + 1) {
        return false;
    }
    let last = &inputs[inputs.len() - 1];
    last.first_seq + last.seq_span() - first.first_seq <= u64::from(u32::MAX)
}

/// Input blocks a compaction worker takes at a time.
const WORK_BLOCKS: usize = 32;

/// A stretch of one input's blocks.
struct Work {
    input: usize,
    blocks: std::ops::Range<usize>,
}

/// A block ready for the compacted segment's writer.
enum Piece<'a> {
    /// Copied as stored (no row left out; same compression and dictionary),
    /// with its decompressed form and each row's seq.
    Stored {
        compressed: &'a [u8],
        block: Block,
        seqs: Vec<u32>,
    },
    /// The kept rows of one or more blocks, compressed anew.
    Fresh {
        compressed: Vec<u8>,
        raw: Vec<u8>,
        seqs: Vec<u32>,
    },
}

/// The blocks `blocks` of `input` without its dropped rows: clean blocks
/// copied (when `copy_clean`), the kept rows of the others regrouped into
/// blocks of about `block_size` raw bytes and compressed. Every frame's
/// checksum is verified on the way. `shift`: the input's first seq less
/// the output's.
fn rewrite_blocks<'a>(
    input: &'a CompactInput,
    blocks: std::ops::Range<usize>,
    shift: u64,
    copy_clean: bool,
    block_size: usize,
    compressor: &mut BlockCompressor,
    throttle: &Throttle,
) -> Result<Vec<Piece<'a>>, StorageError> {
    let seg = &input.segment;
    let seq_of = |row: u32| -> Result<u32, StorageError> {
        u32::try_from(shift + u64::from(seg.seq_offset(row)))
            .map_err(|_| StorageError::corrupted(seg.id, 0, "compaction spans too many rows"))
    };
    let bad_row = || {
        StorageError::corrupted(
            seg.id,
            0,
            "row missing from its block or failing its checksum",
        )
    };
    let mut pieces = Vec::new();
    let mut raw = Vec::with_capacity(block_size * 2);
    let mut seqs = Vec::new();
    let mut fresh = |raw: &mut Vec<u8>, seqs: &mut Vec<u32>, pieces: &mut Vec<Piece<'a>>| {
        if raw.is_empty() {
            return Ok(());
        }
        let compressed = compressor
            .compress(raw)
            .map_err(|e| StorageError::corrupted(seg.id, 0, format!("recompressing: {e}")))?;
        pieces.push(Piece::Fresh {
            compressed,
            raw: std::mem::replace(raw, Vec::with_capacity(block_size * 2)),
            seqs: std::mem::take(seqs),
        });
        Ok::<(), StorageError>(())
    };
    for b in blocks {
        let block = seg.read_block(b)?;
        let rows = block.first_row..block.first_row + block.rows();
        let clean = input.drop.range_cardinality(rows.clone()) == 0;
        match seg.block_compressed(b) {
            Some(compressed) if clean && copy_clean => {
                fresh(&mut raw, &mut seqs, &mut pieces)?;
                for row in rows.clone() {
                    block.checked_frame(row).ok_or_else(bad_row)?;
                }
                let seqs = rows.map(seq_of).collect::<Result<_, _>>()?;
                pieces.push(Piece::Stored {
                    compressed,
                    block,
                    seqs,
                });
            }
            _ => {
                for row in rows {
                    if input.drop.contains(row) {
                        continue;
                    }
                    raw.extend_from_slice(block.checked_frame(row).ok_or_else(bad_row)?);
                    seqs.push(seq_of(row)?);
                    if raw.len() >= block_size {
                        fresh(&mut raw, &mut seqs, &mut pieces)?;
                    }
                }
            }
        }
        throttle.account(seg.block_compressed_len(b));
    }
    fresh(&mut raw, &mut seqs, &mut pieces)?;
    Ok(pieces)
}

impl Log {
    /// Step 1: writes the compacted segment of `inputs` (adjacent sealed
    /// segments, see [`can_merge`]) and fsyncs it and its directory. The
    /// seal hook builds its index. Nothing readers see changes.
    pub fn compact_write(
        &self,
        inputs: Vec<CompactInput>,
        threads: usize,
        throttle: &Throttle,
        mut progress: impl FnMut(u64) + Send,
    ) -> Result<Compacted, StorageError> {
        self.shared.check_poisoned()?;
        let segs: Vec<Arc<SealedSegment>> = inputs.iter().map(|i| i.segment.clone()).collect();
        if !can_merge(&self.segments(), &segs) {
            return Err(StorageError::Config(
                "compaction inputs are not adjacent sealed segments".into(),
            ));
        }
        let kept: u64 = inputs
            .iter()
            .map(|i| u64::from(i.segment.rows).saturating_sub(i.drop.len()))
            .sum();
        let bytes_in: u64 = inputs.iter().map(|i| i.segment.file_bytes()).sum();
        if kept == 0 {
            return Ok(Compacted {
                sealed: None,
                inputs,
                bytes_read: 0,
                bytes_written: 0,
            });
        }
        let first_seq = inputs[0].segment.first_seq;
        // Arrival-dense output: nothing left out, no holes, no gaps.
        let dense = inputs
            .iter()
            .all(|i| i.drop.is_empty() && i.segment.seq_table().is_none())
            && inputs.windows(2).all(|w| {
                w[0].segment.first_seq + u64::from(w[0].segment.rows) == w[1].segment.first_seq
            });
        let id = self.shared.take_id();
        let path = self.shared.seg_path(id);
        // On its own thread, niced: ingest's threads win the CPU when both
        // want it (the append latency target holds on two cores).
        let written = std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("evdb-compact".into())
                .spawn_scoped(s, || {
                    super::nice_background_thread();
                    self.write_compacted(
                        id,
                        &inputs,
                        first_seq,
                        dense,
                        bytes_in,
                        threads,
                        throttle,
                        &mut progress,
                    )
                })
                .map_err(|e| StorageError::io(&path, e))?
                .join()
                .map_err(|_| StorageError::corrupted(id, 0, "the compaction thread panicked"))?
        });
        let (sealed, bytes_read, summary_bytes) = match written {
            Ok(w) => w,
            Err(e) => {
                // Not named by the catalog: garbage either way, but do not
                // leave it taking space until the next start.
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        // Invariant: every kept row, no other, in arrival order.
        assert_eq!(
            u64::from(sealed.rows),
            kept,
            "compaction lost or gained rows"
        );
        Ok(Compacted {
            sealed: Some(sealed),
            inputs,
            bytes_read,
            bytes_written: summary_bytes,
        })
    }

    /// Writes, fsyncs and indexes the compacted segment `id`.
    #[allow(clippy::too_many_arguments)]
    fn write_compacted(
        &self,
        id: u64,
        inputs: &[CompactInput],
        first_seq: u64,
        dense: bool,
        bytes_in: u64,
        threads: usize,
        throttle: &Throttle,
        progress: &mut impl FnMut(u64),
    ) -> Result<(Arc<SealedSegment>, u64, u64), StorageError> {
        let started = std::time::Instant::now();
        let path = self.shared.seg_path(id);
        let compression = self.shared.config.compression;
        // The dictionary of the largest input that has one: its blocks, and
        // those of inputs sharing it, are copied without recompression
        // when none of their rows is left out. Without one, train anew.
        let reused = inputs
            .iter()
            .filter(|i| i.segment.compression() == segment::Compression::ZstdDict)
            .max_by_key(|i| i.segment.rows)
            .map(|i| i.segment.dict_bytes().to_vec());
        let dict = match (compression, reused) {
            (segment::Compression::ZstdDict, Some(d)) if !d.is_empty() => Some(d),
            (segment::Compression::ZstdDict, _) => self.sample_dictionary(inputs)?,
            _ => None,
        };
        let mut writer = SealedWriter::create(
            &path,
            id,
            compression,
            dict.clone(),
            self.shared.config.block_size_bytes,
            !dense,
        )?
        .with_sync_step(super::dir::COMPACTION_STEP);
        let out_dict = dict.unwrap_or_default();
        // Same compression and dictionary bytes: clean blocks are copied.
        let copy_clean: Vec<bool> = inputs
            .iter()
            .map(|i| {
                i.segment.compression() == writer.compression()
                    && i.segment.dict_bytes() == out_dict.as_slice()
            })
            .collect();
        let work: Vec<Work> = inputs
            .iter()
            .enumerate()
            .flat_map(|(input, i)| {
                let count = i.segment.block_count();
                (0..count).step_by(WORK_BLOCKS).map(move |b| Work {
                    input,
                    blocks: b..(b + WORK_BLOCKS).min(count),
                })
            })
            .collect();
        let threads = threads.clamp(1, work.len().max(1));
        let compressors = (0..threads)
            .map(|_| writer.block_compressor())
            .collect::<Result<Vec<_>, _>>()?;
        let block_size = self.shared.config.block_size_bytes;
        // Workers (niced like this thread) read, filter and recompress
        // stretches of input blocks; this thread writes their blocks in
        // order.
        let mut bytes_read = 0u64;
        super::pipeline::in_order(
            "evdb-compact",
            &path,
            id,
            compressors,
            work.len(),
            |n, compressor| {
                let w = &work[n];
                let input = &inputs[w.input];
                rewrite_blocks(
                    input,
                    w.blocks.clone(),
                    input.segment.first_seq - first_seq,
                    copy_clean[w.input],
                    block_size,
                    compressor,
                    throttle,
                )
            },
            |n, pieces| {
                for piece in pieces? {
                    match piece {
                        Piece::Stored {
                            compressed,
                            block,
                            seqs,
                        } => writer.push_compressed_block(
                            compressed,
                            block.raw(),
                            seqs.into_iter(),
                        )?,
                        Piece::Fresh {
                            compressed,
                            raw,
                            seqs,
                        } => writer.push_compressed_block(&compressed, &raw, seqs.into_iter())?,
                    }
                }
                let w = &work[n];
                let seg = &inputs[w.input].segment;
                bytes_read += w
                    .blocks
                    .clone()
                    .map(|b| seg.block_compressed_len(b))
                    .sum::<u64>();
                progress(bytes_read.min(bytes_in));
                Ok(())
            },
        )?;
        let summary = writer.finish()?;
        sync_dir(&self.shared.segments_dir()).map_err(|e| StorageError::io(&path, e))?;
        let written_at = std::time::Instant::now();
        let sealed = Arc::new(SealedSegment::open(&path, id)?.with_first_seq(first_seq));
        if let Some(hook) = &self.shared.hook {
            let from: Vec<(&SealedSegment, &RoaringBitmap)> = inputs
                .iter()
                .map(|i| (i.segment.as_ref(), &i.drop))
                .collect();
            hook.compacted(&sealed, &from)
                .map_err(|reason| StorageError::Hook {
                    segment: id,
                    reason,
                })?;
        }
        tracing::debug!(
            segment = id,
            write_ms = (written_at - started).as_millis() as u64,
            index_ms = written_at.elapsed().as_millis() as u64,
            "compacted segment written"
        );
        Ok((sealed, bytes_read, summary.bytes))
    }

    /// A dictionary trained on frames of a few blocks spread over the
    /// inputs (the rows kept), like sealing trains one on its log.
    fn sample_dictionary(&self, inputs: &[CompactInput]) -> Result<Option<Vec<u8>>, StorageError> {
        const SAMPLE_BLOCKS: usize = 32;
        let blocks: Vec<(usize, usize)> = inputs
            .iter()
            .enumerate()
            .flat_map(|(i, input)| (0..input.segment.block_count()).map(move |b| (i, b)))
            .collect();
        let step = blocks.len().div_ceil(SAMPLE_BLOCKS).max(1);
        let mut frames: Vec<Vec<u8>> = Vec::new();
        for &(i, b) in blocks.iter().step_by(step) {
            let input = &inputs[i];
            let block = input.segment.read_block(b)?;
            for row in block.first_row..block.first_row + block.rows() {
                if frames.len() >= segment::DICT_SAMPLES_MAX {
                    break;
                }
                if !input.drop.contains(row)
                    && let Some(f) = block.frame(row)
                {
                    frames.push(f.to_vec());
                }
            }
        }
        let samples: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        Ok(segment::train_dictionary_on(&samples))
    }

    /// Step 2: replaces the inputs by the compacted segment in the catalog
    /// (one durable transaction, with `deleted` as its tombstones) and then
    /// in the set readers take. Returns the inputs' ids.
    pub fn compact_swap(
        &self,
        compacted: &Compacted,
        deleted: &RoaringBitmap,
        now_us: i64,
    ) -> Result<Vec<u64>, StorageError> {
        self.shared.check_poisoned()?;
        let removed = compacted.input_ids();
        let set = self.segments();
        if removed
            .iter()
            .any(|id| !set.sealed.iter().any(|s| s.id == *id))
        {
            return Err(StorageError::Config(
                "a compaction input left the store meanwhile".into(),
            ));
        }
        match &compacted.sealed {
            Some(new) => {
                let meta = SegmentMeta {
                    state: SegmentState::Sealed,
                    first_seq: new.first_seq,
                    rows: new.rows,
                    min_ts_us: new.min_ts.as_micros(),
                    max_ts_us: new.max_ts.as_micros(),
                    bytes: new.file_bytes(),
                };
                self.shared
                    .catalog
                    .swap_compacted(&removed, new.id, &meta, deleted, now_us)?;
            }
            None => {
                let changes: Vec<(u64, Option<SegmentMeta>)> =
                    removed.iter().map(|id| (*id, None)).collect();
                self.shared.catalog.apply(&changes)?;
            }
        }
        let mut current = self.shared.set.write();
        let mut next = SegmentSet::clone(&current);
        next.sealed.retain(|s| !removed.contains(&s.id));
        if let Some(new) = &compacted.sealed {
            next.sealed.push(new.clone());
            next.sealed.sort_by_key(|s| s.first_seq);
        }
        *current = Arc::new(next);
        Ok(removed)
    }

    /// Step 3: unlinks the files of segments the catalog no longer names
    /// (they have left the segment set). A segment nobody else holds any
    /// more (waited for briefly) is unmapped and its file given back in
    /// steps ([`dir::remove_in_steps`]: appends' syncs do not wait for
    /// the whole file's blocks at once); one a reader still holds is only
    /// unlinked, and the reader keeps its mapping until it lets go.
    pub fn compact_unlink(&self, removed: Vec<Arc<SealedSegment>>) -> Result<(), StorageError> {
        for segment in removed {
            let path = self.shared.seg_path(segment.id);
            let result = match unwrap_when_alone(segment) {
                Ok(segment) => {
                    drop(segment);
                    dir::remove_in_steps(&path, dir::RELEASE_STEP)
                }
                Err(_still_read) => std::fs::remove_file(&path),
            };
            match result {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageError::io(&path, e)),
            }
        }
        let dir = self.shared.segments_dir();
        sync_dir(&dir).map_err(|e| StorageError::io(&dir, e))
    }

    /// When each segment with pending deletions got its oldest one (µs).
    pub fn deleted_since(&self) -> Result<Vec<(u64, i64)>, StorageError> {
        self.shared.catalog.deleted_since()
    }
}

/// The segment itself once no one else holds it: a reader that cloned
/// the segment set just before the swap lets go within moments, so this
/// waits up to 20 ms for that; past it, the segment is handed back.
fn unwrap_when_alone(mut segment: Arc<SealedSegment>) -> Result<SealedSegment, Arc<SealedSegment>> {
    for _ in 0..20 {
        match Arc::try_unwrap(segment) {
            Ok(owned) => return Ok(owned),
            Err(shared) => segment = shared,
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Arc::try_unwrap(segment)
}
