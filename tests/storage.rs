//! Storage through the library API: idempotency, restarts, seals, scans,
//! torn writes at every sync point, and a full disk.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::sync::Arc;

use evdb::generator::Generator;
use evdb::storage::dir::{Fault, FaultyFs};
use evdb::storage::{Compression, FsyncMode};
use evdb::{AppendOutcome, Config, Db, Event, Timestamp};

fn small_config() -> Config {
    let mut config = Config::default();
    config.storage.segment_size_bytes = 64 * 1024;
    config.storage.block_size_bytes = 4096;
    config
}

fn events(n: usize, seed: u64) -> Vec<Event> {
    Generator::new(seed, Timestamp(1_700_000_000_000_000), 1000).batch(n)
}

fn stored(outcomes: &[AppendOutcome]) -> usize {
    outcomes
        .iter()
        .filter(|o| matches!(o, AppendOutcome::Stored(_)))
        .count()
}

/// Opens `dir` on a file system that loses power at sync `at_sync`,
/// keeping `keep_per_mille`/1000 of the bytes written since the sync before.
fn open_tearing(dir: &std::path::Path, at_sync: u64, keep_per_mille: u32) -> (Db, FaultyFs) {
    let fs = FaultyFs::new(Fault::TearAtSync {
        at_sync,
        keep_per_mille,
    });
    let db = Db::open_with(dir, small_config(), Arc::new(fs.clone())).unwrap();
    (db, fs)
}

/// Appends `events` in batches of `batch` until one fails (the planned
/// power loss); the events of every acknowledged batch go to `acked`.
fn append_until_torn(db: &Db, events: &[Event], batch: usize, acked: &mut Vec<Event>) {
    for chunk in events.chunks(batch) {
        match db.append_batch(chunk.to_vec()) {
            Ok(out) => {
                assert_eq!(stored(&out), chunk.len());
                acked.extend_from_slice(chunk);
            }
            Err(_) => break,
        }
    }
}

/// Reopens `dir` after a torn write and checks it: every acknowledged
/// event is there, and what survived beyond them is a prefix of the rest
/// of `expected`, whole and in order; retrying `expected` then stores
/// exactly the missing events. Returns the reopened store.
fn reopen_after_tear(dir: &std::path::Path, acked: &[Event], expected: &[Event], what: &str) -> Db {
    let db = Db::open(dir, small_config()).unwrap();
    let scanned: Vec<Event> = db.scan().map(|r| r.unwrap().1).collect();
    assert!(scanned.len() >= acked.len(), "{what}: lost events");
    assert_eq!(
        &scanned[..acked.len()],
        acked,
        "{what}: acknowledged events changed"
    );
    assert_eq!(
        &scanned[..],
        &expected[..scanned.len()],
        "{what}: rows that were never appended here"
    );
    let out = db.append_batch(expected.to_vec()).unwrap();
    assert_eq!(stored(&out), expected.len() - scanned.len());
    assert_eq!(db.len(), expected.len() as u64);
    db
}

#[test]
fn the_same_id_is_stored_once_in_a_batch_across_batches_and_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = events(3, 1);
    e[1].id = e[0].id.clone();
    {
        let db = Db::open(dir.path(), small_config()).unwrap();
        let out = db.append_batch(e.clone()).unwrap();
        assert!(matches!(out[0], AppendOutcome::Stored(_)));
        assert_eq!(
            out[1],
            AppendOutcome::Duplicate(match out[0] {
                AppendOutcome::Stored(p) => p,
                _ => unreachable!(),
            })
        );
        assert!(matches!(out[2], AppendOutcome::Stored(_)));
        let again = db.append_batch(e.clone()).unwrap();
        assert_eq!(stored(&again), 0);
        db.close().unwrap();
    }
    let db = Db::open(dir.path(), small_config()).unwrap();
    assert_eq!(stored(&db.append_batch(e.clone()).unwrap()), 0);
    assert_eq!(db.len(), 2);
    assert_eq!(db.get(&e[0].id).unwrap().as_ref(), Some(&e[0]));
    assert_eq!(db.get(&e[2].id).unwrap().as_ref(), Some(&e[2]));
    assert_eq!(db.get("missing").unwrap(), None);
}

