//! One call's tasks: the thin async layer around [`CallEngine`].
//!
//! Per call there is one core task (this module's [`run_call`]) that owns the engine, its
//! registry entry and both sockets' read halves, plus one writer task per socket. The core
//! reads Twilio and the model directly (each read half wrapped as a stream whose pending read
//! survives the `select!`, so no frame is ever half-read and dropped), so a frame reaches the
//! engine without a task hand-off. Writers drain [`OutQueue`]s that drop old audio when a peer
//! stalls: the core never waits on a write, so a stalled peer cannot stop it reading. The
//! upstream socket is opened by a short-lived task and handed over through a bounded inbox
//! (capacity [`INBOX_CAPACITY`]). The call ends on Twilio `stop`, either socket closing, the
//! start timeout, cancellation (shutdown), or a peer that stops reading or sending; every path
//! hands the call's report over first (before waiting on any socket, so a stalled peer cannot
//! hold it back past a shutdown), then closes both sockets politely, and the [`Registration`]
//! guard removes the call from the registry, even on panic.
//!
//! Nothing a peer does can hold a call, a task or a socket open for long: a fragmented message
//! counts toward its cap as it arrives ([`Reassembly`], on the model's leg tungstenite's
//! `max_message_size`); every socket write and flush has [`WRITE_TIMEOUT`], and a peer that
//! misses it, or lets its queue's control messages pile past their capacity, ends the call as
//! stalled (`voxrelay_peer_stalls_total`); a started stream silent for [`TWILIO_IDLE_TIMEOUT`]
//! ends; a writer still running [`CLOSE_GRACE`] after the call ended is aborted, closing its
//! socket; pongs coalesce (one owed per leg); at most [`MAX_TOOL_CALLS_IN_FLIGHT`] tools run.
//!
//! Per-frame buffers are reused, not allocated: a Twilio message reaches the engine in
//! fastwebsockets' own read buffer (`TwilioText`), a model message in tungstenite's
//! ([`Utf8Bytes`]), and both writers hand each spent message `String` back to the engine
//! through their queue's bounded free list ([`OutQueue::reclaim`]), so a 20 ms frame costs no
//! heap allocation in either direction (`cargo bench --bench alloc`).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fastwebsockets::{Frame, OpCode, Payload, WebSocket, WebSocketError, WebSocketRead};
use futures_util::task::{ArcWake, AtomicWaker, waker_ref};
use futures_util::{SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::agent::CallAgent;
use super::binding::{Binding, STREAM_TOKEN_PARAMETER, StreamTokens};
use super::engine::{CallEngine, EngineError, OutKind, TwilioStep};
use super::fragments::{FragmentError, Message as Reassembled, Reassembly};
use super::metrics::{CallLatencyRecorder, Direction, Leg, Metrics, TwilioErrorKind};
use super::playback::PlaybackConfig;
use super::prewarm::{PendingCalls, Prepared, prewarm};
use super::queue::{OutQueue, PingPayload};
use super::registry::{CallEntry, CallRegistry, Registration};
use super::report::{CallIdentity, call_report};
use crate::config::{AgentDefaults, MAX_TWILIO_MESSAGE_BYTES, START_TIMEOUT, UpstreamTarget};
use crate::control::api::ReportBinding;
use crate::control::client::ControlPlaneClient;
use crate::control::directory::TenantDirectory;
use crate::control::reports::{ReportHandover, ReportSender};
use crate::control::tool_calls::{DEFAULT_TOOL_TIMEOUT, run_tool};
use crate::logtext::Untrusted;
use crate::upstream::{OpenAiRealtime, SessionSettings, UpstreamSocket, VadSettings, connect};

type UpstreamStream = futures_util::stream::SplitStream<UpstreamSocket>;

/// Messages for the core task from its helpers: the upstream connect task (one message), tool
/// tasks (at most [`MAX_TOOL_CALLS_IN_FLIGHT`] answers) and the two writers (one failure note
/// each), so it never fills; were it full, a sender would wait (none of them is on the media
/// path), never drop. They travel boxed: tokio allocates a channel's slots 32 at a time, so a
/// block of pointers (256 bytes) rather than of `CallInput`s per call.
pub const INBOX_CAPACITY: usize = 64;
/// Audio messages queued for Twilio beyond what the pacer's lead allows: 1 s of chunks.
/// Overflow: the oldest is dropped (counted in `voxrelay_audio_dropped_total`).
const TWILIO_AUDIO_QUEUE: usize = 50;
/// Marks and clears queued for Twilio: 10 s of one mark per 20 ms chunk, where a reading peer
/// holds a handful. Overflow: never dropped (playback accounting needs every mark); a push past
/// it means Twilio stopped reading, and the call ends as stalled.
const TWILIO_CONTROL_QUEUE: usize = 500;
/// Caller audio queued for the model: 1 s of 20 ms frames. Overflow: the oldest is dropped
/// (counted).
const UPSTREAM_AUDIO_QUEUE: usize = 50;
/// Session commands queued for the model (`session.update`, digits, truncates, tool output):
/// a reading model holds a few. Overflow: never dropped; a push past it ends the call as stalled.
const UPSTREAM_CONTROL_QUEUE: usize = 256;
/// The longest one socket write or flush may take, on either leg. A 20 ms frame that cannot be
/// written for 5 s means a caller who has heard nothing for 5 s, or a model that has heard
/// nothing: past TCP's retransmissions on a lossy path, and not a call worth holding. The
/// writer ends, the call ends as stalled (`voxrelay_peer_stalls_total{leg}`). The timer is armed
/// only when a write does not complete at once, so a reading peer costs no timer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// A started stream that sends nothing for this long is dead (Twilio sends a `media` every
/// 20 ms, silence included): the call ends (`twilio_errors_total{kind="idle_timeout"}`).
pub const TWILIO_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Tools of one call running at once; a further call from the model is answered at once with
/// an error (counted in `voxrelay_control_tool_failures_total`) instead of starting a request.
pub const MAX_TOOL_CALLS_IN_FLIGHT: usize = 4;
/// A batch of paced media + mark pairs leaves in one write: each pair is about 400 bytes and a
/// batch is one pair every 20 ms, up to six (the 120 ms playback lead) when a response starts;
/// a larger batch costs one more write, not a wait. Per call, so kept small.
const TWILIO_WRITE_BUFFER: usize = 2 * 1024;
/// The largest audio message the upstream writer copies into its arena for tungstenite (which
/// frames it into its own buffer and drops it), keeping the `String` for reuse. The arena
/// grows to the largest such message and no further: its previous copy has been dropped by the
/// time the next is written, so the space is reclaimed in place. A 20 ms append is about 280
/// bytes in `pcmu`, 1.3 KB in `pcm16`; control messages and anything larger go by value.
const UPSTREAM_WRITE_ARENA: usize = 2 * 1024;
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the writers get to flush and close after the call ends; a writer still running
/// then is aborted, which drops (closes) its socket.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Connect plus configure for a pre-warm; beyond it the stream connects cold instead.
const PREWARM_WITHIN: Duration = Duration::from_secs(8);
/// How long a `start` waits for its webhook's preparation still under way (a pre-warm still
/// connecting is further along than a cold connect would be); then it starts cold.
const CLAIM_WAIT: Duration = Duration::from_secs(3);

/// What every call needs from the bridge.
pub struct CallServices {
    pub metrics: Arc<Metrics>,
    pub registry: Arc<CallRegistry>,
    pub upstream: UpstreamTarget,
    /// The environment's agent: every call's without a control plane, the fallback with one.
    pub agent: AgentDefaults,
    pub playback: PlaybackConfig,
    pub pending: Arc<PendingCalls>,
    pub tokens: StreamTokens,
    pub require_stream_token: bool,
    pub prewarm: bool,
    /// When set, a stream whose `start.accountSid` differs is refused.
    pub twilio_account_sid: Option<String>,
    /// Tenant contexts, tools and reports; `None` without a control plane.
    pub control: Option<ControlServices>,
}

/// The control plane as the calls use it.
pub struct ControlServices {
    pub client: ControlPlaneClient,
    pub directory: TenantDirectory,
    pub reports: ReportSender,
}

impl CallServices {
    /// The agent for a call to `to`, and how long finding it took: the tenant's, or the
    /// environment's when there is no control plane, the number is unknown, or the lookup
    /// missed its budget.
    pub async fn resolve_agent(
        &self,
        to: &str,
        from: &str,
        call_sid: &str,
    ) -> (CallAgent, Duration) {
        let Some(control) = &self.control else {
            return (
                CallAgent::from_defaults(&self.agent, "static"),
                Duration::ZERO,
            );
        };
        let resolution = control.directory.resolve(to, from, call_sid).await;
        let source = resolution.source.as_str();
        let agent = match &resolution.context {
            Some(context) => CallAgent::from_context(context, from, source),
            None => CallAgent::from_defaults(&self.agent, source),
        };
        (agent, resolution.took)
    }
}

/// The voice webhook's head start on a call: the tenant lookup, then (when `with_prewarm`:
/// enabled and under the cap) the upstream session opened and configured for that tenant's
/// agent.
pub async fn prepare_call(
    services: Arc<CallServices>,
    to: String,
    from: String,
    call_sid: String,
    with_prewarm: bool,
) -> Prepared {
    let (agent, lookup_took) = services.resolve_agent(&to, &from, &call_sid).await;
    let session = if with_prewarm {
        services.metrics.prewarm_started.fetch_add(1, Relaxed);
        match prewarm(&services.upstream, agent.session_settings(), PREWARM_WITHIN).await {
            Ok(session) => {
                services.metrics.upstream_connect.observe(session.took);
                Some(session)
            }
            Err(error) => {
                services.metrics.prewarm_failed.fetch_add(1, Relaxed);
                tracing::warn!(call_sid, %error, "pre-warm failed: the stream will connect cold");
                None
            }
        }
    } else {
        None
    };
    Prepared {
        agent,
        lookup_took,
        session,
    }
}

/// What a `start` gets. A bound stream (its token verified for its `CallSid` and `To`, and it
/// was the first to present it) claims its webhook's preparation, or, if there is none here
/// (it expired, or the webhook ran on another machine), resolves the tenant of its `To`, which
/// the token vouches for. Anything else gets the environment's agent: an unbound stream's
/// parameters are whatever its TwiML (or a forger) said, so they never choose a tenant.
async fn claim_or_resolve(
    services: &CallServices,
    binding: Binding,
    call_sid: &str,
    to: Option<&str>,
    from: &str,
) -> Prepared {
    if binding != Binding::Bound {
        let source = if services.control.is_some() {
            "fallback"
        } else {
            "static"
        };
        return Prepared {
            agent: CallAgent::from_defaults(&services.agent, source),
            lookup_took: Duration::ZERO,
            session: None,
        };
    }
    if let Some(preparation) = services.pending.claim(call_sid) {
        match tokio::time::timeout(CLAIM_WAIT, preparation).await {
            Ok(Ok(prepared)) => return prepared,
            Ok(Err(_)) => tracing::warn!("the call's preparation was lost: starting cold"),
            Err(_) => tracing::warn!("the call's preparation is late: starting cold"),
        }
    }
    match to.filter(|to| !to.is_empty()) {
        Some(to) => {
            let (agent, lookup_took) = services.resolve_agent(to, from, call_sid).await;
            Prepared {
                agent,
                lookup_took,
                session: None,
            }
        }
        None => Prepared {
            agent: CallAgent::from_defaults(&services.agent, "static"),
            lookup_took: Duration::ZERO,
            session: None,
        },
    }
}

/// The value of a form field or TwiML `<Parameter>` named `name`, if present.
pub(crate) fn parameter<'a>(parameters: &'a [(String, String)], name: &str) -> Option<&'a str> {
    parameters
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// Why a call ended, for the log line and the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    TwilioStop,
    TwilioClosed,
    TwilioError,
    StartTimeout,
    UpstreamClosed,
    UpstreamFailed,
    DuplicateStream,
    /// The stream's binding token did not match its call (or was required and missing).
    StreamTokenRefused,
    /// `start.accountSid` is not the configured `VOXRELAY_TWILIO_ACCOUNT_SID`.
    AccountRefused,
    /// The tenant's `max_call_seconds` passed.
    MaxDuration,
    /// Twilio stopped reading: a write missed [`WRITE_TIMEOUT`] or its control queue filled.
    TwilioStalled,
    /// The model stopped reading: a write missed [`WRITE_TIMEOUT`] or its control queue filled.
    UpstreamStalled,
    /// A started stream sent nothing for [`TWILIO_IDLE_TIMEOUT`].
    TwilioIdle,
    /// The model sent a message over `upstream::connect::MAX_UPSTREAM_MESSAGE_BYTES`.
    UpstreamOversized,
    Shutdown,
}

