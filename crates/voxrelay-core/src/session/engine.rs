//! The call engine: one call's protocol logic, without sockets or clocks.
//!
//! It joins the three sans-IO machines — the Twilio stream ([`StreamMachine`]), the model
//! session ([`ModelSession`], its protocol built by the provider factory) and
//! playback/barge-in ([`Playback`]) — with the codec work in between, behind one surface in the
//! manner of str0m: the driver (the bridge's call task) feeds every event as an [`Input`] with the
//! time ([`CallEngine::handle`]), takes every consequence as an [`Output`]
//! ([`CallEngine::poll_output`], until `None`) and wakes it at [`CallEngine::poll_timeout`].
//! The engine never writes process-wide metrics: its counters are a [`CallStats`] snapshot the
//! driver publishes.
//!
//! The model session is the engine's to replace: it asks the driver for sockets
//! ([`Output::ConnectModel`], [`Output::ConnectStandby`]) as the reconnect and renewal schedule
//! of [`super::continuity`] says, tells a successor the [`Conversation`] as the caller heard
//! it, plays the hold prompt while the caller waits, and closes the stream as
//! [`EndReason::ModelUnavailable`] when no session can be had (Twilio then runs the fallback).
//!
//! Invariants:
//! - there is no placeholder session: the model session arrives with the call's agent
//!   ([`Input::ContextResolved`]); caller audio and digits that come before it is open are
//!   held ([`HELD_UPLINK_FRAMES`] frames, oldest dropped and counted; [`HELD_DTMF_DIGITS`]
//!   digits, further ones refused and counted) and follow the session's configuration;
//! - on barge-in Twilio's `clear` is output before any model-side command, audio for Twilio not
//!   yet taken is withdrawn, and a truncate never names a position beyond the audio the model
//!   produced for that item (playback's silence padding is not the model's);
//! - bad input from either side is counted and logged and affects only this call; peer text
//!   reaches a log line only through [`Untrusted`], warnings only within the call's
//!   [`WarnBudget`], and DTMF digits never (callers type PINs);
//! - everything the engine keeps is bounded: held audio and digits, produced-audio memory
//!   (`PRODUCED_ITEMS`), the transcript (the report's byte budget, see
//!   [`Transcript`]); outputs are what the last inputs caused, taken by the
//!   driver after every input.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::continuity::{
    ConnectFailure, ContinuityConfig, FallbackReason, MAX_SESSION_RECORDS, RENEWAL_FORCE_AFTER,
    Reconnector, STANDBY_ATTEMPTS, STANDBY_RETRY, SessionEnd, SessionRecord, Step,
};
use super::conversation::Conversation;
use super::model::ModelSession;
use super::playback::{Interruption, MarkOutcome, Playback, PlaybackConfig};
use super::tap::MediaTap;
use super::telemetry::{AudioTelemetry, CallTelemetry};
use super::transcript::{MAX_TRANSCRIPT_LINE_BYTES, Transcript, cut_marked};
use super::turns::{Turns, UplinkClock};
use crate::codec::{StreamResampler, g711, pcm};
use crate::logtext::{Untrusted, WarnBudget};
use crate::twilio::events::{write_clear_json, write_mark_json, write_media_json_from_mulaw};
use crate::twilio::stream::{StartInfo, StreamError, StreamEvent, StreamMachine};
use crate::upstream::{ModelAudio, ModelAudioFormat, UpstreamError, UpstreamEvent};

/// Caller audio held until the model session is open: 2 s of 20 ms frames. Beyond it the
/// oldest frame is dropped (counted in `uplink_dropped`): stale speech is worth less than a
/// bounded memory.
pub const HELD_UPLINK_FRAMES: usize = 100;

/// The largest caller frame held: Twilio sends 160 bytes (20 ms); a larger one is held cut
/// to this, so the hold's memory is bounded by its frame count.
const HELD_FRAME_MAX_BYTES: usize = 320;

/// Items whose produced audio length is remembered for clamping truncates; matches the
/// playback machine's item memory (an older item can no longer be the one playing).
const PRODUCED_ITEMS: usize = 32;

/// Digits held (each later a user message and a `response.create`) until the model session
/// is open. A person types a few keys in the second or two that takes; beyond this the digit
/// is refused and counted (`dtmf_flood`), never queued: control messages are not dropped,
/// so their hold is bounded by refusing what would overflow it.
pub const HELD_DTMF_DIGITS: usize = 16;

/// How an outbound message may be treated by a full buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutKind {
    /// Audio: may be dropped, oldest first, when its buffer is full.
    Audio,
    /// A Twilio `mark`: never dropped (playback accounting depends on it).
    Mark,
    /// A Twilio `clear`: never dropped, and the barge-in clock stops when it is written.
    Clear,
    /// Any other control message: never dropped.
    Control,
}

/// One text frame for a socket.
#[derive(Debug)]
pub struct Outgoing {
    pub text: String,
    pub kind: OutKind,
    /// When the input that caused this message was read, if its write completes a latency
    /// measurement (uplink audio, unpaced downlink audio, a barge-in `clear`).
    pub caused_at: Option<Instant>,
}

/// Everything that happens to a call, as the engine takes it.
#[derive(Debug)]
pub enum Input<'a> {
    /// One text message from Twilio.
    Twilio(&'a str),
    /// One text message from the model.
    Model(&'a str),
    /// [`CallEngine::poll_timeout`] passed.
    Tick,
    /// The call's agent is known: its model session, fresh (the engine asks for a socket with
    /// [`Output::ConnectModel`]) or pre-warmed (already open and configured).
    ContextResolved(Box<Resolved>),
    /// The model's socket is open (after [`Output::ConnectModel`]).
    ModelConnected,
    /// The connect asked for by [`Output::ConnectModel`] failed.
    ModelConnectFailed(ConnectFailure),
    /// The standby socket asked for by [`Output::ConnectStandby`] is open (and kept aside).
    StandbyConnected,
    /// The standby connect failed.
    StandbyFailed(ConnectFailure),
    /// A tool's answer (or error text) for a [`Output::CallTool`].
    ToolResult { call_id: &'a str, output: &'a str },
    /// The open model socket closed, failed, stalled or went silent; `reason` says which. The
    /// call goes on with a new session when one can be had ([`super::continuity`]).
    ModelClosed(EndReason),
}

/// What the engine learns when the call's agent is known.
#[derive(Debug)]
pub struct Resolved {
    pub session: ModelSession,
    /// The tenant's hold prompt (8 kHz μ-law); `None`: the continuity configuration's.
    pub hold_prompt: Option<std::sync::Arc<[u8]>>,
    /// The model already refused this call's session so (a pre-warm answered 429): the call
    /// falls back at once rather than trying again within its budget.
    pub refused: Option<ConnectFailure>,
}

impl Resolved {
    /// A session and nothing else (the built-in hold prompt, no refusal).
    pub fn session(session: ModelSession) -> Box<Self> {
        Box::new(Self {
            session,
            hold_prompt: None,
            refused: None,
        })
    }
}

/// Everything the engine asks of the driver, in order.
#[derive(Debug)]
pub enum Output {
    ToTwilio(Outgoing),
    ToModel(Outgoing),
    /// Run this function on the control plane and answer with [`Input::ToolResult`].
    CallTool(ToolCall),
    /// The model withdrew this call: stop running it, and answer nothing.
    CancelTool {
        call_id: String,
    },
    /// Open a socket to the model, and say [`Input::ModelConnected`] or
    /// [`Input::ModelConnectFailed`] (a timeout when not done by `deadline`).
    ConnectModel {
        deadline: Instant,
    },
    /// Open a second socket to the model and keep it aside, unread and unwritten, while the
    /// current one serves; say [`Input::StandbyConnected`] or [`Input::StandbyFailed`].
    ConnectStandby {
        deadline: Instant,
    },
    /// Make the standby socket the model's socket now (closing the current one); what follows
    /// for the model goes to it.
    SwitchToStandby,
    Event(CallEvent),
    /// The call is over: the driver sends what is already out, then closes both sockets.
    Close(EndReason),
}

/// What the driver acts on beyond moving bytes.
#[derive(Debug)]
pub enum CallEvent {
    /// Twilio's `start`: the driver checks who is calling and finds the agent, then answers
    /// with [`Input::ContextResolved`].
    Started(StartInfo),
    /// The model session was lost mid-call; a new one is being opened.
    ModelLost(SessionEnd),
    /// A new session replaced a lost one after `gap` (the caller's wait).
    ModelRestored { gap: Duration },
    /// A session near its age limit was replaced by its standby at a silent moment
    /// (`forced`: none came in time).
    ModelRenewed { forced: bool },
    /// No session could be had: the stream closes so Twilio goes on to the fallback TwiML.
    FellBack(FallbackReason),
}

/// Why a call ended, for the log line, the report and the metrics.
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
    /// Twilio stopped reading: its writes stalled past their deadline or its buffer filled.
    TwilioStalled,
    /// The model stopped reading: its writes stalled past their deadline or its buffer filled.
    UpstreamStalled,
    /// A started stream sent nothing for the driver's idle timeout.
    TwilioIdle,
    /// The model sent a message over its size cap.
    UpstreamOversized,
    /// The model sent nothing, not even a pong, within its deadline.
    UpstreamIdle,
    /// No model session could be opened (or kept) within the reconnect budget: the caller
    /// gets the tenant's fallback.
    ModelUnavailable,
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
            EndReason::UpstreamIdle => "upstream_idle",
            EndReason::ModelUnavailable => "model_unavailable",
            EndReason::Shutdown => "shutdown",
        }
    }
}

