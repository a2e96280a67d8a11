//! The model session's lifecycle inside the engine: the session arriving with the agent,
//! opening (a successor told the conversation), being lost (a response it was speaking cut
//! where the caller is, a successor dialled or the fallback), renewed make-before-break at a
//! silent moment, and the hold prompt a caller hears while waiting. The schedule itself is
//! [`super::super::continuity::Reconnector`]'s; this is where the engine follows it.

use std::time::Instant;

use super::*;

impl CallEngine {
    pub(super) fn on_context_resolved(
        &mut self,
        now: Instant,
        resolved: Resolved,
    ) -> Result<(), EngineError> {
        if self.model.is_some() {
            return Err(EngineError::SessionAlreadyResolved);
        }
        let Resolved {
            mut session,
            hold_prompt,
            refused,
        } = resolved;
        if let Some(prompt) = hold_prompt {
            self.reconnector.set_hold_prompt(prompt);
        }
        self.playback
            .set_server_interrupts_response(session.protocol().server_interrupts_response());
        let prewarmed = session.is_open();
        let held_for_call = session.take_held_for_call();
        self.model = Some(ModelLeg::new(session, false, false));
        if prewarmed {
            self.reconnector.opened_prewarmed();
            self.record_session_start(now, Vec::new());
            self.arm_renewal(now);
            // Configured on the webhook's socket; what it held back (the greeting) goes first.
            for text in held_for_call {
                self.push_model_control(text);
            }
            self.release_held();
        } else {
            let step = match refused {
                Some(failure) => Step::GiveUp(FallbackReason::ConnectFailed(failure)),
                None => self.reconnector.start(now),
            };
            self.follow(now, step);
        }
        Ok(())
    }

    pub(super) fn on_model_connected(&mut self, now: Instant) -> Result<(), EngineError> {
        if self.model.is_none() {
            return Err(EngineError::NoModelSession);
        }
        let (gap, failed_attempts) = self.reconnector.connected(now);
        self.record_session_start(now, failed_attempts);
        let replaced = self.model.as_ref().is_some_and(|model| model.successor);
        self.open_session(now);
        if replaced {
            self.stats.continuity.reconnect_gap_ms += gap.as_millis() as u64;
            self.hold.due = None;
            self.outputs
                .push_back(Output::Event(CallEvent::ModelRestored { gap }));
            tracing::info!(gap_ms = gap.as_millis() as u64, "model session replaced");
        }
        self.release_held();
        Ok(())
    }

    /// Configures the session whose socket just opened (a successor is then told the
    /// conversation so far, as the caller heard it, and asked to answer if one is owed), and
    /// arms its renewal.
    pub(super) fn open_session(&mut self, now: Instant) {
        let Some(model) = self.model.as_mut() else {
            return;
        };
        let mut opening = std::mem::take(&mut self.scratch.follow_ups);
        opening.clear();
        model.session.open(&mut opening);
        if std::mem::take(&mut model.successor) {
            let protocol = model.session.protocol();
            let before = opening.len();
            // A session resumed on the provider's own record already holds the conversation.
            let replay = !protocol.resumes_context();
            opening.extend(
                self.conversation
                    .replay()
                    .iter()
                    .filter(|_| replay)
                    .map(|item| protocol.replay_item(item)),
            );
            self.stats.continuity.replayed_items += (opening.len() - before) as u64;
            if std::mem::take(&mut model.respond_on_open) {
                opening.push(protocol.create_response());
            }
        }
        // Ahead of everything held: the session must be configured before the first audio or
        // command reaches it.
        for text in opening.drain(..) {
            self.push_model_control(text);
        }
        self.scratch.follow_ups = opening;
        self.arm_renewal(now);
    }

    pub(super) fn arm_renewal(&mut self, now: Instant) {
        self.renewal = Renewal {
            due: self.reconnector.config().session_max.map(|max| now + max),
            ..Renewal::default()
        };
    }

