//! The simulator's in-process runs against the real bridge: `voxrelay demo` (the README's main
//! job) and `bench --first-audio`, each started through the bridge's
//! [`voxrelay::in_process::InProcessLauncher`] as the binary does.

use std::time::Duration;

use voxrelay::AudioMode;
use voxrelay::in_process::InProcessLauncher;
use voxrelay_sim::demo::{DemoOptions, run_demo};
use voxrelay_sim::first_audio::{FirstAudioOptions, LOOKUPS, run};

/// The README's main job, end to end: every seeded tenant's call gets its agent and is
/// reported to it; the unknown number gets the fallback and no tenant; the last call survives
/// its model session's reset and its report lists both sessions.
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
