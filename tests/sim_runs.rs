//! The simulator's in-process runs against the real bridge: `voxrelay demo` (the README's main
//! job) and `bench --first-audio`, each started through the bridge's
//! [`voxrelay::in_process::InProcessLauncher`] as the binary does.

use std::time::Duration;

use voxrelay::AudioMode;
use voxrelay::in_process::InProcessLauncher;
use voxrelay_sim::demo::{DemoOptions, run_demo};
use voxrelay_sim::first_audio::{FirstAudioOptions, LOOKUPS, run};

/// The README's main job, end to end: every seeded tenant's call gets its agent and is
/// reported to it; the unknown number gets the fallback and no tenant; the Gemini tenant's call
/// is answered on Gemini Live and its stored report says so, with the model and the tokens;
/// the last call survives its model session's reset and its report lists both sessions.
#[tokio::test]
async fn the_demo_answers_each_tenant_with_its_own_agent_and_reports_it() {
    let report = run_demo(
        &DemoOptions {
            calls: 3,
            audio_mode: AudioMode::Pcmu,
        },
        &InProcessLauncher,
    )
    .await
    .expect("demo");
    assert!(report.calls.iter().all(Result::is_ok), "{}", report.text);
    let reported = |tenant: &str| -> Vec<String> {
        report
            .history
            .iter()
            .filter(|(t, _)| t == tenant)
            .flat_map(|(_, calls)| calls.iter().map(|c| c.to.clone()))
            .collect()
    };
    assert_eq!(reported("acme_dental"), ["+15550100001"]);
    assert_eq!(reported("bistro_luna"), ["+15550100002", "+15550100002"]);
    assert_eq!(reported("harbor_florist"), ["+15550100004"]);
    // Every call has its stored report, and each names the provider that answered it.
    let providers: Vec<(&str, Option<voxrelay::Provider>)> = report
        .numbers
        .iter()
        .zip(&report.stored)
        .map(|(number, stored)| (number.as_str(), stored.as_ref().map(|r| r.provider)))
        .collect();
    use voxrelay::Provider::{Gemini, OpenAi};
    assert_eq!(
        providers,
        [
            ("+15550100001", Some(OpenAi)),
            ("+15550100002", Some(OpenAi)),
            ("+15550100099", Some(OpenAi)),
            ("+15550100004", Some(Gemini)),
            ("+15550100002", Some(OpenAi)),
        ],
        "{}",
        report.text
    );
    let gemini = report.stored[3].as_ref().expect("stored");
    assert_eq!(gemini.tenant_id.as_deref(), Some("harbor_florist"));
    assert_eq!(gemini.model.as_deref(), Some("gemini-3.8-live"));
    assert!(
        gemini.usage.is_some_and(|usage| usage.output_tokens > 0),
        "the mock's usageMetadata reaches the report: {gemini:?}"
    );
    assert!(
        gemini.model_sessions.len() == 1 && gemini.fallback.is_none(),
        "answered by its model, not its fallback: {gemini:?}"
    );
    assert_eq!(report.mock_sessions[3].provider, "gemini");
    // OpenAI's usage (response.done) reaches the report as Gemini's does.
    let acme = report.stored[0].as_ref().expect("stored");
    assert!(
        acme.usage.is_some_and(|usage| usage.output_tokens > 0),
        "the mock's response.done usage reaches the report: {acme:?}"
    );
    assert!(report.text.contains("provider: gemini"), "{}", report.text);
    // A line of audio telemetry for every call the control plane stored.
    let stored: usize = report.history.iter().map(|(_, calls)| calls.len()).sum();
    assert_eq!(
        report.text.matches("      audio: caller ").count(),
        stored,
        "{}",
        report.text
    );
    let survivor = report
        .history
        .iter()
        .flat_map(|(_, calls)| calls)
        .find(|call| call.model_sessions.len() == 2)
        .unwrap_or_else(|| panic!("no call survived its model:\n{}", report.text));
    assert_eq!(survivor.model_sessions[0].end.as_deref(), Some("drop"));
    assert_eq!(survivor.end_reason, "twilio_stop");
    assert!(
        report
            .calls
            .last()
            .is_some_and(|call| call.as_ref().is_ok_and(|call| !call.closed_by_bridge))
    );
    assert!(report.text.contains("model sessions:"), "{}", report.text);
    let greetings: Vec<&str> = report
        .mock_sessions
        .iter()
        .map(|s| s.response_transcripts[0].as_str())
        .collect();
    assert!(greetings[0].contains("Acme Dental"), "{greetings:?}");
    assert!(greetings[1].contains("Bistro Luna"), "{greetings:?}");
    assert_eq!(greetings[2], voxrelay::config::DEFAULT_GREETING);
    assert!(greetings[3].contains("Harbor Florist"), "{greetings:?}");
    assert!(report.text.contains("(fallback)"), "{}", report.text);
}

