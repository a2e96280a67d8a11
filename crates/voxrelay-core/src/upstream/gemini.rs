//! Google Gemini Live (`BidiGenerateContent`, v1beta) as a sans-IO [`RealtimeProtocol`].
//!
//! Owns the client messages voxrelay sends (`setup`, `realtimeInput` audio, `clientContent`
//! turns, `toolResponse`) and the borrowed parsing of the server messages into the engine's
//! provider-neutral events. Gemini's shape differs from OpenAI's in ways this module absorbs:
//! - **No ids.** Responses and items are not named, so each model turn is named here
//!   (`gemini-G-turn-N`, one item per turn) and each caller turn too (`gemini-G-caller-N`),
//!   `G` the session's place in the call, so names stay unique across a call's sessions.
//! - **One message, several events.** A `serverContent` can carry audio, transcripts, the
//!   interruption and the turn's end at once; they are returned in that order.
//! - **No voice-activity events.** The server detects speech itself and says only
//!   `interrupted` when the caller talks over a turn it is still generating. A turn it has
//!   finished generating may still be playing to the caller (the model runs faster than real
//!   time), and only the bridge knows that: so the first input transcription of a caller turn
//!   is reported as the caller starting to speak, which barges in on whatever still plays;
//!   during generation the server's `interrupted` decides.
//! - **No truncate, delete or cancel.** The engine keeps what the caller heard itself; Gemini's
//!   context after an interruption holds what it generated up to the interruption.
//! - **Resumption.** `sessionResumptionUpdate` handles are kept while the server says the
//!   session is resumable; a successor opened with one is not told the conversation again.
//!
//! Invariants: malformed input is an [`UpstreamError`], never a panic; ids and function names
//! over [`MAX_ID_BYTES`] are refused; everything kept between messages is bounded (transcripts
//! of the turn in progress, pending tool names, the handle).

use std::borrow::Cow;
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use smallvec::SmallVec;

use super::openai::MAX_ID_BYTES;
use super::{
    ModelAudio, ModelAudioFormat, RealtimeProtocol, SessionSettings, UpstreamError, UpstreamEvent,
    UpstreamEvents, check_ids, push_json_str,
};
use crate::Provider;
use crate::session::conversation::ReplayItem;

/// Caller audio Gemini takes: 16-bit PCM, 16 kHz, mono.
pub const INPUT_RATE: u32 = 16_000;
/// Model audio Gemini sends: 16-bit PCM, 24 kHz, mono.
pub const OUTPUT_RATE: u32 = 24_000;

/// The MIME type of every caller append.
const INPUT_MIME: &str = "audio/pcm;rate=16000";

/// Transcript text kept for the turn in progress (each side); the start is kept.
pub const MAX_TURN_TEXT_BYTES: usize = 4 * 1024;
/// Tool calls whose names are remembered for their answers (`toolResponse` names the function).
pub const PENDING_TOOL_NAMES: usize = 16;
/// The longest resumption handle kept; the service's are a few hundred bytes.
pub const MAX_HANDLE_BYTES: usize = 2 * 1024;

/// Gemini Live for one call.
#[derive(Debug)]
pub struct GeminiLive {
    settings: SessionSettings,
    greeting_sent: bool,
    /// Model turns started; the current one is open while `turn_open`.
    turns: u64,
    turn_open: bool,
    /// Caller turns started; the current one is open (speech seen, not yet answered) while
    /// `caller_open`.
    caller_turns: u64,
    caller_open: bool,
    input_text: String,
    output_text: String,
    /// `(call id, function name)` of recent tool calls, oldest first.
    tool_names: VecDeque<(String, String)>,
    /// The latest handle the server said the session can be resumed from.
    resumption: Option<String>,
}

impl GeminiLive {
    pub fn new(settings: SessionSettings) -> Self {
        Self {
            settings,
            greeting_sent: false,
            turns: 0,
            turn_open: false,
            caller_turns: 0,
            caller_open: false,
            input_text: String::new(),
            output_text: String::new(),
            tool_names: VecDeque::new(),
            resumption: None,
        }
    }

