//! The voice webhook against captured, replayed and re-split signatures, through real sockets
//! on 127.0.0.1: one signature buys at most one call and one pre-warm, pre-warms are capped,
//! another Twilio account is refused on the webhook and on the stream, and the URL a
//! signature is checked against never comes from the request's own headers.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use voxrelay::AudioMode;
use voxrelay::config::BridgeConfig;
use voxrelay::session::binding::STREAM_TOKEN_PARAMETER;
use voxrelay::session::metrics::{SignedRoute, WebhookRefusal};
use voxrelay::twilio::signature::compute_signature;
use voxrelay_sim::caller::{CallerConfig, parse_connect_stream, place_call};
use voxrelay_sim::http_client;
use voxrelay_sim::mock::MockConfig;

const OUR_ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
const OTHER_ACCOUNT: &str = "ACfedcba9876543210fedcba9876543210";

async fn stack_with(adjust: impl FnOnce(&mut BridgeConfig)) -> Stack {
    start_stack_adjusted(
        MockConfig::default(),
        AudioMode::Pcmu,
        Some("Hello from the test"),
        adjust,
    )
    .await
}

fn owned(params: &[(&str, &str)]) -> Vec<(String, String)> {
    params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A webhook as Twilio sends it (fields in sorted order, as the signature covers them).
fn twilio_form(account_sid: &str, call_sid: &str) -> Vec<(String, String)> {
    owned(&[
        ("AccountSid", account_sid),
        ("CallSid", call_sid),
        ("CallStatus", "ringing"),
        ("From", "+15550009999"),
        ("To", "+15550100001"),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_captured_signature_resplit_four_ways_yields_one_call() {
    let stack = stack_with(|_| {}).await;
    let sid = call_sid(0x7a11);
    let captured = twilio_form(ACCOUNT_SID, &sid);
    let signature = compute_signature(
        TOKEN,
        stack.url.join("/twilio/voice").unwrap().as_str(),
        &captured,
    );
    // Keys and values are concatenated without separators, so each of these is the same
    // signed string: `CallSid` swallows the fields after it one by one.
    let rest = ["CallStatusringing", "From+15550009999", "To+15550100001"];
    let mut forms = vec![captured.clone()];
    for swallowed in 1..=rest.len() {
        let merged = format!("{sid}{}", rest[..swallowed].concat());
        let mut form = owned(&[("AccountSid", ACCOUNT_SID), ("CallSid", &merged)]);
        form.extend(captured[2 + swallowed..].iter().cloned());
        forms.push(form);
    }
    let mut statuses = Vec::new();
    for form in &forms {
        statuses.push(post_voice_form(&stack, form, Some(&signature)).await.status);
    }
    let metrics = stack.bridge.metrics();
    // The signature is good for all four; the re-split CallSids are not CallSids.
    assert_eq!(metrics.signature_failures(SignedRoute::Voice), 0);
    assert_eq!(statuses, [200, 400, 400, 400]);
    assert_eq!(metrics.webhooks_refused(WebhookRefusal::BadCallSid), 3);
    assert_eq!(metrics.prewarm_started.load(Relaxed), 1);
    assert!(
        eventually(Duration::from_secs(5), || stack.mock.log().sessions().len()
            == 1)
        .await
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(stack.mock.log().sessions().len(), 1, "one paid session");

    // Moving text the other way (out of `AccountSid`, or into it) breaks its shape too.
    let mut short_account = captured.clone();
    short_account[0].1 = "AC0".to_owned();
    let response = post_voice_form(&stack, &short_account, None).await;
    assert_eq!(response.status, 400);
    assert_eq!(metrics.webhooks_refused(WebhookRefusal::BadAccountSid), 1);
    let mut no_account = captured;
    no_account.remove(0);
    assert_eq!(post_voice_form(&stack, &no_account, None).await.status, 400);
    assert_eq!(metrics.webhooks_refused(WebhookRefusal::BadAccountSid), 2);
}

/// The TwiML's stream URL and `<Parameter>`s, the stream token's value left out (it may carry
/// an expiry) but its presence kept.
fn stream_of(response: &http_client::HttpResponse) -> (String, Vec<(String, String)>) {
    let (url, mut parameters) =
        parse_connect_stream(&response.body).expect("a <Stream> in the TwiML");
    for (name, value) in &mut parameters {
        if name == STREAM_TOKEN_PARAMETER {
            value.clear();
        }
    }
    (url, parameters)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_webhook_gets_the_same_twiml_and_never_a_second_prewarm() {
    let stack =
        stack_with(|config| config.prewarm_unclaimed_after = Duration::from_millis(200)).await;
    let sid = call_sid(0xbeef);
    let form = twilio_form(ACCOUNT_SID, &sid);
    let first = post_voice_form(&stack, &form, None).await;
    assert_eq!(first.status, 200);
    // Twilio's retry, or a replay, while the preparation is pending.
    let again = post_voice_form(&stack, &form, None).await;
    assert_eq!(again.status, 200);
    assert_eq!(stream_of(&again), stream_of(&first), "the same TwiML");
    let metrics = stack.bridge.metrics();
    assert_eq!(metrics.webhook_repeats.load(Relaxed), 1);
    // No stream comes: the pre-warmed session expires unclaimed and is closed.
    assert_prewarm_expired_unclaimed(&stack).await;
    // A replay after the unclaimed timeout is still remembered: answered, nothing opened.
    let replay = post_voice_form(&stack, &form, None).await;
    assert_eq!(replay.status, 200);
    assert_eq!(stream_of(&replay), stream_of(&first));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(metrics.prewarm_started.load(Relaxed), 1);
    assert_eq!(stack.mock.log().sessions().len(), 1, "one paid session");
    assert_eq!(metrics.webhook_repeats.load(Relaxed), 2);
    assert_eq!(metrics.answered_calls.load(Relaxed), 1);
    let rendered = metrics.render();
    assert!(
        rendered.contains("voxrelay_webhook_repeats_total 2\n"),
        "{rendered}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prewarms_beyond_the_cap_start_cold_and_still_answer() {
    let stack = stack_with(|config| config.max_prewarms = 2).await;
    for n in 1..=2 {
        let response = post_voice_form(&stack, &twilio_form(ACCOUNT_SID, &call_sid(n)), None).await;
        assert_eq!(response.status, 200);
    }
    let metrics = stack.bridge.metrics();
    assert!(
        eventually(Duration::from_secs(5), || metrics
            .prewarms_active
            .load(Relaxed)
            == 2)
        .await
    );
    // Two sessions wait for streams that never come (unclaimed after 15 s): a third call is
    // answered and greeted, from a session it opens itself when its stream starts.
    let caller = CallerConfig {
        linger: Duration::from_millis(1500),
        ..CallerConfig::new(
            stack.url.clone(),
            stack.token.clone(),
            tone_mulaw(440.0, 200),
        )
    };
    let report = place_call(&caller).await.expect("a call beyond the cap");
    assert!(report.first_audio_after_start.is_some(), "greeted cold");
    assert_eq!(metrics.prewarm_capped.load(Relaxed), 1);
    assert_eq!(metrics.prewarm_started.load(Relaxed), 2);
    assert_eq!(metrics.prewarm_claimed.load(Relaxed), 0);
    assert_eq!(stack.mock.log().sessions().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_from_another_account_are_refused() {
    let stack = stack_with(|config| config.twilio_account_sid = Some(OUR_ACCOUNT.into())).await;
    let theirs = post_voice_form(&stack, &twilio_form(OTHER_ACCOUNT, &call_sid(1)), None).await;
    assert_eq!(theirs.status, 403);
    let metrics = stack.bridge.metrics();
    assert_eq!(metrics.webhooks_refused(WebhookRefusal::AccountMismatch), 1);
    assert_eq!(metrics.prewarm_started.load(Relaxed), 0);
    let ours = post_voice_form(&stack, &twilio_form(OUR_ACCOUNT, &call_sid(2)), None).await;
    assert_eq!(ours.status, 200);
    assert_eq!(metrics.webhooks_refused(WebhookRefusal::AccountMismatch), 1);
    // Without the setting any well-formed account is served.
    let open = stack_with(|_| {}).await;
    let response = post_voice_form(&open, &twilio_form(OTHER_ACCOUNT, &call_sid(3)), None).await;
    assert_eq!(response.status, 200);
}

/// Answers a webhook for call `n` from our account, then opens its signed media socket (with
/// the TwiML's parameters) and sends `connected` and a `start` claiming `account_sid`.
async fn start_stream_from(stack: &Stack, account_sid: &str, n: u64) -> RawSocket {
    let answer = post_voice_form(stack, &twilio_form(OUR_ACCOUNT, &call_sid(n)), None).await;
    assert_eq!(answer.status, 200);
    let (_, parameters) = parse_connect_stream(&answer.body).expect("TwiML");
    let custom: serde_json::Map<String, serde_json::Value> =
        parameters.into_iter().map(|(k, v)| (k, json!(v))).collect();
    let mut ws = open_media_socket(stack).await;
    let stream_sid = format!("MZ{n:032x}");
    ws.send(Message::text(
        json!({"event":"connected","protocol":"Call","version":"1.0.0"}).to_string(),
    ))
    .await
    .unwrap();
    ws.send(Message::text(
        json!({
            "event": "start", "sequenceNumber": "1", "streamSid": stream_sid,
            "start": {
                "accountSid": account_sid, "streamSid": stream_sid, "callSid": call_sid(n),
                "tracks": ["inbound"], "customParameters": custom,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
            }
        })
        .to_string(),
    ))
    .await
    .unwrap();
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_from_another_account_are_closed() {
    // Without pre-warm, a model session exists only for a stream that was let in.
    let stack = stack_with(|config| {
        config.twilio_account_sid = Some(OUR_ACCOUNT.into());
        config.prewarm = false;
    })
    .await;
    // Its TwiML (and stream token) came from our webhook; its `start` names another account.
    let mut theirs = start_stream_from(&stack, OTHER_ACCOUNT, 1).await;
    assert!(closed_by_bridge(&mut theirs, Duration::from_secs(5)).await);
    let metrics = stack.bridge.metrics();
    assert_eq!(metrics.streams_refused_account.load(Relaxed), 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        stack.mock.log().sessions().len(),
        0,
        "no model session for it"
    );

    let mut ours = start_stream_from(&stack, OUR_ACCOUNT, 2).await;
    assert!(
        eventually(Duration::from_secs(5), || stack.mock.log().sessions().len()
            == 1)
        .await,
        "a stream from our account reaches the model"
    );
    assert!(!closed_by_bridge(&mut ours, Duration::from_millis(300)).await);
    assert_eq!(metrics.streams_refused_account.load(Relaxed), 1);

    // A whole call from our account, webhook and stream.
    let caller = CallerConfig {
        linger: Duration::from_millis(1500),
        account_sid: OUR_ACCOUNT.to_owned(),
        ..CallerConfig::new(
            stack.url.clone(),
            stack.token.clone(),
            tone_mulaw(440.0, 200),
        )
    };
    let report = place_call(&caller).await.expect("our account's call");
    assert!(report.first_audio_after_start.is_some(), "greeted");
    assert_eq!(metrics.streams_refused_account.load(Relaxed), 1);
}

/// Sends a signed form POST to the bridge's socket with a `Host` and `X-Forwarded-Proto` of
/// the sender's choosing; returns the status code.
async fn post_with_host(stack: &Stack, host: &str, proto: &str, signature: &str) -> u16 {
    let body = format!(
        "AccountSid={ACCOUNT_SID}&CallSid=CA00000000000000000000000000000042&From=%2B15550009999&To=%2B15550100001"
    );
    let request = format!(
        "POST /twilio/voice HTTP/1.1\r\nHost: {host}\r\nX-Forwarded-Proto: {proto}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nX-Twilio-Signature: {signature}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut socket = tokio::net::TcpStream::connect(stack.bridge.local_addr())
        .await
        .unwrap();
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), socket.read_exact(&mut head))
        .await
        .expect("an answer")
        .unwrap();
    let status_line = String::from_utf8_lossy(&head);
    status_line[9..12].parse().expect("a status code")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signature_for_another_host_is_refused_whatever_the_host_header_says() {
    let stack = stack_with(|_| {}).await;
    let params = owned(&[
        ("AccountSid", ACCOUNT_SID),
        ("CallSid", "CA00000000000000000000000000000042"),
        ("From", "+15550009999"),
        ("To", "+15550100001"),
    ]);
    // Signed by Twilio for a staging bridge under the same auth token, sent here with the
    // headers that would make this bridge rebuild that URL.
    let staging = compute_signature(TOKEN, "https://staging.example.com/twilio/voice", &params);
    let status = post_with_host(&stack, "staging.example.com", "https", &staging).await;
    assert_eq!(status, 403);
    let metrics = stack.bridge.metrics();
    assert_eq!(metrics.signature_failures(SignedRoute::Voice), 1);
    assert_eq!(metrics.prewarm_started.load(Relaxed), 0);
    // The same request signed for this bridge's own public URL is served, whatever its Host.
    let ours = compute_signature(
        TOKEN,
        stack.url.join("/twilio/voice").unwrap().as_str(),
        &params,
    );
    let status = post_with_host(&stack, "staging.example.com", "https", &ours).await;
    assert_eq!(status, 200);

    // The Media Streams handshake likewise.
    let mut request = format!("ws://{}/twilio/media", stack.bridge.local_addr())
        .into_client_request()
        .unwrap();
    let staging = compute_signature(TOKEN, "wss://staging.example.com/twilio/media", &[]);
    let headers = request.headers_mut();
    headers.insert("host", "staging.example.com".parse().unwrap());
    headers.insert("x-forwarded-proto", "https".parse().unwrap());
    headers.insert("x-twilio-signature", staging.parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    assert_eq!(metrics.signature_failures(SignedRoute::Media), 1);
}
