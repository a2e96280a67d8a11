//! Call reports: delivered at call end with retry and backoff, spooled to disk when the control
//! plane cannot take them, and resent from the spool, so no report is lost to a control-plane
//! outage or a restart.
//!
//! [`ReportSender`] owns the delivery tasks, the spool directory and the resend loop.
//!
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
//!   report. Hidden temp files left by a crash are removed after an hour. The directory (and
//!   `rejected/`) is created when missing.
//! - **Resend.** [`ReportSender::resend_spool`] POSTs each spooled file, oldest first: 2xx
//!   deletes it, a permanent refusal (or a file that is not a report) moves it to `rejected/`
//!   (logged, never retried), and the first transient failure ends the pass (the control plane
//!   is still down; the files wait for the next pass). [`ReportSender::spawn_resend_loop`] runs
//!   a pass at once (the previous process's spool) and then every resend interval (default
//!   30 s). Only one pass runs at a time.
//! - **Shutdown.** [`ReportSender::shutdown`] stops the resend loop and lets deliveries go on
//!   for the grace; those still pending then are spooled, never dropped. A report submitted
//!   after shutdown is spooled at once.
//! - **Failures are loud, never panics.** An unwritable spool is an `error` log line naming the
//!   call SID and a count in `voxrelay_control_report_spool_errors_total`; the report in hand is
//!   then lost (there is nowhere left to keep it). Transcripts are personal data: report bodies
//!   are never logged.
//!
//! A report can reach the control plane more than once (an answer lost after the control plane
//! stored it, a pass cut by shutdown); reports are keyed by `call_sid`, so the control plane
//! should treat a second one for the same call as a replacement.
//!
//! Memory: each undelivered report is held by its task for at most the retry window; there is
//! one task per ended call, so this is bounded by the call rate times the window.
//!
//! Metrics: `voxrelay_control_reports_delivered_total`, `…_report_retries_total`,
//! `…_reports_spooled_total`, `…_reports_resent_total`, `…_reports_rejected_total`,
//! `…_report_spool_errors_total` (all `voxrelay_control_…`).

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
/// Subdirectory of the spool for reports the control plane refused for good.
pub const REJECTED_DIR: &str = "rejected";

/// Age after which a hidden temp file is taken for a crash's leftover and removed.
const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);
/// Longest sanitised call SID in a spool file name.
const MAX_SID_IN_NAME: usize = 64;

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
}

impl ReportSettings {
    pub fn new(spool_dir: impl Into<PathBuf>) -> Self {
        Self {
            spool_dir: spool_dir.into(),
            retry_window: DEFAULT_RETRY_WINDOW,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            resend_interval: DEFAULT_RESEND_INTERVAL,
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
    /// Shutdown has begun: the resend loop stops.
    stopping: CancellationToken,
    /// The shutdown grace is over: pending deliveries go to the spool now.
    spool_now: CancellationToken,
    /// Held by the resend pass in progress.
    resending: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for ReportSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReportSender")
            .field("settings", &self.inner.settings)
            .field("tasks", &self.inner.tracker.len())
            .finish()
    }
}

impl ReportSender {
    /// A sender spooling to `settings.spool_dir`. Creates the directory and checks it can be
    /// written now, so a bad spool shows up at start: an error is logged and counted, not
    /// returned (reports can still be delivered while the control plane is up).
    pub fn new(
        client: ControlPlaneClient,
        settings: ReportSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        if let Err(error) = check_writable(&settings.spool_dir) {
            metrics.control_report_spool_errors.fetch_add(1, Relaxed);
            tracing::error!(
                dir = %settings.spool_dir.display(),
                %error,
                "the call report spool directory is not writable: reports the control plane \
                 cannot take will be lost"
            );
        }
        Self {
            inner: Arc::new(SenderInner {
                client,
                settings,
                metrics,
                tracker: TaskTracker::new(),
                stopping: CancellationToken::new(),
                spool_now: CancellationToken::new(),
                resending: tokio::sync::Mutex::new(()),
            }),
        }
    }

    pub fn settings(&self) -> &ReportSettings {
        &self.inner.settings
    }

