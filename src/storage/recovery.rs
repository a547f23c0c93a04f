//! Opening a data directory: lock it, read the catalog, check the sealed
//! segments' footers, scan only the open segments' logs, truncate a torn
//! tail, and remove files that a crash left half made. Sealed segments are
//! never rescanned. The procedure is documented in `docs/format.md`.

use std::fs::{self, File, OpenOptions};
use std::path::Path;
use std::sync::Arc;

use super::active::{OpenRows, OpenSegment};
use super::catalog::{Catalog, SegmentMeta, SegmentState};
use super::dir::sync_dir;
use super::ids::{hash_id, peek_id_and_timestamp};
use super::segment::{self, SealedSegment};
use super::{SegmentSet, StorageError, segment_path};

pub(crate) struct Recovered {
    pub lock: File,
    pub catalog: Catalog,
    pub set: SegmentSet,
    /// Segments that were rolled but not sealed before the last stop.
    pub to_seal: Vec<Arc<OpenSegment>>,
    /// The active log's length, where the writer continues.
    pub log: ActiveLog,
    /// The next unused segment id.
    pub next_id: u64,
}

pub(crate) struct ActiveLog {
    pub end: u64,
}

fn lock_dir(dir: &Path) -> Result<File, StorageError> {
    fs::create_dir_all(dir.join("segments")).map_err(|e| StorageError::io(dir, e))?;
    let path = dir.join("LOCK");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StorageError::io(&path, e))?;
    // A process that forks (to run a command) while we close and reopen
    // the store lends its child a copy of our lock until the child execs:
    // give such a copy a moment to go before calling the directory taken.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StorageError::Locked(dir.to_owned()));
            }
            Err(fs::TryLockError::Error(e)) => return Err(StorageError::io(&path, e)),
        }
    }
}

/// How long opening waits for a lock held by someone else.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Where a sealed segment's log waits to be reused by the next roll.
pub(crate) fn spare_log_path(dir: &Path) -> std::path::PathBuf {
    dir.join("segments").join("spare.log")
}

/// Creates an empty log file with its header, durably.
pub(crate) fn create_log(dir: &Path, id: u64) -> Result<(), StorageError> {
    let path = segment_path(dir, id, "log");
    let header = segment::encode_log_header(id);
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&path)?;
        std::io::Write::write_all(&mut f, &header)?;
        f.sync_all()?;
        sync_dir(&dir.join("segments"))
    };
    write().map_err(|e| StorageError::io(&path, e))
}

/// Scans a log, truncates a torn tail, and builds its in-memory rows.
fn open_log(dir: &Path, id: u64, first_seq: u64) -> Result<OpenSegment, StorageError> {
    let path = segment_path(dir, id, "log");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| StorageError::io(&path, e))?;
    let len = file
        .metadata()
        .map_err(|e| StorageError::io(&path, e))?
        .len();
    if len < segment::HEADER_SIZE as u64 {
        // A crash between creating the file and syncing its header: the log
        // never held a row. Write the header again.
        drop(file);
        create_log(dir, id)?;
        return OpenSegment::new(
            &path,
            id,
            first_seq,
            super::frame::salt_of(id),
            OpenRows {
                end: segment::HEADER_SIZE as u64,
                ..OpenRows::default()
            },
        );
    }
    // The writer thread has not started yet: nothing writes the log now.
    let map = super::dir::map_readonly(&path).map_err(|e| StorageError::io(&path, e))?;
    let scan = segment::scan_log(&map, id).map_err(|r| StorageError::corrupted(id, 0, r))?;
    let mut rows = OpenRows {
        end: segment::HEADER_SIZE as u64,
        ..OpenRows::default()
    };
    for (offset, len, payload) in scan.frames(&map) {
        let corrupted =
            |e: &dyn std::fmt::Display| StorageError::corrupted(id, offset, e.to_string());
        let payload = payload.map_err(|e| corrupted(&e))?;
        let (event_id, ts) = peek_id_and_timestamp(payload).map_err(|e| corrupted(&e))?;
        rows.push(offset, len, hash_id(event_id), ts);
    }
    drop(map);
    if scan.valid_len < len {
        let dropped = len - scan.valid_len;
        match scan.stale_from {
            // A reused log file: what lies past this log's last frame
            // was written for an earlier segment, not torn.
            Some(earlier) => tracing::info!(
                segment = id,
                offset = scan.valid_len,
                dropped_bytes = dropped,
                earlier_segment = earlier,
                "truncating a reused log file after its last frame"
            ),
            None => tracing::warn!(
                segment = id,
                offset = scan.valid_len,
                dropped_bytes = dropped,
                reason = ?scan.stop,
                "truncating the torn tail of the active log"
            ),
        }
        file.set_len(scan.valid_len)
            .and_then(|()| file.sync_all())
            .map_err(|e| StorageError::io(&path, e))?;
    }
    OpenSegment::new(&path, id, first_seq, scan.salt, rows)
}

