//! Format compatibility: a data directory written by format version 1 is
//! checked in (`tests/data/format-v1/`) and must open and read the same
//! forever. Regenerate it only together with a format version change:
//! `EVDB_WRITE_FIXTURE=1 cargo test --test format_v1`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};

use evdb::generator::Generator;
use evdb::query::Query;
use evdb::{Config, Db, Event, Timestamp};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/format-v1")
}

fn config() -> Config {
    let mut c = Config::default();
    c.storage.segment_size_bytes = 64 * 1024;
    c
}

/// 300 events: two sealed segments and an active one with rows (the
/// fixture is copied before the process is stopped, as after a crash).
fn events() -> Vec<Event> {
    Generator::new(2024, Timestamp(1_700_000_000_000_000), 1000).batch(300)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else if entry.file_name() != "LOCK" {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn a_format_v1_directory_opens_and_reads_the_same() {
    let events = events();
    if std::env::var_os("EVDB_WRITE_FIXTURE").is_some() {
        let tmp = tempfile::tempdir().unwrap();
        let db = Db::open(tmp.path(), config()).unwrap();
        for chunk in events[..250].chunks(25) {
            db.append_batch(chunk.to_vec()).unwrap();
        }
        db.seal().unwrap();
        db.append_batch(events[250..].to_vec()).unwrap();
        let _ = std::fs::remove_dir_all(fixture());
        copy_dir(tmp.path(), &fixture());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture(), tmp.path());
    let db = Db::open(tmp.path(), config()).unwrap();
    let scanned: Vec<Event> = db.scan().map(|r| r.unwrap().1).collect();
    assert_eq!(scanned, events);
    assert!(
        db.log().segments().sealed.len() >= 2,
        "the fixture holds sealed segments"
    );
    assert_eq!(db.get(&events[7].id).unwrap().as_ref(), Some(&events[7]));
    assert_eq!(db.stats(&Query::default()).unwrap().total, 300);
    let newest = db
        .query(&Query {
            limit: 5,
            ..Query::default()
        })
        .unwrap();
    assert_eq!(newest.events.len(), 5);
}
