//! An in-process mock of the OpenAI Realtime API (GA shape) on 127.0.0.1.
//!
//! Owns a tiny realtime "model" used by `voxrelay serve` without an API key, by the demo and by
//! tests: it checks the handshake like the real service (Bearer required, `OpenAI-Beta`
//! answered with `beta_api_shape_disabled` and close 4000), merges `session.update`s, runs an
//! energy VAD over appended audio, and answers each utterance by echoing it back (and
//! `response.create` with a chime). Invariants: every server event carries an `event_id`;
//! audio deltas are sent as fast as the socket takes them, with client messages read between
//! any two deltas so an interruption lands mid-response like on the real service; a truncate
//! past the audio produced for an item is rejected; everything a session saw is recorded in
//! [`MockLog`]. The session logic ([`MockSession`]) is sans-IO and takes time as an input;
//! only the driver touches sockets and the clock.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use crate::codec::g711::{alaw_decode, alaw_encode, mulaw_decode, mulaw_encode};

/// How the mock "model" behaves.
#[derive(Clone, Debug)]
pub struct MockConfig {
    /// The model's think time between the end of an utterance and its reply.
    pub reply_delay: Duration,
    /// A 20 ms window louder than this (RMS, dB full scale) is speech.
    pub vad_threshold_dbfs: f32,
    /// Silence after speech that ends an utterance.
    pub silence_ms: u32,
    /// Length of the chime spoken for `response.create` (the greeting).
    pub greeting_ms: u32,
    /// Audio carried by each `response.output_audio.delta`.
    pub delta_ms: u32,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            reply_delay: Duration::from_millis(200),
            vad_threshold_dbfs: -35.0,
            silence_ms: 500,
            greeting_ms: 1500,
            delta_ms: 100,
        }
    }
}

/// Everything one mock session saw and said.
#[derive(Clone, Debug, Default)]
pub struct MockSessionRecord {
    pub id: String,
    /// The merged session configuration.
    pub session: Value,
    /// Every appended sample, decoded to PCM at `input_rate` (8 kHz for G.711, 24 kHz for PCM).
    pub input_audio_8k: Vec<i16>,
    pub input_rate: u32,
    /// Every sample sent in audio deltas, at `output_rate`.
    pub output_audio: Vec<i16>,
    pub output_rate: u32,
    pub client_event_types: Vec<String>,
    /// `(item_id, audio_end_ms)` of every truncate received, accepted or not.
    pub truncates: Vec<(String, u32)>,
    pub deletes: Vec<String>,
    pub user_texts: Vec<String>,
    /// The `code` of every error event sent.
    pub errors_sent: Vec<String>,
    pub closed: bool,
}

/// What every session of a mock server saw, shared with the test or demo that started it.
#[derive(Debug, Default)]
pub struct MockLog {
    sessions: Mutex<Vec<Arc<Mutex<MockSessionRecord>>>>,
    active: AtomicUsize,
}

impl MockLog {
    /// A snapshot of every session so far, in connection order.
    pub fn sessions(&self) -> Vec<MockSessionRecord> {
        lock(&self.sessions)
            .iter()
            .map(|record| lock(record).clone())
            .collect()
    }

    /// Sessions whose socket is still open.
    pub fn active_sessions(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    fn new_session(&self, id: String) -> Arc<Mutex<MockSessionRecord>> {
        let record = Arc::new(Mutex::new(MockSessionRecord {
            id,
            ..MockSessionRecord::default()
        }));
        lock(&self.sessions).push(record.clone());
        record
    }
}

/// A test peer: a panic elsewhere must not make the log unreadable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Handle to a running mock server. Dropping it shuts the server down.
#[derive(Debug)]
pub struct MockRealtimeServer {
    addr: SocketAddr,
    log: Arc<MockLog>,
    cancel: CancellationToken,
}

impl MockRealtimeServer {
    /// Binds 127.0.0.1 on a free port and spawns the accept loop.
    pub async fn start(config: MockConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let log = Arc::new(MockLog::default());
        let cancel = CancellationToken::new();
        tokio::spawn(accept_loop(listener, config, log.clone(), cancel.clone()));
        Ok(Self { addr, log, cancel })
    }

    pub fn url(&self) -> String {
        format!("ws://{}/v1/realtime?model=gpt-realtime", self.addr)
    }

    pub fn log(&self) -> Arc<MockLog> {
        self.log.clone()
    }

