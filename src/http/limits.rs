//! The public listener's caps: open connections, connections not yet verified, and calls.
//!
//! Every cap is on state, never on a peer's address: behind Fly's proxy and from Twilio every
//! call arrives from a handful of addresses, so a per-address limit would either never bind or
//! refuse real calls. Each cap is a counter released by a drop guard ([`Connection`],
//! [`CallPermit`]), so a connection or call that ends any way at all — closed, timed out,
//! cancelled, its task panicking — gives its slot back.
//!
//! * A connection holds a slot of [`ConnectionLimits`] from accept until its socket closes
//!   (an upgraded media stream keeps it until its call task ends), and an "unverified" slot
//!   until one of its requests passes Twilio's signature check. At either cap a new connection
//!   is closed at once. A connection that only opens and waits therefore costs one unverified
//!   slot for at most the header-read timeout, and cannot crowd out verified traffic beyond
//!   the unverified cap.
//! * A call holds a slot of [`CallSlots`] from the voice webhook's answer (a reservation, kept
//!   until a stream takes it or it expires) or, for a stream nobody reserved for, from its
//!   upgrade; the stream's [`CallPermit`] lives as long as its call task. Streams that have not
//!   sent `start` yet are capped separately, so sockets that never start cannot hold every
//!   call slot.
//!
//! None of this is on the per-frame path: it runs once per connection, webhook and stream.

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::session::metrics::{ListenerRefusal, Metrics};

/// Caps on the connections of one listener.
pub struct ConnectionLimits {
    max_open: usize,
    max_unverified: usize,
    open: AtomicUsize,
    unverified: AtomicUsize,
    /// The public listener reports its gauges and refusals; the admin listener does not.
    metrics: Option<Arc<Metrics>>,
}

impl ConnectionLimits {
    pub fn new(max_open: usize, max_unverified: usize, metrics: Option<Arc<Metrics>>) -> Arc<Self> {
        Arc::new(Self {
            max_open,
            max_unverified,
            open: AtomicUsize::new(0),
            unverified: AtomicUsize::new(0),
            metrics,
        })
    }

    /// A slot for a connection just accepted, unverified; at either cap, the refusal (counted).
    pub fn admit(self: &Arc<Self>) -> Result<Arc<Connection>, ListenerRefusal> {
        let refused = |why| {
            if let Some(metrics) = &self.metrics {
                metrics.listener.refused(why);
            }
            Err(why)
        };
        if !take_slot(&self.open, self.max_open) {
            return refused(ListenerRefusal::ConnectionCap);
        }
        if !take_slot(&self.unverified, self.max_unverified) {
            self.open.fetch_sub(1, Relaxed);
            return refused(ListenerRefusal::UnverifiedCap);
        }
        if let Some(metrics) = &self.metrics {
            metrics.listener.connections_open.fetch_add(1, Relaxed);
            metrics
                .listener
                .connections_unverified
                .fetch_add(1, Relaxed);
        }
        Ok(Arc::new(Connection {
            limits: Arc::clone(self),
            unverified: AtomicBool::new(true),
        }))
    }

    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }

    pub fn unverified(&self) -> usize {
        self.unverified.load(Relaxed)
    }
}

/// Adds one to `counter` unless it is at `cap`.
fn take_slot(counter: &AtomicUsize, cap: usize) -> bool {
    counter
        .fetch_update(Relaxed, Relaxed, |n| (n < cap).then_some(n + 1))
        .is_ok()
}

/// One accepted connection's slots, shared by the connection's task, its requests (as a
/// request extension) and, after an upgrade, its call task; released when the last one drops.
pub struct Connection {
    limits: Arc<ConnectionLimits>,
    unverified: AtomicBool,
}

impl Connection {
    /// One of this connection's requests passed Twilio's signature check: it no longer counts
    /// against the unverified cap. Idempotent.
    pub fn mark_verified(&self) {
        if self.unverified.swap(false, Relaxed) {
            self.release_unverified();
        }
    }

    pub fn is_verified(&self) -> bool {
        !self.unverified.load(Relaxed)
    }