#[test]
fn invalid_events_are_reported_and_do_not_stop_valid_ones() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), small_config()).unwrap();
    let mut e = events(3, 2);
    e[1].source.clear();
    let out = db.append_batch(e.clone()).unwrap();
    assert!(matches!(&out[1], AppendOutcome::Invalid(i) if i.field == "source_system"));
    assert_eq!(stored(&out), 2);
    assert_eq!(db.get(&e[1].id).unwrap(), None);
    let too_many = events(evdb::limits::BATCH_EVENTS_MAX + 1, 3);
    assert!(db.append_batch(too_many).is_err());
    assert_eq!(db.len(), 2);
}

#[test]
fn events_survive_seals_and_restarts_in_arrival_order() {
    let dir = tempfile::tempdir().unwrap();
    let all = events(3000, 4);
    for compression in [Compression::Zstd, Compression::Lz4, Compression::None] {
        let dir = dir.path().join(format!("{compression:?}"));
        let mut config = small_config();
        config.storage.compression = compression;
        {
            let db = Db::open(&dir, config.clone()).unwrap();
            for chunk in all.chunks(250) {
                assert_eq!(
                    stored(&db.append_batch(chunk.to_vec()).unwrap()),
                    chunk.len()
                );
            }
            db.seal().unwrap();
            let segments = db.log().segments();
            assert!(segments.sealed.len() > 3, "small segments roll often");
            db.close().unwrap();
        }
        let db = Db::open(&dir, config).unwrap();
        let scanned: Vec<Event> = db.scan().map(|r| r.unwrap().1).collect();
        assert_eq!(scanned, all);
        for e in all.iter().step_by(37) {
            assert_eq!(db.get(&e.id).unwrap().as_ref(), Some(e));
        }
        // Duplicates are found in sealed segments too.
        assert_eq!(stored(&db.append_batch(all[..500].to_vec()).unwrap()), 0);
    }
}

#[test]
fn a_second_open_of_the_same_directory_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let _db = Db::open(dir.path(), small_config()).unwrap();
    let err = Db::open(dir.path(), small_config())
        .unwrap_err()
        .to_string();
    assert!(err.contains("in use by another process"), "{err}");
}

#[test]
fn concurrent_writers_are_group_committed_and_all_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(Db::open(dir.path(), small_config()).unwrap());
    let all = events(1600, 5);
    std::thread::scope(|s| {
        for share in all.chunks(100) {
            let db = db.clone();
            s.spawn(move || {
                for e in share {
                    assert!(matches!(
                        db.append(e.clone()).unwrap(),
                        AppendOutcome::Stored(_)
                    ));
                    // Read your writes: acknowledged means visible.
                    assert_eq!(db.get(&e.id).unwrap().as_ref(), Some(e));
                }
            });
        }
    });
    assert_eq!(db.len(), 1600);
}

/// Power loss at every sync point: every acknowledged event survives, no
/// torn record is served, nothing is duplicated.
#[test]
fn a_torn_write_at_any_sync_point_loses_nothing_acknowledged() {
    let all = events(400, 6);
    for at_sync in 1..=12u64 {
        for keep_per_mille in [0, 333, 999] {
            let dir = tempfile::tempdir().unwrap();
            let mut acked = Vec::new();
            {
                let (db, fs) = open_tearing(dir.path(), at_sync, keep_per_mille);
                append_until_torn(&db, &all, 40, &mut acked);
                assert!(fs.fired() || acked.len() == all.len());
                // After a failed sync the store refuses writes.
                if fs.fired() {
                    assert!(db.append_batch(all[..1].to_vec()).is_err());
                    assert!(db.log().poisoned().is_some());
                }
            }
            let what = format!("sync {at_sync}, keep {keep_per_mille}");
            reopen_after_tear(dir.path(), &acked, &all, &what);
        }
    }
}

