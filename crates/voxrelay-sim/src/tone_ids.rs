//! Frame identities carried in the signal, for `pcm16` mode, where the bridge decodes μ-law,
//! resamples 8 ⇄ 24 kHz and re-encodes, so no bit-level mark (see `watermark`) survives.
//!
//! Owns the tone code and its reader. Every simulated 20 ms frame is the sum of 14 of 28 tones
//! (800, 850, … 2,150 Hz): each tone completes a whole number of cycles in 20 ms, so with the
//! window on the frame the 28 Goertzel filters are exact DFT bins and do not see each other,
//! and a tone that stays on across frames stays continuous. Which 14 are on encodes 25 bits
//! (C(28,14) ≈ 40.1 M codes): the frame number modulo 2^12 (82 s), the call number modulo 2^8
//! and a 5-bit check, scrambled so consecutive frames' tone sets are unrelated. Exactly 14 on
//! means the reader needs no absolute level (it takes the 14 strongest), so gain anywhere in
//! the chain does not matter. The band sits inside the resampler's flat passband (flat to
//! 3.4 kHz) and away from its 4 kHz edge; μ-law leaves each bin about 40 dB above its
//! quantisation noise. Neighbouring tones are adjacent bins, so a tone cut short inside the
//! window spills into them. A window reads as an id only when its 14 strongest bins stand
//! [`MARGIN`] (12 dB) above the other 14 and the check holds: on the frame they stand 35 dB
//! above; a window a quarter into the next frame (half of it, or half a frame beside silence,
//! speech or a resampler's lead-in) reads as no id. Nearer the frame it can still read when
//! the next frame shares most of its tones: an id read means most of the frame arrived in
//! place, and the search climbs to the offset where the margin peaks. The reader takes the
//! frame's full number as the value nearest a hint the caller gives (frames sent so far, or
//! input received so far), and the call's low 8 bits as read ([`call_code`]).
//!
//! [`ToneScanner`] reads ids out of a stream of samples (8 kHz μ-law decoded, or the model's
//! 24 kHz PCM16) delivered in pieces of any size. The resampler adds a constant delay per
//! stream, so frame boundaries are found, not assumed: unlocked, it tries offsets every two
//! 8 kHz samples until a window decodes, takes the offset where the margin peaks nearby and
//! refines it to one 8 kHz sample; locked, it reads one window per frame and drops the lock on
//! the first window that does not decode (a lost or damaged frame, or a new response whose
//! resampler starts afresh), searching again from there. A frame is reported split when a
//! message boundary fell inside it off the stream's 20 ms grid (the grid from the stream's
//! start, on which a relay that does not re-chunk delivers audio; the resampler's delay puts
//! frame boundaries off it, which is not a split), and timed by the message that carried its
//! first sample. Buffers are fixed at construction (three frames), the Goertzel state lives on
//! the stack, and the 24 kHz reader filters every third sample (the model's audio is
//! band-limited to 4 kHz by the bridge's resampler): nothing is allocated per frame.

use std::sync::OnceLock;

use super::watermark::FrameId;
use voxrelay_core::codec::g711;

/// Samples per 20 ms frame at 8 kHz, the rate the filters run at.
pub const FRAME_SAMPLES: usize = 160;
/// Tones, 50 Hz apart from [`LOWEST_HZ`]: adjacent DFT bins of a 20 ms window, so a tone cut
/// short anywhere inside the window spills into its neighbours (at 100 Hz apart a tone cut at
/// the window's middle would not, and half a frame beside silence would read as the frame).
const TONES: usize = 28;
/// Tones on in every frame.
const ON: usize = 14;
const LOWEST_HZ: usize = 800;
const SPACING_HZ: usize = 50;
/// Peak of one tone; 14 in phase would reach 22,400, so a frame never clips.
const AMPLITUDE: f32 = 1_600.0;
/// The 14th strongest bin must hold this many times the energy of the 15th (12 dB). On the
/// frame, through the bridge both ways, it holds more than 1,000 times; it falls about tenfold
/// per 8 kHz sample off the frame, and a window a quarter off it reads as nothing.
pub const MARGIN: f32 = 16.0;
/// And at least this share of a clean tone's amplitude (a frame at −10 dB still reads).
const MIN_AMPLITUDE_SHARE: f32 = 0.3;

const FRAME_BITS: u32 = 12;
const CALL_BITS: u32 = 8;
const CHECK_BITS: u32 = 5;
const PAYLOAD_BITS: u32 = FRAME_BITS + CALL_BITS + CHECK_BITS;
const PAYLOAD_MASK: u32 = (1 << PAYLOAD_BITS) - 1;
const FRAME_MODULUS: i64 = 1 << FRAME_BITS;
/// An odd multiplier (a bijection modulo 2^25) and a mask that spread consecutive frames.
const SCRAMBLE_MUL: u32 = 0x00B5_3A6D;
const SCRAMBLE_XOR: u32 = 0x0135_C2A9;

