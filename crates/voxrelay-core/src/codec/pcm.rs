//! 16-bit little-endian PCM ⇄ `i16` samples, the wire format of `audio/pcm` upstream audio.
//!
//! Both directions append to caller-owned buffers so the hot path reuses its allocations.
//! Input is never trusted to be well formed: an odd trailing byte (half a sample) is ignored
//! rather than treated as an error, because deltas are split by the sender at arbitrary points
//! only in broken peers and one lost byte is inaudible.

/// Appends the samples encoded in `bytes` (16-bit little-endian) to `out`.
/// An odd trailing byte is ignored.
pub fn pcm16le_to_samples(bytes: &[u8], out: &mut Vec<i16>) {
    let pairs = bytes.chunks_exact(2);
    out.reserve(pairs.len());
    out.extend(pairs.map(|pair| i16::from_le_bytes([pair[0], pair[1]])));
}

/// Appends `samples` to `out` as 16-bit little-endian bytes.
pub fn samples_to_pcm16le(samples: &[i16], out: &mut Vec<u8>) {
    out.reserve(samples.len() * 2);
    for &sample in samples {
        out.extend_from_slice(&sample.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_little_endian_pairs() {
        let mut out = Vec::new();
        pcm16le_to_samples(&[0x01, 0x00, 0xFF, 0xFF, 0x00, 0x80, 0xFF, 0x7F], &mut out);
        assert_eq!(out, [1, -1, i16::MIN, i16::MAX]);
    }

    #[test]
    fn odd_trailing_byte_is_ignored() {
        let mut out = Vec::new();
        pcm16le_to_samples(&[0x34, 0x12, 0x99], &mut out);
        assert_eq!(out, [0x1234]);
        out.clear();
        pcm16le_to_samples(&[0x99], &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn both_directions_append() {
        let mut samples = vec![7];
        pcm16le_to_samples(&[0x02, 0x00], &mut samples);
        assert_eq!(samples, [7, 2]);
        let mut bytes = vec![0xAA];
        samples_to_pcm16le(&[0x0102], &mut bytes);
        assert_eq!(bytes, [0xAA, 0x02, 0x01]);
    }

    #[test]
    fn round_trips_every_sample_value() {
        let samples: Vec<i16> = (i16::MIN..=i16::MAX).collect();
        let mut bytes = Vec::new();
        samples_to_pcm16le(&samples, &mut bytes);
        assert_eq!(bytes.len(), samples.len() * 2);
        let mut back = Vec::new();
        pcm16le_to_samples(&bytes, &mut back);
        assert_eq!(back, samples);
    }
}
