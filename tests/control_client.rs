//! The bridge's control-plane client against a scripted control plane on 127.0.0.1 that
//! verifies every request's signature with `signing::Verifier`.
//!
//! Durations are shortened (tens to hundreds of milliseconds) so the whole file runs in a few
//! seconds; nothing here sleeps for more than a fraction of a second at a time.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use url::Url;
use voxrelay::Secret;
use voxrelay::control::api::{CallReport, ToolRequest};
use voxrelay::control::client::{ControlError, ControlPlaneClient, ControlPlaneSettings};
use voxrelay::control::signing::{SignedHeaders, SigningKey, Verifier};
use voxrelay::session::metrics::{ControlEndpoint, Metrics};

const KEY_ID: &str = "bridge-1";
const SECRET: &str = "test-secret-do-not-log";

fn key() -> SigningKey {
    SigningKey::new(KEY_ID, Secret::new(SECRET))
}

/// One request the fake accepted.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    body: Vec<u8>,
    peer: SocketAddr,
}

/// The fake's answer to one request.
#[derive(Clone, Debug)]
struct Reply {
    status: u16,
    body: String,
    delay: Duration,
}

impl Reply {
    fn json(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            body: body.into(),
            delay: Duration::ZERO,
        }
    }

    fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

type Script = Box<dyn FnMut(&Seen) -> Reply + Send>;

struct FakeState {
    verifier: Mutex<Verifier>,
    seen: Mutex<Vec<Seen>>,
    rejected: AtomicUsize,
    script: Mutex<Script>,
}

/// A control plane that checks signatures (401 with the reason code when one fails) and
/// answers accepted requests from a script.
struct FakeControlPlane {
    addr: SocketAddr,
    state: Arc<FakeState>,
    task: JoinHandle<()>,
}

impl Drop for FakeControlPlane {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeControlPlane {
    async fn start(script: impl FnMut(&Seen) -> Reply + Send + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, script)
    }

    fn serve(listener: TcpListener, script: impl FnMut(&Seen) -> Reply + Send + 'static) -> Self {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(FakeState {
            verifier: Mutex::new(Verifier::new(vec![key()])),
            seen: Mutex::new(Vec::new()),
            rejected: AtomicUsize::new(0),
            script: Mutex::new(Box::new(script)),
        });
        let app = Router::new().fallback(handle).with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await;
        });
        Self { addr, state, task }
    }

    fn url(&self, prefix: &str) -> Url {
        Url::parse(&format!("http://{}{prefix}", self.addr)).unwrap()
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    fn rejected(&self) -> usize {
        self.state.rejected.load(Relaxed)
    }
}