    /// Moves the renewal on: the standby dialled when the session is due (or its retry is),
    /// and the switch made at the first silent moment (or forced when none came in time).
    pub(super) fn advance_renewal(&mut self, now: Instant) {
        if self.closed.is_some() || !self.model_is_open() {
            return;
        }
        match self.renewal.standby {
            Standby::None | Standby::RetryAt(_) => {
                let due = match self.renewal.standby {
                    Standby::RetryAt(at) => Some(at),
                    _ => self.renewal.due,
                };
                if due.is_some_and(|due| now >= due) {
                    self.renewal.attempts += 1;
                    self.renewal.standby = Standby::Connecting;
                    let deadline = now + self.reconnector.config().connect_timeout;
                    self.outputs.push_back(Output::ConnectStandby { deadline });
                }
            }
            Standby::Connecting => {}
            Standby::Ready(since) => {
                let forced = now >= since + RENEWAL_FORCE_AFTER;
                if forced || self.is_silent(now) {
                    self.switch_to_standby(now, forced);
                }
            }
        }
    }

    /// Nobody is speaking: no assistant audio playing or due, no response running, no caller
    /// speech, no hold prompt.
    pub(super) fn is_silent(&self, now: Instant) -> bool {
        !self.caller_speaking
            && !self.hold.playing
            && !self.playback.is_active(now)
            && self
                .model
                .as_ref()
                .is_some_and(|model| model.active_response.is_none() && !model.response_owed)
    }

    /// The renewal's switch: the standby becomes the call's session, configured and told the
    /// conversation up to now.
    pub(super) fn switch_to_standby(&mut self, now: Instant, forced: bool) {
        self.record_session_end(now, SessionEnd::Renewed);
        self.outputs.push_back(Output::SwitchToStandby);
        if forced {
            // Like a drop: whatever is playing stops where the caller is.
            if let Some(interruption) = self.playback.on_speech_started(now) {
                self.send_clear(now);
                self.note_interruption(&interruption);
            }
        }
        let should_answer = self.conversation.successor_should_answer();
        let respond_on_open = should_answer
            || self
                .model
                .as_ref()
                .is_some_and(|model| model.active_response.is_some() || model.response_owed);
        self.replace_model_leg(respond_on_open);
        self.caller_speaking = false;
        self.stats.continuity.renewals += 1;
        self.record_session_start(now, Vec::new());
        self.open_session(now);
        self.outputs
            .push_back(Output::Event(CallEvent::ModelRenewed { forced }));
        tracing::info!(forced, "model session renewed");
    }

    /// The open session is gone: a response it was speaking is cut where the caller is (so
    /// the replay says what was heard), and a successor is dialled, or the call falls back.
    pub(super) fn on_model_lost(&mut self, now: Instant, reason: EndReason) {
        let Some(model) = self.model.as_mut() else {
            self.close(reason);
            return;
        };
        if !model.session.is_open() {
            // No session to lose (a connect under way reports through ModelConnectFailed).
            return;
        }
        let end = match reason {
            EndReason::UpstreamIdle => SessionEnd::Idle,
            EndReason::UpstreamStalled => SessionEnd::Stalled,
            EndReason::UpstreamOversized => SessionEnd::Oversized,
            _ => SessionEnd::Dropped,
        };
        self.record_session_end(now, end);
        // Messages for the lost session not yet taken by the driver must not reach its
        // successor (which is told the conversation instead).
        self.outputs
            .retain(|output| !matches!(output, Output::ToModel(_)));
        self.outputs
            .push_back(Output::Event(CallEvent::ModelLost(end)));
        let Some(model) = self.model.as_ref() else {
            return;
        };
        let cut_response = model.active_response.is_some();
        // Asked to speak when it was answering, owes an answer, or the caller waits for one;
        // never into a caller who is still talking (their held audio tells the successor).
        let respond_on_open = cut_response
            || model.response_owed
            || (!self.caller_speaking && self.conversation.successor_should_answer());
        if cut_response && let Some(interruption) = self.playback.on_speech_started(now) {
            // The rest of the response will never come: what the caller heard is what was said.
            self.send_clear(now);
            self.note_interruption(&interruption);
        }
        self.replace_model_leg(respond_on_open);
        self.hold.due = Some(now + self.reconnector.config().hold_after);
        self.renewal = Renewal::default();
        self.caller_speaking = false;
        let step = self.reconnector.lost(now);
        self.follow(now, step);
    }

