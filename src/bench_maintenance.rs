//! `evdb bench maintenance`: deletes, snapshots and compaction over the
//! query dataset (seed-shaped events in at least 40 segments).
//!
//! * delete by query (one source at `min_severity=error`, five sources):
//!   the median time until the call returns (durable, effective), next to
//!   the same `DELETE` in the SQLite baseline;
//! * a snapshot of the whole store: the median of three, next to the
//!   issue's target (1 s for any size: sealed segments are hard links);
//! * compaction rewriting every segment (after those deletes, `--now`):
//!   input bytes per second, next to the 200 MB/s target;
//! * append latency (100-event batches, `--fsync always`, one every 5 ms)
//!   while compaction runs, next to the same appends without it (p99): at
//!   full speed, and again (after as many deletes) under a 16 MiB/s limit;
//! * the same appends while size retention drops the oldest sealed
//!   segments (about half the bytes): p99 and the slowest append, next to
//!   those without it.

use std::time::{Duration, Instant};

use rusqlite::params;

use crate::bench::{BenchOptions, Figure, build_dataset, percentile, progress};
use crate::event::{Severity, Timestamp};
use crate::generator::{Generator, SOURCES};
use crate::maintenance::{CompactOptions, CompactReport, CompactionPolicy};
use crate::query::Query;
use crate::storage::FsyncMode;
use crate::{Config, Db};

/// Appends a 100-event batch every 5 ms until `stop` says so (at least
/// `min` long); returns each append's latency in ms.
fn paced_appends(
    db: &Db,
    seed: u64,
    min: Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<Vec<f64>> {
    let mut generator = Generator::new(seed, Timestamp::now(), 10);
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut next = Instant::now();
    while started.elapsed() < min || !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let batch = generator.batch(100);
        let t = Instant::now();
        db.append_batch(batch)?;
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
        next += Duration::from_millis(5);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        } else {
            next = Instant::now();
        }
    }
    Ok(latencies)
}

/// Compacts (`--now`) under `io_limit` while appending at a steady pace;
/// returns the report and each append's latency.
fn compact_with_appends(
    db: &Db,
    io_limit: u64,
    seed: u64,
) -> anyhow::Result<(CompactReport, Vec<f64>)> {
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let appender = s.spawn(|| paced_appends(db, seed, Duration::from_secs(1), &stop));
        let report = db.compact(
            &CompactOptions {
                force: true,
                policy: CompactionPolicy {
                    io_bytes_per_sec: io_limit,
                    ..CompactionPolicy::default()
                },
                ..CompactOptions::default()
            },
            |_| {},
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let latencies = appender
            .join()
            .map_err(|_| anyhow::anyhow!("the appender panicked"))?;
        Ok((report?, latencies?))
    })
}

/// Applies size retention that drops the oldest sealed segments while
/// appending at a steady pace (half a second before, and on for two
/// seconds in all: the file system frees the blocks after the call
/// returns); returns the report and each append's latency.
fn retention_with_appends(
    db: &Db,
    max_bytes: u64,
    seed: u64,
) -> anyhow::Result<(crate::maintenance::RetentionReport, Vec<f64>)> {
    let stop = std::sync::atomic::AtomicBool::new(true);
    std::thread::scope(|s| {
        let appender = s.spawn(|| paced_appends(db, seed, Duration::from_secs(2), &stop));
        std::thread::sleep(Duration::from_millis(500));
        let policy = crate::maintenance::RetentionPolicy {
            max_bytes: Some(max_bytes),
            ..Default::default()
        };
        let report = db.apply_retention_policy(&policy, Timestamp::now());
        let latencies = appender
            .join()
            .map_err(|_| anyhow::anyhow!("the appender panicked"))?;
        Ok((report?, latencies?))
    })
}

