//! `--find-max`: the highest arrival rate that holds a bound. The rate doubles
//! from `--rate` until a step breaks the bound, then bisects between the last
//! good and the first bad rate until they are within 10 % (or `--max-steps`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::recorder::Recorder;
use crate::report::{Report, Table, escape, page, write_pair};
use crate::scenario::Scenario;
use crate::{Error, RunArgs};

/// The bound a step must hold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bound {
    pub max_p99_ms: f64,
    pub max_error_percent: f64,
    /// The share of the target rate that must actually be sent (the generator
    /// or --max-sessions may fall short).
    pub min_achieved_ratio: f64,
}

/// One step of the search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub rate: f64,
    pub achieved_rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub error_percent: f64,
    pub held: bool,
    /// Why it did not hold.
    pub broke: Vec<String>,
}

/// The outcome of the search, with the full report of the best step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Search {
    pub scenario: String,
    pub url: String,
    pub bound: Bound,
    pub step_seconds: f64,
    pub steps: Vec<Step>,
    /// The highest rate that held the bound (None: not even the first step).
    pub max_sustainable_rate: Option<f64>,
    pub best: Option<Report>,
    pub interrupted: bool,
}

impl Bound {
    pub fn judge(&self, report: &Report) -> Step {
        let (p50, p99) = report
            .all_requests
            .as_ref()
            .map_or((0.0, 0.0), |a| (a.p50_ms, a.p99_ms));
        let error_percent = report.error_ratio() * 100.0;
        let mut broke = Vec::new();
        if p99 > self.max_p99_ms {
            broke.push(format!("p99 {p99:.2} ms > {:.2} ms", self.max_p99_ms));
        }
        if error_percent > self.max_error_percent {
            broke.push(format!(
                "errors {error_percent:.2} % > {:.2} %",
                self.max_error_percent
            ));
        }
        if report.achieved_rate < report.target_rate * self.min_achieved_ratio {
            broke.push(format!(
                "sent {:.1}/s < {:.0} % of {}/s",
                report.achieved_rate,
                self.min_achieved_ratio * 100.0,
                report.target_rate
            ));
        }
        if report.arrivals_unfinished > 0 {
            broke.push(format!(
                "{} arrivals unfinished",
                report.arrivals_unfinished
            ));
        }
        Step {
            rate: report.target_rate,
            achieved_rate: report.achieved_rate,
            p50_ms: p50,
            p99_ms: p99,
            error_percent: (error_percent * 1000.0).round() / 1000.0,
            held: broke.is_empty() && !report.interrupted,
            broke,
        }
    }
}

/// The next rate to try, or None when the search is done.
pub fn next_rate(held: Option<f64>, broke: Option<f64>, last: f64) -> Option<f64> {
    match (held, broke) {
        (_, None) => Some(last * 2.0),
        (None, Some(bad)) => {
            // Not even the first rate held: halve, down to a floor.
            let next = bad / 2.0;
            (next >= 0.5).then_some(next)
        }
        (Some(good), Some(bad)) => {
            if bad <= good * 1.1 {
                None
            } else {
                Some(((good + bad) / 2.0).round().max(good + 0.01))
            }
        }
    }
}

/// Prepares the target, then runs the search on it.
pub async fn find_max(
    args: &RunArgs,
    scenario: &Scenario,
    stop: watch::Receiver<bool>,
) -> Result<Search, Error> {
    let seed_recorder = Recorder::new();
    let target = crate::prepare(args, scenario, &seed_recorder).await?;
    Ok(find_max_on(args, scenario, target, stop).await)
}

