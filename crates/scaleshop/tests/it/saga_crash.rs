//! kill -9 during order sagas under load; restart; then every accepted order
//! reached a final state, the gateway's ledger holds at most one charge per order
//! (exactly one for a completed order), each order has exactly one notification,
//! and stock adds up.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use scaleshop_testkit::{Backend, both, fixture};
use serde_json::{Value, json};

use crate::process::{Api, Deployment, client, eventually, gauge};

pub const METHODS: [&str; 4] = [
    "pm_card_visa",
    "pm_card_mastercard",
    "pm_card_chargeDeclined",
    "pm_card_processingError",
];

pub(crate) async fn product(server: &Api, admin: &str, sku: &str, stock: i64) -> String {
    let body: Value = server
        .client
        .post(server.url("/v1/products"))
        .bearer_auth(admin)
        .json(&json!({"sku": sku, "name": sku, "price_cents": 500, "currency": "EUR", "initial_stock": stock}))
        .send()
        .await
        .expect("create product")
        .json()
        .await
        .expect("product");
    body["id"].as_str().expect("id").to_owned()
}

pub(crate) async fn customer(server: &Api, email: &str) -> String {
    let r = server
        .client
        .post(server.url("/v1/users"))
        .json(&json!({"email": email, "name": "Buyer", "password": "password-123"}))
        .send()
        .await
        .expect("sign up");
    assert_eq!(r.status().as_u16(), 201);
    let session: Value = server
        .client
        .post(server.url("/v1/sessions"))
        .json(&json!({"email": email, "password": "password-123"}))
        .send()
        .await
        .expect("sign in")
        .json()
        .await
        .expect("session");
    session["token"].as_str().expect("token").to_owned()
}

both!(
    kill9_during_sagas_loses_nothing_and_charges_once,
    [sqlite, postgres, nats],
    |backend: Backend| async move {
        let mut deployment = Deployment::fresh(backend).await;
        deployment
            .set("SCALESHOP_EVENT_LEASE_MS", "1500")
            .set("SCALESHOP_EVENT_POLL_MS", "100")
            .set("SCALESHOP_JOB_LEASE_MS", "1500")
            .set("SCALESHOP_JOB_POLL_MS", "100")
            .set("SCALESHOP_JOB_MIN_BACKOFF_MS", "50")
            .set("SCALESHOP_JOB_MAX_BACKOFF_MS", "200");
        let server = deployment.start().await;
        let admin = server.admin_token().await;
        let products = [
            product(&server, &admin, "A", 200).await,
            product(&server, &admin, "B", 25).await,
        ];
        let mut tokens = Vec::new();
        for i in 0..6 {
            tokens.push(customer(&server, &format!("buyer{i}@example.com")).await);
        }

        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for (c, token) in tokens.iter().enumerate() {
            let (base, token, stop, products) = (
                server.base.clone(),
                token.clone(),
                stop.clone(),
                products.clone(),
            );
            clients.push(tokio::spawn(async move {
                let http = client();
                let mut accepted = Vec::new();
                for i in 0..300usize {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let body = json!({
                        "items": [{"product_id": products[i % 2], "quantity": 1 + (i % 3)}],
                        "payment_method": METHODS[(i + c) % 4],
                    });
                    let sent = http
                        .post(format!("{base}/v1/orders"))
                        .bearer_auth(&token)
                        .header("Idempotency-Key", format!("c{c}-{i}"))
                        .json(&body)
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status().as_u16() == 202 => {
                            let order: Value = r.json().await.expect("order");
                            accepted.push(order["id"].as_str().expect("id").to_owned());
                        }
                        Ok(r) => panic!("unexpected status {}", r.status()),
                        Err(_) => break,
                    }
                }
                accepted
            }));
        }
        tokio::time::sleep(Duration::from_millis(2500)).await;
        server.kill9();
        stop.store(true, Ordering::Relaxed);
        let mut accepted = Vec::new();
        for c in clients {
            accepted.extend(c.await.expect("client"));
        }
        assert!(
            accepted.len() >= 10,
            "only {} orders accepted",
            accepted.len()
        );

        let server = deployment.start().await;
        let admin = server.admin_token().await;
        // Settle: no order pending, no saga or email job left.
        let orders: Vec<Value> = eventually(Duration::from_secs(120), || async {
            let mut all = Vec::new();
            for token in &tokens {
                all.extend(server.all(token, "/v1/orders").await);
            }
            let pending = all.iter().any(|o| o["status"] == "pending");
            let jobs = server.all(&admin, "/v1/jobs").await;
            let open = jobs
                .iter()
                .any(|j| j["state"] != "completed" && j["state"] != "dead");
            let backlog = gauge(&server, "outbox_backlog").await?;
            (!pending && !open && backlog == 0.0).then_some(all)
        })
        .await;
        let by_id: HashMap<String, &Value> = orders
            .iter()
            .map(|o| (o["id"].as_str().unwrap().to_owned(), o))
            .collect();
        for id in &accepted {
            assert!(by_id.contains_key(id), "accepted order {id} was lost");
        }
        let notifications = server.all(&admin, "/v1/notifications").await;
        let mut sold: HashMap<String, i64> = HashMap::new();
        let mut statuses: HashMap<String, usize> = HashMap::new();
        for order in &orders {
            let id = order["id"].as_str().unwrap();
            let status = order["status"].as_str().unwrap();
            *statuses
                .entry(format!("{status}/{}", order["failure_reason"]))
                .or_default() += 1;
            let ledger: Value = server
                .client
                .get(server.url(&format!("/v1/payments?order_id={id}")))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let entries = ledger["items"].as_array().unwrap();
            let succeeded = entries
                .iter()
                .filter(|e| e["status"] == "succeeded")
                .count();
            let mine: Vec<&Value> = notifications
                .iter()
                .filter(|n| n["order_id"] == id)
                .collect();
            assert_eq!(
                mine.len(),
                1,
                "order {id} ({status}) has {} notifications",
                mine.len()
            );
            match status {
                "completed" => {
                    assert_eq!(
                        succeeded, 1,
                        "completed order {id} charged {succeeded} times"
                    );
                    assert_eq!(mine[0]["kind"], "order_confirmation");
                    for line in order["items"].as_array().unwrap() {
                        *sold
                            .entry(line["product_id"].as_str().unwrap().to_owned())
                            .or_default() += line["quantity"].as_i64().unwrap();
                    }
                }
                "failed" => {
                    assert_eq!(succeeded, 0, "failed order {id} was charged");
                    assert_eq!(mine[0]["kind"], "order_failed");
                }
                other => panic!("order {id} ended {other}"),
            }
        }
        for (product, initial) in products.iter().zip([200, 25]) {
            let stock: Value = server
                .client
                .get(server.url(&format!("/v1/inventory/{product}")))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let expected_sold = sold.get(product).copied().unwrap_or(0);
            assert_eq!(stock["sold"], expected_sold, "{stock}");
            assert_eq!(stock["reserved"], 0, "{stock}");
            assert_eq!(
                stock["available"].as_i64().unwrap() + expected_sold,
                initial,
                "{stock}"
            );
        }
        eprintln!(
            "saga crash test ({backend:?}): {} accepted, {} orders: {statuses:?}",
            accepted.len(),
            orders.len()
        );
        drop(server);
        let _ = std::fs::remove_dir_all(&deployment.data_dir);
    }
);
