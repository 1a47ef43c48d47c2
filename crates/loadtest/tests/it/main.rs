//! The load generator against small servers made for each property: one that
//! records when each request arrives (the schedule), one that stalls (the
//! coordinated-omission correction), one of limited capacity (--find-max).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed expectation is a failed test"
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use parking_lot::Mutex;
use scaleshop_loadtest::client::{Connection, Fixture, Target};
use scaleshop_loadtest::recorder::Recorder;
use scaleshop_loadtest::report::Report;
use scaleshop_loadtest::run::{Load, Quiet, Ran, run};
use scaleshop_loadtest::scenario::{FlowSettings, Scenario};
use tokio::sync::watch;

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn connection(addr: SocketAddr, connections: usize) -> Connection {
    Connection {
        url: format!("http://{addr}"),
        connections,
        timeout: Duration::from_secs(10),
        poll_interval: Duration::from_millis(10),
        order_timeout: Duration::from_secs(5),
    }
}

fn load(rate: f64, seconds: f64) -> Load {
    Load {
        rate,
        duration: Duration::from_secs_f64(seconds),
        max_sessions: 10_000,
        drain: Duration::from_secs(10),
    }
}

/// Runs the `health` scenario; the report and how the run ended.
async fn health(
    addr: SocketAddr,
    connections: usize,
    load: Load,
    stop: watch::Receiver<bool>,
) -> (Report, Ran) {
    let conn = connection(addr, connections);
    let target =
        Arc::new(Target::new(conn.clone(), Fixture::default(), FlowSettings::default()).unwrap());
    let scenario = Scenario::parse("health").unwrap();
    let recorder = Arc::new(Recorder::new());
    let ran = run(
        target,
        &scenario,
        load,
        recorder.clone(),
        Arc::new(Quiet),
        stop,
    )
    .await;
    let report = Report::new(
        &conn.url,
        &scenario,
        &load,
        connections,
        &ran,
        &recorder.snapshot(),
    );
    (report, ran)
}

