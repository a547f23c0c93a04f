//! `storage/`: here is an event, keep it safe.
//!
//! An append-only segmented log. One writer thread owns the active segment
//! and group-commits appends; a sealer thread turns rolled segments into
//! compressed, immutable `.seg` files read through `memmap2`; a redb catalog
//! names the segments. Storage knows nothing of bitmaps, queries, HTTP or
//! serde. Byte layouts: `docs/format.md`.

mod active;
pub mod catalog;
pub mod compact;
pub mod dir;
pub mod frame;
pub mod ids;
mod pipeline;
pub mod record;
mod recovery;
pub mod segment;
pub mod snapshot;
pub mod textfilter;
mod writer;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded};
use parking_lot::{Mutex, RwLock};

pub use active::OpenSegment;

/// The catalog's file in a data directory: its presence is what makes a
/// directory a store.
pub const CATALOG_FILE: &str = "catalog.redb";
use catalog::Catalog;
use dir::FileSystem;
use ids::{IdFilter, IdHash, hash_id};
pub use segment::{Compression, SealedSegment};

use crate::event::Event;
use crate::limits;

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("data directory {0} is in use by another process")]
    Locked(PathBuf),
    #[error("segment {segment} is corrupted at offset {offset}: {reason}")]
    Corrupted {
        segment: u64,
        offset: u64,
        reason: String,
    },
    #[error("catalog error: {0}")]
    Catalog(String),
    #[error("the store refuses writes after an earlier failure: {0}")]
    Poisoned(String),
    #[error("the store is closed")]
    Closed,
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("seal hook failed for segment {segment}: {reason}")]
    Hook { segment: u64, reason: String },
}

/// Called by the sealer with each new sealed segment, after its file is
/// durable and before the catalog names it: the layer above builds what it
/// derives from the segment (the index) here. An error leaves the segment
/// unsealed and the store refusing writes.
pub trait SealHook: Send + Sync {
    fn sealed(&self, segment: &SealedSegment) -> Result<(), String>;

    /// `segment` was written by compaction from `inputs` (each sealed
    /// segment with the rows left out, in order). By default it is treated
    /// as a newly sealed segment.
    fn compacted(
        &self,
        segment: &SealedSegment,
        inputs: &[(&SealedSegment, &roaring::RoaringBitmap)],
    ) -> Result<(), String> {
        let _ = inputs;
        self.sealed(segment)
    }
}

impl StorageError {
    pub fn io(path: &Path, source: std::io::Error) -> StorageError {
        StorageError::Io {
            path: path.to_owned(),
            source,
        }
    }

    pub fn corrupted(segment: u64, offset: u64, reason: impl Into<String>) -> StorageError {
        StorageError::Corrupted {
            segment,
            offset,
            reason: reason.into(),
        }
    }
}

/// When an append is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FsyncMode {
    /// After its bytes are durable (group commit).
    #[default]
    Always,
    /// When written; synced at most this long after.
    Interval(Duration),
    /// When written; synced on roll and close only.
    Never,
}

impl FsyncMode {
    /// Parses `always`, `interval:MS` or `never`.
    pub fn parse(text: &str) -> Result<FsyncMode, String> {
        match text {
            "always" => Ok(FsyncMode::Always),
            "never" => Ok(FsyncMode::Never),
            _ => match text.strip_prefix("interval:").map(str::parse::<u64>) {
                Some(Ok(ms)) if ms > 0 => Ok(FsyncMode::Interval(Duration::from_millis(ms))),
                _ => Err(format!(
                    "fsync mode {text:?}: expected always, interval:MS (MS > 0) or never"
                )),
            },
        }
    }
}

/// Storage settings.
#[derive(Clone, Debug)]
pub struct StorageConfig {
    pub fsync: FsyncMode,
    /// Roll the active segment once it holds this many bytes.
    pub segment_size_bytes: u64,
    /// Roll the active segment once it is this old and holds any row.
    pub segment_age_max: Option<Duration>,
    pub compression: Compression,
    /// Uncompressed bytes per sealed block.
    pub block_size_bytes: usize,
    /// Told how long each fsync of the active log took (metrics).
    pub sync_observer: Option<SyncObserver>,
}

/// A callback for fsync latencies; storage knows nothing of metrics.
#[derive(Clone)]
pub struct SyncObserver(pub Arc<dyn Fn(Duration) + Send + Sync>);

impl std::fmt::Debug for SyncObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncObserver")
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            fsync: FsyncMode::Always,
            segment_size_bytes: 128 * 1024 * 1024,
            segment_age_max: None,
            compression: Compression::ZstdDict,
            block_size_bytes: limits::BLOCK_SIZE_DEFAULT,
            sync_observer: None,
        }
    }
}

