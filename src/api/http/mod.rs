//! The HTTP listener (contract §3, seed 002 routes): axum handlers that
//! turn requests into `Db` calls and answers into JSON. JSON and HTTP
//! types live here and in `api::json`; errors become answers only in
//! [`error`].

mod admin;
pub mod body;
pub mod error;
mod ingest;
pub mod params;
mod tail;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Path, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::watch;
use tower_http::compression::CompressionLayer;
use tower_http::decompression::RequestDecompressionLayer;

use crate::api::auth::{Auth, http_need};
use crate::api::json::{self, write_event};
use crate::api::metrics::{Metrics, RouteLabels};
use crate::db::Db;
use crate::event::Timestamp;
use crate::query::{Order, QUERY_LIMIT_MAX, Query};

use error::ApiError;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub db: Arc<Db>,
    pub metrics: Arc<Metrics>,
    pub data_dir: PathBuf,
    pub started: Instant,
    /// Events stored through this process.
    pub processed: Arc<AtomicU64>,
    /// Turns true when the daemon begins shutting down (ends live tails).
    pub shutdown: watch::Receiver<bool>,
    pub auth: Arc<Auth>,
    /// Per-source rate limits (None: none).
    pub limiter: Option<Arc<crate::api::ratelimit::RateLimiter>>,
    /// Retention and compaction, for `POST /admin/compact`.
    pub policies: Arc<crate::maintenance::Policies>,
    /// Query slots shared with the gRPC listener.
    pub queries: Arc<crate::api::load::QueryGate>,
    pub request_timeout: std::time::Duration,
}

impl AppState {
    pub fn new(
        db: Arc<Db>,
        metrics: Arc<Metrics>,
        data_dir: PathBuf,
        auth: Arc<Auth>,
    ) -> (AppState, watch::Sender<bool>) {
        let (tx, rx) = watch::channel(false);
        (
            AppState {
                db,
                metrics,
                data_dir,
                started: Instant::now(),
                processed: Arc::new(AtomicU64::new(0)),
                shutdown: rx,
                auth,
                limiter: None,
                policies: Arc::default(),
                queries: Arc::new(crate::api::load::QueryGate::new(
                    crate::api::load::LoadLimits::default().max_concurrent_queries,
                )),
                request_timeout: crate::api::load::LoadLimits::default().request_timeout,
            },
            tx,
        )
    }
}

/// Every route of contract §3.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/events",
            post(ingest::one).get(query_events).delete(delete_before),
        )
        .route("/events/batch", post(ingest::batch))
        .route("/events/stats", get(stats))
        .route("/events/aggregate", get(aggregate))
        .route("/events/stream", get(tail::stream))
        .route("/events/correlation/{id}", get(correlation))
        .route("/events/{event_id}", get(get_event).delete(delete_event))
        .route("/admin/compact", post(admin::compact))
        .route("/admin/snapshots", post(admin::create).get(admin::list))
        .route(
            "/admin/snapshots/{id}",
            axum::routing::delete(admin::remove),
        )
        .route("/admin/snapshots/{id}/archive", get(admin::archive))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn_with_state(state.clone(), bound))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(CompressionLayer::new())
        .layer(RequestDecompressionLayer::new())
        .layer(middleware::from_fn(check_content_encoding))
        .with_state(state)
}

/// The largest plain-text error body [`json_errors`] rewrites.
const REJECTION_TEXT_MAX: usize = 16 * 1024;

/// Gives the contract's JSON error body to the refusals axum's extractors
/// answer in plain text (a path segment that is not UTF-8, a WebSocket
/// route asked without `Upgrade`, …): same status, the text as `error`,
/// and as `field` the name the text quotes in backticks, if any.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let plain = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain"));
    if !(resp.status().is_client_error() && plain) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, REJECTION_TEXT_MAX).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Err(_) => String::new(),
    };
    let text = if text.is_empty() {
        parts
            .status
            .canonical_reason()
            .unwrap_or("bad request")
            .to_owned()
    } else {
        text
    };
    let mut error = ApiError::new(parts.status, text.clone());
    if let Some(field) = text.split('`').nth(1).filter(|f| !f.is_empty()) {
        error = error.with_field(field);
    }
    let mut answer = error.into_response();
    // Keep what the rejection said beyond its body (`Allow`, `Sec-WebSocket-Version`, …).
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().append(name.clone(), value.clone());
        }
    }
    answer
}

