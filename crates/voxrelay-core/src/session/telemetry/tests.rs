//! Synthetic signals with known levels, silences, one-way stretches and echoes.

use std::f64::consts::TAU;
use std::time::Duration;

use super::*;
use crate::codec::g711::{MULAW_SILENCE, mulaw_encode};

const FRAME: usize = 160;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A sine of `hz` whose RMS is `dbfs`.
fn tone(hz: f64, dbfs: f64, samples: usize) -> Vec<i16> {
    let amplitude = 10f64.powf(dbfs / 20.0) * 2f64.sqrt() * 32768.0;
    (0..samples)
        .map(|n| (amplitude * (TAU * hz * n as f64 / 8000.0).sin()) as i16)
        .collect()
}

/// A small deterministic generator (xorshift), for noise and random syllables.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low)
    }
}

/// Noise at `dbfs` RMS (uniform, so its RMS is its amplitude over √3).
fn noise(rng: &mut Rng, dbfs: f64, samples: usize) -> Vec<f64> {
    let amplitude = 10f64.powf(dbfs / 20.0) * 3f64.sqrt() * 32768.0;
    (0..samples)
        .map(|_| amplitude * (2.0 * rng.unit() - 1.0))
        .collect()
}

/// Speech-like audio: noise in syllables of 80–250 ms at random loudness, with 30–150 ms gaps
/// and an occasional longer pause, around −20 dBFS while it sounds.
fn speech(seed: u64, samples: usize) -> Vec<f64> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(samples);
    while out.len() < samples {
        let on = rng.between(80, 250) as usize * 8;
        let gain = 0.3 + 0.7 * rng.unit();
        for x in noise(&mut rng, -18.0, on) {
            out.push(x * gain);
        }
        let off = if rng.between(0, 8) == 0 {
            rng.between(300, 600)
        } else {
            rng.between(30, 150)
        } as usize
            * 8;
        out.extend(std::iter::repeat_n(0.0, off));
    }
    out.truncate(samples);
    out
}

fn encode(samples: impl IntoIterator<Item = f64>) -> Vec<u8> {
    samples
        .into_iter()
        .map(|x| mulaw_encode(x.clamp(-32768.0, 32767.0) as i16))
        .collect()
}

fn encode_i16(samples: &[i16]) -> Vec<u8> {
    samples.iter().map(|&x| mulaw_encode(x)).collect()
}

/// Feeds `caller` as 20 ms frames, each read as it ends, from time 0.
fn feed_caller(telemetry: &mut CallTelemetry, caller: &[u8]) {
    for (i, frame) in caller.chunks(FRAME).enumerate() {
        telemetry.caller_audio(ms(20 * (i as u64 + 1)), frame);
    }
}

/// Feeds both legs as a call does: each agent chunk (20 ms, at its play time) a playback lead
/// of 120 ms before the caller frame read at that time. `agent` is `None` where the agent was
/// silent (nothing played).
fn feed_call(telemetry: &mut CallTelemetry, caller: &[u8], agent: &[Option<Vec<u8>>]) {
    const LEAD_FRAMES: usize = 6;
    let frames = caller.len() / FRAME;
    for i in 0..frames + LEAD_FRAMES {
        if let Some(Some(chunk)) = agent.get(i) {
            telemetry.agent_audio(ms(20 * i as u64), chunk);
        }
        if i >= LEAD_FRAMES {
            let frame = i - LEAD_FRAMES;
            telemetry.caller_audio(
                ms(20 * (frame as u64 + 1)),
                &caller[frame * FRAME..(frame + 1) * FRAME],
            );
        }
    }
}

fn chunks(audio: &[u8]) -> Vec<Option<Vec<u8>>> {
    audio.chunks(FRAME).map(|c| Some(c.to_vec())).collect()
}

#[test]
fn a_tone_is_measured_at_its_level_within_half_a_db() {
    for level in [-10.0, -20.0, -35.0] {
        let mut telemetry = CallTelemetry::new();
        feed_caller(&mut telemetry, &encode_i16(&tone(1000.0, level, 16_000)));
        let caller = telemetry.summary().caller;
        assert!(
            (caller.rms_dbfs - level).abs() < 0.5,
            "{level}: {}",
            caller.rms_dbfs
        );
        // A sine's peak is 3 dB over its RMS.
        assert!(
            (caller.peak_dbfs - (level + 3.01)).abs() < 0.5,
            "{level}: {}",
            caller.peak_dbfs
        );
        assert_eq!(caller.clipped_samples, 0);
        assert_eq!(caller.audio_ms, 2000);
        assert_eq!(caller.silence_share, 0.0);
    }
}

