//! Signing keys shared through the database: two processes on one PostgreSQL with
//! no `jwt_secret` verify each other's session tokens, cursors and consistency
//! tokens, before and after `scaleshop keys rotate`; forged key ids are refused.

use std::process::Command;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use scaleshop_db::sqlx::{self, Connection};
use scaleshop_testkit::{Backend, both, fixture};
use serde_json::{Value, json};

use crate::process::{Deployment, Server, eventually};

/// The `kid` in a JWT's header.
fn kid(token: &str) -> String {
    let header = token.split('.').next().expect("header");
    let header: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).expect("base64")).expect("json");
    header["kid"].as_str().expect("kid").to_owned()
}

/// `scaleshop keys ...` with the deployment's configuration; (status, stdout, stderr).
fn keys_command(deployment: &Deployment, args: &[&str]) -> (bool, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_scaleshop"));
    command
        .arg("keys")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SCALESHOP_DATA_DIR", &deployment.data_dir)
        .env("SCALESHOP_LOG_FILTER", "warn");
    if let Some(url) = &deployment.database_url {
        command.env("SCALESHOP_DATABASE_URL", url);
    }
    if let Some(secret) = &deployment.jwt_secret {
        command.env("SCALESHOP_JWT_SECRET", secret);
    }
    let out = command.output().expect("run scaleshop keys");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn status(
    server: &Server,
    path: &str,
    token: Option<&str>,
    consistency: Option<&str>,
) -> u16 {
    let mut request = server.client.get(server.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(consistency) = consistency {
        request = request.header("x-consistency-token", consistency);
    }
    request.send().await.expect("request").status().as_u16()
}

/// A product made by the admin; its id and the write's consistency token.
async fn create_product(server: &Server, token: &str, sku: &str) -> (String, String) {
    let response = server
        .client
        .post(server.url("/v1/products"))
        .bearer_auth(token)
        .json(
            &json!({"sku": sku, "name": format!("Product {sku}"), "price_cents": 1200,
                      "currency": "EUR", "initial_stock": 3}),
        )
        .send()
        .await
        .expect("create product");
    assert_eq!(response.status(), 201);
    let consistency = response.headers()["x-consistency-token"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let product: Value = response.json().await.expect("product");
    (product["id"].as_str().expect("id").to_owned(), consistency)
}

/// A page of one product: its status and body.
async fn products_page(server: &Server, cursor: Option<&str>) -> (u16, Value) {
    let mut path = "/v1/products?limit=1".to_owned();
    if let Some(cursor) = cursor {
        path.push_str(&format!("&cursor={cursor}"));
    }
    let response = server
        .client
        .get(server.url(&path))
        .send()
        .await
        .expect("list");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The `next_cursor` of the first page.
async fn first_cursor(server: &Server) -> String {
    let (status, page) = products_page(server, None).await;
    assert_eq!(status, 200);
    page["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned()
}

/// The second page, read with `cursor`: its status and the product ids on it.
async fn second_page(server: &Server, cursor: &str) -> (u16, Vec<String>) {
    let (status, page) = products_page(server, Some(cursor)).await;
    let ids = page["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|p| p["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    (status, ids)
}

/// Every way a value can name a key nobody has: 401 for a token, 400 for a cursor
/// or a consistency token.
async fn forged_key_ids_are_refused(
    server: &Server,
    token: &str,
    cursor: &str,
    consistency: &str,
    product: &str,
) {
    let unknown = "0123456789abcdef";
    let (_, claims_and_signature) = token.split_once('.').expect("jwt");
    let header = URL_SAFE_NO_PAD
        .encode(format!(r#"{{"alg":"HS256","typ":"JWT","kid":"{unknown}"}}"#).as_bytes());
    let forged_token = format!("{header}.{claims_and_signature}");
    assert_eq!(
        status(server, "/v1/me", Some(&forged_token), None).await,
        401
    );
    let swap = |value: &str| format!("{unknown}.{}", value.split_once('.').expect("kid").1);
    assert_eq!(second_page(server, &swap(cursor)).await.0, 400);
    assert_eq!(
        status(server, product, None, Some(&swap(consistency))).await,
        400
    );
}

async fn signing_keys(url: &str) -> Vec<(String, Vec<u8>)> {
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    sqlx::query_as("SELECT kid, secret FROM signing_keys ORDER BY generation")
        .fetch_all(&mut conn)
        .await
        .expect("keys")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_keys_and_survive_a_rotation_postgres() {
    let mut deployment_a = Deployment::fresh(Backend::Postgres).await;
    deployment_a.jwt_secret = None;
    // A reloads its keys every second; B only when it meets a key it does not know.
    deployment_a.set("SCALESHOP_KEY_REFRESH_SECS", "1");
    let mut deployment_b = deployment_a.clone();
    deployment_b.data_dir = scaleshop_testkit::temp_dir("keys-b");
    deployment_b.set("SCALESHOP_KEY_REFRESH_SECS", "3600");
    let url = deployment_a.database_url.clone().expect("postgres url");

    // Both start at once on an empty database: one key results.
    let (a, b) = {
        let (da, db) = (deployment_a.clone(), deployment_b.clone());
        let a = tokio::spawn(async move { da.start().await });
        let b = tokio::spawn(async move { db.start().await });
        (a.await.expect("start a"), b.await.expect("start b"))
    };
    let keys = signing_keys(&url).await;
    assert_eq!(keys.len(), 1, "one key after two concurrent first starts");
    let first_kid = keys[0].0.clone();

    // Made on A, used on B: a session, a cursor, a consistency token.
    let token = a.admin_token().await;
    assert_eq!(kid(&token), first_kid);
    assert_eq!(status(&b, "/v1/me", Some(&token), None).await, 200);
    let (first_id, _) = create_product(&a, &token, "KEY-1").await;
    let (second_id, consistency) = create_product(&a, &token, "KEY-2").await;
    let cursor = first_cursor(&a).await;
    assert!(cursor.starts_with(&format!("{first_kid}.")), "{cursor}");
    let (code, ids) = second_page(&b, &cursor).await;
    assert_eq!(code, 200);
    assert_eq!(ids.len(), 1);
    assert!(ids[0] == first_id || ids[0] == second_id);
    let path = format!("/v1/products/{second_id}");
    assert_eq!(status(&b, &path, None, Some(&consistency)).await, 200);
    // And the other way round.
    let token_b = b.admin_token().await;
    assert_eq!(status(&a, "/v1/me", Some(&token_b), None).await, 200);
    forged_key_ids_are_refused(&b, &token, &cursor, &consistency, &path).await;
    forged_key_ids_are_refused(&a, &token, &cursor, &consistency, &path).await;

    // Rotate while both run.
    let (ok, out, err) = keys_command(&deployment_a, &["rotate"]);
    assert!(ok, "keys rotate failed: {err}");
    let keys = signing_keys(&url).await;
    assert_eq!(keys.len(), 2);
    let new_kid = keys[1].0.clone();
    assert!(out.contains(&new_kid), "{out}");

    // What the old key signed keeps verifying on both.
    for server in [&a, &b] {
        assert_eq!(status(server, "/v1/me", Some(&token), None).await, 200);
        assert_eq!(second_page(server, &cursor).await.0, 200);
        assert_eq!(status(server, &path, None, Some(&consistency)).await, 200);
    }

    // A picks the new key up on its own; what it signs now names the new key and
    // verifies on B, which learns the key from the first value that names it.
    let new_token = eventually(Duration::from_secs(20), || async {
        let token = a.admin_token().await;
        (kid(&token) == new_kid).then_some(token)
    })
    .await;
    assert_eq!(status(&b, "/v1/me", Some(&new_token), None).await, 200);
    assert_eq!(status(&a, "/v1/me", Some(&new_token), None).await, 200);
    let new_cursor = first_cursor(&a).await;
    assert!(
        new_cursor.starts_with(&format!("{new_kid}.")),
        "{new_cursor}"
    );
    assert_eq!(second_page(&b, &new_cursor).await.0, 200);
    let (third_id, new_consistency) = create_product(&a, &new_token, "KEY-3").await;
    assert!(new_consistency.starts_with(&format!("{new_kid}.")));
    let third = format!("/v1/products/{third_id}");
    assert_eq!(status(&b, &third, None, Some(&new_consistency)).await, 200);
    // Having learnt it, B signs with the new key too.
    let token_b = b.admin_token().await;
    assert_eq!(kid(&token_b), new_kid);
    assert_eq!(status(&a, "/v1/me", Some(&token_b), None).await, 200);
    forged_key_ids_are_refused(&b, &new_token, &new_cursor, &new_consistency, &third).await;

    // `keys list`: both keys, the new one active, no secret.
    let (ok, out, err) = keys_command(&deployment_a, &["list"]);
    assert!(ok, "keys list failed: {err}");
    assert!(out.contains(&first_kid) && out.contains(&new_kid), "{out}");
    let active: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_end().ends_with("yes"))
        .collect();
    assert!(
        active.len() == 1 && active[0].starts_with(&new_kid),
        "{out}"
    );
    for (_, secret) in signing_keys(&url).await {
        assert!(!out.contains(&hex_of(&secret)), "a secret in the listing");
    }
    drop(a);
    drop(b);
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

both!(
    the_keys_command_rotates_and_lists,
    |backend: Backend| async move {
        let mut deployment = Deployment::fresh(backend).await;
        deployment.jwt_secret = None;
        let (ok, out, err) = keys_command(&deployment, &["list"]);
        assert!(ok, "{err}");
        // The header and the first key, made on first use.
        assert_eq!(out.lines().count(), 2, "{out}");
        let (ok, out, err) = keys_command(&deployment, &["rotate"]);
        assert!(ok && out.starts_with("rotated: "), "{out} {err}");
        let (ok, out, _) = keys_command(&deployment, &["list"]);
        assert!(ok);
        assert_eq!(out.lines().count(), 3, "{out}");
        assert_eq!(
            out.lines().filter(|l| l.ends_with("yes")).count(),
            1,
            "{out}"
        );

        // With a static secret configured the key store is not used: refused.
        deployment.jwt_secret = Some("a-static-secret-that-is-long-enough-0000".to_owned());
        let (ok, _, err) = keys_command(&deployment, &["rotate"]);
        assert!(!ok);
        assert!(err.contains("jwt_secret"), "{err}");
        assert!(!err.contains("a-static-secret"), "{err}");
    }
);