/// Kinds of bad Twilio input, counted per kind (`voxrelay_twilio_errors_total{kind}`). The
/// engine counts the ones it sees in [`CallStats::twilio_errors`]; the driver counts the ones
/// only a socket shows (oversized frames, timeouts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TwilioErrorKind {
    Malformed,
    OutOfOrder,
    UnknownEvent,
    StreamSidMismatch,
    SequenceGap,
    Oversized,
    StartTimeout,
    BadBase64,
    BadMediaFormat,
    /// A `sequenceNumber` too far ahead of the last one to be a gap (the message is refused).
    SequenceJump,
    /// A `dtmf.digit` that is not one of `0-9 * # A-D`.
    BadDtmf,
    /// A digit refused because too many were already waiting for the model session.
    DtmfFlood,
    /// A `start` whose streamSid, callSid or accountSid is not a Twilio SID.
    InvalidSid,
    /// No message from a started stream for the driver's idle timeout.
    IdleTimeout,
}

impl TwilioErrorKind {
    pub const COUNT: usize = 14;
    pub const ALL: [TwilioErrorKind; Self::COUNT] = [
        TwilioErrorKind::Malformed,
        TwilioErrorKind::OutOfOrder,
        TwilioErrorKind::UnknownEvent,
        TwilioErrorKind::StreamSidMismatch,
        TwilioErrorKind::SequenceGap,
        TwilioErrorKind::Oversized,
        TwilioErrorKind::StartTimeout,
        TwilioErrorKind::BadBase64,
        TwilioErrorKind::BadMediaFormat,
        TwilioErrorKind::SequenceJump,
        TwilioErrorKind::BadDtmf,
        TwilioErrorKind::DtmfFlood,
        TwilioErrorKind::InvalidSid,
        TwilioErrorKind::IdleTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TwilioErrorKind::Malformed => "malformed",
            TwilioErrorKind::OutOfOrder => "out_of_order",
            TwilioErrorKind::UnknownEvent => "unknown_event",
            TwilioErrorKind::StreamSidMismatch => "stream_sid_mismatch",
            TwilioErrorKind::SequenceGap => "sequence_gap",
            TwilioErrorKind::Oversized => "oversized",
            TwilioErrorKind::StartTimeout => "start_timeout",
            TwilioErrorKind::BadBase64 => "bad_base64",
            TwilioErrorKind::BadMediaFormat => "bad_media_format",
            TwilioErrorKind::SequenceJump => "sequence_jump",
            TwilioErrorKind::BadDtmf => "bad_dtmf",
            TwilioErrorKind::DtmfFlood => "dtmf_flood",
            TwilioErrorKind::InvalidSid => "invalid_sid",
            TwilioErrorKind::IdleTimeout => "idle_timeout",
        }
    }

    /// The kind's place in [`TwilioErrorKind::ALL`] (and in [`CallStats::twilio_errors`]).
    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("twilio: {0}")]
    Twilio(#[from] StreamError),
    #[error("upstream: {0}")]
    Upstream(#[from] UpstreamError),
    #[error("media payload is not valid base64")]
    BadBase64,
    #[error("model audio delta is not valid base64")]
    BadModelAudio,
    #[error("model audio that names no response, with none in progress")]
    AudioOutsideResponse,
    #[error("the call already has its model session")]
    SessionAlreadyResolved,
    #[error("the call has no model session yet")]
    NoModelSession,
    #[error("a model message before its session was opened")]
    ModelNotOpen,
    #[error("a DTMF digit was refused: {HELD_DTMF_DIGITS} are already waiting for the model")]
    DtmfFlood,
}

/// Per-call counters, for the driver's metrics, the log line at call end and the report.
#[derive(Clone, Debug, Default)]
pub struct CallStats {
    pub frames_in: u64,
    pub frames_out: u64,
    pub audio_bytes_in: u64,
    pub audio_bytes_out: u64,
    pub marks_sent: u64,
    /// Mark echoes for audio a barge-in had already withdrawn.
    pub marks_stale: u64,
    pub barge_ins: u64,
    /// Model audio for a response that barge-in had already cut.
    pub late_deltas_dropped: u64,
    pub dtmf_digits: u64,
    pub upstream_errors: u64,
    /// Caller frames dropped from the hold before the model session opened.
    pub uplink_dropped: u64,
    pub tool_calls: u64,
    /// Tokens the model reported using.
    pub usage: TokenUsage,
    /// Bad Twilio input by [`TwilioErrorKind::index`].
    pub twilio_errors: [u64; TwilioErrorKind::COUNT],
    /// Bounded: the most recent lines within the report's budget.
    pub transcript: Transcript,
    pub continuity: ContinuityStats,
    /// Each assistant turn, timed ([`Turns::all`] once the call is over).
    pub turns: Turns,
}

/// Tokens a call's model sessions reported (OpenAI's `response.done` usage, Gemini's
/// `usageMetadata`), summed over the call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Usage reports received (0: the provider reported none).
    pub reports: u64,
}

