//! The JSON form of an event from arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = evdb::api::json::parse_event(text, evdb::Timestamp(0));
    }
});
