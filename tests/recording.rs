//! Call recordings end to end (feature `opus`): the scripted Twilio caller, the bridge, the
//! mock model and the reference control plane on 127.0.0.1. A recorded call's report names
//! its file, the file decodes back with the caller on channel 1 and the agent on channel 2
//! where the caller heard them (the greeting cut where the caller barged in), and a recording
//! that cannot be written leaves the call as it was and says why.

#![cfg(feature = "opus")]

mod common;

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};
use voxrelay::Provider;
use voxrelay::control::api::{CallReport, ReportRecording};
use voxrelay::recording::FailureKind;
use voxrelay::recording::ogg_opus::decode;
use voxrelay_control_plane::server::seed_toml;
use voxrelay_sim::caller::{CallerConfig, place_call};
use voxrelay_sim::mock::MockConfig;

/// Acme Dental's number in the shipped seed.
const ACME: &str = "+15550100001";

/// Quiet, then a 700 Hz tone over the greeting (a barge-in), then quiet while the echo plays.
fn barge_in_script() -> Vec<u8> {
    let mut audio = silence_mulaw(300);
    audio.extend(tone_mulaw(700.0, 800));
    audio
}

/// The shipped seed with `record = true` for Acme Dental.
fn seed_recording_acme() -> String {
    let seed = seed_toml().replacen(
        "id = \"acme_dental\"\n",
        "id = \"acme_dental\"\nrecord = true\n",
        1,
    );
    assert_ne!(seed, seed_toml(), "the seed names acme_dental");
    seed
}

/// One call to Acme Dental with the barge-in script; its report once the control plane has it.
async fn recorded_call(
    seed: String,
    adjust: impl FnOnce(&mut voxrelay::config::BridgeConfig, &Path),
) -> (voxrelay_sim::caller::CallReport, CallReport, Stack, Scratch) {
    let dir = Scratch::new("recording-e2e");
    let cp = start_control_plane_seeded(&dir.0.join("cp.db"), seed).await;
    let target = control_target(cp.url(), &dir.0.join("spool"));
    let root = dir.0.clone();
    let stack = start_stack_for(
        Provider::OpenAi,
        MockConfig::default(),
        None,
        move |config| {
            config.control_plane = Some(target);
            adjust(config, &root);
        },
    )
    .await;
    let caller = CallerConfig {
        to: ACME.to_owned(),
        from: "+15557770003".to_owned(),
        linger: Duration::from_millis(2_500),
        ..CallerConfig::new(stack.url.clone(), stack.token.clone(), barge_in_script())
    };
    let call = tokio::time::timeout(Duration::from_secs(20), place_call(&caller))
        .await
        .expect("call finished in time")
        .expect("call succeeded");
    let store = cp.store();
    assert!(
        eventually(Duration::from_secs(10), || {
            store.reported_call(&caller.call_sid).unwrap().is_some()
        })
        .await,
        "the call was reported"
    );
    let report = store.reported_call(&caller.call_sid).unwrap().unwrap();
    cp.stop().await;
    (call, report, stack, dir)
}

fn rms(samples: &[i16]) -> f64 {
    let sum: f64 = samples.iter().map(|&x| f64::from(x).powi(2)).sum();
    (sum / samples.len().max(1) as f64).sqrt()
}

/// The 5 ms windows (as ms from the recording's start) in runs of at least four louder
/// than `level` (a run skips the few ms an abrupt onset leaks into the other channel).
fn loud_ms(samples: &[i16], level: f64) -> Vec<u64> {
    let loud: Vec<bool> = samples.chunks(40).map(|w| rms(w) > level).collect();
    (0..loud.len())
        .filter(|&i| {
            (i.saturating_sub(3)..=i).any(|start| {
                loud.get(start..start + 4)
                    .is_some_and(|run| !run.contains(&false))
            })
        })
        .map(|i| i as u64 * 5)
        .collect()
}

