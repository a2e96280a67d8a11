//! Opening the upstream WebSocket: TLS, auth header, timeout.
//!
//! Owns the one place voxrelay dials a realtime provider. Invariants: the only extra header is
//! the key, as the provider takes it (`Authorization: Bearer <key>` for OpenAI, never
//! `OpenAI-Beta`; `x-goog-api-key` for Gemini, never `?key=` in the URL), marked sensitive and
//! never logged; TLS
//! is rustls with the ring provider and the webpki root set, built explicitly so no
//! process-wide crypto provider has to be installed; Nagle is off (20 ms audio frames must not
//! wait for ACKs); the whole dial, TCP + TLS + HTTP upgrade, is bounded by a timeout; a message
//! from the model is at most [`MAX_UPSTREAM_MESSAGE_BYTES`], fragments counted as they arrive.
//! The root set can be widened for the model connection only, once per process and before the
//! first dial, by [`trust_model_ca`] (`VOXRELAY_MODEL_CA_FILE`: a private CA in front of the
//! model, or the benchmark's self-signed model); nothing else in the process trusts it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream, tungstenite};

use super::UpstreamError;
use crate::{Provider, Secret};

pub type UpstreamSocket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Long enough for a TLS handshake across an ocean, short enough that a caller is not left in
/// silence wondering whether anyone is there.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One model session's dial: the provider (which says how the key is carried), its URL and
/// key. Built by the bridge's `ModelTargets` from the call's agent.
#[derive(Clone, Debug)]
pub struct ModelDial {
    pub provider: Provider,
    pub url: String,
    pub api_key: Option<Secret>,
}

/// Dials `url` (`wss://…` or, for the mock, `ws://…`) with `Authorization: Bearer <key>` when a
/// key is given (OpenAI's handshake).
pub async fn connect(url: &str, api_key: Option<&Secret>) -> Result<UpstreamSocket, UpstreamError> {
    connect_with_timeout(url, api_key, KeyHeader::Bearer, CONNECT_TIMEOUT).await
}

/// Dials a model session the way its provider takes its key.
pub async fn connect_model(dial: &ModelDial) -> Result<UpstreamSocket, UpstreamError> {
    let header = match dial.provider {
        Provider::OpenAi => KeyHeader::Bearer,
        Provider::Gemini => KeyHeader::GoogApiKey,
    };
    connect_with_timeout(&dial.url, dial.api_key.as_ref(), header, CONNECT_TIMEOUT).await
}

/// Where the handshake carries the key. Never the URL: URLs end up in proxy logs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum KeyHeader {
    /// `Authorization: Bearer <key>` (OpenAI).
    Bearer,
    /// `x-goog-api-key: <key>` (the Gemini API; it also takes `?key=`, which we never use).
    GoogApiKey,
}

pub(crate) async fn connect_with_timeout(
    url: &str,
    api_key: Option<&Secret>,
    header: KeyHeader,
    timeout: Duration,
) -> Result<UpstreamSocket, UpstreamError> {
    let mut request = url
        .into_client_request()
        .map_err(|error| UpstreamError::InvalidUrl(error.to_string()))?;
    if let Some(key) = api_key {
        let (name, text) = match header {
            KeyHeader::Bearer => (AUTHORIZATION, format!("Bearer {}", key.expose())),
            KeyHeader::GoogApiKey => (
                HeaderName::from_static("x-goog-api-key"),
                key.expose().to_owned(),
            ),
        };
        let mut value = HeaderValue::from_str(&text).map_err(|_| UpstreamError::InvalidApiKey)?;
        value.set_sensitive(true);
        request.headers_mut().insert(name, value);
    }
    let connector = Connector::Rustls(tls_config()?);
    dial_with(request, connector, timeout).await
}

