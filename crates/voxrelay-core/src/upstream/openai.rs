//! The OpenAI Realtime API (GA shape) as a sans-IO [`RealtimeProtocol`].
//!
//! Owns the client messages voxrelay sends (`session.update`, `input_audio_buffer.append`,
//! truncate/delete/cancel, user text, function output, `response.create`) and the borrowed
//! parsing of the server events the call engine needs (a `response.done` also yields the
//! tokens its `response.usage` reports). Invariants: only the GA shape is ever
//! produced (no `OpenAI-Beta`, no `input_audio_format`, no `response.audio.delta`); the
//! greeting's `response.create` is sent exactly once, and only after the first
//! `session.updated`; unknown server event types are [`UpstreamEvent::Other`], never errors;
//! malformed input is an [`UpstreamError`], never a panic; an id or function name longer than
//! [`MAX_ID_BYTES`] is refused ([`UpstreamError::IdTooLong`]), because the call keeps dozens.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::{
    ModelAudio, RealtimeProtocol, SessionSettings, UpstreamError, UpstreamEvent, UpstreamEvents,
    check_ids, push_json_str,
};
use crate::session::conversation::ReplayItem;
use crate::{AudioMode, Provider};

/// The longest item, response or call id (or function name) taken from a server event. The
/// service's ids are about 30 characters and function names at most 64; the engine and
/// playback remember dozens of ids per call, so a longer one is refused, not stored.
pub const MAX_ID_BYTES: usize = 128;

/// OpenAI Realtime (GA) for one call.
#[derive(Debug)]
pub struct OpenAiRealtime {
    settings: SessionSettings,
    greeting_sent: bool,
}

impl OpenAiRealtime {
    pub fn new(settings: SessionSettings) -> Self {
        Self {
            settings,
            greeting_sent: false,
        }
    }

    pub fn settings(&self) -> &SessionSettings {
        &self.settings
    }

    /// The `session.update` that configures the call.
    pub fn session_update(&self) -> String {
        let settings = &self.settings;
        let vad = &settings.vad;
        let format = AudioFormat::for_mode(settings.audio_mode);
        let message = ClientEvent::SessionUpdate {
            session: SessionConfig {
                kind: "realtime",
                model: settings.model.as_deref(),
                output_modalities: ["audio"],
                instructions: &settings.instructions,
                tool_choice: (!settings.tools.is_empty()).then_some("auto"),
                tools: &settings.tools,
                audio: AudioConfig {
                    input: AudioInput {
                        format,
                        turn_detection: TurnDetection {
                            kind: "server_vad",
                            threshold: vad.threshold,
                            prefix_padding_ms: vad.prefix_padding_ms,
                            silence_duration_ms: vad.silence_duration_ms,
                            create_response: vad.create_response,
                            interrupt_response: vad.interrupt_response,
                        },
                        transcription: settings.transcription_model.as_deref().map(|model| {
                            Transcription {
                                model,
                                language: settings.language.as_deref(),
                            }
                        }),
                    },
                    output: AudioOutput {
                        format,
                        voice: &settings.voice,
                    },
                },
            },
        };
        to_json(&message)
    }

    /// The `response.create` that makes the model speak the greeting. Response instructions
    /// replace the session's for this response only, so the persona is repeated before the
    /// greeting request.
    fn greeting_response(&self, greeting: &str) -> String {
        let mut instructions =
            String::with_capacity(self.settings.instructions.len() + greeting.len() + 96);
        if !self.settings.instructions.is_empty() {
            instructions.push_str(&self.settings.instructions);
            instructions.push_str("\n\n");
        }
        instructions
            .push_str("The call has just connected. Greet the caller now by saying exactly this: ");
        instructions.push_str(greeting);
        to_json(&ClientEvent::ResponseCreate {
            response: Some(ResponseParams {
                instructions: &instructions,
            }),
        })
    }
}

