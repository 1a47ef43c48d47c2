//! The pattern lab: the same scenario against topology variants, each started
//! with `scripts/cluster` in its own folder, searched for its highest rate
//! within the bound, measured once more at that rate with the databases'
//! transaction counters read before and after, then stopped. The variants are
//! reported side by side in one table and one plot.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::{Deserialize, Serialize};
use std::process::Command;
use tokio::sync::watch;

use crate::findmax::{Bound, Search, find_max_on};
use crate::recorder::Recorder;
use crate::report::{Table, page, write_pair};
use crate::scenario::Scenario;
use crate::{Error, RunArgs};

/// One topology to measure.
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    pub name: &'static str,
    /// The pattern it is compared on (`cache`, `replicas`, `shards`, `topology`, `bus`).
    pub pattern: &'static str,
    pub cluster_flags: &'static [&'static str],
    pub env: &'static [(&'static str, &'static str)],
}

/// Every variant, pattern by pattern. Each runs one instance per service group,
/// so the variants differ only in the pattern under test.
pub const VARIANTS: [Variant; 10] = [
    Variant {
        name: "cache-off",
        pattern: "cache",
        cluster_flags: &["--instances", "1", "--no-redis"],
        env: &[("SCALESHOP_CACHE_ENABLED", "false")],
    },
    Variant {
        name: "cache-l1",
        pattern: "cache",
        cluster_flags: &["--instances", "1", "--no-redis"],
        env: &[],
    },
    Variant {
        name: "cache-l1-l2",
        pattern: "cache",
        cluster_flags: &["--instances", "1"],
        env: &[],
    },
    Variant {
        name: "replicas-0",
        pattern: "replicas",
        cluster_flags: &["--instances", "1"],
        env: &[],
    },
    Variant {
        name: "replicas-1",
        pattern: "replicas",
        cluster_flags: &["--instances", "1", "--replicas", "1"],
        env: &[],
    },
    Variant {
        name: "shards-1",
        pattern: "shards",
        cluster_flags: &["--instances", "1", "--shards", "1"],
        env: &[],
    },
    Variant {
        name: "shards-2",
        pattern: "shards",
        cluster_flags: &["--instances", "1", "--shards", "2"],
        env: &[],
    },
    Variant {
        name: "monolith",
        pattern: "topology",
        cluster_flags: &["--instances", "1"],
        env: &[],
    },
    Variant {
        name: "split",
        pattern: "topology",
        cluster_flags: &["--instances", "1", "--split"],
        env: &[],
    },
    Variant {
        name: "bus-database",
        pattern: "bus",
        cluster_flags: &["--instances", "1"],
        env: &[],
    },
];

/// The NATS variant is listed apart so that the list above reads as pairs.
pub const NATS_VARIANT: Variant = Variant {
    name: "bus-nats",
    pattern: "bus",
    cluster_flags: &["--instances", "1", "--nats"],
    env: &[],
};

/// Every variant in report order.
pub fn all_variants() -> Vec<Variant> {
    let mut all = VARIANTS.to_vec();
    all.push(NATS_VARIANT);
    all
}

/// Limits raised in every variant, so that the load measures the pattern and
/// not the brute-force limits on sign-ups and sign-ins from one address.
const LAB_ENV: [(&str, &str); 3] = [
    ("SCALESHOP_LOGIN_RATE_PER_ADDRESS", "1000000"),
    ("SCALESHOP_LOGIN_RATE_PER_EMAIL", "1000000"),
    ("SCALESHOP_SIGNUP_RATE_PER_ADDRESS", "1000000"),
];

/// `scaleshop loadtest lab ...`
#[derive(Debug, Args)]
pub struct LabArgs {
    /// Variants to run: names (cache-off, cache-l1, cache-l1-l2, replicas-0,
    /// replicas-1, shards-1, shards-2, monolith, split, bus-database, bus-nats)
    /// or patterns (cache, replicas, shards, topology, bus), comma separated.
    #[arg(
        long,
        default_value = "cache,replicas,shards,topology,bus",
        value_delimiter = ','
    )]
    pub variants: Vec<String>,
    /// The script that starts and stops a topology.
    #[arg(long, default_value = "scripts/cluster", value_name = "PATH")]
    pub cluster_script: PathBuf,
    /// The load and the bound; --url and the admin's credentials come from each
    /// variant's cluster, and every variant is searched as with --find-max.
    #[command(flatten)]
    pub run: RunArgs,
}

