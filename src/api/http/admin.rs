//! `/admin/snapshots`: create, list, delete and download (tar, streamed)
//! point-in-time snapshots (`crate::snapshot`).

use std::io::Write;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::{AppState, blocking, json_text};
use crate::snapshot::{self, SnapshotError, SnapshotInfo};

impl From<SnapshotError> for ApiError {
    fn from(e: SnapshotError) -> ApiError {
        match e {
            SnapshotError::Db(e) => e.into(),
            SnapshotError::NotFound(id) => {
                ApiError::not_found(format!("no snapshot {id:?}")).with_field("id")
            }
            SnapshotError::Invalid(why) => ApiError::bad_request("id", why),
            e @ SnapshotError::Io { .. } => ApiError::internal(e.to_string()),
        }
    }
}

fn info_json(s: &SnapshotInfo) -> serde_json::Value {
    serde_json::json!({
        "id": s.id,
        "path": s.path.display().to_string(),
        "created_at": s.created_at,
        "events": s.events,
        "bytes": s.bytes,
    })
}

/// `POST /admin/compact[?now=true]`: retention (when configured), then
/// compaction; `now` rewrites every segment with a deleted event now.
pub async fn compact(
    State(state): State<AppState>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    let mut force = false;
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match (k.as_ref(), v.as_ref()) {
            ("now", "true" | "1" | "") => force = true,
            ("now", "false" | "0") => force = false,
            ("now", other) => {
                return Err(ApiError::bad_request(
                    "now",
                    format!("now: {other:?} is not true or false"),
                ));
            }
            (other, _) => {
                return Err(ApiError::bad_request(
                    "query",
                    format!("unknown parameter {other:?} (only now)"),
                ));
            }
        }
    }
    let db = state.db.clone();
    let policies = state.policies.clone();
    let metrics = state.metrics.clone();
    blocking(move || {
        let report = db.maintain(&policies, crate::Timestamp::now(), force, |_| {})?;
        if let Some(r) = &report.retention {
            metrics.record_retention(r);
        }
        metrics.record_compaction(&report.compaction);
        let body = serde_json::to_string(&report).map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(json_text(StatusCode::OK, body))
    })
    .await
}

pub async fn create(State(state): State<AppState>) -> Result<Response, ApiError> {
    let db = state.db.clone();
    blocking(move || {
        let info = db.snapshot()?;
        Ok(json_text(StatusCode::CREATED, info_json(&info).to_string()))
    })
    .await
}

pub async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    let db = state.db.clone();
    blocking(move || {
        let all: Vec<serde_json::Value> = db.snapshots()?.iter().map(info_json).collect();
        Ok(json_text(
            StatusCode::OK,
            serde_json::json!({ "snapshots": all }).to_string(),
        ))
    })
    .await
}

pub async fn remove(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let db = state.db.clone();
    blocking(move || {
        if db.delete_snapshot(&id)? {
            Ok(json_text(StatusCode::OK, "{\"deleted\":1}".into()))
        } else {
            Err(SnapshotError::NotFound(id).into())
        }
    })
    .await
}

/// Sends what it is given as body chunks of up to 256 KiB; fails once the
/// client has gone.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    const CHUNK: usize = 256 * 1024;

    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(Self::CHUNK),
        ));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= Self::CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

pub async fn archive(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let db = state.db.clone();
    let lookup = id.clone();
    let info = blocking(move || Ok(db.snapshot_info(&lookup)?)).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::task::spawn_blocking(move || {
        let mut writer = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(ChannelWriter::CHUNK),
        };
        if let Err(e) = snapshot::write_archive(&info.path, &mut writer) {
            // The client sees a truncated body (and, with chunked encoding,
            // no final chunk): never a valid-looking partial archive.
            let _ = tx.blocking_send(Err(e));
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut resp = (StatusCode::OK, body).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-tar"),
    );
    if let Ok(v) =
        HeaderValue::from_str(&format!("attachment; filename=\"evdb-snapshot-{id}.tar\""))
    {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}