fn never() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    std::mem::forget(tx);
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_arrival_rate_is_within_two_percent_of_the_target() {
    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let seen = arrivals.clone();
    let app = Router::new().route(
        "/healthz",
        get(move || {
            let seen = seen.clone();
            async move {
                seen.lock().push(Instant::now());
                "{\"status\":\"ok\"}"
            }
        }),
    );
    let addr = serve(app).await;
    let rate = 400.0;
    let (report, ran) = health(addr, 16, load(rate, 3.0), never()).await;
    let arrivals = arrivals.lock().clone();
    // Every scheduled arrival was sent and answered, none dropped.
    assert_eq!(ran.scheduled, 1200);
    assert_eq!(ran.sent, 1200);
    assert_eq!(arrivals.len(), 1200);
    assert_eq!(report.arrivals_dropped, 0);
    assert_eq!(report.all_requests.as_ref().unwrap().errors, 0);
    // The rate the server saw, from the first arrival to the last.
    let span = arrivals
        .last()
        .unwrap()
        .duration_since(arrivals[0])
        .as_secs_f64();
    let seen_rate = (arrivals.len() - 1) as f64 / span;
    assert!(
        (seen_rate / rate - 1.0).abs() <= 0.02,
        "the server saw {seen_rate:.1}/s for a target of {rate}/s"
    );
    // And evenly: every whole second of the run held its share (within 2 %
    // plus the timer's 1 ms steps at a second's edges).
    let start = arrivals[0];
    for second in 0..2u64 {
        let in_second = arrivals
            .iter()
            .filter(|t| t.duration_since(start).as_secs() == second)
            .count() as f64;
        assert!(
            (in_second / rate - 1.0).abs() <= 0.03,
            "second {second}: {in_second} arrivals"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stalls_for_a_second_shows_the_stall_in_p99() {
    // Every request takes this lock; a task holds it for one second, one
    // second into the run: the server answers nothing during that second.
    let gate = Arc::new(tokio::sync::Mutex::new(()));
    let handler_gate = gate.clone();
    let app = Router::new().route(
        "/healthz",
        get(move || {
            let gate = handler_gate.clone();
            async move {
                drop(gate.lock().await);
                "{\"status\":\"ok\"}"
            }
        }),
    );
    let addr = serve(app).await;
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _held = gate.lock().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    // 4 connections: a closed-loop tool would send 4 requests into the stall
    // and wait; their 4 slow answers would be under 1 % of the samples.
    let (report, _) = health(addr, 4, load(200.0, 4.0), never()).await;
    let all = report.all_requests.unwrap();
    assert_eq!(all.count, 800);
    assert_eq!(all.errors, 0);
    // A quarter of the arrivals fall in the stall, waiting from 1 s down to 0:
    // p99 is near the stall's full second, the median is not touched.
    assert!(
        all.p99_ms >= 900.0,
        "p99 {} ms should show the 1 s stall",
        all.p99_ms
    );
    assert!(
        all.max_ms >= 950.0 && all.max_ms < 1500.0,
        "max {} ms",
        all.max_ms
    );
    assert!(
        all.p90_ms >= 400.0,
        "p90 {} ms: the requests queued in the stall count",
        all.p90_ms
    );
    assert!(all.p50_ms < 100.0, "p50 {} ms", all.p50_ms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reports_are_written_and_agree_with_the_summary() {
    let app = Router::new().route("/healthz", get(|| async { "{\"status\":\"ok\"}" }));
    let addr = serve(app).await;
    let (report, _) = health(addr, 8, load(100.0, 2.5), never()).await;
    let dir = std::env::temp_dir().join(format!("loadtest-report-{}", uuid_like()));
    let (json_path, html_path) = report.write(&dir, "report").unwrap();

    // The JSON is the report: read back, it is equal, and so is its summary.
    let back: Report = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(back, report);
    assert_eq!(back.text(), report.text());
    let healthz = back.kinds.iter().find(|k| k.kind == "healthz").unwrap();
    assert_eq!(healthz.count, 250);
    assert!(
        report.text().contains(&format!("{:>9}", 250)),
        "{}",
        report.text()
    );
    assert!(
        back.timeline.len() >= 2,
        "a point per second: {:?}",
        back.timeline
    );

    // The HTML is one well-formed document with its two plots inline.
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert!(
        !html.contains("http://cdn") && !html.contains("<script"),
        "nothing fetched, no script"
    );
    let xml = html.trim_start_matches("<!DOCTYPE html>\n");
    let doc =
        roxmltree::Document::parse(xml).unwrap_or_else(|e| panic!("the HTML does not parse: {e}"));
    let svgs: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("svg"))
        .collect();
    assert_eq!(svgs.len(), 2, "latency over time and by percentile");
    for svg in svgs {
        let lines = svg
            .descendants()
            .filter(|n| n.has_tag_name("polyline") || n.has_tag_name("path"))
            .count();
        assert!(lines >= 1, "a plot with no line");
    }
    let cells: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("td"))
        .filter_map(|n| n.text())
        .collect();
    assert!(
        cells.contains(&"healthz") && cells.contains(&"250"),
        "{cells:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_ends_the_run_at_once_with_a_partial_report() {
    let app = Router::new().route("/healthz", get(|| async { "{\"status\":\"ok\"}" }));
    let addr = serve(app).await;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        tx.send(true).unwrap();
        std::mem::forget(tx);
    });
    let started = Instant::now();
    let (report, ran) = health(addr, 8, load(100.0, 30.0), rx).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(ran.interrupted && report.interrupted);
    assert!(ran.sent >= 100 && ran.sent < 200, "{} sent", ran.sent);
    assert_eq!(report.all_requests.as_ref().unwrap().count, ran.sent);
    assert!(report.text().contains("interrupted: partial report"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_counted_by_status_and_never_improve_the_latency() {
    let app = Router::new().route(
        "/healthz",
        get(|| async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            (axum::http::StatusCode::SERVICE_UNAVAILABLE, "busy")
        }),
    );
    let addr = serve(app).await;
    let (report, _) = health(addr, 8, load(50.0, 1.0), never()).await;
    let all = report.all_requests.clone().unwrap();
    assert_eq!((all.count, all.errors), (50, 50));
    assert_eq!(all.error_classes.get("503"), Some(&50));
    assert!(all.p50_ms >= 30.0, "{}", all.p50_ms);
    assert!((report.error_ratio() - 1.0).abs() < 1e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_max_stops_between_the_rate_that_holds_and_the_one_that_breaks() {
    // One request at a time, 4 ms each: about 250 answers per second at most.
    let one = Arc::new(tokio::sync::Semaphore::new(1));
    let app = Router::new().route(
        "/healthz",
        get(move || {
            let one = one.clone();
            async move {
                let _permit = one.acquire().await.unwrap();
                tokio::time::sleep(Duration::from_millis(4)).await;
                "{\"status\":\"ok\"}"
            }
        }),
    );
    let addr = serve(app).await;
    let args = scaleshop_loadtest::RunArgs {
        url: format!("http://{addr}"),
        scenario: "health".to_owned(),
        rate: 40.0,
        duration: Duration::from_secs(2),
        connections: 16,
        seed: false,
        products: 1,
        shoppers: 1,
        admin_email: None,
        admin_password: None,
        timeout: Duration::from_secs(5),
        poll_interval: Duration::from_millis(10),
        order_timeout: Duration::from_secs(5),
        max_sessions: 10_000,
        find_max: true,
        max_p99: Duration::from_millis(100),
        max_error_percent: 1.0,
        max_steps: 8,
        out: None,
        quiet: true,
    };
    let scenario = Scenario::parse("health").unwrap();
    let search = scaleshop_loadtest::findmax::find_max(&args, &scenario, never())
        .await
        .unwrap();
    let max = search
        .max_sustainable_rate
        .unwrap_or_else(|| panic!("nothing held: {}", search.text()));
    assert!((40.0..=260.0).contains(&max), "{}", search.text());
    let broke = search
        .steps
        .iter()
        .filter(|s| !s.held)
        .map(|s| s.rate)
        .fold(f64::MAX, f64::min);
    assert!(broke > max && broke <= 400.0, "{}", search.text());
    // The best step's report came along, and the text names the answer.
    assert_eq!(search.best.as_ref().map(|b| b.target_rate), Some(max));
    assert!(
        search
            .text()
            .contains(&format!("highest sustainable rate: {max}/s"))
    );
}

fn uuid_like() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}