/// What keeping the model session cost the call, for its report.
#[derive(Clone, Debug, Default)]
pub struct ContinuityStats {
    /// Every model session, oldest first (at most [`MAX_SESSION_RECORDS`]).
    pub sessions: Vec<SessionRecord>,
    /// Sessions beyond the records kept.
    pub sessions_unrecorded: u64,
    /// Lost sessions replaced.
    pub reconnects: u32,
    /// Sessions renewed before their age limit.
    pub renewals: u32,
    /// Time the caller spent without a model session after losses, summed.
    pub reconnect_gap_ms: u64,
    /// Hold prompt audio sent to the caller.
    pub hold_prompt_ms: u64,
    /// Items replayed into new sessions.
    pub replayed_items: u64,
    pub fallback: Option<FallbackReason>,
}

impl CallStats {
    fn twilio_error(&mut self, kind: TwilioErrorKind, n: u64) {
        self.twilio_errors[kind.index()] += n;
    }
}

pub use super::transcript::{Speaker, TranscriptLine};

/// A function the model called; the driver runs it and answers with [`Input::ToolResult`].
/// The engine itself never waits on a tool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolCall {
    pub call_id: String,
    pub name: String,
    /// The model's arguments: a JSON text, not yet validated.
    pub arguments: String,
}

/// Reused buffers for the per-frame codec work.
#[derive(Default)]
struct Scratch {
    bytes: Vec<u8>,
    pcm_in: Vec<i16>,
    pcm_out: Vec<i16>,
    mulaw: Vec<u8>,
    b64: String,
    follow_ups: Vec<String>,
    /// The response in progress, for deltas that do not name it.
    current_response: String,
    /// Spent model message buffers handed back by the driver, for the next appends.
    spare_appends: Vec<String>,
    /// Spent Twilio message buffers handed back by the driver, for the next `media` and
    /// `mark` messages.
    spare_twilio: Vec<String>,
}

/// Spent buffers the engine keeps for appends: steady state needs two (one being written, one
/// on its way back), the rest absorbs a burst; beyond this they are freed.
const SPARE_APPENDS: usize = 4;
/// A returned buffer larger than this (a big control message's) is freed, not kept.
const SPARE_APPEND_MAX_BYTES: usize = 2 * 1024;
/// Spent buffers the engine keeps for Twilio messages: a 20 ms chunk takes two (`media` and
/// `mark`), two more absorb a batch still on its way back; beyond this they are freed.
const SPARE_TWILIO: usize = 4;
/// A returned Twilio buffer larger than this is freed, not kept (a 20 ms `media` is ~310 B).
const SPARE_TWILIO_MAX_BYTES: usize = 2 * 1024;

/// Keeps `text`, cleared, in a bounded free list, or frees it.
fn keep_spare(spares: &mut Vec<String>, mut text: String, count: usize, max_bytes: usize) {
    if spares.len() < count && text.capacity() <= max_bytes {
        text.clear();
        spares.push(text);
    }
}

/// The codec work between Twilio's 8 kHz μ-law and the session's formats, one state per
/// direction: `None` where the session speaks μ-law (passed through untouched), else a
/// streaming resampler between 8 kHz and the session's PCM rate (8 → 24 kHz up and 24 → 8 down
/// for OpenAI's `pcm16`; 8 → 16 up and 24 → 8 down for Gemini).
struct Resamplers {
    uplink: Option<StreamResampler>,
    downlink: Option<StreamResampler>,
}

impl Resamplers {
    fn for_audio(audio: ModelAudio) -> Self {
        Self {
            uplink: match audio.input {
                ModelAudioFormat::Mulaw8k => None,
                ModelAudioFormat::Pcm16 { rate } => Some(resampler(8_000, rate)),
            },
            downlink: match audio.output {
                ModelAudioFormat::Mulaw8k => None,
                ModelAudioFormat::Pcm16 { rate } => Some(resampler(rate, 8_000)),
            },
        }
    }
}

/// A resampler for a pair the providers use (8 kHz to and from 16 or 24 kHz). A provider
/// declaring another rate is a bug in its protocol module, caught by its tests.
fn resampler(from_hz: u32, to_hz: u32) -> StreamResampler {
    StreamResampler::new(from_hz, to_hz).expect("the providers' rates are supported pairs")
}

/// The model side of a call, from the moment its agent is known.
struct ModelLeg {
    session: ModelSession,
    resamplers: Resamplers,
    /// The response and item of the latest model audio, so the resampler's tail can be
    /// flushed into the right item when it ends.
    last_audio: Option<(String, String)>,
    /// Bytes of model audio (in the session's output format) received per recent item, oldest
    /// first. Playback pads an item's last partial chunk with silence, so its sent length can
    /// exceed what the model produced; the server rejects a truncate beyond the latter.
    produced: VecDeque<(String, u64)>,
    bytes_per_ms: u64,
    active_response: Option<String>,
    /// A `response.create` is owed once the active response ends (after tool output: the
    /// server refuses a second response while one is active).
    response_owed: bool,
    /// This session replaces a lost one: it is told the conversation when it opens.
    successor: bool,
    /// When the caller audio at each of this session's positions was read.
    uplink_clock: UplinkClock,
    /// The successor must answer once told (the lost session was answering, or owed one).
    respond_on_open: bool,
}

impl ModelLeg {
    /// A leg for `session`, not yet open; `successor`: it replaces a lost or old session.
    fn new(session: ModelSession, successor: bool, respond_on_open: bool) -> Self {
        let audio = session.protocol().audio();
        let resamplers = Resamplers::for_audio(audio);
        let uplink_delay = resamplers.uplink.as_ref().map_or(Duration::ZERO, |uplink| {
            Duration::from_micros(
                uplink.delay_output_frames() as u64 * 1_000_000 / u64::from(uplink.output_rate()),
            )
        });
        Self {
            session,
            resamplers,
            uplink_clock: UplinkClock::new(uplink_delay),
            last_audio: None,
            produced: VecDeque::new(),
            bytes_per_ms: audio.output.bytes_per_ms(),
            active_response: None,
            response_owed: false,
            successor,
            respond_on_open,
        }
    }
}

/// Caller audio waiting for the model session: raw μ-law (the session's format is not known
/// until the agent is), in one buffer, with each frame's length and read time.
#[derive(Default)]
struct HeldUplink {
    bytes: VecDeque<u8>,
    /// Read time, length and arrival number of each frame.
    frames: VecDeque<(Instant, usize, u64)>,
    /// Keys pressed, with their arrival numbers, at most [`HELD_DTMF_DIGITS`].
    digits: Vec<(u64, char)>,
    /// Numbers arrivals, so frames and digits go out in the order they came.
    arrivals: u64,
}

pub struct CallEngine {
    stream: StreamMachine,
    playback: Playback,
    model: Option<ModelLeg>,
    held_uplink: HeldUplink,
    /// This call's allowance of warning lines (shared with the driver).
    warnings: WarnBudget,
    /// When the stream started, for transcript offsets.
    started_at: Option<Instant>,
    closed: Option<EndReason>,
    /// What the inputs caused, in order, until the driver takes it.
    outputs: VecDeque<Output>,
    scratch: Scratch,
    stats: CallStats,
    reconnector: Reconnector,
    conversation: Conversation,
    hold: HoldPrompt,
    /// Digits sent as user text, numbering their conversation turns.
    digits_sent: u64,
    /// The time of the latest input, for records made without one (the call's end).
    last_input_at: Option<Instant>,
    renewal: Renewal,
    /// Between the model's `speech_started` and `speech_stopped`.
    caller_speaking: bool,
    /// The call's recorder, when it is recorded.
    tap: Option<Box<dyn MediaTap>>,
    /// What the call sounded like: always on, fed where the tap is.
    telemetry: CallTelemetry,
}

