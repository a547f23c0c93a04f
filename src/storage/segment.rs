//! Segment files: the active log (`.log`) and sealed segments (`.seg`).
//!
//! Both start with the same 32-byte header. A log is a sequence of frames
//! (checksums salted with its segment id) that grows at its end, possibly
//! inside a reused file; a sealed segment holds the same frames, unsalted,
//! grouped in compressed blocks, with a block index, an id table and a
//! footer. Byte layouts are in `docs/format.md`; every integer is
//! little-endian.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;

use memmap2::Mmap;

use super::StorageError;
use super::dir::PacedFile;
use super::frame::{self, FrameError, FrameKind};
use super::ids::{IdHash, hash_id, peek_data, peek_id_and_timestamp};
use super::textfilter::{Needle, TRAILER_SIZE, TextFilter, TextFilterBuilder, TextFilterShape};
use crate::event::Timestamp;

pub const LOG_MAGIC: [u8; 8] = *b"EVDBLOG\0";
pub const SEG_MAGIC: [u8; 8] = *b"EVDBSEG\0";
pub const FOOTER_MAGIC: [u8; 8] = *b"EVDBEND\0";
/// Version of the log and segment layouts described in `docs/format.md`.
pub const FORMAT_VERSION: u16 = 1;

const MAGIC_OFFSET: usize = 0;
const VERSION_OFFSET: usize = MAGIC_OFFSET + 8;
const COMPRESSION_OFFSET: usize = VERSION_OFFSET + 2;
const FLAGS_OFFSET: usize = COMPRESSION_OFFSET + 1;
const DICT_LEN_OFFSET: usize = FLAGS_OFFSET + 1;
/// Header flag: the sealed segment ends with a seq table (a compacted
/// segment, whose rows are not arrival-dense). Logs carry no flags.
pub const FLAG_SEQS: u8 = 1;
/// Header flag: the sealed segment has a text filter section (every
/// segment this build writes).
pub const FLAG_TEXT: u8 = 2;
/// Header flag of a log: its frames' checksums are salted with
/// [`frame::salt_of`] its segment id (every log this build writes), so
/// that a reused log file's leftovers never read as this log's frames.
pub const FLAG_SALTED: u8 = 4;
const SEGMENT_ID_OFFSET: usize = DICT_LEN_OFFSET + 4;
const HEADER_CRC_OFFSET: usize = SEGMENT_ID_OFFSET + 8;
pub const HEADER_SIZE: usize = HEADER_CRC_OFFSET + 8; // 4 reserved bytes

const FOOTER_ROWS_OFFSET: usize = 0;
const FOOTER_BLOCKS_OFFSET: usize = FOOTER_ROWS_OFFSET + 4;
const FOOTER_MIN_TS_OFFSET: usize = FOOTER_BLOCKS_OFFSET + 4;
const FOOTER_MAX_TS_OFFSET: usize = FOOTER_MIN_TS_OFFSET + 8;
const FOOTER_BLOCK_INDEX_OFFSET: usize = FOOTER_MAX_TS_OFFSET + 8;
const FOOTER_ID_TABLE_OFFSET: usize = FOOTER_BLOCK_INDEX_OFFSET + 8;
const FOOTER_BLOCK_INDEX_CRC: usize = FOOTER_ID_TABLE_OFFSET + 8;
const FOOTER_ID_TABLE_CRC: usize = FOOTER_BLOCK_INDEX_CRC + 4;
const FOOTER_DICT_CRC: usize = FOOTER_ID_TABLE_CRC + 4;
const FOOTER_CRC_OFFSET: usize = FOOTER_DICT_CRC + 4;
const FOOTER_MAGIC_OFFSET: usize = FOOTER_CRC_OFFSET + 4;
pub const FOOTER_SIZE: usize = FOOTER_MAGIC_OFFSET + 8;

const BLOCK_OFFSET: usize = 0;
const BLOCK_COMPRESSED_LEN: usize = BLOCK_OFFSET + 8;
const BLOCK_RAW_LEN: usize = BLOCK_COMPRESSED_LEN + 4;
const BLOCK_FIRST_ROW: usize = BLOCK_RAW_LEN + 4;
const BLOCK_ROWS: usize = BLOCK_FIRST_ROW + 4;
const BLOCK_CRC: usize = BLOCK_ROWS + 4;
pub const BLOCK_ENTRY_SIZE: usize = BLOCK_CRC + 8; // 4 reserved bytes

pub const ID_ENTRY_SIZE: usize = 12;
/// zstd level for sealed blocks: level 1 keeps the sealer off the ingest
/// path on two cores (figures in docs/PERFORMANCE.md).
pub const ZSTD_LEVEL: i32 = 1;

const _: () = assert!(HEADER_SIZE == 32);
const _: () = assert!(SEGMENT_ID_OFFSET == 16);
const _: () = assert!(FOOTER_CRC_OFFSET == 52);
/// Largest zstd dictionary trained for a segment.
pub const DICT_SIZE_MAX: usize = 32 * 1024;
/// Frames sampled to train a segment's dictionary. Training time grows
/// with the samples (a 128 MiB segment of seed-shaped events: 112 ms with
/// 4,096, 23 ms with 1,024) while the segment's size did not move (122.6
/// and 122.3 bytes per event); docs/PERFORMANCE.md.
pub const DICT_SAMPLES_MAX: usize = 1024;
const _: () = assert!(FOOTER_SIZE == 64);
const _: () = assert!(BLOCK_ENTRY_SIZE == 32);

/// Block compression of a sealed segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None = 0,
    Zstd = 1,
    Lz4 = 2,
    /// zstd with a dictionary trained on the segment's own records and
    /// stored in it: small blocks (fast to read one row) that compress like
    /// large ones.
    ZstdDict = 3,
}

impl Compression {
    fn from_u8(value: u8) -> Option<Compression> {
        match value {
            0 => Some(Compression::None),
            1 => Some(Compression::Zstd),
            2 => Some(Compression::Lz4),
            3 => Some(Compression::ZstdDict),
            _ => None,
        }
    }

    pub fn parse(text: &str) -> Option<Compression> {
        match text {
            "none" => Some(Compression::None),
            "zstd" => Some(Compression::Zstd),
            "lz4" => Some(Compression::Lz4),
            "zstd-dict" => Some(Compression::ZstdDict),
            _ => None,
        }
    }
}

fn read_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn read_i64(b: &[u8], at: usize) -> i64 {
    read_u64(b, at) as i64
}

/// Encodes a file header.
pub fn encode_header(magic: [u8; 8], segment: u64, compression: Compression) -> [u8; HEADER_SIZE] {
    encode_header_full(magic, segment, compression, 0, 0)
}

fn encode_header_full(
    magic: [u8; 8],
    segment: u64,
    compression: Compression,
    dict_len: u32,
    flags: u8,
) -> [u8; HEADER_SIZE] {
    let mut h = [0u8; HEADER_SIZE];
    h[FLAGS_OFFSET] = flags;
    h[MAGIC_OFFSET..MAGIC_OFFSET + 8].copy_from_slice(&magic);
    h[VERSION_OFFSET..VERSION_OFFSET + 2].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[COMPRESSION_OFFSET] = compression as u8;
    h[DICT_LEN_OFFSET..DICT_LEN_OFFSET + 4].copy_from_slice(&dict_len.to_le_bytes());
    h[SEGMENT_ID_OFFSET..SEGMENT_ID_OFFSET + 8].copy_from_slice(&segment.to_le_bytes());
    let crc = crc32c::crc32c(&h[..HEADER_CRC_OFFSET]);
    h[HEADER_CRC_OFFSET..HEADER_CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The header of a new log of `segment` (salted frames).
pub fn encode_log_header(segment: u64) -> [u8; HEADER_SIZE] {
    encode_header_full(LOG_MAGIC, segment, Compression::None, 0, FLAG_SALTED)
}

/// Checks a log's header; returns the salt of its frames (0 for a log
/// written before frames were salted).
pub fn decode_log_header(bytes: &[u8], segment: u64) -> Result<u32, &'static str> {
    let (compression, dict_len, flags) = decode_header_flags(bytes, LOG_MAGIC, segment)?;
    if compression != Compression::None || dict_len != 0 {
        return Err("a log header names a compression");
    }
    match flags {
        0 => Ok(0),
        FLAG_SALTED => Ok(frame::salt_of(segment)),
        _ => Err("unknown log header flags"),
    }
}

/// Decodes and checks a file header of either kind; returns its
/// compression, the length of the dictionary that follows it, and its
/// flags (checked against those `magic`'s kind may carry).
fn decode_header_flags(
    bytes: &[u8],
    magic: [u8; 8],
    segment: u64,
) -> Result<(Compression, u32, u8), &'static str> {
    if bytes.len() < HEADER_SIZE {
        return Err("file shorter than its header");
    }
    if bytes[MAGIC_OFFSET..MAGIC_OFFSET + 8] != magic {
        return Err("bad magic");
    }
    if read_u32(bytes, HEADER_CRC_OFFSET) != crc32c::crc32c(&bytes[..HEADER_CRC_OFFSET]) {
        return Err("header checksum mismatch");
    }
    if bytes[HEADER_CRC_OFFSET + 4..HEADER_SIZE] != [0u8; 4] {
        return Err("reserved header bytes are not zero");
    }
    if read_u16(bytes, VERSION_OFFSET) != FORMAT_VERSION {
        return Err("unsupported format version");
    }
    if read_u64(bytes, SEGMENT_ID_OFFSET) != segment {
        return Err("header names another segment");
    }
    let flags = bytes[FLAGS_OFFSET];
    let known = if magic == LOG_MAGIC {
        FLAG_SALTED
    } else {
        FLAG_SEQS | FLAG_TEXT
    };
    if flags & !known != 0 {
        return Err("unknown header flags");
    }
    let dict_len = read_u32(bytes, DICT_LEN_OFFSET);
    let compression =
        Compression::from_u8(bytes[COMPRESSION_OFFSET]).ok_or("unknown compression")?;
    if dict_len as usize > DICT_SIZE_MAX || (dict_len > 0 && compression != Compression::ZstdDict) {
        return Err("bad dictionary length");
    }
    Ok((compression, dict_len, flags))
}

