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

fn sealed_ids(db: &Db) -> Vec<u64> {
    db.log().segments().sealed.iter().map(|s| s.id).collect()
}

#[test]
fn retention_by_size_drops_the_oldest_segments_first() {
    use evdb::maintenance::RetentionPolicy;
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), Config::default()).unwrap();
    for s in 0..5u32 {
        db.append_batch((s * 100..(s + 1) * 100).map(|i| event(i, 10_000)).collect())
            .unwrap();
        db.seal().unwrap();
    }
    let set = db.log().segments();
    let sizes: Vec<u64> = set.sealed.iter().map(|s| s.file_bytes()).collect();
    let ids = sealed_ids(&db);
    let open: u64 = set.active.file_bytes();
    // Room for the newest two sealed segments and the open one.
    let max = sizes[3] + sizes[4] + open;
    let policy = RetentionPolicy {
        max_bytes: Some(max),
        ..RetentionPolicy::default()
    };
    let report = db
        .apply_retention_policy(&policy, Timestamp(20_000))
        .unwrap();
    assert_eq!(report.segments_dropped, 3);
    assert_eq!(report.bytes_freed, sizes[..3].iter().sum::<u64>());
    assert_eq!(sealed_ids(&db), ids[3..].to_vec());
    assert_eq!(seg_files(dir.path()), 2);
    assert_eq!(db.stats(&Query::default()).unwrap().total, 200);
    assert!(db.get("r299").unwrap().is_none());
    assert!(db.get("r300").unwrap().is_some());
    // Under the bound: nothing more goes.
    assert_eq!(
        db.apply_retention_policy(&policy, Timestamp(20_000))
            .unwrap(),
        Default::default()
    );
}

#[test]
fn per_source_ages_override_the_default_both_ways() {
    use evdb::maintenance::RetentionPolicy;
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), Config::default()).unwrap();
    let mut batch = Vec::new();
    for (i, (source, ts)) in [
        ("audit", 1_000), // older than the default, kept by its longer age
        ("audit", 100),   // past even its own age
        ("debug", 9_000), // newer than the default, past its short age
        ("debug", 9_900), // within its short age
        ("other", 1_000), // past the default
        ("other", 9_000), // within the default
    ]
    .into_iter()
    .enumerate()
    {
        let mut e = Event::new(source, "t");
        e.id = format!("{source}-{i}");
        e.timestamp = Timestamp(ts);
        batch.push(e);
    }
    db.append_batch(batch).unwrap();
    db.seal().unwrap();
    let now = Timestamp(10_000);
    let us = std::time::Duration::from_micros;
    let mut policy = RetentionPolicy {
        max_age: Some(us(5_000)),
        ..RetentionPolicy::default()
    };
    policy.sources.insert("audit".into(), us(9_500));
    policy.sources.insert("debug".into(), us(500));
    let report = db.apply_retention_policy(&policy, now).unwrap();
    assert_eq!(report.events_deleted, 3);
    let mut left: Vec<String> = db
        .query(&Query::default())
        .unwrap()
        .events
        .into_iter()
        .map(|e| e.id)
        .collect();
    left.sort();
    assert_eq!(left, ["audit-0", "debug-3", "other-5"]);
}

#[test]
fn below_the_free_space_floor_writes_are_refused_then_resume() {
    use evdb::storage::dir::{Fault, FaultyFs};
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultyFs::new(Fault::None);
    let config = Config {
        min_free_bytes: 1 << 20,
        ..Config::default()
    };
    let db = Db::open_with(dir.path(), config, std::sync::Arc::new(fs.clone())).unwrap();
    db.append(event(1, 1)).unwrap();
    fs.set_available(1000);
    // Measured at most every 100 ms: wait for the next measurement.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut stored = 1;
    let refused = loop {
        match db.append(event(1000 + stored, 2)) {
            Err(e @ evdb::DbError::Unavailable(_)) => break e,
            Ok(_) => {
                stored += 1;
                assert!(std::time::Instant::now() < deadline, "never refused");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert!(refused.to_string().contains("1000 bytes free"), "{refused}");
    assert!(db.writes_refused().is_some());
    // Reads and deletes go on.
    assert!(db.get("r1").unwrap().is_some());
    assert!(db.delete("r1").unwrap());
    fs.set_available(u64::MAX - 1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match db.append(event(3, 3)) {
            Ok(_) => break,
            Err(evdb::DbError::Unavailable(_)) => {
                assert!(std::time::Instant::now() < deadline, "never resumed");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(db.writes_refused().is_none());
    assert!(db.get("r3").unwrap().is_some());
    // Nothing refused was half-stored.
    assert_eq!(db.log().segments().total_rows(), u64::from(stored) + 1);
}

#[tokio::test]
async fn the_daemon_refuses_writes_under_the_floor_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("evdb.toml");
    // A floor no disk can meet: the daemon refuses writes from the start.
    std::fs::write(&config, "[storage]\nmin_free_bytes = \"1000TiB\"\n").unwrap();
    let mut d = common::Daemon::start_in(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let client = reqwest::Client::new();
    let r = client
        .post(d.url("/events"))
        .json(&serde_json::json!({"source_system": "s", "event_type": "t"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("floor"), "{v}");
    let r = client.get(d.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["storage"]["accepting_writes"], false, "{v}");
    assert!(v["storage"]["free_bytes"].as_u64().is_some(), "{v}");
    let text = client
        .get(d.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("evdb_writes_refused 1"), "{text}");
    assert!(text.contains("evdb_disk_free_bytes "), "{text}");
    let mut grpc =
        evdb::api::proto::evdb::v1::evdb_client::EvdbClient::connect(format!("http://{}", d.grpc))
            .await
            .unwrap();
    let err = grpc
        .ingest(evdb::api::proto::evdb::v1::IngestRequest {
            events: vec![evdb::api::proto::evdb::v1::Event {
                source_system: "s".into(),
                event_type: "t".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    drop(grpc);
    tokio::task::spawn_blocking(move || d.stop()).await.unwrap();
}
