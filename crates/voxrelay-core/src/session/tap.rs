//! The call's audio as the caller and the agent heard it, for observers beside the media path.
//!
//! A [`MediaTap`] is handed every caller frame as Twilio sent it and every agent chunk at the
//! time the caller starts hearing it, both 8 kHz μ-law on one clock (the time since the
//! stream's `start`, on the bridge's monotonic clock), and every barge-in cut. The call
//! recorder and the audio telemetry are taps. A tap runs on the call's task, inside the
//! engine: it must cost at most a copy per frame (a recorder hands the bytes to its own
//! thread through a bounded queue) and must never block or fail the call.

use std::time::Duration;

/// An observer of one call's audio. Positions are times since the stream's `start`.
pub trait MediaTap: Send {
    /// One caller frame (μ-law, usually 160 bytes: 20 ms), read from Twilio at `at`. Frames
    /// come in order and are contiguous audio; `at` carries the network's jitter.
    fn caller_audio(&mut self, at: Duration, mulaw: &[u8]);

    /// One agent chunk (μ-law, a whole number of 20 ms frames) sent to Twilio, which the
    /// caller hears from `play_at` (the playback pacer's estimate: after the audio already
    /// queued at Twilio, never before it was sent). Chunks come in playback order.
    fn agent_audio(&mut self, play_at: Duration, mulaw: &[u8]);

    /// Barge-in: Twilio was told to `clear` at `at`, so agent audio placed from `at` on was
    /// never heard. The caller heard exactly the agent audio before `at`.
    fn agent_cut(&mut self, at: Duration);
}
