//! The query engine against a naive model: random events (out-of-order
//! timestamps, duplicate ids, tags from a small alphabet, shared
//! correlation ids) interleaved with queries, stats, cursor paging, seals,
//! reopens, deletes, retention and compaction; every answer must equal the
//! model's, content and order.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::{BTreeMap, HashSet};

use evdb::maintenance::{CompactOptions, CompactionPolicy, RetentionPolicy};
use evdb::query::{self, Order, Query};
use evdb::{Config, Db, Event, JsonObject, Severity, Timestamp};
use proptest::prelude::*;

const SOURCES: [&str; 3] = ["alpha", "beta", "gamma"];
const TYPES: [&str; 3] = ["start", "end", "error"];
const TAGS: [&str; 4] = ["a", "b", "c", "d"];
const WORDS: [&str; 3] = ["apple", "banana", "cherry"];

fn event_strategy() -> impl Strategy<Value = Event> {
    (
        0u32..80,
        0i64..400,
        0usize..3,
        0usize..3,
        0usize..5,
        proptest::option::of(0u32..6),
        proptest::collection::btree_set(0usize..4, 0..=4),
        0usize..3,
    )
        .prop_map(|(id, ts, s, t, sev, corr, tags, word)| Event {
            id: format!("id-{id}"),
            timestamp: Timestamp(ts),
            source: SOURCES[s].into(),
            event_type: TYPES[t].into(),
            severity: Severity::ALL[sev],
            correlation_id: corr.map(|c| format!("corr-{c}")),
            tags: tags.into_iter().map(|i| TAGS[i].to_owned()).collect(),
            data: JsonObject::parse(&format!(r#"{{"word":"{}","n":{id}}}"#, WORDS[word])).unwrap(),
            native: None,
        })
}

fn query_strategy() -> impl Strategy<Value = Query> {
    (
        proptest::collection::vec(0usize..3, 0..3),
        proptest::collection::vec(0usize..3, 0..2),
        proptest::option::of(0usize..5),
        proptest::option::of(0usize..5),
        proptest::option::of(0u32..6),
        proptest::collection::vec(0usize..4, 0..3),
        proptest::option::of((0i64..400, 0i64..400)),
        proptest::option::of(0usize..3),
        1usize..30,
        0usize..5,
        any::<bool>(),
        (
            proptest::collection::vec(0usize..5, 0..3),
            proptest::collection::vec(0usize..4, 0..3),
        ),
    )
        .prop_map(
            |(
                s,
                t,
                sev,
                min_sev,
                corr,
                tags,
                range,
                text,
                limit,
                offset,
                asc,
                (sev_any, tag_any),
            )| Query {
                sources: s.into_iter().map(|i| SOURCES[i].to_owned()).collect(),
                types: t.into_iter().map(|i| TYPES[i].to_owned()).collect(),
                severity: sev.map(|i| Severity::ALL[i]),
                min_severity: min_sev.map(|i| Severity::ALL[i]),
                severities: sev_any.into_iter().map(|i| Severity::ALL[i]).collect(),
                correlation_id: corr.map(|c| format!("corr-{c}")),
                tags: tags.into_iter().map(|i| TAGS[i].to_owned()).collect(),
                any_tags: tag_any.into_iter().map(|i| TAGS[i].to_owned()).collect(),
                start: range.map(|(a, b)| Timestamp(a.min(b))),
                end: range.map(|(a, b)| Timestamp(a.max(b))),
                text: text.map(|i| WORDS[i].to_owned()),
                limit,
                offset,
                order: if asc { Order::Asc } else { Order::Desc },
                cursor: None,
            },
        )
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<Event>),
    Query(Query),
    Stats(Query),
    /// Page through every result; compact between the first two pages
    /// when asked.
    Page(Query, bool),
    Seal,
    Reopen,
    /// Delete the stored event at this position (modulo the count).
    DeleteId(usize),
    /// Delete every event before this timestamp.
    DeleteBefore(i64),
    /// Delete every event matching the query.
    DeleteQuery(Query),
    /// Compact: `force` rewrites every segment with a deleted row, `merge`
    /// merges small segments.
    Compact {
        force: bool,
        merge: bool,
    },
    /// Retention at these cutoffs: every source, and one source's own.
    Retention(i64, Option<(usize, i64)>),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => proptest::collection::vec(event_strategy(), 1..40).prop_map(Op::Append),
        3 => query_strategy().prop_map(Op::Query),
        1 => query_strategy().prop_map(Op::Stats),
        1 => (query_strategy(), any::<bool>()).prop_map(|(q, c)| Op::Page(q, c)),
        1 => Just(Op::Seal),
        1 => Just(Op::Reopen),
        1 => any::<usize>().prop_map(Op::DeleteId),
        1 => (0i64..120).prop_map(Op::DeleteBefore),
        1 => query_strategy().prop_map(Op::DeleteQuery),
        1 => (any::<bool>(), any::<bool>()).prop_map(|(force, merge)| Op::Compact { force, merge }),
        1 => (0i64..200, proptest::option::of((0usize..3, 0i64..400)))
            .prop_map(|(cut, source)| Op::Retention(cut, source)),
    ]
}

