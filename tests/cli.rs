//! The command line: `ingest`, `query` (with cursor paging), `stats` and
//! `aggregate` against a data directory and against a running daemon
//! (`--url`), through the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::process::Command;

fn evdb(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_evdb"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// The `event_id`s of `evdb query` output lines (the `next_cursor` line
/// skipped).
fn ids_of(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["event_id"].as_str().map(str::to_owned)
        })
        .collect()
}

/// Every `event_id` of `evdb query TARGET --limit 10 --sort-order asc`,
/// page after page through `--cursor`.
fn page_all(target: [&str; 2]) -> Vec<String> {
    let mut cursor: Option<String> = None;
    let mut seen = Vec::new();
    for _ in 0..10 {
        let mut args = vec!["query", target[0], target[1]];
        args.extend(["--limit", "10", "--sort-order", "asc"]);
        if let Some(c) = &cursor {
            args.extend(["--cursor", c.as_str()]);
        }
        let (ok, out, err) = evdb(&args);
        assert!(ok, "{err}");
        seen.extend(ids_of(&out));
        cursor = out.lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["next_cursor"].as_str().map(str::to_owned)
        });
        if cursor.is_none() {
            break;
        }
    }
    seen
}

#[test]
fn ingest_query_page_and_stats() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let input = dir.path().join("in.ndjson");
    let mut text = String::new();
    for i in 0..25 {
        let sev = if i % 5 == 0 { "error" } else { "info" };
        text.push_str(&format!(
            r#"{{"event_id":"e{i}","source_system":"{}","event_type":"t","severity":"{sev}","timestamp":"2024-01-01T00:00:{i:02}Z","tags":["x"],"data":{{"n":{i}}}}}"#,
            if i % 2 == 0 { "even" } else { "odd" }
        ));
        text.push('\n');
    }
    text.push_str("{\"event_type\":\"missing source\"}\n");
    std::fs::write(&input, text).unwrap();
    let (ok, out, err) = evdb(&[
        "ingest",
        "--data-dir",
        data,
        "--file",
        input.to_str().unwrap(),
    ]);
    assert!(!ok, "a refused line makes ingest exit non-zero");
    assert!(out.contains("stored 25, duplicates 0, failed 1"), "{out}");
    assert!(err.contains("line 26: source_system"), "{err}");

    let (ok, out, _) = evdb(&[
        "query",
        "--data-dir",
        data,
        "--source-system",
        "even",
        "--min-severity",
        "error",
    ]);
    assert!(ok);
    assert_eq!(ids_of(&out), ["e20", "e10", "e0"]);

    let want: Vec<String> = (0..25).map(|i| format!("e{i}")).collect();
    assert_eq!(page_all(["--data-dir", data]), want);

    let (ok, out, _) = evdb(&[
        "stats",
        "--data-dir",
        data,
        "--tags",
        "x",
        "--distinct-correlation-ids",
    ]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["total_events"], 25);
    assert_eq!(v["by_source_system"]["even"], 13);
    assert_eq!(v["by_severity"]["error"], 5);
    assert_eq!(v["time_range"]["start"], "2024-01-01T00:00:00.000000Z");
    assert_eq!(v["distinct_correlation_ids"], 0);

    let (ok, _, err) = evdb(&["query", "--data-dir", data, "--limit", "0"]);
    assert!(!ok);
    assert!(err.contains("limit"), "{err}");
    let (ok, _, err) = evdb(&["query", "--data-dir", data, "--cursor", "garbage"]);
    assert!(!ok);
    assert!(err.contains("cursor"), "{err}");
}

