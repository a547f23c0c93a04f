//! The text filter of a sealed segment: for each group of `GROUP_BLOCKS`
//! consecutive blocks, a Bloom-style signature of the 4-byte sequences
//! (4-grams) of its rows' `data`. A `text` search needs every 4-gram of
//! its needle; a group whose signature lacks one holds no match, and its
//! blocks are never decompressed. Layout: `docs/format.md` (Sealed
//! segment, text filter).
//!
//! Signatures are built at the largest size and folded in half (the two
//! halves OR-ed: bit `h mod m` stays `h mod m/2`) down to the smallest
//! size that keeps them sparse enough to prune, chosen per segment from
//! its own data.

/// Blocks per signature.
pub const GROUP_BLOCKS: u32 = 8;
/// Largest signature, bits (also the size signatures are built at).
pub const BITS_MAX: u32 = 32_768;
/// Smallest signature, bits.
pub const BITS_MIN: u32 = 512;
/// A segment's signatures are folded while the fraction of their bits
/// set stays at most this (a needle 4-gram absent from a group then
/// passes it by chance at most this often).
const DENSITY_MAX: f64 = 0.4;
/// Bytes after the signatures: bits u32, group blocks u32, groups u32,
/// CRC-32C u32.
pub const TRAILER_SIZE: usize = 16;
/// The multiplier of the 4-gram hash (2^64 / golden ratio).
const HASH_MUL: u64 = 0x9E37_79B9_7F4A_7C15;

/// The 32-bit hash of a 4-gram (its bytes as a little-endian u32).
#[inline]
fn gram_hash(gram: u32) -> u32 {
    (u64::from(gram).wrapping_mul(HASH_MUL) >> 32) as u32
}

/// Calls `f` with the hash of each 4-gram of `bytes`.
#[inline]
fn for_each_gram(bytes: &[u8], mut f: impl FnMut(u32)) {
    // Each window is its own unaligned load: no chain from one to the next.
    for w in bytes.windows(4) {
        if let Ok(gram) = <[u8; 4]>::try_from(w) {
            f(gram_hash(u32::from_le_bytes(gram)));
        }
    }
}

/// Builds the signatures while a segment is written.
pub struct TextFilterBuilder {
    /// `BITS_MAX / 64` words per group, groups back to back.
    words: Vec<u64>,
    /// Blocks closed so far.
    blocks: u32,
}

const WORDS_MAX: usize = (BITS_MAX / 64) as usize;

impl Default for TextFilterBuilder {
    fn default() -> Self {
        TextFilterBuilder::new()
    }
}

impl TextFilterBuilder {
    pub fn new() -> TextFilterBuilder {
        TextFilterBuilder {
            words: Vec::new(),
            blocks: 0,
        }
    }

    /// Adds a row's `data` to the block being written.
    pub fn add(&mut self, data: &[u8]) {
        if data.len() < 4 {
            return;
        }
        let group = (self.blocks / GROUP_BLOCKS) as usize;
        let end = (group + 1) * WORDS_MAX;
        if self.words.len() < end {
            self.words.resize(end, 0);
        }
        let Ok(sig) = <&mut [u64; WORDS_MAX]>::try_from(&mut self.words[group * WORDS_MAX..end])
        else {
            return;
        };
        // A fixed-size signature: the index below needs no bounds check.
        for_each_gram(data, |h| {
            let bit = (h & (BITS_MAX - 1)) as usize;
            sig[bit / 64] |= 1 << (bit % 64);
        });
    }

    /// The block being written is closed; later rows go to the next one.
    pub fn end_block(&mut self) {
        self.blocks += 1;
    }