/// Trains a zstd dictionary on up to `DICT_SAMPLES_MAX` frames spread over
/// the segment. `None` when there is too little to train on.
fn train_dictionary(log_bytes: &[u8], offsets: &[u64]) -> Option<Vec<u8>> {
    if offsets.len() < 64 {
        return None;
    }
    let step = offsets.len().div_ceil(DICT_SAMPLES_MAX).max(1);
    let mut samples: Vec<&[u8]> = Vec::new();
    for (i, &offset) in offsets.iter().enumerate().step_by(step) {
        let end = offsets
            .get(i + 1)
            .copied()
            .unwrap_or(log_bytes.len() as u64);
        samples.push(log_bytes.get(offset as usize..end as usize)?);
    }
    train_dictionary_on(&samples)
}

/// The result of scanning an active log from its header.
#[derive(Debug, Default)]
pub struct LogScan {
    /// The salt of the log's frames (see [`FLAG_SALTED`]).
    pub salt: u32,
    /// Offset of each valid frame, in order.
    pub offsets: Vec<u64>,
    /// Bytes up to the end of the last valid frame.
    pub valid_len: u64,
    /// Why scanning stopped before the end of the file, if it did.
    pub stop: Option<FrameError>,
    /// When the scan stopped at a whole frame of an earlier segment (a
    /// reused log file's leftovers, not a torn write): that segment.
    pub stale_from: Option<u64>,
}

impl LogScan {
    /// Each frame the scan found in `bytes` (the file it scanned): its
    /// offset, its length and its payload, decoded again.
    pub fn frames<'a>(
        &'a self,
        bytes: &'a [u8],
    ) -> impl Iterator<Item = (u64, u64, Result<&'a [u8], FrameError>)> + 'a {
        self.offsets.iter().enumerate().map(move |(i, &offset)| {
            let end = self.offsets.get(i + 1).copied().unwrap_or(self.valid_len);
            let payload = bytes
                .get(offset as usize..end as usize)
                .ok_or(FrameError::Truncated {
                    needed: end as usize,
                    available: bytes.len(),
                })
                .and_then(|slice| frame::decode_salted(slice, self.salt))
                .map(|(frame, used)| {
                    debug_assert_eq!(used as u64, end - offset, "the scan's frame length");
                    frame.payload
                });
            (offset, end - offset, payload)
        })
    }
}

/// Scans the frames of a log file's bytes (header included).
pub fn scan_log(bytes: &[u8], segment: u64) -> Result<LogScan, &'static str> {
    let salt = decode_log_header(bytes, segment)?;
    let mut scan = LogScan {
        salt,
        valid_len: HEADER_SIZE as u64,
        ..LogScan::default()
    };
    let mut at = HEADER_SIZE;
    while at < bytes.len() {
        match frame::decode_salted(&bytes[at..], salt) {
            Ok((_, used)) => {
                scan.offsets.push(at as u64);
                at += used;
                scan.valid_len = at as u64;
            }
            Err(e) => {
                if salt != 0 {
                    scan.stale_from = frame::stale_segment(&bytes[at..], segment);
                }
                scan.stop = Some(e);
                break;
            }
        }
    }
    Ok(scan)
}

/// Summary of a sealed segment, as its footer states it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealedSummary {
    pub rows: u32,
    pub min_ts: Timestamp,
    pub max_ts: Timestamp,
    pub bytes: u64,
}

/// Writes a sealed segment from the frames of a log, salted with `salt`.
/// The frames must be valid (they come from a scan or the writer); each
/// one's checksum is checked again on the way, once, and the blocks hold
/// them unsalted.
#[allow(clippy::too_many_arguments)]
pub fn write_sealed(
    path: &Path,
    segment: u64,
    salt: u32,
    log_bytes: &[u8],
    offsets: &[u64],
    compression: Compression,
    block_size: usize,
) -> Result<SealedSummary, StorageError> {
    let dict = match compression {
        Compression::ZstdDict => train_dictionary(log_bytes, offsets),
        _ => None,
    };
    let mut writer = SealedWriter::create(path, segment, compression, dict, block_size, false)?;
    let blocks = block_rows(log_bytes.len(), offsets, block_size);
    let work: Vec<std::ops::Range<usize>> = (0..blocks.len())
        .step_by(SEAL_WORK_BLOCKS)
        .map(|b| b..(b + SEAL_WORK_BLOCKS).min(blocks.len()))
        .collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, work.len().max(1));
    let compressors = (0..threads)
        .map(|_| writer.block_compressor())
        .collect::<Result<Vec<_>, _>>()?;
    // The bytes of rows `rows`: frames lie back to back in the log.
    let bytes_of = |rows: &std::ops::Range<usize>| -> std::ops::Range<usize> {
        let end = offsets
            .get(rows.end)
            .map_or(log_bytes.len(), |&o| o as usize);
        offsets[rows.start] as usize..end
    };
    // Helpers (niced like the sealer) check and compress stretches of
    // blocks; this thread writes them in order and notes each row.
    super::pipeline::in_order(
        "evdb-sealer",
        path,
        segment,
        compressors,
        work.len(),
        |n, compressor| {
            let mut plain = Vec::new();
            work[n]
                .clone()
                .map(|b| {
                    let rows = &blocks[b];
                    check_frames(segment, salt, log_bytes, offsets, rows, &bytes_of)?;
                    let raw = &log_bytes[bytes_of(rows)];
                    let raw = if salt == 0 {
                        raw
                    } else {
                        unsalt(raw, salt, &mut plain)
                    };
                    compressor
                        .compress(raw)
                        .map_err(|e| StorageError::io(path, e))
                })
                .collect::<Result<Vec<_>, _>>()
        },
        |n, compressed| {
            for (b, compressed) in work[n].clone().zip(compressed?) {
                let rows = &blocks[b];
                writer.push_compressed_block(
                    &compressed,
                    &log_bytes[bytes_of(rows)],
                    rows.clone().map(|r| r as u32),
                )?;
            }
            Ok(())
        },
    )?;
    writer.finish()
}

/// Blocks of a sealed segment per unit of work of the sealer's helpers.
const SEAL_WORK_BLOCKS: usize = 16;

/// The rows of each block of a segment sealed from a log: frames are
/// added to a block until it holds `block_size` bytes or more, the rule
/// [`SealedWriter::push_verified`] follows. `offsets`: each row's frame
/// offset in a log of `log_len` bytes.
fn block_rows(log_len: usize, offsets: &[u64], block_size: usize) -> Vec<std::ops::Range<usize>> {
    let mut blocks = Vec::new();
    let mut first = 0;
    for row in 0..offsets.len() {
        let end = offsets.get(row + 1).map_or(log_len as u64, |&o| o);
        if end.saturating_sub(offsets[first]) >= block_size as u64 {
            blocks.push(first..row + 1);
            first = row + 1;
        }
    }
    if first < offsets.len() {
        blocks.push(first..offsets.len());
    }
    blocks
}

/// Copies checked frames salted with `salt` into `out`, unsalted; returns
/// the copy.
fn unsalt<'a>(frames: &[u8], salt: u32, out: &'a mut Vec<u8>) -> &'a [u8] {
    out.clear();
    out.extend_from_slice(frames);
    let mut at = 0;
    while let Ok(used) = frame::frame_len(&out[at..]) {
        frame::xor_checksum(&mut out[at..], salt);
        at += used;
    }
    debug_assert_eq!(at, out.len(), "checked frames fill their bytes");
    out
}

