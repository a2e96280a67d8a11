//! Unix time from a [`SystemTime`] the caller read: the one conversion every wire timestamp
//! (request signatures, stream tokens, call reports, spool names) goes through. Reading the
//! clock stays with the caller, so nothing here reads it. A time before 1970 reads as 0;
//! milliseconds saturate at `u64::MAX`.

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
}
