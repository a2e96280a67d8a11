//! `voxrelay demo`: a bridge on embedded defaults, the mock model, and a few simulated
//! calls through them, all in one process on 127.0.0.1, with a short report.
//!
//! Each caller stays quiet for a moment (the agent's greeting starts), then speaks over the
//! greeting (a barge-in: Twilio `clear`, model-side truncate), pauses (the mock model answers
//! by echoing the utterance), and listens to the answer before hanging up.

use std::fmt::Write as _;
use std::time::Duration;

use url::Url;

use super::SPEECH_FIXTURE;
use super::caller::{CallReport, CallerConfig, place_call};
use crate::config::{AgentDefaults, BridgeConfig, UpstreamTarget};
use crate::http::Bridge;
use crate::session::metrics::Metrics;
use crate::upstream::mock::{MockConfig, MockRealtimeServer, MockSessionRecord};
use crate::{AudioMode, Secret};

#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub calls: usize,
    pub audio_mode: AudioMode,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            calls: 3,
            audio_mode: AudioMode::Pcmu,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("could not start the mock model: {0}")]
    Mock(std::io::Error),
    #[error("could not start the bridge: {0}")]
    Bridge(std::io::Error),
}

pub struct DemoReport {
    pub calls: Vec<Result<CallReport, String>>,
    pub mock_sessions: Vec<MockSessionRecord>,
    pub text: String,
}

/// The caller's side of a demo call: silence, speech over the greeting, then listening.
pub fn demo_caller_audio() -> Vec<u8> {
    let mut audio = vec![0xFF; 8 * 600];
    audio.extend_from_slice(SPEECH_FIXTURE);
    audio
}

pub async fn run_demo(options: &DemoOptions) -> Result<DemoReport, DemoError> {
    let mock = MockRealtimeServer::start(MockConfig::default())
        .await
        .map_err(DemoError::Mock)?;
    let token = Secret::new(format!("{:032x}", rand::random::<u128>()));
    let config = BridgeConfig {
        agent: AgentDefaults {
            audio_mode: options.audio_mode,
            ..AgentDefaults::default()
        },
        ..BridgeConfig::local(
            token.clone(),
            UpstreamTarget {
                url: mock.url(),
                api_key: Some(Secret::new("voxrelay-demo")),
            },
        )
    };
    let bridge = Bridge::start(&config).await.map_err(DemoError::Bridge)?;
    let bridge_url =
        Url::parse(&format!("http://{}", bridge.local_addr())).expect("socket address URL");
    tracing::info!(bridge = %bridge_url, model = %mock.url(), calls = options.calls, mode = %options.audio_mode, "demo: placing simulated calls");

    let audio = demo_caller_audio();
    let mut calls = Vec::with_capacity(options.calls);
    for index in 0..options.calls {
        let mut caller = CallerConfig::new(bridge_url.clone(), token.clone(), audio.clone());
        caller.linger = Duration::from_millis(5_500);
        caller.from = format!("+1555010{:04}", index);
        // A digit mid-call shows DTMF reaching the model.
        caller.dtmf = vec![(Duration::from_millis(9_000), '1')];
        calls.push(tokio::spawn(async move {
            // Stagger the calls a little, as real ones would be.
            tokio::time::sleep(Duration::from_millis(150 * index as u64)).await;
            place_call(&caller).await.map_err(|e| e.to_string())
        }));
    }
    let mut reports = Vec::with_capacity(calls.len());
    for call in calls {
        reports.push(call.await.unwrap_or_else(|e| Err(e.to_string())));
    }
    let metrics = std::sync::Arc::clone(bridge.metrics());
    let drained = bridge.drain_and_stop(Duration::from_secs(5)).await;
    let sessions = mock.log().sessions();
    mock.shutdown();
    let mut text = render(&reports, &sessions, &metrics, options);
    let _ = writeln!(
        text,
        "drain: {} calls live at shutdown, {} cancelled",
        drained.calls_at_start, drained.calls_cancelled
    );
    Ok(DemoReport {
        calls: reports,
        mock_sessions: sessions,
        text,
    })
}