#[test]
fn version_names_the_build() {
    let (ok, out, _) = evdb(&["--version"]);
    assert!(ok);
    assert!(
        out.starts_with(&format!("evdb {}", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
    assert!(
        out.contains("commit ") && out.contains("profile") && out.contains("rustc"),
        "{out}"
    );
}

#[test]
fn aggregate_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let input = dir.path().join("in.ndjson");
    let mut text = String::new();
    for i in 0..20 {
        text.push_str(&format!(
            r#"{{"source_system":"{}","event_type":"t","severity":"{}","data":{{"latency_ms":{i}}}}}"#,
            if i % 2 == 0 { "even" } else { "odd" },
            if i % 4 == 0 { "error" } else { "info" },
        ));
        text.push('\n');
    }
    std::fs::write(&input, text).unwrap();
    let (ok, _, err) = evdb(&[
        "ingest",
        "--data-dir",
        data,
        "--file",
        input.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = evdb(&[
        "aggregate",
        "--data-dir",
        data,
        "--group-by",
        "source_system",
        "--metrics",
        "count,error_rate,max(/latency_ms)",
        "--numeric-field",
        "/latency_ms",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["groups"][0]["key"]["source_system"], "even");
    assert_eq!(v["groups"][0]["values"]["count"], 10);
    assert_eq!(v["groups"][0]["values"]["error_rate"], 0.5);
    assert_eq!(v["groups"][1]["values"]["max(/latency_ms)"], 19.0);
    assert_eq!(v["value_path"], "columns");
    let (ok, _, err) = evdb(&["aggregate", "--data-dir", data, "--metrics", "median(/x)"]);
    assert!(!ok);
    assert!(err.contains("metrics"), "{err}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready.json");
    let child = Command::new(env!("CARGO_BIN_EXE_evdb"))
        .args(["--log-format", "json", "serve", "--ephemeral"])
        .args([
            "--http",
            "127.0.0.1:0",
            "--grpc",
            "127.0.0.1:0",
            "--ready-file",
        ])
        .arg(&ready)
        .env("EVDB_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..1500 {
        if ready.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(ready.exists(), "daemon not ready");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with('{')).collect();
    assert!(!lines.is_empty(), "no JSON log line in {err}");
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
}

#[test]
fn ingest_query_stats_and_aggregate_through_a_running_daemon() {
    let d = common::Daemon::start();
    let url = format!("http://{}", d.http);
    let url = url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.ndjson");
    let mut text = String::new();
    for i in 0..25 {
        let sev = if i % 5 == 0 { "error" } else { "info" };
        text.push_str(&format!(
            r#"{{"event_id":"r{i}","source_system":"{}","event_type":"t","severity":"{sev}","timestamp":"2024-01-01T00:00:{i:02}Z","tags":["x y"],"data":{{"latency_ms":{i}}}}}"#,
            if i % 2 == 0 { "even" } else { "odd" }
        ));
        text.push('\n');
        if i == 10 {
            text.push('\n');
        }
    }
    text.push_str("{\"event_type\":\"missing source\"}\n");
    std::fs::write(&input, &text).unwrap();
    let file = input.to_str().unwrap();
    // Bodies of 7 lines: four requests; line numbers count the blank line.
    let (ok, out, err) = evdb(&["ingest", "--url", url, "--file", file, "--batch", "7"]);
    assert!(!ok, "a refused line makes ingest exit non-zero");
    assert!(
        out.contains("stored 25, duplicates 0, failed 1"),
        "{out}{err}"
    );
    assert!(err.contains("line 27: source_system"), "{err}");
    let (_, out, err) = evdb(&[
        "ingest", "--url", url, "--file", file, "--batch", "10", "--json",
    ]);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "three bodies and the summary: {out}{err}");
    assert_eq!(lines[0]["duplicates"], 10);
    assert_eq!(lines[2]["errors"][0]["line"], 27);
    assert_eq!(lines[2]["errors"][0]["field"], "source_system");
    assert_eq!(lines[3]["summary"]["duplicates"], 25);
    assert_eq!(lines[3]["summary"]["failed"], 1);

    // The daemon holds the directory: the local form says what to do.
    let data = d.data_dir.to_str().unwrap();
    let (ok, _, err) = evdb(&["query", "--data-dir", data]);
    assert!(!ok);
    assert!(err.contains("in use") && err.contains("--url"), "{err}");

    let (ok, out, err) = evdb(&[
        "query",
        "--url",
        url,
        "--source-system",
        "even",
        "--min-severity",
        "error",
        "--tags",
        "x y",
    ]);
    assert!(ok, "{err}");
    assert_eq!(ids_of(&out), ["r20", "r10", "r0"]);
    // Each event as the daemon wrote it: the contract's field order.
    assert!(
        out.starts_with("{\"event_id\":\"r20\",\"timestamp\""),
        "{out}"
    );
    let want: Vec<String> = (0..25).map(|i| format!("r{i}")).collect();
    assert_eq!(page_all(["--url", url]), want);

    let (ok, out, err) = evdb(&[
        "stats",
        "--url",
        url,
        "--start-time",
        "2024-01-01T00:00:10Z",
        "--distinct-correlation-ids",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["total_events"], 15);
    assert_eq!(v["by_severity"]["error"], 3);
    assert_eq!(v["distinct_correlation_ids"], 0);

    let (ok, out, err) = evdb(&[
        "aggregate",
        "--url",
        url,
        "--group-by",
        "source_system",
        "--metrics",
        "count,error_rate",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["groups"][0]["key"]["source_system"], "even");
    assert_eq!(v["groups"][0]["values"]["count"], 13);

    // The daemon's refusals come back as one line naming the field.
    let (ok, _, err) = evdb(&["query", "--url", url, "--limit", "0"]);
    assert!(!ok);
    assert!(err.contains("400") && err.contains("limit"), "{err}");
    let (ok, _, err) = evdb(&["stats", "--url", "localhost:1"]);
    assert!(!ok);
    assert!(err.contains("http://HOST:PORT"), "{err}");
}

/// A line that is not UTF-8 (or ends in `\r\n`) is one line, locally and
/// through a daemon: the lines around it are stored.
#[test]
fn a_line_that_is_not_utf8_is_refused_alone() {
    let d = common::Daemon::start();
    let url = format!("http://{}", d.http);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.ndjson");
    let mut bytes = Vec::new();
    bytes.extend_from_slice(
        b"{\"event_id\":\"u1\",\"source_system\":\"a\",\"event_type\":\"t\"}\r\n",
    );
    bytes.extend_from_slice(b"{\"source_system\":\"\xff\",\"event_type\":\"t\"}\n");
    bytes.extend_from_slice(b"{\"event_id\":\"u3\",\"source_system\":\"b\",\"event_type\":\"t\"}");
    std::fs::write(&input, bytes).unwrap();
    let file = input.to_str().unwrap();
    let data = dir.path().join("data");
    for target in [["--data-dir", data.to_str().unwrap()], ["--url", &url]] {
        let mut args = vec!["ingest", "--file", file];
        args.extend(target);
        let (ok, out, err) = evdb(&args);
        assert!(!ok, "{target:?}");
        assert!(
            out.contains("stored 2, duplicates 0, failed 1"),
            "{target:?}: {out}{err}"
        );
        assert!(
            err.contains("line 2: event: not UTF-8"),
            "{target:?}: {err}"
        );
    }
}

/// Commands that read or maintain a store refuse a path that holds none,
/// instead of creating an empty store there and reporting on it.
#[test]
fn a_missing_store_is_an_error_not_an_empty_one() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo");
    let missing = missing.to_str().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let empty = empty.to_str().unwrap();
    for cmd in [
        &["verify"][..],
        &["query"],
        &["stats"],
        &["aggregate"],
        &["compact"],
        &["snapshot", "list"],
        &["snapshot", "create"],
    ] {
        for (path, why) in [
            (missing, "does not exist"),
            (empty, "holds no catalog.redb"),
        ] {
            let mut args = cmd.to_vec();
            args.extend(["--data-dir", path]);
            let (ok, _, err) = evdb(&args);
            assert!(!ok, "{args:?}");
            assert!(
                err.contains("not an evdb data directory") && err.contains(why),
                "{args:?}: {err}"
            );
        }
        assert!(
            !std::path::Path::new(missing).exists(),
            "{cmd:?} created the store"
        );
    }
    // `ingest` creates the store it is pointed at.
    let input = dir.path().join("one.ndjson");
    std::fs::write(&input, "{\"source_system\":\"a\",\"event_type\":\"t\"}\n").unwrap();
    let (ok, _, err) = evdb(&[
        "ingest",
        "--data-dir",
        missing,
        "--file",
        input.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = evdb(&["verify", "--data-dir", missing]);
    assert!(ok, "{out}{err}");
}

/// An error is one line that quotes each cause once.
#[test]
fn errors_quote_their_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, "x").unwrap();
    let under_file = file.join("data");
    let (ok, _, err) = evdb(&["stats", "--data-dir", under_file.to_str().unwrap()]);
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "{err}");
    let input = dir.path().join("none.ndjson");
    let (ok, _, err) = evdb(&[
        "ingest",
        "--data-dir",
        under_file.to_str().unwrap(),
        "--file",
        input.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    std::fs::write(&input, "").unwrap();
    let (ok, _, err) = evdb(&[
        "ingest",
        "--data-dir",
        under_file.to_str().unwrap(),
        "--file",
        input.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert_eq!(err.matches("Not a directory").count(), 1, "{err}");
}
