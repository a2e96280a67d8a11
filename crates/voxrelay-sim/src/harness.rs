//! `voxrelay bench`: the end-to-end latency harness.
//!
//! One load process runs the echo model (the model side) and N simulated Twilio callers on a
//! shared clock, against a bridge it starts as a child process (the default: its CPU and
//! memory are then read from `/proc`; a fresh child for every measured step, so no step
//! inherits another's allocator pages), inside its own process (`--in-process`), or anywhere
//! (`--target URL`). With `--baseline` the baseline relay is measured beside the bridge at
//! every step of the same run, interleaved (bridge, floor, bridge, floor, …), so each ratio
//! compares the same call count under the same noise.
//!
//! Afterwards every measurement is joined per frame, by the ids the frames carry in the audio:
//! the call and frame number in the μ-law bits in `pcmu` mode (see `watermark`), a chord of
//! tones in `pcm16` mode, where the bridge transcodes and resamples both ways (see
//! `tone_ids`). So the harness counts exactly which frames reached the model and the caller,
//! once, twice, split, on the wrong call, or never, in either mode; model frames that never
//! reached the caller are lost unless a barge-in cleared them (the tail of an interrupted
//! response) or the caller had hung up. A call the bridge hangs up before the caller does is
//! an error. Nothing is guessed from averages or byte offsets.
//!
//! The bridge is measured on a provider, or several side by side (`--provider openai,gemini`):
//! each is a side of its own, measured at every step in the given order, against the echo
//! model's endpoint for that API. Gemini has no audio mode (PCM16 16 kHz in, 24 kHz out), so
//! its frames carry the tones, as in `pcm16`, and its results say mode `gemini`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use url::Url;

use super::baseline::{Fault, FloorDriver, FloorRelay};
use super::echo_model::{EchoModel, EchoModelConfig, EchoSessionRecord, EchoTls, ModelFaults};
use super::live::LiveBoard;
use super::load::{LoadCallConfig, LoadCallRecord, call_in_ids, run_load_call};
use super::model_tls::ModelTls;
use super::results::{
    BenchResult, Epoch, Machine, ModelFaultResult, Percentiles, RampStep, Ratios, Samples,
    SoakSample,
};
use super::turn_figures::TurnFigures;
use super::{SPEECH_FIXTURE, http_client};
use crate::launcher::{BridgeLauncher, BridgeSettings, InProcessBridge};
use voxrelay_core::{AudioMode, Provider, Secret};

/// Samples of plots kept per direction.
const MAX_SAMPLES: usize = 20_000;
/// How often the calls up are sampled in the CPU window.
const UP_SAMPLE: Duration = Duration::from_millis(100);

#[derive(Clone, Debug)]
pub enum BridgeUnderTest {
    /// `voxrelay serve` (or the baseline relay) as a child process of the harness.
    Child,
    /// The bridge (or the baseline relay) inside the harness's own process.
    InProcess,
    /// A bridge already running elsewhere: its base URL, the public URL it signs against,
    /// and its Twilio auth token. It must be configured to use the harness's echo model.
    Target {
        url: Url,
        public_url: Url,
        auth_token: Secret,
    },
}

/// Which relay a measurement is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The bridge, on this provider's model.
    Bridge(Provider),
    /// The baseline relay on one of its drivers: the machine's floor.
    Floor(FloorDriver),
}

impl Side {
    /// How the progress lines name it.
    fn label(self) -> &'static str {
        match self {
            Self::Bridge(Provider::OpenAi) => "bridge",
            Self::Bridge(Provider::Gemini) => "bridge-gemini",
            Self::Floor(FloorDriver::Tokio) => "floor",
            Self::Floor(FloorDriver::Uring) => "floor-uring",
        }
    }
}

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub calls: usize,
    pub seconds: f64,
    /// The OpenAI side's audio mode (Gemini has none).
    pub audio_mode: AudioMode,
    /// The bridge's providers, each measured at every step in this order (`--provider`); the
    /// first is the result, the others `other_providers`. Empty means OpenAI.
    pub providers: Vec<Provider>,
    pub bridge: BridgeUnderTest,
    /// Measure the baseline relay beside the bridge, interleaved at every step.
    pub floor: bool,
    /// Measure only the baseline relay (the harness's own tests).
    pub floor_only: bool,
    /// Plant a fault in the baseline relay (the harness's own tests).
    pub floor_fault: Option<Fault>,
    /// The floor's drivers, each measured at every step in this order (`--floor-driver`);
    /// the first is `floor` in the result, the others `other_floors`.
    pub floor_drivers: Vec<FloorDriver>,
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
    /// The model leg over TLS, with a CA made for the run that the relay is told to trust.
    pub model_tls: bool,
    /// Print a progress line every second.
    pub progress: bool,
    /// The share of model sessions the echo model drops at a random moment (`--model-faults`).
    pub model_faults: Option<f64>,
    /// Record every call of the bridge under test into this directory (`--record`:
    /// `VOXRELAY_RECORD=1`, `VOXRELAY_RECORDING_DIR`); `None`: recording off.
    pub record_dir: Option<std::path::PathBuf>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            calls: 20,
            seconds: 10.0,
            audio_mode: AudioMode::Pcmu,
            providers: vec![Provider::OpenAi],
            bridge: BridgeUnderTest::Child,
            floor: false,
            floor_only: false,
            floor_fault: None,
            floor_drivers: vec![FloorDriver::Tokio],
            ramp_up: Duration::from_secs(1),
            jitter: Duration::ZERO,
            model_delay: Duration::from_millis(200),
            barge_in_every: Some(Duration::from_secs(4)),
            late_threshold: Duration::from_millis(40),
            pin: false,
            model_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            model_tls: false,
            progress: true,
            model_faults: None,
            record_dir: None,
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
    #[error(transparent)]
    Tls(#[from] super::model_tls::ModelTlsError),
}

/// A bridge the harness started, and how to stop it and read its resource use.
enum RunningBridge<B> {
    Child {
        child: tokio::process::Child,
        pid: u32,
    },
    InProcess(B),
    InProcessFloor(FloorRelay),
    Remote,
}

struct Endpoint {
    connect_url: String,
    signed_url: String,
    auth_token: Secret,
    /// The bridge's admin listener, where its turn timings are read (a bridge the harness
    /// started).
    admin: Option<SocketAddr>,
}

/// The echo model (and the run's TLS), started once for a run; relays come and go.
struct Rig {
    epoch: Epoch,
    model: EchoModel,
    tls: Option<ModelTls>,
}

impl Rig {
    async fn start(options: &BenchOptions) -> Result<Self, BenchError> {
        if options.pin {
            pin_current_process(1)?;
        }
        if options.model_tls && matches!(options.bridge, BridgeUnderTest::InProcess) {
            return Err(BenchError::Options(
                "--model-tls needs the relay in a child process (the CA is trusted per process)"
                    .into(),
            ));
        }
        let tls = options.model_tls.then(ModelTls::generate).transpose()?;
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
                tls: tls.as_ref().map(|tls| EchoTls(tls.acceptor())),
                faults: options.model_faults.map(|fraction| ModelFaults {
                    fraction,
                    within: Duration::from_secs_f64(options.seconds.max(1.0)),
                }),
            },
            epoch,
        )
        .await
        .map_err(BenchError::Model)?;
        Ok(Self { epoch, model, tls })
    }

    /// Starts `side` (an in-process bridge through `launcher`), measures `calls` calls
    /// against it, and stops it.
    async fn measure_fresh(
        &self,
        options: &BenchOptions,
        launcher: &impl BridgeLauncher,
        side: Side,
        calls: usize,
    ) -> Result<BenchResult, BenchError> {
        let (bridge, endpoint) =
            start_bridge(options, launcher, side, &self.model_url(side), self.ca()).await?;
        let mut result = measure(
            options,
            side,
            self.epoch,
            &self.model,
            &bridge,
            &endpoint,
            calls,
        )
        .await;
        // Gemini's turns are timed from the caller's silence (the bridge's level detection),
        // and the bench's callers never fall silent: on Gemini they would time nothing real.
        if let (Side::Bridge(Provider::OpenAi), Some(admin)) = (side, endpoint.admin) {
            result.turns = TurnFigures::fetch(admin).await;
        }
        stop_bridge(bridge).await;
        Ok(result)
    }

    /// The echo model's endpoint for the API `side` speaks (the floor relays OpenAI's).
    fn model_url(&self, side: Side) -> String {
        match side {
            Side::Bridge(Provider::Gemini) => self.model.gemini_url(),
            Side::Bridge(Provider::OpenAi) | Side::Floor(_) => self.model.url(),
        }
    }

    fn ca(&self) -> Option<&std::path::Path> {
        self.tls.as_ref().map(ModelTls::ca_file)
    }

    fn stop(self) {
        self.model.shutdown();
    }
}

