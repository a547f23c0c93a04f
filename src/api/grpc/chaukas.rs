//! `chaukas.spec.server.v1.ChaukasServerService`, wire-compatible with
//! `chaukas-spec-server` 1.0.5. Events keep their exact bytes: the server
//! side is generated from `proto/wire/chaukas_server.proto`, whose messages
//! carry encoded events as bytes, so what `QueryEvents` returns equals what
//! was ingested, byte for byte. The mapping onto evdb events and back to
//! queries is in `api::chaukas` and `docs/api.md`.

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message;
use tonic::{Request, Response, Status};

use super::{blocking, check_sources, invalid, principal, status};
use crate::api::chaukas as map;
use crate::api::metrics::{Metrics, Sources};
use crate::api::proto::chaukas::common::v1 as pb;
use crate::api::proto::chaukas::wire;
use crate::db::{AppendOutcome, Db};
use crate::event::{Event, Timestamp};
use crate::limits::Invalid;
use crate::query::{Cursor, Order, QUERY_LIMIT_MAX, Query, QueryError};

/// Sessions read at most by `GetEventStats` to pair starts with ends.
pub const SESSION_EVENTS_MAX: usize = 100_000;

pub struct ChaukasService {
    pub db: Arc<Db>,
    pub metrics: Arc<Metrics>,
    pub limiter: Option<Arc<crate::api::ratelimit::RateLimiter>>,
}

fn micros(t: &prost_types::Timestamp) -> Result<Timestamp, Invalid> {
    t.seconds
        .checked_mul(1_000_000)
        .and_then(|s| s.checked_add(i64::from(t.nanos) / 1000))
        .map(Timestamp)
        .ok_or_else(|| Invalid::new("time", "out of range"))
}

fn tag(prefix: &str, value: &str, out: &mut Vec<String>) {
    if !value.is_empty() {
        out.push(format!("{prefix}{value}"));
    }
}

/// The evdb query for a Chaukas `QueryFilter`: ids and statuses through
/// tags, types, severities, text and time range through their indexes.
pub fn query_of(filter: &pb::QueryFilter) -> Result<Query, Invalid> {
    let mut q = Query {
        sources: vec![map::SOURCE.to_owned()],
        ..Query::default()
    };
    tag(map::TAG_TENANT, &filter.tenant_id, &mut q.tags);
    tag(map::TAG_PROJECT, &filter.project_id, &mut q.tags);
    tag(map::TAG_SESSION, &filter.session_id, &mut q.tags);
    tag(map::TAG_AGENT, &filter.agent_id, &mut q.tags);
    tag(map::TAG_SPAN, &filter.span_id, &mut q.tags);
    tag(map::TAG_TRACE, &filter.trace_id, &mut q.tags);
    q.tags
        .extend(filter.tags.iter().filter(|t| !t.is_empty()).cloned());
    for t in &filter.types {
        let t = pb::EventType::try_from(*t)
            .map_err(|_| Invalid::new("types", format!("unknown event type {t}")))?;
        q.types.push(map::type_name(t));
    }
    for s in &filter.statuses {
        let s = pb::EventStatus::try_from(*s)
            .map_err(|_| Invalid::new("statuses", format!("unknown status {s}")))?;
        q.any_tags
            .push(format!("{}{}", map::TAG_STATUS, map::status_name(s)));
    }
    for s in &filter.severities {
        let s = pb::Severity::try_from(*s)
            .map_err(|_| Invalid::new("severities", format!("unknown severity {s}")))?;
        let level = map::severity_of(s);
        if !q.severities.contains(&level) {
            q.severities.push(level);
        }
    }
    if !filter.text_query.is_empty() {
        q.text = Some(filter.text_query.clone());
    }
    if let Some(range) = &filter.time {
        q.start = range.start.as_ref().map(micros).transpose()?;
        q.end = range.end.as_ref().map(micros).transpose()?;
    }
    Ok(q)
}

/// The Chaukas bytes of a stored event: its native payload, or (for an
/// event that came in as JSON with source `chaukas`) an event built from
/// its fields.
pub fn chaukas_bytes(e: &Event) -> Vec<u8> {
    if let Some(native) = &e.native {
        return native.bytes.clone();
    }
    let severity = match e.severity {
        crate::event::Severity::Debug => pb::Severity::Debug,
        crate::event::Severity::Info => pb::Severity::Info,
        crate::event::Severity::Warning => pb::Severity::Warn,
        crate::event::Severity::Error | crate::event::Severity::Critical => pb::Severity::Error,
    };
    let micros = e.timestamp.as_micros();
    let type_name = format!("EVENT_TYPE_{}", e.event_type.to_ascii_uppercase());
    pb::Event {
        event_id: e.id.clone(),
        timestamp: Some(prost_types::Timestamp {
            seconds: micros.div_euclid(1_000_000),
            nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
        }),
        severity: severity as i32,
        r#type: pb::EventType::from_str_name(&type_name).map_or(0, |t| t as i32),
        tags: e.tags.clone(),
        ..pb::Event::default()
    }
    .encode_to_vec()
}