impl EndReason {
    /// The `end_reason` of a call report.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::TwilioStop => "twilio_stop",
            EndReason::TwilioClosed => "twilio_closed",
            EndReason::TwilioError => "twilio_error",
            EndReason::StartTimeout => "start_timeout",
            EndReason::UpstreamClosed => "upstream_closed",
            EndReason::UpstreamFailed => "upstream_failed",
            EndReason::DuplicateStream => "duplicate_stream",
            EndReason::StreamTokenRefused => "stream_token_refused",
            EndReason::AccountRefused => "account_refused",
            EndReason::MaxDuration => "max_duration",
            EndReason::TwilioStalled => "twilio_stalled",
            EndReason::UpstreamStalled => "upstream_stalled",
            EndReason::TwilioIdle => "twilio_idle",
            EndReason::UpstreamOversized => "upstream_oversized",
            EndReason::Shutdown => "shutdown",
        }
    }
}

impl EndReason {
    /// A peer that stopped reading on `leg`.
    fn stalled(leg: Leg) -> Self {
        match leg {
            Leg::Twilio => EndReason::TwilioStalled,
            Leg::Upstream => EndReason::UpstreamStalled,
        }
    }
}

enum CallInput {
    Twilio(TwilioText),
    /// A ping's payload, to be echoed byte for byte in a pong.
    TwilioPing(PingPayload),
    TwilioClosed,
    TwilioFailed(WebSocketError),
    UpstreamOpen(Duration, tokio::task::JoinHandle<()>, Box<UpstreamStream>),
    UpstreamFailed(String),
    /// Borrows tungstenite's read buffer (no copy).
    Upstream(Utf8Bytes),
    UpstreamClosed(Option<String>),
    /// The model sent a message over its cap (tungstenite refused it while it arrived).
    UpstreamOversized(String),
    /// A writer ended early: its peer stopped reading (`stalled`) or its socket failed.
    WriteFailed {
        leg: Leg,
        stalled: bool,
    },
    /// A tool's answer (or error text) for the model.
    ToolOutput {
        call_id: String,
        output: String,
    },
}

