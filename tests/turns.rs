//! Turn timing against the benchmark's echo model: with its think time (the model delay) set,
//! the bridge's `model_ms` recovers it within one 20 ms frame, through real sockets on
//! 127.0.0.1, and the turn reaches `/metrics`.

mod common;

use std::time::Duration;

use common::*;
use voxrelay::config::{AgentDefaults, BridgeConfig, UpstreamTarget};
use voxrelay::http::Bridge;
use voxrelay::{AudioMode, Provider, Secret};
use voxrelay_sim::caller::{CallerConfig, place_call};
use voxrelay_sim::echo_model::{EchoModel, EchoModelConfig};
use voxrelay_sim::results::Epoch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_ms_recovers_the_echo_models_think_time_within_a_frame() {
    const THINK: Duration = Duration::from_millis(250);
    const FRAME: Duration = Duration::from_millis(20);
    let model = EchoModel::start(
        EchoModelConfig {
            model_delay: THINK,
            barge_in_every: None,
            ..EchoModelConfig::default()
        },
        Epoch::now(),
    )
    .await
    .expect("echo model");
    for mode in [AudioMode::Pcmu, AudioMode::Pcm16] {
        let config = BridgeConfig {
            agent: AgentDefaults {
                audio_mode: mode,
                greeting: None,
                ..AgentDefaults::default()
            },
            ..BridgeConfig::local(
                Secret::new(TOKEN),
                UpstreamTarget {
                    url: model.url().parse().unwrap(),
                    api_key: Some(Secret::new("test-key")),
                },
            )
        };
        let bridge = Bridge::start(&config).await.expect("bridge");
        let url = url::Url::parse(&format!("http://{}", bridge.local_addr())).unwrap();
        let caller = CallerConfig {
            linger: Duration::from_millis(600),
            ..CallerConfig::new(url, Secret::new(TOKEN), tone_mulaw(440.0, 400))
        };
        let heard = place_call(&caller).await.expect("call");
        assert!(
            !heard.audio_received.is_empty(),
            "{mode:?}: the echo was heard"
        );
        // A call's turns are recorded when it ends: the drain waits for that.
        let metrics = std::sync::Arc::clone(bridge.metrics());
        bridge.drain_and_stop(Duration::from_secs(2)).await;
        let series = metrics
            .turns
            .series("-", Provider::OpenAi)
            .expect("the fallback agent's turn series");
        assert_eq!(series.model.count(), 1, "{mode:?}: one turn");
        let model_time = series.model.mean().expect("timed");
        assert!(
            model_time.abs_diff(THINK) <= FRAME,
            "{mode:?}: model_ms {model_time:?} against a think time of {THINK:?}"
        );
        let voice_to_voice = series.voice_to_voice.mean().expect("heard");
        assert!(voice_to_voice >= model_time, "{mode:?}");
    }
    model.shutdown();
}
