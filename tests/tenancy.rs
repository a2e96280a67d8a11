//! Multi-tenant calls end to end on 127.0.0.1: the reference control plane (SQLite, seeded
//! from `fixtures/tenants.toml`), the bridge configured against it, the mock model and
//! scripted Twilio callers. Each tenant's calls get that tenant's agent; a control plane that
//! is down or silent costs at most the lookup budget and the fallback answers; reports
//! survive the outage through the spool. (A tool call model → bridge → control plane → model
//! is in the provider conformance suite, `tests/conformance.rs`.)

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use serde_json::json;
use voxrelay::config::{ControlPlaneTarget, DEFAULT_GREETING, DEFAULT_INSTRUCTIONS};
use voxrelay::control::signing::{SigningKey, Verifier};
use voxrelay::{AudioMode, Secret};
use voxrelay_control_plane::seed::SeedSource;
use voxrelay_control_plane::server::{
    ControlPlane, ControlPlaneConfig, RunningControlPlane, seed_toml,
};
use voxrelay_control_plane::store::DbLocation;
use voxrelay_sim::caller::{CallReport as CallerReport, CallerConfig, place_call};
use voxrelay_sim::mock::{MockConfig, MockFault, MockFaultKind, MockSessionRecord};

const KEY_ID: &str = "bridge-test";
const KEY_SECRET: &str = "tenancy-test-secret";
const ACME: &str = "+15550100001";
const LUNA: &str = "+15550100002";
const BUDGET: Duration = Duration::from_millis(300);

async fn start_control_plane(listen: SocketAddr, db: &Path) -> RunningControlPlane {
    start_control_plane_seeded(listen, db, seed_toml()).await
}

async fn start_control_plane_seeded(
    listen: SocketAddr,
    db: &Path,
    seed: &str,
) -> RunningControlPlane {
    ControlPlane::start(ControlPlaneConfig {
        listen,
        db: DbLocation::File(db.to_path_buf()),
        seed: Some(SeedSource::with_shipped_files(seed)),
        verifier: Verifier::from_key_list(&format!("{KEY_ID}:{KEY_SECRET}")).unwrap(),
    })
    .await
    .expect("control plane")
}

/// The calls the control plane stored for `tenant`, newest first.
fn reported(cp: &RunningControlPlane, tenant: &str) -> Vec<voxrelay::control::api::CallReport> {
    cp.store().call_history(tenant, 10).unwrap().unwrap().calls
}

fn control_target(url: url::Url, spool: &Path) -> ControlPlaneTarget {
    ControlPlaneTarget {
        url,
        key: SigningKey::new(KEY_ID, Secret::new(KEY_SECRET)),
        lookup_budget: BUDGET,
        context_ttl: Duration::from_secs(60),
        context_stale: Duration::from_secs(600),
        report_spool_dir: spool.to_path_buf(),
        report_retry: Duration::from_millis(500),
        report_resend: Duration::from_secs(3600),
    }
}

async fn bridge_against(mock_config: MockConfig, target: ControlPlaneTarget) -> Stack {
    start_stack_adjusted(
        mock_config,
        AudioMode::Pcmu,
        Some(DEFAULT_GREETING),
        |config| config.control_plane = Some(target),
    )
    .await
}

async fn call(stack: &Stack, to: &str, from: &str, audio: Vec<u8>) -> CallerReport {
    let caller = CallerConfig {
        to: to.to_owned(),
        from: from.to_owned(),
        linger: Duration::from_millis(1200),
        ..CallerConfig::new(stack.url.clone(), stack.token.clone(), audio)
    };
    place_call(&caller).await.expect("call")
}

fn session_for_voice(sessions: &[MockSessionRecord], voice: &str) -> MockSessionRecord {
    sessions
        .iter()
        .find(|s| s.session["audio"]["output"]["voice"] == voice)
        .unwrap_or_else(|| panic!("no session with voice {voice}"))
        .clone()
}

