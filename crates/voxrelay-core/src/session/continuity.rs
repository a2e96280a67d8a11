//! Keeping a call's model session alive: when to (re)connect, when to give up, and the record
//! of every session the call had.
//!
//! Owns [`Reconnector`], the sans-IO schedule the call engine follows whenever the call needs
//! a model session it does not have: at the start (no pre-warm), after a drop, and (later)
//! for a renewal. An *episode* starts when the need does; its first attempt goes out at once,
//! each failure waits a jittered, doubling backoff, and the episode gives up when the next
//! attempt could not start within [`ContinuityConfig::reconnect_budget`] of the episode's start,
//! when a connect is refused for a reason retrying cannot fix (a 4xx other than 429), or when
//! the call has already used [`ContinuityConfig::max_reconnects`]. Giving up is the fallback:
//! the engine closes the stream with [`super::engine::EndReason::ModelUnavailable`], and
//! Twilio goes on to the TwiML after `<Connect>` (a person, or an apology).
//!
//! Renewal is make-before-break: a session older than [`ContinuityConfig::session_max`] gets
//! a standby socket, opened while it still serves; the call switches to it at the first moment
//! nobody speaks (no assistant audio playing or due, no caller speech), and the successor is
//! configured and told the conversation then, so it knows everything said up to the switch.
//! No silent moment within [`RENEWAL_FORCE_AFTER`] and the switch happens regardless, as a
//! drop would. A standby that cannot be had is tried again [`STANDBY_RETRY`] later, at most
//! [`STANDBY_ATTEMPTS`] times; the session then serves until its provider ends it, and the
//! drop path takes over.
//!
//! Invariants: no wait is sized by anything a peer sent (backoffs are ours, capped); every
//! attempt has a deadline inside the episode's budget; the session records are bounded
//! ([`MAX_SESSION_RECORDS`], later ones counted); jitter comes from a seed the driver gives,
//! so a test can replay a schedule exactly.

use std::sync::Arc;
use std::time::{Duration, Instant};

/// Session records kept per call; a call that needs more is already in trouble, and the
/// count of the rest is kept.
pub const MAX_SESSION_RECORDS: usize = 16;
/// A standby waits this long for a silent moment before the switch is forced.
pub const RENEWAL_FORCE_AFTER: Duration = Duration::from_secs(120);
/// A failed standby is tried again after this long.
pub const STANDBY_RETRY: Duration = Duration::from_secs(5);
/// Standby attempts per renewal.
pub const STANDBY_ATTEMPTS: u32 = 5;

/// First backoff after a failed attempt; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_millis(800);

/// How a call keeps its model session.
#[derive(Clone, Debug)]
pub struct ContinuityConfig {
    /// How long one episode may try before the call falls back (`VOXRELAY_MODEL_RECONNECT_MS`).
    pub reconnect_budget: Duration,
    /// Sessions a call may lose and replace; one more loss is the fallback, never a loop.
    pub max_reconnects: u32,
    /// The longest one connect attempt may take (also cut to the episode's budget).
    pub connect_timeout: Duration,
    /// Silence after which a waiting caller hears the hold prompt.
    pub hold_after: Duration,
    /// The hold prompt: 8 kHz μ-law, played once per episode. Empty: none.
    pub hold_prompt: Arc<[u8]>,
    /// Seeds the backoff jitter.
    pub seed: u64,
    /// A session older than this is renewed, make-before-break, at the first moment both
    /// sides are silent (the provider's session cap, with room to find that moment); `None`:
    /// never.
    pub session_max: Option<Duration>,
}

impl Default for ContinuityConfig {
    fn default() -> Self {
        Self {
            reconnect_budget: Duration::from_millis(3000),
            max_reconnects: 5,
            connect_timeout: Duration::from_secs(10),
            hold_after: Duration::from_millis(700),
            hold_prompt: Arc::from(Vec::new()),
            seed: 0x5EED,
            session_max: None,
        }
    }
}

