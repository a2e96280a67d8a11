//! Call reports: handed over when a call ends, delivered with retry and backoff, spooled to disk
//! when the control plane cannot take them, and resent from the spool, so no report is lost to
//! a control-plane outage, a restart or an unwritable disk without being counted and logged.
//!
//! [`ReportSender`] owns the delivery tasks, the spool directory and the resend loop.
//!
//! - **Hand-over.** A call that reaches `start` takes a [`ReportHandover`]
//!   ([`ReportSender::expect_report`]) and hands its report over through it as soon as the call
//!   loop ends, before waiting on any socket. The drain waits until every handover is done
//!   ([`ReportSender::wait_for_handovers`]), so a shutdown never exits between a call ending and
//!   its report being in the sender's hands.
//! - **Delivery.** [`ReportSender::submit`] never blocks or fails: it hands the report to a task
//!   on the sender's [`TaskTracker`]. The task POSTs it; on a transient failure (transport,
//!   timeout, 5xx, 401, 408, 429) it retries after [`backoff_delay`] (250 ms doubling, capped at
//!   5 s, plus up to 25 % random jitter), each attempt signed afresh, until the retry window
//!   (default 60 s) would be passed; then it writes the report to the spool. A permanent refusal
//!   (any other 4xx) goes to `rejected/` at once: retrying cannot help.
//! - **Spool.** One JSON file per report (the exact bytes that were POSTed), named
//!   `<unix ms, 13 digits>-<call_sid sanitised to [A-Za-z0-9_-], at most 64>-<8 hex random>.json`
//!   so names sort oldest first and cannot leave the directory. Written atomically: a hidden
//!   `.…tmp` file in the same directory, fsynced, then renamed; a reader never sees half a
//!   report. Hidden temp files left by a crash are removed after an hour. Reports are personal
//!   data: the directory (and `rejected/`) is created `0700` (an existing one is tightened to
//!   it), files `0600`.
//! - **Size.** The spool's files and bytes (waiting, and in `rejected/`) are gauges, kept by
//!   every write and delete and recounted on every resend pass. Above
//!   [`DEFAULT_SPOOL_WARN_BYTES`] each pass logs a warning. At [`DEFAULT_SPOOL_MAX_BYTES`] the
//!   spool refuses new files (`voxrelay_control_report_spool_full_total`, an `error` line): the
//!   report is then held in memory like one the disk refused (below). Nothing is ever deleted
//!   to make room.
//! - **Held in memory.** When the spool cannot take a report (unwritable directory, full disk,
//!   the cap), the report stays in memory (`voxrelay_control_reports_held`) and is retried every
//!   resend interval: delivered if the control plane is back, else written if the spool is.
//!   Held reports are bounded by [`DEFAULT_MAX_HELD_BYTES`]; a report that finds it full, and a
//!   report still held when shutdown's grace is over, is lost: counted in
//!   `voxrelay_control_reports_lost_total` and logged as an `error` with its call SID.
//! - **Resend.** [`ReportSender::resend_spool`] POSTs each spooled file, oldest first: 2xx
//!   deletes it, a permanent refusal (or a file that is not a report) moves it to `rejected/`
//!   (logged, never retried), and the first transient failure ends the pass (the control plane
//!   is still down; the files wait for the next pass). [`ReportSender::spawn_resend_loop`] runs
//!   a pass at once (the previous process's spool) and then every resend interval (default
//!   30 s). Only one pass runs at a time.
//! - **Shutdown.** [`ReportSender::shutdown`] stops the resend loop and lets deliveries go on
//!   for the grace; those still pending then are spooled (one last try for held ones). A
//!   report submitted after shutdown is spooled at once.
//! - **Failures are loud, never panics.** Every spool failure is an `error` log line naming the
//!   call SID and a count in `voxrelay_control_report_spool_errors_total`. Report bodies are
//!   never logged.
//!
//! A report can reach the control plane more than once (an answer lost after the control plane
//! stored it, a pass cut by shutdown); the control plane acknowledges an identical report again
//! (see `docs/control-plane-api.md`).
//!
//! Memory: each undelivered report is held by its task for at most the retry window (one task
//! per ended call, so bounded by the call rate times the window), and beyond it only while the
//! spool cannot take it, within [`DEFAULT_MAX_HELD_BYTES`]. A report is at most
//! `session::report::MAX_REPORT_BYTES`.
//!
//! Metrics: `voxrelay_control_reports_delivered_total`, `…_report_retries_total`,
//! `…_reports_spooled_total`, `…_reports_resent_total`, `…_reports_rejected_total`,
//! `…_report_spool_errors_total`, `…_report_spool_full_total`, `…_reports_lost_total`, and the
//! gauges `…_report_spool_files{dir}`, `…_report_spool_bytes{dir}`, `…_reports_held` (all
//! `voxrelay_control_…`).

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{TaskTracker, task_tracker::TaskTrackerToken};

