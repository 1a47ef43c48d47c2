//! The conventions of api.md that hold on every route: bodies, media types, size
//! limits, problem documents, request ids, read-your-writes tokens, rate limits and
//! the answer to an exhausted connection pool.

use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::helpers::*;
use crate::lifecycle::{Manual, header_of, read_response};
use crate::users::{get_as, id_of, json_body, patch_as, user};

/// What no error body may contain.
const LEAKS: &[&str] = &[
    "SELECT",
    "INSERT",
    "sqlx",
    "sqlite",
    "postgres",
    "/src/",
    "panicked",
    "argon2",
    "stack backtrace",
    "127.0.0.1",
];

/// Asserts a problem document that leaks nothing; returns it.
async fn clean_problem(response: Response, status: u16) -> Value {
    let body = problem(response, status).await;
    let text = body.to_string();
    for leak in LEAKS {
        assert!(!text.contains(leak), "{leak:?} in {text}");
    }
    body
}

async fn send_raw(
    app: &TestApp,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Response {
    let mut request = app.request(method, path).body(body);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    request.send().await.unwrap()
}

const JSON: Option<&str> = Some("application/json");

both!(
    malformed_json_is_a_400_problem,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let (me, token) = app.customer("malformed@example.com").await;
        for body in [
            &b"{\"email\":"[..],
            b"{email: 'x'}",
            b"",
            b"{\"email\": \"a@b.co\"} trailing",
            b"\xff\xfe",
            b"{\"name\": \"\\ud800\"",
        ] {
            for path in ["/v1/users", "/v1/sessions"] {
                let response = send_raw(&app, Method::POST, path, JSON, body.to_vec()).await;
                clean_problem(response, 400).await;
            }
            let response = app
                .patch(&format!("/v1/users/{}", id_of(&me)))
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body(body.to_vec())
                .send()
                .await
                .unwrap();
            clean_problem(response, 400).await;
        }
        // Deeply nested JSON is refused as malformed, not by a crash.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let response = send_raw(&app, Method::POST, "/v1/users", JSON, deep.into_bytes()).await;
        clean_problem(response, 400).await;
    }
);

both!(
    json_that_is_not_an_object_is_a_422,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        for body in [
            "[]",
            "[{\"email\": \"a@example.com\"}]",
            "\"text\"",
            "null",
            "42",
            "true",
        ] {
            let response = send_raw(&app, Method::POST, "/v1/users", JSON, body.into()).await;
            clean_problem(response, 422).await;
            let response = send_raw(&app, Method::POST, "/v1/sessions", JSON, body.into()).await;
            clean_problem(response, 422).await;
        }
    }
);

both!(
    other_media_types_are_a_415,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let body =
            json!({"email": "media@example.com", "name": "Media", "password": "password-123"})
                .to_string()
                .into_bytes();
        for content_type in [
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            Some("application/xml"),
            Some("multipart/form-data; boundary=x"),
            None,
        ] {
            let response =
                send_raw(&app, Method::POST, "/v1/users", content_type, body.clone()).await;
            clean_problem(response, 415).await;
            let response = send_raw(
                &app,
                Method::POST,
                "/v1/sessions",
                content_type,
                body.clone(),
            )
            .await;
            clean_problem(response, 415).await;
        }
        // Nothing was created by the refused requests; JSON with parameters is fine.
        let response = send_raw(
            &app,
            Method::POST,
            "/v1/users",
            Some("application/json; charset=utf-8"),
            body,
        )
        .await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
);

/// One request over a raw connection (so that the client reads the answer even when
/// the server answers before reading the whole body); returns (head, problem).
async fn raw_exchange(app: &TestApp, head: String, body: &[u8]) -> (String, Value) {
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let (head, body) = read_response(&mut stream).await;
    let problem: Value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body)));
    (head, problem)
}

