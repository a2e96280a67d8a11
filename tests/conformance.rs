//! The provider conformance suite: the same end-to-end calls, through real sockets on
//! 127.0.0.1 (the scripted Twilio caller, the bridge, and the mock model speaking each
//! provider's own protocol on its own path), run once per provider. Each test is written once,
//! over [`Provider`]; `conformance!` instantiates it as `openai::name` and `gemini::name`.
//! Where the providers differ by design (OpenAI truncates a cut response, Gemini has no
//! truncate; a Gemini successor resumes on its own handle instead of being told the
//! conversation), the test says what each must do.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use voxrelay::Provider;
use voxrelay_control_plane::seed::{Seed, SeedFiles};
use voxrelay_control_plane::server::{RunningControlPlane, seed_toml};
use voxrelay_sim::caller::{CallerConfig, place_call};
use voxrelay_sim::mock::{MockConfig, MockFault, MockFaultKind, MockToolCall};

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod openai {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(voxrelay::Provider::OpenAi).await;
                }
            )*
        }
        mod gemini {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(voxrelay::Provider::Gemini).await;
                }
            )*
        }
    };
}

conformance!(
    greeting_two_way_audio_and_barge_in_on_buffered_audio,
    barge_in_while_the_model_is_still_speaking,
    a_digit_reaches_the_model_and_is_answered,
    a_tool_call_round_trips_through_the_control_plane,
    a_dropped_session_is_replaced_and_the_call_goes_on,
    an_old_session_is_renewed_at_a_silent_moment,
    concurrent_calls_stay_isolated,
    a_turn_is_timed_from_the_callers_speech_end_to_its_reply_heard,
);

/// The mock's sample rate for caller audio as each provider takes it.
fn input_rate(provider: Provider) -> u32 {
    match provider {
        Provider::OpenAi => 8_000,
        Provider::Gemini => 16_000,
    }
}

/// Quiet, then a tone over the greeting (a barge-in), then quiet while the echo plays.
fn barge_in_script(hz: f64) -> Vec<u8> {
    let mut audio = silence_mulaw(300);
    audio.extend(tone_mulaw(hz, 800));
    audio
}

/// The greeting plays, the caller talks over it, the model hears the caller and answers, and
/// the caller hears the answer. The mock sends the greeting faster than real time, so the
/// model has finished it when the caller speaks: only the bridge knows it is still playing.
async fn greeting_two_way_audio_and_barge_in_on_buffered_audio(provider: Provider) {
    let stack = start_stack_for(
        provider,
        MockConfig::default(),
        Some("Welcome to the test line."),
        |_| {},
    )
    .await;
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
    assert!(report.first_audio_after_start.is_some(), "no greeting");
    assert_eq!(report.clears_received, 1, "one barge-in");
    assert_eq!(report.unexpected_messages, 0);
    assert!(!report.closed_by_bridge);

    let sessions = stack.mock.log().sessions();
    assert_eq!(sessions.len(), 1);
    let session = &sessions[0];
    assert_eq!(session.provider, provider.as_str(), "the provider answered");
    assert_eq!(session.input_rate, input_rate(provider));
    assert_eq!(
        dominant(
            &session.input_audio_8k,
            session.input_rate as f64,
            &[300.0, 700.0, 1500.0]
        ),
        700.0,
        "the model heard the caller's tone"
    );
    match provider {
        // Told where the caller cut the greeting off.
        Provider::OpenAi => assert_eq!(session.truncates.len(), 1),
        // No truncate exists, and the server had nothing left to interrupt.
        Provider::Gemini => {
            assert!(session.truncates.is_empty());
            assert_eq!(session.interruptions, 0);
        }
    }
    assert!(session.errors_sent.is_empty(), "{:?}", session.errors_sent);
    // The echo of the caller's tone came back after the clear.
    let heard = decode_mulaw(&report.audio_received);
    let tail = &heard[heard.len().saturating_sub(8 * 600)..];
    assert_eq!(dominant(tail, 8000.0, &[300.0, 700.0, 1500.0]), 700.0);
    let metrics = stack.bridge.metrics();
    assert_eq!(metrics.barge_ins.load(Relaxed), 1);
    assert_eq!(metrics.frames_out.load(Relaxed), report.media_received);
    let reaction = metrics
        .barge_in_reaction
        .quantile_upper_bound(1.0)
        .expect("the barge-in was timed");
    assert!(
        reaction <= Duration::from_millis(1),
        "speech to Twilio clear took up to {reaction:?}"
    );
    // The provider's own families count the call once it has ended.
    assert!(
        eventually(Duration::from_secs(5), || metrics
            .provider(provider)
            .calls
            .load(Relaxed)
            == 1)
        .await
    );
    let own = metrics.provider(provider);
    assert_eq!(own.barge_in.count(), 1);
    assert_eq!(own.barge_ins.load(Relaxed), 1);
    assert_eq!(own.frames_out.load(Relaxed), report.media_received);
    assert!(own.uplink.count() > 0 && own.downlink.count() > 0);
    let text = metrics.render();
    for family in ["calls", "barge_ins"] {
        let line = format!("voxrelay_provider_{family}_total{{provider=\"{provider}\"}} 1");
        assert!(text.contains(&line), "{line} missing");
    }
    stack.bridge.drain_and_stop(Duration::from_secs(1)).await;
}

