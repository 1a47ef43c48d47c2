//! Faults outside the process, under order load, with the real binary:
//!
//! - the payment provider charges and then loses its answer for 10 % of the
//!   charges (the sandbox's test-only fault mode): the saga asks again with the
//!   same key, gets the recorded answer, and nothing is charged twice;
//! - PostgreSQL stops (`pg_ctl stop -m immediate`, on a private cluster) and starts
//!   again: meanwhile requests answer 503 with `Retry-After` and `/readyz` is 503;
//!   afterwards nothing acknowledged is lost and every saga finishes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::Client;
use scaleshop_db::sqlx::{self, Connection};
use scaleshop_testkit::{Backend, PgServer, both, fixture};
use serde_json::{Value, json};

use crate::process::{Deployment, Server, client, eventually};
use crate::saga_crash::{customer, product};

/// Every saga finishes within this after the fault is over.
const SETTLE: Duration = Duration::from_secs(120);

/// Retries and polls fast, so a lost answer or an outage costs milliseconds.
fn fast(deployment: &mut Deployment) {
    deployment
        .set("SCALESHOP_EVENT_POLL_MS", "100")
        .set("SCALESHOP_EVENT_MAX_BACKOFF_MS", "500")
        .set("SCALESHOP_JOB_POLL_MS", "100")
        .set("SCALESHOP_JOB_MIN_BACKOFF_MS", "50")
        .set("SCALESHOP_JOB_MAX_BACKOFF_MS", "300");
}

/// The payment method of a client's `i`-th order: one in five is declined.
fn method(i: usize) -> &'static str {
    match i % 5 {
        4 => "pm_card_chargeDeclined",
        n if n % 2 == 0 => "pm_card_visa",
        _ => "pm_card_mastercard",
    }
}

/// An order that got a 2xx: its id, its owner's token, how it pays.
#[derive(Debug, Clone)]
struct Placed {
    id: String,
    token: String,
    method: &'static str,
}

/// An admin token, one product with stock for every order, and `clients` signed-in
/// customers.
async fn shop(server: &Server, clients: usize) -> (String, String, Vec<String>) {
    let admin = server.admin_token().await;
    let product = product(server, &admin, "FAULT-1", 1_000_000).await;
    let mut tokens = Vec::new();
    for c in 0..clients {
        tokens.push(customer(server, &format!("faults{c}@example.com")).await);
    }
    (admin, product, tokens)
}

/// The gateway's ledger entries of an order (admin).
async fn ledger(server: &Server, admin: &str, order_id: &str) -> reqwest::Result<Vec<Value>> {
    let page: Value = server
        .client
        .get(server.url(&format!("/v1/payments?order_id={order_id}")))
        .bearer_auth(admin)
        .send()
        .await?
        .json()
        .await?;
    Ok(page["items"].as_array().cloned().unwrap_or_default())
}

async fn place(
    http: &Client,
    base: &str,
    token: &str,
    product: &str,
    key: &str,
    i: usize,
) -> reqwest::Result<reqwest::Response> {
    http.post(format!("{base}/v1/orders"))
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .json(&json!({"items": [{"product_id": product, "quantity": 1}], "payment_method": method(i)}))
        .send()
        .await
}

/// Waits until no order of any customer is `pending`, then checks every order:
/// each acknowledged one exists (GET) and ended as its payment method says; the
/// gateway's ledger holds exactly one `succeeded` entry for a completed order and
/// none for a failed one, every entry under the key `order-<id>`. Returns how
/// many orders there are.
async fn settle_and_check(
    server: &Server,
    admin: &str,
    tokens: &[String],
    placed: &[Placed],
) -> usize {
    let started = Instant::now();
    let orders: Vec<Value> = eventually(SETTLE, || async {
        let mut all = Vec::new();
        for token in tokens {
            all.extend(server.all(token, "/v1/orders").await);
        }
        all.iter().all(|o| o["status"] != "pending").then_some(all)
    })
    .await;
    eprintln!(
        "faults: {} orders final {:?} after the fault",
        orders.len(),
        started.elapsed()
    );
    for p in placed {
        let r = server
            .client
            .get(server.url(&format!("/v1/orders/{}", p.id)))
            .bearer_auth(&p.token)
            .send()
            .await
            .expect("get order");
        assert_eq!(
            r.status().as_u16(),
            200,
            "acknowledged order {} is lost",
            p.id
        );
        let order: Value = r.json().await.expect("order");
        let expected = if p.method == "pm_card_chargeDeclined" {
            ("failed", json!("payment_declined"))
        } else {
            ("completed", Value::Null)
        };
        assert_eq!(
            (
                order["status"].as_str().unwrap(),
                order["failure_reason"].clone()
            ),
            expected,
            "order {} paid with {}: {order}",
            p.id,
            p.method
        );
    }
    for order in &orders {
        let id = order["id"].as_str().unwrap();
        let entries = ledger(server, admin, id).await.expect("ledger");
        let key = format!("order-{id}");
        assert!(
            entries.iter().all(|e| e["idempotency_key"] == key.as_str()),
            "ledger of {id}: {entries:?}"
        );
        let succeeded = entries
            .iter()
            .filter(|e| e["status"] == "succeeded")
            .count();
        let expected = usize::from(order["status"] == "completed");
        assert_eq!(
            succeeded, expected,
            "order {id} ({}) charged {succeeded} times",
            order["status"]
        );
    }
    orders.len()
}