fn remove_quietly(path: &Path) -> Result<(), StorageError> {
    match fs::remove_file(path) {
        Ok(()) => {
            tracing::info!(path = %path.display(), "removed a file left by an interrupted operation");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StorageError::io(path, e)),
    }
}

pub(crate) fn recover(dir: &Path) -> Result<Recovered, StorageError> {
    let lock = lock_dir(dir)?;
    let catalog = Catalog::open(&dir.join(super::CATALOG_FILE))?;
    let mut entries = catalog.segments()?;
    if entries.is_empty() {
        create_log(dir, 1)?;
        let meta = SegmentMeta {
            state: SegmentState::Active,
            first_seq: 0,
            rows: 0,
            min_ts_us: 0,
            max_ts_us: 0,
            bytes: 0,
        };
        catalog.apply(&[(1, Some(meta))])?;
        entries = vec![(1, meta)];
    }
    // Exactly one segment is active. It is usually the newest, but a
    // compacted segment takes a fresh id and may be newer.
    let mut actives = entries
        .iter()
        .filter(|(_, meta)| meta.state == SegmentState::Active);
    let (active_id, active_meta) = match (actives.next(), actives.next()) {
        (Some(&(id, meta)), None) => (id, meta),
        _ => {
            return Err(StorageError::Catalog(
                "the catalog does not name exactly one active segment".into(),
            ));
        }
    };
    let next_id = entries.last().map_or(1, |(id, _)| id + 1);
    // Files on disk that the catalog does not account for were left by an
    // interrupted roll, seal or compaction: the catalog commit is the point
    // of no return, so anything it does not name is garbage.
    let segments_dir = dir.join("segments");
    // A spare log (a sealed segment's log kept for the next roll to
    // overwrite) is only reused within the process that kept it.
    remove_quietly(&spare_log_path(dir))?;
    let listing = fs::read_dir(&segments_dir).map_err(|e| StorageError::io(&segments_dir, e))?;
    for entry in listing {
        let entry = entry.map_err(|e| StorageError::io(&segments_dir, e))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let (stem, ext) = name.split_once('.').unwrap_or((&name, ""));
        let Ok(id) = stem.parse::<u64>() else {
            continue;
        };
        let state = entries
            .binary_search_by_key(&id, |(i, _)| *i)
            .ok()
            .map(|i| entries[i].1.state);
        let keep = matches!(
            (ext, state),
            ("log", Some(SegmentState::Active | SegmentState::Sealing))
                | ("seg", Some(SegmentState::Sealed))
        );
        if !keep {
            remove_quietly(&path)?;
        }
    }
    sync_dir(&segments_dir).map_err(|e| StorageError::io(&segments_dir, e))?;

    let mut sealed = Vec::new();
    let mut sealing = Vec::new();
    for &(id, meta) in &entries {
        match meta.state {
            SegmentState::Sealed => {
                let seg = SealedSegment::open(&segment_path(dir, id, "seg"), id)?
                    .with_first_seq(meta.first_seq);
                if seg.rows != meta.rows {
                    return Err(StorageError::corrupted(
                        id,
                        0,
                        format!(
                            "segment holds {} rows, the catalog says {}",
                            seg.rows, meta.rows
                        ),
                    ));
                }
                sealed.push(Arc::new(seg));
                // Readers rely on sealed segments being in arrival order.
            }
            SegmentState::Sealing => {
                sealing.push(Arc::new(open_log(dir, id, meta.first_seq)?));
            }
            SegmentState::Active => {}
        }
    }
    sealed.sort_by_key(|s| s.first_seq);
    let active = Arc::new(open_log(dir, active_id, active_meta.first_seq)?);
    let end = active.file_bytes();
    Ok(Recovered {
        lock,
        catalog,
        set: SegmentSet {
            sealed,
            sealing: sealing.clone(),
            active,
        },
        to_seal: sealing,
        log: ActiveLog { end },
        next_id,
    })
}
