//! One call, one task: the thin async layer around [`CallEngine`].
//!
//! [`run_call`] owns the engine, both sockets (read and write halves, [`super::legs`]), the
//! call's registry entry and every wait the call has: the tenant lookup or pre-warm claim, the
//! model's connect, tool requests, the pacer and the call's deadlines. Each is a branch of one
//! `select!` that turns whatever happened into an [`Input`] for the engine; the engine's
//! [`Output`]s go into each leg's bounded buffer and are written inline, at once when the socket
//! takes them, else when it becomes writable. No helper task, no channel, and nothing awaited
//! outside the `select!`, so neither socket ever waits for the other, for the control plane or
//! for a tool.
//!
//! The call ends on Twilio `stop`, either socket closing, the start timeout, the tenant's
//! maximum length, cancellation (shutdown), a started stream silent for
//! [`TWILIO_IDLE_TIMEOUT`], or a peer that stops reading: a leg whose socket takes nothing for
//! [`WRITE_TIMEOUT`] while bytes wait, or whose control messages pile past their cap, ends the
//! call as stalled (`voxrelay_peer_stalls_total`). Every path hands the call's report over
//! first (before waiting on any socket, so a stalled peer cannot hold it back past a shutdown),
//! then gives both sockets [`CLOSE_GRACE`] to take what is buffered and a close frame, then
//! drops them; the [`Registration`] guard removes the call from the registry, even on panic.
//! At most [`MAX_TOOL_CALLS_IN_FLIGHT`] tools run at once.
//!
//! A 20 ms frame costs no heap allocation in either direction (`cargo bench --bench alloc`):
//! messages are read in the sockets' own buffers and written from reused `String`s that go
//! back to the engine once written.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use fastwebsockets::{WebSocket, WebSocketError};
use futures_util::StreamExt;
use futures_util::future::{AbortHandle, Abortable};
use futures_util::stream::FuturesUnordered;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::agent::CallAgent;
use super::binding::{Binding, STREAM_TOKEN_PARAMETER, StreamTokens};
use super::continuity::{ConnectFailure, SessionEnd};
use super::engine::{CallEngine, CallEvent, Input, Output, Resolved, ToolCall};
use super::legs::{
    ModelRead, ModelWriter, PollOnWake, TwilioRead, TwilioWriter, model_reads, next_model_read,
    twilio_reads,
};
use super::metrics::{CallLatencyRecorder, Leg, Metrics, PublishedStats, TwilioErrorKind};
use super::model::ModelSession;
use super::playback::PlaybackConfig;
use super::prewarm::{PendingCalls, Prepared, PrewarmError, prewarm};
use super::registry::{CallEntry, CallRegistry, Registration};
use super::report::{CallIdentity, call_report};
use crate::config::{
    AgentDefaults, ContinuitySettings, MAX_TWILIO_MESSAGE_BYTES, ModelTargets, START_TIMEOUT,
};
use crate::control::api::ReportBinding;
use crate::control::client::ControlPlaneClient;
use crate::control::directory::TenantDirectory;
use crate::control::reports::{ReportHandover, ReportSender};
use crate::control::tool_calls::{DEFAULT_TOOL_TIMEOUT, run_tool};
use crate::logtext::Untrusted;
use crate::recording::{CallRecording, ReportRecording};
use crate::twilio::stream::StartInfo;
use crate::upstream::connect::connect_model;
use crate::upstream::{UpstreamError, UpstreamSocket};

pub use super::engine::EndReason;

/// The longest a leg's socket may take nothing while bytes wait for it. A 20 ms frame that
/// cannot be written for 5 s means a caller who has heard nothing for 5 s, or a model that
/// has heard nothing: past TCP's retransmissions on a lossy path, and not a call worth
/// holding. The call ends as stalled (`voxrelay_peer_stalls_total{leg}`). The clock starts only
/// when a write does not complete at once, so a reading peer costs no timer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// A started stream that sends nothing for this long is dead (Twilio sends a `media` every
/// 20 ms, silence included): the call ends (`twilio_errors_total{kind="idle_timeout"}`).
pub const TWILIO_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Tools of one call running at once; a further call from the model is answered at once with
/// an error (counted in `voxrelay_control_tool_failures_total`) instead of starting a request.
pub const MAX_TOOL_CALLS_IN_FLIGHT: usize = 4;
/// A model socket silent this long is asked for a pong (the Realtime API sends nothing while
/// the caller is silent and no response runs, so silence alone proves nothing).
pub const MODEL_PING_AFTER: Duration = Duration::from_secs(2);
/// How long the sockets get to take what is buffered and a close frame after the call ends;
/// a socket still busy then is dropped (closed), counted in
/// `voxrelay_call_writers_aborted_total`.
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
    /// Where each provider's sessions are dialled.
    pub models: ModelTargets,
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
    /// How calls keep (and replace) their model session.
    pub continuity: ContinuitySettings,
    /// Whether calls are recorded, and where.
    pub recording: crate::recording::RecordingSettings,
}

/// The control plane as the calls use it.
pub struct ControlServices {
    pub client: ControlPlaneClient,
    pub directory: TenantDirectory,
    pub reports: ReportSender,
}

impl CallServices {
    /// The model session `agent` runs on this bridge, built by the provider factory. Tools
    /// run only for a tenant's agent with tools, on a bridge with a control plane.
    pub fn model_session(&self, agent: &CallAgent) -> ModelSession {
        let tools_enabled =
            self.control.is_some() && agent.tenant_id.is_some() && !agent.tools.is_empty();
        ModelSession::new(agent.session_settings(), tools_enabled)
    }

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
            Some(context) => CallAgent::from_context(context, from, source, self.agent.provider),
            None => CallAgent::from_defaults(&self.agent, source),
        };
        (agent, resolution.took)
    }
}

