//! The reference control plane over real sockets on 127.0.0.1: the signed `/v1` API (context,
//! reports, call history, tools), every 401 reason, key rotation, stop and restart on the same
//! address and database, and the `voxrelay control-plane` command itself.

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use voxrelay::control::api::{
    self, CallHistory, CallLatency, CallReport, ModelSessionReport, ReportBinding, ReportFallback,
    ReportUsage, Speaker, TenantContext, TranscriptEntry,
};
use voxrelay::control::signing::{SignedHeaders, SigningKey, Verifier, sign};
use voxrelay::{Provider, Secret};
use voxrelay_control_plane::seed::{SeedFiles, SeedSource};
use voxrelay_control_plane::server::{ControlPlane, ControlPlaneConfig, RunningControlPlane};
use voxrelay_control_plane::store::DbLocation;

/// The hold prompt `fixtures/tenants.toml` gives bistro_luna.
const HOLD_PROMPT_FIXTURE: &[u8] = include_bytes!("../fixtures/hold-prompt-8k-mulaw.raw");

const KEYS: &str =
    "cp-2025-06:old secret,cp-2025-09:new secret: with a colon,ops-2025-09:ops secret:operator";

/// The operator's key: call history, and nothing a bridge does.
fn ops_key() -> SigningKey {
    SigningKey::new("ops-2025-09", Secret::new("ops secret"))
}

fn old_key() -> SigningKey {
    SigningKey::new("cp-2025-06", Secret::new("old secret"))
}

fn new_key() -> SigningKey {
    SigningKey::new("cp-2025-09", Secret::new("new secret: with a colon"))
}

/// Every test is bounded: a hang fails it instead of the whole run.
async fn bounded<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), test)
        .await
        .expect("the test took longer than 60 s")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn start(db: DbLocation, listen: SocketAddr) -> RunningControlPlane {
    ControlPlane::start(ControlPlaneConfig {
        listen,
        db,
        seed: Some(SeedSource::shipped()),
        verifier: Verifier::from_key_list(KEYS).expect("keys"),
    })
    .await
    .expect("control plane")
}

async fn start_in_memory() -> RunningControlPlane {
    start(DbLocation::InMemory, SocketAddr::from(([127, 0, 0, 1], 0))).await
}

struct Reply {
    status: u16,
    body: Value,
}

/// Sends one request on a fresh connection, with exactly the given headers.
async fn send_raw(
    addr: SocketAddr,
    method: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Reply {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    send_on(&mut sender, addr, method, path_and_query, headers, body).await
}

async fn send_on(
    sender: &mut SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    method: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Reply {
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::from(body))).expect("request"))
        .await
        .expect("response");
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("every answer is JSON")
    };
    Reply { status, body }
}

fn signed_headers(
    key: &SigningKey,
    method: &str,
    path_and_query: &str,
    body: &[u8],
) -> SignedHeaders {
    sign(
        key,
        unix_now(),
        rand::random(),
        method,
        path_and_query,
        body,
    )
}

/// Signs with the new (bridge) key and sends.
async fn send(addr: SocketAddr, method: &str, path_and_query: &str, body: Option<&Value>) -> Reply {
    send_as(&new_key(), addr, method, path_and_query, body).await
}

/// Signs with `key` and sends.
async fn send_as(
    key: &SigningKey,
    addr: SocketAddr,
    method: &str,
    path_and_query: &str,
    body: Option<&Value>,
) -> Reply {
    let body = body.map_or_else(Vec::new, |b| serde_json::to_vec(b).expect("json"));
    let signed = signed_headers(key, method, path_and_query, &body);
    send_raw(addr, method, path_and_query, &signed.pairs(), body).await
}

fn error_code(reply: &Reply) -> &str {
    assert_eq!(
        reply.body.as_object().map(|o| o.len()),
        Some(1),
        "an error body carries the code and nothing else: {}",
        reply.body
    );
    reply.body["error"].as_str().unwrap_or_default()
}

async fn context(addr: SocketAddr, to: &str, from: &str, call_sid: &str) -> Reply {
    send(
        addr,
        "GET",
        &api::context_path_and_query(to, from, call_sid),
        None,
    )
    .await
}

fn report(call_sid: &str, tenant: &str, to: &str, started_at_ms: u64) -> CallReport {
    CallReport {
        call_sid: call_sid.into(),
        stream_sid: format!("MZ{call_sid}"),
        tenant_id: Some(tenant.into()),
        agent_name: "Ava".into(),
        from: "+15551230000".into(),
        to: to.into(),
        started_at_ms,
        ended_at_ms: started_at_ms + 42_000,
        end_reason: "twilio_stop".into(),
        context_source: "fresh".into(),
        binding: ReportBinding::Bound,
        memory_namespace: None,
        audio_seconds_in: 42.0,
        audio_seconds_out: 17.25,
        barge_ins: 1,
        dtmf_digits: 0,
        tool_calls: 1,
        latency: CallLatency::default(),
        transcript: vec![
            TranscriptEntry {
                speaker: Speaker::Assistant,
                offset_ms: 120,
                text: "Thank you for calling.".into(),
            },
            TranscriptEntry {
                speaker: Speaker::Caller,
                offset_ms: 2_400,
                text: "When are you open on Friday?".into(),
            },
            TranscriptEntry {
                speaker: Speaker::Assistant,
                offset_ms: 3_100,
                text: "From eight to three.".into(),
            },
        ],
        transcript_dropped_lines: 0,
        transcript_cut_lines: 0,
        model_sessions: Vec::new(),
        reconnect_gap_ms: 0,
        hold_prompt_ms: 0,
        fallback: None,
        provider: Provider::OpenAi,
        model: None,
        usage: None,
        turns: Vec::new(),
        turns_dropped: 0,
        recording: None,
        audio: None,
    }
}

