//! Backups: point-in-time snapshots kept under `<data_dir>/snapshots/<id>/`,
//! tar archives of them, restore into a new data directory, and `verify`.
//!
//! A snapshot directory is itself a complete data directory (plus a
//! `snapshot.json`): sealed segments are hard links of the store's, the
//! open segments' acknowledged rows are sealed into new files, and its
//! catalog names exactly those. It is built under `snapshots/.tmp-<id>` and
//! renamed into place, so a crash never leaves a half snapshot listed.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::db::{Db, DbError};
use crate::event::Timestamp;
use crate::storage::StorageError;
use crate::storage::snapshot::link_or_copy;

pub const SNAPSHOTS_DIR: &str = "snapshots";
const INFO_FILE: &str = "snapshot.json";
const TMP_PREFIX: &str = ".tmp-";

/// One snapshot, as `evdb snapshot list` and `GET /admin/snapshots` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub id: String,
    pub path: PathBuf,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// Events in the snapshot (deleted ones excluded).
    pub events: u64,
    /// Bytes of its files (hard-linked segments count in full).
    pub bytes: u64,
}

/// Errors of backups; each names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("no snapshot {0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |error| SnapshotError::Io {
        path: path.to_owned(),
        error,
    }
}

/// Bytes of the regular files under `dir`.
pub fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_file() => total += m.len(),
                Ok(m) if m.is_dir() => stack.push(e.path()),
                _ => {}
            }
        }
    }
    total
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Db {
    fn snapshots_dir(&self) -> PathBuf {
        self.log().dir().join(SNAPSHOTS_DIR)
    }

    /// Makes a consistent point-in-time snapshot (see the module comment).
    pub fn snapshot(&self) -> Result<SnapshotInfo, SnapshotError> {
        let root = self.snapshots_dir();
        fs::create_dir_all(&root).map_err(io(&root))?;
        let id = crate::event::new_event_id();
        let tmp = root.join(format!("{TMP_PREFIX}{id}"));
        let result = self.snapshot_at(&tmp, &id);
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        let mut info = result?;
        let path = root.join(&id);
        fs::rename(&tmp, &path).map_err(io(&path))?;
        crate::storage::dir::sync_dir(&root).map_err(io(&root))?;
        info.path = path;
        Ok(info)
    }

    fn snapshot_at(&self, tmp: &Path, id: &str) -> Result<SnapshotInfo, SnapshotError> {
        // Compaction and retention unlink segment files: not while they
        // are being linked here.
        let _one_job = self.maintenance_lock().lock();
        let created_at = Timestamp::now().to_rfc3339();
        let tombstones = self.log().tombstones().map_err(DbError::from)?;
        let summary = self
            .log()
            .snapshot_into(tmp, &tombstones)
            .map_err(DbError::from)?;
        // Index files are derived data: link those of segments sealed in
        // the store; the others are rebuilt when the snapshot is opened.
        let index_dir = tmp.join("index");
        fs::create_dir_all(&index_dir).map_err(io(&index_dir))?;
        let ours = self.log().dir().join("index");
        for &segment in &summary.segments {
            for path in [crate::db_index::index_path, crate::db_index::numeric_path] {
                let from = path(&ours, segment);
                if from.exists() {
                    let to = path(&index_dir, segment);
                    link_or_copy(&from, &to).map_err(io(&to))?;
                }
            }
        }
        let mut info = SnapshotInfo {
            id: id.to_owned(),
            path: tmp.to_owned(),
            created_at,
            events: summary.events,
            bytes: 0,
        };
        info.bytes = tree_bytes(tmp);
        let text = serde_json::to_string_pretty(&info)
            .map_err(|e| SnapshotError::Invalid(e.to_string()))?;
        let file = tmp.join(INFO_FILE);
        fs::write(&file, text).map_err(io(&file))?;
        crate::storage::dir::sync_dir(tmp).map_err(io(tmp))?;
        Ok(info)
    }

    /// Every snapshot, oldest first. Leftovers of interrupted snapshots are
    /// removed.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>, SnapshotError> {
        let root = self.snapshots_dir();
        let Ok(entries) = fs::read_dir(&root) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(TMP_PREFIX) {
                let _ = fs::remove_dir_all(e.path());
                continue;
            }
            let file = e.path().join(INFO_FILE);
            let Ok(text) = fs::read_to_string(&file) else {
                continue;
            };
            if let Ok(mut info) = serde_json::from_str::<SnapshotInfo>(&text) {
                info.path = e.path();
                out.push(info);
            }
        }
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// The snapshot with this id.
    pub fn snapshot_info(&self, id: &str) -> Result<SnapshotInfo, SnapshotError> {
        if !valid_id(id) {
            return Err(SnapshotError::NotFound(id.to_owned()));
        }
        self.snapshots()?
            .into_iter()
            .find(|s| s.id == id)
            .ok_or_else(|| SnapshotError::NotFound(id.to_owned()))
    }

    /// Deletes a snapshot; false when there is none with this id.
    pub fn delete_snapshot(&self, id: &str) -> Result<bool, SnapshotError> {
        match self.snapshot_info(id) {
            Ok(info) => {
                fs::remove_dir_all(&info.path).map_err(io(&info.path))?;
                Ok(true)
            }
            Err(SnapshotError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Writes `dir` as a tar archive (entries under `snapshot/`) to `out`.
pub fn write_archive(dir: &Path, out: impl Write) -> std::io::Result<()> {
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    // Plain entries only: every tar tool reads them (the catalog is
    // mostly zeros, which GNU sparse entries would save, at that cost).
    tar.sparse(false);
    tar.append_dir_all("snapshot", dir)?;
    tar.into_inner()?.flush()
}

/// Builds the data directory `to` (absent or empty) from a snapshot
/// directory or a tar archive of one. Returns the number of files written.
pub fn restore(from: &Path, to: &Path) -> Result<u64, SnapshotError> {
    if let Ok(mut entries) = fs::read_dir(to)
        && entries.next().is_some()
    {
        return Err(SnapshotError::Invalid(format!(
            "{} is not empty: restore only into a new or empty directory",
            to.display()
        )));
    }
    fs::create_dir_all(to).map_err(io(to))?;
    let meta = fs::metadata(from).map_err(io(from))?;
    let mut files = 0;
    if meta.is_dir() {
        if !from.join(crate::storage::CATALOG_FILE).exists() {
            return Err(SnapshotError::Invalid(format!(
                "{} holds no catalog.redb: not a snapshot",
                from.display()
            )));
        }
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let src = from.join(&rel);
            for e in fs::read_dir(&src).map_err(io(&src))?.flatten() {
                let name = e.file_name();
                if name == "LOCK" || name == SNAPSHOTS_DIR {
                    continue;
                }
                let rel_child = rel.join(&name);
                let dst = to.join(&rel_child);
                let kind = e.file_type().map_err(io(&e.path()))?;
                if kind.is_dir() {
                    fs::create_dir_all(&dst).map_err(io(&dst))?;
                    stack.push(rel_child);
                } else if kind.is_file() {
                    fs::copy(e.path(), &dst).map_err(io(&dst))?;
                    fs::File::open(&dst)
                        .and_then(|f| f.sync_all())
                        .map_err(io(&dst))?;
                    files += 1;
                }
            }
        }
    } else {
        let file = fs::File::open(from).map_err(io(from))?;
        let mut archive = tar::Archive::new(file);
        for entry in archive.entries().map_err(io(from))? {
            let mut entry = entry.map_err(io(from))?;
            let path = entry.path().map_err(io(from))?.into_owned();
            let rel: PathBuf = path.components().skip(1).collect();
            if rel.as_os_str().is_empty() {
                continue;
            }
            // Only plain relative paths: nothing may escape `to`.
            if rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(SnapshotError::Invalid(format!(
                    "{}: archive entry {} is not a plain relative path",
                    from.display(),
                    path.display()
                )));
            }
            let dst = to.join(&rel);
            if entry.header().entry_type().is_dir() {
                fs::create_dir_all(&dst).map_err(io(&dst))?;
                continue;
            }
            let kind = entry.header().entry_type();
            if !kind.is_file() && !kind.is_gnu_sparse() {
                continue;
            }
            if let Some(parent) = dst.parent() {
                fs::create_dir_all(parent).map_err(io(parent))?;
            }
            entry.unpack(&dst).map_err(io(&dst))?;
            fs::File::open(&dst)
                .and_then(|f| f.sync_all())
                .map_err(io(&dst))?;
            files += 1;
        }
        if !to.join(crate::storage::CATALOG_FILE).exists() {
            return Err(SnapshotError::Invalid(format!(
                "{}: the archive holds no catalog.redb: not a snapshot",
                from.display()
            )));
        }
    }
    let _ = fs::remove_file(to.join(INFO_FILE));
    crate::storage::dir::sync_dir(to).map_err(io(to))?;
    Ok(files)
}

/// One damage `verify` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub file: PathBuf,
    pub offset: u64,
    pub reason: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: offset {}: {}",
            self.file.display(),
            self.offset,
            self.reason
        )
    }
}