/// The voice webhook's head start on a call whose agent it has found: (when `with_prewarm`:
/// enabled and under the cap) the upstream session opened and configured for that agent.
/// A pre-warm the model refuses with 429 is remembered, so the call falls back at once
/// instead of trying again within its reconnect budget.
pub async fn prepare_call(
    services: Arc<CallServices>,
    agent: CallAgent,
    lookup_took: Duration,
    call_sid: String,
    with_prewarm: bool,
) -> Prepared {
    let mut prewarm_refused = None;
    let dial = services.models.dial(agent.provider, agent.model.as_deref());
    if dial.is_none() {
        tracing::warn!(
            call_sid,
            provider = agent.provider.as_str(),
            "the tenant's provider has no key on this bridge: the call falls back"
        );
        prewarm_refused = Some(ConnectFailure::NotConfigured);
    }
    let session = if let (true, Some(dial)) = (with_prewarm, dial) {
        services.metrics.prewarm_started.fetch_add(1, Relaxed);
        let session = services.model_session(&agent);
        match prewarm(&dial, session, PREWARM_WITHIN).await {
            Ok(session) => {
                services.metrics.upstream_connect.observe(session.took);
                Some(session)
            }
            Err(error) => {
                services.metrics.prewarm_failed.fetch_add(1, Relaxed);
                if let PrewarmError::Upstream(UpstreamError::HandshakeRejected(429)) = error {
                    tracing::warn!(call_sid, "pre-warm rate limited (429): the call falls back");
                    prewarm_refused = Some(ConnectFailure::RateLimited);
                } else {
                    tracing::warn!(call_sid, %error, "pre-warm failed: the stream will connect cold");
                }
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
        prewarm_refused,
    }
}

/// The value of a form field or TwiML `<Parameter>` named `name`, if present.
pub(crate) fn parameter<'a>(parameters: &'a [(String, String)], name: &str) -> Option<&'a str> {
    parameters
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// A peer that stopped reading on `leg`.
fn stalled(leg: Leg) -> EndReason {
    match leg {
        Leg::Twilio => EndReason::TwilioStalled,
        Leg::Upstream => EndReason::UpstreamStalled,
    }
}

/// What a `start` gets. A bound stream (its token verified for its `CallSid` and `To`, and it
/// was the first to present it) claims its webhook's preparation, or, if there is none here
/// (it expired, or the webhook ran on another machine), resolves the tenant of its `To`, which
/// the token vouches for. Anything else gets the environment's agent: an unbound stream's
/// parameters are whatever its TwiML (or a forger) said, so they never choose a tenant.
async fn claim_or_resolve(
    services: Arc<CallServices>,
    binding: Binding,
    call_sid: String,
    to: Option<String>,
    from: String,
) -> Prepared {
    let fallback = |source| Prepared {
        agent: CallAgent::from_defaults(&services.agent, source),
        lookup_took: Duration::ZERO,
        session: None,
        prewarm_refused: None,
    };
    if binding != Binding::Bound {
        return fallback(if services.control.is_some() {
            "fallback"
        } else {
            "static"
        });
    }
    if let Some(preparation) = services.pending.claim(&call_sid) {
        match tokio::time::timeout(CLAIM_WAIT, preparation).await {
            Ok(Ok(prepared)) => return prepared,
            Ok(Err(_)) => tracing::warn!("the call's preparation was lost: starting cold"),
            Err(_) => tracing::warn!("the call's preparation is late: starting cold"),
        }
    }
    match to.filter(|to| !to.is_empty()) {
        Some(to) => {
            let (agent, lookup_took) = services.resolve_agent(&to, &from, &call_sid).await;
            Prepared {
                agent,
                lookup_took,
                session: None,
                prewarm_refused: None,
            }
        }
        None => fallback("static"),
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

/// The call's loop: wait for anything, let the engine take it, write what it said.
async fn drive<S>(
    ws: WebSocket<S>,
    services: Arc<CallServices>,
    cancel: CancellationToken,
    span: tracing::Span,
) -> EndReason
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut call = Call::new(ws, services, cancel.clone(), span);
    // Gated like the sockets: polled only once its waker fires, so a pass of the loop does not
    // take the token's lock (1.3% of the bridge's CPU under 150 calls when polled every pass).
    let mut cancelled = PollOnWake::new(futures_util::stream::once(Box::pin(
        cancel.clone().cancelled_owned(),
    )));
    let reason = loop {
        call.arm_timers();
        let wake = call.next_wake(&mut cancelled).await;
        let now = Instant::now();
        if let Some(reason) = call.on_wake(now, wake) {
            break reason;
        }
        if let Some(reason) = call.dispatch(now) {
            break reason;
        }
        if let Some(reason) = call.write_now(now) {
            break reason;
        }
    };
    // Boxed: the close path's await states are needed once per call, and inline they would
    // widen the call's task by their size for its whole life.
    Box::pin(call.finish(reason)).await;
    reason
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type ReadStream<T> = Pin<Box<dyn futures_util::Stream<Item = T> + Send>>;
type ConnectResult = Result<(UpstreamSocket, Duration), (ConnectFailure, String)>;

/// What woke the call's task.
enum Wake {
    Cancelled,
    Twilio(TwilioRead),
    Model(ModelRead),
    TwilioWritten(std::io::Result<usize>),
    ModelWritten(Result<(), tokio_tungstenite::tungstenite::Error>),
    /// Boxed: an agent is large, and arrives once per call.
    Resolved(Box<Prepared>),
    /// Boxed: a socket is large, and arrives once per call.
    Connected(Box<ConnectResult>),
    /// A renewal's standby socket (boxed, as `Connected`).
    StandbyConnected(Box<ConnectResult>),
    ToolDone {
        call_id: String,
        output: String,
    },
    /// A tool the model cancelled was aborted: nothing to answer.
    ToolCancelled,
    Pacer,
    Deadline,
    IdleCheck,
    StallCheck,
    ModelWatch,
}

/// What the call loop's one long timer is waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallDeadline {
    /// Twilio's `start` (the socket is closed without one).
    Start,
    /// The tenant's `max_call_seconds`.
    MaxLength,
}

/// The call's timers. They live across the loop's passes and are reset only when their
/// deadline moves: a timer built anew on every pass would register with the timer wheel once
/// per message.
struct Timers {
    pacer: Pin<Box<tokio::time::Sleep>>,
    pacer_at: Option<Instant>,
    /// Before `start`: the start timeout; after the agent is known, its maximum call length.
    deadline: Pin<Box<tokio::time::Sleep>>,
    deadline_kind: Option<CallDeadline>,
    /// Checked every [`TWILIO_IDLE_TIMEOUT`], not reset per message: a message only stores
    /// its time.
    idle: Pin<Box<tokio::time::Sleep>>,
    last_twilio_at: Instant,
    stall: Pin<Box<tokio::time::Sleep>>,
    stall_at: Option<Instant>,
    /// The model's silence: a ping after [`MODEL_PING_AFTER`], a lost session after the
    /// services' `model_idle_timeout`. Checked, not reset per message, like `idle`.
    model_watch: Pin<Box<tokio::time::Sleep>>,
    model_watch_armed: bool,
    last_model_at: Instant,
    model_pinged: bool,
}

impl Timers {
    fn new(now: Instant) -> Self {
        let sleep = |after| Box::pin(tokio::time::sleep(after));
        Self {
            pacer: sleep(Duration::ZERO),
            pacer_at: None,
            deadline: sleep(START_TIMEOUT),
            deadline_kind: Some(CallDeadline::Start),
            idle: sleep(TWILIO_IDLE_TIMEOUT),
            last_twilio_at: now,
            stall: sleep(Duration::ZERO),
            stall_at: None,
            model_watch: sleep(MODEL_PING_AFTER),
            model_watch_armed: false,
            last_model_at: now,
            model_pinged: false,
        }
    }

    fn arm(
        sleep: &mut Pin<Box<tokio::time::Sleep>>,
        armed: &mut Option<Instant>,
        at: Option<Instant>,
    ) {
        if at != *armed {
            if let Some(at) = at {
                sleep.as_mut().reset(at.into());
            }
            *armed = at;
        }
    }
}

/// A call's waits other than its sockets, each polled by the call loop itself.
#[derive(Default)]
struct Waits {
    /// The claim of the webhook's preparation, or the tenant lookup.
    resolving: Option<BoxFuture<Prepared>>,
    connecting: Option<BoxFuture<ConnectResult>>,
    /// A renewal's standby connect.
    standby: Option<BoxFuture<ConnectResult>>,
    /// Running tools; one the model cancels is aborted (it then yields `None`).
    tools: FuturesUnordered<BoxFuture<Option<(String, String)>>>,
    /// Abort handles of the running tools by call id (at most [`MAX_TOOL_CALLS_IN_FLIGHT`]).
    tool_aborts: Vec<(String, AbortHandle)>,
}

/// Awaits the future in `slot`, then empties it; never completes while `slot` is empty.
/// Cancel-safe: a wait dropped by `select!` leaves the future in its slot.
async fn maybe<T>(slot: &mut Option<BoxFuture<T>>) -> T {
    let Some(future) = slot.as_mut() else {
        return std::future::pending().await;
    };
    let output = future.await;
    *slot = None;
    output
}

/// Who a call is, as its `start` said, and the undertaking to hand its report over (`None`
/// without a control plane).
struct CallRecord {
    identity: CallIdentity,
    handover: Option<ReportHandover>,
}

/// Everything one call's task owns.
struct Call<S> {
    engine: CallEngine,
    services: Arc<CallServices>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    span: tracing::Span,
    twilio_reads: ReadStream<TwilioRead>,
    twilio_out: TwilioWriter<tokio::io::WriteHalf<S>>,
    model_reads: Option<ReadStream<ModelRead>>,
    model_out: ModelWriter,
    waits: Waits,
    timers: Timers,
    latency: CallLatencyRecorder,
    published: PublishedStats,
    registration: Option<Registration>,
    record: Option<CallRecord>,
    agent: Option<CallAgent>,
    /// How the session being replaced ended, for the reconnect metric's label.
    lost_session: Option<SessionEnd>,
    /// A renewal's standby socket, open and untouched until the switch.
    standby: Option<UpstreamSocket>,
    /// The call's recording, once its agent is known.
    recording: CallRecording,
}

impl<S> Call<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn new(
        ws: WebSocket<S>,
        services: Arc<CallServices>,
        cancel: CancellationToken,
        span: tracing::Span,
    ) -> Self {
        // fastwebsockets reads; the write half is the raw stream's, framed by `TwilioWriter`
        // so a write can be offered to the socket without waiting.
        let write_half = std::cell::Cell::new(None);
        let (read_half, _unused) = ws.split(|stream| {
            let (read, write) = tokio::io::split(stream);
            write_half.set(Some(write));
            (read, tokio::io::sink())
        });
        let write_half = write_half
            .into_inner()
            .expect("the split function runs once");
        Self {
            engine: CallEngine::with_continuity(
                services.playback.clone(),
                services.continuity.for_call(),
            ),
            metrics: Arc::clone(&services.metrics),
            services,
            cancel,
            span,
            twilio_reads: Box::pin(twilio_reads(read_half)),
            twilio_out: TwilioWriter::new(write_half),
            model_reads: None,
            model_out: ModelWriter::default(),
            waits: Waits::default(),
            timers: Timers::new(Instant::now()),
            latency: CallLatencyRecorder::default(),
            published: PublishedStats::default(),
            registration: None,
            record: None,
            agent: None,
            lost_session: None,
            standby: None,
            recording: CallRecording::Off,
        }
    }

    fn arm_timers(&mut self) {
        let timers = &mut self.timers;
        Timers::arm(
            &mut timers.pacer,
            &mut timers.pacer_at,
            self.engine.poll_timeout(),
        );
        let stalled_since = match (
            self.twilio_out.stalled_since(),
            self.model_out.stalled_since(),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Timers::arm(
            &mut timers.stall,
            &mut timers.stall_at,
            stalled_since.map(|since| since + WRITE_TIMEOUT),
        );
    }

    async fn next_wake(
        &mut self,
        cancelled: &mut (impl futures_util::Stream<Item = ()> + Unpin),
    ) -> Wake {
        let metrics = &*self.metrics;
        let latency = &self.latency;
        let model_out = &mut self.model_out;
        tokio::select! {
            biased;
            Some(()) = cancelled.next() => Wake::Cancelled,
            read = self.twilio_reads.next() => Wake::Twilio(read.unwrap_or(TwilioRead::Closed)),
            read = next_model_read(&mut self.model_reads) => Wake::Model(read),
            written = self.twilio_out.writable(), if self.twilio_out.has_pending() => {
                Wake::TwilioWritten(written)
            }
            written = std::future::poll_fn(|cx| model_out.poll_drive(cx, metrics, latency)),
                if model_out.has_pending() => Wake::ModelWritten(written),
            prepared = maybe(&mut self.waits.resolving) => Wake::Resolved(Box::new(prepared)),
            connected = maybe(&mut self.waits.connecting) => Wake::Connected(Box::new(connected)),
            standby = maybe(&mut self.waits.standby) => Wake::StandbyConnected(Box::new(standby)),
            Some(done) = self.waits.tools.next(), if !self.waits.tools.is_empty() => match done {
                Some((call_id, output)) => Wake::ToolDone { call_id, output },
                None => Wake::ToolCancelled,
            },
            () = self.timers.pacer.as_mut(), if self.timers.pacer_at.is_some() => Wake::Pacer,
            () = self.timers.deadline.as_mut(), if self.timers.deadline_kind.is_some() => Wake::Deadline,
            () = self.timers.idle.as_mut() => Wake::IdleCheck,
            () = self.timers.stall.as_mut(), if self.timers.stall_at.is_some() => Wake::StallCheck,
            () = self.timers.model_watch.as_mut(), if self.timers.model_watch_armed => Wake::ModelWatch,
        }
    }

    /// Turns what woke the task into the engine's input; `Some` when the call must end.
    fn on_wake(&mut self, now: Instant, wake: Wake) -> Option<EndReason> {
        match wake {
            Wake::Cancelled => return Some(EndReason::Shutdown),
            Wake::Twilio(read) => return self.on_twilio_read(now, read),
            Wake::Model(ModelRead::Text(text)) => {
                self.model_heard(now);
                self.feed(now, Input::Model(&text));
            }
            Wake::Model(ModelRead::Alive) => self.model_heard(now),
            Wake::Model(ModelRead::Closed(why)) => {
                self.metrics.upstream_disconnects.fetch_add(1, Relaxed);
                tracing::warn!(
                    why = %Untrusted(why.as_deref().unwrap_or("-")),
                    "model socket closed"
                );
                self.lose_model(now, EndReason::UpstreamClosed);
            }
            Wake::Model(ModelRead::Oversized(why)) => {
                self.metrics.upstream_oversized.fetch_add(1, Relaxed);
                tracing::warn!(%why, "model message over its size cap");
                self.lose_model(now, EndReason::UpstreamOversized);
            }
            Wake::TwilioWritten(Ok(n)) if n > 0 => {
                self.twilio_out.wrote(n, &self.metrics, &self.latency);
            }
            Wake::TwilioWritten(_) => {
                tracing::info!("twilio socket write failed: ending the call");
                return Some(EndReason::TwilioClosed);
            }
            Wake::ModelWritten(Ok(())) => {}
            Wake::ModelWritten(Err(error)) => {
                self.metrics.upstream_disconnects.fetch_add(1, Relaxed);
                tracing::info!(%error, "model socket write failed");
                self.lose_model(now, EndReason::UpstreamClosed);
            }
            Wake::Resolved(prepared) => self.on_resolved(now, *prepared),
            Wake::Connected(connected) => match *connected {
                Ok((socket, took)) => {
                    self.metrics.upstream_connect.observe(took);
                    tracing::debug!(?took, "model socket open");
                    self.attach_model(now, socket);
                    self.feed(now, Input::ModelConnected);
                }
                Err((failure, error)) => {
                    self.metrics.upstream_connect_failures.fetch_add(1, Relaxed);
                    tracing::warn!(
                        kind = failure.as_str(),
                        error = %Untrusted(&error),
                        "could not reach the model"
                    );
                    self.feed(now, Input::ModelConnectFailed(failure));
                }
            },
            Wake::StandbyConnected(connected) => match *connected {
                Ok((socket, took)) => {
                    self.metrics.upstream_connect.observe(took);
                    tracing::debug!(?took, "standby model socket open");
                    self.standby = Some(socket);
                    self.feed(now, Input::StandbyConnected);
                }
                Err((failure, error)) => {
                    self.metrics.upstream_connect_failures.fetch_add(1, Relaxed);
                    tracing::warn!(
                        kind = failure.as_str(),
                        error = %Untrusted(&error),
                        "could not open the standby model socket"
                    );
                    self.feed(now, Input::StandbyFailed(failure));
                }
            },
            Wake::ToolCancelled => {}
            Wake::ToolDone { call_id, output } => {
                self.waits.tool_aborts.retain(|(id, _)| *id != call_id);
                self.feed(
                    now,
                    Input::ToolResult {
                        call_id: &call_id,
                        output: &output,
                    },
                );
            }
            Wake::Pacer => {
                if let Some(due) = self.timers.pacer_at.take() {
                    // How late the pacer wakes is what the playback lead must absorb.
                    self.metrics
                        .pacer_lateness
                        .observe(now.saturating_duration_since(due));
                }
                self.feed(now, Input::Tick);
            }
            Wake::Deadline => {
                return Some(match self.timers.deadline_kind.take() {
                    Some(CallDeadline::MaxLength) => {
                        self.metrics.calls_max_duration.fetch_add(1, Relaxed);
                        tracing::info!("the tenant's maximum call length passed: ending the call");
                        EndReason::MaxDuration
                    }
                    Some(CallDeadline::Start) | None => {
                        self.metrics.twilio_error(TwilioErrorKind::StartTimeout);
                        tracing::warn!("no `start` within {START_TIMEOUT:?}: closing");
                        EndReason::StartTimeout
                    }
                });
            }
            Wake::IdleCheck => {
                let silent_until = self.timers.last_twilio_at + TWILIO_IDLE_TIMEOUT;
                if now >= silent_until {
                    self.metrics.twilio_error(TwilioErrorKind::IdleTimeout);
                    tracing::warn!("no message from Twilio for {TWILIO_IDLE_TIMEOUT:?}: closing");
                    return Some(EndReason::TwilioIdle);
                }
                self.timers.idle.as_mut().reset(silent_until.into());
            }
            Wake::StallCheck => {
                self.timers.stall_at = None;
                let past = |since: Option<Instant>| since.is_some_and(|s| now >= s + WRITE_TIMEOUT);
                let leg = if past(self.twilio_out.stalled_since()) {
                    Leg::Twilio
                } else if past(self.model_out.stalled_since()) {
                    Leg::Upstream
                } else {
                    return None;
                };
                self.metrics.peer_stalled(leg);
                tracing::warn!(
                    leg = leg.as_str(),
                    "a socket took nothing for {WRITE_TIMEOUT:?}: the peer is not reading"
                );
                if leg == Leg::Upstream {
                    // A model that stopped reading is a lost session, not a lost call.
                    self.lose_model(now, EndReason::UpstreamStalled);
                    return None;
                }
                return Some(stalled(leg));
            }
            Wake::ModelWatch => self.watch_model(now),
        }
        None
    }

    /// Any frame from the model: it is alive.
    fn model_heard(&mut self, now: Instant) {
        self.timers.last_model_at = now;
        self.timers.model_pinged = false;
    }

    /// The model's silence check: a ping first, then, still silent at the deadline, the
    /// session counts as lost.
    fn watch_model(&mut self, now: Instant) {
        if !self.model_out.is_attached() {
            self.timers.model_watch_armed = false;
            return;
        }
        let idle_deadline = self.timers.last_model_at + self.services.continuity.model_idle_timeout;
        let ping_at = self.timers.last_model_at + MODEL_PING_AFTER;
        if now >= idle_deadline {
            tracing::warn!(
                "the model sent nothing, not even a pong, for {:?}: treating the session as lost",
                self.services.continuity.model_idle_timeout
            );
            self.lose_model(now, EndReason::UpstreamIdle);
            return;
        }
        let next = if now >= ping_at {
            if !self.timers.model_pinged {
                self.timers.model_pinged = true;
                self.model_out.ping();
            }
            idle_deadline
        } else {
            ping_at
        };
        self.timers.model_watch.as_mut().reset(next.into());
    }

    /// The model's socket is gone: what was queued for it goes with it, and the engine decides
    /// what comes next (a successor, or the fallback).
    fn lose_model(&mut self, now: Instant, reason: EndReason) {
        self.model_reads = None;
        self.model_out.detach(&mut self.engine);
        self.timers.model_watch_armed = false;
        self.feed(now, Input::ModelClosed(reason));
    }

    fn on_twilio_read(&mut self, now: Instant, read: TwilioRead) -> Option<EndReason> {
        match read {
            TwilioRead::Text(text) => {
                self.timers.last_twilio_at = now;
                self.feed(now, Input::Twilio(&text));
            }
            TwilioRead::Ping(payload) => {
                self.timers.last_twilio_at = now;
                self.twilio_out.queue.push_pong(payload);
            }
            TwilioRead::Closed => return Some(EndReason::TwilioClosed),
            TwilioRead::Failed(error) => {
                if matches!(error, WebSocketError::FrameTooLarge) {
                    self.metrics.twilio_error(TwilioErrorKind::Oversized);
                    tracing::warn!("twilio message over {MAX_TWILIO_MESSAGE_BYTES} bytes: closing");
                } else {
                    tracing::info!(%error, "twilio socket failed");
                }
                return Some(EndReason::TwilioError);
            }
        }
        None
    }

    /// Gives the engine one input; a refused input is logged within the call's budget (the
    /// text may quote the peer's: escaped and cut).
    fn feed(&mut self, now: Instant, input: Input<'_>) {
        if let Err(error) = self.engine.handle(now, input)
            && self.engine.allow_warning()
        {
            tracing::warn!(error = %Untrusted(&error.to_string()), "message ignored");
        }
    }

    /// Acts on everything the engine asked for; `Some` when the call must end.
    fn dispatch(&mut self, now: Instant) -> Option<EndReason> {
        while let Some(output) = self.engine.poll_output() {
            match output {
                Output::ToTwilio(out) => match self.twilio_out.push(out) {
                    Ok(0) => {}
                    Ok(dropped) => self
                        .metrics
                        .audio_dropped(super::metrics::Direction::Downlink, dropped as u64),
                    Err(_) => return Some(self.control_queue_full(Leg::Twilio)),
                },
                Output::ToModel(out) => match self.model_out.queue.push(out) {
                    Ok(0) => {}
                    Ok(dropped) => self
                        .metrics
                        .audio_dropped(super::metrics::Direction::Uplink, dropped as u64),
                    Err(_) => {
                        // A model that stopped reading is a lost session, not a lost call.
                        self.control_queue_full(Leg::Upstream);
                        self.lose_model(now, EndReason::UpstreamStalled);
                    }
                },
                Output::CallTool(call) => self.start_tool(now, call),
                Output::CancelTool { call_id } => self.cancel_tool(&call_id),
                Output::ConnectModel { deadline } => {
                    self.waits.connecting = Some(self.dial_model(now, deadline));
                }
                Output::ConnectStandby { deadline } => {
                    self.waits.standby = Some(self.dial_model(now, deadline));
                }
                Output::SwitchToStandby => self.switch_to_standby(now),
                Output::Event(CallEvent::Started(info)) => {
                    if let Some(reason) = self.on_started(info) {
                        return Some(reason);
                    }
                }
                Output::Event(CallEvent::ModelLost(end)) => {
                    self.metrics.model_session_lost(end);
                    self.lost_session = Some(end);
                }
                Output::Event(CallEvent::ModelRestored { gap }) => {
                    let end = self.lost_session.take().unwrap_or(SessionEnd::Dropped);
                    self.metrics.model_reconnected(end, gap);
                }
                Output::Event(CallEvent::FellBack(reason)) => self.metrics.call_fell_back(reason),
                Output::Event(CallEvent::ModelRenewed { forced }) => {
                    self.metrics.model_renewed(forced);
                }
                Output::Close(reason) => return Some(reason),
            }
        }
        None
    }

    fn control_queue_full(&self, leg: Leg) -> EndReason {
        self.metrics.peer_stalled(leg);
        tracing::warn!(
            leg = leg.as_str(),
            "outbound control queue full: the peer is not reading"
        );
        stalled(leg)
    }

    /// Publishes the engine's counters and offers both legs' bytes to their sockets.
    fn write_now(&mut self, now: Instant) -> Option<EndReason> {
        self.metrics
            .publish_call_stats(self.engine.stats(), &mut self.published);
        if let Err(error) =
            self.twilio_out
                .write_now(&mut self.engine, now, &self.metrics, &self.latency)
        {
            tracing::info!(%error, "twilio socket write failed: ending the call");
            return Some(EndReason::TwilioClosed);
        }
        if let Err(error) = self.model_out.write_now(now, &self.metrics, &self.latency) {
            self.metrics.upstream_disconnects.fetch_add(1, Relaxed);
            tracing::info!(%error, "model socket write failed");
            self.lose_model(now, EndReason::UpstreamClosed);
            // The engine's answer (a connect, or the fallback's close) is acted on at once.
            return self.dispatch(now);
        }
        self.model_out.give_back(&mut self.engine);
        None
    }

    /// Twilio's `start`: who is calling, whether the stream may go on, and which agent
    /// answers (found while the call goes on reading).
    fn on_started(&mut self, info: StartInfo) -> Option<EndReason> {
        let services = Arc::clone(&self.services);
        let metrics = &self.metrics;
        self.span.record("stream_sid", info.stream_sid.as_str());
        self.span.record("call_sid", info.call_sid.as_str());
        if let Some(account) = &services.twilio_account_sid
            && info.account_sid != *account
        {
            metrics.streams_refused_account.fetch_add(1, Relaxed);
            tracing::warn!("stream from another Twilio account: closing it");
            return Some(EndReason::AccountRefused);
        }
        let entry = CallEntry {
            call_sid: info.call_sid.clone(),
            started: Instant::now(),
            cancel: self.cancel.clone(),
        };
        match services.registry.register(&info.stream_sid, entry) {
            Ok(guard) => self.registration = Some(guard),
            Err(duplicate) => {
                tracing::warn!("{duplicate}: refusing the second socket");
                return Some(EndReason::DuplicateStream);
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
        if binding.is_refused() || (binding == Binding::Unbound && services.require_stream_token) {
            metrics.streams_refused_token.fetch_add(1, Relaxed);
            tracing::warn!(
                binding = binding.as_str(),
                "stream token refused: closing the stream"
            );
            return Some(EndReason::StreamTokenRefused);
        }
        if binding == Binding::Unbound {
            metrics.streams_unbound.fetch_add(1, Relaxed);
            tracing::warn!(
                "stream without a token let through (VOXRELAY_REQUIRE_STREAM_TOKEN=0): \
                 the fallback agent answers, the report is marked unbound"
            );
        }
        self.waits.resolving = Some(Box::pin(
            claim_or_resolve(
                Arc::clone(&services),
                binding,
                info.call_sid.clone(),
                to.map(str::to_owned),
                from.to_owned(),
            )
            .in_current_span(),
        ));
        self.record = Some(CallRecord {
            identity: CallIdentity {
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
            },
            handover: services
                .control
                .as_ref()
                .map(|control| control.reports.expect_report()),
        });
        // No start timeout any more; the agent's maximum length is set when it is known.
        self.timers.deadline_kind = None;
        None
    }

    /// The agent is known: the engine gets its model session, pre-warmed or to be opened.
    fn on_resolved(&mut self, now: Instant, prepared: Prepared) {
        let agent = prepared.agent;
        let record = self.record.as_ref();
        let (from, to) = record.map_or(("", ""), |r| {
            (r.identity.from.as_str(), r.identity.to.as_str())
        });
        tracing::info!(
            from = %redact_number(from),
            to = %redact_number(to),
            tenant = agent.tenant_id.as_deref().unwrap_or("-"),
            agent = %agent.agent_name,
            source = agent.source,
            lookup_us = prepared.lookup_took.as_micros() as u64,
            prewarmed = prepared.session.is_some(),
            mode = %agent.audio_mode,
            "stream started"
        );
        if let Some(limit) = agent.max_call {
            self.timers.deadline.as_mut().reset((now + limit).into());
            self.timers.deadline_kind = Some(CallDeadline::MaxLength);
        }
        // A fresh session is dialled when the engine asks (`Output::ConnectModel`).
        let hold_prompt = agent.hold_prompt.clone();
        let refused = prepared.prewarm_refused;
        let session = match prepared.session {
            Some(prewarmed) => {
                self.metrics.prewarm_claimed.fetch_add(1, Relaxed);
                self.attach_model(now, prewarmed.socket);
                prewarmed.session
            }
            None => self.services.model_session(&agent),
        };
        if let Some(record) = &self.record {
            let (recording, tap) = CallRecording::start(
                &self.services.recording,
                &self.metrics,
                &record.identity,
                &agent,
            );
            if let Some(tap) = tap {
                self.engine.set_media_tap(tap);
            }
            self.recording = recording;
        }
        self.agent = Some(agent);
        self.feed(
            now,
            Input::ContextResolved(Box::new(Resolved {
                session,
                hold_prompt,
                refused,
            })),
        );
    }

    /// The renewal's switch: what the old socket can take now goes, with a close frame if it
    /// fits, and the standby takes its place.
    fn switch_to_standby(&mut self, now: Instant) {
        let Some(standby) = self.standby.take() else {
            // The engine asks only once the standby is open; without it this is a loss.
            self.lose_model(now, EndReason::UpstreamClosed);
            return;
        };
        let _ = self.model_out.write_now(now, &self.metrics, &self.latency);
        if self.model_out.has_pending() {
            tracing::info!("the renewed session's socket had not taken everything: dropped");
        }
        self.model_out.close_now();
        self.model_out.detach(&mut self.engine);
        self.model_reads = None;
        self.attach_model(now, standby);
    }

    /// Dials the model, as a wait of this task (its answer wakes the task).
    fn dial_model(&self, now: Instant, deadline: Instant) -> BoxFuture<ConnectResult> {
        let (provider, model) = match &self.agent {
            Some(agent) => (agent.provider, agent.model.as_deref()),
            None => (self.services.agent.provider, None),
        };
        let Some(dial) = self.services.models.dial(provider, model) else {
            return Box::pin(std::future::ready(Err((
                ConnectFailure::NotConfigured,
                format!("no {provider} key on this bridge"),
            ))));
        };
        let within = deadline.saturating_duration_since(now);
        Box::pin(
            async move {
                let began = Instant::now();
                let connecting = connect_model(&dial);
                match tokio::time::timeout(within, connecting).await {
                    Ok(Ok(socket)) => Ok((socket, began.elapsed())),
                    Ok(Err(error)) => Err((classify_connect_error(&error), error.to_string())),
                    Err(_) => Err((ConnectFailure::Timeout, "connect timed out".to_owned())),
                }
            }
            .in_current_span(),
        )
    }

    fn attach_model(&mut self, now: Instant, socket: UpstreamSocket) {
        let (sink, stream) = socket.split();
        self.model_out.attach(sink);
        self.model_reads = Some(model_reads(stream));
        self.timers.last_model_at = now;
        self.timers.model_pinged = false;
        self.timers.model_watch_armed = true;
        self.timers
            .model_watch
            .as_mut()
            .reset((now + MODEL_PING_AFTER).into());
    }

    /// Runs one of the model's function calls on the control plane, as a wait of this task;
    /// the answer comes back as [`Input::ToolResult`]. The call never waits on a tool: the
    /// model is told when it fails, and the call's end abandons tools still running.
    fn start_tool(&mut self, now: Instant, tool_call: ToolCall) {
        let refuse = |call: &mut Self, output: &str| {
            call.metrics.control_tool_failures.fetch_add(1, Relaxed);
            call.feed(
                now,
                Input::ToolResult {
                    call_id: &tool_call.call_id,
                    output,
                },
            );
        };
        // The engine asks only when tools are enabled: a tenant's agent, with a control plane.
        let (Some(control), Some(record), Some(tenant_id)) = (
            &self.services.control,
            &self.record,
            self.agent
                .as_ref()
                .and_then(|agent| agent.tenant_id.clone()),
        ) else {
            refuse(self, r#"{"error":"no tools are available on this line"}"#);
            return;
        };
        if self.waits.tools.len() >= MAX_TOOL_CALLS_IN_FLIGHT {
            if self.engine.allow_warning() {
                tracing::warn!(
                    "the model called a tool with {MAX_TOOL_CALLS_IN_FLIGHT} still running: refused"
                );
            }
            refuse(
                self,
                r#"{"error":"too many tool calls at once; wait for the running ones"}"#,
            );
            return;
        }
        let client = control.client.clone();
        let call_sid = record.identity.call_sid.clone();
        let (abort, registration) = AbortHandle::new_pair();
        self.waits
            .tool_aborts
            .push((tool_call.call_id.clone(), abort));
        let running = Abortable::new(
            async move {
                let output = run_tool(
                    &client,
                    &tool_call.name,
                    &call_sid,
                    &tenant_id,
                    &tool_call.arguments,
                    DEFAULT_TOOL_TIMEOUT,
                )
                .await;
                (tool_call.call_id, output)
            },
            registration,
        );
        self.waits.tools.push(Box::pin(
            async move { running.await.ok() }.in_current_span(),
        ));
    }

    /// The model withdrew a tool call: its request is abandoned and its answer never sent.
    fn cancel_tool(&mut self, call_id: &str) {
        if let Some(at) = self
            .waits
            .tool_aborts
            .iter()
            .position(|(id, _)| id == call_id)
        {
            let (_, abort) = self.waits.tool_aborts.swap_remove(at);
            abort.abort();
            self.metrics.tools_cancelled.fetch_add(1, Relaxed);
        }
    }

    /// The call is over: the report first, then both sockets get [`CLOSE_GRACE`] to take what
    /// is buffered and a close frame, then they are dropped with the registry entry.
    async fn finish(mut self, reason: EndReason) {
        let stats = self.engine.stats();
        // Summed up once, here: O(the telemetry's bounded state), not per frame.
        let audio = self.engine.audio_summary();
        self.metrics.audio.record_call(&audio);
        self.metrics.publish_call_stats(stats, &mut self.published);
        // The provider the call's agent ran on; a call that ended before its agent was known
        // would have had the environment's (as its report says).
        let provider = self
            .agent
            .as_ref()
            .map_or(self.services.agent.provider, |agent| agent.provider);
        tracing::info!(
            provider = provider.as_str(),
            frames_in = stats.frames_in,
            frames_out = stats.frames_out,
            barge_ins = stats.barge_ins,
            upstream_errors = stats.upstream_errors,
            warnings_suppressed = self.engine.warnings_suppressed(),
            "call summary"
        );
        if let Some(agent) = &self.agent {
            self.metrics
                .provider(agent.provider)
                .record_call(stats, &self.latency);
            self.metrics.turns.record(
                agent.tenant_id.as_deref(),
                agent.provider,
                &stats.turns.all(),
            );
        }
        // The report names the recording: its file is finalised first (bounded wait).
        let recording = std::mem::take(&mut self.recording).finish().await;
        if let Some(record) = self.record.take() {
            // A call that ended before its agent was known is reported with the fallback's.
            let agent = self
                .agent
                .take()
                .unwrap_or_else(|| CallAgent::from_defaults(&self.services.agent, "unresolved"));
            submit_report(
                &self.metrics,
                record,
                &agent,
                EndedCall {
                    reason,
                    stats,
                    latency: &self.latency,
                    recording,
                    audio: &audio,
                },
            );
        }
        // Abandoned: a connect, a claim or tools still under way.
        self.waits = Waits::default();
        self.metrics.call_writers_active.fetch_add(1, Relaxed);
        let Self {
            engine,
            twilio_out,
            model_out,
            metrics,
            latency,
            ..
        } = &mut self;
        let closing = async {
            let _ = tokio::join!(twilio_out.close(engine), model_out.close(metrics, latency));
        };
        if tokio::time::timeout(CLOSE_GRACE, closing).await.is_err() {
            metrics.call_writers_aborted.fetch_add(1, Relaxed);
            tracing::info!("a socket was still busy {CLOSE_GRACE:?} after the call ended: dropped");
        }
        metrics.call_writers_active.fetch_sub(1, Relaxed);
        drop(self.registration.take());
    }
}

/// What a failed connect means for the reconnect schedule.
fn classify_connect_error(error: &crate::upstream::UpstreamError) -> ConnectFailure {
    use crate::upstream::UpstreamError;
    match error {
        UpstreamError::HandshakeRejected(status) => ConnectFailure::from_status(*status),
        UpstreamError::ConnectTimeout(_) => ConnectFailure::Timeout,
        // A bad URL, key or TLS set-up will not mend on retry.
        UpstreamError::InvalidUrl(_) | UpstreamError::InvalidApiKey | UpstreamError::Tls(_) => {
            ConnectFailure::Refused
        }
        _ => ConnectFailure::Network,
    }
}

/// What an ended call measured, for its report.
struct EndedCall<'a> {
    reason: EndReason,
    stats: &'a super::engine::CallStats,
    latency: &'a CallLatencyRecorder,
    recording: Option<ReportRecording>,
    audio: &'a voxrelay_core::session::telemetry::AudioTelemetry,
}

/// Hands an ended call's report to the report sender (a no-op without a control plane).
fn submit_report(metrics: &Metrics, record: CallRecord, agent: &CallAgent, ended: EndedCall<'_>) {
    let EndedCall {
        reason,
        stats,
        latency,
        recording,
        audio,
    } = ended;
    let Some(handover) = record.handover else {
        return;
    };
    let mut report = call_report(
        &record.identity,
        agent,
        std::time::SystemTime::now(),
        reason.as_str(),
        stats,
        latency.summary(),
    );
    report.recording = recording;
    report.audio = Some(super::report::audio_report(audio));
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

// In `voxrelay-core` (the reference control plane logs numbers the same way).
pub use crate::logtext::redact_number;
