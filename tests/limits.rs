//! The public listener's caps and timeouts, through real sockets on 127.0.0.1: header-read
//! and idle timeouts, webhook body size and time limits, the caps on open and unverified
//! connections, on calls (`VOXRELAY_MAX_CALLS`) and on streams waiting for `start`, and
//! `/metrics` living on the admin listener only.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use url::Url;
use voxrelay::AudioMode;
use voxrelay::config::BridgeConfig;
use voxrelay::session::metrics::{ListenerRefusal, SignedRoute};
use voxrelay::twilio::signature::compute_signature;
use voxrelay_sim::http_client;
use voxrelay_sim::mock::MockConfig;

const SHORT: Duration = Duration::from_millis(300);

async fn stack_with(adjust: impl FnOnce(&mut BridgeConfig)) -> Stack {
    start_stack_adjusted(MockConfig::default(), AudioMode::Pcmu, None, adjust).await
}

/// Reads until the peer closes the connection; `None` if it is still open after `within`.
async fn read_until_closed(tcp: &mut TcpStream, within: Duration) -> Option<(String, Duration)> {
    let began = Instant::now();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let closed = tokio::time::timeout(within, async {
        loop {
            match tcp.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    closed.ok().map(|()| {
        (
            String::from_utf8_lossy(&received).into_owned(),
            began.elapsed(),
        )
    })
}

/// Reads one response head (up to the blank line) from a connection that stays open.
async fn read_head(tcp: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), async {
        while !received.ends_with(b"\r\n\r\n") {
            assert_eq!(tcp.read(&mut byte).await.unwrap(), 1, "closed mid-head");
            received.push(byte[0]);
        }
    })
    .await
    .expect("a response head");
    String::from_utf8(received).unwrap()
}

/// Reads one whole response (head, then a `Content-Length` body) from a connection that stays
/// open; returns the head.
async fn read_response(tcp: &mut TcpStream) -> String {
    let head = read_head(tcp).await;
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .expect("a content-length");
    let mut body = vec![0u8; length];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut body))
        .await
        .expect("a response body")
        .unwrap();
    head
}

/// A signed voice webhook for `call_sid`, as raw HTTP/1.1 bytes (keep-alive).
fn signed_voice_request(stack: &Stack, call_sid: &str) -> Vec<u8> {
    let url = stack.url.join("/twilio/voice").unwrap();
    let params = vec![
        ("AccountSid".to_owned(), ACCOUNT_SID.to_owned()),
        ("CallSid".to_owned(), call_sid.to_owned()),
        ("To".to_owned(), "+15550001111".to_owned()),
        ("From".to_owned(), "+15550002222".to_owned()),
    ];
    let signature = compute_signature(TOKEN, url.as_str(), &params);
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params.iter())
        .finish();
    format!(
        "POST /twilio/voice HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         X-Twilio-Signature: {signature}\r\nContent-Length: {}\r\n\r\n{body}",
        stack.bridge.local_addr(),
        body.len()
    )
    .into_bytes()
}

