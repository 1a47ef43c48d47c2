//! The commerce routes of api.md, driven over HTTP like a client on both backends:
//! catalog, inventory, orders and their asynchronous processing (reserve, charge,
//! complete or fail), cancellation, `Idempotency-Key`, no oversell under a race for
//! the last units, the payments ledger and the order notifications.
//!
//! Every wait is bounded (a deadline, then a failure naming what was awaited); no
//! assertion depends on how long anything took.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::join_all;
use reqwest::{Client, Response};
use scaleshop_app::Config;
use scaleshop_contracts::{
    Contract, InventoryReleased, InventoryReserved, InventorySold, OrderCancelled, OrderCreated,
    OrderFailed, OrderProcessed, PaymentFailed, PaymentSucceeded,
};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::*;

/// The bound of an ordinary wait (an order to settle, an event to be handled).
const WAIT: Duration = Duration::from_secs(60);

/// Short job retries, so that a payment provider error runs out of attempts soon.
fn quick_retries(c: &mut Config) {
    c.job_min_backoff_ms = 20;
    c.job_max_backoff_ms = 100;
    c.job_poll_ms = 50;
}

/// Polls `check` until it returns Some, for at most `limit`; fails naming `what`.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts the status and returns the JSON body.
async fn body(response: Response, status: u16) -> Value {
    let got = response.status().as_u16();
    let text = response.text().await.unwrap();
    assert_eq!(got, status, "body: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn header(response: &Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn id(value: &Value) -> String {
    value["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {value}"))
        .to_owned()
}

fn timestamp(value: &Value) -> DateTime<Utc> {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a timestamp: {value}"));
    assert!(text.ends_with('Z'), "RFC 3339 in UTC: {text}");
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .with_timezone(&Utc)
}

fn assert_uuid_v7(value: &Value) {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value}"));
    let parsed = Uuid::parse_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    assert_eq!(parsed.get_version_num(), 7, "a UUID v7: {text}");
}

/// The problem's `errors[].field`s as a set.
fn field_set(problem: &Value) -> BTreeSet<String> {
    error_fields(problem).into_iter().collect()
}

fn set(fields: &[&str]) -> BTreeSet<String> {
    fields.iter().map(|f| (*f).to_owned()).collect()
}

// ---- catalog -------------------------------------------------------------------

fn product_json(sku: &str, price_cents: i64, currency: &str, initial_stock: i64) -> Value {
    json!({
        "sku": sku,
        "name": format!("Product {sku}"),
        "description": format!("About {sku}"),
        "price_cents": price_cents,
        "currency": currency,
        "initial_stock": initial_stock,
    })
}

async fn post_product(app: &TestApp, token: &str, product: &Value) -> Response {
    app.post("/v1/products")
        .bearer_auth(token)
        .json(product)
        .send()
        .await
        .unwrap()
}

/// Creates a product (asserts 201); returns the Product.
async fn create_product(
    app: &TestApp,
    admin: &str,
    sku: &str,
    price_cents: i64,
    currency: &str,
    initial_stock: i64,
) -> Value {
    let response = post_product(
        app,
        admin,
        &product_json(sku, price_cents, currency, initial_stock),
    )
    .await;
    body(response, 201).await
}

/// Waits until the product's `available` is `want`: it follows the inventory, but
/// may lag (api.md: "may lag by the stated staleness bound"; README: the cache entry
/// is dropped through the event log, bounded by `event_poll_ms`). 30 s is far above.
async fn wait_available(app: &TestApp, product_id: &str, want: i64) {
    let mut last = Value::Null;
    let reached = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            last = get_product(app, product_id).await["available"].clone();
            if last == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        reached.is_ok(),
        "product {product_id}: available should follow the inventory to {want}, still {last} after 30 s"
    );
}

async fn get_product(app: &TestApp, product_id: &str) -> Value {
    let response = app
        .get(&format!("/v1/products/{product_id}"))
        .send()
        .await
        .unwrap();
    body(response, 200).await
}

async fn patch_product(app: &TestApp, token: &str, product_id: &str, patch: &Value) -> Response {
    app.patch(&format!("/v1/products/{product_id}"))
        .bearer_auth(token)
        .json(patch)
        .send()
        .await
        .unwrap()
}

/// Every product of a search, following `next_cursor`; returns the ids in order.
async fn search_all(app: &TestApp, query: &str, limit: u32) -> (Vec<String>, usize) {
    let mut ids = Vec::new();
    let mut pages = 0;
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/products?limit={limit}&{query}");
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let page = body(
            app.get(&path)
                .header("x-consistency-token", read_token(app).await)
                .send()
                .await
                .unwrap(),
            200,
        )
        .await;
        pages += 1;
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= limit as usize, "page over the limit: {page}");
        ids.extend(items.iter().map(id));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return (ids, pages),
        }
        assert!(pages < 100, "paging does not end");
    }
}

/// The consistency token of a write made now (a sign-up): a search that sends
/// it sees every write made before, whichever side answers it.
///
/// Any write will do, so a sign-up whose connection was closed before its
/// answer (seen through the split deployment's gateway on a loaded machine,
/// `IncompleteMessage`) is made again with another address, at most 3 times.
async fn read_token(app: &TestApp) -> String {
    let mut tries = 0;
    let response = loop {
        tries += 1;
        let sent = app
            .post("/v1/users")
            .json(
                &json!({"email": format!("reader-{}@example.com", Uuid::now_v7()),
                          "name": "Reader", "password": "password-123"}),
            )
            .send()
            .await;
        match sent {
            Err(e) if e.is_request() && tries < 3 => {
                eprintln!("read_token: sign-up sent again after {e:?}");
            }
            sent => break sent.unwrap(),
        }
    };
    assert_eq!(response.status(), 201);
    response.headers()["x-consistency-token"]
        .to_str()
        .unwrap()
        .to_owned()
}

async fn search_ids(app: &TestApp, q: &str) -> BTreeSet<String> {
    let path = format!("/v1/products?limit=100&q={}", urlencode(q));
    let page = body(
        app.get(&path)
            .header("x-consistency-token", read_token(app).await)
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    page["items"].as_array().unwrap().iter().map(id).collect()
}

fn urlencode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

both!(
    catalog_create_product,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let (_, customer) = app.customer("catalog-create@example.com").await;
        let mug = json!({
            "sku": "MUG-01_a",
            "name": "Coffee mug",
            "description": "Holds coffee",
            "price_cents": 1299,
            "currency": "EUR",
            "initial_stock": 7,
        });

        // Admins only.
        let response = app.post("/v1/products").json(&mug).send().await.unwrap();
        assert!(
            header(&response, "www-authenticate").is_some_and(|h| h.starts_with("Bearer")),
            "WWW-Authenticate: Bearer"
        );
        problem(response, 401).await;
        problem(post_product(&app, &customer, &mug).await, 403).await;

        let response = post_product(&app, &admin, &mug).await;
        assert_eq!(response.status().as_u16(), 201);
        let location = header(&response, "location").expect("Location");
        assert!(
            header(&response, "x-consistency-token").is_some(),
            "X-Consistency-Token on a write"
        );
        let product = body(response, 201).await;
        assert_eq!(location, format!("/v1/products/{}", id(&product)));
        assert_uuid_v7(&product["id"]);
        assert_eq!(product["sku"], "MUG-01_a");
        assert_eq!(product["name"], "Coffee mug");
        assert_eq!(product["description"], "Holds coffee");
        assert_eq!(product["price_cents"], 1299);
        assert_eq!(product["currency"], "EUR");
        assert_eq!(product["available"], 7);
        assert_eq!(product["images"], json!([]));
        let created_at = timestamp(&product["created_at"]);
        assert!(timestamp(&product["updated_at"]) >= created_at);

        // Anyone reads it, at its Location.
        let read = body(app.get(&location).send().await.unwrap(), 200).await;
        assert_eq!(read, product);

        // The sku is taken, whatever else differs.
        let mut again = product_json("MUG-01_a", 5, "USD", 1);
        again["name"] = json!("Another mug");
        problem(post_product(&app, &admin, &again).await, 409).await;

        // Boundaries are accepted; the description may be left out.
        let edge = json!({
            "sku": "x".repeat(64),
            "name": "Edge",
            "price_cents": 100_000_000,
            "currency": "USD",
            "initial_stock": 1_000_000,
        });
        let edge = body(post_product(&app, &admin, &edge).await, 201).await;
        assert_eq!(edge["description"], "");
        assert_eq!(edge["available"], 1_000_000);
        let free = body(
            post_product(&app, &admin, &product_json("FREE-0", 0, "EUR", 0)).await,
            201,
        )
        .await;
        assert_eq!(free["price_cents"], 0);
        assert_eq!(free["available"], 0);

        // 422, one error per broken rule, naming the field.
        let with = |field: &str, value: Value| {
            let mut body = product_json("OK-SKU", 100, "EUR", 1);
            body[field] = value;
            body
        };
        let cases: Vec<(Value, Vec<&str>)> = vec![
            (with("sku", json!("has space")), vec!["sku"]),
            (with("sku", json!("x".repeat(65))), vec!["sku"]),
            (with("sku", json!("")), vec!["sku"]),
            (with("sku", json!("ümlaut")), vec!["sku"]),
            (with("price_cents", json!(-1)), vec!["price_cents"]),
            (with("price_cents", json!(100_000_001)), vec!["price_cents"]),
            (with("price_cents", json!("100")), vec!["price_cents"]),
            (with("currency", json!("eur")), vec!["currency"]),
            (with("currency", json!("EURO")), vec!["currency"]),
            (with("initial_stock", json!(-1)), vec!["initial_stock"]),
            (
                with("initial_stock", json!(1_000_001)),
                vec!["initial_stock"],
            ),
            (with("name", json!("   ")), vec!["name"]),
            (with("role", json!("admin")), vec!["role"]),
            (with("available", json!(5)), vec!["available"]),
            (
                json!({}),
                vec!["sku", "name", "price_cents", "currency", "initial_stock"],
            ),
            (
                json!({"sku": "a b", "name": "n", "price_cents": -1, "currency": "eur",
                   "initial_stock": -1, "status": "x"}),
                vec!["sku", "price_cents", "currency", "initial_stock", "status"],
            ),
        ];
        for (request, fields) in cases {
            let p = problem(post_product(&app, &admin, &request).await, 422).await;
            assert_eq!(field_set(&p), set(&fields), "{request} -> {p}");
            assert_eq!(
                error_fields(&p).len(),
                fields.len(),
                "one error per broken rule: {p}"
            );
        }
        // A malformed body is a 400.
        let response = app
            .post("/v1/products")
            .bearer_auth(&admin)
            .header("content-type", "application/json")
            .body("{\"sku\": ")
            .send()
            .await
            .unwrap();
        problem(response, 400).await;
        // None of the refused ones exists.
        assert!(search_ids(&app, "OK-SKU").await.is_empty());
    }
);

