//! Calls the voice webhook prepared, waiting for their Media Stream to claim them.
//!
//! The webhook starts two things before Twilio has even opened the stream: the tenant lookup
//! and, when enabled, a pre-warmed upstream session (connected, `session.update` sent and
//! `session.updated` received, the greeting's `response.create` held back). Both run in one
//! preparing task per `CallSid`; the stream's `start` claims the result by `CallSid` — after
//! its binding token proved the stream belongs to that call — so the greeting can start the
//! moment the stream does.
//!
//! A pre-warm is a paid model session opened on the strength of a webhook signature, and a
//! captured signature can be replayed forever, so preparation is rationed. Invariants: one
//! preparation per `CallSid` ever seen within [`ANSWERED_RETENTION`] ([`AnsweredCalls`]: a
//! replay or Twilio's retry of a slow webhook is answered again, never prepared again); at
//! most `max_pending` calls pending; at most `max_prewarms` pre-warmed sessions open at once
//! (from the webhook until their stream claims them or they are closed), beyond which calls
//! start cold; a preparation nobody claims within `unclaimed_after` of finishing is dropped
//! and its upstream session closed politely, counted as unclaimed; shutdown closes every
//! unclaimed session.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::agent::CallAgent;
use super::metrics::Metrics;
use super::model::{ModelSession, PrewarmStep};
use crate::config::DEFAULT_MAX_PREWARMS;
use crate::upstream::connect::{ModelDial, connect_model};
use crate::upstream::{UpstreamError, UpstreamSocket};

/// What the webhook prepared for one call.
pub struct Prepared {
    pub agent: CallAgent,
    /// How long the tenant lookup took.
    pub lookup_took: Duration,
    /// `None` when pre-warm is off or failed: the stream then connects cold.
    pub session: Option<PrewarmedSession>,
    /// The pre-warm was refused so (429): the call falls back without trying again.
    pub prewarm_refused: Option<super::continuity::ConnectFailure>,
}

/// An upstream session already configured for a call's agent.
pub struct PrewarmedSession {
    /// The session that configured the socket: open, ready, holding what must wait for the
    /// call (the greeting). The call's engine adopts it as it is.
    pub session: ModelSession,
    pub socket: UpstreamSocket,
    /// Connect plus configure.
    pub took: Duration,
    pub ready_at: Instant,
    /// Its place under the pre-warm cap, given back when the session is claimed (and taken
    /// apart) or closed.
    pub slot: Option<PrewarmSlot>,
}

/// One of the `max_prewarms` places; dropping it frees the place.
pub struct PrewarmSlot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for PrewarmSlot {
    fn drop(&mut self) {
        self.metrics.prewarms_active.fetch_sub(1, Relaxed);
    }
}

impl PrewarmedSession {
    /// Closes an unclaimed session with a normal close frame.
    pub async fn close(mut self, reason: &'static str) {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: reason.into(),
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.socket.send(Message::Close(Some(frame))),
        )
        .await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PrewarmError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("the model closed the socket before the session was configured")]
    Closed,
    #[error("the model refused the session configuration: {0}")]
    Refused(String),
    #[error("the session was not configured within {0:?}")]
    Timeout(Duration),
    #[error("socket error: {0}")]
    Socket(String),
}

/// Opens the upstream socket and configures `session` on it through the session's own code
/// (the engine's), holding back the greeting until the call claims it.
pub async fn prewarm(
    dial: &ModelDial,
    mut session: ModelSession,
    within: Duration,
) -> Result<PrewarmedSession, PrewarmError> {
    let began = Instant::now();
    let work = async {
        let mut socket = connect_model(dial).await?;
        let mut out = Vec::new();
        session.open(&mut out);
        for text in out.drain(..) {
            socket
                .feed(Message::text(text))
                .await
                .map_err(|e| PrewarmError::Socket(e.to_string()))?;
        }
        socket
            .flush()
            .await
            .map_err(|e| PrewarmError::Socket(e.to_string()))?;
        loop {
            let text = match socket.next().await {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(_))) | None => return Err(PrewarmError::Closed),
                Some(Ok(_)) => continue,
                Some(Err(error)) => return Err(PrewarmError::Socket(error.to_string())),
            };
            match session.prewarm_message(text.as_str())? {
                PrewarmStep::Ready => break,
                PrewarmStep::Refused(message) => return Err(PrewarmError::Refused(message)),
                PrewarmStep::Pending => {}
            }
        }
        Ok::<_, PrewarmError>((session, socket))
    };
    let (session, socket) = tokio::time::timeout(within, work)
        .await
        .map_err(|_| PrewarmError::Timeout(within))??;
    Ok(PrewarmedSession {
        session,
        socket,
        took: began.elapsed(),
        ready_at: Instant::now(),
        slot: None,
    })
}

