//! The baseline relay: the least a Twilio ⇄ OpenAI Realtime relay can do, to measure the
//! machine's floor beside voxrelay's figures.
//!
//! Owns [`BaselineRelay`], a do-nothing relay on the bridge's I/O stack: hyper 1 + fastwebsockets
//! on the Twilio side (TCP_NODELAY), tokio-tungstenite with TCP_NODELAY upstream through
//! [`crate::dial`] (the bridge's dial settings), serde_json over borrowed strings, JSON written
//! into reused buffers. Each call is ONE task with no queues, no pacing, no playback accounting, no
//! transcoding and no registry, but it does the protocol work any relay must: every message is
//! parsed, every payload is base64-decoded (into a reused buffer) to validate it (an invalid one is
//! dropped), Twilio `media` becomes `input_audio_buffer.append` with the payload copied as is,
//! `dtmf` becomes a user text, `response.output_audio.delta` becomes Twilio `media` followed by a
//! `mark`, whose echo is matched against the marks outstanding, and `speech_started` becomes
//! `clear`. It is a floor, not a product: there is **no** `X-Twilio-Signature` check (every
//! WebSocket on any path is a call) and no start timeout, so it must never face the internet.
//! Invariants: nothing panics on peer input (malformed messages are skipped); a call ends on Twilio
//! `stop`, either socket closing, or [`BaselineRelay::shutdown`], and every ending sends a close
//! frame on both sockets that are still open.
//!
//! The protocol work per message is `work::CallWork`, which holds no socket: this relay feeds
//! it, and so does the same floor on io_uring (`uring`, the `io-uring` feature, Linux), so the
//! two floors differ only in how bytes move. [`FloorRelay`] starts either ([`FloorDriver`],
//! `bench --floor-driver`, `baseline-relay --driver`).
//!
//! [`Fault`] plants one known fault for the harness's own tests (`baseline-relay --fault`): a
//! benchmark that does not catch it is broken. The bridge has no such knob.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{FragmentCollectorRead, Frame, OpCode, Payload, WebSocket, WebSocketError};
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

use crate::dial::{DialError, ModelSocket, connect};
use voxrelay_core::Secret;
use voxrelay_core::twilio::MAX_TWILIO_MESSAGE_BYTES;
use work::{CallWork, Mixer, OUT_CAPACITY, TwilioOutcome};

#[cfg(all(feature = "io-uring", target_os = "linux"))]
pub mod uring;
mod work;

/// The bearer token sent upstream: the benchmark's mock accepts any non-empty token.
pub const UPSTREAM_KEY: &str = "baseline";

/// The one GA `session.update` a call sends: μ-law both ways (so audio passes through
/// untouched) and server VAD (so the model detects turns and barge-in).
pub const SESSION_UPDATE: &str = concat!(
    r#"{"type":"session.update","session":{"type":"realtime","output_modalities":["audio"],"#,
    r#""audio":{"input":{"format":{"type":"audio/pcmu"},"turn_detection":{"type":"server_vad"}},"#,
    r#""output":{"format":{"type":"audio/pcmu"}}}}}"#
);

/// How long a closing call waits for each peer to take its close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A fault the relay plants on purpose, so the harness's tests can check it is caught.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// Drop every 100th model delta (1% of the downlink).
    DropDownlink,
    /// Hang up after the caller's 50th `media` frame (one second of audio).
    HangUpEarly,
    /// Send each model delta to the caller as two `media` messages, split mid-frame.
    Rechunk,
    /// Every 10th model delta goes to the caller of the last call that relayed one, when that
    /// is another call: two calls' audio mixed.
    MixCalls,
}