/// The caller talks while the model is still producing its greeting (the mock paces it in
/// real time): OpenAI's server VAD and Gemini's `interrupted` both reach Twilio as one clear,
/// and what the model sent after that is never played.
async fn barge_in_while_the_model_is_still_speaking(provider: Provider) {
    let mock = MockConfig {
        pace_deltas: true,
        ..MockConfig::default()
    };
    let stack = start_stack_for(provider, mock, Some("Welcome to the test line."), |_| {}).await;
    let mut caller = CallerConfig::new(
        stack.url.clone(),
        stack.token.clone(),
        barge_in_script(700.0),
    );
    caller.linger = Duration::from_millis(2_500);
    let report = place_call(&caller).await.expect("call succeeded");
    assert_eq!(report.clears_received, 1, "one barge-in");
    assert!(!report.closed_by_bridge);
    let session = &stack.mock.log().sessions()[0];
    match provider {
        Provider::OpenAi => assert_eq!(session.truncates.len(), 1),
        Provider::Gemini => assert_eq!(session.interruptions, 1, "the server interrupted"),
    }
    let heard = decode_mulaw(&report.audio_received);
    let tail = &heard[heard.len().saturating_sub(8 * 600)..];
    assert_eq!(dominant(tail, 8000.0, &[300.0, 700.0, 1500.0]), 700.0);
    assert_eq!(stack.bridge.metrics().barge_ins.load(Relaxed), 1);
    stack.bridge.drain_and_stop(Duration::from_secs(1)).await;
}

/// A key pressed mid-call reaches the model as a fixed sentence naming the key, and the model
/// answers it.
async fn a_digit_reaches_the_model_and_is_answered(provider: Provider) {
    let stack = start_stack_for(provider, MockConfig::default(), None, |_| {}).await;
    let mut caller = CallerConfig::new(stack.url.clone(), stack.token.clone(), silence_mulaw(600));
    caller.dtmf = vec![(Duration::from_millis(300), '5')];
    caller.linger = Duration::from_millis(2_500);
    let report = place_call(&caller).await.expect("call succeeded");
    assert!(!report.closed_by_bridge);
    let session = &stack.mock.log().sessions()[0];
    assert!(
        session
            .user_texts
            .iter()
            .any(|text| text.contains("pressed the key \"5\"")),
        "{:?}",
        session.user_texts
    );
    assert_eq!(
        session.response_transcripts.len(),
        1,
        "the model answered the digit once: {:?}",
        session.response_transcripts
    );
    assert!(
        report.audio_received.len() >= 8 * 1_000,
        "the answer was heard"
    );
    stack.bridge.drain_and_stop(Duration::from_secs(1)).await;
}

// ---- a tenant's calls, with the reference control plane ----

/// A bridge (OpenAI by default, both providers served by the mock) that looks tenants up on
/// `cp`.
async fn stack_on(cp: &RunningControlPlane, dir: &Scratch, mock: MockConfig) -> Stack {
    let target = control_target(cp.url(), &dir.0.join("spool"));
    start_stack_for(Provider::OpenAi, mock, None, |config| {
        config.control_plane = Some(target);
    })
    .await
}

