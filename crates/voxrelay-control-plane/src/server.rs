//! The reference control plane's HTTP server: `GET /v1/context`, `POST
//! /v1/calls/{call_sid}/report`, `POST /v1/tools/{name}` and `GET /v1/calls`, every one signed.
//!
//! Owns the listener, its connections and the routes. Invariants: no handler runs before the
//! request's signature has been verified over its exact method, request-line target and body
//! bytes (the check wraps the whole router, unknown paths included, so an unsigned sender learns
//! nothing but `401` and a reason code); no body byte is read before the headers' shape, the key
//! id and the timestamp window have passed, so a sender without a key cannot make the server
//! buffer or wait for anything; bodies are then read within [`BODY_READ_TIMEOUT`] and up to
//! [`MAX_BODY_BYTES`] and refused beyond either; each key has a scope and every route needs
//! one (`bridge`: context, reports, tools; `operator`: call history), answered `403` otherwise;
//! every answer that is not a success is `{"error": <code>}` and nothing else;
//! store calls run on the blocking pool; [`RunningControlPlane::stop`] returns only once the
//! listener is closed and every connection, idle keep-alive ones included, is gone, so a
//! bridge's pooled client cannot keep talking to a stopped control plane and the address can be
//! bound again at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;
use url::Url;

use super::seed::{SHIPPED_SEED, SeedError, SeedSource};
use super::store::{DbLocation, Refusal, SeedOutcome, Store, StoreError};
use voxrelay_core::control::api::{
    self, CallReport, ErrorBody, ReportAck, ToolRequest, ToolResponse,
};
use voxrelay_core::control::signing::{Rejection, Scope, SignedHeaders, SigningKey, Verifier};
use voxrelay_core::logtext::redact_number;

/// Largest request body accepted; a report with a long transcript is well under it.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// `GET /v1/calls` without `limit`.
pub const DEFAULT_HISTORY_LIMIT: usize = 50;
/// `GET /v1/calls` caps `limit` here.
pub const MAX_HISTORY_LIMIT: usize = 500;
/// Open connections at most; the accept loop waits for a free slot beyond that (a bridge keeps
/// a small pool, so this only bounds misbehaving clients).
const MAX_CONNECTIONS: usize = 256;
/// A client must send a request's headers within this long of starting it.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A request that passed the header checks must deliver its whole body within this long
/// (`408 body_timeout` otherwise, and the connection is closed).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// On stop, how long a request already in flight may take to finish before its connection is
/// dropped anyway.
pub const STOP_GRACE: Duration = Duration::from_secs(2);
/// After a failed accept (e.g. out of file descriptors), wait before the next one instead of
/// spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A control plane for one process (the demo, the benchmark): loopback, SQLite in memory,
/// the shipped seed (its hold prompt compiled in with it), and a fresh random key, returned so
/// the bridge can sign with it.
pub async fn start_embedded() -> Result<(RunningControlPlane, SigningKey), ControlPlaneError> {
    let key = SigningKey::new(
        "embedded",
        voxrelay_core::Secret::new(format!("{:032x}", rand::random::<u128>())),
    );
    let running = ControlPlane::start(ControlPlaneConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        db: DbLocation::InMemory,
        seed: Some(SeedSource::shipped()),
        verifier: Verifier::new(vec![key.clone()]),
    })
    .await?;
    Ok((running, key))
}

/// The seed the repository ships (`fixtures/tenants.toml`), for demos and tests; the files it
/// names come with [`SeedSource::with_shipped_files`].
pub fn seed_toml() -> &'static str {
    SHIPPED_SEED
}

/// How to run a control plane.
#[derive(Debug)]
pub struct ControlPlaneConfig {
    /// Port 0 picks a free port; see [`RunningControlPlane::local_addr`].
    pub listen: SocketAddr,
    pub db: DbLocation,
    /// The seed (TOML, and where the files it names are read), applied on every start; `None`
    /// serves the database as it is.
    pub seed: Option<SeedSource>,
    /// Holds the keys that may sign (e.g. from [`Verifier::from_key_list`]).
    pub verifier: Verifier,
}