impl StorageConfig {
    fn check(&self) -> Result<(), StorageError> {
        let size = self.segment_size_bytes;
        if !(limits::SEGMENT_SIZE_MIN..=limits::SEGMENT_SIZE_MAX).contains(&size) {
            return Err(StorageError::Config(format!(
                "segment size {size} must lie in {}..={}",
                limits::SEGMENT_SIZE_MIN,
                limits::SEGMENT_SIZE_MAX
            )));
        }
        if !(1024..=4 * 1024 * 1024).contains(&self.block_size_bytes) {
            return Err(StorageError::Config(
                "block size must lie in 1 KiB..=4 MiB".into(),
            ));
        }
        Ok(())
    }
}

/// Where a row lives: the order of positions is arrival order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub segment: u64,
    pub row: u32,
}

/// An append handed to the writer, not yet answered.
#[derive(Debug)]
pub struct PendingAppend(Option<Replies>);

/// The writer's two answers to an append: where its rows went (once
/// written), and its outcome (once durable).
#[derive(Debug)]
struct Replies {
    /// Taken by the first call of [`PendingAppend::staged`].
    staged: Option<tokio::sync::oneshot::Receiver<Vec<Appended>>>,
    done: tokio::sync::oneshot::Receiver<Result<Vec<Appended>, StorageError>>,
}

impl PendingAppend {
    /// Waits until the rows are written and returns their positions
    /// (before they are durable), when the writer says so: under
    /// `--fsync always`, while it syncs them. `None` when it does not (or
    /// on a second call); the outcome is then only known from
    /// [`PendingAppend::done`].
    pub async fn staged(&mut self) -> Option<Vec<Appended>> {
        // The writer sends the positions or drops the sender, at the
        // latest with the final outcome.
        self.0.as_mut()?.staged.take()?.await.ok()
    }

    /// Waits until the rows are durable; one outcome per event.
    pub async fn done(self) -> Result<Vec<Appended>, StorageError> {
        match self.0 {
            None => Ok(Vec::new()),
            Some(r) => r.done.await.map_err(|_| StorageError::Closed)?,
        }
    }
}

/// An append handed to the writer by [`Log::submit_blocking`], not yet
/// answered.
#[derive(Debug)]
pub struct BlockingAppend(Option<BlockingReplies>);

#[derive(Debug)]
struct BlockingReplies {
    /// Taken by the first call of [`BlockingAppend::staged`].
    staged: Option<Receiver<Vec<Appended>>>,
    done: Receiver<Result<Vec<Appended>, StorageError>>,
}

impl BlockingAppend {
    /// Waits until the rows are written and returns their positions
    /// (before they are durable), when the writer says so: under
    /// `--fsync always`, while it syncs them. `None` when it does not (or
    /// on a second call); the outcome is then only known from
    /// [`BlockingAppend::done`].
    pub fn staged(&mut self) -> Option<Vec<Appended>> {
        // The writer sends the positions or drops the sender, at the
        // latest with the final outcome.
        self.0.as_mut()?.staged.take()?.recv().ok()
    }

    /// Waits until the rows are acknowledged; one outcome per event.
    pub fn done(self) -> Result<Vec<Appended>, StorageError> {
        match self.0 {
            None => Ok(Vec::new()),
            Some(r) => r.done.recv().map_err(|_| StorageError::Closed)?,
        }
    }
}

/// Events ready for the writer: validated, encoded and framed on the
/// caller's thread into one buffer, so that the writer only checks ids and
/// copies bytes.
#[derive(Debug, Default)]
pub struct Prepared {
    frames: Vec<u8>,
    items: Vec<PreparedItem>,
}

#[derive(Debug, Clone, Copy)]
struct PreparedItem {
    hash: IdHash,
    timestamp_us: i64,
    start: usize,
    end: usize,
    /// The event id's byte range inside `frames`.
    id_start: usize,
    id_end: usize,
}

impl Prepared {
    pub fn with_capacity(events: usize) -> Prepared {
        Prepared {
            frames: Vec::with_capacity(events * 512),
            items: Vec::with_capacity(events),
        }
    }