/// The greeting plays, the caller barges in at 300 ms, the model echoes the caller: the
/// tenant's `record = true` (the bridge's default is off) records it all as heard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_call_decodes_back_as_heard_with_the_barge_in_cut() {
    let (call, report, stack, dir) = recorded_call(seed_recording_acme(), |config, root| {
        config.recording.dir = root.join("recordings");
        assert!(!config.recording.record_by_default);
    })
    .await;
    assert!(!call.closed_by_bridge);
    assert_eq!(call.clears_received, 1, "one barge-in");
    let Some(ReportRecording::Written {
        path,
        duration_ms,
        sha256,
        frames_dropped,
    }) = report.recording.clone()
    else {
        panic!("no recording in the report: {:?}", report.recording);
    };
    assert_eq!(frames_dropped, 0);
    assert!(
        Path::new(&path).starts_with(dir.0.join("recordings")),
        "{path}"
    );
    assert!(path.ends_with(&format!("{}.opus", call.call_sid)), "{path}");
    let file = std::fs::read(&path).expect("the recording");
    let mut digest = String::new();
    for byte in Sha256::digest(&file) {
        digest.push_str(&format!("{byte:02x}"));
    }
    assert_eq!(digest, sha256);
    // Every frame the caller sent, give or take the last one and the jitter gap rule.
    let sent_ms = call.frames_sent * 20;
    assert!(
        duration_ms.abs_diff(sent_ms) <= 60,
        "{duration_ms} ms of {sent_ms}"
    );
    let metrics = stack.bridge.metrics();
    assert_eq!(metrics.recordings.written.load(Relaxed), 1);
    assert_eq!(
        metrics.recordings.bytes_written.load(Relaxed),
        file.len() as u64
    );
    assert!(
        metrics
            .render()
            .contains("voxrelay_recordings_written_total 1\n")
    );

    let decoded = decode(&file).expect("decodes");
    let tag = |key: &str| {
        decoded
            .tags
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(tag("CALL_SID"), Some(call.call_sid.clone()));
    assert_eq!(tag("STREAM_SID"), Some(call.stream_sid.clone()));
    assert_eq!(tag("TENANT").as_deref(), Some("acme_dental"));
    assert_eq!(tag("PROVIDER").as_deref(), Some("openai"));
    assert_eq!(decoded.caller.len() as u64 / 8, duration_ms);

    // Channel 1: the caller's 700 Hz from 300 ms for 800 ms (the recording starts at the
    // caller's first frame, so within one frame of it).
    let caller = loud_ms(&decoded.caller, 1_000.0);
    let caller_on = *caller.first().expect("the caller is heard");
    assert!(caller_on.abs_diff(300) <= 20, "caller from {caller_on} ms");
    let tone = &decoded.caller[8 * 400..8 * 1_000];
    assert_eq!(
        dominant(tone, 8_000.0, &[440.0, 659.25, 700.0, 880.0]),
        700.0
    );
    // Channel 2: the greeting from the stream's first audio until the cut, then nothing
    // until the echo.
    let agent = loud_ms(&decoded.agent, 300.0);
    let greeting_on = *agent.first().expect("the agent is heard");
    let first_audio = call
        .first_audio_after_start
        .expect("a greeting")
        .as_millis() as u64;
    assert!(
        greeting_on.abs_diff(first_audio) <= 40,
        "greeting from {greeting_on} ms, first audio at {first_audio} ms"
    );
    let greeting_off = agent
        .windows(2)
        .find(|pair| pair[1] > pair[0] + 5)
        .map(|pair| pair[0] + 5)
        .expect("a silence after the greeting");
    // Where the caller heard it cut: the clear's arrival on the caller's clock (its stream
    // started with its first frame), within one frame.
    let clear = call.clears_at[0].as_millis() as u64;
    assert!(
        greeting_off.abs_diff(clear) <= 20,
        "greeting cut at {greeting_off} ms in the file, cleared at {clear} ms"
    );
    // Both channels on one clock: the caller's onset to the cut as the caller lived it.
    let heard = clear.saturating_sub(300);
    let recorded = greeting_off.saturating_sub(caller_on);
    assert!(
        heard.abs_diff(recorded) <= 20,
        "{recorded} ms vs {heard} ms"
    );
    // The greeting's first note is 659 Hz; after the cut the echo is the caller's 700 Hz.
    let echo_on = *agent
        .iter()
        .find(|&&ms| ms > greeting_off + 100)
        .expect("the echo is heard");
    let echo = &decoded.agent[(echo_on as usize + 50) * 8..(echo_on as usize + 650) * 8];
    assert_eq!(
        dominant(echo, 8_000.0, &[440.0, 659.25, 700.0, 880.0]),
        700.0
    );
}

/// The recording directory cannot be made: the call goes on exactly as unrecorded calls do,
/// and its report and the metrics say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_recording_dir_leaves_the_call_whole_and_is_reported() {
    let (call, report, stack, _dir) = recorded_call(seed_toml().to_owned(), |config, root| {
        // A file where a directory should be: no one, root included, can create under it.
        let blocker = root.join("not-a-dir");
        std::fs::write(&blocker, b"x").unwrap();
        config.recording.dir = blocker.join("recordings");
        config.recording.record_by_default = true;
    })
    .await;
    assert!(!call.closed_by_bridge);
    assert_eq!(call.clears_received, 1, "one barge-in");
    assert!(call.audio_received.len() >= 8 * 500, "the echo came back");
    assert_eq!(report.end_reason, "twilio_stop");
    let Some(ReportRecording::Failed { error }) = &report.recording else {
        panic!("{:?}", report.recording);
    };
    assert!(error.starts_with("unwritable_dir: "), "{error}");
    let metrics = stack.bridge.metrics();
    assert_eq!(metrics.recordings.failures(FailureKind::UnwritableDir), 1);
    assert_eq!(metrics.recordings.written.load(Relaxed), 0);
    assert!(
        metrics
            .render()
            .contains("voxrelay_recordings_failed_total{kind=\"unwritable_dir\"} 1\n")
    );
}
