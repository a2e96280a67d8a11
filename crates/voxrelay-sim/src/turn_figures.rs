//! The bridge's own turn timings, as `voxrelay bench` reports them: read from the bridge's
//! `/metrics` (the `voxrelay_voice_to_voice_seconds` histogram, its three parts and the
//! barge-in talk-over) once a step's calls have ended, summed over every tenant and provider
//! series.
//!
//! Counts and means are exact (the histograms carry their sums). Percentiles are exact too when
//! the bridge's `_recent` summaries cover the step (their last 4,096 turns: a fresh bridge per
//! step); otherwise they come from the buckets, interpolated linearly inside the bucket that
//! holds them, as Prometheus's `histogram_quantile` does (as fine as the buckets: 50 ms apart
//! from 200 ms to 700 ms). Talk-over has no summary. Because
//! every turn's parts add up to its voice-to-voice time, the parts' means add up to its mean:
//! that is what each part contributed.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use url::Url;

use super::http_client;

/// One turn histogram, summarised (milliseconds).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TurnSummary {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
}

/// A step's turns as the bridge timed them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TurnFigures {
    pub voice_to_voice_ms: TurnSummary,
    pub model_ms: TurnSummary,
    pub bridge_ms: TurnSummary,
    pub playout_ms: TurnSummary,
    pub talk_over_ms: TurnSummary,
}

/// The families read, in [`TurnFigures`] order.
/// The exact summaries of the first four, in order.
const RECENT: [&str; 4] = [
    "voxrelay_voice_to_voice_recent_seconds",
    "voxrelay_turn_model_recent_seconds",
    "voxrelay_turn_bridge_recent_seconds",
    "voxrelay_turn_playout_recent_seconds",
];

const FAMILIES: [&str; 5] = [
    "voxrelay_voice_to_voice_seconds",
    "voxrelay_turn_model_seconds",
    "voxrelay_turn_bridge_seconds",
    "voxrelay_turn_playout_seconds",
    "voxrelay_barge_in_talk_over_seconds",
];

impl TurnFigures {
    /// Reads the turn families out of a Prometheus text exposition.
    pub fn parse(exposition: &str) -> Self {
        let [
            mut voice_to_voice_ms,
            mut model_ms,
            mut bridge_ms,
            mut playout_ms,
            talk_over_ms,
        ] = FAMILIES.map(|family| summarise(exposition, family));
        for (summary, name) in [
            &mut voice_to_voice_ms,
            &mut model_ms,
            &mut bridge_ms,
            &mut playout_ms,
        ]
        .into_iter()
        .zip(RECENT)
        {
            // Exact when the summary saw every turn the histogram did.
            if gauge(exposition, &format!("{name}_count")) == Some(summary.count as f64)
                && let (Some(p50), Some(p99)) = (
                    gauge(exposition, &format!("{name}{{quantile=\"0.5\"}}")),
                    gauge(exposition, &format!("{name}{{quantile=\"0.99\"}}")),
                )
            {
                summary.p50 = p50 * 1e3;
                summary.p99 = p99 * 1e3;
            }
        }
        Self {
            voice_to_voice_ms,
            model_ms,
            bridge_ms,
            playout_ms,
            talk_over_ms,
        }
    }