/// The model: stored events in arrival order.
fn model_query(stored: &[Event], q: &Query) -> Vec<Event> {
    let mut hits: Vec<(i64, usize)> = stored
        .iter()
        .enumerate()
        .filter(|(_, e)| query::matches(q, e))
        .map(|(i, e)| (e.timestamp.as_micros(), i))
        .collect();
    hits.sort();
    if q.order == Order::Desc {
        hits.reverse();
    }
    hits.into_iter().map(|(_, i)| stored[i].clone()).collect()
}

fn model_stats(stored: &[Event], q: &Query) -> query::Stats {
    let mut s = query::Stats::default();
    let mut corr = HashSet::new();
    for e in stored.iter().filter(|e| query::matches(q, e)) {
        s.total += 1;
        *s.by_source.entry(e.source.clone()).or_default() += 1;
        *s.by_type.entry(e.event_type.clone()).or_default() += 1;
        *s.by_severity
            .entry(e.severity.as_str().to_owned())
            .or_default() += 1;
        if let Some(c) = &e.correlation_id {
            corr.insert(c.clone());
        }
        s.time_range = Some(match s.time_range {
            None => (e.timestamp, e.timestamp),
            Some((a, b)) => (a.min(e.timestamp), b.max(e.timestamp)),
        });
    }
    s.distinct_correlation_ids = Some(corr.len() as u64);
    s
}

fn config() -> Config {
    let mut c = Config::default();
    c.storage.segment_size_bytes = 64 * 1024;
    c.storage.block_size_bytes = 2048;
    c
}

fn compact(db: &Db, force: bool, merge: bool) {
    let opts = CompactOptions {
        policy: CompactionPolicy {
            small_segment_bytes: if merge { 1 << 20 } else { 0 },
            max_segment_bytes: 256 * 1024,
            ..CompactionPolicy::default()
        },
        force,
        ..CompactOptions::default()
    };
    db.compact(&opts, |_| {}).unwrap();
}