fn tool_names(session: &MockSessionRecord) -> Vec<String> {
    session.session["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|tool| tool["name"].as_str().map(str::to_owned))
        .collect()
}

/// A spoken phrase the mock's VAD hears as one utterance, then silence that ends it.
fn utterance() -> Vec<u8> {
    let mut audio = tone_mulaw(440.0, 600);
    audio.extend(silence_mulaw(700));
    audio
}

#[tokio::test]
async fn two_tenants_called_at_once_each_get_their_own_agent() {
    let dir = Scratch::new("tenancy-two");
    let cp = start_control_plane("127.0.0.1:0".parse().unwrap(), &dir.0.join("cp.db")).await;
    let stack = bridge_against(
        MockConfig::default(),
        control_target(cp.url(), &dir.0.join("spool")),
    )
    .await;

    let (acme, luna) = tokio::join!(
        call(&stack, ACME, "+15557770001", utterance()),
        call(&stack, LUNA, "+15557770002", utterance())
    );
    assert!(acme.first_audio_after_start.is_some() && luna.first_audio_after_start.is_some());

    let sessions = stack.mock.log().sessions();
    assert_eq!(sessions.len(), 2, "one pre-warmed session per call");
    let acme_session = session_for_voice(&sessions, "marin");
    let luna_session = session_for_voice(&sessions, "cedar");
    assert!(
        acme_session.session["instructions"]
            .as_str()
            .unwrap()
            .contains("Acme Dental")
    );
    assert!(
        luna_session.session["instructions"]
            .as_str()
            .unwrap()
            .contains("Bistro Luna")
    );
    assert_eq!(
        tool_names(&acme_session),
        ["lookup_business_hours", "take_message"]
    );
    assert_eq!(tool_names(&luna_session), ["lookup_business_hours"]);
    assert_eq!(
        acme_session.session["audio"]["input"]["format"]["type"],
        "audio/pcmu"
    );
    assert_eq!(
        luna_session.session["audio"]["input"]["format"],
        json!({"type": "audio/pcm", "rate": 24000})
    );
    assert!(acme_session.response_transcripts[0].starts_with("Thank you for calling Acme Dental"));
    assert!(luna_session.response_transcripts[0].starts_with("Bistro Luna"));

    // Each call is reported to its own tenant, with its caller's namespace inside it.
    assert!(
        eventually(Duration::from_secs(5), || reported(&cp, "acme_dental")
            .len()
            == 1)
        .await
    );
    assert!(
        eventually(Duration::from_secs(5), || reported(&cp, "bistro_luna")
            .len()
            == 1)
        .await
    );
    for (tenant, from, agent) in [
        ("acme_dental", "+15557770001", "Ava"),
        ("bistro_luna", "+15557770002", "Luca"),
    ] {
        let report = &reported(&cp, tenant)[0];
        assert_eq!(report.tenant_id.as_deref(), Some(tenant));
        assert_eq!(report.agent_name, agent);
        assert_eq!(report.context_source, "fresh");
        assert_eq!(
            report.memory_namespace.as_deref(),
            Some(format!("{tenant}/{from}").as_str())
        );
        let speakers: Vec<&str> = report
            .transcript
            .iter()
            .map(|l| l.speaker.as_str())
            .collect();
        // The caller talks over the greeting (a barge-in), so the lines are the caller's
        // utterance and the model's answer to it, in that order.
        assert!(
            speakers.contains(&"caller") && speakers.contains(&"assistant"),
            "{speakers:?}"
        );
        assert!(
            report
                .transcript
                .windows(2)
                .all(|w| w[0].offset_ms <= w[1].offset_ms)
        );
        assert!(report.audio_seconds_in > 1.0);
        // The bridge's own per-call latency: one uplink figure per caller frame it relayed.
        assert!(report.latency.uplink_us.count > 50, "{:?}", report.latency);
        assert!(report.latency.uplink_us.p50 <= report.latency.uplink_us.max);
        // What the call sounded like, measured by the bridge and stored by the control plane:
        // the caller's utterance on one leg, the greeting and answer on the other.
        let audio = report.audio.expect("the call's audio telemetry");
        assert_eq!(
            audio.caller.audio_ms,
            (report.audio_seconds_in * 1000.0).round() as u64,
            "{audio:?}"
        );
        assert!(audio.agent.audio_ms > 0, "{audio:?}");
        assert!(audio.caller.rms_dbfs > -60.0, "{audio:?}");
        assert!(audio.caller.silence_share < 1.0, "{audio:?}");
    }
    cp.stop().await;
}

// A tool call model → bridge → control plane → model: one test per provider in
// `tests/conformance.rs` (`a_tool_call_round_trips_through_the_control_plane`).

#[tokio::test]
async fn control_plane_outage_falls_back_in_budget_and_spooled_reports_arrive_after() {
    let dir = Scratch::new("tenancy-outage");
    let db = dir.0.join("cp.db");
    let spool = dir.0.join("spool");
    let cp = start_control_plane("127.0.0.1:0".parse().unwrap(), &db).await;
    let cp_addr = cp.local_addr();
    let target = control_target(cp.url(), &spool);
    let stack = bridge_against(MockConfig::default(), target.clone()).await;

    // While the control plane is up, Acme's number is looked up (and cached).
    call(&stack, ACME, "+15557770004", utterance()).await;
    assert!(
        eventually(Duration::from_secs(5), || reported(&cp, "acme_dental")
            .len()
            == 1)
        .await
    );
    cp.stop().await;

    // Down: Acme is served from the cache; Luna's number was never seen, so the fallback
    // (the environment's agent) answers, without waiting past the budget.
    let acme = call(&stack, ACME, "+15557770005", utterance()).await;
    let luna = call(&stack, LUNA, "+15557770006", utterance()).await;
    assert!(acme.first_audio_after_start.is_some());
    let first_audio = luna.first_audio_after_start.expect("the fallback answered");
    assert!(
        first_audio < BUDGET + Duration::from_secs(1),
        "{first_audio:?}"
    );
    let sessions = stack.mock.log().sessions();
    let fallback = sessions.last().unwrap();
    assert_eq!(fallback.session["instructions"], DEFAULT_INSTRUCTIONS);
    assert!(
        tool_names(fallback).is_empty(),
        "the fallback never gets a tenant's tools"
    );
    let cached = &sessions[sessions.len() - 2];
    assert!(
        cached.session["instructions"]
            .as_str()
            .unwrap()
            .contains("Acme Dental")
    );

    // Both reports give up after the retry window and wait in the spool.
    let metrics = stack.bridge.metrics().clone();
    assert!(
        eventually(Duration::from_secs(10), || metrics
            .control_reports_spooled
            .load(Relaxed)
            == 2)
        .await
    );
    let spooled = std::fs::read_dir(&spool)
        .unwrap()
        .filter(|entry| {
            entry
                .as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|e| e == "json")
        })
        .count();
    assert_eq!(spooled, 2);
    stack.bridge.drain_and_stop(Duration::from_secs(2)).await;

    // The control plane comes back on its address with its database; the next bridge start
    // resends the spool.
    let cp = start_control_plane(cp_addr, &db).await;
    let again = bridge_against(MockConfig::default(), target).await;
    assert!(
        eventually(Duration::from_secs(10), || reported(&cp, "acme_dental")
            .len()
            == 2)
        .await,
        "the cached call's report arrived"
    );
    let metrics = again.bridge.metrics().clone();
    assert!(
        eventually(Duration::from_secs(10), || metrics
            .control_reports_resent
            .load(Relaxed)
            == 2)
        .await
    );
    assert!(
        eventually(Duration::from_secs(5), || std::fs::read_dir(&spool)
            .unwrap()
            .filter(|entry| entry
                .as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|e| e == "json"))
            .count()
            == 0)
        .await
    );
    let history = reported(&cp, "acme_dental");
    assert_eq!(history[0].context_source, "cached");
    cp.stop().await;
}