impl ChaukasService {
    async fn store(&self, events: Vec<Event>) -> Result<Vec<AppendOutcome>, Status> {
        let sources = Sources::of(&events);
        sources
            .admit(self.limiter.as_deref(), &self.metrics)
            .map_err(|e| super::limited_status(&e))?;
        let outcomes = self
            .db
            .append_batch_detached(events)
            .await
            .map_err(status)?;
        self.metrics.count_outcomes(&sources, &outcomes);
        Ok(outcomes)
    }
}

/// Stored and duplicate events are accepted; invalid ones rejected.
fn tally(outcomes: &[AppendOutcome], ids: &[String]) -> (i32, Vec<String>) {
    let mut accepted = 0i32;
    let mut rejected = Vec::new();
    for (o, id) in outcomes.iter().zip(ids) {
        match o {
            AppendOutcome::Invalid(_) => rejected.push(id.clone()),
            _ => accepted = accepted.saturating_add(1),
        }
    }
    (accepted, rejected)
}

#[tonic::async_trait]
impl wire::chaukas_server_service_server::ChaukasServerService for ChaukasService {
    async fn healthz(
        &self,
        _: Request<wire::HealthzRequest>,
    ) -> Result<Response<wire::HealthzResponse>, Status> {
        match self.db.log().poisoned() {
            None => Ok(Response::new(wire::HealthzResponse {})),
            Some(why) => Err(Status::unavailable(format!(
                "the store refuses writes: {why}"
            ))),
        }
    }

    async fn get_capabilities(
        &self,
        _: Request<wire::GetCapabilitiesRequest>,
    ) -> Result<Response<wire::GetCapabilitiesResponse>, Status> {
        Ok(Response::new(wire::GetCapabilitiesResponse {
            capabilities: Some(pb::Capabilities {
                worm_retention: false,
                audit_proofs: false,
                distributed_query: false,
                rbac: false,
                sso: false,
                policy_decisions: true,
                data_access_events: true,
            }),
        }))
    }

    async fn ingest_event(
        &self,
        request: Request<wire::IngestEventRequest>,
    ) -> Result<Response<wire::IngestEventResponse>, Status> {
        check_sources(principal(&request).as_ref(), [map::SOURCE])?;
        let bytes = request.into_inner().event;
        if bytes.is_empty() {
            return Err(Status::invalid_argument("event: is required"));
        }
        let now = Timestamp::now();
        let event = map::to_event(&bytes, now).map_err(|e| invalid(&e))?;
        let id = event.id.clone();
        let outcome = self.store(vec![event]).await?;
        let word = match outcome.first() {
            Some(AppendOutcome::Stored(_)) => "collected",
            Some(AppendOutcome::Duplicate(_)) => "duplicate",
            Some(AppendOutcome::Invalid(why)) => return Err(invalid(why)),
            None => return Err(Status::internal("no outcome for the event")),
        };
        Ok(Response::new(wire::IngestEventResponse {
            event_id: id,
            status: word.to_owned(),
            processed_at: now.as_micros() / 1_000_000,
        }))
    }

    async fn ingest_event_batch(
        &self,
        request: Request<wire::IngestEventBatchRequest>,
    ) -> Result<Response<wire::IngestEventBatchResponse>, Status> {
        check_sources(principal(&request).as_ref(), [map::SOURCE])?;
        let batch = request.into_inner().event_batch.unwrap_or_default();
        let max = self.db.config().limits.batch_events_max;
        if batch.events.len() > max {
            return Err(Status::resource_exhausted(format!(
                "events: the batch holds {} events, at most {max} allowed",
                batch.events.len()
            )));
        }
        let now = Timestamp::now();
        let mut rejected = Vec::new();
        let mut events = Vec::with_capacity(batch.events.len());
        for bytes in &batch.events {
            match map::to_event(bytes, now) {
                Ok(e) => events.push(e),
                Err(_) => rejected.push(
                    pb::Event::decode(bytes.as_slice())
                        .map(|e| e.event_id)
                        .unwrap_or_default(),
                ),
            }
        }
        let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
        let outcomes = self.store(events).await?;
        let (accepted, more) = tally(&outcomes, &ids);
        rejected.extend(more);
        Ok(Response::new(wire::IngestEventBatchResponse {
            batch_id: batch.batch_id,
            accepted_count: accepted,
            rejected_count: i32::try_from(rejected.len()).unwrap_or(i32::MAX),
            rejected_event_ids: rejected,
        }))
    }

