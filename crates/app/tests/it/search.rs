//! Product search through the API: the search projection (tantivy, fed by the
//! log) answers ranked, typo-tolerant searches with filters, facets and
//! highlights; a read with a consistency token sees its own write; a rebuild
//! from the log equals the index built event by event.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use reqwest::Response;
use serde_json::{Value, json};

use crate::helpers::*;

async fn json_of(response: Response, status: u16) -> (Value, Option<String>, Option<String>) {
    assert_eq!(response.status().as_u16(), status, "status");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (token, model) = (header("x-consistency-token"), header("x-read-model"));
    (response.json().await.unwrap(), token, model)
}

/// Creates a product; returns its id and the write's consistency token.
async fn product(
    app: &TestApp,
    admin: &str,
    sku: &str,
    name: &str,
    description: &str,
    price_cents: i64,
    stock: i64,
) -> (String, String) {
    let response = app
        .post("/v1/products")
        .bearer_auth(admin)
        .json(
            &json!({"sku": sku, "name": name, "description": description,
                      "price_cents": price_cents, "currency": "EUR", "initial_stock": stock}),
        )
        .send()
        .await
        .unwrap();
    let (body, token, _) = json_of(response, 201).await;
    (body["id"].as_str().unwrap().to_owned(), token.unwrap())
}

/// A search with `token`; the body and which side answered.
async fn search(app: &TestApp, token: &str, query: &str) -> (Value, String) {
    let response = app
        .get(&format!("/v1/products?{query}"))
        .header("x-consistency-token", token)
        .send()
        .await
        .unwrap();
    let (body, _, model) = json_of(response, 200).await;
    (body, model.unwrap_or_default())
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn projection(app: &TestApp, admin: &str) -> Value {
    let response = app
        .get("/v1/projections")
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    let (body, _, _) = json_of(response, 200).await;
    body["items"][0].clone()
}

both!(
    search_ranks_forgives_typos_filters_counts_and_highlights,
    [sqlite, postgres],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let (mug, _) = product(
            &app,
            &admin,
            "MUG-1",
            "Blue ceramic mug",
            "Holds coffee",
            1_250,
            10,
        )
        .await;
        let (cup, _) = product(
            &app,
            &admin,
            "CUP-1",
            "Espresso cup",
            "A small mug for espresso",
            800,
            0,
        )
        .await;
        let (torch, _) = product(
            &app,
            &admin,
            "TORCH-1",
            "Crème brûlée torch",
            "Dessert à la française",
            4_500,
            3,
        )
        .await;
        let (rack, token) = product(
            &app,
            &admin,
            "RACK-1",
            "Mug rack",
            "Wooden rack for mugs",
            2_000,
            7,
        )
        .await;

        // The token's write is in the index: the projection answers.
        let (page, model) = search(&app, &token, "q=mug&limit=10").await;
        assert_eq!(model, "projection");
        let found = ids(&page);
        assert_eq!(found.len(), 3, "{page}");
        assert_eq!(
            found[2], cup,
            "the description-only match ranks last: {page}"
        );
        assert_eq!(
            found[..2].iter().cloned().collect::<BTreeSet<_>>(),
            BTreeSet::from([mug.clone(), rack.clone()])
        );
        assert_eq!(page["total"], 3);
        // Facets: every match of the words, whatever the filters.
        assert_eq!(
            page["facets"]["availability"],
            json!({"in_stock": 2, "out_of_stock": 1})
        );
        assert_eq!(
            page["facets"]["price"][0],
            json!({"min_price_cents": 0, "max_price_cents": 999, "count": 1})
        );
        assert_eq!(page["facets"]["price"][1]["count"], 2);
        // Highlights, HTML-escaped, the matched words marked.
        let first = &page["items"][0];
        assert!(
            first["highlight"]["name"]
                .as_str()
                .unwrap()
                .contains("<mark>"),
            "{first}"
        );
        // The items are Products.
        for field in [
            "sku",
            "name",
            "description",
            "price_cents",
            "currency",
            "available",
            "images",
        ] {
            assert!(first.get(field).is_some(), "{field}: {first}");
        }

        // Typos, prefixes and accents.
        assert_eq!(
            ids(&search(&app, &token, "q=espreso").await.0),
            vec![cup.clone()]
        );
        assert_eq!(
            ids(&search(&app, &token, "q=ceram").await.0),
            vec![mug.clone()]
        );
        assert_eq!(
            ids(&search(&app, &token, "q=creme%20brulee").await.0),
            vec![torch.clone()]
        );
        assert_eq!(
            ids(&search(&app, &token, "q=FRAN%C3%87AISE").await.0),
            vec![torch.clone()]
        );

        // Filters and sorts.
        let (page, _) = search(&app, &token, "q=mug&in_stock=true&sort=price_asc").await;
        assert_eq!(ids(&page), vec![mug.clone(), rack.clone()]);
        let (page, _) = search(
            &app,
            &token,
            "q=mug&sort=price_desc&min_price_cents=1000&max_price_cents=5000",
        )
        .await;
        assert_eq!(ids(&page), vec![rack.clone(), mug.clone()]);
        assert_eq!(page["total"], 2);
        let (page, _) = search(&app, &token, "sort=newest").await;
        assert_eq!(
            ids(&page),
            vec![rack.clone(), torch.clone(), cup.clone(), mug.clone()]
        );

        // Stock changes reach the index: the cup comes into stock.
        let response = app
            .post(&format!("/v1/inventory/{cup}/adjustments"))
            .bearer_auth(&admin)
            .json(&json!({"delta": 5, "reason": "delivery"}))
            .send()
            .await
            .unwrap();
        let (_, token, _) = json_of(response, 200).await;
        let token = token.unwrap();
        let (page, _) = search(&app, &token, "q=mug&in_stock=true").await;
        assert_eq!(ids(&page).len(), 3, "{page}");
        // A rename too.
        let response = app
            .patch(&format!("/v1/products/{torch}"))
            .bearer_auth(&admin)
            .json(&json!({"name": "Kitchen blowtorch"}))
            .send()
            .await
            .unwrap();
        let (_, token, _) = json_of(response, 200).await;
        let token = token.unwrap();
        let (page, model) = search(&app, &token, "q=blowtorch").await;
        assert_eq!(
            (ids(&page), model.as_str()),
            (vec![torch.clone()], "projection")
        );
        assert!(ids(&search(&app, &token, "q=creme").await.0).is_empty());

        // Paging by the signed cursor: each match once.
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..10 {
            let mut query = "sort=price_asc&limit=1".to_owned();
            if let Some(c) = &cursor {
                query.push_str(&format!("&cursor={c}"));
            }
            let (page, _) = search(&app, &token, &query).await;
            seen.extend(ids(&page));
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
        assert_eq!(
            seen,
            vec![cup.clone(), mug.clone(), rack.clone(), torch.clone()]
        );

        // Bad parameters are 422s naming them.
        for (query, field) in [
            ("q=mug&min_price_cents=-1", "min_price_cents"),
            ("q=mug&max_price_cents=abc", "max_price_cents"),
            ("min_price_cents=500&max_price_cents=100", "max_price_cents"),
            ("q=mug&in_stock=yes", "in_stock"),
            ("q=mug&sort=cheapest", "sort"),
        ] {
            let response = app
                .get(&format!("/v1/products?{query}"))
                .send()
                .await
                .unwrap();
            let p = problem(response, 422).await;
            assert_eq!(error_fields(&p), [field], "{query}");
        }
        problem(
            app.get("/v1/products?q=mug&cursor=forged")
                .send()
                .await
                .unwrap(),
            400,
        )
        .await;

        // The projection's state and lag, and the metric.
        let status = projection(&app, &admin).await;
        assert_eq!(status["name"], "product-search");
        assert_eq!(status["state"], "live");
        assert_eq!(status["lag"], 0);
        assert_eq!(status["documents"], 4);
        let metrics = app
            .get("/metrics")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            metrics.contains("projection_lag{projection=\"product-search\"}"),
            "projection_lag is exported"
        );
    }
);

