//! Crash consistency: `evdb ingest` appends with acknowledgements and is
//! killed with SIGKILL at pseudo-random moments, in a bounded loop. After
//! each kill the store is reopened and checked: every acknowledged event is
//! present and byte-identical, nothing is torn or duplicated, and re-running
//! the same input stores only what is missing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use evdb::api::json;
use evdb::generator::{Generator, Rng};
use evdb::{Config, Db, Event, Timestamp};

const ROUNDS: usize = 8;
const EVENTS: usize = 20_000;

#[test]
fn sigkill_during_ingest_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let input = dir.path().join("events.ndjson");
    let events: Vec<Event> =
        Generator::new(11, Timestamp(1_700_000_000_000_000), 1000).batch(EVENTS);
    let write_ndjson = |path: &std::path::Path, events: &[Event]| {
        let mut text = String::new();
        for e in events {
            text.push_str(&json::event_to_json(e));
            text.push('\n');
        }
        std::fs::write(path, text).unwrap();
    };
    write_ndjson(&input, &events);
    let by_id: HashMap<&str, &Event> = events.iter().map(|e| (e.id.as_str(), e)).collect();
    let mut rng = Rng::new(99);
    let mut acked: HashSet<String> = HashSet::new();
    let per_round = EVENTS / ROUNDS;
    for round in 0..ROUNDS {
        // Each round sends its own slice plus the tail of the previous one,
        // so retries of possibly-stored events happen after every crash.
        let from = (round * per_round).saturating_sub(per_round / 4);
        let round_input = dir.path().join(format!("round-{round}.ndjson"));
        write_ndjson(&round_input, &events[from..(round + 1) * per_round]);
        let mut child = Command::new(env!("CARGO_BIN_EXE_evdb"))
            .args([
                "ingest",
                "--json",
                "--batch",
                "200",
                "--segment-size-bytes",
                "262144",
            ])
            .arg("--data-dir")
            .arg(&data)
            .arg("--file")
            .arg(&round_input)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut ids = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // The kill can cut the last line short: an acknowledgement
                // that was not fully printed was not received.
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    break;
                };
                for key in ["stored", "duplicates"] {
                    if let Some(list) = v.get(key).and_then(|l| l.as_array()) {
                        ids.extend(list.iter().filter_map(|x| x.as_str().map(str::to_owned)));
                    }
                }
            }
            ids
        });
        std::thread::sleep(Duration::from_millis(20 + rng.below(200)));
        // SIGKILL: no destructors, no final sync.
        let _ = child.kill();
        let _ = child.wait();
        acked.extend(reader.join().unwrap());
        eprintln!("round {round}: {} events acknowledged so far", acked.len());

        let db = Db::open(&data, Config::default()).unwrap();
        let mut seen = HashSet::new();
        for item in db.scan() {
            let (_, event) =
                item.unwrap_or_else(|e| panic!("round {round}: torn record served: {e}"));
            assert!(
                seen.insert(event.id.clone()),
                "round {round}: {} stored twice",
                event.id
            );
            assert_eq!(
                Some(&&event),
                by_id.get(event.id.as_str()),
                "round {round}: altered"
            );
        }
        for id in &acked {
            assert!(seen.contains(id), "round {round}: acknowledged {id} lost");
        }
        // The indexes rebuilt after the crash agree with the log.
        let stats = db.stats(&evdb::query::Query::default()).unwrap();
        assert_eq!(
            stats.total,
            seen.len() as u64,
            "round {round}: index and log disagree"
        );
        db.close().unwrap();
    }
    // Finish the input: exactly the missing events are stored.
    let status = Command::new(env!("CARGO_BIN_EXE_evdb"))
        .args(["ingest", "--json"])
        .arg("--data-dir")
        .arg(&data)
        .arg("--file")
        .arg(&input)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let db = Db::open(&data, Config::default()).unwrap();
    assert_eq!(db.len(), EVENTS as u64);
    let scanned: Vec<Event> = db.scan().map(|r| r.unwrap().1).collect();
    let unique: HashSet<&str> = scanned.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(unique.len(), EVENTS);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// `evdb compact --now` with retention configured is killed with SIGKILL
