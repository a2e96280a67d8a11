//! voxrelay: a realtime media bridge between Twilio Media Streams and realtime LLM voice APIs.
//!
//! The protocol logic (Twilio stream, upstream session, playback and barge-in) is sans-IO:
//! plain state machines fed messages and the current time. The async layer in [`session`] and
//! [`http`] owns the sockets and drives them, one task set per call.

pub mod config;
pub mod control;
pub mod http;
#[cfg(feature = "sim")]
pub mod in_process;
pub mod session;
pub mod upstream;

// The simulator is the `voxrelay-sim` crate (the `sim` feature); re-exported under its old
// path so `voxrelay::bench::…` keeps resolving.
#[cfg(feature = "sim")]
pub use voxrelay_sim as bench;

// The sans-IO modules live in `voxrelay-core`; re-exported under their old paths so
// `crate::codec::g711`, `voxrelay::twilio::…` and the like keep resolving.
pub use voxrelay_core::{AudioMode, Secret};
pub use voxrelay_core::{audio_mode, codec, logtext, secret, twilio};

#[cfg(test)]
mod testkit {
    pub(crate) use voxrelay_core::testkit::Lcg;
}