#[tokio::test]
async fn a_control_plane_that_never_answers_costs_at_most_the_budget() {
    // Accepts connections and never answers: the worst kind of outage.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            sockets.push(socket);
        }
    });
    let dir = Scratch::new("tenancy-silent");
    let url = url::Url::parse(&format!("http://{silent_addr}/")).unwrap();
    let stack = bridge_against(
        MockConfig::default(),
        control_target(url, &dir.0.join("spool")),
    )
    .await;
    let report = call(&stack, LUNA, "+15557770007", utterance()).await;
    let first_audio = report
        .first_audio_after_start
        .expect("the fallback answered");
    assert!(
        first_audio < BUDGET + Duration::from_secs(1),
        "{first_audio:?}"
    );
    let sessions = stack.mock.log().sessions();
    assert_eq!(sessions[0].session["instructions"], DEFAULT_INSTRUCTIONS);
    assert!(
        stack
            .bridge
            .metrics()
            .control_lookups(voxrelay::control::directory::ContextSource::Fallback)
            >= 1
    );
    // However long the control plane keeps its requests waiting, nothing of the call stays
    // behind: its report went to the sender, and its task and registry entry are gone.
    let bridge = &stack.bridge;
    assert!(
        eventually(Duration::from_secs(5), || bridge.registry().is_empty()
            && bridge.live_call_tasks() == 0)
        .await,
        "{} registered, {} call tasks",
        bridge.registry().len(),
        bridge.live_call_tasks()
    );
    held.abort();
}