    /// Frames `event` (validated by the caller) and returns its payload size;
    /// if `limit` is exceeded the event is not kept and `Err(size)` returned.
    pub fn push(&mut self, event: &Event, limit: usize) -> Result<usize, usize> {
        let start = self.frames.len();
        self.frames.resize(start + frame::FRAME_HEADER_SIZE, 0);
        record::encode(event, &mut self.frames);
        let payload_len = self.frames.len() - start - frame::FRAME_HEADER_SIZE;
        if payload_len > limit {
            self.frames.truncate(start);
            return Err(payload_len);
        }
        frame::seal_in_place(frame::FrameKind::EventV1, &mut self.frames[start..]);
        // The id is field 1, written first: tag byte, then a one- or two-byte
        // length (ids are at most 128 bytes).
        let id_start =
            start + frame::FRAME_HEADER_SIZE + 1 + if event.id.len() < 128 { 1 } else { 2 };
        self.items.push(PreparedItem {
            hash: hash_id(&event.id),
            timestamp_us: event.timestamp.as_micros(),
            start,
            end: self.frames.len(),
            id_start,
            id_end: id_start + event.id.len(),
        });
        Ok(payload_len)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.frames.len()
    }

    fn id(&self, i: usize) -> &[u8] {
        let item = &self.items[i];
        &self.frames[item.id_start..item.id_end]
    }

    fn frame_len(&self, i: usize) -> usize {
        let item = &self.items[i];
        item.end - item.start
    }

    fn frame_mut(&mut self, i: usize) -> &mut [u8] {
        let item = &self.items[i];
        &mut self.frames[item.start..item.end]
    }

    /// The frames of events `first..end`, which lie back to back.
    fn frames(&self, first: usize, end: usize) -> &[u8] {
        match (
            self.items.get(first),
            end.checked_sub(1).and_then(|l| self.items.get(l)),
        ) {
            (Some(a), Some(b)) if first < end => &self.frames[a.start..b.end],
            _ => &[],
        }
    }
}

/// What happened to one appended event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    Stored(Position),
    /// Its id was stored already, at this position.
    Duplicate(Position),
}

/// The segments readers see; replaced whole (copy on write) when a segment
/// rolls or seals, so a reader holding one keeps a consistent view.
#[derive(Debug, Clone)]
pub struct SegmentSet {
    /// In arrival order (ascending `first_seq`). Ids ascend with it except
    /// for compacted segments, which take a fresh id.
    pub sealed: Vec<Arc<SealedSegment>>,
    /// Rolled, not yet sealed, ascending by id.
    pub sealing: Vec<Arc<OpenSegment>>,
    pub active: Arc<OpenSegment>,
}

/// A segment of either kind.
#[derive(Debug, Clone, Copy)]
pub enum SegmentRef<'a> {
    Sealed(&'a Arc<SealedSegment>),
    Open(&'a Arc<OpenSegment>),
}

impl SegmentRef<'_> {
    pub fn id(&self) -> u64 {
        match self {
            SegmentRef::Sealed(s) => s.id,
            SegmentRef::Open(s) => s.id,
        }
    }

    pub fn rows(&self) -> u32 {
        match self {
            SegmentRef::Sealed(s) => s.rows,
            SegmentRef::Open(s) => s.visible_rows(),
        }
    }
}

impl SegmentSet {
    /// Every segment in id order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = SegmentRef<'_>> {
        self.sealed
            .iter()
            .map(SegmentRef::Sealed)
            .chain(self.sealing.iter().map(SegmentRef::Open))
            .chain(std::iter::once(SegmentRef::Open(&self.active)))
    }

    pub fn get(&self, id: u64) -> Option<SegmentRef<'_>> {
        self.iter().find(|s| s.id() == id)
    }

    pub fn total_rows(&self) -> u64 {
        self.iter().map(|s| u64::from(s.rows())).sum()
    }

    /// Bytes of the sealed segments' files.
    pub fn sealed_bytes(&self) -> u64 {
        self.sealed.iter().map(|s| s.file_bytes()).sum()
    }

    /// The largest segment id in the set.
    pub fn max_id(&self) -> u64 {
        self.iter().map(|s| s.id()).max().unwrap_or(0)
    }
}

pub(crate) struct Shared {
    pub dir: PathBuf,
    pub config: StorageConfig,
    pub catalog: Catalog,
    pub set: RwLock<Arc<SegmentSet>>,
    /// Ids of sealed segments; maintained by the sealer.
    pub filter: Mutex<IdFilter>,
    pub poisoned: Mutex<Option<String>>,
    pub hook: Option<Arc<dyn SealHook>>,
    /// The next unused segment id (rolls and compaction take from it).
    pub next_id: std::sync::atomic::AtomicU64,
    /// Whether `segments/spare.log` holds a sealed segment's log that the
    /// next roll may overwrite (see `writer::retire_log`).
    pub spare: Mutex<bool>,
    /// Logs the writer started in a reused file.
    pub logs_reused: std::sync::atomic::AtomicU64,
}

