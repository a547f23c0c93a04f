//! The catalog: a redb database beside the segments.
//!
//! It names the segments that exist and their state (the manifest). The log
//! is the source of truth for events; the catalog is the source of truth for
//! which files are part of the store. Ordering protocol and recovery are in
//! `docs/format.md` ("Catalog").

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};

use super::StorageError;

/// segment id → postcard `SegmentMeta`, behind a version byte.
const SEGMENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("segments");
/// Small named values: `format_version`.
/// Deleted rows per segment: version byte + a portable roaring bitmap.
const TOMBSTONES: TableDefinition<u64, &[u8]> = TableDefinition::new("tombstones");
const TOMBSTONE_VERSION: u8 = 1;
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Per segment with tombstones: when (µs since the epoch, wall clock) its
/// oldest deletion not yet removed by compaction was made. Compaction
/// rewrites a segment once this is older than its bound.
const DELETED_SINCE: TableDefinition<u64, i64> = TableDefinition::new("deleted_since");

/// Version byte in front of every postcard value.
const META_VERSION: u8 = 1;
/// Version of the catalog's tables; bumped with any change to them.
pub const CATALOG_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SegmentState {
    /// Takes appends; its `.log` file is the data.
    Active,
    /// Rolled: no more appends; its `.log` awaits sealing.
    Sealing,
    /// Its `.seg` file is the data; immutable.
    Sealed,
}

/// The manifest entry of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentMeta {
    pub state: SegmentState,
    /// Global arrival number of the segment's first row.
    pub first_seq: u64,
    /// Rows, for a sealed segment (0 while active or sealing: the log says).
    pub rows: u32,
    pub min_ts_us: i64,
    pub max_ts_us: i64,
    /// Bytes of the segment's data file once sealed.
    pub bytes: u64,
}

fn catalog_err(e: impl std::fmt::Display) -> StorageError {
    StorageError::Catalog(e.to_string())
}

fn encode_meta(meta: &SegmentMeta) -> Result<Vec<u8>, StorageError> {
    let mut out = vec![META_VERSION];
    out.extend(postcard::to_stdvec(meta).map_err(catalog_err)?);
    Ok(out)
}

fn decode_meta(bytes: &[u8]) -> Result<SegmentMeta, StorageError> {
    match bytes.split_first() {
        Some((&META_VERSION, rest)) => postcard::from_bytes(rest).map_err(catalog_err),
        Some((v, _)) => Err(StorageError::Catalog(format!(
            "segment entry has unknown version {v}"
        ))),
        None => Err(StorageError::Catalog("empty segment entry".into())),
    }
}

pub struct Catalog {
    db: Database,
}

impl Catalog {
    pub fn open(path: &Path) -> Result<Catalog, StorageError> {
        if !path.exists() {
            Catalog::create_new(path)?;
        }
        let db = Database::create(path).map_err(catalog_err)?;
        let catalog = Catalog { db };
        catalog.init()?;
        Ok(catalog)
    }