/// Errors building a [`ToneScanner`].
#[derive(Debug, thiserror::Error)]
pub enum ToneIdError {
    #[error("tone ids are read at 8, 16 or 24 kHz, not {0} Hz")]
    UnsupportedRate(u32),
}

/// What the code keeps of a call number: its low 8 bits.
pub fn call_code(call: u32) -> u16 {
    (call & ((1 << CALL_BITS) - 1)) as u16
}

/// Everything computed once per process: the tone tables, the filters' coefficients and the
/// binomials of the code.
struct Tables {
    /// One frame of each tone at [`AMPLITUDE`], phases spread (Schroeder) to keep the sum's
    /// peaks low.
    tones: [[f32; FRAME_SAMPLES]; TONES],
    /// Goertzel's 2·cos(ω) per tone at 8 kHz.
    coeff: [f32; TONES],
    /// `binomial[n][k]` for n ≤ 28, k ≤ 14.
    binomial: [[u32; ON + 1]; TONES + 1],
    /// The multiplicative inverse of [`SCRAMBLE_MUL`] modulo 2^25.
    unscramble_mul: u32,
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        use std::f64::consts::PI;
        let mut tones = [[0f32; FRAME_SAMPLES]; TONES];
        let mut coeff = [0f32; TONES];
        for (b, tone) in tones.iter_mut().enumerate() {
            let cycles = (LOWEST_HZ + SPACING_HZ * b) as f64 / 50.0;
            let phase = PI * (b * b) as f64 / TONES as f64;
            for (n, sample) in tone.iter_mut().enumerate() {
                let angle = 2.0 * PI * cycles * n as f64 / FRAME_SAMPLES as f64 + phase;
                *sample = (f64::from(AMPLITUDE) * angle.sin()) as f32;
            }
            coeff[b] = (2.0 * (2.0 * PI * cycles / FRAME_SAMPLES as f64).cos()) as f32;
        }
        let mut binomial = [[0u32; ON + 1]; TONES + 1];
        for n in 0..=TONES {
            binomial[n][0] = 1;
            for k in 1..=ON.min(n) {
                binomial[n][k] =
                    binomial[n - 1][k - 1] + if k < n { binomial[n - 1][k] } else { 0 };
            }
        }
        // Newton's iteration doubles the correct low bits each round: 5 rounds reach 32.
        let mut inverse = SCRAMBLE_MUL;
        for _ in 0..5 {
            inverse = inverse.wrapping_mul(2u32.wrapping_sub(SCRAMBLE_MUL.wrapping_mul(inverse)));
        }
        Tables {
            tones,
            coeff,
            binomial,
            unscramble_mul: inverse & PAYLOAD_MASK,
        }
    })
}

fn check(frame: u32, call: u32) -> u32 {
    let mixed = ((frame << CALL_BITS) | call).wrapping_mul(0x9E37_79B9);
    mixed >> (32 - CHECK_BITS)
}

/// The set of tones (bit b = tone b on) that codes `id`.
fn mask_of(id: FrameId) -> u32 {
    let t = tables();
    let frame = id.frame & ((1 << FRAME_BITS) - 1);
    let call = u32::from(id.call) & ((1 << CALL_BITS) - 1);
    let payload = (frame << (CALL_BITS + CHECK_BITS)) | (call << CHECK_BITS) | check(frame, call);
    let mut rank = (payload.wrapping_mul(SCRAMBLE_MUL) ^ SCRAMBLE_XOR) & PAYLOAD_MASK;
    // Unranks in the combinatorial number system: the largest position first.
    let mut mask = 0u32;
    let mut position = TONES;
    for k in (1..=ON).rev() {
        position -= 1;
        while t.binomial[position][k] > rank {
            position -= 1;
        }
        rank -= t.binomial[position][k];
        mask |= 1 << position;
    }
    mask
}

/// The (frame modulo 2^12, call code) a set of 14 tones codes, if its check holds.
fn payload_of(mask: u32) -> Option<(u32, u16)> {
    if mask.count_ones() as usize != ON {
        return None;
    }
    let t = tables();
    let mut rank = 0u32;
    let mut k = 0;
    for position in 0..TONES {
        if mask & (1 << position) != 0 {
            k += 1;
            rank += t.binomial[position][k];
        }
    }
    if rank > PAYLOAD_MASK {
        return None;
    }
    let payload =
        ((rank ^ SCRAMBLE_XOR) & PAYLOAD_MASK).wrapping_mul(t.unscramble_mul) & PAYLOAD_MASK;
    let frame = payload >> (CALL_BITS + CHECK_BITS);
    let call = (payload >> CHECK_BITS) & ((1 << CALL_BITS) - 1);
    (check(frame, call) == payload & ((1 << CHECK_BITS) - 1)).then_some((frame, call as u16))
}

