//! A deterministic generator of seed-shaped events for benchmarks and tests.
//!
//! Shaped like the seeds' traffic: a handful of sources, dozens of types, a
//! realistic severity mix, 0–5 tags, correlation ids shared by a few to a
//! few hundred events, and a `data` object of about 200–400 bytes. The same
//! seed gives the same events on every machine and every version (the
//! random source is a fixed SplitMix64, not a library's default RNG).

use crate::event::{Event, JsonObject, Severity, Timestamp};

pub const SOURCES: [&str; 8] = [
    "mahavishnu",
    "crackerjack",
    "session-buddy",
    "akosha",
    "oneiric",
    "chaukas",
    "collector",
    "edge-gateway",
];

const TYPE_STEMS: [&str; 10] = [
    "workflow",
    "task",
    "session",
    "tool_call",
    "model",
    "agent",
    "policy",
    "ingest",
    "deploy",
    "health",
];
const TYPE_ENDS: [&str; 4] = ["start", "complete", "failed", "retry"];

pub const TAGS: [&str; 24] = [
    "production",
    "staging",
    "workflow",
    "edge",
    "gpu",
    "batch",
    "realtime",
    "critical-path",
    "customer",
    "internal",
    "eu",
    "us",
    "apac",
    "canary",
    "beta",
    "billing",
    "security",
    "audit",
    "ml",
    "etl",
    "api",
    "cli",
    "cron",
    "manual",
];

const WORDS: [&str; 16] = [
    "completed",
    "request",
    "within",
    "budget",
    "retrying",
    "upstream",
    "timeout",
    "cache",
    "miss",
    "served",
    "from",
    "replica",
    "queue",
    "drained",
    "batch",
    "flushed",
];

/// SplitMix64: tiny, fast, and fixed forever.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Number of distinct event types.
pub fn type_count() -> usize {
    TYPE_STEMS.len() * TYPE_ENDS.len()
}

pub fn event_type(i: usize) -> String {
    format!(
        "{}_{}",
        TYPE_STEMS[i / TYPE_ENDS.len() % TYPE_STEMS.len()],
        TYPE_ENDS[i % TYPE_ENDS.len()]
    )
}

struct OpenCorrelation {
    id: u64,
    left: u32,
}

/// An endless, deterministic stream of events.
pub struct Generator {
    rng: Rng,
    next: u64,
    start_us: i64,
    step_us: i64,
    open: Vec<OpenCorrelation>,
    next_correlation: u64,
}

impl Generator {
    /// Events start at `start` and advance ~`step_us` each, with jitter of
    /// up to two seconds either way (so they arrive out of order).
    pub fn new(seed: u64, start: Timestamp, step_us: i64) -> Generator {
        Generator {
            rng: Rng::new(seed),
            next: 0,
            start_us: start.as_micros(),
            step_us: step_us.max(1),
            open: Vec::new(),
            next_correlation: 0,
        }
    }

    fn correlation(&mut self) -> Option<String> {
        if self.rng.below(10) == 0 {
            return None;
        }
        const OPEN: usize = 64;
        while self.open.len() < OPEN {
            // Sizes from 2 to ~300, most small: mean about 10.
            let r = self.rng.below(100);
            let left = match r {
                0..=69 => 2 + self.rng.below(7),
                70..=94 => 9 + self.rng.below(22),
                _ => 30 + self.rng.below(270),
            } as u32;
            self.open.push(OpenCorrelation {
                id: self.next_correlation,
                left,
            });
            self.next_correlation += 1;
        }
        let i = self.rng.below(OPEN as u64) as usize;
        let id = self.open[i].id;
        self.open[i].left -= 1;
        if self.open[i].left == 0 {
            self.open.swap_remove(i);
        }
        Some(format!("corr-{id:08x}"))
    }

    pub fn next_event(&mut self) -> Event {
        let n = self.next;
        self.next += 1;
        let r = &mut self.rng;
        let id = format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            r.next_u64() as u32,
            r.next_u64() as u16,
            r.next_u64() & 0xfff,
            (r.next_u64() & 0x3fff) | 0x8000,
            r.next_u64() & 0xffff_ffff_ffff
        );
        let jitter = r.below(4_000_000) as i64 - 2_000_000;
        let timestamp = Timestamp(self.start_us + n as i64 * self.step_us + jitter);
        // Skewed: the first sources and types are the busiest.
        let source = SOURCES[(r.below(8) * r.below(8) / 7) as usize].to_owned();
        let t =
            (r.below(type_count() as u64) * r.below(type_count() as u64)) as usize / type_count();
        let severity = match r.below(1000) {
            0..=149 => Severity::Debug,
            150..=799 => Severity::Info,
            800..=919 => Severity::Warning,
            920..=989 => Severity::Error,
            _ => Severity::Critical,
        };
        let tag_count = r.below(6) as usize;
        let mut tags: Vec<String> = Vec::with_capacity(tag_count);
        for _ in 0..tag_count {
            let tag = TAGS[r.below(TAGS.len() as u64) as usize];
            if !tags.iter().any(|t| t == tag) {
                tags.push(tag.to_owned());
            }
        }
        let words = 4 + r.below(12) as usize;
        let mut message = String::new();
        for w in 0..words {
            if w > 0 {
                message.push(' ');
            }
            message.push_str(WORDS[r.below(WORDS.len() as u64) as usize]);
        }
        let latency = r.below(2000) + if severity >= Severity::Error { 1500 } else { 0 };
        let data = format!(
            concat!(
                r#"{{"workflow_id":"wf-{:06x}","status":"{}","latency_ms":{},"#,
                r#""duration":{}.{},"host":"edge-{:02}","region":"{}","attempt":{},"#,
                r#""user_id":"u-{:05}","message":"{}","items":{}}}"#
            ),
            r.below(1 << 20),
            if severity >= Severity::Error {
                "failed"
            } else {
                "success"
            },
            latency,
            r.below(60),
            r.below(10),
            r.below(32),
            ["eu-west-1", "us-east-1", "ap-south-1"][r.below(3) as usize],
            1 + r.below(3),
            r.below(50_000),
            message,
            r.below(500),
        );
        let correlation_id = self.correlation();
        Event {
            id,
            timestamp,
            source,
            event_type: event_type(t),
            severity,
            correlation_id,
            tags,
            data: JsonObject::parse(&data).unwrap_or_default(),
            native: None,
        }
    }

    pub fn batch(&mut self, n: usize) -> Vec<Event> {
        (0..n).map(|_| self.next_event()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_seed_shaped() {
        let a = Generator::new(7, Timestamp(0), 100).batch(2000);
        let b = Generator::new(7, Timestamp(0), 100).batch(2000);
        assert_eq!(a, b);
        let data_len: usize = a.iter().map(|e| e.data.as_str().len()).sum::<usize>() / a.len();
        assert!(
            (200..=400).contains(&data_len),
            "mean data {data_len} bytes"
        );
        for e in &a {
            crate::limits::validate(e).unwrap();
            assert!(e.tags.len() <= 5);
        }
        let with_corr = a.iter().filter(|e| e.correlation_id.is_some()).count();
        assert!(with_corr > 1500);
    }
}
