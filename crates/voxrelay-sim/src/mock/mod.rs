//! An in-process mock realtime model on 127.0.0.1 that speaks both OpenAI Realtime (GA shape,
//! path `/v1/realtime`) and Gemini Live (`BidiGenerateContent`, path [`GEMINI_PATH`]), chosen by
//! the request path.
//!
//! Owns a tiny realtime "model" used by `voxrelay serve` without an API key, by the demo, the
//! bench and by tests, and the driver that runs it on sockets. Both protocols check the
//! handshake like the real services (OpenAI: a Bearer key, and `OpenAI-Beta` answered with
//! `beta_api_shape_disabled` and close 4000; Gemini: `x-goog-api-key` or `?key=`, else 401), run
//! an energy VAD over appended audio, and answer each utterance by echoing it back (a greeting
//! request with a chime). The OpenAI session ([`MockSession`]) reports errors as events; the
//! Gemini one ([`GeminiMockSession`]) closes the socket as Gemini does, issues resumption
//! handles that stay valid for the server's life ([`GeminiResumptions`]), and can be told to
//! cancel its tool calls or send `goAway`. Invariants: audio is sent as fast as the socket takes
//! it (or paced, [`MockConfig::pace_deltas`]), with client messages read between any two
//! messages so an interruption lands mid-response like on the real services; sessions are
//! numbered across both protocols, and the same [`MockConfig`], faults ([`MockFault`],
//! [`MockRealtimeServer::fail_next_session`]) and [`MockLog`] apply to both. The session logic is
//! sans-IO and takes time as an input; only the driver touches sockets and the clock. For fault
//! tests one session can be told to misbehave ([`MockFault`]): reset its TCP connection
//! mid-response, stop reading, or send a fragmented message that never ends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

mod gemini;
mod session;
mod voice;

pub use gemini::{GeminiMockSession, GeminiResumptions, GeminiTransmit};
pub use session::MockSession;

/// The Gemini Live endpoint's path, which selects the Gemini protocol.
pub const GEMINI_PATH: &str =
    "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent";

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
    /// Functions the mock calls instead of echoing, one per caller utterance in order, each
    /// only if the session's `tools` offer it (otherwise that utterance is echoed as usual).
    pub tool_script: Vec<MockToolCall>,
    /// Held before answering each WebSocket handshake: stands in for the real service's TLS
    /// and handshake round trips, so pre-warm can be measured on loopback.
    pub connect_delay: Duration,
    /// Send each response's audio no faster than it plays (a slow model), so a fault can
    /// land while the caller is still hearing the response; by default audio goes as fast as
    /// the socket takes it, as the real service sends it.
    pub pace_deltas: bool,
    /// One session that misbehaves, for fault tests; every other session is well behaved.
    pub fault: Option<MockFault>,
    /// Gemini only: cancel every tool call (`toolCallCancellation`) 100 ms after making it,
    /// and ignore a late `toolResponse` for it.
    pub gemini_cancel_tools: bool,
    /// Gemini only: this long after `setupComplete`, send `goAway` and close the socket (1000)
    /// [`MockConfig::go_away_grace`] later.
    pub go_away_after: Option<Duration>,
    /// Gemini only: the `timeLeft` a `goAway` announces, and keeps.
    pub go_away_grace: Duration,
}

/// A misbehaving session: the `session`-th connection (counting from 1) does `kind`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MockFault {
    pub session: u64,
    pub kind: MockFaultKind,
}

