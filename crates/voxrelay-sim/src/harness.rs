//! `voxrelay bench`: the end-to-end latency harness.
//!
//! One load process runs the echo model (the model side) and N simulated Twilio callers on a
//! shared clock, against a bridge it starts as a child process (the default: its CPU and
//! memory are then read from `/proc`), inside its own process (`--in-process`), or anywhere
//! (`--target URL`). Afterwards every measurement is joined by byte offset: caller frame k
//! reached the model when the model's cumulative input passed k+1 frames; model frame k
//! reached the caller when the caller's cumulative audio in the same response generation did.
//! Nothing is guessed from averages.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use url::Url;

use super::echo_model::{EchoFormat, EchoModel, EchoModelConfig, EchoSessionRecord, LiveRecords};
use super::load::{ID_DIGITS, LoadCallConfig, LoadCallRecord, run_load_call};
use super::results::{BenchResult, Epoch, Machine, Percentiles, RampStep, Samples, SoakSample};
use super::{SPEECH_FIXTURE, http_client, lock};
use crate::launcher::{BridgeLauncher, BridgeSettings, InProcessBridge};
use voxrelay_core::{AudioMode, Secret};

/// μ-law bytes per 20 ms frame at 8 kHz.
const CALLER_FRAME_BYTES: u64 = 160;
/// Samples of plots kept per direction.
const MAX_SAMPLES: usize = 20_000;

#[derive(Clone, Debug)]
pub enum BridgeUnderTest {
    /// `voxrelay serve` (or the baseline relay) as a child process of the harness.
    Child,
    /// The bridge inside the harness's own process.
    InProcess,
    /// A bridge already running elsewhere: its base URL, the public URL it signs against,
    /// and its Twilio auth token. It must be configured to use the harness's echo model.
    Target {
        url: Url,
        public_url: Url,
        auth_token: Secret,
    },
}

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub calls: usize,
    pub seconds: f64,
    pub audio_mode: AudioMode,
    pub bridge: BridgeUnderTest,
    /// Measure the built-in do-nothing relay instead of the bridge.
    pub baseline: bool,
    /// Spread call starts over this long.
    pub ramp_up: Duration,
    pub jitter: Duration,
    pub model_delay: Duration,
    pub barge_in_every: Option<Duration>,
    /// A frame later than this counts as late.
    pub late_threshold: Duration,
    /// Pin the bridge to CPU 0 and the load to CPU 1 (child mode, Linux).
    pub pin: bool,
    /// Where the echo model listens (`--target` needs an address the bridge can reach).
    pub model_listen: SocketAddr,
    /// Print a progress line every second.
    pub progress: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            calls: 20,
            seconds: 10.0,
            audio_mode: AudioMode::Pcmu,
            bridge: BridgeUnderTest::Child,
            baseline: false,
            ramp_up: Duration::from_secs(1),
            jitter: Duration::ZERO,
            model_delay: Duration::from_millis(200),
            barge_in_every: Some(Duration::from_secs(4)),
            late_threshold: Duration::from_millis(40),
            pin: false,
            model_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            progress: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("echo model: {0}")]
    Model(std::io::Error),
    #[error("bridge: {0}")]
    Bridge(String),
    #[error("{0}")]
    Options(String),
}

/// A bridge the harness started, and how to stop it and read its resource use.
enum RunningBridge<B> {
    Child {
        child: tokio::process::Child,
        pid: u32,
    },
    InProcess(B),
    Remote,
}

struct Endpoint {
    connect_url: String,
    signed_url: String,
    auth_token: Secret,
}

/// The echo model and the bridge under test, started for one run.
struct Rig<B> {
    epoch: Epoch,
    model: EchoModel,
    bridge: RunningBridge<B>,
    endpoint: Endpoint,
}

impl<B: InProcessBridge> Rig<B> {
    async fn start(
        options: &BenchOptions,
        launcher: &impl BridgeLauncher<Bridge = B>,
    ) -> Result<Self, BenchError> {
        if options.pin {
            pin_current_process(1)?;
        }
        let epoch = Epoch::now();
        let every = options.barge_in_every;
        let model = EchoModel::start(
            EchoModelConfig {
                model_delay: options.model_delay,
                // The first barge-in comes once echo audio is flowing, at most 3 s in.
                barge_in_first_after: every.map_or(Duration::from_secs(3), |every| {
                    every.min(Duration::from_secs(3))
                }),
                barge_in_every: every,
                listen: options.model_listen,
            },
            epoch,
        )
        .await
        .map_err(BenchError::Model)?;
        let (bridge, endpoint) = start_bridge(options, &model.url(), launcher).await?;
        Ok(Self {
            epoch,
            model,
            bridge,
            endpoint,
        })
    }

    async fn measure(&self, options: &BenchOptions, calls: usize) -> BenchResult {
        measure(
            options,
            self.epoch,
            &self.model,
            &self.bridge,
            &self.endpoint,
            calls,
        )
        .await
    }

    async fn stop(self) {
        stop_bridge(self.bridge).await;
        self.model.shutdown();
    }
}

/// Runs one fixed-size benchmark: `calls` callers for `seconds`. `launcher` starts the bridge
/// for [`BridgeUnderTest::InProcess`].
pub async fn run(
    options: &BenchOptions,
    launcher: &impl BridgeLauncher,
) -> Result<BenchResult, BenchError> {
    let rig = Rig::start(options, launcher).await?;
    let result = rig.measure(options, options.calls).await;
    rig.stop().await;
    Ok(result)
}

