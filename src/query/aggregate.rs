//! Aggregations: group the events a filter matches by source, type,
//! severity, correlation id, tag or a `data` field, and/or by time bucket,
//! and compute metrics per group — counts, conditional counts, ratios,
//! sum/avg/min/max and percentiles of a numeric field — ordered and cut to
//! the top k.
//!
//! Count-only requests over at most one indexed dimension (no bucket) are
//! answered from bitmap cardinalities alone. Everything else walks the
//! matching rows once, reading group keys from per-row lookup tables built
//! from the bitmaps, timestamps from the index, and numbers from the
//! segment's numeric columns (declared fields) or, for other pointers, from
//! the decoded record. The request grammar (shared by HTTP, gRPC and the
//! CLI) is in `docs/api.md` ("Aggregations").

use std::cmp::Ordering;

use roaring::RoaringBitmap;
use rustc_hash::FxHashMap;
use sketches_ddsketch::DDSketch;

use super::{Query, QueryError, SegmentInput, SegmentPlan, invalid, plan_segment, segment_matches};
use crate::event::{Severity, Timestamp};
use crate::index::numeric::{
    SUMMARY_ALL, SummaryRef, check_pointer, format_number, key_at, number_at,
};
use crate::index::{Column, Dim, IndexView};

/// Most group-by dimensions in one request.
pub const GROUP_BY_MAX: usize = 3;
/// Most metrics in one request (hidden helper metrics included).
pub const METRICS_MAX: usize = 16;
/// Most groups one request may build: past it the request is refused
/// (narrow the filter) instead of growing memory without bound.
pub const GROUPS_MAX: usize = 1_000_000;
/// Most groups when a percentile is asked (each keeps values or a sketch).
pub const QUANTILE_GROUPS_MAX: usize = 100_000;
/// Groups with at most this many values get exact percentiles; larger ones
/// switch to a DDSketch with relative error [`SKETCH_RELATIVE_ERROR`].
pub const EXACT_VALUES_MAX: usize = crate::index::numeric::EXACT_VALUES_MAX;
/// Relative accuracy of percentile sketches: the value returned lies
/// within ±1 % of the exact value at the same rank.
pub const SKETCH_RELATIVE_ERROR: f64 = 0.01;
pub const AGG_LIMIT_DEFAULT: usize = 100;
pub const AGG_LIMIT_MAX: usize = 10_000;

const NONE: u32 = u32::MAX;

/// What a group is keyed by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupBy {
    Source,
    Type,
    Severity,
    Correlation,
    /// Every tag, or (with a prefix `p`) the tags `p:VALUE`, keyed by VALUE.
    /// An event is counted once per matching tag.
    Tag(Option<String>),
    /// The value at a JSON pointer of `data`.
    Field(String),
}

impl GroupBy {
    pub fn parse(text: &str) -> Result<GroupBy, QueryError> {
        let t = text.trim();
        Ok(match t {
            "source" | "source_system" => GroupBy::Source,
            "type" | "event_type" => GroupBy::Type,
            "severity" => GroupBy::Severity,
            "correlation_id" | "correlation" => GroupBy::Correlation,
            "tag" | "tags" => GroupBy::Tag(None),
            _ if t.starts_with("tag:") && t.len() > 4 => GroupBy::Tag(Some(t[4..].to_owned())),
            _ if t.starts_with('/') => {
                check_pointer(t).map_err(|e| invalid("group_by", e))?;
                GroupBy::Field(t.to_owned())
            }
            _ => {
                return Err(invalid(
                    "group_by",
                    format!(
                        "{t:?}: use source, type, severity, correlation_id, tag, tag:PREFIX or a JSON pointer such as /model"
                    ),
                ));
            }
        })
    }

    /// The name used for this dimension in results.
    pub fn name(&self) -> String {
        match self {
            GroupBy::Source => "source_system".into(),
            GroupBy::Type => "event_type".into(),
            GroupBy::Severity => "severity".into(),
            GroupBy::Correlation => "correlation_id".into(),
            GroupBy::Tag(None) => "tag".into(),
            GroupBy::Tag(Some(p)) => format!("tag:{p}"),
            GroupBy::Field(p) => p.clone(),
        }
    }

    fn dim(&self) -> Option<Dim> {
        match self {
            GroupBy::Source => Some(Dim::Source),
            GroupBy::Type => Some(Dim::Type),
            GroupBy::Severity => Some(Dim::Severity),
            GroupBy::Correlation => Some(Dim::Correlation),
            GroupBy::Tag(_) => Some(Dim::Tag),
            GroupBy::Field(_) => None,
        }
    }

    /// The group value of an index term of this dimension, None if the
    /// term does not belong (a tag without the prefix).
    fn value_of<'t>(&self, term: &'t str) -> Option<&'t str> {
        match self {
            GroupBy::Tag(Some(p)) => term
                .strip_prefix(p.as_str())
                .and_then(|r| r.strip_prefix(':')),
            _ => Some(term),
        }
    }
}

/// Time bucket width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BucketUnit {
    Minute,
    Hour,
    Day,
    /// Weeks start on Monday, 00:00 at the offset.
    Week,
}

/// A time bucket: a width and a UTC offset its boundaries follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    pub unit: BucketUnit,
    pub offset_minutes: i32,
}

const MINUTE_US: i64 = 60_000_000;

impl Bucket {
    pub fn parse(unit: &str, offset: Option<&str>) -> Result<Bucket, QueryError> {
        let unit = match unit.trim() {
            "minute" | "1m" => BucketUnit::Minute,
            "hour" | "1h" => BucketUnit::Hour,
            "day" | "1d" => BucketUnit::Day,
            "week" | "1w" => BucketUnit::Week,
            other => {
                return Err(invalid(
                    "bucket",
                    format!("{other:?}: use minute, hour, day or week"),
                ));
            }
        };
        let offset_minutes = match offset.map(str::trim).filter(|o| !o.is_empty()) {
            None | Some("Z") | Some("UTC") => 0,
            Some(o) => parse_offset(o)?,
        };
        Ok(Bucket {
            unit,
            offset_minutes,
        })
    }

    fn width_us(&self) -> i64 {
        match self.unit {
            BucketUnit::Minute => MINUTE_US,
            BucketUnit::Hour => 60 * MINUTE_US,
            BucketUnit::Day => 24 * 60 * MINUTE_US,
            BucketUnit::Week => 7 * 24 * 60 * MINUTE_US,
        }
    }

    /// The start (UTC µs) of the bucket holding `ts`.
    pub fn start_of(&self, ts: i64) -> i64 {
        let offset = i64::from(self.offset_minutes) * MINUTE_US;
        // 1970-01-01 was a Thursday: Mondays fall 4 days after the epoch.
        let phase = if self.unit == BucketUnit::Week {
            4 * 24 * 60 * MINUTE_US
        } else {
            0
        };
        let local = ts.saturating_add(offset).saturating_sub(phase);
        local.div_euclid(self.width_us()) * self.width_us() + phase - offset
    }
}

/// `+02:00`, `-0530`, `+2`, or minutes as a number (`120`).
fn parse_offset(text: &str) -> Result<i32, QueryError> {
    let bad = || {
        invalid(
            "tz_offset",
            format!("{text:?}: use +HH:MM or -HH:MM (or Z)"),
        )
    };
    let (sign, rest) = match text.as_bytes().first() {
        Some(b'+') => (1, &text[1..]),
        Some(b'-') => (-1, &text[1..]),
        _ => (1, text),
    };
    let (h, m) = if let Some((h, m)) = rest.split_once(':') {
        (h, m)
    } else if rest.len() == 4 {
        rest.split_at(2)
    } else {
        (rest, "0")
    };
    let h: i32 = h.parse().map_err(|_| bad())?;
    let m: i32 = m.parse().map_err(|_| bad())?;
    if !(0..=14).contains(&h) || !(0..60).contains(&m) {
        return Err(bad());
    }
    Ok(sign * (h * 60 + m))
}

/// One metric of a group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Metric {
    /// Events in the group.
    Count,
    /// Events in the group that also match this filter (index filters only).
    CountWhere(Box<Query>),
    /// Metric `a` divided by metric `b` (indices into the request's
    /// metrics, both earlier); null when `b` is 0.
    Ratio(usize, usize),
    Sum(String),
    Avg(String),
    Min(String),
    Max(String),
    /// The percentile (in tenths of a percent: 950 is p95) of a field.
    Percentile(String, u16),
    /// The earliest event timestamp of the group.
    FirstSeen,
    /// The latest event timestamp of the group.
    LastSeen,
}

