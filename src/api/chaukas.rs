//! Chaukas events (contract §4): the exact protobuf bytes of each event are
//! kept as the event's native payload, and the event is mapped onto the
//! evdb model so that indexes and the JSON API see it:
//!
//! | evdb | from the Chaukas `Event` |
//! |---|---|
//! | `event_id` | `event_id` (a UUIDv7 when empty) |
//! | `timestamp` | `timestamp` (receive time when unset) |
//! | `source_system` | `"chaukas"` |
//! | `event_type` | `type` without its prefix, lower case (`session_start`, …; `unspecified`) |
//! | `severity` | DEBUG→debug, INFO/UNSPECIFIED→info, WARN→warning, ERROR→error |
//! | `correlation_id` | `session_id`, else `trace_id` (none when both are empty) |
//! | `tags` | its `tags`, plus `tenant:…`, `project:…`, `session:…`, `agent:…`, `span:…`, `trace:…`, `status:…` for each non-empty one |
//! | `data` | the whole event in the protobuf JSON mapping, proto field names |

use std::sync::OnceLock;

use prost::Message;
use prost::encoding::{WireType, decode_key, decode_varint};
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};

use crate::api::proto::chaukas::common::v1 as pb;
use crate::event::new_event_id;
use crate::event::{Event, JsonObject, NativeFormat, NativePayload, Severity, Timestamp};
use crate::limits::{self, Invalid};

/// The `source_system` of every Chaukas event.
pub const SOURCE: &str = "chaukas";

/// Tag prefixes for the Chaukas id fields, in `QueryFilter` terms.
pub const TAG_TENANT: &str = "tenant:";
pub const TAG_PROJECT: &str = "project:";
pub const TAG_SESSION: &str = "session:";
pub const TAG_AGENT: &str = "agent:";
pub const TAG_SPAN: &str = "span:";
pub const TAG_TRACE: &str = "trace:";
pub const TAG_STATUS: &str = "status:";

/// The length-delimited values of field `number` in `buf` (other fields are
/// skipped). Fails on anything that is not well-formed protobuf.
pub fn field_values(buf: &[u8], number: u32) -> Result<Vec<&[u8]>, Invalid> {
    let bad = |why: &str| Invalid::new("body", format!("malformed protobuf: {why}"));
    let mut rest = buf;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (tag, wire) = decode_key(&mut rest).map_err(|e| bad(&e.to_string()))?;
        match wire {
            WireType::Varint => {
                decode_varint(&mut rest).map_err(|e| bad(&e.to_string()))?;
            }
            WireType::SixtyFourBit => {
                rest = rest.get(8..).ok_or_else(|| bad("truncated fixed64"))?;
            }
            WireType::ThirtyTwoBit => {
                rest = rest.get(4..).ok_or_else(|| bad("truncated fixed32"))?;
            }
            WireType::LengthDelimited => {
                let len = decode_varint(&mut rest).map_err(|e| bad(&e.to_string()))?;
                let len = usize::try_from(len).map_err(|_| bad("length overflows"))?;
                if len > rest.len() {
                    return Err(bad("truncated length-delimited field"));
                }
                let (value, tail) = rest.split_at(len);
                if tag == number {
                    out.push(value);
                }
                rest = tail;
            }
            WireType::StartGroup | WireType::EndGroup => return Err(bad("groups are not used")),
        }
    }
    Ok(out)
}

/// The exact bytes of the event of an `IngestEventRequest`.
pub fn event_of_request(body: &[u8]) -> Result<&[u8], Invalid> {
    field_values(body, 1)?
        .pop()
        .ok_or_else(|| Invalid::new("event", "IngestEventRequest carries no event"))
}

/// The exact bytes of each event of an `IngestEventBatchRequest`.
pub fn events_of_batch_request(body: &[u8]) -> Result<Vec<&[u8]>, Invalid> {
    let Some(batch) = field_values(body, 1)?.pop() else {
        return Ok(Vec::new());
    };
    field_values(batch, 3)
}

