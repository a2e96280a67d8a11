//! Bridge configuration, read once at start-up.
//!
//! Every knob comes from an environment variable or the command-line flag that mirrors it,
//! both declared once, in [`RawConfig`] (`voxrelay serve --help`), is validated here
//! ([`BridgeConfig::from_raw`]), and is passed down as plain values: no globals. Secrets are
//! held as [`Secret`] so a `{:?}` of the configuration never prints them.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use url::{Host, Url};

use crate::control::signing::SigningKey;
use crate::session::continuity::ContinuityConfig;
use crate::twilio::ids::is_account_sid;
use crate::upstream::connect::ModelDial;
use crate::{AudioMode, Provider, Secret};

/// The default OpenAI Realtime endpoint (GA protocol).
pub const DEFAULT_OPENAI_URL: &str = "wss://api.openai.com/v1/realtime?model=gpt-realtime";
/// Gemini Live's endpoint (the Gemini API, v1beta); the key goes in `x-goog-api-key`.
pub const DEFAULT_GEMINI_URL: &str = "wss://generativelanguage.googleapis.com/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent";
pub const DEFAULT_VOICE: &str = "marin";
pub const DEFAULT_INSTRUCTIONS: &str = "You are a friendly, concise voice assistant answering a phone call. \
Speak naturally and keep answers short; the caller is on a phone line.";
pub const DEFAULT_GREETING: &str = "Hello! Thanks for calling. How can I help you today?";

pub use voxrelay_core::twilio::MAX_TWILIO_MESSAGE_BYTES;
/// A Media Streams socket that sends no `start` within this closes.
pub const START_TIMEOUT: Duration = Duration::from_secs(5);

/// Defaults for the control plane (see `docs/control-plane-api.md`): each is defined once,
/// beside the code it bounds, and named here under the configuration's names.
pub use crate::control::directory::{
    DEFAULT_BUDGET as DEFAULT_LOOKUP_BUDGET,
    DEFAULT_STALE_WHILE_REVALIDATE as DEFAULT_CONTEXT_STALE, DEFAULT_TTL as DEFAULT_CONTEXT_TTL,
};
pub use crate::control::reports::{
    DEFAULT_RESEND_INTERVAL as DEFAULT_REPORT_RESEND, DEFAULT_RETRY_WINDOW as DEFAULT_REPORT_RETRY,
};
pub const DEFAULT_REPORT_SPOOL_DIR: &str = "voxrelay-spool";
/// A pre-warmed session nobody claims is closed this long after it is ready. Twilio opens
/// the stream within a second or two of receiving TwiML; this leaves room for slow networks.
pub const DEFAULT_PREWARM_UNCLAIMED: Duration = Duration::from_secs(15);
/// Pre-warmed model sessions open at once (connecting, or ready and waiting for their stream):
/// a tenth of the 200 calls one bridge core held in the benchmark. A session is waited on for
/// about a second (Twilio fetching the TwiML and opening the stream), so at 200 calls of two
/// minutes about two are in flight; 20 absorbs a tenfold burst. Each one is a paid model
/// session the webhook opens before any stream proves the call is real, so this also bounds
/// what replayed webhooks can spend at once. Beyond it calls start cold (about one model
/// handshake slower to greet), counted in `voxrelay_prewarm_capped_total`.
pub const DEFAULT_MAX_PREWARMS: usize = 20;
/// The most `VOXRELAY_MAX_PREWARMS` may be: far above any real need, and small enough that
/// the semaphore holding them cannot overflow.
pub const MAX_PREWARMS_LIMIT: usize = 10_000;

/// Where `/metrics` is served unless `VOXRELAY_ADMIN_LISTEN` says otherwise: loopback, so a
/// fresh install never publishes its metrics.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9091";
/// Where the public listener binds unless `VOXRELAY_LISTEN` says otherwise.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// How long a call may try to open a model session (at its start, or after losing one)
/// before it falls back (`VOXRELAY_MODEL_RECONNECT_MS`).
pub const DEFAULT_MODEL_RECONNECT: Duration = Duration::from_millis(3000);
/// Silence after which a caller waiting for a model session hears the hold prompt
/// (`VOXRELAY_HOLD_PROMPT_AFTER_MS`).
pub const DEFAULT_HOLD_PROMPT_AFTER: Duration = Duration::from_millis(700);
/// A model that sends nothing, not even the pong to our ping, for this long is a lost session
/// (`VOXRELAY_MODEL_IDLE_MS`).
pub const DEFAULT_MODEL_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A model session older than this is renewed, make-before-break, at a silent moment
/// (`VOXRELAY_MODEL_SESSION_MAX_SECONDS`): OpenAI Realtime ends every session at 60 minutes,
/// and this leaves five to find the moment (the switch is forced two minutes after the
/// standby is ready).
pub const DEFAULT_MODEL_SESSION_MAX: Duration = Duration::from_secs(3300);
/// Sessions one call may lose and replace; one more loss is the fallback.
pub const MAX_MODEL_RECONNECTS: u32 = 5;
/// The built-in hold prompt (8 kHz μ-law; see `voxrelay_core::codec::chime`).
pub const BUILTIN_HOLD_PROMPT: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/hold-prompt-8k-mulaw.raw"
));
/// Concurrent calls per bridge. `voxrelay bench` held 200 `pcmu` calls on one core of the
/// 2-vCPU reference VM at the latency budget (p99 ≤ 2 ms each way, no late frames; 300 did
/// not); 80% of that leaves headroom for what the bench does not do (TLS to the real model,
/// control-plane traffic, bursts of call set-up). `pcm16` held 100: set about 80 there.
pub const DEFAULT_MAX_CALLS: usize = 160;
/// Connections that have not yet had a request pass Twilio's signature check. Honest ones
/// hold a slot for milliseconds (a webhook verifies in its first request, a stream in its
/// handshake), health checks for one request: this allows a burst of that many call
/// set-ups at once, while a peer that only opens sockets holds at most this many, each for at
/// most the header timeout.
pub const DEFAULT_MAX_UNVERIFIED_CONNECTIONS: usize = 128;
/// A request head (or, on a kept-alive connection, the next one) must arrive within this.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection none of whose requests has passed a signature check is closed this long after
/// it was accepted, however busy: health checks and honest clients reconnect, while a peer
/// sending unsigned requests just under the header timeout cannot hold an unverified slot
/// for ever.
pub const DEFAULT_UNVERIFIED_LIFETIME: Duration = Duration::from_secs(30);
/// A webhook body must arrive in full within this of its head.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Twilio's webhooks are a few hundred bytes of form fields; a body over this is refused (413).
pub const MAX_WEBHOOK_BODY_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "VOXRELAY_RECORD=1, but this build cannot record calls: build with `--features opus` \
         (it links libopus), or set VOXRELAY_RECORD=0"
    )]
    RecordingUnavailable,
    /// `VOXRELAY_MODEL_CA_FILE` could not be read or holds no usable certificate.
    #[error("VOXRELAY_MODEL_CA_FILE: {0}")]
    BadModelCa(#[from] crate::upstream::connect::ModelCaError),
    #[error(
        "TWILIO_AUTH_TOKEN is not set: the bridge refuses to start without it, because every webhook and \
         media stream is checked against Twilio's signature (use `voxrelay demo` to try it locally)"
    )]
    MissingAuthToken,
    #[error(
        "VOXRELAY_PUBLIC_URL is not set: the bridge refuses to start without it, because Twilio's \
         signatures are checked against that origin and never against a request's Host header \
         (e.g. VOXRELAY_PUBLIC_URL=https://voice.example.com)"
    )]
    MissingPublicUrl,
    #[error(
        "VOXRELAY_PUBLIC_URL {0:?} is not an absolute http(s) origin such as https://voice.example.com"
    )]
    BadPublicUrl(String),
    #[error(
        "OPENAI_API_KEY is not set: the bridge refuses to start without it (pass --mock-model or \
         VOXRELAY_MOCK_MODEL=1 to answer calls with the built-in mock model instead)"
    )]
    MissingOpenAiKey,
    #[error("VOXRELAY_OPENAI_URL {0:?} is not a ws:// or wss:// URL")]
    BadUpstreamUrl(String),
    #[error(
        "GEMINI_API_KEY is not set but VOXRELAY_PROVIDER is gemini: the bridge refuses to start \
         without the default provider's key (or pass --mock-model)"
    )]
    MissingGeminiKey,
    #[error("VOXRELAY_GEMINI_URL {0:?} is not a wss:// URL (ws:// only to a loopback host)")]
    BadGeminiUrl(String),
    #[error(
        "VOXRELAY_OPENAI_URL {0:?} is plain ws:// to a host that is not loopback: the API key \
         would cross the network in clear (use wss://)"
    )]
    PlaintextUpstream(String),
    #[error("VOXRELAY_PLAYBACK_LEAD_MS must be between 20 and 1000, got {0}")]
    BadLead(u64),
    #[error("VOXRELAY_CONTROL_PLANE_URL {0:?} is not an http(s) URL")]
    BadControlPlaneUrl(String),
    #[error(
        "VOXRELAY_CONTROL_PLANE_URL {0:?} is plain http:// to a public address: call reports and \
         tenant contexts would cross the network in clear (use https://, or a loopback, private \
         or *.internal address)"
    )]
    PlaintextControlPlane(String),
    #[error(
        "VOXRELAY_CONTROL_PLANE_URL is set, so VOXRELAY_CONTROL_PLANE_KEY_ID and \
         VOXRELAY_CONTROL_PLANE_SECRET must be too (every request to it is signed)"
    )]
    MissingControlPlaneKey,
    #[error("VOXRELAY_CONTEXT_BUDGET_MS must be between 10 and 5000, got {0}")]
    BadLookupBudget(u64),
    #[error("VOXRELAY_TWILIO_ACCOUNT_SID {0:?} is not an account SID (AC and 32 hex digits)")]
    BadAccountSid(String),
    #[error("VOXRELAY_MAX_PREWARMS must be at most {MAX_PREWARMS_LIMIT}, got {0}")]
    BadMaxPrewarms(usize),
    #[error("{0} must be at least 1")]
    ZeroLimit(&'static str),
    #[error("{name} must be between {min} and {max}, got {value}")]
    OutOfRange {
        name: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
}

/// `value` (ms) if within `min..=max`, else the error naming `name`.
fn ms_in_range(
    name: &'static str,
    value: Option<u64>,
    default: Duration,
    min: u64,
    max: u64,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(value) if (min..=max).contains(&value) => Ok(Duration::from_millis(value)),
        Some(value) => Err(ConfigError::OutOfRange {
            name,
            value,
            min,
            max,
        }),
    }
}

