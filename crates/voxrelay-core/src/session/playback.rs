//! Playback accounting, pacing and barge-in for one call (the contract is `docs/barge-in.md`).
//!
//! [`Playback`] owns the assistant audio (μ-law 8 kHz bytes) not yet sent to Twilio, releases it
//! in whole chunks no faster than a fixed lead ahead of real time, names a mark after every chunk
//! so Twilio's echo says which position of which item was played, and on `speech_started` decides
//! what barge-in needs (truncate, deletes, cancel). It is sans-IO: every time is a parameter, it
//! never reads a clock and never panics on input. Invariants: chunks are whole multiples of 20 ms;
//! only the last queued segment may hold a partial chunk; the audio buffered at Twilio (estimated
//! as `play_end - now`) never exceeds `max(lead, one chunk)`; an item's confirmed position comes
//! only from marks of the current generation and never exceeds what was sent for it; every
//! truncate position is at most the item's sent position; after a barge-in nothing of the old
//! generation (queued audio, items, mark echoes, late deltas) can affect the new one.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// μ-law 8 kHz: one byte per sample, 8 samples per millisecond.
const BYTES_PER_MS: usize = 8;
/// Twilio plays μ-law silence for this byte value.
const MULAW_SILENCE: u8 = 0xFF;
/// Chunks must be whole multiples of Twilio's 20 ms frame.
const FRAME_MS: u32 = 20;
/// Responses remembered so late deltas of interrupted ones can be recognised; the oldest is
/// forgotten first (a response dozens of turns old no longer sends deltas).
const MAX_TRACKED_RESPONSES: usize = 32;
/// Items of the current generation kept for mark accounting; finished items are forgotten oldest
/// first beyond this (their late mark echoes then count as unknown, which is harmless). When
/// every tracked item still has audio queued, a delta starting yet another item is dropped
/// (counted in `queued_bytes_dropped`): a model cannot make playback track items without bound.
const MAX_TRACKED_ITEMS: usize = 32;
/// Runs of queued audio (a new one starts whenever the item changes). A few in practice; a
/// model alternating items on every delta would otherwise make one per delta. Beyond this a
/// delta that needs a new run is dropped (counted in `queued_bytes_dropped`), which also bounds
/// the work of every scan over them.
const MAX_QUEUED_SEGMENTS: usize = 256;

/// Faults in configuration or in a mark name echoed back to us.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlaybackError {
    #[error("chunk_ms must be a positive multiple of {FRAME_MS}, got {0}")]
    InvalidChunkMs(u32),
    #[error("mark name {0:?} is not `generation:item:ms`")]
    MalformedMark(String),
}

#[derive(Clone, Debug)]
pub struct PlaybackConfig {
    /// How much sent-but-unplayed audio may sit at Twilio; bounds what a `clear` has to discard.
    pub lead: Duration,
    /// Outbound chunk length; a positive multiple of 20 ms.
    pub chunk_ms: u32,
    /// Capacity of the queue of audio not yet sent. Overflow policy: the newest audio is dropped
    /// (counted in `queued_bytes_dropped`). The queue is not lag (the model simply produces
    /// faster than real time), so dropping the oldest would cut the middle of a sentence without
    /// lowering latency; dropping the tail keeps every truncate position within what the model
    /// produced.
    pub max_queued: Duration,
}

impl Default for PlaybackConfig {
    fn default() -> Self {
        Self {
            lead: Duration::from_millis(120),
            chunk_ms: FRAME_MS,
            max_queued: Duration::from_secs(300),
        }
    }
}

impl PlaybackConfig {
    /// Checks what [`Playback::new`] would otherwise silently round.
    pub fn validate(&self) -> Result<(), PlaybackError> {
        if self.chunk_ms == 0 || !self.chunk_ms.is_multiple_of(FRAME_MS) {
            return Err(PlaybackError::InvalidChunkMs(self.chunk_ms));
        }
        Ok(())
    }
}

/// One outbound chunk: send `payload` as a Twilio `media` message, then a `mark` named `mark`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit<'a> {
    pub payload: &'a [u8],
    pub mark: &'a str,
    pub item_id: &'a str,
    /// Cumulative ms of `item_id` sent, this chunk included.
    pub item_ms: u32,
    /// When Twilio is estimated to start playing this chunk: after everything sent before it,
    /// and never before it was sent.
    pub play_at: Instant,
}

/// What barge-in requires. The caller sends Twilio `clear` first, then the model commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interruption {
    pub truncate: Option<Truncate>,
    pub delete: Vec<String>,
    pub interrupted_response: Option<String>,
    pub cancel_response: bool,
}

/// `conversation.item.truncate {item_id, content_index: 0, audio_end_ms}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    pub item_id: String,
    pub audio_end_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkOutcome {
    /// A mark of the current generation: `item_id` has played at least `ms`. The id is shared
    /// with playback's own record (a mark echo every 20 ms costs no copy of it).
    Confirmed { item_id: Arc<str>, ms: u32 },
    /// A mark of an older generation (typically Twilio's answer to a `clear`): ignored.
    Stale,
    /// Not a name we could have sent, or an item no longer tracked: ignored.
    Unknown,
}

#[derive(Default, Clone, Debug)]
pub struct PlaybackCounters {
    pub chunks_sent: u64,
    pub bytes_sent: u64,
    pub interruptions: u64,
    pub late_deltas_dropped: u64,
    pub stale_marks: u64,
    pub unknown_marks: u64,
    /// Queued audio discarded: by barge-in, or by queue overflow.
    pub queued_bytes_dropped: u64,
}

/// An assistant item of the current generation, in playback order.
#[derive(Debug)]
struct Item {
    /// Per-call index used in mark names instead of the (long) item id.
    seq: u32,
    item_id: Arc<str>,
    response_id: String,
    sent_ms: u32,
    /// Estimated time Twilio starts playing this item's first chunk.
    play_start: Option<Instant>,
    confirmed_ms: u32,
    confirmed_at: Option<Instant>,
}

impl Item {
    /// Rule 3: position heard at `now`, never above what was sent.
    fn heard_ms(&self, now: Instant) -> u32 {
        let (base, since) = match (self.confirmed_at, self.play_start) {
            (Some(at), _) => (self.confirmed_ms, at),
            (None, Some(start)) => (0, start),
            (None, None) => return 0,
        };
        let elapsed =
            u32::try_from(now.saturating_duration_since(since).as_millis()).unwrap_or(u32::MAX);
        base.saturating_add(elapsed).min(self.sent_ms)
    }

    fn has_started(&self, now: Instant) -> bool {
        self.confirmed_at.is_some() || self.play_start.is_some_and(|start| start <= now)
    }
}

/// A run of queued bytes of one item; bytes live in `Playback::audio` in segment order.
#[derive(Debug)]
struct Segment {
    item_seq: u32,
    len: usize,
    /// No more audio will be appended; `len` is then a whole number of chunks.
    closed: bool,
}

