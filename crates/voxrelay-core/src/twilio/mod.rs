//! Twilio: Media Streams messages, the stream state machine, request signatures, TwiML.
//!
//! Everything here is sans-IO. [`events`] owns the wire shapes of Media Streams messages and the
//! allocation-free writers for the outbound ones; [`ids`] checks the shape of Twilio's SIDs;
//! [`stream`] owns the order and identity of one stream; [`signature`] decides whether an HTTP
//! request or WebSocket handshake really comes from Twilio (the token never leaves a
//! [`crate::Secret`], comparisons are constant-time); [`twiml`] renders the
//! `<Connect><Stream>` answer that starts a stream. [`MAX_TWILIO_MESSAGE_BYTES`] caps every
//! message a stream sends.

pub mod events;
pub mod ids;
pub mod signature;
pub mod stream;
pub mod twiml;

/// A Twilio message larger than this closes the socket: real ones are under 1 KiB.
pub const MAX_TWILIO_MESSAGE_BYTES: usize = 64 * 1024;

pub use events::{InboundMessage, write_clear_json, write_mark_json, write_media_json_from_mulaw};
pub use signature::{SignatureValidator, candidate_urls, compute_signature};
pub use stream::{
    IgnoredReason, MalformedReason, Phase, StartInfo, StreamCounters, StreamError, StreamEvent,
    StreamMachine,
};
pub use twiml::connect_stream;
