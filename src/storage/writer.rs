//! The writer thread (group commit, roll) and the sealer thread.
//!
//! The writer drains every request queued while it was busy into one group,
//! checks ids, writes the group's frames with one gathering write, makes them
//! durable with one `fdatasync` (under `--fsync always`), publishes the new
//! rows to readers and only then answers every caller of the group. A failed
//! write or sync poisons the store: after a failed fsync the kernel may have
//! dropped the dirty pages, so nothing written since can be trusted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::active::{OpenRows, OpenSegment};
use super::catalog::{SegmentMeta, SegmentState};
use super::dir::{FileSystem, LogFile, sync_dir};
use super::frame;
use super::ids::{IdFilter, IdHash};
use super::recovery::{ActiveLog, create_log, spare_log_path};
use super::segment::{self, SealedSegment};
use super::{
    Appended, FsyncMode, Position, Prepared, SegmentRef, SegmentSet, Shared, StorageError, ids,
};
use crate::limits;

/// Ids whose table slots are read ahead at a time (see [`warm_id_lookups`]).
const WARM_RUN: usize = 128;

/// Reads, for up to [`WARM_RUN`] events of the group from `(request,
/// event)` on, the cache lines their id checks will look at first: the
/// active segment's id table, each rolled segment's and the id filter.
/// These are tables of a segment's size and more, so each lookup misses
/// the cache; read in a tight loop of independent loads, the misses of a
/// run overlap instead of stalling the checks one id at a time (a profile
/// of one caller's batches had 30 % of the writer's CPU on the first read
/// of the active segment's table). Returns where the next run starts (past
/// requests without events).
fn warm_id_lookups(
    set: &SegmentSet,
    filter: &IdFilter,
    active: &OpenRows,
    appends: &[PendingAppend],
    (mut r, mut e): (usize, usize),
) -> (usize, usize) {
    let rolled: Vec<_> = set.sealing.iter().map(|s| s.rows.read()).collect();
    let mut warm = 0u64;
    let mut left = WARM_RUN;
    while let Some((events, _)) = appends.get(r) {
        if e == events.len() {
            (r, e) = (r + 1, 0);
            continue;
        }
        if left == 0 {
            break;
        }
        let hash = events.items[e].hash;
        warm ^= active.touch_id(hash) ^ filter.block_word(hash);
        for rows in &rolled {
            warm ^= rows.touch_id(hash);
        }
        e += 1;
        left -= 1;
    }
    std::hint::black_box(warm);
    (r, e)
}

pub(crate) enum Control {
    Sync,
    Roll,
    WaitSealed,
    Shutdown,
}

pub(crate) enum Command {
    Append {
        events: Prepared,
        reply: AppendReply,
    },
    Control {
        what: Control,
        reply: Sender<Result<(), StorageError>>,
    },
}

/// Where the outcome of an append goes: a blocked thread or an awaiting
/// task. `staged`, when present, first receives the positions as soon as
/// the frames are written and before they are synced (`--fsync always`
/// only), so that the caller can index them while the sync runs; it is
/// dropped unsent otherwise, and always before or with the final outcome.
pub(crate) enum AppendReply {
    Blocking {
        done: Sender<AppendResult>,
        staged: Option<Sender<Vec<Appended>>>,
    },
    Async {
        done: tokio::sync::oneshot::Sender<AppendResult>,
        staged: Option<tokio::sync::oneshot::Sender<Vec<Appended>>>,
    },
}

pub(crate) type AppendResult = Result<Vec<Appended>, StorageError>;

impl AppendReply {
    /// Delivers the outcome; a caller that went away is ignored.
    fn send(self, result: AppendResult) {
        match self {
            AppendReply::Blocking { done, .. } => {
                let _ = done.send(result);
            }
            AppendReply::Async { done, .. } => {
                let _ = done.send(result);
            }
        }
    }