/// Raises the call count step by step until p99 added latency passes `budget` or frames go
/// late; the result's `ramp` has every step and `max_calls_held` the largest that held.
pub async fn run_ramp(
    options: &BenchOptions,
    launcher: &impl BridgeLauncher,
    step: usize,
    max_calls: usize,
    budget: Duration,
) -> Result<BenchResult, BenchError> {
    let rig = Rig::start(options, launcher).await?;
    let mut steps = Vec::new();
    let mut last = BenchResult::default();
    let mut calls = options.calls.max(1);
    let mut held_max = None;
    loop {
        let result = rig.measure(options, calls).await;
        let budget_us = budget.as_secs_f64() * 1e6;
        let held = result.errors == 0
            && result.late_frames == 0
            && result.uplink_us.p99 <= budget_us
            && result.downlink_us.p99 <= budget_us;
        if options.progress {
            eprintln!(
                "ramp: {calls} calls: uplink p99 {:.0} µs, downlink p99 {:.0} µs, late {}, errors {} → {}",
                result.uplink_us.p99,
                result.downlink_us.p99,
                result.late_frames,
                result.errors,
                if held { "held" } else { "over budget" }
            );
        }
        steps.push(RampStep {
            calls,
            uplink_us: result.uplink_us.clone(),
            downlink_us: result.downlink_us.clone(),
            late_frames: result.late_frames,
            errors: result.errors,
            held,
        });
        if held {
            held_max = Some(calls);
            last = result;
        } else if last.calls == 0 {
            last = result;
        }
        if !held || calls >= max_calls {
            break;
        }
        calls = (calls + step).min(max_calls);
    }
    rig.stop().await;
    last.ramp = steps;
    last.max_calls_held = held_max;
    Ok(last)
}

/// Runs batches of `options.calls` calls for `options.seconds` each, back to back, until
/// `minutes` have passed, and samples the bridge's resident memory and open file descriptors
/// in every batch: halfway through (every call up) and after it (every call ended). A leak
/// shows as a rising column; the idle descriptor count should come back to the same number
/// after every batch. The result is the last batch's, with `errors` summed over all of them.
pub async fn run_soak(
    options: &BenchOptions,
    launcher: &impl BridgeLauncher,
    minutes: f64,
) -> Result<BenchResult, BenchError> {
    let rig = Rig::start(options, launcher).await?;
    let pid = match &rig.bridge {
        RunningBridge::Child { pid, .. } => Some(pid.to_string()),
        _ => None,
    };
    let began = std::time::Instant::now();
    let until = Duration::from_secs_f64(minutes.max(0.0) * 60.0);
    let mut samples = Vec::new();
    let mut errors = 0;
    let mut last;
    loop {
        last = rig.measure(options, options.calls).await;
        rig.model.forget_records();
        // The calls have ended; give their sockets the call's own close grace to go.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let sample = SoakSample {
            minute: began.elapsed().as_secs_f64() / 60.0,
            calls: options.calls,
            rss_kib_busy: last.bridge_rss_kib_steady,
            fds_busy: last.bridge_fds_steady,
            rss_kib_idle: pid.as_deref().and_then(process_rss_kib),
            fds_idle: pid.as_deref().and_then(process_fds),
            uplink_p99_us: last.uplink_us.p99,
            downlink_p99_us: last.downlink_us.p99,
            errors: last.errors,
        };
        if options.progress {
            eprintln!("soak: {}", soak_line(&sample));
        }
        errors += last.errors;
        samples.push(sample);
        if began.elapsed() >= until {
            break;
        }
    }
    rig.stop().await;
    last.errors = errors;
    last.soak = samples;
    Ok(last)
}

/// One soak sample as a line of the progress log and the summary table.
fn soak_line(sample: &SoakSample) -> String {
    let kib = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    format!(
        "{:>6.1} min  {:>5} calls  RSS busy {:>8} KiB idle {:>8} KiB  fds busy {:>5} idle {:>5}  p99 µs up {:>7.0} down {:>7.0}  errors {}",
        sample.minute,
        sample.calls,
        kib(sample.rss_kib_busy),
        kib(sample.rss_kib_idle),
        kib(sample.fds_busy),
        kib(sample.fds_idle),
        sample.uplink_p99_us,
        sample.downlink_p99_us,
        sample.errors,
    )
}

/// The call cap of a bridge the harness starts: the benchmark measures the bridge past its
/// production cap (that is how `VOXRELAY_MAX_CALLS`'s default is sized), so it must not bind.
/// A `--target` bridge keeps its own: raise it there to measure beyond it.
const BENCH_MAX_CALLS: usize = 10_000;

