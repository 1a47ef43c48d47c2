//! The search projection under kill -9: products are created and ordered (stock
//! reserved and sold: events that change a document by a delta) while the server
//! is killed mid-stream. After the restart the index catches up from its last
//! commit, every accepted product is found, and the index equals one rebuilt from
//! the whole log by `scaleshop projections rebuild` (same digest): nothing was
//! lost and no event was applied twice. (A product whose answer the kill cut off
//! after its commit exists too: the index holds every product the table holds.)

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use scaleshop_testkit::{Backend, both, fixture};
use serde_json::{Value, json};

use crate::process::{ADMIN_EMAIL, ADMIN_PASSWORD, Api, Deployment, client};
use crate::saga_crash::{customer, product};

/// Creates products until `stop`; returns the skus the server accepted (201).
async fn create_products(
    base: String,
    admin: String,
    prefix: usize,
    stop: Arc<AtomicBool>,
) -> Vec<String> {
    let http = client();
    let mut accepted = Vec::new();
    for n in 0..10_000 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let sku = format!("KILL-{prefix}-{n}");
        let r = http
            .post(format!("{base}/v1/products"))
            .bearer_auth(&admin)
            .json(&json!({"sku": sku, "name": format!("Crashproof lamp {n}"),
                          "description": "Survives a kill", "price_cents": 100 + n,
                          "currency": "EUR", "initial_stock": 5}))
            .send()
            .await;
        match r {
            Ok(r) if r.status().as_u16() == 201 => accepted.push(sku),
            // The server is gone: this client is done.
            Err(_) => break,
            Ok(_) => {}
        }
    }
    accepted
}

/// Places orders (each reserves, then sells) until `stop`.
async fn place_orders(base: String, token: String, item: String, stop: Arc<AtomicBool>) {
    let http = client();
    for _ in 0..10_000 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let r = http
            .post(format!("{base}/v1/orders"))
            .bearer_auth(&token)
            .json(&json!({"items": [{"product_id": item, "quantity": 1}], "payment_method": "pm_card_visa"}))
            .send()
            .await;
        if r.is_err() {
            break;
        }
    }
}

/// The skus of every page of a product list.
async fn skus(api: &Api, path: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let mut url = api.url(path);
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = api
            .client
            .get(url)
            .send()
            .await
            .expect("list")
            .json()
            .await
            .expect("page");
        found.extend(
            page["items"]
                .as_array()
                .expect("items")
                .iter()
                .map(|p| p["sku"].as_str().expect("sku").to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return found,
        }
    }
    panic!("{path}: paging does not end");
}

async fn projection(api: &Api, admin: &str) -> Value {
    let body: Value = api
        .client
        .get(api.url("/v1/projections"))
        .bearer_auth(admin)
        .send()
        .await
        .expect("projections")
        .json()
        .await
        .expect("json");
    body["items"][0].clone()
}

both!(
    search_projection_catches_up_after_kill9_without_loss_or_double_apply,
    [sqlite, postgres],
    |backend: Backend| async move {
        let deployment = Deployment::fresh(backend).await;
        let server = deployment.start().await;
        let admin = server.admin_token().await;
        let item = product(&server, &admin, "KILL-ORDERED", 100_000).await;
        let buyer = customer(&server, "kill-search@example.com").await;

        let stop = Arc::new(AtomicBool::new(false));
        let makers: Vec<_> = (0..3)
            .map(|c| {
                tokio::spawn(create_products(
                    server.base.clone(),
                    admin.clone(),
                    c,
                    stop.clone(),
                ))
            })
            .collect();
        let buyers: Vec<_> = (0..2)
            .map(|_| {
                tokio::spawn(place_orders(
                    server.base.clone(),
                    buyer.clone(),
                    item.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        // Kill while products and orders stream in (the index commits batches
        // all along).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let lag_before_kill = projection(&server, &admin).await["lag"].clone();
        server.kill9();
        stop.store(true, Ordering::Relaxed);
        let mut accepted = Vec::new();
        for m in makers {
            accepted.extend(m.await.expect("maker"));
        }
        for b in buyers {
            b.await.expect("buyer");
        }
        assert!(
            accepted.len() >= 10,
            "only {} products accepted",
            accepted.len()
        );

        let server = deployment.start().await;
        let admin = server.admin_token().await;
        // The sagas of the orders in flight finish (every job final, every event
        // delivered), then the index catches up and the log stands still.
        let started = Instant::now();
        let mut last: Option<Value> = None;
        let caught_up = loop {
            let status = projection(&server, &admin).await;
            let backlog = crate::process::gauge(&server, "outbox_backlog").await;
            let jobs = server.all(&admin, "/v1/jobs").await;
            let open = jobs
                .iter()
                .any(|j| j["state"] != "completed" && j["state"] != "dead");
            let settled =
                status["state"] == "live" && status["lag"] == 0 && backlog == Some(0.0) && !open;
            if settled
                && last
                    .as_ref()
                    .is_some_and(|l| l["position"] == status["position"])
            {
                break status;
            }
            last = settled.then_some(status.clone());
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "catches up: {status}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        // What the products table holds: every accepted product, and perhaps one
        // whose 201 the kill cut off after its commit.
        let made = skus(&server, "/v1/products?limit=100").await;
        assert_eq!(
            caught_up["documents"].as_u64(),
            Some(made.len() as u64),
            "every product is indexed once: {caught_up}"
        );
        let lamps: BTreeSet<String> = made.into_iter().filter(|s| s != "KILL-ORDERED").collect();
        for sku in &accepted {
            assert!(lamps.contains(sku), "accepted product {sku} was lost");
        }
        // Every product is found by a search.
        let found = skus(&server, "/v1/products?q=crashproof&sort=newest&limit=100").await;
        assert_eq!(found, lamps);

        // The index built across the kill equals one built from the whole log.
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_scaleshop"))
            .args([
                "projections",
                "rebuild",
                "product-search",
                "--url",
                &server.base,
                "--wait-secs",
                "60",
            ])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SCALESHOP_ADMIN_EMAIL", ADMIN_EMAIL)
            .env("SCALESHOP_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("SCALESHOP_DATA_DIR", deployment.data_dir.join("cli"))
            .env("SCALESHOP_LOG_FILTER", "warn")
            .output()
            .expect("scaleshop projections rebuild");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let rebuilt: Value =
            serde_json::from_slice(&output.stdout).expect("the rebuilt projection's state");
        assert_ne!(rebuilt["generation"], caught_up["generation"]);
        assert_eq!(
            rebuilt["digest"], caught_up["digest"],
            "{caught_up} {rebuilt}"
        );
        assert_eq!(rebuilt["position"], caught_up["position"]);
        eprintln!(
            "search kill -9: {} products accepted, lag {lag_before_kill} at the kill, caught up {:.2} s after the restart",
            accepted.len(),
            started.elapsed().as_secs_f64()
        );
    }
);
