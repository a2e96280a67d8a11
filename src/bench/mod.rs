//! Simulated calls: a scripted Twilio peer, the demo, and the latency harness.
//!
//! [`caller`] plays Twilio's side of a call against any bridge — the signed voice webhook,
//! the signed Media Streams handshake, paced 20 ms frames, and mark echoes timed like
//! Twilio's playback buffer — and reports what came back. [`demo`] runs a bridge, the mock
//! model and a few such calls in one process. [`harness`] is `voxrelay bench`: many light
//! callers ([`load`]) whose frames carry ids ([`watermark`]), the [`echo_model`] (optionally
//! over TLS, [`model_tls`]), the [`baseline`] relay as the floor, a lock-free progress board
//! ([`live`]), and the results ([`results`], [`report`]).

pub mod baseline;
pub mod caller;
pub mod demo;
pub mod echo_model;
pub mod first_audio;
pub mod harness;
pub mod http_client;
pub mod live;
pub mod load;
pub mod model_tls;
pub mod report;
pub mod results;
pub mod watermark;

/// A few seconds of synthetic speech, G.711 μ-law 8 kHz (see `fixtures/make-speech.sh`).
pub const SPEECH_FIXTURE: &[u8] = include_bytes!("../../fixtures/speech-8k-mulaw.raw");

/// Locks a record shared between a simulated peer and the harness: a panic in one peer must
/// not make the run's records unreadable.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