async fn start_bridge<L: BridgeLauncher>(
    options: &BenchOptions,
    model_url: &str,
    launcher: &L,
) -> Result<(RunningBridge<L::Bridge>, Endpoint), BenchError> {
    let token = Secret::new(format!("{:032x}", rand::random::<u128>()));
    match &options.bridge {
        BridgeUnderTest::Target {
            url,
            public_url,
            auth_token,
        } => {
            let ws_scheme = if url.scheme() == "https" { "wss" } else { "ws" };
            let connect_url = format!("{ws_scheme}://{}/twilio/media", authority(url));
            let signed_scheme = if public_url.scheme() == "https" {
                "wss"
            } else {
                "ws"
            };
            let signed_url = format!("{signed_scheme}://{}/twilio/media", authority(public_url));
            eprintln!("bench: target {url}; its VOXRELAY_OPENAI_URL must be {model_url}");
            Ok((
                RunningBridge::Remote,
                Endpoint {
                    connect_url,
                    signed_url,
                    auth_token: auth_token.clone(),
                },
            ))
        }
        BridgeUnderTest::InProcess => {
            if options.baseline {
                return Err(BenchError::Options(
                    "--baseline runs the relay as a child process; drop --in-process".into(),
                ));
            }
            let settings = BridgeSettings {
                audio_mode: options.audio_mode,
                greeting: Some(String::new()),
                max_calls: Some(BENCH_MAX_CALLS),
                ..BridgeSettings::new(model_url.to_owned(), Secret::new("bench"), token.clone())
            };
            let bridge = launcher
                .launch(settings)
                .await
                .map_err(|e| BenchError::Bridge(e.to_string()))?;
            let url = format!("ws://{}/twilio/media", bridge.local_addr());
            Ok((
                RunningBridge::InProcess(bridge),
                Endpoint {
                    connect_url: url.clone(),
                    signed_url: url,
                    auth_token: token,
                },
            ))
        }
        BridgeUnderTest::Child => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| BenchError::Bridge(e.to_string()))?
                .port();
            let listen = format!("127.0.0.1:{port}");
            let exe = std::env::current_exe().map_err(|e| BenchError::Bridge(e.to_string()))?;
            let mut command = tokio::process::Command::new(exe);
            if options.baseline {
                command.args([
                    "baseline-relay",
                    "--listen",
                    &listen,
                    "--upstream-url",
                    model_url,
                ]);
            } else {
                command
                    .arg("serve")
                    .env("VOXRELAY_LISTEN", &listen)
                    .env("TWILIO_AUTH_TOKEN", token.expose())
                    .env("OPENAI_API_KEY", "bench")
                    .env("VOXRELAY_OPENAI_URL", model_url)
                    .env("VOXRELAY_AUDIO_MODE", options.audio_mode.as_str())
                    .env("VOXRELAY_GREETING", "")
                    .env("VOXRELAY_DRAIN_SECONDS", "2")
                    // The harness signs for the address it starts the bridge on.
                    .env("VOXRELAY_PUBLIC_URL", format!("http://{listen}"))
                    .env("VOXRELAY_MAX_CALLS", BENCH_MAX_CALLS.to_string())
                    // Port 0: runs side by side never fight over the admin port.
                    .env("VOXRELAY_ADMIN_LISTEN", "127.0.0.1:0")
                    // The harness's callers open their streams directly, as TwiML from
                    // elsewhere would, with no webhook token: measured as unbound streams
                    // (the fallback agent), which is the same media path.
                    .env("VOXRELAY_REQUIRE_STREAM_TOKEN", "0")
                    .env_remove("VOXRELAY_MOCK_MODEL")
                    .env_remove("VOXRELAY_TWILIO_ACCOUNT_SID");
            }
            command
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            if options.pin {
                pin_command(&mut command, 0);
            }
            let child = command
                .spawn()
                .map_err(|e| BenchError::Bridge(e.to_string()))?;
            let pid = child.id().unwrap_or_default();
            let ready = Url::parse(&format!("http://{listen}/readyz"))
                .map_err(|e| BenchError::Bridge(e.to_string()))?;
            let health = if options.baseline { None } else { Some(ready) };
            wait_until_listening(port, health).await?;
            let url = format!("ws://{listen}/twilio/media");
            Ok((
                RunningBridge::Child { child, pid },
                Endpoint {
                    connect_url: url.clone(),
                    signed_url: url,
                    auth_token: token,
                },
            ))
        }
    }
}

fn authority(url: &Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_owned(),
        _ => String::new(),
    }
}

async fn wait_until_listening(port: u16, ready: Option<Url>) -> Result<(), BenchError> {
    for _ in 0..200 {
        let up = match &ready {
            Some(url) => http_client::send("GET", url, &[], Vec::new())
                .await
                .is_ok_and(|r| r.status == 200),
            None => tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok(),
        };
        if up {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(BenchError::Bridge(format!(
        "nothing listening on port {port} after 10 s"
    )))
}

async fn stop_bridge(bridge: RunningBridge<impl InProcessBridge>) {
    match bridge {
        RunningBridge::Child { mut child, pid } => {
            // SIGTERM lets the bridge drain (briefly: VOXRELAY_DRAIN_SECONDS=2).
            // SAFETY: kill(2) with a pid we spawned and a valid signal number has no memory effects.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
        RunningBridge::InProcess(bridge) => {
            bridge.stop(Duration::from_secs(2)).await;
        }
        RunningBridge::Remote => {}
    }
}

/// CPU time (user + system) of a process, from `/proc/<pid>/stat`.
fn process_cpu(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is parenthesised and may contain spaces.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_micros((utime + stime) * 1_000_000 / ticks))
}

/// Open file descriptors of a process, from `/proc/<pid>/fd`.
fn process_fds(pid: &str) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// Resident memory of a process in KiB, from `/proc/<pid>/status`.
fn process_rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(target_os = "linux")]
fn cpu_set(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit inside `set`; `cpu` is far below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set
}

#[cfg(target_os = "linux")]
fn pin_current_process(cpu: usize) -> Result<(), BenchError> {
    let set = cpu_set(cpu);
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is this thread. Threads
    // created later inherit the mask; the runtime's existing threads are re-pinned below.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(BenchError::Options(format!(
            "cannot pin the load to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        )));
    }
    // Pin every thread of this process (the tokio workers already exist).
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<libc::pid_t>().ok())
            {
                // SAFETY: as above, for one of our own threads.
                unsafe {
                    libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
                };
            }
        }
    }
    Ok(())
}

