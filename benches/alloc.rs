//! Heap allocations per frame on the bridge's media paths, counted by a wrapping global
//! allocator.
//!
//! Two levels, like the timing benches:
//! - **engine**: the real `CallEngine` without sockets, in both audio modes; uplink is one
//!   Twilio `media` message in → one `input_audio_buffer.append` out, downlink one 20 ms model
//!   delta in → Twilio `media` + `mark` out. Spent outbound buffers are handed back to the
//!   engine as the call task does.
//! - **call**: the real call task (`run_call`: the engine, both sockets and their buffers) on
//!   its own thread and current-thread runtime, with the Twilio leg over an in-memory
//!   `tokio::io::duplex` pipe and the model leg over loopback TCP to the benchmark's echo model.
//!   The simulated Twilio peer and the echo model run on another thread, and only allocations
//!   made on the call's thread are counted. Uplink-only: the model never answers, and each
//!   frame is sent once the model has the previous one (one frame per wake-up, as at 50
//!   frames a second). Both ways: real-time 20 ms frames echoed back by the model 20 ms later,
//!   so each 20 ms carries one frame each way, a `mark` and its echo.
//!
//! Run with `cargo bench --bench alloc`. Counts are exact and deterministic for the engine;
//! the call-level counts can vary by a few allocations per run (the runtime's own
//! bookkeeping, timer wheels). The run fails (exit 1) when any scenario allocates
//! [`MAX_ALLOCATIONS_PER_FRAME`] or more per frame, so `.ci/run` catches allocations coming
//! back on the media path.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocket};
use tokio_util::sync::CancellationToken;
use voxrelay::AudioMode;
use voxrelay::bench::echo_model::{EchoModel, EchoModelConfig};
use voxrelay::bench::results::Epoch;
use voxrelay::config::{AgentDefaults, ModelTargets, UpstreamTarget};
use voxrelay::session::binding::StreamTokens;
use voxrelay::session::call::{CallServices, run_call};
use voxrelay::session::engine::{CallEngine, Input, Output};
use voxrelay::session::metrics::Metrics;
use voxrelay::session::playback::PlaybackConfig;
use voxrelay::session::prewarm::{PendingCalls, PendingLimits};
use voxrelay::session::registry::CallRegistry;

#[path = "shared/engine_paths.rs"]
mod engine_paths;
use engine_paths::{Path, STREAM_SID, start_message, started_engine};
use voxrelay::{Secret, bench::echo_model::EchoSessionRecord};

/// Counts the allocations (and reallocations) made on threads that opted in.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

