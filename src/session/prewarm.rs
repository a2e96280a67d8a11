//! Calls the voice webhook prepared, waiting for their Media Stream to claim them.
//!
//! The webhook starts two things before Twilio has even opened the stream: the tenant lookup
//! and, when enabled, a pre-warmed upstream session (connected, `session.update` sent and
//! `session.updated` received, the greeting's `response.create` held back). Both run in one
//! preparing task per `CallSid`; the stream's `start` claims the result by `CallSid` — after
//! its binding token proved the stream belongs to that call — so the greeting can start the
//! moment the stream does. Invariants: one preparation per `CallSid` (Twilio retries a slow
//! webhook); at most `capacity` calls pending; a preparation nobody claims within
//! `unclaimed_after` of finishing is dropped and its upstream session closed politely, counted
//! as unclaimed; shutdown closes every unclaimed session.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::agent::CallAgent;
use super::metrics::Metrics;
use crate::config::UpstreamTarget;
use crate::upstream::{
    OpenAiRealtime, RealtimeProtocol, SessionSettings, UpstreamError, UpstreamEvent,
    UpstreamSocket, connect,
};

/// What the webhook prepared for one call.
pub struct Prepared {
    pub agent: CallAgent,
    /// How long the tenant lookup took.
    pub lookup_took: Duration,
    /// `None` when pre-warm is off or failed: the stream then connects cold.
    pub session: Option<PrewarmedSession>,
}

/// An upstream session already configured for a call's agent.
pub struct PrewarmedSession {
    /// The protocol state that configured the socket (it knows the session is ready).
    pub protocol: OpenAiRealtime,
    pub socket: UpstreamSocket,
    /// Messages the protocol produced that must wait for the call: the greeting.
    pub held: Vec<String>,
    /// Connect plus configure.
    pub took: Duration,
    pub ready_at: Instant,
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

/// Opens the upstream socket and configures the session for `settings`, holding back the
/// greeting until the call claims it.
pub async fn prewarm(
    target: &UpstreamTarget,
    settings: SessionSettings,
    within: Duration,
) -> Result<PrewarmedSession, PrewarmError> {
    let began = Instant::now();
    let work = async {
        let mut socket = connect(&target.url, target.api_key.as_ref()).await?;
        let mut protocol = OpenAiRealtime::new(settings);
        let mut out = Vec::new();
        protocol.on_open(&mut out);
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
            match protocol.on_message(text.as_str(), &mut out)? {
                UpstreamEvent::SessionReady => break,
                UpstreamEvent::Error { message, .. } => {
                    return Err(PrewarmError::Refused(message.into_owned()));
                }
                _ => {}
            }
        }
        Ok::<_, PrewarmError>((protocol, socket, out))
    };
    let (protocol, socket, held) = tokio::time::timeout(within, work)
        .await
        .map_err(|_| PrewarmError::Timeout(within))??;
    Ok(PrewarmedSession {
        protocol,
        socket,
        held,
        took: began.elapsed(),
        ready_at: Instant::now(),
    })
}

