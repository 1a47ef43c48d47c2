//! The signing key store: the keys that sign session tokens, cursors and consistency
//! tokens live in the database (`signing_keys`), each with a key id, so every
//! instance of a deployment verifies what any other issued.
//!
//! - The first start on an empty database creates the first key with an
//!   insert-if-absent (two instances starting at once end with one key).
//! - An existing `data_dir/signing.key` (the per-instance secret of earlier
//!   versions) is imported as a legacy key, so what it signed keeps verifying, and
//!   renamed to `signing.key.imported` so a pruned key never comes back.
//! - [`KeyStore::rotate`] adds a key of the next generation, which signs from then
//!   on; older keys verify until [`KeyStore::prune`] removes those retired long
//!   enough ago for what they signed to have expired.
//!
//! The HTTP layer reads the keys through [`scaleshop_web::KeySource`]; this crate
//! knows nothing of how they are used. Secrets never appear in logs or in Debug
//! output.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use chrono::{DateTime, Utc};
use scaleshop_db::{Database, Migrations, StoreError, with_pool, with_tx};
use scaleshop_web::{KeyMaterial, KeySource};
use sha2::{Digest, Sha256};
use sqlx::Row;

/// The file in the data folder that held an instance's own secret.
pub const LEGACY_FILE: &str = "signing.key";
/// What [`LEGACY_FILE`] is renamed to once imported.
pub const IMPORTED_FILE: &str = "signing.key.imported";
/// Attempts of a write that lost a race on its generation to another instance.
const ATTEMPTS: usize = 8;

pub fn migrations() -> Migrations {
    static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
    static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
    Migrations {
        owner: "keys",
        sqlite: &SQLITE,
        postgres: &POSTGRES,
    }
}

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("other instances kept changing the keys; try again")]
    Contended,
}

/// A key as `keys list` shows it: never the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub kid: String,
    pub generation: i64,
    pub created_at: DateTime<Utc>,
    /// When a newer key took over; `None` for the key that signs.
    pub retired_at: Option<DateTime<Utc>>,
    /// Verifies values made before key ids existed.
    pub legacy: bool,
}

impl KeyInfo {
    /// Does this key sign new values?
    pub fn active(&self) -> bool {
        self.retired_at.is_none()
    }
}

/// What [`KeyStore::prepare`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prepared {
    /// The key id of an imported `signing.key`.
    pub imported: Option<String>,
    /// The key id of a first key generated now.
    pub generated: Option<String>,
}

/// The key store on the deployment's database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct KeyStore {
    db: Database,
}

/// The key id of a secret: derived from it, so importing the same secret twice
/// finds the same row.
pub fn kid_of(secret: &[u8]) -> String {
    let digest = Sha256::new()
        .chain_update(b"scaleshop key id\0")
        .chain_update(secret)
        .finalize();
    hex::encode(&digest[..8])
}

fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

fn time(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or_default()
}