impl Shared {
    pub fn segments_dir(&self) -> PathBuf {
        self.dir.join("segments")
    }

    /// Takes a fresh segment id.
    pub fn take_id(&self) -> u64 {
        self.next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    pub fn log_path(&self, id: u64) -> PathBuf {
        segment_path(&self.dir, id, "log")
    }

    pub fn seg_path(&self, id: u64) -> PathBuf {
        segment_path(&self.dir, id, "seg")
    }

    pub fn poison(&self, why: String) {
        tracing::error!(reason = %why, "storage refuses further writes");
        let mut p = self.poisoned.lock();
        if p.is_none() {
            *p = Some(why);
        }
    }

    pub fn check_poisoned(&self) -> Result<(), StorageError> {
        match &*self.poisoned.lock() {
            Some(why) => Err(StorageError::Poisoned(why.clone())),
            None => Ok(()),
        }
    }
}

/// The nice value of the background threads that compress and rewrite
/// (the sealer, compaction): when they and an append want the same core,
/// the append's threads win. Sealing at nice 0 took the second core from
/// the writer between a caller's hand-over and its sync: one caller's
/// batches of 1,000 ran 10-15 % slower (docs/PERFORMANCE.md, "Ingest").
/// Only the order changes, not the work: a sealer kept from the CPU long
/// enough holds back the roll (`limits::SEAL_BACKLOG_MAX`), which is
/// back-pressure on ingest.
const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's priority to [`BACKGROUND_NICE`]. Best
/// effort: a system that refuses leaves the thread as it was.
pub(crate) fn nice_background_thread() {
    let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), BACKGROUND_NICE);
}

pub(crate) fn segment_path(dir: &Path, id: u64, ext: &str) -> PathBuf {
    dir.join("segments").join(format!("{id:020}.{ext}"))
}

/// The log: open, append, read, scan, close.
pub struct Log {
    shared: Arc<Shared>,
    tx: Mutex<Option<Sender<writer::Command>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    _lock: File,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.shared.dir)
            .finish()
    }
}

impl Log {
    /// Opens (or creates) the log in `dir` with real files.
    pub fn open(dir: &Path, config: StorageConfig) -> Result<Log, StorageError> {
        Self::open_with(dir, config, Arc::new(dir::RealFs), None)
    }