/// How long an answered `CallSid` is remembered: longer than a call can last (Twilio's
/// default call time limit is 4 hours; a bridged call also ends with its model session, which
/// the Realtime API closes after 60 minutes). A replay of a captured webhook within it is
/// answered without being prepared again; after it, one replay buys at most one pre-warm per
/// machine per 6 hours.
pub const ANSWERED_RETENTION: Duration = Duration::from_secs(6 * 3600);
/// How many answered `CallSid`s are remembered at most (about 10 MB when full): six hours
/// of 9 new calls a second, five times the 36,000 calls one bridge core takes in six hours
/// when it holds 200 two-minute calls. Only a webhook with a valid signature and a
/// well-formed `CallSid` never seen before adds one, so filling it takes real traffic (or
/// the auth token). When it is full nothing is evicted early: new calls are answered but
/// neither remembered nor prepared (they start cold), counted in
/// `voxrelay_answered_calls_full_total`, until entries age out.
pub const ANSWERED_CAPACITY: usize = 200_000;

/// What [`AnsweredCalls::record`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answered {
    /// Never seen within the retention: now remembered.
    First,
    /// Seen before: a retry or a replay.
    Repeat,
    /// Not seen, but the memory is full: not remembered.
    Full,
}

/// The `CallSid`s the webhook answered within a retention window, bounded. Sans-IO: time is
/// an argument. Entries leave only by age, oldest first, so a remembered `CallSid` stays
/// remembered for the whole window whatever else arrives: there is no eviction an attacker
/// could drive to re-arm one.
pub struct AnsweredCalls {
    retention: Duration,
    capacity: usize,
    inner: Mutex<AnsweredInner>,
}

#[derive(Default)]
struct AnsweredInner {
    /// Oldest first (webhooks arrive in time order, so expiry pops from the front).
    order: VecDeque<(Instant, u128)>,
    seen: HashSet<u128>,
}

impl AnsweredCalls {
    pub fn new(retention: Duration, capacity: usize) -> Self {
        Self {
            retention,
            capacity,
            inner: Mutex::new(AnsweredInner::default()),
        }
    }

    /// Remembers `call_sid` (already checked to be `CA` + 32 hex digits) as answered at
    /// `now`. Amortised O(1): each entry is inserted once and expired once.
    pub fn record(&self, call_sid: &str, now: Instant) -> Answered {
        // Hex digits of either case name the same call: a case change is not a new call.
        let Some(key) = call_sid
            .get(2..)
            .and_then(|hex| u128::from_str_radix(hex, 16).ok())
        else {
            return Answered::Full;
        };
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let AnsweredInner { order, seen } = &mut *inner;
        while let Some(&(at, old)) = order.front() {
            if now.saturating_duration_since(at) < self.retention {
                break;
            }
            order.pop_front();
            seen.remove(&old);
        }
        if seen.contains(&key) {
            Answered::Repeat
        } else if seen.len() >= self.capacity {
            Answered::Full
        } else {
            seen.insert(key);
            order.push_back((now, key));
            Answered::First
        }
    }

    /// `CallSid`s remembered now (expired ones go at the next [`AnsweredCalls::record`]).
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The limits [`PendingCalls`] keeps.
#[derive(Clone, Copy, Debug)]
pub struct PendingLimits {
    /// A preparation nobody claims this long after it finished is dropped.
    pub unclaimed_after: Duration,
    /// Calls prepared and not yet claimed; beyond it new calls are not prepared.
    pub max_pending: usize,
    /// Pre-warmed sessions open at once; beyond it calls are prepared without one.
    pub max_prewarms: usize,
    pub answered_retention: Duration,
    pub answered_capacity: usize,
}

impl PendingLimits {
    /// `unclaimed_after` and `max_pending` as given, the rest at their defaults.
    pub fn new(unclaimed_after: Duration, max_pending: usize) -> Self {
        Self {
            unclaimed_after,
            max_pending,
            max_prewarms: DEFAULT_MAX_PREWARMS,
            answered_retention: ANSWERED_RETENTION,
            answered_capacity: ANSWERED_CAPACITY,
        }
    }
}

/// What the webhook's [`PendingCalls::prepare`] did for a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// First answer: preparing, with a pre-warmed session or (off, or at the cap) without.
    Preparing { prewarm: bool },
    /// Answered before within the retention: nothing started again.
    Repeat,
    /// Not prepared: the answered-call memory or the pending calls are full. The stream
    /// resolves its agent itself and connects cold.
    NotPrepared,
}

