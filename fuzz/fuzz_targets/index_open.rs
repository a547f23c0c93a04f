//! A segment index file of arbitrary bytes: open it and read every term.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = evdb::index::fuzz_index(data);
});
