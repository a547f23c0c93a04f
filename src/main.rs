//! The `evdb` command line: parses arguments and calls into the library.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use evdb::api::json;
use evdb::bench::{self, BenchOptions};
use evdb::config::{ServeArgs, ServeConfig};
use evdb::query::{Cursor, Order, Query};
use evdb::storage::FsyncMode;
use evdb::{AppendOutcome, Config, Db, Severity, Timestamp};

/// mimalloc rather than the system allocator: ingest and queries allocate
/// many small, short-lived values on several threads, and glibc's malloc
/// cost about a tenth more CPU per ingested event (docs/PERFORMANCE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "evdb",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("EVDB_BUILD_INFO"), ")"),
    about = "An embedded event database"
)]
struct Cli {
    /// Log lines on stderr as `text` or `json` (one object per line);
    /// the level filter is EVDB_LOG.
    #[arg(long, global = true, env = "EVDB_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve HTTP and gRPC until SIGINT/SIGTERM.
    Serve {
        /// Default ./evdb-data.
        #[arg(long, env = "EVDB_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// HTTP listener, HOST:PORT (default 127.0.0.1:8000; port 0: any free).
        #[arg(long, env = "EVDB_HTTP")]
        http: Option<String>,
        /// gRPC listener, HOST:PORT (default 127.0.0.1:50051).
        #[arg(long, env = "EVDB_GRPC")]
        grpc: Option<String>,
        /// A TOML file with any of these settings (flags and env win).
        #[arg(long, env = "EVDB_CONFIG")]
        config: Option<PathBuf>,
        /// Use a fresh temporary data directory, removed on exit.
        #[arg(long, env = "EVDB_EPHEMERAL")]
        ephemeral: bool,
        /// Once listening, write {"http","grpc","data_dir","pid"} here.
        #[arg(long, env = "EVDB_READY_FILE")]
        ready_file: Option<PathBuf>,
        /// always (default) | interval:MS | never
        #[arg(long, env = "EVDB_FSYNC")]
        fsync: Option<String>,
        /// Allow listening beyond loopback without authentication.
        #[arg(long, env = "EVDB_INSECURE_LISTEN")]
        insecure_listen: bool,
        /// A JSON pointer into `data` extracted at ingest as a numeric
        /// column for aggregations (repeat, or comma-separate in the env).
        #[arg(
            long = "numeric-field",
            env = "EVDB_NUMERIC_FIELDS",
            value_delimiter = ','
        )]
        numeric_fields: Vec<String>,
    },
    /// Store NDJSON events read from a file or standard input.
    Ingest {
        #[arg(long, env = "EVDB_DATA_DIR", default_value = "./evdb-data")]
        data_dir: PathBuf,
        /// A running daemon's HTTP address (http://HOST:PORT) instead: the
        /// lines go to `POST /events/batch` as NDJSON, `--batch` per body.
        #[arg(long)]
        url: Option<String>,
        /// The NDJSON file; `-` or absent reads standard input.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Events per append.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// always | interval:MS | never (with --url, the daemon's own mode
        /// applies).
        #[arg(long, env = "EVDB_FSYNC", default_value = "always")]
        fsync: String,
        /// One JSON line per acknowledged batch (its stored ids; with
        /// --url, the daemon's counts), then a summary line.
        #[arg(long)]
        json: bool,
        /// Roll the active segment at this size (default 128 MiB; not with
        /// --url).
        #[arg(long)]
        segment_size_bytes: Option<u64>,
    },
    /// Print the events matching the filters, one JSON object per line.
    Query {
        #[command(flatten)]
        filters: Filters,
        /// 1..=1000.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long, default_value_t = 0)]
        offset: usize,
        /// desc | asc
        #[arg(long, default_value = "desc")]
        sort_order: String,
        /// From a previous page's `next_cursor` line.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Print counts by source, type and severity of the matching events.
    Stats {
        #[command(flatten)]
        filters: Filters,
        /// Also count distinct correlation ids (slower: reads every
        /// correlation-id bitmap).
        #[arg(long)]
        distinct_correlation_ids: bool,
    },
    /// Group the matching events and compute metrics (the text forms of
    /// `GET /events/aggregate`, docs/api.md); prints the JSON answer.
    Aggregate {
        #[command(flatten)]
        filters: Filters,
        /// source_system, event_type, severity, correlation_id, tag,
        /// tag:PREFIX or a JSON pointer (comma-separated or repeated).
        #[arg(long)]
        group_by: Vec<String>,
        /// minute | hour | day | week
        #[arg(long)]
        bucket: Option<String>,
        /// Bucket boundaries at this UTC offset, e.g. +02:00.
        #[arg(long)]
        tz_offset: Option<String>,
        /// Metric expressions, e.g. "count,error_rate,p95(/latency_ms)".
        #[arg(long, default_value = "count")]
        metrics: String,
        /// A metric name (NAME, NAME:asc, NAME:desc) or key.
        #[arg(long)]
        order_by: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
        /// Declared numeric fields, as the daemon was given them (their
        /// columns are read instead of the records).
        #[arg(
            long = "numeric-field",
            env = "EVDB_NUMERIC_FIELDS",
            value_delimiter = ','
        )]
        numeric_fields: Vec<String>,
    },
    /// Apply retention (when configured) and compact: rewrite segments
    /// without their deleted events, merge small ones.
    Compact {
        #[arg(long, env = "EVDB_DATA_DIR", default_value = "./evdb-data")]
        data_dir: PathBuf,
        /// A running daemon's HTTP address (http://HOST:PORT) instead; it
        /// uses its own configuration.
        #[arg(long)]
        url: Option<String>,
        /// Rewrite every segment with a deleted event now, whatever its
        /// deleted fraction or the age of its deletions.
        #[arg(long)]
        now: bool,
        /// `[retention]`, `[compaction]` and `[analytics]` from this TOML file.
        #[arg(long, env = "EVDB_CONFIG")]
        config: Option<PathBuf>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Point-in-time snapshots: create, list, delete.
    Snapshot {
        #[command(subcommand)]
        action: SnapshotAction,
    },
    /// Build a new data directory from a snapshot directory or tar archive.
    Restore {
        /// A snapshot directory or a tar archive of one.
        #[arg(long)]
        from: PathBuf,
        /// The new data directory (absent or empty).
        #[arg(long, env = "EVDB_DATA_DIR")]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Check every checksum and the catalog; exit 1 naming each damage.
    Verify {
        #[arg(long, env = "EVDB_DATA_DIR", default_value = "./evdb-data")]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Reproduce the figures of docs/PERFORMANCE.md next to their baselines.
    Bench {
        /// ingest | recovery | compression | query | stats | query,stats | analytics | maintenance | snapshot | http | grpc | http,grpc | all
        suite: String,
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// One JSON object per line and nothing else on stdout.
        #[arg(long)]
        json: bool,
        /// Where the bench creates its temporary stores.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// `http` only: NDJSON bulk ingest over TLS, next to plain HTTP.
        #[arg(long)]
        tls: bool,
        /// `http` only: NDJSON bulk ingest with a bearer token required,
        /// next to none.
        #[arg(long)]
        auth: bool,
    },
}

/// Where a snapshot command works: a data directory, or a running daemon.
#[derive(clap::Args)]
struct Target {
    #[arg(long, env = "EVDB_DATA_DIR", default_value = "./evdb-data")]
    data_dir: PathBuf,
    /// A running daemon's HTTP address (http://HOST:PORT) instead.
    #[arg(long)]
    url: Option<String>,
    /// One JSON object (per snapshot for `list`) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum SnapshotAction {
    /// Make a consistent point-in-time snapshot; print its id and path.
    Create {
        #[command(flatten)]
        target: Target,
    },
    /// List snapshots.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Delete a snapshot.
    Delete {
        id: String,
        #[command(flatten)]
        target: Target,
    },
}

/// The filters of contract §3, shared by `query` and `stats`.
#[derive(clap::Args)]
struct Filters {
    #[arg(long, env = "EVDB_DATA_DIR", default_value = "./evdb-data")]
    data_dir: PathBuf,
    /// A running daemon's HTTP address (http://HOST:PORT) instead of
    /// --data-dir (which the daemon holds locked).
    #[arg(long)]
    url: Option<String>,
    /// Any of (repeat the flag).
    #[arg(long)]
    source_system: Vec<String>,
    /// Any of (repeat the flag).
    #[arg(long)]
    event_type: Vec<String>,
    /// Exactly this level.
    #[arg(long)]
    severity: Option<String>,
    /// This level or above.
    #[arg(long)]
    min_severity: Option<String>,
    #[arg(long)]
    correlation_id: Option<String>,
    /// All of (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    tags: Vec<String>,
    /// RFC 3339, inclusive.
    #[arg(long)]
    start_time: Option<String>,
    /// RFC 3339, inclusive.
    #[arg(long)]
    end_time: Option<String>,
    /// Substring of the event's data.
    #[arg(long)]
    text: Option<String>,
}

impl Filters {
    fn to_query(&self) -> anyhow::Result<Query> {
        let level = |field: &str, v: &Option<String>| -> anyhow::Result<Option<Severity>> {
            v.as_deref()
                .map(|s| {
                    Severity::parse(s)
                        .ok_or_else(|| anyhow::anyhow!("{field}: unknown level {s:?}"))
                })
                .transpose()
        };
        let time = |field: &str, v: &Option<String>| -> anyhow::Result<Option<Timestamp>> {
            v.as_deref()
                .map(|s| {
                    Timestamp::parse_rfc3339(s).map_err(|e| anyhow::anyhow!("{field}: {e}: {s:?}"))
                })
                .transpose()
        };
        Ok(Query {
            sources: self.source_system.clone(),
            types: self.event_type.clone(),
            severity: level("severity", &self.severity)?,
            min_severity: level("min_severity", &self.min_severity)?,
            correlation_id: self.correlation_id.clone(),
            tags: self
                .tags
                .iter()
                .filter(|t| !t.is_empty())
                .cloned()
                .collect(),
            start: time("start_time", &self.start_time)?,
            end: time("end_time", &self.end_time)?,
            text: self.text.clone(),
            ..Query::default()
        })
    }

    /// The same filters as the HTTP API's query parameters (the daemon
    /// checks them).
    fn to_params(&self) -> Vec<(&'static str, String)> {
        let mut p = Vec::new();
        p.extend(
            self.source_system
                .iter()
                .map(|v| ("source_system", v.clone())),
        );
        p.extend(self.event_type.iter().map(|v| ("event_type", v.clone())));
        let one = [
            ("severity", &self.severity),
            ("min_severity", &self.min_severity),
            ("correlation_id", &self.correlation_id),
            ("start_time", &self.start_time),
            ("end_time", &self.end_time),
            ("text", &self.text),
        ];
        p.extend(
            one.into_iter()
                .filter_map(|(k, v)| v.clone().map(|v| (k, v))),
        );
        p.extend(
            self.tags
                .iter()
                .filter(|t| !t.is_empty())
                .map(|v| ("tags", v.clone())),
        );
        p
    }
}

/// `path?k=v&…`, form-encoded.
fn with_params(path: &str, params: &[(&str, String)]) -> String {
    let query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params.iter().map(|(k, v)| (*k, v.as_str())))
        .finish();
    if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    }
}

