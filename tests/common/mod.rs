//! Starts the real `evdb serve` on `127.0.0.1:0` and finds its addresses
//! through `--ready-file`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Daemon {
    pub child: Option<Child>,
    pub http: String,
    pub grpc: String,
    pub data_dir: PathBuf,
    pub ready_file: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Daemon {
    /// A daemon on a fresh data directory.
    pub fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut d = Daemon::start_in(&data, &[]);
        d._dir = Some(dir);
        d
    }

    /// A daemon on `data_dir` with extra arguments.
    pub fn start_in(data_dir: &Path, extra: &[&str]) -> Daemon {
        Daemon::try_start_in(data_dir, extra).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_start_in(data_dir: &Path, extra: &[&str]) -> Result<Daemon, String> {
        let ready_file = data_dir.with_extension(format!("ready-{}", std::process::id()));
        let _ = std::fs::remove_file(&ready_file);
        let mut child = Command::new(env!("CARGO_BIN_EXE_evdb"))
            .args(["serve", "--data-dir"])
            .arg(data_dir)
            .args([
                "--http",
                "127.0.0.1:0",
                "--grpc",
                "127.0.0.1:0",
                "--ready-file",
            ])
            .arg(&ready_file)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready_file) {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                return Ok(Daemon {
                    child: Some(child),
                    http: v["http"].as_str().unwrap().to_owned(),
                    grpc: v["grpc"].as_str().unwrap().to_owned(),
                    data_dir: PathBuf::from(v["data_dir"].as_str().unwrap()),
                    ready_file,
                    _dir: None,
                });
            }
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                return Err(format!("daemon exited with {status}: {err}"));
            }
            assert!(Instant::now() < deadline, "daemon not ready in 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// Sends SIGTERM and waits; returns (success, stdout, stderr).
    pub fn stop(&mut self) -> (bool, String, String) {
        let child = self.child.take().unwrap();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `evdb ARGS` to completion and returns its standard output; fails
/// the test, showing both outputs, when it exits non-zero.
pub fn evdb_ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_evdb"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "evdb {:?} failed: {stdout}{}",
        args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Starts a `POST /events` whose JSON body arrives only as fast as the
/// test sends chunks into the returned sender (it starts with `{`);
/// dropping the sender ends the body.
pub async fn slow_post(
    client: &reqwest::Client,
    url: String,
) -> (
    tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
    tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let slow = tokio::spawn(
        client
            .post(url)
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
            .send(),
    );
    tx.send(Ok(b"{".to_vec())).await.unwrap();
    (tx, slow)
}
