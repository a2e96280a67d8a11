//! Process-wide counters, gauges and latency histograms, rendered as Prometheus text.
//!
//! Everything here is a relaxed atomic: the media path of every call updates these, and a
//! lock here would be the one lock shared by all calls. Histograms have fixed buckets chosen
//! for a media relay (tens of microseconds to a second). `render` produces the Prometheus
//! text exposition format (version 0.0.4) served on `GET /metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::continuity::{FallbackReason, SessionEnd};
use super::engine::CallStats;
use super::turn_metrics::TurnMetrics;
// From the core crate, not `crate::control`: metrics sits below the control-plane client,
// which records into it, so it must not import from it.
use voxrelay_core::Provider;
use voxrelay_core::control::api::ContextSource;
use voxrelay_core::session::telemetry::AudioTelemetry;

/// Upper bounds of the latency buckets, in microseconds.
const BUCKETS_US: [u64; 16] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 5_000_000,
];

/// A lock-free histogram of durations with fixed buckets.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, value: Duration) {
        let us = value.as_micros().min(u64::MAX as u128) as u64;
        if let Some(index) = BUCKETS_US.iter().position(|&bound| us <= bound) {
            self.buckets[index].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(value.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    pub fn mean(&self) -> Option<Duration> {
        let count = self.count();
        (count > 0).then(|| Duration::from_nanos(self.sum_ns.load(Relaxed) / count))
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1): coarse, for reports.
    pub fn quantile_upper_bound(&self, q: f64) -> Option<Duration> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = ((count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bucket, &bound) in self.buckets.iter().zip(&BUCKETS_US) {
            seen += bucket.load(Relaxed);
            if seen >= rank {
                return Some(Duration::from_micros(bound));
            }
        }
        Some(Duration::MAX)
    }

    /// Adds every observation of `other` (a call's own histogram) to this one.
    pub fn absorb(&self, other: &Histogram) {
        for (mine, theirs) in self.buckets.iter().zip(&other.buckets) {
            let count = theirs.load(Relaxed);
            if count > 0 {
                mine.fetch_add(count, Relaxed);
            }
        }
        self.count.fetch_add(other.count(), Relaxed);
        self.sum_ns.fetch_add(other.sum_ns.load(Relaxed), Relaxed);
    }

    /// The family `name` with one series per `(label value, histogram)`.
    fn render_labelled<'a>(
        out: &mut String,
        name: &str,
        help: &str,
        label: &str,
        series: impl IntoIterator<Item = (&'a str, &'a Histogram)>,
    ) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (value, histogram) in series {
            let mut cumulative = 0;
            for (bucket, &bound) in histogram.buckets.iter().zip(&BUCKETS_US) {
                cumulative += bucket.load(Relaxed);
                let _ = writeln!(
                    out,
                    "{name}_bucket{{{label}=\"{value}\",le=\"{}\"}} {cumulative}",
                    bound as f64 / 1e6
                );
            }
            let count = histogram.count();
            let _ = writeln!(
                out,
                "{name}_bucket{{{label}=\"{value}\",le=\"+Inf\"}} {count}"
            );
            let sum = histogram.sum_ns.load(Relaxed) as f64 / 1e9;
            let _ = writeln!(out, "{name}_sum{{{label}=\"{value}\"}} {sum}");
            let _ = writeln!(out, "{name}_count{{{label}=\"{value}\"}} {count}");
        }
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bucket, &bound) in self.buckets.iter().zip(&BUCKETS_US) {
            cumulative += bucket.load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {cumulative}",
                bound as f64 / 1e6
            );
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_ns.load(Relaxed) as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// One call's own latency figures, recorded beside the process-wide histograms for the call's
/// report. Lock-free like them, though only the call's own task records and reads it.
#[derive(Default)]
pub struct CallLatencyRecorder {
    pub uplink: Histogram,
    pub downlink: Histogram,
    pub barge_in: Histogram,
    max_us: [AtomicU64; 3],
}

impl CallLatencyRecorder {
    pub fn uplink(&self, value: Duration) {
        self.uplink.observe(value);
        self.max_us[0].fetch_max(value.as_micros() as u64, Relaxed);
    }

    pub fn downlink(&self, value: Duration) {
        self.downlink.observe(value);
        self.max_us[1].fetch_max(value.as_micros() as u64, Relaxed);
    }

    pub fn barge_in(&self, value: Duration) {
        self.barge_in.observe(value);
        self.max_us[2].fetch_max(value.as_micros() as u64, Relaxed);
    }

    /// `(count, p50, p99, max)` in microseconds per direction; quantiles are bucket upper
    /// bounds (coarse, but honest about it), clamped to the maximum actually seen.
    pub fn summary(&self) -> [(u64, u64, u64, u64); 3] {
        let one = |histogram: &Histogram, max: &AtomicU64| {
            let max = max.load(Relaxed);
            let quantile = |q| {
                histogram
                    .quantile_upper_bound(q)
                    .map_or(0, |d| (d.as_micros() as u64).min(max))
            };
            (histogram.count(), quantile(0.5), quantile(0.99), max)
        };
        [
            one(&self.uplink, &self.max_us[0]),
            one(&self.downlink, &self.max_us[1]),
            one(&self.barge_in, &self.max_us[2]),
        ]
    }
}

pub use super::engine::TwilioErrorKind;

/// A `voxrelay_provider_*` family: its name, its help, and the figure it shows.
type ProviderFamily<T> = (&'static str, &'static str, fn(&ProviderMetrics) -> &T);

/// What one provider's calls did, recorded once per call when it ends (never on the media
/// path): the `voxrelay_provider_*{provider}` families, so operators compare providers on the
/// same bridge. Every per-call figure has its twin here; the process-wide families (listener,
/// webhooks, signatures, pre-warm, the control plane, calls active) carry no provider: they
/// happen before a call's provider is known, or belong to no one call.
#[derive(Default)]
pub struct ProviderMetrics {
    pub calls: AtomicU64,
    /// Model sessions opened (first ones, successors and renewals).
    pub sessions: AtomicU64,
    /// Sessions lost mid-call (closed, silent, stalled, oversized).
    pub sessions_lost: AtomicU64,
    /// Connect attempts that failed before a session opened.
    pub failed_connects: AtomicU64,
    pub upstream_errors: AtomicU64,
    pub fallbacks: AtomicU64,
    pub input_tokens: AtomicU64,
    pub output_tokens: AtomicU64,
    /// The call's media counters (twins of the process-wide ones, which move during a call).
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub audio_bytes_in: AtomicU64,
    pub audio_bytes_out: AtomicU64,
    pub marks_sent: AtomicU64,
    pub barge_ins: AtomicU64,
    pub late_deltas_dropped: AtomicU64,
    pub dtmf_digits: AtomicU64,
    pub tool_calls: AtomicU64,
    /// Bad Twilio input, all kinds together (by kind: the process-wide family).
    pub twilio_errors: AtomicU64,
    pub uplink: Histogram,
    pub downlink: Histogram,
    pub barge_in: Histogram,
}

