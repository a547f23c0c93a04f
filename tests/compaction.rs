//! Compaction: deleted events' bytes go, small segments merge, order and
//! cursors hold, a deletion made during a rewrite is carried over, the
//! deletion bound is honoured under a chosen clock, and it all survives a
//! reopen. Through the library, the CLI, HTTP and gRPC.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use evdb::maintenance::{CompactOptions, CompactionPolicy};
use evdb::query::{Order, Query};
use evdb::{AppendOutcome, Config, Db, Event, Severity, Timestamp};

fn config() -> Config {
    let mut c = Config::default();
    c.storage.block_size_bytes = 2048;
    c
}

/// Event `i`: timestamps out of arrival order, every third an error, and
/// ties (equal timestamps) so that arrival order decides.
fn event(i: u32) -> Event {
    let mut e = Event::new(if i.is_multiple_of(2) { "even" } else { "odd" }, "t");
    e.id = format!("e{i}");
    e.timestamp = Timestamp(1_000_000 + i64::from((i * 7919) % 500));
    e.severity = if i.is_multiple_of(3) {
        Severity::Error
    } else {
        Severity::Info
    };
    e
}

/// `n` events in `segments` sealed segments.
fn store(dir: &std::path::Path, n: u32, segments: u32) -> Db {
    let db = Db::open(dir, config()).unwrap();
    let per = n / segments;
    for s in 0..segments {
        db.append_batch((s * per..(s + 1) * per).map(event).collect())
            .unwrap();
        db.seal().unwrap();
    }
    db
}

fn ids(db: &Db, q: &Query) -> Vec<String> {
    let mut q = q.clone();
    q.limit = 1000;
    let mut out = Vec::new();
    loop {
        let page = db.query(&q).unwrap();
        out.extend(page.events.into_iter().map(|e| e.id));
        match page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => return out,
        }
    }
}

fn seg_bytes(db: &Db) -> u64 {
    db.log()
        .segments()
        .sealed
        .iter()
        .map(|s| s.file_bytes())
        .sum()
}

fn force() -> CompactOptions {
    CompactOptions {
        force: true,
        ..CompactOptions::default()
    }
}

#[test]
fn compaction_removes_deleted_bytes_and_keeps_every_answer() {
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path(), 3000, 3);
    let asc = Query {
        order: Order::Asc,
        ..Query::default()
    };
    let desc = Query::default();
    let errors = Query {
        severity: Some(Severity::Error),
        ..Query::default()
    };
    let deleted = db.delete_matching(&errors).unwrap();
    assert_eq!(deleted, 1000);
    let (want_asc, want_desc) = (ids(&db, &asc), ids(&db, &desc));
    let want_stats = db.stats(&Query::default()).unwrap();
    let before = seg_bytes(&db);

    let report = db.compact(&force(), |_| {}).unwrap();
    assert_eq!(report.segments_in, 3);
    assert_eq!(report.events_removed, 1000);
    assert!(report.bytes_after < report.bytes_before);
    assert!(seg_bytes(&db) < before * 3 / 4, "a third of the rows went");
    assert_eq!(db.log().segments().total_rows(), 2000, "the rows are gone");

    assert_eq!(ids(&db, &asc), want_asc);
    assert_eq!(ids(&db, &desc), want_desc);
    assert_eq!(db.stats(&Query::default()).unwrap(), want_stats);
    assert!(db.get("e0").unwrap().is_none());
    assert!(db.get("e1").unwrap().is_some());
    // Nothing left to do.
    assert_eq!(db.compact(&force(), |_| {}).unwrap().segments_in, 0);

    // The deleted ids are free again.
    assert!(matches!(
        db.append(event(0)).unwrap(),
        AppendOutcome::Stored(_)
    ));
    db.close().unwrap();
    drop(db);

    let db = Db::open(dir.path(), config()).unwrap();
    assert_eq!(db.stats(&Query::default()).unwrap().total, 2001);
    assert!(db.get("e3").unwrap().is_none());
    assert!(db.get("e0").unwrap().is_some());
    let mut again = ids(&db, &desc);
    again.retain(|id| id != "e0");
    assert_eq!(again, want_desc);
}

/// The segment files in the store's directory, by name.
fn seg_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".seg"))
        .collect();
    names.sort();
    names
}

/// Every row of a sealed segment, block by block, checksums verified.
fn all_frames(seg: &evdb::storage::segment::SealedSegment) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for b in 0..seg.block_count() {
        let block = seg.read_block(b).unwrap();
        for row in block.first_row..block.first_row + block.rows() {
            out.push(block.checked_frame(row).unwrap().to_vec());
        }
    }
    out
}

