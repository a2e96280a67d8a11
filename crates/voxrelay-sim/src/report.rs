//! The HTML report of a benchmark run: what `voxrelay bench --report DIR` writes.
//!
//! This module owns turning one or more [`BenchResult`]s into a page an engineer can open
//! from disk or attach to an issue: `DIR/index.html` (a title with the date and machine, a
//! summary table of every top-level figure, a latency CDF and a latency-vs-calls plot) and
//! `DIR/result.json` (the same data, machine-readable). The page is self-contained on
//! purpose: the SVG plots are inline, the CSS is inline, there is no JavaScript and nothing
//! is fetched, so it renders the same from an attachment, an air-gapped machine or a CI
//! artifact. Plots are drawn with `plotters`' SVG backend, which needs no system libraries
//! or fonts (text is left to the viewer's browser).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::results::{BenchResult, Percentiles};

/// Plot size in SVG user units; CSS scales it down on narrow screens (the SVG has a viewBox).
const PLOT_SIZE: (u32, u32) = (860, 460);

/// At most this many points per CDF line: samples are already a bounded subset, but a few
/// thousand points per line would make the page heavy without making the curve any clearer.
const MAX_CDF_POINTS: usize = 1000;

/// Latencies below this are drawn at this value: a log axis cannot show zero, and a
/// sub-microsecond latency is a clock artefact rather than a measurement.
const MIN_PLOTTED_US: f64 = 1.0;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("writing the report: {0}")]
    Io(#[from] std::io::Error),
    #[error("drawing a plot: {0}")]
    Plot(String),
    #[error("serialising the results: {0}")]
    Json(#[from] serde_json::Error),
}

/// Writes DIR/index.html (self-contained: SVGs inline) and DIR/result.json; returns the html path.
/// `runs` usually has one run; with `--baseline` comparisons there are two (bridge and baseline), plotted together.
pub fn write_report(dir: &Path, runs: &[BenchResult]) -> Result<PathBuf, ReportError> {
    write_report_inner(dir, runs, None)
}

/// [`write_report`], with the command line that produced the runs shown on the page so a
/// reader can reproduce them.
pub fn write_report_with_command(
    dir: &Path,
    runs: &[BenchResult],
    command: &str,
) -> Result<PathBuf, ReportError> {
    write_report_inner(dir, runs, Some(command))
}

fn write_report_inner(
    dir: &Path,
    runs: &[BenchResult],
    command: Option<&str>,
) -> Result<PathBuf, ReportError> {
    // Render everything before touching the disk, so a plot error leaves no half-written
    // report behind.
    let html = render_html(runs, command)?;
    // One run is written in exactly the `--json FILE` shape, so scripts read either file
    // the same way; a comparison has no single object to write, so it is an array.
    let json = match runs {
        [only] => serde_json::to_string_pretty(only)?,
        _ => serde_json::to_string_pretty(runs)?,
    };
    std::fs::create_dir_all(dir)?;
    let html_path = dir.join("index.html");
    std::fs::write(&html_path, html)?;
    std::fs::write(dir.join("result.json"), json + "\n")?;
    Ok(html_path)
}

/// The SVG text of the latency CDF: x = latency µs (log scale), y = fraction of samples ≤ x,
/// one line per direction per run.
pub fn latency_cdf_svg(runs: &[BenchResult]) -> Result<String, ReportError> {
    let labels = run_labels(runs);
    let mut series = Vec::new();
    for (index, (run, label)) in runs.iter().zip(&labels).enumerate() {
        for (direction, values) in [
            (Direction::Uplink, &run.samples.uplink_us),
            (Direction::Downlink, &run.samples.downlink_us),
        ] {
            series.push(Series {
                label: format!("{label} {}", direction.name()),
                style: series_style(index, direction),
                dashed: run.baseline,
                points: cdf_points(values),
            });
        }
    }
    let finite = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let Some((lo, hi)) = min_max(finite) else {
        return no_data_svg("Latency CDF");
    };
    // Pad the log range by a factor each side so the extreme samples are not on the frame,
    // and so a run whose samples are all equal still gets a non-empty axis.
    let x_range = (lo / 1.25).max(MIN_PLOTTED_US / 1.25)..(hi * 1.25);

    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Latency CDF", ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d(
                // Our own ticks: plotters' log axis labels only whole decades and their
                // multiples, which leaves a sub-decade range like 300–900 µs unlabelled.
                x_range
                    .clone()
                    .log_scale()
                    .with_key_points(log_ticks(&x_range, &[1.0, 2.0, 5.0]))
                    .with_light_points(log_ticks(&x_range, &[3.0, 4.0, 6.0, 7.0, 8.0, 9.0])),
                0.0..1.0,
            )
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("added latency (log scale)")
            .y_desc("fraction of frames ≤ latency")
            .x_label_formatter(&|v| format_us_tick(*v))
            .y_label_formatter(&|v| format!("{v:.1}"))
            .draw()
            .map_err(plot_err)?;
        for s in series {
            draw_series(&mut chart, s)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(buf)
}

/// The SVG text of p99 latency against concurrent calls: one line per direction per run
/// from its `--ramp` steps, or a single (calls, p99) point for a run without a ramp.
pub fn latency_vs_calls_svg(runs: &[BenchResult]) -> Result<String, ReportError> {
    let labels = run_labels(runs);
    let mut series = Vec::new();
    for (index, (run, label)) in runs.iter().zip(&labels).enumerate() {
        for direction in [Direction::Uplink, Direction::Downlink] {
            let pick = |p_up: &Percentiles, p_down: &Percentiles| match direction {
                Direction::Uplink => p_up.clone(),
                Direction::Downlink => p_down.clone(),
            };
            let mut points: Vec<(f64, f64)> = if run.ramp.is_empty() {
                vec![(run.calls as f64, pick(&run.uplink_us, &run.downlink_us))]
            } else {
                run.ramp
                    .iter()
                    .map(|step| (step.calls as f64, pick(&step.uplink_us, &step.downlink_us)))
                    .collect()
            }
            .into_iter()
            // A step with no measurements has a p99 of 0 that means "unknown", not "fast".
            .filter(|(_, p)| p.count > 0 && p.p99.is_finite())
            .map(|(calls, p)| (calls, p.p99))
            .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            series.push(Series {
                label: format!("{label} {} p99", direction.name()),
                style: series_style(index, direction),
                dashed: run.baseline,
                points,
            });
        }
    }
    let all = || series.iter().flat_map(|s| s.points.iter());
    let (Some((_, max_calls)), Some((_, max_p99))) =
        (min_max(all().map(|p| p.0)), min_max(all().map(|p| p.1)))
    else {
        return no_data_svg("p99 latency vs concurrent calls");
    };
    // Both axes start at zero: the point of this plot is how latency grows with load, and
    // a zero-based axis keeps a small rise from looking like a cliff.
    let x_range = 0.0..(max_calls * 1.1).max(1.0);
    let y_range = 0.0..(max_p99 * 1.15).max(1.0);

    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("p99 latency vs concurrent calls", ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .build_cartesian_2d(x_range, y_range)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("concurrent calls")
            .y_desc("p99 added latency")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format_us_tick(*v))
            .draw()
            .map_err(plot_err)?;
        for s in series {
            let style = s.style;
            // Points as well as lines: a run without a ramp is a single point, which a
            // line alone would not show.
            chart
                .draw_series(PointSeries::of_element(
                    s.points.clone(),
                    4,
                    style.filled(),
                    &|coord, size, style| Circle::new(coord, size, style),
                ))
                .map_err(plot_err)?;
            draw_series(&mut chart, s)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(buf)
}

#[derive(Clone, Copy)]
enum Direction {
    Uplink,
    Downlink,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Uplink => "uplink",
            Direction::Downlink => "downlink",
        }
    }
}

