//! Every limit of the public contract (§2) and of the engine, in one place,
//! and the validation of an event against them.
//!
//! Names carry their qualifier last (`EVENT_SIZE_MAX`). Relations between
//! limits are checked at compile time below.

use crate::event::{Event, Timestamp};

/// `event_id`: 1..=128 bytes.
pub const EVENT_ID_LEN_MAX: usize = 128;
/// `source_system`, `event_type`: 1..=128 bytes.
pub const NAME_LEN_MAX: usize = 128;
/// `correlation_id`: 1..=256 bytes.
pub const CORRELATION_ID_LEN_MAX: usize = 256;
/// One tag: 1..=128 bytes.
pub const TAG_LEN_MAX: usize = 128;
/// Tags on one event.
pub const TAGS_PER_EVENT_MAX: usize = 64;
/// One event, encoded (record payload), default.
pub const EVENT_SIZE_MAX: usize = 1024 * 1024;
/// Events in one batch, default.
pub const BATCH_EVENTS_MAX: usize = 10_000;
/// Bytes in one batch request, default.
pub const BATCH_SIZE_MAX: usize = 16 * 1024 * 1024;
/// A record frame's payload may not exceed this: an event at its limit plus
/// the protobuf framing of its fields.
pub const FRAME_PAYLOAD_MAX: usize = EVENT_SIZE_MAX + 64 * 1024;
/// The largest `event_size_max` a deployment may configure: the encoded
/// event is the frame payload.
pub const EVENT_SIZE_MAX_CONFIGURABLE: usize = FRAME_PAYLOAD_MAX;
/// Timestamps are accepted between years 0001 and 9999 (RFC 3339's range).
pub const TIMESTAMP_MIN: Timestamp = Timestamp(-62_135_596_800_000_000);
pub const TIMESTAMP_MAX: Timestamp = Timestamp(253_402_300_799_999_999);
/// Depth of the writer's request queue (requests, not events).
pub const WRITER_QUEUE_DEPTH_MAX: usize = 1024;
/// Bytes the writer gathers into one group commit before it writes.
pub const GROUP_COMMIT_SIZE_MAX: usize = 32 * 1024 * 1024;
/// Segments rolled but not yet sealed before appends wait for the sealer.
pub const SEAL_BACKLOG_MAX: usize = 2;
/// Smallest configurable segment size.
pub const SEGMENT_SIZE_MIN: u64 = 64 * 1024;
/// Largest configurable segment size: rows in a segment are numbered by u32
/// and offsets in a sealed block index are u64, so this is a policy bound.
pub const SEGMENT_SIZE_MAX: u64 = 4 * 1024 * 1024 * 1024;
/// Uncompressed bytes in one sealed block (the target; a block closes at the
/// first record that reaches it).
pub const BLOCK_SIZE_DEFAULT: usize = 8 * 1024;
/// Decompressed blocks kept in the shared block cache (8 MiB at the
/// default block size).
pub const BLOCK_CACHE_BLOCKS: usize = 1024;

const _: () = assert!(FRAME_PAYLOAD_MAX > EVENT_SIZE_MAX);
const _: () = assert!(BATCH_SIZE_MAX >= EVENT_SIZE_MAX);
const _: () = assert!(GROUP_COMMIT_SIZE_MAX >= BATCH_SIZE_MAX);
const _: () = assert!(SEGMENT_SIZE_MAX <= u32::MAX as u64 + 1);
const _: () = assert!(CORRELATION_ID_LEN_MAX >= NAME_LEN_MAX);

/// Limits that a deployment may change; the defaults are the contract's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub event_size_max: usize,
    pub batch_events_max: usize,
    pub batch_size_max: usize,
    /// Most events one query, stats or aggregation may have to decode (a
    /// `text` filter, or a `data` pointer without a numeric column),
    /// counted before it starts: past it the request is refused instead of
    /// occupying the cores for seconds.
    pub query_decode_max: u64,
}

/// Default of [`Limits::query_decode_max`]: about two seconds of decoding
/// on two cores.
pub const QUERY_DECODE_MAX: u64 = 5_000_000;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            event_size_max: EVENT_SIZE_MAX,
            batch_events_max: BATCH_EVENTS_MAX,
            batch_size_max: BATCH_SIZE_MAX,
            query_decode_max: QUERY_DECODE_MAX,
        }
    }
}

