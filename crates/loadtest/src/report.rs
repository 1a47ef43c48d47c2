//! The report of a run: one value, written three ways (a terminal summary, JSON
//! and a self-contained HTML page with inline SVG plots), so the three always agree.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::client::kind;
use crate::recorder::{Snapshot, TimelinePoint};
use crate::run::{Load, Ran};
use crate::scenario::Scenario;

/// Latency figures of one request kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KindSummary {
    pub kind: String,
    pub count: u64,
    pub errors: u64,
    /// Errors by class: HTTP status code or `timeout`, `connect`, `transport`, `not_final`.
    pub error_classes: BTreeMap<String, u64>,
    /// Finished per second of the run.
    pub rate: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// (percentile, latency in ms) pairs for the percentile plot.
    pub percentiles: Vec<(f64, f64)>,
}

/// A whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub tool: String,
    pub url: String,
    pub scenario: Scenario,
    pub started_at: String,
    /// The target arrival rate, per second.
    pub target_rate: f64,
    pub planned_seconds: f64,
    pub elapsed_seconds: f64,
    pub connections: usize,
    /// Arrivals per second actually started.
    pub achieved_rate: f64,
    pub arrivals_scheduled: u64,
    pub arrivals_sent: u64,
    /// Arrivals not started because `max_sessions` were already in progress.
    pub arrivals_dropped: u64,
    /// Arrivals still in progress when the run ended (not in the figures).
    pub arrivals_unfinished: u64,
    pub interrupted: bool,
    /// Every request that is not derived (`order_final`, `buy`), merged.
    pub all_requests: Option<KindSummary>,
    pub kinds: Vec<KindSummary>,
    /// Counted outcomes, such as `order.completed` or `order.failed.payment_declined`.
    pub outcomes: BTreeMap<String, u64>,
    /// How late the generator itself started arrivals (its own timer's slack).
    pub send_lag_p99_ms: f64,
    pub timeline: Vec<TimelinePoint>,
    /// Plain advice drawn from the figures (rate limits hit, the generator lagging ...).
    pub hints: Vec<String>,
}

const PERCENTILES: [f64; 15] = [
    0.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.995, 99.999, 99.9995,
    100.0,
];

/// Histogram values are whole microseconds: in milliseconds they keep 3 decimals.
fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

