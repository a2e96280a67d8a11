//! The HTTP face of the bridge: Twilio's webhooks, the Media Streams WebSocket, health,
//! readiness and metrics, and the lifecycle (start, drain, stop) of the whole server.
//!
//! Every Twilio route checks `X-Twilio-Signature` before doing anything else; a failure is a
//! bare 403, a counter and a log line that names the route but never the token. A WebSocket
//! call is a task tracked here rather than by axum (whose upgrades are detached), so a drain
//! can wait for live calls.

pub mod fly;
mod routes;
mod server;

pub use routes::{AppState, router};
pub use server::{Bridge, DrainOutcome, shutdown_signal};
