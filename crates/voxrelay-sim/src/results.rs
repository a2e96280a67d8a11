//! What a benchmark run measured, in the shape `--json FILE` writes and the HTML report reads.
//!
//! Top-level keys are an interface others script against: `calls`, `seconds`, `audio_mode`,
//! `uplink_us`, `downlink_us`, `barge_in_us`, `setup_us` (each `{p50, p90, p99, max, count}`,
//! in microseconds), `late_frames`, `lost_frames`, `errors`, `bridge_cpu_ms_per_call_second`,
//! `bridge_rss_kib_per_call`, `load_cpu_utilisation`. Add keys; never rename these. A
//! `--baseline` run adds `floor` (the baseline relay's result, same shape) and `ratios`; with
//! `--floor-driver tokio,uring` the later floors follow as `other_floors` with
//! `other_floor_ratios` (each ÷ `floor`), and every floor names its `floor_driver`. A
//! `--model-faults` run adds `model_faults`. Every result (floors, other providers, ramp
//! results alike) names its `provider` (`openai` or `gemini`; a floor relays OpenAI's
//! protocol); a Gemini result's `audio_mode` is `gemini`, as Gemini has no mode to choose.
//! With `--provider openai,gemini` the providers after the first follow as `other_providers`
//! (same shape, each with its own `ratios` to `floor` with `--baseline`).

use std::time::Instant;

use serde::{Deserialize, Serialize};

/// The run's shared clock: every timestamp in the harness, the simulated callers and the
/// echo model is microseconds since this instant, so latencies are plain subtractions.
#[derive(Clone, Copy, Debug)]
pub struct Epoch(pub Instant);

impl Epoch {
    pub fn now() -> Self {
        Self(Instant::now())
    }

    /// Microseconds from the epoch to now.
    pub fn us(&self) -> u64 {
        self.0.elapsed().as_micros() as u64
    }
}

/// Percentiles of one latency distribution, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub count: u64,
}

impl Percentiles {
    /// Exact percentiles (nearest rank) of `values`, which this sorts.
    pub fn of(values: &mut [f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        values.sort_by(f64::total_cmp);
        let rank = |q: f64| {
            let index = ((values.len() as f64) * q).ceil() as usize;
            values[index.clamp(1, values.len()) - 1]
        };
        Self {
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: values[values.len() - 1],
            count: values.len() as u64,
        }
    }
}

/// The machine a run happened on.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub date_utc: String,
}

/// One step of a `--ramp` run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RampStep {
    pub calls: usize,
    pub uplink_us: Percentiles,
    pub downlink_us: Percentiles,
    pub late_frames: u64,
    pub errors: u64,
    /// Whether this step stayed within the latency budget with no late or lost frames and no
    /// errors.
    pub held: bool,
    #[serde(default)]
    pub lost_frames: u64,
    #[serde(default)]
    pub cpu_ms_per_call_second: Option<f64>,
    #[serde(default)]
    pub rss_kib_per_call: Option<f64>,
}

/// The bridge against the floor of the same run (`--baseline`), each ratio bridge ÷ floor.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ratios {
    /// Held call counts (`--ramp`): the bridge's largest ÷ the floor's.
    pub capacity: Option<f64>,
    /// CPU per call-second at `calls`.
    pub cpu_per_call_second: Option<f64>,
    /// The call count both are compared at: with `--ramp` the largest both held; otherwise the
    /// run's.
    pub calls: Option<usize>,
}

/// One batch of a `--soak-minutes` run: the bridge's footprint while the batch's calls were
/// up (sampled halfway through), and again once they had all ended.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SoakSample {
    /// Minutes since the soak began, at the end of the batch.
    pub minute: f64,
    pub calls: usize,
    pub rss_kib_busy: Option<u64>,
    pub fds_busy: Option<u64>,
    pub rss_kib_idle: Option<u64>,
    pub fds_idle: Option<u64>,
    pub uplink_p99_us: f64,
    pub downlink_p99_us: f64,
    pub errors: u64,
}

