//! Event ids: their 64-bit hash, the fast read of an id from a record, and
//! the in-memory filter that keeps idempotency checks off the disk.
//!
//! The hash is XXH3-64 of the id's bytes. It is stored in sealed segments'
//! id tables, so changing it changes the format version.

use super::record::RecordError;

/// XXH3-64 of an event id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdHash(pub u64);

pub fn hash_id(id: &str) -> IdHash {
    IdHash(xxhash_rust::xxh3::xxh3_64(id.as_bytes()))
}

#[inline]
fn varint(buf: &[u8], at: &mut usize) -> Result<u64, RecordError> {
    let mut value = 0u64;
    let mut shift = 0u32;
    while let Some(&byte) = buf.get(*at) {
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
        shift += 7;
        if shift >= 64 {
            return Err(RecordError::Decode("varint too long".into()));
        }
    }
    Err(RecordError::Decode("truncated varint".into()))
}

/// One top-level field of a protobuf message.
enum FieldValue<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// Reads the field at `*at` (its number and value) and moves past it.
#[inline]
fn next_field<'a>(buf: &'a [u8], at: &mut usize) -> Result<(u64, FieldValue<'a>), RecordError> {
    let key = varint(buf, at)?;
    let (field, wire) = (key >> 3, key & 7);
    let value = match wire {
        0 => FieldValue::Varint(varint(buf, at)?),
        2 => {
            let len = varint(buf, at)? as usize;
            let end = at
                .checked_add(len)
                .filter(|&e| e <= buf.len())
                .ok_or_else(|| RecordError::Decode("length past the end".into()))?;
            let bytes = &buf[*at..end];
            *at = end;
            FieldValue::Bytes(bytes)
        }
        1 | 5 => {
            *at += if wire == 1 { 8 } else { 4 };
            if *at > buf.len() {
                return Err(RecordError::Decode("fixed field past the end".into()));
            }
            FieldValue::Fixed
        }
        _ => return Err(RecordError::Decode(format!("wire type {wire}"))),
    };
    Ok((field, value))
}

/// The `data` text (field 8) of a `RecordV1` without decoding the rest:
/// the bytes a `text` filter searches (the last occurrence, as a decode
/// would keep it); empty when the record has none.
pub fn peek_data(payload: &[u8]) -> Result<&[u8], RecordError> {
    let mut at = 0usize;
    let mut data: &[u8] = &[];
    while at < payload.len() {
        if let (8, FieldValue::Bytes(bytes)) = next_field(payload, &mut at)? {
            data = bytes;
        }
    }
    Ok(data)
}

/// Reads the id (field 1) and timestamp (field 2) of a `RecordV1` without
/// decoding the rest.
pub fn peek_id_and_timestamp(payload: &[u8]) -> Result<(&str, i64), RecordError> {
    let mut at = 0usize;
    let mut id: &str = "";
    let mut ts = 0i64;
    while at < payload.len() {
        let (field, value) = next_field(payload, &mut at)?;
        match (field, value) {
            // sint64: zig-zag.
            (2, FieldValue::Varint(v)) => ts = ((v >> 1) as i64) ^ -((v & 1) as i64),
            (1, FieldValue::Bytes(bytes)) => {
                id = std::str::from_utf8(bytes)
                    .map_err(|_| RecordError::Decode("id is not UTF-8".into()))?;
            }
            _ => {}
        }
        // Fields 1 and 2 come first in every record evdb writes; stop early.
        if field > 2 {
            break;
        }
    }
    Ok((id, ts))
}

/// Slots of an [`IdTable`] at the smallest.
const TABLE_MIN_SLOTS: usize = 16;

/// The rows of an open segment by id hash, for the writer's idempotency
/// check of every appended event and for get-by-id.
///
/// Open addressing with linear probing, one `u64` per slot: the hash's
/// high 32 bits (its fingerprint) above the row + 1 (0 marks an empty
/// slot). A hash's home slot is the top bits of its fingerprint, so the
/// table grows without keeping whole hashes, and a lookup reads one
/// cache line in most cases: half the bytes of a `HashMap<u64, u32>` and
/// one cache miss instead of two (its control bytes and its entries lie
/// apart), which is what the check costs on a table of a segment's size.
/// Every row whose fingerprint matches is returned, so callers compare
/// the ids themselves (as they must for whole hashes too).
#[derive(Debug, Clone)]
pub struct IdTable {
    slots: Vec<u64>,
    /// log2 of the slot count.
    bits: u32,
    len: usize,
}

