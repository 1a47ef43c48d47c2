//! Sessions that end. A token names its user, its own id and the user's session
//! epoch when it was issued; it is live while the user exists, the epoch is
//! still the user's (a password change moves it on) and its id was not signed
//! out. [`Sessions`] answers that for the HTTP kit's [`SessionCheck`] port from a
//! cache of each user's [`SessionState`], so a request does not read the
//! database: the process that ends a session drops the entry at once, and other
//! processes drop theirs when the `user.updated` / `session.ended` event reaches
//! them through the event log (see the composition root's invalidation).

use std::sync::Arc;
use std::time::Duration;

use scaleshop_cache::{CacheSettings, TieredCache};
use scaleshop_contracts::SessionEnded;
use scaleshop_db::StoreError;
use scaleshop_events::NewEvent;
use scaleshop_web::sessions::{SessionCheck, SessionFuture};
use scaleshop_web::{ApiError, Caller};
use uuid::Uuid;

use crate::domain::SessionState;
use crate::store::UserStore;

/// The name of the sessions cache (its metrics' `cache` label).
pub const CACHE_NAME: &str = "sessions";

/// How long a signed-out token's id is kept past its expiry (the verifier's
/// leeway on `exp` is a few seconds).
const KEEP_PAST_EXPIRY_SECS: i64 = 60;

/// The users service's sessions: the check behind every bearer token, sign-out,
/// and the clean-up of signed-out tokens that have expired.
#[derive(Clone)]
pub struct Sessions {
    store: Arc<dyn UserStore>,
    cache: Arc<TieredCache<SessionState>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sessions")
    }
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

impl Sessions {
    /// With an in-process cache of default settings (TTL 60 s).
    pub fn new(store: Arc<dyn UserStore>) -> Self {
        let settings = CacheSettings {
            l1_ttl: Duration::from_secs(60),
            ..CacheSettings::default()
        };
        Self::with_cache(
            store,
            Arc::new(TieredCache::new(CACHE_NAME, None, settings)),
        )
    }

    /// Uses this cache. Give it no Redis tier: a verdict kept in a shared tier
    /// would outlive a lost invalidation by the tier's TTL; each process keeps
    /// its own, invalidated through the event log and bounded by its L1 TTL.
    pub fn with_cache(store: Arc<dyn UserStore>, cache: Arc<TieredCache<SessionState>>) -> Self {
        Self { store, cache }
    }

    pub fn cache(&self) -> Arc<TieredCache<SessionState>> {
        self.cache.clone()
    }

    /// The state of a user's sessions, through the cache; `None` when the user
    /// does not exist (remembered for the cache's negative TTL).
    pub async fn state(&self, user_id: Uuid) -> Result<Option<SessionState>, StoreError> {
        let store = self.store.clone();
        let found = self
            .cache
            .get_or_load(&user_id.to_string(), None, || async move {
                store.session_state(user_id, now_secs()).await
            })
            .await
            .map_err(|e| (*e).clone())?;
        Ok(found.map(|state| (*state).clone()))
    }

    /// Signs out the caller's token: it is refused from now on (here at once,
    /// elsewhere once the `session.ended` event reaches the process).
    pub async fn end(&self, caller: &Caller) -> Result<(), StoreError> {
        let event = NewEvent::typed(
            caller.user_id,
            &SessionEnded {
                user_id: caller.user_id,
                session_id: caller.session.id,
            },
        )?;
        self.store
            .end_session(
                caller.user_id,
                caller.session.id,
                caller.session.expires_at,
                &event,
            )
            .await?;
        self.forget(caller.user_id).await;
        Ok(())
    }

    /// Drops the cached state of a user's sessions (after a write changed it).
    pub async fn forget(&self, user_id: Uuid) {
        self.cache.invalidate(&user_id.to_string()).await;
    }

    /// Forgets signed-out tokens that have expired (they are refused anyway);
    /// how many.
    pub async fn clean_up(&self) -> Result<u64, StoreError> {
        self.store
            .forget_ended_sessions(now_secs() - KEEP_PAST_EXPIRY_SECS)
            .await
    }
}

impl SessionCheck for Sessions {
    fn is_live<'a>(&'a self, caller: &'a Caller) -> SessionFuture<'a> {
        Box::pin(async move {
            let state = self.state(caller.user_id).await.map_err(ApiError::from)?;
            Ok(state.is_some_and(|s| s.admits(caller.session.epoch, caller.session.id)))
        })
    }
}
