//! Numeric columns: the value at a declared JSON pointer of each row's
//! `data`, extracted at ingest (in memory for open segments) and written
//! beside the index when a segment is sealed (`index/N.num`, layout in
//! `docs/format.md`), so aggregations read numbers without parsing JSON.
//!
//! A row without a number at the pointer (absent, or not a JSON number)
//! holds NaN, which every reader takes as "no value".

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use memmap2::Mmap;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::IndexError;

pub const NUM_MAGIC: [u8; 8] = *b"EVDBNUM\0";
pub const NUM_FOOTER_MAGIC: [u8; 8] = *b"EVDBNEND";
pub const NUM_VERSION: u16 = 1;
/// Longest JSON pointer a column may be declared for.
pub const POINTER_MAX: usize = 256;

const HEADER_SIZE: usize = 32;
/// Summaries are kept only for (term, field) pairs with more values than
/// this: smaller groups get exact percentiles from the rows instead.
pub const EXACT_VALUES_MAX: usize = 1024;
/// The `dim` byte of a summary over every row of the segment.
pub const SUMMARY_ALL: u8 = 255;

/// Count, sum, min, max and a DDSketch of one field's values over the rows
/// of one term (or of the whole segment), computed when the segment is
/// sealed.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    /// The DDSketch in its Java-compatible encoding.
    pub sketch: Vec<u8>,
}

/// A summary read from a numeric file.
#[derive(Clone, Copy, Debug)]
pub struct SummaryRef<'a> {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub sketch: &'a [u8],
}

/// The sketch configuration of every percentile sketch: 1 % relative
/// accuracy, 2,048 bins.
pub fn new_sketch() -> sketches_ddsketch::DDSketch {
    sketches_ddsketch::DDSketch::new(sketches_ddsketch::Config::defaults())
}

/// The summary of `values` over `rows`, when they hold more than
/// [`EXACT_VALUES_MAX`] values.
pub fn summarize(values: &[f64], rows: impl Iterator<Item = u32>) -> Option<Summary> {
    let mut sketch = new_sketch();
    let (mut count, mut sum, mut min, mut max) = (0u64, 0.0, f64::INFINITY, f64::NEG_INFINITY);
    for r in rows {
        let Some(v) = values.get(r as usize).copied().filter(|v| !v.is_nan()) else {
            continue;
        };
        count += 1;
        sum += v;
        min = min.min(v);
        max = max.max(v);
        sketch.add(v);
    }
    (count as usize > EXACT_VALUES_MAX).then(|| Summary {
        count,
        sum,
        min,
        max,
        sketch: sketch.to_java_bytes(),
    })
}

/// Checks a JSON pointer (RFC 6901): empty is refused (the whole object is
/// never a number), otherwise it starts with `/`.
pub fn check_pointer(pointer: &str) -> Result<(), String> {
    if !pointer.starts_with('/') {
        return Err(format!(
            "{pointer:?} is not a JSON pointer: it must start with '/', as in /latency_ms"
        ));
    }
    if pointer.len() > POINTER_MAX {
        return Err(format!("longer than {POINTER_MAX} bytes"));
    }
    let mut chars = pointer.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.peek(), Some('0' | '1')) {
            return Err(format!("{pointer:?}: '~' must be followed by 0 or 1"));
        }
    }
    Ok(())
}

/// The reference tokens of a pointer, unescaped.
fn tokens(pointer: &str) -> impl Iterator<Item = String> + '_ {
    pointer
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
}

/// Finds one key of an object (or one index of an array) without building
/// the object: every other value is skipped.
struct Find<'k>(&'k str);

struct KeyIs<'k>(&'k str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
}