use crate::control::api::CallReport;
use crate::control::client::ControlPlaneClient;
use crate::session::metrics::Metrics;

/// Default time a report is retried before it is spooled.
pub const DEFAULT_RETRY_WINDOW: Duration = Duration::from_secs(60);
/// Default delay before the first retry; it doubles on each retry.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(250);
/// Default cap of the doubling delay (jitter comes on top).
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Default time between two resend passes over the spool.
pub const DEFAULT_RESEND_INTERVAL: Duration = Duration::from_secs(30);
/// Above this many bytes in the spool (waiting and rejected), every resend pass logs a
/// warning: the control plane has been away long, or refuses reports. ~10 000 typical reports.
pub const DEFAULT_SPOOL_WARN_BYTES: u64 = 64 << 20;
/// The spool takes no file that would bring it past this; see the module docs.
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 1 << 30;
/// Reports held in memory because the spool refused them, in bytes at most.
pub const DEFAULT_MAX_HELD_BYTES: u64 = 64 << 20;
/// Subdirectory of the spool for reports the control plane refused for good.
pub const REJECTED_DIR: &str = "rejected";

/// Age after which a hidden temp file is taken for a crash's leftover and removed.
const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);
/// Longest sanitised call SID in a spool file name.
const MAX_SID_IN_NAME: usize = 64;
/// The spool directory's mode: the reports are personal data.
#[cfg(unix)]
const SPOOL_DIR_MODE: u32 = 0o700;
/// A spooled report's mode.
#[cfg(unix)]
const SPOOL_FILE_MODE: u32 = 0o600;

/// Where reports are spooled and how they are retried. [`ReportSettings::new`] has the
/// documented defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportSettings {
    pub spool_dir: PathBuf,
    /// Default [`DEFAULT_RETRY_WINDOW`].
    pub retry_window: Duration,
    /// Default [`DEFAULT_INITIAL_BACKOFF`].
    pub initial_backoff: Duration,
    /// Default [`DEFAULT_MAX_BACKOFF`].
    pub max_backoff: Duration,
    /// Default [`DEFAULT_RESEND_INTERVAL`].
    pub resend_interval: Duration,
    /// Default [`DEFAULT_SPOOL_WARN_BYTES`].
    pub spool_warn_bytes: u64,
    /// Default [`DEFAULT_SPOOL_MAX_BYTES`].
    pub spool_max_bytes: u64,
    /// Default [`DEFAULT_MAX_HELD_BYTES`].
    pub max_held_bytes: u64,
}

impl ReportSettings {
    pub fn new(spool_dir: impl Into<PathBuf>) -> Self {
        Self {
            spool_dir: spool_dir.into(),
            retry_window: DEFAULT_RETRY_WINDOW,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            resend_interval: DEFAULT_RESEND_INTERVAL,
            spool_warn_bytes: DEFAULT_SPOOL_WARN_BYTES,
            spool_max_bytes: DEFAULT_SPOOL_MAX_BYTES,
            max_held_bytes: DEFAULT_MAX_HELD_BYTES,
        }
    }
}

/// The delay before retry number `retry` (1 for the first): `initial · 2^(retry-1)`, capped at
/// `max`, plus `jitter` (in `0..=1`, clamped) times a quarter of that.
pub fn backoff_delay(initial: Duration, max: Duration, retry: u32, jitter: f64) -> Duration {
    let doublings = retry.saturating_sub(1).min(31);
    let base = initial.saturating_mul(1 << doublings).min(max);
    base + base.mul_f64(0.25 * jitter.clamp(0.0, 1.0))
}

/// The spool file name of a report (see the module docs).
pub fn spool_file_name(call_sid: &str, unix_ms: u64, random: u32) -> String {
    let mut sid: String = call_sid
        .chars()
        .take(MAX_SID_IN_NAME)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if sid.is_empty() {
        sid.push_str("unknown");
    }
    format!("{unix_ms:013}-{sid}-{random:08x}.json")
}

/// What one resend pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpoolPass {
    /// Delivered and deleted.
    pub resent: usize,
    /// Moved to `rejected/`.
    pub rejected: usize,
    /// Left in the spool because the control plane is still unavailable.
    pub remaining: usize,
    /// Files that could not be read, deleted or moved (logged and counted).
    pub errors: usize,
}