fn note(size: usize) {
    if COUNTED.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Relaxed);
        BYTES.fetch_add(size as u64, Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the arguments it was given; counting touches
// only atomics and a const-initialised thread-local (no allocation, no re-entry).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Clone, Copy)]
struct Count {
    allocations: u64,
    bytes: u64,
}

impl Count {
    fn now() -> Self {
        Self {
            allocations: ALLOCATIONS.load(Relaxed),
            bytes: BYTES.load(Relaxed),
        }
    }

    fn since(self, before: Count) -> Count {
        Count {
            allocations: self.allocations - before.allocations,
            bytes: self.bytes - before.bytes,
        }
    }
}

/// The most a scenario may allocate per frame before the run fails: 20 in 2,000 frames.
const MAX_ALLOCATIONS_PER_FRAME: f64 = 0.01;

/// Set when a scenario allocated on the per-frame path: the run then fails.
static ALLOCATED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn report(path: &str, label: &str, count: Count, frames: u64) {
    // A per-frame allocation shows as 1.0 or more; the runtime's own bookkeeping (timer
    // wheels, a task's first poll) as a few in a run.
    if count.allocations as f64 / frames as f64 >= MAX_ALLOCATIONS_PER_FRAME {
        ALLOCATED.store(true, Relaxed);
    }
    println!(
        "{path:<34} {:<6} {:>8.2} allocations/frame {:>9.0} bytes/frame   ({} frames)",
        label,
        count.allocations as f64 / frames as f64,
        count.bytes as f64 / frames as f64,
        frames
    );
}

const FRAMES: u64 = 2_000;
const WARM_UP: u64 = 200;

/// A Twilio `media` message as Twilio lays it out, into a reused buffer.
fn media_message(text: &mut String, sequence: u64, payload_b64: &str) {
    use std::fmt::Write as _;
    text.clear();
    let _ = write!(
        text,
        r#"{{"event":"media","sequenceNumber":"{sequence}","media":{{"track":"inbound","chunk":"{}","timestamp":"{}","payload":"{payload_b64}"}},"streamSid":"{STREAM_SID}"}}"#,
        sequence - 1,
        (sequence - 2) * 20
    );
}

fn speech_payload() -> String {
    BASE64.encode(
        (0..160u32)
            .map(|i| (i * 37 % 256) as u8)
            .collect::<Vec<_>>(),
    )
}

/// Takes the engine's outputs as the driver does, keeping each written text for reuse.
fn take_texts(engine: &mut CallEngine, spent: &mut Vec<String>) {
    while let Some(output) = engine.poll_output() {
        if let Output::ToModel(out) | Output::ToTwilio(out) = output {
            spent.push(out.text);
        }
    }
}

/// Runs `f` with this thread's allocations counted.
fn counted(f: impl FnOnce()) -> Count {
    COUNTED.set(true);
    let before = Count::now();
    f();
    let after = Count::now();
    COUNTED.set(false);
    after.since(before)
}

fn engine_uplink(path: Path) {
    let now = Instant::now();
    let mut engine = started_engine(path, now);
    let payload = speech_payload();
    let mut text = String::with_capacity(512);
    let mut sequence = 2;
    let mut spent = Vec::with_capacity(8);
    let mut frame = |engine: &mut CallEngine| {
        media_message(&mut text, sequence, &payload);
        sequence += 1;
        engine.handle(now, Input::Twilio(&text)).unwrap();
        // The call task's side of the contract: write, then hand the buffer back.
        take_texts(engine, &mut spent);
        for text in spent.drain(..) {
            engine.recycle_model(text);
        }
    };
    for _ in 0..WARM_UP {
        frame(&mut engine);
    }
    let count = counted(|| {
        for _ in 0..FRAMES {
            frame(&mut engine);
        }
    });
    report("engine uplink (media → append)", path.name(), count, FRAMES);
}

fn engine_downlink(path: Path) {
    let start = Instant::now();
    let mut engine = started_engine(path, start);
    let delta = path.model_delta(&mut engine, start);
    let mut tick = 0u32;
    let mut spent = Vec::with_capacity(8);
    let mut frame = |engine: &mut CallEngine| {
        // Real time advances 20 ms per delta, so the pacer sends one chunk each time.
        tick += 1;
        let now = start + Duration::from_millis(20) * tick;
        engine.handle(now, Input::Model(&delta)).unwrap();
        // The call task's side of the contract: write, then hand the buffers back.
        take_texts(engine, &mut spent);
        for text in spent.drain(..) {
            engine.recycle_twilio(text);
        }
    };
    for _ in 0..WARM_UP {
        frame(&mut engine);
    }
    let count = counted(|| {
        for _ in 0..FRAMES {
            frame(&mut engine);
        }
    });
    report(
        "engine downlink (delta → media+mark)",
        path.name(),
        count,
        FRAMES,
    );
}

/// The simulated Twilio side of one call, plus the echo model, on the calling thread's
/// runtime; the call itself runs on a thread of its own whose allocations are counted.
struct CallRig {
    ws: WebSocket<tokio::io::DuplexStream>,
    model: EchoModel,
    bridge: std::thread::JoinHandle<()>,
    cancel: CancellationToken,
    sequence: u64,
}

impl CallRig {
    async fn start(mode: AudioMode, model_delay: Duration) -> Self {
        let model = EchoModel::start(
            EchoModelConfig {
                model_delay,
                barge_in_first_after: Duration::from_secs(3_600),
                barge_in_every: None,
                ..EchoModelConfig::default()
            },
            Epoch::now(),
        )
        .await
        .expect("echo model");
        let metrics = Arc::new(Metrics::default());
        let services = Arc::new(CallServices {
            metrics: Arc::clone(&metrics),
            registry: CallRegistry::new(Arc::clone(&metrics)),
            pending: Arc::new(PendingCalls::new(
                metrics,
                PendingLimits::new(Duration::from_secs(15), 16),
            )),
            tokens: StreamTokens::from_auth_token(&Secret::new("bench")),
            require_stream_token: false,
            prewarm: false,
            twilio_account_sid: None,
            control: None,
            models: ModelTargets::openai(UpstreamTarget {
                url: model.url(),
                api_key: Some(Secret::new("bench")),
            }),
            agent: AgentDefaults {
                audio_mode: mode,
                greeting: None,
                ..AgentDefaults::default()
            },
            playback: PlaybackConfig::default(),
            continuity: voxrelay::config::ContinuitySettings::default(),
            recording: voxrelay::recording::RecordingSettings::default(),
        });
        let (twilio, bridge_side) = tokio::io::duplex(64 * 1024);
        let cancel = CancellationToken::new();
        let bridge = {
            let cancel = cancel.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                COUNTED.set(true);
                runtime.block_on(run_call(
                    WebSocket::after_handshake(bridge_side, Role::Server),
                    services,
                    cancel,
                ));
                COUNTED.set(false);
            })
        };
        let mut ws = WebSocket::after_handshake(twilio, Role::Client);
        ws.set_auto_pong(true);
        let mut rig = Self {
            ws,
            model,
            bridge,
            cancel,
            sequence: 1,
        };
        rig.send(r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#)
            .await;
        rig.send(&start_message()).await;
        while rig
            .session()
            .is_none_or(|s| s.session_update_at_us.is_none())
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        rig
    }

    async fn send(&mut self, text: &str) {
        self.ws
            .write_frame(Frame::text(Payload::Owned(text.as_bytes().to_vec())))
            .await
            .expect("twilio leg write");
    }

    async fn send_media(&mut self, text: &mut String, payload: &str) {
        self.sequence += 1;
        media_message(text, self.sequence, payload);
        let message = std::mem::take(text);
        self.send(&message).await;
        *text = message;
    }

    fn session(&self) -> Option<EchoSessionRecord> {
        self.model.records().into_iter().next()
    }

    fn appends(&self) -> usize {
        self.session().map_or(0, |s| s.appends.len())
    }

    async fn stop(self) {
        self.cancel.cancel();
        drop(self.ws);
        let bridge = self.bridge;
        tokio::task::spawn_blocking(move || bridge.join())
            .await
            .expect("join")
            .expect("the call thread panicked");
        self.model.shutdown();
    }
}