/// One line of a plot, prepared before drawing so axis ranges can be computed from all of them.
struct Series {
    label: String,
    style: ShapeStyle,
    /// Baseline runs are dashed, so a comparison reads without relying on colour alone.
    dashed: bool,
    points: Vec<(f64, f64)>,
}

/// Draws one line and registers its legend entry. An empty line is still labelled, with
/// "(no data)", so a missing direction is visible rather than silently absent.
fn draw_series<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    s: Series,
) -> Result<(), ReportError>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let label = if s.points.is_empty() {
        format!("{} (no data)", s.label)
    } else {
        s.label
    };
    let style = s.style;
    let dashed = s.dashed;
    let annotation = if dashed {
        chart
            .draw_series(DashedLineSeries::new(s.points, 8, 5, style))
            .map_err(plot_err)?
    } else {
        chart
            .draw_series(LineSeries::new(s.points, style))
            .map_err(plot_err)?
    };
    annotation.label(label).legend(move |(x, y)| {
        let end = if dashed { x + 8 } else { x + 20 };
        PathElement::new(vec![(x, y), (end, y)], style)
    });
    Ok(())
}

/// A plot frame with its caption and "no data" in the middle, for runs without samples.
fn no_data_svg(caption: &str) -> Result<String, ReportError> {
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let root = root.titled(caption, ("sans-serif", 22)).map_err(plot_err)?;
        let (width, height) = root.dim_in_pixel();
        let grey = BLACK.mix(0.6);
        let style = TextStyle::from(("sans-serif", 26).into_font())
            .color(&grey)
            .pos(Pos::new(HPos::Center, VPos::Center));
        root.draw(&Text::new(
            "no data",
            (width as i32 / 2, height as i32 / 2),
            style,
        ))
        .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(buf)
}

