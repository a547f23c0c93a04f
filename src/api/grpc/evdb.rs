//! `evdb.v1.Evdb` (contract §5, `proto/evdb/v1/evdb.proto`): the HTTP API's
//! operations over gRPC, with client-streaming ingest and a server-streaming
//! live tail under the same slow-consumer policy as the WebSocket tail.

use crate::query::aggregate::{Aggregation, AggregationText, MetricValue};
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::{blocking, check_sources, invalid, principal, status};
use crate::api::metrics::{Metrics, Sources};
use crate::api::proto::evdb::v1 as pb;
use crate::db::{AppendOutcome, Db};
use crate::event::{Event, JsonObject, Severity, Timestamp, new_event_id};
use crate::limits::{self, Invalid};
use crate::query::{Cursor, Order, QUERY_LIMIT_DEFAULT, Query};
use crate::tail::{TAIL_QUEUE_EVENTS, TailEnd, TailFilter};

/// Failures listed at most in one `IngestResponse` (counts stay exact).
const ERRORS_REPORTED_MAX: usize = 10_000;

pub struct EvdbService {
    pub db: Arc<Db>,
    pub metrics: Arc<Metrics>,
    pub limiter: Option<Arc<crate::api::ratelimit::RateLimiter>>,
    /// Turns true when the daemon shuts down (ends tails).
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Retention and compaction, for `Compact`.
    pub policies: Arc<crate::maintenance::Policies>,
}

fn severity_in(v: i32, field: &'static str) -> Result<Option<Severity>, Invalid> {
    match pb::Severity::try_from(v) {
        Ok(pb::Severity::Unspecified) => Ok(None),
        Ok(pb::Severity::Debug) => Ok(Some(Severity::Debug)),
        Ok(pb::Severity::Info) => Ok(Some(Severity::Info)),
        Ok(pb::Severity::Warning) => Ok(Some(Severity::Warning)),
        Ok(pb::Severity::Error) => Ok(Some(Severity::Error)),
        Ok(pb::Severity::Critical) => Ok(Some(Severity::Critical)),
        Err(_) => Err(Invalid::new(field, format!("unknown severity {v}"))),
    }
}

fn severity_out(s: Severity) -> pb::Severity {
    match s {
        Severity::Debug => pb::Severity::Debug,
        Severity::Info => pb::Severity::Info,
        Severity::Warning => pb::Severity::Warning,
        Severity::Error => pb::Severity::Error,
        Severity::Critical => pb::Severity::Critical,
    }
}

fn time_in(t: &prost_types::Timestamp, field: &'static str) -> Result<Timestamp, Invalid> {
    t.seconds
        .checked_mul(1_000_000)
        .and_then(|s| s.checked_add(i64::from(t.nanos) / 1000))
        .map(Timestamp)
        .ok_or_else(|| Invalid::new(field, "out of range"))
}

