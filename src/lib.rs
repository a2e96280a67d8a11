//! voxrelay: a realtime media bridge between Twilio Media Streams and realtime LLM voice APIs.
//!
//! This crate is the bridge: [`http`] (listeners, routes, lifecycle), [`session`] (the call task
//! that drives the engine, its sockets, pre-warm, stream binding, the registry, reports and
//! metrics), [`upstream`] (dialling the model), [`control`] (the bridge's control-plane client) and
//! [`config`]. The protocol logic it builds on (codecs, the Twilio protocol, the provider
//! protocols, the call engine with playback and barge-in, the control-plane API types and signing)
//! is sans-IO and lives in `voxrelay-core`, re-exported here under its old paths: plain state
//! machines fed messages and the current time. The reference control plane
//! (`voxrelay-control-plane`) and the simulator (`voxrelay-sim`) are crates of their own, linked by
//! the binary through the `control-plane` and `sim` features; [`in_process`] is how the simulator
//! runs this bridge in its process.

pub mod config;
pub mod control;
pub mod http;
#[cfg(feature = "sim")]
pub mod in_process;
pub mod recording;
pub mod session;
pub mod upstream;

// The simulator is the `voxrelay-sim` crate (the `sim` feature); re-exported under its old
// path so `voxrelay::bench::…` keeps resolving.
#[cfg(feature = "sim")]
pub use voxrelay_sim as bench;

// The sans-IO modules live in `voxrelay-core`; re-exported under their old paths so
// `crate::codec::g711`, `voxrelay::twilio::…` and the like keep resolving.
pub use voxrelay_core::{AudioMode, Provider, Secret};
pub use voxrelay_core::{audio_mode, codec, logtext, provider, secret, twilio};

#[cfg(test)]
mod testkit {
    pub(crate) use voxrelay_core::testkit::Lcg;
}