#[cfg(target_os = "linux")]
fn pin_command(command: &mut tokio::process::Command, cpu: usize) {
    let set = cpu_set(cpu);
    // SAFETY: the closure runs in the forked child before exec and only calls
    // sched_setaffinity, which is async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// CPU affinity is Linux's `sched_setaffinity`; elsewhere `--pin` is refused up front.
#[cfg(not(target_os = "linux"))]
fn pin_current_process(cpu: usize) -> Result<(), BenchError> {
    Err(BenchError::Options(format!(
        "cannot pin the load to CPU {cpu}: --pin needs Linux (sched_setaffinity)"
    )))
}

/// Never reached off Linux: [`pin_current_process`] refuses `--pin` before a bridge starts.
#[cfg(not(target_os = "linux"))]
fn pin_command(_command: &mut tokio::process::Command, _cpu: usize) {}

/// One measured batch of `calls` calls against a running bridge.
async fn measure(
    options: &BenchOptions,
    epoch: Epoch,
    model: &EchoModel,
    bridge: &RunningBridge<impl InProcessBridge>,
    endpoint: &Endpoint,
    calls: usize,
) -> BenchResult {
    let bridge_pid = match bridge {
        RunningBridge::Child { pid, .. } => Some(pid.to_string()),
        _ => None,
    };
    let rss_before = bridge_pid.as_deref().and_then(process_rss_kib);
    let load_before = process_cpu("self");
    let wall = std::time::Instant::now();
    let sessions_before = model.records().len();
    let duration = Duration::from_secs_f64(options.seconds.max(0.1));
    let audio: Arc<[u8]> = Arc::from(SPEECH_FIXTURE);
    let up = Arc::new(AtomicU64::new(0));
    let started_at = epoch.us();

    let records: Vec<Arc<Mutex<LoadCallRecord>>> = (0..calls)
        .map(|_| Arc::new(Mutex::new(LoadCallRecord::default())))
        .collect();
    let mut handles = Vec::with_capacity(calls);
    for (index, record) in records.iter().enumerate() {
        let config = LoadCallConfig {
            connect_url: endpoint.connect_url.clone(),
            signed_url: endpoint.signed_url.clone(),
            auth_token: endpoint.auth_token.clone(),
            index: index as u32,
            duration,
            jitter: options.jitter,
            epoch,
        };
        let delay = options.ramp_up.mul_f64(index as f64 / calls.max(1) as f64);
        let audio = Arc::clone(&audio);
        let up = Arc::clone(&up);
        let record = Arc::clone(record);
        handles.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            up.fetch_add(1, Relaxed);
            run_load_call(config, &audio, &record).await;
            up.fetch_sub(1, Relaxed);
        }));
    }

    // Resource use is read while every call is up: from half a second after the last call
    // started to half a second before the first one ends.
    let steady = options.ramp_up + duration / 2;
    let progress = options.progress.then(|| {
        let mut live = LiveView::new(records.clone(), model.live_records(), sessions_before);
        let up = Arc::clone(&up);
        let late_us = options.late_threshold.as_secs_f64() * 1e6;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                live.advance();
                eprint!(
                    "\rbench: {:>5} calls up, {:>5.1} s; µs p50/p99 so far: uplink {}, downlink {}; late {}    ",
                    up.load(Relaxed),
                    (epoch.us() - started_at) as f64 / 1e6,
                    live.uplink.summary(),
                    live.downlink.summary(),
                    live.late(late_us),
                );
            }
        })
    });
    let window_start = options.ramp_up + Duration::from_millis(500);
    tokio::time::sleep(window_start).await;
    let cpu_at_window = bridge_pid.as_deref().and_then(process_cpu);
    let window_wall = std::time::Instant::now();
    tokio::time::sleep(steady.saturating_sub(window_start)).await;
    let rss_steady = bridge_pid.as_deref().and_then(process_rss_kib);
    let fds_steady = bridge_pid.as_deref().and_then(process_fds);
    let window_len = duration
        .saturating_sub(options.ramp_up + Duration::from_millis(1_000))
        .max(Duration::from_millis(100));
    tokio::time::sleep(window_len.saturating_sub(window_wall.elapsed())).await;
    let cpu_window = match (cpu_at_window, bridge_pid.as_deref().and_then(process_cpu)) {
        (Some(a), Some(b)) => Some((b.saturating_sub(a), window_wall.elapsed())),
        _ => None,
    };

    for (handle, record) in handles.into_iter().zip(&records) {
        if let Err(error) = handle.await {
            lock(record).error = Some(error.to_string());
        }
    }
    if let Some(progress) = progress {
        progress.abort();
        eprintln!();
    }
    // Let the last echoes and the model's view of closing sockets settle.
    tokio::time::sleep(options.model_delay + Duration::from_millis(300)).await;
    let load_cpu = match (load_before, process_cpu("self")) {
        (Some(a), Some(b)) => b.saturating_sub(a).as_secs_f64() / wall.elapsed().as_secs_f64(),
        _ => 0.0,
    };
    let sessions: Vec<EchoSessionRecord> =
        model.records().into_iter().skip(sessions_before).collect();
    let records: Vec<LoadCallRecord> = records.iter().map(|r| lock(r).clone()).collect();
    let mut result = join(options, &records, &sessions);
    result.calls = calls;
    result.seconds = duration.as_secs_f64();
    result.audio_mode = options.audio_mode.as_str().to_owned();
    result.baseline = options.baseline;
    result.target = match (&options.bridge, options.baseline) {
        (BridgeUnderTest::Target { url, .. }, _) => url.to_string(),
        (BridgeUnderTest::InProcess, _) => "in-process".to_owned(),
        (BridgeUnderTest::Child, false) => "child".to_owned(),
        (BridgeUnderTest::Child, true) => "child (baseline relay)".to_owned(),
    };
    result.load_cpu_utilisation = load_cpu;
    if let Some((cpu, wall)) = cpu_window {
        let call_seconds = calls as f64 * wall.as_secs_f64();
        result.bridge_cpu_ms_per_call_second =
            Some(cpu.as_secs_f64() * 1e3 / call_seconds.max(1e-9));
    }
    result.bridge_rss_kib_steady = rss_steady;
    result.bridge_fds_steady = fds_steady;
    if let (Some(before), Some(steady)) = (rss_before, rss_steady) {
        result.bridge_rss_kib_per_call =
            Some(steady.saturating_sub(before) as f64 / calls.max(1) as f64);
    }
    result.machine = machine();
    result
}

