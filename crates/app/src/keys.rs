//! The signing keys of a process: one static key from a configured `jwt_secret`,
//! or the key store in the database (shared by every instance; see
//! `scaleshop_keys`), and the `scaleshop keys` commands.

use std::sync::Arc;
use std::time::Duration;

use scaleshop_db::Database;
use scaleshop_keys::{KeyInfo, KeyStore};
use scaleshop_web::Keys;

use crate::config::Config;
use crate::server::StartError;

fn fail(e: impl std::fmt::Display) -> StartError {
    StartError::Secret(e.to_string())
}

/// The keys the HTTP layer signs and verifies with.
pub(crate) async fn http_keys(config: &Config, db: &Database) -> Result<Arc<Keys>, StartError> {
    let ttl = Duration::from_secs(config.token_ttl_secs);
    if let Some(secret) = &config.jwt_secret {
        return Ok(Keys::new(secret.expose().as_bytes(), ttl));
    }
    let store = KeyStore::new(db.clone());
    store.prepare(&config.data_dir).await.map_err(fail)?;
    let keys = Keys::from_source(Arc::new(store), ttl)
        .await
        .map_err(fail)?;
    tracing::info!(kid = %keys.signing_kid(), "signing keys loaded from the database");
    Ok(keys)
}

/// How long a retired key keeps verifying: what it signed lives at most a token's
/// lifetime, and an instance may sign with it until its next refresh.
pub fn retention(config: &Config) -> Duration {
    Duration::from_secs(config.token_ttl_secs + config.key_refresh_secs + 60)
}

/// The key store of the configured database (its table migrated, a first key in it).
async fn open_store(config: &Config) -> Result<(Database, KeyStore), StartError> {
    if config.jwt_secret.is_some() {
        return Err(fail(
            "jwt_secret is configured: that one static key signs, not the key store; \
             change jwt_secret to rotate, or unset it to use the key store",
        ));
    }
    let url = config.database_url.as_ref().map(|s| s.expose());
    let db = Database::connect(url, &config.data_dir, &config.pool_settings()).await?;
    db.migrate(&scaleshop_keys::migrations()).await?;
    let store = KeyStore::new(db.clone());
    store.prepare(&config.data_dir).await.map_err(fail)?;
    Ok((db, store))
}

/// `keys rotate`: a new key signs from now on (every instance picks it up within
/// `key_refresh_secs`, or at once when it meets a value the key signed); keys
/// retired longer than [`retention`] ago are pruned. Returns the new key and the
/// pruned key ids.
pub async fn rotate(config: &Config) -> Result<(KeyInfo, Vec<String>), StartError> {
    config.validate()?;
    let (db, store) = open_store(config).await?;
    let result = async {
        let key = store.rotate().await.map_err(fail)?;
        let cutoff =
            chrono::Utc::now() - chrono::Duration::from_std(retention(config)).map_err(fail)?;
        let pruned = store.prune(cutoff).await.map_err(fail)?;
        Ok((key, pruned))
    }
    .await;
    db.close().await;
    result
}

/// `keys list`: every key, oldest first (never a secret).
pub async fn list(config: &Config) -> Result<Vec<KeyInfo>, StartError> {
    config.validate()?;
    let (db, store) = open_store(config).await?;
    let keys = store.list().await.map_err(fail);
    db.close().await;
    keys
}
