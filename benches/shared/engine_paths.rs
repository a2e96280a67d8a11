//! What the engine benches (`frame_path`, `alloc`) share: the model paths a frame can take and
//! an engine started on one, with its stream begun and its model session open.

use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use voxrelay::session::engine::{CallEngine, Input, Resolved};
use voxrelay::session::model::ModelSession;
use voxrelay::session::playback::PlaybackConfig;
use voxrelay::upstream::SessionSettings;
use voxrelay::{AudioMode, Provider};

pub const STREAM_SID: &str = "MZ00000000000000000000000000000001";

/// The model side a frame takes: OpenAI in an audio mode, or Gemini Live (8 → 16 kHz up,
/// 24 → 8 kHz down).
#[derive(Clone, Copy)]
pub enum Path {
    OpenAi(AudioMode),
    Gemini,
}

impl Path {
    pub const ALL: [Path; 3] = [
        Path::OpenAi(AudioMode::Pcmu),
        Path::OpenAi(AudioMode::Pcm16),
        Path::Gemini,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Path::OpenAi(mode) => mode.as_str(),
            Path::Gemini => "gemini",
        }
    }

    fn settings(self) -> SessionSettings {
        match self {
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
        }
    }

    /// One 20 ms model audio message on this path (μ-law 8 kHz, or PCM16 24 kHz), after
    /// `engine` has been told of the response it belongs to.
    pub fn model_delta(self, engine: &mut CallEngine, now: Instant) -> String {
        let audio: Vec<u8> = match self {
            Path::OpenAi(AudioMode::Pcmu) => vec![0xD5; 160],
            _ => (0..480i16).flat_map(|n| (n * 40).to_le_bytes()).collect(),
        };
        match self {
            Path::OpenAi(_) => {
                engine
                    .handle(
                        now,
                        Input::Model(r#"{"type":"response.created","response":{"id":"resp_1"}}"#),
                    )
                    .unwrap();
                format!(
                    r#"{{"type":"response.output_audio.delta","event_id":"e","response_id":"resp_1","item_id":"item_1","output_index":0,"content_index":0,"delta":"{}"}}"#,
                    BASE64.encode(&audio)
                )
            }
            // Gemini names no turn in its deltas: the first opens the turn the others continue.
            Path::Gemini => {
                let delta = format!(
                    r#"{{"serverContent":{{"modelTurn":{{"parts":[{{"inlineData":{{"mimeType":"audio/pcm;rate=24000","data":"{}"}}}}]}}}}}}"#,
                    BASE64.encode(&audio)
                );
                engine.handle(now, Input::Model(&delta)).unwrap();
                while engine.poll_output().is_some() {}
                delta
            }
        }
    }
}

/// Twilio's `start` for the bench's stream.
pub fn start_message() -> String {
    format!(
        r#"{{"event":"start","sequenceNumber":"1","streamSid":"{STREAM_SID}","start":{{"accountSid":"AC00000000000000000000000000000001","streamSid":"{STREAM_SID}","callSid":"CA00000000000000000000000000000001","tracks":["inbound"],"customParameters":{{}},"mediaFormat":{{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}}}}"#
    )
}

/// An engine whose stream has started and whose model session on `path` is open.
pub fn started_engine(path: Path, now: Instant) -> CallEngine {
    let mut engine = CallEngine::new(PlaybackConfig::default());
    engine
        .handle(
            now,
            Input::Twilio(r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#),
        )
        .unwrap();
    engine.handle(now, Input::Twilio(&start_message())).unwrap();
    engine
        .handle(
            now,
            Input::ContextResolved(Resolved::session(ModelSession::new(path.settings(), false))),
        )
        .unwrap();
    engine.handle(now, Input::ModelConnected).unwrap();
    while engine.poll_output().is_some() {}
    engine
}
