//! An active log file of arbitrary bytes: the recovery scan, with the
//! segment id its header names, and each scanned frame's record.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = evdb::storage::segment::fuzz_log(data);
});