    /// Creates a new, initialised catalog under a temporary name and
    /// renames it into place: a kill while redb lays out a new file left a
    /// catalog that no longer opened ("invalid data"); now there is either
    /// no catalog (and the next open creates one) or a complete one.
    fn create_new(path: &Path) -> Result<(), StorageError> {
        let tmp = path.with_extension("redb.tmp");
        let io = |p: &Path, e| StorageError::io(p, e);
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&tmp, e)),
        }
        {
            let db = Database::create(&tmp).map_err(catalog_err)?;
            Catalog { db }.init()?;
        }
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io(path, e))?;
        if let Some(dir) = path.parent() {
            super::dir::sync_dir(dir).map_err(|e| io(dir, e))?;
        }
        Ok(())
    }

    /// Checks the format version (writing it into a new catalog) and
    /// creates the tables.
    fn init(&self) -> Result<(), StorageError> {
        let txn = self.db.begin_write().map_err(catalog_err)?;
        {
            let mut meta = txn.open_table(META).map_err(catalog_err)?;
            let version = meta
                .get("format_version")
                .map_err(catalog_err)?
                .map(|v| v.value().to_vec());
            match version {
                None => {
                    meta.insert("format_version", &CATALOG_VERSION.to_le_bytes()[..])
                        .map_err(catalog_err)?;
                }
                Some(v) if v == CATALOG_VERSION.to_le_bytes() => {}
                Some(v) => {
                    return Err(StorageError::Catalog(format!(
                        "catalog format version {v:?} is not supported (expected {CATALOG_VERSION})"
                    )));
                }
            }
            txn.open_table(SEGMENTS).map_err(catalog_err)?;
            txn.open_table(TOMBSTONES).map_err(catalog_err)?;
            txn.open_table(DELETED_SINCE).map_err(catalog_err)?;
        }
        txn.commit().map_err(catalog_err)?;
        Ok(())
    }

    /// Every segment, by id.
    pub fn segments(&self) -> Result<Vec<(u64, SegmentMeta)>, StorageError> {
        let txn = self.db.begin_read().map_err(catalog_err)?;
        let table = txn.open_table(SEGMENTS).map_err(catalog_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(catalog_err)? {
            let (k, v) = entry.map_err(catalog_err)?;
            out.push((k.value(), decode_meta(v.value())?));
        }
        Ok(out)
    }

    /// Applies `changes` (upserts, and removals as `None`) in one durable
    /// transaction.
    pub fn apply(&self, changes: &[(u64, Option<SegmentMeta>)]) -> Result<(), StorageError> {
        let txn = self.db.begin_write().map_err(catalog_err)?;
        {
            let mut table = txn.open_table(SEGMENTS).map_err(catalog_err)?;
            for (id, meta) in changes {
                match meta {
                    Some(meta) => {
                        table
                            .insert(*id, &encode_meta(meta)?[..])
                            .map_err(catalog_err)?;
                    }
                    None => {
                        table.remove(*id).map_err(catalog_err)?;
                    }
                }
            }
            // A removed segment takes its tombstones with it.
            let mut tombstones = txn.open_table(TOMBSTONES).map_err(catalog_err)?;
            let mut since = txn.open_table(DELETED_SINCE).map_err(catalog_err)?;
            for (id, meta) in changes {
                if meta.is_none() {
                    tombstones.remove(*id).map_err(catalog_err)?;
                    since.remove(*id).map_err(catalog_err)?;
                }
            }
        }
        txn.commit().map_err(catalog_err)
    }
}

fn decode_tombstones(segment: u64, bytes: &[u8]) -> Result<RoaringBitmap, StorageError> {
    match bytes.split_first() {
        Some((&TOMBSTONE_VERSION, rest)) => RoaringBitmap::deserialize_from(rest)
            .map_err(|e| StorageError::Catalog(format!("tombstones of segment {segment}: {e}"))),
        _ => Err(StorageError::Catalog(format!(
            "tombstones of segment {segment} have an unknown version"
        ))),
    }
}

fn encode_tombstones(rows: &RoaringBitmap) -> Result<Vec<u8>, StorageError> {
    let mut bytes = Vec::with_capacity(1 + rows.serialized_size());
    bytes.push(TOMBSTONE_VERSION);
    rows.serialize_into(&mut bytes)
        .map_err(|e| StorageError::Catalog(e.to_string()))?;
    Ok(bytes)
}

