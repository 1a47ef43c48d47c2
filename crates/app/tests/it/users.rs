//! The users routes of api.md.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::both;
use crate::helpers::*;

both!(sign_up_then_read_self, |app: TestApp| async move {
    let response = app
        .post("/v1/users")
        .json(&json!({"email": "Ada@Example.com", "name": " Ada ", "password": "password-123"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let id_location = response.headers()["location"].to_str().unwrap().to_owned();
    assert!(response.headers().contains_key("x-consistency-token"));
    let user: Value = response.json().await.unwrap();
    assert_eq!(
        id_location,
        format!("/v1/users/{}", user["id"].as_str().unwrap())
    );
    assert_eq!(user["email"], "ada@example.com");
    assert_eq!(user["name"], "Ada");
    assert_eq!(user["role"], "customer");
    assert!(user.get("password").is_none() && user.get("password_hash").is_none());

    let token = app.sign_in("ADA@example.COM", "password-123").await;
    let me: Value = app
        .get("/v1/me")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me, user);
});