    async fn query_events(
        &self,
        request: Request<wire::QueryEventsRequest>,
    ) -> Result<Response<wire::QueryEventsResponse>, Status> {
        let req = request.into_inner().query.unwrap_or_default();
        let mut query = query_of(&req.filter.unwrap_or_default()).map_err(|e| invalid(&e))?;
        query.limit = match req.page_size {
            0 => 100,
            n if n < 0 => {
                return Err(Status::invalid_argument("page_size: must not be negative"));
            }
            n => usize::try_from(n)
                .unwrap_or(QUERY_LIMIT_MAX)
                .min(QUERY_LIMIT_MAX),
        };
        query.order = match pb::SortOrder::try_from(req.order_by_time) {
            Ok(pb::SortOrder::Asc) => Order::Asc,
            Ok(pb::SortOrder::Desc | pb::SortOrder::Unspecified) => Order::Desc,
            Err(_) => return Err(Status::invalid_argument("order_by_time: unknown value")),
        };
        if !req.page_token.is_empty() {
            let cursor = Cursor::decode(&req.page_token).map_err(|e| {
                // The cursor's own error names the evdb field.
                let why = match e {
                    QueryError::Invalid { reason, .. } => reason,
                    other => other.to_string(),
                };
                Status::invalid_argument(format!("page_token: {why}"))
            })?;
            if cursor.order != query.order {
                return Err(Status::invalid_argument(
                    "page_token: it was issued for the other order_by_time",
                ));
            }
            query.cursor = Some(cursor);
        }
        let page = blocking(self.db.clone(), move |db| db.query(&query).map_err(status)).await?;
        Ok(Response::new(wire::QueryEventsResponse {
            response: Some(wire::QueryResponseRaw {
                events: page.events.iter().map(chaukas_bytes).collect(),
                next_page_token: page.next_cursor.map(|c| c.encode()).unwrap_or_default(),
            }),
        }))
    }

    async fn get_event_stats(
        &self,
        request: Request<wire::GetEventStatsRequest>,
    ) -> Result<Response<wire::GetEventStatsResponse>, Status> {
        let req = request.into_inner();
        let filter = pb::QueryFilter {
            tenant_id: req.tenant_id,
            project_id: req.project_id,
            time: req.time_range,
            ..pb::QueryFilter::default()
        };
        let query = query_of(&filter).map_err(|e| invalid(&e))?;
        let answer = blocking(self.db.clone(), move |db| {
            let stats = db.stats(&query).map_err(status)?;
            let starts = session_times(db, &query, pb::EventType::SessionStart)?;
            let ends = session_times(db, &query, pb::EventType::SessionEnd)?;
            let durations: Vec<f64> = starts
                .iter()
                .filter_map(|(s, start)| {
                    let end = ends.get(s)?;
                    (end >= start).then(|| (end - start) as f64 / 1000.0)
                })
                .collect();
            let avg = if durations.is_empty() {
                0.0
            } else {
                durations.iter().sum::<f64>() / durations.len() as f64
            };
            let by_type = stats
                .by_type
                .iter()
                .map(|(t, n)| {
                    let name = format!("EVENT_TYPE_{}", t.to_ascii_uppercase());
                    (name, i64::try_from(*n).unwrap_or(i64::MAX))
                })
                .collect();
            Ok(wire::GetEventStatsResponse {
                total_events: i64::try_from(stats.total).unwrap_or(i64::MAX),
                total_sessions: i64::try_from(starts.len()).unwrap_or(i64::MAX),
                events_by_type: by_type,
                avg_session_duration_ms: avg,
            })
        })
        .await?;
        Ok(Response::new(answer))
    }
}

/// Session id → timestamp (µs) of the matching events of one type: the
/// earliest start or the latest end. Reads at most [`SESSION_EVENTS_MAX`].
fn session_times(
    db: &Db,
    base: &Query,
    kind: pb::EventType,
) -> Result<HashMap<String, i64>, Status> {
    let mut q = base.clone();
    q.types = vec![map::type_name(kind)];
    q.order = Order::Asc;
    q.limit = QUERY_LIMIT_MAX;
    let mut out: HashMap<String, i64> = HashMap::new();
    let mut read = 0;
    loop {
        let page = db.query(&q).map_err(status)?;
        for e in &page.events {
            let Some(session) = e.tags.iter().find_map(|t| t.strip_prefix(map::TAG_SESSION)) else {
                continue;
            };
            let ts = e.timestamp.as_micros();
            let slot = out.entry(session.to_owned()).or_insert(ts);
            *slot = if kind == pb::EventType::SessionStart {
                (*slot).min(ts)
            } else {
                (*slot).max(ts)
            };
        }
        read += page.events.len();
        match page.next_cursor {
            Some(c) if read < SESSION_EVENTS_MAX => q.cursor = Some(c),
            _ => break,
        }
    }
    Ok(out)
}
