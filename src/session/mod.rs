//! Per-call sessions: playback accounting and barge-in, the call engine, the registry.

pub mod playback;
