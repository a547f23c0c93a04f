//! An active log file of arbitrary bytes: the recovery scan.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = evdb::storage::segment::scan_log(data, 1);
});
