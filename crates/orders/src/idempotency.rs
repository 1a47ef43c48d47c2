//! `Idempotency-Key` (IETF httpapi draft): the first response to a (user, key) is
//! kept and replayed for the same body; another body with the same key is a 422;
//! the same key while the first request runs is a 409. Keys are kept 24 hours.
//! A key whose request died in flight (a crash) is taken over once its process is
//! known dead (each process renews an `alive_until` with [`Idempotency::heartbeat`]),
//! or once that request cannot be running any more (the request timeout, plus a
//! margin; a minute unless told), and at once by a process that knows it is alone
//! ([`Idempotency::forget_in_flight`]). A request that failed with a 5xx releases
//! its key at once, or, when the database cannot be reached, as soon as it can (so
//! a client retrying after a 503 is not told 409 for a request that is over).

use chrono::{DateTime, Utc};
use scaleshop_db::clock::now;
use scaleshop_db::sqlx;
use scaleshop_db::{Database, StoreError, Tx, with_pool, with_tx};
use uuid::Uuid;

/// How long keys are kept.
pub const RETENTION_HOURS: i64 = 24;
/// After this long without completing, an in-flight key is considered abandoned
/// (unless [`Idempotency::abandoned_after`] says otherwise).
const ABANDONED_SECS: i64 = 60;

/// A stored first response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub status: u16,
    pub location: Option<String>,
    pub body: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// First use: go ahead, then complete or abandon.
    Proceed(Claimed),
    Replay(Stored),
    InFlight,
    Mismatch,
}

/// One request's hold on a key (the claim's time), so that releasing it late never
/// drops the claim of a later request with the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claimed(DateTime<Utc>);

/// A key being used by one request.
#[derive(Debug, Clone)]
pub struct KeyRef {
    pub user_id: Uuid,
    pub key: String,
}

#[derive(Debug, Clone)]
pub struct Idempotency {
    db: Database,
    abandoned_after: chrono::Duration,
    /// This process, as the claims it makes name it.
    owner: std::sync::Arc<str>,
}

type Existing = (
    String,
    String,
    Option<i32>,
    Option<String>,
    Option<String>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
);

impl Idempotency {
    pub fn new(db: Database) -> Self {
        Self {
            db,
            abandoned_after: chrono::Duration::seconds(ABANDONED_SECS),
            owner: format!("{}-{}", std::process::id(), Uuid::now_v7().simple()).into(),
        }
    }

    /// Says this process is alive for `lease` more: its in-flight keys are not
    /// taken over before then. Run it well inside `lease`, for as long as the
    /// process serves requests (a key whose owner never beat falls back to the
    /// time rule).
    pub async fn heartbeat(&self, lease: std::time::Duration) -> Result<(), StoreError> {
        const Q: &str = "INSERT INTO idempotency_owners (owner, alive_until) VALUES ($1, $2) \
                         ON CONFLICT (owner) DO UPDATE SET alive_until = excluded.alive_until";
        let mut tx = self.db.begin().await?;
        with_tx!(&mut tx, conn => {
            sqlx::query(Q).bind(&*self.owner).bind(scaleshop_db::clock::after(lease)).execute(conn).await?;
        });
        tx.commit().await
    }

    /// An in-flight key is taken over after `after`: set it past the longest a
    /// request can run (the request timeout, which drops the request and its
    /// transaction), so a live request's key is never taken.
    #[must_use]
    pub fn abandoned_after(mut self, after: std::time::Duration) -> Self {
        self.abandoned_after =
            chrono::Duration::from_std(after).unwrap_or(chrono::Duration::seconds(ABANDONED_SECS));
        self
    }

    /// Forgets every in-flight key at once. Only for a process that knows no other
    /// process serves requests (the embedded data folder's lock): those requests
    /// died with their process, and nothing they did committed (an order and its
    /// key's answer commit together). Returns how many.
    pub async fn forget_in_flight(&self) -> Result<u64, StoreError> {
        const Q: &str = "DELETE FROM idempotency_keys WHERE state = 'in_flight'";
        let mut tx = self.db.begin().await?;
        let deleted = with_tx!(&mut tx, conn => {
            sqlx::query(Q).execute(conn).await?.rows_affected()
        });
        tx.commit().await?;
        Ok(deleted)
    }