/// at pseudo-random moments (during retention, the rewrite, the swap or
/// the unlinks) on copies of one store. Each copy must reopen consistent:
/// every live event there, no deleted one back, expired ones either there
/// or not, nothing torn or doubled, and `evdb verify` clean.
#[test]
fn sigkill_during_retention_and_compaction_keeps_the_store_consistent() {
    const EVENTS: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let now = Timestamp::now().as_micros();
    let mut events: Vec<Event> =
        Generator::new(5, Timestamp(now - 3_600_000_000), 1000).batch(EVENTS);
    // The first 3,000 arrived long ago: retention takes them.
    for e in events.iter_mut().take(3000) {
        e.timestamp = Timestamp(1_600_000_000_000_000);
    }
    let mut config = Config::default();
    config.storage.segment_size_bytes = 128 * 1024;
    {
        let db = Db::open(&base, config.clone()).unwrap();
        for chunk in events.chunks(500) {
            db.append_batch(chunk.to_vec()).unwrap();
        }
        db.seal().unwrap();
        for e in events.iter().step_by(5) {
            db.delete(&e.id).unwrap();
        }
        db.close().unwrap();
    }
    let deleted: HashSet<&str> = events.iter().step_by(5).map(|e| e.id.as_str()).collect();
    let expired: HashSet<&str> = events[..3000].iter().map(|e| e.id.as_str()).collect();
    let live: Vec<&Event> = events
        .iter()
        .filter(|e| !deleted.contains(e.id.as_str()) && !expired.contains(e.id.as_str()))
        .collect();
    let cfg = dir.path().join("evdb.toml");
    std::fs::write(&cfg, "[retention]\nmax_age = \"365d\"\n").unwrap();
    let mut rng = Rng::new(7);
    for round in 0..6 {
        let data = dir.path().join(format!("round-{round}"));
        copy_dir(&base, &data);
        let mut child = Command::new(env!("CARGO_BIN_EXE_evdb"))
            .args(["compact", "--now", "--json", "--config"])
            .arg(&cfg)
            .arg("--data-dir")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        let _ = child.kill();
        let finished = child.wait().unwrap().success();
        eprintln!("round {round}: killed (finished first: {finished})");

        let db = Db::open(&data, config.clone()).unwrap();
        let mut seen = HashSet::new();
        for item in db.scan() {
            let (_, event) =
                item.unwrap_or_else(|e| panic!("round {round}: torn record served: {e}"));
            assert!(
                seen.insert(event.id.clone()),
                "round {round}: {} twice",
                event.id
            );
        }
        for e in &live {
            assert_eq!(
                db.get(&e.id).unwrap().as_ref(),
                Some(*e),
                "round {round}: live {} lost or altered",
                e.id
            );
        }
        for id in &deleted {
            assert!(
                db.get(id).unwrap().is_none(),
                "round {round}: deleted {id} came back"
            );
        }
        let total = db.stats(&evdb::query::Query::default()).unwrap().total;
        let expired_live = expired.iter().filter(|id| !deleted.contains(*id)).count();
        assert!(
            total >= live.len() as u64 && total <= (live.len() + expired_live) as u64,
            "round {round}: {total} visible, {} live, {expired_live} expired",
            live.len()
        );
        db.close().unwrap();
        drop(db);
        let data_arg = data.to_str().unwrap();
        common::evdb_ok(&["verify", "--data-dir", data_arg]);
        // Finishing the job leaves exactly the live events.
        let cfg_arg = cfg.to_str().unwrap();
        common::evdb_ok(&[
            "compact",
            "--now",
            "--json",
            "--config",
            cfg_arg,
            "--data-dir",
            data_arg,
        ]);
        let db = Db::open(&data, config.clone()).unwrap();
        assert_eq!(
            db.stats(&evdb::query::Query::default()).unwrap().total,
            live.len() as u64
        );
        assert_eq!(
            db.log().segments().total_rows(),
            live.len() as u64,
            "round {round}: bytes of deleted events remain"
        );
        db.close().unwrap();
        std::fs::remove_dir_all(&data).unwrap();
    }
}