impl Catalog {
    /// The deleted rows of every segment that has any.
    pub fn tombstones(&self) -> Result<Vec<(u64, RoaringBitmap)>, StorageError> {
        let txn = self.db.begin_read().map_err(catalog_err)?;
        let table = txn.open_table(TOMBSTONES).map_err(catalog_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(catalog_err)? {
            let (k, v) = entry.map_err(catalog_err)?;
            out.push((k.value(), decode_tombstones(k.value(), v.value())?));
        }
        Ok(out)
    }

    /// When each segment with pending deletions got its oldest one (µs).
    pub fn deleted_since(&self) -> Result<Vec<(u64, i64)>, StorageError> {
        let txn = self.db.begin_read().map_err(catalog_err)?;
        let table = txn.open_table(DELETED_SINCE).map_err(catalog_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(catalog_err)? {
            let (k, v) = entry.map_err(catalog_err)?;
            out.push((k.value(), v.value()));
        }
        Ok(out)
    }

    /// Replaces the segments `removed` by the compacted segment `id` in one
    /// durable transaction: their entries, tombstones and deletion times
    /// go; `id` comes with `meta`, and with `deleted` (rows deleted while
    /// it was written, renumbered) as its tombstones since `since_us`.
    pub fn swap_compacted(
        &self,
        removed: &[u64],
        id: u64,
        meta: &SegmentMeta,
        deleted: &RoaringBitmap,
        since_us: i64,
    ) -> Result<(), StorageError> {
        let txn = self.db.begin_write().map_err(catalog_err)?;
        {
            let mut segments = txn.open_table(SEGMENTS).map_err(catalog_err)?;
            let mut tombstones = txn.open_table(TOMBSTONES).map_err(catalog_err)?;
            let mut since = txn.open_table(DELETED_SINCE).map_err(catalog_err)?;
            for old in removed {
                if segments.remove(*old).map_err(catalog_err)?.is_none() {
                    return Err(StorageError::Catalog(format!(
                        "compaction input {old} is not in the catalog"
                    )));
                }
                tombstones.remove(*old).map_err(catalog_err)?;
                since.remove(*old).map_err(catalog_err)?;
            }
            segments
                .insert(id, &encode_meta(meta)?[..])
                .map_err(catalog_err)?;
            if !deleted.is_empty() {
                tombstones
                    .insert(id, &encode_tombstones(deleted)?[..])
                    .map_err(catalog_err)?;
                since.insert(id, since_us).map_err(catalog_err)?;
            }
        }
        txn.commit().map_err(catalog_err)
    }

    /// Adds deleted rows, in one durable transaction, noting `now_us` as
    /// the deletion time of segments that had none pending; returns each
    /// touched segment's full set afterwards.
    pub fn add_tombstones(
        &self,
        rows: &[(u64, RoaringBitmap)],
        now_us: i64,
    ) -> Result<Vec<(u64, RoaringBitmap)>, StorageError> {
        let txn = self.db.begin_write().map_err(catalog_err)?;
        let mut out = Vec::with_capacity(rows.len());
        {
            let mut since = txn.open_table(DELETED_SINCE).map_err(catalog_err)?;
            for (segment, add) in rows {
                if !add.is_empty() && since.get(*segment).map_err(catalog_err)?.is_none() {
                    since.insert(*segment, now_us).map_err(catalog_err)?;
                }
            }
            drop(since);
            let mut table = txn.open_table(TOMBSTONES).map_err(catalog_err)?;
            for (segment, add) in rows {
                let mut all = match table.get(*segment).map_err(catalog_err)? {
                    Some(v) => decode_tombstones(*segment, v.value())?,
                    None => RoaringBitmap::new(),
                };
                all |= add;
                table
                    .insert(*segment, &encode_tombstones(&all)?[..])
                    .map_err(catalog_err)?;
                out.push((*segment, all));
            }
        }
        txn.commit().map_err(catalog_err)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_catalog_whose_creation_was_cut_short_is_created_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.redb");
        // What a kill during creation leaves now: a partial file under the
        // temporary name, and no catalog.
        std::fs::write(
            path.with_extension("redb.tmp"),
            b"redb\x1a\x0a\xa9\x0d\x0a partial",
        )
        .unwrap();
        let catalog = Catalog::open(&path).unwrap();
        assert!(catalog.segments().unwrap().is_empty());
        assert!(!path.with_extension("redb.tmp").exists());
        drop(catalog);
        // The catalog is complete: it opens again.
        assert!(Catalog::open(&path).unwrap().segments().unwrap().is_empty());
    }

    #[test]
    fn manifest_round_trips_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.redb");
        let meta = SegmentMeta {
            state: SegmentState::Sealed,
            first_seq: 10,
            rows: 5,
            min_ts_us: -3,
            max_ts_us: 9,
            bytes: 1234,
        };
        {
            let c = Catalog::open(&path).unwrap();
            c.apply(&[(1, Some(meta)), (2, Some(meta))]).unwrap();
            c.apply(&[(2, None)]).unwrap();
        }
        let c = Catalog::open(&path).unwrap();
        assert_eq!(c.segments().unwrap(), vec![(1, meta)]);
        assert!(decode_meta(&[9, 0]).is_err());
        assert!(decode_meta(&[]).is_err());
    }
}