// The commands OpenAI always has are inherent methods returning their message; the trait
// (where another provider may lack them) wraps them.
impl OpenAiRealtime {
    /// Parses one server event (OpenAI sends one event per message) into what it means. The
    /// tokens a `response.done` reports are left out here: [`Self::parse_events`] adds them.
    pub fn parse_event<'a>(
        &mut self,
        text: &'a str,
        out: &mut Vec<String>,
    ) -> Result<UpstreamEvent<'a>, UpstreamError> {
        self.parse_message(text, out).map(|(event, _)| event)
    }

    /// Everything one server message means, in order: its event, then for a `response.done`
    /// that carries `response.usage` an [`UpstreamEvent::Usage`] (the engine sums them for
    /// the call's report).
    pub fn parse_events<'a>(
        &mut self,
        text: &'a str,
        out: &mut Vec<String>,
    ) -> Result<UpstreamEvents<'a>, UpstreamError> {
        let (event, usage) = self.parse_message(text, out)?;
        let mut events = UpstreamEvents::new();
        events.push(event);
        if let Some(usage) = usage {
            events.push(UpstreamEvent::Usage {
                input_tokens: usage.input_tokens,
                output_tokens: usage.output_tokens,
            });
        }
        Ok(events)
    }

    /// One server event and, for a `response.done`, the usage it reported (if any). One
    /// parse serves both, so a `response.done` is not read twice.
    fn parse_message<'a>(
        &mut self,
        text: &'a str,
        out: &mut Vec<String>,
    ) -> Result<(UpstreamEvent<'a>, Option<ResponseUsage>), UpstreamError> {
        let envelope: Envelope<'a> = serde_json::from_str(text)?;
        let mut usage = None;
        let event = match envelope.kind.as_ref() {
            "session.updated" => {
                if !self.greeting_sent {
                    self.greeting_sent = true;
                    if let Some(greeting) = self.settings.greeting.as_deref() {
                        out.push(self.greeting_response(greeting));
                    }
                }
                UpstreamEvent::SessionReady
            }
            "response.output_audio.delta" => {
                let delta: AudioDelta<'a> = serde_json::from_str(text)?;
                UpstreamEvent::AudioDelta {
                    response_id: delta.response_id,
                    item_id: delta.item_id,
                    audio_b64: delta.delta,
                }
            }
            "input_audio_buffer.speech_started" => {
                let started: SpeechStarted<'a> = serde_json::from_str(text)?;
                // `audio_start_ms` is where the audio the server keeps for the item begins: its
                // prefix padding before the speech it detected.
                let padding = u64::from(self.settings.vad.prefix_padding_ms);
                UpstreamEvent::SpeechStarted {
                    item_id: started.item_id,
                    audio_start_ms: Some(started.audio_start_ms.saturating_add(padding)),
                }
            }
            "input_audio_buffer.speech_stopped" => {
                let stopped: SpeechStopped = serde_json::from_str(text)?;
                UpstreamEvent::SpeechStopped {
                    audio_end_ms: Some(stopped.audio_end_ms),
                }
            }
            "response.created" => {
                let created: ResponseEvent<'a> = serde_json::from_str(text)?;
                UpstreamEvent::ResponseCreated {
                    response_id: created.response.id,
                }
            }
            "response.done" => {
                let done: ResponseEvent<'a> = serde_json::from_str(text)?;
                usage = done.response.usage;
                UpstreamEvent::ResponseDone {
                    response_id: done.response.id,
                    status: done.response.status,
                }
            }
            "conversation.item.input_audio_transcription.completed" => {
                let transcript: Transcript<'a> = serde_json::from_str(text)?;
                UpstreamEvent::InputTranscript {
                    item_id: transcript.item_id,
                    text: transcript.transcript,
                }
            }
            "response.output_audio_transcript.done" => {
                let transcript: Transcript<'a> = serde_json::from_str(text)?;
                UpstreamEvent::OutputTranscript {
                    item_id: transcript.item_id,
                    text: transcript.transcript,
                }
            }
            "response.output_audio_transcript.delta" => {
                let delta: TranscriptDelta<'a> = serde_json::from_str(text)?;
                UpstreamEvent::OutputTranscriptDelta {
                    item_id: delta.item_id,
                    delta: delta.delta,
                }
            }
            "response.function_call_arguments.done" => {
                let call: FunctionCallDone<'a> = serde_json::from_str(text)?;
                UpstreamEvent::FunctionCall {
                    call_id: call.call_id,
                    name: call.name,
                    arguments: call.arguments,
                }
            }
            "error" => {
                let error: ErrorEvent<'a> = serde_json::from_str(text)?;
                UpstreamEvent::Error {
                    error_type: error.error.kind,
                    code: error.error.code,
                    message: error.error.message,
                }
            }
            _ => UpstreamEvent::Other,
        };
        check_ids(&event)?;
        Ok((event, usage))
    }

    pub fn write_audio_append(&self, audio_b64: &str, buf: &mut String) {
        buf.clear();
        buf.push_str(r#"{"type":"input_audio_buffer.append","audio":"#);
        // Base64 never needs escaping; push_json_str only pays for a scan.
        push_json_str(buf, audio_b64);
        buf.push('}');
    }

    pub fn truncate(&self, item_id: &str, audio_end_ms: u32) -> String {
        to_json(&ClientEvent::ConversationItemTruncate {
            item_id,
            content_index: 0,
            audio_end_ms,
        })
    }

    pub fn delete_item(&self, item_id: &str) -> String {
        to_json(&ClientEvent::ConversationItemDelete { item_id })
    }

    pub fn cancel_response(&self) -> String {
        to_json(&ClientEvent::ResponseCancel {})
    }

    pub fn user_text(&self, text: &str) -> String {
        to_json(&ClientEvent::ConversationItemCreate {
            item: Item::Message {
                role: "user",
                content: [InputText {
                    kind: "input_text",
                    text,
                }],
            },
        })
    }

    pub fn create_response(&self) -> String {
        to_json(&ClientEvent::ResponseCreate { response: None })
    }

    pub fn function_output(&self, call_id: &str, output: &str) -> String {
        to_json(&ClientEvent::ConversationItemCreate {
            item: Item::FunctionCallOutput { call_id, output },
        })
    }

    pub fn replay_item(&self, item: &ReplayItem<'_>) -> String {
        let item = match item {
            ReplayItem::UserText(text) => return self.user_text(text),
            ReplayItem::AssistantText(text) => Item::Message {
                role: "assistant",
                content: [InputText {
                    kind: "output_text",
                    text,
                }],
            },
            ReplayItem::FunctionCall {
                call_id,
                name,
                arguments,
            } => Item::FunctionCall {
                call_id,
                name,
                arguments,
            },
            ReplayItem::FunctionOutput { call_id, output } => {
                return self.function_output(call_id, output);
            }
        };
        to_json(&ClientEvent::ConversationItemCreate { item })
    }
}

