//! Sessions that end (api.md, Users): `current_password` on a change of the email
//! or the password, a password change ending every earlier session, sign-out
//! (`DELETE /v1/sessions/current`), tokens of users that do not exist, the same
//! in a second process, the session check served from memory, and display names
//! without bidi controls or invisible characters.

use std::time::Duration;

use reqwest::{Response, StatusCode};
use scaleshop_app::config::Secret;
use scaleshop_contracts::{Contract, SessionEnded};
use scaleshop_db::{sqlx, with_pool};
use scaleshop_testkit::eventually_within;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::*;
use crate::users::{get_as, id_of, json_body, patch_as, session, sign_up};

/// The password `TestApp::customer` signs up with.
const PASSWORD: &str = "password-123";

/// A signing secret the tests configure, so they can sign tokens themselves.
const SECRET: &str = "a signing secret the tests share, 32+ bytes long";

/// The sorted `field`s of a 422 problem.
async fn fields_of_422(response: Response) -> Vec<String> {
    let mut fields = error_fields(&problem(response, 422).await);
    fields.sort();
    fields
}

fn strings(fields: &[&str]) -> Vec<String> {
    fields.iter().map(|f| (*f).to_owned()).collect()
}

/// In the split deployment, waits (bounded) until every process refuses
/// `token`: docs/api.md promises it as soon as the event reaches each one,
/// "within about 1 s when a wake-up is lost". Two refusals in a row from the
/// routes of every service group (both instances behind the gateway). One
/// process refuses at once: nothing to wait for there (the assertions that
/// follow check it).
async fn ended_everywhere(app: &TestApp, token: &str) {
    if app.backend != Backend::Split {
        return;
    }
    // One route of each group: users, orders, notifications, payments, and
    // the catalog group (which the event log routes go to).
    let routes = [
        "/v1/me",
        "/v1/orders",
        "/v1/notifications",
        "/v1/payments",
        "/v1/events",
    ];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    'wait: loop {
        for path in routes {
            for _ in 0..2 {
                if get_as(app, path, token).await.status() != StatusCode::UNAUTHORIZED {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "{path} still admits an ended session after 5 s"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue 'wait;
                }
            }
        }
        return;
    }
}

/// Asserts a 401 that asks for a bearer token.
async fn refused(response: Response, what: &str) {
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
    assert_eq!(
        response.headers()["www-authenticate"].to_str().unwrap(),
        "Bearer",
        "{what}"
    );
    problem(response, 401).await;
}

