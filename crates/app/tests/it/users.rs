//! The users routes of api.md: sign-up, sign-in, self, read, update, search, the
//! admin account, and the events they publish.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use reqwest::{Response, StatusCode};
use scaleshop_contracts::{Contract, UserCreated, UserUpdated};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::*;

/// The password `TestApp::customer` signs up with.
const PASSWORD: &str = "password-123";

/// Asserts the status and returns the JSON body.
pub async fn json_body(response: Response, status: StatusCode) -> Value {
    let got = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(got, status, "body: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// POST /v1/users with this body.
pub async fn sign_up(app: &TestApp, body: Value) -> Response {
    app.post("/v1/users").json(&body).send().await.unwrap()
}

/// Signs up a user with this email and name; returns the User.
pub async fn user(app: &TestApp, email: &str, name: &str) -> Value {
    let response = sign_up(
        app,
        json!({"email": email, "name": name, "password": PASSWORD}),
    )
    .await;
    json_body(response, StatusCode::CREATED).await
}

/// POST /v1/sessions.
pub async fn session(app: &TestApp, email: &str, password: &str) -> Response {
    app.post("/v1/sessions")
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
}

pub fn id_of(user: &Value) -> String {
    user["id"].as_str().expect("id").to_owned()
}

pub fn timestamp(value: &Value) -> DateTime<Utc> {
    let text = value.as_str().expect("timestamp string");
    assert!(text.ends_with('Z'), "RFC 3339 in UTC: {text}");
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .with_timezone(&Utc)
}

/// The User of the contract, exactly: no password, no hash, no other field.
pub fn assert_user_shape(user: &Value) {
    let keys: BTreeSet<&str> = user
        .as_object()
        .expect("user object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(["id", "email", "name", "role", "created_at", "updated_at"]),
        "{user}"
    );
    let id = Uuid::parse_str(user["id"].as_str().unwrap()).unwrap();
    assert_eq!(id.get_version_num(), 7, "ids are UUIDv7");
    assert!(["customer", "admin"].contains(&user["role"].as_str().unwrap()));
    assert!(timestamp(&user["created_at"]) <= timestamp(&user["updated_at"]));
    let text = user.to_string();
    assert!(
        !text.contains("argon2") && !text.contains(PASSWORD),
        "{text}"
    );
}

/// GET with a bearer token.
pub async fn get_as(app: &TestApp, path: &str, token: &str) -> Response {
    app.get(path).bearer_auth(token).send().await.unwrap()
}

/// PATCH /v1/users/{id} with a bearer token.
pub async fn patch_as(app: &TestApp, id: &str, token: &str, body: Value) -> Response {
    app.patch(&format!("/v1/users/{id}"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// The sorted `field`s of a 422 problem.
async fn fields_of_422(response: Response) -> Vec<String> {
    let body = problem(response, 422).await;
    let mut fields = error_fields(&body);
    assert_eq!(
        fields.len(),
        body["errors"].as_array().map_or(0, Vec::len),
        "every error names its field: {body}"
    );
    fields.sort();
    fields
}

fn sorted(fields: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = fields.iter().map(|s| (*s).to_owned()).collect();
    v.sort();
    v
}

/// Base64url without padding (for hand-made tokens).
pub fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// An email of exactly `len` characters (len >= 196), valid in form.
fn email_of_length(len: usize) -> String {
    // local (64) "@" b*63 "." c*63 "." d*x ".com"
    let x = len - 64 - 1 - 63 - 1 - 63 - 1 - 4;
    let email = format!(
        "{}@{}.{}.{}.com",
        "a".repeat(64),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(x)
    );
    assert_eq!(email.chars().count(), len);
    email
}

// ---------------------------------------------------------------- sign-up

both!(
    sign_up_then_read_self,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let response = app
            .post("/v1/users")
            .json(&json!({"email": "Ada@Example.com", "name": " Ada ", "password": "password-123"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let id_location = response.headers()["location"].to_str().unwrap().to_owned();
        let consistency = response.headers()["x-consistency-token"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(!consistency.is_empty());
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json")
        );
        let user: Value = response.json().await.unwrap();
        assert_user_shape(&user);
        assert_eq!(
            id_location,
            format!("/v1/users/{}", user["id"].as_str().unwrap())
        );
        assert_eq!(user["email"], "ada@example.com");
        assert_eq!(user["name"], "Ada");
        assert_eq!(user["role"], "customer");
        assert_eq!(user["created_at"], user["updated_at"]);
        assert!(user.get("password").is_none() && user.get("password_hash").is_none());

        let token = app.sign_in("ADA@example.COM", "password-123").await;
        let me = json_body(get_as(&app, "/v1/me", &token).await, StatusCode::OK).await;
        assert_eq!(me, user);
        // The Location answers with the same user.
        let located = json_body(get_as(&app, &id_location, &token).await, StatusCode::OK).await;
        assert_eq!(located, user);
    }
);

both!(
    sign_up_email_taken_in_any_case_is_409,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        user(&app, "grace@example.com", "Grace").await;
        for email in [
            "grace@example.com",
            "GRACE@example.com",
            "Grace@Example.COM",
            "  grace@example.com ",
        ] {
            let response = sign_up(
                &app,
                json!({"email": email, "name": "Other", "password": "another-password"}),
            )
            .await;
            problem(response, 409).await;
        }
        // The first account is untouched: its password still works, the other's not.
        app.sign_in("grace@example.com", PASSWORD).await;
        let response = session(&app, "grace@example.com", "another-password").await;
        problem(response, 401).await;
    }
);

both!(
    concurrent_sign_ups_with_one_email_make_one_account,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let attempts = (0..8).map(|i| {
            let email = if i % 2 == 0 {
                "race@example.com"
            } else {
                "RACE@example.com"
            };
            sign_up(
                &app,
                json!({"email": email, "name": format!("Racer {i}"), "password": PASSWORD}),
            )
        });
        let responses = futures::future::join_all(attempts).await;
        let statuses: Vec<u16> = responses.iter().map(|r| r.status().as_u16()).collect();
        assert_eq!(
            statuses.iter().filter(|s| **s == 201).count(),
            1,
            "{statuses:?}"
        );
        assert_eq!(
            statuses.iter().filter(|s| **s == 409).count(),
            7,
            "{statuses:?}"
        );
    }
);

both!(
    sign_up_lists_every_broken_rule,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        // Everything wrong at once: one entry per broken rule.
        let response = sign_up(
        &app,
        json!({"email": "not-an-email", "name": "   ", "password": "short", "role": "admin", "id": "x"}),
    )
    .await;
        assert_eq!(
            fields_of_422(response).await,
            sorted(&["email", "name", "password", "role", "id"])
        );

        let good =
            |email: &str| json!({"email": email, "name": "Valid Name", "password": PASSWORD});
        let with = |key: &str, value: Value| {
            let mut body = good(&format!("{}@example.com", Uuid::now_v7().simple()));
            body[key] = value;
            body
        };
        let cases: Vec<(&str, Value, Vec<String>)> = vec![
            (
                "not an address",
                with("email", json!("not-an-email")),
                sorted(&["email"]),
            ),
            (
                "no domain dot",
                with("email", json!("a@b")),
                sorted(&["email"]),
            ),
            ("empty email", with("email", json!("")), sorted(&["email"])),
            (
                "255-character email",
                with("email", json!(email_of_length(255))),
                sorted(&["email"]),
            ),
            ("empty name", with("name", json!("")), sorted(&["name"])),
            (
                "whitespace name",
                with("name", json!(" \t  ")),
                sorted(&["name"]),
            ),
            (
                "101-character name",
                with("name", json!("n".repeat(101))),
                sorted(&["name"]),
            ),
            (
                "7-character password",
                with("password", json!("1234567")),
                sorted(&["password"]),
            ),
            (
                "129-character password",
                with("password", json!("p".repeat(129))),
                sorted(&["password"]),
            ),
            (
                "missing fields",
                json!({}),
                sorted(&["email", "name", "password"]),
            ),
            (
                "null fields",
                json!({"email": null, "name": null, "password": null}),
                sorted(&["email", "name", "password"]),
            ),
            (
                "wrong JSON types",
                json!({"email": 5, "name": true, "password": ["password-123"]}),
                sorted(&["email", "name", "password"]),
            ),
            (
                "object as a string field",
                with("name", json!({"first": "Ada"})),
                sorted(&["name"]),
            ),
            (
                "unknown field role",
                with("role", json!("admin")),
                sorted(&["role"]),
            ),
            (
                "unknown field id",
                with("id", json!(Uuid::now_v7().to_string())),
                sorted(&["id"]),
            ),
            (
                "unknown fields role and created_at",
                {
                    let mut b = with("role", json!("customer"));
                    b["created_at"] = json!("2020-01-01T00:00:00Z");
                    b
                },
                sorted(&["created_at", "role"]),
            ),
        ];
        for (what, body, expected) in cases {
            let email = body["email"].as_str().map(str::to_owned);
            let response = sign_up(&app, body).await;
            assert_eq!(response.status(), 422, "{what}");
            assert_eq!(fields_of_422(response).await, expected, "{what}");
            // Nothing was created: the email is still free.
            if let Some(email) = email.filter(|e| e.ends_with("@example.com")) {
                user(&app, &email, "Now Valid").await;
            }
        }
    }
);

both!(
    sign_up_boundaries_are_accepted,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let email = email_of_length(254);
        let created = user(&app, &email, &"n".repeat(100)).await;
        assert_eq!(created["email"], email.as_str());
        assert_eq!(created["name"].as_str().unwrap().chars().count(), 100);

        // 100 characters after trimming, multi-byte characters counted as characters.
        let name = format!("  {}  ", "é".repeat(100));
        let created = user(&app, "accents@example.com", &name).await;
        assert_eq!(created["name"], "é".repeat(100).as_str());

        for (email, password) in [
            ("eight@example.com", "12345678".to_owned()),
            ("long@example.com", "p".repeat(128)),
        ] {
            let response = sign_up(
                &app,
                json!({"email": email, "name": "Boundary", "password": password}),
            )
            .await;
            assert_eq!(response.status(), StatusCode::CREATED, "{email}");
            app.sign_in(email, &password).await;
        }
    }
);

// ---------------------------------------------------------------- sessions

both!(
    sign_in_returns_a_bearer_token,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let created = user(&app, "MiXeD.Case@Example.com", "Mixed").await;
        for email in [
            "mixed.case@example.com",
            "MIXED.CASE@EXAMPLE.COM",
            "MiXeD.Case@Example.com",
        ] {
            let before = Utc::now();
            let response = session(&app, email, PASSWORD).await;
            assert!(response.headers().contains_key("x-consistency-token"));
            let body = json_body(response, StatusCode::CREATED).await;
            let token = body["token"].as_str().unwrap();
            assert!(!token.is_empty());
            assert_eq!(body["token_type"], "Bearer");
            assert_eq!(body["user_id"], created["id"]);
            let expires_at = timestamp(&body["expires_at"]);
            assert!(expires_at > before, "expires_at in the future");
            // The default session lifetime is 24 hours.
            let ttl = expires_at - before;
            assert!(
                ttl > chrono::Duration::hours(23) && ttl <= chrono::Duration::hours(25),
                "{ttl}"
            );
            assert!(body.get("password").is_none());
            let me = json_body(get_as(&app, "/v1/me", token).await, StatusCode::OK).await;
            assert_eq!(me["id"], created["id"]);
        }
    }
);

both!(
    sign_in_failures_look_the_same,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        user(&app, "known@example.com", "Known").await;
        let wrong_password = session(&app, "known@example.com", "wrong-password").await;
        let unknown_email = session(&app, "unknown@example.com", PASSWORD).await;
        let not_an_email = session(&app, "not an email", PASSWORD).await;
        let mut bodies = Vec::new();
        for response in [wrong_password, unknown_email, not_an_email] {
            assert_eq!(
                response
                    .headers()
                    .get("www-authenticate")
                    .map(|v| v.to_str().unwrap().to_owned()),
                Some("Bearer".to_owned())
            );
            bodies.push(problem(response, 401).await);
        }
        assert!(bodies[0]["detail"].is_string());
        assert_eq!(bodies[0], bodies[1], "same answer for both");
        assert_eq!(bodies[0], bodies[2]);
        assert!(bodies[0].get("token").is_none());

        // Body rules of the sign-in.
        let response = app
            .post("/v1/sessions")
            .json(&json!({"email": "known@example.com", "password": PASSWORD, "remember_me": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(fields_of_422(response).await, sorted(&["remember_me"]));
        let response = app
            .post("/v1/sessions")
            .json(&json!({"email": "known@example.com"}))
            .send()
            .await
            .unwrap();
        assert_eq!(fields_of_422(response).await, sorted(&["password"]));
        let response = app
            .post("/v1/sessions")
            .json(&json!({"email": 1, "password": false}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            fields_of_422(response).await,
            sorted(&["email", "password"])
        );
    }
);

// ---------------------------------------------------------------- /v1/me

both!(
    me_requires_a_valid_token,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let (user, token) = app.customer("me@example.com").await;
        let me = json_body(get_as(&app, "/v1/me", &token).await, StatusCode::OK).await;
        assert_eq!(me, user);
        assert_user_shape(&me);

        let id = Uuid::parse_str(user["id"].as_str().unwrap()).unwrap();
        // Signed by another key, even claiming admin.
        let other_keys = scaleshop_web::TokenKeys::new(
            b"an entirely different signing secret, 32+ bytes",
            std::time::Duration::from_secs(3600),
        );
        let foreign = other_keys.issue(id, true, 0).unwrap().token;
        // Unsigned ("alg": "none") with the right claims.
        let now = Utc::now().timestamp();
        let claims = json!({"sub": id, "role": "admin", "iat": now, "exp": now + 3600,
                        "iss": "scaleshop", "aud": "scaleshop-api"});
        let unsigned = format!(
            "{}.{}.",
            b64url(br#"{"alg":"none","typ":"JWT"}"#),
            b64url(claims.to_string().as_bytes())
        );
        // The real token with its signature cut off or altered.
        let (signed_part, signature) = token.rsplit_once('.').unwrap();
        let altered_sig = format!(
            "{signed_part}.{}{}",
            if signature.starts_with('A') { "B" } else { "A" },
            &signature[1..]
        );

        let cases: Vec<(&str, Option<String>)> = vec![
            ("no header", None),
            ("garbage token", Some("Bearer garbage".into())),
            ("empty token", Some("Bearer ".into())),
            ("another key", Some(format!("Bearer {foreign}"))),
            ("alg none", Some(format!("Bearer {unsigned}"))),
            ("no signature", Some(format!("Bearer {signed_part}."))),
            ("altered signature", Some(format!("Bearer {altered_sig}"))),
            ("basic scheme", Some(format!("Basic {token}"))),
            ("bare token", Some(token.clone())),
        ];
        for (what, header) in cases {
            let mut request = app.get("/v1/me");
            if let Some(header) = header {
                request = request.header("authorization", header);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 401, "{what}");
            assert_eq!(
                response.headers()["www-authenticate"].to_str().unwrap(),
                "Bearer",
                "{what}"
            );
            problem(response, 401).await;
        }
        // The foreign "admin" token opens no admin route either.
        let response = get_as(&app, "/v1/users", &foreign).await;
        problem(response, 401).await;
        let response = get_as(&app, "/v1/events", &foreign).await;
        problem(response, 401).await;
    }
);

// ---------------------------------------------------------------- GET /v1/users/{id}

both!(
    read_user_self_other_admin,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let (alice, alice_token) = app.customer("alice@example.com").await;
        let (bob, _) = app.customer("bob@example.com").await;
        let admin = app.admin_token().await;
        let alice_path = format!("/v1/users/{}", id_of(&alice));
        let bob_path = format!("/v1/users/{}", id_of(&bob));

        let own = json_body(
            get_as(&app, &alice_path, &alice_token).await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(own, alice);

        // Another customer's account looks exactly like a missing one.
        let other = problem(get_as(&app, &bob_path, &alice_token).await, 404).await;
        let missing_path = format!("/v1/users/{}", Uuid::now_v7());
        let missing = problem(get_as(&app, &missing_path, &alice_token).await, 404).await;
        assert_eq!(other, missing);

        // Admins read anyone.
        assert_eq!(
            json_body(get_as(&app, &bob_path, &admin).await, StatusCode::OK).await,
            bob
        );
        assert_eq!(
            json_body(get_as(&app, &alice_path, &admin).await, StatusCode::OK).await,
            alice
        );
        problem(get_as(&app, &missing_path, &admin).await, 404).await;

        // Not a UUID: 404, never 400 or 500.
        for path in [
            "/v1/users/not-a-uuid",
            "/v1/users/123",
            "/v1/users/00000000-0000-0000-0000-00000000000g",
            "/v1/users/%00",
            "/v1/users/%FF",
            "/v1/users/..%2F..%2Fetc",
        ] {
            problem(get_as(&app, path, &admin).await, 404).await;
            problem(get_as(&app, path, &alice_token).await, 404).await;
        }

        // No token: 401.
        let response = app.get(&alice_path).send().await.unwrap();
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        problem(response, 401).await;
    }
);

// ---------------------------------------------------------------- PATCH /v1/users/{id}

both!(
    patch_changes_name_email_and_password,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let (before, token) = app.customer("patch.me@example.com").await;
        let id = id_of(&before);

        // Name, trimmed.
        let response = patch_as(&app, &id, &token, json!({"name": "  New Name "})).await;
        assert!(
            !response.headers()["x-consistency-token"]
                .to_str()
                .unwrap()
                .is_empty()
        );
        let renamed = json_body(response, StatusCode::OK).await;
        assert_user_shape(&renamed);
        assert_eq!(renamed["name"], "New Name");
        assert_eq!(renamed["email"], before["email"]);
        assert_eq!(renamed["created_at"], before["created_at"]);
        assert!(timestamp(&renamed["updated_at"]) > timestamp(&before["updated_at"]));

        // Email, lower-cased.
        let moved = json_body(
            patch_as(
                &app,
                &id,
                &token,
                json!({"email": "Moved@Example.COM", "current_password": PASSWORD}),
            )
            .await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(moved["email"], "moved@example.com");
        assert_eq!(moved["name"], "New Name");
        assert!(timestamp(&moved["updated_at"]) > timestamp(&renamed["updated_at"]));

        // Password (which ends the session that changed it).
        let repassed = json_body(
            patch_as(
                &app,
                &id,
                &token,
                json!({"password": "brand-new-password", "current_password": PASSWORD}),
            )
            .await,
            StatusCode::OK,
        )
        .await;
        assert!(repassed.get("password").is_none());
        assert!(timestamp(&repassed["updated_at"]) > timestamp(&moved["updated_at"]));
        problem(session(&app, "moved@example.com", PASSWORD).await, 401).await;
        problem(
            session(&app, "patch.me@example.com", "brand-new-password").await,
            401,
        )
        .await;
        let new_token = app.sign_in("MOVED@example.com", "brand-new-password").await;

        // Everything at once.
        let all = json_body(
        patch_as(
            &app,
            &id,
            &new_token,
            json!({"name": "All Three", "email": "all@example.com", "password": "third-password",
                   "current_password": "brand-new-password"}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
        assert_eq!(
            (all["name"].as_str(), all["email"].as_str()),
            (Some("All Three"), Some("all@example.com"))
        );
        let latest = app.sign_in("all@example.com", "third-password").await;

        // Reads see the change; the old email is free again.
        let read = json_body(
            get_as(&app, &format!("/v1/users/{id}"), &latest).await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(read, all);
        user(&app, "patch.me@example.com", "Takes The Old Email").await;
    }
);

both!(
    patch_conflicts_and_invalid_values,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let (me, token) = app.customer("owner@example.com").await;
        app.customer("taken@example.com").await;
        let id = id_of(&me);

        for email in [
            "taken@example.com",
            "TAKEN@Example.com",
            ADMIN_EMAIL,
            &ADMIN_EMAIL.to_uppercase(),
        ] {
            problem(
                patch_as(
                    &app,
                    &id,
                    &token,
                    json!({"email": email, "current_password": PASSWORD}),
                )
                .await,
                409,
            )
            .await;
        }

        let cases: Vec<(Value, Vec<String>)> = vec![
            (
                json!({"email": "nope", "current_password": PASSWORD}),
                sorted(&["email"]),
            ),
            (
                json!({"email": email_of_length(255), "current_password": PASSWORD}),
                sorted(&["email"]),
            ),
            (json!({"name": ""}), sorted(&["name"])),
            (json!({"name": "    "}), sorted(&["name"])),
            (json!({"name": "x".repeat(101)}), sorted(&["name"])),
            (
                json!({"password": "1234567", "current_password": PASSWORD}),
                sorted(&["password"]),
            ),
            (
                json!({"password": "x".repeat(129), "current_password": PASSWORD}),
                sorted(&["password"]),
            ),
            (json!({"name": null}), sorted(&["name"])),
            (
                json!({"name": 42, "email": [], "current_password": PASSWORD}),
                sorted(&["email", "name"]),
            ),
            (json!({"role": "admin"}), sorted(&["role"])),
            (json!({"name": "Valid", "role": "admin"}), sorted(&["role"])),
            (
                json!({"id": Uuid::now_v7().to_string(), "created_at": "2020-01-01T00:00:00Z"}),
                sorted(&["created_at", "id"]),
            ),
        ];
        for (body, expected) in cases {
            let response = patch_as(&app, &id, &token, body.clone()).await;
            assert_eq!(fields_of_422(response).await, expected, "{body}");
        }

        // Nothing of the refused requests was applied.
        let now = json_body(get_as(&app, "/v1/me", &token).await, StatusCode::OK).await;
        assert_eq!(now, me);
        app.sign_in("owner@example.com", PASSWORD).await;

        // An empty patch changes nothing.
        let same = json_body(patch_as(&app, &id, &token, json!({})).await, StatusCode::OK).await;
        assert_eq!(same, me);
    }
);

both!(
    patch_other_user_is_404_admin_may_patch_anyone,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let (alice, alice_token) = app.customer("alice@example.com").await;
        let (bob, bob_token) = app.customer("bob@example.com").await;
        let admin = app.admin_token().await;

        let response = patch_as(&app, &id_of(&bob), &alice_token, json!({"name": "Hacked"})).await;
        let other = problem(response, 404).await;
        let response = patch_as(
            &app,
            &Uuid::now_v7().to_string(),
            &alice_token,
            json!({"name": "Hacked"}),
        )
        .await;
        assert_eq!(problem(response, 404).await, other);
        // Even an invalid body to another's account answers 404 (no enumeration).
        let response = patch_as(&app, &id_of(&bob), &alice_token, json!({"name": ""})).await;
        problem(response, 404).await;
        assert_eq!(
            json_body(get_as(&app, "/v1/me", &bob_token).await, StatusCode::OK).await,
            bob
        );

        // The admin may change anyone, password included.
        let changed = json_body(
            patch_as(
                &app,
                &id_of(&bob),
                &admin,
                json!({"name": "Robert", "password": "set-by-admin"}),
            )
            .await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(changed["name"], "Robert");
        assert_eq!(changed["role"], "customer");
        app.sign_in("bob@example.com", "set-by-admin").await;
        let response = patch_as(
            &app,
            &id_of(&alice),
            &admin,
            json!({"email": "bob@example.com"}),
        )
        .await;
        problem(response, 409).await;
        let response = patch_as(
            &app,
            &Uuid::now_v7().to_string(),
            &admin,
            json!({"name": "Ghost"}),
        )
        .await;
        problem(response, 404).await;
        let response = patch_as(&app, "not-a-uuid", &admin, json!({"name": "Ghost"})).await;
        problem(response, 404).await;

        // No token: 401.
        let response = app
            .patch(&format!("/v1/users/{}", id_of(&alice)))
            .json(&json!({"name": "Anonymous"}))
            .send()
            .await
            .unwrap();
        problem(response, 401).await;
        assert_eq!(
            json_body(get_as(&app, "/v1/me", &alice_token).await, StatusCode::OK).await,
            alice
        );
    }
);

// ---------------------------------------------------------------- search

/// GET /v1/users?{query} as this caller.
async fn search(app: &TestApp, token: &str, query: &[(&str, &str)]) -> Response {
    app.get("/v1/users")
        .query(query)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// The emails of a search page, in order.
async fn found_emails(app: &TestApp, token: &str, q: &str) -> Vec<String> {
    let body = json_body(search(app, token, &[("q", q)]).await, StatusCode::OK).await;
    assert!(body["next_cursor"].is_null(), "{body}");
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            assert_user_shape(u);
            u["email"].as_str().unwrap().to_owned()
        })
        .collect()
}

both!(
    search_is_for_admins,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let (_, token) = app.customer("curious@example.com").await;
        problem(search(&app, &token, &[]).await, 403).await;
        problem(search(&app, &token, &[("q", "admin")]).await, 403).await;
        let response = app.get("/v1/users").send().await.unwrap();
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        problem(response, 401).await;
    }
);

both!(
    search_matches_name_or_email_ignoring_case,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        user(&app, "grace@navy.example.com", "Grace Hopper").await;
        user(&app, "alan@bletchley.example.org", "Alan Turing").await;
        user(&app, "ada@example.com", "Ada Lovelace").await;
        let admin = app.admin_token().await;

        assert_eq!(
            found_emails(&app, &admin, "HOPPER").await,
            ["grace@navy.example.com"]
        );
        assert_eq!(
            found_emails(&app, &admin, "hopper").await,
            ["grace@navy.example.com"]
        );
        assert_eq!(
            found_emails(&app, &admin, "BletchLEY").await,
            ["alan@bletchley.example.org"]
        );
        assert_eq!(
            found_emails(&app, &admin, " turing ").await,
            ["alan@bletchley.example.org"]
        );
        assert_eq!(
            found_emails(&app, &admin, "lovelace").await,
            ["ada@example.com"]
        );
        assert!(
            found_emails(&app, &admin, "nobody-like-this")
                .await
                .is_empty()
        );
        let mut a = found_emails(&app, &admin, "A").await;
        a.sort();
        // "a" is in every name or email here (the admin's included).
        assert_eq!(a.len(), 4, "{a:?}");
        // Matching on email, not on the hash or anything else stored.
        assert!(found_emails(&app, &admin, "argon2").await.is_empty());
    }
);

both!(
    search_folds_case_beyond_ascii,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        user(&app, "emile@example.com", "Émile Zola").await;
        let admin = app.admin_token().await;
        // The stored name itself, then other letter cases of it.
        for q in ["Émile", "émile", "ÉMILE", "Zola"] {
            assert_eq!(
                found_emails(&app, &admin, q).await,
                ["emile@example.com"],
                "q={q}"
            );
        }
    }
);

both!(
    search_text_with_a_nul,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        user(&app, "nul.search@example.com", "Nul Search").await;
        let admin = app.admin_token().await;
        // Text that no stored value can contain: no match (or a 422 naming q), never
        // a 500.
        for q in ["\u{0}", "nul\u{0}search", "Nul Search\u{0}"] {
            let response = search(&app, &admin, &[("q", q)]).await;
            match response.status().as_u16() {
                200 => {
                    let body = json_body(response, StatusCode::OK).await;
                    assert_eq!(body["items"], json!([]), "{q:?}");
                }
                422 => assert_eq!(fields_of_422(response).await, sorted(&["q"]), "{q:?}"),
                other => panic!("{q:?}: {other}: {}", response.text().await.unwrap()),
            }
        }
    }
);

both!(
    search_wildcards_are_literal,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        user(&app, "cotton@example.com", "100% Cotton").await;
        user(&app, "snake_case@example.com", "Snake").await;
        user(&app, "back@example.com", "Back\\slash").await;
        user(&app, "plain@example.com", "Plain").await;
        let admin = app.admin_token().await;

        assert_eq!(
            found_emails(&app, &admin, "%").await,
            ["cotton@example.com"]
        );
        assert_eq!(
            found_emails(&app, &admin, "_").await,
            ["snake_case@example.com"]
        );
        assert_eq!(found_emails(&app, &admin, "\\").await, ["back@example.com"]);
        assert!(found_emails(&app, &admin, "p%n").await.is_empty());
        assert!(found_emails(&app, &admin, "pl_in").await.is_empty());
        assert_eq!(
            found_emails(&app, &admin, "0% c").await,
            ["cotton@example.com"]
        );
    }
);

both!(
    search_pages_through_every_user_once,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let mut created = Vec::new();
        for i in 0..5 {
            let u = user(
                &app,
                &format!("pager{i}@example.com"),
                &format!("Pager {i}"),
            )
            .await;
            created.push(id_of(&u));
        }
        created.sort();
        let admin = app.admin_token().await;

        let walk = |q: Option<&'static str>| {
            let app = &app;
            let admin = admin.clone();
            async move {
                let mut seen = Vec::new();
                let mut sizes = Vec::new();
                let mut cursor: Option<String> = None;
                for _ in 0..10 {
                    let mut query = vec![("limit", "2".to_owned())];
                    if let Some(q) = q {
                        query.push(("q", q.to_owned()));
                    }
                    if let Some(c) = &cursor {
                        query.push(("cursor", c.clone()));
                    }
                    let response = app
                        .get("/v1/users")
                        .query(&query)
                        .bearer_auth(&admin)
                        .send()
                        .await
                        .unwrap();
                    let page = json_body(response, StatusCode::OK).await;
                    let items = page["items"].as_array().unwrap();
                    sizes.push(items.len());
                    seen.extend(items.iter().map(id_of));
                    match page["next_cursor"].as_str() {
                        Some(next) => cursor = Some(next.to_owned()),
                        None => return (seen, sizes),
                    }
                }
                panic!("paging never ended: {seen:?}");
            }
        };

        let (seen, sizes) = walk(Some("pager")).await;
        assert_eq!(seen, created, "every user once, in id order");
        assert_eq!(sizes, [2, 2, 1]);

        // Without q: everyone, the admin included.
        let (seen, _) = walk(None).await;
        assert_eq!(seen.len(), 6);
        let mut sorted_seen = seen.clone();
        sorted_seen.sort();
        sorted_seen.dedup();
        assert_eq!(sorted_seen, seen, "ascending ids, no repeats");
        assert!(created.iter().all(|id| seen.contains(id)));

        // A page that ends exactly at the last item has no next cursor after it.
        let body = json_body(
            search(&app, &admin, &[("q", "pager"), ("limit", "5")]).await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(body["items"].as_array().unwrap().len(), 5);
        assert!(body["next_cursor"].is_null());
        // The default page holds them all.
        let body = json_body(search(&app, &admin, &[]).await, StatusCode::OK).await;
        assert_eq!(body["items"].as_array().unwrap().len(), 6);
    }
);

both!(
    search_limit_and_cursor_rules,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        for i in 0..3 {
            user(&app, &format!("limit{i}@example.com"), "Limit").await;
        }
        let admin = app.admin_token().await;
        for bad in ["0", "101", "abc", "-1", "", "1.5", "99999999999"] {
            let response = search(&app, &admin, &[("limit", bad)]).await;
            assert_eq!(
                fields_of_422(response).await,
                sorted(&["limit"]),
                "limit={bad}"
            );
        }
        let body = json_body(
            search(&app, &admin, &[("limit", "100")]).await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(body["items"].as_array().unwrap().len(), 4);
        let body = json_body(
            search(&app, &admin, &[("limit", "1")]).await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(body["items"].as_array().unwrap().len(), 1);
        let cursor = body["next_cursor"].as_str().unwrap().to_owned();
        let response = search(&app, &admin, &[("limit", "1"), ("cursor", &cursor)]).await;
        assert_eq!(response.status(), 200);

        // Forged or corrupted cursors: 400.
        let (payload, mac) = cursor.split_once('.').unwrap();
        let flipped_mac = format!(
            "{payload}.{}{}",
            if mac.starts_with('A') { "B" } else { "A" },
            &mac[1..]
        );
        let forged_payload = format!(
            "{}.{mac}",
            b64url(format!("\"{}\"", Uuid::nil()).as_bytes())
        );
        let events = json_body(
            get_as(&app, "/v1/events?limit=1", &admin).await,
            StatusCode::OK,
        )
        .await;
        let events_cursor = events["next_cursor"].as_str().unwrap().to_owned();
        for bad in [
            "garbage".to_owned(),
            "".to_owned(),
            ".".to_owned(),
            flipped_mac,
            forged_payload,
            format!("{cursor}x"),
            payload.to_owned(),
            events_cursor,
        ] {
            let response = search(&app, &admin, &[("cursor", &bad)]).await;
            problem(response, 400).await;
        }
    }
);

// ---------------------------------------------------------------- the admin account

both!(
    admin_account_from_the_environment,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let response = session(&app, &ADMIN_EMAIL.to_uppercase(), ADMIN_PASSWORD).await;
        let body = json_body(response, StatusCode::CREATED).await;
        let token = body["token"].as_str().unwrap();
        let me = json_body(get_as(&app, "/v1/me", token).await, StatusCode::OK).await;
        assert_user_shape(&me);
        assert_eq!(me["role"], "admin");
        assert_eq!(me["email"], ADMIN_EMAIL);
        assert_eq!(me["id"], body["user_id"]);
        problem(
            session(&app, ADMIN_EMAIL, "not-the-admin-password").await,
            401,
        )
        .await;
        // The admin sees itself in the search, with its role.
        let body = json_body(
            search(&app, token, &[("q", ADMIN_EMAIL)]).await,
            StatusCode::OK,
        )
        .await;
        let items = body["items"].as_array().unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0]["role"], "admin");
    }
);

