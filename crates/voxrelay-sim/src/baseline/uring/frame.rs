//! Minimal RFC 6455 framing over caller-owned buffers, for the io_uring floor: no socket, no
//! clock.
//!
//! Owns [`Reader`] (bytes in, whole messages out: frames unmasked in place, fragments joined,
//! control frames passed through between fragments) and [`Writer`] (frames out, into the bytes
//! one in-flight `send` and the next batch carry). Invariants: nothing panics on peer input; a
//! frame whose header breaks the RFC (reserved bits, unknown opcode, the wrong masking for
//! its side, a fragmented or oversized control frame) is an error; a message longer than the
//! reader's cap is an error as soon as its header (or its fragments' sum) says so, so the
//! read buffer never holds more than one capped message and one header; a buffer regrown for
//! a large message shrinks back once it has been taken. The bytes handed to a `send` stay
//! where they are until [`Writer::sent`] says the kernel is done with them.

/// The read buffer's working size: a Twilio `media` message is about 250 bytes, a model
/// delta of 100 ms about 1.1 KiB.
pub(crate) const READ_BUFFER: usize = 4 * 1024;
/// The longest frame header: 2 bytes, an 8-byte length and a 4-byte mask.
const MAX_HEADER: usize = 14;

/// Why a peer's frames cannot be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("a reserved bit is set")]
    Reserved,
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    #[error("a client frame must be masked")]
    Unmasked,
    #[error("a server frame must not be masked")]
    Masked,
    #[error("a control frame is fragmented or longer than 125 bytes")]
    BadControl,
    #[error("a message of {0} bytes is over the cap")]
    TooBig(u64),
    #[error("a continuation frame outside a fragmented message")]
    StrayContinuation,
    #[error("a new message began inside a fragmented one")]
    Interleaved,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl OpCode {
    fn from_bits(bits: u8) -> Result<Self, FrameError> {
        Ok(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            other => return Err(FrameError::UnknownOpcode(other)),
        })
    }

    fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// Which end of the connection the frames come from (they must be masked if from a client).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Peer {
    Client,
    Server,
}

#[derive(Clone, Copy, Debug)]
struct Header {
    fin: bool,
    opcode: OpCode,
    len: usize,
    payload: usize,
    mask: Option<[u8; 4]>,
}

/// Parses the header at the start of `bytes`; `None` until it is all there.
fn parse_header(bytes: &[u8], from: Peer, cap: usize) -> Result<Option<Header>, FrameError> {
    let [first, second, ..] = *bytes else {
        return Ok(None);
    };
    if first & 0x70 != 0 {
        return Err(FrameError::Reserved);
    }
    let fin = first & 0x80 != 0;
    let opcode = OpCode::from_bits(first & 0x0F)?;
    let masked = second & 0x80 != 0;
    match (from, masked) {
        (Peer::Client, false) => return Err(FrameError::Unmasked),
        (Peer::Server, true) => return Err(FrameError::Masked),
        _ => {}
    }
    let (payload, mut len) = match second & 0x7F {
        126 => match bytes.get(2..4) {
            Some(&[a, b]) => (u64::from(u16::from_be_bytes([a, b])), 4),
            _ => return Ok(None),
        },
        127 => match bytes.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            Some(b) => (u64::from_be_bytes(b), 10),
            None => return Ok(None),
        },
        short => (u64::from(short), 2),
    };
    if opcode.is_control() && (!fin || payload > 125) {
        return Err(FrameError::BadControl);
    }
    if payload > cap as u64 {
        return Err(FrameError::TooBig(payload));
    }
    let mask = if masked {
        match bytes
            .get(len..len + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
        {
            Some(mask) => {
                len += 4;
                Some(mask)
            }
            None => return Ok(None),
        }
    } else {
        None
    };
    Ok(Some(Header {
        fin,
        opcode,
        len,
        payload: payload as usize,
        mask,
    }))
}

/// XORs `bytes` with the 4-byte `mask`, starting at mask offset 0.
fn apply_mask(bytes: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = bytes.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let mut value = [0; 4];
        value.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u32::from_ne_bytes(value) ^ word).to_ne_bytes());
    }
    for (byte, key) in chunks.into_remainder().iter_mut().zip(mask) {
        *byte ^= key;
    }
}