/// The bridge's providers in the order measured (OpenAI when none is given), each once.
fn providers(options: &BenchOptions) -> Vec<Provider> {
    let mut providers = Vec::new();
    for provider in &options.providers {
        if !providers.contains(provider) {
            providers.push(*provider);
        }
    }
    if providers.is_empty() {
        providers.push(Provider::OpenAi);
    }
    providers
}

/// The sides a run measures, in the order each step measures them: the bridge on each
/// provider, then the floors.
fn sides(options: &BenchOptions) -> Vec<Side> {
    let mut drivers = options.floor_drivers.clone();
    if drivers.is_empty() {
        drivers.push(FloorDriver::Tokio);
    }
    let floors = drivers.into_iter().map(Side::Floor);
    let bridges = providers(options).into_iter().map(Side::Bridge);
    if options.floor_only {
        floors.collect()
    } else if options.floor {
        bridges.chain(floors).collect()
    } else {
        bridges.collect()
    }
}

/// One result from a run's sides, in order: the first bridge, with the other bridges as
/// `other_providers`; the first floor as its `floor` (and `ratios`, bridge ÷ floor, on every
/// bridge's result), and any later floors as `other_floors` (each ÷ the first floor). A run
/// of floors alone has the first floor as its result.
fn combine(results: Vec<(Side, BenchResult)>) -> BenchResult {
    let (bridges, floors): (Vec<_>, Vec<_>) = results
        .into_iter()
        .partition(|(side, _)| matches!(side, Side::Bridge(_)));
    let mut bridges = bridges.into_iter().map(|(_, result)| result);
    let mut floors = floors.into_iter().map(|(_, result)| result);
    let (mut result, floor) = match bridges.next() {
        Some(bridge) => (bridge, floors.next()),
        None => (floors.next().unwrap_or_default(), floors.next()),
    };
    result.other_providers = bridges.collect();
    if let Some(floor) = floor {
        result.ratios = Some(ratios(&result, &floor));
        for other in &mut result.other_providers {
            other.ratios = Some(ratios(other, &floor));
        }
        for other in floors {
            result.other_floor_ratios.push(ratios(&other, &floor));
            result.other_floors.push(other);
        }
        result.floor = Some(Box::new(floor));
    }
    result
}

/// Runs one fixed-size benchmark: `calls` callers for `seconds` (with `floor`, then the same
/// against the baseline relay). `launcher` starts the bridge for
/// [`BridgeUnderTest::InProcess`].
pub async fn run(
    options: &BenchOptions,
    launcher: &impl BridgeLauncher,
) -> Result<BenchResult, BenchError> {
    let rig = Rig::start(options).await?;
    let mut results = Vec::new();
    for side in sides(options) {
        let result = rig
            .measure_fresh(options, launcher, side, options.calls)
            .await?;
        results.push((side, result));
    }
    rig.stop();
    Ok(combine(results))
}

/// Whether a step stayed within `budget` with every frame on time and accounted for.
fn held(result: &BenchResult, budget: Duration) -> bool {
    let budget_us = budget.as_secs_f64() * 1e6;
    result.errors == 0
        && result.late_frames == 0
        && result.frame_faults() == 0
        && result.uplink_us.p99 <= budget_us
        && result.downlink_us.p99 <= budget_us
}

/// One side's ramp so far.
#[derive(Default)]
struct SideRamp {
    steps: Vec<RampStep>,
    /// The result at the largest held count (or the first step, if none held).
    last: Option<BenchResult>,
    held_max: Option<usize>,
    /// A step failed: this side is not measured at larger counts.
    done: bool,
}

impl SideRamp {
    fn push(&mut self, calls: usize, result: BenchResult, held: bool) {
        self.steps.push(RampStep {
            calls,
            uplink_us: result.uplink_us.clone(),
            downlink_us: result.downlink_us.clone(),
            late_frames: result.late_frames,
            errors: result.errors,
            held,
            lost_frames: result.lost_frames,
            cpu_ms_per_call_second: result.bridge_cpu_ms_per_call_second,
            rss_kib_per_call: result.bridge_rss_kib_per_call,
        });
        if held {
            self.held_max = Some(calls);
            self.last = Some(result);
        } else {
            self.done = true;
            if self.last.is_none() {
                self.last = Some(result);
            }
        }
    }

    fn finish(self) -> BenchResult {
        let mut result = self.last.unwrap_or_default();
        result.ramp = self.steps;
        result.max_calls_held = self.held_max;
        result
    }
}

/// Raises the call count step by step until p99 added latency passes `budget`, or frames go
/// late or are lost, or a call fails; the result's `ramp` has every step and `max_calls_held`
/// the largest that held. With `floor` each step measures the bridge then the baseline relay,
/// each in a fresh process, and each side stops at its first failed step.
pub async fn run_ramp(
    options: &BenchOptions,
    launcher: &impl BridgeLauncher,
    step: usize,
    max_calls: usize,
    budget: Duration,
) -> Result<BenchResult, BenchError> {
    let rig = Rig::start(options).await?;
    let sides = sides(options);
    let mut ramps: Vec<SideRamp> = sides.iter().map(|_| SideRamp::default()).collect();
    let mut calls = options.calls.max(1);
    loop {
        for (side, ramp) in sides.iter().zip(&mut ramps) {
            if ramp.done {
                continue;
            }
            let result = rig.measure_fresh(options, launcher, *side, calls).await?;
            let held = held(&result, budget);
            if options.progress {
                eprintln!(
                    "ramp: {:<6} {calls} calls: uplink p99 {:.0} µs, downlink p99 {:.0} µs, late {}, lost {}, errors {}, CPU {} ms per call-second → {}",
                    side.label(),
                    result.uplink_us.p99,
                    result.downlink_us.p99,
                    result.late_frames,
                    result.lost_frames,
                    result.errors,
                    result
                        .bridge_cpu_ms_per_call_second
                        .map_or_else(|| "-".to_owned(), |v| format!("{v:.2}")),
                    if held { "held" } else { "over budget" }
                );
            }
            ramp.push(calls, result, held);
        }
        if ramps.iter().all(|ramp| ramp.done) || calls >= max_calls {
            break;
        }
        calls = (calls + step).min(max_calls);
    }
    rig.stop();
    Ok(combine(
        sides
            .into_iter()
            .zip(ramps.into_iter().map(SideRamp::finish))
            .collect(),
    ))
}

/// Bridge ÷ floor. With ramps: capacity from the held counts, CPU at the largest count both
/// held (their steps at that count); without: CPU at the run's one count.
pub fn ratios(bridge: &BenchResult, floor: &BenchResult) -> Ratios {
    let divide = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    if bridge.ramp.is_empty() || floor.ramp.is_empty() {
        return Ratios {
            capacity: None,
            cpu_per_call_second: divide(
                bridge.bridge_cpu_ms_per_call_second,
                floor.bridge_cpu_ms_per_call_second,
            ),
            calls: Some(bridge.calls),
        };
    }
    let both_held = bridge
        .ramp
        .iter()
        .filter(|step| step.held)
        .filter_map(|step| {
            floor
                .ramp
                .iter()
                .find(|other| other.calls == step.calls && other.held)
                .map(|other| (step, other))
        })
        .max_by_key(|(step, _)| step.calls);
    Ratios {
        capacity: match (bridge.max_calls_held, floor.max_calls_held) {
            (Some(a), Some(b)) if b > 0 => Some(a as f64 / b as f64),
            (None, Some(_)) => Some(0.0),
            _ => None,
        },
        cpu_per_call_second: both_held
            .and_then(|(a, b)| divide(a.cpu_ms_per_call_second, b.cpu_ms_per_call_second)),
        calls: both_held.map(|(step, _)| step.calls),
    }
}