/// Inputs nobody holds leave the directory when compaction (or
/// retention) returns; one a reader still holds is unlinked too, and the
/// reader goes on reading every row of its mapping.
#[test]
fn inputs_leave_the_directory_and_a_reader_holding_one_reads_on() {
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path(), 3000, 3);
    assert_eq!(seg_files(dir.path()).len(), 3);
    let held = db.log().segments().sealed[1].clone();
    let want = all_frames(&held);
    assert_eq!(want.len(), 1000);
    db.delete_matching(&Query {
        severity: Some(Severity::Error),
        ..Query::default()
    })
    .unwrap();

    let report = db.compact(&force(), |_| {}).unwrap();
    assert_eq!(report.segments_in, 3);
    let left = seg_files(dir.path());
    assert_eq!(left.len(), 1, "only the compacted segment: {left:?}");
    assert!(!left.contains(&format!("{:020}.seg", held.id)));
    assert_eq!(all_frames(&held), want, "the held mapping reads on");
    drop(held);

    // Retention drops a whole segment the same way.
    db.append_batch((5000..5100).map(event).collect()).unwrap();
    db.seal().unwrap();
    assert_eq!(seg_files(dir.path()).len(), 2);
    let policy = evdb::maintenance::RetentionPolicy {
        max_bytes: Some(1),
        ..Default::default()
    };
    let report = db
        .apply_retention_policy(&policy, Timestamp::now())
        .unwrap();
    assert_eq!(report.segments_dropped, 2);
    assert!(seg_files(dir.path()).is_empty());
    assert_eq!(db.stats(&Query::default()).unwrap().total, 0);
}

/// Uncompressed segments of several MiB each (past the step in which
/// removed files are given back): `segments` of 160 events with 32 KiB
/// of data each.
fn big_store(dir: &std::path::Path, segments: u32) -> (Db, Config) {
    let mut c = config();
    c.storage.compression = evdb::storage::Compression::None;
    let db = Db::open(dir, c.clone()).unwrap();
    let pad = "x".repeat(32 << 10);
    for s in 0..segments {
        let batch = (s * 160..(s + 1) * 160)
            .map(|i| {
                let mut e = event(i);
                e.data = evdb::JsonObject::parse(&format!(r#"{{"pad":"{pad}"}}"#)).unwrap();
                e
            })
            .collect();
        db.append_batch(batch).unwrap();
        db.seal().unwrap();
    }
    assert!(seg_bytes(&db) > u64::from(segments) * (4 << 20));
    (db, c)
}

/// An input no reader maps is given back in steps: unlinked, then cut
/// down to at most one step (seen through a plain file handle, which
/// does not count as a reader of the store).
#[test]
fn an_input_nobody_maps_is_truncated_after_its_unlink() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = big_store(dir.path(), 2);
    let handles: Vec<std::fs::File> = seg_files(dir.path())
        .iter()
        .map(|n| std::fs::File::open(dir.path().join("segments").join(n)).unwrap())
        .collect();
    assert_eq!(handles.len(), 2);
    db.delete_matching(&Query {
        severity: Some(Severity::Error),
        ..Query::default()
    })
    .unwrap();
    assert_eq!(db.compact(&force(), |_| {}).unwrap().segments_in, 2);
    for h in &handles {
        let meta = h.metadata().unwrap();
        assert_eq!(meta.nlink(), 0, "unlinked");
        assert!(meta.len() <= 4 << 20, "truncated in steps: {}", meta.len());
    }
    assert_eq!(db.stats(&Query::default()).unwrap().total, 320 - 107);
}

/// A snapshot hard-links the segments it holds: compaction and retention
/// removing them from the store must leave the snapshot's files whole.
#[test]
fn a_snapshot_keeps_its_segments_whole_through_compaction_and_retention() {
    let dir = tempfile::tempdir().unwrap();
    let (db, c) = big_store(dir.path(), 3);
    let snap = db.snapshot().unwrap();
    db.delete_matching(&Query {
        severity: Some(Severity::Error),
        ..Query::default()
    })
    .unwrap();
    assert_eq!(db.compact(&force(), |_| {}).unwrap().segments_in, 3);
    let policy = evdb::maintenance::RetentionPolicy {
        max_bytes: Some(1),
        ..Default::default()
    };
    assert_eq!(
        db.apply_retention_policy(&policy, Timestamp::now())
            .unwrap()
            .segments_dropped,
        1
    );
    db.close().unwrap();
    drop(db);

    let restored = dir.path().join("restored");
    evdb::snapshot::restore(&snap.path, &restored).unwrap();
    let db = Db::open(&restored, c).unwrap();
    assert!(evdb::snapshot::verify(&db, |_, _, _| {}).is_empty());
    assert_eq!(db.stats(&Query::default()).unwrap().total, 480);
    assert_eq!(ids(&db, &Query::default()).len(), 480);
}

#[test]
fn runs_rewritten_on_several_threads_keep_every_answer() {
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path(), 4000, 8);
    let errors = Query {
        severity: Some(Severity::Error),
        ..Query::default()
    };
    db.delete_matching(&errors).unwrap();
    let asc = Query {
        order: Order::Asc,
        ..Query::default()
    };
    let want = ids(&db, &asc);
    let want_stats = db.stats(&Query::default()).unwrap();
    let mut last = 0;
    let opts = CompactOptions {
        policy: CompactionPolicy {
            // Every segment is a run of its own: eight runs, three threads.
            small_segment_bytes: 0,
            max_segment_bytes: 1,
            threads: 3,
            ..CompactionPolicy::default()
        },
        force: true,
        ..CompactOptions::default()
    };
    let report = db
        .compact(&opts, |p| {
            assert!(p.bytes_done >= last && p.bytes_done <= p.bytes_total);
            last = p.bytes_done;
        })
        .unwrap();
    assert_eq!((report.segments_in, report.segments_out), (8, 8));
    assert_eq!(report.events_removed, 1334);
    assert_eq!(last, report.bytes_before, "progress ends at the total");
    assert_eq!(ids(&db, &asc), want);
    assert_eq!(db.stats(&Query::default()).unwrap(), want_stats);
    db.close().unwrap();
    drop(db);
    let db = Db::open(dir.path(), config()).unwrap();
    assert_eq!(ids(&db, &asc), want);
    assert_eq!(db.log().segments().total_rows(), 4000 - 1334);
}

