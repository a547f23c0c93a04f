//! Record payloads (protobuf) from arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = evdb::storage::record::decode(data);
    let _ = evdb::storage::ids::peek_id_and_timestamp(data);
});