#[tokio::test]
async fn a_tenants_maximum_call_length_ends_the_call() {
    let dir = Scratch::new("tenancy-maxlen");
    let seed = seed_toml().replace("max_call_seconds = 600", "max_call_seconds = 1");
    assert_ne!(seed, seed_toml(), "the seed names Acme's limit");
    let cp =
        start_control_plane_seeded("127.0.0.1:0".parse().unwrap(), &dir.0.join("cp.db"), &seed)
            .await;
    let stack = bridge_against(
        MockConfig::default(),
        control_target(cp.url(), &dir.0.join("spool")),
    )
    .await;
    // Three seconds of caller audio: the bridge hangs up after one.
    let report = call(&stack, ACME, "+15557770008", silence_mulaw(3_000)).await;
    assert!(report.closed_by_bridge, "{report:?}");
    assert!(
        report.duration < Duration::from_millis(2_500),
        "{:?}",
        report.duration
    );
    assert_eq!(stack.bridge.metrics().calls_max_duration.load(Relaxed), 1);
    assert!(
        eventually(Duration::from_secs(5), || reported(&cp, "acme_dental")
            .first()
            .is_some_and(|c| c.end_reason == "max_duration"))
        .await
    );
    cp.stop().await;
}

/// A model that configures the session, then says `lines` transcript lines of `line_bytes`
/// each (no audio), and reads whatever comes until the socket closes.
async fn talkative_model(lines: usize, line_bytes: usize) -> (String, tokio::task::JoinHandle<()>) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "ws://{}/v1/realtime?model=talkative",
        listener.local_addr().unwrap()
    );
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let _ = ws
                    .send(Message::text(
                        json!({"type": "session.created", "session": {}}).to_string(),
                    ))
                    .await;
                while let Some(Ok(message)) = ws.next().await {
                    let Message::Text(text) = message else {
                        continue;
                    };
                    if !text.contains("\"session.update\"") {
                        continue;
                    }
                    let _ = ws
                        .send(Message::text(
                            json!({"type": "session.updated", "session": {}}).to_string(),
                        ))
                        .await;
                    for n in 0..lines {
                        let mut transcript = format!("line {n}: ");
                        transcript.push_str(&"a".repeat(line_bytes - transcript.len()));
                        let event = json!({
                            "type": "response.output_audio_transcript.done",
                            "event_id": format!("event_{n}"), "response_id": format!("resp_{n}"),
                            "item_id": format!("item_{n}"), "output_index": 0, "content_index": 0,
                            "transcript": transcript,
                        });
                        if ws.send(Message::text(event.to_string())).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (url, task)
}

#[tokio::test]
async fn a_call_with_an_oversized_transcript_still_delivers_its_report_with_the_cut_marked() {
    let dir = Scratch::new("tenancy-long");
    let cp = start_control_plane("127.0.0.1:0".parse().unwrap(), &dir.0.join("cp.db")).await;
    // 80 lines of 15 kB: a 1.2 MB transcript, more than the control plane takes in one body.
    let (lines, line_bytes) = (80, 15_000);
    let (model_url, model) = talkative_model(lines, line_bytes).await;
    let unused = voxrelay_sim::mock::MockRealtimeServer::start(MockConfig::default())
        .await
        .expect("mock");
    let stack = start_stack_configured(
        unused,
        voxrelay::config::UpstreamTarget {
            url: model_url,
            api_key: Some(Secret::new("test-key")),
        },
        AudioMode::Pcmu,
        None,
        |config| {
            config.prewarm = false;
            config.control_plane = Some(control_target(cp.url(), &dir.0.join("spool")));
        },
    )
    .await;
    let caller = CallerConfig {
        to: ACME.to_owned(),
        from: "+15557770010".to_owned(),
        linger: Duration::from_millis(1500),
        ..CallerConfig::new(stack.url.clone(), stack.token.clone(), silence_mulaw(400))
    };
    let call_sid = caller.call_sid.clone();
    place_call(&caller).await.expect("call");

    assert!(
        eventually(Duration::from_secs(10), || reported(&cp, "acme_dental")
            .iter()
            .any(|c| c.call_sid == call_sid))
        .await,
        "the report was delivered (rejected: {}, spooled: {})",
        stack
            .bridge
            .metrics()
            .control_reports_rejected
            .load(Relaxed),
        stack.bridge.metrics().control_reports_spooled.load(Relaxed),
    );
    let report = reported(&cp, "acme_dental")
        .into_iter()
        .find(|c| c.call_sid == call_sid)
        .unwrap();
    let kept = report.transcript.len() as u64;
    assert!(kept > 0 && kept < lines as u64, "{kept} lines kept");
    assert_eq!(
        report.transcript_dropped_lines,
        lines as u64 - kept,
        "the cut is marked"
    );
    assert_eq!(report.transcript_cut_lines, 0);
    // The most recent lines are the ones kept, in order.
    let last = report.transcript.last().unwrap();
    assert!(
        last.text.starts_with(&format!("line {}: ", lines - 1)),
        "{}",
        &last.text[..20]
    );
    let first = &report.transcript[0];
    assert!(
        first
            .text
            .starts_with(&format!("line {}: ", report.transcript_dropped_lines)),
        "{}",
        &first.text[..20]
    );
    let body = serde_json::to_vec(&report).unwrap().len();
    assert!(
        body <= voxrelay::session::report::MAX_REPORT_BYTES,
        "{body}"
    );
    let metrics = stack.bridge.metrics();
    assert_eq!(
        metrics.control_report_transcripts_truncated.load(Relaxed),
        1
    );
    assert_eq!(metrics.control_reports_rejected.load(Relaxed), 0);
    model.abort();
    cp.stop().await;
}

/// The model refuses the first session (429, the pre-warm of Acme's call) and resets the
/// next one mid-greeting (Luna's): Acme's caller is dialled through to the tenant's
/// `fallback_number` (the TwiML after `</Connect>`), Luna's call goes on with a second
/// session, and both reports say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_tenant_gets_its_fallback_and_a_dropped_session_is_reported() {
    let dir = Scratch::new("tenancy-continuity");
    let cp = start_control_plane("127.0.0.1:0".parse().unwrap(), &dir.0.join("cp.db")).await;
    let refused = bridge_against(
        MockConfig {
            fault: Some(MockFault::refuse_first(1, 429)),
            ..MockConfig::default()
        },
        control_target(cp.url(), &dir.0.join("spool-a")),
    )
    .await;
    let acme = call(&refused, ACME, "+15557770011", silence_mulaw(2_000)).await;
    assert_eq!(acme.fallback_heard(), Some("dial:+15550100999"));
    assert!(
        acme.duration < Duration::from_secs(2),
        "{:?}",
        acme.duration
    );
    // Another tenant's call on the same bridge is answered.
    let luna = call(&refused, LUNA, "+15557770012", silence_mulaw(1_000)).await;
    assert!(luna.first_audio_after_start.is_some());
    assert_eq!(luna.fallback_heard(), None);
    assert!(
        eventually(Duration::from_secs(5), || reported(&cp, "acme_dental")
            .first()
            .is_some_and(|c| c.fallback.is_some()))
        .await
    );
    let report = reported(&cp, "acme_dental").remove(0);
    assert_eq!(report.end_reason, "model_unavailable");
    let fallback = report.fallback.expect("the fallback is reported");
    assert_eq!(
        (fallback.reason.as_str(), fallback.caller_got.as_str()),
        ("rate_limited", "dial")
    );

    // A session reset mid-greeting: the call goes on, and its report lists both sessions.
    let dropped = bridge_against(
        MockConfig {
            fault: Some(MockFault {
                session: 1,
                kind: MockFaultKind::ResetAfterDeltas(3),
            }),
            ..MockConfig::default()
        },
        control_target(cp.url(), &dir.0.join("spool-b")),
    )
    .await;
    let survived = call(&dropped, LUNA, "+15557770013", silence_mulaw(2_500)).await;
    assert!(!survived.closed_by_bridge);
    assert!(
        eventually(Duration::from_secs(5), || reported(&cp, "bistro_luna")
            .iter()
            .any(|c| c.model_sessions.len() == 2))
        .await
    );
    let report = reported(&cp, "bistro_luna")
        .into_iter()
        .find(|c| c.model_sessions.len() == 2)
        .unwrap();
    assert_eq!(report.model_sessions[0].end.as_deref(), Some("drop"));
    assert_eq!(report.model_sessions[1].end.as_deref(), Some("call_ended"));
    assert!(report.model_sessions[1].started_ms >= report.model_sessions[0].ended_ms.unwrap());
    assert_eq!(report.fallback, None);
    assert_eq!(report.end_reason, "twilio_stop");
    cp.stop().await;
}
