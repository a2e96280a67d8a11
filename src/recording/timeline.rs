//! The recording's two-channel timeline, sans I/O: where each leg's audio goes, what a
//! barge-in cut removes, and when a 20 ms slot is final and may be encoded.
//!
//! Positions are samples at 8 kHz since the stream's `start`. The caller's frames are
//! contiguous audio: they are placed back to back from the first frame's read time, so the
//! network's jitter does not tear them apart; a gap in read times past [`CALLER_GAP`] (Twilio
//! stopped sending, or frames were dropped on the way to the recorder) is filled with silence
//! and the caller's channel resumes at the late frame's read time. The agent's chunks are
//! placed at their `play_at`. A cut at `at` removes the agent audio already placed at or after
//! `at`: the caller never heard it (chunks placed later are a new response and stay).
//!
//! A slot is final once the caller's channel has passed its end by [`FINAL_HORIZON`]: a cut
//! comes at the time the bridge tells Twilio to `clear`, which is about the caller's latest
//! frame, so it cannot reach back that far. Only final slots are encoded, so a slot is written
//! once. Memory is bounded: the window from the first slot not yet final holds at most
//! [`MAX_WINDOW_SAMPLES`]; agent audio past it (a model sending far ahead of playback) or
//! before it (placed too late to change a final slot) is left out and counted.

use std::collections::VecDeque;
use std::time::Duration;

use voxrelay_core::codec::g711::mulaw_decode;

/// The recording's sample rate (Twilio's).
pub const SAMPLE_RATE: u32 = 8_000;
/// One Opus packet: 20 ms at 8 kHz, per channel.
pub const SLOT_SAMPLES: usize = 160;
/// A gap in the caller's read times beyond this (far past any jitter) is silence.
pub const CALLER_GAP: Duration = Duration::from_millis(200);
/// How far behind the caller's channel a slot must be to be final.
pub const FINAL_HORIZON: Duration = Duration::from_millis(200);
/// The most audio the timeline holds not yet final, per channel: 15 s.
pub const MAX_WINDOW_SAMPLES: usize = 15 * SAMPLE_RATE as usize;

/// `at` in samples at 8 kHz.
pub fn samples_at(at: Duration) -> u64 {
    (at.as_nanos() * u128::from(SAMPLE_RATE) / 1_000_000_000).min(u128::from(u64::MAX)) as u64
}

const GAP_SAMPLES: u64 = (CALLER_GAP.as_millis() as u64) * SAMPLE_RATE as u64 / 1000;
const HORIZON_SAMPLES: u64 = (FINAL_HORIZON.as_millis() as u64) * SAMPLE_RATE as u64 / 1000;

/// The two channels from the first slot not yet final on.
#[derive(Debug, Default)]
pub struct Timeline {
    /// Position of `caller[0]` and `agent[0]`: a multiple of [`SLOT_SAMPLES`].
    base: u64,
    caller: VecDeque<i16>,
    agent: VecDeque<i16>,
    /// Where the caller's next frame goes; `None` before the first.
    caller_next: Option<u64>,
    /// Where the recording starts: the first caller frame's slot.
    start: Option<u64>,
    /// One past the last agent sample placed (a cut need not look further).
    agent_end: u64,
    /// Agent samples left out: beyond the window, or too late for their slot.
    agent_samples_lost: u64,
    /// Caller samples left out (past the window) and silence filled in for gaps.
    caller_samples_lost: u64,
    caller_gaps: u64,
}

impl Timeline {
    pub fn new() -> Self {
        Self::default()
    }

    /// One caller frame read at `at`.
    pub fn caller_audio(&mut self, at: Duration, mulaw: &[u8]) {
        let read_at = samples_at(at);
        let start = match self.caller_next {
            None => read_at.max(self.base),
            Some(next) if read_at > next + GAP_SAMPLES => {
                self.caller_gaps += 1;
                read_at
            }
            Some(next) => next,
        };
        if self.caller_next.is_none() {
            // The stream's first audio: the file starts at its slot, not at the stream's
            // `start`. Agent audio placed before it (none, normally: the caller's held audio
            // is replayed first) moves with the base.
            let base = start - start % SLOT_SAMPLES as u64;
            let shift = ((base - self.base) as usize).min(self.agent.len());
            self.agent_samples_lost += self.agent.drain(..shift).filter(|&s| s != 0).count() as u64;
            self.base = base;
            self.start = Some(base);
        }
        let placed = self.place(Channel::Caller, start, mulaw);
        self.caller_samples_lost += (mulaw.len() - placed) as u64;
        self.caller_next = Some(start + mulaw.len() as u64);
    }

    /// One agent chunk heard from `play_at`.
    pub fn agent_audio(&mut self, play_at: Duration, mulaw: &[u8]) {
        let start = samples_at(play_at);
        let placed = self.place(Channel::Agent, start, mulaw);
        self.agent_samples_lost += (mulaw.len() - placed) as u64;
        self.agent_end = self.agent_end.max(start + mulaw.len() as u64);
    }