both!(
    catalog_get_product,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let product = create_product(&app, &admin, "GET-1", 250, "EUR", 3).await;
        let read = get_product(&app, &id(&product)).await;
        assert_eq!(read, product);
        problem(
            app.get(&format!("/v1/products/{}", Uuid::now_v7()))
                .send()
                .await
                .unwrap(),
            404,
        )
        .await;
        problem(
            app.get("/v1/products/not-a-uuid").send().await.unwrap(),
            404,
        )
        .await;
        problem(app.get("/v1/products/12345").send().await.unwrap(), 404).await;
    }
);

both!(
    catalog_patch_product,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let (_, customer) = app.customer("catalog-patch@example.com").await;
        let product = create_product(&app, &admin, "PATCH-1", 1000, "EUR", 4).await;
        let pid = id(&product);

        let response = patch_product(&app, &admin, &pid, &json!({"name": "  Renamed  "})).await;
        assert!(header(&response, "x-consistency-token").is_some());
        let renamed = body(response, 200).await;
        assert_eq!(renamed["name"], "Renamed");
        assert_eq!(renamed["description"], product["description"]);
        assert_eq!(renamed["price_cents"], 1000);
        assert_eq!(renamed["sku"], "PATCH-1");
        assert_eq!(renamed["currency"], "EUR");
        assert_eq!(renamed["available"], 4);
        assert_eq!(renamed["created_at"], product["created_at"]);
        assert!(timestamp(&renamed["updated_at"]) >= timestamp(&product["updated_at"]));

        let changed = body(
            patch_product(
                &app,
                &admin,
                &pid,
                &json!({"description": "Now better", "price_cents": 1500}),
            )
            .await,
            200,
        )
        .await;
        assert_eq!(changed["name"], "Renamed");
        assert_eq!(changed["description"], "Now better");
        assert_eq!(changed["price_cents"], 1500);
        assert_eq!(get_product(&app, &pid).await, changed);

        // Fields that are not patchable, and broken rules.
        let cases: Vec<(Value, Vec<&str>)> = vec![
            (json!({"sku": "OTHER-1"}), vec!["sku"]),
            (json!({"currency": "USD"}), vec!["currency"]),
            (json!({"initial_stock": 9}), vec!["initial_stock"]),
            (json!({"bogus": 1}), vec!["bogus"]),
            (json!({"price_cents": -5}), vec!["price_cents"]),
            (json!({"price_cents": 100_000_001}), vec!["price_cents"]),
            (json!({"name": ""}), vec!["name"]),
            (json!({"name": "ok", "sku": "X"}), vec!["sku"]),
        ];
        for (patch, fields) in cases {
            let p = problem(patch_product(&app, &admin, &pid, &patch).await, 422).await;
            assert_eq!(field_set(&p), set(&fields), "{patch} -> {p}");
        }
        assert_eq!(
            get_product(&app, &pid).await,
            changed,
            "a refused patch changes nothing"
        );

        // Unknown product; customers; anonymous.
        problem(
            patch_product(
                &app,
                &admin,
                &Uuid::now_v7().to_string(),
                &json!({"name": "x"}),
            )
            .await,
            404,
        )
        .await;
        problem(
            patch_product(&app, &admin, "not-a-uuid", &json!({"name": "x"})).await,
            404,
        )
        .await;
        problem(
            patch_product(&app, &customer, &pid, &json!({"name": "Mine"})).await,
            403,
        )
        .await;
        let response = app
            .patch(&format!("/v1/products/{pid}"))
            .json(&json!({"name": "Mine"}))
            .send()
            .await
            .unwrap();
        problem(response, 401).await;
        assert_eq!(get_product(&app, &pid).await["name"], "Renamed");
    }
);

both!(
    catalog_search,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let make = |sku: &'static str, name: &'static str, description: &'static str| {
            let app = &app;
            let admin = admin.clone();
            async move {
                let mut p = product_json(sku, 100, "EUR", 1);
                p["name"] = json!(name);
                p["description"] = json!(description);
                id(&body(post_product(app, &admin, &p).await, 201).await)
            }
        };
        let widget = make("BW-1", "Blue Widget", "A small thing").await;
        let gadget = make("GADGET-XYZ", "Lamp", "Bright").await;
        let chair = make("CH-1", "Chair", "Truly MARVELOUS seating").await;
        let table = make("TB-1", "Table", "Plain").await;
        let one = |id: &str| BTreeSet::from([id.to_owned()]);

        // Name, sku and description, in any letter case.
        assert_eq!(search_ids(&app, "widget").await, one(&widget));
        assert_eq!(search_ids(&app, "WIDGET").await, one(&widget));
        assert_eq!(search_ids(&app, "gadget-x").await, one(&gadget));
        assert_eq!(search_ids(&app, "marvel").await, one(&chair));
        assert_eq!(search_ids(&app, "Seating").await, one(&chair));
        assert!(search_ids(&app, "no such thing").await.is_empty());
        // SQL wildcards are text, not patterns.
        assert!(search_ids(&app, "%").await.is_empty());
        assert!(search_ids(&app, "_").await.is_empty());
        // No q: everything.
        let all: BTreeSet<String> = BTreeSet::from([widget, gadget, chair, table]);
        assert_eq!(search_ids(&app, "").await, all);
        let page = body(app.get("/v1/products").send().await.unwrap(), 200).await;
        assert_eq!(page["items"].as_array().unwrap().len(), 4);
        assert!(page["next_cursor"].is_null());

        // Paging returns each product once.
        let mut paged = BTreeSet::new();
        for n in 0..5 {
            let mut p = product_json(&format!("PG-{n}"), 100, "EUR", 1);
            p["name"] = json!(format!("Paging item {n}"));
            paged.insert(id(&body(post_product(&app, &admin, &p).await, 201).await));
        }
        let (ids, pages) = search_all(&app, "q=paging+ITEM", 2).await;
        assert_eq!(pages, 3);
        assert_eq!(ids.len(), 5, "each product once: {ids:?}");
        assert_eq!(ids.iter().cloned().collect::<BTreeSet<_>>(), paged);
        let (ids, _) = search_all(&app, "", 1).await;
        assert_eq!(ids.len(), 9);
        assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 9);

        // Bad paging parameters.
        for bad in ["limit=0", "limit=101", "limit=abc"] {
            let p = problem(
                app.get(&format!("/v1/products?{bad}"))
                    .send()
                    .await
                    .unwrap(),
                422,
            )
            .await;
            assert_eq!(error_fields(&p), ["limit"], "{bad}");
        }
        problem(
            app.get("/v1/products?cursor=forged").send().await.unwrap(),
            400,
        )
        .await;
    }
);

both!(
    catalog_search_is_case_insensitive_beyond_ascii,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let mut p = product_json("CREME-1", 450, "EUR", 1);
        p["name"] = json!("Crème BRÛLÉE");
        p["description"] = json!("Dessert à la française");
        let creme = id(&body(post_product(&app, &admin, &p).await, 201).await);
        let one = BTreeSet::from([creme]);
        assert_eq!(search_ids(&app, "Crème").await, one, "exact case");
        assert_eq!(search_ids(&app, "brûlée").await, one, "q in lower case");
        assert_eq!(search_ids(&app, "CRÈME").await, one, "q in upper case");
        assert_eq!(search_ids(&app, "FRANÇAISE").await, one, "description");
    }
);

// ---- inventory -----------------------------------------------------------------

async fn stock(app: &TestApp, product_id: &str) -> Value {
    let response = app
        .get(&format!("/v1/inventory/{product_id}"))
        .send()
        .await
        .unwrap();
    body(response, 200).await
}

/// (available, reserved, sold).
async fn levels(app: &TestApp, product_id: &str) -> (i64, i64, i64) {
    let s = stock(app, product_id).await;
    (
        s["available"].as_i64().unwrap(),
        s["reserved"].as_i64().unwrap(),
        s["sold"].as_i64().unwrap(),
    )
}