/// Runs batches of `options.calls` calls for `options.seconds` each, back to back, until
/// `minutes` have passed, and samples the bridge's resident memory and open file descriptors
/// in every batch: halfway through (every call up) and after it (every call ended). A leak
/// shows as a rising column; the idle descriptor count should come back to the same number
/// after every batch. The result is the last batch's, with `errors` summed over all of them.
/// Unlike the other runs, the soak keeps one bridge process throughout: that is the point. It
/// soaks one provider (the first of `options.providers`).
pub async fn run_soak(
    options: &BenchOptions,
    launcher: &impl BridgeLauncher,
    minutes: f64,
) -> Result<BenchResult, BenchError> {
    let side = Side::Bridge(providers(options)[0]);
    let rig = Rig::start(options).await?;
    let (bridge, endpoint) =
        start_bridge(options, launcher, side, &rig.model_url(side), rig.ca()).await?;
    let pid = match &bridge {
        RunningBridge::Child { pid, .. } => Some(pid.to_string()),
        _ => None,
    };
    let began = std::time::Instant::now();
    let until = Duration::from_secs_f64(minutes.max(0.0) * 60.0);
    let mut samples = Vec::new();
    let mut errors = 0;
    let mut last;
    loop {
        last = measure(
            options,
            side,
            rig.epoch,
            &rig.model,
            &bridge,
            &endpoint,
            options.calls,
        )
        .await;
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
    stop_bridge(bridge).await;
    rig.stop();
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
    launcher: &L,
    side: Side,
    model_url: &str,
    model_ca: Option<&std::path::Path>,
) -> Result<(RunningBridge<L::Bridge>, Endpoint), BenchError> {
    let token = Secret::new(format!("{:032x}", rand::random::<u128>()));
    match (&options.bridge, side) {
        (
            BridgeUnderTest::Target {
                url,
                public_url,
                auth_token,
            },
            _,
        ) => {
            let ws_scheme = if url.scheme() == "https" { "wss" } else { "ws" };
            let connect_url = format!("{ws_scheme}://{}/twilio/media", authority(url));
            let signed_scheme = if public_url.scheme() == "https" {
                "wss"
            } else {
                "ws"
            };
            let signed_url = format!("{signed_scheme}://{}/twilio/media", authority(public_url));
            match side {
                Side::Bridge(Provider::Gemini) => eprintln!(
                    "bench: target {url}; its VOXRELAY_PROVIDER must be gemini and its VOXRELAY_GEMINI_URL {model_url}"
                ),
                _ => {
                    eprintln!("bench: target {url}; its VOXRELAY_OPENAI_URL must be {model_url}")
                }
            }
            Ok((
                RunningBridge::Remote,
                Endpoint {
                    connect_url,
                    signed_url,
                    auth_token: auth_token.clone(),
                    admin: None,
                },
            ))
        }
        (BridgeUnderTest::InProcess, Side::Floor(driver)) => {
            let relay = FloorRelay::start(
                driver,
                SocketAddr::from(([127, 0, 0, 1], 0)),
                model_url.to_owned(),
                options.floor_fault,
            )
            .await
            .map_err(|e| BenchError::Bridge(e.to_string()))?;
            let url = format!("ws://{}/twilio/media", relay.local_addr());
            Ok((
                RunningBridge::InProcessFloor(relay),
                Endpoint {
                    connect_url: url.clone(),
                    signed_url: url,
                    auth_token: token,
                    admin: None,
                },
            ))
        }
        (BridgeUnderTest::InProcess, Side::Bridge(provider)) => {
            let settings = BridgeSettings {
                audio_mode: options.audio_mode,
                provider,
                voice: bench_voice(provider),
                greeting: Some(String::new()),
                max_calls: Some(BENCH_MAX_CALLS),
                record_dir: options.record_dir.clone(),
                ..BridgeSettings::new(model_url.to_owned(), Secret::new("bench"), token.clone())
            };
            let bridge = launcher
                .launch(settings)
                .await
                .map_err(|e| BenchError::Bridge(e.to_string()))?;
            let url = format!("ws://{}/twilio/media", bridge.local_addr());
            let admin = Some(bridge.admin_addr());
            Ok((
                RunningBridge::InProcess(bridge),
                Endpoint {
                    connect_url: url.clone(),
                    signed_url: url,
                    auth_token: token,
                    admin,
                },
            ))
        }
        (BridgeUnderTest::Child, _) => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| BenchError::Bridge(e.to_string()))?
                .port();
            let listen = format!("127.0.0.1:{port}");
            // Chosen here (not port 0) so the harness can read the bridge's `/metrics`.
            let admin = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| BenchError::Bridge(e.to_string()))?;
            let exe = std::env::current_exe().map_err(|e| BenchError::Bridge(e.to_string()))?;
            let mut command = tokio::process::Command::new(exe);
            if let Side::Floor(driver) = side {
                command.args([
                    "baseline-relay",
                    "--listen",
                    &listen,
                    "--upstream-url",
                    model_url,
                ]);
                if driver != FloorDriver::Tokio {
                    command.args(["--driver", driver.as_str()]);
                }
                if let Some(ca) = model_ca {
                    command.arg("--model-ca-file").arg(ca);
                }
                if let Some(fault) = options.floor_fault {
                    use clap::ValueEnum as _;
                    if let Some(name) = fault.to_possible_value() {
                        command.args(["--fault", name.get_name()]);
                    }
                }
            } else {
                command
                    .arg("serve")
                    .env("VOXRELAY_LISTEN", &listen)
                    .env("TWILIO_AUTH_TOKEN", token.expose())
                    .env("VOXRELAY_AUDIO_MODE", options.audio_mode.as_str())
                    .env("VOXRELAY_GREETING", "")
                    .env("VOXRELAY_DRAIN_SECONDS", "2")
                    // The harness signs for the address it starts the bridge on.
                    .env("VOXRELAY_PUBLIC_URL", format!("http://{listen}"))
                    .env("VOXRELAY_MAX_CALLS", BENCH_MAX_CALLS.to_string())
                    .env("VOXRELAY_ADMIN_LISTEN", admin.to_string())
                    // The harness's callers open their streams directly, as TwiML from
                    // elsewhere would, with no webhook token: measured as unbound streams
                    // (the fallback agent), which is the same media path.
                    .env("VOXRELAY_REQUIRE_STREAM_TOKEN", "0")
                    .env_remove("VOXRELAY_MOCK_MODEL")
                    .env_remove("VOXRELAY_MODEL_CA_FILE")
                    .env_remove("VOXRELAY_TWILIO_ACCOUNT_SID");
                // The one model of the run: the bridge has a key for its provider only.
                match side {
                    Side::Bridge(Provider::Gemini) => command
                        .env("VOXRELAY_PROVIDER", Provider::Gemini.as_str())
                        .env("GEMINI_API_KEY", "bench")
                        .env("VOXRELAY_GEMINI_URL", model_url)
                        .env_remove("OPENAI_API_KEY")
                        .env_remove("VOXRELAY_OPENAI_URL"),
                    _ => command
                        .env("VOXRELAY_PROVIDER", Provider::OpenAi.as_str())
                        .env("OPENAI_API_KEY", "bench")
                        .env("VOXRELAY_OPENAI_URL", model_url)
                        .env_remove("GEMINI_API_KEY")
                        .env_remove("VOXRELAY_GEMINI_URL"),
                };
                match bench_voice(side_provider(side)) {
                    Some(voice) => command.env("VOXRELAY_VOICE", voice),
                    None => command.env_remove("VOXRELAY_VOICE"),
                };
                if let Some(ca) = model_ca {
                    command.env("VOXRELAY_MODEL_CA_FILE", ca);
                }
                match &options.record_dir {
                    Some(dir) => command
                        .env("VOXRELAY_RECORD", "1")
                        .env("VOXRELAY_RECORDING_DIR", dir),
                    None => command.env("VOXRELAY_RECORD", "0"),
                };
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
            let health = matches!(side, Side::Bridge(_)).then_some(ready);
            wait_until_listening(port, health).await?;
            let url = format!("ws://{listen}/twilio/media");
            Ok((
                RunningBridge::Child { child, pid },
                Endpoint {
                    connect_url: url.clone(),
                    signed_url: url,
                    auth_token: token,
                    admin: matches!(side, Side::Bridge(_)).then_some(admin),
                },
            ))
        }
    }
}

/// The fallback agent's voice in a run on `provider`: Gemini's own default voice, named (the
/// bridge's environment may name another); OpenAI's is left to the bridge.
fn bench_voice(provider: Provider) -> Option<String> {
    match provider {
        Provider::Gemini => Some(Provider::Gemini.default_voice().to_owned()),
        Provider::OpenAi => None,
    }
}