/// Joins callers' and the model's records by call number and byte offset.
fn join(
    options: &BenchOptions,
    records: &[LoadCallRecord],
    sessions: &[EchoSessionRecord],
) -> BenchResult {
    let late_us = options.late_threshold.as_secs_f64() * 1e6;
    let mut uplink = Vec::new();
    let mut downlink = Vec::new();
    let mut barge_in = Vec::new();
    let mut setup = Vec::new();
    let mut jitter = Vec::new();
    let (mut lost, mut errors, mut sent, mut received) = (0u64, 0u64, 0u64, 0u64);

    for record in records {
        sent += record.frames_sent_us.len() as u64;
        outbound_jitter(&record.media, &mut jitter);
        if record.error.is_some() {
            errors += 1;
        }
        let digits = LoadCallRecord::id_digits(record.index);
        let Some(session) = sessions.iter().find(|s| s.digits.starts_with(&digits)) else {
            // The model never learned who this caller was: nothing of it can be joined.
            errors += 1;
            lost += record.frames_sent_us.len() as u64;
            continue;
        };
        errors += session.errors_sent;
        if let (Some(open), Some(update)) = (record.ws_open_us, session.session_update_at_us) {
            setup.push(update.saturating_sub(open) as f64);
        }
        let mut call = CallJoin::default();
        call.advance(
            record,
            session,
            true,
            |latency| uplink.push(latency),
            |latency| downlink.push(latency),
        );
        received += call.frame as u64;
        lost += record.frames_sent_us.len().saturating_sub(call.frame) as u64;

        // Barge-in: the s-th speech_started against the s-th clear.
        for (s, &started) in session.speech_started_at_us.iter().enumerate() {
            if let Some(&cleared) = record.clears_us.get(s) {
                barge_in.push(cleared.saturating_sub(started) as f64);
            }
        }
    }

    let late = uplink
        .iter()
        .chain(&downlink)
        .filter(|&&latency| latency > late_us)
        .count() as u64;
    BenchResult {
        uplink_us: Percentiles::of(&mut uplink.clone()),
        downlink_us: Percentiles::of(&mut downlink.clone()),
        barge_in_us: Percentiles::of(&mut barge_in),
        setup_us: Percentiles::of(&mut setup),
        outbound_jitter_us: Percentiles::of(&mut jitter),
        late_frames: late,
        late_threshold_ms: options.late_threshold.as_secs_f64() * 1e3,
        lost_frames: lost,
        errors,
        frames_sent: sent,
        frames_received: received,
        samples: Samples {
            uplink_us: thin(uplink),
            downlink_us: thin(downlink),
        },
        ..BenchResult::default()
    }
}

/// A pause longer than this between two `media` messages is a gap between responses.
const JITTER_GAP_US: u64 = 100_000;

/// Pushes RFC 3550's |D| for each `media` of one call after the first of its stretch: its
/// arrival spacing minus the audio the previous message carried (μ-law: 125 µs per byte).
/// `media` is (generation, cumulative bytes in the generation, arrival µs) per message.
fn outbound_jitter(media: &[(u32, u64, u64)], out: &mut Vec<f64>) {
    // The first message of a generation carries `bytes` audio from 0.
    let mut previous_bytes = 0u64;
    for pair in media.windows(2) {
        let ((g0, b0, t0), (g1, b1, t1)) = (pair[0], pair[1]);
        let carried = b0.saturating_sub(previous_bytes);
        previous_bytes = if g1 == g0 { b0 } else { 0 };
        let spacing = t1.saturating_sub(t0);
        if g1 != g0 || spacing >= JITTER_GAP_US || b1 <= b0 {
            continue;
        }
        out.push((spacing as f64 - carried as f64 * 125.0).abs());
    }
}

/// One call's byte-offset join, resumable: advancing it again after its records grew
/// continues where it stopped. The final result advances a fresh one once over the complete
/// records (`done`); the live progress line advances one per call every second on the records
/// as they are written, so both use the same join and the live one costs only the frames that
/// arrived since the last tick.
#[derive(Clone, Debug, Default)]
struct CallJoin {
    /// Uplink: the next model append to look at, and the next caller frame to time (at the
    /// end: how many of the caller's frames reached the model).
    append: usize,
    frame: usize,
    /// Downlink: the response (among those with audio; the n-th is the caller's generation n,
    /// the audio between its (n-1)-th and n-th `clear`), its next delta and model frame, and
    /// the next caller `media` arrival to compare.
    response: usize,
    delta: usize,
    model_frame: u64,
    arrival: usize,
}

impl CallJoin {
    /// Joins what the records hold beyond the last call. With `done` false, whatever may still
    /// change (the caller's record lagging the model's, a response still receiving audio, a
    /// generation the caller has not left) is left for the next call; with `done` true the
    /// records are final and frames that never arrived are skipped.
    fn advance(
        &mut self,
        record: &LoadCallRecord,
        session: &EchoSessionRecord,
        done: bool,
        mut uplink: impl FnMut(f64),
        mut downlink: impl FnMut(f64),
    ) {
        let model_frame_bytes: u64 = match session.format {
            EchoFormat::Pcmu => 160,
            EchoFormat::Pcm24k => 960,
        };

        // Uplink: caller frame k is complete at the model once its cumulative input covers
        // k+1 frames. Frames sent before the session existed waited for set-up, which is
        // measured apart.
        let configured = session.session_update_at_us.unwrap_or(u64::MAX);
        let sent = &record.frames_sent_us;
        while let Some(&(cumulative, at)) = session.appends.get(self.append) {
            let complete = (cumulative / model_frame_bytes) as usize;
            while self.frame < complete && self.frame < sent.len() {
                let sent_at = sent[self.frame];
                if sent_at >= configured {
                    uplink(at.saturating_sub(sent_at) as f64);
                }
                self.frame += 1;
            }
            if self.frame < complete {
                // The caller's record is behind the model's (only while live).
                break;
            }
            self.append += 1;
        }

        // Downlink: model frame k of the n-th audio response reached the caller with the first
        // `media` of generation n whose cumulative audio covers k+1 caller frames.
        let caller_generation = record.clears_us.len();
        loop {
            let Some(response) = session
                .responses
                .iter()
                .filter(|r| !r.deltas.is_empty())
                .nth(self.response)
            else {
                return;
            };
            let generation = self.response as u32;
            // Only the newest response still receives audio.
            let more_deltas = !done
                && session
                    .responses
                    .last()
                    .is_some_and(|last| std::ptr::eq(last, response));
            let mut next_response = false;
            'deltas: while let Some(&(cumulative, sent_at)) = response.deltas.get(self.delta) {
                let complete = cumulative / model_frame_bytes;
                while self.model_frame < complete {
                    let needed = (self.model_frame + 1) * CALLER_FRAME_BYTES;
                    while record
                        .media
                        .get(self.arrival)
                        .is_some_and(|&(g, c, _)| g < generation || (g == generation && c < needed))
                    {
                        self.arrival += 1;
                    }
                    match record.media.get(self.arrival) {
                        Some(&(g, _, at)) if g == generation => {
                            downlink(at.saturating_sub(sent_at) as f64);
                            self.model_frame += 1;
                        }
                        // The rest of this response never reached the caller (a barge-in
                        // cleared it), or the run is over.
                        Some(_) => {
                            next_response = true;
                            break 'deltas;
                        }
                        None if done || caller_generation > self.response => {
                            next_response = true;
                            break 'deltas;
                        }
                        // Still on its way.
                        None => return,
                    }
                }
                self.delta += 1;
            }
            if !next_response && more_deltas && caller_generation <= self.response {
                return;
            }
            self.response += 1;
            self.delta = 0;
            self.model_frame = 0;
        }
    }
}

