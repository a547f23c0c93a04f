//! The JSON form of an event (contract §2, seed 002 "EcosystemEvent").
//!
//! Parsing reports the first bad field by name. `data` is kept verbatim.

use serde_json::value::RawValue;

use crate::event::{Event, JsonObject, Severity, Timestamp, new_event_id};
use crate::limits::{self, Invalid};

fn string_field(field: &'static str, raw: Option<&&RawValue>) -> Result<Option<String>, Invalid> {
    match raw {
        None => Ok(None),
        Some(raw) if raw.get() == "null" => Ok(None),
        Some(raw) => raw_string(raw)
            .map(Some)
            .ok_or_else(|| Invalid::new(field, "must be a string")),
    }
}

/// The string `raw` holds, or `None` if it is not a string. `raw` was
/// checked as one JSON value when its document was parsed (no control
/// characters, valid escapes), so a string without escapes is exactly the
/// text between its quotes; only escaped strings are decoded again.
fn raw_string(raw: &RawValue) -> Option<String> {
    let text = raw.get();
    match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(inner) if !inner.contains('\\') => Some(inner.to_owned()),
        _ => serde_json::from_str::<String>(text).ok(),
    }
}

/// The object `raw` holds, or `None` if it is another kind of value. `raw`
/// was checked as one JSON value when its document was parsed, so its first
/// byte tells its kind: it is not parsed a second time.
fn raw_object(raw: &RawValue) -> Option<JsonObject> {
    let text = raw.get().trim();
    text.starts_with('{')
        .then(|| JsonObject::from_checked(text.to_owned()))
}

/// The fields of the JSON event, each kept as raw text until it is read
/// (no map, no key copies); unknown fields are ignored.
#[derive(serde::Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    event_id: Option<&'a RawValue>,
    #[serde(borrow)]
    timestamp: Option<&'a RawValue>,
    #[serde(borrow)]
    source_system: Option<&'a RawValue>,
    #[serde(borrow)]
    event_type: Option<&'a RawValue>,
    #[serde(borrow)]
    severity: Option<&'a RawValue>,
    #[serde(borrow)]
    correlation_id: Option<&'a RawValue>,
    #[serde(borrow)]
    tags: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// Parses one event from JSON text. Missing `event_id` and `timestamp` are
/// filled with a fresh UUIDv7 and `now`. The event is also validated.
pub fn parse_event(text: &str, now: Timestamp) -> Result<Event, Invalid> {
    // A derived struct would also accept an array: only objects are events.
    if !text.trim_start().starts_with('{') {
        return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => Invalid::new("event", "must be a JSON object"),
            Err(e) => Invalid::new("event", format!("malformed JSON: {e}")),
        });
    }
    let fields: Fields<'_> = serde_json::from_str(text).map_err(|e| {
        if e.to_string().starts_with("duplicate field") {
            Invalid::new("event", format!("malformed JSON: {e}"))
        } else if e.is_data() {
            Invalid::new("event", "must be a JSON object")
        } else {
            Invalid::new("event", format!("malformed JSON: {e}"))
        }
    })?;
    let id = string_field("event_id", fields.event_id.as_ref())?.unwrap_or_else(new_event_id);
    let timestamp = match string_field("timestamp", fields.timestamp.as_ref())? {
        None => now,
        Some(text) => Timestamp::parse_rfc3339(&text)
            .map_err(|e| Invalid::new("timestamp", format!("{e}: {text:?}")))?,
    };
    let source = string_field("source_system", fields.source_system.as_ref())?
        .ok_or_else(|| Invalid::new("source_system", "is required"))?;
    let event_type = string_field("event_type", fields.event_type.as_ref())?
        .ok_or_else(|| Invalid::new("event_type", "is required"))?;
    let severity = match string_field("severity", fields.severity.as_ref())? {
        None => Severity::Info,
        Some(text) => Severity::parse(&text).ok_or_else(|| {
            Invalid::new(
                "severity",
                format!("unknown level {text:?}: use debug, info, warning, error or critical"),
            )
        })?,
    };
    let correlation_id = string_field("correlation_id", fields.correlation_id.as_ref())?;
    let tags = match fields.tags {
        None => Vec::new(),
        Some(raw) if raw.get() == "null" => Vec::new(),
        Some(raw) => serde_json::from_str::<Vec<String>>(raw.get())
            .map_err(|_| Invalid::new("tags", "must be an array of strings"))?,
    };
    let data = match fields.data {
        None => JsonObject::empty(),
        Some(raw) if raw.get() == "null" => JsonObject::empty(),
        Some(raw) => {
            raw_object(raw).ok_or_else(|| Invalid::new("data", "must be a JSON object"))?
        }
    };
    let event = Event {
        id,
        timestamp,
        source,
        event_type,
        severity,
        correlation_id,
        tags,
        data,
        native: None,
    };
    limits::validate(&event)?;
    Ok(event)
}