/// The text of one Twilio message, in fastwebsockets' read buffer: no copy, and once it is
/// dropped the reader reuses the space for the next frames (its buffer is shared, so it can
/// reclaim the space only when no payload taken from it is alive).
struct TwilioText(BytesMut);

impl TwilioText {
    /// `None` unless `payload` is UTF-8.
    fn new(payload: BytesMut) -> Option<Self> {
        std::str::from_utf8(&payload)
            .is_ok()
            .then_some(Self(payload))
    }
}

impl std::ops::Deref for TwilioText {
    type Target = str;

    fn deref(&self) -> &str {
        // SAFETY: the bytes were checked to be UTF-8 in `new`, the only constructor, and the
        // private field is never changed after.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }
}

/// Runs one Media Streams WebSocket to completion.
pub async fn run_call<S>(
    mut ws: WebSocket<S>,
    services: Arc<CallServices>,
    cancel: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // fastwebsockets refuses a frame of `max` bytes or more; fragments are counted by
    // `Reassembly` against the same cap.
    ws.set_max_message_size(MAX_TWILIO_MESSAGE_BYTES + 1);
    ws.set_auto_pong(false);
    ws.set_auto_close(false);
    let span = tracing::info_span!(
        "call",
        stream_sid = tracing::field::Empty,
        call_sid = tracing::field::Empty
    );
    let reason = drive(ws, services, cancel, span.clone())
        .instrument(span.clone())
        .await;
    span.in_scope(|| tracing::info!(?reason, "call ended"));
}

async fn drive<S>(
    ws: WebSocket<S>,
    services: Arc<CallServices>,
    cancel: CancellationToken,
    span: tracing::Span,
) -> EndReason
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let metrics = Arc::clone(&services.metrics);
    // The write half is buffered and flushed once per batch, so a `media` and the `mark`
    // behind it leave in one system call instead of two.
    let (read_half, write_half) = ws.split(|stream| {
        let (read, write) = tokio::io::split(stream);
        (
            read,
            tokio::io::BufWriter::with_capacity(TWILIO_WRITE_BUFFER, write),
        )
    });
    let (inbox_tx, mut inbox) = mpsc::channel::<Box<CallInput>>(INBOX_CAPACITY);
    let connecting = CancellationToken::new();

    let twilio_out = Arc::new(OutQueue::new(
        TWILIO_AUDIO_QUEUE,
        TWILIO_CONTROL_QUEUE,
        Direction::Downlink,
        Arc::clone(&metrics),
    ));
    let upstream_out = Arc::new(OutQueue::new(
        UPSTREAM_AUDIO_QUEUE,
        UPSTREAM_CONTROL_QUEUE,
        Direction::Uplink,
        Arc::clone(&metrics),
    ));

    let twilio_in = twilio_messages(read_half);
    tokio::pin!(twilio_in);
    let mut upstream_in: Option<Pin<Box<dyn Stream<Item = CallInput> + Send>>> = None;
    let latency = Arc::new(CallLatencyRecorder::default());
    let twilio_writer = tokio::spawn(
        twilio_writer(
            write_half,
            Arc::clone(&twilio_out),
            WriterSignals::new(Leg::Twilio, &metrics, &inbox_tx),
            Arc::clone(&latency),
        )
        .instrument(span.clone()),
    );
    let mut upstream_writer_task = None;

    // The session is configured for the call's agent once `start` says who was dialled.
    let mut engine = CallEngine::new(
        Box::new(OpenAiRealtime::new(SessionSettings::default())),
        services.agent.audio_mode,
        services.playback.clone(),
        VadSettings::default().interrupt_response,
        Arc::clone(&metrics),
    );

