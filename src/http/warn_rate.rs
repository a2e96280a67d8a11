//! A per-second allowance for route-level warning lines.
//!
//! A flood of forged requests (bad signatures, connections over a cap) is one warning per
//! request; written out in full it would fill the disk at the attacker's rate. [`WarnRate`]
//! lets a few lines through each second and counts the rest
//! (`voxrelay_log_lines_suppressed_total`); the next line let through says how many were left
//! out before it, so the log still shows that a flood happened and how large it was.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::session::metrics::Metrics;

/// Route-level warning lines logged per second, all routes together.
pub const WARNINGS_PER_SECOND: u32 = 5;

pub struct WarnRate {
    per_second: u32,
    epoch: Instant,
    state: Mutex<Window>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Window {
    second: u64,
    logged: u32,
    /// Lines left out since the last one logged.
    suppressed: u64,
}

impl WarnRate {
    pub fn new(per_second: u32, metrics: Arc<Metrics>) -> Self {
        Self {
            per_second,
            epoch: Instant::now(),
            state: Mutex::new(Window::default()),
            metrics,
        }
    }

    /// `Some(n)` when a warning may be logged now, `n` being how many were left out since the
    /// last one logged (log it with the line); `None` when it is left out (and counted).
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let second = now.saturating_duration_since(self.epoch).as_secs();
        let mut window = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if window.second != second {
            window.second = second;
            window.logged = 0;
        }
        if window.logged < self.per_second {
            window.logged += 1;
            Some(std::mem::take(&mut window.suppressed))
        } else {
            window.suppressed += 1;
            self.metrics
                .listener
                .log_lines_suppressed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_few_lines_per_second_then_counted_and_reported_by_the_next_line() {
        let metrics = Arc::new(Metrics::default());
        let rate = WarnRate::new(2, Arc::clone(&metrics));
        let start = rate.epoch;
        assert_eq!(rate.allow(start), Some(0));
        assert_eq!(rate.allow(start + Duration::from_millis(10)), Some(0));
        for _ in 0..1000 {
            assert_eq!(rate.allow(start + Duration::from_millis(500)), None);
        }
        assert_eq!(metrics.listener.log_lines_suppressed.load(Relaxed), 1000);
        assert_eq!(rate.allow(start + Duration::from_millis(1001)), Some(1000));
        assert_eq!(rate.allow(start + Duration::from_millis(1002)), Some(0));
        assert_eq!(rate.allow(start + Duration::from_millis(1003)), None);
    }
}
