//! A numeric column file of arbitrary bytes, and JSON-pointer extraction
//! from arbitrary `data` text.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = evdb::index::numeric::fuzz_numeric(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = evdb::index::numeric::number_at(text, "/latency_ms");
        let _ = evdb::index::numeric::key_at(text, "/a/0/b");
    }
});
