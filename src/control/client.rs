//! The bridge's HTTP client for the control-plane API: one signed request per method.
//!
//! Owns the connection pool to the control plane and the signing of every request. A
//! [`ControlPlaneClient`] is cheap to clone (one `Arc`); all clones share one pool, so a context
//! lookup reuses a kept-alive connection instead of paying a TCP (and TLS) handshake per call.
//!
//! Invariants:
//! - Every request is signed afresh with [`signing::sign`]: a new 16-byte nonce from the OS
//!   CSPRNG (`rand::random`) and the wall clock's unix seconds, over the method, the
//!   path-and-query exactly as it is sent (base URL prefix included) and the exact body bytes. A
//!   retry is a new request with a new signature, never a replay.
//! - Every request has a deadline ([`ControlPlaneSettings::request_timeout`], default
//!   [`DEFAULT_REQUEST_TIMEOUT`]) covering connect, send and reading the whole response, and a
//!   response body is read up to [`MAX_RESPONSE_BYTES`] and no further.
//! - The signing secret never leaves [`crate::Secret`]: `Debug` of the settings and the client
//!   show the key id only, and no error carries a header or the secret. The base URL may not
//!   carry credentials (they would end up in logs); a non-2xx answer keeps only the body's
//!   `error` code, cut to a short token, never the raw body.
//! - Each failed request (transport, timeout, non-2xx other than a context 404, undecodable
//!   answer, oversized body) is counted once in `voxrelay_control_request_failures_total`, by
//!   endpoint.
//!
//! The base URL is `http://` or `https://`, optionally with a path prefix: with
//! `https://cp.internal/base` a lookup goes to `https://cp.internal/base/v1/context?…` and the
//! signature covers `/base/v1/context?…`, as the control plane receives it. `https://` uses
//! rustls with the `ring` provider (the one the rest of the bridge already links) and the
//! webpki (Mozilla) roots, HTTP/1.1 only.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE, USER_AGENT};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::de::DeserializeOwned;
use url::Url;

use crate::control::api::{
    self, CallHistory, CallReport, TenantContext, ToolRequest, ToolResponse,
};
use crate::control::signing::{self, SigningKey};
use crate::session::metrics::{ControlEndpoint, Metrics};

/// Default deadline of one request, connect to last body byte.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest response body read; a larger one is [`ControlError::BodyTooLarge`].
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// How long an idle pooled connection is kept. Shorter than the usual server-side keep-alive
/// timeouts (60–90 s), so the client rarely reuses a connection the server is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The 404 code that means "no tenant owns this number".
const UNKNOWN_NUMBER: &str = "unknown_number";

/// Longest `error` code kept from a non-2xx body.
const MAX_ERROR_CODE_LEN: usize = 64;

const USER_AGENT_VALUE: &str = concat!("voxrelay/", env!("CARGO_PKG_VERSION"));

/// Where the control plane is and how to sign for it (`VOXRELAY_CONTROL_PLANE_URL`,
/// `VOXRELAY_CONTROL_PLANE_KEY_ID`, `VOXRELAY_CONTROL_PLANE_SECRET`). `Debug` shows the key id,
/// never the secret.
#[derive(Clone, Debug)]
pub struct ControlPlaneSettings {
    /// `http://` or `https://`, with an optional path prefix; no query, fragment or credentials.
    pub url: Url,
    pub key: SigningKey,
    /// Deadline of one request, connect to last body byte. Default [`DEFAULT_REQUEST_TIMEOUT`].
    pub request_timeout: Duration,
}

