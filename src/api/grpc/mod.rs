//! The gRPC listener's services (contract §4, §5): the Chaukas server,
//! `evdb.v1`, standard health and reflection. Errors become status codes
//! only in [`status`].

pub mod chaukas;
pub mod evdb;

use std::sync::Arc;
use std::time::Duration;

use tonic::{Code, Status};

use crate::db::{Db, DbError};
use crate::limits::Invalid;
use crate::query::QueryError;
use crate::storage::StorageError;

/// Largest request message accepted: a full batch plus framing.
pub const REQUEST_BYTES_MAX: usize = crate::limits::BATCH_SIZE_MAX + 1024 * 1024;
/// Largest response message sent (a page of 1,000 large events).
pub const RESPONSE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// The one mapping of errors to gRPC status codes.
pub fn status(e: DbError) -> Status {
    match e {
        DbError::Storage(StorageError::Poisoned(_) | StorageError::Closed)
        | DbError::Query(QueryError::Storage(StorageError::Poisoned(_) | StorageError::Closed)) => {
            Status::unavailable(e.to_string())
        }
        DbError::Query(QueryError::Invalid { field, reason }) => {
            Status::invalid_argument(format!("{field}: {reason}"))
        }
        DbError::TooLarge(invalid) => {
            Status::resource_exhausted(format!("{}: {}", invalid.field, invalid.reason))
        }
        DbError::Unavailable(why) => Status::unavailable(why),
        other => Status::internal(other.to_string()),
    }
}

/// An invalid event or argument: `INVALID_ARGUMENT` naming the field, or
/// `RESOURCE_EXHAUSTED` for a size limit.
pub fn invalid(e: &Invalid) -> Status {
    let code = if e.reason.contains("at most") && e.reason.contains("bytes") {
        Code::ResourceExhausted
    } else {
        Code::InvalidArgument
    };
    Status::new(code, format!("{}: {}", e.field, e.reason))
}

/// Runs blocking store work (queries read mapped files) on the blocking
/// pool, off the runtime's workers.
pub async fn blocking<T: Send + 'static>(
    db: Arc<Db>,
    f: impl FnOnce(&Db) -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(move || f(&db))
        .await
        .map_err(|e| Status::internal(format!("worker failed: {e}")))?
}

