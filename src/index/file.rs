//! Index files of sealed segments (`index/NNN.idx`), read through a memory
//! map. Layout in `docs/format.md` ("Index file").

use std::borrow::Cow;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;

use memmap2::Mmap;
use roaring::RoaringBitmap;

use super::{Dim, IndexError, IndexView};

pub const IDX_MAGIC: [u8; 8] = *b"EVDBIDX\0";
pub const IDX_FOOTER_MAGIC: [u8; 8] = *b"EVDBIEND";
pub const IDX_VERSION: u16 = 1;
/// Most terms of one dimension a sealed index keeps decoded in memory.
pub const SMALL_DIM_TERMS_MAX: usize = 256;

const H_MAGIC: usize = 0;
const H_VERSION: usize = H_MAGIC + 8;
const H_SEGMENT: usize = H_VERSION + 8; // 6 zero bytes after the version
const H_CRC: usize = H_SEGMENT + 8;
const HEADER_SIZE: usize = H_CRC + 8; // 4 zero bytes after the crc

const F_ROWS: usize = 0;
const F_ENTRIES: usize = F_ROWS + 4;
const F_DIR_OFFSET: usize = F_ENTRIES + 4;
const F_MIN_TS: usize = F_DIR_OFFSET + 8;
const F_MAX_TS: usize = F_MIN_TS + 8;
const F_TS_CRC: usize = F_MAX_TS + 8;
const F_DIR_CRC: usize = F_TS_CRC + 4;
const F_CRC: usize = F_DIR_CRC + 4;
const F_MAGIC: usize = F_CRC + 8; // 4 zero bytes after the crc
const FOOTER_SIZE: usize = F_MAGIC + 8;

const E_DIM: usize = 0;
const E_TERM_LEN: usize = E_DIM + 2; // 1 zero byte after the dimension
const E_TERM_OFFSET: usize = E_TERM_LEN + 2;
const E_BITMAP_OFFSET: usize = E_TERM_OFFSET + 4;
const E_BITMAP_LEN: usize = E_BITMAP_OFFSET + 8;
const E_CRC: usize = E_BITMAP_LEN + 4;
const ENTRY_SIZE: usize = E_CRC + 4;