#[test]
fn a_deletion_made_during_the_rewrite_is_carried_over() {
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path(), 2000, 2);
    assert!(db.delete("e5").unwrap());
    let mut deleted_midway = false;
    let report = db
        .compact(&force(), |p| {
            if p.bytes_done > 0 && !deleted_midway {
                // e1500 lives in the second input, not yet left out.
                assert!(db.delete("e1500").unwrap());
                assert!(db.delete("e7").unwrap());
                deleted_midway = true;
            }
        })
        .unwrap();
    assert!(deleted_midway);
    assert_eq!(
        report.events_removed, 1,
        "only e5 was deleted when it began"
    );
    for id in ["e5", "e1500", "e7"] {
        assert!(db.get(id).unwrap().is_none(), "{id} came back");
    }
    assert_eq!(db.stats(&Query::default()).unwrap().total, 1997);
    db.close().unwrap();
    drop(db);
    let db = Db::open(dir.path(), config()).unwrap();
    for id in ["e5", "e1500", "e7"] {
        assert!(db.get(id).unwrap().is_none(), "{id} came back after reopen");
    }
    assert_eq!(db.stats(&Query::default()).unwrap().total, 1997);
    // The next compaction removes the late ones too.
    assert_eq!(db.compact(&force(), |_| {}).unwrap().events_removed, 2);
    assert_eq!(db.stats(&Query::default()).unwrap().total, 1997);
}

#[test]
fn small_segments_merge_and_cursors_hold_across_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path(), 600, 12);
    assert_eq!(db.log().segments().sealed.len(), 12);
    let q = Query {
        limit: 50,
        order: Order::Asc,
        ..Query::default()
    };
    let want = ids(&db, &q);
    // First page, then a merge, then the rest of the pages.
    let first = db.query(&q).unwrap();
    let report = db.compact(&CompactOptions::default(), |_| {}).unwrap();
    assert_eq!((report.segments_in, report.segments_out), (12, 1));
    assert_eq!(db.log().segments().sealed.len(), 1);
    let mut got: Vec<String> = first.events.into_iter().map(|e| e.id).collect();
    let mut q2 = q.clone();
    q2.cursor = first.next_cursor;
    while let Some(c) = q2.cursor.take() {
        q2.cursor = Some(c);
        let page = db.query(&q2).unwrap();
        got.extend(page.events.into_iter().map(|e| e.id));
        q2.cursor = page.next_cursor;
    }
    assert_eq!(got, want, "no event repeated or skipped");
}

#[test]
fn the_deletion_bound_decides_under_a_chosen_clock() {
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path(), 1000, 1);
    assert!(db.delete("e1").unwrap());
    let policy = CompactionPolicy {
        small_segment_bytes: 0,
        ..CompactionPolicy::default()
    };
    // 0.1 % deleted, deleted just now: nothing to do yet.
    let now = CompactOptions {
        policy: policy.clone(),
        now: Timestamp::now(),
        force: false,
    };
    assert_eq!(db.compact(&now, |_| {}).unwrap().segments_in, 0);
    // A day and a bit later the bound (24 h) has passed.
    let later = CompactOptions {
        now: Timestamp(Timestamp::now().as_micros() + 25 * 3600 * 1_000_000),
        ..now
    };
    let report = db.compact(&later, |_| {}).unwrap();
    assert_eq!((report.segments_in, report.events_removed), (1, 1));
    // A fraction over the threshold goes at once.
    let q = Query {
        sources: vec!["odd".into()],
        ..Query::default()
    };
    db.delete_matching(&q).unwrap();
    let report = db
        .compact(
            &CompactOptions {
                policy,
                now: Timestamp::now(),
                force: false,
            },
            |_| {},
        )
        .unwrap();
    assert_eq!(report.events_removed, 499);
}