    /// Opens with a chosen file system seam (tests inject faults here) and
    /// an optional hook run on every seal.
    pub fn open_with(
        dir: &Path,
        config: StorageConfig,
        fs: Arc<dyn FileSystem>,
        hook: Option<Arc<dyn SealHook>>,
    ) -> Result<Log, StorageError> {
        config.check()?;
        let recovered = recovery::recover(dir)?;
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            config,
            catalog: recovered.catalog,
            set: RwLock::new(Arc::new(recovered.set)),
            filter: Mutex::new(IdFilter::with_capacity(0)),
            poisoned: Mutex::new(None),
            hook,
            next_id: std::sync::atomic::AtomicU64::new(recovered.next_id),
            spare: Mutex::new(false),
            logs_reused: std::sync::atomic::AtomicU64::new(0),
        });
        let (tx, rx) = bounded(limits::WRITER_QUEUE_DEPTH_MAX);
        let (seal_tx, seal_rx) = bounded(limits::SEAL_BACKLOG_MAX);
        for segment in recovered.to_seal {
            // The backlog is at most the segments rolled before a crash; the
            // channel takes them all before the sealer starts or we wait.
            let _ = seal_tx.try_send(segment.clone()).or_else(|_| {
                writer::seal_one(&shared, &segment);
                Ok::<(), ()>(())
            });
        }
        let sealer_shared = shared.clone();
        let sealer = std::thread::Builder::new()
            .name("evdb-sealer".into())
            .spawn(move || writer::run_sealer(sealer_shared, seal_rx))
            .map_err(|e| StorageError::io(dir, e))?;
        let writer = writer::Writer::new(shared.clone(), fs, recovered.log, seal_tx)?;
        let writer = std::thread::Builder::new()
            .name("evdb-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StorageError::io(dir, e))?;
        Ok(Log {
            shared,
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(vec![writer, sealer]),
            _lock: recovered.lock,
        })
    }

    fn sender(&self) -> Result<Sender<writer::Command>, StorageError> {
        self.tx.lock().clone().ok_or(StorageError::Closed)
    }

    /// Appends prepared events; returns one outcome per event, in order,
    /// once they are acknowledged under the configured fsync mode. Runs
    /// `meanwhile` once the events are handed to the writer, while it
    /// checks and writes them; then calls `on_staged` with its value and
    /// the outcomes as soon as the frames are written, while they are
    /// being synced (under `--fsync always`; not at all otherwise). The
    /// stored rows are not visible yet: the caller may index them before
    /// they are durable, and must make them visible only after this
    /// returns `Ok`. Returns the outcomes, the value of `meanwhile` and
    /// whether `on_staged` was called. [`Log::submit_blocking`] gives the
    /// same steps one at a time.
    pub fn append_staged<T>(
        &self,
        events: Prepared,
        meanwhile: impl FnOnce() -> T,
        on_staged: impl FnOnce(&T, &[Appended]),
    ) -> Result<(Vec<Appended>, T, bool), StorageError> {
        let mut pending = self.submit_blocking(events)?;
        let value = meanwhile();
        let staged = pending.staged();
        let called = staged.is_some();
        if let Some(positions) = staged {
            on_staged(&value, &positions);
        }
        Ok((pending.done()?, value, called))
    }

    /// Hands `events` to the writer now, for callers that block their
    /// thread: [`BlockingAppend::staged`] then waits until they are
    /// written, and [`BlockingAppend::done`] until they are acknowledged
    /// (the steps of [`Log::append_staged`], for a caller that wants to
    /// do more between them than one closure can borrow).
    pub fn submit_blocking(&self, events: Prepared) -> Result<BlockingAppend, StorageError> {
        self.shared.check_poisoned()?;
        if events.is_empty() {
            return Ok(BlockingAppend(None));
        }
        let (done, rx) = bounded(1);
        let (staged_tx, staged_rx) = bounded(1);
        let reply = writer::AppendReply::Blocking {
            done,
            staged: Some(staged_tx),
        };
        self.sender()?
            .send(writer::Command::Append { events, reply })
            .map_err(|_| StorageError::Closed)?;
        Ok(BlockingAppend(Some(BlockingReplies {
            staged: Some(staged_rx),
            done: rx,
        })))
    }

    /// Hands `events` to the writer now, for async callers (the task then
    /// awaits the writer's answer instead of blocking its thread; handing
    /// the request over may wait briefly when the writer's queue is full:
    /// that is backpressure): appends submitted one after another
    /// are written in that order. Await the answer with
    /// [`PendingAppend::wait`].
    pub fn submit_staged(&self, events: Prepared) -> Result<PendingAppend, StorageError> {
        self.shared.check_poisoned()?;
        if events.is_empty() {
            return Ok(PendingAppend(None));
        }
        let (done, rx) = tokio::sync::oneshot::channel();
        let (staged_tx, staged_rx) = tokio::sync::oneshot::channel();
        let reply = writer::AppendReply::Async {
            done,
            staged: Some(staged_tx),
        };
        self.sender()?
            .send(writer::Command::Append { events, reply })
            .map_err(|_| StorageError::Closed)?;
        Ok(PendingAppend(Some(Replies {
            staged: Some(staged_rx),
            done: rx,
        })))
    }

    /// Makes everything appended so far durable.
    pub fn sync(&self) -> Result<(), StorageError> {
        self.control(writer::Control::Sync)
    }

    /// Rolls the active segment (if it holds rows) and waits until every
    /// rolled segment is sealed.
    pub fn seal(&self) -> Result<(), StorageError> {
        self.control(writer::Control::Roll)?;
        self.control(writer::Control::WaitSealed)
    }

    fn control(&self, what: writer::Control) -> Result<(), StorageError> {
        let (reply, rx) = bounded(1);
        self.sender()?
            .send(writer::Command::Control { what, reply })
            .map_err(|_| StorageError::Closed)?;
        rx.recv().map_err(|_| StorageError::Closed)?
    }

    /// The current segments.
    pub fn segments(&self) -> Arc<SegmentSet> {
        self.shared.set.read().clone()
    }

    /// Reads the record payload at `pos`, if the row exists and is visible.
    pub fn read_payload(&self, pos: Position) -> Result<Option<Vec<u8>>, StorageError> {
        read_payload(&self.segments(), pos)
    }

    /// Reads and decodes the event at `pos`.
    pub fn read(&self, pos: Position) -> Result<Option<Event>, StorageError> {
        match self.read_payload(pos)? {
            Some(payload) => decode_at(pos, &payload).map(Some),
            None => Ok(None),
        }
    }

    /// Finds the event with this id: its position and record payload.
    pub fn find(&self, id: &str) -> Result<Option<(Position, Vec<u8>)>, StorageError> {
        find_id(&self.segments(), id.as_bytes(), hash_id(id))
    }

    /// Finds and decodes the event with this id.
    pub fn get(&self, id: &str) -> Result<Option<Event>, StorageError> {
        match self.find(id)? {
            Some((pos, payload)) => decode_at(pos, &payload).map(Some),
            None => Ok(None),
        }
    }

    /// Every visible event in arrival order.
    pub fn scan(&self) -> Scan {
        Scan::new(self.segments())
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Drops the sealed segments `ids` (retention): the catalog forgets
    /// them in one durable transaction (with their tombstones) and readers
    /// stop seeing them. Returns the dropped segments (those of `ids` that
    /// were sealed), whose files the caller then unlinks with
    /// [`Log::compact_unlink`] (it may first let go of its locks: giving
    /// the blocks back takes a sync per step). Files left behind, by a
    /// crash or a caller that did not unlink, are removed by recovery.
    pub fn drop_sealed(&self, ids: &[u64]) -> Result<Vec<Arc<SealedSegment>>, StorageError> {
        self.shared.check_poisoned()?;
        let victims: Vec<u64> = self
            .segments()
            .sealed
            .iter()
            .filter(|s| ids.contains(&s.id))
            .map(|s| s.id)
            .collect();
        if victims.is_empty() {
            return Ok(Vec::new());
        }
        let changes: Vec<(u64, Option<catalog::SegmentMeta>)> =
            victims.iter().map(|id| (*id, None)).collect();
        self.shared.catalog.apply(&changes)?;
        let dropped = {
            let mut current = self.shared.set.write();
            let mut next = SegmentSet::clone(&current);
            let (dropped, kept) = std::mem::take(&mut next.sealed)
                .into_iter()
                .partition(|s| victims.contains(&s.id));
            next.sealed = kept;
            *current = Arc::new(next);
            dropped
        };
        Ok(dropped)
    }

    /// Bytes of memory the id filter of sealed segments holds.
    pub fn id_filter_bytes(&self) -> usize {
        self.shared.filter.lock().memory_bytes()
    }

    /// The deleted rows of every segment that has any (from the catalog).
    pub fn tombstones(&self) -> Result<Vec<(u64, roaring::RoaringBitmap)>, StorageError> {
        self.shared.catalog.tombstones()
    }

    /// Records deleted rows durably; returns each touched segment's full
    /// set afterwards.
    pub fn add_tombstones(
        &self,
        rows: &[(u64, roaring::RoaringBitmap)],
    ) -> Result<Vec<(u64, roaring::RoaringBitmap)>, StorageError> {
        self.shared.check_poisoned()?;
        self.shared
            .catalog
            .add_tombstones(rows, crate::event::Timestamp::now().as_micros())
    }

    /// Why the store refuses writes, if it does.
    pub fn poisoned(&self) -> Option<String> {
        self.shared.poisoned.lock().clone()
    }

    /// Seals the active segment, stops the threads and makes everything
    /// durable. Called by `Drop` too; calling it twice is harmless.
    pub fn close(&self) -> Result<(), StorageError> {
        let Some(tx) = self.tx.lock().take() else {
            return Ok(());
        };
        let (reply, rx) = bounded(1);
        let sent = tx.send(writer::Command::Control {
            what: writer::Control::Shutdown,
            reply,
        });
        drop(tx);
        let result = match sent {
            Ok(()) => rx.recv().unwrap_or(Err(StorageError::Closed)),
            Err(_) => Err(StorageError::Closed),
        };
        for handle in self.threads.lock().drain(..) {
            if handle.join().is_err() {
                tracing::error!("a storage thread panicked");
            }
        }
        writer::discard_spare(&self.shared);
        result
    }

    /// How many logs were started in a reused file (a sealed segment's
    /// log overwritten in place) since the store was opened.
    pub fn logs_reused(&self) -> u64 {
        self.shared
            .logs_reused
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(error = %e, "closing the log");
        }
    }
}

