//! The live progress line's figures, shared between the simulated peers and the line without
//! a lock.
//!
//! Owns [`LiveBoard`]: per call, one slot per frame for the time the caller sent it and the
//! time the echo model sent it back, and one histogram per direction, all atomics. The peer
//! that completes a frame's journey does the join at once (the echo model for the uplink, the
//! caller for the downlink: each reads the other's slot) and adds the latency to the
//! histogram; the progress line only loads counters once a second. Nothing on the load's hot
//! path waits for the line, and the line never waits for it. The figures are for watching a
//! run; the result is joined afterwards from the complete records (see `harness`). Slots are
//! sized for the run's frames at start; frames past them are not shown live.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Latencies in microseconds, bucketed 2% apart: enough for a progress line, in constant
/// memory whatever the run's length, written with one relaxed add.
#[derive(Debug)]
pub struct LiveHistogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
}

impl Default for LiveHistogram {
    fn default() -> Self {
        Self {
            buckets: (0..Self::BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
        }
    }
}

impl LiveHistogram {
    /// Bucket i holds values up to `GROWTH^i` µs; 1,000 buckets reach past 10^8 µs.
    const GROWTH: f64 = 1.02;
    const BUCKETS: usize = 1_000;

    pub fn record(&self, us: f64) {
        let index = if us <= 1.0 {
            0
        } else {
            (us.ln() / Self::GROWTH.ln()).ceil() as usize
        };
        self.buckets[index.min(Self::BUCKETS - 1)].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// The upper bound of the bucket holding quantile `q` (within 2% of the exact value).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let count = self.count.load(Relaxed);
        if count == 0 {
            return None;
        }
        let rank = ((count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        let index = self
            .buckets
            .iter()
            .position(|n| {
                seen += n.load(Relaxed);
                seen >= rank
            })
            .unwrap_or(Self::BUCKETS - 1);
        Some(Self::GROWTH.powi(index as i32))
    }

    /// Values above `threshold` µs (to the bucket: within 2%).
    pub fn above(&self, threshold: f64) -> u64 {
        let first = (threshold.max(1.0).ln() / Self::GROWTH.ln()).ceil() as usize + 1;
        self.buckets
            .iter()
            .skip(first)
            .map(|n| n.load(Relaxed))
            .sum()
    }

    /// `p50/p99`, or `-` before the first sample.
    pub fn summary(&self) -> String {
        match (self.quantile(0.50), self.quantile(0.99)) {
            (Some(p50), Some(p99)) => format!("{p50:.0}/{p99:.0}"),
            _ => "-".to_owned(),
        }
    }
}

/// One call's frame slots: epoch µs + 1 (0 = not yet).
#[derive(Debug)]
struct CallSlots {
    sent: Box<[AtomicU64]>,
    echoed: Box<[AtomicU64]>,
}

/// What the peers publish while a run goes on.
#[derive(Debug)]
pub struct LiveBoard {
    calls: Box<[CallSlots]>,
    pub uplink: LiveHistogram,
    pub downlink: LiveHistogram,
    /// Calls streaming now (handshake done, `stop` not yet sent).
    pub up: AtomicU64,
}

impl LiveBoard {
    pub fn new(calls: usize, frames_per_call: usize) -> Self {
        let slots = || (0..frames_per_call).map(|_| AtomicU64::new(0)).collect();
        Self {
            calls: (0..calls)
                .map(|_| CallSlots {
                    sent: slots(),
                    echoed: slots(),
                })
                .collect(),
            uplink: LiveHistogram::default(),
            downlink: LiveHistogram::default(),
            up: AtomicU64::new(0),
        }
    }

    fn slot(slots: &[AtomicU64], frame: usize) -> Option<&AtomicU64> {
        slots.get(frame)
    }

    /// The caller sent `frame` at `at_us`.
    pub fn sent(&self, call: usize, frame: usize, at_us: u64) {
        if let Some(slot) = self
            .calls
            .get(call)
            .and_then(|c| Self::slot(&c.sent, frame))
        {
            slot.store(at_us + 1, Relaxed);
        }
    }

    /// The model has `frame` at `at_us`.
    pub fn arrived_at_model(&self, call: usize, frame: usize, at_us: u64) {
        if let Some(sent) = self
            .calls
            .get(call)
            .and_then(|c| Self::slot(&c.sent, frame))
            .map(|slot| slot.load(Relaxed))
            .filter(|&sent| sent > 0)
        {
            self.uplink.record(at_us.saturating_sub(sent - 1) as f64);
        }
    }

    /// The model sent `frame`'s echo at `at_us`.
    pub fn echoed(&self, call: usize, frame: usize, at_us: u64) {
        if let Some(slot) = self
            .calls
            .get(call)
            .and_then(|c| Self::slot(&c.echoed, frame))
        {
            slot.store(at_us + 1, Relaxed);
        }
    }

    /// The caller heard `frame`'s echo at `at_us`.
    pub fn arrived_at_caller(&self, call: usize, frame: usize, at_us: u64) {
        if let Some(echoed) = self
            .calls
            .get(call)
            .and_then(|c| Self::slot(&c.echoed, frame))
            .map(|slot| slot.load(Relaxed))
            .filter(|&echoed| echoed > 0)
        {
            self.downlink
                .record(at_us.saturating_sub(echoed - 1) as f64);
        }
    }

    /// Frames joined so far later than `threshold` µs, either way.
    pub fn late(&self, threshold: f64) -> u64 {
        self.uplink.above(threshold) + self.downlink.above(threshold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_histogram_is_within_two_percent() {
        let histogram = LiveHistogram::default();
        assert_eq!(histogram.summary(), "-");
        for us in 1..=10_000 {
            histogram.record(f64::from(us));
        }
        let p50 = histogram.quantile(0.5).unwrap();
        let p99 = histogram.quantile(0.99).unwrap();
        assert!((5_000.0..=5_100.0).contains(&p50), "{p50}");
        assert!((9_900.0..=10_100.0).contains(&p99), "{p99}");
        let above = histogram.above(5_000.0);
        assert!((4_900..=5_000).contains(&above), "{above}");
    }

    #[test]
    fn the_peer_that_completes_a_frame_joins_it() {
        let board = LiveBoard::new(2, 4);
        board.sent(1, 2, 1_000);
        board.arrived_at_model(1, 2, 1_300);
        // Unknown frames and calls are not joined.
        board.arrived_at_model(0, 2, 1_300);
        board.arrived_at_model(1, 9, 1_300);
        board.echoed(1, 2, 201_300);
        board.arrived_at_caller(1, 2, 201_800);
        assert_eq!(board.uplink.count.load(Relaxed), 1);
        assert_eq!(board.downlink.count.load(Relaxed), 1);
        assert!((300.0..=306.0).contains(&board.uplink.quantile(1.0).unwrap()));
        assert!((500.0..=510.0).contains(&board.downlink.quantile(1.0).unwrap()));
        assert_eq!(board.late(40_000.0), 0);
    }
}
