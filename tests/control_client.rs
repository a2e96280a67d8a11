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
use voxrelay::control::directory::{ContextSource, DirectorySettings, Resolution, TenantDirectory};
use voxrelay::control::reports::{ReportSender, ReportSettings, SpoolPass};
use voxrelay::control::signing::{SignedHeaders, SigningKey, Verifier};
use voxrelay::control::tool_calls::run_tool;
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

    fn requests(&self) -> usize {
        self.state.seen.lock().unwrap().len()
    }

    fn rejected(&self) -> usize {
        self.state.rejected.load(Relaxed)
    }

    /// Waits (briefly) until the fake has accepted `n` requests.
    async fn wait_for_requests(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.requests() < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} requests",
                self.requests()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
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
        } else if seen.path.contains("to=%2B1405") {
            Reply::json(404, r#"{"error":"not_found"}"#)
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
    // A 404 for another reason (a wrong URL prefix) is a failure, not an unknown number.
    assert!(matches!(
        client.context("+1405", "+1", "CA1").await,
        Err(ControlError::Status { status: 404, .. })
    ));
    // The unknown number is an answer; the 500, the undecodable body and the other 404 are
    // failures.
    assert_eq!(
        metrics.control_request_failures(ControlEndpoint::Context),
        3
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
    let fake =
        FakeControlPlane::start(|_: &Seen| Reply::json(404, r#"{"error":"unknown_number"}"#)).await;
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

// ---------------------------------------------------------------------------------------------
// TenantDirectory

const TO: &str = "+15552223333";
const ALICE: &str = "+15550001111";
const BOB: &str = "+15550002222";

fn directory_for(
    url: Url,
    budget: Duration,
    ttl: Duration,
    stale_while_revalidate: Duration,
) -> (TenantDirectory, Arc<Metrics>) {
    let (client, metrics) = client_for(url, SHORT);
    let settings = DirectorySettings {
        budget,
        ttl,
        stale_while_revalidate,
        ..DirectorySettings::default()
    };
    (
        TenantDirectory::new(client, settings, metrics.clone()),
        metrics,
    )
}

/// Answers every lookup with agent `Ada <n>` (n counts lookups from 1) after `delay`.
fn numbered_contexts(delay: Duration) -> impl FnMut(&Seen) -> Reply + Send + 'static {
    let mut n = 0;
    move |seen: &Seen| {
        n += 1;
        let from = url::form_urlencoded::parse(seen.path.split_once('?').unwrap().1.as_bytes())
            .find(|(k, _)| k == "from")
            .map(|(_, v)| v.into_owned())
            .unwrap();
        Reply::json(
            200,
            context_json("t1", &format!("Ada {n}"), &format!("t1/{from}")),
        )
        .after(delay)
    }
}

fn agent(resolution: &Resolution) -> &str {
    &resolution.context.as_ref().expect("a context").agent_name
}

#[tokio::test]
async fn a_miss_is_fetched_then_served_from_the_cache() {
    let fake = FakeControlPlane::start(numbered_contexts(Duration::ZERO)).await;
    let (directory, metrics) = directory_for(fake.url(""), SHORT, SHORT, SHORT);
    let first = directory.resolve(TO, ALICE, "CA1").await;
    assert_eq!(first.source, ContextSource::Fresh);
    assert_eq!(agent(&first), "Ada 1");
    let second = directory.resolve(TO, ALICE, "CA2").await;
    assert_eq!(second.source, ContextSource::Cached);
    assert_eq!(agent(&second), "Ada 1");
    assert_eq!(fake.requests(), 1);
    assert_eq!(metrics.control_lookups(ContextSource::Fresh), 1);
    assert_eq!(metrics.control_lookups(ContextSource::Cached), 1);
    assert_eq!(metrics.control_lookup.count(), 2);
    assert!(
        metrics
            .render()
            .contains("voxrelay_control_lookups_total{source=\"cached\"} 1")
    );
}

#[tokio::test]
async fn a_cached_context_names_each_callers_own_memory() {
    let fake = FakeControlPlane::start(move |_: &Seen| {
        // A namespace the control plane chose for Alice, inside the tenant.
        Reply::json(200, context_json("t1", "Ada", "t1/alice-custom"))
    })
    .await;
    let (directory, _) = directory_for(fake.url(""), SHORT, SHORT, SHORT);
    let alice = directory.resolve(TO, ALICE, "CA1").await;
    assert_eq!(alice.context.unwrap().memory_namespace, "t1/alice-custom");
    let bob = directory.resolve(TO, BOB, "CA2").await;
    assert_eq!(bob.source, ContextSource::Cached);
    assert_eq!(bob.context.unwrap().memory_namespace, "t1/+15550002222");
    let client = directory.resolve(TO, "client:eve", "CA3").await;
    assert_eq!(client.context.unwrap().memory_namespace, "t1/client_eve");
    let anonymous = directory.resolve(TO, "", "CA4").await;
    assert_eq!(anonymous.context.unwrap().memory_namespace, "t1/anonymous");
    assert_eq!(fake.requests(), 1);
}

#[tokio::test]
async fn a_namespace_outside_its_tenant_is_corrected() {
    let fake = FakeControlPlane::start(|_: &Seen| {
        Reply::json(200, context_json("t1", "Ada", "t2/+15550001111"))
    })
    .await;
    let (directory, _) = directory_for(fake.url(""), SHORT, SHORT, SHORT);
    let resolved = directory.resolve(TO, ALICE, "CA1").await;
    assert_eq!(resolved.source, ContextSource::Fresh);
    assert_eq!(
        resolved.context.unwrap().memory_namespace,
        "t1/+15550001111"
    );
}

#[tokio::test]
async fn an_unknown_number_is_cached_and_a_failing_control_plane_falls_back() {
    let fake = FakeControlPlane::start(|seen: &Seen| {
        if seen.path.contains("to=%2B1404") {
            Reply::json(404, r#"{"error":"unknown_number"}"#)
        } else {
            Reply::json(500, r#"{"error":"database_down"}"#)
        }
    })
    .await;
    let (directory, metrics) = directory_for(fake.url(""), SHORT, SHORT, SHORT);
    for call_sid in ["CA1", "CA2"] {
        let unknown = directory.resolve("+1404", ALICE, call_sid).await;
        assert_eq!(unknown.source, ContextSource::UnknownNumber);
        assert_eq!(unknown.context, None);
    }
    assert_eq!(fake.requests(), 1, "the 404 is cached");
    for call_sid in ["CA3", "CA4"] {
        let down = directory.resolve("+1500", ALICE, call_sid).await;
        assert_eq!(down.source, ContextSource::Fallback);
        assert_eq!(down.context, None);
    }
    assert_eq!(fake.requests(), 3, "a failure is not cached");
    assert_eq!(metrics.control_lookups(ContextSource::UnknownNumber), 2);
    assert_eq!(metrics.control_lookups(ContextSource::Fallback), 2);
    assert_eq!(
        metrics.control_request_failures(ControlEndpoint::Context),
        2
    );
}

#[tokio::test]
async fn an_unreachable_control_plane_falls_back_at_once() {
    let (directory, _) = directory_for(
        closed_port_url().await,
        Duration::from_millis(300),
        SHORT,
        SHORT,
    );
    let resolved = directory.resolve(TO, ALICE, "CA1").await;
    assert_eq!(resolved.source, ContextSource::Fallback);
    assert!(
        resolved.took < Duration::from_millis(300),
        "{:?}",
        resolved.took
    );
}

#[tokio::test]
async fn a_slow_control_plane_costs_the_budget_and_still_fills_the_cache() {
    let fake = FakeControlPlane::start(numbered_contexts(Duration::from_millis(300))).await;
    let budget = Duration::from_millis(60);
    let (directory, _) = directory_for(fake.url(""), budget, SHORT, SHORT);
    let started = Instant::now();
    let first = directory.resolve(TO, ALICE, "CA1").await;
    let elapsed = started.elapsed();
    assert_eq!(first.source, ContextSource::Fallback);
    assert_eq!(first.context, None);
    assert!(elapsed >= budget, "{elapsed:?}");
    assert!(elapsed < budget + Duration::from_millis(150), "{elapsed:?}");

    // The fetch went on after the budget: once it lands, the next call is served from cache.
    tokio::time::sleep(Duration::from_millis(320)).await;
    let second = directory.resolve(TO, BOB, "CA2").await;
    assert_eq!(second.source, ContextSource::Cached);
    assert_eq!(agent(&second), "Ada 1");
    assert_eq!(second.context.unwrap().memory_namespace, "t1/+15550002222");
    assert_eq!(fake.requests(), 1);
}

#[tokio::test]
async fn concurrent_misses_for_one_number_share_one_request() {
    let fake = FakeControlPlane::start(numbered_contexts(Duration::from_millis(100))).await;
    let (directory, _) = directory_for(fake.url(""), SHORT, SHORT, SHORT);
    let lookups = (0..16).map(|n| {
        let directory = directory.clone();
        tokio::spawn(async move {
            let from = format!("+1555000{n:04}");
            let resolved = directory.resolve(TO, &from, &format!("CA{n}")).await;
            (from, resolved)
        })
    });
    let results = futures_util::future::join_all(lookups).await;
    for result in results {
        let (from, resolved) = result.unwrap();
        assert_eq!(resolved.source, ContextSource::Fresh);
        assert_eq!(agent(&resolved), "Ada 1");
        assert_eq!(
            resolved.context.unwrap().memory_namespace,
            format!("t1/{from}")
        );
    }
    assert_eq!(fake.requests(), 1);
}

#[tokio::test]
async fn a_stale_entry_is_served_at_once_and_refreshed_once_in_the_background() {
    let fake = FakeControlPlane::start(numbered_contexts(Duration::from_millis(250))).await;
    let ttl = Duration::from_millis(50);
    let (directory, metrics) = directory_for(fake.url(""), SHORT, ttl, SHORT);
    assert_eq!(
        directory.resolve(TO, ALICE, "CA1").await.source,
        ContextSource::Fresh
    );
    tokio::time::sleep(ttl + Duration::from_millis(10)).await;

    // Past the TTL: five calls are answered from the stale entry without waiting for the
    // (slow) control plane, and only one refresh goes out.
    for n in 2..7 {
        let stale = directory.resolve(TO, ALICE, &format!("CA{n}")).await;
        assert_eq!(stale.source, ContextSource::Stale);
        assert_eq!(agent(&stale), "Ada 1");
        assert!(stale.took < Duration::from_millis(150), "{:?}", stale.took);
    }
    fake.wait_for_requests(2).await;
    // Once the refresh lands, the new answer is served as fresh from cache.
    let deadline = Instant::now() + SHORT;
    let refreshed = loop {
        let resolved = directory.resolve(TO, ALICE, "CA7").await;
        if resolved.source == ContextSource::Cached {
            break resolved;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(agent(&refreshed), "Ada 2");
    assert_eq!(fake.requests(), 2);
    assert!(metrics.control_lookups(ContextSource::Stale) >= 5);
}

#[tokio::test]
async fn past_the_stale_window_an_entry_is_fetched_again() {
    let fake = FakeControlPlane::start(numbered_contexts(Duration::ZERO)).await;
    let ttl = Duration::from_millis(30);
    let (directory, _) = directory_for(fake.url(""), SHORT, ttl, Duration::from_millis(30));
    assert_eq!(agent(&directory.resolve(TO, ALICE, "CA1").await), "Ada 1");
    tokio::time::sleep(Duration::from_millis(70)).await;
    let again = directory.resolve(TO, ALICE, "CA2").await;
    assert_eq!(again.source, ContextSource::Fresh);
    assert_eq!(agent(&again), "Ada 2");
}

#[tokio::test]
async fn a_stale_entry_outlives_a_control_plane_outage() {
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let switch = flag.clone();
    let fake = FakeControlPlane::start(move |_: &Seen| {
        if switch.load(Relaxed) {
            Reply::json(200, context_json("t1", "Ada", "t1/x"))
        } else {
            Reply::json(503, r#"{"error":"down"}"#)
        }
    })
    .await;
    let ttl = Duration::from_millis(30);
    let (directory, _) = directory_for(fake.url(""), SHORT, ttl, SHORT);
    assert_eq!(
        directory.resolve(TO, ALICE, "CA1").await.source,
        ContextSource::Fresh
    );
    flag.store(false, Relaxed);
    tokio::time::sleep(Duration::from_millis(40)).await;
    // Each failed refresh frees the number's slot, so later calls try again (never wedged),
    // and every call meanwhile gets the stale context.
    let deadline = Instant::now() + SHORT;
    let mut n = 2;
    while fake.requests() < 4 {
        assert!(Instant::now() < deadline, "{} requests", fake.requests());
        let resolved = directory.resolve(TO, ALICE, &format!("CA{n}")).await;
        assert_eq!(resolved.source, ContextSource::Stale);
        assert_eq!(agent(&resolved), "Ada");
        n += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// ReportSender

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(label: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "voxrelay-{label}-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    /// Names of the files directly in `sub` ("" for the directory itself), sorted.
    fn files(&self, sub: &str) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.0.join(sub)) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .map(|entry| entry.unwrap())
            .filter(|entry| entry.file_type().unwrap().is_file())
            .map(|entry| entry.file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn report_settings(spool: &std::path::Path, retry_window: Duration) -> ReportSettings {
    ReportSettings {
        retry_window,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
        resend_interval: Duration::from_millis(50),
        ..ReportSettings::new(spool)
    }
}

fn sender_for(url: Url, settings: ReportSettings) -> (ReportSender, Arc<Metrics>) {
    let (client, metrics) = client_for(url, Duration::from_millis(500));
    (
        ReportSender::new(client, settings, metrics.clone()),
        metrics,
    )
}

/// Answers 503 while `down` is set, 204 otherwise.
fn switchable(down: Arc<std::sync::atomic::AtomicBool>) -> impl FnMut(&Seen) -> Reply + Send {
    move |_: &Seen| {
        if down.load(Relaxed) {
            Reply::json(503, r#"{"error":"unavailable"}"#)
        } else {
            Reply::json(204, "")
        }
    }
}

#[tokio::test]
async fn a_report_is_retried_through_transient_failures() {
    let mut n = 0;
    let fake = FakeControlPlane::start(move |_: &Seen| {
        n += 1;
        if n <= 2 {
            Reply::json(503, r#"{"error":"unavailable"}"#)
        } else {
            Reply::json(204, "")
        }
    })
    .await;
    let spool = TempDir::new("retry");
    let (sender, metrics) = sender_for(fake.url(""), report_settings(&spool.0, SHORT));
    sender.submit(report("CA1"));
    sender.shutdown(SHORT).await;

    assert_eq!(fake.requests(), 3);
    assert_eq!(
        fake.rejected(),
        0,
        "every retry is signed afresh, none replayed"
    );
    let seen = fake.seen();
    assert!(seen.iter().all(|s| s.path == "/v1/calls/CA1/report"));
    assert_eq!(
        serde_json::from_slice::<CallReport>(&seen[2].body).unwrap(),
        report("CA1")
    );
    assert_eq!(metrics.control_reports_delivered.load(Relaxed), 1);
    assert_eq!(metrics.control_report_retries.load(Relaxed), 2);
    assert_eq!(metrics.control_reports_spooled.load(Relaxed), 0);
    assert!(spool.files("").is_empty());
}

#[tokio::test]
async fn a_report_outliving_its_retry_window_is_spooled_and_resent_on_the_next_start() {
    let spool = TempDir::new("spool");
    let down = closed_port_url().await;
    let (sender, metrics) = sender_for(down, report_settings(&spool.0, Duration::from_millis(100)));
    let started = Instant::now();
    sender.submit(report("CA1"));
    sender.submit(report("CA2"));
    sender.shutdown(SHORT).await;
    assert!(
        started.elapsed() < Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(metrics.control_reports_spooled.load(Relaxed), 2);
    assert!(metrics.control_report_retries.load(Relaxed) >= 2);
    let files = spool.files("");
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(
        files
            .iter()
            .all(|f| f.ends_with(".json") && !f.starts_with('.'))
    );
    let mut spooled: Vec<CallReport> = files
        .iter()
        .map(|f| serde_json::from_slice(&std::fs::read(spool.0.join(f)).unwrap()).unwrap())
        .collect();
    spooled.sort_by(|a, b| a.call_sid.cmp(&b.call_sid));
    assert_eq!(spooled, [report("CA1"), report("CA2")]);

    // The next start, with the control plane back: the spool is delivered and emptied.
    let fake = FakeControlPlane::start(|_: &Seen| Reply::json(204, "")).await;
    let (sender, metrics) = sender_for(fake.url(""), report_settings(&spool.0, SHORT));
    let pass = sender.resend_spool().await;
    assert_eq!(
        pass,
        SpoolPass {
            resent: 2,
            ..SpoolPass::default()
        }
    );
    assert!(spool.files("").is_empty());
    let mut paths: Vec<String> = fake.seen().into_iter().map(|s| s.path).collect();
    paths.sort();
    assert_eq!(paths, ["/v1/calls/CA1/report", "/v1/calls/CA2/report"]);
    assert_eq!(metrics.control_reports_resent.load(Relaxed), 2);
    assert_eq!(sender.resend_spool().await, SpoolPass::default());
}

#[tokio::test]
async fn a_resend_pass_stops_at_the_first_transient_failure() {
    let spool = TempDir::new("still-down");
    let (sender, _) = sender_for(
        closed_port_url().await,
        report_settings(&spool.0, Duration::ZERO),
    );
    for n in 0..3 {
        sender.submit(report(&format!("CA{n}")));
    }
    sender.shutdown(SHORT).await;
    assert_eq!(spool.files("").len(), 3);

    let fake = FakeControlPlane::start(|_: &Seen| Reply::json(503, "")).await;
    let (sender, _) = sender_for(fake.url(""), report_settings(&spool.0, SHORT));
    let pass = sender.resend_spool().await;
    assert_eq!(
        pass,
        SpoolPass {
            remaining: 3,
            ..SpoolPass::default()
        }
    );
    assert_eq!(fake.requests(), 1);
    assert_eq!(spool.files("").len(), 3);
}

#[tokio::test]
async fn the_resend_loop_empties_the_spool_once_the_control_plane_is_back() {
    let spool = TempDir::new("loop");
    let (sender, _) = sender_for(
        closed_port_url().await,
        report_settings(&spool.0, Duration::ZERO),
    );
    sender.submit(report("CA1"));
    sender.shutdown(SHORT).await;
    assert_eq!(spool.files("").len(), 1);

    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let fake = FakeControlPlane::start(switchable(down.clone())).await;
    let (sender, metrics) = sender_for(fake.url(""), report_settings(&spool.0, SHORT));
    sender.spawn_resend_loop();
    fake.wait_for_requests(2).await;
    assert_eq!(
        spool.files("").len(),
        1,
        "kept while the control plane answers 503"
    );
    down.store(false, Relaxed);
    let deadline = Instant::now() + SHORT;
    while !spool.files("").is_empty() {
        assert!(Instant::now() < deadline, "spool not emptied");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metrics.control_reports_resent.load(Relaxed), 1);
    sender.shutdown(SHORT).await;
}

#[tokio::test]
async fn permanently_refused_reports_are_kept_in_rejected() {
    let spool = TempDir::new("rejected");
    // Live delivery: a 400 is not retried.
    let fake =
        FakeControlPlane::start(|_: &Seen| Reply::json(400, r#"{"error":"invalid_report"}"#)).await;
    let (sender, metrics) = sender_for(fake.url(""), report_settings(&spool.0, SHORT));
    sender.submit(report("CA1"));
    sender.shutdown(SHORT).await;
    assert_eq!(fake.requests(), 1);
    assert_eq!(metrics.control_report_retries.load(Relaxed), 0);
    assert_eq!(spool.files(REJECTED_DIR_NAME).len(), 1);

    // From the spool: a refused report and a file that is not a report both move to
    // rejected/, and neither is retried by the next pass.
    std::fs::write(
        spool.0.join("0000000000001-CA2-00000000.json"),
        serde_json::to_vec(&report("CA2")).unwrap(),
    )
    .unwrap();
    std::fs::write(
        spool.0.join("0000000000002-junk-00000000.json"),
        b"not json",
    )
    .unwrap();
    std::fs::write(spool.0.join(".0000000000003-CA3-00000000.json.tmp"), b"{").unwrap();
    let (sender, metrics) = sender_for(fake.url(""), report_settings(&spool.0, SHORT));
    let pass = sender.resend_spool().await;
    assert_eq!(
        pass,
        SpoolPass {
            rejected: 2,
            ..SpoolPass::default()
        }
    );
    assert_eq!(fake.requests(), 2, "the junk file was never sent");
    assert_eq!(spool.files(""), [".0000000000003-CA3-00000000.json.tmp"]);
    assert_eq!(spool.files(REJECTED_DIR_NAME).len(), 3);
    assert_eq!(metrics.control_reports_rejected.load(Relaxed), 2);
    assert_eq!(sender.resend_spool().await, SpoolPass::default());
    assert_eq!(fake.requests(), 2);
}

const REJECTED_DIR_NAME: &str = voxrelay::control::reports::REJECTED_DIR;

#[tokio::test]
async fn shutdown_spools_deliveries_still_pending_after_the_grace() {
    let spool = TempDir::new("shutdown");
    let fake = FakeControlPlane::start(|_: &Seen| Reply::json(503, "")).await;
    let (sender, metrics) = sender_for(
        fake.url(""),
        report_settings(&spool.0, Duration::from_secs(60)),
    );
    for n in 0..3 {
        sender.submit(report(&format!("CA{n}")));
    }
    fake.wait_for_requests(3).await;
    let started = Instant::now();
    sender.shutdown(Duration::from_millis(100)).await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(100), "{took:?}");
    assert!(took < Duration::from_millis(600), "{took:?}");
    assert_eq!(spool.files("").len(), 3);
    assert_eq!(metrics.control_reports_spooled.load(Relaxed), 3);

    // After shutdown, a late report goes straight to the spool too.
    sender.submit(report("CA9"));
    let deadline = Instant::now() + SHORT;
    while spool.files("").len() < 4 {
        assert!(Instant::now() < deadline, "late report not spooled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `condition` every 10 ms for up to `limit`.
async fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    condition()
}

#[tokio::test]
async fn an_unwritable_spool_holds_the_report_in_memory_and_retries_it() {
    let scratch = TempDir::new("unwritable");
    let blocker = scratch.0.join("a-file");
    std::fs::write(&blocker, b"").unwrap();
    // A directory cannot be created below a regular file, even as root.
    let spool = blocker.join("spool");
    let down = closed_port_url().await;
    let addr: SocketAddr = format!("{}:{}", down.host_str().unwrap(), down.port().unwrap())
        .parse()
        .unwrap();
    let (sender, metrics) = sender_for(down, report_settings(&spool, Duration::ZERO));
    assert_eq!(
        metrics.control_report_spool_errors.load(Relaxed),
        1,
        "found at start"
    );
    sender.submit(report("CA1"));
    // Neither delivered nor written: held, and retried (each failed write counted, no panic).
    assert!(
        eventually(SHORT, || metrics.control_reports_held.load(Relaxed) == 1
            && metrics.control_report_spool_errors.load(Relaxed) >= 4)
        .await
    );
    assert_eq!(metrics.control_reports_lost.load(Relaxed), 0);

    // The control plane comes back: the held report is delivered on its next retry.
    let fake = FakeControlPlane::serve(TcpListener::bind(addr).await.unwrap(), |_: &Seen| {
        Reply::json(204, "")
    });
    assert!(
        eventually(SHORT, || metrics.control_reports_delivered.load(Relaxed)
            == 1)
        .await,
        "the held report was delivered"
    );
    assert_eq!(metrics.control_reports_held.load(Relaxed), 0);
    assert_eq!(fake.seen()[0].path, "/v1/calls/CA1/report");
    sender.shutdown(SHORT).await;
    drop(fake);

    // Down again, and this time the directory becomes writable: the held report is spooled.
    let (sender, metrics) = sender_for(
        closed_port_url().await,
        report_settings(&spool, Duration::ZERO),
    );
    sender.submit(report("CA2"));
    assert!(eventually(SHORT, || metrics.control_reports_held.load(Relaxed) == 1).await);
    std::fs::remove_file(&blocker).unwrap();
    assert!(
        eventually(SHORT, || metrics.control_reports_spooled.load(Relaxed) == 1).await,
        "the held report reached the spool once it could"
    );
    assert_eq!(metrics.control_reports_held.load(Relaxed), 0);
    assert_eq!(metrics.control_report_spool_files.load(Relaxed), 1);
    sender.shutdown(SHORT).await;
    assert_eq!(metrics.control_reports_lost.load(Relaxed), 0);
    let spooled = std::fs::read_dir(&spool).unwrap().count();
    assert_eq!(spooled, 1);
}

#[tokio::test]
async fn a_report_the_spool_still_refuses_at_shutdown_is_counted_as_lost() {
    let scratch = TempDir::new("lost");
    let blocker = scratch.0.join("a-file");
    std::fs::write(&blocker, b"").unwrap();
    let (sender, metrics) = sender_for(
        closed_port_url().await,
        report_settings(&blocker.join("spool"), Duration::ZERO),
    );
    sender.submit(report("CA1"));
    assert!(eventually(SHORT, || metrics.control_reports_held.load(Relaxed) == 1).await);
    let errors_before = metrics.control_report_spool_errors.load(Relaxed);
    sender.shutdown(Duration::from_millis(50)).await;
    // One last try at shutdown, then the loss is counted (and logged), never silent.
    assert!(metrics.control_report_spool_errors.load(Relaxed) > errors_before);
    assert_eq!(metrics.control_reports_lost.load(Relaxed), 1);
    assert_eq!(metrics.control_reports_held.load(Relaxed), 0);
    assert_eq!(metrics.control_reports_spooled.load(Relaxed), 0);
}

#[cfg(unix)]
#[tokio::test]
async fn spooled_reports_are_private_files_in_a_private_directory() {
    use std::os::unix::fs::PermissionsExt as _;
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    // A new spool directory (and its parents) is created 0700.
    let scratch = TempDir::new("private");
    let fresh = scratch.0.join("deep").join("spool");
    let (sender, _) = sender_for(
        closed_port_url().await,
        report_settings(&fresh, Duration::ZERO),
    );
    assert_eq!(mode(&fresh), 0o700);
    sender.submit(report("CA1"));
    sender.shutdown(SHORT).await;
    let files: Vec<_> = std::fs::read_dir(&fresh)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1);
    assert_eq!(mode(&files[0]), 0o600);

    // An existing directory others can read is tightened, and so is an old report in it;
    // `rejected/` is private too.
    let existing = scratch.0.join("existing");
    std::fs::create_dir(&existing).unwrap();
    std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o755)).unwrap();
    let old = existing.join("0000000000001-CA0-00000000.json");
    std::fs::write(&old, serde_json::to_vec(&report("CA0")).unwrap()).unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
    let fake =
        FakeControlPlane::start(|_: &Seen| Reply::json(400, r#"{"error":"invalid_report"}"#)).await;
    let (sender, metrics) = sender_for(fake.url(""), report_settings(&existing, SHORT));
    assert_eq!(mode(&existing), 0o700);
    assert_eq!(mode(&old), 0o600);
    assert_eq!(metrics.control_report_spool_files.load(Relaxed), 1);
    sender.submit(report("CA2"));
    sender.shutdown(SHORT).await;
    let rejected = existing.join(REJECTED_DIR_NAME);
    assert_eq!(mode(&rejected), 0o700);
    for entry in std::fs::read_dir(&rejected).unwrap() {
        assert_eq!(mode(&entry.unwrap().path()), 0o600);
    }
}

#[tokio::test]
async fn the_spool_is_measured_and_capped_and_never_emptied_to_make_room() {
    let spool = TempDir::new("capped");
    let one_report = serde_json::to_vec(&report("CA0")).unwrap().len() as u64;
    let down = closed_port_url().await;
    let addr: SocketAddr = format!("{}:{}", down.host_str().unwrap(), down.port().unwrap())
        .parse()
        .unwrap();
    let settings = ReportSettings {
        // Room for two reports; warn from the first.
        spool_max_bytes: 2 * one_report + one_report / 2,
        spool_warn_bytes: one_report / 2,
        ..report_settings(&spool.0, Duration::ZERO)
    };
    let (sender, metrics) = sender_for(down, settings);
    for n in 0..3 {
        sender.submit(report(&format!("CA{n}")));
    }
    assert!(
        eventually(SHORT, || metrics.control_reports_spooled.load(Relaxed) == 2
            && metrics.control_reports_held.load(Relaxed) == 1)
        .await
    );
    assert!(metrics.control_report_spool_full.load(Relaxed) >= 1);
    assert_eq!(metrics.control_report_spool_files.load(Relaxed), 2);
    assert_eq!(
        metrics.control_report_spool_bytes.load(Relaxed),
        2 * one_report
    );
    assert_eq!(spool.files("").len(), 2, "nothing was deleted to make room");
    let rendered = metrics.render();
    assert!(
        rendered.contains("voxrelay_control_report_spool_files{dir=\"pending\"} 2\n"),
        "{rendered}"
    );
    assert!(
        rendered.contains("voxrelay_control_reports_held 1\n"),
        "{rendered}"
    );

    // The control plane is back: the held report is delivered, the spool resent and emptied,
    // and the gauges follow.
    let fake = FakeControlPlane::serve(TcpListener::bind(addr).await.unwrap(), |_: &Seen| {
        Reply::json(204, "")
    });
    assert!(
        eventually(SHORT, || metrics.control_reports_delivered.load(Relaxed)
            == 1)
        .await
    );
    assert_eq!(sender.resend_spool().await.resent, 2);
    assert_eq!(metrics.control_report_spool_files.load(Relaxed), 0);
    assert_eq!(metrics.control_report_spool_bytes.load(Relaxed), 0);
    assert_eq!(fake.requests(), 3);
    sender.shutdown(SHORT).await;
    assert_eq!(metrics.control_reports_lost.load(Relaxed), 0);
}

// ---------------------------------------------------------------------------------------------
// Tools

fn tool_fake_script(seen: &Seen) -> Reply {
    match seen.path.as_str() {
        "/v1/tools/lookup_hours" => Reply::json(200, r#"{"output":"open 9-5"}"#),
        "/v1/tools/take_message" => Reply::json(200, r#"{"output":{"saved":true,"id":7}}"#),
        "/v1/tools/slow" => {
            Reply::json(200, r#"{"output":"too late"}"#).after(Duration::from_millis(300))
        }
        "/v1/tools/broken" => Reply::json(500, r#"{"error":"tool_crashed"}"#),
        _ => Reply::json(404, r#"{"error":"unknown_tool"}"#),
    }
}

fn tool_error(output: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(output).expect(output);
    assert_eq!(value["error"], "tool_failed", "{output}");
    value["detail"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_tool_answers_with_the_control_planes_output() {
    let fake = FakeControlPlane::start(tool_fake_script).await;
    let (client, metrics) = client_for(fake.url(""), SHORT);
    let hours = run_tool(
        &client,
        "lookup_hours",
        "CA1",
        "t1",
        r#"{"day":"mon"}"#,
        SHORT,
    )
    .await;
    assert_eq!(hours, "open 9-5");
    let message = run_tool(&client, "take_message", "CA1", "t1", "", SHORT).await;
    assert_eq!(message, r#"{"id":7,"saved":true}"#);
    let seen = fake.seen();
    let first: ToolRequest = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(
        first,
        ToolRequest {
            call_sid: "CA1".into(),
            tenant_id: "t1".into(),
            arguments: serde_json::json!({"day": "mon"}),
        }
    );
    let second: ToolRequest = serde_json::from_slice(&seen[1].body).unwrap();
    assert_eq!(second.arguments, serde_json::json!({}));
    assert_eq!(metrics.control_tool_calls.load(Relaxed), 2);
    assert_eq!(metrics.control_tool_failures.load(Relaxed), 0);
}

#[tokio::test]
async fn a_failing_tool_becomes_an_error_output_and_the_call_goes_on() {
    let fake = FakeControlPlane::start(tool_fake_script).await;
    let (client, metrics) = client_for(fake.url(""), SHORT);

    let started = Instant::now();
    let slow = run_tool(
        &client,
        "slow",
        "CA1",
        "t1",
        "{}",
        Duration::from_millis(80),
    )
    .await;
    assert_eq!(tool_error(&slow), "the tool did not answer within 80 ms");
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );

    let broken = run_tool(&client, "broken", "CA1", "t1", "{}", SHORT).await;
    assert_eq!(
        tool_error(&broken),
        "the tool service refused the call (HTTP 500, tool_crashed)"
    );
    let unknown = run_tool(&client, "nope", "CA1", "t1", "{}", SHORT).await;
    assert_eq!(
        tool_error(&unknown),
        "the tool service refused the call (HTTP 404, unknown_tool)"
    );
    let requests_before = fake.requests();
    let bad_json = run_tool(&client, "lookup_hours", "CA1", "t1", "{day:", SHORT).await;
    assert_eq!(tool_error(&bad_json), "the arguments are not valid JSON");
    assert_eq!(
        fake.requests(),
        requests_before,
        "bad arguments are never sent"
    );

    let (down, _) = client_for(closed_port_url().await, SHORT);
    let unreachable = run_tool(&down, "lookup_hours", "CA1", "t1", "{}", SHORT).await;
    assert_eq!(
        tool_error(&unreachable),
        "the tool service could not be reached"
    );

    for output in [&slow, &broken, &unknown, &bad_json, &unreachable] {
        assert!(
            !output.contains(SECRET) && !output.contains("127.0.0.1"),
            "{output}"
        );
    }
    assert_eq!(metrics.control_tool_calls.load(Relaxed), 4);
    assert_eq!(metrics.control_tool_failures.load(Relaxed), 4);
}
