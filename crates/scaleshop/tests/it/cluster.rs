//! The local cluster (`scripts/cluster`): PostgreSQL, Redis, instances of the
//! built binary and HAProxy in front; two instances of target `all`, or
//! (`--split`) two of each service group. Driven through the gateway only: orders
//! under load from several clients, one instance (split: one orders instance)
//! killed with SIGKILL mid-load. Then every accepted order exists and is final,
//! none is charged twice, the gateway marked the dead instance down and kept
//! answering; `down` leaves none of the recorded processes running. And the gateway's retry rule, against two
//! stand-in servers, one of which reads each request and closes without answering:
//! only a request safe to repeat is sent again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use scaleshop_testkit::gateway::{Gateway, Instance};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

use crate::process::{Api, client, gauge};
use crate::recovery::{
    CLIENTS, STOCK, Shared, accepted_orders_charged_once_and_stock_adds_up, is_final, orders,
    watch_stock,
};
use crate::saga_crash::{customer, product};

/// Every accepted order must be final this long after the kill (an order the dead
/// instance held waits for its leases, 4 s, to expire).
const FINAL_WITHIN: Duration = Duration::from_secs(60);

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/cluster")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn has_haproxy() -> bool {
    Command::new("sh")
        .args(["-c", "command -v haproxy"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `scripts/cluster COMMAND DIR ARGS...`, bounded by `timeout`; its status and output.
fn cluster(command: &str, dir: &Path, args: &[&str]) -> (bool, String) {
    cluster_with(command, dir, args, &[])
}

/// [`cluster`] with more variables in its environment (`SCALESHOP_*` ones reach
/// every instance).
fn cluster_with(command: &str, dir: &Path, args: &[&str], vars: &[(&str, &str)]) -> (bool, String) {
    let output = Command::new("timeout")
        .arg("300")
        .arg(script())
        .arg(command)
        .arg(dir)
        .args(args)
        .env("SCALESHOP_BIN", env!("CARGO_BIN_EXE_scaleshop"))
        .envs(vars.iter().copied())
        .output()
        .expect("run scripts/cluster");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Stops the cluster when the test ends, passed or not.
pub(crate) struct Down(pub(crate) PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        if !self.0.join("parts").exists() {
            return;
        }
        let (ok, text) = cluster("down", &self.0, &[]);
        if !ok {
            eprintln!("scripts/cluster down failed: {text}");
        }
    }
}

/// The variables of `DIR/cluster.env`, as a shell that sources it sees them.
fn sourced_env(dir: &Path) -> HashMap<String, String> {
    let output = Command::new("bash")
        .args(["-c", ". \"$1\" && env -0", "bash"])
        .arg(dir.join("cluster.env"))
        .env_clear()
        .output()
        .expect("bash");
    assert!(output.status.success(), "sourcing cluster.env failed");
    output
        .stdout
        .split(|b| *b == 0)
        .filter_map(|pair| {
            let pair = String::from_utf8_lossy(pair);
            let (key, value) = pair.split_once('=')?;
            Some((key.to_owned(), value.to_owned()))
        })
        .collect()
}

/// A recorded part of `DIR/parts`: name, kind, pid and the process's start time.
#[derive(Debug, Clone)]
pub(crate) struct Part {
    name: String,
    kind: String,
    pid: u32,
    start: String,
}

fn parts(dir: &Path) -> Vec<Part> {
    std::fs::read_to_string(dir.join("parts"))
        .expect("DIR/parts")
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            assert_eq!(fields.len(), 7, "a parts line has 7 fields: {line}");
            Part {
                name: fields[0].to_owned(),
                kind: fields[1].to_owned(),
                pid: fields[3].parse().expect("pid"),
                start: fields[4].to_owned(),
            }
        })
        .collect()
}

/// Whether the process recorded as `part` still runs (not a zombie, and not a later
/// process that got its pid).
fn still_runs(part: &Part) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", part.pid)) else {
        return false;
    };
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields.first() != Some(&"Z") && fields.get(19) == Some(&part.start.as_str())
}

