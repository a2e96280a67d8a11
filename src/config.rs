//! Bridge configuration, read once at start-up.
//!
//! Every knob comes from an environment variable (a command-line flag mirrors each, see
//! `voxrelay serve --help`), is validated here, and is passed down as plain values: no
//! globals. Secrets are held as [`Secret`] so a `{:?}` of the configuration never prints them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use url::Url;

use crate::control::signing::SigningKey;
use crate::{AudioMode, Secret};

/// The default OpenAI Realtime endpoint (GA protocol).
pub const DEFAULT_OPENAI_URL: &str = "wss://api.openai.com/v1/realtime?model=gpt-realtime";
pub const DEFAULT_VOICE: &str = "marin";
pub const DEFAULT_INSTRUCTIONS: &str = "You are a friendly, concise voice assistant answering a phone call. \
Speak naturally and keep answers short; the caller is on a phone line.";
pub const DEFAULT_GREETING: &str = "Hello! Thanks for calling. How can I help you today?";

/// A Twilio message larger than this closes the socket: real ones are under 1 KiB.
pub const MAX_TWILIO_MESSAGE_BYTES: usize = 64 * 1024;
/// A Media Streams socket that sends no `start` within this closes.
pub const START_TIMEOUT: Duration = Duration::from_secs(5);

/// Defaults for the control plane (see `docs/control-plane-api.md`).
pub const DEFAULT_LOOKUP_BUDGET: Duration = Duration::from_millis(300);
pub const DEFAULT_CONTEXT_TTL: Duration = Duration::from_secs(60);
pub const DEFAULT_CONTEXT_STALE: Duration = Duration::from_secs(600);
pub const DEFAULT_REPORT_RETRY: Duration = Duration::from_secs(60);
pub const DEFAULT_REPORT_RESEND: Duration = Duration::from_secs(30);
pub const DEFAULT_REPORT_SPOOL_DIR: &str = "voxrelay-spool";
/// A pre-warmed session nobody claims is closed this long after it is ready. Twilio opens
/// the stream within a second or two of receiving TwiML; this leaves room for slow networks.
pub const DEFAULT_PREWARM_UNCLAIMED: Duration = Duration::from_secs(15);

/// Where `/metrics` is served unless `VOXRELAY_ADMIN_LISTEN` says otherwise: loopback, so a
/// fresh install never publishes its metrics.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9091";
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
        "TWILIO_AUTH_TOKEN is not set: the bridge refuses to start without it, because every webhook and \
         media stream is checked against Twilio's signature (use `voxrelay demo` to try it locally)"
    )]
    MissingAuthToken,
    #[error(
        "VOXRELAY_PUBLIC_URL {0:?} is not an absolute http(s) origin such as https://voice.example.com"
    )]
    BadPublicUrl(String),
    #[error("VOXRELAY_OPENAI_URL {0:?} is not a ws:// or wss:// URL")]
    BadUpstreamUrl(String),
    #[error("VOXRELAY_PLAYBACK_LEAD_MS must be between 20 and 1000, got {0}")]
    BadLead(u64),
    #[error("VOXRELAY_CONTROL_PLANE_URL {0:?} is not an http(s) URL")]
    BadControlPlaneUrl(String),
    #[error(
        "VOXRELAY_CONTROL_PLANE_URL is set, so VOXRELAY_CONTROL_PLANE_KEY_ID and \
         VOXRELAY_CONTROL_PLANE_SECRET must be too (every request to it is signed)"
    )]
    MissingControlPlaneKey,
    #[error("VOXRELAY_CONTEXT_BUDGET_MS must be between 10 and 5000, got {0}")]
    BadLookupBudget(u64),
    #[error("{0} must be at least 1")]
    ZeroLimit(&'static str),
}

