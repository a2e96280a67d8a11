//! A finished call as a control-plane report (`POST /v1/calls/{call_sid}/report`).
//!
//! Pure: everything comes in as values (the engine's figures, the call's agent, the times and
//! the per-call latency summary), so the report's shape is tested without a call.

use std::time::{SystemTime, UNIX_EPOCH};

use super::agent::CallAgent;
use super::engine::CallStats;
use crate::control::api::{CallLatency, CallReport, LatencySummary, TranscriptEntry};

/// μ-law 8 kHz: one byte per sample.
const MULAW_BYTES_PER_SECOND: f64 = 8_000.0;

/// Who the call was, as `start` and the webhook said.
pub struct CallIdentity<'a> {
    pub call_sid: &'a str,
    pub stream_sid: &'a str,
    pub from: &'a str,
    pub to: &'a str,
}

pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// Builds the report; `latency` is `(count, p50, p99, max)` in µs for uplink, downlink and
/// barge-in ([`super::metrics::CallLatencyRecorder::summary`]).
pub fn call_report(
    identity: &CallIdentity<'_>,
    agent: &CallAgent,
    started_at: SystemTime,
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
        call_sid: identity.call_sid.to_owned(),
        stream_sid: identity.stream_sid.to_owned(),
        tenant_id: agent.tenant_id.clone(),
        agent_name: agent.agent_name.clone(),
        from: identity.from.to_owned(),
        to: identity.to.to_owned(),
        started_at_ms: unix_ms(started_at),
        ended_at_ms: unix_ms(ended_at).max(unix_ms(started_at)),
        end_reason: end_reason.to_owned(),
        context_source: agent.source.to_owned(),
        memory_namespace: agent.memory_namespace.clone(),
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
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::AgentDefaults;
    use crate::control::api::Speaker;
    use crate::session::engine::TranscriptLine;

    #[test]
    fn a_report_carries_the_calls_figures_and_transcript_in_order() {
        let stats = CallStats {
            audio_bytes_in: 80_000,
            audio_bytes_out: 12_000,
            barge_ins: 2,
            dtmf_digits: 1,
            tool_calls: 1,
            transcript: vec![
                TranscriptLine {
                    speaker: Speaker::Assistant,
                    offset_ms: 300,
                    text: "Hello!".into(),
                },
                TranscriptLine {
                    speaker: Speaker::Caller,
                    offset_ms: 2_100,
                    text: "Hi.".into(),
                },
            ],
            ..CallStats::default()
        };
        let mut agent = CallAgent::from_defaults(&AgentDefaults::default(), "fallback");
        agent.agent_name = "Ada".into();
        let started = UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
        let report = call_report(
            &CallIdentity {
                call_sid: "CA1",
                stream_sid: "MZ1",
                from: "+1555",
                to: "+1666",
            },
            &agent,
            started,
            started + Duration::from_secs(12),
            "twilio_stop",
            &stats,
            [(500, 50, 100, 180), (40, 250, 1_000, 900), (0, 0, 0, 0)],
        );
        assert_eq!(report.tenant_id, None);
        assert_eq!(report.context_source, "fallback");
        assert_eq!(report.ended_at_ms - report.started_at_ms, 12_000);
        assert_eq!(report.audio_seconds_in, 10.0);
        assert_eq!(report.audio_seconds_out, 1.5);
        assert_eq!(report.latency.downlink_us.p99, 1_000);
        assert_eq!(report.transcript[0].speaker, Speaker::Assistant);
        assert_eq!(report.transcript[1].offset_ms, 2_100);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["transcript"][1]["speaker"], "caller");
        assert_eq!(json["end_reason"], "twilio_stop");
    }
}
