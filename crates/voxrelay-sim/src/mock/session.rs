//! The mock realtime "model" of one session, sans-IO: client text in, server frames out.
//!
//! Owns the mock's protocol behaviour (session merging, energy VAD, echo and chime responses,
//! truncate/delete/cancel rules) and keeps [`MockSessionRecord`] up to date. Invariants: no
//! socket and no clock here (time is the `now` argument, measured from the session's start);
//! every emitted event carries an `event_id`; the audio produced per assistant item is tracked
//! so a truncate past it is rejected, like on the real service.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value, json};

use super::voice::{EnergyVad, VadEvent, chime, convert_rate, greeting_text, pcm16_samples};
use super::{MockConfig, MockSessionRecord, MockToolCall, lock};
use voxrelay_core::codec::g711::{alaw_decode, alaw_encode, mulaw_decode, mulaw_encode};

/// Tokens the mock bills per second of audio, either way (the order of the real service's
/// audio tokens; the Gemini mock uses the same rate).
const AUDIO_TOKENS_PER_SECOND: u64 = 32;

/// Audio formats the GA API accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Pcmu,
    Pcma,
    Pcm24k,
}

impl Format {
    pub(crate) fn from_value(format: &Value) -> Option<Self> {
        match format.get("type").and_then(Value::as_str)? {
            "audio/pcmu" => Some(Self::Pcmu),
            "audio/pcma" => Some(Self::Pcma),
            "audio/pcm" => match format.get("rate") {
                None => Some(Self::Pcm24k),
                Some(rate) if rate.as_u64() == Some(24_000) => Some(Self::Pcm24k),
                Some(_) => None,
            },
            _ => None,
        }
    }

    pub(crate) fn rate(self) -> u32 {
        match self {
            Self::Pcmu | Self::Pcma => 8_000,
            Self::Pcm24k => 24_000,
        }
    }

    pub(crate) fn quantise(self, sample: i16) -> i16 {
        match self {
            Self::Pcmu => mulaw_decode(mulaw_encode(sample)),
            Self::Pcma => alaw_decode(alaw_encode(sample)),
            Self::Pcm24k => sample,
        }
    }

    pub(crate) fn encode(self, samples: &[i16]) -> String {
        let bytes: Vec<u8> = match self {
            Self::Pcmu => samples.iter().map(|&sample| mulaw_encode(sample)).collect(),
            Self::Pcma => samples.iter().map(|&sample| alaw_encode(sample)).collect(),
            Self::Pcm24k => samples.iter().flat_map(|s| s.to_le_bytes()).collect(),
        };
        BASE64.encode(bytes)
    }
}

/// A response being spoken.
struct ActiveResponse {
    id: String,
    item_id: String,
    audio: Vec<i16>,
    sent: usize,
    transcript: String,
    /// Bytes of `transcript` streamed in deltas so far (kept in step with the audio).
    transcript_sent: usize,
    /// When it started, for `pace_deltas`.
    started_at: Duration,
}

/// An echo (or a scripted function call) waiting for the model's think time.
struct PendingReply {
    due: Duration,
    audio: Vec<i16>,
    transcript: String,
    tool: Option<MockToolCall>,
}

/// The energy VAD and the utterance it is in.
struct VadState {
    vad: EnergyVad,
    utterance_start: usize,
    item_id: String,
}

/// One mock session's protocol logic, sans-IO: text in, text frames out, time as an input.
pub struct MockSession {
    config: MockConfig,
    record: Arc<Mutex<MockSessionRecord>>,
    session: Value,
    outbox: VecDeque<String>,
    next_event: u64,
    next_id: u64,
    /// `true` for assistant items, with the milliseconds of audio produced for them.
    items: HashMap<String, (bool, u64)>,
    last_item: Option<String>,
    vad: VadState,
    /// A PCM16 byte split across two appends.
    carry: Option<u8>,
    pending: Option<PendingReply>,
    active: Option<ActiveResponse>,
    /// The next entry of `config.tool_script`.
    next_tool: usize,
    /// The output of the latest `function_call_output` item, which the next response speaks.
    last_tool_output: Option<String>,
}