impl ProviderMetrics {
    /// Adds one ended call: its counters and its own latency histograms.
    pub fn record_call(&self, stats: &CallStats, latency: &CallLatencyRecorder) {
        self.calls.fetch_add(1, Relaxed);
        let continuity = &stats.continuity;
        let recorded = continuity.sessions.len() as u64 + continuity.sessions_unrecorded;
        self.sessions.fetch_add(recorded, Relaxed);
        let lost = continuity
            .sessions
            .iter()
            .filter(|session| {
                matches!(
                    session.end,
                    Some(
                        SessionEnd::Dropped
                            | SessionEnd::Idle
                            | SessionEnd::Stalled
                            | SessionEnd::Oversized
                    )
                )
            })
            .count() as u64;
        self.sessions_lost.fetch_add(lost, Relaxed);
        let failed: usize = continuity
            .sessions
            .iter()
            .map(|session| session.failed_attempts.len())
            .sum();
        self.failed_connects.fetch_add(failed as u64, Relaxed);
        self.upstream_errors
            .fetch_add(stats.upstream_errors, Relaxed);
        if continuity.fallback.is_some() {
            self.fallbacks.fetch_add(1, Relaxed);
        }
        for (counter, value) in [
            (&self.frames_in, stats.frames_in),
            (&self.frames_out, stats.frames_out),
            (&self.audio_bytes_in, stats.audio_bytes_in),
            (&self.audio_bytes_out, stats.audio_bytes_out),
            (&self.marks_sent, stats.marks_sent),
            (&self.barge_ins, stats.barge_ins),
            (&self.late_deltas_dropped, stats.late_deltas_dropped),
            (&self.dtmf_digits, stats.dtmf_digits),
            (&self.tool_calls, stats.tool_calls),
            (&self.twilio_errors, stats.twilio_errors.iter().sum()),
        ] {
            counter.fetch_add(value, Relaxed);
        }
        self.input_tokens
            .fetch_add(stats.usage.input_tokens, Relaxed);
        self.output_tokens
            .fetch_add(stats.usage.output_tokens, Relaxed);
        self.uplink.absorb(&latency.uplink);
        self.downlink.absorb(&latency.downlink);
        self.barge_in.absorb(&latency.barge_in);
    }
}

/// Routes whose Twilio signature is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignedRoute {
    Voice,
    Status,
    Media,
}

impl SignedRoute {
    const ALL: [SignedRoute; 3] = [SignedRoute::Voice, SignedRoute::Status, SignedRoute::Media];

    pub fn as_str(self) -> &'static str {
        match self {
            SignedRoute::Voice => "voice",
            SignedRoute::Status => "status",
            SignedRoute::Media => "media",
        }
    }
}

/// Why a voice webhook with a valid signature was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookRefusal {
    /// `CallSid` missing, repeated, or not `CA` + 32 hex digits (400).
    BadCallSid,
    /// `AccountSid` missing, repeated, or not `AC` + 32 hex digits (400).
    BadAccountSid,
    /// `AccountSid` is not `VOXRELAY_TWILIO_ACCOUNT_SID` (403).
    AccountMismatch,
}

impl WebhookRefusal {
    const ALL: [WebhookRefusal; 3] = [
        WebhookRefusal::BadCallSid,
        WebhookRefusal::BadAccountSid,
        WebhookRefusal::AccountMismatch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WebhookRefusal::BadCallSid => "bad_call_sid",
            WebhookRefusal::BadAccountSid => "bad_account_sid",
            WebhookRefusal::AccountMismatch => "account_mismatch",
        }
    }
}

/// Which way audio was flowing when it was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Caller → model.
    Uplink,
    /// Model → caller.
    Downlink,
}

/// One of a call's two sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leg {
    /// The Media Streams socket.
    Twilio,
    /// The model's socket.
    Upstream,
}

impl Leg {
    const ALL: [Leg; 2] = [Leg::Twilio, Leg::Upstream];

    pub fn as_str(self) -> &'static str {
        match self {
            Leg::Twilio => "twilio",
            Leg::Upstream => "upstream",
        }
    }
}

/// Control-plane endpoints, for counting failed requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlEndpoint {
    /// `GET /v1/context` (a 404 is an answer, not a failure).
    Context,
    /// `POST /v1/calls/{call_sid}/report`.
    Report,
    /// `POST /v1/tools/{name}`.
    Tool,
    /// `GET /v1/calls`.
    Calls,
}

impl ControlEndpoint {
    const ALL: [ControlEndpoint; 4] = [
        ControlEndpoint::Context,
        ControlEndpoint::Report,
        ControlEndpoint::Tool,
        ControlEndpoint::Calls,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ControlEndpoint::Context => "context",
            ControlEndpoint::Report => "report",
            ControlEndpoint::Tool => "tool",
            ControlEndpoint::Calls => "calls",
        }
    }
}

