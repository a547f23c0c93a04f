//! `evdb serve`: opens the store, binds both listeners on one tokio
//! runtime, announces readiness, and shuts down gracefully on SIGINT or
//! SIGTERM (stop accepting, finish in-flight requests, sync, exit 0).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::grpc;
use crate::api::http::{AppState, router};
use crate::api::metrics::Metrics;
use crate::api::proto::chaukas::wire::chaukas_server_service_server::ChaukasServerServiceServer;
use crate::api::proto::evdb::v1::evdb_server::EvdbServer;
use crate::config::ServeConfig;
use crate::db::{Config, Db, DbError};
use crate::storage::{StorageConfig, SyncObserver};

/// Why the daemon could not start or stopped with an error. Each displays
/// as one line naming what and where.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    // The cause is part of each message (one line), not a separate source.
    #[error("cannot open data directory {path}: {cause}")]
    Open { path: PathBuf, cause: DbError },
    #[error("cannot listen for {what} on {addr}: {cause}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("cannot write the ready file {path}: {cause}")]
    ReadyFile {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot create a temporary data directory: {0}")]
    Ephemeral(std::io::Error),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{what} listener failed: {message}")]
    Listener { what: &'static str, message: String },
    #[error("closing the store failed: {0}")]
    Close(DbError),
}

/// Runs the daemon until a signal; blocks the calling thread.
pub fn run(config: ServeConfig) -> Result<(), ServeError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("evdb-rt")
        .build()
        .map_err(ServeError::Runtime)?;
    runtime.block_on(serve(config, shutdown_signal(), |ready| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "evdb ready http={} grpc={} data_dir={}",
            ready.http,
            ready.grpc,
            ready.data_dir.display()
        );
        let _ = out.flush();
    }))
}

/// Where a started daemon listens.
#[derive(Clone, Debug)]
pub struct Ready {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub data_dir: PathBuf,
}

/// How long shutdown waits for open connections to finish their requests.
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// HTTP/2 flow control of the gRPC listener: how many bytes a client may
/// send on one stream, and on one connection, before the server has read
/// them. The protocol's default (64 KiB for both) made a client streaming
/// 1,000-event messages (about 450 KiB each) stop for a window update
/// several times per message; these bound what one connection can hold
/// unread to `GRPC_CONNECTION_WINDOW` (docs/api.md).
pub const GRPC_STREAM_WINDOW: u32 = 1 << 20;
pub const GRPC_CONNECTION_WINDOW: u32 = 4 << 20;
/// Largest HTTP/2 frame the gRPC listener accepts (the default is 16 KiB):
/// fewer, larger DATA frames per message.
pub const GRPC_MAX_FRAME: u32 = 256 << 10;

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the daemon could never stop cleanly.
        tracing::error!("cannot install signal handlers; stopping");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Writes `contents` to `path` atomically (a temporary file renamed).