impl MockFault {
    /// The first `count` handshakes refused with HTTP `status` (429: rate limited).
    pub fn refuse_first(count: u64, status: u16) -> Self {
        Self {
            session: 1,
            kind: MockFaultKind::RejectHandshakes { status, count },
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MockFaultKind {
    /// After sending this many audio deltas, reset the TCP connection (RST, no close frame).
    ResetAfterDeltas(u32),
    /// This long after the socket opened, reset the TCP connection, whatever is under way.
    ResetAt(Duration),
    /// Once the session is configured (`session.updated` sent), never read (nor write) again,
    /// holding the socket open.
    StopReading,
    /// Refuse the WebSocket handshake with this HTTP status (429: rate limited; 5xx) for
    /// this session and the `count - 1` after it.
    RejectHandshakes { status: u16, count: u64 },
    /// Once the session is configured, send one text message as a first frame and continuation
    /// frames of `fragment` bytes, up to `total` bytes, never the final frame; then wait for
    /// the peer to close. How much went out is in [`MockSessionRecord::fault_bytes_sent`].
    EndlessFragments { fragment: usize, total: usize },
}

/// A function call the mock makes in place of an echo.
#[derive(Clone, Debug, PartialEq)]
pub struct MockToolCall {
    pub name: String,
    pub arguments: Value,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            reply_delay: Duration::from_millis(200),
            vad_threshold_dbfs: -35.0,
            silence_ms: 500,
            greeting_ms: 1500,
            delta_ms: 100,
            tool_script: Vec::new(),
            connect_delay: Duration::ZERO,
            pace_deltas: false,
            fault: None,
            gemini_cancel_tools: false,
            go_away_after: None,
            go_away_grace: Duration::from_secs(5),
        }
    }
}

/// Everything one mock session saw and said.
#[derive(Clone, Debug, Default)]
pub struct MockSessionRecord {
    pub id: String,
    /// Which protocol the session spoke: `"openai"` or `"gemini"`.
    pub provider: &'static str,
    /// The merged session configuration (OpenAI), or the `setup` message's body (Gemini).
    pub session: Value,
    /// Every appended sample, decoded to PCM at `input_rate` (8 kHz for G.711, 24 kHz for PCM;
    /// 16 kHz for Gemini).
    pub input_audio_8k: Vec<i16>,
    pub input_rate: u32,
    /// Every sample sent in audio deltas, at `output_rate`.
    pub output_audio: Vec<i16>,
    pub output_rate: u32,
    /// Each client message's `type` (OpenAI) or its one top-level field (Gemini: `setup`,
    /// `realtimeInput`, `clientContent`, `toolResponse`).
    pub client_event_types: Vec<String>,
    /// `(item_id, audio_end_ms)` of every truncate received, accepted or not.
    pub truncates: Vec<(String, u32)>,
    pub deletes: Vec<String>,
    /// The text of every user message (Gemini: of every user-role `clientContent` turn).
    pub user_texts: Vec<String>,
    /// `(name, arguments)` of every function call the mock made.
    pub function_calls: Vec<(String, Value)>,
    /// `(call_id, output)` of every `function_call_output` item received (Gemini: `(id,
    /// response JSON text)` of every function response, a late one for a cancelled call too).
    pub function_outputs: Vec<(String, String)>,
    /// Every item created by `conversation.item.create`, as sent (a replayed conversation);
    /// Gemini: every `clientContent` turn, as sent.
    pub items_created: Vec<Value>,
    /// The transcript of every response the mock completed or cancelled, in order.
    pub response_transcripts: Vec<String>,
    /// The `code` of every error event sent.
    pub errors_sent: Vec<String>,
    /// Bytes of an [`MockFaultKind::EndlessFragments`] message the socket took.
    pub fault_bytes_sent: usize,
    /// Gemini: the resumption handle the session's setup resumed from.
    pub resumed_from: Option<String>,
    /// Gemini: model turns stopped by caller speech (`interrupted`).
    pub interruptions: u32,
    /// Gemini: `goAway` messages sent.
    pub go_aways_sent: u32,
    /// Gemini: the ids of tool calls the mock cancelled.
    pub tool_cancellations: Vec<String>,
    /// The close code of a close the mock initiated (not one the client did).
    pub close_code: Option<u16>,
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