/// Delivers call reports (see the module docs). Cheap to clone; clones share the tasks and
/// the spool.
#[derive(Clone)]
pub struct ReportSender {
    inner: Arc<SenderInner>,
}

struct SenderInner {
    client: ControlPlaneClient,
    settings: ReportSettings,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
    /// One token per call that will hand a report over ([`ReportHandover`]).
    handovers: TaskTracker,
    /// Shutdown has begun: the resend loop stops.
    stopping: CancellationToken,
    /// The shutdown grace is over: pending deliveries go to the spool now.
    spool_now: CancellationToken,
    /// Held by the resend pass in progress.
    resending: tokio::sync::Mutex<()>,
    /// Bytes of the reports held in memory.
    held_bytes: AtomicU64,
    /// Bytes of spool writes under way, counted against the cap before they land.
    spool_reserved: AtomicU64,
    /// The spool is above its warning size (warned once per crossing, then once per pass).
    over_warning: AtomicBool,
}

impl std::fmt::Debug for ReportSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReportSender")
            .field("settings", &self.inner.settings)
            .field("tasks", &self.inner.tracker.len())
            .field("handovers", &self.inner.handovers.len())
            .finish()
    }
}

/// A call's undertaking to hand its report over (see the module docs); the drain waits for
/// every one. Dropped without [`ReportHandover::submit`] (a call task that panicked), the
/// report is lost, and that is logged and counted.
pub struct ReportHandover {
    sender: ReportSender,
    submitted: bool,
    _pending: TaskTrackerToken,
}

impl ReportHandover {
    /// Hands the report over for delivery; returns at once.
    pub fn submit(mut self, report: CallReport) {
        self.submitted = true;
        self.sender.submit(report);
    }
}

impl Drop for ReportHandover {
    fn drop(&mut self) {
        if !self.submitted {
            self.sender
                .inner
                .metrics
                .control_reports_lost
                .fetch_add(1, Relaxed);
            tracing::error!("a call ended without handing its report over: the report is lost");
        }
    }
}

impl ReportSender {
    /// A sender spooling to `settings.spool_dir`. Creates the directory (`0700`; an existing
    /// one is tightened to it) and checks it can be written now, so a bad spool shows up at
    /// start: an error is logged and counted, not returned (reports can still be delivered
    /// while the control plane is up, and are held in memory while it is not). Counts what
    /// an earlier run left in the spool.
    pub fn new(
        client: ControlPlaneClient,
        settings: ReportSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        match prepare_spool_dir(&settings.spool_dir) {
            Ok(tightened) => {
                if tightened {
                    tracing::warn!(
                        dir = %settings.spool_dir.display(),
                        "the call report spool directory was readable by others: set to 0700"
                    );
                }
            }
            Err(error) => {
                metrics.control_report_spool_errors.fetch_add(1, Relaxed);
                tracing::error!(
                    dir = %settings.spool_dir.display(),
                    %error,
                    "the call report spool directory is not writable: reports the control \
                     plane cannot take will be held in memory until it is"
                );
            }
        }
        let sender = Self {
            inner: Arc::new(SenderInner {
                client,
                settings,
                metrics,
                tracker: TaskTracker::new(),
                handovers: TaskTracker::new(),
                stopping: CancellationToken::new(),
                spool_now: CancellationToken::new(),
                resending: tokio::sync::Mutex::new(()),
                held_bytes: AtomicU64::new(0),
                spool_reserved: AtomicU64::new(0),
                over_warning: AtomicBool::new(false),
            }),
        };
        if let Ok(usage) = spool_usage(&sender.inner.settings.spool_dir) {
            sender.inner.record_usage(usage);
        }
        sender
    }

    pub fn settings(&self) -> &ReportSettings {
        &self.inner.settings
    }

    /// Hands a report over for delivery and returns at once. Must run inside a tokio runtime.
    pub fn submit(&self, report: CallReport) {
        let inner = self.inner.clone();
        self.inner.tracker.spawn(inner.deliver(report));
    }

    /// Registers a call that will hand a report over; see [`ReportHandover`].
    pub fn expect_report(&self) -> ReportHandover {
        ReportHandover {
            sender: self.clone(),
            submitted: false,
            _pending: self.inner.handovers.token(),
        }
    }

