//! voxrelay: a realtime media bridge between Twilio Media Streams and realtime LLM voice APIs.
//!
//! The protocol logic (Twilio stream, upstream session, playback and barge-in) is sans-IO:
//! plain state machines fed messages and the current time. The async layer in [`session`] and
//! [`http`] owns the sockets and drives them, one task set per call.

pub mod audio_mode;
pub mod bench;
pub mod codec;
pub mod config;
pub mod control;
pub mod http;
pub mod logtext;
pub mod secret;
pub mod session;
pub mod twilio;
pub mod upstream;

#[cfg(test)]
mod testkit;

pub use audio_mode::AudioMode;
pub use secret::Secret;