    pub fn settings(&self) -> &SessionSettings {
        &self.settings
    }

    /// The model's resource name, `models/<id>`.
    fn model_name(&self) -> String {
        let id = self
            .settings
            .model
            .as_deref()
            .filter(|model| !model.trim().is_empty())
            .unwrap_or(Provider::Gemini.default_model());
        if id.starts_with("models/") {
            id.to_owned()
        } else {
            format!("models/{id}")
        }
    }

    /// The `setup` message that configures the session.
    pub fn setup(&self) -> String {
        let settings = &self.settings;
        let declarations: Vec<FunctionDeclaration<'_>> = settings
            .tools
            .iter()
            .filter_map(FunctionDeclaration::from_openai)
            .collect();
        let tools = if declarations.is_empty() {
            Vec::new()
        } else {
            vec![Tool {
                function_declarations: declarations,
            }]
        };
        let model = self.model_name();
        let message = ClientMessage::Setup(Setup {
            model: &model,
            generation_config: GenerationConfig {
                response_modalities: ["AUDIO"],
                speech_config: SpeechConfig {
                    voice_config: VoiceConfig {
                        prebuilt_voice_config: PrebuiltVoice {
                            voice_name: &settings.voice,
                        },
                    },
                },
            },
            system_instruction: (!settings.instructions.is_empty()).then(|| Content {
                role: None,
                parts: [TextPart {
                    text: &settings.instructions,
                }],
            }),
            tools,
            realtime_input_config: RealtimeInputConfig {
                automatic_activity_detection: ActivityDetection {
                    disabled: false,
                    prefix_padding_ms: settings.vad.prefix_padding_ms,
                    silence_duration_ms: settings.vad.silence_duration_ms,
                },
                activity_handling: if settings.vad.interrupt_response {
                    "START_OF_ACTIVITY_INTERRUPTS"
                } else {
                    "NO_INTERRUPTION"
                },
            },
            input_audio_transcription: Empty {},
            output_audio_transcription: Empty {},
            session_resumption: SessionResumption {
                handle: settings.resumption_handle.as_deref(),
            },
            context_window_compression: ContextWindowCompression {
                sliding_window: Empty {},
            },
        });
        to_json(&message)
    }

    /// One `clientContent` turn.
    fn content(&self, role: &str, text: &str, turn_complete: bool) -> String {
        to_json(&ClientMessage::ClientContent(ClientContent {
            turns: Some([Content {
                role: Some(role),
                parts: [TextPart { text }],
            }]),
            turn_complete,
        }))
    }

    fn turn_id(&self) -> String {
        format!("gemini-{}-turn-{}", self.settings.generation, self.turns)
    }

    fn caller_id(&self) -> String {
        format!(
            "gemini-{}-caller-{}",
            self.settings.generation, self.caller_turns
        )
    }