/// Writes frame `id` as 20 ms of 8 kHz linear samples.
pub fn synthesize(id: FrameId, out: &mut [i16; FRAME_SAMPLES]) {
    let t = tables();
    let mask = mask_of(id);
    let mut sum = [0f32; FRAME_SAMPLES];
    for (b, tone) in t.tones.iter().enumerate() {
        if mask & (1 << b) != 0 {
            for (acc, &sample) in sum.iter_mut().zip(tone) {
                *acc += sample;
            }
        }
    }
    for (sample, value) in out.iter_mut().zip(sum) {
        *sample = value.round() as i16;
    }
}

/// Writes frame `id` as 20 ms of 8 kHz μ-law, what a simulated caller sends.
pub fn synthesize_mulaw(id: FrameId, out: &mut [u8; FRAME_SAMPLES]) {
    let mut linear = [0i16; FRAME_SAMPLES];
    synthesize(id, &mut linear);
    g711::mulaw_encode_slice(&linear, out);
}

/// What one window reads as: the code, and how far its 14th bin stands above its 15th.
#[derive(Clone, Copy, Debug)]
struct Reading {
    code: Option<(u32, u16)>,
    margin: f32,
}

/// Runs the 28 filters over 160 samples taken every `step` from `samples`.
fn read_window(samples: &[i16], step: usize) -> Reading {
    let t = tables();
    let (mut s1, mut s2) = ([0f32; TONES], [0f32; TONES]);
    for &sample in samples.iter().step_by(step).take(FRAME_SAMPLES) {
        let x = f32::from(sample);
        for b in 0..TONES {
            let s0 = x + t.coeff[b] * s1[b] - s2[b];
            s2[b] = s1[b];
            s1[b] = s0;
        }
    }
    let mut energy = [0f32; TONES];
    for b in 0..TONES {
        energy[b] = s1[b] * s1[b] + s2[b] * s2[b] - t.coeff[b] * s1[b] * s2[b];
    }
    let mut order = [0u8; TONES];
    for (b, slot) in order.iter_mut().enumerate() {
        *slot = b as u8;
    }
    order.sort_unstable_by(|&a, &b| energy[usize::from(b)].total_cmp(&energy[usize::from(a)]));
    let weakest_on = energy[usize::from(order[ON - 1])];
    let strongest_off = energy[usize::from(order[ON])];
    let margin = weakest_on / strongest_off.max(f32::MIN_POSITIVE);
    let floor = MIN_AMPLITUDE_SHARE * AMPLITUDE * FRAME_SAMPLES as f32 / 2.0;
    if margin < MARGIN || weakest_on < floor * floor {
        return Reading { code: None, margin };
    }
    let mask = order[..ON].iter().fold(0u32, |mask, &b| mask | 1 << b);
    Reading {
        code: payload_of(mask),
        margin,
    }
}

/// The number nearest `hint` whose low 12 bits are `low`.
fn unwrap_frame(low: u32, hint: u32) -> u32 {
    let hint = i64::from(hint);
    let delta = (i64::from(low) - hint).rem_euclid(FRAME_MODULUS);
    let delta = if delta >= FRAME_MODULUS / 2 {
        delta - FRAME_MODULUS
    } else {
        delta
    };
    let frame = hint + delta;
    let frame = if frame < 0 {
        frame + FRAME_MODULUS
    } else {
        frame
    };
    u32::try_from(frame).unwrap_or(u32::MAX)
}

/// One frame read from a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ToneFrame {
    /// Its call is the call's [`call_code`].
    pub id: FrameId,
    /// A message boundary fell inside it off the stream's 20 ms grid.
    pub split: bool,
    /// Where it starts, in samples since the stream's start (or its last reset).
    pub start: u64,
    /// The `at` of the message that carried its first sample: when the relay delivered the
    /// frame's audio, not when the resampler's lookahead let its last 5 ms follow (with the
    /// next 20 ms of input, which would add 20 ms that are framing, not relaying).
    pub first_at: u64,
}

/// Off-grid message boundaries remembered (a frame is read at most a few pushes after its end).
const BOUNDARIES: usize = 8;
/// Message starts remembered with their `at`; a frame cut into more pieces than this is timed
/// by the oldest one remembered (a little early).
const ARRIVALS: usize = 16;