    /// Tells a caller that asked for it where its events were written
    /// (not yet durable).
    fn send_staged(&mut self, positions: &[Appended]) {
        match self {
            AppendReply::Blocking { staged, .. } => {
                if let Some(tx) = staged.take() {
                    let _ = tx.send(positions.to_vec());
                }
            }
            AppendReply::Async { staged, .. } => {
                if let Some(tx) = staged.take() {
                    let _ = tx.send(positions.to_vec());
                }
            }
        }
    }
}
/// An append request of the current group with its reply channel.
type PendingAppend = (Prepared, AppendReply);

pub(crate) struct Writer {
    shared: Arc<Shared>,
    fs: Arc<dyn FileSystem>,
    log: Box<dyn LogFile>,
    active: Arc<OpenSegment>,
    /// Bytes written to the active log (header included).
    end: u64,
    rows: u32,
    opened_at: Instant,
    /// Bytes written but not yet synced.
    dirty: bool,
    last_sync: Instant,
    seal_tx: Option<Sender<Arc<OpenSegment>>>,
}

impl Writer {
    pub fn new(
        shared: Arc<Shared>,
        fs: Arc<dyn FileSystem>,
        log: ActiveLog,
        seal_tx: Sender<Arc<OpenSegment>>,
    ) -> Result<Writer, StorageError> {
        let active = shared.set.read().active.clone();
        let path = shared.log_path(active.id);
        let file = fs
            .open_log(&path, log.end)
            .map_err(|e| StorageError::io(&path, e))?;
        let rows = active.visible_rows();
        Ok(Writer {
            shared,
            fs,
            log: file,
            active,
            end: log.end,
            rows,
            opened_at: Instant::now(),
            dirty: false,
            last_sync: Instant::now(),
            seal_tx: Some(seal_tx),
        })
    }

    pub fn run(mut self, rx: Receiver<Command>) {
        self.build_filter();
        let tick = Duration::from_millis(50);
        loop {
            let timeout = match self.shared.config.fsync {
                FsyncMode::Interval(every) if self.dirty => {
                    every.saturating_sub(self.last_sync.elapsed())
                }
                _ => tick,
            };
            let first = match rx.recv_timeout(timeout) {
                Ok(cmd) => cmd,
                Err(RecvTimeoutError::Timeout) => {
                    self.on_idle();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.shutdown();
                    return;
                }
            };
            let mut group = vec![first];
            let mut bytes = 0usize;
            while bytes < limits::GROUP_COMMIT_SIZE_MAX {
                match rx.try_recv() {
                    Ok(cmd) => {
                        if let Command::Append { events, .. } = &cmd {
                            bytes += events.bytes();
                        }
                        group.push(cmd);
                    }
                    Err(_) => break,
                }
            }
            if self.process(group) {
                return;
            }
        }
    }

    /// Seeds the id filter from every sealed segment.
    fn build_filter(&self) {
        let set = self.shared.set.read().clone();
        let rows: usize = set.sealed.iter().map(|s| s.rows as usize).sum();
        let mut filter = IdFilter::with_capacity(rows * 2);
        for seg in &set.sealed {
            for hash in seg.id_hashes() {
                filter.insert(hash);
            }
        }
        *self.shared.filter.lock() = filter;
    }

    fn on_idle(&mut self) {
        if self.shared.check_poisoned().is_err() {
            return;
        }
        if self.dirty
            && let FsyncMode::Interval(every) = self.shared.config.fsync
            && self.last_sync.elapsed() >= every
            && let Err(e) = self.sync()
        {
            self.shared.poison(e.to_string());
            return;
        }
        if let Some(age) = self.shared.config.segment_age_max
            && self.rows > 0
            && self.opened_at.elapsed() >= age
            && let Err(e) = self.roll(true)
        {
            self.shared.poison(e.to_string());
        }
    }

