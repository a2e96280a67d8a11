//! The bridge's side of the control plane: the signed internal HTTP API (`/v1`) through which
//! the bridge fetches a tenant's context, reports calls and runs tools, and the reference control
//! plane verifies it (see `docs/control-plane-api.md`).
//!
//! Two layers. [`api`] (the wire types) and [`signing`] (the request signature scheme) are
//! sans-IO: time and randomness are parameters, nothing touches a socket, and both sides of the
//! API share them. The async layer on top is the bridge's alone: [`client`] (one pooled, signed
//! HTTP client), [`directory`] (dialled number to tenant context, within a time budget, with
//! a cache and a fallback), [`reports`] (call reports with retry, a disk spool and resend) and
//! [`tool_calls`] (a model's function call run on the control plane; a failure is an output, never
//! the end of the call).
//!
//! Invariant: a control-plane secret only ever sits inside a [`crate::Secret`].

pub mod api;
pub mod client;
pub mod directory;
pub mod reports;
pub mod signing;
pub mod tool_calls;
