//! SIGTERM drains and exits 0; the admin account and sessions survive a restart.

use std::time::Duration;

use scaleshop_testkit::{Backend, both, fixture};
use serde_json::json;

use crate::process::Deployment;

both!(
    sigterm_drains_and_exits_zero,
    |backend: Backend| async move {
        let deployment = Deployment::fresh(backend).await;
        let server = deployment.start().await;
        // A request in flight when the signal comes is answered, not cut.
        let client = server.client.clone();
        let url = server.url("/v1/users");
        let in_flight = tokio::spawn(async move {
            client
            .post(url)
            .json(&json!({"email": "late@example.com", "name": "Late", "password": "password-123"}))
            .send()
            .await
            .map(|r| r.status().as_u16())
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let token = server.admin_token().await;
        let status = server.terminate();
        assert!(status.success(), "exit status {status:?}");
        match in_flight.await.expect("task") {
            Ok(code) => assert_eq!(code, 201, "an accepted request is completed"),
            // It had not reached the server before the listener closed.
            Err(e) => assert!(e.is_connect(), "{e}"),
        }

        // Restart: the old session is still valid (same signing secret).
        let server = deployment.start().await;
        let me = server
            .client
            .get(server.url("/v1/me"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("me");
        assert_eq!(me.status().as_u16(), 200);
        assert!(server.terminate().success());
    }
);