/// The origin Twilio reaches the bridge at: every signature is checked against URLs on it and
/// every URL in the TwiML is built on it. Never taken from a request's `Host` or
/// `X-Forwarded-*` headers, which whoever sends the request chooses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublicUrl {
    /// A configured origin (`VOXRELAY_PUBLIC_URL`): the only kind `serve` accepts.
    Origin(Url),
    /// `http://` and the address the bridge bound, known once it has bound (port 0 picks
    /// one): for bridges only peers on the same host call — the demo, the benchmark, tests.
    Listener,
}

impl PublicUrl {
    /// The origin, given the address the bridge bound.
    pub fn resolve(&self, bound: SocketAddr) -> Url {
        match self {
            PublicUrl::Origin(url) => url.clone(),
            PublicUrl::Listener => {
                // A wildcard bind is reached on loopback by the local peers this is for.
                let ip = match bound.ip() {
                    IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::from([127, 0, 0, 1]),
                    IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::from([0, 0, 0, 0, 0, 0, 0, 1]),
                    ip => ip,
                };
                let origin = format!("http://{}", SocketAddr::new(ip, bound.port()));
                Url::parse(&origin).expect("a socket address makes a valid origin")
            }
        }
    }
}

/// Everything `voxrelay serve` needs.
#[derive(Clone, Debug)]
pub struct BridgeConfig {
    pub listen: SocketAddr,
    pub public_url: PublicUrl,
    pub twilio_auth_token: Secret,
    /// When set, webhooks and streams from any other Twilio account are refused.
    pub twilio_account_sid: Option<String>,
    /// Where each provider's sessions are dialled, and which answers by default.
    pub models: ModelTargets,
    /// Extra trust anchors for the model connection (`VOXRELAY_MODEL_CA_FILE`), read and
    /// checked here. The binary hands them to [`crate::upstream::connect::trust_model_ca`]
    /// before the bridge starts: the model's TLS roots are built once per process.
    pub model_ca: Option<crate::upstream::connect::ModelCa>,
    /// Calls go to the built-in mock model (asked for explicitly; `upstream` is then unused).
    pub mock_model: bool,
    pub agent: AgentDefaults,
    pub playback_lead: Duration,
    pub drain: Duration,
    /// Without one every call gets [`BridgeConfig::agent`].
    pub control_plane: Option<ControlPlaneTarget>,
    /// Open and configure the upstream session on the voice webhook.
    pub prewarm: bool,
    pub prewarm_unclaimed_after: Duration,
    /// Pre-warmed sessions open at once; beyond it calls start cold.
    pub max_prewarms: usize,
    /// Refuse streams whose TwiML did not come from our webhook (no binding token). On by
    /// default (`VOXRELAY_REQUIRE_STREAM_TOKEN=0` turns it off; such streams then get the
    /// fallback agent, never a tenant).
    pub require_stream_token: bool,
    /// `FLY_MACHINE_ID` on Fly.io: put in stream URLs so upgrades replay to this machine.
    pub fly_machine_id: Option<String>,
    /// The private listener for `/metrics` (and health): never exposed to the internet.
    pub admin_listen: SocketAddr,
    /// Caps and timeouts of the public listener.
    pub limits: ListenerLimits,
    /// How calls keep (and replace) their model session.
    pub continuity: ContinuitySettings,
    /// Whether calls are recorded, and where (`VOXRELAY_RECORD`, `VOXRELAY_RECORDING_DIR`).
    pub recording: crate::recording::RecordingSettings,
}

/// How calls keep their model session: the bridge-wide part of each call's
/// [`ContinuityConfig`].
#[derive(Clone, Debug)]
pub struct ContinuitySettings {
    pub reconnect_budget: Duration,
    pub hold_after: Duration,
    pub model_idle_timeout: Duration,
    pub hold_prompt: Arc<[u8]>,
    pub session_max: Duration,
}

impl Default for ContinuitySettings {
    fn default() -> Self {
        Self {
            reconnect_budget: DEFAULT_MODEL_RECONNECT,
            hold_after: DEFAULT_HOLD_PROMPT_AFTER,
            model_idle_timeout: DEFAULT_MODEL_IDLE_TIMEOUT,
            hold_prompt: Arc::from(BUILTIN_HOLD_PROMPT),
            session_max: DEFAULT_MODEL_SESSION_MAX,
        }
    }
}

impl ContinuitySettings {
    /// One call's configuration, with its own jitter seed so calls that lose their sessions
    /// together do not retry in step.
    pub fn for_call(&self) -> ContinuityConfig {
        use std::hash::BuildHasher as _;
        ContinuityConfig {
            reconnect_budget: self.reconnect_budget,
            max_reconnects: MAX_MODEL_RECONNECTS,
            connect_timeout: self.reconnect_budget,
            hold_after: self.hold_after,
            hold_prompt: Arc::clone(&self.hold_prompt),
            seed: std::collections::hash_map::RandomState::new().hash_one(0_u8),
            session_max: Some(self.session_max),
        }
    }
}

/// What the public listener allows: every cap is on state (calls, connections not yet
/// verified), never per address, because behind a proxy and from Twilio every call shares a
/// few addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Concurrent calls: a webhook answered and not yet claimed by its stream, or a media
    /// stream from its upgrade until its task ends (`VOXRELAY_MAX_CALLS`).
    pub max_calls: usize,
    /// Media streams that have not sent `start` yet (they close after `START_TIMEOUT`); they
    /// also count as calls. Beyond it a stream is refused before the upgrade.
    pub max_unstarted_streams: usize,
    /// Open connections on the public listener, upgraded streams included
    /// (`VOXRELAY_MAX_CONNECTIONS`).
    pub max_connections: usize,
    /// Connections none of whose requests has passed a signature check yet
    /// (`VOXRELAY_MAX_UNVERIFIED_CONNECTIONS`).
    pub max_unverified_connections: usize,
    /// For the next request head, on a new or an idle kept-alive connection.
    pub header_read_timeout: Duration,
    /// How long a connection may stay open without a request passing a signature check.
    pub unverified_lifetime: Duration,
    /// For a webhook's whole body, from its head.
    pub body_timeout: Duration,
    pub max_webhook_body: usize,
    /// How long a webhook's call slot waits for its stream before it is released.
    pub call_reservation: Duration,
}

