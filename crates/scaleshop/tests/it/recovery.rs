//! Recovery after kill -9, with the default leases: the server is killed three
//! times during order load (each client retries an order with the same
//! `Idempotency-Key` until it gets an answer) and restarted each time. Then every
//! accepted order exists and is final within 30 s of the last restart, stock was
//! never oversold and nothing stays reserved, and the gateway's ledger holds at
//! most one success per order. On SQLite a second process on the same data folder
//! is refused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use scaleshop_testkit::{Backend, both, fixture};
use serde_json::{Value, json};

use crate::process::{Api, Deployment, Server, client};
use crate::saga_crash::{METHODS, customer, product};

pub(crate) const CLIENTS: usize = 5;
const ORDERS_PER_CLIENT: usize = 80;
pub(crate) const STOCK: [i64; 2] = [400, 30];
/// Every accepted order must be final this long after the last restart.
const FINAL_WITHIN: Duration = Duration::from_secs(30);

/// What the clients and the test share: where the server is now.
pub(crate) struct Shared {
    base: RwLock<String>,
    pub(crate) stop: AtomicBool,
    pub(crate) in_flight_answers: AtomicUsize,
}

impl Shared {
    pub(crate) fn new(base: String) -> Arc<Self> {
        Arc::new(Self {
            base: RwLock::new(base),
            stop: AtomicBool::new(false),
            in_flight_answers: AtomicUsize::new(0),
        })
    }

    fn base(&self) -> String {
        self.base.read().expect("base").clone()
    }

    fn point_at(&self, server: &Server) {
        *self.base.write().expect("base") = server.base.clone();
    }
}

