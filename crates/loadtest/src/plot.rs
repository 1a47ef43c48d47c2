//! The report's plots, drawn by plotters into SVG text that the HTML page
//! carries inline (no script, no font file, nothing fetched).

use std::collections::BTreeSet;

use plotters::prelude::*;

use crate::recorder::TimelinePoint;
use crate::report::KindSummary;

const SIZE: (u32, u32) = (960, 440);

/// A plot that could not be drawn says so in the page rather than failing the run.
fn or_message(result: Result<(), String>, svg: String) -> String {
    match result {
        Ok(()) => svg,
        Err(e) => format!(
            "<p>(this plot could not be drawn: {})</p>",
            crate::report::escape(&e)
        ),
    }
}

fn colour(i: usize) -> RGBColor {
    const COLOURS: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(23, 190, 207),
    ];
    COLOURS[i % COLOURS.len()]
}

/// Bounds of a log-scaled latency axis that holds every value.
fn latency_bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut low, mut high) = (f64::MAX, 0.0f64);
    for v in values.filter(|v| *v > 0.0) {
        low = low.min(v);
        high = high.max(v);
    }
    if high == 0.0 {
        return (0.01, 1.0);
    }
    (low / 1.5, high * 1.5)
}

/// p50 (thin) and p99 (thick) of each kind, per second of the run.
pub fn latency_over_time(points: &[TimelinePoint]) -> String {
    let mut svg = String::new();
    let result = draw_over_time(&mut svg, points);
    or_message(result, svg)
}

fn draw_over_time(svg: &mut String, points: &[TimelinePoint]) -> Result<(), String> {
    let root = SVGBackend::with_string(svg, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let kinds: BTreeSet<&str> = points.iter().map(|p| p.kind.as_str()).collect();
    let last = points.iter().map(|p| p.second).max().unwrap_or(1).max(1);
    let (low, high) = latency_bounds(points.iter().flat_map(|p| [p.p50_ms, p.p99_ms]));
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "latency per second: p99 (thick) and p50 (thin)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0u64..last, (low..high).log_scale())
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("seconds since the start")
        .y_desc("ms (log scale)")
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, kind) in kinds.iter().enumerate() {
        let c = colour(i);
        let of_kind = || {
            points
                .iter()
                .filter(move |p| p.kind == *kind && p.count > 0)
        };
        chart
            .draw_series(LineSeries::new(
                of_kind().map(|p| (p.second, p.p99_ms.max(low))),
                c.stroke_width(3),
            ))
            .map_err(|e| e.to_string())?
            .label(format!("{kind} p99"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(3)));
        chart
            .draw_series(LineSeries::new(
                of_kind().map(|p| (p.second, p.p50_ms.max(low))),
                c.stroke_width(1),
            ))
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// The percentile's "nines": 90 -> 1, 99 -> 2, 99.9 -> 3 (100 is drawn at 6).
fn nines(percentile: f64) -> f64 {
    if percentile >= 100.0 {
        6.0
    } else {
        (-(1.0 - percentile / 100.0).log10()).min(6.0)
    }
}

/// Latency against percentile (log-spaced towards the tail) for each kind.
pub fn percentiles(kinds: &[KindSummary]) -> String {
    let mut svg = String::new();
    let result = draw_percentiles(&mut svg, kinds);
    or_message(result, svg)
}

fn draw_percentiles(svg: &mut String, kinds: &[KindSummary]) -> Result<(), String> {
    let root = SVGBackend::with_string(svg, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (low, high) = latency_bounds(
        kinds
            .iter()
            .flat_map(|k| k.percentiles.iter().map(|(_, ms)| *ms)),
    );
    let mut chart = ChartBuilder::on(&root)
        .caption("latency by percentile", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..6f64, (low..high).log_scale())
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("ms (log scale)")
        .x_labels(7)
        .x_label_formatter(&|x| {
            let p = 100.0 - 100.0 * 10f64.powf(-x);
            if *x >= 5.99 {
                "max".to_owned()
            } else {
                format!("{}", (p * 10_000.0).round() / 10_000.0)
            }
        })
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, k) in kinds.iter().enumerate() {
        let c = colour(i);
        chart
            .draw_series(LineSeries::new(
                k.percentiles.iter().map(|(p, ms)| (nines(*p), ms.max(low))),
                c.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(k.kind.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// One bar per (label, value), for the lab's and find-max's comparisons.
pub fn bars(title: &str, unit: &str, bars: &[(String, f64)]) -> String {
    let mut svg = String::new();
    let result = draw_bars(&mut svg, title, unit, bars);
    or_message(result, svg)
}

fn draw_bars(
    svg: &mut String,
    title: &str,
    unit: &str,
    bars: &[(String, f64)],
) -> Result<(), String> {
    let root = SVGBackend::with_string(svg, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let n = u32::try_from(bars.len().max(1)).unwrap_or(u32::MAX);
    let top = bars.iter().map(|(_, v)| *v).fold(0.0f64, f64::max).max(1.0) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(72)
        .build_cartesian_2d((0u32..n).into_segmented(), 0f64..top)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len().max(1))
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => bars
                .get(*i as usize)
                .map(|(l, _)| l.clone())
                .unwrap_or_default(),
            _ => String::new(),
        })
        .y_desc(unit)
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), *v),
                ],
                colour(i as usize).filled(),
            );
            bar.set_margin(0, 0, 12, 12);
            bar
        }))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}
