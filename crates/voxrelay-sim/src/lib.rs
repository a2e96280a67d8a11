//! voxrelay-sim: everything that plays the other side of a call, for the demo, the tests and
//! the benchmark. None of it belongs in a production bridge, so it is a crate of its own that
//! the bridge binary links only with its `sim` feature.
//!
//! The peers: [`caller`] plays Twilio's side of a call against any bridge (the signed voice
//! webhook, the signed Media Streams handshake, paced 20 ms frames, mark echoes timed like
//! Twilio's playback buffer) and reports what came back; [`mock`] is a scripted realtime model
//! (`serve --mock-model`, the demo, the tests); [`echo_model`] is the benchmark's model, which
//! echoes caller audio and records when each byte arrived (optionally over TLS,
//! [`model_tls`]). The runs: [`demo`] (`voxrelay demo`), [`harness`] with [`load`] (whose
//! frames carry ids: [`watermark`] in `pcmu`, [`tone_ids`] in `pcm16`), a lock-free progress board ([`live`]), [`results`] and
//! [`report`] (`voxrelay bench`),
//! [`first_audio`] (`bench --first-audio`) and [`baseline`] (the do-nothing relay that measures
//! the machine's floor, on tokio or, with the `io-uring` feature, on one io_uring). [`dial`] dials a model with the bridge's settings; [`http_client`] is
//! a minimal HTTP/1 client for webhooks and scrapes.
//!
//! The simulator depends on `voxrelay-core` and `voxrelay-control-plane`, never on the bridge:
//! where it needs a bridge in its own process it asks the binary for one through
//! [`launcher::BridgeLauncher`].

pub mod baseline;
pub mod caller;
pub mod demo;
pub mod dial;
pub mod echo_model;
pub mod first_audio;
#[cfg(test)]
mod gemini_test_client;
pub mod harness;
pub mod http_client;
pub mod launcher;
pub mod live;
pub mod load;
pub mod mock;
pub mod model_tls;
pub mod report;
pub mod results;
pub mod tone_ids;
pub mod turn_figures;
pub mod watermark;

/// A few seconds of synthetic speech, G.711 μ-law 8 kHz (see `fixtures/make-speech.sh`).
pub const SPEECH_FIXTURE: &[u8] = include_bytes!("../../../fixtures/speech-8k-mulaw.raw");

/// Locks a record shared between a simulated peer and the harness: a panic in one peer must
/// not make the run's records unreadable.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
