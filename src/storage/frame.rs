//! Record frames: the unit of the log, in active and sealed segments alike.
//!
//! ```text
//! +-----------+-----------+------+-------------------+
//! | len: u32  | crc: u32  | kind | payload (len B)   |
//! +-----------+-----------+------+-------------------+
//! ```
//! `crc` is crc32c over `len`, `kind` and `payload`, so a torn length is
//! caught as surely as a torn payload. See `docs/format.md`.

use crate::limits::FRAME_PAYLOAD_MAX;

const LEN_OFFSET: usize = 0;
const CRC_OFFSET: usize = LEN_OFFSET + 4;
const KIND_OFFSET: usize = CRC_OFFSET + 4;
pub const FRAME_HEADER_SIZE: usize = KIND_OFFSET + 1;

/// What a frame holds; the kind byte doubles as the payload's version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// A `RecordV1` protobuf (see `record.rs`).
    EventV1 = 1,
}

impl FrameKind {
    fn from_u8(value: u8) -> Option<FrameKind> {
        match value {
            1 => Some(FrameKind::EventV1),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: FrameKind,
    pub payload: &'a [u8],
}

/// Why bytes are not a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than the header or the length announce: at a log's end,
    /// a torn tail.
    #[error("frame truncated: {needed} bytes needed, {available} available")]
    Truncated { needed: usize, available: usize },
    #[error("frame length {len} exceeds the maximum {max}")]
    Oversized { len: usize, max: usize },
    #[error("frame checksum mismatch")]
    Checksum,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
}

fn checksum(len_bytes: [u8; 4], kind: u8, payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&len_bytes);
    let crc = crc32c::crc32c_append(crc, &[kind]);
    crc32c::crc32c_append(crc, payload)
}

