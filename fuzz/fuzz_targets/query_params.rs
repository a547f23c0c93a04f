//! Query strings of `GET /events`, `/events/stats`, `/events/stream` and
//! `/events/aggregate` (metric expressions included) from arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let pairs = evdb::api::http::params::pairs(Some(text));
        let _ = evdb::api::http::params::query(&pairs);
        let _ = evdb::api::http::params::tail(&pairs);
        let _ = evdb::api::http::params::aggregate(&pairs);
    }
});
