//! What each turn of the conversation cost the caller, on the bridge's monotonic clock.
//!
//! The caller stops talking; how long until they hear the agent? [`Turns`] answers it per
//! assistant turn from events the engine already sees, and splits the answer where the time
//! went:
//!
//! ```text
//!  caller speech end ── model_ms ──▶ first model audio ── bridge_ms ──▶ first chunk to Twilio
//!                                                                     ── playout_ms ──▶ heard
//!  └──────────────────────────────── voice_to_voice_ms ───────────────────────────────────┘
//! ```
//!
//! - *Caller speech end* is the model's own account (`speech_stopped.audio_end_ms`, a position
//!   in the audio the session was sent) mapped back to when the bridge read that audio from
//!   Twilio ([`UplinkClock`]); a provider that reports no position (Gemini) gets the end of the
//!   last caller frame the bridge's own level detector judged as speech. `model_ms` therefore
//!   holds the model's turn detection (its silence wait) as well as its think time; `detect_ms`
//!   is the first of the two, where the model says when it decided.
//! - *Heard* is Twilio's word, not an estimate: the first `mark` echo of the turn's audio says
//!   that chunk finished playing, so playback began the chunk's length before the echo.
//! - A barge-in is timed from the caller's speech start (mapped the same way) to the `clear`
//!   (`talk_over_ms`), with the agent audio the caller heard over their own voice meanwhile.
//!
//! Everything is bounded: a turn costs one record, [`MAX_TURNS`] are kept (later ones counted),
//! the uplink clock remembers [`UPLINK_FRAMES`] frames, and nothing here allocates per frame.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Turns kept per call, for its report and its metrics; later ones are counted only.
pub const MAX_TURNS: usize = 128;

/// Caller frames whose read time is remembered for mapping a model's audio position back to
/// the bridge's clock: 5.12 s of 20 ms frames. A speech end comes some hundreds of ms after it
/// happened; a position older than this is extrapolated from the oldest frame remembered.
pub const UPLINK_FRAMES: usize = 256;

/// Maps positions in the audio a model session was sent to when the bridge read that audio.
///
/// A session's positions start at 0 with the first audio it was sent; caller frames are
/// contiguous audio, each read at its own time (network jitter included), so a position maps
/// to its frame's read time less the part of the frame after it.
#[derive(Debug)]
pub struct UplinkClock {
    /// `(start_ms, end_ms, read_at)` of recent frames, in order.
    frames: VecDeque<(u64, u64, Instant)>,
    sent_ms: u64,
    /// The session's resampler delays its audio by this much: the model's position `p` is the
    /// caller's `p - delay`.
    delay: Duration,
}

impl UplinkClock {
    pub fn new(delay: Duration) -> Self {
        Self {
            frames: VecDeque::with_capacity(UPLINK_FRAMES),
            sent_ms: 0,
            delay,
        }
    }

    /// A caller frame of `ms` read at `read_at` went to the session.
    pub fn sent(&mut self, read_at: Instant, ms: u64) {
        if self.frames.len() == UPLINK_FRAMES {
            self.frames.pop_front();
        }
        let start = self.sent_ms;
        self.sent_ms = self.sent_ms.saturating_add(ms);
        self.frames.push_back((start, self.sent_ms, read_at));
    }

    /// When the bridge read the caller audio at the session's position `model_ms`, or `None`
    /// for a position the session was never sent (a peer's absurd number).
    pub fn at(&self, model_ms: u64) -> Option<Instant> {
        let position = Duration::from_millis(model_ms).saturating_sub(self.delay);
        let position = u64::try_from(position.as_millis()).unwrap_or(u64::MAX);
        if position > self.sent_ms {
            return None;
        }
        let index = self.frames.partition_point(|&(_, end, _)| end < position);
        let (_, end, read_at) = match self.frames.get(index) {
            Some(frame) => *frame,
            None => *self.frames.back()?,
        };
        // Before the oldest remembered frame, `end - position` spans the frames forgotten.
        read_at.checked_sub(Duration::from_millis(end.saturating_sub(position)))
    }
}

/// Why the agent spoke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TurnCause {
    /// It answered the caller's speech: the turn has a voice-to-voice time.
    Caller,
    /// Anything else: the greeting, a digit, a tool's answer, a session's replay.
    Other,
}

impl TurnCause {
    pub fn as_str(self) -> &'static str {
        match self {
            TurnCause::Caller => "caller",
            TurnCause::Other => "other",
        }
    }
}

/// A barge-in on a turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BargeInTiming {
    /// Since the call's start.
    pub at: Duration,
    /// Caller speech start to the `clear`; `None` when the provider gave no speech start.
    pub talk_over: Option<Duration>,
    /// Agent audio the caller heard after they started to speak (by the pacer's estimate of
    /// what was playing), up to the `clear`; `None` when the speech start is unknown.
    pub heard_over_caller: Option<Duration>,
}