pub(crate) fn decode_at(pos: Position, payload: &[u8]) -> Result<Event, StorageError> {
    record::decode(payload).map_err(|e| StorageError::corrupted(pos.segment, 0, e.to_string()))
}

pub(crate) fn read_payload(
    set: &SegmentSet,
    pos: Position,
) -> Result<Option<Vec<u8>>, StorageError> {
    match set.get(pos.segment) {
        None => Ok(None),
        Some(SegmentRef::Open(s)) => s.read_payload(pos.row),
        Some(SegmentRef::Sealed(s)) => {
            let Some(block) = s.block_of(pos.row) else {
                return Ok(None);
            };
            let block = s.read_block(block)?;
            Ok(block.payload(pos.row).map(|(_, p)| p.to_vec()))
        }
    }
}

/// Looks an id up in every segment, newest first; the hash narrows each
/// segment to a few rows whose stored id is compared byte for byte.
pub(crate) fn find_id(
    set: &SegmentSet,
    id: &[u8],
    hash: IdHash,
) -> Result<Option<(Position, Vec<u8>)>, StorageError> {
    for seg in set.iter().rev() {
        if let Some(pos) = find_id_in(set, seg, id, hash)? {
            return Ok(Some(pos));
        }
    }
    Ok(None)
}

/// Looks an id up in one segment of `set`.
pub(crate) fn find_id_in(
    set: &SegmentSet,
    seg: SegmentRef<'_>,
    id: &[u8],
    hash: IdHash,
) -> Result<Option<(Position, Vec<u8>)>, StorageError> {
    let rows: Vec<u32> = match seg {
        SegmentRef::Open(s) => {
            let visible = s.visible_rows();
            s.rows
                .read()
                .rows_with_hash(hash)
                .filter(|&r| r < visible)
                .collect()
        }
        SegmentRef::Sealed(s) => s.rows_with_hash(hash)?,
    };
    for row in rows {
        let pos = Position {
            segment: seg.id(),
            row,
        };
        if let Some(payload) = read_payload(set, pos)? {
            let (stored, _) = ids::peek_id_and_timestamp(&payload)
                .map_err(|e| StorageError::corrupted(pos.segment, 0, e.to_string()))?;
            if stored.as_bytes() == id {
                return Ok(Some((pos, payload)));
            }
        }
    }
    Ok(None)
}

