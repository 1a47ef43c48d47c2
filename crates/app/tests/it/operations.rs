//! The operations routes of api.md: liveness, readiness, metrics, the OpenAPI
//! document and the docs page.

use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::*;
use crate::users::json_body;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_says_ok() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let response = app.get("/healthz").send().await.unwrap();
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    assert!(response.headers().contains_key("x-request-id"));
    assert_eq!(
        json_body(response, StatusCode::OK).await,
        json!({"status": "ok"})
    );
}

both!(
    readyz_reports_every_component,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let body = json_body(app.get("/readyz").send().await.unwrap(), StatusCode::OK).await;
        assert_eq!(body["status"], "ok");
        let components = body["components"].as_object().unwrap();
        let mut names: Vec<&str> = components.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["bus", "cache", "database", "jobs", "replicas", "shards"]
        );
        assert_eq!(body["components"]["database"], "up");
        // Not configured in a test app.
        for name in ["replicas", "shards"] {
            assert_eq!(body["components"][name], "disabled", "{name}");
        }
        // Redis: configured on PostgreSQL (the monolith on PostgreSQL + Redis, the
        // split deployment), not embedded.
        let cache = if app.config.redis_url.is_some() {
            "up"
        } else {
            "disabled"
        };
        assert_eq!(body["components"]["cache"], cache);
        // The event dispatcher and the job workers run in-process: "up" (or
        // "disabled" where a version has none), never "down" while ready.
        for name in ["bus", "jobs"] {
            let state = body["components"][name].as_str().unwrap();
            assert!(["up", "disabled"].contains(&state), "{name}: {state}");
        }
    }
);

/// An app on PostgreSQL whose database then refuses every connection (existing ones
/// are terminated); returns the app, a token got before, and the database name.
async fn app_losing_its_database() -> (TestApp, String, String) {
    use scaleshop_db::sqlx::{self, Connection};
    let config = test_config(Backend::Postgres).await;
    let url = config.database_url.as_ref().unwrap().expose().to_owned();
    let name = url.rsplit('/').next().unwrap().to_owned();
    let app = TestApp::spawn_with(config, Backend::Postgres).await;
    let body = json_body(app.get("/readyz").send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(body["components"]["database"], "up");
    let token = app.admin_token().await;

    let mut admin = sqlx::PgConnection::connect(&pg_admin_url()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {name} ALLOW_CONNECTIONS false"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&name)
        .execute(&mut admin)
        .await
        .unwrap();
    (app, token, name)
}

/// Gives the database back (so that nothing lingers in a refusing state).
async fn give_database_back(name: &str) {
    use scaleshop_db::sqlx::{self, Connection};
    let mut admin = sqlx::PgConnection::connect(&pg_admin_url()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {name} ALLOW_CONNECTIONS true"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
}

/// Readiness when the database refuses connections: a 503 that still carries the
/// readiness body (which component is down), while liveness stays 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_with_components_when_the_database_is_down() {
    let (app, _token, name) = app_losing_its_database().await;
    let mut answer = None;
    for _ in 0..100 {
        let response = app.get("/readyz").send().await.unwrap();
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            answer = Some(response);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let response = answer.expect("readyz turns 503 when the database is gone");
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    // Liveness does not depend on the database.
    assert_eq!(
        json_body(app.get("/healthz").send().await.unwrap(), StatusCode::OK).await,
        json!({"status": "ok"})
    );
    give_database_back(&name).await;
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    assert_eq!(body["status"], "unavailable", "{body}");
    assert_eq!(body["components"]["database"], "down", "{body}");
    assert_eq!(body["components"]["replicas"], "disabled", "{body}");
}

/// Requests that need a database that refuses connections: a 503 problem with
/// Retry-After (try again later), never a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_503_when_the_database_refuses_connections() {
    let (app, token, name) = app_losing_its_database().await;
    let me = app.get("/v1/me").bearer_auth(&token).send().await.unwrap();
    let me_status = me.status().as_u16();
    let me_retry = me.headers().contains_key("retry-after");
    let me_body = me.text().await.unwrap();
    let sign_in = app
        .post("/v1/sessions")
        .json(&json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}))
        .send()
        .await
        .unwrap();
    let sign_in_status = sign_in.status().as_u16();
    give_database_back(&name).await;
    assert_eq!(me_status, 503, "GET /v1/me: {me_body}");
    assert!(me_retry, "Retry-After");
    assert_eq!(sign_in_status, 503, "POST /v1/sessions");
}