#[derive(Default)]
pub struct Metrics {
    /// Per provider, by [`Provider`] order (`openai`, `gemini`).
    providers: [ProviderMetrics; 2],
    /// Turn timings per tenant and provider, added at each call's end.
    pub turns: TurnMetrics,
    /// Call recordings: written, failed by kind, frames dropped, bytes.
    pub recordings: crate::recording::RecordingMetrics,
    pub calls_active: AtomicI64,
    pub calls_started: AtomicU64,
    pub calls_ended: AtomicU64,
    pub calls_rejected_draining: AtomicU64,
    /// Streams refused because their binding token was wrong, or missing when required.
    pub streams_refused_token: AtomicU64,
    /// Upgrades answered with `fly-replay` towards the machine that pre-warmed them.
    pub fly_replays: AtomicU64,
    /// Calls ended by their tenant's `max_call_seconds`.
    pub calls_max_duration: AtomicU64,
    pub prewarm_started: AtomicU64,
    pub prewarm_claimed: AtomicU64,
    /// Pre-warmed sessions closed because no stream claimed them in time.
    pub prewarm_unclaimed: AtomicU64,
    pub prewarm_failed: AtomicU64,
    /// Calls that started cold because `VOXRELAY_MAX_PREWARMS` pre-warms were open.
    pub prewarm_capped: AtomicU64,
    /// Pre-warmed sessions open now (connecting, or waiting for their stream).
    pub prewarms_active: AtomicI64,
    /// Voice webhooks for a `CallSid` already answered (Twilio's retry, or a replay).
    pub webhook_repeats: AtomicU64,
    /// `CallSid`s remembered as answered.
    pub answered_calls: AtomicI64,
    /// Webhooks answered without being remembered or prepared: the memory was full.
    pub answered_calls_full: AtomicU64,
    /// Webhooks answered without being prepared: too many calls were pending.
    pub pending_full: AtomicU64,
    /// Media streams refused because `start.accountSid` is not `VOXRELAY_TWILIO_ACCOUNT_SID`.
    pub streams_refused_account: AtomicU64,
    webhooks_refused: [AtomicU64; WebhookRefusal::ALL.len()],
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub audio_bytes_in: AtomicU64,
    pub audio_bytes_out: AtomicU64,
    pub marks_sent: AtomicU64,
    pub marks_stale: AtomicU64,
    pub barge_ins: AtomicU64,
    pub late_deltas_dropped: AtomicU64,
    pub dtmf_digits: AtomicU64,
    pub upstream_errors: AtomicU64,
    pub upstream_connect_failures: AtomicU64,
    pub upstream_disconnects: AtomicU64,
    /// Model messages over `upstream::connect::MAX_UPSTREAM_MESSAGE_BYTES` (the call ends).
    pub upstream_oversized: AtomicU64,
    /// Ended calls still closing their sockets (within their close grace; a leak shows here).
    /// The metric keeps its name from when each socket had a writer task.
    pub call_writers_active: AtomicI64,
    /// Ended calls whose sockets had not taken what was buffered and the close frame within
    /// the close grace, so were dropped (closed) unfinished.
    pub call_writers_aborted: AtomicU64,
    peer_stalls: [AtomicU64; Leg::ALL.len()],
    model_sessions_lost: [AtomicU64; SessionEnd::ALL.len()],
    model_reconnects: [AtomicU64; SessionEnd::ALL.len()],
    call_fallbacks: [AtomicU64; FallbackReason::ALL.len()],
    /// A lost model session → its successor open (the caller's gap).
    pub model_reconnect_gap: Histogram,
    model_renewals: [AtomicU64; 2],
    twilio_errors: [AtomicU64; TwilioErrorKind::ALL.len()],
    signature_failures: [AtomicU64; SignedRoute::ALL.len()],
    audio_dropped_uplink: AtomicU64,
    audio_dropped_downlink: AtomicU64,
    /// Twilio frame read → its audio written to the model's socket.
    pub uplink_added: Histogram,
    /// Model delta read → its first audio written to Twilio, when the pacer could send at once.
    pub downlink_added: Histogram,
    pub upstream_connect: Histogram,
    /// Barge-in: `speech_started` read → `clear` written.
    pub barge_in_reaction: Histogram,
    /// How late the outbound pacer woke up after its deadline.
    pub pacer_lateness: Histogram,
    /// `TenantDirectory::resolve`: from the call asking to the context (or the fallback) in hand.
    pub control_lookup: Histogram,
    control_lookups: [AtomicU64; ContextSource::ALL.len()],
    control_request_failures: [AtomicU64; ControlEndpoint::ALL.len()],
    /// Call reports accepted by the control plane on delivery (first try or a retry).
    pub control_reports_delivered: AtomicU64,
    /// Report delivery attempts repeated after a transient failure.
    pub control_report_retries: AtomicU64,
    /// Reports written to the spool directory (retry window passed, or shutdown).
    pub control_reports_spooled: AtomicU64,
    /// Spooled reports accepted by the control plane and deleted from the spool.
    pub control_reports_resent: AtomicU64,
    /// Reports the control plane refused for good (kept in `rejected/`).
    pub control_reports_rejected: AtomicU64,
    /// Spool directory failures: could not create, write, list, read, move or delete.
    pub control_report_spool_errors: AtomicU64,
    /// Tool calls relayed to the control plane.
    pub control_tool_calls: AtomicU64,
    /// Tool calls answered with an error output (bad arguments, timeout, control-plane failure).
    pub control_tool_failures: AtomicU64,
    /// Tool calls the model withdrew while they ran (Gemini's `toolCallCancellation`).
    pub tools_cancelled: AtomicU64,
    /// The public listener's caps and timeouts.
    pub listener: ListenerMetrics,
    /// Streams without a binding token let through by `VOXRELAY_REQUIRE_STREAM_TOKEN=0` (each
    /// answered by the fallback agent, its report marked unbound).
    pub streams_unbound: AtomicU64,
    /// Gauges: reports waiting in the spool directory, and kept in its `rejected/`.
    pub control_report_spool_files: AtomicU64,
    pub control_report_spool_bytes: AtomicU64,
    pub control_report_rejected_files: AtomicU64,
    pub control_report_rejected_bytes: AtomicU64,
    /// Spool writes refused because the spool was at its size cap.
    pub control_report_spool_full: AtomicU64,
    /// Gauge: reports held in memory because the spool could not take them.
    pub control_reports_held: AtomicU64,
    /// Reports lost: neither delivered nor kept (memory for held reports full, or shutdown
    /// with the spool still unwritable). Each is also an `error` log line.
    pub control_reports_lost: AtomicU64,
    /// Reports whose transcript was shortened to fit (oldest lines dropped or a line cut).
    pub control_report_transcripts_truncated: AtomicU64,
    /// What calls sounded like, recorded once per call at its end.
    pub audio: AudioMetrics,
}

/// Upper bounds of the caller-level buckets, dBFS (speech on a phone line sits around −20 to
/// −30; below −45 is silence).
const LEVEL_BUCKETS_DBFS: [i32; 12] = [-60, -50, -45, -40, -35, -30, -25, -20, -15, -10, -5, 0];

/// The calls' audio telemetry (`voxrelay_core::session::telemetry`), summed over calls.
#[derive(Default)]
pub struct AudioMetrics {
    /// By leg: `caller`, `agent`.
    one_way: [AtomicU64; 2],
    one_way_ms: [AtomicU64; 2],
    clipped: [AtomicU64; 2],
    echo: AtomicU64,
    /// The caller leg's RMS level per call, by [`LEVEL_BUCKETS_DBFS`].
    caller_level: [AtomicU64; LEVEL_BUCKETS_DBFS.len()],
    caller_level_count: AtomicU64,
    caller_level_sum_centi_db: AtomicI64,
}

