//! The control plane: the signed internal HTTP API (`/v1`) through which the bridge fetches a
//! tenant's context, reports calls and runs tools, and the reference control plane that answers
//! it (`voxrelay control-plane`; see `docs/control-plane-api.md`).
//!
//! Three layers. [`api`] (the wire types) and [`signing`] (the request signature scheme) are
//! sans-IO and shared by both sides: time and randomness are parameters, nothing touches a
//! socket. The bridge's side: [`client`] (one pooled, signed HTTP client), [`directory`]
//! (dialled number to tenant context, within a time budget, with a cache and a fallback),
//! [`reports`] (call reports with retry, a disk spool and resend) and [`tool_calls`] (a
//! model's function call run on the control plane; a failure is an output, never the end of
//! the call). The reference control plane's side: [`seed`] and [`tools`] (sans-IO), [`store`]
//! (SQLite, blocking) and [`server`] (HTTP).
//!
//! Invariant: a control-plane secret only ever sits inside a [`crate::Secret`].

pub mod client;
pub mod directory;
pub mod reports;
pub mod seed;
pub mod server;
pub mod store;
pub mod tool_calls;
pub mod tools;

// The sans-IO wire types and signature scheme live in `voxrelay-core`.
pub use voxrelay_core::control::{api, signing};