both!(
    lost_payment_answers_charge_once,
    [sqlite, postgres, nats],
    |backend: Backend| async move {
        const CLIENTS: usize = 6;
        const PER_CLIENT: usize = 20;
        let mut deployment = Deployment::fresh(backend).await;
        fast(&mut deployment);
        deployment.set("SCALESHOP_PAYMENTS_SANDBOX_LOST_ANSWER_PERCENT", "10");
        let server = deployment.start().await;
        let (admin, product, tokens) = shop(&server, CLIENTS).await;

        let clients: Vec<_> = tokens
            .iter()
            .enumerate()
            .map(|(c, token)| {
                let (base, token, product) = (server.base.clone(), token.clone(), product.clone());
                tokio::spawn(async move {
                    let http = client();
                    let mut placed = Vec::new();
                    for i in 0..PER_CLIENT {
                        let r = place(&http, &base, &token, &product, &format!("c{c}-{i}"), i)
                            .await
                            .expect("place order");
                        assert_eq!(r.status().as_u16(), 202, "{:?}", r.text().await);
                        let order: Value = r.json().await.expect("order");
                        let id = order["id"].as_str().expect("id").to_owned();
                        placed.push(Placed {
                            id,
                            token: token.clone(),
                            method: method(i),
                        });
                    }
                    placed
                })
            })
            .collect();
        let mut placed = Vec::new();
        for c in clients {
            placed.extend(c.await.expect("client"));
        }
        let total = settle_and_check(&server, &admin, &tokens, &placed).await;
        assert_eq!(total, CLIENTS * PER_CLIENT);

        // The fault fired: every lost answer cost its saga one more run (the tenth,
        // twentieth, ... charge of the process lost its answer).
        let jobs = server.all(&admin, "/v1/jobs?queue=orders").await;
        assert_eq!(jobs.len(), total, "one saga per order");
        assert!(
            jobs.iter().all(|j| j["state"] == "completed"),
            "every saga completed"
        );
        let rerun = jobs
            .iter()
            .filter(|j| j["attempts"].as_i64().unwrap() >= 2)
            .count();
        assert!(
            rerun >= total / 10,
            "only {rerun} sagas ran again; {} answers were lost",
            total / 10
        );
        eprintln!("lost answers ({backend:?}): {total} orders, {rerun} sagas asked again");
        drop(server);
        let _ = std::fs::remove_dir_all(&deployment.data_dir);
    }
);

// A lost answer leaves the outcome unknown, and the charge may have been made: the
// order stays `charging` (a cancel is refused) until the saga asks again.
both!(
    a_lost_answer_keeps_the_order_uncancellable,
    [sqlite, postgres, nats],
    |backend: Backend| async move {
        let mut deployment = Deployment::fresh(backend).await;
        fast(&mut deployment);
        deployment
            .set("SCALESHOP_PAYMENTS_SANDBOX_LOST_ANSWER_PERCENT", "100")
            .set("SCALESHOP_JOB_MIN_BACKOFF_MS", "4000")
            .set("SCALESHOP_JOB_MAX_BACKOFF_MS", "8000");
        let server = deployment.start().await;
        let (admin, product, tokens) = shop(&server, 1).await;
        let r = place(
            &server.client,
            &server.base,
            &tokens[0],
            &product,
            "lost-1",
            0,
        )
        .await
        .expect("place order");
        assert_eq!(r.status().as_u16(), 202);
        let order: Value = r.json().await.expect("order");
        let id = order["id"].as_str().expect("id").to_owned();
        // The charge is made and its answer lost; the next run is seconds away.
        eventually(Duration::from_secs(30), || async {
            let entries = ledger(&server, &admin, &id).await.ok()?;
            let charged = entries.iter().any(|e| e["status"] == "succeeded");
            charged.then_some(())
        })
        .await;
        let r = server
            .client
            .post(server.url(&format!("/v1/orders/{id}/cancel")))
            .bearer_auth(&tokens[0])
            .send()
            .await
            .expect("cancel");
        assert_eq!(
            r.status().as_u16(),
            409,
            "a charged order was cancellable: {:?}",
            r.text().await
        );
        let placed = [Placed {
            id,
            token: tokens[0].clone(),
            method: method(0),
        }];
        settle_and_check(&server, &admin, &tokens, &placed).await;
        drop(server);
        let _ = std::fs::remove_dir_all(&deployment.data_dir);
    }
);

