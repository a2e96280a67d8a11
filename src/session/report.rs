//! A finished call as a control-plane report (`POST /v1/calls/{call_sid}/report`); the
//! bounded transcript it carries is the engine's (`voxrelay_core::session::transcript`).
//!
//! Pure: everything comes in as values (the engine's figures, the call's agent, the times and
//! the per-call latency summary), so the report's shape is tested without a call.
//!
//! Size bound. Every report must fit well under the control plane's body limit (1 MiB), or it
//! would be refused (413) and never delivered. A call keeps at most [`MAX_TRANSCRIPT_BYTES`] of
//! transcript, measured as the lines encode in the report (JSON escapes included): when a new
//! line would pass it, the oldest lines are dropped (the most recent are what a caller's last
//! request was) and counted in `transcript_dropped_lines`; a single line longer than
//! [`MAX_TRANSCRIPT_LINE_BYTES`] keeps its start and is counted in `transcript_cut_lines`. The
//! other strings a peer or a control plane can make long (ids, numbers, agent and tenant names,
//! the memory namespace, the model id) are cut at [`MAX_REPORT_FIELD_BYTES`]; at most
//! `voxrelay_core::session::turns::MAX_TURNS` turns are kept. The whole report
//! is then at most [`MAX_REPORT_BYTES`] (the worst case is built and measured in the tests).

use std::time::{Duration, SystemTime};

use super::agent::CallAgent;
use super::engine::CallStats;
use crate::Provider;
use crate::control::api::{
    CallLatency, CallReport, LatencySummary, ModelSessionReport, ReportAudio, ReportBinding,
    ReportEcho, ReportFallback, ReportLegAudio, ReportUsage, TranscriptEntry, TurnBargeInReport,
    TurnReport,
};
use voxrelay_core::session::telemetry::{AudioTelemetry, LegAudio};
pub use voxrelay_core::session::transcript::{
    MAX_TRANSCRIPT_BYTES, MAX_TRANSCRIPT_LINE_BYTES, Transcript,
};
use voxrelay_core::session::turns::TurnTiming;

/// μ-law 8 kHz: one byte per sample.
const MULAW_BYTES_PER_SECOND: f64 = 8_000.0;

/// Longest id, number, agent name, tenant id, memory namespace or model id a report carries.
pub const MAX_REPORT_FIELD_BYTES: usize = 256;
/// The largest report [`call_report`] can build, encoded: the transcript budget, eight cut
/// fields at their worst JSON escaping (six bytes per byte), every turn kept (about 120 bytes
/// each at their widest), and the rest of the document with every number at its widest. Under
/// a third of the control plane's 1 MiB body limit.
pub const MAX_REPORT_BYTES: usize = 296 * 1024;
const _: () = assert!(MAX_REPORT_BYTES <= (1 << 20) / 3);

/// Who the call was, as `start` and the webhook said: the one record of a call's identity,
/// kept by the call from its `start` and read by its report.
#[derive(Clone, Debug)]
pub struct CallIdentity {
    pub call_sid: String,
    pub stream_sid: String,
    pub from: String,
    pub to: String,
    /// When `start` arrived.
    pub started_at: SystemTime,
    /// Whether the stream was bound to its call by the webhook's token.
    pub binding: ReportBinding,
}

/// `text` cut at [`MAX_REPORT_FIELD_BYTES`] on a char boundary.
fn bounded(text: &str) -> String {
    text[..floor_char_boundary(text, MAX_REPORT_FIELD_BYTES)].to_owned()
}

/// The largest char boundary of `text` at or below `at`.
fn floor_char_boundary(text: &str, at: usize) -> usize {
    let mut end = at.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end
}

pub fn unix_ms(at: SystemTime) -> u64 {
    voxrelay_core::time::unix_ms(at)
}