const _: () = assert!(HEADER_SIZE == 32);
const _: () = assert!(FOOTER_SIZE == 56);
const _: () = assert!(ENTRY_SIZE == 24);

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Writes an index file for `segment`: the timestamps of its rows (every
/// row must be present) and its terms sorted by (dimension, term).
pub fn write_index_file(
    path: &Path,
    segment: u64,
    timestamps: &[i64],
    terms: &[(Dim, &str, &RoaringBitmap)],
) -> Result<(), IndexError> {
    let io = |e| IndexError::Io {
        path: path.to_owned(),
        source: e,
    };
    debug_assert!(
        terms
            .windows(2)
            .all(|w| (w[0].0, w[0].1) < (w[1].0, w[1].1))
    );
    let tmp = path.with_extension("idx.tmp");
    let file = File::create(&tmp).map_err(io)?;
    let mut out = crate::storage::dir::PacedFile::new(file);
    let mut header = [0u8; HEADER_SIZE];
    header[H_MAGIC..H_MAGIC + 8].copy_from_slice(&IDX_MAGIC);
    header[H_VERSION..H_VERSION + 2].copy_from_slice(&IDX_VERSION.to_le_bytes());
    header[H_SEGMENT..H_SEGMENT + 8].copy_from_slice(&segment.to_le_bytes());
    let crc = crc32c::crc32c(&header[..H_CRC]);
    header[H_CRC..H_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    out.write_all(&header).map_err(io)?;
    let mut ts_bytes = Vec::with_capacity(timestamps.len() * 8);
    for t in timestamps {
        ts_bytes.extend_from_slice(&t.to_le_bytes());
    }
    out.write_all(&ts_bytes).map_err(io)?;
    let mut at = (HEADER_SIZE + ts_bytes.len()) as u64;
    let mut dir = Vec::with_capacity(terms.len() * ENTRY_SIZE);
    let mut bitmap_bytes = Vec::new();
    for (dim, term, bitmap) in terms {
        bitmap_bytes.clear();
        bitmap.serialize_into(&mut bitmap_bytes).map_err(io)?;
        let term_offset = at;
        out.write_all(term.as_bytes()).map_err(io)?;
        at += term.len() as u64;
        let bitmap_offset = at;
        out.write_all(&bitmap_bytes).map_err(io)?;
        at += bitmap_bytes.len() as u64;
        let mut e = [0u8; ENTRY_SIZE];
        e[E_DIM] = *dim as u8;
        e[E_TERM_LEN..E_TERM_LEN + 2].copy_from_slice(&(term.len() as u16).to_le_bytes());
        e[E_TERM_OFFSET..E_TERM_OFFSET + 4].copy_from_slice(&(term_offset as u32).to_le_bytes());
        e[E_BITMAP_OFFSET..E_BITMAP_OFFSET + 8].copy_from_slice(&bitmap_offset.to_le_bytes());
        e[E_BITMAP_LEN..E_BITMAP_LEN + 4]
            .copy_from_slice(&(bitmap_bytes.len() as u32).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(term.as_bytes()), &bitmap_bytes);
        e[E_CRC..E_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        dir.extend_from_slice(&e);
    }
    let dir_offset = at;
    out.write_all(&dir).map_err(io)?;
    let (min_ts, max_ts) = match (timestamps.iter().min(), timestamps.iter().max()) {
        (Some(a), Some(b)) => (*a, *b),
        _ => (0, 0),
    };
    let mut f = [0u8; FOOTER_SIZE];
    f[F_ROWS..F_ROWS + 4].copy_from_slice(&(timestamps.len() as u32).to_le_bytes());
    f[F_ENTRIES..F_ENTRIES + 4].copy_from_slice(&(terms.len() as u32).to_le_bytes());
    f[F_DIR_OFFSET..F_DIR_OFFSET + 8].copy_from_slice(&dir_offset.to_le_bytes());
    f[F_MIN_TS..F_MIN_TS + 8].copy_from_slice(&min_ts.to_le_bytes());
    f[F_MAX_TS..F_MAX_TS + 8].copy_from_slice(&max_ts.to_le_bytes());
    f[F_TS_CRC..F_TS_CRC + 4].copy_from_slice(&crc32c::crc32c(&ts_bytes).to_le_bytes());
    f[F_DIR_CRC..F_DIR_CRC + 4].copy_from_slice(&crc32c::crc32c(&dir).to_le_bytes());
    let crc = crc32c::crc32c(&f[..F_CRC]);
    f[F_CRC..F_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    f[F_MAGIC..F_MAGIC + 8].copy_from_slice(&IDX_FOOTER_MAGIC);
    out.write_all(&f).map_err(io)?;
    out.finish().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

/// The bitmaps of the small dimensions, with their terms.
type SmallTerms = Vec<(Dim, String, RoaringBitmap)>;

/// A sealed segment's index, read through a memory map. Opening checks the
/// header and footer; the directory and timestamp checksums are checked on
/// first use, each bitmap's when it is read.
pub struct SealedIndex {
    pub segment: u64,
    map: Mmap,
    rows: u32,
    entries: usize,
    dir_offset: usize,
    min_ts: i64,
    max_ts: i64,
    ts_crc: u32,
    dir_crc: u32,
    checked: OnceLock<Result<(), String>>,
    live: OnceLock<RoaringBitmap>,
    zones: OnceLock<Vec<(i64, i64)>>,
    /// Every bitmap of the small dimensions (source, type, severity, tag),
    /// loaded together on first use: a few dozen terms per segment.
    small: OnceLock<Result<SmallTerms, String>>,
}

impl std::fmt::Debug for SealedIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedIndex")
            .field("segment", &self.segment)
            .field("rows", &self.rows)
            .finish()
    }
}

impl SealedIndex {
    pub fn open(path: &Path, segment: u64) -> Result<SealedIndex, IndexError> {
        let map = crate::storage::dir::map_readonly(path).map_err(|e| IndexError::Io {
            path: path.to_owned(),
            source: e,
        })?;
        Self::from_map(map, segment)
    }

    fn from_map(map: Mmap, segment: u64) -> Result<SealedIndex, IndexError> {
        let bad = |at: usize, why: &str| IndexError::corrupted(segment, at, why);
        let b: &[u8] = &map;
        if b.len() < HEADER_SIZE + FOOTER_SIZE {
            return Err(bad(0, "file shorter than header and footer"));
        }
        if b[H_MAGIC..H_MAGIC + 8] != IDX_MAGIC {
            return Err(bad(0, "bad magic"));
        }
        if u32_at(b, H_CRC) != crc32c::crc32c(&b[..H_CRC]) || b[H_CRC + 4..HEADER_SIZE] != [0; 4] {
            return Err(bad(0, "header checksum mismatch"));
        }
        if u16_at(b, H_VERSION) != IDX_VERSION {
            return Err(bad(H_VERSION, "unsupported index version"));
        }
        if u64_at(b, H_SEGMENT) != segment {
            return Err(bad(H_SEGMENT, "index names another segment"));
        }
        let fa = b.len() - FOOTER_SIZE;
        let f = &b[fa..];
        if f[F_MAGIC..] != IDX_FOOTER_MAGIC {
            return Err(bad(fa, "bad footer magic"));
        }
        if u32_at(f, F_CRC) != crc32c::crc32c(&f[..F_CRC]) || f[F_CRC + 4..F_MAGIC] != [0; 4] {
            return Err(bad(fa, "footer checksum mismatch"));
        }
        let rows = u32_at(f, F_ROWS);
        let entries = u32_at(f, F_ENTRIES) as usize;
        let dir_offset = u64_at(f, F_DIR_OFFSET) as usize;
        let ts_end = HEADER_SIZE + rows as usize * 8;
        if dir_offset < ts_end || dir_offset.checked_add(entries * ENTRY_SIZE) != Some(fa) {
            return Err(bad(fa, "footer sections do not tile the file"));
        }
        Ok(SealedIndex {
            segment,
            rows,
            entries,
            dir_offset,
            min_ts: u64_at(f, F_MIN_TS) as i64,
            max_ts: u64_at(f, F_MAX_TS) as i64,
            ts_crc: u32_at(f, F_TS_CRC),
            dir_crc: u32_at(f, F_DIR_CRC),
            checked: OnceLock::new(),
            live: OnceLock::new(),
            zones: OnceLock::new(),
            small: OnceLock::new(),
            map,
        })
    }

    pub fn rows(&self) -> u32 {
        self.rows
    }

    /// Checks the directory and timestamp column once.
    fn check(&self) -> Result<(), IndexError> {
        let result = self.checked.get_or_init(|| {
            let ts = &self.map[HEADER_SIZE..HEADER_SIZE + self.rows as usize * 8];
            if crc32c::crc32c(ts) != self.ts_crc {
                return Err("timestamp column checksum mismatch".into());
            }
            let dir = &self.map[self.dir_offset..self.dir_offset + self.entries * ENTRY_SIZE];
            if crc32c::crc32c(dir) != self.dir_crc {
                return Err("directory checksum mismatch".into());
            }
            // Entries point inside the data area and are sorted.
            let data_end = self.dir_offset as u64;
            let mut prev: Option<(u8, &[u8])> = None;
            for i in 0..self.entries {
                let e = &dir[i * ENTRY_SIZE..(i + 1) * ENTRY_SIZE];
                let term_off = u64::from(u32_at(e, E_TERM_OFFSET));
                let term_len = u64::from(u16_at(e, E_TERM_LEN));
                let bm_off = u64_at(e, E_BITMAP_OFFSET);
                let bm_len = u64::from(u32_at(e, E_BITMAP_LEN));
                if Dim::from_u8(e[E_DIM]).is_none()
                    || term_off + term_len > data_end
                    || bm_off.saturating_add(bm_len) > data_end
                    || term_off < (HEADER_SIZE as u64)
                {
                    return Err(format!("directory entry {i} out of bounds"));
                }
                let term = &self.map[term_off as usize..(term_off + term_len) as usize];
                let key = (e[E_DIM], term);
                if prev.is_some_and(|p| p >= key) {
                    return Err(format!("directory entry {i} out of order"));
                }
                prev = Some(key);
            }
            Ok(())
        });
        result
            .as_ref()
            .map(|_| ())
            .map_err(|why| IndexError::corrupted(self.segment, self.dir_offset, why.clone()))
    }

    fn entry(&self, i: usize) -> &[u8] {
        let at = self.dir_offset + i * ENTRY_SIZE;
        &self.map[at..at + ENTRY_SIZE]
    }

    fn entry_key(&self, i: usize) -> (u8, &[u8]) {
        let e = self.entry(i);
        let off = u32_at(e, E_TERM_OFFSET) as usize;
        let len = usize::from(u16_at(e, E_TERM_LEN));
        (e[E_DIM], &self.map[off..off + len])
    }

    fn read_bitmap(&self, i: usize) -> Result<RoaringBitmap, IndexError> {
        let e = self.entry(i);
        let (_, term) = self.entry_key(i);
        let off = u64_at(e, E_BITMAP_OFFSET) as usize;
        let len = u32_at(e, E_BITMAP_LEN) as usize;
        let bytes = &self.map[off..off + len];
        if crc32c::crc32c_append(crc32c::crc32c(term), bytes) != u32_at(e, E_CRC) {
            return Err(IndexError::corrupted(
                self.segment,
                off,
                "bitmap checksum mismatch",
            ));
        }
        let bitmap = RoaringBitmap::deserialize_from(bytes)
            .map_err(|e| IndexError::corrupted(self.segment, off, format!("bitmap: {e}")))?;
        if bitmap.max().is_some_and(|m| m >= self.rows) {
            return Err(IndexError::corrupted(
                self.segment,
                off,
                "bitmap names a row past the end",
            ));
        }
        Ok(bitmap)
    }

    /// The directory range of `dim`'s entries.
    fn dim_range(&self, dim: Dim) -> std::ops::Range<usize> {
        let d = dim as u8;
        let start = partition(self.entries, |i| self.entry_key(i).0 < d);
        let end = partition(self.entries, |i| self.entry_key(i).0 <= d);
        start..end
    }

    /// Whether `dim`'s bitmaps are all loaded at first use and kept: when
    /// the segment has at most [`SMALL_DIM_TERMS_MAX`] terms of it (always
    /// true of severity; never asked of correlation ids). Other lookups
    /// binary-search the directory and read one bitmap, so memory does not
    /// grow with the number of distinct terms.
    fn is_small(&self, dim: Dim) -> bool {
        dim != Dim::Correlation && self.dim_range(dim).len() <= SMALL_DIM_TERMS_MAX
    }

    fn small(&self) -> Result<&SmallTerms, IndexError> {
        let loaded = self.small.get_or_init(|| {
            let mut out = Vec::new();
            for dim in [Dim::Source, Dim::Type, Dim::Severity, Dim::Tag] {
                if !self.is_small(dim) {
                    continue;
                }
                for i in self.dim_range(dim) {
                    let term = String::from_utf8_lossy(self.entry_key(i).1).into_owned();
                    out.push((dim, term, self.read_bitmap(i).map_err(|e| e.to_string())?));
                }
            }
            Ok(out)
        });
        loaded
            .as_ref()
            .map_err(|why| IndexError::corrupted(self.segment, self.dir_offset, why.clone()))
    }
}

/// The first index in `0..n` for which `pred` is false (pred is monotone).
fn partition(n: usize, pred: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if pred(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

impl IndexView for SealedIndex {
    fn live(&self) -> Cow<'_, RoaringBitmap> {
        Cow::Borrowed(self.live.get_or_init(|| {
            let mut b = RoaringBitmap::new();
            b.insert_range(0..self.rows);
            b
        }))
    }

    fn bitmap(&self, dim: Dim, term: &str) -> Result<Option<Cow<'_, RoaringBitmap>>, IndexError> {
        self.check()?;
        if self.is_small(dim) {
            return Ok(self
                .small()?
                .iter()
                .find(|(d, t, _)| *d == dim && t == term)
                .map(|(_, _, b)| Cow::Borrowed(b)));
        }
        let key = (dim as u8, term.as_bytes());
        let i = partition(self.entries, |i| self.entry_key(i) < key);
        if i < self.entries && self.entry_key(i) == key {
            return Ok(Some(Cow::Owned(self.read_bitmap(i)?)));
        }
        Ok(None)
    }

    fn terms(&self, dim: Dim) -> Result<Vec<(String, Cow<'_, RoaringBitmap>)>, IndexError> {
        self.check()?;
        if self.is_small(dim) {
            return Ok(self
                .small()?
                .iter()
                .filter(|(d, _, _)| *d == dim)
                .map(|(_, t, b)| (t.clone(), Cow::Borrowed(b)))
                .collect());
        }
        self.dim_range(dim)
            .map(|i| {
                let term = String::from_utf8_lossy(self.entry_key(i).1).into_owned();
                Ok((term, Cow::Owned(self.read_bitmap(i)?)))
            })
            .collect()
    }

    fn for_each_term(
        &self,
        dim: Dim,
        f: &mut dyn FnMut(&str, &RoaringBitmap),
    ) -> Result<(), IndexError> {
        self.check()?;
        if self.is_small(dim) {
            for (d, t, b) in self.small()? {
                if *d == dim {
                    f(t, b);
                }
            }
            return Ok(());
        }
        for i in self.dim_range(dim) {
            let bitmap = self.read_bitmap(i)?;
            match std::str::from_utf8(self.entry_key(i).1) {
                Ok(term) => f(term, &bitmap),
                Err(_) => f(&String::from_utf8_lossy(self.entry_key(i).1), &bitmap),
            }
        }
        Ok(())
    }

    fn rows_indexed(&self) -> u64 {
        u64::from(self.rows)
    }

    fn timestamp(&self, row: u32) -> Result<i64, IndexError> {
        self.check()?;
        if row >= self.rows {
            return Err(IndexError::corrupted(self.segment, 0, "row past the end"));
        }
        Ok(u64_at(&self.map, HEADER_SIZE + row as usize * 8) as i64)
    }

    fn time_bounds(&self) -> Option<(i64, i64)> {
        (self.rows > 0).then_some((self.min_ts, self.max_ts))
    }

    fn zones(&self) -> Result<Cow<'_, [(i64, i64)]>, IndexError> {
        self.check()?;
        Ok(Cow::Borrowed(self.zones.get_or_init(|| {
            let ts = &self.map[HEADER_SIZE..HEADER_SIZE + self.rows as usize * 8];
            super::zones_of(ts.chunks_exact(8).map(|c| u64_at(c, 0) as i64))
        })))
    }

    fn memory_bytes(&self) -> usize {
        let small: usize = self
            .small
            .get()
            .and_then(|r| r.as_ref().ok())
            .map_or(0, |v| {
                v.iter()
                    .map(|(_, t, b)| t.len() + 48 + b.serialized_size())
                    .sum()
            });
        small
            + self.live.get().map_or(0, |b| b.serialized_size())
            + self.zones.get().map_or(0, |z| z.len() * 16)
    }
}

/// Opens an index held in `data`: the entry point of the `index_open` fuzz
/// target and of the arbitrary-bytes property test.
pub fn fuzz_index(data: &[u8]) -> Result<usize, IndexError> {
    let map = crate::storage::dir::map_bytes(data).map_err(|e| IndexError::Io {
        path: "<anonymous>".into(),
        source: e,
    })?;
    let segment = if data.len() >= HEADER_SIZE {
        u64_at(data, H_SEGMENT)
    } else {
        0
    };
    if map.len() != data.len() {
        return Err(IndexError::corrupted(segment, 0, "empty input"));
    }
    let idx = SealedIndex::from_map(map, segment)?;
    let mut n = 0;
    for dim in Dim::ALL {
        for (_, b) in idx.terms(dim)? {
            n += b.len() as usize;
        }
    }
    for row in 0..idx.rows.min(16) {
        idx.timestamp(row)?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::Generator;
    use crate::index::MemIndex;

    fn file_bytes(n: usize) -> (Vec<u8>, MemIndex) {
        let mut mem = MemIndex::new();
        for (row, e) in Generator::new(3, crate::event::Timestamp(0), 10)
            .batch(n)
            .iter()
            .enumerate()
        {
            mem.insert(row as u32, e);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("5.idx");
        write_index_file(&path, 5, mem.timestamps(), &mem.sorted_terms()).unwrap();
        (std::fs::read(path).unwrap(), mem)
    }

    #[test]
    fn index_files_answer_like_the_memory_index() {
        let (bytes, mem) = file_bytes(300);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("5.idx");
        std::fs::write(&path, &bytes).unwrap();
        let file = SealedIndex::open(&path, 5).unwrap();
        assert!(SealedIndex::open(&path, 6).is_err());
        for dim in Dim::ALL {
            let mut a: Vec<_> = mem
                .terms(dim)
                .unwrap()
                .into_iter()
                .map(|(t, b)| (t, b.into_owned()))
                .collect();
            let mut b: Vec<_> = file
                .terms(dim)
                .unwrap()
                .into_iter()
                .map(|(t, b)| (t, b.into_owned()))
                .collect();
            a.sort_by(|x, y| x.0.cmp(&y.0));
            b.sort_by(|x, y| x.0.cmp(&y.0));
            assert_eq!(a, b, "{dim:?}");
            for (term, bitmap) in &a {
                assert_eq!(file.bitmap(dim, term).unwrap().unwrap().as_ref(), bitmap);
            }
            assert!(file.bitmap(dim, "no such term").unwrap().is_none());
        }
        for row in 0..300 {
            assert_eq!(file.timestamp(row).unwrap(), mem.timestamp(row).unwrap());
        }
        assert_eq!(file.time_bounds(), mem.time_bounds());
        assert!(fuzz_index(&bytes).unwrap() > 0);
    }

    #[test]
    fn every_flipped_byte_of_an_index_file_is_caught() {
        let (bytes, _) = file_bytes(12);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x21;
            assert!(
                fuzz_index(&bad).is_err(),
                "flip at {i} of {} unnoticed",
                bytes.len()
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = fuzz_index(&bytes);
        }
    }
}
