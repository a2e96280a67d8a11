//! The floor relay on io_uring (`--floor-driver uring`, the `io-uring` feature, Linux): the
//! same relay as [`super::BaselineRelay`], with one thread that owns one ring and every call.
//!
//! Owns [`UringRelay`] and its loop. Every socket operation of every call (the multishot
//! accept, each socket's `recv`, `send` and the model's `connect`) is a submission queued
//! while the completions of one turn are handled, and one `submit_and_wait` per turn hands
//! them all to the kernel and waits for the next completions: the system calls of a turn are
//! shared by every call that had work in it. The protocol work per message is the tokio
//! floor's own ([`super::work::CallWork`]); the HTTP upgrade, the model's client handshake and
//! RFC 6455 framing are this module's ([`handshake`], [`frame`]), over plain TCP only: a
//! `wss://` model is refused at start.
//!
//! Invariants: one `recv` and one `send` at most in flight per socket, over buffers that do not
//! move until their completion arrives (a call's slot, its sockets and buffers are freed only
//! once nothing of it is in flight); reads stop on both sockets of a call while either
//! socket's unsent bytes exceed [`BACKLOG_HIGH_WATER`] (back-pressure, as the tokio floor's
//! awaited writes), and on the Twilio socket while the model is being dialled (as the tokio
//! floor awaits the dial), so no buffer grows with what a peer sends; a call ends on Twilio
//! `stop`, either socket closing or failing, a dial that takes longer than
//! [`CONNECT_TIMEOUT`], or [`UringRelay::shutdown`], and every ending sends a close frame on
//! both WebSockets still open, waiting at most [`CLOSE_GRACE`] for the peers to take it.

mod frame;
mod handshake;

use std::net::{SocketAddr, TcpListener, ToSocketAddrs as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use voxrelay_core::twilio::MAX_TWILIO_MESSAGE_BYTES;

use super::work::{CallWork, Mixer, OUT_CAPACITY, TwilioOutcome};
use super::{EndReason, Fault, SESSION_UPDATE, UPSTREAM_KEY};
use crate::dial::{CONNECT_TIMEOUT, MAX_UPSTREAM_MESSAGE_BYTES};
use frame::{FrameError, OpCode, Peer, Reader, Writer};
use handshake::{BAD_REQUEST, ClientHandshake, HandshakeError, Upgrade};

/// How long a closing call waits for each peer to take its close frame (the tokio floor's).
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How often deadlines are checked (dials, closing calls) and a failed accept is re-armed.
const TICK: Duration = Duration::from_millis(100);
/// Submission queue entries; a turn that queues more submits early and goes on.
const RING_ENTRIES: u32 = 4096;
/// Unsent bytes on either socket of a call past which neither socket is read until the
/// kernel takes them: a peer that stops reading stalls its own call, never grows a buffer.
const BACKLOG_HIGH_WATER: usize = 64 * 1024;
/// Completions handled per turn, copied out of the ring first (so the handlers can queue
/// submissions). A turn's sends leave when the turn ends, so a backlog of completions (after
/// the thread was descheduled) is worked off in turns of this many rather than one long turn
/// that holds every reply until its end: it bounds the latency batching adds, at one more
/// system call per this many completions.
const COMPLETIONS_PER_TURN: usize = 64;

/// Why the io_uring floor could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UringError {
    #[error(
        "the io_uring floor speaks plain ws:// to the model (got {0:?}); use the tokio floor for --model-tls"
    )]
    NotPlainWs(String),
    #[error("invalid model URL: {0}")]
    ModelUrl(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("the relay thread ended before it was ready")]
    ThreadGone,
}

/// Why one call failed (peer faults, not the ordinary ways a call ends).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    #[error("twilio frames: {0}")]
    TwilioFrames(FrameError),
    #[error("model frames: {0}")]
    ModelFrames(FrameError),
    #[error("twilio handshake: {0}")]
    TwilioHandshake(HandshakeError),
    #[error("model handshake: {0}")]
    ModelHandshake(HandshakeError),
    #[error("the model's socket closed during its handshake")]
    ModelGone,
    #[error("no model socket within {0:?}")]
    ModelTimeout(Duration),
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
}

