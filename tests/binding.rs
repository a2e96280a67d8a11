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
use voxrelay::session::binding::STREAM_TOKEN_PARAMETER;
use voxrelay::twilio::signature::compute_signature;
use voxrelay_sim::caller::{CallerConfig, place_call};
use voxrelay_sim::mock::MockConfig;

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
    assert_prewarm_expired_unclaimed(&stack).await;
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

// ---- Stream tokens bind CallSid, To and an expiry; unbound streams get no tenant ----

mod unbound {
    use std::path::Path;
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Duration;

    use futures_util::SinkExt;
    use serde_json::json;
    use tokio_tungstenite::tungstenite::Message;
    use voxrelay::Secret;
    use voxrelay::config::{BridgeConfig, ControlPlaneTarget, DEFAULT_INSTRUCTIONS, RawConfig};
    use voxrelay::control::api::{CallReport, ReportBinding};
    use voxrelay::control::signing::{SigningKey, Verifier};
    use voxrelay::session::binding::{STREAM_TOKEN_PARAMETER, StreamTokens, TOKEN_LIFETIME};
    use voxrelay_control_plane::seed::SeedSource;
    use voxrelay_control_plane::server::{ControlPlane, ControlPlaneConfig, RunningControlPlane};
    use voxrelay_control_plane::store::DbLocation;
    use voxrelay_sim::caller::{CallerConfig, place_call};

    use super::common::*;
    use super::stack_with;

    const CP_KEY_ID: &str = "binding-test";
    const CP_SECRET: &str = "binding-test-secret";
    const ACME: &str = "+15550100001";
    const LUNA: &str = "+15550100002";

    fn sid(prefix: &str) -> String {
        format!("{prefix}{:032x}", rand::random::<u128>())
    }

