//! The cost of the per-source rate limit on the ingest path, per event:
//! noting each event's source (`Sources::of`) and admitting the batch
//! (`RateLimiter::admit`: one lock, one bucket update per distinct source),
//! for seed-shaped batches of 1,000 events over 8 sources and for
//! single-event requests, and the admission alone (the sources are noted
//! for the metrics whether or not a limit is set). The budget is 50 ns per
//! event.
#![allow(clippy::expect_used)] // a bench that cannot set up has nothing to measure

use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use evdb::Timestamp;
use evdb::api::metrics::Sources;
use evdb::api::ratelimit::{Rate, RateLimitConfig, RateLimiter};
use evdb::generator::Generator;

fn limiter() -> RateLimiter {
    RateLimiter::new(RateLimitConfig {
        // Never refuses here: the bench measures the bookkeeping.
        default: Some(Rate {
            per_s: 1e12,
            burst: 1e12,
        }),
        sources: Default::default(),
    })
}

fn ratelimit(c: &mut Criterion) {
    let mut generator = Generator::new(3, Timestamp(1_700_000_000_000_000), 100);
    let batch = generator.batch(1000);
    let one = generator.batch(1);
    let limiter = limiter();
    let mut group = c.benchmark_group("ratelimit");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("batch1000_8_sources", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                let sources = Sources::of(&batch);
                limiter
                    .admit(sources.counts().iter().copied())
                    .expect("admitted");
            }
            t.elapsed()
        });
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("single_event", |b| {
        b.iter(|| {
            let sources = Sources::of(&one);
            limiter
                .admit(sources.counts().iter().copied())
                .expect("admitted");
        });
    });
    // The limiter alone: `Sources` is noted for the metrics anyway.
    let sources = Sources::of(&one);
    let counts = sources.counts();
    group.bench_function("single_event_admit_only", |b| {
        b.iter(|| {
            limiter.admit(counts.iter().copied()).expect("admitted");
        });
    });
    group.finish();
}

criterion_group!(benches, ratelimit);
criterion_main!(benches);
