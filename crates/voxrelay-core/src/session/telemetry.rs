//! What the call sounded like, per leg: levels, clipping, silence, one-way audio and the
//! agent's voice echoing back in the caller's audio ([`CallTelemetry`], summed up as an
//! [`AudioTelemetry`] for the call's report and metrics).
//!
//! Fed at the engine's three media tap points (caller frames at their read time, agent chunks
//! at their estimated play time, barge-in cuts), all 8 kHz μ-law on the time since the stream's
//! start; sans-IO, no clock. Both legs are cut into [`STEP`] steps on one timeline: the
//! caller's steps are placed by counting its samples from its first frame (Twilio's audio is
//! contiguous; read times carry the network's jitter, sample counts do not), the agent's by
//! each chunk's play time. A step is speech when its mean square is at or above
//! [`SILENCE_DBFS`], else silence.
//!
//! The agent's steps wait in a bounded ring ([`AGENT_PENDING_STEPS`]) until the caller's
//! timeline reaches them, so a barge-in cut can still withdraw audio that was never heard;
//! when the ring is full (the caller's audio stopped while the agent played on) its oldest
//! step is retired without a caller step to compare it with. Each caller step is compared
//! there and then, within the frame's budget: the agent's recent step powers sit in a fixed
//! ring of [`ECHO_LAGS`] (0–600 ms), and per lag six running sums are kept over the steps
//! where the agent was speaking, so the echo's correlation, delay and level come out at the
//! end in O([`ECHO_LAGS`]) from bounded memory, whatever the call's length. The work an input
//! causes is O(its samples), plus O([`AGENT_PENDING_STEPS`]) at most for one that jumps the
//! timeline.
//!
//! Echo is judged on the power envelope (mean square per step): an echo is the played audio
//! delayed and attenuated, so the caller's step power is the agent's times a gain plus the
//! caller's own noise, and their correlation at the echo's delay is near 1; independent
//! speech does not correlate. The gain is the echo's level below the played audio (its echo
//! return loss).

use std::time::Duration;

use dasp::ring_buffer::Fixed;
use dasp::rms::Rms;
use dasp::{Sample, peak};

use crate::codec::g711::mulaw_decode;

/// The envelope's step: 80 samples at 8 kHz.
pub const STEP: Duration = Duration::from_millis(10);
/// A pause in the caller's speech shorter than this does not end their run of speech (for
/// [`CallTelemetry::caller_voice_started`]): the gaps between words.
pub const VOICE_RUN_GAP: Duration = Duration::from_millis(300);

const STEP_SAMPLES: usize = 80;
const SAMPLES_PER_MS: u64 = 8;

/// A step (or a caller frame) whose mean square is below this is silence. Telephone speech
/// sits around −20 to −30 dBFS, a quiet line's noise below −50.
pub const SILENCE_DBFS: f64 = -45.0;

/// One-way audio: a leg silent this long while the other spoke is an episode. Not 5 s: an
/// agent's greeting or a caller's long question runs 5–6 s with the other side rightly
/// silent, and would count in most calls.
pub const ONE_WAY_AFTER: Duration = Duration::from_secs(8);
/// How much the other leg must have spoken during the silence, counted from half of
/// [`ONE_WAY_AFTER`] into it, for it to count: a leg silent while both are silent is a pause,
/// and one silent after the other's turn ended is a pause too, not one-way audio.
pub const ONE_WAY_OTHER_SPEECH: Duration = Duration::from_secs(1);

/// Echo delays searched: 0 to 600 ms, one per step.
pub const ECHO_LAGS: usize = 61;
/// Correlation at or above which the caller's audio holds the agent's own voice. Independent
/// speech correlates well below it; an echo even 30 dB down stays above it on a quiet line.
pub const ECHO_MIN_CORRELATION: f64 = 0.6;
/// Agent speech steps a lag must have been compared over (1.5 s) before its correlation counts.
pub const ECHO_MIN_STEPS: u32 = 150;

/// Agent steps held for the caller's timeline to reach: the playback lead and a late caller
/// frame, with room to spare.
pub const AGENT_PENDING_STEPS: usize = 256;

/// Levels of a leg that carried only digital silence (or nothing) are reported as this.
pub const FLOOR_DBFS: f64 = -100.0;

/// A μ-law code at either extreme of its range: the sample clipped (or was at full scale).
fn clipped(code: u8) -> bool {
    code & 0x7F == 0
}

