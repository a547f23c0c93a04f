//! `evdb bench`: end-to-end figures, each next to its SQLite baseline
//! measured in the same run (contract §6). `docs/PERFORMANCE.md` quotes
//! its output.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rusqlite::{Connection, params};

use crate::db::{AppendOutcome, Config, Db};
use crate::event::{Event, Timestamp};
use crate::generator::Generator;
use crate::storage::{Compression, FsyncMode};

/// One measured figure, printed as a JSON line with `--json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figure {
    pub suite: &'static str,
    pub name: String,
    pub events: u64,
    pub unit: &'static str,
    pub evdb: f64,
    pub baseline: &'static str,
    pub baseline_value: f64,
    /// How many times better evdb is.
    pub ratio: f64,
}

impl Figure {
    pub(crate) fn new(
        suite: &'static str,
        name: &str,
        events: u64,
        unit: &'static str,
        evdb: f64,
        baseline: &'static str,
        baseline_value: f64,
    ) -> Figure {
        let higher_is_better = unit.ends_with("per_s");
        let ratio = if higher_is_better {
            evdb / baseline_value
        } else {
            baseline_value / evdb
        };
        Figure {
            suite,
            name: name.to_owned(),
            events,
            unit,
            evdb: round(evdb),
            baseline,
            baseline_value: round(baseline_value),
            ratio: round(ratio),
        }
    }
}

fn round(x: f64) -> f64 {
    if x.abs() >= 100.0 {
        x.round()
    } else {
        (x * 1000.0).round() / 1000.0
    }
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub events: u64,
    pub dir: PathBuf,
    /// Print progress lines to stderr.
    pub progress: bool,
}

pub(crate) const SEED: u64 = 0x00ED_B5EE_D000_0001;
pub const START: Timestamp = Timestamp(1_700_000_000_000_000);

pub(crate) fn progress(opts: &BenchOptions, what: &str) {
    if opts.progress {
        eprintln!("bench: {what}");
    }
}

fn dir_bytes(path: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_bytes(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Anonymous resident memory of this process (heap and stacks, not the
/// page cache of mapped segment files), from /proc; 0 where unavailable.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Writes every dirty page of the machine back before a timed phase, so
/// that the write-back of what an earlier phase loaded (gigabytes at 10 M
/// events, SQLite's written with `synchronous=OFF`) does not slow the
/// phase's own fsyncs.
pub fn settle_disk() {
    rustix::fs::sync();
}

/// CPU time (user + system) this process has used, in seconds; 0 where
/// `/proc` is missing. Clock ticks are taken as 100 per second, the value
/// of every mainstream Linux build.
pub fn process_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is the first, utime the 12th, stime the 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => 0.0,
    }
}

/// The SQLite baseline of contract §6.
pub struct Sqlite {
    conn: Connection,
}

impl Sqlite {
    pub fn open(path: &Path, synchronous_full: bool) -> rusqlite::Result<Sqlite> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(
            None,
            "synchronous",
            if synchronous_full { "FULL" } else { "OFF" },
        )?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS events(
                 seq INTEGER PRIMARY KEY,
                 event_id TEXT NOT NULL UNIQUE,
                 ts INTEGER NOT NULL,
                 source_system TEXT NOT NULL,
                 event_type TEXT NOT NULL,
                 severity INTEGER NOT NULL,
                 correlation_id TEXT,
                 data TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS events_source ON events(source_system);
             CREATE INDEX IF NOT EXISTS events_type ON events(event_type);
             CREATE INDEX IF NOT EXISTS events_severity ON events(severity);
             CREATE INDEX IF NOT EXISTS events_correlation ON events(correlation_id);
             CREATE INDEX IF NOT EXISTS events_ts ON events(ts);
             CREATE TABLE IF NOT EXISTS event_tags(seq INTEGER NOT NULL, tag TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS event_tags_tag ON event_tags(tag, seq);",
        )?;
        Ok(Sqlite { conn })
    }

    /// One transaction for the whole batch; duplicates are ignored.
    pub fn insert_batch(&mut self, events: &[Event]) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut ins = tx.prepare_cached(
                "INSERT OR IGNORE INTO events(event_id, ts, source_system, event_type, severity,
                 correlation_id, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            let mut tag = tx.prepare_cached("INSERT INTO event_tags(seq, tag) VALUES (?1, ?2)")?;
            for e in events {
                let changed = ins.execute(params![
                    e.id,
                    e.timestamp.as_micros(),
                    e.source,
                    e.event_type,
                    e.severity.as_u8(),
                    e.correlation_id,
                    e.data.as_str(),
                ])?;
                if changed == 1 {
                    let seq = tx.last_insert_rowid();
                    for t in &e.tags {
                        tag.execute(params![seq, t])?;
                    }
                }
            }
        }
        tx.commit()
    }

    pub fn checkpoint(&self) -> rusqlite::Result<()> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
    }
}

