//! Prometheus metrics shared by the HTTP and gRPC listeners.
//!
//! Label values that clients choose (`source`) are capped at
//! [`SOURCE_LABELS_MAX`] distinct values; later ones count under `_other`,
//! so a client cannot grow the registry without bound.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::db::{AppendOutcome, Db};

pub const SOURCE_LABELS_MAX: usize = 1000;
const OTHER: &str = "_other";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub protocol: &'static str,
    pub method: String,
    pub route: String,
    pub status: u16,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// The sources of a batch, noted before its events are handed to the
/// store: each distinct source once, and each event's index into them.
#[derive(Debug, Default)]
pub struct Sources {
    distinct: Vec<String>,
    of: Vec<u32>,
}

impl Sources {
    /// Events per distinct source.
    pub fn counts(&self) -> Vec<(&str, u64)> {
        let mut n = vec![0u64; self.distinct.len()];
        for &i in &self.of {
            if let Some(c) = n.get_mut(i as usize) {
                *c += 1;
            }
        }
        self.distinct.iter().map(String::as_str).zip(n).collect()
    }

    /// Admits the batch through `limiter` (if any), counting refusals.
    pub fn admit(
        &self,
        limiter: Option<&crate::api::ratelimit::RateLimiter>,
        metrics: &Metrics,
    ) -> Result<(), crate::api::ratelimit::Limited> {
        let Some(limiter) = limiter else {
            return Ok(());
        };
        let counts = self.counts();
        limiter.admit(counts.iter().copied()).inspect_err(|_| {
            for (source, n) in &counts {
                metrics
                    .rate_limited
                    .get_or_create(&metrics.label(source))
                    .inc_by(*n);
            }
        })
    }

    pub fn of(events: &[crate::event::Event]) -> Sources {
        // A batch rarely has more than a few sources: look them up in the
        // list until there are `LINEAR_MAX`, then through a map.
        const LINEAR_MAX: usize = 16;
        let mut out = Sources {
            distinct: Vec::new(),
            of: Vec::with_capacity(events.len()),
        };
        let mut seen: Option<rustc_hash::FxHashMap<&str, u32>> = None;
        for (k, e) in events.iter().enumerate() {
            let source = e.source.as_str();
            let found = match &seen {
                Some(map) => map.get(source).copied(),
                None => out
                    .distinct
                    .iter()
                    .position(|d| d == source)
                    .map(|i| i as u32),
            };
            let i = match found {
                Some(i) => i,
                None => {
                    out.distinct.push(e.source.clone());
                    let i = u32::try_from(out.distinct.len() - 1).unwrap_or(u32::MAX);
                    match &mut seen {
                        Some(map) => {
                            map.insert(source, i);
                        }
                        None if out.distinct.len() > LINEAR_MAX => {
                            let mut map: rustc_hash::FxHashMap<&str, u32> = Default::default();
                            for (j, earlier) in events[..k].iter().enumerate() {
                                map.entry(earlier.source.as_str()).or_insert(out.of[j]);
                            }
                            map.insert(source, i);
                            seen = Some(map);
                        }
                        None => {}
                    }
                    i
                }
            };
            out.of.push(i);
        }
        out
    }
}