impl AudioMetrics {
    const LEGS: [&'static str; 2] = ["caller", "agent"];

    /// One ended call's figures.
    pub fn record_call(&self, audio: &AudioTelemetry) {
        for (index, leg) in [&audio.caller, &audio.agent].into_iter().enumerate() {
            self.one_way[index].fetch_add(u64::from(leg.one_way_episodes), Relaxed);
            self.one_way_ms[index].fetch_add(leg.one_way_ms, Relaxed);
            self.clipped[index].fetch_add(leg.clipped_samples, Relaxed);
        }
        if audio.echo.detected {
            self.echo.fetch_add(1, Relaxed);
        }
        // A call whose caller sent no audio has no level to count.
        if audio.caller.audio_ms > 0 {
            let level = audio.caller.rms_dbfs;
            if let Some(index) = LEVEL_BUCKETS_DBFS
                .iter()
                .position(|&bound| level <= f64::from(bound))
            {
                self.caller_level[index].fetch_add(1, Relaxed);
            }
            self.caller_level_count.fetch_add(1, Relaxed);
            self.caller_level_sum_centi_db
                .fetch_add((level * 100.0).round() as i64, Relaxed);
        }
    }

    /// One-way audio episodes of `leg` (0: the caller's, 1: the agent's).
    pub fn one_way_episodes(&self, leg: usize) -> u64 {
        self.one_way[leg].load(Relaxed)
    }

    pub fn echoes(&self) -> u64 {
        self.echo.load(Relaxed)
    }

    fn render(&self, out: &mut String) {
        let by_leg = |counters: &[AtomicU64; 2]| {
            let [caller, agent] = Self::LEGS;
            [
                (caller, counters[0].load(Relaxed)),
                (agent, counters[1].load(Relaxed)),
            ]
        };
        write_labelled_counter(
            out,
            "voxrelay_audio_one_way_total",
            "One-way audio: times a leg was silent for 8 s or more while the other spoke, by leg (caller: what Twilio sent; agent: what the caller was played).",
            "leg",
            by_leg(&self.one_way),
        );
        write_labelled_counter(
            out,
            "voxrelay_audio_one_way_ms_total",
            "Length of those one-way silences, summed, by leg.",
            "leg",
            by_leg(&self.one_way_ms),
        );
        write_labelled_counter(
            out,
            "voxrelay_audio_clipped_samples_total",
            "Samples at the mu-law code's extremes (clipped), by leg.",
            "leg",
            by_leg(&self.clipped),
        );
        let _ = writeln!(
            out,
            "# HELP voxrelay_audio_echo_total Calls in which the agent's voice came back in the caller's audio.\n# TYPE voxrelay_audio_echo_total counter\nvoxrelay_audio_echo_total {}",
            self.echo.load(Relaxed)
        );
        let name = "voxrelay_audio_caller_level_dbfs";
        let _ = writeln!(
            out,
            "# HELP {name} The caller leg's RMS level per call, dBFS.\n# TYPE {name} histogram"
        );
        let mut cumulative = 0;
        for (bucket, bound) in self.caller_level.iter().zip(LEVEL_BUCKETS_DBFS) {
            cumulative += bucket.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.caller_level_count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.caller_level_sum_centi_db.load(Relaxed) as f64 / 100.0;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Why the public listener refused or cut something, each counted separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerRefusal {
    /// A new connection closed at once: the open-connection cap was reached.
    ConnectionCap,
    /// A new connection closed at once: the cap on connections not yet verified was reached.
    UnverifiedCap,
    /// A connection closed because a request head did not arrive in time (including an idle
    /// kept-alive connection).
    HeaderTimeout,
    /// A connection closed because none of its requests passed a signature check within the
    /// unverified lifetime.
    UnverifiedLifetime,
    /// A webhook answered 408: its body did not arrive in time.
    BodyTimeout,
    /// A webhook answered 413: its body was over the limit.
    BodyTooLarge,
    /// The voice webhook answered the at-capacity TwiML (`VOXRELAY_MAX_CALLS`).
    CallsFullVoice,
    /// A media stream answered 503 before the upgrade (`VOXRELAY_MAX_CALLS`).
    CallsFullMedia,
    /// A media stream answered 503 before the upgrade: too many streams waiting for `start`.
    UnstartedStreams,
}

impl ListenerRefusal {
    const ALL: [ListenerRefusal; 9] = [
        ListenerRefusal::ConnectionCap,
        ListenerRefusal::UnverifiedCap,
        ListenerRefusal::HeaderTimeout,
        ListenerRefusal::UnverifiedLifetime,
        ListenerRefusal::BodyTimeout,
        ListenerRefusal::BodyTooLarge,
        ListenerRefusal::CallsFullVoice,
        ListenerRefusal::CallsFullMedia,
        ListenerRefusal::UnstartedStreams,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ListenerRefusal::ConnectionCap => "connection_cap",
            ListenerRefusal::UnverifiedCap => "unverified_cap",
            ListenerRefusal::HeaderTimeout => "header_timeout",
            ListenerRefusal::UnverifiedLifetime => "unverified_lifetime",
            ListenerRefusal::BodyTimeout => "body_timeout",
            ListenerRefusal::BodyTooLarge => "body_too_large",
            ListenerRefusal::CallsFullVoice => "calls_full_voice",
            ListenerRefusal::CallsFullMedia => "calls_full_media",
            ListenerRefusal::UnstartedStreams => "unstarted_streams",
        }
    }
}

/// Gauges and counters of the public listener (see `http::limits`).
#[derive(Default)]
pub struct ListenerMetrics {
    /// Open connections, upgraded media streams included.
    pub connections_open: AtomicI64,
    /// Open connections none of whose requests has passed a signature check.
    pub connections_unverified: AtomicI64,
    /// Call slots taken: webhooks waiting for their stream plus live media streams.
    pub call_slots_in_use: AtomicI64,
    /// Webhook call slots released because no stream came for them in time.
    pub call_reservations_expired: AtomicU64,
    /// Route-level warning lines left out by the per-second allowance.
    pub log_lines_suppressed: AtomicU64,
    refusals: [AtomicU64; ListenerRefusal::ALL.len()],
}

impl ListenerMetrics {
    pub fn refused(&self, why: ListenerRefusal) {
        self.refusals[why as usize].fetch_add(1, Relaxed);
    }

    pub fn refusals(&self, why: ListenerRefusal) -> u64 {
        self.refusals[why as usize].load(Relaxed)
    }

    fn render(&self, out: &mut String) {
        for (name, help, value) in [
            (
                "voxrelay_connections_open",
                "Open connections on the public listener, upgraded media streams included.",
                &self.connections_open,
            ),
            (
                "voxrelay_connections_unverified",
                "Open public connections none of whose requests has passed a signature check.",
                &self.connections_unverified,
            ),
            (
                "voxrelay_call_slots_in_use",
                "Calls counted against VOXRELAY_MAX_CALLS: webhooks awaiting their stream, plus live streams.",
                &self.call_slots_in_use,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                value.load(Relaxed)
            );
        }
        for (name, help, value) in [
            (
                "voxrelay_call_reservations_expired_total",
                "Webhook call slots released because their stream did not come in time.",
                &self.call_reservations_expired,
            ),
            (
                "voxrelay_log_lines_suppressed_total",
                "Route-level warning lines left out by the per-second allowance.",
                &self.log_lines_suppressed,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Relaxed)
            );
        }
        write_labelled_counter(
            out,
            "voxrelay_listener_refusals_total",
            "Connections closed and requests refused by the public listener's caps and timeouts, by reason.",
            "reason",
            ListenerRefusal::ALL.map(|why| (why.as_str(), self.refusals(why))),
        );
    }
}

/// One counter family with a label, e.g. `name{kind="bad_dtmf"} 3`, its HELP and TYPE first.
fn write_labelled_counter<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    rows: impl IntoIterator<Item = (&'a str, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (value, count) in rows {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {count}");
    }
}

/// A call's counters as last added to the process-wide ones: the driver publishes the
/// difference from [`CallStats`] after each batch of inputs, so the engine never touches an
/// atomic and the totals lag a call by at most one batch.
#[derive(Clone, Debug, Default)]
pub struct PublishedStats {
    frames_in: u64,
    frames_out: u64,
    audio_bytes_in: u64,
    audio_bytes_out: u64,
    marks_sent: u64,
    marks_stale: u64,
    barge_ins: u64,
    late_deltas_dropped: u64,
    dtmf_digits: u64,
    upstream_errors: u64,
    uplink_dropped: u64,
    twilio_errors: [u64; TwilioErrorKind::COUNT],
}

impl Metrics {
    /// Adds what `stats` counted since `published`, one atomic add per counter that moved.
    pub fn publish_call_stats(&self, stats: &CallStats, published: &mut PublishedStats) {
        fn add(counter: &AtomicU64, now: u64, before: &mut u64) {
            if now != *before {
                counter.fetch_add(now.wrapping_sub(*before), Relaxed);
                *before = now;
            }
        }
        add(&self.frames_in, stats.frames_in, &mut published.frames_in);
        add(
            &self.frames_out,
            stats.frames_out,
            &mut published.frames_out,
        );
        add(
            &self.audio_bytes_in,
            stats.audio_bytes_in,
            &mut published.audio_bytes_in,
        );
        add(
            &self.audio_bytes_out,
            stats.audio_bytes_out,
            &mut published.audio_bytes_out,
        );
        add(
            &self.marks_sent,
            stats.marks_sent,
            &mut published.marks_sent,
        );
        add(
            &self.marks_stale,
            stats.marks_stale,
            &mut published.marks_stale,
        );
        add(&self.barge_ins, stats.barge_ins, &mut published.barge_ins);
        add(
            &self.late_deltas_dropped,
            stats.late_deltas_dropped,
            &mut published.late_deltas_dropped,
        );
        add(
            &self.dtmf_digits,
            stats.dtmf_digits,
            &mut published.dtmf_digits,
        );
        add(
            &self.upstream_errors,
            stats.upstream_errors,
            &mut published.upstream_errors,
        );
        add(
            &self.audio_dropped_uplink,
            stats.uplink_dropped,
            &mut published.uplink_dropped,
        );
        for (index, counter) in self.twilio_errors.iter().enumerate() {
            add(
                counter,
                stats.twilio_errors[index],
                &mut published.twilio_errors[index],
            );
        }
    }