/// A running io_uring floor. Dropping it shuts it down, like [`UringRelay::shutdown`].
#[derive(Debug)]
pub struct UringRelay {
    addr: SocketAddr,
    fault: Option<Fault>,
    live_calls: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    /// An eventfd the loop reads: writing to it wakes the loop to see `stop`.
    wake: Arc<OwnedFd>,
}

impl UringRelay {
    /// Listens on `listen` (port 0 allowed) and relays every WebSocket on any path to
    /// `upstream_url` (`ws://` only), planting `fault` if given.
    pub fn start(
        listen: SocketAddr,
        upstream_url: &str,
        fault: Option<Fault>,
    ) -> Result<Self, UringError> {
        let model = ModelTarget::parse(upstream_url)?;
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        // SAFETY: eventfd(2) with valid flags; the result is checked before it is owned.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if wake < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: `wake` is a fresh descriptor nothing else owns.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(wake) });
        let live_calls = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        // The ring is built on the thread that uses it (a single-issuer ring belongs to the
        // thread that made it); the thread says whether that worked before `start` returns.
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let shared = Shared {
            model,
            fault,
            mixer: Mixer::default(),
            live_calls: Arc::clone(&live_calls),
            stop: Arc::clone(&stop),
            next_call: 0,
        };
        let loop_wake = Arc::clone(&wake);
        std::thread::Builder::new()
            .name("uring-floor".to_owned())
            .spawn(move || match Driver::new(listener, loop_wake, shared) {
                Ok(mut driver) => {
                    let _ = ready_tx.send(Ok(()));
                    if let Err(error) = driver.run() {
                        tracing::warn!(%error, "io_uring floor: the ring failed");
                        // Operations may still be in flight into buffers the driver owns:
                        // leak them rather than free memory the kernel may still write.
                        std::mem::forget(driver);
                    }
                }
                Err(error) => {
                    let _ = ready_tx.send(Err(error));
                }
            })?;
        ready_rx.recv().map_err(|_| UringError::ThreadGone)??;
        Ok(Self {
            addr,
            fault,
            live_calls,
            stop,
            wake,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The fault planted, if any.
    pub fn fault(&self) -> Option<Fault> {
        self.fault
    }

    /// Calls whose Twilio WebSocket is open.
    pub fn live_calls(&self) -> usize {
        self.live_calls.load(Ordering::SeqCst)
    }

    /// Stops accepting and ends every live call (both sockets get a close frame). Returns at
    /// once; [`UringRelay::live_calls`] reaches 0 when the calls have closed.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let one: u64 = 1;
        // SAFETY: an 8-byte write from a live u64 to an eventfd we own. A failure means the
        // counter is already non-zero, which wakes the loop just the same.
        unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                (&raw const one).cast(),
                std::mem::size_of::<u64>(),
            );
        }
    }
}

impl Drop for UringRelay {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The model's address and the request line's parts, resolved once at start (the benchmark's
/// model is an IP literal, so the tokio floor's per-dial lookup costs nothing either).
#[derive(Debug)]
struct ModelTarget {
    addr: SocketAddr,
    host: String,
    path: String,
}

impl ModelTarget {
    fn parse(url: &str) -> Result<Self, UringError> {
        let parsed =
            url::Url::parse(url).map_err(|error| UringError::ModelUrl(error.to_string()))?;
        if parsed.scheme() != "ws" {
            return Err(UringError::NotPlainWs(parsed.scheme().to_owned()));
        }
        let host = parsed
            .host_str()
            .ok_or_else(|| UringError::ModelUrl("no host".to_owned()))?;
        let port = parsed.port().unwrap_or(80);
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|error| UringError::ModelUrl(error.to_string()))?
            .next()
            .ok_or_else(|| UringError::ModelUrl(format!("{host} has no address")))?;
        let mut path = parsed.path().to_owned();
        if let Some(query) = parsed.query() {
            path.push('?');
            path.push_str(query);
        }
        Ok(Self {
            addr,
            host: match parsed.port() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_owned(),
            },
            path,
        })
    }
}

