//! `Db`: the library API for embedded use, shared as `Arc<Db>`.
//!
//! Validation and encoding happen on the caller's thread; the storage writer
//! only checks ids and writes. Later layers (indexes, queries) hang off this
//! type, so storage stays ignorant of them.

use std::path::Path;
use std::sync::Arc;

use crate::db_index::{IndexSealer, Indexes};
use crate::event::{Event, Timestamp};
use crate::index::{BatchTerms, IndexError};
use crate::limits::{self, Invalid, Limits};
use crate::query::aggregate::{AggregateResult, Aggregation, GroupBy, Metric};
use crate::query::{self, Cursor, Hit, Page, Query, QueryError, SegmentInput, Seqs, Stats};
use crate::storage::dir::{FileSystem, RealFs};
use crate::storage::{
    self, Appended, Log, Position, Prepared, RowReader, SegmentRef, StorageConfig, StorageError,
};
use crate::tail::{Subscription, TailFilter, TailHub};

/// Everything `Db::open` needs to know.
#[derive(Clone, Debug, Default)]
pub struct Config {
    pub storage: StorageConfig,
    pub limits: Limits,
    /// JSON pointers into `data` whose numbers are extracted at ingest
    /// into per-segment columns for aggregations (`/latency_ms`).
    pub numeric_fields: Vec<String>,
    /// Refuse writes while the data directory's file system has less free
    /// space than this (0: never). The daemon's default is 256 MiB.
    pub min_free_bytes: u64,
}

/// Below this many blocks to decompress a query decodes its rows on its
/// own thread: handing runs to the pool costs more than it saves.
const PARALLEL_DECODE_MIN: usize = 16;

/// Below this many candidate rows of one segment a `text` filter reads
/// them on the query's own thread.
const PARALLEL_TEXT_ROWS_MIN: u64 = 4096;

/// Errors of the library API.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Query(#[from] QueryError),
    /// The request as a whole is refused (e.g. too many events).
    #[error("{0}")]
    TooLarge(Invalid),
    /// Writes are refused for now (free space under the floor); they
    /// resume by themselves.
    #[error("{0}")]
    Unavailable(String),
}

/// How often the free space is measured on the write path.
const SPACE_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// The free-space floor: measured at most every `SPACE_CHECK_EVERY` by the
/// writers that pass by, refusing writes while under it.
struct SpaceGuard {
    fs: Arc<dyn FileSystem>,
    dir: std::path::PathBuf,
    floor: u64,
    refusing: std::sync::atomic::AtomicBool,
    free: std::sync::atomic::AtomicU64,
    /// When it was last measured: ms since `started` (0: never). One
    /// writer wins each measurement; the others read the verdict.
    started: std::time::Instant,
    checked_at_ms: std::sync::atomic::AtomicU64,
}

impl SpaceGuard {
    fn check(&self) -> Result<(), DbError> {
        if self.floor == 0 {
            return Ok(());
        }
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let last = self.checked_at_ms.load(Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= SPACE_CHECK_EVERY.as_millis() as u64;
        if due
            && self
                .checked_at_ms
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            self.refresh();
        }
        match self.refused() {
            Some(why) => Err(DbError::Unavailable(why)),
            None => Ok(()),
        }
    }

    fn refresh(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        match self.fs.available_bytes(&self.dir) {
            Ok(free) => {
                self.free.store(free, Relaxed);
                let low = free < self.floor;
                let was = self.refusing.swap(low, Relaxed);
                if low && !was {
                    tracing::error!(
                        free,
                        floor = self.floor,
                        dir = %self.dir.display(),
                        "free space under the floor: refusing writes until it returns"
                    );
                } else if was && !low {
                    tracing::warn!(
                        free,
                        floor = self.floor,
                        "free space is back: accepting writes"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "measuring free space"),
        }
    }

    fn refused(&self) -> Option<String> {
        use std::sync::atomic::Ordering::Relaxed;
        self.refusing.load(Relaxed).then(|| {
            format!(
                "writes are refused: {} bytes free on the data directory's file system, under the floor of {} bytes; they resume when space returns (retention, deletes and compaction, or a bigger disk)",
                self.free.load(Relaxed),
                self.floor
            )
        })
    }
}

/// The outcome of a batch handed to the store ([`Db::submit_batch`]),
/// ready once it is durable.
pub type Outcomes = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Vec<AppendOutcome>, DbError>> + Send>,
>;

/// What happened to one event of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppendOutcome {
    Stored(Position),
    /// The id was stored already (at this position): nothing was written.
    Duplicate(Position),
    Invalid(Invalid),
}

pub struct Db {
    log: Log,
    space: SpaceGuard,
    indexes: Indexes,
    blocks: Arc<storage::BlockCache>,
    tail: TailHub,
    /// Serializes deletions (read, then write, the tombstone sets).
    delete_lock: parking_lot::Mutex<()>,
    /// One maintenance job (retention, compaction, snapshot) at a time.
    maintenance_lock: parking_lot::Mutex<()>,
    config: Config,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("log", &self.log).finish()
    }
}

