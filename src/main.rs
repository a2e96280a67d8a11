//! The `voxrelay` binary: `serve` and `healthcheck` always; `call`, `demo`, `bench` and the
//! hidden `baseline-relay` with the `sim` feature (the simulator, `voxrelay-sim`);
//! `control-plane` with the `control-plane` feature (`voxrelay-control-plane`). Both features
//! are on by default; the production image is built without them.

#[cfg(any(feature = "sim", feature = "control-plane"))]
use std::net::SocketAddr;
#[cfg(any(feature = "sim", feature = "control-plane"))]
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use url::Url;

#[cfg(feature = "sim")]
use voxrelay::AudioMode;
#[cfg(feature = "sim")]
use voxrelay::Secret;
use voxrelay::config::{BridgeConfig, RawConfig};
use voxrelay::http::{Bridge, shutdown_signal};
#[cfg(feature = "sim")]
use voxrelay::in_process::InProcessLauncher;
#[cfg(feature = "control-plane")]
use voxrelay_control_plane::seed::SeedSource;
#[cfg(feature = "control-plane")]
use voxrelay_control_plane::server::{ControlPlane, ControlPlaneConfig};
#[cfg(feature = "control-plane")]
use voxrelay_control_plane::store::DbLocation;
#[cfg(feature = "sim")]
use voxrelay_core::Provider;
#[cfg(feature = "control-plane")]
use voxrelay_core::control::signing::Verifier;
#[cfg(feature = "sim")]
use voxrelay_sim::baseline::FloorRelay;
#[cfg(feature = "sim")]
use voxrelay_sim::caller::{CallerConfig, place_call};
#[cfg(feature = "sim")]
use voxrelay_sim::demo::{DemoOptions, run_demo};
#[cfg(feature = "sim")]
use voxrelay_sim::harness::{self, BenchOptions, BridgeUnderTest};
#[cfg(feature = "sim")]
use voxrelay_sim::mock::{MockConfig, MockRealtimeServer};
#[cfg(feature = "sim")]
use voxrelay_sim::{SPEECH_FIXTURE, http_client};

#[derive(Parser)]
#[command(
    name = "voxrelay",
    version,
    about = "Realtime media bridge: Twilio Media Streams ⇄ realtime voice models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up and consumed at once: the size of a variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the bridge.
    Serve(RawConfig),
    /// Place one simulated, signed Twilio call against a running bridge.
    #[cfg(feature = "sim")]
    Call(CallArgs),
    /// Run a bridge, a mock model and a few simulated calls in one process.
    #[cfg(feature = "sim")]
    Demo(DemoArgs),
    /// Exit 0 when a bridge answers its health check (for container HEALTHCHECKs).
    Healthcheck(HealthcheckArgs),
    /// The benchmark's do-nothing relay (the machine's floor); unauthenticated, never expose it.
    #[cfg(feature = "sim")]
    #[command(hide = true)]
    BaselineRelay(BaselineRelayArgs),
    /// Latency benchmark: simulated callers and an echo model against a bridge.
    #[cfg(feature = "sim")]
    Bench(BenchArgs),
    /// Run the reference control plane: tenants, call history and tools in SQLite, behind the
    /// signed /v1 API. Keys come from VOXRELAY_CONTROL_PLANE_KEYS (`key_id:secret[:scope][,…]`,
    /// scope `bridge` (the default) or `operator`).
    #[cfg(feature = "control-plane")]
    ControlPlane(ControlPlaneArgs),
}

#[cfg(feature = "control-plane")]
#[derive(Args)]
struct ControlPlaneArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// SQLite database file, created if missing.
    #[arg(long)]
    db: PathBuf,
    /// Seed file (TOML, see fixtures/tenants.toml), upserted on every start.
    #[arg(long)]
    seed: Option<PathBuf>,
}

