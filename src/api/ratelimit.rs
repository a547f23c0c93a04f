//! Per-source rate limits (contract §7, seed 002): a token bucket per
//! `source_system`. A request is admitted whole or refused whole: every
//! source it writes must have a token for each of its events.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Buckets kept at most; past it, buckets that are full again (idle
/// sources) are dropped, so the map is bounded by the active sources.
const BUCKETS_MAX: usize = 100_000;

/// A rate: `per_s` events per second, bursts of up to `burst`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_s: f64,
    pub burst: f64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct RateLimitConfig {
    pub default: Option<Rate>,
    pub sources: HashMap<String, Rate>,
}

impl RateLimitConfig {
    fn rate(&self, source: &str) -> Option<Rate> {
        self.sources.get(source).copied().or(self.default)
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    /// When it was last updated: µs on the limiter's timeline.
    at_us: u64,
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Limited {
    #[error(
        "rate limit: source_system {source_system:?} allows {per_s} events/s (burst {burst}); retry in {retry_after_s} s"
    )]
    Retry {
        source_system: String,
        per_s: f64,
        burst: f64,
        retry_after_s: u64,
    },
    #[error(
        "rate limit: {n} events of source_system {source_system:?} in one request exceed its burst of {burst}; send smaller batches"
    )]
    TooBig {
        source_system: String,
        n: u64,
        burst: f64,
    },
}

impl Limited {
    pub fn retry_after_s(&self) -> u64 {
        match self {
            Limited::Retry { retry_after_s, .. } => *retry_after_s,
            Limited::TooBig { .. } => 1,
        }
    }

    pub fn source(&self) -> &str {
        match self {
            Limited::Retry { source_system, .. } | Limited::TooBig { source_system, .. } => {
                source_system
            }
        }
    }
}

pub struct RateLimiter {
    config: RateLimitConfig,
    /// foldhash (hashbrown's default): fast on short keys and seeded per
    /// process, so clients cannot pick colliding sources.
    buckets: Mutex<hashbrown::HashMap<String, Bucket>>,
    /// The timeline's origin, for [`RateLimiter::admit_at`].
    base: Instant,
    /// The same origin on the coarse monotonic clock, for `admit`.
    base_coarse_us: u64,
}

/// The coarse monotonic clock in µs: a few ns to read (the precise one
/// costs more than the rest of an admission), ticking every few ms, which
/// only delays a refill by that much.
fn coarse_us() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    (t.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(t.tv_nsec as u64 / 1_000)
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("config", &self.config)
            .finish()
    }
}

impl RateLimiter {
    pub fn new(config: RateLimitConfig) -> RateLimiter {
        RateLimiter {
            config,
            buckets: Mutex::new(hashbrown::HashMap::new()),
            base: Instant::now(),
            base_coarse_us: coarse_us(),
        }
    }

    /// Admits `counts` (events per source) now, or says why not.
    pub fn admit<'a>(
        &self,
        counts: impl IntoIterator<Item = (&'a str, u64)>,
    ) -> Result<(), Limited> {
        self.admit_us(coarse_us().saturating_sub(self.base_coarse_us), counts)
    }

    /// [`RateLimiter::admit`] at a given instant (tests drive time).
    pub fn admit_at<'a>(
        &self,
        now: Instant,
        counts: impl IntoIterator<Item = (&'a str, u64)>,
    ) -> Result<(), Limited> {
        let us = now.saturating_duration_since(self.base).as_micros();
        self.admit_us(u64::try_from(us).unwrap_or(u64::MAX), counts)
    }