both!(
    customers_cannot_become_admin,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        // Not at sign-up.
        let response = sign_up(
        &app,
        json!({"email": "climber@example.com", "name": "Climber", "password": PASSWORD, "role": "admin"}),
    )
    .await;
        assert_eq!(fields_of_422(response).await, sorted(&["role"]));
        problem(session(&app, "climber@example.com", PASSWORD).await, 401).await;
        // Not by taking the admin's email.
        let response = sign_up(
            &app,
            json!({"email": ADMIN_EMAIL.to_uppercase(), "name": "Climber", "password": PASSWORD}),
        )
        .await;
        problem(response, 409).await;

        // Not by a patch.
        let (me, token) = app.customer("climber@example.com").await;
        for body in [
            json!({"role": "admin"}),
            json!({"role": "admin", "name": "Still Me"}),
            json!({"is_admin": true}),
        ] {
            let response = patch_as(&app, &id_of(&me), &token, body).await;
            problem(response, 422).await;
        }
        let response = patch_as(
            &app,
            &id_of(&me),
            &token,
            json!({"email": ADMIN_EMAIL, "current_password": PASSWORD}),
        )
        .await;
        problem(response, 409).await;
        let now = json_body(get_as(&app, "/v1/me", &token).await, StatusCode::OK).await;
        assert_eq!(now["role"], "customer");
        assert_eq!(now, me);
        // A fresh token is still a customer's.
        let fresh = app.sign_in("climber@example.com", PASSWORD).await;
        problem(get_as(&app, "/v1/users", &fresh).await, 403).await;
        problem(get_as(&app, "/v1/events", &fresh).await, 403).await;
        // The admin account keeps its password.
        app.admin_token().await;
    }
);

