//! Call set-up as a caller hears it: time from the stream's `start` to the first assistant
//! audio (the greeting), with the upstream session pre-warmed on the voice webhook and cold.
//!
//! Two in-process bridges (pre-warm on, pre-warm off) share one mock model whose handshake is
//! held for `model_connect` (the real service's TLS and handshake round trips, absent on
//! loopback); each gets `calls` signed calls through the full webhook → TwiML → stream path,
//! with `twilio_gap` between the webhook's answer and the stream's handshake (Twilio fetching
//! the TwiML and opening its WebSocket). Both parameters are printed with the result: the
//! saving pre-warm buys is at most `model_connect` plus session set-up, less the gap.

use std::time::Duration;

use serde::Serialize;
use url::Url;

use super::caller::{CallerConfig, place_call};
use super::harness::BenchError;
use super::results::Percentiles;
use crate::config::{AgentDefaults, BridgeConfig, UpstreamTarget};
use crate::http::Bridge;
use crate::upstream::mock::{MockConfig, MockRealtimeServer};
use crate::{AudioMode, Secret};

#[derive(Clone, Debug)]
pub struct FirstAudioOptions {
    pub calls: usize,
    pub model_connect: Duration,
    pub twilio_gap: Duration,
    pub audio_mode: AudioMode,
}

impl Default for FirstAudioOptions {
    fn default() -> Self {
        Self {
            calls: 10,
            model_connect: Duration::from_millis(300),
            twilio_gap: Duration::from_millis(200),
            audio_mode: AudioMode::Pcmu,
        }
    }
}

/// Start → first assistant audio, in microseconds.
#[derive(Clone, Debug, Serialize)]
pub struct FirstAudioResult {
    pub calls: usize,
    pub model_connect_ms: f64,
    pub twilio_gap_ms: f64,
    pub prewarm_us: Percentiles,
    pub cold_us: Percentiles,
    /// Calls that heard no greeting (counted as failures, not as latencies).
    pub no_audio: usize,
}

pub async fn run(options: &FirstAudioOptions) -> Result<FirstAudioResult, BenchError> {
    let mock = MockRealtimeServer::start(MockConfig {
        connect_delay: options.model_connect,
        greeting_ms: 200,
        ..MockConfig::default()
    })
    .await
    .map_err(BenchError::Model)?;
    let mut no_audio = 0;
    let mut measure = async |prewarm: bool| -> Result<Percentiles, BenchError> {
        let token = Secret::new(format!("{:032x}", rand::random::<u128>()));
        let config = BridgeConfig {
            agent: AgentDefaults {
                audio_mode: options.audio_mode,
                greeting: Some("Hello.".to_owned()),
                ..AgentDefaults::default()
            },
            prewarm,
            ..BridgeConfig::local(
                token.clone(),
                UpstreamTarget {
                    url: mock.url(),
                    api_key: Some(Secret::new("bench")),
                },
            )
        };
        let bridge = Bridge::start(&config)
            .await
            .map_err(|e| BenchError::Bridge(e.to_string()))?;
        let url = Url::parse(&format!("http://{}", bridge.local_addr()))
            .map_err(|e| BenchError::Bridge(e.to_string()))?;
        let mut samples = Vec::with_capacity(options.calls);
        for _ in 0..options.calls {
            let caller = CallerConfig {
                linger: options.model_connect + Duration::from_millis(600),
                twilio_gap: options.twilio_gap,
                ..CallerConfig::new(url.clone(), token.clone(), vec![0xFF; 160])
            };
            let report = place_call(&caller)
                .await
                .map_err(|e| BenchError::Bridge(e.to_string()))?;
            match report.first_audio_after_start {
                Some(after) => samples.push(after.as_secs_f64() * 1e6),
                None => no_audio += 1,
            }
        }
        bridge.drain_and_stop(Duration::from_secs(2)).await;
        Ok(Percentiles::of(&mut samples))
    };
    let prewarm_us = measure(true).await?;
    let cold_us = measure(false).await?;
    Ok(FirstAudioResult {
        calls: options.calls,
        model_connect_ms: options.model_connect.as_secs_f64() * 1e3,
        twilio_gap_ms: options.twilio_gap.as_secs_f64() * 1e3,
        prewarm_us,
        cold_us,
        no_audio,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn prewarm_shortens_the_wait_for_the_greeting() {
        let result = run(&FirstAudioOptions {
            calls: 2,
            model_connect: Duration::from_millis(150),
            twilio_gap: Duration::from_millis(200),
            audio_mode: AudioMode::Pcmu,
        })
        .await
        .expect("probe");
        assert_eq!(result.no_audio, 0);
        assert_eq!(result.prewarm_us.count, 2);
        // Cold start waits out the model's 150 ms handshake; pre-warm did it during the gap.
        assert!(result.cold_us.p50 >= 150_000.0, "{result:?}");
        assert!(result.prewarm_us.max < result.cold_us.p50, "{result:?}");
    }
}
