//! The mock model's "voice", shared by both protocols: the energy VAD that finds the caller's
//! utterances, the rate conversion that turns an utterance into the echo, the chime spoken for
//! a greeting or a tool's answer, and how a greeting request names its text.
//!
//! Invariants: nothing here knows a wire format or the clock; sample positions are counted in
//! input samples since the VAD was created (or last reset).

/// The bridge's greeting instructions end with this, followed by the exact text to say.
const GREETING_MARK: &str = "by saying exactly this: ";

/// The text a greeting request asks the model to say, if `instructions` is one.
pub(crate) fn greeting_text(instructions: &str) -> Option<&str> {
    instructions
        .rsplit_once(GREETING_MARK)
        .map(|(_, greeting)| greeting)
}

/// Nearest-sample rate conversion: good enough for a mock's echo. For whole-number ratios
/// (8 ↔ 24 kHz) it repeats or drops samples; for 16 → 24 kHz every other sample is repeated.
pub(crate) fn convert_rate(samples: &[i16], from: u32, to: u32) -> Vec<i16> {
    if from == to || from == 0 || to == 0 {
        return samples.to_vec();
    }
    let (from, to) = (u64::from(from), u64::from(to));
    let out_len = samples.len() as u64 * to / from;
    (0..out_len)
        .filter_map(|index| samples.get((index * from / to) as usize).copied())
        .collect()
}

/// A two-note chime (E5 then A5, bell-like decay) at `rate`.
pub(crate) fn chime(duration_ms: u32, rate: u32) -> Vec<i16> {
    let total = (duration_ms as u64 * rate as u64 / 1000) as usize;
    let half = total.div_ceil(2).max(1);
    (0..total)
        .map(|index| {
            let (frequency, local) = if index < half {
                (659.25, index)
            } else {
                (880.0, index - half)
            };
            let t = local as f32 / rate as f32;
            let attack = (local as f32 / (rate as f32 * 0.01)).min(1.0);
            let envelope = attack * (-3.0 * t).exp();
            let tone = (2.0 * std::f32::consts::PI * frequency * t).sin()
                + 0.3 * (2.0 * std::f32::consts::PI * 2.0 * frequency * t).sin();
            (tone * envelope * 7000.0) as i16
        })
        .collect()
}

pub(crate) fn rms_dbfs(window: &[i16]) -> f32 {
    if window.is_empty() {
        return f32::NEG_INFINITY;
    }
    let energy: f64 = window.iter().map(|&s| (s as f64) * (s as f64)).sum();
    let rms = (energy / window.len() as f64).sqrt();
    (20.0 * (rms / 32768.0).log10()) as f32
}

/// PCM16LE bytes to samples, keeping a byte split across two chunks for the next one.
pub(crate) fn pcm16_samples(carry: &mut Option<u8>, bytes: &[u8]) -> Vec<i16> {
    let mut joined = Vec::with_capacity(bytes.len() + 1);
    joined.extend(carry.take());
    joined.extend_from_slice(bytes);
    let pairs = joined.chunks_exact(2);
    *carry = pairs.remainder().first().copied();
    pairs
        .map(|pair| i16::from_le_bytes([pair[0], pair[1]]))
        .collect()
}

/// The VAD's analysis window.
const WINDOW_MS: u32 = 20;

/// What the VAD saw in a chunk of input, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VadEvent {
    /// Speech began in the window starting at this sample.
    Started { window_start: usize },
    /// The utterance has had `sustain_ms` of loud windows (sent once per utterance).
    Sustained,
    /// `silence_ms` of quiet ended the utterance; its last loud window ended at this sample.
    Stopped { speech_end: usize },
}

/// An energy VAD over 20 ms windows: a window louder than the threshold is speech, and enough
/// quiet after speech ends the utterance.
#[derive(Clone, Debug)]
pub(crate) struct EnergyVad {
    threshold_dbfs: f32,
    silence_limit_ms: u32,
    sustain_ms: u32,
    /// Samples not yet forming a whole window.
    window: Vec<i16>,
    /// Samples analysed so far (whole windows).
    analysed: usize,
    in_speech: bool,
    speech_end: usize,
    silence_ms: u32,
    /// Loud milliseconds in the current utterance.
    speech_ms: u32,
}

impl EnergyVad {
    pub(crate) fn new(threshold_dbfs: f32, silence_limit_ms: u32, sustain_ms: u32) -> Self {
        Self {
            threshold_dbfs,
            silence_limit_ms,
            sustain_ms,
            window: Vec::new(),
            analysed: 0,
            in_speech: false,
            speech_end: 0,
            silence_ms: 0,
            speech_ms: 0,
        }
    }

    /// Forgets all input, keeping the thresholds.
    pub(crate) fn reset(&mut self) {
        *self = Self::new(self.threshold_dbfs, self.silence_limit_ms, self.sustain_ms);
    }

    /// Analyses `samples` (at `rate`) and returns what happened, in order.
    pub(crate) fn feed(&mut self, samples: &[i16], rate: u32) -> Vec<VadEvent> {
        let window_len = (rate / (1000 / WINDOW_MS)).max(1) as usize;
        let mut events = Vec::new();
        for &sample in samples {
            self.window.push(sample);
            if self.window.len() < window_len {
                continue;
            }
            let loud = rms_dbfs(&self.window) > self.threshold_dbfs;
            self.window.clear();
            let window_start = self.analysed;
            self.analysed += window_len;
            if loud {
                if !self.in_speech {
                    self.in_speech = true;
                    self.speech_ms = 0;
                    events.push(VadEvent::Started { window_start });
                }
                self.speech_end = self.analysed;
                self.silence_ms = 0;
                let before = self.speech_ms;
                self.speech_ms += WINDOW_MS;
                if before < self.sustain_ms && self.speech_ms >= self.sustain_ms {
                    events.push(VadEvent::Sustained);
                }
            } else if self.in_speech {
                self.silence_ms += WINDOW_MS;
                if self.silence_ms >= self.silence_limit_ms {
                    self.in_speech = false;
                    events.push(VadEvent::Stopped {
                        speech_end: self.speech_end,
                    });
                }
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_conversion_keeps_whole_ratios_and_does_16_to_24() {
        assert_eq!(convert_rate(&[1, 2], 8000, 24000), [1, 1, 1, 2, 2, 2]);
        assert_eq!(convert_rate(&[1, 1, 1, 2, 2, 2], 24000, 8000), [1, 2]);
        assert_eq!(
            convert_rate(&[1, 2, 3, 4], 16000, 24000),
            [1, 1, 2, 3, 3, 4]
        );
        assert_eq!(convert_rate(&[5; 320], 16000, 24000).len(), 480);
    }

    #[test]
    fn vad_reports_start_sustain_and_stop() {
        let mut vad = EnergyVad::new(-35.0, 100, 200);
        let mut input = vec![0i16; 320 * 2];
        input.extend((0..320 * 15).map(|n| if n % 2 == 0 { 8000 } else { -8000 }));
        input.extend(vec![0i16; 320 * 6]);
        let events = vad.feed(&input, 16_000);
        assert_eq!(
            events,
            [
                VadEvent::Started { window_start: 640 },
                VadEvent::Sustained,
                VadEvent::Stopped {
                    speech_end: 320 * 17
                }
            ]
        );
        assert_eq!(greeting_text("x by saying exactly this: Hi!"), Some("Hi!"));
        assert_eq!(greeting_text("DTMF 5"), None);
    }
}
