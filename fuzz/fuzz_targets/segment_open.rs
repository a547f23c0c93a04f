//! A sealed segment file of arbitrary bytes: open it and read every block.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = evdb::storage::segment::fuzz_sealed(data);
});