fn fsync_mode(text: &str) -> anyhow::Result<FsyncMode> {
    FsyncMode::parse(text).map_err(anyhow::Error::msg)
}

fn config(fsync: &str) -> anyhow::Result<Config> {
    let mut config = Config::default();
    config.storage.fsync = fsync_mode(fsync)?;
    Ok(config)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EVDB_LOG")
                .unwrap_or_else(|_| "warn".into()),
        );
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let result = match cli.command {
        Command::Serve {
            data_dir,
            http,
            grpc,
            config,
            ephemeral,
            ready_file,
            fsync,
            insecure_listen,
            numeric_fields,
        } => serve(ServeArgs {
            data_dir,
            http,
            grpc,
            config,
            ephemeral,
            ready_file,
            fsync,
            insecure_listen,
            numeric_fields,
        }),
        Command::Ingest {
            data_dir,
            url,
            file,
            batch,
            fsync,
            json,
            segment_size_bytes,
        } => match url {
            Some(_) if segment_size_bytes.is_some() => Err(anyhow::anyhow!(
                "--segment-size-bytes applies to --data-dir; a daemon uses its own configuration"
            )),
            Some(url) => ingest_remote(&url, file, batch, json),
            None => ingest(data_dir, file, batch, &fsync, json, segment_size_bytes),
        },
        Command::Query {
            filters,
            limit,
            offset,
            sort_order,
            cursor,
        } => run_query(&filters, limit, offset, &sort_order, cursor.as_deref()),
        Command::Stats {
            filters,
            distinct_correlation_ids,
        } => run_stats(&filters, distinct_correlation_ids),
        Command::Aggregate {
            filters,
            group_by,
            bucket,
            tz_offset,
            metrics,
            order_by,
            limit,
            numeric_fields,
        } => {
            let text = evdb::query::aggregate::AggregationText {
                group_by: group_by.iter().map(String::as_str).collect(),
                bucket: bucket.as_deref(),
                tz_offset: tz_offset.as_deref(),
                metrics: Some(metrics.as_str()),
                order_by: order_by.as_deref(),
                limit,
            };
            run_aggregate(&filters, &text, numeric_fields)
        }
        Command::Bench {
            suite,
            events,
            json,
            data_dir,
            tls,
            auth,
        } => run_bench(&suite, events, json, data_dir, (tls, auth)),
        Command::Snapshot { action } => run_snapshot(action),
        Command::Compact {
            data_dir,
            url,
            now,
            config,
            json,
        } => run_compact(&data_dir, url.as_deref(), now, config.as_deref(), json),
        Command::Restore {
            from,
            data_dir,
            json,
        } => run_restore(&from, &data_dir, json),
        Command::Verify { data_dir, json } => run_verify(&data_dir, json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("evdb: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once: the library's
/// errors already quote their source (`I/O error on PATH: …`).
fn describe(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = ServeConfig::resolve(args)?;
    evdb::server::run(config)?;
    Ok(ExitCode::SUCCESS)
}

/// Fails unless `dir` holds a store: commands that read or maintain one
/// must not create an empty store at a mistyped path (and report on it).
fn existing_store(dir: &std::path::Path) -> anyhow::Result<()> {
    if dir.join(evdb::storage::CATALOG_FILE).is_file() {
        return Ok(());
    }
    let what = if dir.exists() {
        format!("holds no {}", evdb::storage::CATALOG_FILE)
    } else {
        "does not exist".to_owned()
    };
    anyhow::bail!(
        "{}: not an evdb data directory ({what}); check --data-dir",
        dir.display()
    )
}

/// Opens the existing store at `dir` for a CLI command (see
/// [`existing_store`]); a store held by a running daemon says to pass
/// `--url` instead.
fn open_store(dir: &std::path::Path, config: Config) -> anyhow::Result<Db> {
    existing_store(dir)?;
    open_or_create(dir, config)
}

/// [`open_store`], creating the store if there is none (`ingest`).
fn open_or_create(dir: &std::path::Path, config: Config) -> anyhow::Result<Db> {
    match Db::open(dir, config) {
        Ok(db) => Ok(db),
        Err(e @ evdb::DbError::Storage(evdb::storage::StorageError::Locked(_))) => {
            anyhow::bail!("{e}: to work with a running daemon, pass --url http://HOST:PORT")
        }
        Err(e) => Err(e.into()),
    }
}

/// The NDJSON input: the file, or standard input for `-` or none.
fn open_input(file: Option<&PathBuf>) -> anyhow::Result<Box<dyn BufRead>> {
    Ok(match file {
        Some(p) if p.as_os_str() != "-" => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
        )),
        _ => Box::new(std::io::stdin().lock()),
    })
}

/// The input's lines as bytes, without `\n` or `\r\n`: a line that is
/// not UTF-8 is one refused event, not the end of the input.
fn ndjson_lines(input: Box<dyn BufRead>) -> impl Iterator<Item = std::io::Result<Vec<u8>>> {
    input.split(b'\n').map(|line| {
        line.map(|mut l| {
            if l.last() == Some(&b'\r') {
                l.pop();
            }
            l
        })
    })
}

#[derive(Default, Clone, Copy)]
struct Counts {
    stored: u64,
    duplicates: u64,
    failed: u64,
}

fn ingest(
    data_dir: PathBuf,
    file: Option<PathBuf>,
    batch: usize,
    fsync: &str,
    json_out: bool,
    segment_size_bytes: Option<u64>,
) -> anyhow::Result<ExitCode> {
    let batch = batch.clamp(1, evdb::limits::BATCH_EVENTS_MAX);
    let mut config = config(fsync)?;
    if let Some(bytes) = segment_size_bytes {
        config.storage.segment_size_bytes = bytes;
    }
    let input = open_input(file.as_ref())?;
    let db = open_or_create(&data_dir, config)?;
    let show_progress = !json_out && std::io::stderr().is_terminal();
    let mut stdout = std::io::stdout().lock();
    let mut counts = Counts::default();
    let mut pending = Vec::with_capacity(batch);
    let mut lines = Vec::with_capacity(batch);
    let mut errors = Vec::new();
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut line_no = 0u64;
    let flush = |pending: &mut Vec<evdb::Event>,
                 lines: &mut Vec<u64>,
                 errors: &mut Vec<serde_json::Value>,
                 stdout: &mut std::io::StdoutLock<'_>,
                 counts: &mut Counts|
     -> anyhow::Result<()> {
        let ids: Vec<String> = pending.iter().map(|e| e.id.clone()).collect();
        let outcomes = db.append_batch(std::mem::take(pending))?;
        let mut acked = Vec::new();
        let mut dups = Vec::new();
        for ((outcome, id), line) in outcomes.iter().zip(ids).zip(lines.iter()) {
            match outcome {
                AppendOutcome::Stored(_) => {
                    counts.stored += 1;
                    acked.push(id);
                }
                AppendOutcome::Duplicate(_) => {
                    counts.duplicates += 1;
                    dups.push(id);
                }
                AppendOutcome::Invalid(why) => {
                    counts.failed += 1;
                    errors.push(
                        serde_json::json!({"line": line, "field": why.field, "error": why.reason}),
                    );
                }
            }
        }
        lines.clear();
        if json_out {
            let line = serde_json::json!({"stored": acked, "duplicates": dups, "errors": errors});
            writeln!(stdout, "{line}")?;
            stdout.flush()?;
            errors.clear();
        }
        Ok(())
    };
    for line in ndjson_lines(input) {
        let line = line?;
        line_no += 1;
        if line.trim_ascii().is_empty() {
            continue;
        }
        let parsed = match std::str::from_utf8(&line) {
            Ok(text) => json::parse_event(text, Timestamp::now()),
            Err(e) => Err(evdb::limits::Invalid::new(
                "event",
                format!("not UTF-8: {e}"),
            )),
        };
        match parsed {
            Ok(event) => {
                pending.push(event);
                lines.push(line_no);
            }
            Err(why) => {
                counts.failed += 1;
                if !json_out {
                    eprintln!("line {line_no}: {why}");
                }
                errors.push(
                    serde_json::json!({"line": line_no, "field": why.field, "error": why.reason}),
                );
            }
        }
        if pending.len() >= batch {
            flush(
                &mut pending,
                &mut lines,
                &mut errors,
                &mut stdout,
                &mut counts,
            )?;
        }
        if show_progress && last_progress.elapsed().as_secs() >= 1 {
            eprint!("\ringested {} events ({line_no} lines)", counts.stored);
            last_progress = Instant::now();
        }
    }
    if !pending.is_empty() || !errors.is_empty() {
        flush(
            &mut pending,
            &mut lines,
            &mut errors,
            &mut stdout,
            &mut counts,
        )?;
    }
    db.close()?;
    if show_progress {
        eprintln!();
    }
    drop(stdout);
    summarize(&counts, started.elapsed().as_secs_f64(), json_out)
}

/// Bytes of NDJSON per request body of `evdb ingest --url` (the daemon
/// takes 16 MiB by default); a longer line goes alone.
const REMOTE_BODY_BYTES: usize = 4 << 20;
/// Answers 429 (rate limited) are retried a second apart, this many
/// times in a row at most.
const REMOTE_RETRIES_MAX: u32 = 10;

/// `evdb ingest --url`: the input's lines, blank ones skipped, go to
/// `POST /events/batch` as NDJSON bodies of `batch` lines; the daemon
/// validates them. Same summary and exit code as the local form; `--json`
/// prints the daemon's counts per body with each error's line number.
fn ingest_remote(
    url: &str,
    file: Option<PathBuf>,
    batch: usize,
    json_out: bool,
) -> anyhow::Result<ExitCode> {
    let batch = batch.clamp(1, evdb::limits::BATCH_EVENTS_MAX);
    let input = open_input(file.as_ref())?;
    let mut client = evdb::client::Client::new(url)?;
    let show_progress = !json_out && std::io::stderr().is_terminal();
    let mut stdout = std::io::stdout().lock();
    let mut counts = Counts::default();
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut body = Vec::new();
    let mut lines: Vec<u64> = Vec::with_capacity(batch);
    let mut send =
        |body: &mut Vec<u8>, lines: &mut Vec<u64>, counts: &mut Counts| -> anyhow::Result<()> {
            let mut tries = 0;
            let payload = bytes::Bytes::from(std::mem::take(body));
            let (status, answer) = loop {
                let (status, answer) = client.request(
                    "POST",
                    "/events/batch",
                    Some("application/x-ndjson"),
                    payload.clone(),
                )?;
                if status != 429 || tries >= REMOTE_RETRIES_MAX {
                    break (status, answer);
                }
                tries += 1;
                std::thread::sleep(std::time::Duration::from_secs(1));
            };
            let value: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
            if !(200..300).contains(&status) {
                anyhow::bail!(
                    "{url}/events/batch (lines {}..={}): {status}: {}",
                    lines.first().copied().unwrap_or(0),
                    lines.last().copied().unwrap_or(0),
                    value["error"].as_str().unwrap_or("request failed")
                );
            }
            let count = |k: &str| value[k].as_u64().unwrap_or(0);
            counts.stored += count("collected");
            counts.duplicates += count("duplicates");
            counts.failed += count("failed");
            let mut errors = Vec::new();
            for e in value["errors"].as_array().into_iter().flatten() {
                let line = e["index"]
                    .as_u64()
                    .and_then(|i| lines.get(i as usize))
                    .copied()
                    .unwrap_or(0);
                let why = e["error"].as_str().unwrap_or("invalid");
                if json_out {
                    errors
                        .push(serde_json::json!({"line": line, "field": e["field"], "error": why}));
                } else {
                    eprintln!("line {line}: {why}");
                }
            }
            if json_out {
                let line = serde_json::json!({"collected": count("collected"),
                "duplicates": count("duplicates"), "errors": errors});
                writeln!(stdout, "{line}")?;
                stdout.flush()?;
            }
            lines.clear();
            Ok(())
        };
    let mut line_no = 0u64;
    for line in ndjson_lines(input) {
        let line = line?;
        line_no += 1;
        if line.trim_ascii().is_empty() {
            continue;
        }
        if !lines.is_empty() && body.len() + line.len() > REMOTE_BODY_BYTES {
            send(&mut body, &mut lines, &mut counts)?;
        }
        body.extend_from_slice(&line);
        body.push(b'\n');
        lines.push(line_no);
        if lines.len() >= batch {
            send(&mut body, &mut lines, &mut counts)?;
        }
        if show_progress && last_progress.elapsed().as_secs() >= 1 {
            eprint!("\ringested {} events ({line_no} lines)", counts.stored);
            last_progress = Instant::now();
        }
    }
    if !lines.is_empty() {
        send(&mut body, &mut lines, &mut counts)?;
    }
    if show_progress {
        eprintln!();
    }
    summarize(&counts, started.elapsed().as_secs_f64(), json_out)
}

/// The last line of `evdb ingest`, and its exit code: 2 when some events
/// were rejected.
fn summarize(counts: &Counts, secs: f64, json_out: bool) -> anyhow::Result<ExitCode> {
    let Counts {
        stored,
        duplicates,
        failed,
    } = *counts;
    if json_out {
        let summary = serde_json::json!({"summary": {"stored": stored, "duplicates": duplicates,
            "failed": failed, "seconds": secs}});
        println!("{summary}");
    } else {
        println!("stored {stored}, duplicates {duplicates}, failed {failed} in {secs:.2}s");
    }
    Ok(if failed > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn run_query(
    filters: &Filters,
    limit: usize,
    offset: usize,
    sort_order: &str,
    cursor: Option<&str>,
) -> anyhow::Result<ExitCode> {
    if let Some(url) = &filters.url {
        let mut params = filters.to_params();
        params.push(("limit", limit.to_string()));
        params.push(("offset", offset.to_string()));
        params.push(("sort_order", sort_order.to_owned()));
        params.extend(cursor.map(|c| ("cursor", c.to_owned())));
        let body = remote_body(url, "GET", &with_params("/events", &params))?;
        let page: RemotePage = serde_json::from_slice(&body)?;
        let mut stdout = std::io::stdout().lock();
        for event in &page.events {
            writeln!(stdout, "{}", event.get())?;
        }
        if let Some(c) = page.next_cursor {
            writeln!(stdout, "{}", serde_json::json!({ "next_cursor": c }))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut query = filters.to_query()?;
    query.limit = limit;
    query.offset = offset;
    query.order = match sort_order {
        "desc" => Order::Desc,
        "asc" => Order::Asc,
        other => anyhow::bail!("sort_order: {other:?} is not desc or asc"),
    };
    query.cursor = cursor.map(Cursor::decode).transpose()?;
    let db = open_store(&filters.data_dir, Config::default())?;
    let page = db.query(&query)?;
    let mut stdout = std::io::stdout().lock();
    for event in &page.events {
        writeln!(stdout, "{}", json::event_to_json(event))?;
    }
    if let Some(c) = page.next_cursor {
        writeln!(
            stdout,
            "{}",
            serde_json::json!({ "next_cursor": c.encode() })
        )?;
    }
    db.close()?;
    Ok(ExitCode::SUCCESS)
}

fn run_stats(filters: &Filters, distinct_correlation_ids: bool) -> anyhow::Result<ExitCode> {
    if let Some(url) = &filters.url {
        let mut params = filters.to_params();
        if distinct_correlation_ids {
            params.push(("distinct_correlation_ids", "true".to_owned()));
        }
        print_body(&remote_body(
            url,
            "GET",
            &with_params("/events/stats", &params),
        )?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let query = filters.to_query()?;
    let db = open_store(&filters.data_dir, Config::default())?;
    let stats = db.stats_with(&query, distinct_correlation_ids)?;
    println!("{}", json::stats_to_json(&stats));
    db.close()?;
    Ok(ExitCode::SUCCESS)
}

fn run_aggregate(
    filters: &Filters,
    text: &evdb::query::aggregate::AggregationText<'_>,
    numeric_fields: Vec<String>,
) -> anyhow::Result<ExitCode> {
    if let Some(url) = &filters.url {
        // The daemon's own declared numeric fields apply.
        let mut params = filters.to_params();
        params.extend(text.group_by.iter().map(|g| ("group_by", (*g).to_owned())));
        let one = [
            ("bucket", text.bucket),
            ("tz_offset", text.tz_offset),
            ("metrics", text.metrics),
            ("order_by", text.order_by),
        ];
        params.extend(
            one.into_iter()
                .filter_map(|(k, v)| v.map(|v| (k, v.to_owned()))),
        );
        params.extend(text.limit.map(|l| ("limit", l.to_string())));
        let path = with_params("/events/aggregate", &params);
        print_body(&remote_body(url, "GET", &path)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let agg = evdb::query::aggregate::Aggregation::from_text(filters.to_query()?, text)?;
    let config = Config {
        numeric_fields,
        ..Config::default()
    };
    let db = open_store(&filters.data_dir, config)?;
    let started = std::time::Instant::now();
    let result = db.aggregate(&agg)?;
    let took = started.elapsed().as_secs_f64() * 1000.0;
    println!("{}", json::aggregate_to_json(&result, took));
    db.close()?;
    Ok(ExitCode::SUCCESS)
}

fn run_bench(
    suite: &str,
    events: u64,
    json_out: bool,
    data_dir: Option<PathBuf>,
    (tls, auth): (bool, bool),
) -> anyhow::Result<ExitCode> {
    let dir = data_dir.unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&dir)?;
    let opts = BenchOptions {
        events: events.max(1000),
        dir,
        progress: !json_out || std::io::stderr().is_terminal(),
    };
    if suite == "memory-probe" {
        // Internal step of the query suite: one number on stdout.
        let dir = opts.dir.clone();
        println!("{:.3}", bench::memory_probe(&dir)?);
        return Ok(ExitCode::SUCCESS);
    }
    if (tls || auth) && suite != "http" {
        anyhow::bail!("--tls and --auth apply to the http suite only");
    }
    let figures = match suite {
        "http" if tls || auth => evdb::bench_http::http_secure(&opts, tls, auth)?,
        "ingest" | "recovery" => bench::ingest(&opts)?,
        "compression" => bench::compression(&opts)?,
        "query" | "stats" => {
            let ds = bench::build_dataset(&opts)?;
            bench::query_suites(&opts, ds, suite)?
        }
        // Both over one dataset (building it is the slow part).
        "query,stats" | "stats,query" => {
            let ds = bench::build_dataset(&opts)?;
            bench::query_suites(&opts, ds, "all")?
        }
        "analytics" => evdb::bench_analytics::analytics(&opts)?,
        "maintenance" => evdb::bench_maintenance::maintenance(&opts)?,
        "snapshot" => evdb::bench_maintenance::snapshot(&opts)?,
        "http" => evdb::bench_http::http(&opts)?,
        "grpc" => evdb::bench_grpc::grpc(&opts)?,
        "http,grpc" | "grpc,http" => {
            let mut f = evdb::bench_http::http(&opts)?;
            f.extend(evdb::bench_grpc::grpc(&opts)?);
            f
        }
        "all" => {
            let mut f = bench::ingest(&opts)?;
            f.extend(bench::compression(&opts)?);
            let ds = bench::build_dataset(&opts)?;
            f.extend(bench::query_suites(&opts, ds, "all")?);
            f.extend(evdb::bench_http::http(&opts)?);
            f.extend(evdb::bench_grpc::grpc(&opts)?);
            f.extend(evdb::bench_analytics::analytics(&opts)?);
            f.extend(evdb::bench_maintenance::maintenance(&opts)?);
            f
        }
        other => anyhow::bail!(
            "bench suite {other:?} is not available in this build: ingest, recovery, compression, query, stats, analytics, maintenance, snapshot, http, grpc or all"
        ),
    };
    if json_out {
        for f in &figures {
            println!("{}", serde_json::to_string(f)?);
        }
    } else {
        bench::print_table(&figures);
    }
    Ok(ExitCode::SUCCESS)
}

fn snapshot_line(v: &serde_json::Value) -> String {
    format!(
        "{}  {}  {} events  {} bytes  {}",
        v["id"].as_str().unwrap_or(""),
        v["created_at"].as_str().unwrap_or(""),
        v["events"],
        v["bytes"],
        v["path"].as_str().unwrap_or("")
    )
}

fn info_value(s: &evdb::snapshot::SnapshotInfo) -> serde_json::Value {
    serde_json::json!({
        "id": s.id,
        "path": s.path.display().to_string(),
        "created_at": s.created_at,
        "events": s.events,
        "bytes": s.bytes,
    })
}

/// Calls the daemon at `url`; a non-2xx answer becomes an error with its
/// message.
fn remote(url: &str, method: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_slice(&remote_body(url, method, path)?)?)
}

/// [`remote`] returning the answer's bytes as the daemon sent them (its
/// field order).
fn remote_body(url: &str, method: &str, path: &str) -> anyhow::Result<bytes::Bytes> {
    let (status, body) = evdb::client::call(url, method, path)?;
    if !(200..300).contains(&status) {
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        anyhow::bail!(
            "{url}{path}: {status}: {}",
            value["error"].as_str().unwrap_or("request failed")
        );
    }
    Ok(body)
}

/// Prints a JSON answer of the daemon on one line, as it was sent.
fn print_body(body: &[u8]) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(body.trim_ascii())?;
    writeln!(stdout)?;
    Ok(())
}

/// A page of `GET /events`, each event kept as the daemon wrote it.
#[derive(serde::Deserialize)]
struct RemotePage {
    events: Vec<Box<serde_json::value::RawValue>>,
    next_cursor: Option<String>,
}

fn run_snapshot(action: SnapshotAction) -> anyhow::Result<ExitCode> {
    let open = |t: &Target| {
        existing_store(&t.data_dir)?;
        Db::open(&t.data_dir, Config::default()).map_err(|e| {
            anyhow::anyhow!(
                "cannot open data directory {}: {e} (to snapshot a running daemon, pass --url)",
                t.data_dir.display()
            )
        })
    };
    match action {
        SnapshotAction::Create { target } => {
            let v = match &target.url {
                Some(url) => remote(url, "POST", "/admin/snapshots")?,
                None => {
                    let db = open(&target)?;
                    if std::io::stderr().is_terminal() {
                        eprintln!("evdb: snapshotting {} …", target.data_dir.display());
                    }
                    let info = db.snapshot()?;
                    db.close()?;
                    info_value(&info)
                }
            };
            if target.json {
                println!("{v}");
            } else {
                println!(
                    "{} {}",
                    v["id"].as_str().unwrap_or(""),
                    v["path"].as_str().unwrap_or("")
                );
            }
        }
        SnapshotAction::List { target } => {
            let all: Vec<serde_json::Value> = match &target.url {
                Some(url) => remote(url, "GET", "/admin/snapshots")?["snapshots"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
                None => {
                    let db = open(&target)?;
                    let all = db.snapshots()?.iter().map(info_value).collect();
                    db.close()?;
                    all
                }
            };
            for v in &all {
                if target.json {
                    println!("{v}");
                } else {
                    println!("{}", snapshot_line(v));
                }
            }
        }
        SnapshotAction::Delete { id, target } => {
            let deleted = match &target.url {
                Some(url) => {
                    remote(url, "DELETE", &format!("/admin/snapshots/{id}"))?;
                    true
                }
                None => {
                    let db = open(&target)?;
                    let d = db.delete_snapshot(&id)?;
                    db.close()?;
                    d
                }
            };
            if !deleted {
                anyhow::bail!("no snapshot {id}");
            }
            if target.json {
                println!("{}", serde_json::json!({ "deleted": 1, "id": id }));
            } else {
                println!("deleted {id}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_compact(
    dir: &std::path::Path,
    url: Option<&str>,
    force: bool,
    config_file: Option<&std::path::Path>,
    json_out: bool,
) -> anyhow::Result<ExitCode> {
    let report: serde_json::Value = match url {
        Some(url) => {
            if config_file.is_some() {
                anyhow::bail!(
                    "--config applies to --data-dir; a daemon uses its own configuration"
                );
            }
            let path = if force {
                "/admin/compact?now=true"
            } else {
                "/admin/compact"
            };
            remote(url, "POST", path)?
        }
        None => {
            let file = match config_file {
                Some(p) => evdb::config::FileConfig::load(p)?,
                None => evdb::config::FileConfig::default(),
            };
            let policies = evdb::maintenance::Policies {
                retention: file
                    .retention
                    .as_ref()
                    .map(evdb::config::resolve_retention)
                    .transpose()?
                    .map(|r| r.policy),
                compaction: evdb::config::resolve_compaction(
                    &file.compaction.clone().unwrap_or_default(),
                )?
                .policy,
            };
            let config = Config {
                numeric_fields: file.analytics.map(|a| a.numeric_fields).unwrap_or_default(),
                ..Config::default()
            };
            existing_store(dir)?;
            let db = Db::open(dir, config).map_err(|e| {
                anyhow::anyhow!(
                    "cannot open data directory {}: {e} (to compact a running daemon's store, pass --url)",
                    dir.display()
                )
            })?;
            let terminal = std::io::stderr().is_terminal() && !json_out;
            let report = db.maintain(&policies, Timestamp::now(), force, |p| {
                if terminal && p.bytes_total > 0 {
                    eprint!(
                        "\revdb: compacting {:>5.1}% ({} of {} MiB)   ",
                        p.bytes_done as f64 * 100.0 / p.bytes_total as f64,
                        p.bytes_done >> 20,
                        p.bytes_total >> 20
                    );
                }
            })?;
            if terminal && report.compaction.bytes_before > 0 {
                eprintln!();
            }
            db.close()?;
            serde_json::to_value(&report)?
        }
    };
    if json_out {
        println!("{report}");
    } else {
        if let Some(r) = report.get("retention").filter(|r| !r.is_null()) {
            println!(
                "retention: {} segments dropped, {} events deleted, {} bytes freed",
                r["segments_dropped"], r["events_deleted"], r["bytes_freed"]
            );
        }
        let c = &report["compaction"];
        println!(
            "compaction: {} segments became {}, {} deleted events removed, {} -> {} bytes in {} ms",
            c["segments_in"],
            c["segments_out"],
            c["events_removed"],
            c["bytes_before"],
            c["bytes_after"],
            c["elapsed_ms"]
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run_restore(
    from: &std::path::Path,
    to: &std::path::Path,
    json_out: bool,
) -> anyhow::Result<ExitCode> {
    if std::io::stderr().is_terminal() {
        eprintln!("evdb: restoring {} into {} …", from.display(), to.display());
    }
    let files = evdb::snapshot::restore(from, to)?;
    // Open it once: recovery checks the catalog against the segments.
    let db = Db::open(to, Config::default())
        .map_err(|e| anyhow::anyhow!("restored {} but it does not open: {e}", to.display()))?;
    let events = db.stats(&Query::default())?.total;
    db.close()?;
    if json_out {
        println!(
            "{}",
            serde_json::json!({ "data_dir": to.display().to_string(), "files": files, "events": events })
        );
    } else {
        println!(
            "restored {events} events ({files} files) into {}",
            to.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run_verify(dir: &std::path::Path, json_out: bool) -> anyhow::Result<ExitCode> {
    existing_store(dir)?;
    let db = match Db::open(dir, Config::default()) {
        Ok(db) => db,
        Err(e @ evdb::DbError::Storage(evdb::storage::StorageError::Locked(_))) => {
            anyhow::bail!("{e}: stop the daemon first, or verify a snapshot or a restored copy")
        }
        Err(e) => {
            // It does not even open: that is the one damage to report.
            let d = evdb::snapshot::damage_of_open_error(dir, &e);
            if json_out {
                println!(
                    "{}",
                    serde_json::json!({ "file": d.file.display().to_string(), "offset": d.offset, "error": d.reason })
                );
            } else {
                println!("{d}");
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    let terminal = std::io::stderr().is_terminal() && !json_out;
    let damages = evdb::snapshot::verify(&db, |segment, i, total| {
        if terminal {
            eprint!("\revdb: verifying segment {segment} ({}/{total})   ", i + 1);
        }
    });
    if terminal {
        eprintln!();
    }
    db.close()?;
    for d in &damages {
        if json_out {
            println!(
                "{}",
                serde_json::json!({ "file": d.file.display().to_string(), "offset": d.offset, "error": d.reason })
            );
        } else {
            println!("{d}");
        }
    }
    if damages.is_empty() {
        if !json_out {
            println!("ok: every checksum and the catalog agree");
        }
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::FAILURE)
    }
}
