//! Routes: `POST /twilio/voice`, `GET /twilio/media`, `POST /twilio/status`, `GET /healthz`,
//! `GET /readyz`, `GET /metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use url::Url;

use super::fly::{self, ReplayDecision};
use crate::session::binding::STREAM_TOKEN_PARAMETER;
use crate::session::call::{CallServices, parameter, prepare_call, redact_number, run_call};
use crate::session::metrics::{Metrics, SignedRoute};
use crate::twilio::signature::SignatureValidator;
use crate::twilio::twiml;

pub const SIGNATURE_HEADER: &str = "x-twilio-signature";

/// Shared by every request; nothing in it is locked per call.
pub struct AppState {
    pub validator: SignatureValidator,
    /// The public origin Twilio reaches, if configured.
    pub public_url: Option<Url>,
    pub metrics: Arc<Metrics>,
    pub services: Arc<CallServices>,
    /// Set when a drain begins: `/readyz` turns 503 and new calls are refused.
    pub draining: AtomicBool,
    /// Parent of every call's cancellation token.
    pub calls_cancel: CancellationToken,
    pub calls: TaskTracker,
    /// `FLY_MACHINE_ID` when running on Fly.io.
    pub fly_machine_id: Option<String>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/twilio/voice", post(voice_webhook))
        .route("/twilio/status", post(status_callback))
        .route("/twilio/media", get(media_stream))
        .route("/twilio/media/m/{machine}", get(media_stream))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        "ready\n".into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// The URL Twilio used, rebuilt from the configured public origin (or, without one, from
/// `Host` and `X-Forwarded-Proto`), in its `ws`/`wss` form for WebSocket handshakes.
pub fn external_url(
    public_url: Option<&Url>,
    headers: &HeaderMap,
    uri: &Uri,
    websocket: bool,
) -> String {
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
    let (scheme, base) = match public_url {
        Some(url) => {
            let base = url.as_str().trim_end_matches('/');
            let after_scheme = base.split_once("://").map_or(base, |(_, rest)| rest);
            (url.scheme().to_owned(), after_scheme.to_owned())
        }
        None => {
            let scheme = headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .map(|v| v.trim().to_ascii_lowercase())
                .unwrap_or_else(|| "http".to_owned());
            let host = headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("localhost")
                .to_owned();
            (scheme, host)
        }
    };
    let scheme = match (websocket, scheme.as_str()) {
        (true, "https" | "wss") => "wss",
        (true, _) => "ws",
        (false, "wss") => "https",
        (false, "ws") => "http",
        (false, other) => other,
    };
    format!("{scheme}://{base}{path_and_query}")
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
    let url = external_url(state.public_url.as_ref(), headers, uri, false);
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
    tracing::warn!(
        route = route.as_str(),
        reason = if missing { "missing" } else { "mismatch" },
        "refused a request with a bad X-Twilio-Signature"
    );
    StatusCode::FORBIDDEN
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> &'a str {
    parameter(params, name).unwrap_or("")
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
    let (call_sid, from, to) = (
        param(&params, "CallSid"),
        param(&params, "From"),
        param(&params, "To"),
    );
    tracing::info!(call_sid, from = %redact_number(from), to = %redact_number(to), "incoming call");
    if !call_sid.is_empty() {
        // The tenant lookup and the model session start now, overlapping Twilio's stream
        // set-up; the stream's `start` claims them by CallSid.
        let work = prepare_call(
            Arc::clone(&state.services),
            to.to_owned(),
            from.to_owned(),
            call_sid.to_owned(),
        );
        state.services.pending.prepare(call_sid, work);
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
    let stream_url = external_url(state.public_url.as_ref(), &headers, &media_uri, true);
    let status_url = external_url(state.public_url.as_ref(), &headers, &status_uri, false);
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
    tracing::info!(
        call_sid = param(&params, "CallSid"),
        stream_sid = param(&params, "StreamSid"),
        event,
        error = param(&params, "StreamError"),
        "twilio status callback"
    );
    StatusCode::OK.into_response()
}

/// The Media Streams WebSocket: checked, then handed to its own call task.
async fn media_stream(State(state): State<Arc<AppState>>, mut request: Request) -> Response {
    let url = external_url(
        state.public_url.as_ref(),
        request.headers(),
        request.uri(),
        true,
    );
    let signature = request
        .headers()
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !state.validator.validate_websocket(&url, signature) {
        return refuse_signature(&state, SignedRoute::Media, signature.is_empty()).into_response();
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
    let services = Arc::clone(&state.services);
    let cancel = state.calls_cancel.child_token();
    state.calls.spawn(async move {
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
    fn external_url_prefers_the_public_origin_and_maps_schemes() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "10.0.0.5:8080".parse().unwrap());
        let uri: Uri = "/twilio/media".parse().unwrap();
        let public = Url::parse("https://voice.example.com/").unwrap();
        assert_eq!(
            external_url(Some(&public), &headers, &uri, true),
            "wss://voice.example.com/twilio/media"
        );
        let voice: Uri = "/twilio/voice?x=1".parse().unwrap();
        assert_eq!(
            external_url(Some(&public), &headers, &voice, false),
            "https://voice.example.com/twilio/voice?x=1"
        );
        assert_eq!(
            external_url(None, &headers, &uri, true),
            "ws://10.0.0.5:8080/twilio/media"
        );
        headers.insert("x-forwarded-proto", "https".parse().unwrap());
        assert_eq!(
            external_url(None, &headers, &uri, true),
            "wss://10.0.0.5:8080/twilio/media"
        );
    }
}