fn summarize(
    kind: &str,
    h: &Histogram<u64>,
    errors: &BTreeMap<String, u64>,
    seconds: f64,
) -> KindSummary {
    let q = |p: f64| ms(h.value_at_quantile(p));
    KindSummary {
        kind: kind.to_owned(),
        count: h.len(),
        errors: errors.values().sum(),
        error_classes: errors.clone(),
        rate: round(h.len() as f64 / seconds.max(1e-9)),
        mean_ms: round(h.mean() / 1000.0),
        p50_ms: q(0.5),
        p90_ms: q(0.9),
        p99_ms: q(0.99),
        p999_ms: q(0.999),
        max_ms: ms(h.max()),
        percentiles: PERCENTILES
            .iter()
            .map(|p| (*p, ms(h.value_at_percentile(*p))))
            .collect(),
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

impl Report {
    pub fn new(
        url: &str,
        scenario: &Scenario,
        load: &Load,
        connections: usize,
        ran: &Ran,
        snapshot: &Snapshot,
    ) -> Self {
        let seconds = ran.elapsed.as_secs_f64();
        let mut merged: Option<Histogram<u64>> = None;
        let mut merged_errors: BTreeMap<String, u64> = BTreeMap::new();
        let mut kinds = Vec::new();
        for (name, (histogram, errors)) in &snapshot.kinds {
            if !kind::DERIVED.contains(&name.as_str()) && name != kind::SIGN_IN {
                match &mut merged {
                    Some(m) => {
                        // Same bounds everywhere: adding cannot fail.
                        let _ = m.add(histogram);
                    }
                    None => merged = Some(histogram.clone()),
                }
                for (class, n) in errors {
                    *merged_errors.entry(class.clone()).or_default() += n;
                }
            }
            kinds.push(summarize(name, histogram, errors, seconds));
        }
        let all_requests = merged.map(|h| summarize("all requests", &h, &merged_errors, seconds));
        let send_lag_p99_ms = snapshot
            .send_lag
            .as_ref()
            .map_or(0.0, |h| ms(h.value_at_quantile(0.99)));
        let mut report = Self {
            tool: format!("scaleshop loadtest {}", env!("CARGO_PKG_VERSION")),
            url: url.to_owned(),
            scenario: scenario.clone(),
            // The report is made as the run ends: its start is that long ago.
            started_at: (chrono::Utc::now()
                - chrono::Duration::from_std(ran.elapsed).unwrap_or_default())
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            target_rate: load.rate,
            planned_seconds: load.duration.as_secs_f64(),
            elapsed_seconds: round(seconds),
            connections,
            achieved_rate: round(
                ran.sent as f64 / load.duration.as_secs_f64().min(seconds).max(1e-9),
            ),
            arrivals_scheduled: ran.scheduled,
            arrivals_sent: ran.sent,
            arrivals_dropped: snapshot.dropped,
            arrivals_unfinished: ran.unfinished,
            interrupted: ran.interrupted,
            all_requests,
            kinds,
            outcomes: snapshot.outcomes.clone(),
            send_lag_p99_ms,
            timeline: snapshot.timeline.clone(),
            hints: Vec::new(),
        };
        report.hints = report.advise();
        report
    }

    fn advise(&self) -> Vec<String> {
        let mut hints = Vec::new();
        let limited = self.kinds.iter().any(|k| {
            k.error_classes.contains_key("429")
                && (k.kind == kind::SIGNUP || k.kind == kind::SIGN_IN)
        });
        if limited {
            hints.push(
                "sign-ups or sign-ins were rate limited (429): for load tests raise the server's \
                 signup_rate_per_address and login_rate_per_address"
                    .to_owned(),
            );
        }
        if self.send_lag_p99_ms > 5.0 {
            hints.push(format!(
                "the generator started arrivals up to {:.1} ms late (p99): it is short of CPU, so \
                 give it its own core (taskset) or lower --rate",
                self.send_lag_p99_ms
            ));
        }
        if self.arrivals_dropped > 0 {
            hints.push(format!(
                "{} arrivals were dropped because --max-sessions were already in progress: the \
                 server cannot keep up with this rate",
                self.arrivals_dropped
            ));
        }
        if self.arrivals_unfinished > 0 {
            hints.push(format!(
                "{} arrivals had not finished when the run ended; they are not in the figures",
                self.arrivals_unfinished
            ));
        }
        hints
    }

    /// The figures of every kind, "all requests" first.
    fn table(&self) -> Table {
        let mut table = Table::new(&[
            "kind", "count", "errors", "per s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms",
        ]);
        for k in self.all_requests.iter().chain(self.kinds.iter()) {
            table.row(vec![
                k.kind.clone(),
                k.count.to_string(),
                k.errors.to_string(),
                format!("{:.1}", k.rate),
                format!("{:.2}", k.p50_ms),
                format!("{:.2}", k.p90_ms),
                format!("{:.2}", k.p99_ms),
                format!("{:.2}", k.p999_ms),
                format!("{:.2}", k.max_ms),
            ]);
        }
        table
    }

    /// Errors (every kind but the derived ones, plus dropped arrivals) over requests.
    pub fn error_ratio(&self) -> f64 {
        let (count, errors) = self
            .all_requests
            .as_ref()
            .map_or((0, 0), |a| (a.count, a.errors));
        let errors = errors + self.arrivals_dropped;
        if count + self.arrivals_dropped == 0 {
            return 0.0;
        }
        errors as f64 / (count + self.arrivals_dropped) as f64
    }

    /// The terminal summary.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} against {}: scenario {}, {} arrivals/s for {:.1} s{}",
            self.tool,
            self.url,
            self.scenario.name,
            self.target_rate,
            self.planned_seconds,
            if self.interrupted {
                " (interrupted: partial report)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            out,
            "arrivals: {} scheduled, {} sent ({:.1}/s achieved), {} dropped, {} unfinished; generator lag p99 {:.2} ms",
            self.arrivals_scheduled,
            self.arrivals_sent,
            self.achieved_rate,
            self.arrivals_dropped,
            self.arrivals_unfinished,
            self.send_lag_p99_ms
        );
        let _ = writeln!(
            out,
            "latency from each request's scheduled time (coordinated omission corrected):"
        );
        out.push_str(&self.table().text());
        for k in &self.kinds {
            if !k.error_classes.is_empty() {
                let classes: Vec<String> = k
                    .error_classes
                    .iter()
                    .map(|(c, n)| format!("{c}: {n}"))
                    .collect();
                let _ = writeln!(out, "errors of {}: {}", k.kind, classes.join(", "));
            }
        }
        if !self.outcomes.is_empty() {
            let outcomes: Vec<String> = self
                .outcomes
                .iter()
                .map(|(o, n)| format!("{o}: {n}"))
                .collect();
            let _ = writeln!(out, "outcomes: {}", outcomes.join(", "));
        }
        for hint in &self.hints {
            let _ = writeln!(out, "note: {hint}");
        }
        out
    }

    pub fn json(&self) -> Result<String, Error> {
        serde_json::to_string_pretty(self)
            .map_err(|e| Error::Report(format!("cannot write the JSON report: {e}")))
    }

    /// The HTML page: the summary table and two SVG plots, nothing fetched.
    pub fn html(&self) -> String {
        let table = self.table().html();
        let over_time = crate::plot::latency_over_time(&self.timeline);
        let percentiles = crate::plot::percentiles(&self.kinds);
        let notes: String = self
            .hints
            .iter()
            .map(|h| format!("<li>{}</li>", escape(h)))
            .collect();
        let outcomes: String = self
            .outcomes
            .iter()
            .map(|(o, n)| format!("<li>{}: {n}</li>", escape(o)))
            .collect();
        let title = format!(
            "scaleshop loadtest: {} at {}/s",
            self.scenario.name, self.target_rate
        );
        page(
            &title,
            &format!(
                "<p>{} against <code>{}</code>, started {}: {:.1} s planned, {:.1} s run{}. Arrivals: {} scheduled, {} sent \
                 ({:.1}/s achieved), {} dropped, {} unfinished. Latency counts from each request's scheduled time \
                 (coordinated omission corrected).</p>{table}\
                 <ul>{outcomes}</ul><ul>{notes}</ul>\
                 <h2>Latency over time</h2><figure>{over_time}</figure>\
                 <h2>Latency by percentile</h2><figure>{percentiles}</figure>",
                escape(&self.tool),
                escape(&self.url),
                escape(&self.started_at),
                self.planned_seconds,
                self.elapsed_seconds,
                if self.interrupted {
                    " (interrupted)"
                } else {
                    ""
                },
                self.arrivals_scheduled,
                self.arrivals_sent,
                self.achieved_rate,
                self.arrivals_dropped,
                self.arrivals_unfinished,
            ),
        )
    }

    /// Writes `NAME.json` and `NAME.html` into `dir`; returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), Error> {
        write_pair(dir, name, &self.json()?, &self.html())
    }
}

