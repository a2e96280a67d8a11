//! voxrelay-core: the sans-IO protocol logic of voxrelay, with no runtime, no sockets and no
//! clock reads, so the boundary is one the compiler checks (a module here cannot reach tokio).
//!
//! It owns the audio codecs ([`codec`]), the Twilio Media Streams protocol ([`twilio`]: wire
//! shapes, the stream state machine, request signatures, TwiML), the realtime-provider seam
//! and its protocols with their factory ([`upstream`]), one call's engine, model session,
//! playback and barge-in, outbound buffers and transcript ([`session`]), the control-plane API
//! types and request signing ([`control`]), text safe for log lines ([`logtext`]), the audio
//! mode spoken with the model ([`AudioMode`]), the provider that answers ([`Provider`]), secrets that never print ([`Secret`]), and the
//! small shared pieces: the one JSON string writer ([`json`]), unix time from a clock reading
//! ([`time`]) and lowercase hex ([`lowerhex`]). Time is always a parameter (`now`, a
//! `SystemTime` the caller read) and randomness is passed in (nonces), so every state machine
//! here replays exactly in tests. The bridge (`voxrelay`), the reference control plane and the
//! simulator build on it.

pub mod audio_mode;
pub mod codec;
pub mod control;
pub mod json;
pub mod logtext;
pub mod lowerhex;
pub mod provider;
pub mod secret;
pub mod session;
pub mod testkit;
pub mod time;
pub mod twilio;
pub mod upstream;

pub use audio_mode::AudioMode;
pub use provider::Provider;
pub use secret::Secret;
