//! Call recordings: one two-channel Ogg Opus file per recorded call, the caller on the first
//! channel and the agent on the second, each at the time the caller heard it.
//!
//! This module owns whether a call is recorded ([`RecordingSettings`]: `VOXRELAY_RECORD`,
//! overridden by the tenant's `record`), the recording's metrics and what the call's report
//! says of it. The audio comes from the engine's [`MediaTap`] seam: [`timeline`] (sans I/O)
//! lays it out, [`ogg_opus`] encodes and contains it and [`recorder`] runs both on a thread of
//! the recording's own, fed through a bounded queue, so the call's task gains a copy per frame
//! and nothing else. Encoding needs libopus: the `opus` feature. A build without it refuses
//! `VOXRELAY_RECORD=1` at start, and a tenant's `record = true` gets
//! `recording_unavailable` in the report (the call goes on).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::SystemTime;

#[cfg(feature = "opus")]
pub mod ogg_opus;
#[cfg(feature = "opus")]
pub mod recorder;
pub mod timeline;

pub use voxrelay_core::control::api::ReportRecording;
pub use voxrelay_core::session::tap::MediaTap;

use crate::session::agent::CallAgent;
use crate::session::metrics::Metrics;
use crate::session::report::CallIdentity;

/// `VOXRELAY_RECORDING_DIR` when unset: relative to the bridge's working directory.
pub const DEFAULT_RECORDING_DIR: &str = "recordings";
/// The Opus tags' vendor string.
pub const VENDOR: &str = concat!("voxrelay ", env!("CARGO_PKG_VERSION"));
/// The longest failure detail a report carries (an I/O or encoder error's text).
pub const MAX_ERROR_DETAIL_BYTES: usize = 200;
/// Whether this build can record (the `opus` feature).
pub const AVAILABLE: bool = cfg!(feature = "opus");

/// Whether and where calls are recorded.
#[derive(Clone, Debug)]
pub struct RecordingSettings {
    /// `VOXRELAY_RECORD`: record the calls whose tenant does not say.
    pub record_by_default: bool,
    /// `VOXRELAY_RECORDING_DIR`: created (0700) when the first recording starts.
    pub dir: PathBuf,
}

impl Default for RecordingSettings {
    fn default() -> Self {
        Self {
            record_by_default: false,
            dir: PathBuf::from(DEFAULT_RECORDING_DIR),
        }
    }
}

impl RecordingSettings {
    /// The tenant's `record` when it has one, else the bridge's default.
    pub fn records(&self, agent: &CallAgent) -> bool {
        agent.record.unwrap_or(self.record_by_default)
    }
}

/// What the Opus tags say of the call.
#[derive(Clone, Debug)]
pub struct RecordingMetadata {
    pub call_sid: String,
    pub stream_sid: String,
    pub tenant: Option<String>,
    pub agent: String,
    pub provider: &'static str,
    pub started_at: SystemTime,
}

impl RecordingMetadata {
    pub fn new(identity: &CallIdentity, agent: &CallAgent) -> Self {
        Self {
            call_sid: identity.call_sid.clone(),
            stream_sid: identity.stream_sid.clone(),
            tenant: agent.tenant_id.clone(),
            agent: agent.agent_name.clone(),
            provider: agent.provider.as_str(),
            started_at: identity.started_at,
        }
    }

    /// The Vorbis-comment fields, in file order.
    #[cfg(feature = "opus")]
    fn tags(&self) -> Vec<(&'static str, String)> {
        let mut tags = vec![
            ("CALL_SID", self.call_sid.clone()),
            ("STREAM_SID", self.stream_sid.clone()),
        ];
        if let Some(tenant) = &self.tenant {
            tags.push(("TENANT", tenant.clone()));
        }
        tags.push(("AGENT", self.agent.clone()));
        tags.push(("PROVIDER", self.provider.to_owned()));
        tags.push(("START_TIME", ogg_opus::rfc3339(self.started_at)));
        tags
    }

    /// The file's name: the call SID in safe characters (`[A-Za-z0-9_-]`, at most 64).
    pub fn file_stem(&self) -> String {
        let stem: String = self
            .call_sid
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
            .take(64)
            .collect();
        if stem.is_empty() {
            "call".to_owned()
        } else {
            stem
        }
    }
}