/// The rows of `candidates` (rows of `segment`) whose `data` contains
/// `needle`. Block groups that the segment's text filter rules out are
/// never read; a sealed block without the needle is skipped whole; a row
/// whose record bytes lack it is not decoded. Many candidates are cut into
/// runs of rows shared with an idle core (`par::help_from_pool`), read
/// around the block cache (a full scan decompresses every block; caching
/// them would only evict hot ones).
fn rows_with_text(
    reader: &mut RowReader,
    segment: u64,
    candidates: &roaring::RoaringBitmap,
    needle: &str,
) -> Result<roaring::RoaringBitmap, StorageError> {
    let kept = reader.rows_maybe_with(segment, candidates, needle);
    let candidates: &roaring::RoaringBitmap = &kept;
    let rows = candidates.len();
    if rows < PARALLEL_TEXT_ROWS_MIN {
        return rows_with_text_on(reader, segment, candidates, needle);
    }
    // At least two runs, of at most 16,384 candidates, cut at the rows of
    // those ranks.
    let parts = rows.div_ceil(16_384).max(2);
    let mut runs = Vec::with_capacity(parts as usize);
    let mut from = 0u32;
    for k in 1..=parts {
        let to = if k == parts {
            None
        } else {
            candidates.select((rows * k / parts) as u32)
        };
        let mut run = candidates.clone();
        run.remove_range(..from);
        if let Some(to) = to {
            run.remove_range(to..);
            from = to;
        }
        runs.push(run);
        if to.is_none() {
            break;
        }
    }
    let runs = Arc::new(runs);
    let fork = reader.fork_uncached();
    let needle: Arc<str> = needle.into();
    let count = runs.len();
    let found = crate::par::help_from_pool(count, move |k| {
        rows_with_text_on(&mut fork.fork_uncached(), segment, &runs[k], &needle)
    });
    let mut out = roaring::RoaringBitmap::new();
    for part in found {
        out |= part?;
    }
    Ok(out)
}

fn rows_with_text_on(
    reader: &mut RowReader,
    segment: u64,
    candidates: &roaring::RoaringBitmap,
    needle: &str,
) -> Result<roaring::RoaringBitmap, StorageError> {
    let finder = memchr::memmem::Finder::new(needle.as_bytes());
    let mut out = roaring::RoaringBitmap::new();
    for row in candidates.iter() {
        let pos = Position { segment, row };
        if reader.block_lacks(pos, &finder)? {
            continue;
        }
        let Some(payload) = reader.payload(pos)? else {
            continue;
        };
        if finder.find(&payload).is_none() {
            continue;
        }
        let event = storage::record::decode(&payload)
            .map_err(|e| StorageError::corrupted(segment, 0, e.to_string()))?;
        if event.data.as_str().contains(needle) {
            out.insert(row);
        }
    }
    Ok(out)
}

/// Decodes the rows `hits[i]` for each `i` of `run` (in that order): each
/// block once, through `cache`.
fn decode_run(
    set: &Arc<storage::SegmentSet>,
    cache: &Arc<storage::BlockCache>,
    hits: &[Hit],
    run: &[usize],
) -> Result<Vec<(usize, Event)>, StorageError> {
    let mut reader = RowReader::with_cache(set.clone(), cache.clone());
    let mut out = Vec::with_capacity(run.len());
    for &i in run {
        let pos = Position {
            segment: hits[i].segment,
            row: hits[i].row,
        };
        let event = reader.event(pos)?.ok_or_else(|| {
            StorageError::corrupted(pos.segment, 0, "an indexed row is missing from its segment")
        })?;
        out.push((i, event));
    }
    Ok(out)
}

/// The records of one aggregation worker.
struct Records<'n> {
    reader: RowReader,
    needle: &'n str,
}

impl query::aggregate::RowSource for Records<'_> {
    fn rows_with_text(
        &mut self,
        segment: u64,
        candidates: &roaring::RoaringBitmap,
    ) -> Result<roaring::RoaringBitmap, QueryError> {
        Ok(rows_with_text(
            &mut self.reader,
            segment,
            candidates,
            self.needle,
        )?)
    }

    fn data(&mut self, segment: u64, row: u32) -> Result<Option<String>, QueryError> {
        Ok(self
            .reader
            .event(Position { segment, row })?
            .map(|e| e.data.into_string()))
    }
}

