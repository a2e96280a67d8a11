//! The call engine: one call's protocol logic, without sockets or clocks.
//!
//! It joins the three sans-IO machines — the Twilio stream ([`StreamMachine`]), the upstream
//! realtime protocol ([`RealtimeProtocol`]) and playback/barge-in ([`Playback`]) — with the
//! codec work in between. The I/O layer ([`super::call`]) feeds it socket messages and the
//! time, and sends what it queues in [`CallEngine::take_to_twilio`] and
//! [`CallEngine::take_to_upstream`]. Invariants:
//! - caller audio never reaches the model before the session is configured: appends made
//!   before the upstream socket opens are held (bounded, oldest dropped first) and follow the
//!   `session.update`;
//! - on barge-in Twilio's `clear` is queued before any model-side command;
//! - bad input from either side is counted and logged and affects only this call.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::metrics::{Direction, Metrics, TwilioErrorKind};
use super::playback::{MarkOutcome, Playback, PlaybackConfig};
use crate::AudioMode;
use crate::codec::{StreamResampler, g711, pcm};
use crate::twilio::events::{write_clear_json, write_mark_json, write_media_json_from_mulaw};
use crate::twilio::stream::{StartInfo, StreamError, StreamEvent, StreamMachine};
use crate::upstream::{RealtimeProtocol, UpstreamError, UpstreamEvent};

/// Caller audio held while the upstream socket opens: 2 s of 20 ms frames. Beyond it the
/// oldest frame is dropped (counted): stale speech is worth less than a bounded memory.
const HELD_UPLINK_FRAMES: usize = 100;

/// How an outbound message may be treated by a full queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutKind {
    /// Audio: may be dropped, oldest first, when its queue is full.
    Audio,
    /// A Twilio `mark`: never dropped (playback accounting depends on it).
    Mark,
    /// A Twilio `clear`: never dropped, and the barge-in clock stops when it is written.
    Clear,
    /// Any other control message: never dropped.
    Control,
    /// A WebSocket pong answering a ping (its text is the ping's payload).
    Pong,
}

/// One text frame for a socket.
#[derive(Debug)]
pub struct Outgoing {
    pub text: String,
    pub kind: OutKind,
    /// When the input that caused this message was read, if its write completes a latency
    /// measurement (uplink audio, unpaced downlink audio, a barge-in `clear`).
    pub caused_at: Option<Instant>,
}

