//! Bridge configuration, read once at start-up.
//!
//! Every knob comes from an environment variable (a command-line flag mirrors each, see
//! `voxrelay serve --help`), is validated here, and is passed down as plain values: no
//! globals. Secrets are held as [`Secret`] so a `{:?}` of the configuration never prints them.

use std::net::SocketAddr;
use std::time::Duration;

use url::Url;

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
}

impl BridgeConfig {
    pub fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
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
        })
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
            ..RawConfig::default()
        };
        let printed = format!("{:?}", BridgeConfig::from_raw(raw).unwrap());
        assert!(!printed.contains("tw-secret-123") && !printed.contains("sk-secret-456"));
    }
}
