//! Simulated Twilio callers for load: many at once, light enough to run hundreds on one core.
//!
//! Each caller opens the Media Streams WebSocket signed like Twilio, sends `connected` and
//! `start`, presses its call number as DTMF digits (the bridge forwards digits to the model as
//! text, so the echo model can tell which caller a session belongs to), then streams 20 ms
//! `media` frames on a real-time schedule (optionally jittered, never reordered). It echoes
//! marks as Twilio's playback buffer would, and timestamps everything it sends and receives on
//! the run's shared [`Epoch`] so the harness can join its records with the model's. Every frame
//! it sends carries its [`FrameId`], as the call's audio mode lets it survive the bridge: in
//! `pcmu` (passed through byte for byte) a watermark in the low bits of the speech fixture (see
//! `watermark`), in `pcm16` (decoded, resampled and re-encoded both ways) the frame itself is a
//! chord of tones that codes the id (see `tone_ids`). It decodes each `media` payload into
//! reused buffers and reads the ids out of it, so the harness counts frames exactly. The record
//! is the caller's own until the call ends (no lock); what the live progress line shows goes
//! through the lock-free [`LiveBoard`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::caller::{FRAME_BYTES, PlaybackBuffer};
use super::live::LiveBoard;
use super::results::Epoch;
use super::tone_ids::{self, ToneScanner};
use super::watermark::{self, FrameId, FrameScanner};
use voxrelay_core::codec::g711;
use voxrelay_core::twilio::signature::compute_signature;
use voxrelay_core::{AudioMode, Secret};

const FRAME: Duration = Duration::from_millis(20);
/// Digits pressed at call start: the call number, zero-padded.
pub const ID_DIGITS: usize = 5;
/// The account the simulated streams name.
const BENCH_ACCOUNT_SID: &str = "AC00000000000000000000000000be0c00";

#[derive(Clone, Debug)]
pub struct LoadCallConfig {
    /// Where to connect, e.g. `ws://127.0.0.1:8080/twilio/media`.
    pub connect_url: String,
    /// The URL Twilio would have signed (the bridge's public `wss://…/twilio/media`).
    pub signed_url: String,
    pub auth_token: Secret,
    pub index: u32,
    /// How long to stream before hanging up.
    pub duration: Duration,
    /// Each frame is sent up to this much after its slot (uniformly), like real network jitter.
    pub jitter: Duration,
    pub epoch: Epoch,
    /// The bridge's audio mode, which decides how frames carry their ids.
    pub audio_mode: AudioMode,
    pub board: Arc<LiveBoard>,
}

/// Everything one caller saw, timestamped in µs since the epoch.
#[derive(Clone, Debug, Default)]
pub struct LoadCallRecord {
    pub index: u32,
    pub ws_open_us: Option<u64>,
    /// Send time of frame k, for every frame sent.
    pub frames_sent_us: Vec<u64>,
    /// (generation, cumulative audio bytes received in this generation, arrival µs) per
    /// `media`; the generation is the number of `clear`s received before it.
    pub media: Vec<(u32, u64, u64)>,
    pub clears_us: Vec<u64>,
    /// Every frame read from the `media` received, with the generation it came in, its
    /// arrival µs, and whether it was split across messages.
    pub downlink: Vec<DownlinkFrame>,
    /// Received audio bytes that held no frame id (in `pcm16` these include the resamplers'
    /// lead-in and the partial frames at each response's start).
    pub skipped_bytes: u64,
    pub marks_received: u64,
    pub marks_echoed: u64,
    /// When the caller sent `stop` (it hung up).
    pub stop_sent_us: Option<u64>,
    pub error: Option<String>,
    pub closed_by_bridge: bool,
}

/// One identified frame the caller heard (`at_us`: when its first sample arrived).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DownlinkFrame {
    pub id: FrameId,
    pub generation: u32,
    pub at_us: u64,
    pub split: bool,
}

impl LoadCallRecord {
    /// The digits this caller presses.
    pub fn id_digits(index: u32) -> String {
        format!("{index:0width$}", width = ID_DIGITS)
    }
}

/// Reads the ids out of the audio that comes back, as the audio mode carries them.
enum IdReader {
    Watermark(FrameScanner),
    /// Tones, read from the μ-law decoded into a reused buffer.
    Tones(ToneScanner, Vec<i16>),
}