/// Checks that the frames of `rows` pass their checksums (salted with
/// `salt`) and exactly fill their byte ranges of the log.
fn check_frames(
    segment: u64,
    salt: u32,
    log_bytes: &[u8],
    offsets: &[u64],
    rows: &std::ops::Range<usize>,
    bytes_of: &dyn Fn(&std::ops::Range<usize>) -> std::ops::Range<usize>,
) -> Result<(), StorageError> {
    for row in rows.clone() {
        let range = bytes_of(&(row..row + 1));
        let offset = offsets[row];
        let (_, used) =
            frame::decode_salted(log_bytes.get(range.clone()).unwrap_or_default(), salt)
                .map_err(|e| StorageError::corrupted(segment, offset, e.to_string()))?;
        if used != range.len() {
            return Err(StorageError::corrupted(
                segment,
                offset,
                "frame does not fill its row's bytes",
            ));
        }
    }
    Ok(())
}

/// Trains a zstd dictionary on sample frames (whole frames, as a log holds
/// them). `None` when there are too few to train on.
pub fn train_dictionary_on(samples: &[&[u8]]) -> Option<Vec<u8>> {
    if samples.len() < 64 {
        return None;
    }
    zstd::dict::from_samples(samples, DICT_SIZE_MAX).ok()
}

/// A zstd block compressor. With a dictionary it compresses through a
/// prepared `CDict` (`ZSTD_compress_usingCDict`), which attaches the
/// dictionary's match state to each small block instead of reloading it:
/// several times faster on 8 KiB blocks than a context with a raw
/// dictionary loaded.
struct ZstdEncoder {
    /// Declared first: dropped before the dictionary it references.
    cctx: zstd::zstd_safe::CCtx<'static>,
    /// Referenced by `cctx`: kept alive as long as it.
    _cdict: Option<zstd::zstd_safe::CDict<'static>>,
}

impl ZstdEncoder {
    fn new(dict: Option<&[u8]>) -> std::io::Result<ZstdEncoder> {
        let cdict = match dict {
            Some(d) => Some(
                zstd::zstd_safe::CDict::try_create(d, ZSTD_LEVEL).ok_or_else(|| {
                    std::io::Error::other("zstd could not prepare the dictionary")
                })?,
            ),
            None => None,
        };
        let err = |c| std::io::Error::other(zstd::zstd_safe::get_error_name(c));
        let mut cctx = zstd::zstd_safe::CCtx::try_create()
            .ok_or_else(|| std::io::Error::other("zstd could not create a context"))?;
        cctx.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(ZSTD_LEVEL))
            .map_err(err)?;
        if let Some(cdict) = &cdict {
            // Attach the dictionary's tables to every block rather than
            // copy them (zstd copies above 8 KiB of input, our block size).
            cctx.set_parameter(zstd::zstd_safe::CParameter::ForceAttachDict(
                zstd::zstd_safe::DictAttachPref::ForceAttach,
            ))
            .map_err(err)?;
            cctx.ref_cdict(cdict).map_err(err)?;
        }
        Ok(ZstdEncoder {
            cctx,
            _cdict: cdict,
        })
    }

    fn compress(&mut self, raw: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(raw.len()));
        // The dictionary (when any) stays referenced by the context.
        self.cctx
            .compress2(&mut out, raw)
            .map_err(|c| std::io::Error::other(zstd::zstd_safe::get_error_name(c)))?;
        Ok(out)
    }
}

/// Compresses blocks the way a [`SealedWriter`] does; one per thread
/// (from [`SealedWriter::block_compressor`]) lets other threads compress
/// blocks for [`SealedWriter::push_compressed_block`].
pub struct BlockCompressor {
    compression: Compression,
    zstd: Option<ZstdEncoder>,
}

impl BlockCompressor {
    fn new(compression: Compression, dict: &[u8]) -> std::io::Result<BlockCompressor> {
        let zstd = match compression {
            Compression::Zstd => Some(ZstdEncoder::new(None)?),
            Compression::ZstdDict => Some(ZstdEncoder::new(Some(dict))?),
            _ => None,
        };
        Ok(BlockCompressor { compression, zstd })
    }

    /// The compressed form of `raw` (frames back to back).
    pub fn compress(&mut self, raw: &[u8]) -> std::io::Result<Vec<u8>> {
        match (&mut self.zstd, self.compression) {
            (Some(z), _) => z.compress(raw),
            (None, Compression::Lz4) => Ok(lz4_flex::block::compress(raw)),
            _ => Ok(raw.to_vec()),
        }
    }
}

/// Writes a sealed segment front to back, a block at a time: blocks
/// compressed elsewhere ([`SealedWriter::push_compressed_block`], how
/// sealing and compaction write, their helpers compressing), or frames one
/// at a time ([`SealedWriter::push`], grouped into blocks and compressed
/// here as they come; the tests' way). Memory stays at about one block
/// plus 16 bytes per row (id table, and the seq table when kept) plus
/// 4 KiB of text filter per 8 blocks (1/16 of the raw bytes, folded at the
/// end).
pub struct SealedWriter {
    path: std::path::PathBuf,
    segment: u64,
    compression: Compression,
    block_size: usize,
    out: PacedFile,
    written: u64,
    dict: Vec<u8>,
    /// Made on the first block this writer compresses itself (a
    /// compaction hands it blocks compressed elsewhere).
    compressor: Option<BlockCompressor>,
    block_index: Vec<u8>,
    ids: Vec<(IdHash, u32)>,
    raw: Vec<u8>,
    first_row: u32,
    rows: u32,
    min_ts: i64,
    max_ts: i64,
    /// The seq table (one little-endian u32 per row) when the segment
    /// keeps explicit arrival offsets (a compacted segment).
    seqs: Option<Vec<u8>>,
    last_seq: Option<u32>,
    /// The text filter's signatures, built as rows come.
    text: TextFilterBuilder,
}

impl SealedWriter {
    /// Creates the file and writes its header. `dict` is used when
    /// `compression` is `ZstdDict` (without one, plain zstd is written).
    /// `keep_seqs`: write the seq table (header flag `FLAG_SEQS`).
    pub fn create(
        path: &Path,
        segment: u64,
        compression: Compression,
        dict: Option<Vec<u8>>,
        block_size: usize,
        keep_seqs: bool,
    ) -> Result<SealedWriter, StorageError> {
        let io = |e| StorageError::io(path, e);
        let dict = match compression {
            Compression::ZstdDict => dict,
            _ => None,
        };
        // Too little to train on: plain zstd for this segment.
        let compression = match (compression, &dict) {
            (Compression::ZstdDict, None) => Compression::Zstd,
            (c, _) => c,
        };
        let dict = dict.unwrap_or_default();
        let file = File::create(path).map_err(io)?;
        let mut out = PacedFile::new(file);
        let flags = FLAG_TEXT | if keep_seqs { FLAG_SEQS } else { 0 };
        out.write_all(&encode_header_full(
            SEG_MAGIC,
            segment,
            compression,
            dict.len() as u32,
            flags,
        ))
        .map_err(io)?;
        out.write_all(&dict).map_err(io)?;
        Ok(SealedWriter {
            path: path.to_owned(),
            segment,
            compression,
            block_size,
            out,
            written: (HEADER_SIZE + dict.len()) as u64,
            dict,
            compressor: None,
            block_index: Vec::new(),
            ids: Vec::new(),
            raw: Vec::with_capacity(block_size * 2),
            first_row: 0,
            rows: 0,
            min_ts: i64::MAX,
            max_ts: i64::MIN,
            seqs: keep_seqs.then(Vec::new),
            last_seq: None,
            text: TextFilterBuilder::new(),
        })
    }

    fn io(&self, e: std::io::Error) -> StorageError {
        StorageError::io(&self.path, e)
    }

    /// The compression blocks are written with (plain zstd when
    /// `ZstdDict` was asked without a dictionary).
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Rows pushed so far.
    pub fn rows(&self) -> u32 {
        self.rows
    }

    /// Bytes written so far (the file grows by whole blocks).
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Appends one whole frame (checked again here) as the next row.
    /// `seq_offset` is its arrival number relative to the segment's first
    /// seq; it must grow strictly (checked) and is stored only when the
    /// writer keeps seqs.
    pub fn push(&mut self, frame_bytes: &[u8], seq_offset: u32) -> Result<(), StorageError> {
        let at = u64::from(self.rows);
        let (_, used) = frame::decode(frame_bytes)
            .map_err(|e| StorageError::corrupted(self.segment, at, e.to_string()))?;
        if used != frame_bytes.len() {
            return Err(StorageError::corrupted(
                self.segment,
                at,
                "frame followed by stray bytes",
            ));
        }
        self.push_verified(frame_bytes, seq_offset)
    }