fn plot_err(error: impl std::fmt::Display) -> ReportError {
    ReportError::Plot(error.to_string())
}

/// "bridge" (on Gemini: "bridge gemini") or "baseline" per run; numbered when two runs would
/// otherwise share a name.
fn run_labels(runs: &[BenchResult]) -> Vec<String> {
    let base = |run: &BenchResult| match (run.baseline, run.provider.as_str()) {
        (true, _) => "baseline",
        (false, "gemini") => "bridge gemini",
        (false, _) => "bridge",
    };
    runs.iter()
        .enumerate()
        .map(|(index, run)| {
            let name = base(run);
            if runs.iter().filter(|r| base(r) == name).count() > 1 {
                format!("{name} {}", index + 1)
            } else {
                name.to_owned()
            }
        })
        .collect()
}

/// Colour per run and direction: uplink in blues, downlink in reds/oranges, so the same
/// direction of two runs looks related.
fn series_style(run_index: usize, direction: Direction) -> ShapeStyle {
    const UPLINK: [RGBColor; 3] = [
        RGBColor(31, 119, 180),
        RGBColor(23, 170, 190),
        RGBColor(100, 80, 180),
    ];
    const DOWNLINK: [RGBColor; 3] = [
        RGBColor(214, 39, 40),
        RGBColor(240, 130, 10),
        RGBColor(170, 60, 120),
    ];
    let palette = match direction {
        Direction::Uplink => &UPLINK,
        Direction::Downlink => &DOWNLINK,
    };
    palette[run_index % palette.len()].stroke_width(2)
}

/// Empirical CDF points (latency, fraction ≤ latency), at most [`MAX_CDF_POINTS`] of them,
/// always including the first and last sample so the tails are drawn.
fn cdf_points(values: &[f64]) -> Vec<(f64, f64)> {
    let mut sorted: Vec<f64> = values
        .iter()
        .filter(|v| !v.is_nan())
        .map(|v| v.max(MIN_PLOTTED_US))
        .collect();
    sorted.sort_by(f64::total_cmp);
    // An infinite latency has no place on an axis, but it still counts in the denominator:
    // dropping it would overstate the fraction of fast frames.
    let n = sorted.len();
    let finite = sorted.iter().take_while(|v| v.is_finite()).count();
    if finite == 0 {
        return Vec::new();
    }
    let point = |i: usize| (sorted[i], (i + 1) as f64 / n as f64);
    if finite <= MAX_CDF_POINTS {
        return (0..finite).map(point).collect();
    }
    let last = finite - 1;
    (0..MAX_CDF_POINTS)
        .map(|k| point(k * last / (MAX_CDF_POINTS - 1)))
        .collect()
}

/// The values `m × 10^k` (for each mantissa `m`) inside `range`, ascending.
fn log_ticks(range: &std::ops::Range<f64>, mantissas: &[f64]) -> Vec<f64> {
    let mut ticks = Vec::new();
    if !(range.start > 0.0 && range.end.is_finite()) {
        return ticks;
    }
    let first = range.start.log10().floor() as i32;
    let last = range.end.log10().ceil() as i32;
    for exponent in first..=last {
        for &m in mantissas {
            let tick = m * 10f64.powi(exponent);
            if range.contains(&tick) {
                ticks.push(tick);
            }
        }
    }
    ticks
}

