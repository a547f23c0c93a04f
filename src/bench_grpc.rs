//! `evdb bench grpc`: the gRPC figures of `docs/PERFORMANCE.md`, measured
//! over loopback against a daemon in this process, each next to its SQLite
//! baseline (or, where none applies, the target).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use tonic::transport::Channel;

use crate::api::chaukas;
use crate::api::proto::chaukas::common::v1 as pb;
use crate::api::proto::chaukas::server::v1 as server;
use crate::api::proto::chaukas::server::v1::chaukas_server_service_client::ChaukasServerServiceClient;
use crate::api::proto::evdb::v1 as ev;
use crate::api::proto::evdb::v1::evdb_client::EvdbClient;
use crate::bench::{BenchOptions, Figure, START, Sqlite, percentile, progress};
use crate::bench_http::{Server, sqlite_rate};
use crate::db::{AppendOutcome, Config, Db};
use crate::event::Timestamp;
use crate::generator::Rng;
use crate::storage::FsyncMode;

/// Events per Chaukas session in the dataset (about).
const SESSION_EVENTS: u64 = 200;

const KINDS: [(pb::EventType, pb::EventStatus); 6] = [
    (pb::EventType::SessionStart, pb::EventStatus::Started),
    (pb::EventType::AgentStart, pb::EventStatus::Started),
    (
        pb::EventType::ModelInvocationEnd,
        pb::EventStatus::Completed,
    ),
    (pb::EventType::ToolCallStart, pb::EventStatus::InProgress),
    (pb::EventType::ToolCallEnd, pb::EventStatus::Completed),
    (pb::EventType::SessionEnd, pb::EventStatus::Completed),
];

/// The `i`th Chaukas event of the dataset: sessions of about 200 events,
/// four interleaved at a time, ten tenants.
fn chaukas_event(r: &mut Rng, i: u64) -> pb::Event {
    let session = i / SESSION_EVENTS + r.below(4);
    let (kind, status) = KINDS[r.below(KINDS.len() as u64) as usize];
    let severity = match r.below(100) {
        0..=9 => pb::Severity::Debug,
        10..=84 => pb::Severity::Info,
        85..=94 => pb::Severity::Warn,
        _ => pb::Severity::Error,
    };
    let micros = START.as_micros() + i as i64 * 100;
    pb::Event {
        event_id: format!("ch-{i:012}"),
        tenant_id: format!("tenant-{}", session % 10),
        project_id: "proj".into(),
        session_id: format!("sess-{session}"),
        span_id: format!("span-{i}"),
        trace_id: format!("trace-{session}"),
        agent_id: format!("agent-{}", r.below(8)),
        agent_name: "planner".into(),
        r#type: kind as i32,
        severity: severity as i32,
        status: status as i32,
        timestamp: Some(prost_types::Timestamp {
            seconds: micros.div_euclid(1_000_000),
            nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
        }),
        content: Some(pb::event::Content::Message(pb::MessageContent {
            role: "agent".into(),
            text: format!("step {i} of session {session}: looked up the next tool to call"),
            metadata: None,
        })),
        ..pb::Event::default()
    }
}

async fn connect(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?)
}