/// POSTs a signed voice webhook and returns the status and TwiML.
async fn post_voice(stack: &Stack, call_sid: &str) -> (u16, String) {
    let params: Vec<(String, String)> = [
        ("AccountSid", ACCOUNT_SID),
        ("CallSid", call_sid),
        ("To", "+15550001111"),
        ("From", "+15550002222"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let response = post_voice_form(stack, &params, None).await;
    (response.status, response.body)
}

/// Opens a signed media socket; the HTTP status if the upgrade was refused.
async fn try_media_socket(stack: &Stack) -> Result<RawSocket, u16> {
    let ws_url = format!("ws://{}/twilio/media", stack.bridge.local_addr());
    let mut request = ws_url.as_str().into_client_request().unwrap();
    let signature = compute_signature(TOKEN, &ws_url, &[]);
    request
        .headers_mut()
        .insert("x-twilio-signature", signature.parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(other) => panic!("media socket failed: {other}"),
    }
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_request_head_is_closed_after_the_header_timeout() {
    let stack = stack_with(|config| config.limits.header_read_timeout = SHORT).await;
    let mut tcp = connect(stack.bridge.local_addr()).await;
    tcp.write_all(b"POST /twilio/voice HTTP/1.1\r\nHost: bridge\r\nContent-Type: appl")
        .await
        .unwrap();
    let (_, took) = read_until_closed(&mut tcp, Duration::from_secs(5))
        .await
        .expect("the half-sent head was still open after 5 s");
    assert!(
        took >= SHORT - Duration::from_millis(50),
        "closed after {took:?}"
    );
    // A connection that sends nothing at all is closed the same way.
    let mut silent = connect(stack.bridge.local_addr()).await;
    assert!(
        read_until_closed(&mut silent, Duration::from_secs(5))
            .await
            .is_some()
    );
    let metrics = stack.bridge.metrics();
    assert!(
        eventually(Duration::from_secs(2), || {
            metrics.listener.refusals(ListenerRefusal::HeaderTimeout) >= 2
        })
        .await
    );
    assert!(
        eventually(Duration::from_secs(2), || {
            metrics.listener.connections_open.load(Relaxed) == 0
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_kept_alive_connection_is_closed_after_the_header_timeout() {
    let stack = stack_with(|config| config.limits.header_read_timeout = SHORT).await;
    let mut tcp = connect(stack.bridge.local_addr()).await;
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: bridge\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The response is not `Connection: close`: only the idle deadline ends the connection.
    assert!(
        !head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    let (rest, _) = read_until_closed(&mut tcp, Duration::from_secs(5))
        .await
        .expect("an idle kept-alive connection was still open after 5 s");
    assert_eq!(rest, "ok\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_webhook_body_is_cut_off_with_408() {
    let stack = stack_with(|config| config.limits.body_timeout = SHORT).await;
    for path in ["/twilio/voice", "/twilio/status"] {
        let mut tcp = connect(stack.bridge.local_addr()).await;
        tcp.write_all(
            format!(
                "POST {path} HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/x-www-form-urlencoded\r\n\
                 Content-Length: 400\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        // One byte every 50 ms: 400 bytes would take 20 s.
        let began = Instant::now();
        let trickle = async {
            for _ in 0..400 {
                if tcp.write_all(b"a").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), trickle).await;
        assert!(began.elapsed() < Duration::from_secs(3));
        let (response, _) = read_until_closed(&mut tcp, Duration::from_secs(3))
            .await
            .expect("the trickling connection was not closed");
        assert!(response.starts_with("HTTP/1.1 408"), "{path}: {response}");
    }
    assert_eq!(
        stack
            .bridge
            .metrics()
            .listener
            .refusals(ListenerRefusal::BodyTimeout),
        2
    );
    // The bodies never reached the routes.
    assert_eq!(
        stack
            .bridge
            .metrics()
            .signature_failures(SignedRoute::Voice),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_webhook_body_gets_413() {
    let stack = stack_with(|_| {}).await;
    for path in ["/twilio/voice", "/twilio/status"] {
        // Declared too large: refused before a byte of the body is read.
        let mut declared = connect(stack.bridge.local_addr()).await;
        declared
            .write_all(
                format!(
                    "POST {path} HTTP/1.1\r\nHost: bridge\r\nContent-Length: {}\r\n\r\n",
                    64 * 1024 + 1
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let (response, _) = read_until_closed(&mut declared, Duration::from_secs(3))
            .await
            .expect("closed after the 413");
        assert!(response.starts_with("HTTP/1.1 413"), "{path}: {response}");
        // Chunked, no length given: cut off once it passes the limit.
        let mut chunked = connect(stack.bridge.local_addr()).await;
        chunked
            .write_all(
                format!(
                    "POST {path} HTTP/1.1\r\nHost: bridge\r\nTransfer-Encoding: chunked\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let chunk = format!("1000\r\n{}\r\n", "a".repeat(0x1000));
        for _ in 0..17 {
            if chunked.write_all(chunk.as_bytes()).await.is_err() {
                break;
            }
        }
        let (response, _) = read_until_closed(&mut chunked, Duration::from_secs(3))
            .await
            .expect("closed after the 413");
        assert!(response.starts_with("HTTP/1.1 413"), "{path}: {response}");
    }
    let metrics = stack.bridge.metrics();
    assert_eq!(metrics.listener.refusals(ListenerRefusal::BodyTooLarge), 4);
    assert_eq!(metrics.signature_failures(SignedRoute::Voice), 0);
    assert_eq!(metrics.signature_failures(SignedRoute::Status), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_unverified_cap_are_closed_at_once() {
    let stack = stack_with(|config| config.limits.max_unverified_connections = 2).await;
    let addr = stack.bridge.local_addr();
    let mut first = connect(addr).await;
    let mut second = connect(addr).await;
    // Both are admitted (and idle); the third is over the cap.
    assert!(
        read_until_closed(&mut first, Duration::from_millis(300))
            .await
            .is_none()
    );
    let mut third = connect(addr).await;
    let (answer, took) = read_until_closed(&mut third, Duration::from_secs(2))
        .await
        .expect("a connection over the unverified cap stayed open");
    assert!(
        answer.is_empty() && took < Duration::from_secs(1),
        "{answer} after {took:?}"
    );

    // An unsigned request does not verify its connection.
    second
        .write_all(
            b"POST /twilio/voice HTTP/1.1\r\nHost: bridge\r\nContent-Length: 9\r\n\r\nCallSid=x",
        )
        .await
        .unwrap();
    assert!(read_head(&mut second).await.starts_with("HTTP/1.1 403"));
    let mut fourth = connect(addr).await;
    assert!(
        read_until_closed(&mut fourth, Duration::from_secs(2))
            .await
            .is_some()
    );

    // A signed one does: the connection frees its unverified slot and stays open.
    first
        .write_all(&signed_voice_request(&stack, &call_sid(0xa1)))
        .await
        .unwrap();
    assert!(read_head(&mut first).await.starts_with("HTTP/1.1 200"));
    let mut fifth = connect(addr).await;
    assert!(
        read_until_closed(&mut fifth, Duration::from_millis(500))
            .await
            .is_none(),
        "a verified connection still counted as unverified"
    );
    let metrics = stack.bridge.metrics();
    assert_eq!(metrics.listener.refusals(ListenerRefusal::UnverifiedCap), 2);
    assert_eq!(metrics.listener.connections_unverified.load(Relaxed), 2);
    assert_eq!(metrics.listener.connections_open.load(Relaxed), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_connection_that_never_verifies_is_closed_at_its_lifetime() {
    let stack = stack_with(|config| config.limits.unverified_lifetime = SHORT).await;
    let addr = stack.bridge.local_addr();
    let mut unsigned = connect(addr).await;
    let mut signed = connect(addr).await;
    signed
        .write_all(&signed_voice_request(&stack, &call_sid(0xa2)))
        .await
        .unwrap();
    assert!(read_response(&mut signed).await.starts_with("HTTP/1.1 200"));
    // Health checks every 100 ms keep the header timeout from ever firing.
    let began = Instant::now();
    let mut closed_after = None;
    while began.elapsed() < Duration::from_secs(3) {
        if unsigned
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: bridge\r\n\r\n")
            .await
            .is_err()
        {
            closed_after = Some(began.elapsed());
            break;
        }
        let mut buffer = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(500), unsigned.read(&mut buffer)).await {
            Ok(Ok(0) | Err(_)) => {
                closed_after = Some(began.elapsed());
                break;
            }
            Ok(Ok(_)) => {}
            Err(_) => panic!("no answer to a health check"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let closed_after = closed_after.expect("an unverified connection outlived its lifetime");
    assert!(
        closed_after >= SHORT - Duration::from_millis(50),
        "{closed_after:?}"
    );
    // The verified connection is still served.
    signed
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: bridge\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut signed).await.starts_with("HTTP/1.1 200"));
    assert_eq!(
        stack
            .bridge
            .metrics()
            .listener
            .refusals(ListenerRefusal::UnverifiedLifetime),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_open_connection_cap_are_closed_at_once() {
    let stack = stack_with(|config| config.limits.max_connections = 2).await;
    let addr = stack.bridge.local_addr();
    let mut held = vec![connect(addr).await, connect(addr).await];
    assert!(
        read_until_closed(&mut held[0], Duration::from_millis(300))
            .await
            .is_none()
    );
    let mut over = connect(addr).await;
    assert!(
        read_until_closed(&mut over, Duration::from_secs(2))
            .await
            .is_some()
    );
    assert_eq!(
        stack
            .bridge
            .metrics()
            .listener
            .refusals(ListenerRefusal::ConnectionCap),
        1
    );
    // A slot freed is a slot for the next connection.
    drop(held.pop());
    let metrics = stack.bridge.metrics();
    assert!(
        eventually(Duration::from_secs(2), || {
            metrics.listener.connections_open.load(Relaxed) == 1
        })
        .await
    );
    let mut next = connect(addr).await;
    assert!(
        read_until_closed(&mut next, Duration::from_millis(300))
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_calls_the_webhook_says_sorry_and_a_stream_gets_503_until_a_call_ends() {
    let stack = stack_with(|config| config.limits.max_calls = 1).await;
    let metrics = stack.bridge.metrics();

    let (status, twiml) = post_voice(&stack, &call_sid(1)).await;
    assert_eq!(status, 200);
    assert!(twiml.contains("<Connect><Stream"), "{twiml}");
    let mut first = start_raw_stream(&stack, "MZ0000000000000000000000000000c001").await;
    assert!(
        eventually(Duration::from_secs(5), || stack.bridge.registry().len()
            == 1)
        .await
    );

    // Full: the caller hears why and the call hangs up; nothing is prepared for it.
    let (status, twiml) = post_voice(&stack, &call_sid(2)).await;
    assert_eq!(status, 200);
    assert!(
        twiml.contains("<Say>") && twiml.contains("<Hangup/>") && !twiml.contains("<Connect>"),
        "{twiml}"
    );
    assert!(twiml.contains("busy"), "{twiml}");
    assert_eq!(try_media_socket(&stack).await.err(), Some(503));
    assert_eq!(
        metrics.listener.refusals(ListenerRefusal::CallsFullVoice),
        1
    );
    assert_eq!(
        metrics.listener.refusals(ListenerRefusal::CallsFullMedia),
        1
    );
    assert_eq!(metrics.listener.call_slots_in_use.load(Relaxed), 1);

    // The call ends: its slot comes back.
    let stop = serde_json::json!({"event":"stop","sequenceNumber":"2","streamSid":"MZ0000000000000000000000000000c001","stop":{"accountSid":"AC00000000000000000000000000000000","callSid":"CA0000000000000000000000000000c001"}});
    first.send(Message::text(stop.to_string())).await.unwrap();
    assert!(closed_by_bridge(&mut first, Duration::from_secs(5)).await);
    assert!(
        eventually(Duration::from_secs(8), || {
            metrics.listener.call_slots_in_use.load(Relaxed) == 0
        })
        .await
    );
    let (status, twiml) = post_voice(&stack, &call_sid(3)).await;
    assert_eq!(status, 200);
    assert!(twiml.contains("<Connect><Stream"), "{twiml}");
    let _second = start_raw_stream(&stack, "MZ0000000000000000000000000000c003").await;
    assert!(
        eventually(Duration::from_secs(5), || stack.bridge.registry().len()
            == 1)
        .await
    );
    assert_eq!(
        metrics.listener.refusals(ListenerRefusal::CallsFullMedia),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_slot_nobody_streams_for_is_released_after_its_reservation() {
    let stack = stack_with(|config| {
        config.limits.max_calls = 1;
        config.limits.call_reservation = SHORT;
    })
    .await;
    assert!(
        post_voice(&stack, &call_sid(0x10))
            .await
            .1
            .contains("<Connect>")
    );
    // A repeat of the same webhook takes no second slot.
    assert!(
        post_voice(&stack, &call_sid(0x10))
            .await
            .1
            .contains("<Connect>")
    );
    assert!(
        post_voice(&stack, &call_sid(0x11))
            .await
            .1
            .contains("<Hangup/>")
    );
    tokio::time::sleep(SHORT + Duration::from_millis(100)).await;
    assert!(
        post_voice(&stack, &call_sid(0x12))
            .await
            .1
            .contains("<Connect>")
    );
    assert_eq!(
        stack
            .bridge
            .metrics()
            .listener
            .call_reservations_expired
            .load(Relaxed),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_waiting_for_start_are_capped() {
    let stack = stack_with(|config| config.limits.max_unstarted_streams = 2).await;
    let mut quiet = [
        open_media_socket(&stack).await,
        open_media_socket(&stack).await,
    ];
    assert_eq!(try_media_socket(&stack).await.err(), Some(503));
    assert_eq!(
        stack
            .bridge
            .metrics()
            .listener
            .refusals(ListenerRefusal::UnstartedStreams),
        1
    );
    // A stream that has started no longer counts as waiting.
    let start = serde_json::json!({
        "event": "start", "sequenceNumber": "1", "streamSid": "MZ00000000000000000000000000005a11",
        "start": {
            "accountSid": "AC00000000000000000000000000000000", "streamSid": "MZ00000000000000000000000000005a11", "callSid": "CA00000000000000000000000000005a11",
            "tracks": ["inbound"], "customParameters": {},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
        }
    });
    quiet[0]
        .send(Message::text(start.to_string()))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || stack.bridge.registry().len()
            == 1)
        .await
    );
    assert!(try_media_socket(&stack).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_on_the_admin_listener_only() {
    let stack = stack_with(|_| {}).await;
    let public = stack.url.join("/metrics").unwrap();
    let response = http_client::send("GET", &public, &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(response.status, 404);
    for path in ["/healthz", "/readyz"] {
        let response = http_client::send("GET", &stack.url.join(path).unwrap(), &[], Vec::new())
            .await
            .unwrap();
        assert_eq!(response.status, 200, "{path}");
    }
    let admin = Url::parse(&format!("http://{}", stack.bridge.admin_addr())).unwrap();
    assert_ne!(stack.bridge.admin_addr(), stack.bridge.local_addr());
    let response = http_client::send("GET", &admin.join("/metrics").unwrap(), &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert!(response.body.contains("voxrelay_calls_active 0"));
    assert!(
        response
            .body
            .contains("voxrelay_listener_refusals_total{reason=\"calls_full_voice\"} 0")
    );
    let ready = http_client::send("GET", &admin.join("/readyz").unwrap(), &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(ready.status, 200);
    // The admin listener serves nothing of Twilio's.
    let voice = http_client::send(
        "POST",
        &admin.join("/twilio/voice").unwrap(),
        &[],
        Vec::new(),
    )
    .await
    .unwrap();
    assert_eq!(voice.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_signatures_logs_a_few_lines_and_counts_the_rest() {
    let stack = stack_with(|_| {}).await;
    let url = stack.url.join("/twilio/status").unwrap();
    for _ in 0..40 {
        let response = http_client::send(
            "POST",
            &url,
            &[("x-twilio-signature", "forged")],
            b"CallSid=CA1".to_vec(),
        )
        .await
        .unwrap();
        assert_eq!(response.status, 403);
    }
    let metrics = stack.bridge.metrics();
    assert_eq!(metrics.signature_failures(SignedRoute::Status), 40);
    // At most a few seconds' allowance was logged (the loop may straddle a second or two).
    let suppressed = metrics.listener.log_lines_suppressed.load(Relaxed);
    let logged = 40 - suppressed;
    assert!(
        logged <= 3 * u64::from(voxrelay::http::WARNINGS_PER_SECOND),
        "{logged} lines logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_closes_idle_connections_and_frees_both_ports() {
    let stack = stack_with(|_| {}).await;
    let (public, admin) = (stack.bridge.local_addr(), stack.bridge.admin_addr());
    let mut idle = connect(public).await;
    let mut idle_admin = connect(admin).await;
    let began = Instant::now();
    stack.bridge.drain_and_stop(Duration::from_secs(1)).await;
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );
    assert!(
        read_until_closed(&mut idle, Duration::from_secs(1))
            .await
            .is_some()
    );
    assert!(
        read_until_closed(&mut idle_admin, Duration::from_secs(1))
            .await
            .is_some()
    );
    assert!(TcpStream::connect(public).await.is_err());
    assert!(TcpStream::connect(admin).await.is_err());
}