    fn new_session(&self, id: String, provider: &'static str) -> Arc<Mutex<MockSessionRecord>> {
        let record = Arc::new(Mutex::new(MockSessionRecord {
            id,
            provider,
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
    next_fault: Arc<Mutex<Option<MockFaultKind>>>,
    resumptions: Arc<GeminiResumptions>,
}

impl MockRealtimeServer {
    /// Binds 127.0.0.1 on a free port and spawns the accept loop.
    pub async fn start(config: MockConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let log = Arc::new(MockLog::default());
        let cancel = CancellationToken::new();
        let next_fault = Arc::new(Mutex::new(None));
        let resumptions = Arc::new(GeminiResumptions::default());
        tokio::spawn(accept_loop(
            listener,
            config,
            Shared {
                log: log.clone(),
                next_fault: Arc::clone(&next_fault),
                resumptions: Arc::clone(&resumptions),
            },
            cancel.clone(),
        ));
        Ok(Self {
            addr,
            log,
            cancel,
            next_fault,
            resumptions,
        })
    }

    /// The next session to connect misbehaves so (the demo's dropped call), whatever
    /// [`MockConfig::fault`] says.
    pub fn fail_next_session(&self, kind: MockFaultKind) {
        *lock(&self.next_fault) = Some(kind);
    }

    /// The OpenAI Realtime endpoint.
    pub fn url(&self) -> String {
        format!("ws://{}/v1/realtime?model=gpt-realtime", self.addr)
    }

    /// The Gemini Live endpoint.
    pub fn gemini_url(&self) -> String {
        format!("ws://{}{GEMINI_PATH}", self.addr)
    }

    /// Every Gemini resumption handle this server issued.
    pub fn gemini_resumptions(&self) -> Arc<GeminiResumptions> {
        Arc::clone(&self.resumptions)
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

/// What every connection of one server shares.
#[derive(Clone)]
struct Shared {
    log: Arc<MockLog>,
    next_fault: Arc<Mutex<Option<MockFaultKind>>>,
    resumptions: Arc<GeminiResumptions>,
}

async fn accept_loop(
    listener: TcpListener,
    config: MockConfig,
    shared: Shared,
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
        let fault = config
            .fault
            .as_ref()
            .filter(|fault| match fault.kind {
                MockFaultKind::RejectHandshakes { count, .. } => {
                    (fault.session..fault.session.saturating_add(count)).contains(&next_session)
                }
                _ => fault.session == next_session,
            })
            .map(|fault| fault.kind.clone());
        let fault = lock(&shared.next_fault).take().or(fault);
        tokio::spawn(serve_connection(
            stream,
            (next_session, session_id),
            config.clone(),
            fault,
            shared.clone(),
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

/// Which protocol a connection speaks, chosen by its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    OpenAi,
    Gemini,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::OpenAi => "openai",
            Protocol::Gemini => "gemini",
        }
    }
}

/// A session of either protocol, as the driver sees it.
enum DriverSession {
    OpenAi(MockSession),
    Gemini(GeminiMockSession),
}

/// What the driver sends next.
enum Outgoing {
    /// A text frame; `configured` marks the end of the session's setup and `delta` a message
    /// carrying model audio, which the fault hooks count on.
    Text {
        text: String,
        configured: bool,
        delta: bool,
    },
    /// A close the mock initiates; nothing follows.
    Close { code: u16, reason: String },
}

impl DriverSession {
    fn open(&mut self) {
        match self {
            DriverSession::OpenAi(session) => session.open(),
            DriverSession::Gemini(session) => session.open(),
        }
    }

    fn handle_text(&mut self, text: &str, now: Duration) {
        match self {
            DriverSession::OpenAi(session) => session.handle_text(text, now),
            DriverSession::Gemini(session) => session.handle_text(text, now),
        }
    }

    /// OpenAI's protocol is text only (a binary frame is an invalid event); Gemini's JSON may
    /// come in either kind of frame.
    fn handle_binary(&mut self, bytes: &[u8], now: Duration) {
        match self {
            DriverSession::OpenAi(session) => session.handle_text("", now),
            DriverSession::Gemini(session) => {
                session.handle_text(&String::from_utf8_lossy(bytes), now)
            }
        }
    }

    fn poll_transmit(&mut self, now: Duration) -> Option<Outgoing> {
        match self {
            DriverSession::OpenAi(session) => {
                let text = session.poll_transmit(now)?;
                Some(Outgoing::Text {
                    configured: text.contains(r#""type":"session.updated""#),
                    delta: text.contains(r#""type":"response.output_audio.delta""#),
                    text,
                })
            }
            DriverSession::Gemini(session) => match session.poll_transmit(now)? {
                GeminiTransmit::Text(text) => Some(Outgoing::Text {
                    configured: text.starts_with(r#"{"setupComplete""#),
                    delta: text.contains(r#""inlineData""#),
                    text,
                }),
                GeminiTransmit::Close { code, reason } => Some(Outgoing::Close { code, reason }),
            },
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        match self {
            DriverSession::OpenAi(session) => session.poll_timeout(),
            DriverSession::Gemini(session) => session.poll_timeout(),
        }
    }
}

/// Sends a close frame and lets the client's close reply arrive, so the close handshake
/// completes (bounded: a client that never answers is left after a second).
async fn close_socket(
    socket: &mut tokio_tungstenite::WebSocketStream<TcpStream>,
    code: u16,
    reason: &str,
) {
    // A close frame's reason is at most 123 bytes.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let _ = socket
        .close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: Utf8Bytes::from(&reason[..end]),
        }))
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while socket.next().await.is_some() {}
    })
    .await;
}

async fn serve_connection(
    stream: TcpStream,
    (number, session_id): (u64, String),
    config: MockConfig,
    fault: Option<MockFaultKind>,
    shared: Shared,
    cancel: CancellationToken,
) {
    // Best effort: without it the mock is only slower.
    let _ = stream.set_nodelay(true);
    if !config.connect_delay.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(config.connect_delay) => {}
            () = cancel.cancelled() => return,
        }
    }
    let mut beta_header = false;
    let mut protocol = Protocol::OpenAi;
    let refuse_with = match fault {
        Some(MockFaultKind::RejectHandshakes { status, .. }) => Some(status),
        _ => None,
    };
    // The callback's signature is tungstenite's; its error is the HTTP response itself.
    #[allow(clippy::result_large_err)]
    let check_handshake = |request: &Request, response: Response| {
        if let Some(status) = refuse_with {
            let mut refusal = ErrorResponse::new(Some("refused by the mock's fault".to_owned()));
            *refusal.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
            return Err(refusal);
        }
        if request.uri().path() == GEMINI_PATH {
            check_gemini_handshake(request)?;
            protocol = Protocol::Gemini;
        } else {
            check_realtime_handshake(request)?;
            beta_header = request.headers().contains_key("openai-beta");
        }
        Ok(response)
    };
    let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, check_handshake).await else {
        return;
    };

    let log = &shared.log;
    log.active.fetch_add(1, Ordering::SeqCst);
    let _active = ActiveGuard(log.clone());
    let record = log.new_session(session_id.clone(), protocol.name());
    let mut session = match protocol {
        Protocol::OpenAi => {
            let mut session = MockSession::new(session_id, config, record.clone());
            if beta_header {
                let error = session.beta_rejection();
                let _ = socket.send(Message::text(error)).await;
                lock(&record).close_code = Some(4000);
                close_socket(&mut socket, 4000, "beta_api_shape_disabled").await;
                lock(&record).closed = true;
                return;
            }
            DriverSession::OpenAi(session)
        }
        Protocol::Gemini => DriverSession::Gemini(GeminiMockSession::new(
            number,
            session_id,
            config,
            record.clone(),
            Arc::clone(&shared.resumptions),
        )),
    };

    let started = tokio::time::Instant::now();
    session.open();
    let mut deltas_sent = 0u32;
    let reset_at = match fault {
        Some(MockFaultKind::ResetAt(after)) => Some(started + after),
        _ => None,
    };
    loop {
        if cancel.is_cancelled() {
            let _ = socket.close(None).await;
            break;
        }
        if reset_at.is_some_and(|at| tokio::time::Instant::now() >= at) {
            // An abortive close: the peer sees a reset, not a close frame.
            let _ = socket.get_ref().set_zero_linger();
            break;
        }
        // Client messages already waiting go first, so a barge-in lands between two deltas.
        if let Some(incoming) = socket.next().now_or_never() {
            if !handle_incoming(&mut session, incoming, started.elapsed()) {
                break;
            }
            continue;
        }
        if let Some(outgoing) = session.poll_transmit(started.elapsed()) {
            let (frame, configured, delta) = match outgoing {
                Outgoing::Text {
                    text,
                    configured,
                    delta,
                } => (text, configured, delta),
                Outgoing::Close { code, reason } => {
                    close_socket(&mut socket, code, &reason).await;
                    break;
                }
            };
            if socket.send(Message::text(frame)).await.is_err() {
                break;
            }
            deltas_sent += u32::from(delta);
            match &fault {
                Some(MockFaultKind::ResetAfterDeltas(after)) if deltas_sent >= *after => {
                    // An abortive close: the peer sees a reset, not a close frame.
                    let _ = socket.get_ref().set_zero_linger();
                    break;
                }
                Some(MockFaultKind::StopReading) if configured => {
                    cancel.cancelled().await;
                    break;
                }
                Some(MockFaultKind::EndlessFragments { fragment, total }) if configured => {
                    let sent = send_endless_fragments(&mut socket, *fragment, *total).await;
                    lock(&record).fault_bytes_sent = sent;
                    // Until the peer closes (or the mock stops).
                    tokio::select! {
                        () = cancel.cancelled() => {}
                        () = async { while let Some(Ok(_)) = socket.next().await {} } => {}
                    }
                    break;
                }
                _ => {}
            }
            continue;
        }
        let wake_at = match (session.poll_timeout().map(|due| started + due), reset_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
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

/// Sends a text message's first frame and continuation frames of `fragment` bytes, never the
/// final one, until `total` bytes are out or the socket fails; returns the bytes sent.
async fn send_endless_fragments(
    socket: &mut tokio_tungstenite::WebSocketStream<TcpStream>,
    fragment: usize,
    total: usize,
) -> usize {
    let chunk = bytes::Bytes::from(vec![b'x'; fragment.max(1)]);
    let mut sent = 0;
    let mut opcode = OpCode::Data(Data::Text);
    while sent < total {
        let frame = Frame::message(chunk.clone(), opcode, false);
        if socket.send(Message::Frame(frame)).await.is_err() {
            break;
        }
        sent += chunk.len();
        opcode = OpCode::Data(Data::Continue);
    }
    sent
}

async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Returns false when the connection is over.
fn handle_incoming(
    session: &mut DriverSession,
    incoming: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    now: Duration,
) -> bool {
    match incoming {
        Some(Ok(Message::Text(text))) => {
            session.handle_text(text.as_str(), now);
            true
        }
        Some(Ok(Message::Binary(bytes))) => {
            session.handle_binary(&bytes, now);
            true
        }
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => true,
        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => false,
    }
}

/// What the real endpoint checks at the handshake: the path, and a non-empty bearer key.
/// Shared by every test peer that plays the model (this mock and the benchmark's echo model).
// tungstenite's callback error is the HTTP response itself.
#[allow(clippy::result_large_err)]
pub(crate) fn check_realtime_handshake(request: &Request) -> Result<(), ErrorResponse> {
    if request.uri().path() != "/v1/realtime" {
        return Err(error_response(StatusCode::NOT_FOUND, "unknown path"));
    }
    let authorized = request
        .headers()
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .is_some_and(|key| !key.trim().is_empty());
    if authorized {
        Ok(())
    } else {
        Err(error_response(
            StatusCode::UNAUTHORIZED,
            "missing bearer token",
        ))
    }
}

/// What the Gemini Live endpoint checks at the handshake: a non-empty API key, in the
/// `x-goog-api-key` header or the `key` query parameter. Shared with the benchmark's echo model.
// tungstenite's callback error is the HTTP response itself.
#[allow(clippy::result_large_err)]
pub(crate) fn check_gemini_handshake(request: &Request) -> Result<(), ErrorResponse> {
    let header_key = request
        .headers()
        .get("x-goog-api-key")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|key| !key.trim().is_empty());
    let query_key = request.uri().query().is_some_and(|query| {
        url::form_urlencoded::parse(query.as_bytes())
            .any(|(name, value)| name == "key" && !value.trim().is_empty())
    });
    if header_key || query_key {
        Ok(())
    } else {
        Err(error_response(StatusCode::UNAUTHORIZED, "missing API key"))
    }
}

fn error_response(status: StatusCode, body: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(body.to_owned()));
    *response.status_mut() = status;
    response
}

/// Builders shared by this module's and `session`'s tests.
#[cfg(test)]
pub(crate) mod test_support {
    use serde_json::{Value, json};

    pub(crate) fn session_update(format: Value) -> Value {
        json!({"type": "session.update", "session": {"type": "realtime",
            "audio": {"input": {"format": format}, "output": {"format": format}}}})
    }

    pub(crate) fn tone(ms: u32, rate: u32, amplitude: f32) -> Vec<i16> {
        let count = (ms * rate / 1000) as usize;
        (0..count)
            .map(|n| {
                let t = n as f32 / rate as f32;
                (amplitude * (2.0 * std::f32::consts::PI * 440.0 * t).sin()) as i16
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::session::Format;
    use super::voice::rms_dbfs;
    use super::*;
    use crate::gemini_test_client::{dial_gemini, next_gemini};
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use serde_json::json;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    use voxrelay_core::codec::g711::{alaw_decode, mulaw_decode};

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

    use super::test_support::{session_update, tone};

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
            "/../../fixtures/openai-realtime-ga/client-events.jsonl"
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
        // Usage as the GA service reports it: the echo's ~0.9 s of audio is ~28 tokens.
        let usage = &done["response"]["usage"];
        let output = usage["output_tokens"].as_u64().expect("output_tokens");
        assert!((20..=40).contains(&output), "{usage}");
        assert!(usage["input_tokens"].as_u64() > Some(0), "{usage}");
        assert_eq!(
            usage["total_tokens"].as_u64(),
            Some(output + usage["input_tokens"].as_u64().unwrap_or(0))
        );

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

    fn gemini_setup(extra: Value) -> Message {
        let mut setup = json!({"setup": {"model": "models/gemini-3.8-live",
            "generationConfig": {"responseModalities": ["AUDIO"]}, "sessionResumption": {}}});
        if let (Value::Object(target), Value::Object(extra)) = (&mut setup["setup"], extra) {
            target.extend(extra);
        }
        Message::text(setup.to_string())
    }

    /// Dials Gemini with a key, sends setup and returns the client and its first handle.
    async fn gemini_ready(server: &MockRealtimeServer, extra: Value) -> (Client, String) {
        let mut client = dial_gemini(&server.gemini_url(), &[("x-goog-api-key", "AIza-test")])
            .await
            .expect("dial");
        client.send(gemini_setup(extra)).await.expect("send");
        assert_eq!(
            next_gemini(&mut client).await,
            Ok(json!({"setupComplete": {}}))
        );
        let update = next_gemini(&mut client).await.expect("resumption update");
        let handle = update["sessionResumptionUpdate"]["newHandle"]
            .as_str()
            .expect("handle")
            .to_owned();
        (client, handle)
    }

    #[tokio::test]
    async fn gemini_handshake_needs_a_key_and_a_bad_mime_type_closes_1007() {
        let server = MockRealtimeServer::start(fast_config())
            .await
            .expect("start");
        for (url, headers) in [
            (server.gemini_url(), &[][..]),
            (server.gemini_url(), &[("x-goog-api-key", " ")][..]),
            (format!("{}?key=", server.gemini_url()), &[][..]),
            // An OpenAI key does not open Gemini.
            (
                server.gemini_url(),
                &[("authorization", "Bearer sk-test")][..],
            ),
        ] {
            match dial_gemini(&url, headers).await {
                Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                    assert_eq!(response.status(), StatusCode::UNAUTHORIZED)
                }
                other => panic!(
                    "{url} {headers:?}: expected 401, got {:?}",
                    other.map(|_| ())
                ),
            }
        }
        assert!(
            server.log().sessions().is_empty(),
            "no session without a key"
        );

        let by_query = dial_gemini(&format!("{}?key=AIza-test", server.gemini_url()), &[])
            .await
            .expect("a key in the query is accepted");
        drop(by_query);
        let (mut client, handle) = gemini_ready(&server, json!({})).await;
        // Connections are numbered as they are accepted, refused handshakes included.
        assert_eq!(handle, "h-6-1", "the sixth connection");
        let audio = json!({"realtimeInput": {"audio": {"data": "AAAA",
            "mimeType": "audio/pcm;rate=8000"}}});
        client
            .send(Message::text(audio.to_string()))
            .await
            .expect("send");
        assert_eq!(next_gemini(&mut client).await, Err(Some(1007)));
        let record = &server.log().sessions()[1];
        assert_eq!(record.provider, "gemini");
        assert_eq!(record.close_code, Some(1007));
        assert_eq!(record.client_event_types, ["setup", "realtimeInput"]);
    }

    #[tokio::test]
    async fn gemini_echo_over_a_socket_beside_an_openai_session() {
        let server = MockRealtimeServer::start(fast_config())
            .await
            .expect("start");
        // Sessions are numbered across both protocols.
        let openai = dial_ok(&server).await;
        let (mut client, handle) = gemini_ready(&server, json!({})).await;
        assert_eq!(handle, "h-2-1");

        let mut input: Vec<i16> = vec![0; 400 * 16];
        input.extend(tone(600, 16_000, 8000.0));
        input.extend(vec![0; 700 * 16]);
        for frame in input.chunks(320) {
            let bytes: Vec<u8> = frame.iter().flat_map(|s| s.to_le_bytes()).collect();
            let message = json!({"realtimeInput": {"audio": {"data": BASE64.encode(bytes),
                "mimeType": "audio/pcm;rate=16000"}}});
            client
                .send(Message::text(message.to_string()))
                .await
                .expect("send");
        }
        let mut messages = Vec::new();
        loop {
            let message = next_gemini(&mut client).await.expect("open");
            let done = message["serverContent"]["turnComplete"] == true;
            messages.push(message);
            if done {
                break;
            }
        }
        let usage = next_gemini(&mut client).await.expect("usage");
        assert!(usage["usageMetadata"]["totalTokenCount"].as_u64() > Some(0));
        assert_eq!(
            next_gemini(&mut client).await.expect("update")["sessionResumptionUpdate"]["newHandle"],
            "h-2-2"
        );
        assert_eq!(
            messages[0]["serverContent"]["inputTranscription"]["text"],
            "(caller audio)"
        );
        let parts = messages
            .iter()
            .filter(|m| m["serverContent"]["modelTurn"].is_object())
            .count();
        assert_eq!(parts, 9, "900 ms in 100 ms parts");
        assert_eq!(
            messages[messages.len() - 2]["serverContent"]["generationComplete"],
            true
        );

        let sessions = server.log().sessions();
        assert_eq!(
            sessions.iter().map(|s| s.provider).collect::<Vec<_>>(),
            ["openai", "gemini"]
        );
        assert_eq!(sessions[1].id, "sess_mock_2");
        assert_eq!(sessions[1].output_audio.len(), 900 * 24);
        assert_eq!(sessions[1].input_audio_8k.len(), input.len());
        drop(openai);
    }

    #[tokio::test]
    async fn gemini_go_away_closes_and_the_handle_resumes() {
        let server = MockRealtimeServer::start(MockConfig {
            go_away_after: Some(Duration::from_millis(100)),
            go_away_grace: Duration::from_millis(100),
            ..fast_config()
        })
        .await
        .expect("start");
        let (mut client, handle) = gemini_ready(&server, json!({})).await;
        let go_away = next_gemini(&mut client).await.expect("goAway");
        assert_eq!(go_away, json!({"goAway": {"timeLeft": "0.1s"}}));
        assert_eq!(next_gemini(&mut client).await, Err(Some(1000)));

        let (mut resumed, _) =
            gemini_ready(&server, json!({"sessionResumption": {"handle": handle}})).await;
        let mut stranger = dial_gemini(&server.gemini_url(), &[("x-goog-api-key", "AIza-test")])
            .await
            .expect("dial");
        stranger
            .send(gemini_setup(
                json!({"sessionResumption": {"handle": "h-bogus"}}),
            ))
            .await
            .expect("send");
        assert_eq!(next_gemini(&mut stranger).await, Err(Some(1008)));

        let sessions = server.log().sessions();
        assert_eq!(sessions[0].go_aways_sent, 1);
        assert_eq!(sessions[0].close_code, Some(1000));
        assert_eq!(sessions[1].resumed_from.as_deref(), Some("h-1-1"));
        assert_eq!(sessions[2].close_code, Some(1008));
        // The resumed session is told to go away too.
        assert!(
            next_gemini(&mut resumed)
                .await
                .is_ok_and(|m| m["goAway"].is_object())
        );
    }
}
