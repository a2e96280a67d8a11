//! Routes. Public listener: `POST /twilio/voice`, `GET /twilio/media`, `POST /twilio/status`,
//! `GET /healthz`, `GET /readyz`. Admin listener (private): `GET /metrics`, `GET /healthz`,
//! `GET /readyz`.
//!
//! The two webhooks' bodies are read by [`bounded_webhook_body`] before their handlers run:
//! at most `max_webhook_body` bytes (413 beyond) within `body_timeout` (408 after). A
//! connection stops counting as unverified when one of its requests passes a signature check:
//! the media route marks it itself; for the webhooks the layer marks it when the handler
//! answers with a success status, which each of them does only after `verify_post` accepted
//! the signature (keep it so).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use url::Url;

use super::fly::{self, ReplayDecision};
use super::limits::{CallSlots, CallsFull, ConnectionHandle};
use super::warn_rate::WarnRate;
use crate::config::ListenerLimits;
use crate::logtext::Untrusted;
use crate::session::binding::STREAM_TOKEN_PARAMETER;
use crate::session::call::{CallServices, parameter, prepare_call, redact_number, run_call};
use crate::session::metrics::{ListenerRefusal, Metrics, SignedRoute, WebhookRefusal};
use crate::session::prewarm::Admission;
use crate::twilio::ids::{is_account_sid, is_call_sid};
use crate::twilio::signature::SignatureValidator;
use crate::twilio::twiml;

pub const SIGNATURE_HEADER: &str = "x-twilio-signature";

/// What a caller hears when every call slot is taken.
/// What a caller hears when the bridge ends the stream and the tenant named no fallback
/// number: no model session could be had, the call reached its maximum length, or the bridge
/// shut down past its drain time.
pub const FALLBACK_APOLOGY: &str = "We're sorry, the assistant can't continue this call right now. Please call again later. Goodbye.";

pub const AT_CAPACITY_MESSAGE: &str =
    "Sorry, all of our lines are busy right now. Please call again in a few minutes.";

/// Shared by every request; nothing in it is locked per call.
pub struct AppState {
    pub validator: SignatureValidator,
    /// The public origin Twilio reaches: signatures are checked against it and TwiML URLs
    /// built on it, never on a request's own headers.
    pub public_url: Url,
    pub metrics: Arc<Metrics>,
    pub services: Arc<CallServices>,
    /// Set when a drain begins: `/readyz` turns 503 and new calls are refused.
    pub draining: AtomicBool,
    /// Parent of every call's cancellation token.
    pub calls_cancel: CancellationToken,
    pub calls: TaskTracker,
    /// `FLY_MACHINE_ID` when running on Fly.io.
    pub fly_machine_id: Option<String>,
    /// The public listener's caps and timeouts.
    pub limits: ListenerLimits,
    /// Calls against `VOXRELAY_MAX_CALLS`.
    pub call_slots: Arc<CallSlots>,
    /// Route-level warnings' per-second allowance.
    pub warnings: Arc<WarnRate>,
}

/// The public listener's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/twilio/voice", post(voice_webhook))
        .route("/twilio/status", post(status_callback))
        // Only the two routes above: their bodies are read (bounded) before the handler.
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            bounded_webhook_body,
        ))
        .route("/twilio/media", get(media_stream))
        .route("/twilio/media/m/{machine}", get(media_stream))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// The admin listener's routes: metrics, and health for whoever scrapes them.
pub fn admin_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        "ready\n".into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    // Refreshes the call-slot gauge (expired reservations are otherwise purged lazily).
    state.call_slots.in_use(Instant::now());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// A bare status that also closes the connection: the rest of a refused body is never read.