/// Why an event was refused: the field and a sentence for the client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    pub field: &'static str,
    pub reason: String,
}

impl Invalid {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Invalid {
        Invalid {
            field,
            reason: reason.into(),
        }
    }
}

fn check_len(field: &'static str, value: &str, max: usize) -> Result<(), Invalid> {
    if value.is_empty() {
        return Err(Invalid::new(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(Invalid::new(
            field,
            format!("is {} bytes, at most {max} allowed", value.len()),
        ));
    }
    Ok(())
}

/// Checks every field rule of contract §2 except the encoded size, which the
/// storage layer checks once it has encoded the record
/// ([`check_encoded_size`]).
pub fn validate(event: &Event) -> Result<(), Invalid> {
    check_len("event_id", &event.id, EVENT_ID_LEN_MAX)?;
    check_len("source_system", &event.source, NAME_LEN_MAX)?;
    check_len("event_type", &event.event_type, NAME_LEN_MAX)?;
    if let Some(correlation_id) = &event.correlation_id {
        check_len("correlation_id", correlation_id, CORRELATION_ID_LEN_MAX)?;
    }
    if event.tags.len() > TAGS_PER_EVENT_MAX {
        return Err(Invalid::new(
            "tags",
            format!(
                "has {} tags, at most {TAGS_PER_EVENT_MAX} allowed",
                event.tags.len()
            ),
        ));
    }
    for tag in &event.tags {
        check_len("tags", tag, TAG_LEN_MAX)?;
    }
    if event.timestamp < TIMESTAMP_MIN || event.timestamp > TIMESTAMP_MAX {
        return Err(Invalid::new(
            "timestamp",
            "must lie between years 0001 and 9999",
        ));
    }
    Ok(())
}

pub fn check_encoded_size(encoded_bytes: usize, limits: &Limits) -> Result<(), Invalid> {
    if encoded_bytes > limits.event_size_max {
        return Err(too_large(encoded_bytes, limits.event_size_max));
    }
    Ok(())
}

/// The refusal of an event whose encoded size passes the limit.
pub fn too_large(encoded_bytes: usize, max: usize) -> Invalid {
    Invalid::new(
        "event",
        format!("is {encoded_bytes} bytes encoded, at most {max} allowed"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event::new("mahavishnu", "workflow_complete")
    }

    #[test]
    fn accepts_a_plain_event() {
        assert_eq!(validate(&event()), Ok(()));
    }

    #[test]
    fn names_the_field_it_refuses() {
        let mut e = event();
        e.source = String::new();
        assert_eq!(validate(&e).unwrap_err().field, "source_system");
        let mut e = event();
        e.event_type = "x".repeat(NAME_LEN_MAX + 1);
        assert_eq!(validate(&e).unwrap_err().field, "event_type");
        let mut e = event();
        e.id = "x".repeat(EVENT_ID_LEN_MAX + 1);
        assert_eq!(validate(&e).unwrap_err().field, "event_id");
        let mut e = event();
        e.correlation_id = Some(String::new());
        assert_eq!(validate(&e).unwrap_err().field, "correlation_id");
        let mut e = event();
        e.tags = vec!["t".into(); TAGS_PER_EVENT_MAX + 1];
        assert_eq!(validate(&e).unwrap_err().field, "tags");
        let mut e = event();
        e.tags = vec![String::new()];
        assert_eq!(validate(&e).unwrap_err().field, "tags");
        let mut e = event();
        e.timestamp = Timestamp(i64::MAX);
        assert_eq!(validate(&e).unwrap_err().field, "timestamp");
    }

    #[test]
    fn limits_at_the_edge_are_accepted() {
        let mut e = event();
        e.id = "i".repeat(EVENT_ID_LEN_MAX);
        e.correlation_id = Some("c".repeat(CORRELATION_ID_LEN_MAX));
        e.tags = vec!["t".repeat(TAG_LEN_MAX); TAGS_PER_EVENT_MAX];
        e.timestamp = TIMESTAMP_MAX;
        assert_eq!(validate(&e), Ok(()));
        assert!(check_encoded_size(EVENT_SIZE_MAX, &Limits::default()).is_ok());
        assert!(check_encoded_size(EVENT_SIZE_MAX + 1, &Limits::default()).is_err());
    }
}