impl ListenerLimits {
    /// The defaults for `max_calls` concurrent calls: half of them may be waiting for `start`
    /// at once (a real stream sends it within milliseconds of its handshake, so only a burst
    /// of call arrivals comes near; sockets that never start hold at most half), and the
    /// listener takes two connections per call (the stream, and its webhook or status
    /// callback) plus the unverified ones.
    pub fn for_calls(max_calls: usize) -> Self {
        let max_calls = max_calls.max(1);
        Self {
            max_calls,
            max_unstarted_streams: (max_calls / 2).max(4),
            max_connections: 2 * max_calls + DEFAULT_MAX_UNVERIFIED_CONNECTIONS,
            max_unverified_connections: DEFAULT_MAX_UNVERIFIED_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            unverified_lifetime: DEFAULT_UNVERIFIED_LIFETIME,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            max_webhook_body: MAX_WEBHOOK_BODY_BYTES,
            call_reservation: DEFAULT_PREWARM_UNCLAIMED,
        }
    }
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self::for_calls(DEFAULT_MAX_CALLS)
    }
}

/// The control plane the bridge asks for tenant contexts, tools and call reports.
#[derive(Clone, Debug)]
pub struct ControlPlaneTarget {
    pub url: Url,
    pub key: SigningKey,
    /// How long a call's set-up may wait for its context before the fallback agent answers.
    pub lookup_budget: Duration,
    pub context_ttl: Duration,
    /// How long past its TTL a context may still be served while it is refreshed.
    pub context_stale: Duration,
    pub report_spool_dir: PathBuf,
    /// How long a report is retried before it is spooled to disk.
    pub report_retry: Duration,
    /// How often spooled reports are offered to the control plane again (and once at start).
    pub report_resend: Duration,
}

impl ControlPlaneTarget {
    /// `url` signed with `key`, every other setting at its default.
    pub fn new(url: Url, key: SigningKey, report_spool_dir: PathBuf) -> Self {
        Self {
            url,
            key,
            lookup_budget: DEFAULT_LOOKUP_BUDGET,
            context_ttl: DEFAULT_CONTEXT_TTL,
            context_stale: DEFAULT_CONTEXT_STALE,
            report_spool_dir,
            report_retry: DEFAULT_REPORT_RETRY,
            report_resend: DEFAULT_REPORT_RESEND,
        }
    }
}

/// Where one provider's model is.
#[derive(Clone, Debug)]
pub struct UpstreamTarget {
    pub url: String,
    /// `None`: the handshake carries no key (a local mock in tests).
    pub api_key: Option<Secret>,
}

/// Every provider this bridge can dial, and the one calls get when their tenant names none
/// (`VOXRELAY_PROVIDER`). A provider without a target has no key here: a tenant on it gets
/// its fallback (`provider_not_configured`), never another provider's voice.
#[derive(Clone, Debug)]
pub struct ModelTargets {
    pub default_provider: Provider,
    /// OpenAI Realtime's endpoint (its `?model=` is replaced by a tenant's model).
    pub openai: Option<UpstreamTarget>,
    /// Gemini Live's endpoint.
    pub gemini: Option<UpstreamTarget>,
}

impl ModelTargets {
    /// OpenAI only, by default: what tests and the local bridge start from.
    pub fn openai(target: UpstreamTarget) -> Self {
        Self {
            default_provider: Provider::OpenAi,
            openai: Some(target),
            gemini: None,
        }
    }

    /// What to dial for a session on `provider` running `model` (`None`: the endpoint's own
    /// default), or `None` when this bridge has no key for the provider.
    pub fn dial(&self, provider: Provider, model: Option<&str>) -> Option<ModelDial> {
        match provider {
            Provider::OpenAi => {
                let target = self.openai.as_ref()?;
                Some(ModelDial {
                    provider,
                    url: with_model_query(&target.url, model),
                    api_key: target.api_key.clone(),
                })
            }
            Provider::Gemini => {
                let target = self.gemini.as_ref()?;
                Some(ModelDial {
                    provider,
                    url: target.url.clone(),
                    api_key: target.api_key.clone(),
                })
            }
        }
    }
}

/// `url` with its `model` query parameter set to `model` (OpenAI chooses the model by URL).
fn with_model_query(url: &str, model: Option<&str>) -> String {
    let Some(model) = model.filter(|model| !model.trim().is_empty()) else {
        return url.to_owned();
    };
    let Ok(mut parsed) = Url::parse(url) else {
        return url.to_owned();
    };
    let kept: Vec<(String, String)> = parsed
        .query_pairs()
        .filter(|(key, _)| key != "model")
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect();
    parsed
        .query_pairs_mut()
        .clear()
        .extend_pairs(kept)
        .append_pair("model", model);
    parsed.into()
}

/// The agent every call gets until a control plane supplies one per tenant.
#[derive(Clone, Debug)]
pub struct AgentDefaults {
    pub voice: String,
    pub instructions: String,
    pub greeting: Option<String>,
    pub audio_mode: AudioMode,
    /// `VOXRELAY_PROVIDER`: the provider of calls whose tenant names none.
    pub provider: Provider,
}

impl Default for AgentDefaults {
    fn default() -> Self {
        Self {
            provider: Provider::OpenAi,
            voice: DEFAULT_VOICE.to_owned(),
            instructions: DEFAULT_INSTRUCTIONS.to_owned(),
            greeting: Some(DEFAULT_GREETING.to_owned()),
            audio_mode: AudioMode::Pcmu,
        }
    }
}

