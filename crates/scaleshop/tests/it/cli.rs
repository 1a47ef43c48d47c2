//! The command line: help, `migrate`, and configuration errors that name the key.

use std::process::Command;

use scaleshop_testkit::{Backend, both, fixture};

fn scaleshop() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_scaleshop"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    command
}

#[test]
fn help_explains_each_command() {
    let out = scaleshop().arg("--help").output().expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "serve",
        "migrate",
        "keys",
        "--config",
        "--data-dir",
        "--database-url",
    ] {
        assert!(text.contains(needle), "help lacks {needle}: {text}");
    }
    let out = scaleshop().args(["serve", "--help"]).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("--target") && text.contains("--http-addr"),
        "{text}"
    );
}

#[test]
fn a_bad_setting_stops_the_start_naming_the_key() {
    let dir = scaleshop_testkit::temp_dir("cli");
    let out = scaleshop()
        .env("SCALESHOP_DATA_DIR", &dir)
        .env("SCALESHOP_DB_MAX_CONNECTIONS", "many")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("db_max_connections"), "{err}");

    let file = dir.join("bad.toml");
    std::fs::write(&file, "http_adr = \"127.0.0.1:1\"\n").expect("write");
    let out = scaleshop()
        .arg("--config")
        .arg(&file)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("http_adr"), "{err}");

    let out = scaleshop()
        .args(["serve", "--target", "nope"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("known targets: all"));
    let _ = std::fs::remove_dir_all(&dir);
}

both!(
    migrate_applies_every_schema_and_is_idempotent,
    |backend: Backend| async move {
        let (url, dir) = scaleshop_testkit::fresh(backend).await;
        for _ in 0..2 {
            let mut command = scaleshop();
            command
                .arg("migrate")
                .env("SCALESHOP_DATA_DIR", &dir)
                .env("SCALESHOP_LOG_FILTER", "warn");
            if let Some(url) = &url {
                command.env("SCALESHOP_DATABASE_URL", url);
            }
            let out = command.output().expect("run");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let settings = scaleshop_db::PoolSettings {
            min_connections: 0,
            ..Default::default()
        };
        let db = scaleshop_db::Database::connect(url.as_deref(), &dir, &settings)
            .await
            .expect("connect");
        for table in [
            "users",
            "events",
            "event_consumers",
            "event_inbox",
            "event_dead",
            "jobs",
            "notifications",
        ] {
            let sql = format!("SELECT COUNT(*) FROM {table}");
            let count: i64 = scaleshop_db::with_pool!(db, pool => {
                scaleshop_db::sqlx::query_scalar(scaleshop_db::sqlx::AssertSqlSafe(sql.clone()))
                    .fetch_one(pool)
                    .await
                    .expect(table)
            });
            assert_eq!(count, 0, "{table}");
        }
        db.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
);
