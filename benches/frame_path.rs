//! The bridge's per-frame CPU work without sockets: one Twilio `media` message in →
//! the model's `input_audio_buffer.append` out (uplink), and one 20 ms model audio delta in →
//! Twilio `media` + `mark` out (downlink), through the real call engine, on every path: OpenAI
//! in `pcmu` and `pcm16`, and Gemini Live (8 → 16 kHz up, 24 → 8 kHz down).
//!
//! Set against the end-to-end added latency the demo reports, this separates the bridge's
//! own computation from task wake-ups and socket system calls. `telemetry_20ms` measures the
//! audio telemetry alone (it runs inside both paths above), for its share of them.

use std::hint::black_box;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use voxrelay::session::engine::{CallEngine, Input, Output};
use voxrelay::session::telemetry::CallTelemetry;

#[path = "shared/engine_paths.rs"]
mod engine_paths;
use engine_paths::{Path, STREAM_SID, started_engine};

/// Takes the engine's outputs as the driver does, keeping each written text for reuse.
fn take_texts(engine: &mut CallEngine, spent: &mut Vec<String>) {
    while let Some(output) = engine.poll_output() {
        if let Output::ToModel(out) | Output::ToTwilio(out) = output {
            spent.push(out.text);
        }
    }
}

fn uplink(c: &mut Criterion) {
    let mut group = c.benchmark_group("uplink_frame");
    group.throughput(Throughput::Elements(1));
    let payload = BASE64.encode(
        (0..160u32)
            .map(|i| (i * 37 % 256) as u8)
            .collect::<Vec<_>>(),
    );
    for path in Path::ALL {
        let now = Instant::now();
        let mut engine = started_engine(path, now);
        let mut sequence = 2u64;
        let mut text = String::new();
        let mut spent = Vec::with_capacity(4);
        group.bench_function(path.name(), |b| {
            b.iter(|| {
                // A fresh sequence number each frame, as Twilio sends them.
                text.clear();
                text.push_str(r#"{"event":"media","sequenceNumber":""#);
                text.push_str(itoa(sequence).as_str());
                text.push_str(
                    r#"","media":{"track":"inbound","chunk":"1","timestamp":"20","payload":""#,
                );
                text.push_str(&payload);
                text.push_str(r#""},"streamSid":""#);
                text.push_str(STREAM_SID);
                text.push_str(r#""}"#);
                sequence += 1;
                engine.handle(now, Input::Twilio(black_box(&text))).unwrap();
                // As the call task does: send, then hand the buffer back.
                take_texts(&mut engine, &mut spent);
                for text in spent.drain(..) {
                    engine.recycle_model(text);
                }
            })
        });
    }
    group.finish();
}

fn itoa(value: u64) -> String {
    value.to_string()
}

fn downlink(c: &mut Criterion) {
    let mut group = c.benchmark_group("downlink_20ms_delta");
    group.throughput(Throughput::Elements(1));
    for path in Path::ALL {
        let start = Instant::now();
        let mut engine = started_engine(path, start);
        let delta = path.model_delta(&mut engine, start);
        let mut tick = 0u32;
        group.bench_function(path.name(), |b| {
            b.iter(|| {
                // Real time advances 20 ms per delta, so the pacer sends one chunk each time.
                tick += 1;
                let now = start + Duration::from_millis(20) * tick;
                engine.handle(now, Input::Model(black_box(&delta))).unwrap();
                while let Some(output) = engine.poll_output() {
                    black_box(output);
                }
            })
        });
    }
    group.finish();
}

/// The audio telemetry alone, per 20 ms of call: one caller frame and one agent chunk (played
/// 120 ms ahead, as the pacer's lead places it), through `CallTelemetry` as the engine's tap
/// points feed it. Set against `uplink_frame` + `downlink_20ms_delta`, its share of the
/// per-frame path (the engine runs it inside both).
fn telemetry(c: &mut Criterion) {
    let mut group = c.benchmark_group("telemetry_20ms");
    group.throughput(Throughput::Elements(1));
    // Speech-like levels: a loud and a quiet half, so steps are both speech and silence.
    let caller: Vec<u8> = (0..160u32).map(|i| (i * 37 % 256) as u8).collect();
    let agent: Vec<u8> = (0..160u32).map(|i| (i * 91 % 256) as u8 | 0x40).collect();
    let frame = Duration::from_millis(20);
    let lead = Duration::from_millis(120);
    let mut telemetry = CallTelemetry::new();
    let mut at = Duration::ZERO;
    group.bench_function("caller_frame_and_agent_chunk", |b| {
        b.iter(|| {
            at += frame;
            telemetry.agent_audio(at + lead, black_box(&agent));
            telemetry.caller_audio(at, black_box(&caller));
        })
    });
    let mut telemetry = CallTelemetry::new();
    let mut at = Duration::ZERO;
    group.bench_function("caller_frame_only", |b| {
        b.iter(|| {
            at += frame;
            telemetry.caller_audio(at, black_box(&caller));
        })
    });
    // The summary a call's end takes once (report and metrics).
    group.bench_function("summary_at_call_end", |b| {
        b.iter(|| black_box(telemetry.summary()))
    });
    group.finish();
}

criterion_group!(benches, uplink, downlink, telemetry);
criterion_main!(benches);