async fn handle(
    State(state): State<Arc<FakeState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri
        .path_and_query()
        .map_or(uri.path(), |pq| pq.as_str())
        .to_owned();
    let verdict =
        SignedHeaders::from_headers(|name| headers.get(name).and_then(|value| value.to_str().ok()))
            .and_then(|signed| {
                state.verifier.lock().unwrap().verify(
                    unix_now(),
                    &signed,
                    method.as_str(),
                    &path,
                    &body,
                )
            });
    if let Err(rejection) = verdict {
        state.rejected.fetch_add(1, Relaxed);
        return json_response(401, format!(r#"{{"error":"{}"}}"#, rejection.as_str()));
    }
    let seen = Seen {
        method: method.to_string(),
        path,
        body: body.to_vec(),
        peer,
    };
    let reply = (state.script.lock().unwrap())(&seen);
    state.seen.lock().unwrap().push(seen);
    tokio::time::sleep(reply.delay).await;
    json_response(reply.status, reply.body)
}

fn json_response(status: u16, body: String) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn client_for(url: Url, timeout: Duration) -> (ControlPlaneClient, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let mut settings = ControlPlaneSettings::new(url, key());
    settings.request_timeout = timeout;
    (
        ControlPlaneClient::new(settings, metrics.clone()).unwrap(),
        metrics,
    )
}

fn context_json(tenant_id: &str, agent_name: &str, memory_namespace: &str) -> String {
    serde_json::json!({
        "tenant_id": tenant_id,
        "agent_name": agent_name,
        "voice": "marin",
        "greeting": "Hi!",
        "instructions": "Be brief.",
        "audio_mode": "pcmu",
        "language": "en-US",
        "tools": [],
        "memory_namespace": memory_namespace,
        "max_call_seconds": 600
    })
    .to_string()
}

fn report(call_sid: &str) -> CallReport {
    serde_json::from_value(serde_json::json!({
        "call_sid": call_sid,
        "stream_sid": "MZ1",
        "tenant_id": "t1",
        "agent_name": "Ada",
        "from": "+15550001111",
        "to": "+15552223333",
        "started_at_ms": 1_750_000_000_000u64,
        "ended_at_ms": 1_750_000_060_000u64,
        "end_reason": "twilio_stop",
        "context_source": "fresh",
        "audio_seconds_in": 60.0,
        "audio_seconds_out": 30.5,
        "barge_ins": 1,
        "dtmf_digits": 0,
        "tool_calls": 2,
        "latency": {
            "uplink_us": {"count": 3000, "p50": 40, "p99": 120, "max": 400},
            "downlink_us": {"count": 1500, "p50": 50, "p99": 150, "max": 900},
            "barge_in_us": {"count": 1, "p50": 800, "p99": 800, "max": 800}
        },
        "transcript": [{"speaker": "caller", "offset_ms": 1200, "text": "Hello?"}]
    }))
    .unwrap()
}

/// A 127.0.0.1 address nothing listens on (bound, then released).
async fn closed_port_url() -> Url {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    Url::parse(&format!("http://{addr}")).unwrap()
}

const SHORT: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// ControlPlaneClient

#[tokio::test]
async fn signed_requests_reach_every_endpoint_and_are_accepted() {
    let fake = FakeControlPlane::start(|seen: &Seen| match seen.path.as_str() {
        path if path.starts_with("/v1/context?") => {
            Reply::json(200, context_json("t1", "Ada", "t1/+15550001111"))
        }
        "/v1/calls/CA1/report" => Reply::json(204, ""),
        "/v1/tools/lookup_hours" => Reply::json(200, r#"{"output":"open 9-5"}"#),
        "/v1/calls?tenant_id=t1" => Reply::json(200, r#"{"calls":[]}"#),
        _ => Reply::json(404, r#"{"error":"not_found"}"#),
    })
    .await;
    let (client, metrics) = client_for(fake.url(""), SHORT);

    let context = client
        .context("+15552223333", "+15550001111", "CA1")
        .await
        .unwrap()
        .expect("a context");
    assert_eq!(context.tenant_id, "t1");
    assert_eq!(context.agent_name, "Ada");
    client.report(&report("CA1")).await.unwrap();
    let tool = client
        .tool(
            "lookup_hours",
            &ToolRequest {
                call_sid: "CA1".into(),
                tenant_id: "t1".into(),
                arguments: serde_json::json!({"day": "monday"}),
            },
        )
        .await
        .unwrap();
    assert_eq!(tool.output_text(), "open 9-5");
    assert!(client.calls("t1").await.unwrap().calls.is_empty());

    assert_eq!(fake.rejected(), 0);
    let seen = fake.seen();
    let lines: Vec<String> = seen
        .iter()
        .map(|s| format!("{} {}", s.method, s.path))
        .collect();
    assert_eq!(
        lines,
        [
            "GET /v1/context?to=%2B15552223333&from=%2B15550001111&call_sid=CA1",
            "POST /v1/calls/CA1/report",
            "POST /v1/tools/lookup_hours",
            "GET /v1/calls?tenant_id=t1",
        ]
    );
    let sent: CallReport = serde_json::from_slice(&seen[1].body).unwrap();
    assert_eq!(sent, report("CA1"));
    let tool_body: ToolRequest = serde_json::from_slice(&seen[2].body).unwrap();
    assert_eq!(tool_body.arguments["day"], "monday");
    for endpoint in [
        ControlEndpoint::Context,
        ControlEndpoint::Report,
        ControlEndpoint::Tool,
        ControlEndpoint::Calls,
    ] {
        assert_eq!(metrics.control_request_failures(endpoint), 0);
    }
}

#[tokio::test]
async fn a_base_url_path_prefix_is_sent_and_signed() {
    let fake = FakeControlPlane::start(|_: &Seen| Reply::json(204, "")).await;
    for base in ["/base", "/base/"] {
        let (client, _) = client_for(fake.url(base), SHORT);
        client.report(&report("CA 1/x")).await.unwrap();
    }
    assert_eq!(fake.rejected(), 0);
    let paths: Vec<String> = fake.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(
        paths,
        [
            "/base/v1/calls/CA%201%2Fx/report",
            "/base/v1/calls/CA%201%2Fx/report"
        ]
    );
}

#[tokio::test]
async fn context_404_is_none_and_errors_carry_status_and_code() {
    let fake = FakeControlPlane::start(|seen: &Seen| {
        if seen.path.contains("to=%2B1404") {
            Reply::json(404, r#"{"error":"unknown_number"}"#)
        } else if seen.path.contains("to=%2B1500") {
            Reply::json(500, r#"{"error":"database_down"}"#)
        } else {
            Reply::json(200, r#"{"not":"a context"}"#)
        }
    })
    .await;
    let (client, metrics) = client_for(fake.url(""), SHORT);
    assert_eq!(client.context("+1404", "+1", "CA1").await, Ok(None));
    assert_eq!(
        client.context("+1500", "+1", "CA2").await,
        Err(ControlError::Status {
            status: 500,
            code: Some("database_down".into())
        })
    );
    assert!(matches!(
        client.context("+1200", "+1", "CA3").await,
        Err(ControlError::Decode(_))
    ));
    // The 404 is an answer; the 500 and the undecodable body are failures.
    assert_eq!(
        metrics.control_request_failures(ControlEndpoint::Context),
        2
    );
}

#[tokio::test]
async fn a_wrong_secret_is_refused_by_the_verifier() {
    let fake = FakeControlPlane::start(|_: &Seen| Reply::json(204, "")).await;
    let settings = ControlPlaneSettings::new(
        fake.url(""),
        SigningKey::new(KEY_ID, Secret::new("not-the-secret")),
    );
    let client = ControlPlaneClient::new(settings, Arc::new(Metrics::default())).unwrap();
    let error = client.report(&report("CA1")).await.unwrap_err();
    assert_eq!(
        error,
        ControlError::Status {
            status: 401,
            code: Some("bad_signature".into())
        }
    );
    assert!(!error.is_permanent());
    assert_eq!(fake.rejected(), 1);
    assert!(!format!("{error} {error:?} {client:?}").contains("not-the-secret"));
}

#[tokio::test]
async fn slow_answers_time_out_and_huge_bodies_are_cut() {
    let fake = FakeControlPlane::start(|seen: &Seen| {
        if seen.path.contains("to=%2B1slow") {
            Reply::json(200, context_json("t1", "Ada", "t1/x")).after(Duration::from_millis(400))
        } else {
            Reply::json(
                200,
                format!(r#"{{"calls":[],"pad":"{}"}}"#, "x".repeat(2 << 20)),
            )
        }
    })
    .await;
    let timeout = Duration::from_millis(100);
    let (client, metrics) = client_for(fake.url(""), timeout);
    let started = Instant::now();
    assert_eq!(
        client.context("+1slow", "+1", "CA1").await,
        Err(ControlError::Timeout(timeout))
    );
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    let (client, _) = client_for(fake.url(""), SHORT);
    assert!(matches!(
        client.calls("t1").await,
        Err(ControlError::BodyTooLarge { limit: 1_048_576 })
    ));
    assert_eq!(
        metrics.control_request_failures(ControlEndpoint::Context),
        1
    );
}

#[tokio::test]
async fn sequential_requests_reuse_one_kept_alive_connection() {
    let fake = FakeControlPlane::start(|_: &Seen| Reply::json(404, r#"{"error":"x"}"#)).await;
    let (client, _) = client_for(fake.url(""), SHORT);
    for n in 0..4 {
        assert_eq!(
            client.context("+1", "+2", &format!("CA{n}")).await,
            Ok(None)
        );
    }
    let peers: std::collections::HashSet<SocketAddr> =
        fake.seen().into_iter().map(|s| s.peer).collect();
    assert_eq!(peers.len(), 1, "{peers:?}");
}

#[tokio::test]
async fn an_unreachable_control_plane_is_a_transport_error() {
    let (client, metrics) = client_for(closed_port_url().await, SHORT);
    let error = client.report(&report("CA1")).await.unwrap_err();
    assert!(matches!(error, ControlError::Transport(_)), "{error:?}");
    assert_eq!(metrics.control_request_failures(ControlEndpoint::Report), 1);
}