/// `voxrelay serve`'s flags and environment variables (`voxrelay serve --help`), as given,
/// before validation: [`BridgeConfig::from_raw`] checks them. `Default` is "nothing given",
/// which tests start from; clap fills `listen` and `admin_listen` with their defaults.
#[derive(Clone, Default, clap::Args)]
pub struct RawConfig {
    /// Address to listen on.
    #[arg(long, env = "VOXRELAY_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: Option<SocketAddr>,
    /// Public https origin Twilio reaches (required): builds the wss:// stream URL, and every
    /// signature is checked against it (never against a request's Host header).
    #[arg(long, env = "VOXRELAY_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Twilio auth token (required): verifies X-Twilio-Signature.
    #[arg(long, env = "TWILIO_AUTH_TOKEN", hide_env_values = true)]
    pub twilio_auth_token: Option<String>,
    /// Twilio account SID (AC…): when set, webhooks and media streams from any other account
    /// are refused.
    #[arg(long, env = "VOXRELAY_TWILIO_ACCOUNT_SID")]
    pub twilio_account_sid: Option<String>,
    /// OpenAI API key (required unless --mock-model).
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub openai_api_key: Option<String>,
    /// Answer calls with the built-in mock realtime model instead of OpenAI (1); for trying the
    /// bridge without a key, never for production.
    #[arg(long, env = "VOXRELAY_MOCK_MODEL", value_parser = parse_flag, num_args = 0..=1, default_missing_value = "1")]
    pub mock_model: Option<bool>,
    /// Realtime endpoint, including ?model=.
    #[arg(long, env = "VOXRELAY_OPENAI_URL")]
    pub openai_url: Option<String>,
    /// The realtime provider of calls whose tenant names none: openai (default) or gemini. Its
    /// key is required; the other provider is used only by tenants that name it, and only when
    /// its key is set.
    #[arg(long, env = "VOXRELAY_PROVIDER")]
    pub provider: Option<Provider>,
    /// Gemini API key (required when the provider is gemini; else it enables gemini tenants).
    #[arg(long, env = "GEMINI_API_KEY", hide_env_values = true)]
    pub gemini_api_key: Option<String>,
    /// Gemini Live endpoint (the BidiGenerateContent WebSocket); for tests and proxies.
    #[arg(long, env = "VOXRELAY_GEMINI_URL")]
    pub gemini_url: Option<String>,
    /// A PEM file of CA certificates the model connection trusts besides the webpki roots
    /// (a private CA in front of the model; the benchmark's `--model-tls`).
    #[arg(long, env = "VOXRELAY_MODEL_CA_FILE")]
    pub model_ca_file: Option<PathBuf>,
    /// pcmu (μ-law passthrough) or pcm16 (PCM16 24 kHz to the model).
    #[arg(long, env = "VOXRELAY_AUDIO_MODE")]
    pub audio_mode: Option<AudioMode>,
    #[arg(long, env = "VOXRELAY_VOICE")]
    pub voice: Option<String>,
    #[arg(long, env = "VOXRELAY_INSTRUCTIONS")]
    pub instructions: Option<String>,
    /// What the agent says first; set it empty for no greeting.
    #[arg(long, env = "VOXRELAY_GREETING")]
    pub greeting: Option<String>,
    /// How far ahead of real time assistant audio is sent to Twilio, in ms.
    #[arg(long, env = "VOXRELAY_PLAYBACK_LEAD_MS")]
    pub playback_lead_ms: Option<u64>,
    /// On SIGTERM, how long live calls may run on before they are closed.
    #[arg(long, env = "VOXRELAY_DRAIN_SECONDS")]
    pub drain_seconds: Option<u64>,
    /// Control plane base URL (http or https); without it every call gets the agent above.
    #[arg(long, env = "VOXRELAY_CONTROL_PLANE_URL")]
    pub control_plane_url: Option<String>,
    /// Id of the key that signs control-plane requests.
    #[arg(long, env = "VOXRELAY_CONTROL_PLANE_KEY_ID")]
    pub control_plane_key_id: Option<String>,
    /// Secret of that key.
    #[arg(long, env = "VOXRELAY_CONTROL_PLANE_SECRET", hide_env_values = true)]
    pub control_plane_secret: Option<String>,
    /// How long a call may wait for its tenant's context before the fallback agent answers, in ms.
    #[arg(long, env = "VOXRELAY_CONTEXT_BUDGET_MS")]
    pub context_budget_ms: Option<u64>,
    /// How long a fetched context is fresh, in seconds.
    #[arg(long, env = "VOXRELAY_CONTEXT_TTL_SECONDS")]
    pub context_ttl_seconds: Option<u64>,
    /// How long past its TTL a context is still served while it is refreshed, in seconds.
    #[arg(long, env = "VOXRELAY_CONTEXT_STALE_SECONDS")]
    pub context_stale_seconds: Option<u64>,
    /// Where undeliverable call reports wait for the control plane (resent at start).
    #[arg(long, env = "VOXRELAY_REPORT_SPOOL_DIR")]
    pub report_spool_dir: Option<PathBuf>,
    /// How long a call report is retried before it is spooled, in seconds.
    #[arg(long, env = "VOXRELAY_REPORT_RETRY_SECONDS")]
    pub report_retry_seconds: Option<u64>,
    /// How often spooled reports are sent again, in seconds (also once at start).
    #[arg(long, env = "VOXRELAY_REPORT_RESEND_SECONDS")]
    pub report_resend_seconds: Option<u64>,
    /// Open and configure the model session on the voice webhook (1) or on stream start (0).
    #[arg(long, env = "VOXRELAY_PREWARM", value_parser = parse_flag)]
    pub prewarm: Option<bool>,
    /// Close a pre-warmed session no stream claimed after this many ms.
    #[arg(long, env = "VOXRELAY_PREWARM_UNCLAIMED_MS")]
    pub prewarm_unclaimed_ms: Option<u64>,
    /// Pre-warmed model sessions open at once (default 20); beyond it calls start cold.
    #[arg(long, env = "VOXRELAY_MAX_PREWARMS")]
    pub max_prewarms: Option<usize>,
    /// Refuse media streams whose TwiML did not come from this bridge's webhook: 1 (the
    /// default) or 0 (such streams are answered by the fallback agent, never a tenant's).
    #[arg(long, env = "VOXRELAY_REQUIRE_STREAM_TOKEN", value_parser = parse_flag)]
    pub require_stream_token: Option<bool>,
    /// Set by Fly.io: stream URLs carry it so an upgrade is replayed to the pre-warming machine.
    #[arg(long, env = "FLY_MACHINE_ID")]
    pub fly_machine_id: Option<String>,
    /// Private listener for /metrics (and /healthz, /readyz); never expose it publicly.
    #[arg(long, env = "VOXRELAY_ADMIN_LISTEN", default_value = DEFAULT_ADMIN_LISTEN)]
    pub admin_listen: Option<SocketAddr>,
    /// How long a call may try to open a model session (at its start or after losing one)
    /// before the caller gets the fallback, in ms (default 3000).
    #[arg(long, env = "VOXRELAY_MODEL_RECONNECT_MS")]
    pub model_reconnect_ms: Option<u64>,
    /// Silence after which a caller waiting for a model session hears the hold prompt, in ms
    /// (default 700).
    #[arg(long, env = "VOXRELAY_HOLD_PROMPT_AFTER_MS")]
    pub hold_prompt_after_ms: Option<u64>,
    /// A model silent this long (no event, no pong to our ping) is a lost session, in ms
    /// (default 10000).
    #[arg(long, env = "VOXRELAY_MODEL_IDLE_MS")]
    pub model_idle_ms: Option<u64>,
    /// Renew a model session (make-before-break, at a silent moment) once it is this old, in
    /// seconds (default 3300, under OpenAI Realtime's 60-minute session limit).
    #[arg(long, env = "VOXRELAY_MODEL_SESSION_MAX_SECONDS")]
    pub model_session_max_seconds: Option<u64>,
    /// Concurrent calls; beyond it the webhook answers a busy message and streams get 503.
    #[arg(long, env = "VOXRELAY_MAX_CALLS")]
    pub max_calls: Option<usize>,
    /// Open connections on the public listener (default: 2 × max calls + the unverified cap).
    #[arg(long, env = "VOXRELAY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Public connections that have not yet passed a Twilio signature check (default 128).
    #[arg(long, env = "VOXRELAY_MAX_UNVERIFIED_CONNECTIONS")]
    pub max_unverified_connections: Option<usize>,
    /// Record calls (1) or not (0, the default) when their tenant does not say; needs a build
    /// with the `opus` feature.
    #[arg(long, env = "VOXRELAY_RECORD", value_parser = parse_flag)]
    pub record: Option<bool>,
    /// Where call recordings go (created 0700; default `recordings`, relative to the working
    /// directory).
    #[arg(long, env = "VOXRELAY_RECORDING_DIR")]
    pub recording_dir: Option<PathBuf>,
}

/// `1`/`0`, `true`/`false`, `yes`/`no`, `on`/`off`.
fn parse_flag(value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        other => Err(format!("expected 1 or 0, got {other:?}")),
    }
}

