//! The file seam under the active log: real files, and a fault-injecting
//! variant that simulates a power loss at a chosen sync point.
//!
//! Only the write side of the active segment goes through the seam: it is
//! the one place where a torn write can happen. Sealed segments are written
//! whole, fsynced and renamed before the catalog names them.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The active log's write handle.
pub trait LogFile: Send {
    /// Appends `buf` at the end of the file.
    fn append(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Makes every appended byte durable (fdatasync).
    fn sync(&mut self) -> io::Result<()>;
}

/// Creates and opens log files; one per data directory.
pub trait FileSystem: Send + Sync {
    /// Opens `path` for appending; creates it if missing.
    fn open_log(&self, path: &Path) -> io::Result<Box<dyn LogFile>>;

    /// Bytes an unprivileged process may still write on the file system
    /// that holds `dir`.
    fn available_bytes(&self, dir: &Path) -> io::Result<u64> {
        available_bytes(dir)
    }
}

/// Free bytes for unprivileged writers on `dir`'s file system (statvfs).
pub fn available_bytes(dir: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(dir).map_err(io::Error::from)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Plain files.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

struct RealLog(File);

impl LogFile for RealLog {
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
}

impl FileSystem for RealFs {
    fn open_log(&self, path: &Path) -> io::Result<Box<dyn LogFile>> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Box::new(RealLog(file)))
    }
}

/// Fsyncs a directory so that a create, rename or unlink in it is durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// What the faulty file system does when its plan fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// At sync number `at_sync` (counted from 1 across all log files), keep
    /// only `keep_per_mille`/1000 of the bytes appended since the previous
    /// sync, then fail that sync and every later call: the machine lost power.
    TearAtSync { at_sync: u64, keep_per_mille: u32 },
    /// Every append fails with "no space left on device" once `after_bytes`
    /// bytes have been appended in total (the disk filled up).
    DiskFullAfter { after_bytes: u64 },
    /// Nothing fails (the free space it reports can still be set).
    None,
}

/// Real files with one planned fault. Cloning shares the plan and counters.
#[derive(Clone)]
pub struct FaultyFs {
    fault: Fault,
    syncs: Arc<AtomicU64>,
    appended: Arc<AtomicU64>,
    dead: Arc<std::sync::atomic::AtomicBool>,
    /// What `available_bytes` answers (`u64::MAX`: the real figure).
    available: Arc<AtomicU64>,
}

impl FaultyFs {
    pub fn new(fault: Fault) -> FaultyFs {
        FaultyFs {
            fault,
            syncs: Arc::new(AtomicU64::new(0)),
            appended: Arc::new(AtomicU64::new(0)),
            dead: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            available: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }

    /// Makes the file system report `bytes` free (`u64::MAX`: the truth).
    pub fn set_available(&self, bytes: u64) {
        self.available.store(bytes, Ordering::SeqCst);
    }

    /// Whether the planned power loss has happened.
    pub fn fired(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }
}

struct FaultyLog {
    file: File,
    fs: FaultyFs,
    synced_len: u64,
    len: u64,
}

fn power_lost() -> io::Error {
    io::Error::other("simulated power loss")
}

impl LogFile for FaultyLog {
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.fs.fired() {
            return Err(power_lost());
        }
        let before = self
            .fs
            .appended
            .fetch_add(buf.len() as u64, Ordering::SeqCst);
        if let Fault::DiskFullAfter { after_bytes } = self.fs.fault
            && before + buf.len() as u64 > after_bytes
        {
            self.fs
                .appended
                .fetch_sub(buf.len() as u64, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(28));
        }
        self.file.write_all(buf)?;
        self.len += buf.len() as u64;
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        if self.fs.fired() {
            return Err(power_lost());
        }
        let n = self.fs.syncs.fetch_add(1, Ordering::SeqCst) + 1;
        if let Fault::TearAtSync {
            at_sync,
            keep_per_mille,
        } = self.fs.fault
            && n == at_sync
        {
            let unsynced = self.len - self.synced_len;
            let keep = unsynced * u64::from(keep_per_mille.min(1000)) / 1000;
            self.file.set_len(self.synced_len + keep)?;
            self.file.sync_all()?;
            self.fs.dead.store(true, Ordering::SeqCst);
            return Err(power_lost());
        }
        self.file.sync_data()?;
        self.synced_len = self.len;
        Ok(())
    }
}

impl FileSystem for FaultyFs {
    fn open_log(&self, path: &Path) -> io::Result<Box<dyn LogFile>> {
        if self.fired() {
            return Err(power_lost());
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let len = file.metadata()?.len();
        Ok(Box::new(FaultyLog {
            file,
            fs: self.clone(),
            synced_len: len,
            len,
        }))
    }

    fn available_bytes(&self, dir: &Path) -> io::Result<u64> {
        match self.available.load(Ordering::SeqCst) {
            u64::MAX => available_bytes(dir),
            n => Ok(n),
        }
    }
}

/// Maps a whole file read-only.
///
/// The one place evdb maps a file. Callers map only files that nothing
/// writes while the map lives: sealed segments and index files are written
/// once, fsynced and renamed into place; a log is mapped only before the
/// writer starts (recovery) or after it has rolled away from it (sealing);
/// and the data directory lock keeps other processes out. Every read of a
/// map is bounds-checked by its caller.
pub fn map_readonly(path: &Path) -> io::Result<memmap2::Mmap> {
    let file = File::open(path)?;
    // SAFETY: see above — the mapped bytes do not change while mapped.
    #[allow(unsafe_code)]
    let map = unsafe { memmap2::Mmap::map(&file) }?;
    Ok(map)
}

/// Copies `data` into an anonymous read-only map, so that decoders written
/// for mapped files can be fed arbitrary bytes (fuzzing, property tests).
/// An empty input maps one zero byte; callers compare lengths.
pub fn map_bytes(data: &[u8]) -> io::Result<memmap2::Mmap> {
    let mut anon = memmap2::MmapMut::map_anon(data.len().max(1))?;
    anon[..data.len()].copy_from_slice(data);
    anon.make_read_only()
}
