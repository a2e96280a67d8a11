//! The bounded outbound buffer of one leg of one call: messages the engine produced that the
//! leg's socket has not taken yet.
//!
//! Policy when full: audio is dropped oldest first (the caller counts it), because on a live
//! call late audio is worth less than current audio; control messages (`mark`, `clear`, session
//! commands) are never dropped, and are bounded too: a push past their capacity is refused
//! ([`QueueFull`]) and means the peer has stopped reading, so the call ends. A pong waits in a
//! slot of its own: a newer ping's payload replaces an unsent one (RFC 6455 §5.5.3 asks only for
//! the latest), so pings cannot grow the buffer. Plain data owned by the call's task: no lock,
//! no waker, no clock.

use std::collections::VecDeque;

use super::engine::{OutKind, Outgoing};

/// A leg's unsent messages, with separate bounds for audio and for everything else.
pub struct OutQueue {
    items: VecDeque<Outgoing>,
    audio: usize,
    /// Queued messages that are not audio.
    control: usize,
    /// The pong owed for the latest ping not yet answered.
    pong: Option<PingPayload>,
    audio_capacity: usize,
    control_capacity: usize,
}

/// A control message did not fit: the buffer already holds its capacity of them, so the
/// socket has not been taking messages and the peer is not reading.
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

impl OutQueue {
    /// `audio_capacity` bounds queued audio messages (beyond it the oldest is dropped),
    /// `control_capacity` the other messages (beyond it a push is refused).
    pub fn new(audio_capacity: usize, control_capacity: usize) -> Self {
        Self {
            items: VecDeque::new(),
            audio: 0,
            control: 0,
            pong: None,
            audio_capacity: audio_capacity.max(1),
            control_capacity: control_capacity.max(1),
        }
    }

    /// Queues a message. Returns how many old audio messages were dropped to make room, or
    /// [`QueueFull`] for a control message past the control capacity (it is not queued).
    pub fn push(&mut self, out: Outgoing) -> Result<usize, QueueFull> {
        let mut dropped = 0;
        if out.kind != OutKind::Audio {
            if self.control >= self.control_capacity {
                return Err(QueueFull);
            }
            self.control += 1;
        } else {
            while self.audio >= self.audio_capacity {
                let Some(oldest) = self.items.iter().position(|o| o.kind == OutKind::Audio) else {
                    break;
                };
                self.items.remove(oldest);
                self.audio -= 1;
                dropped += 1;
            }
            self.audio += 1;
        }
        self.items.push_back(out);
        Ok(dropped)
    }

    /// Owes the peer a pong for `ping`, replacing any pong not yet written.
    pub fn push_pong(&mut self, ping: PingPayload) {
        self.pong = Some(ping);
    }

    /// The pong owed, if any; it goes before the queued messages.
    pub fn take_pong(&mut self) -> Option<PingPayload> {
        self.pong.take()
    }

    /// Removes queued audio (a barge-in made it stale), keeping control messages.
    pub fn drop_audio(&mut self) -> usize {
        let before = self.items.len();
        self.items.retain(|o| o.kind != OutKind::Audio);
        self.audio = 0;
        before - self.items.len()
    }

    /// The oldest queued message.
    pub fn pop(&mut self) -> Option<Outgoing> {
        let out = self.items.pop_front()?;
        if out.kind == OutKind::Audio {
            self.audio -= 1;
        } else {
            self.control -= 1;
        }
        Some(out)
    }

    pub fn has_pong(&self) -> bool {
        self.pong.is_some()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
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

    fn texts(queue: &mut OutQueue) -> Vec<String> {
        std::iter::from_fn(|| queue.pop()).map(|o| o.text).collect()
    }

    #[test]
    fn full_queue_drops_oldest_audio_and_keeps_every_control_message() {
        let mut queue = OutQueue::new(2, 10);
        queue.push(out("a1", OutKind::Audio)).unwrap();
        queue.push(out("m1", OutKind::Mark)).unwrap();
        queue.push(out("a2", OutKind::Audio)).unwrap();
        assert_eq!(queue.push(out("a3", OutKind::Audio)), Ok(1));
        queue.push(out("c1", OutKind::Control)).unwrap();
        assert_eq!(texts(&mut queue), ["m1", "a2", "a3", "c1"]);
        // Counts follow pops: room again for two audio messages.
        assert_eq!(queue.push(out("a4", OutKind::Audio)), Ok(0));
        assert_eq!(queue.push(out("a5", OutKind::Audio)), Ok(0));
        assert_eq!(queue.push(out("a6", OutKind::Audio)), Ok(1));
    }

    #[test]
    fn drop_audio_keeps_marks() {
        let mut queue = OutQueue::new(10, 10);
        queue.push(out("a1", OutKind::Audio)).unwrap();
        queue.push(out("m1", OutKind::Mark)).unwrap();
        queue.push(out("a2", OutKind::Audio)).unwrap();
        assert_eq!(queue.drop_audio(), 2);
        assert_eq!(texts(&mut queue), ["m1"]);
    }

    #[test]
    fn control_messages_past_their_capacity_are_refused_never_dropped() {
        let mut queue = OutQueue::new(1, 2);
        queue.push(out("m1", OutKind::Mark)).unwrap();
        queue.push(out("c1", OutKind::Control)).unwrap();
        assert_eq!(queue.push(out("m2", OutKind::Mark)), Err(QueueFull));
        // Audio still has room of its own.
        queue.push(out("a1", OutKind::Audio)).unwrap();
        assert_eq!(texts(&mut queue), ["m1", "c1", "a1"]);
        queue.push(out("m3", OutKind::Mark)).unwrap();
    }

    #[test]
    fn pongs_coalesce_into_one_slot_with_the_latest_payload() {
        let mut queue = OutQueue::new(1, 1);
        queue.push_pong(PingPayload::new(b"one").unwrap());
        queue.push_pong(PingPayload::new(b"two").unwrap());
        assert!(queue.has_pong());
        assert_eq!(queue.take_pong().unwrap().as_bytes(), b"two");
        assert!(queue.take_pong().is_none());
        assert!(queue.is_empty());
    }

    #[test]
    fn a_ping_payload_is_kept_byte_for_byte_up_to_125_bytes() {
        let data: Vec<u8> = (0..=124).collect();
        assert_eq!(PingPayload::new(&data).unwrap().as_bytes(), &data[..]);
        assert!(PingPayload::new(&[0; 126]).is_none());
        assert_eq!(PingPayload::new(&[]).unwrap().as_bytes(), b"");
        assert_eq!(PingPayload::new(&[0xff, 0]).unwrap().as_bytes(), [0xff, 0]);
    }
}