impl<'de> Visitor<'de> for Find<'_> {
    type Value = Option<&'de RawValue>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object or an array")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(hit) = map.next_key_seed(KeyIs(self.0))? {
            if hit && found.is_none() {
                found = Some(map.next_value::<&RawValue>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let want = self.0.parse::<usize>().ok();
        let mut found = None;
        let mut i = 0usize;
        while found.is_none() {
            if Some(i) == want {
                match seq.next_element::<&RawValue>()? {
                    Some(v) => found = Some(v),
                    None => return Ok(None),
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(None);
            }
            i += 1;
        }
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(found)
    }
    // Scalars have no members.
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// The JSON text at `pointer` in `json`, if present.
pub fn value_at<'a>(json: &'a str, pointer: &str) -> Option<&'a str> {
    let mut at: &'a str = json;
    for token in tokens(pointer) {
        let mut de = serde_json::Deserializer::from_str(at);
        let raw = de.deserialize_any(Find(&token)).ok()??;
        at = raw.get();
    }
    Some(at)
}

/// The number at `pointer` in `json`: a JSON number only (not a numeric
/// string), finite.
pub fn number_at(json: &str, pointer: &str) -> Option<f64> {
    let text = value_at(json, pointer)?;
    let first = text.as_bytes().first()?;
    if !(first.is_ascii_digit() || *first == b'-') {
        return None;
    }
    text.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// The value at `pointer` as a group key: a string's contents, a number,
/// `true`/`false`, or the JSON text of an object or array; `null` and
/// absence give `None`.
pub fn key_at(json: &str, pointer: &str) -> Option<String> {
    let text = value_at(json, pointer)?;
    match text.as_bytes().first()? {
        b'"' => serde_json::from_str::<String>(text).ok(),
        b'n' => None,
        b'-' | b'0'..=b'9' => text.parse::<f64>().ok().map(format_number),
        _ => Some(text.to_owned()),
    }
}

/// How a number is shown as a group key (`200`, not `200.0`).
pub fn format_number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// One declared column of a segment, in memory or in its file.
#[derive(Clone, Copy, Debug)]
pub enum Column<'a> {
    Mem(&'a [f64]),
    /// Little-endian f64s.
    File(&'a [u8]),
}

impl Column<'_> {
    /// The value of `row`, None when the row has none.
    #[inline]
    pub fn get(&self, row: u32) -> Option<f64> {
        let i = row as usize;
        let v = match self {
            Column::Mem(s) => *s.get(i)?,
            Column::File(b) => {
                let bytes = b.get(i * 8..i * 8 + 8)?;
                let mut x = [0u8; 8];
                x.copy_from_slice(bytes);
                f64::from_le_bytes(x)
            }
        };
        (!v.is_nan()).then_some(v)
    }
}

/// Writes `index/N.num`: one column of `rows` values per pointer.
pub fn write_numeric_file(
    path: &Path,
    segment: u64,
    rows: u32,
    columns: &[(&str, &[f64])],
    summaries: &[(u16, u8, &str, Summary)],
) -> Result<(), IndexError> {
    let io = |e| IndexError::Io {
        path: path.to_owned(),
        source: e,
    };
    let tmp = path.with_extension("num.tmp");
    let file = File::create(&tmp).map_err(io)?;
    let mut out = crate::storage::dir::PacedFile::new(file);
    let mut h = [0u8; HEADER_SIZE];
    h[0..8].copy_from_slice(&NUM_MAGIC);
    h[8..10].copy_from_slice(&NUM_VERSION.to_le_bytes());
    h[10..12].copy_from_slice(&(columns.len() as u16).to_le_bytes());
    h[12..16].copy_from_slice(&rows.to_le_bytes());
    h[16..24].copy_from_slice(&segment.to_le_bytes());
    let crc = crc32c::crc32c(&h[..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    out.write_all(&h).map_err(io)?;
    let mut bytes = Vec::with_capacity(rows as usize * 8);
    for (pointer, values) in columns {
        debug_assert_eq!(values.len(), rows as usize);
        bytes.clear();
        for v in values.iter().take(rows as usize) {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        bytes.resize(rows as usize * 8, 0);
        let name = pointer.as_bytes();
        out.write_all(&(name.len() as u16).to_le_bytes())
            .map_err(io)?;
        out.write_all(name).map_err(io)?;
        out.write_all(&bytes).map_err(io)?;
        let crc = crc32c::crc32c_append(crc32c::crc32c(name), &bytes);
        out.write_all(&crc.to_le_bytes()).map_err(io)?;
    }
    let mut section = Vec::new();
    section.extend_from_slice(&(summaries.len() as u32).to_le_bytes());
    for (column, dim, term, sm) in summaries {
        section.extend_from_slice(&column.to_le_bytes());
        section.push(*dim);
        section.extend_from_slice(&(term.len() as u16).to_le_bytes());
        section.extend_from_slice(term.as_bytes());
        section.extend_from_slice(&sm.count.to_le_bytes());
        for x in [sm.sum, sm.min, sm.max] {
            section.extend_from_slice(&x.to_le_bytes());
        }
        section.extend_from_slice(&(sm.sketch.len() as u32).to_le_bytes());
        section.extend_from_slice(&sm.sketch);
    }
    let crc = crc32c::crc32c(&section);
    out.write_all(&section).map_err(io)?;
    out.write_all(&crc.to_le_bytes()).map_err(io)?;
    out.write_all(&NUM_FOOTER_MAGIC).map_err(io)?;
    out.finish().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

/// A sealed segment's numeric columns, read through a memory map and
/// checked whole when opened.
pub struct NumericFile {
    map: Mmap,
    rows: u32,
    /// (pointer, byte range of its values).
    columns: Vec<(String, std::ops::Range<usize>)>,
    /// (column, dim byte, term) → where its summary starts.
    summaries: rustc_hash::FxHashMap<(u16, u8, String), usize>,
}

impl fmt::Debug for NumericFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NumericFile")
            .field("rows", &self.rows)
            .field("columns", &self.columns.len())
            .finish()
    }
}

impl NumericFile {
    pub fn open(path: &Path, segment: u64) -> Result<NumericFile, IndexError> {
        let map = crate::storage::dir::map_readonly(path).map_err(|e| IndexError::Io {
            path: path.to_owned(),
            source: e,
        })?;
        Self::from_map(map, segment)
    }

    fn from_map(map: Mmap, segment: u64) -> Result<NumericFile, IndexError> {
        let (rows, columns, summaries) = parse(&map, segment)?;
        Ok(NumericFile {
            map,
            rows,
            columns,
            summaries,
        })
    }

    pub fn rows(&self) -> u32 {
        self.rows
    }

    pub fn pointers(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().map(|(p, _)| p.as_str())
    }

    pub fn column(&self, pointer: &str) -> Option<Column<'_>> {
        self.columns
            .iter()
            .find(|(p, _)| p == pointer)
            .map(|(_, r)| Column::File(&self.map[r.clone()]))
    }

    /// The summary of `pointer` over the rows of (`dim`, `term`), or over
    /// every row with [`SUMMARY_ALL`]; None when the segment has none
    /// (too few values, or too many terms in that dimension).
    pub fn summary(&self, pointer: &str, dim: u8, term: &str) -> Option<SummaryRef<'_>> {
        let column = self.columns.iter().position(|(p, _)| p == pointer)? as u16;
        let at = *self.summaries.get(&(column, dim, term.to_owned()))?;
        read_summary(&self.map, at).map(|(_, _, _, r, _)| r)
    }
}

type Columns = Vec<(String, std::ops::Range<usize>)>;
type Summaries = rustc_hash::FxHashMap<(u16, u8, String), usize>;

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let mut x = [0u8; 8];
    x.copy_from_slice(b.get(at..at + 8)?);
    Some(u64::from_le_bytes(x))
}