impl RealtimeProtocol for OpenAiRealtime {
    fn provider(&self) -> Provider {
        Provider::OpenAi
    }

    fn audio(&self) -> ModelAudio {
        ModelAudio::for_mode(self.settings.audio_mode)
    }

    fn server_interrupts_response(&self) -> bool {
        self.settings.vad.interrupt_response
    }

    fn on_open(&mut self, out: &mut Vec<String>) {
        out.push(self.session_update());
    }

    fn on_message<'a>(
        &mut self,
        text: &'a str,
        out: &mut Vec<String>,
    ) -> Result<UpstreamEvents<'a>, UpstreamError> {
        self.parse_events(text, out)
    }

    fn write_audio_append(&self, audio_b64: &str, buf: &mut String) {
        OpenAiRealtime::write_audio_append(self, audio_b64, buf);
    }

    fn truncate(&self, item_id: &str, audio_end_ms: u32) -> Option<String> {
        Some(OpenAiRealtime::truncate(self, item_id, audio_end_ms))
    }

    fn delete_item(&self, item_id: &str) -> Option<String> {
        Some(OpenAiRealtime::delete_item(self, item_id))
    }

    fn cancel_response(&self) -> Option<String> {
        Some(OpenAiRealtime::cancel_response(self))
    }

    fn user_text(&self, text: &str) -> String {
        OpenAiRealtime::user_text(self, text)
    }

    fn create_response(&self) -> String {
        OpenAiRealtime::create_response(self)
    }

    fn function_output(&self, call_id: &str, output: &str) -> String {
        OpenAiRealtime::function_output(self, call_id, output)
    }

    fn replay_item(&self, item: &ReplayItem<'_>) -> String {
        OpenAiRealtime::replay_item(self, item)
    }
}

/// Serializing these borrowed structs cannot fail (string keys, finite floats from settings
/// aside); a non-finite threshold degrades to `null` rather than panicking.
fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

// ---- client events (GA) ----

#[derive(Serialize)]
#[serde(tag = "type")]
enum ClientEvent<'a> {
    #[serde(rename = "session.update")]
    SessionUpdate { session: SessionConfig<'a> },
    #[serde(rename = "conversation.item.truncate")]
    ConversationItemTruncate {
        item_id: &'a str,
        content_index: u32,
        audio_end_ms: u32,
    },
    #[serde(rename = "conversation.item.delete")]
    ConversationItemDelete { item_id: &'a str },
    #[serde(rename = "conversation.item.create")]
    ConversationItemCreate { item: Item<'a> },
    #[serde(rename = "response.create")]
    ResponseCreate {
        #[serde(skip_serializing_if = "Option::is_none")]
        response: Option<ResponseParams<'a>>,
    },
    #[serde(rename = "response.cancel")]
    ResponseCancel {},
}

#[derive(Serialize)]
struct SessionConfig<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    output_modalities: [&'static str; 1],
    instructions: &'a str,
    /// Only sent when the tenant has tools, so a tool-less session.update stays minimal.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    tools: &'a [serde_json::Value],
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<&'static str>,
    audio: AudioConfig<'a>,
}

#[derive(Serialize)]
struct AudioConfig<'a> {
    input: AudioInput<'a>,
    output: AudioOutput<'a>,
}

#[derive(Serialize)]
struct AudioInput<'a> {
    format: AudioFormat,
    turn_detection: TurnDetection,
    #[serde(skip_serializing_if = "Option::is_none")]
    transcription: Option<Transcription<'a>>,
}

