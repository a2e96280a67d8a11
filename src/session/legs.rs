//! The two sockets of one call, as the call task uses them: each leg's read half as a stream
//! of inputs, and its write half with the bounded buffer of what the socket has not taken yet.
//!
//! Everything here runs on the call's one task. Reads: a leg's read half is a stream whose
//! pending read survives the call loop's `select!` (so no frame is ever half-read and dropped),
//! polled only when its socket woke it ([`PollOnWake`]). Writes are inline: after each batch of
//! inputs the task offers the buffered bytes to the socket once without waiting
//! (`write_now`), and the rest waits in the leg's buffer, written from the loop when the socket
//! is writable. The buffer is bounded by its [`OutQueue`] (audio dropped oldest first, control
//! messages refused past their cap, which ends the call) plus one batch of framed bytes
//! ([`TWILIO_WIRE_BATCH`], tungstenite's own buffer on the model's leg). A leg whose socket has
//! taken nothing since bytes were offered reports when that began ([`TwilioWriter::stalled_since`]),
//! and the call ends past its deadline.
//!
//! Per-frame buffers are reused, not allocated: a Twilio message is read in fastwebsockets'
//! buffer ([`TwilioText`]) and a model message in tungstenite's ([`Utf8Bytes`]); a written
//! message's `String` goes back to the engine for the next frame.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError, WebSocketRead};
use futures_util::task::{ArcWake, AtomicWaker, waker_ref};
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

use super::engine::{CallEngine, OutKind, Outgoing};
use super::fragments::{FragmentError, Message as Reassembled, Reassembly};
use super::metrics::{CallLatencyRecorder, Metrics};
use super::queue::{OutQueue, PingPayload, QueueFull};
use crate::config::MAX_TWILIO_MESSAGE_BYTES;
use crate::upstream::UpstreamSocket;

/// Audio messages buffered for Twilio beyond what the pacer's lead allows: 1 s of chunks.
/// Overflow: the oldest is dropped (counted in `voxrelay_audio_dropped_total`).
pub const TWILIO_AUDIO_QUEUE: usize = 50;
/// Marks and clears buffered for Twilio: 10 s of one mark per 20 ms chunk, where a reading
/// peer holds a handful. Overflow: never dropped (playback accounting needs every mark); a
/// push past it means Twilio stopped reading, and the call ends as stalled.
pub const TWILIO_CONTROL_QUEUE: usize = 500;
/// Caller audio buffered for the model: 1 s of 20 ms frames. Overflow: the oldest is dropped
/// (counted).
pub const UPSTREAM_AUDIO_QUEUE: usize = 50;
/// Session commands buffered for the model (`session.update`, digits, truncates, tool
/// output): a reading model holds a few. Overflow: never dropped; a push past it ends the call
/// as stalled.
pub const UPSTREAM_CONTROL_QUEUE: usize = 256;
/// Framed bytes for Twilio taken from the queue ahead of the socket: a paced `media` + `mark`
/// pair is about 400 bytes, and a response's first batch (the 120 ms lead) six pairs. Past
/// this, messages wait in the queue, where audio can still be dropped or withdrawn.
pub const TWILIO_WIRE_BATCH: usize = 4 * 1024;
/// The largest audio message copied into the model writer's arena for tungstenite (which
/// frames it into its own buffer and drops it), keeping the `String` for reuse. A 20 ms append
/// is about 280 bytes in `pcmu`, 1.3 KB in `pcm16`; control messages and anything larger go by
/// value.
const UPSTREAM_WRITE_ARENA: usize = 2 * 1024;
/// Spent message buffers a leg holds for the engine between hand-backs.
const SPENT_TEXTS: usize = 8;

/// The text of one Twilio message, in fastwebsockets' read buffer: no copy, and once it is
/// dropped the reader reuses the space for the next frames (its buffer is shared, so it can
/// reclaim the space only when no payload taken from it is alive).
pub struct TwilioText(BytesMut);

impl TwilioText {
    /// `None` unless `payload` is UTF-8.
    fn new(payload: BytesMut) -> Option<Self> {
        std::str::from_utf8(&payload)
            .is_ok()
            .then_some(Self(payload))
    }
}

