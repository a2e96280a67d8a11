//! A call never dies with its model session, through real sockets on 127.0.0.1: the mock model
//! is scripted to refuse, reset and stall, and the simulated caller goes through the voice
//! webhook as Twilio does, so what the caller gets after the stream (the TwiML after
//! `</Connect>`) is checked too.

mod common;

use std::time::{Duration, Instant};

use common::*;
use voxrelay::AudioMode;
use voxrelay::codec::g711;
use voxrelay::config::{BUILTIN_HOLD_PROMPT, DEFAULT_MODEL_RECONNECT};
use voxrelay::http::FALLBACK_APOLOGY;
use voxrelay::session::continuity::{ConnectFailure, FallbackReason, SessionEnd};
use voxrelay_sim::caller::{CallReport, CallerConfig, place_call};
use voxrelay_sim::mock::{MockConfig, MockFault, MockFaultKind};

fn caller(stack: &Stack, linger_ms: u64) -> CallerConfig {
    CallerConfig {
        linger: Duration::from_millis(linger_ms),
        ..CallerConfig::new(stack.url.clone(), stack.token.clone(), silence_mulaw(200))
    }
}

/// Whether the caller was sent a non-silent 20 ms chunk of the built-in hold prompt (chunks
/// are cut from the start of the prompt, as playback sends them).
fn heard_hold_prompt(report: &CallReport) -> bool {
    let chunk = &BUILTIN_HOLD_PROMPT[800..960];
    report
        .audio_received
        .windows(chunk.len())
        .any(|window| window == chunk)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_prewarm_sends_the_caller_to_the_fallback_and_the_next_call_is_answered() {
    let mock = MockConfig {
        fault: Some(MockFault::refuse_first(1, 429)),
        ..MockConfig::default()
    };
    let stack = start_stack_adjusted(mock, AudioMode::Pcmu, Some("Hello"), |_| {}).await;
    let began = Instant::now();
    let refused = place_call(&caller(&stack, 3_000)).await.expect("a call");
    assert!(refused.closed_by_bridge, "the bridge ended the stream");
    assert_eq!(
        refused.fallback_heard(),
        Some(format!("say:{FALLBACK_APOLOGY}").as_str()),
        "Twilio goes on to the apology after <Connect>"
    );
    assert!(
        began.elapsed() < DEFAULT_MODEL_RECONNECT,
        "straight to the fallback: {:?}",
        began.elapsed()
    );
    assert_eq!(refused.media_received, 0);
    let metrics = stack.bridge.metrics();
    assert_eq!(
        metrics.call_fallbacks(FallbackReason::ConnectFailed(ConnectFailure::RateLimited)),
        1
    );
    // The next call is unaffected.
    let answered = place_call(&caller(&stack, 1_500)).await.expect("a call");
    assert!(answered.first_audio_after_start.is_some(), "greeted");
    assert_eq!(answered.fallback_heard(), None);
}

/// A call whose first session resets 300 ms into its greeting, the model taking `connect_delay`
/// to accept each socket.
async fn call_through_a_reset(connect_delay: Duration) -> (Stack, CallReport) {
    let mock = MockConfig {
        connect_delay,
        fault: Some(MockFault {
            session: 1,
            kind: MockFaultKind::ResetAfterDeltas(3),
        }),
        ..MockConfig::default()
    };
    let stack = start_stack_adjusted(mock, AudioMode::Pcmu, Some("Hello"), |_| {}).await;
    let report = place_call(&caller(&stack, 4_000)).await.expect("a call");
    (stack, report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reconnect_plays_the_hold_prompt_and_the_call_goes_on() {
    let (stack, report) = call_through_a_reset(Duration::from_millis(1_500)).await;
    let metrics = stack.bridge.metrics();
    assert_eq!(metrics.model_reconnects(SessionEnd::Dropped), 1);
    assert!(
        heard_hold_prompt(&report),
        "a 1.5 s gap passes the 700 ms threshold"
    );
    assert!(
        !report.closed_by_bridge,
        "the caller hung up, not the bridge"
    );
    assert_eq!(stack.mock.log().sessions().len(), 2);
    // The successor answered (it was asked to go on with the cut greeting), after the prompt.
    let successor: Vec<u8> = stack.mock.log().sessions()[1]
        .output_audio
        .iter()
        .map(|&sample| g711::mulaw_encode(sample))
        .collect();
    assert!(successor.len() >= 8 * 1_000, "the successor spoke");
    let answer_chunk = &successor[4 * 160..5 * 160];
    // The greeting is the same chime: the successor's is the last occurrence.
    let answer_at = report
        .audio_received
        .windows(160)
        .rposition(|window| window == answer_chunk)
        .expect("the caller heard the successor");
    let prompt_at = report
        .audio_received
        .windows(160)
        .position(|window| window == &BUILTIN_HOLD_PROMPT[800..960])
        .expect("the prompt");
    assert!(prompt_at < answer_at, "the prompt came first");
    assert_eq!(metrics.model_reconnect_gap.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_reconnect_plays_no_hold_prompt() {
    let (stack, report) = call_through_a_reset(Duration::ZERO).await;
    assert_eq!(
        stack.bridge.metrics().model_reconnects(SessionEnd::Dropped),
        1
    );
    assert!(!heard_hold_prompt(&report), "the gap stayed under 700 ms");
    assert!(!report.closed_by_bridge);
    // The successor was asked to go on and answered in full (the mock's 1.5 s chime); what
    // the caller got of the cut greeting before the reset depends on when the reset is read,
    // so it is not counted.
    let successor: Vec<u8> = stack.mock.log().sessions()[1]
        .output_audio
        .iter()
        .map(|&sample| g711::mulaw_encode(sample))
        .collect();
    assert!(successor.len() >= 8 * 1_000, "the successor spoke");
    assert!(
        report
            .audio_received
            .windows(160)
            .any(|window| window == &successor[4 * 160..5 * 160]),
        "the caller heard the successor"
    );
    assert!(
        report.audio_received.len() >= 8 * 1_500,
        "the successor's answer was heard whole: {} ms",
        report.audio_received.len() / 8
    );
}

// A session renewed at its age limit, at a silent moment, with nothing lost: one test per
// provider in `tests/conformance.rs` (`an_old_session_is_renewed_at_a_silent_moment`).
