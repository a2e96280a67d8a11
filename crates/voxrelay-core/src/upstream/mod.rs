//! Realtime voice APIs behind one seam: OpenAI Realtime and Gemini Live.
//!
//! This module owns the [`RealtimeProtocol`] trait, the provider-neutral [`UpstreamEvent`]s the
//! call engine reacts to, the session settings every provider is configured from, the audio
//! formats a session speaks each way ([`ModelAudio`]), and the provider factory
//! ([`protocol_for`]), the one place that chooses a protocol by [`Provider`]; dialling the
//! model is the bridge's
//! (`voxrelay::upstream::connect`), the mock server the simulator's. Invariants: a
//! protocol implementation never touches a socket or the clock; parsing a server message never
//! panics and borrows from the message wherever the text allows; every message it produces is
//! one complete text frame in the provider's current (GA) shape.

use std::borrow::Cow;

use smallvec::SmallVec;

use crate::session::conversation::ReplayItem;
use crate::{AudioMode, Provider};

pub mod gemini;
pub mod openai;

pub use gemini::GeminiLive;
pub use openai::OpenAiRealtime;

/// What one server message means: usually one event, sometimes several (a Gemini message can
/// carry audio, a transcript and the turn's end), in the order they happened. Inline up to two,
/// so the audio path allocates nothing per message.
pub type UpstreamEvents<'a> = SmallVec<[UpstreamEvent<'a>; 2]>;

/// Audio as a model session takes or sends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelAudioFormat {
    /// G.711 μ-law at 8 kHz: Twilio's payload, passed through.
    Mulaw8k,
    /// 16-bit little-endian mono PCM at `rate` Hz (16000 or 24000).
    Pcm16 { rate: u32 },
}

impl ModelAudioFormat {
    /// Bytes of this format per millisecond of audio.
    pub fn bytes_per_ms(self) -> u64 {
        match self {
            ModelAudioFormat::Mulaw8k => 8,
            ModelAudioFormat::Pcm16 { rate } => u64::from(rate) * 2 / 1000,
        }
    }
}

/// The formats a session speaks: caller audio in, model audio out. They differ by direction
/// for Gemini (16 kHz in, 24 kHz out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelAudio {
    pub input: ModelAudioFormat,
    pub output: ModelAudioFormat,
}

impl ModelAudio {
    /// What an OpenAI session speaks in `mode`: the same format both ways.
    pub fn for_mode(mode: AudioMode) -> Self {
        let format = match mode {
            AudioMode::Pcmu => ModelAudioFormat::Mulaw8k,
            AudioMode::Pcm16 => ModelAudioFormat::Pcm16 { rate: 24_000 },
        };
        Self {
            input: format,
            output: format,
        }
    }
}

/// How the model should run a call: provider, persona, voice, audio format, turn detection.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionSettings {
    /// Who runs the session; [`protocol_for`] builds that provider's protocol.
    pub provider: Provider,
    pub instructions: String,
    pub voice: String,
    pub audio_mode: AudioMode,
    /// When set, the model speaks this greeting as soon as the session is configured.
    pub greeting: Option<String>,
    /// Caller-side transcription; `None` turns it off.
    pub transcription_model: Option<String>,
    pub vad: VadSettings,
    /// The provider's model id; `None`: [`Provider::default_model`]. OpenAI takes it in the
    /// connect URL (the bridge's dial target), Gemini in its `setup`.
    pub model: Option<String>,
    /// Function definitions the model may call (OpenAI's `{"type":"function",…}` shape).
    pub tools: Vec<serde_json::Value>,
    /// The caller's language as an ISO-639-1 code (`en`), a hint for input transcription.
    pub language: Option<String>,
    /// A provider's own handle to resume an earlier session's context (Gemini's session
    /// resumption); set only for a successor, never by a tenant.
    pub resumption_handle: Option<String>,
    /// Which of the call's sessions this is (0 for the first, one more for each successor):
    /// a provider that names turns itself (Gemini) keeps the names unique across the call, as
    /// the call's conversation and playback remember them.
    pub generation: u32,
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            provider: Provider::OpenAi,
            instructions: String::new(),
            voice: "marin".to_owned(),
            audio_mode: AudioMode::default(),
            greeting: None,
            transcription_model: Some("gpt-4o-mini-transcribe".to_owned()),
            vad: VadSettings::default(),
            model: None,
            tools: Vec::new(),
            language: None,
            resumption_handle: None,
            generation: 0,
        }
    }
}

/// Server-side voice activity detection (`server_vad`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VadSettings {
    pub threshold: f32,
    pub prefix_padding_ms: u32,
    pub silence_duration_ms: u32,
    /// The server cancels the in-progress response itself when the caller starts talking.
    pub interrupt_response: bool,
    /// The server starts a response itself when the caller stops talking.
    pub create_response: bool,
}

