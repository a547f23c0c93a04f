//! A corpus of nasty inputs replayed against the running daemon: each gets
//! a 4xx (never a 5xx or a crash) — except deeply nested but valid JSON in
//! `data`, which is stored verbatim — and the daemon stays healthy.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::io::Write;
use std::time::Duration;

fn deep(n: usize) -> String {
    format!(
        r#"{{"source_system":"s","event_type":"t","data":{{"x":{}1{}}}}}"#,
        "[".repeat(n),
        "]".repeat(n)
    )
}

#[tokio::test]
async fn nasty_inputs_get_4xx_and_the_daemon_stays_healthy() {
    let d = common::Daemon::start();
    // No pooled connections: the daemon closes the connection after
    // answering an oversize body early, and a pooled client could send the
    // next request on it before noticing ("error sending request").
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let many_tags = format!(
        r#"{{"source_system":"s","event_type":"t","tags":[{}]}}"#,
        (0..100_000)
            .map(|i| format!("\"t{i}\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    let huge_string = format!(
        r#"{{"source_system":"s","event_type":"{}"}}"#,
        "x".repeat(10 * 1024 * 1024)
    );
    // One endless NDJSON line: dropped as it streams, not held.
    let endless_line = vec![b'x'; 64 * 1024 * 1024];
    // Valid, if unkind: kept verbatim, and read back intact.
    for (path, body) in [
        ("/events", deep(10_000)),
        ("/events/batch", format!("[{}]", deep(5_000))),
        (
            "/events",
            r#"{"source_system":"s","event_type":"t","data":{"n":1e999999}}"#.to_owned(),
        ),
    ] {
        let r = client
            .post(d.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{path}");
    }
    let r = client.get(d.url("/events?limit=2")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains(&"[".repeat(5_000)));
    let bodies: Vec<(&str, &str, Vec<u8>)> = vec![
        (
            "/events",
            "application/json",
            br#"{"source_system":"s","event_type":"t","timestamp":"99999-01-01T00:00:00Z"}"#
                .to_vec(),
        ),
        (
            "/events",
            "application/json",
            b"{\"source_system\":\"s\xc3\x28\",\"event_type\":\"t\"}".to_vec(),
        ),
        ("/events", "application/json", b"\0\0\0\0".to_vec()),
        (
            "/events",
            "application/json",
            br#"{"source_system":"","event_type":"t"}"#.to_vec(),
        ),
        ("/events", "application/json", many_tags.into_bytes()),
        ("/events/batch", "application/x-ndjson", endless_line),
        ("/events", "application/json", huge_string.into_bytes()),
        (
            "/events/batch",
            "application/x-ndjson",
            vec![b'{'; 3 * 1024 * 1024],
        ),
        (
            "/events",
            "application/x-protobuf",
            vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
        ),
        (
            "/events/batch",
            "application/x-protobuf",
            vec![0x0a, 0x03, 0x1a, 0x05, 0x00],
        ),
        (
            "/events",
            "application/json",
            br#"{"source_system":"s","event_type":"t","tags":[null]}"#.to_vec(),
        ),
        (
            "/events",
            "application/json",
            br#"{"source_system":"s","event_type":"t","correlation_id":{}}"#.to_vec(),
        ),
    ];
    for (path, ctype, body) in bodies {
        let shown = String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned();
        let oversize = body.len() > 2 * 1024 * 1024 && ctype != "application/x-ndjson";
        let sent = client
            .post(d.url(path))
            .header("content-type", ctype)
            .body(body)
            .send()
            .await;
        // An oversize body is answered (413) before it is read whole, and the
        // connection closed: the client may see that as a failed write
        // instead of the answer.
        let r = match sent {
            Ok(r) => r,
            Err(e) if oversize && e.is_request() => continue,
            Err(e) => panic!("{path} {shown}: {e}"),
        };
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        // A batch answers 201 with the failures listed; everything else is 4xx.
        if status == 201 {
            assert!(
                text.contains("\"failed\":") && !text.contains("\"failed\":0"),
                "{path} {shown}: {text}"
            );
        } else {
            assert!(
                (400..500).contains(&status),
                "{path} {shown}: {status} {text}"
            );
        }
    }
    // Query strings.
    for q in [
        "limit=-1",
        "limit=99999999999999999999",
        "offset=-5",
        "start_time=%00",
        "tags=%ff%fe",
        "cursor=1dffffffffffffffffffffffffffffffffffffffffffffffff",
        "source_system=%00&text=%00",
        "sort_order=%20",
    ] {
        let r = client
            .get(d.url(&format!("/events?{q}")))
            .send()
            .await
            .unwrap();
        assert!(r.status().as_u16() < 500, "{q}: {}", r.status());
    }
    // A gzip bomb: 64 MiB of zeros in a few KiB, over the 16 MiB limit.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&vec![b' '; 64 * 1024 * 1024]).unwrap();
    let r = client
        .post(d.url("/events/batch"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(gz.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // A slow body (a byte at a time) does not stop others from being served.
    let (tx, slow) = common::slow_post(&client, d.url("/events")).await;
    for _ in 0..5 {
        let r = client.get(d.url("/health")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(tx);
    let r = slow.await.unwrap().unwrap();
    assert_eq!(r.status(), 400);
    // Still healthy and still storing.
    let r = client.get(d.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .post(d.url("/events"))
        .json(&serde_json::json!({"source_system": "s", "event_type": "ok"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // Memory stayed bounded: the corpus sent about 150 MiB (and a gzip
    // bomb of 64 MiB); the daemon never held more than a few bodies' worth.
    let pid = d.child.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    eprintln!("peak RSS {} MiB", peak_kib / 1024);
    assert!(peak_kib < 256 * 1024, "peak RSS {peak_kib} KiB");
}
