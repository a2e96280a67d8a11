//! A two-channel Ogg Opus stream per RFC 7845, written as it is encoded, with the SHA-256 and
//! size of every byte written.
//!
//! `OpusHead` (2 channels, pre-skip from the encoder's lookahead, input rate 8000, mapping
//! family 0) and `OpusTags` (the call's metadata) each end their page; then one 20 ms packet
//! per slot, a page per second of audio so the file grows as the call goes. Granule
//! positions count 48 kHz samples. The last real packet is held back until the next one
//! comes, so the final page always carries it together with one packet of silence that
//! flushes the encoder's lookahead out; that page's granule position trims the padding (the
//! end-trim of RFC 7845 §4.4), so a decoder plays exactly the call's samples.

use std::io::{self, Write};
use std::time::SystemTime;

use audiopus::coder::Encoder;
use audiopus::{Application, Bitrate, Channels, SampleRate};
use ogg::writing::{PacketWriteEndInfo, PacketWriter};
use sha2::{Digest, Sha256};

use super::timeline::{SAMPLE_RATE, SLOT_SAMPLES};
use super::{RecordingMetadata, VENDOR};

/// Granule positions are at 48 kHz whatever the input rate.
const GRANULE_PER_SAMPLE: u64 = 48_000 / SAMPLE_RATE as u64;
const GRANULE_PER_SLOT: u64 = SLOT_SAMPLES as u64 * GRANULE_PER_SAMPLE;
/// Packets per page: one second.
const PACKETS_PER_PAGE: u32 = 50;
/// Narrowband stereo speech: 16 kbit/s per channel. Opus codes the channels jointly; at this
/// rate what one leg leaks into the other is ~50 dB down, but for a few ms at an abrupt onset.
const BITRATE: i32 = 32_000;
/// The encoder's complexity (0–10). libopus's time per 20 ms stereo slot here, on the
/// benchmark VM (`cost` below): 63 µs at 0, 97 µs at 3, 138 µs at 5, 274 µs at 10 (its
/// default), i.e. 4.8 ms of CPU per recorded call-second at 3 against 13.7 ms at 10. At 16
/// kbit/s per channel of narrowband speech the higher settings buy little a reviewer hears.
const COMPLEXITY: u8 = 3;
/// The most an Opus packet can take (RFC 6716 §3.4: 1275 bytes per frame, and a 20 ms
/// packet is one frame).
const MAX_PACKET: usize = 1_275;
/// Longest tag value; the call's identifiers are far shorter.
const MAX_TAG_BYTES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum OggOpusError {
    #[error("opus encoder: {0}")]
    Encoder(#[from] audiopus::Error),
    #[error("writing: {0}")]
    Io(#[from] io::Error),
}

/// A writer that hashes and counts what goes through it.
pub struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hasher.update(&buf[..written]);
        self.bytes += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What a finished stream was: its inner writer back, flushed, and what was written.
pub struct Finished<W> {
    pub inner: W,
    pub sha256: String,
    pub bytes: u64,
}

pub struct OggOpusWriter<W: Write> {
    packets: PacketWriter<'static, Hashing<W>>,
    encoder: Encoder,
    serial: u32,
    pre_skip: u16,
    /// 48 kHz samples of every packet handed to the Ogg writer.
    granule: u64,
    in_page: u32,
    /// The last encoded packet, not yet written (see the module's doc).
    held: Option<Vec<u8>>,
    scratch: Vec<u8>,
}

impl<W: Write> OggOpusWriter<W> {
    /// Writes both headers; `serial` is the Ogg stream's (random per file).
    pub fn new(inner: W, metadata: &RecordingMetadata, serial: u32) -> Result<Self, OggOpusError> {
        let mut encoder = Encoder::new(SampleRate::Hz8000, Channels::Stereo, Application::Voip)?;
        encoder.set_bitrate(Bitrate::BitsPerSecond(BITRATE))?;
        encoder.set_complexity(COMPLEXITY)?;
        // In 8 kHz samples; the header wants 48 kHz.
        let lookahead = u64::from(encoder.lookahead()?) * GRANULE_PER_SAMPLE;
        let pre_skip = u16::try_from(lookahead).unwrap_or(u16::MAX);
        let mut packets = PacketWriter::new(Hashing {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        });
        packets.write_packet(opus_head(pre_skip), serial, PacketWriteEndInfo::EndPage, 0)?;
        packets.write_packet(opus_tags(metadata), serial, PacketWriteEndInfo::EndPage, 0)?;
        Ok(Self {
            packets,
            encoder,
            serial,
            pre_skip,
            granule: 0,
            in_page: 0,
            held: None,
            scratch: vec![0; MAX_PACKET],
        })
    }

    pub fn pre_skip(&self) -> u16 {
        self.pre_skip
    }

    /// Encodes one 20 ms slot, interleaved (caller, agent), and holds its packet back.
    fn write_slot(&mut self, slot: &[i16; 2 * SLOT_SAMPLES]) -> Result<(), OggOpusError> {
        let len = self.encoder.encode(slot, &mut self.scratch)?;
        self.held = Some(self.scratch[..len].to_vec());
        Ok(())
    }

    /// Writes the packet held back, if any, as an ordinary one.
    fn write_held(&mut self) -> Result<(), OggOpusError> {
        if let Some(packet) = self.held.take() {
            self.granule += GRANULE_PER_SLOT;
            self.in_page += 1;
            let end = if self.in_page >= PACKETS_PER_PAGE {
                self.in_page = 0;
                PacketWriteEndInfo::EndPage
            } else {
                PacketWriteEndInfo::NormalPacket
            };
            self.packets
                .write_packet(packet, self.serial, end, self.granule)?;
        }
        Ok(())
    }

    /// Encodes the next slot: the previous one is written first.
    pub fn push_slot(&mut self, slot: &[i16; 2 * SLOT_SAMPLES]) -> Result<(), OggOpusError> {
        self.write_held()?;
        self.write_slot(slot)
    }

    /// Ends the stream: `samples` is how many 8 kHz samples per channel of the slots written
    /// are the call's (the rest is padding at the end).
    pub fn finish(mut self, samples: u64) -> Result<Finished<W>, OggOpusError> {
        self.write_held()?;
        // One slot of silence pushes the lookahead's worth of the call out of the encoder.
        let silence = [0i16; 2 * SLOT_SAMPLES];
        let len = self.encoder.encode(&silence, &mut self.scratch)?;
        let total = self.granule + GRANULE_PER_SLOT;
        let last = (u64::from(self.pre_skip) + samples * GRANULE_PER_SAMPLE).min(total);
        self.packets.write_packet(
            self.scratch[..len].to_vec(),
            self.serial,
            PacketWriteEndInfo::EndStream,
            last,
        )?;
        let mut hashing = self.packets.into_inner();
        hashing.flush()?;
        let mut sha256 = String::with_capacity(64);
        voxrelay_core::lowerhex::push(&mut sha256, &hashing.hasher.finalize());
        Ok(Finished {
            inner: hashing.inner,
            sha256,
            bytes: hashing.bytes,
        })
    }
}

/// RFC 7845 §5.1.
fn opus_head(pre_skip: u16) -> Vec<u8> {
    let mut head = Vec::with_capacity(19);
    head.extend_from_slice(b"OpusHead");
    head.push(1); // version
    head.push(2); // channels
    head.extend_from_slice(&pre_skip.to_le_bytes());
    head.extend_from_slice(&SAMPLE_RATE.to_le_bytes());
    head.extend_from_slice(&0i16.to_le_bytes()); // output gain
    head.push(0); // mapping family 0: mono or stereo, no table
    head
}

/// RFC 7845 §5.2, with the call's metadata as `KEY=value` comments.
fn opus_tags(metadata: &RecordingMetadata) -> Vec<u8> {
    let mut tags = Vec::with_capacity(512);
    tags.extend_from_slice(b"OpusTags");
    push_field(&mut tags, VENDOR.as_bytes());
    let comments = metadata.tags();
    tags.extend_from_slice(&(comments.len() as u32).to_le_bytes());
    for (key, value) in comments {
        let value = cut(&value, MAX_TAG_BYTES);
        let mut comment = Vec::with_capacity(key.len() + 1 + value.len());
        comment.extend_from_slice(key.as_bytes());
        comment.push(b'=');
        comment.extend_from_slice(value.as_bytes());
        push_field(&mut tags, &comment);
    }
    tags
}

fn push_field(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u32).to_le_bytes());
    out.extend_from_slice(field);
}