/// A rolled log is overwritten in place by a later segment once sealed.
/// Here the reused file's leftovers are frames of exactly the same sizes
/// as the new ones (the same events under other ids of the same length),
/// so a tear leaves whole, well-formed earlier frames right after the
/// last durable one: they carry another segment's salt and must never be
/// read back as this segment's rows.
#[test]
fn a_reused_log_never_serves_the_frames_it_held_before() {
    let first = events(100, 7);
    let middle = events(20, 8);
    // Same sizes as `first`, other ids.
    let mirrored: Vec<Event> = first
        .iter()
        .map(|e| {
            let mut e = e.clone();
            let last = if e.id.ends_with('x') { "y" } else { "x" };
            e.id = format!("{}{last}", &e.id[..e.id.len() - 1]);
            e
        })
        .collect();
    let expected: Vec<Event> = first
        .iter()
        .chain(&middle)
        .chain(&mirrored)
        .cloned()
        .collect();
    // Syncs: five batches, the roll, one batch, the roll; then the
    // mirrored batches are syncs 9 to 13.
    for at_sync in 9..=13u64 {
        for keep_per_mille in [0, 500, 999] {
            let dir = tempfile::tempdir().unwrap();
            let mut acked = Vec::new();
            {
                let (db, fs) = open_tearing(dir.path(), at_sync, keep_per_mille);
                for chunk in first.chunks(20) {
                    db.append_batch(chunk.to_vec()).unwrap();
                }
                db.log().seal().unwrap();
                db.append_batch(middle.clone()).unwrap();
                db.log().seal().unwrap();
                assert_eq!(db.log().logs_reused(), 1, "the first log was not reused");
                acked.extend(first.iter().chain(&middle).cloned());
                append_until_torn(&db, &mirrored, 20, &mut acked);
                assert!(fs.fired(), "sync {at_sync} never came");
            }
            let what = format!("sync {at_sync}, keep {keep_per_mille}");
            let db = reopen_after_tear(dir.path(), &acked, &expected, &what);
            for e in &first {
                assert_eq!(db.get(&e.id).unwrap().as_ref(), Some(e));
            }
        }
    }
}

/// An active log in a reused file (longer than its log, an earlier
/// segment's frames past its end) reads, verifies, snapshots and reopens
/// as its own rows only; a closed store keeps no spare.
#[test]
fn a_reused_log_snapshots_verifies_and_reopens_as_its_own_rows() {
    let dir = tempfile::tempdir().unwrap();
    let all = events(150, 9);
    let segments = dir.path().join("segments");
    {
        let db = Db::open(dir.path(), small_config()).unwrap();
        db.append_batch(all[..100].to_vec()).unwrap();
        db.log().seal().unwrap();
        db.append_batch(all[100..110].to_vec()).unwrap();
        db.log().seal().unwrap();
        assert!(segments.join("spare.log").exists());
        db.append_batch(all[110..].to_vec()).unwrap();
        assert_eq!(db.log().logs_reused(), 1);
        let active = db.log().segments().active.clone();
        let log = segments.join(format!("{:020}.log", active.id));
        let file_len = std::fs::metadata(log).unwrap().len();
        assert!(
            file_len > active.file_bytes(),
            "the reused file is longer than its log"
        );
        let scanned: Vec<Event> = db.scan().map(|r| r.unwrap().1).collect();
        assert_eq!(scanned, all);
        assert!(evdb::snapshot::verify(&db, |_, _, _| ()).is_empty());
        let snap = db.snapshot().unwrap();
        assert_eq!(snap.events, all.len() as u64);
        let restored = dir.path().join("restored");
        evdb::snapshot::restore(&snap.path, &restored).unwrap();
        let copy = Db::open(&restored, small_config()).unwrap();
        let copied: Vec<Event> = copy.scan().map(|r| r.unwrap().1).collect();
        assert_eq!(copied, all);
        db.close().unwrap();
    }
    assert!(
        !segments.join("spare.log").exists(),
        "close removes the spare"
    );
    let db = Db::open(dir.path(), small_config()).unwrap();
    let scanned: Vec<Event> = db.scan().map(|r| r.unwrap().1).collect();
    assert_eq!(scanned, all);
}

#[test]
fn a_full_disk_refuses_writes_without_corrupting_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultyFs::new(Fault::DiskFullAfter {
        after_bytes: 20_000,
    });
    let all = events(200, 7);
    let mut acked = 0;
    {
        let db = Db::open_with(dir.path(), small_config(), Arc::new(fs)).unwrap();
        for chunk in all.chunks(10) {
            match db.append_batch(chunk.to_vec()) {
                Ok(_) => acked += chunk.len(),
                Err(e) => {
                    assert!(e.to_string().contains("No space left"), "{e}");
                    break;
                }
            }
        }
        assert!(acked > 0 && acked < all.len());
    }
    let db = Db::open(dir.path(), small_config()).unwrap();
    let scanned: Vec<Event> = db.scan().map(|r| r.unwrap().1).collect();
    assert_eq!(&scanned[..], &all[..acked]);
}

