//! Reassembly of fragmented WebSocket messages under a size cap that holds while they arrive.
//!
//! RFC 6455 lets a peer split one message into a first frame and any number of continuation
//! frames. A collector that joins them and checks the size only at the end lets a peer that
//! never sends the final frame grow a call's memory without bound. [`Reassembly`] counts every
//! fragment against its cap as it arrives and refuses the message as soon as the running total
//! passes it, before copying the fragment. Invariants: at most `cap` bytes are ever held (text;
//! a binary message is only counted, never kept, as no peer of ours sends one); an unfragmented
//! text frame's payload is handed on as it came, without a copy; a continuation without a first
//! frame, or a new message inside a fragmented one, is a protocol error. Control frames never
//! reach it (they may interleave with fragments and are the caller's business). Sans-IO: frames
//! in, messages out.

use bytes::BytesMut;
use fastwebsockets::{OpCode, Payload};

/// What a data frame completed.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    /// A whole text message (not yet checked to be UTF-8).
    Text(BytesMut),
    /// A whole binary message; its bytes were not kept.
    Binary { len: usize },
}

/// Why the frames cannot make a message; each ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FragmentError {
    #[error("message over {cap} bytes")]
    Oversized { cap: usize },
    #[error("continuation frame without a message to continue")]
    UnexpectedContinuation,
    #[error("a new message began inside a fragmented one")]
    Interleaved,
}

/// The message being assembled, if any.
#[derive(Debug)]
enum Partial {
    Text(BytesMut),
    Binary { len: usize },
}

/// One connection's reassembly state.
#[derive(Debug)]
pub struct Reassembly {
    cap: usize,
    partial: Option<Partial>,
}

impl Reassembly {
    /// Messages of more than `cap` bytes are refused.
    pub fn new(cap: usize) -> Self {
        Self { cap, partial: None }
    }

    /// Bytes of the message being assembled so far.
    pub fn pending_len(&self) -> usize {
        match &self.partial {
            None => 0,
            Some(Partial::Text(bytes)) => bytes.len(),
            Some(Partial::Binary { len }) => *len,
        }
    }

    /// Feeds one data frame (`Text`, `Binary` or `Continuation`; any other opcode is ignored).
    /// Returns the message it completes, if any.
    pub fn push(
        &mut self,
        fin: bool,
        opcode: OpCode,
        payload: Payload<'_>,
    ) -> Result<Option<Message>, FragmentError> {
        match opcode {
            OpCode::Text | OpCode::Binary if self.partial.is_some() => {
                self.partial = None;
                Err(FragmentError::Interleaved)
            }
            OpCode::Text | OpCode::Binary => {
                self.check(payload.len())?;
                let binary = opcode == OpCode::Binary;
                match (fin, binary) {
                    (true, false) => Ok(Some(Message::Text(into_bytes(payload)))),
                    (true, true) => Ok(Some(Message::Binary { len: payload.len() })),
                    (false, false) => {
                        // Never more than the cap: grown by what arrives, up to it.
                        let mut text =
                            BytesMut::with_capacity(payload.len().max(1024).min(self.cap));
                        text.extend_from_slice(&payload);
                        self.partial = Some(Partial::Text(text));
                        Ok(None)
                    }
                    (false, true) => {
                        self.partial = Some(Partial::Binary { len: payload.len() });
                        Ok(None)
                    }
                }
            }
            OpCode::Continuation => {
                if self.partial.is_none() {
                    return Err(FragmentError::UnexpectedContinuation);
                }
                let total = self.pending_len().saturating_add(payload.len());
                if total > self.cap {
                    self.partial = None;
                    return Err(FragmentError::Oversized { cap: self.cap });
                }
                match self.partial.as_mut() {
                    Some(Partial::Text(text)) => text.extend_from_slice(&payload),
                    Some(Partial::Binary { len }) => *len = total,
                    None => {}
                }
                if !fin {
                    return Ok(None);
                }
                Ok(self.partial.take().map(|partial| match partial {
                    Partial::Text(text) => Message::Text(text),
                    Partial::Binary { len } => Message::Binary { len },
                }))
            }
            OpCode::Close | OpCode::Ping | OpCode::Pong => Ok(None),
        }
    }