// ---------------------------------------------------------------- events

/// Every event, following the cursors with this page size.
pub async fn all_events(app: &TestApp, admin: &str, limit: u32) -> Vec<Value> {
    let mut events = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let mut path = format!("/v1/events?limit={limit}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = json_body(get_as(app, &path, admin).await, StatusCode::OK).await;
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= limit as usize);
        events.extend(items.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return events,
        }
    }
    panic!("event paging never ended");
}

fn assert_event_shape(event: &Value) {
    let keys: BTreeSet<&str> = event
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "id",
            "sequence",
            "type",
            "version",
            "aggregate_id",
            "occurred_at",
            "data"
        ]),
        "{event}"
    );
    Uuid::parse_str(event["id"].as_str().unwrap()).unwrap();
    Uuid::parse_str(event["aggregate_id"].as_str().unwrap()).unwrap();
    assert!(event["sequence"].is_i64(), "{event}");
    assert_eq!(event["version"], 1);
    assert!(event["data"].is_object());
    timestamp(&event["occurred_at"]);
    let text = event.to_string();
    assert!(
        !text.contains("argon2") && !text.contains("password_hash"),
        "{text}"
    );
}

both!(
    sign_up_and_update_publish_events,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let (me, token) = app.customer("evented@example.com").await;
        let id = id_of(&me);
        json_body(
            patch_as(&app, &id, &token, json!({"name": "Renamed"})).await,
            StatusCode::OK,
        )
        .await;
        let admin = app.admin_token().await;
        let events = all_events(&app, &admin, 100).await;
        for event in &events {
            assert_event_shape(event);
        }
        let sequences: Vec<i64> = events
            .iter()
            .map(|e| e["sequence"].as_i64().unwrap())
            .collect();
        assert!(
            sequences.windows(2).all(|w| w[0] < w[1]),
            "ascending: {sequences:?}"
        );

        let mine: Vec<&Value> = events
            .iter()
            .filter(|e| e["aggregate_id"] == id.as_str())
            .collect();
        let types: Vec<&str> = mine.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(types, [UserCreated::NAME, UserUpdated::NAME]);
        assert_eq!(mine[0]["data"]["email"], "evented@example.com");
        assert_eq!(mine[1]["data"]["name"], "Renamed");
        assert!(timestamp(&mine[0]["occurred_at"]) <= timestamp(&mine[1]["occurred_at"]));

        // The admin account was created with an event too.
        let me_admin = json_body(get_as(&app, "/v1/me", &admin).await, StatusCode::OK).await;
        assert!(events.iter().any(|e| e["type"] == UserCreated::NAME
            && e["aggregate_id"] == me_admin["id"]
            && e["data"]["role"] == "admin"));

        // The log is for admins only.
        problem(get_as(&app, "/v1/events", &token).await, 403).await;
        problem(app.get("/v1/events").send().await.unwrap(), 401).await;
    }
);