impl BridgeConfig {
    pub fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        let recording = recording_from_raw(&raw)?;
        let control_plane = control_plane_from_raw(&raw)?;
        let prewarm_unclaimed_after = raw
            .prewarm_unclaimed_ms
            .map_or(DEFAULT_PREWARM_UNCLAIMED, Duration::from_millis);
        let limits = limits_from_raw(&raw, prewarm_unclaimed_after)?;
        let token = raw
            .twilio_auth_token
            .filter(|t| !t.trim().is_empty())
            .ok_or(ConfigError::MissingAuthToken)?;
        let public_url = raw
            .public_url
            .filter(|u| !u.trim().is_empty())
            .ok_or(ConfigError::MissingPublicUrl)
            .and_then(|u| parse_public_url(&u))?;
        let twilio_account_sid = raw
            .twilio_account_sid
            .map(|sid| sid.trim().to_owned())
            .filter(|sid| !sid.is_empty());
        if let Some(sid) = &twilio_account_sid {
            if !is_account_sid(sid) {
                return Err(ConfigError::BadAccountSid(sid.clone()));
            }
        }
        let mock_model = raw.mock_model.unwrap_or(false);
        let provider = raw.provider.unwrap_or_default();
        let upstream_url = raw
            .openai_url
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_OPENAI_URL.to_owned());
        let parsed_upstream = match Url::parse(&upstream_url) {
            Ok(u) if matches!(u.scheme(), "ws" | "wss") => u,
            _ => return Err(ConfigError::BadUpstreamUrl(upstream_url)),
        };
        // The mock model needs no key, and the key is never sent to it.
        let openai_key = raw.openai_api_key.filter(|k| !k.trim().is_empty());
        let openai = if mock_model {
            Some(None)
        } else {
            match openai_key {
                Some(key) => {
                    if parsed_upstream.scheme() == "ws" && !is_loopback_host(&parsed_upstream) {
                        return Err(ConfigError::PlaintextUpstream(upstream_url));
                    }
                    Some(Some(Secret::new(key)))
                }
                None if provider == Provider::OpenAi => {
                    return Err(ConfigError::MissingOpenAiKey);
                }
                None => None,
            }
        };
        let gemini_url = raw
            .gemini_url
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_GEMINI_URL.to_owned());
        // Plain ws:// would carry the key in clear: only to a loopback proxy or test server.
        match Url::parse(&gemini_url) {
            Ok(u) if u.scheme() == "wss" || (u.scheme() == "ws" && is_loopback_host(&u)) => {}
            _ => return Err(ConfigError::BadGeminiUrl(gemini_url)),
        }
        let gemini_key = raw.gemini_api_key.filter(|k| !k.trim().is_empty());
        let gemini = if mock_model {
            Some(None)
        } else {
            match gemini_key {
                Some(key) => Some(Some(Secret::new(key))),
                None if provider == Provider::Gemini => return Err(ConfigError::MissingGeminiKey),
                None => None,
            }
        };

        let model_ca = raw
            .model_ca_file
            .filter(|path| !path.as_os_str().is_empty())
            .map(|path| crate::upstream::connect::ModelCa::from_pem_file(&path))
            .transpose()?;
        let max_prewarms = raw.max_prewarms.unwrap_or(DEFAULT_MAX_PREWARMS);
        if max_prewarms > MAX_PREWARMS_LIMIT {
            return Err(ConfigError::BadMaxPrewarms(max_prewarms));
        }
        let continuity = ContinuitySettings {
            reconnect_budget: ms_in_range(
                "VOXRELAY_MODEL_RECONNECT_MS",
                raw.model_reconnect_ms,
                DEFAULT_MODEL_RECONNECT,
                100,
                60_000,
            )?,
            hold_after: ms_in_range(
                "VOXRELAY_HOLD_PROMPT_AFTER_MS",
                raw.hold_prompt_after_ms,
                DEFAULT_HOLD_PROMPT_AFTER,
                0,
                60_000,
            )?,
            // Above the ping's 2 s, so a quiet but live model always has the time to pong.
            model_idle_timeout: ms_in_range(
                "VOXRELAY_MODEL_IDLE_MS",
                raw.model_idle_ms,
                DEFAULT_MODEL_IDLE_TIMEOUT,
                3_000,
                600_000,
            )?,
            session_max: Duration::from_secs(match raw.model_session_max_seconds {
                None => DEFAULT_MODEL_SESSION_MAX.as_secs(),
                Some(seconds) if (5..=86_400).contains(&seconds) => seconds,
                Some(value) => {
                    return Err(ConfigError::OutOfRange {
                        name: "VOXRELAY_MODEL_SESSION_MAX_SECONDS",
                        value,
                        min: 5,
                        max: 86_400,
                    });
                }
            }),
            ..ContinuitySettings::default()
        };
        let lead_ms = raw.playback_lead_ms.unwrap_or(120);
        if !(20..=1000).contains(&lead_ms) {
            return Err(ConfigError::BadLead(lead_ms));
        }
        let defaults = AgentDefaults::default();
        Ok(Self {
            listen: raw.listen.unwrap_or_else(default_listen),
            public_url: PublicUrl::Origin(public_url),
            twilio_auth_token: Secret::new(token),
            twilio_account_sid,
            models: ModelTargets {
                default_provider: provider,
                openai: openai.map(|api_key| UpstreamTarget {
                    url: upstream_url,
                    api_key,
                }),
                gemini: gemini.map(|api_key| UpstreamTarget {
                    url: gemini_url,
                    api_key,
                }),
            },
            model_ca,
            mock_model,
            agent: AgentDefaults {
                provider,
                // Voice names are the provider's own.
                voice: raw
                    .voice
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| provider.default_voice().to_owned()),
                instructions: raw
                    .instructions
                    .filter(|v| !v.is_empty())
                    .unwrap_or(defaults.instructions),
                // An explicitly empty greeting turns the greeting off.
                greeting: match raw.greeting {
                    Some(g) if g.trim().is_empty() => None,
                    Some(g) => Some(g),
                    None => defaults.greeting,
                },
                audio_mode: raw.audio_mode.unwrap_or_default(),
            },
            playback_lead: Duration::from_millis(lead_ms),
            drain: Duration::from_secs(raw.drain_seconds.unwrap_or(30)),
            control_plane,
            prewarm: raw.prewarm.unwrap_or(true),
            prewarm_unclaimed_after,
            max_prewarms,
            // Secure by default: a stream must prove it is the call its webhook answered.
            require_stream_token: raw.require_stream_token.unwrap_or(true),
            fly_machine_id: raw.fly_machine_id.filter(|id| !id.trim().is_empty()),
            admin_listen: raw.admin_listen.unwrap_or_else(default_admin_listen),
            limits,
            continuity,
            recording,
        })
    }
}

impl BridgeConfig {
    /// A bridge on a loopback port with every optional feature at its default and no control
    /// plane: for the demo, the bench harness and tests, which then adjust what they need. Its
    /// public URL is the address it binds ([`PublicUrl::Listener`]).
    /// Unlike `serve`'s default, streams without a binding token are let through (as the
    /// fallback agent), since tests and benchmarks script raw streams.
    pub fn local(twilio_auth_token: Secret, upstream: UpstreamTarget) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            public_url: PublicUrl::Listener,
            twilio_auth_token,
            twilio_account_sid: None,
            models: ModelTargets::openai(upstream),
            model_ca: None,
            mock_model: false,
            agent: AgentDefaults::default(),
            playback_lead: Duration::from_millis(120),
            drain: Duration::from_secs(5),
            control_plane: None,
            prewarm: true,
            prewarm_unclaimed_after: DEFAULT_PREWARM_UNCLAIMED,
            max_prewarms: DEFAULT_MAX_PREWARMS,
            require_stream_token: false,
            fly_machine_id: None,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            limits: ListenerLimits::default(),
            continuity: ContinuitySettings::default(),
            recording: crate::recording::RecordingSettings::default(),
        }
    }
}

/// `VOXRELAY_RECORD` and `VOXRELAY_RECORDING_DIR`; recording by default on a build that
/// cannot record is refused here, so the bridge does not start.
fn recording_from_raw(raw: &RawConfig) -> Result<crate::recording::RecordingSettings, ConfigError> {
    let record_by_default = raw.record.unwrap_or(false);
    if record_by_default && !crate::recording::AVAILABLE {
        return Err(ConfigError::RecordingUnavailable);
    }
    let defaults = crate::recording::RecordingSettings::default();
    Ok(crate::recording::RecordingSettings {
        record_by_default,
        dir: raw
            .recording_dir
            .clone()
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or(defaults.dir),
    })
}

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN
        .parse()
        .expect("the default listen address parses")
}

fn default_admin_listen() -> SocketAddr {
    DEFAULT_ADMIN_LISTEN
        .parse()
        .expect("the default admin address parses")
}

/// The listener's limits: derived from `VOXRELAY_MAX_CALLS`, each connection cap overridable.
fn limits_from_raw(
    raw: &RawConfig,
    call_reservation: Duration,
) -> Result<ListenerLimits, ConfigError> {
    let positive = |value: Option<usize>, name| match value {
        Some(0) => Err(ConfigError::ZeroLimit(name)),
        other => Ok(other),
    };
    let max_calls = positive(raw.max_calls, "VOXRELAY_MAX_CALLS")?.unwrap_or(DEFAULT_MAX_CALLS);
    let mut limits = ListenerLimits::for_calls(max_calls);
    if let Some(unverified) = positive(
        raw.max_unverified_connections,
        "VOXRELAY_MAX_UNVERIFIED_CONNECTIONS",
    )? {
        limits.max_unverified_connections = unverified;
        limits.max_connections = 2 * max_calls + unverified;
    }
    if let Some(connections) = positive(raw.max_connections, "VOXRELAY_MAX_CONNECTIONS")? {
        limits.max_connections = connections;
    }
    limits.call_reservation = call_reservation;
    Ok(limits)
}