    /// One provider's figures.
    pub fn provider(&self, provider: Provider) -> &ProviderMetrics {
        &self.providers[match provider {
            Provider::OpenAi => 0,
            Provider::Gemini => 1,
        }]
    }

    fn render_providers(&self, out: &mut String) {
        let counters: [ProviderFamily<AtomicU64>; 18] = [
            (
                "voxrelay_provider_calls_total",
                "Calls ended, by the provider that answered.",
                |m| &m.calls,
            ),
            (
                "voxrelay_provider_model_sessions_total",
                "Model sessions opened, successors and renewals included.",
                |m| &m.sessions,
            ),
            (
                "voxrelay_provider_model_sessions_lost_total",
                "Model sessions lost mid-call (closed, silent, stalled, oversized).",
                |m| &m.sessions_lost,
            ),
            (
                "voxrelay_provider_connect_failures_total",
                "Failed connect attempts before a session opened.",
                |m| &m.failed_connects,
            ),
            (
                "voxrelay_provider_upstream_errors_total",
                "Error events (or malformed messages) from the model.",
                |m| &m.upstream_errors,
            ),
            (
                "voxrelay_provider_fallbacks_total",
                "Calls sent to their tenant's fallback for want of a model session.",
                |m| &m.fallbacks,
            ),
            (
                "voxrelay_provider_input_tokens_total",
                "Input tokens the provider reported using.",
                |m| &m.input_tokens,
            ),
            (
                "voxrelay_provider_output_tokens_total",
                "Output tokens the provider reported using.",
                |m| &m.output_tokens,
            ),
            (
                "voxrelay_provider_frames_in_total",
                "Twilio media frames received.",
                |m| &m.frames_in,
            ),
            (
                "voxrelay_provider_frames_out_total",
                "Twilio media frames sent.",
                |m| &m.frames_out,
            ),
            (
                "voxrelay_provider_audio_bytes_in_total",
                "Caller audio bytes received (mu-law).",
                |m| &m.audio_bytes_in,
            ),
            (
                "voxrelay_provider_audio_bytes_out_total",
                "Assistant audio bytes sent (mu-law).",
                |m| &m.audio_bytes_out,
            ),
            (
                "voxrelay_provider_marks_sent_total",
                "Twilio marks sent.",
                |m| &m.marks_sent,
            ),
            (
                "voxrelay_provider_barge_ins_total",
                "Barge-ins: the caller talked over audible assistant audio.",
                |m| &m.barge_ins,
            ),
            (
                "voxrelay_provider_late_deltas_dropped_total",
                "Model audio for a response a barge-in had already cut.",
                |m| &m.late_deltas_dropped,
            ),
            (
                "voxrelay_provider_dtmf_digits_total",
                "DTMF digits relayed to the model.",
                |m| &m.dtmf_digits,
            ),
            (
                "voxrelay_provider_tool_calls_total",
                "Function calls the model made.",
                |m| &m.tool_calls,
            ),
            (
                "voxrelay_provider_twilio_errors_total",
                "Bad Twilio input on calls to this provider, all kinds.",
                |m| &m.twilio_errors,
            ),
        ];
        for (name, help, field) in counters {
            write_labelled_counter(
                out,
                name,
                help,
                "provider",
                Provider::ALL.map(|provider| {
                    (
                        provider.as_str(),
                        field(self.provider(provider)).load(Relaxed),
                    )
                }),
            );
        }
        let histograms: [ProviderFamily<Histogram>; 3] = [
            (
                "voxrelay_provider_uplink_added_seconds",
                "Caller frame read to model append written, by provider.",
                |m| &m.uplink,
            ),
            (
                "voxrelay_provider_downlink_added_seconds",
                "Model audio read to Twilio media written, by provider.",
                |m| &m.downlink,
            ),
            (
                "voxrelay_provider_barge_in_reaction_seconds",
                "Caller speech signal read to Twilio clear written, by provider.",
                |m| &m.barge_in,
            ),
        ];
        for (name, help, field) in histograms {
            Histogram::render_labelled(
                out,
                name,
                help,
                "provider",
                Provider::ALL.map(|provider| (provider.as_str(), field(self.provider(provider)))),
            );
        }
    }

    /// A call's model session was lost (`end`): a successor is being opened.
    pub fn model_session_lost(&self, end: SessionEnd) {
        self.model_sessions_lost[end as usize].fetch_add(1, Relaxed);
    }

    /// A session lost so (`end`) was replaced after `gap`.
    pub fn model_reconnected(&self, end: SessionEnd, gap: Duration) {
        self.model_reconnects[end as usize].fetch_add(1, Relaxed);
        self.model_reconnect_gap.observe(gap);
    }

    /// A session was renewed by its standby (`forced`: no silent moment came in time).
    pub fn model_renewed(&self, forced: bool) {
        self.model_renewals[usize::from(forced)].fetch_add(1, Relaxed);
    }

    pub fn model_renewals(&self, forced: bool) -> u64 {
        self.model_renewals[usize::from(forced)].load(Relaxed)
    }

    pub fn call_fell_back(&self, reason: FallbackReason) {
        self.call_fallbacks[reason.index()].fetch_add(1, Relaxed);
    }

    pub fn call_fallbacks(&self, reason: FallbackReason) -> u64 {
        self.call_fallbacks[reason.index()].load(Relaxed)
    }

    pub fn model_reconnects(&self, end: SessionEnd) -> u64 {
        self.model_reconnects[end as usize].load(Relaxed)
    }

    pub fn twilio_error(&self, kind: TwilioErrorKind) {
        self.twilio_errors[kind as usize].fetch_add(1, Relaxed);
    }

    pub fn twilio_errors(&self, kind: TwilioErrorKind) -> u64 {
        self.twilio_errors[kind as usize].load(Relaxed)
    }

