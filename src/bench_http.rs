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

/// How a bench client reaches the daemon: TLS (trusting the bench's
/// certificate) and a bearer token, or neither.
#[derive(Clone, Default)]
struct Client {
    tls: Option<tokio_rustls::TlsConnector>,
    token: Option<String>,
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    host: String,
    authorization: Option<String>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        Conn::open_as(addr, &Client::default()).await
    }

    async fn open_as(addr: SocketAddr, client: &Client) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let sender = match &client.tls {
            Some(connector) => {
                let name = rustls_pki_types::ServerName::try_from("localhost")?;
                let tls = connector.connect(name, stream).await?;
                let (sender, conn) = http1::handshake(TokioIo::new(tls)).await?;
                tokio::spawn(conn);
                sender
            }
            None => {
                let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn);
                sender
            }
        };
        Ok(Conn {
            sender,
            host: addr.to_string(),
            authorization: client.token.as_ref().map(|t| format!("Bearer {t}")),
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
        if let Some(a) = &self.authorization {
            req = req.header("authorization", a);
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
        Server::start_with(data_dir, fsync, None, Vec::new()).await
    }

    /// A daemon with TLS and tokens.
    async fn start_with(
        data_dir: &Path,
        fsync: FsyncMode,
        tls: Option<crate::api::tls::TlsConfig>,
        tokens: Vec<crate::config::TokenConfig>,
    ) -> anyhow::Result<Server> {
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
            tokens,
            rate_limit: None,
            tls,
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
    bulk_ingest_as(addr, n, &Client::default()).await
}

/// [`bulk_ingest`] as `client` (TLS, token).
async fn bulk_ingest_as(addr: SocketAddr, n: u64, client: &Client) -> anyhow::Result<f64> {
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
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open_as(addr, &client).await?;
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
    crate::bench::settle_disk();
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
        // Idle: ready, then metrics scrapes only, until the writer has
        // built the id filter over the sealed segments in the background
        // (about 3 bytes per stored event; at most 10 s): the memory
        // figures then count it, and the queries below do not share the
        // cores with that start-up work.
        let mut m = String::new();
        for _ in 0..200 {
            let (_, body) = conn.call("GET", "/metrics", None, Bytes::new()).await?;
            m = String::from_utf8_lossy(&body).into_owned();
            if metric(&m, "evdb_id_filter_bytes") >= n as f64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

    // Ingest over HTTP at --fsync always, on fresh stores, once the loaded
    // stores' pages are on disk.
    crate::bench::settle_disk();
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

/// `evdb bench http --tls --auth`: NDJSON bulk ingest (`n` events in
/// 1,000-event bodies, 4 clients) against a daemon with TLS and/or a
/// bearer token required, next to the same against a plain daemon, in
/// the same run: two rounds each, alternating, medians compared.
pub fn http_secure(opts: &BenchOptions, tls: bool, auth: bool) -> anyhow::Result<Vec<Figure>> {
    let n = opts.events.min(2_000_000);
    let dir = tempfile::Builder::new()
        .prefix("evdb-bench-secure-")
        .tempdir_in(&opts.dir)?;
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, key.cert.pem())?;
    std::fs::write(&key_path, key.signing_key.serialize_pem())?;
    let tls_files = tls.then(|| crate::api::tls::TlsConfig {
        cert: cert_path.clone(),
        key: key_path.clone(),
        client_ca: None,
    });
    let token = "bench-ingest-token";
    let tokens = if auth {
        vec![crate::config::TokenConfig {
            name: "bench".into(),
            sha256: crate::api::auth::sha256(token),
            role: crate::config::Role::Ingest,
            sources: None,
        }]
    } else {
        Vec::new()
    };
    let client = Client {
        tls: if tls {
            let mut roots = tokio_rustls::rustls::RootCertStore::empty();
            roots.add(key.cert.der().clone())?;
            let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
                tokio_rustls::rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        } else {
            None
        },
        token: auth.then(|| token.to_owned()),
    };
    let what = match (tls, auth) {
        (true, true) => "TLS + auth",
        (true, false) => "TLS",
        (false, true) => "auth",
        (false, false) => "neither",
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (mut plain, mut secure) = (Vec::new(), Vec::new());
    for round in 0..2 {
        for secured in [false, true] {
            progress(
                opts,
                &format!(
                    "round {round}: NDJSON bulk ingest, {}",
                    if secured { what } else { "plain" }
                ),
            );
            let data = tempfile::Builder::new()
                .prefix("evdb-bench-secure-data-")
                .tempdir_in(&opts.dir)?;
            let rate = runtime.block_on(async {
                let server = if secured {
                    Server::start_with(
                        data.path(),
                        FsyncMode::Always,
                        tls_files.clone(),
                        tokens.clone(),
                    )
                    .await?
                } else {
                    Server::start(data.path(), FsyncMode::Always).await?
                };
                let as_client = if secured {
                    client.clone()
                } else {
                    Client::default()
                };
                let rate = bulk_ingest_as(server.http, n, &as_client).await;
                server.stop().await?;
                rate
            })?;
            if secured {
                secure.push(rate);
            } else {
                plain.push(rate);
            }
        }
    }
    Ok(vec![Figure::new(
        "http",
        &format!("ndjson_bulk_1000_per_body_4_clients with {what}"),
        n,
        "events_per_s",
        percentile(&mut secure, 0.5),
        "same without TLS and auth",
        percentile(&mut plain, 0.5),
    )])
}
