//! Sign-in limits shared by every instance through Redis, and what happens when
//! Redis dies: two app processes on one PostgreSQL database and one Redis.

use std::time::{Duration, Instant};

use reqwest::{Response, StatusCode};
use scaleshop_app::config::Secret;
use scaleshop_testkit::RedisServer;
use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, test_config};

const EMAIL: &str = "shared.limit@example.com";
const PASSWORD: &str = "password-123";
/// Sign-ins per email per minute: a burst of 3, then one every 20 s.
const PER_EMAIL: u32 = 3;

/// Two instances (A, B) sharing the database and `redis`.
async fn two_instances(redis: &RedisServer) -> (TestApp, TestApp) {
    let mut config = test_config(Backend::Postgres).await;
    config.redis_url = Some(Secret::new(redis.url()));
    // A loaded machine can take longer than the default 50 ms for a script;
    // these tests are about sharing, not about timeouts.
    config.redis_timeout_ms = 1_000;
    config.login_rate_per_email = PER_EMAIL;
    let a = TestApp::spawn_with(config.clone(), Backend::Postgres).await;
    let mut other = config.clone();
    other.data_dir = config.data_dir.with_extension("b");
    let b = TestApp::spawn_with(other, Backend::Postgres).await;
    let response = a
        .post("/v1/users")
        .json(&json!({"email": EMAIL, "name": "Shared Limit", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    (a, b)
}

async fn sign_in(app: &TestApp, email: &str, password: &str) -> Response {
    app.post("/v1/sessions")
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
}

fn retry_after(response: &Response) -> u64 {
    response
        .headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

async fn refused(response: Response) -> u64 {
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let seconds = retry_after(&response);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["status"], 429, "{problem}");
    seconds
}

/// The keys Redis holds under `pattern`.
fn redis_keys(redis: &RedisServer, pattern: &str) -> Vec<String> {
    let output = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "--scan",
            "--pattern",
            pattern,
        ])
        .output()
        .expect("redis-cli");
    assert!(output.status.success());
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `cache_errors_total{op="ratelimit"}` (the metrics are the test process's,
/// shared by both instances).
async fn ratelimit_fallbacks(app: &TestApp) -> f64 {
    let text = app
        .get("/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|line| line.starts_with("cache_errors_total{") && line.contains("op=\"ratelimit\""))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_email_sign_in_limit_holds_across_two_instances() {
    let redis = RedisServer::start();
    let (a, b) = two_instances(&redis).await;
    let started = Instant::now();
    // Alternating between the instances, with the email's letter case varying:
    // one key, one quota for both.
    let emails = [
        EMAIL,
        "Shared.Limit@Example.com",
        " SHARED.LIMIT@example.com ",
    ];
    for i in 0..PER_EMAIL as usize {
        let app = if i % 2 == 0 { &a } else { &b };
        let response = sign_in(app, emails[i % emails.len()], "wrong-password").await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    // Each instance alone would still admit some; together they are at the limit.
    let bound = Duration::from_secs(20);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the attempts took {:?}: the limit may have refilled",
        started.elapsed()
    );
    let seconds = refused(sign_in(&b, EMAIL, "wrong-password").await).await;
    assert!(
        (1..=bound.as_secs()).contains(&seconds),
        "Retry-After {seconds}"
    );
    // The right password waits too, on either instance.
    let seconds = refused(sign_in(&a, EMAIL, PASSWORD).await).await;
    assert!(
        (1..=bound.as_secs()).contains(&seconds),
        "Retry-After {seconds}"
    );
    // Another account is not locked out.
    assert_eq!(
        sign_in(&b, "someone.else@example.com", "wrong-password")
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    // The state lives in Redis under opaque keys: no email in them.
    let keys = redis_keys(&redis, "scaleshop:ratelimit:login_email:*");
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(
        keys.iter()
            .all(|key| !key.contains('@') && !key.contains("shared")),
        "{keys:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_killed_each_instance_limits_alone_and_nothing_fails() {
    let redis = RedisServer::start();
    let (a, b) = two_instances(&redis).await;
    let before = ratelimit_fallbacks(&a).await;
    // Two attempts shared through Redis.
    for app in [&a, &b] {
        assert_eq!(
            sign_in(app, EMAIL, "wrong-password").await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    drop(redis);
    // Redis is gone: every request is still answered, never a 5xx, and each
    // instance limits in its own memory (a full quota each: degraded, not open).
    for app in [&a, &b] {
        let started = Instant::now();
        for i in 0..PER_EMAIL {
            let response = sign_in(app, EMAIL, "wrong-password").await;
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "attempt {i}");
        }
        let seconds = refused(sign_in(app, EMAIL, "wrong-password").await).await;
        assert!((1..=20).contains(&seconds), "Retry-After {seconds}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{:?}",
            started.elapsed()
        );
    }
    // Sign-up still answers too (its limit falls back the same way).
    let response = b
        .post("/v1/users")
        .json(&json!({"email": "after.redis@example.com", "name": "After", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    // Every fallback is counted.
    assert!(
        ratelimit_fallbacks(&a).await >= before + 8.0,
        "{} fallbacks",
        ratelimit_fallbacks(&a).await - before
    );
}