#[test]
fn fsync_modes_parse_and_interval_mode_acknowledges() {
    assert_eq!(FsyncMode::parse("always"), Ok(FsyncMode::Always));
    assert!(FsyncMode::parse("interval:0").is_err());
    assert!(FsyncMode::parse("sometimes").is_err());
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config();
    config.storage.fsync = FsyncMode::parse("interval:5").unwrap();
    let db = Db::open(dir.path(), config).unwrap();
    let e = events(50, 8);
    assert_eq!(stored(&db.append_batch(e.clone()).unwrap()), 50);
    db.sync().unwrap();
    assert_eq!(db.get(&e[49].id).unwrap().as_ref(), Some(&e[49]));
}

#[test]
fn a_corrupted_sealed_block_is_reported_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let all = events(500, 9);
    {
        let db = Db::open(dir.path(), small_config()).unwrap();
        db.append_batch(all.clone()).unwrap();
        db.close().unwrap();
    }
    let seg = std::fs::read_dir(dir.path().join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    // The first block starts after the 32-byte header and the dictionary
    // whose length the header holds at bytes 12..16.
    let dict_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    bytes[32 + dict_len + 10] ^= 0xff;
    std::fs::write(&seg, bytes).unwrap();
    let db = Db::open(dir.path(), small_config()).unwrap();
    let results: Vec<_> = db.scan().collect();
    let err = results
        .iter()
        .find_map(|r| r.as_ref().err())
        .expect("damage is reported");
    assert!(err.to_string().contains("checksum"), "{err}");
}

#[test]
fn an_old_active_segment_rolls_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config();
    config.storage.segment_age_max = Some(std::time::Duration::from_millis(30));
    let db = Db::open(dir.path(), config).unwrap();
    db.append_batch(events(5, 10)).unwrap();
    // The writer checks the age when idle; wait, bounded, for the roll.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while db.log().segments().active.id == 1 {
        assert!(std::time::Instant::now() < deadline, "no roll by age");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(db.len(), 5);
}

#[test]
fn an_event_size_limit_beyond_the_frame_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config();
    config.limits.event_size_max = evdb::limits::EVENT_SIZE_MAX_CONFIGURABLE + 1;
    let err = Db::open(dir.path(), config).unwrap_err().to_string();
    assert!(err.contains("event_size_max"), "{err}");
}

