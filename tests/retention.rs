//! Retention by age: whole sealed segments past the cutoff are dropped
//! (files gone, space freed), older events elsewhere deleted; a restart
//! resurrects nothing. Through the library and through the daemon.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use evdb::query::Query;
use evdb::{Config, Db, Event, Timestamp};

fn event(i: u32, ts: i64) -> Event {
    let mut e = Event::new("s", "t");
    e.id = format!("r{i}");
    e.timestamp = Timestamp(ts);
    e
}

fn seg_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("segments"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "seg")
        })
        .count()
}

#[test]
fn retention_drops_old_segments_and_deletes_older_events() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), Config::default()).unwrap();
    // Segment A: all old. Segment B: mixed. Open segment: new.
    db.append_batch((0..50).map(|i| event(i, 1_000 + i64::from(i))).collect())
        .unwrap();
    db.seal().unwrap();
    db.append_batch(
        (50..100)
            .map(|i| event(i, if i < 75 { 2_000 } else { 9_000 }))
            .collect(),
    )
    .unwrap();
    db.seal().unwrap();
    db.append_batch((100..110).map(|i| event(i, 10_000)).collect())
        .unwrap();
    assert_eq!(seg_files(dir.path()), 2);
    let (segments, events) = db.apply_retention(Timestamp(5_000)).unwrap();
    // Every expired event counts, those of the dropped segment included.
    assert_eq!((segments, events), (1, 75));
    assert_eq!(seg_files(dir.path()), 1, "the old segment's file is gone");
    let left = db.stats(&Query::default()).unwrap().total;
    assert_eq!(left, 35);
    assert!(db.get("r0").unwrap().is_none());
    assert!(db.get("r60").unwrap().is_none());
    assert!(db.get("r80").unwrap().is_some());
    // Idempotent, and durable across a restart.
    assert_eq!(db.apply_retention(Timestamp(5_000)).unwrap(), (0, 0));
    db.close().unwrap();
    drop(db);
    let db = Db::open(dir.path(), Config::default()).unwrap();
    assert_eq!(db.stats(&Query::default()).unwrap().total, 35);
    assert!(db.get("r0").unwrap().is_none());
    assert!(db.get("r60").unwrap().is_none());
    // An event of a dropped segment may be stored again.
    let again = db.append(event(0, 20_000)).unwrap();
    assert!(matches!(again, evdb::AppendOutcome::Stored(_)));
}

#[tokio::test]
async fn the_daemon_applies_retention_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("evdb.toml");
    std::fs::write(
        &config,
        "[retention]\nmax_age = \"1d\"\ncheck_interval = \"100ms\"\n",
    )
    .unwrap();
    let d = common::Daemon::start_in(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let client = reqwest::Client::new();
    let r = client
        .post(d.url("/events/batch"))
        .json(&serde_json::json!([
            {"event_id": "old", "source_system": "s", "event_type": "t", "timestamp": "2020-01-01T00:00:00Z"},
            {"event_id": "new", "source_system": "s", "event_type": "t"}
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let r = client.get(d.url("/events/old")).send().await.unwrap();
        if r.status() == 404 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "retention never ran");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let r = client.get(d.url("/events/new")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}