fn control_plane_from_raw(raw: &RawConfig) -> Result<Option<ControlPlaneTarget>, ConfigError> {
    let Some(url) = raw
        .control_plane_url
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty())
    else {
        return Ok(None);
    };
    let parsed = Url::parse(url).map_err(|_| ConfigError::BadControlPlaneUrl(url.to_owned()))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(ConfigError::BadControlPlaneUrl(url.to_owned()));
    }
    if parsed.scheme() == "http" && !is_private_host(&parsed) {
        return Err(ConfigError::PlaintextControlPlane(url.to_owned()));
    }
    let key_id = raw
        .control_plane_key_id
        .as_deref()
        .map(str::trim)
        .filter(|k| !k.is_empty());
    let secret = raw
        .control_plane_secret
        .as_deref()
        .filter(|s| !s.is_empty());
    let (Some(key_id), Some(secret)) = (key_id, secret) else {
        return Err(ConfigError::MissingControlPlaneKey);
    };
    let budget_ms = raw
        .context_budget_ms
        .unwrap_or(DEFAULT_LOOKUP_BUDGET.as_millis() as u64);
    if !(10..=5000).contains(&budget_ms) {
        return Err(ConfigError::BadLookupBudget(budget_ms));
    }
    Ok(Some(ControlPlaneTarget {
        url: parsed,
        key: SigningKey::new(key_id, Secret::new(secret)),
        lookup_budget: Duration::from_millis(budget_ms),
        context_ttl: raw
            .context_ttl_seconds
            .map_or(DEFAULT_CONTEXT_TTL, Duration::from_secs),
        context_stale: raw
            .context_stale_seconds
            .map_or(DEFAULT_CONTEXT_STALE, Duration::from_secs),
        report_spool_dir: raw
            .report_spool_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_REPORT_SPOOL_DIR)),
        report_retry: raw
            .report_retry_seconds
            .map_or(DEFAULT_REPORT_RETRY, Duration::from_secs),
        report_resend: raw
            .report_resend_seconds
            .filter(|&seconds| seconds > 0)
            .map_or(DEFAULT_REPORT_RESEND, Duration::from_secs),
    }))
}

/// `localhost` or a loopback address: traffic that never leaves the machine.
fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        Some(Host::Domain(name)) => name.trim_end_matches('.').eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// Loopback, or an address only a private network routes: 10/8, 172.16/12, 192.168/16,
/// IPv6 unique-local fc00::/7 (Fly.io's 6PN is fdaa::/16), or a `*.internal` name (Fly.io's
/// private DNS). Plain http to these stays inside the operator's network.
fn is_private_host(url: &Url) -> bool {
    match url.host() {
        Some(Host::Ipv4(ip)) => ip.is_loopback() || ip.is_private(),
        Some(Host::Ipv6(ip)) => ip.is_loopback() || (ip.segments()[0] & 0xfe00) == 0xfc00,
        Some(Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".internal")
        }
        None => false,
    }
}

