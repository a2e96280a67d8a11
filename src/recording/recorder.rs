//! One call's recorder: the [`MediaTap`] on the call's task and the thread that writes the
//! file.
//!
//! The tap copies each frame into a reused buffer and `try_send`s it to a bounded queue
//! ([`QUEUE_EVENTS`]); when the queue is full the frame is dropped and counted (the writer's
//! timeline fills the hole with silence when the caller's read times show it), never waited
//! for. A barge-in cut that does not fit is kept and sent before the next frame. Buffers come
//! back from the writer through a second bounded queue, so a call in progress allocates
//! nothing per frame once the first few buffers exist.
//!
//! The writer is a thread of its own (mostly asleep: a frame every 20 ms), because encoding
//! and file writes must never run on the call's task nor block a runtime worker. It writes
//! `<dir>/<call sid>.opus.part` (0600, created new: never an existing file) and renames it
//! to `.opus` once the stream is ended and synced, so a file without `.part` is whole. On any
//! failure it removes the part file; the outcome (path, duration, SHA-256 and drops, or the
//! failure) goes back to the call, which waits at most [`FINALIZE_TIMEOUT`] for it.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, BufWriter, ErrorKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use tokio::sync::oneshot;

use super::ogg_opus::{OggOpusError, OggOpusWriter};
use super::timeline::{SLOT_SAMPLES, Timeline};
use super::{FailureKind, MediaTap, RecordingMetadata, RecordingSettings, ReportRecording};
use crate::session::metrics::Metrics;

/// Events the queue holds: about 5 s of caller frames, more than a writer thread that is
/// merely descheduled falls behind.
pub const QUEUE_EVENTS: usize = 256;
/// How long a call's end waits for its recording to be finalised before its report goes
/// without it (`finalize_timeout`); the file is still finished.
pub const FINALIZE_TIMEOUT: Duration = Duration::from_secs(2);
/// The writer's stack: it holds a slot and the encoder's scratch, nothing deep.
const WRITER_STACK: usize = 256 * 1024;
/// The file's write buffer: a few seconds of Opus.
const WRITE_BUFFER: usize = 16 * 1024;
/// The writer wakes at most this often: it takes whatever is queued, encodes what became
/// final, then sleeps, rather than waking for every 20 ms frame (five frames a wake, far
/// within the queue).
const WRITER_BATCH: Duration = Duration::from_millis(100);

enum Event {
    Caller(Duration, Vec<u8>),
    Agent(Duration, Vec<u8>),
    Cut(Duration),
    Close,
}

struct Shared {
    closed: AtomicBool,
    dropped: AtomicU64,
}

/// The call's side: a [`MediaTap`] that copies and queues.
pub struct Recorder {
    queue: SyncSender<Event>,
    buffers: Receiver<Vec<u8>>,
    /// A buffer back from a full queue, used for the next frame.
    spare: Option<Vec<u8>>,
    pending_cut: Option<Duration>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
}

impl Recorder {
    fn buffer(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut buffer = self
            .spare
            .take()
            .or_else(|| self.buffers.try_recv().ok())
            .unwrap_or_default();
        buffer.clear();
        buffer.extend_from_slice(bytes);
        buffer
    }

