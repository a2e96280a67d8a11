//! The sans-IO half of the control plane, shared by the bridge (the client) and the reference
//! control plane (the server): [`api`], the wire types of the signed `/v1` API, and
//! [`signing`], its request signature scheme. Time and randomness are parameters; nothing here
//! touches a socket or reads a clock.
//!
//! Invariant: a control-plane secret only ever sits inside a [`crate::Secret`].

pub mod api;
pub mod signing;