/// The `batch_id` of an `IngestEventBatchRequest`, if any.
pub fn batch_id(body: &[u8]) -> String {
    field_values(body, 1)
        .ok()
        .and_then(|mut v| v.pop())
        .and_then(|batch| pb::EventBatch::decode(batch).ok())
        .map(|b| b.batch_id)
        .unwrap_or_default()
}

fn event_descriptor() -> Option<&'static MessageDescriptor> {
    static DESC: OnceLock<Option<MessageDescriptor>> = OnceLock::new();
    DESC.get_or_init(|| {
        DescriptorPool::decode(crate::api::proto::DESCRIPTORS)
            .ok()?
            .get_message_by_name("chaukas.spec.common.v1.Event")
    })
    .as_ref()
}

/// The protobuf JSON mapping of an encoded Chaukas event (proto field
/// names, enums by name).
pub fn to_json(bytes: &[u8]) -> Result<String, Invalid> {
    let desc = event_descriptor()
        .ok_or_else(|| Invalid::new("event", "the Chaukas descriptors are unavailable"))?;
    let msg = DynamicMessage::decode(desc.clone(), bytes)
        .map_err(|e| Invalid::new("event", format!("malformed Chaukas event: {e}")))?;
    let mut out = Vec::with_capacity(bytes.len() * 2);
    let mut ser = serde_json::Serializer::new(&mut out);
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(true);
    msg.serialize_with_options(&mut ser, &options)
        .map_err(|e| Invalid::new("event", format!("cannot render the event as JSON: {e}")))?;
    String::from_utf8(out).map_err(|_| Invalid::new("event", "rendered JSON is not UTF-8"))
}

/// The evdb name of a Chaukas event type: `EVENT_TYPE_TOOL_CALL_START` →
/// `tool_call_start`.
pub fn type_name(t: pb::EventType) -> String {
    let name = t.as_str_name();
    name.strip_prefix("EVENT_TYPE_")
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// The evdb name of a Chaukas status: `EVENT_STATUS_COMPLETED` → `completed`.
pub fn status_name(s: pb::EventStatus) -> String {
    let name = s.as_str_name();
    name.strip_prefix("EVENT_STATUS_")
        .unwrap_or(name)
        .to_ascii_lowercase()
}

pub fn severity_of(s: pb::Severity) -> Severity {
    match s {
        pb::Severity::Debug => Severity::Debug,
        pb::Severity::Unspecified | pb::Severity::Info => Severity::Info,
        pb::Severity::Warn => Severity::Warning,
        pb::Severity::Error => Severity::Error,
    }
}

/// The Chaukas severities an evdb level stands for.
pub fn severities_for(level: Severity) -> &'static [pb::Severity] {
    match level {
        Severity::Debug => &[pb::Severity::Debug],
        Severity::Info => &[pb::Severity::Info, pb::Severity::Unspecified],
        Severity::Warning => &[pb::Severity::Warn],
        Severity::Error | Severity::Critical => &[pb::Severity::Error],
    }
}