/// Why a call could not go on (peer faults, not the ordinary ways a call ends).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BaselineError {
    #[error("twilio socket: {0}")]
    Twilio(#[from] WebSocketError),
    #[error("could not open the upstream socket: {0}")]
    UpstreamConnect(#[from] DialError),
    #[error("upstream socket: {0}")]
    Upstream(#[from] tungstenite::Error),
}

/// How a call ended without a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    TwilioStop,
    TwilioClosed,
    UpstreamClosed,
    Shutdown,
    /// A planted [`Fault`] ended the call.
    Fault,
}

/// A running baseline relay. Dropping it shuts it down, like [`BaselineRelay::shutdown`].
#[derive(Debug)]
pub struct BaselineRelay {
    addr: SocketAddr,
    fault: Option<Fault>,
    cancel: CancellationToken,
    live_calls: Arc<AtomicUsize>,
}

/// What every connection needs; read-only after start.
#[derive(Debug)]
struct Shared {
    upstream_url: String,
    key: Secret,
    live_calls: Arc<AtomicUsize>,
    fault: Option<Fault>,
    mixer: Mixer,
    next_call: std::sync::atomic::AtomicU64,
}

impl BaselineRelay {
    /// Listens on `listen` (port 0 allowed); every WebSocket on any path is a call.
    pub async fn start(listen: SocketAddr, upstream_url: String) -> std::io::Result<Self> {
        Self::start_with_fault(listen, upstream_url, None).await
    }

    /// [`BaselineRelay::start`], planting `fault` (for the harness's tests).
    pub async fn start_with_fault(
        listen: SocketAddr,
        upstream_url: String,
        fault: Option<Fault>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        let live_calls = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new(Shared {
            upstream_url,
            key: Secret::new(UPSTREAM_KEY),
            live_calls: Arc::clone(&live_calls),
            fault,
            mixer: Mixer::default(),
            next_call: std::sync::atomic::AtomicU64::new(0),
        });
        tokio::spawn(accept_loop(listener, shared, cancel.clone()));
        Ok(Self {
            addr,
            fault,
            cancel,
            live_calls,
        })
    }

    /// The fault planted, if any.
    pub fn fault(&self) -> Option<Fault> {
        self.fault
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and ends every live call (both sockets get a close frame). Returns at
    /// once; [`BaselineRelay::live_calls`] reaches 0 when the calls have closed.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// Calls whose Twilio WebSocket is open.
    pub fn live_calls(&self) -> usize {
        self.live_calls.load(Ordering::SeqCst)
    }
}

impl Drop for BaselineRelay {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// How a floor relay moves its bytes (`bench --floor-driver`, `baseline-relay --driver`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FloorDriver {
    /// hyper and fastwebsockets, tokio-tungstenite, one task per call (`BaselineRelay`)
    #[default]
    Tokio,
    /// one thread, one io_uring, every call (`uring::UringRelay`; the `io-uring` feature,
    /// Linux, plain ws:// models only)
    Uring,
}

impl FloorDriver {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tokio => "tokio",
            Self::Uring => "uring",
        }
    }
}

/// Why a floor relay could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FloorError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[cfg(all(feature = "io-uring", target_os = "linux"))]
    #[error(transparent)]
    Uring(#[from] uring::UringError),
    #[error("this build has no io_uring floor: build with `--features io-uring` (Linux only)")]
    UringNotBuilt,
}

/// A running floor relay of either driver.
#[derive(Debug)]
pub enum FloorRelay {
    Tokio(BaselineRelay),
    #[cfg(all(feature = "io-uring", target_os = "linux"))]
    Uring(uring::UringRelay),
}

