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

use std::time::Instant;

use super::caller::{CallerConfig, place_call};
use super::harness::BenchError;
use super::results::Percentiles;
use crate::launcher::{
    BridgeLauncher, BridgeSettings, ControlPlaneAccess, InProcessBridge, LookupCache, TenantLookups,
};
use crate::mock::{MockConfig, MockRealtimeServer};
use voxrelay_control_plane::server::start_embedded;
use voxrelay_core::{AudioMode, Secret};

/// The seeded number the probe's calls dial.
const PROBE_NUMBER: &str = "+15550100001";
/// Direct lookups timed for the lookup rows.
pub const LOOKUPS: usize = 200;

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

/// Runs the probe against bridges `launcher` starts in this process.
pub async fn run(
    options: &FirstAudioOptions,
    launcher: &impl BridgeLauncher,
) -> Result<FirstAudioResult, BenchError> {
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
    let target = ControlPlaneAccess {
        url: control_plane.url(),
        key,
        report_spool_dir: spool.clone(),
    };
    let mut no_audio = 0;
    let mut measure = async |prewarm: bool,
                             control: Option<&ControlPlaneAccess>|
           -> Result<Percentiles, BenchError> {
        let token = Secret::new(format!("{:032x}", rand::random::<u128>()));
        let settings = BridgeSettings {
            audio_mode: options.audio_mode,
            greeting: Some("Hello.".to_owned()),
            prewarm,
            control_plane: control.cloned(),
            ..BridgeSettings::new(mock.url(), Secret::new("bench"), token.clone())
        };
        let bridge = launcher
            .launch(settings)
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
        bridge.stop(Duration::from_secs(2)).await;
        Ok(Percentiles::of(&mut samples))
    };
    let prewarm_us = measure(true, None).await?;
    let cold_us = measure(false, None).await?;
    let prewarm_control_plane_us = measure(true, Some(&target)).await?;
    let cold_control_plane_us = measure(false, Some(&target)).await?;
    let (lookup_miss_us, lookup_hit_us) = time_lookups(launcher, &target).await?;
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
    launcher: &impl BridgeLauncher,
    target: &ControlPlaneAccess,
) -> Result<(Percentiles, Percentiles), BenchError> {
    let lookups = launcher
        .tenant_lookups(target)
        .map_err(BenchError::Bridge)?;
    // Warms the connection pool and the cache.
    let _ = lookups
        .resolve(
            LookupCache::Shared,
            PROBE_NUMBER,
            "+15550009999",
            "CA0000000000000000000000000000a4a1",
        )
        .await;
    let mut miss = Vec::with_capacity(LOOKUPS);
    let mut hit = Vec::with_capacity(LOOKUPS);
    for index in 0..LOOKUPS {
        let call_sid = format!("CA100c{index:028x}");
        // An empty cache per lookup, so a signed request every time (on the pool's warm
        // connection, as in a running bridge).
        for (cache, samples) in [
            (LookupCache::Empty, &mut miss),
            (LookupCache::Shared, &mut hit),
        ] {
            let began = Instant::now();
            let resolution = lookups
                .resolve(cache, PROBE_NUMBER, "+15550009999", &call_sid)
                .await;
            samples.push(began.elapsed().as_secs_f64() * 1e6);
            if let Err(source) = resolution {
                return Err(BenchError::Bridge(format!(
                    "lookup of {PROBE_NUMBER} fell back ({source})"
                )));
            }
        }
    }
    let (miss, hit) = (Percentiles::of(&mut miss), Percentiles::of(&mut hit));
    Ok((miss, hit))
}
