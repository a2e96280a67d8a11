//! What callers waited for, per tenant and provider: the turn histograms of `/metrics`.
//!
//! Each ended call's turns ([`voxrelay_core::session::turns`]) are added once, at the call's
//! end, off the media path: `voxrelay_voice_to_voice_seconds`, its three parts
//! (`voxrelay_turn_model_seconds`, `voxrelay_turn_bridge_seconds`,
//! `voxrelay_turn_playout_seconds`) and `voxrelay_barge_in_talk_over_seconds`, each labelled
//! `tenant` and `provider`. Buckets are a turn's scale (10 ms to 10 s), not the media path's.
//!
//! Beside them, summaries with exact quantiles (0.5, 0.9, 0.99) of the last [`RECENT_TURNS`]
//! turns heard, all tenants together: `voxrelay_voice_to_voice_recent_seconds` and its parts'
//! `voxrelay_turn_{model,bridge,playout}_recent_seconds` (buckets cannot say whether a turn
//! of 201 ms is nearer 200 or 250; these can, for a benchmark or a dashboard's "now").
//!
//! Bounded: a tenant label is one of at most [`MAX_TENANT_SERIES`] tenants, later tenants are
//! counted under `tenant="other"` (a control plane with thousands of tenants must not grow the
//! exposition without bound); the fallback agent's calls are `tenant="-"`. A series is created
//! once (a map insert) and then only atomics are touched.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use dashmap::DashMap;
use voxrelay_core::Provider;
use voxrelay_core::session::turns::TurnTiming;

/// Tenants with series of their own; the rest share `other`.
pub const MAX_TENANT_SERIES: usize = 256;
/// The longest tenant label kept (longer ids are cut; tenant ids are the control plane's).
const MAX_TENANT_LABEL_BYTES: usize = 64;

/// Upper bounds of the turn buckets, in milliseconds.
/// 50 ms apart where voice agents answer (a fast one in 300 ms, a slow one in 1.5 s), so a
/// percentile read from them is within 25 ms or so.
const TURN_BUCKETS_MS: [u64; 30] = [
    10, 20, 30, 50, 75, 100, 150, 200, 250, 300, 350, 400, 450, 500, 550, 600, 650, 700, 800, 900,
    1_000, 1_100, 1_250, 1_500, 1_750, 2_000, 2_500, 3_000, 5_000, 10_000,
];