/// The provider a side's relay speaks to the model (the floor relays OpenAI's protocol).
fn side_provider(side: Side) -> Provider {
    match side {
        Side::Bridge(provider) => provider,
        Side::Floor(_) => Provider::OpenAi,
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
        RunningBridge::InProcessFloor(relay) => {
            relay.shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while relay.live_calls() > 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
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

fn cpu_set(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit inside `set`; `cpu` is far below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set
}

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

/// One measured batch of `calls` calls against a running relay.
async fn measure(
    options: &BenchOptions,
    side: Side,
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
    // The idle process, measured just before its calls: what the calls add is the difference.
    let rss_before = bridge_pid.as_deref().and_then(process_rss_kib);
    let sessions_before = model.records().len();
    let duration = Duration::from_secs_f64(options.seconds.max(0.1));
    let frames_per_call = (duration.as_millis() / 20) as usize;
    let audio: Arc<[u8]> = Arc::from(SPEECH_FIXTURE);
    let board = Arc::new(LiveBoard::new(calls, frames_per_call));
    model.set_board(Some(Arc::clone(&board)));
    let started_at = epoch.us();
    // The floor relays μ-law untouched whatever the run's mode, so its frames carry the
    // watermark; the bridge's carry what survives its mode.
    // Gemini's PCM16 is resampled both ways, so its frames carry the tones, as in `pcm16`.
    let ids = match side {
        Side::Floor(_) => AudioMode::Pcmu,
        Side::Bridge(Provider::OpenAi) => options.audio_mode,
        Side::Bridge(Provider::Gemini) => AudioMode::Pcm16,
    };

    let mut handles = Vec::with_capacity(calls);
    for index in 0..calls {
        let config = LoadCallConfig {
            connect_url: endpoint.connect_url.clone(),
            signed_url: endpoint.signed_url.clone(),
            auth_token: endpoint.auth_token.clone(),
            index: index as u32,
            duration,
            jitter: options.jitter,
            epoch,
            audio_mode: ids,
            board: Arc::clone(&board),
        };
        let delay = options.ramp_up.mul_f64(index as f64 / calls.max(1) as f64);
        let audio = Arc::clone(&audio);
        handles.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            run_load_call(config, &audio).await
        }));
    }

    // The line only loads the board's counters: it never waits for a caller or the model, and
    // they never wait for it.
    let progress = options.progress.then(|| {
        let board = Arc::clone(&board);
        let late_us = options.late_threshold.as_secs_f64() * 1e6;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                eprint!(
                    "\rbench: {:>5} calls up, {:>5.1} s; µs p50/p99 so far: uplink {}, downlink {}; late {}    ",
                    board.up.load(Relaxed),
                    (epoch.us() - started_at) as f64 / 1e6,
                    board.uplink.summary(),
                    board.downlink.summary(),
                    board.late(late_us),
                );
            }
        })
    });

    // The steady window: from half a second after the last call started to half a second
    // before the first one ends. CPU (the relay's and the load's) is read at its edges, and
    // the calls actually streaming are sampled through it, so CPU is divided by the call-
    // seconds that were up, not by the calls asked for.
    let window_start = options.ramp_up + Duration::from_millis(500);
    let window_len = duration
        .saturating_sub(options.ramp_up + Duration::from_millis(1_000))
        .max(Duration::from_millis(100));
    tokio::time::sleep(window_start).await;
    let cpu_at_window = bridge_pid.as_deref().and_then(process_cpu);
    let load_at_window = process_cpu("self");
    let window_wall = std::time::Instant::now();
    let mut call_seconds = 0.0;
    let mut rss_steady = None;
    let mut fds_steady = None;
    let mut up_at_rss = 0;
    let mut last_sample = window_wall;
    while window_wall.elapsed() < window_len {
        tokio::time::sleep(UP_SAMPLE.min(window_len.saturating_sub(window_wall.elapsed()))).await;
        let now = std::time::Instant::now();
        call_seconds += board.up.load(Relaxed) as f64 * (now - last_sample).as_secs_f64();
        last_sample = now;
        if rss_steady.is_none() && window_wall.elapsed() >= window_len / 2 {
            rss_steady = bridge_pid.as_deref().and_then(process_rss_kib);
            fds_steady = bridge_pid.as_deref().and_then(process_fds);
            up_at_rss = board.up.load(Relaxed);
        }
    }
    let window = window_wall.elapsed();
    let cpu_window = match (cpu_at_window, bridge_pid.as_deref().and_then(process_cpu)) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let load_cpu = match (load_at_window, process_cpu("self")) {
        (Some(a), Some(b)) => b.saturating_sub(a).as_secs_f64() / window.as_secs_f64(),
        _ => 0.0,
    };

    let mut records = Vec::with_capacity(calls);
    for (index, handle) in handles.into_iter().enumerate() {
        records.push(handle.await.unwrap_or_else(|error| LoadCallRecord {
            index: index as u32,
            error: Some(error.to_string()),
            ..LoadCallRecord::default()
        }));
    }
    if let Some(progress) = progress {
        progress.abort();
        eprintln!();
    }
    // Let the last echoes and the model's view of closing sockets settle.
    tokio::time::sleep(options.model_delay + Duration::from_millis(300)).await;
    model.set_board(None);
    let sessions: Vec<EchoSessionRecord> =
        model.records().into_iter().skip(sessions_before).collect();
    let mut result = join(options, ids, &records, &sessions);
    result.calls = calls;
    result.seconds = duration.as_secs_f64();
    result.provider = side_provider(side).as_str().to_owned();
    // Gemini has no audio-mode axis: its mode is its name.
    result.audio_mode = match side {
        Side::Bridge(Provider::Gemini) => Provider::Gemini.as_str().to_owned(),
        _ => options.audio_mode.as_str().to_owned(),
    };
    result.baseline = matches!(side, Side::Floor(_));
    result.target = match (&options.bridge, side) {
        (BridgeUnderTest::Target { url, .. }, _) => url.to_string(),
        (BridgeUnderTest::InProcess, Side::Bridge(_)) => "in-process".to_owned(),
        (BridgeUnderTest::InProcess, Side::Floor(FloorDriver::Tokio)) => {
            "in-process (baseline relay)".to_owned()
        }
        (BridgeUnderTest::InProcess, Side::Floor(FloorDriver::Uring)) => {
            "in-process (baseline relay, io_uring)".to_owned()
        }
        (BridgeUnderTest::Child, Side::Bridge(_)) => "child".to_owned(),
        (BridgeUnderTest::Child, Side::Floor(FloorDriver::Tokio)) => {
            "child (baseline relay)".to_owned()
        }
        (BridgeUnderTest::Child, Side::Floor(FloorDriver::Uring)) => {
            "child (baseline relay, io_uring)".to_owned()
        }
    };
    if let Side::Floor(driver) = side {
        result.floor_driver = Some(driver.as_str().to_owned());
    }
    result.load_cpu_utilisation = load_cpu;
    result.calls_up = call_seconds / window.as_secs_f64().max(1e-9);
    if let Some(cpu) = cpu_window {
        result.bridge_cpu_ms_per_call_second =
            (call_seconds > 0.0).then(|| cpu.as_secs_f64() * 1e3 / call_seconds);
    }
    result.bridge_rss_kib_steady = rss_steady;
    result.bridge_fds_steady = fds_steady;
    if let (Some(before), Some(steady)) = (rss_before, rss_steady) {
        result.bridge_rss_kib_per_call =
            (up_at_rss > 0).then(|| steady.saturating_sub(before) as f64 / up_at_rss as f64);
    }
    result.machine = machine();
    result
}

/// What the per-call joins add up.
#[derive(Default)]
struct Tally {
    uplink: Vec<f64>,
    downlink: Vec<f64>,
    received: u64,
    uplink_lost: u64,
    downlink_lost: u64,
    barge_in_dropped: u64,
    after_hangup: u64,
    duplicates: u64,
    split: u64,
    foreign: u64,
    unidentified_bytes: u64,
}

impl Tally {
    /// Sorts a model frame that never reached the caller: sent around the hang-up, cleared by
    /// a barge-in, or lost.
    fn unreceived(&mut self, sent_at: u64, stop: Option<u64>, late_us: u64, cleared: bool) {
        if stop.is_some_and(|stop| sent_at.saturating_add(late_us) >= stop) {
            self.after_hangup += 1;
        } else if cleared {
            self.barge_in_dropped += 1;
        } else {
            self.downlink_lost += 1;
        }
    }
}

