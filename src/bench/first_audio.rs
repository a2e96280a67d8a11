//! Call set-up as a caller hears it: time from the stream's `start` to the first assistant
//! audio (the greeting), with the upstream session pre-warmed on the voice webhook and cold,
//! each without and with the control plane's tenant lookup; plus the lookup's own cost.
//!
//! In-process bridges (pre-warm on/off × control plane on/off) share one mock model whose
//! handshake is held for `model_connect` (the real service's TLS and handshake round trips,
//! absent on loopback) and one reference control plane on loopback (SQLite in memory, the
//! seeded tenants); each gets `calls` signed calls to a seeded number through the full webhook
//! → TwiML → stream path, with `twilio_gap` between the webhook's answer and the stream's
//! handshake (Twilio fetching the TwiML and opening its WebSocket). Both parameters are printed
//! with the result: the saving pre-warm buys is at most `model_connect` plus session set-up,
//! less the gap. The lookup is also timed directly (`TenantDirectory::resolve`, cache off, so
//! every call is a signed request to the control plane and a SQLite read): that is what a call
//! would wait if nothing overlapped it.

use std::time::Duration;

use serde::Serialize;
use url::Url;

use std::sync::Arc;
use std::time::Instant;

use super::caller::{CallerConfig, place_call};
use super::harness::BenchError;
use super::results::Percentiles;
use crate::config::{AgentDefaults, BridgeConfig, ControlPlaneTarget, UpstreamTarget};
use crate::control::client::{ControlPlaneClient, ControlPlaneSettings};
use crate::control::directory::{DirectorySettings, TenantDirectory};
use crate::control::server::start_embedded;
use crate::http::Bridge;
use crate::session::metrics::Metrics;
use crate::upstream::mock::{MockConfig, MockRealtimeServer};
use crate::{AudioMode, Secret};

/// The seeded number the probe's calls dial.
const PROBE_NUMBER: &str = "+15550100001";
/// Direct lookups timed for the lookup rows.
const LOOKUPS: usize = 200;

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
    /// Start → first audio, no control plane (every call gets the environment's agent).
    pub prewarm_us: Percentiles,
    pub cold_us: Percentiles,
    /// The same with the tenant looked up on the control plane (cache as deployed).
    pub prewarm_control_plane_us: Percentiles,
    pub cold_control_plane_us: Percentiles,
    /// One signed context request plus the control plane's SQLite read (cache off).
    pub lookup_miss_us: Percentiles,
    /// A lookup served from the bridge's cache.
    pub lookup_hit_us: Percentiles,
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
    let (control_plane, key) = start_embedded()
        .await
        .map_err(|e| BenchError::Bridge(format!("control plane: {e}")))?;
    let spool = std::env::temp_dir().join(format!("voxrelay-bench-spool-{}", std::process::id()));
    let target = ControlPlaneTarget::new(control_plane.url(), key, spool.clone());
    let mut no_audio = 0;
    let mut measure = async |prewarm: bool,
                             control: Option<&ControlPlaneTarget>|
           -> Result<Percentiles, BenchError> {
        let token = Secret::new(format!("{:032x}", rand::random::<u128>()));
        let config = BridgeConfig {
            agent: AgentDefaults {
                audio_mode: options.audio_mode,
                greeting: Some("Hello.".to_owned()),
                ..AgentDefaults::default()
            },
            prewarm,
            control_plane: control.cloned(),
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
                to: PROBE_NUMBER.to_owned(),
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
    let prewarm_us = measure(true, None).await?;
    let cold_us = measure(false, None).await?;
    let prewarm_control_plane_us = measure(true, Some(&target)).await?;
    let cold_control_plane_us = measure(false, Some(&target)).await?;
    let (lookup_miss_us, lookup_hit_us) = time_lookups(&target).await?;
    control_plane.stop().await;
    let _ = std::fs::remove_dir_all(&spool);
    Ok(FirstAudioResult {
        calls: options.calls,
        model_connect_ms: options.model_connect.as_secs_f64() * 1e3,
        twilio_gap_ms: options.twilio_gap.as_secs_f64() * 1e3,
        prewarm_us,
        cold_us,
        prewarm_control_plane_us,
        cold_control_plane_us,
        lookup_miss_us,
        lookup_hit_us,
        no_audio,
    })
}

/// `TenantDirectory::resolve` timed directly: with an empty cache (every lookup a signed
/// request and a SQLite read), and with the number cached.
async fn time_lookups(
    target: &ControlPlaneTarget,
) -> Result<(Percentiles, Percentiles), BenchError> {
    let metrics = Arc::new(Metrics::default());
    let client = ControlPlaneClient::new(
        ControlPlaneSettings::new(target.url.clone(), target.key.clone()),
        Arc::clone(&metrics),
    )
    .map_err(|e| BenchError::Bridge(e.to_string()))?;
    let directory = |settings| TenantDirectory::new(client.clone(), settings, Arc::clone(&metrics));
    let cached = directory(DirectorySettings::default());
    // Warms the connection pool and the cache.
    cached
        .resolve(
            PROBE_NUMBER,
            "+15550009999",
            "CA0000000000000000000000000000a4a1",
        )
        .await;
    let mut miss = Vec::with_capacity(LOOKUPS);
    let mut hit = Vec::with_capacity(LOOKUPS);
    for index in 0..LOOKUPS {
        let call_sid = format!("CA100c{index:028x}");
        // A directory of its own per lookup: an empty cache, so a signed request every time
        // (on the pool's warm connection, as in a running bridge).
        let cold = directory(DirectorySettings::default());
        for (directory, samples) in [(&cold, &mut miss), (&cached, &mut hit)] {
            let began = Instant::now();
            let resolution = directory
                .resolve(PROBE_NUMBER, "+15550009999", &call_sid)
                .await;
            samples.push(began.elapsed().as_secs_f64() * 1e6);
            if resolution.context.is_none() {
                return Err(BenchError::Bridge(format!(
                    "lookup of {PROBE_NUMBER} fell back ({})",
                    resolution.source.as_str()
                )));
            }
        }
    }
    let (miss, hit) = (Percentiles::of(&mut miss), Percentiles::of(&mut hit));
    Ok((miss, hit))
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
        assert_eq!(result.cold_control_plane_us.count, 2);
        assert_eq!(result.lookup_miss_us.count, LOOKUPS as u64);
        // Cold start waits out the model's 150 ms handshake; pre-warm did it during the gap.
        assert!(result.cold_us.p50 >= 150_000.0, "{result:?}");
        assert!(result.prewarm_us.max < result.cold_us.p50, "{result:?}");
    }
}