#[cfg(feature = "sim")]
#[derive(Args)]
struct BaselineRelayArgs {
    /// Address to listen on (port 0 picks one; the bound address is the first line on stdout).
    #[arg(long)]
    listen: SocketAddr,
    /// The realtime endpoint to relay to (e.g. the benchmark's mock).
    #[arg(long)]
    upstream_url: String,
    /// A PEM file of CA certificates the upstream connection trusts besides the webpki roots
    /// (`bench --model-tls` passes the run's CA).
    #[arg(long)]
    model_ca_file: Option<PathBuf>,
    /// Plant a fault (the harness's own tests check that each is caught).
    #[arg(long, value_enum, hide = true)]
    fault: Option<voxrelay::bench::baseline::Fault>,
    /// How the relay moves bytes: tokio (hyper, fastwebsockets, tokio-tungstenite, a task per
    /// call) or uring (one thread, one io_uring, every call; needs a build with `--features
    /// io-uring`, Linux, and a plain ws:// upstream).
    #[arg(long, value_enum, default_value = "tokio")]
    driver: voxrelay::bench::baseline::FloorDriver,
}

#[cfg(feature = "sim")]
#[derive(Args)]
struct BenchArgs {
    /// Concurrent calls (with --ramp: the first step).
    #[arg(long, default_value_t = 20)]
    calls: usize,
    /// How long each call streams, in seconds (with --ramp: each step).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// pcmu or pcm16 (the OpenAI side's; Gemini has no mode: PCM16 16 kHz in, 24 kHz out).
    #[arg(long, default_value = "pcmu")]
    audio_mode: AudioMode,
    /// The model API the bridge speaks to the echo model: openai (the default) or gemini, or
    /// both, comma-separated, each measured at every step of the same run in this order (the
    /// first is the result, the others follow it as `other_providers`).
    #[arg(long, value_delimiter = ',', default_value = "openai")]
    provider: Vec<Provider>,
    /// Benchmark a running bridge at this base URL instead of starting one; it must use the
    /// harness's echo model as VOXRELAY_OPENAI_URL, or with --provider gemini as
    /// VOXRELAY_GEMINI_URL (printed at start; see --model-listen).
    #[arg(long)]
    target: Option<Url>,
    /// With --target: the public origin the bridge checks signatures against (default: --target).
    #[arg(long)]
    public_url: Option<Url>,
    /// With --target: the bridge's Twilio auth token.
    #[arg(long, env = "TWILIO_AUTH_TOKEN", hide_env_values = true)]
    twilio_auth_token: Option<String>,
    /// Run the bridge inside the harness process instead of as a child process.
    #[arg(long, conflicts_with = "target")]
    in_process: bool,
    /// Also measure the built-in do-nothing relay (the machine's floor) and report it beside the bridge.
    #[arg(long)]
    baseline: bool,
    /// With --baseline: the floor's driver, or several, comma-separated, each measured at
    /// every step of the same run in this order (the first is the one the bridge is compared
    /// with): tokio (the default), uring (one thread, one io_uring, every call; needs a build
    /// with `--features io-uring`, Linux, and no --model-tls).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "tokio",
        requires = "baseline"
    )]
    floor_driver: Vec<voxrelay::bench::baseline::FloorDriver>,
    /// Raise the call count until p99 added latency passes --budget-ms or frames go late.
    #[arg(long)]
    ramp: bool,
    #[arg(long, default_value_t = 50)]
    ramp_step: usize,
    #[arg(long, default_value_t = 2000)]
    ramp_max: usize,
    /// Soak: repeat batches of --calls calls of --seconds each until this many minutes have
    /// passed, sampling the bridge's RSS and open file descriptors in and after every batch.
    #[arg(long, conflicts_with_all = ["ramp", "baseline"])]
    soak_minutes: Option<f64>,
    /// Latency budget for --ramp, in ms (p99 of each direction).
    #[arg(long, default_value_t = 2.0)]
    budget_ms: f64,
    /// Pin the bridge to CPU 0 and the load to CPU 1.
    #[arg(long)]
    pin: bool,
    /// The model leg over TLS: the echo model serves wss:// with a certificate from a CA made
    /// for the run, which the bridge (and the baseline relay) are told to trust.
    #[arg(long, conflicts_with = "target")]
    model_tls: bool,
    /// Spread call starts over this many seconds.
    #[arg(long, default_value_t = 1.0)]
    ramp_up_seconds: f64,
    /// Send each frame up to this many ms after its slot (network-like jitter).
    #[arg(long, default_value_t = 0.0)]
    jitter_ms: f64,
    /// The echo model's think time, in ms.
    #[arg(long, default_value_t = 200.0)]
    model_delay_ms: f64,
    /// Seconds between the echo model's barge-ins (0: never).
    #[arg(long, default_value_t = 4.0)]
    barge_in_every_s: f64,
    /// A frame later than this (ms) counts as late.
    #[arg(long, default_value_t = 40.0)]
    late_ms: f64,
    /// Drop this share of the echo model's sessions (0–1) at a random moment each, to measure
    /// how calls survive: reconnect gaps, the gap each caller heard, calls lost.
    #[arg(long, value_parser = parse_fraction)]
    model_faults: Option<f64>,
    /// Record every call of the bridge under test (VOXRELAY_RECORD=1) into a temporary
    /// directory, removed after the run (its size is printed): the recorder's cost per call
    /// and the capacity held with recording on. Needs a build with `--features opus`.
    #[arg(long, conflicts_with = "target")]
    record: bool,
    /// Where the echo model listens.
    #[arg(long, default_value = "127.0.0.1:0")]
    model_listen: SocketAddr,
    /// Write every figure as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write an HTML report (latency CDF and latency-vs-calls plots) into this directory.
    #[arg(long)]
    report: Option<PathBuf>,
    /// No progress line (calls up and latency percentiles so far, once a second).
    #[arg(long)]
    quiet: bool,
    /// Instead of the load run: time from `start` to the first greeting audio, with the model
    /// session pre-warmed on the webhook and cold (uses --calls, default 20 here, and --json).
    #[arg(long, conflicts_with_all = ["target", "ramp", "baseline"])]
    first_audio: bool,
    /// With --first-audio: the model's handshake delay (the real API's TLS + handshake).
    #[arg(long, default_value_t = 300.0)]
    model_connect_ms: f64,
    /// With --first-audio: Twilio's time from the webhook's answer to the stream's handshake.
    #[arg(long, default_value_t = 200.0)]
    twilio_gap_ms: f64,
}