impl ControlPlaneSettings {
    /// Settings with the default request timeout.
    pub fn new(url: Url, key: SigningKey) -> Self {
        Self {
            url,
            key,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// Why [`ControlPlaneClient::new`] refused its settings. Never shows the secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    #[error("control plane URL must be http:// or https://, not {0}://")]
    UnsupportedScheme(String),
    #[error("control plane URL has no host")]
    NoHost,
    #[error("control plane URL must not carry a query or a fragment")]
    QueryOrFragment,
    #[error("control plane URL must not carry a user name or password")]
    Credentials,
    #[error("control plane key id must be 1 to 128 visible ASCII characters without `,` or `:`")]
    InvalidKeyId,
    #[error("control plane secret is empty")]
    EmptySecret,
    #[error("control plane request timeout must be above zero")]
    ZeroTimeout,
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
}

/// Why a control-plane request failed. Carries no header, body or secret: for a non-2xx
/// answer only the body's `error` code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// No answer: connect refused, reset, TLS failure, connection closed mid-answer.
    #[error("control plane unreachable: {0}")]
    Transport(String),
    #[error("control plane did not answer within {0:?}")]
    Timeout(Duration),
    /// A non-2xx answer; `code` is the body's `error` field when it had one.
    #[error("control plane answered {status}{}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Status { status: u16, code: Option<String> },
    /// A 2xx answer whose body is not the expected JSON document.
    #[error("control plane answer could not be decoded: {0}")]
    Decode(String),
    #[error("control plane answer exceeded {limit} bytes")]
    BodyTooLarge { limit: usize },
}

impl ControlError {
    /// A refusal that will not change on retry: any 4xx except 401 (a clock or key rotation
    /// problem on one side), 408 and 429.
    pub fn is_permanent(&self) -> bool {
        matches!(self, ControlError::Status { status, .. }
            if (400..500).contains(status) && !matches!(status, 401 | 408 | 429))
    }

    /// The HTTP status of a non-2xx answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            ControlError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

type Pool = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A signed, pooled HTTP/1.1 client for the control-plane API. Clones share the pool.
#[derive(Clone)]
pub struct ControlPlaneClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    pool: Pool,
    /// `scheme://host[:port]`, without a trailing slash.
    origin: String,
    /// The base URL's path without its trailing slash: `""` or e.g. `/base`.
    prefix: String,
    key: SigningKey,
    request_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl fmt::Debug for ControlPlaneClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlaneClient")
            .field(
                "base",
                &format_args!("{}{}", self.inner.origin, self.inner.prefix),
            )
            .field("key_id", &self.inner.key.id)
            .field("request_timeout", &self.inner.request_timeout)
            .finish()
    }
}

/// A whole answer: status and body (at most [`MAX_RESPONSE_BYTES`]).
struct Answer {
    status: StatusCode,
    body: Bytes,
}