/// A caller that goes away while its append is being written (an HTTP
/// client that disconnects) must not leave stored events unindexed:
/// `append_batch_detached` finishes the append on a task of its own. The
/// abort lands at a different point of the append in each round; every
/// event the log holds must end up visible to queries and stats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_whose_caller_goes_away_is_still_indexed() {
    let dir = tempfile::tempdir().unwrap();
    // One open segment throughout: a sealed segment's index is rebuilt
    // from its records, which would hide rows left unindexed.
    let db = Arc::new(Db::open(dir.path(), Config::default()).unwrap());
    for round in 0..48u64 {
        let batch = events(40, 5_000 + round);
        let task = {
            let db = db.clone();
            tokio::spawn(async move { db.append_batch_detached(batch).await })
        };
        // The test's own thread is not a worker: sleeping it spreads the
        // abort over 0–1.2 ms, from before the append starts to after it
        // is acknowledged.
        std::thread::sleep(std::time::Duration::from_micros(round * 25));
        task.abort();
        let _ = task.await;
    }
    // Detached appends finish on their own. The writer works in order, so
    // once an awaited append is acknowledged every aborted one was written;
    // their tasks then index them. Wait (bounded) until the index agrees
    // with the log on several checks in a row.
    db.append_batch_detached(events(1, 9_999)).await.unwrap();
    let all = evdb::query::Query::default();
    let mut agreeing = 0;
    for _ in 0..500 {
        if db.len() == db.stats(&all).unwrap().total {
            agreeing += 1;
            if agreeing == 5 {
                break;
            }
        } else {
            agreeing = 0;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (stored, indexed) = (db.len(), db.stats(&all).unwrap().total);
    assert_eq!(
        stored, indexed,
        "{stored} events stored, {indexed} visible to stats"
    );
    assert!(
        stored > 1,
        "no aborted append got through: the test aborted too early"
    );
    let page = db
        .query(&evdb::query::Query {
            limit: 1000,
            ..evdb::query::Query::default()
        })
        .unwrap();
    assert_eq!(page.events.len() as u64, stored.min(1000));
}

/// The live tail gets exactly the events a batch stored, in order: not
/// the invalid ones nor the duplicates. Batches stored while nobody
/// listened still count, so a later subscriber is not left waiting for
/// them.
#[test]
fn the_tail_gets_the_stored_events_of_a_batch_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), small_config()).unwrap();
    let first = events(300, 21);
    assert_eq!(stored(&db.append_batch(first.clone()).unwrap()), 300);
    let mut sub = db.subscribe(evdb::tail::TailFilter::default());
    let fresh = events(3, 22);
    let mut invalid = fresh[1].clone();
    invalid.source = String::new();
    invalid.id = "never-stored".into();
    let batch = vec![
        fresh[0].clone(),
        invalid,
        first[7].clone(),
        fresh[1].clone(),
        fresh[0].clone(),
        fresh[2].clone(),
    ];
    let outcomes = db.append_batch(batch).unwrap();
    assert_eq!(stored(&outcomes), 3);
    let mut got = Vec::new();
    while let Some(e) = sub.try_next().unwrap() {
        got.push(e.id.clone());
    }
    let want: Vec<String> = fresh.iter().map(|e| e.id.clone()).collect();
    assert_eq!(got, want);
    db.close().unwrap();
}

/// A log whose next sync, once armed, tells the test it has begun and
/// waits until the test lets it go (or for at most 10 s, so a failing
/// test still ends).
#[derive(Clone)]
struct HeldSync(Arc<HeldSyncState>);

struct HeldSyncState {
    armed: std::sync::atomic::AtomicBool,
    entered: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
    release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

struct HeldSyncLog {
    inner: Box<dyn evdb::storage::dir::LogFile>,
    state: Arc<HeldSyncState>,
}

impl evdb::storage::dir::LogFile for HeldSyncLog {
    fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.inner.append(buf)
    }

    fn append_all(&mut self, bufs: &[&[u8]]) -> std::io::Result<()> {
        self.inner.append_all(bufs)
    }

    fn sync(&mut self) -> std::io::Result<()> {
        if self
            .state
            .armed
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            let _ = self.state.entered.lock().unwrap().send(());
            let _ = self
                .state
                .release
                .lock()
                .unwrap()
                .recv_timeout(std::time::Duration::from_secs(10));
        }
        self.inner.sync()
    }
}

impl evdb::storage::dir::FileSystem for HeldSync {
    fn open_log(
        &self,
        path: &std::path::Path,
        end: u64,
    ) -> std::io::Result<Box<dyn evdb::storage::dir::LogFile>> {
        Ok(Box::new(HeldSyncLog {
            inner: evdb::storage::dir::RealFs.open_log(path, end)?,
            state: self.0.clone(),
        }))
    }
}

/// A batch's events are freed while the writer syncs them when nobody
/// listens. A subscriber that joins during that sync still gets them,
/// whole and in order, once they are acknowledged: they are read back
/// from the log.
#[test]
fn a_subscriber_that_joins_while_a_batch_is_synced_gets_it() {
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let fs = HeldSync(Arc::new(HeldSyncState {
        armed: std::sync::atomic::AtomicBool::new(false),
        entered: std::sync::Mutex::new(entered_tx),
        release: std::sync::Mutex::new(release_rx),
    }));
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(Db::open_with(dir.path(), small_config(), Arc::new(fs.clone())).unwrap());
    assert_eq!(stored(&db.append_batch(events(40, 31)).unwrap()), 40);
    let batch = events(60, 32);
    fs.0.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let writer = {
        let db = db.clone();
        let batch = batch.clone();
        std::thread::spawn(move || db.append_batch(batch).unwrap())
    };
    entered
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the batch's sync began");
    // The caller indexes the batch and frees its events while the sync
    // is held; give it ample time to get there.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut sub = db.subscribe(evdb::tail::TailFilter::default());
    release.send(()).unwrap();
    assert_eq!(stored(&writer.join().unwrap()), 60);
    let mut got = Vec::new();
    while let Some(e) = sub.try_next().unwrap() {
        got.push((*e).clone());
    }
    let ids = |events: &[Event]| events.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&got), ids(&batch));
    assert!(got == batch, "the tail's events differ from those stored");
    db.close().unwrap();
}