    fn send(&mut self, event: Event) -> bool {
        match self.queue.try_send(event) {
            Ok(()) => true,
            Err(TrySendError::Full(event)) => {
                self.shared.dropped.fetch_add(1, Relaxed);
                self.metrics.recordings.frames_dropped.fetch_add(1, Relaxed);
                if let Event::Caller(_, buffer) | Event::Agent(_, buffer) = event {
                    self.spare = Some(buffer);
                }
                false
            }
            // The writer has gone (a failure): nothing more to record.
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    fn audio(&mut self, agent: bool, at: Duration, bytes: &[u8]) {
        if self.shared.closed.load(Relaxed) {
            return;
        }
        if let Some(cut) = self.pending_cut
            && !matches!(
                self.queue.try_send(Event::Cut(cut)),
                Err(TrySendError::Full(_))
            )
        {
            self.pending_cut = None;
        }
        let buffer = self.buffer(bytes);
        self.send(if agent {
            Event::Agent(at, buffer)
        } else {
            Event::Caller(at, buffer)
        });
    }
}

impl MediaTap for Recorder {
    fn caller_audio(&mut self, at: Duration, mulaw: &[u8]) {
        self.audio(false, at, mulaw);
    }

    fn agent_audio(&mut self, play_at: Duration, mulaw: &[u8]) {
        self.audio(true, play_at, mulaw);
    }

    fn agent_cut(&mut self, at: Duration) {
        if self.shared.closed.load(Relaxed) {
            return;
        }
        // A later cut covers an earlier one still waiting (cuts only move forward in time,
        // and what the earlier one cut was placed before the later one).
        let cut = self.pending_cut.map_or(at, |pending| pending.min(at));
        if let Err(TrySendError::Full(_)) = self.queue.try_send(Event::Cut(cut)) {
            self.pending_cut = Some(cut);
        } else {
            self.pending_cut = None;
        }
    }
}

/// The call's handle on its recording, for its end.
pub struct RecordingHandle {
    queue: SyncSender<Event>,
    shared: Arc<Shared>,
    outcome: oneshot::Receiver<ReportRecording>,
    metrics: Arc<Metrics>,
}

impl RecordingHandle {
    /// Closes the recording and waits at most [`FINALIZE_TIMEOUT`] for the file.
    pub async fn finish(self) -> ReportRecording {
        self.shared.closed.store(true, Relaxed);
        // When the queue is full the writer sees `closed` once it has taken what is queued.
        let _ = self.queue.try_send(Event::Close);
        match tokio::time::timeout(FINALIZE_TIMEOUT, self.outcome).await {
            Ok(Ok(outcome)) => outcome,
            // The thread ended without an outcome: only a panic does that.
            Ok(Err(_)) => {
                self.metrics.recordings.failed(FailureKind::Thread);
                FailureKind::Thread.report(Some("the recorder stopped"))
            }
            Err(_) => {
                self.metrics.recordings.failed(FailureKind::FinalizeTimeout);
                tracing::warn!(
                    "the call's recording was not finalised within {FINALIZE_TIMEOUT:?}: \
                     reported without it"
                );
                FailureKind::FinalizeTimeout.report(None)
            }
        }
    }
}

/// Starts a call's recorder: the tap for the engine and the call's handle. Nothing touches
/// the disk here; the writer thread does that.
pub fn start(
    settings: &RecordingSettings,
    metadata: RecordingMetadata,
    metrics: Arc<Metrics>,
) -> Result<(Recorder, RecordingHandle), ReportRecording> {
    let (queue, events) = sync_channel(QUEUE_EVENTS);
    let (buffers_back, buffers) = sync_channel(QUEUE_EVENTS);
    let (outcome_tx, outcome) = oneshot::channel();
    let shared = Arc::new(Shared {
        closed: AtomicBool::new(false),
        dropped: AtomicU64::new(0),
    });
    let writer = Writer {
        events,
        buffers_back,
        shared: Arc::clone(&shared),
        metrics: Arc::clone(&metrics),
        dir: settings.dir.clone(),
        metadata,
    };
    let span = tracing::Span::current();
    let spawned = std::thread::Builder::new()
        .name("voxrelay-rec".into())
        .stack_size(WRITER_STACK)
        .spawn(move || {
            let _entered = span.enter();
            let outcome = writer.run();
            let _ = outcome_tx.send(outcome);
        });
    if let Err(error) = spawned {
        metrics.recordings.failed(FailureKind::Thread);
        tracing::warn!(%error, "the recorder's thread could not start: the call goes on unrecorded");
        return Err(FailureKind::Thread.report(Some(&error.to_string())));
    }
    Ok((
        Recorder {
            queue: queue.clone(),
            buffers,
            spare: None,
            pending_cut: None,
            shared: Arc::clone(&shared),
            metrics: Arc::clone(&metrics),
        },
        RecordingHandle {
            queue,
            shared,
            outcome,
            metrics,
        },
    ))
}

/// The writer thread's state.
struct Writer {
    events: Receiver<Event>,
    buffers_back: SyncSender<Vec<u8>>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    dir: PathBuf,
    metadata: RecordingMetadata,
}

/// A failed recording: its kind and what happened.
struct Failure(FailureKind, String);

impl From<OggOpusError> for Failure {
    fn from(error: OggOpusError) -> Self {
        match error {
            OggOpusError::Encoder(error) => Failure(FailureKind::Encoder, error.to_string()),
            OggOpusError::Io(error) => io_failure(&error),
        }
    }
}

fn io_failure(error: &io::Error) -> Failure {
    let kind = if error.kind() == ErrorKind::StorageFull {
        FailureKind::DiskFull
    } else {
        FailureKind::Write
    };
    Failure(kind, error.to_string())
}

/// What `write` produced.
struct Written {
    path: PathBuf,
    samples: u64,
    sha256: String,
    bytes: u64,
}

impl Writer {
    fn run(self) -> ReportRecording {
        let mut part = None;
        let result = self.write(&mut part);
        let frames_dropped = self.shared.dropped.load(Relaxed);
        match result {
            Ok(written) => {
                let recordings = &self.metrics.recordings;
                recordings.written.fetch_add(1, Relaxed);
                recordings.bytes_written.fetch_add(written.bytes, Relaxed);
                tracing::info!(
                    path = %written.path.display(),
                    bytes = written.bytes,
                    frames_dropped,
                    "call recording written"
                );
                ReportRecording::Written {
                    path: written.path.display().to_string(),
                    duration_ms: written.samples / 8,
                    sha256: written.sha256,
                    frames_dropped,
                }
            }
            Err(Failure(kind, detail)) => {
                if let Some(part) = part {
                    let _ = std::fs::remove_file(part);
                }
                self.metrics.recordings.failed(kind);
                tracing::warn!(
                    kind = kind.as_str(),
                    error = %detail,
                    "the call's recording failed: the call goes on unrecorded"
                );
                // Frames still queued are of no use now.
                self.shared.closed.store(true, Relaxed);
                kind.report(Some(&detail))
            }
        }
    }

    fn write(&self, part: &mut Option<PathBuf>) -> Result<Written, Failure> {
        let (file, part_path, path) = self.create()?;
        *part = Some(part_path.clone());
        let serial = rand::random::<u32>();
        let mut opus = OggOpusWriter::new(
            BufWriter::with_capacity(WRITE_BUFFER, file),
            &self.metadata,
            serial,
        )?;
        let mut timeline = Timeline::new();
        let mut slot = [0i16; 2 * SLOT_SAMPLES];
        let mut samples = 0u64;
        loop {
            // Once closed, what is queued is taken without waiting (the `Close` itself may not
            // have fitted in a full queue). Otherwise, with the queue empty, the writer sleeps
            // a batch, then waits for the next event.
            let event = if self.shared.closed.load(Relaxed) {
                match self.events.try_recv() {
                    Ok(event) => event,
                    Err(_) => break,
                }
            } else if let Ok(event) = self.events.try_recv() {
                event
            } else {
                std::thread::sleep(WRITER_BATCH);
                if self.shared.closed.load(Relaxed) {
                    continue;
                }
                match self.events.recv_timeout(Duration::from_millis(250)) {
                    Ok(event) => event,
                    Err(RecvTimeoutError::Timeout) => continue,
                    // The call and its engine are gone without a close (a panic): finish.
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            };
            match event {
                Event::Caller(at, buffer) => {
                    timeline.caller_audio(at, &buffer);
                    let _ = self.buffers_back.try_send(buffer);
                }
                Event::Agent(at, buffer) => {
                    timeline.agent_audio(at, &buffer);
                    let _ = self.buffers_back.try_send(buffer);
                }
                Event::Cut(at) => timeline.agent_cut(at),
                Event::Close => break,
            }
            while timeline.pop_final(&mut slot) {
                opus.push_slot(&slot)?;
                samples += SLOT_SAMPLES as u64;
            }
        }
        while let Some(real) = timeline.pop_closing(&mut slot) {
            opus.push_slot(&slot)?;
            samples += real as u64;
        }
        let finished = opus.finish(samples)?;
        let file = finished
            .inner
            .into_inner()
            .map_err(|error| io_failure(error.error()))?;
        file.sync_all().map_err(|error| io_failure(&error))?;
        drop(file);
        std::fs::rename(&part_path, &path).map_err(|error| io_failure(&error))?;
        *part = None;
        Ok(Written {
            path,
            samples,
            sha256: finished.sha256,
            bytes: finished.bytes,
        })
    }

    /// The directory (0700) and a new part file (0600) under a name no file has yet.
    fn create(&self) -> Result<(File, PathBuf, PathBuf), Failure> {
        let unwritable = |error: io::Error| Failure(FailureKind::UnwritableDir, error.to_string());
        let mut dir = DirBuilder::new();
        dir.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut dir, 0o700);
        dir.create(&self.dir).map_err(unwritable)?;
        let stem = self.metadata.file_stem();
        // The same call SID twice (a retried stream, or a restart) gets `-1`, `-2`, …
        for attempt in 0..100u32 {
            let name = if attempt == 0 {
                stem.clone()
            } else {
                format!("{stem}-{attempt}")
            };
            let path = self.dir.join(format!("{name}.opus"));
            let part = self.dir.join(format!("{name}.opus.part"));
            if exists(&path) {
                continue;
            }
            let mut options = OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            match options.open(&part) {
                Ok(file) => return Ok((file, part, path)),
                Err(error) if error.kind() == ErrorKind::AlreadyExists => continue,
                Err(error) if error.kind() == ErrorKind::StorageFull => {
                    return Err(io_failure(&error));
                }
                Err(error) => return Err(unwritable(error)),
            }
        }
        Err(Failure(
            FailureKind::UnwritableDir,
            format!("100 recordings of call {stem} already exist"),
        ))
    }
}

fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::SystemTime;

    use sha2::{Digest, Sha256};
    use voxrelay_core::codec::g711::mulaw_encode;

    use super::*;
    use crate::recording::ogg_opus::decode;

    /// A directory of the test's own under the system's temp dir, removed at the end.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "voxrelay-rec-{name}-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&path);
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn metadata() -> RecordingMetadata {
        RecordingMetadata {
            call_sid: "CAtest01".into(),
            stream_sid: "MZtest01".into(),
            tenant: Some("bistro".into()),
            agent: "Luna".into(),
            provider: "openai",
            started_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_618_609),
        }
    }

