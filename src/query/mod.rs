//! `query/`: the filter model of contract §3, the planner (which segments,
//! which bitmaps), the executor (top-k by timestamp across segments) and
//! stats from bitmap cardinalities.
//!
//! Order is by (timestamp, arrival number) — descending by default. A
//! cursor carries the last key returned and the arrival watermark of the
//! first page, so paging under concurrent ingest never repeats or skips an
//! event of that snapshot.

pub mod aggregate;

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashSet};

use roaring::RoaringBitmap;

use crate::event::{Event, Severity, Timestamp};
use crate::index::{Dim, IndexError, IndexView, ZONE_ROWS, severity_term};

/// Most results one query returns.
pub const QUERY_LIMIT_MAX: usize = 1000;
pub const QUERY_LIMIT_DEFAULT: usize = 100;
/// Deepest `offset` accepted: past it, use the cursor.
pub const QUERY_OFFSET_MAX: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Order {
    #[default]
    Desc,
    Asc,
}

/// The filters of contract §3.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// Any of.
    pub sources: Vec<String>,
    /// Any of.
    pub types: Vec<String>,
    pub severity: Option<Severity>,
    pub min_severity: Option<Severity>,
    /// Any of (empty: no filter); combines with `severity` and
    /// `min_severity` by AND.
    pub severities: Vec<Severity>,
    pub correlation_id: Option<String>,
    /// All of.
    pub tags: Vec<String>,
    /// Any of (empty: no filter): at least one of these tags.
    pub any_tags: Vec<String>,
    /// Inclusive.
    pub start: Option<Timestamp>,
    /// Inclusive.
    pub end: Option<Timestamp>,
    /// Substring of the event's `data` text.
    pub text: Option<String>,
    pub limit: usize,
    pub offset: usize,
    pub order: Order,
    pub cursor: Option<Cursor>,
}

impl Default for Query {
    fn default() -> Self {
        Query {
            sources: Vec::new(),
            types: Vec::new(),
            severity: None,
            min_severity: None,
            severities: Vec::new(),
            correlation_id: None,
            tags: Vec::new(),
            any_tags: Vec::new(),
            start: None,
            end: None,
            text: None,
            limit: QUERY_LIMIT_DEFAULT,
            offset: 0,
            order: Order::Desc,
            cursor: None,
        }
    }
}

/// Errors of the query layer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> QueryError {
    QueryError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// A position in a result order: the sort key of the last event returned
/// and the arrival watermark of the first page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub timestamp_us: i64,
    pub seq: u64,
    pub watermark: u64,
    pub order: Order,
}

impl Cursor {
    /// An opaque, URL-safe text.
    pub fn encode(&self) -> String {
        let o = match self.order {
            Order::Desc => 'd',
            Order::Asc => 'a',
        };
        format!(
            "1{o}{:016x}{:016x}{:016x}",
            self.timestamp_us as u64, self.seq, self.watermark
        )
    }

    pub fn decode(text: &str) -> Result<Cursor, QueryError> {
        let bad = || invalid("cursor", "not a cursor returned by this server");
        if text.len() != 50 || !text.is_ascii() {
            return Err(bad());
        }
        let order = match &text[..2] {
            "1d" => Order::Desc,
            "1a" => Order::Asc,
            _ => return Err(bad()),
        };
        let hex = |s: &str| u64::from_str_radix(s, 16).map_err(|_| bad());
        Ok(Cursor {
            timestamp_us: hex(&text[2..18])? as i64,
            seq: hex(&text[18..34])?,
            watermark: hex(&text[34..50])?,
            order,
        })
    }
}

impl Query {
    /// Checks the ranges of contract §3.
    pub fn validate(&self) -> Result<(), QueryError> {
        if !(1..=QUERY_LIMIT_MAX).contains(&self.limit) {
            return Err(invalid(
                "limit",
                format!("must lie in 1..={QUERY_LIMIT_MAX}"),
            ));
        }
        if self.offset > QUERY_OFFSET_MAX {
            return Err(invalid(
                "offset",
                format!("at most {QUERY_OFFSET_MAX}; page deeper with the cursor"),
            ));
        }
        if let (Some(s), Some(e)) = (self.start, self.end)
            && s > e
        {
            return Err(invalid("start_time", "is after end_time"));
        }
        if let Some(c) = &self.cursor
            && c.order != self.order
        {
            return Err(invalid("cursor", "was made for the other sort_order"));
        }
        if self.text.as_deref() == Some("") {
            return Err(invalid("text", "must not be empty"));
        }
        Ok(())
    }