/// The rows of a batch's stored events by segment: for each segment, the
/// row of each valid event of the batch stored there (`None` for the
/// others), in the writer's order.
fn rows_by_segment(appended: &[Appended]) -> Vec<(u64, Vec<Option<u32>>)> {
    let mut by_segment: Vec<(u64, Vec<Option<u32>>)> = Vec::new();
    for (k, outcome) in appended.iter().enumerate() {
        if let Appended::Stored(pos) = outcome {
            let i = match by_segment.iter().position(|(seg, _)| *seg == pos.segment) {
                Some(i) => i,
                None => {
                    by_segment.push((pos.segment, vec![None; appended.len()]));
                    by_segment.len() - 1
                }
            };
            by_segment[i].1[k] = Some(pos.row);
        }
    }
    by_segment
}

/// The index terms of a batch's valid events (those the writer is given),
/// grouped while the writer checks and writes them.
fn valid_terms<'e>(events: &'e [Event], outcomes: &[Option<AppendOutcome>]) -> BatchTerms<'e> {
    BatchTerms::of(
        events
            .iter()
            .zip(outcomes)
            .filter(|(_, o)| o.is_none())
            .map(|(e, _)| e),
    )
}

fn inputs<'a>(
    set: &'a storage::SegmentSet,
    held: &'a [(u64, crate::db_index::Held)],
) -> Vec<SegmentInput<'a>> {
    held.iter()
        .filter_map(|(id, h)| {
            let seqs = match set.get(*id)? {
                SegmentRef::Open(o) => Seqs::Dense(o.first_seq),
                SegmentRef::Sealed(s) => match s.seq_table() {
                    Some(table) => Seqs::Table {
                        first_seq: s.first_seq,
                        table,
                    },
                    None => Seqs::Dense(s.first_seq),
                },
            };
            Some(SegmentInput {
                segment: *id,
                seqs,
                index: h.view(),
            })
        })
        .collect()
}

const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Db>();
};

impl Db {
    /// Opens or creates the database in `path`, recovering after a crash.
    pub fn open(path: impl AsRef<Path>, config: Config) -> Result<Db, DbError> {
        Self::open_with(path, config, Arc::new(RealFs))
    }