#[tokio::test]
async fn prewarm_shortens_the_wait_for_the_greeting() {
    let result = run(
        &FirstAudioOptions {
            calls: 2,
            model_connect: Duration::from_millis(150),
            twilio_gap: Duration::from_millis(200),
            audio_mode: AudioMode::Pcmu,
        },
        &InProcessLauncher,
    )
    .await
    .expect("probe");
    assert_eq!(result.no_audio, 0);
    assert_eq!(result.prewarm_us.count, 2);
    assert_eq!(result.cold_control_plane_us.count, 2);
    assert_eq!(result.lookup_miss_us.count, LOOKUPS as u64);
    // Cold start waits out the model's 150 ms handshake; pre-warm did it during the gap.
    assert!(result.cold_us.p50 >= 150_000.0, "{result:?}");
    assert!(result.prewarm_us.max < result.cold_us.p50, "{result:?}");
}

/// The simulator dials models with the bridge's settings (it cannot import them): a drift here
/// would make the baseline relay's floor read differently from the bridge.
#[test]
fn the_simulator_dials_with_the_bridges_settings() {
    use voxrelay::upstream::connect;
    use voxrelay_sim::dial;
    assert_eq!(dial::CONNECT_TIMEOUT, connect::CONNECT_TIMEOUT);
    assert_eq!(dial::UPSTREAM_READ_BUFFER, connect::UPSTREAM_READ_BUFFER);
    assert_eq!(
        dial::MAX_UPSTREAM_MESSAGE_BYTES,
        connect::MAX_UPSTREAM_MESSAGE_BYTES
    );
}

/// `bench` against the real bridge in this process, in both audio modes: every frame is
/// identified by the id it carries (in `pcm16` the tones, through the bridge's μ-law ⇄ PCM16
/// and 8 ⇄ 24 kHz both ways), and a clean bridge has every frame accounted for.
#[tokio::test]
async fn bench_identifies_every_frame_through_the_bridge_in_both_modes() {
    use voxrelay_sim::harness::{BenchOptions, BridgeUnderTest, run as bench};
    for audio_mode in [AudioMode::Pcmu, AudioMode::Pcm16] {
        let options = BenchOptions {
            calls: 2,
            seconds: 2.5,
            audio_mode,
            bridge: BridgeUnderTest::InProcess,
            ramp_up: Duration::ZERO,
            model_delay: Duration::from_millis(40),
            barge_in_every: Some(Duration::from_millis(900)),
            // Nothing here asserts on latency; frames this close to the hang-up are in flight.
            late_threshold: Duration::from_millis(100),
            progress: false,
            ..BenchOptions::default()
        };
        let result =
            tokio::time::timeout(Duration::from_secs(60), bench(&options, &InProcessLauncher))
                .await
                .expect("the run ends in time")
                .expect("the run starts");
        assert!(result.frames_identified);
        assert_eq!(
            (result.provider.as_str(), result.audio_mode.as_str()),
            ("openai", audio_mode.as_str())
        );
        assert_eq!(result.frames_sent, 2 * 125, "{audio_mode}");
        assert_eq!(
            (result.errors, result.frame_faults(), result.split_frames),
            (0, 0, 0),
            "{audio_mode}: {result:?}"
        );
        assert!(result.uplink_us.count > 200, "{audio_mode}: {result:?}");
        assert!(result.downlink_us.count > 100, "{audio_mode}: {result:?}");
        assert!(result.barge_in_us.count >= 2, "{audio_mode}: {result:?}");
    }
}