    async fn control_plane() -> RunningControlPlane {
        ControlPlane::start(ControlPlaneConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            db: DbLocation::InMemory,
            seed: Some(SeedSource::shipped()),
            verifier: Verifier::from_key_list(&format!("{CP_KEY_ID}:{CP_SECRET}")).unwrap(),
        })
        .await
        .expect("control plane")
    }

    fn target(cp: &RunningControlPlane, spool: &Path) -> ControlPlaneTarget {
        ControlPlaneTarget {
            report_retry: Duration::from_millis(500),
            report_resend: Duration::from_secs(3600),
            ..ControlPlaneTarget::new(
                cp.url(),
                SigningKey::new(CP_KEY_ID, Secret::new(CP_SECRET)),
                spool.to_path_buf(),
            )
        }
    }

    fn acme_calls(cp: &RunningControlPlane) -> Vec<CallReport> {
        cp.store()
            .call_history("acme_dental", 10)
            .unwrap()
            .unwrap()
            .calls
    }

    fn stop_message(stream_sid: &str, call_sid: &str) -> Message {
        Message::text(
            json!({"event": "stop", "sequenceNumber": "3", "streamSid": stream_sid,
                   "stop": {"accountSid": "AC00000000000000000000000000000000", "callSid": call_sid}})
            .to_string(),
        )
    }

    fn parameters_as_object(parameters: &[(String, String)]) -> serde_json::Value {
        serde_json::Value::Object(
            parameters
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect(),
        )
    }

    #[tokio::test]
    async fn an_unbound_stream_naming_a_tenants_number_gets_the_fallback_and_leaves_the_calls_report_alone()
     {
        let cp = control_plane().await;
        let scratch = Scratch::new("binding-unbound");
        let stack = stack_with(|config| {
            config.require_stream_token = false;
            config.control_plane = Some(target(&cp, &scratch.0));
        })
        .await;

        // The real call, through the webhook: its stream is bound and gets Acme's agent.
        let caller = CallerConfig {
            to: ACME.into(),
            from: "+15557770001".into(),
            linger: Duration::from_millis(300),
            ..CallerConfig::new(
                stack.url.clone(),
                stack.token.clone(),
                tone_mulaw(440.0, 400),
            )
        };
        let call_sid = caller.call_sid.clone();
        place_call(&caller).await.expect("call");
        assert!(eventually(Duration::from_secs(5), || acme_calls(&cp).len() == 1).await);
        let real = acme_calls(&cp).remove(0);
        assert_eq!(real.binding, ReportBinding::Bound);
        assert_eq!(real.from, "+15557770001");

        // A stream no webhook made (no token), claiming the same call and Acme's number.
        let intruder = sid("MZ");
        let mut ws = start_raw_stream_as(
            &stack,
            &intruder,
            &call_sid,
            json!({"To": ACME, "From": "+15559990000", "CallSid": call_sid}),
        )
        .await;
        let fallback = |sessions: &[voxrelay_sim::mock::MockSessionRecord]| {
            sessions
                .iter()
                .find(|s| s.session["instructions"] == DEFAULT_INSTRUCTIONS)
                .cloned()
        };
        assert!(
            eventually(Duration::from_secs(5), || fallback(
                &stack.mock.log().sessions()
            )
            .is_some())
            .await,
            "the intruder is answered by the fallback agent"
        );
        let session = fallback(&stack.mock.log().sessions()).unwrap();
        assert!(
            session.session["tools"]
                .as_array()
                .is_none_or(|tools| tools.is_empty()),
            "no tenant's tools: {}",
            session.session["tools"]
        );
        assert!(
            stack
                .mock
                .log()
                .sessions()
                .iter()
                .filter(|s| s.session["instructions"]
                    .as_str()
                    .is_some_and(|i| i.contains("Acme Dental")))
                .count()
                == 1,
            "only the real call ran as Acme"
        );
        assert_eq!(stack.bridge.metrics().streams_unbound.load(Relaxed), 1);
        ws.send(stop_message(&intruder, &call_sid)).await.unwrap();
        assert!(closed_by_bridge(&mut ws, Duration::from_secs(5)).await);

        // Its report is marked unbound and kept apart; the real call's record is untouched.
        let unbound = || cp.store().unbound_reports(&call_sid).unwrap();
        assert!(eventually(Duration::from_secs(5), || unbound().len() == 1).await);
        let report = unbound().remove(0);
        assert_eq!(report.binding, ReportBinding::Unbound);
        assert_eq!(report.tenant_id, None);
        assert_eq!(report.memory_namespace, None);
        assert_eq!(report.stream_sid, intruder);
        assert_eq!(report.context_source, "fallback");
        assert_eq!(acme_calls(&cp), vec![real]);
        let metrics = stack.bridge.metrics();
        assert_eq!(metrics.control_reports_delivered.load(Relaxed), 2);
        assert_eq!(metrics.control_reports_rejected.load(Relaxed), 0);
        stack.bridge.drain_and_stop(Duration::from_secs(2)).await;
        cp.stop().await;
    }

    #[tokio::test]
    async fn by_default_a_stream_without_a_token_is_refused() {
        // `serve`'s configuration as it comes from the environment with nothing said about
        // stream tokens.
        let from_env = BridgeConfig::from_raw(RawConfig {
            twilio_auth_token: Some(TOKEN.into()),
            public_url: Some("https://voice.example.com".into()),
            openai_api_key: Some("sk-test".into()),
            ..RawConfig::default()
        })
        .expect("config");
        assert!(from_env.require_stream_token);
        let stack =
            stack_with(|config| config.require_stream_token = from_env.require_stream_token).await;
        let mut ws = start_raw_stream_as(&stack, &sid("MZ"), &sid("CA"), json!({"To": ACME})).await;
        assert!(closed_by_bridge(&mut ws, Duration::from_secs(5)).await);
        assert_eq!(
            stack.bridge.metrics().streams_refused_token.load(Relaxed),
            1
        );
        assert!(
            stack.mock.log().sessions().is_empty(),
            "nothing reached the model"
        );
    }

    #[tokio::test]
    async fn a_token_for_another_number_or_past_its_expiry_is_refused() {
        let stack = stack_with(|config| config.require_stream_token = true).await;
        let call_sid = sid("CA");
        let (_, parameters) = voice_webhook(&stack, &call_sid, ACME, "+15550009999").await;
        let token = parameters
            .iter()
            .find(|(k, _)| k == STREAM_TOKEN_PARAMETER)
            .map(|(_, v)| v.clone())
            .expect("a token");
        assert!(token.starts_with("v2."), "{token}");

        // The webhook's token, presented with another dialled number.
        let mut moved = parameters_as_object(&parameters);
        moved["To"] = json!(LUNA);
        let mut ws = start_raw_stream_as(&stack, &sid("MZ"), &call_sid, moved).await;
        assert!(closed_by_bridge(&mut ws, Duration::from_secs(5)).await);
        assert_eq!(
            stack.bridge.metrics().streams_refused_token.load(Relaxed),
            1
        );

        // A genuine token (the deployment's key) that expired.
        let other_call = sid("CA");
        let long_ago = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            - TOKEN_LIFETIME.as_secs()
            - 60;
        let expired =
            StreamTokens::from_auth_token(&Secret::new(TOKEN)).issue(long_ago, &other_call, ACME);
        let mut ws = start_raw_stream_as(
            &stack,
            &sid("MZ"),
            &other_call,
            json!({"To": ACME, STREAM_TOKEN_PARAMETER: expired}),
        )
        .await;
        assert!(closed_by_bridge(&mut ws, Duration::from_secs(5)).await);
        assert_eq!(
            stack.bridge.metrics().streams_refused_token.load(Relaxed),
            2
        );
        assert_eq!(stack.bridge.metrics().prewarm_claimed.load(Relaxed), 0);

        // The webhook's own stream, as Twilio opens it, is still welcome.
        let mut ws = start_raw_stream_as(
            &stack,
            &sid("MZ"),
            &call_sid,
            parameters_as_object(&parameters),
        )
        .await;
        assert!(!closed_by_bridge(&mut ws, Duration::from_millis(500)).await);
        assert_eq!(stack.bridge.metrics().prewarm_claimed.load(Relaxed), 1);
        assert_eq!(
            stack.bridge.metrics().streams_refused_token.load(Relaxed),
            2
        );
    }

    #[tokio::test]
    async fn a_second_stream_presenting_the_same_token_is_refused() {
        // Refused whatever the operator allows for streams without a token.
        let stack = stack_with(|config| config.require_stream_token = false).await;
        let call_sid = sid("CA");
        let (_, parameters) = voice_webhook(&stack, &call_sid, ACME, "+15550009999").await;
        let mut first = start_raw_stream_as(
            &stack,
            &sid("MZ"),
            &call_sid,
            parameters_as_object(&parameters),
        )
        .await;
        assert!(
            eventually(Duration::from_secs(5), || stack
                .bridge
                .metrics()
                .prewarm_claimed
                .load(Relaxed)
                == 1)
            .await
        );
        // A replay of the same start (same token), on another socket and stream.
        let mut second = start_raw_stream_as(
            &stack,
            &sid("MZ"),
            &call_sid,
            parameters_as_object(&parameters),
        )
        .await;
        assert!(closed_by_bridge(&mut second, Duration::from_secs(5)).await);
        let metrics = stack.bridge.metrics();
        assert_eq!(metrics.streams_refused_token.load(Relaxed), 1);
        assert_eq!(metrics.streams_unbound.load(Relaxed), 0);
        assert_eq!(
            stack.mock.log().sessions().len(),
            1,
            "no second model session"
        );
        // The first stream is unaffected.
        assert!(!closed_by_bridge(&mut first, Duration::from_millis(300)).await);
    }
}