fn refuse_and_close(status: StatusCode, text: &'static str) -> Response {
    let mut response = (status, text).into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Reads a webhook's whole body, bounded in size and time, before its handler runs; marks the
/// connection verified when the handler succeeds (see the module docs).
async fn bounded_webhook_body(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let limit = state.limits.max_webhook_body;
    let too_large = || {
        state
            .metrics
            .listener
            .refused(ListenerRefusal::BodyTooLarge);
        refuse_and_close(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n")
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return too_large();
    }
    let read = tokio::time::timeout(
        state.limits.body_timeout,
        Limited::new(body, limit).collect(),
    )
    .await;
    let body = match read {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(failure)) if failure.is::<LengthLimitError>() => return too_large(),
        Ok(Err(_)) => return refuse_and_close(StatusCode::BAD_REQUEST, "bad body\n"),
        Err(_elapsed) => {
            state.metrics.listener.refused(ListenerRefusal::BodyTimeout);
            return refuse_and_close(StatusCode::REQUEST_TIMEOUT, "body not received in time\n");
        }
    };
    let connection = parts.extensions.get::<ConnectionHandle>().cloned();
    let response = next.run(Request::from_parts(parts, Body::from(body))).await;
    if response.status().is_success() {
        if let Some(ConnectionHandle(connection)) = connection {
            connection.mark_verified();
        }
    }
    response
}

/// At `VOXRELAY_MAX_CALLS`: the TwiML that tells the caller (counted); otherwise `None`, with
/// a slot held for the call's stream.
fn calls_full(state: &AppState, call_sid: &str) -> Option<Response> {
    match state.call_slots.reserve(call_sid, Instant::now()) {
        Ok(()) => None,
        Err(_) => {
            state
                .metrics
                .listener
                .refused(ListenerRefusal::CallsFullVoice);
            if let Some(suppressed) = state.warnings.allow(Instant::now()) {
                tracing::warn!(
                    max_calls = state.limits.max_calls,
                    suppressed,
                    "at the call cap: answering the busy message"
                );
            }
            let body = twiml::say_and_hang_up(AT_CAPACITY_MESSAGE);
            Some(([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], body).into_response())
        }
    }
}

/// The URL Twilio used for `uri` on this bridge: the configured public origin and the
/// request's path and query, in its `ws`/`wss` form for WebSocket handshakes. The request's
/// `Host` and `X-Forwarded-*` headers play no part: whoever sends a request chooses them, so a
/// signature made for another host (staging, a tunnel) under the same auth token would match.
pub fn external_url(public_url: &Url, uri: &Uri, websocket: bool) -> String {
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
    let base = public_url.as_str().trim_end_matches('/');
    let after_scheme = base.split_once("://").map_or(base, |(_, rest)| rest);
    let scheme = match (websocket, public_url.scheme()) {
        (true, "https" | "wss") => "wss",
        (true, _) => "ws",
        (false, "wss") => "https",
        (false, "ws") => "http",
        (false, other) => other,
    };
    format!("{scheme}://{after_scheme}{path_and_query}")
}

/// Checks a signed POST from Twilio (form-encoded, or JSON with `bodySHA256`) and returns
/// its form parameters.
fn verify_post(
    state: &AppState,
    route: SignedRoute,
    headers: &HeaderMap,
    uri: &Uri,
    body: &[u8],
) -> Result<Vec<(String, String)>, StatusCode> {
    let url = external_url(&state.public_url, uri, false);
    let signature = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let (valid, params) = if is_json {
        (
            state.validator.validate_json(&url, body, signature),
            Vec::new(),
        )
    } else {
        let params: Vec<(String, String)> =
            url::form_urlencoded::parse(body).into_owned().collect();
        (
            state.validator.validate_form(&url, &params, signature),
            params,
        )
    };
    if valid {
        Ok(params)
    } else {
        Err(refuse_signature(state, route, signature.is_empty()))
    }
}

fn refuse_signature(state: &AppState, route: SignedRoute, missing: bool) -> StatusCode {
    state.metrics.signature_failure(route);
    // A flood of forged requests must not become a flood of log lines.
    if let Some(suppressed) = state.warnings.allow(Instant::now()) {
        tracing::warn!(
            route = route.as_str(),
            reason = if missing { "missing" } else { "mismatch" },
            suppressed,
            "refused a request with a bad X-Twilio-Signature"
        );
    }
    StatusCode::FORBIDDEN
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> &'a str {
    parameter(params, name).unwrap_or("")
}

/// The value of `name` if the form carries it exactly once and `valid` accepts it.
fn single_id<'a>(
    params: &'a [(String, String)],
    name: &str,
    valid: fn(&str) -> bool,
) -> Result<&'a str, Option<&'a str>> {
    let mut values = params.iter().filter(|(key, _)| key == name);
    match (values.next(), values.next()) {
        (Some((_, value)), None) if valid(value) => Ok(value),
        (first, _) => Err(first.map(|(_, value)| value.as_str())),
    }
}