/// Latencies in microseconds, bucketed 2% apart: enough for a progress line, in constant
/// memory whatever the run's length.
#[derive(Clone, Debug)]
struct LiveHistogram {
    buckets: Vec<u64>,
    count: u64,
}

impl LiveHistogram {
    /// Bucket i holds values up to `GROWTH^i` µs; 1,000 buckets reach past 10^8 µs.
    const GROWTH: f64 = 1.02;
    const BUCKETS: usize = 1_000;

    fn new() -> Self {
        Self {
            buckets: vec![0; Self::BUCKETS],
            count: 0,
        }
    }

    fn record(&mut self, us: f64) {
        let index = if us <= 1.0 {
            0
        } else {
            (us.ln() / Self::GROWTH.ln()).ceil() as usize
        };
        self.buckets[index.min(Self::BUCKETS - 1)] += 1;
        self.count += 1;
    }

    /// The upper bound of the bucket holding quantile `q` (within 2% of the exact value).
    fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        let index = self
            .buckets
            .iter()
            .position(|&n| {
                seen += n;
                seen >= rank
            })
            .unwrap_or(Self::BUCKETS - 1);
        Some(Self::GROWTH.powi(index as i32))
    }

    /// Values above `threshold` µs (to the bucket: within 2%).
    fn above(&self, threshold: f64) -> u64 {
        let first = (threshold.max(1.0).ln() / Self::GROWTH.ln()).ceil() as usize + 1;
        self.buckets.iter().skip(first).sum()
    }

    /// `p50/p99`, or `-` before the first sample.
    fn summary(&self) -> String {
        match (self.quantile(0.50), self.quantile(0.99)) {
            (Some(p50), Some(p99)) => format!("{p50:.0}/{p99:.0}"),
            _ => "-".to_owned(),
        }
    }
}

/// The running join behind the live progress line: the callers' and the model's records as
/// they are written, each call's [`CallJoin`], and histograms of everything joined so far.
struct LiveView {
    calls: Vec<Arc<Mutex<LoadCallRecord>>>,
    joins: Vec<CallJoin>,
    /// Each caller's session, once the model has learned the caller's digits.
    sessions: Vec<Option<Arc<Mutex<EchoSessionRecord>>>>,
    model: LiveRecords,
    /// The first session of this run, and the first whose digits are not yet known.
    first_session: usize,
    unidentified: Vec<Arc<Mutex<EchoSessionRecord>>>,
    seen_sessions: usize,
    uplink: LiveHistogram,
    downlink: LiveHistogram,
}

impl LiveView {
    fn new(
        calls: Vec<Arc<Mutex<LoadCallRecord>>>,
        model: LiveRecords,
        first_session: usize,
    ) -> Self {
        Self {
            joins: vec![CallJoin::default(); calls.len()],
            sessions: vec![None; calls.len()],
            calls,
            model,
            first_session,
            unidentified: Vec::new(),
            seen_sessions: 0,
            uplink: LiveHistogram::new(),
            downlink: LiveHistogram::new(),
        }
    }

    /// Joins whatever arrived since the last call.
    fn advance(&mut self) {
        let new = self.model.since(self.first_session + self.seen_sessions);
        self.seen_sessions += new.len();
        self.unidentified.extend(new);
        self.unidentified.retain(|session| {
            let digits = lock(session).digits.clone();
            let Some(index) = digits
                .get(..ID_DIGITS)
                .and_then(|d| d.parse::<usize>().ok())
            else {
                return true;
            };
            if let Some(slot) = self.sessions.get_mut(index) {
                *slot = Some(Arc::clone(session));
            }
            false
        });
        for ((call, join), session) in self.calls.iter().zip(&mut self.joins).zip(&self.sessions) {
            let Some(session) = session else { continue };
            // Model first, then caller: every append the model holds names frames the
            // caller's record already has.
            let session = lock(session);
            let record = lock(call);
            let (uplink, downlink) = (&mut self.uplink, &mut self.downlink);
            join.advance(
                &record,
                &session,
                false,
                |us| uplink.record(us),
                |us| downlink.record(us),
            );
        }
    }

    /// Frames joined so far later than `threshold` µs, either way.
    fn late(&self, threshold: f64) -> u64 {
        self.uplink.above(threshold) + self.downlink.above(threshold)
    }
}

