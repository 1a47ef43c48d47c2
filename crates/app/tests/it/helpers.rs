//! `TestApp`: the app on port 0 with a fresh database, and a client to drive it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use reqwest::{Client, Method, RequestBuilder, Response, StatusCode};
use scaleshop_app::config::Secret;
use scaleshop_app::{Config, Target};
use serde_json::{Value, json};
use tokio::sync::oneshot;

pub const ADMIN_EMAIL: &str = "admin@example.com";
pub const ADMIN_PASSWORD: &str = "admin-password-1";

/// Which engine a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs an async test body once per backend: `both!(name, |app| async move {...})`
/// expands to `mod name { sqlite(), postgres() }`.
#[macro_export]
macro_rules! both {
    ($name:ident, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let app = $crate::helpers::TestApp::spawn($crate::helpers::Backend::Sqlite).await;
                ($body)(app).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let app = $crate::helpers::TestApp::spawn($crate::helpers::Backend::Postgres).await;
                ($body)(app).await;
            }
        }
    };
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        uuid::Uuid::now_v7().simple()
    )
}

/// The admin URL of the throwaway PostgreSQL cluster.
pub fn pg_admin_url() -> String {
    std::env::var("SCALESHOP_TEST_PG_URL").expect(
        "SCALESHOP_TEST_PG_URL is unset: run the tests with scripts/test, which starts PostgreSQL",
    )
}

/// A fresh database on the test cluster; returns its URL.
pub async fn fresh_pg_database() -> String {
    use scaleshop_db::sqlx::{self, Connection};
    let admin = pg_admin_url();
    let name = unique("t");
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .expect("connect to test PostgreSQL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let base = admin
        .rsplit_once('/')
        .map(|(base, _)| base.to_owned())
        .unwrap_or(admin);
    format!("{base}/{name}")
}

/// A config for a test app on `backend`, with a fresh data folder and database.
pub async fn test_config(backend: Backend) -> Config {
    let data_dir = std::env::temp_dir().join(unique("scaleshop-test"));
    let database_url = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => Some(Secret::new(fresh_pg_database().await)),
    };
    Config {
        http_addr: "127.0.0.1:0".into(),
        data_dir,
        database_url,
        admin_email: Some(ADMIN_EMAIL.into()),
        admin_password: Some(Secret::new(ADMIN_PASSWORD)),
        db_min_connections: 1,
        // Tests sign many users up from 127.0.0.1 within a minute.
        signup_rate_per_address: Some(1000),
        log_filter: "warn".into(),
        ..Config::default()
    }
}

/// A running app.
pub struct TestApp {
    pub base: String,
    pub client: Client,
    pub backend: Backend,
    pub config: Config,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), scaleshop_app::StartError>>>,
}

impl TestApp {
    /// The sum of the samples of metric `name` (`/metrics`) whose labels contain
    /// every one of `labels` (such as `cache="sessions"`); 0 when there is none.
    pub async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let text = self
            .get("/metrics")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
                    && labels.iter().all(|label| line.contains(label))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub async fn spawn(backend: Backend) -> Self {
        Self::spawn_with(test_config(backend).await, backend).await
    }

    pub async fn spawn_with(config: Config, backend: Backend) -> Self {
        scaleshop_telemetry::init_tracing(&config.log_filter);
        let listener = scaleshop_app::bind(&config).await.expect("bind port 0");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task_config = config.clone();
        let task = tokio::spawn(async move {
            scaleshop_app::serve(&task_config, Target::ALL, listener, async {
                let _ = stopped.await;
            })
            .await
        });
        let app = Self {
            base: format!("http://{addr}"),
            client: Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .expect("client"),
            backend,
            config,
            stop: Some(stop),
            task: Some(task),
        };
        app.wait_ready().await;
        app
    }

    async fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Ok(r) = self.client.get(self.url("/healthz")).send().await
                && r.status() == StatusCode::OK
            {
                return;
            }
            if let Some(task) = &self.task {
                assert!(!task.is_finished(), "the app stopped during start-up");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "app not ready in 30 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, self.url(path))
    }

    pub fn get(&self, path: &str) -> RequestBuilder {
        self.request(Method::GET, path)
    }

    pub fn post(&self, path: &str) -> RequestBuilder {
        self.request(Method::POST, path)
    }

    pub fn patch(&self, path: &str) -> RequestBuilder {
        self.request(Method::PATCH, path)
    }

    /// Signs up a customer; returns (user JSON, token).
    pub async fn customer(&self, email: &str) -> (Value, String) {
        let response = self
            .post("/v1/users")
            .json(&json!({"email": email, "name": "Test Customer", "password": "password-123"}))
            .send()
            .await
            .expect("sign up");
        assert_eq!(response.status(), StatusCode::CREATED, "sign up {email}");
        let user: Value = response.json().await.expect("user json");
        let token = self.sign_in(email, "password-123").await;
        (user, token)
    }

    /// A token for these credentials (asserts 201).
    pub async fn sign_in(&self, email: &str, password: &str) -> String {
        let response = self
            .post("/v1/sessions")
            .json(&json!({"email": email, "password": password}))
            .send()
            .await
            .expect("sign in");
        assert_eq!(response.status(), StatusCode::CREATED, "sign in {email}");
        let body: Value = response.json().await.expect("session json");
        body["token"].as_str().expect("token").to_owned()
    }

    pub async fn admin_token(&self) -> String {
        self.sign_in(ADMIN_EMAIL, ADMIN_PASSWORD).await
    }

    pub fn data_dir(&self) -> PathBuf {
        self.config.data_dir.clone()
    }

    /// Stops the server the way SIGTERM does and waits for it to exit.
    pub async fn stop(mut self) -> Result<(), scaleshop_app::StartError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.expect("server task"),
            None => Ok(()),
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = std::fs::remove_dir_all(&self.config.data_dir);
    }
}

/// Asserts a problem document with this status; returns its body.
pub async fn problem(response: Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status, "status");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("application/problem+json"),
        "content-type {content_type}"
    );
    assert!(response.headers().contains_key("x-request-id"));
    let body: Value = response.json().await.expect("problem json");
    assert_eq!(body["status"], status, "problem status");
    assert!(
        body["type"].is_string() && body["title"].is_string(),
        "{body}"
    );
    body
}

/// The `field` names of a 422's errors.
pub fn error_fields(problem: &Value) -> Vec<String> {
    problem["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .filter_map(|e| e["field"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