#[derive(Serialize)]
struct AudioOutput<'a> {
    format: AudioFormat,
    voice: &'a str,
}

#[derive(Clone, Copy, Serialize)]
struct AudioFormat {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    rate: Option<u32>,
}

impl AudioFormat {
    fn for_mode(mode: AudioMode) -> Self {
        match mode {
            AudioMode::Pcmu => Self {
                kind: "audio/pcmu",
                rate: None,
            },
            AudioMode::Pcm16 => Self {
                kind: "audio/pcm",
                rate: Some(24_000),
            },
        }
    }
}

#[derive(Serialize)]
struct TurnDetection {
    #[serde(rename = "type")]
    kind: &'static str,
    threshold: f32,
    prefix_padding_ms: u32,
    silence_duration_ms: u32,
    create_response: bool,
    interrupt_response: bool,
}

#[derive(Serialize)]
struct Transcription<'a> {
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    language: Option<&'a str>,
}

#[derive(Serialize)]
struct ResponseParams<'a> {
    instructions: &'a str,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Item<'a> {
    Message {
        role: &'static str,
        content: [InputText<'a>; 1],
    },
    FunctionCallOutput {
        call_id: &'a str,
        output: &'a str,
    },
    /// A replayed call: `arguments` is the JSON text the model produced.
    FunctionCall {
        call_id: &'a str,
        name: &'a str,
        arguments: &'a str,
    },
}

#[derive(Serialize)]
struct InputText<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

// ---- server events (GA), parsed borrowed ----

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
}

#[derive(Deserialize)]
struct AudioDelta<'a> {
    #[serde(borrow)]
    response_id: Cow<'a, str>,
    #[serde(borrow)]
    item_id: Cow<'a, str>,
    #[serde(borrow)]
    delta: Cow<'a, str>,
}

#[derive(Deserialize)]
struct SpeechStarted<'a> {
    #[serde(borrow)]
    item_id: Cow<'a, str>,
    audio_start_ms: u64,
}

#[derive(Deserialize)]
struct SpeechStopped {
    audio_end_ms: u64,
}

#[derive(Deserialize)]
struct ResponseEvent<'a> {
    #[serde(borrow)]
    response: ResponseObject<'a>,
}

#[derive(Deserialize)]
struct ResponseObject<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    /// Only informative (the bridge acts on `id`), so a response without one still counts.
    #[serde(borrow, default)]
    status: Cow<'a, str>,
    /// Present (non-null) on a finished `response.done`; null on `response.created` and on
    /// some cancelled responses.
    #[serde(default, deserialize_with = "lenient_usage")]
    usage: Option<ResponseUsage>,
}

/// `response.usage`: the totals the call report needs (the service also sends
/// `total_tokens` and per-modality details, which are ignored).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
struct ResponseUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
}

/// Usage is bookkeeping for the report: a usage object of an unexpected shape is dropped
/// rather than failing the whole `response.done`, whose id and status the engine acts on.
fn lenient_usage<'de, D>(deserializer: D) -> Result<Option<ResponseUsage>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let value = Option::<serde_json::Value>::deserialize(deserializer)?;
    Ok(value.and_then(|value| ResponseUsage::deserialize(value).ok()))
}

#[derive(Deserialize)]
struct Transcript<'a> {
    #[serde(borrow)]
    item_id: Cow<'a, str>,
    #[serde(borrow)]
    transcript: Cow<'a, str>,
}

#[derive(Deserialize)]
struct TranscriptDelta<'a> {
    #[serde(borrow)]
    item_id: Cow<'a, str>,
    #[serde(borrow)]
    delta: Cow<'a, str>,
}

#[derive(Deserialize)]
struct FunctionCallDone<'a> {
    #[serde(borrow)]
    call_id: Cow<'a, str>,
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow)]
    arguments: Cow<'a, str>,
}

#[derive(Deserialize)]
struct ErrorEvent<'a> {
    #[serde(borrow)]
    error: ErrorBody<'a>,
}