#[test]
fn samples_at_the_codes_extremes_are_counted_as_clipped() {
    let mut telemetry = CallTelemetry::new();
    // 1 s of a tone driven past full scale: its tops flatten at the code's extremes.
    let loud: Vec<i16> = tone(500.0, 0.0, 8000);
    let clipped_expected = encode_i16(&loud)
        .iter()
        .filter(|&&code| code & 0x7F == 0)
        .count() as u64;
    assert!(clipped_expected > 1000, "{clipped_expected}");
    feed_caller(&mut telemetry, &encode_i16(&loud));
    // The agent plays two frames of the extremes themselves, then one more that a barge-in
    // withdraws before it is heard: not counted.
    telemetry.agent_audio(ms(0), &[0x00, 0x80].repeat(160));
    telemetry.agent_audio(ms(2_000), &[0x00, 0x80].repeat(80));
    telemetry.agent_cut(ms(1_990));
    let summary = telemetry.summary();
    assert_eq!(summary.caller.clipped_samples, clipped_expected);
    assert_eq!(summary.agent.clipped_samples, 320);
    assert!(
        summary.agent.peak_dbfs > -0.5,
        "{}",
        summary.agent.peak_dbfs
    );
}

#[test]
fn silence_share_and_longest_silence() {
    let mut telemetry = CallTelemetry::new();
    let talk = encode_i16(&tone(440.0, -20.0, 8000));
    let mut caller = talk.clone();
    caller.extend(std::iter::repeat_n(MULAW_SILENCE, 16_000));
    caller.extend(&talk);
    caller.extend(std::iter::repeat_n(MULAW_SILENCE, 4_000));
    feed_caller(&mut telemetry, &caller);
    let leg = telemetry.summary().caller;
    assert!(
        (leg.silence_share - 2.5 / 4.5).abs() < 0.01,
        "{}",
        leg.silence_share
    );
    assert_eq!(leg.longest_silence_ms, 2000);
    // The agent never played: silent throughout, one step per caller step.
    let agent = telemetry.summary().agent;
    assert_eq!(agent.silence_share, 1.0);
    assert_eq!(agent.longest_silence_ms, 4500);
    assert_eq!(agent.audio_ms, 0);
    assert_eq!(agent.rms_dbfs, FLOOR_DBFS);
}

#[test]
fn the_latest_caller_speech_frame_ends_the_callers_voice() {
    let mut telemetry = CallTelemetry::new();
    assert_eq!(telemetry.caller_voice_ended(), None);
    let mut caller = encode_i16(&tone(300.0, -25.0, 800));
    caller.extend(std::iter::repeat_n(MULAW_SILENCE, 1600));
    // Line noise well under the threshold is not speech.
    caller.extend(encode(noise(&mut Rng(9), -60.0, 1600)));
    feed_caller(&mut telemetry, &caller);
    // Five tone frames, read at 20..=100 ms.
    assert_eq!(telemetry.caller_voice_ended(), Some(ms(100)));
}

#[test]
fn the_callers_run_of_speech_starts_at_its_first_frame_and_spans_short_pauses() {
    let mut telemetry = CallTelemetry::new();
    assert_eq!(telemetry.caller_voice_started(), None);
    // 200 ms of silence, a 200 ms word, a 200 ms pause (between words), another word.
    let mut caller = vec![MULAW_SILENCE; 1600];
    caller.extend(encode_i16(&tone(300.0, -25.0, 1600)));
    caller.extend(std::iter::repeat_n(MULAW_SILENCE, 1600));
    caller.extend(encode_i16(&tone(300.0, -25.0, 1600)));
    feed_caller(&mut telemetry, &caller);
    assert_eq!(telemetry.caller_voice_started(), Some(ms(200)));
    assert_eq!(telemetry.caller_voice_ended(), Some(ms(800)));
    // After a pause longer than a gap between words, the next word starts a new run.
    let mut telemetry = CallTelemetry::new();
    caller.extend(std::iter::repeat_n(MULAW_SILENCE, 4000));
    caller.extend(encode_i16(&tone(300.0, -25.0, 800)));
    feed_caller(&mut telemetry, &caller);
    assert_eq!(telemetry.caller_voice_started(), Some(ms(1_300)));
}

