//! Replays the seed 002 README's curl examples verbatim (only the host is
//! the test daemon's) and checks the documented response shapes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::process::Command;

use serde_json::Value;

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    k.sort_unstable();
    k
}

#[test]
fn seed_002_curl_examples() {
    let d = common::Daemon::start();
    // The event the README's GET example names, on the day its stats
    // example asks about.
    let seeded = r#"{"event_id":"abc-123-def-456","timestamp":"2025-02-05T12:00:00Z",
        "source_system":"mahavishnu","event_type":"workflow_complete","severity":"info",
        "correlation_id":"wf-abc123","data":{"workflow_id":"abc123"},"tags":["production"]}"#;
    let out = Command::new("curl")
        .args(["-s", "-X", "POST", &d.url("/events"), "-H"])
        .args(["Content-Type: application/json", "-d", seeded])
        .output()
        .expect("curl must be installed (.ci/run installs it)");
    assert!(String::from_utf8_lossy(&out.stdout).contains("collected"));

    let text = include_str!("data/seed002_curl.txt");
    let examples: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .split("\n---\n")
        .map(|c| c.replace("http://localhost:8000", &format!("http://{}", d.http)))
        .collect();
    assert_eq!(examples.len(), 7);
    let mut answers = Vec::new();
    for cmd in &examples {
        let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
        assert!(out.status.success(), "{cmd}");
        let body: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{cmd}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
        answers.push(body);
    }
    // POST /events
    assert_eq!(keys(&answers[0]), ["event_id", "status"]);
    assert_eq!(answers[0]["status"], "collected");
    // POST /events/batch
    assert_eq!(answers[1]["collected"], 2);
    assert_eq!(answers[1]["failed"], 0);
    assert_eq!(answers[1]["status"], "batch_completed");
    // GET /events/{event_id}: exactly the README's fields.
    assert_eq!(
        keys(&answers[2]),
        [
            "correlation_id",
            "data",
            "event_id",
            "event_type",
            "severity",
            "source_system",
            "tags",
            "timestamp"
        ]
    );
    assert_eq!(answers[2]["event_id"], "abc-123-def-456");
    assert_eq!(answers[2]["data"]["workflow_id"], "abc123");
    // GET /events with the README's filters.
    let q = &answers[3];
    assert_eq!(q["count"], 3);
    assert_eq!(q["events"].as_array().unwrap().len(), 3);
    assert_eq!(q["query"]["source_system"], "mahavishnu");
    assert_eq!(q["query"]["severity"], "info");
    assert_eq!(q["query"]["limit"], 10);
    assert_eq!(q["query"]["offset"], 0);
    // GET /events/correlation/{id}: oldest first.
    let c = &answers[4];
    assert_eq!(c["correlation_id"], "wf-abc123");
    assert_eq!(c["count"], 2);
    assert_eq!(c["events"][0]["event_id"], "abc-123-def-456");
    // GET /events/stats for the README's day.
    let s = &answers[5];
    assert_eq!(s["total_events"], 1);
    assert_eq!(s["by_source_system"]["mahavishnu"], 1);
    assert_eq!(s["by_event_type"]["workflow_complete"], 1);
    assert_eq!(s["by_severity"]["info"], 1);
    assert_eq!(s["time_range"]["start"], "2025-02-05T12:00:00.000000Z");
    // GET /health: the README's fields.
    let h = &answers[6];
    assert_eq!(h["status"], "healthy");
    for k in [
        "healthy",
        "started",
        "storage_type",
        "events_processed",
        "active_websockets",
    ] {
        assert!(h["collector"].get(k).is_some(), "collector.{k}");
    }
    for k in ["status", "storage_type", "db_path", "total_events"] {
        assert!(h["storage"].get(k).is_some(), "storage.{k}");
    }
    assert_eq!(h["storage"]["total_events"], 4);
}