    /// A caller turn starts (speech seen): reported as the caller starting to speak.
    fn open_caller_turn<'a>(&mut self, events: &mut UpstreamEvents<'a>) {
        if !self.caller_open {
            self.caller_open = true;
            self.caller_turns += 1;
            events.push(UpstreamEvent::SpeechStarted {
                item_id: Cow::Owned(self.caller_id()),
                audio_start_ms: None,
            });
        }
    }

    /// The caller's turn is over (the model answers, or the turn ends without an answer): its
    /// transcript, and the end of their speech.
    fn close_caller_turn<'a>(&mut self, events: &mut UpstreamEvents<'a>) {
        if std::mem::take(&mut self.caller_open) {
            let text = std::mem::take(&mut self.input_text);
            events.push(UpstreamEvent::SpeechStopped { audio_end_ms: None });
            if !text.trim().is_empty() {
                events.push(UpstreamEvent::InputTranscript {
                    item_id: Cow::Owned(self.caller_id()),
                    text: Cow::Owned(text),
                });
            }
        }
    }

    fn open_model_turn<'a>(&mut self, events: &mut UpstreamEvents<'a>) {
        if !self.turn_open {
            self.close_caller_turn(events);
            self.turn_open = true;
            self.turns += 1;
            self.output_text.clear();
            events.push(UpstreamEvent::ResponseCreated {
                response_id: Cow::Owned(self.turn_id()),
            });
        }
    }

    /// The model turn ends: its whole transcript, then its end with `status`.
    fn close_model_turn<'a>(&mut self, status: &'static str, events: &mut UpstreamEvents<'a>) {
        if std::mem::take(&mut self.turn_open) {
            let id = self.turn_id();
            let text = std::mem::take(&mut self.output_text);
            if !text.trim().is_empty() {
                events.push(UpstreamEvent::OutputTranscript {
                    item_id: Cow::Owned(id.clone()),
                    text: Cow::Owned(text),
                });
            }
            events.push(UpstreamEvent::ResponseDone {
                response_id: Cow::Owned(id),
                status: Cow::Borrowed(status),
            });
        }
    }

    fn on_server_content<'a>(
        &mut self,
        content: ServerContent<'a>,
        events: &mut UpstreamEvents<'a>,
    ) -> Result<(), UpstreamError> {
        if content.interrupted {
            // The caller talked over a turn still being generated: barge-in, and the turn ends.
            if self.turn_open {
                self.open_caller_turn(events);
                self.close_model_turn("cancelled", events);
            }
        }
        if let Some(transcription) = content.input_transcription
            && !transcription.text.is_empty()
        {
            // Over a turn still generating, the server decides whether it is an interruption
            // (`interrupted`); the text joins the caller's next turn either way.
            if !self.turn_open {
                self.open_caller_turn(events);
            }
            push_bounded(&mut self.input_text, &transcription.text);
        }
        if let Some(turn) = content.model_turn {
            for part in turn.parts {
                let Some(blob) = part.inline_data else {
                    // Text parts of an audio session are the model's thoughts: not spoken.
                    continue;
                };
                if !is_output_audio(&blob.mime_type) {
                    return Err(UpstreamError::UnexpectedAudioFormat);
                }
                self.open_model_turn(events);
                // Unnamed: the turn just opened (the engine knows it from `ResponseCreated`),
                // so a delta costs no allocation.
                events.push(UpstreamEvent::AudioDelta {
                    response_id: Cow::Borrowed(""),
                    item_id: Cow::Borrowed(""),
                    audio_b64: blob.data,
                });
            }
        }
        if let Some(transcription) = content.output_transcription
            && !transcription.text.is_empty()
        {
            self.open_model_turn(events);
            push_bounded(&mut self.output_text, &transcription.text);
            events.push(UpstreamEvent::OutputTranscriptDelta {
                item_id: Cow::Owned(self.turn_id()),
                delta: transcription.text,
            });
        }
        if content.turn_complete {
            if self.turn_open {
                self.close_model_turn("completed", events);
            } else {
                // A caller turn the model chose not to answer still has its transcript.
                self.close_caller_turn(events);
            }
        }
        Ok(())
    }
}

/// Appends `text` to `buffer` while it stays within [`MAX_TURN_TEXT_BYTES`] (the start is kept).
fn push_bounded(buffer: &mut String, text: &str) {
    let room = MAX_TURN_TEXT_BYTES.saturating_sub(buffer.len());
    let mut end = text.len().min(room);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    buffer.push_str(&text[..end]);
}