/// Decompressed sealed blocks shared by all readers: the newest-first
/// queries of a busy store read the same few blocks again and again.
/// Eviction is first-in first-out; the capacity bounds its memory
/// (`BLOCK_CACHE_BLOCKS` × the block size).
pub struct BlockCache {
    inner: Mutex<BlockCacheInner>,
}

#[derive(Default)]
struct BlockCacheInner {
    map: std::collections::HashMap<(u64, usize), Arc<segment::Block>>,
    order: std::collections::VecDeque<(u64, usize)>,
}

impl BlockCache {
    pub fn new() -> BlockCache {
        BlockCache {
            inner: Mutex::new(BlockCacheInner::default()),
        }
    }

    /// Whether block `index` of segment `segment` is cached now.
    pub fn contains(&self, segment: u64, index: usize) -> bool {
        self.inner.lock().map.contains_key(&(segment, index))
    }

    /// The block `index` of `segment`, decompressed (and cached) if needed.
    pub fn get(
        &self,
        segment: &SealedSegment,
        index: usize,
    ) -> Result<Arc<segment::Block>, StorageError> {
        let key = (segment.id, index);
        if let Some(b) = self.inner.lock().map.get(&key) {
            return Ok(b.clone());
        }
        let block = Arc::new(segment.read_block(index)?);
        let mut inner = self.inner.lock();
        if inner.map.insert(key, block.clone()).is_none() {
            inner.order.push_back(key);
        }
        while inner.order.len() > limits::BLOCK_CACHE_BLOCKS {
            if let Some(old) = inner.order.pop_front() {
                inner.map.remove(&old);
            }
        }
        Ok(block)
    }
}

impl Default for BlockCache {
    fn default() -> Self {
        BlockCache::new()
    }
}

/// Reads rows of a segment set, keeping the last decompressed block so
/// that rows read in (or near) arrival order decompress each block once.
pub struct RowReader {
    set: Arc<SegmentSet>,
    cache: Option<Arc<BlockCache>>,
    block: Option<(u64, usize, Arc<segment::Block>)>,
    /// Whether the cached block lacks the last needle asked about.
    lacks: Option<bool>,
}

impl RowReader {
    pub fn new(set: Arc<SegmentSet>) -> RowReader {
        RowReader {
            set,
            cache: None,
            block: None,
            lacks: None,
        }
    }

    /// A reader that shares decompressed blocks through `cache`.
    pub fn with_cache(set: Arc<SegmentSet>, cache: Arc<BlockCache>) -> RowReader {
        RowReader {
            cache: Some(cache),
            ..RowReader::new(set)
        }
    }

    /// A reader of the same segments for another thread, without the
    /// shared cache (for scans, which would only churn it).
    pub fn fork_uncached(&self) -> RowReader {
        RowReader::new(self.set.clone())
    }

    fn load(
        &self,
        sealed: &SealedSegment,
        index: usize,
    ) -> Result<Arc<segment::Block>, StorageError> {
        match &self.cache {
            Some(c) => c.get(sealed, index),
            None => sealed.read_block(index).map(Arc::new),
        }
    }

    /// The record payload at `pos`, if the row exists and is visible.
    pub fn payload(&mut self, pos: Position) -> Result<Option<Vec<u8>>, StorageError> {
        self.with_payload(pos, <[u8]>::to_vec)
    }