/// Builds the report; `latency` is `(count, p50, p99, max)` in µs for uplink, downlink and
/// barge-in ([`super::metrics::CallLatencyRecorder::summary`]).
pub fn call_report(
    identity: &CallIdentity,
    agent: &CallAgent,
    ended_at: SystemTime,
    end_reason: &str,
    stats: &CallStats,
    latency: [(u64, u64, u64, u64); 3],
) -> CallReport {
    let summary = |(count, p50, p99, max): (u64, u64, u64, u64)| LatencySummary {
        count,
        p50,
        p99,
        max,
    };
    CallReport {
        call_sid: bounded(&identity.call_sid),
        stream_sid: bounded(&identity.stream_sid),
        tenant_id: agent.tenant_id.as_deref().map(bounded),
        agent_name: bounded(&agent.agent_name),
        from: bounded(&identity.from),
        to: bounded(&identity.to),
        started_at_ms: unix_ms(identity.started_at),
        ended_at_ms: unix_ms(ended_at).max(unix_ms(identity.started_at)),
        end_reason: end_reason.to_owned(),
        context_source: agent.source.to_owned(),
        binding: identity.binding,
        memory_namespace: agent.memory_namespace.as_deref().map(bounded),
        audio_seconds_in: stats.audio_bytes_in as f64 / MULAW_BYTES_PER_SECOND,
        audio_seconds_out: stats.audio_bytes_out as f64 / MULAW_BYTES_PER_SECOND,
        barge_ins: stats.barge_ins,
        dtmf_digits: stats.dtmf_digits,
        tool_calls: stats.tool_calls,
        latency: CallLatency {
            uplink_us: summary(latency[0]),
            downlink_us: summary(latency[1]),
            barge_in_us: summary(latency[2]),
        },
        transcript: stats
            .transcript
            .iter()
            .map(|line| TranscriptEntry {
                speaker: line.speaker,
                offset_ms: line.offset_ms,
                text: line.text.clone(),
            })
            .collect(),
        transcript_dropped_lines: stats.transcript.dropped_lines(),
        transcript_cut_lines: stats.transcript.cut_lines(),
        model_sessions: stats
            .continuity
            .sessions
            .iter()
            .map(|session| ModelSessionReport {
                started_ms: session.started_ms,
                ended_ms: session.ended_ms,
                end: session.end.map(|end| end.as_str().to_owned()),
                failed_connects: session
                    .failed_attempts
                    .iter()
                    .map(|failure| failure.as_str().to_owned())
                    .collect(),
            })
            .collect(),
        reconnect_gap_ms: stats.continuity.reconnect_gap_ms,
        hold_prompt_ms: stats.continuity.hold_prompt_ms,
        fallback: stats.continuity.fallback.map(|reason| ReportFallback {
            reason: reason.as_str().to_owned(),
            caller_got: fallback_twiml(identity.binding, agent).to_owned(),
        }),
        provider: agent.provider,
        // Gemini's default model is the bridge's to name (it goes in `setup`); OpenAI's is the
        // endpoint URL's, which the report does not guess.
        model: agent
            .model
            .as_deref()
            .or((agent.provider == Provider::Gemini).then(|| Provider::Gemini.default_model()))
            .map(bounded),
        usage: (stats.usage.reports > 0).then_some(ReportUsage {
            input_tokens: stats.usage.input_tokens,
            output_tokens: stats.usage.output_tokens,
        }),
        turns: stats.turns.all().iter().map(turn_report).collect(),
        turns_dropped: stats.turns.dropped(),
        // The call's end sets it once the recorder has finalised its file.
        recording: None,
        // The engine's telemetry, added by [`audio_report`] where the call has it.
        audio: None,
    }
}

/// A duration as the report's milliseconds, to the microsecond.
fn report_ms(duration: Duration) -> f64 {
    duration.as_micros() as f64 / 1_000.0
}

