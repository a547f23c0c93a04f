//! Aggregations against a naive model: random events (a declared numeric
//! field, an undeclared one, missing and non-numeric values, tags with
//! prefixes, optional correlation ids) interleaved with aggregations,
//! seals, reopens and deletes. Counts, sums, min/max and (small-group,
//! exact) percentiles must equal the model's; a large group's sketched
//! percentiles must lie within the documented relative error.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashSet};

use evdb::query::Query;
use evdb::query::aggregate::{
    AggregateResult, Aggregation, AggregationText, MetricValue, SKETCH_RELATIVE_ERROR, ValuePath,
};
use evdb::{Config, Db, Event, JsonObject, Severity, Timestamp};
use proptest::prelude::*;

const SOURCES: [&str; 3] = ["alpha", "beta", "gamma"];
const TYPES: [&str; 3] = ["start", "end", "tool_call"];
const TAGS: [&str; 5] = ["agent:a1", "agent:a2", "tenant:t1", "prod", "agent:a3"];
const MODELS: [&str; 2] = ["m1", "m2"];
const HOUR: i64 = 3_600_000_000;
const DAY: i64 = 24 * HOUR;

/// The metrics every aggregation asks for: counts, a conditional count, two
/// ratios, and every numeric metric over the declared and an undeclared
/// field.
const METRICS: &str = "count,count_where(severity>=error) as errors,error_rate,\
ratio(count_where(type=end),count) as end_share,sum(/latency_ms),avg(/latency_ms),\
min(/latency_ms),max(/latency_ms),p50(/latency_ms),p95(/latency_ms),sum(/tokens),\
max(/tokens),p90(/tokens),first_seen,last_seen";
const VISIBLE: usize = 15;
/// Only the declared field: answered from numeric columns.
const DECLARED: &str = "count,count_where(severity>=error) as errors,error_rate,\
sum(/latency_ms),p95(/latency_ms),max(/latency_ms)";

fn event_strategy() -> impl Strategy<Value = Event> {
    (
        0u32..300,
        0i64..(9 * DAY),
        (0usize..3, 0usize..3, 0usize..5),
        proptest::option::of(0u32..5),
        proptest::collection::btree_set(0usize..5, 0..=3),
        // latency: none, a string, or a number in halves
        (0u8..10, 0u32..2000),
        proptest::option::of(0u32..50),
        proptest::option::of(0usize..2),
    )
        .prop_map(
            |(id, ts, (s, t, sev), corr, tags, (lkind, lat), tokens, model)| {
                let mut data = serde_json::Map::new();
                match lkind {
                    0 => {}
                    1 => {
                        data.insert("latency_ms".into(), "n/a".into());
                    }
                    _ => {
                        data.insert("latency_ms".into(), (f64::from(lat) / 2.0 - 100.0).into());
                    }
                }
                if let Some(t) = tokens {
                    data.insert("tokens".into(), t.into());
                }
                if let Some(m) = model {
                    data.insert("model".into(), MODELS[m].into());
                }
                Event {
                    id: format!("id-{id}"),
                    timestamp: Timestamp(ts),
                    source: SOURCES[s].into(),
                    event_type: TYPES[t].into(),
                    severity: Severity::ALL[sev],
                    correlation_id: corr.map(|c| format!("session-{c}")),
                    tags: tags.into_iter().map(|i| TAGS[i].to_owned()).collect(),
                    data: JsonObject::from_map(&data),
                    native: None,
                }
            },
        )
}

const GROUPS: [&str; 7] = [
    "source",
    "type",
    "severity",
    "correlation_id",
    "tag:agent",
    "tag",
    "/model",
];
const BUCKETS: [(&str, &str); 5] = [
    ("hour", ""),
    ("day", ""),
    ("day", "+02:00"),
    ("day", "-05:30"),
    ("week", "+01:00"),
];
const ORDERS: [&str; 5] = [
    "key",
    "count",
    "errors:desc",
    "error_rate",
    "p95(/latency_ms):asc",
];