    /// Opens with a chosen file-system seam (fault injection in tests).
    pub fn open_with(
        path: impl AsRef<Path>,
        config: Config,
        fs: Arc<dyn FileSystem>,
    ) -> Result<Db, DbError> {
        if config.limits.event_size_max > limits::EVENT_SIZE_MAX_CONFIGURABLE {
            return Err(StorageError::Config(format!(
                "event_size_max {} exceeds the largest record frame ({} bytes)",
                config.limits.event_size_max,
                limits::EVENT_SIZE_MAX_CONFIGURABLE
            ))
            .into());
        }
        for pointer in &config.numeric_fields {
            crate::index::numeric::check_pointer(pointer)
                .map_err(|e| StorageError::Config(format!("numeric field: {e}")))?;
        }
        let fields: Arc<[String]> = config.numeric_fields.clone().into();
        let dir = path.as_ref();
        let index_dir = dir.join("index");
        std::fs::create_dir_all(&index_dir).map_err(|e| StorageError::io(&index_dir, e))?;
        let indexes = Indexes::new(index_dir.clone(), fields.clone());
        let hook = Arc::new(IndexSealer {
            dir: index_dir,
            fields,
            mems: indexes.map(),
        });
        let log = Log::open_with(dir, config.storage.clone(), fs.clone(), Some(hook))?;
        let space = SpaceGuard {
            fs,
            dir: dir.to_owned(),
            floor: config.min_free_bytes,
            refusing: std::sync::atomic::AtomicBool::new(false),
            free: std::sync::atomic::AtomicU64::new(0),
            started: std::time::Instant::now(),
            checked_at_ms: std::sync::atomic::AtomicU64::new(0),
        };
        let set = log.segments();
        indexes
            .remove_stale_files(&set)
            .map_err(|e| StorageError::io(indexes.dir(), e))?;
        // Open segments have no index file: rebuild theirs from the log
        // (after a clean close only the empty active segment is open), a
        // bounded chunk of decoded events at a time.
        const REBUILD_CHUNK_ROWS: u32 = 4096;
        for seg in set.iter() {
            if let SegmentRef::Open(open) = seg {
                let mut reader = RowReader::new(set.clone());
                let rows = open.visible_rows();
                let mut start = 0;
                while start < rows {
                    let end = rows.min(start + REBUILD_CHUNK_ROWS);
                    let mut events = Vec::with_capacity((end - start) as usize);
                    for row in start..end {
                        let pos = Position {
                            segment: open.id,
                            row,
                        };
                        if let Some(e) = reader.event(pos)? {
                            events.push((row, e));
                        }
                    }
                    let chunk: Vec<(u32, &Event)> = events.iter().map(|(r, e)| (*r, e)).collect();
                    indexes.insert(&set, open.id, &chunk);
                    start = end;
                }
            }
        }
        for (segment, rows) in log.tombstones()? {
            indexes.set_deleted(segment, rows);
        }
        let next_seq = set.active.first_seq + u64::from(set.active.visible_rows());
        Ok(Db {
            log,
            space,
            indexes,
            blocks: Arc::new(storage::BlockCache::new()),
            tail: TailHub::new(next_seq),
            delete_lock: parking_lot::Mutex::new(()),
            maintenance_lock: parking_lot::Mutex::new(()),
            config,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Validates and stores a batch; one outcome per event, in order.
    /// Invalid events are reported and never stop the valid ones. Returns
    /// once the stored events are acknowledged (durable under
    /// `--fsync always`).
    pub fn append_batch(&self, events: Vec<Event>) -> Result<Vec<AppendOutcome>, DbError> {
        self.space.check()?;
        let (outcomes, prepared) = self.prepare(&events)?;
        let mut pending = self.log.submit_blocking(prepared)?;
        let terms = valid_terms(&events, &outcomes);
        let (appended, events) = match pending.staged() {
            Some(positions) => {
                self.index_stored(&terms, &positions, false);
                drop(terms);
                // Freed while the writer syncs, not after.
                let events = self.keep_for_tail(events);
                let appended = pending.done()?;
                self.commit_staged(&appended);
                (appended, events)
            }
            None => {
                let appended = pending.done()?;
                self.index_stored(&terms, &appended, true);
                drop(terms);
                (appended, Some(events))
            }
        };
        self.finish(events, outcomes, appended)
    }

    /// [`Db::append_batch`] for async callers: the task awaits the group
    /// commit instead of blocking a thread. Validation and encoding run on
    /// the calling task.
    pub async fn append_batch_async(
        &self,
        events: Vec<Event>,
    ) -> Result<Vec<AppendOutcome>, DbError> {
        self.space.check()?;
        let (outcomes, prepared) = self.prepare(&events)?;
        let pending = self.log.submit_staged(prepared)?;
        self.await_stored(pending, events, outcomes).await
    }

    /// [`Db::append_batch_async`] on a task of its own, so that an append
    /// the writer has taken is indexed and published even when the
    /// caller's future is dropped midway (a client that disconnects while
    /// its request is written). Without it, such events would be stored
    /// but invisible to queries until the next open, and a retry would
    /// only be told they are duplicates.
    pub async fn append_batch_detached(
        self: &Arc<Self>,
        events: Vec<Event>,
    ) -> Result<Vec<AppendOutcome>, DbError> {
        self.submit_batch(events)?.await
    }

    /// [`Db::append_batch_detached`] in two halves: validates, encodes and
    /// hands the batch to the writer now (batches submitted one after
    /// another are stored in that order), and returns a future of its
    /// outcome, whose indexing runs on a task of its own. A caller can
    /// prepare its next batch while this one is made durable.
    pub fn submit_batch(self: &Arc<Self>, events: Vec<Event>) -> Result<Outcomes, DbError> {
        self.space.check()?;
        let (outcomes, prepared) = self.prepare(&events)?;
        let pending = self.log.submit_staged(prepared)?;
        let db = Arc::clone(self);
        let task = tokio::spawn(async move { db.await_stored(pending, events, outcomes).await });
        Ok(Box::pin(async move {
            task.await
                .map_err(|e| DbError::Unavailable(format!("the append task stopped: {e}")))?
        }))
    }

    /// The rest of an async append once the writer has it: indexes the
    /// batch while it is synced, frees the events meanwhile when the tail
    /// does not need them, and makes it visible and published once it is
    /// durable.
    async fn await_stored(
        &self,
        mut pending: storage::PendingAppend,
        events: Vec<Event>,
        outcomes: Vec<Option<AppendOutcome>>,
    ) -> Result<Vec<AppendOutcome>, DbError> {
        let terms = valid_terms(&events, &outcomes);
        let (appended, events) = match pending.staged().await {
            Some(positions) => {
                self.index_stored(&terms, &positions, false);
                drop(terms);
                let events = self.keep_for_tail(events);
                let appended = pending.done().await?;
                self.commit_staged(&appended);
                (appended, events)
            }
            None => {
                let appended = pending.done().await?;
                self.index_stored(&terms, &appended, true);
                drop(terms);
                (appended, Some(events))
            }
        };
        self.finish(events, outcomes, appended)
    }

    /// The batch's events while the tail has subscribers (it publishes
    /// them once they are durable); freed now otherwise, while the
    /// writer syncs them, and read back from the log by
    /// [`Db::publish_stored`] for a subscriber that joins before they
    /// are published.
    fn keep_for_tail(&self, events: Vec<Event>) -> Option<Vec<Event>> {
        self.tail.has_subscribers().then_some(events)
    }

    /// Validates and encodes a batch: `None` for each event to store, the
    /// reason for each invalid one.
    fn prepare(&self, events: &[Event]) -> Result<(Vec<Option<AppendOutcome>>, Prepared), DbError> {
        let max = self.config.limits.batch_events_max;
        if events.len() > max {
            return Err(DbError::TooLarge(Invalid::new(
                "events",
                format!("batch holds {} events, at most {max} allowed", events.len()),
            )));
        }
        let mut outcomes: Vec<Option<AppendOutcome>> = Vec::with_capacity(events.len());
        let mut prepared = Prepared::with_capacity(events.len());
        let limit = self.config.limits.event_size_max;
        for event in events {
            let checked = limits::validate(event).and_then(|()| {
                prepared
                    .push(event, limit)
                    .map(|_| ())
                    .map_err(|size| limits::too_large(size, limit))
            });
            outcomes.push(checked.err().map(AppendOutcome::Invalid));
        }
        Ok((outcomes, prepared))
    }

    /// Makes what the writer stored, indexed while it synced (staged),
    /// visible to queries.
    fn commit_staged(&self, appended: &[Appended]) {
        for (segment, rows) in rows_by_segment(appended) {
            let rows: Vec<u32> = rows.into_iter().flatten().collect();
            self.indexes.commit(segment, &rows);
        }
    }

    /// Publishes what the writer stored to the live tail; one outcome per
    /// event.
    fn finish(
        &self,
        events: Option<Vec<Event>>,
        outcomes: Vec<Option<AppendOutcome>>,
        appended: Vec<Appended>,
    ) -> Result<Vec<AppendOutcome>, DbError> {
        self.publish_stored(events, &outcomes, &appended);
        let mut appended = appended.into_iter();
        let mut out = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            let outcome = match outcome {
                Some(invalid) => invalid,
                None => match appended.next() {
                    Some(Appended::Stored(pos)) => AppendOutcome::Stored(pos),
                    Some(Appended::Duplicate(pos)) => AppendOutcome::Duplicate(pos),
                    None => {
                        return Err(StorageError::Poisoned(
                            "the writer answered fewer events than it was given".into(),
                        )
                        .into());
                    }
                },
            };
            out.push(outcome);
        }
        Ok(out)
    }

    /// Indexes the stored events of a batch before its caller is answered,
    /// so an acknowledged event is visible to queries at once: visible at
    /// once, or (`visible` false, while the writer syncs them) staged for
    /// [`Db::commit_staged`] to make visible once they are durable.
    /// `terms` holds the batch's valid events, one per entry of `appended`.
    fn index_stored(&self, terms: &BatchTerms<'_>, appended: &[Appended], visible: bool) {
        let set = self.log.segments();
        for (segment, rows) in rows_by_segment(appended) {
            if visible {
                self.indexes.insert_terms(&set, segment, terms, &rows);
            } else {
                self.indexes.stage_terms(&set, segment, terms, &rows);
            }
        }
    }

    /// Hands the stored events to the live tail, as runs of consecutive
    /// arrival numbers. Without subscribers only the runs go (the hub
    /// keeps counting arrivals), and the events are not walked at all.
    /// `events` is the batch (`None` when it was freed because nobody
    /// listened then): a subscriber that has joined since gets the stored
    /// events read back from the log.
    fn publish_stored(
        &self,
        events: Option<Vec<Event>>,
        outcomes: &[Option<AppendOutcome>],
        appended: &[Appended],
    ) {
        let set = self.log.segments();
        let listening = self.tail.has_subscribers();
        let mut valid = events.filter(|_| listening).map(|events| {
            events
                .into_iter()
                .zip(outcomes)
                .filter(|(_, o)| o.is_none())
                .map(|(e, _)| e)
        });
        let mut reader = (listening && valid.is_none()).then(|| RowReader::new(set.clone()));
        let mut run: Option<(u64, u64, Vec<Arc<Event>>)> = None;
        // The segment of the previous event and its first arrival number.
        let mut segment: Option<(u64, u64)> = None;
        for outcome in appended {
            let event = valid.as_mut().and_then(Iterator::next);
            let Appended::Stored(pos) = outcome else {
                continue;
            };
            let event = match (event, reader.as_mut()) {
                (Some(e), _) => Some(e),
                (None, Some(reader)) => match reader.event(*pos) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(
                            segment = pos.segment,
                            row = pos.row,
                            error = %e,
                            "a stored event could not be read back for the live tail"
                        );
                        None
                    }
                },
                (None, None) => None,
            };
            let first_seq = match segment {
                Some((id, first_seq)) if id == pos.segment => first_seq,
                _ => {
                    let Some(first_seq) = set.get(pos.segment).map(|s| match s {
                        SegmentRef::Open(o) => o.first_seq,
                        SegmentRef::Sealed(s) => s.first_seq,
                    }) else {
                        continue;
                    };
                    segment = Some((pos.segment, first_seq));
                    first_seq
                }
            };
            let seq = first_seq + u64::from(pos.row);
            match &mut run {
                Some((first, count, events)) if *first + *count == seq => {
                    *count += 1;
                    events.extend(event.map(Arc::new));
                }
                _ => {
                    if let Some((first, count, events)) = run.take() {
                        self.tail.publish(first, count, events);
                    }
                    run = Some((seq, 1, event.map(Arc::new).into_iter().collect()));
                }
            }
        }
        if let Some((first, count, events)) = run {
            self.tail.publish(first, count, events);
        }
    }

