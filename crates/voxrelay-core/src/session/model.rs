//! One call's model session, without its socket: the realtime protocol the provider factory
//! built for the call's agent, and where that session stands.
//!
//! The same type serves a live call and a pre-warm. A live call's engine receives it when the
//! agent is known ([`super::engine::Input::ContextResolved`]) and opens it when the socket is
//! up; a pre-warm opens it on the webhook's socket, reads messages through
//! [`ModelSession::prewarm_message`] until the session is configured, and hands it, socket and
//! all, to the call's engine, which then sends what the pre-warm held back (the greeting).
//! Invariants: nothing but the configuration is produced before [`ModelSession::open`]; the
//! messages a pre-warm holds back are bounded by what configuring a session produces (one
//! greeting); nothing here touches a socket or the clock.

use crate::AudioMode;
use crate::upstream::{
    RealtimeProtocol, SessionSettings, UpstreamError, UpstreamEvent, protocol_for,
};

/// A model session for one call.
pub struct ModelSession {
    protocol: Box<dyn RealtimeProtocol>,
    /// What the session was built from, for its successor (the greeting taken out).
    settings: SessionSettings,
    audio_mode: AudioMode,
    tools_enabled: bool,
    /// The configuration went out: the socket is open.
    opened: bool,
    /// The server confirmed the configuration (pre-warm only waits for it).
    ready: bool,
    /// Follow-ups the protocol produced during a pre-warm, for the call to send.
    held_for_call: Vec<String>,
}

/// What one message did to a pre-warming session.
#[derive(Debug, PartialEq, Eq)]
pub enum PrewarmStep {
    /// Not configured yet: read on.
    Pending,
    /// The configuration is in force: the session can wait for its call.
    Ready,
    /// The server answered the configuration with an error event.
    Refused(String),
}

impl ModelSession {
    /// The session for an agent's `settings`, its protocol built by the provider factory.
    /// `tools_enabled`: whether this call runs the model's function calls (else each is
    /// answered with an error at once).
    pub fn new(settings: SessionSettings, tools_enabled: bool) -> Self {
        let protocol = protocol_for(settings.clone());
        Self {
            protocol,
            audio_mode: settings.audio_mode,
            settings,
            tools_enabled,
            opened: false,
            ready: false,
            held_for_call: Vec::new(),
        }
    }

    /// A fresh session for the same agent, to replace this one mid-call: same instructions,
    /// voice, tools and audio formats, no greeting (the caller was greeted), not yet open.
    pub fn successor(&self) -> Self {
        let settings = SessionSettings {
            greeting: None,
            // Gemini: resume on the provider's record while it holds a valid handle.
            resumption_handle: self.protocol.resumption_handle().map(str::to_owned),
            generation: self.settings.generation.wrapping_add(1),
            ..self.settings.clone()
        };
        Self::new(settings, self.tools_enabled)
    }

    pub fn audio_mode(&self) -> AudioMode {
        self.audio_mode
    }

    pub fn tools_enabled(&self) -> bool {
        self.tools_enabled
    }

    /// The configuration was sent: its socket is open.
    pub fn is_open(&self) -> bool {
        self.opened
    }

    /// The socket opened: pushes the messages that configure the session into `out`. Only the
    /// first call produces anything.
    pub fn open(&mut self, out: &mut Vec<String>) {
        if !std::mem::replace(&mut self.opened, true) {
            self.protocol.on_open(out);
        }
    }

    /// One server message read while pre-warming (no call yet): follow-ups the protocol asks
    /// for (the greeting) are held for the call ([`ModelSession::take_held_for_call`]).
    pub fn prewarm_message(&mut self, text: &str) -> Result<PrewarmStep, UpstreamError> {
        let mut follow_ups = std::mem::take(&mut self.held_for_call);
        let events = self.protocol.on_message(text, &mut follow_ups);
        self.held_for_call = follow_ups;
        let mut step = PrewarmStep::Pending;
        for event in events? {
            match event {
                UpstreamEvent::SessionReady => {
                    self.ready = true;
                    step = PrewarmStep::Ready;
                }
                UpstreamEvent::Error { message, .. } => {
                    return Ok(PrewarmStep::Refused(message.into_owned()));
                }
                _ => {}
            }
        }
        Ok(step)
    }

    /// The server confirmed the configuration while pre-warming.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// What a pre-warm held back for the call, in order.
    pub fn take_held_for_call(&mut self) -> Vec<String> {
        std::mem::take(&mut self.held_for_call)
    }

    pub(crate) fn protocol(&self) -> &dyn RealtimeProtocol {
        &*self.protocol
    }

    pub(crate) fn protocol_mut(&mut self) -> &mut dyn RealtimeProtocol {
        &mut *self.protocol
    }
}

impl std::fmt::Debug for ModelSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelSession")
            .field("audio_mode", &self.audio_mode)
            .field("tools_enabled", &self.tools_enabled)
            .field("opened", &self.opened)
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READY: &str = r#"{"type":"session.updated","session":{}}"#;

    #[test]
    fn a_prewarm_holds_the_greeting_for_the_call_and_opens_once() {
        let settings = SessionSettings {
            greeting: Some("Hello there".into()),
            ..SessionSettings::default()
        };
        let mut session = ModelSession::new(settings, false);
        let mut out = Vec::new();
        session.open(&mut out);
        session.open(&mut out);
        assert_eq!(out.len(), 1, "configured once: {out:?}");
        assert!(out[0].contains("session.update"));
        assert_eq!(session.prewarm_message(READY).unwrap(), PrewarmStep::Ready);
        assert!(session.is_ready());
        let held = session.take_held_for_call();
        assert_eq!(held.len(), 1);
        assert!(held[0].contains("response.create") && held[0].contains("Hello there"));
        assert!(session.take_held_for_call().is_empty());

        let mut successor = session.successor();
        assert!(!successor.is_open());
        assert_eq!(successor.audio_mode(), session.audio_mode());
        let mut out = Vec::new();
        successor.open(&mut out);
        assert_eq!(out.len(), 1);
        successor.prewarm_message(READY).unwrap();
        assert!(
            successor.take_held_for_call().is_empty(),
            "a successor does not greet again"
        );
    }

    #[test]
    fn a_refusal_and_garbage_are_told_apart() {
        let mut session = ModelSession::new(SessionSettings::default(), false);
        let refusal =
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"bad voice"}}"#;
        assert_eq!(
            session.prewarm_message(refusal).unwrap(),
            PrewarmStep::Refused("bad voice".into())
        );
        assert!(session.prewarm_message("{not json").is_err());
        assert_eq!(
            session
                .prewarm_message(r#"{"type":"rate_limits.updated"}"#)
                .unwrap(),
            PrewarmStep::Pending
        );
    }
}
