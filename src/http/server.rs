//! Starting, draining and stopping a bridge.
//!
//! Shutdown order, so that no call is cut short that could have finished: (1) mark the bridge
//! draining — `/readyz` answers 503 so the load balancer stops sending work, and new webhooks and
//! streams are refused; (2) wait for live calls to end, up to the drain budget
//! (`VOXRELAY_DRAIN_SECONDS`, below the platform's kill timeout); (3) cancel what is left, which
//! closes both sockets of each call cleanly; (4) close the pre-warmed sessions nobody claimed; (5)
//! wait for every ended call to hand its report over, then give the reports a last try and spool
//! the rest; (6) stop both HTTP listeners (public and admin): no more accepts, idle connections
//! closed, a request in flight gets [`listener::STOP_GRACE`]. The admin listener serves `/metrics`
//! until the very end, so a drain can be watched. [`stop_budget`] is the longest all of it can
//! take.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::limits::{CallSlots, ConnectionLimits};
use super::listener::{self, ListenerSettings, accept_loop};
use super::routes::{AppState, admin_router, router};
use super::warn_rate::{WARNINGS_PER_SECOND, WarnRate};
use crate::config::{BridgeConfig, ControlPlaneTarget};
use crate::control::client::{ControlPlaneClient, ControlPlaneSettings};
use crate::control::directory::{DirectorySettings, TenantDirectory};
use crate::control::reports::{ReportSender, ReportSettings};
use crate::session::binding::StreamTokens;
use crate::session::call::{CallServices, ControlServices};
use crate::session::metrics::Metrics;
use crate::session::playback::PlaybackConfig;
use crate::session::prewarm::{PendingCalls, PendingLimits};
use crate::session::registry::CallRegistry;
use crate::twilio::signature::SignatureValidator;

/// How long cancelled calls get to close their sockets after the drain budget runs out.
const CANCEL_GRACE: Duration = Duration::from_secs(3);

/// Calls the webhook may have prepared and not yet seen a stream for; beyond it new calls
/// simply start cold.
const MAX_PENDING_CALLS: usize = 10_000;

/// How long undelivered call reports may keep trying at shutdown before they are spooled.
const REPORT_GRACE: Duration = Duration::from_secs(2);

/// Connections the admin listener keeps open at once: a scraper or two and an operator.
const ADMIN_MAX_CONNECTIONS: usize = 16;

/// The longest [`Bridge::drain_and_stop`] can take with a drain budget of `drain`: the budget,
/// the grace for cancelled calls, the pre-warmed sessions' close, the wait for ended calls to
/// hand their reports over, the reports' last try and the listeners' stop. The platform's kill
/// timeout must be longer (see `fly.toml`).
pub fn stop_budget(drain: Duration) -> Duration {
    drain + 3 * CANCEL_GRACE + REPORT_GRACE + listener::STOP_GRACE
}

/// The control plane's client, directory and report sender for `target`; spooled reports
/// from an earlier run start going out at once.
fn control_services(
    target: &ControlPlaneTarget,
    metrics: &Arc<Metrics>,
) -> std::io::Result<ControlServices> {
    let settings = ControlPlaneSettings::new(target.url.clone(), target.key.clone());
    let client = ControlPlaneClient::new(settings, Arc::clone(metrics))
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
    let directory = TenantDirectory::new(
        client.clone(),
        DirectorySettings {
            budget: target.lookup_budget,
            ttl: target.context_ttl,
            stale_while_revalidate: target.context_stale,
            ..DirectorySettings::default()
        },
        Arc::clone(metrics),
    );
    let reports = ReportSender::new(
        client.clone(),
        ReportSettings {
            retry_window: target.report_retry,
            resend_interval: target.report_resend,
            ..ReportSettings::new(target.report_spool_dir.clone())
        },
        Arc::clone(metrics),
    );
    reports.spawn_resend_loop();
    Ok(ControlServices {
        client,
        directory,
        reports,
    })
}