    /// `samples` of a tone at `hz` from sample `from` (its phase continuous), as μ-law.
    fn tone(hz: f64, from: usize, samples: usize) -> Vec<u8> {
        (from..from + samples)
            .map(|n| {
                let x = 8_000.0 * (2.0 * std::f64::consts::PI * hz * n as f64 / 8_000.0).sin();
                mulaw_encode(x as i16)
            })
            .collect()
    }

    /// Power of `hz` in `samples` (Goertzel), normalised by length.
    fn power(samples: &[i16], hz: f64) -> f64 {
        let coeff = 2.0 * (2.0 * std::f64::consts::PI * hz / 8_000.0).cos();
        let (mut s1, mut s2) = (0.0, 0.0);
        for &x in samples {
            let s0 = f64::from(x) + coeff * s1 - s2;
            s2 = s1;
            s1 = s0;
        }
        (s1 * s1 + s2 * s2 - coeff * s1 * s2) / (samples.len() as f64).powi(2)
    }

    fn rms(samples: &[i16]) -> f64 {
        let sum: f64 = samples.iter().map(|&x| f64::from(x).powi(2)).sum();
        (sum / samples.len().max(1) as f64).sqrt()
    }

    /// Where a leg is heard: the first and last 5 ms window (in ms from the recording's
    /// start) of a run of at least four louder than `level`. Opus codes the two channels
    /// jointly, so an abrupt onset on one leaks a few ms into the other; runs skip that.
    fn extent(samples: &[i16], level: f64) -> Option<(u64, u64)> {
        let loud: Vec<bool> = samples.chunks(40).map(|w| rms(w) > level).collect();
        let sustained: Vec<u64> = (0..loud.len())
            .filter(|&i| {
                (i.saturating_sub(3)..=i).any(|start| {
                    loud.get(start..start + 4)
                        .is_some_and(|run| !run.contains(&false))
                })
            })
            .map(|i| i as u64 * 5)
            .collect();
        Some((*sustained.first()?, *sustained.last()? + 5))
    }