/// Places orders one after another; each is sent again with the same key until it
/// gets a final answer (a 2xx). Returns the accepted orders' ids with their
/// payment methods.
pub(crate) async fn orders(
    c: usize,
    token: String,
    products: [String; 2],
    shared: Arc<Shared>,
) -> Vec<(String, &'static str)> {
    let http = client();
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut accepted = Vec::new();
    for i in 0..ORDERS_PER_CLIENT {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        let body = json!({
            "items": [{"product_id": products[i % 2], "quantity": 1 + (i % 3)}],
            "payment_method": METHODS[(i + c) % 4],
        });
        let key = format!("c{c}-{i}");
        for _ in 0..10_000 {
            assert!(
                Instant::now() < deadline,
                "order {key} got no answer in time"
            );
            let sent = http
                .post(format!("{}/v1/orders", shared.base()))
                .bearer_auth(&token)
                .header("Idempotency-Key", &key)
                .timeout(Duration::from_secs(10))
                .json(&body)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    let order: Value = r.json().await.expect("order");
                    let id = order["id"].as_str().expect("id").to_owned();
                    accepted.push((id, METHODS[(i + c) % 4]));
                    break;
                }
                // The first request with this key died with the server.
                Ok(r) if r.status().as_u16() == 409 => {
                    shared.in_flight_answers.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(r) if r.status().is_server_error() || r.status().as_u16() == 429 => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(r) => {
                    let status = r.status();
                    panic!(
                        "order {key}: {status} {}",
                        r.text().await.unwrap_or_default()
                    );
                }
                // The server is down (or being restarted).
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    accepted
}

/// Watches the stock while the load runs: sold + reserved never exceeds what was put in.
pub(crate) async fn watch_stock(products: [String; 2], shared: Arc<Shared>) -> usize {
    let http = client();
    let mut samples = 0;
    for _ in 0..100_000 {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        for (product, initial) in products.iter().zip(STOCK) {
            let url = format!("{}/v1/inventory/{product}", shared.base());
            let Ok(r) = http.get(url).timeout(Duration::from_secs(2)).send().await else {
                continue;
            };
            let Ok(stock) = r.json::<Value>().await else {
                continue;
            };
            let (sold, reserved, available) = (
                stock["sold"].as_i64().unwrap(),
                stock["reserved"].as_i64().unwrap(),
                stock["available"].as_i64().unwrap(),
            );
            assert!(sold + reserved <= initial, "oversold: {stock}");
            assert!(available >= 0, "{stock}");
            samples += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    samples
}

/// Every order of every customer (as its owner sees them).
pub(crate) async fn all_orders(server: &Api, tokens: &[String]) -> Vec<Value> {
    let mut all = Vec::new();
    for token in tokens {
        all.extend(server.all(token, "/v1/orders").await);
    }
    all
}

pub(crate) fn is_final(order: &Value) -> bool {
    order["status"] == "completed" || order["status"] == "failed"
}

/// Every accepted order is among `orders` (all final); the payment ledger holds
/// exactly one success per completed order and none for a failed one; the stock
/// sold is what the completed orders took, and nothing stays reserved.
pub(crate) async fn accepted_orders_charged_once_and_stock_adds_up(
    server: &Api,
    admin: &str,
    orders: &[Value],
    accepted: &[(String, &'static str)],
    products: &[String; 2],
) {
    let by_id: HashMap<&str, &Value> = orders
        .iter()
        .map(|o| (o["id"].as_str().unwrap(), o))
        .collect();
    for (id, _) in accepted {
        assert!(
            by_id.contains_key(id.as_str()),
            "accepted order {id} was lost"
        );
    }
    let mut sold: HashMap<&str, i64> = HashMap::new();
    for order in orders {
        let id = order["id"].as_str().unwrap();
        let ledger = server
            .get_json(&format!("/v1/payments?order_id={id}"), Some(admin))
            .await
            .expect("ledger");
        let succeeded = ledger["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["status"] == "succeeded")
            .count();
        if order["status"] == "completed" {
            assert_eq!(succeeded, 1, "completed order {id} has {succeeded} charges");
            for line in order["items"].as_array().unwrap() {
                *sold
                    .entry(line["product_id"].as_str().unwrap())
                    .or_default() += line["quantity"].as_i64().unwrap();
            }
        } else {
            assert_eq!(succeeded, 0, "failed order {id} was charged");
        }
    }
    // The inventory hears of the last endings through the log: wait for it.
    for (product, initial) in products.iter().zip(STOCK) {
        let expected_sold = sold.get(product.as_str()).copied().unwrap_or(0);
        crate::process::eventually(Duration::from_secs(20), || async {
            let stock = server
                .get_json(&format!("/v1/inventory/{product}"), None)
                .await?;
            (stock["reserved"] == 0 && stock["sold"] == expected_sold).then_some(())
        })
        .await;
        let stock = server
            .get_json(&format!("/v1/inventory/{product}"), None)
            .await
            .expect("stock");
        assert_eq!(
            stock["available"].as_i64().unwrap() + expected_sold,
            initial,
            "{stock}"
        );
    }
}

both!(
    three_kills_during_orders_every_accepted_order_is_final_soon,
    [sqlite, postgres, nats],
    |backend: Backend| async move {
        let deployment = Deployment::fresh(backend).await;
        let mut server = deployment.start().await;
        let admin = server.admin_token().await;
        let products = [
            product(&server, &admin, "R-A", STOCK[0]).await,
            product(&server, &admin, "R-B", STOCK[1]).await,
        ];
        let mut tokens = Vec::new();
        for c in 0..CLIENTS {
            tokens.push(customer(&server, &format!("recovery{c}@example.com")).await);
        }
        let shared = Shared::new(server.base.clone());
        let clients: Vec<_> = tokens
            .iter()
            .enumerate()
            .map(|(c, token)| {
                tokio::spawn(orders(c, token.clone(), products.clone(), shared.clone()))
            })
            .collect();
        let watcher = tokio::spawn(watch_stock(products.clone(), shared.clone()));

        let mut restarted = Instant::now();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            server.kill9();
            restarted = Instant::now();
            server = deployment.start().await;
            shared.point_at(&server);
        }
        // A little more load on the last process, then let the clients finish
        // the order each is on.
        tokio::time::sleep(Duration::from_millis(500)).await;
        shared.stop.store(true, Ordering::Relaxed);
        let mut accepted = Vec::new();
        for c in clients {
            accepted.extend(c.await.expect("client"));
        }
        let samples = watcher.await.expect("stock watcher");
        assert!(
            accepted.len() >= 50,
            "only {} orders accepted",
            accepted.len()
        );
        assert!(samples > 0, "the stock was never seen");

        // Bounded wait for finality; past the bound, wait on a little to report how
        // long it really took, then fail.
        let mut final_after = None;
        // Orders the gateway answers at once (not retried by the saga's backoff).
        let mut answered_final_after = None;
        let mut orders = Vec::new();
        let report_until = restarted + FINAL_WITHIN + Duration::from_secs(90);
        while Instant::now() < report_until {
            orders = all_orders(&server, &tokens).await;
            let done: HashMap<&str, bool> = orders
                .iter()
                .map(|o| (o["id"].as_str().unwrap_or_default(), is_final(o)))
                .collect();
            if answered_final_after.is_none()
                && accepted.iter().all(|(id, method)| {
                    *method == "pm_card_processingError"
                        || done.get(id.as_str()).copied().unwrap_or(false)
                })
            {
                answered_final_after = Some(restarted.elapsed());
            }
            // Lists come from the order-history projection, which may be a
            // moment behind: every accepted order listed, and each final.
            if accepted
                .iter()
                .all(|(id, _)| done.contains_key(id.as_str()))
                && orders.iter().all(is_final)
            {
                final_after = Some(restarted.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let statuses = orders
            .iter()
            .fold(HashMap::<String, usize>::new(), |mut m, o| {
                *m.entry(format!("{}/{}", o["status"], o["failure_reason"]))
                    .or_default() += 1;
                m
            });
        eprintln!(
            "recovery test ({backend:?}): {} accepted, {} orders, last order final {final_after:?} after the last restart \
             (the last not retried by the saga: {answered_final_after:?}); \
             {} in-flight (409) answers; {statuses:?}",
            accepted.len(),
            orders.len(),
            shared.in_flight_answers.load(Ordering::Relaxed),
        );
        match final_after {
            Some(after) if after <= FINAL_WITHIN => {}
            _ => {
                let open: Vec<&Value> = orders.iter().filter(|o| !is_final(o)).collect();
                let jobs: Vec<Value> = server
                    .all(&admin, "/v1/jobs?queue=orders")
                    .await
                    .into_iter()
                    .filter(|j| j["state"] != "completed")
                    .collect();
                panic!(
                    "orders not final {FINAL_WITHIN:?} after the last restart (took {final_after:?}): {open:#?}\nunfinished saga jobs: {jobs:#?}"
                );
            }
        }

        accepted_orders_charged_once_and_stock_adds_up(
            &server, &admin, &orders, &accepted, &products,
        )
        .await;
        drop(server);
        let _ = std::fs::remove_dir_all(&deployment.data_dir);
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_the_same_data_folder_is_refused() {
    let deployment = Deployment::fresh(Backend::Sqlite).await;
    let server = deployment.start().await;
    let (status, stderr) = deployment.run_to_exit();
    assert!(!status.success(), "the second process started: {status}");
    assert!(stderr.contains("data folder"), "{stderr}");
    assert!(
        stderr.contains(&deployment.data_dir.display().to_string()),
        "the message names the folder: {stderr}"
    );
    // The first process is untouched.
    let health = server
        .client
        .get(server.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert!(health.status().is_success());
    // Once it is gone, the folder can be used again.
    server.kill9();
    let again = deployment.start().await;
    drop(again);
    let _ = std::fs::remove_dir_all(&deployment.data_dir);
}