#[derive(Args)]
struct HealthcheckArgs {
    #[arg(long, default_value = "http://127.0.0.1:8080/healthz")]
    url: Url,
}

#[cfg(feature = "sim")]
#[derive(Args)]
struct CallArgs {
    /// The bridge's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    to: Url,
    /// The public origin the bridge checks signatures against, if it differs from --to.
    #[arg(long, env = "VOXRELAY_PUBLIC_URL")]
    public_url: Option<Url>,
    /// The bridge's admin listener, where its /metrics are (its VOXRELAY_ADMIN_LISTEN).
    #[arg(long, default_value = "http://127.0.0.1:9091")]
    admin_url: Url,
    /// The bridge's Twilio auth token (to sign like Twilio).
    #[arg(long, env = "TWILIO_AUTH_TOKEN", hide_env_values = true)]
    twilio_auth_token: String,
    /// The AccountSid the call claims to come from (a bridge with VOXRELAY_TWILIO_ACCOUNT_SID
    /// refuses any other).
    #[arg(long, env = "VOXRELAY_TWILIO_ACCOUNT_SID")]
    account_sid: Option<String>,
    /// Caller audio: raw μ-law 8 kHz mono. Defaults to the built-in speech fixture.
    #[arg(long)]
    audio: Option<PathBuf>,
    /// The dialled number (Twilio's `To`).
    #[arg(long, default_value = "+15005550006")]
    number: String,
    /// The caller's number (Twilio's `From`).
    #[arg(long, default_value = "+15551230000")]
    from: String,
    /// Seconds to keep listening after the caller's audio ends.
    #[arg(long, default_value_t = 5.0)]
    linger_seconds: f64,
}

