//! Failure injection: decides, call by call, whether the simulated upstream answers or fails.
//!
//! Decisions are lock-free (atomics only) because every request of a benchmark passes
//! here. Randomness comes from `hash(seed, call index)`, not a shared RNG, so a given
//! seed fails the same calls however requests interleave across threads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::reply::mix64;

/// Length of one rate-limit window.
const WINDOW: Duration = Duration::from_secs(60);

/// What to inject. `Default` is a well-behaved upstream (statuses 0 are replaced by the
/// documented defaults in [`Chaos::new`]).
#[derive(Clone, Debug, Default)]
pub struct ChaosConfig {
    /// Added before the response headers.
    pub latency: Duration,
    /// Added before the first stream chunk.
    pub ttft: Duration,
    /// Stream pacing; `None` sends as fast as possible.
    pub tokens_per_sec: Option<f64>,
    /// Fraction (0..1) of calls failing with `error_status`.
    pub error_rate: f64,
    /// Status of `error_rate` failures; 0 means the default 500.
    pub error_status: u16,
    /// Above this many requests in the current one-minute window, answer 429.
    pub rpm: Option<u32>,
    /// The first N calls fail with `fail_status`.
    pub fail_first: u32,
    /// Status of `fail_first` failures; 0 means the default 503.
    pub fail_status: u16,
    /// Retry-after sent with 429s (default: time until the window resets for `rpm`, 1 s
    /// otherwise); when set it is also sent with other injected failures.
    pub retry_after: Option<Duration>,
    /// Streams are cut (connection dropped, no terminal event) after N chunks.
    pub cut_after: Option<usize>,
    pub seed: u64,
}

/// Where the `rpm` window stands, as an upstream announces it with every answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateWindow {
    pub limit: u32,
    pub remaining: u32,
    /// Until the window resets (the limit is whole again).
    pub reset: Duration,
}

/// The fate of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Ok {
        latency: Duration,
        ttft: Duration,
        cut_after: Option<usize>,
    },
    Fail {
        status: u16,
        retry_after: Option<Duration>,
    },
}

/// Config plus the counters that decisions read; shared by every connection.
#[derive(Debug)]
pub struct Chaos {
    cfg: ChaosConfig,
    calls: AtomicU64,
    /// Windows are counted from here, so a window is a minute of this server's life.
    epoch: Instant,
    /// Current window index in the high 32 bits, requests seen in it in the low 32,
    /// packed so one compare-and-swap moves both together.
    window: AtomicU64,
}

