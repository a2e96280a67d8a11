//! Who answers a call: the agent a call is configured with, from a tenant's context or from
//! the bridge's environment defaults (the fallback).
//!
//! Invariants: a tenant's memory namespace always starts with `<tenant_id>/` (a context that
//! breaks the rule is corrected here, whatever its source); the fallback agent never carries a
//! tenant, tools or a namespace, so a call answered by it can never reach a tenant's data.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::config::AgentDefaults;
use crate::control::api::{MAX_HOLD_PROMPT_BYTES, TenantContext, is_e164, memory_namespace};
use crate::upstream::SessionSettings;
use crate::{AudioMode, Provider};

/// The agent one call gets.
#[derive(Clone, Debug, PartialEq)]
pub struct CallAgent {
    /// `None` for the fallback agent.
    pub tenant_id: Option<String>,
    pub agent_name: String,
    pub voice: String,
    pub instructions: String,
    pub greeting: Option<String>,
    pub audio_mode: AudioMode,
    /// BCP 47, e.g. `en-US`, when known.
    pub language: Option<String>,
    pub tools: Vec<serde_json::Value>,
    pub memory_namespace: Option<String>,
    /// `None`: no limit.
    pub max_call: Option<Duration>,
    /// Where the agent came from: `static` (no control plane), or the directory's source
    /// (`fresh`, `cached`, `stale`, `fallback`, `unknown_number`).
    pub source: &'static str,
    /// Dialled when no model session can be had (E.164, checked); `None`: an apology.
    pub fallback_number: Option<String>,
    /// The tenant's hold prompt (8 kHz μ-law, checked and bounded); `None`: the built-in one.
    pub hold_prompt: Option<Arc<[u8]>>,
    /// Who answers: the tenant's provider, else the bridge's `VOXRELAY_PROVIDER`.
    pub provider: Provider,
    /// The provider's model id; `None`: the endpoint's default (OpenAI's URL, Gemini's
    /// [`Provider::default_model`]).
    pub model: Option<String>,
    /// The tenant's word on recording its calls; `None`: the bridge's `VOXRELAY_RECORD`.
    pub record: Option<bool>,
}

impl CallAgent {
    /// The environment's agent: used without a control plane, and as the fallback.
    pub fn from_defaults(defaults: &AgentDefaults, source: &'static str) -> Self {
        Self {
            tenant_id: None,
            agent_name: "default".to_owned(),
            voice: defaults.voice.clone(),
            instructions: defaults.instructions.clone(),
            greeting: defaults.greeting.clone(),
            audio_mode: defaults.audio_mode,
            language: None,
            tools: Vec::new(),
            memory_namespace: None,
            max_call: None,
            source,
            fallback_number: None,
            hold_prompt: None,
            provider: defaults.provider,
            model: None,
            record: None,
        }
    }

    /// A tenant's agent for one caller (`from`); `default_provider` when the tenant names none.
    pub fn from_context(
        context: &TenantContext,
        from: &str,
        source: &'static str,
        default_provider: Provider,
    ) -> Self {
        let prefix = format!("{}/", context.tenant_id);
        let namespace = if context.memory_namespace.starts_with(&prefix)
            && context.memory_namespace.len() > prefix.len()
        {
            context.memory_namespace.clone()
        } else {
            tracing::warn!(
                tenant = %context.tenant_id,
                "context's memory namespace is outside its tenant: using the tenant's own rule"
            );
            memory_namespace(&context.tenant_id, from)
        };
        Self {
            tenant_id: Some(context.tenant_id.clone()),
            agent_name: context.agent_name.clone(),
            voice: context.voice.clone(),
            instructions: context.instructions.clone(),
            greeting: context.greeting.clone().filter(|g| !g.trim().is_empty()),
            audio_mode: context.audio_mode,
            language: Some(context.language.clone()).filter(|l| !l.trim().is_empty()),
            tools: context.tools.clone(),
            memory_namespace: Some(namespace),
            max_call: (context.max_call_seconds > 0)
                .then(|| Duration::from_secs(u64::from(context.max_call_seconds))),
            source,
            fallback_number: checked_fallback_number(context),
            hold_prompt: checked_hold_prompt(context),
            provider: context.provider.unwrap_or(default_provider),
            model: checked_model(context),
            record: context.record,
        }
    }

    /// The model session this agent runs.
    pub fn session_settings(&self) -> SessionSettings {
        SessionSettings {
            provider: self.provider,
            model: self.model.clone(),
            instructions: self.instructions.clone(),
            voice: self.voice.clone(),
            audio_mode: self.audio_mode,
            greeting: self.greeting.clone(),
            tools: self.tools.clone(),
            // Transcription takes ISO-639-1: the primary subtag of `en-US`.
            language: self.language.as_deref().and_then(|tag| {
                let primary = tag.split(['-', '_']).next().unwrap_or("");
                (primary.len() == 2 && primary.chars().all(|c| c.is_ascii_alphabetic()))
                    .then(|| primary.to_ascii_lowercase())
            }),
            ..SessionSettings::default()
        }
    }
}

