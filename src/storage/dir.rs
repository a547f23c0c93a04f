//! The file seam under the active log: real files, and a fault-injecting
//! variant that simulates a power loss at a chosen sync point.
//!
//! Only the write side of the active segment goes through the seam: it is
//! the one place where a torn write can happen. Sealed segments are written
//! whole, fsynced and renamed before the catalog names them.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The active log's write handle. It writes at the log's logical end,
/// which in a reused file lies before the file's length.
pub trait LogFile: Send {
    /// Writes `buf` at the log's end, which moves past it.
    fn append(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Writes `bufs` one after another at the log's end, as one `append`
    /// of their concatenation would (the writer passes a group's frames
    /// where the callers framed them, without copying them together).
    fn append_all(&mut self, bufs: &[&[u8]]) -> io::Result<()> {
        self.append(&bufs.concat())
    }
    /// Makes every appended byte durable (fdatasync).
    fn sync(&mut self) -> io::Result<()>;
}

/// Creates and opens log files; one per data directory.
pub trait FileSystem: Send + Sync {
    /// Opens the existing log `path` for writing from `end` on.
    fn open_log(&self, path: &Path, end: u64) -> io::Result<Box<dyn LogFile>>;

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

struct RealLog {
    file: File,
    end: u64,
}

impl LogFile for RealLog {
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, self.end)?;
        self.end += buf.len() as u64;
        Ok(())
    }

    /// One positional gathering write (`pwritev`) per `IOV_MAX` slices,
    /// continued where the kernel stopped short.
    fn append_all(&mut self, bufs: &[&[u8]]) -> io::Result<()> {
        for chunk in bufs.chunks(IOV_MAX) {
            let mut slices: Vec<io::IoSlice<'_>> =
                chunk.iter().map(|b| io::IoSlice::new(b)).collect();
            let mut rest = &mut slices[..];
            while !rest.is_empty() {
                let n = match rustix::io::pwritev(&self.file, rest, self.end) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => n,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(e.into()),
                };
                self.end += n as u64;
                io::IoSlice::advance_slices(&mut rest, n);
            }
        }
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Slices per `pwritev` (the kernel's limit, `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

impl FileSystem for RealFs {
    fn open_log(&self, path: &Path, end: u64) -> io::Result<Box<dyn LogFile>> {
        let file = OpenOptions::new().write(true).open(path)?;
        Ok(Box::new(RealLog { file, end }))
    }
}

/// A file written front to back once (a sealed segment, an index file)
/// and made durable in small steps: every step of bytes is written
/// with one `write` and synced at once, so that the disk never holds more
/// than one step of this file's unsynced data. An fsync of the active log
/// waits for whatever the disk has queued before it: megabytes of a sealed
/// segment or an index file written at once stalled acknowledged appends
/// for milliseconds. (Syncing each step on a thread of its own while the
/// next one is written measured no faster.) See docs/PERFORMANCE.md,
/// "Compaction".
pub struct PacedFile {
    file: File,
    buf: Vec<u8>,
    step: usize,
}

/// Bytes a [`PacedFile`] writes and syncs at a time, unless told
/// otherwise: what the sealer writes. (Steps of 128 KiB cost ingest 5–8 %
/// here: each sync of the sealer's file is one more cache flush the
/// active log's syncs queue behind.)
pub const PACED_STEP: usize = 1 << 20;

/// The step of a compacted segment: compaction runs while appends wait
/// for their syncs, and a shorter step shortens the longest such wait.
pub const COMPACTION_STEP: usize = 128 << 10;

impl PacedFile {
    pub fn new(file: File) -> PacedFile {
        PacedFile::with_step(file, PACED_STEP)
    }

    pub fn with_step(file: File, step: usize) -> PacedFile {
        let step = step.max(4096);
        PacedFile {
            file,
            buf: Vec::with_capacity(step),
            step,
        }
    }

    /// Changes the step for what is written from now on.
    pub fn set_step(&mut self, step: usize) {
        self.step = step.max(4096);
    }

    /// Writes and syncs the buffered bytes.
    fn push(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.file.write_all(&self.buf)?;
            self.file.sync_data()?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Writes what is left and syncs data and metadata; returns the file.
    pub fn finish(mut self) -> io::Result<File> {
        if !self.buf.is_empty() {
            self.file.write_all(&self.buf)?;
            self.buf.clear();
        }
        self.file.sync_all()?;
        Ok(self.file)
    }
}

impl Write for PacedFile {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() >= self.step {
            self.push()?;
        }
        let n = data.len().min(self.step - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= self.step {
            self.push()?;
        }
        Ok(n)
    }

    /// Writes and syncs the buffered bytes.
    fn flush(&mut self) -> io::Result<()> {
        self.push()
    }
}

/// Bytes [`remove_in_steps`] gives back to the file system at a time.
pub const RELEASE_STEP: u64 = 4 << 20;

/// Removes a file that nobody maps, handing its blocks back `step` bytes
/// at a time: the name goes first (durable with the directory's next
/// sync), then the still-open file is truncated from its end, each step
/// synced, and closed. On a file system mounted with `discard` (ext4 on
/// this machine's virtual disk) the blocks an unlink frees are trimmed
/// when the journal commits, and every `fdatasync` of the active log
/// waits for that commit: while retention dropped 238 MiB, the append
/// p99 was 5–15 ms with whole unlinks and 1.3–1.6 ms in 4 MiB steps
/// (docs/PERFORMANCE.md, "Removed segments' blocks given back in
/// steps"). A crash
/// midway leaves an orphaned inode the file system frees when it mounts.
/// A file with another name (a snapshot's hard link) keeps its bytes:
/// only the name goes. A file that is mapped must not be passed:
/// truncating it under a mapping faults the reader.
pub fn remove_in_steps(path: &Path, step: u64) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let file = match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        // Not writable by us (its mode changed by hand): the name goes,
        // and the blocks with it at once.
        Err(_) => return std::fs::remove_file(path),
    };
    std::fs::remove_file(path)?;
    let meta = file.metadata()?;
    if meta.nlink() > 0 {
        // Its blocks stay in use under the other name.
        return Ok(());
    }
    let step = step.max(4096);
    let mut len = meta.len();
    while len > step {
        len -= step;
        file.set_len(len)?;
        file.sync_all()?;
    }
    Ok(())
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
    /// sync (the rest of a reused file keeps what it held before), then
    /// fail that sync and every later call: the machine lost power.
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
    /// Where the next append goes.
    end: u64,
    /// The log's end at the last sync.
    synced_end: u64,
    /// The file's length now, and at the last sync.
    len: u64,
    synced_len: u64,
    /// Bytes that appends since the last sync overwrote in a reused file
    /// (offset, old bytes): what a power loss leaves there.
    overwritten: Vec<(u64, Vec<u8>)>,
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
        if self.end < self.len {
            let mut old = vec![0u8; (self.len - self.end).min(buf.len() as u64) as usize];
            self.file.read_exact_at(&mut old, self.end)?;
            self.overwritten.push((self.end, old));
        }
        self.file.write_all_at(buf, self.end)?;
        self.end += buf.len() as u64;
        self.len = self.len.max(self.end);
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
            let unsynced = self.end - self.synced_end;
            let cut = self.synced_end + unsynced * u64::from(keep_per_mille.min(1000)) / 1000;
            for (at, old) in &self.overwritten {
                let from = cut.max(*at);
                if let Some(rest) = old.get((from - at) as usize..) {
                    self.file.write_all_at(rest, from)?;
                }
            }
            self.file.set_len(cut.max(self.synced_len))?;
            self.file.sync_all()?;
            self.fs.dead.store(true, Ordering::SeqCst);
            return Err(power_lost());
        }
        self.file.sync_data()?;
        self.synced_end = self.end;
        self.synced_len = self.len;
        self.overwritten.clear();
        Ok(())
    }
}