/// One assistant turn, timed. A part is `None` when its event never came (a turn cut before
/// it was heard, a turn that answered no speech).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TurnTiming {
    /// When the model began the turn, since the call's start.
    pub at: Duration,
    pub cause: TurnCause,
    /// Caller speech end to the start of the agent's audio as Twilio played it.
    pub voice_to_voice: Option<Duration>,
    /// Caller speech end to the first model audio.
    pub model: Option<Duration>,
    /// Caller speech end to the model saying the caller had stopped (its turn detection).
    pub detect: Option<Duration>,
    /// First model audio to its first chunk sent to Twilio.
    pub bridge: Option<Duration>,
    /// First chunk sent to Twilio to its playback start, as Twilio's mark confirmed it.
    pub playout: Option<Duration>,
    pub barge_in: Option<BargeInTiming>,
}

/// The turn being timed.
#[derive(Clone, Debug)]
struct OpenTurn {
    response_id: String,
    /// The item of its first audio, whose chunks and marks finish the timing.
    item_id: Option<String>,
    created_at: Instant,
    speech_end: Option<Instant>,
    detected_at: Option<Instant>,
    first_audio: Option<Instant>,
    first_send: Option<Instant>,
    heard_from: Option<Instant>,
    barge_in: Option<BargeInTiming>,
}

/// The call's turns. The engine calls it at the events named in the module's paragraph.
#[derive(Clone, Debug, Default)]
pub struct Turns {
    /// The caller's latest speech end not yet answered, and when the model reported it (if
    /// the model reports it: Gemini does not).
    pending_speech_end: Option<(Instant, Option<Instant>)>,
    /// The caller's current speech start, while they speak (`Some(None)`: speaking, since
    /// when unknown).
    speech_start: Option<Option<Instant>>,
    open: Option<OpenTurn>,
    done: Vec<TurnTiming>,
    dropped: u64,
    /// The run of agent audio scheduled to play without a gap: `(start, end)`.
    agent_run: Option<(Instant, Instant)>,
    call_start: Option<Instant>,
}

impl Turns {
    /// The stream started: turn times are reported from here.
    pub fn started(&mut self, now: Instant) {
        self.call_start = Some(now);
    }

    /// The model heard the caller start (`at`: when that audio was read; `None`: unknown).
    pub fn caller_started(&mut self, at: Option<Instant>, now: Instant) {
        self.speech_start = Some(at.map(|at| at.min(now)));
    }

    /// The caller stopped at `at` (when that audio was read), as the model said at
    /// `detected` (`None`: a provider that only shows it by answering).
    pub fn caller_stopped(&mut self, at: Option<Instant>, detected: Option<Instant>, now: Instant) {
        self.speech_start = None;
        if let Some(at) = at {
            self.pending_speech_end = Some((at.min(now), detected));
        }
    }

    /// The model began a response: a turn opens (the one before it is finished).
    pub fn response_created(&mut self, response_id: &str, now: Instant) {
        self.finish_open();
        let (speech_end, detected_at) = match self.pending_speech_end.take() {
            Some((end, detected)) => (Some(end), detected),
            None => (None, None),
        };
        self.open = Some(OpenTurn {
            response_id: response_id.to_owned(),
            item_id: None,
            created_at: now,
            speech_end,
            detected_at,
            first_audio: None,
            first_send: None,
            heard_from: None,
            barge_in: None,
        });
    }

    /// Model audio for `response_id`'s `item_id` arrived (and was queued for playback).
    pub fn model_audio(&mut self, response_id: &str, item_id: &str, now: Instant) {
        if let Some(open) = self.open.as_mut()
            && open.first_audio.is_none()
            && open.response_id == response_id
        {
            open.first_audio = Some(now);
            open.item_id = Some(item_id.to_owned());
        }
    }

    /// A chunk of `item_id` lasting `duration` went to Twilio at `now`, to play from `play_at`.
    pub fn chunk_sent(
        &mut self,
        item_id: &str,
        now: Instant,
        play_at: Instant,
        duration: Duration,
    ) {
        self.agent_run = match self.agent_run {
            Some((start, end)) if play_at <= end => Some((start, end.max(play_at + duration))),
            _ => Some((play_at, play_at + duration)),
        };
        if let Some(open) = self.open.as_mut()
            && open.first_send.is_none()
            && open.item_id.as_deref() == Some(item_id)
        {
            open.first_send = Some(now);
        }
    }