#[derive(Deserialize)]
struct ErrorBody<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    message: Cow<'a, str>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const CLIENT_FIXTURE: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/openai-realtime-ga/client-events.jsonl"
    ));
    const SERVER_FIXTURE: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/openai-realtime-ga/server-events.jsonl"
    ));

    fn fixture_line(fixture: &str, index: usize) -> Value {
        let line = fixture.lines().nth(index).expect("fixture line");
        serde_json::from_str(line).expect("fixture JSON")
    }

    fn receptionist() -> SessionSettings {
        SessionSettings {
            instructions: "You are a helpful receptionist.".to_owned(),
            model: Some("gpt-realtime".to_owned()),
            ..SessionSettings::default()
        }
    }

    fn parse(text: &str) -> Value {
        serde_json::from_str(text).expect("our output is JSON")
    }

    #[test]
    fn every_server_fixture_line_parses_to_its_event() {
        let mut protocol = OpenAiRealtime::new(SessionSettings::default());
        let mut out = Vec::new();
        let events: Vec<UpstreamEvent<'_>> = SERVER_FIXTURE
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                protocol
                    .parse_event(line, &mut out)
                    .expect("fixture parses")
            })
            .collect();
        assert_eq!(
            events,
            vec![
                UpstreamEvent::Other, // session.created
                UpstreamEvent::SpeechStarted {
                    item_id: "msg_003".into(),
                    // 1000 in the fixture, after the default 300 ms of prefix padding.
                    audio_start_ms: Some(1300)
                },
                UpstreamEvent::SpeechStopped {
                    audio_end_ms: Some(2000)
                },
                UpstreamEvent::Other, // committed
                UpstreamEvent::AudioDelta {
                    response_id: "resp_001".into(),
                    item_id: "msg_008".into(),
                    audio_b64: "Base64EncodedAudioDelta".into()
                },
                UpstreamEvent::Other, // truncated
                UpstreamEvent::Error {
                    error_type: "invalid_request_error".into(),
                    code: Some("invalid_event".into()),
                    message: "The 'type' field is missing.".into()
                },
                UpstreamEvent::Other, // rate_limits.updated
                UpstreamEvent::Error {
                    error_type: "invalid_request_error".into(),
                    code: Some("beta_api_shape_disabled".into()),
                    message: "The Realtime Beta API is no longer supported. Please use /v1/realtime for the GA API.".into()
                },
            ]
        );
        assert!(out.is_empty(), "no follow-ups without session.updated");
    }

    #[test]
    fn audio_delta_borrows_from_the_message() {
        let mut protocol = OpenAiRealtime::new(SessionSettings::default());
        let line = SERVER_FIXTURE
            .lines()
            .find(|line| line.contains("response.output_audio.delta"))
            .expect("delta line");
        let event = protocol.parse_event(line, &mut Vec::new()).expect("parses");
        match event {
            UpstreamEvent::AudioDelta { audio_b64, .. } => {
                assert!(matches!(audio_b64, Cow::Borrowed(_)))
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn ids_past_the_bound_are_refused_not_kept() {
        let mut protocol = OpenAiRealtime::new(SessionSettings::default());
        let long = "i".repeat(MAX_ID_BYTES + 1);
        let fits = "i".repeat(MAX_ID_BYTES);
        let events = |id: &str| {
            [
                json!({"type": "response.output_audio.delta", "response_id": "r", "item_id": id, "delta": "AA=="}),
                json!({"type": "response.output_audio.delta", "response_id": id, "item_id": "i", "delta": "AA=="}),
                json!({"type": "response.created", "response": {"id": id}}),
                json!({"type": "response.done", "response": {"id": id, "status": "completed"}}),
                json!({"type": "input_audio_buffer.speech_started", "item_id": id, "audio_start_ms": 18_446_744_073_709_551_615_u64}),
                json!({"type": "response.function_call_arguments.done", "call_id": id, "name": "f", "arguments": "{}"}),
                json!({"type": "response.function_call_arguments.done", "call_id": "c", "name": id, "arguments": "{}"}),
            ]
        };
        for event in events(&long) {
            let error = protocol
                .parse_event(&event.to_string(), &mut Vec::new())
                .expect_err("refused");
            assert!(
                matches!(error, UpstreamError::IdTooLong(n) if n == MAX_ID_BYTES + 1),
                "{event}"
            );
        }
        for event in events(&fits) {
            protocol
                .parse_event(&event.to_string(), &mut Vec::new())
                .unwrap_or_else(|e| panic!("{event}: {e}"));
        }
    }

    #[test]
    fn ga_events_missing_from_the_fixture_parse() {
        let mut protocol = OpenAiRealtime::new(SessionSettings::default());
        let mut out = Vec::new();
        let cases = [
            (
                r#"{"type":"response.created","event_id":"e1","response":{"object":"realtime.response","id":"resp_1","status":"in_progress","output":[]}}"#,
                UpstreamEvent::ResponseCreated {
                    response_id: "resp_1".into(),
                },
            ),
            (
                r#"{"type":"response.done","event_id":"e2","response":{"id":"resp_1","status":"cancelled","status_details":{"type":"cancelled","reason":"turn_detected"},"usage":null}}"#,
                UpstreamEvent::ResponseDone {
                    response_id: "resp_1".into(),
                    status: "cancelled".into(),
                },
            ),
            (
                r#"{"type":"conversation.item.input_audio_transcription.completed","event_id":"e3","item_id":"item_u","content_index":0,"transcript":"I need a \"plumber\"."}"#,
                UpstreamEvent::InputTranscript {
                    item_id: "item_u".into(),
                    text: "I need a \"plumber\".".into(),
                },
            ),
            (
                r#"{"type":"response.output_audio_transcript.done","event_id":"e4","response_id":"resp_1","item_id":"item_a","output_index":0,"content_index":0,"transcript":"Hello!"}"#,
                UpstreamEvent::OutputTranscript {
                    item_id: "item_a".into(),
                    text: "Hello!".into(),
                },
            ),
            (
                r#"{"type":"response.function_call_arguments.done","event_id":"e5","response_id":"resp_1","item_id":"item_f","output_index":0,"call_id":"call_1","name":"lookup","arguments":"{\"id\":7}"}"#,
                UpstreamEvent::FunctionCall {
                    call_id: "call_1".into(),
                    name: "lookup".into(),
                    arguments: "{\"id\":7}".into(),
                },
            ),
            (
                r#"{"type":"error","event_id":"e6","error":{"type":"server_error","code":null,"message":"boom","param":null}}"#,
                UpstreamEvent::Error {
                    error_type: "server_error".into(),
                    code: None,
                    message: "boom".into(),
                },
            ),
            (
                r#"{"type":"response.output_audio_transcript.delta","event_id":"e7","response_id":"resp_1","item_id":"item_a","output_index":0,"content_index":0,"delta":"Hel"}"#,
                UpstreamEvent::OutputTranscriptDelta {
                    item_id: "item_a".into(),
                    delta: "Hel".into(),
                },
            ),
            (
                r#"{"type":"some.future.event","x":[1,2]}"#,
                UpstreamEvent::Other,
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(protocol.parse_event(text, &mut out).expect(text), expected);
        }
        assert!(out.is_empty());
    }

    #[test]
    fn response_done_with_usage_also_yields_the_usage() {
        let mut protocol = OpenAiRealtime::new(SessionSettings::default());
        let mut out = Vec::new();
        // A GA `response.done` as the service sends it (the fixtures hold none).
        let done = r#"{"type":"response.done","event_id":"event_9","response":{"object":"realtime.response","id":"resp_7","status":"completed","status_details":null,"output":[{"id":"item_a","type":"message","status":"completed","role":"assistant","content":[{"type":"output_audio","transcript":"Hi."}]}],"conversation_id":"conv_1","output_modalities":["audio"],"max_output_tokens":"inf","audio":{"output":{"format":{"type":"audio/pcmu"},"voice":"marin"}},"usage":{"total_tokens":412,"input_tokens":301,"output_tokens":111,"input_token_details":{"text_tokens":280,"audio_tokens":21,"image_tokens":0,"cached_tokens":192,"cached_tokens_details":{"text_tokens":192,"audio_tokens":0,"image_tokens":0}},"output_token_details":{"text_tokens":30,"audio_tokens":81}},"metadata":null}}"#;
        let events = protocol.on_message(done, &mut out).expect("parses");
        assert_eq!(
            events.as_slice(),
            [
                UpstreamEvent::ResponseDone {
                    response_id: "resp_7".into(),
                    status: "completed".into(),
                },
                UpstreamEvent::Usage {
                    input_tokens: 301,
                    output_tokens: 111,
                },
            ]
        );
        // parse_event keeps returning the main event alone.
        assert_eq!(
            protocol.parse_event(done, &mut out).expect("parses"),
            events[0]
        );
        assert!(out.is_empty());
    }

    #[test]
    fn response_done_without_usable_usage_yields_only_the_done() {
        let mut protocol = OpenAiRealtime::new(SessionSettings::default());
        let mut out = Vec::new();
        for done in [
            r#"{"type":"response.done","response":{"id":"r1","status":"cancelled","usage":null}}"#,
            r#"{"type":"response.done","response":{"id":"r1","status":"cancelled"}}"#,
            r#"{"type":"response.done","response":{"id":"r1","status":"cancelled","usage":"n/a"}}"#,
            r#"{"type":"response.done","response":{"id":"r1","status":"cancelled","usage":{"input_tokens":-1}}}"#,
        ] {
            let events = protocol.on_message(done, &mut out).expect(done);
            assert_eq!(
                events.as_slice(),
                [UpstreamEvent::ResponseDone {
                    response_id: "r1".into(),
                    status: "cancelled".into(),
                }],
                "{done}"
            );
        }
        // Missing counts are zero, not a refusal: the report still learns a response ran.
        let events = protocol
            .on_message(
                r#"{"type":"response.done","response":{"id":"r2","usage":{"output_tokens":5}}}"#,
                &mut out,
            )
            .expect("parses");
        assert_eq!(
            events.get(1),
            Some(&UpstreamEvent::Usage {
                input_tokens: 0,
                output_tokens: 5
            })
        );
        // Other events never carry usage, even when they mention it.
        let created = r#"{"type":"response.created","response":{"id":"r3","usage":{"input_tokens":9,"output_tokens":9}}}"#;
        assert_eq!(
            protocol
                .on_message(created, &mut out)
                .expect("parses")
                .len(),
            1
        );
    }

    #[test]
    fn session_update_matches_the_fixture_for_pcmu() {
        let protocol = OpenAiRealtime::new(receptionist());
        let ours = parse(&protocol.session_update());
        let fixture = fixture_line(CLIENT_FIXTURE, 0);
        assert_eq!(ours, fixture);
        assert!(ours.get("OpenAI-Beta").is_none());
        assert!(ours["session"].get("input_audio_format").is_none());
    }

    #[test]
    fn session_update_matches_the_fixture_for_pcm16() {
        let protocol = OpenAiRealtime::new(SessionSettings {
            audio_mode: AudioMode::Pcm16,
            ..receptionist()
        });
        let ours = parse(&protocol.session_update());
        let fixture = fixture_line(CLIENT_FIXTURE, 1);
        assert_eq!(ours["type"], "session.update");
        assert_eq!(ours["session"]["type"], fixture["session"]["type"]);
        for direction in ["input", "output"] {
            assert_eq!(
                ours["session"]["audio"][direction]["format"],
                fixture["session"]["audio"][direction]["format"],
                "{direction} format"
            );
        }
    }

    #[test]
    fn session_update_carries_custom_settings_and_omits_what_is_off() {
        let mut settings = receptionist();
        settings.voice = "cedar".to_owned();
        settings.transcription_model = None;
        settings.model = None;
        settings.vad.threshold = 0.7;
        settings.vad.silence_duration_ms = 650;
        settings.vad.interrupt_response = false;
        settings.instructions = "Say \"hi\"\nthen\\stop".to_owned();
        let ours = parse(&OpenAiRealtime::new(settings).session_update());
        let session = &ours["session"];
        assert_eq!(session["instructions"], "Say \"hi\"\nthen\\stop");
        assert_eq!(session["audio"]["output"]["voice"], "cedar");
        assert!(session.get("model").is_none());
        assert!(session["audio"]["input"].get("transcription").is_none());
        let vad = &session["audio"]["input"]["turn_detection"];
        assert_eq!(vad["threshold"].as_f64(), Some(0.7));
        assert_eq!(vad["silence_duration_ms"], 650);
        assert_eq!(vad["interrupt_response"], false);
        assert!(session.get("tools").is_none() && session.get("tool_choice").is_none());
    }

    #[test]
    fn session_update_carries_tools_and_the_transcription_language() {
        let tool = serde_json::json!({
            "type": "function",
            "name": "take_message",
            "description": "Leave a message",
            "parameters": {"type": "object", "properties": {"message": {"type": "string"}}}
        });
        let mut settings = receptionist();
        settings.tools = vec![tool.clone()];
        settings.language = Some("de".to_owned());
        let ours = parse(&OpenAiRealtime::new(settings).session_update());
        let session = &ours["session"];
        assert_eq!(session["tools"], serde_json::json!([tool]));
        assert_eq!(session["tool_choice"], "auto");
        assert_eq!(session["audio"]["input"]["transcription"]["language"], "de");
    }

    #[test]
    fn on_open_sends_only_the_session_update() {
        let mut protocol = OpenAiRealtime::new(SessionSettings {
            greeting: Some("Hello".to_owned()),
            ..receptionist()
        });
        let mut out = Vec::new();
        protocol.on_open(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(parse(&out[0])["type"], "session.update");
    }

    #[test]
    fn greeting_is_sent_once_and_only_after_session_updated() {
        let mut protocol = OpenAiRealtime::new(SessionSettings {
            greeting: Some("Thanks for calling \"Acme\"!".to_owned()),
            ..receptionist()
        });
        let mut out = Vec::new();
        let created = SERVER_FIXTURE.lines().next().expect("session.created");
        protocol.parse_event(created, &mut out).expect("parses");
        assert!(
            out.is_empty(),
            "session.created must not trigger the greeting"
        );

        let updated = r#"{"type":"session.updated","event_id":"e","session":{"type":"realtime"}}"#;
        assert_eq!(
            protocol.parse_event(updated, &mut out).expect("parses"),
            UpstreamEvent::SessionReady
        );
        assert_eq!(out.len(), 1);
        let greeting = parse(&out[0]);
        assert_eq!(greeting["type"], "response.create");
        let instructions = greeting["response"]["instructions"]
            .as_str()
            .expect("instructions");
        assert!(instructions.contains("Thanks for calling \"Acme\"!"));
        assert!(instructions.starts_with("You are a helpful receptionist."));

        protocol.parse_event(updated, &mut out).expect("parses");
        assert_eq!(
            out.len(),
            1,
            "a second session.updated must not greet again"
        );
    }

    #[test]
    fn no_greeting_configured_means_no_response_create() {
        let mut protocol = OpenAiRealtime::new(receptionist());
        let mut out = Vec::new();
        protocol
            .parse_event(r#"{"type":"session.updated","session":{}}"#, &mut out)
            .expect("parses");
        assert!(out.is_empty());
    }

    #[test]
    fn audio_append_is_exact_and_reuses_the_buffer() {
        let protocol = OpenAiRealtime::new(SessionSettings::default());
        let mut buf = String::from("stale content that must go");
        protocol.write_audio_append("//8A/w==", &mut buf);
        assert_eq!(
            buf,
            r#"{"type":"input_audio_buffer.append","audio":"//8A/w=="}"#
        );
        let capacity = buf.capacity();
        protocol.write_audio_append("AAAA", &mut buf);
        assert_eq!(
            buf,
            r#"{"type":"input_audio_buffer.append","audio":"AAAA"}"#
        );
        assert_eq!(buf.capacity(), capacity);
        // Even a hostile "base64" stays a single valid JSON message.
        protocol.write_audio_append("a\"b", &mut buf);
        assert_eq!(parse(&buf)["audio"], "a\"b");
    }

    #[test]
    fn control_messages_have_the_ga_shape() {
        let protocol = OpenAiRealtime::new(SessionSettings::default());
        assert_eq!(
            parse(&protocol.truncate("item_\"x\"", 410)),
            json!({"type":"conversation.item.truncate","item_id":"item_\"x\"","content_index":0,"audio_end_ms":410})
        );
        assert_eq!(
            parse(&protocol.delete_item("item_002")),
            json!({"type":"conversation.item.delete","item_id":"item_002"})
        );
        assert_eq!(
            parse(&protocol.cancel_response()),
            json!({"type":"response.cancel"})
        );
        assert_eq!(
            parse(&protocol.create_response()),
            json!({"type":"response.create"})
        );
        let mut user = fixture_line(CLIENT_FIXTURE, 3);
        user["item"]["content"][0]["text"] = json!("DTMF: 5");
        assert_eq!(parse(&protocol.user_text("DTMF: 5")), user);
        assert_eq!(
            parse(&protocol.function_output("call_123", "{\"open\": true}")),
            fixture_line(CLIENT_FIXTURE, 7)
        );
    }

    #[test]
    fn replayed_items_have_the_ga_shape() {
        use crate::session::conversation::ReplayItem;
        let protocol = OpenAiRealtime::new(SessionSettings::default());
        assert_eq!(
            parse(&protocol.replay_item(&ReplayItem::AssistantText("We open at \"nine\"".into()))),
            json!({"type":"conversation.item.create","item":{"type":"message","role":"assistant","content":[{"type":"output_text","text":"We open at \"nine\""}]}})
        );
        assert_eq!(
            parse(&protocol.replay_item(&ReplayItem::UserText("Hi"))),
            parse(&protocol.user_text("Hi"))
        );
        assert_eq!(
            parse(&protocol.replay_item(&ReplayItem::FunctionCall {
                call_id: "call_1",
                name: "lookup",
                arguments: "{\"id\":7}"
            })),
            json!({"type":"conversation.item.create","item":{"type":"function_call","call_id":"call_1","name":"lookup","arguments":"{\"id\":7}"}})
        );
        assert_eq!(
            parse(&protocol.replay_item(&ReplayItem::FunctionOutput {
                call_id: "call_123",
                output: "{\"open\": true}"
            })),
            fixture_line(CLIENT_FIXTURE, 7)
        );
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        let mut protocol = OpenAiRealtime::new(SessionSettings::default());
        let mut out = Vec::new();
        for garbage in [
            "",
            "not json",
            "{",
            "[]",
            "null",
            "42",
            r#"{"no_type":1}"#,
            r#"{"type":7}"#,
            r#"{"type":"response.output_audio.delta"}"#,
            r#"{"type":"response.output_audio.delta","response_id":1,"item_id":"a","delta":"b"}"#,
            r#"{"type":"input_audio_buffer.speech_started","item_id":"a","audio_start_ms":-5}"#,
            r#"{"type":"response.done","response":null}"#,
            r#"{"type":"error","error":"nope"}"#,
            "{\"type\":\"error\",\"error\":{\"type\":\"x\",\"message\":\"\u{0}",
        ] {
            assert!(
                protocol.parse_event(garbage, &mut out).is_err(),
                "{garbage:?} should be rejected"
            );
        }
        assert!(out.is_empty());
    }
}
