//! Snapshots under concurrent ingest, their archive, restore and verify,
//! through the real daemon and the CLI.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

fn evdb(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_evdb"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const BATCH: usize = 50;

#[tokio::test]
async fn snapshot_under_ingest_restores_exactly_the_acknowledged_prefix() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments: the snapshot spans sealed and open ones.
    let d = common::Daemon::start_in(&dir.path().join("data"), &[]);
    let client = reqwest::Client::new();
    let acked: Arc<Mutex<Vec<usize>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (client, url, acked, stop) = (
            client.clone(),
            d.url("/events/batch"),
            acked.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut k = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && k < 400 {
                let batch: Vec<Value> = (0..BATCH)
                    .map(|i| json!({"event_id": format!("b{k}-{i}"), "source_system": "s", "event_type": "t", "data": {"k": k}}))
                    .collect();
                let r = client.post(&url).json(&batch).send().await.unwrap();
                assert_eq!(r.status(), 201);
                acked.lock().unwrap().push(k);
                k += 1;
            }
        })
    };
    while acked.lock().unwrap().len() < 20 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let before: BTreeSet<usize> = acked.lock().unwrap().iter().copied().collect();
    let r = client.post(d.url("/admin/snapshots")).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let snap: Value = r.json().await.unwrap();
    let after: BTreeSet<usize> = acked.lock().unwrap().iter().copied().collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    let id = snap["id"].as_str().unwrap().to_owned();

    // Listed, downloadable as a tar, restorable by the CLI.
    let list: Value = client
        .get(d.url("/admin/snapshots"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["snapshots"][0]["id"], id.as_str());
    assert_eq!(list["snapshots"][0]["events"], snap["events"]);
    let r = client
        .get(d.url(&format!("/admin/snapshots/{id}/archive")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-tar");
    let tar_path = dir.path().join("snap.tar");
    std::fs::write(&tar_path, r.bytes().await.unwrap()).unwrap();
    let restored = dir.path().join("restored");
    let (ok, out, err) = evdb(&[
        "restore",
        "--from",
        tar_path.to_str().unwrap(),
        "--data-dir",
        restored.to_str().unwrap(),
    ]);
    assert!(ok, "{out}{err}");
    let (ok, out, _) = evdb(&["verify", "--data-dir", restored.to_str().unwrap()]);
    assert!(ok, "{out}");

    // Exactly whole batches, every one acknowledged before the cut, none
    // that was not yet sent.
    let r2 = common::Daemon::start_in(&restored, &[]);
    let mut ids = Vec::new();
    let mut cursor = String::new();
    loop {
        let url = r2.url(&format!(
            "/events?limit=1000&sort_order=asc&cursor={cursor}"
        ));
        let page: Value = client.get(url).send().await.unwrap().json().await.unwrap();
        for e in page["events"].as_array().unwrap() {
            ids.push(e["event_id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_owned(),
            None => break,
        }
    }
    let mut per_batch = std::collections::BTreeMap::<usize, usize>::new();
    for id in &ids {
        let k: usize = id[1..].split('-').next().unwrap().parse().unwrap();
        *per_batch.entry(k).or_default() += 1;
    }
    for (k, n) in &per_batch {
        assert_eq!(*n, BATCH, "batch {k} is partial in the snapshot");
    }
    let got: BTreeSet<usize> = per_batch.keys().copied().collect();
    assert!(before.is_subset(&got), "an acknowledged batch is missing");
    let max_after = after.iter().max().copied().unwrap_or(0);
    assert!(
        got.iter().all(|k| *k <= max_after + 1),
        "a batch from after the cut"
    );
    assert_eq!(snap["events"], ids.len());

    // A restore refuses a non-empty target; delete works once.
    let (ok, _, err) = evdb(&[
        "restore",
        "--from",
        tar_path.to_str().unwrap(),
        "--data-dir",
        restored.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("not empty"), "{err}");
    let r = client
        .delete(d.url(&format!("/admin/snapshots/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .delete(d.url(&format!("/admin/snapshots/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[test]
fn cli_snapshots_and_verify_finds_a_flipped_byte() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let input = dir.path().join("in.ndjson");
    let mut text = String::new();
    for i in 0..3000 {
        text.push_str(&format!(
            "{{\"event_id\":\"v{i}\",\"source_system\":\"s\",\"event_type\":\"t\",\"data\":{{\"n\":{i}}}}}\n"
        ));
    }
    std::fs::write(&input, text).unwrap();
    let d = data.to_str().unwrap();
    let (ok, _, err) = evdb(&[
        "ingest",
        "--data-dir",
        d,
        "--file",
        input.to_str().unwrap(),
        "--segment-size-bytes",
        "100000",
    ]);
    assert!(ok, "{err}");
    let (ok, out, _) = evdb(&["snapshot", "create", "--data-dir", d, "--json"]);
    assert!(ok);
    let snap: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(snap["events"], 3000);
    let (ok, out, _) = evdb(&["snapshot", "list", "--data-dir", d]);
    assert!(ok && out.contains(snap["id"].as_str().unwrap()));
    let restored = dir.path().join("r");
    let (ok, out, err) = evdb(&[
        "restore",
        "--from",
        snap["path"].as_str().unwrap(),
        "--data-dir",
        restored.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("restored 3000 events"), "{out}");
    let (ok, out, _) = evdb(&["verify", "--data-dir", restored.to_str().unwrap()]);
    assert!(ok, "{out}");
    // Flip one byte inside the sealed segment's blocks, and one in its
    // text filter (the last signature byte: before the 16-byte trailer and
    // the 64-byte footer).
    let seg = std::fs::read_dir(restored.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x55;
    let at = bytes.len() - (64 + 16 + 1);
    bytes[at] ^= 0x55;
    std::fs::write(&seg, bytes).unwrap();
    let (ok, out, _) = evdb(&["verify", "--data-dir", restored.to_str().unwrap()]);
    assert!(!ok, "{out}");
    let seg_name = seg.file_name().unwrap().to_str().unwrap();
    assert!(out.contains(seg_name) && out.contains("offset"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains(seg_name) && l.contains("text filter")),
        "{out}"
    );
    let (ok, _, _) = evdb(&[
        "snapshot",
        "delete",
        snap["id"].as_str().unwrap(),
        "--data-dir",
        d,
    ]);
    assert!(ok);
    let (ok, _, err) = evdb(&[
        "snapshot",
        "delete",
        snap["id"].as_str().unwrap(),
        "--data-dir",
        d,
    ]);
    assert!(!ok && err.contains("no snapshot"), "{err}");
}