/// Reads tone ids out of one stream of audio (a direction of a call, or one generation).
#[derive(Clone, Debug)]
pub struct ToneScanner {
    /// Input samples per 8 kHz sample (1 at 8 kHz, 3 at 24 kHz).
    step: usize,
    /// Input samples per frame.
    frame: usize,
    /// Input samples between the offsets tried while searching (two 8 kHz samples: a window
    /// decodes only within about two of the frame).
    coarse: usize,
    buffer: Box<[i16]>,
    len: usize,
    /// Stream position of `buffer[0]`.
    base: u64,
    /// Locked: where the next frame starts. Searching: the next offset to try.
    next: u64,
    locked: bool,
    /// Stream position up to which every sample is in a frame or counted as skipped.
    covered: u64,
    off_grid: [u64; BOUNDARIES],
    off_grid_next: usize,
    /// (stream position, `at`) of the latest messages, a ring.
    arrivals: [(u64, u64); ARRIVALS],
    arrivals_next: usize,
    /// Samples that fell in no frame: lead-ins, partial frames, damaged frames, noise.
    pub skipped_samples: u64,
}

impl ToneScanner {
    /// A reader for audio at `rate_hz` (8, 16 or 24 kHz).
    pub fn new(rate_hz: u32) -> Result<Self, ToneIdError> {
        let step = match rate_hz {
            8_000 => 1,
            16_000 => 2,
            24_000 => 3,
            other => return Err(ToneIdError::UnsupportedRate(other)),
        };
        let frame = FRAME_SAMPLES * step;
        Ok(Self {
            step,
            frame,
            coarse: 2 * step,
            buffer: vec![0; 3 * frame].into_boxed_slice(),
            len: 0,
            base: 0,
            next: 0,
            locked: false,
            covered: 0,
            off_grid: [u64::MAX; BOUNDARIES],
            off_grid_next: 0,
            arrivals: [(u64::MAX, 0); ARRIVALS],
            arrivals_next: 0,
            skipped_samples: 0,
        })
    }

    /// Feeds one message's samples, which arrived at `at` (any clock); calls `on_frame` for
    /// every frame completed by them. `hint` is a frame number near the ones expected (within
    /// 41 s).
    pub fn push(
        &mut self,
        mut samples: &[i16],
        hint: u32,
        at: u64,
        mut on_frame: impl FnMut(ToneFrame),
    ) {
        let end = self.end();
        if samples.is_empty() {
            return;
        }
        if !end.is_multiple_of(self.frame as u64) {
            self.off_grid[self.off_grid_next] = end;
            self.off_grid_next = (self.off_grid_next + 1) % BOUNDARIES;
        }
        self.arrivals[self.arrivals_next] = (end, at);
        self.arrivals_next = (self.arrivals_next + 1) % ARRIVALS;
        while !samples.is_empty() {
            let take = samples.len().min(self.buffer.len() - self.len);
            self.buffer[self.len..self.len + take].copy_from_slice(&samples[..take]);
            self.len += take;
            samples = &samples[take..];
            self.scan(hint, &mut on_frame);
            self.compact();
        }
    }

    /// Starts a new stream (after a `clear`): what is held is skipped, positions restart at 0.
    pub fn reset(&mut self) {
        self.skipped_samples += self.end().saturating_sub(self.covered);
        self.len = 0;
        self.base = 0;
        self.next = 0;
        self.locked = false;
        self.covered = 0;
        self.off_grid = [u64::MAX; BOUNDARIES];
        self.arrivals = [(u64::MAX, 0); ARRIVALS];
    }

    /// Samples held that are not in a frame yet.
    pub fn pending(&self) -> usize {
        self.end().saturating_sub(self.covered) as usize
    }

    fn end(&self) -> u64 {
        self.base + self.len as u64
    }

    /// Reads the window starting at stream position `at`, if its samples are all held.
    fn read_at(&self, at: u64) -> Option<Reading> {
        let from = usize::try_from(at.checked_sub(self.base)?).ok()?;
        let window = self.buffer.get(from..from + self.frame)?;
        (from + self.frame <= self.len).then(|| read_window(window, self.step))
    }

    fn scan(&mut self, hint: u32, on_frame: &mut impl FnMut(ToneFrame)) {
        loop {
            if self.locked {
                let Some(reading) = self.read_at(self.next) else {
                    return;
                };
                match reading.code {
                    Some(code) => self.emit(self.next, code, hint, on_frame),
                    None => {
                        self.locked = false;
                        self.next += self.coarse as u64;
                    }
                }
                continue;
            }
            // Searching: the first offset that decodes, then the peak of the margin near it.
            let Some(reading) = self.read_at(self.next) else {
                return;
            };
            if reading.code.is_none() {
                self.next += self.coarse as u64;
                continue;
            }
            let Some(best) = self.refine(self.next) else {
                // Not enough audio held yet to refine: wait for more.
                return;
            };
            if let Some(code) = self.read_at(best).and_then(|reading| reading.code) {
                self.emit(best, code, hint, on_frame);
            } else {
                self.next += self.coarse as u64;
            }
        }
    }