/// Writes the JSON form of an event (timestamps in UTC with `Z`).
pub fn write_event(event: &Event, out: &mut String) {
    use std::fmt::Write;
    let s = |v: &str| serde_json::to_string(v).unwrap_or_else(|_| "\"\"".into());
    let _ = write!(
        out,
        r#"{{"event_id":{},"timestamp":"{}","source_system":{},"event_type":{},"severity":"{}","correlation_id":{},"data":{},"tags":["#,
        s(&event.id),
        event.timestamp.to_rfc3339(),
        s(&event.source),
        s(&event.event_type),
        event.severity,
        event
            .correlation_id
            .as_deref()
            .map_or_else(|| "null".to_owned(), s),
        event.data.as_str(),
    );
    for (i, tag) in event.tags.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&s(tag));
    }
    out.push_str("]}");
}

/// The JSON form of stats (contract §3 `GET /events/stats`). `time_range`
/// is the span of the matching events (nulls when none match).
pub fn stats_to_json(stats: &crate::query::Stats) -> serde_json::Value {
    let range = stats.time_range.map_or_else(
        || serde_json::json!({ "start": null, "end": null }),
        |(a, b)| serde_json::json!({ "start": a.to_rfc3339(), "end": b.to_rfc3339() }),
    );
    let mut out = serde_json::json!({
        "total_events": stats.total,
        "by_source_system": stats.by_source,
        "by_event_type": stats.by_type,
        "by_severity": stats.by_severity,
        "time_range": range,
    });
    if let Some(n) = stats.distinct_correlation_ids {
        out["distinct_correlation_ids"] = n.into();
    }
    out
}

/// Metric names to values: counts as integers, times as RFC 3339, null
/// for no value.
fn metric_values_json(
    names: &[String],
    values: &[crate::query::aggregate::MetricValue],
) -> serde_json::Map<String, serde_json::Value> {
    use crate::query::aggregate::MetricValue;
    names
        .iter()
        .zip(values)
        .map(|(m, v)| {
            let v = match v {
                MetricValue::Count(c) => (*c).into(),
                MetricValue::Number(x) => serde_json::Number::from_f64(*x)
                    .map_or(serde_json::Value::Null, serde_json::Value::Number),
                MetricValue::Time(t) => t.to_rfc3339().into(),
                MetricValue::Null => serde_json::Value::Null,
            };
            (m.clone(), v)
        })
        .collect()
}

/// The JSON form of an aggregation (`GET /events/aggregate`): each group's
/// `key` maps dimension names to values (null: the events have none), its
/// `values` map metric names to values (null: no value); `bucket` is the
/// bucket's start when bucketed; `totals` holds the metrics over every
/// matching event.
pub fn aggregate_to_json(
    r: &crate::query::aggregate::AggregateResult,
    took_ms: f64,
) -> serde_json::Value {
    let groups: Vec<serde_json::Value> = r
        .groups
        .iter()
        .map(|g| {
            let key: serde_json::Map<String, serde_json::Value> = r
                .dimensions
                .iter()
                .zip(&g.key)
                .map(|(d, v)| (d.clone(), v.clone().into()))
                .collect();
            let mut out = serde_json::json!({
                "key": key,
                "values": metric_values_json(&r.metrics, &g.values),
            });
            if let Some(b) = g.bucket {
                out["bucket"] = b.to_rfc3339().into();
            }
            out
        })
        .collect();
    serde_json::json!({
        "dimensions": r.dimensions,
        "metrics": r.metrics,
        "groups": groups,
        "totals": metric_values_json(&r.metrics, &r.totals),
        "group_count": r.group_count,
        "matched_events": r.matched,
        "value_path": r.value_path.as_str(),
        "exact": r.exact,
        "strategy": r.strategy,
        "took_ms": (took_ms * 1000.0).round() / 1000.0,
    })
}