    pub async fn claim(&self, key: &KeyRef, request_hash: &str) -> Result<Claim, StoreError> {
        const INSERT: &str = "INSERT INTO idempotency_keys (user_id, key, request_hash, state, created_at, owner) \
                              VALUES ($1, $2, $3, 'in_flight', $4, $5) ON CONFLICT (user_id, key) DO NOTHING";
        const SELECT: &str = "SELECT k.request_hash, k.state, k.status_code, k.location, k.response, k.created_at, \
                              o.alive_until FROM idempotency_keys k \
                              LEFT JOIN idempotency_owners o ON o.owner = k.owner \
                              WHERE k.user_id = $1 AND k.key = $2";
        const TAKE_OVER: &str = "UPDATE idempotency_keys SET request_hash = $3, state = 'in_flight', status_code = NULL, \
                                 location = NULL, response = NULL, created_at = $4, owner = $6 \
                                 WHERE user_id = $1 AND key = $2 AND created_at = $5";
        for _ in 0..3 {
            let at = now();
            let mut tx = self.db.begin().await?;
            let inserted = with_tx!(&mut tx, conn => {
                sqlx::query(INSERT).bind(key.user_id).bind(&key.key).bind(request_hash).bind(at)
                    .bind(&*self.owner).execute(conn).await?.rows_affected()
            });
            tx.commit().await?;
            if inserted == 1 {
                return Ok(Claim::Proceed(Claimed(at)));
            }
            let existing: Option<Existing> = with_pool!(self.db, pool => {
                sqlx::query_as(SELECT).bind(key.user_id).bind(&key.key).fetch_optional(pool).await?
            });
            let Some((hash, state, status, location, response, created_at, alive_until)) = existing
            else {
                continue; // deleted in between: try again
            };
            let expired = created_at < at - chrono::Duration::hours(RETENTION_HOURS);
            // In flight, and its request cannot be running: its process stopped
            // renewing, or the request is older than any request can be.
            let abandoned = state == "in_flight"
                && (alive_until.is_some_and(|until| until < at)
                    || created_at < at - self.abandoned_after);
            if expired || abandoned {
                let mut tx = self.db.begin().await?;
                let taken = with_tx!(&mut tx, conn => {
                    sqlx::query(TAKE_OVER).bind(key.user_id).bind(&key.key).bind(request_hash).bind(at)
                        .bind(created_at).bind(&*self.owner).execute(conn).await?.rows_affected()
                });
                tx.commit().await?;
                if taken == 1 {
                    return Ok(Claim::Proceed(Claimed(at)));
                }
                continue;
            }
            if hash != request_hash {
                return Ok(Claim::Mismatch);
            }
            return Ok(match (state.as_str(), status, response) {
                ("done", Some(status), Some(body)) => Claim::Replay(Stored {
                    status: u16::try_from(status).unwrap_or(500),
                    location,
                    body,
                }),
                _ => Claim::InFlight,
            });
        }
        Ok(Claim::InFlight)
    }

    /// Stores the response in the caller's transaction (the one that made the order).
    pub async fn complete_in(tx: &mut Tx, key: &KeyRef, stored: &Stored) -> Result<(), StoreError> {
        const Q: &str = "UPDATE idempotency_keys SET state = 'done', status_code = $3, location = $4, response = $5 \
                         WHERE user_id = $1 AND key = $2";
        with_tx!(tx, conn => {
            sqlx::query(Q)
                .bind(key.user_id)
                .bind(&key.key)
                .bind(i32::from(stored.status))
                .bind(&stored.location)
                .bind(&stored.body)
                .execute(conn)
                .await?;
        });
        Ok(())
    }

    /// Stores a response made without a transaction of its own (a refusal).
    pub async fn complete(&self, key: &KeyRef, stored: &Stored) -> Result<(), StoreError> {
        let mut tx = self.db.begin().await?;
        Self::complete_in(&mut tx, key, stored).await?;
        tx.commit().await
    }

    /// Forgets a key whose request failed for a reason worth retrying (a 5xx), so a
    /// retry with it goes ahead. When the database cannot be reached (the likely
    /// reason for the 5xx), keeps trying in the background, once a second, until the
    /// claim would count as abandoned anyway.
    pub async fn abandon(&self, key: &KeyRef, claimed: Claimed) {
        let Err(e) = self.release(key, claimed).await else {
            return;
        };
        tracing::warn!(error = %e, "idempotency key not released yet; retrying in the background");
        let (this, key) = (self.clone(), key.clone());
        tokio::spawn(async move {
            for _ in 0..ABANDONED_SECS {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                if this.release(&key, claimed).await.is_ok() {
                    return;
                }
            }
        });
    }

    async fn release(&self, key: &KeyRef, claimed: Claimed) -> Result<(), StoreError> {
        const Q: &str = "DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2 \
                         AND state = 'in_flight' AND created_at = $3";
        let mut tx = self.db.begin().await?;
        with_tx!(&mut tx, conn => {
            sqlx::query(Q).bind(key.user_id).bind(&key.key).bind(claimed.0).execute(conn).await?;
        });
        tx.commit().await
    }

    /// Deletes keys older than the retention; returns how many.
    pub async fn clean_up(&self) -> Result<u64, StoreError> {
        const Q: &str = "DELETE FROM idempotency_keys WHERE created_at < $1";
        const OWNERS: &str = "DELETE FROM idempotency_owners WHERE alive_until < $1";
        let cutoff = now() - chrono::Duration::hours(RETENTION_HOURS);
        let mut tx = self.db.begin().await?;
        let deleted = with_tx!(&mut tx, conn => {
            sqlx::query(OWNERS).bind(cutoff).execute(&mut *conn).await?;
            sqlx::query(Q).bind(cutoff).execute(conn).await?.rows_affected()
        });
        tx.commit().await?;
        Ok(deleted)
    }
}
