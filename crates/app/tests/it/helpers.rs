//! `TestApp`: the app on port 0 with a fresh database, and a client to drive it;
//! `fixture` and `fixture_with`, what `scaleshop_testkit::both!` hands each case.

use std::path::PathBuf;
use std::sync::Arc;

use reqwest::{Client, Method, RequestBuilder, Response, StatusCode};
use scaleshop_app::config::Secret;
use scaleshop_app::{Config, Target};
use scaleshop_testkit::gateway::{self, Gateway};
pub use scaleshop_testkit::pg_admin_url;
pub use scaleshop_testkit::{Backend, both};
use scaleshop_testkit::{NatsServer, RedisServer, fresh_pg_url, unique};
use serde_json::{Value, json};
use tokio::sync::oneshot;

pub const ADMIN_EMAIL: &str = "admin@example.com";
pub const ADMIN_PASSWORD: &str = "admin-password-1";

/// What each case of `both!` runs on (see `Backend`): the embedded monolith, the
/// monolith on PostgreSQL + Redis, or the split deployment behind HAProxy.
pub async fn fixture(backend: Backend) -> TestApp {
    TestApp::spawn(backend).await
}

/// [`fixture`] after `configure` has changed the configuration (of every instance).
pub async fn fixture_with(backend: Backend, configure: impl FnOnce(&mut Config)) -> TestApp {
    let mut config = test_config(backend).await;
    configure(&mut config);
    TestApp::spawn_with(config, backend).await
}

/// A fresh database on the test cluster; returns its URL.
pub async fn fresh_pg_database() -> String {
    fresh_pg_url().await
}

/// A config for a test app on `backend`, with a fresh data folder and database.
/// Only the engines: the Redis of the PostgreSQL cases is started by
/// [`TestApp::spawn_with`] (a test that restarts the app passes its config on).
pub async fn test_config(backend: Backend) -> Config {
    let data_dir = std::env::temp_dir().join(unique("scaleshop-test"));
    let database_url = match backend {
        Backend::Sqlite => None,
        Backend::Postgres | Backend::Split | Backend::Nats => {
            Some(Secret::new(fresh_pg_url().await))
        }
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
        // Every test at once on two cores can keep a read model behind for
        // longer than the default wait; tests that check which side answered a
        // read must not depend on the machine's load.
        projection_wait_ms: 2_000,
        log_filter: "warn".into(),
        ..Config::default()
    }
}

/// One server of the app, on its own port, with its own target.
struct Instance {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), scaleshop_app::StartError>>>,
    data_dir: PathBuf,
}

impl Instance {
    /// Binds port 0 and serves `target`; returns it and its address.
    async fn start(config: Config, target: Target) -> (Self, String) {
        let listener = scaleshop_app::bind(&config).await.expect("bind port 0");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let data_dir = config.data_dir.clone();
        let task = tokio::spawn(async move {
            scaleshop_app::serve(&config, target, listener, async {
                let _ = stopped.await;
            })
            .await
        });
        let instance = Self {
            stop: Some(stop),
            task: Some(task),
            data_dir,
        };
        (instance, format!("http://{addr}"))
    }