/// Waits until the stock of a product is exactly these levels.
async fn wait_levels(app: &TestApp, product_id: &str, want: (i64, i64, i64)) {
    let mut last = (0, 0, 0);
    let reached = tokio::time::timeout(WAIT, async {
        loop {
            last = levels(app, product_id).await;
            if last == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        reached.is_ok(),
        "stock of {product_id}: want (available, reserved, sold) = {want:?}, last seen {last:?}"
    );
}

async fn adjust(app: &TestApp, token: &str, product_id: &str, adjustment: &Value) -> Response {
    app.post(&format!("/v1/inventory/{product_id}/adjustments"))
        .bearer_auth(token)
        .json(adjustment)
        .send()
        .await
        .unwrap()
}

both!(
    inventory_stock_and_adjustments,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let (_, customer) = app.customer("inventory@example.com").await;
        let product = create_product(&app, &admin, "INV-1", 500, "EUR", 10).await;
        let pid = id(&product);

        // Right after the product is made (the route waits for product.created).
        let s = stock(&app, &pid).await;
        assert_eq!(
            s,
            json!({"product_id": pid, "available": 10, "reserved": 0, "sold": 0})
        );

        let s = body(
            adjust(
                &app,
                &admin,
                &pid,
                &json!({"delta": 5, "reason": "delivery"}),
            )
            .await,
            200,
        )
        .await;
        assert_eq!(
            s,
            json!({"product_id": pid, "available": 15, "reserved": 0, "sold": 0})
        );
        let s = body(
            adjust(
                &app,
                &admin,
                &pid,
                &json!({"delta": -3, "reason": "broken in the warehouse"}),
            )
            .await,
            200,
        )
        .await;
        assert_eq!(s["available"], 12);
        assert_eq!(levels(&app, &pid).await, (12, 0, 0));
        wait_available(&app, &pid, 12).await;

        // Never below zero: 409, and nothing changes.
        problem(
            adjust(
                &app,
                &admin,
                &pid,
                &json!({"delta": -13, "reason": "too many"}),
            )
            .await,
            409,
        )
        .await;
        assert_eq!(levels(&app, &pid).await, (12, 0, 0));
        // Down to exactly zero is fine.
        let s = body(
            adjust(
                &app,
                &admin,
                &pid,
                &json!({"delta": -12, "reason": "stocktake"}),
            )
            .await,
            200,
        )
        .await;
        assert_eq!(s["available"], 0);
        // A reason of 200 characters is fine.
        let s = body(
            adjust(
                &app,
                &admin,
                &pid,
                &json!({"delta": 2, "reason": "r".repeat(200)}),
            )
            .await,
            200,
        )
        .await;
        assert_eq!(s["available"], 2);

        // 422s: both fields required; reason 1..=200; delta not 0.
        let cases: Vec<(Value, Vec<&str>)> = vec![
            (json!({"delta": 0, "reason": "nothing"}), vec!["delta"]),
            (json!({"reason": "no delta"}), vec!["delta"]),
            (json!({"delta": 1}), vec!["reason"]),
            (json!({"delta": 1, "reason": ""}), vec!["reason"]),
            (
                json!({"delta": 1, "reason": "r".repeat(201)}),
                vec!["reason"],
            ),
            (json!({"delta": "1", "reason": "text"}), vec!["delta"]),
            // The most negative i64 has no absolute value in i64.
            (json!({"delta": i64::MIN, "reason": "min"}), vec!["delta"]),
            (json!({"delta": i64::MAX, "reason": "max"}), vec!["delta"]),
            (json!({"delta": 1, "reason": "x", "sold": 5}), vec!["sold"]),
            (json!({}), vec!["delta", "reason"]),
        ];
        for (request, fields) in cases {
            let p = problem(adjust(&app, &admin, &pid, &request).await, 422).await;
            assert_eq!(field_set(&p), set(&fields), "{request} -> {p}");
        }
        assert_eq!(
            levels(&app, &pid).await,
            (2, 0, 0),
            "refusals change nothing"
        );

        // Admins only; unknown products.
        problem(
            adjust(
                &app,
                &customer,
                &pid,
                &json!({"delta": 1, "reason": "mine"}),
            )
            .await,
            403,
        )
        .await;
        let response = app
            .post(&format!("/v1/inventory/{pid}/adjustments"))
            .json(&json!({"delta": 1, "reason": "anon"}))
            .send()
            .await
            .unwrap();
        problem(response, 401).await;
        let unknown = Uuid::now_v7().to_string();
        problem(
            adjust(
                &app,
                &admin,
                &unknown,
                &json!({"delta": 1, "reason": "ghost"}),
            )
            .await,
            404,
        )
        .await;
        problem(
            adjust(
                &app,
                &admin,
                "not-a-uuid",
                &json!({"delta": 1, "reason": "ghost"}),
            )
            .await,
            404,
        )
        .await;
        problem(
            app.get(&format!("/v1/inventory/{unknown}"))
                .send()
                .await
                .unwrap(),
            404,
        )
        .await;
        problem(
            app.get("/v1/inventory/not-a-uuid").send().await.unwrap(),
            404,
        )
        .await;
        assert_eq!(levels(&app, &pid).await, (2, 0, 0));
        // The catalog follows the adjustments (it may lag: bounded wait).
        wait_available(&app, &pid, 2).await;
    }
);

// api.md, Conventions: "every successful write answers with an
// X-Consistency-Token header", and a read sending it back sees that write.
both!(
    inventory_adjustment_answers_a_consistency_token,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let product = create_product(&app, &admin, "INV-TOKEN", 500, "EUR", 10).await;
        let pid = id(&product);
        // Read once, so that whatever caches the product holds it.
        assert_eq!(get_product(&app, &pid).await["available"], 10);
        let response = adjust(
            &app,
            &admin,
            &pid,
            &json!({"delta": 5, "reason": "delivery"}),
        )
        .await;
        let token = header(&response, "x-consistency-token");
        assert_eq!(body(response, 200).await["available"], 15);
        let token = token.expect("X-Consistency-Token on POST /v1/inventory/{id}/adjustments");
        let read = app
            .get(&format!("/v1/products/{pid}"))
            .header("x-consistency-token", token)
            .send()
            .await
            .unwrap();
        assert_eq!(body(read, 200).await["available"], 15, "read-your-writes");
    }
);

// ---- orders --------------------------------------------------------------------

fn line(product: &Value, quantity: i64) -> Value {
    json!({"product_id": product["id"], "quantity": quantity})
}

async fn place(app: &TestApp, token: &str, items: Value, payment_method: &str) -> Response {
    app.post("/v1/orders")
        .bearer_auth(token)
        .json(&json!({"items": items, "payment_method": payment_method}))
        .send()
        .await
        .unwrap()
}

/// Places an order (asserts 202); returns it.
async fn order(app: &TestApp, token: &str, items: Value, payment_method: &str) -> Value {
    body(place(app, token, items, payment_method).await, 202).await
}