/// A voice webhook's `CallSid` and `AccountSid`, each present once and well-formed (a
/// re-split of a captured signature moves text into or out of them), and the account the one
/// configured, if one is.
fn twilio_ids<'a>(
    state: &AppState,
    params: &'a [(String, String)],
) -> Result<(&'a str, &'a str), (StatusCode, &'static str)> {
    let refuse = |reason: WebhookRefusal, value: Option<&str>| {
        state.metrics.webhook_refused(reason);
        tracing::warn!(
            reason = reason.as_str(),
            value = %Untrusted(value.unwrap_or("")),
            "refused a signed voice webhook"
        );
    };
    let call_sid = single_id(params, "CallSid", is_call_sid).map_err(|value| {
        refuse(WebhookRefusal::BadCallSid, value);
        (StatusCode::BAD_REQUEST, "bad CallSid\n")
    })?;
    let account_sid = single_id(params, "AccountSid", is_account_sid).map_err(|value| {
        refuse(WebhookRefusal::BadAccountSid, value);
        (StatusCode::BAD_REQUEST, "bad AccountSid\n")
    })?;
    if let Some(expected) = &state.services.twilio_account_sid {
        if account_sid != expected {
            refuse(WebhookRefusal::AccountMismatch, Some(account_sid));
            return Err((StatusCode::FORBIDDEN, "unexpected AccountSid\n"));
        }
    }
    Ok((call_sid, account_sid))
}

