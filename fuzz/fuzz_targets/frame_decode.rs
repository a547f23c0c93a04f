//! Record frames from arbitrary bytes: an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while let Ok((_, used)) = evdb::storage::frame::decode(&data[at..]) {
        at += used;
    }
});
