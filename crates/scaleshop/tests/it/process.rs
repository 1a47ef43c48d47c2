//! A `scaleshop` child process: started with an environment, its address read from
//! its log, killed or stopped by pid (only processes the test started).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use reqwest::Client;
use serde_json::{Value, json};

pub const ADMIN_EMAIL: &str = "admin@example.com";
pub const ADMIN_PASSWORD: &str = "admin-password-1";

/// Everything two runs of the same deployment share.
#[derive(Debug, Clone)]
pub struct Deployment {
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub extra: HashMap<String, String>,
    /// `None`: no `jwt_secret`, so the keys come from the database.
    pub jwt_secret: Option<String>,
    /// `--target` (`None`: the default, `all`).
    pub target: Option<String>,
    /// The NATS server that carries the events (`Backend::Nats`), shared by
    /// every run and kept until the last clone is dropped.
    pub nats: Option<Arc<scaleshop_testkit::NatsServer>>,
}

impl Deployment {
    pub async fn fresh(backend: scaleshop_testkit::Backend) -> Self {
        let (database_url, data_dir) = scaleshop_testkit::fresh(backend).await;
        Self {
            data_dir,
            database_url,
            extra: HashMap::new(),
            jwt_secret: Some("a-test-secret-that-is-long-enough-000000".to_owned()),
            target: None,
            nats: backend
                .is_nats()
                .then(|| Arc::new(scaleshop_testkit::NatsServer::start())),
        }
    }

    /// The same deployment with `--target target` and its own data folder.
    pub fn with_target(&self, target: &str) -> Self {
        let data_dir = self.data_dir.join(target.replace(',', "+"));
        std::fs::create_dir_all(&data_dir).expect("data folder");
        Self {
            data_dir,
            target: Some(target.to_owned()),
            ..self.clone()
        }
    }

    /// `--target orders`, calling the services it needs (users, catalog,
    /// inventory, payments) at `rest`, the base URL of the process that runs them.
    pub fn orders_calling(&self, rest: &str) -> Self {
        let mut orders = self.with_target("orders");
        for service in ["users", "catalog", "inventory", "payments"] {
            orders.set(
                &format!("SCALESHOP_SERVICE_URL_{}", service.to_uppercase()),
                rest,
            );
        }
        orders
    }

    pub fn set(&mut self, key: &str, value: &str) -> &mut Self {
        self.extra.insert(key.to_owned(), value.to_owned());
        self
    }

    /// `scaleshop serve` on a free port with this deployment's environment.
    fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_scaleshop"));
        command
            .arg("serve")
            .args(self.target.iter().flat_map(|t| ["--target", t.as_str()]))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SCALESHOP_HTTP_ADDR", "127.0.0.1:0")
            .env("SCALESHOP_DATA_DIR", &self.data_dir)
            .env("SCALESHOP_ADMIN_EMAIL", ADMIN_EMAIL)
            .env("SCALESHOP_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("SCALESHOP_LOG_FILTER", "info")
            // Tests sign many users up from 127.0.0.1 within a minute.
            .env("SCALESHOP_SIGNUP_RATE_PER_ADDRESS", "100000")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(url) = &self.database_url {
            command.env("SCALESHOP_DATABASE_URL", url);
        }
        if let Some(secret) = &self.jwt_secret {
            command.env("SCALESHOP_JWT_SECRET", secret);
        }
        if let Some(nats) = &self.nats {
            command.env("SCALESHOP_NATS_URL", nats.url());
        }
        for (key, value) in &self.extra {
            command.env(key, value);
        }
        command
    }