/// Request bodies may be gzip-compressed (or `identity`, in any case);
/// any other `Content-Encoding` is refused here with the contract's error
/// body, where the decompression layer would answer an empty 415.
async fn check_content_encoding(mut req: Request, next: Next) -> Response {
    if let Some(value) = req.headers().get(header::CONTENT_ENCODING) {
        let text = value.to_str().unwrap_or("?").trim();
        let known = ["gzip", "identity"]
            .into_iter()
            .find(|known| text.eq_ignore_ascii_case(known));
        let Some(known) = known else {
            return ApiError::unsupported_media(format!(
                "Content-Encoding {text:?} is not accepted: send the body as is or with gzip"
            ))
            .with_field("content-encoding")
            .into_response();
        };
        // The decompression layer matches the lower-case name only.
        req.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static(known));
    }
    next.run(req).await
}

/// Routes that run a query, a stats or an aggregation: they take a slot.
const QUERY_ROUTES: &[&str] = &[
    "/events",
    "/events/stats",
    "/events/aggregate",
    "/events/correlation/{id}",
];

/// Holds each request to the deadline (`[limits] request_timeout`, body
/// included; the WebSocket tail, compaction and snapshots are exempt) and each query to a slot
/// (`max_concurrent_queries`, waiting up to a second for one).
async fn bound(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    // The tail lives as long as the client wants; compaction and
    // snapshots take as long as the data needs.
    if matches!(
        route.as_str(),
        "/events/stream" | "/admin/compact" | "/admin/snapshots"
    ) {
        return next.run(req).await;
    }
    let _slot = if req.method() == axum::http::Method::GET && QUERY_ROUTES.contains(&route.as_str())
    {
        match state.queries.enter().await {
            Ok(slot) => Some(slot),
            Err(busy) => {
                let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, busy.to_string());
                e.retry_after_s = Some(1);
                return e.into_response();
            }
        }
    } else {
        None
    };
    let limit = state.request_timeout;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => {
            let mut resp = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request took longer than request_timeout ({} s)",
                    limit.as_secs_f64()
                ),
            )
            .into_response();
            // The body may be half read: the connection cannot be reused,
            // and the client must not try.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            resp
        }
    }
}

/// Records each request's latency by route and status.
async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().as_str().to_owned();
    let resp = next.run(req).await;
    state.metrics.observe_request(
        RouteLabels {
            protocol: "http",
            method,
            route,
            status: resp.status().as_u16(),
        },
        started.elapsed(),
    );
    resp
}