/// A whole message read from a peer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Message<'a> {
    pub(crate) opcode: OpCode,
    pub(crate) payload: &'a [u8],
}

/// One socket's incoming bytes and the message being joined from fragments.
#[derive(Debug)]
pub(crate) struct Reader {
    /// `buf[start..end]` holds bytes not yet taken; `buf.len()` is the room a `recv` can fill.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    from: Peer,
    cap: usize,
    /// A fragmented message so far, its opcode, and whether it was handed out already (then
    /// it is cleared on the next call).
    fragments: Vec<u8>,
    fragment_opcode: Option<OpCode>,
    fragments_taken: bool,
}

impl Reader {
    /// A reader of frames from `from`, whose messages may be `cap` bytes at most.
    pub(crate) fn new(from: Peer, cap: usize) -> Self {
        Self {
            buf: vec![0; READ_BUFFER],
            start: 0,
            end: 0,
            from,
            cap,
            fragments: Vec::new(),
            fragment_opcode: None,
            fragments_taken: false,
        }
    }

    /// The room the next `recv` fills; never empty. Compacts, and grows only to fit the one
    /// frame whose header is already here (at most the cap and a header).
    pub(crate) fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > READ_BUFFER {
                self.buf.truncate(READ_BUFFER);
                self.buf.shrink_to_fit();
            }
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            // The pending bytes are one incomplete frame whose header parsed (a header is far
            // shorter than the buffer), so its length is known and under the cap.
            let need = match parse_header(&self.buf[..self.end], self.from, self.cap) {
                Ok(Some(header)) => header.len + header.payload,
                _ => self.buf.len() + MAX_HEADER,
            };
            let grown = need.max(self.buf.len() * 2).min(self.cap + MAX_HEADER);
            self.buf.resize(grown.max(self.end + 1), 0);
        }
        &mut self.buf[self.end..]
    }

    /// The last `recv` put `n` bytes into [`Reader::spare`].
    pub(crate) fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// The bytes not yet taken (an HTTP head before the WebSocket begins).
    pub(crate) fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Takes `n` bytes of [`Reader::pending`] (the HTTP head just parsed).
    pub(crate) fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
    }

    /// The next whole message, `None` until more bytes arrive.
    pub(crate) fn next_message(&mut self) -> Result<Option<Message<'_>>, FrameError> {
        if self.fragments_taken {
            self.fragments.clear();
            self.fragments_taken = false;
        }
        loop {
            let Some(header) = parse_header(&self.buf[self.start..self.end], self.from, self.cap)?
            else {
                return Ok(None);
            };
            let begin = self.start + header.len;
            let finish = begin + header.payload;
            if finish > self.end {
                return Ok(None);
            }
            self.start = finish;
            if let Some(mask) = header.mask {
                apply_mask(&mut self.buf[begin..finish], mask);
            }
            match (header.opcode, self.fragment_opcode) {
                (opcode, _) if opcode.is_control() => {
                    return Ok(Some(Message {
                        opcode,
                        payload: &self.buf[begin..finish],
                    }));
                }
                (OpCode::Continuation, None) => return Err(FrameError::StrayContinuation),
                (OpCode::Continuation, Some(opcode)) => {
                    let total = self.fragments.len() + header.payload;
                    if total > self.cap {
                        return Err(FrameError::TooBig(total as u64));
                    }
                    self.fragments.extend_from_slice(&self.buf[begin..finish]);
                    if header.fin {
                        self.fragment_opcode = None;
                        self.fragments_taken = true;
                        return Ok(Some(Message {
                            opcode,
                            payload: &self.fragments,
                        }));
                    }
                }
                (_, Some(_)) => return Err(FrameError::Interleaved),
                (opcode, None) if header.fin => {
                    return Ok(Some(Message {
                        opcode,
                        payload: &self.buf[begin..finish],
                    }));
                }
                (opcode, None) => {
                    self.fragments.extend_from_slice(&self.buf[begin..finish]);
                    self.fragment_opcode = Some(opcode);
                }
            }
        }
    }
}