impl Metric {
    /// The JSON pointer a numeric metric reads.
    pub fn pointer(&self) -> Option<&str> {
        match self {
            Metric::Sum(p)
            | Metric::Avg(p)
            | Metric::Min(p)
            | Metric::Max(p)
            | Metric::Percentile(p, _) => Some(p),
            _ => None,
        }
    }
}

/// A metric with its name in results; hidden metrics are helpers of a
/// ratio written inline and are not returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricSpec {
    pub name: String,
    pub metric: Metric,
    pub hidden: bool,
}

/// What the results are ordered by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrderKey {
    /// Bucket, then the group key, ascending.
    Key,
    /// A metric (index into the metrics); nulls last either way.
    Metric(usize),
}

/// An aggregation request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Aggregation {
    /// The filters of contract §3; its paging fields are ignored.
    pub filter: Query,
    pub group_by: Vec<GroupBy>,
    pub bucket: Option<Bucket>,
    pub metrics: Vec<MetricSpec>,
    pub order_by: OrderKey,
    pub descending: bool,
    pub limit: usize,
}

/// The text form shared by HTTP, gRPC and the CLI.
#[derive(Clone, Debug, Default)]
pub struct AggregationText<'a> {
    pub group_by: Vec<&'a str>,
    pub bucket: Option<&'a str>,
    pub tz_offset: Option<&'a str>,
    /// Comma-separated metric expressions (see `docs/api.md`).
    pub metrics: Option<&'a str>,
    /// `NAME`, `NAME:asc`, `NAME:desc`, or `key`.
    pub order_by: Option<&'a str>,
    pub limit: Option<usize>,
}

/// Splits on commas outside parentheses.
fn split_top(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

fn call<'a>(expr: &'a str, name: &str) -> Option<&'a str> {
    expr.strip_prefix(name)?
        .trim_start()
        .strip_prefix('(')?
        .strip_suffix(')')
        .map(str::trim)
}

/// `severity>=error;type=a|b;source=s;tag=t;correlation_id=c`.
fn parse_condition(text: &str) -> Result<Query, QueryError> {
    let mut q = Query::default();
    let bad = |why: String| invalid("metrics", why);
    for clause in text.split(';').map(str::trim).filter(|c| !c.is_empty()) {
        let (key, op, value) = if let Some((k, v)) = clause.split_once(">=") {
            (k.trim(), ">=", v.trim())
        } else if let Some((k, v)) = clause.split_once('=') {
            (k.trim(), "=", v.trim())
        } else {
            return Err(bad(format!(
                "count_where: {clause:?} is not KEY=VALUE or severity>=LEVEL"
            )));
        };
        let level = |v: &str| {
            Severity::parse(v).ok_or_else(|| bad(format!("count_where: unknown severity {v:?}")))
        };
        let any: Vec<String> = value.split('|').map(|s| s.trim().to_owned()).collect();
        match (key, op) {
            ("severity", ">=") | ("min_severity", "=") => q.min_severity = Some(level(value)?),
            ("severity", "=") => {
                for v in &any {
                    q.severities.push(level(v)?);
                }
            }
            ("source" | "source_system", "=") => q.sources.extend(any),
            ("type" | "event_type", "=") => q.types.extend(any),
            ("tag" | "tags", "=") => q.any_tags.extend(any),
            ("correlation_id", "=") => q.correlation_id = Some(value.to_owned()),
            _ => {
                return Err(bad(format!(
                    "count_where: {clause:?}: use severity>=L, severity=L, source=S, type=T, tag=T or correlation_id=C"
                )));
            }
        }
    }
    if !q.has_index_filter() {
        return Err(bad(
            "count_where needs a condition, as in count_where(severity>=error)".into(),
        ));
    }
    Ok(q)
}

/// Parses one metric expression, pushing inline helpers (hidden) first;
/// returns the index of the metric the expression denotes.
fn parse_metric(
    expr: &str,
    name: Option<&str>,
    hidden: bool,
    out: &mut Vec<MetricSpec>,
) -> Result<usize, QueryError> {
    let expr = expr.trim();
    // A bare name refers to a metric already defined.
    if name.is_none()
        && hidden
        && let Some(i) = out.iter().position(|m| !m.hidden && m.name == expr)
    {
        return Ok(i);
    }
    let field = |arg: &str| -> Result<String, QueryError> {
        check_pointer(arg).map_err(|e| invalid("metrics", format!("{expr}: {e}")))?;
        Ok(arg.to_owned())
    };
    let metric = if expr == "count" {
        Metric::Count
    } else if expr == "first_seen" {
        Metric::FirstSeen
    } else if expr == "last_seen" {
        Metric::LastSeen
    } else if expr == "error_rate" {
        let a = parse_metric("count_where(severity>=error)", None, true, out)?;
        let b = parse_metric("count", None, true, out)?;
        Metric::Ratio(a, b)
    } else if let Some(arg) = call(expr, "count_where") {
        Metric::CountWhere(Box::new(parse_condition(arg)?))
    } else if let Some(arg) = call(expr, "ratio") {
        let parts = split_top(arg);
        let [a, b] = parts.as_slice() else {
            return Err(invalid(
                "metrics",
                format!("{expr}: ratio takes two metrics, as in ratio(errors,count)"),
            ));
        };
        let a = parse_metric(a, None, true, out)?;
        let b = parse_metric(b, None, true, out)?;
        for i in [a, b] {
            if matches!(
                out[i].metric,
                Metric::Ratio(..) | Metric::FirstSeen | Metric::LastSeen
            ) {
                return Err(invalid(
                    "metrics",
                    format!("{expr}: a ratio takes counts or numbers, not ratios or times"),
                ));
            }
        }
        Metric::Ratio(a, b)
    } else if let Some(arg) = call(expr, "sum") {
        Metric::Sum(field(arg)?)
    } else if let Some(arg) = call(expr, "avg") {
        Metric::Avg(field(arg)?)
    } else if let Some(arg) = call(expr, "min") {
        Metric::Min(field(arg)?)
    } else if let Some(arg) = call(expr, "max") {
        Metric::Max(field(arg)?)
    } else if let Some((p, arg)) = expr
        .strip_prefix('p')
        .and_then(|r| r.split_once('('))
        .and_then(|(p, a)| Some((p.trim(), a.trim().strip_suffix(')')?.trim())))
    {
        let permille = p
            .parse::<f64>()
            .ok()
            .filter(|v| *v > 0.0 && *v < 100.0 && (v * 10.0).fract() == 0.0)
            .ok_or_else(|| {
                invalid(
                    "metrics",
                    format!("{expr}: a percentile is p1..p99 (one decimal allowed: p99.9)"),
                )
            })?;
        Metric::Percentile(field(arg)?, (permille * 10.0) as u16)
    } else {
        return Err(invalid(
            "metrics",
            format!(
                "{expr:?}: use count, count_where(COND), error_rate, ratio(A,B), first_seen, last_seen, sum/avg/min/max(/ptr) or p50/p90/p95/p99(/ptr)"
            ),
        ));
    };
    let name = name.map_or_else(|| expr.replace(' ', ""), str::to_owned);
    // Hidden helpers that repeat an existing metric reuse it.
    if hidden && let Some(i) = out.iter().position(|m| m.metric == metric) {
        return Ok(i);
    }
    if out.iter().any(|m| !m.hidden && m.name == name) && !hidden {
        return Err(invalid(
            "metrics",
            format!("two metrics are named {name:?}; rename one with `as NAME`"),
        ));
    }
    out.push(MetricSpec {
        name,
        metric,
        hidden,
    });
    if out.len() > METRICS_MAX {
        return Err(invalid(
            "metrics",
            format!("at most {METRICS_MAX} metrics (helpers included)"),
        ));
    }
    Ok(out.len() - 1)
}