async fn dial_with(
    request: tungstenite::handshake::client::Request,
    connector: Connector,
    timeout: Duration,
) -> Result<UpstreamSocket, UpstreamError> {
    let dial = tokio_tungstenite::connect_async_tls_with_config(
        request,
        Some(socket_config()),
        true, // TCP_NODELAY
        Some(connector),
    );
    match tokio::time::timeout(timeout, dial).await {
        Err(_elapsed) => Err(UpstreamError::ConnectTimeout(timeout)),
        Ok(Err(tungstenite::Error::Http(response))) => {
            Err(UpstreamError::HandshakeRejected(response.status().as_u16()))
        }
        Ok(Err(error)) => Err(UpstreamError::Connect(error.to_string())),
        Ok(Ok((socket, _response))) => Ok(socket),
    }
}

/// tungstenite reads into a 128 KiB buffer by default and zero-fills it on every read: per
/// call that is 128 KiB of resident memory and a large `memset` per model message. Realtime
/// messages are a few KiB, so 4 KiB reads serve them (a larger message just takes more reads).
pub const UPSTREAM_READ_BUFFER: usize = 4 * 1024;

/// The largest message (and frame) taken from the model; a larger one ends the call
/// (`voxrelay_upstream_oversized_total`, end reason `upstream_oversized`). An audio delta is a
/// few KiB of base64 (100 ms of 24 kHz PCM16 is 6.4 KiB), and the largest events the service
/// sends are `session.created`/`session.updated` echoing the instructions and tool schemas and
/// `response.done` carrying a response's items and transcript: tens of KiB for a rich agent.
/// 1 MiB is tenfold that, and bounds what one call can be made to hold where tungstenite's
/// default would let a peer hold 64 MiB. tungstenite checks it on each frame's header and on
/// the running total of a fragmented message before each fragment is appended.
pub const MAX_UPSTREAM_MESSAGE_BYTES: usize = 1024 * 1024;

pub(crate) fn socket_config() -> tungstenite::protocol::WebSocketConfig {
    tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(UPSTREAM_READ_BUFFER)
        .max_message_size(Some(MAX_UPSTREAM_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_UPSTREAM_MESSAGE_BYTES))
}

/// The model connection's TLS settings, built once per process: parsing the root set costs
/// milliseconds. [`trust_model_ca`] sets it first when the deployment adds a CA.
static TLS_CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();

fn tls_config() -> Result<Arc<rustls::ClientConfig>, UpstreamError> {
    if let Some(config) = TLS_CONFIG.get() {
        return Ok(config.clone());
    }
    let config = build_tls_config(&ModelCa::default())?;
    Ok(TLS_CONFIG.get_or_init(|| config).clone())
}