    /// Twilio confirmed `item_id` played up to `item_ms` (its chunk's end) at `now`.
    pub fn mark_confirmed(&mut self, item_id: &str, item_ms: u32, now: Instant) {
        if let Some(open) = self.open.as_mut()
            && open.heard_from.is_none()
            && open.item_id.as_deref() == Some(item_id)
            && let Some(first_send) = open.first_send
        {
            let played = Duration::from_millis(u64::from(item_ms));
            // A first echo for a later chunk still dates the start; never before the send.
            let start = now
                .checked_sub(played)
                .unwrap_or(first_send)
                .max(first_send);
            open.heard_from = Some(start);
        }
    }

    /// Barge-in: the `clear` went out at `now`.
    pub fn barged_in(&mut self, now: Instant) {
        let at = self.since_start(now);
        let speech_start = self.speech_start.flatten();
        let heard_over_caller = speech_start.map(|speech| match self.agent_run {
            Some((start, end)) => now.min(end).saturating_duration_since(speech.max(start)),
            None => Duration::ZERO,
        });
        let timing = BargeInTiming {
            at,
            talk_over: speech_start.map(|speech| now.saturating_duration_since(speech)),
            heard_over_caller,
        };
        self.agent_run = None;
        if let Some(open) = self.open.as_mut()
            && open.barge_in.is_none()
        {
            open.barge_in = Some(timing);
        }
    }

    /// The call is over: the turn still open is finished with what it has.
    pub fn finish(&mut self) {
        self.finish_open();
    }

    /// The turns timed so far (the open one not included), oldest first.
    pub fn timings(&self) -> &[TurnTiming] {
        &self.done
    }

    /// Every turn, the open one finished with what it has: for a call's report and metrics,
    /// once it is over.
    pub fn all(&self) -> Vec<TurnTiming> {
        let mut turns = self.clone();
        turns.finish();
        turns.done
    }