    /// A compressor that compresses blocks exactly as this writer does
    /// (same compression and dictionary), for another thread.
    pub fn block_compressor(&self) -> Result<BlockCompressor, StorageError> {
        BlockCompressor::new(self.compression, &self.dict).map_err(|e| self.io(e))
    }

    /// Appends a whole block compressed elsewhere: copied as stored from a
    /// segment with this writer's compression and dictionary, or made by
    /// [`SealedWriter::block_compressor`]. `raw` is its decompressed form,
    /// whose frames the caller has checked (only their headers are walked
    /// here, to note each row's id, timestamp and text); `seqs` gives each
    /// row's arrival offset.
    pub fn push_compressed_block(
        &mut self,
        compressed: &[u8],
        raw: &[u8],
        seqs: impl Iterator<Item = u32>,
    ) -> Result<(), StorageError> {
        self.flush_block()?;
        let first = self.rows;
        let mut seqs = seqs;
        let mut at = 0usize;
        while at < raw.len() {
            let row = u64::from(self.rows);
            let corrupt = |reason: String| StorageError::corrupted(self.segment, row, reason);
            let used = frame::frame_len(&raw[at..]).map_err(|e| corrupt(e.to_string()))?;
            let payload = &raw[at + frame::FRAME_HEADER_SIZE..at + used];
            let seq = seqs
                .next()
                .ok_or_else(|| corrupt("no seq for a row".into()))?;
            self.note_row(payload, seq)?;
            at += used;
        }
        if seqs.next().is_some() {
            return Err(StorageError::corrupted(
                self.segment,
                u64::from(self.rows),
                "more seqs than rows in a block",
            ));
        }
        let mut entry = [0u8; BLOCK_ENTRY_SIZE];
        entry[BLOCK_OFFSET..BLOCK_OFFSET + 8].copy_from_slice(&self.written.to_le_bytes());
        entry[BLOCK_COMPRESSED_LEN..BLOCK_COMPRESSED_LEN + 4]
            .copy_from_slice(&(compressed.len() as u32).to_le_bytes());
        entry[BLOCK_RAW_LEN..BLOCK_RAW_LEN + 4].copy_from_slice(&(raw.len() as u32).to_le_bytes());
        entry[BLOCK_FIRST_ROW..BLOCK_FIRST_ROW + 4].copy_from_slice(&first.to_le_bytes());
        entry[BLOCK_ROWS..BLOCK_ROWS + 4].copy_from_slice(&(self.rows - first).to_le_bytes());
        entry[BLOCK_CRC..BLOCK_CRC + 4].copy_from_slice(&crc32c::crc32c(compressed).to_le_bytes());
        self.block_index.extend_from_slice(&entry);
        self.out.write_all(compressed).map_err(|e| self.io(e))?;
        self.written += compressed.len() as u64;
        self.first_row = self.rows;
        self.text.end_block();
        Ok(())
    }

    /// Appends one frame already checked (by [`Block::checked_frame`]):
    /// its checksum is not computed again.
    pub fn push_verified(
        &mut self,
        frame_bytes: &[u8],
        seq_offset: u32,
    ) -> Result<(), StorageError> {
        let at = u64::from(self.rows);
        let payload = frame_bytes.get(frame::FRAME_HEADER_SIZE..).ok_or_else(|| {
            StorageError::corrupted(self.segment, at, "frame shorter than its header")
        })?;
        self.note_row(payload, seq_offset)?;
        self.raw.extend_from_slice(frame_bytes);
        if self.raw.len() >= self.block_size {
            self.flush_block()?;
        }
        Ok(())
    }

    /// Syncs the file every `step` bytes from now on (default
    /// [`super::dir::PACED_STEP`]).
    pub fn with_sync_step(mut self, step: usize) -> SealedWriter {
        self.out.set_step(step);
        self
    }

    /// Records a row's id, timestamp and seq; counts it.
    fn note_row(&mut self, payload: &[u8], seq_offset: u32) -> Result<(), StorageError> {
        let at = u64::from(self.rows);
        let (id, ts) = peek_id_and_timestamp(payload)
            .map_err(|e| StorageError::corrupted(self.segment, at, e.to_string()))?;
        let data = peek_data(payload)
            .map_err(|e| StorageError::corrupted(self.segment, at, e.to_string()))?;
        self.text.add(data);
        if self.last_seq.is_some_and(|last| seq_offset <= last) {
            return Err(StorageError::corrupted(
                self.segment,
                at,
                "rows must keep their arrival order",
            ));
        }
        if self.rows == u32::MAX {
            return Err(StorageError::corrupted(self.segment, at, "too many rows"));
        }
        self.last_seq = Some(seq_offset);
        if let Some(seqs) = &mut self.seqs {
            seqs.extend_from_slice(&seq_offset.to_le_bytes());
        }
        self.ids.push((hash_id(id), self.rows));
        self.min_ts = self.min_ts.min(ts);
        self.max_ts = self.max_ts.max(ts);
        self.rows += 1;
        Ok(())
    }

    fn flush_block(&mut self) -> Result<(), StorageError> {
        if self.raw.is_empty() {
            return Ok(());
        }
        let compressor = match &mut self.compressor {
            Some(c) => c,
            None => self.compressor.insert(
                BlockCompressor::new(self.compression, &self.dict)
                    .map_err(|e| StorageError::io(&self.path, e))?,
            ),
        };
        let compressed = compressor
            .compress(&self.raw)
            .map_err(|e| StorageError::io(&self.path, e))?;
        let rows = self.rows - self.first_row;
        let mut entry = [0u8; BLOCK_ENTRY_SIZE];
        entry[BLOCK_OFFSET..BLOCK_OFFSET + 8].copy_from_slice(&self.written.to_le_bytes());
        entry[BLOCK_COMPRESSED_LEN..BLOCK_COMPRESSED_LEN + 4]
            .copy_from_slice(&(compressed.len() as u32).to_le_bytes());
        entry[BLOCK_RAW_LEN..BLOCK_RAW_LEN + 4]
            .copy_from_slice(&(self.raw.len() as u32).to_le_bytes());
        entry[BLOCK_FIRST_ROW..BLOCK_FIRST_ROW + 4].copy_from_slice(&self.first_row.to_le_bytes());
        entry[BLOCK_ROWS..BLOCK_ROWS + 4].copy_from_slice(&rows.to_le_bytes());
        entry[BLOCK_CRC..BLOCK_CRC + 4].copy_from_slice(&crc32c::crc32c(&compressed).to_le_bytes());
        self.block_index.extend_from_slice(&entry);
        self.out.write_all(&compressed).map_err(|e| self.io(e))?;
        self.written += compressed.len() as u64;
        self.raw.clear();
        self.first_row = self.rows;
        self.text.end_block();
        Ok(())
    }

