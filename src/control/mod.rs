//! The control plane: the signed internal HTTP API (`/v1`) through which the bridge fetches a
//! tenant's context, reports calls and runs tools, and the reference control plane that answers
//! it (`voxrelay control-plane`; see `docs/control-plane-api.md`).
//!
//! Invariants: [`api`], [`signing`], [`seed`] and [`tools`] are sans-IO (time and randomness
//! are parameters); the reference control plane's I/O lives in [`store`] (SQLite, blocking) and
//! [`server`] (HTTP); a control-plane secret only ever sits inside a [`crate::Secret`].

pub mod api;
pub mod seed;
pub mod server;
pub mod signing;
pub mod store;
pub mod tools;