/// Why a recording failed, as the metric's `kind` label says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// Asked for on a build without the `opus` feature.
    Unavailable,
    /// The directory could not be created, or the file not created in it.
    UnwritableDir,
    DiskFull,
    /// Any other write error.
    Write,
    Encoder,
    /// The recorder's thread could not be started.
    Thread,
    /// Not finalised within [`FINALIZE_TIMEOUT`](recorder::FINALIZE_TIMEOUT) of the call's end.
    FinalizeTimeout,
}

impl FailureKind {
    pub const ALL: [FailureKind; 7] = [
        FailureKind::Unavailable,
        FailureKind::UnwritableDir,
        FailureKind::DiskFull,
        FailureKind::Write,
        FailureKind::Encoder,
        FailureKind::Thread,
        FailureKind::FinalizeTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Unavailable => "recording_unavailable",
            FailureKind::UnwritableDir => "unwritable_dir",
            FailureKind::DiskFull => "disk_full",
            FailureKind::Write => "write",
            FailureKind::Encoder => "encoder",
            FailureKind::Thread => "thread",
            FailureKind::FinalizeTimeout => "finalize_timeout",
        }
    }

    /// The report's `recording.error`: the kind, then what went wrong (at most
    /// [`MAX_ERROR_DETAIL_BYTES`] of it, so the report stays bounded).
    pub fn report(self, detail: Option<&str>) -> ReportRecording {
        ReportRecording::Failed {
            error: match detail {
                Some(detail) => {
                    let mut end = detail.len().min(MAX_ERROR_DETAIL_BYTES);
                    while !detail.is_char_boundary(end) {
                        end -= 1;
                    }
                    format!("{}: {}", self.as_str(), &detail[..end])
                }
                None => self.as_str().to_owned(),
            },
        }
    }
}

/// The recordings' metrics (part of [`Metrics`]).
#[derive(Default)]
pub struct RecordingMetrics {
    pub written: AtomicU64,
    failed: [AtomicU64; FailureKind::ALL.len()],
    pub frames_dropped: AtomicU64,
    pub bytes_written: AtomicU64,
}

impl RecordingMetrics {
    pub fn failed(&self, kind: FailureKind) {
        self.failed[kind as usize].fetch_add(1, Relaxed);
    }

    pub fn failures(&self, kind: FailureKind) -> u64 {
        self.failed[kind as usize].load(Relaxed)
    }

    pub fn render(&self, out: &mut String) {
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            "voxrelay_recordings_written_total",
            "Call recordings finalised on disk.",
            self.written.load(Relaxed),
        );
        counter(
            "voxrelay_recording_frames_dropped_total",
            "Caller frames and agent chunks the recorders' queues could not take.",
            self.frames_dropped.load(Relaxed),
        );
        counter(
            "voxrelay_recording_bytes_written_total",
            "Bytes of recordings written.",
            self.bytes_written.load(Relaxed),
        );
        let name = "voxrelay_recordings_failed_total";
        let _ = writeln!(
            out,
            "# HELP {name} Call recordings that failed, by kind.\n# TYPE {name} counter"
        );
        for kind in FailureKind::ALL {
            let _ = writeln!(
                out,
                "{name}{{kind=\"{}\"}} {}",
                kind.as_str(),
                self.failures(kind)
            );
        }
    }
}

/// A call's recording, from its agent's resolution to its report.
#[derive(Default)]
pub enum CallRecording {
    /// Not recorded.
    #[default]
    Off,
    #[cfg(feature = "opus")]
    Running(recorder::RecordingHandle),
    /// Failed already (or unavailable): the report says so.
    Failed(ReportRecording),
}

impl CallRecording {
    /// Starts the call's recording when its agent (or the bridge) says so; the tap goes to
    /// the engine (`CallEngine::set_media_tap`).
    pub fn start(
        settings: &RecordingSettings,
        metrics: &std::sync::Arc<Metrics>,
        identity: &CallIdentity,
        agent: &CallAgent,
    ) -> (Self, Option<Box<dyn MediaTap>>) {
        if !settings.records(agent) {
            return (Self::Off, None);
        }
        #[cfg(feature = "opus")]
        {
            let metadata = RecordingMetadata::new(identity, agent);
            match recorder::start(settings, metadata, std::sync::Arc::clone(metrics)) {
                Ok((tap, handle)) => (Self::Running(handle), Some(Box::new(tap))),
                Err(failed) => (Self::Failed(failed), None),
            }
        }
        #[cfg(not(feature = "opus"))]
        {
            let _ = identity;
            metrics.recordings.failed(FailureKind::Unavailable);
            tracing::warn!(
                "the tenant asked for a recording, but this build has none (feature `opus`)"
            );
            (Self::Failed(FailureKind::Unavailable.report(None)), None)
        }
    }