/// One summary entry at `at`: (column, dim, term, summary, next offset).
fn read_summary(b: &[u8], at: usize) -> Option<(u16, u8, &str, SummaryRef<'_>, usize)> {
    let column = u16::from_le_bytes([*b.get(at)?, *b.get(at + 1)?]);
    let dim = *b.get(at + 2)?;
    let term_len = usize::from(u16::from_le_bytes([*b.get(at + 3)?, *b.get(at + 4)?]));
    let term = std::str::from_utf8(b.get(at + 5..at + 5 + term_len)?).ok()?;
    let mut p = at + 5 + term_len;
    let count = u64_at(b, p)?;
    let sum = f64::from_bits(u64_at(b, p + 8)?);
    let min = f64::from_bits(u64_at(b, p + 16)?);
    let max = f64::from_bits(u64_at(b, p + 24)?);
    p += 32;
    let len = u32::from_le_bytes(b.get(p..p + 4)?.try_into().ok()?) as usize;
    let sketch = b.get(p + 4..p + 4 + len)?;
    Some((
        column,
        dim,
        term,
        SummaryRef {
            count,
            sum,
            min,
            max,
            sketch,
        },
        p + 4 + len,
    ))
}

/// Checks every byte of a numeric file: header, each column's checksum,
/// the footer and that the sections tile the file.
fn parse(b: &[u8], segment: u64) -> Result<(u32, Columns, Summaries), IndexError> {
    let bad = |at: usize, why: &str| IndexError::corrupted(segment, at, why);
    if b.len() < HEADER_SIZE + NUM_FOOTER_MAGIC.len() {
        return Err(bad(0, "numeric file shorter than header and footer"));
    }
    if b[0..8] != NUM_MAGIC {
        return Err(bad(0, "bad numeric file magic"));
    }
    let crc = u32::from_le_bytes([b[24], b[25], b[26], b[27]]);
    if crc != crc32c::crc32c(&b[..24]) || b[28..32] != [0; 4] {
        return Err(bad(0, "numeric file header checksum mismatch"));
    }
    if u16::from_le_bytes([b[8], b[9]]) != NUM_VERSION {
        return Err(bad(8, "unsupported numeric file version"));
    }
    let count = usize::from(u16::from_le_bytes([b[10], b[11]]));
    let rows = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
    let mut seg = [0u8; 8];
    seg.copy_from_slice(&b[16..24]);
    if u64::from_le_bytes(seg) != segment {
        return Err(bad(16, "numeric file names another segment"));
    }
    let end = b.len() - NUM_FOOTER_MAGIC.len();
    if b[end..] != NUM_FOOTER_MAGIC {
        return Err(bad(end, "bad numeric file footer"));
    }
    let width = rows as usize * 8;
    let mut at = HEADER_SIZE;
    let mut columns = Vec::with_capacity(count);
    for _ in 0..count {
        let name_len = match b.get(at..at + 2) {
            Some(x) => usize::from(u16::from_le_bytes([x[0], x[1]])),
            None => return Err(bad(at, "column runs past the end")),
        };
        let name_at = at + 2;
        let values_at = name_at + name_len;
        let crc_at = values_at + width;
        if crc_at + 4 > end {
            return Err(bad(at, "column runs past the end"));
        }
        let name = std::str::from_utf8(&b[name_at..values_at])
            .map_err(|_| bad(name_at, "column name is not UTF-8"))?;
        let want = u32::from_le_bytes([b[crc_at], b[crc_at + 1], b[crc_at + 2], b[crc_at + 3]]);
        let got = crc32c::crc32c_append(crc32c::crc32c(name.as_bytes()), &b[values_at..crc_at]);
        if want != got {
            return Err(bad(at, "column checksum mismatch"));
        }
        columns.push((name.to_owned(), values_at..crc_at));
        at = crc_at + 4;
    }
    // The summaries section: a count, the entries, a checksum.
    if at + 8 > end {
        return Err(bad(at, "summaries section runs past the end"));
    }
    let section_crc_at = end - 4;
    let crc = u32::from_le_bytes([
        b[section_crc_at],
        b[section_crc_at + 1],
        b[section_crc_at + 2],
        b[section_crc_at + 3],
    ]);
    if crc != crc32c::crc32c(&b[at..section_crc_at]) {
        return Err(bad(at, "summaries checksum mismatch"));
    }
    let n = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize;
    let section = &b[..section_crc_at];
    let mut p = at + 4;
    let mut summaries = Summaries::default();
    for _ in 0..n {
        let Some((column, dim, term, _, next)) = read_summary(section, p) else {
            return Err(bad(p, "summary runs past the end"));
        };
        if usize::from(column) >= columns.len() {
            return Err(bad(p, "summary names no column"));
        }
        summaries.insert((column, dim, term.to_owned()), p);
        p = next;
    }
    if p != section_crc_at {
        return Err(bad(p, "numeric file sections do not tile the file"));
    }
    Ok((rows, columns, summaries))
}

