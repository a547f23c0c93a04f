//! Query and stats latency through the library API, over a store of
//! seed-shaped events built once (200,000 events by default, in about 40
//! sealed segments; `EVDB_BENCH_QUERY_EVENTS` sets the size):
//! - `newest100_source_minsev_tag`: newest 100 with source ∧ severity ≥ error
//!   ∧ tag, parameters rotating over the sources and tags;
//! - `newest100_all`: newest 100 overall;
//! - `correlation_id`: every event of one correlation id, oldest first;
//! - `stats_all`: counts grouped by source, type and severity over all;
//! - `text_substring`: a substring of `data`, no other filter (a full scan).
//!
//! `evdb bench query,stats` runs the same shapes at 10 M events next to
//! SQLite; this bench is the quick loop for work on the query path.
#![allow(clippy::expect_used)] // a bench that cannot set up has nothing to measure

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use evdb::event::Severity;
use evdb::generator::{Generator, SOURCES, TAGS};
use evdb::query::{Order, Query};
use evdb::storage::FsyncMode;
use evdb::{Config, Db, Timestamp};

/// The allocator the `evdb` binary uses, so that figures match it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn events() -> u64 {
    std::env::var("EVDB_BENCH_QUERY_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000)
}

/// Loads `n` events in batches of 10,000, closes and reopens the store;
/// returns it with some correlation ids that occur in it.
fn build(dir: &std::path::Path, n: u64) -> (Db, Vec<String>) {
    let mut config = Config::default();
    config.storage.fsync = FsyncMode::Never;
    // About 450 bytes of log per event: some 40 segments.
    config.storage.segment_size_bytes = (n * 450 / 40).clamp(1 << 20, 128 << 20);
    config.limits.query_decode_max = u64::MAX;
    let db = Db::open(dir, config.clone()).expect("open");
    let mut generator = Generator::new(7, Timestamp(1_700_000_000_000_000), 100);
    let mut correlation_ids = Vec::new();
    let mut done = 0;
    while done < n {
        let k = (n - done).min(10_000) as usize;
        let batch = generator.batch(k);
        correlation_ids.extend(
            batch
                .iter()
                .step_by(997)
                .filter_map(|e| e.correlation_id.clone()),
        );
        db.append_batch(batch).expect("append");
        done += k as u64;
    }
    db.close().expect("close");
    drop(db);
    (Db::open(dir, config).expect("reopen"), correlation_ids)
}

fn query(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (db, correlation_ids) = build(dir.path(), events());

    let mut group = c.benchmark_group("query");
    group.sample_size(50);
    group.measurement_time(Duration::from_secs(5));
    let mut i = 0usize;
    group.bench_function("newest100_source_minsev_tag", |b| {
        b.iter(|| {
            i += 1;
            db.query(&Query {
                sources: vec![SOURCES[i % 4].to_owned()],
                min_severity: Some(Severity::Error),
                tags: vec![TAGS[i % TAGS.len()].to_owned()],
                limit: 100,
                ..Query::default()
            })
            .expect("query")
        })
    });
    group.bench_function("newest100_all", |b| {
        b.iter(|| {
            db.query(&Query {
                limit: 100,
                ..Query::default()
            })
            .expect("query")
        })
    });
    group.bench_function("correlation_id", |b| {
        b.iter(|| {
            i += 1;
            db.query(&Query {
                correlation_id: Some(correlation_ids[i % correlation_ids.len()].clone()),
                limit: 1000,
                order: Order::Asc,
                ..Query::default()
            })
            .expect("query")
        })
    });
    group.bench_function("stats_all", |b| {
        b.iter(|| db.stats(&Query::default()).expect("stats"))
    });
    group.sample_size(10);
    group.bench_function("text_substring", |b| {
        b.iter(|| {
            db.query(&Query {
                text: Some("\"user_id\":\"u-04242\"".to_owned()),
                limit: 100,
                ..Query::default()
            })
            .expect("query")
        })
    });
    group.finish();
    db.close().expect("close");
}

criterion_group!(benches, query);
criterion_main!(benches);
