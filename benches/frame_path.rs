//! The bridge's per-frame CPU work without sockets: one Twilio `media` message in →
//! the model's `input_audio_buffer.append` out (uplink), and one 20 ms model audio delta in →
//! Twilio `media` + `mark` out (downlink), through the real call engine, on every path: OpenAI
//! in `pcmu` and `pcm16`, and Gemini Live (8 → 16 kHz up, 24 → 8 kHz down).
//!
//! Set against the end-to-end added latency the demo reports, this separates the bridge's
//! own computation from task wake-ups and socket system calls.

use std::hint::black_box;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use voxrelay::session::engine::{CallEngine, Input, Output, Resolved};
use voxrelay::session::model::ModelSession;
use voxrelay::session::playback::PlaybackConfig;
use voxrelay::upstream::SessionSettings;
use voxrelay::{AudioMode, Provider};

const STREAM_SID: &str = "MZ00000000000000000000000000000001";

/// Takes the engine's outputs as the driver does, keeping each written text for reuse.
fn take_texts(engine: &mut CallEngine, spent: &mut Vec<String>) {
    while let Some(output) = engine.poll_output() {
        if let Output::ToModel(out) | Output::ToTwilio(out) = output {
            spent.push(out.text);
        }
    }
}

/// The model side a frame takes.
#[derive(Clone, Copy)]
enum Path {
    OpenAi(AudioMode),
    Gemini,
}

impl Path {
    const ALL: [Path; 3] = [
        Path::OpenAi(AudioMode::Pcmu),
        Path::OpenAi(AudioMode::Pcm16),
        Path::Gemini,
    ];

    fn name(self) -> &'static str {
        match self {
            Path::OpenAi(mode) => mode.as_str(),
            Path::Gemini => "gemini",
        }
    }
}

fn started_engine(path: Path, now: Instant) -> CallEngine {
    let settings = match path {
        Path::OpenAi(mode) => SessionSettings {
            audio_mode: mode,
            greeting: None,
            ..SessionSettings::default()
        },
        Path::Gemini => SessionSettings {
            provider: Provider::Gemini,
            greeting: None,
            ..SessionSettings::default()
        },
    };
    let mut engine = CallEngine::new(PlaybackConfig::default());
    let start = format!(
        r#"{{"event":"start","sequenceNumber":"1","streamSid":"{STREAM_SID}","start":{{"accountSid":"AC00000000000000000000000000000001","streamSid":"{STREAM_SID}","callSid":"CA00000000000000000000000000000001","tracks":["inbound"],"customParameters":{{}},"mediaFormat":{{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}}}}"#
    );
    engine
        .handle(
            now,
            Input::Twilio(r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#),
        )
        .unwrap();
    engine.handle(now, Input::Twilio(&start)).unwrap();
    engine
        .handle(
            now,
            Input::ContextResolved(Resolved::session(ModelSession::new(settings, false))),
        )
        .unwrap();
    engine.handle(now, Input::ModelConnected).unwrap();
    while engine.poll_output().is_some() {}
    engine
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
        // 20 ms of model audio: μ-law 8 kHz, or PCM16 24 kHz (OpenAI's pcm16 and Gemini's).
        let audio: Vec<u8> = match path {
            Path::OpenAi(AudioMode::Pcmu) => vec![0xD5; 160],
            _ => (0..480i16).flat_map(|n| (n * 40).to_le_bytes()).collect(),
        };
        let delta = match path {
            Path::OpenAi(_) => {
                engine
                    .handle(
                        start,
                        Input::Model(r#"{"type":"response.created","response":{"id":"resp_1"}}"#),
                    )
                    .unwrap();
                format!(
                    r#"{{"type":"response.output_audio.delta","event_id":"e","response_id":"resp_1","item_id":"item_1","output_index":0,"content_index":0,"delta":"{}"}}"#,
                    BASE64.encode(&audio)
                )
            }
            // The first delta opens the model's turn; the measured ones continue it.
            Path::Gemini => format!(
                r#"{{"serverContent":{{"modelTurn":{{"parts":[{{"inlineData":{{"mimeType":"audio/pcm;rate=24000","data":"{}"}}}}]}}}}}}"#,
                BASE64.encode(&audio)
            ),
        };
        if let Path::Gemini = path {
            engine.handle(start, Input::Model(&delta)).unwrap();
            while engine.poll_output().is_some() {}
        }
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

criterion_group!(benches, uplink, downlink);
criterion_main!(benches);