/// Checks arbitrary bytes as a numeric file of segment 0 (the fuzz entry
/// point): an error or the number of columns, never a panic.
pub fn fuzz_numeric(data: &[u8]) -> Result<usize, IndexError> {
    parse(data, 0).map(|(_, c, s)| c.len() + s.len())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn pointers_find_numbers_without_building_objects() {
        let j =
            r#"{"a":1,"latency_ms":12.5,"n":{"x/y":[3,4,{"z":-7}]},"s":"9","t":true,"nul":null}"#;
        assert_eq!(number_at(j, "/latency_ms"), Some(12.5));
        assert_eq!(number_at(j, "/a"), Some(1.0));
        assert_eq!(number_at(j, "/n/x~1y/1"), Some(4.0));
        assert_eq!(number_at(j, "/n/x~1y/2/z"), Some(-7.0));
        assert_eq!(number_at(j, "/s"), None, "a numeric string is not a number");
        assert_eq!(number_at(j, "/t"), None);
        assert_eq!(number_at(j, "/missing"), None);
        assert_eq!(number_at(j, "/n/x~1y/9"), None);
        assert_eq!(number_at(j, "/a/b"), None);
        assert_eq!(key_at(j, "/s").as_deref(), Some("9"));
        assert_eq!(key_at(j, "/a").as_deref(), Some("1"));
        assert_eq!(key_at(j, "/latency_ms").as_deref(), Some("12.5"));
        assert_eq!(key_at(j, "/t").as_deref(), Some("true"));
        assert_eq!(key_at(j, "/nul"), None);
        assert_eq!(number_at("not json", "/a"), None);
    }

    #[test]
    fn pointer_checks() {
        assert!(check_pointer("/latency_ms").is_ok());
        assert!(check_pointer("/a~1b/c~0").is_ok());
        assert!(check_pointer("latency_ms").is_err());
        assert!(check_pointer("").is_err());
        assert!(check_pointer("/a~2").is_err());
    }

    #[test]
    fn files_round_trip_and_catch_every_flipped_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.num");
        let a = [1.0, f64::NAN, 3.5];
        let b = [f64::NAN, -2.0, 0.0];
        let many: Vec<f64> = (0..2000).map(f64::from).collect();
        let sm = summarize(&many, 0..2000).unwrap();
        assert!(summarize(&many, 0..1000).is_none(), "small groups get none");
        assert_eq!(
            (sm.count, sm.sum, sm.min, sm.max),
            (2000, 1_999_000.0, 0.0, 1999.0)
        );
        write_numeric_file(
            &path,
            1,
            3,
            &[("/a", &a), ("/b", &b)],
            &[(1, 2, "info", sm.clone())],
        )
        .unwrap();
        let f = NumericFile::open(&path, 1).unwrap();
        let col = f.column("/a").unwrap();
        assert_eq!(
            (col.get(0), col.get(1), col.get(2)),
            (Some(1.0), None, Some(3.5))
        );
        let col = f.column("/b").unwrap();
        assert_eq!(
            (col.get(0), col.get(1), col.get(2)),
            (None, Some(-2.0), Some(0.0))
        );
        assert!(f.column("/c").is_none());
        let got = f.summary("/b", 2, "info").unwrap();
        assert_eq!((got.count, got.sum), (2000, 1_999_000.0));
        assert_eq!(got.sketch, &sm.sketch[..]);
        assert!(f.summary("/a", 2, "info").is_none());
        assert!(NumericFile::open(&path, 2).is_err());
        let bytes = std::fs::read(&path).unwrap();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(parse(&b, 1).is_err(), "flip at {i} went unnoticed");
        }
        for n in 0..bytes.len() {
            assert!(parse(&bytes[..n], 1).is_err());
        }
    }
}