/// Frames measured per call scenario: `ALLOC_CALL_FRAMES` or `default`. Under callgrind, two
/// runs with different counts give the call task's instructions per frame without its set-up.
fn call_frames(default: u64) -> u64 {
    std::env::var("ALLOC_CALL_FRAMES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// One frame at a time, each sent once the model has the one before; the model never answers.
async fn call_uplink(mode: AudioMode) {
    let mut rig = CallRig::start(mode, Duration::from_secs(3_600)).await;
    let payload = speech_payload();
    let mut text = String::with_capacity(512);
    let frames = call_frames(FRAMES / 4);
    let mut measured = Count::now();
    for n in 0..WARM_UP + frames {
        if n == WARM_UP {
            measured = Count::now();
        }
        rig.send_media(&mut text, &payload).await;
        let want = n as usize + 1;
        let waited = Instant::now();
        while rig.appends() < want {
            tokio::time::sleep(Duration::from_micros(200)).await;
            assert!(waited.elapsed() < Duration::from_secs(5), "frame {n} lost");
        }
    }
    let count = Count::now().since(measured);
    rig.stop().await;
    report(
        "call uplink (socket → socket)",
        mode.as_str(),
        count,
        frames,
    );
}

/// Real-time frames, echoed 20 ms later: per 20 ms, one frame each way plus a mark and its echo.
async fn call_both_ways(mode: AudioMode) {
    let mut rig = CallRig::start(mode, Duration::from_millis(20)).await;
    let payload = speech_payload();
    let mut text = String::with_capacity(512);
    let frames = call_frames(200);
    let warm_up = 50;
    let mut measured = Count::now();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut marks = Vec::new();
    for n in 0..warm_up + frames {
        if n == warm_up {
            measured = Count::now();
        }
        rig.send_media(&mut text, &payload).await;
        // Take what the bridge sent until the next frame is due; echo marks as Twilio would
        // once the audio before them played (here: at once; the pacer keeps real time).
        let next = tick.tick();
        tokio::pin!(next);
        loop {
            tokio::select! {
                _ = &mut next => break,
                frame = rig.ws.read_frame() => {
                    let frame = frame.expect("twilio leg read");
                    if frame.opcode == OpCode::Text {
                        let message: serde_json::Value =
                            serde_json::from_slice(&frame.payload).expect("JSON from the bridge");
                        if message["event"] == "mark" {
                            marks.push(message["mark"]["name"].as_str().unwrap_or("").to_owned());
                        }
                    }
                }
            }
        }
        for name in marks.drain(..) {
            rig.sequence += 1;
            let echo = format!(
                r#"{{"event":"mark","sequenceNumber":"{}","streamSid":"{STREAM_SID}","mark":{{"name":"{name}"}}}}"#,
                rig.sequence
            );
            rig.send(&echo).await;
        }
    }
    let count = Count::now().since(measured);
    rig.stop().await;
    report("call both ways (per 20 ms)", mode.as_str(), count, frames);
}

fn main() {
    // `cargo bench` passes `--bench`; other arguments filter by scenario name, e.g.
    // `cargo bench --bench alloc -- call-uplink-pcmu` (names: engine-uplink, engine-downlink,
    // call-uplink, call-both, each with -pcmu or -pcm16; the engine ones also with -gemini).
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |name: &str, path: &str| {
        let name = format!("{name}-{path}");
        filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()))
    };
    for path in Path::ALL {
        if wanted("engine-uplink", path.name()) {
            engine_uplink(path);
        }
        if wanted("engine-downlink", path.name()) {
            engine_downlink(path);
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for mode in [AudioMode::Pcmu, AudioMode::Pcm16] {
        if wanted("call-uplink", mode.as_str()) {
            runtime.block_on(call_uplink(mode));
        }
        if wanted("call-both", mode.as_str()) {
            runtime.block_on(call_both_ways(mode));
        }
    }
    // The per-frame path is allocation-free by design; a regression fails the run (and CI).
    if ALLOCATED.load(Relaxed) {
        eprintln!("allocations came back on the per-frame path (see the lines above)");
        std::process::exit(1);
    }
}