/// Holds every seal until the test lets it go (or for at most 10 s, so a
/// failing test still ends), so a rolled segment stays open (neither
/// active nor sealed) for as long as the test needs.
struct HeldSeals(std::sync::Mutex<std::sync::mpsc::Receiver<()>>);

impl evdb::storage::SealHook for HeldSeals {
    fn sealed(&self, _: &evdb::storage::SealedSegment) -> Result<(), String> {
        let _ = self
            .0
            .lock()
            .unwrap()
            .recv_timeout(std::time::Duration::from_secs(10));
        Ok(())
    }
}

#[test]
fn an_id_is_a_duplicate_in_the_active_a_rolled_and_a_sealed_segment() {
    use evdb::storage::{Appended, Log, Prepared, StorageConfig};
    let dir = tempfile::tempdir().unwrap();
    let (release, held) = std::sync::mpsc::channel();
    let config = StorageConfig {
        segment_size_bytes: 64 * 1024,
        ..StorageConfig::default()
    };
    let log = Log::open_with(
        dir.path(),
        config,
        Arc::new(evdb::storage::dir::RealFs),
        Some(Arc::new(HeldSeals(std::sync::Mutex::new(held)))),
    )
    .unwrap();
    let append = |events: &[Event]| {
        let mut prepared = Prepared::with_capacity(events.len());
        for e in events {
            prepared.push(e, 1 << 20).unwrap();
        }
        log.append_staged(prepared, || (), |_, _| {}).unwrap().0
    };
    let stored_at = |out: &[Appended]| -> Vec<_> {
        out.iter()
            .map(|a| match a {
                Appended::Stored(p) => *p,
                Appended::Duplicate(p) => panic!("{p:?} is not new"),
            })
            .collect()
    };
    // More than a segment: the group rolls the log, whose seal is held.
    let first = events(300, 11);
    let first_at = stored_at(&append(&first));
    let second = events(20, 12);
    let second_at = stored_at(&append(&second));
    let set = log.segments();
    assert_eq!(
        set.sealing.len(),
        1,
        "the first segment is rolled, unsealed"
    );
    assert!(set.sealed.is_empty());
    assert!(first_at.iter().all(|p| p.segment == set.sealing[0].id));
    assert!(second_at.iter().all(|p| p.segment == set.active.id));
    drop(set);

    // Ids of the rolled and the active segment, mixed with new ones, in
    // runs longer than the writer reads ahead at a time.
    let fresh = events(200, 13);
    let mut mixed = Vec::new();
    let mut expected = Vec::new();
    for i in 0..200 {
        let (e, dup) = match i % 3 {
            0 => (first[i].clone(), Some(first_at[i])),
            1 => (second[i % 20].clone(), Some(second_at[i % 20])),
            _ => (fresh[i].clone(), None),
        };
        mixed.push(e);
        expected.push(dup);
    }
    let out = append(&mixed);
    for (i, (got, want)) in out.iter().zip(&expected).enumerate() {
        match (got, want) {
            (Appended::Duplicate(p), Some(q)) => assert_eq!(p, q, "event {i}"),
            (Appended::Stored(_), None) => {}
            _ => panic!("event {i}: {got:?}, expected a duplicate at {want:?}"),
        }
    }

    // Once sealed, the same ids are found through the filter.
    for _ in 0..16 {
        release.send(()).unwrap();
    }
    log.seal().unwrap();
    assert!(!log.segments().sealed.is_empty());
    let again = append(&first[..50]);
    for (i, got) in again.iter().enumerate() {
        assert_eq!(got, &Appended::Duplicate(first_at[i]), "sealed event {i}");
    }
    log.close().unwrap();
}