fn write_atomically(path: &Path, contents: &str) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(contents.as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Reloads the TLS certificate, key and client CA from their files on each
/// SIGHUP; open connections keep theirs, a failed reload keeps the old ones.
/// Without TLS a SIGHUP is logged and ignored (it does not stop the daemon).
async fn reload_certificates_on_sighup(
    mut hangups: tokio::signal::unix::Signal,
    tls: Option<Arc<crate::api::tls::TlsReloader>>,
) {
    while hangups.recv().await.is_some() {
        let Some(tls) = &tls else {
            tracing::warn!("SIGHUP: no TLS configured, nothing to reload");
            continue;
        };
        match tls.reload() {
            Ok(()) => tracing::warn!("SIGHUP: TLS certificates reloaded"),
            Err(e) => {
                tracing::error!("SIGHUP: TLS certificates not reloaded, keeping the old ones: {e}")
            }
        }
    }
}

/// Applies `[retention]` at start and every `check_interval`.
async fn enforce_retention(
    db: Arc<Db>,
    retention: crate::config::Retention,
    metrics: Arc<Metrics>,
) {
    loop {
        let db2 = db.clone();
        let policy = retention.policy.clone();
        let now = crate::event::Timestamp::now();
        match tokio::task::spawn_blocking(move || db2.apply_retention_policy(&policy, now)).await {
            Ok(Ok(report)) => metrics.record_retention(&report),
            Ok(Err(e)) => tracing::warn!("retention failed: {e}"),
            Err(e) => tracing::warn!("retention task failed: {e}"),
        }
        tokio::time::sleep(retention.check_interval).await;
    }
}

/// Runs compaction per `[compaction]` every `check_interval` (first after
/// one interval: a start should not wait on a rewrite).
async fn run_compaction(db: Arc<Db>, compaction: crate::config::Compaction, metrics: Arc<Metrics>) {
    loop {
        tokio::time::sleep(compaction.check_interval).await;
        let db2 = db.clone();
        let opts = crate::maintenance::CompactOptions {
            policy: compaction.policy.clone(),
            now: crate::event::Timestamp::now(),
            force: false,
        };
        match tokio::task::spawn_blocking(move || db2.compact(&opts, |_| {})).await {
            Ok(Ok(report)) => metrics.record_compaction(&report),
            Ok(Err(e)) => tracing::warn!("compaction failed: {e}"),
            Err(e) => tracing::warn!("compaction task failed: {e}"),
        }
    }
}

/// Serves until `stop` resolves; `on_ready` is told the addresses once both
/// listeners accept connections (after the ready file is written).
pub async fn serve(
    config: ServeConfig,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(&Ready),
) -> Result<(), ServeError> {
    let _ephemeral;
    let data_dir = if config.ephemeral {
        let dir = tempfile::Builder::new()
            .prefix("evdb-ephemeral-")
            .tempdir()
            .map_err(ServeError::Ephemeral)?;
        let path = dir.path().to_path_buf();
        _ephemeral = Some(dir);
        path
    } else {
        _ephemeral = None;
        config.data_dir.clone()
    };
    let metrics = Metrics::new();
    let observer = {
        let m = metrics.clone();
        SyncObserver(Arc::new(move |d| m.observe_fsync(d)))
    };
    let db_config = Config {
        storage: StorageConfig {
            fsync: config.fsync,
            sync_observer: Some(observer),
            ..StorageConfig::default()
        },
        limits: config.limits.clone(),
        numeric_fields: config.numeric_fields.clone(),
        min_free_bytes: config.min_free_bytes,
    };
    let open_dir = data_dir.clone();
    let db = tokio::task::spawn_blocking(move || Db::open(&open_dir, db_config))
        .await
        .map_err(|e| ServeError::Listener {
            what: "startup",
            message: e.to_string(),
        })?
        .map_err(|cause| ServeError::Open {
            path: data_dir.clone(),
            cause,
        })?;
    let db = Arc::new(db);
    let bind = |what: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|cause| ServeError::Bind { what, addr, cause })
    };
    let http_listener = bind("HTTP", config.http).await?;
    let grpc_listener = bind("gRPC", config.grpc).await?;
    let local = |l: &TcpListener, what: &'static str, addr: SocketAddr| {
        l.local_addr()
            .map_err(|cause| ServeError::Bind { what, addr, cause })
    };
    let http_addr = local(&http_listener, "HTTP", config.http)?;
    let grpc_addr = local(&grpc_listener, "gRPC", config.grpc)?;

    let auth = Arc::new(crate::api::auth::Auth::new(config.tokens.clone()));
    let limiter = config
        .rate_limit
        .clone()
        .map(|c| Arc::new(crate::api::ratelimit::RateLimiter::new(c)));
    let (mut state, shutdown_tx) =
        AppState::new(db.clone(), metrics.clone(), data_dir.clone(), auth.clone());
    state.limiter = limiter.clone();
    let policies = Arc::new(crate::maintenance::Policies {
        retention: config.retention.as_ref().map(|r| r.policy.clone()),
        compaction: config.compaction.policy.clone(),
    });
    state.policies = policies.clone();
    let queries = Arc::new(crate::api::load::QueryGate::new(
        config.load.max_concurrent_queries,
    ));
    state.queries = queries.clone();
    state.request_timeout = config.load.request_timeout;
    let max_connections = config.load.max_connections;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };

    let app = router(state);
    let reloader = config
        .tls
        .as_ref()
        .map(|tls| crate::api::tls::TlsReloader::new(tls.clone()))
        .transpose()
        .map_err(ServeError::Tls)?;
    // Registered before the ready line, so that no SIGHUP can stop us.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    let reload_task = match hangups {
        Ok(h) => Some(tokio::spawn(reload_certificates_on_sighup(
            h,
            reloader.clone(),
        ))),
        Err(e) => {
            tracing::warn!("cannot watch SIGHUP ({e}): certificates will not be reloaded");
            None
        }
    };
    let http =
        match &reloader {
            Some(tls) => {
                let listener = crate::api::tls::TlsListener::new(http_listener, tls.clone())
                    .map_err(|cause| ServeError::Bind {
                        what: "HTTP",
                        addr: config.http,
                        cause,
                    })?;
                tokio::spawn(
                    axum::serve(
                        crate::api::load::LimitedListener::new(listener, max_connections),
                        app,
                    )
                    .with_graceful_shutdown(stopped(stop_rx.clone()))
                    .into_future(),
                )
            }
            None => tokio::spawn(
                axum::serve(
                    crate::api::load::LimitedListener::new(
                        http_listener.tap_io(|tcp| {
                            // Small answers go out at once (no Nagle delay).
                            let _ = tcp.set_nodelay(true);
                        }),
                        max_connections,
                    ),
                    app,
                )
                .with_graceful_shutdown(stopped(stop_rx.clone()))
                .into_future(),
            ),
        };
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    for name in [
        "",
        "chaukas.spec.server.v1.ChaukasServerService",
        "evdb.v1.Evdb",
    ] {
        health_reporter
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let health_task = tokio::spawn(grpc::watch_health(db.clone(), health_reporter.clone()));
    let retention_task = config
        .retention
        .clone()
        .map(|r| tokio::spawn(enforce_retention(db.clone(), r, metrics.clone())));
    let compaction_task = config.compaction.enabled.then(|| {
        tokio::spawn(run_compaction(
            db.clone(),
            config.compaction.clone(),
            metrics.clone(),
        ))
    });
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::api::proto::DESCRIPTORS)
        .build_v1()
        .map_err(|e| ServeError::Listener {
            what: "gRPC reflection",
            message: e.to_string(),
        })?;
    let chaukas = ChaukasServerServiceServer::new(grpc::chaukas::ChaukasService {
        db: db.clone(),
        metrics: metrics.clone(),
        limiter: limiter.clone(),
    })
    .max_decoding_message_size(grpc::REQUEST_BYTES_MAX)
    .max_encoding_message_size(grpc::RESPONSE_BYTES_MAX);
    let evdb = EvdbServer::new(grpc::evdb::EvdbService {
        db: db.clone(),
        metrics: metrics.clone(),
        limiter: limiter.clone(),
        shutdown: shutdown_tx.subscribe(),
        policies,
    })
    .max_decoding_message_size(grpc::REQUEST_BYTES_MAX)
    .max_encoding_message_size(grpc::RESPONSE_BYTES_MAX);
    use crate::api::tls::Conn;
    use futures_util::TryStreamExt;
    type Incoming =
        std::pin::Pin<Box<dyn futures_util::Stream<Item = std::io::Result<Conn>> + Send>>;
    let incoming: Incoming = match &reloader {
        Some(tls) => Box::pin(
            crate::api::tls::TlsListener::new(grpc_listener, tls.clone())
                .map_err(|cause| ServeError::Bind {
                    what: "gRPC",
                    addr: config.grpc,
                    cause,
                })?
                .into_incoming()
                .map_ok(|s| Conn::Tls(Box::new(s))),
        ),
        None => Box::pin(
            tonic::transport::server::TcpIncoming::from(grpc_listener)
                .with_nodelay(Some(true))
                .map_ok(Conn::Plain),
        ),
    };
    let incoming = Box::pin(crate::api::load::limited_incoming(
        incoming,
        max_connections,
    ));
    let builder = tonic::transport::Server::builder()
        .initial_stream_window_size(GRPC_STREAM_WINDOW)
        .initial_connection_window_size(GRPC_CONNECTION_WINDOW)
        .max_frame_size(GRPC_MAX_FRAME);
    let grpc = tokio::spawn(
        builder
            .layer(tower::layer::layer_fn({
                let metrics = metrics.clone();
                let queries = queries.clone();
                let request_timeout = config.load.request_timeout;
                move |inner| grpc::Observe {
                    inner,
                    metrics: metrics.clone(),
                    auth: auth.clone(),
                    queries: queries.clone(),
                    request_timeout,
                }
            }))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(chaukas)
            .add_service(evdb)
            .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone())),
    );

    let data_dir_text = data_dir.display().to_string();
    if let Some(path) = &config.ready_file {
        let ready = serde_json::json!({
            "http": http_addr.to_string(),
            "grpc": grpc_addr.to_string(),
            "data_dir": data_dir_text,
            "pid": std::process::id(),
        });
        write_atomically(path, &ready.to_string()).map_err(|cause| ServeError::ReadyFile {
            path: path.clone(),
            cause,
        })?;
    }
    on_ready(&Ready {
        http: http_addr,
        grpc: grpc_addr,
        data_dir: data_dir.clone(),
    });
    tracing::info!(%http_addr, %grpc_addr, data_dir = %data_dir_text, "serving");

    stop.await;
    tracing::info!("shutting down: draining in-flight requests");
    health_task.abort();
    for t in [retention_task, compaction_task, reload_task]
        .into_iter()
        .flatten()
    {
        t.abort();
    }
    for name in [
        "",
        "chaukas.spec.server.v1.ChaukasServerService",
        "evdb.v1.Evdb",
    ] {
        health_reporter
            .set_service_status(name, tonic_health::ServingStatus::NotServing)
            .await;
    }
    let _ = shutdown_tx.send(true);
    let _ = stop_tx.send(true);
    // Connections get DRAIN_TIMEOUT to finish; a client that never reads
    // its GOAWAY or close must not hold the shutdown (and the sync) hostage.
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    let (http_abort, grpc_abort) = (http.abort_handle(), grpc.abort_handle());
    let http_result = match tokio::time::timeout_at(deadline, http).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!("HTTP connections still open after {DRAIN_TIMEOUT:?}: closing them");
            http_abort.abort();
            Ok(Ok(()))
        }
    };
    let grpc_result = match tokio::time::timeout_at(deadline, grpc).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!("gRPC connections still open after {DRAIN_TIMEOUT:?}: closing them");
            grpc_abort.abort();
            Ok(Ok(()))
        }
    };
    let closing = db.clone();
    let closed = tokio::task::spawn_blocking(move || closing.close()).await;
    if let Some(path) = &config.ready_file {
        let _ = std::fs::remove_file(path);
    }
    match http_result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(ServeError::Listener {
                what: "HTTP",
                message: e.to_string(),
            });
        }
        Err(e) => {
            return Err(ServeError::Listener {
                what: "HTTP",
                message: e.to_string(),
            });
        }
    }
    match grpc_result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(ServeError::Listener {
                what: "gRPC",
                message: e.to_string(),
            });
        }
        Err(e) => {
            return Err(ServeError::Listener {
                what: "gRPC",
                message: e.to_string(),
            });
        }
    }
    match closed {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ServeError::Close(e)),
        Err(e) => Err(ServeError::Listener {
            what: "shutdown",
            message: e.to_string(),
        }),
    }
}