    fn admit_us<'a>(
        &self,
        now: u64,
        counts: impl IntoIterator<Item = (&'a str, u64)>,
    ) -> Result<(), Limited> {
        // Up to 8 sources on the stack (a request rarely has more), the
        // rest spilled to the heap: admitting allocates nothing usually.
        const INLINE: usize = 8;
        let none = Rate {
            per_s: 0.0,
            burst: 0.0,
        };
        let mut inline = [("", 0u64, none); INLINE];
        let mut len = 0;
        let mut spilled: Vec<(&str, u64, Rate)> = Vec::new();
        for (s, n) in counts {
            let Some(r) = self.config.rate(s) else {
                continue;
            };
            if len < INLINE {
                inline[len] = (s, n, r);
                len += 1;
            } else {
                if spilled.is_empty() {
                    spilled.extend_from_slice(&inline);
                }
                spilled.push((s, n, r));
            }
        }
        let wanted: &[(&str, u64, Rate)] = if spilled.is_empty() {
            &inline[..len]
        } else {
            &spilled
        };
        if wanted.is_empty() {
            return Ok(());
        }
        let mut buckets = self.buckets.lock();
        // Refill and check every source first: all or nothing.
        for &(source, n, rate) in wanted {
            let b = buckets.get(source).copied().unwrap_or(Bucket {
                tokens: rate.burst,
                at_us: now,
            });
            let elapsed = now.saturating_sub(b.at_us) as f64 / 1e6;
            let tokens = (b.tokens + elapsed * rate.per_s).min(rate.burst);
            let n = n as f64;
            if n > rate.burst {
                return Err(Limited::TooBig {
                    source_system: source.to_owned(),
                    n: n as u64,
                    burst: rate.burst,
                });
            }
            if tokens < n {
                let wait = (n - tokens) / rate.per_s.max(f64::MIN_POSITIVE);
                return Err(Limited::Retry {
                    source_system: source.to_owned(),
                    per_s: rate.per_s,
                    burst: rate.burst,
                    retry_after_s: Duration::from_secs_f64(wait.min(86_400.0)).as_secs() + 1,
                });
            }
        }
        // Take the tokens: known sources in place (one lookup, no
        // allocation), new ones from a full bucket.
        for &(source, n, rate) in wanted {
            match buckets.get_mut(source) {
                Some(b) => {
                    let elapsed = now.saturating_sub(b.at_us) as f64 / 1e6;
                    let tokens = (b.tokens + elapsed * rate.per_s).min(rate.burst);
                    *b = Bucket {
                        tokens: tokens - n as f64,
                        at_us: now,
                    };
                }
                None => {
                    buckets.insert(
                        source.to_owned(),
                        Bucket {
                            tokens: rate.burst - n as f64,
                            at_us: now,
                        },
                    );
                }
            }
        }
        if buckets.len() > BUCKETS_MAX {
            let config = &self.config;
            buckets.retain(|source, b| {
                config.rate(source).is_some_and(|rate| {
                    let elapsed = now.saturating_sub(b.at_us) as f64 / 1e6;
                    b.tokens + elapsed * rate.per_s < rate.burst
                })
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter() -> RateLimiter {
        let mut sources = HashMap::new();
        sources.insert(
            "big".to_owned(),
            Rate {
                per_s: 5000.0,
                burst: 10_000.0,
            },
        );
        RateLimiter::new(RateLimitConfig {
            default: Some(Rate {
                per_s: 1000.0,
                burst: 2000.0,
            }),
            sources,
        })
    }

    #[test]
    fn bursts_refills_and_all_or_nothing() {
        let l = limiter();
        let t0 = Instant::now();
        assert!(l.admit_at(t0, [("a", 1500)]).is_ok());
        assert!(l.admit_at(t0, [("a", 500)]).is_ok());
        let err = l.admit_at(t0, [("a", 1)]).unwrap_err();
        assert_eq!(err.retry_after_s(), 1);
        // Half a second refills 500.
        let t1 = t0 + Duration::from_millis(500);
        assert!(l.admit_at(t1, [("a", 500)]).is_ok());
        // A request with one limited source admits nothing for the others.
        assert!(l.admit_at(t1, [("b", 10), ("a", 1)]).is_err());
        assert!(
            l.admit_at(t1, [("b", 2000)]).is_ok(),
            "b paid nothing before"
        );
        // Per-source override and the burst bound.
        assert!(l.admit_at(t1, [("big", 9000)]).is_ok());
        assert!(matches!(
            l.admit_at(t1, [("a", 2001)]),
            Err(Limited::TooBig { .. })
        ));
        // Retry-After covers the deficit.
        let err = l.admit_at(t1, [("a", 1500)]).unwrap_err();
        assert_eq!(err.retry_after_s(), 2);
    }

    #[test]
    fn many_sources_in_one_request_are_all_counted() {
        let l = limiter();
        let t0 = Instant::now();
        let names: Vec<String> = (0..12).map(|i| format!("s{i}")).collect();
        let all: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), 2000)).collect();
        assert!(l.admit_at(t0, all.iter().copied()).is_ok());
        // Every bucket, the spilled ones too, is empty now.
        for n in &names {
            assert!(l.admit_at(t0, [(n.as_str(), 1)]).is_err(), "{n}");
        }
    }
}