/// The sample of a μ-law code, in [-1, 1).
fn sample(code: u8) -> f64 {
    mulaw_decode(code).to_sample::<f64>()
}

fn power_threshold() -> f64 {
    10f64.powf(SILENCE_DBFS / 10.0)
}

fn dbfs(mean_square: f64) -> f64 {
    if mean_square > 0.0 {
        (10.0 * mean_square.log10()).max(FLOOR_DBFS)
    } else {
        FLOOR_DBFS
    }
}

fn steps_ms(steps: u64) -> u64 {
    steps * STEP.as_millis() as u64
}

/// One leg's figures for the call.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LegAudio {
    /// Audio the leg carried (the agent's: what was played and not cut).
    pub audio_ms: u64,
    /// RMS level of that audio, dBFS (a full-scale sine is −3 dBFS; [`FLOOR_DBFS`] for none).
    pub rms_dbfs: f64,
    /// Peak level, dBFS.
    pub peak_dbfs: f64,
    /// Samples at the μ-law code's extremes.
    pub clipped_samples: u64,
    /// Share of the call's steps in which the leg was silent (the agent's when not playing).
    pub silence_share: f64,
    pub longest_silence_ms: u64,
    /// Times the leg was silent for [`ONE_WAY_AFTER`] while the other spoke.
    pub one_way_episodes: u32,
    /// Length of those silences, summed.
    pub one_way_ms: u64,
}

/// The agent's voice coming back in the caller's audio.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EchoSummary {
    pub detected: bool,
    /// Delay of the best-correlated lag (caller audio after the agent's), when detected.
    pub delay_ms: Option<u32>,
    /// Echo return loss: dB below the played audio, when detected.
    pub level_db: Option<f64>,
    /// The best correlation found over the lags (0 when none had enough agent speech).
    pub correlation: f64,
}

/// A call's audio telemetry: a plain snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AudioTelemetry {
    pub caller: LegAudio,
    pub agent: LegAudio,
    pub echo: EchoSummary,
}

/// A leg's running figures.
#[derive(Clone, Copy, Debug, Default)]
struct Leg {
    square_sum: f64,
    samples: u64,
    peak: f64,
    clipped: u64,
    steps: u64,
    silent_steps: u64,
    /// Silent steps in a row, up to now.
    silent_run: u64,
    longest_run: u64,
    /// Speech steps of the other leg during the current silent run, from half the wait on.
    other_speech: u64,
    /// The current silent run was counted as one-way audio.
    one_way_open: bool,
    one_way_episodes: u32,
    /// Steps of one-way runs that have ended.
    one_way_steps: u64,
}

impl Leg {
    /// A held agent step, now heard.
    fn heard(&mut self, held: AgentStep) {
        self.square_sum += f64::from(held.square_sum);
        self.samples += u64::from(held.samples);
        self.peak = self.peak.max(f64::from(held.peak));
        self.clipped += u64::from(held.clipped);
    }

    fn sample(&mut self, code: u8, x: f64) {
        self.square_sum += x * x;
        self.samples += 1;
        let [magnitude] = peak::full_wave([x]);
        self.peak = self.peak.max(magnitude);
        self.clipped += u64::from(clipped(code));
    }

    /// One step of the timeline: this leg's speech or silence, and the other's.
    fn step(&mut self, speech: bool, other_speech: bool) {
        self.steps += 1;
        if speech {
            self.end_run();
            return;
        }
        self.silent_steps += 1;
        self.silent_run += 1;
        self.longest_run = self.longest_run.max(self.silent_run);
        // The other leg's speech counts once this one has been silent for half the wait: a
        // turn's end followed by a pause is not one-way audio, talking on unanswered is.
        if self.silent_run > steps_of(ONE_WAY_AFTER) / 2 {
            self.other_speech += u64::from(other_speech);
        }
        if !self.one_way_open
            && self.silent_run >= steps_of(ONE_WAY_AFTER)
            && self.other_speech >= steps_of(ONE_WAY_OTHER_SPEECH)
        {
            self.one_way_open = true;
            self.one_way_episodes += 1;
        }
    }

    fn end_run(&mut self) {
        if self.one_way_open {
            self.one_way_steps += self.silent_run;
        }
        self.silent_run = 0;
        self.other_speech = 0;
        self.one_way_open = false;
    }