pub fn event_to_json(event: &Event) -> String {
    let mut out = String::with_capacity(256 + event.data.as_str().len());
    write_event(event, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_seed_example_and_writes_it_back() {
        let text = r#"{"source_system":"mahavishnu","event_type":"workflow_complete",
            "severity":"WARN","correlation_id":"wf-abc123",
            "data":{"workflow_id":"abc123","duration":5.2},"tags":["workflow","production"],
            "timestamp":"2024-01-01T00:00:00+01:00","event_id":"e1"}"#;
        let e = parse_event(text, Timestamp(0)).unwrap();
        assert_eq!(e.severity, Severity::Warning);
        assert_eq!(
            e.data.as_str(),
            r#"{"workflow_id":"abc123","duration":5.2}"#
        );
        let back = event_to_json(&e);
        let again = parse_event(&back, Timestamp(1)).unwrap();
        assert_eq!(again, e);
        assert!(back.contains(r#""timestamp":"2023-12-31T23:00:00.000000Z""#));
    }

    #[test]
    fn fills_defaults() {
        let e = parse_event(r#"{"source_system":"a","event_type":"b"}"#, Timestamp(42)).unwrap();
        assert_eq!(e.timestamp, Timestamp(42));
        assert_eq!(e.severity, Severity::Info);
        assert_eq!(e.id.len(), 36);
        assert_eq!(e.data.as_str(), "{}");
    }

    #[test]
    fn names_the_bad_field() {
        let cases = [
            (r#"{"event_type":"b"}"#, "source_system"),
            (r#"{"source_system":1,"event_type":"b"}"#, "source_system"),
            (
                r#"{"source_system":"a","event_type":"b","severity":"loud"}"#,
                "severity",
            ),
            (
                r#"{"source_system":"a","event_type":"b","timestamp":"x"}"#,
                "timestamp",
            ),
            (
                r#"{"source_system":"a","event_type":"b","data":[1]}"#,
                "data",
            ),
            (
                r#"{"source_system":"a","event_type":"b","tags":"x"}"#,
                "tags",
            ),
            (
                r#"{"source_system":"a","event_type":"b","tags":[""]}"#,
                "tags",
            ),
            (r#"[1]"#, "event"),
            (r#"{"#, "event"),
        ];
        for (text, field) in cases {
            assert_eq!(
                parse_event(text, Timestamp(0)).unwrap_err().field,
                field,
                "{text}"
            );
        }
    }

    /// The shortcuts for strings and `data` read what a full parse reads.
    #[test]
    fn raw_strings_and_objects_read_like_a_full_parse() {
        let values = [
            r#""plain""#,
            r#""""#,
            r#""with \"quote\" and \\ backslash""#,
            r#""\u00e9t\u00e9 \ud83d\ude00""#,
            r#""é ✓ 😀""#,
            r#""tab\there""#,
            "12",
            "true",
            r#"["a"]"#,
            r#"{"a":"b"}"#,
            r#"{ "nested": {"x": [1, 2, {"y": null}]} }"#,
            "[]",
        ];
        for value in values {
            let doc = format!(r#"{{"v": {value} }}"#);
            let fields: std::collections::HashMap<&str, &RawValue> =
                serde_json::from_str(&doc).unwrap();
            let raw = fields["v"];
            assert_eq!(
                raw_string(raw),
                serde_json::from_str::<String>(value).ok(),
                "{value}"
            );
            assert_eq!(
                raw_object(raw).map(JsonObject::into_string),
                JsonObject::parse(value).ok().map(JsonObject::into_string),
                "{value}"
            );
        }
    }

    proptest::proptest! {
        /// Any string, as any JSON writer escapes it, reads back the same
        /// through the shortcut.
        #[test]
        fn any_string_reads_back(text in ".*") {
            let json = serde_json::to_string(&text).unwrap();
            let doc = format!(r#"{{"v":{json}}}"#);
            let fields: std::collections::HashMap<&str, &RawValue> =
                serde_json::from_str(&doc).unwrap();
            proptest::prop_assert_eq!(raw_string(fields["v"]), Some(text));
        }
    }
}