impl FloorRelay {
    /// Starts the floor of `driver` on `listen`, relaying to `upstream_url`.
    pub async fn start(
        driver: FloorDriver,
        listen: SocketAddr,
        upstream_url: String,
        fault: Option<Fault>,
    ) -> Result<Self, FloorError> {
        match driver {
            FloorDriver::Tokio => Ok(Self::Tokio(
                BaselineRelay::start_with_fault(listen, upstream_url, fault).await?,
            )),
            #[cfg(all(feature = "io-uring", target_os = "linux"))]
            FloorDriver::Uring => Ok(Self::Uring(uring::UringRelay::start(
                listen,
                &upstream_url,
                fault,
            )?)),
            #[cfg(not(all(feature = "io-uring", target_os = "linux")))]
            FloorDriver::Uring => Err(FloorError::UringNotBuilt),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        match self {
            Self::Tokio(relay) => relay.local_addr(),
            #[cfg(all(feature = "io-uring", target_os = "linux"))]
            Self::Uring(relay) => relay.local_addr(),
        }
    }

    /// Stops accepting and ends every live call; returns at once.
    pub fn shutdown(&self) {
        match self {
            Self::Tokio(relay) => relay.shutdown(),
            #[cfg(all(feature = "io-uring", target_os = "linux"))]
            Self::Uring(relay) => relay.shutdown(),
        }
    }

    /// Calls whose Twilio WebSocket is open.
    pub fn live_calls(&self) -> usize {
        match self {
            Self::Tokio(relay) => relay.live_calls(),
            #[cfg(all(feature = "io-uring", target_os = "linux"))]
            Self::Uring(relay) => relay.live_calls(),
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _peer)) => {
                tokio::spawn(serve_connection(
                    stream,
                    Arc::clone(&shared),
                    cancel.clone(),
                ));
            }
            Err(error) => {
                tracing::warn!(%error, "baseline relay: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Serves one HTTP/1 connection: an upgrade request becomes a call, anything else gets 400.
async fn serve_connection(stream: TcpStream, shared: Arc<Shared>, cancel: CancellationToken) {
    // Every Twilio-side write is one small frame; Nagle would hold the second of two
    // back-to-back frames until the first is acknowledged.
    let _ = stream.set_nodelay(true);
    let call_cancel = cancel.clone();
    let service = service_fn(move |mut request: Request<Incoming>| {
        let shared = Arc::clone(&shared);
        let cancel = call_cancel.clone();
        async move {
            let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut request) {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::debug!(%error, "baseline relay: not a websocket upgrade");
                    let mut refused = Response::new(Empty::<Bytes>::new());
                    *refused.status_mut() = StatusCode::BAD_REQUEST;
                    return Ok::<_, Infallible>(refused);
                }
            };
            // The upgraded socket only exists once hyper has written the 101 response, which
            // happens after this handler returns: the call runs in its own task.
            tokio::spawn(async move {
                match upgrade.await {
                    Ok(ws) => {
                        let _live = LiveCall::enter(&shared.live_calls);
                        match run_call(ws, &shared, &cancel).await {
                            Ok(reason) => tracing::debug!(?reason, "baseline call ended"),
                            Err(error) => tracing::info!(%error, "baseline call failed"),
                        }
                    }
                    Err(error) => tracing::debug!(%error, "baseline upgrade did not complete"),
                }
            });
            Ok(response)
        }
    });
    let connection = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::select! {
        () = cancel.cancelled() => {}
        served = connection => {
            if let Err(error) = served {
                tracing::debug!(%error, "baseline relay: http connection failed");
            }
        }
    }
}

/// Counts a call as live for as long as it is held, however the call task ends.
struct LiveCall(Arc<AtomicUsize>);

impl LiveCall {
    fn enter(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(counter))
    }
}

impl Drop for LiveCall {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs one call to its end, then closes both sockets.
async fn run_call<S>(
    mut ws: WebSocket<S>,
    shared: &Shared,
    cancel: &CancellationToken,
) -> Result<EndReason, BaselineError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.set_max_message_size(MAX_TWILIO_MESSAGE_BYTES);
    // The read side must never write (the write half is ours): pings and closes are
    // answered below.
    ws.set_auto_pong(false);
    ws.set_auto_close(false);
    // Writes are buffered and flushed once per message handled, so a `media` and its `mark`
    // leave in one system call, as the bridge's do.
    let (read_half, mut twilio_tx) = ws.split(|stream| {
        let (read, write) = tokio::io::split(stream);
        (
            read,
            tokio::io::BufWriter::with_capacity(OUT_CAPACITY, write),
        )
    });

    // fastwebsockets' `read_frame` is not cancel-safe: it consumes a frame header from its
    // buffer before awaiting the payload, so a `read_frame` future dropped by `select!` when
    // the upstream branch wins can lose half a frame. `unfold` keeps the one in-flight read
    // future inside a pinned stream that lives across loop iterations; `next()` on it is
    // cancel-safe (dropping `next()` leaves the read in the stream, to resume next time), and
    // the future is stored inline, so nothing is allocated per frame. The stream owns only
    // the read half, so the loop can write to Twilio while a read is pending.
    let frames = futures_util::stream::unfold(
        FragmentCollectorRead::new(read_half),
        |mut reader| async move {
            let mut never_sends = |_: Frame<'_>| async { Ok::<(), std::io::Error>(()) };
            let frame = reader.read_frame(&mut never_sends).await;
            Some((frame, reader))
        },
    );
    let mut frames = std::pin::pin!(frames);