/// Deleted events whose bytes compaction or retention removed: their ids
/// are free again and they leave the model's list of deleted events.
fn forget_removed(db: &Db, ids: &mut HashSet<String>, deleted: &mut Vec<Event>, forced: bool) {
    let sealed: HashSet<u64> = db.log().segments().sealed.iter().map(|s| s.id).collect();
    deleted.retain(|e| match db.log().find(&e.id).unwrap() {
        Some((pos, _)) => {
            assert!(
                !(forced && sealed.contains(&pos.segment)),
                "compact --now left deleted {} in sealed segment {}",
                e.id,
                pos.segment
            );
            true
        }
        None => {
            ids.remove(&e.id);
            false
        }
    });
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(dir.path(), config()).unwrap();
    let mut stored: Vec<Event> = Vec::new();
    let mut ids: HashSet<String> = HashSet::new();
    // Deleted events leave `stored` but keep their id taken (a re-append
    // is a duplicate until compaction).
    let mut deleted: Vec<Event> = Vec::new();
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
            Op::Query(q) => {
                let want: Vec<Event> = model_query(&stored, &q)
                    .into_iter()
                    .skip(q.offset)
                    .take(q.limit)
                    .collect();
                let got = db.query(&q).unwrap();
                assert_eq!(got.events, want, "query {q:?}");
            }
            Op::Stats(q) => {
                let got = db.stats_with(&q, true).unwrap();
                let fast = db.stats(&q).unwrap();
                assert_eq!(fast.distinct_correlation_ids, None);
                assert_eq!(fast.total, got.total);
                let want = model_stats(&stored, &q);
                assert_eq!(got, want, "stats {q:?}");
            }
            Op::Page(mut q, compact_midway) => {
                q.offset = 0;
                let want = model_query(&stored, &q);
                let mut got = Vec::new();
                for page_no in 0..=stored.len() {
                    if compact_midway && page_no == 1 {
                        compact(&db, true, true);
                        forget_removed(&db, &mut ids, &mut deleted, true);
                    }
                    let page = db.query(&q).unwrap();
                    got.extend(page.events);
                    match page.next_cursor {
                        Some(c) => q.cursor = Some(c),
                        None => break,
                    }
                }
                assert_eq!(got, want, "paging {q:?}");
            }
            Op::Compact { force, merge } => {
                compact(&db, force, merge);
                forget_removed(&db, &mut ids, &mut deleted, force);
            }
            Op::Retention(cut, source) => {
                let now = Timestamp(1_000_000);
                let age = |cut: i64| std::time::Duration::from_micros((1_000_000 - cut) as u64);
                let mut policy = RetentionPolicy {
                    max_age: Some(age(cut)),
                    ..RetentionPolicy::default()
                };
                if let Some((s, c)) = source {
                    policy.sources.insert(SOURCES[s].to_owned(), age(c));
                }
                let expired = |e: &Event| match source {
                    Some((s, c)) if e.source == SOURCES[s] => e.timestamp.as_micros() < c,
                    _ => e.timestamp.as_micros() < cut,
                };
                let (gone, kept): (Vec<Event>, Vec<Event>) =
                    stored.into_iter().partition(|e| expired(e));
                let report = db.apply_retention_policy(&policy, now).unwrap();
                assert_eq!(
                    report.events_deleted,
                    gone.len() as u64,
                    "retention {cut} {source:?}"
                );
                stored = kept;
                deleted.extend(gone);
                forget_removed(&db, &mut ids, &mut deleted, false);
            }
            Op::DeleteId(i) => {
                if stored.is_empty() {
                    assert!(!db.delete("no-such-id").unwrap());
                    continue;
                }
                let e = stored.remove(i % stored.len());
                assert!(db.delete(&e.id).unwrap(), "delete {}", e.id);
                assert!(!db.delete(&e.id).unwrap(), "second delete of {}", e.id);
                assert_eq!(db.get(&e.id).unwrap(), None);
                deleted.push(e);
            }
            Op::DeleteBefore(ts) => {
                let (gone, kept): (Vec<Event>, Vec<Event>) = stored
                    .into_iter()
                    .partition(|e| e.timestamp.as_micros() < ts);
                let n = db.delete_before(Timestamp(ts)).unwrap();
                assert_eq!(n, gone.len() as u64, "delete before {ts}");
                stored = kept;
                deleted.extend(gone);
            }
            Op::DeleteQuery(q) => {
                let unfiltered = q.sources.is_empty()
                    && q.types.is_empty()
                    && q.severity.is_none()
                    && q.min_severity.is_none()
                    && q.severities.is_empty()
                    && q.correlation_id.is_none()
                    && q.tags.is_empty()
                    && q.any_tags.is_empty()
                    && q.start.is_none()
                    && q.end.is_none()
                    && q.text.is_none();
                let got = db.delete_matching(&q);
                if unfiltered {
                    assert!(got.is_err(), "an unfiltered delete must be refused");
                    continue;
                }
                let (gone, kept): (Vec<Event>, Vec<Event>) =
                    stored.into_iter().partition(|e| query::matches(&q, e));
                assert_eq!(got.unwrap(), gone.len() as u64, "delete by {q:?}");
                stored = kept;
                deleted.extend(gone);
            }
            Op::Seal => db.seal().unwrap(),
            Op::Reopen => {
                db.close().unwrap();
                drop(db);
                db = Db::open(dir.path(), config()).unwrap();
            }
        }
    }
    for e in &deleted {
        assert_eq!(db.get(&e.id).unwrap(), None, "deleted {} came back", e.id);
    }
    for e in &stored {
        assert_eq!(db.get(&e.id).unwrap().as_ref(), Some(e));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn queries_stats_and_pages_equal_the_model(ops in proptest::collection::vec(op_strategy(), 1..40)) {
        run(ops);
    }
}