/// `text` cut at `max` bytes on a char boundary.
fn cut(text: &str, max: usize) -> &str {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `at` as RFC 3339 UTC to the second (`2026-12-07T04:43:29Z`).
pub fn rfc3339(at: SystemTime) -> String {
    let ((year, month, day), rem) = voxrelay_core::time::utc_civil(at);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn rfc3339_spells_utc_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let at = UNIX_EPOCH + Duration::from_secs(1_796_618_609);
        assert_eq!(rfc3339(at), "2026-12-07T04:43:29Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_825_600);
        assert_eq!(rfc3339(leap), "2000-02-29T12:00:00Z");
    }

    #[test]
    fn the_head_is_rfc_7845s() {
        let head = opus_head(312);
        assert_eq!(&head[..8], b"OpusHead");
        assert_eq!(head.len(), 19);
        assert_eq!(head[9], 2);
        assert_eq!(u16::from_le_bytes([head[10], head[11]]), 312);
        assert_eq!(
            u32::from_le_bytes([head[12], head[13], head[14], head[15]]),
            8000
        );
        assert_eq!(head[18], 0);
    }
}

/// A recording read back: its headers and both channels at 8 kHz, pre-skip and end-trim
/// applied. For tests and for checking a file by hand; it trusts nothing in the file.
#[derive(Debug)]
pub struct Decoded {
    pub channels: u8,
    pub pre_skip: u16,
    pub input_rate: u32,
    pub vendor: String,
    pub tags: Vec<(String, String)>,
    pub caller: Vec<i16>,
    pub agent: Vec<i16>,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("ogg: {0}")]
    Ogg(#[from] ogg::OggReadError),
    #[error("opus: {0}")]
    Opus(#[from] audiopus::Error),
    #[error("not a two-channel Ogg Opus stream: {0}")]
    Format(&'static str),
}

/// Reads back a whole recording.
pub fn decode(file: &[u8]) -> Result<Decoded, DecodeError> {
    use audiopus::coder::Decoder;
    let mut packets = ogg::PacketReader::new(io::Cursor::new(file));
    let head = packets
        .read_packet()?
        .ok_or(DecodeError::Format("no OpusHead"))?;
    let head = head.data;
    if head.len() < 19 || &head[..8] != b"OpusHead" {
        return Err(DecodeError::Format("no OpusHead"));
    }
    let channels = head[9];
    let pre_skip = u16::from_le_bytes([head[10], head[11]]);
    let input_rate = u32::from_le_bytes([head[12], head[13], head[14], head[15]]);
    if channels != 2 || head[18] != 0 {
        return Err(DecodeError::Format("not stereo with mapping family 0"));
    }
    let tags = packets
        .read_packet()?
        .ok_or(DecodeError::Format("no OpusTags"))?;
    let (vendor, tags) = parse_tags(&tags.data).ok_or(DecodeError::Format("bad OpusTags"))?;
    let mut decoder = Decoder::new(SampleRate::Hz8000, Channels::Stereo)?;
    let mut pcm = [0i16; 2 * 960];
    let mut interleaved = Vec::new();
    let mut last_granule = 0;
    while let Some(packet) = packets.read_packet()? {
        let samples = decoder.decode(Some(&packet.data[..]), &mut pcm[..], false)?;
        interleaved.extend_from_slice(&pcm[..2 * samples]);
        last_granule = packet.absgp_page();
    }
    let skip = usize::from(pre_skip) / GRANULE_PER_SAMPLE as usize;
    let length = (last_granule.saturating_sub(u64::from(pre_skip)) / GRANULE_PER_SAMPLE) as usize;
    let frames = interleaved.chunks_exact(2).skip(skip).take(length);
    let (caller, agent) = frames.map(|frame| (frame[0], frame[1])).unzip();
    Ok(Decoded {
        channels,
        pre_skip,
        input_rate,
        vendor,
        tags,
        caller,
        agent,
    })
}

fn parse_tags(data: &[u8]) -> Option<(String, Vec<(String, String)>)> {
    let rest = data.strip_prefix(b"OpusTags")?;
    let (vendor, mut rest) = take_field(rest)?;
    let count = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
    rest = &rest[4..];
    let mut tags = Vec::new();
    for _ in 0..count {
        let (comment, next) = take_field(rest)?;
        rest = next;
        let (key, value) = comment.split_once('=')?;
        tags.push((key.to_owned(), value.to_owned()));
    }
    Some((vendor, tags))
}

fn take_field(data: &[u8]) -> Option<(String, &[u8])> {
    let len = u32::from_le_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let field = data.get(4..4usize.checked_add(len)?)?;
    Some((String::from_utf8(field.to_vec()).ok()?, &data[4 + len..]))
}

#[cfg(test)]
mod cost {
    /// `cargo test --features opus --lib recording::ogg_opus::cost -- --ignored --nocapture`:
    /// libopus's own time per 20 ms stereo slot at each complexity (the library is the
    /// system's optimised build whatever this crate's profile).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn encoder_cost_per_slot_by_complexity() {
        use audiopus::coder::Encoder;
        use audiopus::{Application, Bitrate, Channels, SampleRate};
        let slot: Vec<i16> = (0..320)
            .map(|n| ((n as f64 * 0.3).sin() * 6000.0) as i16)
            .collect();
        let mut out = [0u8; 1275];
        for complexity in [0u8, 3, 5, 8, 10] {
            let mut encoder =
                Encoder::new(SampleRate::Hz8000, Channels::Stereo, Application::Voip).unwrap();
            encoder.set_bitrate(Bitrate::BitsPerSecond(32_000)).unwrap();
            encoder.set_complexity(complexity).unwrap();
            let start = std::time::Instant::now();
            for _ in 0..2_000 {
                encoder.encode(&slot, &mut out).unwrap();
            }
            eprintln!(
                "complexity {complexity}: {:.1} µs per slot",
                start.elapsed().as_secs_f64() * 1e6 / 2_000.0
            );
        }
    }
}
