//! Messaging as a client sees it: welcome notifications from `user.created`, email
//! through files and through a real SMTP server, the jobs admin API with a dead job
//! and its redrive, and the messaging parts of `/readyz` and `/metrics`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use scaleshop_app::config::Secret;
use scaleshop_contracts::{Contract, NotificationSent};
use serde_json::{Value, json};

use crate::helpers::*;

/// Polls `check` until it returns Some, for at most 30 s.
pub async fn eventually<T, F, Fut>(mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "condition not reached in 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn notifications(app: &TestApp, token: &str, query: &str) -> (StatusCode, Value) {
    let response = app
        .get(&format!("/v1/notifications{query}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

both!(
    sign_up_sends_exactly_one_welcome_email,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let (user, token) = app.customer("welcome@example.com").await;
        let user_id = user["id"].as_str().unwrap().to_owned();
        let items = eventually(|| async {
            let (_, body) = notifications(&app, &token, "").await;
            let items = body["items"].as_array().cloned().unwrap_or_default();
            (items.first().is_some_and(|n| n["status"] == "sent")).then_some(items)
        })
        .await;
        assert_eq!(items.len(), 1);
        let n = &items[0];
        assert_eq!(n["user_id"], user_id.as_str());
        assert_eq!(n["kind"], "welcome");
        assert_eq!(n["channel"], "email");
        assert_eq!(n["to"], "welcome@example.com");
        assert!(n["subject"].as_str().unwrap().contains("Welcome"));
        assert!(n["order_id"].is_null());
        assert!(n["sent_at"].is_string() && n["created_at"].is_string());

        // The message, as a file named by the notification, in the data folder of
        // the instance that sent it.
        let name = format!("{}.eml", n["id"].as_str().unwrap());
        let mail = app
            .data_dirs()
            .iter()
            .find_map(|dir| std::fs::read_to_string(dir.join("mail").join(&name)).ok())
            .expect("mail file");
        assert!(mail.contains("To: welcome@example.com"), "{mail}");
        assert!(mail.contains("Subject: Welcome to scaleshop"), "{mail}");

        // The log: user.created, then notification.sent for it.
        let admin = app.admin_token().await;
        let events: Value = app
            .get("/v1/events?limit=100")
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let sent: Vec<&Value> = events["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| {
                e["type"] == NotificationSent::NAME && e["data"]["user_id"] == user_id.as_str()
            })
            .collect();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0]["aggregate_id"], n["id"]);
    }
);