impl ControlPlaneClient {
    /// Checks the settings and builds the pool. Needs no runtime; requests need tokio.
    pub fn new(
        settings: ControlPlaneSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, SettingsError> {
        let url = &settings.url;
        match url.scheme() {
            "http" | "https" => {}
            other => return Err(SettingsError::UnsupportedScheme(other.to_owned())),
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(SettingsError::NoHost);
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(SettingsError::QueryOrFragment);
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(SettingsError::Credentials);
        }
        if !is_valid_key_id(&settings.key.id) {
            return Err(SettingsError::InvalidKeyId);
        }
        if settings.key.secret.is_empty() {
            return Err(SettingsError::EmptySecret);
        }
        if settings.request_timeout.is_zero() {
            return Err(SettingsError::ZeroTimeout);
        }

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(settings.request_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let pool = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);

        Ok(Self {
            inner: Arc::new(ClientInner {
                pool,
                origin: url.origin().ascii_serialization(),
                prefix: url.path().trim_end_matches('/').to_owned(),
                key: settings.key,
                request_timeout: settings.request_timeout,
                metrics,
            }),
        })
    }

    /// `GET /v1/context`: the context for a dialled number, `Ok(None)` when the control plane
    /// answers 404 `{"error":"unknown_number"}` (a number no tenant owns). Any other 404 (a
    /// wrong URL prefix, a proxy's page) is an error, so a misconfiguration is never cached as
    /// "every number is unknown".
    pub async fn context(
        &self,
        to: &str,
        from: &str,
        call_sid: &str,
    ) -> Result<Option<TenantContext>, ControlError> {
        let path = api::context_path_and_query(to, from, call_sid);
        let result = match self.exchange(Method::GET, &path, Bytes::new()).await {
            Ok(answer)
                if answer.status == StatusCode::NOT_FOUND
                    && error_code(&answer.body).as_deref() == Some(UNKNOWN_NUMBER) =>
            {
                Ok(None)
            }
            Ok(answer) => decode_success(answer).map(Some),
            Err(error) => Err(error),
        };
        self.counted(ControlEndpoint::Context, result)
    }

    /// `POST /v1/calls/{call_sid}/report`. Any 2xx is success; the body is not read further.
    pub async fn report(&self, report: &CallReport) -> Result<(), ControlError> {
        let body = serde_json::to_vec(report)
            .map_err(|error| ControlError::Decode(format!("encoding the report: {error}")))?;
        self.report_bytes(&report.call_sid, Bytes::from(body)).await
    }

    /// As [`ControlPlaneClient::report`], with the report already serialised (a spooled file).
    pub(crate) async fn report_bytes(
        &self,
        call_sid: &str,
        body: Bytes,
    ) -> Result<(), ControlError> {
        let path = api::report_path(call_sid);
        let result = self
            .exchange(Method::POST, &path, body)
            .await
            .and_then(|answer| {
                if answer.status.is_success() {
                    Ok(())
                } else {
                    Err(status_error(&answer))
                }
            });
        self.counted(ControlEndpoint::Report, result)
    }

    /// `POST /v1/tools/{name}`.
    pub async fn tool(
        &self,
        name: &str,
        request: &ToolRequest,
    ) -> Result<ToolResponse, ControlError> {
        let result = match serde_json::to_vec(request) {
            Ok(body) => match self
                .exchange(Method::POST, &api::tool_path(name), Bytes::from(body))
                .await
            {
                Ok(answer) => decode_success(answer),
                Err(error) => Err(error),
            },
            Err(error) => Err(ControlError::Decode(format!(
                "encoding the tool request: {error}"
            ))),
        };
        self.counted(ControlEndpoint::Tool, result)
    }

    /// `GET /v1/calls?tenant_id=…`: the tenant's recent call reports.
    pub async fn calls(&self, tenant_id: &str) -> Result<CallHistory, ControlError> {
        let path = api::calls_path_and_query(tenant_id);
        let result = match self.exchange(Method::GET, &path, Bytes::new()).await {
            Ok(answer) => decode_success(answer),
            Err(error) => Err(error),
        };
        self.counted(ControlEndpoint::Calls, result)
    }

    /// The deadline of one request.
    pub fn request_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    fn counted<T>(
        &self,
        endpoint: ControlEndpoint,
        result: Result<T, ControlError>,
    ) -> Result<T, ControlError> {
        if result.is_err() {
            self.inner.metrics.control_request_failure(endpoint);
        }
        result
    }

    /// One signed request under the request deadline; any status is an `Ok` answer here.
    async fn exchange(
        &self,
        method: Method,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<Answer, ControlError> {
        let timeout = self.inner.request_timeout;
        match tokio::time::timeout(timeout, self.send(method, path_and_query, body)).await {
            Ok(result) => result,
            Err(_) => Err(ControlError::Timeout(timeout)),
        }
    }

    async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<Answer, ControlError> {
        let inner = &*self.inner;
        let target = format!("{}{path_and_query}", inner.prefix);
        let uri: Uri = format!("{}{target}", inner.origin)
            .parse()
            .map_err(|error| {
                ControlError::Transport(format!("building the request URI: {error}"))
            })?;
        let signed = signing::sign(
            &inner.key,
            unix_now(),
            rand::random::<[u8; 16]>(),
            method.as_str(),
            &target,
            &body,
        );
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, USER_AGENT_VALUE);
        if !body.is_empty() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        for (name, value) in signed.pairs() {
            request = request.header(name, value);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|error| ControlError::Transport(format!("building the request: {error}")))?;

        let response = inner
            .pool
            .request(request)
            .await
            .map_err(|error| ControlError::Transport(error_chain(&error)))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|error| {
                if error.is::<LengthLimitError>() {
                    ControlError::BodyTooLarge {
                        limit: MAX_RESPONSE_BYTES,
                    }
                } else {
                    ControlError::Transport(error_chain(&*error))
                }
            })?
            .to_bytes();
        Ok(Answer { status, body })
    }
}

fn decode_success<T: DeserializeOwned>(answer: Answer) -> Result<T, ControlError> {
    if !answer.status.is_success() {
        return Err(status_error(&answer));
    }
    serde_json::from_slice(&answer.body).map_err(|error| ControlError::Decode(error.to_string()))
}

fn status_error(answer: &Answer) -> ControlError {
    ControlError::Status {
        status: answer.status.as_u16(),
        code: error_code(&answer.body),
    }
}

/// The `error` field of a non-2xx body, kept only if it is a short token (`[A-Za-z0-9_.-]`), so
/// nothing a misbehaving server sends can reach a log line or the model verbatim.
fn error_code(body: &[u8]) -> Option<String> {
    let parsed: api::ErrorBody = serde_json::from_slice(body).ok()?;
    let code = parsed.error;
    let is_token = !code.is_empty()
        && code.len() <= MAX_ERROR_CODE_LEN
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    is_token.then_some(code)
}

/// An error and its sources, `: `-joined (hyper-util's own message is only "client error").
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(next) = source {
        let part = next.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = next.source();
    }
    text
}

