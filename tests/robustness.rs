//! Bad input, bad signatures, failing peers and shutdown, through real sockets on 127.0.0.1.
//! Each must be refused or absorbed by the call it belongs to, counted, and never reach
//! another call.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use url::Url;
use voxrelay::AudioMode;
use voxrelay::Secret;
use voxrelay::config::{DEFAULT_MODEL_RECONNECT, MAX_MODEL_RECONNECTS, UpstreamTarget};
use voxrelay::session::continuity::{ConnectFailure, FallbackReason, SessionEnd};
use voxrelay::session::metrics::{SignedRoute, TwilioErrorKind};
use voxrelay::twilio::signature::compute_signature;
use voxrelay_sim::http_client;
use voxrelay_sim::mock::{MockConfig, MockRealtimeServer};

fn form(params: &[(&str, &str)]) -> Vec<u8> {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish()
        .into_bytes()
}

async fn post_signed(
    stack: &Stack,
    path: &str,
    params: &[(&str, &str)],
    signature: Option<&str>,
) -> http_client::HttpResponse {
    let url = stack.url.join(path).unwrap();
    let owned: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let computed = compute_signature(TOKEN, url.as_str(), &owned);
    let signature = signature.unwrap_or(&computed);
    let mut headers = vec![("content-type", "application/x-www-form-urlencoded")];
    if !signature.is_empty() {
        headers.push(("x-twilio-signature", signature));
    }
    http_client::send("POST", &url, &headers, form(params))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_and_the_media_socket_require_twilios_signature() {
    let stack = start_stack(AudioMode::Pcmu, None).await;
    let params = [
        ("AccountSid", "AC00000000000000000000000000000000"),
        ("CallSid", "CA00000000000000000000000000000001"),
        ("From", "+15550001111"),
        ("To", "+15550002222"),
    ];

    let ok = post_signed(&stack, "/twilio/voice", &params, None).await;
    assert_eq!(ok.status, 200);
    let expected_stream = format!(
        "<Stream url=\"ws://{}/twilio/media\"",
        stack.bridge.local_addr()
    );
    assert!(
        ok.body.contains("<Connect>") && ok.body.contains(&expected_stream),
        "{}",
        ok.body
    );
    assert!(
        ok.body
            .contains(r#"<Parameter name="To" value="+15550002222"/>"#),
        "{}",
        ok.body
    );
    assert!(
        ok.body
            .contains(r#"<Parameter name="CallSid" value="CA00000000000000000000000000000001"/>"#),
        "{}",
        ok.body
    );

    assert_eq!(
        post_signed(&stack, "/twilio/voice", &params, Some(""))
            .await
            .status,
        403
    );
    assert_eq!(
        post_signed(&stack, "/twilio/voice", &params, Some("bm90IGl0"))
            .await
            .status,
        403
    );
    // A parameter changed after signing.
    let signature = compute_signature(
        TOKEN,
        stack.url.join("/twilio/voice").unwrap().as_str(),
        &[("To".into(), "+1999".into())],
    );
    assert_eq!(
        post_signed(&stack, "/twilio/voice", &params, Some(&signature))
            .await
            .status,
        403
    );

    let status = [
        ("CallSid", "CA1"),
        ("StreamSid", "MZ1"),
        ("StreamEvent", "stream-started"),
    ];
    assert_eq!(
        post_signed(&stack, "/twilio/status", &status, None)
            .await
            .status,
        200
    );
    assert_eq!(
        post_signed(&stack, "/twilio/status", &status, Some("x"))
            .await
            .status,
        403
    );

    let ws_url = format!("ws://{}/twilio/media", stack.bridge.local_addr());
    for signature in [
        None,
        Some("AAAA".to_owned()),
        Some(compute_signature("wrong-token", &ws_url, &[])),
    ] {
        let mut request = ws_url.as_str().into_client_request().unwrap();
        if let Some(signature) = signature {
            request
                .headers_mut()
                .insert("x-twilio-signature", signature.parse().unwrap());
        }
        match tokio_tungstenite::connect_async(request).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 403)
            }
            other => panic!("unsigned upgrade was not refused: {:?}", other.map(|_| ())),
        }
    }

    let metrics = stack.bridge.metrics();
    assert_eq!(metrics.signature_failures(SignedRoute::Voice), 3);
    assert_eq!(metrics.signature_failures(SignedRoute::Status), 1);
    assert_eq!(metrics.signature_failures(SignedRoute::Media), 3);
    // The one valid webhook (CA1) pre-warmed one session; nothing refused reached the model.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while stack.mock.log().sessions().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        stack.mock.log().sessions().len(),
        1,
        "a refused request reached the model"
    );
    let admin = url::Url::parse(&format!("http://{}/metrics", stack.bridge.admin_addr())).unwrap();
    let text = http_client::send("GET", &admin, &[], Vec::new())
        .await
        .unwrap();
    assert!(
        text.body
            .contains("voxrelay_signature_failures_total{route=\"media\"} 3")
    );
    let secret_free = !text.body.contains(TOKEN);
    assert!(secret_free);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_counted_and_never_reach_the_neighbouring_call() {
    let stack = start_stack(AudioMode::Pcmu, None).await;
    let payload = BASE64.encode(tone_mulaw(440.0, 20));
    let (neighbour_sid, victim_sid) = (stream_sid(0xaa), stream_sid(0xbb));
    let someone_else = stream_sid(0xcc);
    let mut neighbour = start_raw_stream(&stack, &neighbour_sid).await;
    let mut victim = start_raw_stream(&stack, &victim_sid).await;
    for bad in [
        "not json at all".to_owned(),
        format!(
            r#"{{"event":"media","sequenceNumber":"2","streamSid":"{victim_sid}","media":{{"track":"inbound","chunk":"1","timestamp":"0","payload":"%%%not-base64%%%"}}}}"#
        ),
        format!(r#"{{"event":"rainbows","streamSid":"{victim_sid}"}}"#),
        format!(
            r#"{{"event":"media","sequenceNumber":"3","streamSid":"{someone_else}","media":{{"track":"inbound","chunk":"2","timestamp":"20","payload":"/w=="}}}}"#
        ),
        format!(
            r#"{{"event":"start","sequenceNumber":"4","streamSid":"{victim_sid}","start":{{"streamSid":"{victim_sid}","callSid":"{}","accountSid":"{ACCOUNT_SID}","mediaFormat":{{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}}}}"#,
            call_sid(2)
        ),
    ] {
        victim.send(Message::text(bad)).await.unwrap();
    }
    for sequence in 10..20 {
        victim
            .send(media_message(&victim_sid, sequence, &payload))
            .await
            .unwrap();
        neighbour
            .send(media_message(&neighbour_sid, sequence - 8, &payload))
            .await
            .unwrap();
    }
    let metrics = stack.bridge.metrics();
    let counted = eventually(Duration::from_secs(5), || {
        metrics.twilio_errors(TwilioErrorKind::Malformed) >= 1
            && metrics.twilio_errors(TwilioErrorKind::BadBase64) == 1
            && metrics.twilio_errors(TwilioErrorKind::UnknownEvent) == 1
            && metrics.twilio_errors(TwilioErrorKind::StreamSidMismatch) == 1
            && metrics.twilio_errors(TwilioErrorKind::OutOfOrder) == 1
    })
    .await;
    assert!(counted, "{}", metrics.render());
    // Both calls kept streaming: every valid frame reached its own model session.
    let both = eventually(Duration::from_secs(5), || {
        let sessions = stack.mock.log().sessions();
        sessions.len() == 2 && sessions.iter().all(|s| s.input_audio_8k.len() == 10 * 160)
    })
    .await;
    assert!(
        both,
        "valid frames did not all arrive: {:?}",
        stack
            .mock
            .log()
            .sessions()
            .iter()
            .map(|s| s.input_audio_8k.len())
            .collect::<Vec<_>>()
    );
    assert_eq!(stack.bridge.registry().len(), 2);

    // An oversized message ends only the call that sent it.
    let huge = format!(
        r#"{{"event":"media","streamSid":"{victim_sid}","padding":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    victim.send(Message::text(huge)).await.unwrap();
    assert!(closed_by_bridge(&mut victim, Duration::from_secs(5)).await);
    assert_eq!(metrics.twilio_errors(TwilioErrorKind::Oversized), 1);
    neighbour
        .send(media_message(&neighbour_sid, 12, &payload))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || stack.bridge.registry().len()
            == 1)
        .await
    );
    assert!(stack.bridge.registry().get(&neighbour_sid).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_never_starts_is_closed_after_five_seconds() {
    let stack = start_stack(AudioMode::Pcmu, None).await;
    let mut ws = open_media_socket(&stack).await;
    ws.send(Message::text(
        r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#,
    ))
    .await
    .unwrap();
    let began = std::time::Instant::now();
    assert!(closed_by_bridge(&mut ws, Duration::from_secs(8)).await);
    assert!(
        began.elapsed() >= Duration::from_millis(4_500),
        "closed too early: {:?}",
        began.elapsed()
    );
    assert_eq!(
        stack
            .bridge
            .metrics()
            .twilio_errors(TwilioErrorKind::StartTimeout),
        1
    );
    assert!(
        eventually(Duration::from_secs(2), || stack.bridge.live_call_tasks()
            == 0)
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_model_falls_back_within_the_reconnect_budget() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mock = MockRealtimeServer::start(MockConfig::default())
        .await
        .unwrap();
    let upstream = UpstreamTarget {
        url: format!("ws://127.0.0.1:{port}/v1/realtime?model=gpt-realtime"),
        api_key: Some(Secret::new("k")),
    };
    let stack = start_stack_with(mock, upstream, AudioMode::Pcmu, None).await;
    let began = std::time::Instant::now();
    let mut ws = start_raw_stream(&stack, &stream_sid(0x40de1)).await;
    assert!(closed_by_bridge(&mut ws, Duration::from_secs(8)).await);
    let took = began.elapsed();
    assert!(
        took < DEFAULT_MODEL_RECONNECT + Duration::from_secs(2),
        "fell back after {took:?}"
    );
    let metrics = stack.bridge.metrics();
    let failures = metrics.upstream_connect_failures.load(Relaxed);
    assert!(failures >= 3, "retried with backoff: {failures} attempts");
    assert_eq!(
        metrics.call_fallbacks(FallbackReason::ConnectFailed(ConnectFailure::Network)),
        1
    );
    assert!(
        eventually(Duration::from_secs(2), || stack
            .bridge
            .registry()
            .is_empty())
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_keeps_hanging_up_ends_in_the_fallback_never_a_loop() {
    // A "model" that accepts, reads the session.update, then hangs up, every time.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await {
                    let _ = ws.next().await;
                    let _ = ws.close(None).await;
                }
            });
        }
    });
    let mock = MockRealtimeServer::start(MockConfig::default())
        .await
        .unwrap();
    let upstream = UpstreamTarget {
        url: format!("ws://{addr}/v1/realtime"),
        api_key: Some(Secret::new("k")),
    };
    let stack = start_stack_with(mock, upstream, AudioMode::Pcmu, None).await;
    let mut ws = start_raw_stream(&stack, &stream_sid(0xd109)).await;
    assert!(closed_by_bridge(&mut ws, Duration::from_secs(10)).await);
    let metrics = stack.bridge.metrics();
    let lost = u64::from(MAX_MODEL_RECONNECTS) + 1;
    assert_eq!(metrics.upstream_disconnects.load(Relaxed), lost);
    assert_eq!(
        metrics.model_reconnects(SessionEnd::Dropped),
        u64::from(MAX_MODEL_RECONNECTS)
    );
    assert_eq!(metrics.call_fallbacks(FallbackReason::TooManyDrops), 1);
    assert!(
        eventually(Duration::from_secs(2), || stack
            .bridge
            .registry()
            .is_empty())
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_turns_readyz_503_refuses_new_calls_and_closes_live_ones_at_the_deadline() {
    let stack = start_stack(AudioMode::Pcmu, None).await;
    let base = stack.url.clone();
    let get = |path: &str| {
        let url: Url = base.join(path).unwrap();
        async move {
            http_client::send("GET", &url, &[], Vec::new())
                .await
                .unwrap()
                .status
        }
    };
    assert_eq!(get("/readyz").await, 200);
    assert_eq!(get("/healthz").await, 200);
    let live_sid = stream_sid(0x11fe);
    let mut live = start_raw_stream(&stack, &live_sid).await;
    assert!(
        eventually(Duration::from_secs(5), || stack.bridge.registry().len()
            == 1)
        .await
    );

    let Stack {
        bridge,
        mock: _mock,
        url,
        ..
    } = stack;
    let drain = tokio::spawn(bridge.drain_and_stop(Duration::from_millis(1_500)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(get("/readyz").await, 503);
    assert_eq!(get("/healthz").await, 200);
    // New work is refused while draining, the live call is not.
    let voice = url.join("/twilio/voice").unwrap();
    let params = vec![("CallSid".to_owned(), "CA9".to_owned())];
    let signature = compute_signature(TOKEN, voice.as_str(), &params);
    let response = http_client::send(
        "POST",
        &voice,
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("x-twilio-signature", &signature),
        ],
        b"CallSid=CA9".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 503);
    live.send(media_message(&live_sid, 2, "/w=="))
        .await
        .unwrap();

    assert!(
        closed_by_bridge(&mut live, Duration::from_secs(6)).await,
        "the live call was not closed"
    );
    let outcome = drain.await.unwrap();
    assert_eq!(
        outcome,
        voxrelay::http::DrainOutcome {
            calls_at_start: 1,
            calls_cancelled: 1
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_waits_for_a_call_that_ends_by_itself() {
    let stack = start_stack(AudioMode::Pcmu, None).await;
    let short_sid = stream_sid(0x5407);
    let mut live = start_raw_stream(&stack, &short_sid).await;
    assert!(
        eventually(Duration::from_secs(5), || stack.bridge.registry().len()
            == 1)
        .await
    );
    let Stack {
        bridge,
        mock: _mock,
        ..
    } = stack;
    let drain = tokio::spawn(bridge.drain_and_stop(Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stop = format!(
        r#"{{"event":"stop","sequenceNumber":"2","streamSid":"{short_sid}","stop":{{"accountSid":"{ACCOUNT_SID}","callSid":"{}"}}}}"#,
        call_sid_of(&short_sid)
    );
    live.send(Message::text(stop)).await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        outcome,
        voxrelay::http::DrainOutcome {
            calls_at_start: 1,
            calls_cancelled: 0
        }
    );
}
