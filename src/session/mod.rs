//! Per-call sessions: the call engine and its async driver, playback accounting and
//! barge-in, the registry of live calls, outbound queues and metrics.

pub mod agent;
pub mod binding;
pub mod call;
pub mod engine;
pub mod fragments;
pub mod legs;
pub mod metrics;
pub mod model;
pub mod playback;
pub mod prewarm;
pub mod queue;
pub mod registry;
pub mod report;