    let mut registration: Option<Registration> = None;
    // Who the call is, for its report: set at `start`.
    let mut call: Option<(CallRecord, CallAgent)> = None;
    // The loop's timers live across its passes and are reset only when their deadline moves:
    // a future built anew on every pass would register with the timer wheel (or, for the
    // cancellation, with the token's waiter list) once per message.
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    let pacer_sleep = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(pacer_sleep);
    let mut pacer_armed: Option<tokio::time::Instant> = None;
    // Before `start`: the start timeout; after it, the tenant's maximum call length, if any.
    let call_deadline = tokio::time::sleep(START_TIMEOUT);
    tokio::pin!(call_deadline);
    let mut deadline = Some(CallDeadline::Start);
    // Checked every TWILIO_IDLE_TIMEOUT, not reset per message: a message only stores its time.
    let idle_check = tokio::time::sleep(TWILIO_IDLE_TIMEOUT);
    tokio::pin!(idle_check);
    let mut last_twilio_at = tokio::time::Instant::now();
    // Tool requests started and not yet answered through the inbox.
    let mut tools_in_flight = 0usize;
    let reason = loop {
        let pacer = engine.poll_timeout().map(tokio::time::Instant::from_std);
        if pacer != pacer_armed {
            if let Some(at) = pacer {
                pacer_sleep.as_mut().reset(at);
            }
            pacer_armed = pacer;
        }
        let input = tokio::select! {
            biased;
            () = &mut cancelled => break EndReason::Shutdown,
            input = twilio_in.next() => Some(input.unwrap_or(CallInput::TwilioClosed)),
            input = next_upstream(&mut upstream_in) => Some(input),
            input = inbox.recv() => input.map(|input| *input),
            () = &mut pacer_sleep, if pacer_armed.is_some() => {
                let now = tokio::time::Instant::now();
                if let Some(deadline) = pacer_armed.take() {
                    // How late the pacer wakes is what the playback lead must absorb.
                    metrics.pacer_lateness.observe(now.saturating_duration_since(deadline));
                }
                engine.on_tick(now.into_std());
                if let Err(leg) = flush(&mut engine, &twilio_out, &upstream_out) {
                    metrics.peer_stalled(leg);
                    tracing::warn!(leg = leg.as_str(), "outbound control queue full: the peer is not reading");
                    break EndReason::stalled(leg);
                }
                continue;
            }
            () = &mut call_deadline, if deadline.is_some() => match deadline {
                Some(CallDeadline::Start) | None => {
                    metrics.twilio_error(TwilioErrorKind::StartTimeout);
                    tracing::warn!("no `start` within {START_TIMEOUT:?}: closing");
                    break EndReason::StartTimeout;
                }
                Some(CallDeadline::MaxLength) => {
                    metrics.calls_max_duration.fetch_add(1, Relaxed);
                    tracing::info!("the tenant's maximum call length passed: ending the call");
                    break EndReason::MaxDuration;
                }
            },
            () = &mut idle_check => {
                let silent_until = last_twilio_at + TWILIO_IDLE_TIMEOUT;
                if tokio::time::Instant::now() >= silent_until {
                    metrics.twilio_error(TwilioErrorKind::IdleTimeout);
                    tracing::warn!("no message from Twilio for {TWILIO_IDLE_TIMEOUT:?}: closing");
                    break EndReason::TwilioIdle;
                }
                idle_check.as_mut().reset(silent_until);
                continue;
            }
        };
        let Some(input) = input else {
            break EndReason::TwilioClosed;
        };
        let now = Instant::now();
        if matches!(input, CallInput::Twilio(_) | CallInput::TwilioPing(_)) {
            last_twilio_at = tokio::time::Instant::from_std(now);
        }
        match input {
            CallInput::Twilio(text) => match engine.on_twilio_text(now, &text) {
                Ok(TwilioStep::Continue) => {}
                Ok(TwilioStep::Started(info)) => {
                    span.record("stream_sid", info.stream_sid.as_str());
                    span.record("call_sid", info.call_sid.as_str());
                    if let Some(account) = &services.twilio_account_sid {
                        if info.account_sid != *account {
                            metrics.streams_refused_account.fetch_add(1, Relaxed);
                            tracing::warn!("stream from another Twilio account: closing it");
                            break EndReason::AccountRefused;
                        }
                    }
                    let entry = CallEntry {
                        call_sid: info.call_sid.clone(),
                        started: now,
                        cancel: cancel.clone(),
                    };
                    match services.registry.register(&info.stream_sid, entry) {
                        Ok(guard) => registration = Some(guard),
                        Err(duplicate) => {
                            tracing::warn!("{duplicate}: refusing the second socket");
                            break EndReason::DuplicateStream;
                        }
                    }
                    let parameters = &info.custom_parameters;
                    let to = parameter(parameters, "To");
                    let from = parameter(parameters, "From").unwrap_or("");
                    let binding = services.tokens.bind_now(
                        &info.call_sid,
                        to.unwrap_or(""),
                        parameter(parameters, STREAM_TOKEN_PARAMETER),
                    );
                    if binding.is_refused()
                        || (binding == Binding::Unbound && services.require_stream_token)
                    {
                        metrics.streams_refused_token.fetch_add(1, Relaxed);
                        tracing::warn!(
                            binding = binding.as_str(),
                            "stream token refused: closing the stream"
                        );
                        break EndReason::StreamTokenRefused;
                    }
                    if binding == Binding::Unbound {
                        metrics.streams_unbound.fetch_add(1, Relaxed);
                        tracing::warn!(
                            "stream without a token let through (VOXRELAY_REQUIRE_STREAM_TOKEN=0): \
                             the fallback agent answers, the report is marked unbound"
                        );
                    }
                    let prepared = tokio::select! {
                        () = &mut cancelled => break EndReason::Shutdown,
                        prepared = claim_or_resolve(&services, binding, &info.call_sid, to, from) => prepared,
                    };
                    let now = Instant::now();
                    let agent = prepared.agent;
                    let interrupts = VadSettings::default().interrupt_response;
                    let prewarmed = prepared.session.is_some();
                    tracing::info!(
                        from = %redact_number(from),
                        to = %to.map(redact_number).unwrap_or_default(),
                        tenant = agent.tenant_id.as_deref().unwrap_or("-"),
                        agent = %agent.agent_name,
                        source = agent.source,
                        lookup_us = prepared.lookup_took.as_micros() as u64,
                        prewarmed,
                        mode = %agent.audio_mode,
                        "stream started"
                    );
                    let tools_enabled = services.control.is_some()
                        && agent.tenant_id.is_some()
                        && !agent.tools.is_empty();
                    match prepared.session {
                        Some(session) => {
                            metrics.prewarm_claimed.fetch_add(1, Relaxed);
                            let _ = engine.configure_session(
                                Box::new(session.protocol),
                                agent.audio_mode,
                                interrupts,
                                tools_enabled,
                            );
                            let (sink, stream) = session.socket.split();
                            upstream_writer_task = Some(tokio::spawn(
                                upstream_writer(
                                    sink,
                                    Arc::clone(&upstream_out),
                                    WriterSignals::new(Leg::Upstream, &metrics, &inbox_tx),
                                    Arc::clone(&latency),
                                )
                                .instrument(span.clone()),
                            ));
                            upstream_in = Some(Box::pin(upstream_messages(stream)));
                            engine.on_upstream_prewarmed(now, session.held);
                        }
                        None => {
                            let _ = engine.configure_session(
                                Box::new(OpenAiRealtime::new(agent.session_settings())),
                                agent.audio_mode,
                                interrupts,
                                tools_enabled,
                            );
                            tokio::spawn(
                                open_upstream(
                                    services.upstream.clone(),
                                    inbox_tx.clone(),
                                    connecting.clone(),
                                    Arc::clone(&upstream_out),
                                    Arc::clone(&metrics),
                                    Arc::clone(&latency),
                                )
                                .instrument(span.clone()),
                            );
                        }
                    }
                    deadline = agent.max_call.map(|limit| {
                        call_deadline
                            .as_mut()
                            .reset(tokio::time::Instant::now() + limit);
                        CallDeadline::MaxLength
                    });
                    let record = CallRecord {
                        call_sid: info.call_sid.clone(),
                        stream_sid: info.stream_sid.clone(),
                        from: from.to_owned(),
                        to: to.unwrap_or("").to_owned(),
                        started_at: std::time::SystemTime::now(),
                        binding: if binding == Binding::Bound {
                            ReportBinding::Bound
                        } else {
                            ReportBinding::Unbound
                        },
                        handover: services
                            .control
                            .as_ref()
                            .map(|control| control.reports.expect_report()),
                    };
                    call = Some((record, agent));
                }
                Ok(TwilioStep::Stopped) => {
                    // The call is over either way: a full queue only loses its last marks.
                    let _ = flush(&mut engine, &twilio_out, &upstream_out);
                    break EndReason::TwilioStop;
                }
                // The error's text may quote the peer's: escaped and cut, within the budget.
                Err(EngineError::Twilio(error)) => {
                    if engine.allow_warning() {
                        tracing::warn!(error = %Untrusted(&error.to_string()), "bad twilio message ignored")
                    }
                }
                Err(error) => {
                    if engine.allow_warning() {
                        tracing::warn!(error = %Untrusted(&error.to_string()), "twilio message ignored")
                    }
                }
            },
            CallInput::TwilioPing(payload) => twilio_out.push_pong(payload),
            CallInput::TwilioClosed => break EndReason::TwilioClosed,
            CallInput::TwilioFailed(error) => {
                if matches!(error, WebSocketError::FrameTooLarge) {
                    metrics.twilio_error(TwilioErrorKind::Oversized);
                    tracing::warn!("twilio message over {MAX_TWILIO_MESSAGE_BYTES} bytes: closing");
                } else {
                    tracing::info!(%error, "twilio socket failed");
                }
                break EndReason::TwilioError;
            }
            CallInput::UpstreamOpen(took, writer, stream) => {
                upstream_writer_task = Some(writer);
                upstream_in = Some(Box::pin(upstream_messages(*stream)));
                metrics.upstream_connect.observe(took);
                tracing::debug!(?took, "upstream open");
                engine.on_upstream_open(now);
            }
            CallInput::UpstreamFailed(error) => {
                metrics.upstream_connect_failures.fetch_add(1, Relaxed);
                tracing::error!(%error, "could not reach the model: ending the call");
                break EndReason::UpstreamFailed;
            }
            CallInput::Upstream(text) => {
                if let Err(error) = engine.on_upstream_text(now, &text)
                    && engine.allow_warning()
                {
                    tracing::warn!(error = %Untrusted(&error.to_string()), "upstream message ignored");
                }
            }
            CallInput::ToolOutput { call_id, output } => {
                tools_in_flight = tools_in_flight.saturating_sub(1);
                engine.on_tool_output(&call_id, &output);
            }
            CallInput::UpstreamClosed(why) => {
                metrics.upstream_disconnects.fetch_add(1, Relaxed);
                tracing::warn!(
                    why = %Untrusted(why.as_deref().unwrap_or("-")),
                    "model socket closed: ending the call"
                );
                break EndReason::UpstreamClosed;
            }
            CallInput::UpstreamOversized(why) => {
                metrics.upstream_oversized.fetch_add(1, Relaxed);
                tracing::warn!(%why, "model message over its size cap: ending the call");
                break EndReason::UpstreamOversized;
            }
            CallInput::WriteFailed { leg, stalled: true } => {
                metrics.peer_stalled(leg);
                tracing::warn!(
                    leg = leg.as_str(),
                    "a socket write took over {WRITE_TIMEOUT:?}: the peer is not reading"
                );
                break EndReason::stalled(leg);
            }
            CallInput::WriteFailed {
                leg,
                stalled: false,
            } => {
                tracing::info!(leg = leg.as_str(), "socket write failed: ending the call");
                match leg {
                    Leg::Twilio => break EndReason::TwilioClosed,
                    Leg::Upstream => {
                        metrics.upstream_disconnects.fetch_add(1, Relaxed);
                        break EndReason::UpstreamClosed;
                    }
                }
            }
        }
        // Before the flush: a tool call refused at once answers the model in this pass.
        run_tool_calls(
            &mut engine,
            &services,
            call.as_ref(),
            &inbox_tx,
            &connecting,
            &mut tools_in_flight,
        );
        if let Err(leg) = flush(&mut engine, &twilio_out, &upstream_out) {
            metrics.peer_stalled(leg);
            tracing::warn!(
                leg = leg.as_str(),
                "outbound control queue full: the peer is not reading"
            );
            break EndReason::stalled(leg);
        }
    };