/// What the order clients saw.
#[derive(Debug, Default)]
struct Seen {
    placed: Vec<Placed>,
    unavailable: usize,
    /// 409s: the key's earlier request still counted as in flight.
    conflicts: usize,
    /// The longest run of 409s for one key.
    longest_conflict: Duration,
    /// Anything but 202, 409, or 503 with `Retry-After`.
    wrong: Vec<String>,
}

/// Customers placing orders until `stop` (at most 5 000 requests each), counting
/// their 202s in `accepted[client]`. Like a careful client, each keeps a request's
/// `Idempotency-Key` until it is acknowledged: after a 503 or a 409 it sends the
/// same request again.
fn order_load(
    base: &str,
    tokens: &[String],
    product: &str,
    stop: &Arc<AtomicBool>,
    accepted: &Arc<Vec<AtomicUsize>>,
) -> Vec<tokio::task::JoinHandle<Seen>> {
    tokens
        .iter()
        .enumerate()
        .map(|(c, token)| {
            let (base, token, product) = (base.to_owned(), token.clone(), product.to_owned());
            let (stop, accepted) = (stop.clone(), accepted.clone());
            tokio::spawn(async move {
                let http = client();
                let mut seen = Seen::default();
                let mut n = 0;
                let mut conflict_since: Option<Instant> = None;
                for _ in 0..5000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let response =
                        place(&http, &base, &token, &product, &format!("o{c}-{n}"), n).await;
                    let status = response.as_ref().map(|r| r.status().as_u16()).unwrap_or(0);
                    if status != 409
                        && let Some(since) = conflict_since.take()
                    {
                        seen.longest_conflict = seen.longest_conflict.max(since.elapsed());
                    }
                    match response {
                        Ok(r) if status == 202 => {
                            let order: Value = r.json().await.expect("order");
                            let id = order["id"].as_str().expect("id").to_owned();
                            seen.placed.push(Placed {
                                id,
                                token: token.clone(),
                                method: method(n),
                            });
                            accepted[c].fetch_add(1, Ordering::Relaxed);
                            n += 1;
                        }
                        Ok(r) if status == 503 && r.headers().contains_key("retry-after") => {
                            seen.unavailable += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Ok(_) if status == 409 => {
                            seen.conflicts += 1;
                            conflict_since.get_or_insert_with(Instant::now);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Ok(r) => {
                            let retry_after = r.headers().get("retry-after").cloned();
                            let body = r.text().await.unwrap_or_default();
                            seen.wrong
                                .push(format!("{status} (Retry-After {retry_after:?}): {body}"));
                            n += 1;
                        }
                        Err(e) => {
                            seen.wrong.push(format!("no answer: {e}"));
                            n += 1;
                        }
                    }
                }
                if let Some(since) = conflict_since {
                    seen.longest_conflict = seen.longest_conflict.max(since.elapsed());
                }
                seen
            })
        })
        .collect()
}

/// A 503 problem with `Retry-After`, answered before the client's own timeout.
async fn assert_unavailable(response: reqwest::Result<reqwest::Response>, what: &str) {
    let response =
        response.unwrap_or_else(|e| panic!("{what}: no answer while the database is down: {e}"));
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").cloned();
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status, 503, "{what} while the database is down: {body}");
    assert!(
        retry_after.is_some(),
        "{what}: 503 without Retry-After: {body}"
    );
}