    async fn stop(&mut self) -> Result<(), scaleshop_app::StartError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.expect("server task"),
            None => Ok(()),
        }
    }

    fn stopped_early(&self) -> bool {
        self.task.as_ref().is_some_and(|task| task.is_finished())
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// A running app: one instance of target `all`, or the split deployment (two
/// instances of each service group of `scripts/cluster up --split`, behind the
/// gateway, which `base` then points at).
pub struct TestApp {
    pub base: String,
    pub client: Client,
    pub backend: Backend,
    /// The configuration every instance started from (a split instance's own has
    /// its data folder and the services' addresses on top).
    pub config: Config,
    instances: Vec<Instance>,
    /// Declared after the instances: dropped (killed) after they were told to stop.
    gateway: Option<Gateway>,
    redis: Option<Arc<RedisServer>>,
    /// The NATS server of the cases that carry events over NATS (`Split`).
    nats: Option<Arc<NatsServer>>,
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

    /// The topology of `backend` on a fresh database: the PostgreSQL cases get
    /// a Redis server of their own (the monolith on PostgreSQL + Redis), `Split`
    /// the split deployment.
    pub async fn spawn(backend: Backend) -> Self {
        Self::spawn_with(test_config(backend).await, backend).await
    }

    /// Like [`TestApp::spawn`], from this configuration; a PostgreSQL case
    /// without a `redis_url` gets its own Redis server.
    pub async fn spawn_with(mut config: Config, backend: Backend) -> Self {
        drop(scaleshop_telemetry::init_tracing(&config.log_filter, None));
        let redis = (backend != Backend::Sqlite && config.redis_url.is_none())
            .then(|| Arc::new(RedisServer::start()));
        if let Some(redis) = &redis {
            config.redis_url = Some(Secret::new(redis.url()));
        }
        let nats =
            (backend.is_nats() && config.nats_url.is_none()).then(|| Arc::new(NatsServer::start()));
        if let Some(nats) = &nats {
            config.nats_url = Some(Secret::new(nats.url()));
        }
        let (instances, bases, gateway) = match backend {
            Backend::Split => Self::start_split(&config).await,
            Backend::Sqlite | Backend::Postgres | Backend::Nats => {
                let (instance, base) = Instance::start(config.clone(), Target::ALL).await;
                (vec![instance], vec![base], None)
            }
        };
        let base = match &gateway {
            Some(gateway) => gateway.url(),
            None => bases[0].clone(),
        };
        let app = Self {
            base,
            client: Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                // Well under the server's and the gateway's keep-alive (5 s): a
                // connection is never reused just as the other side closes it,
                // even when a loaded machine delays a request by seconds.
                .pool_idle_timeout(std::time::Duration::from_secs(1))
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .expect("client"),
            backend,
            config,
            instances,
            gateway,
            redis,
            nats,
        };
        for base in &bases {
            app.wait_ready(base).await;
        }
        if let Some(gateway) = &app.gateway {
            let base = app.base.clone();
            app.wait_ready(&base).await;
            app.wait_gateway_servers_up(&gateway.stats_url()).await;
        }
        app
    }

    /// Waits (bounded) until the gateway's health checks have marked every
    /// instance of every backend up: a backend whose servers are not up yet
    /// answers 503 "no instance is available".
    async fn wait_gateway_servers_up(&self, stats_url: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut last = String::new();
        loop {
            if let Ok(r) = self.client.get(format!("{stats_url};csv")).send().await
                && let Ok(csv) = r.text().await
            {
                let servers: Vec<(String, String)> = csv
                    .lines()
                    .filter(|line| !line.starts_with('#'))
                    .filter_map(|line| {
                        let fields: Vec<&str> = line.split(',').collect();
                        let (name, status) = (*fields.get(1)?, *fields.get(17)?);
                        (name != "FRONTEND" && name != "BACKEND")
                            .then(|| (name.to_owned(), status.to_owned()))
                    })
                    .collect();
                if !servers.is_empty() && servers.iter().all(|(_, status)| status == "UP") {
                    return;
                }
                last = format!("{servers:?}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "gateway servers not all up in 30 s: {last}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Two instances of each service group of `scripts/cluster up --split`, on
    /// one database (migrated first, as `scaleshop migrate` does), calling each
    /// other through the gateway's services address; the gateway configured as
    /// the script configures it.
    async fn start_split(config: &Config) -> (Vec<Instance>, Vec<String>, Option<Gateway>) {
        let db = scaleshop_app::open_database(config, Target::ALL)
            .await
            .expect("migrate the split deployment's database");
        db.close().await;
        let services_port = gateway::free_port();
        let services_url = format!("http://127.0.0.1:{services_port}");
        let (mut instances, mut bases, mut plan) = (Vec::new(), Vec::new(), Vec::new());
        for (group, target_name) in gateway::split_groups() {
            let target: Target = target_name.parse().expect("a split group's target");
            for i in 1..=2 {
                let name = format!("{group}-{i}");
                let mut own = config.clone();
                own.data_dir = config.data_dir.join(&name);
                if own.image_dir.is_none() {
                    // Shared, as scripts/cluster shares it: an image uploaded to
                    // one instance is processed by whichever takes its job.
                    own.image_dir = Some(config.data_dir.join("images"));
                }
                for service in scaleshop_app::Service::ALL {
                    if !target.contains(service) {
                        own.set_service_url(service, services_url.clone());
                    }
                }
                let (instance, base) = Instance::start(own, target).await;
                let port = base
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .expect("port");
                plan.push(gateway::Instance {
                    name,
                    target: target_name.clone(),
                    port,
                });
                instances.push(instance);
                bases.push(base);
            }
        }
        let gateway = Gateway::start(&config.data_dir.join("gateway"), &plan, Some(services_port));
        (instances, bases, Some(gateway))
    }

    async fn wait_ready(&self, base: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Ok(r) = self.client.get(format!("{base}/healthz")).send().await
                && r.status() == StatusCode::OK
            {
                return;
            }
            assert!(
                !self.instances.iter().any(Instance::stopped_early),
                "the app stopped during start-up"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "{base} not ready in 30 s"
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

    /// Each instance's data folder (one, but for the split deployment).
    pub fn data_dirs(&self) -> Vec<PathBuf> {
        self.instances.iter().map(|i| i.data_dir.clone()).collect()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.config.data_dir.clone()
    }

    /// The app's database through a second handle, as another process would
    /// open it (close it when done).
    pub async fn database(&self) -> scaleshop_db::Database {
        let url = self
            .config
            .database_url
            .as_ref()
            .map(|u| u.expose().to_owned());
        scaleshop_testkit::open_database(url.as_deref(), &self.data_dir(), &[]).await
    }

    /// Stops the servers the way SIGTERM does and waits for them to exit.
    pub async fn stop(mut self) -> Result<(), scaleshop_app::StartError> {
        let mut result = Ok(());
        for instance in &mut self.instances {
            let stopped = instance.stop().await;
            if result.is_ok() {
                result = stopped;
            }
        }
        result
    }
}

impl Drop for TestApp {
    /// Stops the servers as SIGTERM does and waits (at most 10 s) until they have
    /// drained and closed their database pools. Without the wait the test's
    /// runtime would drop them mid-drain, and connections still referenced from
    /// parts that outlive it stay open on the shared test PostgreSQL until the test
    /// binary exits (a suite of hundreds of tests then runs out of connections).
    fn drop(&mut self) {
        for instance in &mut self.instances {
            if let Some(stop) = instance.stop.take() {
                let _ = stop.send(());
            }
        }
        let tasks: Vec<_> = self
            .instances
            .iter_mut()
            .filter_map(|instance| instance.task.take())
            .collect();
        if let Ok(handle) = tokio::runtime::Handle::try_current()
            && handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
        {
            tokio::task::block_in_place(|| {
                handle.block_on(async {
                    let all = futures::future::join_all(tasks);
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), all).await;
                });
            });
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
