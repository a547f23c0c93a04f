//! `POST /events` and `POST /events/batch`: JSON, NDJSON (streamed) and
//! Chaukas protobuf bodies.

use std::sync::atomic::Ordering;

use axum::body::{Body, Bytes};
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use prost::Message;

use super::body::{Line, NdjsonLines, batch_items};
use super::error::ApiError;
use super::{AppState, json_text};
use crate::api::auth::{Auth, Principal};
use crate::api::chaukas;
use crate::api::json::parse_event;
use crate::api::metrics::Sources;
use crate::api::proto::chaukas::server::v1 as pb;
use crate::db::{AppendOutcome, Outcomes};
use crate::event::{Event, Timestamp};
use crate::limits::Invalid;

/// NDJSON events are stored in chunks of at most this many events…
const NDJSON_CHUNK_EVENTS: usize = 1000;
/// …or this many bytes of input.
const NDJSON_CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// At most this many entries in a batch answer's `errors` (the counts stay
/// exact).
pub const ERRORS_REPORTED_MAX: usize = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Json,
    Ndjson,
    Protobuf,
}

fn kind(headers: &HeaderMap) -> Result<Kind, ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(Kind::Json);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::unsupported_media("Content-Type is not readable text"))?;
    let mime = text
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "" | "application/json" | "text/json" | "application/x-www-form-urlencoded" => {
            Ok(Kind::Json)
        }
        m if m.ends_with("+json") => Ok(Kind::Json),
        "application/x-ndjson"
        | "application/ndjson"
        | "application/jsonl"
        | "application/x-jsonlines"
        | "application/jsonlines" => Ok(Kind::Ndjson),
        "application/x-protobuf" | "application/protobuf" | "application/vnd.google.protobuf" => {
            Ok(Kind::Protobuf)
        }
        other => Err(ApiError::unsupported_media(format!(
            "Content-Type {other:?} is not accepted: use application/json, \
             application/x-ndjson or application/x-protobuf"
        ))),
    }
}

/// The whole body, refused with 413 past `limit` bytes (after gzip).
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::too_large("body", format!("body: larger than {limit} bytes"))
        } else {
            ApiError::bad_request("body", format!("body: cannot read it: {e}"))
        }
    })
}

fn protobuf(status: StatusCode, msg: &impl Message) -> Response {
    let mut resp = (status, msg.encode_to_vec()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-protobuf"),
    );
    resp
}

/// `POST /events`: one event.
pub async fn one(
    State(state): State<AppState>,
    Extension(principal): Extension<Option<Principal>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let kind = kind(&headers)?;
    let limits = state.db.config().limits.clone();
    let bytes = read_body(body, limits.event_size_max.saturating_mul(2)).await?;
    let now = Timestamp::now();
    let event = match kind {
        Kind::Protobuf => {
            let inner = chaukas::event_of_request(&bytes)?;
            chaukas::to_event(inner, now)?
        }
        Kind::Json | Kind::Ndjson => {
            let text = std::str::from_utf8(&bytes)
                .map_err(|e| ApiError::bad_request("body", format!("body: not UTF-8: {e}")))?;
            parse_event(text.trim(), now)?
        }
    };
    Auth::check_sources(principal.as_ref(), [event.source.as_str()])?;
    let id = event.id.clone();
    let events = vec![event];
    let sources = Sources::of(&events);
    sources.admit(state.limiter.as_deref(), &state.metrics)?;
    let outcome = state.db.append_batch_detached(events).await?;
    state.metrics.count_outcomes(&sources, &outcome);
    let (status, word) = match outcome.first() {
        Some(AppendOutcome::Stored(_)) => {
            state.processed.fetch_add(1, Ordering::Relaxed);
            (StatusCode::CREATED, "collected")
        }
        Some(AppendOutcome::Duplicate(_)) => (StatusCode::OK, "duplicate"),
        Some(AppendOutcome::Invalid(invalid)) => return Err(invalid.clone().into()),
        None => return Err(ApiError::internal("no outcome for the event")),
    };
    if kind == Kind::Protobuf {
        return Ok(protobuf(
            status,
            &pb::IngestEventResponse {
                event_id: id,
                status: word.to_owned(),
                processed_at: now.as_micros() / 1_000_000,
            },
        ));
    }
    let body = serde_json::json!({ "event_id": id, "status": word });
    Ok(json_text(status, body.to_string()))
}

/// Counts and reported errors of one batch request.
#[derive(Default)]
struct Tally {
    collected: u64,
    failed: u64,
    duplicates: u64,
    errors: Vec<serde_json::Value>,
    rejected_ids: Vec<String>,
}