    /// The offset near `found` (the first that decodes) where the margin peaks: every coarse
    /// step over the next 16 8 kHz samples (wider than the span a frame decodes in), then
    /// single 8 kHz samples either side of the best. `None` until enough audio is held.
    fn refine(&self, found: u64) -> Option<u64> {
        let margin = |at: u64| -> Option<f32> {
            let reading = self.read_at(at)?;
            Some(if reading.code.is_some() {
                reading.margin
            } else {
                0.0
            })
        };
        let coarse = self.coarse as u64;
        let (mut best, mut best_margin) = (found, margin(found)?);
        for i in 1..=(16 * self.step as u64) / coarse {
            let at = found + i * coarse;
            let candidate = margin(at)?;
            if candidate > best_margin {
                (best, best_margin) = (at, candidate);
            }
        }
        let centre = best;
        let step = self.step as u64;
        let mut at = centre.saturating_sub(coarse - step).max(self.base);
        while at <= centre + coarse - step {
            if at != centre {
                let candidate = margin(at)?;
                if candidate > best_margin {
                    (best, best_margin) = (at, candidate);
                }
            }
            at += step;
        }
        Some(best)
    }

    fn emit(
        &mut self,
        start: u64,
        code: (u32, u16),
        hint: u32,
        on_frame: &mut impl FnMut(ToneFrame),
    ) {
        let end = start + self.frame as u64;
        self.skipped_samples += start.saturating_sub(self.covered);
        self.covered = self.covered.max(end);
        let split = self.off_grid.iter().any(|&at| at > start && at < end);
        // The latest message that began at or before the frame, else the oldest remembered.
        let first_at = self
            .arrivals
            .iter()
            .filter(|&&(position, _)| position <= start)
            .max_by_key(|&&(position, _)| position)
            .or_else(|| {
                self.arrivals
                    .iter()
                    .filter(|&&(position, _)| position != u64::MAX)
                    .min_by_key(|&&(position, _)| position)
            })
            .map_or(0, |&(_, at)| at);
        on_frame(ToneFrame {
            id: FrameId {
                call: code.1,
                frame: unwrap_frame(code.0, hint),
            },
            split,
            start,
            first_at,
        });
        self.next = end;
        self.locked = true;
    }

    /// Drops what no later window can need: before the next frame when locked, before the
    /// earliest offset a refinement may look at when searching.
    fn compact(&mut self) {
        let keep_from = if self.locked {
            self.next
        } else {
            self.next.saturating_sub(self.coarse as u64)
        };
        let drop = usize::try_from(keep_from.saturating_sub(self.base))
            .unwrap_or(usize::MAX)
            .min(self.len);
        if drop == 0 {
            if self.len == self.buffer.len() {
                // Full with nothing to drop cannot happen (a search always moves on), but a
                // stuck reader must not stop taking audio: give up the oldest frame.
                self.buffer.copy_within(self.frame.., 0);
                self.len -= self.frame;
                self.base += self.frame as u64;
                self.next = self.next.max(self.base);
            }
            return;
        }
        let dropped_end = self.base + drop as u64;
        self.skipped_samples += dropped_end.saturating_sub(self.covered);
        self.covered = self.covered.max(dropped_end);
        self.buffer.copy_within(drop..self.len, 0);
        self.len -= drop;
        self.base = dropped_end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use voxrelay_core::codec::StreamResampler;

    const PIECES: [usize; 7] = [37, 301, 5, 1, 999, 160, 480];

    fn id(call: u16, frame: u32) -> FrameId {
        FrameId { call, frame }
    }

    /// What a caller sends: frames `frames` of `call`, μ-law.
    fn caller_audio(call: u16, frames: std::ops::Range<u32>) -> Vec<u8> {
        let mut out = Vec::new();
        let mut frame = [0u8; FRAME_SAMPLES];
        for k in frames {
            synthesize_mulaw(id(call, k), &mut frame);
            out.extend_from_slice(&frame);
        }
        out
    }

    /// Splits `len` into pieces cycling through `sizes` (0 skipped).
    fn pieces(len: usize, sizes: &[usize]) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        let mut at = 0;
        for &size in sizes.iter().cycle() {
            if at >= len {
                break;
            }
            let end = (at + size.max(1)).min(len);
            out.push(at..end);
            at = end;
        }
        out
    }

