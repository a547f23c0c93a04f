//! The HTTP surface of contract §3 against the real daemon: every route,
//! every filter, the error cases, gzip, the live tail, Chaukas protobuf
//! ingest, shutdown draining and start-up failures.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::io::Write;
use std::time::Duration;

use common::Daemon;
use futures_util::{SinkExt, StreamExt};
use prost::Message;
use serde_json::{Value, json};

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_gzip().build().unwrap()
}

async fn post_json(d: &Daemon, path: &str, body: &Value) -> (u16, Value) {
    let r = client().post(d.url(path)).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

async fn post_raw(d: &Daemon, path: &str, ctype: &str, body: Vec<u8>) -> (u16, Value) {
    let r = client()
        .post(d.url(path))
        .header("content-type", ctype)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let bytes = r.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn get(d: &Daemon, path: &str) -> (u16, Value) {
    let r = client().get(d.url(path)).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// Every event id `GET {first}` finds, page after page through the cursor.
async fn every_id(d: &Daemon, first: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let mut path = first.to_owned();
    loop {
        let (s, body) = get(d, &path).await;
        assert_eq!(s, 200);
        seen.extend(ids(&body));
        match body["next_cursor"].as_str() {
            Some(c) => path = format!("{first}&cursor={c}"),
            None => return seen,
        }
    }
}

fn ids(v: &Value) -> Vec<String> {
    v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect()
}

/// 40 events: e0..e39, one second apart from 2025-02-05T12:00:00Z.
fn fixture() -> Vec<Value> {
    (0..40)
        .map(|i| {
            let source = ["mahavishnu", "crackerjack", "akosha"][i % 3];
            let severity = ["debug", "info", "warning", "error", "critical"][i % 5];
            let mut tags = vec!["all".to_owned()];
            if i % 2 == 0 {
                tags.push("even".into());
            }
            if i % 4 == 0 {
                tags.push("four".into());
            }
            json!({
                "event_id": format!("e{i}"),
                "timestamp": format!("2025-02-05T12:00:{i:02}Z"),
                "source_system": source,
                "event_type": if i < 20 { "start" } else { "end" },
                "severity": severity,
                "correlation_id": format!("wf-{}", i % 7),
                "data": {"n": i, "note": if i == 13 { "needle here" } else { "hay" }},
                "tags": tags,
            })
        })
        .collect()
}

#[tokio::test]
async fn routes_filters_and_paging() {
    let d = Daemon::start();
    let events = fixture();
    let (status, body) = post_json(&d, "/events/batch", &Value::from(events.clone())).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["collected"], 40);
    assert_eq!(body["failed"], 0);
    assert_eq!(body["status"], "batch_completed");

    // Get one; unknown is 404 with the error shape.
    let (s, e) = get(&d, "/events/e7").await;
    assert_eq!(s, 200);
    assert_eq!(e["source_system"], "crackerjack");
    assert_eq!(e["timestamp"], "2025-02-05T12:00:07.000000Z");
    assert_eq!(e["data"]["n"], 7);
    let (s, e) = get(&d, "/events/nope").await;
    assert_eq!(s, 404);
    assert!(e["error"].as_str().unwrap().contains("nope"));

    // Each filter, checked against the fixture.
    let model = |f: &dyn Fn(usize) -> bool| -> Vec<String> {
        (0..40)
            .rev()
            .filter(|i| f(*i))
            .map(|i| format!("e{i}"))
            .collect()
    };
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("source_system=akosha", model(&|i| i % 3 == 2)),
        (
            "source_system=akosha&source_system=mahavishnu",
            model(&|i| i % 3 != 1),
        ),
        ("event_type=end", model(&|i| i >= 20)),
        ("severity=error", model(&|i| i % 5 == 3)),
        ("min_severity=error", model(&|i| i % 5 >= 3)),
        ("correlation_id=wf-3", model(&|i| i % 7 == 3)),
        ("tags=even,four", model(&|i| i % 4 == 0)),
        ("tags=even&tags=four", model(&|i| i % 4 == 0)),
        (
            "start_time=2025-02-05T12:00:10Z&end_time=2025-02-05T12:00:12Z",
            model(&|i| (10..=12).contains(&i)),
        ),
        ("text=needle", model(&|i| i == 13)),
        (
            "source_system=mahavishnu&min_severity=warning&tags=even",
            model(&|i| i % 3 == 0 && i % 5 >= 2 && i % 2 == 0),
        ),
    ];
    for (q, want) in cases {
        let (s, body) = get(&d, &format!("/events?{q}&limit=1000")).await;
        assert_eq!(s, 200, "{q}: {body}");
        assert_eq!(ids(&body), want, "{q}");
        assert_eq!(body["count"], want.len(), "{q}");
    }
    // Echo, limit, offset, order.
    let (_, body) = get(
        &d,
        "/events?source_system=mahavishnu&severity=info&limit=10",
    )
    .await;
    assert_eq!(body["query"]["source_system"], "mahavishnu");
    assert_eq!(body["query"]["severity"], "info");
    assert_eq!(body["query"]["limit"], 10);
    assert_eq!(body["query"]["offset"], 0);
    let (_, body) = get(&d, "/events?sort_order=asc&limit=3&offset=2").await;
    assert_eq!(ids(&body), ["e2", "e3", "e4"]);
    // Cursor paging returns everything once.
    assert_eq!(every_id(&d, "/events?limit=7").await, model(&|_| true));

    // Correlation: oldest first.
    let (s, body) = get(&d, "/events/correlation/wf-2").await;
    assert_eq!(s, 200);
    assert_eq!(body["correlation_id"], "wf-2");
    assert_eq!(ids(&body), ["e2", "e9", "e16", "e23", "e30", "e37"]);
    assert_eq!(body["count"], 6);

    // Stats with filters.
    let (s, st) = get(&d, "/events/stats?event_type=start").await;
    assert_eq!(s, 200);
    assert_eq!(st["total_events"], 20);
    assert_eq!(st["by_event_type"]["start"], 20);
    assert_eq!(st["by_source_system"]["mahavishnu"], 7);
    assert_eq!(st["by_severity"]["debug"], 4);
    assert_eq!(st["time_range"]["start"], "2025-02-05T12:00:00.000000Z");
    assert_eq!(st["time_range"]["end"], "2025-02-05T12:00:19.000000Z");

    // Deletes.
    let r = client().delete(d.url("/events/e0")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"deleted": 1}));
    let r = client().delete(d.url("/events/e0")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(get(&d, "/events/e0").await.0, 404);
    let r = client()
        .delete(d.url("/events?before=2025-02-05T12:00:10Z"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"deleted": 9}));
    let (_, st) = get(&d, "/events/stats").await;
    assert_eq!(st["total_events"], 30);
    let (_, body) = get(&d, "/events?sort_order=asc&limit=1").await;
    assert_eq!(ids(&body), ["e10"]);
    let r = client().delete(d.url("/events")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    // A delete by query: akosha among e10..e39 (i % 3 == 2): 10 events.
    let r = client()
        .delete(d.url("/events?source_system=akosha&min_severity=debug"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"deleted": 10}));
    let (_, st) = get(&d, "/events/stats").await;
    assert_eq!(st["total_events"], 20);
    assert!(st["by_source_system"].get("akosha").is_none());
    let r = client()
        .delete(d.url("/events?source_system=akosha&limit=5"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Health and metrics.
    let (s, h) = get(&d, "/health").await;
    assert_eq!(s, 200);
    assert_eq!(h["status"], "healthy");
    assert_eq!(h["storage"]["total_events"], 40);
    let text = client()
        .get(d.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("evdb_events_ingested_total{source=\"akosha\"} 13"),
        "{text}"
    );
    assert!(text.contains(
        "evdb_request_duration_seconds_count{protocol=\"http\",method=\"GET\",route=\"/events\""
    ));
    assert!(text.contains("evdb_fsync_duration_seconds_count"));
}

#[tokio::test]
async fn single_events_duplicates_and_errors() {
    let d = Daemon::start();
    let ev = json!({"event_id": "x1", "source_system": "s", "event_type": "t", "severity": "WARN"});
    let (s, b) = post_json(&d, "/events", &ev).await;
    assert_eq!(
        (s, &b),
        (201, &json!({"event_id": "x1", "status": "collected"}))
    );
    let (s, b) = post_json(&d, "/events", &ev).await;
    assert_eq!(
        (s, &b),
        (200, &json!({"event_id": "x1", "status": "duplicate"}))
    );
    let (_, e) = get(&d, "/events/x1").await;
    assert_eq!(e["severity"], "warning");
    // Generated ids are UUIDv7.
    let (s, b) = post_json(
        &d,
        "/events",
        &json!({"source_system": "s", "event_type": "t"}),
    )
    .await;
    assert_eq!(s, 201);
    assert_eq!(b["event_id"].as_str().unwrap().len(), 36);

    let bad: Vec<(&str, &[u8], u16, &str)> = vec![
        ("application/json", b"{", 400, "event"),
        ("application/json", b"[1]", 400, "event"),
        (
            "application/json",
            br#"{"source_system":1,"event_type":"t"}"#,
            400,
            "source_system",
        ),
        (
            "application/json",
            br#"{"event_type":"t"}"#,
            400,
            "source_system",
        ),
        (
            "application/json",
            br#"{"source_system":"s","event_type":"t","severity":"loud"}"#,
            400,
            "severity",
        ),
        (
            "application/json",
            br#"{"source_system":"s","event_type":"t","timestamp":"noon"}"#,
            400,
            "timestamp",
        ),
        (
            "application/json",
            br#"{"source_system":"s","event_type":"t","tags":"x"}"#,
            400,
            "tags",
        ),
        (
            "application/json",
            br#"{"source_system":"s","event_type":"t","data":[]}"#,
            400,
            "data",
        ),
        (
            "application/json",
            b"{\"source_system\":\"\xff\",\"event_type\":\"t\"}",
            400,
            "body",
        ),
        ("text/plain", b"{}", 415, ""),
    ];
    for (ctype, body, status, field) in bad {
        let (s, b) = post_raw(&d, "/events", ctype, body.to_vec()).await;
        assert_eq!(s, status, "{}: {b}", String::from_utf8_lossy(body));
        assert!(b["error"].is_string(), "{b}");
        if !field.is_empty() {
            assert_eq!(b["field"], field, "{}: {b}", String::from_utf8_lossy(body));
        }
    }
    // Oversize: an event over 1 MiB.
    let big =
        json!({"source_system": "s", "event_type": "t", "data": {"x": "a".repeat(1_100_000)}});
    let (s, b) = post_json(&d, "/events", &big).await;
    assert_eq!(s, 413, "{b}");
    // Query errors name the parameter.
    for (q, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("offset=-1", "offset"),
        ("severity=loud", "severity"),
        ("start_time=x", "start_time"),
        ("cursor=abc", "cursor"),
        ("sort_order=sideways", "sort_order"),
        ("colour=red", "colour"),
    ] {
        let (s, b) = get(&d, &format!("/events?{q}")).await;
        assert_eq!(s, 400, "{q}");
        assert_eq!(b["field"], field, "{q}");
        // A known parameter's message names it once, first.
        let error = b["error"].as_str().unwrap_or_default();
        if field != "colour" {
            assert!(error.starts_with(&format!("{field}: ")), "{q}: {error}");
            assert_eq!(
                error.matches(&format!("{field}:")).count(),
                1,
                "{q}: {error}"
            );
        }
    }
    let (s, b) = get(&d, "/nowhere").await;
    assert_eq!(s, 404, "{b}");
    // What the extractors refuse also gets the JSON error body.
    let (s, b) = get(&d, "/events/%ff").await;
    assert_eq!((s, b["field"].as_str()), (400, Some("event_id")), "{b}");
    let (s, b) = get(&d, "/events/stream?severity=error").await;
    assert_eq!(s, 400, "{b}");
    assert!(b["error"].as_str().unwrap().contains("upgrade"), "{b}");
    // Nothing was half-stored.
    let (_, st) = get(&d, "/events/stats").await;
    assert_eq!(st["total_events"], 2);
}

#[tokio::test]
async fn batch_shapes_limits_gzip_and_ndjson() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("evdb.toml");
    std::fs::write(
        &config,
        "[limits]\nbatch_events_max = 5\nbatch_size_max = 4096\nevent_size_max = 1024\n",
    )
    .unwrap();
    let d = Daemon::start_in(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let ev =
        |i: usize| json!({"event_id": format!("b{i}"), "source_system": "s", "event_type": "t"});
    // Wrapped form; a bad entry never stops the good ones.
    let body = json!({"events": [ev(0), {"source_system": "s"}, ev(1), ev(0)]});
    let (s, b) = post_json(&d, "/events/batch", &body).await;
    assert_eq!(s, 201);
    assert_eq!(b["collected"], 2);
    assert_eq!(b["failed"], 1);
    assert_eq!(b["duplicates"], 1);
    assert_eq!(b["errors"][0]["index"], 1);
    assert_eq!(b["errors"][0]["field"], "event_type");
    // Too many events, too many bytes, an oversize event.
    let six: Vec<Value> = (10..16).map(ev).collect();
    let (s, b) = post_json(&d, "/events/batch", &Value::from(six)).await;
    assert_eq!((s, b["field"].as_str()), (413, Some("events")));
    let (s, _) = post_raw(&d, "/events/batch", "application/json", vec![b' '; 5000]).await;
    assert_eq!(s, 413);
    let fat = json!([{"source_system": "s", "event_type": "t", "data": {"x": "a".repeat(2000)}}]);
    let (s, b) = post_json(&d, "/events/batch", &fat).await;
    assert_eq!((s, &b["failed"]), (201, &json!(1)), "{b}");
    let (s, b) = post_raw(&d, "/events/batch", "application/json", b"42".to_vec()).await;
    assert_eq!((s, b["field"].as_str()), (400, Some("body")));

    // gzip request body.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(
        serde_json::to_vec(&json!([ev(20), ev(21)]))
            .unwrap()
            .as_slice(),
    )
    .unwrap();
    let gz = gz.finish().unwrap();
    let r = client()
        .post(d.url("/events/batch"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(gz.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.json::<Value>().await.unwrap()["collected"], 2);
    // The name in any case; any other encoding is a 415 naming the header.
    for (encoding, status) in [("GZip", 201), ("br", 415), ("gzip, gzip", 415)] {
        let r = client()
            .post(d.url("/events/batch"))
            .header("content-type", "application/json")
            .header("content-encoding", encoding)
            .body(gz.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{encoding}");
        let b: Value = r.json().await.unwrap();
        if status == 415 {
            assert_eq!(b["field"], "content-encoding", "{encoding}");
        } else {
            assert_eq!(b["duplicates"], 2, "{encoding}");
        }
    }
    // A compressed answer when asked.
    let r = client()
        .get(d.url("/events?limit=100"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-encoding"], "gzip");

    // NDJSON streams past the batch limits: 12 events in chunks, a blank
    // line, a bad line and a line past the size limit reported by index.
    let mut text = String::new();
    for i in 30..42 {
        text.push_str(&ev(i).to_string());
        text.push('\n');
        if i == 33 {
            text.push_str("\n{\"source_system\":\"s\"}\n");
            text.push_str(&format!(
                "{{\"source_system\":\"s\",\"event_type\":\"{}\"}}\n",
                "x".repeat(3000)
            ));
        }
    }
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        text.as_bytes().chunks(37).map(|c| Ok(c.to_vec())).collect();
    let r = client()
        .post(d.url("/events/batch"))
        .header("content-type", "application/x-ndjson")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["collected"], 12, "{b}");
    assert_eq!(b["failed"], 2, "{b}");
    assert_eq!(b["errors"][0]["index"], 4);
    assert_eq!(b["errors"][1]["index"], 5);
    let (_, st) = get(&d, "/events/stats").await;
    assert_eq!(st["total_events"], 2 + 2 + 12);
}

#[tokio::test]
async fn chaukas_protobuf_ingest_keeps_the_event() {
    use evdb::api::proto::chaukas::common::v1 as pb;
    use evdb::api::proto::chaukas::server::v1 as server;
    let d = Daemon::start();
    let event = |id: &str| pb::Event {
        event_id: id.into(),
        tenant_id: "t1".into(),
        project_id: "p1".into(),
        session_id: "sess-1".into(),
        r#type: pb::EventType::AgentStart as i32,
        severity: pb::Severity::Error as i32,
        timestamp: Some(prost_types::Timestamp {
            seconds: 1_738_756_800,
            nanos: 0,
        }),
        agent_name: "planner".into(),
        ..pb::Event::default()
    };
    let one = server::IngestEventRequest {
        event: Some(event("c1")),
    };
    let r = client()
        .post(d.url("/events"))
        .header("content-type", "application/x-protobuf")
        .header("authorization", "Bearer anything")
        .body(one.encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let answer = server::IngestEventResponse::decode(r.bytes().await.unwrap()).unwrap();
    assert_eq!(answer.event_id, "c1");
    let batch = server::IngestEventBatchRequest {
        event_batch: Some(pb::EventBatch {
            batch_id: "bt".into(),
            events: vec![event("c2"), event("c3")],
            ..pb::EventBatch::default()
        }),
    };
    let r = client()
        .post(d.url("/events/batch"))
        .header("content-type", "application/x-protobuf")
        .body(batch.encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let answer = server::IngestEventBatchResponse::decode(r.bytes().await.unwrap()).unwrap();
    assert_eq!((answer.batch_id.as_str(), answer.accepted_count), ("bt", 2));
    let (s, body) = get(
        &d,
        "/events?source_system=chaukas&tags=tenant:t1&sort_order=asc",
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(ids(&body), ["c1", "c2", "c3"]);
    let e = &body["events"][0];
    assert_eq!(e["event_type"], "agent_start");
    assert_eq!(e["severity"], "error");
    assert_eq!(e["correlation_id"], "sess-1");
    assert_eq!(e["data"]["agent_name"], "planner");
    assert_eq!(e["timestamp"], "2025-02-05T12:00:00.000000Z");
    let (s, _) = post_raw(
        &d,
        "/events",
        "application/x-protobuf",
        vec![0x0a, 0x09, 0x01],
    )
    .await;
    assert_eq!(s, 400);
}

#[tokio::test]
async fn live_tail_delivers_matching_events_in_order() {
    let d = Daemon::start();
    let url = format!(
        "ws://{}/events/stream?source_system=a&severity=warning",
        d.http
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut batch = Vec::new();
    for i in 0..30 {
        batch.push(json!({
            "event_id": format!("w{i}"),
            "source_system": if i % 2 == 0 { "a" } else { "b" },
            "event_type": "t",
            "severity": if i % 3 == 0 { "error" } else { "info" },
        }));
    }
    // Concurrent writers: order must still be arrival order.
    let (first, second) = (
        Value::from(batch[..15].to_vec()),
        Value::from(batch[15..].to_vec()),
    );
    let (a, b) = tokio::join!(
        post_json(&d, "/events/batch", &first),
        post_json(&d, "/events/batch", &second),
    );
    assert_eq!((a.0, b.0), (201, 201));
    let want: Vec<String> = (0..30)
        .filter(|i| i % 2 == 0 && i % 3 == 0)
        .map(|i| format!("w{i}"))
        .collect();
    let mut got = Vec::new();
    while got.len() < want.len() {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
        got.push(v["event_id"].as_str().unwrap().to_owned());
    }
    got.sort_by_key(|id| id[1..].parse::<u32>().unwrap());
    assert_eq!(got, want);
    // Bad filters are refused before the upgrade.
    let bad = format!("ws://{}/events/stream?severity=loud", d.http);
    assert!(tokio_tungstenite::connect_async(bad).await.is_err());
    let (_, h) = get(&d, "/health").await;
    assert_eq!(h["collector"]["active_websockets"], 1);
    ws.send(tokio_tungstenite::tungstenite::Message::Close(None))
        .await
        .unwrap();
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests_and_ends_tails() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut d = Daemon::start_in(&data_dir, &[]);
    let url = format!("ws://{}/events/stream", d.http);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    // An NDJSON request whose body is still arriving when SIGTERM comes.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let req = tokio::spawn(
        client()
            .post(d.url("/events/batch"))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send(),
    );
    tx.send(Ok(
        b"{\"event_id\":\"late-1\",\"source_system\":\"s\",\"event_type\":\"t\"}\n".to_vec(),
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopper = tokio::task::spawn_blocking(move || d.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.send(Ok(
        b"{\"event_id\":\"late-2\",\"source_system\":\"s\",\"event_type\":\"t\"}\n".to_vec(),
    ))
    .await
    .unwrap();
    drop(tx);
    let resp = req.await.unwrap().unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.json::<Value>().await.unwrap()["collected"], 2);
    // The tail was closed with "going away".
    let mut closed = false;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        if let Ok(tokio_tungstenite::tungstenite::Message::Close(frame)) = msg {
            assert_eq!(u16::from(frame.unwrap().code), 1001);
            closed = true;
            break;
        }
    }
    assert!(closed);
    let (ok, stdout, stderr) = stopper.await.unwrap();
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with("evdb ready http=127.0.0.1:"), "{stdout}");
    // Both events are there after a restart.
    let d = Daemon::start_in(&data_dir, &[]);
    assert_eq!(get(&d, "/events/late-1").await.0, 200);
    assert_eq!(get(&d, "/events/late-2").await.0, 200);
}

#[test]
fn start_up_failures_are_one_clear_line() {
    let d = Daemon::start();
    // The same data directory.
    let err = Daemon::try_start_in(&d.data_dir, &[]).err().unwrap();
    assert!(err.contains("in use by another process"), "{err}");
    assert_eq!(
        err.trim().lines().filter(|l| l.contains("evdb:")).count(),
        1,
        "{err}"
    );
    // A busy port.
    let other = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_evdb"))
        .args(["serve", "--data-dir"])
        .arg(other.path().join("d"))
        .args(["--http", &d.http, "--grpc", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen for HTTP on {}", d.http)),
        "{err}"
    );
    // Beyond loopback without auth.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_evdb"))
        .args(["serve", "--ephemeral", "--http", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--insecure-listen"));
}

#[test]
fn ephemeral_directory_is_removed_on_exit() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_in(&dir.path().join("unused"), &["--ephemeral"]);
    let data = d.data_dir.clone();
    assert!(data.exists());
    assert!(!dir.path().join("unused").exists());
    let (ok, _, err) = d.stop();
    assert!(ok, "{err}");
    assert!(!data.exists());
}

#[test]
fn environment_and_config_file_settings() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready.json");
    let config = dir.path().join("evdb.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\nhttp = \"127.0.0.1:1\"\ngrpc = \"127.0.0.1:0\"\n",
            dir.path().join("from-file").display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_evdb"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("EVDB_HTTP", "127.0.0.1:0")
        .env("EVDB_READY_FILE", &ready)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !ready.exists() {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
    assert_ne!(v["http"], "127.0.0.1:1", "env wins over the file");
    assert!(v["data_dir"].as_str().unwrap().ends_with("from-file"));
    assert_eq!(v["pid"], child.id());
    child.kill().unwrap();
    child.wait().unwrap();
}

/// An NDJSON body of several store chunks (each chunk goes to the store
/// while the next is read): events are stored in body order, a repeat of
/// an earlier chunk's event is a duplicate, and the rejections come back
/// in line order.
#[tokio::test]
async fn a_long_ndjson_body_keeps_its_order_and_its_tally() {
    let d = Daemon::start();
    let mut body = String::new();
    let mut want = Vec::new();
    for i in 0..2600 {
        if i % 700 == 699 {
            // Not an event, and a repeat of an event 1,000 lines back.
            body.push_str("{\"source_system\":\"s\"}\n");
            body.push_str(&format!(
                "{{\"event_id\":\"n{:04}\",\"source_system\":\"s\",\"event_type\":\"t\",\"timestamp\":\"2025-02-05T12:00:00Z\"}}\n",
                i.max(1000) - 1000
            ));
        }
        let id = format!("n{i:04}");
        body.push_str(&format!(
            "{{\"event_id\":\"{id}\",\"source_system\":\"s\",\"event_type\":\"t\",\"timestamp\":\"2025-02-05T12:00:00Z\"}}\n"
        ));
        want.push(id);
    }
    let r = client()
        .post(d.url("/events/batch"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["collected"], 2600, "{b}");
    assert_eq!(b["failed"], 3, "{b}");
    assert_eq!(b["duplicates"], 3, "{b}");
    let indexes: Vec<u64> = b["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    // Before event i = 699 + 700 k, 2 k lines were inserted.
    assert_eq!(indexes, [699, 1401, 2103]);
    assert_eq!(
        every_id(&d, "/events?sort_order=asc&limit=1000").await,
        want
    );
}
