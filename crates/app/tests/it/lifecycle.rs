//! The server's lifecycle: restarts keep sessions, a stop drains in-flight requests
//! and then refuses connections, and a bad configuration is refused at start with a
//! message naming the key.

use std::time::Duration;

use reqwest::StatusCode;
use scaleshop_app::config::Secret;
use scaleshop_app::{Config, Overrides, Target};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::helpers::*;
use crate::users::{get_as, id_of, json_body, patch_as};

/// A server run by hand, for a first life that must not delete its data folder on
/// stop (a `TestApp` removes its data folder when dropped, which `stop` does), and
/// for configurations that may fail to start.
pub struct Manual {
    pub base: String,
    pub client: reqwest::Client,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), scaleshop_app::StartError>>,
}

impl Manual {
    pub async fn start(config: &Config) -> Self {
        match Self::try_start(config).await {
            Ok(server) => server,
            Err(e) => panic!("the app did not start: {e}"),
        }
    }

    /// Starts the app; the start error if it stops during start-up.
    pub async fn try_start(config: &Config) -> Result<Self, String> {
        drop(scaleshop_telemetry::init_tracing(&config.log_filter, None));
        let listener = scaleshop_app::bind(config).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task_config = config.clone();
        let task = tokio::spawn(async move {
            scaleshop_app::serve(&task_config, Target::ALL, listener, async {
                let _ = stopped.await;
            })
            .await
        });
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let base = format!("http://{addr}");
        for _ in 0..1500 {
            if let Ok(r) = client.get(format!("{base}/healthz")).send().await
                && r.status() == 200
            {
                return Ok(Self {
                    base,
                    client,
                    stop,
                    task,
                });
            }
            if task.is_finished() {
                return Err(match task.await {
                    Ok(Ok(())) => "stopped without error".to_owned(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("app not ready");
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(format!("{}{path}", self.base))
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(format!("{}{path}", self.base))
    }

    fn patch(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.patch(format!("{}{path}", self.base))
    }

    pub async fn sign_in(&self, email: &str, password: &str) -> String {
        let response = self
            .post("/v1/sessions")
            .json(&json!({"email": email, "password": password}))
            .send()
            .await
            .unwrap();
        let body = json_body(response, StatusCode::CREATED).await;
        body["token"].as_str().unwrap().to_owned()
    }

    pub async fn stop(self) -> Result<(), scaleshop_app::StartError> {
        let _ = self.stop.send(());
        self.task.await.unwrap()
    }
}

/// Restart on `backend`: a session, a cursor and the admin password set in the
/// environment survive it.
async fn restart_keeps_sessions(backend: Backend) {
    let config = test_config(backend).await;
    let first = Manual::start(&config).await;
    let response = first
        .post("/v1/users")
        .json(&json!({"email": "stays@example.com", "name": "Stays", "password": "password-123"}))
        .send()
        .await
        .unwrap();
    let user = json_body(response, StatusCode::CREATED).await;
    let token = first.sign_in("stays@example.com", "password-123").await;
    let admin = first.sign_in(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let admin_id = {
        let response = first
            .get("/v1/me")
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        id_of(&json_body(response, StatusCode::OK).await)
    };
    let cursor = {
        let response = first
            .get("/v1/users?limit=1")
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        json_body(response, StatusCode::OK).await["next_cursor"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // The admin changes its own password (which ends its sessions); the
    // environment's wins at the next start.
    let response = first
        .patch(&format!("/v1/users/{admin_id}"))
        .bearer_auth(&admin)
        .json(&json!({"password": "changed-over-http", "current_password": ADMIN_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    first.stop().await.unwrap();

    let second = TestApp::spawn_with(config.clone(), backend).await;
    let me = json_body(get_as(&second, "/v1/me", &token).await, StatusCode::OK).await;
    assert_eq!(me, user);
    problem(get_as(&second, "/v1/me", &admin).await, 401).await;
    let admin = second.sign_in(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let response = get_as(
        &second,
        &format!("/v1/users?limit=1&cursor={cursor}"),
        &admin,
    )
    .await;
    assert_eq!(response.status(), 200, "a cursor survives the restart");
    let response = second
        .post("/v1/sessions")
        .json(&json!({"email": ADMIN_EMAIL, "password": "changed-over-http"}))
        .send()
        .await
        .unwrap();
    problem(response, 401).await;
    // The data is still there: the email is taken.
    let response = second
        .post("/v1/users")
        .json(&json!({"email": "stays@example.com", "name": "Again", "password": "password-123"}))
        .send()
        .await
        .unwrap();
    problem(response, 409).await;
    second.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_sessions_sqlite() {
    restart_keeps_sessions(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_sessions_postgres() {
    restart_keeps_sessions(Backend::Postgres).await;
}

/// Two processes on one PostgreSQL database with one configured secret accept each
/// other's tokens and see each other's writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_sharing_a_secret_share_sessions() {
    let mut config = test_config(Backend::Postgres).await;
    config.jwt_secret = Some(Secret::new("a shared signing secret of more than 32 bytes"));
    let one = TestApp::spawn_with(config.clone(), Backend::Postgres).await;
    let mut other_config = config.clone();
    other_config.data_dir = config.data_dir.with_extension("other");
    let two = TestApp::spawn_with(other_config, Backend::Postgres).await;

    let (user, token) = one.customer("shared@example.com").await;
    let me = json_body(get_as(&two, "/v1/me", &token).await, StatusCode::OK).await;
    assert_eq!(me, user);
    let response = patch_as(
        &two,
        &id_of(&user),
        &token,
        json!({"name": "Changed On Two"}),
    )
    .await;
    let consistency = response.headers()["x-consistency-token"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(response.status(), 200);
    let response = one
        .get("/v1/me")
        .bearer_auth(&token)
        .header("x-consistency-token", consistency)
        .send()
        .await
        .unwrap();
    assert_eq!(
        json_body(response, StatusCode::OK).await["name"],
        "Changed On Two"
    );
    one.stop().await.unwrap();
    two.stop().await.unwrap();
}

/// Reads the head of an HTTP/1.1 response (up to the blank line).
pub async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut byte))
            .await
            .expect("response head in time")
            .unwrap();
        assert!(
            n > 0,
            "connection closed after {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// Reads a whole HTTP/1.1 response that has a Content-Length: (head, body).
pub async fn read_response(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let head = read_head(stream).await;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no content-length: {head}"));
    let mut body = vec![0u8; length];
    tokio::time::timeout(Duration::from_secs(30), stream.read_exact(&mut body))
        .await
        .expect("response body in time")
        .unwrap();
    (head, body)
}

/// The value of a header in a response head.
pub fn header_of(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

async fn graceful_stop_drains(app: TestApp) {
    let addr = app.base.trim_start_matches("http://").to_owned();
    let body =
        json!({"email": "in.flight@example.com", "name": "In Flight", "password": "password-123"})
            .to_string();

    // A request whose handler is running: `Expect: 100-continue` makes the server
    // say "100 Continue" once the handler reads the body, which we then hold back.
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/users HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let interim = read_head(&mut stream).await;
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");

    let stopping = tokio::spawn(app.stop());

    // The listener closes while the request is still in flight.
    let mut refused = false;
    for _ in 0..500 {
        match TcpStream::connect(&addr).await {
            Err(_) => {
                refused = true;
                break;
            }
            Ok(probe) => drop(probe),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "new connections still accepted after stop");
    assert!(
        !stopping.is_finished(),
        "the server stopped with a request in flight"
    );

    // The in-flight request completes normally.
    stream.write_all(body.as_bytes()).await.unwrap();
    let (head, payload) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 201"), "{head}");
    let created: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(created["email"], "in.flight@example.com");

    stopping.await.unwrap().expect("stop returns Ok");
    assert!(
        TcpStream::connect(&addr).await.is_err(),
        "connections refused after stop"
    );
}

// One process stopping: the split deployment's gateway sends new work to the others.
both!(
    graceful_stop_drains_in_flight_requests,
    [sqlite, postgres],
    |app: TestApp| async move {
        graceful_stop_drains(app).await;
    }
);

both!(
    stop_returns_ok_and_refuses_connections,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let addr = app.base.trim_start_matches("http://").to_owned();
        let token = app.admin_token().await;
        assert_eq!(get_as(&app, "/v1/me", &token).await.status(), 200);
        let client = app.client.clone();
        let base = app.base.clone();
        app.stop().await.expect("stop returns Ok");
        assert!(TcpStream::connect(&addr).await.is_err());
        assert!(client.get(format!("{base}/healthz")).send().await.is_err());
    }
);

/// A temporary TOML file with this content.
struct TempToml(std::path::PathBuf);

impl TempToml {
    fn new(content: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "scaleshop-config-{}.toml",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::write(&path, content).unwrap();
        Self(path)
    }
}

impl Drop for TempToml {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn load(content: &str) -> Result<Config, String> {
    let file = TempToml::new(content);
    Config::load(Some(&file.0), &Overrides::default()).map_err(|e| e.to_string())
}

#[test]
fn config_file_errors_name_the_key() {
    let good = load("http_addr = \"127.0.0.1:9123\"\ndb_max_connections = 7\n").unwrap();
    assert_eq!(good.http_addr, "127.0.0.1:9123");
    assert_eq!(good.db_max_connections, 7);

    let error = load("db_max_conections = 7\n").unwrap_err();
    assert!(error.contains("db_max_conections"), "{error}");
    let error = load("http_adr = \"127.0.0.1:1\"\n").unwrap_err();
    assert!(error.contains("http_adr"), "{error}");

    let error = load("db_max_connections = \"many\"\n").unwrap_err();
    assert!(error.contains("db_max_connections"), "{error}");
    let error = load("token_ttl_secs = -5\n").unwrap_err();
    assert!(error.contains("token_ttl_secs"), "{error}");
    let error = load("login_rate_per_email = 1.5\n").unwrap_err();
    assert!(error.contains("login_rate_per_email"), "{error}");

    // Rules beyond types, from the file.
    let error = load("db_min_connections = 9\ndb_max_connections = 3\n").unwrap_err();
    assert!(error.contains("db_min_connections"), "{error}");
    let error = load("http_addr = \"not an address\"\n").unwrap_err();
    assert!(error.contains("http_addr"), "{error}");
    let error = load("db_max_connections = 0\n").unwrap_err();
    assert!(error.contains("db_max_connections"), "{error}");
    let error = load("database_url = \"mysql://x\"\n").unwrap_err();
    assert!(error.contains("database_url"), "{error}");
    // Secrets are named, never echoed.
    let error = load("jwt_secret = \"short-secret\"\n").unwrap_err();
    assert!(
        error.contains("jwt_secret") && !error.contains("short-secret"),
        "{error}"
    );

    let missing = std::env::temp_dir().join("scaleshop-no-such-config.toml");
    let error = Config::load(Some(&missing), &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(error.contains("does not exist"), "{error}");
}

#[test]
fn config_validate_names_the_key() {
    let config = Config {
        db_min_connections: 10,
        db_max_connections: 5,
        ..Config::default()
    };
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("db_min_connections"), "{error}");
    let config = Config {
        admin_email: Some("admin@example.com".into()),
        admin_password: None,
        ..Config::default()
    };
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("admin_"), "{error}");
    let config = Config {
        admin_email: Some("admin@example.com".into()),
        admin_password: Some(Secret::new("short")),
        ..Config::default()
    };
    let error = config.validate().unwrap_err().to_string();
    assert!(
        error.contains("admin_password") && !error.contains("short"),
        "{error}"
    );
}

/// `serve` with this config fails at start; returns the message.
async fn start_error(config: Config) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        scaleshop_app::serve(&config, Target::ALL, listener, std::future::pending()),
    )
    .await
    .expect("a bad configuration stops the start at once");
    let _ = std::fs::remove_dir_all(&config.data_dir);
    result.expect_err("refused").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_is_refused_at_start() {
    let mut config = test_config(Backend::Sqlite).await;
    config.db_min_connections = 8;
    config.db_max_connections = 2;
    let error = start_error(config).await;
    assert!(error.contains("db_min_connections"), "{error}");

    let mut config = test_config(Backend::Sqlite).await;
    config.jwt_secret = Some(Secret::new("too short"));
    let error = start_error(config).await;
    assert!(error.contains("jwt_secret"), "{error}");

    let mut config = test_config(Backend::Sqlite).await;
    config.admin_email = Some("not an email".into());
    let error = start_error(config).await;
    assert!(error.contains("admin_email"), "{error}");
}