/// What every call needs; owned by the loop's thread.
struct Shared {
    model: ModelTarget,
    fault: Option<Fault>,
    mixer: Mixer,
    live_calls: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    next_call: u64,
}

/// What a completion is for: the low byte of its `user_data`; the call's slot is above it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Accept = 1,
    Tick,
    Wake,
    TwilioRecv,
    TwilioSend,
    ModelConnect,
    ModelRecv,
    ModelSend,
    /// A cancellation's own completion: nothing to do.
    Cancel,
}

impl Op {
    fn of(user_data: u64) -> Option<(Self, usize)> {
        let op = match user_data & 0xFF {
            1 => Self::Accept,
            2 => Self::Tick,
            3 => Self::Wake,
            4 => Self::TwilioRecv,
            5 => Self::TwilioSend,
            6 => Self::ModelConnect,
            7 => Self::ModelRecv,
            8 => Self::ModelSend,
            9 => Self::Cancel,
            _ => return None,
        };
        Some((op, (user_data >> 8) as usize))
    }

    fn tag(self, slot: usize) -> u64 {
        ((slot as u64) << 8) | self as u64
    }
}

/// One socket of a call.
struct Socket {
    fd: OwnedFd,
    reader: Reader,
    writer: Writer,
    recv_armed: bool,
    send_armed: bool,
}

impl Socket {
    fn new(fd: OwnedFd, from: Peer, cap: usize) -> Self {
        Self {
            fd,
            reader: Reader::new(from, cap),
            writer: Writer::new(OUT_CAPACITY),
            recv_armed: false,
            send_armed: false,
        }
    }

    fn in_flight(&self) -> bool {
        self.recv_armed || self.send_armed
    }
}

#[derive(Debug)]
enum TwilioPhase {
    /// Reading the HTTP upgrade request.
    Http,
    /// A WebSocket: counted as a live call.
    Open,
}

enum ModelPhase {
    Absent,
    Connecting {
        deadline: Instant,
        /// The address `connect` reads until its completion.
        addr: Box<(libc::sockaddr_storage, libc::socklen_t)>,
    },
    Handshake {
        deadline: Instant,
        handshake: ClientHandshake,
    },
    Open,
}

#[derive(Debug)]
enum Lifecycle {
    Running,
    /// Close frames queued; the sockets close once they are sent or at `deadline`.
    Closing {
        deadline: Instant,
    },
    /// The sockets' operations are being cancelled; the slot frees once none is in flight.
    Done,
}

struct Call {
    twilio: Socket,
    twilio_phase: TwilioPhase,
    model: Option<Socket>,
    model_phase: ModelPhase,
    connect_armed: bool,
    work: CallWork,
    lifecycle: Lifecycle,
    queued_for_arming: bool,
}

impl Call {
    fn in_flight(&self) -> bool {
        self.connect_armed
            || self.twilio.in_flight()
            || self.model.as_ref().is_some_and(Socket::in_flight)
    }

    fn backlogged(&self) -> bool {
        self.twilio.writer.backlog() > BACKLOG_HIGH_WATER
            || self
                .model
                .as_ref()
                .is_some_and(|model| model.writer.backlog() > BACKLOG_HIGH_WATER)
    }
}

/// The loop's state: the ring, the listener, and every call in a slot.
struct Driver {
    ring: IoUring,
    listener: Option<TcpListener>,
    accept_armed: bool,
    accept_retry: bool,
    wake: Arc<OwnedFd>,
    /// The eventfd read's target and the tick's timespec: the kernel reads and writes them
    /// after submission, so they live on the heap, put.
    wake_buf: Box<u64>,
    tick: Box<types::Timespec>,
    calls: Vec<Option<Box<Call>>>,
    free: Vec<usize>,
    to_arm: Vec<usize>,
    completions: Vec<cqueue::Entry>,
    shared: Shared,
    stopping: bool,
}

