//! The record payload: an event encoded as protobuf (`RecordV1`).
//!
//! prost gives a compact, versionable encoding whose bytes the gRPC layer can
//! later stream without re-encoding. The frame kind byte is the version.

use prost::Message;

use crate::event::{Event, JsonObject, NativeFormat, NativePayload, Severity, Timestamp};

/// Wire shape of a stored event; field numbers are part of the format.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RecordV1 {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(sint64, tag = "2")]
    pub timestamp_us: i64,
    #[prost(string, tag = "3")]
    pub source: String,
    #[prost(string, tag = "4")]
    pub event_type: String,
    #[prost(uint32, tag = "5")]
    pub severity: u32,
    #[prost(string, optional, tag = "6")]
    pub correlation_id: Option<String>,
    #[prost(string, repeated, tag = "7")]
    pub tags: Vec<String>,
    #[prost(string, tag = "8")]
    pub data: String,
    #[prost(uint32, tag = "9")]
    pub native_format: u32,
    #[prost(bytes = "vec", tag = "10")]
    pub native: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record does not decode: {0}")]
    Decode(String),
    #[error("record field {field} is invalid: {reason}")]
    Field {
        field: &'static str,
        reason: &'static str,
    },
}

/// Encodes an event to its record payload, appending to `out`.
///
/// Writes the same bytes as `RecordV1::encode` (proto3: fields at their
/// default are left out) without cloning the event into a `RecordV1`.
pub fn encode(event: &Event, out: &mut Vec<u8>) {
    use prost::encoding::{bytes, sint64, string, uint32};
    if !event.id.is_empty() {
        string::encode(1, &event.id, out);
    }
    if event.timestamp.as_micros() != 0 {
        sint64::encode(2, &event.timestamp.as_micros(), out);
    }
    if !event.source.is_empty() {
        string::encode(3, &event.source, out);
    }
    if !event.event_type.is_empty() {
        string::encode(4, &event.event_type, out);
    }
    let severity = u32::from(event.severity.as_u8());
    if severity != 0 {
        uint32::encode(5, &severity, out);
    }
    if let Some(correlation_id) = &event.correlation_id {
        string::encode(6, correlation_id, out);
    }
    string::encode_repeated(7, &event.tags, out);
    if !event.data.as_str().is_empty() {
        string::encode(8, event.data.as_string(), out);
    }
    if let Some(native) = &event.native {
        uint32::encode(9, &native.format.as_u32(), out);
        if !native.bytes.is_empty() {
            bytes::encode(10, &native.bytes, out);
        }
    }
}

/// Decodes a record payload back to an event, checking what the type system
/// cannot: a known severity and a known native format.
pub fn decode(payload: &[u8]) -> Result<Event, RecordError> {
    let record = RecordV1::decode(payload).map_err(|e| RecordError::Decode(e.to_string()))?;
    let severity = u8::try_from(record.severity)
        .ok()
        .and_then(Severity::from_u8)
        .ok_or(RecordError::Field {
            field: "severity",
            reason: "unknown level",
        })?;
    let native = match record.native_format {
        0 => None,
        f => Some(NativePayload {
            format: NativeFormat::from_u32(f).ok_or(RecordError::Field {
                field: "native_format",
                reason: "unknown format",
            })?,
            bytes: record.native,
        }),
    };
    Ok(Event {
        id: record.id,
        timestamp: Timestamp(record.timestamp_us),
        source: record.source,
        event_type: record.event_type,
        severity,
        correlation_id: record.correlation_id,
        tags: record.tags,
        data: JsonObject::from_stored(record.data),
        native,
    })
}

/// Reads only the event id of a record (for idempotency checks).
pub fn decode_id(payload: &[u8]) -> Result<String, RecordError> {
    decode(payload).map(|e| e.id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_with_every_field() {
        let mut e = Event::new("src", "type");
        e.severity = Severity::Critical;
        e.correlation_id = Some("corr".into());
        e.tags = vec!["a".into(), "b".into()];
        e.data = JsonObject::parse(r#"{"k": [1, 2]}"#).unwrap();
        e.native = Some(NativePayload {
            format: NativeFormat::ChaukasEventV1,
            bytes: vec![0, 1, 2, 255],
        });
        let mut buf = Vec::new();
        encode(&e, &mut buf);
        assert_eq!(decode(&buf).unwrap(), e);
        assert_eq!(decode_id(&buf).unwrap(), e.id);
        let mut e = Event::new("s", "t");
        e.severity = Severity::Debug;
        e.timestamp = Timestamp(0);
        let mut manual = Vec::new();
        encode(&e, &mut manual);
        let derived = RecordV1 {
            id: e.id.clone(),
            source: "s".into(),
            event_type: "t".into(),
            data: "{}".into(),
            ..Default::default()
        };
        assert_eq!(manual, derived.encode_to_vec());
    }

    #[test]
    fn unknown_severity_is_an_error() {
        let record = RecordV1 {
            severity: 9,
            ..Default::default()
        };
        assert!(matches!(
            decode(&record.encode_to_vec()),
            Err(RecordError::Field {
                field: "severity",
                ..
            })
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }
    }
}