    fn summary(mut self) -> LegAudio {
        // A one-way silence still going at the end counts to the end.
        self.end_run();
        let mean_square = if self.samples > 0 {
            self.square_sum / self.samples as f64
        } else {
            0.0
        };
        LegAudio {
            audio_ms: self.samples / SAMPLES_PER_MS,
            rms_dbfs: dbfs(mean_square),
            peak_dbfs: dbfs(self.peak * self.peak),
            clipped_samples: self.clipped,
            silence_share: if self.steps > 0 {
                self.silent_steps as f64 / self.steps as f64
            } else {
                0.0
            },
            longest_silence_ms: steps_ms(self.longest_run),
            one_way_episodes: self.one_way_episodes,
            one_way_ms: steps_ms(self.one_way_steps),
        }
    }
}

fn steps_of(duration: Duration) -> u64 {
    (duration.as_millis() / STEP.as_millis()) as u64
}

/// An agent step waiting for the caller's timeline: what was placed in it (a cut withdraws
/// it whole, so the agent's figures count only audio the caller heard).
#[derive(Clone, Copy, Debug, Default)]
struct AgentStep {
    square_sum: f32,
    peak: f32,
    samples: u8,
    clipped: u8,
}

/// Per lag, running sums over the caller steps compared with an agent speech step.
struct LagSums {
    n: [u32; ECHO_LAGS],
    a: [f64; ECHO_LAGS],
    c: [f64; ECHO_LAGS],
    aa: [f64; ECHO_LAGS],
    cc: [f64; ECHO_LAGS],
    ac: [f64; ECHO_LAGS],
}

impl Default for LagSums {
    fn default() -> Self {
        Self {
            n: [0; ECHO_LAGS],
            a: [0.0; ECHO_LAGS],
            c: [0.0; ECHO_LAGS],
            aa: [0.0; ECHO_LAGS],
            cc: [0.0; ECHO_LAGS],
            ac: [0.0; ECHO_LAGS],
        }
    }
}

/// The telemetry of one call; see the module's documentation.
pub struct CallTelemetry {
    caller: Leg,
    agent: Leg,
    /// Mean square over the caller's current step (reset at every step: no drift over a call).
    caller_rms: Rms<[f64; 1], [[f64; 1]; STEP_SAMPLES]>,
    caller_step_fill: usize,
    caller_step_square: f64,
    /// The caller's first sample, in samples since the stream's start (set by its first frame).
    caller_origin: Option<u64>,
    voice_ended: Option<Duration>,
    /// Where the caller's current run of speech began (runs join across pauses up to
    /// [`VOICE_RUN_GAP`]).
    voice_started: Option<Duration>,
    /// Agent steps from `agent_base` (the next caller step's) to `agent_end`, by step mod the
    /// ring's length.
    agent_pending: Box<[AgentStep; AGENT_PENDING_STEPS]>,
    agent_base: u64,
    agent_end: u64,
    /// The agent's step powers, oldest first, one per caller step: the last is the current
    /// step's (lag 0).
    agent_recent: Fixed<[f64; ECHO_LAGS]>,
    lags: Box<LagSums>,
    threshold: f64,
}

impl Default for CallTelemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl CallTelemetry {
    pub fn new() -> Self {
        Self {
            caller: Leg::default(),
            agent: Leg::default(),
            caller_rms: Rms::new(Fixed::from([[0.0]; STEP_SAMPLES])),
            caller_step_fill: 0,
            caller_step_square: 0.0,
            caller_origin: None,
            voice_ended: None,
            voice_started: None,
            agent_pending: Box::new([AgentStep::default(); AGENT_PENDING_STEPS]),
            agent_base: 0,
            agent_end: 0,
            agent_recent: Fixed::from([0.0; ECHO_LAGS]),
            lags: Box::default(),
            threshold: power_threshold(),
        }
    }

    /// The end (time since the stream's start) of the latest caller frame judged as speech:
    /// its read time, when its audio had all arrived.
    pub fn caller_voice_ended(&self) -> Option<Duration> {
        self.voice_ended
    }

    /// The start (time since the stream's start) of the caller's latest run of speech: the
    /// beginning of its first frame judged as speech, pauses shorter than [`VOICE_RUN_GAP`]
    /// within it.
    pub fn caller_voice_started(&self) -> Option<Duration> {
        self.voice_started
    }