/// Calls prepared by the webhook, by `CallSid`. Shared by every request; entries are touched
/// once at the webhook and once at `start`, never on the media path.
pub struct PendingCalls {
    calls: DashMap<String, oneshot::Receiver<Prepared>>,
    answered: AnsweredCalls,
    prewarm_slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    limits: PendingLimits,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl PendingCalls {
    pub fn new(metrics: Arc<Metrics>, limits: PendingLimits) -> Self {
        Self {
            calls: DashMap::new(),
            answered: AnsweredCalls::new(limits.answered_retention, limits.answered_capacity),
            prewarm_slots: Arc::new(Semaphore::new(limits.max_prewarms)),
            metrics,
            limits,
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        }
    }

    /// Admits a webhook for `call_sid` (checked to be `CA` + 32 hex digits) answered at
    /// `now`: the first time, starts preparing it with `work(prewarm)`, where `prewarm` says
    /// whether a pre-warm place was free (and `want_prewarm`); a repeat, or a call that cannot
    /// be remembered or pending, starts nothing. Each outcome is counted.
    pub fn prepare<W, F>(
        self: &Arc<Self>,
        call_sid: &str,
        now: Instant,
        want_prewarm: bool,
        work: W,
    ) -> Admission
    where
        W: FnOnce(bool) -> F,
        F: Future<Output = Prepared> + Send + 'static,
    {
        let answered = self.answered.record(call_sid, now);
        self.metrics
            .answered_calls
            .store(self.answered.len() as i64, Relaxed);
        match answered {
            Answered::First => {}
            Answered::Repeat => {
                self.metrics.webhook_repeats.fetch_add(1, Relaxed);
                return Admission::Repeat;
            }
            Answered::Full => {
                self.metrics.answered_calls_full.fetch_add(1, Relaxed);
                tracing::warn!(
                    capacity = self.limits.answered_capacity,
                    "answered-call memory full: answering without preparing"
                );
                return Admission::NotPrepared;
            }
        }
        if self.calls.len() >= self.limits.max_pending {
            self.metrics.pending_full.fetch_add(1, Relaxed);
            tracing::warn!(
                capacity = self.limits.max_pending,
                "too many calls pending: not preparing this one"
            );
            return Admission::NotPrepared;
        }
        let sender = match self.calls.entry(call_sid.to_owned()) {
            // Unreachable while the memory outlives a preparation; kept safe regardless.
            Entry::Occupied(_) => {
                self.metrics.webhook_repeats.fetch_add(1, Relaxed);
                return Admission::Repeat;
            }
            Entry::Vacant(vacant) => {
                let (sender, receiver) = oneshot::channel();
                vacant.insert(receiver);
                sender
            }
        };
        let slot = if want_prewarm {
            let slot = self.take_prewarm_slot();
            if slot.is_none() {
                self.metrics.prewarm_capped.fetch_add(1, Relaxed);
                tracing::info!(
                    max_prewarms = self.limits.max_prewarms,
                    "pre-warm cap reached: this call starts cold"
                );
            }
            slot
        } else {
            None
        };
        let prewarm = slot.is_some();
        let work = work(prewarm);
        let this = Arc::clone(self);
        let call_sid = call_sid.to_owned();
        self.tasks.spawn(async move {
            let mut prepared = tokio::select! {
                prepared = work => prepared,
                () = this.shutdown.cancelled() => {
                    this.calls.remove(&call_sid);
                    return;
                }
            };
            // The place goes with the session; without one (the pre-warm failed) it is free.
            if let (Some(session), Some(slot)) = (prepared.session.as_mut(), slot) {
                session.slot = Some(slot);
            }
            if let Err(unclaimed) = sender.send(prepared) {
                // The stream claimed the call and gave up waiting: close what we opened.
                if let Some(session) = unclaimed.session {
                    session.close("call gone").await;
                }
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(this.limits.unclaimed_after) => {}
                () = this.shutdown.cancelled() => {}
            }
            if let Some((_, mut receiver)) = this.calls.remove(&call_sid) {
                this.metrics.prewarm_unclaimed.fetch_add(1, Relaxed);
                tracing::info!(call_sid, "no stream claimed the prepared call: closing it");
                if let Ok(Prepared {
                    session: Some(session),
                    ..
                }) = receiver.try_recv()
                {
                    session.close("no stream claimed this session").await;
                }
            }
        });
        Admission::Preparing { prewarm }
    }

    fn take_prewarm_slot(&self) -> Option<PrewarmSlot> {
        let permit = Arc::clone(&self.prewarm_slots).try_acquire_owned().ok()?;
        self.metrics.prewarms_active.fetch_add(1, Relaxed);
        Some(PrewarmSlot {
            _permit: permit,
            metrics: Arc::clone(&self.metrics),
        })
    }

    /// Takes a call's preparation, if the webhook started one here and it has not expired.
    pub fn claim(&self, call_sid: &str) -> Option<oneshot::Receiver<Prepared>> {
        self.calls.remove(call_sid).map(|(_, receiver)| receiver)
    }

    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// Closes every unclaimed session and waits (bounded) for the preparing tasks.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutdown.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(grace, self.tasks.wait()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentDefaults;
    use crate::upstream::SessionSettings;
    use crate::upstream::mock::{MockConfig, MockRealtimeServer};

    fn agent() -> CallAgent {
        CallAgent::from_defaults(&AgentDefaults::default(), "static")
    }

    /// A well-formed `CallSid` numbered `n`.
    fn sid(n: u128) -> String {
        format!("CA{n:032x}")
    }

    fn pending_with(metrics: &Arc<Metrics>, limits: PendingLimits) -> Arc<PendingCalls> {
        Arc::new(PendingCalls::new(Arc::clone(metrics), limits))
    }

    fn ready(source: &'static str) -> impl FnOnce(bool) -> std::future::Ready<Prepared> {
        move |_| {
            std::future::ready(Prepared {
                agent: CallAgent { source, ..agent() },
                lookup_took: Duration::ZERO,
                session: None,
                prewarm_refused: None,
            })
        }
    }

    #[tokio::test]
    async fn prewarm_configures_the_session_and_holds_the_greeting() {
        let mock = MockRealtimeServer::start(MockConfig::default())
            .await
            .expect("mock");
        let target = ModelDial {
            provider: crate::Provider::OpenAi,
            url: mock.url(),
            api_key: Some(crate::Secret::new("sk-test")),
        };
        let settings = SessionSettings {
            voice: "cedar".into(),
            greeting: Some("Hi there".into()),
            ..SessionSettings::default()
        };
        let mut session = prewarm(
            &target,
            ModelSession::new(settings, false),
            Duration::from_secs(5),
        )
        .await
        .expect("prewarm");
        let held = session.session.take_held_for_call();
        assert_eq!(held.len(), 1, "{held:?}");
        assert!(held[0].contains("response.create"));
        assert!(held[0].contains("Hi there"));
        let log = mock.log();
        let record = &log.sessions()[0];
        assert_eq!(record.session["audio"]["output"]["voice"], "cedar");
        assert!(
            !record
                .client_event_types
                .contains(&"response.create".to_owned()),
            "the greeting waits for the call"
        );
        session.close("test").await;
    }

    #[tokio::test]
    async fn prewarm_against_nothing_fails_within_its_bound() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("ws://{}/v1/realtime", listener.local_addr().unwrap());
        drop(listener);
        let target = ModelDial {
            provider: crate::Provider::OpenAi,
            url,
            api_key: None,
        };
        let session = ModelSession::new(SessionSettings::default(), false);
        let result = prewarm(&target, session, Duration::from_secs(5)).await;
        assert!(result.is_err());
    }