    /// The section's bytes for a segment of `blocks` blocks (the blocks
    /// closed so far): signatures folded to the segment's size, then the
    /// trailer.
    pub fn finish(mut self) -> Vec<u8> {
        let groups = self.blocks.div_ceil(GROUP_BLOCKS) as usize;
        self.words.resize(groups * WORDS_MAX, 0);
        let mut words_per_group = WORDS_MAX;
        let mut words = self.words;
        while words_per_group * 64 > BITS_MIN as usize {
            let half = words_per_group / 2;
            let ones: u64 = words
                .chunks_exact(words_per_group)
                .map(|sig| {
                    (0..half)
                        .map(|i| u64::from((sig[i] | sig[i + half]).count_ones()))
                        .sum::<u64>()
                })
                .sum();
            let bits = (groups * half * 64) as f64;
            if groups > 0 && ones as f64 / bits > DENSITY_MAX {
                break;
            }
            let mut folded = Vec::with_capacity(groups * half);
            for sig in words.chunks_exact(words_per_group) {
                folded.extend((0..half).map(|i| sig[i] | sig[i + half]));
            }
            words = folded;
            words_per_group = half;
        }
        let mut out = Vec::with_capacity(words.len() * 8 + TRAILER_SIZE);
        for w in &words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&((words_per_group * 64) as u32).to_le_bytes());
        out.extend_from_slice(&GROUP_BLOCKS.to_le_bytes());
        out.extend_from_slice(&(groups as u32).to_le_bytes());
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }
}

/// The shape of a text filter section, read from its trailer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextFilterShape {
    /// Bits per signature (a power of two).
    pub bits: u32,
    pub group_blocks: u32,
    pub groups: u32,
}

impl TextFilterShape {
    /// Reads and checks the trailer (the last `TRAILER_SIZE` bytes before
    /// the footer) of a segment of `blocks` blocks.
    pub fn decode(trailer: &[u8], blocks: usize) -> Result<TextFilterShape, &'static str> {
        let word = |i: usize| {
            trailer
                .get(i * 4..i * 4 + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
        };
        let (Some(bits), Some(group_blocks), Some(groups)) = (word(0), word(1), word(2)) else {
            return Err("text filter trailer truncated");
        };
        if !bits.is_power_of_two() || !(64..=BITS_MAX).contains(&bits) {
            return Err("text filter signature size");
        }
        if group_blocks == 0 || groups as usize != blocks.div_ceil(group_blocks as usize) {
            return Err("text filter groups do not cover the blocks");
        }
        Ok(TextFilterShape {
            bits,
            group_blocks,
            groups,
        })
    }

    /// Bytes of the whole section, trailer included.
    pub fn section_len(&self) -> usize {
        self.groups as usize * (self.bits as usize / 8) + TRAILER_SIZE
    }
}

/// The 4-gram hashes of a needle, for probing signatures. `None` when the
/// needle is shorter than a 4-gram (no group can be ruled out).
#[derive(Clone, Debug)]
pub struct Needle {
    hashes: Vec<u32>,
}

impl Needle {
    pub fn new(needle: &[u8]) -> Option<Needle> {
        if needle.len() < 4 {
            return None;
        }
        let mut hashes = Vec::with_capacity(needle.len() - 3);
        for_each_gram(needle, |h| hashes.push(h));
        hashes.sort_unstable();
        hashes.dedup();
        Some(Needle { hashes })
    }
}

/// A checked text filter section (signatures and trailer).
pub struct TextFilter<'a> {
    shape: TextFilterShape,
    signatures: &'a [u8],
}

impl<'a> TextFilter<'a> {
    /// `section`: the signatures and trailer, whose shape was decoded from
    /// the trailer; the checksum is verified here.
    pub fn check(
        section: &'a [u8],
        shape: TextFilterShape,
    ) -> Result<TextFilter<'a>, &'static str> {
        let filter = TextFilter::checked_before(section, shape)?;
        let (body, crc) = section.split_at(section.len() - 4);
        let stored = u32::from_le_bytes(crc.try_into().map_err(|_| "text filter length")?);
        if crc32c::crc32c(body) != stored {
            return Err("text filter checksum mismatch");
        }
        Ok(filter)
    }

    /// A section whose checksum [`TextFilter::check`] already verified.
    pub fn checked_before(
        section: &'a [u8],
        shape: TextFilterShape,
    ) -> Result<TextFilter<'a>, &'static str> {
        if section.len() != shape.section_len() {
            return Err("text filter length");
        }
        Ok(TextFilter {
            shape,
            signatures: &section[..section.len() - TRAILER_SIZE],
        })
    }