    /// Turns not kept (beyond [`MAX_TURNS`]).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    fn since_start(&self, at: Instant) -> Duration {
        self.call_start
            .map_or(Duration::ZERO, |start| at.saturating_duration_since(start))
    }

    fn finish_open(&mut self) {
        let Some(open) = self.open.take() else {
            return;
        };
        if open.first_audio.is_none() && open.barge_in.is_none() {
            // Nothing was said (a tool call, a cancelled response): the caller is still
            // waiting, and their wait ends with the next response that speaks.
            if self.pending_speech_end.is_none()
                && let Some(end) = open.speech_end
            {
                self.pending_speech_end = Some((end, open.detected_at));
            }
            return;
        }
        if self.done.len() == MAX_TURNS {
            self.dropped += 1;
            return;
        }
        let span = |from: Option<Instant>, to: Option<Instant>| match (from, to) {
            (Some(from), Some(to)) => Some(to.saturating_duration_since(from)),
            _ => None,
        };
        self.done.push(TurnTiming {
            at: self.since_start(open.created_at),
            cause: if open.speech_end.is_some() {
                TurnCause::Caller
            } else {
                TurnCause::Other
            },
            voice_to_voice: span(open.speech_end, open.heard_from),
            model: span(open.speech_end, open.first_audio),
            detect: span(open.speech_end, open.detected_at),
            bridge: span(open.first_audio, open.first_send),
            playout: span(open.first_send, open.heard_from),
            barge_in: open.barge_in,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_position_maps_to_when_its_frame_was_read() {
        let t0 = Instant::now();
        let mut clock = UplinkClock::new(Duration::ZERO);
        // Frames read 20 ms apart, the third 7 ms late (jitter).
        clock.sent(t0 + ms(20), 20);
        clock.sent(t0 + ms(40), 20);
        clock.sent(t0 + ms(67), 20);
        assert_eq!(clock.at(50), Some(t0 + ms(57)));
        assert_eq!(clock.at(20), Some(t0 + ms(20)));
        assert_eq!(clock.at(0), Some(t0));
        assert_eq!(clock.at(61), None, "never sent");
        assert_eq!(clock.at(u64::MAX), None);
    }

    #[test]
    fn the_resampler_delay_and_forgotten_frames_are_accounted() {
        let t0 = Instant::now() + Duration::from_secs(100);
        let mut clock = UplinkClock::new(ms(5));
        for frame in 1..=(UPLINK_FRAMES as u64 + 10) {
            clock.sent(t0 + ms(20 * frame), 20);
        }
        // Position 105 at the model is the caller's 100: the end of frame 5, read at 100 ms.
        assert_eq!(clock.at(105), Some(t0 + ms(100)));
        assert_eq!(clock.at(1_005), Some(t0 + ms(1_000)));
    }

    #[test]
    fn a_turn_is_split_into_model_bridge_and_playout() {
        let t0 = Instant::now();
        let mut turns = Turns::default();
        turns.started(t0);
        turns.caller_started(Some(t0 + ms(100)), t0 + ms(150));
        turns.caller_stopped(Some(t0 + ms(1_000)), Some(t0 + ms(1_500)), t0 + ms(1_500));
        turns.response_created("r1", t0 + ms(1_510));
        turns.model_audio("r1", "i1", t0 + ms(1_700));
        turns.model_audio("r1", "i1", t0 + ms(1_720));
        turns.chunk_sent("i1", t0 + ms(1_702), t0 + ms(1_702), ms(20));
        turns.chunk_sent("i1", t0 + ms(1_703), t0 + ms(1_722), ms(20));
        // Twilio played the first chunk by 1_802: it began at 1_782.
        turns.mark_confirmed("i1", 20, t0 + ms(1_802));
        turns.mark_confirmed("i1", 40, t0 + ms(1_822));
        turns.finish();
        let [turn] = turns.timings() else {
            panic!("one turn: {:?}", turns.timings());
        };
        assert_eq!(turn.cause, TurnCause::Caller);
        assert_eq!(turn.at, ms(1_510));
        assert_eq!(turn.model, Some(ms(700)));
        assert_eq!(turn.detect, Some(ms(500)));
        assert_eq!(turn.bridge, Some(ms(2)));
        assert_eq!(turn.playout, Some(ms(80)));
        assert_eq!(turn.voice_to_voice, Some(ms(782)));
        assert_eq!(turn.barge_in, None);
    }

    #[test]
    fn a_barge_in_counts_the_agent_audio_heard_over_the_caller() {
        let t0 = Instant::now();
        let mut turns = Turns::default();
        turns.started(t0);
        turns.response_created("greeting", t0);
        turns.model_audio("greeting", "g", t0 + ms(300));
        for chunk in 0..10 {
            turns.chunk_sent("g", t0 + ms(300), t0 + ms(300 + 20 * chunk), ms(20));
        }
        turns.mark_confirmed("g", 20, t0 + ms(330));
        // The caller starts at 400 (read at 420); the clear goes at 460. Agent audio plays to 500.
        turns.caller_started(Some(t0 + ms(400)), t0 + ms(440));
        turns.barged_in(t0 + ms(460));
        turns.finish();
        let [turn] = turns.timings() else {
            panic!("one turn");
        };
        assert_eq!(turn.cause, TurnCause::Other);
        assert_eq!(turn.voice_to_voice, None);
        assert_eq!(turn.bridge, Some(ms(0)));
        assert_eq!(turn.playout, Some(ms(10)));
        let barge_in = turn.barge_in.expect("barged in");
        assert_eq!(barge_in.at, ms(460));
        assert_eq!(barge_in.talk_over, Some(ms(60)));
        assert_eq!(barge_in.heard_over_caller, Some(ms(60)));
    }

    #[test]
    fn turns_beyond_the_cap_are_counted_not_kept() {
        let t0 = Instant::now();
        let mut turns = Turns::default();
        for n in 0..MAX_TURNS + 3 {
            turns.response_created(&n.to_string(), t0);
            turns.model_audio(&n.to_string(), "i", t0);
        }
        turns.finish();
        assert_eq!(turns.timings().len(), MAX_TURNS);
        assert_eq!(turns.dropped(), 3);
    }

    #[test]
    fn a_speech_end_is_answered_once() {
        let t0 = Instant::now();
        let mut turns = Turns::default();
        turns.caller_stopped(Some(t0), Some(t0 + ms(500)), t0 + ms(500));
        turns.response_created("a", t0 + ms(600));
        turns.model_audio("a", "i", t0 + ms(700));
        turns.response_created("b", t0 + ms(900));
        turns.model_audio("b", "j", t0 + ms(950));
        turns.finish();
        let causes: Vec<TurnCause> = turns.timings().iter().map(|t| t.cause).collect();
        assert_eq!(causes, [TurnCause::Caller, TurnCause::Other]);
    }

    #[test]
    fn a_silent_response_passes_the_callers_wait_to_the_one_that_speaks() {
        let t0 = Instant::now();
        let mut turns = Turns::default();
        turns.started(t0);
        turns.caller_stopped(Some(t0), Some(t0 + ms(500)), t0 + ms(500));
        // A tool call: a response with no audio; then its answer.
        turns.response_created("call", t0 + ms(600));
        turns.response_created("answer", t0 + ms(900));
        turns.model_audio("answer", "i", t0 + ms(1_000));
        turns.finish();
        let [turn] = turns.timings() else {
            panic!("one turn: {:?}", turns.timings());
        };
        assert_eq!(turn.cause, TurnCause::Caller);
        assert_eq!(turn.at, ms(900));
        assert_eq!(turn.model, Some(ms(1_000)));
        assert_eq!(turn.detect, Some(ms(500)));
    }
}
