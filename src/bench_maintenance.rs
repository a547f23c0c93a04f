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
//!   while compaction runs, next to the same appends without it (p99).

use std::time::{Duration, Instant};

use rusqlite::params;

use crate::bench::{BenchOptions, Figure, build_dataset, percentile, progress};
use crate::event::{Severity, Timestamp};
use crate::generator::{Generator, SOURCES};
use crate::maintenance::{CompactOptions, CompactReport};
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
    let bytes: u64 = db
        .log()
        .segments()
        .sealed
        .iter()
        .map(|s| s.file_bytes())
        .sum();
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

    // Append latency without, then with, compaction.
    progress(opts, "appends without compaction");
    let idle = std::sync::atomic::AtomicBool::new(true);
    let mut quiet = paced_appends(&db, 77, Duration::from_secs(3), &idle)?;
    progress(opts, "compaction with appends");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (report, mut busy): (CompactReport, Vec<f64>) = std::thread::scope(|s| {
        let appender = s.spawn(|| paced_appends(&db, 78, Duration::from_secs(1), &stop));
        let report = db.compact(
            &CompactOptions {
                force: true,
                ..CompactOptions::default()
            },
            |_| {},
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let latencies = appender
            .join()
            .map_err(|_| anyhow::anyhow!("the appender panicked"))?;
        Ok::<_, anyhow::Error>((report?, latencies?))
    })?;
    let secs = report.elapsed_ms.max(1) as f64 / 1e3;
    figures.push(Figure::new(
        "maintenance",
        &format!(
            "compaction rewrite ({} segments, {} MiB in)",
            report.segments_in,
            report.bytes_before >> 20
        ),
        n,
        "mb_per_s",
        report.bytes_before as f64 / 1e6 / secs,
        "target",
        200.0,
    ));
    figures.push(Figure::new(
        "maintenance",
        "append p99 while compaction runs (100-event batches, fsync always)",
        n,
        "ms_p99",
        percentile(&mut busy, 0.99),
        "without compaction",
        percentile(&mut quiet, 0.99),
    ));
    db.close()?;
    drop(keep_dirs);
    Ok(figures)
}