/// Appends one frame to `out`.
///
/// The caller guarantees `payload.len() <= FRAME_PAYLOAD_MAX` (the event size
/// limit is checked before encoding); a larger payload is a programmer error.
pub fn encode(kind: FrameKind, payload: &[u8], out: &mut Vec<u8>) {
    assert!(
        payload.len() <= FRAME_PAYLOAD_MAX,
        "frame payload over limit"
    );
    let len_bytes = (payload.len() as u32).to_le_bytes();
    let crc = checksum(len_bytes, kind as u8, payload);
    out.reserve(FRAME_HEADER_SIZE + payload.len());
    out.extend_from_slice(&len_bytes);
    out.extend_from_slice(&crc.to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(payload);
}

/// Turns `buf` — `FRAME_HEADER_SIZE` placeholder bytes followed by the
/// payload — into one frame, without copying the payload.
pub fn seal_in_place(kind: FrameKind, buf: &mut [u8]) {
    let payload_len = buf.len() - FRAME_HEADER_SIZE;
    assert!(payload_len <= FRAME_PAYLOAD_MAX, "frame payload over limit");
    let len_bytes = (payload_len as u32).to_le_bytes();
    let crc = checksum(len_bytes, kind as u8, &buf[FRAME_HEADER_SIZE..]);
    buf[LEN_OFFSET..LEN_OFFSET + 4].copy_from_slice(&len_bytes);
    buf[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    buf[KIND_OFFSET] = kind as u8;
}

/// The total size the header at the start of `buf` announces, checked to
/// be bounded and to lie within `buf`.
fn sized(buf: &[u8]) -> Result<usize, FrameError> {
    if buf.len() < FRAME_HEADER_SIZE {
        return Err(FrameError::Truncated {
            needed: FRAME_HEADER_SIZE,
            available: buf.len(),
        });
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > FRAME_PAYLOAD_MAX {
        return Err(FrameError::Oversized {
            len,
            max: FRAME_PAYLOAD_MAX,
        });
    }
    let total = FRAME_HEADER_SIZE + len;
    if buf.len() < total {
        return Err(FrameError::Truncated {
            needed: total,
            available: buf.len(),
        });
    }
    Ok(total)
}

/// The total size of the frame at the start of `buf`, from its header
/// alone: the length is bounded and in `buf`, the kind is known; the
/// checksum is not computed. For walking a block whose bytes were already
/// checked as a whole (each frame is verified again when it is served).
pub fn frame_len(buf: &[u8]) -> Result<usize, FrameError> {
    let total = sized(buf)?;
    let kind_byte = buf[KIND_OFFSET];
    FrameKind::from_u8(kind_byte).ok_or(FrameError::UnknownKind(kind_byte))?;
    Ok(total)
}

/// Decodes the frame at the start of `buf`; returns it and its total size.
pub fn decode(buf: &[u8]) -> Result<(Frame<'_>, usize), FrameError> {
    let total = sized(buf)?;
    let len_bytes: [u8; 4] = [buf[0], buf[1], buf[2], buf[3]];
    let stored_crc = u32::from_le_bytes([
        buf[CRC_OFFSET],
        buf[CRC_OFFSET + 1],
        buf[CRC_OFFSET + 2],
        buf[CRC_OFFSET + 3],
    ]);
    let kind_byte = buf[KIND_OFFSET];
    let payload = &buf[FRAME_HEADER_SIZE..total];
    if checksum(len_bytes, kind_byte, payload) != stored_crc {
        return Err(FrameError::Checksum);
    }
    let kind = FrameKind::from_u8(kind_byte).ok_or(FrameError::UnknownKind(kind_byte))?;
    Ok((Frame { kind, payload }, total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        encode(FrameKind::EventV1, b"hello", &mut buf);
        encode(FrameKind::EventV1, b"", &mut buf);
        let (a, used) = decode(&buf).unwrap();
        assert_eq!(a.payload, b"hello");
        assert_eq!(used, FRAME_HEADER_SIZE + 5);
        let (b, used_b) = decode(&buf[used..]).unwrap();
        let mut in_place = vec![0u8; FRAME_HEADER_SIZE];
        in_place.extend_from_slice(b"hello");
        seal_in_place(FrameKind::EventV1, &mut in_place);
        assert_eq!(in_place, buf[..used]);
        assert_eq!(b.payload, b"");
        assert_eq!(used + used_b, buf.len());
    }

    #[test]
    fn short_corrupt_and_oversized_frames_are_errors() {
        let mut buf = Vec::new();
        encode(FrameKind::EventV1, b"payload", &mut buf);
        for cut in 0..buf.len() {
            assert!(matches!(
                decode(&buf[..cut]),
                Err(FrameError::Truncated { .. })
            ));
        }
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "flip at {i} went unnoticed");
        }
        let mut huge = buf.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&huge), Err(FrameError::Oversized { .. })));
        let mut unknown = Vec::new();
        let len = 0u32.to_le_bytes();
        unknown.extend_from_slice(&len);
        unknown.extend_from_slice(&checksum(len, 9, &[]).to_le_bytes());
        unknown.push(9);
        assert_eq!(decode(&unknown), Err(FrameError::UnknownKind(9)));
    }

    #[test]
    fn frame_len_reads_the_header_only() {
        let mut buf = Vec::new();
        encode(FrameKind::EventV1, b"payload", &mut buf);
        assert_eq!(frame_len(&buf), Ok(buf.len()));
        // A payload flip passes the header walk; decode catches it.
        let mut flipped = buf.clone();
        flipped[FRAME_HEADER_SIZE] ^= 1;
        assert_eq!(frame_len(&flipped), Ok(buf.len()));
        assert_eq!(decode(&flipped), Err(FrameError::Checksum));
        for cut in 0..buf.len() {
            assert!(matches!(
                frame_len(&buf[..cut]),
                Err(FrameError::Truncated { .. })
            ));
        }
        let mut huge = buf.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            frame_len(&huge),
            Err(FrameError::Oversized { .. })
        ));
        let mut unknown = buf.clone();
        unknown[KIND_OFFSET] = 9;
        assert_eq!(frame_len(&unknown), Err(FrameError::UnknownKind(9)));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
            // Whatever decode accepts, the header walk measures alike.
            if let Ok((_, used)) = decode(&bytes) {
                prop_assert_eq!(frame_len(&bytes), Ok(used));
            }
        }

        #[test]
        fn any_payload_round_trips(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = Vec::new();
            encode(FrameKind::EventV1, &payload, &mut buf);
            let (frame, used) = decode(&buf).unwrap();
            prop_assert_eq!(frame.payload, &payload[..]);
            prop_assert_eq!(used, buf.len());
        }
    }
}