    /// The model leg starts over with its session's successor (not yet open; it will be told
    /// the conversation, and asked to speak when `respond_on_open`), and playback forgets the
    /// old session's responses.
    fn replace_model_leg(&mut self, respond_on_open: bool) {
        if let Some(model) = self.model.as_mut() {
            *model = ModelLeg::new(model.session.successor(), true, respond_on_open);
        }
        self.playback.on_session_replaced();
    }

    /// Does what the reconnect schedule says.
    pub(super) fn follow(&mut self, _now: Instant, step: Step) {
        match step {
            Step::Connect { deadline } => self.outputs.push_back(Output::ConnectModel { deadline }),
            Step::Wait => {}
            Step::GiveUp(reason) => {
                tracing::warn!(reason = reason.as_str(), "no model session: falling back");
                self.stats.continuity.fallback = Some(reason);
                self.hold.due = None;
                self.outputs
                    .push_back(Output::Event(CallEvent::FellBack(reason)));
                self.close(EndReason::ModelUnavailable);
            }
        }
    }

    pub(super) fn record_session_start(
        &mut self,
        now: Instant,
        failed_attempts: Vec<ConnectFailure>,
    ) {
        let started_ms = self.offset_ms(now);
        let sessions = &mut self.stats.continuity.sessions;
        if sessions.len() == MAX_SESSION_RECORDS {
            self.stats.continuity.sessions_unrecorded += 1;
            return;
        }
        sessions.push(SessionRecord {
            started_ms,
            ended_ms: None,
            end: None,
            failed_attempts,
        });
        self.stats.continuity.reconnects = self.reconnector.reconnects();
    }

    pub(super) fn record_session_end(&mut self, now: Instant, end: SessionEnd) {
        let ended_ms = self.offset_ms(now);
        if let Some(record) = self.stats.continuity.sessions.last_mut()
            && record.end.is_none()
        {
            record.ended_ms = Some(ended_ms);
            record.end = Some(end);
        }
    }

    pub(super) fn offset_ms(&self, now: Instant) -> u64 {
        self.started_at.map_or(0, |started| {
            now.saturating_duration_since(started).as_millis() as u64
        })
    }

    /// The caller has waited [`ContinuityConfig::hold_after`] in silence for a session: the
    /// hold prompt plays, paced like model audio, once per wait.
    pub(super) fn maybe_start_hold(&mut self, now: Instant) {
        let Some(due) = self.hold.due else {
            return;
        };
        if now < due {
            return;
        }
        if !self.reconnector.is_waiting() || self.stream.stream_sid().is_none() {
            self.hold.due = None;
            return;
        }
        let hold_after = self.reconnector.config().hold_after;
        if self.playback.is_active(now) {
            // The last of the lost session's audio is still playing: silence starts after it.
            self.hold.due = Some(now + hold_after);
            return;
        }
        self.hold.due = None;
        let prompt = std::sync::Arc::clone(&self.reconnector.config().hold_prompt);
        if prompt.is_empty() {
            return;
        }
        self.hold.played += 1;
        let id = format!("{HOLD_ITEM_PREFIX}{}", self.hold.played);
        self.playback.on_response_created(&id);
        self.playback.on_audio_delta(now, &id, &id, &prompt);
        self.playback.on_response_done(&id);
        self.hold.playing = true;
        self.pump_playback(now, None);
    }

    /// The new session is answering: the hold prompt stops where it is.
    pub(super) fn stop_hold(&mut self, now: Instant) {
        if std::mem::take(&mut self.hold.playing)
            && self.playback.is_active(now)
            && self.playback.on_speech_started(now).is_some()
        {
            self.send_clear(now);
        }
    }
}