impl std::ops::Deref for TwilioText {
    type Target = str;

    fn deref(&self) -> &str {
        // SAFETY: the bytes were checked to be UTF-8 in `new`, the only constructor, and the
        // private field is never changed after.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }
}

/// What Twilio's read half yields.
pub enum TwilioRead {
    Text(TwilioText),
    /// A ping's payload, to be echoed byte for byte in a pong.
    Ping(PingPayload),
    Closed,
    Failed(WebSocketError),
}

/// What the model's read half yields.
pub enum ModelRead {
    /// Borrows tungstenite's read buffer (no copy).
    Text(Utf8Bytes),
    Closed(Option<String>),
    /// The model sent a message over its cap (tungstenite refused it while it arrived).
    Oversized(String),
    /// A ping or pong: the model is there, with nothing to say.
    Alive,
}

/// A stream polled only when it may have something: right after it yielded an item, or once
/// its own waker has fired. The call's `select!` polls every branch on every wake-up, so
/// without this a message on one socket also polls the other socket's stream: a read attempt
/// that finds nothing, and on the model's socket tungstenite zero-fills its free read buffer
/// (~4 KB) before each attempt. Per call, so its state is not shared with other calls.
pub struct PollOnWake<S> {
    inner: S,
    gate: Arc<WakeGate>,
    /// The last poll yielded an item: more may be buffered, so poll the stream again.
    ready: bool,
}

#[derive(Default)]
struct WakeGate {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl ArcWake for WakeGate {
    fn wake_by_ref(gate: &Arc<Self>) {
        gate.woken.store(true, Ordering::Release);
        gate.task.wake();
    }
}

impl<S> PollOnWake<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            gate: Arc::default(),
            ready: true,
        }
    }
}

impl<S: Stream + Unpin> Stream for PollOnWake<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = &mut *self;
        // Registered before the check, so a wake-up between the two is not lost.
        this.gate.task.register(cx.waker());
        if !std::mem::take(&mut this.ready) && !this.gate.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = waker_ref(&this.gate);
        let item = this.inner.poll_next_unpin(&mut Context::from_waker(&waker));
        this.ready = item.is_ready();
        item
    }
}

/// The Twilio read half as a stream. A `next()` dropped by `select!` leaves the read in
/// progress inside the stream, so it is cancel-safe although `read_frame` is not. The stream
/// ends after the socket closes or fails. Frames are read one by one (not through
/// fastwebsockets' collector, which would join a fragmented message of any size): an
/// unfragmented text frame goes on in the reader's buffer, fragments are joined by
/// [`Reassembly`] under [`MAX_TWILIO_MESSAGE_BYTES`], counted as they arrive.
pub fn twilio_reads<R>(reader: WebSocketRead<R>) -> impl Stream<Item = TwilioRead> + Unpin
where
    R: AsyncRead + Unpin,
{
    let reassembly = Reassembly::new(MAX_TWILIO_MESSAGE_BYTES);
    PollOnWake::new(Box::pin(futures_util::stream::unfold(
        Some((reader, reassembly)),
        |state| async move {
            let (mut reader, mut reassembly) = state?;
            // Auto-pong and auto-close are off, so the reader never has to write.
            let mut never_writes = |_: Frame<'_>| async { Ok::<(), std::io::Error>(()) };
            loop {
                let read = match reader.read_frame(&mut never_writes).await {
                    Ok(frame) => match frame.opcode {
                        OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                            match reassembly.push(frame.fin, frame.opcode, frame.payload) {
                                Ok(None) => continue,
                                // Twilio never sends binary frames; a stray one is not audio
                                // we understand.
                                Ok(Some(Reassembled::Binary { .. })) => continue,
                                Ok(Some(Reassembled::Text(payload))) => {
                                    match TwilioText::new(payload) {
                                        Some(text) => TwilioRead::Text(text),
                                        None => TwilioRead::Failed(WebSocketError::InvalidUTF8),
                                    }
                                }
                                Err(FragmentError::Oversized { .. }) => {
                                    TwilioRead::Failed(WebSocketError::FrameTooLarge)
                                }
                                Err(FragmentError::UnexpectedContinuation) => {
                                    TwilioRead::Failed(WebSocketError::InvalidContinuationFrame)
                                }
                                Err(_) => TwilioRead::Failed(WebSocketError::InvalidFragment),
                            }
                        }
                        OpCode::Close => TwilioRead::Closed,
                        // fastwebsockets refuses pings over 125 bytes, which always fit.
                        OpCode::Ping => match PingPayload::new(&frame.payload) {
                            Some(ping) => TwilioRead::Ping(ping),
                            None => TwilioRead::Failed(WebSocketError::PingFrameTooLarge),
                        },
                        OpCode::Pong => continue,
                    },
                    Err(error) => TwilioRead::Failed(error),
                };
                let terminal = matches!(read, TwilioRead::Closed | TwilioRead::Failed(_));
                return Some((read, (!terminal).then_some((reader, reassembly))));
            }
        },
    )))
}