fn ms(duration: Option<Duration>) -> String {
    duration.map_or_else(
        || "-".to_owned(),
        |d| format!("{:.0} ms", d.as_secs_f64() * 1e3),
    )
}

fn us(duration: Option<Duration>) -> String {
    match duration {
        Some(Duration::MAX) => "> 5 s".to_owned(),
        Some(d) => format!("{} µs", d.as_micros()),
        None => "-".to_owned(),
    }
}

fn render(
    reports: &[Result<CallReport, String>],
    sessions: &[MockSessionRecord],
    metrics: &Metrics,
    options: &DemoOptions,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nvoxrelay demo: {} simulated calls, audio mode {}\n",
        reports.len(),
        options.audio_mode
    );
    let _ = writeln!(
        out,
        "{:<4} {:>8} {:>10} {:>10} {:>12} {:>8} {:>7} {:>9}",
        "call", "sent", "received", "played", "1st audio", "clears", "marks", "closed by"
    );
    for (index, report) in reports.iter().enumerate() {
        match report {
            Ok(r) => {
                let _ = writeln!(
                    out,
                    "{:<4} {:>7.1}s {:>9.1}s {:>9.1}s {:>12} {:>8} {:>3}/{:<3} {:>9}",
                    index + 1,
                    r.frames_sent as f64 * 0.02,
                    r.audio_received_seconds(),
                    r.audio_played_ms as f64 / 1e3,
                    ms(r.first_audio_after_start),
                    r.clears_received,
                    r.marks_echoed,
                    r.marks_received,
                    if r.closed_by_bridge {
                        "bridge"
                    } else {
                        "caller"
                    },
                );
            }
            Err(error) => {
                let _ = writeln!(out, "{:<4} failed: {error}", index + 1);
            }
        }
    }
    let truncates: usize = sessions.iter().map(|s| s.truncates.len()).sum();
    let deletes: usize = sessions.iter().map(|s| s.deletes.len()).sum();
    let texts: usize = sessions.iter().map(|s| s.user_texts.len()).sum();
    let _ = writeln!(
        out,
        "\nmodel side (mock): {} sessions, {} truncates {:?}, {} deletes, {} DTMF notes",
        sessions.len(),
        truncates,
        sessions
            .iter()
            .flat_map(|s| s.truncates.iter().map(|(_, ms)| *ms))
            .collect::<Vec<_>>(),
        deletes,
        texts
    );
    let _ = writeln!(
        out,
        "bridge-added latency (write completed − read; bucket upper bounds):\n  uplink   Twilio frame → model: n={:<6} mean {:>8}  p50 ≤ {:>8}  p99 ≤ {:>8}\n  downlink model delta → Twilio: n={:<6} mean {:>8}  p50 ≤ {:>8}  p99 ≤ {:>8}\n  barge-in speech_started → clear: n={:<4} mean {:>8}\n  pacer wake-up lateness:          n={:<6} mean {:>8}  p99 ≤ {:>8}",
        metrics.uplink_added.count(),
        us(metrics.uplink_added.mean()),
        us(metrics.uplink_added.quantile_upper_bound(0.5)),
        us(metrics.uplink_added.quantile_upper_bound(0.99)),
        metrics.downlink_added.count(),
        us(metrics.downlink_added.mean()),
        us(metrics.downlink_added.quantile_upper_bound(0.5)),
        us(metrics.downlink_added.quantile_upper_bound(0.99)),
        metrics.barge_in_reaction.count(),
        us(metrics.barge_in_reaction.mean()),
        metrics.pacer_lateness.count(),
        us(metrics.pacer_lateness.mean()),
        us(metrics.pacer_lateness.quantile_upper_bound(0.99)),
    );
    out
}