/// `n` events in 1,000-event messages over 4 concurrent client streams.
async fn stream_ingest(addr: SocketAddr, n: u64) -> anyhow::Result<f64> {
    const STREAMS: u64 = 4;
    const PER_MESSAGE: usize = 1000;
    let mut generator = crate::generator::Generator::new(0x6772_7063, START, 100);
    let template: Vec<ev::Event> = generator
        .batch(PER_MESSAGE)
        .into_iter()
        .map(|e| {
            let mut w = crate::api::grpc::evdb::event_out(&e);
            w.event_id.clear();
            w
        })
        .collect();
    let message = Arc::new(ev::IngestRequest { events: template });
    let messages_per_stream = n.div_ceil(PER_MESSAGE as u64 * STREAMS);
    let channel = connect(addr).await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..STREAMS {
        let mut client = EvdbClient::new(channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let message = message.clone();
        tasks.push(tokio::spawn(async move {
            let stream = futures_util::stream::iter(
                (0..messages_per_stream).map(move |_| (*message).clone()),
            );
            let r = client.ingest_stream(stream).await?.into_inner();
            anyhow::Ok(r.collected)
        }));
    }
    let mut stored = 0;
    for t in tasks {
        stored += t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let want = messages_per_stream * STREAMS * PER_MESSAGE as u64;
    anyhow::ensure!(stored == want, "stored {stored} of {want} events");
    Ok(stored as f64 / secs)
}

/// Tail delivery latency (ms, one sample per event): from the moment the
/// producer holds its acknowledgement to the moment the subscriber holds
/// the event (0 when the event arrived first), at `rate` events/s.
async fn tail_latency(addr: SocketAddr, rate: u64, seconds: u64) -> anyhow::Result<Vec<f64>> {
    const PER_BATCH: u64 = 1000;
    let channel = connect(addr).await?;
    let mut sub = EvdbClient::new(channel.clone())
        .tail(ev::TailRequest::default())
        .await?
        .into_inner();
    let batches = rate * seconds / PER_BATCH;
    let period = Duration::from_secs_f64(PER_BATCH as f64 / rate as f64);
    let receiver = tokio::spawn(async move {
        let mut seen: Vec<(u64, Instant)> = Vec::with_capacity((batches * PER_BATCH) as usize);
        while (seen.len() as u64) < batches * PER_BATCH {
            let Some(e) = sub.message().await? else {
                break;
            };
            let batch = e
                .event_id
                .strip_prefix('b')
                .and_then(|s| s.split('-').next())
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(u64::MAX);
            seen.push((batch, Instant::now()));
        }
        anyhow::Ok(seen)
    });
    let mut producer = EvdbClient::new(channel);
    let mut acks: HashMap<u64, Instant> = HashMap::new();
    let mut next = Instant::now();
    for b in 0..batches {
        tokio::time::sleep_until(next.into()).await;
        next += period;
        let events = (0..PER_BATCH)
            .map(|i| ev::Event {
                event_id: format!("b{b}-{i}"),
                source_system: "bench".into(),
                event_type: "tick".into(),
                data_json: format!(r#"{{"batch":{b},"i":{i}}}"#),
                ..ev::Event::default()
            })
            .collect();
        producer.ingest(ev::IngestRequest { events }).await?;
        acks.insert(b, Instant::now());
    }
    let seen = tokio::time::timeout(Duration::from_secs(60), receiver).await???;
    anyhow::ensure!(
        seen.len() as u64 == batches * PER_BATCH,
        "the tail delivered {} of {} events",
        seen.len(),
        batches * PER_BATCH
    );
    Ok(seen
        .iter()
        .filter_map(|(b, at)| {
            let ack = acks.get(b)?;
            Some(at.saturating_duration_since(*ack).as_secs_f64() * 1e3)
        })
        .collect())
}

/// Every figure of the `grpc` suite.
pub fn grpc(opts: &BenchOptions) -> anyhow::Result<Vec<Figure>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let n = opts.events;
    let mut figures = Vec::new();

    // A store of `n` Chaukas events and its SQLite twin.
    let evdb_dir = tempfile::Builder::new()
        .prefix("evdb-bench-grpc-")
        .tempdir_in(&opts.dir)?;
    let sqlite_dir = tempfile::Builder::new()
        .prefix("evdb-bench-grpc-sqlite-")
        .tempdir_in(&opts.dir)?;
    let mut config = Config::default();
    config.storage.fsync = FsyncMode::Never;
    config.storage.segment_size_bytes = (n * 450 / 40).clamp(1 << 20, 128 << 20);
    let db = Db::open(evdb_dir.path(), config)?;
    let mut sqlite = Sqlite::open(&sqlite_dir.path().join("events.db"), false)?;
    let mut r = Rng::new(0x00c4_a0ca_5000_0001);
    let mut done = 0u64;
    let now = Timestamp::now();
    while done < n {
        let k = (n - done).min(10_000);
        let mut events = Vec::with_capacity(k as usize);
        for i in done..done + k {
            let bytes = chaukas_event(&mut r, i).encode_to_vec();
            events.push(chaukas::to_event(&bytes, now).map_err(|e| anyhow::anyhow!("{e:?}"))?);
        }
        sqlite.insert_batch(&events)?;
        for o in db.append_batch(events)? {
            anyhow::ensure!(matches!(o, AppendOutcome::Stored(_)), "not stored: {o:?}");
        }
        done += k;
        if done % 500_000 < 10_000 {
            progress(opts, &format!("grpc: loading Chaukas events {done}/{n}"));
        }
    }
    db.close()?;
    drop(db);
    sqlite.checkpoint()?;
    let sessions = (n / SESSION_EVENTS).max(1);

    progress(opts, "grpc: QueryEvents newest 100 of one session");
    let evdb_path = evdb_dir.path().to_owned();
    let mut samples = runtime.block_on(async {
        let server = Server::start(&evdb_path, FsyncMode::Always).await?;
        let mut client = ChaukasServerServiceClient::new(connect(server.grpc).await?)
            .max_decoding_message_size(64 << 20);
        let mut samples = Vec::new();
        for i in 0..1000u64 {
            let session = format!("sess-{}", (i * 7919) % sessions);
            let request = server::QueryEventsRequest {
                query: Some(pb::QueryRequest {
                    filter: Some(pb::QueryFilter {
                        session_id: session,
                        ..pb::QueryFilter::default()
                    }),
                    page_size: 100,
                    page_token: String::new(),
                    order_by_time: pb::SortOrder::Desc as i32,
                }),
            };
            let t = Instant::now();
            let r = client.query_events(request).await?.into_inner();
            samples.push(t.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(
                r.response.is_some_and(|r| !r.events.is_empty()),
                "a session query found nothing"
            );
        }
        server.stop().await?;
        anyhow::Ok(samples)
    })?;
    progress(opts, "grpc: SQLite baseline of the same query");
    let conn = rusqlite::Connection::open(sqlite_dir.path().join("events.db"))?;
    let mut stmt = conn.prepare(
        "SELECT event_id, ts, source_system, event_type, severity, correlation_id, data
         FROM events e WHERE source_system = 'chaukas'
         AND EXISTS (SELECT 1 FROM event_tags t WHERE t.seq = e.seq AND t.tag = ?1)
         ORDER BY ts DESC, seq DESC LIMIT 100",
    )?;
    // SQLite walks its timestamp index from the newest row down to the
    // session: seconds per query at 10 M events. As many runs as fit in 30 s
    // (at least 10).
    let mut base = Vec::new();
    let started = Instant::now();
    for i in 0..1000u64 {
        if i >= 10 && started.elapsed() > Duration::from_secs(30) {
            break;
        }
        let tag = format!("session:sess-{}", (i * 7919) % sessions);
        let t = Instant::now();
        let mut rows = stmt.query([tag])?;
        while let Some(row) = rows.next()? {
            let _: String = row.get(6)?;
        }
        base.push(t.elapsed().as_secs_f64() * 1e3);
    }
    for (q, unit) in [(0.5, "ms_p50"), (0.99, "ms_p99")] {
        figures.push(Figure::new(
            "grpc",
            "query_events_newest100_session",
            n,
            unit,
            percentile(&mut samples, q),
            "sqlite_in_process",
            percentile(&mut base, q),
        ));
    }
    drop(stmt);
    drop(conn);
    drop(sqlite);

    // Ingest and tail at --fsync always on fresh stores, once the loaded
    // stores' pages are on disk.
    crate::bench::settle_disk();
    let bulk_n = n.min(2_000_000);
    let dir = tempfile::Builder::new()
        .prefix("evdb-bench-grpc-ingest-")
        .tempdir_in(&opts.dir)?;
    let (bulk, mut latency) = runtime.block_on(async {
        progress(
            opts,
            &format!("grpc: streaming ingest of {bulk_n} events, 4 streams"),
        );
        let server = Server::start(&dir.path().join("bulk"), FsyncMode::Always).await?;
        let bulk = stream_ingest(server.grpc, bulk_n).await;
        server.stop().await?;
        progress(opts, "grpc: tail latency at 100,000 events/s for 5 s");
        let server = Server::start(&dir.path().join("tail"), FsyncMode::Always).await?;
        let latency = tail_latency(server.grpc, 100_000, 5).await;
        server.stop().await?;
        anyhow::Ok((bulk?, latency?))
    })?;
    let sqlite_bulk = sqlite_rate(dir.path(), (bulk_n as usize).min(200_000), 1000)?;
    figures.push(Figure::new(
        "grpc",
        "ingest_stream_1000_per_message_4_streams",
        bulk_n,
        "events_per_s",
        bulk,
        "sqlite_in_process_batch_1000",
        sqlite_bulk,
    ));
    let events = latency.len() as u64;
    for (q, unit) in [(0.5, "ms_p50"), (0.99, "ms_p99")] {
        figures.push(Figure::new(
            "grpc",
            "tail_ack_to_subscriber_at_100k_per_s",
            events,
            unit,
            percentile(&mut latency, q),
            "target",
            5.0,
        ));
    }
    Ok(figures)
}