#[derive(Debug, Clone)]
struct Agg {
    group_by: Vec<usize>,
    bucket: Option<usize>,
    order: usize,
    limit: usize,
    filter_type: Option<usize>,
    min_severity: Option<usize>,
    range: Option<(i64, i64)>,
    /// 0: counts only; 1: every metric; 2: declared-field metrics only.
    set: u8,
}

fn agg_strategy() -> impl Strategy<Value = Agg> {
    (
        proptest::collection::btree_set(0usize..7, 0..=2),
        proptest::option::of(0usize..5),
        0usize..5,
        1usize..40,
        proptest::option::of(0usize..3),
        proptest::option::of(0usize..5),
        proptest::option::of((0i64..(9 * DAY), 0i64..(9 * DAY))),
        0u8..3,
    )
        .prop_map(
            |(g, bucket, order, limit, filter_type, min_severity, range, set)| Agg {
                group_by: g.into_iter().collect(),
                bucket,
                order,
                limit,
                filter_type,
                min_severity,
                range: range.map(|(a, b)| (a.min(b), a.max(b))),
                set,
            },
        )
}

impl Agg {
    fn build(&self) -> Aggregation {
        let filter = Query {
            types: self
                .filter_type
                .map(|t| vec![TYPES[t].to_owned()])
                .unwrap_or_default(),
            min_severity: self.min_severity.map(|s| Severity::ALL[s]),
            start: self.range.map(|r| Timestamp(r.0)),
            end: self.range.map(|r| Timestamp(r.1)),
            ..Query::default()
        };
        let metrics = match self.set {
            0 => "count,count_where(severity>=error) as errors,error_rate",
            1 => METRICS,
            _ => DECLARED,
        };
        let order = match (self.set, ORDERS[self.order]) {
            (0, "p95(/latency_ms):asc") => "count:asc",
            (_, o) => o,
        };
        Aggregation::from_text(
            filter,
            &AggregationText {
                group_by: self.group_by.iter().map(|g| GROUPS[*g]).collect(),
                bucket: self.bucket.map(|b| BUCKETS[b].0),
                tz_offset: self.bucket.map(|b| BUCKETS[b].1),
                metrics: Some(metrics),
                order_by: Some(order),
                limit: Some(self.limit),
            },
        )
        .unwrap()
    }
}

/// The bucket start of `ts`, computed from calendar rules.
fn model_bucket(ts: i64, b: usize) -> i64 {
    let (unit, offset) = BUCKETS[b];
    let off = match offset {
        "" => 0,
        "+02:00" => 2 * HOUR,
        "-05:30" => -(5 * HOUR + 30 * 60_000_000),
        "+01:00" => HOUR,
        _ => unreachable!(),
    };
    let local = ts + off;
    let start_local = match unit {
        "hour" => local - local.rem_euclid(HOUR),
        "day" => local - local.rem_euclid(DAY),
        "week" => {
            let day_start = local - local.rem_euclid(DAY);
            let days = day_start.div_euclid(DAY);
            // 1970-01-05 was a Monday.
            day_start - (days - 4).rem_euclid(7) * DAY
        }
        _ => unreachable!(),
    };
    start_local - off
}

fn number(e: &Event, key: &str) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(e.data.as_str()).unwrap();
    v.get(key)?.as_f64()
}

fn keys_of(e: &Event, g: &str) -> Vec<Option<String>> {
    match g {
        "source" => vec![Some(e.source.clone())],
        "type" => vec![Some(e.event_type.clone())],
        "severity" => vec![Some(e.severity.as_str().to_owned())],
        "correlation_id" => vec![e.correlation_id.clone()],
        "tag" | "tag:agent" => {
            let v: Vec<Option<String>> = e
                .tags
                .iter()
                .filter_map(|t| {
                    if g == "tag" {
                        Some(t.clone())
                    } else {
                        t.strip_prefix("agent:").map(str::to_owned)
                    }
                })
                .map(Some)
                .collect();
            if v.is_empty() { vec![None] } else { v }
        }
        "/model" => {
            let v: serde_json::Value = serde_json::from_str(e.data.as_str()).unwrap();
            vec![v.get("model").and_then(|m| m.as_str()).map(str::to_owned)]
        }
        _ => unreachable!(),
    }
}