fn assert_raw_413(head: &str, body: &Value) {
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(
        header_of(head, "content-type")
            .unwrap_or_default()
            .starts_with("application/problem+json"),
        "{head}"
    );
    assert!(header_of(head, "x-request-id").is_some(), "{head}");
    assert_eq!(body["status"], 413, "{body}");
    assert!(
        body["type"].is_string() && body["title"].is_string(),
        "{body}"
    );
}

both!(
    bodies_over_one_mebibyte_are_a_413,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        const MIB: usize = 1024 * 1024;
        /// A JSON object of exactly `len` bytes with one unknown field.
        fn object_of(len: usize) -> Vec<u8> {
            let head = b"{\"padding\":\"";
            let tail = b"\"}";
            let mut body = head.to_vec();
            body.resize(len - tail.len(), b'x');
            body.extend_from_slice(tail);
            assert_eq!(body.len(), len);
            body
        }
        let addr = app.base.trim_start_matches("http://").to_owned();

        // Exactly 1 MiB is read (and refused for its unknown field).
        let response = send_raw(&app, Method::POST, "/v1/users", JSON, object_of(MIB)).await;
        clean_problem(response, 422).await;

        // Over 1 MiB by Content-Length: refused once the limit is passed (the client
        // stops sending right there, so it reads the whole answer).
        let oversized = object_of(MIB + 1);
        for (path, declared) in [
            ("/v1/users", MIB + 1),
            ("/v1/users", 50 * MIB),
            ("/v1/sessions", MIB + 1),
        ] {
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {declared}\r\n\r\n"
            );
            let (head, body) = raw_exchange(&app, head, &oversized).await;
            assert_raw_413(&head, &body);
        }
        // Over 1 MiB without a length (chunked): refused once the limit is passed.
        let head = format!(
            "POST /v1/users HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            oversized.len()
        );
        let (head, body) = raw_exchange(&app, head, &oversized).await;
        assert_raw_413(&head, &body);

        // The server still answers afterwards.
        assert_eq!(app.get("/healthz").send().await.unwrap().status(), 200);
    }
);

both!(
    unknown_routes_are_a_404_problem,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let token = app.admin_token().await;
        for (method, path) in [
            (Method::GET, "/nope"),
            (Method::GET, "/v1/nope"),
            (Method::GET, "/v2/users"),
            (Method::POST, "/v1/unknown"),
            (
                Method::GET,
                "/v1/users/00000000-0000-0000-0000-000000000000/orders/x",
            ),
            (Method::DELETE, "/v1/nothing/here"),
        ] {
            let response = app
                .request(method.clone(), path)
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            clean_problem(response, 404).await;
            let response = app.request(method, path).send().await.unwrap();
            clean_problem(response, 404).await;
        }
    }
);

both!(
    wrong_methods_are_a_405_problem,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let token = app.admin_token().await;
        for (method, path, allowed) in [
            (Method::DELETE, "/v1/me", "GET"),
            (Method::POST, "/v1/me", "GET"),
            (Method::PUT, "/v1/users", "POST"),
            (Method::DELETE, "/v1/users", "GET"),
            (Method::GET, "/v1/sessions", "POST"),
            (Method::POST, "/healthz", "GET"),
        ] {
            let response = app
                .request(method.clone(), path)
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            let allow = response
                .headers()
                .get("allow")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            assert!(allow.contains(allowed), "{method} {path}: Allow {allow:?}");
            clean_problem(response, 405).await;
        }
    }
);

fn request_id(response: &Response) -> String {
    response
        .headers()
        .get("x-request-id")
        .expect("X-Request-Id")
        .to_str()
        .unwrap()
        .to_owned()
}

