//! End-to-end calls through real sockets on 127.0.0.1: the scripted Twilio caller, the bridge
//! and the mock realtime model.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use voxrelay::AudioMode;
use voxrelay_sim::caller::{CallerConfig, place_call};
use voxrelay_sim::mock::MockConfig;

/// Quiet, then a tone over the greeting (a barge-in), then quiet while the echo plays.
fn barge_in_script(hz: f64) -> Vec<u8> {
    let mut audio = silence_mulaw(300);
    audio.extend(tone_mulaw(hz, 800));
    audio
}

async fn one_call_both_ways(mode: AudioMode) {
    let stack = start_stack(mode, Some("Welcome to the test line.")).await;
    let mut caller = CallerConfig::new(
        stack.url.clone(),
        stack.token.clone(),
        barge_in_script(700.0),
    );
    caller.linger = Duration::from_millis(2_500);
    let report = tokio::time::timeout(Duration::from_secs(20), place_call(&caller))
        .await
        .expect("call finished in time")
        .expect("call succeeded");

    // The TwiML carried the call's identity as <Parameter>s.
    assert!(
        report.stream_url.ends_with("/twilio/media"),
        "{}",
        report.stream_url
    );
    for name in ["To", "From", "CallSid"] {
        assert!(
            report.parameters.iter().any(|(k, _)| k == name),
            "missing {name}"
        );
    }
    // Greeting first, then the caller talked over it: exactly one clear.
    assert!(
        report.first_audio_after_start.is_some(),
        "no assistant audio"
    );
    assert_eq!(report.clears_received, 1, "one barge-in");
    assert_eq!(report.unexpected_messages, 0);
    assert!(!report.closed_by_bridge);

    let sessions = stack.mock.log().sessions();
    assert_eq!(sessions.len(), 1);
    let session = &sessions[0];
    let format = if mode == AudioMode::Pcmu {
        "audio/pcmu"
    } else {
        "audio/pcm"
    };
    assert_eq!(session.session["audio"]["input"]["format"]["type"], format);
    assert_eq!(session.session["audio"]["output"]["format"]["type"], format);
    // The model got the caller's tone...
    let rate = session.input_rate as f64;
    assert_eq!(
        dominant(&session.input_audio_8k, rate, &[300.0, 700.0, 1500.0]),
        700.0
    );
    // ...was told where the caller cut the greeting off, within what was sent, and never
    // answered with an error.
    assert_eq!(
        session.truncates.len(),
        1,
        "truncates: {:?}",
        session.truncates
    );
    assert!(session.truncates[0].1 > 0);
    assert!(
        session.errors_sent.is_empty(),
        "mock errors: {:?}",
        session.errors_sent
    );
    // The echo of the caller's tone came back after the clear.
    let echoed = decode_mulaw(&report.audio_received);
    let tail = &echoed[echoed.len().saturating_sub(8 * 600)..];
    assert_eq!(dominant(tail, 8000.0, &[300.0, 700.0, 1500.0]), 700.0);
    assert!(
        report.audio_received.len() >= 8 * 700,
        "echo too short: {} bytes",
        report.audio_received.len()
    );
    // Twilio echoed marks; the bridge counted what it sent.
    assert!(report.marks_echoed > 10);
    let metrics = stack.bridge.metrics();
    assert!(metrics.frames_in.load(Relaxed) >= report.frames_sent - 1);
    assert_eq!(metrics.frames_out.load(Relaxed), report.media_received);
    assert_eq!(metrics.barge_ins.load(Relaxed), 1);
    assert!(metrics.uplink_added.count() > 0 && metrics.downlink_added.count() > 0);

    assert!(
        eventually(Duration::from_secs(5), || stack
            .bridge
            .registry()
            .is_empty())
        .await
    );
    assert_eq!(metrics.calls_active.load(Relaxed), 0);
    stack.bridge.drain_and_stop(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pcmu_call_streams_both_ways_with_greeting_barge_in_and_echo() {
    one_call_both_ways(AudioMode::Pcmu).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pcm16_call_streams_both_ways_with_greeting_barge_in_and_echo() {
    one_call_both_ways(AudioMode::Pcm16).await;
}

/// 50 concurrent calls, each caller on its own tone: every model session hears exactly one
/// caller's tone, and every caller hears back only its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_calls_stay_isolated() {
    const CALLS: usize = 50;
    // All 50 arrive at once: every one pre-warmed, as this test is about isolation, not about
    // the pre-warm cap (calls beyond it start cold; see tests/webhook.rs).
    let stack = start_stack_adjusted(MockConfig::default(), AudioMode::Pcmu, None, |config| {
        config.max_prewarms = CALLS
    })
    .await;
    let tones: Vec<f64> = (0..CALLS).map(|i| 320.0 + 60.0 * i as f64).collect();
    calls_on_their_own_tones(&stack, &tones).await;
    assert!(
        eventually(Duration::from_secs(5), || stack
            .bridge
            .registry()
            .is_empty())
        .await
    );
    stack.bridge.drain_and_stop(Duration::from_secs(1)).await;
}

/// 200 calls ending every way a call can end leave no registry entry, task, gauge or model
/// session behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_calls_leave_nothing_behind() {
    const CALLS: usize = 200;
    let stack = std::sync::Arc::new(start_stack(AudioMode::Pcmu, Some("hi")).await);
    let payload = base64_silence();
    let mut batch = Vec::new();
    for index in 0..CALLS {
        let stack = std::sync::Arc::clone(&stack);
        let payload = payload.clone();
        batch.push(tokio::spawn(async move {
            let stream_sid = stream_sid(0x1ea4_0000 + index as u64);
            let mut ws = start_raw_stream(&stack, &stream_sid).await;
            for sequence in 2..8 {
                ws.send(media_message(&stream_sid, sequence, &payload)).await.unwrap();
            }
            // The greeting's first audio proves the model session exists, so its teardown
            // is exercised too.
            let greeted = tokio::time::timeout(Duration::from_secs(10), async {
                while let Some(Ok(message)) = ws.next().await {
                    if message.to_text().is_ok_and(|t| t.contains("\"media\"")) {
                        return true;
                    }
                }
                false
            })
            .await;
            assert_eq!(greeted, Ok(true), "call {index} never heard the greeting");
            match index % 3 {
                0 => {
                    let stop = serde_json::json!({"event":"stop","sequenceNumber":"8","streamSid":stream_sid,"stop":{"accountSid":ACCOUNT_SID,"callSid":call_sid_of(&stream_sid)}});
                    ws.send(Message::text(stop.to_string())).await.unwrap();
                    while let Some(Ok(message)) = ws.next().await {
                        if matches!(message, Message::Close(_)) {
                            break;
                        }
                    }
                }
                1 => {
                    let _ = ws.close(None).await;
                }
                _ => drop(ws), // the TCP connection just goes away
            }
        }));
        if batch.len() == 50 {
            for call in batch.drain(..) {
                tokio::time::timeout(Duration::from_secs(20), call)
                    .await
                    .unwrap()
                    .unwrap();
            }
        }
    }
    for call in batch.drain(..) {
        tokio::time::timeout(Duration::from_secs(20), call)
            .await
            .unwrap()
            .unwrap();
    }
    let metrics = stack.bridge.metrics();
    assert!(
        eventually(Duration::from_secs(10), || stack
            .bridge
            .registry()
            .is_empty()
            && stack.bridge.live_call_tasks() == 0
            && stack.mock.log().active_sessions() == 0)
        .await,
        "left behind: {} registered, {} tasks, {} model sessions",
        stack.bridge.registry().len(),
        stack.bridge.live_call_tasks(),
        stack.mock.log().active_sessions()
    );
    assert_eq!(metrics.calls_started.load(Relaxed), CALLS as u64);
    assert_eq!(metrics.calls_ended.load(Relaxed), CALLS as u64);
    assert_eq!(metrics.calls_active.load(Relaxed), 0);
    assert_eq!(stack.mock.log().sessions().len(), CALLS);
}

fn base64_silence() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode([0xFFu8; 160])
}