type ModelKey = (i64, Vec<Option<String>>);
type ModelRow = (ModelKey, Vec<Option<f64>>);

fn percentile(values: &mut [f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[(q * (values.len() as f64 - 1.0)) as usize])
}

/// The visible metric values over `events`.
fn model_values(events: &[&Event], set: u8) -> Vec<Option<f64>> {
    let count = events.len() as f64;
    let errors = events
        .iter()
        .filter(|e| e.severity >= Severity::Error)
        .count() as f64;
    let rate = (count > 0.0).then(|| errors / count);
    let mut vals = vec![Some(count), Some(errors), rate];
    if set == 2 {
        let mut lat: Vec<f64> = events
            .iter()
            .filter_map(|e| number(e, "latency_ms"))
            .collect();
        vals.push((!lat.is_empty()).then(|| lat.iter().sum::<f64>()));
        vals.push(percentile(&mut lat, 0.95));
        vals.push(lat.iter().copied().reduce(f64::max));
    }
    if set == 1 {
        let ends = events.iter().filter(|e| e.event_type == "end").count() as f64;
        vals.push((count > 0.0).then(|| ends / count));
        let mut lat: Vec<f64> = events
            .iter()
            .filter_map(|e| number(e, "latency_ms"))
            .collect();
        let mut tok: Vec<f64> = events.iter().filter_map(|e| number(e, "tokens")).collect();
        let sum = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>());
        vals.push(sum(&lat));
        vals.push(sum(&lat).map(|s| s / lat.len() as f64));
        vals.push(lat.iter().copied().reduce(f64::min));
        vals.push(lat.iter().copied().reduce(f64::max));
        vals.push(percentile(&mut lat, 0.5));
        vals.push(percentile(&mut lat, 0.95));
        vals.push(sum(&tok));
        vals.push(tok.iter().copied().reduce(f64::max));
        vals.push(percentile(&mut tok, 0.9));
        let times = events.iter().map(|e| e.timestamp.as_micros() as f64);
        vals.push(times.clone().reduce(f64::min));
        vals.push(times.reduce(f64::max));
    }
    vals
}

