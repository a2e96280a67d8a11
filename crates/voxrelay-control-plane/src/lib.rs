//! The reference control plane (`voxrelay control-plane`; see `docs/control-plane-api.md`):
//! the service that answers the bridge's signed `/v1` API with tenants, call history and tools.
//!
//! [`hours`] (opening hours) and [`tools`] (the tools' arguments and answers) are sans-IO;
//! [`seed`] (the tenants file) is parsing too, apart from reading the few hold prompt files a
//! seed names (bounded, at start only);
//! [`store`] is SQLite, blocking, called from the blocking pool; [`server`] is the signed HTTP
//! API. The wire types and the signature scheme it shares with the bridge live in
//! `voxrelay_core::control`. It depends on `voxrelay-core` only, never on the bridge, so the
//! bridge's production build carries neither it nor SQLite.
//!
//! Invariant: a control-plane secret only ever sits inside a `voxrelay_core::Secret`.

pub mod hours;
pub mod seed;
pub mod server;
pub mod store;
pub mod tools;

#[cfg(test)]
mod test_dir;