/// Why a connect attempt failed, as far as the driver could tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectFailure {
    /// HTTP 429 on the handshake.
    RateLimited,
    /// HTTP 5xx on the handshake.
    ServerError,
    /// Any other HTTP refusal (401 bad key, 404 unknown model): retrying will not help.
    Refused,
    Timeout,
    /// DNS, TCP, TLS, or the socket closing during the handshake.
    Network,
    /// The session's provider has no key on this bridge (a tenant moved to a provider the
    /// deployment does not run): nothing to dial, and retrying will not help.
    NotConfigured,
}

impl ConnectFailure {
    /// From the handshake's HTTP status.
    pub fn from_status(status: u16) -> Self {
        match status {
            429 => Self::RateLimited,
            500..=599 => Self::ServerError,
            _ => Self::Refused,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::ServerError => "server_error",
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::Network => "network",
            Self::NotConfigured => "provider_not_configured",
        }
    }
}

/// Why a call fell back to the TwiML after `<Connect>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallbackReason {
    /// No attempt of the episode succeeded; the last one failed so.
    ConnectFailed(ConnectFailure),
    /// The call lost more sessions than [`ContinuityConfig::max_reconnects`].
    TooManyDrops,
}

impl FallbackReason {
    /// Every reason, in the order of [`FallbackReason::index`].
    pub const ALL: [FallbackReason; 7] = [
        Self::ConnectFailed(ConnectFailure::RateLimited),
        Self::ConnectFailed(ConnectFailure::ServerError),
        Self::ConnectFailed(ConnectFailure::Refused),
        Self::ConnectFailed(ConnectFailure::Timeout),
        Self::ConnectFailed(ConnectFailure::Network),
        Self::ConnectFailed(ConnectFailure::NotConfigured),
        Self::TooManyDrops,
    ];

    pub fn index(self) -> usize {
        match self {
            Self::ConnectFailed(failure) => failure as usize,
            Self::TooManyDrops => 6,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConnectFailed(failure) => failure.as_str(),
            Self::TooManyDrops => "too_many_drops",
        }
    }
}

/// How a model session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The socket closed or failed mid-call.
    Dropped,
    /// The model sent nothing (not even a pong) within its deadline.
    Idle,
    /// The model stopped reading our messages.
    Stalled,
    /// The model sent a message over its cap.
    Oversized,
    /// Replaced before its provider's session cap.
    Renewed,
    /// The call ended with it.
    CallEnded,
}

impl SessionEnd {
    /// Every end, in declaration order (`as usize` indexes it).
    pub const ALL: [SessionEnd; 6] = [
        Self::Dropped,
        Self::Idle,
        Self::Stalled,
        Self::Oversized,
        Self::Renewed,
        Self::CallEnded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dropped => "drop",
            Self::Idle => "idle",
            Self::Stalled => "stalled",
            Self::Oversized => "oversized",
            Self::Renewed => "renewal",
            Self::CallEnded => "call_ended",
        }
    }
}

/// One model session of a call, in ms since the call's stream started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub started_ms: u64,
    pub ended_ms: Option<u64>,
    pub end: Option<SessionEnd>,
    /// Failed connect attempts before this session opened, by kind, in order (at most 8).
    pub failed_attempts: Vec<ConnectFailure>,
}

/// What the engine must do next for the call's model session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Dial now; an attempt not done by `deadline` has failed ([`ConnectFailure::Timeout`]).
    Connect { deadline: Instant },
    /// Nothing until [`Reconnector::poll_timeout`].
    Wait,
    /// Fall back.
    GiveUp(FallbackReason),
}

#[derive(Clone, Copy, Debug)]
enum Link {
    /// No session wanted yet.
    Idle,
    Connecting {
        episode_began: Instant,
        failures: u32,
    },
    BackingOff {
        episode_began: Instant,
        failures: u32,
        at: Instant,
    },
    Open,
    GaveUp,
}

/// The schedule for one call's model sessions.
#[derive(Debug)]
pub struct Reconnector {
    config: ContinuityConfig,
    link: Link,
    rng: u64,
    reconnects: u32,
    failed_attempts: Vec<ConnectFailure>,
}

/// Failed attempts remembered per session record.
const FAILED_ATTEMPTS_KEPT: usize = 8;