/// The webpki roots plus `extra`.
fn build_tls_config(extra: &ModelCa) -> Result<Arc<rustls::ClientConfig>, UpstreamError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for certificate in extra.certificates.iter() {
        roots
            .add(certificate.clone())
            .map_err(|error| UpstreamError::Tls(error.to_string()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| UpstreamError::Tls(error.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Why `VOXRELAY_MODEL_CA_FILE` could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelCaError {
    #[error("cannot read the model CA file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("the model CA file {0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("a certificate in the model CA file is not a usable trust anchor: {0}")]
    BadCertificate(String),
    #[error("the model connection's roots were already in use; add the CA before the first dial")]
    AlreadyInUse,
}

/// Extra trust anchors for the model connection: the certificates of one PEM file, checked
/// when the configuration is read (each must make a trust anchor).
#[derive(Clone, Debug, Default)]
pub struct ModelCa {
    certificates: Arc<Vec<CertificateDer<'static>>>,
    path: Option<PathBuf>,
}

impl ModelCa {
    /// Reads every `CERTIFICATE` block of `path` (other blocks, e.g. a key, are skipped).
    pub fn from_pem_file(path: &Path) -> Result<Self, ModelCaError> {
        let read_error = |reason: String| ModelCaError::Read {
            path: path.to_owned(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| read_error(e.to_string()))?;
        let certificates = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| read_error(e.to_string()))?;
        if certificates.is_empty() {
            return Err(ModelCaError::NoCertificate(path.to_owned()));
        }
        let mut check = rustls::RootCertStore::empty();
        for certificate in &certificates {
            check
                .add(certificate.clone())
                .map_err(|e| ModelCaError::BadCertificate(e.to_string()))?;
        }
        Ok(Self {
            certificates: Arc::new(certificates),
            path: Some(path.to_owned()),
        })
    }

    /// How many certificates the file held.
    /// The certificates, DER-encoded, for another client to trust the same CA.
    pub fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.certificates
    }

    pub fn len(&self) -> usize {
        self.certificates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.certificates.is_empty()
    }

    /// The file it came from.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

/// Adds `ca` to the roots every later model dial trusts (this process, the model connection
/// only: the control-plane client has its own). Call once at start-up, before any dial: the
/// roots are built once and then shared by every call.
pub fn trust_model_ca(ca: &ModelCa) -> Result<(), ModelCaError> {
    let config = build_tls_config(ca).map_err(|e| ModelCaError::BadCertificate(e.to_string()))?;
    TLS_CONFIG
        .set(config)
        .map_err(|_already| ModelCaError::AlreadyInUse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::mock::{MockConfig, MockRealtimeServer};

    fn run<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(future)
    }

    #[test]
    fn tls_config_builds_without_a_process_default_provider() {
        let config = tls_config().expect("config");
        assert!(Arc::ptr_eq(&config, &tls_config().expect("cached")));
    }

    #[test]
    fn connects_to_the_mock_with_a_key_and_is_refused_without() {
        run(async {
            let server = MockRealtimeServer::start(MockConfig::default())
                .await
                .expect("mock");
            let key = Secret::new("sk-test");
            let socket = connect(&server.url(), Some(&key)).await;
            assert!(socket.is_ok(), "{:?}", socket.err());
            match connect(&server.url(), None).await {
                Err(UpstreamError::HandshakeRejected(401)) => {}
                other => panic!("expected 401, got {:?}", other.map(|_| ())),
            }
            server.shutdown();
        });
    }

    /// A CA (PEM) and a `wss://127.0.0.1` WebSocket server whose leaf it signed; the server
    /// accepts one connection.
    async fn tls_server() -> (String, String, tokio::task::JoinHandle<bool>) {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca =
            CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
        let leaf_key = KeyPair::generate().expect("key");
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .expect("params")
            .signed_by(&leaf_key, &ca)
            .expect("leaf");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("wss://{}/v1/realtime", listener.local_addr().expect("addr"));
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let Ok(tls) = acceptor.accept(tcp).await else {
                return false;
            };
            tokio_tungstenite::accept_async(tls).await.is_ok()
        });
        (ca.pem(), url, server)
    }

    #[test]
    fn an_added_ca_is_trusted_for_the_model_and_the_default_roots_refuse_it() {
        run(async {
            let dir = std::env::temp_dir().join(format!("voxrelay-ca-{}", rand::random::<u64>()));
            std::fs::create_dir_all(&dir).expect("dir");
            let (ca_pem, url, server) = tls_server().await;
            let file = dir.join("ca.pem");
            std::fs::write(&file, &ca_pem).expect("write");
            let ca = ModelCa::from_pem_file(&file).expect("a usable CA");
            assert_eq!((ca.len(), ca.path()), (1, Some(file.as_path())));
            let request = url.as_str().into_client_request().expect("request");
            let trusted = Connector::Rustls(build_tls_config(&ca).expect("config"));
            let socket = dial_with(request, trusted, CONNECT_TIMEOUT).await;
            assert!(socket.is_ok(), "{:?}", socket.err());
            assert!(server.await.expect("server"));

            let (_, url, server) = tls_server().await;
            let request = url.as_str().into_client_request().expect("request");
            let default_roots =
                Connector::Rustls(build_tls_config(&ModelCa::default()).expect("config"));
            match dial_with(request, default_roots, CONNECT_TIMEOUT).await {
                Err(UpstreamError::Connect(reason)) => {
                    assert!(reason.contains("certificate"), "{reason}")
                }
                other => panic!(
                    "expected an untrusted certificate, got {:?}",
                    other.map(|_| ())
                ),
            }
            assert!(!server.await.expect("server"));

            std::fs::write(&file, "no certificate here").expect("write");
            assert!(matches!(
                ModelCa::from_pem_file(&file),
                Err(ModelCaError::NoCertificate(_))
            ));
            assert!(matches!(
                ModelCa::from_pem_file(&dir.join("missing.pem")),
                Err(ModelCaError::Read { .. })
            ));
            let _ = std::fs::remove_dir_all(&dir);
        });
    }

    #[test]
    fn a_silent_server_hits_the_timeout() {
        run(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let url = format!("ws://{}/v1/realtime", listener.local_addr().expect("addr"));
            // Accept the TCP connection but never answer the upgrade.
            let hold = tokio::spawn(async move { listener.accept().await.map(|(s, _)| s) });
            let result =
                connect_with_timeout(&url, None, KeyHeader::Bearer, Duration::from_millis(100))
                    .await;
            assert!(matches!(result, Err(UpstreamError::ConnectTimeout(_))));
            hold.abort();
        });
    }

    #[test]
    fn bad_urls_and_keys_are_errors() {
        run(async {
            assert!(matches!(
                connect("not a url", None).await,
                Err(UpstreamError::InvalidUrl(_))
            ));
            let key = Secret::new("line\nbreak");
            assert!(matches!(
                connect("ws://127.0.0.1:9/v1/realtime", Some(&key)).await,
                Err(UpstreamError::InvalidApiKey)
            ));
        });
    }

    #[test]
    fn errors_never_show_the_key() {
        run(async {
            // A port nobody listens on: connection refused.
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            drop(listener);
            let key = Secret::new("sk-very-secret");
            let error = connect(&format!("ws://{addr}/v1/realtime"), Some(&key))
                .await
                .expect_err("refused");
            let shown = format!("{error} {error:?}");
            assert!(!shown.contains("sk-very-secret"), "{shown}");
        });
    }

    #[test]
    fn openai_protocol_greets_through_the_mock() {
        use crate::upstream::{OpenAiRealtime, RealtimeProtocol, SessionSettings, UpstreamEvent};
        use futures_util::{SinkExt as _, StreamExt as _};
        use tokio_tungstenite::tungstenite::Message;

        run(async {
            let server = MockRealtimeServer::start(MockConfig::default())
                .await
                .expect("mock");
            let key = Secret::new("sk-test");
            let mut socket = connect(&server.url(), Some(&key)).await.expect("connect");
            let mut protocol = OpenAiRealtime::new(SessionSettings {
                greeting: Some("Hello from the mock".to_owned()),
                ..SessionSettings::default()
            });
            let mut out = Vec::new();
            protocol.on_open(&mut out);
            let (mut ready, mut audio_bytes, mut status) = (false, 0usize, String::new());
            tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    for message in out.drain(..) {
                        socket.send(Message::text(message)).await.expect("send");
                    }
                    let Some(Ok(Message::Text(text))) = socket.next().await else {
                        panic!("socket ended early");
                    };
                    match protocol
                        .parse_event(text.as_str(), &mut out)
                        .expect("parses")
                    {
                        UpstreamEvent::SessionReady => ready = true,
                        UpstreamEvent::AudioDelta { audio_b64, .. } => {
                            use base64::Engine as _;
                            audio_bytes += base64::engine::general_purpose::STANDARD
                                .decode(audio_b64.as_bytes())
                                .expect("base64")
                                .len()
                        }
                        UpstreamEvent::ResponseDone { status: done, .. } => {
                            status = done.into_owned();
                            break;
                        }
                        UpstreamEvent::Error { message, .. } => panic!("mock error: {message}"),
                        _ => {}
                    }
                }
            })
            .await
            .expect("greeting in time");
            assert!(ready);
            assert_eq!(status, "completed");
            assert_eq!(audio_bytes, 1500 * 8, "1.5 s of μ-law greeting");
            let record = &server.log().sessions()[0];
            assert_eq!(
                record.client_event_types,
                ["session.update", "response.create"]
            );
            assert_eq!(
                record.session["audio"]["output"]["format"]["type"],
                "audio/pcmu"
            );
        });
    }
}