/// A page boundary must hold under ingest between pages: events appended
/// after the first page never show up in later pages of that paging.
#[test]
fn paging_under_concurrent_ingest_never_repeats_or_skips() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), config()).unwrap();
    let mk = |i: u32, ts: i64| Event {
        id: format!("e{i}"),
        timestamp: Timestamp(ts),
        source: "alpha".into(),
        event_type: "start".into(),
        severity: Severity::Info,
        correlation_id: None,
        tags: vec![],
        data: JsonObject::empty(),
        native: None,
    };
    db.append_batch((0..50).map(|i| mk(i, i64::from(i % 7))).collect())
        .unwrap();
    let mut q = Query {
        limit: 7,
        ..Query::default()
    };
    let mut seen = Vec::new();
    let mut n = 50;
    loop {
        let page = db.query(&q).unwrap();
        seen.extend(page.events.into_iter().map(|e| e.id));
        // New events, some older and some newer than the cursor.
        db.append_batch(vec![mk(n, 3), mk(n + 1, 100)]).unwrap();
        n += 2;
        match page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => break,
        }
    }
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "repeated events");
    let want: BTreeMap<_, _> = (0..50).map(|i| (format!("e{i}"), ())).collect();
    let got: BTreeMap<_, _> = seen.into_iter().map(|s| (s, ())).collect();
    assert_eq!(got, want);
}

/// Top-k over segments of several time zones (1,024 rows each), with
/// timestamps out of order, before and after sealing.
#[test]
fn top_k_across_time_zones_equals_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), Config::default()).unwrap();
    let mut rng = evdb::generator::Rng::new(5);
    let events: Vec<Event> = (0..5000)
        .map(|i| Event {
            id: format!("z{i}"),
            timestamp: Timestamp(i64::from(i) * 10 + rng.below(30_000) as i64),
            source: SOURCES[rng.below(3) as usize].into(),
            event_type: TYPES[rng.below(3) as usize].into(),
            severity: Severity::ALL[rng.below(5) as usize],
            correlation_id: None,
            tags: vec![TAGS[rng.below(4) as usize].to_owned()],
            data: JsonObject::empty(),
            native: None,
        })
        .collect();
    db.append_batch(events.clone()).unwrap();
    for round in 0..2 {
        for order in [Order::Desc, Order::Asc] {
            for q in [
                Query {
                    limit: 10,
                    order,
                    ..Query::default()
                },
                Query {
                    limit: 100,
                    offset: 7,
                    order,
                    ..Query::default()
                },
                Query {
                    sources: vec!["beta".into()],
                    tags: vec!["c".into()],
                    limit: 50,
                    order,
                    ..Query::default()
                },
                Query {
                    min_severity: Some(Severity::Error),
                    start: Some(Timestamp(20_000)),
                    end: Some(Timestamp(30_000)),
                    limit: 20,
                    order,
                    ..Query::default()
                },
            ] {
                let want: Vec<Event> = model_query(&events, &q)
                    .into_iter()
                    .skip(q.offset)
                    .take(q.limit)
                    .collect();
                assert_eq!(db.query(&q).unwrap().events, want, "round {round}: {q:?}");
            }
        }
        db.seal().unwrap();
    }
}

