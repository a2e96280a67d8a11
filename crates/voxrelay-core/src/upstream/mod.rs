//! Realtime voice APIs behind one seam: OpenAI Realtime first, Gemini Live later.
//!
//! This module owns the [`RealtimeProtocol`] trait, the provider-neutral [`UpstreamEvent`]s the
//! call engine reacts to, the session settings every provider is configured from, and the
//! provider factory ([`protocol_for`]); dialling the model is the bridge's
//! (`voxrelay::upstream::connect`), the mock server the simulator's. Invariants: a
//! protocol implementation never touches a socket or the clock; parsing a server message never
//! panics and borrows from the message wherever the text allows; every message it produces is
//! one complete text frame in the provider's current (GA) shape.

use std::borrow::Cow;

use crate::AudioMode;
use crate::session::conversation::ReplayItem;

pub mod openai;

pub use openai::OpenAiRealtime;

/// How the model should run a call: persona, voice, audio format, turn detection.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionSettings {
    pub instructions: String,
    pub voice: String,
    pub audio_mode: AudioMode,
    /// When set, the model speaks this greeting as soon as the session is configured.
    pub greeting: Option<String>,
    /// Caller-side transcription; `None` turns it off.
    pub transcription_model: Option<String>,
    pub vad: VadSettings,
    /// Sent as `session.model` when set; the model is normally chosen by the connect URL.
    pub model: Option<String>,
    /// Function definitions the model may call (OpenAI's `{"type":"function",…}` shape).
    pub tools: Vec<serde_json::Value>,
    /// The caller's language as an ISO-639-1 code (`en`), a hint for input transcription.
    pub language: Option<String>,
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            instructions: String::new(),
            voice: "marin".to_owned(),
            audio_mode: AudioMode::default(),
            greeting: None,
            transcription_model: Some("gpt-4o-mini-transcribe".to_owned()),
            vad: VadSettings::default(),
            model: None,
            tools: Vec::new(),
            language: None,
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
    AudioDelta {
        response_id: Cow<'a, str>,
        item_id: Cow<'a, str>,
        audio_b64: Cow<'a, str>,
    },
    SpeechStarted {
        item_id: Cow<'a, str>,
        audio_start_ms: u64,
    },
    SpeechStopped {
        audio_end_ms: u64,
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

/// The seam every realtime provider implements (OpenAI first; Gemini Live later). Output
/// messages are text frames.
pub trait RealtimeProtocol: Send {
    /// Whether the server cancels the response in progress itself when the caller starts
    /// talking (so barge-in must not send its own `response.cancel`).
    fn server_interrupts_response(&self) -> bool;
    /// Messages to send right after the socket opens (e.g. session.update).
    fn on_open(&mut self, out: &mut Vec<String>);
    /// Parse one server message; may push follow-ups into `out` (e.g. the greeting's
    /// response.create once the session is ready).
    fn on_message<'a>(
        &mut self,
        text: &'a str,
        out: &mut Vec<String>,
    ) -> Result<UpstreamEvent<'a>, UpstreamError>;
    /// Caller audio, already base64 in the session's input format, written as one append
    /// message into `buf` (cleared first). No allocation: write straight into buf.
    fn write_audio_append(&self, audio_b64: &str, buf: &mut String);
    fn truncate(&self, item_id: &str, audio_end_ms: u32) -> String;
    fn delete_item(&self, item_id: &str) -> String;
    fn cancel_response(&self) -> String;
    /// A user text message (used for DTMF digits).
    fn user_text(&self, text: &str) -> String;
    fn create_response(&self) -> String;
    fn function_output(&self, call_id: &str, output: &str) -> String;
    /// One item of a conversation replayed into a new session (after a drop or a renewal).
    fn replay_item(&self, item: &ReplayItem<'_>) -> String;
}

/// The provider factory: the realtime protocol that runs a session with `settings`. The one
/// place that names a provider; the call engine, the driver and pre-warm take what it builds.
pub fn protocol_for(settings: SessionSettings) -> Box<dyn RealtimeProtocol> {
    Box::new(OpenAiRealtime::new(settings))
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