/// Keeps the standard health service in step with the store: NOT_SERVING
/// once it refuses writes.
pub async fn watch_health(db: Arc<Db>, reporter: tonic_health::server::HealthReporter) {
    let mut serving = true;
    loop {
        let ok = {
            let db = db.clone();
            tokio::task::spawn_blocking(move || {
                db.free_bytes();
                db.writes_refused().is_none()
            })
            .await
            .unwrap_or(false)
        };
        if ok != serving {
            serving = ok;
            let status = if ok {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for name in [
                "",
                "chaukas.spec.server.v1.ChaukasServerService",
                "evdb.v1.Evdb",
            ] {
                reporter.set_service_status(name, status).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every method the gRPC listener serves: the only values of the `route`
/// label (anything else counts as `unknown`, so clients cannot grow it).
const METHODS: &[&str] = &[
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/chaukas.spec.server.v1.ChaukasServerService/Healthz",
    "/chaukas.spec.server.v1.ChaukasServerService/GetCapabilities",
    "/chaukas.spec.server.v1.ChaukasServerService/IngestEvent",
    "/chaukas.spec.server.v1.ChaukasServerService/IngestEventBatch",
    "/chaukas.spec.server.v1.ChaukasServerService/QueryEvents",
    "/chaukas.spec.server.v1.ChaukasServerService/GetEventStats",
    "/evdb.v1.Evdb/Ingest",
    "/evdb.v1.Evdb/IngestStream",
    "/evdb.v1.Evdb/Get",
    "/evdb.v1.Evdb/Query",
    "/evdb.v1.Evdb/Stats",
    "/evdb.v1.Evdb/Delete",
    "/evdb.v1.Evdb/Compact",
    "/evdb.v1.Evdb/Tail",
];

/// The service name of the `chaukas-spec-client` 1.0.5 stubs. Its five
/// methods are the server's with the same messages on the wire (its ingest
/// answers are empty messages; ours parse as them), so calls to it are
/// served by the Chaukas server service.
const CHAUKAS_CLIENT_SERVICE: &str = "/chaukas.spec.client.v1.ChaukasClientService/";
const CHAUKAS_SERVER_SERVICE: &str = "/chaukas.spec.server.v1.ChaukasServerService/";

/// The edge of the gRPC listener, a tower layer: routes the Chaukas
/// client-stub service name to the server service, and records each call's
/// latency (until its response headers; a stream's lifetime is not a
/// latency) by method and status.
#[derive(Clone)]
pub struct Observe<S> {
    pub inner: S,
    pub metrics: Arc<crate::api::metrics::Metrics>,
    pub auth: Arc<crate::api::auth::Auth>,
    /// Query slots shared with the HTTP listener.
    pub queries: Arc<crate::api::load::QueryGate>,
    /// The deadline of unary calls.
    pub request_timeout: std::time::Duration,
}

/// Methods that run a query, a stats or an aggregation: they take a slot.
const QUERY_METHODS: &[&str] = &[
    "/evdb.v1.Evdb/Query",
    "/evdb.v1.Evdb/Stats",
    "/evdb.v1.Evdb/Aggregate",
    "/chaukas.spec.server.v1.ChaukasServerService/QueryEvents",
    "/chaukas.spec.server.v1.ChaukasServerService/GetEventStats",
];

/// Streaming methods (they last as long as the client wants) and
/// compaction (as long as the data needs): no deadline.
const STREAMING_METHODS: &[&str] = &[
    "/evdb.v1.Evdb/Compact",
    "/evdb.v1.Evdb/IngestStream",
    "/evdb.v1.Evdb/Tail",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
];

/// The caller the edge layer authenticated (None: open access).
pub fn principal<T>(req: &tonic::Request<T>) -> Option<crate::api::auth::Principal> {
    req.extensions()
        .get::<Option<crate::api::auth::Principal>>()
        .cloned()
        .flatten()
}

/// Refuses events of sources the caller's token may not write.
pub fn check_sources<'a>(
    principal: Option<&crate::api::auth::Principal>,
    sources: impl IntoIterator<Item = &'a str>,
) -> Result<(), Status> {
    crate::api::auth::Auth::check_sources(principal, sources).map_err(|e| auth_status(&e))
}

/// `RESOURCE_EXHAUSTED` with a `retry-after` (seconds) for a rate limit.
pub fn limited_status(e: &crate::api::ratelimit::Limited) -> Status {
    let mut s = Status::resource_exhausted(e.to_string());
    if let Ok(v) = e.retry_after_s().to_string().parse() {
        s.metadata_mut().insert("retry-after", v);
    }
    s
}

/// `UNAUTHENTICATED` or `PERMISSION_DENIED` for an auth failure.
pub fn auth_status(e: &crate::api::auth::AuthError) -> Status {
    use crate::api::auth::AuthError;
    match e {
        AuthError::Missing | AuthError::Invalid => Status::unauthenticated(e.to_string()),
        AuthError::Forbidden { .. } | AuthError::Source { .. } => {
            Status::permission_denied(e.to_string())
        }
    }
}

impl<S, B> tower::Service<axum::http::Request<B>> for Observe<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: axum::http::Request<B>) -> Self::Future {
        if let Some(method) = req.uri().path().strip_prefix(CHAUKAS_CLIENT_SERVICE)
            && let Ok(uri) = format!("{CHAUKAS_SERVER_SERVICE}{method}").parse()
        {
            *req.uri_mut() = uri;
        }
        let path = req.uri().path();
        let route = METHODS
            .iter()
            .find(|m| **m == path)
            .map_or("unknown", |m| *m);
        let started = std::time::Instant::now();
        let metrics = self.metrics.clone();
        let need = crate::api::auth::grpc_need(path);
        let header = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match self.auth.check(header, need) {
            Ok(principal) => {
                req.extensions_mut().insert(principal);
            }
            Err(e) => {
                let resp = auth_status(&e).into_http();
                metrics.observe_request(
                    crate::api::metrics::RouteLabels {
                        protocol: "grpc",
                        method: "POST".to_owned(),
                        route: route.to_owned(),
                        status: auth_status(&e).code() as u16,
                    },
                    started.elapsed(),
                );
                return Box::pin(async move { Ok(resp) });
            }
        }
        let gate = QUERY_METHODS.contains(&route).then(|| self.queries.clone());
        let deadline = (!STREAMING_METHODS.contains(&route)).then_some(self.request_timeout);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let _slot = match gate {
                Some(gate) => match gate.enter().await {
                    Ok(slot) => Some(slot),
                    Err(busy) => {
                        let resp = Status::resource_exhausted(busy.to_string()).into_http();
                        metrics.observe_request(
                            crate::api::metrics::RouteLabels {
                                protocol: "grpc",
                                method: "POST".to_owned(),
                                route: route.to_owned(),
                                status: Code::ResourceExhausted as u16,
                            },
                            started.elapsed(),
                        );
                        return Ok(resp);
                    }
                },
                None => None,
            };
            let resp = match deadline {
                Some(limit) => match tokio::time::timeout(limit, fut).await {
                    Ok(resp) => resp,
                    Err(_) => Ok(Status::deadline_exceeded(format!(
                        "the call took longer than request_timeout ({} s)",
                        limit.as_secs_f64()
                    ))
                    .into_http()),
                },
                None => fut.await,
            };
            if let Ok(r) = &resp {
                // Trailers-only answers (errors) carry grpc-status in the
                // headers; a successful unary call's status is 0.
                let code = r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u16>().ok())
                    .unwrap_or(0);
                metrics.observe_request(
                    crate::api::metrics::RouteLabels {
                        protocol: "grpc",
                        method: "POST".to_owned(),
                        route: route.to_owned(),
                        status: code,
                    },
                    started.elapsed(),
                );
            }
            resp
        })
    }
}