/// What one variant measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantResult {
    pub name: String,
    pub pattern: String,
    pub cluster_flags: Vec<String>,
    /// `measured` or `failed`.
    pub status: String,
    pub reason: Option<String>,
    /// Another variant with the same topology whose figures these are.
    pub same_as: Option<String>,
    pub max_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Transactions per second on the primary (and on the replicas, summed)
    /// during a run at `max_rate`, as counted (background work included).
    pub primary_tx_per_s: Option<f64>,
    pub replica_tx_per_s: Option<f64>,
    /// What the primary counts per second with no load (the processes'
    /// background work), measured right before that run.
    pub primary_idle_tx_per_s: Option<f64>,
    /// The primary's transactions per request: the run's, less the idle rate
    /// over the same time.
    pub primary_tx_per_request: Option<f64>,
    pub search: Option<Search>,
}

impl VariantResult {
    fn new(variant: &Variant, status: &str, reason: Option<String>) -> Self {
        Self {
            name: variant.name.to_owned(),
            pattern: variant.pattern.to_owned(),
            cluster_flags: variant
                .cluster_flags
                .iter()
                .map(|f| (*f).to_owned())
                .collect(),
            status: status.to_owned(),
            reason,
            same_as: None,
            max_rate: None,
            p50_ms: None,
            p99_ms: None,
            primary_tx_per_s: None,
            replica_tx_per_s: None,
            primary_idle_tx_per_s: None,
            primary_tx_per_request: None,
            search: None,
        }
    }
}

/// The lab's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabReport {
    pub scenario: String,
    pub bound: Bound,
    pub step_seconds: f64,
    pub variants: Vec<VariantResult>,
}

/// The variants a `--variants` list names, in report order.
pub fn select(names: &[String]) -> Result<Vec<Variant>, Error> {
    let all = all_variants();
    for name in names {
        let name = name.trim();
        if !all.iter().any(|v| v.name == name || v.pattern == name) {
            let known: Vec<_> = all.iter().map(|v| v.name).collect();
            return Err(Error::Usage(format!(
                "unknown lab variant `{name}`: expected one of {} or a pattern (cache, replicas, shards, topology, bus)",
                known.join(", ")
            )));
        }
    }
    Ok(all
        .into_iter()
        .filter(|v| {
            names
                .iter()
                .any(|n| n.trim() == v.name || n.trim() == v.pattern)
        })
        .collect())
}

/// `export KEY=VALUE` lines as `scripts/cluster` writes them (bash's `%q`:
/// special characters escaped with a backslash).
pub fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("export "))
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| {
            let mut value = String::with_capacity(v.len());
            let mut chars = v.trim().chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    c => value.push(c),
                }
            }
            (k.trim().to_owned(), value)
        })
        .collect()
}

/// Runs a command with a bound; its output goes to `log`. (std's process, polled
/// off the runtime's threads: the lab starts few processes.)
async fn run_script(
    script: &Path,
    args: &[String],
    env: &[(&str, &str)],
    log: &Path,
    bound: Duration,
) -> Result<i32, Error> {
    let file = std::fs::File::create(log)
        .map_err(|e| Error::Cluster(format!("cannot write {}: {e}", log.display())))?;
    let err_file = file
        .try_clone()
        .map_err(|e| Error::Cluster(format!("cannot write {}: {e}", log.display())))?;
    let mut command = Command::new(script);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err_file);
    for (k, v) in env {
        command.env(k, v);
    }
    let what = format!(
        "{} {}",
        script.display(),
        args.first().map_or("", String::as_str)
    );
    let log = log.to_path_buf();
    let waited = tokio::task::spawn_blocking(move || {
        let mut child = command
            .spawn()
            .map_err(|e| Error::Cluster(format!("cannot run {what}: {e}")))?;
        let deadline = Instant::now() + bound;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status.code().unwrap_or(-1)),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Ok(None) => {
                    // Our own child, by its handle.
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Cluster(format!(
                        "{what} did not finish within {} s (log: {})",
                        bound.as_secs(),
                        log.display()
                    )));
                }
                Err(e) => return Err(Error::Cluster(format!("{what}: {e}"))),
            }
        }
    })
    .await;
    waited.map_err(|e| Error::Cluster(format!("the wait for a script failed: {e}")))?
}

/// The last lines of a log, for an error message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