impl IdReader {
    fn new(mode: AudioMode) -> Self {
        match mode {
            AudioMode::Pcmu => Self::Watermark(FrameScanner::default()),
            AudioMode::Pcm16 => Self::Tones(
                ToneScanner::new(8_000).expect("8 kHz is a tone rate"),
                Vec::with_capacity(4 * FRAME_BYTES),
            ),
        }
    }

    /// Reads one message's μ-law, which arrived at `at_us`; `sent` (frames sent so far) places
    /// the tone ids' numbers. `on_frame` gets each frame's id, whether it was split, and when
    /// its first sample arrived.
    fn push(
        &mut self,
        mulaw: &[u8],
        sent: usize,
        at_us: u64,
        mut on_frame: impl FnMut(FrameId, bool, u64),
    ) {
        match self {
            Self::Watermark(scanner) => {
                scanner.push(mulaw, |scanned| on_frame(scanned.id, scanned.split, at_us));
            }
            Self::Tones(scanner, linear) => {
                linear.clear();
                linear.extend(mulaw.iter().map(|&code| g711::mulaw_decode(code)));
                let hint = u32::try_from(sent).unwrap_or(u32::MAX);
                scanner.push(linear, hint, at_us, |frame| {
                    on_frame(frame.id, frame.split, frame.first_at);
                });
            }
        }
    }

    fn reset(&mut self) {
        match self {
            Self::Watermark(scanner) => scanner.reset(),
            Self::Tones(scanner, _) => scanner.reset(),
        }
    }

    fn skipped_bytes(&self) -> u64 {
        match self {
            Self::Watermark(scanner) => scanner.skipped_bytes,
            // One μ-law byte per sample.
            Self::Tones(scanner, _) => scanner.skipped_samples,
        }
    }
}

/// The call number as this mode's ids carry it (tones keep its low 8 bits).
pub fn call_in_ids(mode: AudioMode, index: u32) -> u16 {
    match mode {
        AudioMode::Pcmu => index as u16,
        AudioMode::Pcm16 => tone_ids::call_code(index),
    }
}

#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(borrow)]
    event: &'a str,
    #[serde(borrow, default)]
    media: Option<IncomingMedia<'a>>,
    #[serde(borrow, default)]
    mark: Option<IncomingMark<'a>>,
}

#[derive(Deserialize)]
struct IncomingMedia<'a> {
    #[serde(borrow)]
    payload: &'a str,
}

#[derive(Deserialize)]
struct IncomingMark<'a> {
    #[serde(borrow)]
    name: std::borrow::Cow<'a, str>,
}

/// Decoded length of standard base64 text, without decoding it.
fn base64_decoded_len(text: &str) -> u64 {
    let padding = text.bytes().rev().take_while(|&b| b == b'=').count();
    ((text.len() / 4) * 3).saturating_sub(padding) as u64
}

/// A small xorshift generator for send-time jitter (no crate, reproducible per call).
struct Jitter(u64);