both!(
    a_search_with_a_token_sees_its_own_write,
    [sqlite, postgres],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        // Each new product is searched at once with its write's token.
        for n in 0..20 {
            let sku = format!("OWN-{n}");
            let (id, token) =
                product(&app, &admin, &sku, &format!("Zephyrine {n}"), "", 100, 1).await;
            let (page, _) = search(&app, &token, &format!("q={sku}")).await;
            assert_eq!(ids(&page), vec![id], "write {n} seen");
        }
    }
);

both!(
    a_rebuilt_projection_equals_the_one_built_event_by_event,
    [sqlite, postgres],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let mut last = String::new();
        for n in 0..30 {
            let (id, token) = product(
                &app,
                &admin,
                &format!("RB-{n}"),
                &format!("Rebuild item {n}"),
                "Sturdy",
                100 * n + 1,
                n % 4,
            )
            .await;
            last = token;
            if n % 3 == 0 {
                let response = app
                    .post(&format!("/v1/inventory/{id}/adjustments"))
                    .bearer_auth(&admin)
                    .json(&json!({"delta": 2, "reason": "count"}))
                    .send()
                    .await
                    .unwrap();
                last = json_of(response, 200).await.1.unwrap();
            }
        }
        search(&app, &last, "q=rebuild").await;
        // On a busy machine the index may take longer than one search waits.
        let started = Instant::now();
        let before = loop {
            let status = projection(&app, &admin).await;
            if status["lag"] == 0 && status["documents"] == 30 {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the index catches up: {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let response = app
            .post("/v1/projections/product-search/rebuild")
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let started = Instant::now();
        let after = loop {
            let status = projection(&app, &admin).await;
            if status["generation"] != before["generation"] && status["state"] == "live" {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "rebuild ends: {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(after["digest"], before["digest"], "{before} {after}");
        assert_eq!(after["position"], before["position"]);
        // It serves: searches answer from the new generation.
        let (page, model) = search(&app, &last, "q=sturdy&limit=100").await;
        assert_eq!((ids(&page).len(), model.as_str()), (30, "projection"));
        // Unknown projections and customers are refused.
        problem(
            app.post("/v1/projections/nope/rebuild")
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap(),
            404,
        )
        .await;
        let (_, customer) = app.customer("rebuild-customer@example.com").await;
        problem(
            app.get("/v1/projections")
                .bearer_auth(&customer)
                .send()
                .await
                .unwrap(),
            403,
        )
        .await;
    }
);
