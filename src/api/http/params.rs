//! Query-string filters of contract §3 (`GET /events`, `/events/stats`,
//! `/events/stream`). Repeated keys are collected; unknown keys are
//! refused so a typo never silently widens a query.

use std::borrow::Cow;

use crate::event::{Severity, Timestamp};
use crate::query::aggregate::{Aggregation, AggregationText};
use crate::query::{Cursor, Order, Query};
use crate::tail::TailFilter;

use super::error::ApiError;

/// The decoded `key=value` pairs of a query string, in order.
pub fn pairs(raw: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(raw.unwrap_or("").as_bytes())
        .map(|(k, v): (Cow<'_, str>, Cow<'_, str>)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn level(field: &str, v: &str) -> Result<Severity, ApiError> {
    Severity::parse(v).ok_or_else(|| {
        ApiError::bad_request(
            field,
            format!("{field}: unknown level {v:?}: use debug, info, warning, error or critical"),
        )
    })
}

fn time(field: &str, v: &str) -> Result<Timestamp, ApiError> {
    Timestamp::parse_rfc3339(v)
        .map_err(|e| ApiError::bad_request(field, format!("{field}: {e}: {v:?} (use RFC 3339)")))
}

fn number(field: &str, v: &str) -> Result<usize, ApiError> {
    v.parse::<usize>()
        .map_err(|_| ApiError::bad_request(field, format!("{field}: not a whole number: {v:?}")))
}

fn tags_into(out: &mut Vec<String>, v: &str) {
    out.extend(
        v.split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned),
    );
}

/// Keys `GET /events` and `/events/stats` accept.
pub const QUERY_KEYS: &[&str] = &[
    "source_system",
    "event_type",
    "severity",
    "min_severity",
    "correlation_id",
    "tags",
    "start_time",
    "end_time",
    "text",
    "limit",
    "offset",
    "sort_order",
    "cursor",
];

/// The filters of `GET /events` (and, ignoring paging, `/events/stats`).
pub fn query(pairs: &[(String, String)]) -> Result<Query, ApiError> {
    let mut q = Query::default();
    let mut cursor: Option<Cursor> = None;
    for (k, v) in pairs {
        match k.as_str() {
            "source_system" => q.sources.push(v.clone()),
            "event_type" => q.types.push(v.clone()),
            "severity" => q.severity = Some(level("severity", v)?),
            "min_severity" => q.min_severity = Some(level("min_severity", v)?),
            "correlation_id" => q.correlation_id = Some(v.clone()),
            "tags" | "tag" => tags_into(&mut q.tags, v),
            "start_time" => q.start = Some(time("start_time", v)?),
            "end_time" => q.end = Some(time("end_time", v)?),
            "text" => q.text = Some(v.clone()).filter(|t| !t.is_empty()),
            "limit" => q.limit = number("limit", v)?,
            "offset" => q.offset = number("offset", v)?,
            "sort_order" => {
                q.order = match v.to_ascii_lowercase().as_str() {
                    "desc" => Order::Desc,
                    "asc" => Order::Asc,
                    _ => {
                        return Err(ApiError::bad_request(
                            "sort_order",
                            format!("sort_order: {v:?}: use asc or desc"),
                        ));
                    }
                }
            }
            "cursor" => {
                if !v.is_empty() {
                    cursor = Some(
                        Cursor::decode(v)
                            .map_err(|e| ApiError::bad_request("cursor", e.to_string()))?,
                    );
                }
            }
            other => {
                return Err(ApiError::bad_request(
                    other,
                    format!(
                        "unknown query parameter {other:?}; known: {}",
                        QUERY_KEYS.join(", ")
                    ),
                ));
            }
        }
    }
    if let Some(c) = cursor {
        if c.order != q.order {
            return Err(ApiError::bad_request(
                "cursor",
                "cursor: it was issued for the other sort_order",
            ));
        }
        q.cursor = Some(c);
    }
    Ok(q)
}

/// Keys `GET /events/aggregate` accepts besides the filters.
pub const AGGREGATE_KEYS: &[&str] = &[
    "group_by",
    "bucket",
    "tz_offset",
    "metrics",
    "order_by",
    "limit",
];

/// `GET /events/aggregate`: the filters of `GET /events` (no paging) plus
/// the aggregation (`docs/api.md`, "Aggregations"). `group_by` and
/// `metrics` may repeat.
pub fn aggregate(pairs: &[(String, String)]) -> Result<Aggregation, ApiError> {
    let mut filters = Vec::new();
    let mut text = AggregationText::default();
    let mut metrics: Vec<&str> = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "group_by" => text.group_by.push(v),
            "bucket" => text.bucket = Some(v),
            "tz_offset" => text.tz_offset = Some(v),
            "metrics" | "metric" => metrics.push(v),
            "order_by" => text.order_by = Some(v),
            "limit" => text.limit = Some(number("limit", v)?),
            "offset" | "sort_order" | "cursor" => {
                return Err(ApiError::bad_request(
                    k,
                    format!("{k}: aggregations are not paged; use order_by and limit"),
                ));
            }
            _ if QUERY_KEYS.contains(&k.as_str()) => filters.push((k.clone(), v.clone())),
            other => {
                return Err(ApiError::bad_request(
                    other,
                    format!(
                        "unknown query parameter {other:?}; known: {}, {}",
                        AGGREGATE_KEYS.join(", "),
                        QUERY_KEYS[..9].join(", ")
                    ),
                ));
            }
        }
    }
    let joined = metrics.join(",");
    if !metrics.is_empty() {
        text.metrics = Some(&joined);
    }
    let filter = query(&filters)?;
    Ok(Aggregation::from_text(filter, &text)?)
}

/// The filters of `GET /events/stream`: `severity` is a minimum level.
pub fn tail(pairs: &[(String, String)]) -> Result<TailFilter, ApiError> {
    let mut f = TailFilter::default();
    for (k, v) in pairs {
        match k.as_str() {
            "source_system" => f.sources.push(v.clone()),
            "event_type" => f.types.push(v.clone()),
            "severity" | "min_severity" => f.min_severity = Some(level(k, v)?),
            "tags" | "tag" => tags_into(&mut f.tags, v),
            other => {
                return Err(ApiError::bad_request(
                    other,
                    format!(
                        "unknown query parameter {other:?}; known: source_system, event_type, severity, tags"
                    ),
                ));
            }
        }
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_and_commas() {
        let p = pairs(Some(
            "source_system=a&source_system=b&tags=x,y&tags=z&severity=WARN&limit=5&sort_order=asc",
        ));
        let q = query(&p).unwrap();
        assert_eq!(q.sources, ["a", "b"]);
        assert_eq!(q.tags, ["x", "y", "z"]);
        assert_eq!(q.severity, Some(Severity::Warning));
        assert_eq!(q.limit, 5);
        assert_eq!(q.order, Order::Asc);
    }

    #[test]
    fn names_the_bad_parameter() {
        for (text, field) in [
            ("limit=x", "limit"),
            ("severity=loud", "severity"),
            ("start_time=yesterday", "start_time"),
            ("cursor=zzz", "cursor"),
            ("sort_order=up", "sort_order"),
            ("sourcesystem=a", "sourcesystem"),
        ] {
            let err = query(&pairs(Some(text))).unwrap_err();
            assert_eq!(err.field.as_deref(), Some(field), "{text}");
        }
    }
}