/// Checks the bearer token against what the route needs; the caller's
/// `Principal` goes into the request's extensions for the handlers (source
/// restrictions are checked where the events are read).
async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let need = http_need(req.method(), req.uri().path());
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match state.auth.check(header, need) {
        Ok(principal) => {
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
}

/// A JSON body that is already text.
fn json_text(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Runs blocking store work (queries touch mapped files) off the runtime's
/// worker threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("worker failed: {e}")))?
}

fn echo(q: &Query, cursor: Option<&str>) -> serde_json::Value {
    let many = |v: &[String]| match v {
        [one] => serde_json::Value::from(one.as_str()),
        more => serde_json::Value::from(more.to_vec()),
    };
    let mut m = serde_json::Map::new();
    if !q.sources.is_empty() {
        m.insert("source_system".into(), many(&q.sources));
    }
    if !q.types.is_empty() {
        m.insert("event_type".into(), many(&q.types));
    }
    if let Some(s) = q.severity {
        m.insert("severity".into(), s.as_str().into());
    }
    if let Some(s) = q.min_severity {
        m.insert("min_severity".into(), s.as_str().into());
    }
    if let Some(c) = &q.correlation_id {
        m.insert("correlation_id".into(), c.as_str().into());
    }
    if !q.tags.is_empty() {
        m.insert("tags".into(), q.tags.clone().into());
    }
    if let Some(t) = q.start {
        m.insert("start_time".into(), t.to_rfc3339().into());
    }
    if let Some(t) = q.end {
        m.insert("end_time".into(), t.to_rfc3339().into());
    }
    if let Some(t) = &q.text {
        m.insert("text".into(), t.as_str().into());
    }
    m.insert("limit".into(), q.limit.into());
    m.insert("offset".into(), q.offset.into());
    let order = match q.order {
        Order::Desc => "desc",
        Order::Asc => "asc",
    };
    m.insert("sort_order".into(), order.into());
    if let Some(c) = cursor {
        m.insert("cursor".into(), c.into());
    }
    serde_json::Value::Object(m)
}

async fn query_events(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = params::pairs(raw.as_deref());
    let query = params::query(&pairs)?;
    let cursor_text = pairs
        .iter()
        .rev()
        .find(|(k, v)| k == "cursor" && !v.is_empty())
        .map(|(_, v)| v.clone());
    let db = state.db.clone();
    blocking(move || {
        let page = db.query(&query)?;
        let mut body = String::with_capacity(256 + page.events.len() * 512);
        body.push_str("{\"events\":[");
        for (i, e) in page.events.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            write_event(e, &mut body);
        }
        body.push_str("],\"count\":");
        body.push_str(&page.events.len().to_string());
        body.push_str(",\"query\":");
        body.push_str(&echo(&query, cursor_text.as_deref()).to_string());
        body.push_str(",\"next_cursor\":");
        match page.next_cursor {
            Some(c) => {
                body.push('"');
                body.push_str(&c.encode());
                body.push('"');
            }
            None => body.push_str("null"),
        }
        body.push('}');
        Ok(json_text(StatusCode::OK, body))
    })
    .await
}

/// Most events `GET /events/correlation/{id}` returns (`limit` may lower it).
pub const CORRELATION_LIMIT_MAX: usize = 10_000;

async fn correlation(
    State(state): State<AppState>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let mut limit = 1000;
    for (k, v) in params::pairs(raw.as_deref()) {
        match k.as_str() {
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=CORRELATION_LIMIT_MAX).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "limit",
                            format!("limit: {v:?}: use 1..={CORRELATION_LIMIT_MAX}"),
                        )
                    })?;
            }
            other => {
                return Err(ApiError::bad_request(
                    other,
                    format!("unknown query parameter {other:?}; known: limit"),
                ));
            }
        }
    }
    let db = state.db.clone();
    blocking(move || {
        let mut query = Query {
            correlation_id: Some(id.clone()),
            order: Order::Asc,
            ..Query::default()
        };
        let mut body = String::from("{\"correlation_id\":");
        body.push_str(&serde_json::Value::from(id.as_str()).to_string());
        body.push_str(",\"events\":[");
        let mut count = 0usize;
        loop {
            query.limit = (limit - count).min(QUERY_LIMIT_MAX);
            let page = db.query(&query)?;
            for e in &page.events {
                if count > 0 {
                    body.push(',');
                }
                write_event(e, &mut body);
                count += 1;
            }
            match page.next_cursor {
                Some(c) if count < limit => query.cursor = Some(c),
                _ => break,
            }
        }
        body.push_str("],\"count\":");
        body.push_str(&count.to_string());
        body.push('}');
        Ok(json_text(StatusCode::OK, body))
    })
    .await
}

async fn stats(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = params::pairs(raw.as_deref());
    let distinct = pairs
        .iter()
        .any(|(k, v)| k == "distinct_correlation_ids" && (v == "true" || v == "1"));
    let filtered: Vec<(String, String)> = pairs
        .into_iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "distinct_correlation_ids" | "limit" | "offset" | "sort_order" | "cursor"
            )
        })
        .collect();
    let query = params::query(&filtered)?;
    let db = state.db.clone();
    blocking(move || {
        let stats = db.stats_with(&query, distinct)?;
        Ok(json_text(
            StatusCode::OK,
            json::stats_to_json(&stats).to_string(),
        ))
    })
    .await
}