    /// The bridge's uplink in `pcm16` (`voxrelay_core`'s codec, as the engine runs it): μ-law
    /// decoded, resampled to 24 kHz; the PCM16 framing in between is lossless.
    fn bridge_uplink(mulaw: &[u8], sizes: &[usize]) -> Vec<i16> {
        let mut resampler = StreamResampler::new(8_000, 24_000).unwrap();
        let (mut linear, mut out) = (Vec::new(), Vec::new());
        for range in pieces(mulaw.len(), sizes) {
            linear.clear();
            linear.extend(mulaw[range].iter().map(|&code| g711::mulaw_decode(code)));
            resampler.process(&linear, &mut out);
        }
        out
    }

    /// The bridge's downlink in `pcm16`: the model's 24 kHz audio resampled to 8 kHz, μ-law.
    fn bridge_downlink(pcm: &[i16], sizes: &[usize]) -> Vec<u8> {
        let mut resampler = StreamResampler::new(24_000, 8_000).unwrap();
        let mut out = Vec::new();
        for range in pieces(pcm.len(), sizes) {
            resampler.process(&pcm[range], &mut out);
        }
        out.iter()
            .map(|&sample| g711::mulaw_encode(sample))
            .collect()
    }

    fn decode(mulaw: &[u8]) -> Vec<i16> {
        mulaw.iter().map(|&code| g711::mulaw_decode(code)).collect()
    }

    fn scan(
        rate: u32,
        samples: &[i16],
        sizes: &[usize],
        hint: u32,
    ) -> (Vec<ToneFrame>, ToneScanner) {
        let mut scanner = ToneScanner::new(rate).unwrap();
        let mut frames = Vec::new();
        for range in pieces(samples.len(), sizes) {
            scanner.push(&samples[range], hint, 0, |frame| frames.push(frame));
        }
        (frames, scanner)
    }

    fn numbers(frames: &[ToneFrame]) -> Vec<u32> {
        frames.iter().map(|f| f.id.frame).collect()
    }

    #[test]
    fn every_code_round_trips_and_neighbours_differ() {
        for call in [0u16, 1, 7, 255] {
            let mut previous = 0;
            for frame in 0..(1 << FRAME_BITS) {
                let mask = mask_of(id(call, frame));
                assert_eq!(mask.count_ones() as usize, ON);
                assert!(mask < 1 << TONES);
                assert_eq!(payload_of(mask), Some((frame, call)), "{call}/{frame}");
                assert_ne!(mask, previous);
                previous = mask;
            }
        }
        // A set of tones that is not a code (wrong count, or the check fails) reads as none.
        assert_eq!(payload_of(0x3FFF << 1 | 1), payload_of(0x7FFF));
        assert_eq!(payload_of(0x7FFF), None);
        let forged = (0..1u32 << 20)
            .map(|n| n.wrapping_mul(0x2C1B_3C6D) & ((1 << TONES) - 1))
            .filter(|mask| mask.count_ones() as usize == ON)
            .filter(|&mask| payload_of(mask).is_some())
            .count();
        let tried = (0..1u32 << 20)
            .map(|n| n.wrapping_mul(0x2C1B_3C6D) & ((1 << TONES) - 1))
            .filter(|mask| mask.count_ones() as usize == ON)
            .count();
        // 1 in 32 of random 14-of-28 sets passes the 5-bit check (and 2^25 of 40.1 M ranks).
        assert!(forged * 20 < tried, "{forged} of {tried}");
    }

    #[test]
    fn frames_wrap_at_4096_and_unwrap_near_the_hint() {
        assert_eq!(unwrap_frame(5, 4_100), 4_101);
        assert_eq!(unwrap_frame(4_095, 4_100), 4_095);
        assert_eq!(unwrap_frame(4_090, 3), 4_090);
        assert_eq!(unwrap_frame(10, 0), 10);
        assert_eq!(unwrap_frame(100, 10_000), 8_292);
        let (frames, _) = scan(
            8_000,
            &decode(&caller_audio(3, 4_094..4_098)),
            &[160],
            4_096,
        );
        assert_eq!(numbers(&frames), [4_094, 4_095, 4_096, 4_097]);
    }

    #[test]
    fn a_clean_frame_reads_with_a_wide_margin_and_silence_reads_as_nothing() {
        let samples = decode(&caller_audio(9, 0..1));
        let reading = read_window(&samples, 1);
        assert_eq!(reading.code, Some((0, 9)));
        assert!(reading.margin > 1_000.0, "margin {}", reading.margin);
        assert_eq!(read_window(&[0; FRAME_SAMPLES], 1).code, None);
        // Half of one frame and half of the next is no frame.
        let two = decode(&caller_audio(9, 0..2));
        assert_eq!(read_window(&two[80..240], 1).code, None);
        let peak = (0..1_000)
            .map(|k| {
                let mut linear = [0i16; FRAME_SAMPLES];
                synthesize(id(1, k), &mut linear);
                linear.iter().map(|s| s.unsigned_abs()).max().unwrap_or(0)
            })
            .max();
        assert!(peak < Some(22_400), "{peak:?}");
    }