    /// Waits up to `limit` until every call that took a [`ReportHandover`] has handed its
    /// report over (or dropped it); `false` if some had not by then.
    pub async fn wait_for_handovers(&self, limit: Duration) -> bool {
        self.inner.handovers.close();
        let done = tokio::time::timeout(limit, self.inner.handovers.wait())
            .await
            .is_ok();
        if !done {
            tracing::error!(
                pending = self.inner.handovers.len(),
                ?limit,
                "calls still had not handed their reports over"
            );
        }
        done
    }

    /// One pass over the spool, oldest first (see the module docs). Returns at once with an
    /// empty pass if another pass is running.
    pub async fn resend_spool(&self) -> SpoolPass {
        let Ok(_only_pass) = self.inner.resending.try_lock() else {
            return SpoolPass::default();
        };
        self.inner.resend_pass().await
    }

    /// Runs a resend pass now and then every resend interval, until [`ReportSender::shutdown`].
    pub fn spawn_resend_loop(&self) {
        let sender = self.clone();
        let stopping = self.inner.stopping.clone();
        let interval = self.inner.settings.resend_interval;
        self.inner.tracker.spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    () = stopping.cancelled() => return,
                    _ = sender.resend_spool() => {}
                }
                tokio::select! {
                    biased;
                    () = stopping.cancelled() => return,
                    () = tokio::time::sleep(interval) => {}
                }
            }
        });
    }

    /// Stops the resend loop, lets pending deliveries go on for up to `grace`, then spools
    /// whatever is still pending and waits for those writes. Nothing is dropped silently: a
    /// report that cannot be written even then is counted as lost and logged.
    pub async fn shutdown(&self, grace: Duration) {
        let inner = &self.inner;
        inner.stopping.cancel();
        inner.tracker.close();
        if tokio::time::timeout(grace, inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::info!(
                pending = inner.tracker.len(),
                ?grace,
                "call reports still undelivered at shutdown: spooling them"
            );
        }
        // From here on every delivery, pending or submitted later, goes straight to the spool.
        inner.spool_now.cancel();
        inner.tracker.wait().await;
    }
}

/// Where a report that was not delivered is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Destination {
    /// The spool: resent later.
    Spool,
    /// `rejected/`: refused for good, kept for the operator.
    Rejected,
}

/// How the first delivery attempts ended.
enum Delivery {
    Delivered,
    /// A permanent refusal.
    Refused,
    /// The retry window passed, or shutdown's grace did.
    Undelivered,
}

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
enum KeepError {
    #[error("the spool is at its size cap ({max} bytes)")]
    Full { max: u64 },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Spool contents: `(files, bytes)` waiting, and in `rejected/`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SpoolUsage {
    pending: (u64, u64),
    rejected: (u64, u64),
}

/// A report's share of the held-in-memory budget, given back on drop.
struct Held<'a> {
    inner: &'a SenderInner,
    bytes: u64,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.inner.held_bytes.fetch_sub(self.bytes, Relaxed);
        self.inner
            .metrics
            .control_reports_held
            .fetch_sub(1, Relaxed);
    }
}

impl SenderInner {
    async fn deliver(self: Arc<Self>, report: CallReport) {
        let call_sid = report.call_sid.clone();
        let body = match serde_json::to_vec(&report) {
            Ok(body) => Bytes::from(body),
            Err(error) => {
                // Cannot happen for this type (no maps with non-string keys); never silent.
                self.metrics.control_reports_lost.fetch_add(1, Relaxed);
                tracing::error!(call_sid, %error, "call report could not be encoded: lost");
                return;
            }
        };
        drop(report);
        match self.deliver_within_window(&call_sid, &body).await {
            Delivery::Delivered => {}
            Delivery::Refused => self.keep(&call_sid, body, Destination::Rejected).await,
            Delivery::Undelivered => self.keep(&call_sid, body, Destination::Spool).await,
        }
    }

