//! The built-in hold prompt: a soft two-note chime, computed here and kept as a fixture.
//!
//! A caller waiting for a model session hears something rather than dead air. No speech
//! synthesiser runs offline, so the built-in prompt is a chime that says "still here" in any
//! language; a tenant can bring a spoken one. [`hold_chime`] computes it (8 kHz μ-law, 0.8 s:
//! 660 Hz then 880 Hz, 250 ms each at −20 dBFS with 10 ms raised-cosine fades, 100 ms of
//! silence before and between, 200 ms after); `fixtures/hold-prompt-8k-mulaw.raw` holds its
//! bytes, and a test keeps the two identical (`VOXRELAY_WRITE_FIXTURES=1 cargo test -p
//! voxrelay-core hold_chime` writes the fixture again after a deliberate change).

use super::g711;

const RATE: u32 = 8_000;

/// The chime's μ-law bytes.
pub fn hold_chime() -> Vec<u8> {
    let mut samples = Vec::with_capacity(RATE as usize * 8 / 10);
    silence(&mut samples, 100);
    note(&mut samples, 660.0, 250);
    silence(&mut samples, 100);
    note(&mut samples, 880.0, 250);
    silence(&mut samples, 100);
    samples.iter().map(|&s| g711::mulaw_encode(s)).collect()
}

fn silence(samples: &mut Vec<i16>, ms: u32) {
    samples.extend(std::iter::repeat_n(0, (RATE * ms / 1000) as usize));
}

fn note(samples: &mut Vec<i16>, hz: f64, ms: u32) {
    // −20 dBFS peak.
    let amplitude = 32767.0 * 0.1;
    let len = (RATE * ms / 1000) as usize;
    let fade = (RATE * 10 / 1000) as usize;
    for n in 0..len {
        let edge = n.min(len - 1 - n);
        let gain = if edge < fade {
            0.5 - 0.5 * (std::f64::consts::PI * edge as f64 / fade as f64).cos()
        } else {
            1.0
        };
        let phase = 2.0 * std::f64::consts::PI * hz * n as f64 / f64::from(RATE);
        samples.push((amplitude * gain * phase.sin()).round() as i16);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/hold-prompt-8k-mulaw.raw"
    );

    #[test]
    fn hold_chime_matches_its_fixture() {
        let chime = hold_chime();
        if std::env::var_os("VOXRELAY_WRITE_FIXTURES").is_some() {
            std::fs::write(FIXTURE, &chime).expect("write the fixture");
        }
        let fixture = std::fs::read(FIXTURE).expect("the fixture exists");
        assert_eq!(chime.len(), 8 * 800, "0.8 s of 8 kHz μ-law");
        assert!(
            chime == fixture,
            "fixtures/hold-prompt-8k-mulaw.raw is stale"
        );
        // Audible but soft: the loudest sample near −20 dBFS, the ends silent.
        let peak = chime
            .iter()
            .map(|&b| g711::mulaw_decode(b).unsigned_abs())
            .max()
            .unwrap();
        assert!((3000..=3400).contains(&peak), "peak {peak}");
        assert!(chime[..800].iter().all(|&b| g711::mulaw_decode(b) == 0));
    }
}