/// An evenly spaced subset, for plots.
fn thin(values: Vec<f64>) -> Vec<f64> {
    if values.len() <= MAX_SAMPLES {
        return values;
    }
    let step = values.len() as f64 / MAX_SAMPLES as f64;
    (0..MAX_SAMPLES)
        .map(|i| values[(i as f64 * step) as usize])
        .collect()
}

pub fn machine() -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown".to_owned());
    Machine {
        // Online CPUs, not this process's affinity mask (which --pin narrows to one).
        // SAFETY: sysconf has no preconditions.
        cpus: unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize,
        cpu_model,
        date_utc: utc_date(),
    }
}

fn utc_date() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Civil-from-days (Howard Hinnant's algorithm), to avoid a date crate for one line.
    let days = (secs / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The end-of-run summary table.
pub fn summary(result: &BenchResult) -> String {
    let mut out = String::new();
    let row = |out: &mut String, name: &str, p: &Percentiles| {
        let _ = writeln!(
            out,
            "  {name:<10} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>9}",
            p.p50, p.p90, p.p99, p.max, p.count
        );
    };
    let _ = writeln!(
        out,
        "\nvoxrelay bench: {} calls × {:.0} s, audio {}, bridge {}{}",
        result.calls,
        result.seconds,
        result.audio_mode,
        result.target,
        if result.baseline { " (baseline)" } else { "" }
    );
    let _ = writeln!(
        out,
        "  {:<10} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "µs", "p50", "p90", "p99", "max", "count"
    );
    row(&mut out, "uplink", &result.uplink_us);
    row(&mut out, "downlink", &result.downlink_us);
    row(&mut out, "barge-in", &result.barge_in_us);
    row(&mut out, "setup", &result.setup_us);
    row(&mut out, "out jitter", &result.outbound_jitter_us);
    let _ = writeln!(
        out,
        "  frames sent {} received {}, late (> {:.0} ms) {}, lost {}, errors {}",
        result.frames_sent,
        result.frames_received,
        result.late_threshold_ms,
        result.late_frames,
        result.lost_frames,
        result.errors
    );
    let fmt = |v: Option<f64>, unit: &str| {
        v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2} {unit}"))
    };
    let _ = writeln!(
        out,
        "  bridge CPU {} per call-second, RSS {} per call; load process CPU {:.0}% of a core",
        fmt(result.bridge_cpu_ms_per_call_second, "ms"),
        fmt(result.bridge_rss_kib_per_call, "KiB"),
        result.load_cpu_utilisation * 100.0
    );
    if let Some(max) = result.max_calls_held {
        let _ = writeln!(
            out,
            "  ramp: largest call count that held the budget: {max}"
        );
    }
    if !result.soak.is_empty() {
        let _ = writeln!(out, "  soak, one line per batch:");
        for sample in &result.soak {
            let _ = writeln!(out, "    {}", soak_line(sample));
        }
    }
    let _ = writeln!(
        out,
        "  machine: {} CPUs, {}, {}",
        result.machine.cpus, result.machine.cpu_model, result.machine.date_utc
    );
    out
}

/// The bridge against the floor, as ratios (noise cancels out within one run).
pub fn comparison(bridge: &BenchResult, floor: &BenchResult) -> String {
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.2}×", a / b)
        } else {
            "n/a".to_owned()
        }
    };
    format!(
        "bridge ÷ floor: uplink p50 {} p99 {}, downlink p50 {} p99 {}, CPU per call-second {}",
        ratio(bridge.uplink_us.p50, floor.uplink_us.p50),
        ratio(bridge.uplink_us.p99, floor.uplink_us.p99),
        ratio(bridge.downlink_us.p50, floor.downlink_us.p50),
        ratio(bridge.downlink_us.p99, floor.downlink_us.p99),
        match (
            bridge.bridge_cpu_ms_per_call_second,
            floor.bridge_cpu_ms_per_call_second
        ) {
            (Some(a), Some(b)) => ratio(a, b),
            _ => "n/a".to_owned(),
        }
    )
}