/// Model audio must be 24 kHz PCM: `audio/pcm;rate=24000` (or `audio/pcm`, whose default it is).
fn is_output_audio(mime_type: &str) -> bool {
    let mut parts = mime_type.split(';').map(str::trim);
    if !parts
        .next()
        .is_some_and(|kind| kind.eq_ignore_ascii_case("audio/pcm"))
    {
        return false;
    }
    parts.all(|param| match param.split_once('=') {
        Some((key, value)) if key.trim().eq_ignore_ascii_case("rate") => {
            value.trim().parse::<u32>() == Ok(OUTPUT_RATE)
        }
        _ => true,
    })
}

impl RealtimeProtocol for GeminiLive {
    fn provider(&self) -> Provider {
        Provider::Gemini
    }

    fn audio(&self) -> ModelAudio {
        ModelAudio {
            input: ModelAudioFormat::Pcm16 { rate: INPUT_RATE },
            output: ModelAudioFormat::Pcm16 { rate: OUTPUT_RATE },
        }
    }

    fn server_interrupts_response(&self) -> bool {
        // The server stops generating on the caller's speech itself (there is no cancel).
        true
    }

    fn answers_tool_output_itself(&self) -> bool {
        true
    }

    fn resumes_context(&self) -> bool {
        self.settings.resumption_handle.is_some()
    }

    fn resumption_handle(&self) -> Option<&str> {
        self.resumption.as_deref()
    }

    fn on_open(&mut self, out: &mut Vec<String>) {
        out.push(self.setup());
    }

    fn on_message<'a>(
        &mut self,
        text: &'a str,
        out: &mut Vec<String>,
    ) -> Result<UpstreamEvents<'a>, UpstreamError> {
        if !text.trim_start().starts_with('{') {
            // serde would take an array as a struct's fields in order.
            return Err(UpstreamError::NotAnObject);
        }
        let message: ServerMessage<'a> = serde_json::from_str(text)?;
        let mut events = UpstreamEvents::new();
        if message.setup_complete.is_some() {
            if !std::mem::replace(&mut self.greeting_sent, true)
                && let Some(greeting) = self.settings.greeting.as_deref()
            {
                let request = format!(
                    "The call has just connected. Greet the caller now by saying exactly this: \
                     {greeting}"
                );
                out.push(self.content("user", &request, true));
            }
            events.push(UpstreamEvent::SessionReady);
        }
        if let Some(content) = message.server_content {
            self.on_server_content(content, &mut events)?;
        }
        if let Some(call) = message.tool_call {
            for function in call.function_calls {
                let arguments = match function.args {
                    Some(args) => Cow::Borrowed(args.get()),
                    None => Cow::Borrowed("{}"),
                };
                if function.id.len() <= MAX_ID_BYTES && function.name.len() <= MAX_ID_BYTES {
                    if self.tool_names.len() == PENDING_TOOL_NAMES {
                        self.tool_names.pop_front();
                    }
                    self.tool_names
                        .push_back((function.id.to_string(), function.name.to_string()));
                }
                events.push(UpstreamEvent::FunctionCall {
                    call_id: function.id,
                    name: function.name,
                    arguments,
                });
            }
        }
        if let Some(cancellation) = message.tool_call_cancellation {
            for id in cancellation.ids {
                events.push(UpstreamEvent::FunctionCallCancelled { call_id: id });
            }
        }
        if message.go_away.is_some() {
            events.push(UpstreamEvent::SessionEnding);
        }
        if let Some(update) = message.session_resumption_update {
            self.resumption = match update.new_handle {
                Some(handle)
                    if update.resumable
                        && !handle.is_empty()
                        && handle.len() <= MAX_HANDLE_BYTES =>
                {
                    Some(handle.into_owned())
                }
                // Not resumable at this point (mid-generation, mid-tool): an older handle would
                // lose what happened since, so a successor is told the conversation instead.
                _ => None,
            };
        }
        if let Some(usage) = message.usage_metadata {
            events.push(UpstreamEvent::Usage {
                input_tokens: usage.prompt_token_count,
                output_tokens: usage.response_token_count,
            });
        }
        for event in &events {
            check_ids(event)?;
        }
        Ok(events)
    }

    fn write_audio_append(&self, audio_b64: &str, buf: &mut String) {
        buf.clear();
        buf.push_str(r#"{"realtimeInput":{"audio":{"data":"#);
        // Base64 never needs escaping; push_json_str only pays for a scan.
        push_json_str(buf, audio_b64);
        buf.push_str(r#","mimeType":""#);
        buf.push_str(INPUT_MIME);
        buf.push_str(r#""}}}"#);
    }

    fn truncate(&self, _item_id: &str, _audio_end_ms: u32) -> Option<String> {
        None
    }

    fn delete_item(&self, _item_id: &str) -> Option<String> {
        None
    }

    fn cancel_response(&self) -> Option<String> {
        None
    }

    /// Added to the context without ending the caller's turn: [`Self::create_response`] asks
    /// for the answer (a digit pressed while the model speaks is seen by its next turn).
    fn user_text(&self, text: &str) -> String {
        self.content("user", text, false)
    }

    fn create_response(&self) -> String {
        to_json(&ClientMessage::ClientContent(ClientContent {
            turns: None,
            turn_complete: true,
        }))
    }

    fn function_output(&self, call_id: &str, output: &str) -> String {
        let name = self
            .tool_names
            .iter()
            .rev()
            .find(|(id, _)| id == call_id)
            .map_or("", |(_, name)| name.as_str());
        // `response` must be an object: a tool's JSON object goes as is, anything else is
        // wrapped.
        let parsed: Option<serde_json::Map<String, serde_json::Value>> =
            serde_json::from_str(output).ok();
        let response = match parsed {
            Some(object) => serde_json::Value::Object(object),
            None => serde_json::json!({ "output": output }),
        };
        to_json(&ClientMessage::ToolResponse(ToolResponse {
            function_responses: [FunctionResponse {
                id: call_id,
                name,
                response,
            }],
        }))
    }

    fn replay_item(&self, item: &ReplayItem<'_>) -> String {
        match item {
            ReplayItem::UserText(text) => self.content("user", text, false),
            ReplayItem::AssistantText(text) => self.content("model", text, false),
            // Tool turns are replayed as text: a functionCall part must match a declaration
            // and an id the new session never issued.
            ReplayItem::FunctionCall {
                name, arguments, ..
            } => self.content(
                "model",
                &format!("(I called the tool {name} with the arguments {arguments}.)"),
                false,
            ),
            ReplayItem::FunctionOutput { output, .. } => {
                self.content("user", &format!("(The tool answered: {output})"), false)
            }
        }
    }
}

/// Serializing these borrowed structs cannot fail (string keys, no maps with non-string keys).
fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| String::from("{}"))
}