/// The shipped tenant that runs on `provider`: Acme Dental (the bridge's default, OpenAI) or
/// Harbor Florist (`provider = "gemini"` in its context). Both offer `take_message`.
fn tenant_on(provider: Provider) -> (&'static str, &'static str) {
    match provider {
        Provider::OpenAi => ("acme_dental", "+15550100001"),
        Provider::Gemini => ("harbor_florist", "+15550100004"),
    }
}

/// A spoken phrase the mock's VAD hears as one utterance, then silence that ends it.
fn utterance() -> Vec<u8> {
    let mut audio = tone_mulaw(440.0, 600);
    audio.extend(silence_mulaw(700));
    audio
}

/// model → bridge → `POST /v1/tools/take_message` → model, and the model speaks the answer;
/// the tenant's own context chose the provider (the bridge's default is OpenAI either way).
async fn a_tool_call_round_trips_through_the_control_plane(provider: Provider) {
    let dir = Scratch::new("conformance-tool");
    let cp = start_control_plane(&dir.0.join("cp.db")).await;
    let mock = MockConfig {
        reply_delay: Duration::from_millis(20),
        tool_script: vec![MockToolCall {
            name: "take_message".into(),
            arguments: json!({
                "caller_name": "Grace Hopper",
                "callback_number": "+15557770003",
                "message": "Please call me back."
            }),
        }],
        ..MockConfig::default()
    };
    let stack = stack_on(&cp, &dir, mock).await;
    let (tenant, number) = tenant_on(provider);
    let caller = CallerConfig {
        to: number.to_owned(),
        from: "+15557770003".to_owned(),
        linger: Duration::from_millis(1_500),
        ..CallerConfig::new(stack.url.clone(), stack.token.clone(), utterance())
    };
    let report = place_call(&caller).await.expect("call");
    assert!(!report.closed_by_bridge);
    let session = &stack.mock.log().sessions()[0];
    assert_eq!(session.provider, provider.as_str(), "the tenant's provider");
    assert_eq!(session.function_calls.len(), 1, "the mock called the tool");
    let (_, output) = session
        .function_outputs
        .first()
        .expect("the bridge answered the call");
    let output: Value = serde_json::from_str(output).expect("JSON output");
    assert_eq!(output["saved"], true, "{output}");
    assert!(
        session
            .response_transcripts
            .iter()
            .any(|t| t.starts_with("(tool said:")),
        "the model spoke after the answer: {:?}",
        session.response_transcripts
    );
    let messages = cp.store().messages(tenant).unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].caller_name, "Grace Hopper");
    assert_eq!(
        stack.bridge.metrics().control_tool_failures.load(Relaxed),
        0
    );
    cp.stop().await;
}

/// The model's socket resets mid-greeting: a successor is dialled at once, the greeting goes
/// on where the caller was, and the call never notices beyond a short gap. A Gemini successor
/// resumes on the session's own handle; an OpenAI one is told the conversation.
async fn a_dropped_session_is_replaced_and_the_call_goes_on(provider: Provider) {
    let mock = MockConfig {
        fault: Some(MockFault {
            session: 1,
            kind: MockFaultKind::ResetAfterDeltas(3),
        }),
        ..MockConfig::default()
    };
    let stack = start_stack_for(provider, mock, Some("Hello"), |_| {}).await;
    let caller = CallerConfig {
        linger: Duration::from_millis(4_000),
        ..CallerConfig::new(stack.url.clone(), stack.token.clone(), silence_mulaw(200))
    };
    let report = place_call(&caller).await.expect("a call");
    assert!(
        !report.closed_by_bridge,
        "the caller hung up, not the bridge"
    );
    let metrics = stack.bridge.metrics();
    assert_eq!(
        metrics.model_reconnects(voxrelay::session::continuity::SessionEnd::Dropped),
        1
    );
    let sessions = stack.mock.log().sessions();
    assert_eq!(sessions.len(), 2);
    assert!(!sessions[1].output_audio.is_empty(), "the successor spoke");
    assert!(
        report.audio_received.len() >= 8 * 1_500,
        "the successor's answer was heard: {} ms",
        report.audio_received.len() / 8
    );
    match provider {
        Provider::OpenAi => assert_eq!(sessions[1].resumed_from, None),
        Provider::Gemini => {
            assert!(
                sessions[1].resumed_from.is_some(),
                "resumed on the handle the lost session issued"
            );
            assert!(
                sessions[1].items_created.is_empty(),
                "a resumed session is not told the conversation again: {:?}",
                sessions[1].items_created
            );
        }
    }
    stack.bridge.drain_and_stop(Duration::from_secs(1)).await;
}