/// Every group with its visible metric values, in result order, cut to
/// the limit.
fn model(stored: &[Event], a: &Agg) -> (u64, u64, Vec<ModelRow>, Vec<Option<f64>>) {
    let agg = a.build();
    let mut groups: BTreeMap<ModelKey, Vec<&Event>> = BTreeMap::new();
    let mut matched = 0;
    let mut all = Vec::new();
    for e in stored {
        if !evdb::query::matches(&agg.filter, e) {
            continue;
        }
        matched += 1;
        all.push(e);
        let bucket = a
            .bucket
            .map_or(0, |b| model_bucket(e.timestamp.as_micros(), b));
        let mut combos: Vec<Vec<Option<String>>> = vec![vec![]];
        for g in &a.group_by {
            let values = keys_of(e, GROUPS[*g]);
            combos = combos
                .into_iter()
                .flat_map(|c| {
                    values.iter().map(move |v| {
                        let mut c = c.clone();
                        c.push(v.clone());
                        c
                    })
                })
                .collect();
        }
        for c in combos {
            groups.entry((bucket, c)).or_default().push(e);
        }
    }
    let mut rows: Vec<ModelRow> = groups
        .into_iter()
        .map(|(k, events)| (k, model_values(&events, a.set)))
        .collect();
    // The engine's order: the metric (nulls last), then bucket, then keys
    // with missing values last.
    let key_cmp = |a: &ModelKey, b: &ModelKey| {
        a.0.cmp(&b.0).then_with(|| {
            for (x, y) in a.1.iter().zip(&b.1) {
                let o = match (x, y) {
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
    let order = ORDERS[a.order];
    let (metric, desc) = match (a.set, order) {
        (_, "key") => (None, false),
        (_, "count") => (Some(0), true),
        (_, "errors:desc") => (Some(1), true),
        (_, "error_rate") => (Some(2), true),
        (0, _) => (Some(0), false),
        (1, _) => (Some(9), false),
        _ => (Some(4), false),
    };
    rows.sort_by(|x, y| match metric {
        None => key_cmp(&x.0, &y.0),
        Some(i) => {
            let o = match (x.1[i], y.1[i]) {
                (Some(p), Some(q)) => {
                    let o = p.total_cmp(&q);
                    if desc { o.reverse() } else { o }
                }
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (None, None) => Ordering::Equal,
            };
            o.then_with(|| key_cmp(&x.0, &y.0))
        }
    });
    let total = rows.len() as u64;
    rows.truncate(a.limit);
    (matched, total, rows, model_values(&all, a.set))
}

fn check(got: &AggregateResult, stored: &[Event], a: &Agg) {
    let (matched, total, want, totals) = model(stored, a);
    let got_totals: Vec<Option<f64>> = got.totals.iter().map(|v| v.as_f64()).collect();
    assert_eq!(got_totals, totals, "totals for {a:?}");
    assert_eq!(got.matched, matched, "matched for {a:?}");
    assert_eq!(got.group_count, total, "groups for {a:?}");
    let got_rows: Vec<ModelRow> = got
        .groups
        .iter()
        .map(|g| {
            (
                (g.bucket.map_or(0, |b| b.as_micros()), g.key.clone()),
                g.values.iter().map(|v| v.as_f64()).collect(),
            )
        })
        .collect();
    assert_eq!(got_rows, want, "aggregation {a:?}");
    let simple = a.bucket.is_none() && a.group_by.len() <= 1 && !a.group_by.contains(&6);
    match a.set {
        0 if simple => assert_eq!(got.strategy, "bitmap"),
        2 if simple => assert_eq!(got.strategy, "columns"),
        _ => assert_eq!(got.strategy, "rows"),
    }
    if a.set == 2 && matched > 0 && !a.group_by.contains(&6) {
        assert_eq!(got.value_path, ValuePath::Columns);
    }
    if a.set == 1 {
        assert_eq!(got.metrics.len(), VISIBLE);
        assert!(got.exact, "small groups are exact");
        // /tokens is not declared: it always needs the records.
        if matched > 0 {
            assert!(
                matches!(got.value_path, ValuePath::Mixed | ValuePath::Json),
                "{:?}",
                got.value_path
            );
        }
    }
    for g in &got.groups {
        assert!(matches!(g.values[0], MetricValue::Count(_)));
    }
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<Event>),
    Aggregate(Agg),
    Seal,
    Reopen,
    DeleteId(usize),
    DeleteType(usize),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => proptest::collection::vec(event_strategy(), 1..40).prop_map(Op::Append),
        4 => agg_strategy().prop_map(Op::Aggregate),
        1 => Just(Op::Seal),
        1 => Just(Op::Reopen),
        1 => any::<usize>().prop_map(Op::DeleteId),
        1 => (0usize..3).prop_map(Op::DeleteType),
    ]
}

fn config() -> Config {
    let mut c = Config::default();
    c.storage.segment_size_bytes = 64 * 1024;
    c.storage.block_size_bytes = 2048;
    c.numeric_fields = vec!["/latency_ms".into()];
    c
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(dir.path(), config()).unwrap();
    let mut stored: Vec<Event> = Vec::new();
    let mut ids: HashSet<String> = HashSet::new();
    for op in ops {
        match op {
            Op::Append(events) => {
                db.append_batch(events.clone()).unwrap();
                for e in events {
                    if ids.insert(e.id.clone()) {
                        stored.push(e);
                    }
                }
            }
            Op::Aggregate(a) => {
                let got = db.aggregate(&a.build()).unwrap();
                check(&got, &stored, &a);
            }
            Op::Seal => db.seal().unwrap(),
            Op::Reopen => {
                db.close().unwrap();
                drop(db);
                db = Db::open(dir.path(), config()).unwrap();
            }
            Op::DeleteId(i) => {
                if !stored.is_empty() {
                    let e = stored.remove(i % stored.len());
                    assert!(db.delete(&e.id).unwrap());
                }
            }
            Op::DeleteType(t) => {
                let q = Query {
                    types: vec![TYPES[t].to_owned()],
                    ..Query::default()
                };
                db.delete_matching(&q).unwrap();
                stored.retain(|e| e.event_type != TYPES[t]);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn aggregations_equal_the_model(ops in proptest::collection::vec(op_strategy(), 1..30)) {
        run(ops);
    }
}

/// A group larger than the exact threshold is sketched: every percentile
/// lies within the documented relative error of the exact value at the
/// same rank; sum, min, max and count stay exact.
#[test]
fn large_groups_use_a_sketch_within_its_documented_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), config()).unwrap();
    let mut values = Vec::new();
    let mut events = Vec::new();
    for i in 0..5000u32 {
        // A skewed, latency-like distribution.
        let v = f64::from(1 + (i * 7919) % 997) * if i % 10 == 0 { 13.0 } else { 1.0 };
        values.push(v);
        let mut e = Event::new("alpha", "tool_call");
        e.data = JsonObject::parse(&format!(r#"{{"latency_ms":{v}}}"#)).unwrap();
        e.timestamp = Timestamp(i64::from(i));
        events.push(e);
        if events.len() == 1000 {
            db.append_batch(std::mem::take(&mut events)).unwrap();
        }
    }
    db.seal().unwrap();
    let agg = Aggregation::from_text(
        Query::default(),
        &AggregationText {
            metrics: Some("count,sum(/latency_ms),min(/latency_ms),max(/latency_ms),p50(/latency_ms),p90(/latency_ms),p95(/latency_ms),p99(/latency_ms)"),
            ..AggregationText::default()
        },
    )
    .unwrap();
    let got = db.aggregate(&agg).unwrap();
    assert!(!got.exact);
    assert_eq!(got.value_path, ValuePath::Columns);
    let row = &got.groups[0];
    assert_eq!(row.values[0], MetricValue::Count(5000));
    assert_eq!(row.values[1].as_f64(), Some(values.iter().sum()));
    let mut sorted = values.clone();
    sorted.sort_by(f64::total_cmp);
    assert_eq!(row.values[2].as_f64(), Some(sorted[0]));
    assert_eq!(row.values[3].as_f64(), Some(sorted[4999]));
    for (i, q) in [0.5, 0.9, 0.95, 0.99].into_iter().enumerate() {
        let exact = sorted[(q * 4999.0) as usize];
        let est = row.values[4 + i].as_f64().unwrap();
        assert!(
            (est - exact).abs() <= SKETCH_RELATIVE_ERROR * exact.abs() + 1e-9,
            "p{q}: {est} vs exact {exact}"
        );
    }
}

/// Sealed segments keep per-term summaries of declared fields: a question
/// over whole segments merges them (strategy `summaries`) and agrees with
/// the rows (exact counts, sums, min and max; percentiles within the
/// sketch's error); once a filter or a delete narrows a segment, its rows
/// are read instead.
#[test]
fn sealed_summaries_agree_with_the_rows() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config();
    config.storage.segment_size_bytes = 16 << 20;
    let db = Db::open(dir.path(), config).unwrap();
    let mut events = Vec::new();
    for i in 0..6000u32 {
        let mut e = Event::new(SOURCES[(i % 2) as usize], TYPES[(i % 3) as usize]);
        let v = f64::from((i * 7919) % 5000) / 2.0;
        e.data = JsonObject::parse(&format!(r#"{{"latency_ms":{v}}}"#)).unwrap();
        e.timestamp = Timestamp(i64::from(i));
        events.push(e);
    }
    for chunk in events.chunks(1000) {
        db.append_batch(chunk.to_vec()).unwrap();
    }
    db.seal().unwrap();
    let ask = |filter: Query| {
        let agg = Aggregation::from_text(
            filter,
            &AggregationText {
                group_by: vec!["type"],
                metrics: Some(
                    "count,sum(/latency_ms),min(/latency_ms),max(/latency_ms),p95(/latency_ms)",
                ),
                ..AggregationText::default()
            },
        )
        .unwrap();
        db.aggregate(&agg).unwrap()
    };
    let check = |got: &AggregateResult, events: &[&Event]| {
        assert_eq!(got.groups.len(), TYPES.len());
        for g in &got.groups {
            let t = g.key[0].clone().unwrap();
            let mut v: Vec<f64> = events
                .iter()
                .filter(|e| e.event_type == t)
                .filter_map(|e| number(e, "latency_ms"))
                .collect();
            assert_eq!(g.values[0].as_f64(), Some(v.len() as f64));
            assert_eq!(g.values[1].as_f64(), Some(v.iter().sum::<f64>()));
            assert_eq!(g.values[2].as_f64(), v.iter().copied().reduce(f64::min));
            assert_eq!(g.values[3].as_f64(), v.iter().copied().reduce(f64::max));
            let exact = percentile(&mut v, 0.95).unwrap();
            let est = g.values[4].as_f64().unwrap();
            assert!(
                (est - exact).abs() <= SKETCH_RELATIVE_ERROR * exact,
                "{est} vs {exact}"
            );
        }
    };
    let all: Vec<&Event> = events.iter().collect();
    let got = ask(Query::default());
    assert_eq!(got.strategy, "summaries");
    check(&got, &all);
    // A filter that narrows the segment: rows, same answers.
    let alpha = Query {
        sources: vec!["alpha".into()],
        ..Query::default()
    };
    let got = ask(alpha.clone());
    assert_eq!(got.strategy, "columns");
    let some: Vec<&Event> = events.iter().filter(|e| e.source == "alpha").collect();
    check(&got, &some);
    // A delete: the segment is no longer whole.
    db.delete(&events[0].id).unwrap();
    let got = ask(Query::default());
    assert_eq!(got.strategy, "columns");
    check(&got, &all[1..]);
}

/// A request that would decode more events than `[limits] query_decode_max`
/// is refused before it starts, naming what made it costly; narrower
/// filters or a declared field are accepted.
#[test]
fn costly_decodes_are_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config();
    config.limits.query_decode_max = 10;
    let db = Db::open(dir.path(), config).unwrap();
    let events: Vec<Event> = (0..20u32)
        .map(|i| {
            let mut e = Event::new(SOURCES[(i % 4 / 3) as usize], "t");
            e.data = JsonObject::parse(&format!(
                r#"{{"latency_ms":{i},"tokens":{i},"model":"m{}"}}"#,
                i % 2
            ))
            .unwrap();
            e
        })
        .collect();
    db.append_batch(events).unwrap();
    let refused = |r: Result<AggregateResult, evdb::DbError>| match r {
        Err(evdb::DbError::Query(evdb::query::QueryError::Invalid { field, reason })) => {
            assert!(reason.contains("query_decode_max"), "{reason}");
            field
        }
        other => panic!("expected a refusal, got {other:?}"),
    };
    let agg = |filter: Query, group_by: Vec<&str>, metrics: &str| {
        Aggregation::from_text(
            filter,
            &AggregationText {
                group_by,
                metrics: Some(metrics),
                ..AggregationText::default()
            },
        )
        .unwrap()
    };
    // Undeclared pointer over 20 events: refused; declared: answered.
    assert_eq!(
        refused(db.aggregate(&agg(Query::default(), vec![], "sum(/tokens)"))),
        "metrics"
    );
    assert_eq!(
        refused(db.aggregate(&agg(Query::default(), vec!["/model"], "count"))),
        "group_by"
    );
    assert!(
        db.aggregate(&agg(Query::default(), vec![], "sum(/latency_ms)"))
            .is_ok()
    );
    // Narrowed to 5 events ("beta"), the undeclared pointer is fine.
    let beta = Query {
        sources: vec!["beta".into()],
        ..Query::default()
    };
    let got = db
        .aggregate(&agg(beta.clone(), vec![], "sum(/tokens)"))
        .unwrap();
    assert_eq!(
        got.totals[0].as_f64(),
        Some((3..20).step_by(4).sum::<u32>() as f64)
    );
    // `text` over everything is refused for queries, stats and aggregations.
    let text = Query {
        text: Some("m1".into()),
        ..Query::default()
    };
    assert!(db.query(&text).is_err());
    assert!(db.stats(&text).is_err());
    assert_eq!(refused(db.aggregate(&agg(text, vec![], "count"))), "text");
    let narrow = Query {
        text: Some("m1".into()),
        ..beta
    };
    assert_eq!(db.query(&narrow).unwrap().events.len(), 5);
}
