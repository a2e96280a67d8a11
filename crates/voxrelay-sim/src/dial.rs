//! Dialling a realtime model the way the bridge does, for the simulator's own relays (the
//! baseline relay) and callers.
//!
//! The simulator does not depend on the bridge crate, so it cannot call
//! `voxrelay::upstream::connect`; this is the same dial with the same settings, so the floor
//! pays what the bridge pays: `Authorization: Bearer <key>` marked sensitive, rustls (ring,
//! webpki roots) for `wss://`, TCP_NODELAY, [`UPSTREAM_READ_BUFFER`] reads and
//! [`MAX_UPSTREAM_MESSAGE_BYTES`] messages, the whole dial bounded by [`CONNECT_TIMEOUT`]. The
//! bridge's tests check that these constants equal its own.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream, tungstenite};
use voxrelay_core::Secret;

pub type ModelSocket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// As the bridge's `upstream::connect::CONNECT_TIMEOUT`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// As the bridge's `upstream::connect::UPSTREAM_READ_BUFFER`: tungstenite's 128 KiB default
/// would cost every simulated peer that much resident memory and a large `memset` per read.
pub const UPSTREAM_READ_BUFFER: usize = 4 * 1024;
/// As the bridge's `upstream::connect::MAX_UPSTREAM_MESSAGE_BYTES`.
pub const MAX_UPSTREAM_MESSAGE_BYTES: usize = 1024 * 1024;

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    #[error("invalid model URL: {0}")]
    InvalidUrl(String),
    #[error("the API key is not a valid header value")]
    InvalidApiKey,
    #[error("TLS set-up failed: {0}")]
    Tls(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the model refused the handshake with HTTP {0}")]
    Rejected(u16),
    #[error("connect failed: {0}")]
    Connect(String),
}

/// Dials `url` (`wss://…`, or `ws://…` for a local model) with `Authorization: Bearer <key>`
/// when a key is given.
pub async fn connect(url: &str, api_key: Option<&Secret>) -> Result<ModelSocket, DialError> {
    let mut request = url
        .into_client_request()
        .map_err(|error| DialError::InvalidUrl(error.to_string()))?;
    if let Some(key) = api_key {
        let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
            .map_err(|_| DialError::InvalidApiKey)?;
        value.set_sensitive(true);
        request.headers_mut().insert(AUTHORIZATION, value);
    }
    let dial = tokio_tungstenite::connect_async_tls_with_config(
        request,
        Some(socket_config()),
        true, // TCP_NODELAY
        Some(Connector::Rustls(tls_config()?)),
    );
    match tokio::time::timeout(CONNECT_TIMEOUT, dial).await {
        Err(_elapsed) => Err(DialError::Timeout(CONNECT_TIMEOUT)),
        Ok(Err(tungstenite::Error::Http(response))) => {
            Err(DialError::Rejected(response.status().as_u16()))
        }
        Ok(Err(error)) => Err(DialError::Connect(error.to_string())),
        Ok(Ok((socket, _response))) => Ok(socket),
    }
}

/// The bridge's model-socket settings.
pub fn socket_config() -> tungstenite::protocol::WebSocketConfig {
    tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(UPSTREAM_READ_BUFFER)
        .max_message_size(Some(MAX_UPSTREAM_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_UPSTREAM_MESSAGE_BYTES))
}

/// The dial's TLS settings, built once per process: parsing the root set costs
/// milliseconds. [`trust_extra_roots`] sets it first when a run adds a CA.
static TLS_CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();

fn tls_config() -> Result<Arc<rustls::ClientConfig>, DialError> {
    if let Some(config) = TLS_CONFIG.get() {
        return Ok(config.clone());
    }
    let config = build_tls_config(&[])?;
    Ok(TLS_CONFIG.get_or_init(|| config).clone())
}

fn build_tls_config(
    extra: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, DialError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for certificate in extra {
        roots
            .add(certificate.clone())
            .map_err(|error| DialError::Tls(error.to_string()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| DialError::Tls(error.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Trusts `certificates` besides the webpki roots for every later dial of this process (the
/// bridge's `VOXRELAY_MODEL_CA_FILE`, for the baseline relay under `bench --model-tls`). Only
/// before the first dial: a process has one TLS configuration.
pub fn trust_extra_roots(certificates: &[CertificateDer<'static>]) -> Result<(), DialError> {
    let config = build_tls_config(certificates)?;
    TLS_CONFIG
        .set(config)
        .map_err(|_already| DialError::Tls("the TLS configuration is already in use".to_owned()))
}