    /// Subscribes to the events stored from now on that match `filter`.
    pub fn subscribe(&self, filter: TailFilter) -> Subscription {
        self.tail.subscribe(filter)
    }

    /// Current live-tail subscribers.
    pub fn tail_subscribers(&self) -> usize {
        self.tail.subscribers()
    }

    /// The events matching `query`, in its order, with a cursor for the
    /// next page when more may follow.
    pub fn query(&self, query: &Query) -> Result<Page, DbError> {
        query.validate()?;
        let set = self.log.segments();
        let held = self.indexes.hold_all(&set)?;
        let inputs = inputs(&set, &held);
        self.check_text_cost(&set, query, &inputs)?;
        let watermark = match &query.cursor {
            Some(c) => c.watermark,
            None => set.active.first_seq + u64::from(set.active.visible_rows()),
        };
        let mut reader = RowReader::with_cache(set.clone(), self.blocks.clone());
        let needle = query.text.clone().unwrap_or_default();
        let selection = query::select(query, &inputs, watermark, |segment, candidates| {
            Ok(rows_with_text(&mut reader, segment, candidates, &needle)?)
        })?;
        drop(held);
        drop(reader);
        let events = self.decode_hits(&set, &selection.hits)?;
        let next_cursor = match (selection.more, selection.hits.last()) {
            (true, Some(last)) => Some(Cursor {
                timestamp_us: last.timestamp_us,
                seq: last.seq,
                watermark,
                order: query.order,
            }),
            _ => None,
        };
        Ok(Page {
            events,
            next_cursor,
        })
    }

