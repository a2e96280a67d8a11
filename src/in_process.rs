//! The bridge as the simulator runs it inside its own process (`voxrelay demo`, `bench
//! --first-audio`, `bench --in-process`, and the tests that drive those runs).
//!
//! The simulator (`voxrelay-sim`) cannot depend on this crate, as this crate's binary depends
//! on it; it states what it needs in `voxrelay_sim::launcher`, and [`InProcessLauncher`] is the
//! one implementation: a [`Bridge`] on [`BridgeConfig::local`] with the simulator's settings
//! (its one model on the settings' provider, OpenAI or Gemini),
//! its figures read from the bridge's own [`Metrics`] when it stops, and the tenant lookup the
//! bridge's calls use ([`TenantDirectory`]) for the first-audio probe.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use voxrelay_sim::launcher::{
    BridgeFigures, BridgeLauncher, BridgeSettings, ControlPlaneAccess, InProcessBridge,
    LatencyFigures, LookupCache, TenantLookups,
};

use crate::config::{
    AgentDefaults, BridgeConfig, ControlPlaneTarget, ListenerLimits, ModelTargets, UpstreamTarget,
};
use crate::control::client::{ControlPlaneClient, ControlPlaneSettings};
use crate::control::directory::{DirectorySettings, TenantDirectory};
use crate::http::Bridge;
use crate::session::metrics::{Histogram, Metrics};
use voxrelay_core::Provider;

/// Starts [`Bridge`]s in this process for the simulator.
#[derive(Clone, Copy, Debug, Default)]
pub struct InProcessLauncher;

impl BridgeLauncher for InProcessLauncher {
    type Bridge = RunningBridge;
    type Lookups = DirectoryLookups;

    async fn launch(&self, settings: BridgeSettings) -> std::io::Result<RunningBridge> {
        let bridge = Bridge::start(&bridge_config(settings)).await?;
        Ok(RunningBridge(bridge))
    }

    fn tenant_lookups(&self, control: &ControlPlaneAccess) -> Result<DirectoryLookups, String> {
        let metrics = Arc::new(Metrics::default());
        let client = ControlPlaneClient::new(
            ControlPlaneSettings::new(control.url.clone(), control.key.clone()),
            Arc::clone(&metrics),
        )
        .map_err(|error| error.to_string())?;
        let shared = TenantDirectory::new(
            client.clone(),
            DirectorySettings::default(),
            Arc::clone(&metrics),
        );
        Ok(DirectoryLookups {
            client,
            shared,
            metrics,
        })
    }
}

/// The simulator's settings over a local bridge's defaults.
fn bridge_config(settings: BridgeSettings) -> BridgeConfig {
    let defaults = AgentDefaults::default();
    let greeting = match settings.greeting {
        None => defaults.greeting.clone(),
        Some(text) if text.is_empty() => None,
        Some(text) => Some(text),
    };
    let target = UpstreamTarget {
        url: settings.model_url,
        api_key: Some(settings.model_api_key.clone()),
    };
    let models = match settings.provider {
        // A Gemini tenant's calls dial the Gemini endpoint when there is one; without it they
        // get their fallback, as on a bridge with no Gemini key.
        Provider::OpenAi => ModelTargets {
            default_provider: Provider::OpenAi,
            openai: Some(target.clone()),
            gemini: settings.gemini_model_url.map(|url| UpstreamTarget {
                url,
                api_key: Some(settings.model_api_key),
            }),
        },
        // The one model the simulator runs speaks Gemini: the bridge dials only it.
        Provider::Gemini => ModelTargets {
            default_provider: Provider::Gemini,
            openai: None,
            gemini: Some(target.clone()),
        },
    };
    let local = BridgeConfig::local(settings.twilio_auth_token, target);
    BridgeConfig {
        models,
        agent: AgentDefaults {
            audio_mode: settings.audio_mode,
            greeting,
            provider: settings.provider,
            voice: settings
                .voice
                .unwrap_or_else(|| settings.provider.default_voice().to_owned()),
            ..defaults
        },
        prewarm: settings.prewarm,
        control_plane: settings.control_plane.map(|control| {
            ControlPlaneTarget::new(control.url, control.key, control.report_spool_dir)
        }),
        limits: settings
            .max_calls
            .map_or(local.limits, ListenerLimits::for_calls),
        recording: match settings.record_dir {
            Some(dir) => crate::recording::RecordingSettings {
                record_by_default: true,
                dir,
            },
            None => local.recording.clone(),
        },
        ..local
    }
}

/// A bridge the simulator started.
pub struct RunningBridge(Bridge);

impl InProcessBridge for RunningBridge {
    fn local_addr(&self) -> SocketAddr {
        self.0.local_addr()
    }

    fn admin_addr(&self) -> SocketAddr {
        self.0.admin_addr()
    }

    async fn stop(self, drain: Duration) -> BridgeFigures {
        let metrics = Arc::clone(self.0.metrics());
        let drained = self.0.drain_and_stop(drain).await;
        BridgeFigures {
            uplink_added: figures(&metrics.uplink_added),
            downlink_added: figures(&metrics.downlink_added),
            barge_in_reaction: figures(&metrics.barge_in_reaction),
            pacer_lateness: figures(&metrics.pacer_lateness),
            calls_at_drain: drained.calls_at_start,
            calls_cancelled: drained.calls_cancelled,
        }
    }
}

fn figures(histogram: &Histogram) -> LatencyFigures {
    LatencyFigures {
        count: histogram.count(),
        mean: histogram.mean(),
        p50: histogram.quantile_upper_bound(0.5),
        p99: histogram.quantile_upper_bound(0.99),
    }
}

/// The bridge's tenant directory on one pooled client: one directory whose cache is kept, and
/// a fresh one per uncached lookup.
pub struct DirectoryLookups {
    client: ControlPlaneClient,
    shared: TenantDirectory,
    metrics: Arc<Metrics>,
}

impl TenantLookups for DirectoryLookups {
    async fn resolve(
        &self,
        cache: LookupCache,
        to: &str,
        from: &str,
        call_sid: &str,
    ) -> Result<(), &'static str> {
        let resolution = match cache {
            LookupCache::Shared => self.shared.resolve(to, from, call_sid).await,
            LookupCache::Empty => {
                TenantDirectory::new(
                    self.client.clone(),
                    DirectorySettings::default(),
                    Arc::clone(&self.metrics),
                )
                .resolve(to, from, call_sid)
                .await
            }
        };
        match resolution.context {
            Some(_) => Ok(()),
            None => Err(resolution.source.as_str()),
        }
    }
}
