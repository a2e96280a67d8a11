//! The model's socket: [`connect`](mod@connect) dials a realtime provider. The protocols
//! themselves are sans-IO and live in `voxrelay-core` (`voxrelay_core::upstream`), re-exported
//! here.

pub mod connect;

pub use connect::{UpstreamSocket, connect};
pub use voxrelay_core::upstream::*;

// The mock realtime model is part of the simulator (`voxrelay-sim`); re-exported here so
// `crate::upstream::mock` keeps resolving (in unit tests too, where the simulator is a
// dev-dependency).
#[cfg(any(test, feature = "sim"))]
pub use voxrelay_sim::mock;
