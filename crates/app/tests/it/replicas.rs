//! Read replicas against real PostgreSQL streaming replication: a private primary
//! and a `pg_basebackup -R` replica per test (PostgreSQL only: replicas exist on
//! no other backend). The app runs in process and is driven over HTTP.
//!
//! The tests share the process-wide `db_replica_fallback_total` counter, so they
//! run one at a time (`SERIAL`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use scaleshop_app::Config;
use scaleshop_app::config::Secret;
use scaleshop_testkit::PgServer;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::helpers::{Backend, TestApp, test_config};

static SERIAL: Mutex<()> = Mutex::const_new(());

const TOKEN: &str = "x-consistency-token";

/// A primary and one replica of it (applying commits `delay` late).
async fn cluster(delay: Option<Duration>) -> (PgServer, PgServer) {
    tokio::task::spawn_blocking(move || {
        let primary = PgServer::start();
        let replica = PgServer::replica_of(&primary, delay);
        (primary, replica)
    })
    .await
    .unwrap()
}

async fn spawn(
    primary: &PgServer,
    replica: &PgServer,
    configure: impl FnOnce(&mut Config),
) -> TestApp {
    let mut config = test_config(Backend::Sqlite).await;
    config.database_url = Some(Secret::new(primary.url()));
    config.read_replica_urls = Some(Secret::new(replica.url()));
    config.db_min_connections = 1;
    configure(&mut config);
    TestApp::spawn_with(config, Backend::Postgres).await
}

/// `/readyz`'s status and this replica's state in it.
async fn replica_state(app: &TestApp, replica: &PgServer) -> (StatusCode, String) {
    let response = app.get("/readyz").send().await.unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    let label = format!("127.0.0.1:{}", replica.port);
    let state = body["replicas"][&label]
        .as_str()
        .unwrap_or("absent")
        .to_owned();
    (status, state)
}