    /// A socket write missed its deadline, or a queue of messages that are never dropped
    /// overflowed: the peer is not reading and its call ends.
    pub fn peer_stalled(&self, leg: Leg) {
        self.peer_stalls[leg as usize].fetch_add(1, Relaxed);
    }

    pub fn peer_stalls(&self, leg: Leg) -> u64 {
        self.peer_stalls[leg as usize].load(Relaxed)
    }

    pub fn signature_failure(&self, route: SignedRoute) {
        self.signature_failures[route as usize].fetch_add(1, Relaxed);
    }

    pub fn signature_failures(&self, route: SignedRoute) -> u64 {
        self.signature_failures[route as usize].load(Relaxed)
    }

    pub fn webhook_refused(&self, reason: WebhookRefusal) {
        self.webhooks_refused[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn webhooks_refused(&self, reason: WebhookRefusal) -> u64 {
        self.webhooks_refused[reason as usize].load(Relaxed)
    }

    pub fn audio_dropped(&self, direction: Direction, frames: u64) {
        match direction {
            Direction::Uplink => &self.audio_dropped_uplink,
            Direction::Downlink => &self.audio_dropped_downlink,
        }
        .fetch_add(frames, Relaxed);
    }

    pub fn audio_dropped_count(&self, direction: Direction) -> u64 {
        match direction {
            Direction::Uplink => &self.audio_dropped_uplink,
            Direction::Downlink => &self.audio_dropped_downlink,
        }
        .load(Relaxed)
    }

    pub fn control_lookup_source(&self, source: ContextSource) {
        self.control_lookups[source as usize].fetch_add(1, Relaxed);
    }

    pub fn control_lookups(&self, source: ContextSource) -> u64 {
        self.control_lookups[source as usize].load(Relaxed)
    }

    pub fn control_request_failure(&self, endpoint: ControlEndpoint) {
        self.control_request_failures[endpoint as usize].fetch_add(1, Relaxed);
    }

    pub fn control_request_failures(&self, endpoint: ControlEndpoint) -> u64 {
        self.control_request_failures[endpoint as usize].load(Relaxed)
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let gauge = |out: &mut String, name: &str, help: &str, value: i64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        let counter = |out: &mut String, name: &str, help: &str, value: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Relaxed)
            );
        };
        gauge(
            &mut out,
            "voxrelay_calls_active",
            "Calls currently bridged.",
            self.calls_active.load(Relaxed),
        );
        counter(
            &mut out,
            "voxrelay_calls_started_total",
            "Media streams that reached `start`.",
            &self.calls_started,
        );
        counter(
            &mut out,
            "voxrelay_calls_ended_total",
            "Calls that ended, however they ended.",
            &self.calls_ended,
        );
        counter(
            &mut out,
            "voxrelay_calls_rejected_draining_total",
            "Calls refused because the bridge is draining.",
            &self.calls_rejected_draining,
        );
        counter(
            &mut out,
            "voxrelay_streams_refused_token_total",
            "Media streams refused for a wrong (or, when required, missing) stream token.",
            &self.streams_refused_token,
        );
        counter(
            &mut out,
            "voxrelay_fly_replays_total",
            "Stream upgrades replayed to the machine that pre-warmed them.",
            &self.fly_replays,
        );
        counter(
            &mut out,
            "voxrelay_calls_max_duration_total",
            "Calls ended by their tenant's max_call_seconds.",
            &self.calls_max_duration,
        );
        counter(
            &mut out,
            "voxrelay_prewarm_started_total",
            "Upstream sessions opened by the voice webhook ahead of the stream.",
            &self.prewarm_started,
        );
        counter(
            &mut out,
            "voxrelay_prewarm_claimed_total",
            "Pre-warmed upstream sessions taken over by their stream.",
            &self.prewarm_claimed,
        );
        counter(
            &mut out,
            "voxrelay_prewarm_unclaimed_total",
            "Pre-warmed upstream sessions closed because no stream claimed them in time.",
            &self.prewarm_unclaimed,
        );
        counter(
            &mut out,
            "voxrelay_prewarm_failed_total",
            "Pre-warms that could not open or configure the upstream session.",
            &self.prewarm_failed,
        );
        counter(
            &mut out,
            "voxrelay_prewarm_capped_total",
            "Calls that started cold because VOXRELAY_MAX_PREWARMS pre-warms were open.",
            &self.prewarm_capped,
        );
        gauge(
            &mut out,
            "voxrelay_prewarms_active",
            "Pre-warmed upstream sessions open and not yet claimed by a stream.",
            self.prewarms_active.load(Relaxed),
        );
        counter(
            &mut out,
            "voxrelay_webhook_repeats_total",
            "Voice webhooks for a CallSid already answered, answered again without preparing.",
            &self.webhook_repeats,
        );
        gauge(
            &mut out,
            "voxrelay_answered_calls",
            "CallSids remembered as answered (replays are not prepared again).",
            self.answered_calls.load(Relaxed),
        );
        counter(
            &mut out,
            "voxrelay_answered_calls_full_total",
            "Voice webhooks neither remembered nor prepared because the answered-call memory was full.",
            &self.answered_calls_full,
        );
        counter(
            &mut out,
            "voxrelay_pending_full_total",
            "Voice webhooks not prepared because too many calls were pending.",
            &self.pending_full,
        );
        counter(
            &mut out,
            "voxrelay_streams_refused_account_total",
            "Media streams refused because their accountSid is not VOXRELAY_TWILIO_ACCOUNT_SID.",
            &self.streams_refused_account,
        );
        counter(
            &mut out,
            "voxrelay_frames_in_total",
            "Media frames received from Twilio.",
            &self.frames_in,
        );
        counter(
            &mut out,
            "voxrelay_frames_out_total",
            "Media messages sent to Twilio.",
            &self.frames_out,
        );
        counter(
            &mut out,
            "voxrelay_audio_bytes_in_total",
            "Caller audio bytes received (mu-law).",
            &self.audio_bytes_in,
        );
        counter(
            &mut out,
            "voxrelay_audio_bytes_out_total",
            "Assistant audio bytes sent to Twilio (mu-law).",
            &self.audio_bytes_out,
        );
        counter(
            &mut out,
            "voxrelay_marks_sent_total",
            "Marks sent to Twilio.",
            &self.marks_sent,
        );
        counter(
            &mut out,
            "voxrelay_marks_stale_total",
            "Mark echoes ignored because a clear superseded them.",
            &self.marks_stale,
        );
        counter(
            &mut out,
            "voxrelay_barge_ins_total",
            "Caller interruptions of assistant audio.",
            &self.barge_ins,
        );
        counter(
            &mut out,
            "voxrelay_late_deltas_dropped_total",
            "Model audio deltas of interrupted responses dropped.",
            &self.late_deltas_dropped,
        );
        counter(
            &mut out,
            "voxrelay_dtmf_digits_total",
            "DTMF digits forwarded to the model.",
            &self.dtmf_digits,
        );
        counter(
            &mut out,
            "voxrelay_upstream_errors_total",
            "`error` events received from the model API.",
            &self.upstream_errors,
        );
        counter(
            &mut out,
            "voxrelay_upstream_connect_failures_total",
            "Model API connections that failed.",
            &self.upstream_connect_failures,
        );
        counter(
            &mut out,
            "voxrelay_upstream_disconnects_total",
            "Model API sockets that dropped mid-call.",
            &self.upstream_disconnects,
        );
        counter(
            &mut out,
            "voxrelay_upstream_oversized_total",
            "Model messages over the size cap (each ends its call).",
            &self.upstream_oversized,
        );
        gauge(
            &mut out,
            "voxrelay_call_writers_active",
            "Ended calls still closing their sockets (within their close grace).",
            self.call_writers_active.load(Relaxed),
        );
        counter(
            &mut out,
            "voxrelay_call_writers_aborted_total",
            "Ended calls whose sockets were dropped unfinished after the close grace.",
            &self.call_writers_aborted,
        );
        write_labelled_counter(
            &mut out,
            "voxrelay_peer_stalls_total",
            "Calls ended because a peer stopped reading (write deadline missed or control queue full), by leg.",
            "leg",
            Leg::ALL.map(|leg| (leg.as_str(), self.peer_stalls(leg))),
        );