/// Committed and rolled-back transactions of every database on one server.
/// How long after its last transaction an idle PostgreSQL session may still
/// hold its statistics unflushed (`PGSTAT_IDLE_INTERVAL`, 10 s), and a margin.
const STATS_FLUSH: Duration = Duration::from_secs(11);

async fn transactions(url: &str) -> Option<u64> {
    let url = url.to_owned();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .args([
                "10",
                "psql",
                &url,
                "-AtXq",
                "-c",
                "select sum(xact_commit + xact_rollback) from pg_stat_database",
            ])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
    })
    .await
    .ok()?
    .ok()?;
    String::from_utf8_lossy(&output.stdout).trim().parse().ok()
}

/// What makes two variants the same cluster: the script's flags and the environment.
type Topology = (
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
);

/// Runs the lab; prints the table and writes `lab.json` and `lab.html`.
pub async fn main(args: LabArgs) -> Result<(), Error> {
    let variants = select(&args.variants)?;
    let scenario = Scenario::parse(&args.run.scenario)?;
    if !args.cluster_script.is_file() {
        return Err(Error::Usage(format!(
            "{} not found: run the lab from the repository's folder or give --cluster-script",
            args.cluster_script.display()
        )));
    }
    let out = args.run.out.clone().unwrap_or_else(|| {
        let time = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
        PathBuf::from("loadtest-reports").join(format!("{time}-lab-{}", scenario.name))
    });
    let stop = crate::stop_on_ctrl_c();
    let mut report = LabReport {
        scenario: scenario.name.clone(),
        bound: Bound {
            max_p99_ms: args.run.max_p99.as_secs_f64() * 1000.0,
            max_error_percent: args.run.max_error_percent,
            min_achieved_ratio: 0.95,
        },
        step_seconds: args.run.duration.as_secs_f64(),
        variants: Vec::new(),
    };
    // A topology measured once answers for every variant that is the same one.
    let mut measured: Vec<(Topology, usize)> = Vec::new();
    for variant in &variants {
        if *stop.borrow() {
            break;
        }
        let key: Topology = (variant.cluster_flags, variant.env);
        if let Some((_, index)) = measured.iter().find(|(t, _)| *t == key) {
            let mut copy = report.variants[*index].clone();
            copy.same_as = Some(copy.name.clone());
            copy.name = variant.name.to_owned();
            copy.pattern = variant.pattern.to_owned();
            copy.search = None;
            report.variants.push(copy);
            continue;
        }
        if !args.run.quiet {
            eprintln!(
                "lab: {} ({})",
                variant.name,
                variant.cluster_flags.join(" ")
            );
        }
        let result = measure_variant(&args, variant, &scenario, &out, stop.clone()).await;
        if !args.run.quiet {
            eprintln!(
                "lab: {}: {}{}",
                variant.name,
                result.status,
                result
                    .max_rate
                    .map_or_else(String::new, |r| format!(", {r}/s held"))
            );
        }
        measured.push((key, report.variants.len()));
        report.variants.push(result);
    }
    print!("{}", report.text());
    let json = serde_json::to_string_pretty(&report)
        .map_err(|e| Error::Report(format!("cannot write the JSON report: {e}")))?;
    let (json, html) = write_pair(&out, "lab", &json, &report.html())?;
    println!("reports: {} {}", json.display(), html.display());
    Ok(())
}

async fn measure_variant(
    args: &LabArgs,
    variant: &Variant,
    scenario: &Scenario,
    out: &Path,
    stop: watch::Receiver<bool>,
) -> VariantResult {
    let base = out.join("variants").join(variant.name);
    let cluster = base.join("cluster");
    if let Err(e) = std::fs::create_dir_all(&base) {
        return VariantResult::new(
            variant,
            "failed",
            Some(format!("cannot create {}: {e}", base.display())),
        );
    }
    let mut env: Vec<(&str, &str)> = LAB_ENV.to_vec();
    env.extend_from_slice(variant.env);
    let mut up_args = vec!["up".to_owned(), cluster.display().to_string()];
    up_args.extend(variant.cluster_flags.iter().map(|f| (*f).to_owned()));
    let up_log = base.join("cluster-up.log");
    let code = run_script(
        &args.cluster_script,
        &up_args,
        &env,
        &up_log,
        Duration::from_secs(600),
    )
    .await;
    let result = match code {
        Ok(0) => measure_up(args, variant, scenario, &cluster, &base, stop).await,
        Ok(code) => VariantResult::new(
            variant,
            "failed",
            Some(format!(
                "scripts/cluster up exited {code}: {}",
                tail(&up_log)
            )),
        ),
        Err(e) => VariantResult::new(variant, "failed", Some(e.to_string())),
    };
    let down = vec!["down".to_owned(), cluster.display().to_string()];
    let down_log = base.join("cluster-down.log");
    match run_script(
        &args.cluster_script,
        &down,
        &[],
        &down_log,
        Duration::from_secs(120),
    )
    .await
    {
        Ok(0) => result,
        Ok(code) => VariantResult {
            reason: Some(format!(
                "scripts/cluster down exited {code}: {}",
                tail(&down_log)
            )),
            ..result
        },
        Err(e) => VariantResult {
            reason: Some(e.to_string()),
            ..result
        },
    }
}