/// Pages whose rows span many uncached blocks and `text` filters over many
/// candidates are shared with a helper thread (on a machine of two or more
/// cores); the answers are the model's.
#[test]
fn parallel_reads_equal_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.storage.segment_size_bytes = 512 << 10;
    cfg.storage.block_size_bytes = 2048;
    let db = Db::open(dir.path(), cfg).unwrap();
    let mut rng = evdb::generator::Rng::new(11);
    let events: Vec<Event> = (0..24_000)
        .map(|i| Event {
            id: format!("p{i}"),
            timestamp: Timestamp(i64::from(i) * 10 + rng.below(50_000) as i64),
            source: SOURCES[rng.below(3) as usize].into(),
            event_type: TYPES[rng.below(3) as usize].into(),
            severity: Severity::ALL[rng.below(5) as usize],
            correlation_id: Some(format!("c{}", rng.below(40))),
            tags: vec![TAGS[rng.below(4) as usize].to_owned()],
            data: JsonObject::parse(&format!(
                r#"{{"word":"{}","n":{i}}}"#,
                WORDS[rng.below(3) as usize]
            ))
            .unwrap(),
            native: None,
        })
        .collect();
    for chunk in events.chunks(1000) {
        db.append_batch(chunk.to_vec()).unwrap();
    }
    db.seal().unwrap();
    let rows: Vec<u32> = db.log().segments().sealed.iter().map(|s| s.rows).collect();
    // Several segments, each with more rows than the parallel text path
    // needs (4,096 candidates).
    assert!(
        rows.len() >= 3 && rows.iter().all(|&r| r > 4096),
        "{rows:?}"
    );
    for order in [Order::Desc, Order::Asc] {
        for q in [
            Query {
                min_severity: Some(Severity::Warning),
                limit: 1000,
                order,
                ..Query::default()
            },
            Query {
                correlation_id: Some("c7".into()),
                limit: 1000,
                order,
                ..Query::default()
            },
            Query {
                text: Some("banana".into()),
                limit: 1000,
                order,
                ..Query::default()
            },
            Query {
                text: Some("\"n\":1234}".into()),
                limit: 10,
                order,
                ..Query::default()
            },
        ] {
            let want: Vec<Event> = model_query(&events, &q).into_iter().take(q.limit).collect();
            assert_eq!(db.query(&q).unwrap().events, want, "{q:?}");
        }
    }
    let q = Query {
        text: Some("cherry".into()),
        ..Query::default()
    };
    let got = db.stats(&q).unwrap();
    let want = model_stats(&events, &q);
    assert_eq!(
        (got.total, &got.by_source, &got.by_severity),
        (want.total, &want.by_source, &want.by_severity)
    );
}

/// Queries racing appends, rolls and seals never miss an acknowledged event
/// and never see one twice.
#[test]
fn queries_during_rolls_and_seals_see_every_acknowledged_event() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(Db::open(dir.path(), config()).unwrap());
    let acked = Arc::new(AtomicU64::new(0));
    let events = evdb::generator::Generator::new(8, Timestamp(0), 1000).batch(6000);
    std::thread::scope(|s| {
        let (db2, acked2) = (db.clone(), acked.clone());
        s.spawn(move || {
            for chunk in events.chunks(50) {
                db2.append_batch(chunk.to_vec()).unwrap();
                acked2.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
        });
        for _ in 0..200 {
            let before = acked.load(Ordering::SeqCst);
            let total = db.stats(&Query::default()).unwrap().total;
            let after = acked.load(Ordering::SeqCst);
            assert!(
                total >= before,
                "stats saw {total}, {before} were acknowledged"
            );
            assert!(
                total <= after + 50,
                "stats saw {total}, at most {after} stored"
            );
            let page = db
                .query(&Query {
                    limit: 1000,
                    ..Query::default()
                })
                .unwrap();
            let ids: HashSet<_> = page.events.iter().map(|e| e.id.clone()).collect();
            assert_eq!(ids.len(), page.events.len(), "an event seen twice");
        }
    });
    assert_eq!(db.stats(&Query::default()).unwrap().total, 6000);
}

/// The decode limit counts what a `text` search would really read: rows
/// in block groups that sealed segments' text filters rule out are not
/// counted, so a selective needle over many events is answered while a
/// needle every event holds is refused.
#[test]
fn the_text_cost_limit_counts_only_groups_the_filter_keeps() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.storage.block_size_bytes = 2048;
    cfg.limits.query_decode_max = 2_000;
    let db = Db::open(dir.path(), cfg).unwrap();
    let events: Vec<Event> = (0..20_000u32)
        .map(|i| {
            let mut e = Event::new(SOURCES[(i % 3) as usize], TYPES[0]);
            e.id = format!("t{i}");
            e.timestamp = Timestamp(i64::from(i));
            e.data = JsonObject::parse(&format!(r#"{{"word":"apple","n":{i}}}"#)).unwrap();
            e
        })
        .collect();
    for chunk in events.chunks(1000) {
        db.append_batch(chunk.to_vec()).unwrap();
    }
    db.seal().unwrap();
    let selective = Query {
        text: Some("\"n\":12345}".into()),
        ..Query::default()
    };
    let got = db.query(&selective).unwrap();
    assert_eq!(got.events.len(), 1);
    assert_eq!(got.events[0].id, "t12345");
    assert_eq!(db.stats(&selective).unwrap().total, 1);
    let broad = Query {
        text: Some("apple".into()),
        ..Query::default()
    };
    match db.query(&broad) {
        Err(evdb::DbError::Query(query::QueryError::Invalid { field, reason })) => {
            assert_eq!(field, "text");
            assert!(reason.contains("query_decode_max"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}
