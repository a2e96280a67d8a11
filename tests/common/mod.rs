//! Shared pieces of the end-to-end tests: a bridge plus the mock model on 127.0.0.1, tone
//! generation and detection, and a raw scripted Twilio socket for misbehaving callers.

#![allow(dead_code)]

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use url::Url;
use voxrelay::codec::g711;
use voxrelay::config::{AgentDefaults, BridgeConfig, UpstreamTarget};
use voxrelay::http::Bridge;
use voxrelay::twilio::signature::compute_signature;
use voxrelay::{AudioMode, Provider, Secret};
use voxrelay_sim::mock::{MockConfig, MockRealtimeServer};

pub const TOKEN: &str = "e2e-test-auth-token";
/// The account every test stream names (Twilio-shaped: `AC` + 32 hex digits).
pub const ACCOUNT_SID: &str = "AC0000000000000000000000000000a11c";

/// A Twilio-shaped stream SID (`MZ` + 32 hex digits) for test stream `n`.
pub fn stream_sid(n: u64) -> String {
    format!("MZ{n:032x}")
}

/// A Twilio-shaped call SID (`CA` + 32 hex digits) for test call `n`.
pub fn call_sid(n: u64) -> String {
    format!("CA{n:032x}")
}

/// The call SID [`start_raw_stream`] gives a stream: its own digits behind `CA`.
pub fn call_sid_of(stream_sid: &str) -> String {
    format!("CA{}", stream_sid.strip_prefix("MZ").unwrap_or(stream_sid))
}

pub struct Stack {
    pub mock: MockRealtimeServer,
    pub bridge: Bridge,
    pub url: Url,
    pub token: Secret,
}

pub async fn start_stack(mode: AudioMode, greeting: Option<&str>) -> Stack {
    start_stack_adjusted(MockConfig::default(), mode, greeting, |_| {}).await
}

pub async fn start_stack_with(
    mock: MockRealtimeServer,
    upstream: UpstreamTarget,
    mode: AudioMode,
    greeting: Option<&str>,
) -> Stack {
    start_stack_configured(mock, upstream, mode, greeting, |_| {}).await
}

/// A bridge and a mock model configured by `mock_config`, with a last word on the bridge.
pub async fn start_stack_adjusted(
    mock_config: MockConfig,
    mode: AudioMode,
    greeting: Option<&str>,
    adjust: impl FnOnce(&mut BridgeConfig),
) -> Stack {
    let mock = MockRealtimeServer::start(mock_config)
        .await
        .expect("mock model");
    let upstream = UpstreamTarget {
        url: mock.url(),
        api_key: Some(Secret::new("test-key")),
    };
    start_stack_configured(mock, upstream, mode, greeting, adjust).await
}

/// A bridge whose calls go to `provider` by default, both providers served by one mock (each
/// on its own path), with a last word on the bridge's configuration.
pub async fn start_stack_for(
    provider: Provider,
    mock_config: MockConfig,
    greeting: Option<&str>,
    adjust: impl FnOnce(&mut BridgeConfig),
) -> Stack {
    let mock = MockRealtimeServer::start(mock_config)
        .await
        .expect("mock model");
    let openai = UpstreamTarget {
        url: mock.url(),
        api_key: Some(Secret::new("test-key")),
    };
    let gemini = UpstreamTarget {
        url: mock.gemini_url(),
        api_key: Some(Secret::new("test-key")),
    };
    // OpenAI in μ-law passthrough; Gemini has one format each way whatever the mode says.
    start_stack_configured(mock, openai, AudioMode::Pcmu, greeting, move |config| {
        config.models.gemini = Some(gemini);
        config.models.default_provider = provider;
        config.agent.provider = provider;
        config.agent.voice = provider.default_voice().to_owned();
        adjust(config);
    })
    .await
}

/// Like [`start_stack_with`], with a last word on the bridge's configuration.
pub async fn start_stack_configured(
    mock: MockRealtimeServer,
    upstream: UpstreamTarget,
    mode: AudioMode,
    greeting: Option<&str>,
    adjust: impl FnOnce(&mut BridgeConfig),
) -> Stack {
    let mut config = BridgeConfig {
        agent: AgentDefaults {
            audio_mode: mode,
            greeting: greeting.map(str::to_owned),
            ..AgentDefaults::default()
        },
        ..BridgeConfig::local(Secret::new(TOKEN), upstream)
    };
    adjust(&mut config);
    let bridge = Bridge::start(&config).await.expect("bridge");
    let url = Url::parse(&format!("http://{}", bridge.local_addr())).unwrap();
    Stack {
        mock,
        bridge,
        url,
        token: Secret::new(TOKEN),
    }
}

/// `ms` of a sine tone at `hz`, amplitude ~0.3 FS, as μ-law 8 kHz.
pub fn tone_mulaw(hz: f64, ms: u32) -> Vec<u8> {
    (0..ms as usize * 8)
        .map(|n| {
            let sample = 10_000.0 * (2.0 * std::f64::consts::PI * hz * n as f64 / 8000.0).sin();
            g711::mulaw_encode(sample as i16)
        })
        .collect()
}