impl MockSession {
    pub fn new(id: String, config: MockConfig, record: Arc<Mutex<MockSessionRecord>>) -> Self {
        let session = json!({
            "type": "realtime",
            "object": "realtime.session",
            "id": id,
            "model": "gpt-realtime",
            "output_modalities": ["audio"],
            "instructions": "",
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": null,
                    "noise_reduction": null,
                    "turn_detection": {
                        "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                        "silence_duration_ms": 200, "idle_timeout_ms": null,
                        "create_response": true, "interrupt_response": true
                    }
                },
                "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin", "speed": 1}
            }
        });
        {
            let mut record = lock(&record);
            record.session = session.clone();
            record.input_rate = 24_000;
            record.output_rate = 24_000;
        }
        Self {
            vad: VadState {
                vad: EnergyVad::new(config.vad_threshold_dbfs, config.silence_ms, 0),
                utterance_start: 0,
                item_id: String::new(),
            },
            config,
            record,
            session,
            outbox: VecDeque::new(),
            next_event: 0,
            next_id: 0,
            items: HashMap::new(),
            last_item: None,
            carry: None,
            pending: None,
            active: None,
            next_tool: 0,
            last_tool_output: None,
        }
    }

    /// Queues `session.created`.
    pub fn open(&mut self) {
        let session = self.session.clone();
        self.emit(json!({"type": "session.created", "session": session}));
    }

    /// The error the real service sends before closing a beta-shaped connection with 4000.
    pub fn beta_rejection(&mut self) -> String {
        let mut event = json!({"type": "error", "error": {
            "type": "invalid_request_error",
            "code": "beta_api_shape_disabled",
            "message": "The Realtime Beta API is no longer supported. Please use /v1/realtime for the GA API.",
            "param": null
        }});
        self.stamp(&mut event);
        lock(&self.record)
            .errors_sent
            .push("beta_api_shape_disabled".to_owned());
        event.to_string()
    }

    /// The next frame to send, if any is ready at `now`.
    pub fn poll_transmit(&mut self, now: Duration) -> Option<String> {
        if let Some(frame) = self.outbox.pop_front() {
            return Some(frame);
        }
        if self.active.is_none() && self.pending.as_ref().is_some_and(|p| p.due <= now) {
            if let Some(reply) = self.pending.take() {
                match reply.tool {
                    Some(tool) => self.call_function(tool),
                    None => self.start_response(reply.audio, reply.transcript, now),
                }
            }
            return self.outbox.pop_front();
        }
        self.step_response(now);
        self.outbox.pop_front()
    }

    /// With `pace_deltas`, when the active response's next delta is due.
    fn next_delta_at(&self) -> Option<Duration> {
        let active = self.active.as_ref()?;
        if !self.config.pace_deltas {
            return Some(Duration::ZERO);
        }
        let rate = self.output_format().rate() as u64;
        Some(active.started_at + Duration::from_millis(active.sent as u64 * 1000 / rate.max(1)))
    }

    /// When `poll_transmit` will next have something, if nothing is ready now.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if !self.outbox.is_empty() {
            return Some(Duration::ZERO);
        }
        if let Some(at) = self.next_delta_at() {
            return Some(at);
        }
        self.pending.as_ref().map(|pending| pending.due)
    }

    /// Handles one client text frame.
    pub fn handle_text(&mut self, text: &str, now: Duration) {
        let Ok(Value::Object(event)) = serde_json::from_str::<Value>(text) else {
            self.error(
                "invalid_request_error",
                "invalid_event",
                "Invalid JSON.",
                None,
            );
            return;
        };
        let client_event_id = event
            .get("event_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let Some(kind) = event.get("type").and_then(Value::as_str) else {
            self.error(
                "invalid_request_error",
                "invalid_event",
                "The 'type' field is missing.",
                client_event_id,
            );
            return;
        };
        lock(&self.record).client_event_types.push(kind.to_owned());
        match kind {
            "session.update" => self.session_update(&event, client_event_id),
            "input_audio_buffer.append" => self.append(&event, client_event_id, now),
            "input_audio_buffer.clear" => {
                self.vad.vad.reset();
                self.pending = None;
                self.emit(json!({"type": "input_audio_buffer.cleared"}));
            }
            "conversation.item.create" => self.item_create(&event, client_event_id),
            "conversation.item.truncate" => self.truncate(&event, client_event_id),
            "conversation.item.delete" => self.delete(&event, client_event_id),
            "response.create" => {
                if self.active.is_some() {
                    self.error(
                        "invalid_request_error",
                        "conversation_already_has_active_response",
                        "Conversation already has an active response in progress.",
                        client_event_id,
                    );
                } else {
                    self.pending = None;
                    let audio = chime(self.config.greeting_ms, self.output_format().rate());
                    let transcript = self.response_transcript(&event);
                    self.start_response(audio, transcript, now);
                }
            }
            "response.cancel" => {
                if self.active.is_some() {
                    self.cancel_active("client_cancelled");
                } else {
                    self.error(
                        "invalid_request_error",
                        "response_cancel_not_active",
                        "Cancellation failed: no active response found.",
                        client_event_id,
                    );
                }
            }
            other => {
                let message =
                    format!("Invalid value: '{other}'. Not a client event the mock supports.");
                self.error(
                    "invalid_request_error",
                    "invalid_event",
                    &message,
                    client_event_id,
                );
            }
        }
    }

    fn session_update(&mut self, event: &Map<String, Value>, client_event_id: Option<String>) {
        let Some(Value::Object(update)) = event.get("session") else {
            self.error(
                "invalid_request_error",
                "missing_required_parameter",
                "Missing required parameter: 'session'.",
                client_event_id,
            );
            return;
        };
        match update.get("type").and_then(Value::as_str) {
            Some("realtime") => {}
            Some(_) => {
                self.error(
                    "invalid_request_error",
                    "invalid_value",
                    "Invalid value for 'session.type': only 'realtime' is supported here.",
                    client_event_id,
                );
                return;
            }
            None => {
                self.error(
                    "invalid_request_error",
                    "missing_required_parameter",
                    "Missing required parameter: 'session.type'.",
                    client_event_id,
                );
                return;
            }
        }
        for beta_field in [
            "input_audio_format",
            "output_audio_format",
            "modalities",
            "voice",
            "turn_detection",
        ] {
            if update.contains_key(beta_field) {
                let message = format!("Unknown parameter: 'session.{beta_field}'.");
                self.error(
                    "invalid_request_error",
                    "unknown_parameter",
                    &message,
                    client_event_id,
                );
                return;
            }
        }
        let mut merged = self.session.clone();
        merge(&mut merged, &Value::Object(update.clone()));
        for direction in ["input", "output"] {
            if Format::from_value(&merged["audio"][direction]["format"]).is_none() {
                let message = format!("Invalid value for 'session.audio.{direction}.format'.");
                self.error(
                    "invalid_request_error",
                    "invalid_value",
                    &message,
                    client_event_id,
                );
                return;
            }
        }
        self.session = merged;
        let input_rate = self.input_format().rate();
        let output_rate = self.output_format().rate();
        {
            let mut record = lock(&self.record);
            record.session = self.session.clone();
            record.input_rate = input_rate;
            record.output_rate = output_rate;
        }
        let session = self.session.clone();
        self.emit(json!({"type": "session.updated", "session": session}));
    }

    fn input_format(&self) -> Format {
        Format::from_value(&self.session["audio"]["input"]["format"]).unwrap_or(Format::Pcm24k)
    }

    fn output_format(&self) -> Format {
        Format::from_value(&self.session["audio"]["output"]["format"]).unwrap_or(Format::Pcm24k)
    }

    fn turn_detection_flag(&self, name: &str) -> bool {
        self.session["audio"]["input"]["turn_detection"][name]
            .as_bool()
            .unwrap_or(true)
    }

    fn append(
        &mut self,
        event: &Map<String, Value>,
        client_event_id: Option<String>,
        now: Duration,
    ) {
        let decoded = event
            .get("audio")
            .and_then(Value::as_str)
            .map(|audio| BASE64.decode(audio));
        let bytes = match decoded {
            Some(Ok(bytes)) => bytes,
            _ => {
                self.error(
                    "invalid_request_error",
                    "invalid_value",
                    "Invalid 'audio': expected base64-encoded audio.",
                    client_event_id,
                );
                return;
            }
        };
        let samples: Vec<i16> = match self.input_format() {
            Format::Pcmu => bytes.iter().map(|&code| mulaw_decode(code)).collect(),
            Format::Pcma => bytes.iter().map(|&code| alaw_decode(code)).collect(),
            Format::Pcm24k => pcm16_samples(&mut self.carry, &bytes),
        };
        lock(&self.record)
            .input_audio_8k
            .extend_from_slice(&samples);
        if self.session["audio"]["input"]["turn_detection"].is_object() {
            self.run_vad(&samples, now);
        }
    }

    fn run_vad(&mut self, samples: &[i16], now: Duration) {
        let rate = self.input_format().rate() as usize;
        let prefix_ms = self.session["audio"]["input"]["turn_detection"]["prefix_padding_ms"]
            .as_u64()
            .unwrap_or(300) as usize;
        let prefix_samples = prefix_ms * rate / 1000;
        let to_ms = |sample: usize| (sample * 1000 / rate) as u64;
        for event in self.vad.vad.feed(samples, rate as u32) {
            match event {
                VadEvent::Started { window_start } => {
                    self.vad.utterance_start = window_start.saturating_sub(prefix_samples);
                    self.vad.item_id = self.new_id("item");
                    self.pending = None;
                    let item_id = self.vad.item_id.clone();
                    self.emit(json!({
                        "type": "input_audio_buffer.speech_started",
                        "audio_start_ms": to_ms(self.vad.utterance_start),
                        "item_id": item_id,
                    }));
                    if self.active.is_some() && self.turn_detection_flag("interrupt_response") {
                        self.cancel_active("turn_detected");
                    }
                }
                VadEvent::Sustained => {}
                VadEvent::Stopped { speech_end } => {
                    self.end_utterance(speech_end, to_ms(speech_end), rate, now);
                }
            }
        }
    }

    fn end_utterance(&mut self, end: usize, audio_end_ms: u64, rate: usize, now: Duration) {
        let item_id = self.vad.item_id.clone();
        let start = self.vad.utterance_start;
        let audio: Vec<i16> = {
            let record = lock(&self.record);
            record
                .input_audio_8k
                .get(start..end)
                .map(<[i16]>::to_vec)
                .unwrap_or_default()
        };
        let seconds = audio.len() as f64 / rate as f64;
        let transcript = format!("({seconds:.1} s of speech)");
        self.emit(json!({
            "type": "input_audio_buffer.speech_stopped",
            "audio_end_ms": audio_end_ms,
            "item_id": item_id,
        }));
        let previous = self.last_item.replace(item_id.clone());
        self.items.insert(item_id.clone(), (false, 0));
        self.emit(json!({
            "type": "input_audio_buffer.committed",
            "previous_item_id": previous,
            "item_id": item_id,
        }));
        self.emit(json!({
            "type": "conversation.item.input_audio_transcription.completed",
            "item_id": item_id,
            "content_index": 0,
            "transcript": transcript,
        }));
        if self.turn_detection_flag("create_response") {
            let output = convert_rate(&audio, rate as u32, self.output_format().rate());
            let tool = self.next_scripted_tool();
            self.pending = Some(PendingReply {
                due: now + self.config.reply_delay,
                audio: output,
                transcript,
                tool,
            });
        }
    }

    /// The next scripted function call, if the session offers that function.
    fn next_scripted_tool(&mut self) -> Option<MockToolCall> {
        let tool = self.config.tool_script.get(self.next_tool)?.clone();
        self.next_tool += 1;
        let offered = self
            .session
            .get("tools")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|offered| offered.get("name").and_then(Value::as_str) == Some(&tool.name));
        offered.then_some(tool)
    }

    /// What a `response.create` makes the mock "say": the greeting the bridge asked for
    /// (its instructions end with the text to say), the latest tool output, or a chime.
    fn response_transcript(&mut self, event: &Map<String, Value>) -> String {
        let instructions = event
            .get("response")
            .and_then(|response| response.get("instructions"))
            .and_then(Value::as_str)
            .unwrap_or("");
        if let Some(greeting) = greeting_text(instructions) {
            return greeting.to_owned();
        }
        match self.last_tool_output.take() {
            Some(output) => format!("(tool said: {output})"),
            None => "(chime)".to_owned(),
        }
    }

    /// A response whose only output is a function call, emitted at once, as the GA server
    /// orders it: the call's arguments are complete before `response.done`.
    fn call_function(&mut self, tool: MockToolCall) {
        let id = self.new_id("resp");
        let item_id = self.new_id("item");
        let call_id = self.new_id("call");
        let arguments = tool.arguments.to_string();
        lock(&self.record)
            .function_calls
            .push((tool.name.clone(), tool.arguments.clone()));
        let previous = self.last_item.replace(item_id.clone());
        self.items.insert(item_id.clone(), (false, 0));
        self.emit(json!({
            "type": "response.created",
            "response": {"object": "realtime.response", "id": id, "status": "in_progress",
                         "output": [], "output_modalities": ["audio"], "usage": null},
        }));
        let mut item = json!({"id": item_id, "object": "realtime.item", "type": "function_call",
                              "status": "in_progress", "call_id": call_id, "name": tool.name,
                              "arguments": ""});
        self.emit(
            json!({"type": "response.output_item.added", "response_id": id,
                         "output_index": 0, "item": item}),
        );
        self.emit(
            json!({"type": "conversation.item.added", "previous_item_id": previous,
                         "item": item}),
        );
        self.emit(
            json!({"type": "response.function_call_arguments.delta", "response_id": id,
                         "item_id": item_id, "output_index": 0, "call_id": call_id,
                         "delta": arguments}),
        );
        self.emit(
            json!({"type": "response.function_call_arguments.done", "response_id": id,
                         "item_id": item_id, "output_index": 0, "call_id": call_id,
                         "name": tool.name, "arguments": arguments}),
        );
        item["status"] = json!("completed");
        item["arguments"] = json!(arguments);
        self.emit(
            json!({"type": "response.output_item.done", "response_id": id,
                         "output_index": 0, "item": item}),
        );
        self.emit(json!({
            "type": "response.done",
            "response": {"object": "realtime.response", "id": id, "status": "completed",
                         "status_details": null, "output": [item], "usage": null},
        }));
    }

    fn start_response(&mut self, audio: Vec<i16>, transcript: String, now: Duration) {
        let id = self.new_id("resp");
        let item_id = self.new_id("item");
        let previous = self.last_item.replace(item_id.clone());
        self.items.insert(item_id.clone(), (true, 0));
        self.emit(json!({
            "type": "response.created",
            "response": {"object": "realtime.response", "id": id, "status": "in_progress",
                         "output": [], "output_modalities": ["audio"], "usage": null},
        }));
        let item = json!({"id": item_id, "object": "realtime.item", "type": "message",
                          "status": "in_progress", "role": "assistant", "content": []});
        self.emit(
            json!({"type": "response.output_item.added", "response_id": id,
                         "output_index": 0, "item": item}),
        );
        self.emit(
            json!({"type": "conversation.item.added", "previous_item_id": previous,
                         "item": item}),
        );
        self.active = Some(ActiveResponse {
            id,
            item_id,
            audio,
            sent: 0,
            transcript,
            transcript_sent: 0,
            started_at: now,
        });
    }

    /// Queues the next delta of the active response, or its closing events.
    fn step_response(&mut self, now: Duration) {
        if self.next_delta_at().is_some_and(|at| at > now) {
            return;
        }
        let format = self.output_format();
        let rate = format.rate() as usize;
        let delta_len = (self.config.delta_ms.max(1) as usize * rate / 1000).max(1);
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.sent < active.audio.len() {
            let end = (active.sent + delta_len).min(active.audio.len());
            let chunk = &active.audio[active.sent..end];
            active.sent = end;
            let delta = format.encode(chunk);
            // Record what the client hears: G.711 output is quantised by the encoding.
            lock(&self.record)
                .output_audio
                .extend(chunk.iter().map(|&sample| format.quantise(sample)));
            let produced_ms = (end * 1000 / rate) as u64;
            let (id, item_id) = (active.id.clone(), active.item_id.clone());
            if let Some(item) = self.items.get_mut(&item_id) {
                item.1 = produced_ms;
            }
            // The transcript streams in step with the audio, as the service's does.
            let mut text_end = active.transcript.len() * end / active.audio.len().max(1);
            while !active.transcript.is_char_boundary(text_end) {
                text_end += 1;
            }
            let text = active.transcript[active.transcript_sent..text_end].to_owned();
            active.transcript_sent = text_end;
            self.emit(json!({
                "type": "response.output_audio.delta", "response_id": id, "item_id": item_id,
                "output_index": 0, "content_index": 0, "delta": delta,
            }));
            if !text.is_empty() {
                self.emit(json!({
                    "type": "response.output_audio_transcript.delta", "response_id": id,
                    "item_id": item_id, "output_index": 0, "content_index": 0, "delta": text,
                }));
            }
            return;
        }
        let Some(done) = self.active.take() else {
            return;
        };
        let ids = json!({"response_id": done.id, "item_id": done.item_id,
                         "output_index": 0, "content_index": 0});
        let mut transcript_done = ids.clone();
        transcript_done["type"] = json!("response.output_audio_transcript.done");
        transcript_done["transcript"] = json!(done.transcript);
        self.emit(transcript_done);
        let mut audio_done = ids;
        audio_done["type"] = json!("response.output_audio.done");
        self.emit(audio_done);
        self.finish(&done, "completed", None);
    }

    fn cancel_active(&mut self, reason: &str) {
        if let Some(cancelled) = self.active.take() {
            self.finish(&cancelled, "cancelled", Some(reason));
        }
    }

    fn finish(&mut self, response: &ActiveResponse, status: &str, reason: Option<&str>) {
        lock(&self.record)
            .response_transcripts
            .push(response.transcript.clone());
        let item_status = if status == "completed" {
            "completed"
        } else {
            "incomplete"
        };
        let item = json!({"id": response.item_id, "object": "realtime.item", "type": "message",
                          "status": item_status, "role": "assistant",
                          "content": [{"type": "output_audio", "transcript": response.transcript}]});
        self.emit(
            json!({"type": "response.output_item.done", "response_id": response.id,
                         "output_index": 0, "item": item}),
        );
        let details = reason.map(|reason| json!({"type": status, "reason": reason}));
        // GA-shaped usage: input is all the caller audio the session has had (the service
        // bills the conversation so far with every response), output the audio this response
        // actually sent.
        let input_samples = lock(&self.record).input_audio_8k.len() as u64;
        let input_tokens = (input_samples * AUDIO_TOKENS_PER_SECOND
            / u64::from(self.input_format().rate()))
        .max(1);
        let output_tokens = (response.sent as u64 * AUDIO_TOKENS_PER_SECOND
            / u64::from(self.output_format().rate()))
        .max(1);
        self.emit(json!({
            "type": "response.done",
            "response": {"object": "realtime.response", "id": response.id, "status": status,
                         "status_details": details, "output": [item],
                         "usage": {"total_tokens": input_tokens + output_tokens,
                                   "input_tokens": input_tokens, "output_tokens": output_tokens,
                                   "input_token_details": {"audio_tokens": input_tokens},
                                   "output_token_details": {"audio_tokens": output_tokens}}},
        }));
    }

    fn item_create(&mut self, event: &Map<String, Value>, client_event_id: Option<String>) {
        let Some(Value::Object(item)) = event.get("item") else {
            self.error(
                "invalid_request_error",
                "missing_required_parameter",
                "Missing required parameter: 'item'.",
                client_event_id,
            );
            return;
        };
        let mut item = item.clone();
        lock(&self.record)
            .items_created
            .push(Value::Object(item.clone()));
        match item.get("type").and_then(Value::as_str) {
            Some("message") => {
                // As the service: a user's text is `input_text`, an assistant's `output_text`.
                let role = item.get("role").and_then(Value::as_str).unwrap_or("");
                let expected = if role == "assistant" {
                    "output_text"
                } else {
                    "input_text"
                };
                let well_typed =
                    item.get("content")
                        .and_then(Value::as_array)
                        .is_some_and(|parts| {
                            parts.iter().all(|part| {
                                part.get("type").and_then(Value::as_str) == Some(expected)
                            })
                        });
                if !well_typed {
                    self.error(
                        "invalid_request_error",
                        "invalid_value",
                        "Invalid value for 'item.content[0].type'.",
                        client_event_id,
                    );
                    return;
                }
                let texts: Vec<String> = item
                    .get("content")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter(|part| part.get("type").and_then(Value::as_str) == Some("input_text"))
                    .filter_map(|part| part.get("text").and_then(Value::as_str))
                    .map(str::to_owned)
                    .collect();
                if item.get("role").and_then(Value::as_str) == Some("user") {
                    lock(&self.record).user_texts.extend(texts);
                }
            }
            Some("function_call_output") => {
                let call_id = item.get("call_id").and_then(Value::as_str).unwrap_or("");
                let output = item.get("output").and_then(Value::as_str).unwrap_or("");
                lock(&self.record)
                    .function_outputs
                    .push((call_id.to_owned(), output.to_owned()));
                self.last_tool_output = Some(output.to_owned());
            }
            Some("function_call") => {}
            _ => {
                self.error(
                    "invalid_request_error",
                    "invalid_value",
                    "Invalid value for 'item.type'.",
                    client_event_id,
                );
                return;
            }
        }
        let item_id = match item.get("id").and_then(Value::as_str) {
            Some(id) => id.to_owned(),
            None => self.new_id("item"),
        };
        item.insert("id".to_owned(), json!(item_id));
        item.insert("object".to_owned(), json!("realtime.item"));
        item.insert("status".to_owned(), json!("completed"));
        let previous = self.last_item.replace(item_id.clone());
        self.items.insert(item_id, (false, 0));
        self.emit(json!({
            "type": "conversation.item.created",
            "previous_item_id": previous,
            "item": item,
        }));
    }

    fn truncate(&mut self, event: &Map<String, Value>, client_event_id: Option<String>) {
        let item_id = event.get("item_id").and_then(Value::as_str);
        let audio_end_ms = event.get("audio_end_ms").and_then(Value::as_u64);
        let (Some(item_id), Some(audio_end_ms)) = (item_id, audio_end_ms) else {
            self.error(
                "invalid_request_error",
                "missing_required_parameter",
                "'item_id' and a non-negative integer 'audio_end_ms' are required.",
                client_event_id,
            );
            return;
        };
        let item_id = item_id.to_owned();
        let recorded_ms = u32::try_from(audio_end_ms).unwrap_or(u32::MAX);
        lock(&self.record)
            .truncates
            .push((item_id.clone(), recorded_ms));
        match self.items.get_mut(&item_id) {
            None => {
                let message = format!("Item with item_id '{item_id}' not found.");
                self.error(
                    "invalid_request_error",
                    "item_truncate_invalid_item_id",
                    &message,
                    client_event_id,
                );
            }
            Some((false, _)) => {
                let message = format!("Item '{item_id}' is not an assistant message with audio.");
                self.error(
                    "invalid_request_error",
                    "invalid_value",
                    &message,
                    client_event_id,
                );
            }
            Some((true, produced_ms)) if audio_end_ms > *produced_ms => {
                let message = format!(
                    "Audio content of {produced_ms}ms is already shorter than {audio_end_ms}ms"
                );
                self.error(
                    "invalid_request_error",
                    "invalid_value",
                    &message,
                    client_event_id,
                );
            }
            Some((true, produced_ms)) => {
                *produced_ms = audio_end_ms;
                self.emit(json!({
                    "type": "conversation.item.truncated",
                    "item_id": item_id,
                    "content_index": 0,
                    "audio_end_ms": audio_end_ms,
                }));
            }
        }
    }

    fn delete(&mut self, event: &Map<String, Value>, client_event_id: Option<String>) {
        let Some(item_id) = event
            .get("item_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
        else {
            self.error(
                "invalid_request_error",
                "missing_required_parameter",
                "Missing required parameter: 'item_id'.",
                client_event_id,
            );
            return;
        };
        lock(&self.record).deletes.push(item_id.clone());
        if self.items.remove(&item_id).is_some() {
            self.emit(json!({"type": "conversation.item.deleted", "item_id": item_id}));
        } else {
            let message = format!("Item with item_id '{item_id}' not found.");
            self.error(
                "invalid_request_error",
                "item_delete_invalid_item_id",
                &message,
                client_event_id,
            );
        }
    }

    fn new_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}_mock_{}", self.next_id)
    }

    fn stamp(&mut self, event: &mut Value) {
        self.next_event += 1;
        if let Value::Object(map) = event {
            map.insert(
                "event_id".to_owned(),
                json!(format!("event_mock_{}", self.next_event)),
            );
        }
    }

    fn emit(&mut self, mut event: Value) {
        self.stamp(&mut event);
        self.outbox.push_back(event.to_string());
    }

    fn error(&mut self, kind: &str, code: &str, message: &str, client_event_id: Option<String>) {
        lock(&self.record).errors_sent.push(code.to_owned());
        self.emit(json!({"type": "error", "error": {
            "type": kind, "code": code, "message": message, "param": null,
            "event_id": client_event_id,
        }}));
    }
}