both!(
    request_ids_are_echoed_or_made,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let (me, token) = app.customer("ids@example.com").await;
        let me_path = format!("/v1/users/{}", id_of(&me));
        let requests = || {
            vec![
                ("healthz", app.get("/healthz"), 200),
                ("me", app.get("/v1/me").bearer_auth(&token), 200),
                ("read", app.get(&me_path).bearer_auth(&token), 200),
                (
                    "sign-up",
                    app.post("/v1/users").json(&json!({
                    "email": format!("{}@example.com", uuid::Uuid::now_v7().simple()),
                    "name": "Id", "password": "password-123"})),
                    201,
                ),
                ("unknown route", app.get("/v1/nope"), 404),
                ("no token", app.get("/v1/me"), 401),
                ("forbidden", app.get("/v1/events").bearer_auth(&token), 403),
                ("405", app.request(Method::DELETE, "/v1/me"), 405),
                ("422", app.post("/v1/users").json(&json!({})), 422),
                (
                    "400",
                    app.post("/v1/users")
                        .header("content-type", "application/json")
                        .body("{"),
                    400,
                ),
            ]
        };
        for (what, request, status) in requests() {
            let response = request
                .header("x-request-id", "client-id-42.abc")
                .send()
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), status, "{what}");
            assert_eq!(request_id(&response), "client-id-42.abc", "{what}");
        }
        let mut made = Vec::new();
        for (what, request, status) in requests() {
            let response = request.send().await.unwrap();
            assert_eq!(response.status().as_u16(), status, "{what}");
            let id = request_id(&response);
            assert!(!id.trim().is_empty(), "{what}");
            made.push(id);
        }
        let mut unique = made.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), made.len(), "a new id per request: {made:?}");
    }
);