impl Default for VadSettings {
    fn default() -> Self {
        Self {
            threshold: 0.5,
            prefix_padding_ms: 300,
            silence_duration_ms: 500,
            interrupt_response: true,
            create_response: true,
        }
    }
}

/// What a server message means to the call engine. Strings borrow from the message text when
/// it contains no JSON escapes.
#[derive(Clone, Debug, PartialEq)]
pub enum UpstreamEvent<'a> {
    /// `session.updated`: the configuration we sent is in force.
    SessionReady,
    /// Model audio. Empty ids mean the response in progress, its one item named as the
    /// response (a provider that names no turns per message: Gemini).
    AudioDelta {
        response_id: Cow<'a, str>,
        item_id: Cow<'a, str>,
        audio_b64: Cow<'a, str>,
    },
    /// The caller started speaking; `audio_start_ms` is where their speech began in the audio
    /// this session was sent (after any padding the provider keeps before it; `None`: the
    /// provider does not say).
    SpeechStarted {
        item_id: Cow<'a, str>,
        audio_start_ms: Option<u64>,
    },
    /// The caller stopped speaking; `audio_end_ms` is where, as for `SpeechStarted`.
    SpeechStopped {
        audio_end_ms: Option<u64>,
    },
    ResponseCreated {
        response_id: Cow<'a, str>,
    },
    /// `status` is `completed`, `cancelled`, `incomplete` or `failed`.
    ResponseDone {
        response_id: Cow<'a, str>,
        status: Cow<'a, str>,
    },
    InputTranscript {
        item_id: Cow<'a, str>,
        text: Cow<'a, str>,
    },
    OutputTranscript {
        item_id: Cow<'a, str>,
        text: Cow<'a, str>,
    },
    /// Part of an assistant item's transcript, as it is spoken (kept for a replay of what
    /// the caller heard of a response cut short).
    OutputTranscriptDelta {
        item_id: Cow<'a, str>,
        delta: Cow<'a, str>,
    },
    FunctionCall {
        call_id: Cow<'a, str>,
        name: Cow<'a, str>,
        arguments: Cow<'a, str>,
    },
    /// The model no longer wants the answer to this call (Gemini's `toolCallCancellation`).
    FunctionCallCancelled {
        call_id: Cow<'a, str>,
    },
    /// Tokens a response (or turn) used, for the call's report.
    Usage {
        input_tokens: u64,
        output_tokens: u64,
    },
    /// The provider will end this session soon (Gemini Live's `goAway`): the engine renews it
    /// now, make-before-break, as it does at the session's age limit.
    SessionEnding,
    /// Most errors leave the session open; the engine decides what is fatal.
    Error {
        error_type: Cow<'a, str>,
        code: Option<Cow<'a, str>>,
        message: Cow<'a, str>,
    },
    /// Known but uninteresting (`rate_limits.updated`, transcript deltas, …) or unknown types.
    Other,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The server sent something that is not the JSON we expect for its `type`.
    #[error("malformed upstream message: {0}")]
    Malformed(#[from] serde_json::Error),
    /// A server message that is not a JSON object.
    #[error("upstream message is not a JSON object")]
    NotAnObject,
    /// Model audio in a format the session did not ask for (a rate we would play wrong).
    #[error("model audio in an unexpected format")]
    UnexpectedAudioFormat,
    /// An id or function name over [`openai::MAX_ID_BYTES`]: refused rather than remembered.
    #[error("an id of {0} bytes in an upstream message (at most {max})", max = openai::MAX_ID_BYTES)]
    IdTooLong(usize),
    /// The URL could not be turned into a WebSocket request.
    #[error("invalid upstream URL: {0}")]
    InvalidUrl(String),
    /// The API key cannot be carried in an HTTP header.
    #[error("API key contains characters not allowed in an HTTP header")]
    InvalidApiKey,
    #[error("could not connect upstream: {0}")]
    Connect(String),
    /// The server answered the handshake with an HTTP error (401: bad key).
    #[error("upstream refused the WebSocket handshake with HTTP {0}")]
    HandshakeRejected(u16),
    #[error("upstream connect timed out after {0:?}")]
    ConnectTimeout(std::time::Duration),
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// The seam every realtime provider implements. Output messages are text frames. A provider
/// without some command (Gemini has no truncate) returns `None` for it; the engine keeps its
/// own account of what the caller heard either way.
pub trait RealtimeProtocol: Send {
    fn provider(&self) -> Provider;
    /// The audio formats this session speaks each way.
    fn audio(&self) -> ModelAudio;
    /// Whether the server cancels the response in progress itself when the caller starts
    /// talking (so barge-in must not send its own `response.cancel`).
    fn server_interrupts_response(&self) -> bool;
    /// Whether the model answers a tool's output on its own (Gemini), so the engine must not
    /// ask for a response after it.
    fn answers_tool_output_itself(&self) -> bool {
        false
    }
    /// Whether this session was opened on the provider's own record of an earlier session
    /// (a resumption handle), so it must not be told the conversation again.
    fn resumes_context(&self) -> bool {
        false
    }
    /// The provider's handle to resume this session's context, while one is valid.
    fn resumption_handle(&self) -> Option<&str> {
        None
    }
    /// Messages to send right after the socket opens (e.g. session.update).
    fn on_open(&mut self, out: &mut Vec<String>);
    /// Parse one server message into what it means, in order; may push follow-ups into `out`
    /// (e.g. the greeting's request once the session is ready).
    fn on_message<'a>(
        &mut self,
        text: &'a str,
        out: &mut Vec<String>,
    ) -> Result<UpstreamEvents<'a>, UpstreamError>;
    /// Caller audio, already base64 in the session's input format, written as one append
    /// message into `buf` (cleared first). No allocation: write straight into buf.
    fn write_audio_append(&self, audio_b64: &str, buf: &mut String);
    /// Cut the model's record of an assistant item at what the caller heard.
    fn truncate(&self, item_id: &str, audio_end_ms: u32) -> Option<String>;
    fn delete_item(&self, item_id: &str) -> Option<String>;
    fn cancel_response(&self) -> Option<String>;
    /// A user text message (used for DTMF digits).
    fn user_text(&self, text: &str) -> String;
    /// Asks the model to respond now.
    fn create_response(&self) -> String;
    fn function_output(&self, call_id: &str, output: &str) -> String;
    /// One item of a conversation replayed into a new session (after a drop or a renewal).
    fn replay_item(&self, item: &ReplayItem<'_>) -> String;
}

/// The provider factory: the realtime protocol that runs a session with `settings`, chosen by
/// `settings.provider`. The one place that names a provider's protocol; the call engine, the
/// driver and pre-warm take what it builds.
pub fn protocol_for(settings: SessionSettings) -> Box<dyn RealtimeProtocol> {
    match settings.provider {
        Provider::OpenAi => Box::new(OpenAiRealtime::new(settings)),
        Provider::Gemini => Box::new(GeminiLive::new(settings)),
    }
}

/// Refuses an event carrying an id (or function name) over [`openai::MAX_ID_BYTES`]: the
/// engine and playback remember dozens per call.
pub(crate) fn check_ids(event: &UpstreamEvent<'_>) -> Result<(), UpstreamError> {
    let ids: [&str; 2] = match event {
        UpstreamEvent::AudioDelta {
            response_id,
            item_id,
            ..
        } => [response_id, item_id],
        UpstreamEvent::SpeechStarted { item_id, .. }
        | UpstreamEvent::InputTranscript { item_id, .. }
        | UpstreamEvent::OutputTranscript { item_id, .. }
        | UpstreamEvent::OutputTranscriptDelta { item_id, .. } => [item_id, ""],
        UpstreamEvent::ResponseCreated { response_id }
        | UpstreamEvent::ResponseDone { response_id, .. } => [response_id, ""],
        UpstreamEvent::FunctionCall { call_id, name, .. } => [call_id, name],
        UpstreamEvent::FunctionCallCancelled { call_id } => [call_id, ""],
        UpstreamEvent::SessionReady
        | UpstreamEvent::SessionEnding
        | UpstreamEvent::SpeechStopped { .. }
        | UpstreamEvent::Usage { .. }
        | UpstreamEvent::Error { .. }
        | UpstreamEvent::Other => return Ok(()),
    };
    match ids.iter().map(|id| id.len()).max() {
        Some(len) if len > openai::MAX_ID_BYTES => Err(UpstreamError::IdTooLong(len)),
        _ => Ok(()),
    }
}

// The one JSON string writer (the Twilio messages and the simulator write with it too).
pub(crate) use crate::json::push_json_str;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_values() {
        let settings = SessionSettings::default();
        assert_eq!(
            settings.transcription_model.as_deref(),
            Some("gpt-4o-mini-transcribe")
        );
        assert_eq!(settings.vad.threshold, 0.5);
        assert_eq!(settings.vad.prefix_padding_ms, 300);
        assert_eq!(settings.vad.silence_duration_ms, 500);
        assert!(settings.vad.interrupt_response && settings.vad.create_response);
    }
}
