//! Test support shared by the crates' integration tests: a fresh database per test
//! on SQLite (a new data folder) or on the throwaway PostgreSQL cluster that
//! `scripts/test` starts (`SCALESHOP_TEST_PG_URL`, a new database each time).
//!
//! A dev-dependency only; nothing in the product depends on it.

#![allow(
    clippy::expect_used,
    reason = "test support: a failed set-up is a failed test"
)]

pub mod gateway;
pub mod images;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

mod nats_server;
mod pg_server;
pub use nats_server::NatsServer;
pub use pg_server::PgServer;

use scaleshop_db::sqlx::{self, Connection};
use scaleshop_db::{Database, Migrations, PoolSettings};

/// What a test runs on. For a storage test, the engine; for an HTTP test, the
/// topology: `Sqlite` is the embedded monolith (SQLite, in-memory cache),
/// `Postgres` the monolith on PostgreSQL (and Redis, where the suite's fixture
/// starts one), `Split` the split deployment: each service group in its own
/// instances on one PostgreSQL and Redis, behind the HAProxy gateway
/// ([`gateway::Gateway`]), its events carried by NATS JetStream; `Nats` the
/// monolith on PostgreSQL with its events over NATS JetStream. Storage suites
/// treat `Split` and `Nats` as `Postgres`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    Split,
    Nats,
}

impl Backend {
    /// Whether this case stores on PostgreSQL.
    pub fn is_postgres(self) -> bool {
        matches!(self, Self::Postgres | Self::Split | Self::Nats)
    }

    /// Whether this case carries its events over NATS JetStream.
    pub fn is_nats(self) -> bool {
        matches!(self, Self::Split | Self::Nats)
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name no other test of any process uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        uuid::Uuid::now_v7().simple()
    )
}

/// A new empty folder under the system's temporary folder; removed when the
/// test that made it passes (see [`cleaned`]).
pub fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique(prefix));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    remember(|left| left.dirs.push(dir.clone()));
    dir
}

/// What a test made on disk: its databases on the shared test cluster and its
/// folders. A suite of hundreds of tests would otherwise keep every one of them
/// until `scripts/test` removes the cluster, gigabytes on a machine whose disk is
/// shared.
#[derive(Debug, Default)]
struct Leftovers {
    databases: Vec<String>,
    dirs: Vec<PathBuf>,
}

tokio::task_local! {
    static LEFTOVERS: std::sync::Arc<parking_lot::Mutex<Leftovers>>;
}

/// Notes something to remove, when called inside [`cleaned`] (elsewhere, for
/// example from a task the test spawned, it is left for `scripts/test`).
fn remember(note: impl FnOnce(&mut Leftovers)) {
    let _ = LEFTOVERS.try_with(|left| {
        note(&mut left.lock());
    });
}

/// Runs a test, then drops the databases and removes the folders it made. Only
/// when it passed: a failed test's panic goes straight through, and its
/// database and folder stay for a look. [`both!`] runs every case in here.
pub async fn cleaned(test: impl std::future::Future<Output = ()>) {
    let left = std::sync::Arc::default();
    LEFTOVERS.scope(std::sync::Arc::clone(&left), test).await;
    let Leftovers { databases, dirs } = std::mem::take(&mut *left.lock());
    if !databases.is_empty() {
        let drop_all = async {
            let mut conn = sqlx::PgConnection::connect(&pg_admin_url()).await?;
            for name in &databases {
                // FORCE: the servers of the test may still hold a connection.
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await?;
            }
            Ok::<_, sqlx::Error>(())
        };
        match tokio::time::timeout(std::time::Duration::from_secs(30), drop_all).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("testkit: could not drop {databases:?}: {e}"),
            Err(_) => eprintln!("testkit: dropping {databases:?} timed out"),
        }
    }
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The admin URL of the throwaway PostgreSQL cluster.
pub fn pg_admin_url() -> String {
    std::env::var("SCALESHOP_TEST_PG_URL").expect(
        "SCALESHOP_TEST_PG_URL is unset: run the tests with scripts/test, which starts PostgreSQL",
    )
}

/// A fresh database on the test cluster; returns its URL.
pub async fn fresh_pg_url() -> String {
    let admin = pg_admin_url();
    let name = unique("t");
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .expect("connect to test PostgreSQL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create test database");
    remember(|left| left.databases.push(name.clone()));
    let base = admin
        .rsplit_once('/')
        .map(|(base, _)| base.to_owned())
        .unwrap_or(admin);
    format!("{base}/{name}")
}

/// The database URL for a fresh test database (`None` = SQLite in the data folder)
/// and a fresh data folder.
pub async fn fresh(backend: Backend) -> (Option<String>, PathBuf) {
    let dir = temp_dir("scaleshop-test");
    match backend {
        Backend::Sqlite => (None, dir),
        Backend::Postgres | Backend::Split | Backend::Nats => (Some(fresh_pg_url().await), dir),
    }
}