/// Where the open session's make-before-break renewal stands.
#[derive(Default)]
struct Renewal {
    /// When the open session is due for renewal.
    due: Option<Instant>,
    standby: Standby,
    attempts: u32,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Standby {
    #[default]
    None,
    Connecting,
    RetryAt(Instant),
    /// Open, waiting for a silent moment (since when).
    Ready(Instant),
}

/// The prompt a caller hears while the call waits for a model session.
#[derive(Default)]
struct HoldPrompt {
    /// When it starts, if the wait lasts (armed when a session is lost).
    due: Option<Instant>,
    /// It is in playback now (stopped when the new session starts answering).
    playing: bool,
    /// Prompts played, naming each one's playback item.
    played: u32,
}

/// Hold prompt items in playback are named so; they are the bridge's, never the model's.
const HOLD_ITEM_PREFIX: &str = "voxrelay-hold-";

fn is_hold_item(item_id: &str) -> bool {
    item_id.starts_with(HOLD_ITEM_PREFIX)
}

impl CallEngine {
    /// A call whose socket just opened: its agent, and so its model session, comes later.
    pub fn new(playback: PlaybackConfig) -> Self {
        Self::with_continuity(playback, ContinuityConfig::default())
    }

    /// A call whose lost model sessions are replaced as `continuity` says.
    pub fn with_continuity(playback: PlaybackConfig, continuity: ContinuityConfig) -> Self {
        Self {
            stream: StreamMachine::new(),
            playback: Playback::new(playback),
            model: None,
            held_uplink: HeldUplink::default(),
            warnings: WarnBudget::default(),
            started_at: None,
            closed: None,
            outputs: VecDeque::new(),
            scratch: Scratch::default(),
            stats: CallStats::default(),
            reconnector: Reconnector::new(continuity),
            conversation: Conversation::default(),
            hold: HoldPrompt::default(),
            digits_sent: 0,
            last_input_at: None,
            renewal: Renewal::default(),
            caller_speaking: false,
            tap: None,
            telemetry: CallTelemetry::new(),
        }
    }

    /// Hands the call's audio from now on to `tap` (the recorder), beginning with the caller
    /// audio still held for the model session (a call's recording is decided when its agent
    /// is known, a moment after the stream starts).
    pub fn set_media_tap(&mut self, mut tap: Box<dyn MediaTap>) {
        if let Some(started) = self.started_at {
            let mut from = 0;
            for &(read_at, len, _) in &self.held_uplink.frames {
                let (head, tail) = self.held_uplink.bytes.as_slices();
                let at = read_at.saturating_duration_since(started);
                // The hold is a ring: a frame may straddle its two slices.
                let end = from + len;
                if end <= head.len() {
                    tap.caller_audio(at, &head[from..end]);
                } else if from >= head.len() {
                    tap.caller_audio(at, &tail[from - head.len()..end - head.len()]);
                } else {
                    let mut frame = head[from..].to_vec();
                    frame.extend_from_slice(&tail[..end - head.len()]);
                    tap.caller_audio(at, &frame);
                }
                from = end;
            }
        }
        self.tap = Some(tap);
    }

    /// The conversation kept for replay.
    pub fn conversation(&self) -> &Conversation {
        &self.conversation
    }

    // ---- getters ----

    pub fn stream(&self) -> &StreamMachine {
        &self.stream
    }

    pub fn playback(&self) -> &Playback {
        &self.playback
    }

    pub fn stats(&self) -> &CallStats {
        &self.stats
    }

    /// The call's audio telemetry so far (both legs, one-way audio, echo), for its report and
    /// metrics at its end; its live state, e.g. [`CallTelemetry::caller_voice_ended`].
    pub fn audio_telemetry(&self) -> &CallTelemetry {
        &self.telemetry
    }

    /// The call's audio telemetry summed up (O(a few hundred steps): at the call's end).
    pub fn audio_summary(&self) -> AudioTelemetry {
        self.telemetry.summary()
    }

    /// Whether the model session is open (configured, or pre-warmed and adopted).
    pub fn model_is_open(&self) -> bool {
        self.model.as_ref().is_some_and(|m| m.session.is_open())
    }

    /// Why the call closed, once an [`Output::Close`] was produced.
    pub fn closed(&self) -> Option<EndReason> {
        self.closed
    }

    /// Whether the next warning of this call may be logged (else it is counted): the driver's
    /// warnings share the engine's budget, so a call has one.
    pub fn allow_warning(&mut self) -> bool {
        self.warnings.allow()
    }

    /// Warnings of this call counted but not logged, for the call's summary line.
    pub fn warnings_suppressed(&self) -> u64 {
        self.warnings.suppressed()
    }

    // ---- the surface: handle, poll_output, poll_timeout ----

    /// Takes one input at `now`. An error means the input was refused (counted, and this
    /// call's only); the call goes on unless an [`Output::Close`] says otherwise.
    pub fn handle(&mut self, now: Instant, input: Input<'_>) -> Result<(), EngineError> {
        if self.closed.is_some() {
            return Ok(());
        }
        self.last_input_at = Some(now);
        let result = match input {
            Input::Twilio(text) => self.on_twilio_text(now, text),
            Input::Model(text) => self.on_model_text(now, text),
            Input::Tick => {
                self.pump_playback(now, None);
                if let Some(step) = self.reconnector.due(now) {
                    self.follow(now, step);
                }
                self.maybe_start_hold(now);
                Ok(())
            }
            Input::ContextResolved(resolved) => self.on_context_resolved(now, *resolved),
            Input::ModelConnected => self.on_model_connected(now),
            Input::ModelConnectFailed(failure) => {
                if self.reconnector.is_waiting() {
                    let step = self.reconnector.failed(now, failure);
                    self.follow(now, step);
                }
                Ok(())
            }
            Input::StandbyConnected => {
                if self.renewal.standby == Standby::Connecting {
                    self.renewal.standby = Standby::Ready(now);
                }
                Ok(())
            }
            Input::StandbyFailed(failure) => {
                if self.renewal.standby == Standby::Connecting {
                    if self.renewal.attempts < STANDBY_ATTEMPTS {
                        self.renewal.standby = Standby::RetryAt(now + STANDBY_RETRY);
                    } else {
                        tracing::warn!(
                            kind = failure.as_str(),
                            "no standby session for the renewal: the session serves until it ends"
                        );
                        self.renewal = Renewal::default();
                    }
                }
                Ok(())
            }
            Input::ToolResult { call_id, output } => {
                if self.model.is_none() {
                    return Err(EngineError::NoModelSession);
                }
                self.answer_tool(call_id, output);
                Ok(())
            }
            Input::ModelClosed(reason) => {
                self.on_model_lost(now, reason);
                Ok(())
            }
        };
        self.advance_renewal(now);
        result
    }