    /// Stops accepting and closes every open session.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }
}

impl Drop for MockRealtimeServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    config: MockConfig,
    log: Arc<MockLog>,
    cancel: CancellationToken,
) {
    let mut next_session = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _peer)) = accepted else {
            continue;
        };
        next_session += 1;
        let session_id = format!("sess_mock_{next_session}");
        tokio::spawn(serve_connection(
            stream,
            session_id,
            config.clone(),
            log.clone(),
            cancel.child_token(),
        ));
    }
}

/// Decrements the active-session gauge however the connection ends.
struct ActiveGuard(Arc<MockLog>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve_connection(
    stream: TcpStream,
    session_id: String,
    config: MockConfig,
    log: Arc<MockLog>,
    cancel: CancellationToken,
) {
    // Best effort: without it the mock is only slower.
    let _ = stream.set_nodelay(true);
    let mut beta_header = false;
    // The callback's signature is tungstenite's; its error is the HTTP response itself.
    #[allow(clippy::result_large_err)]
    let check_handshake = |request: &Request, response: Response| {
        if request.uri().path() != "/v1/realtime" {
            return Err(error_response(StatusCode::NOT_FOUND, "unknown path"));
        }
        let authorized = request
            .headers()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .is_some_and(|key| !key.trim().is_empty());
        if !authorized {
            return Err(error_response(
                StatusCode::UNAUTHORIZED,
                "missing bearer token",
            ));
        }
        beta_header = request.headers().contains_key("openai-beta");
        Ok(response)
    };
    let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, check_handshake).await else {
        return;
    };

    log.active.fetch_add(1, Ordering::SeqCst);
    let _active = ActiveGuard(log.clone());
    let record = log.new_session(session_id.clone());
    let mut session = MockSession::new(session_id, config, record.clone());

    if beta_header {
        let error = session.beta_rejection();
        let _ = socket.send(Message::text(error)).await;
        let _ = socket
            .close(Some(CloseFrame {
                code: CloseCode::from(4000),
                reason: Utf8Bytes::from_static("beta_api_shape_disabled"),
            }))
            .await;
        // Let the client's close reply arrive so the close handshake completes.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while socket.next().await.is_some() {}
        })
        .await;
        lock(&record).closed = true;
        return;
    }

    let started = tokio::time::Instant::now();
    session.open();
    loop {
        if cancel.is_cancelled() {
            let _ = socket.close(None).await;
            break;
        }
        // Client messages already waiting go first, so a barge-in lands between two deltas.
        if let Some(incoming) = socket.next().now_or_never() {
            if !handle_incoming(&mut session, incoming, started.elapsed()) {
                break;
            }
            continue;
        }
        if let Some(frame) = session.poll_transmit(started.elapsed()) {
            if socket.send(Message::text(frame)).await.is_err() {
                break;
            }
            continue;
        }
        let wake_at = session.poll_timeout().map(|due| started + due);
        tokio::select! {
            _ = cancel.cancelled() => {}
            incoming = socket.next() => {
                if !handle_incoming(&mut session, incoming, started.elapsed()) {
                    break;
                }
            }
            _ = sleep_until_some(wake_at) => {}
        }
    }
    lock(&record).closed = true;
}

async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Returns false when the connection is over.
fn handle_incoming(
    session: &mut MockSession,
    incoming: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    now: Duration,
) -> bool {
    match incoming {
        Some(Ok(Message::Text(text))) => {
            session.handle_text(text.as_str(), now);
            true
        }
        Some(Ok(Message::Binary(_))) => {
            session.handle_text("", now);
            true
        }
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => true,
        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => false,
    }
}

fn error_response(status: StatusCode, body: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(body.to_owned()));
    *response.status_mut() = status;
    response
}

/// Audio formats the GA API accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Pcmu,
    Pcma,
    Pcm24k,
}

