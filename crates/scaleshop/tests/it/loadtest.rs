//! `scaleshop loadtest` as its users run it: the binary against a real
//! `scaleshop serve`, its scenarios over HTTP, its reports on disk; and the lab
//! against `scripts/cluster`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use scaleshop_testkit::Backend;
use serde_json::Value;

use crate::process::{ADMIN_EMAIL, ADMIN_PASSWORD, Deployment};

/// `scaleshop loadtest ARGS...`, bounded (the `timeout` command kills it after 120 s).
fn loadtest(args: &[&str], extra_env: &[(&str, &str)]) -> Output {
    let mut command = Command::new("timeout");
    command
        .arg("120")
        .arg(env!("CARGO_BIN_EXE_scaleshop"))
        .arg("loadtest")
        .args(args)
        .env_remove("SCALESHOP_URL")
        .env_remove("SCALESHOP_ADMIN_EMAIL")
        .env_remove("SCALESHOP_ADMIN_PASSWORD");
    for (k, v) in extra_env {
        command.env(k, v);
    }
    command.output().expect("run scaleshop loadtest")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn report(dir: &Path, name: &str) -> Value {
    let path = dir.join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn kind<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kind"] == name)
        .unwrap_or_else(|| panic!("no kind {name} in {report}"))
}

async fn server() -> (Deployment, crate::process::Server) {
    let mut deployment = Deployment::fresh(Backend::Sqlite).await;
    deployment
        .set("SCALESHOP_LOGIN_RATE_PER_ADDRESS", "100000")
        .set("SCALESHOP_LOGIN_RATE_PER_EMAIL", "100000");
    let server = deployment.start().await;
    (deployment, server)
}

fn out_dir(name: &str) -> PathBuf {
    scaleshop_testkit::temp_dir(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mixed_scenario_seeds_buys_browses_and_signs_up_without_an_error() {
    let (_deployment, server) = server().await;
    let out = out_dir("loadtest-mixed");
    let output = loadtest(
        &[
            "--url",
            &server.base,
            "--scenario",
            "mixed",
            "--seed",
            "--products",
            "20",
            "--shoppers",
            "5",
            "--rate",
            "40",
            "--duration",
            "3s",
            "--out",
            out.to_str().unwrap(),
            "--quiet",
            "--admin-email",
            ADMIN_EMAIL,
            "--admin-password",
            ADMIN_PASSWORD,
        ],
        &[],
    );
    assert!(output.status.success(), "{}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("scenario mixed") && stdout.contains("reports:"),
        "{stdout}"
    );

    let report = report(&out, "report");
    assert_eq!(report["arrivals_sent"], 120, "{report}");
    assert_eq!(report["arrivals_dropped"], 0);
    assert_eq!(report["arrivals_unfinished"], 0);
    assert_eq!(report["all_requests"]["errors"], 0, "{}", text(&output));
    // The mix: browse 80, buy 15, signup 5 of every 100 arrivals (smooth round robin).
    assert_eq!(kind(&report, "signup")["count"], 6);
    assert_eq!(kind(&report, "order_submit")["count"], 18);
    let browse = kind(&report, "product")["count"].as_u64().unwrap()
        + kind(&report, "search")["count"].as_u64().unwrap();
    assert_eq!(browse, 96 + 18, "every buy views its product first");
    assert_eq!(
        kind(&report, "sign_in")["count"],
        5,
        "each shopper signed in once"
    );
    // Every order reached a final state, and the sandbox card pays: all completed.
    assert_eq!(kind(&report, "order_final")["count"], 18);
    assert_eq!(kind(&report, "buy")["errors"], 0);
    assert_eq!(
        report["outcomes"]["order.completed"], 18,
        "{}",
        report["outcomes"]
    );

    // The server agrees: 18 orders, all completed, as its own metrics count them.
    let orders = crate::process::gauge(
        &server,
        "order_outcomes_total{outcome=\"completed\",reason=\"none\"}",
    )
    .await;
    assert_eq!(orders, Some(18.0));
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("order_final"));
    let _ = std::fs::remove_dir_all(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mix_file_sets_its_own_weights_and_settings() {
    let (_deployment, server) = server().await;
    let out = out_dir("loadtest-mix-file");
    let mix = out.join("declines.toml");
    std::fs::write(
        &mix,
        "name = \"declines\"\n[weights]\nbuy = 1\n[settings]\npayment_methods = [\"pm_card_visa\", \"pm_card_chargeDeclined\"]\n",
    )
    .unwrap();
    let output = loadtest(
        &[
            "--scenario",
            mix.to_str().unwrap(),
            "--seed",
            "--products",
            "3",
            "--shoppers",
            "2",
            "--rate",
            "10",
            "--duration",
            "2s",
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ],
        &[
            ("SCALESHOP_URL", &server.base),
            ("SCALESHOP_ADMIN_EMAIL", ADMIN_EMAIL),
            ("SCALESHOP_ADMIN_PASSWORD", ADMIN_PASSWORD),
        ],
    );
    assert!(output.status.success(), "{}", text(&output));
    let report = report(&out, "report");
    assert_eq!(report["scenario"]["name"], "declines");
    // Payment methods in turn: half the orders declined, with their reason.
    assert_eq!(
        report["outcomes"]["order.completed"], 10,
        "{}",
        report["outcomes"]
    );
    assert_eq!(
        report["outcomes"]["order.failed.payment_declined"], 10,
        "{}",
        report["outcomes"]
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn usage_errors_exit_2_and_an_unreachable_target_exits_1_saying_why() {
    let output = loadtest(&["--scenario", "teleport", "--duration", "1s"], &[]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        text(&output).contains("unknown scenario `teleport`"),
        "{}",
        text(&output)
    );

    let output = loadtest(&["--rate", "0"], &[]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));

    // Seeding needs the admin: refused before any load.
    let output = loadtest(
        &[
            "--url",
            "http://127.0.0.1:9",
            "--scenario",
            "browse",
            "--seed",
        ],
        &[],
    );
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(text(&output).contains("--admin-email"), "{}", text(&output));

    // Nothing listens on port 9 of this host.
    let output = loadtest(
        &[
            "--url",
            "http://127.0.0.1:9",
            "--scenario",
            "browse",
            "--duration",
            "1s",
        ],
        &[],
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        text(&output).contains("listing products"),
        "{}",
        text(&output)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lab_measures_two_cache_variants_and_a_sharded_cluster() {
    const TEST: &str = "the_lab_measures_two_cache_variants_and_a_sharded_cluster";
    if crate::cluster::skip_without_haproxy(TEST) {
        return;
    }
    let out = out_dir("loadtest-lab");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/cluster");
    let output = {
        let out = out.clone();
        tokio::task::spawn_blocking(move || {
            Command::new("timeout")
                .arg("600")
                .arg(env!("CARGO_BIN_EXE_scaleshop"))
                .args([
                    "loadtest",
                    "lab",
                    "--variants",
                    "cache-off,cache-l1,shards-2",
                    "--scenario",
                    "browse",
                ])
                .args([
                    "--rate",
                    "50",
                    "--duration",
                    "1s",
                    "--max-steps",
                    "2",
                    "--products",
                    "20",
                    "--quiet",
                ])
                .arg("--cluster-script")
                .arg(&script)
                .arg("--out")
                .arg(&out)
                .env("SCALESHOP_BIN", env!("CARGO_BIN_EXE_scaleshop"))
                .output()
                .expect("run the lab")
        })
        .await
        .unwrap()
    };
    assert!(output.status.success(), "{}", text(&output));
    let lab = report(&out, "lab");
    let variants = lab["variants"].as_array().unwrap();
    let names: Vec<&str> = variants
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cache-off", "cache-l1", "shards-2"]);
    for measured in variants {
        assert_eq!(measured["status"], "measured", "{measured}");
        // A sustainable rate was found (how high depends on how busy the
        // machine is: not asserted; the figures are in docs/benchmarks.md).
        assert!(measured["max_rate"].as_f64().unwrap() > 0.0, "{measured}");
        assert!(
            measured["primary_tx_per_s"].as_f64().is_some(),
            "{measured}"
        );
    }
    // Without the cache every product read (80 % of browse) is a database
    // read; with it, almost none. The figures are net of the idle rate, which
    // is itself measured: a margin of 0.3 a request, not the whole 0.8.
    let per_request = |v: &Value| v["primary_tx_per_request"].as_f64().unwrap();
    assert!(
        per_request(&variants[0]) > per_request(&variants[1]) + 0.3,
        "cache off {} vs L1 {} transactions per request",
        per_request(&variants[0]),
        per_request(&variants[1])
    );
    let html = std::fs::read_to_string(out.join("lab.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("cache-l1"));
    // Every variant's cluster was stopped: no process its parts file lists is
    // still alive (a few seconds allowed for the last exits to be reaped).
    let alive = |name: &str| -> Vec<String> {
        let parts = std::fs::read_to_string(out.join("variants").join(name).join("cluster/parts"))
            .unwrap_or_default();
        parts
            .lines()
            .filter(|line| {
                let pid: u32 = line
                    .split('\t')
                    .nth(3)
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                pid != 0 && !status.is_empty() && !status.contains("State:\tZ")
            })
            .map(str::to_owned)
            .collect()
    };
    for name in ["cache-off", "cache-l1"] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while !alive(name).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        assert!(
            alive(name).is_empty(),
            "{name}: still running: {:?}",
            alive(name)
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn the_server_configuration_for_load_tests_is_valid() {
    // README's "Measure it yourself" starts the server with this file.
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/loadtest/server.toml");
    let data = scaleshop_testkit::temp_dir("loadtest-config");
    let output = Command::new(env!("CARGO_BIN_EXE_scaleshop"))
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .arg("migrate")
        .env("SCALESHOP_LOG_FILTER", "warn")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_the_run_and_writes_a_partial_report() {
    let (_deployment, server) = server().await;
    let out = out_dir("loadtest-interrupted");
    let child = Command::new(env!("CARGO_BIN_EXE_scaleshop"))
        .args([
            "loadtest",
            "--url",
            &server.base,
            "--scenario",
            "health",
            "--rate",
            "50",
        ])
        .args(["--duration", "60s", "--quiet", "--out"])
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    // SIGINT, as Ctrl-C sends it, to the process this test started.
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let started = std::time::Instant::now();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert!(output.status.success(), "{}", text(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("interrupted: partial report"));
    let report = report(&out, "report");
    assert_eq!(report["interrupted"], true);
    let sent = report["arrivals_sent"].as_u64().unwrap();
    assert!(
        (50..=200).contains(&sent),
        "{sent} arrivals in about 2 s at 50/s"
    );
    assert_eq!(kind(&report, "healthz")["count"].as_u64(), Some(sent));
    let _ = std::fs::remove_dir_all(&out);
}
