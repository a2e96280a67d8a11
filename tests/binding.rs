//! Pre-warm, stream binding and Fly replay through real sockets on 127.0.0.1: the webhook's
//! head start is claimed only by its own call's stream, a stream with another call's token is
//! refused, webhook-less streams follow `VOXRELAY_REQUIRE_STREAM_TOKEN`, and an upgrade that
//! lands on the wrong Fly machine is answered with `fly-replay`.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use voxrelay::AudioMode;
use voxrelay::bench::caller::{CallerConfig, place_call};
use voxrelay::session::binding::STREAM_TOKEN_PARAMETER;
use voxrelay::twilio::signature::compute_signature;
use voxrelay::upstream::mock::MockConfig;

async fn stack_with(adjust: impl FnOnce(&mut voxrelay::config::BridgeConfig)) -> Stack {
    start_stack_adjusted(
        MockConfig::default(),
        AudioMode::Pcmu,
        Some("Hello from the test"),
        adjust,
    )
    .await
}

fn as_object(parameters: &[(String, String)]) -> serde_json::Value {
    serde_json::Value::Object(
        parameters
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect(),
    )
}

#[tokio::test]
async fn a_webhook_call_claims_its_prewarmed_session_and_greets_from_it() {
    let stack = stack_with(|_| {}).await;
    let mut caller = CallerConfig::new(
        stack.url.clone(),
        stack.token.clone(),
        tone_mulaw(440.0, 400),
    );
    caller.linger = Duration::from_millis(1500);
    let report = place_call(&caller).await.expect("call");
    assert!(
        report
            .parameters
            .iter()
            .any(|(k, _)| k == STREAM_TOKEN_PARAMETER),
        "the TwiML binds the stream: {:?}",
        report.parameters
    );
    assert!(
        report.first_audio_after_start.is_some(),
        "the greeting played"
    );
    let metrics = stack.bridge.metrics();
    assert_eq!(metrics.prewarm_started.load(Relaxed), 1);
    assert_eq!(metrics.prewarm_claimed.load(Relaxed), 1);
    assert_eq!(metrics.streams_refused_token.load(Relaxed), 0);
    let sessions = stack.mock.log().sessions();
    assert_eq!(sessions.len(), 1, "the stream used the pre-warmed session");
    let events = &sessions[0].client_event_types;
    let update = events.iter().position(|e| e == "session.update").unwrap();
    let greeting = events.iter().position(|e| e == "response.create").unwrap();
    let first_audio = events
        .iter()
        .position(|e| e == "input_audio_buffer.append")
        .unwrap();
    assert!(update < greeting && greeting < first_audio, "{events:?}");
}

#[tokio::test]
async fn a_stream_carrying_another_calls_token_is_refused() {
    let stack =
        stack_with(|config| config.prewarm_unclaimed_after = Duration::from_millis(300)).await;
    let victim = call_sid(0x71c);
    let (_, parameters) = voice_webhook(&stack, &victim, "+15550100001", "+15550009999").await;
    // Same parameters (the victim's token), but the stream belongs to another call.
    let mut ws = start_raw_stream_as(
        &stack,
        &stream_sid(0x7e1f),
        &call_sid(0x7e1f),
        as_object(&parameters),
    )
    .await;
    assert!(closed_by_bridge(&mut ws, Duration::from_secs(5)).await);
    let metrics = stack.bridge.metrics();
    assert_eq!(metrics.streams_refused_token.load(Relaxed), 1);
    assert_eq!(metrics.prewarm_claimed.load(Relaxed), 0);
    // The victim's session was never handed over: it expires unclaimed and is closed.
    assert!(
        eventually(Duration::from_secs(5), || metrics
            .prewarm_unclaimed
            .load(Relaxed)
            == 1)
        .await
    );
    assert!(
        eventually(Duration::from_secs(5), || stack
            .mock
            .log()
            .active_sessions()
            == 0)
        .await
    );
}

#[tokio::test]
async fn streams_without_a_token_work_unless_the_operator_requires_one() {
    let open = stack_with(|_| {}).await;
    let (bin_stream, bin_call) = (stream_sid(0xb1a), call_sid(0xb1a));
    let mut ws =
        start_raw_stream_as(&open, &bin_stream, &bin_call, json!({"To": "+15550100001"})).await;
    assert!(
        eventually(Duration::from_secs(5), || open.mock.log().sessions().len()
            == 1)
        .await,
        "a TwiML Bin stream reaches the model"
    );
    assert!(!closed_by_bridge(&mut ws, Duration::from_millis(300)).await);

    let strict = stack_with(|config| config.require_stream_token = true).await;
    let mut ws = start_raw_stream_as(
        &strict,
        &bin_stream,
        &bin_call,
        json!({"To": "+15550100001"}),
    )
    .await;
    assert!(closed_by_bridge(&mut ws, Duration::from_secs(5)).await);
    assert_eq!(
        strict.bridge.metrics().streams_refused_token.load(Relaxed),
        1
    );
    // A webhook-made stream is still welcome.
    let caller = CallerConfig {
        linger: Duration::from_millis(200),
        ..CallerConfig::new(
            strict.url.clone(),
            strict.token.clone(),
            tone_mulaw(440.0, 200),
        )
    };
    place_call(&caller).await.expect("bound call");
    assert_eq!(
        strict.bridge.metrics().streams_refused_token.load(Relaxed),
        1
    );
    assert_eq!(strict.bridge.metrics().prewarm_claimed.load(Relaxed), 1);
}

#[tokio::test]
async fn an_upgrade_on_the_wrong_fly_machine_is_replayed_once() {
    let stack = stack_with(|config| config.fly_machine_id = Some("148e21d1c34289".into())).await;
    let (stream_url, _) =
        voice_webhook(&stack, &call_sid(0xf1e), "+15550100001", "+15550009999").await;
    assert!(
        stream_url.ends_with("/twilio/media/m/148e21d1c34289"),
        "the stream URL names this machine: {stream_url}"
    );

    let upgrade = |path: &str, replayed: bool| {
        let url = format!("ws://{}{path}", stack.bridge.local_addr());
        let mut request = url.as_str().into_client_request().unwrap();
        let signature = compute_signature(TOKEN, &url, &[]);
        request
            .headers_mut()
            .insert("x-twilio-signature", signature.parse().unwrap());
        if replayed {
            request.headers_mut().insert(
                "fly-replay-src",
                "instance=3d8d9e1ad73189;region=ams".parse().unwrap(),
            );
        }
        tokio_tungstenite::connect_async(request)
    };
    match upgrade("/twilio/media/m/3d8d9e1ad73189", false).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 409);
            assert_eq!(
                response.headers().get("fly-replay").unwrap(),
                "prefer_instance=3d8d9e1ad73189"
            );
        }
        other => panic!("expected a replay, got {:?}", other.map(|_| ())),
    }
    assert_eq!(stack.bridge.metrics().fly_replays.load(Relaxed), 1);
    // Already replayed (the other machine is gone): served here, cold.
    upgrade("/twilio/media/m/3d8d9e1ad73189", true)
        .await
        .expect("a replayed upgrade is never replayed again");
    // Its own machine id: served.
    upgrade("/twilio/media/m/148e21d1c34289", false)
        .await
        .expect("served on the machine it names");
    assert_eq!(stack.bridge.metrics().fly_replays.load(Relaxed), 1);
}
