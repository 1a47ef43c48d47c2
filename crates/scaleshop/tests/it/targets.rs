//! `--target`: parsing, the refusal of a target that calls a service it has no
//! address for, and a target that serves only its own routes and runs only its
//! own consumers and jobs (on one shared PostgreSQL, as a split deployment is).

use std::process::Command;
use std::time::Duration;

use scaleshop_testkit::Backend;
use serde_json::{Value, json};

use crate::process::{Deployment, eventually};

fn scaleshop() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_scaleshop"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    command
}

#[test]
fn an_unknown_target_is_refused_with_the_valid_names() {
    for bad in ["nope", "users,nope", "users,"] {
        let out = scaleshop()
            .args(["serve", "--target", bad])
            .output()
            .expect("run");
        assert!(!out.status.success(), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(
                "known targets: all, users, inventory, catalog, payments, orders, notifications, media"
            ),
            "{bad}: {err}"
        );
    }
    let out = scaleshop()
        .args(["migrate", "--target", "orders,nope"])
        .output()
        .expect("run");
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_without_the_address_of_a_service_it_calls_is_refused_naming_the_key() {
    let deployment = Deployment::fresh(Backend::Postgres).await;
    let (status, err) = deployment.with_target("orders").run_to_exit();
    assert!(!status.success());
    assert!(
        err.contains("service_url_users") && err.contains("SCALESHOP_SERVICE_URL_USERS"),
        "{err}"
    );
    let (status, err) = deployment
        .with_target("orders,users,catalog,inventory")
        .run_to_exit();
    assert!(!status.success());
    assert!(err.contains("SCALESHOP_SERVICE_URL_PAYMENTS"), "{err}");
    // A service called in-process only cannot be replaced by an address.
    let mut with_url = deployment.with_target("media");
    with_url.set("SCALESHOP_SERVICE_URL_CATALOG", "http://127.0.0.1:9");
    let (status, err) = with_url.run_to_exit();
    assert!(!status.success());
    assert!(err.contains("media calls catalog in-process"), "{err}");
    // Part of the system on SQLite cannot share the event log with the rest.
    let mut sqlite = deployment.with_target("users");
    sqlite.database_url = None;
    let (status, err) = sqlite.run_to_exit();
    assert!(!status.success());
    assert!(err.contains("SCALESHOP_DATABASE_URL"), "{err}");
}

async fn consumers(url: &str) -> Vec<String> {
    let db = scaleshop_db::Database::connect(
        Some(url),
        &std::env::temp_dir(),
        &scaleshop_db::PoolSettings {
            min_connections: 0,
            ..Default::default()
        },
    )
    .await
    .expect("connect");
    let names: Vec<String> = scaleshop_db::with_pool!(db, pool => {
        scaleshop_db::sqlx::query_scalar("SELECT name FROM event_consumers ORDER BY name")
            .fetch_all(pool)
            .await
            .expect("consumers")
    });
    db.close().await;
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_serves_only_its_own_routes_and_runs_only_its_own_work() {
    let mut deployment = Deployment::fresh(Backend::Postgres).await;
    deployment.set("SCALESHOP_EVENT_POLL_MS", "100");
    let url = deployment.database_url.clone().expect("postgres");
    let users = deployment.with_target("users").start().await;
    let admin = users.admin_token().await;
    // Its own routes answer; the others' are not there.
    let me = users
        .client
        .get(users.url("/v1/me"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("me");
    assert_eq!(me.status().as_u16(), 200);
    let r = users
        .client
        .post(users.url("/v1/users"))
        .json(&json!({"email": "ada@example.com", "name": "Ada", "password": "password-123"}))
        .send()
        .await
        .expect("sign up");
    assert_eq!(r.status().as_u16(), 201);
    for (method, path) in [
        ("GET", "/v1/orders"),
        ("POST", "/v1/orders"),
        ("GET", "/v1/products"),
        ("GET", "/v1/notifications"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/payments"),
    ] {
        let r = users
            .client
            .request(method.parse().expect("method"), users.url(path))
            .bearer_auth(&admin)
            .json(&json!({}))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status().as_u16(), 404, "{method} {path}");
    }
    // Operations answer in every process.
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let r = users.client.get(users.url(path)).send().await.expect(path);
        assert_eq!(r.status().as_u16(), 200, "{path}");
    }
    let doc: Value = users
        .client
        .get(users.url("/openapi.json"))
        .send()
        .await
        .expect("doc")
        .json()
        .await
        .expect("json");
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.contains_key("/v1/users") && !paths.contains_key("/v1/orders"));

    // Nothing but the users process runs: the sign-up's event waits for a consumer
    // no process here runs, and no welcome email is written.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!consumers(&url).await.contains(&"notifications".to_owned()));

    // The notifications process, on the same database, takes the event up.
    // It checks its callers' sessions with the users process.
    let mut notifications_deployment = deployment.with_target("notifications");
    notifications_deployment.set("SCALESHOP_SERVICE_URL_USERS", &users.base);
    let mail = notifications_deployment.data_dir.join("mail");
    let notifications = notifications_deployment.start().await;
    let r = notifications
        .client
        .post(notifications.url("/v1/users"))
        .json(&json!({}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 404);
    eventually(Duration::from_secs(20), || {
        let mail = mail.clone();
        async move {
            let welcomed = std::fs::read_dir(&mail).ok()?.any(|entry| {
                entry
                    .ok()
                    .and_then(|e| std::fs::read_to_string(e.path()).ok())
                    .is_some_and(|text| text.contains("ada@example.com"))
            });
            welcomed.then_some(())
        }
    })
    .await;
    let names = consumers(&url).await;
    assert!(names.contains(&"notifications".to_owned()), "{names:?}");
    for other in ["inventory", "order-processor"] {
        assert!(!names.contains(&other.to_owned()), "{names:?}");
    }
    drop(notifications);
    drop(users);
}
