//! Cost of the signature checks on a call's set-up path: Twilio's `X-Twilio-Signature` on the
//! voice webhook (a real webhook's form fields) and on the Media Streams handshake, and the
//! control plane's v1 request signature, signed by the bridge and verified by the control
//! plane (a fresh nonce each time, as in production).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use voxrelay::Secret;
use voxrelay::control::api::context_path_and_query;
use voxrelay::control::signing::{SigningKey, Verifier, sign};
use voxrelay::twilio::signature::{SignatureValidator, compute_signature};

const TOKEN: &str = "12345678901234567890123456789012";
const WEBHOOK_URL: &str = "https://voice.example.com/twilio/voice";
const STREAM_URL: &str = "wss://voice.example.com/twilio/media/m/148e21d1c34289";

/// The fields Twilio posts to a voice webhook for an inbound call.
fn webhook_params() -> Vec<(String, String)> {
    [
        ("AccountSid", "AC00000000000000000000000000000000"),
        ("ApiVersion", "2010-04-01"),
        ("CallSid", "CA0123456789abcdef0123456789abcdef"),
        ("CallStatus", "ringing"),
        ("Called", "+15550100001"),
        ("CalledCity", ""),
        ("CalledCountry", "US"),
        ("CalledState", "NY"),
        ("CalledZip", ""),
        ("Caller", "+15551230000"),
        ("CallerCity", "SPRINGFIELD"),
        ("CallerCountry", "US"),
        ("CallerState", "IL"),
        ("CallerZip", "62701"),
        ("Direction", "inbound"),
        ("From", "+15551230000"),
        ("FromCountry", "US"),
        ("To", "+15550100001"),
        ("ToCountry", "US"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn twilio(c: &mut Criterion) {
    let validator = SignatureValidator::new(Secret::new(TOKEN));
    let params = webhook_params();
    let webhook_signature = compute_signature(TOKEN, WEBHOOK_URL, &params);
    let stream_signature = compute_signature(TOKEN, STREAM_URL, &[]);
    let mut group = c.benchmark_group("twilio_signature");
    group.bench_function("voice_webhook_19_fields", |b| {
        b.iter(|| {
            assert!(validator.validate_form(
                black_box(WEBHOOK_URL),
                black_box(&params),
                &webhook_signature
            ))
        })
    });
    group.bench_function("media_stream_handshake", |b| {
        b.iter(|| assert!(validator.validate_websocket(black_box(STREAM_URL), &stream_signature)))
    });
    group.finish();
}

fn control_plane(c: &mut Criterion) {
    let key = SigningKey::new(
        "bridge-1",
        Secret::new("a-control-plane-secret-of-32-bytes"),
    );
    let path = context_path_and_query(
        "+15550100001",
        "+15551230000",
        "CA0123456789abcdef0123456789abcdef",
    );
    let now = 1_763_900_000;
    let mut group = c.benchmark_group("control_plane_signature");
    group.bench_function("sign_context_request", |b| {
        let mut nonce = 0u128;
        b.iter(|| {
            nonce += 1;
            sign(&key, now, nonce.to_le_bytes(), "GET", black_box(&path), b"")
        })
    });
    // Verification remembers every nonce; a fresh verifier per batch keeps the cache at a
    // production-like size instead of growing without end across iterations.
    group.bench_function("verify_context_request", |b| {
        let mut nonce = 0u128;
        b.iter_batched(
            || {
                nonce += 1;
                let headers = sign(&key, now, nonce.to_le_bytes(), "GET", &path, b"");
                (Verifier::new(vec![key.clone()]), headers)
            },
            |(mut verifier, headers)| {
                assert!(verifier.verify(now, &headers, "GET", &path, b"").is_ok());
            },
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, twilio, control_plane);
criterion_main!(benches);