/// `bench --provider gemini` against the real bridge in this process: the bridge speaks Gemini
/// Live to the echo model (16 kHz up, 24 kHz down, resampled both ways), every frame is
/// identified by its tones, a clean bridge has every frame accounted for, and the scheduled
/// barge-ins (Gemini's `interrupted`) clear the caller's audio.
#[tokio::test]
async fn bench_identifies_every_frame_through_the_bridge_on_gemini() {
    use voxrelay_sim::harness::{BenchOptions, BridgeUnderTest, run as bench};
    let options = BenchOptions {
        calls: 2,
        seconds: 2.5,
        providers: vec![voxrelay_core::Provider::Gemini],
        bridge: BridgeUnderTest::InProcess,
        ramp_up: Duration::ZERO,
        model_delay: Duration::from_millis(40),
        barge_in_every: Some(Duration::from_millis(900)),
        // Nothing here asserts on latency; frames this close to the hang-up are in flight.
        late_threshold: Duration::from_millis(100),
        progress: false,
        ..BenchOptions::default()
    };
    let result = tokio::time::timeout(Duration::from_secs(60), bench(&options, &InProcessLauncher))
        .await
        .expect("the run ends in time")
        .expect("the run starts");
    assert_eq!(
        (result.provider.as_str(), result.audio_mode.as_str()),
        ("gemini", "gemini")
    );
    assert!(result.frames_identified);
    assert_eq!(result.frames_sent, 2 * 125);
    assert_eq!(
        (result.errors, result.frame_faults(), result.split_frames),
        (0, 0, 0),
        "{result:?}"
    );
    assert!(result.uplink_us.count > 200, "{result:?}");
    assert!(result.downlink_us.count > 100, "{result:?}");
    assert!(result.barge_in_us.count >= 2, "{result:?}");
    assert!(result.setup_us.count == 2, "{result:?}");
}

/// `bench --model-faults` against the real bridge in this process: every model session drops
/// at a random moment, and no call is lost; each drop is measured from the model's side (the
/// successor's configuration) and the caller's (the gap in the echo).
#[tokio::test]
async fn bench_model_faults_drop_sessions_and_every_call_survives() {
    use voxrelay_sim::harness::{BenchOptions, BridgeUnderTest, run as bench};
    let options = BenchOptions {
        calls: 3,
        seconds: 4.0,
        bridge: BridgeUnderTest::InProcess,
        ramp_up: Duration::ZERO,
        model_delay: Duration::from_millis(40),
        barge_in_every: None,
        late_threshold: Duration::from_millis(100),
        progress: false,
        model_faults: Some(1.0),
        ..BenchOptions::default()
    };
    let result = tokio::time::timeout(Duration::from_secs(60), bench(&options, &InProcessLauncher))
        .await
        .expect("the run ends in time")
        .expect("the run starts");
    let faults = result
        .model_faults
        .clone()
        .expect("the faults are reported");
    assert!(faults.sessions_dropped >= 3, "{faults:?}");
    assert!(faults.sessions_replaced >= 1, "{faults:?}");
    assert_eq!(faults.calls_lost, 0, "{result:?}");
    assert_eq!(result.errors, 0, "{result:?}");
    assert_eq!(
        result.foreign_frames, 0,
        "no frame of another call: {result:?}"
    );
    assert!(faults.reconnect_gap_us.count >= 1 && faults.reconnect_gap_us.p50 < 1e6);
    assert!(faults.caller_gap_us.count >= 1, "{faults:?}");
}
