//! A split deployment of two real processes on one PostgreSQL: every service but
//! orders in one, orders in the other, calling the first over HTTP. Orders placed
//! through the orders process complete; the first process is killed with SIGKILL
//! under load and restarted: the breaker opens (503 with Retry-After, fast), then
//! calls recover, and no order is charged twice.

use std::time::{Duration, Instant};

use scaleshop_testkit::{Backend, both, fixture};
use serde_json::{Value, json};

use crate::process::{Api, Deployment, eventually};
use crate::saga_crash::{customer, product};

const REST: &str = "users,catalog,inventory,payments,notifications,media";

fn fast(deployment: &mut Deployment) {
    deployment
        .set("SCALESHOP_EVENT_LEASE_MS", "1500")
        .set("SCALESHOP_EVENT_POLL_MS", "100")
        .set("SCALESHOP_JOB_LEASE_MS", "1500")
        .set("SCALESHOP_JOB_POLL_MS", "100")
        .set("SCALESHOP_JOB_MIN_BACKOFF_MS", "50")
        .set("SCALESHOP_JOB_MAX_BACKOFF_MS", "300")
        .set("SCALESHOP_SERVICE_TIMEOUT_MS", "1000")
        .set("SCALESHOP_SERVICE_BREAKER_FAILURES", "3")
        .set("SCALESHOP_SERVICE_BREAKER_OPEN_MS", "1000");
}

async fn place(orders: &Api, token: &str, product: &str, key: &str) -> reqwest::Response {
    orders
        .client
        .post(orders.url("/v1/orders"))
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .json(&json!({"items": [{"product_id": product, "quantity": 1}], "payment_method": "pm_card_visa"}))
        .send()
        .await
        .expect("place")
}

async fn order_status(orders: &Api, token: &str, id: &str) -> Option<String> {
    let order = orders
        .get_json(&format!("/v1/orders/{id}"), Some(token))
        .await?;
    order["status"].as_str().map(str::to_owned)
}

// `nats`: the two processes carry their events over NATS JetStream.
both!(
    orders_in_their_own_process_complete_and_survive_the_other_process_dying,
    [postgres, nats],
    |backend: Backend| async move {
        let mut base = Deployment::fresh(backend).await;
        fast(&mut base);
        let mut rest_deployment = base.with_target(REST);
        let rest = rest_deployment.start().await;
        // Its restart comes back on the same address, where the orders process calls it.
        let addr = rest.base.trim_start_matches("http://").to_owned();
        rest_deployment.set("SCALESHOP_HTTP_ADDR", &addr);
        let orders = base.orders_calling(&rest.base).start().await;

        let admin = rest.admin_token().await;
        let item = product(&rest, &admin, "SPLIT-A", 1000).await;
        let token = customer(&rest, "split@example.com").await;

        // The rest process has no order routes; the orders process has no others.
        let r = rest
            .client
            .get(rest.url("/v1/orders"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("get");
        assert_eq!(r.status().as_u16(), 404);
        let r = orders
            .client
            .get(orders.url("/v1/products"))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status().as_u16(), 404);
        // Internal routes refuse a caller without a service token, even an admin.
        let r = rest
        .client
        .post(rest.url("/internal/payments/charges"))
        .bearer_auth(&admin)
        .json(&json!({"order_id": uuid::Uuid::now_v7(), "amount_cents": 1, "currency": "EUR", "method": "pm_card_visa", "last_attempt": false}))
        .send()
        .await
        .expect("internal");
        assert_eq!(r.status().as_u16(), 401);

        let mut accepted = Vec::new();
        for i in 0..5 {
            let r = place(&orders, &token, &item, &format!("before-{i}")).await;
            assert_eq!(r.status().as_u16(), 202);
            let body: Value = r.json().await.expect("order");
            accepted.push(body["id"].as_str().expect("id").to_owned());
        }
        for id in &accepted {
            let status = eventually(Duration::from_secs(30), || async {
                order_status(&orders, &token, id)
                    .await
                    .filter(|s| s != "pending")
            })
            .await;
            assert_eq!(status, "completed", "{id}");
        }

        // Kill the process the orders process calls, mid-load.
        let mut during = Vec::new();
        for i in 0..3 {
            let r = place(&orders, &token, &item, &format!("during-{i}")).await;
            if r.status().as_u16() == 202 {
                let body: Value = r.json().await.expect("order");
                during.push(body["id"].as_str().expect("id").to_owned());
            }
        }
        rest.kill9();
        // Calls fail: first by timing out or being refused, then fast with an open breaker.
        let mut fast_503 = None;
        for i in 0..40 {
            let started = Instant::now();
            let r = place(&orders, &token, &item, &format!("down-{i}")).await;
            let took = started.elapsed();
            assert_eq!(r.status().as_u16(), 503, "attempt {i}");
            assert!(r.headers().contains_key("retry-after"));
            if took < Duration::from_millis(200) {
                fast_503 = Some(took);
                break;
            }
        }
        let took = fast_503.expect("the breaker opened: a 503 came back fast");
        eprintln!("open breaker answered 503 in {took:?}");
        let metrics = orders
            .client
            .get(orders.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        assert!(
            metrics.contains(
                r#"service_client_requests_total{target="payments",outcome="open_circuit"}"#
            ) || metrics.contains(r#"outcome="open_circuit""#),
            "{metrics}"
        );
        assert!(metrics.contains("service_client_request_duration_seconds_bucket"));

        // Back: the breaker lets a trial through, closes, and orders complete again.
        let rest = rest_deployment.start().await;
        let after = eventually(Duration::from_secs(30), || async {
            let r = place(&orders, &token, &item, "after-0").await;
            if r.status().as_u16() != 202 {
                return None;
            }
            let body: Value = r.json().await.ok()?;
            body["id"].as_str().map(str::to_owned)
        })
        .await;
        accepted.extend(during);
        accepted.push(after);
        for id in &accepted {
            let status = eventually(Duration::from_secs(60), || async {
                order_status(&orders, &token, id)
                    .await
                    .filter(|s| s != "pending")
            })
            .await;
            assert_eq!(status, "completed", "{id}");
            let ledger = rest
                .get_json(&format!("/v1/payments?order_id={id}"), Some(&admin))
                .await
                .expect("ledger");
            let succeeded = ledger["items"]
                .as_array()
                .expect("items")
                .iter()
                .filter(|entry| entry["status"].as_str() == Some("succeeded"))
                .count();
            assert_eq!(
                succeeded, 1,
                "order {id} charged {succeeded} times: {ledger:?}"
            );
        }
    }
);