    /// Decodes the events of `hits`, in their order. Rows are read in
    /// arrival order (each block once); when they span many uncached
    /// blocks, runs of positions are shared with an idle core
    /// (`par::help_from_pool`: block decompression is most of a query's
    /// time, and the caller never waits for a busy one).
    fn decode_hits(
        &self,
        set: &Arc<storage::SegmentSet>,
        hits: &[Hit],
    ) -> Result<Vec<Event>, DbError> {
        let mut by_position: Vec<usize> = (0..hits.len()).collect();
        by_position.sort_unstable_by_key(|&i| (hits[i].segment, hits[i].row));
        // Sealed blocks to decompress, not in the cache (rows of the open
        // segments and cached blocks are cheap).
        let mut blocks = 0usize;
        let mut last = None;
        for &i in &by_position {
            if let Some(SegmentRef::Sealed(s)) = set.get(hits[i].segment)
                && let Some(block) = s.block_of(hits[i].row)
                && last != Some((s.id, block))
            {
                last = Some((s.id, block));
                blocks += usize::from(!self.blocks.contains(s.id, block));
            }
        }
        let decoded: Vec<(usize, Event)> = if blocks < PARALLEL_DECODE_MIN {
            decode_run(set, &self.blocks, hits, &by_position)?
        } else {
            // Runs of about eight blocks, shared with an idle core.
            let run = by_position.len().div_ceil(blocks.div_ceil(8)).max(1);
            let runs = by_position.len().div_ceil(run);
            let (set, cache) = (set.clone(), self.blocks.clone());
            let (hits, order) = (Arc::new(hits.to_vec()), Arc::new(by_position));
            let decoded = crate::par::help_from_pool(runs, move |k| {
                let part = order.get(k * run..((k + 1) * run).min(order.len()));
                decode_run(&set, &cache, &hits, part.unwrap_or_default())
            });
            let mut all = Vec::new();
            for part in decoded {
                all.extend(part?);
            }
            all
        };
        let mut slots: Vec<Option<Event>> = vec![None; hits.len()];
        for (i, event) in decoded {
            slots[i] = Some(event);
        }
        Ok(slots.into_iter().flatten().collect())
    }

    /// Counts by source, type and severity of the events matching `query`
    /// (its limit, offset, order and cursor are ignored), from bitmap
    /// counts: nothing is decoded unless `text` is given.
    pub fn stats(&self, query: &Query) -> Result<Stats, DbError> {
        self.stats_with(query, false)
    }