fn time_out(t: Timestamp) -> prost_types::Timestamp {
    let us = t.as_micros();
    prost_types::Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: i32::try_from(us.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

fn metric_out(v: MetricValue) -> pb::MetricResult {
    match v {
        MetricValue::Time(t) => pb::MetricResult {
            value: None,
            time: Some(time_out(t)),
        },
        other => pb::MetricResult {
            value: other.as_f64(),
            time: None,
        },
    }
}

/// A wire event as a validated domain event.
pub fn event_in(e: pb::Event, now: Timestamp) -> Result<Event, Invalid> {
    let data = if e.data_json.trim().is_empty() {
        JsonObject::empty()
    } else {
        JsonObject::parse_owned(e.data_json)
            .map_err(|_| Invalid::new("data_json", "must be a JSON object"))?
    };
    let event = Event {
        id: if e.event_id.is_empty() {
            new_event_id()
        } else {
            e.event_id
        },
        timestamp: match &e.timestamp {
            Some(t) => time_in(t, "timestamp")?,
            None => now,
        },
        source: e.source_system,
        event_type: e.event_type,
        severity: severity_in(e.severity, "severity")?.unwrap_or(Severity::Info),
        correlation_id: e.correlation_id,
        tags: e.tags,
        data,
        native: None,
    };
    limits::validate(&event)?;
    Ok(event)
}

pub fn event_out(e: &Event) -> pb::Event {
    pb::Event {
        event_id: e.id.clone(),
        timestamp: Some(time_out(e.timestamp)),
        source_system: e.source.clone(),
        event_type: e.event_type.clone(),
        severity: severity_out(e.severity) as i32,
        correlation_id: e.correlation_id.clone(),
        tags: e.tags.clone(),
        data_json: e.data.as_str().to_owned(),
    }
}

fn filter_in(f: pb::Filter) -> Result<Query, Invalid> {
    Ok(Query {
        sources: f.source_systems,
        types: f.event_types,
        severity: severity_in(f.severity, "severity")?,
        min_severity: severity_in(f.min_severity, "min_severity")?,
        correlation_id: Some(f.correlation_id).filter(|c| !c.is_empty()),
        tags: f.tags.into_iter().filter(|t| !t.is_empty()).collect(),
        start: f
            .start_time
            .as_ref()
            .map(|t| time_in(t, "start_time"))
            .transpose()?,
        end: f
            .end_time
            .as_ref()
            .map(|t| time_in(t, "end_time"))
            .transpose()?,
        text: Some(f.text).filter(|t| !t.is_empty()),
        ..Query::default()
    })
}

/// Running totals of one ingest call.
#[derive(Default)]
struct Totals {
    response: pb::IngestResponse,
    next_index: usize,
}

impl Totals {
    fn fail(&mut self, index: usize, why: &Invalid) {
        self.response.failed += 1;
        if self.response.errors.len() < ERRORS_REPORTED_MAX {
            self.response.errors.push(pb::EventError {
                index: u32::try_from(index).unwrap_or(u32::MAX),
                field: why.field.to_owned(),
                error: format!("{}: {}", why.field, why.reason),
            });
        }
    }
}

/// One request's events handed to the store, not yet tallied.
struct Submitted {
    outcomes: crate::db::Outcomes,
    /// Events in the request.
    count: usize,
    /// The request's first event's index in the call.
    base: usize,
    /// The request position of each event handed over.
    positions: Vec<usize>,
    sources: Sources,
    event_ids: Vec<String>,
}

/// Requests of one `IngestStream` handed to the store while earlier ones
/// are made durable.
const STREAM_IN_FLIGHT: usize = 2;

impl EvdbService {
    /// Validates, stores and tallies one request's events.
    async fn ingest_one(
        &self,
        req: pb::IngestRequest,
        totals: &mut Totals,
        want_ids: bool,
        caller: Option<&crate::api::auth::Principal>,
    ) -> Result<(), Status> {
        let submitted = self.submit(req, totals, want_ids, caller)?;
        self.settle(submitted, totals).await
    }

    /// Validates one request's events and hands the valid ones to the
    /// store; [`EvdbService::settle`] tallies their outcome.
    fn submit(
        &self,
        req: pb::IngestRequest,
        totals: &mut Totals,
        want_ids: bool,
        caller: Option<&crate::api::auth::Principal>,
    ) -> Result<Submitted, Status> {
        check_sources(caller, req.events.iter().map(|e| e.source_system.as_str()))?;
        let max = self.db.config().limits.batch_events_max;
        if req.events.len() > max {
            return Err(Status::resource_exhausted(format!(
                "events: the message holds {} events, at most {max} allowed",
                req.events.len()
            )));
        }
        let now = Timestamp::now();
        let base = totals.next_index;
        totals.next_index += req.events.len();
        let count = req.events.len();
        let mut valid = Vec::with_capacity(count);
        let mut positions = Vec::with_capacity(count);
        for (i, e) in req.events.into_iter().enumerate() {
            match event_in(e, now) {
                Ok(e) => {
                    positions.push(i);
                    valid.push(e);
                }
                Err(why) => {
                    self.metrics.count_unreadable(1);
                    totals.fail(base + i, &why);
                }
            }
        }
        let sources = Sources::of(&valid);
        sources
            .admit(self.limiter.as_deref(), &self.metrics)
            .map_err(|e| super::limited_status(&e))?;
        // A stream's answer carries no ids: do not copy them.
        let event_ids: Vec<String> = if want_ids {
            valid.iter().map(|e| e.id.clone()).collect()
        } else {
            vec![String::new(); valid.len()]
        };
        let outcomes = self.db.submit_batch(valid).map_err(status)?;
        Ok(Submitted {
            outcomes,
            count,
            base,
            positions,
            sources,
            event_ids,
        })
    }

    /// Waits for a submitted request's events to be durable and tallies
    /// them.
    async fn settle(&self, s: Submitted, totals: &mut Totals) -> Result<(), Status> {
        let outcomes = s.outcomes.await.map_err(status)?;
        self.metrics.count_outcomes(&s.sources, &outcomes);
        let mut ids = vec![String::new(); s.count];
        for ((outcome, i), id) in outcomes.iter().zip(s.positions).zip(s.event_ids) {
            match outcome {
                AppendOutcome::Stored(_) => {
                    totals.response.collected += 1;
                    ids[i] = id;
                }
                AppendOutcome::Duplicate(_) => {
                    totals.response.duplicates += 1;
                    ids[i] = id;
                }
                AppendOutcome::Invalid(why) => totals.fail(s.base + i, why),
            }
        }
        totals.response.event_ids.extend(ids);
        Ok(())
    }
}

type TailStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl pb::evdb_server::Evdb for EvdbService {
    async fn ingest(
        &self,
        request: Request<pb::IngestRequest>,
    ) -> Result<Response<pb::IngestResponse>, Status> {
        let mut totals = Totals::default();
        let caller = principal(&request);
        self.ingest_one(request.into_inner(), &mut totals, true, caller.as_ref())
            .await?;
        Ok(Response::new(totals.response))
    }

    async fn ingest_stream(
        &self,
        request: Request<Streaming<pb::IngestRequest>>,
    ) -> Result<Response<pb::IngestResponse>, Status> {
        let caller = principal(&request);
        let mut stream = request.into_inner();
        let mut totals = Totals::default();
        // The next message is read and handed to the store while the
        // previous ones are made durable; they are tallied in order.
        let mut in_flight = std::collections::VecDeque::with_capacity(STREAM_IN_FLIGHT);
        while let Some(msg) = stream.message().await? {
            in_flight.push_back(self.submit(msg, &mut totals, false, caller.as_ref())?);
            if in_flight.len() >= STREAM_IN_FLIGHT
                && let Some(oldest) = in_flight.pop_front()
            {
                self.settle(oldest, &mut totals).await?;
                // Event ids of a long stream would grow without bound: the
                // answer of a stream carries counts and errors only.
                totals.response.event_ids.clear();
            }
        }
        while let Some(oldest) = in_flight.pop_front() {
            self.settle(oldest, &mut totals).await?;
        }
        totals.response.event_ids.clear();
        // Rejections found while reading come before those the store found
        // in earlier messages: report them in event order.
        totals.response.errors.sort_by_key(|e| e.index);
        Ok(Response::new(totals.response))
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::Event>, Status> {
        let id = request.into_inner().event_id;
        let found = blocking(self.db.clone(), move |db| {
            db.get(&id).map_err(status).map(|e| (e, id))
        })
        .await?;
        match found {
            (Some(e), _) => Ok(Response::new(event_out(&e))),
            (None, id) => Err(Status::not_found(format!("no event with event_id {id:?}"))),
        }
    }

    async fn query(
        &self,
        request: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryResponse>, Status> {
        let req = request.into_inner();
        let mut query = filter_in(req.filter.unwrap_or_default()).map_err(|e| invalid(&e))?;
        query.limit = match req.limit {
            0 => QUERY_LIMIT_DEFAULT,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        query.offset = usize::try_from(req.offset).unwrap_or(usize::MAX);
        query.order = match pb::SortOrder::try_from(req.sort_order) {
            Ok(pb::SortOrder::Asc) => Order::Asc,
            Ok(_) => Order::Desc,
            Err(_) => return Err(Status::invalid_argument("sort_order: unknown value")),
        };
        if !req.cursor.is_empty() {
            let c =
                Cursor::decode(&req.cursor).map_err(|e| Status::invalid_argument(e.to_string()))?;
            if c.order != query.order {
                return Err(Status::invalid_argument(
                    "cursor: it was issued for the other sort_order",
                ));
            }
            query.cursor = Some(c);
        }
        let page = blocking(self.db.clone(), move |db| db.query(&query).map_err(status)).await?;
        Ok(Response::new(pb::QueryResponse {
            events: page.events.iter().map(event_out).collect(),
            next_cursor: page.next_cursor.map(|c| c.encode()).unwrap_or_default(),
        }))
    }

    async fn stats(
        &self,
        request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let req = request.into_inner();
        let query = filter_in(req.filter.unwrap_or_default()).map_err(|e| invalid(&e))?;
        let distinct = req.distinct_correlation_ids;
        let stats = blocking(self.db.clone(), move |db| {
            db.stats_with(&query, distinct).map_err(status)
        })
        .await?;
        Ok(Response::new(pb::StatsResponse {
            total_events: stats.total,
            by_source_system: stats.by_source.into_iter().collect(),
            by_event_type: stats.by_type.into_iter().collect(),
            by_severity: stats.by_severity.into_iter().collect(),
            start: stats.time_range.map(|(a, _)| time_out(a)),
            end: stats.time_range.map(|(_, b)| time_out(b)),
            distinct_correlation_ids: stats.distinct_correlation_ids,
        }))
    }

    async fn aggregate(
        &self,
        request: Request<pb::AggregateRequest>,
    ) -> Result<Response<pb::AggregateResponse>, Status> {
        let req = request.into_inner();
        let filter = filter_in(req.filter.unwrap_or_default()).map_err(|e| invalid(&e))?;
        let metrics = req.metrics.join(",");
        let text = AggregationText {
            group_by: req.group_by.iter().map(String::as_str).collect(),
            bucket: Some(req.bucket.as_str()),
            tz_offset: Some(req.tz_offset.as_str()).filter(|t| !t.is_empty()),
            metrics: Some(metrics.as_str()).filter(|m| !m.is_empty()),
            order_by: Some(req.order_by.as_str()),
            limit: (req.limit > 0).then_some(req.limit as usize),
        };
        let agg = Aggregation::from_text(filter, &text).map_err(|e| status(e.into()))?;
        let r = blocking(self.db.clone(), move |db| {
            db.aggregate(&agg).map_err(status)
        })
        .await?;
        Ok(Response::new(pb::AggregateResponse {
            groups: r
                .groups
                .into_iter()
                .map(|g| pb::AggregateGroup {
                    key: g
                        .key
                        .into_iter()
                        .map(|value| pb::KeyPart { value })
                        .collect(),
                    bucket: g.bucket.map(time_out),
                    values: g.values.into_iter().map(metric_out).collect(),
                })
                .collect(),
            totals: r.totals.into_iter().map(metric_out).collect(),
            dimensions: r.dimensions,
            metrics: r.metrics,
            group_count: r.group_count,
            matched_events: r.matched,
            value_path: r.value_path.as_str().to_owned(),
            exact: r.exact,
            strategy: r.strategy.to_owned(),
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let deleted = match request.into_inner().target {
            Some(pb::delete_request::Target::EventId(id)) => {
                let gone = blocking(self.db.clone(), move |db| {
                    db.delete(&id).map_err(status).map(|ok| (ok, id))
                })
                .await?;
                match gone {
                    (true, _) => 1,
                    (false, id) => {
                        return Err(Status::not_found(format!("no event with event_id {id:?}")));
                    }
                }
            }
            Some(pb::delete_request::Target::Before(t)) => {
                let before = time_in(&t, "before").map_err(|e| invalid(&e))?;
                blocking(self.db.clone(), move |db| {
                    db.delete_before(before).map_err(status)
                })
                .await?
            }
            Some(pb::delete_request::Target::Filter(f)) => {
                let query = filter_in(f).map_err(|e| invalid(&e))?;
                blocking(self.db.clone(), move |db| {
                    db.delete_matching(&query).map_err(status)
                })
                .await?
            }
            None => {
                return Err(Status::invalid_argument(
                    "target: give event_id, before or filter",
                ));
            }
        };
        Ok(Response::new(pb::DeleteResponse { deleted }))
    }

    async fn compact(
        &self,
        request: Request<pb::CompactRequest>,
    ) -> Result<Response<pb::CompactResponse>, Status> {
        let force = request.into_inner().now;
        let policies = self.policies.clone();
        let metrics = self.metrics.clone();
        let report = blocking(self.db.clone(), move |db| {
            db.maintain(&policies, crate::Timestamp::now(), force, |_| {})
                .map_err(status)
        })
        .await?;
        if let Some(r) = &report.retention {
            metrics.record_retention(r);
        }
        metrics.record_compaction(&report.compaction);
        let c = &report.compaction;
        Ok(Response::new(pb::CompactResponse {
            retention: report.retention.as_ref().map(|r| pb::RetentionReport {
                segments_dropped: r.segments_dropped as u64,
                events_deleted: r.events_deleted,
                bytes_freed: r.bytes_freed,
            }),
            segments_in: c.segments_in as u64,
            segments_out: c.segments_out as u64,
            events_removed: c.events_removed,
            bytes_before: c.bytes_before,
            bytes_after: c.bytes_after,
            elapsed_ms: c.elapsed_ms,
        }))
    }

    type TailStream = TailStream;

    async fn tail(
        &self,
        request: Request<pb::TailRequest>,
    ) -> Result<Response<Self::TailStream>, Status> {
        let req = request.into_inner();
        let filter = TailFilter {
            sources: req.source_systems,
            types: req.event_types,
            min_severity: severity_in(req.min_severity, "min_severity").map_err(|e| invalid(&e))?,
            tags: req.tags,
        };
        let mut sub = self.db.subscribe(filter);
        let mut shutdown = self.shutdown.clone();
        let stream = async_stream(move |tx| async move {
            let going_away = || Err(Status::unavailable("server shutting down"));
            loop {
                let item = tokio::select! {
                    next = sub.next() => match next {
                        Ok(e) => Ok(event_out(&e)),
                        Err(TailEnd::Lagged) => Err(Status::resource_exhausted(format!(
                            "slow consumer: fell {TAIL_QUEUE_EVENTS} events behind"
                        ))),
                        Err(TailEnd::Closed) => going_away(),
                    },
                    () = tx.closed() => return,
                    _ = shutdown.wait_for(|stop| *stop) => going_away(),
                };
                let end = item.is_err();
                if tx.send(item).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// A stream fed by a task through a small channel (the subscription's own
/// queue is the buffer that matters).
fn async_stream<F, Fut>(body: F) -> TailStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::Event, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
