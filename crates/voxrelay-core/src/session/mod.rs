//! One call's protocol logic, sans-IO: the call engine ([`engine::CallEngine`]) with its
//! single input and output surface, the model session it runs ([`model`]) and how it is
//! replaced when lost or old ([`continuity`]) with the conversation a successor is told
//! ([`conversation`]), playback pacing and barge-in ([`playback`]), the transcript a call
//! keeps ([`transcript`]), each leg's bounded outbound buffer ([`queue`]), what each turn cost
//! the caller ([`turns`]), the seam for observers of the call's audio ([`tap`]) and what the
//! call's audio sounded like ([`telemetry`]). The bridge's
//! call task drives them; nothing here reads a clock, opens a socket or spawns a task.

pub mod continuity;
pub mod conversation;
pub mod engine;
pub mod model;
pub mod playback;
pub mod queue;
pub mod tap;
pub mod telemetry;
pub mod transcript;
pub mod turns;