/// The damage a store that does not open at all shows.
pub fn damage_of_open_error(dir: &Path, e: &DbError) -> Damage {
    match e {
        DbError::Storage(s) => damage_of(dir, s),
        other => Damage {
            file: dir.to_owned(),
            offset: 0,
            reason: other.to_string(),
        },
    }
}

fn damage_of(dir: &Path, e: &StorageError) -> Damage {
    match e {
        StorageError::Corrupted {
            segment,
            offset,
            reason,
        } => Damage {
            file: dir.join("segments").join(format!("{segment:020}.seg")),
            offset: *offset,
            reason: reason.clone(),
        },
        StorageError::Io { path, source } => Damage {
            file: path.clone(),
            offset: 0,
            reason: source.to_string(),
        },
        other => Damage {
            file: dir.join(crate::storage::CATALOG_FILE),
            offset: 0,
            reason: other.to_string(),
        },
    }
}

/// Checks every checksum of an open store: each sealed segment's blocks,
/// records, id table and text filter, each index file, each open segment's frames; the
/// catalog's row counts were checked when it was opened. Returns the
/// damages found (empty: the store is sound). `progress` is told each
/// segment as it is checked.
pub fn verify(db: &Db, mut progress: impl FnMut(u64, usize, usize)) -> Vec<Damage> {
    let dir = db.log().dir().to_owned();
    let set = db.log().segments();
    let mut out = Vec::new();
    let total = set.iter().count();
    for (i, seg) in set.iter().enumerate() {
        progress(seg.id(), i, total);
        match seg {
            crate::storage::SegmentRef::Sealed(s) => {
                if let Err(e) = s.rows_with_hash(crate::storage::ids::IdHash(0)) {
                    out.push(damage_of(&dir, &e));
                }
                if let Err(e) = s.check_text_filter() {
                    out.push(damage_of(&dir, &e));
                }
                let checked = s.for_each_payload(|row, payload| {
                    crate::storage::record::decode(payload)
                        .map(|_| ())
                        .map_err(|e| StorageError::corrupted(s.id, 0, format!("row {row}: {e}")))
                });
                if let Err(e) = checked {
                    out.push(damage_of(&dir, &e));
                }
                let idx = crate::db_index::index_path(&dir.join("index"), s.id);
                if let Some(d) = verify_index(&idx, s.id, s.rows) {
                    out.push(d);
                }
                let num = crate::db_index::numeric_path(&dir.join("index"), s.id);
                if let Some(d) = verify_numeric(&num, s.id, s.rows) {
                    out.push(d);
                }
            }
            crate::storage::SegmentRef::Open(o) => {
                for row in 0..o.visible_rows() {
                    if let Err(e) = o.read_payload(row) {
                        out.push(damage_of(&dir, &e));
                        break;
                    }
                }
            }
        }
    }
    out
}