/// Everything `voxrelay serve` needs.
#[derive(Clone, Debug)]
pub struct BridgeConfig {
    pub listen: SocketAddr,
    /// The public origin Twilio reaches (`https://host`), without a trailing slash. When
    /// absent, URLs are rebuilt from each request's `Host` and `X-Forwarded-Proto`.
    pub public_url: Option<Url>,
    pub twilio_auth_token: Secret,
    pub upstream: UpstreamTarget,
    pub agent: AgentDefaults,
    pub playback_lead: Duration,
    pub drain: Duration,
    /// Without one every call gets [`BridgeConfig::agent`].
    pub control_plane: Option<ControlPlaneTarget>,
    /// Open and configure the upstream session on the voice webhook.
    pub prewarm: bool,
    pub prewarm_unclaimed_after: Duration,
    /// Refuse streams whose TwiML did not come from our webhook (no binding token).
    pub require_stream_token: bool,
    /// `FLY_MACHINE_ID` on Fly.io: put in stream URLs so upgrades replay to this machine.
    pub fly_machine_id: Option<String>,
    /// The private listener for `/metrics` (and health): never exposed to the internet.
    pub admin_listen: SocketAddr,
    /// Caps and timeouts of the public listener.
    pub limits: ListenerLimits,
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

/// Where the model is.
#[derive(Clone, Debug)]
pub struct UpstreamTarget {
    pub url: String,
    /// `None` means "use the built-in mock realtime server".
    pub api_key: Option<Secret>,
}

/// The agent every call gets until a control plane supplies one per tenant.
#[derive(Clone, Debug)]
pub struct AgentDefaults {
    pub voice: String,
    pub instructions: String,
    pub greeting: Option<String>,
    pub audio_mode: AudioMode,
}

impl Default for AgentDefaults {
    fn default() -> Self {
        Self {
            voice: DEFAULT_VOICE.to_owned(),
            instructions: DEFAULT_INSTRUCTIONS.to_owned(),
            greeting: Some(DEFAULT_GREETING.to_owned()),
            audio_mode: AudioMode::Pcmu,
        }
    }
}

/// Raw values as given by flags or the environment, before validation.
#[derive(Clone, Debug, Default)]
pub struct RawConfig {
    pub listen: Option<SocketAddr>,
    pub public_url: Option<String>,
    pub twilio_auth_token: Option<String>,
    pub openai_api_key: Option<String>,
    pub openai_url: Option<String>,
    pub audio_mode: Option<AudioMode>,
    pub voice: Option<String>,
    pub instructions: Option<String>,
    pub greeting: Option<String>,
    pub playback_lead_ms: Option<u64>,
    pub drain_seconds: Option<u64>,
    pub control_plane_url: Option<String>,
    pub control_plane_key_id: Option<String>,
    pub control_plane_secret: Option<String>,
    pub context_budget_ms: Option<u64>,
    pub context_ttl_seconds: Option<u64>,
    pub context_stale_seconds: Option<u64>,
    pub report_spool_dir: Option<PathBuf>,
    pub report_retry_seconds: Option<u64>,
    pub report_resend_seconds: Option<u64>,
    pub prewarm: Option<bool>,
    pub prewarm_unclaimed_ms: Option<u64>,
    pub require_stream_token: Option<bool>,
    pub fly_machine_id: Option<String>,
    pub admin_listen: Option<SocketAddr>,
    pub max_calls: Option<usize>,
    pub max_connections: Option<usize>,
    pub max_unverified_connections: Option<usize>,
}

impl BridgeConfig {
    pub fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
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
            .map(|u| parse_public_url(&u))
            .transpose()?;
        let upstream_url = raw
            .openai_url
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_OPENAI_URL.to_owned());
        match Url::parse(&upstream_url) {
            Ok(u) if matches!(u.scheme(), "ws" | "wss") => {}
            _ => return Err(ConfigError::BadUpstreamUrl(upstream_url)),
        }
        let lead_ms = raw.playback_lead_ms.unwrap_or(120);
        if !(20..=1000).contains(&lead_ms) {
            return Err(ConfigError::BadLead(lead_ms));
        }
        let defaults = AgentDefaults::default();
        Ok(Self {
            listen: raw.listen.unwrap_or_else(|| ([0, 0, 0, 0], 8080).into()),
            public_url,
            twilio_auth_token: Secret::new(token),
            upstream: UpstreamTarget {
                url: upstream_url,
                api_key: raw
                    .openai_api_key
                    .filter(|k| !k.trim().is_empty())
                    .map(Secret::new),
            },
            agent: AgentDefaults {
                voice: raw
                    .voice
                    .filter(|v| !v.is_empty())
                    .unwrap_or(defaults.voice),
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
            require_stream_token: raw.require_stream_token.unwrap_or(false),
            fly_machine_id: raw.fly_machine_id.filter(|id| !id.trim().is_empty()),
            admin_listen: raw.admin_listen.unwrap_or_else(default_admin_listen),
            limits,
        })
    }
}

impl BridgeConfig {
    /// A bridge on a loopback port with every optional feature at its default and no control
    /// plane: for the demo, the bench harness and tests, which then adjust what they need.
    pub fn local(twilio_auth_token: Secret, upstream: UpstreamTarget) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            public_url: None,
            twilio_auth_token,
            upstream,
            agent: AgentDefaults::default(),
            playback_lead: Duration::from_millis(120),
            drain: Duration::from_secs(5),
            control_plane: None,
            prewarm: true,
            prewarm_unclaimed_after: DEFAULT_PREWARM_UNCLAIMED,
            require_stream_token: false,
            fly_machine_id: None,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            limits: ListenerLimits::default(),
        }
    }
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

    fn raw_with_token() -> RawConfig {
        RawConfig {
            twilio_auth_token: Some("token".into()),
            ..RawConfig::default()
        }
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
        assert_eq!(config.upstream.url, DEFAULT_OPENAI_URL);
        assert!(config.upstream.api_key.is_none());
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
        assert!(config.prewarm && !config.require_stream_token);
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
}