#[test]
fn compact_now_seals_an_open_segment_with_deletions() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), config()).unwrap();
    db.append_batch((0..100).map(event).collect()).unwrap();
    assert!(db.delete("e7").unwrap());
    assert!(db.log().segments().sealed.is_empty());
    // Not due yet without --now.
    let report = db.compact(&CompactOptions::default(), |_| {}).unwrap();
    assert_eq!(report.segments_in, 0);
    assert!(db.log().segments().sealed.is_empty());
    let report = db.compact(&force(), |_| {}).unwrap();
    assert_eq!(report.events_removed, 1);
    assert_eq!(db.log().segments().total_rows(), 99);
    assert!(db.log().find("e7").unwrap().is_none(), "the bytes are gone");
}

#[test]
fn a_fully_deleted_segment_is_dropped_whole() {
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path(), 200, 2);
    let first: Vec<u64> = db.log().segments().sealed.iter().map(|s| s.id).collect();
    for i in 0..100 {
        assert!(db.delete(&format!("e{i}")).unwrap());
    }
    let no_merge = CompactOptions {
        policy: CompactionPolicy {
            small_segment_bytes: 0,
            ..CompactionPolicy::default()
        },
        ..force()
    };
    let report = db.compact(&no_merge, |_| {}).unwrap();
    assert_eq!((report.segments_in, report.segments_out), (1, 0));
    let now: Vec<u64> = db.log().segments().sealed.iter().map(|s| s.id).collect();
    assert_eq!(now, vec![first[1]]);
    assert_eq!(db.stats(&Query::default()).unwrap().total, 100);
}

#[test]
fn evdb_compact_now_on_a_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let db = store(&data, 300, 3);
        db.delete_matching(&Query {
            severity: Some(Severity::Error),
            ..Query::default()
        })
        .unwrap();
        db.close().unwrap();
    }
    let data_arg = data.to_str().unwrap();
    let out = common::evdb_ok(&["compact", "--now", "--json", "--data-dir", data_arg]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["compaction"]["events_removed"], 100);
    assert_eq!(v["compaction"]["segments_out"], 1);
    assert!(v["retention"].is_null());
    common::evdb_ok(&["verify", "--data-dir", data_arg]);
    let db = Db::open(&data, config()).unwrap();
    assert_eq!(db.stats(&Query::default()).unwrap().total, 200);
}

#[tokio::test]
async fn compact_over_http_and_grpc() {
    use evdb::api::proto::evdb::v1 as pb;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let client = reqwest::Client::new();
    {
        let mut d = common::Daemon::start_in(&data, &[]);
        let events: Vec<serde_json::Value> = (0..50)
            .map(|i| serde_json::json!({"event_id": format!("x{i}"), "source_system": "s", "event_type": "t"}))
            .collect();
        let r = client
            .post(d.url("/events/batch"))
            .json(&events)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        // A clean stop seals the segment.
        tokio::task::spawn_blocking(move || d.stop()).await.unwrap();
    }
    let mut d = common::Daemon::start_in(&data, &[]);
    let r = client.delete(d.url("/events/x3")).send().await.unwrap();
    assert!(r.status().is_success());
    let r = client
        .post(d.url("/admin/compact?now=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["compaction"]["segments_in"], 1, "{v}");
    assert_eq!(v["compaction"]["events_removed"], 1, "{v}");
    let r = client
        .post(d.url("/admin/compact?now=maybe"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("now"), "{v}");

    let r = client.delete(d.url("/events/x4")).send().await.unwrap();
    assert!(r.status().is_success());
    let mut grpc = pb::evdb_client::EvdbClient::connect(format!("http://{}", d.grpc))
        .await
        .unwrap();
    let r = grpc
        .compact(pb::CompactRequest { now: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.segments_in, r.events_removed), (1, 1));
    assert!(r.retention.is_none());
    drop(grpc);
    for id in ["x3", "x4"] {
        let r = client
            .get(d.url(&format!("/events/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }
    let r = client.get(d.url("/events/x5")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = client
        .get(d.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("evdb_compaction_events_removed_total 2"),
        "{text}"
    );
    tokio::task::spawn_blocking(move || d.stop()).await.unwrap();
}