    pub fn shape(&self) -> TextFilterShape {
        self.shape
    }

    /// Whether group `group` may hold a row whose `data` contains the
    /// needle (false: certainly not).
    pub fn may_contain(&self, group: u32, needle: &Needle) -> bool {
        let bytes = self.shape.bits as usize / 8;
        let Some(sig) = self
            .signatures
            .get(group as usize * bytes..(group as usize + 1) * bytes)
        else {
            return true;
        };
        let mask = self.shape.bits - 1;
        needle.hashes.iter().all(|&h| {
            let bit = (h & mask) as usize;
            sig[bit / 8] & (1 << (bit % 8)) != 0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn build(groups_of_rows: &[Vec<&[u8]>]) -> Vec<u8> {
        let mut b = TextFilterBuilder::new();
        for rows in groups_of_rows {
            for r in rows {
                b.add(r);
            }
            for _ in 0..GROUP_BLOCKS {
                b.end_block();
            }
        }
        b.finish()
    }

    fn open(section: &[u8], blocks: usize) -> TextFilter<'_> {
        let shape = TextFilterShape::decode(&section[section.len() - TRAILER_SIZE..], blocks)
            .expect("shape");
        TextFilter::check(section, shape).expect("checked")
    }

    #[test]
    fn a_group_without_the_needle_is_ruled_out() {
        let rows: Vec<Vec<&[u8]>> = vec![
            vec![br#"{"user_id":"u-04242","status":"failed"}"#],
            vec![br#"{"user_id":"u-00001","status":"success"}"#],
        ];
        let section = build(&rows);
        let f = open(&section, 16);
        assert_eq!(f.shape().bits, BITS_MIN);
        let needle = Needle::new(br#""u-04242""#).expect("long enough");
        assert!(f.may_contain(0, &needle));
        assert!(!f.may_contain(1, &needle));
        assert!(Needle::new(b"u-0").is_none());
    }

    #[test]
    fn dense_data_keeps_larger_signatures() {
        let text: Vec<String> = (0..2_000).map(|i| format!("{i:08x}")).collect();
        let joined = text.join(",");
        let section = build(&[vec![joined.as_bytes()]]);
        let f = open(&section, 8);
        assert!(f.shape().bits > BITS_MIN, "{}", f.shape().bits);
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let section = build(&[vec![b"some data here"], vec![b"more data"]]);
        for i in 0..section.len() {
            let mut bad = section.clone();
            bad[i] ^= 0x20;
            let shape = TextFilterShape::decode(&bad[bad.len() - TRAILER_SIZE..], 16);
            if let Ok(shape) = shape {
                assert!(TextFilter::check(&bad, shape).is_err(), "byte {i}");
            }
        }
    }

    proptest! {
        /// No false negatives: a group holding a row that contains the
        /// needle always passes.
        #[test]
        fn no_group_holding_the_needle_is_ruled_out(
            rows in proptest::collection::vec(proptest::collection::vec(0u8..8, 0..64), 1..40),
            pick in any::<proptest::sample::Index>(),
            from in 0usize..64,
            len in 4usize..12,
        ) {
            let mut b = TextFilterBuilder::new();
            for (i, r) in rows.iter().enumerate() {
                b.add(r);
                if i % 3 == 2 {
                    b.end_block();
                }
            }
            let blocks = (rows.len() as u32).div_ceil(3);
            while b.blocks < blocks {
                b.end_block();
            }
            let section = b.finish();
            let f = open(&section, blocks as usize);
            let i = pick.index(rows.len());
            let row = &rows[i];
            if row.len() >= from + len {
                let needle = Needle::new(&row[from..from + len]).expect("4 bytes or more");
                prop_assert!(f.may_contain(i as u32 / 3 / GROUP_BLOCKS, &needle));
            }
        }

        #[test]
        fn arbitrary_trailers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64), blocks in 0usize..100) {
            let trailer = bytes.len().checked_sub(TRAILER_SIZE).map(|at| &bytes[at..]);
            if let Some(Ok(shape)) = trailer.map(|t| TextFilterShape::decode(t, blocks)) {
                let _ = TextFilter::check(&bytes, shape);
            }
        }
    }
}