impl Tally {
    fn fail(&mut self, index: usize, id: Option<&str>, why: &Invalid) {
        self.failed += 1;
        if self.errors.len() < ERRORS_REPORTED_MAX {
            self.errors.push(serde_json::json!({
                "index": index,
                "error": format!("{}: {}", why.field, why.reason),
                "field": why.field,
            }));
            if let Some(id) = id {
                self.rejected_ids.push(id.to_owned());
            }
        }
    }

    fn answer(mut self) -> Response {
        // A streamed body's rejections are found in two places (parsing,
        // and the store for earlier chunks): report them in event order.
        self.errors
            .sort_by_key(|e| e.get("index").and_then(serde_json::Value::as_u64));
        let body = serde_json::json!({
            "collected": self.collected,
            "failed": self.failed,
            "duplicates": self.duplicates,
            "status": "batch_completed",
            "errors": self.errors,
        });
        json_text(StatusCode::CREATED, body.to_string())
    }
}

/// Stores `events` (each with its index in the request) and tallies them.
async fn store(
    state: &AppState,
    principal: Option<&Principal>,
    events: Vec<(usize, Event)>,
    tally: &mut Tally,
    want_ids: bool,
) -> Result<(), ApiError> {
    match submit(state, principal, events, want_ids)? {
        Some(s) => settle(state, s, tally).await,
        None => Ok(()),
    }
}

/// Events handed to the store, not yet tallied.
struct Submitted {
    outcomes: Outcomes,
    indexes: Vec<usize>,
    sources: Sources,
    ids: Vec<String>,
}

/// Checks `events` against the caller's sources and the rate limits and
/// hands them to the store ([`store`]'s first half; `None` when empty).
fn submit(
    state: &AppState,
    principal: Option<&Principal>,
    events: Vec<(usize, Event)>,
    want_ids: bool,
) -> Result<Option<Submitted>, ApiError> {
    if events.is_empty() {
        return Ok(None);
    }
    Auth::check_sources(principal, events.iter().map(|(_, e)| e.source.as_str()))?;
    let (indexes, events): (Vec<usize>, Vec<Event>) = events.into_iter().unzip();
    let sources = Sources::of(&events);
    sources.admit(state.limiter.as_deref(), &state.metrics)?;
    // Ids only when the answer lists rejected ids.
    let ids: Vec<String> = if want_ids {
        events.iter().map(|e| e.id.clone()).collect()
    } else {
        Vec::new()
    };
    let outcomes = state.db.submit_batch(events)?;
    Ok(Some(Submitted {
        outcomes,
        indexes,
        sources,
        ids,
    }))
}

/// Waits until submitted events are durable and tallies them.
async fn settle(state: &AppState, s: Submitted, tally: &mut Tally) -> Result<(), ApiError> {
    let outcomes = s.outcomes.await?;
    state.metrics.count_outcomes(&s.sources, &outcomes);
    let mut stored = 0;
    for (i, (outcome, index)) in outcomes.iter().zip(s.indexes).enumerate() {
        match outcome {
            AppendOutcome::Stored(_) => stored += 1,
            AppendOutcome::Duplicate(_) => tally.duplicates += 1,
            AppendOutcome::Invalid(why) => tally.fail(index, s.ids.get(i).map(String::as_str), why),
        }
    }
    tally.collected += stored;
    state.processed.fetch_add(stored, Ordering::Relaxed);
    Ok(())
}

/// `POST /events/batch`.
pub async fn batch(
    State(state): State<AppState>,
    Extension(principal): Extension<Option<Principal>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let p = principal.as_ref();
    match kind(&headers)? {
        Kind::Ndjson => ndjson(state, p, body).await,
        Kind::Json => json_batch(state, p, body).await,
        Kind::Protobuf => protobuf_batch(state, p, body).await,
    }
}

fn too_many(n: usize, max: usize) -> ApiError {
    ApiError::too_large(
        "events",
        format!("events: the batch holds {n} events, at most {max} allowed"),
    )
}

async fn json_batch(
    state: AppState,
    principal: Option<&Principal>,
    body: Body,
) -> Result<Response, ApiError> {
    let limits = state.db.config().limits.clone();
    let bytes = read_body(body, limits.batch_size_max).await?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| ApiError::bad_request("body", format!("body: not UTF-8: {e}")))?;
    let items = batch_items(text)?;
    if items.len() > limits.batch_events_max {
        return Err(too_many(items.len(), limits.batch_events_max));
    }
    let now = Timestamp::now();
    let mut tally = Tally::default();
    let mut valid = Vec::with_capacity(items.len());
    for (i, raw) in items.iter().enumerate() {
        match parse_event(raw.get(), now) {
            Ok(e) => valid.push((i, e)),
            Err(why) => {
                state.metrics.count_unreadable(1);
                tally.fail(i, None, &why);
            }
        }
    }
    store(&state, principal, valid, &mut tally, false).await?;
    Ok(tally.answer())
}

