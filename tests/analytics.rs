//! The seeds' analytics questions, each one request to the real daemon
//! over HTTP (`GET /events/aggregate`) and gRPC (`evdb.v1.Evdb/Aggregate`),
//! checked against answers computed here from the same events; bad
//! requests name the field; results survive a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::collections::BTreeMap;

use common::Daemon;
use evdb::api::proto::evdb::v1 as ev;
use evdb::api::proto::evdb::v1::evdb_client::EvdbClient;
use serde_json::Value;
use tonic::Code;

/// 2025-11-10T00:00:00Z.
const BASE: i64 = 1_762_732_800;
const N: usize = 700;
const TYPES: [&str; 3] = ["llm_call", "tool_call", "agent_start"];

struct Ev {
    ts: i64,
    event_type: &'static str,
    session: String,
    agent: String,
    error: bool,
    latency: f64,
}

fn events() -> Vec<Ev> {
    (0..N)
        .map(|i| Ev {
            ts: BASE + i as i64 * 864,
            event_type: TYPES[i % 3],
            session: format!("s{}", i % 10),
            agent: format!("a{}", i % 4),
            error: i % 7 == 0 || i % 11 == 0,
            latency: ((i * 37) % 500) as f64 + 0.5,
        })
        .collect()
}

fn ndjson(evs: &[Ev]) -> String {
    let mut out = String::new();
    for (i, e) in evs.iter().enumerate() {
        let severity = if i % 7 == 0 {
            "ERROR"
        } else if i % 11 == 0 {
            "CRITICAL"
        } else {
            "INFO"
        };
        let line = serde_json::json!({
            "event_id": format!("e{i}"),
            "source_system": "agents",
            "event_type": e.event_type,
            "severity": severity,
            "correlation_id": e.session,
            "tags": [format!("agent:{}", e.agent), "prod"],
            "timestamp": time(e.ts),
            "data": {"latency_ms": e.latency, "tokens": i % 50, "model": format!("m{}", i % 2)},
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

fn time(seconds: i64) -> String {
    evdb::Timestamp(seconds * 1_000_000).to_rfc3339()
}

/// JSON numbers parse back within an ulp or so (serde_json's default
/// float parser is not correctly rounded).
#[track_caller]
fn close(got: Option<f64>, want: f64) {
    let g = got.unwrap_or(f64::NAN);
    assert!(
        (g - want).abs() <= 1e-12 * want.abs().max(1.0),
        "{g} != {want}"
    );
}

fn percentile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[(q * (v.len() as f64 - 1.0)) as usize]
}

async fn aggregate(d: &Daemon, query: &str) -> (u16, Value) {
    let resp = reqwest::get(d.url(&format!("/events/aggregate?{query}")))
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

async fn ok(d: &Daemon, query: &str) -> Value {
    let (s, v) = aggregate(d, query).await;
    assert_eq!(s, 200, "{query}: {v}");
    v
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn load(d: &Daemon, evs: &[Ev]) {
    let resp = reqwest::Client::new()
        .post(d.url("/events/batch"))
        .header("content-type", "application/x-ndjson")
        .body(ndjson(evs))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
}

#[tokio::test]
async fn the_seed_questions_are_one_request_each() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = Daemon::start_in(&data, &["--numeric-field", "/latency_ms"]);
    let evs = events();
    load(&d, &evs).await;

    // Seed 003: error counts per day for one event type over 7 days.
    let q1 = format!(
        "event_type=tool_call&start_time={}&end_time={}&bucket=day&metrics={}",
        enc(&time(BASE)),
        enc(&time(BASE + 7 * 86_400 - 1)),
        enc("count_where(severity>=error) as errors,count")
    );
    let v = ok(&d, &q1).await;
    let mut want: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for e in evs.iter().filter(|e| e.event_type == "tool_call") {
        let day = time(e.ts - (e.ts - BASE).rem_euclid(86_400));
        let w = want.entry(day).or_default();
        w.0 += u64::from(e.error);
        w.1 += 1;
    }
    let got: BTreeMap<String, (u64, u64)> = v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["bucket"].as_str().unwrap().to_owned(),
                (
                    g["values"]["errors"].as_u64().unwrap(),
                    g["values"]["count"].as_u64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(got.len(), 7);

    // Seed 003: p95 latency per event type per session.
    let v = ok(
        &d,
        &format!(
            "group_by=event_type,correlation_id&metrics={}&limit=1000",
            enc("p95(/latency_ms)")
        ),
    )
    .await;
    assert_eq!(v["value_path"], "columns");
    assert_eq!(v["exact"], true);
    let mut lat: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for e in &evs {
        lat.entry((e.event_type.to_owned(), e.session.clone()))
            .or_default()
            .push(e.latency);
    }
    let groups = v["groups"].as_array().unwrap();
    assert_eq!(groups.len(), lat.len());
    for g in groups {
        let k = (
            g["key"]["event_type"].as_str().unwrap().to_owned(),
            g["key"]["correlation_id"].as_str().unwrap().to_owned(),
        );
        let want = percentile(lat[&k].clone(), 0.95);
        assert_eq!(
            g["values"]["p95(/latency_ms)"].as_f64(),
            Some(want),
            "{k:?}"
        );
    }

    // Seed 003: top sessions by error rate.
    let v = ok(
        &d,
        "group_by=correlation_id&metrics=count,error_rate&order_by=error_rate&limit=3",
    )
    .await;
    assert_eq!(v["strategy"], "bitmap");
    let mut rates: Vec<(f64, String)> = (0..10)
        .map(|s| {
            let mine: Vec<&Ev> = evs
                .iter()
                .filter(|e| e.session == format!("s{s}"))
                .collect();
            let errors = mine.iter().filter(|e| e.error).count() as f64;
            (errors / mine.len() as f64, format!("s{s}"))
        })
        .collect();
    rates.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let got: Vec<(f64, String)> = v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["values"]["error_rate"].as_f64().unwrap(),
                g["key"]["correlation_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(got.len(), 3);
    for (g, w) in got.iter().zip(&rates) {
        assert_eq!(g.1, w.1);
        close(Some(g.0), w.0);
    }
    assert_eq!(v["group_count"], 10);

    // Seed 004 CalculateAggregates: sum/avg/min/max over a range.
    let (from, to) = (BASE + 86_400, BASE + 3 * 86_400);
    let v = ok(
        &d,
        &format!(
            "start_time={}&end_time={}&metrics={}",
            enc(&time(from)),
            enc(&time(to)),
            enc("sum(/latency_ms) as sum,avg(/latency_ms) as avg,min(/latency_ms) as min,max(/latency_ms) as max,count")
        ),
    )
    .await;
    let inside: Vec<f64> = evs
        .iter()
        .filter(|e| e.ts >= from && e.ts <= to)
        .map(|e| e.latency)
        .collect();
    let sum: f64 = inside.iter().sum();
    let t = &v["totals"];
    assert_eq!(t["count"].as_u64(), Some(inside.len() as u64));
    assert_eq!(t["sum"].as_f64(), Some(sum));
    close(t["avg"].as_f64(), sum / inside.len() as f64);
    assert_eq!(t["min"].as_f64(), inside.iter().copied().reduce(f64::min));
    assert_eq!(t["max"].as_f64(), inside.iter().copied().reduce(f64::max));
    assert_eq!(
        v["groups"][0]["values"], *t,
        "ungrouped: one group, the totals"
    );

    // Seed 004 GetWorkspaceSummary: totals by type (top types) and by
    // severity, error rate, first and last time.
    let v = ok(
        &d,
        &format!(
            "group_by=event_type&order_by=count&limit=2&metrics={}",
            enc("count,error_rate,first_seen,last_seen,count_where(severity=info) as info,count_where(severity=error) as error,count_where(severity=critical) as critical")
        ),
    )
    .await;
    let t = &v["totals"];
    let errors = evs.iter().filter(|e| e.error).count();
    assert_eq!(t["count"], N);
    close(t["error_rate"].as_f64(), errors as f64 / N as f64);
    assert_eq!(t["first_seen"], time(BASE));
    assert_eq!(t["last_seen"], time(BASE + (N as i64 - 1) * 864));
    assert_eq!(
        t["info"].as_u64().unwrap()
            + t["error"].as_u64().unwrap()
            + t["critical"].as_u64().unwrap(),
        N as u64
    );
    assert_eq!(v["group_count"], 3);
    let top: Vec<(&str, u64)> = v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["key"]["event_type"].as_str().unwrap(),
                g["values"]["count"].as_u64().unwrap(),
            )
        })
        .collect();
    // 700 = 234 + 233 + 233: llm_call first, then the tie broken by name.
    assert_eq!(top, [("llm_call", 234), ("agent_start", 233)]);

    // Seed 004 GetAgentPerformance: per agent count, error rate, latency
    // percentiles.
    let per_agent = format!(
        "group_by=tag:agent&metrics={}",
        enc("count,error_rate,p50(/latency_ms),p95(/latency_ms),p99(/latency_ms)")
    );
    let v = ok(&d, &per_agent).await;
    let groups = v["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 4);
    for (a, g) in groups.iter().enumerate() {
        let mine: Vec<&Ev> = evs.iter().filter(|e| e.agent == format!("a{a}")).collect();
        let l: Vec<f64> = mine.iter().map(|e| e.latency).collect();
        assert_eq!(g["key"]["tag:agent"], format!("a{a}"));
        assert_eq!(g["values"]["count"], mine.len());
        close(
            g["values"]["error_rate"].as_f64(),
            mine.iter().filter(|e| e.error).count() as f64 / mine.len() as f64,
        );
        assert_eq!(
            g["values"]["p50(/latency_ms)"].as_f64(),
            Some(percentile(l.clone(), 0.5))
        );
        assert_eq!(
            g["values"]["p99(/latency_ms)"].as_f64(),
            Some(percentile(l, 0.99))
        );
    }

    // The same question over gRPC gives the same numbers.
    let mut grpc = EvdbClient::connect(format!("http://{}", d.grpc))
        .await
        .unwrap();
    let r = grpc
        .aggregate(ev::AggregateRequest {
            group_by: vec!["tag:agent".into()],
            metrics: vec![
                "count".into(),
                "error_rate".into(),
                "p50(/latency_ms)".into(),
                "p95(/latency_ms)".into(),
                "p99(/latency_ms)".into(),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.dimensions, ["tag:agent"]);
    assert_eq!(r.group_count, 4);
    for (g, h) in r.groups.iter().zip(groups) {
        assert_eq!(g.key[0].value.as_deref(), h["key"]["tag:agent"].as_str());
        let names = [
            "count",
            "error_rate",
            "p50(/latency_ms)",
            "p95(/latency_ms)",
            "p99(/latency_ms)",
        ];
        for (m, name) in g.values.iter().zip(names) {
            close(h["values"][name].as_f64(), m.value.unwrap());
        }
    }
    let r = grpc
        .aggregate(ev::AggregateRequest {
            filter: Some(ev::Filter {
                event_types: vec!["tool_call".into()],
                ..Default::default()
            }),
            bucket: "day".into(),
            tz_offset: "+02:00".into(),
            metrics: vec!["count".into(), "first_seen".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.groups.len(),
        8,
        "seven UTC days straddle eight +02:00 days"
    );
    let first = r.groups[0].bucket.unwrap();
    assert_eq!(first.seconds, BASE - 2 * 3600);
    assert!(r.groups[0].values[1].time.is_some());

    // An undeclared pointer works, from the records, and says so.
    let v = ok(&d, &format!("metrics={}", enc("sum(/tokens)"))).await;
    assert_eq!(v["value_path"], "json");
    let tokens: u64 = (0..N as u64).map(|i| i % 50).sum();
    assert_eq!(v["totals"]["sum(/tokens)"].as_f64(), Some(tokens as f64));

    // Bad requests name the field.
    for (query, field) in [
        ("metrics=median(/x)", "metrics"),
        ("metrics=p95(latency)", "metrics"),
        ("group_by=colour", "group_by"),
        ("bucket=fortnight", "bucket"),
        ("bucket=day&tz_offset=%2B25:00", "tz_offset"),
        ("order_by=nothing", "order_by"),
        ("limit=0", "limit"),
        ("limit=x", "limit"),
        ("cursor=abc", "cursor"),
        ("colour=red", "colour"),
        ("min_severity=loud", "min_severity"),
        ("metrics=count_where(severity>=loud)", "metrics"),
        ("group_by=a,b,c,d", "group_by"),
    ] {
        let (s, v) = aggregate(&d, query).await;
        assert_eq!(s, 400, "{query}: {v}");
        assert_eq!(v["field"], field, "{query}: {v}");
    }
    let err = grpc
        .aggregate(ev::AggregateRequest {
            group_by: vec!["colour".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("group_by:"), "{}", err.message());

    // After a restart (the active segment sealed, columns read from the
    // numeric file) the answers are the same.
    let before = ok(&d, &per_agent).await;
    drop(grpc);
    let (clean, _, err) = tokio::task::spawn_blocking(move || {
        let mut d = d;
        d.stop()
    })
    .await
    .unwrap();
    assert!(clean, "{err}");
    let d = Daemon::start_in(&data, &["--numeric-field", "/latency_ms"]);
    let after = ok(&d, &per_agent).await;
    assert_eq!(before["groups"], after["groups"]);
    assert_eq!(after["value_path"], "columns");
}