    /// The next thing for the driver to do, in the order the inputs caused them.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`Input::Tick`] is due next: the pacer's next send, the next connect attempt, the
    /// hold prompt.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let renewal = match self.renewal.standby {
            Standby::None => self.renewal.due,
            Standby::RetryAt(at) => Some(at),
            Standby::Ready(since) => Some(since + RENEWAL_FORCE_AFTER),
            Standby::Connecting => None,
        };
        [
            self.playback.poll_timeout(),
            self.reconnector.poll_timeout(),
            self.hold.due,
            renewal,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Hands back the text of a message the driver has written to the model, to carry a later
    /// caller append: with every buffer returned, the uplink allocates nothing per frame.
    pub fn recycle_model(&mut self, text: String) {
        keep_spare(
            &mut self.scratch.spare_appends,
            text,
            SPARE_APPENDS,
            SPARE_APPEND_MAX_BYTES,
        );
    }

    /// Hands back the text of a message the driver has written to Twilio, to carry a later
    /// `media` or `mark`: with every buffer returned, the downlink allocates nothing per chunk.
    pub fn recycle_twilio(&mut self, text: String) {
        keep_spare(
            &mut self.scratch.spare_twilio,
            text,
            SPARE_TWILIO,
            SPARE_TWILIO_MAX_BYTES,
        );
    }

    // ---- Twilio ----

    fn on_twilio_text(&mut self, now: Instant, text: &str) -> Result<(), EngineError> {
        let gaps_before = self.stream.counters().sequence_gaps;
        let event = self.stream.handle(text);
        // One add however many numbers were skipped (the machine bounds the jump as well).
        let gaps = self.stream.counters().sequence_gaps - gaps_before;
        if gaps > 0 {
            self.stats.twilio_error(TwilioErrorKind::SequenceGap, gaps);
        }
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                self.stats.twilio_error(classify_stream_error(&error), 1);
                return Err(error.into());
            }
        };
        match event {
            StreamEvent::Connected => {}
            StreamEvent::Started(info) => {
                self.started_at = Some(now);
                self.stats.turns.started(now);
                self.outputs
                    .push_back(Output::Event(CallEvent::Started(info)));
            }
            StreamEvent::Media { payload_b64, .. } => self.on_caller_audio(now, &payload_b64)?,
            StreamEvent::Mark { name } => match self.playback.on_mark(now, &name) {
                MarkOutcome::Confirmed { item_id, ms } => {
                    self.stats.turns.mark_confirmed(&item_id, ms, now);
                }
                MarkOutcome::Stale => self.stats.marks_stale += 1,
                MarkOutcome::Unknown => {
                    tracing::debug!(mark = %Untrusted(&name), "mark echo we did not send");
                }
            },
            StreamEvent::Dtmf { digit } => self.on_dtmf(digit)?,
            StreamEvent::Stopped => self.close(EndReason::TwilioStop),
            StreamEvent::Ignored(reason) => {
                self.stats.twilio_error(TwilioErrorKind::UnknownEvent, 1);
                tracing::debug!(?reason, "ignored twilio message");
            }
        }
        Ok(())
    }

    fn on_caller_audio(&mut self, now: Instant, payload_b64: &str) -> Result<(), EngineError> {
        // Decoding validates the payload and yields the byte count; in μ-law mode the
        // original base64 text is what goes upstream, so nothing is re-encoded.
        self.scratch.bytes.clear();
        if BASE64
            .decode_vec(payload_b64.as_bytes(), &mut self.scratch.bytes)
            .is_err()
        {
            self.stats.twilio_error(TwilioErrorKind::BadBase64, 1);
            return Err(EngineError::BadBase64);
        }
        self.stats.frames_in += 1;
        self.stats.audio_bytes_in += self.scratch.bytes.len() as u64;
        if let Some(started) = self.started_at {
            let at = now.saturating_duration_since(started);
            self.telemetry.caller_audio(at, &self.scratch.bytes);
            if let Some(tap) = self.tap.as_mut() {
                tap.caller_audio(at, &self.scratch.bytes);
            }
        }
        if self.model_is_open() {
            self.send_caller_audio(now, Some(payload_b64));
        } else {
            self.hold_caller_audio(now);
        }
        Ok(())
    }

    /// Keeps the frame in `scratch.bytes` until the session opens, dropping the oldest held
    /// frame when the hold is full.
    fn hold_caller_audio(&mut self, now: Instant) {
        let held = &mut self.held_uplink;
        if held.frames.len() == HELD_UPLINK_FRAMES
            && let Some((_, len, _)) = held.frames.pop_front()
        {
            held.bytes.drain(..len);
            self.stats.uplink_dropped += 1;
        }
        let frame = &self.scratch.bytes[..self.scratch.bytes.len().min(HELD_FRAME_MAX_BYTES)];
        held.bytes.extend(frame);
        held.frames.push_back((now, frame.len(), held.arrivals));
        held.arrivals += 1;
    }

    /// Sends the caller frame in `scratch.bytes` to the open session as one append.
    /// `payload_b64` is its base64 when the caller's text is at hand (μ-law mode sends it as
    /// is); without it, the bytes are encoded here.
    fn send_caller_audio(&mut self, read_at: Instant, payload_b64: Option<&str>) {
        let Some(model) = self.model.as_mut() else {
            return;
        };
        // μ-law: 8 bytes per ms.
        model
            .uplink_clock
            .sent(read_at, self.scratch.bytes.len() as u64 / 8);
        // The append is the audio's base64 plus about 50 bytes of JSON.
        const APPEND_OVERHEAD: usize = 64;
        let mut text = self.scratch.spare_appends.pop().unwrap_or_default();
        let Scratch {
            bytes,
            pcm_in,
            pcm_out,
            b64,
            ..
        } = &mut self.scratch;
        let protocol = model.session.protocol();
        match &mut model.resamplers.uplink {
            None => {
                let payload = match payload_b64 {
                    Some(payload) => payload,
                    None => {
                        b64.clear();
                        BASE64.encode_string(&bytes[..], b64);
                        b64.as_str()
                    }
                };
                text.reserve_exact(payload.len() + APPEND_OVERHEAD);
                protocol.write_audio_append(payload, &mut text);
            }
            Some(uplink) => {
                pcm_in.clear();
                pcm_in.extend(bytes.iter().map(|&code| g711::mulaw_decode(code)));
                pcm_out.clear();
                uplink.process(pcm_in, pcm_out);
                if pcm_out.is_empty() {
                    self.scratch.spare_appends.push(text);
                    return;
                }
                bytes.clear();
                pcm::samples_to_pcm16le(pcm_out, bytes);
                b64.clear();
                BASE64.encode_string(&bytes[..], b64);
                text.reserve_exact(b64.len() + APPEND_OVERHEAD);
                protocol.write_audio_append(b64, &mut text);
            }
        }
        self.outputs.push_back(Output::ToModel(Outgoing {
            text,
            kind: OutKind::Audio,
            caused_at: Some(read_at),
        }));
    }

    /// `digit` is one key (the stream machine refused anything else), so the model gets a
    /// fixed sentence naming it and nothing the caller wrote. The digit is never logged.
    fn on_dtmf(&mut self, digit: char) -> Result<(), EngineError> {
        if !self.model_is_open() {
            let held = &mut self.held_uplink;
            if held.digits.len() == HELD_DTMF_DIGITS {
                self.stats.twilio_error(TwilioErrorKind::DtmfFlood, 1);
                return Err(EngineError::DtmfFlood);
            }
            held.digits.push((held.arrivals, digit));
            held.arrivals += 1;
        } else {
            self.send_digit(digit);
        }
        self.stats.dtmf_digits += 1;
        tracing::info!("caller pressed a key");
        Ok(())
    }

    fn send_digit(&mut self, digit: char) {
        let Some(model) = self.model.as_ref() else {
            return;
        };
        let protocol = model.session.protocol();
        let text = format!("The caller pressed the key \"{digit}\" on their phone keypad.");
        let user_text = protocol.user_text(&text);
        self.digits_sent += 1;
        self.conversation
            .caller_said(&format!("voxrelay-dtmf-{}", self.digits_sent), &text);
        // A digit usually asks for a reaction; a response already in progress will see it.
        let respond = model
            .active_response
            .is_none()
            .then(|| protocol.create_response());
        self.push_model_control(user_text);
        if let Some(create) = respond {
            self.push_model_control(create);
        }
    }

    // ---- the model session ----

    // The model session's lifecycle (resolve, open, lose, renew, hold) is in `lifecycle`.

    /// The session is open: held caller audio and digits, in the order they came, in the
    /// session's format.
    fn release_held(&mut self) {
        let mut digits = std::mem::take(&mut self.held_uplink.digits)
            .into_iter()
            .peekable();
        while let Some((read_at, len, arrival)) = self.held_uplink.frames.pop_front() {
            while let Some((_, digit)) = digits.next_if(|(at, _)| *at < arrival) {
                self.send_digit(digit);
            }
            self.scratch.bytes.clear();
            self.scratch
                .bytes
                .extend(self.held_uplink.bytes.drain(..len));
            self.send_caller_audio(read_at, None);
        }
        for (_, digit) in digits {
            self.send_digit(digit);
        }
    }

    fn on_model_text(&mut self, now: Instant, text: &str) -> Result<(), EngineError> {
        let Some(model) = self.model.as_mut() else {
            return Err(EngineError::NoModelSession);
        };
        // Nothing may reach the model before its configuration: no message, no answer.
        if !model.session.is_open() {
            return Err(EngineError::ModelNotOpen);
        }
        let mut follow_ups = std::mem::take(&mut self.scratch.follow_ups);
        follow_ups.clear();
        let result = model
            .session
            .protocol_mut()
            .on_message(text, &mut follow_ups);
        for text in follow_ups.drain(..) {
            self.push_model_control(text);
        }
        self.scratch.follow_ups = follow_ups;
        // Every event of the message is taken; the first refusal is the message's.
        let mut outcome = Ok(());
        for event in result? {
            let handled = self.on_model_event(now, event);
            if outcome.is_ok() {
                outcome = handled;
            }
        }
        outcome
    }

    fn on_model_event(
        &mut self,
        now: Instant,
        event: UpstreamEvent<'_>,
    ) -> Result<(), EngineError> {
        match event {
            UpstreamEvent::SessionReady => tracing::debug!("model session configured"),
            UpstreamEvent::SessionEnding => {
                tracing::info!("the model will end this session soon: renewing it now");
                if self.renewal.standby == Standby::None {
                    self.renewal.due = Some(now);
                }
            }
            UpstreamEvent::AudioDelta {
                response_id,
                item_id,
                audio_b64,
            } if response_id.is_empty() => {
                // The response in progress, copied into a kept buffer (no allocation per
                // delta); audio outside any response is refused.
                let mut current = std::mem::take(&mut self.scratch.current_response);
                current.clear();
                if let Some(active) = self
                    .model
                    .as_ref()
                    .and_then(|m| m.active_response.as_deref())
                {
                    current.push_str(active);
                }
                let result = if current.is_empty() || !item_id.is_empty() {
                    Err(EngineError::AudioOutsideResponse)
                } else {
                    self.on_model_audio(now, &current, &current, &audio_b64)
                };
                self.scratch.current_response = current;
                result?
            }
            UpstreamEvent::AudioDelta {
                response_id,
                item_id,
                audio_b64,
            } => self.on_model_audio(now, &response_id, &item_id, &audio_b64)?,
            UpstreamEvent::SpeechStarted {
                item_id,
                audio_start_ms,
            } => {
                self.caller_speaking = true;
                // A provider that does not say where (Gemini): the bridge's own level
                // detection says where the caller's current run of speech began.
                let at = match audio_start_ms {
                    Some(position) => self.caller_audio_read_at(Some(position)),
                    None => self.on_call_clock(self.telemetry.caller_voice_started()),
                };
                self.stats.turns.caller_started(at, now);
                self.conversation.caller_started(&item_id);
                self.on_speech_started(now);
            }
            UpstreamEvent::SpeechStopped { audio_end_ms } => {
                self.caller_speaking = false;
                match audio_end_ms {
                    Some(position) => {
                        let at = self.caller_audio_read_at(Some(position));
                        self.stats.turns.caller_stopped(at, Some(now), now);
                    }
                    // Gemini shows the turn's end only by answering: the caller's speech ended
                    // with the last frame the bridge heard as speech.
                    None => {
                        let at = self.on_call_clock(self.telemetry.caller_voice_ended());
                        self.stats.turns.caller_stopped(at, None, now);
                    }
                }
            }
            UpstreamEvent::ResponseCreated { response_id } => {
                self.stats.turns.response_created(&response_id, now);
                self.stop_hold(now);
                self.playback.on_response_created(&response_id);
                if let Some(model) = self.model.as_mut() {
                    model.active_response = Some(response_id.into_owned());
                }
            }
            UpstreamEvent::ResponseDone {
                response_id,
                status,
            } => self.on_response_done(now, &response_id, &status),
            UpstreamEvent::InputTranscript { item_id, text } => {
                self.conversation.caller_said(&item_id, text.trim());
                self.push_transcript(now, Speaker::Caller, text);
            }
            UpstreamEvent::OutputTranscript { item_id, text } => {
                self.conversation.assistant_said(&item_id, text.trim());
                // The report keeps what the caller heard: a turn already cut is cut here too.
                let heard = match self.conversation.assistant_heard(&item_id) {
                    Some((full, heard)) if heard != full => Some(cut_marked(heard)),
                    _ => None,
                };
                match heard {
                    Some(heard) => self.push_transcript(now, Speaker::Assistant, heard.into()),
                    None => self.push_transcript(now, Speaker::Assistant, text),
                }
            }
            UpstreamEvent::OutputTranscriptDelta { item_id, delta } => {
                self.conversation.assistant_text_delta(&item_id, &delta);
            }
            UpstreamEvent::FunctionCall {
                name,
                call_id,
                arguments,
            } => self.on_function_call(name, call_id, arguments),
            UpstreamEvent::FunctionCallCancelled { call_id } => {
                tracing::info!(call_id = %Untrusted(&call_id), "model cancelled a tool call");
                self.conversation
                    .tool_answered(&call_id, "(cancelled by the model before it answered)");
                self.outputs.push_back(Output::CancelTool {
                    call_id: call_id.into_owned(),
                });
            }
            UpstreamEvent::Usage {
                input_tokens,
                output_tokens,
            } => {
                self.stats.usage.input_tokens += input_tokens;
                self.stats.usage.output_tokens += output_tokens;
                self.stats.usage.reports += 1;
            }
            UpstreamEvent::Error {
                error_type,
                code,
                message,
            } => {
                self.stats.upstream_errors += 1;
                if self.warnings.allow() {
                    tracing::warn!(
                        error_type = %Untrusted(&error_type),
                        code = %Untrusted(code.as_deref().unwrap_or("-")),
                        message = %Untrusted(&message),
                        "upstream error event"
                    );
                }
            }
            UpstreamEvent::Other => {}
        }
        Ok(())
    }

    fn on_response_done(&mut self, now: Instant, response_id: &str, status: &str) {
        tracing::debug!(
            response_id = %Untrusted(response_id),
            status = %Untrusted(status),
            "response done"
        );
        let Some(model) = self.model.as_mut() else {
            return;
        };
        if model
            .last_audio
            .as_ref()
            .is_some_and(|(last_response, _)| last_response == response_id)
        {
            self.flush_downlink_resampler(now);
        }
        self.playback.on_response_done(response_id);
        let Some(model) = self.model.as_mut() else {
            return;
        };
        if model.active_response.as_deref() == Some(response_id) {
            model.active_response = None;
            if std::mem::take(&mut model.response_owed) {
                let create = model.session.protocol().create_response();
                self.push_model_control(create);
            }
        }
        self.pump_playback(now, Some(now));
    }

    fn on_function_call(
        &mut self,
        name: Cow<'_, str>,
        call_id: Cow<'_, str>,
        arguments: Cow<'_, str>,
    ) {
        self.stats.tool_calls += 1;
        self.conversation.tool_called(&call_id, &name, &arguments);
        let tools_enabled = self
            .model
            .as_ref()
            .is_some_and(|model| model.session.tools_enabled());
        if tools_enabled {
            tracing::info!(
                name = %Untrusted(&name),
                call_id = %Untrusted(&call_id),
                "model called a tool"
            );
            self.outputs.push_back(Output::CallTool(ToolCall {
                call_id: call_id.into_owned(),
                name: name.into_owned(),
                arguments: arguments.into_owned(),
            }));
        } else {
            // No control plane runs tools here: the model is told plainly.
            if self.warnings.allow() {
                tracing::warn!(
                    name = %Untrusted(&name),
                    "model called a tool, but no tools are configured"
                );
            }
            self.answer_tool(
                &call_id,
                r#"{"error":"no tools are available on this line"}"#,
            );
        }
    }

    /// A tool's result (or error text) for the model, which is then asked to respond — at
    /// once, or when the response that made the call has ended.
    fn answer_tool(&mut self, call_id: &str, output: &str) {
        self.conversation.tool_answered(call_id, output);
        let Some(model) = self.model.as_mut() else {
            return;
        };
        if !model.session.is_open() {
            // Between sessions: the successor gets it in the replay, and is asked to answer.
            model.respond_on_open = true;
            return;
        }
        let protocol = model.session.protocol();
        let answer = protocol.function_output(call_id, output);
        let create = if protocol.answers_tool_output_itself() {
            None
        } else if model.active_response.is_none() {
            Some(protocol.create_response())
        } else {
            model.response_owed = true;
            None
        };
        self.push_model_control(answer);
        if let Some(create) = create {
            self.push_model_control(create);
        }
    }

    fn push_transcript(&mut self, now: Instant, speaker: Speaker, text: Cow<'_, str>) {
        let text = text.trim();
        if text.is_empty() {
            return;
        }
        tracing::debug!(?speaker, text = %Untrusted(text), "transcript");
        let offset_ms = self.started_at.map_or(0, |started| {
            now.saturating_duration_since(started).as_millis() as u64
        });
        // Only what the transcript can keep is copied (it cuts longer lines there and counts
        // the cut): a character is at most 4 bytes, so a longer line stays longer.
        let mut end = text.len().min(MAX_TRANSCRIPT_LINE_BYTES + 4);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        self.stats.transcript.push(TranscriptLine {
            speaker,
            offset_ms,
            text: text[..end].to_owned(),
        });
    }

    fn on_model_audio(
        &mut self,
        now: Instant,
        response_id: &str,
        item_id: &str,
        audio_b64: &str,
    ) -> Result<(), EngineError> {
        let Some(model) = self.model.as_mut() else {
            return Err(EngineError::NoModelSession);
        };
        if model.resamplers.downlink.is_some()
            && model
                .last_audio
                .as_ref()
                .is_some_and(|(_, last_item)| last_item != item_id)
        {
            self.flush_downlink_resampler(now);
        }
        let Some(model) = self.model.as_mut() else {
            return Err(EngineError::NoModelSession);
        };
        if model
            .last_audio
            .as_ref()
            .is_none_or(|(_, last_item)| last_item != item_id)
        {
            model.last_audio = Some((response_id.to_owned(), item_id.to_owned()));
        }
        let bytes = &mut self.scratch.bytes;
        bytes.clear();
        BASE64
            .decode_vec(audio_b64.as_bytes(), bytes)
            .map_err(|_| EngineError::BadModelAudio)?;
        let produced_bytes = bytes.len() as u64;
        let before = match model.produced.iter_mut().find(|(id, _)| id == item_id) {
            Some((_, total)) => {
                *total += produced_bytes;
                *total - produced_bytes
            }
            None => {
                if model.produced.len() == PRODUCED_ITEMS {
                    model.produced.pop_front();
                }
                model
                    .produced
                    .push_back((item_id.to_owned(), produced_bytes));
                0
            }
        };
        let bytes_per_ms = model.bytes_per_ms;
        let added_ms = (before + produced_bytes) / bytes_per_ms - before / bytes_per_ms;
        self.conversation
            .assistant_audio(item_id, u32::try_from(added_ms).unwrap_or(u32::MAX));
        let Some(model) = self.model.as_mut() else {
            return Err(EngineError::NoModelSession);
        };
        let Scratch {
            bytes,
            pcm_in,
            pcm_out,
            mulaw,
            ..
        } = &mut self.scratch;
        let audio: &[u8] = match &mut model.resamplers.downlink {
            None => bytes,
            Some(downlink) => {
                pcm_in.clear();
                pcm::pcm16le_to_samples(bytes, pcm_in);
                pcm_out.clear();
                downlink.process(pcm_in, pcm_out);
                mulaw.clear();
                mulaw.extend(pcm_out.iter().map(|&sample| g711::mulaw_encode(sample)));
                mulaw
            }
        };
        if !self
            .playback
            .on_audio_delta(now, response_id, item_id, audio)
        {
            self.stats.late_deltas_dropped += 1;
            return Ok(());
        }
        self.stats.turns.model_audio(response_id, item_id, now);
        self.pump_playback(now, Some(now));
        Ok(())
    }

    /// Feeds the resampler's held tail (up to one block plus its delay) to playback as the
    /// end of the latest item, so a response's last syllable is not left waiting.
    fn flush_downlink_resampler(&mut self, now: Instant) {
        let Some(model) = self.model.as_mut() else {
            return;
        };
        let (Some(downlink), Some((response_id, item_id))) =
            (&mut model.resamplers.downlink, model.last_audio.take())
        else {
            return;
        };
        let Scratch { pcm_out, mulaw, .. } = &mut self.scratch;
        pcm_out.clear();
        downlink.flush(pcm_out);
        if pcm_out.is_empty() {
            return;
        }
        mulaw.clear();
        mulaw.extend(pcm_out.iter().map(|&sample| g711::mulaw_encode(sample)));
        self.playback
            .on_audio_delta(now, &response_id, &item_id, mulaw);
    }

    fn on_speech_started(&mut self, now: Instant) {
        let hold_playing = std::mem::take(&mut self.hold.playing);
        let Some(interruption) = self.playback.on_speech_started(now) else {
            return;
        };
        if !hold_playing {
            self.stats.barge_ins += 1;
        }
        // The caller hears the clear: it goes first, and its write stops the barge-in clock.
        self.send_clear(now);
        if !hold_playing {
            self.stats.turns.barged_in(now);
        }
        let heard = self.note_interruption(&interruption);
        let Some(model) = self.model.as_mut() else {
            return;
        };
        if let Some(downlink) = &mut model.resamplers.downlink {
            // The interrupted response's tail must not leak into the next one.
            downlink.reset();
            model.last_audio = None;
        }
        let protocol = model.session.protocol();
        let mut commands = Vec::with_capacity(2 + interruption.delete.len());
        if let Some((item_id, audio_end_ms)) = heard {
            tracing::info!(
                item = %Untrusted(&item_id),
                audio_end_ms,
                "barge-in: cut at what the caller heard"
            );
            // Without a truncate (Gemini) the cut lives in the conversation and the report.
            commands.extend(protocol.truncate(&item_id, audio_end_ms));
        }
        // The hold prompt is the bridge's own audio: the model never heard of it.
        for item_id in interruption.delete.iter().filter(|id| !is_hold_item(id)) {
            commands.extend(protocol.delete_item(item_id));
        }
        if interruption.cancel_response && !hold_playing {
            commands.extend(protocol.cancel_response());
        }
        for text in commands {
            self.push_model_control(text);
        }
    }

    /// A time since the stream's start (the telemetry's clock) as an instant.
    fn on_call_clock(&self, since_start: Option<Duration>) -> Option<Instant> {
        Some(self.started_at? + since_start?)
    }

    /// When the bridge read the caller audio at the open session's position `model_ms`.
    fn caller_audio_read_at(&self, model_ms: Option<u64>) -> Option<Instant> {
        let model = self.model.as_ref()?;
        model.uplink_clock.at(model_ms?)
    }

    /// Twilio `clear`, ahead of any audio not yet taken for Twilio (stale now).
    fn send_clear(&mut self, now: Instant) {
        let Some(stream_sid) = self.stream.stream_sid() else {
            return;
        };
        if let Some(started) = self.started_at {
            let at = now.saturating_duration_since(started);
            self.telemetry.agent_cut(at);
            if let Some(tap) = self.tap.as_mut() {
                tap.agent_cut(at);
            }
        }
        let mut text = String::with_capacity(64);
        write_clear_json(&mut text, stream_sid);
        self.outputs.retain(
            |out| !matches!(out, Output::ToTwilio(message) if message.kind == OutKind::Audio),
        );
        self.outputs.push_back(Output::ToTwilio(Outgoing {
            text,
            kind: OutKind::Clear,
            caused_at: Some(now),
        }));
    }

    /// Records in the conversation what an interruption left heard and unheard, and returns
    /// the model item to truncate with its heard position, if the model's item was cut. The
    /// heard position counts the silence that padded the item's last chunk; the server only
    /// accepts positions within the audio it produced, so it is clamped to that.
    fn note_interruption(&mut self, interruption: &Interruption) -> Option<(String, u32)> {
        for item_id in interruption.delete.iter().filter(|id| !is_hold_item(id)) {
            self.conversation.assistant_unheard(item_id);
            self.cut_transcript_line(item_id);
        }
        let truncate = interruption
            .truncate
            .as_ref()
            .filter(|truncate| !is_hold_item(&truncate.item_id))?;
        let produced_ms = self.model.as_ref().and_then(|model| {
            model
                .produced
                .iter()
                .find(|(id, _)| *id == truncate.item_id)
                .map(|(_, bytes)| bytes / model.bytes_per_ms)
        });
        let audio_end_ms = match produced_ms {
            Some(produced) => truncate
                .audio_end_ms
                .min(u32::try_from(produced).unwrap_or(u32::MAX)),
            None => truncate.audio_end_ms,
        };
        self.conversation
            .assistant_cut(&truncate.item_id, audio_end_ms);
        self.cut_transcript_line(&truncate.item_id);
        Some((truncate.item_id.clone(), audio_end_ms))
    }

    /// A transcript line already written for `item_id` is cut where the caller stopped
    /// hearing it (with a provider that has no truncate, the report is the only record of it).
    fn cut_transcript_line(&mut self, item_id: &str) {
        if let Some((full, heard)) = self.conversation.assistant_heard(item_id)
            && heard != full
        {
            self.stats.transcript.cut_assistant_line(full, heard);
        }
    }

    /// Sends every chunk the pacer allows at `now`. `caused_at` marks chunks sent without
    /// waiting, whose write time measures the bridge's downlink latency.
    fn pump_playback(&mut self, now: Instant, caused_at: Option<Instant>) {
        let Some(stream_sid) = self.stream.stream_sid() else {
            return;
        };
        // The JSON around the stream SID and the payload or mark name, with room to spare.
        const MEDIA_OVERHEAD: usize = 64;
        const MARK_OVERHEAD: usize = 64;
        let spares = &mut self.scratch.spare_twilio;
        while let Some(transmit) = self.playback.poll_transmit(now) {
            // Spent buffers keep their capacity; a fresh one is sized to fit at once. They come
            // back in the order written (`media`, `mark`), so the mark's small one is on top.
            let mut mark = spares.pop().unwrap_or_default();
            mark.reserve(transmit.mark.len() + stream_sid.len() + MARK_OVERHEAD);
            write_mark_json(&mut mark, stream_sid, transmit.mark);
            let mut media = spares.pop().unwrap_or_default();
            media.reserve(
                transmit.payload.len().div_ceil(3) * 4 + stream_sid.len() + MEDIA_OVERHEAD,
            );
            write_media_json_from_mulaw(&mut media, stream_sid, transmit.payload);
            if is_hold_item(transmit.item_id) {
                // 8 bytes of μ-law per ms.
                self.stats.continuity.hold_prompt_ms += transmit.payload.len() as u64 / 8;
            }
            self.stats.turns.chunk_sent(
                transmit.item_id,
                now,
                transmit.play_at,
                Duration::from_millis(transmit.payload.len() as u64 / 8),
            );
            if let Some(started) = self.started_at {
                let play_at = transmit.play_at.saturating_duration_since(started);
                self.telemetry.agent_audio(play_at, transmit.payload);
                if let Some(tap) = self.tap.as_mut() {
                    tap.agent_audio(play_at, transmit.payload);
                }
            }
            self.stats.frames_out += 1;
            self.stats.audio_bytes_out += transmit.payload.len() as u64;
            self.stats.marks_sent += 1;
            self.outputs.push_back(Output::ToTwilio(Outgoing {
                text: media,
                kind: OutKind::Audio,
                caused_at,
            }));
            self.outputs.push_back(Output::ToTwilio(Outgoing {
                text: mark,
                kind: OutKind::Mark,
                caused_at: None,
            }));
        }
    }

    fn push_model_control(&mut self, text: String) {
        self.outputs.push_back(Output::ToModel(Outgoing {
            text,
            kind: OutKind::Control,
            caused_at: None,
        }));
    }

    fn close(&mut self, reason: EndReason) {
        if self.closed.is_none() {
            if let Some(now) = self.last_input_at {
                self.record_session_end(now, SessionEnd::CallEnded);
            }
            self.closed = Some(reason);
            self.outputs.push_back(Output::Close(reason));
        }
    }
}

fn classify_stream_error(error: &StreamError) -> TwilioErrorKind {
    match error {
        StreamError::Malformed(_) => TwilioErrorKind::Malformed,
        StreamError::OutOfOrder { .. } | StreamError::DuplicateStart => TwilioErrorKind::OutOfOrder,
        StreamError::StreamSidMismatch => TwilioErrorKind::StreamSidMismatch,
        StreamError::UnsupportedMediaFormat(_) => TwilioErrorKind::BadMediaFormat,
        StreamError::SequenceJump { .. } => TwilioErrorKind::SequenceJump,
        StreamError::InvalidSid { .. } => TwilioErrorKind::InvalidSid,
        StreamError::InvalidDtmf => TwilioErrorKind::BadDtmf,
    }
}

mod lifecycle;

#[cfg(test)]
mod tests;