fn min_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .filter(|v| v.is_finite())
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
}

/// An axis tick in the unit a reader thinks in: 100 µs, 2.5 ms, 1.2 s.
fn format_us_tick(us: f64) -> String {
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        }
    };
    if us == 0.0 {
        "0".to_owned()
    } else if us.abs() >= 1_000_000.0 {
        format!("{} s", trim(format!("{:.2}", us / 1_000_000.0)))
    } else if us.abs() >= 1_000.0 {
        format!("{} ms", trim(format!("{:.2}", us / 1_000.0)))
    } else {
        format!("{} µs", trim(format!("{us:.1}")))
    }
}

/// Escapes text for HTML element content and double- or single-quoted attributes.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    voxrelay_core::twilio::twiml::push_escaped(&mut out, text);
    out
}

/// A number for the table: whole numbers without decimals, others to `decimals` places.
fn number(value: f64, decimals: usize) -> String {
    if value.is_finite() && value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        format!("{value:.decimals$}")
    }
}

fn optional(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "n/a".to_owned(), |v| number(v, decimals))
}

const CSS: &str = "\
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:60rem;\
padding:0 1rem;color:#222;line-height:1.4}\
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem}\
.sub{color:#555;margin-top:0}\
table{border-collapse:collapse;margin:.5rem 0}\
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}\
th:first-child,td:first-child{text-align:left}thead th{background:#f2f2f2}\
tbody tr:nth-child(even){background:#fafafa}\
pre{background:#f5f5f5;border:1px solid #ddd;padding:.6rem;overflow-x:auto;white-space:pre-wrap}\
figure{margin:1rem 0}svg{max-width:100%;height:auto;border:1px solid #eee}\
.fail{color:#b00020;font-weight:600}";

fn render_html(runs: &[BenchResult], command: Option<&str>) -> Result<String, ReportError> {
    let cdf = latency_cdf_svg(runs)?;
    let vs_calls = latency_vs_calls_svg(runs)?;
    let labels = run_labels(runs);
    let machine_line = machine_description(runs);
    let date = runs
        .iter()
        .map(|r| r.machine.date_utc.as_str())
        .find(|d| !d.is_empty())
        .unwrap_or("undated");

    let mut page = String::new();
    // `write!` into a String cannot fail; the results are ignored for that reason.
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>voxrelay bench — {date} — {machine}</title>\n<style>{CSS}</style>\n</head>\n<body>\n\
         <h1>voxrelay bench — {date}</h1>\n<p class=\"sub\">{machine}</p>\n",
        date = escape(date),
        machine = escape(&machine_line),
    );
    if let Some(command) = command {
        let _ = write!(page, "<h2>Command</h2>\n<pre>{}</pre>\n", escape(command));
    }
    if runs.is_empty() {
        page.push_str("<p>No runs were recorded.</p>\n");
    } else {
        summary_table(&mut page, runs, &labels);
        latency_table(&mut page, runs, &labels);
        ramp_tables(&mut page, runs, &labels);
    }
    let _ = write!(
        page,
        "<h2>Plots</h2>\n<figure>\n{cdf}</figure>\n<figure>\n{vs_calls}</figure>\n</body>\n</html>\n"
    );
    Ok(page)
}

/// "2 × Intel Xeon …" for each distinct machine among the runs.
fn machine_description(runs: &[BenchResult]) -> String {
    let mut machines: Vec<String> = Vec::new();
    for run in runs {
        let model = if run.machine.cpu_model.is_empty() {
            "unknown CPU"
        } else {
            run.machine.cpu_model.as_str()
        };
        let text = format!("{} CPUs × {model}", run.machine.cpus);
        if !machines.contains(&text) {
            machines.push(text);
        }
    }
    if machines.is_empty() {
        "unknown machine".to_owned()
    } else {
        machines.join("; ")
    }
}