impl Driver {
    fn new(listener: TcpListener, wake: Arc<OwnedFd>, shared: Shared) -> Result<Self, UringError> {
        // Completions are reaped only when this thread enters the kernel (no task work
        // interrupting it between turns); older kernels take the plain ring.
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_coop_taskrun()
            .setup_cqsize(RING_ENTRIES * 4)
            .build(RING_ENTRIES)
            .or_else(|_| IoUring::new(RING_ENTRIES))?;
        Ok(Self {
            ring,
            listener: Some(listener),
            accept_armed: false,
            accept_retry: false,
            wake,
            wake_buf: Box::new(0),
            tick: Box::new(
                types::Timespec::new()
                    .sec(TICK.as_secs())
                    .nsec(TICK.subsec_nanos()),
            ),
            calls: Vec::new(),
            free: Vec::new(),
            to_arm: Vec::new(),
            completions: Vec::with_capacity(COMPLETIONS_PER_TURN),
            shared,
            stopping: false,
        })
    }

    /// Queues one submission, submitting early if the queue is full.
    fn push(&mut self, entry: squeue::Entry) -> std::io::Result<()> {
        loop {
            // SAFETY: every entry's buffers (a socket's reader or writer, a call's boxed
            // address, the driver's boxed timespec and eventfd buffer) stay where they are
            // until its completion has been reaped: calls and their buffers are freed only once
            // nothing of theirs is in flight, and the driver outlives the ring's use.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn run(&mut self) -> std::io::Result<()> {
        self.arm_accept()?;
        self.push(
            opcode::Timeout::new(&raw const *self.tick)
                .build()
                .user_data(Op::Tick.tag(0)),
        )?;
        self.arm_wake()?;
        loop {
            if self.stopping && self.listener.is_none() && self.calls.iter().all(Option::is_none) {
                return Ok(());
            }
            // Wait only when nothing is left from the last turn; enter the kernel only to wait
            // or to submit.
            let wait = usize::from(self.ring.completion().is_empty());
            if wait > 0 || !self.ring.submission().is_empty() {
                match self.ring.submit_and_wait(wait) {
                    Ok(_) => {}
                    Err(error) if error.raw_os_error() == Some(libc::EINTR) => continue,
                    // The completion queue is full: reap it below, then submit again.
                    Err(error) if error.raw_os_error() == Some(libc::EBUSY) => {}
                    Err(error) => return Err(error),
                }
            }
            self.completions.clear();
            self.completions
                .extend(self.ring.completion().take(COMPLETIONS_PER_TURN));
            for at in 0..self.completions.len() {
                let entry = self.completions[at].clone();
                self.complete(&entry)?;
            }
            while let Some(slot) = self.to_arm.pop() {
                self.arm(slot)?;
            }
        }
    }

    fn complete(&mut self, entry: &cqueue::Entry) -> std::io::Result<()> {
        let Some((op, slot)) = Op::of(entry.user_data()) else {
            return Ok(());
        };
        let result = entry.result();
        match op {
            Op::Accept => self.accepted(result, cqueue::more(entry.flags())),
            Op::Tick => self.ticked(),
            Op::Wake => {
                if self.shared.stop.load(Ordering::SeqCst) {
                    self.stop_all();
                    Ok(())
                } else {
                    self.arm_wake()
                }
            }
            Op::Cancel => Ok(()),
            Op::TwilioRecv | Op::TwilioSend | Op::ModelConnect | Op::ModelRecv | Op::ModelSend => {
                let Some(call) = self.calls.get_mut(slot).and_then(Option::as_mut) else {
                    return Ok(());
                };
                let outcome = on_call_completion(call, op, result, &mut self.shared);
                if let Some(outcome) = outcome {
                    end_call(call, outcome);
                }
                self.queue_arming(slot);
                Ok(())
            }
        }
    }

    fn arm_accept(&mut self) -> std::io::Result<()> {
        let Some(listener) = &self.listener else {
            return Ok(());
        };
        let entry = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(Op::Accept.tag(0));
        self.accept_armed = true;
        self.push(entry)
    }

    fn arm_wake(&mut self) -> std::io::Result<()> {
        let entry = opcode::Read::new(
            types::Fd(self.wake.as_raw_fd()),
            (&raw mut *self.wake_buf).cast(),
            std::mem::size_of::<u64>() as u32,
        )
        .build()
        .user_data(Op::Wake.tag(0));
        self.push(entry)
    }

    fn accepted(&mut self, result: i32, more: bool) -> std::io::Result<()> {
        if !more {
            self.accept_armed = false;
        }
        if result < 0 {
            if self.stopping {
                if !more {
                    // The listener's last operation is over: closing it now really closes it.
                    self.listener = None;
                }
            } else {
                tracing::warn!(
                    error = %std::io::Error::from_raw_os_error(-result),
                    "io_uring floor: accept failed"
                );
                // Re-armed on the next tick, so a persistent failure cannot spin.
                self.accept_retry = !more;
            }
            return Ok(());
        }
        // SAFETY: a successful accept's result is a new descriptor that we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(result) };
        if self.stopping {
            return Ok(());
        }
        if !more {
            // The kernel ended the multishot accept: keep listening.
            self.arm_accept()?;
        }
        // Every Twilio-side write is one small frame; Nagle would hold the second of two
        // back-to-back frames until the first is acknowledged.
        set_nodelay(fd.as_raw_fd());
        let call = Box::new(Call {
            twilio: Socket::new(fd, Peer::Client, MAX_TWILIO_MESSAGE_BYTES),
            twilio_phase: TwilioPhase::Http,
            model: None,
            model_phase: ModelPhase::Absent,
            connect_armed: false,
            work: CallWork::new(0, self.shared.fault),
            lifecycle: Lifecycle::Running,
            queued_for_arming: false,
        });
        let slot = match self.free.pop() {
            Some(slot) => {
                self.calls[slot] = Some(call);
                slot
            }
            None => {
                self.calls.push(Some(call));
                self.calls.len() - 1
            }
        };
        self.queue_arming(slot);
        Ok(())
    }

    fn ticked(&mut self) -> std::io::Result<()> {
        let now = Instant::now();
        for slot in 0..self.calls.len() {
            let Some(call) = self.calls[slot].as_mut() else {
                continue;
            };
            let due = match (&call.lifecycle, &call.model_phase) {
                (Lifecycle::Closing { deadline }, _) => *deadline <= now,
                (
                    Lifecycle::Running,
                    ModelPhase::Connecting { deadline, .. }
                    | ModelPhase::Handshake { deadline, .. },
                ) if *deadline <= now => {
                    end_call(call, Err(CallError::ModelTimeout(CONNECT_TIMEOUT)));
                    true
                }
                _ => false,
            };
            if due {
                self.queue_arming(slot);
            }
        }
        if self.accept_retry && !self.accept_armed && !self.stopping {
            self.accept_retry = false;
            self.arm_accept()?;
        }
        self.push(
            opcode::Timeout::new(&raw const *self.tick)
                .build()
                .user_data(Op::Tick.tag(0)),
        )
    }

    /// Stops accepting and ends every call.
    fn stop_all(&mut self) {
        self.stopping = true;
        if self.accept_armed {
            // The pending accept holds the listener open; cancelling it ends it with an error
            // completion, which closes the listener.
            let cancel = opcode::AsyncCancel::new(Op::Accept.tag(0))
                .build()
                .user_data(Op::Cancel.tag(0));
            if self.push(cancel).is_err() {
                self.listener = None;
            }
        } else {
            self.listener = None;
        }
        for slot in 0..self.calls.len() {
            if let Some(call) = self.calls[slot].as_mut() {
                end_call(call, Ok(EndReason::Shutdown));
                self.queue_arming(slot);
            }
        }
    }

    fn queue_arming(&mut self, slot: usize) {
        if let Some(call) = self.calls.get_mut(slot).and_then(Option::as_mut)
            && !call.queued_for_arming
        {
            call.queued_for_arming = true;
            self.to_arm.push(slot);
        }
    }

    /// Queues what a call's state asks for: sends of queued bytes, reads where reading is
    /// allowed, the model's connect; or, for an ending call, closes it once its close frames
    /// are out and frees its slot once nothing of it is in flight.
    fn arm(&mut self, slot: usize) -> std::io::Result<()> {
        let mut entries: [Option<squeue::Entry>; 5] = Default::default();
        let mut free = false;
        {
            let Some(call) = self.calls.get_mut(slot).and_then(Option::as_mut) else {
                return Ok(());
            };
            call.queued_for_arming = false;
            if let Lifecycle::Closing { deadline } = call.lifecycle {
                let flushed = call.twilio.writer.backlog() == 0
                    && call.model.as_ref().is_none_or(|m| m.writer.backlog() == 0);
                if flushed || deadline <= Instant::now() {
                    call.lifecycle = Lifecycle::Done;
                }
            }
            match call.lifecycle {
                Lifecycle::Done => {
                    if call.in_flight() {
                        // Ends whatever is still in flight on either socket (a stalled send, a
                        // pending read, a connect); their completions then free the slot.
                        entries[0] = Some(cancel_all(&call.twilio.fd));
                        if let Some(model) = &call.model {
                            entries[1] = Some(cancel_all(&model.fd));
                        }
                    } else {
                        free = true;
                    }
                }
                Lifecycle::Running | Lifecycle::Closing { .. } => {
                    let running = matches!(call.lifecycle, Lifecycle::Running);
                    let reading = running && !call.backlogged();
                    let (twilio, model) = (&mut call.twilio, call.model.as_mut());
                    entries[0] = send_entry(twilio, Op::TwilioSend.tag(slot));
                    if reading && !call.work.dialling() {
                        entries[1] = recv_entry(twilio, Op::TwilioRecv.tag(slot));
                    }
                    if let Some(model) = model {
                        entries[2] = send_entry(model, Op::ModelSend.tag(slot));
                        if reading
                            && matches!(
                                call.model_phase,
                                ModelPhase::Handshake { .. } | ModelPhase::Open
                            )
                        {
                            entries[3] = recv_entry(model, Op::ModelRecv.tag(slot));
                        }
                        if let ModelPhase::Connecting { addr, .. } = &call.model_phase
                            && !call.connect_armed
                            && running
                        {
                            call.connect_armed = true;
                            entries[4] = Some(
                                opcode::Connect::new(
                                    types::Fd(model.fd.as_raw_fd()),
                                    (&raw const addr.0).cast(),
                                    addr.1,
                                )
                                .build()
                                .user_data(Op::ModelConnect.tag(slot)),
                            );
                        }
                    }
                }
            }
        }
        for entry in entries.into_iter().flatten() {
            self.push(entry)?;
        }
        if free {
            if let Some(call) = self.calls.get_mut(slot).and_then(Option::take)
                && matches!(call.twilio_phase, TwilioPhase::Open)
            {
                self.shared.live_calls.fetch_sub(1, Ordering::SeqCst);
            }
            self.free.push(slot);
        }
        Ok(())
    }
}

fn cancel_all(fd: &OwnedFd) -> squeue::Entry {
    opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd.as_raw_fd())).all())
        .build()
        .user_data(Op::Cancel.tag(0))
}