/// Latency samples kept for plots (a bounded, evenly spaced subset of all measurements).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Samples {
    pub uplink_us: Vec<f64>,
    pub downlink_us: Vec<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BenchResult {
    pub calls: usize,
    pub seconds: f64,
    /// `pcmu` or `pcm16` (OpenAI), or `gemini`.
    pub audio_mode: String,
    /// The bridge's model API: `openai` or `gemini` (a floor: `openai`, whose protocol it
    /// relays). Runs from before Gemini read as `openai`.
    #[serde(default = "openai")]
    pub provider: String,
    /// `child` (a `voxrelay serve` process started by the harness), `in-process`, or the URL
    /// given with `--target`.
    pub target: String,
    /// The built-in do-nothing relay was measured instead of the bridge.
    pub baseline: bool,
    pub uplink_us: Percentiles,
    pub downlink_us: Percentiles,
    pub barge_in_us: Percentiles,
    pub setup_us: Percentiles,
    /// Outbound (bridge → caller) frame jitter, RFC 3550's |D| per `media` message: how far
    /// its arrival spacing from the previous one strays from the audio the previous one
    /// carried, for messages of one generation (no `clear` between) arriving < 100 ms apart
    /// (a longer gap is a pause between responses, not jitter).
    #[serde(default)]
    pub outbound_jitter_us: Percentiles,
    /// Frames (either direction) whose added latency exceeded `late_threshold_ms`.
    pub late_frames: u64,
    pub late_threshold_ms: f64,
    /// Caller frames the model never received, and model frames the caller never received
    /// (neither cleared by a barge-in nor sent around the hang-up):
    /// `uplink_lost_frames + downlink_lost_frames`.
    pub lost_frames: u64,
    #[serde(default)]
    pub uplink_lost_frames: u64,
    #[serde(default)]
    pub downlink_lost_frames: u64,
    /// Model frames a barge-in cleared: the tail of a response the caller interrupted.
    #[serde(default)]
    pub barge_in_dropped_frames: u64,
    /// Model frames sent after the caller hung up, or so shortly before (within the late
    /// threshold) that they were still on their way.
    #[serde(default)]
    pub after_hangup_frames: u64,
    /// Frames that arrived more than once (either way; identified frames only).
    #[serde(default)]
    pub duplicate_frames: u64,
    /// Frames whose bytes arrived split across two messages (identified frames only).
    #[serde(default)]
    pub split_frames: u64,
    /// Frames that arrived on another call's socket (identified frames only).
    #[serde(default)]
    pub foreign_frames: u64,
    /// Audio bytes that carried no frame id where one was expected (identified frames only; in
    /// `pcm16` the resamplers' lead-in and each response's first partial frame among them).
    #[serde(default)]
    pub unidentified_bytes: u64,
    /// Calls the bridge hung up before the caller did (each also counts in `errors`).
    #[serde(default)]
    pub early_hangups: u64,
    /// Frames were counted by the ids they carry (both modes now; runs from before the tone
    /// ids joined `pcm16` frames by byte offset and say `false`).
    #[serde(default)]
    pub frames_identified: bool,
    /// Calls streaming, averaged over the window CPU was measured in.
    #[serde(default)]
    pub calls_up: f64,
    pub errors: u64,
    pub frames_sent: u64,
    pub frames_received: u64,
    pub bridge_cpu_ms_per_call_second: Option<f64>,
    pub bridge_rss_kib_per_call: Option<f64>,
    /// The bridge's resident memory and open file descriptors while every call was up.
    #[serde(default)]
    pub bridge_rss_kib_steady: Option<u64>,
    #[serde(default)]
    pub bridge_fds_steady: Option<u64>,
    /// The load process's CPU time over wall time (1.0 = one core busy).
    pub load_cpu_utilisation: f64,
    pub machine: Machine,
    pub samples: Samples,
    pub ramp: Vec<RampStep>,
    /// The largest call count of a `--ramp` run that held the budget.
    pub max_calls_held: Option<usize>,
    /// With `--soak-minutes`: one sample per batch, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub soak: Vec<SoakSample>,
    /// With `--baseline`: the same run against the do-nothing relay, the machine's floor.
    pub floor: Option<Box<BenchResult>>,
    /// With `--baseline`: bridge ÷ floor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratios: Option<Ratios>,
    /// A floor's result: its driver (`tokio` or `uring`, `--floor-driver`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor_driver: Option<String>,
    /// With `--floor-driver` naming more than one: the floors after the first (which is
    /// `floor`), measured interleaved in the same run, same shape.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_floors: Vec<BenchResult>,
    /// Each of `other_floors` ÷ `floor` (e.g. the io_uring floor ÷ the tokio floor), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_floor_ratios: Vec<Ratios>,
    /// With `--provider` naming more than one: the bridge on the providers after the first,
    /// measured interleaved in the same run, same shape.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_providers: Vec<BenchResult>,
    /// With `--model-faults`: the sessions the model dropped and what the callers went through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_faults: Option<ModelFaultResult>,
    /// The bridge's own turn timings (voice-to-voice and its parts), read from its `/metrics`
    /// after the calls; absent for a floor or a `--target` bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turns: Option<crate::turn_figures::TurnFigures>,
}