async fn measure_up(
    args: &LabArgs,
    variant: &Variant,
    scenario: &Scenario,
    cluster: &Path,
    base: &Path,
    stop: watch::Receiver<bool>,
) -> VariantResult {
    let env = match std::fs::read_to_string(cluster.join("cluster.env")) {
        Ok(text) => parse_env(&text),
        Err(e) => {
            return VariantResult::new(variant, "failed", Some(format!("no cluster.env: {e}")));
        }
    };
    let mut run = args.run.clone();
    run.seed = true;
    run.out = Some(base.to_path_buf());
    if let Some(url) = env.get("SCALESHOP_URL") {
        run.url = url.clone();
    }
    run.admin_email = env.get("SCALESHOP_ADMIN_EMAIL").cloned();
    run.admin_password = env.get("SCALESHOP_ADMIN_PASSWORD").cloned();
    let seed_recorder = Recorder::new();
    let target = match crate::prepare(&run, scenario, &seed_recorder).await {
        Ok(target) => target,
        Err(e) => return VariantResult::new(variant, "failed", Some(e.to_string())),
    };
    let search = find_max_on(&run, scenario, target.clone(), stop.clone()).await;
    let mut result = VariantResult::new(variant, "measured", None);
    result.max_rate = search.max_sustainable_rate;
    if let Some(rate) = search.max_sustainable_rate {
        // Once more at the highest rate, with the databases' counters around it.
        let primary = env
            .get("SCALESHOP_DATABASE_URL")
            .cloned()
            .unwrap_or_default();
        let replicas: Vec<String> = env
            .get("SCALESHOP_READ_REPLICA_URLS")
            .map(|r| {
                r.split(',')
                    .filter(|u| !u.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        // PostgreSQL counts a session's transactions when it flushes its
        // statistics, which an idle session does up to 10 s late: the counters
        // are read after a settling time, and the run's are read that long after
        // it ends. The idle rate over a quiet window is taken off the run's.
        tokio::time::sleep(STATS_FLUSH).await;
        // At least 5 s: over a shorter window, one session's late flush of
        // its statistics reads as a high idle rate.
        let quiet = run
            .duration
            .clamp(Duration::from_secs(5), Duration::from_secs(10));
        let idle_start = transactions(&primary).await;
        tokio::time::sleep(quiet).await;
        let before_primary = transactions(&primary).await;
        let idle_per_s = match (idle_start, before_primary) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / quiet.as_secs_f64()),
            _ => None,
        };
        result.primary_idle_tx_per_s = idle_per_s.map(|v| (v * 10.0).round() / 10.0);
        let mut before_replicas = Vec::new();
        for url in &replicas {
            before_replicas.push(transactions(url).await);
        }
        {
            let recorder = Arc::new(Recorder::new());
            let label = format!("{} at {rate}/s", variant.name);
            let confirm =
                crate::measure(&run, scenario, target, rate, &label, stop, recorder).await;
            let seconds = confirm.elapsed_seconds.max(1e-9);
            let requests = confirm.all_requests.as_ref().map_or(0, |a| a.count);
            result.p50_ms = confirm.all_requests.as_ref().map(|a| a.p50_ms);
            result.p99_ms = confirm.all_requests.as_ref().map(|a| a.p99_ms);
            let counted = Instant::now();
            tokio::time::sleep(STATS_FLUSH).await;
            if let (Some(b), Some(a)) = (before_primary, transactions(&primary).await) {
                let tx = a.saturating_sub(b) as f64;
                result.primary_tx_per_s = Some((tx / seconds * 10.0).round() / 10.0);
                // The window ran from the run's start to this read.
                let window = seconds + counted.elapsed().as_secs_f64();
                let net = (tx - idle_per_s.unwrap_or(0.0) * window).max(0.0);
                result.primary_tx_per_request =
                    Some((net / (requests.max(1) as f64) * 100.0).round() / 100.0);
            }
            let mut replica_tx = 0.0;
            for (url, before) in replicas.iter().zip(before_replicas) {
                if let (Some(b), Some(a)) = (before, transactions(url).await) {
                    replica_tx += a.saturating_sub(b) as f64;
                }
            }
            if !replicas.is_empty() {
                result.replica_tx_per_s = Some((replica_tx / seconds * 10.0).round() / 10.0);
            }
            let _ = confirm.write(base, "at-max-rate");
        }
    }
    let _ = search.write(base, "find-max");
    result.search = Some(search);
    result
}

fn cell(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

impl LabReport {
    /// One row per variant.
    fn table(&self) -> Table {
        let mut table = Table::new(&[
            "pattern",
            "variant",
            "max/s",
            "p50 ms",
            "p99 ms",
            "primary tx/s",
            "idle tx/s",
            "replica tx/s",
            "tx/request",
            "status",
        ]);
        for v in &self.variants {
            let status = match (&v.same_as, &v.reason) {
                (Some(same), _) => format!("{} (same topology as {same})", v.status),
                (None, Some(reason)) => format!("{}: {reason}", v.status),
                (None, None) => v.status.clone(),
            };
            table.row(vec![
                v.pattern.clone(),
                v.name.clone(),
                cell(v.max_rate, 0),
                cell(v.p50_ms, 2),
                cell(v.p99_ms, 2),
                cell(v.primary_tx_per_s, 0),
                cell(v.primary_idle_tx_per_s, 0),
                cell(v.replica_tx_per_s, 0),
                cell(v.primary_tx_per_request, 2),
                status,
            ]);
        }
        table
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "pattern lab, scenario {}: highest rate with p99 <= {:.1} ms and errors <= {:.2} % ({:.0} s steps)",
            self.scenario, self.bound.max_p99_ms, self.bound.max_error_percent, self.step_seconds
        );
        out.push_str(&self.table().text());
        out
    }

    pub fn html(&self) -> String {
        let table = self.table().html();
        let bars: Vec<(String, f64)> = self
            .variants
            .iter()
            .map(|v| (v.name.clone(), v.max_rate.unwrap_or(0.0)))
            .collect();
        let chart = crate::plot::bars(
            "highest rate within the bound, per variant",
            "arrivals per second",
            &bars,
        );
        page(
            &format!("scaleshop pattern lab: {}", self.scenario),
            &format!(
                "<p>Each variant is started with scripts/cluster (one instance per service group), searched for its \
                 highest rate with p99 at most {:.1} ms and errors at most {:.2} % ({:.0} s steps), then run once more \
                 at that rate while the databases' transaction counters are read.</p>{table}<figure>{chart}</figure>",
                self.bound.max_p99_ms, self.bound.max_error_percent, self.step_seconds
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_by_name_or_pattern_and_unknown_ones_refused() {
        let names = |list: &[&str]| {
            select(&list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .map(|v| v.iter().map(|v| v.name).collect::<Vec<_>>())
        };
        assert_eq!(
            names(&["cache"]),
            Ok(vec!["cache-off", "cache-l1", "cache-l1-l2"])
        );
        assert_eq!(names(&["bus-nats", "split"]), Ok(vec!["split", "bus-nats"]));
        assert!(names(&["warp-drive"]).is_err_and(|e| e.to_string().contains("warp-drive")));
    }

    #[test]
    fn the_cluster_env_file_as_scripts_cluster_writes_it() {
        let text = "# Written by scripts/cluster\nexport SCALESHOP_URL=http://127.0.0.1:4000\n\
                    export SCALESHOP_ADMIN_PASSWORD=abc-_9\nexport SCALESHOP_READ_REPLICA_URLS=postgres://a/x\\?y=1\\,postgres://b\n";
        let env = parse_env(text);
        assert_eq!(env["SCALESHOP_URL"], "http://127.0.0.1:4000");
        assert_eq!(env["SCALESHOP_ADMIN_PASSWORD"], "abc-_9");
        assert_eq!(
            env["SCALESHOP_READ_REPLICA_URLS"],
            "postgres://a/x?y=1,postgres://b"
        );
        assert_eq!(env.len(), 3);
    }
}