    /// Barge-in at `at`: agent audio placed from `at` on was never heard.
    pub fn agent_cut(&mut self, at: Duration) {
        let from = samples_at(at).max(self.base);
        if from >= self.agent_end {
            return;
        }
        let first = (from - self.base) as usize;
        let last = ((self.agent_end - self.base) as usize).min(self.agent.len());
        for sample in self.agent.range_mut(first.min(last)..last) {
            *sample = 0;
        }
        self.agent_end = from;
    }

    /// Places `mulaw` at `start` on `channel`; returns how many samples fitted the window.
    fn place(&mut self, channel: Channel, start: u64, mulaw: &[u8]) -> usize {
        let buffer = match channel {
            Channel::Caller => &mut self.caller,
            Channel::Agent => &mut self.agent,
        };
        let mut placed = 0;
        for (offset, &code) in mulaw.iter().enumerate() {
            let position = start + offset as u64;
            let Some(index) = position.checked_sub(self.base) else {
                continue; // in a slot already final
            };
            let index = index as usize;
            if index >= MAX_WINDOW_SAMPLES {
                break;
            }
            if buffer.len() <= index {
                buffer.resize(index + 1, 0);
            }
            buffer[index] = mulaw_decode(code);
            placed += 1;
        }
        placed
    }

    /// The next final slot, interleaved (caller, agent) into `out`; `false` when none is.
    pub fn pop_final(&mut self, out: &mut [i16; 2 * SLOT_SAMPLES]) -> bool {
        let Some(caller_next) = self.caller_next else {
            return false;
        };
        if caller_next < self.base + SLOT_SAMPLES as u64 + HORIZON_SAMPLES {
            return false;
        }
        self.pop_slot(out);
        true
    }

    /// The call is over: the next slot up to the end of the caller's channel (the last one
    /// padded with silence), whether final or not; `None` when the timeline is done. Returns
    /// how many of the slot's samples are the call's (the rest is padding). Agent audio
    /// placed past the caller's last frame was not heard before the call ended.
    pub fn pop_closing(&mut self, out: &mut [i16; 2 * SLOT_SAMPLES]) -> Option<usize> {
        let end = self.caller_next?;
        if end <= self.base {
            return None;
        }
        let real = ((end - self.base) as usize).min(SLOT_SAMPLES);
        self.pop_slot(out);
        if real < SLOT_SAMPLES {
            for frame in out.chunks_exact_mut(2).skip(real) {
                frame[0] = 0;
                frame[1] = 0;
            }
        }
        Some(real)
    }

    fn pop_slot(&mut self, out: &mut [i16; 2 * SLOT_SAMPLES]) {
        for frame in out.chunks_exact_mut(2) {
            frame[0] = self.caller.pop_front().unwrap_or(0);
            frame[1] = self.agent.pop_front().unwrap_or(0);
        }
        self.base += SLOT_SAMPLES as u64;
    }

    /// Where the recording starts, in samples since the stream's `start` (valid once audio
    /// came).
    pub fn first_sample(&self) -> Option<u64> {
        self.start
    }

    pub fn agent_samples_lost(&self) -> u64 {
        self.agent_samples_lost
    }

    pub fn caller_samples_lost(&self) -> u64 {
        self.caller_samples_lost
    }

    pub fn caller_gaps(&self) -> u64 {
        self.caller_gaps
    }
}

#[derive(Clone, Copy)]
enum Channel {
    Caller,
    Agent,
}

#[cfg(test)]
mod tests {
    use super::*;
    use voxrelay_core::codec::g711::mulaw_encode;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn frame(value: i16, len: usize) -> Vec<u8> {
        vec![mulaw_encode(value); len]
    }

    /// Every slot, final ones while feeding and the rest at the close, as (caller, agent).
    fn drain(timeline: &mut Timeline, out: &mut Vec<(i16, i16)>) {
        let mut slot = [0; 2 * SLOT_SAMPLES];
        while timeline.pop_final(&mut slot) {
            out.extend(slot.chunks_exact(2).map(|f| (f[0], f[1])));
        }
    }

    fn close(timeline: &mut Timeline, out: &mut Vec<(i16, i16)>) -> usize {
        let mut slot = [0; 2 * SLOT_SAMPLES];
        let mut real = 0;
        while let Some(n) = timeline.pop_closing(&mut slot) {
            out.extend(slot.chunks_exact(2).map(|f| (f[0], f[1])));
            real += n;
        }
        real
    }

    #[test]
    fn caller_frames_are_contiguous_despite_jitter_and_the_agent_sits_at_its_play_time() {
        let mut timeline = Timeline::new();
        let mut out = Vec::new();
        let level = mulaw_decode(mulaw_encode(1000));
        let agent_level = mulaw_decode(mulaw_encode(-2000));
        // 50 caller frames read from 1 s, each up to 15 ms late.
        for n in 0..50u64 {
            let jitter = (n * 7) % 15;
            timeline.caller_audio(MS(1000 + n * 20 + jitter), &frame(1000, 160));
            if n == 10 {
                timeline.agent_audio(MS(1300), &frame(-2000, 800));
            }
            drain(&mut timeline, &mut out);
        }
        close(&mut timeline, &mut out);
        assert_eq!(timeline.first_sample(), Some(8000));
        assert_eq!(out.len(), 50 * 160);
        assert!(out.iter().all(|&(caller, _)| caller == level));
        // The agent's 100 ms start 300 ms into the recording (which starts at 1 s).
        let agent: Vec<usize> = (0..out.len())
            .filter(|&i| out[i].1 == agent_level)
            .collect();
        assert_eq!(agent.first(), Some(&2400));
        assert_eq!(agent.last(), Some(&(2400 + 799)));
        assert_eq!(agent.len(), 800);
    }