    /// [`Db::stats`], plus the number of distinct correlation ids when
    /// `distinct_correlation_ids` is set (it reads every correlation-id
    /// bitmap of the segments involved).
    pub fn stats_with(
        &self,
        query: &Query,
        distinct_correlation_ids: bool,
    ) -> Result<Stats, DbError> {
        let set = self.log.segments();
        let held = self.indexes.hold_all(&set)?;
        let inputs = inputs(&set, &held);
        self.check_text_cost(&set, query, &inputs)?;
        let mut reader = RowReader::with_cache(set.clone(), self.blocks.clone());
        let needle = query.text.clone().unwrap_or_default();
        let stats = query::stats(
            query,
            &inputs,
            distinct_correlation_ids,
            |segment, candidates| Ok(rows_with_text(&mut reader, segment, candidates, &needle)?),
        )?;
        Ok(stats)
    }

    /// Groups the events matching `agg.filter` and computes its metrics
    /// (see `query::aggregate`). Numbers of declared fields come from the
    /// segments' numeric columns; other pointers decode the rows.
    pub fn aggregate(&self, agg: &Aggregation) -> Result<AggregateResult, DbError> {
        let set = self.log.segments();
        let mut held = self.indexes.hold_all(&set)?;
        let wants_numbers = agg.metrics.iter().any(|m| {
            matches!(
                m.metric,
                Metric::Sum(_)
                    | Metric::Avg(_)
                    | Metric::Min(_)
                    | Metric::Max(_)
                    | Metric::Percentile(..)
            )
        }) || agg.group_by.iter().any(|g| matches!(g, GroupBy::Field(_)));
        if wants_numbers {
            self.indexes.attach_numbers(&set, &mut held);
        }
        let inputs = inputs(&set, &held);
        self.check_text_cost(&set, &agg.filter, &inputs)?;
        // A pointer no segment has a column for is read from the records.
        let undeclared = |p: &str| !self.config.numeric_fields.iter().any(|f| f == p);
        let field = if agg
            .metrics
            .iter()
            .any(|m| m.metric.pointer().is_some_and(undeclared))
        {
            Some("metrics")
        } else if agg
            .group_by
            .iter()
            .any(|g| matches!(g, GroupBy::Field(p) if undeclared(p)))
        {
            Some("group_by")
        } else {
            None
        };
        if let Some(field) = field {
            query::check_decode_cost(
                field,
                &agg.filter,
                &inputs,
                self.config.limits.query_decode_max,
                "narrow the filters, or declare the field ([analytics] numeric_fields)",
                |_, candidates| candidates.len(),
            )?;
        }
        let needle = agg.filter.text.clone().unwrap_or_default();
        let result = query::aggregate::aggregate(agg, &inputs, || Records {
            reader: RowReader::with_cache(set.clone(), self.blocks.clone()),
            needle: &needle,
        })?;
        Ok(result)
    }

