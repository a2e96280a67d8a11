//! The bounded outbound queue between a call's engine and one of its socket writers.
//!
//! Policy when full: audio is dropped oldest first (counted), because on a live call late
//! audio is worth less than current audio; control messages (`mark`, `clear`, session
//! commands) are never dropped, and are bounded too: a push past their capacity is refused
//! ([`QueueFull`]) and means the peer has stopped reading, so the call ends. A pong waits in a
//! slot of its own: a newer ping's payload replaces an unsent one (RFC 6455 §5.5.3 asks only for
//! the latest), so pings cannot grow the queue. The engine side never waits, so a stalled
//! socket can only cost its own call, never block the reader or another call. The lock is this
//! queue's own: one call, one direction, shared by exactly two tasks.
//!
//! The queue also carries spent message buffers back from the writer to the core (a bounded
//! free list, [`SPARE_TEXTS`] buffers of at most [`SPARE_TEXT_MAX_BYTES`]; more are freed), so
//! a call reuses the same few `String`s frame after frame. Both directions of that hand-off
//! ride on locks the queue takes anyway.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

use super::engine::{OutKind, Outgoing};
use super::metrics::{Direction, Metrics};

pub struct OutQueue {
    state: Mutex<State>,
    ready: Notify,
    audio_capacity: usize,
    control_capacity: usize,
    direction: Direction,
    metrics: Arc<Metrics>,
}

/// Spent buffers held for the core; a writer's batch rarely holds more.
pub const SPARE_TEXTS: usize = 4;
/// A spent buffer larger than this (a big control message's) is freed rather than kept.
pub const SPARE_TEXT_MAX_BYTES: usize = 2 * 1024;

/// A control message did not fit: the queue already holds its capacity of them, so the writer
/// has not been taking messages and the peer is not reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("outbound control queue full: the peer is not reading")]
pub struct QueueFull;

/// The largest ping payload RFC 6455 allows (control frames carry at most 125 bytes).
pub const MAX_PING_PAYLOAD: usize = 125;

/// A ping's application data, kept byte for byte (not as text) to be echoed in the pong, in a
/// fixed buffer: a ping costs no allocation.
#[derive(Clone, Copy)]
pub struct PingPayload {
    len: u8,
    bytes: [u8; MAX_PING_PAYLOAD],
}

impl PingPayload {
    /// `None` when `data` is longer than a control frame may be.
    pub fn new(data: &[u8]) -> Option<Self> {
        let len = u8::try_from(data.len())
            .ok()
            .filter(|&len| usize::from(len) <= MAX_PING_PAYLOAD)?;
        let mut bytes = [0; MAX_PING_PAYLOAD];
        bytes[..data.len()].copy_from_slice(data);
        Some(Self { len, bytes })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for PingPayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PingPayload({} bytes)", self.len)
    }
}

#[derive(Default)]
struct State {
    items: VecDeque<Outgoing>,
    audio: usize,
    /// Queued messages that are not audio.
    control: usize,
    /// The pong owed for the latest ping not yet answered.
    pong: Option<PingPayload>,
    closed: bool,
    /// Buffers the writer has finished with, cleared, waiting for the core.
    spare: Vec<String>,
}

