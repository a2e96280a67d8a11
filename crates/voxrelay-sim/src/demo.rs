//! `voxrelay demo`: a bridge on embedded defaults, the reference control plane (seeded with
//! `fixtures/tenants.toml`, SQLite in memory), the mock model, and a few simulated calls
//! through them, all in one process on 127.0.0.1, with a short report.
//!
//! Calls go to the seeded numbers in turn (Acme Dental, Bistro Luna, …) and, from the third
//! on, one to a number no tenant owns, which the fallback agent answers; beside them, one call
//! goes to Harbor Florist, a tenant on Gemini Live (the mock speaks both providers' protocols,
//! and the bridge dials each on its own path). Each caller stays
//! quiet for a moment (the tenant's greeting starts), then speaks over the greeting (a
//! barge-in: Twilio `clear`, model-side truncate), pauses (the mock model calls the tenant's
//! `lookup_business_hours` tool, then answers), and listens before hanging up. A last call,
//! placed after the others, has its model session reset 3 s in: the bridge opens a new
//! session, tells it the conversation, and the call goes on. The report shows each call's
//! tenant, agent, the provider that answered (from the report the control plane stored), voice
//! and greeting as the model received them, and the call history the control plane stored
//! from the bridge's reports (with every model session a call had, the gap between them, and
//! the model and tokens each call used).

use std::fmt::Write as _;
use std::time::Duration;

use url::Url;

use super::SPEECH_FIXTURE;
use super::caller::{CallReport, CallerConfig, place_call};
use crate::launcher::{
    BridgeFigures, BridgeLauncher, BridgeSettings, ControlPlaneAccess, InProcessBridge,
};
use crate::mock::{MockConfig, MockFaultKind, MockRealtimeServer, MockSessionRecord, MockToolCall};
use voxrelay_control_plane::server::{ControlPlaneError, start_embedded};
use voxrelay_core::control::api::CallReport as ControlReport;
use voxrelay_core::control::api::{ReportAudio, ReportLegAudio};
use voxrelay_core::{AudioMode, Secret};

/// The seeded numbers the demo dials, in order, and one nobody owns.
const DEMO_NUMBERS: [&str; 3] = ["+15550100001", "+15550100002", "+15550100003"];
const UNKNOWN_NUMBER: &str = "+15550100099";
/// Harbor Florist's number: the seeded tenant on Gemini Live.
const GEMINI_NUMBER: &str = "+15550100004";
const DEMO_TENANTS: [&str; 3] = ["acme_dental", "bistro_luna", "harbor_florist"];

#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub calls: usize,
    pub audio_mode: AudioMode,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            calls: 3,
            audio_mode: AudioMode::Pcmu,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("could not start the mock model: {0}")]
    Mock(std::io::Error),
    #[error("could not start the bridge: {0}")]
    Bridge(std::io::Error),
    #[error("could not start the control plane: {0}")]
    ControlPlane(#[from] ControlPlaneError),
}

pub struct DemoReport {
    pub calls: Vec<Result<CallReport, String>>,
    /// The number each call dialled.
    pub numbers: Vec<String>,
    /// The report the control plane stored for each call (`None`: none arrived), a call the
    /// fallback agent answered included.
    pub stored: Vec<Option<ControlReport>>,
    pub mock_sessions: Vec<MockSessionRecord>,
    /// What the control plane stored from the bridge's reports, per seeded tenant.
    pub history: Vec<(String, Vec<ControlReport>)>,
    pub text: String,
}

/// The number call `index` dials: the seeded ones in turn, every third one unknown.
fn demo_number(index: usize) -> &'static str {
    if index % 3 == 2 {
        UNKNOWN_NUMBER
    } else {
        DEMO_NUMBERS[(index - index / 3) % DEMO_NUMBERS.len()]
    }
}

/// The caller's side of a demo call: silence, speech over the greeting, then listening.
pub fn demo_caller_audio() -> Vec<u8> {
    let mut audio = vec![0xFF; 8 * 600];
    audio.extend_from_slice(SPEECH_FIXTURE);
    audio
}