both!(
    consistency_tokens_on_writes_and_back_on_reads,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let consistency = |r: &Response| {
            let value = r
                .headers()
                .get("x-consistency-token")
                .expect("X-Consistency-Token on a write")
                .to_str()
                .unwrap()
                .to_owned();
            assert!(!value.is_empty());
            value
        };
        let response = app
            .post("/v1/users")
            .json(&json!({"email": "ryw@example.com", "name": "Ryw", "password": "password-123"}))
            .send()
            .await
            .unwrap();
        let after_sign_up = consistency(&response);
        let me = json_body(response, StatusCode::CREATED).await;
        let response = app
            .post("/v1/sessions")
            .json(&json!({"email": "ryw@example.com", "password": "password-123"}))
            .send()
            .await
            .unwrap();
        let after_sign_in = consistency(&response);
        let token = json_body(response, StatusCode::CREATED).await["token"]
            .as_str()
            .unwrap()
            .to_owned();
        let response = patch_as(
            &app,
            &id_of(&me),
            &token,
            json!({"name": "Read Your Writes"}),
        )
        .await;
        let after_patch = consistency(&response);
        json_body(response, StatusCode::OK).await;

        let me_path = format!("/v1/users/{}", id_of(&me));
        for sent in [&after_sign_up, &after_sign_in, &after_patch] {
            for path in ["/v1/me", me_path.as_str()] {
                let response = app
                    .get(path)
                    .bearer_auth(&token)
                    .header("x-consistency-token", sent)
                    .send()
                    .await
                    .unwrap();
                let body = json_body(response, StatusCode::OK).await;
                assert_eq!(body["name"], "Read Your Writes");
            }
        }

        // Forged, corrupted or foreign tokens are a 400.
        let admin = app.admin_token().await;
        let cursor = json_body(
            get_as(&app, "/v1/events?limit=1", &admin).await,
            StatusCode::OK,
        )
        .await["next_cursor"]
            .as_str()
            .unwrap()
            .to_owned();
        let (payload, mac) = after_patch.split_once('.').unwrap();
        let foreign = scaleshop_web::Signer::new(b"some other secret entirely", "opaque")
            .sign("consistency", br#"{"t":1}"#);
        let forged = [
            "garbage".to_owned(),
            "x.y".to_owned(),
            format!(
                "{payload}.{}{}",
                if mac.starts_with('A') { "B" } else { "A" },
                &mac[1..]
            ),
            format!("{}.{mac}", crate::users::b64url(br#"{"t":1}"#)),
            cursor,
            foreign,
            token.clone(),
        ];
        for bad in forged {
            for path in ["/v1/me", me_path.as_str()] {
                let response = app
                    .get(path)
                    .bearer_auth(&token)
                    .header("x-consistency-token", &bad)
                    .send()
                    .await
                    .unwrap();
                clean_problem(response, 400).await;
            }
        }
    }
);

both!(
    errors_never_leak_internals_or_answer_500,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let (me, token) = app.customer("hostile@example.com").await;
        let id = id_of(&me);
        // Hostile but well-formed input: every answer is below 500 and leaks nothing.
        let long = "x".repeat(20_000);
        let nul_name =
            json!({"email": "nul@example.com", "name": "a\u{0}b", "password": "password-123"});
        let nul_email =
            json!({"email": "n\u{0}l@example.com", "name": "Nul", "password": "password-123"});
        // (A NUL in the search text has its own test: users::search_text_with_a_nul.)
        let requests = vec![
            app.get("/v1/users")
                .query(&[("q", long.as_str())])
                .bearer_auth(&admin),
            app.get("/v1/users")
                .query(&[("q", "'; DROP TABLE users; --")])
                .bearer_auth(&admin),
            app.get("/v1/users")
                .query(&[("q", "\u{FFFD}\u{1F600}")])
                .bearer_auth(&admin),
            app.get("/v1/users?q=%FF%FE").bearer_auth(&admin),
            app.get("/v1/users?q=a&q=b").bearer_auth(&admin),
            app.get("/v1/users?limit=1&limit=2").bearer_auth(&admin),
            app.get("/v1/users/%00").bearer_auth(&admin),
            app.post("/v1/users").json(&nul_name),
            app.post("/v1/users").json(&nul_email),
            app.post("/v1/users")
                .json(&json!({"email": long, "name": long, "password": long})),
            app.post("/v1/users")
                .json(&json!({"email": 1e308, "name": -0, "password": {"a": [1, 2]}})),
            app.post("/v1/sessions")
                .json(&json!({"email": "n\u{0}l@example.com", "password": "a\u{0}"})),
            app.post("/v1/sessions")
                .json(&json!({"email": long, "password": long})),
            app.patch(&format!("/v1/users/{id}"))
                .bearer_auth(&token)
                .json(&json!({"name": "a\u{0}b"})),
            app.patch(&format!("/v1/users/{id}"))
                .bearer_auth(&token)
                .json(&json!({"email": "n\u{0}l@example.com"})),
            app.get("/v1/me")
                .header("authorization", format!("Bearer {long}")),
            app.get("/v1/events?cursor=%00.%00").bearer_auth(&admin),
            app.get("/v1/me")
                .bearer_auth(&token)
                .header("x-consistency-token", "%00"),
        ];
        for (i, request) in requests.into_iter().enumerate() {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            assert!(
                status < 500,
                "request #{i}: {status}: {}",
                response.text().await.unwrap()
            );
            if status >= 400 {
                clean_problem(response, status).await;
            }
        }
        // A user with a NUL in the password is fine: it is hashed, never stored.
        let created = user(&app, "nul.password@example.com", "Nul Password").await;
        let response = patch_as(
            &app,
            &id_of(&created),
            &admin,
            json!({"password": "pass\u{0}word"}),
        )
        .await;
        assert_eq!(response.status(), 200);
        app.sign_in("nul.password@example.com", "pass\u{0}word")
            .await;

        // And the ordinary error answers leak nothing either.
        let response = app
            .post("/v1/users")
            .json(
                &json!({"email": "hostile@example.com", "name": "Dup", "password": "password-123"}),
            )
            .send()
            .await
            .unwrap();
        clean_problem(response, 409).await;
        let response = patch_as(
            &app,
            &id,
            &token,
            json!({"email": ADMIN_EMAIL, "current_password": "password-123"}),
        )
        .await;
        clean_problem(response, 409).await;
        clean_problem(get_as(&app, "/v1/users", &token).await, 403).await;
        clean_problem(get_as(&app, "/v1/me", "x").await, 401).await;
    }
);

/// A failed sign-in.
async fn wrong_sign_in(app: &TestApp, email: &str) -> Response {
    app.post("/v1/sessions")
        .json(&json!({"email": email, "password": "wrong-password"}))
        .send()
        .await
        .unwrap()
}

pub(crate) fn retry_after(response: &Response) -> u64 {
    let value = response
        .headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap();
    let seconds: u64 = value
        .parse()
        .unwrap_or_else(|_| panic!("integer seconds: {value:?}"));
    assert!(seconds >= 1, "Retry-After {seconds}");
    seconds
}

both!(
    sign_in_is_rate_limited_per_email,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        // Created without signing in, so that no attempt is spent yet.
        user(&app, "victim@example.com", "Victim").await;
        // Eleven failed attempts at once (the limit refills one attempt every six
        // seconds, so a burst is what "more than 10 within a minute" means
        // whatever the machine's speed). Letter case does not make a new key.
        let burst_started = std::time::Instant::now();
        let attempts = (0..11).map(|i| {
            let email = if i % 2 == 0 {
                "victim@example.com"
            } else {
                "VICTIM@Example.com"
            };
            wrong_sign_in(&app, email)
        });
        let responses = futures::future::join_all(attempts).await;
        // Every attempt was checked before its answer came back: a burst that
        // was answered within the refill interval (6 s) was checked within it.
        let checked_within_refill = burst_started.elapsed() < std::time::Duration::from_secs(6);
        let mut refused = Vec::new();
        let mut statuses = Vec::new();
        for response in responses {
            statuses.push(response.status().as_u16());
            if response.status() == StatusCode::TOO_MANY_REQUESTS {
                refused.push(response);
            } else {
                assert_eq!(response.status(), 401);
            }
        }
        if !checked_within_refill && refused.is_empty() {
            // A machine so slow that the 11 attempts reached the limiter over
            // more than one refill interval: the limit refilled one meanwhile.
            eprintln!(
                "the burst took {:?}: no attempt was over the limit",
                burst_started.elapsed()
            );
            return;
        }
        assert_eq!(refused.len(), 1, "{statuses:?}");
        let response = refused.pop().unwrap();
        let seconds = retry_after(&response);
        assert!(seconds <= 60, "Retry-After {seconds}");
        clean_problem(response, 429).await;
        // Even the right password waits now (unless a slow machine took long
        // enough for the limit to refill an attempt).
        let response = app
            .post("/v1/sessions")
            .json(&json!({"email": " Victim@example.com ", "password": "password-123"}))
            .send()
            .await
            .unwrap();
        if burst_started.elapsed() < std::time::Duration::from_secs(5) {
            retry_after(&response);
            clean_problem(response, 429).await;
        }
        // Another account from the same address is not locked out.
        user(&app, "bystander@example.com", "Bystander").await;
        app.sign_in("bystander@example.com", "password-123").await;
        assert_eq!(
            wrong_sign_in(&app, "bystander@example.com").await.status(),
            401
        );
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_is_rate_limited_per_address() {
    let mut config = test_config(Backend::Sqlite).await;
    config.login_rate_per_address = 3;
    let app = TestApp::spawn_with(config, Backend::Sqlite).await;
    for i in 0..3 {
        let response = wrong_sign_in(&app, &format!("someone{i}@example.com")).await;
        assert_eq!(response.status(), 401, "attempt {}", i + 1);
    }
    for email in ["someone-else@example.com", ADMIN_EMAIL] {
        let response = wrong_sign_in(&app, email).await;
        retry_after(&response);
        clean_problem(response, 429).await;
    }
    // Right credentials from this address wait too.
    let response = app
        .post("/v1/sessions")
        .json(&json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}))
        .send()
        .await
        .unwrap();
    retry_after(&response);
    clean_problem(response, 429).await;
}