impl Default for IdTable {
    fn default() -> Self {
        IdTable::with_capacity(0)
    }
}

impl IdTable {
    /// A table that takes `rows` rows without growing.
    pub fn with_capacity(rows: usize) -> IdTable {
        // At most 70 % full.
        let slots = (rows.saturating_mul(10) / 7 + 1)
            .next_power_of_two()
            .max(TABLE_MIN_SLOTS);
        IdTable {
            slots: vec![0; slots],
            bits: slots.trailing_zeros(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn home(&self, fingerprint: u32) -> usize {
        (u64::from(fingerprint) >> (32 - self.bits)) as usize
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// Notes that `row` holds an id of this hash. Rows of a segment stay
    /// below `u32::MAX` (a segment holds at most 4 GiB of frames).
    pub fn insert(&mut self, hash: IdHash, row: u32) {
        assert!(row < u32::MAX, "row {row} out of an id table's range");
        if (self.len + 1) * 10 > self.slots.len() * 7 {
            self.grow();
        }
        self.place(((hash.0 >> 32) << 32) | (u64::from(row) + 1));
        self.len += 1;
    }

    fn place(&mut self, slot: u64) {
        let mask = self.mask();
        let mut at = self.home((slot >> 32) as u32);
        while self.slots[at] != 0 {
            at = (at + 1) & mask;
        }
        self.slots[at] = slot;
    }

    fn grow(&mut self) {
        let doubled = vec![0; self.slots.len() * 2];
        let old = std::mem::replace(&mut self.slots, doubled);
        self.bits += 1;
        for slot in old.into_iter().filter(|&s| s != 0) {
            self.place(slot);
        }
    }

    /// The slot a lookup of `hash` reads first. Reading it for a run of
    /// ids before looking them up lets their cache misses overlap: a
    /// lookup of a segment-sized table otherwise waits for memory on
    /// every id (`Writer::append_group`).
    pub fn home_slot(&self, hash: IdHash) -> u64 {
        self.slots[self.home((hash.0 >> 32) as u32)]
    }

    /// The rows whose id hash may be `hash`, in no particular order.
    pub fn rows(&self, hash: IdHash) -> impl Iterator<Item = u32> + '_ {
        let fingerprint = (hash.0 >> 32) as u32;
        let mask = self.mask();
        let mut at = self.home(fingerprint);
        std::iter::from_fn(move || {
            loop {
                let slot = self.slots[at];
                if slot == 0 {
                    return None;
                }
                at = (at + 1) & mask;
                if (slot >> 32) as u32 == fingerprint {
                    return Some((slot as u32).wrapping_sub(1));
                }
            }
        })
    }
}

const BLOCK_BITS: usize = 512;
const WORDS_PER_BLOCK: usize = BLOCK_BITS / 64;
const PROBES: u32 = 6;
/// Bits per id at the filter's capacity: with 6 probes in a 512-bit block
/// this gives a false-positive rate near 1 %.
const BITS_PER_ID: usize = 12;

/// A blocked Bloom filter over id hashes: one cache line per lookup.
///
/// False positives only cost a look into the sealed segments' id tables;
/// a false negative is impossible, so a "no" lets an append skip the disk.
#[derive(Debug, Clone)]
pub struct IdFilter {
    words: Vec<u64>,
    block_mask: usize,
    len: usize,
    capacity: usize,
}

impl IdFilter {
    pub fn with_capacity(ids: usize) -> IdFilter {
        let bits = (ids.max(1 << 14) * BITS_PER_ID).next_power_of_two();
        let blocks = bits / BLOCK_BITS;
        IdFilter {
            words: vec![0; blocks * WORDS_PER_BLOCK],
            block_mask: blocks - 1,
            len: 0,
            capacity: bits / BITS_PER_ID,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether more ids were added than the filter was sized for (its
    /// false-positive rate then climbs; rebuild it larger).
    pub fn is_over_capacity(&self) -> bool {
        self.len > self.capacity
    }

    fn probes(&self, hash: IdHash) -> (usize, impl Iterator<Item = u32> + use<>) {
        let block = (hash.0 as usize) & self.block_mask;
        let mut h = (hash.0 >> 32) as u32 | 1;
        let step = (hash.0.rotate_left(17) as u32) | 1;
        let bits = (0..PROBES).map(move |_| {
            h = h.wrapping_add(step);
            h % BLOCK_BITS as u32
        });
        (block * WORDS_PER_BLOCK, bits)
    }

    pub fn insert(&mut self, hash: IdHash) {
        let (base, bits) = self.probes(hash);
        for bit in bits {
            self.words[base + (bit / 64) as usize] |= 1 << (bit % 64);
        }
        self.len += 1;
    }

    /// The first word of the block `hash` maps to (the block is one
    /// cache line): read ahead of [`IdFilter::may_contain`] like
    /// [`IdTable::home_slot`].
    pub fn block_word(&self, hash: IdHash) -> u64 {
        self.words[self.probes(hash).0]
    }

    pub fn may_contain(&self, hash: IdHash) -> bool {
        let (base, mut bits) = self.probes(hash);
        bits.all(|bit| self.words[base + (bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }

    pub fn memory_bytes(&self) -> usize {
        self.words.len() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;

    #[test]
    fn peek_reads_what_encode_wrote() {
        let mut e = Event::new("s", "t");
        e.timestamp = crate::event::Timestamp(-1_234_567);
        let mut buf = Vec::new();
        crate::storage::record::encode(&e, &mut buf);
        let (id, ts) = peek_id_and_timestamp(&buf).unwrap();
        assert_eq!(id, e.id);
        assert_eq!(ts, -1_234_567);
        for cut in 0..buf.len() {
            let _ = peek_id_and_timestamp(&buf[..cut]);
        }
    }

    #[test]
    fn peek_data_reads_the_data_field_of_any_record() {
        let mut e = crate::generator::Generator::new(3, crate::event::Timestamp(0), 1).next_event();
        let mut buf = Vec::new();
        crate::storage::record::encode(&e, &mut buf);
        assert_eq!(peek_data(&buf).unwrap(), e.data.as_str().as_bytes());
        e.data = crate::event::JsonObject::parse("{}").unwrap();
        e.native = None;
        buf.clear();
        crate::storage::record::encode(&e, &mut buf);
        assert_eq!(peek_data(&buf).unwrap(), b"{}");
        for cut in 0..buf.len() {
            let _ = peek_data(&buf[..cut]);
        }
    }

    #[test]
    fn filter_has_no_false_negatives_and_few_positives() {
        let mut f = IdFilter::with_capacity(100_000);
        for i in 0..100_000u64 {
            f.insert(hash_id(&format!("id-{i}")));
        }
        assert!(!f.is_over_capacity());
        for i in 0..100_000u64 {
            assert!(f.may_contain(hash_id(&format!("id-{i}"))));
        }
        let false_positives = (0..100_000u64)
            .filter(|i| f.may_contain(hash_id(&format!("other-{i}"))))
            .count();
        assert!(false_positives < 3_000, "{false_positives} false positives");
    }

    #[test]
    fn id_table_finds_every_row_of_a_hash_across_growth() {
        let mut t = IdTable::with_capacity(0);
        let mut model: std::collections::HashMap<u64, Vec<u32>> = Default::default();
        for row in 0..50_000u32 {
            // Every 7th row repeats an earlier hash (a collision).
            let hash = if row % 7 == 6 {
                hash_id(&format!("id-{}", row / 2))
            } else {
                hash_id(&format!("id-{row}"))
            };
            t.insert(hash, row);
            model.entry(hash.0).or_default().push(row);
        }
        assert_eq!(t.len(), 50_000);
        for (&hash, rows) in &model {
            let mut found: Vec<u32> = t.rows(IdHash(hash)).collect();
            found.sort_unstable();
            // A fingerprint shared by another hash adds candidates, never
            // hides one.
            assert!(rows.iter().all(|r| found.contains(r)), "{hash:x}");
        }
        let strays = (0..10_000u64)
            .filter(|i| t.rows(hash_id(&format!("other-{i}"))).next().is_some())
            .count();
        assert_eq!(strays, 0);
    }

    #[test]
    fn id_table_keeps_rows_whose_fingerprints_collide() {
        let mut t = IdTable::with_capacity(4);
        let a = IdHash(0xdead_beef_0000_0001);
        let b = IdHash(0xdead_beef_ffff_0002);
        t.insert(a, 0);
        t.insert(b, u32::MAX - 1);
        let mut rows: Vec<u32> = t.rows(a).collect();
        rows.sort_unstable();
        assert_eq!(rows, vec![0, u32::MAX - 1]);
        assert_eq!(t.rows(IdHash(0x1234_0000_0000_0000)).count(), 0);
    }

    proptest::proptest! {
        #[test]
        fn peek_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128)) {
            let _ = peek_id_and_timestamp(&bytes);
        }
    }
}