    fn check(&self, len: usize) -> Result<(), FragmentError> {
        if len > self.cap {
            Err(FragmentError::Oversized { cap: self.cap })
        } else {
            Ok(())
        }
    }
}

/// The payload as owned bytes: the reader's own buffer when it is one (no copy).
fn into_bytes(payload: Payload<'_>) -> BytesMut {
    match payload {
        Payload::Bytes(bytes) => bytes,
        other => BytesMut::from(&other[..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(data: &[u8]) -> Payload<'static> {
        Payload::Bytes(BytesMut::from(data))
    }

    #[test]
    fn an_unfragmented_text_frame_passes_through_without_a_copy() {
        let mut reassembly = Reassembly::new(16);
        let payload = BytesMut::from(&b"hello"[..]);
        let address = payload.as_ptr();
        let Ok(Some(Message::Text(text))) =
            reassembly.push(true, OpCode::Text, Payload::Bytes(payload))
        else {
            panic!("a whole message");
        };
        assert_eq!(text.as_ptr(), address, "the same buffer");
        assert_eq!(reassembly.pending_len(), 0);
    }

    #[test]
    fn fragments_join_in_order_with_control_frames_between() {
        let mut reassembly = Reassembly::new(16);
        assert_eq!(reassembly.push(false, OpCode::Text, bytes(b"ab")), Ok(None));
        assert_eq!(reassembly.push(true, OpCode::Ping, bytes(b"p")), Ok(None));
        assert_eq!(
            reassembly.push(false, OpCode::Continuation, bytes(b"cd")),
            Ok(None)
        );
        assert_eq!(reassembly.pending_len(), 4);
        assert_eq!(
            reassembly.push(true, OpCode::Continuation, bytes(b"ef")),
            Ok(Some(Message::Text(BytesMut::from(&b"abcdef"[..]))))
        );
        assert_eq!(reassembly.pending_len(), 0);
        assert_eq!(
            reassembly.push(false, OpCode::Binary, bytes(b"xyz")),
            Ok(None)
        );
        assert_eq!(
            reassembly.push(true, OpCode::Continuation, bytes(b"w")),
            Ok(Some(Message::Binary { len: 4 }))
        );
    }

    #[test]
    fn the_cap_holds_while_fragments_arrive() {
        let cap = 64 * 1024;
        for first in [OpCode::Text, OpCode::Binary] {
            let mut reassembly = Reassembly::new(cap);
            let chunk = vec![b'x'; 1000];
            assert_eq!(reassembly.push(false, first, bytes(&chunk)), Ok(None));
            let mut sent = chunk.len();
            let error = loop {
                match reassembly.push(false, OpCode::Continuation, bytes(&chunk)) {
                    Ok(None) => sent += chunk.len(),
                    Ok(Some(message)) => panic!("completed {message:?}"),
                    Err(error) => break error,
                }
                assert!(reassembly.pending_len() <= cap);
                assert!(sent < 10 * cap, "never refused");
            };
            assert_eq!(error, FragmentError::Oversized { cap });
            assert!(sent <= cap && sent + chunk.len() > cap, "{sent}");
            assert_eq!(reassembly.pending_len(), 0, "the partial message is freed");
        }
        // Exactly the cap is allowed; one frame over it is not.
        let mut reassembly = Reassembly::new(4);
        assert_eq!(reassembly.push(false, OpCode::Text, bytes(b"ab")), Ok(None));
        assert!(matches!(
            reassembly.push(true, OpCode::Continuation, bytes(b"cd")),
            Ok(Some(Message::Text(_)))
        ));
        assert_eq!(
            reassembly.push(true, OpCode::Text, bytes(b"abcde")),
            Err(FragmentError::Oversized { cap: 4 })
        );
    }

    #[test]
    fn continuations_and_new_messages_out_of_place_are_errors() {
        let mut reassembly = Reassembly::new(16);
        assert_eq!(
            reassembly.push(true, OpCode::Continuation, bytes(b"x")),
            Err(FragmentError::UnexpectedContinuation)
        );
        assert_eq!(reassembly.push(false, OpCode::Text, bytes(b"a")), Ok(None));
        assert_eq!(
            reassembly.push(true, OpCode::Text, bytes(b"b")),
            Err(FragmentError::Interleaved)
        );
    }
}
