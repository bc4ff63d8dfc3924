//! Wall-clock helpers shared by every layer: now, CPA's RFC 3339 timestamps, and UTC calendar
//! days (for budget periods).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch; 0 if the clock is before it.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The store's clock, in Unix seconds: the wall clock when the store was opened (or the latest
/// time the database holds, if later), then the monotonic clock. A wall-clock step (NTP, a VM
/// restored from a snapshot) moves neither way: everything the store measures against its own
/// times (the new-series hold, series retirement, the failover window, gaps between pops) would
/// otherwise hide, retire or double counts. Its readings only ever meet each other; anything
/// shown as a time of day (gauges, budget periods) reads the wall clock.
#[derive(Debug, Clone, Copy)]
pub struct StoreClock {
    anchor_unix: f64,
    anchor: Instant,
}

impl StoreClock {
    /// A clock reading `unix` now.
    pub fn starting_at(unix: f64) -> StoreClock {
        StoreClock {
            anchor_unix: unix,
            anchor: Instant::now(),
        }
    }

    pub fn now(&self) -> f64 {
        self.anchor_unix + self.anchor.elapsed().as_secs_f64()
    }
}

impl Default for StoreClock {
    fn default() -> StoreClock {
        StoreClock::starting_at(unix_now())
    }
}

/// Parse an RFC 3339 timestamp (`Z` or a numeric offset, any fraction) into Unix seconds.
/// CPA writes Go's RFC3339Nano, in UTC or in the host's local offset.
pub fn parse_rfc3339(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut frac = 0.0;
    if let Some(after_dot) = rest.strip_prefix('.') {
        let digits = after_dot.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        // Nanoseconds at most matter; without allocating a string per record.
        let mut n = 0u64;
        for b in after_dot.bytes().take(digits.min(9)) {
            n = n * 10 + u64::from(b - b'0');
        }
        frac = n as f64 / 10f64.powi(digits.min(9) as i32);
        rest = &after_dot[digits..];
    }
    let offset_secs = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digits = [*h1, *h2, *m1, *m2];
            if !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let d = |i: usize| i64::from(digits[i] - b'0');
            let secs = (d(0) * 10 + d(1)) * 3600 + (d(2) * 10 + d(3)) * 60;
            if *sign == b'+' {
                secs
            } else {
                -secs
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + min * 60 + sec - offset_secs;
    Some(secs as f64 + frac)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number since 1970-01-01: (year, month 1..=12, day 1..=31).
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_with_fraction_and_offsets() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(
            parse_rfc3339("2026-08-22T14:39:03.5Z"),
            Some(1_787_409_543.5)
        );
        assert_eq!(
            parse_rfc3339("2026-08-22T22:39:03.5+08:00"),
            Some(1_787_409_543.5)
        );
        assert_eq!(parse_rfc3339("2026-08-22T14:39:03"), None);
        assert_eq!(parse_rfc3339("garbage-garbage-garbage"), None);
    }

    #[test]
    fn the_store_clock_starts_where_told_and_runs_on_the_monotonic_clock() {
        let c = StoreClock::starting_at(1000.0);
        let a = c.now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = c.now();
        assert!((1000.0..1001.0).contains(&a), "{a}");
        assert!(b >= a + 0.02 && b < 1001.0, "{a} {b}");
    }

    #[test]
    fn civil_days_round_trip() {
        for days in [-719_468, -1, 0, 59, 20_512, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(
            days_from_civil(2024, 3, 1) - days_from_civil(2024, 2, 28),
            2
        );
    }
}