    /// Whether any filter narrows the query through an index.
    pub fn has_index_filter(&self) -> bool {
        !self.sources.is_empty()
            || !self.types.is_empty()
            || self.severity.is_some()
            || self.min_severity.is_some()
            || !self.severities.is_empty()
            || self.correlation_id.is_some()
            || !self.tags.is_empty()
            || !self.any_tags.is_empty()
    }
}

/// A page of results.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    pub events: Vec<Event>,
    /// Present when more events may follow.
    pub next_cursor: Option<Cursor>,
}

/// Counts by source, type and severity of the events matching a filter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub total: u64,
    pub by_source: BTreeMap<String, u64>,
    pub by_type: BTreeMap<String, u64>,
    pub by_severity: BTreeMap<String, u64>,
    pub time_range: Option<(Timestamp, Timestamp)>,
    /// Present when asked for: it reads every correlation-id bitmap of the
    /// segments involved, so it costs time in proportion to their number.
    pub distinct_correlation_ids: Option<u64>,
}

/// What the executor needs of one segment.
pub struct SegmentInput<'a> {
    pub segment: u64,
    /// The arrival number of each row.
    pub seqs: Seqs<'a>,
    pub index: &'a dyn IndexView,
}

/// The arrival numbers of a segment's rows.
#[derive(Clone, Copy, Debug)]
pub enum Seqs<'a> {
    /// Row r arrived as `first_seq + r`.
    Dense(u64),
    /// A compacted segment: row r arrived as `first_seq + table[r]`, the
    /// table being one little-endian u32 per row.
    Table { first_seq: u64, table: &'a [u8] },
}

impl Seqs<'_> {
    /// The arrival number of `row`.
    pub fn of(&self, row: u32) -> u64 {
        match self {
            Seqs::Dense(first) => first + u64::from(row),
            Seqs::Table { first_seq, table } => {
                let at = row as usize * 4;
                match table.get(at..at + 4) {
                    Some(b) => first_seq + u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                    None => first_seq + u64::from(row),
                }
            }
        }
    }
}

