//! The HTTP face of the bridge: Twilio's webhooks, the Media Streams WebSocket, health and
//! readiness on the public listener; metrics on a private admin listener; the caps and
//! timeouts every connection, webhook and call is held to; and the lifecycle (start, drain,
//! stop) of the whole server.
//!
//! Every Twilio route checks `X-Twilio-Signature` before doing anything else; a failure is a
//! bare 403, a counter and a log line that names the route but never the token. A WebSocket
//! call is a task tracked here rather than by axum (whose upgrades are detached), so a drain
//! can wait for live calls.

pub mod fly;
pub mod limits;
mod listener;
mod routes;
mod server;
mod warn_rate;

pub use listener::STOP_GRACE;
pub use routes::{AT_CAPACITY_MESSAGE, AppState, FALLBACK_APOLOGY, admin_router, router};
pub use server::{Bridge, DrainOutcome, shutdown_signal, stop_budget};
pub use warn_rate::WARNINGS_PER_SECOND;