    /// Runs `scaleshop serve` expecting it to stop by itself (within 30 s); its exit
    /// status and what it wrote to stderr.
    pub fn run_to_exit(&self) -> (std::process::ExitStatus, String) {
        let mut child = self
            .command()
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start scaleshop");
        let mut stderr = child.stderr.take().expect("stderr");
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
            text
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("scaleshop was expected to stop by itself within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, reader.join().unwrap_or_default())
    }

    /// Starts `scaleshop serve` on a free port and waits until it answers.
    pub async fn start(&self) -> Server {
        let mut child = self.command().spawn().expect("start scaleshop");
        let stdout = child.stdout.take().expect("stdout");
        let (lines_tx, lines_rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let line = lines_rx
                .recv_timeout(remaining)
                .expect("scaleshop did not log its address");
            if let Some(at) = line.find("listening on http://") {
                let rest = &line[at + "listening on http://".len()..];
                let end = rest
                    .find(|c: char| c == '"' || c.is_whitespace())
                    .unwrap_or(rest.len());
                break rest[..end].to_owned();
            }
        };
        // Keep draining the log so the child never blocks on a full pipe; the
        // newest lines are kept for tests that read the log.
        let log = Arc::new(parking_lot::Mutex::new(std::collections::VecDeque::new()));
        let kept = log.clone();
        std::thread::spawn(move || {
            while let Ok(line) = lines_rx.recv() {
                let mut kept = kept.lock();
                if kept.len() == LOG_LINES_KEPT {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
        });
        let server = Server {
            child,
            api: Api::new(format!("http://{addr}")),
            log,
        };
        server.wait_ready().await;
        server
    }
}

pub fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(30))
        // Under the server's and the gateway's keep-alive (5 s): a connection
        // is never reused just as the other side closes it.
        .pool_idle_timeout(Duration::from_secs(4))
        .build()
        .expect("client")
}

/// Where the API answers: one process, or a gateway in front of several.
pub struct Api {
    pub base: String,
    pub client: Client,
}

/// A running `scaleshop` process; its API through `Deref`.
pub struct Server {
    pub child: Child,
    api: Api,
    log: Arc<parking_lot::Mutex<std::collections::VecDeque<String>>>,
}

/// How many of its newest log lines a [`Server`] keeps.
const LOG_LINES_KEPT: usize = 20_000;

impl std::ops::Deref for Server {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Server {
    /// The newest lines of its log (stdout), oldest first.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().iter().cloned().collect()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no cleanup at all.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status (bounded wait).
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "scaleshop did not exit 30 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Api {
    pub fn new(base: String) -> Self {
        Self {
            base,
            client: client(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.client.get(self.url("/readyz")).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(Instant::now() < deadline, "scaleshop not ready in 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A session token of the admin the tests configure.
    pub async fn admin_token(&self) -> String {
        self.sign_in(ADMIN_EMAIL, ADMIN_PASSWORD).await
    }

    pub async fn sign_in(&self, email: &str, password: &str) -> String {
        let body: Value = self
            .client
            .post(self.url("/v1/sessions"))
            .json(&json!({"email": email, "password": password}))
            .send()
            .await
            .expect("sign in")
            .json()
            .await
            .expect("session");
        body["token"].as_str().expect("token").to_owned()
    }

    /// A GET answered with JSON (as `token` when given); `None` if there was no
    /// such answer.
    pub async fn get_json(&self, path: &str, token: Option<&str>) -> Option<Value> {
        let mut request = self.client.get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.ok()?.json().await.ok()
    }

    /// Every item of a paged admin list.
    pub async fn all(&self, token: &str, path: &str) -> Vec<Value> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..10_000 {
            let sep = if path.contains('?') { '&' } else { '?' };
            let mut url = format!("{}{path}{sep}limit=100", self.base);
            if let Some(c) = &cursor {
                url.push_str(&format!("&cursor={c}"));
            }
            let page: Value = self
                .client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("list")
                .json()
                .await
                .expect("page");
            items.extend(page["items"].as_array().cloned().unwrap_or_default());
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return items,
            }
        }
        panic!("more than 10 000 pages");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A test that failed midway must not leave its child behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it returns Some, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "condition not reached within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A series' value from the server's `/metrics`.
pub async fn gauge(server: &Api, series: &str) -> Option<f64> {
    let text = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.trim().parse().ok())
    })
}