/// One row per top-level figure, one column per run, so a comparison reads across.
fn summary_table(page: &mut String, runs: &[BenchResult], labels: &[String]) {
    let rows: Vec<(String, Vec<String>)> = vec![
        row("calls", runs, |r| r.calls.to_string()),
        row("seconds", runs, |r| number(r.seconds, 1)),
        row("provider", runs, |r| r.provider.clone()),
        row("audio mode", runs, |r| r.audio_mode.clone()),
        row("target", runs, |r| r.target.clone()),
        row("late frames", runs, |r| {
            format!(
                "{} (> {} ms)",
                r.late_frames,
                number(r.late_threshold_ms, 1)
            )
        }),
        row("lost frames", runs, |r| r.lost_frames.to_string()),
        row("errors", runs, |r| r.errors.to_string()),
        row("frames sent / received", runs, |r| {
            format!("{} / {}", r.frames_sent, r.frames_received)
        }),
        row("bridge CPU ms per call-second", runs, |r| {
            optional(r.bridge_cpu_ms_per_call_second, 2)
        }),
        row("bridge RSS KiB per call", runs, |r| {
            optional(r.bridge_rss_kib_per_call, 1)
        }),
        row("load CPU utilisation", runs, |r| {
            number(r.load_cpu_utilisation, 2)
        }),
        row("max calls held", runs, |r| {
            r.max_calls_held
                .map_or_else(|| "n/a".to_owned(), |c| c.to_string())
        }),
    ];
    page.push_str("<h2>Summary</h2>\n<table>\n<thead><tr><th>figure</th>");
    for label in labels {
        let _ = write!(page, "<th>{}</th>", escape(label));
    }
    page.push_str("</tr></thead>\n<tbody>\n");
    for (name, cells) in rows {
        let _ = write!(page, "<tr><td>{}</td>", escape(&name));
        for cell in cells {
            let _ = write!(page, "<td>{}</td>", escape(&cell));
        }
        page.push_str("</tr>\n");
    }
    page.push_str("</tbody>\n</table>\n");
}

fn row(
    name: &str,
    runs: &[BenchResult],
    cell: impl Fn(&BenchResult) -> String,
) -> (String, Vec<String>) {
    (name.to_owned(), runs.iter().map(cell).collect())
}

/// Percentiles of every latency distribution, in µs as in the JSON keys.
fn latency_table(page: &mut String, runs: &[BenchResult], labels: &[String]) {
    page.push_str(
        "<h2>Latency (µs)</h2>\n<table>\n<thead><tr><th>run</th><th>measure</th>\
         <th>p50</th><th>p90</th><th>p99</th><th>max</th><th>count</th></tr></thead>\n<tbody>\n",
    );
    for (run, label) in runs.iter().zip(labels) {
        for (measure, p) in [
            ("uplink", &run.uplink_us),
            ("downlink", &run.downlink_us),
            ("barge-in", &run.barge_in_us),
            ("setup", &run.setup_us),
        ] {
            let _ = write!(page, "<tr><td>{}</td><td>{measure}</td>", escape(label));
            // Zero measurements give all-zero percentiles; show them as absent, not as 0 µs.
            for value in [p.p50, p.p90, p.p99, p.max] {
                let cell = if p.count == 0 {
                    "—".to_owned()
                } else {
                    number(value, 1)
                };
                let _ = write!(page, "<td>{}</td>", escape(&cell));
            }
            let _ = writeln!(page, "<td>{}</td></tr>", p.count);
        }
    }
    page.push_str("</tbody>\n</table>\n");
}