    #[tokio::test]
    async fn a_synthetic_call_decodes_back_with_both_legs_where_they_were_heard_and_the_cut() {
        let dir = TempDir::new("synthetic");
        let settings = RecordingSettings {
            record_by_default: true,
            dir: dir.0.join("calls"),
        };
        let metrics = Arc::new(Metrics::default());
        let (mut tap, handle) = start(&settings, metadata(), Arc::clone(&metrics)).unwrap();
        // The stream's audio starts 1 s after `start`. The caller is silent for 200 ms, then
        // says a 440 Hz tone; frames are read with up to 12 ms of jitter. The agent's
        // 1 kHz answer is to be heard from 1.5 s in 400 ms chunks sent 200 ms ahead of their
        // play time; the caller barges in at 2.3 s.
        let agent_from = 1_500u64;
        let mut agent_sent = 0usize;
        for n in 0..150u64 {
            let now = 1_000 + n * 20;
            let frame = if n < 10 {
                vec![mulaw_encode(0); 160]
            } else {
                tone(440.0, n as usize * 160, 160)
            };
            tap.caller_audio(Duration::from_millis(now + (n * 5) % 13), &frame);
            // The bridge forwards nothing of the cut response after the cut.
            while now < 2_300
                && agent_sent < 12_000
                && agent_from + agent_sent as u64 / 8 <= now + 200
            {
                let play_at = Duration::from_millis(agent_from + agent_sent as u64 / 8);
                tap.agent_audio(play_at, &tone(1_000.0, agent_sent, 3_200));
                agent_sent += 3_200;
            }
            if now == 2_300 {
                tap.agent_cut(Duration::from_millis(now));
            }
        }
        let report = handle.finish().await;
        let ReportRecording::Written {
            path,
            duration_ms,
            sha256,
            frames_dropped,
        } = report
        else {
            panic!("not written: {report:?}");
        };
        assert_eq!(duration_ms, 3_000);
        assert_eq!(frames_dropped, 0);
        assert_eq!(Path::new(&path), settings.dir.join("CAtest01.opus"));
        let file = std::fs::read(&path).unwrap();
        assert_eq!(hex_of(&Sha256::digest(&file)), sha256);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(Path::new(&path)), 0o600);
            assert_eq!(mode(&settings.dir), 0o700);
        }
        assert_eq!(metrics.recordings.written.load(Relaxed), 1);
        assert_eq!(
            metrics.recordings.bytes_written.load(Relaxed),
            file.len() as u64
        );

        let decoded = decode(&file).unwrap();
        assert_eq!((decoded.channels, decoded.input_rate), (2, 8_000));
        assert!(decoded.pre_skip > 0);
        assert!(
            decoded.vendor.starts_with("voxrelay "),
            "{}",
            decoded.vendor
        );
        let tag = |key: &str| {
            decoded
                .tags
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(tag("CALL_SID"), Some("CAtest01"));
        assert_eq!(tag("STREAM_SID"), Some("MZtest01"));
        assert_eq!(tag("TENANT"), Some("bistro"));
        assert_eq!(tag("AGENT"), Some("Luna"));
        assert_eq!(tag("PROVIDER"), Some("openai"));
        assert_eq!(tag("START_TIME"), Some("2026-12-07T04:43:29Z"));
        assert_eq!(decoded.caller.len(), 24_000);
        assert_eq!(decoded.agent.len(), 24_000);

        // The caller's tone on channel 1 from 200 ms, alone; the agent's on channel 2 from
        // 500 ms (1.5 s - 1 s) to the cut at 1300 ms, each within a frame.
        let (caller_on, caller_off) = extent(&decoded.caller, 1_000.0).unwrap();
        assert!(caller_on.abs_diff(200) <= 20, "caller from {caller_on} ms");
        assert!(caller_off >= 2_980, "caller to {caller_off} ms");
        let (agent_on, agent_off) = extent(&decoded.agent, 1_000.0).unwrap();
        assert!(agent_on.abs_diff(500) <= 20, "agent from {agent_on} ms");
        assert!(
            agent_off.abs_diff(1_300) <= 20,
            "agent cut at {agent_off} ms"
        );
        let caller_speech = &decoded.caller[4_000..20_000];
        assert!(power(caller_speech, 440.0) > 100.0 * power(caller_speech, 1_000.0));
        let agent_speech = &decoded.agent[4_800..9_600];
        assert!(power(agent_speech, 1_000.0) > 100.0 * power(agent_speech, 440.0));
    }

    #[tokio::test]
    async fn an_unwritable_directory_fails_the_recording_not_the_call() {
        let dir = TempDir::new("unwritable");
        std::fs::create_dir_all(&dir.0).unwrap();
        // A file where the directory should be: no user, root included, can write under it.
        let blocked = dir.0.join("not-a-dir");
        std::fs::write(&blocked, b"x").unwrap();
        let settings = RecordingSettings {
            record_by_default: true,
            dir: blocked.join("calls"),
        };
        let metrics = Arc::new(Metrics::default());
        let (mut tap, handle) = start(&settings, metadata(), Arc::clone(&metrics)).unwrap();
        for n in 0..500u64 {
            // Never blocks, whatever the writer did.
            tap.caller_audio(Duration::from_millis(n * 20), &[0xff; 160]);
        }
        let report = handle.finish().await;
        let ReportRecording::Failed { error } = &report else {
            panic!("{report:?}");
        };
        assert!(error.starts_with("unwritable_dir: "), "{error}");
        assert_eq!(metrics.recordings.failures(FailureKind::UnwritableDir), 1);
        assert_eq!(metrics.recordings.written.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn a_full_queue_drops_frames_and_counts_them_and_the_file_is_still_whole() {
        let dir = TempDir::new("full");
        let settings = RecordingSettings {
            record_by_default: true,
            dir: dir.0.clone(),
        };
        let metrics = Arc::new(Metrics::default());
        let (mut tap, handle) = start(&settings, metadata(), Arc::clone(&metrics)).unwrap();
        // Far more than the queue holds, at once: some are dropped, none waited for.
        for n in 0..(QUEUE_EVENTS as u64 * 8) {
            tap.caller_audio(Duration::from_millis(n * 20), &[0xff; 160]);
        }
        let report = handle.finish().await;
        let ReportRecording::Written {
            frames_dropped,
            path,
            ..
        } = report
        else {
            panic!("{report:?}");
        };
        assert_eq!(
            metrics.recordings.frames_dropped.load(Relaxed),
            frames_dropped
        );
        assert!(decode(&std::fs::read(path).unwrap()).is_ok());
        // A second recording of the same call gets a name of its own.
        let (_tap, handle) = start(&settings, metadata(), Arc::clone(&metrics)).unwrap();
        let ReportRecording::Written { path, .. } = handle.finish().await else {
            panic!("second recording failed");
        };
        assert!(path.ends_with("CAtest01-1.opus"), "{path}");
    }

    fn hex_of(bytes: &[u8]) -> String {
        let mut out = String::new();
        voxrelay_core::lowerhex::push(&mut out, bytes);
        out
    }
}
