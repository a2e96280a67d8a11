//! The bridge's side of the control plane: the signed internal HTTP API (`/v1`) through which
//! the bridge fetches a tenant's context, reports calls and runs tools (see
//! `docs/control-plane-api.md`).
//!
//! [`api`] (the wire types) and [`signing`] (the request signature scheme) are sans-IO, shared
//! with the reference control plane, and live in `voxrelay-core`. Here: [`client`] (one pooled,
//! signed HTTP client), [`directory`] (dialled number to tenant context, within a time budget,
//! with a cache and a fallback), [`reports`] (call reports with retry, a disk spool and resend)
//! and [`tool_calls`] (a model's function call run on the control plane; a failure is an
//! output, never the end of the call). The reference control plane that answers it (`voxrelay
//! control-plane`: seed, tools, SQLite store, server) is the `voxrelay-control-plane` crate,
//! re-exported here with the `control-plane` feature.
//!
//! Invariant: a control-plane secret only ever sits inside a [`crate::Secret`].

pub mod client;
pub mod directory;
pub mod reports;
pub mod tool_calls;

// The sans-IO wire types and signature scheme live in `voxrelay-core`.
pub use voxrelay_core::control::{api, signing};

// The reference control plane is a crate of its own (`voxrelay-control-plane`, behind the
// `control-plane` feature); re-exported under its old paths.
#[cfg(feature = "control-plane")]
pub use voxrelay_control_plane::{seed, server, store, tools};
