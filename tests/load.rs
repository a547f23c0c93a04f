//! Holding ground: at most `max_connections` connections per listener are
//! served (the next waits until one closes), and a request that outlives
//! `request_timeout` is answered 408, against the real daemon.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

fn daemon_with(limits: &str) -> (common::Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("evdb.toml");
    std::fs::write(&config, format!("[limits]\n{limits}")).unwrap();
    let d = common::Daemon::start_in(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    (d, dir)
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_free_one() {
    let (mut d, _dir) = daemon_with("max_connections = 2\n");
    let held_a = tokio::net::TcpStream::connect(&d.http).await.unwrap();
    let held_b = tokio::net::TcpStream::connect(&d.http).await.unwrap();
    // Give the daemon time to accept both.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let waited = client.get(d.url("/health")).send().await;
    assert!(waited.is_err(), "a third connection was served: {waited:?}");
    drop(held_a);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let r = client.get(d.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    drop(held_b);
    tokio::task::spawn_blocking(move || d.stop()).await.unwrap();
}

#[tokio::test]
async fn a_request_past_the_deadline_is_answered_408() {
    let (mut d, _dir) = daemon_with("request_timeout = \"300ms\"\n");
    let client = reqwest::Client::new();
    let (tx, slow) = common::slow_post(&client, d.url("/events")).await;
    let r = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("the deadline never fired")
        .unwrap()
        .unwrap();
    assert_eq!(r.status(), 408);
    assert_eq!(
        r.headers().get("connection").map(|v| v.to_str().unwrap()),
        Some("close")
    );
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["error"].as_str().unwrap().contains("request_timeout"),
        "{v}"
    );
    drop(tx);
    // Normal requests are untouched.
    let r = client
        .post(d.url("/events"))
        .json(&serde_json::json!({"source_system": "s", "event_type": "t"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    tokio::task::spawn_blocking(move || d.stop()).await.unwrap();
}

#[test]
fn limits_that_cannot_work_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("evdb.toml");
    for (bad, name) in [
        ("max_connections = 0\n", "limits.max_connections"),
        (
            "max_concurrent_queries = 0\n",
            "limits.max_concurrent_queries",
        ),
        ("request_timeout = \"soon\"\n", "limits.request_timeout"),
    ] {
        std::fs::write(&config, format!("[limits]\n{bad}")).unwrap();
        let err = common::Daemon::try_start_in(
            &dir.path().join("data"),
            &["--config", config.to_str().unwrap()],
        )
        .err()
        .unwrap();
        assert!(err.contains(name), "{bad}: {err}");
    }
}