    let stats = engine.stats();
    tracing::info!(
        frames_in = stats.frames_in,
        frames_out = stats.frames_out,
        barge_ins = stats.barge_ins,
        upstream_errors = stats.upstream_errors,
        warnings_suppressed = engine.warnings_suppressed(),
        "call summary"
    );
    // The report goes first, before anything waits on a socket: a peer that stalls the close
    // cannot hold it back, and the drain knows every ended call has handed its report over.
    if let Some((record, agent)) = call.take() {
        submit_report(&metrics, record, &agent, reason, engine.stats(), &latency);
    }
    // A connect still under way is abandoned; writers send what is queued, then a close frame,
    // within the grace; a writer still running then is aborted and its socket closed.
    connecting.cancel();
    twilio_out.close();
    upstream_out.close();
    tokio::join!(
        stop_writer(Some(twilio_writer), &metrics),
        stop_writer(upstream_writer_task, &metrics),
    );
    drop(registration);
    reason
}

/// Hands an ended call's report to the report sender (a no-op without a control plane).
fn submit_report(
    metrics: &Metrics,
    record: CallRecord,
    agent: &CallAgent,
    reason: EndReason,
    stats: &super::engine::CallStats,
    latency: &CallLatencyRecorder,
) {
    let Some(handover) = record.handover else {
        return;
    };
    let identity = CallIdentity {
        call_sid: &record.call_sid,
        stream_sid: &record.stream_sid,
        from: &record.from,
        to: &record.to,
        binding: record.binding,
    };
    let report = call_report(
        &identity,
        agent,
        record.started_at,
        std::time::SystemTime::now(),
        reason.as_str(),
        stats,
        latency.summary(),
    );
    if report.transcript_dropped_lines > 0 || report.transcript_cut_lines > 0 {
        metrics
            .control_report_transcripts_truncated
            .fetch_add(1, Relaxed);
        tracing::info!(
            dropped_lines = report.transcript_dropped_lines,
            cut_lines = report.transcript_cut_lines,
            "the call's transcript was shortened to fit its report"
        );
    }
    handover.submit(report);
}

/// What the call loop's one long timer is waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallDeadline {
    /// Twilio's `start` (the socket is closed without one).
    Start,
    /// The tenant's `max_call_seconds`.
    MaxLength,
}

/// Who a call is, as its `start` said.
struct CallRecord {
    call_sid: String,
    stream_sid: String,
    from: String,
    to: String,
    started_at: std::time::SystemTime,
    binding: ReportBinding,
    /// The undertaking to hand the report over; `None` without a control plane.
    handover: Option<ReportHandover>,
}

/// Runs the model's function calls on the control plane, each in its own task; the answer
/// comes back through the inbox. The call never waits on a tool: the model is told when it
/// fails, and `stop` abandons tools still running.
fn run_tool_calls(
    engine: &mut CallEngine,
    services: &Arc<CallServices>,
    call: Option<&(CallRecord, CallAgent)>,
    inbox: &mpsc::Sender<Box<CallInput>>,
    call_ended: &CancellationToken,
    in_flight: &mut usize,
) {
    // Collected first (no allocation when there are none): answering a refused call needs
    // the engine back.
    let tool_calls: Vec<_> = engine.take_tool_calls().collect();
    for tool_call in tool_calls {
        // Tools are enabled only for a tenant's agent with a control plane.
        let (Some(control), Some((record, agent))) = (&services.control, call) else {
            continue;
        };
        let Some(tenant_id) = agent.tenant_id.clone() else {
            continue;
        };
        if *in_flight >= MAX_TOOL_CALLS_IN_FLIGHT {
            services.metrics.control_tool_failures.fetch_add(1, Relaxed);
            if engine.allow_warning() {
                tracing::warn!(
                    "the model called a tool with {MAX_TOOL_CALLS_IN_FLIGHT} still running: refused"
                );
            }
            let output = r#"{"error":"too many tool calls at once; wait for the running ones"}"#;
            engine.on_tool_output(&tool_call.call_id, output);
            continue;
        }
        *in_flight += 1;
        let client = control.client.clone();
        let call_sid = record.call_sid.clone();
        let inbox = inbox.clone();
        let call_ended = call_ended.clone();
        tokio::spawn(
            async move {
                let output = tokio::select! {
                    () = call_ended.cancelled() => return,
                    output = run_tool(
                        &client,
                        &tool_call.name,
                        &call_sid,
                        &tenant_id,
                        &tool_call.arguments,
                        DEFAULT_TOOL_TIMEOUT,
                    ) => output,
                };
                let _ = inbox
                    .send(Box::new(CallInput::ToolOutput {
                        call_id: tool_call.call_id,
                        output,
                    }))
                    .await;
            }
            .in_current_span(),
        );
    }
}