/// Joins callers' and the model's records by call number, then frame by frame by the ids the
/// frames carry (as `ids` carries them).
fn join(
    options: &BenchOptions,
    ids: AudioMode,
    records: &[LoadCallRecord],
    sessions: &[EchoSessionRecord],
) -> BenchResult {
    let late_us = options.late_threshold.as_secs_f64() * 1e6;
    let mut tally = Tally::default();
    let mut faults = FaultTally::default();
    let mut barge_in = Vec::new();
    let mut setup = Vec::new();
    let mut jitter = Vec::new();
    let (mut errors, mut sent, mut early_hangups) = (0u64, 0u64, 0u64);

    for record in records {
        sent += record.frames_sent_us.len() as u64;
        outbound_jitter(&record.media, &mut jitter);
        if record.error.is_some() {
            errors += 1;
        }
        if record.closed_by_bridge {
            early_hangups += 1;
        }
        let digits = LoadCallRecord::id_digits(record.index);
        // A call has more than one session when the model dropped one (`--model-faults`): the
        // successor learns the caller's digits from the replayed conversation.
        let mut own_sessions: Vec<&EchoSessionRecord> = sessions
            .iter()
            .filter(|s| s.digits.starts_with(&digits))
            .collect();
        own_sessions.sort_by_key(|s| s.connected_at_us);
        let merged;
        let session = match own_sessions.as_slice() {
            [] => {
                // The model never learned who this caller was: nothing of it can be joined.
                errors += 1;
                tally.uplink_lost += record.frames_sent_us.len() as u64;
                continue;
            }
            [only] => *only,
            several => {
                faults.note(record, several);
                merged = merge_sessions(several);
                &merged
            }
        };
        if own_sessions.len() == 1 && session.dropped_at_us.is_some() {
            faults.note(record, &own_sessions);
        }
        errors += session.errors_sent;
        if let (Some(open), Some(update)) = (record.ws_open_us, session.session_update_at_us) {
            setup.push(update.saturating_sub(open) as f64);
        }
        let foreign_before = tally.foreign;
        let own = call_in_ids(ids, record.index);
        join_identified(record, session, own, late_us as u64, &mut tally);
        if tally.foreign > foreign_before {
            // Another call's audio on this one: the call itself went wrong.
            errors += 1;
        }

        // Barge-in: the s-th speech_started against the s-th clear.
        for (s, &started) in session.speech_started_at_us.iter().enumerate() {
            if let Some(&cleared) = record.clears_us.get(s) {
                barge_in.push(cleared.saturating_sub(started) as f64);
            }
        }
    }

    let late = tally
        .uplink
        .iter()
        .chain(&tally.downlink)
        .filter(|&&latency| latency > late_us)
        .count() as u64;
    BenchResult {
        uplink_us: Percentiles::of(&mut tally.uplink.clone()),
        downlink_us: Percentiles::of(&mut tally.downlink.clone()),
        barge_in_us: Percentiles::of(&mut barge_in),
        setup_us: Percentiles::of(&mut setup),
        outbound_jitter_us: Percentiles::of(&mut jitter),
        late_frames: late,
        late_threshold_ms: options.late_threshold.as_secs_f64() * 1e3,
        lost_frames: tally.uplink_lost + tally.downlink_lost,
        uplink_lost_frames: tally.uplink_lost,
        downlink_lost_frames: tally.downlink_lost,
        barge_in_dropped_frames: tally.barge_in_dropped,
        after_hangup_frames: tally.after_hangup,
        duplicate_frames: tally.duplicates,
        split_frames: tally.split,
        foreign_frames: tally.foreign,
        unidentified_bytes: tally.unidentified_bytes,
        early_hangups,
        frames_identified: true,
        errors: errors + early_hangups,
        frames_sent: sent,
        frames_received: tally.received,
        samples: Samples {
            uplink_us: thin(tally.uplink),
            downlink_us: thin(tally.downlink),
        },
        model_faults: options.model_faults.map(|fraction| ModelFaultResult {
            fraction,
            sessions_dropped: sessions
                .iter()
                .filter(|s| s.dropped_at_us.is_some())
                .count() as u64,
            sessions_replaced: faults.reconnect_gaps.len() as u64,
            calls_affected: faults.calls_affected,
            calls_lost: faults.calls_lost,
            frames_swallowed: faults.frames_swallowed,
            calls_with_gap_over_1s: faults.caller_gaps.iter().filter(|&&gap| gap > 1e6).count()
                as u64,
            reconnect_gap_us: Percentiles::of(&mut faults.reconnect_gaps),
            caller_gap_us: Percentiles::of(&mut faults.caller_gaps),
        }),
        ..BenchResult::default()
    }
}

/// What `--model-faults` adds up: per drop, the reconnect gap the model saw and the gap in the
/// echo the caller heard.
#[derive(Default)]
struct FaultTally {
    reconnect_gaps: Vec<f64>,
    caller_gaps: Vec<f64>,
    calls_affected: u64,
    calls_lost: u64,
    /// Caller frames a dropped session had received but not yet echoed.
    frames_swallowed: u64,
}

impl FaultTally {
    /// A call that had a session dropped: its sessions in connection order.
    fn note(&mut self, record: &LoadCallRecord, sessions: &[&EchoSessionRecord]) {
        let mut affected = false;
        let mut echoed = None;
        for (index, session) in sessions.iter().enumerate() {
            let Some(dropped) = session.dropped_at_us else {
                continue;
            };
            affected = true;
            // One set per call, not a scan per frame: a long call has tens of thousands.
            let echoed = echoed.get_or_insert_with(|| {
                sessions
                    .iter()
                    .flat_map(|s| s.echoed.iter().map(|echoed| echoed.id))
                    .collect::<std::collections::HashSet<_>>()
            });
            self.frames_swallowed += session
                .uplink
                .iter()
                .filter(|(id, _, _)| !echoed.contains(id))
                .count() as u64;
            if let Some(configured) = sessions
                .get(index + 1)
                .and_then(|next| next.session_update_at_us)
            {
                self.reconnect_gaps
                    .push(configured.saturating_sub(dropped) as f64);
            }
            // The silence the caller heard around the drop: the last echoed frame before it,
            // the first after (none after: the call ended first, nothing to measure).
            let before = record
                .downlink
                .iter()
                .map(|frame| frame.at_us)
                .filter(|&at| at <= dropped)
                .max();
            let after = record
                .downlink
                .iter()
                .map(|frame| frame.at_us)
                .filter(|&at| at > dropped)
                .min();
            if let (Some(before), Some(after)) = (before, after) {
                self.caller_gaps.push(after.saturating_sub(before) as f64);
            }
        }
        if affected {
            self.calls_affected += 1;
            if record.error.is_some() || record.closed_by_bridge {
                self.calls_lost += 1;
            }
        }
    }
}

/// One call's sessions as one: what each saw, in order (response indices moved along).
fn merge_sessions(sessions: &[&EchoSessionRecord]) -> EchoSessionRecord {
    let mut merged = sessions[0].clone();
    for session in &sessions[1..] {
        let offset = merged.responses.len() as u32;
        merged.responses.extend(session.responses.iter().cloned());
        merged.echoed.extend(session.echoed.iter().map(|echoed| {
            let mut echoed = *echoed;
            echoed.response += offset;
            echoed
        }));
        merged.uplink.extend_from_slice(&session.uplink);
        merged.uplink_skipped_bytes += session.uplink_skipped_bytes;
        merged
            .speech_started_at_us
            .extend_from_slice(&session.speech_started_at_us);
        merged.truncates.extend(session.truncates.iter().cloned());
        merged.errors_sent += session.errors_sent;
    }
    merged
}