fn send_entry(socket: &mut Socket, tag: u64) -> Option<squeue::Entry> {
    if socket.send_armed {
        return None;
    }
    let bytes = socket.writer.start_send()?;
    socket.send_armed = true;
    Some(
        opcode::Send::new(
            types::Fd(socket.fd.as_raw_fd()),
            bytes.as_ptr(),
            bytes.len().min(u32::MAX as usize) as u32,
        )
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(tag),
    )
}

fn recv_entry(socket: &mut Socket, tag: u64) -> Option<squeue::Entry> {
    if socket.recv_armed {
        return None;
    }
    let spare = socket.reader.spare();
    let entry = opcode::Recv::new(
        types::Fd(socket.fd.as_raw_fd()),
        spare.as_mut_ptr(),
        spare.len().min(u32::MAX as usize) as u32,
    )
    .build()
    .user_data(tag);
    socket.recv_armed = true;
    Some(entry)
}

fn set_nodelay(fd: RawFd) {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt(2) on a socket we own, reading one c_int that lives across the call.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// How a call ends: the tokio floor's reasons, or a fault.
type Outcome = Result<EndReason, CallError>;

/// Starts ending `call` (once): queues a close frame on each WebSocket still open and stops
/// reading.
fn end_call(call: &mut Call, outcome: Outcome) {
    if !matches!(call.lifecycle, Lifecycle::Running) {
        return;
    }
    match &outcome {
        Ok(reason) => tracing::debug!(?reason, "io_uring floor: call ended"),
        Err(error) => tracing::info!(%error, "io_uring floor: call failed"),
    }
    if matches!(call.twilio_phase, TwilioPhase::Open) {
        call.twilio
            .writer
            .push_frame(OpCode::Close, &1000u16.to_be_bytes(), None);
    }
    if let (ModelPhase::Open, Some(model)) = (&call.model_phase, call.model.as_mut()) {
        model
            .writer
            .push_frame(OpCode::Close, &[], Some(rand::random()));
    }
    call.lifecycle = Lifecycle::Closing {
        deadline: Instant::now() + CLOSE_GRACE,
    };
}

fn io_error(what: &'static str, result: i32) -> CallError {
    CallError::Io(what, std::io::Error::from_raw_os_error(-result))
}

/// Handles one completion of `call`'s; `Some` ends the call.
fn on_call_completion(
    call: &mut Call,
    op: Op,
    result: i32,
    shared: &mut Shared,
) -> Option<Outcome> {
    let running = matches!(call.lifecycle, Lifecycle::Running);
    match op {
        Op::TwilioSend | Op::ModelSend => {
            let socket = if op == Op::TwilioSend {
                &mut call.twilio
            } else {
                call.model.as_mut()?
            };
            socket.send_armed = false;
            if result < 0 {
                socket.writer.failed();
                return running.then(|| Err(io_error("send", result)));
            }
            socket.writer.sent(result as usize);
            None
        }
        Op::TwilioRecv => {
            call.twilio.recv_armed = false;
            if !running {
                return None;
            }
            match result {
                ..0 => Some(Err(io_error("twilio recv", result))),
                0 => Some(Ok(EndReason::TwilioClosed)),
                n => {
                    call.twilio.reader.filled(n as usize);
                    on_twilio_bytes(call, shared)
                }
            }
        }
        Op::ModelConnect => {
            call.connect_armed = false;
            if !running {
                return None;
            }
            if result < 0 {
                return Some(Err(io_error("model connect", result)));
            }
            let ModelPhase::Connecting { deadline, .. } = call.model_phase else {
                return None;
            };
            let model = call.model.as_mut()?;
            set_nodelay(model.fd.as_raw_fd());
            let mut request = Vec::with_capacity(512);
            let handshake = ClientHandshake::start(
                &mut request,
                &shared.model.host,
                &shared.model.path,
                UPSTREAM_KEY,
            );
            model.writer.push_raw(&request);
            call.model_phase = ModelPhase::Handshake {
                deadline,
                handshake,
            };
            None
        }
        Op::ModelRecv => {
            let model = call.model.as_mut()?;
            model.recv_armed = false;
            if !running {
                return None;
            }
            match result {
                ..0 => Some(Err(io_error("model recv", result))),
                0 if matches!(call.model_phase, ModelPhase::Open) => {
                    Some(Ok(EndReason::UpstreamClosed))
                }
                0 => Some(Err(CallError::ModelGone)),
                n => {
                    model.reader.filled(n as usize);
                    on_model_bytes(call, shared)
                }
            }
        }
        Op::Accept | Op::Tick | Op::Wake | Op::Cancel => None,
    }
}

/// Handles what the Twilio socket has brought: the upgrade request, then messages until they
/// run out or a `start` waits for its model socket.
fn on_twilio_bytes(call: &mut Call, shared: &mut Shared) -> Option<Outcome> {
    if matches!(call.twilio_phase, TwilioPhase::Http) {
        let mut response = Vec::with_capacity(160);
        match handshake::accept_upgrade(call.twilio.reader.pending(), &mut response) {
            Ok(Upgrade::Partial) => return None,
            Ok(Upgrade::Accepted { head }) => {
                call.twilio.reader.consume(head);
                call.twilio.writer.push_raw(&response);
                call.twilio_phase = TwilioPhase::Open;
                call.work = CallWork::new(shared.next_call, shared.fault);
                shared.next_call += 1;
                shared.live_calls.fetch_add(1, Ordering::SeqCst);
            }
            Err(error) => {
                tracing::debug!(%error, "io_uring floor: not a websocket upgrade");
                call.twilio.writer.push_raw(BAD_REQUEST);
                return Some(Err(CallError::TwilioHandshake(error)));
            }
        }
    }
    while !call.work.dialling() {
        let message = match call.twilio.reader.next_message() {
            Ok(Some(message)) => message,
            Ok(None) => return None,
            Err(error) => return Some(Err(CallError::TwilioFrames(error))),
        };
        match message.opcode {
            OpCode::Text => {
                let Ok(text) = std::str::from_utf8(message.payload) else {
                    continue;
                };
                match call.work.on_twilio(text) {
                    TwilioOutcome::Nothing => {}
                    TwilioOutcome::ToModel => {
                        if let Some(model) = call.model.as_mut() {
                            model.writer.push_frame(
                                OpCode::Text,
                                call.work.to_model().as_bytes(),
                                Some(rand::random()),
                            );
                        }
                    }
                    TwilioOutcome::Dial => {
                        if let Err(error) = dial(call, &shared.model) {
                            return Some(Err(error));
                        }
                    }
                    TwilioOutcome::End(reason) => return Some(Ok(reason)),
                }
            }
            OpCode::Ping => {
                call.twilio
                    .writer
                    .push_frame(OpCode::Pong, message.payload, None);
            }
            OpCode::Close => return Some(Ok(EndReason::TwilioClosed)),
            OpCode::Binary | OpCode::Pong | OpCode::Continuation => {}
        }
    }
    None
}

/// Opens the model's socket; its connect is queued when the call is next armed.
fn dial(call: &mut Call, model: &ModelTarget) -> Result<(), CallError> {
    let (storage, len) = sockaddr(model.addr);
    let family = if model.addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket(2) with constant arguments; the result is checked before it is owned.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(CallError::Io("socket", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    call.model = Some(Socket::new(fd, Peer::Server, MAX_UPSTREAM_MESSAGE_BYTES));
    call.model_phase = ModelPhase::Connecting {
        deadline: Instant::now() + CONNECT_TIMEOUT,
        addr: Box::new((storage, len)),
    };
    Ok(())
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid (empty) value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Handles what the model socket has brought: the handshake's answer, then messages.
fn on_model_bytes(call: &mut Call, shared: &mut Shared) -> Option<Outcome> {
    let model = call.model.as_mut()?;
    if let ModelPhase::Handshake { handshake, .. } = &call.model_phase {
        match handshake.finish(model.reader.pending()) {
            Ok(None) => return None,
            Ok(Some(head)) => {
                model.reader.consume(head);
                model.writer.push_frame(
                    OpCode::Text,
                    SESSION_UPDATE.as_bytes(),
                    Some(rand::random()),
                );
                call.model_phase = ModelPhase::Open;
                call.work.model_opened();
                // Twilio's messages held during the dial go now, before the model's.
                if let Some(outcome) = on_twilio_bytes(call, shared) {
                    return Some(outcome);
                }
            }
            Err(error) => return Some(Err(CallError::ModelHandshake(error))),
        }
    }
    let model = call.model.as_mut()?;
    loop {
        let message = match model.reader.next_message() {
            Ok(Some(message)) => message,
            Ok(None) => return None,
            Err(error) => return Some(Err(CallError::ModelFrames(error))),
        };
        match message.opcode {
            OpCode::Text => {
                let Ok(text) = std::str::from_utf8(message.payload) else {
                    continue;
                };
                call.work.on_model(text, &shared.mixer);
                for out in call.work.to_twilio() {
                    call.twilio
                        .writer
                        .push_frame(OpCode::Text, out.as_bytes(), None);
                }
            }
            OpCode::Ping => {
                // tungstenite's peers expect the pong it would send.
                let mask = Some(rand::random());
                model.writer.push_frame(OpCode::Pong, message.payload, mask);
            }
            OpCode::Close => return Some(Ok(EndReason::UpstreamClosed)),
            OpCode::Binary | OpCode::Pong | OpCode::Continuation => {}
        }
    }
}
