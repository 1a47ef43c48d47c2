//! Users in hash slots over shard databases: embedded (`shards = 3`, three
//! SQLite files) and on PostgreSQL (`shard_urls`, three databases).

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::StatusCode;
use scaleshop_app::{Config, Target};
use serde_json::{Value, json};

use crate::helpers::*;
use crate::users::json_body;

const SHARDS: usize = 3;

/// The configuration of a sharded app on `backend`.
async fn sharded_config(backend: Backend, shards: usize) -> Config {
    let mut config = test_config(backend).await;
    if backend.is_postgres() {
        let mut urls = Vec::new();
        for _ in 0..shards {
            urls.push(fresh_pg_database().await);
        }
        config.shard_urls = Some(scaleshop_app::config::Secret::new(urls.join(",")));
    } else {
        config.shards = u32::try_from(shards).unwrap();
    }
    // The load of the move tests signs users in from one address.
    config.login_rate_per_address = 100_000;
    config
}

async fn fixture(backend: Backend) -> TestApp {
    TestApp::spawn_with(sharded_config(backend, SHARDS).await, backend).await
}

/// The shard databases of `config`, as another process would open them.
async fn shard_databases(config: &Config) -> Vec<scaleshop_db::Database> {
    let settings = config.pool_settings();
    let mut dbs = Vec::new();
    let urls = config.shard_urls();
    if urls.is_empty() {
        for k in 0..config.shards {
            let file = config.data_dir.join("shards").join(format!("shard-{k}.db"));
            dbs.push(
                scaleshop_db::Database::open_sqlite_file(&file, &settings)
                    .await
                    .unwrap(),
            );
        }
    } else {
        for url in urls {
            dbs.push(
                scaleshop_db::Database::connect(Some(&url), &config.data_dir, &settings)
                    .await
                    .unwrap(),
            );
        }
    }
    dbs
}

/// How many users each shard holds.
async fn users_per_shard(config: &Config) -> Vec<i64> {
    let mut counts = Vec::new();
    for db in shard_databases(config).await {
        counts.push(scaleshop_users::store::count(&db).await.unwrap());
        db.close().await;
    }
    counts
}

async fn sign_up(app: &TestApp, email: &str, password: &str) -> reqwest::Response {
    app.post("/v1/users")
        .json(&json!({"email": email, "name": "Sharded Customer", "password": password}))
        .send()
        .await
        .unwrap()
}

async fn sign_in_status(app: &TestApp, email: &str, password: &str) -> StatusCode {
    app.post("/v1/sessions")
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
        .status()
}