    async fn deliver_within_window(&self, call_sid: &str, body: &Bytes) -> Delivery {
        let deadline = Instant::now() + self.settings.retry_window;
        let mut retry = 0;
        loop {
            let attempt = tokio::select! {
                biased;
                () = self.spool_now.cancelled() => return Delivery::Undelivered,
                result = self.client.report_bytes(call_sid, body.clone()) => result,
            };
            let error = match attempt {
                Ok(()) => {
                    self.metrics.control_reports_delivered.fetch_add(1, Relaxed);
                    tracing::debug!(call_sid, retries = retry, "call report delivered");
                    return Delivery::Delivered;
                }
                Err(error) => error,
            };
            if error.is_permanent() {
                tracing::warn!(
                    call_sid,
                    %error,
                    "control plane refused the call report for good: keeping it in {REJECTED_DIR}/"
                );
                return Delivery::Refused;
            }
            retry += 1;
            let delay = backoff_delay(
                self.settings.initial_backoff,
                self.settings.max_backoff,
                retry,
                rand::random::<f64>(),
            );
            if Instant::now() + delay > deadline {
                tracing::warn!(
                    call_sid,
                    %error,
                    window = ?self.settings.retry_window,
                    "call report not delivered within its retry window: spooling it"
                );
                return Delivery::Undelivered;
            }
            tracing::debug!(call_sid, %error, ?delay, "call report delivery failed: retrying");
            self.metrics.control_report_retries.fetch_add(1, Relaxed);
            tokio::select! {
                biased;
                () = self.spool_now.cancelled() => return Delivery::Undelivered,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Writes an undelivered report to the spool (or `rejected/`). While that fails the report
    /// is held in memory and, every resend interval, offered to the control plane again (a
    /// spool-bound one) and written again; see the module docs.
    async fn keep(&self, call_sid: &str, body: Bytes, mut destination: Destination) {
        let mut held: Option<Held<'_>> = None;
        loop {
            match self.write(destination, call_sid, &body).await {
                Ok(path) => {
                    let counter = match destination {
                        Destination::Spool => &self.metrics.control_reports_spooled,
                        Destination::Rejected => &self.metrics.control_reports_rejected,
                    };
                    counter.fetch_add(1, Relaxed);
                    tracing::info!(call_sid, file = %path.display(), "call report kept on disk");
                    return;
                }
                Err(error) => {
                    let counter = match error {
                        KeepError::Full { .. } => &self.metrics.control_report_spool_full,
                        KeepError::Io(_) => &self.metrics.control_report_spool_errors,
                    };
                    counter.fetch_add(1, Relaxed);
                    tracing::error!(
                        call_sid,
                        dir = %self.settings.spool_dir.display(),
                        %error,
                        held = held.is_some(),
                        "could not write the call report to the spool"
                    );
                }
            }
            if held.is_none() {
                match self.hold(body.len() as u64) {
                    Some(share) => held = Some(share),
                    None => {
                        self.lost(call_sid, "the memory for reports the spool refused is full");
                        return;
                    }
                }
                tracing::warn!(
                    call_sid,
                    every = ?self.settings.resend_interval,
                    "call report held in memory: retrying delivery and the spool"
                );
            }
            if self.spool_now.is_cancelled() {
                self.lost(call_sid, "shutting down with the spool still refusing it");
                return;
            }
            tokio::select! {
                biased;
                () = self.spool_now.cancelled() => continue,
                () = tokio::time::sleep(self.settings.resend_interval) => {}
            }
            if destination == Destination::Spool {
                let attempt = tokio::select! {
                    biased;
                    () = self.spool_now.cancelled() => continue,
                    result = self.client.report_bytes(call_sid, body.clone()) => result,
                };
                match attempt {
                    Ok(()) => {
                        self.metrics.control_reports_delivered.fetch_add(1, Relaxed);
                        tracing::info!(call_sid, "held call report delivered");
                        return;
                    }
                    Err(error) if error.is_permanent() => {
                        tracing::warn!(call_sid, %error, "control plane refused the held call report for good");
                        destination = Destination::Rejected;
                    }
                    Err(_) => {}
                }
            }
        }
    }

    /// Reserves room for a report in memory, if the held budget has it.
    fn hold(&self, bytes: u64) -> Option<Held<'_>> {
        let max = self.settings.max_held_bytes;
        self.held_bytes
            .fetch_update(Relaxed, Relaxed, |held| {
                held.checked_add(bytes).filter(|total| *total <= max)
            })
            .ok()?;
        self.metrics.control_reports_held.fetch_add(1, Relaxed);
        Some(Held { inner: self, bytes })
    }

    fn lost(&self, call_sid: &str, why: &str) {
        self.metrics.control_reports_lost.fetch_add(1, Relaxed);
        tracing::error!(
            call_sid,
            why,
            "call report lost: neither delivered nor kept"
        );
    }

    /// Writes one report file, within the spool's size cap, and counts it in the gauges.
    async fn write(
        &self,
        destination: Destination,
        call_sid: &str,
        body: &Bytes,
    ) -> Result<PathBuf, KeepError> {
        let max = self.settings.spool_max_bytes;
        let size = body.len() as u64;
        // Reserved before writing, so writes running at once cannot pass the cap together.
        self.spool_reserved
            .fetch_update(Relaxed, Relaxed, |reserved| {
                self.spool_bytes()
                    .saturating_add(reserved)
                    .checked_add(size)
                    .filter(|total| *total <= max)
                    .map(|_| reserved + size)
            })
            .map_err(|_| KeepError::Full { max })?;
        let dir = match destination {
            Destination::Spool => self.settings.spool_dir.clone(),
            Destination::Rejected => self.settings.spool_dir.join(REJECTED_DIR),
        };
        let written = write_report(dir, call_sid, body.clone()).await;
        let path = match written {
            Ok(path) => path,
            Err(error) => {
                self.spool_reserved.fetch_sub(size, Relaxed);
                return Err(error.into());
            }
        };
        let (files, bytes) = match destination {
            Destination::Spool => (
                &self.metrics.control_report_spool_files,
                &self.metrics.control_report_spool_bytes,
            ),
            Destination::Rejected => (
                &self.metrics.control_report_rejected_files,
                &self.metrics.control_report_rejected_bytes,
            ),
        };
        files.fetch_add(1, Relaxed);
        bytes.fetch_add(size, Relaxed);
        self.spool_reserved.fetch_sub(size, Relaxed);
        self.check_size();
        Ok(path)
    }

    /// Everything the spool directory holds, in bytes, as the gauges say.
    fn spool_bytes(&self) -> u64 {
        self.metrics
            .control_report_spool_bytes
            .load(Relaxed)
            .saturating_add(self.metrics.control_report_rejected_bytes.load(Relaxed))
    }

    /// Sets the gauges from a fresh count of the directory.
    fn record_usage(&self, usage: SpoolUsage) {
        let metrics = &self.metrics;
        metrics
            .control_report_spool_files
            .store(usage.pending.0, Relaxed);
        metrics
            .control_report_spool_bytes
            .store(usage.pending.1, Relaxed);
        metrics
            .control_report_rejected_files
            .store(usage.rejected.0, Relaxed);
        metrics
            .control_report_rejected_bytes
            .store(usage.rejected.1, Relaxed);
        if !self.check_size() {
            self.over_warning.store(false, Relaxed);
        }
    }

    /// Warns when the spool is above its warning size: once when it crosses it, and on every
    /// recount while it stays there. Returns whether it is above.
    fn check_size(&self) -> bool {
        let bytes = self.spool_bytes();
        if bytes <= self.settings.spool_warn_bytes {
            return false;
        }
        if !self.over_warning.swap(true, Relaxed) {
            tracing::warn!(
                dir = %self.settings.spool_dir.display(),
                bytes,
                files = self.metrics.control_report_spool_files.load(Relaxed)
                    + self.metrics.control_report_rejected_files.load(Relaxed),
                warn_bytes = self.settings.spool_warn_bytes,
                max_bytes = self.settings.spool_max_bytes,
                "the call report spool is large: is the control plane down or refusing reports?"
            );
        }
        true
    }

    async fn resend_pass(&self) -> SpoolPass {
        let mut pass = SpoolPass::default();
        let dir = self.settings.spool_dir.clone();
        if let Ok(usage) = blocking(move || spool_usage(&dir)).await {
            // A fresh count each pass: files an operator removed or moved are not counted on.
            self.over_warning.store(false, Relaxed);
            self.record_usage(usage);
        }
        let dir = self.settings.spool_dir.clone();
        let files = match blocking(move || list_spool(&dir)).await {
            Ok(files) => files,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return pass,
            Err(error) => {
                self.spool_error(&mut pass, &self.settings.spool_dir, &error, "list");
                return pass;
            }
        };
        for (index, path) in files.iter().enumerate() {
            let bytes = match blocking({
                let path = path.clone();
                move || fs::read(path)
            })
            .await
            {
                Ok(bytes) => bytes,
                // Taken by someone else (an operator, a second process): not ours to report.
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => {
                    self.spool_error(&mut pass, path, &error, "read");
                    continue;
                }
            };
            let size = bytes.len() as u64;
            let call_sid = match serde_json::from_slice::<SpooledReport>(&bytes) {
                Ok(spooled) => spooled.call_sid,
                Err(error) => {
                    tracing::warn!(
                        file = %path.display(),
                        %error,
                        "spooled file is not a call report: moving it to {REJECTED_DIR}/"
                    );
                    self.move_to_rejected(&mut pass, path, size).await;
                    continue;
                }
            };
            match self
                .client
                .report_bytes(&call_sid, Bytes::from(bytes))
                .await
            {
                Ok(()) => {
                    pass.resent += 1;
                    self.metrics.control_reports_resent.fetch_add(1, Relaxed);
                    tracing::info!(call_sid, "spooled call report delivered");
                    let remove = {
                        let path = path.clone();
                        move || fs::remove_file(path)
                    };
                    match blocking(remove).await {
                        Ok(()) => {
                            saturating_sub(&self.metrics.control_report_spool_files, 1);
                            saturating_sub(&self.metrics.control_report_spool_bytes, size);
                        }
                        // It will be sent again on the next pass: a duplicate, not a loss.
                        Err(error) => self.spool_error(&mut pass, path, &error, "delete"),
                    }
                }
                Err(error) if error.is_permanent() => {
                    tracing::warn!(
                        call_sid,
                        %error,
                        "control plane refused the spooled call report for good: moving it to \
                         {REJECTED_DIR}/"
                    );
                    self.move_to_rejected(&mut pass, path, size).await;
                }
                Err(error) => {
                    pass.remaining = files.len() - index;
                    tracing::warn!(
                        %error,
                        remaining = pass.remaining,
                        "control plane still unavailable: spooled call reports wait for the next pass"
                    );
                    break;
                }
            }
        }
        pass
    }

    async fn move_to_rejected(&self, pass: &mut SpoolPass, path: &Path, size: u64) {
        let rejected = self.settings.spool_dir.join(REJECTED_DIR);
        let from = path.to_owned();
        let result = blocking(move || {
            create_private_dir(&rejected)?;
            let name = from.file_name().ok_or(io::ErrorKind::InvalidInput)?;
            fs::rename(&from, rejected.join(name))
        })
        .await;
        match result {
            Ok(()) => {
                pass.rejected += 1;
                self.metrics.control_reports_rejected.fetch_add(1, Relaxed);
                saturating_sub(&self.metrics.control_report_spool_files, 1);
                saturating_sub(&self.metrics.control_report_spool_bytes, size);
                self.metrics
                    .control_report_rejected_files
                    .fetch_add(1, Relaxed);
                self.metrics
                    .control_report_rejected_bytes
                    .fetch_add(size, Relaxed);
            }
            Err(error) => self.spool_error(pass, path, &error, "move to rejected/"),
        }
    }

    fn spool_error(&self, pass: &mut SpoolPass, path: &Path, error: &io::Error, action: &str) {
        pass.errors += 1;
        self.metrics
            .control_report_spool_errors
            .fetch_add(1, Relaxed);
        tracing::error!(file = %path.display(), %error, "call report spool: could not {action}");
    }
}

fn saturating_sub(gauge: &AtomicU64, amount: u64) {
    let _ = gauge.fetch_update(Relaxed, Relaxed, |value| Some(value.saturating_sub(amount)));
}

/// The one field a spooled file must have to be resent; the rest is sent as it was written.
#[derive(serde::Deserialize)]
struct SpooledReport {
    call_sid: String,
}

/// Runs blocking file work off the runtime's workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|join| Err(io::Error::other(join)))
}

async fn write_report(dir: PathBuf, call_sid: &str, body: Bytes) -> io::Result<PathBuf> {
    let name = spool_file_name(call_sid, unix_ms(), rand::random());
    blocking(move || write_atomically(&dir, &name, &body)).await
}

/// Creates `dir` (and its parents) `0700` when missing; an existing `dir` that others can
/// reach is set to `0700`. Returns whether it had to be tightened.
fn create_private_dir(dir: &Path) -> io::Result<bool> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
        builder.mode(SPOOL_DIR_MODE);
        builder.create(dir)?;
        let mode = fs::metadata(dir)?.permissions().mode();
        if mode & 0o077 != 0 {
            fs::set_permissions(dir, fs::Permissions::from_mode(SPOOL_DIR_MODE))?;
            return Ok(true);
        }
        Ok(false)
    }
    #[cfg(not(unix))]
    {
        builder.create(dir)?;
        Ok(false)
    }
}

