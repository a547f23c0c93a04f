//! Append throughput through the library API, `--fsync always`, with
//! seed-shaped events (~300 bytes of JSON data each):
//! - `batch1000`: one caller appending batches of 1,000 events;
//! - `single_64_writers`: 64 threads appending one event per call, which only
//!   group commit makes fast;
//! - `encode`: the caller-side cost of validating and framing one event;
//! - `seal`: the sealer's cost per event (block compression with a trained
//!   dictionary, id table, text filter) for a 20,000-event log, written to
//!   a temporary file (its fsyncs included);
//! - `index/stage1000`: what an appender spends indexing a batch of 1,000
//!   in the open segment's in-memory index (staging, then making the rows
//!   visible), into an index already holding 100,000 to 300,000 rows as
//!   an open segment does.
//!
//! Each iteration uses fresh, never-seen ids so that nothing is a duplicate.
#![allow(clippy::expect_used)] // a bench that cannot set up has nothing to measure

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use evdb::generator::Generator;
use evdb::storage::{Compression, Prepared, frame, segment};
use evdb::{Config, Db, Timestamp};

/// The allocator the `evdb` binary uses, so that figures match it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn append(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = Arc::new(Db::open(dir.path(), Config::default()).expect("open"));
    let mut generator = Generator::new(1, Timestamp(1_700_000_000_000_000), 100);

    let mut group = c.benchmark_group("append");
    group.throughput(Throughput::Elements(1000));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(8));
    group.bench_function("batch1000", |b| {
        b.iter_custom(|iters| {
            let batches: Vec<_> = (0..iters).map(|_| generator.batch(1000)).collect();
            let start = Instant::now();
            for batch in batches {
                db.append_batch(batch).expect("append");
            }
            start.elapsed()
        })
    });

    let writers = 64;
    let per_writer = 20;
    group.throughput(Throughput::Elements((writers * per_writer) as u64));
    group.sample_size(10);
    group.bench_function("single_64_writers", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let shares: Vec<_> = (0..writers).map(|_| generator.batch(per_writer)).collect();
                let start = Instant::now();
                std::thread::scope(|s| {
                    for share in shares {
                        let db = db.clone();
                        s.spawn(move || {
                            for e in share {
                                db.append(e).expect("append");
                            }
                        });
                    }
                });
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();

    let events = generator.batch(1000);
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("prepare1000", |b| {
        b.iter(|| {
            let mut prepared = Prepared::with_capacity(events.len());
            for e in &events {
                let _ = prepared.push(e, usize::MAX);
            }
            prepared.bytes()
        })
    });
    group.finish();

    let mut group = c.benchmark_group("seal");
    let n = 20_000;
    group.throughput(Throughput::Elements(n as u64));
    group.sample_size(10);
    // A log as the writer leaves it: frames salted with the segment's salt.
    let salt = frame::salt_of(1);
    let mut log = segment::encode_log_header(1).to_vec();
    let mut offsets = Vec::with_capacity(n);
    let mut payload = Vec::new();
    for e in generator.batch(n) {
        let at = log.len();
        offsets.push(at as u64);
        payload.clear();
        evdb::storage::record::encode(&e, &mut payload);
        frame::encode(frame::FrameKind::EventV1, &payload, &mut log);
        frame::xor_checksum(&mut log[at..], salt);
    }
    let seal_dir = tempfile::tempdir().expect("temp dir");
    let path = seal_dir.path().join("1.seg");
    group.bench_function("zstd_dict_20k", |b| {
        b.iter(|| {
            segment::write_sealed(&path, 1, salt, &log, &offsets, Compression::ZstdDict, 8192)
                .expect("seal")
        })
    });
    group.finish();

    let mut group = c.benchmark_group("index");
    group.throughput(Throughput::Elements(1000));
    let fill = |generator: &mut Generator| {
        let mut mem = evdb::index::MemIndex::new();
        let events = generator.batch(100_000);
        let rows: Vec<(u32, &evdb::Event)> = (0u32..).zip(&events).collect();
        mem.stage_batch(&rows);
        mem.commit_rows(&(0..100_000).collect::<Vec<u32>>());
        mem
    };
    let mut mem = fill(&mut generator);
    let mut next_row = 100_000u32;
    group.bench_function("stage1000", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if next_row >= 300_000 {
                    mem = fill(&mut generator);
                    next_row = 100_000;
                }
                let events = generator.batch(1000);
                let rows: Vec<(u32, &evdb::Event)> = (next_row..).zip(&events).collect();
                let numbers: Vec<u32> = rows.iter().map(|(r, _)| *r).collect();
                next_row += 1000;
                let start = Instant::now();
                mem.stage_batch(&rows);
                mem.commit_rows(&numbers);
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
