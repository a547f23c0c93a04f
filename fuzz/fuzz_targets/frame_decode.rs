//! Record frames from arbitrary bytes: an error, never a panic. Unsalted
//! (sealed blocks) and salted with the first four bytes (logs); a frame
//! that fails its salt is also asked whose leftover it is.
#![no_main]
use evdb::storage::frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while let Ok((_, used)) = frame::decode(&data[at..]) {
        at += used;
    }
    if let Some((salt, rest)) = data.split_first_chunk::<4>() {
        let salt = u32::from_le_bytes(*salt);
        let mut at = 0;
        while let Ok((_, used)) = frame::decode_salted(&rest[at..], salt) {
            at += used;
        }
        let _ = frame::stale_segment(&rest[at..], u64::from(salt));
    }
});