    /// One caller frame, read at `at`.
    pub fn caller_audio(&mut self, at: Duration, mulaw: &[u8]) {
        if mulaw.is_empty() {
            return;
        }
        if self.caller_origin.is_none() {
            // The frame's audio ended when it was read.
            let end = duration_samples(at);
            self.caller_origin = Some(end.saturating_sub(mulaw.len() as u64));
        }
        let mut frame_square = 0.0;
        for &code in mulaw {
            let x = sample(code);
            frame_square += x * x;
            self.caller.sample(code, x);
            self.caller_step_square = self.caller_rms.next_squared([x])[0];
            self.caller_step_fill += 1;
            if self.caller_step_fill == STEP_SAMPLES {
                let power = self.caller_step_square;
                self.caller_rms.reset();
                self.caller_step_fill = 0;
                self.caller_step(power);
            }
        }
        if frame_square / mulaw.len() as f64 >= self.threshold {
            let run_goes_on = self
                .voice_ended
                .is_some_and(|ended| at.saturating_sub(ended) <= VOICE_RUN_GAP);
            if !run_goes_on {
                // The frame's audio began its length before it was read (8 samples a ms).
                let length = Duration::from_micros(mulaw.len() as u64 * 125);
                self.voice_started = Some(at.saturating_sub(length));
            }
            self.voice_ended = Some(at);
        }
    }

    /// One agent chunk, heard from `play_at`.
    pub fn agent_audio(&mut self, play_at: Duration, mulaw: &[u8]) {
        let mut position = duration_samples(play_at);
        for chunk in mulaw.chunks(STEP_SAMPLES) {
            // The part of `chunk` in the step `position` falls in.
            let step = position / STEP_SAMPLES as u64;
            let room = STEP_SAMPLES - (position % STEP_SAMPLES as u64) as usize;
            let (first, rest) = chunk.split_at(room.min(chunk.len()));
            self.agent_part(step, first);
            if !rest.is_empty() {
                self.agent_part(step + 1, rest);
            }
            position += chunk.len() as u64;
        }
    }

    /// Barge-in at `at`: agent audio placed from then on was never heard.
    pub fn agent_cut(&mut self, at: Duration) {
        let cut = duration_samples(at).div_ceil(STEP_SAMPLES as u64);
        let from = cut.max(self.agent_base);
        for step in from..self.agent_end {
            self.agent_pending[ring_index(step)] = AgentStep::default();
        }
        self.agent_end = self.agent_end.min(from);
    }

    /// The call's figures so far.
    pub fn summary(&self) -> AudioTelemetry {
        let mut agent = self.agent;
        // Agent steps the caller's timeline has not reached yet (the call's last moments).
        for step in self.agent_base..self.agent_end {
            let held = self.agent_pending[ring_index(step)];
            agent.heard(held);
            agent.step(self.speech(held), false);
        }
        AudioTelemetry {
            caller: self.caller.summary(),
            agent: agent.summary(),
            echo: self.echo(),
        }
    }

    fn speech(&self, step: AgentStep) -> bool {
        step_power(step) >= self.threshold
    }

    /// Samples of one agent step, heard from `step`.
    fn agent_part(&mut self, step: u64, mulaw: &[u8]) {
        if step < self.agent_base {
            // The caller's timeline has passed it: its levels count, it is compared with nothing.
            for &code in mulaw {
                self.agent.sample(code, sample(code));
            }
            return;
        }
        self.make_room(step);
        let held = &mut self.agent_pending[ring_index(step)];
        for &code in mulaw {
            let x = sample(code);
            held.square_sum += (x * x) as f32;
            held.peak = held.peak.max(peak::full_wave([x])[0] as f32);
            held.clipped = held.clipped.saturating_add(u8::from(clipped(code)));
        }
        held.samples = held.samples.saturating_add(mulaw.len() as u8);
        self.agent_end = self.agent_end.max(step + 1);
    }

    /// Retires the oldest pending agent steps until `step` fits in the ring.
    fn make_room(&mut self, step: u64) {
        let limit = AGENT_PENDING_STEPS as u64;
        if step >= self.agent_base + 2 * limit {
            // A jump far ahead: everything pending goes, then the ring restarts behind `step`.
            while self.agent_base < self.agent_end {
                self.retire_agent_step(false);
            }
            self.agent_base = step + 1 - limit;
            self.agent_end = self.agent_base;
        }
        while step >= self.agent_base + limit {
            self.retire_agent_step(false);
        }
    }