/// Writes the JSON result.
pub fn write_json(path: &PathBuf, result: &BenchResult) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(result).map_err(std::io::Error::other)?;
    std::fs::write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::echo_model::EchoResponse;

    fn options() -> BenchOptions {
        BenchOptions {
            late_threshold: Duration::from_millis(40),
            ..BenchOptions::default()
        }
    }

    #[test]
    fn joins_uplink_downlink_and_barge_in_by_offset() {
        let record = LoadCallRecord {
            index: 3,
            ws_open_us: Some(1_000),
            frames_sent_us: vec![10_000, 30_000, 50_000],
            media: vec![(0, 160, 300_500), (0, 320, 320_700), (1, 160, 900_300)],
            clears_us: vec![800_050],
            ..LoadCallRecord::default()
        };
        let session = EchoSessionRecord {
            digits: LoadCallRecord::id_digits(3),
            connected_at_us: 1_500,
            session_update_at_us: Some(5_000),
            format: EchoFormat::Pcmu,
            appends: vec![(160, 10_100), (320, 30_200), (480, 50_050)],
            responses: vec![
                EchoResponse {
                    response_id: "r1".into(),
                    item_id: "i1".into(),
                    started_at_us: 300_000,
                    deltas: vec![(160, 300_000), (320, 320_000)],
                },
                EchoResponse {
                    response_id: "r2".into(),
                    item_id: "i2".into(),
                    started_at_us: 900_000,
                    deltas: vec![(160, 900_000)],
                },
            ],
            speech_started_at_us: vec![800_000],
            truncates: vec![],
            errors_sent: 0,
            closed_at_us: None,
        };
        let result = join(&options(), &[record], &[session]);
        assert_eq!(result.uplink_us.count, 3);
        assert_eq!(result.uplink_us.max, 200.0);
        assert_eq!(result.downlink_us.count, 3);
        assert_eq!(result.downlink_us.max, 700.0);
        assert_eq!(result.barge_in_us.max, 50.0);
        assert_eq!(result.setup_us.max, 4_000.0);
        // 160 bytes (20 ms) then the next message 20.2 ms later; the third is after a clear.
        assert_eq!(result.outbound_jitter_us.count, 1);
        assert_eq!(result.outbound_jitter_us.max, 200.0);
        assert_eq!(
            (result.lost_frames, result.errors, result.late_frames),
            (0, 0, 0)
        );
    }

    #[test]
    fn outbound_jitter_compares_arrival_spacing_with_the_audio_carried() {
        let mut jitter = Vec::new();
        // Two frames in one message (40 ms), then one frame 41 ms later, then 19 ms later,
        // then a pause (a new response), then a clear (generation 1).
        let media = [
            (0, 320, 1_000_000),
            (0, 480, 1_041_000),
            (0, 640, 1_060_000),
            (0, 800, 1_500_000),
            (1, 160, 1_520_000),
        ];
        outbound_jitter(&media, &mut jitter);
        assert_eq!(jitter, [1_000.0, 1_000.0]);
    }

    /// A call with two audio responses, the first cut short by a barge-in after 6 of its 10
    /// frames reached the caller, and downlink media that carry two frames at once.
    fn scripted_call() -> (LoadCallRecord, EchoSessionRecord) {
        let mut record = LoadCallRecord {
            index: 0,
            ws_open_us: Some(1_000),
            ..LoadCallRecord::default()
        };
        let mut session = EchoSessionRecord {
            digits: LoadCallRecord::id_digits(0),
            connected_at_us: 1_500,
            session_update_at_us: Some(5_000),
            format: EchoFormat::Pcmu,
            appends: Vec::new(),
            responses: Vec::new(),
            speech_started_at_us: vec![429_000],
            truncates: vec![],
            errors_sent: 0,
            closed_at_us: None,
        };
        for k in 0..50u64 {
            let at = 2_000 + 20_000 * k;
            record.frames_sent_us.push(at);
            session.appends.push((160 * (k + 1), at + 150 + k * 7));
        }
        let mut first = EchoResponse {
            response_id: "r1".into(),
            item_id: "i1".into(),
            started_at_us: 300_000,
            deltas: Vec::new(),
        };
        for k in 0..10u64 {
            first.deltas.push((160 * (k + 1), 300_000 + 20_000 * k));
        }
        // The caller hears the first 6 frames, two per message, then the clear.
        for k in 0..3u64 {
            record.media.push((0, 320 * (k + 1), 320_600 + 40_000 * k));
        }
        record.clears_us.push(430_000);
        let mut second = EchoResponse {
            response_id: "r2".into(),
            item_id: "i2".into(),
            started_at_us: 600_000,
            deltas: Vec::new(),
        };
        for k in 0..8u64 {
            second.deltas.push((160 * (k + 1), 600_000 + 20_000 * k));
            record
                .media
                .push((1, 160 * (k + 1), 600_400 + 20_000 * k + 30 * k));
        }
        session.responses = vec![first, second];
        (record, session)
    }

    /// What each record held at `t` µs.
    fn as_of(
        record: &LoadCallRecord,
        session: &EchoSessionRecord,
        t: u64,
    ) -> (LoadCallRecord, EchoSessionRecord) {
        let mut record = record.clone();
        record.frames_sent_us.retain(|&at| at <= t);
        record.media.retain(|&(_, _, at)| at <= t);
        record.clears_us.retain(|&at| at <= t);
        let mut session = session.clone();
        session.appends.retain(|&(_, at)| at <= t);
        session.responses.retain(|r| r.started_at_us <= t);
        for response in &mut session.responses {
            response.deltas.retain(|&(_, at)| at <= t);
        }
        (record, session)
    }

    #[test]
    fn the_live_join_finds_what_the_final_join_finds() {
        let (record, session) = scripted_call();
        let result = join(
            &options(),
            std::slice::from_ref(&record),
            std::slice::from_ref(&session),
        );
        // The first frame was sent before the session was configured: set-up, not uplink.
        assert_eq!(result.uplink_us.count, 49);
        assert_eq!(result.downlink_us.count, 6 + 8);

        for step in [1_000, 7_000, 20_000, 45_000] {
            let mut live = CallJoin::default();
            let (mut uplink, mut downlink) = (Vec::new(), Vec::new());
            let mut t = 0;
            while t <= 1_100_000 {
                let (record, session) = as_of(&record, &session, t);
                live.advance(
                    &record,
                    &session,
                    false,
                    |us| uplink.push(us),
                    |us| downlink.push(us),
                );
                t += step;
            }
            live.advance(
                &record,
                &session,
                true,
                |us| uplink.push(us),
                |us| downlink.push(us),
            );
            assert_eq!(
                Percentiles::of(&mut uplink),
                result.uplink_us,
                "step {step}"
            );
            assert_eq!(
                Percentiles::of(&mut downlink),
                result.downlink_us,
                "step {step}"
            );
        }
    }

    #[test]
    fn the_live_histogram_is_within_two_percent() {
        let mut histogram = LiveHistogram::new();
        assert_eq!(histogram.summary(), "-");
        for us in 1..=10_000 {
            histogram.record(f64::from(us));
        }
        let p50 = histogram.quantile(0.5).unwrap();
        let p99 = histogram.quantile(0.99).unwrap();
        assert!((5_000.0..=5_100.0).contains(&p50), "{p50}");
        assert!((9_900.0..=10_100.0).contains(&p99), "{p99}");
        let above = histogram.above(5_000.0);
        assert!((4_900..=5_000).contains(&above), "{above}");
    }

    #[test]
    fn an_unidentified_caller_is_an_error_and_its_frames_are_lost() {
        let record = LoadCallRecord {
            index: 9,
            frames_sent_us: vec![1, 2],
            ..LoadCallRecord::default()
        };
        let result = join(&options(), &[record], &[]);
        assert_eq!((result.errors, result.lost_frames), (1, 2));
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(utc_date().len(), 10);
    }
}
