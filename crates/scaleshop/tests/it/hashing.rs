//! 64 concurrent sign-ups against the real binary: the process's peak resident
//! memory stays bounded (password hashing holds at most `password_hash_concurrency`
//! working buffers of 19 MiB), and other routes keep answering meanwhile.

use std::time::{Duration, Instant};

use scaleshop_testkit::Backend;
use serde_json::json;

use crate::process::Deployment;

/// `VmHWM` (peak resident set) and `VmRSS` of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("VmHWM:"), field("VmRSS:"))
}

const SIGN_UPS: usize = 64;
const MIB: u64 = 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sign_ups_keep_memory_bounded_and_other_routes_answer() {
    let mut deployment = Deployment::fresh(Backend::Sqlite).await;
    // The bound is slots × 19 MiB: fix the slots so the figure does not depend on
    // the machine's core count.
    deployment.set("SCALESHOP_PASSWORD_HASH_CONCURRENCY", "2");
    let server = deployment.start().await;
    let pid = server.pid();
    let (peak_before, rss_before) = memory_kib(pid);

    let signing_up = {
        let (client, url) = (server.client.clone(), server.url("/v1/users"));
        tokio::spawn(async move {
            let requests = (0..SIGN_UPS).map(|i| {
                client
                    .post(&url)
                    .json(&json!({"email": format!("crowd{i}@example.com"), "name": "Crowd", "password": "password-123"}))
                    .send()
            });
            futures::future::join_all(requests).await
        })
    };

    // Meanwhile: liveness and a catalog read, each answered (the client gives up
    // after 30 s, twice the request timeout).
    let mut reads = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !signing_up.is_finished() && Instant::now() < deadline && reads < 400 {
        for path in ["/healthz", "/v1/products"] {
            let response = server
                .client
                .get(server.url(path))
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET {path} during the sign-ups: {e}"));
            assert_eq!(response.status().as_u16(), 200, "GET {path}");
            reads += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let responses = signing_up.await.expect("sign-ups");
    assert!(reads >= 2, "no read ran during the sign-ups");

    let (mut created, mut busy) = (0, 0);
    for response in responses {
        let response = response.expect("sign-up answered");
        match response.status().as_u16() {
            201 => created += 1,
            // Waited past password_hash_queue_ms for a slot: refused, with a hint.
            503 => {
                assert!(response.headers().contains_key("retry-after"));
                busy += 1;
            }
            other => panic!("sign-up: {other}"),
        }
    }
    assert!(created >= 1, "no sign-up succeeded");

    let (peak_after, rss_after) = memory_kib(pid);
    eprintln!(
        "memory (MiB): before VmHWM {} VmRSS {}; after {SIGN_UPS} sign-ups ({created} created, {busy} busy, {reads} reads): VmHWM {} VmRSS {}",
        peak_before / MIB,
        rss_before / MIB,
        peak_after / MIB,
        rss_after / MIB
    );
    assert!(
        peak_after < 150 * MIB,
        "peak resident memory {} MiB",
        peak_after / MIB
    );
    assert!(server.terminate().success());
}
