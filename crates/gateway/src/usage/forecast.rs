//! When a budget runs out at the current rate: the spend so far over the elapsed part of
//! the period, extrapolated in a straight line. Integer arithmetic throughout.

use serde::Serialize;

/// What the straight line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Forecast {
    /// Spend has reached the limit.
    Exhausted,
    /// At the rate so far, spend reaches the limit at this moment (Unix ms), before the
    /// period ends.
    RunsOut { at_ms: i64 },
    /// At the rate so far (or with nothing spent yet), the budget lasts the period.
    Holds,
}

/// The forecast for `spent` of `limit` at `now_ms`, in the period `[start_ms, end_ms)`.
pub fn forecast(spent: i64, limit: i64, start_ms: i64, end_ms: i64, now_ms: i64) -> Forecast {
    if spent >= limit {
        return Forecast::Exhausted;
    }
    let elapsed = now_ms.saturating_sub(start_ms);
    if spent <= 0 || elapsed <= 0 {
        return Forecast::Holds;
    }
    // remaining / (spent / elapsed), rounded up to the millisecond it is reached.
    let remaining = u128::try_from(limit - spent).unwrap_or(0);
    let to_go = (remaining * elapsed.unsigned_abs() as u128).div_ceil(spent.unsigned_abs() as u128);
    match i64::try_from(to_go)
        .ok()
        .and_then(|t| now_ms.checked_add(t))
    {
        Some(at_ms) if at_ms < end_ms => Forecast::RunsOut { at_ms },
        _ => Forecast::Holds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    #[test]
    fn the_rate_so_far_is_extrapolated() {
        // 30-day month, 10 days in, 40 % spent: 4 % a day, 60 % to go = 15 more days.
        let start = 1_000 * DAY;
        let end = start + 30 * DAY;
        let now = start + 10 * DAY;
        assert_eq!(
            forecast(400, 1000, start, end, now),
            Forecast::RunsOut {
                at_ms: now + 15 * DAY
            }
        );
        // 20 % spent in 10 days: 2 % a day lasts 40 more days, past the month's end.
        assert_eq!(forecast(200, 1000, start, end, now), Forecast::Holds);
        // Exactly at the end of the period is not within it: 333 of 999 in 10 days
        // reaches 999 after 20 more, when the month ends.
        assert_eq!(forecast(333, 999, start, end, now), Forecast::Holds);
        assert_eq!(
            forecast(334, 999, start, end, now),
            Forecast::RunsOut {
                at_ms: now + (665 * 10 * DAY + 333) / 334
            }
        );
        assert_eq!(forecast(1000, 1000, start, end, now), Forecast::Exhausted);
        assert_eq!(forecast(1500, 1000, start, end, now), Forecast::Exhausted);
        assert_eq!(forecast(0, 1000, start, end, now), Forecast::Holds);
        assert_eq!(forecast(10, 1000, start, end, start), Forecast::Holds);
    }

    #[test]
    fn large_amounts_do_not_overflow() {
        let start = 0;
        let end = 31 * DAY;
        // $9 billion limits in nano-dollars, a millisecond in.
        assert_eq!(forecast(1, i64::MAX, start, end, 1), Forecast::Holds);
        assert_eq!(
            forecast(i64::MAX / 2, i64::MAX, start, end, DAY),
            Forecast::RunsOut { at_ms: 2 * DAY + 1 }
        );
    }
}