    /// Takes the oldest pending agent step into the agent's figures; `other_speech`: the
    /// caller spoke in it. Returns its power.
    fn retire_agent_step(&mut self, other_speech: bool) -> f64 {
        let index = ring_index(self.agent_base);
        let held = std::mem::take(&mut self.agent_pending[index]);
        self.agent_base += 1;
        self.agent_end = self.agent_end.max(self.agent_base);
        self.agent.heard(held);
        let power = step_power(held);
        self.agent.step(power >= self.threshold, other_speech);
        power
    }

    /// One caller step of mean square `power` is complete: both legs' step at that time.
    fn caller_step(&mut self, power: f64) {
        let origin = self.caller_origin.unwrap_or(0);
        let step = (origin + self.caller_samples_done()) / STEP_SAMPLES as u64;
        let caller_speech = power >= self.threshold;
        // Agent steps before this one that no caller step met (before the caller's first).
        if step > self.agent_base {
            let behind = (step - self.agent_base).min(AGENT_PENDING_STEPS as u64);
            for _ in 0..behind {
                if self.agent_base >= self.agent_end {
                    break;
                }
                self.retire_agent_step(false);
            }
            self.agent_base = self.agent_base.max(step);
            self.agent_end = self.agent_end.max(self.agent_base);
        }
        let agent_power = if step == self.agent_base {
            self.retire_agent_step(caller_speech)
        } else {
            // Retired early (the ring was full): counted already, unknown here.
            0.0
        };
        let agent_speech = agent_power >= self.threshold;
        self.caller.step(caller_speech, agent_speech);
        self.agent_recent.push(agent_power);
        self.compare(power);
    }

    /// Samples of the caller's completed steps before the current one.
    fn caller_samples_done(&self) -> u64 {
        // Called as a step completes: every caller sample so far, minus the step's own.
        self.caller.samples - STEP_SAMPLES as u64
    }

    /// Adds this caller step to each lag's sums where the agent was speaking `lag` steps ago.
    fn compare(&mut self, caller_power: f64) {
        let threshold = self.threshold;
        let lags = &mut *self.lags;
        let (older, newer) = self.agent_recent.slices();
        // Oldest first: index `i` of the ring is lag `ECHO_LAGS - 1 - i`.
        for (i, &agent_power) in older.iter().chain(newer).enumerate() {
            if agent_power < threshold {
                continue;
            }
            let lag = ECHO_LAGS - 1 - i;
            lags.n[lag] += 1;
            lags.a[lag] += agent_power;
            lags.c[lag] += caller_power;
            lags.aa[lag] += agent_power * agent_power;
            lags.cc[lag] += caller_power * caller_power;
            lags.ac[lag] += agent_power * caller_power;
        }
    }

    /// The best-correlated lag, if it holds an echo.
    fn echo(&self) -> EchoSummary {
        let lags = &*self.lags;
        let mut best: Option<(usize, f64, f64)> = None;
        for lag in 0..ECHO_LAGS {
            if lags.n[lag] < ECHO_MIN_STEPS {
                continue;
            }
            let n = f64::from(lags.n[lag]);
            let cov = lags.ac[lag] / n - (lags.a[lag] / n) * (lags.c[lag] / n);
            let var_a = lags.aa[lag] / n - (lags.a[lag] / n).powi(2);
            let var_c = lags.cc[lag] / n - (lags.c[lag] / n).powi(2);
            if var_a <= 0.0 || var_c <= 0.0 {
                continue;
            }
            let correlation = cov / (var_a * var_c).sqrt();
            if best.is_none_or(|(_, r, _)| correlation > r) {
                best = Some((lag, correlation, cov / var_a));
            }
        }
        let Some((lag, correlation, gain)) = best else {
            return EchoSummary::default();
        };
        let detected = correlation >= ECHO_MIN_CORRELATION && gain > 0.0;
        EchoSummary {
            detected,
            delay_ms: detected.then(|| (lag as u64 * STEP.as_millis() as u64) as u32),
            level_db: detected.then(|| -10.0 * gain.log10()),
            correlation: correlation.max(0.0),
        }
    }
}

fn step_power(step: AgentStep) -> f64 {
    // A step's mean square over the whole step: a partly filled step's silence counts.
    f64::from(step.square_sum) / STEP_SAMPLES as f64
}

fn ring_index(step: u64) -> usize {
    (step % AGENT_PENDING_STEPS as u64) as usize
}

/// `at` in samples; clamped far beyond any call so that arithmetic on it cannot overflow.
fn duration_samples(at: Duration) -> u64 {
    (at.as_micros() / 125).min(u128::from(u64::MAX >> 8)) as u64
}

#[cfg(test)]
mod tests;
