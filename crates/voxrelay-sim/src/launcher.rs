//! What the simulator needs from a bridge it runs inside its own process (`voxrelay demo`,
//! `bench --first-audio`, `bench --in-process`), stated here so the simulator does not depend
//! on the bridge crate (the bridge binary depends on the simulator, not the reverse).
//!
//! The binary implements [`BridgeLauncher`] with `voxrelay::http::Bridge` and passes it in.
//! The simulator says what to run ([`BridgeSettings`]: the models and the default provider, the
//! Twilio token its callers sign with, the agent's audio mode, voice and greeting, pre-warm, the
//! control plane, the call cap),
//! gets back a running bridge ([`InProcessBridge`]: its address; stopping it drains and returns
//! the figures the demo prints) and, for the first-audio probe, the bridge's own tenant lookup
//! ([`TenantLookups`]) so the lookup is timed as a call pays it.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use url::Url;
use voxrelay_core::control::signing::SigningKey;
use voxrelay_core::{AudioMode, Provider, Secret};

/// How the simulator wants the bridge configured; everything else is the bridge's default for a
/// local bridge (127.0.0.1, port 0, the admin listener on port 0 too).
#[derive(Clone, Debug)]
pub struct BridgeSettings {
    /// The realtime model's URL (`ws://` for the simulator's models) and the key sent to it:
    /// OpenAI Realtime's endpoint, the bridge's default provider.
    pub model_url: String,
    pub model_api_key: Secret,
    /// Which API the model at `model_url` speaks: the bridge's default provider and the
    /// fallback agent's.
    pub provider: Provider,
    /// Gemini Live's endpoint (the mock's `gemini_url`) when `provider` is OpenAI, dialled with
    /// the same key for tenants on Gemini; `None`: such tenants fall back.
    pub gemini_model_url: Option<String>,
    /// The fallback agent's voice; `None` keeps the provider's default.
    pub voice: Option<String>,
    /// The Twilio auth token the simulated callers sign with.
    pub twilio_auth_token: Secret,
    /// The fallback agent's audio mode.
    pub audio_mode: AudioMode,
    /// The fallback agent's greeting: `None` keeps the bridge's default, an empty string means
    /// no greeting (as `VOXRELAY_GREETING=`).
    pub greeting: Option<String>,
    /// Open the model session on the voice webhook (`VOXRELAY_PREWARM`).
    pub prewarm: bool,
    /// Look tenants up on this control plane and report calls to it.
    pub control_plane: Option<ControlPlaneAccess>,
    /// `VOXRELAY_MAX_CALLS`; `None` keeps the bridge's default.
    pub max_calls: Option<usize>,
    /// Record every call into this directory (`VOXRELAY_RECORD=1` with
    /// `VOXRELAY_RECORDING_DIR`); `None`: the bridge's default, off.
    pub record_dir: Option<PathBuf>,
}

impl BridgeSettings {
    /// A bridge on the model at `model_url`, signed for with `twilio_auth_token`, every other
    /// setting as a plain `voxrelay serve` would have it.
    pub fn new(model_url: String, model_api_key: Secret, twilio_auth_token: Secret) -> Self {
        Self {
            model_url,
            model_api_key,
            provider: Provider::OpenAi,
            gemini_model_url: None,
            voice: None,
            twilio_auth_token,
            audio_mode: AudioMode::default(),
            greeting: None,
            prewarm: true,
            control_plane: None,
            max_calls: None,
            record_dir: None,
        }
    }
}

/// A control plane the bridge should use.
#[derive(Clone, Debug)]
pub struct ControlPlaneAccess {
    pub url: Url,
    pub key: SigningKey,
    /// Where undeliverable reports wait (`VOXRELAY_REPORT_SPOOL_DIR`).
    pub report_spool_dir: PathBuf,
}

/// One of the bridge's latency histograms, summarised (bucket upper bounds, as `/metrics`).
#[derive(Clone, Copy, Debug, Default)]
pub struct LatencyFigures {
    pub count: u64,
    pub mean: Option<Duration>,
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
}

/// What a stopped bridge measured of itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct BridgeFigures {
    /// Twilio frame read → written to the model.
    pub uplink_added: LatencyFigures,
    /// Model delta read → written to Twilio.
    pub downlink_added: LatencyFigures,
    /// `speech_started` → `clear` written.
    pub barge_in_reaction: LatencyFigures,
    pub pacer_lateness: LatencyFigures,
    /// Calls still live when the drain began, and those the drain had to cancel.
    pub calls_at_drain: usize,
    pub calls_cancelled: usize,
}

/// Starts bridges inside this process.
pub trait BridgeLauncher: Sync {
    type Bridge: InProcessBridge;
    type Lookups: TenantLookups;

    /// Binds and starts a bridge; it serves until [`InProcessBridge::stop`].
    fn launch(
        &self,
        settings: BridgeSettings,
    ) -> impl Future<Output = std::io::Result<Self::Bridge>> + Send;

    /// The bridge's tenant lookup against `control`, on one pooled client, outside any bridge.
    fn tenant_lookups(&self, control: &ControlPlaneAccess) -> Result<Self::Lookups, String>;
}

/// A bridge started by a [`BridgeLauncher`].
pub trait InProcessBridge: Send {
    /// The public listener (webhooks and media streams).
    fn local_addr(&self) -> SocketAddr;

    /// The admin listener (`/metrics`).
    fn admin_addr(&self) -> SocketAddr;

    /// Stops accepting, lets live calls run on for at most `drain`, stops, and returns what the
    /// bridge measured over its life.
    fn stop(self, drain: Duration) -> impl Future<Output = BridgeFigures> + Send;
}

/// Which cache a timed lookup goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LookupCache {
    /// One cache kept across lookups, as in a running bridge.
    Shared,
    /// An empty cache: every lookup is a signed request (on the pool's warm connection).
    Empty,
}

/// The bridge's tenant directory, timed from outside.
pub trait TenantLookups: Sync {
    /// Resolves the dialled number `to`; `Err` names the context source when the lookup fell
    /// back to the default agent instead of finding the tenant.
    fn resolve(
        &self,
        cache: LookupCache,
        to: &str,
        from: &str,
        call_sid: &str,
    ) -> impl Future<Output = Result<(), &'static str>> + Send;
}