/// The plan for one segment: why it was skipped, or the bitmaps combined.
#[derive(Clone, Debug, PartialEq)]
pub enum SegmentPlan {
    /// Pruned: no row can match.
    Skip(&'static str),
    /// Rows to consider (before the time, cursor and text checks), and
    /// whether every row lies inside the time range.
    Scan {
        candidates: RoaringBitmap,
        time_check: bool,
    },
}

fn union_of(
    index: &dyn IndexView,
    dim: Dim,
    terms: &[&str],
) -> Result<Option<RoaringBitmap>, QueryError> {
    let mut out: Option<RoaringBitmap> = None;
    for term in terms {
        if let Some(b) = index.bitmap(dim, term)? {
            match &mut out {
                Some(o) => *o |= b.as_ref(),
                None => out = Some(b.into_owned()),
            }
        }
    }
    Ok(out)
}

/// Plans one segment: prune by time bounds and by term absence, then AND
/// the any-of unions and the all-of tags, minus deleted rows.
pub fn plan_segment(query: &Query, index: &dyn IndexView) -> Result<SegmentPlan, QueryError> {
    let Some((min_ts, max_ts)) = index.time_bounds() else {
        return Ok(SegmentPlan::Skip("empty"));
    };
    let start = query.start.map_or(i64::MIN, Timestamp::as_micros);
    let end = query.end.map_or(i64::MAX, Timestamp::as_micros);
    if max_ts < start || min_ts > end {
        return Ok(SegmentPlan::Skip("time range"));
    }
    let time_check = min_ts < start || max_ts > end;
    let live = index.live();
    let mut acc: Option<Cow<'_, RoaringBitmap>> = None;
    let mut parts: Vec<RoaringBitmap> = Vec::new();
    if !query.sources.is_empty() {
        let terms: Vec<&str> = query.sources.iter().map(String::as_str).collect();
        match union_of(index, Dim::Source, &terms)? {
            Some(b) => parts.push(b),
            None => return Ok(SegmentPlan::Skip("no such source")),
        }
    }
    if !query.types.is_empty() {
        let terms: Vec<&str> = query.types.iter().map(String::as_str).collect();
        match union_of(index, Dim::Type, &terms)? {
            Some(b) => parts.push(b),
            None => return Ok(SegmentPlan::Skip("no such type")),
        }
    }
    let levels: Vec<&str> = Severity::ALL
        .iter()
        .filter(|s| query.severity.is_none_or(|x| **s == x))
        .filter(|s| query.min_severity.is_none_or(|m| **s >= m))
        .filter(|s| query.severities.is_empty() || query.severities.contains(s))
        .map(|s| severity_term(*s))
        .collect();
    if query.severity.is_some() || query.min_severity.is_some() || !query.severities.is_empty() {
        match union_of(index, Dim::Severity, &levels)? {
            Some(b) => parts.push(b),
            None => return Ok(SegmentPlan::Skip("no such severity")),
        }
    }
    if let Some(c) = &query.correlation_id {
        match index.bitmap(Dim::Correlation, c)? {
            Some(b) => parts.push(b.into_owned()),
            None => return Ok(SegmentPlan::Skip("no such correlation id")),
        }
    }
    for tag in &query.tags {
        match index.bitmap(Dim::Tag, tag)? {
            Some(b) => parts.push(b.into_owned()),
            None => return Ok(SegmentPlan::Skip("no such tag")),
        }
    }
    if !query.any_tags.is_empty() {
        let terms: Vec<&str> = query.any_tags.iter().map(String::as_str).collect();
        match union_of(index, Dim::Tag, &terms)? {
            Some(b) => parts.push(b),
            None => return Ok(SegmentPlan::Skip("none of the tags")),
        }
    }
    // Smallest first keeps every intersection small.
    parts.sort_by_key(RoaringBitmap::len);
    for p in parts {
        acc = Some(match acc {
            None => Cow::Owned(p),
            Some(a) => Cow::Owned(a.as_ref() & &p),
        });
    }
    let candidates = match acc {
        None => live.into_owned(),
        Some(a) => a.as_ref() & live.as_ref(),
    };
    if candidates.is_empty() {
        return Ok(SegmentPlan::Skip("no row matches the filters"));
    }
    Ok(SegmentPlan::Scan {
        candidates,
        time_check,
    })
}

/// A result key: (timestamp, arrival number), and where the row lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Hit {
    pub timestamp_us: i64,
    pub seq: u64,
    pub segment: u64,
    pub row: u32,
}

/// How far through the candidates the executor got, for `Db` to decode.
pub struct Selection {
    /// In result order, after `offset`.
    pub hits: Vec<Hit>,
    pub more: bool,
}

/// The best `want` hits seen so far, in result order.
struct TopK {
    desc: bool,
    want: usize,
    // The heap's top is the worst hit kept: the smallest key for desc, the
    // largest for asc.
    heap_desc: BinaryHeap<Reverse<Hit>>,
    heap_asc: BinaryHeap<Hit>,
}

impl TopK {
    fn new(desc: bool, want: usize) -> TopK {
        TopK {
            desc,
            want,
            heap_desc: BinaryHeap::new(),
            heap_asc: BinaryHeap::new(),
        }
    }

    fn push(&mut self, hit: Hit) {
        if self.desc {
            if self.heap_desc.len() < self.want {
                self.heap_desc.push(Reverse(hit));
            } else if self.heap_desc.peek().is_some_and(|Reverse(w)| hit > *w) {
                self.heap_desc.pop();
                self.heap_desc.push(Reverse(hit));
            }
        } else if self.heap_asc.len() < self.want {
            self.heap_asc.push(hit);
        } else if self.heap_asc.peek().is_some_and(|w| hit < *w) {
            self.heap_asc.pop();
            self.heap_asc.push(hit);
        }
    }