type ModelStream = futures_util::stream::SplitStream<UpstreamSocket>;
type ModelSink = futures_util::stream::SplitSink<UpstreamSocket, Message>;

/// The model's read half as a stream; it ends after the socket closes.
pub fn model_reads(stream: ModelStream) -> Pin<Box<dyn Stream<Item = ModelRead> + Send>> {
    Box::pin(PollOnWake::new(Box::pin(futures_util::stream::unfold(
        Some(stream),
        |stream| async move {
            let mut stream = stream?;
            loop {
                // tungstenite answers a ping itself: the pong is queued as the ping is read and
                // written by the next read or write on the socket.
                let read = match stream.next().await {
                    Some(Ok(Message::Text(text))) => ModelRead::Text(text),
                    Some(Ok(Message::Close(frame))) => ModelRead::Closed(
                        frame.map(|f| format!("{} {}", u16::from(f.code), f.reason)),
                    ),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => ModelRead::Alive,
                    Some(Ok(_)) => continue,
                    // Refused while it arrived: the cap counts fragments as they come.
                    Some(Err(WsError::Capacity(error @ CapacityError::MessageTooLong { .. }))) => {
                        ModelRead::Oversized(error.to_string())
                    }
                    Some(Err(error)) => ModelRead::Closed(Some(error.to_string())),
                    None => ModelRead::Closed(None),
                };
                let terminal = matches!(read, ModelRead::Closed(_) | ModelRead::Oversized(_));
                return Some((read, (!terminal).then_some(stream)));
            }
        },
    ))))
}