async fn post_report(addr: SocketAddr, report: &CallReport) -> Reply {
    send(
        addr,
        "POST",
        &api::report_path(&report.call_sid),
        Some(&serde_json::to_value(report).expect("json")),
    )
    .await
}

async fn history(addr: SocketAddr, tenant: &str) -> CallHistory {
    let reply = send_as(
        &ops_key(),
        addr,
        "GET",
        &format!("/v1/calls?tenant_id={tenant}"),
        None,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    serde_json::from_value(reply.body).expect("history")
}

async fn run_tool(
    addr: SocketAddr,
    name: &str,
    call_sid: &str,
    tenant: &str,
    arguments: Value,
) -> Reply {
    send(
        addr,
        "POST",
        &api::tool_path(name),
        Some(&json!({"call_sid": call_sid, "tenant_id": tenant, "arguments": arguments})),
    )
    .await
}

/// Writes `request` on a fresh connection and reads the answer until the server closes it or
/// its JSON body is complete.
async fn raw_exchange(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
        }
        if answer.ends_with(b"}") {
            break;
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// The four signature headers as request-head lines.
fn header_lines(signed: &SignedHeaders) -> String {
    signed
        .pairs()
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect()
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!(
            "voxrelay-cp-{label}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).expect("temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn context_for_both_tenants() {
    bounded(async {
        let cp = start_in_memory().await;
        let addr = cp.local_addr();

        let reply = context(addr, "+15550100001", "+15551230000", "CA-acme-1").await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let acme: TenantContext = serde_json::from_value(reply.body).expect("context");
        assert_eq!(acme.tenant_id, "acme_dental");
        assert_eq!(acme.agent_name, "Ava");
        assert_eq!(acme.voice, "marin");
        assert_eq!(acme.audio_mode, voxrelay::AudioMode::Pcmu);
        assert_eq!(acme.language, "en-US");
        assert_eq!(acme.max_call_seconds, 600);
        assert!(
            acme.greeting
                .as_deref()
                .is_some_and(|g| g.contains("Acme Dental"))
        );
        assert!(acme.instructions.contains("Acme Dental"));
        assert_eq!(acme.memory_namespace, "acme_dental/+15551230000");
        let names = |context: &TenantContext| -> Vec<String> {
            context
                .tools
                .iter()
                .map(|tool| {
                    assert_eq!(tool["type"], "function");
                    assert_eq!(tool["parameters"]["type"], "object");
                    tool["name"].as_str().unwrap_or_default().to_owned()
                })
                .collect()
        };
        assert_eq!(names(&acme), ["lookup_business_hours", "take_message"]);
        assert_eq!(acme.fallback_number.as_deref(), Some("+15550100999"));
        assert_eq!(acme.hold_prompt, None);

        // bistro_luna has two numbers; both reach it.
        for to in ["+15550100002", "+15550100003"] {
            let reply = context(addr, to, "client:alice", "").await;
            assert_eq!(reply.status, 200, "{}", reply.body);
            let luna: TenantContext = serde_json::from_value(reply.body).expect("context");
            assert_eq!(luna.tenant_id, "bistro_luna");
            assert_eq!(luna.agent_name, "Luca");
            assert_eq!(luna.voice, "cedar");
            assert_eq!(luna.audio_mode, voxrelay::AudioMode::Pcm16);
            assert_eq!(luna.language, "es-US");
            assert_eq!(luna.max_call_seconds, 300);
            assert_eq!(luna.memory_namespace, "bistro_luna/client_alice");
            assert_eq!(names(&luna), ["lookup_business_hours"]);
            assert_eq!(luna.fallback_number, None);
            let prompt = luna.hold_prompt.as_deref().map(|text| BASE64.decode(text));
            assert_eq!(
                prompt.transpose().expect("base64").as_deref(),
                Some(HOLD_PROMPT_FIXTURE)
            );
        }
        // No caller number: still inside the tenant.
        let reply = context(addr, "+15550100002", "", "").await;
        assert_eq!(reply.body["memory_namespace"], "bistro_luna/anonymous");

        let unknown = context(addr, "+15559999999", "+15551230000", "CA-x").await;
        assert_eq!(unknown.status, 404);
        assert_eq!(error_code(&unknown), "unknown_number");

        let missing_to = send(addr, "GET", "/v1/context?from=%2B15551230000", None).await;
        assert_eq!(missing_to.status, 400);
        assert_eq!(error_code(&missing_to), "missing_to");

        let repeated = send(
            addr,
            "GET",
            "/v1/context?to=%2B15550100001&to=%2B15550100002",
            None,
        )
        .await;
        assert_eq!(repeated.status, 400);
        assert_eq!(error_code(&repeated), "bad_query");

        // A call SID bound to one tenant cannot be looked up on another's number.
        let conflict = context(addr, "+15550100002", "+15551230000", "CA-acme-1").await;
        assert_eq!(conflict.status, 409);
        assert_eq!(error_code(&conflict), "call_sid_conflict");

        let nowhere = send(addr, "GET", "/v1/nowhere", None).await;
        assert_eq!(nowhere.status, 404);
        assert_eq!(error_code(&nowhere), "not_found");
        let wrong_method = send(addr, "GET", "/v1/tools/take_message", None).await;
        assert_eq!(wrong_method.status, 405);
        assert_eq!(error_code(&wrong_method), "method_not_allowed");
        cp.stop().await;
    })
    .await;
}

#[tokio::test]
async fn the_context_names_a_tenants_provider_and_model_only_when_it_has_them() {
    bounded(async {
        let cp = start_in_memory().await;
        let addr = cp.local_addr();

        // The shipped seed's third tenant is on Gemini, with its model and one of its voices.
        let reply = context(addr, "+15550100004", "+15551230000", "CA-harbor-1").await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.body["provider"], "gemini");
        assert_eq!(reply.body["model"], "gemini-3.8-live");
        let harbor: TenantContext = serde_json::from_value(reply.body).expect("context");
        assert_eq!(harbor.tenant_id, "harbor_florist");
        assert_eq!(harbor.provider, Some(voxrelay_core::Provider::Gemini));
        assert_eq!(harbor.voice, "Kore");
        assert_eq!(harbor.fallback_number.as_deref(), Some("+15550100998"));

        // The others name neither, and the keys are left out rather than sent as null: the
        // context of a tenant on the bridge's defaults is what it was before the fields.
        let reply = context(addr, "+15550100001", "+15551230000", "CA-acme-2").await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let keys = reply.body.as_object().expect("object");
        assert!(
            !keys.contains_key("provider") && !keys.contains_key("model"),
            "{}",
            reply.body
        );
        cp.stop().await;
    })
    .await;
}

#[tokio::test]
async fn every_signature_failure_is_a_bare_401_with_its_reason() {
    bounded(async {
        let cp = start_in_memory().await;
        let addr = cp.local_addr();
        let path = api::context_path_and_query("+15550100001", "+15551230000", "CA-sig");
        let pairs = |signed: &SignedHeaders| -> Vec<(String, String)> {
            signed
                .pairs()
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect()
        };
        let send_with = |method: &'static str,
                         path: String,
                         headers: Vec<(String, String)>,
                         body: Vec<u8>| async move {
            let borrowed: Vec<(&str, &str)> = headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            send_raw(addr, method, &path, &borrowed, body).await
        };
        let expect_401 = |reply: Reply, reason: &str| {
            assert_eq!(reply.status, 401, "{reason}: {}", reply.body);
            assert_eq!(error_code(&reply), reason);
        };

        // Unsigned, to a real route and to one that does not exist.
        expect_401(
            send_with("GET", path.clone(), vec![], vec![]).await,
            "malformed",
        );
        expect_401(
            send_with("GET", "/v1/nowhere".into(), vec![], vec![]).await,
            "malformed",
        );

        // A signature that is not the MAC.
        let mut forged = signed_headers(&new_key(), "GET", &path, b"");
        forged.signature = format!("v1={}", "0".repeat(64));
        expect_401(
            send_with("GET", path.clone(), pairs(&forged), vec![]).await,
            "bad_signature",
        );

        // A body changed after signing.
        let tool_path = api::tool_path("lookup_business_hours");
        let body = br#"{"call_sid":"CA-sig","tenant_id":"acme_dental","arguments":{}}"#.to_vec();
        let signed = signed_headers(&new_key(), "POST", &tool_path, &body);
        let tampered =
            br#"{"call_sid":"CA-sig","tenant_id":"bistro_luna","arguments":{}}"#.to_vec();
        expect_401(
            send_with("POST", tool_path.clone(), pairs(&signed), tampered).await,
            "bad_signature",
        );

        // A path changed after signing (the query is part of it).
        let other = api::context_path_and_query("+15550100002", "+15551230000", "CA-sig");
        let signed = signed_headers(&new_key(), "GET", &path, b"");
        expect_401(
            send_with("GET", other, pairs(&signed), vec![]).await,
            "bad_signature",
        );

        // Stale: ten minutes old.
        let stale = sign(
            &new_key(),
            unix_now() - 600,
            rand::random(),
            "GET",
            &path,
            b"",
        );
        expect_401(
            send_with("GET", path.clone(), pairs(&stale), vec![]).await,
            "stale",
        );

        // An unknown key id, even with a good MAC under its own secret.
        let stranger = SigningKey::new("cp-2024-01", Secret::new("old secret"));
        let signed = signed_headers(&stranger, "GET", &path, b"");
        expect_401(
            send_with("GET", path.clone(), pairs(&signed), vec![]).await,
            "unknown_key",
        );

        // Replayed: the same signed request twice.
        let signed = signed_headers(&new_key(), "GET", &path, b"");
        let first = send_with("GET", path.clone(), pairs(&signed), vec![]).await;
        assert_eq!(first.status, 200, "{}", first.body);
        expect_401(
            send_with("GET", path.clone(), pairs(&signed), vec![]).await,
            "replayed",
        );

        // A body declared too large is refused before it is read (raw TCP: no body follows,
        // so the answer cannot be lost to a reset over unread bytes).
        let signed = signed_headers(&new_key(), "POST", &tool_path, b"");
        let answer = raw_exchange(
            addr,
            &format!(
                "POST {tool_path} HTTP/1.1\r\nHost: {addr}\r\n{}Content-Length: {}\r\n\r\n",
                header_lines(&signed),
                voxrelay_control_plane::server::MAX_BODY_BYTES + 1
            ),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(
            answer.ends_with(r#"{"error":"body_too_large"}"#),
            "{answer}"
        );
        cp.stop().await;
    })
    .await;
}

#[tokio::test]
async fn both_keys_of_a_rotation_are_accepted() {
    bounded(async {
        let cp = start_in_memory().await;
        let addr = cp.local_addr();
        for key in [old_key(), new_key()] {
            let path = api::context_path_and_query("+15550100001", "+15551230000", "");
            let signed = signed_headers(&key, "GET", &path, b"");
            let reply = send_raw(addr, "GET", &path, &signed.pairs(), Vec::new()).await;
            assert_eq!(reply.status, 200, "key {}: {}", key.id, reply.body);
        }
        // An old id with the new secret is not a pass.
        let crossed = SigningKey::new("cp-2025-06", Secret::new("new secret: with a colon"));
        let path = api::context_path_and_query("+15550100001", "", "");
        let signed = signed_headers(&crossed, "GET", &path, b"");
        let reply = send_raw(addr, "GET", &path, &signed.pairs(), Vec::new()).await;
        assert_eq!(reply.status, 401);
        cp.stop().await;
    })
    .await;
}

/// Writes a request head (and `partial_body`, but never the rest of the body the head
/// declares) and reads the answer for up to `limit`, keeping the connection open.
async fn send_head(addr: SocketAddr, head: &str, partial_body: &[u8], limit: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("write head");
    stream.write_all(partial_body).await.expect("write body");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    while !answer.ends_with(b"}") {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_request_failing_the_header_checks_is_refused_before_its_body_is_read() {
    bounded(async {
        let cp = start_in_memory().await;
        let addr = cp.local_addr();
        let path = api::report_path("CA-held");
        let body = [b'x'; 64];
        let genuine = signed_headers(&new_key(), "POST", &path, &body);
        let stranger = signed_headers(
            &SigningKey::new("cp-2024-01", Secret::new("old secret")),
            "POST",
            &path,
            &body,
        );
        let stale = sign(&new_key(), unix_now() - 600, rand::random(), "POST", &path, &body);
        let mut malformed = genuine.clone();
        malformed.signature = format!("v1={}", "A".repeat(64));
        let cases = [
            (header_lines(&stranger), "unknown_key"),
            (header_lines(&stale), "stale"),
            (header_lines(&malformed), "malformed"),
            (String::new(), "malformed"),
        ];
        for (signature_lines, reason) in cases {
            // The head promises 64 bytes of body and none follow: a server that reads the body
            // before checking the headers waits here until the test gives up.
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{signature_lines}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let started = Instant::now();
            let answer = send_head(addr, &head, b"", Duration::from_secs(3)).await;
            assert!(answer.starts_with("HTTP/1.1 401"), "{reason}: {answer:?}");
            assert!(
                answer.ends_with(&format!(r#"{{"error":"{reason}"}}"#)),
                "{answer}"
            );
            assert!(started.elapsed() < Duration::from_secs(2), "{reason}");
        }
        cp.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_body_held_back_after_good_headers_times_out() {
    bounded(async {
        let cp = start_in_memory().await;
        let addr = cp.local_addr();
        let path = api::report_path("CA-slow");
        let body = [b'x'; 64];
        let signed = signed_headers(&new_key(), "POST", &path, &body);
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            header_lines(&signed),
            body.len()
        );
        let started = Instant::now();
        let limit = voxrelay_control_plane::server::BODY_READ_TIMEOUT + Duration::from_secs(3);
        let answer = send_head(addr, &head, &body[..10], limit).await;
        let took = started.elapsed();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
        assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
        assert!(answer.ends_with(r#"{"error":"body_timeout"}"#), "{answer}");
        assert!(
            took >= voxrelay_control_plane::server::BODY_READ_TIMEOUT - Duration::from_millis(100),
            "{took:?}"
        );
        cp.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_bridge_key_cannot_read_call_history_and_an_operator_key_does_nothing_else() {
    bounded(async {
        let cp = start_in_memory().await;
        let addr = cp.local_addr();
        assert_eq!(
            context(addr, "+15550100001", "+15551230000", "CA-s1")
                .await
                .status,
            200
        );
        let acme = report("CA-s1", "acme_dental", "+15550100001", unix_now() * 1000);
        assert_eq!(post_report(addr, &acme).await.status, 200);

        let calls = "/v1/calls?tenant_id=acme_dental";
        for bridge in [new_key(), old_key()] {
            let reply = send_as(&bridge, addr, "GET", calls, None).await;
            assert_eq!(
                (reply.status, error_code(&reply)),
                (403, "insufficient_scope"),
                "{}",
                bridge.id
            );
        }
        let reply = send_as(&ops_key(), addr, "GET", calls, None).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let history: CallHistory = serde_json::from_value(reply.body).expect("history");
        assert_eq!(history.calls, vec![acme.clone()]);

        // The operator's key reads; it cannot look up, report or run tools.
        let lookup = api::context_path_and_query("+15550100001", "", "");
        let reply = send_as(&ops_key(), addr, "GET", &lookup, None).await;
        assert_eq!(
            (reply.status, error_code(&reply)),
            (403, "insufficient_scope")
        );
        let body = serde_json::to_value(&acme).expect("json");
        let reply = send_as(
            &ops_key(),
            addr,
            "POST",
            &api::report_path("CA-s1"),
            Some(&body),
        )
        .await;
        assert_eq!(
            (reply.status, error_code(&reply)),
            (403, "insufficient_scope")
        );
        let tool = json!({"call_sid": "CA-s1", "tenant_id": "acme_dental", "arguments": {}});
        let reply = send_as(
            &ops_key(),
            addr,
            "POST",
            &api::tool_path("lookup_business_hours"),
            Some(&tool),
        )
        .await;
        assert_eq!(
            (reply.status, error_code(&reply)),
            (403, "insufficient_scope")
        );
        // Authentication still comes first: unsigned is 401, never 403.
        let reply = send_raw(addr, "GET", calls, &[], Vec::new()).await;
        assert_eq!((reply.status, error_code(&reply)), (401, "malformed"));
        cp.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_unbound_report_never_replaces_a_calls_record_and_a_record_is_final() {
    bounded(async {
        let cp = start_in_memory().await;
        let addr = cp.local_addr();
        // The webhook's lookup binds the call; its bound stream reports.
        assert_eq!(
            context(addr, "+15550100001", "+15551230000", "CA-u1")
                .await
                .status,
            200
        );
        let real = report("CA-u1", "acme_dental", "+15550100001", unix_now() * 1000);
        assert_eq!(post_report(addr, &real).await.status, 200);

        // A stream with no token that claimed the same CallSid reports too: kept apart.
        let mut intruder = real.clone();
        intruder.binding = ReportBinding::Unbound;
        intruder.tenant_id = None;
        intruder.stream_sid = "MZ-intruder".into();
        intruder.from = "+15559990000".into();
        intruder.agent_name = "default".into();
        intruder.transcript.truncate(1);
        let reply = post_report(addr, &intruder).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(history(addr, "acme_dental").await.calls, vec![real.clone()]);
        let store = cp.store().clone();
        let unbound = tokio::task::spawn_blocking(move || store.unbound_reports("CA-u1"))
            .await
            .expect("task")
            .expect("store");
        assert_eq!(unbound, vec![intruder.clone()]);

        // Naming the tenant does not help an unbound report.
        let mut claiming = intruder.clone();
        claiming.stream_sid = "MZ-intruder-2".into();
        claiming.tenant_id = Some("acme_dental".into());
        let reply = post_report(addr, &claiming).await;
        assert_eq!((reply.status, error_code(&reply)), (403, "tenant_mismatch"));

        // A second, different bound report cannot replace the record; the same one again is
        // acknowledged (a retry whose answer was lost).
        let mut second = real.clone();
        second.stream_sid = "MZ-second".into();
        let reply = post_report(addr, &second).await;
        assert_eq!((reply.status, error_code(&reply)), (409, "report_conflict"));
        let reply = post_report(addr, &real).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(
            reply.body,
            json!({"call_sid": "CA-u1", "transcript_lines": 3})
        );
        assert_eq!(history(addr, "acme_dental").await.calls, vec![real]);

        // A report without a `binding` (an older bridge) is taken as unbound.
        let mut legacy =
            serde_json::to_value(report("CA-u2", "acme_dental", "+15550100001", 1)).expect("json");
        legacy.as_object_mut().expect("object").remove("binding");
        legacy["tenant_id"] = Value::Null;
        let reply = send(addr, "POST", &api::report_path("CA-u2"), Some(&legacy)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert!(
            history(addr, "acme_dental")
                .await
                .calls
                .iter()
                .all(|c| c.call_sid != "CA-u2")
        );
        cp.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_report_sent_twice_is_one_call_and_history_is_per_tenant() {
    bounded(async {
        let cp = start_in_memory().await;
        let addr = cp.local_addr();
        let start_ms = unix_now() * 1000;
        assert_eq!(
            context(addr, "+15550100001", "+15551230000", "CA-r1")
                .await
                .status,
            200
        );
        assert_eq!(
            context(addr, "+15550100002", "+15551230000", "CA-r2")
                .await
                .status,
            200
        );

        let acme = report("CA-r1", "acme_dental", "+15550100001", start_ms);
        for _attempt in 0..2 {
            let reply = post_report(addr, &acme).await;
            assert_eq!(reply.status, 200, "{}", reply.body);
            assert_eq!(
                reply.body,
                json!({"call_sid": "CA-r1", "transcript_lines": 3})
            );
        }
        let luna = report("CA-r2", "bistro_luna", "+15550100002", start_ms + 1_000);
        assert_eq!(post_report(addr, &luna).await.status, 200);

        let acme_history = history(addr, "acme_dental").await;
        assert_eq!(
            acme_history.calls,
            vec![acme.clone()],
            "one call, transcript in order"
        );
        let luna_history = history(addr, "bistro_luna").await;
        assert_eq!(luna_history.calls, vec![luna]);

        // Newest first, and `limit`.
        let later = report("CA-r3", "acme_dental", "+15550100001", start_ms + 60_000);
        assert_eq!(post_report(addr, &later).await.status, 200);
        let sids: Vec<String> = history(addr, "acme_dental")
            .await
            .calls
            .into_iter()
            .map(|c| c.call_sid)
            .collect();
        assert_eq!(sids, ["CA-r3", "CA-r1"]);
        let one = send_as(
            &ops_key(),
            addr,
            "GET",
            "/v1/calls?tenant_id=acme_dental&limit=1",
            None,
        )
        .await;
        assert_eq!(one.body["calls"].as_array().map(Vec::len), Some(1));
        let bad_limit = send_as(
            &ops_key(),
            addr,
            "GET",
            "/v1/calls?tenant_id=acme_dental&limit=ten",
            None,
        )
        .await;
        assert_eq!(
            (bad_limit.status, error_code(&bad_limit)),
            (400, "bad_query")
        );
        let unknown = send_as(&ops_key(), addr, "GET", "/v1/calls?tenant_id=nobody", None).await;
        assert_eq!(
            (unknown.status, error_code(&unknown)),
            (404, "unknown_tenant")
        );
        let missing = send_as(&ops_key(), addr, "GET", "/v1/calls", None).await;
        assert_eq!(
            (missing.status, error_code(&missing)),
            (400, "missing_tenant_id")
        );

        // A report cannot move a call to another tenant, nor replace a stored one, nor
        // disagree with its path.
        assert_eq!(
            context(addr, "+15550100001", "+15551230000", "CA-r4")
                .await
                .status,
            200
        );
        let moved = report("CA-r4", "bistro_luna", "+15550100001", start_ms);
        let reply = post_report(addr, &moved).await;
        assert_eq!((reply.status, error_code(&reply)), (403, "tenant_mismatch"));
        let replaced = report("CA-r1", "bistro_luna", "+15550100001", start_ms);
        let reply = post_report(addr, &replaced).await;
        assert_eq!((reply.status, error_code(&reply)), (409, "report_conflict"));
        let body = serde_json::to_value(&acme).expect("json");
        let reply = send(addr, "POST", &api::report_path("CA-other"), Some(&body)).await;
        assert_eq!(
            (reply.status, error_code(&reply)),
            (400, "call_sid_mismatch")
        );
        let reply = send(
            addr,
            "POST",
            &api::report_path("CA-r1"),
            Some(&json!({"call_sid": "CA-r1"})),
        )
        .await;
        assert_eq!((reply.status, error_code(&reply)), (400, "bad_body"));
        cp.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_report_with_two_model_sessions_and_a_fallback_comes_back_in_history() {
    bounded(async {
        let cp = start_in_memory().await;
        let addr = cp.local_addr();
        let looked_up = context(addr, "+15550100001", "+15551230000", "CA-cont").await;
        assert_eq!(looked_up.status, 200, "{}", looked_up.body);
        let mut sent = report("CA-cont", "acme_dental", "+15550100001", 1_750_000_000_000);
        sent.model_sessions = vec![
            ModelSessionReport {
                started_ms: 0,
                ended_ms: Some(20_000),
                end: Some("drop".into()),
                failed_connects: Vec::new(),
            },
            ModelSessionReport {
                started_ms: 21_200,
                ended_ms: Some(42_000),
                end: Some("call_ended".into()),
                failed_connects: vec!["server_error".into()],
            },
        ];
        sent.reconnect_gap_ms = 1_200;
        sent.hold_prompt_ms = 500;
        sent.fallback = Some(ReportFallback {
            reason: "too_many_drops".into(),
            caller_got: "dial".into(),
        });
        let stored = post_report(addr, &sent).await;
        assert_eq!(stored.status, 200, "{}", stored.body);

        let reply = send_as(
            &ops_key(),
            addr,
            "GET",
            "/v1/calls?tenant_id=acme_dental",
            None,
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        // The JSON keys as documented, not only what serde reads back.
        let call = &reply.body["calls"][0];
        assert_eq!(call["model_sessions"][0]["end"], "drop");
        assert_eq!(
            call["model_sessions"][1]["failed_connects"],
            json!(["server_error"])
        );
        assert_eq!(call["reconnect_gap_ms"], 1_200);
        assert_eq!(call["hold_prompt_ms"], 500);
        assert_eq!(
            call["fallback"],
            json!({"reason": "too_many_drops", "caller_got": "dial"})
        );
        let history: CallHistory = serde_json::from_value(reply.body).expect("history");
        assert_eq!(history.calls, vec![sent.clone()]);

        // A report that changes only a session is another report: refused, nothing replaced.
        let mut other = sent.clone();
        other.model_sessions.truncate(1);
        let refused = post_report(addr, &other).await;
        assert_eq!(
            (refused.status, error_code(&refused)),
            (409, "report_conflict")
        );
        assert_eq!(history_of(addr, "acme_dental").await, vec![sent]);
        cp.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_gemini_calls_provider_model_and_usage_come_back_in_history() {
    bounded(async {
        let cp = start_in_memory().await;
        let addr = cp.local_addr();
        let looked_up = context(addr, "+15550100004", "+15551230000", "CA-gem").await;
        assert_eq!(looked_up.status, 200, "{}", looked_up.body);
        assert_eq!(looked_up.body["provider"], "gemini");
        let mut sent = report(
            "CA-gem",
            "harbor_florist",
            "+15550100004",
            1_750_000_000_000,
        );
        sent.provider = Provider::Gemini;
        sent.model = Some("gemini-3.8-live".into());
        sent.usage = Some(ReportUsage {
            input_tokens: 2_048,
            output_tokens: 512,
        });
        let stored = post_report(addr, &sent).await;
        assert_eq!(stored.status, 200, "{}", stored.body);
        // A report from a bridge before these fields: OpenAI, default model, no usage.
        let looked_up = context(addr, "+15550100004", "+15551230000", "CA-old").await;
        assert_eq!(looked_up.status, 200, "{}", looked_up.body);
        let mut old = serde_json::to_value(report(
            "CA-old",
            "harbor_florist",
            "+15550100004",
            1_750_000_100_000,
        ))
        .expect("json");
        for field in ["provider", "model", "usage"] {
            old.as_object_mut().expect("object").remove(field);
        }
        let reply = send(addr, "POST", &api::report_path("CA-old"), Some(&old)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);

        let reply = send_as(
            &ops_key(),
            addr,
            "GET",
            "/v1/calls?tenant_id=harbor_florist",
            None,
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        // The JSON keys as documented; newest first.
        let calls = &reply.body["calls"];
        assert_eq!(calls[0]["call_sid"], "CA-old");
        assert_eq!(calls[0]["provider"], "openai");
        assert_eq!(calls[0]["model"], Value::Null);
        assert!(calls[0].get("usage").is_none(), "{}", calls[0]);
        assert_eq!(calls[1]["provider"], "gemini");
        assert_eq!(calls[1]["model"], "gemini-3.8-live");
        assert_eq!(
            calls[1]["usage"],
            json!({"input_tokens": 2_048, "output_tokens": 512})
        );
        let history: CallHistory = serde_json::from_value(reply.body).expect("history");
        assert_eq!(history.calls[1], sent);
        cp.stop().await;
    })
    .await;
}

async fn history_of(addr: SocketAddr, tenant: &str) -> Vec<CallReport> {
    history(addr, tenant).await.calls
}

#[tokio::test]
async fn tools_read_and_write_the_database_and_never_cross_tenants() {
    bounded(async {
        let cp = start_in_memory().await;
        let addr = cp.local_addr();
        assert_eq!(context(addr, "+15550100001", "+15551230000", "CA-t1").await.status, 200);
        assert_eq!(context(addr, "+15550100002", "+15551239999", "CA-t2").await.status, 200);

        let friday = run_tool(addr, "lookup_business_hours", "CA-t1", "acme_dental", json!({"day": "friday"})).await;
        assert_eq!(friday.status, 200, "{}", friday.body);
        assert_eq!(
            friday.body["output"],
            json!({"day": "friday", "open": true, "opens": "08:00", "closes": "15:00", "timezone": "America/New_York"})
        );
        let week = run_tool(addr, "lookup_business_hours", "CA-t2", "bistro_luna", json!({})).await;
        assert_eq!(week.status, 200, "{}", week.body);
        assert_eq!(week.body["output"]["timezone"], "America/Los_Angeles");
        assert_eq!(week.body["output"]["week"][0], json!({"day": "monday", "open": false}));

        let message = json!({"caller_name": "Sam Rivera", "callback_number": "+1 555-010-0199", "message": "Please call me about my cleaning."});
        let saved = run_tool(addr, "take_message", "CA-t1", "acme_dental", message.clone()).await;
        assert_eq!(saved.status, 200, "{}", saved.body);
        assert_eq!(saved.body["output"]["saved"], true);
        let message_id = saved.body["output"]["message_id"].as_i64().expect("id");
        let store = cp.store().clone();
        let stored = tokio::task::spawn_blocking(move || store.messages("acme_dental"))
            .await
            .expect("task")
            .expect("messages");
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].id, message_id);
        assert_eq!(stored[0].call_sid, "CA-t1");
        assert_eq!(stored[0].caller_name, "Sam Rivera");
        assert_eq!(stored[0].message, "Please call me about my cleaning.");

        let expect = |reply: Reply, status: u16, code: &str| {
            assert_eq!(reply.status, status, "{code}: {}", reply.body);
            assert_eq!(error_code(&reply), code);
        };
        // The call belongs to acme_dental: bistro_luna cannot use it.
        expect(run_tool(addr, "lookup_business_hours", "CA-t1", "bistro_luna", json!({})).await, 403, "tenant_mismatch");
        // Nor the other way round.
        expect(run_tool(addr, "take_message", "CA-t2", "acme_dental", message.clone()).await, 403, "tenant_mismatch");
        // take_message is not enabled for bistro_luna.
        expect(run_tool(addr, "take_message", "CA-t2", "bistro_luna", message.clone()).await, 404, "unknown_tool");
        expect(run_tool(addr, "launch_rockets", "CA-t1", "acme_dental", json!({})).await, 404, "unknown_tool");
        expect(run_tool(addr, "take_message", "CA-t1", "nobody", message.clone()).await, 404, "unknown_tenant");
        expect(run_tool(addr, "take_message", "CA-t1", "acme_dental", json!({"caller_name": "Sam"})).await, 422, "bad_arguments");
        expect(run_tool(addr, "lookup_business_hours", "CA-t1", "acme_dental", json!({"day": "Caturday"})).await, 422, "bad_arguments");
        expect(
            send(addr, "POST", &api::tool_path("take_message"), Some(&json!({"tenant_id": "acme_dental"}))).await,
            400,
            "bad_body",
        );

        // Nothing refused wrote anything.
        let store = cp.store().clone();
        let counts = tokio::task::spawn_blocking(move || {
            (store.messages("acme_dental").map(|m| m.len()), store.messages("bistro_luna").map(|m| m.len()))
        })
        .await
        .expect("task");
        assert_eq!((counts.0.expect("acme"), counts.1.expect("luna")), (1, 0));
        cp.stop().await;
    })
    .await;
}

#[tokio::test]
async fn stop_closes_keep_alive_connections_and_a_restart_keeps_the_data() {
    bounded(async {
        let dir = TempDir::new("restart");
        let db = DbLocation::File(dir.0.join("control-plane.sqlite3"));
        let cp = start(db.clone(), SocketAddr::from(([127, 0, 0, 1], 0))).await;
        let addr = cp.local_addr();
        assert_eq!(cp.url().as_str(), format!("http://{addr}/"));

        // A pooled client: one keep-alive connection used for two requests.
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        let connection = tokio::spawn(connection);
        let path = api::context_path_and_query("+15550100001", "+15551230000", "CA-keep");
        let signed = signed_headers(&new_key(), "GET", &path, b"");
        let reply = send_on(&mut sender, addr, "GET", &path, &signed.pairs(), Vec::new()).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let acme = report("CA-keep", "acme_dental", "+15550100001", unix_now() * 1000);
        let body = serde_json::to_vec(&acme).expect("json");
        let report_path = api::report_path("CA-keep");
        let signed = signed_headers(&new_key(), "POST", &report_path, &body);
        let reply = send_on(
            &mut sender,
            addr,
            "POST",
            &report_path,
            &signed.pairs(),
            body,
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.body);

        let stopping = Instant::now();
        cp.stop().await;
        assert!(
            stopping.elapsed() < Duration::from_secs(1),
            "an idle connection does not hold stop up"
        );
        // The idle keep-alive connection was closed by the server, not left for the client.
        tokio::time::timeout(Duration::from_secs(2), connection)
            .await
            .expect("the server closed the pooled connection")
            .expect("task")
            .ok();
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "nothing listens after stop"
        );

        // Same address, same database file.
        let cp = start(db, addr).await;
        assert_eq!(cp.local_addr(), addr);
        assert_eq!(
            cp.seed_outcome()
                .map(|o| (o.tenants_written, o.numbers_written, o.numbers_removed)),
            Some((0, 0, 0)),
            "the same seed changes nothing on restart"
        );
        assert_eq!(history(addr, "acme_dental").await.calls, vec![acme]);
        // The call binding survived too.
        let reply = run_tool(
            addr,
            "lookup_business_hours",
            "CA-keep",
            "bistro_luna",
            json!({}),
        )
        .await;
        assert_eq!((reply.status, error_code(&reply)), (403, "tenant_mismatch"));
        cp.stop().await;
    })
    .await;
}

#[tokio::test]
async fn start_refuses_a_bad_seed_and_an_empty_key_list() {
    bounded(async {
        let bad_seed = ControlPlane::start(ControlPlaneConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            db: DbLocation::InMemory,
            seed: Some(SeedSource::with_shipped_files("[[tenants]]\nid = \"x\"")),
            verifier: Verifier::from_key_list(KEYS).expect("keys"),
        })
        .await;
        assert!(matches!(
            bad_seed.map(|_| ()),
            Err(voxrelay_control_plane::server::ControlPlaneError::Seed(_))
        ));
        // A fallback number the bridge would ignore, and a hold prompt over the limit.
        let dir = TempDir::new("bad-seed");
        std::fs::write(
            dir.0.join("long.raw"),
            vec![0xff_u8; api::MAX_HOLD_PROMPT_BYTES + 1],
        )
        .expect("write");
        let shipped = voxrelay_control_plane::server::seed_toml();
        let bad_number = shipped.replace("\"+15550100999\"", "\"+1555\"");
        let long_prompt = shipped.replace("\"hold-prompt-8k-mulaw.raw\"", "\"long.raw\"");
        assert!(bad_number != shipped && long_prompt != shipped);
        for text in [bad_number, long_prompt] {
            let refused = ControlPlane::start(ControlPlaneConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                db: DbLocation::InMemory,
                seed: Some(SeedSource {
                    text,
                    files: SeedFiles::Dir(dir.0.clone()),
                }),
                verifier: Verifier::from_key_list(KEYS).expect("keys"),
            })
            .await;
            match refused.map(|_| ()) {
                Err(voxrelay_control_plane::server::ControlPlaneError::Seed(error)) => {
                    let text = error.to_string();
                    assert!(
                        text.contains("(acme_dental)") || text.contains("(bistro_luna)"),
                        "{text}"
                    );
                }
                other => panic!("{other:?}"),
            }
        }
        let no_keys = ControlPlane::start(ControlPlaneConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            db: DbLocation::InMemory,
            seed: None,
            verifier: Verifier::new(Vec::new()),
        })
        .await;
        assert!(matches!(
            no_keys.map(|_| ()),
            Err(voxrelay_control_plane::server::ControlPlaneError::NoKeys)
        ));
    })
    .await;
}

// ---- the `voxrelay control-plane` command ----

const BIN: &str = env!("CARGO_BIN_EXE_voxrelay");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn control_plane_command(db: &std::path::Path, listen: &str) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(["control-plane", "--listen", listen, "--db"])
        .arg(db)
        .arg("--seed")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/tenants.toml"
        ))
        .env_remove("VOXRELAY_CONTROL_PLANE_KEYS")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    command
}

/// Kills the child however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_command_needs_well_formed_keys_and_never_prints_them() {
    let dir = TempDir::new("cli-keys");
    let db = dir.0.join("cp.sqlite3");
    let missing = control_plane_command(&db, "127.0.0.1:0")
        .output()
        .expect("run");
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("VOXRELAY_CONTROL_PLANE_KEYS is not set"),
        "{stderr}"
    );

    let malformed = control_plane_command(&db, "127.0.0.1:0")
        .env("VOXRELAY_CONTROL_PLANE_KEYS", "k1:hunter2-secret,k2")
        .output()
        .expect("run");
    assert!(!malformed.status.success());
    let stderr = String::from_utf8_lossy(&malformed.stderr);
    assert!(
        stderr.contains("VOXRELAY_CONTROL_PLANE_KEYS is malformed"),
        "{stderr}"
    );
    assert!(stderr.contains("entry 2"), "{stderr}");
    let stdout = String::from_utf8_lossy(&malformed.stdout);
    assert!(
        !format!("{stdout}{stderr}").contains("hunter2"),
        "{stdout}{stderr}"
    );
}

#[tokio::test]
async fn the_command_serves_signed_requests_from_its_seeded_database() {
    let dir = TempDir::new("cli-run");
    let db = dir.0.join("cp.sqlite3");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut child = KillOnDrop(
        control_plane_command(&db, &addr.to_string())
            .env("VOXRELAY_CONTROL_PLANE_KEYS", KEYS)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn"),
    );
    let stdout = child.0.stdout.take().expect("stdout");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });

    // Poll until it answers a signed request (or 20 s pass).
    let deadline = Instant::now() + Duration::from_secs(20);
    let context = loop {
        assert!(
            Instant::now() < deadline,
            "the control plane never answered"
        );
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("the control plane exited early: {status}");
        }
        if TcpStream::connect(addr).await.is_ok() {
            break bounded(context(addr, "+15550100001", "+15551230000", "CA-cli")).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(context.status, 200, "{}", context.body);
    assert_eq!(context.body["tenant_id"], "acme_dental");
    assert_eq!(context.body["fallback_number"], "+15550100999");
    // The seed's hold_prompt_file was read beside the seed file the command was given.
    let luna = bounded(self::context(addr, "+15550100002", "", "")).await;
    assert_eq!(
        luna.body["hold_prompt"].as_str(),
        Some(BASE64.encode(HOLD_PROMPT_FIXTURE).as_str())
    );
    let unsigned = bounded(send_raw(
        addr,
        "GET",
        "/v1/calls?tenant_id=acme_dental",
        &[],
        Vec::new(),
    ))
    .await;
    assert_eq!(unsigned.status, 401);

    // Killing it closes its stdout, which ends the reader thread and the channel.
    drop(child);
    let mut logs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match lines_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => logs.push(line),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let logs = logs.join("\n");
    assert!(logs.contains("control plane ready"), "{logs}");
    assert!(
        logs.contains("cp-2025-09:bridge"),
        "key ids are logged: {logs}"
    );
    assert!(
        logs.contains("ops-2025-09:operator"),
        "with their scopes: {logs}"
    );
    assert!(
        !logs.contains("old secret") && !logs.contains("new secret"),
        "{logs}"
    );
    assert!(db.exists(), "the database file was created");
}