    fn release_unverified(&self) {
        self.limits.unverified.fetch_sub(1, Relaxed);
        if let Some(metrics) = &self.limits.metrics {
            metrics
                .listener
                .connections_unverified
                .fetch_sub(1, Relaxed);
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if *self.unverified.get_mut() {
            self.release_unverified();
        }
        self.limits.open.fetch_sub(1, Relaxed);
        if let Some(metrics) = &self.limits.metrics {
            metrics.listener.connections_open.fetch_sub(1, Relaxed);
        }
    }
}

/// A request's connection, as the accept loop puts it in each request's extensions.
#[derive(Clone)]
pub struct ConnectionHandle(pub Arc<Connection>);

/// Why a call slot was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallsFull {
    #[error("every call slot is taken")]
    MaxCalls,
    #[error("too many streams are waiting for `start`")]
    Unstarted,
}

/// The bridge's concurrent calls, against `VOXRELAY_MAX_CALLS`.
pub struct CallSlots {
    max_calls: usize,
    max_unstarted: usize,
    reservation_ttl: Duration,
    /// Reservations are keyed by a keyed hash of their CallSid: a repeated webhook for the
    /// same call finds its reservation instead of taking a second slot, and no peer-sized
    /// string is kept.
    hasher: RandomState,
    state: Mutex<SlotState>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct SlotState {
    /// Live media streams (each holds a [`CallPermit`]).
    streams: usize,
    /// Webhooks answered whose stream has not come yet, oldest first (all share one time to
    /// live, so expiry order is insertion order). At most `max_calls` long.
    reservations: VecDeque<Reservation>,
}

struct Reservation {
    key: u64,
    expires: Instant,
}

impl CallSlots {
    pub fn new(
        max_calls: usize,
        max_unstarted: usize,
        reservation_ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            max_calls,
            max_unstarted,
            reservation_ttl,
            hasher: RandomState::new(),
            state: Mutex::new(SlotState::default()),
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        // The state is two counters' worth; a panic elsewhere cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops expired reservations; returns the slots in use.
    fn purge(&self, state: &mut SlotState, now: Instant) -> usize {
        while state
            .reservations
            .front()
            .is_some_and(|reservation| reservation.expires <= now)
        {
            state.reservations.pop_front();
            self.metrics
                .listener
                .call_reservations_expired
                .fetch_add(1, Relaxed);
        }
        state.streams + state.reservations.len()
    }

    fn publish(&self, state: &SlotState) {
        let in_use = state.streams + state.reservations.len();
        self.metrics
            .listener
            .call_slots_in_use
            .store(in_use as i64, Relaxed);
    }

    /// The voice webhook for `call_sid` is about to answer with a stream: holds a slot for
    /// its stream, unless every slot is taken. A second webhook for a call that already holds
    /// a reservation takes nothing more (and does not extend it).
    pub fn reserve(&self, call_sid: &str, now: Instant) -> Result<(), CallsFull> {
        let key = self.hasher.hash_one(call_sid);
        let mut state = self.lock();
        let in_use = self.purge(&mut state, now);
        let outcome = if state.reservations.iter().any(|r| r.key == key) {
            Ok(())
        } else if in_use >= self.max_calls {
            Err(CallsFull::MaxCalls)
        } else {
            state.reservations.push_back(Reservation {
                key,
                expires: now + self.reservation_ttl,
            });
            Ok(())
        };
        self.publish(&state);
        outcome
    }

    /// A media stream about to be upgraded, with `started` streams already past `start`:
    /// takes the oldest reservation (a stream cannot be matched to its webhook before `start`,
    /// and for the count it does not matter which), else a free slot.
    pub fn admit_stream(
        self: &Arc<Self>,
        started: usize,
        now: Instant,
    ) -> Result<CallPermit, CallsFull> {
        let mut state = self.lock();
        let in_use = self.purge(&mut state, now);
        if state.streams.saturating_sub(started) >= self.max_unstarted {
            return Err(CallsFull::Unstarted);
        }
        if state.reservations.pop_front().is_none() && in_use >= self.max_calls {
            return Err(CallsFull::MaxCalls);
        }
        state.streams += 1;
        self.publish(&state);
        Ok(CallPermit {
            slots: Arc::clone(self),
        })
    }

    /// Slots taken now: live streams plus unexpired reservations.
    pub fn in_use(&self, now: Instant) -> usize {
        let mut state = self.lock();
        let in_use = self.purge(&mut state, now);
        self.publish(&state);
        in_use
    }
}

/// A media stream's call slot, held by its call task; released when the task ends.
pub struct CallPermit {
    slots: Arc<CallSlots>,
}

impl Drop for CallPermit {
    fn drop(&mut self) {
        let mut state = self.slots.lock();
        state.streams -= 1;
        self.slots.publish(&state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(15);

    #[test]
    fn connections_hold_open_and_unverified_slots_until_dropped_or_verified() {
        let metrics = Arc::new(Metrics::default());
        let limits = ConnectionLimits::new(3, 2, Some(Arc::clone(&metrics)));
        let a = limits.admit().unwrap();
        let b = limits.admit().unwrap();
        assert_eq!(limits.admit().err(), Some(ListenerRefusal::UnverifiedCap));
        assert_eq!(limits.open(), 2);
        a.mark_verified();
        a.mark_verified();
        assert!(a.is_verified() && !b.is_verified());
        let c = limits.admit().unwrap();
        assert_eq!(limits.admit().err(), Some(ListenerRefusal::ConnectionCap));
        assert_eq!(metrics.listener.refusals(ListenerRefusal::UnverifiedCap), 1);
        assert_eq!(metrics.listener.refusals(ListenerRefusal::ConnectionCap), 1);
        assert_eq!(metrics.listener.connections_open.load(Relaxed), 3);
        assert_eq!(metrics.listener.connections_unverified.load(Relaxed), 2);
        drop((a, b, c));
        assert_eq!((limits.open(), limits.unverified()), (0, 0));
        assert_eq!(metrics.listener.connections_open.load(Relaxed), 0);
        assert_eq!(metrics.listener.connections_unverified.load(Relaxed), 0);
    }

    #[test]
    fn a_webhook_reservation_is_taken_by_a_stream_or_expires() {
        let metrics = Arc::new(Metrics::default());
        let slots = CallSlots::new(2, 2, TTL, Arc::clone(&metrics));
        let now = Instant::now();
        slots.reserve("CA1", now).unwrap();
        // A repeat of the same webhook takes nothing more.
        slots.reserve("CA1", now).unwrap();
        slots.reserve("CA2", now).unwrap();
        assert_eq!(slots.reserve("CA3", now), Err(CallsFull::MaxCalls));
        // Streams take the reservations, and no further slot.
        let first = slots.admit_stream(0, now).unwrap();
        let second = slots.admit_stream(1, now).unwrap();
        assert_eq!(slots.in_use(now), 2);
        assert_eq!(slots.admit_stream(2, now).err(), Some(CallsFull::MaxCalls));
        drop(first);
        assert_eq!(slots.in_use(now), 1);
        slots.reserve("CA3", now).unwrap();
        assert_eq!(slots.in_use(now), 2);
        // Its stream never comes: the slot comes back after the reservation's time to live.
        assert_eq!(
            slots.reserve("CA4", now + TTL / 2),
            Err(CallsFull::MaxCalls)
        );
        slots.reserve("CA4", now + TTL).unwrap();
        assert_eq!(metrics.listener.call_reservations_expired.load(Relaxed), 1);
        drop(second);
        assert_eq!(slots.in_use(now + TTL), 1);
        assert_eq!(metrics.listener.call_slots_in_use.load(Relaxed), 1);
    }

    #[test]
    fn streams_without_start_are_capped_apart_from_calls() {
        let slots = CallSlots::new(10, 2, TTL, Arc::new(Metrics::default()));
        let now = Instant::now();
        let a = slots.admit_stream(0, now).unwrap();
        let b = slots.admit_stream(0, now).unwrap();
        assert_eq!(slots.admit_stream(0, now).err(), Some(CallsFull::Unstarted));
        // Once one of them has started, another may wait for its `start`.
        let c = slots.admit_stream(1, now).unwrap();
        drop((a, b, c));
        assert_eq!(slots.in_use(now), 0);
    }

    #[test]
    fn a_permit_dropped_by_a_panicking_task_is_released() {
        let slots = CallSlots::new(1, 1, TTL, Arc::new(Metrics::default()));
        let permit = slots.admit_stream(0, Instant::now()).unwrap();
        let joined = std::thread::spawn(move || {
            let _permit = permit;
            panic!("call task failed");
        })
        .join();
        assert!(joined.is_err());
        assert_eq!(slots.in_use(Instant::now()), 0);
    }
}