/// Runs the demo against a bridge `launcher` starts in this process.
pub async fn run_demo(
    options: &DemoOptions,
    launcher: &impl BridgeLauncher,
) -> Result<DemoReport, DemoError> {
    let mock = MockRealtimeServer::start(MockConfig {
        // The first thing each caller says makes the model look up the opening hours.
        tool_script: vec![MockToolCall {
            name: "lookup_business_hours".to_owned(),
            arguments: serde_json::json!({"day": "saturday"}),
        }],
        ..MockConfig::default()
    })
    .await
    .map_err(DemoError::Mock)?;
    let (control_plane, key) = start_embedded().await?;
    let spool = std::env::temp_dir().join(format!("voxrelay-demo-spool-{}", std::process::id()));
    let token = Secret::new(format!("{:032x}", rand::random::<u128>()));
    let settings = BridgeSettings {
        audio_mode: options.audio_mode,
        control_plane: Some(ControlPlaneAccess {
            url: control_plane.url(),
            key,
            report_spool_dir: spool.clone(),
        }),
        // Harbor Florist's calls go to the mock's Gemini Live endpoint.
        gemini_model_url: Some(mock.gemini_url()),
        ..BridgeSettings::new(mock.url(), Secret::new("voxrelay-demo"), token.clone())
    };
    let bridge = launcher.launch(settings).await.map_err(DemoError::Bridge)?;
    let bridge_url =
        Url::parse(&format!("http://{}", bridge.local_addr())).expect("socket address URL");
    tracing::info!(bridge = %bridge_url, model = %mock.url(), control_plane = %control_plane.url(), calls = options.calls, "demo: placing simulated calls");

    let audio = demo_caller_audio();
    let mut calls = Vec::with_capacity(options.calls);
    // The Gemini tenant's call goes last of this batch, so the mock's sessions stay in call
    // order (each opens on its call's webhook, and the calls are staggered).
    let numbers: Vec<String> = (0..options.calls)
        .map(|index| demo_number(index).to_owned())
        .chain([GEMINI_NUMBER.to_owned()])
        .collect();
    for (index, number) in numbers.iter().enumerate() {
        let mut caller = CallerConfig::new(bridge_url.clone(), token.clone(), audio.clone());
        caller.linger = Duration::from_millis(5_500);
        caller.to = number.clone();
        caller.from = format!("+1555020{:04}", index);
        // A digit mid-call shows DTMF reaching the model.
        caller.dtmf = vec![(Duration::from_millis(9_000), '1')];
        calls.push(tokio::spawn(async move {
            // Stagger the calls a little, as real ones would be.
            tokio::time::sleep(Duration::from_millis(150 * index as u64)).await;
            place_call(&caller).await.map_err(|e| e.to_string())
        }));
    }
    let mut reports = Vec::with_capacity(calls.len() + 1);
    for call in calls {
        reports.push(call.await.unwrap_or_else(|e| Err(e.to_string())));
    }
    // The call that survives its model: the session resets 3 s in, while the caller speaks.
    let survivor = DEMO_NUMBERS[1].to_owned();
    mock.fail_next_session(MockFaultKind::ResetAt(Duration::from_secs(3)));
    let mut caller = CallerConfig::new(bridge_url.clone(), token.clone(), audio.clone());
    caller.linger = Duration::from_millis(3_000);
    caller.to = survivor.clone();
    caller.from = "+15550209999".to_owned();
    reports.push(place_call(&caller).await.map_err(|e| e.to_string()));
    let mut numbers = numbers;
    numbers.push(survivor);
    // The drain waits for the calls' reports (or spools them).
    let figures = bridge.stop(Duration::from_secs(5)).await;
    let sessions = mock.log().sessions();
    mock.shutdown();
    let mut history = Vec::new();
    for tenant in DEMO_TENANTS {
        let calls = control_plane
            .store()
            .call_history(tenant, 50)
            .ok()
            .and_then(Result::ok)
            .map(|history| history.calls)
            .unwrap_or_default();
        history.push((tenant.to_owned(), calls));
    }
    let stored: Vec<Option<ControlReport>> = reports
        .iter()
        .map(|report| {
            let call_sid = report.as_ref().ok()?.call_sid.as_str();
            control_plane.store().reported_call(call_sid).ok().flatten()
        })
        .collect();
    control_plane.stop().await;
    let _ = std::fs::remove_dir_all(&spool);
    let mut text = render(&reports, &numbers, &stored, &sessions, &history, &figures);
    let _ = writeln!(
        text,
        "drain: {} calls live at shutdown, {} cancelled",
        figures.calls_at_drain, figures.calls_cancelled
    );
    Ok(DemoReport {
        calls: reports,
        numbers,
        stored,
        mock_sessions: sessions,
        history,
        text,
    })
}