both!(
    events_page_with_limit_and_cursor,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        for i in 0..3 {
            user(&app, &format!("paged{i}@example.com"), "Paged").await;
        }
        let admin = app.admin_token().await;
        let everything = all_events(&app, &admin, 100).await;
        assert!(everything.len() >= 4, "{}", everything.len());
        // Other events may be appended meanwhile (welcome emails are sent in the
        // background): compare up to the last event of the first read.
        let last = everything.last().unwrap()["sequence"].as_i64().unwrap();
        let prefix = |events: Vec<Value>| -> Vec<Value> {
            events
                .into_iter()
                .filter(|e| e["sequence"].as_i64().unwrap() <= last)
                .collect()
        };
        assert_eq!(prefix(all_events(&app, &admin, 1).await), everything);
        assert_eq!(prefix(all_events(&app, &admin, 3).await), everything);

        let page = json_body(
            get_as(&app, "/v1/events?limit=2", &admin).await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(page["items"].as_array().unwrap()[..], everything[..2]);
        assert!(page["next_cursor"].is_string());
        let default = json_body(get_as(&app, "/v1/events", &admin).await, StatusCode::OK).await;
        let default = default["items"].as_array().unwrap().clone();
        assert!(!default.is_empty() && default.len() <= 20);
        let n = default.len().min(everything.len());
        assert_eq!(default[..n], everything[..n]);

        for bad in ["0", "101", "abc"] {
            let response = get_as(&app, &format!("/v1/events?limit={bad}"), &admin).await;
            assert_eq!(fields_of_422(response).await, sorted(&["limit"]));
        }
        problem(
            get_as(&app, "/v1/events?cursor=forged.cursor", &admin).await,
            400,
        )
        .await;
        // A cursor of the users list is no cursor of the event log.
        let users = json_body(
            search(&app, &admin, &[("limit", "1")]).await,
            StatusCode::OK,
        )
        .await;
        let users_cursor = users["next_cursor"].as_str().unwrap();
        problem(
            get_as(&app, &format!("/v1/events?cursor={users_cursor}"), &admin).await,
            400,
        )
        .await;
    }
);
