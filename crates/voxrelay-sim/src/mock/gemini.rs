//! The mock Gemini Live "model" of one session, sans-IO: client text in, server frames (and a
//! close) out.
//!
//! Owns the Gemini side of the mock's protocol behaviour: the `setup` handshake and session
//! resumption against the server-wide [`GeminiResumptions`], the energy VAD over 16 kHz caller
//! audio with barge-in, echo and chime turns streamed as 24 kHz `modelTurn` audio with their
//! transcription, scripted tool calls (and their optional cancellation), and `goAway`. Keeps
//! [`MockSessionRecord`] up to date. Invariants: no socket and no clock here (time is the `now`
//! argument, measured from the session's start); errors are reported the way Gemini reports
//! them, by closing (1007 for a bad message, 1008 for a bad resumption handle), after which the
//! session says nothing more; a turn whose audio was all sent can no longer be interrupted.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};

use super::voice::{EnergyVad, VadEvent, chime, convert_rate, greeting_text, pcm16_samples};
use super::{MockConfig, MockSessionRecord, MockToolCall, lock};

/// Caller audio the mock accepts (the only input format of this mock).
pub const GEMINI_INPUT_MIME: &str = "audio/pcm;rate=16000";
/// Model audio the mock sends.
pub const GEMINI_OUTPUT_MIME: &str = "audio/pcm;rate=24000";
const INPUT_RATE: u32 = 16_000;
const OUTPUT_RATE: u32 = 24_000;
/// Caller speech the VAD must hear before the input transcription is sent.
const TRANSCRIBE_AFTER_MS: u32 = 200;
/// How long after a tool call its cancellation comes (`MockConfig::gemini_cancel_tools`).
const CANCEL_AFTER: Duration = Duration::from_millis(100);
/// Gemini counts audio at 32 tokens a second: one token per this many samples.
const INPUT_SAMPLES_PER_TOKEN: u64 = INPUT_RATE as u64 / 32;
const OUTPUT_SAMPLES_PER_TOKEN: u64 = OUTPUT_RATE as u64 / 32;

/// What the driver should do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GeminiTransmit {
    /// Send this text frame.
    Text(String),
    /// Close the socket with this code and reason; nothing follows.
    Close { code: u16, reason: String },
}

/// Why the mock closes a session: Gemini has no error event, it closes the socket.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("invalid JSON payload: {0}")]
    InvalidMessage(String),
    #[error("the first message must be setup")]
    NotSetUp,
    #[error("setup may be sent only once")]
    SecondSetup,
    #[error("setup.model is required, as models/<id>")]
    MissingModel,
    #[error("invalid session resumption handle")]
    UnknownHandle,
    #[error("unsupported audio mimeType {0:?}, expected audio/pcm;rate=16000")]
    MimeType(String),
    #[error("toolResponse for unknown function call id {0:?}")]
    UnknownCallId(String),
}

impl Refusal {
    /// The WebSocket close code Gemini uses for it.
    fn code(&self) -> u16 {
        match self {
            Refusal::UnknownHandle => 1008,
            _ => 1007,
        }
    }
}

/// What a resumption handle brings back: where the issuing session was in its script.
#[derive(Clone, Debug)]
struct ResumeState {
    /// The id of the session that issued the handle.
    issued_by: String,
    next_tool: usize,
    next_call: u64,
}

/// Every resumption handle a mock server issued, for its whole life (handles stay valid once
/// issued, so a bridge may resume from any of them).
#[derive(Debug, Default)]
pub struct GeminiResumptions {
    handles: Mutex<HashMap<String, ResumeState>>,
}

impl GeminiResumptions {
    /// The id of the session that issued `handle`, if this server issued it.
    pub fn issuer(&self, handle: &str) -> Option<String> {
        lock(&self.handles)
            .get(handle)
            .map(|state| state.issued_by.clone())
    }
}

/// A model turn waiting for the model's think time.
enum PendingKind {
    Speak { audio: Vec<i16>, transcript: String },
    Tool(MockToolCall),
}

struct PendingTurn {
    due: Duration,
    kind: PendingKind,
}

/// A model turn being generated.
struct ModelTurn {
    audio: Vec<i16>,
    sent: usize,
    transcript: String,
    /// Bytes of `transcript` streamed so far (kept in step with the audio).
    transcript_sent: usize,
    /// When it started, for `pace_deltas`.
    started_at: Duration,
}

/// One mock Gemini Live session's protocol logic, sans-IO: text in, frames out, time as input.
pub struct GeminiMockSession {
    /// The server's session number, used in resumption handles.
    number: u64,
    id: String,
    config: MockConfig,
    record: Arc<Mutex<MockSessionRecord>>,
    resumptions: Arc<GeminiResumptions>,
    set_up: bool,
    /// Function names the setup offered.
    offered_tools: Vec<String>,
    prefix_padding_ms: u64,
    outbox: VecDeque<GeminiTransmit>,
    closed: bool,
    vad: EnergyVad,
    utterance_start: usize,
    /// A PCM16 byte split across two chunks.
    carry: Option<u8>,
    input_samples: u64,
    pending: Option<PendingTurn>,
    active: Option<ModelTurn>,
    /// The next entry of `config.tool_script`.
    next_tool: usize,
    next_call: u64,
    /// Calls sent and neither answered nor cancelled.
    open_calls: HashSet<String>,
    cancelled_calls: HashSet<String>,
    cancel_due: Vec<(Duration, String)>,
    next_handle: u64,
    go_away_at: Option<Duration>,
    close_at: Option<Duration>,
}