    /// Whether the heap is full and no row with a timestamp in
    /// `min_ts..=max_ts` could enter it.
    fn beats(&self, min_ts: i64, max_ts: i64) -> bool {
        if self.desc {
            self.heap_desc.len() >= self.want
                && self
                    .heap_desc
                    .peek()
                    .is_some_and(|Reverse(w)| max_ts < w.timestamp_us)
        } else {
            self.heap_asc.len() >= self.want
                && self
                    .heap_asc
                    .peek()
                    .is_some_and(|w| min_ts > w.timestamp_us)
        }
    }

    fn into_sorted(self) -> Vec<Hit> {
        if self.desc {
            let mut v: Vec<Hit> = self.heap_desc.into_iter().map(|Reverse(h)| h).collect();
            v.sort_unstable_by(|a, b| b.cmp(a));
            v
        } else {
            let mut v = self.heap_asc.into_vec();
            v.sort_unstable();
            v
        }
    }
}

/// Selects the top `offset + limit` hits across segments without sorting
/// every match: each segment's candidates pass the time, watermark and
/// cursor checks and feed one bounded heap; segments whose time bounds
/// cannot beat the heap are skipped whole. `text` is evaluated last, by
/// `rows_matching_text`, only on a segment's remaining candidates.
pub fn select(
    query: &Query,
    segments: &[SegmentInput<'_>],
    watermark: u64,
    mut rows_matching_text: impl FnMut(u64, &RoaringBitmap) -> Result<RoaringBitmap, QueryError>,
) -> Result<Selection, QueryError> {
    let start = query.start.map_or(i64::MIN, Timestamp::as_micros);
    let end = query.end.map_or(i64::MAX, Timestamp::as_micros);
    let want = query.offset + query.limit + 1;
    let desc = query.order == Order::Desc;
    // Keys compare in result order: for desc, larger keys come first.
    let after_cursor = |k: (i64, u64)| match &query.cursor {
        None => true,
        Some(c) if desc => k < (c.timestamp_us, c.seq),
        Some(c) => k > (c.timestamp_us, c.seq),
    };
    let mut top = TopK::new(desc, want);
    // Newest segments first for desc (oldest for asc), so that the heap
    // fills early and later segments are pruned by their time bounds.
    let mut order: Vec<&SegmentInput<'_>> = segments.iter().collect();
    order.sort_by_key(|s| {
        s.index
            .time_bounds()
            .map_or(i64::MIN, |b| if desc { b.1 } else { -b.0 })
    });
    order.reverse();
    for seg in order {
        if let Some((min_ts, max_ts)) = seg.index.time_bounds()
            && top.beats(min_ts, max_ts)
        {
            continue;
        }
        let SegmentPlan::Scan {
            candidates,
            time_check,
        } = plan_segment(query, seg.index)?
        else {
            continue;
        };
        // The hit for `row`, if it passes the watermark, time and cursor.
        let hit_of = |row: u32| -> Result<Option<Hit>, QueryError> {
            let seq = seg.seqs.of(row);
            if seq >= watermark {
                return Ok(None);
            }
            let ts = seg.index.timestamp(row)?;
            if (time_check && (ts < start || ts > end)) || !after_cursor((ts, seq)) {
                return Ok(None);
            }
            Ok(Some(Hit {
                timestamp_us: ts,
                seq,
                segment: seg.segment,
                row,
            }))
        };
        if query.text.is_some() {
            let mut kept = RoaringBitmap::new();
            let mut keys = Vec::new();
            for row in candidates.iter() {
                if let Some(hit) = hit_of(row)? {
                    kept.insert(row);
                    keys.push(hit);
                }
            }
            if !kept.is_empty() {
                let matching = rows_matching_text(seg.segment, &kept)?;
                for hit in keys.into_iter().filter(|h| matching.contains(h.row)) {
                    top.push(hit);
                }
            }
            continue;
        }
        // Visit the segment's time zones best first and stop at the first
        // zone that cannot beat the heap: a newest-k query reads about k rows.
        let zones = seg.index.zones()?;
        let mut zone_order: Vec<usize> = (0..zones.len()).collect();
        if desc {
            zone_order.sort_unstable_by_key(|&z| Reverse(zones[z].1));
        } else {
            zone_order.sort_unstable_by_key(|&z| zones[z].0);
        }
        for z in zone_order {
            let (zone_min, zone_max) = zones[z];
            if zone_min > zone_max {
                continue;
            }
            if top.beats(zone_min, zone_max) {
                break;
            }
            let lo = z as u32 * ZONE_ROWS;
            for row in candidates.range(lo..lo.saturating_add(ZONE_ROWS)) {
                if let Some(hit) = hit_of(row)? {
                    top.push(hit);
                }
            }
        }
    }
    let ordered = top.into_sorted();
    let more = ordered.len() == want;
    let hits: Vec<Hit> = ordered
        .into_iter()
        .skip(query.offset)
        .take(query.limit)
        .collect();
    Ok(Selection { hits, more })
}

/// The rows of one segment that match `query` entirely (index filters,
/// time range, then `text`), with whether the time range had to be checked
/// row by row; None when nothing can match.
fn segment_matches(
    query: &Query,
    seg: &SegmentInput<'_>,
    rows_matching_text: &mut impl FnMut(u64, &RoaringBitmap) -> Result<RoaringBitmap, QueryError>,
) -> Result<Option<(RoaringBitmap, bool)>, QueryError> {
    let start = query.start.map_or(i64::MIN, Timestamp::as_micros);
    let end = query.end.map_or(i64::MAX, Timestamp::as_micros);
    let SegmentPlan::Scan {
        mut candidates,
        time_check,
    } = plan_segment(query, seg.index)?
    else {
        return Ok(None);
    };
    if time_check {
        let mut in_range = RoaringBitmap::new();
        for row in candidates.iter() {
            let ts = seg.index.timestamp(row)?;
            if ts >= start && ts <= end {
                in_range.insert(row);
            }
        }
        candidates = in_range;
    }
    if query.text.is_some() {
        candidates = rows_matching_text(seg.segment, &candidates)?;
    }
    Ok((!candidates.is_empty()).then_some((candidates, time_check)))
}

/// How many rows the index filters leave across `segments` (before the
/// row-level time check and `text`): an upper bound of the events a query
/// would decode to evaluate `text` or a `data` pointer.
pub fn candidates_upper_bound(
    query: &Query,
    segments: &[SegmentInput<'_>],
    mut narrow: impl FnMut(u64, &RoaringBitmap) -> u64,
) -> Result<u64, QueryError> {
    let mut n = 0;
    for seg in segments {
        if let SegmentPlan::Scan { candidates, .. } = plan_segment(query, seg.index)? {
            n += narrow(seg.segment, &candidates);
        }
    }
    Ok(n)
}

/// Refuses a request that would decode more than `max` events. `narrow`
/// counts the candidates of a segment that would really be decoded (all
/// of them, or fewer when a text filter rules blocks out).
pub fn check_decode_cost(
    field: &'static str,
    query: &Query,
    segments: &[SegmentInput<'_>],
    max: u64,
    hint: &str,
    narrow: impl FnMut(u64, &RoaringBitmap) -> u64,
) -> Result<(), QueryError> {
    let n = candidates_upper_bound(query, segments, narrow)?;
    if n > max {
        return Err(invalid(
            field,
            format!(
                "would decode up to {n} events, more than the {max} one request may ([limits] query_decode_max): {hint}"
            ),
        ));
    }
    Ok(())
}

/// Every row of each segment that matches `query` (its paging fields are
/// ignored): the rows a delete by query removes.
pub fn matching_rows(
    query: &Query,
    segments: &[SegmentInput<'_>],
    mut rows_matching_text: impl FnMut(u64, &RoaringBitmap) -> Result<RoaringBitmap, QueryError>,
) -> Result<Vec<(u64, RoaringBitmap)>, QueryError> {
    let mut out = Vec::new();
    for seg in segments {
        if let Some((rows, _)) = segment_matches(query, seg, &mut rows_matching_text)? {
            out.push((seg.segment, rows));
        }
    }
    Ok(out)
}

/// Counts for `stats`. `rows_matching_text` narrows a segment's candidates
/// by `text` (it decodes records); without text nothing is decoded.
pub fn stats(
    query: &Query,
    segments: &[SegmentInput<'_>],
    distinct_correlation_ids: bool,
    mut rows_matching_text: impl FnMut(u64, &RoaringBitmap) -> Result<RoaringBitmap, QueryError>,
) -> Result<Stats, QueryError> {
    let mut out = Stats::default();
    let mut correlations: HashSet<String> = HashSet::new();
    let mut range: Option<(i64, i64)> = None;
    for seg in segments {
        let Some((candidates, time_check)) = segment_matches(query, seg, &mut rows_matching_text)?
        else {
            continue;
        };
        let all_rows = !query.has_index_filter() && !time_check && query.text.is_none();
        out.total += candidates.len();
        for (dim, map) in [
            (Dim::Source, &mut out.by_source),
            (Dim::Type, &mut out.by_type),
            (Dim::Severity, &mut out.by_severity),
        ] {
            for (term, bitmap) in seg.index.terms(dim)? {
                let n = bitmap.intersection_len(&candidates);
                if n > 0 {
                    *map.entry(term).or_default() += n;
                }
            }
        }
        if distinct_correlation_ids {
            for (term, bitmap) in seg.index.terms(Dim::Correlation)? {
                if !correlations.contains(&term) && !bitmap.is_disjoint(&candidates) {
                    correlations.insert(term);
                }
            }
        }
        let bounds = match (all_rows, seg.index.time_bounds()) {
            (true, Some(b)) => Some(b),
            _ => {
                let mut b: Option<(i64, i64)> = None;
                for row in candidates.iter() {
                    let ts = seg.index.timestamp(row)?;
                    b = Some(b.map_or((ts, ts), |(lo, hi)| (lo.min(ts), hi.max(ts))));
                }
                b
            }
        };
        if let Some((lo, hi)) = bounds {
            range = Some(range.map_or((lo, hi), |(a, b)| (a.min(lo), b.max(hi))));
        }
    }
    out.distinct_correlation_ids = distinct_correlation_ids.then_some(correlations.len() as u64);
    out.time_range = range.map(|(a, b)| (Timestamp(a), Timestamp(b)));
    Ok(out)
}

/// Whether an event passes every filter of `query` (not the cursor): the
/// reference the model tests compare the engine with, and the text check.
pub fn matches(query: &Query, event: &Event) -> bool {
    (query.sources.is_empty() || query.sources.contains(&event.source))
        && (query.types.is_empty() || query.types.contains(&event.event_type))
        && query.severity.is_none_or(|s| event.severity == s)
        && query.min_severity.is_none_or(|s| event.severity >= s)
        && (query.severities.is_empty() || query.severities.contains(&event.severity))
        && (query.any_tags.is_empty() || query.any_tags.iter().any(|t| event.tags.contains(t)))
        && query
            .correlation_id
            .as_ref()
            .is_none_or(|c| event.correlation_id.as_ref() == Some(c))
        && query.tags.iter().all(|t| event.tags.contains(t))
        && query.start.is_none_or(|s| event.timestamp >= s)
        && query.end.is_none_or(|e| event.timestamp <= e)
        && query
            .text
            .as_ref()
            .is_none_or(|t| event.data.as_str().contains(t.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::JsonObject;
    use crate::index::MemIndex;

    fn event(source: &str, sev: Severity, tags: &[&str], corr: Option<&str>, ts: i64) -> Event {
        Event {
            id: format!("{source}-{ts}"),
            timestamp: Timestamp(ts),
            source: source.into(),
            event_type: "t".into(),
            severity: sev,
            correlation_id: corr.map(Into::into),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            data: JsonObject::empty(),
            native: None,
        }
    }

    fn index() -> MemIndex {
        let mut idx = MemIndex::new();
        let events = [
            event("a", Severity::Info, &["x"], Some("c1"), 10),
            event("a", Severity::Error, &["x", "y"], Some("c1"), 20),
            event("b", Severity::Critical, &["y"], None, 30),
            event("b", Severity::Debug, &[], Some("c2"), 40),
        ];
        for (row, e) in events.iter().enumerate() {
            idx.insert(row as u32, e);
        }
        idx
    }

    fn show(plan: SegmentPlan) -> String {
        match plan {
            SegmentPlan::Skip(why) => format!("skip: {why}"),
            SegmentPlan::Scan {
                candidates,
                time_check,
            } => format!(
                "scan {:?} time_check={time_check}",
                candidates.iter().collect::<Vec<_>>()
            ),
        }
    }

    /// Which segments are touched and which bitmaps combined, as data.
    #[test]
    fn planner_cases() {
        let idx = index();
        let ts = |t| Some(Timestamp(t));
        let cases: Vec<(Query, &str)> = vec![
            (Query::default(), "scan [0, 1, 2, 3] time_check=false"),
            (
                Query {
                    sources: vec!["a".into()],
                    ..Query::default()
                },
                "scan [0, 1] time_check=false",
            ),
            (
                Query {
                    sources: vec!["a".into(), "b".into()],
                    min_severity: Some(Severity::Error),
                    ..Query::default()
                },
                "scan [1, 2] time_check=false",
            ),
            (
                Query {
                    sources: vec!["zzz".into()],
                    ..Query::default()
                },
                "skip: no such source",
            ),
            (
                Query {
                    tags: vec!["x".into(), "y".into()],
                    ..Query::default()
                },
                "scan [1] time_check=false",
            ),
            (
                Query {
                    tags: vec!["x".into(), "nope".into()],
                    ..Query::default()
                },
                "skip: no such tag",
            ),
            (
                Query {
                    correlation_id: Some("c1".into()),
                    ..Query::default()
                },
                "scan [0, 1] time_check=false",
            ),
            (
                Query {
                    severity: Some(Severity::Warning),
                    ..Query::default()
                },
                "skip: no such severity",
            ),
            (
                Query {
                    start: ts(50),
                    ..Query::default()
                },
                "skip: time range",
            ),
            (
                Query {
                    start: ts(15),
                    end: ts(35),
                    ..Query::default()
                },
                "scan [0, 1, 2, 3] time_check=true",
            ),
            (
                Query {
                    start: ts(0),
                    end: ts(99),
                    ..Query::default()
                },
                "scan [0, 1, 2, 3] time_check=false",
            ),
            (
                Query {
                    sources: vec!["a".into()],
                    tags: vec!["y".into()],
                    correlation_id: Some("c2".into()),
                    ..Query::default()
                },
                "skip: no row matches the filters",
            ),
        ];
        for (q, want) in cases {
            assert_eq!(show(plan_segment(&q, &idx).unwrap()), want, "{q:?}");
        }
        assert_eq!(
            show(plan_segment(&Query::default(), &MemIndex::new()).unwrap()),
            "skip: empty"
        );
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = Cursor {
            timestamp_us: -5,
            seq: 42,
            watermark: 99,
            order: Order::Asc,
        };
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        for bad in [
            "",
            "x",
            "1z0000000000000000000000000000000000000000000000000",
            &format!("1d{}", "g".repeat(48)),
            "1d-000000000000000000000000000000000000000000000000",
        ] {
            assert!(matches!(
                Cursor::decode(bad),
                Err(QueryError::Invalid {
                    field: "cursor",
                    ..
                })
            ));
        }
    }

    #[test]
    fn validation_names_the_field() {
        let field = |q: Query| match q.validate() {
            Err(QueryError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(Query {
                limit: 0,
                ..Query::default()
            }),
            "limit"
        );
        assert_eq!(
            field(Query {
                limit: 1001,
                ..Query::default()
            }),
            "limit"
        );
        assert_eq!(
            field(Query {
                offset: QUERY_OFFSET_MAX + 1,
                ..Query::default()
            }),
            "offset"
        );
        assert_eq!(
            field(Query {
                start: Some(Timestamp(2)),
                end: Some(Timestamp(1)),
                ..Query::default()
            }),
            "start_time"
        );
        assert_eq!(
            field(Query {
                text: Some(String::new()),
                ..Query::default()
            }),
            "text"
        );
    }
}