    /// Writes the last block, the block index, the id table, the seq table
    /// and the footer, and fsyncs the file (not its directory).
    pub fn finish(mut self) -> Result<SealedSummary, StorageError> {
        self.flush_block()?;
        let block_index = std::mem::take(&mut self.block_index);
        let block_index_offset = self.written;
        self.out.write_all(&block_index).map_err(|e| self.io(e))?;
        self.written += block_index.len() as u64;
        let mut ids = std::mem::take(&mut self.ids);
        ids.sort_unstable();
        let mut id_table = Vec::with_capacity(ids.len() * ID_ENTRY_SIZE);
        for (hash, row) in &ids {
            id_table.extend_from_slice(&hash.0.to_le_bytes());
            id_table.extend_from_slice(&row.to_le_bytes());
        }
        drop(ids);
        let id_table_offset = self.written;
        self.out.write_all(&id_table).map_err(|e| self.io(e))?;
        self.written += id_table.len() as u64;
        if let Some(seqs) = self.seqs.take() {
            self.out.write_all(&seqs).map_err(|e| self.io(e))?;
            self.out
                .write_all(&crc32c::crc32c(&seqs).to_le_bytes())
                .map_err(|e| self.io(e))?;
            self.written += seqs.len() as u64 + 4;
        }
        let text = std::mem::take(&mut self.text).finish();
        self.out.write_all(&text).map_err(|e| self.io(e))?;
        self.written += text.len() as u64;
        let rows = self.rows;
        let (min_ts, max_ts) = if rows == 0 {
            (0, 0)
        } else {
            (self.min_ts, self.max_ts)
        };
        let mut footer = [0u8; FOOTER_SIZE];
        footer[FOOTER_ROWS_OFFSET..FOOTER_ROWS_OFFSET + 4].copy_from_slice(&rows.to_le_bytes());
        footer[FOOTER_BLOCKS_OFFSET..FOOTER_BLOCKS_OFFSET + 4]
            .copy_from_slice(&((block_index.len() / BLOCK_ENTRY_SIZE) as u32).to_le_bytes());
        footer[FOOTER_MIN_TS_OFFSET..FOOTER_MIN_TS_OFFSET + 8]
            .copy_from_slice(&min_ts.to_le_bytes());
        footer[FOOTER_MAX_TS_OFFSET..FOOTER_MAX_TS_OFFSET + 8]
            .copy_from_slice(&max_ts.to_le_bytes());
        footer[FOOTER_BLOCK_INDEX_OFFSET..FOOTER_BLOCK_INDEX_OFFSET + 8]
            .copy_from_slice(&block_index_offset.to_le_bytes());
        footer[FOOTER_ID_TABLE_OFFSET..FOOTER_ID_TABLE_OFFSET + 8]
            .copy_from_slice(&id_table_offset.to_le_bytes());
        footer[FOOTER_BLOCK_INDEX_CRC..FOOTER_BLOCK_INDEX_CRC + 4]
            .copy_from_slice(&crc32c::crc32c(&block_index).to_le_bytes());
        footer[FOOTER_ID_TABLE_CRC..FOOTER_ID_TABLE_CRC + 4]
            .copy_from_slice(&crc32c::crc32c(&id_table).to_le_bytes());
        footer[FOOTER_DICT_CRC..FOOTER_DICT_CRC + 4]
            .copy_from_slice(&crc32c::crc32c(&self.dict).to_le_bytes());
        let crc = crc32c::crc32c(&footer[..FOOTER_CRC_OFFSET]);
        footer[FOOTER_CRC_OFFSET..FOOTER_CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        footer[FOOTER_MAGIC_OFFSET..FOOTER_MAGIC_OFFSET + 8].copy_from_slice(&FOOTER_MAGIC);
        self.out.write_all(&footer).map_err(|e| self.io(e))?;
        self.written += FOOTER_SIZE as u64;
        let path = self.path.clone();
        self.out.finish().map_err(|e| StorageError::io(&path, e))?;
        Ok(SealedSummary {
            rows,
            min_ts: Timestamp(min_ts),
            max_ts: Timestamp(max_ts),
            bytes: self.written,
        })
    }
}

thread_local! {
    /// One zstd decompression context per thread, reused for every block:
    /// creating one per block costs more than decompressing a small block.
    static DCTX: std::cell::RefCell<zstd::zstd_safe::DCtx<'static>> =
        std::cell::RefCell::new(zstd::zstd_safe::DCtx::create());
}

/// Decompresses one zstd frame of at most `capacity` bytes.
fn zstd_decompress(
    compressed: &[u8],
    capacity: usize,
    dict: Option<&zstd::dict::DecoderDictionary<'static>>,
) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::with_capacity(capacity);
    DCTX.with(|d| {
        let mut d = d.borrow_mut();
        match dict {
            Some(dict) => d.decompress_using_ddict(&mut out, compressed, dict.as_ddict()),
            None => d.decompress(&mut out, compressed),
        }
    })
    .map_err(zstd::zstd_safe::get_error_name)?;
    Ok(out)
}

/// One entry of a sealed segment's block index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BlockEntry {
    offset: u64,
    compressed_len: u32,
    raw_len: u32,
    first_row: u32,
    rows: u32,
    crc: u32,
}

/// A sealed, immutable segment read through a memory map.
pub struct SealedSegment {
    pub id: u64,
    /// Arrival number of row 0 (from the catalog; not stored in the file).
    pub first_seq: u64,
    map: Mmap,
    compression: Compression,
    pub rows: u32,
    pub min_ts: Timestamp,
    pub max_ts: Timestamp,
    blocks: Vec<BlockEntry>,
    /// The prepared dictionary of a `ZstdDict` segment.
    dict: Option<zstd::dict::DecoderDictionary<'static>>,
    /// Bytes of the dictionary after the header.
    dict_len: usize,
    id_table_offset: usize,
    id_table_crc: u32,
    id_table_checked: OnceLock<Result<(), String>>,
    /// Offset of the seq table (`FLAG_SEQS`), checked at open.
    seq_table_offset: Option<usize>,
    /// Offset and shape of the text filter (`FLAG_TEXT`); its checksum is
    /// checked on first use.
    text_filter: Option<(usize, TextFilterShape)>,
    text_filter_checked: OnceLock<Result<(), &'static str>>,
}

impl std::fmt::Debug for SealedSegment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedSegment")
            .field("id", &self.id)
            .field("rows", &self.rows)
            .finish()
    }
}

impl SealedSegment {
    /// Maps and checks a sealed segment: header, footer and block index are
    /// verified now; the id table on first use; each block when it is read.
    pub fn open(path: &Path, id: u64) -> Result<SealedSegment, StorageError> {
        let map = super::dir::map_readonly(path).map_err(|e| StorageError::io(path, e))?;
        Self::from_map(map, id)
    }

    fn from_map(map: Mmap, id: u64) -> Result<SealedSegment, StorageError> {
        let bad = |offset: usize, reason: &str| StorageError::corrupted(id, offset as u64, reason);
        let bytes: &[u8] = &map;
        let (compression, dict_len, flags) =
            decode_header_flags(bytes, SEG_MAGIC, id).map_err(|r| bad(0, r))?;
        let data_start = HEADER_SIZE + dict_len as usize;
        if bytes.len() < data_start + FOOTER_SIZE {
            return Err(bad(bytes.len(), "file shorter than header and footer"));
        }
        let footer_at = bytes.len() - FOOTER_SIZE;
        let footer = &bytes[footer_at..];
        if footer[FOOTER_MAGIC_OFFSET..] != FOOTER_MAGIC {
            return Err(bad(footer_at, "bad footer magic"));
        }
        if read_u32(footer, FOOTER_CRC_OFFSET) != crc32c::crc32c(&footer[..FOOTER_CRC_OFFSET]) {
            return Err(bad(footer_at, "footer checksum mismatch"));
        }
        let rows = read_u32(footer, FOOTER_ROWS_OFFSET);
        let block_count = read_u32(footer, FOOTER_BLOCKS_OFFSET) as usize;
        let block_index_offset = read_u64(footer, FOOTER_BLOCK_INDEX_OFFSET) as usize;
        let id_table_offset = read_u64(footer, FOOTER_ID_TABLE_OFFSET) as usize;
        let block_index_end = block_index_offset
            .checked_add(block_count * BLOCK_ENTRY_SIZE)
            .ok_or_else(|| bad(footer_at, "block index overflows"))?;
        let id_table_end = id_table_offset
            .checked_add(rows as usize * ID_ENTRY_SIZE)
            .ok_or_else(|| bad(footer_at, "id table overflows"))?;
        let seq_table_len = if flags & FLAG_SEQS != 0 {
            rows as usize * 4 + 4
        } else {
            0
        };
        let text_shape = if flags & FLAG_TEXT != 0 {
            let trailer = footer_at
                .checked_sub(TRAILER_SIZE)
                .and_then(|at| bytes.get(at..footer_at))
                .ok_or_else(|| bad(footer_at, "file shorter than its text filter"))?;
            Some(
                TextFilterShape::decode(trailer, block_count)
                    .map_err(|r| bad(footer_at - TRAILER_SIZE, r))?,
            )
        } else {
            None
        };
        let text_len = text_shape.map_or(0, |s| s.section_len());
        let seq_table_end = id_table_end.checked_add(seq_table_len);
        if block_index_end != id_table_offset
            || seq_table_end.and_then(|e| e.checked_add(text_len)) != Some(footer_at)
            || block_index_offset < data_start
        {
            return Err(bad(footer_at, "footer sections do not tile the file"));
        }
        let text_filter = text_shape.map(|shape| (footer_at - text_len, shape));
        let seq_table_offset = if flags & FLAG_SEQS != 0 {
            let crc_at = id_table_end + rows as usize * 4;
            let table = &bytes[id_table_end..crc_at];
            if crc32c::crc32c(table) != read_u32(bytes, crc_at) {
                return Err(bad(id_table_end, "seq table checksum mismatch"));
            }
            let mut last: Option<u32> = None;
            for (i, s) in table.chunks_exact(4).enumerate() {
                let s = read_u32(s, 0);
                if last.is_some_and(|l| s <= l) {
                    return Err(bad(id_table_end + i * 4, "seq table out of order"));
                }
                last = Some(s);
            }
            Some(id_table_end)
        } else {
            None
        };
        let index_bytes = &bytes[block_index_offset..block_index_end];
        if crc32c::crc32c(index_bytes) != read_u32(footer, FOOTER_BLOCK_INDEX_CRC) {
            return Err(bad(block_index_offset, "block index checksum mismatch"));
        }
        let mut blocks = Vec::with_capacity(block_count);
        let mut next_row = 0u32;
        let mut next_offset = data_start as u64;
        for (i, e) in index_bytes.chunks_exact(BLOCK_ENTRY_SIZE).enumerate() {
            let entry = BlockEntry {
                offset: read_u64(e, BLOCK_OFFSET),
                compressed_len: read_u32(e, BLOCK_COMPRESSED_LEN),
                raw_len: read_u32(e, BLOCK_RAW_LEN),
                first_row: read_u32(e, BLOCK_FIRST_ROW),
                rows: read_u32(e, BLOCK_ROWS),
                crc: read_u32(e, BLOCK_CRC),
            };
            // Blocks tile the data area and rows in order: check it once here
            // so that reads can trust the index.
            if entry.first_row != next_row
                || entry.offset != next_offset
                || entry.rows == 0
                || entry.raw_len as usize > crate::limits::FRAME_PAYLOAD_MAX * 2
            {
                return Err(bad(
                    block_index_offset + i * BLOCK_ENTRY_SIZE,
                    "block index entry out of order",
                ));
            }
            next_row = entry.first_row + entry.rows;
            next_offset = entry.offset + u64::from(entry.compressed_len);
            blocks.push(entry);
        }
        if next_row != rows || next_offset != block_index_offset as u64 {
            return Err(bad(
                block_index_offset,
                "block index does not cover the rows",
            ));
        }
        let dict_bytes = &bytes[HEADER_SIZE..data_start];
        if crc32c::crc32c(dict_bytes) != read_u32(footer, FOOTER_DICT_CRC) {
            return Err(bad(HEADER_SIZE, "dictionary checksum mismatch"));
        }
        let dict = match compression {
            Compression::ZstdDict => Some(zstd::dict::DecoderDictionary::copy(dict_bytes)),
            _ => None,
        };
        Ok(SealedSegment {
            id,
            first_seq: 0,
            compression,
            rows,
            min_ts: Timestamp(read_i64(footer, FOOTER_MIN_TS_OFFSET)),
            max_ts: Timestamp(read_i64(footer, FOOTER_MAX_TS_OFFSET)),
            blocks,
            dict,
            dict_len: dict_len as usize,
            id_table_offset,
            id_table_crc: read_u32(footer, FOOTER_ID_TABLE_CRC),
            id_table_checked: OnceLock::new(),
            seq_table_offset,
            text_filter,
            text_filter_checked: OnceLock::new(),
            map,
        })
    }