impl GeminiMockSession {
    pub fn new(
        number: u64,
        id: String,
        config: MockConfig,
        record: Arc<Mutex<MockSessionRecord>>,
        resumptions: Arc<GeminiResumptions>,
    ) -> Self {
        {
            let mut record = lock(&record);
            record.provider = "gemini";
            record.input_rate = INPUT_RATE;
            record.output_rate = OUTPUT_RATE;
        }
        Self {
            number,
            id,
            vad: EnergyVad::new(
                config.vad_threshold_dbfs,
                config.silence_ms,
                TRANSCRIBE_AFTER_MS,
            ),
            config,
            record,
            resumptions,
            set_up: false,
            offered_tools: Vec::new(),
            prefix_padding_ms: 300,
            outbox: VecDeque::new(),
            closed: false,
            utterance_start: 0,
            carry: None,
            input_samples: 0,
            pending: None,
            active: None,
            next_tool: 0,
            next_call: 0,
            open_calls: HashSet::new(),
            cancelled_calls: HashSet::new(),
            cancel_due: Vec::new(),
            next_handle: 0,
            go_away_at: None,
            close_at: None,
        }
    }

    /// Nothing to say before the client's `setup`: Gemini speaks first only with
    /// `setupComplete`.
    pub fn open(&mut self) {}

    /// The next frame (or close) to send, if any is ready at `now`.
    pub fn poll_transmit(&mut self, now: Duration) -> Option<GeminiTransmit> {
        if let Some(frame) = self.outbox.pop_front() {
            return Some(frame);
        }
        if self.closed {
            return None;
        }
        self.fire_timers(now);
        if let Some(frame) = self.outbox.pop_front() {
            return Some(frame);
        }
        if self.active.is_none() && self.pending.as_ref().is_some_and(|p| p.due <= now) {
            if let Some(pending) = self.pending.take() {
                match pending.kind {
                    PendingKind::Tool(tool) => self.call_function(tool, now),
                    PendingKind::Speak { audio, transcript } => {
                        self.active = Some(ModelTurn {
                            audio,
                            sent: 0,
                            transcript,
                            transcript_sent: 0,
                            started_at: now,
                        });
                    }
                }
            }
            if let Some(frame) = self.outbox.pop_front() {
                return Some(frame);
            }
        }
        self.step_turn(now);
        self.outbox.pop_front()
    }