        write_labelled_counter(
            &mut out,
            "voxrelay_model_sessions_lost_total",
            "Model sessions lost mid-call (a successor is then opened), by how they ended.",
            "reason",
            SessionEnd::ALL.map(|end| {
                (
                    end.as_str(),
                    self.model_sessions_lost[end as usize].load(Relaxed),
                )
            }),
        );
        write_labelled_counter(
            &mut out,
            "voxrelay_model_reconnects_total",
            "Lost model sessions replaced within the reconnect budget, by how the lost one ended.",
            "reason",
            SessionEnd::ALL.map(|end| (end.as_str(), self.model_reconnects(end))),
        );
        write_labelled_counter(
            &mut out,
            "voxrelay_model_renewals_total",
            "Model sessions renewed make-before-break before their age limit, at a silent moment or forced.",
            "at",
            [
                ("silence", self.model_renewals(false)),
                ("forced", self.model_renewals(true)),
            ],
        );
        write_labelled_counter(
            &mut out,
            "voxrelay_call_fallbacks_total",
            "Calls handed to the fallback TwiML because no model session could be had, by reason.",
            "reason",
            FallbackReason::ALL.map(|reason| (reason.as_str(), self.call_fallbacks(reason))),
        );
        self.model_reconnect_gap.render(
            &mut out,
            "voxrelay_model_reconnect_gap_seconds",
            "Time from a lost model session to its successor's opening (the caller's gap).",
        );
        write_labelled_counter(
            &mut out,
            "voxrelay_twilio_errors_total",
            "Bad input from Twilio media streams, by kind.",
            "kind",
            TwilioErrorKind::ALL.map(|kind| (kind.as_str(), self.twilio_errors(kind))),
        );
        write_labelled_counter(
            &mut out,
            "voxrelay_signature_failures_total",
            "Requests refused for a bad X-Twilio-Signature, by route.",
            "route",
            SignedRoute::ALL.map(|route| (route.as_str(), self.signature_failures(route))),
        );
        write_labelled_counter(
            &mut out,
            "voxrelay_webhooks_refused_total",
            "Signed voice webhooks refused, by reason.",
            "reason",
            WebhookRefusal::ALL.map(|reason| (reason.as_str(), self.webhooks_refused(reason))),
        );
        let _ = writeln!(
            out,
            "# HELP voxrelay_audio_dropped_total Audio messages dropped by a full queue (oldest first), by direction.\n# TYPE voxrelay_audio_dropped_total counter"
        );
        let _ = writeln!(
            out,
            "voxrelay_audio_dropped_total{{direction=\"uplink\"}} {}",
            self.audio_dropped_count(Direction::Uplink)
        );
        let _ = writeln!(
            out,
            "voxrelay_audio_dropped_total{{direction=\"downlink\"}} {}",
            self.audio_dropped_count(Direction::Downlink)
        );

        self.uplink_added.render(
            &mut out,
            "voxrelay_uplink_added_seconds",
            "Bridge-added latency, Twilio frame read to model socket write.",
        );
        self.downlink_added.render(
            &mut out,
            "voxrelay_downlink_added_seconds",
            "Bridge-added latency, model delta read to Twilio socket write (unpaced audio).",
        );
        self.upstream_connect.render(
            &mut out,
            "voxrelay_upstream_connect_seconds",
            "Time to open the model API socket.",
        );
        self.pacer_lateness.render(
            &mut out,
            "voxrelay_pacer_lateness_seconds",
            "How late the outbound audio pacer woke after its deadline.",
        );
        self.barge_in_reaction.render(
            &mut out,
            "voxrelay_barge_in_reaction_seconds",
            "speech_started read to Twilio clear written.",
        );
        self.render_providers(&mut out);
        self.render_control(&mut out);
        self.turns.render(&mut out);
        self.recordings.render(&mut out);
        self.listener.render(&mut out);
        self.audio.render(&mut out);
        out
    }

