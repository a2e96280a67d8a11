//! Process-wide counters, gauges and latency histograms, rendered as Prometheus text.
//!
//! Everything here is a relaxed atomic: the media path of every call updates these, and a
//! lock here would be the one lock shared by all calls. Histograms have fixed buckets chosen
//! for a media relay (tens of microseconds to a second). `render` produces the Prometheus
//! text exposition format (version 0.0.4) served on `GET /metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::control::directory::ContextSource;

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
/// report. Lock-free like them: the call's writer tasks record, the core task reads at the end.
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

/// Kinds of bad input from Twilio, each counted separately.
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
    /// A digit refused because too many were already waiting for the model's socket.
    DtmfFlood,
    /// A `start` whose streamSid, callSid or accountSid is not a Twilio SID.
    InvalidSid,
    /// No message from a started stream for [`crate::session::call::TWILIO_IDLE_TIMEOUT`].
    IdleTimeout,
}

impl TwilioErrorKind {
    const ALL: [TwilioErrorKind; 14] = [
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
    /// Socket writer tasks of calls still running (a leak shows here).
    pub call_writers_active: AtomicI64,
    /// Writers still running after their call's close grace, aborted with their socket.
    pub call_writers_aborted: AtomicU64,
    peer_stalls: [AtomicU64; Leg::ALL.len()],
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
}

impl Metrics {
    pub fn twilio_error(&self, kind: TwilioErrorKind) {
        self.twilio_errors[kind as usize].fetch_add(1, Relaxed);
    }

    /// Counts `n` errors of one kind at once (a sequence gap of `n` numbers is one add).
    pub fn twilio_errors_add(&self, kind: TwilioErrorKind, n: u64) {
        self.twilio_errors[kind as usize].fetch_add(n, Relaxed);
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
            "Socket writer tasks of calls still running.",
            self.call_writers_active.load(Relaxed),
        );
        counter(
            &mut out,
            "voxrelay_call_writers_aborted_total",
            "Socket writers aborted after their call's close grace.",
            &self.call_writers_aborted,
        );
        let _ = writeln!(
            out,
            "# HELP voxrelay_peer_stalls_total Calls ended because a peer stopped reading (write deadline missed or control queue full), by leg.\n# TYPE voxrelay_peer_stalls_total counter"
        );
        for leg in Leg::ALL {
            let _ = writeln!(
                out,
                "voxrelay_peer_stalls_total{{leg=\"{}\"}} {}",
                leg.as_str(),
                self.peer_stalls(leg)
            );
        }

        let _ = writeln!(
            out,
            "# HELP voxrelay_twilio_errors_total Bad input from Twilio media streams, by kind.\n# TYPE voxrelay_twilio_errors_total counter"
        );
        for kind in TwilioErrorKind::ALL {
            let _ = writeln!(
                out,
                "voxrelay_twilio_errors_total{{kind=\"{}\"}} {}",
                kind.as_str(),
                self.twilio_errors(kind)
            );
        }
        let _ = writeln!(
            out,
            "# HELP voxrelay_signature_failures_total Requests refused for a bad X-Twilio-Signature, by route.\n# TYPE voxrelay_signature_failures_total counter"
        );
        for route in SignedRoute::ALL {
            let _ = writeln!(
                out,
                "voxrelay_signature_failures_total{{route=\"{}\"}} {}",
                route.as_str(),
                self.signature_failures(route)
            );
        }
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
        self.render_control(&mut out);
        out
    }

    /// The control-plane families, after all the others.
    fn render_control(&self, out: &mut String) {
        self.control_lookup.render(
            out,
            "voxrelay_control_lookup_seconds",
            "Time to resolve a dialled number's tenant context, fallback included.",
        );
        let _ = writeln!(
            out,
            "# HELP voxrelay_control_lookups_total Context lookups, by where the context came from.\n# TYPE voxrelay_control_lookups_total counter"
        );
        for source in ContextSource::ALL {
            let _ = writeln!(
                out,
                "voxrelay_control_lookups_total{{source=\"{}\"}} {}",
                source.as_str(),
                self.control_lookups(source)
            );
        }
        let _ = writeln!(
            out,
            "# HELP voxrelay_control_request_failures_total Control-plane requests that failed (transport, timeout, non-2xx, undecodable), by endpoint.\n# TYPE voxrelay_control_request_failures_total counter"
        );
        for endpoint in ControlEndpoint::ALL {
            let _ = writeln!(
                out,
                "voxrelay_control_request_failures_total{{endpoint=\"{}\"}} {}",
                endpoint.as_str(),
                self.control_request_failures(endpoint)
            );
        }
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
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Relaxed)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let text = metrics.render();
        assert!(text.contains("voxrelay_twilio_errors_total{kind=\"oversized\"} 1"));
        assert!(text.contains("voxrelay_signature_failures_total{route=\"media\"} 1"));
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
