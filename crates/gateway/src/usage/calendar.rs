//! Budget periods on the calendar: the day or month holding a moment, at UTC or a fixed
//! offset from it, and RFC 3339 timestamps. Plain integer date arithmetic (Howard
//! Hinnant's `days_from_civil`), so there is no time-zone database to ship or to drift.

use serde::Serialize;

const DAY_MS: i64 = 86_400_000;

/// How long a budget counts before it starts again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Day,
    Month,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }
}

/// One period: where it starts and ends (Unix ms, end exclusive) and its label
/// (`2025-06-14` for a day, `2025-06` for a month, in the budget's own time zone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub start_ms: i64,
    pub end_ms: i64,
    pub label: String,
}

/// The period of kind `period` that holds `at_ms`, with days starting at midnight
/// `offset_s` seconds east of UTC.
pub fn span(period: Period, at_ms: i64, offset_s: i32) -> Span {
    let offset_ms = i64::from(offset_s) * 1000;
    let day = (at_ms + offset_ms).div_euclid(DAY_MS);
    let (y, m, d) = civil_from_days(day);
    let (start_day, end_day, label) = match period {
        Period::Day => (day, day + 1, date_label(y, m, Some(d))),
        Period::Month => {
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            (
                days_from_civil(y, m, 1),
                days_from_civil(ny, nm, 1),
                date_label(y, m, None),
            )
        }
    };
    Span {
        start_ms: start_day * DAY_MS - offset_ms,
        end_ms: end_day * DAY_MS - offset_ms,
        label,
    }
}

/// `YYYY-MM-DD` (or `YYYY-MM`), as `format!("{y:04}-{m:02}-{d:02}")` writes it, by hand
/// for the years 0..=9999: a budget check makes one per rule, and `format!` was a
/// measurable part of it.
fn date_label(y: i64, m: u32, d: Option<u32>) -> String {
    let Ok(y @ 0..=9999) = u32::try_from(y) else {
        return match d {
            Some(d) => format!("{y:04}-{m:02}-{d:02}"),
            None => format!("{y:04}-{m:02}"),
        };
    };
    let digit = |n: u32| char::from(b'0' + (n % 10) as u8);
    let mut s = String::with_capacity(10);
    s.extend([digit(y / 1000), digit(y / 100), digit(y / 10), digit(y)]);
    for n in [Some(m), d].into_iter().flatten() {
        s.extend(['-', digit(n / 10), digit(n)]);
    }
    s
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day counted from 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `2025-06-14T08:30:00Z` (UTC, whole seconds).
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// A `timezone` setting: `UTC` (or `Z`), or a fixed offset `+HH:MM` / `-HH:MM`
/// (optionally after `UTC`). Named zones are refused: their offset changes with
/// daylight saving, which a fixed-offset calendar cannot follow.
pub fn parse_offset(tz: &str) -> Result<i32, String> {
    let t = tz.trim();
    if t.eq_ignore_ascii_case("utc") || t == "Z" {
        return Ok(0);
    }
    let t = t
        .strip_prefix("UTC")
        .or_else(|| t.strip_prefix("utc"))
        .unwrap_or(t);
    let refuse = || {
        format!(
            "`{tz}` is not supported: use \"UTC\" or a fixed offset such as \"+02:00\" (named zones change offset with daylight saving)"
        )
    };
    let (sign, rest) = match t.as_bytes().first() {
        Some(b'+') => (1, &t[1..]),
        Some(b'-') => (-1, &t[1..]),
        _ => return Err(refuse()),
    };
    let (h, m) = rest.split_once(':').ok_or_else(refuse)?;
    let two = |s: &str| -> Option<i32> {
        (s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let h = two(h).ok_or_else(refuse)?;
    let m = two(m).ok_or_else(refuse)?;
    if h > 14 || m > 59 {
        return Err(refuse());
    }
    Ok(sign * (h * 3600 + m * 60))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(y: i64, m: u32, d: u32, h: i64) -> i64 {
        days_from_civil(y, m, d) * DAY_MS + h * 3_600_000
    }

    #[test]
    fn date_labels_read_as_format_writes_them() {
        for y in [-12, 0, 7, 99, 1970, 2026, 9999, 10_000, 123_456] {
            for m in [1, 9, 10, 12] {
                for d in [1, 9, 10, 31] {
                    assert_eq!(date_label(y, m, Some(d)), format!("{y:04}-{m:02}-{d:02}"));
                }
                assert_eq!(date_label(y, m, None), format!("{y:04}-{m:02}"));
            }
        }
    }

    #[test]
    fn days_round_trip_across_leap_years_and_eras() {
        for z in [-800_000, -1, 0, 1, 11_016, 19_782, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
        assert_eq!(
            days_from_civil(2024, 3, 1) - days_from_civil(2024, 2, 28),
            2
        );
        assert_eq!(
            days_from_civil(2023, 3, 1) - days_from_civil(2023, 2, 28),
            1
        );
    }

    #[test]
    fn days_and_months_in_utc() {
        let at = ms(2025, 6, 14, 13);
        assert_eq!(
            span(Period::Day, at, 0),
            Span {
                start_ms: ms(2025, 6, 14, 0),
                end_ms: ms(2025, 6, 15, 0),
                label: "2025-06-14".into()
            }
        );
        assert_eq!(
            span(Period::Month, at, 0),
            Span {
                start_ms: ms(2025, 6, 1, 0),
                end_ms: ms(2025, 7, 1, 0),
                label: "2025-06".into()
            }
        );
        let dec = span(Period::Month, ms(2024, 12, 31, 23), 0);
        assert_eq!(
            (dec.start_ms, dec.end_ms),
            (ms(2024, 12, 1, 0), ms(2025, 1, 1, 0))
        );
        let feb = span(Period::Month, ms(2024, 2, 10, 0), 0);
        assert_eq!(feb.end_ms - feb.start_ms, 29 * DAY_MS);
        // The last millisecond of a day still belongs to it.
        assert_eq!(
            span(Period::Day, ms(2025, 6, 15, 0) - 1, 0).label,
            "2025-06-14"
        );
    }

    #[test]
    fn fixed_offsets_move_midnight() {
        // 23:00 UTC on the 30th of June is already July 1st at +02:00.
        let at = ms(2025, 6, 30, 23);
        let s = span(Period::Month, at, 7200);
        assert_eq!(s.label, "2025-07");
        assert_eq!(s.start_ms, ms(2025, 6, 30, 22));
        let d = span(Period::Day, at, -5 * 3600);
        assert_eq!(d.label, "2025-06-30");
        assert_eq!(d.start_ms, ms(2025, 6, 30, 5));
    }

    #[test]
    fn timestamps_and_offsets_parse_and_print() {
        assert_eq!(
            rfc3339(ms(2025, 6, 14, 8) + 30 * 60_000 + 5_999),
            "2025-06-14T08:30:05Z"
        );
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(parse_offset("UTC"), Ok(0));
        assert_eq!(parse_offset("+02:00"), Ok(7200));
        assert_eq!(parse_offset("UTC-05:30"), Ok(-(5 * 3600 + 1800)));
        for bad in ["Europe/Paris", "+2", "+02:60", "+15:00", "", "02:00"] {
            assert!(parse_offset(bad).is_err(), "{bad}");
        }
    }
}
