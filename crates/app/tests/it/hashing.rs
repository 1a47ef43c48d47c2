//! Password hashing under load: sign-up is rate-limited per client address, and a
//! saturated hasher answers 503 with `Retry-After` rather than queueing without end.

use reqwest::Response;
use serde_json::json;

use crate::conventions::retry_after;
use crate::helpers::{ADMIN_EMAIL, ADMIN_PASSWORD, Backend, TestApp, problem, test_config};

async fn sign_up(app: &TestApp, email: &str) -> Response {
    app.post("/v1/users")
        .json(&json!({"email": email, "name": "Someone", "password": "password-123"}))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_up_is_rate_limited_per_address() {
    let mut config = test_config(Backend::Sqlite).await;
    config.signup_rate_per_address = Some(3);
    let app = TestApp::spawn_with(config, Backend::Sqlite).await;
    for i in 0..3 {
        let response = sign_up(&app, &format!("new{i}@example.com")).await;
        assert_eq!(response.status(), 201, "sign-up {}", i + 1);
    }
    let response = sign_up(&app, "one-too-many@example.com").await;
    retry_after(&response);
    let body = problem(response, 429).await;
    assert_eq!(body["type"], "/problems/rate-limited");
    // Refused before any work: the account does not exist.
    let response = app
        .post("/v1/sessions")
        .json(&json!({"email": "one-too-many@example.com", "password": "password-123"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    // Sign-in has limits of its own.
    app.sign_in(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    app.sign_in("new0@example.com", "password-123").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_hasher_answers_503_with_retry_after() {
    let mut config = test_config(Backend::Sqlite).await;
    config.password_hash_concurrency = Some(1);
    config.password_hash_queue_ms = 1;
    let app = TestApp::spawn_with(config, Backend::Sqlite).await;
    let emails: Vec<String> = (0..16).map(|i| format!("crowd{i}@example.com")).collect();
    let requests = emails.iter().map(|email| sign_up(&app, email));
    let responses = futures::future::join_all(requests).await;
    let (mut created, mut busy) = (0, 0);
    for response in responses {
        match response.status().as_u16() {
            201 => created += 1,
            503 => {
                retry_after(&response);
                let body = problem(response, 503).await;
                assert_eq!(body["type"], "/problems/unavailable");
                busy += 1;
            }
            other => panic!("{other}: {}", response.text().await.unwrap()),
        }
    }
    // One hash takes milliseconds and a waiter gives up after 1 ms: of 16 at once,
    // some run and some are turned away.
    assert!(created >= 1, "none created");
    assert!(busy >= 1, "none refused ({created} created)");
    // The slot is free again afterwards.
    let response = sign_up(&app, "later@example.com").await;
    assert_eq!(response.status(), 201);
    app.sign_in("later@example.com", "password-123").await;
}