/// One socket's outgoing bytes: those a `send` is carrying and those queued behind it.
#[derive(Debug)]
pub(crate) struct Writer {
    sending: Vec<u8>,
    sent: usize,
    queued: Vec<u8>,
    in_flight: bool,
}

impl Writer {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            sending: Vec::with_capacity(capacity),
            sent: 0,
            queued: Vec::with_capacity(capacity),
            in_flight: false,
        }
    }

    /// Bytes not yet taken by the kernel.
    pub(crate) fn backlog(&self) -> usize {
        self.sending.len() - self.sent + self.queued.len()
    }

    /// Queues raw bytes (an HTTP head).
    pub(crate) fn push_raw(&mut self, bytes: &[u8]) {
        self.queued.extend_from_slice(bytes);
    }

    /// Queues one unfragmented frame, masked with `mask` when given (frames to a server).
    pub(crate) fn push_frame(&mut self, opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>) {
        let mask_bit = if mask.is_some() { 0x80 } else { 0 };
        self.queued.push(0x80 | opcode as u8);
        match payload.len() {
            len @ 0..=125 => self.queued.push(mask_bit | len as u8),
            len @ 126..=0xFFFF => {
                self.queued.push(mask_bit | 126);
                self.queued.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                self.queued.push(mask_bit | 127);
                self.queued.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        let body = self.queued.len();
        if let Some(mask) = mask {
            self.queued.extend_from_slice(&mask);
        }
        let body = body + mask.map_or(0, |_| 4);
        self.queued.extend_from_slice(payload);
        if let Some(mask) = mask {
            apply_mask(&mut self.queued[body..], mask);
        }
    }

    /// The bytes the next `send` carries, if none is in flight and there is anything to send;
    /// they stay put until [`Writer::sent`].
    pub(crate) fn start_send(&mut self) -> Option<&[u8]> {
        if self.in_flight {
            return None;
        }
        if self.sent == self.sending.len() {
            self.sending.clear();
            self.sent = 0;
            std::mem::swap(&mut self.sending, &mut self.queued);
        }
        if self.sending.is_empty() {
            return None;
        }
        self.in_flight = true;
        Some(&self.sending[self.sent..])
    }

    /// The `send` in flight took `n` bytes.
    pub(crate) fn sent(&mut self, n: usize) {
        self.in_flight = false;
        self.sent = (self.sent + n).min(self.sending.len());
    }

    /// The `send` in flight failed; nothing more goes out.
    pub(crate) fn failed(&mut self) {
        self.in_flight = false;
        self.sending.clear();
        self.sent = 0;
        self.queued.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

    fn feed(reader: &mut Reader, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let spare = reader.spare();
            let n = spare.len().min(rest.len());
            spare[..n].copy_from_slice(&rest[..n]);
            reader.filled(n);
            rest = &rest[n..];
        }
    }

    fn frame(opcode: OpCode, fin: bool, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut writer = Writer::new(0);
        writer.push_frame(opcode, payload, mask);
        let mut bytes = writer.start_send().expect("bytes").to_vec();
        if !fin {
            bytes[0] &= 0x7F;
        }
        bytes
    }

    #[test]
    fn the_rfc_example_unmasks_to_hello() {
        // RFC 6455 §5.7: a masked "Hello" from a client.
        let mut reader = Reader::new(Peer::Client, 1024);
        feed(
            &mut reader,
            &[
                0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
            ],
        );
        let message = reader.next_message().expect("valid").expect("whole");
        assert_eq!(message.opcode, OpCode::Text);
        assert_eq!(message.payload, b"Hello");
        assert_eq!(reader.next_message(), Ok(None));
        // And the writer produces exactly those bytes.
        assert_eq!(
            frame(OpCode::Text, true, b"Hello", Some(MASK)),
            [
                0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58
            ]
        );
    }

    #[test]
    fn every_length_encoding_round_trips_byte_by_byte() {
        for len in [0, 1, 125, 126, 1000, 0xFFFF, 0x10000, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let bytes = frame(OpCode::Binary, true, &payload, Some(MASK));
            let mut reader = Reader::new(Peer::Client, 100_000);
            for byte in &bytes {
                assert_eq!(reader.next_message(), Ok(None));
                feed(&mut reader, std::slice::from_ref(byte));
            }
            let message = reader.next_message().expect("valid").expect("whole");
            assert_eq!(message.payload, payload.as_slice(), "length {len}");
        }
    }

    #[test]
    fn fragments_join_around_a_ping_and_count_toward_the_cap() {
        let mut bytes = frame(OpCode::Text, false, b"Hel", None);
        bytes.extend(frame(OpCode::Ping, true, b"p", None));
        bytes.extend(frame(OpCode::Continuation, true, b"lo", None));
        let mut reader = Reader::new(Peer::Server, 5);
        feed(&mut reader, &bytes);
        let ping = reader.next_message().expect("valid").expect("ping");
        assert_eq!((ping.opcode, ping.payload), (OpCode::Ping, &b"p"[..]));
        let text = reader.next_message().expect("valid").expect("text");
        assert_eq!((text.opcode, text.payload), (OpCode::Text, &b"Hello"[..]));

        let mut bytes = frame(OpCode::Text, false, b"Hel", None);
        bytes.extend(frame(OpCode::Continuation, true, b"lo!", None));
        let mut reader = Reader::new(Peer::Server, 5);
        feed(&mut reader, &bytes);
        assert_eq!(reader.next_message(), Err(FrameError::TooBig(6)));
    }

    #[test]
    fn broken_headers_are_errors_not_panics() {
        let cases: [(&[u8], FrameError); 7] = [
            (&[0xC1, 0x80, 0, 0, 0, 0], FrameError::Reserved),
            (&[0x83, 0x80, 0, 0, 0, 0], FrameError::UnknownOpcode(3)),
            (&[0x81, 0x00], FrameError::Unmasked),
            (&[0x09, 0x80, 0, 0, 0, 0], FrameError::BadControl),
            (&[0x89, 0xFE, 0, 200, 0, 0, 0, 0], FrameError::BadControl),
            (&[0x80, 0x80, 0, 0, 0, 0], FrameError::StrayContinuation),
            (
                &[0x82, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
                FrameError::TooBig(u64::MAX),
            ),
        ];
        for (bytes, error) in cases {
            let mut reader = Reader::new(Peer::Client, 1024);
            feed(&mut reader, bytes);
            assert_eq!(reader.next_message(), Err(error), "{bytes:?}");
        }
        let mut reader = Reader::new(Peer::Server, 1024);
        feed(&mut reader, &[0x81, 0x80, 0, 0, 0, 0]);
        assert_eq!(reader.next_message(), Err(FrameError::Masked));
        let mut reader = Reader::new(Peer::Server, 1024);
        let mut bytes = frame(OpCode::Text, false, b"a", None);
        bytes.extend(frame(OpCode::Text, true, b"b", None));
        feed(&mut reader, &bytes);
        assert_eq!(reader.next_message(), Err(FrameError::Interleaved));
    }

    #[test]
    fn the_buffer_grows_only_for_a_frame_it_must_hold_and_shrinks_after() {
        let payload = vec![7; 3 * READ_BUFFER];
        let bytes = frame(OpCode::Binary, true, &payload, None);
        let mut reader = Reader::new(Peer::Server, 4 * READ_BUFFER);
        feed(&mut reader, &bytes);
        assert!(reader.buf.len() <= 4 * READ_BUFFER + MAX_HEADER);
        let message = reader.next_message().expect("valid").expect("whole");
        assert_eq!(message.payload.len(), payload.len());
        assert!(
            reader.spare().len() == READ_BUFFER,
            "back to its working size"
        );
    }

    #[test]
    fn a_writer_keeps_in_flight_bytes_and_queues_behind_them() {
        let mut writer = Writer::new(64);
        writer.push_raw(b"abcdef");
        assert_eq!(writer.start_send(), Some(&b"abcdef"[..]));
        assert_eq!(writer.start_send(), None, "one send in flight");
        writer.push_raw(b"gh");
        assert_eq!(writer.backlog(), 8);
        writer.sent(4);
        assert_eq!(writer.start_send(), Some(&b"ef"[..]), "the rest first");
        writer.sent(2);
        assert_eq!(writer.start_send(), Some(&b"gh"[..]));
        writer.sent(2);
        assert_eq!(writer.backlog(), 0);
        assert_eq!(writer.start_send(), None);
    }
}