/// Parses a comma-separated list of metric expressions, each optionally
/// followed by `as NAME`.
pub fn parse_metrics(text: &str) -> Result<Vec<MetricSpec>, QueryError> {
    let mut out: Vec<MetricSpec> = Vec::new();
    for item in split_top(text) {
        let (expr, name) = match item.rsplit_once(" as ") {
            Some((e, n)) => {
                let n = n.trim();
                if n.is_empty()
                    || !n
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    return Err(invalid(
                        "metrics",
                        format!("{n:?}: a metric name uses letters, digits, '_' and '-'"),
                    ));
                }
                (e, Some(n))
            }
            None => (item, None),
        };
        let i = parse_metric(expr, name, false, &mut out)?;
        // An expression equal to a hidden helper promotes it.
        if out[i].hidden {
            out[i].hidden = false;
            if let Some(n) = name {
                out[i].name = n.to_owned();
            }
        }
    }
    if out.iter().all(|m| m.hidden) {
        return Err(invalid("metrics", "name at least one metric, as in count"));
    }
    Ok(out)
}

impl Aggregation {
    /// Builds a request from its text form; `filter` carries contract §3's
    /// filters.
    pub fn from_text(filter: Query, text: &AggregationText<'_>) -> Result<Aggregation, QueryError> {
        let mut group_by = Vec::new();
        for g in &text.group_by {
            for part in g.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let g = GroupBy::parse(part)?;
                if group_by.contains(&g) {
                    return Err(invalid("group_by", format!("{part:?} is given twice")));
                }
                group_by.push(g);
            }
        }
        let bucket = match text.bucket.map(str::trim).filter(|b| !b.is_empty()) {
            Some(b) => Some(Bucket::parse(b, text.tz_offset)?),
            None if text.tz_offset.is_some_and(|t| !t.trim().is_empty()) => {
                return Err(invalid("tz_offset", "only applies with a bucket"));
            }
            None => None,
        };
        let metrics = parse_metrics(text.metrics.unwrap_or("count"))?;
        let (order_by, descending) = match text.order_by.map(str::trim).filter(|o| !o.is_empty()) {
            None | Some("key") | Some("key:asc") => (OrderKey::Key, false),
            Some("key:desc") => (OrderKey::Key, true),
            Some(o) => {
                let (name, dir) = match o.rsplit_once(':') {
                    Some((n, "asc")) => (n, false),
                    Some((n, "desc")) => (n, true),
                    _ => (o, true),
                };
                let i = metrics
                    .iter()
                    .position(|m| !m.hidden && m.name == name)
                    .ok_or_else(|| {
                        invalid(
                            "order_by",
                            format!(
                                "{name:?} is not one of the metrics ({}) nor `key`",
                                metrics
                                    .iter()
                                    .filter(|m| !m.hidden)
                                    .map(|m| m.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        )
                    })?;
                (OrderKey::Metric(i), dir)
            }
        };
        let agg = Aggregation {
            filter,
            group_by,
            bucket,
            metrics,
            order_by,
            descending,
            limit: text.limit.unwrap_or(AGG_LIMIT_DEFAULT),
        };
        agg.validate()?;
        Ok(agg)
    }

    pub fn validate(&self) -> Result<(), QueryError> {
        if !(1..=AGG_LIMIT_MAX).contains(&self.limit) {
            return Err(invalid("limit", format!("must lie in 1..={AGG_LIMIT_MAX}")));
        }
        if self.group_by.len() > GROUP_BY_MAX {
            return Err(invalid(
                "group_by",
                format!("at most {GROUP_BY_MAX} dimensions (plus a bucket)"),
            ));
        }
        if self.metrics.is_empty() || self.metrics.len() > METRICS_MAX {
            return Err(invalid(
                "metrics",
                format!("between 1 and {METRICS_MAX} metrics"),
            ));
        }
        for (i, m) in self.metrics.iter().enumerate() {
            if let Metric::Ratio(a, b) = m.metric
                && (a >= i || b >= i)
            {
                return Err(invalid(
                    "metrics",
                    "a ratio names metrics defined before it",
                ));
            }
        }
        if let OrderKey::Metric(i) = self.order_by
            && i >= self.metrics.len()
        {
            return Err(invalid("order_by", "names no metric"));
        }
        if let (Some(s), Some(e)) = (self.filter.start, self.filter.end)
            && s > e
        {
            return Err(invalid("start_time", "is after end_time"));
        }
        if self.filter.text.as_deref() == Some("") {
            return Err(invalid("text", "must not be empty"));
        }
        Ok(())
    }

    fn tracks_time(&self) -> bool {
        self.metrics
            .iter()
            .any(|m| matches!(m.metric, Metric::FirstSeen | Metric::LastSeen))
    }

    fn count_only(&self) -> bool {
        self.metrics.iter().all(|m| {
            matches!(
                m.metric,
                Metric::Count | Metric::CountWhere(_) | Metric::Ratio(..)
            )
        })
    }
}

/// One metric's value in a group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MetricValue {
    Count(u64),
    Number(f64),
    /// `first_seen`, `last_seen`.
    Time(Timestamp),
    /// No value: no numbers in the group, or a ratio over zero.
    Null,
}

impl MetricValue {
    /// The value as a number (a time in µs since the epoch).
    pub fn as_f64(self) -> Option<f64> {
        match self {
            MetricValue::Count(c) => Some(c as f64),
            MetricValue::Number(v) => Some(v),
            MetricValue::Time(t) => Some(t.as_micros() as f64),
            MetricValue::Null => None,
        }
    }
}

/// One result row.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupRow {
    /// One value per group-by dimension; None where the event has none.
    pub key: Vec<Option<String>>,
    /// The bucket's start, when bucketed.
    pub bucket: Option<Timestamp>,
    /// One per visible metric, in request order.
    pub values: Vec<MetricValue>,
}

/// Where numeric values came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValuePath {
    /// No numeric field was read.
    None,
    /// Every value came from numeric columns (declared fields).
    Columns,
    /// Some segments had columns, others were read from JSON.
    Mixed,
    /// Every value was read by decoding records.
    Json,
}

impl ValuePath {
    pub fn as_str(self) -> &'static str {
        match self {
            ValuePath::None => "none",
            ValuePath::Columns => "columns",
            ValuePath::Mixed => "mixed",
            ValuePath::Json => "json",
        }
    }
}

/// The answer to an aggregation.
#[derive(Clone, Debug, PartialEq)]
pub struct AggregateResult {
    /// Names of the group-by dimensions, in key order.
    pub dimensions: Vec<String>,
    /// Names of the visible metrics, in value order.
    pub metrics: Vec<String>,
    pub groups: Vec<GroupRow>,
    /// The visible metrics over every matching event, ungrouped (an event
    /// with several tags counts once here).
    pub totals: Vec<MetricValue>,
    /// Groups before `limit`.
    pub group_count: u64,
    /// Events the filter matched.
    pub matched: u64,
    pub value_path: ValuePath,
    /// False when a returned percentile (of a group or the totals) came
    /// from a sketch.
    pub exact: bool,
    /// `bitmap` when counts came from bitmap cardinalities alone, `rows`
    /// when matching rows were walked.
    pub strategy: &'static str,
}

enum Quant {
    Exact(Vec<f64>),
    Sketch(Box<DDSketch>),
}

struct NumAcc {
    n: u64,
    sum: f64,
    min: f64,
    max: f64,
    quant: Option<Quant>,
}

impl NumAcc {
    fn new(quantiles: bool) -> NumAcc {
        NumAcc {
            n: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            quant: quantiles.then(|| Quant::Exact(Vec::new())),
        }
    }

    #[inline]
    fn add(&mut self, v: f64) {
        self.n += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        match &mut self.quant {
            None => {}
            Some(Quant::Sketch(s)) => s.add(v),
            Some(Quant::Exact(values)) if values.len() < EXACT_VALUES_MAX => values.push(v),
            Some(q @ Quant::Exact(_)) => {
                let mut sketch = Self::new_sketch();
                if let Quant::Exact(values) = q {
                    for x in values.iter() {
                        sketch.add(*x);
                    }
                }
                sketch.add(v);
                *q = Quant::Sketch(Box::new(sketch));
            }
        }
    }

    fn new_sketch() -> DDSketch {
        crate::index::numeric::new_sketch()
    }

