//! Framing of batch bodies, apart from the handlers so that it can be
//! tested and fuzzed on its own: the items of a JSON batch, and the lines of
//! an NDJSON body that arrives in chunks.

use serde_json::value::RawValue;

use super::error::ApiError;

/// The items of a JSON batch body: a JSON array of events, or
/// `{"events":[…]}`. Each item is left unparsed (its own event parse names
/// what is wrong with it).
pub fn batch_items(text: &str) -> Result<Vec<&RawValue>, ApiError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        serde_json::from_str(trimmed).map_err(|e| {
            ApiError::bad_request("body", format!("body: not a JSON array of events: {e}"))
        })
    } else if trimmed.starts_with('{') {
        #[derive(serde::Deserialize)]
        struct Wrapped<'a> {
            #[serde(borrow)]
            events: Option<Vec<&'a RawValue>>,
        }
        let wrapped: Wrapped<'_> = serde_json::from_str(trimmed).map_err(|e| {
            ApiError::bad_request("events", format!("body: not {{\"events\":[…]}}: {e}"))
        })?;
        wrapped.events.ok_or_else(|| {
            ApiError::bad_request("events", "events: the object has no \"events\" array")
        })
    } else {
        Err(ApiError::bad_request(
            "body",
            "body: expected a JSON array of events or {\"events\":[…]}",
        ))
    }
}

/// One line of an NDJSON body.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// The line's bytes, without its `\n` (maybe blank, maybe not UTF-8).
    Text(&'a [u8]),
    /// The line was longer than the limit; its bytes were dropped as they
    /// came, so memory stays bounded by the limit.
    TooLong,
}

/// Splits an NDJSON body that arrives in chunks into lines, holding at most
/// one line (of at most `line_max` bytes) between chunks.
#[derive(Debug)]
pub struct NdjsonLines {
    line: Vec<u8>,
    line_max: usize,
    /// True while dropping the rest of an overlong line.
    skipping: bool,
    /// The last line handed out is still in `line`: clear it first.
    handed_out: bool,
}

impl NdjsonLines {
    pub fn new(line_max: usize) -> NdjsonLines {
        NdjsonLines {
            line: Vec::new(),
            line_max,
            skipping: false,
            handed_out: false,
        }
    }

    /// The next complete line, taking its bytes from the front of `rest`;
    /// `None` once `rest` is used up without completing one (feed the next
    /// chunk). `finished` says the body has ended: the bytes after the last
    /// `\n` then make a last line, if there are any.
    pub fn next_line(&mut self, rest: &mut &[u8], finished: bool) -> Option<Line<'_>> {
        if std::mem::take(&mut self.handed_out) {
            self.line.clear();
        }
        let (part, complete) = match memchr::memchr(b'\n', rest) {
            Some(n) => (&rest[..n], true),
            None => (*rest, false),
        };
        *rest = &rest[(part.len() + usize::from(complete)).min(rest.len())..];
        if !self.skipping {
            if self.line.len() + part.len() > self.line_max {
                self.skipping = true;
                self.line.clear();
            } else {
                self.line.extend_from_slice(part);
            }
        }
        let at_end = finished && rest.is_empty() && (self.skipping || !self.line.is_empty());
        if !complete && !at_end {
            return None;
        }
        self.handed_out = true;
        if std::mem::take(&mut self.skipping) {
            Some(Line::TooLong)
        } else {
            Some(Line::Text(&self.line))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, PartialEq, Eq)]
    enum Owned {
        Text(Vec<u8>),
        TooLong,
    }

    /// Every line of `body` fed in chunks of the given sizes.
    fn split(body: &[u8], chunks: &[usize], line_max: usize) -> Vec<Owned> {
        let mut lines = NdjsonLines::new(line_max);
        let mut out = Vec::new();
        let mut at = 0;
        let mut sizes = chunks.iter().copied().cycle();
        loop {
            let n = sizes.next().unwrap_or(1).max(1).min(body.len() - at);
            let mut rest = &body[at..at + n];
            at += n;
            let finished = at == body.len();
            while let Some(line) = lines.next_line(&mut rest, finished) {
                out.push(match line {
                    Line::Text(t) => Owned::Text(t.to_vec()),
                    Line::TooLong => Owned::TooLong,
                });
            }
            assert!(rest.is_empty());
            if finished {
                return out;
            }
        }
    }

    /// The same, whole and at once.
    fn model(body: &[u8], line_max: usize) -> Vec<Owned> {
        let mut parts: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
        if parts.last().is_some_and(|p| p.is_empty()) {
            parts.pop();
        }
        parts
            .into_iter()
            .map(|p| {
                if p.len() > line_max {
                    Owned::TooLong
                } else {
                    Owned::Text(p.to_vec())
                }
            })
            .collect()
    }

    #[test]
    fn lines_across_chunks() {
        let body = b"{\"a\":1}\n\n{\"b\":2}\nlast";
        assert_eq!(split(body, &[3], 100), model(body, 100));
        assert_eq!(
            split(body, &[1000], 100),
            vec![
                Owned::Text(b"{\"a\":1}".to_vec()),
                Owned::Text(Vec::new()),
                Owned::Text(b"{\"b\":2}".to_vec()),
                Owned::Text(b"last".to_vec()),
            ]
        );
        assert_eq!(split(b"x\n", &[1], 100), vec![Owned::Text(b"x".to_vec())]);
        assert_eq!(
            split(b"0123456789\nab", &[4], 5),
            vec![Owned::TooLong, Owned::Text(b"ab".to_vec())]
        );
        assert_eq!(split(b"", &[4], 5), vec![]);
    }

    #[test]
    fn batch_items_accepts_both_shapes_and_names_the_problem() {
        assert_eq!(batch_items(" [{\"a\":1},2]").unwrap().len(), 2);
        assert_eq!(batch_items("{\"events\":[{}]}").unwrap().len(), 1);
        let err = batch_items("{\"x\":1}").unwrap_err();
        assert_eq!(err.field.as_deref(), Some("events"));
        assert!(
            err.message.contains("no \"events\" array"),
            "{}",
            err.message
        );
        assert!(batch_items("\"s\"").is_err());
        assert!(batch_items("[1,").is_err());
    }

    proptest! {
        #[test]
        fn splitting_in_chunks_equals_splitting_whole(
            body in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'x'), any::<u8>()], 0..300),
            chunks in proptest::collection::vec(1usize..40, 1..5),
            line_max in 0usize..30,
        ) {
            prop_assume!(!body.is_empty());
            prop_assert_eq!(split(&body, &chunks, line_max), model(&body, line_max));
        }
    }
}