/// Whether the process is listening for commits again (its `LISTEN` connection).
async fn listening(url: &str) -> bool {
    const Q: &str = "SELECT count(*) FROM pg_stat_activity \
                     WHERE application_name = 'scaleshop' AND query ILIKE 'LISTEN%scaleshop_commits%'";
    let Ok(mut conn) = sqlx::PgConnection::connect(url).await else {
        return false;
    };
    let n: i64 = sqlx::query_scalar(Q)
        .fetch_one(&mut conn)
        .await
        .unwrap_or(0);
    let _ = conn.close().await;
    n > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_answers_503_and_loses_nothing() {
    let pg = tokio::task::spawn_blocking(PgServer::start)
        .await
        .expect("start PostgreSQL");
    let mut deployment = Deployment {
        data_dir: scaleshop_testkit::temp_dir("scaleshop-outage"),
        database_url: Some(pg.url()),
        extra: Default::default(),
        // The keys come from the database, as in a deployment with no secret.
        jwt_secret: None,
        target: None,
        nats: None,
    };
    fast(&mut deployment);
    deployment
        .set("SCALESHOP_REQUEST_TIMEOUT_MS", "3000")
        .set("SCALESHOP_DB_ACQUIRE_TIMEOUT_MS", "300")
        .set("SCALESHOP_ORDER_CONCURRENCY", "1")
        .set("SCALESHOP_ORDER_MAX_ATTEMPTS", "100")
        .set("SCALESHOP_EVENT_MAX_ATTEMPTS", "100")
        .set("SCALESHOP_JOB_LEASE_MS", "2000")
        .set("SCALESHOP_EVENT_LEASE_MS", "2000");
    let server = deployment.start().await;
    let (_admin, product, tokens) = shop(&server, 4).await;
    eventually(Duration::from_secs(30), || async {
        listening(&pg.url()).await.then_some(())
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let accepted: Arc<Vec<AtomicUsize>> =
        Arc::new(tokens.iter().map(|_| AtomicUsize::new(0)).collect());
    let counts = || -> Vec<usize> { accepted.iter().map(|n| n.load(Ordering::Relaxed)).collect() };
    let clients = order_load(&server.base, &tokens, &product, &stop, &accepted);
    eventually(Duration::from_secs(60), || async {
        (counts().iter().sum::<usize>() >= 40).then_some(())
    })
    .await;

    // Sagas are under way when the server goes (one runs at a time here, so
    // orders queue up behind it).
    let mut pending = 0;
    for token in &tokens {
        let orders = server.all(token, "/v1/orders").await;
        pending += orders.iter().filter(|o| o["status"] == "pending").count();
    }
    tokio::task::block_in_place(|| pg.stop_immediate());
    let before_outage: usize = counts().iter().sum();
    // While it is down: a new order, a read, readiness. A generous client timeout
    // bounds the wait; the server must answer before it.
    let probe = Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let down = Instant::now();
    // Longer than the job and consumer leases, so they expire meanwhile.
    for round in 0..30 {
        if round >= 3 && down.elapsed() > Duration::from_secs(6) {
            break;
        }
        let r = place(
            &probe,
            &server.base,
            &tokens[0],
            &product,
            &format!("outage-{round}"),
            0,
        )
        .await;
        assert_unavailable(r, "POST /v1/orders").await;
        let r = probe
            .get(server.url("/v1/orders"))
            .bearer_auth(&tokens[1])
            .send()
            .await;
        assert_unavailable(r, "GET /v1/orders").await;
        let r = probe
            .get(server.url("/readyz"))
            .send()
            .await
            .expect("readyz answers");
        assert_eq!(
            r.status().as_u16(),
            503,
            "/readyz while the database is down"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let during = counts().iter().sum::<usize>() - before_outage;
    eprintln!(
        "outage: {pending} orders pending at the stop; probed for {:?}; {during} orders accepted meanwhile",
        down.elapsed()
    );
    assert!(
        pending > 0,
        "no saga was under way when the database stopped"
    );

    tokio::task::block_in_place(|| pg.start_again());
    let up = Instant::now();
    eventually(Duration::from_secs(60), || async {
        let r = probe.get(server.url("/readyz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    // Every client gets on: its request refused during the outage, sent again with
    // the same key, goes through.
    let after_restart = counts();
    eventually(Duration::from_secs(90), || async {
        let now = counts();
        let all = now.iter().zip(&after_restart).all(|(n, at)| *n >= at + 5);
        all.then_some(())
    })
    .await;
    eprintln!(
        "outage: ready and taking orders {:?} after the restart",
        up.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    let mut seen = Seen::default();
    for c in clients {
        let s = c.await.expect("client");
        seen.placed.extend(s.placed);
        seen.unavailable += s.unavailable;
        seen.conflicts += s.conflicts;
        seen.longest_conflict = seen.longest_conflict.max(s.longest_conflict);
        seen.wrong.extend(s.wrong);
    }
    assert!(
        seen.wrong.is_empty(),
        "answers other than 202, 409 or 503 + Retry-After: {:?}",
        seen.wrong
    );
    assert!(seen.unavailable > 0, "no client met the outage");
    // A key whose request failed during the outage is released once the database
    // is back, not held as "in flight" until it counts as abandoned (a minute).
    assert!(
        seen.longest_conflict < Duration::from_secs(20),
        "a retried key was refused as in flight for {:?}",
        seen.longest_conflict
    );
    eventually(Duration::from_secs(30), || async {
        listening(&pg.url()).await.then_some(())
    })
    .await;

    let admin = server.admin_token().await;
    let total = settle_and_check(&server, &admin, &tokens, &seen.placed).await;
    assert!(total >= seen.placed.len());
    eprintln!(
        "outage: {} orders acknowledged ({} answered 503 meanwhile; {} 409s, the longest run {:?}), {total} in the database",
        seen.placed.len(),
        seen.unavailable,
        seen.conflicts,
        seen.longest_conflict
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&deployment.data_dir);
}