impl Jitter {
    fn next_fraction(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Runs one call and returns what it saw.
pub async fn run_load_call(config: LoadCallConfig, audio: &[u8]) -> LoadCallRecord {
    let mut record = LoadCallRecord {
        index: config.index,
        ..LoadCallRecord::default()
    };
    let mut streaming = false;
    if let Err(error) = drive(&config, audio, &mut record, &mut streaming).await {
        record.error = Some(error);
    }
    if streaming {
        config
            .board
            .up
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
    record
}

async fn drive(
    config: &LoadCallConfig,
    audio: &[u8],
    record: &mut LoadCallRecord,
    streaming: &mut bool,
) -> Result<(), String> {
    let epoch = config.epoch;
    let mut request = config
        .connect_url
        .as_str()
        .into_client_request()
        .map_err(|e| e.to_string())?;
    let signature = compute_signature(config.auth_token.expose(), &config.signed_url, &[]);
    request.headers_mut().insert(
        "x-twilio-signature",
        signature
            .parse()
            .map_err(|_| "signature header".to_owned())?,
    );
    // Small reads keep hundreds of callers cheap (see `dial::UPSTREAM_READ_BUFFER`).
    let socket_config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(crate::dial::UPSTREAM_READ_BUFFER);
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(request, Some(socket_config), true)
            .await
            .map_err(|e| format!("connect: {e}"))?;
    record.ws_open_us = Some(epoch.us());

    // Twilio-shaped (two letters and 32 hex digits), as the bridge refuses anything else.
    let stream_sid = format!("MZbe{:030x}", config.index);
    let call_sid = format!("CAbe{:030x}", config.index);
    let mut sequence = 1u64;
    let mut text = String::with_capacity(512);
    ws.send(Message::text(
        r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#,
    ))
    .await
    .map_err(|e| e.to_string())?;
    text.clear();
    text.push_str(&format!(
        r#"{{"event":"start","sequenceNumber":"1","start":{{"accountSid":"{BENCH_ACCOUNT_SID}","streamSid":"{stream_sid}","callSid":"{call_sid}","tracks":["inbound"],"customParameters":{{}},"mediaFormat":{{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}},"streamSid":"{stream_sid}"}}"#
    ));
    ws.send(Message::text(text.clone()))
        .await
        .map_err(|e| e.to_string())?;
    for digit in LoadCallRecord::id_digits(config.index).chars() {
        sequence += 1;
        let dtmf = format!(
            r#"{{"event":"dtmf","streamSid":"{stream_sid}","sequenceNumber":"{sequence}","dtmf":{{"track":"inbound_track","digit":"{digit}"}}}}"#
        );
        ws.send(Message::text(dtmf))
            .await
            .map_err(|e| e.to_string())?;
    }

    let started = Instant::now();
    let frames_total = (config.duration.as_millis() / FRAME.as_millis()) as usize;
    record.frames_sent_us.reserve(frames_total);
    config
        .board
        .up
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    *streaming = true;
    let call = config.index as usize;
    let mut frame = [0u8; FRAME_BYTES];
    let mut decoded = Vec::with_capacity(4 * FRAME_BYTES);
    let mut reader = IdReader::new(config.audio_mode);
    let own_call = call_in_ids(config.audio_mode, config.index);
    let mut jitter = Jitter(0x9E37_79B9_7F4A_7C15 ^ (u64::from(config.index) + 1));
    let jitter_for = |jitter: &mut Jitter| config.jitter.mul_f64(jitter.next_fraction());
    let mut next_frame = 0usize;
    let mut next_due = started + jitter_for(&mut jitter);
    let mut playback = PlaybackBuffer::default();
    let mut generation = 0u32;
    let mut received_in_generation = 0u64;
    let audio_frames = (audio.len() / FRAME_BYTES).max(1);
    let silence = [0xFFu8; FRAME_BYTES];
    let mut marks_due = Vec::new();

    loop {
        // The call lasts as long as it has frames to send.
        if next_frame >= frames_total {
            break;
        }
        let wake = playback
            .next_due()
            .map_or(next_due, |mark| mark.min(next_due));
        tokio::select! {
            message = ws.next() => {
                let now_us = epoch.us();
                match message {
                    Some(Ok(Message::Text(body))) => {
                        let Ok(incoming) = serde_json::from_str::<Incoming<'_>>(body.as_str()) else {
                            return Err(format!("unparsable message from the bridge: {}", body.as_str()));
                        };
                        match (incoming.event, incoming.media, incoming.mark) {
                            ("media", Some(media), _) => {
                                let bytes = base64_decoded_len(media.payload);
                                received_in_generation += bytes;
                                record.media.push((generation, received_in_generation, now_us));
                                playback.push_audio(Instant::now(), bytes as usize);
                                use base64::Engine as _;
                                decoded.clear();
                                base64::engine::general_purpose::STANDARD
                                    .decode_vec(media.payload, &mut decoded)
                                    .map_err(|e| format!("media payload is not base64: {e}"))?;
                                let board = &config.board;
                                let downlink = &mut record.downlink;
                                reader.push(&decoded, next_frame, now_us, |id, split, at_us| {
                                    if id.call == own_call {
                                        board.arrived_at_caller(call, id.frame as usize, at_us);
                                    }
                                    downlink.push(DownlinkFrame {
                                        id,
                                        generation,
                                        at_us,
                                        split,
                                    });
                                });
                            }
                            ("mark", _, Some(mark)) => {
                                record.marks_received += 1;
                                playback.push_mark(Instant::now(), mark.name.into_owned());
                            }
                            ("clear", _, _) => {
                                record.clears_us.push(now_us);
                                generation += 1;
                                received_in_generation = 0;
                                reader.reset();
                                marks_due = playback.clear(Instant::now());
                            }
                            (event, _, _) => return Err(format!("unexpected `{event}` from the bridge")),
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => {
                        record.closed_by_bridge = true;
                        record.skipped_bytes = reader.skipped_bytes();
                        return Err(format!(
                            "the bridge hung up after {next_frame} of {frames_total} frames"
                        ));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return Err(format!("socket: {error}")),
                }
            }
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {
                let now = Instant::now();
                marks_due.extend(playback.due_marks(now));
                while next_frame < frames_total && next_due <= now {
                    let id = FrameId { call: own_call, frame: next_frame as u32 };
                    match config.audio_mode {
                        AudioMode::Pcmu => {
                            let offset = (next_frame % audio_frames) * FRAME_BYTES;
                            frame.copy_from_slice(audio.get(offset..offset + FRAME_BYTES).unwrap_or(&silence));
                            watermark::stamp(&mut frame, id);
                        }
                        AudioMode::Pcm16 => tone_ids::synthesize_mulaw(id, &mut frame),
                    }
                    sequence += 1;
                    write_media(&mut text, &stream_sid, sequence, next_frame, &frame);
                    let sent_us = epoch.us();
                    record.frames_sent_us.push(sent_us);
                    config.board.sent(call, next_frame, sent_us);
                    ws.feed(Message::text(text.clone())).await.map_err(|e| e.to_string())?;
                    next_frame += 1;
                    next_due = started + FRAME * next_frame as u32 + jitter_for(&mut jitter);
                }
            }
        }
        for name in marks_due.drain(..) {
            sequence += 1;
            text.clear();
            text.push_str(r#"{"event":"mark","sequenceNumber":""#);
            text.push_str(&sequence.to_string());
            text.push_str(r#"","streamSid":""#);
            text.push_str(&stream_sid);
            text.push_str(r#"","mark":{"name":"#);
            text.push_str(&serde_json::to_string(&name).unwrap_or_default());
            text.push_str("}}");
            ws.feed(Message::text(text.clone()))
                .await
                .map_err(|e| e.to_string())?;
            record.marks_echoed += 1;
        }
        ws.flush().await.map_err(|e| e.to_string())?;
    }
    config
        .board
        .up
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    *streaming = false;
    record.skipped_bytes = reader.skipped_bytes();
    sequence += 1;
    let stop = format!(
        r#"{{"event":"stop","sequenceNumber":"{sequence}","stop":{{"accountSid":"{BENCH_ACCOUNT_SID}","callSid":"{call_sid}"}},"streamSid":"{stream_sid}"}}"#
    );
    record.stop_sent_us = Some(epoch.us());
    let _ = ws.send(Message::text(stop)).await;
    // What still arrives was sent around the hang-up: the harness counts it apart.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(message)) = ws.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    Ok(())
}

fn write_media(
    text: &mut String,
    stream_sid: &str,
    sequence: u64,
    frame_index: usize,
    audio: &[u8],
) {
    use base64::Engine as _;
    text.clear();
    text.push_str(r#"{"event":"media","sequenceNumber":""#);
    text.push_str(&sequence.to_string());
    text.push_str(r#"","media":{"track":"inbound","chunk":""#);
    text.push_str(&(frame_index + 1).to_string());
    text.push_str(r#"","timestamp":""#);
    text.push_str(&(frame_index * 20).to_string());
    text.push_str(r#"","payload":""#);
    base64::engine::general_purpose::STANDARD.encode_string(audio, text);
    text.push_str(r#""},"streamSid":""#);
    text.push_str(stream_sid);
    text.push_str(r#""}"#);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_length_without_decoding() {
        use base64::Engine as _;
        for len in 0..20 {
            let text = base64::engine::general_purpose::STANDARD.encode(vec![7u8; len]);
            assert_eq!(base64_decoded_len(&text), len as u64);
        }
    }

    #[test]
    fn media_messages_are_twilio_shaped() {
        let mut text = String::new();
        write_media(&mut text, "MZ1", 7, 2, &[0xFF; 160]);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["event"], "media");
        assert_eq!(value["sequenceNumber"], "7");
        assert_eq!(value["media"]["chunk"], "3");
        assert_eq!(value["media"]["timestamp"], "40");
        assert_eq!(value["media"]["payload"].as_str().unwrap().len(), 216);
    }

    #[test]
    fn jitter_stays_within_its_bound() {
        let mut jitter = Jitter(42);
        for _ in 0..1000 {
            let f = jitter.next_fraction();
            assert!((0.0..1.0).contains(&f));
        }
    }
}