fn turn_report(turn: &TurnTiming) -> TurnReport {
    TurnReport {
        at_ms: turn.at.as_millis() as u64,
        cause: turn.cause.as_str().to_owned(),
        voice_to_voice_ms: turn.voice_to_voice.map(report_ms),
        model_ms: turn.model.map(report_ms),
        detect_ms: turn.detect.map(report_ms),
        bridge_ms: turn.bridge.map(report_ms),
        playout_ms: turn.playout.map(report_ms),
        barge_in: turn.barge_in.map(|barge_in| TurnBargeInReport {
            at_ms: barge_in.at.as_millis() as u64,
            talk_over_ms: barge_in.talk_over.map(report_ms),
            heard_over_caller_ms: barge_in.heard_over_caller.map(report_ms),
        }),
    }
}

/// A call's audio telemetry as its report carries it (`CallReport::audio`): levels and shares
/// rounded to 0.01, every number finite.
pub fn audio_report(audio: &AudioTelemetry) -> ReportAudio {
    ReportAudio {
        caller: leg_report(&audio.caller),
        agent: leg_report(&audio.agent),
        echo: ReportEcho {
            detected: audio.echo.detected,
            delay_ms: audio.echo.delay_ms,
            level_db: audio.echo.level_db.map(round2),
            correlation: round2(audio.echo.correlation),
        },
    }
}

fn leg_report(leg: &LegAudio) -> ReportLegAudio {
    ReportLegAudio {
        audio_ms: leg.audio_ms,
        rms_dbfs: round2(leg.rms_dbfs),
        peak_dbfs: round2(leg.peak_dbfs),
        clipped_samples: leg.clipped_samples,
        silence_share: round2(leg.silence_share),
        longest_silence_ms: leg.longest_silence_ms,
        one_way_episodes: leg.one_way_episodes,
        one_way_ms: leg.one_way_ms,
    }
}

/// `x` to two decimals; a non-finite `x` (never made by the telemetry) as 0, which JSON can
/// carry.
fn round2(x: f64) -> f64 {
    if x.is_finite() {
        (x * 100.0).round() / 100.0
    } else {
        0.0
    }
}