both!(
    notifications_are_private,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let (alice, alice_token) = app.customer("alice@example.com").await;
        let (bob, _) = app.customer("bob@example.com").await;
        let bob_id = bob["id"].as_str().unwrap();
        // Another user's list is a 404 for a customer; their own id is fine.
        let (status, body) = notifications(&app, &alice_token, &format!("?user_id={bob_id}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        let (status, _) = notifications(
            &app,
            &alice_token,
            &format!("?user_id={}", alice["id"].as_str().unwrap()),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = notifications(&app, &alice_token, "?user_id=not-a-uuid").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        // The admin sees anyone's.
        let admin = app.admin_token().await;
        let items = eventually(|| async {
            let (_, body) = notifications(&app, &admin, &format!("?user_id={bob_id}")).await;
            let items = body["items"].as_array().cloned().unwrap_or_default();
            (!items.is_empty()).then_some(items)
        })
        .await;
        assert!(items.iter().all(|n| n["user_id"] == bob_id));
        // Without a token: 401.
        let response = app.get("/v1/notifications").send().await.unwrap();
        problem(response, 401).await;
    }
);

/// A real SMTP server (Python's smtpd) that writes each message into `dir`.
struct SmtpSink {
    child: Child,
}

impl SmtpSink {
    fn start(port: u16, dir: &Path) -> Self {
        let script = r#"
import asyncore, os, sys, smtpd, uuid, warnings
warnings.simplefilter("ignore")
class Sink(smtpd.SMTPServer):
    def process_message(self, peer, mailfrom, rcpttos, data, **kw):
        if isinstance(data, bytes):
            data = data.decode("utf-8", "replace")
        path = os.path.join(sys.argv[2], str(uuid.uuid4()) + ".txt")
        with open(path + ".tmp", "w") as f:
            f.write("X-Rcpt: " + ",".join(rcpttos) + "\n" + data)
        os.rename(path + ".tmp", path)
Sink(("127.0.0.1", int(sys.argv[1])), None)
print("ready", flush=True)
asyncore.loop()
"#;
        let mut child = Command::new("python3")
            .args([
                "-W",
                "ignore",
                "-c",
                script,
                &port.to_string(),
                &dir.display().to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 for the SMTP sink");
        let mut ready = String::new();
        let stdout = child.stdout.take().expect("stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut ready)
            .expect("sink ready");
        assert_eq!(ready.trim(), "ready");
        Self { child }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn received(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".txt"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .collect()
        })
        .unwrap_or_default()
}

async fn spawn_with_smtp(backend: Backend, port: u16) -> TestApp {
    let mut config = test_config(backend).await;
    config.smtp_url = Some(Secret::new(format!("smtp://127.0.0.1:{port}")));
    config.smtp_timeout_ms = 2000;
    config.job_min_backoff_ms = 50;
    config.job_max_backoff_ms = 200;
    config.job_poll_ms = 100;
    TestApp::spawn_with(config, backend).await
}

async fn smtp_receives_the_welcome_mail(backend: Backend) {
    let port = free_port();
    let inbox = scaleshop_testkit::temp_dir("smtp-inbox");
    let _sink = SmtpSink::start(port, &inbox);
    let app = spawn_with_smtp(backend, port).await;
    app.customer("smtp-user@example.com").await;
    let mails = eventually(|| async {
        let mails: Vec<String> = received(&inbox)
            .into_iter()
            .filter(|m| m.contains("smtp-user@example.com"))
            .collect();
        (!mails.is_empty()).then_some(mails)
    })
    .await;
    assert_eq!(mails.len(), 1);
    assert!(
        mails[0].starts_with("X-Rcpt: smtp-user@example.com"),
        "{}",
        mails[0]
    );
    assert!(mails[0].contains("Subject: Welcome to scaleshop"));
    // Nothing was written as a file: the SMTP server got it.
    assert!(
        !app.data_dir().join("mail").exists()
            || std::fs::read_dir(app.data_dir().join("mail"))
                .unwrap()
                .next()
                .is_none()
    );
    let _ = std::fs::remove_dir_all(&inbox);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_receives_the_welcome_mail_sqlite() {
    smtp_receives_the_welcome_mail(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_receives_the_welcome_mail_postgres() {
    smtp_receives_the_welcome_mail(Backend::Postgres).await;
}

async fn job(app: &TestApp, token: &str, id: &str) -> Value {
    app.get(&format!("/v1/jobs/{id}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// SMTP down: the email job is retried, then dead, the notification `failed`;
/// with SMTP back, a redrive sends it and the notification becomes `sent`.
async fn dead_email_job_and_redrive(backend: Backend) {
    let port = free_port(); // nothing listens there yet
    let app = spawn_with_smtp(backend, port).await;
    let (user, token) = app.customer("later@example.com").await;
    let admin = app.admin_token().await;
    let user_id = user["id"].as_str().unwrap().to_owned();

    // Both welcome emails (the admin's and this user's) end dead, and the user's
    // notification is marked failed in the same transaction.
    let dead = eventually(|| async {
        let list: Value = app
            .get("/v1/jobs?queue=email&state=dead")
            .bearer_auth(&admin)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let items = list["items"].as_array()?.clone();
        (items.len() == 2).then_some(items)
    })
    .await;
    for job in &dead {
        assert_eq!(job["attempts"], 3);
        assert_eq!(job["max_attempts"], 3);
        assert!(job["last_error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let (_, body) = notifications(&app, &token, "").await;
    let mine: Vec<&Value> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["user_id"] == user_id.as_str())
        .collect();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0]["status"], "failed");

    // Bring SMTP up, redrive both.
    let inbox = scaleshop_testkit::temp_dir("smtp-inbox");
    let _sink = SmtpSink::start(port, &inbox);
    for job in &dead {
        let id = job["id"].as_str().unwrap();
        let response = app
            .post(&format!("/v1/jobs/{id}/retry"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let retried: Value = response.json().await.unwrap();
        assert!(
            matches!(
                retried["state"].as_str(),
                Some("scheduled" | "running" | "completed")
            ),
            "{retried}"
        );
        assert!(
            retried["attempts"].as_i64().unwrap() <= 1,
            "attempts start over: {retried}"
        );
    }
    let id = dead[0]["id"].as_str().unwrap();
    for job in &dead {
        let id = job["id"].as_str().unwrap();
        eventually(|| async {
            (self::job(&app, &admin, id).await["state"] == "completed").then_some(())
        })
        .await;
    }
    eventually(|| async {
        let (_, body) = notifications(&app, &token, "").await;
        body["items"]
            .as_array()?
            .iter()
            .any(|n| n["status"] == "sent")
            .then_some(())
    })
    .await;
    assert_eq!(received(&inbox).len(), 2);

    // A completed job cannot be retried.
    let response = app
        .post(&format!("/v1/jobs/{id}/retry"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    problem(response, 409).await;
    let _ = std::fs::remove_dir_all(&inbox);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_email_job_and_redrive_sqlite() {
    dead_email_job_and_redrive(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_email_job_and_redrive_postgres() {
    dead_email_job_and_redrive(Backend::Postgres).await;
}

both!(
    jobs_admin_api_rules,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let (_, customer) = app.customer("jobs@example.com").await;
        let admin = app.admin_token().await;
        let completed = eventually(|| async {
            let list: Value = app
                .get("/v1/jobs?queue=email&state=completed")
                .bearer_auth(&admin)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let items = list["items"].as_array()?.clone();
            (items.len() >= 2).then_some(items)
        })
        .await;
        for j in &completed {
            for field in [
                "id",
                "queue",
                "state",
                "attempts",
                "max_attempts",
                "last_error",
                "run_at",
                "created_at",
                "updated_at",
            ] {
                assert!(j.get(field).is_some(), "job field {field}: {j}");
            }
            assert_eq!(j["state"], "completed");
        }
        let id = completed[0]["id"].as_str().unwrap();
        assert_eq!(job(&app, &admin, id).await["id"], id);
        problem(
            app.get(&format!("/v1/jobs/{id}"))
                .bearer_auth(&customer)
                .send()
                .await
                .unwrap(),
            403,
        )
        .await;
        problem(
            app.get("/v1/jobs")
                .bearer_auth(&customer)
                .send()
                .await
                .unwrap(),
            403,
        )
        .await;
        problem(
            app.get("/v1/jobs/not-a-uuid")
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap(),
            404,
        )
        .await;
        problem(
            app.get(&format!("/v1/jobs/{}", uuid::Uuid::now_v7()))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap(),
            404,
        )
        .await;
        problem(
            app.post(&format!("/v1/jobs/{}/retry", uuid::Uuid::now_v7()))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap(),
            404,
        )
        .await;
        let bad = problem(
            app.get("/v1/jobs?state=bogus")
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap(),
            422,
        )
        .await;
        assert_eq!(error_fields(&bad), ["state"]);
        // Paging.
        let first: Value = app
            .get("/v1/jobs?limit=1")
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let cursor = first["next_cursor"].as_str().expect("a next page");
        let second: Value = app
            .get(&format!("/v1/jobs?limit=1&cursor={cursor}"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_ne!(first["items"][0]["id"], second["items"][0]["id"]);
    }
);

both!(
    dead_events_admin_api_rules,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let (_, customer) = app.customer("dead-events@example.com").await;
        let list: Value = app
            .get("/v1/events/dead")
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(list["items"], json!([]));
        problem(
            app.get("/v1/events/dead")
                .bearer_auth(&customer)
                .send()
                .await
                .unwrap(),
            403,
        )
        .await;
        let path = format!(
            "/v1/events/dead/notifications/{}/redeliver",
            uuid::Uuid::now_v7()
        );
        problem(
            app.post(&path).bearer_auth(&admin).send().await.unwrap(),
            404,
        )
        .await;
    }
);

// One process's /metrics: behind the gateway, each instance counts its own work.
both!(
    readiness_and_metrics_cover_messaging,
    [sqlite, postgres],
    |app: TestApp| async move {
        app.customer("metrics@example.com").await;
        let admin = app.admin_token().await;
        eventually(|| async {
            let list: Value = app
                .get("/v1/jobs?state=completed")
                .bearer_auth(&admin)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (list["items"].as_array()?.len() >= 2).then_some(())
        })
        .await;
        let ready: Value = app
            .get("/readyz")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(ready["components"]["bus"], "up");
        assert_eq!(ready["components"]["jobs"], "up");
        // The gauges are sampled, not computed per scrape: wait (bounded) until a
        // scrape shows every series settled.
        let series = [
            "event_consumer_lag{consumer=\"notifications\"} 0",
            "jobs{queue=\"email\",state=\"completed\"}",
            "jobs{queue=\"email\",state=\"dead\"} 0",
            "job_runs_total{queue=\"email\",outcome=\"completed\"}",
            "outbox_backlog 0",
            "# TYPE outbox_backlog gauge",
            "# TYPE event_consumer_lag gauge",
            "# TYPE jobs gauge",
            "# TYPE job_runs_total counter",
        ];
        let mut last = String::new();
        let settled = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let Ok(response) = app.get("/metrics").send().await
                    && let Ok(text) = response.text().await
                {
                    if series.iter().all(|s| text.contains(s)) {
                        return;
                    }
                    last = text;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        if settled.is_err() {
            for series in series {
                assert!(last.contains(series), "missing {series}");
            }
        }
    }
);
