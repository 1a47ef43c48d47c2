//! The product listing projection through the API: `GET /v1/products` pages and
//! search results are read from `product_listing`, built only from events
//! (product, stock and image events); it holds what the command side holds; a
//! read with a token sees its own write; the table projections (the listing and
//! the order history) rebuild from the log to the same rows, into a new copy of
//! their table while the old one answers reads; a projection stuck on an event
//! it cannot read leaves its reads to the command side.

use std::io::Cursor;
use std::time::{Duration, Instant};

use image::{DynamicImage, ImageBuffer, ImageFormat, Rgb};
use reqwest::Response;
use scaleshop_contracts::InventoryAdjusted;
use scaleshop_db::{Pool, sqlx};
use scaleshop_events::NewEvent;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(60);

async fn answer(response: Response, status: u16) -> (Value, Option<String>, Option<String>) {
    let got = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (token, model) = (header("x-consistency-token"), header("x-read-model"));
    let text = response.text().await.unwrap();
    assert_eq!(got, status, "{text}");
    (serde_json::from_str(&text).unwrap(), token, model)
}

/// Creates a product; returns it and the write's token.
async fn product(
    app: &TestApp,
    admin: &str,
    sku: &str,
    price_cents: i64,
    stock: i64,
) -> (Value, String) {
    let response = app
        .post("/v1/products")
        .bearer_auth(admin)
        .json(
            &json!({"sku": sku, "name": format!("Listed {sku}"), "description": "On the shelf",
                      "price_cents": price_cents, "currency": "EUR", "initial_stock": stock}),
        )
        .send()
        .await
        .unwrap();
    let (body, token, _) = answer(response, 201).await;
    (body, token.unwrap())
}

async fn adjust(app: &TestApp, admin: &str, id: &Value, delta: i64) -> String {
    let response = app
        .post(&format!(
            "/v1/inventory/{}/adjustments",
            id.as_str().unwrap()
        ))
        .bearer_auth(admin)
        .json(&json!({"delta": delta, "reason": "count"}))
        .send()
        .await
        .unwrap();
    answer(response, 200).await.1.unwrap()
}

/// Every product, page by page, with `token`; the items and the read models
/// that answered.
async fn list(app: &TestApp, token: &str) -> (Vec<Value>, Vec<String>) {
    let (mut items, mut models) = (Vec::new(), Vec::new());
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let mut path = "/v1/products?limit=3".to_owned();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let response = app
            .get(&path)
            .header("x-consistency-token", token)
            .send()
            .await
            .unwrap();
        let (page, _, model) = answer(response, 200).await;
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        models.push(model.unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return (items, models),
        }
    }
    panic!("more than 100 pages");
}

/// The product as the command side shows it (`GET /v1/products/{id}`; the
/// token bypasses cached copies read before the write).
async fn command_side(app: &TestApp, token: &str, id: &Value) -> Value {
    let response = app
        .get(&format!("/v1/products/{}", id.as_str().unwrap()))
        .header("x-consistency-token", token)
        .send()
        .await
        .unwrap();
    answer(response, 200).await.0
}

async fn projections(app: &TestApp, admin: &str) -> Vec<Value> {
    let response = app
        .get("/v1/projections")
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    answer(response, 200).await.0["items"]
        .as_array()
        .unwrap()
        .clone()
}

async fn projection(app: &TestApp, admin: &str, name: &str) -> Value {
    projections(app, admin)
        .await
        .into_iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no projection {name}"))
}

/// Asks for a rebuild of projection `name`: accepted (202), with its status.
async fn rebuild(app: &TestApp, admin: &str, name: &str) -> Value {
    let response = app
        .post(&format!("/v1/projections/{name}/rebuild"))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    answer(response, 202).await.0
}