// ---- client messages ----

#[derive(Serialize)]
enum ClientMessage<'a> {
    #[serde(rename = "setup")]
    Setup(Setup<'a>),
    #[serde(rename = "clientContent")]
    ClientContent(ClientContent<'a>),
    #[serde(rename = "toolResponse")]
    ToolResponse(ToolResponse<'a>),
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Setup<'a> {
    model: &'a str,
    generation_config: GenerationConfig<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<Content<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Tool<'a>>,
    realtime_input_config: RealtimeInputConfig,
    input_audio_transcription: Empty,
    output_audio_transcription: Empty,
    session_resumption: SessionResumption<'a>,
    context_window_compression: ContextWindowCompression,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig<'a> {
    response_modalities: [&'static str; 1],
    speech_config: SpeechConfig<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SpeechConfig<'a> {
    voice_config: VoiceConfig<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VoiceConfig<'a> {
    prebuilt_voice_config: PrebuiltVoice<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PrebuiltVoice<'a> {
    voice_name: &'a str,
}

#[derive(Serialize)]
struct Content<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
    parts: [TextPart<'a>; 1],
}

#[derive(Serialize)]
struct TextPart<'a> {
    text: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Tool<'a> {
    function_declarations: Vec<FunctionDeclaration<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FunctionDeclaration<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    /// JSON Schema as the tenant wrote it for OpenAI (`parametersJsonSchema` takes it whole;
    /// `parameters` takes only an OpenAPI subset).
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters_json_schema: Option<&'a serde_json::Value>,
}

impl<'a> FunctionDeclaration<'a> {
    /// An OpenAI function definition (`{"type":"function","name","description","parameters"}`)
    /// as a Gemini declaration; anything else (another tool type, no name) is left out.
    fn from_openai(tool: &'a serde_json::Value) -> Option<Self> {
        let kind = tool.get("type").and_then(serde_json::Value::as_str);
        if kind.is_some_and(|kind| kind != "function") {
            return None;
        }
        let name = tool.get("name")?.as_str().filter(|name| !name.is_empty())?;
        Some(Self {
            name,
            description: tool.get("description").and_then(serde_json::Value::as_str),
            parameters_json_schema: tool.get("parameters"),
        })
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RealtimeInputConfig {
    automatic_activity_detection: ActivityDetection,
    activity_handling: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ActivityDetection {
    disabled: bool,
    prefix_padding_ms: u32,
    silence_duration_ms: u32,
}

#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
struct SessionResumption<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    handle: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ContextWindowCompression {
    sliding_window: Empty,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ClientContent<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    turns: Option<[Content<'a>; 1]>,
    turn_complete: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ToolResponse<'a> {
    function_responses: [FunctionResponse<'a>; 1],
}

#[derive(Serialize)]
struct FunctionResponse<'a> {
    id: &'a str,
    name: &'a str,
    response: serde_json::Value,
}

// ---- server messages (borrowed where the text allows) ----

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServerMessage<'a> {
    #[serde(default)]
    setup_complete: Option<serde::de::IgnoredAny>,
    #[serde(default, borrow)]
    server_content: Option<ServerContent<'a>>,
    #[serde(default, borrow)]
    tool_call: Option<ToolCallMessage<'a>>,
    #[serde(default, borrow)]
    tool_call_cancellation: Option<ToolCallCancellation<'a>>,
    #[serde(default)]
    go_away: Option<serde::de::IgnoredAny>,
    #[serde(default, borrow)]
    session_resumption_update: Option<ResumptionUpdate<'a>>,
    #[serde(default)]
    usage_metadata: Option<UsageMetadata>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServerContent<'a> {
    #[serde(default, borrow)]
    model_turn: Option<ModelTurn<'a>>,
    #[serde(default)]
    interrupted: bool,
    #[serde(default)]
    turn_complete: bool,
    #[serde(default, borrow)]
    input_transcription: Option<Transcription<'a>>,
    #[serde(default, borrow)]
    output_transcription: Option<Transcription<'a>>,
}

#[derive(Deserialize)]
struct ModelTurn<'a> {
    #[serde(default, borrow)]
    parts: SmallVec<[Part<'a>; 1]>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Part<'a> {
    #[serde(default, borrow)]
    inline_data: Option<Blob<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Blob<'a> {
    #[serde(borrow)]
    mime_type: Cow<'a, str>,
    #[serde(borrow)]
    data: Cow<'a, str>,
}

#[derive(Deserialize)]
struct Transcription<'a> {
    #[serde(default, borrow)]
    text: Cow<'a, str>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ToolCallMessage<'a> {
    #[serde(default, borrow)]
    function_calls: SmallVec<[FunctionCall<'a>; 1]>,
}

#[derive(Deserialize)]
struct FunctionCall<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(default, borrow)]
    args: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ToolCallCancellation<'a> {
    #[serde(default, borrow)]
    ids: SmallVec<[Cow<'a, str>; 1]>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResumptionUpdate<'a> {
    #[serde(default, borrow)]
    new_handle: Option<Cow<'a, str>>,
    #[serde(default)]
    resumable: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    response_token_count: u64,
}

#[cfg(test)]
mod tests;