async fn wait_replica(app: &TestApp, replica: &PgServer, wanted: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let (status, state) = replica_state(app, replica).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "replicas never make the instance unready"
        );
        if state == wanted {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica not {wanted} within {limit:?} (it is {state})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn fallbacks(app: &TestApp) -> f64 {
    app.metric("db_replica_fallback_total", &[]).await
}

async fn create_product(app: &TestApp, admin: &str, sku: &str) -> (String, String) {
    let response = app
        .post("/v1/products")
        .bearer_auth(admin)
        .json(
            &json!({"sku": sku, "name": "Replicated", "description": "", "price_cents": 100,
                      "currency": "EUR", "initial_stock": 5}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let token = response.headers()[TOKEN].to_str().unwrap().to_owned();
    let product: Value = response.json().await.unwrap();
    (product["id"].as_str().unwrap().to_owned(), token)
}

/// With commits applied 1 s late, a read without a token does see old data (the
/// set-up really lags); with the write's token, none of 1000 write-then-read
/// pairs (product and user changes, 20 clients at once) reads old data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_with_a_token_see_the_write_on_a_lagging_replica() {
    let _serial = SERIAL.lock().await;
    let (primary, replica) = cluster(Some(Duration::from_secs(1))).await;
    // Lag below 10 s still gets reads: the stale reads below come from it.
    let app = spawn(&primary, &replica, |c| c.replica_max_lag_ms = 10_000).await;
    wait_replica(&app, &replica, "up", Duration::from_secs(30)).await;
    let admin = app.admin_token().await;

    // Without a token: a product just made is not yet on the replica.
    let mut stale = 0;
    for i in 0..10 {
        let (id, _) = create_product(&app, &admin, &format!("STALE-{i}")).await;
        let found = app.get(&format!("/v1/products/{id}")).send().await.unwrap();
        if found.status() == StatusCode::NOT_FOUND {
            stale += 1;
        }
    }
    assert!(
        stale > 0,
        "no read without a token was stale: the replica does not lag"
    );
    eprintln!("replicas: product reads without a token right after the write: {stale} of 10 stale");

    // Orders: a product and a customer made just now are priced and checked on
    // the primary (the order is accepted), and the order is read back by id and
    // in the list: stale without a token, never with it.
    let (buyer, buyer_token) = app.customer("buyer@example.com").await;
    let (mut stale_orders, mut token_reads) = (0, 0);
    for i in 0..10 {
        let (product, _) = create_product(&app, &admin, &format!("ORDER-{i}")).await;
        let placed = app
            .post("/v1/orders")
            .bearer_auth(&buyer_token)
            .json(&json!({"items": [{"product_id": product, "quantity": 1}],
                          "payment_method": "pm_card_visa"}))
            .send()
            .await
            .unwrap();
        assert_eq!(placed.status(), StatusCode::ACCEPTED, "order on fresh data");
        let token = placed.headers()[TOKEN].clone();
        let order: Value = placed.json().await.unwrap();
        let path = format!("/v1/orders/{}", order["id"].as_str().unwrap());
        let plain = app
            .get(&path)
            .bearer_auth(&buyer_token)
            .send()
            .await
            .unwrap();
        if plain.status() == StatusCode::NOT_FOUND {
            stale_orders += 1;
        }
        let read = app
            .get(&path)
            .bearer_auth(&buyer_token)
            .header(TOKEN, token.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(read.status(), StatusCode::OK, "order read with its token");
        let listed = app
            .get(&format!(
                "/v1/orders?user_id={}",
                buyer["id"].as_str().unwrap()
            ))
            .bearer_auth(&buyer_token)
            .header(TOKEN, token)
            .send()
            .await
            .unwrap();
        assert_eq!(listed.status(), StatusCode::OK);
        let listed: Value = listed.json().await.unwrap();
        assert!(
            listed["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|o| o["id"] == order["id"]),
            "order listed with its token"
        );
        token_reads += 2;
    }
    assert!(
        stale_orders > 0,
        "no order read without a token was stale: order reads do not use the replica"
    );
    eprintln!(
        "replicas: order reads without a token: {stale_orders} of 10 stale; \
         with the token: {token_reads} of {token_reads} fresh"
    );

    // With the token: 10 products and 10 users, each changed and read back 50 times.
    let mut targets = Vec::new();
    for i in 0..10 {
        let (id, _) = create_product(&app, &admin, &format!("RYW-{i}")).await;
        targets.push((format!("/v1/products/{id}"), admin.clone()));
        let (user, token) = app.customer(&format!("ryw{i}@example.com")).await;
        targets.push((format!("/v1/users/{}", user["id"].as_str().unwrap()), token));
    }
    let app = Arc::new(app);
    let (pairs, stale) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    let started = Instant::now();
    for (path, bearer) in targets {
        let (app, pairs, stale) = (app.clone(), pairs.clone(), stale.clone());
        clients.push(tokio::spawn(async move {
            for round in 0..50 {
                let name = format!("name {round}");
                let written = app
                    .patch(&path)
                    .bearer_auth(&bearer)
                    .json(&json!({"name": name}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(written.status(), StatusCode::OK, "PATCH {path}");
                let token = written.headers()[TOKEN].clone();
                let read = app
                    .get(&path)
                    .bearer_auth(&bearer)
                    .header(TOKEN, token)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(read.status(), StatusCode::OK, "GET {path}");
                let body: Value = read.json().await.unwrap();
                pairs.fetch_add(1, Ordering::Relaxed);
                if body["name"] != name.as_str() {
                    stale.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for client in clients {
        tokio::time::timeout(Duration::from_secs(240), client)
            .await
            .expect("the pairs end in time")
            .unwrap();
    }
    assert_eq!(pairs.load(Ordering::Relaxed), 1000);
    eprintln!(
        "replicas: {} write-then-read pairs with the token in {:.1} s, {} stale",
        pairs.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
        stale.load(Ordering::Relaxed)
    );
    assert_eq!(stale.load(Ordering::Relaxed), 0, "stale reads with a token");
}

/// Reads under load while the replica's postmaster is killed (`kill -9`): every
/// read answers 200 (a read the replica fails runs again on the primary), the
/// replica shows as down, and the instance stays ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_fails_no_read() {
    let _serial = SERIAL.lock().await;
    let (primary, replica) = cluster(None).await;
    let app = spawn(&primary, &replica, |_| {}).await;
    wait_replica(&app, &replica, "up", Duration::from_secs(30)).await;
    let admin = app.admin_token().await;
    let (_, customer) = app.customer("reader@example.com").await;
    create_product(&app, &admin, "KILL-1").await;
    wait_replica(&app, &replica, "up", Duration::from_secs(10)).await;
    let before = fallbacks(&app).await;

    let app = Arc::new(app);
    let (reads, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop_at = Instant::now() + Duration::from_secs(4);
    let mut readers = Vec::new();
    for i in 0..8 {
        let (app, reads, failed, customer) =
            (app.clone(), reads.clone(), failed.clone(), customer.clone());
        readers.push(tokio::spawn(async move {
            // Bounded in time and count.
            for _ in 0..100_000 {
                if Instant::now() >= stop_at {
                    break;
                }
                let request = if i % 2 == 0 {
                    app.get("/v1/products?q=kill")
                } else {
                    app.get("/v1/orders").bearer_auth(&customer)
                };
                let ok = matches!(request.send().await, Ok(r) if r.status() == StatusCode::OK);
                reads.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let replica = tokio::task::spawn_blocking(move || {
        replica.kill();
        replica
    })
    .await
    .unwrap();
    for reader in readers {
        tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .expect("readers end")
            .unwrap();
    }
    let reads = reads.load(Ordering::Relaxed);
    eprintln!(
        "replicas: {reads} reads in 4 s by 8 clients, replica killed after 1 s: {} failed",
        failed.load(Ordering::Relaxed)
    );
    assert!(reads > 100, "too few reads to mean anything: {reads}");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "failed reads out of {reads}"
    );
    wait_replica(&app, &replica, "down", Duration::from_secs(5)).await;
    eprintln!(
        "replicas: fallbacks to the primary after the kill: {}",
        fallbacks(&app).await - before
    );
    assert!(
        fallbacks(&app).await > before,
        "reads after the kill went to the primary"
    );
}

/// A replica pushed past the lag bound (its apply delay raised while it runs)
/// gets no reads: they go to the primary and the fallback counter rises. Once
/// the delay is gone and it has caught up, reads go back to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_gets_reads_again_once_caught_up() {
    let _serial = SERIAL.lock().await;
    let (primary, replica) = cluster(None).await;
    let app = spawn(&primary, &replica, |c| c.replica_max_lag_ms = 1000).await;
    wait_replica(&app, &replica, "up", Duration::from_secs(30)).await;
    let admin = app.admin_token().await;
    let (product, _) = create_product(&app, &admin, "LAG-1").await;

    // A steady trickle of writes, so that a replica applying late falls behind.
    let app = Arc::new(app);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let writer = {
        let (app, admin) = (app.clone(), admin.clone());
        tokio::spawn(async move {
            for round in 0..10_000 {
                let response = app
                    .patch(&format!("/v1/products/{product}"))
                    .bearer_auth(&admin)
                    .json(&json!({"name": format!("lag {round}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                    _ = stop_rx.changed() => return,
                }
            }
        })
    };
    let search = |app: Arc<TestApp>| async move {
        for _ in 0..20 {
            // The product list: the products table (a search by words goes to the
            // search projection, which needs no replica when nothing matches).
            let r = app.get("/v1/products?limit=20").send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
        }
    };

    let replica_url = replica.url();
    let set_delay = |delay: &'static str| {
        let url = replica_url.clone();
        async move {
            use scaleshop_db::sqlx::{self, Connection};
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "ALTER SYSTEM SET recovery_min_apply_delay = '{delay}'"
            )))
            .execute(&mut conn)
            .await
            .unwrap();
            sqlx::raw_sql("SELECT pg_reload_conf()")
                .execute(&mut conn)
                .await
                .unwrap();
        }
    };

    set_delay("3s").await;
    let raised = Instant::now();
    wait_replica(&app, &replica, "lagging", Duration::from_secs(10)).await;
    eprintln!(
        "replicas: apply delay 3 s (bound 1 s): lagging after {:.2} s",
        raised.elapsed().as_secs_f64()
    );
    let before_lag = fallbacks(&app).await;
    search(app.clone()).await;
    let during = fallbacks(&app).await;
    assert!(
        during >= before_lag + 20.0,
        "every read went to the primary while the replica lagged ({before_lag} -> {during})"
    );

    set_delay("0").await;
    let lowered = Instant::now();
    wait_replica(&app, &replica, "up", Duration::from_secs(15)).await;
    let caught_up = lowered.elapsed();
    let before = fallbacks(&app).await;
    search(app.clone()).await;
    let after = fallbacks(&app).await;
    eprintln!(
        "replicas: 20 reads while lagging: {} fallbacks; delay removed: up after {:.2} s, \
         then {} fallbacks in 20 reads",
        during - before_lag,
        caught_up.as_secs_f64(),
        after - before
    );
    // Reads are on the replica again (a sample that catches it mid-write may
    // send a read or two to the primary).
    assert!(
        after - before < 5.0,
        "reads went back to the replica once it caught up ({before} -> {after})"
    );
    let _ = stop_tx.send(true);
    tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("writer stops")
        .unwrap();
}