/// The slot ranges `shard` holds, as a move's list (`0-99,200-300`).
async fn held_ranges(app: &TestApp, admin: &str, shard: &str) -> String {
    let status = json_body(
        app.get("/v1/shards")
            .bearer_auth(admin)
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    status["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["shard"] == shard)
        .map(|r| format!("{}-{}", r["first"], r["last"]))
        .collect::<Vec<_>>()
        .join(",")
}

/// How many slots each shard holds, from `GET /v1/shards`.
fn slots_of(status: &Value) -> Vec<u64> {
    status["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["slots"].as_u64().unwrap())
        .collect()
}

/// Every user the admin list gives, page by page (`limit` a page).
async fn list_all(app: &TestApp, token: &str, query: &str, limit: usize) -> Vec<Value> {
    let mut users = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let mut path = format!("/v1/users?limit={limit}{query}");
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let page = json_body(
            app.get(&path).bearer_auth(token).send().await.unwrap(),
            StatusCode::OK,
        )
        .await;
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= limit, "{page}");
        users.extend(items.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return users,
        }
    }
    panic!("the list did not end");
}

both!(
    users_spread_over_the_shards_and_sign_in_through_the_directory,
    [sqlite, postgres],
    |app: TestApp| async move {
        let ready = json_body(app.get("/readyz").send().await.unwrap(), StatusCode::OK).await;
        assert_eq!(ready["components"]["shards"], "up", "{ready}");
        let mut users = Vec::new();
        for n in 0..30 {
            let (user, token) = app.customer(&format!("spread-{n}@example.com")).await;
            users.push((user, token));
        }
        // Each user reads themself back, from their shard.
        for (user, token) in &users {
            let id = user["id"].as_str().unwrap();
            let read = json_body(
                app.get(&format!("/v1/users/{id}"))
                    .bearer_auth(token)
                    .send()
                    .await
                    .unwrap(),
                StatusCode::OK,
            )
            .await;
            assert_eq!(read["email"], user["email"]);
        }
        // 31 users (the admin too) over three shards of 341-342 slots each:
        // every shard has some, and none has them all.
        let counts = users_per_shard(&app.config).await;
        assert_eq!(counts.iter().sum::<i64>(), 31, "{counts:?}");
        assert!(counts.iter().all(|n| *n > 0), "{counts:?}");
        // The welcome email of each user: `user.created` is in the user's
        // shard's log, which the notification service follows.
        for (user, token) in &users {
            let what = format!("the welcome of {}", user["email"]);
            scaleshop_testkit::eventually_within(Duration::from_secs(30), &what, async || {
                let list = app
                    .get("/v1/notifications")
                    .bearer_auth(token)
                    .send()
                    .await
                    .unwrap()
                    .json::<Value>()
                    .await
                    .unwrap();
                list["items"]
                    .as_array()
                    .is_some_and(|items| items.iter().any(|n| n["kind"] == "welcome"))
            })
            .await;
        }
    }
);

both!(
    one_address_signed_up_at_once_on_different_shards_makes_one_account,
    [sqlite, postgres],
    |app: TestApp| async move {
        for round in 0..4 {
            let email = format!("race-{round}@example.com");
            // Eight sign-ups at once, each with its own password: each gets
            // its own id, so its own slot, most of them on other shards.
            let attempts = (0..8).map(|n| {
                let app = &app;
                let email = email.clone();
                async move {
                    let password = format!("password-{n}-{round}");
                    let status = sign_up(app, &email, &password).await.status();
                    (status, password)
                }
            });
            let outcomes = futures::future::join_all(attempts).await;
            let created: Vec<&String> = outcomes
                .iter()
                .filter(|(status, _)| *status == StatusCode::CREATED)
                .map(|(_, password)| password)
                .collect();
            assert_eq!(created.len(), 1, "round {round}: {outcomes:?}");
            assert!(
                outcomes
                    .iter()
                    .all(|(s, _)| *s == StatusCode::CREATED || *s == StatusCode::CONFLICT),
                "{outcomes:?}"
            );
            assert_eq!(
                sign_in_status(&app, &email, created[0]).await,
                StatusCode::CREATED
            );
        }
        // Four accounts and the admin, in all the shards together.
        let counts = users_per_shard(&app.config).await;
        assert_eq!(counts.iter().sum::<i64>(), 5, "{counts:?}");
    }
);

both!(
    a_changed_address_moves_in_the_directory,
    [sqlite, postgres],
    |app: TestApp| async move {
        let (alice, token) = app.customer("alice-old@example.com").await;
        app.customer("bob@example.com").await;
        let id = alice["id"].as_str().unwrap();
        let change = |email: &'static str| {
            app.patch(&format!("/v1/users/{id}"))
                .bearer_auth(&token)
                .json(&json!({"email": email, "current_password": "password-123"}))
                .send()
        };
        // Another user's address: taken, whichever shard holds them.
        assert_eq!(
            change("bob@example.com").await.unwrap().status(),
            StatusCode::CONFLICT
        );
        assert_eq!(
            change("alice-new@example.com").await.unwrap().status(),
            StatusCode::OK
        );
        assert_eq!(
            sign_in_status(&app, "alice-old@example.com", "password-123").await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            sign_in_status(&app, "alice-new@example.com", "password-123").await,
            StatusCode::CREATED
        );
        // The old address is free again; the new one is not.
        assert_eq!(
            sign_up(&app, "alice-old@example.com", "password-456")
                .await
                .status(),
            StatusCode::CREATED
        );
        assert_eq!(
            sign_up(&app, "alice-new@example.com", "password-456")
                .await
                .status(),
            StatusCode::CONFLICT
        );
    }
);

