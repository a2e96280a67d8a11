//! The call engine fed both peers at once. The input is a script, one step per line, tagged
//! by its first byte: `T` a Twilio text, `M` a model text, `O` the model's socket opens, `K`
//! time passes (the rest is milliseconds) and the pacer ticks, `C` the call's agent is known
//! (its model session arrives; the next byte picks mode and options), `L` the model's socket
//! is lost, `F` a connect fails, `S` a renewal's standby socket opens; any other line is a
//! Twilio text. Sessions renew every 2 s of the script's clock. The first byte of the input picks the audio mode and playback configuration.
//! After each step the outputs are taken as the driver takes them. Checks: nothing panics; each
//! step's output to Twilio is within the pacer's lead (two messages per chunk plus a
//! `clear`) and valid JSON for the started stream; a Twilio message asks at most two
//! messages of an open model socket, a model message at most 40 (a barge-in's truncate,
//! deletes and cancel); the opening releases at most the `session.update`, a replayed
//! conversation (`MAX_TURNS`) and its `response.create`, 100 held audio frames and two messages
//! per held digit (at most `HELD_DTMF_DIGITS`), and a renewal's switch as much; nothing reaches the
//! model before it opens; queued playback stays within its cap plus two chunks of silence
//! padding; every sequence gap is counted once in the metrics.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use voxrelay::AudioMode;
use voxrelay::session::continuity::{ConnectFailure, ContinuityConfig};
use voxrelay::session::conversation::MAX_TURNS;
use voxrelay::session::engine::{
    CallEngine, EndReason, HELD_DTMF_DIGITS, Input, OutKind, Outgoing, Output, Resolved,
    TwilioErrorKind,
};
use voxrelay::session::model::ModelSession;
use voxrelay::session::playback::PlaybackConfig;
use voxrelay::upstream::SessionSettings;

const HELD_UPLINK_FRAMES: usize = 100;
const MODEL_STEP_UPSTREAM_BOUND: usize = 40;

fn mode(pcm16: bool) -> AudioMode {
    if pcm16 {
        AudioMode::Pcm16
    } else {
        AudioMode::Pcmu
    }
}

fn session(pcm16: bool, tools: bool) -> Box<Resolved> {
    let settings = SessionSettings {
        audio_mode: mode(pcm16),
        greeting: Some("Hello".to_owned()),
        ..SessionSettings::default()
    };
    Resolved::session(ModelSession::new(settings, tools))
}

/// One step's outputs for each peer, as the driver's buffers hold them (a `clear` withdraws
/// audio for Twilio not yet written), and the tool calls to answer.
fn take_outputs(
    engine: &mut CallEngine,
    to_twilio: &mut Vec<Outgoing>,
    to_model: &mut Vec<Outgoing>,
    tools: &mut Vec<String>,
) -> bool {
    let mut switched = false;
    while let Some(output) = engine.poll_output() {
        match output {
            Output::ToTwilio(out) => {
                if out.kind == OutKind::Clear {
                    to_twilio.retain(|o| o.kind != OutKind::Audio);
                }
                to_twilio.push(out);
            }
            Output::ToModel(out) => to_model.push(out),
            Output::CallTool(call) => tools.push(call.call_id),
            Output::SwitchToStandby => switched = true,
            Output::Event(_)
            | Output::CancelTool { .. }
            | Output::Close(_)
            | Output::ConnectModel { .. }
            | Output::ConnectStandby { .. } => {}
        }
    }
    switched
}