    /// Handles one group; returns true when the writer must stop.
    fn process(&mut self, group: Vec<Command>) -> bool {
        let mut appends: Vec<PendingAppend> = Vec::new();
        let mut controls = Vec::new();
        for cmd in group {
            match cmd {
                Command::Append { events, reply } => appends.push((events, reply)),
                Command::Control { what, reply } => controls.push((what, reply)),
            }
        }
        if !appends.is_empty() {
            let result = self
                .shared
                .check_poisoned()
                .and_then(|()| self.append_group(&mut appends));
            match result {
                Ok(outcomes) => {
                    for ((_, reply), outcome) in appends.into_iter().zip(outcomes) {
                        reply.send(Ok(outcome));
                    }
                }
                Err(e) => {
                    if !matches!(e, StorageError::Poisoned(_)) {
                        self.shared.poison(e.to_string());
                    }
                    let why = self
                        .shared
                        .poisoned
                        .lock()
                        .clone()
                        .unwrap_or_else(|| e.to_string());
                    for (_, reply) in appends {
                        reply.send(Err(StorageError::Poisoned(why.clone())));
                    }
                }
            }
        }
        let mut stop = false;
        for (what, reply) in controls {
            let result = match what {
                Control::Sync => self.sync_if_dirty(),
                Control::Roll => self.roll_if_rows(true),
                Control::WaitSealed => self.wait_sealed(),
                Control::Shutdown => {
                    stop = true;
                    self.shutdown()
                }
            };
            let _ = reply.send(result);
        }
        if !stop
            && self.end >= self.shared.config.segment_size_bytes
            && self.shared.check_poisoned().is_ok()
            && let Err(e) = self.roll(true)
        {
            self.shared.poison(e.to_string());
        }
        stop
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        let path = self.shared.log_path(self.active.id);
        let started = Instant::now();
        self.log.sync().map_err(|e| StorageError::io(&path, e))?;
        if let Some(observe) = &self.shared.config.sync_observer {
            (observe.0)(started.elapsed());
        }
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    fn sync_if_dirty(&mut self) -> Result<(), StorageError> {
        self.shared.check_poisoned()?;
        if self.dirty { self.sync() } else { Ok(()) }
    }

    /// Finds an id stored anywhere but the active segment.
    fn find_elsewhere(
        set: &SegmentSet,
        filter: &IdFilter,
        id: &[u8],
        hash: IdHash,
    ) -> Result<Option<Position>, StorageError> {
        let in_sealed = filter.may_contain(hash);
        // Newest first, the active segment (checked by the caller) skipped:
        // rolled segments, then sealed ones, which the filter can rule out.
        for seg in set.iter().rev().skip(1) {
            match seg {
                SegmentRef::Sealed(_) if !in_sealed => break,
                // Most ids are new: rule a rolled segment out without
                // collecting its candidates.
                SegmentRef::Open(open) => {
                    let visible = open.visible_rows();
                    if !open.rows.read().rows_with_hash(hash).any(|r| r < visible) {
                        continue;
                    }
                }
                SegmentRef::Sealed(_) => {}
            }
            if let Some((pos, _)) = super::find_id_in(set, seg, id, hash)? {
                return Ok(Some(pos));
            }
        }
        Ok(None)
    }

    /// Checks ids and stages the group's frames into the active segment's
    /// row table (invisible to readers until published), then writes,
    /// syncs and publishes them.
    fn append_group(
        &mut self,
        appends: &mut [PendingAppend],
    ) -> Result<Vec<Vec<Appended>>, StorageError> {
        let set = self.shared.set.read().clone();
        // Bytes of the group's new frames.
        let mut written = 0usize;
        // The new frames as runs of back-to-back events of one request:
        // (request, first event, end event).
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        // Staged rows, in row order: (request, event) of each.
        let mut staged: Vec<(usize, usize)> = Vec::new();
        let mut outcomes = Vec::with_capacity(appends.len());
        let active_id = self.active.id;
        {
            let filter = self.shared.filter.lock();
            let mut rows = self.active.rows.write();
            // The first event of the group whose lookups are not warmed.
            let mut warmed_to = (0, 0);
            for (r, (events, _)) in appends.iter().enumerate() {
                let mut out = Vec::with_capacity(events.len());
                for e in 0..events.len() {
                    if (r, e) >= warmed_to {
                        warmed_to = warm_id_lookups(&set, &filter, &rows, appends, (r, e));
                    }
                    let item = events.items[e];
                    let id = events.id(e);
                    let mut dup = None;
                    for row in rows.rows_with_hash(item.hash) {
                        let same = if row >= self.rows {
                            let (sr, se) = staged[(row - self.rows) as usize];
                            appends[sr].0.id(se) == id
                        } else {
                            let (start, end) = rows.range(row);
                            let (_, payload) = self.active.read_frame_at(start, end)?;
                            let (stored, _) =
                                ids::peek_id_and_timestamp(&payload).map_err(|e| {
                                    StorageError::corrupted(active_id, start, e.to_string())
                                })?;
                            stored.as_bytes() == id
                        };
                        if same {
                            dup = Some(Position {
                                segment: active_id,
                                row,
                            });
                            break;
                        }
                    }
                    if dup.is_none() {
                        dup = Self::find_elsewhere(&set, &filter, id, item.hash)?;
                    }
                    if let Some(pos) = dup {
                        out.push(Appended::Duplicate(pos));
                        continue;
                    }
                    let offset = self.end + written as u64;
                    let len = events.frame_len(e);
                    written += len;
                    match runs.last_mut() {
                        Some((run_r, _, end)) if *run_r == r && *end == e => *end = e + 1,
                        _ => runs.push((r, e, e + 1)),
                    }
                    let row = rows.push(offset, len as u64, item.hash, item.timestamp_us);
                    staged.push((r, e));
                    out.push(Appended::Stored(Position {
                        segment: active_id,
                        row,
                    }));
                }
                outcomes.push(out);
            }
        }
        // Held no longer than the id checks: a sealed segment's log is
        // reused only once nothing else holds the segment (`retire_log`).
        drop(set);
        if written == 0 {
            return Ok(outcomes);
        }
        // Salted where the callers framed them, and written from there with
        // one gathering write: no copy of the group into a buffer of its own.
        for &(r, first, end) in &runs {
            for e in first..end {
                frame::xor_checksum(appends[r].0.frame_mut(e), self.active.salt);
            }
        }
        let slices: Vec<&[u8]> = runs
            .iter()
            .map(|&(r, first, end)| appends[r].0.frames(first, end))
            .collect();
        assert_eq!(
            slices.iter().map(|s| s.len()).sum::<usize>(),
            written,
            "the row table disagrees with the frames written"
        );
        let path = self.shared.log_path(active_id);
        // A failed write or sync poisons the store (the caller does it), so
        // staged rows that never reached the disk are never published.
        self.log
            .append_all(&slices)
            .map_err(|e| StorageError::io(&path, e))?;
        self.dirty = true;
        self.end += written as u64;
        self.rows += staged.len() as u32;
        if self.shared.config.fsync == FsyncMode::Always {
            // Callers index their rows while the sync runs; the rows stay
            // invisible until `publish` below and their callers' commit.
            for ((_, reply), positions) in appends.iter_mut().zip(&outcomes) {
                reply.send_staged(positions);
            }
            self.sync()?;
        }
        self.active.publish(self.rows);
        Ok(outcomes)
    }

    fn roll_if_rows(&mut self, reuse: bool) -> Result<(), StorageError> {
        self.shared.check_poisoned()?;
        if self.rows == 0 {
            return Ok(());
        }
        self.roll(reuse)
    }

    /// Closes the active segment and opens the next; the old one goes to
    /// the sealer. Order: new log file (durable), catalog commit, swap.
    /// With `reuse`, the new log overwrites the spare log if there is one.
    fn roll(&mut self, reuse: bool) -> Result<(), StorageError> {
        self.sync()?;
        let old = self.active.clone();
        let next_id = self.shared.take_id();
        let next_first_seq = old.first_seq + u64::from(self.rows);
        if !(reuse && reuse_spare(&self.shared, next_id)) {
            create_log(&self.shared.dir, next_id)?;
        }
        let (min_ts_us, max_ts_us) = {
            let rows = old.rows.read();
            (rows.min_ts, rows.max_ts)
        };
        let sealing_meta = SegmentMeta {
            state: SegmentState::Sealing,
            first_seq: old.first_seq,
            rows: self.rows,
            min_ts_us,
            max_ts_us,
            bytes: self.end,
        };
        let active_meta = SegmentMeta {
            state: SegmentState::Active,
            first_seq: next_first_seq,
            rows: 0,
            min_ts_us: 0,
            max_ts_us: 0,
            bytes: 0,
        };
        self.shared
            .catalog
            .apply(&[(old.id, Some(sealing_meta)), (next_id, Some(active_meta))])?;
        let path = self.shared.log_path(next_id);
        let next = Arc::new(OpenSegment::new(
            &path,
            next_id,
            next_first_seq,
            frame::salt_of(next_id),
            OpenRows::with_capacity(self.rows as usize, segment::HEADER_SIZE as u64),
        )?);
        self.log = self
            .fs
            .open_log(&path, segment::HEADER_SIZE as u64)
            .map_err(|e| StorageError::io(&path, e))?;
        {
            let mut set = self.shared.set.write();
            let mut new_set = SegmentSet::clone(&set);
            new_set.sealing.push(old.clone());
            new_set.active = next.clone();
            *set = Arc::new(new_set);
        }
        self.active = next;
        self.end = segment::HEADER_SIZE as u64;
        self.rows = 0;
        self.opened_at = Instant::now();
        if let Some(tx) = &self.seal_tx {
            // Blocks when the sealer is SEAL_BACKLOG_MAX segments behind:
            // back-pressure instead of unbounded open logs.
            let _ = tx.send(old);
        }
        Ok(())
    }

    fn wait_sealed(&self) -> Result<(), StorageError> {
        // The sealer empties `sealing` one segment at a time; the writer
        // waits here with a bounded poll so a stuck sealer shows as an error.
        let deadline = Instant::now() + Duration::from_secs(600);
        while !self.shared.set.read().sealing.is_empty() {
            self.shared.check_poisoned()?;
            if Instant::now() > deadline {
                return Err(StorageError::Poisoned("sealing did not finish".into()));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    fn shutdown(&mut self) -> Result<(), StorageError> {
        let result = self
            .shared
            .check_poisoned()
            .and_then(|()| self.sync_if_dirty())
            // The log left after a close is a fresh file: a reused one would
            // stay as large as a full segment on disk.
            .and_then(|()| self.roll_if_rows(false));
        // Dropping the sender lets the sealer finish its backlog and exit.
        self.seal_tx = None;
        result
    }
}

/// Seals one rolled segment: write and fsync the `.seg`, commit it in the
/// catalog, add its ids to the filter, swap it in, and unlink the `.log`.
pub(crate) fn seal_one(shared: &Arc<Shared>, open: &Arc<OpenSegment>) {
    if let Err(e) = try_seal(shared, open) {
        shared.poison(format!("sealing segment {}: {e}", open.id));
    }
}

fn try_seal(shared: &Arc<Shared>, open: &Arc<OpenSegment>) -> Result<(), StorageError> {
    let log_path = shared.log_path(open.id);
    let seg_path = shared.seg_path(open.id);
    let map = super::dir::map_readonly(&log_path).map_err(|e| StorageError::io(&log_path, e))?;
    let (offsets, end) = {
        let rows = open.rows.read();
        (rows.offsets.clone(), rows.end)
    };
    let bytes = map.get(..end as usize).ok_or_else(|| {
        StorageError::corrupted(open.id, end, "log shorter than its acknowledged rows")
    })?;
    let summary = segment::write_sealed(
        &seg_path,
        open.id,
        open.salt,
        bytes,
        &offsets,
        shared.config.compression,
        shared.config.block_size_bytes,
    )?;
    sync_dir(&shared.segments_dir()).map_err(|e| StorageError::io(&seg_path, e))?;
    let sealed = Arc::new(SealedSegment::open(&seg_path, open.id)?.with_first_seq(open.first_seq));
    assert_eq!(sealed.rows as usize, offsets.len(), "seal lost rows");
    if let Some(hook) = &shared.hook {
        hook.sealed(&sealed).map_err(|reason| StorageError::Hook {
            segment: open.id,
            reason,
        })?;
    }
    shared.catalog.apply(&[(
        open.id,
        Some(SegmentMeta {
            state: SegmentState::Sealed,
            first_seq: open.first_seq,
            rows: summary.rows,
            min_ts_us: summary.min_ts.as_micros(),
            max_ts_us: summary.max_ts.as_micros(),
            bytes: summary.bytes,
        }),
    )])?;
    {
        let mut filter = shared.filter.lock();
        if filter.len() + sealed.rows as usize > filter.len().max(1 << 14) * 2
            || filter.is_over_capacity()
        {
            let set = shared.set.read().clone();
            let total: usize =
                set.sealed.iter().map(|s| s.rows as usize).sum::<usize>() + sealed.rows as usize;
            let mut bigger = IdFilter::with_capacity(total * 2);
            for seg in set.sealed.iter().chain(std::iter::once(&sealed)) {
                for hash in seg.id_hashes() {
                    bigger.insert(hash);
                }
            }
            *filter = bigger;
        } else {
            for hash in sealed.id_hashes() {
                filter.insert(hash);
            }
        }
    }
    {
        let mut set = shared.set.write();
        let mut new_set = SegmentSet::clone(&set);
        new_set.sealing.retain(|s| s.id != open.id);
        new_set.sealed.push(sealed);
        new_set.sealed.sort_by_key(|s| s.first_seq);
        *set = Arc::new(new_set);
    }
    drop(map);
    retire_log(shared, open, &log_path)
}

/// Removes a sealed segment's log, or keeps it as the spare log that the
/// next roll overwrites in place instead of growing a new file: rewriting
/// blocks a file already has (and the page cache already holds) costs
/// the `write` and the `fdatasync` less than allocating them
/// (docs/PERFORMANCE.md, "Ingest"). Kept only when there is no spare yet
/// and nothing but the sealer holds the segment: a reader that still does
/// keeps reading the unlinked file instead. The segment has left the
/// segment set, so no new reader can find it.
fn retire_log(
    shared: &Shared,
    open: &Arc<OpenSegment>,
    log_path: &std::path::Path,
) -> Result<(), StorageError> {
    let mut spare = shared.spare.lock();
    // A log written before frames were salted (salt 0) is never reused.
    if !*spare && open.salt != 0 && Arc::strong_count(open) == 1 {
        let to = spare_log_path(&shared.dir);
        match std::fs::rename(log_path, &to) {
            Ok(()) => {
                *spare = true;
                return Ok(());
            }
            Err(e) => tracing::warn!(error = %e, "keeping a spare log"),
        }
    }
    std::fs::remove_file(log_path).map_err(|e| StorageError::io(log_path, e))
}

/// Turns the spare log, if there is one, into the log of segment `id`:
/// its header is rewritten and synced before it takes the log's name, so
/// a file under a log's name always names its own segment. Whatever the
/// spare held past the header stays there and is overwritten by appends;
/// its frames carry another segment's salt, so no scan reads them as this
/// log's. False when there is no spare or it could not be reused (it is
/// then removed and the caller creates a fresh log).
fn reuse_spare(shared: &Shared, id: u64) -> bool {
    let mut spare = shared.spare.lock();
    if !std::mem::replace(&mut *spare, false) {
        return false;
    }
    let from = spare_log_path(&shared.dir);
    let to = shared.log_path(id);
    let header = segment::encode_log_header(id);
    let reuse = || -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(&from)?;
        file.write_all_at(&header, 0)?;
        file.sync_data()?;
        std::fs::rename(&from, &to)?;
        sync_dir(&shared.segments_dir())
    };
    match reuse() {
        Ok(()) => {
            shared
                .logs_reused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, segment = id, "could not reuse the spare log");
            let _ = std::fs::remove_file(&from);
            let _ = std::fs::remove_file(&to);
            false
        }
    }
}

/// Removes the spare log (on close: a closed store keeps no spare).
pub(crate) fn discard_spare(shared: &Shared) {
    let mut spare = shared.spare.lock();
    if std::mem::replace(&mut *spare, false) {
        let path = spare_log_path(&shared.dir);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(error = %e, path = %path.display(), "removing the spare log");
        }
    }
}

pub(crate) fn run_sealer(shared: Arc<Shared>, rx: Receiver<Arc<OpenSegment>>) {
    super::nice_background_thread();
    for open in rx {
        if shared.check_poisoned().is_ok() {
            seal_one(&shared, &open);
        }
    }
}