    /// The control-plane families, after all the others.
    fn render_control(&self, out: &mut String) {
        self.control_lookup.render(
            out,
            "voxrelay_control_lookup_seconds",
            "Time to resolve a dialled number's tenant context, fallback included.",
        );
        write_labelled_counter(
            out,
            "voxrelay_control_lookups_total",
            "Context lookups, by where the context came from.",
            "source",
            ContextSource::ALL.map(|source| (source.as_str(), self.control_lookups(source))),
        );
        write_labelled_counter(
            out,
            "voxrelay_control_request_failures_total",
            "Control-plane requests that failed (transport, timeout, non-2xx, undecodable), by endpoint.",
            "endpoint",
            ControlEndpoint::ALL
                .map(|endpoint| (endpoint.as_str(), self.control_request_failures(endpoint))),
        );
        let counters = [
            (
                "voxrelay_control_reports_delivered_total",
                "Call reports accepted by the control plane without going through the spool.",
                &self.control_reports_delivered,
            ),
            (
                "voxrelay_control_report_retries_total",
                "Call report deliveries retried after a transient failure.",
                &self.control_report_retries,
            ),
            (
                "voxrelay_control_reports_spooled_total",
                "Call reports written to the spool directory.",
                &self.control_reports_spooled,
            ),
            (
                "voxrelay_control_reports_resent_total",
                "Spooled call reports delivered and removed from the spool.",
                &self.control_reports_resent,
            ),
            (
                "voxrelay_control_reports_rejected_total",
                "Call reports the control plane refused for good (kept in rejected/).",
                &self.control_reports_rejected,
            ),
            (
                "voxrelay_control_report_spool_errors_total",
                "Call report spool directory operations that failed.",
                &self.control_report_spool_errors,
            ),
            (
                "voxrelay_control_tool_calls_total",
                "Tool calls the model made, run on the control plane.",
                &self.control_tool_calls,
            ),
            (
                "voxrelay_control_tool_failures_total",
                "Tool calls answered with an error output (the call went on).",
                &self.control_tool_failures,
            ),
            (
                "voxrelay_control_tools_cancelled_total",
                "Tool calls the model withdrew while they ran: abandoned, never answered.",
                &self.tools_cancelled,
            ),
            (
                "voxrelay_streams_unbound_total",
                "Media streams without a binding token let through (VOXRELAY_REQUIRE_STREAM_TOKEN=0): answered by the fallback agent.",
                &self.streams_unbound,
            ),
            (
                "voxrelay_control_report_spool_full_total",
                "Call report spool writes refused because the spool was at its size cap (the report is held in memory and retried).",
                &self.control_report_spool_full,
            ),
            (
                "voxrelay_control_reports_lost_total",
                "Call reports neither delivered nor kept (logged as errors).",
                &self.control_reports_lost,
            ),
            (
                "voxrelay_control_report_transcripts_truncated_total",
                "Call reports whose transcript was shortened to its bound (the cut is marked in the report).",
                &self.control_report_transcripts_truncated,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP voxrelay_control_report_spool_files Call reports in the spool directory: waiting to be resent (pending) or refused for good (rejected).\n# TYPE voxrelay_control_report_spool_files gauge\nvoxrelay_control_report_spool_files{{dir=\"pending\"}} {}\nvoxrelay_control_report_spool_files{{dir=\"rejected\"}} {}",
            self.control_report_spool_files.load(Relaxed),
            self.control_report_rejected_files.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP voxrelay_control_report_spool_bytes Bytes of call reports in the spool directory, as for voxrelay_control_report_spool_files.\n# TYPE voxrelay_control_report_spool_bytes gauge\nvoxrelay_control_report_spool_bytes{{dir=\"pending\"}} {}\nvoxrelay_control_report_spool_bytes{{dir=\"rejected\"}} {}",
            self.control_report_spool_bytes.load(Relaxed),
            self.control_report_rejected_bytes.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP voxrelay_control_reports_held Call reports held in memory because the spool could not take them.\n# TYPE voxrelay_control_reports_held gauge\nvoxrelay_control_reports_held {}",
            self.control_reports_held.load(Relaxed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audio_telemetry_is_counted_per_call_and_rendered() {
        use voxrelay_core::session::telemetry::LegAudio;
        let metrics = Metrics::default();
        let mut audio = AudioTelemetry {
            caller: LegAudio {
                audio_ms: 60_000,
                rms_dbfs: -27.5,
                clipped_samples: 40,
                one_way_episodes: 1,
                one_way_ms: 6_000,
                ..LegAudio::default()
            },
            ..AudioTelemetry::default()
        };
        audio.agent.clipped_samples = 2;
        audio.echo.detected = true;
        metrics.audio.record_call(&audio);
        // A call without caller audio: no level, nothing else either.
        metrics.audio.record_call(&AudioTelemetry::default());
        assert_eq!(metrics.audio.one_way_episodes(0), 1);
        assert_eq!(metrics.audio.one_way_episodes(1), 0);
        assert_eq!(metrics.audio.echoes(), 1);
        let text = metrics.render();
        for line in [
            "voxrelay_audio_one_way_total{leg=\"caller\"} 1\n",
            "voxrelay_audio_one_way_total{leg=\"agent\"} 0\n",
            "voxrelay_audio_one_way_ms_total{leg=\"caller\"} 6000\n",
            "voxrelay_audio_clipped_samples_total{leg=\"caller\"} 40\n",
            "voxrelay_audio_clipped_samples_total{leg=\"agent\"} 2\n",
            "voxrelay_audio_echo_total 1\n",
            "voxrelay_audio_caller_level_dbfs_bucket{le=\"-30\"} 0\n",
            "voxrelay_audio_caller_level_dbfs_bucket{le=\"-25\"} 1\n",
            "voxrelay_audio_caller_level_dbfs_bucket{le=\"+Inf\"} 1\n",
            "voxrelay_audio_caller_level_dbfs_sum -27.5\n",
            "voxrelay_audio_caller_level_dbfs_count 1\n",
        ] {
            assert!(text.contains(line), "{line} missing");
        }
    }

    #[test]
    fn a_call_latency_summary_is_bounded_by_the_largest_sample() {
        let call = CallLatencyRecorder::default();
        for us in [30, 40, 45, 60, 900] {
            call.uplink(Duration::from_micros(us));
        }
        let [uplink, downlink, _] = call.summary();
        assert_eq!(uplink, (5, 50, 900, 900));
        assert_eq!(downlink, (0, 0, 0, 0));
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_quantiles_coarse() {
        let histogram = Histogram::default();
        for us in [10, 30, 30, 200, 900, 3_000_000] {
            histogram.observe(Duration::from_micros(us));
        }
        let mut text = String::new();
        histogram.render(&mut text, "x", "help");
        assert!(text.contains("x_bucket{le=\"0.000025\"} 1\n"));
        assert!(text.contains("x_bucket{le=\"0.00005\"} 3\n"));
        assert!(text.contains("x_bucket{le=\"0.001\"} 5\n"));
        assert!(text.contains("x_bucket{le=\"+Inf\"} 6\n"));
        assert!(text.contains("x_count 6\n"));
        assert_eq!(
            histogram.quantile_upper_bound(0.5),
            Some(Duration::from_micros(50))
        );
        assert_eq!(
            histogram.quantile_upper_bound(1.0),
            Some(Duration::from_micros(5_000_000))
        );
    }

    #[test]
    fn render_names_every_family_once() {
        let metrics = Metrics::default();
        metrics.twilio_error(TwilioErrorKind::Oversized);
        metrics.signature_failure(SignedRoute::Media);
        metrics.webhook_refused(WebhookRefusal::AccountMismatch);
        let text = metrics.render();
        assert!(text.contains("voxrelay_twilio_errors_total{kind=\"oversized\"} 1"));
        assert!(text.contains("voxrelay_signature_failures_total{route=\"media\"} 1"));
        assert!(text.contains("voxrelay_webhooks_refused_total{reason=\"account_mismatch\"} 1\n"));
        assert!(text.contains("voxrelay_webhooks_refused_total{reason=\"bad_call_sid\"} 0\n"));
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split_whitespace().nth(2).unwrap();
            assert_eq!(
                text.matches(&format!("# TYPE {name} ")).count(),
                1,
                "{name}"
            );
        }
    }

    #[test]
    fn control_plane_families_render_per_label() {
        let metrics = Metrics::default();
        metrics.control_request_failure(ControlEndpoint::Tool);
        metrics.control_lookup_source(ContextSource::Stale);
        metrics.control_lookup.observe(Duration::from_millis(3));
        let text = metrics.render();
        assert!(text.contains("voxrelay_control_lookups_total{source=\"stale\"} 1\n"));
        assert!(text.contains("voxrelay_control_lookups_total{source=\"fallback\"} 0\n"));
        assert!(text.contains("voxrelay_control_lookup_seconds_count 1\n"));
        metrics.control_reports_spooled.fetch_add(2, Relaxed);
        assert!(
            metrics
                .render()
                .contains("# TYPE voxrelay_control_reports_spooled_total counter\nvoxrelay_control_reports_spooled_total 2\n")
        );
        assert!(text.contains("voxrelay_control_request_failures_total{endpoint=\"tool\"} 1\n"));
        assert!(text.contains("voxrelay_control_request_failures_total{endpoint=\"context\"} 0\n"));
    }
}