    #[test]
    fn ids_survive_the_bridges_pcm16_chain_both_ways_at_any_chunking() {
        let sent = caller_audio(42, 0..150);
        for sizes in [&[160][..], &PIECES[..], &[7, 1_111][..]] {
            // Uplink: what the echo model reads at 24 kHz.
            let at_model = bridge_uplink(&sent, sizes);
            let (up, scanner) = scan(24_000, &at_model, sizes, 10);
            assert_eq!(numbers(&up), (0..149).collect::<Vec<_>>(), "{sizes:?}");
            assert!(up.iter().all(|f| f.id.call == 42));
            // The resampler's 5 ms: frame k starts 120 samples after 20 ms × k.
            assert_eq!(up[0].start, 120, "{sizes:?}");
            assert_eq!(scanner.skipped_samples, 120);
            // Downlink: the model's audio echoed back, as the caller reads it at 8 kHz.
            let at_caller = decode(&bridge_downlink(&at_model, sizes));
            let (down, _) = scan(8_000, &at_caller, sizes, 100);
            assert_eq!(numbers(&down), (0..149).collect::<Vec<_>>(), "{sizes:?}");
            assert_eq!(down[0].start, 80, "{sizes:?}");
        }
    }

    /// The 8 kHz stream a caller hears for frames 0..60, in 20 ms messages.
    fn heard(call: u16) -> Vec<u8> {
        bridge_downlink(&bridge_uplink(&caller_audio(call, 0..60), &[160]), &[480])
    }

    fn scan_messages(messages: &[&[u8]]) -> (Vec<ToneFrame>, ToneScanner) {
        let mut scanner = ToneScanner::new(8_000).unwrap();
        let mut frames = Vec::new();
        for (n, message) in messages.iter().enumerate() {
            scanner.push(&decode(message), 60, n as u64, |frame| frames.push(frame));
        }
        (frames, scanner)
    }

    #[test]
    fn a_dropped_message_loses_the_frames_it_carried_and_no_later_one() {
        let audio = heard(5);
        let messages: Vec<&[u8]> = audio.chunks(FRAME_SAMPLES).collect();
        let (clean, _) = scan_messages(&messages);
        assert_eq!(numbers(&clean), (0..59).collect::<Vec<_>>());
        // Frame k starts half-way through message k: timed by that message, not by the next
        // one that completes it.
        assert!(clean.iter().all(|f| f.first_at == u64::from(f.id.frame)));
        let mut dropped = messages.clone();
        dropped.remove(20);
        let (frames, scanner) = scan_messages(&dropped);
        let got = numbers(&frames);
        // Message 20 held the end of frame 19 and the start of frame 20 (the round trip's
        // 10 ms put frames half a message off the messages): both are lost, nothing shifts.
        let expected: Vec<u32> = (0..59).filter(|k| !(19..=20).contains(k)).collect();
        assert_eq!(got, expected);
        assert!(scanner.skipped_samples >= 160);
        assert!(frames.iter().all(|f| !f.split));
    }

    #[test]
    fn a_duplicated_frame_reads_twice_and_a_duplicated_message_is_not_hidden() {
        let audio = heard(5);
        // A relay replaying frame 30 whole (its 160 samples, where they lie in the stream).
        let start = 80 + 30 * FRAME_SAMPLES;
        let frame: Vec<u8> = audio[start..start + FRAME_SAMPLES].to_vec();
        let mut replayed = audio[..start + FRAME_SAMPLES].to_vec();
        replayed.extend_from_slice(&frame);
        replayed.extend_from_slice(&audio[start + FRAME_SAMPLES..]);
        let messages: Vec<&[u8]> = replayed.chunks(FRAME_SAMPLES).collect();
        let (frames, _) = scan_messages(&messages);
        let got = numbers(&frames);
        assert_eq!(got.iter().filter(|&&k| k == 30).count(), 2, "{got:?}");
        assert_eq!(got.len(), 60);
        // Replaying a 20 ms message (half of two frames) repeats no whole frame: the replay
        // reads as samples with no id.
        let messages: Vec<&[u8]> = audio.chunks(FRAME_SAMPLES).collect();
        let (_, clean) = scan_messages(&messages);
        let mut doubled = messages.clone();
        doubled.insert(20, messages[20]);
        let (frames, scanner) = scan_messages(&doubled);
        assert_eq!(numbers(&frames), (0..59).collect::<Vec<_>>());
        assert_eq!(scanner.skipped_samples, clean.skipped_samples + 160);
    }