    #[tokio::test]
    async fn a_claimed_call_gets_its_preparation_and_a_second_webhook_is_a_repeat() {
        let metrics = Arc::new(Metrics::default());
        let pending = pending_with(&metrics, PendingLimits::new(Duration::from_secs(5), 10));
        let now = Instant::now();
        assert_eq!(
            pending.prepare(&sid(1), now, false, ready("fresh")),
            Admission::Preparing { prewarm: false }
        );
        assert_eq!(
            pending.prepare(&sid(1), now, false, ready("stale")),
            Admission::Repeat,
            "retried webhook"
        );
        let receiver = pending.claim(&sid(1)).expect("pending");
        assert_eq!(receiver.await.expect("prepared").agent.source, "fresh");
        assert!(pending.claim(&sid(1)).is_none(), "claimed once");
        assert!(pending.claim(&sid(2)).is_none());
        // Claimed and gone, but still remembered: a replay prepares nothing.
        assert_eq!(
            pending.prepare(&sid(1), now, false, ready("replay")),
            Admission::Repeat
        );
        assert!(pending.claim(&sid(1)).is_none());
        assert_eq!(metrics.webhook_repeats.load(Relaxed), 2);
        assert_eq!(metrics.answered_calls.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn an_unclaimed_session_is_closed_and_counted() {
        let mock = MockRealtimeServer::start(MockConfig::default())
            .await
            .expect("mock");
        let target = ModelDial {
            provider: crate::Provider::OpenAi,
            url: mock.url(),
            api_key: Some(crate::Secret::new("sk-test")),
        };
        let metrics = Arc::new(Metrics::default());
        let pending = pending_with(&metrics, PendingLimits::new(Duration::from_millis(50), 10));
        let admission = pending.prepare(&sid(1), Instant::now(), true, |prewarmed| async move {
            assert!(prewarmed);
            Prepared {
                agent: agent(),
                lookup_took: Duration::ZERO,
                session: prewarm(
                    &target,
                    ModelSession::new(SessionSettings::default(), false),
                    Duration::from_secs(5),
                )
                .await
                .ok(),
                prewarm_refused: None,
            }
        });
        assert_eq!(admission, Admission::Preparing { prewarm: true });
        assert_eq!(metrics.prewarms_active.load(Relaxed), 1);
        let log = mock.log();
        let deadline = Instant::now() + Duration::from_secs(5);
        while metrics.prewarm_unclaimed.load(Relaxed) == 0 || log.active_sessions() > 0 {
            assert!(Instant::now() < deadline, "unclaimed session not closed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(log.sessions().len(), 1);
        assert!(pending.is_empty());
        assert!(
            wait_for(|| metrics.prewarms_active.load(Relaxed) == 0).await,
            "the closed session gave its place back"
        );
    }

    async fn wait_for(mut condition: impl FnMut() -> bool) -> bool {
        for _ in 0..250 {
            if condition() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        condition()
    }

    #[tokio::test]
    async fn capacity_bounds_the_pending_calls() {
        let metrics = Arc::new(Metrics::default());
        let pending = pending_with(&metrics, PendingLimits::new(Duration::from_secs(5), 2));
        let never = |_| async { std::future::pending::<Prepared>().await };
        let now = Instant::now();
        assert!(matches!(
            pending.prepare(&sid(1), now, false, never),
            Admission::Preparing { .. }
        ));
        assert!(matches!(
            pending.prepare(&sid(2), now, false, never),
            Admission::Preparing { .. }
        ));
        assert_eq!(
            pending.prepare(&sid(3), now, false, never),
            Admission::NotPrepared
        );
        assert_eq!(metrics.pending_full.load(Relaxed), 1);
        pending.shutdown(Duration::from_secs(1)).await;
        assert!(pending.is_empty());
    }

    #[tokio::test]
    async fn the_prewarm_cap_starts_the_rest_cold_until_a_place_frees() {
        let metrics = Arc::new(Metrics::default());
        let limits = PendingLimits {
            max_prewarms: 2,
            ..PendingLimits::new(Duration::from_secs(5), 10)
        };
        let pending = pending_with(&metrics, limits);
        let now = Instant::now();
        let asked = Arc::new(Mutex::new(Vec::new()));
        // Work that records whether it may pre-warm, then runs until `finish` fires (a
        // pre-warm that fails: no session), so its place stays taken until then.
        let work = |asked: &Arc<Mutex<Vec<bool>>>, finish: oneshot::Receiver<()>| {
            let asked = Arc::clone(asked);
            move |prewarm: bool| {
                asked.lock().unwrap().push(prewarm);
                async move {
                    let _ = finish.await;
                    Prepared {
                        agent: agent(),
                        lookup_took: Duration::ZERO,
                        session: None,
                        prewarm_refused: None,
                    }
                }
            }
        };
        let mut finishers = Vec::new();
        for n in 1..=3 {
            let (finish, finished) = oneshot::channel();
            finishers.push(finish);
            pending.prepare(&sid(n), now, true, work(&asked, finished));
        }
        assert_eq!(*asked.lock().unwrap(), [true, true, false]);
        assert_eq!(metrics.prewarm_capped.load(Relaxed), 1);
        assert_eq!(metrics.prewarms_active.load(Relaxed), 2);
        // Pre-warm off: no place is asked for, and none is counted as capped.
        let (_keep, finished) = oneshot::channel();
        assert_eq!(
            pending.prepare(&sid(4), now, false, work(&asked, finished)),
            Admission::Preparing { prewarm: false }
        );
        assert_eq!(metrics.prewarm_capped.load(Relaxed), 1);
        // The first pre-warm ends without a session: its place is free for the next call.
        let _ = finishers.remove(0).send(());
        assert!(wait_for(|| metrics.prewarms_active.load(Relaxed) == 1).await);
        let (_keep, finished) = oneshot::channel();
        assert_eq!(
            pending.prepare(&sid(5), now, true, work(&asked, finished)),
            Admission::Preparing { prewarm: true }
        );
        assert_eq!(metrics.prewarms_active.load(Relaxed), 2);
        // Shutdown drops the unfinished work, and with it the places.
        pending.shutdown(Duration::from_secs(1)).await;
        assert_eq!(metrics.prewarms_active.load(Relaxed), 0);
        assert_eq!(pending.prewarm_slots.available_permits(), 2);
    }

    #[test]
    fn answered_calls_are_remembered_for_the_retention_then_forgotten() {
        let retention = Duration::from_secs(3600);
        let answered = AnsweredCalls::new(retention, 10);
        let start = Instant::now();
        assert_eq!(answered.record(&sid(1), start), Answered::First);
        assert_eq!(
            answered.record(&sid(1), start + retention - Duration::from_secs(1)),
            Answered::Repeat
        );
        // The same digits in upper case are the same call.
        let upper = format!("CA{:032X}", 0xabcdefu128);
        assert_eq!(answered.record(&sid(0xabcdef), start), Answered::First);
        assert_eq!(answered.record(&upper, start), Answered::Repeat);
        assert_eq!(answered.record(&sid(1), start + retention), Answered::First);
        assert_eq!(
            answered.len(),
            1,
            "both old entries aged out, the new one stays"
        );
    }

    #[test]
    fn a_full_memory_refuses_new_calls_and_never_forgets_early() {
        let retention = Duration::from_secs(3600);
        let answered = AnsweredCalls::new(retention, 3);
        let start = Instant::now();
        for n in 1..=3 {
            assert_eq!(answered.record(&sid(n), start), Answered::First);
        }
        // Full: a flood of new CallSids is neither remembered nor able to push an old one out.
        for n in 10..1000 {
            assert_eq!(
                answered.record(&sid(n), start + Duration::from_secs(1)),
                Answered::Full
            );
        }
        for n in 1..=3 {
            assert_eq!(
                answered.record(&sid(n), start + Duration::from_secs(2)),
                Answered::Repeat,
                "{n} is still remembered"
            );
        }
        assert_eq!(answered.len(), 3);
        // Once the old ones age out there is room again.
        assert_eq!(
            answered.record(&sid(10), start + retention),
            Answered::First
        );
        assert_eq!(answered.len(), 1);
    }

    #[tokio::test]
    async fn a_full_memory_prepares_nothing_and_is_counted() {
        let metrics = Arc::new(Metrics::default());
        let limits = PendingLimits {
            answered_capacity: 1,
            ..PendingLimits::new(Duration::from_secs(5), 10)
        };
        let pending = pending_with(&metrics, limits);
        let now = Instant::now();
        assert!(matches!(
            pending.prepare(&sid(1), now, true, ready("first")),
            Admission::Preparing { .. }
        ));
        assert_eq!(
            pending.prepare(
                &sid(2),
                now,
                true,
                |_: bool| -> std::future::Ready<Prepared> {
                    panic!("nothing is prepared when the memory is full")
                }
            ),
            Admission::NotPrepared
        );
        assert_eq!(metrics.answered_calls_full.load(Relaxed), 1);
        assert!(pending.claim(&sid(2)).is_none());
    }
}