fn db_config(fsync: FsyncMode, compression: Compression) -> Config {
    let mut config = Config::default();
    config.storage.fsync = fsync;
    config.storage.compression = compression;
    config
}

fn check_stored(outcomes: &[AppendOutcome]) -> anyhow::Result<()> {
    for o in outcomes {
        if !matches!(o, AppendOutcome::Stored(_)) {
            anyhow::bail!("bench event was not stored: {o:?}");
        }
    }
    Ok(())
}

/// `ingest`: batches of 1,000 and 64 concurrent single-event writers at
/// `--fsync always`, bytes per event, and resident memory while appending.
pub fn ingest(opts: &BenchOptions) -> anyhow::Result<Vec<Figure>> {
    let mut figures = Vec::new();
    let n = opts.events;
    let batch = 1000usize;

    // evdb, batches of 1,000.
    let evdb_dir = tempfile::Builder::new()
        .prefix("evdb-bench-")
        .tempdir_in(&opts.dir)?;
    // Each fdatasync of the active log, timed by the writer.
    let syncs = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let mut config = db_config(FsyncMode::Always, Compression::ZstdDict);
    config.storage.sync_observer = Some(crate::storage::SyncObserver({
        let syncs = syncs.clone();
        Arc::new(move |d| syncs.lock().push(d))
    }));
    let db = Db::open(evdb_dir.path(), config)?;
    let mut generator = Generator::new(SEED, START, 100);
    let mut evdb_time = Duration::ZERO;
    let mut rss_max = 0u64;
    let mut done = 0u64;
    while done < n {
        let k = (n - done).min(batch as u64) as usize;
        let events = generator.batch(k);
        let t = Instant::now();
        let outcomes = db.append_batch(events)?;
        evdb_time += t.elapsed();
        check_stored(&outcomes)?;
        done += k as u64;
        if done % 100_000 < batch as u64 {
            rss_max = rss_max.max(rss_bytes());
            progress(opts, &format!("evdb batch ingest {done}/{n}"));
        }
    }
    progress(
        opts,
        &format!(
            "evdb logs started in a reused file: {}",
            db.log().logs_reused()
        ),
    );
    let mut sync_times = std::mem::take(&mut *syncs.lock());
    db.close()?;
    drop(db);
    sync_times.sort_unstable();
    let sync_median_us = sync_times
        .get(sync_times.len() / 2)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1e6);
    let evdb_bytes = dir_bytes(evdb_dir.path());

    // Opening the closed store.
    let t = Instant::now();
    let db = Db::open(
        evdb_dir.path(),
        db_config(FsyncMode::Always, Compression::ZstdDict),
    )?;
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    if db.len() != n {
        anyhow::bail!("reopened store holds {} events, expected {n}", db.len());
    }
    db.close()?;
    drop(db);

    // SQLite, the same events and batches.
    let sqlite_dir = tempfile::Builder::new()
        .prefix("evdb-bench-sqlite-")
        .tempdir_in(&opts.dir)?;
    let sqlite_path = sqlite_dir.path().join("events.db");
    let mut sqlite = Sqlite::open(&sqlite_path, true)?;
    let mut generator = Generator::new(SEED, START, 100);
    let mut sqlite_time = Duration::ZERO;
    let mut done = 0u64;
    while done < n {
        let k = (n - done).min(batch as u64) as usize;
        let events = generator.batch(k);
        let t = Instant::now();
        sqlite.insert_batch(&events)?;
        sqlite_time += t.elapsed();
        done += k as u64;
        if done % 100_000 < batch as u64 {
            progress(opts, &format!("sqlite batch ingest {done}/{n}"));
        }
    }
    sqlite.checkpoint()?;
    drop(sqlite);
    let t = Instant::now();
    let sqlite = Connection::open(&sqlite_path)?;
    let count: i64 = sqlite.query_row("SELECT count(*) FROM events", [], |r| r.get(0))?;
    let sqlite_open_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(sqlite);
    let sqlite_bytes = dir_bytes(sqlite_dir.path());
    if count as u64 != n {
        anyhow::bail!("sqlite holds {count} events, expected {n}");
    }

    let rate = |time: Duration| n as f64 / time.as_secs_f64();
    figures.push(Figure::new(
        "ingest",
        "batch1000_fsync_always",
        n,
        "events_per_s",
        rate(evdb_time),
        "sqlite",
        rate(sqlite_time),
    ));
    figures.push(Figure::new(
        "ingest",
        "bytes_per_event",
        n,
        "bytes",
        evdb_bytes as f64 / n as f64,
        "sqlite",
        sqlite_bytes as f64 / n as f64,
    ));
    figures.push(Figure::new(
        "recovery",
        "open_after_close",
        n,
        "ms",
        open_ms,
        "sqlite",
        sqlite_open_ms,
    ));
    figures.push(Figure::new(
        "ingest",
        "fdatasync_median_one_caller",
        n,
        "us",
        sync_median_us,
        "none",
        f64::NAN,
    ));
    figures.push(Figure::new(
        "ingest",
        "rss_anon_while_appending",
        n,
        "mib",
        rss_max as f64 / (1024.0 * 1024.0),
        "none",
        f64::NAN,
    ));

    // Four concurrent callers of batches of 1,000: group commit lets their
    // batches share fsyncs, so CPU rather than the disk's sync latency
    // bounds the rate. CPU time covers appending and the close, which
    // waits for the sealer, so the sealing of what they wrote is counted.
    let callers = 4usize;
    let callers_n = n.min(1_000_000) as usize;
    let evdb_dir3 = tempfile::Builder::new()
        .prefix("evdb-bench-")
        .tempdir_in(&opts.dir)?;
    let db = Db::open(
        evdb_dir3.path(),
        db_config(FsyncMode::Always, Compression::ZstdDict),
    )?;
    progress(
        opts,
        &format!("evdb {callers} callers of batches of {batch}, {callers_n} events"),
    );
    let (callers_rate, append_cpu) = concurrent_cpu(callers, callers_n, |events| {
        let mut events = events.into_iter();
        loop {
            let chunk: Vec<Event> = events.by_ref().take(batch).collect();
            if chunk.is_empty() {
                return Ok(());
            }
            check_stored(&db.append_batch(chunk)?)?;
        }
    })?;
    let close_cpu = process_cpu_secs();
    db.close()?;
    let cpu = append_cpu + (process_cpu_secs() - close_cpu);
    drop(db);
    figures.push(Figure::new(
        "ingest",
        "batch1000_4_callers_fsync_always",
        callers_n as u64,
        "events_per_s",
        callers_rate,
        "sqlite",
        rate(sqlite_time),
    ));
    figures.push(Figure::new(
        "ingest",
        "cpu_us_per_event_4_callers_incl_sealing",
        callers_n as u64,
        "us",
        cpu * 1e6 / callers_n as f64,
        "none",
        f64::NAN,
    ));

    // 64 concurrent writers, one event per append.
    let writers = 64usize;
    let single_n = n.min(200_000) as usize;
    let evdb_dir2 = tempfile::Builder::new()
        .prefix("evdb-bench-")
        .tempdir_in(&opts.dir)?;
    let db = Arc::new(Db::open(
        evdb_dir2.path(),
        db_config(FsyncMode::Always, Compression::ZstdDict),
    )?);
    progress(
        opts,
        &format!("evdb {writers} single-event writers, {single_n} events"),
    );
    let evdb_rate = concurrent(writers, single_n, |events| {
        for e in events {
            let o = db.append(e)?;
            check_stored(std::slice::from_ref(&o))?;
        }
        Ok(())
    })?;
    db.close()?;
    let sqlite_n = single_n.min(20_000);
    let sqlite_dir2 = tempfile::Builder::new()
        .prefix("evdb-bench-sqlite-")
        .tempdir_in(&opts.dir)?;
    let sqlite = Arc::new(parking_lot::Mutex::new(Sqlite::open(
        &sqlite_dir2.path().join("events.db"),
        true,
    )?));
    progress(
        opts,
        &format!("sqlite {writers} single-event writers, {sqlite_n} events"),
    );
    let sqlite_rate = concurrent(writers, sqlite_n, |events| {
        for e in events {
            sqlite.lock().insert_batch(std::slice::from_ref(&e))?;
        }
        Ok(())
    })?;
    figures.push(Figure::new(
        "ingest",
        "single_event_64_writers_fsync_always",
        single_n as u64,
        "events_per_s",
        evdb_rate,
        "sqlite",
        sqlite_rate,
    ));
    Ok(figures)
}