both!(
    the_admin_user_list_pages_over_every_shard_once,
    [sqlite, postgres],
    |app: TestApp| async move {
        let mut made = BTreeSet::new();
        for n in 0..25 {
            let (user, _) = app.customer(&format!("page-{n}@example.com")).await;
            made.insert(user["id"].as_str().unwrap().to_owned());
        }
        let admin = app.admin_token().await;
        for limit in [1, 4, 7, 50] {
            let listed = list_all(&app, &admin, "", limit).await;
            let ids: Vec<String> = listed
                .iter()
                .map(|u| u["id"].as_str().unwrap().to_owned())
                .collect();
            // In id order, each once, every user of every shard.
            let mut sorted = ids.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(ids, sorted, "limit {limit}");
            assert_eq!(ids.len(), 26, "limit {limit}");
            assert!(made.iter().all(|id| ids.contains(id)));
        }
        // The text filter runs on every shard too.
        let matched = list_all(&app, &admin, "&q=page-1", 3).await;
        let emails: BTreeSet<&str> = matched
            .iter()
            .map(|u| u["email"].as_str().unwrap())
            .collect();
        let expected: BTreeSet<String> = [1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
            .iter()
            .map(|n| format!("page-{n}@example.com"))
            .collect();
        assert_eq!(
            emails,
            expected.iter().map(String::as_str).collect::<BTreeSet<_>>()
        );
    }
);

/// On PostgreSQL the shard list can grow (a new shard holds no slot until
/// slots move to it), but not shrink or change order: each shard database
/// knows which one it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shard_list_may_grow_but_not_shrink_or_reorder() {
    scaleshop_testkit::cleaned(async {
        let mut config = sharded_config(Backend::Postgres, 2).await;
        let app = TestApp::spawn_with(config.clone(), Backend::Postgres).await;
        app.customer("kept@example.com").await;
        app.stop().await.unwrap();
        let urls = config.shard_urls();

        // Reordered: refused, naming the order.
        config.shard_urls = Some(scaleshop_app::config::Secret::new(format!(
            "{},{}",
            urls[1], urls[0]
        )));
        let refused = scaleshop_app::App::build(&config, Target::ALL).await;
        let message = refused.err().expect("a reordered list starts").to_string();
        assert!(
            message.contains("in the order they were added"),
            "{message}"
        );

        // Shrunk: refused, naming the shard that holds slots.
        config.shard_urls = Some(scaleshop_app::config::Secret::new(urls[0].clone()));
        let refused = scaleshop_app::App::build(&config, Target::ALL).await;
        let message = refused.err().expect("a shorter list starts").to_string();
        assert!(message.contains("shard-1"), "{message}");

        // Grown: the new shard joins with no slot, and every user is still there.
        let third = fresh_pg_database().await;
        config.shard_urls = Some(scaleshop_app::config::Secret::new(format!(
            "{},{},{third}",
            urls[0], urls[1]
        )));
        let app = TestApp::spawn_with(config.clone(), Backend::Postgres).await;
        assert_eq!(
            sign_in_status(&app, "kept@example.com", "password-123").await,
            StatusCode::CREATED
        );
        app.customer("after-growth@example.com").await;
        let counts = users_per_shard(&config).await;
        assert_eq!(counts[2], 0, "{counts:?}");
        assert_eq!(counts.iter().sum::<i64>(), 3, "{counts:?}");
        let admin = app.admin_token().await;
        let status = json_body(
            app.get("/v1/shards")
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap(),
            StatusCode::OK,
        )
        .await;
        let slots = slots_of(&status);
        assert_eq!(slots, [512, 512, 0], "{status}");
        assert_eq!(status["epoch"], 1);
        app.stop().await.unwrap();
    })
    .await;
}