fuzz_target!(|data: &[u8]| {
    let Some((&setup, script)) = data.split_first() else {
        return;
    };
    let pcm16 = setup & 1 != 0;
    let lead_ms = [120u64, 20, 60, 500][usize::from(setup >> 1 & 3)];
    let chunk_ms = [20u32, 40][usize::from(setup >> 3 & 1)];
    let max_queued_ms = [300_000u64, 1_000, 100, 0][usize::from(setup >> 4 & 3)];
    let mut engine = CallEngine::with_continuity(
        PlaybackConfig {
            lead: Duration::from_millis(lead_ms),
            chunk_ms,
            max_queued: Duration::from_millis(max_queued_ms),
        },
        ContinuityConfig {
            session_max: Some(Duration::from_secs(2)),
            ..ContinuityConfig::default()
        },
    );
    let mut resolved = false;
    let twilio_step_bound = 2 * (lead_ms / u64::from(chunk_ms)).max(1) as usize + 1;
    let mut now = Instant::now();
    let text = String::from_utf8_lossy(script);
    for line in text.split('\n') {
        let open_before = engine.model_is_open();
        let (tag, rest) = match line.as_bytes().first() {
            Some(b'T' | b'M' | b'O' | b'K' | b'C' | b'L' | b'F' | b'S') => {
                (line.as_bytes()[0], &line[1..])
            }
            _ => (b'T', line),
        };
        match tag {
            b'M' => {
                let _ = engine.handle(now, Input::Model(rest));
            }
            b'O' => {
                if !resolved {
                    resolved = true;
                    let _ = engine.handle(now, Input::ContextResolved(session(pcm16, true)));
                }
                let _ = engine.handle(now, Input::ModelConnected);
            }
            b'L' => {
                let _ = engine.handle(now, Input::ModelClosed(EndReason::UpstreamClosed));
            }
            b'F' => {
                let _ = engine.handle(now, Input::ModelConnectFailed(ConnectFailure::Network));
            }
            b'S' => {
                let _ = engine.handle(now, Input::StandbyConnected);
            }
            b'K' => {
                let ms: u64 = rest.trim().parse().unwrap_or(20);
                now += Duration::from_millis(ms.min(3_600_000));
                let _ = engine.handle(now, Input::Tick);
            }
            b'C' => {
                let flags = rest.as_bytes().first().copied().unwrap_or(0);
                let closed = engine.closed().is_some();
                let result = engine.handle(
                    now,
                    Input::ContextResolved(session(flags & 1 != 0, flags & 4 != 0)),
                );
                assert_eq!(result.is_err(), resolved && !closed);
                resolved = true;
            }
            _ => {
                let _ = engine.handle(now, Input::Twilio(rest));
            }
        }
        let (mut to_twilio, mut to_upstream, mut calls) = (Vec::new(), Vec::new(), Vec::new());
        let mut switched =
            take_outputs(&mut engine, &mut to_twilio, &mut to_upstream, &mut calls);
        for call_id in &calls {
            let output = r#"{"ok":true}"#;
            let _ = engine.handle(now, Input::ToolResult { call_id, output });
            let mut no_calls = Vec::new();
            switched |= take_outputs(&mut engine, &mut to_twilio, &mut to_upstream, &mut no_calls);
        }
        // A successor's (or a renewal's) opening: configuration, replay and an answer.
        let opening = 2 + MAX_TURNS;

        assert!(
            to_twilio.len() <= twilio_step_bound,
            "{} to Twilio",
            to_twilio.len()
        );
        for out in &to_twilio {
            let value: serde_json::Value = serde_json::from_str(&out.text).expect("JSON");
            assert!(matches!(
                value["event"].as_str(),
                Some("media" | "mark" | "clear")
            ));
            assert_eq!(value["streamSid"].as_str(), engine.stream().stream_sid());
        }
        for out in &to_upstream {
            let value: serde_json::Value = serde_json::from_str(&out.text).expect("JSON");
            assert!(value["type"].is_string());
        }
        if !open_before && engine.model_is_open() {
            assert!(
                to_upstream.len() <= opening + HELD_UPLINK_FRAMES + 2 * HELD_DTMF_DIGITS,
                "{} released on open",
                to_upstream.len()
            );
        } else if open_before {
            let bound = if tag == b'T' {
                2
            } else {
                MODEL_STEP_UPSTREAM_BOUND
            } + 2 * calls.len()
                + if switched { opening } else { 0 };
            assert!(
                to_upstream.len() <= bound,
                "{} to the model",
                to_upstream.len()
            );
        } else {
            assert!(to_upstream.is_empty());
        }
        for out in to_twilio {
            engine.recycle_twilio(out.text);
        }
        for out in to_upstream {
            engine.recycle_model(out.text);
        }
        assert!(
            u64::from(engine.playback().queued_ms()) <= max_queued_ms + 2 * u64::from(chunk_ms)
        );
        assert_eq!(
            engine.stats().twilio_errors[TwilioErrorKind::SequenceGap.index()],
            engine.stream().counters().sequence_gaps
        );
    }
});