async fn get_order(app: &TestApp, token: &str, order_id: &str) -> Value {
    let response = app
        .get(&format!("/v1/orders/{order_id}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    body(response, 200).await
}

/// Waits until the order is no longer pending; returns it.
async fn settled(app: &TestApp, token: &str, order_id: &str) -> Value {
    wait_for(&format!("order {order_id} settled"), WAIT, || async {
        let order = get_order(app, token, order_id).await;
        (order["status"] != "pending").then_some(order)
    })
    .await
}

async fn cancel(app: &TestApp, token: &str, order_id: &str) -> Response {
    app.post(&format!("/v1/orders/{order_id}/cancel"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// A GET, sent again (at most twice) when the connection failed before an answer
/// came, as HTTP lets a client do with a safe request (RFC 9110, 9.2.2): through
/// the gateway on a loaded machine, a kept-alive connection can close under it.
async fn get_retrying(app: &TestApp, url: &str, token: &str, seen: &str) -> Response {
    let mut tries = 0;
    loop {
        tries += 1;
        let mut request = app.get(url).bearer_auth(token);
        if !seen.is_empty() {
            request = request.header("x-consistency-token", seen);
        }
        match request.send().await {
            Ok(response) => return response,
            Err(e) if tries < 3 && (e.is_request() || e.is_connect()) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("GET {url}: {e:?}"),
        }
    }
}

/// Every page of a list route (the path without paging parameters).
async fn list_all(app: &TestApp, token: &str, path: &str) -> Vec<Value> {
    let separator = if path.contains('?') { '&' } else { '?' };
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    // The order list comes from a read model that follows the log: with the
    // token of a write made now, it shows everything written before.
    let seen = if path.starts_with("/v1/orders") {
        read_token(app).await
    } else {
        String::new()
    };
    for _ in 0..1000 {
        let mut url = format!("{path}{separator}limit=100");
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let page = body(get_retrying(app, &url, token, &seen).await, 200).await;
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return items,
        }
    }
    panic!("{path}: paging does not end");
}

/// The types of the events of an order (aggregate or `data.order_id`), in log order.
fn order_event_types(events: &[Value], order_id: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["aggregate_id"] == order_id || e["data"]["order_id"] == order_id)
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until the log holds an event of this type for the order; returns the
/// order's event types in log order.
async fn order_events_until(app: &TestApp, admin: &str, order_id: &str, last: &str) -> Vec<String> {
    wait_for(&format!("{last} of order {order_id}"), WAIT, || async {
        let events = list_all(app, admin, "/v1/events").await;
        let sequences: Vec<i64> = events
            .iter()
            .map(|e| e["sequence"].as_i64().unwrap())
            .collect();
        assert!(
            sequences.windows(2).all(|w| w[0] < w[1]),
            "the log is in ascending sequence"
        );
        let types = order_event_types(&events, order_id);
        types.iter().any(|t| t == last).then_some(types)
    })
    .await
}

/// Asserts that `want` occur in `types` exactly once each, in this order.
fn assert_in_order(types: &[String], want: &[&str]) {
    let mut at = 0;
    for kind in want {
        let found: Vec<usize> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| t == kind)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(found.len(), 1, "exactly one {kind} in {types:?}");
        assert!(found[0] >= at, "{kind} out of order in {types:?}");
        at = found[0];
    }
}

async fn ledger(app: &TestApp, admin: &str, order_id: &str) -> Vec<Value> {
    let response = app
        .get(&format!("/v1/payments?order_id={order_id}"))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    let page = body(response, 200).await;
    page["items"].as_array().unwrap().clone()
}

/// Waits until the order's notification is `sent`; asserts it is the only one for
/// the order and belongs to `user`; returns it.
async fn order_notification(app: &TestApp, token: &str, user: &Value, order_id: &str) -> Value {
    let notification = wait_for(
        &format!("notification of order {order_id} sent"),
        WAIT,
        || async {
            let all = list_all(app, token, "/v1/notifications").await;
            let mine: Vec<Value> = all
                .into_iter()
                .filter(|n| n["order_id"] == order_id)
                .collect();
            assert!(mine.len() <= 1, "one notification per order: {mine:?}");
            mine.into_iter().find(|n| n["status"] == "sent")
        },
    )
    .await;
    assert_eq!(notification["user_id"], user["id"]);
    assert_eq!(notification["to"], user["email"]);
    assert_eq!(notification["channel"], "email");
    assert!(notification["sent_at"].is_string());
    notification
}

both!(
    order_validation,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let (_, token) = app.customer("order-validation@example.com").await;
        let eur = create_product(&app, &admin, "VAL-EUR", 500, "EUR", 10).await;
        let usd = create_product(&app, &admin, "VAL-USD", 500, "USD", 10).await;
        let good = json!({"items": [line(&eur, 1)], "payment_method": "pm_card_visa"});

        // Signed-in users only.
        let response = app.post("/v1/orders").json(&good).send().await.unwrap();
        assert!(header(&response, "www-authenticate").is_some_and(|h| h.starts_with("Bearer")));
        problem(response, 401).await;
        let response = app
            .post("/v1/orders")
            .bearer_auth("not-a-token")
            .json(&good)
            .send()
            .await
            .unwrap();
        problem(response, 401).await;

        let ghost = Uuid::now_v7().to_string();
        let with_items = |items: Value| json!({"items": items, "payment_method": "pm_card_visa"});
        let cases: Vec<(Value, Vec<&str>)> = vec![
            (with_items(json!([])), vec!["items"]),
            (
                with_items(Value::Array((0..51).map(|_| line(&eur, 1)).collect())),
                vec!["items"],
            ),
            (
                with_items(json!([line(&eur, 0)])),
                vec!["items[0].quantity"],
            ),
            (
                with_items(json!([line(&eur, 1001)])),
                vec!["items[0].quantity"],
            ),
            (
                with_items(json!([line(&eur, -1)])),
                vec!["items[0].quantity"],
            ),
            (
                with_items(json!([{"product_id": ghost, "quantity": 1}])),
                vec!["items[0].product_id"],
            ),
            (
                with_items(json!([line(&eur, 1), {"product_id": ghost, "quantity": 1}])),
                vec!["items[1].product_id"],
            ),
            (
                with_items(json!([{"product_id": "not-a-uuid", "quantity": 1}])),
                vec!["items[0].product_id"],
            ),
            (
                with_items(json!([{"quantity": 1}])),
                vec!["items[0].product_id"],
            ),
            (
                with_items(json!([line(&eur, 1), line(&usd, 1)])),
                vec!["items"],
            ),
            (
                json!({"items": [line(&eur, 1)], "payment_method": "bogus"}),
                vec!["payment_method"],
            ),
            (json!({"items": [line(&eur, 1)]}), vec!["payment_method"]),
            (json!({"payment_method": "pm_card_visa"}), vec!["items"]),
            (
                json!({"items": "everything", "payment_method": "pm_card_visa"}),
                vec!["items"],
            ),
            (with_items(json!([1])), vec!["items[0]"]),
            (
                json!({"items": [line(&eur, 1)], "payment_method": 5}),
                vec!["payment_method"],
            ),
            (
                json!({"items": [line(&eur, 1)], "payment_method": "pm_card_visa",
                   "status": "completed"}),
                vec!["status"],
            ),
            (
                json!({"items": [line(&eur, 1)], "payment_method": "pm_card_visa", "user_id": ghost}),
                vec!["user_id"],
            ),
            (
                with_items(
                    json!([{"product_id": eur["id"], "quantity": 1, "unit_price_cents": 1}]),
                ),
                vec!["items[0].unit_price_cents"],
            ),
        ];
        for (request, fields) in cases {
            let response = app
                .post("/v1/orders")
                .bearer_auth(&token)
                .json(&request)
                .send()
                .await
                .unwrap();
            let p = problem(response, 422).await;
            assert_eq!(field_set(&p), set(&fields), "{request} -> {p}");
        }
        // The unknown product is named.
        let response = place(
            &app,
            &token,
            json!([{"product_id": ghost, "quantity": 1}]),
            "pm_card_visa",
        )
        .await;
        let p = problem(response, 422).await;
        assert!(p.to_string().contains(&ghost), "names {ghost}: {p}");
        // Malformed JSON: 400.
        let response = app
            .post("/v1/orders")
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body("{\"items\": [")
            .send()
            .await
            .unwrap();
        problem(response, 400).await;
        // Nothing was made.
        let mine = body(
            app.get("/v1/orders")
                .bearer_auth(&token)
                .send()
                .await
                .unwrap(),
            200,
        )
        .await;
        assert_eq!(mine["items"], json!([]), "refused orders exist: {mine}");

        // The boundaries are accepted: 50 lines, 1000 units.
        let fifty = Value::Array((0..50).map(|_| line(&eur, 1)).collect());
        order(&app, &token, fifty, "pm_card_mastercard").await;
        order(&app, &token, json!([line(&usd, 1000)]), "pm_card_visa").await;
    }
);

both!(
    order_takes_prices_at_creation,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let (user, token) = app.customer("prices@example.com").await;
        let first = create_product(&app, &admin, "SNAP-1", 1250, "EUR", 10).await;
        let second = create_product(&app, &admin, "SNAP-2", 300, "EUR", 10).await;

        let response = place(
            &app,
            &token,
            json!([line(&first, 2), line(&second, 3)]),
            "pm_card_visa",
        )
        .await;
        assert_eq!(response.status().as_u16(), 202);
        let location = header(&response, "location").expect("Location");
        let consistency = header(&response, "x-consistency-token").expect("X-Consistency-Token");
        let placed = body(response, 202).await;
        let oid = id(&placed);
        assert_eq!(location, format!("/v1/orders/{oid}"));
        assert_uuid_v7(&placed["id"]);
        assert_eq!(placed["status"], "pending");
        assert_eq!(placed["user_id"], user["id"]);
        assert_eq!(
            placed["items"],
            json!([
                {"product_id": first["id"], "quantity": 2, "unit_price_cents": 1250},
                {"product_id": second["id"], "quantity": 3, "unit_price_cents": 300},
            ])
        );
        assert_eq!(placed["total_cents"], 3400);
        assert_eq!(placed["currency"], "EUR");
        assert!(placed["failure_reason"].is_null());
        timestamp(&placed["created_at"]);
        timestamp(&placed["updated_at"]);

        // Read back with the consistency token.
        let read = body(
            app.get(&location)
                .bearer_auth(&token)
                .header("x-consistency-token", consistency)
                .send()
                .await
                .unwrap(),
            200,
        )
        .await;
        assert_eq!(read["id"], placed["id"]);
        assert_eq!(read["items"], placed["items"]);

        // The price changes afterwards: the order keeps the old one.
        body(
            patch_product(&app, &admin, &id(&first), &json!({"price_cents": 9999})).await,
            200,
        )
        .await;
        let done = settled(&app, &token, &oid).await;
        assert_eq!(done["status"], "completed", "{done}");
        assert_eq!(done["items"], placed["items"]);
        assert_eq!(done["total_cents"], 3400);
        let charged = wait_for("a ledger entry", WAIT, || async {
            let entries = ledger(&app, &admin, &oid).await;
            (!entries.is_empty()).then_some(entries)
        })
        .await;
        assert_eq!(charged[0]["amount_cents"], 3400);

        // A new order takes the new price.
        let later = order(&app, &token, json!([line(&first, 1)]), "pm_card_visa").await;
        assert_eq!(later["items"][0]["unit_price_cents"], 9999);
        assert_eq!(later["total_cents"], 9999);
    }
);

both!(
    completed_order,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let (user, token) = app.customer("completed@example.com").await;
        let (_, other) = app.customer("completed-other@example.com").await;
        let product = create_product(&app, &admin, "DONE-1", 700, "EUR", 10).await;
        let pid = id(&product);
        // A client looks at the product before buying it.
        assert_eq!(get_product(&app, &pid).await["available"], 10);

        let placed = order(&app, &token, json!([line(&product, 3)]), "pm_card_visa").await;
        let oid = id(&placed);
        let done = settled(&app, &token, &oid).await;
        assert_eq!(done["status"], "completed", "{done}");
        assert!(done["failure_reason"].is_null());
        assert_eq!(done["total_cents"], 2100);
        assert!(timestamp(&done["updated_at"]) >= timestamp(&done["created_at"]));

        // Sold, nothing left reserved; the catalog follows.
        wait_levels(&app, &pid, (7, 0, 3)).await;

        // The log tells the story.
        let types = order_events_until(&app, &admin, &oid, InventorySold::NAME).await;
        assert_in_order(
            &types,
            &[
                OrderCreated::NAME,
                InventoryReserved::NAME,
                PaymentSucceeded::NAME,
                OrderProcessed::NAME,
                InventorySold::NAME,
            ],
        );
        for never in [
            OrderFailed::NAME,
            PaymentFailed::NAME,
            InventoryReleased::NAME,
            OrderCancelled::NAME,
        ] {
            assert!(!types.iter().any(|t| t == never), "{never} in {types:?}");
        }

        // Charged once.
        let entries = ledger(&app, &admin, &oid).await;
        assert_eq!(entries.len(), 1, "{entries:?}");
        let entry = &entries[0];
        assert_eq!(entry["status"], "succeeded");
        assert_eq!(entry["order_id"], oid.as_str());
        assert_eq!(entry["amount_cents"], done["total_cents"]);
        assert_eq!(entry["currency"], "EUR");
        assert!(
            entry["idempotency_key"]
                .as_str()
                .is_some_and(|k| !k.is_empty())
        );
        assert!(entry["id"].is_string());
        timestamp(&entry["created_at"]);

        // One confirmation, for the owner only.
        let n = order_notification(&app, &token, &user, &oid).await;
        assert_eq!(n["kind"], "order_confirmation");
        let others = list_all(&app, &other, "/v1/notifications").await;
        assert!(
            !others.iter().any(|n| n["order_id"] == oid.as_str()),
            "another user sees the confirmation"
        );
        // And it stays one.
        let events = list_all(&app, &admin, "/v1/events").await;
        assert_eq!(
            order_event_types(&events, &oid)
                .iter()
                .filter(|t| *t == OrderProcessed::NAME)
                .count(),
            1
        );
        let all = list_all(&app, &token, "/v1/notifications").await;
        assert_eq!(
            all.iter().filter(|n| n["order_id"] == oid.as_str()).count(),
            1
        );
        // The catalog follows the sale (it may lag: bounded wait).
        wait_available(&app, &pid, 7).await;
    }
);

