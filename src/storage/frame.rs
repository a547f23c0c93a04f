//! Record frames: the unit of the log, in active and sealed segments alike.
//!
//! ```text
//! +-----------+-----------+------+-------------------+
//! | len: u32  | crc: u32  | kind | payload (len B)   |
//! +-----------+-----------+------+-------------------+
//! ```
//! `crc` is crc32c over `len`, `kind` and `payload`, so a torn length is
//! caught as surely as a torn payload. In a log whose header says so, the
//! stored `crc` is XORed with the log's *salt* (derived from its segment
//! id), so that frames a reused log file still holds from an earlier
//! segment never pass as this segment's. Sealed blocks hold unsalted
//! frames. See `docs/format.md`.

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

/// The salt of the log of `segment`: distinct for any two segment ids below
/// 2^32 (the low half of the id, XORed with a constant so that no log of
/// a real segment id has the salt 0 of sealed blocks).
pub fn salt_of(segment: u64) -> u32 {
    (segment as u32) ^ ((segment >> 32) as u32) ^ SALT_MASK
}

const SALT_MASK: u32 = 0x5eed_f00d;

/// XORs `xor` into the stored checksum of the frame at the start of
/// `frame_bytes` (at least a header long): salts an unsalted frame with
/// `xor = salt`, unsalts a salted one likewise, resalts with the XOR of
/// two salts.
pub fn xor_checksum(frame_bytes: &mut [u8], xor: u32) {
    let field = &mut frame_bytes[CRC_OFFSET..CRC_OFFSET + 4];
    let crc = u32::from_le_bytes([field[0], field[1], field[2], field[3]]) ^ xor;
    field.copy_from_slice(&crc.to_le_bytes());
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

/// The segment whose salt the frame at the start of `buf` carries, if its
/// length and kind are sound and its checksum holds under the salt of a
/// segment below `before`: a frame an earlier segment left in a reused log
/// file. `None` for anything else (a torn frame matches by chance once in
/// 2^32 tries per candidate salt, and the candidates are few).
pub fn stale_segment(buf: &[u8], before: u64) -> Option<u64> {
    let total = sized(buf).ok()?;
    FrameKind::from_u8(buf[KIND_OFFSET])?;
    let segment = u64::from(found_salt(buf, total) ^ SALT_MASK);
    (segment >= 1 && segment < before && before < 1 << 32).then_some(segment)
}

/// Decodes the (unsalted) frame at the start of `buf`; returns it and its
/// total size.
pub fn decode(buf: &[u8]) -> Result<(Frame<'_>, usize), FrameError> {
    decode_salted(buf, 0)
}

/// Decodes the frame at the start of `buf`, whose stored checksum is
/// salted with `salt` (0: unsalted).
pub fn decode_salted(buf: &[u8], salt: u32) -> Result<(Frame<'_>, usize), FrameError> {
    let total = sized(buf)?;
    if found_salt(buf, total) != salt {
        return Err(FrameError::Checksum);
    }
    let kind_byte = buf[KIND_OFFSET];
    let kind = FrameKind::from_u8(kind_byte).ok_or(FrameError::UnknownKind(kind_byte))?;
    let payload = &buf[FRAME_HEADER_SIZE..total];
    Ok((Frame { kind, payload }, total))
}

/// The salt under which the stored checksum of the frame at the start of
/// `buf`, `total` bytes long (checked by [`sized`]), holds: the computed
/// checksum XOR the stored one (0 for an unsalted frame).
fn found_salt(buf: &[u8], total: usize) -> u32 {
    let len_bytes: [u8; 4] = [buf[0], buf[1], buf[2], buf[3]];
    let stored = u32::from_le_bytes([
        buf[CRC_OFFSET],
        buf[CRC_OFFSET + 1],
        buf[CRC_OFFSET + 2],
        buf[CRC_OFFSET + 3],
    ]);
    checksum(len_bytes, buf[KIND_OFFSET], &buf[FRAME_HEADER_SIZE..total]) ^ stored
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
    fn a_salted_frame_reads_under_its_own_salt_only() {
        let mut buf = Vec::new();
        encode(FrameKind::EventV1, b"payload", &mut buf);
        let plain = buf.clone();
        xor_checksum(&mut buf, salt_of(7));
        assert_eq!(decode(&buf), Err(FrameError::Checksum));
        assert_eq!(decode_salted(&buf, salt_of(8)), Err(FrameError::Checksum));
        let (frame, used) = decode_salted(&buf, salt_of(7)).unwrap();
        assert_eq!((frame.payload, used), (&b"payload"[..], plain.len()));
        // Read as segment 9's log, the frame is segment 7's leftover.
        assert_eq!(stale_segment(&buf, 9), Some(7));
        assert_eq!(stale_segment(&buf, 7), None, "only earlier segments");
        assert_eq!(stale_segment(&plain, 9), None, "salt 0 is no segment's");
        let mut torn = buf.clone();
        torn[FRAME_HEADER_SIZE] ^= 1;
        assert_eq!(stale_segment(&torn, 9), None);
        xor_checksum(&mut buf, salt_of(7));
        assert_eq!(buf, plain, "unsalting restores the frame");
        // Distinct ids below 2^32 never share a salt; none of these is 0.
        let salts: std::collections::HashSet<u32> = (1..100_000u64).map(salt_of).collect();
        assert_eq!(salts.len(), 99_999);
        assert!(!salts.contains(&0));
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
            let _ = decode_salted(&bytes, salt_of(3));
            let _ = stale_segment(&bytes, 9);
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
