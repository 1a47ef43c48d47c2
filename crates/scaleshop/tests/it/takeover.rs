//! Several processes share the event log on PostgreSQL: each consumer is served by
//! one process at a time under a lease, taken over when that process dies.

use std::time::Duration;

use scaleshop_db::sqlx::{self, Connection};
use scaleshop_testkit::{Backend, both, fixture};
use serde_json::json;

use crate::process::{Deployment, Server, eventually};

async fn lease_owner(url: &str) -> Option<String> {
    let mut conn = sqlx::PgConnection::connect(url).await.ok()?;
    sqlx::query_scalar("SELECT lease_owner FROM event_consumers WHERE name = 'notifications'")
        .fetch_optional(&mut conn)
        .await
        .ok()
        .flatten()
        .flatten()
}

/// Two processes on one fresh database, with consumer leases of `lease_ms` and
/// both safety-net polls at `poll_ms`: (the one holding the `notifications`
/// consumer's lease, the other, the database's URL, the deployment, which keeps
/// its NATS server for as long as it lives).
async fn two_processes(
    backend: Backend,
    lease_ms: &str,
    poll_ms: &str,
) -> (Server, Server, String, Deployment) {
    let mut deployment = Deployment::fresh(backend).await;
    deployment
        .set("SCALESHOP_EVENT_LEASE_MS", lease_ms)
        .set("SCALESHOP_EVENT_POLL_MS", poll_ms)
        .set("SCALESHOP_JOB_POLL_MS", poll_ms);
    let url = deployment.database_url.clone().expect("postgres url");
    let a = deployment.start().await;
    let b = deployment.start().await;
    let owner = eventually(Duration::from_secs(20), || lease_owner(&url)).await;
    let (holder, other) = if owner.starts_with(&format!("{}-", a.pid())) {
        (a, b)
    } else {
        (b, a)
    };
    assert!(
        owner.starts_with(&format!("{}-", holder.pid())),
        "lease held by one of the two"
    );
    (holder, other, url, deployment)
}

both!(
    the_survivor_takes_over_a_killed_process_consumer,
    [postgres, nats],
    |backend: Backend| async move {
        let (holder, survivor, url, _deployment) = two_processes(backend, "1500", "100").await;
        let survivor_pid = survivor.pid();
        holder.kill9();

        let mut created = Vec::new();
        for i in 0..5 {
            created.push(sign_up(&survivor, &format!("after-{i}@example.com")).await);
        }
        let token = survivor.admin_token().await;
        let notifications = eventually(Duration::from_secs(30), || async {
            let all = survivor.all(&token, "/v1/notifications").await;
            let done = created.iter().all(|id| {
                all.iter()
                    .any(|n| n["user_id"] == id.as_str() && n["status"] == "sent")
            });
            done.then_some(all)
        })
        .await;
        for id in &created {
            let count = notifications
                .iter()
                .filter(|n| n["user_id"] == id.as_str())
                .count();
            assert_eq!(count, 1, "user {id}");
        }
        let owner = lease_owner(&url).await.expect("lease owner");
        assert!(
            owner.starts_with(&format!("{survivor_pid}-")),
            "the survivor holds the lease: {owner}"
        );
    }
);

/// Signs up a user through `server`; its id.
async fn sign_up(server: &crate::process::Api, email: &str) -> String {
    let user: serde_json::Value = server
        .client
        .post(server.url("/v1/users"))
        .json(&json!({"email": email, "name": "Signed Up", "password": "password-123"}))
        .send()
        .await
        .expect("sign up")
        .json()
        .await
        .expect("user");
    user["id"].as_str().expect("id").to_owned()
}

/// Waits (at most `limit`) until the welcome email of `user` is sent.
async fn welcomed(server: &crate::process::Api, token: &str, user: &str, limit: Duration) {
    eventually(limit, || async {
        let all = server.all(token, "/v1/notifications").await;
        all.iter()
            .any(|n| n["user_id"] == user && n["status"] == "sent")
            .then_some(())
    })
    .await;
}

// Nothing polls: with both safety nets at ten minutes, a commit in one process
// wakes the consumer in the other at once (LISTEN/NOTIFY), and when the holder
// dies the survivor takes its consumers over when their lease ends.
both!(
    with_no_polling_a_commit_elsewhere_wakes_the_consumer_and_a_standby_takes_over,
    [postgres, nats],
    |backend: Backend| async move {
        let (holder, other, url, _deployment) = two_processes(backend, "1500", "600000").await;
        let token = other.admin_token().await;

        // The commit happens in the process that does not hold the consumer.
        let user = sign_up(&other, "woken-1@example.com").await;
        welcomed(&other, &token, &user, Duration::from_secs(10)).await;

        // The holder dies; the survivor's standby wakes when the lease ends.
        holder.kill9();
        let user = sign_up(&other, "woken-2@example.com").await;
        welcomed(&other, &token, &user, Duration::from_secs(15)).await;
        let owner = lease_owner(&url).await.expect("lease owner");
        assert!(owner.starts_with(&format!("{}-", other.pid())), "{owner}");
    }
);

// A process stopped with SIGTERM hands its consumers back and says so: with a
// lease of a minute and both polls at ten minutes, the other process takes them
// over at once, not when the lease would have ended.
both!(
    a_stopped_process_hands_its_consumers_over_at_once,
    [postgres, nats],
    |backend: Backend| async move {
        let (holder, other, url, _deployment) = two_processes(backend, "60000", "600000").await;
        let token = other.admin_token().await;
        assert!(
            holder.terminate().success(),
            "SIGTERM ends the holder cleanly"
        );
        let user = sign_up(&other, "handed-over@example.com").await;
        welcomed(&other, &token, &user, Duration::from_secs(15)).await;
        let owner = lease_owner(&url).await.expect("lease owner");
        assert!(owner.starts_with(&format!("{}-", other.pid())), "{owner}");
    }
);