/// Runs the search on a prepared target.
pub async fn find_max_on(
    args: &RunArgs,
    scenario: &Scenario,
    target: Arc<crate::client::Target>,
    stop: watch::Receiver<bool>,
) -> Search {
    let bound = Bound {
        max_p99_ms: args.max_p99.as_secs_f64() * 1000.0,
        max_error_percent: args.max_error_percent,
        min_achieved_ratio: 0.95,
    };
    let mut search = Search {
        scenario: scenario.name.clone(),
        url: args.connection().url,
        bound,
        step_seconds: args.duration.as_secs_f64(),
        steps: Vec::new(),
        max_sustainable_rate: None,
        best: None,
        interrupted: false,
    };
    let (mut held, mut broke): (Option<f64>, Option<f64>) = (None, None);
    let mut rate = args.rate;
    for n in 1..=args.max_steps.max(1) {
        let recorder = Arc::new(Recorder::new());
        let label = format!("step {n} at {rate}/s");
        let report = crate::measure(
            args,
            scenario,
            target.clone(),
            rate,
            &label,
            stop.clone(),
            recorder,
        )
        .await;
        let step = bound.judge(&report);
        if !args.quiet {
            eprintln!(
                "step {n}: {rate}/s -> sent {:.1}/s, p50 {:.2} ms, p99 {:.2} ms, errors {:.2} %: {}",
                step.achieved_rate,
                step.p50_ms,
                step.p99_ms,
                step.error_percent,
                if step.held {
                    "held".to_owned()
                } else {
                    step.broke.join("; ")
                }
            );
        }
        if report.interrupted {
            search.interrupted = true;
            search.steps.push(step);
            break;
        }
        if step.held {
            held = Some(held.map_or(rate, |h: f64| h.max(rate)));
            if search.max_sustainable_rate.is_none_or(|m| rate > m) {
                search.max_sustainable_rate = Some(rate);
                search.best = Some(report);
            }
        } else {
            broke = Some(broke.map_or(rate, |b: f64| b.min(rate)));
        }
        search.steps.push(step);
        match next_rate(held, broke, rate) {
            Some(next) => rate = next,
            None => break,
        }
        // Let the server settle (backlogs drain) between steps.
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    search
}

impl Search {
    /// One row per step, in the order they ran.
    fn table(&self) -> Table {
        let mut table = Table::new(&["rate", "sent/s", "p50 ms", "p99 ms", "errors %", "verdict"]);
        for s in &self.steps {
            table.row(vec![
                s.rate.to_string(),
                format!("{:.1}", s.achieved_rate),
                format!("{:.2}", s.p50_ms),
                format!("{:.2}", s.p99_ms),
                format!("{:.2}", s.error_percent),
                if s.held {
                    "held".to_owned()
                } else {
                    s.broke.join("; ")
                },
            ]);
        }
        table
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "find-max of {} against {}: bound p99 <= {:.1} ms, errors <= {:.2} %, {:.0} s per step",
            self.scenario,
            self.url,
            self.bound.max_p99_ms,
            self.bound.max_error_percent,
            self.step_seconds
        );
        out.push_str(&self.table().text());
        match self.max_sustainable_rate {
            Some(rate) => {
                let _ = writeln!(out, "highest sustainable rate: {rate}/s");
            }
            None => {
                let _ = writeln!(out, "no step held the bound");
            }
        }
        if self.interrupted {
            let _ = writeln!(out, "(interrupted: partial search)");
        }
        out
    }

    pub fn html(&self) -> String {
        let table = self.table().html();
        let mut sorted = self.steps.clone();
        sorted.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        let bars: Vec<(String, f64)> = sorted
            .iter()
            .map(|s| (format!("{}/s", s.rate), s.p99_ms))
            .collect();
        let chart = crate::plot::bars("p99 at each rate tried", "p99, ms", &bars);
        let best = self.best.as_ref().map_or_else(String::new, |report| {
            format!(
                "<h2>At the highest sustainable rate</h2><figure>{}</figure><figure>{}</figure>",
                crate::plot::latency_over_time(&report.timeline),
                crate::plot::percentiles(&report.kinds)
            )
        });
        let verdict = self.max_sustainable_rate.map_or_else(
            || "no step held the bound".to_owned(),
            |r| format!("highest sustainable rate: {r}/s"),
        );
        page(
            &format!("scaleshop loadtest --find-max: {}", self.scenario),
            &format!(
                "<p>Against <code>{}</code>; bound: p99 at most {:.1} ms, errors at most {:.2} %; {:.0} s per step. \
                 <strong>{}</strong>.</p>{table}<figure>{chart}</figure>{best}",
                escape(&self.url),
                self.bound.max_p99_ms,
                self.bound.max_error_percent,
                self.step_seconds,
                escape(&verdict)
            ),
        )
    }

    pub fn write(&self, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), Error> {
        let json = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Report(format!("cannot write the JSON report: {e}")))?;
        write_pair(dir, name, &json, &self.html())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_doubles_then_bisects_to_ten_percent() {
        assert_eq!(next_rate(Some(100.0), None, 100.0), Some(200.0));
        assert_eq!(next_rate(Some(200.0), Some(400.0), 400.0), Some(300.0));
        assert_eq!(next_rate(Some(300.0), Some(320.0), 320.0), None);
        assert_eq!(next_rate(None, Some(100.0), 100.0), Some(50.0));
        assert_eq!(next_rate(None, Some(0.8), 0.8), None);
    }
}
