//! `evdb bench http`: the HTTP figures of `docs/PERFORMANCE.md`, measured
//! end to end over loopback against a daemon in this process (load
//! generator and server share the machine's cores), each next to the
//! SQLite baseline of contract §6 measured in the same run.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::api::json::write_event;
use crate::bench::{
    self, BenchOptions, Figure, SEED, START, Sqlite, build_dataset, percentile, progress,
};
use crate::config::ServeConfig;
use crate::generator::{Generator, SOURCES, TAGS};
use crate::limits::Limits;
use crate::storage::FsyncMode;

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    host: String,
}

impl Conn {
    async fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Conn {
            sender,
            host: addr.to_string(),
        })
    }

    /// Sends a request; returns the status and body.
    async fn call(
        &mut self,
        method: &str,
        path: &str,
        ctype: Option<&str>,
        body: Bytes,
    ) -> anyhow::Result<(u16, Bytes)> {
        self.sender.ready().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host);
        if let Some(c) = ctype {
            req = req.header("content-type", c);
        }
        let resp = self.sender.send_request(req.body(Full::new(body))?).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// A daemon in this process on fresh ports.
pub(crate) struct Server {
    pub(crate) http: SocketAddr,
    pub(crate) grpc: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), crate::server::ServeError>>>,
}

impl Server {
    pub(crate) async fn start(data_dir: &Path, fsync: FsyncMode) -> anyhow::Result<Server> {
        let config = ServeConfig {
            data_dir: data_dir.to_owned(),
            http: "127.0.0.1:0".parse()?,
            grpc: "127.0.0.1:0".parse()?,
            ephemeral: false,
            ready_file: None,
            fsync,
            insecure_listen: false,
            limits: Limits::default(),
            load: crate::api::load::LoadLimits::default(),
            tokens: Vec::new(),
            rate_limit: None,
            tls: None,
            retention: None,
            compaction: crate::config::resolve_compaction(&Default::default())?,
            min_free_bytes: 0,
            numeric_fields: Vec::new(),
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(crate::server::serve(
            config,
            async move {
                let _ = stop_rx.await;
            },
            move |ready| {
                let _ = ready_tx.send((ready.http, ready.grpc));
            },
        ));
        let (http, grpc) = ready_rx
            .await
            .map_err(|_| anyhow::anyhow!("the bench daemon did not start"))?;
        Ok(Server {
            http,
            grpc,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await??;
        }
        Ok(())
    }
}

/// NDJSON bodies of 1,000 generated events without ids (the daemon assigns
/// UUIDv7s, so bodies can be resent without duplicates).
fn ndjson_bodies(count: usize, per_body: usize) -> Vec<Bytes> {
    let mut generator = Generator::new(SEED ^ 0x4854_5450, START, 100);
    (0..count)
        .map(|_| {
            let mut text = String::with_capacity(per_body * 450);
            for mut e in generator.batch(per_body) {
                e.id.clear();
                let mut line = String::new();
                write_event(&e, &mut line);
                // Drop the empty id: `"event_id":"",` opens every line.
                text.push_str(&line.replacen("\"event_id\":\"\",", "", 1));
                text.push('\n');
            }
            Bytes::from(text)
        })
        .collect()
}

fn collected(body: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["collected"].as_u64())
        .unwrap_or(0)
}

/// `n` events in 1,000-event NDJSON bodies from 4 concurrent clients.
async fn bulk_ingest(addr: SocketAddr, n: u64) -> anyhow::Result<f64> {
    const CLIENTS: usize = 4;
    const PER_BODY: usize = 1000;
    let bodies = Arc::new(ndjson_bodies(16, PER_BODY));
    let bodies_total = n.div_ceil(PER_BODY as u64);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let bodies = bodies.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await?;
            let mut stored = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= bodies_total {
                    break;
                }
                let body = bodies[i as usize % bodies.len()].clone();
                let (status, answer) = conn
                    .call("POST", "/events/batch", Some("application/x-ndjson"), body)
                    .await?;
                anyhow::ensure!(status == 201, "bulk ingest answered {status}");
                stored += collected(&answer);
            }
            anyhow::Ok(stored)
        }));
    }
    let mut stored = 0;
    for t in tasks {
        stored += t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        stored == bodies_total * PER_BODY as u64,
        "stored {stored} of {} events",
        bodies_total * PER_BODY as u64
    );
    Ok(stored as f64 / secs)
}