    #[test]
    fn a_cut_removes_the_agent_audio_from_its_time_on_and_later_chunks_stay() {
        let mut timeline = Timeline::new();
        let mut out = Vec::new();
        timeline.caller_audio(MS(0), &frame(0, 160));
        // 2 s of agent audio queued from 100 ms; the caller barges in at 500 ms.
        timeline.agent_audio(MS(100), &frame(3000, 16_000));
        for n in 1..25u64 {
            timeline.caller_audio(MS(n * 20), &frame(0, 160));
            drain(&mut timeline, &mut out);
        }
        timeline.agent_cut(MS(500));
        // The next response, after the cut.
        timeline.agent_audio(MS(700), &frame(3000, 160));
        for n in 25..60u64 {
            timeline.caller_audio(MS(n * 20), &frame(0, 160));
            drain(&mut timeline, &mut out);
        }
        close(&mut timeline, &mut out);
        let heard: Vec<usize> = (0..out.len()).filter(|&i| out[i].1 != 0).collect();
        let first_run: Vec<usize> = heard.iter().copied().filter(|&i| i < 5600).collect();
        assert_eq!(first_run.first(), Some(&800));
        assert_eq!(first_run.last(), Some(&3999), "cut at exactly 500 ms");
        let second_run: Vec<usize> = heard.iter().copied().filter(|&i| i >= 4000).collect();
        assert_eq!(second_run, (5600..5760).collect::<Vec<_>>());
    }

    #[test]
    fn slots_wait_for_the_horizon_so_a_cut_still_reaches_them() {
        let mut timeline = Timeline::new();
        let mut slot = [0; 2 * SLOT_SAMPLES];
        timeline.caller_audio(MS(0), &frame(0, 160));
        timeline.agent_audio(MS(0), &frame(3000, 1600));
        for n in 1..10u64 {
            timeline.caller_audio(MS(n * 20), &frame(0, 160));
        }
        // 200 ms of caller audio: no slot is final yet, so the cut reaches back to 0.
        assert!(!timeline.pop_final(&mut slot));
        timeline.agent_cut(MS(0));
        timeline.caller_audio(MS(200), &frame(0, 160));
        assert!(timeline.pop_final(&mut slot));
        assert!(slot.iter().all(|&s| s == 0));
        assert!(!timeline.pop_final(&mut slot));
    }

    #[test]
    fn a_gap_in_the_caller_read_times_is_silence_and_alignment_resumes() {
        let mut timeline = Timeline::new();
        let mut out = Vec::new();
        timeline.caller_audio(MS(0), &frame(1000, 160));
        // Nothing for a second (past the gap), then frames again.
        timeline.caller_audio(MS(1000), &frame(1000, 160));
        timeline.agent_audio(MS(1000), &frame(3000, 160));
        drain(&mut timeline, &mut out);
        close(&mut timeline, &mut out);
        assert_eq!(timeline.caller_gaps(), 1);
        assert_eq!(out.len(), 8160);
        assert!(out[160..8000].iter().all(|&(c, a)| c == 0 && a == 0));
        assert!(out[8000..].iter().all(|&(c, a)| c != 0 && a != 0));
    }

    #[test]
    fn memory_is_bounded_and_what_does_not_fit_is_counted() {
        let mut timeline = Timeline::new();
        timeline.caller_audio(MS(0), &frame(0, 160));
        // An agent chunk a minute ahead of playback.
        timeline.agent_audio(MS(60_000), &frame(3000, 160));
        timeline.agent_audio(MS(14_990), &frame(3000, 160));
        assert_eq!(timeline.agent_samples_lost(), 160 + 80);
        assert!(timeline.agent.len() <= MAX_WINDOW_SAMPLES);
        // Agent audio for a slot already encoded is left out too.
        let mut out = Vec::new();
        for n in 1..30u64 {
            timeline.caller_audio(MS(n * 20), &frame(0, 160));
            drain(&mut timeline, &mut out);
        }
        timeline.agent_audio(MS(0), &frame(3000, 160));
        assert_eq!(timeline.agent_samples_lost(), 160 + 80 + 160);
        assert_eq!(timeline.caller_samples_lost(), 0);
    }

    #[test]
    fn a_partial_last_frame_is_padded_and_counted_as_real_samples_only() {
        let mut timeline = Timeline::new();
        let mut out = Vec::new();
        timeline.caller_audio(MS(0), &frame(1000, 100));
        assert_eq!(close(&mut timeline, &mut out), 100);
        assert_eq!(out.len(), SLOT_SAMPLES);
        assert!(out[100..].iter().all(|&(c, a)| c == 0 && a == 0));
    }
}