/// A session past its age limit gets a standby socket and is switched at a silent moment;
/// no caller audio is lost and the successor answers the next question.
async fn an_old_session_is_renewed_at_a_silent_moment(provider: Provider) {
    let stack = start_stack_for(provider, MockConfig::default(), Some("Hello"), |config| {
        config.continuity.session_max = Duration::from_secs(5)
    })
    .await;
    let mut audio = silence_mulaw(2_000);
    audio.extend(tone_mulaw(440.0, 600));
    audio.extend(silence_mulaw(3_900));
    audio.extend(tone_mulaw(660.0, 600));
    audio.extend(silence_mulaw(1_500));
    let config = CallerConfig {
        linger: Duration::from_millis(300),
        ..CallerConfig::new(stack.url.clone(), stack.token.clone(), audio)
    };
    let report = place_call(&config).await.expect("a call");
    assert!(!report.closed_by_bridge);
    let metrics = stack.bridge.metrics();
    assert_eq!(
        metrics.model_renewals(false),
        1,
        "renewed at a silent moment"
    );
    assert_eq!(metrics.model_renewals(true), 0);
    assert_eq!(metrics.barge_ins.load(Relaxed), 0);
    let sessions = stack.mock.log().sessions();
    assert_eq!(sessions.len(), 2, "the first session and its standby");
    assert!(sessions[0].truncates.is_empty());
    assert_eq!(
        sessions[0].response_transcripts.len(),
        2,
        "greeting and first answer"
    );
    assert_eq!(
        sessions[1].response_transcripts.len(),
        1,
        "the successor answered"
    );
    match provider {
        Provider::OpenAi => {
            let replayed: Vec<&str> = sessions[1]
                .items_created
                .iter()
                .filter_map(|item| item["role"].as_str())
                .collect();
            assert_eq!(replayed, ["assistant", "user", "assistant"]);
        }
        Provider::Gemini => {
            assert!(sessions[1].resumed_from.is_some(), "resumed on its handle");
            assert!(sessions[1].items_created.is_empty());
        }
    }
    // Every caller frame reached one session or the other (the last few may still be on
    // their way when the caller hangs up); each session's input is at its own rate.
    let rate = input_rate(provider) as usize;
    let sent = report.frames_sent as usize * 160;
    let heard =
        (sessions[0].input_audio_8k.len() + sessions[1].input_audio_8k.len()) * 8_000 / rate;
    assert!(
        heard <= sent + 160 && heard + 10 * 160 >= sent,
        "the model heard {heard} of {sent} caller samples"
    );
}

/// Ten calls at once, each caller on its own tone: every model session hears exactly one
/// caller, and every caller hears back only its own tone.
async fn concurrent_calls_stay_isolated(provider: Provider) {
    const CALLS: usize = 10;
    let stack = start_stack_for(provider, MockConfig::default(), None, |config| {
        config.max_prewarms = CALLS
    })
    .await;
    let tones: Vec<f64> = (0..CALLS).map(|i| 400.0 + 150.0 * i as f64).collect();
    for session in calls_on_their_own_tones(&stack, &tones).await {
        assert_eq!(session.provider, provider.as_str());
    }
    stack.bridge.drain_and_stop(Duration::from_secs(1)).await;
}

// ---- what only one provider has ----

