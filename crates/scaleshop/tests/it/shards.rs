//! Slot moves under kill -9: the real binary, with users in three shards, is
//! asked to move every slot of one shard to another and killed a few
//! milliseconds later, mid-move. The move's state is in the main database; the
//! restarted process resumes it from there and ends it. Afterwards every user
//! signs in, each shard holds exactly its users (the source's rows are gone,
//! no user is on two shards) and the map gives the moved slots to the target.
//! Several kills, at different moments of the move.

use std::time::Duration;

use scaleshop_testkit::{Backend, both, fixture};
use serde_json::{Value, json};

use crate::process::{Api, Deployment};

const USERS: usize = 40;

async fn deployment(backend: Backend) -> Deployment {
    let mut deployment = Deployment::fresh(backend).await;
    if backend.is_postgres() {
        let mut urls = Vec::new();
        for _ in 0..3 {
            urls.push(scaleshop_testkit::fresh_pg_url().await);
        }
        deployment.set("SCALESHOP_SHARD_URLS", &urls.join(","));
    } else {
        deployment.set("SCALESHOP_SHARDS", "3");
    }
    deployment.set("SCALESHOP_LOGIN_RATE_PER_ADDRESS", "100000");
    deployment
}

async fn shards(api: &Api, admin: &str) -> Value {
    api.get_json("/v1/shards", Some(admin))
        .await
        .expect("GET /v1/shards")
}

/// The slot ranges `shard` holds, as a move's list (`0-99,200-300`).
fn ranges_of(status: &Value, shard: &str) -> String {
    status["ranges"]
        .as_array()
        .expect("ranges")
        .iter()
        .filter(|r| r["shard"] == shard)
        .map(|r| format!("{}-{}", r["first"], r["last"]))
        .collect::<Vec<_>>()
        .join(",")
}

fn slots_of(status: &Value) -> Vec<u64> {
    status["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .map(|s| s["slots"].as_u64().expect("slots"))
        .collect()
}

both!(
    a_mover_killed_mid_move_is_resumed_by_the_next_start,
    |backend: Backend| async move {
        let deployment = deployment(backend).await;
        let mut server = deployment.start().await;
        for n in 0..USERS {
            let r = server
                .client
                .post(server.url("/v1/users"))
                .json(
                    &json!({"email": format!("kept-{n}@example.com"), "name": "Kept",
                              "password": "password-123"}),
                )
                .send()
                .await
                .expect("sign up");
            assert_eq!(r.status().as_u16(), 201);
        }
        let mut caught = Vec::new();
        // Kill at a different moment of each move: one to move every slot of
        // the last-but-empty shard away, the next to bring them back.
        let delays = [3_u64, 10, 6, 20];
        for (round, delay) in delays.iter().enumerate() {
            let admin = server.admin_token().await;
            let before = shards(&server, &admin).await;
            let (from, to) = if ranges_of(&before, "shard-2").is_empty() {
                ("shard-0", "shard-2")
            } else {
                ("shard-2", "shard-0")
            };
            let slots = ranges_of(&before, from);
            let accepted = server
                .client
                .post(server.url("/v1/shards/moves"))
                .bearer_auth(&admin)
                .json(&json!({"slots": slots, "to": to}))
                .send()
                .await
                .expect("move");
            assert_eq!(accepted.status().as_u16(), 202);
            tokio::time::sleep(Duration::from_millis(*delay)).await;
            server.kill9();
            // What the killed mover left in the main database.
            let main = scaleshop_testkit::open_database(
                deployment.database_url.as_deref(),
                &deployment.data_dir,
                &[],
            )
            .await;
            let left: (Option<String>, Option<String>) = scaleshop_db::with_pool!(main, pool => (
                scaleshop_db::sqlx::query_scalar("SELECT state FROM shard_moves").fetch_optional(pool).await.unwrap(),
                scaleshop_db::sqlx::query_scalar("SELECT state FROM shard_requests").fetch_optional(pool).await.unwrap(),
            ));
            main.close().await;
            let mid_move = left.0.is_some() || left.1.as_deref() == Some("running");
            server = deployment.start().await;
            let admin = server.admin_token().await;
            // The next start resumes the move (or finds it done).
            let mut status = Value::Null;
            for _ in 0..600 {
                status = shards(&server, &admin).await;
                if status["moving"].is_null() && status["request"]["state"] != "running" {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(
                status["moving"].is_null(),
                "the move was not resumed: {status}"
            );
            let resumed = status["request"]["outcome"]["moves"][0]["resumed"] == true;
            assert!(status["request"]["outcome"]["error"].is_null(), "{status}");
            if mid_move {
                caught.push(round);
            }
            // Whether it was killed before, during or after the move: the
            // slots are on one shard or the other, never lost.
            let slots = slots_of(&status);
            assert_eq!(slots.iter().sum::<u64>(), 1024, "{status}");
            let total_users: u64 = status["shards"]
                .as_array()
                .expect("shards")
                .iter()
                .map(|s| s["users"].as_u64().expect("users"))
                .sum();
            assert_eq!(total_users, USERS as u64 + 1, "{status}");
            if resumed {
                assert!(ranges_of(&status, from).is_empty(), "{status}");
            }
            eprintln!(
                "round {round} (kill after {delay} ms): left {left:?}, resumed {resumed}, slots {slots:?}"
            );
        }
        assert!(!caught.is_empty(), "no kill landed in the middle of a move");
        // Every user signs in, and the admin list has each once.
        for n in 0..USERS {
            let token = server
                .sign_in(&format!("kept-{n}@example.com"), "password-123")
                .await;
            assert!(!token.is_empty());
        }
        let admin = server.admin_token().await;
        let listed = server.all(&admin, "/v1/users").await;
        let ids: std::collections::BTreeSet<&str> = listed
            .iter()
            .map(|u| u["id"].as_str().expect("id"))
            .collect();
        assert_eq!(ids.len(), listed.len());
        assert_eq!(listed.len(), USERS + 1);
        server.terminate();
    }
);