pub(crate) fn write_pair(
    dir: &Path,
    name: &str,
    json: &str,
    html: &str,
) -> Result<(PathBuf, PathBuf), Error> {
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::Report(format!(
            "cannot create the report folder {}: {e}",
            dir.display()
        ))
    })?;
    let json_path = dir.join(format!("{name}.json"));
    let html_path = dir.join(format!("{name}.html"));
    std::fs::write(&json_path, json)
        .map_err(|e| Error::Report(format!("cannot write {}: {e}", json_path.display())))?;
    std::fs::write(&html_path, html)
        .map_err(|e| Error::Report(format!("cannot write {}: {e}", html_path.display())))?;
    Ok((json_path, html_path))
}

/// A table of cells, written as aligned text (first column left, the others
/// right) or as an HTML table: the figures of a report are formatted once.
pub(crate) struct Table {
    pub headers: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Columns of figures are right-aligned (every cell a number or `-`), the
    /// others left-aligned.
    pub fn text(&self) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.len()).collect();
        let mut numeric = vec![true; columns];
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
                numeric[i] &= cell == "-" || cell.parse::<f64>().is_ok();
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>| {
            let mut out = String::new();
            for (i, cell) in cells.enumerate().take(columns) {
                let width = widths[i];
                let sep = if i == 0 { "" } else { "  " };
                if numeric[i] && i > 0 {
                    let _ = write!(out, "{sep}{cell:>width$}");
                } else {
                    let _ = write!(out, "{sep}{cell:<width$}");
                }
            }
            out.trim_end().to_owned() + "\n"
        };
        let mut out = line(&mut self.headers.iter().copied());
        for row in &self.rows {
            out.push_str(&line(&mut row.iter().map(String::as_str)));
        }
        out
    }

    pub fn html(&self) -> String {
        let head: String = self
            .headers
            .iter()
            .map(|h| format!("<th>{}</th>", escape(h)))
            .collect();
        let body: String = self
            .rows
            .iter()
            .map(|row| {
                let cells: String = row
                    .iter()
                    .map(|c| format!("<td>{}</td>", escape(c)))
                    .collect();
                format!("<tr>{cells}</tr>")
            })
            .collect();
        format!("<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    }
}

pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A complete, self-contained page (well-formed XHTML, so it also parses as XML).
pub(crate) fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\"><head><meta charset=\"utf-8\"/>\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/><title>{t}</title><style>\
         body{{font-family:system-ui,sans-serif;margin:1.5rem;max-width:72rem;color:#222}}\
         table{{border-collapse:collapse;margin:1rem 0}}td,th{{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}}\
         td:first-child,th:first-child{{text-align:left}}figure{{margin:0;overflow-x:auto}}svg{{max-width:100%;height:auto}}\
         </style></head><body><h1>{t}</h1>{body}</body></html>\n",
        t = escape(title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_align_right_and_words_left() {
        let mut table = Table::new(&["kind", "count", "status"]);
        table.row(vec![
            "product".to_owned(),
            "1200".to_owned(),
            "measured".to_owned(),
        ]);
        table.row(vec![
            "search".to_owned(),
            "-".to_owned(),
            "not available".to_owned(),
        ]);
        assert_eq!(
            table.text(),
            "kind     count  status\nproduct   1200  measured\nsearch       -  not available\n"
        );
        let html = table.html();
        assert!(
            html.starts_with("<table><thead><tr><th>kind</th>"),
            "{html}"
        );
        assert!(html.contains("<td>not available</td>"), "{html}");
    }
}