    /// Folds a sealed-time summary in; false (nothing changed) when its
    /// sketch cannot be decoded, so the caller reads the rows instead.
    fn merge_summary(&mut self, sm: &SummaryRef<'_>) -> bool {
        let sketch = match &self.quant {
            None => None,
            Some(_) => match DDSketch::from_java_bytes(sm.sketch) {
                Ok(s) => Some(s),
                Err(_) => return false,
            },
        };
        self.n += sm.count;
        self.sum += sm.sum;
        self.min = self.min.min(sm.min);
        self.max = self.max.max(sm.max);
        if let Some(theirs) = sketch {
            let mut mine = match self.quant.take() {
                Some(Quant::Sketch(s)) => s,
                Some(Quant::Exact(values)) => {
                    let mut s = Box::new(Self::new_sketch());
                    for v in values {
                        s.add(v);
                    }
                    s
                }
                None => Box::new(Self::new_sketch()),
            };
            let merged = mine.merge(&theirs);
            debug_assert!(merged.is_ok(), "sketches share one configuration");
            self.quant = Some(Quant::Sketch(mine));
        }
        true
    }

    /// Folds another accumulator of the same field in.
    fn merge(&mut self, other: &NumAcc) {
        if other.n == 0 {
            return;
        }
        self.n += other.n;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        let mine = self.quant.take();
        self.quant = match (mine, &other.quant) {
            (None, _) | (_, None) => None,
            (Some(Quant::Exact(mut a)), Some(Quant::Exact(b)))
                if a.len() + b.len() <= EXACT_VALUES_MAX =>
            {
                a.extend_from_slice(b);
                Some(Quant::Exact(a))
            }
            (Some(mine), Some(theirs)) => {
                let mut sketch = match mine {
                    Quant::Sketch(s) => s,
                    Quant::Exact(values) => {
                        let mut s = Box::new(Self::new_sketch());
                        for v in values {
                            s.add(v);
                        }
                        s
                    }
                };
                match theirs {
                    Quant::Sketch(t) => {
                        // Same configuration on both sides: cannot fail.
                        let _ = sketch.merge(t);
                    }
                    Quant::Exact(values) => {
                        for v in values {
                            sketch.add(*v);
                        }
                    }
                }
                Some(Quant::Sketch(sketch))
            }
        };
    }

    /// The value at rank floor(q·(n−1)) of the sorted values.
    fn percentile(&mut self, permille: u16, exact: &mut bool) -> Option<f64> {
        let q = f64::from(permille) / 1000.0;
        match self.quant.as_mut()? {
            Quant::Exact(values) => {
                if values.is_empty() {
                    return None;
                }
                values.sort_unstable_by(f64::total_cmp);
                let rank = (q * (values.len() as f64 - 1.0)) as usize;
                values.get(rank).copied()
            }
            Quant::Sketch(s) => {
                *exact = false;
                s.quantile(q).ok().flatten()
            }
        }
    }
}

/// Interned group values of one dimension: the values live end to end in
/// one arena, so a new value costs no allocation of its own (a question
/// grouped by correlation id meets hundreds of thousands of them).
#[derive(Default)]
struct Interner {
    table: hashbrown::HashTable<u32>,
    arena: String,
    /// (start, length) in `arena` of each id.
    spans: Vec<(usize, usize)>,
}

impl Interner {
    fn hash(value: &str) -> u64 {
        xxhash_rust::xxh3::xxh3_64(value.as_bytes())
    }

    fn name(&self, id: u32) -> &str {
        let (start, len) = self.spans[id as usize];
        &self.arena[start..start + len]
    }

    fn len(&self) -> u32 {
        self.spans.len() as u32
    }

    fn id(&mut self, value: &str) -> u32 {
        self.id_hashed(value, Self::hash(value))
    }

    /// [`Interner::id`] with the value's hash already computed.
    fn id_hashed(&mut self, value: &str, h: u64) -> u32 {
        let Interner {
            table,
            arena,
            spans,
        } = self;
        let at = |id: &u32| {
            let (start, len) = spans[*id as usize];
            &arena[start..start + len]
        };
        if let Some(id) = table.find(h, |id| at(id) == value) {
            return *id;
        }
        let id = spans.len() as u32;
        spans.push((arena.len(), value.len()));
        arena.push_str(value);
        let (arena, spans) = (&*arena, &*spans);
        table.insert_unique(h, id, |id| {
            let (start, len) = spans[*id as usize];
            Self::hash(&arena[start..start + len])
        });
        id
    }
}

type GroupKey = ([u32; GROUP_BY_MAX], i64);

/// Every group's accumulators, in flat arrays indexed by group.
struct Table {
    ids: FxHashMap<GroupKey, u32>,
    /// Group of each first-dimension value, for keys of that value alone.
    direct: Vec<u32>,
    keys: Vec<GroupKey>,
    /// `count_slots` per group: slot 0 counts events, slot 1+i the i-th
    /// conditional count.
    counts: Vec<u64>,
    count_slots: usize,
    /// `fields.len()` per group.
    nums: Vec<NumAcc>,
    fields: Vec<(String, bool)>,
    /// (first, last) timestamp per group, when a time metric is asked.
    times: Option<Vec<(i64, i64)>>,
    max_groups: usize,
}

impl Table {
    fn group(&mut self, key: GroupKey) -> Result<usize, QueryError> {
        // Keys of one dimension and no bucket (the common shape) index a
        // dense table by their interned value instead of hashing.
        let direct = key.1 == 0 && key.0[1] == NONE && key.0[2] == NONE && key.0[0] != NONE;
        if direct {
            if let Some(&g) = self.direct.get(key.0[0] as usize)
                && g != NONE
            {
                return Ok(g as usize);
            }
        } else if let Some(g) = self.ids.get(&key) {
            return Ok(*g as usize);
        }
        let g = self.keys.len();
        if g >= self.max_groups {
            return Err(invalid(
                "group_by",
                format!(
                    "more than {} groups: narrow the filters or the time range, or group by fewer dimensions",
                    self.max_groups
                ),
            ));
        }
        if direct {
            let i = key.0[0] as usize;
            if self.direct.len() <= i {
                self.direct.resize(i + 1, NONE);
            }
            self.direct[i] = g as u32;
        } else {
            self.ids.insert(key, g as u32);
        }
        self.keys.push(key);
        self.counts.extend(std::iter::repeat_n(0, self.count_slots));
        for (_, q) in &self.fields {
            self.nums.push(NumAcc::new(*q));
        }
        if let Some(t) = &mut self.times {
            t.push((i64::MAX, i64::MIN));
        }
        Ok(g)
    }

    fn empty_like(&self, max_groups: usize) -> Table {
        Table {
            ids: FxHashMap::default(),
            direct: Vec::new(),
            keys: Vec::new(),
            counts: Vec::new(),
            count_slots: self.count_slots,
            nums: Vec::new(),
            fields: self.fields.clone(),
            times: self.times.as_ref().map(|_| Vec::new()),
            max_groups,
        }
    }

    /// Adds group `g` of `other` (same request) into group `mine`.
    fn absorb(&mut self, mine: usize, other: &Table, g: usize) {
        let slots = self.count_slots;
        for i in 0..slots {
            self.counts[mine * slots + i] += other.counts[g * slots + i];
        }
        let nf = self.fields.len();
        for f in 0..nf {
            self.nums[mine * nf + f].merge(&other.nums[g * nf + f]);
        }
        if let (Some(t), Some(o)) = (&mut self.times, &other.times) {
            let (lo, hi) = o[g];
            t[mine].0 = t[mine].0.min(lo);
            t[mine].1 = t[mine].1.max(hi);
        }
    }

    /// Adds one row to group `g`.
    #[inline]
    fn add_row(
        &mut self,
        g: usize,
        row: u32,
        conds: &[RoaringBitmap],
        values: &[Option<f64>],
        ts: i64,
    ) {
        let slots = self.count_slots;
        let nf = self.fields.len();
        self.counts[g * slots] += 1;
        for (i, c) in conds.iter().enumerate() {
            if c.contains(row) {
                self.counts[g * slots + 1 + i] += 1;
            }
        }
        for (f, v) in values.iter().enumerate() {
            if let Some(v) = v {
                self.nums[g * nf + f].add(*v);
            }
        }
        if let Some(t) = &mut self.times {
            let (lo, hi) = &mut t[g];
            *lo = (*lo).min(ts);
            *hi = (*hi).max(ts);
        }
    }