/// A running bridge.
pub struct Bridge {
    addr: SocketAddr,
    admin_addr: SocketAddr,
    state: Arc<AppState>,
    stop_http: CancellationToken,
    /// The two accept loops.
    servers: [JoinHandle<()>; 2],
    /// Every HTTP connection's task, on both listeners.
    connections: TaskTracker,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainOutcome {
    /// Calls still live when the drain began.
    pub calls_at_start: usize,
    /// Calls that had to be cancelled because the drain budget ran out.
    pub calls_cancelled: usize,
}

impl Bridge {
    /// Binds `config.listen` (public) and `config.admin_listen` (metrics) and serves until
    /// [`Bridge::drain_and_stop`].
    pub async fn start(config: &BridgeConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let admin_listener = TcpListener::bind(config.admin_listen).await?;
        let admin_addr = admin_listener.local_addr()?;
        let metrics = Arc::new(Metrics::default());
        let control = match &config.control_plane {
            Some(target) => Some(control_services(target, &metrics)?),
            None => None,
        };
        let services = Arc::new(CallServices {
            metrics: Arc::clone(&metrics),
            registry: CallRegistry::new(Arc::clone(&metrics)),
            models: config.models.clone(),
            agent: config.agent.clone(),
            playback: PlaybackConfig {
                lead: config.playback_lead,
                ..PlaybackConfig::default()
            },
            pending: Arc::new(PendingCalls::new(
                Arc::clone(&metrics),
                PendingLimits {
                    max_prewarms: config.max_prewarms,
                    ..PendingLimits::new(config.prewarm_unclaimed_after, MAX_PENDING_CALLS)
                },
            )),
            tokens: StreamTokens::from_auth_token(&config.twilio_auth_token),
            require_stream_token: config.require_stream_token,
            prewarm: config.prewarm,
            twilio_account_sid: config.twilio_account_sid.clone(),
            control,
            continuity: config.continuity.clone(),
            recording: config.recording.clone(),
        });
        let limits = config.limits.clone();
        let call_slots = CallSlots::new(
            limits.max_calls,
            limits.max_unstarted_streams,
            limits.call_reservation,
            Arc::clone(&metrics),
        );
        let warnings = Arc::new(WarnRate::new(WARNINGS_PER_SECOND, Arc::clone(&metrics)));
        let state = Arc::new(AppState {
            validator: SignatureValidator::new(config.twilio_auth_token.clone()),
            // After binding: a `PublicUrl::Listener` needs the port just picked.
            public_url: config.public_url.resolve(addr),
            metrics: Arc::clone(&metrics),
            services,
            draining: AtomicBool::new(false),
            calls_cancel: CancellationToken::new(),
            calls: TaskTracker::new(),
            fly_machine_id: config.fly_machine_id.clone(),
            limits: limits.clone(),
            call_slots,
            warnings: Arc::clone(&warnings),
        });
        let stop_http = CancellationToken::new();
        let connections = TaskTracker::new();
        let public = ListenerSettings {
            limits: ConnectionLimits::new(
                limits.max_connections,
                limits.max_unverified_connections,
                Some(Arc::clone(&metrics)),
            ),
            header_read_timeout: limits.header_read_timeout,
            unverified_lifetime: Some(limits.unverified_lifetime),
            metrics: Some(Arc::clone(&metrics)),
            warnings: Arc::clone(&warnings),
            name: "public",
        };
        // Private and unsigned: nothing on it is "verified", so its cap is all there is.
        let admin = ListenerSettings {
            limits: ConnectionLimits::new(ADMIN_MAX_CONNECTIONS, ADMIN_MAX_CONNECTIONS, None),
            header_read_timeout: limits.header_read_timeout,
            unverified_lifetime: None,
            metrics: None,
            warnings,
            name: "admin",
        };
        let servers = [
            tokio::spawn(accept_loop(
                listener,
                router(Arc::clone(&state)),
                public,
                stop_http.clone(),
                connections.clone(),
            )),
            tokio::spawn(accept_loop(
                admin_listener,
                admin_router(Arc::clone(&state)),
                admin,
                stop_http.clone(),
                connections.clone(),
            )),
        ];
        Ok(Self {
            addr,
            admin_addr,
            state,
            stop_http,
            servers,
            connections,
        })
    }

    /// The public listener: Twilio's webhooks and streams, health and readiness.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener: `/metrics` (and health and readiness).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.state.metrics
    }

    pub fn registry(&self) -> &Arc<CallRegistry> {
        &self.state.services.registry
    }

    /// Live call tasks, including sockets that have not sent `start` yet.
    pub fn live_call_tasks(&self) -> usize {
        self.state.calls.len()
    }

    /// Drains (see the module docs) and stops.
    pub async fn drain_and_stop(self, drain: Duration) -> DrainOutcome {
        self.state.draining.store(true, Relaxed);
        self.state.calls.close();
        let calls_at_start = self.state.calls.len();
        if calls_at_start > 0 {
            tracing::info!(calls = calls_at_start, budget = ?drain, "draining: waiting for live calls");
        }
        let mut calls_cancelled = 0;
        if tokio::time::timeout(drain, self.state.calls.wait())
            .await
            .is_err()
        {
            calls_cancelled = self.state.calls.len();
            tracing::warn!(
                calls = calls_cancelled,
                "drain budget spent: closing the remaining calls"
            );
            self.state.calls_cancel.cancel();
            let _ = tokio::time::timeout(CANCEL_GRACE, self.state.calls.wait()).await;
        }
        // Pre-warmed sessions nobody claimed are closed politely, not dropped.
        self.state.services.pending.shutdown(CANCEL_GRACE).await;
        if let Some(control) = &self.state.services.control {
            // A call hands its report over as soon as its loop ends, before it waits on its
            // sockets; the cancellation above ended every loop, so this wait is short. Only
            // then may the process go: a report still inside a call task would die with it.
            control.reports.wait_for_handovers(CANCEL_GRACE).await;
            // Reports of the calls just ended get a last chance; what is left goes to the spool.
            control.reports.shutdown(REPORT_GRACE).await;
        }
        self.stop_http.cancel();
        for server in self.servers {
            if let Err(error) = server.await {
                tracing::error!(%error, "http accept loop failed");
            }
        }
        // Each connection gives up within `listener::STOP_GRACE` of the stop.
        self.connections.close();
        self.connections.wait().await;
        DrainOutcome {
            calls_at_start,
            calls_cancelled,
        }
    }
}

/// Resolves on SIGTERM (what Fly and Docker send) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT: draining"),
        () = terminate => tracing::info!("SIGTERM: draining"),
    }
}