pub fn silence_mulaw(ms: u32) -> Vec<u8> {
    vec![0xFF; ms as usize * 8]
}

/// Goertzel power of `samples` at `hz` for sample rate `rate`, normalised by length.
pub fn tone_power(samples: &[i16], rate: f64, hz: f64) -> f64 {
    let coefficient = 2.0 * (2.0 * std::f64::consts::PI * hz / rate).cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &x in samples {
        let s0 = x as f64 + coefficient * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    (s1 * s1 + s2 * s2 - coefficient * s1 * s2) / (samples.len().max(1) as f64).powi(2)
}

/// Which of `candidates` is strongest in `samples`.
pub fn dominant(samples: &[i16], rate: f64, candidates: &[f64]) -> f64 {
    candidates
        .iter()
        .copied()
        .max_by(|a, b| tone_power(samples, rate, *a).total_cmp(&tone_power(samples, rate, *b)))
        .unwrap()
}

pub fn decode_mulaw(bytes: &[u8]) -> Vec<i16> {
    bytes.iter().map(|&b| g711::mulaw_decode(b)).collect()
}

pub type RawSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a signed Media Streams socket without sending anything.
pub async fn open_media_socket(stack: &Stack) -> RawSocket {
    let ws_url = format!("ws://{}/twilio/media", stack.bridge.local_addr());
    let mut request = ws_url.as_str().into_client_request().unwrap();
    let signature = compute_signature(TOKEN, &ws_url, &[]);
    request
        .headers_mut()
        .insert("x-twilio-signature", signature.parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("media socket");
    ws
}

/// Opens a signed socket and sends `connected` and `start` for `stream_sid` (of the call
/// [`call_sid_of`] names).
pub async fn start_raw_stream(stack: &Stack, stream_sid: &str) -> RawSocket {
    start_raw_stream_as(stack, stream_sid, &call_sid_of(stream_sid), json!({})).await
}

/// Opens a signed socket and sends `connected` and a `start` naming `call_sid`, carrying
/// `custom_parameters` (a JSON object) as the TwiML's `<Parameter>`s.
pub async fn start_raw_stream_as(
    stack: &Stack,
    stream_sid: &str,
    call_sid: &str,
    custom_parameters: serde_json::Value,
) -> RawSocket {
    let mut ws = open_media_socket(stack).await;
    ws.send(Message::text(
        json!({"event":"connected","protocol":"Call","version":"1.0.0"}).to_string(),
    ))
    .await
    .unwrap();
    ws.send(Message::text(
        json!({
            "event": "start", "sequenceNumber": "1", "streamSid": stream_sid,
            "start": {
                "accountSid": ACCOUNT_SID, "streamSid": stream_sid, "callSid": call_sid,
                "tracks": ["inbound"], "customParameters": custom_parameters,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
            }
        })
        .to_string(),
    ))
    .await
    .unwrap();
    ws
}

pub fn media_message(stream_sid: &str, sequence: u64, payload_b64: &str) -> Message {
    Message::text(
        json!({
            "event": "media", "sequenceNumber": sequence.to_string(), "streamSid": stream_sid,
            "media": {"track": "inbound", "chunk": sequence.to_string(), "timestamp": (sequence * 20).to_string(), "payload": payload_b64}
        })
        .to_string(),
    )
}

/// Waits (up to 5 s each) until the stack's one pre-warmed session has expired unclaimed and
/// the mock model has seen its socket close.
pub async fn assert_prewarm_expired_unclaimed(stack: &Stack) {
    let metrics = stack.bridge.metrics();
    assert!(
        eventually(Duration::from_secs(5), || metrics
            .prewarm_unclaimed
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1)
        .await,
        "the pre-warmed session was not closed as unclaimed"
    );
    assert!(
        eventually(Duration::from_secs(5), || stack
            .mock
            .log()
            .active_sessions()
            == 0)
        .await,
        "the mock model still has a session open"
    );
}

/// POSTs `params` to the voice webhook, signed with `signature` or, without one, with their
/// own valid signature, as Twilio would.
pub async fn post_voice_form(
    stack: &Stack,
    params: &[(String, String)],
    signature: Option<&str>,
) -> voxrelay_sim::http_client::HttpResponse {
    let url = stack.url.join("/twilio/voice").unwrap();
    let computed = compute_signature(TOKEN, url.as_str(), params);
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish();
    voxrelay_sim::http_client::send(
        "POST",
        &url,
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("x-twilio-signature", signature.unwrap_or(&computed)),
        ],
        body.into_bytes(),
    )
    .await
    .expect("webhook")
}

/// POSTs a signed voice webhook (from [`ACCOUNT_SID`]) and returns the TwiML's stream URL and
/// `<Parameter>`s.
pub async fn voice_webhook(
    stack: &Stack,
    call_sid: &str,
    to: &str,
    from: &str,
) -> (String, Vec<(String, String)>) {
    let params: Vec<(String, String)> = [
        ("AccountSid", ACCOUNT_SID),
        ("CallSid", call_sid),
        ("To", to),
        ("From", from),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let response = post_voice_form(stack, &params, None).await;
    assert_eq!(response.status, 200, "{}", response.body);
    voxrelay_sim::caller::parse_connect_stream(&response.body).expect("a <Stream> in the TwiML")
}

/// Waits for the bridge to close `ws` (a Close frame or the connection ending).
pub async fn closed_by_bridge(ws: &mut RawSocket, within: Duration) -> bool {
    use futures_util::StreamExt;
    tokio::time::timeout(within, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return true,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .unwrap_or(false)
}

/// Polls `condition` every 20 ms for up to `limit`.
pub async fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    condition()
}

/// A fresh directory under the system's temp dir (`voxrelay-{name}-{pid}-{random}`), removed
/// when dropped.
pub struct Scratch(pub std::path::PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "voxrelay-{name}-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One call per tone in `tones`, all at once, each caller speaking its own tone: every caller
/// must hear back only its own tone, and every model session hear exactly one caller (no other
/// tone within 20 dB). Returns the mock's sessions for further checks.
pub async fn calls_on_their_own_tones(
    stack: &Stack,
    tones: &[f64],
) -> Vec<voxrelay_sim::mock::MockSessionRecord> {
    use voxrelay_sim::caller::{CallerConfig, place_call};
    let mut calls = Vec::new();
    for &hz in tones {
        let mut audio = tone_mulaw(hz, 600);
        audio.extend(silence_mulaw(100));
        let mut caller = CallerConfig::new(stack.url.clone(), stack.token.clone(), audio);
        caller.linger = Duration::from_millis(2_000);
        calls.push(tokio::spawn(async move { (hz, place_call(&caller).await) }));
    }
    for call in calls {
        let (hz, report) = tokio::time::timeout(Duration::from_secs(30), call)
            .await
            .unwrap()
            .unwrap();
        let heard = decode_mulaw(&report.expect("call succeeded").audio_received);
        assert!(
            heard.len() >= 8 * 400,
            "caller on {hz} Hz heard only {} samples",
            heard.len()
        );
        assert_eq!(
            dominant(&heard, 8000.0, tones),
            hz,
            "caller on {hz} Hz heard someone else"
        );
    }
    let sessions = stack.mock.log().sessions();
    assert_eq!(sessions.len(), tones.len());
    let mut heard_by_model = std::collections::HashSet::new();
    for session in &sessions {
        let rate = session.input_rate as f64;
        let hz = dominant(&session.input_audio_8k, rate, tones);
        let own = tone_power(&session.input_audio_8k, rate, hz);
        for &other in tones.iter().filter(|&&t| t != hz) {
            let leak = tone_power(&session.input_audio_8k, rate, other);
            assert!(
                leak < own / 100.0,
                "session hearing {hz} Hz also hears {other} Hz"
            );
        }
        heard_by_model.insert(hz as u64);
    }
    assert_eq!(
        heard_by_model.len(),
        tones.len(),
        "two sessions heard the same caller"
    );
    sessions
}

// ---- the reference control plane, for tests of a tenant's calls ----

/// The key the tests' bridges sign with and their control planes accept.
pub const CP_KEY_ID: &str = "e2e-tests";
pub const CP_KEY_SECRET: &str = "e2e-tests-secret";

/// The reference control plane on 127.0.0.1, its database at `db`, seeded with the shipped
/// tenants.
pub async fn start_control_plane(
    db: &std::path::Path,
) -> voxrelay_control_plane::server::RunningControlPlane {
    start_control_plane_seeded(db, voxrelay_control_plane::server::seed_toml().to_owned()).await
}

/// The reference control plane on 127.0.0.1, seeded with `seed` (TOML; the shipped files).
pub async fn start_control_plane_seeded(
    db: &std::path::Path,
    seed: String,
) -> voxrelay_control_plane::server::RunningControlPlane {
    use voxrelay_control_plane::server::{ControlPlane, ControlPlaneConfig};
    ControlPlane::start(ControlPlaneConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        db: voxrelay_control_plane::store::DbLocation::File(db.to_path_buf()),
        seed: Some(voxrelay_control_plane::seed::SeedSource::with_shipped_files(seed)),
        verifier: voxrelay::control::signing::Verifier::from_key_list(&format!(
            "{CP_KEY_ID}:{CP_KEY_SECRET}"
        ))
        .unwrap(),
    })
    .await
    .expect("control plane")
}

/// A bridge's way to a test control plane. Contexts are fetched at every call (a tiny TTL),
/// so a tenant's change shows at its next call.
pub fn control_target(url: Url, spool: &std::path::Path) -> voxrelay::config::ControlPlaneTarget {
    voxrelay::config::ControlPlaneTarget {
        url,
        key: voxrelay::control::signing::SigningKey::new(CP_KEY_ID, Secret::new(CP_KEY_SECRET)),
        lookup_budget: Duration::from_millis(500),
        context_ttl: Duration::from_millis(1),
        context_stale: Duration::from_millis(1),
        report_spool_dir: spool.to_path_buf(),
        report_retry: Duration::from_millis(500),
        report_resend: Duration::from_secs(3600),
    }
}