#[cfg(feature = "sim")]
#[derive(Args)]
struct DemoArgs {
    /// Number of simulated calls.
    #[arg(long, default_value_t = 3)]
    calls: usize,
    /// pcmu or pcm16.
    #[arg(long, default_value = "pcmu")]
    audio_mode: AudioMode,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_target(false)
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(args).await,
        #[cfg(feature = "sim")]
        Command::Call(args) => call(args).await,
        #[cfg(feature = "sim")]
        Command::Demo(args) => demo(args).await,
        Command::Healthcheck(args) => healthcheck(args).await,
        #[cfg(feature = "sim")]
        Command::BaselineRelay(args) => baseline_relay(args).await,
        #[cfg(feature = "sim")]
        Command::Bench(args) => bench(args).await,
        #[cfg(feature = "control-plane")]
        Command::ControlPlane(args) => control_plane(args).await,
    }
}

/// The environment variable holding the control plane's signing keys.
#[cfg(feature = "control-plane")]
const CONTROL_PLANE_KEYS_ENV: &str = "VOXRELAY_CONTROL_PLANE_KEYS";

#[cfg(feature = "control-plane")]
async fn control_plane(args: ControlPlaneArgs) -> anyhow::Result<()> {
    // Keys only from the environment: a command-line flag would show them in `ps`.
    let keys = match std::env::var(CONTROL_PLANE_KEYS_ENV) {
        Ok(keys) => keys,
        Err(std::env::VarError::NotPresent) => {
            bail!(
                "{CONTROL_PLANE_KEYS_ENV} is not set: expected `key_id:secret[:scope][,key_id:secret[:scope]]`"
            )
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            bail!("{CONTROL_PLANE_KEYS_ENV} is not valid UTF-8")
        }
    };
    // The error names entries by position only, never their content.
    let verifier = Verifier::from_key_list(&keys)
        .with_context(|| format!("{CONTROL_PLANE_KEYS_ENV} is malformed"))?;
    // Ids and scopes only, never secrets.
    let key_ids = verifier
        .key_ids()
        .iter()
        .map(|id| {
            format!(
                "{id}:{}",
                verifier.scope_of(id).map_or("?", |scope| scope.as_str())
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    // The files the seed names are read relative to its directory, when the seed is parsed.
    let seed = match &args.seed {
        Some(path) => Some(
            SeedSource::read(path)
                .with_context(|| format!("reading the seed file {}", path.display()))?,
        ),
        None => None,
    };
    let running = ControlPlane::start(ControlPlaneConfig {
        listen: args.listen,
        db: DbLocation::File(args.db.clone()),
        seed,
        verifier,
    })
    .await
    .context("starting the control plane")?;
    tracing::info!(
        listen = %running.local_addr(),
        db = %args.db.display(),
        key_ids,
        "control plane ready"
    );
    shutdown_signal().await;
    running.stop().await;
    Ok(())
}

async fn serve(raw: RawConfig) -> anyhow::Result<()> {
    let config = match BridgeConfig::from_raw(raw) {
        Ok(config) => config,
        Err(error) => {
            // One line whatever RUST_BACKTRACE says: the operator needs the reason, not a trace.
            eprintln!("Error: {error}");
            std::process::exit(2);
        }
    };
    if let Some(ca) = &config.model_ca {
        voxrelay::upstream::connect::trust_model_ca(ca)
            .context("adding VOXRELAY_MODEL_CA_FILE to the model connection's roots")?;
        tracing::info!(file = ?ca.path(), certificates = ca.len(), "model connection trusts an extra CA");
    }
    #[cfg(feature = "sim")]
    let (config, mock) = start_mock_model(config).await?;
    #[cfg(not(feature = "sim"))]
    if config.mock_model {
        // A configuration error like any other: one line, exit 2.
        eprintln!(
            "Error: --mock-model (VOXRELAY_MOCK_MODEL=1) needs the built-in mock model, which this build leaves out (built without the `sim` feature)"
        );
        std::process::exit(2);
    }
    let bridge = Bridge::start(&config).await.with_context(|| {
        format!(
            "listening on {} (public) and {} (admin)",
            config.listen, config.admin_listen
        )
    })?;
    tracing::info!(
        listen = %bridge.local_addr(),
        admin = %bridge.admin_addr(),
        max_calls = config.limits.max_calls,
        mode = %config.agent.audio_mode,
        "voxrelay bridge ready"
    );
    shutdown_signal().await;
    let outcome = bridge.drain_and_stop(config.drain).await;
    tracing::info!(?outcome, "stopped");
    #[cfg(feature = "sim")]
    if let Some(mock) = mock {
        mock.shutdown();
    }
    Ok(())
}

/// `--mock-model`: starts the built-in mock model and points the bridge at it.
#[cfg(feature = "sim")]
async fn start_mock_model(
    mut config: BridgeConfig,
) -> anyhow::Result<(BridgeConfig, Option<MockRealtimeServer>)> {
    if !config.mock_model {
        return Ok((config, None));
    }
    let server = MockRealtimeServer::start(MockConfig::default())
        .await
        .context("starting the built-in mock model")?;
    tracing::warn!(mock = %server.url(), "--mock-model: calls go to the built-in mock realtime model, not OpenAI");
    use voxrelay::config::UpstreamTarget;
    // Both providers' sessions go to the mock: it speaks each one's protocol on its own path.
    config.models.openai = Some(UpstreamTarget {
        url: server.url(),
        api_key: Some(Secret::new("voxrelay-mock")),
    });
    config.models.gemini = Some(UpstreamTarget {
        url: server.gemini_url(),
        api_key: Some(Secret::new("voxrelay-mock")),
    });
    Ok((config, Some(server)))
}

#[cfg(feature = "sim")]
async fn call(args: CallArgs) -> anyhow::Result<()> {
    let audio = match &args.audio {
        Some(path) => std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        None => SPEECH_FIXTURE.to_vec(),
    };
    if audio.is_empty() {
        bail!("the caller audio is empty");
    }
    let mut caller = CallerConfig::new(args.to.clone(), Secret::new(args.twilio_auth_token), audio);
    caller.public_url = args.public_url;
    if let Some(account_sid) = args.account_sid {
        caller.account_sid = account_sid;
    }
    caller.to = args.number;
    caller.from = args.from;
    caller.linger = Duration::from_secs_f64(args.linger_seconds.max(0.0));
    let report = place_call(&caller).await?;
    println!("call {} (stream {})", report.call_sid, report.stream_sid);
    println!("  stream url      {}", report.stream_url);
    println!(
        "  caller audio    {:.2} s in {} frames",
        report.frames_sent as f64 * 0.02,
        report.frames_sent
    );
    println!(
        "  agent audio     {:.2} s received in {} media messages, {:.2} s played",
        report.audio_received_seconds(),
        report.media_received,
        report.audio_played_ms as f64 / 1e3
    );
    println!(
        "  events          {} marks ({} echoed), {} clears at {:?}",
        report.marks_received, report.marks_echoed, report.clears_received, report.clears_at
    );
    if let Some(first) = report.first_audio_after_start {
        println!(
            "  first audio     {:.0} ms after start",
            first.as_secs_f64() * 1e3
        );
    }
    println!(
        "  ended by        {}",
        if report.closed_by_bridge {
            "bridge"
        } else {
            "caller"
        }
    );
    // The bridge measures its own added latency per direction; show what it says.
    let metrics_url = args.admin_url.join("/metrics")?;
    let scrape = tokio::time::timeout(
        Duration::from_secs(2),
        http_client::send("GET", &metrics_url, &[], Vec::new()),
    );
    match scrape.await {
        Ok(Ok(response)) if response.status == 200 => {
            for family in [
                "voxrelay_uplink_added_seconds",
                "voxrelay_downlink_added_seconds",
            ] {
                if let Some(summary) = summarize_histogram(&response.body, family) {
                    println!("  {family}: {summary}");
                }
            }
        }
        _ => println!("  (bridge metrics unavailable at {metrics_url})"),
    }
    Ok(())
}

/// Mean and count of one Prometheus histogram in exposition text.
#[cfg(feature = "sim")]
fn summarize_histogram(text: &str, family: &str) -> Option<String> {
    let value = |suffix: &str| -> Option<f64> {
        let prefix = format!("{family}_{suffix} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
    };
    let (sum, count) = (value("sum")?, value("count")?);
    (count > 0.0).then(|| {
        format!(
            "mean {:.0} µs over {count} messages (all calls on this bridge)",
            sum / count * 1e6
        )
    })
}

#[cfg(feature = "sim")]
async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let options = DemoOptions {
        calls: args.calls.clamp(1, 200),
        audio_mode: args.audio_mode,
    };
    let report = run_demo(&options, &InProcessLauncher).await?;
    println!("{}", report.text);
    let failed = report.calls.iter().filter(|c| c.is_err()).count();
    if failed > 0 {
        bail!("{failed} of {} demo calls failed", report.calls.len());
    }
    Ok(())
}

async fn healthcheck(args: HealthcheckArgs) -> anyhow::Result<()> {
    let status = tokio::time::timeout(Duration::from_secs(2), get_status(&args.url))
        .await
        .context("health check timed out")??;
    if status != 200 {
        bail!("{} answered {status}", args.url);
    }
    Ok(())
}

/// `GET url` on a fresh plain-HTTP connection; the status code. The production image has no
/// simulator (whose HTTP client the other commands use), so the health check has its own.
async fn get_status(url: &Url) -> anyhow::Result<u16> {
    use http_body_util::Empty;
    use hyper_util::rt::TokioIo;
    let host = url.host_str().context("the URL has no host")?;
    let port = url.port_or_known_default().context("the URL has no port")?;
    let stream = tokio::net::TcpStream::connect((host, port)).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::get(url.path())
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .body(Empty::<bytes::Bytes>::new())?;
    Ok(sender.send_request(request).await?.status().as_u16())
}

/// Runs the baseline relay until SIGTERM/SIGINT on a current-thread runtime of its own thread,
/// as the floor it measures is "one core, no cross-thread hops"; `main`'s runtime only waits.
/// The io_uring driver runs its calls on a thread of its own; this runtime then only waits.
#[cfg(feature = "sim")]
async fn baseline_relay(args: BaselineRelayArgs) -> anyhow::Result<()> {
    if args.driver == voxrelay::bench::baseline::FloorDriver::Uring && args.model_ca_file.is_some()
    {
        bail!(
            "--driver uring speaks plain ws:// to the model; --model-ca-file needs --driver tokio"
        );
    }
    let relay_thread = std::thread::Builder::new()
        .name("baseline-relay".to_owned())
        .spawn(move || -> anyhow::Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building the baseline relay's runtime")?;
            runtime.block_on(async {
                if let Some(path) = &args.model_ca_file {
                    let ca = voxrelay::upstream::connect::ModelCa::from_pem_file(path)?;
                    voxrelay_sim::dial::trust_extra_roots(ca.certificates())?;
                }
                let relay =
                    FloorRelay::start(args.driver, args.listen, args.upstream_url, args.fault)
                        .await
                        .with_context(|| format!("starting the floor on {}", args.listen))?;
                // The first line on stdout (log lines follow it there), so a harness that
                // passed port 0 learns the port.
                println!("{}", relay.local_addr());
                tracing::info!(listen = %relay.local_addr(), "baseline relay ready");
                shutdown_signal().await;
                relay.shutdown();
                // Dropping the runtime would cut live calls without close frames.
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while relay.live_calls() > 0 {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
                .await;
                Ok(())
            })
        })
        .context("starting the baseline relay thread")?;
    match tokio::task::spawn_blocking(move || relay_thread.join()).await? {
        Ok(outcome) => outcome,
        Err(_panic) => bail!("the baseline relay thread panicked"),
    }
}

#[cfg(feature = "sim")]
async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if args.first_audio && args.provider != [Provider::OpenAi] {
        bail!("--first-audio measures the OpenAI greeting path; it takes no other --provider");
    }
    if args.first_audio {
        return bench_first_audio(&args).await;
    }
    let bridge =
        match (&args.target, args.in_process) {
            (Some(url), _) => BridgeUnderTest::Target {
                url: url.clone(),
                public_url: args.public_url.clone().unwrap_or_else(|| url.clone()),
                auth_token: Secret::new(args.twilio_auth_token.clone().context(
                    "--target needs the bridge's TWILIO_AUTH_TOKEN to sign like Twilio",
                )?),
            },
            (None, true) => BridgeUnderTest::InProcess,
            (None, false) => BridgeUnderTest::Child,
        };
    if args.baseline && args.target.is_some() {
        bail!("--baseline starts its own relay; it cannot be combined with --target");
    }
    if args.provider.len() > 1 && args.target.is_some() {
        bail!("--target is one bridge on one provider; name one --provider");
    }
    if args.provider.len() > 1 && args.soak_minutes.is_some() {
        bail!("--soak-minutes keeps one bridge on one provider; name one --provider");
    }
    if args.model_tls
        && args
            .floor_driver
            .contains(&voxrelay::bench::baseline::FloorDriver::Uring)
    {
        bail!(
            "--floor-driver uring speaks plain ws:// to the model; --model-tls needs the tokio floor"
        );
    }
    if args.record && !voxrelay::recording::AVAILABLE {
        bail!(
            "--record needs a build that records calls: cargo run --release --features opus -- bench --record"
        );
    }
    // Removed after the run; its size is reported.
    let record_dir = args.record.then(|| {
        std::env::temp_dir().join(format!(
            "voxrelay-bench-recordings-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ))
    });
    let options = BenchOptions {
        record_dir: record_dir.clone(),
        calls: args.calls.max(1),
        seconds: args.seconds.max(1.0),
        audio_mode: args.audio_mode,
        providers: args.provider.clone(),
        bridge,
        // Interleaved with the bridge at every step of the same run.
        floor: args.baseline,
        floor_only: false,
        floor_fault: None,
        floor_drivers: args.floor_driver.clone(),
        ramp_up: Duration::from_secs_f64(args.ramp_up_seconds.max(0.0)),
        jitter: Duration::from_secs_f64(args.jitter_ms.max(0.0) / 1e3),
        model_delay: Duration::from_secs_f64(args.model_delay_ms.max(0.0) / 1e3),
        barge_in_every: (args.barge_in_every_s > 0.0)
            .then(|| Duration::from_secs_f64(args.barge_in_every_s)),
        late_threshold: Duration::from_secs_f64(args.late_ms.max(0.0) / 1e3),
        pin: args.pin,
        model_listen: args.model_listen,
        model_tls: args.model_tls,
        progress: !args.quiet,
        model_faults: args.model_faults,
    };
    let budget = Duration::from_secs_f64(args.budget_ms.max(0.0) / 1e3);
    let launcher = InProcessLauncher;
    let result = if let Some(minutes) = args.soak_minutes {
        harness::run_soak(&options, &launcher, minutes).await
    } else if args.ramp {
        harness::run_ramp(
            &options,
            &launcher,
            args.ramp_step.max(1),
            args.ramp_max,
            budget,
        )
        .await
    } else {
        harness::run(&options, &launcher).await
    };
    if let Some(dir) = &record_dir {
        let (files, bytes) = std::fs::read_dir(dir).map_or((0, 0), |entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| entry.metadata().ok())
                .fold((0u64, 0u64), |(n, total), meta| (n + 1, total + meta.len()))
        });
        println!(
            "recordings: {files} files, {bytes} bytes ({:.1} KiB per file), written to {} and removed",
            bytes as f64 / 1024.0 / files.max(1) as f64,
            dir.display()
        );
        let _ = std::fs::remove_dir_all(dir);
    }
    let result = result?;
    println!("{}", harness::summary(&result));
    for other in &result.other_providers {
        println!("{}", harness::summary(other));
        println!(
            "{}",
            harness::comparison_of(
                &format!("bridge ({})", other.audio_mode),
                other,
                &format!("bridge ({})", result.audio_mode),
                &result
            )
        );
    }
    if let Some(floor) = &result.floor {
        println!("{}", harness::summary(floor));
        println!("{}", harness::comparison(&result, floor));
        for other in &result.other_floors {
            let name = |run: &voxrelay_sim::results::BenchResult| {
                format!("{} floor", run.floor_driver.as_deref().unwrap_or("tokio"))
            };
            println!("{}", harness::summary(other));
            println!(
                "{}",
                harness::comparison_of(&name(other), other, &name(floor), floor)
            );
        }
    }
    if let Some(path) = &args.json {
        harness::write_json(path, &result)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if let Some(dir) = &args.report {
        let mut runs = vec![result.clone()];
        runs.extend(result.other_providers.iter().cloned());
        runs.extend(result.floor.as_deref().cloned());
        runs.extend(result.other_floors.iter().cloned());
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        let page = voxrelay_sim::report::write_report_with_command(dir, &runs, &command)
            .with_context(|| format!("writing the report into {}", dir.display()))?;
        println!("wrote {}", page.display());
    }
    if result.errors > 0 {
        bail!("{} errors during the run", result.errors);
    }
    Ok(())
}

#[cfg(feature = "sim")]
async fn bench_first_audio(args: &BenchArgs) -> anyhow::Result<()> {
    use voxrelay_sim::first_audio::{FirstAudioOptions, run};
    let options = FirstAudioOptions {
        calls: args.calls.max(1),
        model_connect: Duration::from_secs_f64(args.model_connect_ms.max(0.0) / 1e3),
        twilio_gap: Duration::from_secs_f64(args.twilio_gap_ms.max(0.0) / 1e3),
        audio_mode: args.audio_mode,
    };
    let result = run(&options, &InProcessLauncher).await?;
    let ms = |us: f64| us / 1e3;
    println!(
        "start → first assistant audio, {} calls each, model handshake {:.0} ms, Twilio gap {:.0} ms",
        result.calls, result.model_connect_ms, result.twilio_gap_ms
    );
    println!(
        "{:<26} {:>9} {:>9} {:>9} {:>9}",
        "", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    for (name, p) in [
        ("pre-warm", &result.prewarm_us),
        ("cold", &result.cold_us),
        ("pre-warm + control plane", &result.prewarm_control_plane_us),
        ("cold + control plane", &result.cold_control_plane_us),
    ] {
        println!(
            "{name:<26} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            ms(p.p50),
            ms(p.p90),
            ms(p.p99),
            ms(p.max)
        );
    }
    println!("tenant lookup itself (TenantDirectory::resolve, control plane on loopback):");
    for (name, p) in [
        ("cache miss (signed request)", &result.lookup_miss_us),
        ("cache hit", &result.lookup_hit_us),
    ] {
        println!(
            "{name:<28} p50 {:>7.0} µs  p90 {:>7.0} µs  p99 {:>7.0} µs  max {:>7.0} µs  (n={})",
            p.p50, p.p90, p.p99, p.max, p.count
        );
    }
    if result.no_audio > 0 {
        println!("calls that heard no greeting: {}", result.no_audio);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if result.no_audio > 0 {
        bail!("{} calls heard no greeting", result.no_audio);
    }
    Ok(())
}

/// A share between 0 and 1.
#[cfg(feature = "sim")]
fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if (0.0..=1.0).contains(&value) => Ok(value),
        _ => Err(format!("{text:?} is not a share between 0 and 1")),
    }
}