/// POST /v1/orders with this token and body.
async fn post_order(app: &TestApp, token: &str, body: &Value) -> Response {
    app.post("/v1/orders")
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// DELETE /v1/sessions/current with this token.
async fn sign_out(app: &TestApp, token: &str) -> Response {
    app.request(reqwest::Method::DELETE, "/v1/sessions/current")
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// An order body for one unit of a fresh product (made by the admin).
async fn order_body(app: &TestApp) -> Value {
    let admin = app.admin_token().await;
    let sku = format!("S-{}", Uuid::now_v7().simple());
    let response = app
        .post("/v1/products")
        .bearer_auth(&admin)
        .json(
            &json!({"sku": sku, "name": "Session Tea", "price_cents": 450,
                      "currency": "EUR", "initial_stock": 100}),
        )
        .send()
        .await
        .unwrap();
    let product = json_body(response, StatusCode::CREATED).await;
    json!({"items": [{"product_id": product["id"], "quantity": 1}], "payment_method": "pm_card_visa"})
}

/// A test app whose signing secret is [`SECRET`].
async fn spawn_with_secret(backend: Backend) -> TestApp {
    let mut config = test_config(backend).await;
    config.jwt_secret = Some(Secret::new(SECRET));
    TestApp::spawn_with(config, backend).await
}

/// A correctly signed token for `user_id` (epoch 0), made outside the app.
fn forged_token(user_id: Uuid, admin: bool) -> String {
    let keys = scaleshop_web::Keys::new(SECRET.as_bytes(), Duration::from_secs(3600));
    keys.tokens.issue(user_id, admin, 0).unwrap().token
}

/// Runs `statement` (binding `id` if given) on the app's database, through a
/// second handle, as another process would.
async fn run_sql(app: &TestApp, statement: &'static str, id: Option<Uuid>) {
    let url = app
        .config
        .database_url
        .as_ref()
        .map(|u| u.expose().to_owned());
    let db = scaleshop_testkit::open_database(url.as_deref(), &app.data_dir(), &[]).await;
    with_pool!(db, pool => {
        let query = sqlx::query(statement);
        let query = match id {
            Some(id) => query.bind(id),
            None => query,
        };
        query.execute(pool).await.unwrap().rows_affected()
    });
    db.close().await;
}

/// The value of `cache_requests_total{cache="sessions",tier="l1",result="hit"}`.
async fn session_cache_hits(app: &TestApp) -> f64 {
    app.metric(
        "cache_requests_total",
        &[r#"cache="sessions""#, r#"tier="l1""#, r#"result="hit""#],
    )
    .await
}

// ---------------------------------------------------------------- current_password

both!(
    changing_email_or_password_needs_the_current_password,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let (me, token) = app.customer("proof@example.com").await;
        let id = id_of(&me);

        // Missing or wrong: a 422 naming current_password, and nothing changes.
        for body in [
            json!({"email": "moved@example.com"}),
            json!({"password": "new-password-1"}),
            json!({"email": "moved@example.com", "name": "Moved", "password": "new-password-1"}),
            json!({"email": "moved@example.com", "current_password": "wrong-password"}),
            json!({"password": "new-password-1", "current_password": "wrong-password"}),
            json!({"password": "new-password-1", "current_password": ""}),
        ] {
            let response = patch_as(&app, &id, &token, body.clone()).await;
            assert_eq!(
                fields_of_422(response).await,
                strings(&["current_password"]),
                "{body}"
            );
        }
        // Other broken rules are listed with it.
        let response = patch_as(
            &app,
            &id,
            &token,
            json!({"email": "nope", "password": "short"}),
        )
        .await;
        assert_eq!(
            fields_of_422(response).await,
            strings(&["current_password", "email", "password"])
        );
        let response = patch_as(
            &app,
            &id,
            &token,
            json!({"email": "moved@example.com", "current_password": 12345678}),
        )
        .await;
        assert_eq!(
            fields_of_422(response).await,
            strings(&["current_password"])
        );
        let now = json_body(get_as(&app, "/v1/me", &token).await, StatusCode::OK).await;
        assert_eq!(now, me, "nothing was applied");
        problem(
            session(&app, "proof@example.com", "new-password-1").await,
            401,
        )
        .await;

        // The name alone needs no proof; one given must still be right.
        let response = patch_as(
            &app,
            &id,
            &token,
            json!({"name": "Proof", "current_password": "wrong-password"}),
        )
        .await;
        assert_eq!(
            fields_of_422(response).await,
            strings(&["current_password"])
        );
        let renamed = json_body(
            patch_as(&app, &id, &token, json!({"name": "Proof"})).await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(renamed["name"], "Proof");

        // With the right one, the email changes (and the session goes on).
        let moved = json_body(
            patch_as(
                &app,
                &id,
                &token,
                json!({"email": "Moved@Example.com", "current_password": PASSWORD}),
            )
            .await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(moved["email"], "moved@example.com");
        json_body(get_as(&app, "/v1/me", &token).await, StatusCode::OK).await;

        // An admin changing their own account proves it too...
        let admin = app.admin_token().await;
        let admin_me = json_body(get_as(&app, "/v1/me", &admin).await, StatusCode::OK).await;
        let response = patch_as(
            &app,
            &id_of(&admin_me),
            &admin,
            json!({"email": "root@example.com"}),
        )
        .await;
        assert_eq!(
            fields_of_422(response).await,
            strings(&["current_password"])
        );
        // ...but not when changing someone else's.
        let changed = json_body(
            patch_as(&app, &id, &admin, json!({"email": "by.admin@example.com"})).await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(changed["email"], "by.admin@example.com");
        app.sign_in("by.admin@example.com", PASSWORD).await;
    }
);

// ---------------------------------------------------------------- password change

both!(
    a_password_change_ends_every_earlier_session,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let (me, first) = app.customer("rotate@example.com").await;
        let id = id_of(&me);
        let second = app.sign_in("rotate@example.com", PASSWORD).await;
        let orders = order_body(&app).await;
        for token in [&first, &second] {
            json_body(get_as(&app, "/v1/me", token).await, StatusCode::OK).await;
        }

        // Changed with `first`, within the same second as `second` was issued.
        let response = patch_as(
            &app,
            &id,
            &first,
            json!({"password": "rotated-password", "current_password": PASSWORD}),
        )
        .await;
        json_body(response, StatusCode::OK).await;
        for token in [&first, &second] {
            ended_everywhere(&app, token).await;
        }
        for (name, token) in [("first", &first), ("second", &second)] {
            refused(get_as(&app, "/v1/me", token).await, name).await;
            refused(get_as(&app, "/v1/orders", token).await, name).await;
            refused(post_order(&app, token, &orders).await, name).await;
            refused(
                patch_as(&app, &id, token, json!({"name": "Zombie"})).await,
                name,
            )
            .await;
        }

        // A new sign-in works with the new password only.
        problem(session(&app, "rotate@example.com", PASSWORD).await, 401).await;
        let fresh = app.sign_in("rotate@example.com", "rotated-password").await;
        let now = json_body(get_as(&app, "/v1/me", &fresh).await, StatusCode::OK).await;
        assert_eq!(now["name"], me["name"]);
        let response = post_order(&app, &fresh, &orders).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);

        // An admin's change ends the user's sessions, not the admin's.
        let admin = app.admin_token().await;
        json_body(
            patch_as(&app, &id, &admin, json!({"password": "set-by-the-admin"})).await,
            StatusCode::OK,
        )
        .await;
        ended_everywhere(&app, &fresh).await;
        refused(
            get_as(&app, "/v1/me", &fresh).await,
            "after the admin's change",
        )
        .await;
        json_body(get_as(&app, "/v1/me", &admin).await, StatusCode::OK).await;
        let last = app.sign_in("rotate@example.com", "set-by-the-admin").await;
        json_body(get_as(&app, "/v1/me", &last).await, StatusCode::OK).await;

        // An email or name change ends nothing.
        json_body(
            patch_as(
                &app,
                &id,
                &last,
                json!({"email": "rotated@example.com", "current_password": "set-by-the-admin"}),
            )
            .await,
            StatusCode::OK,
        )
        .await;
        json_body(get_as(&app, "/v1/me", &last).await, StatusCode::OK).await;
    }
);

// ---------------------------------------------------------------- sign-out

both!(
    sign_out_refuses_that_token,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let (me, token) = app.customer("leaving@example.com").await;
        let other = app.sign_in("leaving@example.com", PASSWORD).await;
        let orders = order_body(&app).await;
        json_body(get_as(&app, "/v1/me", &token).await, StatusCode::OK).await;

        let response = sign_out(&app, &token).await;
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert!(response.headers().contains_key("x-consistency-token"));
        assert!(response.bytes().await.unwrap().is_empty());

        // Refused at once (in the split deployment, once every process has
        // the event), on every protected route.
        ended_everywhere(&app, &token).await;
        refused(get_as(&app, "/v1/me", &token).await, "me").await;
        refused(post_order(&app, &token, &orders).await, "orders").await;
        refused(get_as(&app, "/v1/orders", &token).await, "order list").await;
        refused(
            get_as(&app, &format!("/v1/users/{}", id_of(&me)), &token).await,
            "user",
        )
        .await;
        refused(sign_out(&app, &token).await, "signing out twice").await;

        // The user's other session goes on.
        json_body(get_as(&app, "/v1/me", &other).await, StatusCode::OK).await;
        assert_eq!(
            post_order(&app, &other, &orders).await.status(),
            StatusCode::ACCEPTED
        );
        refused(
            app.request(reqwest::Method::DELETE, "/v1/sessions/current")
                .send()
                .await
                .unwrap(),
            "no token",
        )
        .await;

        // The log tells the other processes.
        let admin = app.admin_token().await;
        let events = crate::users::all_events(&app, &admin, 100).await;
        let ended: Vec<&Value> = events
            .iter()
            .filter(|e| e["type"] == SessionEnded::NAME)
            .collect();
        assert_eq!(ended.len(), 1, "{ended:?}");
        assert_eq!(ended[0]["aggregate_id"], me["id"]);
        assert!(
            !ended[0].to_string().contains(&token),
            "no token in the log"
        );
    }
);

// ---------------------------------------------------------------- users that do not exist

async fn tokens_of_missing_users_are_refused(backend: Backend) {
    let app = spawn_with_secret(backend).await;
    let orders = order_body(&app).await;

    // Signed with the deployment's key, for an id no user has.
    let ghost = Uuid::now_v7();
    let customer = forged_token(ghost, false);
    let admin = forged_token(ghost, true);
    refused(get_as(&app, "/v1/me", &customer).await, "me").await;
    refused(post_order(&app, &customer, &orders).await, "orders").await;
    refused(get_as(&app, "/v1/orders", &customer).await, "order list").await;
    refused(
        get_as(&app, "/v1/notifications", &customer).await,
        "notifications",
    )
    .await;
    refused(get_as(&app, "/v1/users", &admin).await, "admin search").await;
    refused(get_as(&app, "/v1/events", &admin).await, "admin events").await;

    // The same key signs for a real user: the check is the account, not the key.
    let (me, _) = app.customer("real@example.com").await;
    let real = forged_token(Uuid::parse_str(&id_of(&me)).unwrap(), false);
    json_body(get_as(&app, "/v1/me", &real).await, StatusCode::OK).await;

    // A user whose row is gone (deleted behind the service's back).
    let (gone, gone_token) = app.customer("gone@example.com").await;
    let gone_id = Uuid::parse_str(&id_of(&gone)).unwrap();
    run_sql(&app, "DELETE FROM users WHERE id = $1", Some(gone_id)).await;
    refused(
        post_order(&app, &gone_token, &orders).await,
        "orders of a deleted user",
    )
    .await;
    refused(
        get_as(&app, "/v1/me", &gone_token).await,
        "me of a deleted user",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_missing_users_are_refused_sqlite() {
    tokens_of_missing_users_are_refused(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_missing_users_are_refused_postgres() {
    tokens_of_missing_users_are_refused(Backend::Postgres).await;
}

// ---------------------------------------------------------------- served from memory

// One process's cache counters: behind the gateway, each instance has its own.
both!(
    session_checks_do_not_read_the_database,
    [sqlite, postgres],
    |app: TestApp| async move {
        let (_, token) = app.customer("cached@example.com").await;
        json_body(get_as(&app, "/v1/orders", &token).await, StatusCode::OK).await;
        let hits_before = session_cache_hits(&app).await;

        // With the users' table out of reach, a request whose check read it
        // would fail; the orders list reads only the orders' tables.
        run_sql(&app, "ALTER TABLE users RENAME TO users_out_of_reach", None).await;
        for i in 0..20 {
            let response = get_as(&app, "/v1/orders", &token).await;
            assert_eq!(response.status(), StatusCode::OK, "request {i}");
        }
        assert!(
            session_cache_hits(&app).await - hits_before >= 20.0,
            "every check was a cache hit"
        );
        run_sql(&app, "ALTER TABLE users_out_of_reach RENAME TO users", None).await;
        // And a sign-out still takes effect at once.
        assert_eq!(
            sign_out(&app, &token).await.status(),
            StatusCode::NO_CONTENT
        );
        refused(get_as(&app, "/v1/orders", &token).await, "after sign-out").await;
    }
);

// ---------------------------------------------------------------- two processes

/// How long another process may still accept an ended session in these tests:
/// the documented bound (about a second) with room for a loaded machine, far
/// below the session cache's TTL (60 s), so only an invalidation can pass.
const OTHER_PROCESS_BOUND: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_sessions_are_refused_by_other_processes() {
    let mut config = test_config(Backend::Postgres).await;
    config.jwt_secret = Some(Secret::new(SECRET));
    let a = TestApp::spawn_with(config.clone(), Backend::Postgres).await;
    let mut other = config.clone();
    other.data_dir = config.data_dir.with_extension("b");
    let b = TestApp::spawn_with(other, Backend::Postgres).await;

    // Sign-out on A.
    let (me, token) = a.customer("two.processes@example.com").await;
    let spare = a.sign_in("two.processes@example.com", PASSWORD).await;
    for app in [&a, &b] {
        json_body(get_as(app, "/v1/me", &token).await, StatusCode::OK).await;
        json_body(get_as(app, "/v1/orders", &token).await, StatusCode::OK).await;
    }
    assert_eq!(sign_out(&a, &token).await.status(), StatusCode::NO_CONTENT);
    refused(get_as(&a, "/v1/orders", &token).await, "on A").await;
    eventually_within(
        OTHER_PROCESS_BOUND,
        "B refuses the signed-out token",
        async || get_as(&b, "/v1/orders", &token).await.status() == StatusCode::UNAUTHORIZED,
    )
    .await;
    refused(get_as(&b, "/v1/me", &token).await, "on B").await;
    json_body(get_as(&b, "/v1/me", &spare).await, StatusCode::OK).await;

    // A password change on B ends the spare session on A.
    json_body(get_as(&a, "/v1/orders", &spare).await, StatusCode::OK).await;
    json_body(
        patch_as(
            &b,
            &id_of(&me),
            &spare,
            json!({"password": "changed-on-b", "current_password": PASSWORD}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    eventually_within(
        OTHER_PROCESS_BOUND,
        "A refuses the older session",
        async || get_as(&a, "/v1/orders", &spare).await.status() == StatusCode::UNAUTHORIZED,
    )
    .await;
    let fresh = a.sign_in("two.processes@example.com", "changed-on-b").await;
    json_body(get_as(&b, "/v1/me", &fresh).await, StatusCode::OK).await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

// ---------------------------------------------------------------- display names

both!(
    names_refuse_bidi_controls_and_invisible_characters,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let (me, token) = app.customer("names@example.com").await;
        let hidden = [
            '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}', '\u{2066}', '\u{2067}',
            '\u{2068}', '\u{2069}', '\u{200B}', '\u{FEFF}',
        ];
        for (i, c) in hidden.into_iter().enumerate() {
            let name = format!("Ada{c}Lovelace");
            let response = sign_up(
                &app,
                json!({"email": format!("hidden{i}@example.com"), "name": name, "password": PASSWORD}),
            )
            .await;
            assert_eq!(
                fields_of_422(response).await,
                strings(&["name"]),
                "sign-up with U+{:04X}",
                u32::from(c)
            );
            for name in [format!("{c}Ada"), format!("Ada{c}"), format!("{c}")] {
                let response = patch_as(&app, &id_of(&me), &token, json!({"name": name})).await;
                assert_eq!(
                    fields_of_422(response).await,
                    strings(&["name"]),
                    "patch with U+{:04X}",
                    u32::from(c)
                );
            }
        }
        let now = json_body(get_as(&app, "/v1/me", &token).await, StatusCode::OK).await;
        assert_eq!(now, me);
        // Joiners that scripts and emoji need are fine.
        let renamed = json_body(
            patch_as(
                &app,
                &id_of(&me),
                &token,
                json!({"name": "\u{1F469}\u{200D}\u{1F4BB} Ada"}),
            )
            .await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(renamed["name"], "\u{1F469}\u{200D}\u{1F4BB} Ada");
    }
);

// ---------------------------------------------------------------- storage

/// The store itself, on each engine (the suite's fixture is an app; this one's
/// is the engine).
mod storage {
    use super::*;
    use scaleshop_testkit::{both, fixture};

    both!(
        session_state_is_stored_and_cleaned_up,
        |backend| async move {
            use scaleshop_users::domain::{Email, NewUser, Password, PasswordHash, UserName};
            use scaleshop_users::store::{SqlUserStore, UserStore};

            let db = scaleshop_testkit::fresh_database(
                backend,
                &[
                    scaleshop_events::migrations(),
                    scaleshop_users::store::migrations(),
                ],
            )
            .await;
            let store = std::sync::Arc::new(SqlUserStore::new(db.clone()));
            let users = scaleshop_users::Users::new(store.clone());
            let user = users
                .register(NewUser {
                    email: Email::parse("stored@example.com").unwrap(),
                    name: UserName::parse("Stored").unwrap(),
                    password: Password::parse(PASSWORD).unwrap(),
                })
                .await
                .unwrap();
            let now = chrono::Utc::now().timestamp();
            assert_eq!(
                store
                    .session_state(user.id, now)
                    .await
                    .unwrap()
                    .unwrap()
                    .epoch,
                0
            );
            assert_eq!(
                store.session_state(Uuid::now_v7(), now).await.unwrap(),
                None
            );

            // Signed-out ids count until their token expires; the clean-up forgets
            // them a minute after that.
            let (expired, live) = (Uuid::now_v7(), Uuid::now_v7());
            let event = |id: Uuid| {
                let ended = SessionEnded {
                    user_id: user.id,
                    session_id: id,
                };
                scaleshop_events::NewEvent::typed(user.id, &ended).unwrap()
            };
            for (id, expires_at) in [(expired, now - 3600), (live, now + 3600)] {
                assert!(
                    store
                        .end_session(user.id, id, expires_at, &event(id))
                        .await
                        .unwrap()
                );
            }
            assert!(
                !store
                    .end_session(user.id, live, now + 3600, &event(live))
                    .await
                    .unwrap(),
                "once"
            );
            let state = store.session_state(user.id, now).await.unwrap().unwrap();
            assert_eq!(state.ended, vec![live]);
            assert!(
                !state.admits(0, live) && state.admits(0, expired) && !state.admits(1, expired)
            );
            assert_eq!(users.sessions().clean_up().await.unwrap(), 1);
            let everything = store.session_state(user.id, 0).await.unwrap().unwrap();
            assert_eq!(everything.ended, vec![live]);

            // A new hash moves the epoch on; the same hash (a name change) does not.
            let mut record = store.get(user.id).await.unwrap().unwrap();
            record.user.name = UserName::parse("Renamed").unwrap();
            store.update(&record, &event(live)).await.unwrap();
            assert_eq!(store.get(user.id).await.unwrap().unwrap().session_epoch, 0);
            record.password_hash = PasswordHash("$argon2id$another".to_owned());
            store.update(&record, &event(live)).await.unwrap();
            assert_eq!(store.get(user.id).await.unwrap().unwrap().session_epoch, 1);
            db.close().await;
        }
    );
}