impl FileSystem for FaultyFs {
    fn open_log(&self, path: &Path, end: u64) -> io::Result<Box<dyn LogFile>> {
        if self.fired() {
            return Err(power_lost());
        }
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        Ok(Box::new(FaultyLog {
            file,
            fs: self.clone(),
            end,
            synced_end: end,
            len,
            synced_len: len,
            overwritten: Vec::new(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A gathering append writes its slices back to back from the log's
    /// end, past the kernel's slice limit, over whatever a reused file held
    /// there, and the next append follows it.
    #[test]
    fn a_log_appends_slices_back_to_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, vec![0xee; 64 * 1024]).unwrap();
        let mut log = RealFs.open_log(&path, 10).unwrap();
        let pieces: Vec<Vec<u8>> = (0..2500u32)
            .map(|i| vec![(i % 251) as u8; (i % 7) as usize])
            .collect();
        let slices: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
        log.append_all(&slices).unwrap();
        log.append(b"tail").unwrap();
        log.sync().unwrap();
        let mut want = vec![0xee; 10];
        want.extend(pieces.concat());
        want.extend_from_slice(b"tail");
        let got = std::fs::read(&path).unwrap();
        assert_eq!(&got[..want.len()], &want[..]);
        assert!(got[want.len()..].iter().all(|&b| b == 0xee));
    }

    /// The name goes, and the file shrinks a step at a time down to at
    /// most one step before it is closed; a missing file is no error.
    #[test]
    fn a_file_removed_in_steps_loses_its_name_and_its_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segment");
        let len = 10 * 4096 + 1;
        std::fs::write(&path, vec![7u8; len]).unwrap();
        let other = File::open(&path).unwrap();
        remove_in_steps(&path, 4 * 4096).unwrap();
        assert!(!path.exists());
        assert_eq!(other.metadata().unwrap().len(), (len - 8 * 4096) as u64);
        remove_in_steps(&path, 4 * 4096).unwrap();
        // A hard link elsewhere (a snapshot's) keeps every byte.
        let linked = dir.path().join("linked");
        let snapshot = dir.path().join("snapshot");
        std::fs::write(&linked, vec![9u8; len]).unwrap();
        std::fs::hard_link(&linked, &snapshot).unwrap();
        remove_in_steps(&linked, 4 * 4096).unwrap();
        assert!(!linked.exists());
        assert_eq!(std::fs::read(&snapshot).unwrap(), vec![9u8; len]);
        let small = dir.path().join("small");
        std::fs::write(&small, b"tiny").unwrap();
        remove_in_steps(&small, 4096).unwrap();
        assert!(!small.exists());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the pieces and the step, the file holds exactly what
        /// was written, and every whole step is on disk before `finish`.
        #[test]
        fn a_paced_file_holds_what_was_written(
            pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..9000), 0..12),
            step in 4096usize..20000,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f");
            let mut out = PacedFile::with_step(File::create(&path).unwrap(), 1 << 20);
            // Written before the step is set: still buffered.
            out.write_all(&[7; 100]).unwrap();
            out.set_step(step);
            let mut all = vec![7; 100];
            for piece in &pieces {
                out.write_all(piece).unwrap();
                all.extend_from_slice(piece);
                let on_disk = std::fs::read(&path).unwrap();
                let step = step.max(4096);
                prop_assert_eq!(on_disk.len(), all.len() / step * step);
                prop_assert_eq!(&on_disk[..], &all[..on_disk.len()]);
            }
            out.finish().unwrap();
            prop_assert_eq!(std::fs::read(&path).unwrap(), all);
        }
    }
}