/// The next read from the model, or never while its socket is not open (or has ended).
pub async fn next_model_read(
    reads: &mut Option<Pin<Box<dyn Stream<Item = ModelRead> + Send>>>,
) -> ModelRead {
    match reads {
        Some(stream) => match stream.next().await {
            Some(read) => read,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Where a written message's latency measurement goes.
struct Timed {
    /// The wire offset its last byte ends at.
    end: usize,
    kind: OutKind,
    caused_at: Instant,
}

/// Twilio's write half: the queue, the framed bytes ahead of the socket, and the socket.
pub struct TwilioWriter<W> {
    io: W,
    pub queue: OutQueue,
    /// Framed bytes not yet written; `wire[written..]` is what the socket still has to take.
    wire: Vec<u8>,
    written: usize,
    timed: VecDeque<Timed>,
    stalled_since: Option<Instant>,
}

impl<W: AsyncWrite + Unpin> TwilioWriter<W> {
    pub fn new(io: W) -> Self {
        Self {
            io,
            queue: OutQueue::new(TWILIO_AUDIO_QUEUE, TWILIO_CONTROL_QUEUE),
            wire: Vec::with_capacity(TWILIO_WIRE_BATCH),
            written: 0,
            timed: VecDeque::new(),
            stalled_since: None,
        }
    }

    /// Queues a message for Twilio; a `clear` first withdraws the audio not yet framed
    /// (stale: Twilio would only clear it again). Returns the audio messages dropped because
    /// the queue was full.
    pub fn push(&mut self, out: Outgoing) -> Result<usize, QueueFull> {
        if out.kind == OutKind::Clear {
            self.queue.drop_audio();
        }
        self.queue.push(out)
    }

    /// Whether bytes wait for the socket.
    pub fn has_pending(&self) -> bool {
        self.written < self.wire.len()
    }

    /// Since when the socket has taken nothing of what waits for it.
    pub fn stalled_since(&self) -> Option<Instant> {
        self.stalled_since
    }

    /// Frames the owed pong and queued messages into the wire buffer, up to one batch,
    /// handing each written message's text back to `engine`.
    fn fill(&mut self, engine: &mut CallEngine) {
        // What the socket took goes before anything is added: a peer that always leaves a few
        // bytes unread would otherwise grow the buffer by everything written through it. The
        // move is of what is still pending, at most a batch and one message.
        if self.written > 0 {
            self.wire.drain(..self.written);
            for timed in &mut self.timed {
                timed.end -= self.written;
            }
            self.written = 0;
        }
        let mut head = [0u8; 10];
        if let Some(ping) = self.queue.take_pong() {
            let mut frame = Frame::pong(Payload::Borrowed(ping.as_bytes()));
            let len = frame.fmt_head(&mut head);
            self.wire.extend_from_slice(&head[..len]);
            self.wire.extend_from_slice(ping.as_bytes());
        }
        while self.wire.len() - self.written < TWILIO_WIRE_BATCH {
            let Some(out) = self.queue.pop() else {
                break;
            };
            // A server's frames are not masked: the head, then the text as it is.
            let mut frame = Frame::text(Payload::Borrowed(out.text.as_bytes()));
            let len = frame.fmt_head(&mut head);
            self.wire.extend_from_slice(&head[..len]);
            self.wire.extend_from_slice(out.text.as_bytes());
            if let Some(caused_at) = out.caused_at {
                self.timed.push_back(Timed {
                    end: self.wire.len(),
                    kind: out.kind,
                    caused_at,
                });
            }
            engine.recycle_twilio(out.text);
        }
    }

    /// Offers what waits to the socket without waiting, as often as it takes bytes.
    pub fn write_now(
        &mut self,
        engine: &mut CallEngine,
        now: Instant,
        metrics: &Metrics,
        latency: &CallLatencyRecorder,
    ) -> std::io::Result<()> {
        loop {
            self.fill(engine);
            if !self.has_pending() {
                self.stalled_since = None;
                return Ok(());
            }
            match self.io.write(&self.wire[self.written..]).now_or_never() {
                Some(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Some(Ok(n)) => self.wrote(n, metrics, latency),
                Some(Err(error)) => return Err(error),
                None => {
                    self.stalled_since.get_or_insert(now);
                    return Ok(());
                }
            }
        }
    }

    /// Waits until the socket takes some of what waits (for the call loop's `select!`;
    /// cancel-safe: nothing is written unless it completes).
    pub async fn writable(&mut self) -> std::io::Result<usize> {
        self.io.write(&self.wire[self.written..]).await
    }

    /// `n` bytes went to the socket: latency measurements that completed are recorded.
    pub fn wrote(&mut self, n: usize, metrics: &Metrics, latency: &CallLatencyRecorder) {
        self.written += n;
        self.stalled_since = None;
        while let Some(timed) = self.timed.front() {
            if timed.end > self.written {
                break;
            }
            let took = timed.caused_at.elapsed();
            match timed.kind {
                OutKind::Audio => {
                    metrics.downlink_added.observe(took);
                    latency.downlink(took);
                }
                OutKind::Clear => {
                    metrics.barge_in_reaction.observe(took);
                    latency.barge_in(took);
                }
                OutKind::Mark | OutKind::Control => {}
            }
            self.timed.pop_front();
        }
        if self.written == self.wire.len() {
            self.timed.clear();
        }
    }

    /// Writes what is queued and a close frame; the caller bounds the wait.
    pub async fn close(&mut self, engine: &mut CallEngine) -> std::io::Result<()> {
        loop {
            self.fill(engine);
            if !self.has_pending() {
                break;
            }
            let n = self.io.write(&self.wire[self.written..]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            self.written += n;
        }
        let mut head = [0u8; 10];
        let mut close = Frame::close(1000, b"");
        let len = close.fmt_head(&mut head);
        self.io.write_all(&head[..len]).await?;
        self.io.write_all(&close.payload).await?;
        self.io.flush().await
    }
}

/// The model's write half: the queue and tungstenite's sink, once the socket is open.
pub struct ModelWriter {
    sink: Option<ModelSink>,
    pub queue: OutQueue,
    arena: BytesMut,
    unflushed: bool,
    /// Read times of the appends written since the last flush.
    audio_read_at: Vec<Instant>,
    /// Texts written, for the engine to reuse.
    spent: Vec<String>,
    stalled_since: Option<Instant>,
    /// A ping to send, asking a silent model whether it is still there.
    ping_due: bool,
}

impl Default for ModelWriter {
    fn default() -> Self {
        Self {
            sink: None,
            queue: OutQueue::new(UPSTREAM_AUDIO_QUEUE, UPSTREAM_CONTROL_QUEUE),
            arena: BytesMut::new(),
            unflushed: false,
            audio_read_at: Vec::with_capacity(4),
            spent: Vec::with_capacity(SPENT_TEXTS),
            stalled_since: None,
            ping_due: false,
        }
    }
}

impl ModelWriter {
    /// The socket is open: messages queued so far go out from now on.
    pub fn attach(&mut self, sink: ModelSink) {
        self.sink = Some(sink);
    }

    /// The socket is gone (the session was lost): what was queued for it was that session's
    /// and is dropped; the next session starts from an empty queue.
    pub fn detach(&mut self, engine: &mut CallEngine) {
        self.sink = None;
        while let Some(out) = self.queue.pop() {
            engine.recycle_model(out.text);
        }
        self.give_back(engine);
        self.arena.clear();
        self.unflushed = false;
        self.audio_read_at.clear();
        self.stalled_since = None;
        self.ping_due = false;
    }

    /// Asks the model for a pong ahead of anything queued.
    pub fn ping(&mut self) {
        self.ping_due = self.sink.is_some();
    }

    pub fn is_attached(&self) -> bool {
        self.sink.is_some()
    }

    /// Whether messages wait for the socket.
    pub fn has_pending(&self) -> bool {
        self.sink.is_some() && (!self.queue.is_empty() || self.unflushed || self.ping_due)
    }

    pub fn stalled_since(&self) -> Option<Instant> {
        self.stalled_since
    }

    /// Hands written texts back to the engine.
    pub fn give_back(&mut self, engine: &mut CallEngine) {
        for text in self.spent.drain(..) {
            engine.recycle_model(text);
        }
    }

    /// Feeds queued messages to tungstenite and flushes them; `Ready(Ok)` once everything
    /// is on the socket. Cancel-safe: a message leaves the queue only when tungstenite took it.
    pub fn poll_drive(
        &mut self,
        cx: &mut Context<'_>,
        metrics: &Metrics,
        latency: &CallLatencyRecorder,
    ) -> Poll<Result<(), WsError>> {
        let Some(sink) = self.sink.as_mut() else {
            return Poll::Pending;
        };
        if self.ping_due {
            if let Err(error) = std::task::ready!(sink.poll_ready_unpin(cx)) {
                return Poll::Ready(Err(error));
            }
            if let Err(error) =
                Pin::new(&mut *sink).start_send(Message::Ping(Bytes::from_static(b"voxrelay")))
            {
                return Poll::Ready(Err(error));
            }
            self.ping_due = false;
            self.unflushed = true;
        }
        while !self.queue.is_empty() {
            if let Err(error) = std::task::ready!(sink.poll_ready_unpin(cx)) {
                return Poll::Ready(Err(error));
            }
            let Some(out) = self.queue.pop() else {
                break;
            };
            if out.kind == OutKind::Audio {
                self.audio_read_at.extend(out.caused_at);
            }
            let text = if out.kind == OutKind::Audio && out.text.len() <= UPSTREAM_WRITE_ARENA {
                // tungstenite takes the text by value and drops it once framed; a copy in the
                // arena goes instead, so the String can go back to the engine for reuse.
                self.arena.extend_from_slice(out.text.as_bytes());
                // SAFETY: the bytes are a copy of a `str`.
                let text = unsafe { Utf8Bytes::from_bytes_unchecked(self.arena.split().freeze()) };
                if self.spent.len() < SPENT_TEXTS {
                    self.spent.push(out.text);
                }
                text
            } else {
                Utf8Bytes::from(out.text)
            };
            if let Err(error) = Pin::new(&mut *sink).start_send(Message::Text(text)) {
                return Poll::Ready(Err(error));
            }
            self.unflushed = true;
        }
        if self.unflushed {
            if let Err(error) = std::task::ready!(sink.poll_flush_unpin(cx)) {
                return Poll::Ready(Err(error));
            }
            self.unflushed = false;
            for read_at in self.audio_read_at.drain(..) {
                let took = read_at.elapsed();
                metrics.uplink_added.observe(took);
                latency.uplink(took);
            }
        }
        self.stalled_since = None;
        Poll::Ready(Ok(()))
    }

    /// Offers what waits to the socket once, without waiting.
    pub fn write_now(
        &mut self,
        now: Instant,
        metrics: &Metrics,
        latency: &CallLatencyRecorder,
    ) -> Result<(), WsError> {
        if !self.has_pending() {
            return Ok(());
        }
        match std::future::poll_fn(|cx| self.poll_drive(cx, metrics, latency)).now_or_never() {
            Some(result) => result,
            None => {
                self.stalled_since.get_or_insert(now);
                Ok(())
            }
        }
    }

    /// Offers a close frame to the socket without waiting (a session being replaced: it is
    /// dropped right after, taken or not).
    pub fn close_now(&mut self) {
        let Some(sink) = self.sink.as_mut() else {
            return;
        };
        let close = CloseFrame {
            code: CloseCode::Normal,
            reason: "session renewed".into(),
        };
        let _ = sink.send(Message::Close(Some(close))).now_or_never();
    }

    /// Sends what is queued and a close frame; the caller bounds the wait.
    pub async fn close(&mut self, metrics: &Metrics, latency: &CallLatencyRecorder) {
        if self.sink.is_none() {
            return;
        }
        if std::future::poll_fn(|cx| self.poll_drive(cx, metrics, latency))
            .await
            .is_err()
        {
            return;
        }
        let close = CloseFrame {
            code: CloseCode::Normal,
            reason: "call ended".into(),
        };
        if let Some(sink) = self.sink.as_mut() {
            let _ = sink.send(Message::Close(Some(close))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::io::AsyncReadExt;
    use tokio::sync::mpsc;

    use super::*;
    use crate::session::playback::PlaybackConfig;

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl ArcWake for CountingWaker {
        fn wake_by_ref(waker: &Arc<Self>) {
            waker.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn mark(text: &str) -> Outgoing {
        Outgoing {
            text: text.to_owned(),
            kind: OutKind::Mark,
            caused_at: None,
        }
    }

    #[tokio::test]
    async fn a_peer_that_stops_reading_leaves_the_rest_buffered_and_marks_the_stall() {
        let metrics = Metrics::default();
        let latency = CallLatencyRecorder::default();
        let mut engine = CallEngine::new(PlaybackConfig::default());
        // A pipe that holds 64 bytes, whose far end is not read.
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut writer = TwilioWriter::new(ours);
        writer.push(mark(&"m".repeat(1_000))).unwrap();
        let now = Instant::now();
        writer
            .write_now(&mut engine, now, &metrics, &latency)
            .expect("no error, only a full pipe");
        assert!(writer.has_pending());
        assert_eq!(writer.stalled_since(), Some(now));
        // The peer reads: the loop's writable branch completes the write.
        let mut seen = Vec::new();
        let mut buffer = [0u8; 256];
        while writer.has_pending() {
            let n = tokio::select! {
                n = writer.writable() => n.expect("write"),
                read = theirs.read(&mut buffer) => {
                    seen.extend_from_slice(&buffer[..read.expect("read")]);
                    continue;
                }
            };
            writer.wrote(n, &metrics, &latency);
        }
        assert_eq!(writer.stalled_since(), None);
        while seen.len() < 1_004 {
            let n = theirs.read(&mut buffer).await.expect("read");
            seen.extend_from_slice(&buffer[..n]);
        }
        // One unmasked text frame: FIN + text, 16-bit length 1000, then the bytes.
        assert_eq!(&seen[..4], [0x81, 126, 0x03, 0xE8]);
        assert!(seen[4..].iter().all(|&b| b == b'm'));
    }

    #[tokio::test]
    async fn a_peer_that_always_leaves_bytes_unread_cannot_grow_the_wire_buffer() {
        let metrics = Metrics::default();
        let latency = CallLatencyRecorder::default();
        let mut engine = CallEngine::new(PlaybackConfig::default());
        // Each round sends one 304-byte frame and the peer reads 300 bytes: the socket never
        // takes everything, so the buffer is never found empty.
        let (ours, mut theirs) = tokio::io::duplex(512);
        let mut writer = TwilioWriter::new(ours);
        let message = "m".repeat(300);
        let mut buffer = [0u8; 300];
        for _ in 0..2_000 {
            writer.push(mark(&message)).unwrap();
            writer
                .write_now(&mut engine, Instant::now(), &metrics, &latency)
                .expect("write");
            let n = theirs.read(&mut buffer).await.expect("read");
            assert!(n > 0);
            assert!(
                writer.wire.len() <= TWILIO_WIRE_BATCH + message.len() + 10,
                "{} bytes held",
                writer.wire.len()
            );
        }
    }

    #[tokio::test]
    async fn a_pong_goes_first_with_the_pings_bytes_and_a_clear_withdraws_queued_audio() {
        let metrics = Metrics::default();
        let latency = CallLatencyRecorder::default();
        let mut engine = CallEngine::new(PlaybackConfig::default());
        let (ours, mut theirs) = tokio::io::duplex(4096);
        let mut writer = TwilioWriter::new(ours);
        let audio = Outgoing {
            text: "a".into(),
            kind: OutKind::Audio,
            caused_at: None,
        };
        writer.push(audio).unwrap();
        let clear = Outgoing {
            text: "c".into(),
            kind: OutKind::Clear,
            caused_at: Some(Instant::now()),
        };
        assert_eq!(writer.push(clear), Ok(0));
        assert_eq!(writer.queue.len(), 1, "the queued audio was withdrawn");
        writer.queue.push_pong(PingPayload::new(b"p1").unwrap());
        writer
            .write_now(&mut engine, Instant::now(), &metrics, &latency)
            .unwrap();
        assert!(!writer.has_pending());
        let mut seen = [0u8; 7];
        theirs.read_exact(&mut seen).await.unwrap();
        assert_eq!(seen, [0x8A, 2, b'p', b'1', 0x81, 1, b'c']);
        assert_eq!(
            metrics.barge_in_reaction.count(),
            1,
            "the clear's write is timed"
        );
    }

    #[test]
    fn poll_on_wake_polls_the_stream_only_when_it_may_have_something() {
        let (tx, mut rx) = mpsc::channel::<u32>(4);
        let polls = Arc::new(AtomicUsize::new(0));
        let inner = {
            let polls = Arc::clone(&polls);
            futures_util::stream::poll_fn(move |cx| {
                polls.fetch_add(1, Ordering::SeqCst);
                rx.poll_recv(cx)
            })
        };
        let mut gated = PollOnWake::new(inner);
        let task = Arc::new(CountingWaker::default());
        let waker = futures_util::task::waker(Arc::clone(&task));
        let mut cx = Context::from_waker(&waker);
        let polls_now = || polls.load(Ordering::SeqCst);

        assert!(gated.poll_next_unpin(&mut cx).is_pending());
        assert!(gated.poll_next_unpin(&mut cx).is_pending());
        assert_eq!(polls_now(), 1, "not polled again until woken");

        tx.try_send(7).unwrap();
        tx.try_send(8).unwrap();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task is woken");
        assert_eq!(gated.poll_next_unpin(&mut cx), Poll::Ready(Some(7)));
        // After an item the stream is polled again without a wake-up: more may be buffered.
        assert_eq!(gated.poll_next_unpin(&mut cx), Poll::Ready(Some(8)));
        assert!(gated.poll_next_unpin(&mut cx).is_pending());
        assert!(gated.poll_next_unpin(&mut cx).is_pending());
        assert_eq!(polls_now(), 4);

        drop(tx);
        assert_eq!(gated.poll_next_unpin(&mut cx), Poll::Ready(None));
    }
}