/// A connected, migrated fresh database.
pub async fn fresh_database(backend: Backend, migrations: &[Migrations]) -> Database {
    let (url, dir) = fresh(backend).await;
    let settings = PoolSettings {
        min_connections: 0,
        ..PoolSettings::default()
    };
    let db = Database::connect(url.as_deref(), &dir, &settings)
        .await
        .expect("connect");
    for m in migrations {
        db.migrate(m).await.expect("migrate");
    }
    db
}

/// Runs an async test body once per case, each on its own fresh fixture:
///
/// - `both!(name, |x| async move {..})`: cases `sqlite` and `postgres`;
/// - `both!(name, [sqlite, postgres, split], |x| async move {..})`: the listed
///   cases (see [`Backend`]);
/// - `both!(name, with configure, |x| ..)` or `both!(name, [..], with configure, |x| ..)`:
///   the fixture built after `configure` has changed its configuration.
///
/// It expands to `mod name { #[tokio::test] async fn sqlite() .. }`, one test per
/// case. The body receives what `fixture(Backend)` (or `fixture_with(Backend,
/// configure)`) returns: the suite names these functions where the macro is used.
/// A suite whose body takes the [`Backend`] itself imports [`fixture`] from here;
/// the HTTP suite's returns a running app.
#[macro_export]
macro_rules! both {
    ($name:ident, with $configure:expr, $body:expr $(,)?) => {
        $crate::both!($name, [sqlite, postgres], with $configure, $body);
    };
    ($name:ident, [$($case:ident),+ $(,)?], with $configure:expr, $body:expr $(,)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    $crate::cleaned(async {
                        ($body)(fixture_with($crate::backend!($case), $configure).await).await;
                    })
                    .await;
                }
            )+
        }
    };
    ($name:ident, [$($case:ident),+ $(,)?], $body:expr $(,)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    $crate::cleaned(async {
                        ($body)(fixture($crate::backend!($case)).await).await;
                    })
                    .await;
                }
            )+
        }
    };
    ($name:ident, $body:expr $(,)?) => {
        $crate::both!($name, [sqlite, postgres], $body);
    };
}

/// The [`Backend`] of a case name of [`both!`].
#[doc(hidden)]
#[macro_export]
macro_rules! backend {
    (sqlite) => {
        $crate::Backend::Sqlite
    };
    (postgres) => {
        $crate::Backend::Postgres
    };
    (split) => {
        $crate::Backend::Split
    };
    (nats) => {
        $crate::Backend::Nats
    };
}

/// The fixture of a suite whose test bodies take the [`Backend`] and build what
/// they need themselves.
pub async fn fixture(backend: Backend) -> Backend {
    backend
}

/// A throwaway `redis-server` on a free port of 127.0.0.1, without persistence;
/// killed (by pid) on drop.
#[derive(Debug)]
pub struct RedisServer {
    child: std::process::Child,
    pub port: u16,
}

impl RedisServer {
    pub fn start() -> Self {
        let port = crate::gateway::free_port();
        Self::start_on(port)
    }

    /// On a given port (to bring a killed server back where clients expect it).
    pub fn start_on(port: u16) -> Self {
        let child = std::process::Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test installs it; or apt-get install redis-server)");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Self { child, port }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends a signal (`-STOP`, `-CONT`, ...) to this server.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal}");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Another handle on an existing database (the same PostgreSQL database, or the
/// same SQLite file in `dir`), migrated: what a second process would open.
pub async fn open_database(
    url: Option<&str>,
    dir: &std::path::Path,
    migrations: &[Migrations],
) -> Database {
    let settings = PoolSettings {
        min_connections: 0,
        ..PoolSettings::default()
    };
    let db = Database::connect(url, dir, &settings)
        .await
        .expect("connect");
    for m in migrations {
        db.migrate(m).await.expect("migrate");
    }
    db
}

/// A bounded wait: polls `check` until it holds, fails the test after `within`.
pub async fn eventually_within(
    within: std::time::Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> bool,
) {
    let deadline = std::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A runtime standing for another process: [`Crashable::crash`] drops its tasks
/// mid-flight (their shutdown paths never run), as a crash would.
#[derive(Debug)]
pub struct Crashable(Option<tokio::runtime::Runtime>);

impl Default for Crashable {
    fn default() -> Self {
        Self::new()
    }
}

impl Crashable {
    pub fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        Self(Some(runtime))
    }

    pub fn handle(&self) -> tokio::runtime::Handle {
        self.0.as_ref().expect("not crashed").handle().clone()
    }

    pub fn crash(mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Crashable {
    fn drop(&mut self) {
        // Dropping a runtime inside another one panics; this does not.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
