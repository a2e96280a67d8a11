//! Per-call sessions, the part that touches sockets and timers: the call task that drives the
//! engine ([`call`]) and its two sockets ([`legs`], [`fragments`]), the agent a call gets
//! ([`agent`]), stream binding ([`binding`]), pre-warm ([`prewarm`]), the registry of live
//! calls ([`registry`]), the call report ([`report`]) and the process-wide [`metrics`] (with the turn histograms,
//! [`turn_metrics`]). The
//! engine, model session, playback, outbound buffers and transcript are sans-IO and live in
//! `voxrelay-core`, re-exported below.

pub mod agent;
pub mod binding;
pub mod call;
pub mod fragments;
pub mod legs;
pub mod metrics;
pub mod prewarm;
pub mod registry;
pub mod report;
pub mod turn_metrics;

// The sans-IO parts live in `voxrelay-core`; re-exported so `crate::session::engine` and the
// rest keep their paths.
pub use voxrelay_core::session::{
    continuity, conversation, engine, model, playback, queue, tap, telemetry, transcript, turns,
};