    /// When `poll_transmit` will next have something, if nothing is ready now.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if !self.outbox.is_empty() {
            return Some(Duration::ZERO);
        }
        if self.closed {
            return None;
        }
        let timers = self
            .cancel_due
            .iter()
            .map(|(due, _)| *due)
            .chain(self.go_away_at)
            .chain(self.close_at);
        // A pending turn waits for the active one, whose next delta comes first anyway.
        let turn = match self.next_delta_at() {
            Some(at) => Some(at),
            None => self.pending.as_ref().map(|pending| pending.due),
        };
        timers.chain(turn).min()
    }

    /// Handles one client text frame.
    pub fn handle_text(&mut self, text: &str, now: Duration) {
        if self.closed {
            return;
        }
        if let Err(refusal) = self.handle_message(text, now) {
            self.close(refusal.code(), refusal.to_string());
        }
    }

    fn handle_message(&mut self, text: &str, now: Duration) -> Result<(), Refusal> {
        let message = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(message)) => message,
            Ok(_) => return Err(Refusal::InvalidMessage("not a JSON object".to_owned())),
            Err(error) => return Err(Refusal::InvalidMessage(error.to_string())),
        };
        let mut entries = message.into_iter();
        let (Some((kind, body)), None) = (entries.next(), entries.next()) else {
            return Err(Refusal::InvalidMessage(
                "a message has exactly one top-level field".to_owned(),
            ));
        };
        lock(&self.record).client_event_types.push(kind.clone());
        if kind == "setup" {
            return self.setup(body, now);
        }
        if !self.set_up {
            return Err(Refusal::NotSetUp);
        }
        match kind.as_str() {
            "realtimeInput" => self.realtime_input(&body, now),
            "clientContent" => self.client_content(&body, now),
            "toolResponse" => self.tool_response(&body, now),
            other => Err(Refusal::InvalidMessage(format!(
                "unknown message field {other:?}"
            ))),
        }
    }

    fn setup(&mut self, body: Value, now: Duration) -> Result<(), Refusal> {
        if self.set_up {
            return Err(Refusal::SecondSetup);
        }
        let model_named = body
            .get("model")
            .and_then(Value::as_str)
            .and_then(|model| model.strip_prefix("models/"))
            .is_some_and(|id| !id.is_empty());
        if !model_named {
            return Err(Refusal::MissingModel);
        }
        if let Some(handle) = body
            .get("sessionResumption")
            .and_then(|resumption| resumption.get("handle"))
            .and_then(Value::as_str)
        {
            let state = lock(&self.resumptions.handles).get(handle).cloned();
            let Some(state) = state else {
                return Err(Refusal::UnknownHandle);
            };
            // The server kept the conversation: the script goes on where the handle left it.
            self.next_tool = state.next_tool;
            self.next_call = state.next_call;
            lock(&self.record).resumed_from = Some(handle.to_owned());
        }
        self.offered_tools = body
            .get("tools")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|tool| tool.get("functionDeclarations").and_then(Value::as_array))
            .flatten()
            .filter_map(|declaration| declaration.get("name").and_then(Value::as_str))
            .map(str::to_owned)
            .collect();
        if let Some(padding) =
            body["realtimeInputConfig"]["automaticActivityDetection"]["prefixPaddingMs"].as_u64()
        {
            self.prefix_padding_ms = padding;
        }
        lock(&self.record).session = body;
        self.set_up = true;
        self.emit(json!({"setupComplete": {}}));
        self.issue_handle();
        self.go_away_at = self.config.go_away_after.map(|after| now + after);
        Ok(())
    }

    fn realtime_input(&mut self, body: &Value, now: Duration) -> Result<(), Refusal> {
        // Other realtime inputs (text, activity signals, end of stream) carry no audio the mock
        // answers; they are recorded by their top-level key only.
        let Some(audio) = body.get("audio") else {
            return Ok(());
        };
        let mime = audio.get("mimeType").and_then(Value::as_str).unwrap_or("");
        if mime != GEMINI_INPUT_MIME {
            return Err(Refusal::MimeType(mime.to_owned()));
        }
        let bytes = audio
            .get("data")
            .and_then(Value::as_str)
            .map(|data| BASE64.decode(data))
            .and_then(Result::ok)
            .ok_or_else(|| {
                Refusal::InvalidMessage("realtimeInput.audio.data is not base64".to_owned())
            })?;
        let samples = pcm16_samples(&mut self.carry, &bytes);
        self.input_samples += samples.len() as u64;
        lock(&self.record)
            .input_audio_8k
            .extend_from_slice(&samples);
        for event in self.vad.feed(&samples, INPUT_RATE) {
            match event {
                VadEvent::Started { window_start } => {
                    let prefix = (self.prefix_padding_ms * u64::from(INPUT_RATE) / 1000) as usize;
                    self.utterance_start = window_start.saturating_sub(prefix);
                    self.pending = None;
                    self.barge_in();
                }
                VadEvent::Sustained => {
                    self.emit(json!({"serverContent": {"inputTranscription": {"text": "(caller audio)"}}}));
                }
                VadEvent::Stopped { speech_end } => self.end_utterance(speech_end, now),
            }
        }
        Ok(())
    }

    /// Caller speech while a turn is still being generated stops it; once all its audio was
    /// sent the turn is over as far as the model knows (it cannot tell what the caller hears).
    fn barge_in(&mut self) {
        let generating = self
            .active
            .as_ref()
            .is_some_and(|turn| turn.sent < turn.audio.len());
        if !generating {
            return;
        }
        if let Some(turn) = self.active.take() {
            let mut record = lock(&self.record);
            record.response_transcripts.push(turn.transcript);
            record.interruptions += 1;
        }
        self.emit(json!({"serverContent": {"interrupted": true}}));
    }

    fn end_utterance(&mut self, speech_end: usize, now: Duration) {
        let audio: Vec<i16> = lock(&self.record)
            .input_audio_8k
            .get(self.utterance_start..speech_end)
            .map(<[i16]>::to_vec)
            .unwrap_or_default();
        let seconds = audio.len() as f64 / f64::from(INPUT_RATE);
        let kind = match self.next_scripted_tool() {
            Some(tool) => PendingKind::Tool(tool),
            None => PendingKind::Speak {
                audio: convert_rate(&audio, INPUT_RATE, OUTPUT_RATE),
                transcript: format!("({seconds:.1} s of speech)"),
            },
        };
        self.pending = Some(PendingTurn {
            due: now + self.config.reply_delay,
            kind,
        });
    }

    /// The next scripted function call, if the setup offered that function.
    fn next_scripted_tool(&mut self) -> Option<MockToolCall> {
        let tool = self.config.tool_script.get(self.next_tool)?.clone();
        self.next_tool += 1;
        self.offered_tools.contains(&tool.name).then_some(tool)
    }

    fn client_content(&mut self, body: &Value, now: Duration) -> Result<(), Refusal> {
        let turns = match body.get("turns") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(turns)) => turns.clone(),
            Some(_) => {
                return Err(Refusal::InvalidMessage(
                    "clientContent.turns is not a list".to_owned(),
                ));
            }
        };
        let mut last_user_text = None;
        for turn in &turns {
            let role = turn.get("role").and_then(Value::as_str).unwrap_or("user");
            if role != "user" && role != "model" {
                return Err(Refusal::InvalidMessage(format!(
                    "clientContent role {role:?} is neither user nor model"
                )));
            }
            let texts: Vec<String> = turn
                .get("parts")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|part| part.get("text").and_then(Value::as_str))
                .map(str::to_owned)
                .collect();
            let mut record = lock(&self.record);
            record.items_created.push(turn.clone());
            if role == "user" {
                last_user_text = Some(texts.concat());
                record.user_texts.extend(texts);
            }
        }
        let turn_complete = body
            .get("turnComplete")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if turn_complete {
            let transcript = last_user_text
                .as_deref()
                .and_then(greeting_text)
                .unwrap_or("(chime)")
                .to_owned();
            self.pending = Some(PendingTurn {
                due: now,
                kind: PendingKind::Speak {
                    audio: chime(self.config.greeting_ms, OUTPUT_RATE),
                    transcript,
                },
            });
        }
        Ok(())
    }

    fn tool_response(&mut self, body: &Value, now: Duration) -> Result<(), Refusal> {
        let Some(responses) = body.get("functionResponses").and_then(Value::as_array) else {
            return Err(Refusal::InvalidMessage(
                "toolResponse.functionResponses is not a list".to_owned(),
            ));
        };
        let mut answered = Vec::new();
        for response in responses {
            let Some(id) = response.get("id").and_then(Value::as_str) else {
                return Err(Refusal::InvalidMessage(
                    "a function response has no id".to_owned(),
                ));
            };
            let output = response
                .get("response")
                .cloned()
                .unwrap_or(Value::Null)
                .to_string();
            lock(&self.record)
                .function_outputs
                .push((id.to_owned(), output.clone()));
            if self.cancelled_calls.contains(id) {
                // Too late: the model already gave up on this call.
                continue;
            }
            if !self.open_calls.remove(id) {
                return Err(Refusal::UnknownCallId(id.to_owned()));
            }
            self.cancel_due.retain(|(_, call)| call != id);
            answered.push(output);
        }
        if !answered.is_empty() {
            self.pending = Some(PendingTurn {
                due: now + self.config.reply_delay,
                kind: PendingKind::Speak {
                    audio: chime(self.config.greeting_ms, OUTPUT_RATE),
                    transcript: format!("(tool said: {})", answered.join(", ")),
                },
            });
        }
        Ok(())
    }

    fn call_function(&mut self, tool: MockToolCall, now: Duration) {
        self.next_call += 1;
        let id = format!("fc-{}", self.next_call);
        lock(&self.record)
            .function_calls
            .push((tool.name.clone(), tool.arguments.clone()));
        self.emit(json!({"toolCall": {"functionCalls": [
            {"id": id, "name": tool.name, "args": tool.arguments}
        ]}}));
        if self.config.gemini_cancel_tools {
            self.cancel_due.push((now + CANCEL_AFTER, id.clone()));
        }
        self.open_calls.insert(id);
    }

    fn fire_timers(&mut self, now: Duration) {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.cancel_due)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.cancel_due = later;
        for (_, id) in due {
            if self.open_calls.remove(&id) {
                lock(&self.record).tool_cancellations.push(id.clone());
                self.emit(json!({"toolCallCancellation": {"ids": [id.clone()]}}));
                self.cancelled_calls.insert(id);
            }
        }
        if self.go_away_at.is_some_and(|at| at <= now) {
            self.go_away_at = None;
            let grace = self.config.go_away_grace;
            lock(&self.record).go_aways_sent += 1;
            self.emit(json!({"goAway": {"timeLeft": format!("{}s", grace.as_secs_f64())}}));
            self.close_at = Some(now + grace);
        }
        if self.close_at.is_some_and(|at| at <= now) {
            self.close_at = None;
            self.close(1000, "session ended after goAway".to_owned());
        }
    }

    /// With `pace_deltas`, when the active turn's next audio is due.
    fn next_delta_at(&self) -> Option<Duration> {
        let turn = self.active.as_ref()?;
        if !self.config.pace_deltas {
            return Some(Duration::ZERO);
        }
        let sent_ms = turn.sent as u64 * 1000 / u64::from(OUTPUT_RATE);
        Some(turn.started_at + Duration::from_millis(sent_ms))
    }

    /// Queues the active turn's next audio, or its closing messages.
    fn step_turn(&mut self, now: Duration) {
        if self.next_delta_at().is_some_and(|at| at > now) {
            return;
        }
        let delta_len = (self.config.delta_ms.max(1) as usize * OUTPUT_RATE as usize / 1000).max(1);
        let Some(turn) = self.active.as_mut() else {
            return;
        };
        if turn.sent < turn.audio.len() {
            let end = (turn.sent + delta_len).min(turn.audio.len());
            let chunk = &turn.audio[turn.sent..end];
            turn.sent = end;
            let bytes: Vec<u8> = chunk.iter().flat_map(|s| s.to_le_bytes()).collect();
            lock(&self.record).output_audio.extend_from_slice(chunk);
            // The transcript streams in step with the audio, in a few chunks.
            let mut text_end = turn.transcript.len() * end / turn.audio.len().max(1);
            while !turn.transcript.is_char_boundary(text_end) {
                text_end += 1;
            }
            let text = turn.transcript[turn.transcript_sent..text_end].to_owned();
            turn.transcript_sent = text_end;
            self.emit(json!({"serverContent": {"modelTurn": {"parts": [
                {"inlineData": {"mimeType": GEMINI_OUTPUT_MIME, "data": BASE64.encode(bytes)}}
            ]}}}));
            if !text.is_empty() {
                self.emit(json!({"serverContent": {"outputTranscription": {"text": text}}}));
            }
            return;
        }
        let Some(done) = self.active.take() else {
            return;
        };
        // A turn with no audio still streams its transcript, at the end.
        if done.transcript_sent < done.transcript.len() {
            let rest = done.transcript[done.transcript_sent..].to_owned();
            self.emit(json!({"serverContent": {"outputTranscription": {"text": rest}}}));
        }
        lock(&self.record)
            .response_transcripts
            .push(done.transcript.clone());
        self.emit(json!({"serverContent": {"generationComplete": true}}));
        self.emit(json!({"serverContent": {"turnComplete": true}}));
        let prompt = (self.input_samples / INPUT_SAMPLES_PER_TOKEN).max(1);
        let response = (done.audio.len() as u64 / OUTPUT_SAMPLES_PER_TOKEN).max(1);
        self.emit(json!({"usageMetadata": {"promptTokenCount": prompt,
            "responseTokenCount": response, "totalTokenCount": prompt + response}}));
        self.issue_handle();
    }

    /// Sends a new resumption handle and remembers it server-wide.
    fn issue_handle(&mut self) {
        self.next_handle += 1;
        let handle = format!("h-{}-{}", self.number, self.next_handle);
        lock(&self.resumptions.handles).insert(
            handle.clone(),
            ResumeState {
                issued_by: self.id.clone(),
                next_tool: self.next_tool,
                next_call: self.next_call,
            },
        );
        self.emit(json!({"sessionResumptionUpdate": {"newHandle": handle, "resumable": true}}));
    }

    fn close(&mut self, code: u16, reason: String) {
        lock(&self.record).close_code = Some(code);
        self.closed = true;
        self.pending = None;
        self.active = None;
        self.outbox
            .push_back(GeminiTransmit::Close { code, reason });
    }

    fn emit(&mut self, message: Value) {
        self.outbox
            .push_back(GeminiTransmit::Text(message.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::test_support::tone;

    struct Harness {
        session: GeminiMockSession,
        record: Arc<Mutex<MockSessionRecord>>,
    }

    fn harness(config: MockConfig) -> Harness {
        harness_on(1, config, Arc::new(GeminiResumptions::default()))
    }

    fn harness_on(number: u64, config: MockConfig, resumptions: Arc<GeminiResumptions>) -> Harness {
        let record = Arc::new(Mutex::new(MockSessionRecord::default()));
        let session = GeminiMockSession::new(
            number,
            format!("sess_mock_{number}"),
            config,
            Arc::clone(&record),
            resumptions,
        );
        Harness { session, record }
    }

    fn setup(extra: Value) -> String {
        let mut setup = json!({"setup": {
            "model": "models/gemini-3.8-live",
            "generationConfig": {"responseModalities": ["AUDIO"], "speechConfig":
                {"voiceConfig": {"prebuiltVoiceConfig": {"voiceName": "Kore"}}}},
            "systemInstruction": {"parts": [{"text": "Be kind."}]},
            "inputAudioTranscription": {}, "outputAudioTranscription": {},
            "sessionResumption": {},
        }});
        if let (Value::Object(target), Value::Object(extra)) = (&mut setup["setup"], extra) {
            target.extend(extra);
        }
        setup.to_string()
    }

    fn audio(samples: &[i16]) -> String {
        let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        json!({"realtimeInput": {"audio": {"data": BASE64.encode(bytes), "mimeType": GEMINI_INPUT_MIME}}})
            .to_string()
    }

    /// Every frame ready at `now`.
    fn drain(session: &mut GeminiMockSession, now: Duration) -> Vec<GeminiTransmit> {
        std::iter::from_fn(|| session.poll_transmit(now)).collect()
    }

    fn messages(frames: &[GeminiTransmit]) -> Vec<Value> {
        frames
            .iter()
            .filter_map(|frame| match frame {
                GeminiTransmit::Text(text) => Some(serde_json::from_str(text).expect("json")),
                GeminiTransmit::Close { .. } => None,
            })
            .collect()
    }

    /// A message's kind: its top-level key, and for `serverContent` the key inside.
    fn kind(message: &Value) -> String {
        let Some((key, body)) = message.as_object().and_then(|m| m.iter().next()) else {
            return String::new();
        };
        match body.as_object().and_then(|b| b.keys().next()) {
            Some(inner) if key == "serverContent" => format!("serverContent.{inner}"),
            _ => key.clone(),
        }
    }

    fn kinds(frames: &[GeminiTransmit]) -> Vec<String> {
        messages(frames).iter().map(kind).collect()
    }

    fn closed_with(frames: &[GeminiTransmit]) -> Option<(u16, String)> {
        frames.iter().find_map(|frame| match frame {
            GeminiTransmit::Close { code, reason } => Some((*code, reason.clone())),
            GeminiTransmit::Text(_) => None,
        })
    }

    fn model_audio(frames: &[GeminiTransmit]) -> Vec<i16> {
        messages(frames)
            .iter()
            .filter_map(|m| {
                m["serverContent"]["modelTurn"]["parts"][0]["inlineData"]["data"].as_str()
            })
            .flat_map(|data| {
                let bytes = BASE64.decode(data).expect("base64");
                bytes
                    .chunks_exact(2)
                    .map(|p| i16::from_le_bytes([p[0], p[1]]))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn output_transcript(frames: &[GeminiTransmit]) -> String {
        messages(frames)
            .iter()
            .filter_map(|m| m["serverContent"]["outputTranscription"]["text"].as_str())
            .collect()
    }

    const T0: Duration = Duration::ZERO;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn setup_is_answered_with_setup_complete_and_a_handle() {
        let mut h = harness(MockConfig::default());
        h.session.open();
        assert!(
            drain(&mut h.session, T0).is_empty(),
            "Gemini waits for setup"
        );
        h.session.handle_text(&setup(json!({})), T0);
        let frames = drain(&mut h.session, T0);
        let messages = messages(&frames);
        assert_eq!(messages[0], json!({"setupComplete": {}}));
        assert_eq!(
            messages[1],
            json!({"sessionResumptionUpdate": {"newHandle": "h-1-1", "resumable": true}})
        );
        assert_eq!(messages.len(), 2);
        assert_eq!(h.session.poll_timeout(), None, "nothing more to say");
        let record = lock(&h.record);
        assert_eq!(record.provider, "gemini");
        assert_eq!(record.session["model"], "models/gemini-3.8-live");
        assert_eq!((record.input_rate, record.output_rate), (16_000, 24_000));
        assert_eq!(record.client_event_types, ["setup"]);
        assert_eq!(record.resumed_from, None);
    }

    #[test]
    fn an_utterance_is_echoed_as_a_turn_with_transcription_and_usage() {
        let mut h = harness(MockConfig {
            reply_delay: ms(200),
            ..MockConfig::default()
        });
        h.session.handle_text(&setup(json!({})), T0);
        drain(&mut h.session, T0);
        let mut input: Vec<i16> = vec![0; 400 * 16];
        input.extend(tone(600, 16_000, 8000.0));
        input.extend(vec![0; 700 * 16]);
        h.session.handle_text(&audio(&input), ms(2000));
        let heard = drain(&mut h.session, ms(2000));
        assert_eq!(kinds(&heard), ["serverContent.inputTranscription"]);
        assert_eq!(h.session.poll_timeout(), Some(ms(2200)), "the reply delay");
        assert!(drain(&mut h.session, ms(2199)).is_empty());

        let turn = drain(&mut h.session, ms(2200));
        let kinds = kinds(&turn);
        let deltas = kinds
            .iter()
            .filter(|k| *k == "serverContent.modelTurn")
            .count();
        assert_eq!(
            deltas, 9,
            "900 ms (300 ms prefix + 600 ms speech) in 100 ms parts"
        );
        assert_eq!(
            kinds[kinds.len() - 4..],
            [
                "serverContent.generationComplete",
                "serverContent.turnComplete",
                "usageMetadata",
                "sessionResumptionUpdate"
            ]
        );
        assert!(
            kinds
                .iter()
                .filter(|k| *k == "serverContent.outputTranscription")
                .count()
                > 1,
            "the transcript comes in chunks: {kinds:?}"
        );
        assert_eq!(output_transcript(&turn), "(0.9 s of speech)");
        let messages = messages(&turn);
        assert_eq!(
            messages[0]["serverContent"]["modelTurn"]["parts"][0]["inlineData"]["mimeType"],
            GEMINI_OUTPUT_MIME
        );
        let usage = &messages[messages.len() - 2]["usageMetadata"];
        let (prompt, response) = (
            usage["promptTokenCount"].as_u64().expect("prompt"),
            usage["responseTokenCount"].as_u64().expect("response"),
        );
        assert_eq!(prompt, 54, "1.7 s of input at 32 tokens a second");
        assert_eq!(response, 28, "0.9 s of output");
        assert_eq!(usage["totalTokenCount"], prompt + response);
        assert_eq!(
            messages.last().expect("update")["sessionResumptionUpdate"]["newHandle"],
            "h-1-2"
        );

        let echo = model_audio(&turn);
        let expected = convert_rate(&input[100 * 16..1000 * 16], 16_000, 24_000);
        assert_eq!(echo.len(), 900 * 24);
        assert!(echo == expected, "the echo is the utterance at 24 kHz");
        let record = lock(&h.record);
        assert!(record.output_audio == echo);
        assert_eq!(record.input_audio_8k.len(), input.len());
        assert_eq!(record.response_transcripts, ["(0.9 s of speech)"]);
        assert_eq!(record.client_event_types, ["setup", "realtimeInput"]);
    }

    #[test]
    fn caller_speech_mid_turn_interrupts_it_but_not_after_all_audio_was_sent() {
        let config = MockConfig {
            greeting_ms: 2000,
            delta_ms: 20,
            ..MockConfig::default()
        };
        let greet =
            json!({"clientContent": {"turns": [{"role": "user", "parts": [{"text": "Greet"}]}],
                           "turnComplete": true}})
            .to_string();
        let mut h = harness(config.clone());
        h.session.handle_text(&setup(json!({})), T0);
        drain(&mut h.session, T0);
        h.session.handle_text(&greet, T0);
        // Part of the turn goes out, then the caller speaks.
        let before: Vec<GeminiTransmit> = (0..6)
            .filter_map(|_| h.session.poll_transmit(ms(10)))
            .collect();
        assert!(kinds(&before).contains(&"serverContent.modelTurn".to_owned()));
        h.session
            .handle_text(&audio(&tone(100, 16_000, 12000.0)), ms(20));
        let after = drain(&mut h.session, ms(20));
        let after_kinds = kinds(&after);
        assert_eq!(
            after_kinds.first().map(String::as_str),
            Some("serverContent.interrupted")
        );
        for stopped in ["serverContent.modelTurn", "serverContent.turnComplete"] {
            assert!(
                !after_kinds.contains(&stopped.to_owned()),
                "{after_kinds:?}"
            );
        }
        {
            let record = lock(&h.record);
            assert_eq!(record.interruptions, 1);
            assert!(record.output_audio.len() < 2000 * 24);
            assert_eq!(record.response_transcripts, ["(chime)"]);
        }

        // All of a short turn's audio sent: speech now interrupts nothing.
        let mut h = harness(MockConfig {
            greeting_ms: 40,
            ..config
        });
        h.session.handle_text(&setup(json!({})), T0);
        drain(&mut h.session, T0);
        h.session.handle_text(&greet, T0);
        let mut parts = 0;
        while parts < 2 {
            let frame = h.session.poll_transmit(ms(10)).expect("the turn's audio");
            parts += usize::from(kinds(&[frame]) == ["serverContent.modelTurn"]);
        }
        h.session
            .handle_text(&audio(&tone(100, 16_000, 12000.0)), ms(20));
        let rest = kinds(&drain(&mut h.session, ms(20)));
        assert!(
            !rest.contains(&"serverContent.interrupted".to_owned()),
            "{rest:?}"
        );
        assert!(
            rest.contains(&"serverContent.turnComplete".to_owned()),
            "{rest:?}"
        );
        assert_eq!(lock(&h.record).interruptions, 0);
    }

    #[test]
    fn a_greeting_request_is_answered_with_a_chime_and_the_requested_text() {
        let mut h = harness(MockConfig {
            greeting_ms: 300,
            ..MockConfig::default()
        });
        h.session.handle_text(&setup(json!({})), T0);
        drain(&mut h.session, T0);
        let history = json!({"clientContent": {"turns": [
            {"role": "user", "parts": [{"text": "What time is it?"}]},
            {"role": "model", "parts": [{"text": "Noon."}]},
        ], "turnComplete": false}});
        h.session.handle_text(&history.to_string(), T0);
        assert!(
            drain(&mut h.session, T0).is_empty(),
            "history alone is not a turn"
        );
        let greet = json!({"clientContent": {"turns": [{"role": "user", "parts": [{"text":
            "The call has just connected. Greet the caller now by saying exactly this: Welcome to Luna!"}]}],
            "turnComplete": true}});
        h.session.handle_text(&greet.to_string(), ms(5));
        let turn = drain(&mut h.session, ms(5));
        assert_eq!(output_transcript(&turn), "Welcome to Luna!");
        let chime = model_audio(&turn);
        assert_eq!(chime.len(), 300 * 24);
        assert!(super::super::voice::rms_dbfs(&chime) > -30.0, "audible");
        assert!(kinds(&turn).contains(&"serverContent.turnComplete".to_owned()));

        // Empty turns with turnComplete also make the model answer.
        h.session.handle_text(
            r#"{"clientContent":{"turns":[],"turnComplete":true}}"#,
            ms(10),
        );
        assert_eq!(output_transcript(&drain(&mut h.session, ms(10))), "(chime)");
        let record = lock(&h.record);
        assert_eq!(
            record.user_texts,
            [
                "What time is it?",
                "The call has just connected. Greet the caller now by saying exactly this: Welcome to Luna!"
            ]
        );
        assert_eq!(record.items_created.len(), 3);
        assert_eq!(record.items_created[1]["role"], "model");
        assert_eq!(record.response_transcripts, ["Welcome to Luna!", "(chime)"]);
    }

    fn tool_harness(cancel: bool) -> Harness {
        let mut h = harness(MockConfig {
            reply_delay: ms(50),
            tool_script: vec![MockToolCall {
                name: "lookup_business_hours".into(),
                arguments: json!({"day": "monday"}),
            }],
            gemini_cancel_tools: cancel,
            ..MockConfig::default()
        });
        let tools = json!({"tools": [{"functionDeclarations": [{"name": "lookup_business_hours",
            "description": "Opening hours", "parameters": {"type": "OBJECT"}}]}]});
        h.session.handle_text(&setup(tools), T0);
        drain(&mut h.session, T0);
        let mut input = tone(300, 16_000, 8000.0);
        input.extend(vec![0; 8000]);
        h.session.handle_text(&audio(&input), ms(1000));
        drain(&mut h.session, ms(1000));
        h
    }

    #[test]
    fn a_scripted_tool_call_replaces_the_echo_and_its_response_is_spoken() {
        let mut h = tool_harness(false);
        let call = messages(&drain(&mut h.session, ms(1050)));
        assert_eq!(
            call,
            [json!({"toolCall": {"functionCalls": [
                {"id": "fc-1", "name": "lookup_business_hours", "args": {"day": "monday"}}
            ]}})]
        );
        assert!(
            drain(&mut h.session, ms(1500)).is_empty(),
            "no echo, no cancellation"
        );
        let response = json!({"toolResponse": {"functionResponses": [
            {"id": "fc-1", "name": "lookup_business_hours", "response": {"result": "open 9-5"}}
        ]}});
        h.session.handle_text(&response.to_string(), ms(1500));
        assert_eq!(
            h.session.poll_timeout(),
            Some(ms(1550)),
            "answers on its own"
        );
        let answer = drain(&mut h.session, ms(1550));
        assert_eq!(
            output_transcript(&answer),
            r#"(tool said: {"result":"open 9-5"})"#
        );
        assert!(kinds(&answer).contains(&"serverContent.turnComplete".to_owned()));
        let record = lock(&h.record);
        assert_eq!(
            record.function_calls,
            [("lookup_business_hours".to_owned(), json!({"day": "monday"}))]
        );
        assert_eq!(
            record.function_outputs,
            [("fc-1".to_owned(), r#"{"result":"open 9-5"}"#.to_owned())]
        );
        assert!(record.tool_cancellations.is_empty());
    }

    #[test]
    fn a_cancelled_tool_call_ignores_its_late_response() {
        let mut h = tool_harness(true);
        assert_eq!(kinds(&drain(&mut h.session, ms(1050))), ["toolCall"]);
        assert_eq!(h.session.poll_timeout(), Some(ms(1150)));
        assert!(drain(&mut h.session, ms(1149)).is_empty());
        assert_eq!(
            messages(&drain(&mut h.session, ms(1150))),
            [json!({"toolCallCancellation": {"ids": ["fc-1"]}})]
        );
        let late = json!({"toolResponse": {"functionResponses": [
            {"id": "fc-1", "name": "lookup_business_hours", "response": {"result": "late"}}
        ]}});
        h.session.handle_text(&late.to_string(), ms(1200));
        assert!(
            drain(&mut h.session, ms(5000)).is_empty(),
            "ignored, not spoken"
        );
        assert_eq!(h.session.poll_timeout(), None);
        let record = lock(&h.record);
        assert_eq!(record.tool_cancellations, ["fc-1"]);
        assert_eq!(record.function_outputs.len(), 1, "recorded as received");
        assert_eq!(record.close_code, None);

        // Answered in time, a call is not cancelled.
        let mut h = tool_harness(true);
        drain(&mut h.session, ms(1050));
        let response = late.to_string().replace("late", "on time");
        h.session.handle_text(&response, ms(1100));
        let answer = drain(&mut h.session, ms(1200));
        assert!(!kinds(&answer).contains(&"toolCallCancellation".to_owned()));
        assert_eq!(
            output_transcript(&answer),
            r#"(tool said: {"result":"on time"})"#
        );
    }

    #[test]
    fn go_away_then_close_after_the_grace() {
        let mut h = harness(MockConfig {
            go_away_after: Some(ms(1000)),
            go_away_grace: ms(200),
            ..MockConfig::default()
        });
        h.session.handle_text(&setup(json!({})), ms(10));
        drain(&mut h.session, ms(10));
        assert_eq!(h.session.poll_timeout(), Some(ms(1010)));
        assert_eq!(
            messages(&drain(&mut h.session, ms(1010))),
            [json!({"goAway": {"timeLeft": "0.2s"}})]
        );
        assert_eq!(h.session.poll_timeout(), Some(ms(1210)));
        let frames = drain(&mut h.session, ms(1210));
        assert_eq!(closed_with(&frames).map(|(code, _)| code), Some(1000));
        h.session.handle_text(&audio(&[0; 320]), ms(1300));
        assert!(
            drain(&mut h.session, ms(1300)).is_empty(),
            "closed for good"
        );
        let record = lock(&h.record);
        assert_eq!(record.go_aways_sent, 1);
        assert_eq!(record.close_code, Some(1000));
    }

    #[test]
    fn a_known_handle_resumes_and_an_unknown_one_closes_1008() {
        let resumptions = Arc::new(GeminiResumptions::default());
        let mut first = harness_on(1, MockConfig::default(), Arc::clone(&resumptions));
        first.session.handle_text(&setup(json!({})), T0);
        drain(&mut first.session, T0);
        assert_eq!(resumptions.issuer("h-1-1").as_deref(), Some("sess_mock_1"));

        let mut second = harness_on(2, MockConfig::default(), Arc::clone(&resumptions));
        second.session.handle_text(
            &setup(json!({"sessionResumption": {"handle": "h-1-1"}})),
            T0,
        );
        assert_eq!(
            messages(&drain(&mut second.session, T0)),
            [
                json!({"setupComplete": {}}),
                json!({"sessionResumptionUpdate": {"newHandle": "h-2-1", "resumable": true}})
            ]
        );
        assert_eq!(lock(&second.record).resumed_from.as_deref(), Some("h-1-1"));
        // Old handles stay valid.
        let mut third = harness_on(3, MockConfig::default(), Arc::clone(&resumptions));
        third.session.handle_text(
            &setup(json!({"sessionResumption": {"handle": "h-1-1"}})),
            T0,
        );
        assert_eq!(kinds(&drain(&mut third.session, T0))[0], "setupComplete");

        let mut stranger = harness_on(4, MockConfig::default(), resumptions);
        stranger.session.handle_text(
            &setup(json!({"sessionResumption": {"handle": "h-9-9"}})),
            T0,
        );
        let frames = drain(&mut stranger.session, T0);
        assert_eq!(
            closed_with(&frames),
            Some((1008, "invalid session resumption handle".to_owned()))
        );
        assert!(messages(&frames).is_empty(), "no setupComplete");
        assert_eq!(lock(&stranger.record).close_code, Some(1008));
    }

    #[test]
    fn malformed_messages_close_1007() {
        let wrong_rate = json!({"realtimeInput": {"audio": {"data": "AAAA",
            "mimeType": "audio/pcm;rate=24000"}}})
        .to_string();
        let unknown_call = json!({"toolResponse": {"functionResponses": [
            {"id": "fc-7", "name": "x", "response": {}}]}})
        .to_string();
        let no_model = json!({"setup": {"generationConfig": {}}}).to_string();
        let cases: [(&str, Vec<String>); 7] = [
            ("before setup", vec![audio(&[0; 320])]),
            ("second setup", vec![setup(json!({})), setup(json!({}))]),
            ("setup without model", vec![no_model]),
            ("bad mimeType", vec![setup(json!({})), wrong_rate]),
            ("not JSON", vec![setup(json!({})), "nope".to_owned()]),
            (
                "two top-level fields",
                vec![
                    setup(json!({})),
                    r#"{"clientContent":{},"toolResponse":{}}"#.to_owned(),
                ],
            ),
            ("unknown call id", vec![setup(json!({})), unknown_call]),
        ];
        for (case, texts) in cases {
            let mut h = harness(MockConfig::default());
            for text in &texts {
                h.session.handle_text(text, T0);
            }
            let frames = drain(&mut h.session, T0);
            let (code, reason) = closed_with(&frames).unwrap_or_else(|| panic!("{case}: no close"));
            assert_eq!(code, 1007, "{case}: {reason}");
            assert!(
                matches!(frames.last(), Some(GeminiTransmit::Close { .. })),
                "{case}"
            );
            assert_eq!(lock(&h.record).close_code, Some(1007), "{case}");
        }
    }
}