/// Calls prepared by the webhook, by `CallSid`. Shared by every request; entries are touched
/// once at the webhook and once at `start`, never on the media path.
pub struct PendingCalls {
    calls: DashMap<String, oneshot::Receiver<Prepared>>,
    metrics: Arc<Metrics>,
    unclaimed_after: Duration,
    capacity: usize,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl PendingCalls {
    pub fn new(metrics: Arc<Metrics>, unclaimed_after: Duration, capacity: usize) -> Self {
        Self {
            calls: DashMap::new(),
            metrics,
            unclaimed_after,
            capacity,
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        }
    }

    /// Starts preparing `call_sid` with `work`, unless it is already pending (a retried
    /// webhook) or too many calls are. Returns whether work was started.
    pub fn prepare<F>(self: &Arc<Self>, call_sid: &str, work: F) -> bool
    where
        F: Future<Output = Prepared> + Send + 'static,
    {
        if self.calls.len() >= self.capacity {
            tracing::warn!(
                capacity = self.capacity,
                "too many calls pending: not preparing this one"
            );
            return false;
        }
        let sender = match self.calls.entry(call_sid.to_owned()) {
            Entry::Occupied(_) => return false,
            Entry::Vacant(vacant) => {
                let (sender, receiver) = oneshot::channel();
                vacant.insert(receiver);
                sender
            }
        };
        let this = Arc::clone(self);
        let call_sid = call_sid.to_owned();
        self.tasks.spawn(async move {
            let prepared = tokio::select! {
                prepared = work => prepared,
                () = this.shutdown.cancelled() => {
                    this.calls.remove(&call_sid);
                    return;
                }
            };
            if let Err(unclaimed) = sender.send(prepared) {
                // The stream claimed the call and gave up waiting: close what we opened.
                if let Some(session) = unclaimed.session {
                    session.close("call gone").await;
                }
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(this.unclaimed_after) => {}
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
        true
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
    use crate::upstream::mock::{MockConfig, MockRealtimeServer};

    fn agent() -> CallAgent {
        CallAgent::from_defaults(&AgentDefaults::default(), "static")
    }

    #[tokio::test]
    async fn prewarm_configures_the_session_and_holds_the_greeting() {
        let mock = MockRealtimeServer::start(MockConfig::default())
            .await
            .expect("mock");
        let target = UpstreamTarget {
            url: mock.url(),
            api_key: Some(crate::Secret::new("sk-test")),
        };
        let settings = SessionSettings {
            voice: "cedar".into(),
            greeting: Some("Hi there".into()),
            ..SessionSettings::default()
        };
        let session = prewarm(&target, settings, Duration::from_secs(5))
            .await
            .expect("prewarm");
        assert_eq!(session.held.len(), 1, "{:?}", session.held);
        assert!(session.held[0].contains("response.create"));
        assert!(session.held[0].contains("Hi there"));
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
        let target = UpstreamTarget { url, api_key: None };
        let result = prewarm(&target, SessionSettings::default(), Duration::from_secs(5)).await;
        assert!(result.is_err());
    }

    #[tokio::test]
    async fn a_claimed_call_gets_its_preparation_and_a_second_webhook_is_ignored() {
        let pending = Arc::new(PendingCalls::new(
            Arc::new(Metrics::default()),
            Duration::from_secs(5),
            10,
        ));
        let prepared = |source| async move {
            Prepared {
                agent: CallAgent { source, ..agent() },
                lookup_took: Duration::ZERO,
                session: None,
            }
        };
        assert!(pending.prepare("CA1", prepared("fresh")));
        assert!(
            !pending.prepare("CA1", prepared("stale")),
            "retried webhook"
        );
        let receiver = pending.claim("CA1").expect("pending");
        assert_eq!(receiver.await.expect("prepared").agent.source, "fresh");
        assert!(pending.claim("CA1").is_none(), "claimed once");
        assert!(pending.claim("CA2").is_none());
    }

    #[tokio::test]
    async fn an_unclaimed_session_is_closed_and_counted() {
        let mock = MockRealtimeServer::start(MockConfig::default())
            .await
            .expect("mock");
        let target = UpstreamTarget {
            url: mock.url(),
            api_key: Some(crate::Secret::new("sk-test")),
        };
        let metrics = Arc::new(Metrics::default());
        let pending = Arc::new(PendingCalls::new(
            Arc::clone(&metrics),
            Duration::from_millis(50),
            10,
        ));
        pending.prepare("CA1", async move {
            Prepared {
                agent: agent(),
                lookup_took: Duration::ZERO,
                session: prewarm(&target, SessionSettings::default(), Duration::from_secs(5))
                    .await
                    .ok(),
            }
        });
        let log = mock.log();
        let deadline = Instant::now() + Duration::from_secs(5);
        while metrics.prewarm_unclaimed.load(Relaxed) == 0 || log.active_sessions() > 0 {
            assert!(Instant::now() < deadline, "unclaimed session not closed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(log.sessions().len(), 1);
        assert!(pending.is_empty());
    }

    #[tokio::test]
    async fn capacity_bounds_the_pending_calls() {
        let pending = Arc::new(PendingCalls::new(
            Arc::new(Metrics::default()),
            Duration::from_secs(5),
            2,
        ));
        let never = || async { std::future::pending::<Prepared>().await };
        assert!(pending.prepare("CA1", never()));
        assert!(pending.prepare("CA2", never()));
        assert!(!pending.prepare("CA3", never()));
        pending.shutdown(Duration::from_secs(1)).await;
        assert!(pending.is_empty());
    }
}