/// Deep-merges `update` into `target`: objects merge key by key, anything else replaces.
fn merge(target: &mut Value, update: &Value) {
    match (target, update) {
        (Value::Object(target), Value::Object(update)) => {
            for (key, value) in update {
                merge(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
        (target, update) => *target = update.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::test_support::{session_update, tone};

    #[test]
    fn sans_io_session_waits_for_the_reply_delay() {
        let record = Arc::new(Mutex::new(MockSessionRecord::default()));
        let mut session = MockSession::new(
            "sess_test".to_owned(),
            MockConfig {
                reply_delay: Duration::from_millis(200),
                ..MockConfig::default()
            },
            record,
        );
        session.handle_text(
            &session_update(json!({"type": "audio/pcmu"})).to_string(),
            Duration::ZERO,
        );
        let mut input = tone(300, 8000, 8000.0);
        input.extend(vec![0; 4000]);
        let append =
            json!({"type": "input_audio_buffer.append", "audio": Format::Pcmu.encode(&input)});
        session.handle_text(&append.to_string(), Duration::from_millis(1000));
        let mut kinds = Vec::new();
        while let Some(frame) = session.poll_transmit(Duration::from_millis(1000)) {
            let event: Value = serde_json::from_str(&frame).expect("json");
            kinds.push(event["type"].as_str().unwrap_or_default().to_owned());
        }
        assert!(kinds.contains(&"input_audio_buffer.speech_stopped".to_owned()));
        assert!(!kinds.contains(&"response.created".to_owned()), "{kinds:?}");
        assert_eq!(session.poll_timeout(), Some(Duration::from_millis(1200)));
        let first = session
            .poll_transmit(Duration::from_millis(1200))
            .expect("reply due");
        assert!(first.contains("\"response.created\""));
    }

    fn drain(session: &mut MockSession, now: Duration) -> Vec<Value> {
        std::iter::from_fn(|| session.poll_transmit(now))
            .map(|frame| serde_json::from_str(&frame).expect("json"))
            .collect()
    }

    #[test]
    fn scripted_tool_call_replaces_the_echo_and_its_output_is_spoken() {
        let record = Arc::new(Mutex::new(MockSessionRecord::default()));
        let mut session = MockSession::new(
            "sess_test".to_owned(),
            MockConfig {
                reply_delay: Duration::ZERO,
                tool_script: vec![MockToolCall {
                    name: "lookup_business_hours".into(),
                    arguments: json!({"day": "monday"}),
                }],
                ..MockConfig::default()
            },
            Arc::clone(&record),
        );
        let mut update = session_update(json!({"type": "audio/pcmu"}));
        update["session"]["tools"] =
            json!([{"type": "function", "name": "lookup_business_hours", "parameters": {}}]);
        session.handle_text(&update.to_string(), Duration::ZERO);
        let mut input = tone(300, 8000, 8000.0);
        input.extend(vec![0; 4000]);
        let append =
            json!({"type": "input_audio_buffer.append", "audio": Format::Pcmu.encode(&input)});
        session.handle_text(&append.to_string(), Duration::from_millis(1000));
        let events = drain(&mut session, Duration::from_millis(1000));
        let done = events
            .iter()
            .find(|e| e["type"] == "response.function_call_arguments.done")
            .expect("a function call instead of an echo");
        assert_eq!(done["name"], "lookup_business_hours");
        assert_eq!(done["arguments"], r#"{"day":"monday"}"#);
        assert!(
            !events
                .iter()
                .any(|e| e["type"] == "response.output_audio.delta")
        );
        let call_id = done["call_id"].as_str().unwrap().to_owned();

        let output = json!({"type": "conversation.item.create",
            "item": {"type": "function_call_output", "call_id": call_id, "output": "open 9-5"}});
        session.handle_text(&output.to_string(), Duration::from_millis(1100));
        session.handle_text(r#"{"type":"response.create"}"#, Duration::from_millis(1100));
        let events = drain(&mut session, Duration::from_millis(1100));
        let transcript = events
            .iter()
            .find(|e| e["type"] == "response.output_audio_transcript.done")
            .expect("the answer is spoken");
        assert_eq!(transcript["transcript"], "(tool said: open 9-5)");
        let record = lock(&record);
        assert_eq!(record.function_outputs, [(call_id, "open 9-5".to_owned())]);
        assert_eq!(record.function_calls.len(), 1);
    }

    #[test]
    fn greeting_transcript_is_the_text_the_bridge_asked_for() {
        let record = Arc::new(Mutex::new(MockSessionRecord::default()));
        let mut session = MockSession::new(
            "sess_test".to_owned(),
            MockConfig {
                greeting_ms: 40,
                ..MockConfig::default()
            },
            Arc::clone(&record),
        );
        let create = json!({"type": "response.create", "response": {"instructions":
            "Be kind.\n\nThe call has just connected. Greet the caller now by saying exactly this: Welcome to Luna!"}});
        session.handle_text(&create.to_string(), Duration::ZERO);
        drain(&mut session, Duration::ZERO);
        assert_eq!(lock(&record).response_transcripts, ["Welcome to Luna!"]);
    }

    #[test]
    fn merge_is_deep() {
        let mut target = json!({"a": {"b": 1, "c": 2}, "d": 3});
        merge(&mut target, &json!({"a": {"b": 5}, "e": null}));
        assert_eq!(target, json!({"a": {"b": 5, "c": 2}, "d": 3, "e": null}));
    }
}