    /// The metrics of a group no event joined.
    fn empty_values(mut self, agg: &Aggregation) -> Vec<MetricValue> {
        let mut exact = true;
        match self.group(([NONE; GROUP_BY_MAX], 0)) {
            Ok(g) => self.values(agg, g, &mut exact),
            Err(_) => Vec::new(),
        }
    }

    /// Every metric's value for group `g`.
    fn values(&mut self, agg: &Aggregation, g: usize, exact: &mut bool) -> Vec<MetricValue> {
        let mut vals = Vec::with_capacity(agg.metrics.len());
        self.values_into(agg, g, &mut vals, exact);
        vals
    }

    /// [`Table::values`] into a reused buffer.
    fn values_into(
        &mut self,
        agg: &Aggregation,
        g: usize,
        vals: &mut Vec<MetricValue>,
        exact: &mut bool,
    ) {
        vals.clear();
        let slots = self.count_slots;
        let nf = self.fields.len();
        let mut cond = 0;
        for m in &agg.metrics {
            let field = self
                .fields
                .iter()
                .position(|(f, _)| Some(f.as_str()) == m.metric.pointer())
                .unwrap_or(0);
            let v = match &m.metric {
                Metric::Count => MetricValue::Count(self.counts[g * slots]),
                Metric::CountWhere(_) => {
                    cond += 1;
                    MetricValue::Count(self.counts[g * slots + cond])
                }
                Metric::Ratio(a, b) => match (vals[*a].as_f64(), vals[*b].as_f64()) {
                    (Some(x), Some(y)) if y != 0.0 => MetricValue::Number(x / y),
                    _ => MetricValue::Null,
                },
                Metric::Sum(_) | Metric::Avg(_) | Metric::Min(_) | Metric::Max(_) => {
                    let acc = &self.nums[g * nf + field];
                    if acc.n == 0 {
                        MetricValue::Null
                    } else {
                        MetricValue::Number(match &m.metric {
                            Metric::Sum(_) => acc.sum,
                            Metric::Avg(_) => acc.sum / acc.n as f64,
                            Metric::Min(_) => acc.min,
                            _ => acc.max,
                        })
                    }
                }
                Metric::Percentile(_, permille) => {
                    match self.nums[g * nf + field].percentile(*permille, exact) {
                        Some(v) => MetricValue::Number(v),
                        None => MetricValue::Null,
                    }
                }
                Metric::FirstSeen | Metric::LastSeen => match self.times.as_ref().map(|t| t[g]) {
                    Some((lo, hi)) if lo <= hi => {
                        MetricValue::Time(Timestamp(if m.metric == Metric::FirstSeen {
                            lo
                        } else {
                            hi
                        }))
                    }
                    _ => MetricValue::Null,
                },
            };
            vals.push(v);
        }
    }
}

/// How one group-by dimension gives each row its value(s) in a segment.
enum RowKeys {
    /// One value per row (`NONE` for none), indexed by row.
    Single(Vec<u32>),
    /// (row, value) pairs sorted by row; a row may have several.
    Multi(Vec<(u32, u32)>),
    /// Read per row from a column or the record.
    Field,
}

/// What the executor needs of the records (one per worker thread).
pub trait RowSource {
    /// The candidates of `segment` whose `data` contains the filter's text.
    fn rows_with_text(
        &mut self,
        segment: u64,
        candidates: &RoaringBitmap,
    ) -> Result<RoaringBitmap, QueryError>;
    /// One row's `data` JSON (for pointers without a numeric column, and
    /// field group keys).
    fn data(&mut self, segment: u64, row: u32) -> Result<Option<String>, QueryError>;
}

/// Most threads one aggregation uses (each takes whole segments).
pub const WORKERS_MAX: usize = 4;

/// One worker's share of the answer.
struct Partial {
    table: Table,
    totals: Table,
    interners: Vec<Interner>,
    matched: u64,
    used_columns: bool,
    used_json: bool,
    walked: bool,
    summarized: bool,
    uncovered: Uncovered,
}

/// How the request is answered, decided once.
struct Plan<'q> {
    conditions: Vec<&'q Query>,
    bitmap_path: bool,
    column_path: bool,
    separate_totals: bool,
    /// Workers split the values, not the segments: each reads every
    /// segment but only the correlation ids that hash to it, so their
    /// groups are disjoint and need no merge (count-only, grouped by
    /// correlation id alone, no text filter).
    shard: Option<usize>,
}

/// What a sharded worker saw of the rows without a value, to form the
/// null group once all are done: candidates and condition rows (counted
/// by worker 0) minus the rows each worker's values covered.
#[derive(Default)]
struct Uncovered {
    candidates: u64,
    conds: Vec<u64>,
    covered: u64,
    conds_covered: Vec<u64>,
}

/// Answers an aggregation over `segments`, spreading whole segments over
/// up to [`WORKERS_MAX`] threads (each with its own `RowSource`) and
/// merging their groups.
pub fn aggregate<S: RowSource>(
    agg: &Aggregation,
    segments: &[SegmentInput<'_>],
    source: impl Fn() -> S + Sync,
) -> Result<AggregateResult, QueryError> {
    agg.validate()?;
    let conditions: Vec<&Query> = agg
        .metrics
        .iter()
        .filter_map(|m| match &m.metric {
            Metric::CountWhere(q) => Some(&**q),
            _ => None,
        })
        .collect();
    let mut fields: Vec<(String, bool)> = Vec::new();
    for m in &agg.metrics {
        if let Some(p) = m.metric.pointer() {
            let q = matches!(m.metric, Metric::Percentile(..));
            match fields.iter_mut().find(|(f, _)| f == p) {
                Some(f) => f.1 |= q,
                None => fields.push((p.to_owned(), q)),
            }
        }
    }
    let quantiles = fields.iter().any(|f| f.1);
    let empty = Table {
        ids: FxHashMap::default(),
        direct: Vec::new(),
        keys: Vec::new(),
        counts: Vec::new(),
        count_slots: 1 + conditions.len(),
        nums: Vec::new(),
        fields,
        times: agg.tracks_time().then(Vec::new),
        max_groups: if quantiles {
            QUANTILE_GROUPS_MAX
        } else {
            GROUPS_MAX
        },
    };
    let bitmap_path = agg.count_only()
        && agg.bucket.is_none()
        && agg.group_by.len() <= 1
        && agg.group_by.iter().all(|g| g.dim().is_some());
    // Column path: no bucket, no time metric, at most one indexed
    // dimension: each group's rows come from a bitmap intersection and its
    // numbers straight from the segment's columns, with no per-row lookups.
    let column_path = !bitmap_path
        && agg.bucket.is_none()
        && !agg.tracks_time()
        && agg.group_by.len() <= 1
        && agg.group_by.iter().all(|g| g.dim().is_some());
    let workers = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(WORKERS_MAX)
        .min(segments.len())
        .max(1);
    let shard = (bitmap_path
        && workers > 1
        && agg.group_by == [GroupBy::Correlation]
        && agg.filter.text.is_none())
    .then_some(workers);
    let plan = Plan {
        conditions,
        bitmap_path,
        column_path,
        // Ungrouped, unbucketed: the one group is the totals.
        separate_totals: !(agg.group_by.is_empty() && agg.bucket.is_none()),
        shard,
    };
    let new_partial = || -> Result<Partial, QueryError> {
        let mut totals = empty.empty_like(1);
        totals.group(([NONE; GROUP_BY_MAX], 0))?;
        Ok(Partial {
            table: empty.empty_like(empty.max_groups),
            totals,
            interners: agg.group_by.iter().map(|_| Interner::default()).collect(),
            matched: 0,
            used_columns: false,
            used_json: false,
            walked: false,
            summarized: false,
            uncovered: Uncovered {
                conds: vec![0; plan.conditions.len()],
                conds_covered: vec![0; plan.conditions.len()],
                ..Uncovered::default()
            },
        })
    };
    let mut partials: Vec<Partial> = if workers == 1 {
        let mut p = new_partial()?;
        let mut src = source();
        for seg in segments {
            one_segment(agg, &plan, seg, &mut src, &mut p, 0)?;
        }
        vec![p]
    } else {
        let results: Vec<Result<Partial, QueryError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    let (plan, source, new_partial) = (&plan, &source, &new_partial);
                    scope.spawn(move || -> Result<Partial, QueryError> {
                        let mut p = new_partial()?;
                        let mut src = source();
                        if plan.shard.is_some() {
                            for seg in segments {
                                one_segment(agg, plan, seg, &mut src, &mut p, w)?;
                            }
                        } else {
                            for seg in segments.iter().skip(w).step_by(workers) {
                                one_segment(agg, plan, seg, &mut src, &mut p, w)?;
                            }
                        }
                        Ok(p)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(invalid("metrics", "an aggregation worker failed")))
                })
                .collect()
        });
        results.into_iter().collect::<Result<_, _>>()?
    };
    let mut whole = partials.remove(0);
    if plan.shard.is_some() {
        // Disjoint groups: the null group is what no worker covered.
        let mut u = std::mem::take(&mut whole.uncovered);
        for p in &partials {
            u.covered += p.uncovered.covered;
            for (a, b) in u.conds_covered.iter_mut().zip(&p.uncovered.conds_covered) {
                *a += b;
            }
        }
        let none = u.candidates - u.covered;
        let slots = whole.table.count_slots;
        if none > 0 {
            let g = whole.table.group(([NONE; GROUP_BY_MAX], 0))?;
            whole.table.counts[g * slots] += none;
            for (i, (c, k)) in u.conds.iter().zip(&u.conds_covered).enumerate() {
                whole.table.counts[g * slots + 1 + i] += c - k;
            }
        }
    }
    let mut extra = Vec::new();
    for p in partials {
        if plan.shard.is_some() {
            whole.matched += p.matched;
            extra.push((p.table, p.interners));
        } else {
            whole.merge(agg, p)?;
        }
    }
    let value_path = match (whole.used_columns, whole.used_json) {
        (false, false) => ValuePath::None,
        (true, false) => ValuePath::Columns,
        (true, true) => ValuePath::Mixed,
        (false, true) => ValuePath::Json,
    };
    let strategy = if plan.bitmap_path {
        "bitmap"
    } else if plan.column_path && !whole.walked && whole.summarized {
        "summaries"
    } else if plan.column_path && !whole.walked {
        "columns"
    } else {
        "rows"
    };
    let totals = plan.separate_totals.then_some(whole.totals);
    let mut parts = vec![(whole.table, whole.interners)];
    parts.extend(extra);
    Ok(finish(
        agg,
        parts,
        totals,
        whole.matched,
        value_path,
        strategy,
    ))
}

