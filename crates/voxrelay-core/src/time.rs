//! Unix time from a [`SystemTime`] the caller read: the one conversion every wire timestamp
//! (request signatures, stream tokens, call reports, spool names) goes through. Reading the
//! clock stays with the caller, so nothing here reads it. A time before 1970 reads as 0;
//! milliseconds saturate at `u64::MAX`. Also the UTC calendar date and time of day of such a
//! time, for the few human-readable stamps (a recording's tags, a benchmark's date), without a
//! date crate.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `at` as the time since the Unix epoch (zero before it).
pub fn since_epoch(at: SystemTime) -> Duration {
    at.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO)
}

/// `at` in whole seconds since the Unix epoch.
pub fn unix_secs(at: SystemTime) -> u64 {
    since_epoch(at).as_secs()
}

/// `at` in whole milliseconds since the Unix epoch.
pub fn unix_ms(at: SystemTime) -> u64 {
    u64::try_from(since_epoch(at).as_millis()).unwrap_or(u64::MAX)
}

/// `at`'s UTC calendar date and time of day: `(year, month, day)` and seconds since midnight.
pub fn utc_civil(at: SystemTime) -> ((i64, u32, u32), u64) {
    let secs = unix_secs(at);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil-from-days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    ((year, month as u32, day as u32), rem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_truncates_and_clamps() {
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_999);
        assert_eq!(unix_secs(at), 1_700_000_000);
        assert_eq!(unix_ms(at), 1_700_000_000_999);
        let before = UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!((unix_secs(before), unix_ms(before)), (0, 0));
        assert_eq!(since_epoch(before), Duration::ZERO);
    }

    #[test]
    fn civil_dates_cross_leap_days_and_centuries() {
        let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(secs);
        assert_eq!(utc_civil(at(0)), ((1970, 1, 1), 0));
        // 2000-02-29T12:00:01Z and 2100-03-01T00:00:00Z.
        assert_eq!(utc_civil(at(951_825_601)), ((2000, 2, 29), 43_201));
        assert_eq!(utc_civil(at(4_107_542_400)), ((2100, 3, 1), 0));
        assert_eq!(utc_civil(at(1_796_617_409)), ((2026, 12, 7), 15_809));
    }
}
