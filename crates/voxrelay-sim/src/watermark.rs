//! Frame identities carried in the audio itself, so the harness counts frames instead of
//! inferring them from byte offsets.
//!
//! Owns the watermark and its reader. Every simulated 20 ms μ-law frame (160 bytes) carries
//! a [`FrameId`] — the call's number and the frame's number — in the least significant bit of
//! its first 64 bytes: 8 bits of marker, 16 of call, 24 of frame and a 16-bit check over them,
//! so a window of speech or of another frame's tail reads as no id (a false match takes the
//! marker and the check both, 1 in 2^24 per window tried). Flipping a μ-law code's lowest bit
//! moves the sample by one quantisation step, inaudible and irrelevant to a relay. In `pcmu`
//! mode the bridge passes caller audio to the model byte for byte and the echo model sends it
//! back byte for byte, so the same id names the frame on the uplink, in the echo and on the
//! downlink. `pcm16` transcodes and resamples both ways, which no bit-level mark survives:
//! there the frames carry their ids as tones instead (see `tone_ids`), read into the same
//! [`FrameId`]s.
//!
//! [`FrameScanner`] reads ids out of a byte stream delivered in messages of any size:
//! frames are read on 160-byte boundaries from the start of the stream; a window that holds
//! no id (bytes lost, or garbage) makes it slide one byte at a time until ids line up again,
//! counting the bytes it skipped; a frame whose bytes came in two messages is reported as
//! split. Its buffer is fixed (two frames) and reused: nothing is allocated per frame.

/// μ-law bytes per 20 ms frame at 8 kHz.
pub const FRAME_BYTES: usize = 160;
/// Bytes whose lowest bit carries the mark.
const MARK_BYTES: usize = 64;
const MARKER: u64 = 0xA5;

/// Which frame of which call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrameId {
    /// The caller's number in the run (its DTMF digits).
    pub call: u16,
    /// The frame's number in its call, from 0.
    pub frame: u32,
}

impl FrameId {
    /// Frames numbers wrap at 2^24 (93 hours of 20 ms frames).
    pub const MAX_FRAME: u32 = (1 << 24) - 1;

    fn bits(self) -> u64 {
        let body =
            (MARKER << 40) | (u64::from(self.call) << 24) | u64::from(self.frame & Self::MAX_FRAME);
        (body << 16) | u64::from(check(body))
    }
}

/// A 16-bit check over the 48 id bits (a multiplicative hash folded down).
fn check(body: u64) -> u16 {
    let mixed = body.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((mixed >> 48) ^ (mixed >> 16)) as u16
}

/// Writes `id` into the lowest bits of `frame`'s first 64 bytes (the rest is untouched).
pub fn stamp(frame: &mut [u8], id: FrameId) {
    let bits = id.bits();
    for (i, byte) in frame.iter_mut().take(MARK_BYTES).enumerate() {
        let bit = ((bits >> (63 - i)) & 1) as u8;
        *byte = (*byte & !1) | bit;
    }
}

/// The id `frame` carries, if any.
pub fn read(frame: &[u8]) -> Option<FrameId> {
    if frame.len() < MARK_BYTES {
        return None;
    }
    let bits = frame[..MARK_BYTES]
        .iter()
        .fold(0u64, |acc, byte| (acc << 1) | u64::from(byte & 1));
    let body = bits >> 16;
    if body >> 40 != MARKER || check(body) != bits as u16 {
        return None;
    }
    Some(FrameId {
        call: (body >> 24) as u16,
        frame: (body & u64::from(FrameId::MAX_FRAME)) as u32,
    })
}

/// One frame read from a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScannedFrame {
    pub id: FrameId,
    /// Its bytes came in more than one message.
    pub split: bool,
    /// Where it starts, in bytes since the stream's start (or its last reset).
    pub start: u64,
}

/// Reads ids out of one stream of audio (a direction of a call, or one response generation).
#[derive(Clone, Debug)]
pub struct FrameScanner {
    buffer: [u8; 2 * FRAME_BYTES],
    len: usize,
    /// Stream position of `buffer[0]`.
    base: u64,
    /// Bytes skipped while looking for the next id.
    pub skipped_bytes: u64,
}

impl Default for FrameScanner {
    fn default() -> Self {
        Self {
            buffer: [0; 2 * FRAME_BYTES],
            len: 0,
            base: 0,
            skipped_bytes: 0,
        }
    }
}

