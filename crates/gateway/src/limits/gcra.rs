//! The generic cell rate algorithm, as pure arithmetic on microseconds. The memory
//! backend runs it in process; the Redis script (`limits_v1.lua`) runs the same steps on
//! Redis's clock. One number per bucket: the theoretical arrival time (TAT), the moment
//! the bucket would be empty again.
//!
//! A bucket allows `limit` units per `period`, all of them at once if it was idle (the
//! burst is the whole period's allowance, as "60 requests per minute" reads). Charging
//! `cost` units moves the TAT by `cost * period / limit`; the charge is allowed when the
//! new TAT is at most one period ahead of now.
//!
//! Written by hand rather than with `governor`: the limiter must charge several buckets
//! all-or-nothing, refund or add tokens after the fact (estimates reconciled with real
//! usage), report remaining/reset for `x-ratelimit-*` headers, and match the Redis
//! script step for step; governor offers none of those.

/// Microseconds the TAT moves for `cost` units of a `limit`-per-`period_us` bucket.
pub fn increment(cost: u64, limit: u64, period_us: u64) -> u64 {
    let limit = limit.max(1);
    let v = (u128::from(cost) * u128::from(period_us)).div_ceil(u128::from(limit));
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// The outcome of charging one bucket at `now_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub allowed: bool,
    /// The TAT to store when allowed (unchanged otherwise).
    pub new_tat: u64,
    /// Units left in the bucket after this charge (or before it, when refused).
    pub remaining: u64,
    /// Microseconds until the bucket is full again.
    pub reset_us: u64,
    /// When refused: microseconds until the charge would fit.
    pub retry_after_us: u64,
}

/// Charge `cost` units against a bucket whose stored TAT is `tat` (0 when new).
pub fn charge(tat: u64, now_us: u64, cost: u64, limit: u64, period_us: u64) -> Step {
    let base = tat.max(now_us);
    let new_tat = base.saturating_add(increment(cost, limit, period_us));
    let horizon = now_us.saturating_add(period_us);
    if new_tat <= horizon {
        Step {
            allowed: true,
            new_tat,
            remaining: remaining(new_tat, now_us, limit, period_us),
            reset_us: new_tat - now_us,
            retry_after_us: 0,
        }
    } else {
        Step {
            allowed: false,
            new_tat: tat,
            remaining: remaining(base, now_us, limit, period_us),
            reset_us: base - now_us,
            // A cost larger than the whole bucket never fits: say "a full period".
            retry_after_us: if cost > limit {
                period_us
            } else {
                new_tat - horizon
            },
        }
    }
}

/// Units that could still be charged now with the bucket at `tat`.
pub fn remaining(tat: u64, now_us: u64, limit: u64, period_us: u64) -> u64 {
    let used = tat.saturating_sub(now_us);
    let free = period_us.saturating_sub(used);
    let v = u128::from(free) * u128::from(limit) / u128::from(period_us.max(1));
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// Add (`delta > 0`) or refund (`delta < 0`) units after the fact. A refund never
/// moves the TAT before now: unused allowance does not carry into the future.
pub fn adjust(tat: u64, now_us: u64, delta: i64, limit: u64, period_us: u64) -> u64 {
    let step = increment(delta.unsigned_abs(), limit, period_us);
    if delta >= 0 {
        tat.max(now_us).saturating_add(step)
    } else {
        tat.saturating_sub(step).max(now_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000_000;

    #[test]
    fn a_minute_allows_exactly_the_limit_at_once() {
        let (mut tat, now) = (0, 1_000_000_000);
        let mut allowed = 0;
        for _ in 0..100 {
            let s = charge(tat, now, 1, 60, MIN);
            if s.allowed {
                allowed += 1;
                tat = s.new_tat;
            }
        }
        assert_eq!(allowed, 60);
        let refused = charge(tat, now, 1, 60, MIN);
        assert!(!refused.allowed);
        assert_eq!(refused.remaining, 0);
        assert_eq!(
            refused.retry_after_us, 1_000_000,
            "one request per second frees up"
        );
        assert_eq!(refused.reset_us, MIN);
        // A second later exactly one more fits.
        assert!(charge(tat, now + 1_000_000, 1, 60, MIN).allowed);
        assert!(
            !charge(
                charge(tat, now + 1_000_000, 1, 60, MIN).new_tat,
                now + 1_000_000,
                1,
                60,
                MIN
            )
            .allowed
        );
    }

    #[test]
    fn remaining_and_reset_follow_the_charges() {
        let now = 5_000_000;
        let s = charge(0, now, 1000, 10_000, MIN);
        assert!(s.allowed);
        assert_eq!(s.remaining, 9000);
        assert_eq!(s.reset_us, 6_000_000);
        let s2 = charge(s.new_tat, now, 9001, 10_000, MIN);
        assert!(!s2.allowed);
        assert_eq!(s2.new_tat, s.new_tat, "a refusal stores nothing");
        assert_eq!(s2.remaining, 9000);
    }

    #[test]
    fn a_cost_above_the_limit_never_fits() {
        let s = charge(0, 0, 5000, 4000, MIN);
        assert!(!s.allowed);
        assert_eq!(s.retry_after_us, MIN);
    }

    #[test]
    fn adjust_adds_and_refunds_without_going_before_now() {
        let now = 10_000_000;
        let tat = charge(0, now, 500, 1000, MIN).new_tat;
        assert_eq!(tat, now + 30_000_000);
        assert_eq!(adjust(tat, now, 100, 1000, MIN), now + 36_000_000);
        assert_eq!(adjust(tat, now, -400, 1000, MIN), now + 6_000_000);
        assert_eq!(adjust(tat, now, -10_000, 1000, MIN), now);
        assert_eq!(adjust(0, now, 10, 1000, MIN), now + 600_000);
    }
}