    let number = shared
        .next_call
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut work = CallWork::new(number, shared.fault);
    let mut upstream: Option<ModelSocket> = None;
    // No `biased;`: the model's deltas can arrive in bursts, and a burst must not hold back
    // the caller's frames (nor the reverse).
    let ended = loop {
        tokio::select! {
            () = cancel.cancelled() => break Ok(EndReason::Shutdown),
            frame = frames.next() => {
                let frame = match frame {
                    Some(Ok(frame)) => frame,
                    Some(Err(error)) => break Err(error.into()),
                    None => break Ok(EndReason::TwilioClosed),
                };
                match frame.opcode {
                    OpCode::Text => {
                        // fastwebsockets has already checked that text frames are UTF-8.
                        let Ok(text) = std::str::from_utf8(&frame.payload) else {
                            continue;
                        };
                        match on_twilio(&mut work, &mut upstream, text, shared, cancel).await {
                            Ok(None) => {}
                            Ok(Some(reason)) => break Ok(reason),
                            Err(error) => break Err(error),
                        }
                    }
                    OpCode::Ping => {
                        let pong = Frame::pong(Payload::Borrowed(&frame.payload));
                        if let Err(error) = twilio_tx.write_frame(pong).await {
                            break Err(error.into());
                        }
                        if let Err(error) = twilio_tx.flush().await {
                            break Err(error.into());
                        }
                    }
                    OpCode::Close => break Ok(EndReason::TwilioClosed),
                    OpCode::Binary | OpCode::Pong | OpCode::Continuation => {}
                }
            }
            message = next_upstream(&mut upstream) => {
                let text = match message {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_))) | None => break Ok(EndReason::UpstreamClosed),
                    // tungstenite answers pings itself on the next read or write.
                    Some(Ok(_)) => continue,
                    Some(Err(error)) => break Err(error.into()),
                };
                work.on_model(text.as_str(), &shared.mixer);
                if let Err(error) = write_to_twilio(&work, &mut twilio_tx).await {
                    break Err(error);
                }
            }
        }
    };

    // Close both sides politely, each bounded so a stalled peer cannot hold the task.
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        twilio_tx.write_frame(Frame::close(1000, b"")).await?;
        twilio_tx.flush().await
    })
    .await;
    if let Some(mut upstream) = upstream.take() {
        let _ = tokio::time::timeout(CLOSE_GRACE, upstream.close(None)).await;
    }
    ended
}

/// The next upstream message, or never while the call has no upstream yet.
async fn next_upstream(
    upstream: &mut Option<ModelSocket>,
) -> Option<Result<Message, tungstenite::Error>> {
    match upstream {
        Some(socket) => socket.next().await,
        None => std::future::pending().await,
    }
}

/// Handles one Twilio text message; `Some` ends the call. A `start` dials the model here, so
/// Twilio's later messages wait in the socket until it is open.
async fn on_twilio(
    work: &mut CallWork,
    upstream: &mut Option<ModelSocket>,
    text: &str,
    shared: &Shared,
    cancel: &CancellationToken,
) -> Result<Option<EndReason>, BaselineError> {
    match work.on_twilio(text) {
        TwilioOutcome::Nothing => {}
        TwilioOutcome::ToModel => {
            if let Some(socket) = upstream.as_mut() {
                // tungstenite takes ownership of a message's payload (it masks it into its own
                // buffer), so the reused String is copied once into the frame.
                socket.send(Message::text(work.to_model())).await?;
            }
        }
        TwilioOutcome::Dial => {
            let dial = connect(&shared.upstream_url, Some(&shared.key));
            let mut socket = tokio::select! {
                () = cancel.cancelled() => return Ok(Some(EndReason::Shutdown)),
                dialled = dial => dialled?,
            };
            socket.send(Message::text(SESSION_UPDATE)).await?;
            *upstream = Some(socket);
            work.model_opened();
        }
        TwilioOutcome::End(reason) => return Ok(Some(reason)),
    }
    Ok(None)
}