impl Reconnector {
    pub fn new(config: ContinuityConfig) -> Self {
        // xorshift must not start at zero.
        let rng = config.seed | 1;
        Self {
            config,
            link: Link::Idle,
            rng,
            reconnects: 0,
            failed_attempts: Vec::new(),
        }
    }

    pub fn config(&self) -> &ContinuityConfig {
        &self.config
    }

    /// The call's own hold prompt (its tenant's), in place of the configured one.
    pub fn set_hold_prompt(&mut self, prompt: Arc<[u8]>) {
        self.config.hold_prompt = prompt;
    }

    /// Sessions replaced after a loss so far.
    pub fn reconnects(&self) -> u32 {
        self.reconnects
    }

    /// Whether an episode is under way (no open session, not given up).
    pub fn is_waiting(&self) -> bool {
        matches!(self.link, Link::Connecting { .. } | Link::BackingOff { .. })
    }

    /// The call needs its first session (none was pre-warmed).
    pub fn start(&mut self, now: Instant) -> Step {
        self.begin_episode(now)
    }

    /// The open session was lost: a new episode, unless the call has lost too many.
    pub fn lost(&mut self, now: Instant) -> Step {
        if self.reconnects >= self.config.max_reconnects {
            self.link = Link::GaveUp;
            return Step::GiveUp(FallbackReason::TooManyDrops);
        }
        self.reconnects += 1;
        self.begin_episode(now)
    }

    /// A session was opened for the call without an episode (a pre-warmed one).
    pub fn opened_prewarmed(&mut self) {
        self.link = Link::Open;
    }

    /// The attempt under way failed so.
    pub fn failed(&mut self, now: Instant, failure: ConnectFailure) -> Step {
        let Link::Connecting {
            episode_began,
            failures,
        } = self.link
        else {
            return Step::Wait;
        };
        if self.failed_attempts.len() < FAILED_ATTEMPTS_KEPT {
            self.failed_attempts.push(failure);
        }
        let give_up = Step::GiveUp(FallbackReason::ConnectFailed(failure));
        if matches!(
            failure,
            ConnectFailure::Refused | ConnectFailure::NotConfigured
        ) {
            self.link = Link::GaveUp;
            return give_up;
        }
        let failures = failures + 1;
        let at = now + self.backoff(failures);
        if at >= episode_began + self.config.reconnect_budget {
            self.link = Link::GaveUp;
            return give_up;
        }
        self.link = Link::BackingOff {
            episode_began,
            failures,
            at,
        };
        Step::Wait
    }

    /// The clock reached [`Reconnector::poll_timeout`]: the next attempt, if its time came.
    pub fn due(&mut self, now: Instant) -> Option<Step> {
        let Link::BackingOff {
            episode_began,
            failures,
            at,
        } = self.link
        else {
            return None;
        };
        if now < at {
            return None;
        }
        self.link = Link::Connecting {
            episode_began,
            failures,
        };
        Some(Step::Connect {
            deadline: self.attempt_deadline(now, episode_began),
        })
    }

    /// The attempt under way succeeded: how long the episode took (the caller's gap), and the
    /// attempts that failed before it.
    pub fn connected(&mut self, now: Instant) -> (Duration, Vec<ConnectFailure>) {
        let took = match self.link {
            Link::Connecting { episode_began, .. } | Link::BackingOff { episode_began, .. } => {
                now.saturating_duration_since(episode_began)
            }
            _ => Duration::ZERO,
        };
        self.link = Link::Open;
        (took, std::mem::take(&mut self.failed_attempts))
    }