impl Chaos {
    pub fn new(mut cfg: ChaosConfig) -> Self {
        if cfg.error_status == 0 {
            cfg.error_status = 500;
        }
        if cfg.fail_status == 0 {
            cfg.fail_status = 503;
        }
        Self {
            cfg,
            calls: AtomicU64::new(0),
            epoch: Instant::now(),
            window: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> &ChaosConfig {
        &self.cfg
    }

    /// Calls decided so far (tests count upstream calls with this).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Decide the fate of the next call. Deterministic for a given seed and call index.
    ///
    /// Precedence: `fail_first`, then `rpm`, then `error_rate`. Every call counts
    /// against `rpm`, failed or not, as a real limiter counts what it sees.
    pub fn decide(&self) -> Decision {
        let index = self.calls.fetch_add(1, Ordering::Relaxed);
        let over_limit = self.cfg.rpm.and_then(|rpm| self.admit(rpm));

        if index < u64::from(self.cfg.fail_first) {
            return self.fail(self.cfg.fail_status);
        }
        if let Some(until_reset) = over_limit {
            return Decision::Fail {
                status: 429,
                retry_after: Some(self.cfg.retry_after.unwrap_or(until_reset)),
            };
        }
        if self.cfg.error_rate > 0.0 {
            let draw = crate::reply::unit_f64(mix64(self.cfg.seed ^ mix64(index)));
            if draw < self.cfg.error_rate {
                return self.fail(self.cfg.error_status);
            }
        }
        Decision::Ok {
            latency: self.cfg.latency,
            ttft: self.cfg.ttft,
            cut_after: self.cfg.cut_after,
        }
    }

    fn fail(&self, status: u16) -> Decision {
        let retry_after = if status == 429 {
            Some(self.cfg.retry_after.unwrap_or(Duration::from_secs(1)))
        } else {
            self.cfg.retry_after
        };
        Decision::Fail {
            status,
            retry_after,
        }
    }

    /// The `rpm` window as it stands now (one atomic load); `None` without `rpm`.
    pub fn window(&self) -> Option<RateWindow> {
        let limit = self.cfg.rpm?;
        let elapsed = self.epoch.elapsed();
        let now_window = elapsed.as_secs() / WINDOW.as_secs();
        let current = self.window.load(Ordering::Acquire);
        let used = if current >> 32 == now_window {
            current & 0xffff_ffff
        } else {
            0
        };
        let remaining = u64::from(limit).saturating_sub(used);
        let reset = WINDOW.saturating_mul((now_window + 1) as u32);
        Some(RateWindow {
            limit,
            remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
            reset: reset.saturating_sub(elapsed),
        })
    }

    /// Counts one request in the current window; returns the time until the window
    /// resets when the request is over `rpm`.
    fn admit(&self, rpm: u32) -> Option<Duration> {
        let elapsed = self.epoch.elapsed();
        let now_window = elapsed.as_secs() / WINDOW.as_secs();
        let mut current = self.window.load(Ordering::Acquire);
        loop {
            let (window, count) = (current >> 32, current & 0xffff_ffff);
            // A caller that read the clock just before another moved the window on
            // must not move it back, so it joins the newer window.
            let (window, count) = if now_window > window {
                (now_window, 1)
            } else {
                (window, (count + 1).min(0xffff_ffff))
            };
            let next = (window << 32) | count;
            match self.window.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    if count <= u64::from(rpm) {
                        return None;
                    }
                    let reset = WINDOW.saturating_mul((window + 1) as u32);
                    return Some(reset.saturating_sub(elapsed));
                }
                Err(actual) => current = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fails(chaos: &Chaos, n: usize) -> Vec<bool> {
        (0..n)
            .map(|_| matches!(chaos.decide(), Decision::Fail { .. }))
            .collect()
    }

    #[test]
    fn default_never_fails() {
        let chaos = Chaos::new(ChaosConfig::default());
        assert!(fails(&chaos, 1000).iter().all(|f| !f));
        assert_eq!(chaos.calls(), 1000);
        assert_eq!(chaos.config().error_status, 500);
        assert_eq!(chaos.config().fail_status, 503);
    }

    #[test]
    fn fail_first_then_ok() {
        let chaos = Chaos::new(ChaosConfig {
            fail_first: 2,
            ..ChaosConfig::default()
        });
        let fail = Decision::Fail {
            status: 503,
            retry_after: None,
        };
        assert_eq!(chaos.decide(), fail);
        assert_eq!(chaos.decide(), fail);
        assert!(matches!(chaos.decide(), Decision::Ok { .. }));
        assert_eq!(chaos.calls(), 3);
    }

    #[test]
    fn fail_first_with_429_carries_retry_after() {
        let chaos = Chaos::new(ChaosConfig {
            fail_first: 1,
            fail_status: 429,
            ..ChaosConfig::default()
        });
        assert_eq!(
            chaos.decide(),
            Decision::Fail {
                status: 429,
                retry_after: Some(Duration::from_secs(1))
            }
        );
    }

    #[test]
    fn error_rate_is_seeded_and_near_the_rate() {
        let cfg = ChaosConfig {
            error_rate: 0.1,
            error_status: 502,
            seed: 7,
            ..ChaosConfig::default()
        };
        let a = fails(&Chaos::new(cfg.clone()), 10_000);
        let b = fails(&Chaos::new(cfg.clone()), 10_000);
        assert_eq!(a, b);
        let rate = a.iter().filter(|f| **f).count() as f64 / 10_000.0;
        assert!((0.09..0.11).contains(&rate), "{rate}");
        let other = fails(&Chaos::new(ChaosConfig { seed: 8, ..cfg }), 10_000);
        assert_ne!(a, other);
    }

    #[test]
    fn rpm_limits_the_window() {
        let chaos = Chaos::new(ChaosConfig {
            rpm: Some(5),
            ..ChaosConfig::default()
        });
        for _ in 0..5 {
            assert!(matches!(chaos.decide(), Decision::Ok { .. }));
        }
        match chaos.decide() {
            Decision::Fail {
                status: 429,
                retry_after: Some(after),
            } => assert!(after > Duration::ZERO && after <= WINDOW, "{after:?}"),
            other => panic!("expected 429, got {other:?}"),
        }
    }

    #[test]
    fn window_reports_what_remains() {
        assert_eq!(Chaos::new(ChaosConfig::default()).window(), None);
        let chaos = Chaos::new(ChaosConfig {
            rpm: Some(3),
            ..ChaosConfig::default()
        });
        let w = chaos.window().unwrap();
        assert_eq!((w.limit, w.remaining), (3, 3));
        assert!(w.reset > Duration::ZERO && w.reset <= WINDOW, "{w:?}");
        chaos.decide();
        assert_eq!(chaos.window().unwrap().remaining, 2);
        for _ in 0..5 {
            chaos.decide();
        }
        assert_eq!(chaos.window().unwrap().remaining, 0);
    }

    #[test]
    fn rpm_is_exact_under_contention() {
        let chaos = std::sync::Arc::new(Chaos::new(ChaosConfig {
            rpm: Some(1000),
            ..ChaosConfig::default()
        }));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let chaos = chaos.clone();
                std::thread::spawn(move || {
                    (0..500)
                        .filter(|_| matches!(chaos.decide(), Decision::Ok { .. }))
                        .count()
                })
            })
            .collect();
        let ok: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(ok, 1000);
    }
}