    /// Fetches `/metrics` from the bridge's admin listener at `admin`, waiting (up to 5 s) for
    /// its calls to end so their turns are in; `None` if it never answered.
    pub async fn fetch(admin: std::net::SocketAddr) -> Option<Self> {
        let url = Url::parse(&format!("http://{admin}/metrics")).ok()?;
        let mut last = None;
        for _ in 0..50 {
            if let Ok(response) = http_client::send("GET", &url, &[], Vec::new()).await
                && response.status == 200
            {
                let text = response.body;
                let idle = gauge(&text, "voxrelay_calls_active") == Some(0.0);
                last = Some(text);
                if idle {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        last.map(|text| Self::parse(&text))
    }
}

fn gauge(exposition: &str, name: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// The family's series summed: buckets by bound, sums and counts.
fn summarise(exposition: &str, family: &str) -> TurnSummary {
    let mut buckets: BTreeMap<u64, f64> = BTreeMap::new();
    let mut sum = 0.0;
    let mut count = 0.0;
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix(family) else {
            continue;
        };
        let Some((series, value)) = rest.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        if series.starts_with("_bucket") {
            let Some(bound) = series
                .split("le=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
            else {
                continue;
            };
            // `+Inf` is the count again (and Rust would parse it as infinity).
            if bound == "+Inf" {
                continue;
            }
            if let Ok(seconds) = bound.parse::<f64>() {
                // Keyed in µs so bounds sort and sum exactly.
                *buckets.entry((seconds * 1e6).round() as u64).or_default() += value;
            }
        } else if series.starts_with("_sum") {
            sum += value;
        } else if series.starts_with("_count") {
            count += value;
        }
    }
    if count == 0.0 {
        return TurnSummary::default();
    }
    let quantile = |q: f64| {
        let rank = q * count;
        let mut lower_bound = 0.0;
        let mut below = 0.0;
        for (&bound_us, &cumulative) in &buckets {
            let bound = bound_us as f64 / 1e3;
            if cumulative >= rank {
                let in_bucket = cumulative - below;
                let share = if in_bucket > 0.0 {
                    (rank - below) / in_bucket
                } else {
                    1.0
                };
                return lower_bound + (bound - lower_bound) * share;
            }
            lower_bound = bound;
            below = cumulative;
        }
        // Beyond the last bucket: its bound is all that is known.
        lower_bound
    };
    TurnSummary {
        count: count as u64,
        mean: sum / count * 1e3,
        p50: quantile(0.5),
        p99: quantile(0.99),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPOSITION: &str = "\
# TYPE voxrelay_voice_to_voice_seconds histogram
voxrelay_voice_to_voice_seconds_bucket{tenant=\"-\",provider=\"openai\",le=\"0.5\"} 0
voxrelay_voice_to_voice_seconds_bucket{tenant=\"-\",provider=\"openai\",le=\"0.6\"} 2
voxrelay_voice_to_voice_seconds_bucket{tenant=\"-\",provider=\"openai\",le=\"0.7\"} 4
voxrelay_voice_to_voice_seconds_bucket{tenant=\"-\",provider=\"openai\",le=\"+Inf\"} 5
voxrelay_voice_to_voice_seconds_sum{tenant=\"-\",provider=\"openai\"} 22.4
voxrelay_voice_to_voice_seconds_count{tenant=\"-\",provider=\"openai\"} 5
voxrelay_voice_to_voice_seconds_bucket{tenant=\"a\",provider=\"gemini\",le=\"0.5\"} 0
voxrelay_voice_to_voice_seconds_bucket{tenant=\"a\",provider=\"gemini\",le=\"0.6\"} 0
voxrelay_voice_to_voice_seconds_bucket{tenant=\"a\",provider=\"gemini\",le=\"0.7\"} 4
voxrelay_voice_to_voice_seconds_bucket{tenant=\"a\",provider=\"gemini\",le=\"+Inf\"} 4
voxrelay_voice_to_voice_seconds_sum{tenant=\"a\",provider=\"gemini\"} 2.6
voxrelay_voice_to_voice_seconds_count{tenant=\"a\",provider=\"gemini\"} 4
voxrelay_calls_active 0
# TYPE voxrelay_turn_model_recent_seconds summary
voxrelay_turn_model_recent_seconds{quantile=\"0.5\"} 0.201
voxrelay_turn_model_recent_seconds{quantile=\"0.99\"} 0.2049
voxrelay_turn_model_recent_seconds_count 2
voxrelay_turn_model_seconds_bucket{tenant=\"-\",provider=\"openai\",le=\"0.2\"} 0
voxrelay_turn_model_seconds_bucket{tenant=\"-\",provider=\"openai\",le=\"0.25\"} 2
voxrelay_turn_model_seconds_sum{tenant=\"-\",provider=\"openai\"} 0.4059
voxrelay_turn_model_seconds_count{tenant=\"-\",provider=\"openai\"} 2
";

    #[test]
    fn series_are_summed_and_percentiles_interpolated_in_their_bucket() {
        let figures = TurnFigures::parse(EXPOSITION);
        let v2v = &figures.voice_to_voice_ms;
        assert_eq!(v2v.count, 9);
        assert!((v2v.mean - 25_000.0 / 9.0).abs() < 1e-9);
        // Two turns in (500, 600], six in (600, 700], one (20 s) beyond the last bucket: rank
        // 4.5 of 9 is 2.5 of the six.
        assert!(
            (v2v.p50 - (600.0 + 100.0 * 2.5 / 6.0)).abs() < 1e-9,
            "{v2v:?}"
        );
        // Rank 8.91 is beyond the buckets: their last bound is all that is known.
        assert!((v2v.p99 - 700.0).abs() < 1e-9, "{v2v:?}");
        // The model's part has an exact summary covering its two turns.
        let model = &figures.model_ms;
        assert_eq!(model.count, 2);
        assert!((model.p50 - 201.0).abs() < 1e-9, "{model:?}");
        assert!((model.p99 - 204.9).abs() < 1e-9, "{model:?}");
        assert_eq!(figures.bridge_ms, TurnSummary::default());
        assert_eq!(gauge(EXPOSITION, "voxrelay_calls_active"), Some(0.0));
    }
}