/// One call's frames by the ids they carry (`own` is the call as they carry it). Uplink: each
/// frame the caller sent should reach the model once. Downlink: each frame the model echoed
/// should reach the caller once, unless it was the tail of a response a barge-in cleared, or
/// was sent around the hang-up.
fn join_identified(
    record: &LoadCallRecord,
    session: &EchoSessionRecord,
    own: u16,
    late_us: u64,
    tally: &mut Tally,
) {
    let sent = &record.frames_sent_us;
    let configured = session.session_update_at_us.unwrap_or(u64::MAX);
    tally.unidentified_bytes += session.uplink_skipped_bytes + record.skipped_bytes;

    let mut arrivals = vec![0u32; sent.len()];
    for &(id, at, split) in &session.uplink {
        let Some(count) = arrivals
            .get_mut(id.frame as usize)
            .filter(|_| id.call == own)
        else {
            tally.foreign += 1;
            continue;
        };
        *count += 1;
        if *count > 1 {
            tally.duplicates += 1;
            continue;
        }
        tally.split += u64::from(split);
        let sent_at = sent[id.frame as usize];
        // Frames sent before the session existed waited for set-up, measured apart.
        if sent_at >= configured {
            tally.uplink.push(at.saturating_sub(sent_at) as f64);
        }
    }
    // A frame sent at the hang-up may still be in the relay (in `pcm16` the resampler holds
    // the last 5 ms of the last frame for input that never comes): counted apart, as on the
    // downlink.
    for (&count, &sent_at) in arrivals.iter().zip(sent) {
        if count > 0 {
            continue;
        }
        let stop = record.stop_sent_us;
        if stop.is_some_and(|stop| sent_at.saturating_add(late_us) >= stop) {
            tally.after_hangup += 1;
        } else {
            tally.uplink_lost += 1;
        }
    }

    // Downlink: the first arrival of each of this call's frames.
    let mut heard: Vec<Option<u64>> = vec![None; sent.len()];
    for frame in &record.downlink {
        let Some(slot) = heard
            .get_mut(frame.id.frame as usize)
            .filter(|_| frame.id.call == own)
        else {
            tally.foreign += 1;
            continue;
        };
        if slot.is_some() {
            tally.duplicates += 1;
            continue;
        }
        *slot = Some(frame.at_us);
        tally.split += u64::from(frame.split);
    }
    // The last echoed frame of each response that the caller heard: unheard frames after it
    // are the tail a barge-in cleared; unheard frames before it were lost.
    let heard_of = |id: super::watermark::FrameId| {
        heard
            .get(id.frame as usize)
            .copied()
            .flatten()
            .filter(|_| id.call == own)
    };
    let mut last_heard = vec![None; session.responses.len()];
    for (position, echoed) in session.echoed.iter().enumerate() {
        if heard_of(echoed.id).is_some() {
            if let Some(slot) = last_heard.get_mut(echoed.response as usize) {
                *slot = Some(position);
            }
        }
    }
    for (position, echoed) in session.echoed.iter().enumerate() {
        match heard_of(echoed.id) {
            Some(at) => {
                tally.downlink.push(at.saturating_sub(echoed.at_us) as f64);
                tally.received += 1;
            }
            None => {
                let response = echoed.response as usize;
                let interrupted = session.responses.get(response).is_some_and(|r| {
                    session
                        .speech_started_at_us
                        .iter()
                        .any(|&barge| barge >= r.started_at_us)
                });
                let tail = last_heard
                    .get(response)
                    .copied()
                    .flatten()
                    .is_none_or(|last| position > last);
                tally.unreceived(
                    echoed.at_us,
                    record.stop_sent_us,
                    late_us,
                    interrupted && tail,
                );
            }
        }
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
    let ((year, month, day), _) = voxrelay_core::time::utc_civil(std::time::SystemTime::now());
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
        "\nvoxrelay bench: {} calls × {:.0} s, provider {}, audio {}, bridge {}{}",
        result.calls,
        result.seconds,
        result.provider,
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
        "  frames sent {} received {}, late (> {:.0} ms) {}, lost {} (up {}, down {}), errors {} ({} hung up early by the relay)",
        result.frames_sent,
        result.frames_received,
        result.late_threshold_ms,
        result.late_frames,
        result.lost_frames,
        result.uplink_lost_frames,
        result.downlink_lost_frames,
        result.errors,
        result.early_hangups,
    );
    let _ = writeln!(
        out,
        "  frames {}: duplicated {}, split {}, on the wrong call {}, unidentified bytes {}; cleared by barge-in {}, sent around hang-up {}",
        if result.frames_identified {
            "identified by id"
        } else {
            "joined by byte offset"
        },
        result.duplicate_frames,
        result.split_frames,
        result.foreign_frames,
        result.unidentified_bytes,
        result.barge_in_dropped_frames,
        result.after_hangup_frames,
    );
    let fmt = |v: Option<f64>, unit: &str| {
        v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2} {unit}"))
    };
    let _ = writeln!(
        out,
        "  relay CPU {} per call-second, RSS {} per call ({:.0} calls up in the window); load process CPU {:.0}% of a core",
        fmt(result.bridge_cpu_ms_per_call_second, "ms"),
        fmt(result.bridge_rss_kib_per_call, "KiB"),
        result.calls_up,
        result.load_cpu_utilisation * 100.0
    );
    if result.provider == Provider::Gemini.as_str() && !result.baseline {
        let _ = writeln!(
            out,
            "  turns: not timed on Gemini here (its speech end is the caller's silence, and these callers never fall silent)"
        );
    }
    if let Some(turns) = result
        .turns
        .as_ref()
        .filter(|t| t.voice_to_voice_ms.count > 0)
    {
        let v2v = &turns.voice_to_voice_ms;
        let _ = writeln!(
            out,
            "  turns, as the bridge timed them (n={}): voice-to-voice p50 {:.0} ms, p99 {:.0} ms; mean {:.1} ms = model {:.1} + bridge {:.2} + playout {:.1}",
            v2v.count,
            v2v.p50,
            v2v.p99,
            v2v.mean,
            turns.model_ms.mean,
            turns.bridge_ms.mean,
            turns.playout_ms.mean,
        );
        if turns.talk_over_ms.count > 0 {
            let _ = writeln!(
                out,
                "  barge-in talk-over (caller speech start to clear, n={}): p50 {:.0} ms, p99 {:.0} ms",
                turns.talk_over_ms.count, turns.talk_over_ms.p50, turns.talk_over_ms.p99,
            );
        }
    }
    if let Some(max) = result.max_calls_held {
        let _ = writeln!(
            out,
            "  ramp: largest call count that held the budget: {max}"
        );
    }
    if let Some(faults) = &result.model_faults {
        let _ = writeln!(
            out,
            "  model faults ({:.0}% of sessions dropped at random): {} sessions dropped, {} replaced; {} calls affected, {} lost; reconnect gap p50 {:.0} ms p99 {:.0} ms max {:.0} ms; caller's gap p50 {:.0} ms p99 {:.0} ms, above 1 s in {} calls; {} caller frames went down with their session",
            faults.fraction * 100.0,
            faults.sessions_dropped,
            faults.sessions_replaced,
            faults.calls_affected,
            faults.calls_lost,
            faults.reconnect_gap_us.p50 / 1e3,
            faults.reconnect_gap_us.p99 / 1e3,
            faults.reconnect_gap_us.max / 1e3,
            faults.caller_gap_us.p50 / 1e3,
            faults.caller_gap_us.p99 / 1e3,
            faults.calls_with_gap_over_1s,
            faults.frames_swallowed,
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

/// The bridge against the floor, as ratios at equal call counts (noise cancels out within
/// one run): with ramps, the steps at the largest count both held (or, if none held in both,
/// the largest both measured); otherwise the run's one count.
pub fn comparison(bridge: &BenchResult, floor: &BenchResult) -> String {
    comparison_of("bridge", bridge, "floor", floor)
}

/// [`comparison`] of any two results of one run, named `a_name` and `b_name` (e.g. the
/// io_uring floor against the tokio floor).
pub fn comparison_of(
    a_name: &str,
    bridge: &BenchResult,
    b_name: &str,
    floor: &BenchResult,
) -> String {
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.2}×", a / b)
        } else {
            "n/a".to_owned()
        }
    };
    let cpu = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => ratio(a, b),
        _ => "n/a".to_owned(),
    };
    let pair = |wanted_held: bool| {
        bridge
            .ramp
            .iter()
            .filter(|step| step.held || !wanted_held)
            .filter_map(|step| {
                floor
                    .ramp
                    .iter()
                    .find(|other| other.calls == step.calls && (other.held || !wanted_held))
                    .map(|other| (step, other))
            })
            .max_by_key(|(step, _)| step.calls)
    };
    let mut line = match pair(true).or_else(|| pair(false)) {
        Some((a, b)) => format!(
            "{a_name} ÷ {b_name} at {} calls: uplink p50 {} p99 {}, downlink p50 {} p99 {}, CPU per call-second {}",
            a.calls,
            ratio(a.uplink_us.p50, b.uplink_us.p50),
            ratio(a.uplink_us.p99, b.uplink_us.p99),
            ratio(a.downlink_us.p50, b.downlink_us.p50),
            ratio(a.downlink_us.p99, b.downlink_us.p99),
            cpu(a.cpu_ms_per_call_second, b.cpu_ms_per_call_second),
        ),
        None => format!(
            "{a_name} ÷ {b_name} at {} calls: uplink p50 {} p99 {}, downlink p50 {} p99 {}, CPU per call-second {}",
            bridge.calls,
            ratio(bridge.uplink_us.p50, floor.uplink_us.p50),
            ratio(bridge.uplink_us.p99, floor.uplink_us.p99),
            ratio(bridge.downlink_us.p50, floor.downlink_us.p50),
            ratio(bridge.downlink_us.p99, floor.downlink_us.p99),
            cpu(
                bridge.bridge_cpu_ms_per_call_second,
                floor.bridge_cpu_ms_per_call_second
            ),
        ),
    };
    if !bridge.ramp.is_empty() {
        let held = |v: Option<usize>| v.map_or_else(|| "none".to_owned(), |v| v.to_string());
        let _ = write!(
            line,
            "; held calls {} vs {} (capacity {})",
            held(bridge.max_calls_held),
            held(floor.max_calls_held),
            match (bridge.max_calls_held, floor.max_calls_held) {
                (Some(a), Some(b)) => ratio(a as f64, b as f64),
                _ => "n/a".to_owned(),
            }
        );
    }
    line
}