/// `db_max_connections = 1` is a valid setting: the app must still serve requests
/// with it (slowly, one at a time), not starve every request of a connection.
async fn one_connection_pool_still_serves(backend: Backend) {
    let mut config = test_config(backend).await;
    config.db_max_connections = 1;
    config.db_min_connections = 1;
    let app = TestApp::spawn_with(config, backend).await;
    let body = json_body(app.get("/readyz").send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(body["components"]["database"], "up");
    let (user, token) = app.customer("single@example.com").await;
    let me = json_body(
        app.get("/v1/me").bearer_auth(&token).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(me, user);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_pool_still_serves_sqlite() {
    one_connection_pool_still_serves(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_pool_still_serves_postgres() {
    one_connection_pool_still_serves(Backend::Postgres).await;
}

/// The metric lines (not comments) that contain every one of `parts`.
fn series<'a>(text: &'a str, parts: &[&str]) -> Vec<&'a str> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| parts.iter().all(|p| line.contains(p)))
        .collect()
}

both!(
    metrics_use_route_templates,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let token = app.admin_token().await;
        let raw = Uuid::now_v7().to_string();
        let unmatched = Uuid::now_v7().to_string();
        let response = app
            .get(&format!("/v1/users/{raw}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404);
        let response = app.get(&format!("/v1/users/{raw}")).send().await.unwrap();
        assert_eq!(response.status(), 401);
        let response = app
            .get(&format!("/no/such/route/{unmatched}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404);
        // Routes outside the OpenAPI document (the documentation's own) keep their
        // templates too, and a wrong method keeps the route's template.
        for path in ["/openapi.json", "/docs/", "/docs/swagger-ui.css"] {
            let response = app.get(path).send().await.unwrap();
            assert_eq!(response.status(), 200, "{path}");
        }
        let response = app.client.delete(app.url("/healthz")).send().await.unwrap();
        assert_eq!(response.status(), 405);

        let response = app.get("/metrics").send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
        let text = response.text().await.unwrap();
        assert!(
            text.contains("# TYPE http_request_duration_seconds histogram"),
            "{text}"
        );
        for status in ["404", "401"] {
            let status_label = format!("status=\"{status}\"");
            let lines = series(
                &text,
                &[
                    "http_request_duration_seconds_count",
                    "route=\"/v1/users/{id}\"",
                    "method=\"GET\"",
                    &status_label,
                ],
            );
            assert_eq!(lines.len(), 1, "{status}: {lines:?}");
            assert!(
                !series(
                    &text,
                    &[
                        "http_request_duration_seconds_bucket",
                        "route=\"/v1/users/{id}\"",
                        &status_label,
                        "le=\"+Inf\""
                    ]
                )
                .is_empty()
            );
        }
        assert!(
            !series(
                &text,
                &[
                    "http_request_duration_seconds_count",
                    "route=\"unmatched\"",
                    "status=\"404\""
                ]
            )
            .is_empty(),
            "{text}"
        );
        for (route, status) in [
            ("/openapi.json", "200"),
            ("/docs/", "200"),
            ("/docs/{*rest}", "200"),
            ("/healthz", "405"),
        ] {
            let route_label = format!("route=\"{route}\"");
            let status_label = format!("status=\"{status}\"");
            assert!(
                !series(
                    &text,
                    &[
                        "http_request_duration_seconds_count",
                        &route_label,
                        &status_label
                    ]
                )
                .is_empty(),
                "{route} {status}: {text}"
            );
        }
        // Never the raw path.
        assert!(!text.contains(&raw), "raw id in /metrics");
        assert!(!text.contains(&unmatched), "raw unmatched path in /metrics");
        assert!(!text.contains("/no/such/route"));
        // Pool gauges.
        for state in ["idle", "in_use"] {
            let lines = series(
                &text,
                &["db_pool_connections{", &format!("state=\"{state}\"")],
            );
            assert!(!lines.is_empty(), "db_pool_connections {state}: {text}");
            for line in lines {
                let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
                assert!(value >= 0.0, "{line}");
            }
        }
        assert!(text.contains("# TYPE db_pool_connections gauge"));
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_documents_every_route() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let doc: Value = json_body(
        app.get("/openapi.json").send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    let version = doc["openapi"].as_str().unwrap();
    assert!(version.starts_with("3.1."), "{version}");
    assert!(doc["info"]["title"].is_string());
    for (path, methods) in [
        ("/v1/users", &["post", "get"][..]),
        ("/v1/users/{id}", &["get", "patch"]),
        ("/v1/sessions", &["post"]),
        ("/v1/me", &["get"]),
        ("/v1/events", &["get"]),
        ("/healthz", &["get"]),
        ("/readyz", &["get"]),
        ("/metrics", &["get"]),
    ] {
        let item = &doc["paths"][path];
        assert!(item.is_object(), "no path {path}");
        for method in methods {
            assert!(item[method].is_object(), "no {method} {path}");
        }
    }
    // The statuses the contract names for the users routes are documented.
    for (path, method, statuses) in [
        ("/v1/users", "post", &["201", "409", "422"][..]),
        ("/v1/sessions", "post", &["201", "401"]),
        ("/v1/users/{id}", "get", &["200", "404"]),
        ("/v1/users/{id}", "patch", &["200", "409", "422"]),
        ("/v1/users", "get", &["200"]),
        ("/v1/me", "get", &["200", "401"]),
    ] {
        for status in statuses {
            assert!(
                doc["paths"][path][method]["responses"][status].is_object(),
                "{method} {path} {status}"
            );
        }
    }
    assert!(doc["components"]["securitySchemes"].is_object());
}

/// The `http(s)://host` origins a text mentions.
fn origins(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for scheme in ["http://", "https://"] {
        let mut rest = text;
        while let Some(at) = rest.find(scheme) {
            let after = &rest[at + scheme.len()..];
            let host: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(*c))
                .collect();
            found.push(host);
            rest = after;
        }
    }
    found
}

/// The values of `attr="..."` in an HTML page.
fn attribute_values(html: &str, attr: &str) -> Vec<String> {
    let needle = format!("{attr}=\"");
    let mut values = Vec::new();
    let mut rest = html;
    while let Some(at) = rest.find(&needle) {
        let after = &rest[at + needle.len()..];
        let end = after.find('"').unwrap_or(after.len());
        values.push(after[..end].to_owned());
        rest = &after[end..];
    }
    values
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docs_page_works_offline() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let own_host = app.base.trim_start_matches("http://").to_owned();
    let mut path = "/docs".to_owned();
    let mut page = None;
    for _ in 0..5 {
        let response = app.get(&path).send().await.unwrap();
        if response.status().is_redirection() {
            let location = response.headers()["location"].to_str().unwrap().to_owned();
            path = match location.strip_prefix(&app.base) {
                Some(rest) => rest.to_owned(),
                None => {
                    assert!(location.starts_with('/'), "redirect off-site: {location}");
                    location
                }
            };
            continue;
        }
        assert_eq!(response.status(), 200, "{path}");
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(content_type.starts_with("text/html"), "{content_type}");
        page = Some(response.text().await.unwrap());
        break;
    }
    let html = page.expect("docs page after redirects");
    assert!(html.to_lowercase().contains("<html"), "{html}");
    for host in origins(&html) {
        assert_eq!(host, own_host, "the page references {host}");
    }
    // Every asset it loads is served by the app itself.
    let base_dir = if path.ends_with('/') {
        path.clone()
    } else {
        format!("{}/", path.rsplit_once('/').unwrap().0)
    };
    let mut assets = attribute_values(&html, "src");
    assets.extend(
        attribute_values(&html, "href")
            .into_iter()
            .filter(|h| !h.starts_with('#')),
    );
    assert!(!assets.is_empty(), "{html}");
    for asset in assets {
        let asset_path = if asset.starts_with('/') {
            asset.clone()
        } else {
            format!("{base_dir}{}", asset.trim_start_matches("./"))
        };
        let response = app.get(&asset_path).send().await.unwrap();
        assert_eq!(response.status(), 200, "{asset_path}");
        let body = response.text().await.unwrap();
        assert!(!body.is_empty(), "{asset_path}");
        if asset_path.ends_with("swagger-initializer.js") {
            assert!(body.contains("/openapi.json"), "{body}");
            for host in origins(&body) {
                assert_eq!(host, own_host, "{asset_path} references {host}");
            }
        }
    }
}

/// The storefront and the console are served by the app (every process), work
/// offline (every file they load is the app's own), and are not API routes: no
/// entry in the API document, and a route label of their own template.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storefront_and_console_are_served_offline_under_a_content_security_policy() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let own_host = app.base.trim_start_matches("http://").to_owned();
    for path in [
        "/",
        "/cart",
        "/orders/0190a8e4-0000-7000-8000-000000000000",
        "/console",
    ] {
        let response = app.get(path).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "text/html; charset=utf-8"
        );
        let csp = response.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
            "{csp}"
        );
        assert!(response.headers().contains_key("x-request-id"), "{path}");
        let html = response.text().await.unwrap();
        for host in origins(&html) {
            assert_eq!(host, own_host, "{path} references {host}");
        }
        let mut assets = attribute_values(&html, "src");
        assets.extend(
            attribute_values(&html, "href")
                .into_iter()
                .filter(|h| h.starts_with("/assets/")),
        );
        assert!(assets.iter().any(|a| a.ends_with(".js")), "{html}");
        for asset in assets {
            let response = app.get(&asset).send().await.unwrap();
            assert_eq!(response.status(), 200, "{asset}");
            let etag = response.headers()["etag"].clone();
            let again = app
                .get(&asset)
                .header("if-none-match", etag)
                .send()
                .await
                .unwrap();
            assert_eq!(again.status(), 304, "{asset}");
        }
    }
    let openapi = app.get("/openapi.json").send().await.unwrap();
    let document: serde_json::Value = openapi.json().await.unwrap();
    let paths = document["paths"].as_object().unwrap();
    assert!(
        !paths.contains_key("/") && !paths.contains_key("/console"),
        "pages are not API routes"
    );
    let labelled = app
        .metric(
            "http_request_duration_seconds_count",
            &["route=\"/orders/{id}\""],
        )
        .await;
    assert_eq!(labelled, 1.0, "a page is labelled by its template");
}

/// Readiness asks the database on a connection of its own: a pool whose every
/// connection is busy is a database at work, not one that is down (else a burst
/// of load would take every instance out of the gateway at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_probe_answers_while_every_pooled_connection_is_busy() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let (url, dir) = scaleshop_testkit::fresh(backend).await;
        let settings = scaleshop_db::PoolSettings {
            max_connections: 1,
            min_connections: 0,
            acquire_timeout: std::time::Duration::from_secs(3),
            ..scaleshop_db::PoolSettings::default()
        };
        let db = scaleshop_db::Database::connect(url.as_deref(), &dir, &settings)
            .await
            .unwrap();
        let held = db.begin().await.unwrap();
        assert!(
            db.ping(std::time::Duration::from_secs(1)).await,
            "{backend:?}: the probe waited for the busy pool"
        );
        held.rollback().await.unwrap();
        db.close().await;
    }
}