/// Writes what the last model event composed for Twilio, then flushes: a `media` and its
/// `mark` leave in one system call. A server-side frame is not masked, so fastwebsockets
/// writes straight from the buffer.
async fn write_to_twilio<S: AsyncWrite + Unpin>(
    work: &CallWork,
    twilio_tx: &mut fastwebsockets::WebSocketWrite<S>,
) -> Result<(), BaselineError> {
    let mut wrote = false;
    for message in work.to_twilio() {
        twilio_tx
            .write_frame(Frame::text(Payload::Borrowed(message.as_bytes())))
            .await?;
        wrote = true;
    }
    if wrote {
        twilio_tx.flush().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::test_support::tone;
    use crate::mock::{MockConfig, MockRealtimeServer};
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use serde_json::{Value, json};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_tungstenite::tungstenite::handshake::server::{
        ErrorResponse, Request as HandshakeRequest, Response as HandshakeResponse,
    };
    use voxrelay_core::codec::g711::{mulaw_decode, mulaw_encode};

    type Client = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    /// Upper bound for any single step; every step takes milliseconds when things work.
    const STEP: Duration = Duration::from_secs(5);
    const SID: &str = "MZ00000000000000000000000000000001";
    const LOCALHOST: &str = "127.0.0.1:0";

    async fn start_relay(driver: FloorDriver, upstream_url: String) -> FloorRelay {
        FloorRelay::start(driver, LOCALHOST.parse().expect("addr"), upstream_url, None)
            .await
            .expect("relay starts")
    }

    async fn dial(relay: &FloorRelay) -> Client {
        let url = format!("ws://{}/any/path", relay.local_addr());
        let (client, _) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(url))
            .await
            .expect("handshake in time")
            .expect("handshake");
        client
    }

    async fn send(client: &mut Client, text: impl Into<String>) {
        client
            .send(Message::text(text.into()))
            .await
            .expect("client send");
    }

    async fn send_start(client: &mut Client) {
        send(
            client,
            json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}).to_string(),
        )
        .await;
        send(
            client,
            json!({"event": "start", "sequenceNumber": "1", "streamSid": SID,
                "start": {"streamSid": SID, "callSid": "CA00000000000000000000000000000001",
                    "tracks": ["inbound"], "customParameters": {},
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})
            .to_string(),
        )
        .await;
    }

    fn media(bytes: &[u8]) -> String {
        json!({"event": "media", "streamSid": SID,
            "media": {"track": "inbound", "chunk": "1", "timestamp": "0",
                "payload": BASE64.encode(bytes)}})
        .to_string()
    }

    /// The next text message from the relay, or `None` once it closes the socket.
    async fn next_text(client: &mut Client) -> Option<String> {
        loop {
            let message = tokio::time::timeout(STEP, client.next())
                .await
                .expect("relay message in time");
            match message {
                Some(Ok(Message::Text(text))) => return Some(text.as_str().to_owned()),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => {}
            }
        }
    }

    /// Polls `condition` until it holds; false if it never does within [`STEP`].
    async fn eventually(mut condition: impl FnMut() -> bool) -> bool {
        tokio::time::timeout(STEP, async {
            while !condition() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .is_ok()
    }

    #[test]
    fn session_update_is_the_minimal_ga_shape() {
        let update: Value = serde_json::from_str(SESSION_UPDATE).expect("valid JSON");
        assert_eq!(update["type"], "session.update");
        let session = &update["session"];
        assert_eq!(session["type"], "realtime");
        assert_eq!(session["audio"]["input"]["format"]["type"], "audio/pcmu");
        assert_eq!(session["audio"]["output"]["format"]["type"], "audio/pcmu");
        assert_eq!(
            session["audio"]["input"]["turn_detection"]["type"],
            "server_vad"
        );
    }

    /// Start, caller audio, a key press, the model's echo and barge-in, and `stop`, through
    /// the relay against the conversational mock.
    async fn relays_a_call_through_the_mock(driver: FloorDriver) {
        let mock = MockRealtimeServer::start(MockConfig {
            reply_delay: Duration::from_millis(10),
            silence_ms: 200,
            ..MockConfig::default()
        })
        .await
        .expect("mock");
        let log = mock.log();
        let relay = start_relay(driver, mock.url()).await;
        let mut client = dial(&relay).await;
        send_start(&mut client).await;

        assert!(
            eventually(|| log.sessions().first().is_some_and(|s| s
                .client_event_types
                .first()
                .map(String::as_str)
                == Some("session.update")))
            .await,
            "start opens the upstream session and configures it"
        );
        let session = log.sessions()[0].session.clone();
        assert_eq!(session["type"], "realtime");
        assert_eq!(session["audio"]["input"]["format"]["type"], "audio/pcmu");
        assert_eq!(session["audio"]["output"]["format"]["type"], "audio/pcmu");
        assert_eq!(
            session["audio"]["input"]["turn_detection"]["type"],
            "server_vad"
        );
        assert_eq!(relay.live_calls(), 1);

        // 300 ms of tone then 400 ms of silence: one utterance for the mock's VAD.
        let mut audio: Vec<u8> = tone(300, 8000, 8000.0)
            .into_iter()
            .map(mulaw_encode)
            .collect();
        audio.extend(std::iter::repeat_n(0xFF, 8 * 400));
        let frames: Vec<&[u8]> = audio.chunks(160).collect();
        for frame in &frames {
            send(&mut client, media(frame)).await;
        }
        send(
            &mut client,
            json!({"event": "dtmf", "streamSid": SID, "sequenceNumber": "40",
                "dtmf": {"track": "inbound_track", "digit": "7"}})
            .to_string(),
        )
        .await;

        // The echo of the tone comes back as Twilio media; speech_started as a clear.
        let mut heard = Vec::new();
        let (mut clears, mut marks, mut marks_due) = (0, 0, 0);
        while heard.len() < 2400 {
            let text = next_text(&mut client).await.expect("relay still open");
            let message: Value = serde_json::from_str(&text).expect("relay JSON");
            assert_eq!(message["streamSid"], SID, "{text}");
            match message["event"].as_str() {
                Some("clear") => {
                    assert_eq!(message.as_object().map(|m| m.len()), Some(2), "{text}");
                    clears += 1;
                }
                Some("media") => {
                    assert_eq!(message.as_object().map(|m| m.len()), Some(3), "{text}");
                    let payload = message["media"]["payload"].as_str().expect("payload");
                    heard.extend(BASE64.decode(payload).expect("base64"));
                    marks_due += 1;
                }
                Some("mark") => {
                    assert_eq!(marks_due, 1, "one mark after each media: {text}");
                    marks_due = 0;
                    assert_eq!(message["mark"]["name"], format!("m{marks}"), "{text}");
                    marks += 1;
                }
                _ => panic!("unexpected message to Twilio: {text}"),
            }
        }
        assert_eq!(clears, 1, "one utterance, one speech_started, one clear");
        let record = &log.sessions()[0];
        let heard_pcm: Vec<i16> = heard.iter().map(|&code| mulaw_decode(code)).collect();
        assert!(
            record.output_audio.starts_with(&heard_pcm),
            "Twilio hears exactly what the model said, in order"
        );

        assert!(
            eventually(|| log.sessions()[0].user_texts.len() == 1).await,
            "the key press reaches the model"
        );
        let record = &log.sessions()[0];
        assert!(
            record.user_texts[0].contains("\"7\""),
            "{:?}",
            record.user_texts
        );
        let expected: Vec<i16> = audio.iter().map(|&code| mulaw_decode(code)).collect();
        assert_eq!(
            record.input_audio_8k, expected,
            "caller audio arrives intact"
        );
        let appends = record
            .client_event_types
            .iter()
            .filter(|kind| *kind == "input_audio_buffer.append")
            .count();
        assert_eq!(appends, frames.len(), "one append per media frame");

        send(
            &mut client,
            json!({"event": "stop", "streamSid": SID, "sequenceNumber": "41",
                "stop": {"accountSid": "AC0", "callSid": "CA0"}})
            .to_string(),
        )
        .await;
        // Whatever was in flight may still arrive; then the relay closes.
        while next_text(&mut client).await.is_some() {}
        assert!(
            eventually(|| log.active_sessions() == 0 && log.sessions()[0].closed).await,
            "stop closes the upstream socket"
        );
        assert!(eventually(|| relay.live_calls() == 0).await);
    }

    /// A one-connection upstream that records the Authorization header and what the relay
    /// sends, says `events`, then closes after `close_after` client messages.
    async fn fake_upstream(
        events: Vec<String>,
        close_after: usize,
    ) -> (String, tokio::task::JoinHandle<(String, Vec<String>)>) {
        let listener = TcpListener::bind(LOCALHOST).await.expect("bind");
        let url = format!(
            "ws://{}/v1/realtime?model=gpt-realtime",
            listener.local_addr().expect("addr")
        );
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let mut authorization = String::new();
            // tungstenite's callback signature fixes the error type.
            #[allow(clippy::result_large_err)]
            let record_auth = |request: &HandshakeRequest, response: HandshakeResponse| {
                authorization = request
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                Ok::<_, ErrorResponse>(response)
            };
            let mut socket = tokio_tungstenite::accept_hdr_async(stream, record_auth)
                .await
                .expect("upstream handshake");
            let mut received = Vec::new();
            while received.len() < close_after {
                match socket.next().await {
                    Some(Ok(Message::Text(text))) => {
                        received.push(text.as_str().to_owned());
                        if received.len() == 1 {
                            for event in &events {
                                socket
                                    .send(Message::text(event.as_str()))
                                    .await
                                    .expect("upstream send");
                            }
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => break,
                }
            }
            let _ = socket.close(None).await;
            (authorization, received)
        });
        (url, task)
    }

    /// The downlink path byte for byte (escaped deltas included), malformed input skipped,
    /// and the upstream closing ending the call.
    async fn deltas_and_speech_started_reach_twilio_exactly(driver: FloorDriver) {
        let events = vec![
            "not json".to_owned(),
            r#"{"type":"rate_limits.updated","rate_limits":[]}"#.to_owned(),
            // `\/` is a legal JSON escape: the relay must unescape, not copy blindly.
            r#"{"type":"response.output_audio.delta","response_id":"resp_1","item_id":"item_1","output_index":0,"content_index":0,"delta":"AAEC\/w=="}"#.to_owned(),
            r#"{"type":"input_audio_buffer.speech_started","audio_start_ms":0,"item_id":"item_2"}"#.to_owned(),
        ];
        let (url, upstream) = fake_upstream(events, 2).await;
        let relay = start_relay(driver, url).await;
        let mut client = dial(&relay).await;
        // Before `start` there is no upstream: these go nowhere and break nothing.
        send(&mut client, "not json").await;
        send(&mut client, media(&[0xFF; 160])).await;
        send_start(&mut client).await;

        assert_eq!(
            next_text(&mut client).await.as_deref(),
            Some(
                format!(
                    r#"{{"event":"media","streamSid":"{SID}","media":{{"payload":"AAEC/w=="}}}}"#
                )
                .as_str()
            )
        );
        assert_eq!(
            next_text(&mut client).await.as_deref(),
            Some(
                format!(r#"{{"event":"mark","streamSid":"{SID}","mark":{{"name":"m0"}}}}"#)
                    .as_str()
            )
        );
        assert_eq!(
            next_text(&mut client).await.as_deref(),
            Some(format!(r#"{{"event":"clear","streamSid":"{SID}"}}"#).as_str())
        );
        // The mark's echo is matched, an unknown one is counted; neither is relayed upstream.
        for name in ["m0", "x"] {
            send(
                &mut client,
                json!({"event": "mark", "streamSid": SID, "mark": {"name": name}}).to_string(),
            )
            .await;
        }
        // Not base64: dropped, never relayed.
        send(
            &mut client,
            r#"{"event":"media","streamSid":"x","media":{"payload":"not base64!"}}"#,
        )
        .await;
        send(
            &mut client,
            r#"{"event":"media","streamSid":"x","media":{"payload":"gICA\/w=="}}"#,
        )
        .await;
        // The upstream hangs up after the append: the relay ends the call.
        assert_eq!(next_text(&mut client).await, None);
        let (authorization, received) = tokio::time::timeout(STEP, upstream)
            .await
            .expect("upstream done in time")
            .expect("upstream task");
        assert_eq!(authorization, "Bearer baseline");
        assert_eq!(
            received,
            [
                SESSION_UPDATE,
                r#"{"type":"input_audio_buffer.append","audio":"gICA/w=="}"#
            ]
        );
        assert!(eventually(|| relay.live_calls() == 0).await);
    }

    /// The caller hanging up closes the model's socket; an unreachable model ends the call.
    async fn either_side_failing_ends_the_call(driver: FloorDriver) {
        let mock = MockRealtimeServer::start(MockConfig::default())
            .await
            .expect("mock");
        let log = mock.log();
        let relay = start_relay(driver, mock.url()).await;
        let mut client = dial(&relay).await;
        send_start(&mut client).await;
        assert!(eventually(|| log.active_sessions() == 1).await);
        client.close(None).await.expect("client close");
        assert!(
            eventually(|| log.active_sessions() == 0).await,
            "twilio closing closes the upstream socket"
        );
        assert!(eventually(|| relay.live_calls() == 0).await);

        // A port nobody listens on: the upstream connect is refused.
        let unused = std::net::TcpListener::bind(LOCALHOST).expect("bind");
        let dead = format!("ws://{}/v1/realtime", unused.local_addr().expect("addr"));
        drop(unused);
        let relay = start_relay(driver, dead).await;
        let mut client = dial(&relay).await;
        send_start(&mut client).await;
        assert_eq!(next_text(&mut client).await, None, "the relay hangs up");
        assert!(eventually(|| relay.live_calls() == 0).await);
    }

    /// Plain HTTP gets 400; shutdown closes live calls and stops accepting.
    async fn refuses_plain_http_and_shuts_down_cleanly(driver: FloorDriver) {
        let mock = MockRealtimeServer::start(MockConfig::default())
            .await
            .expect("mock");
        let log = mock.log();
        let relay = start_relay(driver, mock.url()).await;

        let mut plain = TcpStream::connect(relay.local_addr()).await.expect("tcp");
        plain
            .write_all(b"GET /twilio/media HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = Vec::new();
        tokio::time::timeout(STEP, plain.read_to_end(&mut answer))
            .await
            .expect("answer in time")
            .expect("read");
        assert!(
            answer.starts_with(b"HTTP/1.1 400"),
            "{}",
            String::from_utf8_lossy(&answer)
        );

        let mut client = dial(&relay).await;
        send_start(&mut client).await;
        assert!(eventually(|| log.active_sessions() == 1).await);
        relay.shutdown();
        assert_eq!(
            next_text(&mut client).await,
            None,
            "shutdown closes the call"
        );
        assert!(eventually(|| log.active_sessions() == 0 && relay.live_calls() == 0).await);
        assert!(
            eventually(|| std::net::TcpStream::connect(relay.local_addr()).is_err()).await,
            "the listener is closed"
        );
    }

    /// The relay's checks, each against the floor of one driver.
    macro_rules! relay_checks {
        ($module:ident, $driver:expr) => {
            mod $module {
                use super::*;

                #[tokio::test]
                async fn relays_a_call_through_the_mock() {
                    super::relays_a_call_through_the_mock($driver).await;
                }

                #[tokio::test]
                async fn deltas_and_speech_started_reach_twilio_exactly() {
                    super::deltas_and_speech_started_reach_twilio_exactly($driver).await;
                }

                #[tokio::test]
                async fn either_side_failing_ends_the_call() {
                    super::either_side_failing_ends_the_call($driver).await;
                }

                #[tokio::test]
                async fn refuses_plain_http_and_shuts_down_cleanly() {
                    super::refuses_plain_http_and_shuts_down_cleanly($driver).await;
                }
            }
        };
    }

    relay_checks!(tokio_floor, FloorDriver::Tokio);
    #[cfg(all(feature = "io-uring", target_os = "linux"))]
    relay_checks!(uring_floor, FloorDriver::Uring);
}