    /// Calls `f` on the record payload at `pos` (borrowed from the open
    /// segment's copy or the decompressed block), if the row exists and is
    /// visible.
    fn with_payload<R>(
        &mut self,
        pos: Position,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>, StorageError> {
        let sealed = match self.set.get(pos.segment) {
            None => return Ok(None),
            Some(SegmentRef::Open(s)) => return Ok(s.read_payload(pos.row)?.map(|p| f(&p))),
            Some(SegmentRef::Sealed(s)) => s.clone(),
        };
        let Some(index) = sealed.block_of(pos.row) else {
            return Ok(None);
        };
        let cached = matches!(&self.block, Some((s, b, _)) if *s == pos.segment && *b == index);
        if !cached {
            self.block = Some((pos.segment, index, self.load(&sealed, index)?));
            self.lacks = None;
        }
        Ok(self
            .block
            .as_ref()
            .and_then(|(_, _, b)| b.payload(pos.row))
            .map(|(_, p)| f(p)))
    }

    /// The rows of `candidates` (rows of `segment`) that may hold `needle`
    /// in their `data` by the sealed segment's text filter: all of them
    /// for an open segment or one without a usable filter.
    pub fn rows_maybe_with<'c>(
        &self,
        segment: u64,
        candidates: &'c roaring::RoaringBitmap,
        needle: &str,
    ) -> std::borrow::Cow<'c, roaring::RoaringBitmap> {
        match self.set.get(segment) {
            Some(SegmentRef::Sealed(s)) => s.rows_maybe_with(candidates, needle.as_bytes()),
            _ => std::borrow::Cow::Borrowed(candidates),
        }
    }

    /// Whether `pos` lies in a sealed block whose bytes do not contain
    /// what `finder` looks for (so no row of that block can match).
    pub fn block_lacks(
        &mut self,
        pos: Position,
        finder: &memchr::memmem::Finder<'_>,
    ) -> Result<bool, StorageError> {
        let sealed = match self.set.get(pos.segment) {
            Some(SegmentRef::Sealed(s)) => s.clone(),
            _ => return Ok(false),
        };
        let Some(index) = sealed.block_of(pos.row) else {
            return Ok(false);
        };
        let cached = matches!(&self.block, Some((s, b, _)) if *s == pos.segment && *b == index);
        if !cached {
            let block = self.load(&sealed, index)?;
            let lacks = finder.find(block.raw()).is_none();
            self.block = Some((pos.segment, index, block));
            self.lacks = Some(lacks);
        }
        Ok(self.lacks.unwrap_or(false))
    }

    /// The decoded event at `pos`.
    pub fn event(&mut self, pos: Position) -> Result<Option<Event>, StorageError> {
        self.with_payload(pos, |p| decode_at(pos, p))?.transpose()
    }
}

/// An iterator over every visible event of a segment set, in arrival order.
pub struct Scan {
    set: Arc<SegmentSet>,
    segment: usize,
    row: u32,
    block: Option<segment::Block>,
}

impl Scan {
    fn new(set: Arc<SegmentSet>) -> Scan {
        Scan {
            set,
            segment: 0,
            row: 0,
            block: None,
        }
    }
}

impl Iterator for Scan {
    type Item = Result<(Position, Event), StorageError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let seg = self.set.iter().nth(self.segment)?;
            if self.row >= seg.rows() {
                self.segment += 1;
                self.row = 0;
                self.block = None;
                continue;
            }
            let pos = Position {
                segment: seg.id(),
                row: self.row,
            };
            self.row += 1;
            let payload = match seg {
                SegmentRef::Open(s) => match s.read_payload(pos.row) {
                    Ok(Some(p)) => p,
                    Ok(None) => continue,
                    Err(e) => return Some(Err(e)),
                },
                SegmentRef::Sealed(s) => {
                    let fresh = match &self.block {
                        Some(b) => pos.row >= b.first_row + b.rows(),
                        None => true,
                    };
                    if fresh {
                        let index = s.block_of(pos.row)?;
                        match s.read_block(index) {
                            Ok(b) => self.block = Some(b),
                            Err(e) => return Some(Err(e)),
                        }
                    }
                    let block = self.block.as_ref()?;
                    match block.payload(pos.row) {
                        Some((_, p)) => p.to_vec(),
                        None => {
                            return Some(Err(StorageError::corrupted(
                                pos.segment,
                                0,
                                "row missing from its block",
                            )));
                        }
                    }
                }
            };
            return Some(decode_at(pos, &payload).map(|e| (pos, e)));
        }
    }
}