/// Why a control plane did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlPlaneError {
    #[error("no usable signing key: every request would be refused")]
    NoKeys,
    #[error("seed: {0}")]
    Seed(#[from] SeedError),
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("opening the database: the blocking task failed")]
    StoreTask,
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The reference control plane; see [`ControlPlane::start`].
pub struct ControlPlane;

impl ControlPlane {
    /// Opens the database, applies the seed, binds `listen` and serves until
    /// [`RunningControlPlane::stop`] (or until the returned value is dropped).
    pub async fn start(
        config: ControlPlaneConfig,
    ) -> Result<RunningControlPlane, ControlPlaneError> {
        if config.verifier.key_ids().is_empty() {
            return Err(ControlPlaneError::NoKeys);
        }
        let db = config.db.clone();
        let seed = config.seed;
        // On the blocking pool: parsing reads the hold prompt files the seed names.
        let (store, seed_outcome) = tokio::task::spawn_blocking(move || {
            // Parse before touching the database, so a bad seed changes nothing.
            let seed = seed.as_ref().map(SeedSource::parse).transpose()?;
            let store = Store::open(&db)?;
            let outcome = seed.map(|seed| store.apply_seed(&seed)).transpose()?;
            Ok::<_, ControlPlaneError>((store, outcome))
        })
        .await
        .map_err(|_| ControlPlaneError::StoreTask)??;
        if let Some(outcome) = seed_outcome {
            tracing::info!(
                tenants_written = outcome.tenants_written,
                numbers_written = outcome.numbers_written,
                numbers_removed = outcome.numbers_removed,
                "seed applied"
            );
        }

        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ControlPlaneError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ControlPlaneError::Bind {
                addr: config.listen,
                source,
            })?;
        let mut verifier = config.verifier;
        // Nonces live in memory: a request captured before this start must not replay now.
        verifier.refuse_before(unix_now().as_secs());
        let state = Arc::new(AppState {
            verifier: Mutex::new(verifier),
            store: store.clone(),
        });
        let shutdown = CancellationToken::new();
        let connections = TaskTracker::new();
        let accept = tokio::spawn(accept_loop(
            listener,
            router(state),
            shutdown.clone(),
            connections.clone(),
        ));
        Ok(RunningControlPlane {
            addr,
            store,
            seed_outcome,
            shutdown,
            accept,
            connections,
        })
    }
}

/// A control plane serving on [`RunningControlPlane::local_addr`]. Dropping it stops accepting
/// and closes its connections in the background; [`RunningControlPlane::stop`] waits for that.
pub struct RunningControlPlane {
    addr: SocketAddr,
    store: Store,
    seed_outcome: Option<SeedOutcome>,
    shutdown: CancellationToken,
    accept: JoinHandle<()>,
    connections: TaskTracker,
}