/// The context's model id if it looks like one (it goes into a URL or a setup message): 1 to
/// 128 characters of `[A-Za-z0-9._-]`, as the reference control plane also checks.
fn checked_model(context: &TenantContext) -> Option<String> {
    let model = context.model.as_deref()?.trim();
    if model.is_empty() {
        return None;
    }
    let well_formed = model.len() <= 128
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if well_formed {
        return Some(model.to_owned());
    }
    tracing::warn!(
        tenant = %context.tenant_id,
        "context's model is not a model id: the provider's default model answers"
    );
    None
}

/// The context's fallback number if it is E.164: it goes into TwiML, so nothing else does.
fn checked_fallback_number(context: &TenantContext) -> Option<String> {
    let number = context.fallback_number.as_deref()?.trim();
    if number.is_empty() {
        return None;
    }
    if is_e164(number) {
        return Some(number.to_owned());
    }
    tracing::warn!(
        tenant = %context.tenant_id,
        "context's fallback_number is not E.164: callers get the apology instead"
    );
    None
}

/// The context's hold prompt decoded, if it is base64 of at most [`MAX_HOLD_PROMPT_BYTES`].
fn checked_hold_prompt(context: &TenantContext) -> Option<Arc<[u8]>> {
    let encoded = context.hold_prompt.as_deref()?.trim();
    if encoded.is_empty() {
        return None;
    }
    // Checked before decoding: the decoded size is known from the text's.
    let fits = encoded.len() / 4 * 3 <= MAX_HOLD_PROMPT_BYTES;
    match BASE64.decode(encoded) {
        Ok(bytes) if fits && !bytes.is_empty() => Some(Arc::from(bytes)),
        _ => {
            tracing::warn!(
                tenant = %context.tenant_id,
                "context's hold_prompt is not base64 μ-law of at most {MAX_HOLD_PROMPT_BYTES} bytes: \
                 callers hear the built-in one"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> TenantContext {
        TenantContext {
            tenant_id: "bistro_luna".into(),
            agent_name: "Luna".into(),
            voice: "cedar".into(),
            greeting: Some("Buongiorno!".into()),
            instructions: "Take bookings.".into(),
            audio_mode: AudioMode::Pcm16,
            language: "it-IT".into(),
            tools: vec![serde_json::json!({"type": "function", "name": "take_message"})],
            memory_namespace: "bistro_luna/+15550001111".into(),
            max_call_seconds: 300,
            fallback_number: Some("+15550100999".into()),
            hold_prompt: Some(BASE64.encode([0x7f_u8; 800])),
            provider: None,
            model: None,
            record: None,
        }
    }

    #[test]
    fn a_tenant_agent_carries_its_context_into_the_session() {
        let agent = CallAgent::from_context(&context(), "+15550001111", "fresh", Provider::OpenAi);
        assert_eq!(agent.tenant_id.as_deref(), Some("bistro_luna"));
        assert_eq!(agent.max_call, Some(Duration::from_secs(300)));
        let settings = agent.session_settings();
        assert_eq!(settings.voice, "cedar");
        assert_eq!(settings.audio_mode, AudioMode::Pcm16);
        assert_eq!(settings.greeting.as_deref(), Some("Buongiorno!"));
        assert_eq!(settings.language.as_deref(), Some("it"));
        assert_eq!(settings.tools.len(), 1);
    }

    #[test]
    fn a_fallback_number_and_hold_prompt_are_taken_only_when_well_formed() {
        let agent = CallAgent::from_context(&context(), "+1555", "fresh", Provider::OpenAi);
        assert_eq!(agent.fallback_number.as_deref(), Some("+15550100999"));
        assert_eq!(agent.hold_prompt.as_deref().map(<[u8]>::len), Some(800));
        for bad in [
            "15550100999",
            "+1 555 0100",
            "+0123456789",
            "+1",
            "</Dial><Play>x",
            "",
        ] {
            let mut context = context();
            context.fallback_number = Some(bad.into());
            let agent = CallAgent::from_context(&context, "+1555", "fresh", Provider::OpenAi);
            assert_eq!(agent.fallback_number, None, "{bad:?}");
        }
        for bad in [
            "not base64!".to_owned(),
            BASE64.encode(vec![0x7f_u8; MAX_HOLD_PROMPT_BYTES + 3]),
            String::new(),
        ] {
            let mut context = context();
            context.hold_prompt = Some(bad);
            let agent = CallAgent::from_context(&context, "+1555", "fresh", Provider::OpenAi);
            assert!(agent.hold_prompt.is_none());
        }
    }

    #[test]
    fn a_namespace_outside_the_tenant_is_replaced() {
        for bad in [
            "acme_dental/+1555",
            "bistro_luna",
            "bistro_luna/",
            "",
            "bistro_lunax/1",
        ] {
            let mut context = context();
            context.memory_namespace = bad.into();
            let agent =
                CallAgent::from_context(&context, "+15550002222", "fresh", Provider::OpenAi);
            assert_eq!(
                agent.memory_namespace.as_deref(),
                Some("bistro_luna/+15550002222"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_fallback_has_no_tenant_no_tools_and_no_limit() {
        let agent = CallAgent::from_defaults(&AgentDefaults::default(), "fallback");
        assert_eq!(agent.tenant_id, None);
        assert!(agent.tools.is_empty() && agent.memory_namespace.is_none());
        assert_eq!(agent.max_call, None);
        assert_eq!(agent.session_settings().language, None);
    }
}