#[test]
fn one_way_audio_is_detected_when_a_leg_is_silent_while_the_other_talks() {
    // The caller talks for 12 s and the agent plays nothing: the agent's leg is one-way.
    let mut telemetry = CallTelemetry::new();
    feed_call(&mut telemetry, &encode(speech(3, 96_000)), &[]);
    let summary = telemetry.summary();
    assert_eq!(summary.agent.one_way_episodes, 1);
    assert!(
        summary.agent.one_way_ms >= 11_900,
        "{}",
        summary.agent.one_way_ms
    );
    assert_eq!(summary.caller.one_way_episodes, 0);

    // The agent talks for 10 s into a dead caller line (digital silence): the caller's leg.
    let mut telemetry = CallTelemetry::new();
    let agent = encode(speech(4, 80_000));
    let caller = vec![MULAW_SILENCE; 80_000];
    feed_call(&mut telemetry, &caller, &chunks(&agent));
    let summary = telemetry.summary();
    assert_eq!(summary.caller.one_way_episodes, 1);
    assert!(
        summary.caller.one_way_ms >= 9_900,
        "{}",
        summary.caller.one_way_ms
    );
    assert_eq!(summary.agent.one_way_episodes, 0);

    // Just under the wait: a 7.5 s greeting to a listening caller is no episode.
    let mut telemetry = CallTelemetry::new();
    let agent = encode(speech(4, 60_000));
    let mut caller = vec![MULAW_SILENCE; 60_000];
    caller.extend(encode(speech(5, 16_000)));
    feed_call(&mut telemetry, &caller, &chunks(&agent));
    assert_eq!(telemetry.summary().caller.one_way_episodes, 0);
}

#[test]
fn turns_and_shared_pauses_are_not_one_way_audio() {
    // 39 s of turns, 3 s each, then 8 s where both are silent.
    let mut telemetry = CallTelemetry::new();
    let turn = 24_000;
    let mut caller = Vec::new();
    let mut agent = Vec::new();
    for i in 0..13u64 {
        let (talk, quiet) = (encode(speech(10 + i, turn)), vec![MULAW_SILENCE; turn]);
        if i % 2 == 0 {
            caller.extend(&talk);
            agent.extend(std::iter::repeat_n(None, turn / FRAME));
        } else {
            caller.extend(&quiet);
            agent.extend(chunks(&talk));
        }
    }
    caller.extend(std::iter::repeat_n(MULAW_SILENCE, 64_000));
    feed_call(&mut telemetry, &caller, &agent);
    let summary = telemetry.summary();
    assert_eq!(summary.caller.one_way_episodes, 0);
    assert_eq!(summary.agent.one_way_episodes, 0);
    assert!(summary.caller.longest_silence_ms >= 8000);
}

/// The caller's line: `agent` delayed by `delay_ms`, `gain_db` down, plus noise at `noise_dbfs`.
fn echoed(agent: &[f64], delay_ms: usize, gain_db: f64, noise_dbfs: f64) -> Vec<f64> {
    let gain = 10f64.powf(gain_db / 20.0);
    let delay = delay_ms * 8;
    let noise = noise(&mut Rng(77), noise_dbfs, agent.len());
    (0..agent.len())
        .map(|n| {
            let echo = if n >= delay {
                agent[n - delay] * gain
            } else {
                0.0
            };
            echo + noise[n]
        })
        .collect()
}

#[test]
fn an_echo_is_found_at_its_delay_and_level() {
    let agent = speech(5, 80_000);
    let caller = echoed(&agent, 180, -20.0, -60.0);
    let mut telemetry = CallTelemetry::new();
    feed_call(&mut telemetry, &encode(caller), &chunks(&encode(agent)));
    let echo = telemetry.summary().echo;
    assert!(echo.detected, "{echo:?}");
    let delay = echo.delay_ms.expect("a delay");
    assert!((170..=190).contains(&delay), "{echo:?}");
    let level = echo.level_db.expect("a level");
    assert!((level - 20.0).abs() < 3.0, "{echo:?}");
}