impl FrameScanner {
    /// Feeds one message's audio; calls `on_frame` for every frame completed by it.
    pub fn push(&mut self, mut bytes: &[u8], mut on_frame: impl FnMut(ScannedFrame)) {
        // Bytes of the buffer that came before this message.
        let mut carried = self.len;
        while !bytes.is_empty() {
            let take = bytes.len().min(self.buffer.len() - self.len);
            self.buffer[self.len..self.len + take].copy_from_slice(&bytes[..take]);
            self.len += take;
            bytes = &bytes[take..];
            let mut start = 0;
            while self.len - start >= FRAME_BYTES {
                match read(&self.buffer[start..start + FRAME_BYTES]) {
                    Some(id) => {
                        on_frame(ScannedFrame {
                            id,
                            split: start < carried,
                            start: self.base + start as u64,
                        });
                        start += FRAME_BYTES;
                    }
                    None => {
                        self.skipped_bytes += 1;
                        start += 1;
                    }
                }
            }
            self.buffer.copy_within(start..self.len, 0);
            self.len -= start;
            self.base += start as u64;
            carried = carried.saturating_sub(start);
        }
    }

    /// Starts a new stream (after a `clear`): a partial frame left over is skipped.
    pub fn reset(&mut self) {
        self.skipped_bytes += self.len as u64;
        self.len = 0;
        self.base = 0;
    }

    /// Bytes held that do not make a frame yet.
    pub fn pending(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn speech_frame(seed: u8) -> [u8; FRAME_BYTES] {
        let mut frame = [0u8; FRAME_BYTES];
        for (i, byte) in frame.iter_mut().enumerate() {
            *byte = (i as u8).wrapping_mul(37) ^ seed;
        }
        frame
    }

    fn stamped(call: u16, frame: u32) -> [u8; FRAME_BYTES] {
        let mut bytes = speech_frame(frame as u8);
        stamp(&mut bytes, FrameId { call, frame });
        bytes
    }

    #[test]
    fn a_stamp_reads_back_and_moves_each_code_by_at_most_one() {
        for (call, frame) in [(0, 0), (1, 1), (65_535, FrameId::MAX_FRAME), (42, 123_456)] {
            let original = speech_frame(7);
            let mut bytes = original;
            stamp(&mut bytes, FrameId { call, frame });
            assert_eq!(read(&bytes), Some(FrameId { call, frame }));
            for (a, b) in original.iter().zip(&bytes) {
                assert!(a ^ b <= 1);
            }
        }
    }

    #[test]
    fn unmarked_and_damaged_frames_read_as_none() {
        assert_eq!(read(&[0xFF; FRAME_BYTES]), None);
        assert_eq!(read(&speech_frame(3)), None);
        let mut bytes = stamped(3, 9);
        bytes[10] ^= 1;
        assert_eq!(read(&bytes), None);
        assert_eq!(read(&bytes[..10]), None);
    }

    fn scan(messages: &[&[u8]]) -> (Vec<ScannedFrame>, FrameScanner) {
        let mut scanner = FrameScanner::default();
        let mut frames = Vec::new();
        for message in messages {
            scanner.push(message, |frame| frames.push(frame));
        }
        (frames, scanner)
    }

    #[test]
    fn the_scanner_reads_whole_merged_and_split_frames() {
        let (a, b, c) = (stamped(1, 0), stamped(1, 1), stamped(1, 2));
        let merged: Vec<u8> = [a, b].concat();
        let (frames, scanner) = scan(&[&merged, &c[..80], &c[80..]]);
        let ids: Vec<(u32, bool, u64)> = frames
            .iter()
            .map(|f| (f.id.frame, f.split, f.start))
            .collect();
        assert_eq!(ids, [(0, false, 0), (1, false, 160), (2, true, 320)]);
        assert_eq!((scanner.skipped_bytes, scanner.pending()), (0, 0));
    }

    #[test]
    fn the_scanner_finds_ids_again_after_lost_bytes() {
        let (a, b, c) = (stamped(2, 0), stamped(2, 1), stamped(2, 2));
        // 40 bytes of frame 0 are lost: the rest of it is skipped, frames 1 and 2 are found.
        let (frames, scanner) = scan(&[&a[40..], &b, &c]);
        let ids: Vec<(u32, u64)> = frames.iter().map(|f| (f.id.frame, f.start)).collect();
        assert_eq!(ids, [(1, 120), (2, 280)]);
        assert_eq!(scanner.skipped_bytes, 120);
    }

    #[test]
    fn reset_drops_a_partial_frame() {
        let a = stamped(5, 0);
        let mut scanner = FrameScanner::default();
        scanner.push(&a[..100], |_| panic!("no whole frame yet"));
        scanner.reset();
        let mut seen = Vec::new();
        scanner.push(&stamped(5, 1), |frame| seen.push(frame.id.frame));
        assert_eq!(seen, [1]);
        assert_eq!(scanner.skipped_bytes, 100);
    }
}
