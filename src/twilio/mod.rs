//! Twilio: Media Streams messages, the stream state machine, request signatures, TwiML.