/// Gemini's `goAway` starts the make-before-break renewal at once; the successor resumes on
/// the session's handle and the call goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_go_away_renews_the_session_on_its_handle() {
    let mock = MockConfig {
        go_away_after: Some(Duration::from_millis(2_500)),
        go_away_grace: Duration::from_secs(5),
        ..MockConfig::default()
    };
    let stack = start_stack_for(Provider::Gemini, mock, Some("Hello"), |_| {}).await;
    let mut audio = silence_mulaw(3_500);
    audio.extend(tone_mulaw(440.0, 600));
    audio.extend(silence_mulaw(1_500));
    let config = CallerConfig {
        linger: Duration::from_millis(300),
        ..CallerConfig::new(stack.url.clone(), stack.token.clone(), audio)
    };
    let report = place_call(&config).await.expect("a call");
    assert!(!report.closed_by_bridge);
    // Every session is told to go away 2.5 s after it starts: each is replaced in time.
    let sessions = stack.mock.log().sessions();
    assert_eq!(sessions[0].go_aways_sent, 1);
    assert!(sessions.len() >= 2, "renewed before the server closed it");
    for successor in &sessions[1..] {
        assert!(successor.resumed_from.is_some(), "resumed on its handle");
        assert!(
            successor.items_created.is_empty(),
            "not told the conversation again"
        );
    }
    let metrics = stack.bridge.metrics();
    assert_eq!(
        metrics.model_renewals(false) + metrics.model_renewals(true),
        sessions.len() as u64 - 1
    );
    assert_eq!(
        metrics.model_reconnects(voxrelay::session::continuity::SessionEnd::Dropped),
        0,
        "no session was lost"
    );
    let answers: usize = sessions[1..]
        .iter()
        .map(|session| session.response_transcripts.len())
        .sum();
    assert_eq!(
        answers,
        1,
        "a successor answered the question asked after the switch: {:?}",
        sessions
            .iter()
            .map(|s| &s.response_transcripts)
            .collect::<Vec<_>>()
    );
}

/// A tenant moves from OpenAI to Gemini by changing its context: the next call is answered
/// by Gemini, with no restart of anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_switches_provider_by_changing_its_context() {
    let dir = Scratch::new("conformance-switch");
    let cp = start_control_plane(&dir.0.join("cp.db")).await;
    let target = control_target(cp.url(), &dir.0.join("spool"));
    let stack = start_stack_for(Provider::OpenAi, MockConfig::default(), None, |config| {
        config.control_plane = Some(target);
    })
    .await;
    let call = || CallerConfig {
        to: "+15550100001".to_owned(),
        from: "+15557770003".to_owned(),
        linger: Duration::from_millis(300),
        ..CallerConfig::new(stack.url.clone(), stack.token.clone(), silence_mulaw(200))
    };
    place_call(&call()).await.expect("first call");
    let on_gemini = seed_toml().replacen(
        "voice = \"marin\"",
        "voice = \"Kore\"\nprovider = \"gemini\"",
        1,
    );
    let outcome = cp
        .store()
        .apply_seed(&Seed::parse(&on_gemini, &SeedFiles::Shipped).expect("seed"))
        .expect("applied");
    assert_eq!(outcome.tenants_written, 1);
    place_call(&call()).await.expect("second call");
    let providers: Vec<&str> = stack
        .mock
        .log()
        .sessions()
        .iter()
        .map(|session| session.provider)
        .collect();
    assert_eq!(providers, ["openai", "gemini"]);
    let gemini = &stack.mock.log().sessions()[1];
    assert_eq!(
        gemini.session["generationConfig"]["speechConfig"]["voiceConfig"]["prebuiltVoiceConfig"]["voiceName"],
        "Kore"
    );
    cp.stop().await;
}

/// A tenant on a provider this bridge has no key for is sent to its fallback at once, never
/// answered in another provider's voice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_on_a_provider_without_a_key_gets_its_fallback() {
    let dir = Scratch::new("conformance-nokey");
    let cp = start_control_plane(&dir.0.join("cp.db")).await;
    let target = control_target(cp.url(), &dir.0.join("spool"));
    let stack = start_stack_for(Provider::OpenAi, MockConfig::default(), None, |config| {
        config.control_plane = Some(target);
        config.models.gemini = None;
    })
    .await;
    let caller = CallerConfig {
        to: "+15550100004".to_owned(),
        from: "+15557770003".to_owned(),
        linger: Duration::from_millis(1_000),
        ..CallerConfig::new(stack.url.clone(), stack.token.clone(), silence_mulaw(200))
    };
    let report = place_call(&caller).await.expect("a call");
    assert!(
        report.closed_by_bridge,
        "the stream closed for the fallback"
    );
    assert_eq!(
        report.fallback_heard(),
        Some("dial:+15550100998"),
        "{:?}",
        report.after_stream
    );
    assert!(
        stack.mock.log().sessions().is_empty(),
        "no model was dialled"
    );
    assert_eq!(
        stack.bridge.metrics().call_fallbacks(
            voxrelay::session::continuity::FallbackReason::ConnectFailed(
                voxrelay::session::continuity::ConnectFailure::NotConfigured
            )
        ),
        1
    );
    cp.stop().await;
}