/// NDJSON: one event per line, stored in chunks as the body streams in.
/// Memory is bounded by one chunk and one line, whatever the body's size.
async fn ndjson(
    state: AppState,
    principal: Option<&Principal>,
    body: Body,
) -> Result<Response, ApiError> {
    let limits = state.db.config().limits.clone();
    let line_max = limits.event_size_max.saturating_mul(2);
    let mut stream = body.into_data_stream();
    let mut lines = NdjsonLines::new(line_max);
    let mut in_flight: Option<Submitted> = None;
    let mut index = 0usize;
    let mut pending: Vec<(usize, Event)> = Vec::new();
    let mut pending_bytes = 0usize;
    let mut tally = Tally::default();
    let mut finished = false;
    while !finished {
        let chunk = match stream.next().await {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                return Err(ApiError::bad_request(
                    "body",
                    format!("body: cannot read it: {e}"),
                ));
            }
            None => {
                finished = true;
                Bytes::new()
            }
        };
        // Events without a timestamp get this chunk's receive time.
        let now = Timestamp::now();
        let mut rest: &[u8] = &chunk;
        while let Some(line) = lines.next_line(&mut rest, finished) {
            match line {
                Line::TooLong => {
                    state.metrics.count_unreadable(1);
                    tally.fail(
                        index,
                        None,
                        &Invalid::new("event", format!("line longer than {line_max} bytes")),
                    );
                    index += 1;
                }
                Line::Text(bytes) => {
                    let parsed = match std::str::from_utf8(bytes).map(str::trim) {
                        Ok("") => continue,
                        Ok(t) => parse_event(t, now),
                        Err(e) => Err(Invalid::new("event", format!("not UTF-8: {e}"))),
                    };
                    match parsed {
                        Ok(e) => {
                            pending_bytes += bytes.len();
                            pending.push((index, e));
                        }
                        Err(why) => {
                            state.metrics.count_unreadable(1);
                            tally.fail(index, None, &why);
                        }
                    }
                    index += 1;
                }
            }
            if pending.len() >= NDJSON_CHUNK_EVENTS.min(limits.batch_events_max)
                || pending_bytes >= NDJSON_CHUNK_BYTES
            {
                // This chunk goes to the store; the previous one is tallied
                // once durable, and the next is read meanwhile.
                let chunk = submit(&state, principal, std::mem::take(&mut pending), false)?;
                pending_bytes = 0;
                if let Some(previous) = std::mem::replace(&mut in_flight, chunk) {
                    settle(&state, previous, &mut tally).await?;
                }
            }
        }
    }
    if let Some(previous) = in_flight {
        settle(&state, previous, &mut tally).await?;
    }
    store(&state, principal, pending, &mut tally, false).await?;
    Ok(tally.answer())
}

async fn protobuf_batch(
    state: AppState,
    principal: Option<&Principal>,
    body: Body,
) -> Result<Response, ApiError> {
    let limits = state.db.config().limits.clone();
    let bytes = read_body(body, limits.batch_size_max).await?;
    let items = chaukas::events_of_batch_request(&bytes)?;
    if items.len() > limits.batch_events_max {
        return Err(too_many(items.len(), limits.batch_events_max));
    }
    let now = Timestamp::now();
    let mut tally = Tally::default();
    let mut valid = Vec::with_capacity(items.len());
    for (i, raw) in items.iter().enumerate() {
        match chaukas::to_event(raw, now) {
            Ok(e) => valid.push((i, e)),
            Err(why) => {
                state.metrics.count_unreadable(1);
                let id = crate::api::proto::chaukas::common::v1::Event::decode(*raw)
                    .map(|e| e.event_id)
                    .ok();
                tally.fail(i, id.as_deref(), &why);
            }
        }
    }
    store(&state, principal, valid, &mut tally, true).await?;
    let accepted = tally.collected + tally.duplicates;
    Ok(protobuf(
        StatusCode::CREATED,
        &pb::IngestEventBatchResponse {
            batch_id: chaukas::batch_id(&bytes),
            accepted_count: i32::try_from(accepted).unwrap_or(i32::MAX),
            rejected_count: i32::try_from(tally.failed).unwrap_or(i32::MAX),
            rejected_event_ids: tally.rejected_ids,
        },
    ))
}