#[derive(Debug)]
struct ResponseState {
    id: String,
    done: bool,
    interrupted: bool,
}

/// A parsed mark name `generation:item_seq:ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MarkName {
    generation: u32,
    item_seq: u32,
    ms: u32,
}

fn parse_mark_name(name: &str) -> Result<MarkName, PlaybackError> {
    let malformed = || PlaybackError::MalformedMark(name.chars().take(64).collect());
    let mut parts = name.split(':');
    let mut field = || -> Result<u32, PlaybackError> {
        let part = parts.next().ok_or_else(malformed)?;
        // `u32::from_str` accepts a leading '+', which we never send.
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed());
        }
        part.parse().map_err(|_| malformed())
    };
    let mark = MarkName {
        generation: field()?,
        item_seq: field()?,
        ms: field()?,
    };
    if parts.next().is_some() {
        return Err(malformed());
    }
    Ok(mark)
}

/// The playback state machine of one call. Feed it `on_*` events; drain `poll_transmit` until
/// `None` whenever time passes or audio arrives, and wake up again at `poll_timeout`.
#[derive(Debug)]
pub struct Playback {
    chunk_ms: u32,
    chunk_bytes: usize,
    chunk_duration: Duration,
    /// A chunk may be sent while at most this much audio is buffered at Twilio, so that after
    /// sending, at most `lead` is.
    send_below: Duration,
    max_queued_bytes: usize,
    server_interrupts_response: bool,
    generation: u32,
    next_item_seq: u32,
    items: Vec<Item>,
    segments: VecDeque<Segment>,
    audio: VecDeque<u8>,
    responses: VecDeque<ResponseState>,
    /// Estimated time Twilio finishes playing everything sent.
    play_end: Option<Instant>,
    last_now: Option<Instant>,
    payload: Vec<u8>,
    mark: String,
    counters: PlaybackCounters,
}

impl Playback {
    /// An invalid `chunk_ms` is rounded down to a multiple of 20 ms (at least 20); use
    /// [`PlaybackConfig::validate`] to reject it instead. A lead below one chunk acts as one chunk.
    pub fn new(config: PlaybackConfig) -> Self {
        let chunk_ms = (config.chunk_ms / FRAME_MS).max(1) * FRAME_MS;
        let chunk_bytes = chunk_ms as usize * BYTES_PER_MS;
        let chunk_duration = Duration::from_millis(u64::from(chunk_ms));
        let max_queued_ms = usize::try_from(config.max_queued.as_millis()).unwrap_or(usize::MAX);
        Self {
            chunk_ms,
            chunk_bytes,
            chunk_duration,
            send_below: config.lead.saturating_sub(chunk_duration),
            max_queued_bytes: max_queued_ms.saturating_mul(BYTES_PER_MS),
            server_interrupts_response: true,
            generation: 0,
            next_item_seq: 0,
            items: Vec::new(),
            segments: VecDeque::new(),
            audio: VecDeque::new(),
            responses: VecDeque::new(),
            play_end: None,
            last_now: None,
            payload: Vec::with_capacity(chunk_bytes),
            mark: String::with_capacity(24),
            counters: PlaybackCounters::default(),
        }
    }

    // --- getters ---

    pub fn generation(&self) -> u32 {
        self.generation
    }

    pub fn counters(&self) -> &PlaybackCounters {
        &self.counters
    }

    /// Audio queued and not yet sent, partial chunks included.
    pub fn queued_ms(&self) -> u32 {
        u32::try_from(self.audio.len() / BYTES_PER_MS).unwrap_or(u32::MAX)
    }

    /// Is assistant audio playing (sent and not yet estimated to have finished) or queued?
    pub fn is_active(&self, now: Instant) -> bool {
        !self.audio.is_empty() || self.play_end.is_some_and(|end| end > now)
    }

    /// Heard position of the item currently playing (rule 3), for metrics/tests.
    pub fn heard_ms(&self, now: Instant) -> Option<(String, u32)> {
        let index = self.playing_index(now)?;
        let item = &self.items[index];
        Some((item.item_id.to_string(), item.heard_ms(now)))
    }

    // --- handle_* ---

    /// Session option: with server_vad `interrupt_response: true` (the default) the server
    /// cancels the response itself; with false, [`Interruption::cancel_response`] is true.
    pub fn set_server_interrupts_response(&mut self, yes: bool) {
        self.server_interrupts_response = yes;
    }

    pub fn on_response_created(&mut self, response_id: &str) {
        self.response_mut(response_id);
    }

    /// Queue model audio (μ-law bytes) for item `item_id` of response `response_id`. Returns
    /// false when the delta is dropped: it belongs to an interrupted response (counted in
    /// `late_deltas_dropped`), or the queue is full, or it would start an item or a run of
    /// audio past `MAX_TRACKED_ITEMS` or `MAX_QUEUED_SEGMENTS` (counted in
    /// `queued_bytes_dropped`).
    pub fn on_audio_delta(
        &mut self,
        now: Instant,
        response_id: &str,
        item_id: &str,
        mulaw: &[u8],
    ) -> bool {
        self.observe(now);
        if self.response_mut(response_id).interrupted {
            self.counters.late_deltas_dropped += 1;
            return false;
        }
        if mulaw.is_empty() {
            return true;
        }
        let room = self.max_queued_bytes.saturating_sub(self.audio.len());
        let accepted = mulaw.len().min(room);
        let overflow = mulaw.len() - accepted;
        self.counters.queued_bytes_dropped += overflow as u64;
        if accepted == 0 {
            return false;
        }

        let known = self
            .items
            .iter()
            .find(|item| *item.item_id == *item_id)
            .map(|item| item.seq);
        let appends_to_last = known.is_some_and(|seq| {
            self.segments
                .back()
                .is_some_and(|segment| segment.item_seq == seq && !segment.closed)
        });
        let item_seq = match known {
            _ if !appends_to_last && self.segments.len() >= MAX_QUEUED_SEGMENTS => None,
            Some(seq) => Some(seq),
            None => self.start_item(response_id, item_id),
        };
        let Some(item_seq) = item_seq else {
            self.counters.queued_bytes_dropped += accepted as u64;
            return false;
        };
        if !appends_to_last {
            // Chunks never mix items, so the previous item's partial chunk is finished with silence.
            self.close_last_segment();
            self.segments.push_back(Segment {
                item_seq,
                len: 0,
                closed: false,
            });
        }
        self.audio.extend(&mulaw[..accepted]);
        if let Some(segment) = self.segments.back_mut() {
            segment.len += accepted;
        }
        overflow == 0
    }

    /// The response is complete: pad its last partial chunk with μ-law silence (0xFF) to a whole
    /// chunk so it can be sent.
    pub fn on_response_done(&mut self, response_id: &str) {
        self.response_mut(response_id).done = true;
        let last_is_this_response = self.segments.back().is_some_and(|segment| {
            self.items
                .iter()
                .any(|item| item.seq == segment.item_seq && item.response_id == response_id)
        });
        if last_is_this_response {
            self.close_last_segment();
        }
    }