/// Fires `n` concurrent GET /v1/me; every answer must be a 200 or a 503 problem
/// with Retry-After, never a 500. Returns the number of 503s.
/// Concurrent reads that always reach the database (`/v1/me` is cached).
async fn storm(server: &Manual, token: &str, n: usize) -> usize {
    let requests = (0..n).map(|_| server.get("/v1/notifications").bearer_auth(token).send());
    let responses = futures::future::join_all(requests).await;
    let mut unavailable = 0;
    for response in responses {
        let response = response.unwrap();
        match response.status().as_u16() {
            200 => {}
            503 => {
                retry_after(&response);
                clean_problem(response, 503).await;
                unavailable += 1;
            }
            other => panic!("{other}: {}", response.text().await.unwrap()),
        }
    }
    unavailable
}

/// One pooled connection and a 1 ms acquire timeout. Such a tight timeout can also
/// make the start-up's own connection time out (an error at start, by design), so
/// the start is retried.
async fn tiny_pool(backend: Backend) -> (Manual, std::path::PathBuf) {
    let mut config = test_config(backend).await;
    // On PostgreSQL the commit listener keeps one pooled connection for itself
    // (see operations::one_connection_pool_still_serves): leave one for requests.
    config.db_max_connections = if backend == Backend::Sqlite { 1 } else { 2 };
    config.db_min_connections = 1;
    // A new PostgreSQL connection takes a few milliseconds to open: with 1 ms the
    // app could never start.
    config.db_acquire_timeout_ms = if backend == Backend::Sqlite { 1 } else { 20 };
    // Sign-ins refused with 503 still count against the sign-in limits.
    config.login_rate_per_email = 1000;
    config.login_rate_per_address = 1000;
    // On a loaded machine opening a connection takes more than 1 ms for many
    // attempts in a row: retry for a while (bounded in count and time), pausing
    // between attempts.
    let mut errors = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for _ in 0..300 {
        match Manual::try_start(&config).await {
            Ok(server) => return (server, config.data_dir.clone()),
            Err(e) => errors.push(e),
        }
        if std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    errors.dedup();
    panic!("never started: {errors:?}");
}

async fn exhausted_pool(backend: Backend) -> usize {
    let (server, data_dir) = tiny_pool(backend).await;
    // Background work shares the one connection: a request may be refused many
    // times in a row on a loaded machine (bounded, with pauses).
    let mut token = None;
    for _ in 0..200 {
        let response = server
            .post("/v1/sessions")
            .json(&json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}))
            .send()
            .await
            .unwrap();
        if response.status() == StatusCode::CREATED {
            let body = json_body(response, StatusCode::CREATED).await;
            token = Some(body["token"].as_str().unwrap().to_owned());
            break;
        }
        clean_problem(response, 503).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let token = token.expect("signed in");
    let mut unavailable = 0;
    for _ in 0..3 {
        unavailable += storm(&server, &token, 200).await;
    }
    // The pool recovers once the storm is over.
    let mut recovered = false;
    for _ in 0..200 {
        let response = server
            .get("/v1/me")
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            recovered = true;
            break;
        }
        clean_problem(response, 503).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(recovered, "the pool did not recover after the storm");
    server.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(data_dir);
    unavailable
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_answers_503_sqlite() {
    // 600 requests racing for one connection with a 1 ms acquire timeout: some
    // must time out (this holds reliably on SQLite).
    let unavailable = exhausted_pool(Backend::Sqlite).await;
    assert!(unavailable > 0, "no 503 under load");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_answers_503_postgres() {
    // On PostgreSQL a 503 is likely but not forced; what is asserted is that every
    // answer is a 200 or a 503 problem with Retry-After.
    exhausted_pool(Backend::Postgres).await;
}