/// `requests` single-event posts over 64 concurrent keep-alive connections.
async fn single_posts(addr: SocketAddr, requests: u64) -> anyhow::Result<f64> {
    const CONNECTIONS: usize = 64;
    let mut generator = Generator::new(SEED ^ 0x5349_4e47, START, 100);
    let bodies: Arc<Vec<Bytes>> = Arc::new(
        generator
            .batch(256)
            .into_iter()
            .map(|mut e| {
                e.id.clear();
                let mut text = String::new();
                write_event(&e, &mut text);
                Bytes::from(text.replacen("\"event_id\":\"\",", "", 1))
            })
            .collect(),
    );
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let bodies = bodies.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    break;
                }
                let body = bodies[i as usize % bodies.len()].clone();
                let (status, _) = conn
                    .call("POST", "/events", Some("application/json"), body)
                    .await?;
                anyhow::ensure!(status == 201, "single post answered {status}");
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(requests as f64 / started.elapsed().as_secs_f64())
}

/// SQLite inserting `n` events in transactions of `batch` (synchronous=FULL).
pub(crate) fn sqlite_rate(dir: &Path, n: usize, batch: usize) -> anyhow::Result<f64> {
    let path = dir.join(format!("baseline-{batch}.db"));
    let mut sqlite = Sqlite::open(&path, true)?;
    let mut generator = Generator::new(SEED ^ 0x5351_4c49, START, 100);
    let mut done = 0;
    let started = Instant::now();
    while done < n {
        let events = generator.batch(batch.min(n - done));
        sqlite.insert_batch(&events)?;
        done += events.len();
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Milliseconds until `path` exists (polled every 0.2 ms).
fn wait_for_file(path: &Path, child: &mut std::process::Child) -> anyhow::Result<f64> {
    let started = Instant::now();
    while !path.exists() {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the daemon exited with {status} before it was ready");
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the daemon was not ready in 120 s"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

/// A memory line of `/proc/PID/status` (`VmRSS:`, `RssAnon:`), bytes.
fn proc_rss_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// Every figure of the `http` suite.
pub fn http(opts: &BenchOptions) -> anyhow::Result<Vec<Figure>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut figures = Vec::new();
    let n = opts.events;

    // Queries, start-up and idle memory over an `n`-event store.
    let ds = build_dataset(opts)?;
    let evdb_path = ds.evdb_path.clone();
    ds.db.close()?;
    // Release the data directory's lock for the daemon.
    drop(ds.db);
    progress(opts, "http: daemon start to ready");
    let ready = opts
        .dir
        .join(format!("evdb-bench-ready-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&ready);
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["serve", "--data-dir"])
        .arg(&evdb_path)
        .args([
            "--http",
            "127.0.0.1:0",
            "--grpc",
            "127.0.0.1:0",
            "--ready-file",
        ])
        .arg(&ready)
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let start_ms = wait_for_file(&ready, &mut child);
    let text = std::fs::read_to_string(&ready).unwrap_or_default();
    let addr: Option<SocketAddr> = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["http"].as_str().and_then(|a| a.parse().ok()));
    let measured = runtime.block_on(async {
        let start_ms = start_ms?;
        let addr = addr.ok_or_else(|| anyhow::anyhow!("unreadable ready file"))?;
        let mut conn = Conn::open(addr).await?;
        // Idle: ready, one metrics scrape, nothing else.
        let (_, m) = conn.call("GET", "/metrics", None, Bytes::new()).await?;
        let m = String::from_utf8_lossy(&m);
        // Index memory: in-memory indexes and the id filter (sealed
        // indexes are mapped files, in the page cache).
        let index_bytes =
            metric(&m, "evdb_index_memory_bytes") + metric(&m, "evdb_id_filter_bytes");
        let rss = proc_rss_bytes(child.id(), "RssAnon:") as f64;
        let rss_total = proc_rss_bytes(child.id(), "VmRSS:") as f64;
        progress(
            opts,
            "http: GET /events newest 100, source + min_severity + tag",
        );
        let mut samples = Vec::new();
        for i in 0..1000usize {
            let path = format!(
                "/events?source_system={}&min_severity=error&tags={}&limit=100",
                SOURCES[i % 4],
                TAGS[i % TAGS.len()]
            );
            let t = Instant::now();
            let (status, body) = conn.call("GET", &path, None, Bytes::new()).await?;
            samples.push(t.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(status == 200 && body.len() > 2, "query answered {status}");
        }
        anyhow::Ok((start_ms, index_bytes, rss, rss_total, samples))
    });
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let (start_ms, index_bytes, rss, rss_total, mut samples) = measured?;
    // SQLite takes up to seconds per query at 10 M events: as many runs as
    // fit in 30 s (at least 10), which is enough for its p50; its p99 is then
    // close to its maximum.
    progress(opts, "http: SQLite baseline of the same query");
    let mut base = bench::sqlite_newest100_samples(&ds.sqlite, 1000, Duration::from_secs(30), 10)?;
    for (q, unit) in [(0.5, "ms_p50"), (0.99, "ms_p99")] {
        figures.push(Figure::new(
            "http",
            "get_events_newest100_source_minsev_tag",
            n,
            unit,
            percentile(&mut samples, q),
            "sqlite_in_process",
            percentile(&mut base, q),
        ));
    }
    figures.push(Figure::new(
        "http",
        "start_to_ready",
        n,
        "ms",
        start_ms,
        "sqlite_open_count",
        ds.sqlite_open_ms,
    ));
    let budget = 64.0 * 1024.0 * 1024.0 + index_bytes;
    let mib = 1024.0 * 1024.0;
    figures.push(Figure::new(
        "http",
        "idle_anon_rss_vs_64MiB_plus_index",
        n,
        "MiB",
        rss / mib,
        "budget",
        budget / mib,
    ));
    // Resident total, mapped segment and index pages included (page cache
    // the kernel may drop), against the same budget.
    figures.push(Figure::new(
        "http",
        "idle_total_rss_vs_64MiB_plus_index",
        n,
        "MiB",
        rss_total / mib,
        "budget",
        budget / mib,
    ));
    drop(ds.sqlite);

    // Ingest over HTTP at --fsync always, on fresh stores.
    let bulk_n = n.min(2_000_000);
    let singles = (n / 10).clamp(10_000, 100_000);
    let dir = tempfile::Builder::new()
        .prefix("evdb-bench-http-")
        .tempdir_in(&opts.dir)?;
    let (bulk, single) = runtime.block_on(async {
        progress(
            opts,
            &format!("http: NDJSON bulk ingest of {bulk_n} events, 4 clients"),
        );
        let server = Server::start(&dir.path().join("bulk"), FsyncMode::Always).await?;
        let bulk = bulk_ingest(server.http, bulk_n).await;
        server.stop().await?;
        progress(
            opts,
            &format!("http: {singles} single-event POSTs, 64 connections"),
        );
        let server = Server::start(&dir.path().join("single"), FsyncMode::Always).await?;
        let single = single_posts(server.http, singles).await;
        server.stop().await?;
        anyhow::Ok((bulk?, single?))
    })?;
    progress(opts, "http: SQLite baselines (synchronous=FULL)");
    let sqlite_bulk = sqlite_rate(dir.path(), (bulk_n as usize).min(200_000), 1000)?;
    let sqlite_single = sqlite_rate(dir.path(), 2000, 1)?;
    figures.push(Figure::new(
        "http",
        "ndjson_bulk_1000_per_body_4_clients",
        bulk_n,
        "events_per_s",
        bulk,
        "sqlite_in_process_batch_1000",
        sqlite_bulk,
    ));
    figures.push(Figure::new(
        "http",
        "single_post_64_connections",
        singles,
        "requests_per_s",
        single,
        "sqlite_in_process_txn_per_event",
        sqlite_single,
    ));
    Ok(figures)
}