    /// A Twilio mark echo.
    pub fn on_mark(&mut self, now: Instant, name: &str) -> MarkOutcome {
        self.observe(now);
        let Ok(mark) = parse_mark_name(name) else {
            self.counters.unknown_marks += 1;
            return MarkOutcome::Unknown;
        };
        if mark.generation < self.generation {
            self.counters.stale_marks += 1;
            return MarkOutcome::Stale;
        }
        let item = self
            .items
            .iter_mut()
            .find(|item| item.seq == mark.item_seq)
            .filter(|item| mark.generation == self.generation && mark.ms <= item.sent_ms);
        let Some(item) = item else {
            self.counters.unknown_marks += 1;
            return MarkOutcome::Unknown;
        };
        if mark.ms > item.confirmed_ms || item.confirmed_at.is_none() {
            item.confirmed_ms = mark.ms;
            item.confirmed_at = Some(now);
        }
        MarkOutcome::Confirmed {
            item_id: Arc::clone(&item.item_id),
            ms: mark.ms,
        }
    }

    /// `input_audio_buffer.speech_started`. `None` (rule 5) when nothing is playing or queued
    /// and no response with audio in this generation is still running; else the
    /// [`Interruption`], after which the generation is bumped, the queue is dropped and
    /// late deltas of the interrupted response(s) are ignored.
    pub fn on_speech_started(&mut self, now: Instant) -> Option<Interruption> {
        self.observe(now);
        // Rule 5 extended: a response still producing audio for an item we started playing is
        // interrupted even if the pacer ran dry for a moment, or its next deltas would play
        // over the caller and the model would believe it said all of them.
        let response_running = self.items.iter().any(|item| {
            self.responses
                .iter()
                .any(|r| r.id == item.response_id && !r.done)
        });
        if !self.is_active(now) && !response_running {
            return None;
        }
        let playing = self.playing_index(now);
        let mut truncate = None;
        if let Some(index) = playing {
            let item = &self.items[index];
            let heard = item.heard_ms(now);
            let has_queued = self.segments.iter().any(|s| s.item_seq == item.seq);
            let response_done = self
                .responses
                .iter()
                .any(|r| r.id == item.response_id && r.done);
            // An item heard to its very end with nothing more to come needs no truncate.
            let fully_played = heard == item.sent_ms && !has_queued && response_done;
            if !fully_played {
                truncate = Some(Truncate {
                    item_id: item.item_id.to_string(),
                    audio_end_ms: heard,
                });
            }
        }
        // Everything after the playing item is, by the pacing estimate, not yet heard.
        let unheard_from = playing.map_or(0, |index| index + 1);
        let delete: Vec<String> = self.items[unheard_from..]
            .iter()
            .map(|item| item.item_id.to_string())
            .collect();

        let mut affected: Vec<&str> = Vec::new();
        if let Some(index) = playing.filter(|_| truncate.is_some()) {
            affected.push(&self.items[index].response_id);
        }
        affected.extend(
            self.items[unheard_from..]
                .iter()
                .map(|i| i.response_id.as_str()),
        );
        let in_progress = self.responses.iter().rev().find(|r| !r.done);
        let interrupted_response = in_progress
            .map(|r| r.id.clone())
            .or_else(|| affected.last().map(|id| (*id).to_owned()));
        for response in &mut self.responses {
            if !response.done || affected.contains(&response.id.as_str()) {
                response.interrupted = true;
            }
        }

        self.counters.interruptions += 1;
        self.counters.queued_bytes_dropped += self.audio.len() as u64;
        self.audio.clear();
        self.segments.clear();
        self.items.clear();
        self.generation = self.generation.wrapping_add(1);
        self.play_end = Some(now);
        Some(Interruption {
            truncate,
            delete,
            interrupted_response,
            cancel_response: !self.server_interrupts_response,
        })
    }

    // --- poll_* ---

    /// Next chunk the lead allows at `now`, if any. Call repeatedly until `None`. The borrow is
    /// valid until the next `&mut` call; payload and mark name live in reused buffers.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit<'_>> {
        self.observe(now);
        self.drop_empty_closed_segments();
        let segment = self.segments.front()?;
        if segment.len < self.chunk_bytes {
            // Partial chunk of an open item: wait for more audio or the end of the response.
            return None;
        }
        let buffered = self
            .play_end
            .map_or(Duration::ZERO, |end| end.saturating_duration_since(now));
        if buffered > self.send_below {
            return None;
        }
        let item_seq = segment.item_seq;
        let Some(item_index) = self.items.iter().position(|item| item.seq == item_seq) else {
            // Unreachable by construction (items with queued audio are never forgotten); drop
            // the orphaned audio rather than panic.
            let len = segment.len;
            self.audio.drain(..len);
            self.counters.queued_bytes_dropped += len as u64;
            self.segments.pop_front();
            return self.poll_transmit(now);
        };