impl Partial {
    /// Folds another worker's groups into these.
    fn merge(&mut self, agg: &Aggregation, other: Partial) -> Result<(), QueryError> {
        self.matched += other.matched;
        self.used_columns |= other.used_columns;
        self.used_json |= other.used_json;
        self.walked |= other.walked;
        self.summarized |= other.summarized;
        self.totals.absorb(0, &other.totals, 0);
        // Their interned ids, as ours.
        let maps: Vec<Vec<u32>> = self
            .interners
            .iter_mut()
            .zip(&other.interners)
            .map(|(mine, theirs)| (0..theirs.len()).map(|i| mine.id(theirs.name(i))).collect())
            .collect();
        for (g, (ords, bucket)) in other.table.keys.iter().enumerate() {
            let mut key = [NONE; GROUP_BY_MAX];
            for d in 0..agg.group_by.len() {
                key[d] = match ords[d] {
                    NONE => NONE,
                    id => maps[d][id as usize],
                };
            }
            let mine = self.table.group((key, *bucket))?;
            self.table.absorb(mine, &other.table, g);
        }
        Ok(())
    }
}

/// One segment into a worker's partial answer.
fn one_segment<S: RowSource>(
    agg: &Aggregation,
    plan: &Plan<'_>,
    seg: &SegmentInput<'_>,
    src: &mut S,
    p: &mut Partial,
    worker: usize,
) -> Result<(), QueryError> {
    let mut text = |segment: u64, c: &RoaringBitmap| src.rows_with_text(segment, c);
    let Some((candidates, _)) = segment_matches(&agg.filter, seg, &mut text)? else {
        return Ok(());
    };
    // Sharded, every worker sees every segment: worker 0 counts the rows.
    let lead = plan.shard.is_none() || worker == 0;
    if lead {
        p.matched += candidates.len();
    }
    let mut conds: Vec<RoaringBitmap> = Vec::with_capacity(plan.conditions.len());
    for c in &plan.conditions {
        conds.push(match plan_segment(c, seg.index)? {
            SegmentPlan::Skip(_) => RoaringBitmap::new(),
            SegmentPlan::Scan { candidates: b, .. } => b & &candidates,
        });
    }
    if plan.bitmap_path {
        if plan.separate_totals && lead {
            p.totals.counts[0] += candidates.len();
            for (i, c) in conds.iter().enumerate() {
                p.totals.counts[1 + i] += c.len();
            }
        }
        let shard = plan.shard.map(|n| {
            if lead {
                p.uncovered.candidates += candidates.len();
                for (a, c) in p.uncovered.conds.iter_mut().zip(&conds) {
                    *a += c.len();
                }
            }
            (worker, n, &mut p.uncovered)
        });
        return count_from_bitmaps(
            agg,
            seg.index,
            &candidates,
            &conds,
            &mut p.interners,
            &mut p.table,
            shard,
        );
    }
    if plan.column_path {
        let columns: Option<Vec<Column<'_>>> = p
            .table
            .fields
            .iter()
            .map(|(f, _)| seg.index.column(f))
            .collect();
        if let Some(columns) = columns {
            p.used_columns |= !columns.is_empty();
            let totals = plan.separate_totals.then_some(&mut p.totals);
            p.summarized |= by_column(
                agg,
                seg.index,
                &candidates,
                &conds,
                &columns,
                &mut p.interners,
                (&mut p.table, totals),
            )?;
            return Ok(());
        }
    }
    p.walked = true;
    let mut data = |segment: u64, row: u32| src.data(segment, row);
    let (c, j) = walk_rows(
        agg,
        seg,
        &candidates,
        &conds,
        &mut p.interners,
        (&mut p.table, plan.separate_totals.then_some(&mut p.totals)),
        &mut data,
    )?;
    p.used_columns |= c;
    p.used_json |= j;
    Ok(())
}