/// The call's one task keeps reading while its `start` waits for the webhook's pre-warm: a
/// ping sent while the model's handshake is still held (the mock answers it 1.5 s late) is
/// answered before any model session exists. (Before the call task was one `select!`, the
/// claim was awaited in the loop and neither socket was read for up to 3 s.)
#[tokio::test]
async fn a_stream_keeps_reading_while_its_prewarm_is_still_connecting() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let mock = MockConfig {
        connect_delay: Duration::from_millis(1_500),
        ..MockConfig::default()
    };
    let stack = start_stack_adjusted(mock, AudioMode::Pcmu, Some("Hello"), |_| {}).await;
    let call = call_sid(91);
    let (_url, parameters) = voice_webhook(&stack, &call, "+15550001111", "+15550002222").await;
    let stream = stream_sid(91);
    let mut ws = start_raw_stream_as(&stack, &stream, &call, as_object(&parameters)).await;
    ws.send(Message::Ping(b"still there?".to_vec().into()))
        .await
        .unwrap();
    let pong = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Pong(payload)))) => break payload,
            Ok(Some(Ok(_))) => continue,
            other => panic!("no pong: {other:?}"),
        }
    };
    assert_eq!(&pong[..], b"still there?");
    assert!(
        stack.mock.log().sessions().is_empty(),
        "answered while the pre-warm was still connecting"
    );
    // The claim then completes: the pre-warmed session greets the caller.
    let greeted = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) if text.contains("\"media\"") => break true,
            Ok(Some(Ok(_))) => continue,
            _ => break false,
        }
    };
    assert!(greeted, "the greeting played from the claimed session");
    assert_eq!(stack.bridge.metrics().prewarm_claimed.load(Relaxed), 1);
}