impl RunningControlPlane {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<local_addr>` (the base the bridge's client is given).
    pub fn url(&self) -> Url {
        Url::parse(&format!("http://{}", self.addr)).expect("http://<socket address> parses")
    }

    /// The store behind the server (for operators' tools and tests; blocking calls).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// What seeding wrote at start, if a seed was given.
    pub fn seed_outcome(&self) -> Option<SeedOutcome> {
        self.seed_outcome
    }

    /// Stops accepting, closes idle connections at once, gives requests in flight up to
    /// [`STOP_GRACE`] and drops whatever is left. When it returns the port is free and no
    /// connection of this control plane remains open.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Err(error) = (&mut self.accept).await {
            tracing::error!(%error, "control plane accept loop failed");
        }
        self.connections.close();
        self.connections.wait().await;
        tracing::info!(listen = %self.addr, "control plane stopped");
    }
}

impl Drop for RunningControlPlane {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Shared by every request.
struct AppState {
    /// Verification is a few microseconds of hashing; a plain mutex is cheaper than a task hop.
    verifier: Mutex<Verifier>,
    store: Store,
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(api::CONTEXT_PATH, get(context))
        .route(api::CALLS_PATH, get(call_history))
        .route("/v1/calls/{call_sid}/report", post(report))
        .route("/v1/tools/{name}", post(tool))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found") })
        .method_not_allowed_fallback(|| async {
            error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
        })
        // Outermost, so it also guards the fallbacks: nothing is answered unsigned but 401.
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            authenticate,
        ))
        .with_state(state)
}

async fn accept_loop(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    connections: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => break,
            },
        };
        let tcp = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => tcp,
                Err(error) => {
                    tracing::warn!(%error, "control plane accept failed");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
                }
            },
        };
        connections.spawn(serve_connection(
            tcp,
            router.clone(),
            shutdown.clone(),
            permit,
        ));
    }
    // `listener` drops here: the port stops accepting before `stop` waits for connections.
}

/// One HTTP/1.1 connection, with keep-alive, until the client closes it or the control plane
/// stops. Own loop rather than `axum::serve` so stop can bound the wait for a slow request.
async fn serve_connection(
    tcp: TcpStream,
    router: Router,
    shutdown: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    if let Err(error) = tcp.set_nodelay(true) {
        tracing::debug!(%error, "could not set TCP_NODELAY");
    }
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        router.clone().oneshot(request.map(Body::new))
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let connection = builder.serve_connection(TokioIo::new(tcp), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%error, "control plane connection ended with an error");
            }
        }
        () = shutdown.cancelled() => {
            // Closes an idle keep-alive connection at once; lets a request in flight finish.
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(STOP_GRACE, connection).await;
        }
    }
}

/// Verifies the request's signature before any handler runs: the header checks first, then
/// the body (bounded in size and time), then the MAC and the nonce. The key's [`Scope`] goes
/// into the request's extensions for the routes' [`BridgeKey`] and [`OperatorKey`].
async fn authenticate(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    let signed = SignedHeaders::from_headers(|name| {
        parts
            .headers
            .get(name)
            .and_then(|value| value.to_str().ok())
    });
    // The verifier's state is always consistent between calls; a panic elsewhere while holding
    // the lock cannot have left it half-updated in a way that matters.
    let verifier = || {
        state
            .verifier
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    };
    let signed = match signed.and_then(|signed| {
        verifier()
            .precheck(
                unix_now().as_secs(),
                &signed,
                parts.method.as_str(),
                &path_and_query,
            )
            .map(|_| signed)
    }) {
        Ok(signed) => signed,
        Err(rejection) => return refuse(&parts, rejection),
    };
    let declared_length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    }
    let read = Limited::new(body, MAX_BODY_BYTES).collect();
    let body = match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(failure)) if failure.is::<LengthLimitError>() => {
            return error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
        }
        Ok(Err(_)) => return error(StatusCode::BAD_REQUEST, "bad_body"),
        Err(_elapsed) => {
            tracing::warn!(
                method = %parts.method,
                path = parts.uri.path(),
                timeout = ?BODY_READ_TIMEOUT,
                "control-plane request body not received in time"
            );
            let mut response = error(StatusCode::REQUEST_TIMEOUT, "body_timeout");
            // The rest of the body may still be on its way: this connection cannot be reused.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
    };
    let verdict = verifier().verify(
        unix_now().as_secs(),
        &signed,
        parts.method.as_str(),
        &path_and_query,
        &body,
    );
    match verdict {
        Ok(scope) => {
            parts.extensions.insert(scope);
            next.run(Request::from_parts(parts, Body::from(body))).await
        }
        Err(rejection) => refuse(&parts, rejection),
    }
}

fn refuse(parts: &axum::http::request::Parts, rejection: Rejection) -> Response {
    // The path only: the query carries phone numbers.
    tracing::warn!(
        method = %parts.method,
        path = parts.uri.path(),
        reason = rejection.as_str(),
        "refused an unsigned or badly signed control-plane request"
    );
    error(StatusCode::UNAUTHORIZED, rejection.as_str())
}

/// A handler argument that admits only requests signed with a [`Scope::Bridge`] key.
struct BridgeKey;

/// A handler argument that admits only requests signed with a [`Scope::Operator`] key.
struct OperatorKey;

/// A request signed with a key of another scope: `403 insufficient_scope`.
struct WrongScope;

impl IntoResponse for WrongScope {
    fn into_response(self) -> Response {
        error(StatusCode::FORBIDDEN, "insufficient_scope")
    }
}

/// `Err` unless the request's verified key has `wanted`.
fn require_scope(parts: &axum::http::request::Parts, wanted: Scope) -> Result<(), WrongScope> {
    if parts.extensions.get::<Scope>() == Some(&wanted) {
        Ok(())
    } else {
        tracing::warn!(
            path = parts.uri.path(),
            needs = wanted.as_str(),
            "refused a control-plane request signed with a key of another scope"
        );
        Err(WrongScope)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for BridgeKey {
    type Rejection = WrongScope;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, WrongScope> {
        require_scope(parts, Scope::Bridge).map(|()| BridgeKey)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for OperatorKey {
    type Rejection = WrongScope;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, WrongScope> {
        require_scope(parts, Scope::Operator).map(|()| OperatorKey)
    }
}

async fn context(_: BridgeKey, State(state): State<Arc<AppState>>, uri: Uri) -> Response {
    let query = match Query::parse(&uri, &["to", "from", "call_sid"]) {
        Ok(query) => query,
        Err(RepeatedParameter) => return error(StatusCode::BAD_REQUEST, "bad_query"),
    };
    let to = query.get("to").trim().to_owned();
    if to.is_empty() {
        return error(StatusCode::BAD_REQUEST, "missing_to");
    }
    let from = query.get("from").to_owned();
    let call_sid = query.get("call_sid").trim().to_owned();
    tracing::debug!(call_sid, to = %redact_number(&to), from = %redact_number(&from), "context lookup");
    let now_ms = unix_now_ms();
    respond(
        &state,
        move |store| store.context_for_call(&to, &from, &call_sid, now_ms),
        |context| json(StatusCode::OK, &context),
    )
    .await
}

async fn call_history(_: OperatorKey, State(state): State<Arc<AppState>>, uri: Uri) -> Response {
    let query = match Query::parse(&uri, &["tenant_id", "limit"]) {
        Ok(query) => query,
        Err(RepeatedParameter) => return error(StatusCode::BAD_REQUEST, "bad_query"),
    };
    let tenant_id = query.get("tenant_id").to_owned();
    if tenant_id.is_empty() {
        return error(StatusCode::BAD_REQUEST, "missing_tenant_id");
    }
    let limit = match query.values.get("limit") {
        None => DEFAULT_HISTORY_LIMIT,
        Some(text) => match text.parse::<usize>() {
            Ok(limit) if limit > 0 => limit.min(MAX_HISTORY_LIMIT),
            _ => return error(StatusCode::BAD_REQUEST, "bad_query"),
        },
    };
    respond(
        &state,
        move |store| store.call_history(&tenant_id, limit),
        |history| json(StatusCode::OK, &history),
    )
    .await
}

async fn report(
    _: BridgeKey,
    State(state): State<Arc<AppState>>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    body: Bytes,
) -> Response {
    let Ok(Path(call_sid)) = path else {
        return error(StatusCode::BAD_REQUEST, "bad_path");
    };
    let Ok(report) = serde_json::from_slice::<CallReport>(&body) else {
        return error(StatusCode::BAD_REQUEST, "bad_body");
    };
    if report.call_sid.is_empty() {
        return error(StatusCode::BAD_REQUEST, "bad_body");
    }
    if report.call_sid != call_sid {
        return error(StatusCode::BAD_REQUEST, "call_sid_mismatch");
    }
    tracing::debug!(call_sid, lines = report.transcript.len(), "call report");
    let now_ms = unix_now_ms();
    respond(
        &state,
        move |store| store.record_report(&report, now_ms),
        move |transcript_lines| {
            json(
                StatusCode::OK,
                &ReportAck {
                    call_sid,
                    transcript_lines,
                },
            )
        },
    )
    .await
}

async fn tool(
    _: BridgeKey,
    State(state): State<Arc<AppState>>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    body: Bytes,
) -> Response {
    let Ok(Path(name)) = path else {
        return error(StatusCode::BAD_REQUEST, "bad_path");
    };
    let Ok(request) = serde_json::from_slice::<ToolRequest>(&body) else {
        return error(StatusCode::BAD_REQUEST, "bad_body");
    };
    if request.call_sid.is_empty() || request.tenant_id.is_empty() {
        return error(StatusCode::BAD_REQUEST, "bad_body");
    }
    tracing::debug!(
        call_sid = request.call_sid,
        tenant = request.tenant_id,
        tool = name,
        "tool call"
    );
    let now_ms = unix_now_ms();
    respond(
        &state,
        move |store| store.run_tool(&name, &request, now_ms),
        |output| json(StatusCode::OK, &ToolResponse { output }),
    )
    .await
}

/// Runs `work` on the blocking pool and turns its outcome into the response: `ok` on success,
/// the refusal's status and code, or a bare 500 for a fault (logged, never sent).
async fn respond<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce(&Store) -> Result<Result<T, Refusal>, StoreError> + Send + 'static,
    ok: impl FnOnce(T) -> Response,
) -> Response {
    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || work(&store)).await {
        Ok(Ok(Ok(value))) => ok(value),
        Ok(Ok(Err(refusal))) => error(refusal_status(refusal), refusal.code()),
        Ok(Err(fault)) => {
            tracing::error!(error = %fault, "control plane store failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, "internal")
        }
        Err(_panicked) => {
            tracing::error!("control plane store task panicked");
            error(StatusCode::INTERNAL_SERVER_ERROR, "internal")
        }
    }
}

fn refusal_status(refusal: Refusal) -> StatusCode {
    match refusal {
        Refusal::UnknownNumber | Refusal::UnknownTenant | Refusal::UnknownTool => {
            StatusCode::NOT_FOUND
        }
        Refusal::TenantMismatch => StatusCode::FORBIDDEN,
        Refusal::CallSidConflict => StatusCode::CONFLICT,
        Refusal::BadArguments => StatusCode::UNPROCESSABLE_ENTITY,
        Refusal::OutOfRange => StatusCode::BAD_REQUEST,
        Refusal::ReportConflict => StatusCode::CONFLICT,
    }
}

/// A form-encoded query with each known parameter at most once. Unknown parameters are
/// ignored (a newer bridge may send more); a repeated known one is refused, so two layers can
/// never read two different values of it.
struct Query {
    values: HashMap<String, String>,
}

/// A known query parameter appeared twice: `400 {"error":"bad_query"}`.
struct RepeatedParameter;

impl Query {
    fn parse(uri: &Uri, known: &[&str]) -> Result<Self, RepeatedParameter> {
        let mut values = HashMap::new();
        for (name, value) in url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
            if known.contains(&name.as_ref())
                && values
                    .insert(name.into_owned(), value.into_owned())
                    .is_some()
            {
                return Err(RepeatedParameter);
            }
        }
        Ok(Self { values })
    }

    /// The parameter's value, or `""` when absent.
    fn get(&self, name: &str) -> &str {
        self.values.get(name).map_or("", String::as_str)
    }
}

fn json(status: StatusCode, value: &impl Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            Bytes::from(body),
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn error(status: StatusCode, code: &str) -> Response {
    json(
        status,
        &ErrorBody {
            error: code.to_owned(),
        },
    )
}

/// Wall-clock time since the epoch; a clock before 1970 reads as 0 (and every signature is
/// then stale, which is the right failure).
fn unix_now() -> Duration {
    voxrelay_core::time::since_epoch(SystemTime::now())
}

fn unix_now_ms() -> u64 {
    voxrelay_core::time::unix_ms(SystemTime::now())
}