/// One segment on the column path: per group, the rows are a bitmap
/// intersection, counts are cardinalities and numbers are read from the
/// columns for those rows only.
fn by_column(
    agg: &Aggregation,
    index: &dyn IndexView,
    candidates: &RoaringBitmap,
    conds: &[RoaringBitmap],
    columns: &[Column<'_>],
    interners: &mut [Interner],
    (table, totals): (&mut Table, Option<&mut Table>),
) -> Result<bool, QueryError> {
    // Every row of the segment selected (no filter narrowed it, nothing
    // deleted): a term's rows are exactly the rows its sealed-time summary
    // covers.
    let whole = candidates.len() == index.rows_indexed();
    let mut summarized = false;
    let mut add =
        |table: &mut Table, g: usize, rows: &RoaringBitmap, summary_key: Option<(u8, &str)>| {
            let slots = table.count_slots;
            let nf = table.fields.len();
            table.counts[g * slots] += rows.len();
            for (i, c) in conds.iter().enumerate() {
                table.counts[g * slots + 1 + i] += rows.intersection_len(c);
            }
            for (f, col) in columns.iter().enumerate() {
                let summary = match summary_key {
                    Some((dim, term)) if whole => index.summary(&table.fields[f].0, dim, term),
                    _ => None,
                };
                let acc = &mut table.nums[g * nf + f];
                if let Some(sm) = summary
                    && acc.merge_summary(&sm)
                {
                    summarized = true;
                    continue;
                }
                for r in rows {
                    if let Some(v) = col.get(r) {
                        acc.add(v);
                    }
                }
            }
        };
    if let Some(t) = totals {
        add(t, 0, candidates, Some((SUMMARY_ALL, "")));
    }
    let Some(g) = agg.group_by.first() else {
        let id = table.group(([NONE; GROUP_BY_MAX], 0))?;
        add(table, id, candidates, Some((SUMMARY_ALL, "")));
        return Ok(summarized);
    };
    let Some(dim) = g.dim() else {
        return Ok(summarized);
    };
    let mut covered = RoaringBitmap::new();
    let mut failed: Option<QueryError> = None;
    index.for_each_term(dim, &mut |term, bitmap| {
        let Some(value) = g.value_of(term).filter(|_| failed.is_none()) else {
            return;
        };
        let rows = and(bitmap, candidates);
        if rows.is_empty() {
            return;
        }
        let mut key = [NONE; GROUP_BY_MAX];
        key[0] = interners[0].id(value);
        match table.group((key, 0)) {
            Ok(id) => add(table, id, &rows, Some((dim as u8, term))),
            Err(e) => failed = Some(e),
        }
        covered |= rows;
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    let none = candidates - &covered;
    if !none.is_empty() {
        let id = table.group(([NONE; GROUP_BY_MAX], 0))?;
        add(table, id, &none, None);
    }
    Ok(summarized)
}

/// Terms this small are intersected row by row: cheaper than roaring's
/// container-wise intersection against a dense candidate bitmap (one
/// correlation id holds a handful of rows of a segment).
const SMALL_TERM_ROWS: u64 = 64;

/// |small ∩ big|.
fn inter_len(small: &RoaringBitmap, big: &RoaringBitmap) -> u64 {
    if small.len() <= SMALL_TERM_ROWS {
        small.iter().filter(|r| big.contains(*r)).count() as u64
    } else {
        small.intersection_len(big)
    }
}

/// A bitmap as a flat bit array, for many membership tests of one segment.
struct Bits(Vec<u64>);

impl Bits {
    fn of(b: &RoaringBitmap) -> Bits {
        let words = b.max().map_or(0, |m| m as usize / 64 + 1);
        let mut v = vec![0u64; words];
        for r in b {
            v[r as usize / 64] |= 1 << (r % 64);
        }
        Bits(v)
    }

    #[inline]
    fn contains(&self, r: u32) -> bool {
        self.0
            .get(r as usize / 64)
            .is_some_and(|w| w & (1 << (r % 64)) != 0)
    }

    /// |small ∩ self| (`full` is the same set as a bitmap).
    fn inter_len(&self, small: &RoaringBitmap, full: &RoaringBitmap) -> u64 {
        // A bit test per row beats a container-wise intersection up to
        // the size of an array container.
        if small.len() <= 4096 {
            small.iter().filter(|r| self.contains(*r)).count() as u64
        } else {
            small.intersection_len(full)
        }
    }
}

/// small ∩ big.
fn and(small: &RoaringBitmap, big: &RoaringBitmap) -> RoaringBitmap {
    if small.len() <= SMALL_TERM_ROWS {
        small.iter().filter(|r| big.contains(*r)).collect()
    } else {
        small & big
    }
}

/// Count-only, no bucket, at most one indexed dimension: cardinalities of
/// bitmap intersections, no row visited.
fn count_from_bitmaps(
    agg: &Aggregation,
    index: &dyn IndexView,
    candidates: &RoaringBitmap,
    conds: &[RoaringBitmap],
    interners: &mut [Interner],
    table: &mut Table,
    shard: Option<(usize, usize, &mut Uncovered)>,
) -> Result<(), QueryError> {
    let slots = table.count_slots;
    let Some(g) = agg.group_by.first() else {
        let id = table.group(([NONE; GROUP_BY_MAX], 0))?;
        table.counts[id * slots] += candidates.len();
        for (i, c) in conds.iter().enumerate() {
            table.counts[id * slots + 1 + i] += c.len();
        }
        return Ok(());
    };
    let Some(dim) = g.dim() else {
        return Ok(());
    };
    let multi = dim == Dim::Tag;
    // Every row selected: a term's count is its cardinality.
    let whole = candidates.len() == index.rows_indexed();
    let mut covered_sum = 0u64;
    let mut cond_sums = vec![0u64; conds.len()];
    let cond_bits: Vec<Bits> = conds.iter().map(Bits::of).collect();
    let mut covered = RoaringBitmap::new();
    let mut failed: Option<QueryError> = None;
    let mine = shard.as_ref().map(|(w, n, _)| (*w as u64, *n as u64));
    index.for_each_term(dim, &mut |term, bitmap| {
        if failed.is_some() {
            return;
        }
        let h = Interner::hash(term);
        if let Some((w, n)) = mine
            && h % n != w
        {
            return;
        }
        let Some(value) = g.value_of(term) else {
            return;
        };
        let n = if whole {
            bitmap.len()
        } else {
            inter_len(bitmap, candidates)
        };
        if n == 0 {
            return;
        }
        let mut key = [NONE; GROUP_BY_MAX];
        // The term is the value unless a tag prefix was stripped.
        key[0] = if value.len() == term.len() {
            interners[0].id_hashed(value, h)
        } else {
            interners[0].id(value)
        };
        let id = match table.group((key, 0)) {
            Ok(id) => id,
            Err(e) => {
                failed = Some(e);
                return;
            }
        };
        table.counts[id * slots] += n;
        for (i, c) in conds.iter().enumerate() {
            let k = cond_bits[i].inter_len(bitmap, c);
            table.counts[id * slots + 1 + i] += k;
            cond_sums[i] += k;
        }
        if multi {
            covered |= and(bitmap, candidates);
        } else {
            covered_sum += n;
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    if let Some((_, _, u)) = shard {
        // The null group is formed once every worker is done.
        u.covered += covered_sum;
        for (a, k) in u.conds_covered.iter_mut().zip(&cond_sums) {
            *a += k;
        }
        return Ok(());
    }
    // Rows without a value form the null group. A single-valued dimension
    // gives each row at most one term, so the rest is a subtraction.
    let (none, none_conds): (u64, Vec<u64>) = if multi {
        let none = candidates - &covered;
        let counts = conds.iter().map(|c| none.intersection_len(c)).collect();
        (none.len(), counts)
    } else {
        let counts = conds
            .iter()
            .zip(&cond_sums)
            .map(|(c, k)| c.len() - k)
            .collect();
        (candidates.len() - covered_sum, counts)
    };
    if none > 0 {
        let id = table.group(([NONE; GROUP_BY_MAX], 0))?;
        table.counts[id * slots] += none;
        for (i, k) in none_conds.into_iter().enumerate() {
            table.counts[id * slots + 1 + i] += k;
        }
    }
    Ok(())
}

/// Walks the matching rows of one segment once. Returns whether numeric
/// columns and whether decoded JSON were read.
#[allow(clippy::too_many_arguments)]
fn walk_rows(
    agg: &Aggregation,
    seg: &SegmentInput<'_>,
    candidates: &RoaringBitmap,
    conds: &[RoaringBitmap],
    interners: &mut [Interner],
    (table, mut totals): (&mut Table, Option<&mut Table>),
    data_of: &mut impl FnMut(u64, u32) -> Result<Option<String>, QueryError>,
) -> Result<(bool, bool), QueryError> {
    let index = seg.index;
    let Some(max_row) = candidates.max() else {
        return Ok((false, false));
    };
    // Group keys per dimension.
    let mut row_keys: Vec<RowKeys> = Vec::with_capacity(agg.group_by.len());
    for (d, g) in agg.group_by.iter().enumerate() {
        let Some(dim) = g.dim() else {
            row_keys.push(RowKeys::Field);
            continue;
        };
        let mut single = (dim != Dim::Tag).then(|| vec![NONE; max_row as usize + 1]);
        let mut pairs = Vec::new();
        let interner = &mut interners[d];
        index.for_each_term(dim, &mut |term, bitmap| {
            let Some(value) = g.value_of(term) else {
                return;
            };
            let rows = and(bitmap, candidates);
            if rows.is_empty() {
                return;
            }
            let id = interner.id(value);
            match &mut single {
                Some(s) => {
                    for r in &rows {
                        s[r as usize] = id;
                    }
                }
                None => pairs.extend(rows.iter().map(|r| (r, id))),
            }
        })?;
        row_keys.push(match single {
            Some(s) => RowKeys::Single(s),
            None => {
                pairs.sort_unstable();
                RowKeys::Multi(pairs)
            }
        });
    }
    // Numeric sources: a column, or the decoded record.
    let columns: Vec<Option<crate::index::Column<'_>>> =
        table.fields.iter().map(|(p, _)| index.column(p)).collect();
    let field_dims: Vec<Option<crate::index::Column<'_>>> = agg
        .group_by
        .iter()
        .map(|g| match g {
            GroupBy::Field(p) => index.column(p),
            _ => None,
        })
        .collect();
    let needs_json = columns.iter().any(Option::is_none)
        || agg
            .group_by
            .iter()
            .zip(&field_dims)
            .any(|(g, c)| matches!(g, GroupBy::Field(_)) && c.is_none());
    let used_columns =
        columns.iter().any(Option::is_some) || field_dims.iter().any(Option::is_some);
    let nf = table.fields.len();
    let mut cursors = vec![0usize; agg.group_by.len()];
    let mut values: Vec<Option<f64>> = vec![None; nf];
    let mut choices: Vec<Vec<u32>> = vec![Vec::new(); agg.group_by.len()];
    let mut pick = vec![0usize; agg.group_by.len()];
    for row in candidates {
        let data = if needs_json {
            data_of(seg.segment, row)?
        } else {
            None
        };
        for (f, col) in columns.iter().enumerate() {
            values[f] = match col {
                Some(c) => c.get(row),
                None => data
                    .as_deref()
                    .and_then(|d| number_at(d, &table.fields[f].0)),
            };
        }
        for (d, keys) in row_keys.iter().enumerate() {
            let out = &mut choices[d];
            out.clear();
            match keys {
                RowKeys::Single(s) => out.push(s[row as usize]),
                RowKeys::Multi(pairs) => {
                    let at = &mut cursors[d];
                    while *at < pairs.len() && pairs[*at].0 < row {
                        *at += 1;
                    }
                    while *at < pairs.len() && pairs[*at].0 == row {
                        out.push(pairs[*at].1);
                        *at += 1;
                    }
                    if out.is_empty() {
                        out.push(NONE);
                    }
                }
                RowKeys::Field => {
                    let GroupBy::Field(p) = &agg.group_by[d] else {
                        continue;
                    };
                    let value = match field_dims[d] {
                        Some(c) => c.get(row).map(format_number),
                        None => data.as_deref().and_then(|j| key_at(j, p)),
                    };
                    out.push(value.map_or(NONE, |v| interners[d].id(&v)));
                }
            }
        }
        let ts = if agg.bucket.is_some() || table.times.is_some() {
            index.timestamp(row)?
        } else {
            0
        };
        let bucket = agg.bucket.map_or(0, |b| b.start_of(ts));
        if let Some(t) = totals.as_deref_mut() {
            t.add_row(0, row, conds, &values, ts);
        }
        // Every combination of the row's values (one, unless tags).
        pick.iter_mut().for_each(|p| *p = 0);
        'combos: loop {
            let mut key = [NONE; GROUP_BY_MAX];
            for (d, c) in choices.iter().enumerate() {
                key[d] = c[pick[d]];
            }
            let g = table.group((key, bucket))?;
            table.add_row(g, row, conds, &values, ts);
            // The next combination, odometer style.
            let mut d = choices.len();
            loop {
                if d == 0 {
                    break 'combos;
                }
                d -= 1;
                pick[d] += 1;
                if pick[d] < choices[d].len() {
                    continue 'combos;
                }
                pick[d] = 0;
            }
        }
    }
    Ok((used_columns, needs_json))
}

fn finish(
    agg: &Aggregation,
    mut parts: Vec<(Table, Vec<Interner>)>,
    totals: Option<Table>,
    matched: u64,
    value_path: ValuePath,
    strategy: &'static str,
) -> AggregateResult {
    let mut exact = true;
    // Groups of several parts (disjoint key sets) are ordered together.
    // Order first, on the one value it needs; compute every value only for
    // the groups returned (a top-k of a million groups allocates k rows).
    let mut scratch = Vec::with_capacity(agg.metrics.len());
    let mut ignored = true;
    let mut order: Vec<((usize, usize), Option<f64>)> = Vec::new();
    for (p, (table, _)) in parts.iter_mut().enumerate() {
        for g in 0..table.keys.len() {
            order.push(match agg.order_by {
                OrderKey::Key => ((p, g), None),
                OrderKey::Metric(i) => {
                    table.values_into(agg, g, &mut scratch, &mut ignored);
                    ((p, g), scratch[i].as_f64())
                }
            });
        }
    }
    let n_groups = order.len();
    let name = |p: usize, d: usize, id: u32| -> Option<&str> {
        (id != NONE).then(|| parts[p].1[d].name(id))
    };
    let key_of = |(p, g): (usize, usize)| parts[p].0.keys[g];
    let key_cmp = |a: (usize, usize), b: (usize, usize)| -> Ordering {
        let (ka, kb) = (key_of(a), key_of(b));
        ka.1.cmp(&kb.1).then_with(|| {
            for d in 0..agg.group_by.len() {
                // None sorts last.
                let o = match (name(a.0, d, ka.0[d]), name(b.0, d, kb.0[d])) {
                    (Some(x), Some(y)) => x.cmp(y),
                    (Some(_), None) => Ordering::Less,
                    (None, Some(_)) => Ordering::Greater,
                    (None, None) => Ordering::Equal,
                };
                if o != Ordering::Equal {
                    return o;
                }
            }
            Ordering::Equal
        })
    };
    let cmp = |a: &((usize, usize), Option<f64>), b: &((usize, usize), Option<f64>)| -> Ordering {
        match agg.order_by {
            OrderKey::Key => {
                let o = key_cmp(a.0, b.0);
                if agg.descending { o.reverse() } else { o }
            }
            OrderKey::Metric(_) => {
                let o = match (a.1, b.1) {
                    (Some(x), Some(y)) => {
                        let o = x.total_cmp(&y);
                        if agg.descending { o.reverse() } else { o }
                    }
                    (Some(_), None) => Ordering::Less,
                    (None, Some(_)) => Ordering::Greater,
                    (None, None) => Ordering::Equal,
                };
                o.then_with(|| key_cmp(a.0, b.0))
            }
        }
    };
    if order.len() > agg.limit {
        if let OrderKey::Metric(_) = agg.order_by {
            // Find the k-th value on the numbers alone, keep what ties or
            // beats it, and only then break ties by key: with many groups
            // (and many ties, as error rates have) the key comparisons
            // stay few.
            let by_value = |a: &Option<f64>, b: &Option<f64>| match (a, b) {
                (Some(x), Some(y)) => {
                    let o = x.total_cmp(y);
                    if agg.descending { o.reverse() } else { o }
                }
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (None, None) => Ordering::Equal,
            };
            let mut values: Vec<Option<f64>> = order.iter().map(|(_, v)| *v).collect();
            let (_, kth, _) = values.select_nth_unstable_by(agg.limit - 1, by_value);
            let kth = *kth;
            order.retain(|(_, v)| by_value(v, &kth) != Ordering::Greater);
        }
        if order.len() > agg.limit {
            order.select_nth_unstable_by(agg.limit - 1, cmp);
            order.truncate(agg.limit);
        }
    }
    order.sort_unstable_by(cmp);
    let chosen: Vec<(usize, usize)> = order.into_iter().map(|(pg, _)| pg).collect();
    let mut all: Vec<(Vec<Option<String>>, i64, Vec<MetricValue>)> =
        Vec::with_capacity(chosen.len());
    for (p, g) in chosen {
        let (table, interners) = &mut parts[p];
        let key = table.keys[g];
        let names = (0..agg.group_by.len())
            .map(|d| (key.0[d] != NONE).then(|| interners[d].name(key.0[d]).to_owned()))
            .collect();
        let values = table.values(agg, g, &mut exact);
        all.push((names, key.1, values));
    }
    let total_values = match totals {
        Some(mut t) => t.values(agg, 0, &mut exact),
        // Ungrouped: the one group, if any event matched.
        None => match all.first() {
            Some((_, _, v)) => v.clone(),
            None => parts[0].0.empty_like(1).empty_values(agg),
        },
    };
    let visible: Vec<usize> = (0..agg.metrics.len())
        .filter(|i| !agg.metrics[*i].hidden)
        .collect();
    let groups = all
        .into_iter()
        .map(|(key, bucket, vals)| GroupRow {
            key,
            bucket: agg.bucket.map(|_| Timestamp(bucket)),
            values: visible.iter().map(|i| vals[*i]).collect(),
        })
        .collect();
    AggregateResult {
        dimensions: agg.group_by.iter().map(GroupBy::name).collect(),
        metrics: visible
            .iter()
            .map(|i| agg.metrics[*i].name.clone())
            .collect(),
        groups,
        totals: visible.iter().map(|i| total_values[*i]).collect(),
        group_count: n_groups as u64,
        matched,
        value_path,
        exact,
        strategy,
    }
}