/// Twilio's voice webhook: answer with TwiML that connects the call to our media stream.
async fn voice_webhook(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    let params = match verify_post(&state, SignedRoute::Voice, &headers, &uri, &body) {
        Ok(params) => params,
        Err(refused) => return refused.into_response(),
    };
    if state.draining.load(Relaxed) {
        state.metrics.calls_rejected_draining.fetch_add(1, Relaxed);
        // Twilio then tries the number's fallback URL, which can point at another region.
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    let (call_sid, account_sid) = match twilio_ids(&state, &params) {
        Ok(ids) => ids,
        Err(refused) => return refused.into_response(),
    };
    if let Some(busy) = calls_full(&state, call_sid) {
        return busy;
    }
    let (from, to) = (param(&params, "From"), param(&params, "To"));
    // The tenant lookup comes first (within the directory's budget, a cache hit at once): the
    // TwiML carries the tenant's fallback. The model session then starts, overlapping Twilio's
    // stream set-up; the stream's `start` claims both by CallSid. Only the first webhook for a
    // CallSid prepares: Twilio's retries and replays of a captured one are answered the same.
    let (agent, lookup_took) = state.services.resolve_agent(to, from, call_sid).await;
    let fallback_number = agent.fallback_number.clone();
    let services = Arc::clone(&state.services);
    let admission = state.services.pending.prepare(
        call_sid,
        Instant::now(),
        state.services.prewarm,
        |with_prewarm| {
            prepare_call(
                services,
                agent,
                lookup_took,
                call_sid.to_owned(),
                with_prewarm,
            )
        },
    );
    match admission {
        Admission::Repeat => tracing::info!(
            call_sid,
            account_sid,
            "repeated voice webhook: answered again, nothing prepared"
        ),
        admission => tracing::info!(
            call_sid,
            account_sid,
            from = %redact_number(from),
            to = %redact_number(to),
            ?admission,
            "incoming call"
        ),
    }
    // On Fly the path names this machine, so the upgrade can be replayed here (queries are
    // dropped from stream URLs; paths are not).
    let media_path = match &state.fly_machine_id {
        Some(machine) => format!("{}{machine}", fly::MACHINE_PATH_PREFIX),
        None => "/twilio/media".to_owned(),
    };
    let media_uri: Uri = media_path
        .parse()
        .unwrap_or_else(|_| Uri::from_static("/twilio/media"));
    let status_uri = Uri::from_static("/twilio/status");
    let stream_url = external_url(&state.public_url, &media_uri, true);
    let status_url = external_url(&state.public_url, &status_uri, false);
    let token = state.services.tokens.issue_now(call_sid, to);
    let body = twiml::connect_stream(
        &stream_url,
        &[
            ("To", to),
            ("From", from),
            ("CallSid", call_sid),
            (STREAM_TOKEN_PARAMETER, &token),
        ],
        Some(&status_url),
        match &fallback_number {
            Some(number) => twiml::AfterStream::Dial(number),
            None => twiml::AfterStream::Apology(FALLBACK_APOLOGY),
        },
    );
    ([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], body).into_response()
}

/// Stream (and call) status callbacks: checked and logged.
async fn status_callback(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    let params = match verify_post(&state, SignedRoute::Status, &headers, &uri, &body) {
        Ok(params) => params,
        Err(refused) => return refused.into_response(),
    };
    let event = match param(&params, "StreamEvent") {
        "" => param(&params, "CallStatus"),
        event => event,
    };
    // Every field is the sender's text: escaped and cut before it reaches the log.
    tracing::info!(
        call_sid = %Untrusted(param(&params, "CallSid")),
        stream_sid = %Untrusted(param(&params, "StreamSid")),
        event = %Untrusted(event),
        error = %Untrusted(param(&params, "StreamError")),
        "twilio status callback"
    );
    StatusCode::OK.into_response()
}

/// The Media Streams WebSocket: checked, admitted against the call caps, then handed to its
/// own call task, which holds the call's slot and its connection's slot until it ends.
async fn media_stream(State(state): State<Arc<AppState>>, mut request: Request) -> Response {
    let url = external_url(&state.public_url, request.uri(), true);
    let signature = request
        .headers()
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !state.validator.validate_websocket(&url, signature) {
        return refuse_signature(&state, SignedRoute::Media, signature.is_empty()).into_response();
    }
    let connection = request.extensions().get::<ConnectionHandle>().cloned();
    if let Some(ConnectionHandle(connection)) = &connection {
        connection.mark_verified();
    }
    if state.draining.load(Relaxed) {
        state.metrics.calls_rejected_draining.fetch_add(1, Relaxed);
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    let wanted_machine = request
        .uri()
        .path()
        .strip_prefix(fly::MACHINE_PATH_PREFIX)
        .map(str::to_owned);
    let replayed = request.headers().contains_key(fly::REPLAY_SOURCE_HEADER);
    if let ReplayDecision::Replay(value) = fly::replay_decision(
        state.fly_machine_id.as_deref(),
        wanted_machine.as_deref(),
        replayed,
    ) {
        state.metrics.fly_replays.fetch_add(1, Relaxed);
        tracing::info!(to = %value, "stream landed on another machine: asking Fly to replay it");
        return (StatusCode::CONFLICT, [(fly::REPLAY_HEADER, value)]).into_response();
    }
    let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut request) {
        Ok(pair) => pair,
        Err(error) => {
            tracing::info!(%error, "not a websocket upgrade");
            return (StatusCode::BAD_REQUEST, "expected a websocket upgrade\n").into_response();
        }
    };
    // Before the upgrade, so a stream beyond the caps gets a plain 503 (and Twilio's error
    // callback), never a socket that hangs.
    let started = state.services.registry.len();
    let permit = match state.call_slots.admit_stream(started, Instant::now()) {
        Ok(permit) => permit,
        Err(full) => {
            let why = match full {
                CallsFull::MaxCalls => ListenerRefusal::CallsFullMedia,
                CallsFull::Unstarted => ListenerRefusal::UnstartedStreams,
            };
            state.metrics.listener.refused(why);
            if let Some(suppressed) = state.warnings.allow(Instant::now()) {
                tracing::warn!(
                    reason = why.as_str(),
                    suppressed,
                    "media stream refused: {full}"
                );
            }
            return (StatusCode::SERVICE_UNAVAILABLE, "at capacity\n").into_response();
        }
    };
    let services = Arc::clone(&state.services);
    let cancel = state.calls_cancel.child_token();
    state.calls.spawn(async move {
        // Both released when this task ends, however it ends.
        let _call_slot = permit;
        let _connection_slot = connection;
        match upgrade.await {
            Ok(ws) => run_call(ws, services, cancel).await,
            Err(error) => tracing::info!(%error, "websocket upgrade did not complete"),
        }
    });
    response.map(|_| Body::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_url_is_the_public_origin_in_the_right_scheme() {
        let uri: Uri = "/twilio/media".parse().unwrap();
        let public = Url::parse("https://voice.example.com/").unwrap();
        assert_eq!(
            external_url(&public, &uri, true),
            "wss://voice.example.com/twilio/media"
        );
        let voice: Uri = "/twilio/voice?x=1".parse().unwrap();
        assert_eq!(
            external_url(&public, &voice, false),
            "https://voice.example.com/twilio/voice?x=1"
        );
        let local = Url::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            external_url(&local, &uri, true),
            "ws://127.0.0.1:8080/twilio/media"
        );
        assert_eq!(
            external_url(&local, &voice, false),
            "http://127.0.0.1:8080/twilio/voice?x=1"
        );
    }

    #[test]
    fn an_id_counts_only_when_present_once_and_well_formed() {
        let sid = "CA0123456789abcdef0123456789abcdef";
        let form = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            single_id(&form(&[("CallSid", sid)]), "CallSid", is_call_sid),
            Ok(sid)
        );
        assert_eq!(single_id(&form(&[]), "CallSid", is_call_sid), Err(None));
        let resplit = format!("{sid}CallStatusringing");
        assert_eq!(
            single_id(&form(&[("CallSid", &resplit)]), "CallSid", is_call_sid),
            Err(Some(resplit.as_str()))
        );
        assert!(
            single_id(
                &form(&[("CallSid", sid), ("CallSid", sid)]),
                "CallSid",
                is_call_sid
            )
            .is_err()
        );
    }
}