/// Makes the spool directory private and proves a file can be written in it.
fn prepare_spool_dir(dir: &Path) -> io::Result<bool> {
    let tightened = create_private_dir(dir)?;
    let name = format!("write-check-{}", std::process::id());
    let path = write_atomically(dir, &name, b"")?;
    fs::remove_file(path)?;
    Ok(tightened)
}

/// Writes `dir/name` (`0600`) so that it either does not exist or holds all of `bytes`.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<PathBuf> {
    create_private_dir(dir)?;
    let temp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let written = (|| {
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(SPOOL_FILE_MODE);
        }
        let mut file = options.open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, &path)
    })();
    if let Err(error) = written {
        let _ = fs::remove_file(&temp);
        return Err(error);
    }
    // Make the rename itself durable; best effort (not every platform can open a directory).
    if let Ok(directory) = fs::File::open(dir) {
        let _ = directory.sync_all();
    }
    Ok(path)
}

/// The spooled reports, oldest first; removes crash leftovers (old hidden temp files).
fn list_spool(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            let old = entry
                .metadata()
                .and_then(|meta| meta.modified())
                .ok()
                .and_then(|modified| modified.elapsed().ok())
                .is_some_and(|age| age > STALE_TEMP_AGE);
            if name.ends_with(".tmp") && old {
                let _ = fs::remove_file(entry.path());
            }
            continue;
        }
        if name.ends_with(".json") {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Counts the report files (and their bytes) in the spool and in `rejected/`; a file left
/// readable by others (an older version, an operator's copy) is set to `0600` on the way.
fn spool_usage(dir: &Path) -> io::Result<SpoolUsage> {
    let count = |dir: &Path| -> io::Result<(u64, u64)> {
        let mut usage = (0, 0);
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(usage),
            Err(error) => return Err(error),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let is_report = name
                .to_str()
                .is_some_and(|name| name.ends_with(".json") && !name.starts_with('.'));
            let Ok(meta) = entry.metadata() else { continue };
            if !is_report || !meta.is_file() {
                continue;
            }
            usage.0 += 1;
            usage.1 += meta.len();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                if meta.permissions().mode() & 0o077 != 0 {
                    let _ = fs::set_permissions(
                        entry.path(),
                        fs::Permissions::from_mode(SPOOL_FILE_MODE),
                    );
                }
            }
        }
        Ok(usage)
    };
    Ok(SpoolUsage {
        pending: count(dir)?,
        rejected: count(&dir.join(REJECTED_DIR))?,
    })
}

