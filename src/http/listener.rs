//! The accept loop: one HTTP/1.1 connection per task, with deadlines and caps.
//!
//! Own loop rather than `axum::serve`, which has no header-read timeout and no connection cap.
//! Each connection: admitted against its listener's [`ConnectionLimits`] (closed at once when
//! over a cap), `TCP_NODELAY` set (media messages are small and latency-bound: Nagle must not
//! hold one back), served by hyper with a header-read timeout that also applies between
//! requests on a kept-alive connection (hyper restarts it whenever the connection goes idle),
//! so neither a half-sent head nor an idle connection stays open past it; a connection none
//! of whose requests passed a signature check is closed at its unverified lifetime however
//! busy it is (so a slot of the unverified cap cannot be held for ever). Upgrades are
//! enabled for the Media Streams WebSocket; an upgraded socket leaves hyper, and its
//! [`Connection`] slot travels on with the call task. On stop: no more accepts, idle
//! connections close at once, a request in flight gets [`STOP_GRACE`], then its connection is
//! dropped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

use super::limits::{Connection, ConnectionHandle, ConnectionLimits};
use super::warn_rate::WarnRate;
use crate::session::metrics::{ListenerRefusal, Metrics};

/// On stop, how long a request already in flight may take before its connection is dropped.
pub const STOP_GRACE: Duration = Duration::from_secs(2);
/// After a failed accept (e.g. out of file descriptors), wait before the next one instead of
/// spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What one listener enforces.
#[derive(Clone)]
pub struct ListenerSettings {
    pub limits: Arc<ConnectionLimits>,
    pub header_read_timeout: Duration,
    /// A connection still unverified this long after accept is closed (`None`: never).
    pub unverified_lifetime: Option<Duration>,
    /// Where refusals and header timeouts are counted (`None` for the admin listener).
    pub metrics: Option<Arc<Metrics>>,
    /// Route-level warnings' allowance, shared with the routes.
    pub warnings: Arc<WarnRate>,
    /// A name for log lines.
    pub name: &'static str,
}

/// Accepts until `stop`, serving each connection on a task of `connections`.
pub async fn accept_loop(
    listener: TcpListener,
    router: Router,
    settings: ListenerSettings,
    stop: CancellationToken,
    connections: TaskTracker,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(listener = settings.name, %error, "accept failed");
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
                }
            },
        };
        let connection = match settings.limits.admit() {
            Ok(connection) => connection,
            Err(why) => {
                // Dropping the socket closes it: no request is read, nothing is answered.
                drop(tcp);
                if let Some(suppressed) = settings.warnings.allow(Instant::now()) {
                    tracing::warn!(
                        listener = settings.name,
                        %peer,
                        reason = why.as_str(),
                        open = settings.limits.open(),
                        unverified = settings.limits.unverified(),
                        suppressed,
                        "connection refused: at the cap"
                    );
                }
                continue;
            }
        };
        connections.spawn(serve_connection(
            tcp,
            router.clone(),
            connection,
            settings.clone(),
            stop.clone(),
        ));
    }
    // `listener` drops here: the port stops accepting before the caller waits for connections.
}

async fn serve_connection(
    tcp: TcpStream,
    router: Router,
    connection: Arc<Connection>,
    settings: ListenerSettings,
    stop: CancellationToken,
) {
    if let Err(error) = tcp.set_nodelay(true) {
        tracing::debug!(%error, "could not set TCP_NODELAY");
    }
    let handle = ConnectionHandle(Arc::clone(&connection));
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(handle.clone());
        router.clone().oneshot(request.map(Body::new))
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout);
    let served = builder
        .serve_connection(TokioIo::new(tcp), service)
        .with_upgrades();
    let mut served = std::pin::pin!(served);
    let unverified_deadline = async {
        match settings.unverified_lifetime {
            Some(lifetime) => tokio::time::sleep(lifetime).await,
            None => std::future::pending().await,
        }
    };
    let mut unverified_deadline = std::pin::pin!(unverified_deadline);
    let mut deadline_armed = settings.unverified_lifetime.is_some();
    // `None`: close the connection (stop, or still unverified at its deadline).
    let ended = loop {
        tokio::select! {
            result = served.as_mut() => break Some(result),
            () = stop.cancelled() => break None,
            () = unverified_deadline.as_mut(), if deadline_armed => {
                deadline_armed = false;
                if !connection.is_verified() {
                    if let Some(metrics) = &settings.metrics {
                        metrics.listener.refused(ListenerRefusal::UnverifiedLifetime);
                    }
                    break None;
                }
            }
        }
    };
    drop(connection);
    let result = match ended {
        Some(result) => result,
        None => {
            // Closes an idle connection at once; lets a request in flight finish, for up to
            // `STOP_GRACE`, then drops it anyway.
            served.as_mut().graceful_shutdown();
            tokio::time::timeout(STOP_GRACE, served)
                .await
                .unwrap_or(Ok(()))
        }
    };
    if let Err(error) = result {
        if error.is_timeout() {
            if let Some(metrics) = &settings.metrics {
                metrics.listener.refused(ListenerRefusal::HeaderTimeout);
            }
            tracing::debug!(
                listener = settings.name,
                "request head not received in time: closed"
            );
        } else {
            tracing::debug!(listener = settings.name, %error, "connection ended with an error");
        }
    }
}
