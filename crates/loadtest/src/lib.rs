//! `scaleshop loadtest`: load that arrives on a schedule (open loop), measured
//! from each request's scheduled time so that a stalled server shows in the
//! tail (coordinated omission corrected), kept in HDR histograms per request
//! kind, and reported three ways (terminal, JSON, self-contained HTML).
//! `--find-max` steps the rate to the highest one that holds a bound, and
//! `loadtest lab` runs the same load against the topologies of `scripts/cluster`
//! side by side.
//!
//! It speaks only the public HTTP API: it knows nothing of the server's code.

pub mod client;
pub mod findmax;
pub mod lab;
pub mod plot;
pub mod recorder;
pub mod report;
pub mod run;
pub mod scenario;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::watch;

use crate::client::{Connection, SeedPlan, Target};
use crate::recorder::{Recorder, Tick};
use crate::report::Report;
use crate::run::{Load, Progress, Ran};
use crate::scenario::Scenario;

/// Every way a load test can fail, with a message meant for its user.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Flags or files that make no sense (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// The target could not be prepared: unreachable, refused, rate limited.
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Report(String),
    /// A lab variant's topology could not be started or stopped.
    #[error("{0}")]
    Cluster(String),
}

/// `30s`, `2m`, `500ms`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 30s, 2m or 500ms"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("`{s}`: the unit must be ms, s, m or h")),
    };
    if !(0.0..=86_400.0).contains(&seconds) || seconds.is_nan() {
        return Err(format!("`{s}` must be between 0 and 24 h"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a rate (arrivals per second)"))?;
    if !(0.01..=1_000_000.0).contains(&rate) {
        return Err("the rate must be between 0.01 and 1000000 arrivals per second".to_owned());
    }
    Ok(rate)
}

/// `scaleshop loadtest ...`
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LoadtestArgs {
    #[command(subcommand)]
    pub command: Option<LoadtestCommand>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum LoadtestCommand {
    /// The pattern lab: the same load against topology variants (cache off / L1 /
    /// L1+L2, 0 / 1 replica, 1 / 2 shards, monolith / split, database bus / NATS),
    /// each started with scripts/cluster; reports them side by side.
    Lab(lab::LabArgs),
}

/// The load, the target and the report of one run (or one `--find-max`).
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// The API's address (a gateway or one instance).
    #[arg(long, env = "SCALESHOP_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// What each arrival does: health, browse, buy, signup, rename, mixed (browse 80,
    /// buy 15, signup 5) or a TOML mix file (see docs/loadtest.md).
    #[arg(long, default_value = "browse")]
    pub scenario: String,
    /// Arrivals per second (with --find-max: the first step's rate).
    #[arg(long, default_value = "100", value_parser = parse_rate)]
    pub rate: f64,
    /// How long the load lasts (with --find-max: each step).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Requests in flight at once, one pooled connection each.
    #[arg(long, default_value = "64")]
    pub connections: usize,
    /// Create the products (as the admin) and the shoppers the scenario needs;
    /// without it, products are taken from the catalog as it is.
    #[arg(long)]
    pub seed: bool,
    /// Products to create with --seed, or to take from the catalog.
    #[arg(long, default_value = "200")]
    pub products: usize,
    /// Shoppers signed up and signed in for the buy and rename flows.
    #[arg(long, default_value = "50")]
    pub shoppers: usize,
    #[arg(long, env = "SCALESHOP_ADMIN_EMAIL")]
    pub admin_email: Option<String>,
    #[arg(long, env = "SCALESHOP_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<String>,
    /// Bound of one request.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// How often a buy polls its order.
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// How long a buy waits for its order to become final.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub order_timeout: Duration,
    /// Arrivals in progress at once; one beyond it is dropped and counted.
    #[arg(long, default_value = "20000")]
    pub max_sessions: usize,
    /// Step the rate up (doubling, then bisecting) to the highest rate whose
    /// p99 and errors stay within --max-p99 and --max-error-percent.
    #[arg(long)]
    pub find_max: bool,
    /// --find-max: the p99 bound of every request (not of the derived kinds).
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub max_p99: Duration,
    /// --find-max: the bound of errors (and dropped arrivals), in percent.
    #[arg(long, default_value = "1")]
    pub max_error_percent: f64,
    /// --find-max: steps at most.
    #[arg(long, default_value = "10")]
    pub max_steps: u32,
    /// Folder for the JSON and HTML reports (default: loadtest-reports/<time>-<scenario>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
}

impl RunArgs {
    pub fn connection(&self) -> Connection {
        Connection {
            url: self.url.trim_end_matches('/').to_owned(),
            connections: self.connections.max(1),
            timeout: self.timeout,
            poll_interval: self.poll_interval,
            order_timeout: self.order_timeout,
        }
    }

    pub fn load(&self, rate: f64) -> Load {
        Load {
            rate,
            duration: self.duration,
            max_sessions: self.max_sessions.max(1),
            drain: self.timeout.max(self.order_timeout) + Duration::from_secs(1),
        }
    }

    pub fn seed_plan(&self) -> SeedPlan {
        SeedPlan {
            admin_email: self.admin_email.clone(),
            admin_password: self.admin_password.clone(),
            products: self.products,
            shoppers: self.shoppers,
            create_products: self.seed,
        }
    }

    fn out_dir(&self, scenario: &Scenario) -> PathBuf {
        self.out.clone().unwrap_or_else(|| {
            let time = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
            PathBuf::from("loadtest-reports").join(format!("{time}-{}", scenario.name))
        })
    }
}

/// The live progress line on the terminal (hidden when stderr is not one).
struct Bar {
    bar: ProgressBar,
    rate: f64,
    errors: std::sync::atomic::AtomicU64,
}

impl Bar {
    fn new(seconds: u64, rate: f64, label: &str, quiet: bool) -> Self {
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(seconds)
        };
        let style = ProgressStyle::with_template(
            "{prefix} {elapsed:>4} [{bar:24}] {pos}/{len} s, {eta} left  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(label.to_owned());
        Self {
            bar,
            rate,
            errors: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Progress for Bar {
    fn second(&self, second: u64, sent: u64, tick: Tick) {
        let errors = self
            .errors
            .fetch_add(tick.errors, std::sync::atomic::Ordering::Relaxed)
            + tick.errors;
        self.bar
            .set_position(second.min(self.bar.length().unwrap_or(second)));
        self.bar.set_message(format!(
            "sent {sent}/s of {}/s, done {}/s, errors {errors}, p50 {:.2} ms, p99 {:.2} ms",
            self.rate, tick.count, tick.p50_ms, tick.p99_ms
        ));
    }
}

/// A stop signal that turns true on Ctrl-C (SIGINT).
pub fn stop_on_ctrl_c() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = tx.send(true);
        }
    });
    rx
}

/// Runs one load of `scenario` at `rate` on a prepared target; the report.
pub async fn measure(
    args: &RunArgs,
    scenario: &Scenario,
    target: Arc<Target>,
    rate: f64,
    label: &str,
    stop: watch::Receiver<bool>,
    recorder: Arc<Recorder>,
) -> Report {
    let load = args.load(rate);
    let bar = Arc::new(Bar::new(
        load.duration.as_secs().max(1),
        rate,
        label,
        args.quiet,
    ));
    let ran: Ran = run::run(target, scenario, load, recorder.clone(), bar.clone(), stop).await;
    bar.bar.finish_and_clear();
    Report::new(
        &args.connection().url,
        scenario,
        &load,
        args.connections,
        &ran,
        &recorder.snapshot(),
    )
}

/// Prepares the target for `scenario` (seeding or discovering, signing in shoppers).
pub async fn prepare(
    args: &RunArgs,
    scenario: &Scenario,
    recorder: &Recorder,
) -> Result<Arc<Target>, Error> {
    let conn = args.connection();
    let needs: Vec<_> = scenario::Flow::ALL
        .into_iter()
        .filter(|f| scenario.uses(*f))
        .collect();
    let fixture = client::prepare(&conn, &args.seed_plan(), &needs, recorder).await?;
    Ok(Arc::new(Target::new(
        conn,
        fixture,
        scenario.settings.clone(),
    )?))
}

/// `scaleshop loadtest` (without `lab`): one run or a `--find-max` search.
/// Prints the summary, writes the reports; the exit code is 0 unless setup failed.
pub async fn main(args: LoadtestArgs) -> Result<(), Error> {
    if let Some(LoadtestCommand::Lab(lab_args)) = args.command {
        return lab::main(lab_args).await;
    }
    let args = args.run;
    let scenario = Scenario::parse(&args.scenario)?;
    let stop = stop_on_ctrl_c();
    let out = args.out_dir(&scenario);
    if args.find_max {
        let search = findmax::find_max(&args, &scenario, stop).await?;
        print!("{}", search.text());
        let (json, html) = search.write(&out, "find-max")?;
        println!("reports: {} {}", json.display(), html.display());
        return Ok(());
    }
    // One recorder for the preparation too: the shoppers' sign-ins show in the
    // report as `sign_in` (outside "all requests").
    let recorder = Arc::new(Recorder::new());
    let target = prepare(&args, &scenario, &recorder).await?;
    let report = measure(
        &args,
        &scenario,
        target,
        args.rate,
        &scenario.name,
        stop,
        recorder,
    )
    .await;
    print!("{}", report.text());
    let (json, html) = report.write(&out, "report")?;
    println!("reports: {} {}", json.display(), html.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_the_units_people_type() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("25h").is_err());
        assert!(parse_rate("0").is_err());
        assert_eq!(parse_rate("250.5"), Ok(250.5));
    }
}