both!(
    declined_order,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let (user, token) = app.customer("declined@example.com").await;
        let product = create_product(&app, &admin, "DECL-1", 900, "EUR", 5).await;
        let pid = id(&product);

        let placed = order(
            &app,
            &token,
            json!([line(&product, 2)]),
            "pm_card_chargeDeclined",
        )
        .await;
        let oid = id(&placed);
        let failed = settled(&app, &token, &oid).await;
        assert_eq!(failed["status"], "failed", "{failed}");
        assert_eq!(failed["failure_reason"], "payment_declined");

        // The reservation is released.
        wait_levels(&app, &pid, (5, 0, 0)).await;

        let types = order_events_until(&app, &admin, &oid, InventoryReleased::NAME).await;
        assert_in_order(
            &types,
            &[
                OrderCreated::NAME,
                InventoryReserved::NAME,
                PaymentFailed::NAME,
                OrderFailed::NAME,
                InventoryReleased::NAME,
            ],
        );
        for never in [
            PaymentSucceeded::NAME,
            OrderProcessed::NAME,
            InventorySold::NAME,
        ] {
            assert!(!types.iter().any(|t| t == never), "{never} in {types:?}");
        }

        let entries = ledger(&app, &admin, &oid).await;
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert_eq!(entries[0]["status"], "declined");
        assert_eq!(entries[0]["amount_cents"], 1800);

        let n = order_notification(&app, &token, &user, &oid).await;
        assert_eq!(n["kind"], "order_failed");
        // The catalog follows the release (it may lag: bounded wait).
        wait_available(&app, &pid, 5).await;
    }
);

both!(
    payment_error_after_retries, [sqlite, postgres, split],
    with quick_retries,
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let (user, token) = app.customer("payment-error@example.com").await;
        let product = create_product(&app, &admin, "ERR-1", 400, "EUR", 6).await;
        let pid = id(&product);

        let placed = order(
            &app,
            &token,
            json!([line(&product, 2)]),
            "pm_card_processingError",
        )
        .await;
        let oid = id(&placed);
        let failed = settled(&app, &token, &oid).await;
        assert_eq!(failed["status"], "failed", "{failed}");
        assert_eq!(failed["failure_reason"], "payment_error");

        wait_levels(&app, &pid, (6, 0, 0)).await;

        // Retried: several provider errors reached the gateway, no success.
        let entries = ledger(&app, &admin, &oid).await;
        assert!(entries.len() >= 2, "retried: {entries:?}");
        assert!(
            entries.len() <= app.config.order_max_attempts as usize,
            "at most order_max_attempts charges: {entries:?}"
        );
        assert!(
            entries.iter().all(|e| e["status"] == "error"),
            "{entries:?}"
        );
        let keys: BTreeSet<&str> = entries
            .iter()
            .map(|e| e["idempotency_key"].as_str().unwrap())
            .collect();
        assert_eq!(keys.len(), 1, "one key per order: {entries:?}");

        let types = order_events_until(&app, &admin, &oid, InventoryReleased::NAME).await;
        assert_in_order(
            &types,
            &[
                OrderCreated::NAME,
                InventoryReserved::NAME,
                PaymentFailed::NAME,
                OrderFailed::NAME,
                InventoryReleased::NAME,
            ],
        );
        assert!(!types.iter().any(|t| t == PaymentSucceeded::NAME));

        let n = order_notification(&app, &token, &user, &oid).await;
        assert_eq!(n["kind"], "order_failed");
    }
);

both!(
    out_of_stock_order,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let (user, token) = app.customer("out-of-stock@example.com").await;
        let scarce = create_product(&app, &admin, "OOS-1", 100, "EUR", 3).await;
        let plenty = create_product(&app, &admin, "OOS-2", 100, "EUR", 100).await;

        let placed = order(&app, &token, json!([line(&scarce, 5)]), "pm_card_visa").await;
        let oid = id(&placed);
        let failed = settled(&app, &token, &oid).await;
        assert_eq!(failed["status"], "failed", "{failed}");
        assert_eq!(failed["failure_reason"], "out_of_stock");
        assert_eq!(levels(&app, &id(&scarce)).await, (3, 0, 0));

        // All or nothing: the line that could be served is not reserved either.
        let mixed = order(
            &app,
            &token,
            json!([line(&plenty, 10), line(&scarce, 4)]),
            "pm_card_visa",
        )
        .await;
        let mixed_id = id(&mixed);
        let failed = settled(&app, &token, &mixed_id).await;
        assert_eq!(failed["failure_reason"], "out_of_stock");
        assert_eq!(levels(&app, &id(&plenty)).await, (100, 0, 0));
        assert_eq!(levels(&app, &id(&scarce)).await, (3, 0, 0));

        for order_id in [&oid, &mixed_id] {
            let types = order_events_until(&app, &admin, order_id, OrderFailed::NAME).await;
            for never in [
                InventoryReserved::NAME,
                PaymentSucceeded::NAME,
                PaymentFailed::NAME,
                OrderProcessed::NAME,
            ] {
                assert!(!types.iter().any(|t| t == never), "{never} in {types:?}");
            }
            assert!(
                ledger(&app, &admin, order_id).await.is_empty(),
                "never charged"
            );
            let n = order_notification(&app, &token, &user, order_id).await;
            assert_eq!(n["kind"], "order_failed");
        }
        // Lines of one product add up: 2 + 2 of 3 is out of stock.
        let doubled = order(
            &app,
            &token,
            json!([line(&scarce, 2), line(&scarce, 2)]),
            "pm_card_visa",
        )
        .await;
        let failed = settled(&app, &token, &id(&doubled)).await;
        assert_eq!(failed["failure_reason"], "out_of_stock", "{failed}");
        assert_eq!(levels(&app, &id(&scarce)).await, (3, 0, 0));

        // The exact amount in stock can still be bought.
        let last = order(&app, &token, json!([line(&scarce, 3)]), "pm_card_visa").await;
        assert_eq!(
            settled(&app, &token, &id(&last)).await["status"],
            "completed"
        );
        wait_levels(&app, &id(&scarce), (0, 0, 3)).await;
    }
);

