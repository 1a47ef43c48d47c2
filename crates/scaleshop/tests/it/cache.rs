//! The tiered cache across real processes: two `scaleshop` processes sharing one
//! PostgreSQL and one Redis.

use std::time::{Duration, Instant};

use scaleshop_testkit::{Backend, RedisServer};
use serde_json::{Value, json};

use crate::process::{Deployment, Server, gauge};

async fn loads(server: &Server) -> f64 {
    gauge(server, "cache_loads_total{cache=\"products\"}")
        .await
        .unwrap_or(0.0)
}

async fn product(server: &Server, id: &str, token: Option<&str>) -> Value {
    let mut request = server.client.get(server.url(&format!("/v1/products/{id}")));
    if let Some(token) = token {
        request = request.header("X-Consistency-Token", token);
    }
    let response = request.send().await.expect("get product");
    assert_eq!(response.status().as_u16(), 200);
    response.json().await.expect("product")
}

/// The admin creates a product (stock 5, 1.00 EUR); its id.
async fn create_product(server: &Server, admin: &str, sku: &str, name: &str) -> String {
    let created: Value = server
        .client
        .post(server.url("/v1/products"))
        .bearer_auth(admin)
        .json(&json!({"sku": sku, "name": name, "price_cents": 100, "currency": "EUR", "initial_stock": 5}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    created["id"].as_str().unwrap().to_owned()
}

async fn two_processes(redis: &RedisServer) -> (Deployment, Server, Server) {
    let mut deployment = Deployment::fresh(Backend::Postgres).await;
    deployment.set("SCALESHOP_REDIS_URL", &redis.url());
    let a = deployment.start().await;
    let b = deployment.start().await;
    (deployment, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_the_cache_and_see_each_others_writes() {
    let redis = RedisServer::start();
    let (_deployment, a, b) = two_processes(&redis).await;
    let admin = a.admin_token().await;
    let id = create_product(&a, &admin, "CACHE-1", "Before").await;

    // 1000 concurrent reads of a cold key, over both processes: one load each at most,
    // one in the whole cluster thanks to the Redis lease.
    let (before_a, before_b) = (loads(&a).await, loads(&b).await);
    let reads = (0..1000).map(|i| {
        let server = if i % 2 == 0 { &a } else { &b };
        let url = server.url(&format!("/v1/products/{id}"));
        let client = server.client.clone();
        async move { client.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    for status in futures::future::join_all(reads).await {
        assert_eq!(status.expect("read"), 200);
    }
    let (loads_a, loads_b) = (loads(&a).await - before_a, loads(&b).await - before_b);
    assert!(
        loads_a <= 1.0 && loads_b <= 1.0,
        "loads per process: {loads_a} {loads_b}"
    );
    assert!(loads_a + loads_b >= 1.0);
    eprintln!(
        "1000 cold reads over two processes: {} database loads",
        loads_a + loads_b
    );
    let l2_hits = gauge(
        &b,
        "cache_requests_total{cache=\"products\",tier=\"l2\",result=\"hit\"}",
    )
    .await;
    let l1_hits = gauge(
        &a,
        "cache_requests_total{cache=\"products\",tier=\"l1\",result=\"hit\"}",
    )
    .await;
    assert!(l1_hits.unwrap_or(0.0) > 0.0, "L1 hits are counted");
    eprintln!("L2 hits on B: {l2_hits:?}");

    // A write on A: B sees it at once with the token, and soon without it.
    let patched = a
        .client
        .patch(a.url(&format!("/v1/products/{id}")))
        .bearer_auth(&admin)
        .json(&json!({"name": "After"}))
        .send()
        .await
        .unwrap();
    let written_at = Instant::now();
    let token = patched.headers()["x-consistency-token"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        product(&b, &id, Some(&token)).await["name"],
        "After",
        "read-your-writes on B"
    );
    let _ = token;
    loop {
        if product(&b, &id, None).await["name"] == "After" {
            break;
        }
        assert!(
            written_at.elapsed() < Duration::from_secs(2),
            "B never saw the write"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    eprintln!(
        "B saw A's write {:?} after the response",
        written_at.elapsed()
    );

    // Readiness shows the cache.
    let ready: Value = b
        .client
        .get(b.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["components"]["cache"], "up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_killed_and_back_reads_keep_working() {
    let redis = RedisServer::start();
    let port = redis.port;
    let (_deployment, a, b) = two_processes(&redis).await;
    let admin = a.admin_token().await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let created: Value = a
            .client
            .post(a.url("/v1/products"))
            .bearer_auth(&admin)
            .json(&json!({"sku": format!("R-{i}"), "name": "R", "price_cents": 1, "currency": "EUR", "initial_stock": 1}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(created["id"].as_str().unwrap().to_owned());
    }
    product(&a, &ids[0], None).await; // warm in A's L1

    // Hung Redis: reads work, from L1 and the database, each bounded.
    redis.signal("-STOP");
    for id in &ids {
        let started = Instant::now();
        assert_eq!(product(&a, id, None).await["id"], id.as_str());
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "read took {:?}",
            started.elapsed()
        );
    }
    let ready = a.client.get(a.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["components"]["cache"], "down");

    // Dead Redis.
    drop(redis);
    for id in &ids {
        assert_eq!(product(&b, id, None).await["id"], id.as_str());
    }

    // Back: Redis is used again (a key loaded by A is an L2 hit on B).
    let _redis = RedisServer::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    loop {
        n += 1;
        let created: Value = a
            .client
            .post(a.url("/v1/products"))
            .bearer_auth(&admin)
            .json(&json!({"sku": format!("BACK-{n}"), "name": "B", "price_cents": 1, "currency": "EUR", "initial_stock": 1}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = created["id"].as_str().unwrap();
        let hits = |s: &Server| {
            let s = s.client.clone();
            let url = b.url("/metrics");
            async move {
                let text = s.get(url).send().await.ok()?.text().await.ok()?;
                text.lines().find_map(|l| {
                    l.strip_prefix(
                        "cache_requests_total{cache=\"products\",tier=\"l2\",result=\"hit\"}",
                    )
                    .and_then(|v| v.trim().parse::<f64>().ok())
                })
            }
        };
        let before = hits(&b).await.unwrap_or(0.0);
        product(&a, id, None).await;
        product(&b, id, None).await;
        if hits(&b).await.unwrap_or(0.0) > before {
            break;
        }
        assert!(Instant::now() < deadline, "Redis was not used again");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let ready: Value = a
        .client
        .get(a.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["components"]["cache"], "up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_cache_off_every_read_goes_to_the_database() {
    let mut deployment = Deployment::fresh(Backend::Sqlite).await;
    deployment.set("SCALESHOP_CACHE_ENABLED", "false");
    let server = deployment.start().await;
    let admin = server.admin_token().await;
    let id = create_product(&server, &admin, "NOCACHE-1", "Plain").await;
    let before = loads(&server).await;
    for _ in 0..5 {
        assert_eq!(product(&server, &id, None).await["name"], "Plain");
    }
    assert_eq!(loads(&server).await - before, 5.0, "five reads, five loads");
    let l1_hits = crate::process::gauge(
        &server,
        "cache_requests_total{cache=\"products\",tier=\"l1\",result=\"hit\"}",
    )
    .await;
    assert_eq!(
        l1_hits.unwrap_or(0.0),
        0.0,
        "nothing was ever served from L1"
    );
}