/// Moves the engine's output into the writers' queues. A leg whose control queue is full
/// (its peer is not reading) is returned: the call must end.
fn flush(
    engine: &mut CallEngine,
    twilio_out: &OutQueue,
    upstream_out: &OutQueue,
) -> Result<(), Leg> {
    let mut full = None;
    for out in engine.take_to_twilio() {
        if out.kind == OutKind::Clear {
            // Audio not yet written is stale: Twilio would only clear it again.
            twilio_out.drop_audio();
        }
        if twilio_out.push(out).is_err() {
            full = Some(Leg::Twilio);
        }
    }
    for out in engine.take_to_upstream() {
        if upstream_out.push(out).is_err() {
            full = full.or(Some(Leg::Upstream));
        }
    }
    // Buffers the writers have finished with carry the next appends, `media`s and `mark`s.
    upstream_out.reclaim(|text| engine.recycle_upstream(text));
    twilio_out.reclaim(|text| engine.recycle_twilio(text));
    full.map_or(Ok(()), Err)
}

/// Waits up to [`CLOSE_GRACE`] for a writer to send what is queued and its close frame, then
/// aborts it: its socket half is dropped with it, so a peer that never reads cannot keep the
/// task or the socket.
async fn stop_writer(writer: Option<tokio::task::JoinHandle<()>>, metrics: &Metrics) {
    let Some(mut writer) = writer else {
        return;
    };
    if tokio::time::timeout(CLOSE_GRACE, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
        metrics.call_writers_aborted.fetch_add(1, Relaxed);
        tracing::info!("a socket writer was still busy after {CLOSE_GRACE:?}: aborted");
        // Returns once the task is gone (at its next poll), socket and all.
        let _ = writer.await;
    }
}

/// Runs one socket operation with a deadline of [`WRITE_TIMEOUT`]. The operation is polled
/// once first and the timer armed only if it is still pending, so the common case (the socket
/// takes the bytes at once) costs no timer. `None` when the deadline passed.
async fn within_write_timeout<F: std::future::Future>(operation: F) -> Option<F::Output> {
    let mut operation = std::pin::pin!(operation);
    let first = std::future::poll_fn(|cx| Poll::Ready(operation.as_mut().poll(cx))).await;
    match first {
        Poll::Ready(output) => Some(output),
        Poll::Pending => tokio::time::timeout(WRITE_TIMEOUT, operation).await.ok(),
    }
}

/// How a writer task tells the core it ended early, and the gauge of live writers (released
/// however the task ends, abort included).
struct WriterSignals {
    leg: Leg,
    metrics: Arc<Metrics>,
    inbox: mpsc::Sender<Box<CallInput>>,
}

impl WriterSignals {
    fn new(leg: Leg, metrics: &Arc<Metrics>, inbox: &mpsc::Sender<Box<CallInput>>) -> Self {
        metrics.call_writers_active.fetch_add(1, Relaxed);
        Self {
            leg,
            metrics: Arc::clone(metrics),
            inbox: inbox.clone(),
        }
    }

    /// The peer stopped reading (`stalled`) or the socket failed: the core ends the call.
    async fn failed(&self, stalled: bool) {
        let _ = self
            .inbox
            .send(Box::new(CallInput::WriteFailed {
                leg: self.leg,
                stalled,
            }))
            .await;
    }
}

impl Drop for WriterSignals {
    fn drop(&mut self) {
        self.metrics.call_writers_active.fetch_sub(1, Relaxed);
    }
}

// Moved to `voxrelay-core` (the reference control plane logs numbers the same way).
pub use crate::logtext::redact_number;

/// A stream polled only when it may have something: right after it yielded an item, or once
/// its own waker has fired. The core's `select!` polls every branch on every wake-up, so
/// without this a message on one socket also polls the other socket's stream: a read attempt
/// that finds nothing, and on the model's socket tungstenite zero-fills its free read buffer
/// (~4 KB) before each attempt. Per call, so its state is not shared with other calls.
struct PollOnWake<S> {
    inner: S,
    gate: Arc<WakeGate>,
    /// The last poll yielded an item: more may be buffered, so poll the stream again.
    ready: bool,
}

#[derive(Default)]
struct WakeGate {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl ArcWake for WakeGate {
    fn wake_by_ref(gate: &Arc<Self>) {
        gate.woken.store(true, Ordering::Release);
        gate.task.wake();
    }
}

impl<S> PollOnWake<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            gate: Arc::default(),
            ready: true,
        }
    }
}

impl<S: Stream + Unpin> Stream for PollOnWake<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = &mut *self;
        // Registered before the check, so a wake-up between the two is not lost.
        this.gate.task.register(cx.waker());
        if !std::mem::take(&mut this.ready) && !this.gate.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = waker_ref(&this.gate);
        let item = this.inner.poll_next_unpin(&mut Context::from_waker(&waker));
        this.ready = item.is_ready();
        item
    }
}

/// The Twilio read half as a stream of call inputs. A `next()` dropped by `select!` leaves the
/// read in progress inside the stream, so it is cancel-safe although `read_frame` is not. The
/// stream ends after the socket closes or fails. Frames are read one by one (not through
/// fastwebsockets' collector, which would join a fragmented message of any size): an
/// unfragmented text frame goes on in the reader's buffer, fragments are joined by
/// [`Reassembly`] under [`MAX_TWILIO_MESSAGE_BYTES`], counted as they arrive.
fn twilio_messages<R>(reader: WebSocketRead<R>) -> impl Stream<Item = CallInput>
where
    R: AsyncRead + Unpin,
{
    let reassembly = Reassembly::new(MAX_TWILIO_MESSAGE_BYTES);
    PollOnWake::new(Box::pin(futures_util::stream::unfold(
        Some((reader, reassembly)),
        |state| async move {
            let (mut reader, mut reassembly) = state?;
            // Auto-pong and auto-close are off, so the reader never has to write.
            let mut never_writes = |_: Frame<'_>| async { Ok::<(), std::io::Error>(()) };
            loop {
                let input = match reader.read_frame(&mut never_writes).await {
                    Ok(frame) => match frame.opcode {
                        OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                            match reassembly.push(frame.fin, frame.opcode, frame.payload) {
                                Ok(None) => continue,
                                // Twilio never sends binary frames; a stray one is not audio
                                // we understand.
                                Ok(Some(Reassembled::Binary { .. })) => continue,
                                Ok(Some(Reassembled::Text(payload))) => {
                                    match TwilioText::new(payload) {
                                        Some(text) => CallInput::Twilio(text),
                                        None => {
                                            CallInput::TwilioFailed(WebSocketError::InvalidUTF8)
                                        }
                                    }
                                }
                                Err(FragmentError::Oversized { .. }) => {
                                    CallInput::TwilioFailed(WebSocketError::FrameTooLarge)
                                }
                                Err(FragmentError::UnexpectedContinuation) => {
                                    CallInput::TwilioFailed(
                                        WebSocketError::InvalidContinuationFrame,
                                    )
                                }
                                Err(_) => CallInput::TwilioFailed(WebSocketError::InvalidFragment),
                            }
                        }
                        OpCode::Close => CallInput::TwilioClosed,
                        // fastwebsockets refuses pings over 125 bytes, which always fit.
                        OpCode::Ping => match PingPayload::new(&frame.payload) {
                            Some(ping) => CallInput::TwilioPing(ping),
                            None => CallInput::TwilioFailed(WebSocketError::PingFrameTooLarge),
                        },
                        OpCode::Pong => continue,
                    },
                    Err(error) => CallInput::TwilioFailed(error),
                };
                let terminal =
                    matches!(input, CallInput::TwilioClosed | CallInput::TwilioFailed(_));
                return Some((input, (!terminal).then_some((reader, reassembly))));
            }
        },
    )))
}