#[test]
fn an_echo_is_found_beside_the_callers_own_speech() {
    // The caller talks while the agent is silent; while the agent talks, its echo comes back.
    let agent_talk = speech(6, 40_000);
    let mut agent = Vec::new();
    let mut agent_chunks = Vec::new();
    let caller_talk = encode(speech(7, 40_000));
    agent.extend(std::iter::repeat_n(0.0, 40_000));
    agent_chunks.extend(std::iter::repeat_n(None, 40_000 / FRAME));
    agent.extend(&agent_talk);
    agent_chunks.extend(chunks(&encode(agent_talk.iter().copied())));
    let mut caller = caller_talk;
    let echo = encode(echoed(&agent, 300, -25.0, -60.0));
    caller.extend(&echo[40_000..]);
    let mut telemetry = CallTelemetry::new();
    feed_call(&mut telemetry, &caller, &agent_chunks);
    let echo = telemetry.summary().echo;
    assert!(echo.detected, "{echo:?}");
    assert!(
        (290..=310).contains(&echo.delay_ms.unwrap_or(0)),
        "{echo:?}"
    );
}

#[test]
fn independent_speech_is_not_echo() {
    for seed in 0..6u64 {
        // Both talk at once for 10 s (the worst case: no turns to tell them apart).
        let agent = encode(speech(100 + seed, 80_000));
        let mut rng = Rng(200 + seed);
        let caller: Vec<f64> = speech(300 + seed, 80_000)
            .into_iter()
            .zip(noise(&mut rng, -60.0, 80_000))
            .map(|(x, n)| x + n)
            .collect();
        let mut telemetry = CallTelemetry::new();
        feed_call(&mut telemetry, &encode(caller), &chunks(&agent));
        let echo = telemetry.summary().echo;
        assert!(!echo.detected, "seed {seed}: {echo:?}");
        // Well clear of the threshold, not merely under it.
        assert!(echo.correlation < 0.4, "{echo:?}");
    }
}

#[test]
fn too_little_agent_speech_is_not_judged() {
    let agent = speech(8, 8_000);
    let caller = echoed(&agent, 100, -10.0, -60.0);
    let mut telemetry = CallTelemetry::new();
    feed_call(&mut telemetry, &encode(caller), &chunks(&encode(agent)));
    let echo = telemetry.summary().echo;
    assert_eq!(echo, EchoSummary::default());
}

#[test]
fn a_cut_withdraws_the_agent_audio_never_heard() {
    let mut telemetry = CallTelemetry::new();
    // One second of agent audio placed ahead, cut after 300 ms (1 kHz: its samples reach the
    // sine's crest, so its peak is 3 dB over its RMS).
    let agent = encode_i16(&tone(1000.0, -20.0, 8000));
    for (i, chunk) in agent.chunks(FRAME).enumerate() {
        telemetry.agent_audio(ms(20 * i as u64), chunk);
    }
    telemetry.agent_cut(ms(300));
    feed_caller(&mut telemetry, &vec![MULAW_SILENCE; 16_000]);
    let leg = telemetry.summary().agent;
    assert_eq!(leg.audio_ms, 300);
    assert!((leg.rms_dbfs - -20.0).abs() < 0.5, "{}", leg.rms_dbfs);
    assert!((leg.peak_dbfs - -17.0).abs() < 0.5, "{}", leg.peak_dbfs);
    assert!(
        (leg.silence_share - 1.7 / 2.0).abs() < 0.01,
        "{}",
        leg.silence_share
    );
}

#[test]
fn agent_audio_before_the_caller_or_far_ahead_is_bounded() {
    let mut telemetry = CallTelemetry::new();
    let chunk = encode_i16(&tone(800.0, -20.0, 160));
    // Far ahead of any caller audio, then an hour later: the ring restarts, nothing grows.
    telemetry.agent_audio(ms(0), &chunk);
    telemetry.agent_audio(Duration::from_secs(3600), &chunk);
    telemetry.agent_audio(Duration::from_secs(3599), &chunk);
    // Then the caller's first frame, read long after.
    telemetry.caller_audio(Duration::from_secs(7200), &[MULAW_SILENCE; 160]);
    telemetry.agent_audio(ms(5), &chunk);
    telemetry.agent_cut(Duration::MAX);
    telemetry.agent_cut(ms(0));
    let summary = telemetry.summary();
    assert_eq!(summary.agent.audio_ms, 80);
    assert_eq!(summary.caller.audio_ms, 20);
    // Empty and odd-sized frames are taken as they come.
    telemetry.caller_audio(Duration::MAX, &[]);
    telemetry.caller_audio(Duration::MAX, &[0x10; 7]);
    telemetry.agent_audio(Duration::MAX, &[0x10; 7]);
    assert_eq!(telemetry.summary().caller.audio_ms, 20);
}