    /// Sets the arrival number of row 0, which the catalog holds.
    pub fn with_first_seq(mut self, first_seq: u64) -> SealedSegment {
        self.first_seq = first_seq;
        self
    }

    /// The seq table: one little-endian u32 per row, the row's arrival
    /// number relative to `first_seq`; `None` when rows are arrival-dense
    /// (row r arrived as `first_seq + r`).
    pub fn seq_table(&self) -> Option<&[u8]> {
        self.seq_table_offset
            .map(|at| &self.map[at..at + self.rows as usize * 4])
    }

    /// The arrival number of `row` relative to `first_seq`.
    pub fn seq_offset(&self, row: u32) -> u32 {
        match self.seq_table() {
            Some(t) => t
                .get(row as usize * 4..row as usize * 4 + 4)
                .map_or(row, |b| read_u32(b, 0)),
            None => row,
        }
    }

    /// How many arrival numbers the segment spans from `first_seq` (its
    /// rows, plus the holes compaction left).
    pub fn seq_span(&self) -> u64 {
        match self.rows {
            0 => 0,
            n => u64::from(self.seq_offset(n - 1)) + 1,
        }
    }

    /// Bytes of the file.
    pub fn file_bytes(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// The block compression the segment was written with.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// The segment's zstd dictionary (empty unless `ZstdDict`).
    pub fn dict_bytes(&self) -> &[u8] {
        &self.map[HEADER_SIZE..HEADER_SIZE + self.dict_len]
    }

    /// The compressed bytes of block `index`, as stored (checked against
    /// the block's checksum by [`SealedSegment::read_block`] only).
    pub fn block_compressed(&self, index: usize) -> Option<&[u8]> {
        let b = self.blocks.get(index)?;
        self.map
            .get(b.offset as usize..b.offset as usize + b.compressed_len as usize)
    }

    /// Compressed bytes of block `index` (0 when out of range).
    pub fn block_compressed_len(&self, index: usize) -> u64 {
        self.blocks
            .get(index)
            .map_or(0, |b| u64::from(b.compressed_len))
    }

    /// Decompresses block `index` and checks its checksum.
    pub fn read_block(&self, index: usize) -> Result<Block, StorageError> {
        let entry = *self
            .blocks
            .get(index)
            .ok_or_else(|| StorageError::corrupted(self.id, 0, "block index out of range"))?;
        let start = entry.offset as usize;
        let compressed = &self.map[start..start + entry.compressed_len as usize];
        if crc32c::crc32c(compressed) != entry.crc {
            return Err(StorageError::corrupted(
                self.id,
                entry.offset,
                "block checksum mismatch",
            ));
        }
        let corrupt = |reason: String| StorageError::corrupted(self.id, entry.offset, reason);
        let raw = match self.compression {
            Compression::None => compressed.to_vec(),
            Compression::Zstd => zstd_decompress(compressed, entry.raw_len as usize, None)
                .map_err(|e| corrupt(format!("zstd: {e}")))?,
            Compression::Lz4 => lz4_flex::block::decompress(compressed, entry.raw_len as usize)
                .map_err(|e| corrupt(format!("lz4: {e}")))?,
            Compression::ZstdDict => {
                let dict = self
                    .dict
                    .as_ref()
                    .ok_or_else(|| corrupt("dictionary missing".into()))?;
                zstd_decompress(compressed, entry.raw_len as usize, Some(dict))
                    .map_err(|e| corrupt(format!("zstd: {e}")))?
            }
        };
        if raw.len() != entry.raw_len as usize {
            return Err(corrupt("block decompressed to the wrong size".into()));
        }
        // The compressed bytes passed their checksum: walk the frame
        // headers only. `Block::payload` verifies each frame it serves.
        let mut offsets = Vec::with_capacity(entry.rows as usize);
        let mut at = 0usize;
        while at < raw.len() {
            let used = frame::frame_len(&raw[at..])
                .map_err(|e| corrupt(format!("frame {} in block: {e}", offsets.len())))?;
            offsets.push(at as u32);
            at += used;
        }
        if offsets.len() != entry.rows as usize {
            return Err(corrupt("block holds the wrong number of rows".into()));
        }
        Ok(Block {
            first_row: entry.first_row,
            raw,
            offsets,
        })
    }

    /// The index of the block that holds `row`.
    pub fn block_of(&self, row: u32) -> Option<usize> {
        if row >= self.rows {
            return None;
        }
        Some(self.blocks.partition_point(|b| b.first_row + b.rows <= row))
    }

    /// The checked text filter, if the segment has one. `Err`: it is
    /// damaged (derived data: searches then read every block).
    pub fn text_filter(&self) -> Option<Result<TextFilter<'_>, &'static str>> {
        let (at, shape) = self.text_filter?;
        let section = &self.map[at..at + shape.section_len()];
        let checked = self
            .text_filter_checked
            .get_or_init(|| TextFilter::check(section, shape).map(|_| ()));
        Some(checked.and_then(|()| TextFilter::checked_before(section, shape)))
    }

    /// Checks the text filter's checksum: `Err` names the offset of a
    /// damaged filter (`evdb verify`).
    pub fn check_text_filter(&self) -> Result<(), StorageError> {
        match self.text_filter() {
            Some(Err(reason)) => Err(StorageError::corrupted(
                self.id,
                self.text_filter.map_or(0, |(at, _)| at as u64),
                reason,
            )),
            _ => Ok(()),
        }
    }

    /// The rows of `candidates` that lie in block groups whose text filter
    /// does not rule `needle` out (all of them without a usable filter or
    /// a needle too short to probe with).
    pub fn rows_maybe_with<'c>(
        &self,
        candidates: &'c roaring::RoaringBitmap,
        needle: &[u8],
    ) -> std::borrow::Cow<'c, roaring::RoaringBitmap> {
        let (Some(Ok(filter)), Some(needle)) = (self.text_filter(), Needle::new(needle)) else {
            return std::borrow::Cow::Borrowed(candidates);
        };
        let shape = filter.shape();
        let mut keep = roaring::RoaringBitmap::new();
        let g = shape.group_blocks as usize;
        if candidates.len() < u64::from(shape.groups) {
            // Few candidates (other filters narrowed them): probe only the
            // groups they lie in, instead of walking every group.
            let mut last: Option<(usize, bool)> = None;
            for row in candidates {
                let Some(group) = self.block_of(row).map(|b| b / g) else {
                    continue;
                };
                let pass = match last {
                    Some((l, pass)) if l == group => pass,
                    _ => filter.may_contain(group as u32, &needle),
                };
                last = Some((group, pass));
                if pass {
                    keep.insert(row);
                }
            }
            return std::borrow::Cow::Owned(keep);
        }
        for group in 0..shape.groups {
            let first = group as usize * g;
            let last = (first + g).min(self.blocks.len()) - 1;
            let from = self.blocks[first].first_row;
            let to = self.blocks[last].first_row + self.blocks[last].rows;
            if candidates.range_cardinality(from..to) == 0 {
                continue;
            }
            if filter.may_contain(group, &needle) {
                keep.insert_range(from..to);
            }
        }
        keep &= candidates;
        std::borrow::Cow::Owned(keep)
    }

    /// Rows whose id hashes to `hash` (usually none or one).
    pub fn rows_with_hash(&self, hash: IdHash) -> Result<Vec<u32>, StorageError> {
        let table_end = self.id_table_offset + self.rows as usize * ID_ENTRY_SIZE;
        let table = &self.map[self.id_table_offset..table_end];
        let checked = self.id_table_checked.get_or_init(|| {
            if crc32c::crc32c(table) == self.id_table_crc {
                Ok(())
            } else {
                Err("id table checksum mismatch".to_owned())
            }
        });
        if let Err(reason) = checked {
            return Err(StorageError::corrupted(
                self.id,
                self.id_table_offset as u64,
                reason.clone(),
            ));
        }
        let n = self.rows as usize;
        let key_at = |i: usize| read_u64(table, i * ID_ENTRY_SIZE);
        let (mut lo, mut hi) = (0usize, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if key_at(mid) < hash.0 {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let mut rows = Vec::new();
        while lo < n && key_at(lo) == hash.0 {
            rows.push(read_u32(table, lo * ID_ENTRY_SIZE + 8));
            lo += 1;
        }
        Ok(rows)
    }

    /// Calls `f` with every row's record payload, in row order.
    pub fn for_each_payload(
        &self,
        mut f: impl FnMut(u32, &[u8]) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        for b in 0..self.block_count() {
            let block = self.read_block(b)?;
            for row in block.first_row..block.first_row + block.rows() {
                let (_, payload) = block.payload(row).ok_or_else(|| {
                    StorageError::corrupted(self.id, 0, "row missing from its block")
                })?;
                f(row, payload)?;
            }
        }
        Ok(())
    }

    /// Every id hash in the segment (for the id filter).
    pub fn id_hashes(&self) -> impl Iterator<Item = IdHash> + '_ {
        let table_end = self.id_table_offset + self.rows as usize * ID_ENTRY_SIZE;
        self.map[self.id_table_offset..table_end]
            .chunks_exact(ID_ENTRY_SIZE)
            .map(|e| IdHash(read_u64(e, 0)))
    }
}