/// Maps one encoded Chaukas event onto an evdb event that keeps `bytes`.
pub fn to_event(bytes: &[u8], now: Timestamp) -> Result<Event, Invalid> {
    let msg = pb::Event::decode(bytes)
        .map_err(|e| Invalid::new("event", format!("malformed Chaukas event: {e}")))?;
    let timestamp = match &msg.timestamp {
        Some(t) => {
            let micros = t
                .seconds
                .checked_mul(1_000_000)
                .and_then(|s| s.checked_add(i64::from(t.nanos) / 1000))
                .ok_or_else(|| Invalid::new("timestamp", "out of range"))?;
            Timestamp(micros)
        }
        None => now,
    };
    let mut tags = msg.tags.clone();
    let ids: [(&str, &'static str, &str); 6] = [
        (TAG_TENANT, "tenant_id", &msg.tenant_id),
        (TAG_PROJECT, "project_id", &msg.project_id),
        (TAG_SESSION, "session_id", &msg.session_id),
        (TAG_AGENT, "agent_id", &msg.agent_id),
        (TAG_SPAN, "span_id", &msg.span_id),
        (TAG_TRACE, "trace_id", &msg.trace_id),
    ];
    for (prefix, field, value) in ids {
        if value.is_empty() {
            continue;
        }
        let tag = format!("{prefix}{value}");
        if tag.len() > limits::TAG_LEN_MAX {
            return Err(Invalid::new(
                field,
                format!(
                    "at most {} bytes are indexed",
                    limits::TAG_LEN_MAX - prefix.len()
                ),
            ));
        }
        tags.push(tag);
    }
    if msg.status != 0 {
        tags.push(format!("{TAG_STATUS}{}", status_name(msg.status())));
    }
    let correlation_id = [&msg.session_id, &msg.trace_id]
        .into_iter()
        .find(|s| !s.is_empty())
        .cloned();
    let data = JsonObject::parse_owned(to_json(bytes)?)
        .map_err(|e| Invalid::new("event", format!("rendered JSON is not an object: {e}")))?;
    let event = Event {
        id: if msg.event_id.is_empty() {
            new_event_id()
        } else {
            msg.event_id.clone()
        },
        timestamp,
        source: SOURCE.to_owned(),
        event_type: type_name(msg.r#type()),
        severity: severity_of(msg.severity()),
        correlation_id,
        tags,
        data,
        native: Some(NativePayload {
            format: NativeFormat::ChaukasEventV1,
            bytes: bytes.to_vec(),
        }),
    };
    limits::validate(&event)?;
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::proto::chaukas::server::v1 as server;

    fn sample() -> pb::Event {
        pb::Event {
            event_id: "ev-1".into(),
            tenant_id: "t1".into(),
            project_id: "p1".into(),
            session_id: "s1".into(),
            agent_id: "a1".into(),
            r#type: pb::EventType::ToolCallStart as i32,
            severity: pb::Severity::Warn as i32,
            status: pb::EventStatus::Completed as i32,
            timestamp: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5_000,
            }),
            tags: vec!["prod".into()],
            ..pb::Event::default()
        }
    }

    #[test]
    fn maps_and_keeps_the_exact_bytes() {
        let bytes = sample().encode_to_vec();
        let req = server::IngestEventRequest {
            event: Some(sample()),
        }
        .encode_to_vec();
        assert_eq!(event_of_request(&req).unwrap(), &bytes[..]);
        let e = to_event(&bytes, Timestamp(0)).unwrap();
        assert_eq!(e.id, "ev-1");
        assert_eq!(e.source, SOURCE);
        assert_eq!(e.event_type, "tool_call_start");
        assert_eq!(e.severity, Severity::Warning);
        assert_eq!(e.timestamp, Timestamp(1_700_000_000_000_005));
        assert_eq!(e.correlation_id.as_deref(), Some("s1"));
        for t in [
            "prod",
            "tenant:t1",
            "project:p1",
            "session:s1",
            "agent:a1",
            "status:completed",
        ] {
            assert!(e.tags.iter().any(|x| x == t), "{t}");
        }
        assert!(
            e.data.as_str().contains(r#""event_id":"ev-1""#),
            "{}",
            e.data.as_str()
        );
        assert!(e.data.as_str().contains("EVENT_TYPE_TOOL_CALL_START"));
        assert_eq!(e.native.unwrap().bytes, bytes);
    }

    #[test]
    fn batch_and_malformed_bodies() {
        let batch = server::IngestEventBatchRequest {
            event_batch: Some(pb::EventBatch {
                batch_id: "b1".into(),
                events: vec![sample(), sample()],
                ..pb::EventBatch::default()
            }),
        }
        .encode_to_vec();
        assert_eq!(events_of_batch_request(&batch).unwrap().len(), 2);
        assert_eq!(batch_id(&batch), "b1");
        assert!(events_of_batch_request(&[0x0a, 0x05, 0x01]).is_err());
        assert!(event_of_request(&[]).is_err());
        assert!(to_event(&[0xff, 0xff], Timestamp(0)).is_err());
    }
}