/// Every metric of the daemon.
pub struct Metrics {
    registry: Registry,
    ingested: Family<SourceLabel, Counter>,
    duplicates: Family<SourceLabel, Counter>,
    rejected: Family<SourceLabel, Counter>,
    rate_limited: Family<SourceLabel, Counter>,
    requests: HistogramFamily<RouteLabels>,
    fsync: Histogram,
    segments: Gauge,
    disk_bytes: Gauge,
    events: Gauge,
    tail_subscribers: Gauge,
    index_memory: Gauge,
    id_filter: Gauge,
    compaction_runs: Counter,
    compaction_events_removed: Counter,
    compaction_bytes_read: Counter,
    compaction_bytes_reclaimed: Counter,
    retention_segments_dropped: Counter,
    retention_events_deleted: Counter,
    disk_free: Gauge,
    writes_refused: Gauge,
    sources_seen: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("evdb");
        let ingested = Family::<SourceLabel, Counter>::default();
        let duplicates = Family::<SourceLabel, Counter>::default();
        let rejected = Family::<SourceLabel, Counter>::default();
        let rate_limited = Family::<SourceLabel, Counter>::default();
        let requests: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let fsync = latency_histogram();
        let segments = Gauge::default();
        let disk_bytes = Gauge::default();
        let events = Gauge::default();
        let tail_subscribers = Gauge::default();
        let index_memory = Gauge::default();
        let id_filter = Gauge::default();
        registry.register(
            "events_ingested",
            "Events stored, by source_system",
            ingested.clone(),
        );
        registry.register(
            "events_duplicate",
            "Events not stored again because their event_id was stored already",
            duplicates.clone(),
        );
        registry.register(
            "events_rejected",
            "Events refused as invalid, by source_system (`_unknown` when unreadable)",
            rejected.clone(),
        );
        registry.register(
            "events_rate_limited",
            "Events refused by the per-source rate limit (requests are refused whole)",
            rate_limited.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Request latency by protocol, method, route and status",
            requests.clone(),
        );
        registry.register(
            "fsync_duration_seconds",
            "Latency of each fsync of the active log",
            fsync.clone(),
        );
        registry.register("segments", "Segments in the store", segments.clone());
        registry.register(
            "disk_bytes",
            "Bytes of the data directory's files",
            disk_bytes.clone(),
        );
        registry.register(
            "events_stored",
            "Rows in the store (deleted ones included until compaction)",
            events.clone(),
        );
        registry.register(
            "tail_subscribers",
            "Live-tail subscribers",
            tail_subscribers.clone(),
        );
        registry.register(
            "index_memory_bytes",
            "Memory held by in-memory indexes",
            index_memory.clone(),
        );
        registry.register(
            "id_filter_bytes",
            "Memory held by the Bloom filter over sealed segments' event ids",
            id_filter.clone(),
        );
        let compaction_runs = Counter::default();
        let compaction_events_removed = Counter::default();
        let compaction_bytes_read = Counter::default();
        let compaction_bytes_reclaimed = Counter::default();
        let retention_segments_dropped = Counter::default();
        let retention_events_deleted = Counter::default();
        let disk_free = Gauge::default();
        let writes_refused = Gauge::default();
        registry.register(
            "compaction_runs",
            "Compaction runs that rewrote or merged segments",
            compaction_runs.clone(),
        );
        registry.register(
            "compaction_events_removed",
            "Deleted events whose bytes compaction removed",
            compaction_events_removed.clone(),
        );
        registry.register(
            "compaction_read_bytes",
            "Segment bytes compaction read",
            compaction_bytes_read.clone(),
        );
        registry.register(
            "compaction_reclaimed_bytes",
            "Bytes compaction freed (input segments minus what they became)",
            compaction_bytes_reclaimed.clone(),
        );
        registry.register(
            "retention_segments_dropped",
            "Segments retention dropped whole",
            retention_segments_dropped.clone(),
        );
        registry.register(
            "retention_events_deleted",
            "Events retention deleted",
            retention_events_deleted.clone(),
        );
        registry.register(
            "disk_free_bytes",
            "Free bytes on the data directory's file system",
            disk_free.clone(),
        );
        registry.register(
            "writes_refused",
            "1 while the store refuses writes (free space under the floor, or a failure), else 0",
            writes_refused.clone(),
        );
        Arc::new(Metrics {
            registry,
            ingested,
            duplicates,
            rejected,
            rate_limited,
            requests,
            fsync,
            segments,
            disk_bytes,
            events,
            tail_subscribers,
            index_memory,
            id_filter,
            compaction_runs,
            compaction_events_removed,
            compaction_bytes_read,
            compaction_bytes_reclaimed,
            retention_segments_dropped,
            retention_events_deleted,
            disk_free,
            writes_refused,
            sources_seen: Mutex::new(HashSet::new()),
        })
    }

    fn label(&self, source: &str) -> SourceLabel {
        let mut seen = self.sources_seen.lock();
        let source = if seen.contains(source) {
            source.to_owned()
        } else if seen.len() < SOURCE_LABELS_MAX {
            seen.insert(source.to_owned());
            source.to_owned()
        } else {
            OTHER.to_owned()
        };
        SourceLabel { source }
    }

    /// Counts the outcomes of one batch (whose sources `sources` noted
    /// before the events were handed over): one registry update per
    /// distinct (source, outcome) pair, not per event.
    pub fn count_outcomes(&self, sources: &Sources, outcomes: &[AppendOutcome]) {
        let mut tally: rustc_hash::FxHashMap<(u32, u8), u64> = Default::default();
        for (&source, o) in sources.of.iter().zip(outcomes) {
            let kind = match o {
                AppendOutcome::Stored(_) => 0,
                AppendOutcome::Duplicate(_) => 1,
                AppendOutcome::Invalid(_) => 2,
            };
            *tally.entry((source, kind)).or_default() += 1;
        }
        for ((source, kind), n) in tally {
            let family = match kind {
                0 => &self.ingested,
                1 => &self.duplicates,
                _ => &self.rejected,
            };
            let name = sources
                .distinct
                .get(source as usize)
                .map_or("", String::as_str);
            family.get_or_create(&self.label(name)).inc_by(n);
        }
    }

    /// Counts events refused before they became events (unparseable).
    pub fn count_unreadable(&self, n: u64) {
        if n > 0 {
            self.rejected
                .get_or_create(&SourceLabel {
                    source: "_unknown".into(),
                })
                .inc_by(n);
        }
    }

    pub fn observe_request(&self, labels: RouteLabels, elapsed: Duration) {
        self.requests
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe_fsync(&self, elapsed: Duration) {
        self.fsync.observe(elapsed.as_secs_f64());
    }

    /// Counts what a compaction run did.
    pub fn record_compaction(&self, report: &crate::maintenance::CompactReport) {
        if report.segments_in > 0 {
            self.compaction_runs.inc();
        }
        self.compaction_events_removed.inc_by(report.events_removed);
        self.compaction_bytes_read.inc_by(report.bytes_before);
        self.compaction_bytes_reclaimed
            .inc_by(report.bytes_before.saturating_sub(report.bytes_after));
    }

    /// Counts what a retention run did.
    pub fn record_retention(&self, report: &crate::maintenance::RetentionReport) {
        self.retention_segments_dropped
            .inc_by(report.segments_dropped as u64);
        self.retention_events_deleted.inc_by(report.events_deleted);
    }

    /// The text exposition, with the gauges read from `db` now.
    pub fn render(&self, db: &Db) -> String {
        let set = db.log().segments();
        self.segments.set(set.iter().count() as i64);
        self.events
            .set(i64::try_from(set.total_rows()).unwrap_or(i64::MAX));
        self.tail_subscribers
            .set(i64::try_from(db.tail_subscribers()).unwrap_or(i64::MAX));
        self.index_memory
            .set(i64::try_from(db.index_memory_bytes()).unwrap_or(i64::MAX));
        self.id_filter
            .set(i64::try_from(db.log().id_filter_bytes()).unwrap_or(i64::MAX));
        self.disk_bytes
            .set(i64::try_from(dir_bytes(db.log().dir())).unwrap_or(i64::MAX));
        if let Some(free) = db.free_bytes() {
            self.disk_free.set(i64::try_from(free).unwrap_or(i64::MAX));
        }
        self.writes_refused
            .set(i64::from(db.writes_refused().is_some()));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Bytes of the regular files under `dir` (two levels: the data directory
/// and its `index/`).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_file() {
                total += meta.len();
            } else if meta.is_dir() && depth < 2 {
                stack.push((entry.path(), depth + 1));
            }
        }
    }
    total
}

#[cfg(test)]
mod sources_tests {
    use super::*;

    #[test]
    fn sources_are_counted_with_few_and_with_many() {
        for distinct in [1usize, 3, 16, 17, 40] {
            let events: Vec<crate::event::Event> = (0..200)
                .map(|i| crate::event::Event::new(format!("s{}", (i * 7) % distinct), "t"))
                .collect();
            let sources = Sources::of(&events);
            let mut counts: Vec<(String, u64)> = sources
                .counts()
                .into_iter()
                .map(|(s, n)| (s.to_owned(), n))
                .collect();
            counts.sort();
            let mut want: std::collections::BTreeMap<String, u64> = Default::default();
            for e in &events {
                *want.entry(e.source.clone()).or_default() += 1;
            }
            let want: Vec<(String, u64)> = want.into_iter().collect();
            assert_eq!(counts, want, "{distinct} sources");
        }
    }
}