fn parse_public_url(value: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(value.trim()).map_err(|_| ConfigError::BadPublicUrl(value.to_owned()))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ConfigError::BadPublicUrl(value.to_owned()));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The least `serve` starts with: an auth token, a public URL and an API key.
    fn raw_with_token() -> RawConfig {
        RawConfig {
            twilio_auth_token: Some("token".into()),
            public_url: Some("https://voice.example.com".into()),
            openai_api_key: Some("sk-test".into()),
            ..RawConfig::default()
        }
    }

    /// `voxrelay serve` as clap sees it: `RawConfig` is the subcommand's whole argument list.
    #[derive(clap::Parser)]
    struct Serve {
        #[command(flatten)]
        raw: RawConfig,
    }

    fn parse_flags(args: &[&str]) -> Result<RawConfig, clap::Error> {
        use clap::Parser;
        Serve::try_parse_from(std::iter::once("serve").chain(args.iter().copied()))
            .map(|serve| serve.raw)
    }

    #[test]
    fn recording_is_off_by_default_and_refused_at_start_on_a_build_that_cannot_record() {
        let config = BridgeConfig::from_raw(raw_with_token()).expect("valid");
        assert!(!config.recording.record_by_default);
        assert_eq!(
            config.recording.dir,
            PathBuf::from(crate::recording::DEFAULT_RECORDING_DIR)
        );
        let raw = parse_flags(&["--record", "1", "--recording-dir", "/var/lib/voxrelay/rec"])
            .expect("flags");
        let asked = RawConfig {
            twilio_auth_token: Some("token".into()),
            public_url: Some("https://voice.example.com".into()),
            openai_api_key: Some("sk-test".into()),
            ..raw
        };
        let result = BridgeConfig::from_raw(asked);
        if crate::recording::AVAILABLE {
            let config = result.expect("a build with opus records");
            assert!(config.recording.record_by_default);
            assert_eq!(config.recording.dir, PathBuf::from("/var/lib/voxrelay/rec"));
        } else {
            let error = result.expect_err("a build without opus refuses to start");
            assert!(matches!(error, ConfigError::RecordingUnavailable));
            assert!(error.to_string().contains("--features opus"), "{error}");
        }
        // A tenant may still ask; the bridge itself does not record by default.
        let off = RawConfig {
            record: Some(false),
            ..raw_with_token()
        };
        assert!(BridgeConfig::from_raw(off).is_ok());
    }

    #[test]
    fn flags_fill_the_raw_config_and_the_listeners_have_their_defaults() {
        use clap::CommandFactory;
        Serve::command().debug_assert();
        let raw = parse_flags(&[
            "--twilio-auth-token",
            "token",
            "--public-url",
            "https://voice.example.com",
            "--mock-model",
            "--prewarm",
            "off",
            "--max-calls",
            "40",
        ])
        .expect("valid flags");
        assert_eq!(raw.mock_model, Some(true));
        assert_eq!(raw.prewarm, Some(false));
        let config = BridgeConfig::from_raw(raw).expect("valid config");
        assert_eq!(config.listen, default_listen());
        assert_eq!(config.admin_listen, default_admin_listen());
        assert!(config.mock_model && !config.prewarm);
        assert_eq!(config.limits.max_calls, 40);
        assert!(parse_flags(&["--prewarm", "maybe"]).is_err());
    }

    #[test]
    fn refuses_to_start_without_an_auth_token() {
        assert!(matches!(
            BridgeConfig::from_raw(RawConfig::default()),
            Err(ConfigError::MissingAuthToken)
        ));
        let blank = RawConfig {
            twilio_auth_token: Some("  ".into()),
            ..RawConfig::default()
        };
        assert!(matches!(
            BridgeConfig::from_raw(blank),
            Err(ConfigError::MissingAuthToken)
        ));
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = BridgeConfig::from_raw(raw_with_token()).unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(
            config.models.openai.as_ref().unwrap().url,
            DEFAULT_OPENAI_URL
        );
        assert_eq!(
            config
                .models
                .openai
                .as_ref()
                .unwrap()
                .api_key
                .as_ref()
                .unwrap()
                .expose(),
            "sk-test"
        );
        assert!(!config.mock_model);
        assert_eq!(
            config.public_url,
            PublicUrl::Origin(Url::parse("https://voice.example.com").unwrap())
        );
        assert_eq!(config.twilio_account_sid, None);
        assert_eq!(config.max_prewarms, DEFAULT_MAX_PREWARMS);
        assert_eq!(config.agent.audio_mode, AudioMode::Pcmu);
        assert_eq!(config.drain, Duration::from_secs(30));
        assert_eq!(config.agent.greeting.as_deref(), Some(DEFAULT_GREETING));
    }

    #[test]
    fn listener_limits_default_from_max_calls_and_refuse_zero() {
        let config = BridgeConfig::from_raw(raw_with_token()).unwrap();
        assert_eq!(config.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN);
        let limits = &config.limits;
        assert_eq!(limits.max_calls, 160);
        assert_eq!(limits.max_unstarted_streams, 80);
        assert_eq!(limits.max_unverified_connections, 128);
        assert_eq!(limits.max_connections, 2 * 160 + 128);
        assert_eq!(limits.header_read_timeout, Duration::from_secs(10));
        assert_eq!(limits.unverified_lifetime, Duration::from_secs(30));
        assert_eq!(limits.body_timeout, Duration::from_secs(10));
        assert_eq!(limits.max_webhook_body, 64 * 1024);
        let raised = BridgeConfig::from_raw(RawConfig {
            max_calls: Some(400),
            max_unverified_connections: Some(32),
            admin_listen: Some("[::]:9091".parse().unwrap()),
            ..raw_with_token()
        })
        .unwrap();
        assert_eq!(raised.limits.max_connections, 2 * 400 + 32);
        assert_eq!(raised.limits.max_unstarted_streams, 200);
        assert_eq!(raised.admin_listen.to_string(), "[::]:9091");
        let explicit = BridgeConfig::from_raw(RawConfig {
            max_connections: Some(50),
            ..raw_with_token()
        })
        .unwrap();
        assert_eq!(explicit.limits.max_connections, 50);
        for zero in [
            RawConfig {
                max_calls: Some(0),
                ..raw_with_token()
            },
            RawConfig {
                max_connections: Some(0),
                ..raw_with_token()
            },
            RawConfig {
                max_unverified_connections: Some(0),
                ..raw_with_token()
            },
        ] {
            assert!(matches!(
                BridgeConfig::from_raw(zero),
                Err(ConfigError::ZeroLimit(_))
            ));
        }
    }

    #[test]
    fn rejects_bad_urls_and_an_empty_greeting_turns_it_off() {
        let bad_public = RawConfig {
            public_url: Some("voice.example.com".into()),
            ..raw_with_token()
        };
        assert!(matches!(
            BridgeConfig::from_raw(bad_public),
            Err(ConfigError::BadPublicUrl(_))
        ));
        let bad_upstream = RawConfig {
            openai_url: Some("https://api.openai.com/v1/realtime".into()),
            ..raw_with_token()
        };
        assert!(matches!(
            BridgeConfig::from_raw(bad_upstream),
            Err(ConfigError::BadUpstreamUrl(_))
        ));
        let silent = RawConfig {
            greeting: Some(String::new()),
            ..raw_with_token()
        };
        assert_eq!(BridgeConfig::from_raw(silent).unwrap().agent.greeting, None);
    }

    #[test]
    fn debug_output_never_contains_secrets() {
        let raw = RawConfig {
            twilio_auth_token: Some("tw-secret-123".into()),
            public_url: Some("https://voice.example.com".into()),
            openai_api_key: Some("sk-secret-456".into()),
            control_plane_url: Some("http://cp.internal:9090".into()),
            control_plane_key_id: Some("k1".into()),
            control_plane_secret: Some("cp-secret-789".into()),
            ..RawConfig::default()
        };
        let printed = format!("{:?}", BridgeConfig::from_raw(raw).unwrap());
        assert!(!printed.contains("tw-secret-123") && !printed.contains("sk-secret-456"));
        assert!(!printed.contains("cp-secret-789"));
    }

    #[test]
    fn control_plane_is_off_without_a_url_and_needs_its_key_with_one() {
        let config = BridgeConfig::from_raw(raw_with_token()).unwrap();
        assert!(config.control_plane.is_none());
        assert!(config.prewarm && config.require_stream_token);
        let opted_out = RawConfig {
            require_stream_token: Some(false),
            ..raw_with_token()
        };
        assert!(
            !BridgeConfig::from_raw(opted_out)
                .unwrap()
                .require_stream_token
        );
        assert_eq!(config.fly_machine_id, None);
        let no_key = RawConfig {
            control_plane_url: Some("http://cp.internal".into()),
            ..raw_with_token()
        };
        assert!(matches!(
            BridgeConfig::from_raw(no_key),
            Err(ConfigError::MissingControlPlaneKey)
        ));
        let bad_url = RawConfig {
            control_plane_url: Some("cp.internal".into()),
            ..raw_with_token()
        };
        assert!(matches!(
            BridgeConfig::from_raw(bad_url),
            Err(ConfigError::BadControlPlaneUrl(_))
        ));
        let full = RawConfig {
            control_plane_url: Some("https://cp.internal/base".into()),
            control_plane_key_id: Some("k1".into()),
            control_plane_secret: Some("s".into()),
            context_budget_ms: Some(150),
            ..raw_with_token()
        };
        let target = BridgeConfig::from_raw(full).unwrap().control_plane.unwrap();
        assert_eq!(target.lookup_budget, Duration::from_millis(150));
        assert_eq!(target.context_ttl, DEFAULT_CONTEXT_TTL);
        assert_eq!(target.key.id, "k1");
        let slow = RawConfig {
            control_plane_url: Some("https://cp.internal".into()),
            control_plane_key_id: Some("k1".into()),
            control_plane_secret: Some("s".into()),
            context_budget_ms: Some(60_000),
            ..raw_with_token()
        };
        assert!(matches!(
            BridgeConfig::from_raw(slow),
            Err(ConfigError::BadLookupBudget(60_000))
        ));
    }

    #[test]
    fn refuses_to_start_without_a_public_url() {
        for missing in [None, Some("  ".to_owned())] {
            let raw = RawConfig {
                public_url: missing,
                ..raw_with_token()
            };
            assert!(matches!(
                BridgeConfig::from_raw(raw),
                Err(ConfigError::MissingPublicUrl)
            ));
        }
        let message = ConfigError::MissingPublicUrl.to_string();
        assert!(message.contains("VOXRELAY_PUBLIC_URL") && !message.contains('\n'));
    }

    #[test]
    fn the_listener_public_url_is_the_bound_address_on_loopback() {
        let bound: SocketAddr = "127.0.0.1:40123".parse().unwrap();
        assert_eq!(
            PublicUrl::Listener.resolve(bound).as_str(),
            "http://127.0.0.1:40123/"
        );
        let wildcard: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(
            PublicUrl::Listener.resolve(wildcard).as_str(),
            "http://127.0.0.1:8080/"
        );
        let origin = Url::parse("https://voice.example.com").unwrap();
        assert_eq!(PublicUrl::Origin(origin.clone()).resolve(bound), origin);
    }

    #[test]
    fn the_default_provider_needs_its_key_and_the_other_is_optional() {
        // OpenAI by default; Gemini tenants are served only when its key is set.
        let openai_only = BridgeConfig::from_raw(raw_with_token()).unwrap();
        assert_eq!(openai_only.models.default_provider, Provider::OpenAi);
        assert_eq!(openai_only.agent.voice, "marin");
        assert!(openai_only.models.gemini.is_none());
        assert!(openai_only.models.dial(Provider::Gemini, None).is_none());

        let gemini_without_key = RawConfig {
            provider: Some(Provider::Gemini),
            ..raw_with_token()
        };
        assert!(matches!(
            BridgeConfig::from_raw(gemini_without_key.clone()),
            Err(ConfigError::MissingGeminiKey)
        ));
        let gemini = BridgeConfig::from_raw(RawConfig {
            openai_api_key: None,
            gemini_api_key: Some("g-key".into()),
            ..gemini_without_key
        })
        .unwrap();
        assert_eq!(gemini.agent.provider, Provider::Gemini);
        assert_eq!(gemini.agent.voice, "Kore", "a Gemini voice by default");
        assert!(
            gemini.models.openai.is_none(),
            "no OpenAI key: OpenAI tenants fall back"
        );
        let dial = gemini.models.dial(Provider::Gemini, Some("x")).unwrap();
        assert_eq!(
            dial.url, DEFAULT_GEMINI_URL,
            "Gemini's model goes in its setup"
        );
        assert_eq!(dial.api_key.unwrap().expose(), "g-key");

        for bad in [
            "https://example.com",
            "ws://proxy.example.com/live",
            "not a url",
        ] {
            let result = BridgeConfig::from_raw(RawConfig {
                gemini_url: Some(bad.into()),
                gemini_api_key: Some("g-key".into()),
                ..raw_with_token()
            });
            assert!(matches!(result, Err(ConfigError::BadGeminiUrl(_))), "{bad}");
        }
        let local = BridgeConfig::from_raw(RawConfig {
            gemini_url: Some("ws://127.0.0.1:9/live".into()),
            gemini_api_key: Some("g-key".into()),
            ..raw_with_token()
        })
        .unwrap();
        assert_eq!(local.models.gemini.unwrap().url, "ws://127.0.0.1:9/live");
        let flags =
            parse_flags(&["--provider", "gemini", "--gemini-url", "wss://proxy/live"]).unwrap();
        assert_eq!(flags.provider, Some(Provider::Gemini));
        assert!(parse_flags(&["--provider", "anthropic"]).is_err());
    }

    #[test]
    fn a_tenants_openai_model_replaces_the_urls_model() {
        let targets = ModelTargets::openai(UpstreamTarget {
            url: "wss://api.openai.com/v1/realtime?model=gpt-realtime&x=1".into(),
            api_key: None,
        });
        let dial = targets
            .dial(Provider::OpenAi, Some("gpt-realtime-mini"))
            .unwrap();
        assert_eq!(
            dial.url,
            "wss://api.openai.com/v1/realtime?x=1&model=gpt-realtime-mini"
        );
        assert_eq!(
            targets.dial(Provider::OpenAi, None).unwrap().url,
            "wss://api.openai.com/v1/realtime?model=gpt-realtime&x=1"
        );
    }

    #[test]
    fn the_mock_model_must_be_asked_for() {
        let no_key = RawConfig {
            openai_api_key: None,
            ..raw_with_token()
        };
        assert!(matches!(
            BridgeConfig::from_raw(no_key.clone()),
            Err(ConfigError::MissingOpenAiKey)
        ));
        let blank_key = RawConfig {
            openai_api_key: Some(" ".into()),
            ..raw_with_token()
        };
        assert!(matches!(
            BridgeConfig::from_raw(blank_key),
            Err(ConfigError::MissingOpenAiKey)
        ));
        let mock = BridgeConfig::from_raw(RawConfig {
            mock_model: Some(true),
            ..no_key
        })
        .unwrap();
        assert!(mock.mock_model && mock.models.openai.as_ref().unwrap().api_key.is_none());
        // A key given alongside the mock is never sent anywhere.
        let mock_with_key = BridgeConfig::from_raw(RawConfig {
            mock_model: Some(true),
            ..raw_with_token()
        })
        .unwrap();
        assert!(
            mock_with_key
                .models
                .openai
                .as_ref()
                .unwrap()
                .api_key
                .is_none()
        );
    }

    #[test]
    fn the_api_key_never_travels_in_clear_beyond_loopback() {
        let with_url = |url: &str| {
            BridgeConfig::from_raw(RawConfig {
                openai_url: Some(url.into()),
                ..raw_with_token()
            })
        };
        for refused in [
            "ws://api.openai.com/v1/realtime",
            "ws://10.0.0.5:9000/v1/realtime",
            "ws://model.internal/v1/realtime",
            "ws://localhost.example.com/v1/realtime",
        ] {
            assert!(
                matches!(with_url(refused), Err(ConfigError::PlaintextUpstream(_))),
                "{refused}"
            );
        }
        for allowed in [
            "wss://api.openai.com/v1/realtime?model=gpt-realtime",
            "wss://10.0.0.5/v1/realtime",
            "ws://127.0.0.1:9000/v1/realtime",
            "ws://127.8.0.1:9000/v1/realtime",
            "ws://[::1]:9000/v1/realtime",
            "ws://localhost:9000/v1/realtime",
        ] {
            assert!(with_url(allowed).is_ok(), "{allowed}");
        }
        // The mock never gets the key, so any URL is fine with it.
        assert!(
            BridgeConfig::from_raw(RawConfig {
                openai_url: Some("ws://10.0.0.5:9000/v1/realtime".into()),
                mock_model: Some(true),
                ..raw_with_token()
            })
            .is_ok()
        );
    }

    #[test]
    fn a_plain_http_control_plane_must_be_private() {
        let with_url = |url: &str| {
            BridgeConfig::from_raw(RawConfig {
                control_plane_url: Some(url.into()),
                control_plane_key_id: Some("k1".into()),
                control_plane_secret: Some("s".into()),
                ..raw_with_token()
            })
        };
        for allowed in [
            "https://cp.example.com",
            "http://127.0.0.1:9090",
            "http://localhost:9090",
            "http://[::1]:9090",
            "http://10.1.2.3",
            "http://172.16.0.1",
            "http://172.31.255.254",
            "http://192.168.1.10:8080/base",
            "http://[fdaa:0:1:a7b:1::2]:9090",
            "http://[fc00::1]",
            "http://cp.internal:9090",
            "http://top1.nearest.of.cp.internal",
            "http://CP.INTERNAL",
        ] {
            assert!(with_url(allowed).is_ok(), "{allowed}");
        }
        for refused in [
            "http://cp.example.com",
            "http://8.8.8.8",
            "http://172.32.0.1",
            "http://192.169.0.1",
            "http://[2001:db8::1]",
            "http://[fe80::1]",
            "http://internal",
            "http://cp.internal.example.com",
            "http://169.254.169.254",
        ] {
            assert!(
                matches!(
                    with_url(refused),
                    Err(ConfigError::PlaintextControlPlane(_))
                ),
                "{refused}"
            );
        }
    }

    #[test]
    fn the_account_sid_and_prewarm_cap_are_checked() {
        let sid = "AC0123456789abcdef0123456789abcdef";
        let config = BridgeConfig::from_raw(RawConfig {
            twilio_account_sid: Some(format!(" {sid} ")),
            max_prewarms: Some(5),
            ..raw_with_token()
        })
        .unwrap();
        assert_eq!(config.twilio_account_sid.as_deref(), Some(sid));
        assert_eq!(config.max_prewarms, 5);
        let blank = BridgeConfig::from_raw(RawConfig {
            twilio_account_sid: Some(String::new()),
            ..raw_with_token()
        })
        .unwrap();
        assert_eq!(blank.twilio_account_sid, None);
        for bad in ["AC123", "CA0123456789abcdef0123456789abcdef"] {
            assert!(matches!(
                BridgeConfig::from_raw(RawConfig {
                    twilio_account_sid: Some(bad.into()),
                    ..raw_with_token()
                }),
                Err(ConfigError::BadAccountSid(_))
            ));
        }
        assert!(matches!(
            BridgeConfig::from_raw(RawConfig {
                max_prewarms: Some(MAX_PREWARMS_LIMIT + 1),
                ..raw_with_token()
            }),
            Err(ConfigError::BadMaxPrewarms(_))
        ));
    }

    #[test]
    fn every_refusal_is_one_line() {
        let errors = [
            ConfigError::MissingAuthToken,
            ConfigError::MissingPublicUrl,
            ConfigError::MissingOpenAiKey,
            ConfigError::PlaintextUpstream("ws://x".into()),
            ConfigError::PlaintextControlPlane("http://x".into()),
            ConfigError::BadAccountSid("x".into()),
            ConfigError::BadMaxPrewarms(1),
        ];
        for error in errors {
            assert!(!error.to_string().contains('\n'), "{error}");
        }
    }

    #[test]
    fn the_model_ca_file_is_read_at_start_and_a_bad_one_refused() {
        let dir =
            std::env::temp_dir().join(format!("voxrelay-config-ca-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("ca.pem");
        std::fs::write(&file, "not a certificate").expect("write");
        let raw = |path: Option<PathBuf>| RawConfig {
            twilio_auth_token: Some("token".into()),
            public_url: Some("https://voice.example.com".into()),
            openai_api_key: Some("sk".into()),
            model_ca_file: path,
            ..RawConfig::default()
        };
        assert!(
            BridgeConfig::from_raw(raw(None))
                .expect("valid")
                .model_ca
                .is_none()
        );
        match BridgeConfig::from_raw(raw(Some(file.clone()))) {
            Err(error @ ConfigError::BadModelCa(_)) => {
                assert!(
                    error.to_string().starts_with("VOXRELAY_MODEL_CA_FILE"),
                    "{error}"
                )
            }
            other => panic!("expected BadModelCa, got {other:?}"),
        }
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("ca");
        std::fs::write(&file, ca.cert.pem()).expect("write");
        let config = BridgeConfig::from_raw(raw(Some(file))).expect("valid");
        assert_eq!(config.model_ca.map(|ca| ca.len()), Some(1));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
