//! `POST /events/batch` JSON and NDJSON bodies from arbitrary bytes: the
//! batch framing (array or `{"events":[…]}`), the NDJSON line splitter fed
//! in chunks of the sizes the first byte picks, and every item's event
//! parse must never panic.
#![no_main]
use evdb::api::http::body::{Line, NdjsonLines, batch_items};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, body)) = data.split_first() else {
        return;
    };
    if let Ok(text) = std::str::from_utf8(body) {
        if let Ok(items) = batch_items(text) {
            for item in items {
                let _ = evdb::api::json::parse_event(item.get(), evdb::Timestamp(0));
            }
        }
    }
    let mut lines = NdjsonLines::new(4096);
    let chunk = usize::from(chunk).max(1);
    let mut chunks = body.chunks(chunk).peekable();
    if body.is_empty() {
        let mut rest: &[u8] = &[];
        assert!(lines.next_line(&mut rest, true).is_none());
    }
    while let Some(mut rest) = chunks.next() {
        let finished = chunks.peek().is_none();
        while let Some(line) = lines.next_line(&mut rest, finished) {
            match line {
                Line::Text(t) => {
                    assert!(t.len() <= 4096 && !t.contains(&b'\n'));
                    if let Ok(t) = std::str::from_utf8(t) {
                        let _ = evdb::api::json::parse_event(t, evdb::Timestamp(0));
                    }
                }
                Line::TooLong => {}
            }
        }
        assert!(rest.is_empty());
    }
});