/// Writes the Twilio queue to the socket, every write and flush within [`WRITE_TIMEOUT`]; a
/// pong owed goes first, with the ping's bytes.
async fn twilio_writer<W>(
    mut writer: fastwebsockets::WebSocketWrite<W>,
    queue: Arc<OutQueue>,
    signals: WriterSignals,
    latency: Arc<CallLatencyRecorder>,
) where
    W: AsyncWrite + Unpin,
{
    let metrics = Arc::clone(&signals.metrics);
    let mut batch = Vec::with_capacity(16);
    let mut pong = None;
    let mut written = Vec::with_capacity(16);
    // Texts written go back to the core through the queue for the next downlink messages.
    let mut spent = Vec::with_capacity(16);
    while queue.pop_all(&mut batch, &mut pong, &mut spent).await {
        if let Some(ping) = pong.take() {
            let frame = Frame::pong(Payload::Borrowed(ping.as_bytes()));
            match within_write_timeout(writer.write_frame(frame)).await {
                Some(Ok(())) => {}
                Some(Err(_)) => return signals.failed(false).await,
                None => return signals.failed(true).await,
            }
        }
        for out in batch.drain(..) {
            // A server's frames are not masked, so fastwebsockets only reads the payload: it is
            // framed from the borrowed text, which then goes back for reuse.
            let frame = Frame::text(Payload::Borrowed(out.text.as_bytes()));
            match within_write_timeout(writer.write_frame(frame)).await {
                Some(Ok(())) => {}
                Some(Err(_)) => return signals.failed(false).await,
                None => return signals.failed(true).await,
            }
            if let Some(caused_at) = out.caused_at {
                written.push((out.kind, caused_at));
            }
            spent.push(out.text);
        }
        match within_write_timeout(writer.flush()).await {
            Some(Ok(())) => {}
            Some(Err(_)) => return signals.failed(false).await,
            None => return signals.failed(true).await,
        }
        // Latency ends when the bytes reach the socket, i.e. after the flush.
        for (kind, caused_at) in written.drain(..) {
            let took = caused_at.elapsed();
            match kind {
                OutKind::Audio => {
                    metrics.downlink_added.observe(took);
                    latency.downlink(took);
                }
                OutKind::Clear => {
                    metrics.barge_in_reaction.observe(took);
                    latency.barge_in(took);
                }
                OutKind::Mark | OutKind::Control => {}
            }
        }
    }
    let _ = within_write_timeout(writer.write_frame(Frame::close(1000, b""))).await;
    let _ = within_write_timeout(writer.flush()).await;
}

/// Opens the model's socket, then starts its reader and writer and tells the core.
async fn open_upstream(
    target: UpstreamTarget,
    inbox: mpsc::Sender<Box<CallInput>>,
    stop: CancellationToken,
    queue: Arc<OutQueue>,
    metrics: Arc<Metrics>,
    latency: Arc<CallLatencyRecorder>,
) {
    let began = Instant::now();
    let socket = tokio::select! {
        () = stop.cancelled() => return,
        socket = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, connect(&target.url, target.api_key.as_ref())) => socket,
    };
    let socket: UpstreamSocket = match socket {
        Ok(Ok(socket)) => socket,
        Ok(Err(error)) => {
            let _ = inbox
                .send(Box::new(CallInput::UpstreamFailed(error.to_string())))
                .await;
            return;
        }
        Err(_) => {
            let _ = inbox
                .send(Box::new(CallInput::UpstreamFailed(
                    "connect timed out".into(),
                )))
                .await;
            return;
        }
    };
    let took = began.elapsed();
    let (sink, stream) = socket.split();
    let signals = WriterSignals::new(Leg::Upstream, &metrics, &inbox);
    let writer = tokio::spawn(upstream_writer(sink, queue, signals, latency).in_current_span());
    let _ = inbox
        .send(Box::new(CallInput::UpstreamOpen(
            took,
            writer,
            Box::new(stream),
        )))
        .await;
}

/// The model's read half as a stream of call inputs; it ends after the socket closes.
fn upstream_messages(stream: UpstreamStream) -> impl Stream<Item = CallInput> {
    PollOnWake::new(Box::pin(futures_util::stream::unfold(
        Some(stream),
        |stream| async move {
            let mut stream = stream?;
            loop {
                // tungstenite answers a ping itself: the pong is queued as the ping is read and
                // written by the next read (the one right after, as a ping yields no input), so
                // it leaves at once with the ping's bytes, whether or not the writer has anything.
                let input = match stream.next().await {
                    Some(Ok(Message::Text(text))) => CallInput::Upstream(text),
                    Some(Ok(Message::Close(frame))) => CallInput::UpstreamClosed(
                        frame.map(|f| format!("{} {}", u16::from(f.code), f.reason)),
                    ),
                    Some(Ok(_)) => continue,
                    // Refused while it arrived: the cap counts fragments as they come.
                    Some(Err(WsError::Capacity(error @ CapacityError::MessageTooLong { .. }))) => {
                        CallInput::UpstreamOversized(error.to_string())
                    }
                    Some(Err(error)) => CallInput::UpstreamClosed(Some(error.to_string())),
                    None => CallInput::UpstreamClosed(None),
                };
                let terminal = matches!(
                    input,
                    CallInput::UpstreamClosed(_) | CallInput::UpstreamOversized(_)
                );
                return Some((input, (!terminal).then_some(stream)));
            }
        },
    )))
}