async fn aggregate(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let agg = params::aggregate(&params::pairs(raw.as_deref()))?;
    let db = state.db.clone();
    blocking(move || {
        let started = std::time::Instant::now();
        let result = db.aggregate(&agg)?;
        let took = started.elapsed().as_secs_f64() * 1000.0;
        Ok(json_text(
            StatusCode::OK,
            json::aggregate_to_json(&result, took).to_string(),
        ))
    })
    .await
}

async fn get_event(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let db = state.db.clone();
    blocking(move || match db.get(&id)? {
        Some(e) => Ok(json_text(StatusCode::OK, json::event_to_json(&e))),
        None => Err(
            ApiError::not_found(format!("no event with event_id {id:?}")).with_field("event_id"),
        ),
    })
    .await
}

async fn delete_event(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let db = state.db.clone();
    blocking(move || {
        if db.delete(&id)? {
            Ok(json_text(StatusCode::OK, "{\"deleted\":1}".into()))
        } else {
            Err(
                ApiError::not_found(format!("no event with event_id {id:?}"))
                    .with_field("event_id"),
            )
        }
    })
    .await
}

/// `DELETE /events?before=RFC3339` (contract §3), and with any filters of
/// `GET /events` (a delete by query; `before` then bounds it too).
async fn delete_before(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let mut before: Option<Timestamp> = None;
    let mut filters = Vec::new();
    for (k, v) in params::pairs(raw.as_deref()) {
        match k.as_str() {
            "before" => {
                before = Some(Timestamp::parse_rfc3339(&v).map_err(|e| {
                    ApiError::bad_request("before", format!("before: {e}: {v:?} (use RFC 3339)"))
                })?);
            }
            "limit" | "offset" | "sort_order" | "cursor" => {
                return Err(ApiError::bad_request(
                    &k,
                    format!("{k}: a delete takes filters only"),
                ));
            }
            _ => filters.push((k, v)),
        }
    }
    let mut query = params::query(&filters)?;
    if before.is_none() && filters.is_empty() {
        return Err(ApiError::bad_request(
            "before",
            "give before (RFC 3339) or filters: DELETE /events?before=… or ?source_system=…",
        ));
    }
    let db = state.db.clone();
    blocking(move || {
        let n = if filters.is_empty() {
            db.delete_before(before.unwrap_or(Timestamp(i64::MIN)))?
        } else {
            if let Some(b) = before {
                let last = Timestamp(b.as_micros().saturating_sub(1));
                query.end = Some(query.end.map_or(last, |e| e.min(last)));
            }
            db.delete_matching(&query)?
        };
        Ok(json_text(StatusCode::OK, format!("{{\"deleted\":{n}}}")))
    })
    .await
}

async fn health(State(state): State<AppState>) -> Response {
    let db = &state.db;
    let total = db.len();
    let free = db.free_bytes();
    let poisoned = db.writes_refused();
    let healthy = poisoned.is_none();
    let status = if healthy { "healthy" } else { "unhealthy" };
    let mut body = serde_json::json!({
        "status": status,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": state.started.elapsed().as_secs(),
        "collector": {
            "healthy": healthy,
            "started": true,
            "storage_type": "evdb",
            "events_processed": state.processed.load(Ordering::Relaxed),
            "active_websockets": db.tail_subscribers(),
        },
        "storage": {
            "status": status,
            "storage_type": "evdb",
            "db_path": state.data_dir.display().to_string(),
            "total_events": total,
            "segments": db.log().segments().iter().count(),
            "accepting_writes": healthy,
            "free_bytes": free,
            "min_free_bytes": db.config().min_free_bytes,
        },
    });
    let code = if let Some(why) = poisoned {
        body["error"] = why.into();
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    json_text(code, body.to_string())
}

async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let st = state.clone();
    let text = blocking(move || Ok(st.metrics.render(&st.db))).await?;
    let mut resp = (StatusCode::OK, text).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(resp)
}