    /// Hands a report over for delivery and returns at once. Must run inside a tokio runtime.
    pub fn submit(&self, report: CallReport) {
        let inner = self.inner.clone();
        self.inner.tracker.spawn(inner.deliver(report));
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
    /// whatever is still pending and waits for those writes. Nothing is dropped.
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

impl SenderInner {
    async fn deliver(self: Arc<Self>, report: CallReport) {
        let call_sid = report.call_sid.clone();
        let body = match serde_json::to_vec(&report) {
            Ok(body) => Bytes::from(body),
            Err(error) => {
                // Cannot happen for this type (no maps with non-string keys); never silent.
                tracing::error!(call_sid, %error, "call report could not be encoded: dropped");
                return;
            }
        };
        drop(report);
        let deadline = Instant::now() + self.settings.retry_window;
        let mut retry = 0;
        loop {
            let attempt = tokio::select! {
                biased;
                () = self.spool_now.cancelled() => break,
                result = self.client.report_bytes(&call_sid, body.clone()) => result,
            };
            let error = match attempt {
                Ok(()) => {
                    self.metrics.control_reports_delivered.fetch_add(1, Relaxed);
                    tracing::debug!(call_sid, retries = retry, "call report delivered");
                    return;
                }
                Err(error) => error,
            };
            if error.is_permanent() {
                tracing::warn!(
                    call_sid,
                    %error,
                    "control plane refused the call report for good: keeping it in {REJECTED_DIR}/"
                );
                self.keep_rejected(&call_sid, body).await;
                return;
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
                break;
            }
            tracing::debug!(call_sid, %error, ?delay, "call report delivery failed: retrying");
            self.metrics.control_report_retries.fetch_add(1, Relaxed);
            tokio::select! {
                biased;
                () = self.spool_now.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        self.spool(&call_sid, body).await;
    }

    async fn spool(&self, call_sid: &str, body: Bytes) {
        let dir = self.settings.spool_dir.clone();
        match write_report(dir.clone(), call_sid, body).await {
            Ok(path) => {
                self.metrics.control_reports_spooled.fetch_add(1, Relaxed);
                tracing::info!(call_sid, file = %path.display(), "call report spooled");
            }
            Err(error) => {
                self.metrics
                    .control_report_spool_errors
                    .fetch_add(1, Relaxed);
                tracing::error!(
                    call_sid,
                    dir = %dir.display(),
                    %error,
                    "could not write the call report to the spool directory: it is lost"
                );
            }
        }
    }

    async fn keep_rejected(&self, call_sid: &str, body: Bytes) {
        let dir = self.settings.spool_dir.join(REJECTED_DIR);
        match write_report(dir.clone(), call_sid, body).await {
            Ok(_) => {
                self.metrics.control_reports_rejected.fetch_add(1, Relaxed);
            }
            Err(error) => {
                self.metrics
                    .control_report_spool_errors
                    .fetch_add(1, Relaxed);
                tracing::error!(
                    call_sid,
                    dir = %dir.display(),
                    %error,
                    "could not keep the rejected call report"
                );
            }
        }
    }

    async fn resend_pass(&self) -> SpoolPass {
        let mut pass = SpoolPass::default();
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
            let call_sid = match serde_json::from_slice::<SpooledReport>(&bytes) {
                Ok(spooled) => spooled.call_sid,
                Err(error) => {
                    tracing::warn!(
                        file = %path.display(),
                        %error,
                        "spooled file is not a call report: moving it to {REJECTED_DIR}/"
                    );
                    self.move_to_rejected(&mut pass, path).await;
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
                    if let Err(error) = blocking(remove).await {
                        // It will be sent again on the next pass: a duplicate, not a loss.
                        self.spool_error(&mut pass, path, &error, "delete");
                    }
                }
                Err(error) if error.is_permanent() => {
                    tracing::warn!(
                        call_sid,
                        %error,
                        "control plane refused the spooled call report for good: moving it to \
                         {REJECTED_DIR}/"
                    );
                    self.move_to_rejected(&mut pass, path).await;
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

    async fn move_to_rejected(&self, pass: &mut SpoolPass, path: &Path) {
        let rejected = self.settings.spool_dir.join(REJECTED_DIR);
        let from = path.to_owned();
        let result = blocking(move || {
            fs::create_dir_all(&rejected)?;
            let name = from.file_name().ok_or(io::ErrorKind::InvalidInput)?;
            fs::rename(&from, rejected.join(name))
        })
        .await;
        match result {
            Ok(()) => {
                pass.rejected += 1;
                self.metrics.control_reports_rejected.fetch_add(1, Relaxed);
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

/// Writes `dir/name` so that it either does not exist or holds all of `bytes`.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let temp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let written = (|| {
        let mut file = fs::File::create(&temp)?;
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

/// Creates `dir` if needed and proves a file can be written in it.
fn check_writable(dir: &Path) -> io::Result<()> {
    let name = format!("write-check-{}", std::process::id());
    let path = write_atomically(dir, &name, b"")?;
    fs::remove_file(path)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
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
    }
}
