//! The bridge's side of the control plane: the signed internal HTTP API (`/v1`) through which
//! the bridge fetches a tenant's context, reports calls and runs tools, and the reference control
//! plane verifies it (see `docs/control-plane-api.md`).
//!
//! Invariants: everything here is sans-IO (time and randomness are parameters, sockets live in
//! the async layer), and a control-plane secret only ever sits inside a [`crate::Secret`].

pub mod api;
pub mod seed;
pub mod signing;
pub mod tools;