/// Runs `writers` threads, each appending its share of `n` events with
/// `append`; returns events per second.
fn concurrent<F>(writers: usize, n: usize, append: F) -> anyhow::Result<f64>
where
    F: Fn(Vec<Event>) -> anyhow::Result<()> + Sync,
{
    Ok(concurrent_cpu(writers, n, append)?.0)
}

/// [`concurrent`], also returning the CPU seconds the process used while
/// the writers ran (the events are generated before).
fn concurrent_cpu<F>(writers: usize, n: usize, append: F) -> anyhow::Result<(f64, f64)>
where
    F: Fn(Vec<Event>) -> anyhow::Result<()> + Sync,
{
    let mut generator = Generator::new(SEED ^ 0x64, START, 100);
    let shares: Vec<Vec<Event>> = (0..writers)
        .map(|w| generator.batch(n / writers + usize::from(w < n % writers)))
        .collect();
    let failures = AtomicUsize::new(0);
    let cpu = process_cpu_secs();
    let t = Instant::now();
    std::thread::scope(|s| {
        for share in shares {
            let append = &append;
            let failures = &failures;
            s.spawn(move || {
                if let Err(e) = append(share) {
                    eprintln!("bench writer failed: {e}");
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let elapsed = t.elapsed();
    let cpu = process_cpu_secs() - cpu;
    if failures.load(Ordering::Relaxed) > 0 {
        anyhow::bail!("a bench writer failed");
    }
    Ok((n as f64 / elapsed.as_secs_f64(), cpu))
}

/// Compares block compressions and sizes on the same seed-shaped events:
/// bytes per event of the sealed segments, and the median time of a random
/// get by id (which decodes one block), each next to lz4 with 32 KiB blocks.
pub fn compression(opts: &BenchOptions) -> anyhow::Result<Vec<Figure>> {
    let n = opts.events.min(200_000);
    let configs = [
        ("lz4_32k", Compression::Lz4, 32 * 1024),
        ("zstd_32k", Compression::Zstd, 32 * 1024),
        ("zstd_8k", Compression::Zstd, 8 * 1024),
        ("zstd_dict_4k", Compression::ZstdDict, 4 * 1024),
        ("zstd_dict_8k", Compression::ZstdDict, 8 * 1024),
    ];
    let mut results = Vec::new();
    for (name, compression, block) in configs {
        let dir = tempfile::Builder::new()
            .prefix("evdb-bench-")
            .tempdir_in(&opts.dir)?;
        let mut config = db_config(FsyncMode::Never, compression);
        config.storage.block_size_bytes = block;
        let db = Db::open(dir.path(), config)?;
        let mut generator = Generator::new(SEED, START, 100);
        let mut ids = Vec::new();
        let mut done = 0;
        while done < n {
            let events = generator.batch(1000);
            ids.extend(events.iter().step_by(97).map(|e| e.id.clone()));
            check_stored(&db.append_batch(events)?)?;
            done += 1000;
        }
        db.seal()?;
        let seg_bytes: u64 = db.log().segments().sealed_bytes();
        let mut lat = Vec::with_capacity(ids.len());
        for id in &ids {
            let t = Instant::now();
            let found = db.get(id)?;
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            if found.is_none() {
                anyhow::bail!("bench event {id} not found");
            }
        }
        results.push((
            name,
            seg_bytes as f64 / done as f64,
            percentile(&mut lat, 0.5),
        ));
        db.close()?;
        progress(opts, &format!("compression {name} measured"));
    }
    let (_, base_bytes, base_get) = results[0];
    let mut figures = Vec::new();
    for (name, bytes, get) in &results[1..] {
        figures.push(Figure::new(
            "ingest",
            &format!("segment_bytes_per_event_{name}"),
            n,
            "bytes",
            *bytes,
            "lz4_32k",
            base_bytes,
        ));
        figures.push(Figure::new(
            "ingest",
            &format!("get_by_id_{name}"),
            n,
            "us_p50",
            *get,
            "lz4_32k",
            base_get,
        ));
    }
    Ok(figures)
}

/// Opens the store in `dir`, runs one of each query shape and the stats,
/// and returns this process's anonymous resident memory in MiB (the
/// `memory-probe` step of `evdb bench query`).
pub fn memory_probe(dir: &Path) -> anyhow::Result<f64> {
    use crate::event::Severity;
    use crate::query::{Order, Query};
    let db = Db::open(dir, Config::default())?;
    for (i, source) in crate::generator::SOURCES.iter().enumerate() {
        db.query(&Query {
            sources: vec![(*source).to_owned()],
            min_severity: Some(Severity::Error),
            tags: vec![crate::generator::TAGS[i].to_owned()],
            ..Query::default()
        })?;
    }
    db.query(&Query::default())?;
    db.query(&Query {
        correlation_id: Some("corr-00000010".into()),
        order: Order::Asc,
        ..Query::default()
    })?;
    db.stats(&Query::default())?;
    db.stats(&Query {
        min_severity: Some(Severity::Error),
        ..Query::default()
    })?;
    let mib = rss_bytes() as f64 / (1024.0 * 1024.0);
    db.close()?;
    Ok(mib)
}

pub fn print_table(figures: &[Figure]) {
    println!(
        "{:<10} {:<40} {:>10} {:>14} {:>14} {:>10}  unit",
        "suite", "name", "events", "evdb", "baseline", "ratio"
    );
    for f in figures {
        println!(
            "{:<10} {:<40} {:>10} {:>14} {:>14} {:>10}  {} (baseline: {})",
            f.suite, f.name, f.events, f.evdb, f.baseline_value, f.ratio, f.unit, f.baseline
        );
    }
}

/// A store and its SQLite twin holding the same seed-shaped events.
pub struct Dataset {
    pub db: Db,
    pub sqlite: Connection,
    pub events: u64,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    /// The evdb data directory.
    pub evdb_path: PathBuf,
    /// Sample correlation ids, sources and tags seen while generating.
    pub correlation_ids: Vec<String>,
    pub open_ms: f64,
    pub sqlite_open_ms: f64,
    pub bytes_per_event: f64,
    pub sqlite_bytes_per_event: f64,
}

impl Dataset {
    /// The store, the SQLite baseline, the store's path, and the guard
    /// that removes both directories when dropped.
    pub fn split(self) -> (Db, Connection, PathBuf, Box<dyn std::any::Any>) {
        (self.db, self.sqlite, self.evdb_path, Box::new(self._dirs))
    }
}

/// Builds the query dataset: `opts.events` events in at least 40 segments,
/// loaded in batches of 10,000 (`--fsync never` for evdb and
/// `synchronous=OFF` for SQLite: durability of loading is not measured
/// here), then both stores are closed and reopened.
pub fn build_dataset(opts: &BenchOptions) -> anyhow::Result<Dataset> {
    build_dataset_with(opts, 100, &[])
}

/// [`build_dataset`] with events `step_us` apart and numeric fields
/// declared.
pub fn build_dataset_with(
    opts: &BenchOptions,
    step_us: i64,
    numeric_fields: &[&str],
) -> anyhow::Result<Dataset> {
    let n = opts.events;
    let evdb_dir = tempfile::Builder::new()
        .prefix("evdb-bench-")
        .tempdir_in(&opts.dir)?;
    let sqlite_dir = tempfile::Builder::new()
        .prefix("evdb-bench-sqlite-")
        .tempdir_in(&opts.dir)?;
    let mut config = db_config(FsyncMode::Never, Compression::ZstdDict);
    // About 450 bytes of log per event: at least 40 segments.
    config.storage.segment_size_bytes = (n * 450 / 40).clamp(1 << 20, 128 << 20);
    config.numeric_fields = numeric_fields.iter().map(|f| (*f).to_owned()).collect();
    // The bench times full scans on purpose.
    config.limits.query_decode_max = u64::MAX;
    let db = Db::open(evdb_dir.path(), config.clone())?;
    let sqlite_path = sqlite_dir.path().join("events.db");
    let mut sqlite = Sqlite::open(&sqlite_path, false)?;
    let mut generator = Generator::new(SEED, START, step_us);
    let mut correlation_ids = Vec::new();
    let mut done = 0u64;
    while done < n {
        let k = (n - done).min(10_000) as usize;
        let events = generator.batch(k);
        if correlation_ids.len() < 1000 {
            correlation_ids.extend(
                events
                    .iter()
                    .step_by(997)
                    .filter_map(|e| e.correlation_id.clone()),
            );
        }
        sqlite.insert_batch(&events)?;
        check_stored(&db.append_batch(events)?)?;
        done += k as u64;
        if done % 500_000 < 10_000 {
            progress(opts, &format!("loading {done}/{n}"));
        }
    }
    db.close()?;
    drop(db);
    sqlite.checkpoint()?;
    drop(sqlite);
    let evdb_bytes = dir_bytes(evdb_dir.path());
    let sqlite_bytes = dir_bytes(sqlite_dir.path());
    let t = Instant::now();
    let db = Db::open(evdb_dir.path(), config)?;
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let sqlite = Connection::open(&sqlite_path)?;
    sqlite.query_row("SELECT count(*) FROM events", [], |r| r.get::<_, i64>(0))?;
    let sqlite_open_ms = t.elapsed().as_secs_f64() * 1e3;
    // Timed work starts once the loaded stores' pages are on disk and the
    // open store's start-up work is done: the writer builds the id filter
    // over the sealed segments in the background (about 3 bytes per event,
    // on one of the two cores), which made the first queries' tail.
    settle_disk();
    let waited = Instant::now();
    while (db.log().id_filter_bytes() as u64) < n && waited.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Dataset {
        db,
        sqlite,
        events: n,
        evdb_path: evdb_dir.path().to_owned(),
        _dirs: (evdb_dir, sqlite_dir),
        correlation_ids,
        open_ms,
        sqlite_open_ms,
        bytes_per_event: evdb_bytes as f64 / n as f64,
        sqlite_bytes_per_event: sqlite_bytes as f64 / n as f64,
    })
}

pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples.get(i).copied().unwrap_or(f64::NAN)
}

/// Query-suite figures of `evdb` and SQLite timings (ms) at each quantile.
fn latency_figures(
    name: &str,
    events: u64,
    evdb: &mut [f64],
    sqlite: &mut [f64],
    quantiles: &[f64],
) -> Vec<Figure> {
    quantiles
        .iter()
        .map(|&q| {
            let unit = if q == 0.5 { "ms_p50" } else { "ms_p99" };
            Figure::new(
                "query",
                name,
                events,
                unit,
                percentile(evdb, q),
                "sqlite",
                percentile(sqlite, q),
            )
        })
        .collect()
}

/// Times `f` `runs` times; milliseconds.
pub(crate) fn time_runs(
    runs: usize,
    mut f: impl FnMut(usize) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(runs);
    for i in 0..runs {
        let t = Instant::now();
        f(i)?;
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

const SQL_COLUMNS: &str = "event_id, ts, source_system, event_type, severity, correlation_id, data";

fn sqlite_rows(
    stmt: &mut rusqlite::Statement<'_>,
    params: impl rusqlite::Params,
) -> anyhow::Result<usize> {
    let mut rows = stmt.query(params)?;
    let mut n = 0;
    while let Some(row) = rows.next()? {
        // Read every column, as evdb decodes every field.
        let _: String = row.get(0)?;
        let _: i64 = row.get(1)?;
        let _: String = row.get(6)?;
        n += 1;
    }
    Ok(n)
}

/// SQLite timings (ms) of the newest-100 query by source, severity >= error
/// and tag, `runs` times over the dataset's SQLite twin.
/// Stops after `budget` once `min_runs` are done.
pub fn sqlite_newest100_samples(
    sqlite: &Connection,
    runs: usize,
    budget: Duration,
    min_runs: usize,
) -> anyhow::Result<Vec<f64>> {
    let tags = crate::generator::TAGS;
    let sources = crate::generator::SOURCES;
    let mut stmt = sqlite.prepare(&format!(
        "SELECT {SQL_COLUMNS} FROM events e WHERE source_system = ?1 AND severity >= 3
         AND EXISTS (SELECT 1 FROM event_tags t WHERE t.seq = e.seq AND t.tag = ?2)
         ORDER BY ts DESC, seq DESC LIMIT 100"
    ))?;
    let started = Instant::now();
    let mut out = Vec::new();
    for i in 0..runs {
        if i >= min_runs && started.elapsed() > budget {
            break;
        }
        let t = Instant::now();
        sqlite_rows(&mut stmt, params![sources[i % 4], tags[i % tags.len()]])?;
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

/// `query` and `stats`: the shapes of contract §3 over the dataset.
pub fn query_suites(opts: &BenchOptions, ds: Dataset, which: &str) -> anyhow::Result<Vec<Figure>> {
    use crate::event::Severity;
    use crate::query::{Order, Query};
    let n = ds.events;
    let mut figures = Vec::new();
    let runs = 200;
    let tags = crate::generator::TAGS;
    let sources = crate::generator::SOURCES;
    if which == "query" || which == "all" {
        progress(
            opts,
            "query: newest 100 by source, severity >= error and tag",
        );
        let q = |i: usize| Query {
            sources: vec![sources[i % 4].to_owned()],
            min_severity: Some(Severity::Error),
            tags: vec![tags[i % tags.len()].to_owned()],
            limit: 100,
            ..Query::default()
        };
        let mut evdb = time_runs(runs, |i| {
            ds.db.query(&q(i))?;
            Ok(())
        })?;
        let mut stmt = ds.sqlite.prepare(&format!(
            "SELECT {SQL_COLUMNS} FROM events e WHERE source_system = ?1 AND severity >= 3
             AND EXISTS (SELECT 1 FROM event_tags t WHERE t.seq = e.seq AND t.tag = ?2)
             ORDER BY ts DESC, seq DESC LIMIT 100"
        ))?;
        let mut base = time_runs(runs, |i| {
            sqlite_rows(&mut stmt, params![sources[i % 4], tags[i % tags.len()]])?;
            Ok(())
        })?;
        figures.extend(latency_figures(
            "newest100_source_minsev_tag",
            n,
            &mut evdb,
            &mut base,
            &[0.5, 0.99],
        ));

        progress(opts, "query: newest 100 overall");
        let mut evdb = time_runs(runs, |_| {
            ds.db.query(&Query {
                limit: 100,
                ..Query::default()
            })?;
            Ok(())
        })?;
        let mut stmt = ds.sqlite.prepare(&format!(
            "SELECT {SQL_COLUMNS} FROM events ORDER BY ts DESC, seq DESC LIMIT 100"
        ))?;
        let mut base = time_runs(runs, |_| {
            sqlite_rows(&mut stmt, [])?;
            Ok(())
        })?;
        figures.extend(latency_figures(
            "newest100_all",
            n,
            &mut evdb,
            &mut base,
            &[0.5],
        ));

        progress(opts, "query: all events of one correlation id");
        let ids = &ds.correlation_ids;
        let mut evdb = time_runs(runs, |i| {
            ds.db.query(&Query {
                correlation_id: Some(ids[i % ids.len()].clone()),
                limit: 1000,
                order: Order::Asc,
                ..Query::default()
            })?;
            Ok(())
        })?;
        let mut stmt = ds.sqlite.prepare(&format!(
            "SELECT {SQL_COLUMNS} FROM events WHERE correlation_id = ?1 ORDER BY ts, seq LIMIT 1000"
        ))?;
        let mut base = time_runs(runs, |i| {
            sqlite_rows(&mut stmt, params![ids[i % ids.len()]])?;
            Ok(())
        })?;
        figures.extend(latency_figures(
            "correlation_id_all",
            n,
            &mut evdb,
            &mut base,
            &[0.5, 0.99],
        ));

        progress(opts, "query: text substring, no other filter");
        let needles = [
            "\"user_id\":\"u-04242\"",
            "\"user_id\":\"u-31337\"",
            "\"user_id\":\"u-00007\"",
        ];
        let mut evdb = time_runs(3, |i| {
            ds.db.query(&Query {
                text: Some(needles[i].to_owned()),
                limit: 100,
                ..Query::default()
            })?;
            Ok(())
        })?;
        let mut stmt = ds.sqlite.prepare(&format!(
            "SELECT {SQL_COLUMNS} FROM events WHERE instr(data, ?1) > 0 ORDER BY ts DESC, seq DESC LIMIT 100"
        ))?;
        let mut base = time_runs(3, |i| {
            sqlite_rows(&mut stmt, params![needles[i]])?;
            Ok(())
        })?;
        figures.extend(latency_figures(
            "text_substring_full_scan",
            n,
            &mut evdb,
            &mut base,
            &[0.5],
        ));
    }
    if which == "stats" || which == "all" {
        progress(
            opts,
            "stats: group by source, type and severity over everything",
        );
        // evdb's stats next to SQLite's three GROUP BYs under the same filter.
        let stats_figure = |name: &str, q: &Query, sql_where: &str| -> anyhow::Result<Figure> {
            let mut evdb = time_runs(5, |_| {
                ds.db.stats(q)?;
                Ok(())
            })?;
            let mut base = time_runs(3, |_| {
                for col in ["source_system", "event_type", "severity"] {
                    let mut stmt = ds.sqlite.prepare_cached(&format!(
                        "SELECT {col}, count(*) FROM events {sql_where} GROUP BY {col}"
                    ))?;
                    let mut rows = stmt.query([])?;
                    while rows.next()?.is_some() {}
                }
                Ok(())
            })?;
            Ok(Figure::new(
                "stats",
                name,
                n,
                "ms_p50",
                percentile(&mut evdb, 0.5),
                "sqlite",
                percentile(&mut base, 0.5),
            ))
        };
        figures.push(stats_figure(
            "group_by_source_type_severity_all",
            &Query::default(),
            "",
        )?);
        let errors_up = Query {
            min_severity: Some(Severity::Error),
            ..Query::default()
        };
        figures.push(stats_figure(
            "group_by_min_severity_error",
            &errors_up,
            "WHERE severity >= 3",
        )?);
        progress(opts, "stats: distinct correlation ids over everything");
        let mut evdb = time_runs(3, |_| {
            ds.db.stats_with(&Query::default(), true)?;
            Ok(())
        })?;
        let mut base = time_runs(3, |_| {
            ds.sqlite.query_row(
                "SELECT count(DISTINCT correlation_id) FROM events",
                [],
                |r| r.get::<_, i64>(0),
            )?;
            Ok(())
        })?;
        figures.push(Figure::new(
            "stats",
            "distinct_correlation_ids_all",
            n,
            "ms_p50",
            percentile(&mut evdb, 0.5),
            "sqlite",
            percentile(&mut base, 0.5),
        ));
    }
    figures.push(Figure::new(
        "recovery",
        "open_query_dataset",
        n,
        "ms",
        ds.open_ms,
        "sqlite",
        ds.sqlite_open_ms,
    ));
    figures.push(Figure::new(
        "ingest",
        "bytes_per_event_with_indexes",
        n,
        "bytes",
        ds.bytes_per_event,
        "sqlite",
        ds.sqlite_bytes_per_event,
    ));
    figures.push(Figure::new(
        "query",
        "index_memory",
        n,
        "mib",
        ds.db.index_memory_bytes() as f64 / (1024.0 * 1024.0),
        "none",
        f64::NAN,
    ));
    figures.push(Figure::new(
        "query",
        "rss_anon_after_load_same_process",
        n,
        "mib",
        rss_bytes() as f64 / (1024.0 * 1024.0),
        "none",
        f64::NAN,
    ));
    // Resident memory of the open store, measured in a fresh process so that
    // the allocator's memory from generating and loading is not counted.
    // Dropping the store releases its directory for the probe; the temporary
    // directories live until the end of this function.
    let Dataset {
        db,
        evdb_path,
        _dirs: dirs,
        ..
    } = ds;
    db.close()?;
    drop(db);
    progress(opts, "memory of the open store, in a fresh process");
    let probe = std::process::Command::new(std::env::current_exe()?)
        .args(["bench", "memory-probe", "--data-dir"])
        .arg(&evdb_path)
        .output()?;
    if !probe.status.success() {
        anyhow::bail!(
            "memory probe failed: {}",
            String::from_utf8_lossy(&probe.stderr)
        );
    }
    let probe_mib: f64 = String::from_utf8_lossy(&probe.stdout).trim().parse()?;
    figures.push(Figure::new(
        "query",
        "rss_anon_open_db_fresh_process",
        n,
        "mib",
        probe_mib,
        "none",
        f64::NAN,
    ));
    drop(dirs);
    Ok(figures)
}