    /// Refuses a `text` filter that would decode too many events: the
    /// candidates of the index filters, less the rows of the block groups
    /// that sealed segments' text filters rule out.
    fn check_text_cost(
        &self,
        set: &Arc<storage::SegmentSet>,
        query: &Query,
        inputs: &[SegmentInput<'_>],
    ) -> Result<(), DbError> {
        if let Some(needle) = &query.text {
            let reader = RowReader::new(set.clone());
            query::check_decode_cost(
                "text",
                query,
                inputs,
                self.config.limits.query_decode_max,
                "add filters (source, type, severity, tags, time range) to narrow the search",
                |segment, candidates| reader.rows_maybe_with(segment, candidates, needle).len(),
            )?;
        }
        Ok(())
    }

    /// Bytes of memory the indexes hold (not counting mapped files).
    pub fn index_memory_bytes(&self) -> usize {
        self.indexes.memory_bytes()
    }

    /// Stores one event.
    pub fn append(&self, event: Event) -> Result<AppendOutcome, DbError> {
        let mut outcomes = self.append_batch(vec![event])?;
        outcomes.pop().ok_or_else(|| {
            DbError::Storage(StorageError::Poisoned("no outcome for the event".into()))
        })
    }

    /// The event with this id, if stored and not deleted.
    pub fn get(&self, event_id: &str) -> Result<Option<Event>, DbError> {
        match self.log.find(event_id)? {
            Some((pos, _)) if self.is_deleted(pos) => Ok(None),
            Some((pos, payload)) => Ok(Some(storage::decode_at(pos, &payload)?)),
            None => Ok(None),
        }
    }

    fn is_deleted(&self, pos: Position) -> bool {
        self.indexes
            .deleted(pos.segment)
            .is_some_and(|d| d.contains(pos.row))
    }

    /// Deletes the event with this id; false when it is unknown or deleted
    /// already. The deletion is durable when this returns. The id stays
    /// taken (a retry of its ingest is a duplicate) until compaction
    /// rewrites its segment.
    pub fn delete(&self, event_id: &str) -> Result<bool, DbError> {
        let _one_at_a_time = self.delete_lock.lock();
        let Some((pos, _)) = self.log.find(event_id)? else {
            return Ok(false);
        };
        if self.is_deleted(pos) {
            return Ok(false);
        }
        let mut rows = roaring::RoaringBitmap::new();
        rows.insert(pos.row);
        self.apply_deletes(vec![(pos.segment, rows)])?;
        Ok(true)
    }

    /// Deletes every event whose timestamp is before `before`; returns how
    /// many. Durable when this returns.
    pub fn delete_before(&self, before: Timestamp) -> Result<u64, DbError> {
        self.delete_older(Some(before.as_micros()), &[])
    }

    /// Retention by age: every event older than `cutoff` goes. Sealed
    /// segments left with nothing live are dropped (their space is freed at
    /// once); older events in the other segments are deleted (hidden at
    /// once, bytes freed by compaction). Returns (segments dropped, events
    /// deleted). See [`Db::apply_retention_policy`] for size and per-source
    /// retention.
    pub fn apply_retention(&self, cutoff: Timestamp) -> Result<(usize, u64), DbError> {
        let policy = crate::maintenance::RetentionPolicy {
            max_age: Some(std::time::Duration::ZERO),
            ..Default::default()
        };
        let report = self.apply_retention_policy(&policy, cutoff)?;
        Ok((report.segments_dropped, report.events_deleted))
    }

    /// Deletes every event matching `query` (its paging fields are
    /// ignored); returns how many. Durable when this returns. A query with
    /// no filter at all is refused: use [`Db::delete_before`] to empty a
    /// store on purpose.
    pub fn delete_matching(&self, query: &Query) -> Result<u64, DbError> {
        if !query.has_index_filter()
            && query.start.is_none()
            && query.end.is_none()
            && query.text.is_none()
        {
            return Err(DbError::Query(QueryError::Invalid {
                field: "filter",
                reason: "a delete by query needs at least one filter".into(),
            }));
        }
        let _one_at_a_time = self.delete_lock.lock();
        let set = self.log.segments();
        let held = self.indexes.hold_all(&set)?;
        let inputs = inputs(&set, &held);
        let mut reader = RowReader::with_cache(set.clone(), self.blocks.clone());
        let needle = query.text.clone().unwrap_or_default();
        let changes = query::matching_rows(query, &inputs, |segment, candidates| {
            Ok(rows_with_text(&mut reader, segment, candidates, &needle)?)
        })?;
        drop(held);
        let total = changes.iter().map(|(_, rows)| rows.len()).sum();
        self.apply_deletes(changes)?;
        Ok(total)
    }

    pub(crate) fn maintenance_lock(&self) -> &parking_lot::Mutex<()> {
        &self.maintenance_lock
    }

    pub(crate) fn delete_lock(&self) -> &parking_lot::Mutex<()> {
        &self.delete_lock
    }

    pub(crate) fn indexes(&self) -> &Indexes {
        &self.indexes
    }

    /// A segment's deleted rows, if it has any.
    pub(crate) fn deleted_rows(&self, segment: u64) -> Option<Arc<roaring::RoaringBitmap>> {
        self.indexes.deleted(segment)
    }

    pub(crate) fn apply_deletes(
        &self,
        changes: Vec<(u64, roaring::RoaringBitmap)>,
    ) -> Result<(), DbError> {
        if changes.is_empty() {
            return Ok(());
        }
        for (segment, all) in self.log.add_tombstones(&changes)? {
            self.indexes.set_deleted(segment, all);
        }
        Ok(())
    }

    /// Every event in arrival order.
    pub fn scan(&self) -> storage::Scan {
        self.log.scan()
    }

    /// Number of stored events.
    pub fn len(&self) -> u64 {
        self.log.segments().total_rows()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes everything appended durable (useful under `interval`/`never`).
    pub fn sync(&self) -> Result<(), DbError> {
        Ok(self.log.sync()?)
    }

    /// Rolls and seals the active segment now.
    pub fn seal(&self) -> Result<(), DbError> {
        Ok(self.log.seal()?)
    }

    /// Why writes are refused now, if they are: free space under the floor
    /// (temporary: measured again as writes come, and by [`Db::free_bytes`])
    /// or an earlier storage failure (until a restart).
    pub fn writes_refused(&self) -> Option<String> {
        self.log
            .poisoned()
            .map(|why| format!("the store refuses writes after an earlier failure: {why}"))
            .or_else(|| self.space.refused())
    }

    /// Measures the free space of the data directory's file system now
    /// (updating the floor's verdict); `None` when it cannot be measured.
    pub fn free_bytes(&self) -> Option<u64> {
        if self.space.floor > 0 {
            self.space.refresh();
        }
        self.space.fs.available_bytes(&self.space.dir).ok()
    }

    /// The storage log, for tools that inspect segments.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// Seals, syncs and stops the background threads.
    pub fn close(&self) -> Result<(), DbError> {
        self.tail.close();
        Ok(self.log.close()?)
    }
}
