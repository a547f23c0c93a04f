//! Bearer tokens and roles (contract §7) on both protocols, against the
//! real daemon.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use evdb::api::proto::evdb::v1 as ev;
use evdb::api::proto::evdb::v1::evdb_client::EvdbClient;
use serde_json::{Value, json};
use tonic::Code;
use tonic::metadata::MetadataValue;

fn sha256_hex(token: &str) -> String {
    hex::encode(evdb::api::auth::sha256(token))
}

fn start() -> (common::Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("evdb.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[auth.tokens]]
name = "collector"
sha256 = "{}"
role = "ingest"
sources = ["mahavishnu"]

[[auth.tokens]]
name = "dashboard"
sha256 = "{}"
role = "read"

[[auth.tokens]]
name = "ops"
token = "admin-secret"
role = "admin"
"#,
            sha256_hex("ingest-secret"),
            sha256_hex("read-secret")
        ),
    )
    .unwrap();
    let d = common::Daemon::start_in(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    (d, dir)
}

async fn call(
    d: &common::Daemon,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, d.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn http_roles_and_sources() {
    use reqwest::Method;
    let (d, _dir) = start();
    let ev = |source: &str| json!({"source_system": source, "event_type": "t"});
    // Health stays open; everything else needs a token.
    assert_eq!(call(&d, Method::GET, "/health", None, None).await.0, 200);
    let r = reqwest::get(d.url("/events")).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let (s, b) = call(&d, Method::GET, "/events", Some("guess"), None).await;
    assert_eq!((s, b["field"].as_str()), (401, Some("authorization")));
    assert_eq!(call(&d, Method::GET, "/metrics", None, None).await.0, 401);

    // ingest: writes its own sources only, reads nothing.
    let ing = Some("ingest-secret");
    assert_eq!(
        call(&d, Method::POST, "/events", ing, Some(ev("mahavishnu")))
            .await
            .0,
        201
    );
    let (s, b) = call(&d, Method::POST, "/events", ing, Some(ev("akosha"))).await;
    assert_eq!((s, b["field"].as_str()), (403, Some("source_system")));
    let batch = json!([ev("mahavishnu"), ev("akosha")]);
    assert_eq!(
        call(&d, Method::POST, "/events/batch", ing, Some(batch))
            .await
            .0,
        403
    );
    assert_eq!(call(&d, Method::GET, "/events", ing, None).await.0, 403);

    // read: queries, stats, metrics; no writes, no deletes, no snapshots.
    let read = Some("read-secret");
    let (s, b) = call(&d, Method::GET, "/events", read, None).await;
    assert_eq!(
        (s, b["count"].as_u64()),
        (200, Some(1)),
        "nothing half-stored"
    );
    assert_eq!(
        call(&d, Method::GET, "/events/stats", read, None).await.0,
        200
    );
    assert_eq!(call(&d, Method::GET, "/metrics", read, None).await.0, 200);
    assert_eq!(
        call(&d, Method::POST, "/events", read, Some(ev("x")))
            .await
            .0,
        403
    );
    assert_eq!(
        call(
            &d,
            Method::DELETE,
            "/events?before=2030-01-01T00:00:00Z",
            read,
            None
        )
        .await
        .0,
        403
    );
    assert_eq!(
        call(&d, Method::POST, "/admin/snapshots", read, None)
            .await
            .0,
        403
    );

    // admin: everything.
    let admin = Some("admin-secret");
    assert_eq!(
        call(&d, Method::POST, "/events", admin, Some(ev("akosha")))
            .await
            .0,
        201
    );
    assert_eq!(
        call(&d, Method::POST, "/admin/snapshots", admin, None)
            .await
            .0,
        201
    );
    let (s, b) = call(
        &d,
        Method::DELETE,
        "/events?before=2100-01-01T00:00:00Z",
        admin,
        None,
    )
    .await;
    assert_eq!((s, b["deleted"].as_u64()), (200, Some(2)));
}

#[tokio::test]
async fn grpc_roles_and_sources() {
    let (d, _dir) = start();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", d.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let with = |token: &'static str| {
        let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", value.clone());
            Ok(req)
        }
    };
    // Health checks need no token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    let event = |source: &str| ev::IngestRequest {
        events: vec![ev::Event {
            source_system: source.into(),
            event_type: "t".into(),
            ..Default::default()
        }],
    };
    let mut open = EvdbClient::new(channel.clone());
    let err = open.query(ev::QueryRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let mut ingest = EvdbClient::with_interceptor(channel.clone(), with("ingest-secret"));
    ingest.ingest(event("mahavishnu")).await.unwrap();
    let err = ingest.ingest(event("akosha")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = ingest.query(ev::QueryRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let mut read = EvdbClient::with_interceptor(channel.clone(), with("read-secret"));
    let r = read
        .query(ev::QueryRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.events.len(), 1);
    let err = read.ingest(event("mahavishnu")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = read
        .delete(ev::DeleteRequest {
            target: Some(ev::delete_request::Target::EventId("x".into())),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let mut admin = EvdbClient::with_interceptor(channel, with("admin-secret"));
    admin.ingest(event("akosha")).await.unwrap();
    let r = admin
        .delete(ev::DeleteRequest {
            target: Some(ev::delete_request::Target::Filter(ev::Filter {
                source_systems: vec!["akosha".into()],
                ..Default::default()
            })),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.deleted, 1);
}

#[tokio::test]
async fn per_source_rate_limits() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("evdb.toml");
    std::fs::write(
        &config,
        "[rate_limit]\nevents_per_s = 0.01\nburst = 5\n[rate_limit.sources.fast]\nevents_per_s = 100000\n",
    )
    .unwrap();
    let d = common::Daemon::start_in(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let client = reqwest::Client::new();
    let batch = |source: &str, n: usize| -> Value {
        (0..n)
            .map(|_| json!({"source_system": source, "event_type": "t"}))
            .collect::<Vec<_>>()
            .into()
    };
    let post = |body: Value| client.post(d.url("/events/batch")).json(&body).send();
    assert_eq!(post(batch("slow", 5)).await.unwrap().status(), 201);
    let r = post(batch("slow", 1)).await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(
        r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["field"], "source_system");
    assert!(b["error"].as_str().unwrap().contains("slow"));
    // A request is refused whole: the fast events of a mixed batch are not stored.
    let mut mixed = batch("fast", 3);
    mixed
        .as_array_mut()
        .unwrap()
        .extend(batch("slow", 1).as_array().unwrap().clone());
    assert_eq!(post(mixed).await.unwrap().status(), 429);
    assert_eq!(post(batch("fast", 1000)).await.unwrap().status(), 201);
    // More than the burst in one request can never pass.
    let r = post(batch("other", 6)).await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.text().await.unwrap().contains("burst"));
    let stats: Value = client
        .get(d.url("/events/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["total_events"], 1005);
    let metrics = client
        .get(d.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("evdb_events_rate_limited_total{source=\"slow\"}"),
        "{metrics}"
    );
    // gRPC answers RESOURCE_EXHAUSTED with retry-after.
    let mut c = EvdbClient::new(
        tonic::transport::Channel::from_shared(format!("http://{}", d.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let err = c
        .ingest(ev::IngestRequest {
            events: vec![ev::Event {
                source_system: "slow".into(),
                event_type: "t".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.metadata().get("retry-after").is_some());
}

/// The command line's `--url` mode sends `EVDB_TOKEN` as its bearer token.
#[test]
fn the_command_line_sends_its_token() {
    let (d, dir) = start();
    let url = format!("http://{}", d.http);
    let run = |token: Option<&str>, args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_evdb"));
        cmd.args(args).env_remove("EVDB_TOKEN");
        if let Some(t) = token {
            cmd.env("EVDB_TOKEN", t);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = run(None, &["stats", "--url", &url]);
    assert!(!ok);
    assert!(err.contains("401"), "{err}");
    let (ok, out, err) = run(Some("read-secret"), &["stats", "--url", &url]);
    assert!(ok, "{err}");
    assert!(out.contains("\"total_events\":0"), "{out}");
    // A read token may not ingest; the answer names the status.
    let input = dir.path().join("one.ndjson");
    std::fs::write(
        &input,
        "{\"source_system\":\"mahavishnu\",\"event_type\":\"t\"}\n",
    )
    .unwrap();
    let file = input.to_str().unwrap();
    let (ok, _, err) = run(
        Some("read-secret"),
        &["ingest", "--url", &url, "--file", file],
    );
    assert!(!ok);
    assert!(err.contains("403"), "{err}");
    let (ok, out, err) = run(
        Some("ingest-secret"),
        &["ingest", "--url", &url, "--file", file],
    );
    assert!(ok, "{err}");
    assert!(out.contains("stored 1,"), "{out}");
}