/// A sharded configuration that cannot work is refused at start, naming the key.
#[test]
fn shard_settings_that_cannot_work_are_refused() {
    let mut config = Config {
        shards: 2,
        database_url: Some(scaleshop_app::config::Secret::new(
            "postgres://localhost/db",
        )),
        ..Config::default()
    };
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("shards"), "{error}");
    config.database_url = None;
    config.shard_urls = Some(scaleshop_app::config::Secret::new(
        "postgres://localhost/s0",
    ));
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("shard_urls"), "{error}");
    config.shard_urls = None;
    config.nats_url = Some(scaleshop_app::config::Secret::new("nats://127.0.0.1:4222"));
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("nats_url"), "{error}");
}

/// A client of the sharded app during moves: what it wrote, what went wrong,
/// and how long each request took.
#[derive(Default)]
struct Load {
    /// user id → (email, the last name written and acknowledged).
    written: std::collections::BTreeMap<String, (String, String)>,
    failures: Vec<String>,
    latencies_ms: Vec<f64>,
}

/// Until `stop`, signs users up, reads each back with its own token, renames it
/// and reads the new name back (read-your-writes across moves). Bounded: at most
/// 400 rounds or 120 s.
async fn user_load(
    app: &TestApp,
    worker: usize,
    stop: &std::sync::atomic::AtomicBool,
    rounds: &std::sync::atomic::AtomicUsize,
) -> Load {
    let mut load = Load::default();
    let started = std::time::Instant::now();
    let timed = async |load: &mut Load, request: reqwest::RequestBuilder| {
        let at = std::time::Instant::now();
        let response = request.send().await;
        load.latencies_ms.push(at.elapsed().as_secs_f64() * 1000.0);
        response
    };
    for round in 0..400 {
        if stop.load(std::sync::atomic::Ordering::SeqCst) || started.elapsed().as_secs() > 120 {
            break;
        }
        let email = format!("load-{worker}-{round}@example.com");
        let body = json!({"email": email, "name": "Loaded", "password": "password-123"});
        let signed_up = timed(&mut load, app.post("/v1/users").json(&body)).await;
        let user: Value = match signed_up {
            Ok(r) if r.status() == StatusCode::CREATED => r.json().await.unwrap(),
            Ok(r) => {
                load.failures
                    .push(format!("sign-up {email}: {}", r.status()));
                continue;
            }
            Err(e) => {
                load.failures.push(format!("sign-up {email}: {e}"));
                continue;
            }
        };
        let id = user["id"].as_str().unwrap().to_owned();
        load.written
            .insert(id.clone(), (email.clone(), "Loaded".into()));
        let credentials = json!({"email": email, "password": "password-123"});
        let token = match timed(&mut load, app.post("/v1/sessions").json(&credentials)).await {
            Ok(r) if r.status() == StatusCode::CREATED => r.json::<Value>().await.unwrap()["token"]
                .as_str()
                .unwrap()
                .to_owned(),
            other => {
                load.failures
                    .push(format!("sign-in {email}: {:?}", other.map(|r| r.status())));
                continue;
            }
        };
        let name = format!("Renamed {round}");
        let renamed = timed(
            &mut load,
            app.patch(&format!("/v1/users/{id}"))
                .bearer_auth(&token)
                .json(&json!({"name": name})),
        )
        .await;
        match renamed {
            Ok(r) if r.status() == StatusCode::OK => {
                load.written
                    .insert(id.clone(), (email.clone(), name.clone()));
            }
            other => {
                load.failures
                    .push(format!("rename {email}: {:?}", other.map(|r| r.status())));
                continue;
            }
        }
        let read = timed(
            &mut load,
            app.get(&format!("/v1/users/{id}")).bearer_auth(&token),
        )
        .await;
        match read {
            Ok(r) if r.status() == StatusCode::OK => {
                let user: Value = r.json().await.unwrap();
                if user["name"] != name.as_str() {
                    load.failures.push(format!(
                        "{email} read {} after writing {name}",
                        user["name"]
                    ));
                }
            }
            other => load
                .failures
                .push(format!("read {email}: {:?}", other.map(|r| r.status()))),
        }
        rounds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    load
}

/// Waits (at most 60 s) until the load has made `n` more rounds.
async fn load_goes_on(rounds: &std::sync::atomic::AtomicUsize, n: usize) {
    let until = rounds.load(std::sync::atomic::Ordering::SeqCst) + n;
    scaleshop_testkit::eventually_within(Duration::from_secs(60), "the load", async || {
        rounds.load(std::sync::atomic::Ordering::SeqCst) >= until
    })
    .await;
}

/// Asks for a move (or a rebalance, `None`) and waits until this app ran it.
async fn run_move(app: &TestApp, admin: &str, request: Option<Value>) -> Value {
    let asked = match &request {
        Some(body) => app.post("/v1/shards/moves").json(body),
        None => app.post("/v1/shards/rebalance"),
    };
    let accepted = asked.bearer_auth(admin).send().await.unwrap();
    assert_eq!(accepted.status(), StatusCode::ACCEPTED, "{request:?}");
    let mut status = Value::Null;
    scaleshop_testkit::eventually_within(Duration::from_secs(120), "the move to end", async || {
        status = json_body(
            app.get("/v1/shards")
                .bearer_auth(admin)
                .send()
                .await
                .unwrap(),
            StatusCode::OK,
        )
        .await;
        status["request"]["state"] != "running"
    })
    .await;
    assert!(status["request"]["outcome"]["error"].is_null(), "{status}");
    assert!(status["moving"].is_null(), "{status}");
    status
}

fn p99(latencies: &mut [f64]) -> f64 {
    latencies.sort_by(f64::total_cmp);
    latencies
        .get((latencies.len() * 99).div_ceil(100).saturating_sub(1))
        .copied()
        .unwrap_or(0.0)
}

both!(
    slots_move_from_three_shards_to_two_and_back_under_load_losing_nothing,
    [sqlite, postgres],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let mut seeds = BTreeSet::new();
        let mut signed_out = Vec::new();
        for n in 0..20 {
            let (user, token) = app.customer(&format!("seed-{n}@example.com")).await;
            let id = user["id"].as_str().unwrap().to_owned();
            seeds.insert(id.clone());
            // Some sign out: their ended sessions move with them.
            if n % 5 == 0 {
                let out = app.request(reqwest::Method::DELETE, "/v1/sessions/current");
                let out = out.bearer_auth(&token).send().await.unwrap();
                assert_eq!(out.status(), StatusCode::NO_CONTENT);
                signed_out.push((id, token));
            }
        }
        let stop = std::sync::atomic::AtomicBool::new(false);
        let rounds = std::sync::atomic::AtomicUsize::new(0);
        let moves = async {
            load_goes_on(&rounds, 10).await;
            // 3 → 2: every slot of shard-2 to shard-0; then 2 → 3 again.
            let of_shard_2 = held_ranges(&app, &admin, "shard-2").await;
            let to_two = run_move(
                &app,
                &admin,
                Some(json!({"slots": of_shard_2, "to": "shard-0"})),
            )
            .await;
            let slots = slots_of(&to_two);
            assert_eq!(slots, [683, 341, 0], "{to_two}");
            load_goes_on(&rounds, 10).await;
            let to_three = run_move(&app, &admin, None).await;
            let slots = slots_of(&to_three);
            assert!(slots.iter().all(|n| (341..=342).contains(n)), "{to_three}");
            // One flip each: the epoch was 1.
            assert_eq!(to_three["epoch"], 3, "{to_three}");
            load_goes_on(&rounds, 5).await;
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            (to_two, to_three)
        };
        // Paging the admin list while slots move: every seeded user once in
        // every pass.
        let pages = async {
            let mut passes = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && passes < 200 {
                let listed = list_all(&app, &admin, "&q=seed-", 3).await;
                let ids: Vec<String> = listed
                    .iter()
                    .map(|u| u["id"].as_str().unwrap().to_owned())
                    .collect();
                let unique: BTreeSet<String> = ids.iter().cloned().collect();
                assert_eq!(ids.len(), unique.len(), "a user twice in one pass");
                assert_eq!(unique, seeds, "pass {passes}");
                passes += 1;
            }
            passes
        };
        let ((to_two, to_three), passes, loads) = tokio::join!(
            moves,
            pages,
            futures::future::join_all((0..3).map(|w| user_load(&app, w, &stop, &rounds)))
        );
        let mut written = std::collections::BTreeMap::new();
        let mut failures = Vec::new();
        let mut latencies = Vec::new();
        for load in loads {
            written.extend(load.written);
            failures.extend(load.failures);
            latencies.extend(load.latencies_ms);
        }
        let requests = latencies.len();
        eprintln!(
            "moves under load: {requests} requests, p99 {:.1} ms, {passes} list passes; \
             fences {} ms and {} ms",
            p99(&mut latencies),
            to_two["request"]["outcome"]["moves"][0]["fenced_ms"],
            to_three["request"]["outcome"]["moves"]
        );
        assert!(failures.is_empty(), "{failures:#?}");
        assert!(written.len() >= 3, "the load wrote {} users", written.len());
        // Nothing lost, nothing twice: every user once in the list, with the
        // last name written.
        let all = list_all(&app, &admin, "", 50).await;
        let listed: std::collections::BTreeMap<String, Value> = all
            .iter()
            .map(|u| (u["id"].as_str().unwrap().to_owned(), u.clone()))
            .collect();
        assert_eq!(listed.len(), all.len(), "a user listed twice");
        assert_eq!(all.len(), 1 + seeds.len() + written.len());
        for (id, (email, name)) in &written {
            let user = &listed[id];
            assert_eq!(user["email"], email.as_str());
            assert_eq!(user["name"], name.as_str(), "{email}");
        }
        // The map's gauges follow the moves.
        assert_eq!(app.metric("shard_map_epoch", &[]).await, 3.0);
        assert_eq!(app.metric("shard_slots", &[]).await, 1024.0);
        let on_shard_2 = app.metric("shard_slots", &["shard=\"shard-2\""]).await;
        assert!((341.0..=342.0).contains(&on_shard_2), "{on_shard_2}");
        // Every signed-out token is still refused, and each ended session is
        // in one shard only.
        for (id, token) in &signed_out {
            let read = app
                .get(&format!("/v1/users/{id}"))
                .bearer_auth(token)
                .send()
                .await;
            assert_eq!(read.unwrap().status(), StatusCode::UNAUTHORIZED);
        }
        let mut ended = 0;
        for db in shard_databases(&app.config).await {
            let n: i64 = scaleshop_db::with_pool!(db, pool => {
                scaleshop_db::sqlx::query_scalar("SELECT COUNT(*) FROM ended_sessions")
                    .fetch_one(pool)
                    .await
                    .unwrap()
            });
            ended += n;
            db.close().await;
        }
        assert_eq!(ended as usize, signed_out.len());
        // The source rows are gone: each shard holds exactly its users.
        let counts = users_per_shard(&app.config).await;
        assert_eq!(counts.iter().sum::<i64>() as usize, all.len(), "{counts:?}");
        // One welcome each: the events of the moved users' old and new
        // shards' logs were each delivered once.
        for (id, (email, _)) in written.iter().take(30) {
            let what = format!("one welcome for {email}");
            scaleshop_testkit::eventually_within(Duration::from_secs(30), &what, async || {
                let list = app
                    .get(&format!("/v1/notifications?user_id={id}"))
                    .bearer_auth(&admin)
                    .send()
                    .await
                    .unwrap()
                    .json::<Value>()
                    .await
                    .unwrap();
                let welcomes = list["items"].as_array().map_or(0, |items| {
                    items.iter().filter(|n| n["kind"] == "welcome").count()
                });
                assert!(welcomes <= 1, "{email}: {list}");
                welcomes == 1
            })
            .await;
        }
    }
);