/// HAProxy's status and total sessions of each server of `backend`, from its
/// statistics CSV (fields `svname`, `stot` and `status`).
async fn gateway_stats(stats_url: &str, backend: &str) -> HashMap<String, (String, u64)> {
    let Ok(response) = client()
        .get(format!("{stats_url};csv"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
    else {
        return HashMap::new();
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            (fields.len() > 17
                && fields[0] == backend
                && fields[1] != "FRONTEND"
                && fields[1] != "BACKEND")
                .then(|| {
                    let sessions = fields[7].parse().unwrap_or(0);
                    (fields[1].to_owned(), (fields[17].to_owned(), sessions))
                })
        })
        .collect()
}

/// HAProxy's status of each server of `backend`.
async fn gateway_servers(stats_url: &str, backend: &str) -> HashMap<String, String> {
    gateway_stats(stats_url, backend)
        .await
        .into_iter()
        .map(|(name, (status, _))| (name, status))
        .collect()
}

/// HAProxy's status says UP (a server in service; "UP 1/2" while one check in a row
/// has failed).
fn is_up(servers: &HashMap<String, String>, name: &str) -> bool {
    servers.get(name).is_some_and(|s| s.starts_with("UP"))
}

/// Out of service ("DOWN 1/2" while one check in a row has passed).
fn is_down(servers: &HashMap<String, String>, name: &str) -> bool {
    servers.get(name).is_some_and(|s| s.starts_with("DOWN"))
}

pub(crate) fn skip_without_haproxy(test: &str) -> bool {
    if !has_haproxy() && !is_root() {
        eprintln!(
            "SKIPPED {test}: haproxy is not installed and cannot be (not root): apt-get install \
             haproxy"
        );
        return true;
    }
    false
}

/// `scripts/cluster up DIR ARGS...`: every expected part recorded and running,
/// `status` clean, `cluster.env` complete. The recorded parts and the environment.
fn up(dir: &Path, args: &[&str], expected: &[&str]) -> (Vec<Part>, HashMap<String, String>) {
    up_with(dir, args, expected, &[])
}

/// A session token of the admin a cluster made (its `cluster.env`).
pub(crate) async fn cluster_admin(gateway: &Api, env: &HashMap<String, String>) -> String {
    gateway
        .sign_in(
            &env["SCALESHOP_ADMIN_EMAIL"],
            &env["SCALESHOP_ADMIN_PASSWORD"],
        )
        .await
}

/// [`up`] with more variables in the environment of every instance.
pub(crate) fn up_with(
    dir: &Path,
    args: &[&str],
    expected: &[&str],
    vars: &[(&str, &str)],
) -> (Vec<Part>, HashMap<String, String>) {
    let started = Instant::now();
    let (ok, text) = cluster_with("up", dir, args, vars);
    assert!(ok, "scripts/cluster up failed:\n{text}");
    eprintln!("cluster up {args:?} in {:?}", started.elapsed());
    let recorded = parts(dir);
    // Instances are recorded in the order they came up (one may be started again
    // on a new port if another process took its port first).
    let mut names: Vec<&str> = recorded.iter().map(|p| p.name.as_str()).collect();
    names.sort_unstable();
    let mut expected = expected.to_vec();
    expected.sort_unstable();
    assert_eq!(names, expected);
    assert!(recorded.iter().all(still_runs), "{recorded:?}");
    let (ok, status) = cluster("status", dir, &[]);
    assert!(ok, "status after up: {status}");

    let env = sourced_env(dir);
    for key in [
        "SCALESHOP_URL",
        "SCALESHOP_ADMIN_EMAIL",
        "SCALESHOP_ADMIN_PASSWORD",
        "SCALESHOP_DATABASE_URL",
        "SCALESHOP_REDIS_URL",
        "SCALESHOP_GATEWAY_STATS_URL",
    ] {
        assert!(
            env.get(key).is_some_and(|v| !v.is_empty()),
            "{key} missing from cluster.env: {env:?}"
        );
    }
    (recorded, env)
}

/// Every order of every customer, or None when the gateway did not answer a page
/// with one (a 5xx while an instance is out).
async fn try_all_orders(api: &Api, tokens: &[String]) -> Option<Vec<Value>> {
    let mut all = Vec::new();
    for token in tokens {
        let mut cursor: Option<String> = None;
        for _ in 0..100 {
            let mut url = api.url("/v1/orders?limit=100");
            if let Some(c) = &cursor {
                url.push_str(&format!("&cursor={c}"));
            }
            let r = api.client.get(url).bearer_auth(token).send().await.ok()?;
            if !r.status().is_success() {
                return None;
            }
            let page: Value = r.json().await.ok()?;
            all.extend(page["items"].as_array().cloned().unwrap_or_default());
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
    }
    Some(all)
}

/// Which instance dies, and where the gateway sees it.
struct Kill<'a> {
    /// The test's name, for its report.
    test: &'a str,
    /// The backend that serves `/v1/orders`.
    backend: &'a str,
    victim: &'a str,
    survivor: &'a str,
    /// The cluster carries its events over NATS (`--nats`).
    nats: bool,
}

/// Through the gateway only: customers and products, then orders from several
/// clients, each with an Idempotency-Key; mid-load `kill.victim` is killed with
/// SIGKILL. The gateway marks it down and keeps answering; every accepted order
/// exists and becomes final, none is charged twice, the stock adds up. Then
/// `status` names the dead instance and `down` stops every recorded process.
async fn orders_survive_a_killed_instance(
    dir: &Path,
    recorded: &[Part],
    env: &HashMap<String, String>,
    kill: Kill<'_>,
) {
    let gateway = Api::new(env["SCALESHOP_URL"].clone());
    let stats = env["SCALESHOP_GATEWAY_STATS_URL"].clone();
    let servers = gateway_servers(&stats, kill.backend).await;
    assert!(
        is_up(&servers, kill.victim) && is_up(&servers, kill.survivor),
        "{servers:?}"
    );

    let admin = cluster_admin(&gateway, env).await;
    let products = [
        product(&gateway, &admin, "C-A", STOCK[0]).await,
        product(&gateway, &admin, "C-B", STOCK[1]).await,
    ];
    let mut tokens = Vec::new();
    for c in 0..CLIENTS {
        tokens.push(customer(&gateway, &format!("cluster{c}@example.com")).await);
    }
    // Every instance serves: a sign-in on one, its token on the other (keys shared
    // through the database), over several requests spread by round robin.
    for _ in 0..4 {
        let me = gateway
            .get_json("/v1/me", Some(&tokens[0]))
            .await
            .expect("me");
        assert_eq!(me["email"], "cluster0@example.com");
    }

    let shared = Shared::new(gateway.base.clone());
    let clients: Vec<_> = tokens
        .iter()
        .enumerate()
        .map(|(c, token)| tokio::spawn(orders(c, token.clone(), products.clone(), shared.clone())))
        .collect();
    let watcher = tokio::spawn(watch_stock(products.clone(), shared.clone()));

    // Mid-load, SIGKILL one instance by its recorded pid; both it and the other
    // one have taken orders by then (round robin).
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let before = gateway_stats(&stats, kill.backend).await;
    let sessions = |name: &str| before.get(name).map_or(0, |(_, sessions)| *sessions);
    assert!(
        sessions(kill.victim) > 0 && sessions(kill.survivor) > 0,
        "the load did not reach both instances: {before:?}"
    );
    let victim = recorded
        .iter()
        .find(|p| p.name == kill.victim)
        .expect("the victim is recorded")
        .clone();
    assert_eq!(victim.kind, "instance");
    let status = Command::new("kill")
        .args(["-KILL", &victim.pid.to_string()])
        .status()
        .expect("kill -KILL");
    assert!(status.success());
    let killed = Instant::now();

    // HAProxy marks it down (health checks every 500 ms, down after 2 failures).
    let marked_down = crate::process::eventually(Duration::from_secs(10), || async {
        let servers = gateway_servers(&stats, kill.backend).await;
        (is_down(&servers, kill.victim) && is_up(&servers, kill.survivor)).then(|| killed.elapsed())
    })
    .await;

    // The gateway keeps answering: reads of products and of orders, and a new
    // order, each on the first try.
    for i in 0..20 {
        let r = gateway
            .client
            .get(gateway.url(&format!("/v1/products/{}", products[i % 2])))
            .send()
            .await
            .expect("read through the gateway");
        assert_eq!(r.status().as_u16(), 200, "product read {i} after the kill");
        let r = gateway
            .client
            .get(gateway.url("/v1/orders"))
            .bearer_auth(&tokens[i % CLIENTS])
            .send()
            .await
            .expect("read through the gateway");
        assert_eq!(r.status().as_u16(), 200, "orders read {i} after the kill");
    }
    let r = gateway
        .client
        .post(gateway.url("/v1/orders"))
        .bearer_auth(&tokens[0])
        .header("Idempotency-Key", "after-the-kill")
        .json(&json!({"items": [{"product_id": products[0], "quantity": 1}], "payment_method": "pm_card_visa"}))
        .send()
        .await
        .expect("order through the gateway");
    let status = r.status().as_u16();
    let body = r.text().await.expect("order");
    assert_eq!(status, 202, "an order after the kill: {body}");
    let after_kill: Value = serde_json::from_str(&body).expect("order");
    let mut accepted = vec![(
        after_kill["id"].as_str().expect("id").to_owned(),
        "pm_card_visa",
    )];

    // More load on the survivor, then let the clients finish the order each is on.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    shared.stop.store(true, Ordering::Relaxed);
    for c in clients {
        accepted.extend(c.await.expect("client"));
    }
    let samples = watcher.await.expect("stock watcher");
    assert!(samples > 0, "the stock was never seen");
    assert!(
        accepted.len() >= 30,
        "only {} orders accepted",
        accepted.len()
    );

    // Every order becomes final within the bound (the dead instance's sagas move
    // to the survivor once their leases expire).
    let mut final_after = None;
    let mut all = Vec::new();
    // Lists the gateway could not answer while polling (none expected; counted
    // and reported rather than fatal here: the bound on finality decides).
    let mut unanswered = 0;
    while killed.elapsed() < FINAL_WITHIN {
        let Some(listed) = try_all_orders(&gateway, &tokens).await else {
            unanswered += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        all = listed;
        // Lists come from the order-history projection, which may be a moment
        // behind: every accepted order listed, and each final.
        let listed_all = accepted
            .iter()
            .all(|(id, _)| all.iter().any(|o| o["id"] == id.as_str()));
        if listed_all && all.iter().all(is_final) {
            final_after = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let statuses = all
        .iter()
        .fold(HashMap::<String, usize>::new(), |mut m, o| {
            *m.entry(format!("{}/{}", o["status"], o["failure_reason"]))
                .or_default() += 1;
            m
        });
    eprintln!(
        "{}: {} accepted, {} orders; {} marked down {marked_down:?} after the kill; every \
         order final {final_after:?} after it; {} in-flight (409) answers; {unanswered} \
         order lists unanswered while polling; {statuses:?}",
        kill.test,
        accepted.len(),
        all.len(),
        kill.victim,
        shared.in_flight_answers.load(Ordering::Relaxed),
    );
    assert!(
        final_after.is_some(),
        "orders not final {FINAL_WITHIN:?} after the kill: {:#?}",
        all.iter().filter(|o| !is_final(o)).collect::<Vec<_>>()
    );
    accepted_orders_charged_once_and_stock_adds_up(&gateway, &admin, &all, &accepted, &products)
        .await;

    if kill.nats {
        // The events went through NATS: the instances report the relay's backlog
        // (a gauge only the NATS transport has), and it is empty.
        let addresses: Vec<String> = std::fs::read_to_string(dir.join("parts"))
            .expect("DIR/parts")
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split('\t').collect();
                (fields[1] == "instance" && fields[0] != kill.victim).then(|| fields[5].to_owned())
            })
            .collect();
        let mut backlogs = Vec::new();
        for _ in 0..300 {
            backlogs.clear();
            for address in &addresses {
                let api = Api::new(format!("http://{address}"));
                backlogs.push(gauge(&api, "relay_backlog").await);
            }
            if backlogs.iter().all(|b| *b == Some(0.0)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            backlogs.iter().all(|b| *b == Some(0.0)),
            "relay_backlog of {addresses:?}: {backlogs:?}"
        );
    }

    // `status` tells the dead instance apart; `down` stops every recorded process.
    let (ok, status) = cluster("status", dir, &[]);
    assert!(!ok, "status with a dead instance: {status}");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with(&format!("{} ", kill.victim)) && l.contains(" down ")),
        "{status}"
    );
    let (ok, text) = cluster("down", dir, &[]);
    assert!(ok, "scripts/cluster down failed:\n{text}");
    let left: Vec<&Part> = recorded.iter().filter(|p| still_runs(p)).collect();
    assert!(left.is_empty(), "still running after down: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_of_two_behind_haproxy_survives_a_killed_instance() {
    const TEST: &str = "cluster_of_two_behind_haproxy_survives_a_killed_instance";
    if skip_without_haproxy(TEST) {
        return;
    }
    let dir = scaleshop_testkit::temp_dir("scaleshop-cluster");
    // Before `up`: a failed start stops what it started by itself, `down` then
    // finds nothing to stop.
    let _down = Down(dir.clone());
    let (recorded, env) = up(
        &dir,
        &["--instances", "2"],
        &["all-1", "all-2", "gateway", "postgres", "redis"],
    );
    let kill = Kill {
        test: TEST,
        backend: "all",
        victim: "all-1",
        survivor: "all-2",
        nats: false,
    };
    orders_survive_a_killed_instance(&dir, &recorded, &env, kill).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The split groups of `scripts/cluster up --split`, as their instances are named
/// and the targets they run.
pub(crate) const SPLIT: [(&str, &str); 5] = [
    ("users", "users"),
    ("catalog", "catalog,inventory,media"),
    ("payments", "payments"),
    ("orders", "orders"),
    ("notifications", "notifications"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn split_cluster_survives_a_killed_orders_instance() {
    const TEST: &str = "split_cluster_survives_a_killed_orders_instance";
    if skip_without_haproxy(TEST) {
        return;
    }
    let started = Instant::now();
    let dir = scaleshop_testkit::temp_dir("scaleshop-split-cluster");
    let _down = Down(dir.clone());
    let mut expected: Vec<String> = SPLIT
        .iter()
        .flat_map(|(name, _)| [format!("{name}-1"), format!("{name}-2")])
        .collect();
    expected.extend(["gateway", "postgres", "redis", "nats"].map(str::to_owned));
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    // The split cluster carries its events over NATS JetStream.
    let (recorded, env) = up(&dir, &["--split", "--instances", "2", "--nats"], &expected);
    assert!(
        env.get("SCALESHOP_NATS_URL")
            .is_some_and(|url| url.starts_with("nats://127.0.0.1:")),
        "SCALESHOP_NATS_URL in cluster.env: {env:?}"
    );

    // Each instance runs its group's target, and the gateway checks each one in
    // its group's backend.
    let targets: HashMap<String, String> = std::fs::read_to_string(dir.join("parts"))
        .expect("DIR/parts")
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            (fields[0].to_owned(), fields[2].to_owned())
        })
        .collect();
    let stats = env["SCALESHOP_GATEWAY_STATS_URL"].clone();
    for (name, target) in SPLIT {
        let backend = target.replace(',', "-");
        let servers = gateway_servers(&stats, &backend).await;
        for i in 1..=2 {
            let instance = format!("{name}-{i}");
            assert_eq!(targets[&instance], target, "{instance}");
            assert!(is_up(&servers, &instance), "{backend}: {servers:?}");
        }
        assert_eq!(servers.len(), 2, "{backend}: {servers:?}");
    }

    // The routes between services pass only on the gateway's address for them,
    // and there they still want a service token.
    let http = client();
    let internal = "/internal/payments/methods?method=pm_card_visa";
    let r = http
        .get(format!("{}{internal}", env["SCALESHOP_URL"]))
        .send()
        .await
        .expect("public gateway");
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(
        r.headers()["content-type"].to_str().expect("type"),
        "application/problem+json"
    );
    let services = env
        .get("SCALESHOP_GATEWAY_SERVICES_URL")
        .expect("SCALESHOP_GATEWAY_SERVICES_URL in cluster.env");
    let r = http
        .get(format!("{services}{internal}"))
        .send()
        .await
        .expect("services gateway");
    assert_eq!(r.status().as_u16(), 401);

    let kill = Kill {
        test: TEST,
        backend: "orders",
        victim: "orders-1",
        survivor: "orders-2",
        nats: true,
    };
    orders_survive_a_killed_instance(&dir, &recorded, &env, kill).await;

    eprintln!("{TEST}: {:?} in all", started.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stand-in server for the gateway: `/readyz` answers 200; any other request is
/// recorded ("METHOD PATH key") and then answered 200, or, with `answer` false,
/// read in full and left without an answer (the connection closed), as a process
/// that dies mid-request.
async fn stand_in(answer: bool) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let line = text.lines().next().unwrap_or_default().to_owned();
                // The body too: the request was read in full.
                let length: usize = text
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .and_then(|n| n.trim().parse().ok())
                    })
                    .unwrap_or(0);
                let head_len = head
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map_or(head.len(), |at| at + 4);
                let mut body = head.len() - head_len;
                while body < length {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => body += n,
                    }
                }
                let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";
                if line.starts_with("GET /readyz ") {
                    let _ = conn.write_all(ok).await;
                    return;
                }
                let key = text
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("idempotency-key: ")
                            .map(str::to_owned)
                    })
                    .unwrap_or_default();
                let mut words = line.split(' ');
                let entry = format!(
                    "{} {} {key}",
                    words.next().unwrap_or_default(),
                    words.next().unwrap_or_default()
                );
                record.lock().await.push(entry);
                if answer {
                    let _ = conn.write_all(ok).await;
                }
                // Dropped: the connection closes, answered or not.
            });
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_sends_again_only_requests_safe_to_repeat() {
    // Installs haproxy when missing and root, as `up` does.
    let installed = Command::new("bash")
        .args(["-c", ". \"$1\" && need_packages", "bash"])
        .arg(script())
        .output()
        .expect("bash");
    if !has_haproxy() {
        eprintln!(
            "SKIPPED gateway_sends_again_only_requests_safe_to_repeat: haproxy is not installed \
             and cannot be: {}",
            String::from_utf8_lossy(&installed.stderr)
        );
        return;
    }
    let (dying, dying_seen) = stand_in(false).await;
    let (answering, answering_seen) = stand_in(true).await;
    let dir = scaleshop_testkit::temp_dir("scaleshop-gateway");
    // The configuration exactly as `scripts/cluster up` renders it.
    let plan = [("dying", dying), ("answering", answering)].map(|(name, port)| Instance {
        name: name.into(),
        target: "all".into(),
        port,
    });
    let gateway = Gateway::start(&dir, &plan, None);
    let stats = gateway.stats_url();
    crate::process::eventually(Duration::from_secs(10), || async {
        let servers = gateway_servers(&stats, "all").await;
        (is_up(&servers, "dying") && is_up(&servers, "answering")).then_some(())
    })
    .await;

    // A new connection per request. On a kept-alive connection, HAProxy answers a
    // later request whose server closed without answering by closing the client's
    // connection instead of a 502 (what an HTTP client does then is up to it: a
    // POST must not be sent again unless it carries an Idempotency-Key).
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let base = gateway.url();
    const EACH: usize = 6;
    let mut unkeyed = Vec::new();
    for i in 0..EACH {
        let r = http
            .post(format!("{base}/v1/users"))
            .json(&json!({"email": format!("u{i}@example.com")}))
            .send()
            .await
            .expect("through the gateway");
        unkeyed.push(r.status().as_u16());
    }
    let mut keyed = Vec::new();
    let mut reads = Vec::new();
    for i in 0..EACH {
        let r = http
            .post(format!("{base}/v1/orders"))
            .header("Idempotency-Key", format!("k{i}"))
            .json(&json!({}))
            .send()
            .await
            .expect("through the gateway");
        keyed.push(r.status().as_u16());
        let r = http
            .get(format!("{base}/v1/products/{i}"))
            .send()
            .await
            .expect("through the gateway");
        reads.push(r.status().as_u16());
    }
    let dying_seen = dying_seen.lock().await.clone();
    let answering_seen = answering_seen.lock().await.clone();
    eprintln!(
        "gateway retries: sign-ups {unkeyed:?}, keyed orders {keyed:?}, reads {reads:?}; \
         the dying server saw {dying_seen:?}; the answering one {answering_seen:?}"
    );
    let count =
        |seen: &[String], prefix: &str| seen.iter().filter(|s| s.starts_with(prefix)).count();

    // A request without a key that reached the dying server is not sent again: the
    // client gets the error, and no sign-up arrives twice.
    let failed = unkeyed.iter().filter(|s| **s == 502).count();
    assert_eq!(failed, count(&dying_seen, "POST /v1/users"), "{unkeyed:?}");
    assert!(
        failed > 0,
        "round robin sent no sign-up to the dying server"
    );
    assert_eq!(
        count(&dying_seen, "POST /v1/users") + count(&answering_seen, "POST /v1/users"),
        EACH,
        "a sign-up was sent twice"
    );
    assert!(
        unkeyed.iter().all(|s| *s == 200 || *s == 502),
        "{unkeyed:?}"
    );
    // With an Idempotency-Key, and a GET, it is sent to the other server: every
    // client got its answer, and each reached the answering server exactly once.
    assert!(keyed.iter().all(|s| *s == 200), "{keyed:?}");
    assert!(reads.iter().all(|s| *s == 200), "{reads:?}");
    assert!(count(&dying_seen, "POST /v1/orders") > 0, "{dying_seen:?}");
    for i in 0..EACH {
        let entry = format!("POST /v1/orders k{i}");
        assert_eq!(
            answering_seen.iter().filter(|s| **s == entry).count(),
            1,
            "{answering_seen:?}"
        );
        let read = format!("GET /v1/products/{i} ");
        assert_eq!(
            answering_seen.iter().filter(|s| **s == read).count(),
            1,
            "{answering_seen:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `up --instances 1 --replicas 1 --replica-delay 1000`: a streaming replica that
/// applies commits 1 s late, which the instance reads from. Through the gateway: a
/// product just made is not found without the write's token (read on the replica)
/// and found with it; `status` shows the replica streaming; `down` stops it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_with_a_lagging_replica_reads_from_it() {
    if !has_haproxy() && !is_root() {
        eprintln!(
            "SKIPPED cluster_with_a_lagging_replica_reads_from_it: haproxy is not installed \
             and cannot be (not root): apt-get install haproxy"
        );
        return;
    }
    let dir = scaleshop_testkit::temp_dir("scaleshop-cluster");
    let _down = Down(dir.clone());
    let (ok, text) = cluster(
        "up",
        &dir,
        &[
            "--instances",
            "1",
            "--replicas",
            "1",
            "--replica-delay",
            "1000",
        ],
    );
    assert!(ok, "scripts/cluster up failed:\n{text}");
    let recorded = parts(&dir);
    let mut names: Vec<&str> = recorded.iter().map(|p| p.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["all-1", "gateway", "postgres", "redis", "replica-1"]
    );
    assert!(recorded.iter().all(still_runs), "{recorded:?}");
    let (ok, status) = cluster("status", &dir, &[]);
    assert!(ok, "status after up: {status}");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("replica-1 ") && l.contains("ready (streaming)")),
        "{status}"
    );

    let env = sourced_env(&dir);
    let replica_url = env
        .get("SCALESHOP_READ_REPLICA_URLS")
        .expect("SCALESHOP_READ_REPLICA_URLS in cluster.env");
    let replica = replica_url
        .trim_start_matches("postgres://postgres@")
        .split('/')
        .next()
        .expect("host:port")
        .to_owned();
    let gateway = Api::new(env["SCALESHOP_URL"].clone());
    // The instance lists the replica; it gets reads once the monitor has seen it
    // within the lag bound (a loaded machine can take a few samples).
    let mut ready = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        ready = gateway
            .get_json("/readyz", None)
            .await
            .unwrap_or(Value::Null);
        if ready["replicas"][&replica] == "up" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready["replicas"][&replica], "up", "{ready}");

    let admin = cluster_admin(&gateway, &env).await;
    let (mut stale, mut fresh) = (0, 0);
    for i in 0..5 {
        let created = gateway
            .client
            .post(gateway.url("/v1/products"))
            .bearer_auth(&admin)
            .json(
                &json!({"sku": format!("REP-{i}"), "name": "Replicated", "price_cents": 100,
                          "currency": "EUR", "initial_stock": 1}),
            )
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("create product");
        assert_eq!(created.status().as_u16(), 201);
        let token = created.headers()["x-consistency-token"].clone();
        let id = created.json::<Value>().await.expect("product")["id"]
            .as_str()
            .expect("id")
            .to_owned();
        let path = gateway.url(&format!("/v1/products/{id}"));
        let plain = gateway
            .client
            .get(&path)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("read");
        if plain.status().as_u16() == 404 {
            stale += 1;
        }
        let with_token = gateway
            .client
            .get(&path)
            .header("x-consistency-token", token)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("read with the token");
        assert_eq!(with_token.status().as_u16(), 200, "read with the token");
        fresh += 1;
    }
    eprintln!(
        "cluster with a replica 1 s behind: {stale} of 5 reads without a token stale, \
         {fresh} of 5 with it fresh"
    );
    assert!(
        stale > 0,
        "no read without a token was stale: not on the replica"
    );

    let (ok, text) = cluster("down", &dir, &[]);
    assert!(ok, "scripts/cluster down failed:\n{text}");
    assert!(text.contains("replica-1: stopped"), "{text}");
    let left: Vec<&Part> = recorded.iter().filter(|p| still_runs(p)).collect();
    assert!(left.is_empty(), "still running after down: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every PromQL expression of the Grafana dashboard and of the recording rules,
/// and every metric the alert rules read, returns data from a real Prometheus
/// that scrapes a running cluster (one instance of target `all` on PostgreSQL with
/// a read replica, Redis and NATS) after a short load: no panel or rule reads a
/// metric that does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_reads_every_dashboard_and_rule_query_from_a_running_cluster() {
    const TEST: &str = "prometheus_reads_every_dashboard_and_rule_query_from_a_running_cluster";
    if skip_without_haproxy(TEST) {
        return;
    }
    let prometheus_bin =
        std::env::var("SCALESHOP_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
    let dir = scaleshop_testkit::temp_dir("scaleshop-prometheus");
    let _down = Down(dir.join("cluster"));
    let (recorded, env) = up(
        &dir.join("cluster"),
        &["--instances", "1", "--replicas", "1", "--nats"],
        &["all-1", "gateway", "postgres", "replica-1", "redis", "nats"],
    );
    assert!(recorded.iter().any(|p| p.kind == "instance"));
    let instance = std::fs::read_to_string(dir.join("cluster/parts"))
        .expect("DIR/parts")
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            (fields[1] == "instance").then(|| fields[5].to_owned())
        })
        .expect("an instance");

    // A short load through the gateway: reads (cache hits and misses, a 404),
    // sign-ups, orders that complete and one that fails.
    let gateway = Api::new(env["SCALESHOP_URL"].clone());
    let admin = cluster_admin(&gateway, &env).await;
    let product_id = product(&gateway, &admin, "P-1", 3).await;
    let token = customer(&gateway, "watcher@example.com").await;
    for i in 0..4 {
        let r = gateway
            .client
            .post(gateway.url("/v1/orders"))
            .bearer_auth(&token)
            .header("Idempotency-Key", format!("prometheus-{i}"))
            .json(&json!({"items": [{"product_id": product_id, "quantity": 1}], "payment_method": "pm_card_visa"}))
            .send()
            .await
            .expect("order");
        assert_eq!(r.status().as_u16(), 202);
    }
    for _ in 0..20 {
        gateway
            .get_json(&format!("/v1/products/{product_id}"), None)
            .await;
    }
    let missing = gateway
        .client
        .get(gateway.url("/v1/products/00000000-0000-7000-8000-000000000000"))
        .send()
        .await
        .expect("a missing product");
    assert_eq!(missing.status().as_u16(), 404);

    // Prometheus scraping the instance every second, evaluating the rules every
    // second.
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/prometheus/rules");
    let port = scaleshop_testkit::gateway::free_port();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}/*.yml\n\
             scrape_configs:\n  - job_name: scaleshop\n    static_configs:\n      - targets: [\"{instance}\"]\n",
            rules.display()
        ),
    )
    .expect("prometheus.yml");
    let prometheus = Command::new(&prometheus_bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{prometheus_bin} ({e}): scripts/test installs Debian's prometheus")
        });
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _stop = Stop(prometheus);

    let mut queries: Vec<(String, String)> = Vec::new();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana/scaleshop.json"),
        )
        .expect("the dashboard"),
    )
    .expect("dashboard JSON");
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push((
                format!("panel {}", panel["title"]),
                target["expr"].as_str().expect("expr").to_owned(),
            ));
        }
    }
    for file in ["recording.yml", "alerts.yml"] {
        let rules: Value =
            serde_norway::from_str(&std::fs::read_to_string(rules.join(file)).expect("rules"))
                .expect("rules YAML");
        for group in rules["groups"].as_array().expect("groups") {
            for rule in group["rules"].as_array().expect("rules") {
                if let Some(record) = rule["record"].as_str() {
                    queries.push((format!("recording rule {record}"), record.to_owned()));
                } else {
                    let alert = rule["alert"].as_str().expect("alert");
                    let expr = rule["expr"].as_str().expect("expr");
                    for name in metric_names(expr) {
                        queries.push((
                            format!("alert {alert}"),
                            format!("count({{__name__=\"{name}\"}})"),
                        ));
                    }
                }
            }
        }
    }
    let api = format!("http://127.0.0.1:{port}/api/v1/query");
    let http = client();
    let mut missing = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        missing.clear();
        for (origin, query) in &queries {
            let answer: Option<Value> = match http.get(&api).query(&[("query", query)]).send().await
            {
                Ok(r) => r.json().await.ok(),
                Err(_) => None,
            };
            let has_data = answer
                .as_ref()
                .and_then(|a| a["data"]["result"].as_array())
                .is_some_and(|r| !r.is_empty());
            if !has_data {
                missing.push(format!("{origin}: {query}"));
            }
        }
        if missing.is_empty() || Instant::now() >= deadline {
            break;
        }
        // More traffic, so that every rate has two samples.
        gateway
            .get_json(&format!("/v1/products/{product_id}"), None)
            .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(
        missing.is_empty(),
        "queries without data after 60 s:\n{}",
        missing.join("\n")
    );
    eprintln!("{TEST}: {} queries answered with data", queries.len());
}

/// The metric names a PromQL expression reads (identifiers followed by `{`, `[`
/// or `)`, that are not functions, keywords or recording-rule names).
fn metric_names(expr: &str) -> Vec<String> {
    const NOT_METRICS: &[&str] = &[
        "sum",
        "max",
        "min",
        "by",
        "and",
        "or",
        "rate",
        "increase",
        "count",
        "histogram_quantile",
        "label_replace",
    ];
    let mut names = Vec::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_alphabetic() || chars[i] == '_' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let inside_quotes = chars[..start].iter().filter(|c| **c == '"').count() % 2 == 1;
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            let inside_labels =
                chars[..start].iter().rev().find(|c| matches!(c, '{' | '}')) == Some(&'{');
            // `by (queue)`: a list of labels, not a metric.
            let before: String = chars[..start].iter().collect();
            let before = before.trim_end();
            let label_list = before.strip_suffix('(').is_some_and(|b| {
                let b = b.trim_end();
                b.ends_with("by") || b.ends_with("without")
            });
            if !inside_quotes
                && !inside_labels
                && !label_list
                && !word.contains(':')
                && !NOT_METRICS.contains(&word.as_str())
                && matches!(next, Some('{') | Some('[') | Some(')') | Some(' ') | None)
                && !names.contains(&word)
            {
                names.push(word);
            }
        } else {
            i += 1;
        }
    }
    names
}