/// What the I/O layer should do after a Twilio message.
#[derive(Debug)]
pub enum TwilioStep {
    Continue,
    /// The stream started: register the call and open the upstream socket.
    Started(StartInfo),
    /// Twilio said `stop`: the call is over.
    Stopped,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("twilio: {0}")]
    Twilio(#[from] StreamError),
    #[error("upstream: {0}")]
    Upstream(#[from] UpstreamError),
    #[error("media payload is not valid base64")]
    BadBase64,
    #[error("model audio delta is not valid base64")]
    BadModelAudio,
}

/// Per-call figures for the log line at call end and for reports.
#[derive(Clone, Debug, Default)]
pub struct CallStats {
    pub frames_in: u64,
    pub frames_out: u64,
    pub audio_bytes_in: u64,
    pub audio_bytes_out: u64,
    pub barge_ins: u64,
    pub dtmf_digits: u64,
    pub upstream_errors: u64,
    pub uplink_dropped: u64,
    pub transcript: Vec<TranscriptLine>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TranscriptLine {
    pub speaker: Speaker,
    pub text: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Speaker {
    Caller,
    Assistant,
}

/// Reused buffers for the per-frame codec work.
#[derive(Default)]
struct Scratch {
    bytes: Vec<u8>,
    pcm_in: Vec<i16>,
    pcm_out: Vec<i16>,
    mulaw: Vec<u8>,
    b64: String,
    follow_ups: Vec<String>,
}

/// PCM16 mode's per-direction resampler state (absent in μ-law passthrough mode).
struct Resamplers {
    uplink: StreamResampler,
    downlink: StreamResampler,
}

pub struct CallEngine {
    stream: StreamMachine,
    upstream: Box<dyn RealtimeProtocol>,
    playback: Playback,
    resamplers: Option<Resamplers>,
    /// The response and item of the latest model audio, so the resampler's tail can be
    /// flushed into the right item when it ends.
    last_audio: Option<(String, String)>,
    metrics: Arc<Metrics>,
    upstream_open: bool,
    held_upstream: VecDeque<Outgoing>,
    held_audio: usize,
    active_response: Option<String>,
    to_twilio: Vec<Outgoing>,
    to_upstream: Vec<Outgoing>,
    scratch: Scratch,
    stats: CallStats,
}

impl CallEngine {
    pub fn new(
        upstream: Box<dyn RealtimeProtocol>,
        mode: AudioMode,
        playback: PlaybackConfig,
        server_interrupts_response: bool,
        metrics: Arc<Metrics>,
    ) -> Self {
        let resamplers = match mode {
            AudioMode::Pcmu => None,
            // 8 ⇄ 24 kHz is a supported pair by construction; failure here is a bug.
            AudioMode::Pcm16 => Some(Resamplers {
                uplink: StreamResampler::new(8_000, 24_000).expect("8 kHz to 24 kHz is supported"),
                downlink: StreamResampler::new(24_000, 8_000)
                    .expect("24 kHz to 8 kHz is supported"),
            }),
        };
        let mut playback = Playback::new(playback);
        playback.set_server_interrupts_response(server_interrupts_response);
        Self {
            stream: StreamMachine::new(),
            upstream,
            playback,
            resamplers,
            last_audio: None,
            metrics,
            upstream_open: false,
            held_upstream: VecDeque::new(),
            held_audio: 0,
            active_response: None,
            to_twilio: Vec::new(),
            to_upstream: Vec::new(),
            scratch: Scratch::default(),
            stats: CallStats::default(),
        }
    }

    pub fn stream(&self) -> &StreamMachine {
        &self.stream
    }

    pub fn playback(&self) -> &Playback {
        &self.playback
    }

    pub fn stats(&self) -> &CallStats {
        &self.stats
    }

    pub fn upstream_is_open(&self) -> bool {
        self.upstream_open
    }

    /// Messages for Twilio, in order.
    pub fn take_to_twilio(&mut self) -> std::vec::Drain<'_, Outgoing> {
        self.to_twilio.drain(..)
    }

    /// Messages for the model, in order.
    pub fn take_to_upstream(&mut self) -> std::vec::Drain<'_, Outgoing> {
        self.to_upstream.drain(..)
    }

    /// When [`CallEngine::on_tick`] should run next (the pacer's next send time).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.playback.poll_timeout()
    }

    /// One text message from Twilio, read at `now`.
    pub fn on_twilio_text(&mut self, now: Instant, text: &str) -> Result<TwilioStep, EngineError> {
        let gaps_before = self.stream.counters().sequence_gaps;
        let event = self.stream.handle(text);
        let gaps = self.stream.counters().sequence_gaps - gaps_before;
        if gaps > 0 {
            for _ in 0..gaps {
                self.metrics.twilio_error(TwilioErrorKind::SequenceGap);
            }
        }
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                self.metrics.twilio_error(classify_stream_error(&error));
                return Err(error.into());
            }
        };
        match event {
            StreamEvent::Connected => Ok(TwilioStep::Continue),
            StreamEvent::Started(info) => Ok(TwilioStep::Started(info)),
            StreamEvent::Media { payload_b64, .. } => {
                self.on_caller_audio(now, &payload_b64)?;
                Ok(TwilioStep::Continue)
            }
            StreamEvent::Mark { name } => {
                match self.playback.on_mark(now, &name) {
                    MarkOutcome::Confirmed { .. } => {}
                    MarkOutcome::Stale => {
                        self.metrics.marks_stale.fetch_add(1, Relaxed);
                    }
                    MarkOutcome::Unknown => {
                        tracing::debug!(mark = %name, "mark echo we did not send");
                    }
                }
                Ok(TwilioStep::Continue)
            }
            StreamEvent::Dtmf { digit } => {
                self.on_dtmf(&digit);
                Ok(TwilioStep::Continue)
            }
            StreamEvent::Stopped => Ok(TwilioStep::Stopped),
            StreamEvent::Ignored(reason) => {
                self.metrics.twilio_error(TwilioErrorKind::UnknownEvent);
                tracing::debug!(?reason, "ignored twilio message");
                Ok(TwilioStep::Continue)
            }
        }
    }

    fn on_caller_audio(&mut self, now: Instant, payload_b64: &str) -> Result<(), EngineError> {
        // Decoding validates the payload and yields the byte count; in μ-law mode the
        // original base64 text is what goes upstream, so nothing is re-encoded.
        self.scratch.bytes.clear();
        if BASE64
            .decode_vec(payload_b64.as_bytes(), &mut self.scratch.bytes)
            .is_err()
        {
            self.metrics.twilio_error(TwilioErrorKind::BadBase64);
            return Err(EngineError::BadBase64);
        }
        let bytes = self.scratch.bytes.len() as u64;
        self.stats.frames_in += 1;
        self.stats.audio_bytes_in += bytes;
        self.metrics.frames_in.fetch_add(1, Relaxed);
        self.metrics.audio_bytes_in.fetch_add(bytes, Relaxed);

        let mut text = String::with_capacity(payload_b64.len() * 3 + 64);
        match &mut self.resamplers {
            None => self.upstream.write_audio_append(payload_b64, &mut text),
            Some(resamplers) => {
                let Scratch {
                    bytes,
                    pcm_in,
                    pcm_out,
                    mulaw: _,
                    b64,
                    follow_ups: _,
                } = &mut self.scratch;
                pcm_in.clear();
                pcm_in.extend(bytes.iter().map(|&code| g711::mulaw_decode(code)));
                pcm_out.clear();
                resamplers.uplink.process(pcm_in, pcm_out);
                if pcm_out.is_empty() {
                    return Ok(());
                }
                bytes.clear();
                pcm::samples_to_pcm16le(pcm_out, bytes);
                b64.clear();
                BASE64.encode_string(&bytes[..], b64);
                self.upstream.write_audio_append(b64, &mut text);
            }
        }
        let append = Outgoing {
            text,
            kind: OutKind::Audio,
            caused_at: Some(now),
        };
        self.push_upstream(append);
        Ok(())
    }

    fn on_dtmf(&mut self, digit: &str) {
        self.stats.dtmf_digits += 1;
        self.metrics.dtmf_digits.fetch_add(1, Relaxed);
        tracing::info!(digit, "caller pressed a key");
        let text = format!("The caller pressed the key \"{digit}\" on their phone keypad.");
        self.push_upstream_control(self.upstream.user_text(&text));
        // A digit usually asks for a reaction; a response already in progress will see it.
        if self.active_response.is_none() {
            self.push_upstream_control(self.upstream.create_response());
        }
    }

    /// The upstream socket is open: configure the session, then release held caller audio.
    pub fn on_upstream_open(&mut self, _now: Instant) {
        let mut opening = std::mem::take(&mut self.scratch.follow_ups);
        opening.clear();
        self.upstream.on_open(&mut opening);
        // Straight to the socket, ahead of everything held: the session must be configured
        // before the first audio or command reaches it.
        self.to_upstream
            .extend(opening.drain(..).map(|text| Outgoing {
                text,
                kind: OutKind::Control,
                caused_at: None,
            }));
        self.scratch.follow_ups = opening;
        self.upstream_open = true;
        self.held_audio = 0;
        self.to_upstream.extend(self.held_upstream.drain(..));
    }

    /// One text message from the model, read at `now`.
    pub fn on_upstream_text(&mut self, now: Instant, text: &str) -> Result<(), EngineError> {
        let mut follow_ups = std::mem::take(&mut self.scratch.follow_ups);
        follow_ups.clear();
        let result = self.upstream.on_message(text, &mut follow_ups);
        for text in follow_ups.drain(..) {
            self.push_upstream_control(text);
        }
        self.scratch.follow_ups = follow_ups;
        let event = result?;
        match event {
            UpstreamEvent::SessionReady => tracing::debug!("upstream session configured"),
            UpstreamEvent::AudioDelta {
                response_id,
                item_id,
                audio_b64,
            } => self.on_model_audio(now, &response_id, &item_id, &audio_b64)?,
            UpstreamEvent::SpeechStarted { .. } => self.on_speech_started(now),
            UpstreamEvent::SpeechStopped { .. } => {}
            UpstreamEvent::ResponseCreated { response_id } => {
                self.playback.on_response_created(&response_id);
                self.active_response = Some(response_id.into_owned());
            }
            UpstreamEvent::ResponseDone {
                response_id,
                status,
            } => {
                tracing::debug!(%response_id, %status, "response done");
                if self
                    .last_audio
                    .as_ref()
                    .is_some_and(|(last_response, _)| *last_response == *response_id)
                {
                    self.flush_downlink_resampler(now);
                }
                self.playback.on_response_done(&response_id);
                if self.active_response.as_deref() == Some(&*response_id) {
                    self.active_response = None;
                }
                self.pump_playback(now, Some(now));
            }
            UpstreamEvent::InputTranscript { text, .. } => {
                self.push_transcript(Speaker::Caller, text);
            }
            UpstreamEvent::OutputTranscript { text, .. } => {
                self.push_transcript(Speaker::Assistant, text);
            }
            UpstreamEvent::FunctionCall { name, call_id, .. } => {
                // Tools arrive with the control plane; until then the model is told plainly.
                tracing::warn!(%name, "model called a tool, but no tools are configured");
                let output = r#"{"error":"no tools are available on this line"}"#;
                self.push_upstream_control(self.upstream.function_output(&call_id, output));
                self.push_upstream_control(self.upstream.create_response());
            }
            UpstreamEvent::Error {
                error_type,
                code,
                message,
            } => {
                self.stats.upstream_errors += 1;
                self.metrics.upstream_errors.fetch_add(1, Relaxed);
                tracing::warn!(
                    error_type = %error_type,
                    code = code.as_deref().unwrap_or("-"),
                    %message,
                    "upstream error event"
                );
            }
            UpstreamEvent::Other => {}
        }
        Ok(())
    }

    fn push_transcript(&mut self, speaker: Speaker, text: Cow<'_, str>) {
        let text = text.trim();
        if !text.is_empty() {
            tracing::debug!(?speaker, text, "transcript");
            self.stats.transcript.push(TranscriptLine {
                speaker,
                text: text.to_owned(),
            });
        }
    }

    fn on_model_audio(
        &mut self,
        now: Instant,
        response_id: &str,
        item_id: &str,
        audio_b64: &str,
    ) -> Result<(), EngineError> {
        if self.resamplers.is_some()
            && self
                .last_audio
                .as_ref()
                .is_some_and(|(_, last_item)| last_item != item_id)
        {
            self.flush_downlink_resampler(now);
        }
        if self
            .last_audio
            .as_ref()
            .is_none_or(|(_, last_item)| last_item != item_id)
        {
            self.last_audio = Some((response_id.to_owned(), item_id.to_owned()));
        }
        let Scratch {
            bytes,
            pcm_in,
            pcm_out,
            mulaw,
            ..
        } = &mut self.scratch;
        bytes.clear();
        BASE64
            .decode_vec(audio_b64.as_bytes(), bytes)
            .map_err(|_| EngineError::BadModelAudio)?;
        let audio: &[u8] = match &mut self.resamplers {
            None => bytes,
            Some(resamplers) => {
                pcm_in.clear();
                pcm::pcm16le_to_samples(bytes, pcm_in);
                pcm_out.clear();
                resamplers.downlink.process(pcm_in, pcm_out);
                mulaw.clear();
                mulaw.extend(pcm_out.iter().map(|&sample| g711::mulaw_encode(sample)));
                mulaw
            }
        };
        if !self
            .playback
            .on_audio_delta(now, response_id, item_id, audio)
        {
            self.metrics.late_deltas_dropped.fetch_add(1, Relaxed);
            return Ok(());
        }
        self.pump_playback(now, Some(now));
        Ok(())
    }

    /// Feeds the resampler's held tail (up to one block plus its delay) to playback as the
    /// end of the latest item, so a response's last syllable is not left waiting.
    fn flush_downlink_resampler(&mut self, now: Instant) {
        let (Some(resamplers), Some((response_id, item_id))) =
            (&mut self.resamplers, self.last_audio.take())
        else {
            return;
        };
        let Scratch { pcm_out, mulaw, .. } = &mut self.scratch;
        pcm_out.clear();
        resamplers.downlink.flush(pcm_out);
        if pcm_out.is_empty() {
            return;
        }
        mulaw.clear();
        mulaw.extend(pcm_out.iter().map(|&sample| g711::mulaw_encode(sample)));
        self.playback
            .on_audio_delta(now, &response_id, &item_id, mulaw);
    }

    fn on_speech_started(&mut self, now: Instant) {
        let Some(interruption) = self.playback.on_speech_started(now) else {
            return;
        };
        if let Some(resamplers) = &mut self.resamplers {
            // The interrupted response's tail must not leak into the next one.
            resamplers.downlink.reset();
            self.last_audio = None;
        }
        self.stats.barge_ins += 1;
        self.metrics.barge_ins.fetch_add(1, Relaxed);
        // The caller hears the clear: it goes first, and its write stops the barge-in clock.
        if let Some(stream_sid) = self.stream.stream_sid() {
            let mut text = String::with_capacity(64);
            write_clear_json(&mut text, stream_sid);
            // Anything not yet written to Twilio is stale now.
            self.to_twilio.retain(|out| out.kind != OutKind::Audio);
            self.to_twilio.push(Outgoing {
                text,
                kind: OutKind::Clear,
                caused_at: Some(now),
            });
        }
        if let Some(truncate) = &interruption.truncate {
            tracing::info!(item = %truncate.item_id, audio_end_ms = truncate.audio_end_ms, "barge-in: truncating");
            let text = self
                .upstream
                .truncate(&truncate.item_id, truncate.audio_end_ms);
            self.push_upstream_control(text);
        }
        for item_id in &interruption.delete {
            let text = self.upstream.delete_item(item_id);
            self.push_upstream_control(text);
        }
        if interruption.cancel_response {
            self.push_upstream_control(self.upstream.cancel_response());
        }
    }

    /// The pacer's deadline passed.
    pub fn on_tick(&mut self, now: Instant) {
        self.pump_playback(now, None);
    }

    /// Sends every chunk the pacer allows at `now`. `caused_at` marks chunks sent without
    /// waiting, whose write time measures the bridge's downlink latency.
    fn pump_playback(&mut self, now: Instant, caused_at: Option<Instant>) {
        let Some(stream_sid) = self.stream.stream_sid() else {
            return;
        };
        while let Some(transmit) = self.playback.poll_transmit(now) {
            let mut media = String::with_capacity(transmit.payload.len() * 4 / 3 + 96);
            write_media_json_from_mulaw(&mut media, stream_sid, transmit.payload);
            let mut mark = String::with_capacity(transmit.mark.len() + 80);
            write_mark_json(&mut mark, stream_sid, transmit.mark);
            let bytes = transmit.payload.len() as u64;
            self.stats.frames_out += 1;
            self.stats.audio_bytes_out += bytes;
            self.metrics.frames_out.fetch_add(1, Relaxed);
            self.metrics.audio_bytes_out.fetch_add(bytes, Relaxed);
            self.metrics.marks_sent.fetch_add(1, Relaxed);
            self.to_twilio.push(Outgoing {
                text: media,
                kind: OutKind::Audio,
                caused_at,
            });
            self.to_twilio.push(Outgoing {
                text: mark,
                kind: OutKind::Mark,
                caused_at: None,
            });
        }
    }

    fn push_upstream_control(&mut self, text: String) {
        self.push_upstream(Outgoing {
            text,
            kind: OutKind::Control,
            caused_at: None,
        });
    }

    /// Until the socket is open and configured, everything for the model waits here.
    fn push_upstream(&mut self, out: Outgoing) {
        if self.upstream_open {
            self.to_upstream.push(out);
            return;
        }
        if out.kind == OutKind::Audio {
            if self.held_audio == HELD_UPLINK_FRAMES {
                if let Some(oldest) = self
                    .held_upstream
                    .iter()
                    .position(|o| o.kind == OutKind::Audio)
                {
                    self.held_upstream.remove(oldest);
                    self.held_audio -= 1;
                    self.stats.uplink_dropped += 1;
                    self.metrics.audio_dropped(Direction::Uplink, 1);
                }
            }
            self.held_audio += 1;
        }
        self.held_upstream.push_back(out);
    }
}

fn classify_stream_error(error: &StreamError) -> TwilioErrorKind {
    match error {
        StreamError::Malformed(_) => TwilioErrorKind::Malformed,
        StreamError::OutOfOrder { .. } | StreamError::DuplicateStart => TwilioErrorKind::OutOfOrder,
        StreamError::StreamSidMismatch => TwilioErrorKind::StreamSidMismatch,
        StreamError::UnsupportedMediaFormat(_) => TwilioErrorKind::BadMediaFormat,
    }
}