    /// When [`Reconnector::due`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.link {
            Link::BackingOff { at, .. } => Some(at),
            _ => None,
        }
    }

    fn begin_episode(&mut self, now: Instant) -> Step {
        self.failed_attempts.clear();
        self.link = Link::Connecting {
            episode_began: now,
            failures: 0,
        };
        Step::Connect {
            deadline: self.attempt_deadline(now, now),
        }
    }

    fn attempt_deadline(&self, now: Instant, episode_began: Instant) -> Instant {
        (now + self.config.connect_timeout).min(episode_began + self.config.reconnect_budget)
    }

    /// `FIRST_BACKOFF × 2^(failures-1)`, capped, times a jitter in [0.5, 1.5) so calls that
    /// lost their sessions together do not retry together.
    fn backoff(&mut self, failures: u32) -> Duration {
        let doubling = FIRST_BACKOFF.saturating_mul(1 << failures.saturating_sub(1).min(8));
        let base = doubling.min(MAX_BACKOFF);
        // xorshift64: cheap, seeded, and good enough to spread retries.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let permille = 500 + self.rng % 1000;
        base.mul_f64(permille as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(budget_ms: u64) -> ContinuityConfig {
        ContinuityConfig {
            reconnect_budget: Duration::from_millis(budget_ms),
            ..ContinuityConfig::default()
        }
    }

    #[test]
    fn the_first_attempt_goes_at_once_and_within_the_budget() {
        let t0 = Instant::now();
        let mut reconnector = Reconnector::new(config(3000));
        assert_eq!(
            reconnector.lost(t0),
            Step::Connect {
                deadline: t0 + Duration::from_millis(3000)
            }
        );
        assert!(reconnector.is_waiting());
        let (gap, failed) = reconnector.connected(t0 + Duration::from_millis(140));
        assert_eq!(gap, Duration::from_millis(140));
        assert!(failed.is_empty());
        assert!(!reconnector.is_waiting());
    }

    #[test]
    fn failures_back_off_with_jitter_and_give_up_at_the_budget() {
        let t0 = Instant::now();
        let mut reconnector = Reconnector::new(config(3000));
        let mut now = t0;
        let mut attempts = 1;
        assert!(matches!(reconnector.start(now), Step::Connect { .. }));
        let reason = loop {
            match reconnector.failed(now, ConnectFailure::RateLimited) {
                Step::Wait => {}
                Step::GiveUp(reason) => break reason,
                Step::Connect { .. } => panic!("a failure never dials at once"),
            }
            let at = reconnector.poll_timeout().expect("a backoff is armed");
            assert!(at > now && at - now <= MAX_BACKOFF.mul_f64(1.5));
            assert_eq!(reconnector.due(at - Duration::from_millis(1)), None);
            match reconnector.due(at) {
                Some(Step::Connect { deadline }) => {
                    assert!(deadline <= t0 + Duration::from_millis(3000));
                }
                other => panic!("{other:?}"),
            }
            now = at;
            attempts += 1;
            assert!(attempts < 50, "the budget bounds the attempts");
        };
        assert_eq!(
            reason,
            FallbackReason::ConnectFailed(ConnectFailure::RateLimited)
        );
        assert!(now < t0 + Duration::from_millis(3000));
        assert!(attempts >= 3, "{attempts} attempts in 3 s");
    }

    #[test]
    fn a_refusal_gives_up_at_once_and_losses_are_capped() {
        let t0 = Instant::now();
        let mut reconnector = Reconnector::new(config(3000));
        reconnector.start(t0);
        assert_eq!(
            reconnector.failed(t0, ConnectFailure::Refused),
            Step::GiveUp(FallbackReason::ConnectFailed(ConnectFailure::Refused))
        );

        let mut reconnector = Reconnector::new(ContinuityConfig {
            max_reconnects: 2,
            ..config(3000)
        });
        reconnector.opened_prewarmed();
        for _ in 0..2 {
            assert!(matches!(reconnector.lost(t0), Step::Connect { .. }));
            reconnector.connected(t0);
        }
        assert_eq!(
            reconnector.lost(t0),
            Step::GiveUp(FallbackReason::TooManyDrops)
        );
    }

    #[test]
    fn label_lists_match_their_indices() {
        for (index, reason) in FallbackReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), index, "{reason:?}");
        }
        for (index, end) in SessionEnd::ALL.iter().enumerate() {
            assert_eq!(*end as usize, index);
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let schedule = |seed| {
            let t0 = Instant::now();
            let mut reconnector = Reconnector::new(ContinuityConfig {
                seed,
                ..config(60_000)
            });
            reconnector.start(t0);
            (0..6)
                .map(|_| {
                    reconnector.failed(t0, ConnectFailure::Timeout);
                    let at = reconnector.poll_timeout().unwrap();
                    reconnector.due(at);
                    at - t0
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(schedule(7), schedule(7));
        assert_ne!(schedule(7), schedule(8));
    }
}