/// Each `--ramp` step of each run, with whether it held the budget.
fn ramp_tables(page: &mut String, runs: &[BenchResult], labels: &[String]) {
    for (run, label) in runs.iter().zip(labels) {
        if run.ramp.is_empty() {
            continue;
        }
        let _ = write!(
            page,
            "<h2>Ramp — {}</h2>\n<table>\n<thead><tr><th>calls</th><th>uplink p99 (µs)</th>\
             <th>downlink p99 (µs)</th><th>late frames</th><th>errors</th><th>held</th>\
             </tr></thead>\n<tbody>\n",
            escape(label)
        );
        for step in &run.ramp {
            let p99 = |p: &Percentiles| {
                if p.count == 0 {
                    "—".to_owned()
                } else {
                    number(p.p99, 1)
                }
            };
            let held = if step.held {
                "yes"
            } else {
                "<span class=\"fail\">no</span>"
            };
            let _ = writeln!(
                page,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{held}</td></tr>",
                step.calls,
                escape(&p99(&step.uplink_us)),
                escape(&p99(&step.downlink_us)),
                step.late_frames,
                step.errors,
            );
        }
        page.push_str("</tbody>\n</table>\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{Machine, RampStep, Samples};

    /// A deterministic spread of latencies around `centre` µs (an LCG, no randomness).
    fn samples(count: usize, centre: f64, seed: u64) -> Vec<f64> {
        let mut state = seed;
        (0..count)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let unit = (state >> 11) as f64 / (1u64 << 53) as f64;
                centre * (0.5 + 1.5 * unit * unit)
            })
            .collect()
    }

    fn percentiles(values: &[f64]) -> Percentiles {
        Percentiles::of(&mut values.to_vec())
    }

    fn synthetic(baseline: bool) -> BenchResult {
        let uplink = samples(300, 1_800.0, 1);
        let downlink = samples(400, 2_600.0, 2);
        let ramp = [10usize, 20, 40, 80]
            .iter()
            .enumerate()
            .map(|(i, &calls)| RampStep {
                calls,
                uplink_us: Percentiles {
                    p50: 1_000.0,
                    p90: 2_000.0,
                    p99: 3_000.0 + 1_000.0 * i as f64,
                    max: 9_000.0,
                    count: 500,
                },
                downlink_us: Percentiles {
                    p50: 1_500.0,
                    p90: 2_500.0,
                    p99: 4_000.0 + 2_000.0 * i as f64,
                    max: 12_000.0,
                    count: 500,
                },
                late_frames: i as u64,
                errors: 0,
                held: i < 3,
                ..RampStep::default()
            })
            .collect();
        BenchResult {
            calls: 40,
            seconds: 30.0,
            audio_mode: "echo-pcmu".to_owned(),
            target: "child <&> \"quoted\"".to_owned(),
            baseline,
            uplink_us: percentiles(&uplink),
            downlink_us: percentiles(&downlink),
            outbound_jitter_us: Percentiles::default(),
            barge_in_us: Percentiles {
                p50: 41_000.0,
                p90: 52_000.0,
                p99: 61_234.0,
                max: 70_001.0,
                count: 37,
            },
            setup_us: Percentiles {
                p50: 9_876.0,
                p90: 11_000.0,
                p99: 12_345.0,
                max: 13_579.0,
                count: 40,
            },
            late_frames: 17,
            late_threshold_ms: 40.0,
            lost_frames: 3,
            errors: 2,
            frames_sent: 60_000,
            frames_received: 59_997,
            bridge_cpu_ms_per_call_second: Some(1.23),
            bridge_rss_kib_per_call: Some(456.7),
            bridge_rss_kib_steady: None,
            bridge_fds_steady: None,
            soak: Vec::new(),
            load_cpu_utilisation: 0.42,
            machine: Machine {
                cpus: 2,
                cpu_model: "Test CPU <v1>".to_owned(),
                date_utc: "2025-01-02T03:04:05Z".to_owned(),
            },
            samples: Samples {
                uplink_us: uplink,
                downlink_us: downlink,
            },
            ramp,
            max_calls_held: Some(40),
            floor: None,
            ..BenchResult::default()
        }
    }

    fn assert_svg(svg: &str) {
        assert!(
            svg.starts_with("<svg"),
            "not an SVG: {}",
            &svg[..svg.len().min(80)]
        );
        assert!(svg.trim_end().ends_with("</svg>"), "SVG not closed");
        assert!(
            svg.contains("<polyline") || svg.contains("<path"),
            "SVG has no lines"
        );
    }

    /// A fresh directory under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            Self(std::env::temp_dir().join(format!(
                "voxrelay-report-{name}-{}-{nanos}",
                std::process::id()
            )))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn cdf_plots_every_direction_of_every_run() {
        let svg = latency_cdf_svg(&[synthetic(false), synthetic(true)]).unwrap();
        assert_svg(&svg);
        for label in [
            "bridge uplink",
            "bridge downlink",
            "baseline uplink",
            "baseline downlink",
        ] {
            assert!(svg.contains(label), "missing series {label}");
        }
        assert!(!svg.contains("no data"));
    }

    #[test]
    fn cdf_points_are_monotonic_fractions_ending_at_one() {
        let points = cdf_points(&samples(5_000, 2_000.0, 7));
        assert_eq!(points.len(), MAX_CDF_POINTS);
        assert!(
            points
                .windows(2)
                .all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1)
        );
        assert_eq!(points.last().unwrap().1, 1.0);
        // Zero and NaN do not break the log axis; an infinite latency counts but is not drawn.
        let points = cdf_points(&[0.0, f64::NAN, 10.0, f64::INFINITY]);
        assert_eq!(points, vec![(1.0, 1.0 / 3.0), (10.0, 2.0 / 3.0)]);
    }

    #[test]
    fn latency_vs_calls_plots_ramp_steps_and_single_points() {
        let svg = latency_vs_calls_svg(&[synthetic(false)]).unwrap();
        assert_svg(&svg);
        assert!(svg.contains("bridge uplink p99"));
        assert!(svg.contains("bridge downlink p99"));
        // One marker per ramp step per direction.
        assert!(svg.matches("<circle").count() >= 8, "{svg}");

        let mut no_ramp = synthetic(true);
        no_ramp.ramp.clear();
        let svg = latency_vs_calls_svg(&[synthetic(false), no_ramp]).unwrap();
        assert_svg(&svg);
        assert!(svg.contains("baseline uplink p99"));
        assert!(svg.matches("<circle").count() >= 10);
    }

    #[test]
    fn empty_results_say_no_data_instead_of_panicking() {
        let empty = BenchResult::default();
        for svg in [
            latency_cdf_svg(std::slice::from_ref(&empty)).unwrap(),
            latency_vs_calls_svg(std::slice::from_ref(&empty)).unwrap(),
            latency_cdf_svg(&[]).unwrap(),
            latency_vs_calls_svg(&[]).unwrap(),
        ] {
            assert!(svg.starts_with("<svg"));
            assert!(svg.contains("no data"), "{svg}");
        }
        // One direction missing: the other is drawn, the missing one is labelled.
        let mut half = synthetic(false);
        half.samples.downlink_us.clear();
        let svg = latency_cdf_svg(&[half]).unwrap();
        assert_svg(&svg);
        assert!(svg.contains("bridge downlink (no data)"));
        let html = render_html(&[BenchResult::default()], None).unwrap();
        assert!(html.contains("no data"));
    }

    #[test]
    fn page_has_the_table_values_and_both_plots() {
        let html = render_html(&[synthetic(false)], Some("voxrelay bench --calls 40 <x>")).unwrap();
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("2025-01-02T03:04:05Z"));
        assert!(html.contains("Test CPU &lt;v1&gt;"));
        assert!(html.contains("child &lt;&amp;&gt; &quot;quoted&quot;"));
        assert!(!html.contains("<&>"), "unescaped target");
        assert!(html.contains("voxrelay bench --calls 40 &lt;x&gt;"));
        for value in [
            "<tr><td>calls</td><td>40</td></tr>",
            "<tr><td>seconds</td><td>30</td></tr>",
            "<tr><td>audio mode</td><td>echo-pcmu</td></tr>",
            "<tr><td>late frames</td><td>17 (&gt; 40 ms)</td></tr>",
            "<tr><td>lost frames</td><td>3</td></tr>",
            "<tr><td>errors</td><td>2</td></tr>",
            "<td>60000 / 59997</td>",
            "<tr><td>bridge CPU ms per call-second</td><td>1.23</td></tr>",
            "<tr><td>bridge RSS KiB per call</td><td>456.7</td></tr>",
            "<tr><td>load CPU utilisation</td><td>0.42</td></tr>",
            "<tr><td>max calls held</td><td>40</td></tr>",
            "<td>61234</td>",
            "<td>70001</td>",
            "<td>9876</td>",
            "<td>12345</td>",
        ] {
            assert!(html.contains(value), "missing {value}");
        }
        let up = &synthetic(false).uplink_us;
        for v in [up.p50, up.p90, up.p99, up.max] {
            assert!(html.contains(&format!("<td>{}</td>", number(v, 1))));
        }
        assert!(html.contains("bridge uplink") && html.contains("bridge downlink p99"));
        assert!(html.contains("Latency CDF"));
        assert!(html.contains("p99 latency vs concurrent calls"));
        assert_eq!(html.matches("<svg").count(), 2);
        assert_eq!(html.matches("</svg>").count(), 2);
        assert!(!html.contains("<script"));
        // Nothing is fetched: no scripts, stylesheets or images by reference (the only
        // URLs are the SVG namespaces, which are names, not fetches).
        for attribute in ["src=", "href=", "@import", "url("] {
            assert!(!html.contains(attribute), "page references {attribute}");
        }
        // The failing ramp step is marked.
        assert!(html.contains("<span class=\"fail\">no</span>"));
    }

    #[test]
    fn missing_optional_figures_read_as_not_available() {
        let mut run = synthetic(false);
        run.bridge_cpu_ms_per_call_second = None;
        run.bridge_rss_kib_per_call = None;
        run.max_calls_held = None;
        run.barge_in_us = Percentiles::default();
        let html = render_html(&[run], None).unwrap();
        assert!(html.matches("<td>n/a</td>").count() >= 3);
        assert!(html.contains("<td>barge-in</td><td>—</td>"));
        assert!(!html.contains("<h2>Command</h2>"));
    }

    #[test]
    fn write_report_creates_the_page_and_the_json() {
        let dir = TempDir::new("one");
        let path = write_report(&dir.0.join("nested"), &[synthetic(false)]).unwrap();
        assert_eq!(path, dir.0.join("nested").join("index.html"));
        let html = std::fs::read_to_string(&path).unwrap();
        assert_eq!(html.matches("<svg").count(), 2);
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.0.join("nested/result.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(json["calls"], 40);
        assert_eq!(json["setup_us"]["p99"], 12_345.0);

        let dir = TempDir::new("two");
        let path = write_report_with_command(
            &dir.0,
            &[synthetic(false), synthetic(true)],
            "bench --baseline",
        )
        .unwrap();
        assert!(
            std::fs::read_to_string(path)
                .unwrap()
                .contains("bench --baseline")
        );
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.0.join("result.json")).unwrap())
                .unwrap();
        assert_eq!(json.as_array().map(Vec::len), Some(2));
        assert_eq!(json[1]["baseline"], true);
    }

    /// Writes a sample report for looking at by eye: `VOXRELAY_REPORT_SAMPLE=DIR cargo test
    /// -p voxrelay-sim --lib report -- --ignored`.
    #[test]
    #[ignore]
    fn write_sample_report() {
        let Some(dir) = std::env::var_os("VOXRELAY_REPORT_SAMPLE") else {
            return;
        };
        let mut baseline = synthetic(true);
        for step in &mut baseline.ramp {
            step.uplink_us.p99 /= 3.0;
            step.downlink_us.p99 /= 3.0;
        }
        baseline.samples.uplink_us = samples(300, 600.0, 3);
        baseline.samples.downlink_us = samples(300, 700.0, 4);
        write_report_with_command(
            Path::new(&dir),
            &[synthetic(false), baseline],
            "voxrelay bench --calls 40 --baseline --report out",
        )
        .unwrap();
        write_report(&Path::new(&dir).join("empty"), &[BenchResult::default()]).unwrap();
    }

    #[test]
    fn run_labels_stay_distinct() {
        let labels = run_labels(&[synthetic(false), synthetic(false), synthetic(true)]);
        assert_eq!(labels, ["bridge 1", "bridge 2", "baseline"]);
        let gemini = BenchResult {
            provider: "gemini".to_owned(),
            ..synthetic(false)
        };
        let labels = run_labels(&[synthetic(false), gemini, synthetic(true)]);
        assert_eq!(labels, ["bridge", "bridge gemini", "baseline"]);
        assert_eq!(format_us_tick(100.0), "100 µs");
        assert_eq!(format_us_tick(2_500.0), "2.5 ms");
        assert_eq!(format_us_tick(1_000_000.0), "1 s");
        assert_eq!(
            log_ticks(&(300.0..2_500.0), &[1.0, 2.0, 5.0]),
            [500.0, 1_000.0, 2_000.0]
        );
    }
}