/// A decompressed block: raw frames and the offset of each.
pub struct Block {
    pub first_row: u32,
    raw: Vec<u8>,
    offsets: Vec<u32>,
}

impl Block {
    /// The record payload of `row` (a segment row number), if in this block.
    pub fn payload(&self, row: u32) -> Option<(FrameKind, &[u8])> {
        let i = row.checked_sub(self.first_row)? as usize;
        let at = *self.offsets.get(i)? as usize;
        // `read_block` walked the headers only: the frame's checksum is
        // verified here, on every row served.
        frame::decode(&self.raw[at..])
            .ok()
            .map(|(f, _)| (f.kind, f.payload))
    }

    pub fn rows(&self) -> u32 {
        self.offsets.len() as u32
    }

    /// The whole frame of `row` (a segment row number), as the log held it.
    pub fn frame(&self, row: u32) -> Option<&[u8]> {
        let i = row.checked_sub(self.first_row)? as usize;
        let start = *self.offsets.get(i)? as usize;
        let end = self
            .offsets
            .get(i + 1)
            .map_or(self.raw.len(), |&e| e as usize);
        self.raw.get(start..end)
    }

    /// [`Block::frame`] with the frame's checksum verified.
    pub fn checked_frame(&self, row: u32) -> Option<&[u8]> {
        let f = self.frame(row)?;
        frame::decode(f).ok().map(|_| f)
    }

    /// The block's frames, back to back.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }
}

/// Scans an active log held in `data` as recovery does: the header (its
/// segment id taken from the bytes), every frame up to the first bad one
/// ([`LogScan::frames`]), and each frame's event id and timestamp, then
/// the whole record. The
/// entry point of the `log_scan` fuzz target and of the arbitrary-bytes
/// property test. Returns the frames read.
pub fn fuzz_log(data: &[u8]) -> Result<usize, &'static str> {
    let id = if data.len() >= HEADER_SIZE {
        read_u64(data, SEGMENT_ID_OFFSET)
    } else {
        0
    };
    let scan = scan_log(data, id)?;
    for (_, _, payload) in scan.frames(data) {
        let payload = payload.map_err(|_| "a scanned frame fails to decode")?;
        if peek_id_and_timestamp(payload).is_ok() {
            let _ = super::record::decode(payload);
        }
    }
    Ok(scan.offsets.len())
}