/// Waits until `name` is live and has applied the whole log.
async fn caught_up(app: &TestApp, admin: &str, name: &str) -> Value {
    let started = Instant::now();
    loop {
        let status = projection(app, admin, name).await;
        if status["state"] == "live" && status["lag"] == 0 {
            return status;
        }
        assert!(started.elapsed() < WAIT, "{name} catches up: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn png() -> Vec<u8> {
    let image = DynamicImage::ImageRgb8(ImageBuffer::from_fn(64, 48, |x, y| {
        Rgb([(x * 3) as u8, (y * 5) as u8, ((x + y) * 2) as u8])
    }));
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Uploads `bytes` as an image of `product`; waits until it is settled;
/// returns the token of that write.
async fn image(app: &TestApp, admin: &str, product: &Value, bytes: Vec<u8>) -> String {
    let response = app
        .post(&format!(
            "/v1/products/{}/images",
            product.as_str().unwrap()
        ))
        .bearer_auth(admin)
        .header("content-type", "image/png")
        .body(bytes)
        .send()
        .await
        .unwrap();
    let (image, _, _) = answer(response, 202).await;
    let id = image["id"].as_str().unwrap().to_owned();
    let started = Instant::now();
    loop {
        let response = app.get(&format!("/v1/images/{id}")).send().await.unwrap();
        let (image, _, _) = answer(response, 200).await;
        if image["status"] != "processing" {
            break;
        }
        assert!(started.elapsed() < WAIT, "image {id} settles");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A write made after the image settled (one more in stock): its token
    // covers the settlement.
    adjust(app, admin, product, 1).await
}

/// A customer's order of `quantity` of `product`, waited until settled.
async fn order(
    app: &TestApp,
    token: &str,
    product: &Value,
    quantity: i64,
    payment_method: &str,
) -> Value {
    let response = app
        .post("/v1/orders")
        .bearer_auth(token)
        .json(
            &json!({"items": [{"product_id": product, "quantity": quantity}],
                      "payment_method": payment_method}),
        )
        .send()
        .await
        .unwrap();
    let (order, _, _) = answer(response, 202).await;
    let id = order["id"].as_str().unwrap().to_owned();
    let started = Instant::now();
    loop {
        let response = app
            .get(&format!("/v1/orders/{id}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let (order, _, _) = answer(response, 200).await;
        if order["status"] != "pending" {
            return order;
        }
        assert!(started.elapsed() < WAIT, "order {id} settles");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

both!(
    the_listing_follows_the_events_and_holds_what_the_command_side_holds,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let (_, customer) = app.customer("listing-buyer@example.com").await;
        let (a, _) = product(&app, &admin, "LST-A", 1_000, 10).await;
        let (b, _) = product(&app, &admin, "LST-B", 2_000, 5).await;
        let (c, _) = product(&app, &admin, "LST-C", 3_000, 0).await;
        // A change of name, description and price.
        let response = app
            .patch(&format!("/v1/products/{}", b["id"].as_str().unwrap()))
            .bearer_auth(&admin)
            .json(&json!({"name": "Renamed", "description": "Better", "price_cents": 2_500}))
            .send()
            .await
            .unwrap();
        answer(response, 200).await;
        // Stock: an adjustment, a sale (reserved, then sold) and a declined
        // order (reserved, then released).
        adjust(&app, &admin, &c["id"], 4).await;
        let sold = order(&app, &customer, &a["id"], 3, "pm_card_visa").await;
        assert_eq!(sold["status"], "completed", "{sold}");
        let declined = order(&app, &customer, &a["id"], 2, "pm_card_chargeDeclined").await;
        assert_eq!(declined["status"], "failed", "{declined}");
        // Images: one that becomes ready, one that fails.
        image(&app, &admin, &b["id"], png()).await;
        let token = image(&app, &admin, &b["id"], b"not a picture".to_vec()).await;

        let (listed, models) = list(&app, &token).await;
        assert!(models.iter().all(|m| m == "projection"), "{models:?}");
        assert_eq!(listed.len(), 3);
        for item in &listed {
            let held = command_side(&app, &token, &item["id"]).await;
            assert_eq!(item, &held, "the listing holds what the command side holds");
        }
        assert_eq!(
            listed[0]["available"], 7,
            "10 - 3 sold; the declined 2 came back"
        );
        assert_eq!(listed[1]["name"], "Renamed");
        assert_eq!(listed[1]["description"], "Better");
        assert_eq!(listed[1]["price_cents"], 2_500);
        assert_eq!(listed[1]["available"], 7, "5, and one per image");
        let images = listed[1]["images"].as_array().unwrap();
        assert_eq!(images.len(), 2, "{images:?}");
        assert_eq!(images[0]["status"], "ready");
        assert!(!images[0]["variants"].as_array().unwrap().is_empty());
        assert_eq!(images[1]["status"], "failed");
        assert_eq!(listed[2]["available"], 4);
        assert_eq!(
            listed[0]["created_at"], a["created_at"],
            "the exact time of the write"
        );

        // Search results are read from the listing too: the same products.
        let response = app
            .get("/v1/products?q=listed&sort=price_asc")
            .header("x-consistency-token", &token)
            .send()
            .await
            .unwrap();
        let (page, _, model) = answer(response, 200).await;
        if model.as_deref() == Some("projection") {
            let found = page["items"].as_array().unwrap();
            assert_eq!(found.len(), 2, "{page}"); // B was renamed
            for item in found {
                let mut item = item.clone();
                item.as_object_mut().unwrap().remove("highlight");
                assert!(listed.contains(&item), "{item}");
            }
        }

        if app.backend != Backend::Split {
            // Its state, lag and metric.
            let status = caught_up(&app, &admin, "product-listing").await;
            assert_eq!(status["documents"], 3);
            let names: Vec<Value> = projections(&app, &admin)
                .await
                .into_iter()
                .map(|p| p["name"].clone())
                .collect();
            assert!(names.contains(&json!("order-history")), "{names:?}");
            let metrics = app
                .get("/metrics")
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert!(
                metrics.contains("projection_lag{projection=\"product-listing\"}"),
                "projection_lag is exported"
            );
        }
    }
);

both!(
    a_listing_read_with_a_token_sees_its_own_write,
    [sqlite, postgres],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        for n in 0..15 {
            let (made, token) = product(&app, &admin, &format!("OWN-{n}"), 100, n).await;
            let (listed, models) = list(&app, &token).await;
            assert_eq!(models.last().map(String::as_str), Some("projection"));
            assert_eq!(
                listed.last().map(|p| &p["id"]),
                Some(&made["id"]),
                "write {n} seen"
            );
            let token = adjust(&app, &admin, &made["id"], 2).await;
            let (listed, _) = list(&app, &token).await;
            assert_eq!(
                listed.last().unwrap()["available"],
                n + 2,
                "adjustment {n} seen"
            );
        }
    }
);

both!(
    table_projections_rebuild_from_the_log_to_the_same_rows,
    [sqlite, postgres],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let (_, customer) = app.customer("rebuild-buyer@example.com").await;
        let mut products = Vec::new();
        for n in 0..12 {
            let (p, _) = product(&app, &admin, &format!("RBL-{n}"), 100 + n, 20).await;
            products.push(p);
        }
        for p in products.iter().take(4) {
            order(&app, &customer, &p["id"], 1, "pm_card_visa").await;
        }
        let token = adjust(&app, &admin, &products[5]["id"], -3).await;
        list(&app, &token).await;
        let listing = caught_up(&app, &admin, "product-listing").await;
        let history = caught_up(&app, &admin, "order-history").await;
        assert_eq!(listing["documents"], 12);
        assert_eq!(history["documents"], 4);

        for (name, table, before) in [
            ("product-listing", "product_listing", &listing),
            ("order-history", "order_history", &history),
        ] {
            let made = schema(&app, table).await;
            // Twice: the second swap meets the names the first one left.
            for round in 0..2 {
                let started = rebuild(&app, &admin, name).await;
                assert_eq!(started["name"], name);
                // Reads stay whole while it rebuilds, answered by the old copy.
                let (listed, models) = list(&app, &token).await;
                assert_eq!(listed.len(), 12);
                assert!(models.iter().all(|m| m == "projection"), "{models:?}");
                let after = caught_up(&app, &admin, name).await;
                assert_eq!(
                    after["digest"], before["digest"],
                    "{name} (round {round}): {before} {after}"
                );
                assert_eq!(after["documents"], before["documents"]);
                assert!(after.get("rebuild").is_none(), "{after}");
                assert_eq!(
                    schema(&app, table).await,
                    made,
                    "{name} (round {round}): the new copy is made like the old one"
                );
            }
        }
        let (listed, models) = list(&app, &token).await;
        assert_eq!(listed.len(), 12);
        assert!(models.iter().all(|m| m == "projection"), "{models:?}");
        let response = app
            .get("/v1/orders")
            .bearer_auth(&customer)
            .header("x-consistency-token", &token)
            .send()
            .await
            .unwrap();
        let (orders, _, _) = answer(response, 200).await;
        assert_eq!(orders["items"].as_array().unwrap().len(), 4);
    }
);

/// The columns, indexes and constraints of `table` as the database describes
/// them.
async fn schema(app: &TestApp, table: &str) -> Vec<String> {
    let db = app.database().await;
    let mut described: Vec<String> = Vec::new();
    match db.pool() {
        Pool::Sqlite(pool) => {
            let columns: Vec<(String, String, i64, i64)> = sqlx::query_as(
                "SELECT name, type, \"notnull\", pk FROM pragma_table_info($1) ORDER BY cid",
            )
            .bind(table)
            .fetch_all(pool)
            .await
            .unwrap();
            described.extend(columns.into_iter().map(|c| format!("{c:?}")));
            let indexes: Vec<(String, i64)> =
                sqlx::query_as("SELECT name, \"unique\" FROM pragma_index_list($1) ORDER BY name")
                    .bind(table)
                    .fetch_all(pool)
                    .await
                    .unwrap();
            for (index, unique) in indexes {
                let on: Vec<String> =
                    sqlx::query_scalar("SELECT name FROM pragma_index_info($1) ORDER BY seqno")
                        .bind(&index)
                        .fetch_all(pool)
                        .await
                        .unwrap();
                described.push(format!("index {index} unique {unique} on {on:?}"));
            }
        }
        Pool::Postgres(pool) => {
            let columns: Vec<(String, String, String)> = sqlx::query_as(
                "SELECT column_name::text, data_type::text, is_nullable::text \
                 FROM information_schema.columns WHERE table_name = $1 ORDER BY ordinal_position",
            )
            .bind(table)
            .fetch_all(pool)
            .await
            .unwrap();
            described.extend(columns.into_iter().map(|c| format!("{c:?}")));
            let indexes: Vec<String> = sqlx::query_scalar(
                "SELECT indexdef FROM pg_indexes WHERE tablename = $1 ORDER BY indexname",
            )
            .bind(table)
            .fetch_all(pool)
            .await
            .unwrap();
            described.extend(indexes);
            let constraints: Vec<String> = sqlx::query_scalar(
                "SELECT conname::text FROM pg_constraint WHERE conrelid = $1::regclass ORDER BY conname",
            )
            .bind(table)
            .fetch_all(pool)
            .await
            .unwrap();
            described.extend(constraints.into_iter().map(|c| format!("constraint {c}")));
        }
    }
    db.close().await;
    assert!(!described.is_empty(), "no table {table}");
    described
}

/// Appends `events` to the log in one transaction, as another process would.
/// `n` stock counts of products that do not exist: a long log that the
/// listing takes (one delivery apiece) without changing a row.
fn unknown_stock_counts(n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|_| {
            let product_id = Uuid::now_v7();
            let count = InventoryAdjusted {
                product_id,
                delta: 1,
                reason: "count".into(),
                available: 1,
            };
            NewEvent::typed(product_id, &count).unwrap()
        })
        .collect()
}

async fn append(app: &TestApp, events: &[NewEvent]) {
    let db = app.database().await;
    let mut tx = db.begin().await.unwrap();
    for event in events {
        scaleshop_events::append(&mut tx, event).await.unwrap();
    }
    tx.commit().await.unwrap();
    db.close().await;
}

// While the listing is rebuilt, its reads are answered by the old copy (which
// keeps following the log: a write made meanwhile is read back with its
// token); then the new copy takes its place, and equals a fresh build.
both!(
    a_table_projection_answers_reads_while_it_is_rebuilt,
    [sqlite, postgres],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        for n in 0..6 {
            product(&app, &admin, &format!("SRV-{n}"), 100 + n, 10).await;
        }
        // A long log for the rebuild: stock counts of products that do not
        // exist. The listing takes each (one delivery apiece) and changes no row.
        for _ in 0..5 {
            append(&app, &unknown_stock_counts(1000)).await;
        }
        // A write after them (whose commit wakes the dispatcher of an embedded
        // app, which did not see the appends).
        let (_, token) = product(&app, &admin, "SRV-LAST", 99, 1).await;
        let before = caught_up(&app, &admin, "product-listing").await;
        let (listed, models) = list(&app, &token).await;
        assert_eq!(listed.len(), 7);
        assert!(models.iter().all(|m| m == "projection"), "{models:?}");

        // Reads (each between two looks at the state) while it rebuilds, and a
        // write. On a loaded machine a rebuild may end before the first read
        // does: then it is asked again (at most 3 rebuilds in all).
        let mut written: Option<(Value, String)> = None;
        let mut during = 0;
        for _ in 0..3 {
            let started = rebuild(&app, &admin, "product-listing").await;
            assert_eq!(started["state"], "rebuilding", "{started}");
            let begun = Instant::now();
            loop {
                let ahead = projection(&app, &admin, "product-listing").await;
                if ahead["state"] != "rebuilding" {
                    break;
                }
                assert!(ahead["rebuild"]["position"].is_i64(), "{ahead}");
                if written.is_none() {
                    written = Some(product(&app, &admin, "SRV-DURING", 500, 3).await);
                }
                let Some((made, token)) = &written else {
                    unreachable!()
                };
                let (listed, models) = list(&app, token).await;
                let behind = projection(&app, &admin, "product-listing").await;
                assert!(
                    models.iter().all(|m| m == "projection"),
                    "answered by {models:?} while {behind}"
                );
                assert_eq!(
                    listed.len(),
                    8,
                    "the write made during the rebuild is read back"
                );
                assert!(listed.iter().any(|p| p["id"] == made["id"]));
                if behind["state"] == "rebuilding" {
                    during += 1;
                }
                assert!(begun.elapsed() < WAIT, "the rebuild ends: {behind}");
            }
            if during > 0 && written.is_some() {
                break;
            }
        }
        assert!(
            during > 0,
            "no read was made while the state said rebuilding, in 3 rebuilds"
        );
        let rebuilt = caught_up(&app, &admin, "product-listing").await;
        assert_eq!(rebuilt["documents"], 8, "{before} {rebuilt}");
        assert!(rebuilt.get("rebuild").is_none(), "{rebuilt}");
        let Some((made, token)) = &written else {
            panic!("no write was made during the rebuild");
        };
        let (listed, models) = list(&app, token).await;
        assert!(models.iter().all(|m| m == "projection"), "{models:?}");
        assert!(listed.iter().any(|p| p["id"] == made["id"]));

        // The swapped-in copy equals one built afresh from the whole log.
        rebuild(&app, &admin, "product-listing").await;
        let fresh = caught_up(&app, &admin, "product-listing").await;
        assert_eq!(fresh["digest"], rebuilt["digest"], "{rebuilt} {fresh}");
        assert_eq!(fresh["documents"], rebuilt["documents"]);
        eprintln!("listing rebuilt while serving: {during} reads during the rebuild");
    }
);

// Rebuilds asked back to back, each as soon as the one before has swapped in
// (while it still deletes its copy's old inbox, on a long log): each is
// accepted and ends live, with the same rows. (On PostgreSQL that clean-up and
// the next rebuild's start once deadlocked, and the request answered 500.)
both!(
    rebuilds_asked_back_to_back_each_start_and_end_live,
    [sqlite, postgres],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        product(&app, &admin, "B2B-0", 100, 10).await;
        append(&app, &unknown_stock_counts(4000)).await;
        product(&app, &admin, "B2B-1", 101, 1).await;
        let first = caught_up(&app, &admin, "product-listing").await;
        for round in 0..4 {
            let started = rebuild(&app, &admin, "product-listing").await;
            assert_eq!(started["state"], "rebuilding", "round {round}: {started}");
            // The next rebuild is asked the moment this one has swapped in.
            let begun = Instant::now();
            loop {
                let status = projection(&app, &admin, "product-listing").await;
                if status["state"] == "live" {
                    break;
                }
                assert!(begun.elapsed() < WAIT, "round {round} ends: {status}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let last = caught_up(&app, &admin, "product-listing").await;
        assert_eq!(last["digest"], first["digest"], "{first} {last}");
        assert_eq!(last["documents"], 2);
    }
);

// An event the listing wants but cannot read, put in the log directly: the
// listing stays behind it, retrying (it does not skip an event), and its reads
// are answered by the command side within the projection's wait, with what the
// command side holds.
both!(
    a_projection_stuck_on_a_poison_event_answers_from_the_command_side,
    [sqlite, postgres],
    with |config: &mut scaleshop_app::Config| config.event_max_attempts = 1000,
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let mut made = Vec::new();
        for n in 0..4 {
            made.push(product(&app, &admin, &format!("PSN-{n}"), 100 + n, 5).await.0);
        }
        let token = adjust(&app, &admin, &made[0]["id"], 2).await;
        let (served, models) = list(&app, &token).await;
        assert!(models.iter().all(|m| m == "projection"), "{models:?}");

        let product_id = made[1]["id"].as_str().unwrap().parse::<Uuid>().unwrap();
        let poison = NewEvent::raw(
            "image.added",
            1,
            product_id,
            json!({"image_id": "not an id", "product_id": product_id}),
        );
        append(&app, &[poison]).await;
        // A write after it (whose commit wakes the dispatcher of an embedded
        // app, which did not see the append).
        let token = adjust(&app, &admin, &made[2]["id"], 4).await;
        let started = Instant::now();
        let stuck = loop {
            let status = projection(&app, &admin, "product-listing").await;
            if status["state"] == "stuck" {
                break status;
            }
            assert!(started.elapsed() < WAIT, "the listing is stuck: {status}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(stuck["lag"].as_i64().unwrap() > 0, "{stuck}");
        assert!(stuck["error"].is_string(), "{stuck}");

        // A read with the token of the write after it: the command side
        // answers, within the projection's wait (one per page).
        let asked = Instant::now();
        let (listed, models) = list(&app, &token).await;
        let took = asked.elapsed();
        assert!(models.iter().all(|m| m == "command"), "{models:?}");
        let wait = Duration::from_millis(app.config.projection_wait_ms);
        assert!(
            took < wait * models.len() as u32 + Duration::from_secs(10),
            "{} pages took {took:?}",
            models.len()
        );
        assert_eq!(listed.len(), served.len());
        for (now, then) in listed.iter().zip(&served) {
            assert_eq!(now["id"], then["id"]);
            let more = if now["id"] == made[2]["id"] { 4 } else { 0 };
            assert_eq!(
                now["available"].as_i64().unwrap(),
                then["available"].as_i64().unwrap() + more,
                "{now}"
            );
            assert_eq!(now, &command_side(&app, &token, &now["id"]).await);
        }
        // Still behind the event, never past it.
        let status = projection(&app, &admin, "product-listing").await;
        assert_eq!(status["state"], "stuck", "{status}");
        assert_eq!(status["position"], stuck["position"], "{status}");
    }
);