    /// The call is over: waits (bounded) for the file to be finalised; what the report says.
    pub async fn finish(self) -> Option<ReportRecording> {
        match self {
            Self::Off => None,
            #[cfg(feature = "opus")]
            Self::Running(handle) => Some(handle.finish().await),
            Self::Failed(report) => Some(report),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentDefaults;

    #[test]
    fn the_tenant_decides_else_the_bridge() {
        let mut agent = CallAgent::from_defaults(&AgentDefaults::default(), "fresh");
        let off = RecordingSettings::default();
        let on = RecordingSettings {
            record_by_default: true,
            ..RecordingSettings::default()
        };
        assert!(!off.records(&agent));
        assert!(on.records(&agent));
        agent.record = Some(false);
        assert!(!on.records(&agent));
        agent.record = Some(true);
        assert!(off.records(&agent));
    }

    /// On a build without the `opus` feature a call asked to record goes on unrecorded, its
    /// report says `recording_unavailable` and the metric counts it.
    #[cfg(not(feature = "opus"))]
    #[tokio::test]
    async fn a_build_without_opus_reports_recording_unavailable() {
        let metrics = std::sync::Arc::new(Metrics::default());
        let identity = CallIdentity {
            call_sid: "CA1".into(),
            stream_sid: "MZ1".into(),
            from: String::new(),
            to: String::new(),
            started_at: SystemTime::UNIX_EPOCH,
            binding: crate::control::api::ReportBinding::Bound,
        };
        let mut agent = CallAgent::from_defaults(&AgentDefaults::default(), "fresh");
        let settings = RecordingSettings::default();
        let (off, tap) = CallRecording::start(&settings, &metrics, &identity, &agent);
        assert!(tap.is_none());
        assert_eq!(off.finish().await, None);
        agent.record = Some(true);
        let (asked, tap) = CallRecording::start(&settings, &metrics, &identity, &agent);
        assert!(tap.is_none());
        assert_eq!(
            asked.finish().await,
            Some(ReportRecording::Failed {
                error: "recording_unavailable".into()
            })
        );
        assert_eq!(metrics.recordings.failures(FailureKind::Unavailable), 1);
    }

    #[test]
    fn file_names_keep_only_safe_characters() {
        let metadata = |call_sid: &str| RecordingMetadata {
            call_sid: call_sid.into(),
            stream_sid: "MZ1".into(),
            tenant: None,
            agent: "a".into(),
            provider: "openai",
            started_at: SystemTime::UNIX_EPOCH,
        };
        assert_eq!(metadata("CA0123abc").file_stem(), "CA0123abc");
        assert_eq!(metadata("../../etc/passwd").file_stem(), "etcpasswd");
        assert_eq!(metadata("/..").file_stem(), "call");
        assert_eq!(metadata(&"x".repeat(500)).file_stem().len(), 64);
    }

    #[test]
    fn failures_are_reported_by_kind() {
        assert_eq!(
            FailureKind::Unavailable.report(None),
            ReportRecording::Failed {
                error: "recording_unavailable".into()
            }
        );
        let ReportRecording::Failed { error } = FailureKind::Write.report(Some(&"é".repeat(300)))
        else {
            panic!("a failure");
        };
        assert!(
            error.len() <= "write: ".len() + MAX_ERROR_DETAIL_BYTES,
            "{error}"
        );
        let metrics = RecordingMetrics::default();
        metrics.failed(FailureKind::DiskFull);
        let mut text = String::new();
        metrics.render(&mut text);
        assert!(text.contains("voxrelay_recordings_failed_total{kind=\"disk_full\"} 1\n"));
        assert!(text.contains("voxrelay_recordings_failed_total{kind=\"unwritable_dir\"} 0\n"));
        assert!(text.contains("voxrelay_recordings_written_total 0\n"));
    }
}