pub fn maintenance(opts: &BenchOptions) -> anyhow::Result<Vec<Figure>> {
    let n = opts.events;
    let ds = build_dataset(opts)?;
    let mut figures = Vec::new();
    // Reopen with acknowledged-means-durable appends, as a daemon runs.
    let (old, sqlite, path, keep_dirs) = ds.split();
    old.close()?;
    drop(old);
    let mut config = Config::default();
    config.storage.fsync = FsyncMode::Always;
    config.storage.segment_size_bytes = (n * 450 / 40).clamp(1 << 20, 128 << 20);
    config.limits.query_decode_max = u64::MAX;
    let db = Db::open(&path, config)?;

    // Snapshots.
    progress(opts, "snapshots");
    let segments = db.log().segments().sealed.len();
    let bytes: u64 = db.log().segments().sealed_bytes();
    let mut snap_ms = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let info = db.snapshot()?;
        snap_ms.push(t.elapsed().as_secs_f64() * 1e3);
        db.delete_snapshot(&info.id)?;
    }
    figures.push(Figure::new(
        "maintenance",
        &format!("snapshot ({segments} sealed segments, {} MiB)", bytes >> 20),
        n,
        "ms_p50",
        percentile(&mut snap_ms, 0.5),
        "target",
        1000.0,
    ));

    // Delete by query, evdb and SQLite, the same five filters.
    progress(opts, "delete by query");
    let mut evdb_ms = Vec::new();
    let mut sqlite_ms = Vec::new();
    let mut deleted = 0u64;
    for source in SOURCES.iter().take(5) {
        let q = Query {
            sources: vec![(*source).to_owned()],
            min_severity: Some(Severity::Error),
            ..Query::default()
        };
        let t = Instant::now();
        let d = db.delete_matching(&q)?;
        evdb_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let s = sqlite.execute(
            "DELETE FROM events WHERE source_system = ?1 AND severity >= ?2",
            params![source, Severity::Error.as_u8()],
        )?;
        sqlite_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if s as u64 != d {
            anyhow::bail!("delete of {source}: evdb {d} events, SQLite {s}");
        }
        deleted += d;
    }
    figures.push(Figure::new(
        "maintenance",
        &format!("delete by query (source + min_severity, {deleted} events in 5)"),
        n,
        "ms_p50",
        percentile(&mut evdb_ms, 0.5),
        "sqlite",
        percentile(&mut sqlite_ms, 0.5),
    ));

    // Append latency without, then with, compaction: at full speed, then
    // (after deleting as much again) under a 16 MiB/s I/O limit.
    progress(opts, "appends without compaction");
    let idle = std::sync::atomic::AtomicBool::new(true);
    let mut quiet = paced_appends(&db, 77, Duration::from_secs(3), &idle)?;
    let quiet_p99 = percentile(&mut quiet, 0.99);
    let quiet_max = percentile(&mut quiet, 1.0);
    for (round, io_limit) in [(0u64, 0u64), (1, 16 << 20)] {
        if round == 1 {
            for source in SOURCES.iter().skip(5) {
                db.delete_matching(&Query {
                    sources: vec![(*source).to_owned()],
                    min_severity: Some(Severity::Warning),
                    ..Query::default()
                })?;
            }
        }
        progress(
            opts,
            &format!("compaction with appends, io_limit {io_limit}"),
        );
        let (report, mut busy) = compact_with_appends(&db, io_limit, 78 + round)?;
        let limit = match io_limit {
            0 => "no I/O limit".to_owned(),
            l => format!("io_limit {} MiB/s", l >> 20),
        };
        if round == 0 {
            let secs = report.elapsed_ms.max(1) as f64 / 1e3;
            figures.push(Figure::new(
                "maintenance",
                &format!(
                    "compaction rewrite ({} segments, {} MiB in, {limit})",
                    report.segments_in,
                    report.bytes_before >> 20
                ),
                n,
                "mb_per_s",
                report.bytes_before as f64 / 1e6 / secs,
                "target",
                200.0,
            ));
        }
        figures.push(Figure::new(
            "maintenance",
            &format!("append p99 while compaction runs ({limit}; 100-event batches, fsync always)"),
            n,
            "ms_p99",
            percentile(&mut busy, 0.99),
            "without compaction",
            quiet_p99,
        ));
    }

    // Size retention dropping the oldest sealed segments (about half the
    // bytes) while appending: their files' blocks go back to the file
    // system, whose journal commits every append's fsync waits for.
    progress(opts, "retention with appends");
    let total: u64 = db.log().segments().sealed_bytes();
    let (report, mut busy) = retention_with_appends(&db, total / 2, 80)?;
    let what = format!(
        "{} segments, {} MiB",
        report.segments_dropped,
        report.bytes_freed >> 20
    );
    figures.push(Figure::new(
        "maintenance",
        &format!("append p99 while retention drops {what} (100-event batches, fsync always)"),
        n,
        "ms_p99",
        percentile(&mut busy, 0.99),
        "without retention",
        quiet_p99,
    ));
    figures.push(Figure::new(
        "maintenance",
        &format!("append max while retention drops {what} (100-event batches, fsync always)"),
        n,
        "ms_max",
        percentile(&mut busy, 1.0),
        "without retention",
        quiet_max,
    ));
    db.close()?;
    drop(keep_dirs);
    Ok(figures)
}

/// `evdb bench snapshot`: a snapshot of a big data directory. `events`
/// events of about 4 KiB each (`data` padded, blocks uncompressed, so the
/// directory is as large as the events: 2.6 M events make about 10 GiB)
/// in 128 MiB segments; the median of three snapshots, next to the 1 s
/// target. Sealed segments are hard-linked, so the time grows with the
/// number of segments, not their bytes.
pub fn snapshot(opts: &BenchOptions) -> anyhow::Result<Vec<Figure>> {
    let n = opts.events;
    let dir = tempfile::Builder::new()
        .prefix("evdb-bench-snapshot-")
        .tempdir_in(&opts.dir)?;
    let mut config = Config::default();
    config.storage.fsync = FsyncMode::Never;
    config.storage.compression = crate::storage::Compression::None;
    let db = Db::open(dir.path(), config)?;
    let mut generator = Generator::new(crate::bench::SEED, crate::bench::START, 100);
    let pad = "x".repeat(3800);
    let mut done = 0u64;
    while done < n {
        let k = (n - done).min(2_000) as usize;
        let mut events = generator.batch(k);
        for e in &mut events {
            e.data = crate::event::JsonObject::parse(&format!("{{\"pad\":\"{pad}\"}}"))?;
        }
        db.append_batch(events)?;
        done += k as u64;
        if done % 200_000 < 2_000 {
            progress(opts, &format!("loading {done}/{n}"));
        }
    }
    db.sync()?;
    let set = db.log().segments();
    let bytes: u64 = set.sealed.iter().map(|s| s.file_bytes()).sum::<u64>()
        + set
            .sealing
            .iter()
            .chain([&set.active])
            .map(|o| o.file_bytes())
            .sum::<u64>();
    let segments = set.iter().count();
    drop(set);
    let mut ms = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let info = db.snapshot()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        db.delete_snapshot(&info.id)?;
    }
    db.close()?;
    Ok(vec![Figure::new(
        "snapshot",
        &format!(
            "snapshot of {:.1} GiB in {segments} segments",
            bytes as f64 / f64::from(1u32 << 30)
        ),
        n,
        "ms_p50",
        percentile(&mut ms, 0.5),
        "target",
        1000.0,
    )])
}
