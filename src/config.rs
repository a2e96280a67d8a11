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
    /// Refuse streams whose TwiML did not come from our webhook (no binding token). On by
    /// default (`VOXRELAY_REQUIRE_STREAM_TOKEN=0` turns it off; such streams then get the
    /// fallback agent, never a tenant).
    pub require_stream_token: bool,
    /// `FLY_MACHINE_ID` on Fly.io: put in stream URLs so upgrades replay to this machine.
    pub fly_machine_id: Option<String>,
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
}

impl BridgeConfig {
    pub fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        let control_plane = control_plane_from_raw(&raw)?;
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
            prewarm_unclaimed_after: raw
                .prewarm_unclaimed_ms
                .map_or(DEFAULT_PREWARM_UNCLAIMED, Duration::from_millis),
            // Secure by default: a stream must prove it is the call its webhook answered.
            require_stream_token: raw.require_stream_token.unwrap_or(true),
            fly_machine_id: raw.fly_machine_id.filter(|id| !id.trim().is_empty()),
        })
    }
}

impl BridgeConfig {
    /// A bridge on a loopback port with every optional feature at its default and no control
    /// plane: for the demo, the bench harness and tests, which then adjust what they need.
    /// Unlike `serve`'s default, streams without a binding token are let through (as the
    /// fallback agent), since tests and benchmarks script raw streams.
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
        }
    }
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
}