impl Format {
    fn from_value(format: &Value) -> Option<Self> {
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

    fn rate(self) -> u32 {
        match self {
            Self::Pcmu | Self::Pcma => 8_000,
            Self::Pcm24k => 24_000,
        }
    }

    fn quantise(self, sample: i16) -> i16 {
        match self {
            Self::Pcmu => mulaw_decode(mulaw_encode(sample)),
            Self::Pcma => alaw_decode(alaw_encode(sample)),
            Self::Pcm24k => sample,
        }
    }

    fn encode(self, samples: &[i16]) -> String {
        let bytes: Vec<u8> = match self {
            Self::Pcmu => samples.iter().map(|&sample| mulaw_encode(sample)).collect(),
            Self::Pcma => samples.iter().map(|&sample| alaw_encode(sample)).collect(),
            Self::Pcm24k => samples.iter().flat_map(|s| s.to_le_bytes()).collect(),
        };
        BASE64.encode(bytes)
    }
}

/// Naive rate conversion between 8 and 24 kHz: good enough for a mock's echo.
fn convert_rate(samples: &[i16], from: u32, to: u32) -> Vec<i16> {
    if from == to {
        samples.to_vec()
    } else if to > from {
        let factor = (to / from.max(1)).max(1) as usize;
        samples
            .iter()
            .flat_map(|&sample| std::iter::repeat_n(sample, factor))
            .collect()
    } else {
        let step = (from / to.max(1)).max(1) as usize;
        samples.iter().step_by(step).copied().collect()
    }
}

/// A two-note chime (E5 then A5, bell-like decay) at `rate`.
fn chime(duration_ms: u32, rate: u32) -> Vec<i16> {
    let total = (duration_ms as u64 * rate as u64 / 1000) as usize;
    let half = total.div_ceil(2).max(1);
    (0..total)
        .map(|index| {
            let (frequency, local) = if index < half {
                (659.25, index)
            } else {
                (880.0, index - half)
            };
            let t = local as f32 / rate as f32;
            let attack = (local as f32 / (rate as f32 * 0.01)).min(1.0);
            let envelope = attack * (-3.0 * t).exp();
            let tone = (2.0 * std::f32::consts::PI * frequency * t).sin()
                + 0.3 * (2.0 * std::f32::consts::PI * 2.0 * frequency * t).sin();
            (tone * envelope * 7000.0) as i16
        })
        .collect()
}

fn rms_dbfs(window: &[i16]) -> f32 {
    if window.is_empty() {
        return f32::NEG_INFINITY;
    }
    let energy: f64 = window.iter().map(|&s| (s as f64) * (s as f64)).sum();
    let rms = (energy / window.len() as f64).sqrt();
    (20.0 * (rms / 32768.0).log10()) as f32
}

/// A response being spoken.
struct ActiveResponse {
    id: String,
    item_id: String,
    audio: Vec<i16>,
    sent: usize,
    transcript: String,
}

/// An echo waiting for the model's think time.
struct PendingReply {
    due: Duration,
    audio: Vec<i16>,
    transcript: String,
}

#[derive(Default)]
struct VadState {
    /// Samples not yet forming a whole 20 ms window.
    window: Vec<i16>,
    /// Samples of input analysed so far (whole windows).
    analysed: usize,
    in_speech: bool,
    utterance_start: usize,
    speech_end: usize,
    silence_ms: u32,
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
            config,
            record,
            session,
            outbox: VecDeque::new(),
            next_event: 0,
            next_id: 0,
            items: HashMap::new(),
            last_item: None,
            vad: VadState::default(),
            carry: None,
            pending: None,
            active: None,
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
                self.start_response(reply.audio, reply.transcript);
            }
            return self.outbox.pop_front();
        }
        self.step_response();
        self.outbox.pop_front()
    }

    /// When `poll_transmit` will next have something, if nothing is ready now.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if !self.outbox.is_empty() || self.active.is_some() {
            return Some(Duration::ZERO);
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
                self.vad = VadState::default();
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
                    self.start_response(audio, "(greeting chime)".to_owned());
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
            Format::Pcm24k => {
                let mut joined = Vec::with_capacity(bytes.len() + 1);
                joined.extend(self.carry.take());
                joined.extend_from_slice(&bytes);
                let pairs = joined.chunks_exact(2);
                self.carry = pairs.remainder().first().copied();
                pairs
                    .map(|pair| i16::from_le_bytes([pair[0], pair[1]]))
                    .collect()
            }
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
        let window_len = rate / 50;
        let prefix_ms = self.session["audio"]["input"]["turn_detection"]["prefix_padding_ms"]
            .as_u64()
            .unwrap_or(300) as usize;
        let prefix_samples = prefix_ms * rate / 1000;
        let to_ms = |sample: usize| (sample * 1000 / rate) as u64;
        for &sample in samples {
            self.vad.window.push(sample);
            if self.vad.window.len() < window_len {
                continue;
            }
            let loud = rms_dbfs(&self.vad.window) > self.config.vad_threshold_dbfs;
            self.vad.window.clear();
            let window_start = self.vad.analysed;
            self.vad.analysed += window_len;
            if loud {
                if !self.vad.in_speech {
                    self.vad.in_speech = true;
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
                self.vad.speech_end = self.vad.analysed;
                self.vad.silence_ms = 0;
            } else if self.vad.in_speech {
                self.vad.silence_ms += 20;
                if self.vad.silence_ms >= self.config.silence_ms {
                    self.end_utterance(to_ms(self.vad.speech_end), rate, now);
                }
            }
        }
    }

    fn end_utterance(&mut self, audio_end_ms: u64, rate: usize, now: Duration) {
        self.vad.in_speech = false;
        let item_id = self.vad.item_id.clone();
        let (start, end) = (self.vad.utterance_start, self.vad.speech_end);
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
            self.pending = Some(PendingReply {
                due: now + self.config.reply_delay,
                audio: output,
                transcript,
            });
        }
    }

    fn start_response(&mut self, audio: Vec<i16>, transcript: String) {
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
        });
    }

    /// Queues the next delta of the active response, or its closing events.
    fn step_response(&mut self) {
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
            self.emit(json!({
                "type": "response.output_audio.delta", "response_id": id, "item_id": item_id,
                "output_index": 0, "content_index": 0, "delta": delta,
            }));
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
        self.emit(json!({
            "type": "response.done",
            "response": {"object": "realtime.response", "id": response.id, "status": status,
                         "status_details": details, "output": [item], "usage": null},
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
        match item.get("type").and_then(Value::as_str) {
            Some("message") => {
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
            Some("function_call_output" | "function_call") => {}
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
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;

    type Client = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    const STEP: Duration = Duration::from_secs(5);

    fn fast_config() -> MockConfig {
        MockConfig {
            reply_delay: Duration::from_millis(10),
            ..MockConfig::default()
        }
    }

    async fn dial(
        server: &MockRealtimeServer,
        headers: &[(&'static str, &str)],
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let mut request = server.url().into_client_request()?;
        for (name, value) in headers {
            request
                .headers_mut()
                .insert(*name, HeaderValue::from_str(value).expect("header"));
        }
        let (socket, _) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(request))
            .await
            .expect("handshake in time")?;
        Ok(socket)
    }

    async fn dial_ok(server: &MockRealtimeServer) -> Client {
        let mut client = dial(server, &[("authorization", "Bearer sk-test")])
            .await
            .expect("authorized dial");
        let created = next_event(&mut client).await;
        assert_eq!(created["type"], "session.created");
        client
    }

    async fn next_event(client: &mut Client) -> Value {
        loop {
            let message = tokio::time::timeout(STEP, client.next())
                .await
                .expect("event in time")
                .expect("socket open")
                .expect("no socket error");
            if let Message::Text(text) = message {
                let event: Value = serde_json::from_str(text.as_str()).expect("server JSON");
                assert!(event["event_id"].is_string(), "event_id missing: {event}");
                return event;
            }
        }
    }

    /// Events up to and including the first of type `until`.
    async fn events_until(client: &mut Client, until: &str) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            let event = next_event(client).await;
            let done = event["type"] == until;
            events.push(event);
            if done {
                return events;
            }
        }
    }

    async fn send(client: &mut Client, event: Value) {
        client
            .send(Message::text(event.to_string()))
            .await
            .expect("send");
    }

    fn session_update(format: Value) -> Value {
        json!({"type": "session.update", "session": {"type": "realtime",
            "audio": {"input": {"format": format}, "output": {"format": format}}}})
    }

    fn tone(ms: u32, rate: u32, amplitude: f32) -> Vec<i16> {
        let count = (ms * rate / 1000) as usize;
        (0..count)
            .map(|n| {
                let t = n as f32 / rate as f32;
                (amplitude * (2.0 * std::f32::consts::PI * 440.0 * t).sin()) as i16
            })
            .collect()
    }

    fn types(events: &[Value]) -> Vec<&str> {
        events.iter().filter_map(|e| e["type"].as_str()).collect()
    }

    fn decode_deltas(events: &[Value], format: Format) -> Vec<i16> {
        events
            .iter()
            .filter(|e| e["type"] == "response.output_audio.delta")
            .flat_map(|e| {
                let bytes = BASE64
                    .decode(e["delta"].as_str().expect("delta"))
                    .expect("base64");
                match format {
                    Format::Pcmu => bytes.iter().map(|&b| mulaw_decode(b)).collect::<Vec<_>>(),
                    Format::Pcma => bytes.iter().map(|&b| alaw_decode(b)).collect(),
                    Format::Pcm24k => bytes
                        .chunks_exact(2)
                        .map(|p| i16::from_le_bytes([p[0], p[1]]))
                        .collect(),
                }
            })
            .collect()
    }

    #[tokio::test]
    async fn handshake_requires_a_bearer_token() {
        let server = MockRealtimeServer::start(fast_config())
            .await
            .expect("start");
        for headers in [
            &[][..],
            &[("authorization", "Bearer ")][..],
            &[("authorization", "Basic abc")][..],
        ] {
            match dial(&server, headers).await {
                Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                    assert_eq!(response.status(), StatusCode::UNAUTHORIZED)
                }
                other => panic!("{headers:?}: expected 401, got {:?}", other.map(|_| ())),
            }
        }
        let client = dial_ok(&server).await;
        assert_eq!(server.log().active_sessions(), 1);
        assert_eq!(server.log().sessions().len(), 1);
        drop(client);
        server.shutdown();
        assert!(
            tokio::time::timeout(STEP, async {
                while server.log().active_sessions() > 0 {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .is_ok(),
            "session ends after the client leaves"
        );
        assert!(server.log().sessions()[0].closed);
    }

    #[tokio::test]
    async fn beta_header_gets_the_error_and_close_4000() {
        let server = MockRealtimeServer::start(fast_config())
            .await
            .expect("start");
        let mut client = dial(
            &server,
            &[
                ("authorization", "Bearer sk-test"),
                ("openai-beta", "realtime=v1"),
            ],
        )
        .await
        .expect("the upgrade itself succeeds");
        let error = next_event(&mut client).await;
        assert_eq!(error["type"], "error");
        assert_eq!(error["error"]["code"], "beta_api_shape_disabled");
        let close = tokio::time::timeout(STEP, client.next())
            .await
            .expect("close in time");
        match close {
            Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 4000),
            other => panic!("expected close 4000, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn session_update_round_trip_and_rejections() {
        let server = MockRealtimeServer::start(fast_config())
            .await
            .expect("start");
        let mut client = dial_ok(&server).await;
        let fixture = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/openai-realtime-ga/client-events.jsonl"
        ))
        .lines()
        .next()
        .expect("session.update line");
        client.send(Message::text(fixture)).await.expect("send");
        let updated = next_event(&mut client).await;
        assert_eq!(updated["type"], "session.updated");
        let session = &updated["session"];
        assert_eq!(session["instructions"], "You are a helpful receptionist.");
        assert_eq!(session["audio"]["input"]["format"]["type"], "audio/pcmu");
        assert_eq!(session["audio"]["output"]["voice"], "marin");
        assert_eq!(
            session["audio"]["input"]["turn_detection"]["silence_duration_ms"],
            500
        );
        // Untouched defaults survive the merge.
        assert_eq!(session["object"], "realtime.session");
        assert_eq!(session["audio"]["output"]["speed"], 1);

        send(
            &mut client,
            json!({"type": "session.update", "session": {"instructions": "x"}}),
        )
        .await;
        let missing = next_event(&mut client).await;
        assert_eq!(missing["type"], "error");
        assert_eq!(missing["error"]["code"], "missing_required_parameter");

        send(&mut client, json!({"type": "session.update", "session": {"type": "realtime", "input_audio_format": "g711_ulaw"}})).await;
        assert_eq!(
            next_event(&mut client).await["error"]["code"],
            "unknown_parameter"
        );

        client.send(Message::text("not json")).await.expect("send");
        assert_eq!(
            next_event(&mut client).await["error"]["code"],
            "invalid_event"
        );
        send(
            &mut client,
            json!({"type": "nonsense.event", "event_id": "evt_1"}),
        )
        .await;
        let unknown = next_event(&mut client).await;
        assert_eq!(unknown["error"]["code"], "invalid_event");
        assert_eq!(unknown["error"]["event_id"], "evt_1");
        send(&mut client, json!({"type": "response.cancel"})).await;
        assert_eq!(
            next_event(&mut client).await["error"]["code"],
            "response_cancel_not_active"
        );

        let record = &server.log().sessions()[0];
        assert_eq!(
            record.session["instructions"],
            "You are a helpful receptionist."
        );
        assert_eq!((record.input_rate, record.output_rate), (8000, 8000));
        assert_eq!(
            record.errors_sent,
            [
                "missing_required_parameter",
                "unknown_parameter",
                "invalid_event",
                "invalid_event",
                "response_cancel_not_active"
            ]
        );
        assert_eq!(record.client_event_types[0], "session.update");
    }

    /// Sends `silence, speech, silence` in 20 ms appends and checks the VAD events and the echo.
    async fn speech_is_echoed(format_json: Value, format: Format) {
        let server = MockRealtimeServer::start(fast_config())
            .await
            .expect("start");
        let mut client = dial_ok(&server).await;
        send(&mut client, session_update(format_json)).await;
        assert_eq!(next_event(&mut client).await["type"], "session.updated");

        let rate = format.rate();
        let mut input: Vec<i16> = vec![0; (400 * rate / 1000) as usize];
        input.extend(tone(600, rate, 8000.0));
        input.extend(vec![0; (700 * rate / 1000) as usize]);
        let window = (rate / 50) as usize;
        for frame in input.chunks(window) {
            let audio = format.encode(frame);
            send(
                &mut client,
                json!({"type": "input_audio_buffer.append", "audio": audio}),
            )
            .await;
        }

        let events = events_until(&mut client, "response.done").await;
        let kinds = types(&events);
        let position = |kind: &str| kinds.iter().position(|k| *k == kind).expect(kind);
        assert!(
            position("input_audio_buffer.speech_started")
                < position("input_audio_buffer.speech_stopped")
        );
        assert!(
            position("input_audio_buffer.speech_stopped")
                < position("input_audio_buffer.committed")
        );
        assert!(
            position("conversation.item.input_audio_transcription.completed")
                < position("response.created")
        );
        assert!(
            position("response.output_audio_transcript.done")
                < position("response.output_audio.done")
        );
        let started = &events[position("input_audio_buffer.speech_started")];
        // Onset at 400 ms, minus the default 300 ms prefix padding.
        assert_eq!(started["audio_start_ms"], 100);
        assert_eq!(
            events[position("input_audio_buffer.speech_stopped")]["audio_end_ms"],
            1000
        );
        let done = events.last().expect("response.done");
        assert_eq!(done["response"]["status"], "completed");

        let echoed = decode_deltas(&events, format);
        let start = (100 * rate / 1000) as usize;
        let end = (1000 * rate / 1000) as usize;
        let sent: Vec<i16> = match format {
            // μ-law is lossy: compare with what the server could have decoded.
            Format::Pcmu | Format::Pcma => input[start..end]
                .iter()
                .map(|&s| format.quantise(s))
                .collect(),
            Format::Pcm24k => input[start..end].to_vec(),
        };
        assert_eq!(echoed.len(), sent.len());
        assert!(echoed == sent, "echo differs from the utterance");
        let deltas = kinds
            .iter()
            .filter(|k| **k == "response.output_audio.delta")
            .count();
        assert_eq!(deltas, 9, "900 ms in 100 ms deltas");

        let record = &server.log().sessions()[0];
        assert_eq!(record.input_audio_8k.len(), input.len());
        assert_eq!(record.input_rate, rate);
        assert!(record.output_audio == echoed, "the log holds what was sent");
    }

    #[tokio::test]
    async fn speech_then_silence_is_echoed_in_pcmu() {
        speech_is_echoed(json!({"type": "audio/pcmu"}), Format::Pcmu).await;
    }

    #[tokio::test]
    async fn speech_then_silence_is_echoed_in_pcm24k() {
        speech_is_echoed(json!({"type": "audio/pcm", "rate": 24000}), Format::Pcm24k).await;
    }

    #[tokio::test]
    async fn greeting_truncate_and_delete() {
        let server = MockRealtimeServer::start(fast_config())
            .await
            .expect("start");
        let mut client = dial_ok(&server).await;
        send(&mut client, session_update(json!({"type": "audio/pcmu"}))).await;
        assert_eq!(next_event(&mut client).await["type"], "session.updated");

        send(&mut client, json!({"type": "response.create"})).await;
        let events = events_until(&mut client, "response.done").await;
        let chime = decode_deltas(&events, Format::Pcmu);
        assert_eq!(chime.len(), 1500 * 8, "greeting_ms of audio");
        assert!(
            rms_dbfs(&chime) > -30.0,
            "the greeting is audible, not silence"
        );
        let added = events
            .iter()
            .find(|e| e["type"] == "response.output_item.added")
            .expect("output item");
        let item_id = added["item"]["id"].as_str().expect("item id").to_owned();

        send(&mut client, json!({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 1501})).await;
        let rejected = next_event(&mut client).await;
        assert_eq!(rejected["type"], "error");
        assert_eq!(rejected["error"]["type"], "invalid_request_error");
        send(&mut client, json!({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 640})).await;
        let truncated = next_event(&mut client).await;
        assert_eq!(truncated["type"], "conversation.item.truncated");
        assert_eq!(truncated["audio_end_ms"], 640);
        // The item is now 640 ms long: past that is rejected again.
        send(&mut client, json!({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 700})).await;
        assert_eq!(next_event(&mut client).await["type"], "error");

        send(
            &mut client,
            json!({"type": "conversation.item.delete", "item_id": item_id}),
        )
        .await;
        assert_eq!(
            next_event(&mut client).await["type"],
            "conversation.item.deleted"
        );
        send(
            &mut client,
            json!({"type": "conversation.item.delete", "item_id": item_id}),
        )
        .await;
        assert_eq!(
            next_event(&mut client).await["error"]["code"],
            "item_delete_invalid_item_id"
        );

        send(&mut client, json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "DTMF 5"}]}})).await;
        let created = next_event(&mut client).await;
        assert_eq!(created["type"], "conversation.item.created");
        assert!(created["item"]["id"].is_string());

        let record = &server.log().sessions()[0];
        assert_eq!(
            record.truncates,
            [
                (item_id.clone(), 1501),
                (item_id.clone(), 640),
                (item_id.clone(), 700)
            ]
        );
        assert_eq!(record.deletes, [item_id.clone(), item_id]);
        assert_eq!(record.user_texts, ["DTMF 5"]);
        assert!(record.output_audio == chime, "the log holds what was sent");
    }

    #[tokio::test]
    async fn speech_during_a_response_cancels_it() {
        let server = MockRealtimeServer::start(MockConfig {
            greeting_ms: 20_000,
            delta_ms: 20,
            ..fast_config()
        })
        .await
        .expect("start");
        let mut client = dial_ok(&server).await;
        send(&mut client, session_update(json!({"type": "audio/pcmu"}))).await;
        assert_eq!(next_event(&mut client).await["type"], "session.updated");

        let loud = Format::Pcmu.encode(&tone(100, 8000, 12000.0));
        client
            .feed(Message::text(
                json!({"type": "response.create"}).to_string(),
            ))
            .await
            .expect("feed");
        client
            .feed(Message::text(
                json!({"type": "input_audio_buffer.append", "audio": loud}).to_string(),
            ))
            .await
            .expect("feed");
        client.flush().await.expect("flush");

        let events = events_until(&mut client, "response.done").await;
        let kinds = types(&events);
        let started = kinds
            .iter()
            .position(|k| *k == "input_audio_buffer.speech_started")
            .expect("speech_started");
        assert!(
            started < kinds.len() - 1,
            "speech_started before response.done"
        );
        let done = events.last().expect("done");
        assert_eq!(done["response"]["status"], "cancelled");
        assert_eq!(
            done["response"]["status_details"]["reason"],
            "turn_detected"
        );
        let deltas = kinds
            .iter()
            .filter(|k| **k == "response.output_audio.delta")
            .count();
        assert!(
            deltas < 1000,
            "the response stopped early ({deltas} deltas)"
        );
    }

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

    #[test]
    fn rate_conversion_and_merge() {
        assert_eq!(convert_rate(&[1, 2], 8000, 24000), [1, 1, 1, 2, 2, 2]);
        assert_eq!(convert_rate(&[1, 1, 1, 2, 2, 2], 24000, 8000), [1, 2]);
        let mut target = json!({"a": {"b": 1, "c": 2}, "d": 3});
        merge(&mut target, &json!({"a": {"b": 5}, "e": null}));
        assert_eq!(target, json!({"a": {"b": 5, "c": 2}, "d": 3, "e": null}));
    }
}