        self.payload.clear();
        self.payload.extend(self.audio.drain(..self.chunk_bytes));
        if let Some(segment) = self.segments.front_mut() {
            segment.len -= self.chunk_bytes;
        }
        let start = self.play_end.map_or(now, |end| end.max(now));
        let end = start + self.chunk_duration;
        self.play_end = Some(end);
        let item = &mut self.items[item_index];
        item.play_start.get_or_insert(start);
        item.sent_ms = item.sent_ms.saturating_add(self.chunk_ms);
        self.counters.chunks_sent += 1;
        self.counters.bytes_sent += self.chunk_bytes as u64;
        self.mark.clear();
        // Writing to a String cannot fail.
        let _ = write!(
            self.mark,
            "{}:{}:{}",
            self.generation, item.seq, item.sent_ms
        );
        self.drop_empty_closed_segments();
        let item = &self.items[item_index];
        Some(Transmit {
            payload: &self.payload,
            mark: &self.mark,
            item_id: &item.item_id,
            item_ms: item.sent_ms,
            play_at: start,
        })
    }

    /// When `poll_transmit` should be called next: `None` when nothing is queued or only a
    /// partial chunk is (more audio or `on_response_done` must come first). At exactly this
    /// instant a chunk is sendable and, unless it is the latest `now` we were given (already
    /// due), a nanosecond earlier it is not.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let ready = self
            .segments
            .iter()
            .find(|segment| !(segment.closed && segment.len == 0))
            .is_some_and(|segment| segment.len >= self.chunk_bytes);
        if !ready {
            return None;
        }
        let Some(end) = self.play_end else {
            return self.last_now;
        };
        // A due time already past is reported as the latest time we were given, so drivers
        // see "now" rather than an arbitrary past instant (or one before the clock's origin).
        let due = end.checked_sub(self.send_below);
        match (due, self.last_now) {
            (Some(due), Some(last)) => Some(due.max(last)),
            (Some(due), None) => Some(due),
            (None, last) => last.or(Some(end)),
        }
    }

    // --- internals ---

    fn observe(&mut self, now: Instant) {
        self.last_now = Some(self.last_now.map_or(now, |last| last.max(now)));
        if self.play_end.is_none() {
            self.play_end = Some(now);
        }
    }

    /// The item playing at `now`: the latest one that has (by estimate or by a mark) started.
    fn playing_index(&self, now: Instant) -> Option<usize> {
        self.items.iter().rposition(|item| item.has_started(now))
    }

    /// The model session was replaced: what playback remembers of the old session's
    /// responses goes, except for those whose audio is still tracked, so a new session that
    /// reuses an id (ids are only unique within a session) starts clean.
    pub fn on_session_replaced(&mut self) {
        let items = &self.items;
        self.responses
            .retain(|response| items.iter().any(|item| item.response_id == response.id));
    }

    fn response_mut(&mut self, response_id: &str) -> &mut ResponseState {
        let index = match self.responses.iter().position(|r| r.id == response_id) {
            Some(index) => index,
            None => {
                if self.responses.len() == MAX_TRACKED_RESPONSES {
                    self.responses.pop_front();
                }
                self.responses.push_back(ResponseState {
                    id: response_id.to_owned(),
                    done: false,
                    interrupted: false,
                });
                self.responses.len() - 1
            }
        };
        &mut self.responses[index]
    }

    /// Tracks a new item; `None` when [`MAX_TRACKED_ITEMS`] are tracked and each still has
    /// audio queued (none can be forgotten).
    fn start_item(&mut self, response_id: &str, item_id: &str) -> Option<u32> {
        if self.items.len() >= MAX_TRACKED_ITEMS {
            let segments = &self.segments;
            let index = self
                .items
                .iter()
                .position(|item| !segments.iter().any(|s| s.item_seq == item.seq))?;
            self.items.remove(index);
        }
        let seq = self.next_item_seq;
        self.next_item_seq = self.next_item_seq.wrapping_add(1);
        self.items.push(Item {
            seq,
            item_id: Arc::from(item_id),
            response_id: response_id.to_owned(),
            sent_ms: 0,
            play_start: None,
            confirmed_ms: 0,
            confirmed_at: None,
        });
        Some(seq)
    }

    /// Pads the last segment to a whole chunk with silence and closes it.
    fn close_last_segment(&mut self) {
        let Some(segment) = self.segments.back_mut() else {
            return;
        };
        if segment.closed {
            return;
        }
        let partial = segment.len % self.chunk_bytes;
        if partial != 0 {
            let padding = self.chunk_bytes - partial;
            self.audio
                .extend(std::iter::repeat_n(MULAW_SILENCE, padding));
            segment.len += padding;
        }
        segment.closed = true;
    }

    fn drop_empty_closed_segments(&mut self) {
        while self
            .segments
            .front()
            .is_some_and(|segment| segment.closed && segment.len == 0)
        {
            self.segments.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const LEAD_MS: u64 = 120;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn audio(duration_ms: usize) -> Vec<u8> {
        // Not silence, so padding is distinguishable from audio.
        (0..duration_ms * BYTES_PER_MS)
            .map(|i| (i % 200) as u8)
            .collect()
    }

    /// An owned copy of a `Transmit`, with when Twilio is estimated to finish playing it.
    #[derive(Debug, Clone)]
    struct Sent {
        payload: Vec<u8>,
        mark: String,
        item_id: String,
        item_ms: u32,
        played_at: Instant,
    }

    /// Drives a `Playback` in virtual time against a simulated Twilio that plays chunks in order
    /// and echoes each mark `latency` after the audio before it has played.
    struct Harness {
        t0: Instant,
        pb: Playback,
        sent: Vec<Sent>,
        /// Marks Twilio has not echoed yet, in order.
        pending_echoes: VecDeque<Sent>,
        twilio_end: Instant,
        latency: Duration,
        max_buffered: Duration,
    }

    impl Harness {
        fn new(latency_ms: u64) -> Self {
            let t0 = Instant::now();
            Self {
                t0,
                pb: Playback::new(PlaybackConfig::default()),
                sent: Vec::new(),
                pending_echoes: VecDeque::new(),
                twilio_end: t0,
                latency: ms(latency_ms),
                max_buffered: Duration::ZERO,
            }
        }

        fn at(&self, t_ms: u64) -> Instant {
            self.t0 + ms(t_ms)
        }

        /// Drains `poll_transmit` at `now`; returns how many chunks were sent.
        fn pump_at(&mut self, now: Instant) -> usize {
            let mut count = 0;
            while let Some(tx) = self.pb.poll_transmit(now) {
                assert_eq!(tx.payload.len(), 160, "chunks are 20 ms");
                self.twilio_end = self.twilio_end.max(now) + ms(20);
                let sent = Sent {
                    payload: tx.payload.to_vec(),
                    mark: tx.mark.to_owned(),
                    item_id: tx.item_id.to_owned(),
                    item_ms: tx.item_ms,
                    played_at: self.twilio_end,
                };
                self.pending_echoes.push_back(sent.clone());
                self.sent.push(sent);
                self.max_buffered = self.max_buffered.max(self.twilio_end - now);
                count += 1;
            }
            count
        }

        fn pump(&mut self, t_ms: u64) -> usize {
            self.pump_at(self.at(t_ms))
        }

        /// Delivers the mark echoes due by `t_ms`, then pumps.
        fn step(&mut self, t_ms: u64) {
            let now = self.at(t_ms);
            while self
                .pending_echoes
                .front()
                .is_some_and(|s| s.played_at + self.latency <= now)
            {
                let Some(echo) = self.pending_echoes.pop_front() else {
                    break;
                };
                let outcome = self.pb.on_mark(now, &echo.mark);
                assert_eq!(
                    outcome,
                    MarkOutcome::Confirmed {
                        item_id: echo.item_id.as_str().into(),
                        ms: echo.item_ms
                    }
                );
            }
            self.pump_at(now);
        }

        fn run(&mut self, from_ms: u64, to_ms: u64) {
            for t in from_ms..=to_ms {
                self.step(t);
            }
        }

        /// Twilio's answer to `clear`: every outstanding mark echoed at once.
        fn clear(&mut self, t_ms: u64) -> Vec<MarkOutcome> {
            let now = self.at(t_ms);
            self.twilio_end = now;
            let echoes: Vec<Sent> = self.pending_echoes.drain(..).collect();
            echoes
                .iter()
                .map(|e| self.pb.on_mark(now, &e.mark))
                .collect()
        }

        fn sent_ms_of(&self, item_id: &str) -> u32 {
            self.sent
                .iter()
                .rev()
                .find(|s| s.item_id == item_id)
                .map_or(0, |s| s.item_ms)
        }
    }

    /// Golden trace 1 up to and including the barge-in; returns the harness for trace 4.
    fn play_trace_1() -> (Harness, Interruption) {
        let mut h = Harness::new(10);
        let t = h.at(0);
        h.pb.on_response_created("r1");
        assert!(h.pb.on_audio_delta(t, "r1", "A", &audio(1000)));
        h.run(0, 420);

        let sent_a = h.sent_ms_of("A");
        assert_eq!(sent_a, 420 + LEAD_MS as u32, "lead ahead of real time");
        for (i, s) in h.sent.iter().enumerate() {
            let mark = parse_mark_name(&s.mark).expect("our own mark parses");
            assert_eq!(mark.generation, 0);
            assert_eq!(mark.ms, 20 * (i as u32 + 1));
            assert_eq!(s.item_ms, mark.ms);
            assert_eq!(s.item_id, "A");
        }
        assert_eq!(h.pb.heard_ms(h.at(420)), Some(("A".to_owned(), 410)));

        let interruption = h.pb.on_speech_started(h.at(420)).expect("audio is playing");
        (h, interruption)
    }

    #[test]
    fn a_model_cannot_make_playback_track_items_or_runs_without_bound() {
        let mut h = Harness::new(10);
        let t = h.at(0);
        h.pb.on_response_created("r1");
        let began = std::time::Instant::now();
        // A new item on every delta, none of which can be sent yet (each is a partial chunk).
        let mut accepted = 0;
        for i in 0..10_000 {
            accepted += usize::from(h.pb.on_audio_delta(t, "r1", &format!("item{i}"), &[0x55]));
        }
        assert_eq!(accepted, MAX_TRACKED_ITEMS);
        assert!(h.pb.items.len() <= MAX_TRACKED_ITEMS);
        assert_eq!(
            h.pb.counters().queued_bytes_dropped,
            (10_000 - MAX_TRACKED_ITEMS) as u64
        );
        // Two items taking turns: every delta would open a new run.
        let mut h = Harness::new(10);
        h.pb.on_response_created("r2");
        for i in 0..10_000 {
            let item = if i % 2 == 0 { "even" } else { "odd" };
            h.pb.on_audio_delta(t, "r2", item, &[0x55]);
        }
        assert!(h.pb.segments.len() <= MAX_QUEUED_SEGMENTS);
        assert!(began.elapsed() < std::time::Duration::from_secs(2));
        // Nothing is stuck: once the queue drains, new items play again.
        let interruption = h.pb.on_speech_started(h.at(10));
        assert!(interruption.is_some());
        h.pb.on_response_created("r3");
        assert!(h.pb.on_audio_delta(h.at(20), "r3", "fresh", &audio(100)));
    }

    #[test]
    fn trace_1_interrupt_mid_sentence() {
        let (mut h, interruption) = play_trace_1();
        assert_eq!(
            interruption,
            Interruption {
                truncate: Some(Truncate {
                    item_id: "A".into(),
                    audio_end_ms: 410
                }),
                delete: vec![],
                interrupted_response: Some("r1".into()),
                cancel_response: false,
            }
        );
        assert_eq!(h.pb.generation(), 1);
        assert_eq!(h.pb.queued_ms(), 0);
        assert!(!h.pb.is_active(h.at(420)));
        assert_eq!(h.pb.poll_transmit(h.at(421)).map(|t| t.item_ms), None);

        // Late deltas of r1 are dropped, and counted.
        assert!(!h.pb.on_audio_delta(h.at(425), "r1", "A", &audio(100)));
        assert_eq!(h.pb.queued_ms(), 0);

        // Twilio's answer to the clear: marks 420..=540 of generation 0 change nothing.
        let outcomes = h.clear(430);
        assert_eq!(outcomes, vec![MarkOutcome::Stale; 7]);
        assert_eq!(h.pb.heard_ms(h.at(430)), None);
        assert!(!h.pb.is_active(h.at(430)));

        let c = h.pb.counters();
        assert_eq!(c.chunks_sent, 27);
        assert_eq!(c.bytes_sent, 27 * 160);
        assert_eq!(c.queued_bytes_dropped, 8000 - 27 * 160);
        assert_eq!(c.interruptions, 1);
        assert_eq!(c.late_deltas_dropped, 1);
        assert_eq!(c.stale_marks, 7);
        assert_eq!(c.unknown_marks, 0);
    }

    #[test]
    fn trace_2_interrupt_before_any_playback() {
        let mut h = Harness::new(10);
        h.pb.on_response_created("r0");
        assert!(h.pb.on_audio_delta(h.at(0), "r0", "G", &audio(1000)));
        assert_eq!(h.pump(0), 6);
        assert_eq!(h.sent_ms_of("G"), 120);
        let interruption =
            h.pb.on_speech_started(h.at(5))
                .expect("greeting is playing");
        assert_eq!(
            interruption.truncate,
            Some(Truncate {
                item_id: "G".into(),
                audio_end_ms: 5
            })
        );
        assert!(interruption.delete.is_empty());
        assert_eq!(interruption.interrupted_response.as_deref(), Some("r0"));
    }

    #[test]
    fn trace_2_heard_never_exceeds_sent_when_the_driver_stalls() {
        let mut h = Harness::new(10);
        assert!(h.pb.on_audio_delta(h.at(0), "r0", "G", &audio(1000)));
        assert_eq!(h.pump(0), 6);
        // No poll for 200 ms: only 120 ms went out, so at most 120 ms can have been heard.
        let interruption = h.pb.on_speech_started(h.at(200)).expect("audio is queued");
        assert_eq!(
            interruption.truncate,
            Some(Truncate {
                item_id: "G".into(),
                audio_end_ms: 120
            })
        );
    }

    #[test]
    fn trace_3_two_items_second_never_heard() {
        let mut h = Harness::new(0);
        h.pb.on_response_created("r2");
        assert!(h.pb.on_audio_delta(h.at(400), "r2", "B", &audio(600)));
        h.run(400, 900);
        assert_eq!(h.sent_ms_of("B"), 600);
        assert!(h.pb.on_audio_delta(h.at(900), "r2", "C", &audio(300)));
        assert_eq!(h.sent_ms_of("C"), 0);
        assert_eq!(h.pb.heard_ms(h.at(900)), Some(("B".to_owned(), 500)));

        let interruption = h.pb.on_speech_started(h.at(900)).expect("B is playing");
        assert_eq!(
            interruption,
            Interruption {
                truncate: Some(Truncate {
                    item_id: "B".into(),
                    audio_end_ms: 500
                }),
                delete: vec!["C".into()],
                interrupted_response: Some("r2".into()),
                cancel_response: false,
            }
        );
        assert_eq!(h.pb.counters().queued_bytes_dropped, 300 * 8);
    }

    #[test]
    fn trace_4_two_barge_ins_in_a_row() {
        let (mut h, _) = play_trace_1();
        h.clear(420);
        h.latency = ms(0);
        h.pb.on_response_created("r3");
        assert!(h.pb.on_audio_delta(h.at(500), "r3", "D", &audio(400)));
        h.run(500, 650);
        // Marks of generation 0 with D's per-call index or larger positions never count for D.
        let d_seq = parse_mark_name(&h.sent.last().expect("D was sent").mark)
            .expect("parses")
            .item_seq;
        assert_eq!(
            h.pb.on_mark(h.at(650), &format!("0:{d_seq}:380")),
            MarkOutcome::Stale
        );
        assert_eq!(h.pb.on_mark(h.at(650), "0:0:1000"), MarkOutcome::Stale);
        h.run(651, 700);
        assert_eq!(h.pb.heard_ms(h.at(700)), Some(("D".to_owned(), 200)));

        let interruption = h.pb.on_speech_started(h.at(700)).expect("D is playing");
        assert_eq!(
            interruption,
            Interruption {
                truncate: Some(Truncate {
                    item_id: "D".into(),
                    audio_end_ms: 200
                }),
                delete: vec![],
                interrupted_response: Some("r3".into()),
                cancel_response: false,
            }
        );
        assert_eq!(h.pb.generation(), 2);
        assert_eq!(h.pb.counters().interruptions, 2);
        assert!(
            h.sent
                .iter()
                .filter(|s| s.item_id == "D")
                .all(|s| s.mark.starts_with("1:"))
        );
    }

    #[test]
    fn trace_5_speech_while_silent_does_nothing() {
        let mut h = Harness::new(10);
        h.pb.on_response_created("r1");
        assert!(h.pb.on_audio_delta(h.at(0), "r1", "A", &audio(200)));
        h.pb.on_response_done("r1");
        h.run(0, 300);
        assert!(h.pending_echoes.is_empty(), "all marks confirmed");
        assert!(!h.pb.is_active(h.at(300)));
        assert_eq!(h.pb.on_speech_started(h.at(300)), None);
        assert_eq!(h.pb.generation(), 0);
        assert_eq!(h.pb.counters().interruptions, 0);
        // The next response still plays in generation 0.
        assert!(h.pb.on_audio_delta(h.at(400), "r2", "B", &audio(40)));
        assert_eq!(h.pump(400), 2);
        assert!(h.sent.last().is_some_and(|s| s.mark.starts_with("0:")));
    }

    #[test]
    fn trace_6_stale_marks_never_raise_confirmed() {
        let mut h = Harness::new(0);
        assert!(h.pb.on_audio_delta(h.at(0), "r1", "A", &audio(1000)));
        h.run(0, 300);
        assert!(h.pb.on_speech_started(h.at(300)).is_some());
        let old_marks: Vec<String> = h.pending_echoes.drain(..).map(|s| s.mark).collect();
        h.twilio_end = h.at(300);

        assert!(h.pb.on_audio_delta(h.at(300), "r2", "X", &audio(500)));
        h.run(300, 400);
        assert_eq!(h.pb.heard_ms(h.at(400)), Some(("X".to_owned(), 100)));
        let x_seq = parse_mark_name(&h.sent.last().expect("X sent").mark)
            .expect("parses")
            .item_seq;

        for mark in old_marks
            .iter()
            .cloned()
            .chain([format!("0:{x_seq}:480"), "0:0:1000".to_owned()])
        {
            assert_eq!(h.pb.on_mark(h.at(400), &mark), MarkOutcome::Stale);
        }
        assert_eq!(h.pb.heard_ms(h.at(400)), Some(("X".to_owned(), 100)));
        assert_eq!(h.pb.counters().stale_marks, old_marks.len() as u64 + 2);

        // An out-of-order echo of the current generation does not lower or re-time the position.
        assert_eq!(
            h.pb.on_mark(h.at(400), &format!("1:{x_seq}:60")),
            MarkOutcome::Confirmed {
                item_id: "X".into(),
                ms: 60
            }
        );
        assert_eq!(h.pb.heard_ms(h.at(400)), Some(("X".to_owned(), 100)));

        // Names we could not have sent are unknown and harmless.
        let sent_x = h.sent_ms_of("X");
        for bogus in [
            "",
            "garbage",
            "1:99:20",
            "7:0:20",
            "1:1:20:5",
            "+1:1:20",
            "1:-1:20",
            "1::20",
            "99999999999:1:20",
            &format!("1:{x_seq}:{}", sent_x + 20),
        ] {
            assert_eq!(
                h.pb.on_mark(h.at(400), bogus),
                MarkOutcome::Unknown,
                "{bogus:?}"
            );
        }
        assert_eq!(h.pb.counters().unknown_marks, 10);
        assert_eq!(h.pb.heard_ms(h.at(400)), Some(("X".to_owned(), 100)));
    }

    #[test]
    fn barge_in_during_the_greeting_then_next_response_plays() {
        let mut h = Harness::new(20);
        h.pb.on_response_created("greet");
        let greeting = audio(2000);
        // The greeting arrives in uneven deltas, faster than real time, and is not done.
        let mut offset = 0;
        for (t, size) in [(0, 1200), (30, 777), (60, 3001), (90, 2500)] {
            assert!(h.pb.on_audio_delta(h.at(t), "greet", "G", &greeting[offset..offset + size]));
            offset += size;
            h.run(t, t + 29);
        }
        h.run(120, 700);
        assert_eq!(h.pb.heard_ms(h.at(700)), Some(("G".to_owned(), 680)));
        let interruption = h.pb.on_speech_started(h.at(700)).expect("greeting playing");
        assert_eq!(
            interruption,
            Interruption {
                truncate: Some(Truncate {
                    item_id: "G".into(),
                    audio_end_ms: 680
                }),
                delete: vec![],
                interrupted_response: Some("greet".into()),
                cancel_response: false,
            }
        );
        assert!(h.clear(700).iter().all(|o| *o == MarkOutcome::Stale));
        assert!(
            !h.pb
                .on_audio_delta(h.at(710), "greet", "G", &greeting[offset..])
        );
        h.pb.on_response_done("greet");

        // Rule 6: a new response id is accepted in the new generation.
        h.pb.on_response_created("r1");
        assert!(h.pb.on_audio_delta(h.at(900), "r1", "A", &audio(100)));
        h.pb.on_response_done("r1");
        h.run(900, 1100);
        let a: Vec<&Sent> = h.sent.iter().filter(|s| s.item_id == "A").collect();
        assert_eq!(a.len(), 5);
        assert!(a.iter().all(|s| s.mark.starts_with("1:")));
        assert!(h.pending_echoes.is_empty());
    }

    #[test]
    fn second_speech_started_right_after_a_barge_in_does_nothing() {
        let mut h = Harness::new(0);
        h.pb.set_server_interrupts_response(false);
        assert!(h.pb.on_audio_delta(h.at(0), "r1", "A", &audio(500)));
        h.run(0, 100);
        let first = h.pb.on_speech_started(h.at(100)).expect("playing");
        assert!(
            first.cancel_response,
            "interrupt_response=false needs response.cancel"
        );
        assert_eq!(h.pb.on_speech_started(h.at(101)), None);
        assert_eq!(h.pb.generation(), 1);
        assert_eq!(h.pb.counters().interruptions, 1);
    }

    #[test]
    fn clear_echoes_of_many_items_change_nothing() {
        let mut h = Harness::new(30);
        assert!(h.pb.on_audio_delta(h.at(0), "r1", "A", &audio(60)));
        assert!(h.pb.on_audio_delta(h.at(0), "r1", "B", &audio(60)));
        assert!(h.pb.on_audio_delta(h.at(0), "r1", "C", &audio(200)));
        h.run(0, 100);
        let interruption = h.pb.on_speech_started(h.at(100)).expect("playing");
        // At t=100 A (0..60) has played, B (60..120) is playing at 40, C never started.
        assert_eq!(
            interruption.truncate,
            Some(Truncate {
                item_id: "B".into(),
                audio_end_ms: 40
            })
        );
        assert_eq!(interruption.delete, vec!["C".to_owned()]);
        let before = h.pb.counters().clone();
        let outcomes = h.clear(100);
        assert!(!outcomes.is_empty());
        assert!(outcomes.iter().all(|o| *o == MarkOutcome::Stale));
        let after = h.pb.counters();
        assert_eq!(
            after.stale_marks,
            before.stale_marks + outcomes.len() as u64
        );
        assert_eq!(after.unknown_marks, before.unknown_marks);
        assert!(!h.pb.is_active(h.at(100)));
        assert_eq!(h.pb.heard_ms(h.at(100)), None);
        assert_eq!(h.pb.on_speech_started(h.at(100)), None);
    }

    #[test]
    fn pacing_bounds_outstanding_audio_over_a_3_second_response() {
        let mut h = Harness::new(40);
        let total = audio(3000);
        let sizes = [37, 113, 401, 7, 977, 250];
        let mut offset = 0;
        for t in 0..=3400u64 {
            // Deltas arrive about 2.5x faster than real time, in odd sizes.
            if t % 8 == 0 && offset < total.len() {
                let size = sizes[(t / 8) as usize % sizes.len()].min(total.len() - offset);
                assert!(h.pb.on_audio_delta(h.at(t), "r1", "A", &total[offset..offset + size]));
                offset += size;
                if offset == total.len() {
                    h.pb.on_response_done("r1");
                }
            }
            let now = h.at(t);
            h.step(t);
            let buffered = h.twilio_end.saturating_duration_since(now);
            assert!(buffered <= ms(LEAD_MS), "{buffered:?} buffered at {t}");
            // Work-conserving: a whole chunk is held back only because the lead is full.
            if h.pb.poll_timeout().is_some() {
                assert!(buffered > ms(LEAD_MS - 20), "{buffered:?} buffered at {t}");
            }
        }
        assert!(h.max_buffered <= ms(LEAD_MS + 20));
        assert_eq!(h.max_buffered, ms(LEAD_MS));
        let sent: Vec<u8> = h
            .sent
            .iter()
            .flat_map(|s| s.payload.iter().copied())
            .collect();
        assert_eq!(sent, total, "3000 ms is whole chunks: no padding");
        assert_eq!(h.sent_ms_of("A"), 3000);
        assert!(h.pending_echoes.is_empty());
        assert_eq!(h.pb.heard_ms(h.at(3400)), Some(("A".to_owned(), 3000)));
    }

    #[test]
    fn poll_timeout_is_exact() {
        let mut h = Harness::new(0);
        assert_eq!(h.pb.poll_timeout(), None, "nothing queued");
        assert!(h.pb.on_audio_delta(h.at(0), "r1", "A", &audio(300)));
        assert_eq!(h.pb.poll_timeout(), Some(h.at(0)));
        assert_eq!(h.pump(0), 6);
        let mut expected = h.at(20);
        for _ in 0..5 {
            assert_eq!(h.pb.poll_timeout(), Some(expected));
            let just_before = expected - Duration::from_nanos(1);
            assert_eq!(h.pump_at(just_before), 0);
            assert_eq!(h.pump_at(expected), 1);
            expected += ms(20);
        }
        // A late wake-up sends one chunk per elapsed 20 ms, never a burst beyond the lead.
        let late = h.at(400);
        assert_eq!(h.pb.poll_timeout(), Some(h.at(120)));
        assert_eq!(h.pump_at(late), 4);
        assert_eq!(h.pb.poll_timeout(), None, "all 300 ms sent");
        assert_eq!(h.sent_ms_of("A"), 300);
    }

    #[test]
    fn partial_chunk_waits_then_is_padded_with_silence() {
        let mut h = Harness::new(0);
        let a = audio(100);
        assert!(h.pb.on_audio_delta(h.at(0), "r1", "A", &a[..100]));
        assert_eq!(h.pump(0), 0, "partial chunk waits");
        assert_eq!(h.pb.poll_timeout(), None);
        assert_eq!(h.pb.queued_ms(), 12);
        assert!(h.pb.is_active(h.at(0)), "queued audio counts as active");

        // A new item pads the previous one.
        assert!(h.pb.on_audio_delta(h.at(1), "r1", "B", &a[..200]));
        assert_eq!(h.pb.poll_timeout(), Some(h.at(1)));
        assert_eq!(h.pump(1), 2);
        assert_eq!(h.sent[0].item_id, "A");
        assert_eq!(&h.sent[0].payload[..100], &a[..100]);
        assert!(h.sent[0].payload[100..].iter().all(|&b| b == MULAW_SILENCE));
        assert_eq!(h.sent[0].item_ms, 20);
        assert_eq!((h.sent[1].item_id.as_str(), h.sent[1].item_ms), ("B", 20));
        assert_eq!(h.sent[1].payload, &a[..160]);

        // The response's end pads B's last 40 bytes.
        assert_eq!(h.pb.poll_timeout(), None);
        h.pb.on_response_done("r1");
        assert_eq!(h.pump(2), 1);
        assert_eq!(&h.sent[2].payload[..40], &a[160..200]);
        assert!(h.sent[2].payload[40..].iter().all(|&b| b == MULAW_SILENCE));
        assert_eq!(h.sent_ms_of("B"), 40);
        assert_eq!(h.pb.queued_ms(), 0);
        let marks: Vec<MarkName> = h
            .sent
            .iter()
            .map(|s| parse_mark_name(&s.mark).expect("ok"))
            .collect();
        assert_ne!(marks[0].item_seq, marks[1].item_seq);
    }

    #[test]
    fn speech_with_only_queued_audio_deletes_without_truncate() {
        let mut h = Harness::new(0);
        assert!(h.pb.on_audio_delta(h.at(0), "r1", "A", &audio(10)));
        let interruption = h.pb.on_speech_started(h.at(0)).expect("queued audio");
        assert_eq!(interruption.truncate, None);
        assert_eq!(interruption.delete, vec!["A".to_owned()]);
        assert_eq!(interruption.interrupted_response.as_deref(), Some("r1"));
    }

    #[test]
    fn item_played_to_its_end_is_not_truncated() {
        let mut h = Harness::new(0);
        assert!(h.pb.on_audio_delta(h.at(0), "r1", "A", &audio(100)));
        h.pb.on_response_done("r1");
        h.run(0, 150);
        // r2 has audio queued but not yet sent (the driver has not polled since it arrived).
        assert!(h.pb.on_audio_delta(h.at(150), "r2", "B", &audio(100)));
        let interruption = h.pb.on_speech_started(h.at(150)).expect("B is queued");
        assert_eq!(
            interruption,
            Interruption {
                truncate: None,
                delete: vec!["B".into()],
                interrupted_response: Some("r2".into()),
                cancel_response: false,
            }
        );
    }

    #[test]
    fn item_whose_response_is_still_running_is_truncated_even_if_all_sent_was_heard() {
        let mut h = Harness::new(0);
        assert!(h.pb.on_audio_delta(h.at(0), "r1", "A", &audio(100)));
        h.run(0, 150);
        let interruption = h.pb.on_speech_started(h.at(150)).expect("r1 still running");
        assert_eq!(
            interruption.truncate,
            Some(Truncate {
                item_id: "A".into(),
                audio_end_ms: 100
            })
        );
    }

    #[test]
    fn queue_overflow_drops_the_newest_audio() {
        let mut pb = Playback::new(PlaybackConfig {
            max_queued: ms(100),
            ..PlaybackConfig::default()
        });
        let now = Instant::now();
        assert!(pb.on_audio_delta(now, "r1", "A", &audio(60)));
        assert!(!pb.on_audio_delta(now, "r1", "A", &audio(60)));
        assert_eq!(pb.queued_ms(), 100);
        assert_eq!(pb.counters().queued_bytes_dropped, 20 * 8);
    }

    #[test]
    fn config_validation_and_rounding() {
        let bad = PlaybackConfig {
            chunk_ms: 30,
            ..PlaybackConfig::default()
        };
        assert_eq!(bad.validate(), Err(PlaybackError::InvalidChunkMs(30)));
        assert_eq!(PlaybackConfig::default().validate(), Ok(()));
        let mut pb = Playback::new(PlaybackConfig {
            chunk_ms: 0,
            lead: ms(0),
            ..PlaybackConfig::default()
        });
        let now = Instant::now();
        assert!(pb.on_audio_delta(now, "r1", "A", &audio(100)));
        // A lead below one chunk still lets one chunk be in flight.
        assert_eq!(pb.poll_transmit(now).map(|t| t.payload.len()), Some(160));
        assert!(pb.poll_transmit(now).is_none());
        assert_eq!(pb.poll_timeout(), Some(now + ms(20)));
    }

    use crate::testkit::Lcg;

    #[test]
    fn randomised_interleavings_keep_the_invariants() {
        let (mut total_interruptions, mut total_truncates) = (0, 0);
        for seed in 0..20u64 {
            let mut rng = Lcg(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let mut h = Harness::new(rng.below(60));
            let mut t = 0u64;
            let mut response = 0u32;
            let mut item = 0u32;
            // (generation, item_id) -> ms sent, checked against truncates.
            let mut sent_ms: HashMap<(u32, String), u32> = HashMap::new();
            let mut sent_count = 0;
            let mut interruptions = 0;
            let mut truncates = 0;
            for _ in 0..3000 {
                let now = h.at(t);
                match rng.below(10) {
                    0 => {
                        response += 1;
                        item = 0;
                        h.pb.on_response_created(&format!("r{response}"));
                    }
                    1 | 2 => {
                        if rng.below(4) == 0 {
                            item += 1;
                        }
                        let size = rng.below(900) as usize;
                        let bytes = vec![0x55u8; size];
                        h.pb.on_audio_delta(
                            now,
                            &format!("r{response}"),
                            &format!("r{response}-i{item}"),
                            &bytes,
                        );
                    }
                    3 => h.pb.on_response_done(&format!("r{response}")),
                    4 => {
                        if rng.below(3) == 0 {
                            let name =
                                format!("{}:{}:{}", rng.below(4), rng.below(8), rng.below(2000));
                            let _ = h.pb.on_mark(now, &name);
                        } else {
                            h.step(t);
                        }
                    }
                    5 => {
                        if let Some(i) = h.pb.on_speech_started(now) {
                            interruptions += 1;
                            let generation = h.pb.generation().wrapping_sub(1);
                            if let Some(tr) = &i.truncate {
                                let sent = sent_ms
                                    .get(&(generation, tr.item_id.clone()))
                                    .copied()
                                    .unwrap_or(0);
                                assert!(tr.audio_end_ms <= sent, "seed {seed}: {tr:?} > {sent}");
                                assert!(!i.delete.contains(&tr.item_id));
                                truncates += 1;
                            }
                            let mut unique = i.delete.clone();
                            unique.sort();
                            unique.dedup();
                            assert_eq!(unique.len(), i.delete.len());
                            h.clear(t);
                        }
                    }
                    _ => t += rng.below(50),
                }
                let now = h.at(t);
                h.pump_at(now);
                for s in &h.sent[sent_count..] {
                    let mark = parse_mark_name(&s.mark).expect("our marks parse");
                    assert_eq!(mark.generation, h.pb.generation());
                    assert_eq!(mark.ms, s.item_ms);
                    let entry = sent_ms
                        .entry((mark.generation, s.item_id.clone()))
                        .or_default();
                    assert_eq!(s.item_ms, *entry + 20);
                    *entry = s.item_ms;
                }
                sent_count = h.sent.len();
                if let Some((id, heard)) = h.pb.heard_ms(now) {
                    let sent = sent_ms.get(&(h.pb.generation(), id)).copied().unwrap_or(0);
                    assert!(heard <= sent);
                }
                assert!(h.twilio_end.saturating_duration_since(now) <= ms(LEAD_MS));
                // Drained at `now`, so the next wake-up must be in the future (no busy loop).
                assert!(
                    h.pb.poll_timeout().is_none_or(|due| due > now),
                    "seed {seed}"
                );
            }
            assert_eq!(h.pb.counters().interruptions, interruptions);
            total_interruptions += interruptions;
            total_truncates += truncates;
            assert_eq!(h.pb.counters().chunks_sent, h.sent.len() as u64);
        }
        // The walk must actually exercise barge-in, with and without a playing item.
        assert!(total_truncates > 20, "{total_truncates}");
        assert!(total_interruptions > total_truncates);
    }
}