/// The rule of `X-Voxrelay-Key-Id`: 1 to 128 visible ASCII characters, no `,` or `:`.
fn is_valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b',' && b != b':')
}

fn unix_now() -> u64 {
    voxrelay_core::time::unix_secs(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Secret;

    fn settings(url: &str) -> ControlPlaneSettings {
        ControlPlaneSettings::new(
            Url::parse(url).unwrap(),
            SigningKey::new("bridge-1", Secret::new("hunter2-secret")),
        )
    }

    fn build(settings: ControlPlaneSettings) -> Result<ControlPlaneClient, SettingsError> {
        ControlPlaneClient::new(settings, Arc::new(Metrics::default()))
    }

    #[test]
    fn base_urls_keep_their_path_prefix_without_a_trailing_slash() {
        let cases = [
            ("http://127.0.0.1:9000", "http://127.0.0.1:9000", ""),
            ("http://127.0.0.1:9000/", "http://127.0.0.1:9000", ""),
            ("https://cp.internal/base", "https://cp.internal", "/base"),
            ("https://cp.internal/base/", "https://cp.internal", "/base"),
            (
                "https://cp.internal:8443/a/b/",
                "https://cp.internal:8443",
                "/a/b",
            ),
        ];
        for (url, origin, prefix) in cases {
            let client = build(settings(url)).expect(url);
            assert_eq!(client.inner.origin, origin, "{url}");
            assert_eq!(client.inner.prefix, prefix, "{url}");
        }
    }

    #[test]
    fn bad_settings_are_refused_with_a_clear_reason() {
        let refused = |settings: ControlPlaneSettings| build(settings).map(|_| ()).unwrap_err();
        assert!(matches!(
            refused(settings("ftp://cp.internal")),
            SettingsError::UnsupportedScheme(scheme) if scheme == "ftp"
        ));
        assert!(matches!(
            refused(settings("http://cp.internal/?x=1")),
            SettingsError::QueryOrFragment
        ));
        assert!(matches!(
            refused(settings("http://cp.internal/#x")),
            SettingsError::QueryOrFragment
        ));
        assert!(matches!(
            refused(settings("http://user:pw@cp.internal/")),
            SettingsError::Credentials
        ));
        let mut bad_id = settings("http://cp.internal");
        bad_id.key.id = "a:b".into();
        assert!(matches!(refused(bad_id), SettingsError::InvalidKeyId));
        let mut empty_secret = settings("http://cp.internal");
        empty_secret.key.secret = Secret::new("");
        assert!(matches!(refused(empty_secret), SettingsError::EmptySecret));
        let mut zero = settings("http://cp.internal");
        zero.request_timeout = Duration::ZERO;
        assert!(matches!(refused(zero), SettingsError::ZeroTimeout));
    }

    #[test]
    fn debug_shows_the_key_id_and_never_the_secret() {
        let settings = settings("https://cp.internal/base");
        let client = build(settings.clone()).unwrap();
        let text = format!("{settings:?} {client:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("bridge-1"), "{text}");
        assert!(text.contains("https://cp.internal/base"), "{text}");
    }

    #[test]
    fn only_short_token_error_codes_are_kept() {
        assert_eq!(
            error_code(br#"{"error":"unknown_tool"}"#),
            Some("unknown_tool".into())
        );
        assert_eq!(error_code(br#"{"error":"has space"}"#), None);
        assert_eq!(error_code(br#"{"error":""}"#), None);
        assert_eq!(
            error_code(&format!(r#"{{"error":"{}"}}"#, "x".repeat(65)).into_bytes()),
            None
        );
        assert_eq!(error_code(b"<html>bad gateway</html>"), None);
    }

    #[test]
    fn permanent_rejections_are_4xx_other_than_auth_timeout_and_rate_limit() {
        let status = |status| ControlError::Status { status, code: None };
        for permanent in [400, 403, 404, 409, 413, 422] {
            assert!(status(permanent).is_permanent(), "{permanent}");
        }
        for transient in [401, 408, 429, 500, 502, 503] {
            assert!(!status(transient).is_permanent(), "{transient}");
        }
        assert!(!ControlError::Timeout(Duration::from_secs(1)).is_permanent());
        assert!(!ControlError::Transport("reset".into()).is_permanent());
        assert_eq!(
            ControlError::Status {
                status: 503,
                code: Some("draining".into())
            }
            .to_string(),
            "control plane answered 503 (draining)"
        );
    }
}