/// Opens a sealed segment held in `data` and reads every block and the id
/// table: the entry point of the `segment_open` fuzz target and of the
/// arbitrary-bytes property test. Returns the rows read.
pub fn fuzz_sealed(data: &[u8]) -> Result<u32, StorageError> {
    let map =
        super::dir::map_bytes(data).map_err(|e| StorageError::io(Path::new("<anonymous>"), e))?;
    let id = if data.len() >= HEADER_SIZE {
        read_u64(data, SEGMENT_ID_OFFSET)
    } else {
        0
    };
    if map.len() != data.len() {
        return Err(StorageError::corrupted(id, 0, "empty input"));
    }
    let seg = SealedSegment::from_map(map, id)?;
    let mut rows = 0;
    for b in 0..seg.block_count() {
        let block = seg.read_block(b)?;
        for row in block.first_row..block.first_row + block.rows() {
            if block.payload(row).is_some() {
                rows += 1;
            }
        }
    }
    seg.rows_with_hash(IdHash(0))?;
    seg.check_text_filter()?;
    let mut all = roaring::RoaringBitmap::new();
    all.insert_range(0..seg.rows);
    seg.rows_maybe_with(&all, b"\"user_id\"");
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::Generator;
    use crate::storage::record;
    use proptest::prelude::*;

    /// A log of `segment` holding `n` generated events (seeded by `seed`),
    /// salted as the writer salts it; and each frame's offset.
    fn log_of(segment: u64, seed: u64, n: usize) -> (Vec<u8>, Vec<u64>) {
        let mut log = encode_log_header(segment).to_vec();
        let mut offsets = Vec::new();
        for e in Generator::new(seed, Timestamp(0), 10).batch(n) {
            let at = log.len();
            offsets.push(at as u64);
            let mut payload = Vec::new();
            record::encode(&e, &mut payload);
            frame::encode(FrameKind::EventV1, &payload, &mut log);
            frame::xor_checksum(&mut log[at..], frame::salt_of(segment));
        }
        (log, offsets)
    }

    fn sealed_bytes(n: usize, compression: Compression) -> Vec<u8> {
        let (log, offsets) = log_of(7, 1, n);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("7.seg");
        let salt = frame::salt_of(7);
        let summary = write_sealed(&path, 7, salt, &log, &offsets, compression, 2048).unwrap();
        assert_eq!(summary.rows as usize, n);
        // Sealed with another salt, the same frames are refused.
        let other = dir.path().join("other.seg");
        assert!(write_sealed(&other, 7, salt ^ 1, &log, &offsets, compression, 2048).is_err());
        std::fs::read(path).unwrap()
    }

    #[test]
    fn a_scan_stops_at_an_earlier_segments_leftovers() {
        // Segment 12 reuses segment 5's file: its own frames, then the
        // rest of segment 5's.
        let (old, old_offsets) = log_of(5, 1, 40);
        let (new, new_offsets) = log_of(12, 2, 10);
        let mut file = old.clone();
        file[..new.len()].copy_from_slice(&new);
        let scan = scan_log(&file, 12).unwrap();
        assert_eq!(scan.offsets, new_offsets);
        assert_eq!(scan.valid_len, new.len() as u64);
        assert_eq!(scan.salt, frame::salt_of(12));
        assert!(scan.stop.is_some());
        // Back to back with a leftover frame, the scan says whose it is.
        let mut joined = new.clone();
        joined.extend_from_slice(&old[old_offsets[3] as usize..]);
        let scan = scan_log(&joined, 12).unwrap();
        assert_eq!(scan.offsets, new_offsets);
        assert_eq!(scan.stop, Some(FrameError::Checksum));
        assert_eq!(scan.stale_from, Some(5));
        // A torn frame is not taken for a leftover.
        let mut torn = joined.clone();
        torn[new.len() + frame::FRAME_HEADER_SIZE + 3] ^= 1;
        assert_eq!(scan_log(&torn, 12).unwrap().stale_from, None);
        // The header names the segment whose salt the frames carry.
        assert!(scan_log(&joined, 5).is_err());
    }

    #[test]
    fn a_log_written_before_salting_reads_unsalted() {
        let mut log = encode_header(LOG_MAGIC, 3, Compression::None).to_vec();
        let mut payload = Vec::new();
        record::encode(
            &Generator::new(1, Timestamp(0), 10).batch(1)[0],
            &mut payload,
        );
        frame::encode(FrameKind::EventV1, &payload, &mut log);
        let scan = scan_log(&log, 3).unwrap();
        assert_eq!((scan.salt, scan.offsets.len(), scan.stop), (0, 1, None));
        // Flags a log may not carry are refused.
        let mut seqs = encode_header_full(LOG_MAGIC, 3, Compression::None, 0, FLAG_SEQS).to_vec();
        seqs.extend_from_slice(&log[HEADER_SIZE..]);
        assert!(scan_log(&seqs, 3).is_err());
    }

    #[test]
    fn sealed_segments_round_trip_in_every_compression() {
        for c in [
            Compression::None,
            Compression::Zstd,
            Compression::Lz4,
            Compression::ZstdDict,
        ] {
            let bytes = sealed_bytes(100, c);
            assert_eq!(fuzz_sealed(&bytes).unwrap(), 100);
            let log = scan_log(&encode_log_header(1), 1).unwrap();
            assert!(log.offsets.is_empty());
        }
    }

    #[test]
    fn every_flipped_byte_of_a_sealed_segment_is_caught_or_harmless() {
        let bytes = sealed_bytes(80, Compression::ZstdDict);
        assert_eq!(bytes[COMPRESSION_OFFSET], Compression::ZstdDict as u8);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x55;
            // Header, footer, index, blocks and id table are all checksummed.
            assert!(
                fuzz_sealed(&bad).is_err(),
                "flip at {i} of {} unnoticed",
                bytes.len()
            );
        }
    }

    /// A compacted segment: rows 0, 2, 5, … of the arrivals survive.
    #[test]
    fn the_text_filter_keeps_every_row_that_holds_the_needle() {
        let events = Generator::new(1, Timestamp(0), 10).batch(3_000);
        let bytes = sealed_bytes(3_000, Compression::ZstdDict);
        let map = super::super::dir::map_bytes(&bytes).unwrap();
        let seg = SealedSegment::from_map(map, 7).unwrap();
        assert_eq!(bytes[FLAGS_OFFSET], FLAG_TEXT);
        assert!(seg.block_count() > 2 * super::super::textfilter::GROUP_BLOCKS as usize);
        let mut all = roaring::RoaringBitmap::new();
        all.insert_range(0..seg.rows);
        let mut pruned_some = false;
        for e in events.iter().step_by(97) {
            // A whole `"user_id":"u-NNNNN"` pair, as a user would search it.
            let data = e.data.as_str();
            let at = data.find("\"user_id\"").unwrap();
            let needle = &data[at..at + 19];
            let maybe = seg.rows_maybe_with(&all, needle.as_bytes());
            for (row, other) in events.iter().enumerate() {
                if other.data.as_str().contains(needle) {
                    assert!(maybe.contains(row as u32), "row {row} lost for {needle}");
                }
            }
            pruned_some |= maybe.len() < all.len();
        }
        assert!(pruned_some, "the filter never ruled a group out");
        // Few candidates take the per-row path; it keeps the same rows.
        let few: roaring::RoaringBitmap = (0..seg.rows).step_by(101).collect();
        assert!(few.len() < seg.block_count().div_ceil(8) as u64);
        for e in events.iter().step_by(101) {
            let data = e.data.as_str();
            let at = data.find("\"user_id\"").unwrap();
            let needle = &data[at..at + 19];
            let mut by_groups = seg.rows_maybe_with(&all, needle.as_bytes()).into_owned();
            by_groups &= &few;
            assert_eq!(*seg.rows_maybe_with(&few, needle.as_bytes()), by_groups);
        }
        // Too short to probe: nothing is ruled out.
        assert_eq!(seg.rows_maybe_with(&all, b"u-0").len(), all.len());
    }

    fn sealed_with_seqs(n: usize) -> (Vec<u8>, Vec<u32>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("9.seg");
        let mut w = SealedWriter::create(&path, 9, Compression::Zstd, None, 2048, true).unwrap();
        let mut seqs = Vec::new();
        for (i, e) in Generator::new(2, Timestamp(0), 10)
            .batch(n)
            .iter()
            .enumerate()
        {
            let mut payload = Vec::new();
            record::encode(e, &mut payload);
            let mut f = Vec::new();
            frame::encode(FrameKind::EventV1, &payload, &mut f);
            let seq = (i * (i + 3) / 2) as u32;
            w.push(&f, seq).unwrap();
            seqs.push(seq);
        }
        assert!(w.push(&[0u8; 4], 0).is_err(), "not a frame");
        let summary = w.finish().unwrap();
        assert_eq!(summary.rows as usize, n);
        (std::fs::read(path).unwrap(), seqs)
    }

    #[test]
    fn a_seq_table_round_trips_and_every_flip_is_caught() {
        let (bytes, seqs) = sealed_with_seqs(60);
        assert_eq!(bytes[FLAGS_OFFSET], FLAG_SEQS | FLAG_TEXT);
        let map = super::super::dir::map_bytes(&bytes).unwrap();
        let seg = SealedSegment::from_map(map, 9).unwrap();
        for (row, want) in seqs.iter().enumerate() {
            assert_eq!(seg.seq_offset(row as u32), *want);
        }
        assert_eq!(seg.seq_span(), u64::from(seqs[59]) + 1);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x55;
            assert!(fuzz_sealed(&bad).is_err(), "flip at {i} unnoticed");
        }
    }

    #[test]
    fn rows_must_keep_their_arrival_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("3.seg");
        let mut w = SealedWriter::create(&path, 3, Compression::None, None, 2048, true).unwrap();
        let e = &Generator::new(3, Timestamp(0), 10).batch(2)[..];
        let frame_of = |e: &crate::event::Event| {
            let mut payload = Vec::new();
            record::encode(e, &mut payload);
            let mut f = Vec::new();
            frame::encode(FrameKind::EventV1, &payload, &mut f);
            f
        };
        w.push(&frame_of(&e[0]), 5).unwrap();
        assert!(w.push(&frame_of(&e[1]), 5).is_err());
    }

    /// The fuzz entry point reads a real log past its header (the id comes
    /// from the bytes), so fuzzing from it reaches the frames and records;
    /// a cut tail only shortens what it reads.
    #[test]
    fn fuzz_log_reads_a_real_log() {
        let log = include_bytes!("../../tests/data/format-v1/segments/00000000000000000003.log");
        let frames = fuzz_log(log).unwrap();
        assert!(frames > 0);
        let cut = fuzz_log(&log[..log.len() - 1]).unwrap();
        assert_eq!(cut, frames - 1);
        assert!(fuzz_log(&log[..HEADER_SIZE - 1]).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = fuzz_sealed(&bytes);
            let _ = fuzz_log(&bytes);
        }

        /// Blocks cut from a log's row offsets are the blocks the writer
        /// cuts frame by frame: every row once, in order; a block ends at
        /// the first frame that brings it to `block_size` bytes.
        #[test]
        fn block_rows_follow_the_writers_rule(
            lens in proptest::collection::vec(1u64..3000, 0..200),
            block_size in 1usize..9000,
        ) {
            let mut offsets = Vec::new();
            let mut at = HEADER_SIZE as u64;
            for len in &lens {
                offsets.push(at);
                at += len;
            }
            let blocks = block_rows(at as usize, &offsets, block_size);
            let mut raw = 0u64;
            let mut expected = Vec::new();
            let mut first = 0;
            for (row, len) in lens.iter().enumerate() {
                raw += len;
                if raw >= block_size as u64 {
                    expected.push(first..row + 1);
                    first = row + 1;
                    raw = 0;
                }
            }
            if first < lens.len() {
                expected.push(first..lens.len());
            }
            prop_assert_eq!(blocks, expected);
        }

        #[test]
        fn truncated_segments_are_errors(cut in 0usize..4000) {
            let bytes = sealed_bytes(10, Compression::Lz4);
            let cut = cut.min(bytes.len() - 1);
            prop_assert!(fuzz_sealed(&bytes[..cut]).is_err());
        }
    }
}