/// The next input from the model, or never while its socket is not open (or has ended).
async fn next_upstream(
    upstream: &mut Option<Pin<Box<dyn Stream<Item = CallInput> + Send>>>,
) -> CallInput {
    match upstream {
        Some(stream) => match stream.next().await {
            Some(input) => input,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Writes the model's queue to its socket, every feed and flush within [`WRITE_TIMEOUT`]
/// (tungstenite accepts a message only once the previous ones are written, so nothing piles up
/// in its buffer behind a stalled socket).
async fn upstream_writer(
    mut sink: futures_util::stream::SplitSink<UpstreamSocket, Message>,
    queue: Arc<OutQueue>,
    signals: WriterSignals,
    latency: Arc<CallLatencyRecorder>,
) {
    let metrics = Arc::clone(&signals.metrics);
    // Batches are one append; these grow if a burst (audio held while connecting) needs more.
    let mut batch = Vec::with_capacity(2);
    // The model never pings through this queue (tungstenite answers its pings itself).
    let mut no_pong = None;
    let mut audio_read_at = Vec::with_capacity(2);
    let mut spent = Vec::with_capacity(2);
    let mut arena = BytesMut::new();
    while queue.pop_all(&mut batch, &mut no_pong, &mut spent).await {
        for out in batch.drain(..) {
            if out.kind == OutKind::Audio {
                audio_read_at.extend(out.caused_at);
            }
            let text = if out.kind == OutKind::Audio && out.text.len() <= UPSTREAM_WRITE_ARENA {
                // tungstenite takes the text by value and drops it once framed; a copy in the
                // arena goes instead, so the String can go back to the core for reuse.
                arena.extend_from_slice(out.text.as_bytes());
                // SAFETY: the bytes are a copy of a `str`.
                let text = unsafe { Utf8Bytes::from_bytes_unchecked(arena.split().freeze()) };
                spent.push(out.text);
                text
            } else {
                Utf8Bytes::from(out.text)
            };
            match within_write_timeout(sink.feed(Message::Text(text))).await {
                Some(Ok(())) => {}
                Some(Err(_)) => return signals.failed(false).await,
                None => return signals.failed(true).await,
            }
        }
        // One flush per batch: the messages queued together leave together.
        match within_write_timeout(sink.flush()).await {
            Some(Ok(())) => {}
            Some(Err(_)) => return signals.failed(false).await,
            None => return signals.failed(true).await,
        }
        for read_at in audio_read_at.drain(..) {
            let took = read_at.elapsed();
            metrics.uplink_added.observe(took);
            latency.uplink(took);
        }
    }
    let close = CloseFrame {
        code: CloseCode::Normal,
        reason: "call ended".into(),
    };
    let _ = within_write_timeout(sink.send(Message::Close(Some(close)))).await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl ArcWake for CountingWaker {
        fn wake_by_ref(waker: &Arc<Self>) {
            waker.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_writer_stuck_on_a_peer_that_never_reads_is_aborted_and_its_socket_closed() {
        use tokio::io::AsyncReadExt;
        let metrics = Arc::new(Metrics::default());
        let (inbox_tx, _inbox) = mpsc::channel(INBOX_CAPACITY);
        // A pipe that holds 64 bytes, whose far end is never read until the end.
        let (ours, mut theirs) = tokio::io::duplex(64);
        let (read, write) = tokio::io::split(ours);
        let (reader, writer) =
            fastwebsockets::after_handshake_split(read, write, fastwebsockets::Role::Server);
        drop(reader);
        let queue = Arc::new(OutQueue::new(
            TWILIO_AUDIO_QUEUE,
            TWILIO_CONTROL_QUEUE,
            Direction::Downlink,
            Arc::clone(&metrics),
        ));
        let task = tokio::spawn(twilio_writer(
            writer,
            Arc::clone(&queue),
            WriterSignals::new(Leg::Twilio, &metrics, &inbox_tx),
            Arc::new(CallLatencyRecorder::default()),
        ));
        let mark = super::super::engine::Outgoing {
            text: "m".repeat(1_000),
            kind: OutKind::Mark,
            caused_at: None,
        };
        queue.push(mark).unwrap();
        tokio::task::yield_now().await;
        assert_eq!(metrics.call_writers_active.load(Relaxed), 1);
        // The call ends while the writer is stuck in a write.
        queue.close();
        let began = tokio::time::Instant::now();
        stop_writer(Some(task), &metrics).await;
        let took = began.elapsed();
        assert!(took >= CLOSE_GRACE && took < WRITE_TIMEOUT, "{took:?}");
        assert_eq!(metrics.call_writers_aborted.load(Relaxed), 1);
        assert_eq!(metrics.call_writers_active.load(Relaxed), 0);
        // Its socket went with it: the peer reads what was buffered, then the end.
        let mut buffer = [0u8; 4096];
        let mut read_total = 0;
        loop {
            let n = theirs.read(&mut buffer).await.unwrap();
            if n == 0 {
                break;
            }
            read_total += n;
        }
        assert!(read_total <= 1_100, "{read_total}");
    }

    #[tokio::test]
    async fn a_write_that_cannot_complete_times_out_and_reports_a_stall() {
        let metrics = Arc::new(Metrics::default());
        let (inbox_tx, mut inbox) = mpsc::channel(INBOX_CAPACITY);
        let (ours, _theirs) = tokio::io::duplex(64);
        let (read, write) = tokio::io::split(ours);
        let (_reader, writer) =
            fastwebsockets::after_handshake_split(read, write, fastwebsockets::Role::Server);
        let queue = Arc::new(OutQueue::new(
            4,
            4,
            Direction::Downlink,
            Arc::clone(&metrics),
        ));
        let task = tokio::spawn(twilio_writer(
            writer,
            Arc::clone(&queue),
            WriterSignals::new(Leg::Twilio, &metrics, &inbox_tx),
            Arc::new(CallLatencyRecorder::default()),
        ));
        queue.push_pong(PingPayload::new(&[0xff; 125]).unwrap());
        let began = tokio::time::Instant::now();
        let signal = inbox.recv().await.expect("the writer reports");
        assert!(matches!(
            *signal,
            CallInput::WriteFailed {
                leg: Leg::Twilio,
                stalled: true
            }
        ));
        let took = began.elapsed();
        assert!(
            took >= WRITE_TIMEOUT && took < WRITE_TIMEOUT + CLOSE_GRACE,
            "{took:?}"
        );
        task.await.unwrap();
        assert_eq!(metrics.call_writers_active.load(Relaxed), 0);
    }

    #[test]
    fn poll_on_wake_polls_the_stream_only_when_it_may_have_something() {
        let (tx, mut rx) = mpsc::channel::<u32>(4);
        let polls = Arc::new(AtomicUsize::new(0));
        let inner = {
            let polls = Arc::clone(&polls);
            futures_util::stream::poll_fn(move |cx| {
                polls.fetch_add(1, Ordering::SeqCst);
                rx.poll_recv(cx)
            })
        };
        let mut gated = PollOnWake::new(inner);
        let task = Arc::new(CountingWaker::default());
        let waker = futures_util::task::waker(Arc::clone(&task));
        let mut cx = Context::from_waker(&waker);
        let polls_now = || polls.load(Ordering::SeqCst);

        assert!(gated.poll_next_unpin(&mut cx).is_pending());
        assert!(gated.poll_next_unpin(&mut cx).is_pending());
        assert_eq!(polls_now(), 1, "not polled again until woken");

        tx.try_send(7).unwrap();
        tx.try_send(8).unwrap();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task is woken");
        assert_eq!(gated.poll_next_unpin(&mut cx), Poll::Ready(Some(7)));
        // After an item the stream is polled again without a wake-up: more may be buffered.
        assert_eq!(gated.poll_next_unpin(&mut cx), Poll::Ready(Some(8)));
        assert!(gated.poll_next_unpin(&mut cx).is_pending());
        assert!(gated.poll_next_unpin(&mut cx).is_pending());
        assert_eq!(polls_now(), 4);

        drop(tx);
        assert_eq!(gated.poll_next_unpin(&mut cx), Poll::Ready(None));
    }
}