/// A numeric column file: every checksum (checked whole when opened) and
/// its row count. Missing is not damage (derived data).
fn verify_numeric(path: &Path, segment: u64, rows: u32) -> Option<Damage> {
    use crate::index::{IndexError, NumericFile};
    if !path.exists() {
        return None;
    }
    match NumericFile::open(path, segment) {
        Ok(f) if f.rows() == rows => None,
        Ok(f) => Some(Damage {
            file: path.to_owned(),
            offset: 0,
            reason: format!(
                "numeric columns cover {} rows, the segment {rows}",
                f.rows()
            ),
        }),
        Err(IndexError::Corrupted { offset, reason, .. }) => Some(Damage {
            file: path.to_owned(),
            offset,
            reason,
        }),
        Err(IndexError::Io { source, .. }) => Some(Damage {
            file: path.to_owned(),
            offset: 0,
            reason: source.to_string(),
        }),
    }
}

fn verify_index(path: &Path, segment: u64, rows: u32) -> Option<Damage> {
    use crate::index::{Dim, IndexError, IndexView, SealedIndex};
    let damage = |e: IndexError| {
        let (offset, reason) = match e {
            IndexError::Corrupted { offset, reason, .. } => (offset, reason),
            IndexError::Io { source, .. } => (0, source.to_string()),
        };
        Damage {
            file: path.to_owned(),
            offset,
            reason,
        }
    };
    if !path.exists() {
        // Derived data: a missing index file is rebuilt, not damage.
        return None;
    }
    let idx = match SealedIndex::open(path, segment) {
        Ok(i) => i,
        Err(e) => return Some(damage(e)),
    };
    if idx.rows() != rows {
        return Some(Damage {
            file: path.to_owned(),
            offset: 0,
            reason: format!("index covers {} rows, the segment {rows}", idx.rows()),
        });
    }
    for dim in Dim::ALL {
        if let Err(e) = idx.terms(dim) {
            return Some(damage(e));
        }
    }
    if let Err(e) = idx.zones() {
        return Some(damage(e));
    }
    None
}