    #[test]
    fn re_chunked_audio_reads_whole_and_split() {
        let audio = heard(5);
        let on_grid: Vec<&[u8]> = audio.chunks(2 * FRAME_SAMPLES).collect();
        let (frames, _) = scan_messages(&on_grid);
        assert_eq!(frames.len(), 59);
        assert!(frames.iter().all(|f| !f.split));
        // Each 20 ms split in two, 50 and 110 samples.
        let mut rechunked = Vec::new();
        for message in audio.chunks(FRAME_SAMPLES) {
            let (a, b) = message.split_at(message.len().min(50));
            rechunked.push(a);
            rechunked.push(b);
        }
        let (frames, _) = scan_messages(&rechunked);
        assert_eq!(numbers(&frames), (0..59).collect::<Vec<_>>());
        assert!(frames.iter().all(|f| f.split));
    }

    #[test]
    fn another_calls_frame_reads_as_that_call() {
        let (mine, theirs) = (heard(5), heard(6));
        let mut mixed = mine[..80 + 10 * FRAME_SAMPLES].to_vec();
        mixed.extend_from_slice(&theirs[80 + 10 * FRAME_SAMPLES..80 + 11 * FRAME_SAMPLES]);
        mixed.extend_from_slice(&mine[80 + 11 * FRAME_SAMPLES..]);
        let (frames, _) = scan(8_000, &decode(&mixed), &[160], 60);
        let calls: Vec<(u16, u32)> = frames.iter().map(|f| (f.id.call, f.id.frame)).collect();
        assert_eq!(calls[10], (6, 10));
        assert!(
            calls
                .iter()
                .enumerate()
                .all(|(k, &(call, frame))| frame == k as u32 && (call == 5) != (k == 10))
        );
        assert_eq!(call_code(256 + 6), 6);
    }

    #[test]
    fn the_lock_is_found_again_after_a_new_response_and_after_reset() {
        let audio = heard(5);
        // A second response: its own resampler, so its frames sit elsewhere (here 37 samples
        // of lead-in later), with no reset in between.
        let mut stream = audio[..80 + 20 * FRAME_SAMPLES].to_vec();
        stream.extend_from_slice(&[0xFF; 37]);
        stream.extend_from_slice(&audio[80 + 30 * FRAME_SAMPLES..]);
        let (frames, _) = scan(8_000, &decode(&stream), &PIECES, 60);
        let expected: Vec<u32> = (0..20).chain(30..59).collect();
        assert_eq!(numbers(&frames), expected);

        let mut scanner = ToneScanner::new(8_000).unwrap();
        let mut seen = Vec::new();
        let samples = decode(&audio);
        scanner.push(&samples[..1_000], 60, 0, |f| seen.push(f.id.frame));
        let before = seen.len();
        scanner.reset();
        assert_eq!(scanner.pending(), 0);
        scanner.push(&samples[2_000..], 60, 1, |f| seen.push(f.id.frame));
        assert_eq!(seen[before], 12, "{seen:?}");
        assert!(matches!(
            ToneScanner::new(44_100),
            Err(ToneIdError::UnsupportedRate(44_100))
        ));
    }

    #[test]
    fn the_margin_peaks_on_the_frame_and_is_gone_a_quarter_off_it() {
        let sent = caller_audio(3, 0..100);
        let at_model = bridge_uplink(&sent, &[160]);
        let at_caller = decode(&bridge_downlink(&at_model, &[480]));
        for (samples, step, lead) in [(&at_model, 3, 120), (&at_caller, 1, 80)] {
            let window = |k: usize, off: i64| {
                let at = (lead + step * FRAME_SAMPLES * k) as i64 + off * step as i64;
                read_window(
                    &samples[at as usize..at as usize + step * FRAME_SAMPLES],
                    step,
                )
            };
            for k in 1..95 {
                let on = window(k, 0);
                assert_eq!(on.code, Some((k as u32, 3)), "step {step}, frame {k}");
                assert!(on.margin > 1_000.0, "step {step}, frame {k}: {}", on.margin);
                // The margin peaks on the frame: what the search climbs to.
                for off in [-2, 2] {
                    assert!(window(k, off).margin < on.margin, "step {step}, {k}, {off}");
                }
                for off in [-80, -40, 40, 80] {
                    assert_eq!(window(k, off).code, None, "step {step}, frame {k}, {off}");
                }
            }
        }
        // Half a frame beside silence is no frame.
        let mut half = decode(&caller_audio(3, 0..1));
        half[..80].fill(0);
        assert_eq!(read_window(&half, 1).code, None);
    }
}