both!(
    order_read_access,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let (_, owner) = app.customer("reader-owner@example.com").await;
        let (_, other) = app.customer("reader-other@example.com").await;
        let product = create_product(&app, &admin, "READ-1", 100, "EUR", 10).await;
        let placed = order(&app, &owner, json!([line(&product, 1)]), "pm_card_visa").await;
        let oid = id(&placed);

        assert_eq!(get_order(&app, &owner, &oid).await["id"], oid.as_str());
        assert_eq!(get_order(&app, &admin, &oid).await["id"], oid.as_str());
        let get = |token: Option<String>, path: String| {
            let app = &app;
            async move {
                let request = app.get(&path);
                match token {
                    Some(token) => request.bearer_auth(token),
                    None => request,
                }
                .send()
                .await
                .unwrap()
            }
        };
        let not_found = problem(
            get(Some(other.clone()), format!("/v1/orders/{oid}")).await,
            404,
        )
        .await;
        let missing = problem(
            get(
                Some(other.clone()),
                format!("/v1/orders/{}", Uuid::now_v7()),
            )
            .await,
            404,
        )
        .await;
        assert_eq!(
            not_found["title"], missing["title"],
            "another user's order looks missing"
        );
        problem(
            get(Some(owner.clone()), "/v1/orders/not-a-uuid".into()).await,
            404,
        )
        .await;
        problem(
            get(Some(admin.clone()), "/v1/orders/not-a-uuid".into()).await,
            404,
        )
        .await;
        problem(get(None, format!("/v1/orders/{oid}")).await, 401).await;
        problem(get(None, "/v1/orders".into()).await, 401).await;
    }
);

both!(
    order_list_and_paging,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let (alice, alice_token) = app.customer("list-alice@example.com").await;
        let (bob, bob_token) = app.customer("list-bob@example.com").await;
        let product = create_product(&app, &admin, "LIST-1", 100, "EUR", 100).await;

        let mut placed = Vec::new();
        for _ in 0..3 {
            placed.push(id(&order(
                &app,
                &alice_token,
                json!([line(&product, 1)]),
                "pm_card_visa",
            )
            .await));
        }
        let bobs = id(&order(&app, &bob_token, json!([line(&product, 1)]), "pm_card_visa").await);
        let newest_first: Vec<String> = placed.iter().rev().cloned().collect();
        // The list is the order-history projection: read after the orders.
        let after = read_token(&app).await;

        let page = body(
            app.get("/v1/orders")
                .bearer_auth(&alice_token)
                .header("x-consistency-token", &after)
                .send()
                .await
                .unwrap(),
            200,
        )
        .await;
        let items = page["items"].as_array().unwrap();
        assert_eq!(items.iter().map(id).collect::<Vec<_>>(), newest_first);
        assert!(items.iter().all(|o| o["user_id"] == alice["id"]));
        let created: Vec<DateTime<Utc>> =
            items.iter().map(|o| timestamp(&o["created_at"])).collect();
        assert!(created.windows(2).all(|w| w[0] >= w[1]), "newest first");
        assert!(page["next_cursor"].is_null());

        // limit=1: each order once, in the same order.
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..10 {
            let mut path = "/v1/orders?limit=1".to_owned();
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let page = body(
                app.get(&path)
                    .bearer_auth(&alice_token)
                    .header("x-consistency-token", &after)
                    .send()
                    .await
                    .unwrap(),
                200,
            )
            .await;
            let items = page["items"].as_array().unwrap();
            assert!(items.len() <= 1);
            seen.extend(items.iter().map(id));
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
        assert_eq!(seen, newest_first);

        // Bob sees only his.
        let bob_list = list_all(&app, &bob_token, "/v1/orders").await;
        assert_eq!(
            bob_list.iter().map(id).collect::<Vec<_>>(),
            vec![bobs.clone()]
        );

        // ?user_id=: own is fine, anyone else's is a 404 for a customer.
        let alice_id = alice["id"].as_str().unwrap();
        let bob_id = bob["id"].as_str().unwrap();
        let own = list_all(
            &app,
            &alice_token,
            &format!("/v1/orders?user_id={alice_id}"),
        )
        .await;
        assert_eq!(own.len(), 3);
        problem(
            app.get(&format!("/v1/orders?user_id={bob_id}"))
                .bearer_auth(&alice_token)
                .send()
                .await
                .unwrap(),
            404,
        )
        .await;
        problem(
            app.get("/v1/orders?user_id=not-a-uuid")
                .bearer_auth(&alice_token)
                .send()
                .await
                .unwrap(),
            404,
        )
        .await;
        // The admin sees anyone's.
        let as_admin = list_all(&app, &admin, &format!("/v1/orders?user_id={alice_id}")).await;
        assert_eq!(as_admin.iter().map(id).collect::<Vec<_>>(), newest_first);
        let as_admin = list_all(&app, &admin, &format!("/v1/orders?user_id={bob_id}")).await;
        assert_eq!(as_admin.iter().map(id).collect::<Vec<_>>(), vec![bobs]);
        // Paging rules.
        let p = problem(
            app.get("/v1/orders?limit=0")
                .bearer_auth(&alice_token)
                .send()
                .await
                .unwrap(),
            422,
        )
        .await;
        assert_eq!(error_fields(&p), ["limit"]);
        problem(
            app.get("/v1/orders?cursor=tampered")
                .bearer_auth(&alice_token)
                .send()
                .await
                .unwrap(),
            400,
        )
        .await;
    }
);

// ---- cancel --------------------------------------------------------------------

both!(
    cancel_rules,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let (_, owner) = app.customer("cancel-owner@example.com").await;
        let (_, other) = app.customer("cancel-other@example.com").await;
        let product = create_product(&app, &admin, "CXL-1", 100, "EUR", 10).await;

        let completed = id(&order(&app, &owner, json!([line(&product, 1)]), "pm_card_visa").await);
        assert_eq!(
            settled(&app, &owner, &completed).await["status"],
            "completed"
        );
        let failed = id(&order(
            &app,
            &owner,
            json!([line(&product, 1)]),
            "pm_card_chargeDeclined",
        )
        .await);
        assert_eq!(settled(&app, &owner, &failed).await["status"], "failed");

        // Not pending any more: 409 for the owner and for the admin.
        for (token, order_id) in [
            (&owner, &completed),
            (&admin, &completed),
            (&owner, &failed),
        ] {
            problem(cancel(&app, token, order_id).await, 409).await;
        }
        // Another customer's order, a missing one, a non-UUID: 404.
        problem(cancel(&app, &other, &completed).await, 404).await;
        problem(cancel(&app, &owner, &Uuid::now_v7().to_string()).await, 404).await;
        problem(cancel(&app, &owner, "not-a-uuid").await, 404).await;
        let response = app
            .post(&format!("/v1/orders/{completed}/cancel"))
            .send()
            .await
            .unwrap();
        problem(response, 401).await;
        // Nothing changed.
        assert_eq!(
            get_order(&app, &owner, &completed).await["status"],
            "completed"
        );
        assert_eq!(get_order(&app, &owner, &failed).await["status"], "failed");
        wait_levels(&app, &id(&product), (9, 0, 1)).await;
    }
);

/// Admin: waits until the `orders` queue has nothing left to run.
async fn saga_queue_idle(app: &TestApp, admin: &str) {
    wait_for("orders queue idle", WAIT, || async {
        for state in ["scheduled", "running", "failed"] {
            let page = body(
                app.get(&format!("/v1/jobs?queue=orders&state={state}"))
                    .bearer_auth(admin)
                    .send()
                    .await
                    .unwrap(),
                200,
            )
            .await;
            if !page["items"].as_array().unwrap().is_empty() {
                return None;
            }
        }
        Some(())
    })
    .await;
}

// A pending order cannot be held pending through the API (its processing starts as
// soon as it is committed), so this test races: bursts of orders through a single
// saga worker, each cancelled at once (newest first, half by the owner, half by the
// admin). Every answer must be 200 `cancelled` or 409; a burst is repeated until at
// least one cancel won the race (up to 5 bursts).
both!(
    cancel_pending_order, [sqlite, postgres, split],
    with |c: &mut Config| c.order_concurrency = 1,
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let (user, token) = app.customer("cancel-pending@example.com").await;
        let product = create_product(&app, &admin, "CXL-P", 100, "EUR", 1000).await;
        let pid = id(&product);

        let mut cancelled = Vec::new();
        let mut refused = Vec::new();
        for _ in 0..5 {
            let placed = join_all(
                (0..10).map(|_| order(&app, &token, json!([line(&product, 2)]), "pm_card_visa")),
            )
            .await;
            let mut ids: Vec<String> = placed.iter().map(id).collect();
            ids.sort();
            ids.reverse();
            let answers = join_all(ids.iter().enumerate().map(|(i, order_id)| {
                let who = if i % 2 == 0 { &token } else { &admin };
                cancel(&app, who, order_id)
            }))
            .await;
            for (order_id, response) in ids.into_iter().zip(answers) {
                match response.status().as_u16() {
                    200 => {
                        assert!(header(&response, "x-consistency-token").is_some());
                        let o = body(response, 200).await;
                        assert_eq!(o["id"], order_id.as_str());
                        assert_eq!(o["status"], "cancelled");
                        assert!(o["failure_reason"].is_null());
                        cancelled.push(order_id);
                    }
                    409 => {
                        problem(response, 409).await;
                        refused.push(order_id);
                    }
                    status => panic!(
                        "cancel {order_id}: {status} {}",
                        response.text().await.unwrap()
                    ),
                }
            }
            if !cancelled.is_empty() {
                break;
            }
        }
        assert!(
            !cancelled.is_empty(),
            "no cancel won the race in 5 bursts of 10 orders (refused: {})",
            refused.len()
        );
        eprintln!(
            "cancel race: {} cancelled, {} refused",
            cancelled.len(),
            refused.len()
        );

        // The refused ones were already being charged: they complete.
        for order_id in &refused {
            assert_eq!(settled(&app, &token, order_id).await["status"], "completed");
        }
        saga_queue_idle(&app, &admin).await;
        // No stock stays reserved; only the completed orders sold.
        let sold = 2 * i64::try_from(refused.len()).unwrap();
        wait_levels(&app, &pid, (1000 - sold, 0, sold)).await;
        // The cancelled ones stay cancelled, were never charged, got no notification.
        let events = list_all(&app, &admin, "/v1/events").await;
        let notifications = list_all(&app, &token, "/v1/notifications").await;
        for order_id in &cancelled {
            let o = get_order(&app, &token, order_id).await;
            assert_eq!(o["status"], "cancelled", "{o}");
            assert!(ledger(&app, &admin, order_id).await.is_empty(), "charged");
            let types = order_event_types(&events, order_id);
            assert_eq!(
                types.iter().filter(|t| *t == OrderCancelled::NAME).count(),
                1,
                "{types:?}"
            );
            for never in [
                OrderProcessed::NAME,
                OrderFailed::NAME,
                PaymentSucceeded::NAME,
            ] {
                assert!(!types.iter().any(|t| t == never), "{never} in {types:?}");
            }
            assert!(
                !notifications
                    .iter()
                    .any(|n| n["order_id"] == order_id.as_str()),
                "a notification for cancelled order {order_id}"
            );
        }
        for order_id in &refused {
            order_notification(&app, &token, &user, order_id).await;
        }
    }
);

