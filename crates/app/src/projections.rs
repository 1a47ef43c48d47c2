//! `scaleshop projections status|rebuild`: the projections of a running
//! instance, over its admin API (each instance keeps its own search index, so a
//! rebuild is asked of the instance at `--url`; the table projections are
//! shared by every instance on the database, and any of them rebuilds them). Signs in with the configured
//! admin account.

use std::time::Duration;

use serde_json::{Value, json};

use crate::config::Config;
use crate::server::StartError;

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

fn error(message: impl std::fmt::Display) -> StartError {
    StartError::Target(format!("projections: {message}"))
}

/// The instance to ask: `url`, else this configuration's listen address (an
/// unspecified address is asked on loopback).
fn base(config: &Config, url: Option<&str>) -> Result<String, StartError> {
    if let Some(url) = url {
        return Ok(url.trim_end_matches('/').to_owned());
    }
    let mut addr = config.listen_addr()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Ok(format!("http://{addr}"))
}

/// A client of an instance's admin API, signed in as the configured admin.
pub(crate) struct AdminClient {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl AdminClient {
    pub(crate) async fn sign_in(config: &Config, url: Option<&str>) -> Result<Self, StartError> {
        let (Some(email), Some(password)) = (&config.admin_email, &config.admin_password) else {
            return Err(error(
                "needs the admin account (SCALESHOP_ADMIN_EMAIL and SCALESHOP_ADMIN_PASSWORD)",
            ));
        };
        let base = base(config, url)?;
        let client = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .build()
            .map_err(error)?;
        let response = client
            .post(format!("{base}/v1/sessions"))
            .json(&json!({"email": email, "password": password.expose()}))
            .send()
            .await
            .map_err(|e| error(format!("{base}: {e}")))?;
        if !response.status().is_success() {
            return Err(error(format!(
                "{base}: sign-in answered {}",
                response.status()
            )));
        }
        let body: Value = response.json().await.map_err(error)?;
        let token = body["token"]
            .as_str()
            .ok_or_else(|| error("sign-in answered no token"))?
            .to_owned();
        Ok(Self {
            client,
            base,
            token,
        })
    }

    async fn call(&self, method: reqwest::Method, path: &str) -> Result<Value, StartError> {
        self.call_with(method, path, None).await
    }

    /// Calls `path` (with `body` as JSON); the answer's JSON, or the error
    /// with its problem document.
    pub(crate) async fn call_with(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, StartError> {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| error(format!("{}{path}: {e}", self.base)))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(error(format!("{path}: {status} {body}")));
        }
        Ok(body)
    }

    async fn status(&self) -> Result<Vec<Value>, StartError> {
        let body = self.call(reqwest::Method::GET, "/v1/projections").await?;
        Ok(body["items"].as_array().cloned().unwrap_or_default())
    }
}

/// The projections of the instance at `url`.
pub async fn status(config: &Config, url: Option<&str>) -> Result<Vec<Value>, StartError> {
    AdminClient::sign_in(config, url).await?.status().await
}

/// Asks the instance at `url` to rebuild projection `name` from the log and
/// waits (at most `wait`) until it serves from the new one; returns its state.
pub async fn rebuild(
    config: &Config,
    url: Option<&str>,
    name: &str,
    wait: Duration,
) -> Result<Value, StartError> {
    let admin = AdminClient::sign_in(config, url).await?;
    let before = admin
        .status()
        .await?
        .into_iter()
        .find(|p| p["name"] == name)
        .ok_or_else(|| error(format!("no projection named {name}")))?;
    admin
        .call(
            reqwest::Method::POST,
            &format!("/v1/projections/{name}/rebuild"),
        )
        .await?;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let now = admin
            .status()
            .await?
            .into_iter()
            .find(|p| p["name"] == name)
            .ok_or_else(|| error(format!("projection {name} went away")))?;
        // The search index serves a new generation when done; a table
        // projection (no generation) says `rebuilding` from the request on,
        // until its new copy has taken the old one's place.
        let swapped = now["generation"].is_null() || now["generation"] != before["generation"];
        if swapped && now["state"] == "live" {
            return Ok(now);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(error(format!(
                "{name} is still rebuilding after {} s: {now}",
                wait.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