/// Writes the JSON result.
pub fn write_json(path: &PathBuf, result: &BenchResult) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(result).map_err(std::io::Error::other)?;
    std::fs::write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::echo_model::{EchoFormat, EchoResponse, EchoedFrame};
    use crate::load::DownlinkFrame;
    use crate::watermark::FrameId;

    fn options(audio_mode: AudioMode) -> BenchOptions {
        BenchOptions {
            late_threshold: Duration::from_millis(40),
            audio_mode,
            ..BenchOptions::default()
        }
    }

    /// Call 259 (in `pcm16` its frames carry 259's low 8 bits, 3): ten frames up, frame 4
    /// lost on the way; the first response echoes 0-3 and is cut by a barge-in, the second
    /// echoes 6-9, and frame 5, whose head went out in the first, counts there. The caller
    /// hears 0-3, then after the clear 6, 7 twice, 8, and a frame of another call.
    fn scripted_call(audio_mode: AudioMode) -> (LoadCallRecord, EchoSessionRecord) {
        let own = call_in_ids(audio_mode, 259);
        let id = |frame| FrameId { call: own, frame };
        let mut record = LoadCallRecord {
            index: 259,
            ws_open_us: Some(1_000),
            frames_sent_us: (0..10).map(|k| 10_000 + 20_000 * k).collect(),
            media: vec![(0, 160, 300_500), (0, 320, 320_700), (1, 160, 900_300)],
            clears_us: vec![800_050],
            ..LoadCallRecord::default()
        };
        let heard = |frame, generation, at_us| DownlinkFrame {
            id: id(frame),
            generation,
            at_us,
            split: false,
        };
        record.downlink = vec![
            heard(0, 0, 300_500),
            heard(1, 0, 320_700),
            heard(2, 0, 340_700),
            heard(3, 0, 360_700),
            heard(6, 1, 900_300),
            heard(7, 1, 920_300),
            heard(7, 1, 920_400),
            heard(8, 1, 940_300),
            DownlinkFrame {
                id: FrameId {
                    call: own + 1,
                    frame: 8,
                },
                ..heard(8, 1, 940_400)
            },
        ];
        let echoed = |frame, response, at_us| EchoedFrame {
            id: id(frame),
            at_us,
            response,
        };
        let session = EchoSessionRecord {
            digits: LoadCallRecord::id_digits(259),
            connected_at_us: 1_500,
            session_update_at_us: Some(5_000),
            format: EchoFormat::Pcmu,
            uplink: (0..10)
                .filter(|&k| k != 4)
                .map(|k| (id(k), 10_200 + 20_000 * u64::from(k), false))
                .collect(),
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
            echoed: vec![
                echoed(0, 0, 300_000),
                echoed(1, 0, 320_000),
                echoed(2, 0, 340_000),
                echoed(3, 0, 360_000),
                echoed(5, 0, 900_000),
                echoed(6, 1, 900_000),
                echoed(7, 1, 920_000),
                echoed(8, 1, 940_000),
                echoed(9, 1, 960_000),
            ],
            speech_started_at_us: vec![800_000],
            ..EchoSessionRecord::default()
        };
        (record, session)
    }

    #[test]
    fn joins_uplink_downlink_and_barge_in_by_id_in_both_modes() {
        for mode in [AudioMode::Pcmu, AudioMode::Pcm16] {
            let (record, session) = scripted_call(mode);
            let result = join(&options(mode), mode, &[record], &[session]);
            assert!(result.frames_identified);
            assert_eq!(result.uplink_us.count, 9, "{mode}");
            assert_eq!(result.uplink_us.max, 200.0);
            assert_eq!(result.uplink_lost_frames, 1);
            assert_eq!(result.downlink_us.count, 7);
            assert_eq!(result.downlink_us.max, 700.0);
            assert_eq!(result.frames_received, 7);
            // Frame 5 went out at the barge-in; frame 9 was never heard.
            assert_eq!(result.barge_in_dropped_frames, 1);
            assert_eq!(result.downlink_lost_frames, 1);
            assert_eq!(result.lost_frames, 2);
            assert_eq!((result.duplicate_frames, result.foreign_frames), (1, 1));
            // Another call's audio on this one makes the call an error.
            assert_eq!(result.errors, 1);
            assert_eq!(result.barge_in_us.max, 50.0);
            assert_eq!(result.setup_us.max, 4_000.0);
        }
        // Had the caller hung up 30 ms after sending frame 4, it and the unheard echoes would
        // have been in flight at the hang-up, not lost.
        let (mut record, session) = scripted_call(AudioMode::Pcm16);
        record.stop_sent_us = Some(120_000);
        let result = join(
            &options(AudioMode::Pcm16),
            AudioMode::Pcm16,
            &[record],
            &[session],
        );
        assert_eq!((result.lost_frames, result.after_hangup_frames), (0, 3));
        // Counted in the second response instead, frame 5 would be lost.
        let (record, mut session) = scripted_call(AudioMode::Pcm16);
        session.echoed[4].response = 1;
        let result = join(
            &options(AudioMode::Pcm16),
            AudioMode::Pcm16,
            &[record],
            &[session],
        );
        assert_eq!(result.downlink_lost_frames, 2);
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

    #[test]
    fn an_unidentified_caller_is_an_error_and_its_frames_are_lost() {
        let record = LoadCallRecord {
            index: 9,
            frames_sent_us: vec![1, 2],
            ..LoadCallRecord::default()
        };
        let result = join(&options(AudioMode::Pcm16), AudioMode::Pcm16, &[record], &[]);
        assert_eq!((result.errors, result.lost_frames), (1, 2));
    }

    /// A launcher for runs that measure only the floor: it never starts a bridge.
    struct FloorOnly;

    /// No bridge can exist: [`FloorOnly`] refuses to launch one.
    enum NoBridge {}

    impl crate::launcher::InProcessBridge for NoBridge {
        fn local_addr(&self) -> SocketAddr {
            match *self {}
        }

        fn admin_addr(&self) -> SocketAddr {
            match *self {}
        }

        async fn stop(self, _drain: Duration) -> crate::launcher::BridgeFigures {
            match self {}
        }
    }

    impl crate::launcher::TenantLookups for NoBridge {
        async fn resolve(
            &self,
            _cache: crate::launcher::LookupCache,
            _to: &str,
            _from: &str,
            _call_sid: &str,
        ) -> Result<(), &'static str> {
            match *self {}
        }
    }

    impl BridgeLauncher for FloorOnly {
        type Bridge = NoBridge;
        type Lookups = NoBridge;

        async fn launch(&self, _settings: BridgeSettings) -> std::io::Result<NoBridge> {
            Err(std::io::Error::other("these tests measure the floor only"))
        }

        fn tenant_lookups(
            &self,
            _control: &crate::launcher::ControlPlaneAccess,
        ) -> Result<NoBridge, String> {
            Err("these tests measure the floor only".to_owned())
        }
    }

    /// The harness against the baseline relay on `driver` in this process, two calls of
    /// 2.5 s, with `fault` planted.
    async fn planted(
        driver: FloorDriver,
        fault: Option<Fault>,
        barge_in_every: Option<Duration>,
    ) -> BenchResult {
        let options = BenchOptions {
            calls: 2,
            seconds: 2.5,
            bridge: BridgeUnderTest::InProcess,
            floor_only: true,
            floor_fault: fault,
            floor_drivers: vec![driver],
            ramp_up: Duration::ZERO,
            model_delay: Duration::from_millis(40),
            barge_in_every,
            // Frames sent this close to the hang-up count as in flight at it (the drop planted
            // 1 in 100 falls 0.4 s before it). Nothing here asserts on latency.
            late_threshold: Duration::from_millis(100),
            progress: false,
            ..BenchOptions::default()
        };
        tokio::time::timeout(Duration::from_secs(30), run(&options, &FloorOnly))
            .await
            .expect("the run ends in time")
            .expect("the run starts")
    }

    async fn a_clean_relay_has_every_frame_accounted_for(driver: FloorDriver) {
        let result = planted(driver, None, Some(Duration::from_millis(900))).await;
        assert_eq!(result.floor_driver.as_deref(), Some(driver.as_str()));
        assert!(result.frames_identified);
        assert_eq!(result.frames_sent, 2 * 125);
        assert_eq!(
            (result.errors, result.frame_faults(), result.split_frames),
            (0, 0, 0),
            "{result:?}"
        );
        assert_eq!(result.unidentified_bytes, 0);
        assert!(result.uplink_us.count > 200, "{:?}", result.uplink_us);
        assert!(result.downlink_us.count > 100, "{:?}", result.downlink_us);
        assert!(result.barge_in_us.count >= 2, "{:?}", result.barge_in_us);
    }

    async fn a_relay_that_drops_one_downlink_frame_in_a_hundred_is_caught(driver: FloorDriver) {
        let result = planted(driver, Some(Fault::DropDownlink), None).await;
        assert_eq!(result.downlink_lost_frames, 2, "{result:?}");
        assert_eq!(result.uplink_lost_frames, 0);
        assert_eq!(result.lost_frames, 2);
    }

    async fn a_relay_that_hangs_up_early_is_caught(driver: FloorDriver) {
        let result = planted(driver, Some(Fault::HangUpEarly), None).await;
        assert_eq!(result.early_hangups, 2, "{result:?}");
        assert!(result.errors >= 2);
    }

    async fn a_relay_that_rechunks_is_caught(driver: FloorDriver) {
        let result = planted(driver, Some(Fault::Rechunk), None).await;
        assert!(result.split_frames > 100, "{result:?}");
        assert_eq!(result.frame_faults(), 0, "split, yet whole: {result:?}");
    }

    async fn a_relay_that_mixes_two_calls_is_caught(driver: FloorDriver) {
        let result = planted(driver, Some(Fault::MixCalls), None).await;
        assert!(result.foreign_frames > 0, "{result:?}");
        assert!(result.errors > 0);
    }

    /// The harness's own checks, each against the floor of one driver.
    macro_rules! floor_checks {
        ($module:ident, $driver:expr) => {
            mod $module {
                use super::*;

                #[tokio::test]
                async fn a_clean_relay_has_every_frame_accounted_for() {
                    super::a_clean_relay_has_every_frame_accounted_for($driver).await;
                }

                #[tokio::test]
                async fn a_relay_that_drops_one_downlink_frame_in_a_hundred_is_caught() {
                    super::a_relay_that_drops_one_downlink_frame_in_a_hundred_is_caught($driver)
                        .await;
                }

                #[tokio::test]
                async fn a_relay_that_hangs_up_early_is_caught() {
                    super::a_relay_that_hangs_up_early_is_caught($driver).await;
                }

                #[tokio::test]
                async fn a_relay_that_rechunks_is_caught() {
                    super::a_relay_that_rechunks_is_caught($driver).await;
                }

                #[tokio::test]
                async fn a_relay_that_mixes_two_calls_is_caught() {
                    super::a_relay_that_mixes_two_calls_is_caught($driver).await;
                }
            }
        };
    }

    floor_checks!(tokio_floor, FloorDriver::Tokio);
    #[cfg(all(feature = "io-uring", target_os = "linux"))]
    floor_checks!(uring_floor, FloorDriver::Uring);

    /// Without the feature the io_uring floor is refused by name, not silently replaced.
    #[cfg(not(all(feature = "io-uring", target_os = "linux")))]
    #[tokio::test]
    async fn the_uring_floor_says_when_it_is_not_built() {
        let options = BenchOptions {
            calls: 1,
            seconds: 1.0,
            bridge: BridgeUnderTest::InProcess,
            floor_only: true,
            floor_drivers: vec![FloorDriver::Uring],
            progress: false,
            ..BenchOptions::default()
        };
        let error = run(&options, &FloorOnly)
            .await
            .expect_err("no io_uring floor");
        assert!(error.to_string().contains("--features io-uring"), "{error}");
    }

    /// Every side of a run with two floor drivers is measured, and the second floor is
    /// compared with the first.
    #[test]
    fn a_second_floor_is_compared_with_the_first() {
        let floor = |driver: FloorDriver, cpu| BenchResult {
            baseline: true,
            floor_driver: Some(driver.as_str().to_owned()),
            bridge_cpu_ms_per_call_second: Some(cpu),
            ..BenchResult::default()
        };
        let options = BenchOptions {
            floor: true,
            floor_drivers: vec![FloorDriver::Tokio, FloorDriver::Uring],
            ..BenchOptions::default()
        };
        assert_eq!(
            sides(&options),
            [
                Side::Bridge(Provider::OpenAi),
                Side::Floor(FloorDriver::Tokio),
                Side::Floor(FloorDriver::Uring)
            ]
        );
        let bridge = BenchResult {
            bridge_cpu_ms_per_call_second: Some(3.0),
            ..BenchResult::default()
        };
        let result = combine(vec![
            (Side::Bridge(Provider::OpenAi), bridge),
            (
                Side::Floor(FloorDriver::Tokio),
                floor(FloorDriver::Tokio, 2.0),
            ),
            (
                Side::Floor(FloorDriver::Uring),
                floor(FloorDriver::Uring, 1.0),
            ),
        ]);
        assert_eq!(
            result.ratios.as_ref().and_then(|r| r.cpu_per_call_second),
            Some(1.5)
        );
        assert_eq!(result.other_floors.len(), 1);
        assert_eq!(
            result.other_floor_ratios[0].cpu_per_call_second,
            Some(0.5),
            "uring ÷ tokio"
        );
        let json = serde_json::to_value(&result).unwrap();
        assert_eq!(json["floor"]["floor_driver"], "tokio");
        assert_eq!(json["other_floors"][0]["floor_driver"], "uring");
    }

    /// `--provider openai,gemini --baseline`: both bridges, then the floor, at every step; the
    /// second provider's result follows the first's, each compared with the same floor.
    #[test]
    fn a_second_provider_is_measured_beside_the_first() {
        let options = BenchOptions {
            floor: true,
            providers: vec![Provider::OpenAi, Provider::Gemini, Provider::OpenAi],
            ..BenchOptions::default()
        };
        let expected = [
            Side::Bridge(Provider::OpenAi),
            Side::Bridge(Provider::Gemini),
            Side::Floor(FloorDriver::Tokio),
        ];
        assert_eq!(sides(&options), expected, "each provider once, in order");
        assert_eq!(
            sides(&BenchOptions {
                providers: Vec::new(),
                ..BenchOptions::default()
            }),
            [Side::Bridge(Provider::OpenAi)],
            "OpenAI when none is named"
        );
        let run = |provider: &str, cpu| BenchResult {
            provider: provider.to_owned(),
            audio_mode: if provider == "gemini" {
                "gemini"
            } else {
                "pcm16"
            }
            .to_owned(),
            bridge_cpu_ms_per_call_second: Some(cpu),
            ..BenchResult::default()
        };
        let result = combine(
            expected
                .into_iter()
                .zip([run("openai", 3.0), run("gemini", 4.0), run("openai", 2.0)])
                .collect(),
        );
        assert_eq!(result.provider, "openai");
        assert_eq!(result.other_providers.len(), 1);
        assert!(result.other_floors.is_empty());
        let cpu_ratio = |r: &BenchResult| r.ratios.as_ref().and_then(|r| r.cpu_per_call_second);
        assert_eq!(cpu_ratio(&result), Some(1.5));
        assert_eq!(cpu_ratio(&result.other_providers[0]), Some(2.0));
        let json = serde_json::to_value(&result).unwrap();
        assert_eq!(json["provider"], "openai");
        assert_eq!(json["other_providers"][0]["provider"], "gemini");
        assert_eq!(json["other_providers"][0]["audio_mode"], "gemini");
        assert_eq!(json["floor"]["provider"], "openai");
    }

    #[test]
    fn ratios_compare_the_largest_count_both_held() {
        let step = |calls, held, cpu| RampStep {
            calls,
            held,
            cpu_ms_per_call_second: Some(cpu),
            ..RampStep::default()
        };
        let bridge = BenchResult {
            ramp: vec![
                step(100, true, 1.2),
                step(200, true, 1.1),
                step(300, false, 1.0),
            ],
            max_calls_held: Some(200),
            ..BenchResult::default()
        };
        let floor = BenchResult {
            ramp: vec![
                step(100, true, 1.0),
                step(200, true, 1.0),
                step(300, true, 0.9),
                step(400, false, 0.9),
            ],
            max_calls_held: Some(300),
            ..BenchResult::default()
        };
        let ratios = ratios(&bridge, &floor);
        assert_eq!(ratios.calls, Some(200));
        assert!((ratios.capacity.unwrap() - 2.0 / 3.0).abs() < 1e-9);
        assert!((ratios.cpu_per_call_second.unwrap() - 1.1).abs() < 1e-9);
        let line = comparison(&bridge, &floor);
        assert!(line.starts_with("bridge ÷ floor at 200 calls"), "{line}");
        assert!(line.contains("CPU per call-second 1.10×"), "{line}");
        assert!(
            line.contains("held calls 200 vs 300 (capacity 0.67×)"),
            "{line}"
        );
        let json = serde_json::to_value(BenchResult {
            ratios: Some(ratios),
            ..bridge
        })
        .unwrap();
        assert!(json["ratios"]["capacity"].is_number());
        assert!(json["ratios"]["cpu_per_call_second"].is_number());
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(utc_date().len(), 10);
    }
}
