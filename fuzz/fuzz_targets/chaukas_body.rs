//! Chaukas protobuf request bodies (`POST /events`, `/events/batch` with
//! `application/x-protobuf`) from arbitrary bytes: walking, decoding and
//! mapping must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    use evdb::api::chaukas;
    if let Ok(event) = chaukas::event_of_request(data) {
        let _ = chaukas::to_event(event, evdb::Timestamp(0));
    }
    if let Ok(events) = chaukas::events_of_batch_request(data) {
        for e in events {
            let _ = chaukas::to_event(e, evdb::Timestamp(0));
        }
    }
    let _ = chaukas::to_event(data, evdb::Timestamp(0));
});
