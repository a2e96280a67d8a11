//! Per-call sessions: the call engine and its async driver, playback accounting and
//! barge-in, the registry of live calls, outbound queues and metrics.

pub mod agent;
pub mod binding;
pub mod call;
pub mod fragments;
pub mod legs;
pub mod metrics;
pub mod prewarm;
pub mod registry;
pub mod report;

// The sans-IO parts live in `voxrelay-core`; re-exported so `crate::session::engine` and the
// rest keep their paths.
pub use voxrelay_core::session::{engine, model, playback, queue, transcript};
