//! Playback accounting, pacing and barge-in for one call (the contract is BARGE-IN.md).
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
/// first beyond this (their late mark echoes then count as unknown, which is harmless).
const MAX_TRACKED_ITEMS: usize = 32;

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
    /// A mark of the current generation: `item_id` has played at least `ms`.
    Confirmed { item_id: String, ms: u32 },
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
    item_id: String,
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
        let elapsed = u32::try_from(now.saturating_duration_since(since).as_millis())
            .unwrap_or(u32::MAX);
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
        Some((item.item_id.clone(), item.heard_ms(now)))
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
    /// `late_deltas_dropped`) or the queue is full (counted in `queued_bytes_dropped`).
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

        let item_seq = match self.items.iter().find(|item| item.item_id == item_id) {
            Some(item) => item.seq,
            None => self.start_item(response_id, item_id),
        };
        let appends_to_last = self
            .segments
            .back()
            .is_some_and(|segment| segment.item_seq == item_seq && !segment.closed);
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
            item_id: item.item_id.clone(),
            ms: mark.ms,
        }
    }

    /// `input_audio_buffer.speech_started`. `None` (rule 5) when nothing is playing or queued;
    /// else the [`Interruption`], after which the generation is bumped, the queue is dropped and
    /// late deltas of the interrupted response(s) are ignored.
    pub fn on_speech_started(&mut self, now: Instant) -> Option<Interruption> {
        self.observe(now);
        if !self.is_active(now) {
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
                    item_id: item.item_id.clone(),
                    audio_end_ms: heard,
                });
            }
        }
        // Everything after the playing item is, by the pacing estimate, not yet heard.
        let unheard_from = playing.map_or(0, |index| index + 1);
        let delete: Vec<String> = self.items[unheard_from..]
            .iter()
            .map(|item| item.item_id.clone())
            .collect();

        let mut affected: Vec<&str> = Vec::new();
        if let Some(index) = playing.filter(|_| truncate.is_some()) {
            affected.push(&self.items[index].response_id);
        }
        affected.extend(self.items[unheard_from..].iter().map(|i| i.response_id.as_str()));
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
        let _ = write!(self.mark, "{}:{}:{}", self.generation, item.seq, item.sent_ms);
        self.drop_empty_closed_segments();
        let item = &self.items[item_index];
        Some(Transmit {
            payload: &self.payload,
            mark: &self.mark,
            item_id: &item.item_id,
            item_ms: item.sent_ms,
        })
    }

    /// When `poll_transmit` should be called next: `None` when nothing is queued or only a
    /// partial chunk is (more audio or `on_response_done` must come first). At exactly this
    /// instant a chunk is sendable; a nanosecond earlier it is not.
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
        // Before the clock's origin means "already due"; the last time we saw is then due too.
        end.checked_sub(self.send_below).or(self.last_now).or(Some(end))
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

    fn start_item(&mut self, response_id: &str, item_id: &str) -> u32 {
        if self.items.len() >= MAX_TRACKED_ITEMS {
            let segments = &self.segments;
            if let Some(index) = self
                .items
                .iter()
                .position(|item| !segments.iter().any(|s| s.item_seq == item.seq))
            {
                self.items.remove(index);
            }
        }
        let seq = self.next_item_seq;
        self.next_item_seq = self.next_item_seq.wrapping_add(1);
        self.items.push(Item {
            seq,
            item_id: item_id.to_owned(),
            response_id: response_id.to_owned(),
            sent_ms: 0,
            play_start: None,
            confirmed_ms: 0,
            confirmed_at: None,
        });
        seq
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
            self.audio.extend(std::iter::repeat_n(MULAW_SILENCE, padding));
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