/// A lock-free histogram of turn durations.
#[derive(Default)]
pub struct TurnHistogram {
    buckets: [AtomicU64; TURN_BUCKETS_MS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl TurnHistogram {
    pub fn observe(&self, value: Duration) {
        let us = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        if let Some(index) = TURN_BUCKETS_MS
            .iter()
            .position(|&bound| us <= bound * 1_000)
        {
            self.buckets[index].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// The mean of what was observed (exact, unlike the buckets).
    pub fn mean(&self) -> Option<Duration> {
        let count = self.count();
        (count > 0).then(|| Duration::from_micros(self.sum_us.load(Relaxed) / count))
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bucket, &bound) in self.buckets.iter().zip(&TURN_BUCKETS_MS) {
            cumulative += bucket.load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{}\"}} {cumulative}",
                bound as f64 / 1e3
            );
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// One tenant's and provider's turns.
#[derive(Default)]
pub struct TurnSeries {
    pub voice_to_voice: TurnHistogram,
    pub model: TurnHistogram,
    pub bridge: TurnHistogram,
    pub playout: TurnHistogram,
    pub talk_over: TurnHistogram,
}

type Family = (
    &'static str,
    &'static str,
    fn(&TurnSeries) -> &TurnHistogram,
);

const FAMILIES: [Family; 5] = [
    (
        "voxrelay_voice_to_voice_seconds",
        "Caller speech end to the agent's reply heard (Twilio's mark), per turn.",
        |s| &s.voice_to_voice,
    ),
    (
        "voxrelay_turn_model_seconds",
        "Caller speech end to the model's first audio, per turn (turn detection and think time).",
        |s| &s.model,
    ),
    (
        "voxrelay_turn_bridge_seconds",
        "The model's first audio to its first chunk sent to Twilio, per turn.",
        |s| &s.bridge,
    ),
    (
        "voxrelay_turn_playout_seconds",
        "First chunk sent to Twilio to its playback start as Twilio's mark confirmed, per turn.",
        |s| &s.playout,
    ),
    (
        "voxrelay_barge_in_talk_over_seconds",
        "Caller speech start to the clear sent, per barge-in.",
        |s| &s.talk_over,
    ),
];

/// Turns whose exact figures are kept for the `_recent` summaries, newest replacing oldest.
pub const RECENT_TURNS: usize = 4_096;

/// The recent turns' exact figures (µs), every tenant and provider together: what the
/// `voxrelay_voice_to_voice_recent_seconds` summary and its parts' report as quantiles.
#[derive(Default)]
struct RecentTurns {
    /// `[voice_to_voice, model, bridge, playout]` of each turn that was heard.
    turns: std::collections::VecDeque<[u64; 4]>,
}

/// The turn histograms of every tenant and provider.
#[derive(Default)]
pub struct TurnMetrics {
    series: DashMap<(String, Provider), Arc<TurnSeries>>,
    /// Locked once per call at its end and once per scrape, never on the media path.
    recent: std::sync::Mutex<RecentTurns>,
}

impl TurnMetrics {
    /// Adds a call's turns. `tenant`: `None` for the fallback agent.
    pub fn record(&self, tenant: Option<&str>, provider: Provider, turns: &[TurnTiming]) {
        if turns.is_empty() {
            return;
        }
        let series = self.series_for(tenant, provider);
        {
            let mut recent = self
                .recent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let us = |value: Duration| u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
            for turn in turns {
                if let (Some(v2v), Some(model), Some(bridge), Some(playout)) =
                    (turn.voice_to_voice, turn.model, turn.bridge, turn.playout)
                {
                    if recent.turns.len() == RECENT_TURNS {
                        recent.turns.pop_front();
                    }
                    recent
                        .turns
                        .push_back([us(v2v), us(model), us(bridge), us(playout)]);
                }
            }
        }
        for turn in turns {
            let parts = [
                (turn.voice_to_voice, &series.voice_to_voice),
                (turn.model, &series.model),
                (turn.bridge, &series.bridge),
                (turn.playout, &series.playout),
                (
                    turn.barge_in.and_then(|barge_in| barge_in.talk_over),
                    &series.talk_over,
                ),
            ];
            for (value, histogram) in parts {
                if let Some(value) = value {
                    histogram.observe(value);
                }
            }
        }
    }

    /// The series of `tenant` and `provider`, if any turn was recorded for them.
    pub fn series(&self, tenant: &str, provider: Provider) -> Option<Arc<TurnSeries>> {
        self.series
            .get(&(tenant.to_owned(), provider))
            .map(|entry| Arc::clone(&entry))
    }

    fn series_for(&self, tenant: Option<&str>, provider: Provider) -> Arc<TurnSeries> {
        let label = tenant_label(tenant);
        if let Some(series) = self.series.get(&(label.clone(), provider)) {
            return Arc::clone(&series);
        }
        // Racing inserts may pass the cap by a few series; the bound still holds to within the
        // number of concurrent call ends.
        let tenants = self.series.len();
        let key = if tenants >= MAX_TENANT_SERIES * Provider::ALL.len() {
            ("other".to_owned(), provider)
        } else {
            (label, provider)
        };
        Arc::clone(&self.series.entry(key).or_default())
    }

    pub fn render(&self, out: &mut String) {
        let mut series: Vec<((String, Provider), Arc<TurnSeries>)> = self
            .series
            .iter()
            .map(|entry| (entry.key().clone(), Arc::clone(entry.value())))
            .collect();
        series.sort_by(|a, b| {
            (a.0.0.as_str(), a.0.1.as_str()).cmp(&(b.0.0.as_str(), b.0.1.as_str()))
        });
        for (name, help, field) in FAMILIES {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for ((tenant, provider), series) in &series {
                let labels = format!("tenant=\"{tenant}\",provider=\"{}\"", provider.as_str());
                field(series).render(out, name, &labels);
            }
        }
        self.render_recent(out);
    }

    /// Exact quantiles of the last [`RECENT_TURNS`] heard answers (summaries, all tenants).
    fn render_recent(&self, out: &mut String) {
        let recent: Vec<[u64; 4]> = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .turns
            .iter()
            .copied()
            .collect();
        const RECENT: [(&str, &str); 4] = [
            (
                "voxrelay_voice_to_voice_recent_seconds",
                "Voice-to-voice of the most recent turns heard (all tenants), exact quantiles.",
            ),
            (
                "voxrelay_turn_model_recent_seconds",
                "The model's part of the most recent turns heard, exact quantiles.",
            ),
            (
                "voxrelay_turn_bridge_recent_seconds",
                "The bridge's part of the most recent turns heard, exact quantiles.",
            ),
            (
                "voxrelay_turn_playout_recent_seconds",
                "The playout's part of the most recent turns heard, exact quantiles.",
            ),
        ];
        let mut values: Vec<u64> = Vec::with_capacity(recent.len());
        for (part, (name, help)) in RECENT.iter().enumerate() {
            values.clear();
            values.extend(recent.iter().map(|turn| turn[part]));
            values.sort_unstable();
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} summary");
            if !values.is_empty() {
                for quantile in ["0.5", "0.9", "0.99"] {
                    let q: f64 = quantile.parse().unwrap_or(0.5);
                    // Nearest rank.
                    let rank = ((values.len() as f64) * q).ceil() as usize;
                    let value = values[rank.clamp(1, values.len()) - 1];
                    let _ = writeln!(
                        out,
                        "{name}{{quantile=\"{quantile}\"}} {}",
                        value as f64 / 1e6
                    );
                }
            }
            let sum: u64 = values.iter().fold(0u64, |sum, v| sum.saturating_add(*v));
            let _ = writeln!(out, "{name}_sum {}", sum as f64 / 1e6);
            let _ = writeln!(out, "{name}_count {}", values.len());
        }
    }
}

/// A tenant id as a label value: cut, and only characters that need no escaping.
fn tenant_label(tenant: Option<&str>) -> String {
    let Some(tenant) = tenant else {
        return "-".to_owned();
    };
    tenant
        .chars()
        .take(MAX_TENANT_LABEL_BYTES)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '+') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use voxrelay_core::session::turns::{BargeInTiming, TurnCause};

    fn turn(v2v_ms: u64) -> TurnTiming {
        let ms = Duration::from_millis;
        TurnTiming {
            at: ms(0),
            cause: TurnCause::Caller,
            voice_to_voice: Some(ms(v2v_ms)),
            model: Some(ms(v2v_ms - 100)),
            detect: Some(ms(400)),
            bridge: Some(Duration::from_micros(300)),
            playout: Some(ms(99)),
            barge_in: Some(BargeInTiming {
                at: ms(0),
                talk_over: Some(ms(250)),
                heard_over_caller: Some(ms(200)),
            }),
        }
    }

    #[test]
    fn turns_render_per_tenant_and_provider_in_turn_sized_buckets() {
        let metrics = TurnMetrics::default();
        metrics.record(Some("acme"), Provider::OpenAi, &[turn(750), turn(950)]);
        metrics.record(None, Provider::Gemini, &[turn(650)]);
        let mut out = String::new();
        metrics.render(&mut out);
        assert!(out.contains(
            "voxrelay_voice_to_voice_seconds_bucket{tenant=\"acme\",provider=\"openai\",le=\"0.8\"} 1\n"
        ));
        assert!(out.contains(
            "voxrelay_voice_to_voice_seconds_bucket{tenant=\"acme\",provider=\"openai\",le=\"0.9\"} 1\n"
        ));
        assert!(out.contains(
            "voxrelay_voice_to_voice_seconds_bucket{tenant=\"acme\",provider=\"openai\",le=\"1\"} 2\n"
        ));
        assert!(out.contains(
            "voxrelay_voice_to_voice_seconds_count{tenant=\"-\",provider=\"gemini\"} 1\n"
        ));
        assert!(out.contains("voxrelay_turn_bridge_seconds_bucket{tenant=\"acme\",provider=\"openai\",le=\"0.01\"} 2\n"));
        assert!(out.contains(
            "voxrelay_barge_in_talk_over_seconds_count{tenant=\"acme\",provider=\"openai\"} 2\n"
        ));
        for (name, _, _) in FAMILIES {
            assert_eq!(out.matches(&format!("# TYPE {name} histogram")).count(), 1);
        }
        // The recent summaries: exact quantiles over all three turns (650, 750, 950 ms).
        assert!(out.contains("voxrelay_voice_to_voice_recent_seconds{quantile=\"0.5\"} 0.75\n"));
        assert!(out.contains("voxrelay_voice_to_voice_recent_seconds{quantile=\"0.99\"} 0.95\n"));
        assert!(out.contains("voxrelay_turn_bridge_recent_seconds{quantile=\"0.5\"} 0.0003\n"));
        assert!(out.contains("voxrelay_voice_to_voice_recent_seconds_count 3\n"));
    }

    #[test]
    fn tenant_series_are_capped_and_labels_need_no_escaping() {
        let metrics = TurnMetrics::default();
        for n in 0..MAX_TENANT_SERIES * 2 + 10 {
            metrics.record(Some(&format!("t{n}")), Provider::OpenAi, &[turn(800)]);
        }
        assert!(metrics.series.len() <= MAX_TENANT_SERIES * Provider::ALL.len() + 1);
        let recent = metrics.recent.lock().unwrap().turns.len();
        assert_eq!(recent, RECENT_TURNS.min(MAX_TENANT_SERIES * 2 + 10));
        let other = metrics
            .series("other", Provider::OpenAi)
            .expect("overflow series");
        assert!(other.voice_to_voice.count() > 0);
        assert_eq!(tenant_label(Some("a\"b\\c\nd")), "a_b_c_d");
    }
}