// The one order that stays `pending` on its own for a while: its payment provider
// failed and the charge is retried later (long backoff here). api.md: cancel is
// "200 Order (`cancelled`) while `pending`; 409 otherwise".
both!(
    cancel_while_payment_is_retried, [sqlite, postgres, split],
    with |c: &mut Config| {
        c.job_min_backoff_ms = 60_000;
        c.job_max_backoff_ms = 120_000;
    },
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let (_, token) = app.customer("cancel-retrying@example.com").await;
        let product = create_product(&app, &admin, "CXL-R", 100, "EUR", 5).await;
        let pid = id(&product);
        let placed = order(
            &app,
            &token,
            json!([line(&product, 2)]),
            "pm_card_processingError",
        )
        .await;
        let oid = id(&placed);
        // The first charge attempt failed; the next one is a minute away. (On a
        // loaded machine the saga's first run can fail before the charge, e.g. a
        // pool timeout; its retry then comes after the long backoff, so wait past
        // the longest one.)
        wait_for(
            "a first failed charge",
            Duration::from_secs(150),
            || async {
                let entries = ledger(&app, &admin, &oid).await;
                entries.iter().any(|e| e["status"] == "error").then_some(())
            },
        )
        .await;
        let pending = get_order(&app, &token, &oid).await;
        assert_eq!(pending["status"], "pending", "{pending}");
        assert_eq!(levels(&app, &pid).await, (3, 2, 0));

        let response = cancel(&app, &token, &oid).await;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        assert_eq!(
            status, 200,
            "cancel of an order that is still pending (api.md: 200 while pending): {text}"
        );
        let cancelled: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(cancelled["status"], "cancelled");
        wait_levels(&app, &pid, (5, 0, 0)).await;
        assert!(
            !ledger(&app, &admin, &oid)
                .await
                .iter()
                .any(|e| e["status"] == "succeeded")
        );
    }
);

// ---- idempotency ---------------------------------------------------------------

async fn place_with_key(app: &TestApp, token: &str, key: &str, request: &Value) -> Response {
    app.post("/v1/orders")
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .json(request)
        .send()
        .await
        .unwrap()
}

async fn order_count(app: &TestApp, token: &str) -> usize {
    list_all(app, token, "/v1/orders").await.len()
}

both!(
    idempotency_key_replays,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let (_, alice) = app.customer("idem-alice@example.com").await;
        let (_, bob) = app.customer("idem-bob@example.com").await;
        let product = create_product(&app, &admin, "IDEM-1", 100, "EUR", 100).await;
        let request = json!({"items": [line(&product, 2)], "payment_method": "pm_card_visa"});

        let first = place_with_key(&app, &alice, "key-1", &request).await;
        assert_eq!(first.status().as_u16(), 202);
        assert!(header(&first, "idempotent-replayed").is_none());
        let location = header(&first, "location");
        let first_text = first.text().await.unwrap();
        let first_body: Value = serde_json::from_str(&first_text).unwrap();
        let oid = id(&first_body);

        // Let it complete: a replay is still the first answer.
        settled(&app, &alice, &oid).await;
        let again = place_with_key(&app, &alice, "key-1", &request).await;
        assert_eq!(again.status().as_u16(), 202);
        assert_eq!(
            header(&again, "idempotent-replayed").as_deref(),
            Some("true")
        );
        assert_eq!(header(&again, "location"), location);
        assert!(
            header(&again, "content-type").is_some_and(|c| c.starts_with("application/json")),
            "content type of the replay"
        );
        let again_body: Value = serde_json::from_str(&again.text().await.unwrap()).unwrap();
        assert_eq!(again_body, first_body, "the same body");
        assert_eq!(again_body["status"], "pending");
        assert_eq!(order_count(&app, &alice).await, 1);

        // The same key with another body: 422, and no new order.
        let other = json!({"items": [line(&product, 3)], "payment_method": "pm_card_visa"});
        problem(place_with_key(&app, &alice, "key-1", &other).await, 422).await;
        assert_eq!(order_count(&app, &alice).await, 1);

        // Another user with the same key: independent.
        let response = place_with_key(&app, &bob, "key-1", &request).await;
        assert!(header(&response, "idempotent-replayed").is_none());
        let bobs = body(response, 202).await;
        assert_ne!(bobs["id"], first_body["id"]);
        assert_eq!(order_count(&app, &bob).await, 1);
        assert_eq!(order_count(&app, &alice).await, 1);

        // Another key: another order.
        body(place_with_key(&app, &alice, "key-2", &request).await, 202).await;
        assert_eq!(order_count(&app, &alice).await, 2);

        // A refusal is a first answer too: replayed.
        let bad = json!({"items": [], "payment_method": "pm_card_visa"});
        let refused = problem(place_with_key(&app, &alice, "key-3", &bad).await, 422).await;
        let replay = place_with_key(&app, &alice, "key-3", &bad).await;
        assert_eq!(
            header(&replay, "idempotent-replayed").as_deref(),
            Some("true")
        );
        assert_eq!(problem(replay, 422).await, refused);
        assert_eq!(order_count(&app, &alice).await, 2);
    }
);

both!(
    idempotency_key_concurrent,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let (_, token) = app.customer("idem-race@example.com").await;
        let product = create_product(&app, &admin, "IDEM-R", 100, "EUR", 100).await;
        let request = json!({"items": [line(&product, 1)], "payment_method": "pm_card_visa"});

        let responses =
            join_all((0..10).map(|_| place_with_key(&app, &token, "race-key", &request))).await;
        let mut originals = 0;
        let mut order_ids = BTreeSet::new();
        let mut statuses = Vec::new();
        for response in responses {
            let status = response.status().as_u16();
            statuses.push(status);
            let replayed = header(&response, "idempotent-replayed").is_some();
            let text = response.text().await.unwrap();
            match status {
                202 => {
                    let o: Value = serde_json::from_str(&text).unwrap();
                    order_ids.insert(id(&o));
                    if !replayed {
                        originals += 1;
                    }
                }
                409 => {}
                _ => panic!("status {status}: {text}"),
            }
        }
        assert_eq!(originals, 1, "one original answer: {statuses:?}");
        assert_eq!(
            order_ids.len(),
            1,
            "every 202 is the same order: {statuses:?}"
        );
        assert_eq!(order_count(&app, &token).await, 1);
        // Afterwards the key replays.
        let replay = place_with_key(&app, &token, "race-key", &request).await;
        assert_eq!(
            header(&replay, "idempotent-replayed").as_deref(),
            Some("true")
        );
        let o = body(replay, 202).await;
        assert!(order_ids.contains(&id(&o)));
    }
);

// ---- no oversell ---------------------------------------------------------------

/// Stock snapshots taken while orders race.
#[derive(Default)]
struct Samples {
    count: AtomicI64,
    max_taken: AtomicI64,
    min_available: AtomicI64,
    broken_sums: AtomicI64,
    errors: AtomicI64,
}