fn fresh_secret() -> Vec<u8> {
    let mut secret = vec![0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
    secret
}

impl KeyStore {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// Makes sure the store holds a key: imports `data_dir/signing.key` if it exists
    /// (as the first key when the store is empty, else as a retired legacy key),
    /// or generates the first key when the store is empty. Safe to run from several
    /// processes at once.
    pub async fn prepare(&self, data_dir: &Path) -> Result<Prepared, KeyError> {
        let path = data_dir.join(LEGACY_FILE);
        let mut prepared = Prepared::default();
        match read_legacy(&path)? {
            Some(secret) => {
                let kid = kid_of(&secret);
                if !self.insert_first(&kid, &secret, true).await? && !self.exists(&kid).await? {
                    self.import_retired(&kid, &secret).await?;
                }
                let imported = data_dir.join(IMPORTED_FILE);
                if let Err(e) = std::fs::rename(&path, &imported) {
                    tracing::warn!(error = %e, path = %path.display(), "signing keys: could not rename the imported key file");
                }
                tracing::info!(%kid, "signing keys: imported {LEGACY_FILE} from the data folder");
                prepared.imported = Some(kid);
            }
            None => {
                let secret = fresh_secret();
                let kid = kid_of(&secret);
                if self.insert_first(&kid, &secret, false).await? {
                    tracing::info!(%kid, "signing keys: generated the first key");
                    prepared.generated = Some(kid);
                }
            }
        }
        Ok(prepared)
    }

    /// Inserts the first key (generation 1) if the store has none. True when this
    /// call inserted it.
    async fn insert_first(&self, kid: &str, secret: &[u8], legacy: bool) -> Result<bool, KeyError> {
        // `WHERE` before `ON CONFLICT` also keeps SQLite's parser from reading a join.
        const Q: &str = "INSERT INTO signing_keys (kid, secret, generation, legacy, created_at) \
                         SELECT $1, $2, 1, $3, $4 WHERE NOT EXISTS (SELECT 1 FROM signing_keys) \
                         ON CONFLICT DO NOTHING";
        let now = micros(Utc::now());
        let rows = with_pool!(self.db, pool => sqlx::query(Q)
            .bind(kid).bind(secret).bind(legacy).bind(now)
            .execute(pool).await.map_err(StoreError::from)?.rows_affected());
        Ok(rows == 1)
    }

    /// Adds a key older than every other (it verifies, never signs), retired now.
    async fn import_retired(&self, kid: &str, secret: &[u8]) -> Result<(), KeyError> {
        const Q: &str = "INSERT INTO signing_keys (kid, secret, generation, legacy, created_at, retired_at) \
                         SELECT $1, $2, COALESCE(MIN(generation), 1) - 1, $3, $4, $4 FROM signing_keys \
                         WHERE true ON CONFLICT DO NOTHING";
        for _ in 0..ATTEMPTS {
            let now = micros(Utc::now());
            let rows = with_pool!(self.db, pool => sqlx::query(Q)
                .bind(kid).bind(secret).bind(true).bind(now)
                .execute(pool).await.map_err(StoreError::from)?.rows_affected());
            if rows == 1 || self.exists(kid).await? {
                return Ok(());
            }
        }
        Err(KeyError::Contended)
    }

    async fn exists(&self, kid: &str) -> Result<bool, KeyError> {
        const Q: &str = "SELECT kid FROM signing_keys WHERE kid = $1";
        let found: Option<String> = with_pool!(self.db, pool => sqlx::query_scalar(Q)
            .bind(kid).fetch_optional(pool).await.map_err(StoreError::from)?);
        Ok(found.is_some())
    }

    /// Adds a key of the next generation, which signs from now on; the key that
    /// signed until now is retired (it still verifies).
    pub async fn rotate(&self) -> Result<KeyInfo, KeyError> {
        const INSERT: &str = "INSERT INTO signing_keys (kid, secret, generation, legacy, created_at) \
                              SELECT $1, $2, COALESCE(MAX(generation), 0) + 1, $3, $4 FROM signing_keys \
                              WHERE true ON CONFLICT DO NOTHING";
        const RETIRE: &str = "UPDATE signing_keys SET retired_at = $1 \
                              WHERE retired_at IS NULL AND kid <> $2";
        for _ in 0..ATTEMPTS {
            let secret = fresh_secret();
            let kid = kid_of(&secret);
            let now = micros(Utc::now());
            let mut tx = self.db.begin().await?;
            let inserted = with_tx!(&mut tx, conn => sqlx::query(INSERT)
                .bind(&kid).bind(&secret).bind(false).bind(now)
                .execute(conn).await.map_err(StoreError::from)?.rows_affected());
            if inserted != 1 {
                // Another instance took this generation first.
                tx.rollback().await?;
                continue;
            }
            with_tx!(&mut tx, conn => sqlx::query(RETIRE)
                .bind(now).bind(&kid)
                .execute(conn).await.map_err(StoreError::from)?.rows_affected());
            tx.commit().await?;
            tracing::info!(%kid, "signing keys: rotated; the new key signs");
            return self
                .list()
                .await?
                .into_iter()
                .find(|k| k.kid == kid)
                .ok_or(KeyError::Contended);
        }
        Err(KeyError::Contended)
    }

    /// Removes the keys retired before `retired_before` (never the key that
    /// signs); returns their ids.
    pub async fn prune(&self, retired_before: DateTime<Utc>) -> Result<Vec<String>, KeyError> {
        const Q: &str = "DELETE FROM signing_keys \
                         WHERE retired_at IS NOT NULL AND retired_at < $1 RETURNING kid";
        let mut pruned: Vec<String> = with_pool!(self.db, pool => sqlx::query_scalar(Q)
            .bind(micros(retired_before)).fetch_all(pool).await.map_err(StoreError::from)?);
        pruned.sort();
        if !pruned.is_empty() {
            tracing::info!(kids = ?pruned, "signing keys: pruned");
        }
        Ok(pruned)
    }

    /// Every key, oldest generation first, without secrets.
    pub async fn list(&self) -> Result<Vec<KeyInfo>, KeyError> {
        const Q: &str = "SELECT kid, generation, legacy, created_at, retired_at \
                         FROM signing_keys ORDER BY generation";
        let rows = with_pool!(self.db, pool => {
            let rows = sqlx::query(Q).fetch_all(pool).await.map_err(StoreError::from)?;
            rows.iter()
                .map(|row| -> Result<KeyInfo, sqlx::Error> {
                    Ok(KeyInfo {
                        kid: row.try_get(0)?,
                        generation: row.try_get(1)?,
                        legacy: row.try_get(2)?,
                        created_at: time(row.try_get(3)?),
                        retired_at: row.try_get::<Option<i64>, _>(4)?.map(time),
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(StoreError::from)?
        });
        Ok(rows)
    }

    /// Every key with its secret, for the HTTP layer's ring; the newest generation
    /// signs.
    pub async fn load(&self) -> Result<Vec<KeyMaterial>, KeyError> {
        const Q: &str = "SELECT kid, secret, legacy FROM signing_keys ORDER BY generation";
        let rows: Vec<(String, Vec<u8>, bool)> = with_pool!(self.db, pool => sqlx::query_as(Q)
            .fetch_all(pool).await.map_err(StoreError::from)?);
        let last = rows.len().saturating_sub(1);
        Ok(rows
            .into_iter()
            .enumerate()
            .map(|(i, (kid, secret, legacy))| KeyMaterial {
                kid,
                secret,
                legacy,
                signing: i == last,
            })
            .collect())
    }
}

impl KeySource for KeyStore {
    fn load(&self) -> Pin<Box<dyn Future<Output = Result<Vec<KeyMaterial>, String>> + Send + '_>> {
        Box::pin(async move { KeyStore::load(self).await.map_err(|e| e.to_string()) })
    }
}

/// The secret of a `signing.key` file (hex, at least 32 bytes), if the file exists.
fn read_legacy(path: &Path) -> Result<Option<Vec<u8>>, KeyError> {
    let fail = |message: String| KeyError::File {
        path: path.to_owned(),
        message,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            // The decoding error names no byte of the file.
            let secret = hex::decode(text.trim()).map_err(|_| fail("not hex".into()))?;
            if secret.len() < 32 {
                return Err(fail("shorter than 32 bytes".into()));
            }
            Ok(Some(secret))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(fail(e.to_string())),
    }
}
