//! The product listing projection through the API: `GET /v1/products` pages and
//! search results are read from `product_listing`, built only from events
//! (product, stock and image events); it holds what the command side holds; a
//! read with a token sees its own write; the table projections (the listing and
//! the order history) rebuild from the log to the same rows.

use std::io::Cursor;
use std::time::{Duration, Instant};

use image::{DynamicImage, ImageBuffer, ImageFormat, Rgb};
use reqwest::Response;
use serde_json::{Value, json};

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

        for (name, before) in [("product-listing", &listing), ("order-history", &history)] {
            let response = app
                .post(&format!("/v1/projections/{name}/rebuild"))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap();
            let (started, _, _) = answer(response, 202).await;
            assert_eq!(started["name"], name);
            // Reads stay whole while it rebuilds (the command side answers).
            let (listed, _) = list(&app, &token).await;
            assert_eq!(listed.len(), 12);
            let after = caught_up(&app, &admin, name).await;
            assert_eq!(
                after["digest"], before["digest"],
                "{name}: {before} {after}"
            );
            assert_eq!(after["documents"], before["documents"]);
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