/// What a caller whose call fell back got from Twilio: the TwiML after `<Connect>` of this
/// bridge's webhook (which named the same agent's fallback), or, for a stream our webhook did
/// not answer, whatever its own TwiML says.
pub fn fallback_twiml(binding: ReportBinding, agent: &CallAgent) -> &'static str {
    match (binding, &agent.fallback_number) {
        (ReportBinding::Unbound, _) => "stream_closed",
        (ReportBinding::Bound, Some(_)) => "dial",
        (ReportBinding::Bound, None) => "apology",
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::config::AgentDefaults;
    use crate::control::api::Speaker;
    use crate::session::continuity::{
        ConnectFailure, FallbackReason, MAX_SESSION_RECORDS, SessionEnd, SessionRecord,
    };
    use crate::session::engine::{TokenUsage, TranscriptLine};
    use crate::testkit::Lcg;
    use voxrelay_core::session::turns::MAX_TURNS;

    fn identity(binding: ReportBinding, started_at: SystemTime) -> CallIdentity {
        CallIdentity {
            call_sid: "CA1".into(),
            stream_sid: "MZ1".into(),
            from: "+1555".into(),
            to: "+1666".into(),
            started_at,
            binding,
        }
    }

    fn line(speaker: Speaker, offset_ms: u64, text: &str) -> TranscriptLine {
        TranscriptLine {
            speaker,
            offset_ms,
            text: text.into(),
        }
    }

    #[test]
    fn a_report_carries_the_calls_figures_and_transcript_in_order() {
        let mut stats = CallStats {
            audio_bytes_in: 80_000,
            audio_bytes_out: 12_000,
            barge_ins: 2,
            dtmf_digits: 1,
            tool_calls: 1,
            ..CallStats::default()
        };
        stats
            .transcript
            .push(line(Speaker::Assistant, 300, "Hello!"));
        stats.transcript.push(line(Speaker::Caller, 2_100, "Hi."));
        let mut agent = CallAgent::from_defaults(&AgentDefaults::default(), "fallback");
        agent.agent_name = "Ada".into();
        let started = UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
        let report = call_report(
            &identity(ReportBinding::Bound, started),
            &agent,
            started + Duration::from_secs(12),
            "twilio_stop",
            &stats,
            [(500, 50, 100, 180), (40, 250, 1_000, 900), (0, 0, 0, 0)],
        );
        assert_eq!(report.tenant_id, None);
        assert_eq!(report.context_source, "fallback");
        assert_eq!(report.binding, ReportBinding::Bound);
        assert_eq!(report.ended_at_ms - report.started_at_ms, 12_000);
        assert_eq!(report.audio_seconds_in, 10.0);
        assert_eq!(report.audio_seconds_out, 1.5);
        assert_eq!(report.latency.downlink_us.p99, 1_000);
        assert_eq!(report.transcript[0].speaker, Speaker::Assistant);
        assert_eq!(report.transcript[1].offset_ms, 2_100);
        assert_eq!(report.transcript_dropped_lines, 0);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["transcript"][1]["speaker"], "caller");
        assert_eq!(json["end_reason"], "twilio_stop");
        assert_eq!(json["binding"], "bound");
        assert_eq!(json["transcript_dropped_lines"], 0);
        assert_eq!(json["model_sessions"], serde_json::json!([]));
        assert_eq!(json["fallback"], serde_json::Value::Null);
        assert_eq!(json["provider"], "openai");
        assert_eq!(json["model"], serde_json::Value::Null);
        assert!(
            json.get("usage").is_none(),
            "no usage reported: the field is absent"
        );
    }

    #[test]
    fn a_report_names_the_provider_model_and_usage() {
        let mut stats = CallStats::default();
        let mut agent = CallAgent::from_defaults(&AgentDefaults::default(), "fresh");
        agent.provider = Provider::Gemini;
        // No tenant model: Gemini's is the bridge's default, and the report names it.
        agent.model = None;
        let started = UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
        let report = |stats: &CallStats| {
            call_report(
                &identity(ReportBinding::Bound, started),
                &agent,
                started,
                "twilio_stop",
                stats,
                [(0, 0, 0, 0); 3],
            )
        };
        assert_eq!(report(&stats).usage, None);
        // A provider that reported zero tokens still reported: the usage is present.
        stats.usage.reports = 1;
        assert_eq!(report(&stats).usage, Some(ReportUsage::default()));
        stats.usage = TokenUsage {
            input_tokens: 301,
            output_tokens: 111,
            reports: 2,
        };
        let json = serde_json::to_value(report(&stats)).unwrap();
        assert_eq!(json["provider"], "gemini");
        assert_eq!(json["model"], "gemini-3.8-live");
        assert_eq!(
            json["usage"],
            serde_json::json!({"input_tokens": 301, "output_tokens": 111})
        );
    }

    #[test]
    fn a_report_names_every_model_session_and_what_a_fallback_gave_the_caller() {
        let mut stats = CallStats::default();
        stats.continuity.sessions = vec![
            SessionRecord {
                started_ms: 0,
                ended_ms: Some(4_000),
                end: Some(SessionEnd::Dropped),
                failed_attempts: Vec::new(),
            },
            SessionRecord {
                started_ms: 4_300,
                ended_ms: Some(9_000),
                end: Some(SessionEnd::CallEnded),
                failed_attempts: vec![ConnectFailure::RateLimited],
            },
        ];
        stats.continuity.reconnect_gap_ms = 300;
        stats.continuity.hold_prompt_ms = 0;
        let mut agent = CallAgent::from_defaults(&AgentDefaults::default(), "fresh");
        let started = UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
        let json = |stats: &CallStats, agent: &CallAgent, binding| {
            serde_json::to_value(call_report(
                &identity(binding, started),
                agent,
                started,
                "twilio_stop",
                stats,
                [(0, 0, 0, 0); 3],
            ))
            .unwrap()
        };
        let report = json(&stats, &agent, ReportBinding::Bound);
        assert_eq!(report["model_sessions"][0]["end"], "drop");
        assert_eq!(
            report["model_sessions"][1]["failed_connects"][0],
            "rate_limited"
        );
        assert_eq!(report["reconnect_gap_ms"], 300);
        stats.continuity.fallback =
            Some(FallbackReason::ConnectFailed(ConnectFailure::ServerError));
        let report = json(&stats, &agent, ReportBinding::Bound);
        assert_eq!(report["fallback"]["reason"], "server_error");
        assert_eq!(report["fallback"]["caller_got"], "apology");
        agent.fallback_number = Some("+15550100999".into());
        assert_eq!(
            json(&stats, &agent, ReportBinding::Bound)["fallback"]["caller_got"],
            "dial"
        );
        assert_eq!(
            json(&stats, &agent, ReportBinding::Unbound)["fallback"]["caller_got"],
            "stream_closed"
        );
    }

    #[test]
    fn the_audio_telemetry_is_reported_rounded_and_finite() {
        let leg = LegAudio {
            audio_ms: 61_020,
            rms_dbfs: -23.456_7,
            peak_dbfs: -3.001,
            clipped_samples: 7,
            silence_share: 0.416_66,
            longest_silence_ms: 5_410,
            one_way_episodes: 1,
            one_way_ms: 5_410,
        };
        let mut telemetry = AudioTelemetry {
            caller: leg,
            agent: LegAudio {
                rms_dbfs: f64::NAN,
                ..LegAudio::default()
            },
            ..AudioTelemetry::default()
        };
        telemetry.echo.detected = true;
        telemetry.echo.delay_ms = Some(180);
        telemetry.echo.level_db = Some(19.876);
        telemetry.echo.correlation = 0.954;
        let audio = audio_report(&telemetry);
        assert_eq!(
            serde_json::to_value(audio).unwrap(),
            serde_json::json!({
                "caller": {"audio_ms": 61_020, "rms_dbfs": -23.46, "peak_dbfs": -3.0,
                    "clipped_samples": 7, "silence_share": 0.42, "longest_silence_ms": 5_410,
                    "one_way_episodes": 1, "one_way_ms": 5_410},
                "agent": {"audio_ms": 0, "rms_dbfs": 0.0, "peak_dbfs": 0.0,
                    "clipped_samples": 0, "silence_share": 0.0, "longest_silence_ms": 0,
                    "one_way_episodes": 0, "one_way_ms": 0},
                "echo": {"detected": true, "delay_ms": 180, "level_db": 19.88,
                    "correlation": 0.95}
            })
        );
        // `call_report` leaves it to the call that has it.
        let agent = CallAgent::from_defaults(&AgentDefaults::default(), "fresh");
        let report = call_report(
            &identity(ReportBinding::Bound, UNIX_EPOCH),
            &agent,
            UNIX_EPOCH,
            "twilio_stop",
            &CallStats::default(),
            [(0, 0, 0, 0); 3],
        );
        assert_eq!(report.audio, None);
    }

    #[test]
    fn the_worst_case_report_fits_its_bound() {
        // Every field at its longest and worst escaping; the transcript filled to its budget
        // with escape-heavy lines of every length.
        let hostile = "\u{1}".repeat(64 * 1024);
        let mut stats = CallStats {
            audio_bytes_in: u64::MAX,
            audio_bytes_out: u64::MAX,
            barge_ins: u64::MAX,
            dtmf_digits: u64::MAX,
            tool_calls: u64::MAX,
            ..CallStats::default()
        };
        // Every session record the engine keeps, each with every failed attempt it keeps.
        stats.continuity.sessions = (0..MAX_SESSION_RECORDS)
            .map(|_| SessionRecord {
                started_ms: u64::MAX,
                ended_ms: Some(u64::MAX),
                end: Some(SessionEnd::Oversized),
                failed_attempts: vec![ConnectFailure::ServerError; 8],
            })
            .collect();
        stats.continuity.reconnect_gap_ms = u64::MAX;
        stats.continuity.hold_prompt_ms = u64::MAX;
        stats.continuity.fallback = Some(FallbackReason::TooManyDrops);
        let mut rng = Lcg(3);
        for _ in 0..300 {
            let length = rng.below(2 * MAX_TRANSCRIPT_LINE_BYTES as u64) as usize;
            stats.transcript.push(line(
                Speaker::Assistant,
                u64::MAX,
                &hostile[..length.min(hostile.len())],
            ));
        }
        let mut agent = CallAgent::from_defaults(&AgentDefaults::default(), "unknown_number");
        agent.tenant_id = Some(hostile.clone());
        agent.agent_name = hostile.clone();
        agent.memory_namespace = Some(hostile.clone());
        agent.model = Some(hostile.clone());
        stats.usage = TokenUsage {
            input_tokens: u64::MAX,
            output_tokens: u64::MAX,
            reports: u64::MAX,
        };
        // Every turn kept, each with every part and a barge-in, at widths no call reaches
        // (days, to the microsecond).
        let t0 = std::time::Instant::now();
        let at = |us: u64| t0 + Duration::from_micros(us);
        stats.turns.started(t0);
        for n in 0..=MAX_TURNS as u64 {
            let base = 900_000_000_001 + n;
            stats.turns.caller_stopped(
                Some(at(base)),
                Some(at(base + 111_111_111_111)),
                at(base + 111_111_111_111),
            );
            stats
                .turns
                .response_created("r", at(base + 222_222_222_221));
            stats
                .turns
                .model_audio("r", "i", at(base + 333_333_333_331));
            stats
                .turns
                .chunk_sent("i", at(base + 444_444_444_441), at(base), Duration::ZERO);
            stats
                .turns
                .mark_confirmed("i", 0, at(base + 555_555_555_551));
            stats
                .turns
                .caller_started(Some(at(base + 1)), at(base + 666_666_666_661));
            stats.turns.barged_in(at(base + 777_777_777_771));
        }
        let mut report = call_report(
            &CallIdentity {
                call_sid: hostile.clone(),
                stream_sid: hostile.clone(),
                from: hostile.clone(),
                to: hostile.clone(),
                started_at: UNIX_EPOCH + Duration::from_millis(u64::MAX / 2),
                binding: ReportBinding::Unbound,
            },
            &agent,
            UNIX_EPOCH + Duration::from_millis(u64::MAX / 2),
            "upstream_failed",
            &stats,
            [(u64::MAX, u64::MAX, u64::MAX, u64::MAX); 3],
        );
        // The audio telemetry with every number at its widest.
        let leg = LegAudio {
            audio_ms: u64::MAX,
            rms_dbfs: -99.99,
            peak_dbfs: -99.99,
            clipped_samples: u64::MAX,
            silence_share: 0.99,
            longest_silence_ms: u64::MAX,
            one_way_episodes: u32::MAX,
            one_way_ms: u64::MAX,
        };
        report.audio = Some(audio_report(&AudioTelemetry {
            caller: leg,
            agent: leg,
            echo: voxrelay_core::session::telemetry::EchoSummary {
                detected: true,
                delay_ms: Some(u32::MAX),
                level_db: Some(-99.99),
                correlation: 0.99,
            },
        }));
        let encoded = serde_json::to_vec(&report).unwrap();
        assert!(report.transcript_dropped_lines > 0 && report.transcript_cut_lines > 0);
        assert_eq!(report.turns.len(), MAX_TURNS);
        assert!(report.turns.iter().all(|turn| {
            turn.voice_to_voice_ms.is_some()
                && turn
                    .barge_in
                    .as_ref()
                    .is_some_and(|b| b.talk_over_ms.is_some())
        }));
        assert!(
            encoded.len() <= MAX_REPORT_BYTES,
            "{} > {MAX_REPORT_BYTES}",
            encoded.len()
        );
        // And the budget is spent: the bound is not loose by more than the fixed part.
        assert!(encoded.len() > MAX_TRANSCRIPT_BYTES - MAX_TRANSCRIPT_LINE_BYTES * 6);
        let parsed: CallReport = serde_json::from_slice(&encoded).unwrap();
        assert_eq!(parsed.call_sid.len(), MAX_REPORT_FIELD_BYTES);
    }
}