fn ms(duration: Option<Duration>) -> String {
    duration.map_or_else(
        || "-".to_owned(),
        |d| format!("{:.0} ms", d.as_secs_f64() * 1e3),
    )
}

fn us(duration: Option<Duration>) -> String {
    match duration {
        Some(Duration::MAX) => "> 5 s".to_owned(),
        Some(d) => format!("{} µs", d.as_micros()),
        None => "-".to_owned(),
    }
}

/// The voice and the audio format a mock session was configured with, in its provider's shape
/// (Gemini Live's audio is always PCM16).
fn session_voice_and_mode(session: &MockSessionRecord) -> (Option<&str>, &'static str) {
    if session.provider == "gemini" {
        let voice = session.session["generationConfig"]["speechConfig"]["voiceConfig"]
            ["prebuiltVoiceConfig"]["voiceName"]
            .as_str();
        return (voice, "pcm16");
    }
    let output = &session.session["audio"]["output"];
    let mode = output["format"]["type"].as_str().map_or("-", |format| {
        if format == "audio/pcmu" {
            "pcmu"
        } else {
            "pcm16"
        }
    });
    (output["voice"].as_str(), mode)
}

fn render(
    reports: &[Result<CallReport, String>],
    numbers: &[String],
    stored: &[Option<ControlReport>],
    sessions: &[MockSessionRecord],
    history: &[(String, Vec<ControlReport>)],
    figures: &BridgeFigures,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nvoxrelay demo: {} simulated calls through the bridge, the reference control plane and the mock model\n",
        reports.len(),
    );
    let _ = writeln!(
        out,
        "{:<4} {:<13} {:<14} {:<7} {:<8} {:<6} {:<6} greeting",
        "call", "dialled", "tenant", "agent", "provider", "voice", "mode"
    );
    for (index, (report, number)) in reports.iter().zip(numbers).enumerate() {
        let stored = stored.get(index).and_then(Option::as_ref);
        let session = sessions.get(index);
        let (voice, mode) = session.map_or((None, "-"), session_voice_and_mode);
        let greeting = session
            .and_then(|s| s.response_transcripts.first())
            .map_or("-", String::as_str);
        let _ = writeln!(
            out,
            "{:<4} {:<13} {:<14} {:<7} {:<8} {:<6} {:<6} {}",
            index + 1,
            number,
            match (report, stored) {
                (Ok(_), Some(stored)) => stored.tenant_id.as_deref().unwrap_or("(fallback)"),
                _ => "(no report)",
            },
            stored.map_or("-", |r| r.agent_name.as_str()),
            stored.map_or("-", |r| r.provider.as_str()),
            voice.unwrap_or("-"),
            mode,
            greeting
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<4} {:>8} {:>10} {:>10} {:>12} {:>8} {:>7} {:>9}",
        "call", "sent", "received", "played", "1st audio", "clears", "marks", "closed by"
    );
    for (index, report) in reports.iter().enumerate() {
        match report {
            Ok(r) => {
                let _ = writeln!(
                    out,
                    "{:<4} {:>7.1}s {:>9.1}s {:>9.1}s {:>12} {:>8} {:>3}/{:<3} {:>9}",
                    index + 1,
                    r.frames_sent as f64 * 0.02,
                    r.audio_received_seconds(),
                    r.audio_played_ms as f64 / 1e3,
                    ms(r.first_audio_after_start),
                    r.clears_received,
                    r.marks_echoed,
                    r.marks_received,
                    if r.closed_by_bridge {
                        "bridge"
                    } else {
                        "caller"
                    },
                );
            }
            Err(error) => {
                let _ = writeln!(out, "{:<4} failed: {error}", index + 1);
            }
        }
    }
    let tools: usize = sessions.iter().map(|s| s.function_outputs.len()).sum();
    let _ = writeln!(
        out,
        "\ncontrol plane's call history (from the bridge's signed reports):"
    );
    for (tenant, calls) in history {
        for call in calls {
            let _ = writeln!(
                out,
                "  {tenant:<14} {} {:<8} {:>5.1}s in {:>5.1}s out, {} barge-ins, {} tool calls, end: {}, context: {}, memory: {}",
                call.to,
                call.agent_name,
                call.audio_seconds_in,
                call.audio_seconds_out,
                call.barge_ins,
                call.tool_calls,
                call.end_reason,
                call.context_source,
                call.memory_namespace.as_deref().unwrap_or("-"),
            );
            let _ = writeln!(
                out,
                "      provider: {}, model: {}, tokens: {}",
                call.provider,
                call.model.as_deref().unwrap_or("(endpoint default)"),
                call.usage
                    .map_or("none reported".to_owned(), |usage| format!(
                        "{} in / {} out",
                        usage.input_tokens, usage.output_tokens
                    )),
            );
            for turn in &call.turns {
                let _ = writeln!(out, "      {}", turn_line(turn));
            }
            if let Some(audio) = &call.audio {
                let _ = writeln!(out, "      {}", audio_line(audio));
            }
            if call.model_sessions.len() > 1 || call.fallback.is_some() {
                let sessions: Vec<String> = call
                    .model_sessions
                    .iter()
                    .map(|session| {
                        format!(
                            "{:.1}–{} s ({})",
                            session.started_ms as f64 / 1e3,
                            session
                                .ended_ms
                                .map_or("?".to_owned(), |end| format!("{:.1}", end as f64 / 1e3)),
                            session.end.as_deref().unwrap_or("open")
                        )
                    })
                    .collect();
                let _ = writeln!(
                    out,
                    "      model sessions: {}; reconnect gap {} ms, hold prompt {} ms{}",
                    sessions.join(", "),
                    call.reconnect_gap_ms,
                    call.hold_prompt_ms,
                    call.fallback.as_ref().map_or(String::new(), |f| format!(
                        ", fallback: {} ({})",
                        f.caller_got, f.reason
                    )),
                );
            }
            for line in &call.transcript {
                let _ = writeln!(
                    out,
                    "      {:>6.1}s {:<9} {}",
                    line.offset_ms as f64 / 1e3,
                    line.speaker.as_str(),
                    line.text
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "(calls answered by the fallback agent are reported without a tenant)\ntool outputs the model received: {tools}"
    );
    let truncates: usize = sessions.iter().map(|s| s.truncates.len()).sum();
    let deletes: usize = sessions.iter().map(|s| s.deletes.len()).sum();
    let texts: usize = sessions.iter().map(|s| s.user_texts.len()).sum();
    let _ = writeln!(
        out,
        "\nmodel side (mock): {} sessions, {} truncates {:?}, {} deletes, {} DTMF notes",
        sessions.len(),
        truncates,
        sessions
            .iter()
            .flat_map(|s| s.truncates.iter().map(|(_, ms)| *ms))
            .collect::<Vec<_>>(),
        deletes,
        texts
    );
    let _ = writeln!(
        out,
        "bridge-added latency (write completed − read; bucket upper bounds):\n  uplink   Twilio frame → model: n={:<6} mean {:>8}  p50 ≤ {:>8}  p99 ≤ {:>8}\n  downlink model delta → Twilio: n={:<6} mean {:>8}  p50 ≤ {:>8}  p99 ≤ {:>8}\n  barge-in speech_started → clear: n={:<4} mean {:>8}\n  pacer wake-up lateness:          n={:<6} mean {:>8}  p99 ≤ {:>8}",
        figures.uplink_added.count,
        us(figures.uplink_added.mean),
        us(figures.uplink_added.p50),
        us(figures.uplink_added.p99),
        figures.downlink_added.count,
        us(figures.downlink_added.mean),
        us(figures.downlink_added.p50),
        us(figures.downlink_added.p99),
        figures.barge_in_reaction.count,
        us(figures.barge_in_reaction.mean),
        figures.pacer_lateness.count,
        us(figures.pacer_lateness.mean),
        us(figures.pacer_lateness.p99),
    );
    out
}

/// One turn of a reported call, as the demo prints it: where the caller's wait went.
fn turn_line(turn: &voxrelay_core::control::api::TurnReport) -> String {
    let part = |value: Option<f64>| value.map_or("-".to_owned(), |ms| format!("{ms:.1}"));
    let mut line = format!(
        "turn at {:.1} s ({}): ",
        turn.at_ms as f64 / 1e3,
        turn.cause
    );
    if let Some(voice_to_voice) = turn.voice_to_voice_ms {
        let _ = write!(
            line,
            "voice-to-voice {voice_to_voice:.1} ms = model {} (turn detection {}) + bridge {} + playout {}",
            part(turn.model_ms),
            part(turn.detect_ms),
            part(turn.bridge_ms),
            part(turn.playout_ms),
        );
    } else {
        let _ = write!(
            line,
            "bridge {} ms, playout {} ms",
            part(turn.bridge_ms),
            part(turn.playout_ms)
        );
    }
    if let Some(barge_in) = &turn.barge_in {
        let _ = write!(
            line,
            "; barged in at {:.1} s: talk-over {} ms, agent heard over the caller {} ms",
            barge_in.at_ms as f64 / 1e3,
            part(barge_in.talk_over_ms),
            part(barge_in.heard_over_caller_ms),
        );
    }
    line
}

/// A call's audio telemetry on one line: both legs' level, peak, silence, clipping and
/// one-way audio, and the echo.
fn audio_line(audio: &ReportAudio) -> String {
    let leg = |leg: &ReportLegAudio| {
        format!(
            "{:.1} dBFS (peak {:.1}), {:.0}% silent (longest {:.1} s), {} clipped, one-way {}",
            leg.rms_dbfs,
            leg.peak_dbfs,
            leg.silence_share * 100.0,
            leg.longest_silence_ms as f64 / 1e3,
            leg.clipped_samples,
            leg.one_way_episodes,
        )
    };
    let echo = match (audio.echo.delay_ms, audio.echo.level_db) {
        (Some(delay), Some(level)) if audio.echo.detected => {
            format!("echo at {delay} ms, {level:.1} dB down")
        }
        _ => format!("no echo (r {:.2})", audio.echo.correlation),
    };
    format!(
        "audio: caller {}; agent {}; {echo}",
        leg(&audio.caller),
        leg(&audio.agent)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use voxrelay_core::control::api::ReportEcho;

    #[test]
    fn the_audio_line_names_both_legs_and_the_echo() {
        let leg = ReportLegAudio {
            audio_ms: 9_000,
            rms_dbfs: -23.46,
            peak_dbfs: -3.0,
            clipped_samples: 2,
            silence_share: 0.42,
            longest_silence_ms: 5_410,
            one_way_episodes: 1,
            one_way_ms: 5_410,
        };
        let mut audio = ReportAudio {
            caller: leg,
            agent: leg,
            echo: ReportEcho {
                detected: true,
                delay_ms: Some(180),
                level_db: Some(19.88),
                correlation: 0.95,
            },
        };
        assert_eq!(
            audio_line(&audio),
            "audio: caller -23.5 dBFS (peak -3.0), 42% silent (longest 5.4 s), 2 clipped, one-way 1; \
             agent -23.5 dBFS (peak -3.0), 42% silent (longest 5.4 s), 2 clipped, one-way 1; \
             echo at 180 ms, 19.9 dB down"
        );
        audio.echo = ReportEcho {
            correlation: 0.12,
            ..ReportEcho::default()
        };
        assert!(audio_line(&audio).ends_with("; no echo (r 0.12)"));
    }

    #[test]
    fn demo_dials_each_seeded_number_and_every_third_call_an_unknown_one() {
        let dialled: Vec<&str> = (0..6).map(demo_number).collect();
        assert_eq!(
            dialled,
            [
                "+15550100001",
                "+15550100002",
                UNKNOWN_NUMBER,
                "+15550100003",
                "+15550100001",
                UNKNOWN_NUMBER
            ]
        );
    }
}
