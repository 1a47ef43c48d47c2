//! kill -9 while the process delivers events and runs jobs under load; restart;
//! then every committed event reached every consumer exactly once in effect and
//! every job is completed: none lost, none doubled.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use scaleshop_contracts::{Contract, NotificationSent, UserCreated};
use scaleshop_testkit::{Backend, both, fixture};
use serde_json::{Value, json};

use crate::process::{Deployment, eventually, gauge};

fn fast(deployment: &mut Deployment) {
    deployment
        .set("SCALESHOP_EVENT_LEASE_MS", "1500")
        .set("SCALESHOP_EVENT_POLL_MS", "100")
        .set("SCALESHOP_JOB_LEASE_MS", "1500")
        .set("SCALESHOP_JOB_POLL_MS", "100")
        .set("SCALESHOP_JOB_MIN_BACKOFF_MS", "100");
}

/// Signs up users from `clients` concurrent clients until stopped (or 400 each).
fn load(
    base: String,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<String>>> {
    (0..clients)
        .map(|c| {
            let base = base.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let client = crate::process::client();
                let mut acked = Vec::new();
                for i in 0..400 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let response = client
                        .post(format!("{base}/v1/users"))
                        .json(&json!({"email": format!("c{c}-u{i}@example.com"), "name": "Load", "password": "password-123"}))
                        .send()
                        .await;
                    match response {
                        Ok(r) if r.status().as_u16() == 201 => {
                            let user: Value = r.json().await.expect("user");
                            acked.push(user["id"].as_str().expect("id").to_owned());
                        }
                        Ok(r) => panic!("unexpected status {}", r.status()),
                        // The server was killed: this client is done.
                        Err(_) => break,
                    }
                }
                acked
            })
        })
        .collect()
}

both!(
    kill9_under_load_loses_and_doubles_nothing,
    [sqlite, postgres, nats],
    |backend: Backend| async move {
        let mut deployment = Deployment::fresh(backend).await;
        fast(&mut deployment);
        let server = deployment.start().await;
        let stop = Arc::new(AtomicBool::new(false));
        let clients = load(server.base.clone(), 8, stop.clone());

        // Let events and jobs flow, then pull the plug mid-stream.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        server.kill9();
        stop.store(true, Ordering::Relaxed);
        let mut acked = Vec::new();
        for client in clients {
            acked.extend(client.await.expect("client task"));
        }
        assert!(
            acked.len() >= 10,
            "the load produced only {} users",
            acked.len()
        );

        let server = deployment.start().await;
        let token = server.admin_token().await;
        // What the crash left for the restarted process to finish (reported, not asserted:
        // it depends on where the kill landed).
        let left_jobs = server.all(&token, "/v1/jobs?queue=email").await;
        let unfinished = left_jobs
            .iter()
            .filter(|j| j["state"] != "completed")
            .count();
        let lag = gauge(&server, "event_consumer_lag{consumer=\"notifications\"}").await;
        eprintln!(
            "crash test ({backend:?}): {} users acknowledged; at restart {unfinished} of {} email jobs unfinished, consumer lag {lag:?}",
            acked.len(),
            left_jobs.len()
        );

        // Settle: the consumer caught up with the log and no job is left to run.
        eventually(Duration::from_secs(90), || async {
            let lag = gauge(&server, "event_consumer_lag{consumer=\"notifications\"}").await?;
            let jobs = server.all(&token, "/v1/jobs?queue=email").await;
            let open = jobs
                .iter()
                .filter(|j| j["state"] != "completed" && j["state"] != "dead")
                .count();
            (lag == 0.0 && open == 0).then_some(())
        })
        .await;

        let users = server.all(&token, "/v1/users").await;
        let user_ids: HashSet<String> = users
            .iter()
            .map(|u| u["id"].as_str().unwrap().to_owned())
            .collect();
        for id in &acked {
            assert!(user_ids.contains(id), "acknowledged user {id} was lost");
        }

        // Exactly one welcome notification per user, sent.
        let notifications = server.all(&token, "/v1/notifications").await;
        let mut per_user: HashMap<String, usize> = HashMap::new();
        for n in &notifications {
            assert_eq!(n["kind"], "welcome");
            assert_eq!(n["status"], "sent", "{n}");
            *per_user
                .entry(n["user_id"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        for id in &user_ids {
            assert_eq!(
                per_user.get(id),
                Some(&1),
                "user {id} has {:?} welcome notifications",
                per_user.get(id)
            );
        }
        assert_eq!(notifications.len(), user_ids.len());

        // One email job per notification, all completed.
        let jobs = server.all(&token, "/v1/jobs?queue=email").await;
        assert_eq!(
            jobs.len(),
            notifications.len(),
            "one email job per notification"
        );
        assert!(
            jobs.iter().all(|j| j["state"] == "completed"),
            "every job completed"
        );

        // The log: one user.created per user, one notification.sent per notification.
        let events = server.all(&token, "/v1/events").await;
        let count = |kind: &str| events.iter().filter(|e| e["type"] == kind).count();
        assert_eq!(count(UserCreated::NAME), user_ids.len());
        assert_eq!(count(NotificationSent::NAME), notifications.len());
        let sequences: Vec<i64> = events
            .iter()
            .map(|e| e["sequence"].as_i64().unwrap())
            .collect();
        assert!(
            sequences.windows(2).all(|w| w[0] < w[1]),
            "log in commit order"
        );

        // One mail file per notification (a re-run rewrites the same file).
        let mut files: Vec<String> = std::fs::read_dir(deployment.data_dir.join("mail"))
            .expect("mail folder")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".eml") && !name.starts_with('.'))
            .collect();
        files.sort();
        let mut expected: Vec<String> = notifications
            .iter()
            .map(|n| format!("{}.eml", n["id"].as_str().unwrap()))
            .collect();
        expected.sort();
        assert_eq!(files, expected);
        drop(server);
        let _ = std::fs::remove_dir_all(&deployment.data_dir);
    }
);