fn unix_ms() -> u64 {
    voxrelay_core::time::unix_ms(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_initial_delay_up_to_the_cap() {
        let initial = Duration::from_millis(250);
        let max = Duration::from_secs(5);
        let delays: Vec<u128> = (1..=8)
            .map(|retry| backoff_delay(initial, max, retry, 0.0).as_millis())
            .collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 4000, 5000, 5000, 5000]);
        assert_eq!(
            backoff_delay(initial, max, u32::MAX, 0.0),
            Duration::from_secs(5)
        );
        assert_eq!(backoff_delay(initial, max, 0, 0.0), initial);
    }

    #[test]
    fn jitter_adds_up_to_a_quarter() {
        let initial = Duration::from_millis(400);
        let max = Duration::from_secs(5);
        assert_eq!(
            backoff_delay(initial, max, 1, 1.0),
            Duration::from_millis(500)
        );
        assert_eq!(
            backoff_delay(initial, max, 1, 0.5),
            Duration::from_millis(450)
        );
        assert_eq!(
            backoff_delay(initial, max, 1, 7.0),
            Duration::from_millis(500)
        );
        assert_eq!(backoff_delay(initial, max, 1, -1.0), initial);
        assert_eq!(
            backoff_delay(initial, max, 10, 1.0),
            Duration::from_millis(6250)
        );
    }

    #[test]
    fn spool_names_sort_by_time_and_cannot_leave_the_directory() {
        assert_eq!(
            spool_file_name("CA0123abc", 1_750_000_000_123, 0xbeef),
            "1750000000123-CA0123abc-0000beef.json"
        );
        assert_eq!(
            spool_file_name("../../etc/passwd", 5, 1),
            "0000000000005-______etc_passwd-00000001.json"
        );
        assert_eq!(
            spool_file_name("", 5, 1),
            "0000000000005-unknown-00000001.json"
        );
        assert_eq!(
            spool_file_name("é/x", 5, 1),
            "0000000000005-__x-00000001.json"
        );
        let long = spool_file_name(&"A".repeat(500), 5, 1);
        assert_eq!(long.len(), 13 + 1 + 64 + 1 + 8 + 5);
        assert!(
            spool_file_name("CA1", 999, 0) < spool_file_name("CA0", 1000, 0),
            "names sort by time first"
        );
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let settings = ReportSettings::new("/var/spool/voxrelay");
        assert_eq!(settings.retry_window, Duration::from_secs(60));
        assert_eq!(settings.initial_backoff, Duration::from_millis(250));
        assert_eq!(settings.max_backoff, Duration::from_secs(5));
        assert_eq!(settings.resend_interval, Duration::from_secs(30));
        assert_eq!(settings.spool_warn_bytes, 64 * 1024 * 1024);
        assert_eq!(settings.spool_max_bytes, 1024 * 1024 * 1024);
        assert_eq!(settings.max_held_bytes, 64 * 1024 * 1024);
    }
}