/// Users made before shards were configured live in the main database, where
/// a sharded process never looks: a sharded start over them is refused, not
/// allowed to hide them (and let their addresses be taken again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_made_before_shards_refuse_a_sharded_start() {
    scaleshop_testkit::cleaned(async {
        let mut config = test_config(Backend::Postgres).await;
        let app = TestApp::spawn_with(config.clone(), Backend::Postgres).await;
        app.customer("before-shards@example.com").await;
        app.stop().await.unwrap();
        let shard = fresh_pg_database().await;
        config.shard_urls = Some(scaleshop_app::config::Secret::new(shard));
        let refused = scaleshop_app::App::build(&config, Target::ALL).await;
        let message = refused
            .err()
            .expect("a sharded start over users")
            .to_string();
        assert!(
            message.contains("from before shards were configured"),
            "{message}"
        );
    })
    .await;
}

/// Two instances on the same shards (PostgreSQL): one moves slots while the
/// other takes writes. The other learns the new map at once (the flip's
/// `NOTIFY`), its writes that reached the fenced source were refused there and
/// went to the target, and nothing it wrote was lost or read back stale, on
/// either instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instance_follows_a_move_made_elsewhere() {
    scaleshop_testkit::cleaned(async {
        let config = sharded_config(Backend::Postgres, SHARDS).await;
        let mover = TestApp::spawn_with(config.clone(), Backend::Postgres).await;
        let writer = TestApp::spawn_with(config.clone(), Backend::Postgres).await;
        let admin = mover.admin_token().await;
        let stop = std::sync::atomic::AtomicBool::new(false);
        let rounds = std::sync::atomic::AtomicUsize::new(0);
        let moves = async {
            load_goes_on(&rounds, 5).await;
            let of_shard_1 = held_ranges(&mover, &admin, "shard-1").await;
            let moved = run_move(
                &mover,
                &admin,
                Some(json!({"slots": of_shard_1, "to": "shard-2"})),
            )
            .await;
            assert_eq!(slots_of(&moved), [342, 0, 682], "{moved}");
            // The other instance heard of the flip: its map has the new epoch
            // well before its 5 s safety-net reload.
            let heard = std::time::Instant::now();
            scaleshop_testkit::eventually_within(
                Duration::from_secs(2),
                "the writer's map to move on",
                async || writer.metric("shard_map_epoch", &[]).await == 2.0,
            )
            .await;
            eprintln!(
                "the writer had the new map {:?} after the move ended",
                heard.elapsed()
            );
            load_goes_on(&rounds, 5).await;
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        };
        let ((), load) = tokio::join!(moves, user_load(&writer, 0, &stop, &rounds));
        assert!(load.failures.is_empty(), "{:#?}", load.failures);
        assert!(load.written.len() >= 10, "{}", load.written.len());
        // The mover's instance reads every write the other made.
        for (id, (email, name)) in &load.written {
            let user = json_body(
                mover
                    .get(&format!("/v1/users/{id}"))
                    .bearer_auth(&admin)
                    .send()
                    .await
                    .unwrap(),
                StatusCode::OK,
            )
            .await;
            assert_eq!(user["email"], email.as_str());
            assert_eq!(user["name"], name.as_str());
        }
        eprintln!(
            "the writer's refused reads and writes: {}",
            writer.metric("shard_refusals_total", &[]).await as u64
        );
    })
    .await;
}