/// A caller's turn timed end to end: with the model's think time set, `model_ms` recovers it
/// on top of the model's turn detection (its silence wait), within one 20 ms frame; the parts
/// add up to `voice_to_voice_ms`; the report and `/metrics` carry the turn. OpenAI says where
/// the caller stopped; for Gemini, which does not, the bridge's own level detection does.
async fn a_turn_is_timed_from_the_callers_speech_end_to_its_reply_heard(provider: Provider) {
    const THINK_MS: f64 = 300.0;
    const SILENCE_MS: f64 = 500.0;
    // One 20 ms frame, and the loopback's scheduling on a shared 2-core machine.
    const SLACK_MS: f64 = 20.0;
    let dir = Scratch::new("conformance-turns");
    let cp = start_control_plane(&dir.0.join("cp.db")).await;
    let mock = MockConfig {
        reply_delay: Duration::from_millis(THINK_MS as u64),
        silence_ms: SILENCE_MS as u32,
        ..MockConfig::default()
    };
    let stack = stack_on(&cp, &dir, mock).await;
    let (tenant, number) = tenant_on(provider);
    let caller = CallerConfig {
        to: number.to_owned(),
        linger: Duration::from_millis(1_500),
        ..CallerConfig::new(stack.url.clone(), stack.token.clone(), utterance())
    };
    let call_sid = caller.call_sid.clone();
    let heard = place_call(&caller).await.expect("call");
    assert!(
        !heard.audio_received.is_empty(),
        "the caller heard the reply"
    );
    let mut report = None;
    assert!(
        eventually(Duration::from_secs(10), || {
            report = cp.store().reported_call(&call_sid).expect("store");
            report.is_some()
        })
        .await,
        "the call was reported"
    );
    let report = report.unwrap();
    assert_eq!(report.tenant_id.as_deref(), Some(tenant));
    let answers: Vec<_> = report
        .turns
        .iter()
        .filter(|turn| turn.cause == "caller")
        .collect();
    let [turn] = &answers[..] else {
        panic!("one answer to the caller's speech: {:?}", report.turns);
    };
    let model = turn.model_ms.expect("model part");
    let bridge = turn.bridge_ms.expect("bridge part");
    let playout = turn.playout_ms.expect("playout part");
    let voice_to_voice = turn.voice_to_voice_ms.expect("voice to voice");
    let near = |value: f64, expected: f64| (value - expected).abs() <= SLACK_MS;
    // Gemini's speech end is the bridge's level detection; the mock's own VAD hears the audio
    // 5 ms later through the bridge's 8 → 16 kHz resampler, in 20 ms windows, so its silence
    // wait may start a window later: one more frame of slack.
    let model_slack = match provider {
        Provider::OpenAi => SLACK_MS,
        Provider::Gemini => 2.0 * SLACK_MS,
    };
    assert!(
        (model - (SILENCE_MS + THINK_MS)).abs() <= model_slack,
        "model_ms {model} is the silence wait and the think time: {turn:?}"
    );
    match provider {
        Provider::OpenAi => {
            let detect = turn.detect_ms.expect("OpenAI says when it decided");
            assert!(near(model - detect, THINK_MS), "think time: {turn:?}");
        }
        Provider::Gemini => assert_eq!(turn.detect_ms, None, "Gemini does not say"),
    }
    assert!(bridge < SLACK_MS, "the bridge's part: {turn:?}");
    assert!(
        playout < 2.0 * SLACK_MS,
        "an idle line plays at once: {turn:?}"
    );
    assert!(
        (model + bridge + playout - voice_to_voice).abs() < 0.01,
        "the parts add up: {turn:?}"
    );
    let metrics = stack.bridge.metrics();
    let series = metrics
        .turns
        .series(tenant, provider)
        .expect("the tenant's turn series");
    assert!(series.voice_to_voice.count() >= 1);
    cp.stop().await;
}