async fn sample_stock(
    client: Client,
    url: String,
    total: i64,
    samples: Arc<Samples>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        match client.get(&url).send().await {
            Ok(response) if response.status().is_success() => {
                let s: Value = response.json().await.unwrap_or_default();
                let (available, reserved, sold) = (
                    s["available"].as_i64().unwrap_or(-1),
                    s["reserved"].as_i64().unwrap_or(-1),
                    s["sold"].as_i64().unwrap_or(-1),
                );
                samples.count.fetch_add(1, Ordering::Relaxed);
                samples
                    .max_taken
                    .fetch_max(sold + reserved, Ordering::Relaxed);
                samples
                    .min_available
                    .fetch_min(available, Ordering::Relaxed);
                if available + reserved + sold != total || reserved < 0 || sold < 0 {
                    samples.broken_sums.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {
                samples.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

both!(
    no_oversell, [sqlite, postgres, split],
    with |c: &mut Config| c.login_rate_per_address = 1000,
    |app: TestApp| async move {
        const STOCK: i64 = 50;
        const BUYERS: usize = 20;
        const ORDERS: usize = 200;
        let admin = app.admin_token().await;
        let product = create_product(&app, &admin, "LAST-UNITS", 1000, "EUR", STOCK).await;
        let pid = id(&product);
        assert_eq!(levels(&app, &pid).await, (STOCK, 0, 0));
        assert_eq!(get_product(&app, &pid).await["available"], STOCK);
        let mut buyers = Vec::new();
        for n in 0..BUYERS {
            buyers.push(app.customer(&format!("buyer{n}@example.com")).await);
        }

        let samples = Arc::new(Samples {
            min_available: AtomicI64::new(i64::MAX),
            ..Samples::default()
        });
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = tokio::spawn(sample_stock(
            app.client.clone(),
            app.url(&format!("/v1/inventory/{pid}")),
            STOCK,
            samples.clone(),
            stop.clone(),
        ));

        // Each buyer behaves as api.md asks of a client: an Idempotency-Key on
        // the order, and a 503 (a busy dependency: in the split deployment a
        // call between services may time out under this burst on one hot row)
        // sent again with the same key after its Retry-After, a bounded number
        // of times.
        let answers = join_all((0..ORDERS).map(|n| {
            let token = &buyers[n % BUYERS].1;
            let request = json!({"items": [{"product_id": pid, "quantity": 1}], "payment_method": "pm_card_visa"});
            let key = format!("burst-{n}");
            let app = &app;
            async move {
                let mut tries = 0;
                loop {
                    tries += 1;
                    let response = place_with_key(app, token, &key, &request).await;
                    let status = response.status().as_u16();
                    if status == 503 && tries < 10 {
                        let wait = crate::conventions::retry_after(&response);
                        tokio::time::sleep(Duration::from_secs(wait.min(5))).await;
                        continue;
                    }
                    return (status, response.text().await.unwrap());
                }
            }
        }))
        .await;
        let refused: Vec<&(u16, String)> = answers.iter().filter(|(s, _)| *s != 202).collect();
        assert!(
            refused.is_empty(),
            "{} of {ORDERS} orders not accepted, e.g. {:?}",
            refused.len(),
            refused.first()
        );

        // Wait until no order is pending.
        let orders: Vec<Value> = wait_for("no order pending", Duration::from_secs(180), || async {
            let mut all = Vec::new();
            for (_, token) in &buyers {
                let mine = list_all(&app, token, "/v1/orders").await;
                if mine.iter().any(|o| o["status"] == "pending") {
                    return None;
                }
                all.extend(mine);
            }
            Some(all)
        })
        .await;
        wait_levels(&app, &pid, (0, 0, STOCK)).await;
        stop.store(true, Ordering::Relaxed);
        sampler.await.unwrap();

        assert_eq!(orders.len(), ORDERS);
        let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
        for o in &orders {
            let key = format!(
                "{}/{}",
                o["status"].as_str().unwrap(),
                o["failure_reason"].as_str().unwrap_or("-")
            );
            *by_status.entry(key).or_default() += 1;
        }
        let expected: BTreeMap<String, usize> = BTreeMap::from([
            ("completed/-".into(), 50),
            ("failed/out_of_stock".into(), 150),
        ]);
        assert_eq!(by_status, expected);

        // Never more taken than there was, at any sampled moment.
        let count = samples.count.load(Ordering::Relaxed);
        assert!(count > 0, "no stock sample was taken");
        assert_eq!(
            samples.errors.load(Ordering::Relaxed),
            0,
            "stock reads failed"
        );
        assert!(samples.max_taken.load(Ordering::Relaxed) <= STOCK);
        assert!(samples.min_available.load(Ordering::Relaxed) >= 0);
        assert_eq!(
            samples.broken_sums.load(Ordering::Relaxed),
            0,
            "available + reserved + sold != {STOCK} in some of {count} samples"
        );

        // Each completed order charged exactly once; the others never.
        for o in &orders {
            let entries = ledger(&app, &admin, &id(o)).await;
            if o["status"] == "completed" {
                assert_eq!(entries.len(), 1, "{entries:?}");
                assert_eq!(entries[0]["status"], "succeeded");
            } else {
                assert!(entries.is_empty(), "{entries:?}");
            }
        }
        // Exactly one notification per order.
        let status_of: BTreeMap<String, String> = orders
            .iter()
            .map(|o| (id(o), o["status"].as_str().unwrap().to_owned()))
            .collect();
        for (user, token) in &buyers {
            let notes = wait_for("order notifications", WAIT, || async {
                let notes: Vec<Value> = list_all(&app, token, "/v1/notifications")
                    .await
                    .into_iter()
                    .filter(|n| n["order_id"].is_string())
                    .collect();
                (notes.len() >= ORDERS / BUYERS).then_some(notes)
            })
            .await;
            assert_eq!(notes.len(), ORDERS / BUYERS, "{notes:?}");
            let distinct: BTreeSet<&str> = notes
                .iter()
                .map(|n| n["order_id"].as_str().unwrap())
                .collect();
            assert_eq!(distinct.len(), notes.len(), "one per order");
            for n in &notes {
                assert_eq!(n["user_id"], user["id"]);
                let status = &status_of[n["order_id"].as_str().unwrap()];
                let kind = if status == "completed" {
                    "order_confirmation"
                } else {
                    "order_failed"
                };
                assert_eq!(n["kind"], kind);
            }
        }
        // The catalog follows the sales (it may lag: bounded wait).
        wait_available(&app, &pid, 0).await;
    }
);

// ---- payments ------------------------------------------------------------------

both!(
    payments_ledger_access,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let (_, customer) = app.customer("payments@example.com").await;
        let product = create_product(&app, &admin, "PAY-1", 100, "EUR", 10).await;
        let placed = order(
            &app,
            &customer,
            json!([line(&product, 1)]),
            "pm_card_mastercard",
        )
        .await;
        let oid = id(&placed);
        assert_eq!(settled(&app, &customer, &oid).await["status"], "completed");

        let get = |token: Option<&str>, query: &str| {
            let request = app.get(&format!("/v1/payments{query}"));
            match token {
                Some(token) => request.bearer_auth(token),
                None => request,
            }
            .send()
        };
        problem(
            get(Some(&customer), &format!("?order_id={oid}"))
                .await
                .unwrap(),
            403,
        )
        .await;
        problem(get(None, &format!("?order_id={oid}")).await.unwrap(), 401).await;
        let p = problem(get(Some(&admin), "").await.unwrap(), 422).await;
        assert_eq!(error_fields(&p), ["order_id"]);
        let p = problem(get(Some(&admin), "?order_id=nope").await.unwrap(), 422).await;
        assert_eq!(error_fields(&p), ["order_id"]);
        let empty = body(
            get(Some(&admin), &format!("?order_id={}", Uuid::now_v7()))
                .await
                .unwrap(),
            200,
        )
        .await;
        assert_eq!(empty["items"], json!([]));
        let entries = ledger(&app, &admin, &oid).await;
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0]["status"], "succeeded");
    }
);

both!(
    order_reads_come_from_the_history_projection_with_the_exact_times,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let (_, token) = app.customer("history@example.com").await;
        let product = create_product(&app, &admin, "HIST-1", 700, "EUR", 10).await;
        let placed = order(&app, &token, json!([line(&product, 2)]), "pm_card_visa").await;
        let oid = id(&placed);
        // The read model holds what the 202 said, to the microsecond.
        let done = settled(&app, &token, &oid).await;
        assert_eq!(done["status"], "completed");
        assert_eq!(done["created_at"], placed["created_at"]);
        assert_eq!(done["items"], placed["items"]);
        assert_eq!(done["total_cents"], 1400);
        let timeline = done["timeline"].as_array().unwrap();
        assert_eq!(timeline.len(), 2, "{done}");
        assert_eq!(
            timeline[0],
            json!({"status": "pending", "at": placed["created_at"]})
        );
        assert_eq!(timeline[1]["status"], "completed");
        assert_eq!(timeline[1]["at"], done["updated_at"]);
        // The list shows the same order, the same way (with a token: after it).
        let listed = list_all(&app, &token, "/v1/orders").await;
        assert_eq!(listed, vec![done.clone()]);

        // A cancelled order ends its timeline with the cancellation.
        let slow = order(&app, &token, json!([line(&product, 1)]), "pm_card_visa").await;
        let response = app
            .post(&format!("/v1/orders/{}/cancel", id(&slow)))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            let cancelled: Value = response.json().await.unwrap();
            let seen = read_token(&app).await;
            let read = body(
                app.get(&format!("/v1/orders/{}", id(&slow)))
                    .bearer_auth(&token)
                    .header("x-consistency-token", &seen)
                    .send()
                    .await
                    .unwrap(),
                200,
            )
            .await;
            assert_eq!(read["status"], "cancelled");
            let timeline = read["timeline"].as_array().unwrap();
            assert_eq!(timeline.last().unwrap()["status"], "cancelled", "{read}");
            assert_eq!(read["updated_at"], cancelled["updated_at"]);
        } else {
            // The saga was quicker than the cancel: 409, the order ended its way.
            assert_eq!(response.status(), 409);
        }
    }
);