impl OutQueue {
    /// `audio_capacity` bounds queued audio messages (beyond it the oldest is dropped),
    /// `control_capacity` the other messages (beyond it a push is refused).
    pub fn new(
        audio_capacity: usize,
        control_capacity: usize,
        direction: Direction,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            audio_capacity: audio_capacity.max(1),
            control_capacity: control_capacity.max(1),
            direction,
            metrics,
        }
    }

    /// Queues a message without waiting. Returns how many old audio messages were dropped, or
    /// [`QueueFull`] for a control message past the control capacity (it is not queued).
    pub fn push(&self, out: Outgoing) -> Result<usize, QueueFull> {
        let mut dropped = 0;
        {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if state.closed {
                return Ok(0);
            }
            if out.kind != OutKind::Audio {
                if state.control >= self.control_capacity {
                    return Err(QueueFull);
                }
                state.control += 1;
            } else {
                while state.audio >= self.audio_capacity {
                    let Some(oldest) = state.items.iter().position(|o| o.kind == OutKind::Audio)
                    else {
                        break;
                    };
                    state.items.remove(oldest);
                    state.audio -= 1;
                    dropped += 1;
                }
                state.audio += 1;
            }
            state.items.push_back(out);
        }
        if dropped > 0 {
            self.metrics.audio_dropped(self.direction, dropped as u64);
        }
        self.ready.notify_one();
        Ok(dropped)
    }

    /// Owes the peer a pong for `ping`, replacing any pong not yet written.
    pub fn push_pong(&self, ping: PingPayload) {
        {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if state.closed {
                return;
            }
            state.pong = Some(ping);
        }
        self.ready.notify_one();
    }

    /// Removes queued audio (a barge-in made it stale), keeping control messages.
    pub fn drop_audio(&self) -> usize {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let before = state.items.len();
        state.items.retain(|o| o.kind != OutKind::Audio);
        state.audio = 0;
        before - state.items.len()
    }

    /// Moves every queued message into `batch` (in order) and the owed pong into `pong`,
    /// waiting while there is neither, and first takes the writer's `spent` buffers back for
    /// the core (see [`OutQueue::reclaim`]). Returns false once the queue is closed and empty.
    pub async fn pop_all(
        &self,
        batch: &mut Vec<Outgoing>,
        pong: &mut Option<PingPayload>,
        spent: &mut Vec<String>,
    ) -> bool {
        loop {
            let notified = self.ready.notified();
            {
                let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                for mut text in spent.drain(..) {
                    if state.spare.len() < SPARE_TEXTS && text.capacity() <= SPARE_TEXT_MAX_BYTES {
                        text.clear();
                        state.spare.push(text);
                    }
                }
                if !state.items.is_empty() || state.pong.is_some() {
                    batch.extend(state.items.drain(..));
                    state.audio = 0;
                    state.control = 0;
                    *pong = state.pong.take();
                    return true;
                }
                if state.closed {
                    return false;
                }
            }
            notified.await;
        }
    }

    /// Hands each spent buffer the writer has returned to `reuse` (the core's side of the
    /// free list; the buffers are empty, their capacity kept).
    pub fn reclaim(&self, mut reuse: impl FnMut(String)) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        for text in state.spare.drain(..) {
            reuse(text);
        }
    }

    /// No more messages will be accepted; the writer drains what is queued and stops.
    pub fn close(&self) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .closed = true;
        self.ready.notify_one();
    }

    pub fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .items
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(text: &str, kind: OutKind) -> Outgoing {
        Outgoing {
            text: text.to_owned(),
            kind,
            caused_at: None,
        }
    }

    #[tokio::test]
    async fn full_queue_drops_oldest_audio_and_keeps_every_control_message() {
        let metrics = Arc::new(Metrics::default());
        let queue = OutQueue::new(2, 8, Direction::Downlink, Arc::clone(&metrics));
        queue.push(out("a1", OutKind::Audio)).unwrap();
        queue.push(out("m1", OutKind::Mark)).unwrap();
        queue.push(out("a2", OutKind::Audio)).unwrap();
        assert_eq!(queue.push(out("a3", OutKind::Audio)), Ok(1));
        queue.push(out("c", OutKind::Clear)).unwrap();
        let mut batch = Vec::new();
        assert!(queue.pop_all(&mut batch, &mut None, &mut Vec::new()).await);
        let texts: Vec<_> = batch.iter().map(|o| o.text.as_str()).collect();
        assert_eq!(texts, ["m1", "a2", "a3", "c"]);
        assert_eq!(metrics.audio_dropped_count(Direction::Downlink), 1);
    }

    #[tokio::test]
    async fn close_lets_the_writer_drain_then_stop() {
        let queue = Arc::new(OutQueue::new(
            4,
            4,
            Direction::Uplink,
            Arc::new(Metrics::default()),
        ));
        let writer = {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut batch = Vec::new();
                while queue.pop_all(&mut batch, &mut None, &mut Vec::new()).await {
                    seen.extend(batch.drain(..).map(|o| o.text));
                }
                seen
            })
        };
        queue.push(out("x", OutKind::Control)).unwrap();
        queue.close();
        queue.push(out("after close", OutKind::Control)).unwrap();
        let seen = tokio::time::timeout(std::time::Duration::from_secs(5), writer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seen, ["x"]);
    }

    #[tokio::test]
    async fn spent_buffers_come_back_bounded_and_cleared() {
        let queue = OutQueue::new(8, 8, Direction::Uplink, Arc::new(Metrics::default()));
        queue.push(out("a", OutKind::Audio)).unwrap();
        let mut batch = Vec::new();
        // An oversized buffer first, then more than the list holds.
        let mut spent: Vec<String> =
            std::iter::once(String::with_capacity(SPARE_TEXT_MAX_BYTES + 1))
                .chain((0..SPARE_TEXTS + 2).map(|i| format!("spent {i}")))
                .collect();
        assert!(queue.pop_all(&mut batch, &mut None, &mut spent).await);
        assert!(spent.is_empty());
        let mut reclaimed = Vec::new();
        queue.reclaim(|text| reclaimed.push(text));
        assert_eq!(reclaimed.len(), SPARE_TEXTS);
        assert!(
            reclaimed
                .iter()
                .all(|t| t.is_empty() && (1..=SPARE_TEXT_MAX_BYTES).contains(&t.capacity()))
        );
        queue.reclaim(|_| panic!("each buffer comes back once"));
    }

    #[test]
    fn drop_audio_keeps_marks() {
        let queue = OutQueue::new(8, 8, Direction::Downlink, Arc::new(Metrics::default()));
        queue.push(out("a", OutKind::Audio)).unwrap();
        queue.push(out("m", OutKind::Mark)).unwrap();
        assert_eq!(queue.drop_audio(), 1);
        assert_eq!(queue.len(), 1);
    }

    #[tokio::test]
    async fn control_messages_past_their_capacity_are_refused_never_dropped() {
        let queue = OutQueue::new(1, 3, Direction::Downlink, Arc::new(Metrics::default()));
        for name in ["m1", "m2", "m3"] {
            queue.push(out(name, OutKind::Mark)).unwrap();
        }
        // Audio still flows (dropping the oldest); the fourth control message does not fit.
        queue.push(out("a1", OutKind::Audio)).unwrap();
        assert_eq!(queue.push(out("a2", OutKind::Audio)), Ok(1));
        assert_eq!(queue.push(out("m4", OutKind::Mark)), Err(QueueFull));
        assert_eq!(queue.push(out("c", OutKind::Clear)), Err(QueueFull));
        let mut batch = Vec::new();
        assert!(queue.pop_all(&mut batch, &mut None, &mut Vec::new()).await);
        let texts: Vec<_> = batch.iter().map(|o| o.text.as_str()).collect();
        assert_eq!(texts, ["m1", "m2", "m3", "a2"]);
        // Once the writer has taken them there is room again.
        queue.push(out("m4", OutKind::Mark)).unwrap();
    }

    #[tokio::test]
    async fn pongs_coalesce_into_one_slot_with_the_latest_payload() {
        let queue = OutQueue::new(4, 4, Direction::Downlink, Arc::new(Metrics::default()));
        for i in 0..10_000u32 {
            queue.push_pong(PingPayload::new(&i.to_be_bytes()).unwrap());
        }
        assert_eq!(queue.len(), 0, "pongs are not queued messages");
        let (mut batch, mut pong) = (Vec::new(), None);
        assert!(queue.pop_all(&mut batch, &mut pong, &mut Vec::new()).await);
        assert!(batch.is_empty());
        assert_eq!(pong.take().unwrap().as_bytes(), 9_999u32.to_be_bytes());
        queue.close();
        assert!(!queue.pop_all(&mut batch, &mut pong, &mut Vec::new()).await);
        assert!(pong.is_none());
    }

    #[test]
    fn a_ping_payload_is_kept_byte_for_byte_up_to_125_bytes() {
        let binary: Vec<u8> = (0..=124u8).map(|b| b.wrapping_mul(37) | 0x80).collect();
        assert!(std::str::from_utf8(&binary).is_err());
        assert_eq!(PingPayload::new(&binary).unwrap().as_bytes(), &binary[..]);
        assert_eq!(PingPayload::new(b"").unwrap().as_bytes(), b"");
        assert!(PingPayload::new(&[0; MAX_PING_PAYLOAD + 1]).is_none());
    }
}