/// A `--model-faults` run: model sessions dropped at random times, and how the calls fared.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelFaultResult {
    /// The share of sessions told to drop.
    pub fraction: f64,
    /// Sessions that dropped.
    pub sessions_dropped: u64,
    /// Drops followed by a new session for the same call.
    pub sessions_replaced: u64,
    /// Calls that had a session dropped.
    pub calls_affected: u64,
    /// Calls that ended early or in error (the relay lost the call): 0 is the target.
    pub calls_lost: u64,
    /// From a drop to the new session's configuration, as the model saw it (µs).
    pub reconnect_gap_us: Percentiles,
    /// What the caller heard: the silence in the echo around each drop, from the last frame
    /// before it to the first after (µs; includes the echo's own delay).
    pub caller_gap_us: Percentiles,
    /// Calls whose caller heard a gap above 1 s.
    pub calls_with_gap_over_1s: u64,
    /// Caller frames a dropped session had received but not yet echoed: what went down with it
    /// (the caller's words the model never answered; its successor did not hear them either).
    pub frames_swallowed: u64,
}

/// The provider of a result that names none (written before Gemini was measured).
fn openai() -> String {
    "openai".to_owned()
}

impl BenchResult {
    /// Frames lost, doubled or delivered to the wrong call: any of them means the relay got a
    /// frame wrong. (A split frame is still whole audio: Twilio plays any chunking.)
    pub fn frame_faults(&self) -> u64 {
        self.lost_frames + self.duplicate_frames + self.foreign_frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut values: Vec<f64> = (1..=100).map(f64::from).collect();
        values.reverse();
        let p = Percentiles::of(&mut values);
        assert_eq!(
            (p.p50, p.p90, p.p99, p.max, p.count),
            (50.0, 90.0, 99.0, 100.0, 100)
        );
        assert_eq!(Percentiles::of(&mut []), Percentiles::default());
    }

    #[test]
    fn json_has_the_scripted_top_level_keys() {
        let value = serde_json::to_value(BenchResult::default()).unwrap();
        for key in [
            "calls",
            "seconds",
            "audio_mode",
            "provider",
            "uplink_us",
            "downlink_us",
            "barge_in_us",
            "setup_us",
            "late_frames",
            "lost_frames",
            "errors",
            "bridge_cpu_ms_per_call_second",
            "bridge_rss_kib_per_call",
            "load_cpu_utilisation",
        ] {
            assert!(value.get(key).is_some(), "missing {key}");
        }
        for key in ["p50", "p90", "p99", "max", "count"] {
            assert!(
                value["uplink_us"].get(key).is_some(),
                "missing uplink_us.{key}"
            );
        }
    }
}
