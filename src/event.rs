//! The event: evdb's one domain type.
//!
//! These types belong to no wire format: the storage layer encodes them with
//! prost (see `docs/format.md`), the API layer converts JSON and protobuf to
//! and from them at its edge. Validation of every field lives in
//! [`crate::limits`].

use std::fmt;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Microseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub const MIN: Timestamp = Timestamp(i64::MIN);
    pub const MAX: Timestamp = Timestamp(i64::MAX);

    /// The current wall-clock time.
    pub fn now() -> Timestamp {
        let now = OffsetDateTime::now_utc();
        Timestamp((now.unix_timestamp_nanos() / 1_000) as i64)
    }

    pub fn from_micros(us: i64) -> Timestamp {
        Timestamp(us)
    }

    pub fn as_micros(self) -> i64 {
        self.0
    }

    /// Parses an RFC 3339 string (any offset) to microseconds UTC.
    /// Sub-microsecond digits are truncated.
    pub fn parse_rfc3339(text: &str) -> Result<Timestamp, TimestampError> {
        let parsed = OffsetDateTime::parse(text, &Rfc3339).map_err(|_| TimestampError::Syntax)?;
        let us = parsed.unix_timestamp_nanos().div_euclid(1_000);
        let us = i64::try_from(us).map_err(|_| TimestampError::Range)?;
        Ok(Timestamp(us))
    }

    /// Formats as RFC 3339 in UTC with a `Z` suffix and microsecond precision.
    pub fn to_rfc3339(self) -> String {
        let nanos = i128::from(self.0) * 1_000;
        match OffsetDateTime::from_unix_timestamp_nanos(nanos) {
            Ok(t) => {
                let (y, mo, d) = (t.year(), u8::from(t.month()), t.day());
                let (h, mi, s, us) = (t.hour(), t.minute(), t.second(), t.microsecond());
                format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{us:06}Z")
            }
            // Out of the calendar's range: validation keeps such values out of the
            // store, so this only shows for hand-built values.
            Err(_) => format!("@{}us", self.0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TimestampError {
    #[error("not an RFC 3339 timestamp")]
    Syntax,
    #[error("timestamp out of range")]
    Range,
}

/// Event severity, ordered `debug < info < warning < error < critical`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Severity {
    Debug = 0,
    #[default]
    Info = 1,
    Warning = 2,
    Error = 3,
    Critical = 4,
}

impl Severity {
    pub const ALL: [Severity; 5] = [
        Severity::Debug,
        Severity::Info,
        Severity::Warning,
        Severity::Error,
        Severity::Critical,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Debug => "debug",
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
            Severity::Critical => "critical",
        }
    }

    /// Case-insensitive; `warn` is accepted for `warning`.
    pub fn parse(text: &str) -> Option<Severity> {
        let lower = text.to_ascii_lowercase();
        Some(match lower.as_str() {
            "debug" => Severity::Debug,
            "info" => Severity::Info,
            "warning" | "warn" => Severity::Warning,
            "error" => Severity::Error,
            "critical" => Severity::Critical,
            _ => return None,
        })
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }

    pub fn from_u8(value: u8) -> Option<Severity> {
        Severity::ALL.get(usize::from(value)).copied()
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The format of a native payload kept next to the event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NativeFormat {
    /// The exact protobuf bytes of a `chaukas.spec.common.v1.Event`.
    ChaukasEventV1 = 1,
}

impl NativeFormat {
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    pub fn from_u32(value: u32) -> Option<NativeFormat> {
        match value {
            1 => Some(NativeFormat::ChaukasEventV1),
            _ => None,
        }
    }
}

/// Bytes of the event in the form a client sent it, returned unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NativePayload {
    pub format: NativeFormat,
    pub bytes: Vec<u8>,
}

/// The text of a JSON object, compact, as it will be stored and returned.
///
/// Constructed only through [`JsonObject::parse`] (or the empty object), so
/// the text is always a valid JSON object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonObject(String);

impl JsonObject {
    pub fn empty() -> JsonObject {
        JsonObject("{}".to_owned())
    }

    /// Checks that `text` is exactly one JSON object and keeps it verbatim
    /// (surrounding white space trimmed), so clients get back what they sent.
    pub fn parse(text: &str) -> Result<JsonObject, serde_json::Error> {
        check_object(text)?;
        Ok(JsonObject(text.trim().to_owned()))
    }

    /// [`JsonObject::parse`] of text the caller owns: kept without a copy
    /// unless white space surrounds it.
    pub fn parse_owned(text: String) -> Result<JsonObject, serde_json::Error> {
        if text.trim().len() != text.len() {
            return JsonObject::parse(&text);
        }
        check_object(&text)?;
        Ok(JsonObject(text))
    }

    pub fn from_map(map: &serde_json::Map<String, serde_json::Value>) -> JsonObject {
        // Serialising a map of JSON values cannot fail: keys are strings and
        // every value is representable.
        JsonObject(serde_json::to_string(map).unwrap_or_else(|_| "{}".to_owned()))
    }

    /// Wraps text that the storage layer wrote itself after validation.
    pub(crate) fn from_stored(text: String) -> JsonObject {
        JsonObject(text)
    }

    /// Wraps text already checked to be one JSON object, without white
    /// space around it (a `{`-led value that a JSON parser accepted).
    pub(crate) fn from_checked(text: String) -> JsonObject {
        debug_assert!(text.starts_with('{') && text.ends_with('}'));
        JsonObject(text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn as_string(&self) -> &String {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl Default for JsonObject {
    fn default() -> Self {
        JsonObject::empty()
    }
}

/// Checks that `text` is exactly one JSON object.
fn check_object(text: &str) -> Result<(), serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    serde::Deserializer::deserialize_map(&mut de, ObjectCheck)?;
    de.end()
}

/// A serde visitor that accepts one JSON object and skips its contents.
struct ObjectCheck;

impl<'de> serde::de::Visitor<'de> for ObjectCheck {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        Ok(())
    }
}

/// One stored event. Field rules are in [`crate::limits`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub id: String,
    pub timestamp: Timestamp,
    pub source: String,
    pub event_type: String,
    pub severity: Severity,
    pub correlation_id: Option<String>,
    pub tags: Vec<String>,
    pub data: JsonObject,
    pub native: Option<NativePayload>,
}

impl Event {
    /// A new event with a fresh UUIDv7 id, the current time, `info` severity
    /// and empty data.
    pub fn new(source: impl Into<String>, event_type: impl Into<String>) -> Event {
        Event {
            id: new_event_id(),
            timestamp: Timestamp::now(),
            source: source.into(),
            event_type: event_type.into(),
            severity: Severity::Info,
            correlation_id: None,
            tags: Vec::new(),
            data: JsonObject::empty(),
            native: None,
        }
    }
}

/// A fresh UUIDv7 in its hyphenated text form.
pub fn new_event_id() -> String {
    uuid::Uuid::now_v7().hyphenated().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severity_order_and_parse() {
        assert!(Severity::Debug < Severity::Info);
        assert!(Severity::Error < Severity::Critical);
        assert_eq!(Severity::parse("WARN"), Some(Severity::Warning));
        assert_eq!(Severity::parse("Critical"), Some(Severity::Critical));
        assert_eq!(Severity::parse("fatal"), None);
        for s in Severity::ALL {
            assert_eq!(Severity::from_u8(s.as_u8()), Some(s));
            assert_eq!(Severity::parse(s.as_str()), Some(s));
        }
        assert_eq!(Severity::from_u8(5), None);
    }

    #[test]
    fn timestamps_round_trip_in_utc() {
        let t = Timestamp::parse_rfc3339("2024-03-01T12:00:00.123456+02:00").unwrap();
        assert_eq!(t.to_rfc3339(), "2024-03-01T10:00:00.123456Z");
        assert_eq!(Timestamp::parse_rfc3339(&t.to_rfc3339()).unwrap(), t);
        let before_epoch = Timestamp::parse_rfc3339("1969-12-31T23:59:59.5Z").unwrap();
        assert_eq!(before_epoch.as_micros(), -500_000);
        assert_eq!(
            Timestamp::parse_rfc3339("yesterday"),
            Err(TimestampError::Syntax)
        );
    }

    #[test]
    fn json_object_only_accepts_objects() {
        assert_eq!(
            JsonObject::parse(" {\"b\":1, \"a\":[2]} ")
                .unwrap()
                .as_str(),
            r#"{"b":1, "a":[2]}"#
        );
        assert!(JsonObject::parse("{} {}").is_err());
        assert!(JsonObject::parse("[1]").is_err());
        assert!(JsonObject::parse("3").is_err());
        assert!(JsonObject::parse("{").is_err());
    }

    #[test]
    fn owned_json_is_checked_and_trimmed_like_borrowed() {
        for text in [
            " {\"b\":1} ",
            "{\"b\":1}",
            "{} {}",
            "[1]",
            "3",
            "{",
            "",
            "\n{}\t",
        ] {
            let owned = JsonObject::parse_owned(text.to_owned()).map(JsonObject::into_string);
            let borrowed = JsonObject::parse(text).map(JsonObject::into_string);
            assert_eq!(owned.ok(), borrowed.ok(), "{text:?}");
        }
    }
}
