//! Use cases of the users service: sign-up, sign-in, read, update, search, and the
//! admin account ensured at start. Knows the store port and the hasher, no HTTP.

use std::sync::Arc;

use chrono::{SubsecRound, Utc};
use scaleshop_cache::{CacheSettings, Loaded, TieredCache};
use scaleshop_contracts::{UserCreated, UserUpdated};
use scaleshop_db::{Consistency, StoreError};
use scaleshop_events::NewEvent;
use uuid::Uuid;

use crate::domain::{Email, NewUser, Password, Role, User, UserName, UserPatch, UserRecord};
pub use crate::hashing::Hasher;
use crate::sessions::Sessions;
use crate::store::UserStore;

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("the email is taken")]
    EmailTaken,
    #[error("no such user")]
    NotFound,
    #[error("wrong email or password")]
    BadCredentials,
    /// Changing the email or the password needs the current password.
    #[error("the current password is required")]
    CurrentPasswordRequired,
    #[error("the current password is wrong")]
    WrongCurrentPassword,
    #[error("password hashing failed: {0}")]
    Hashing(String),
    /// Every password hashing slot stayed busy for the whole queue wait.
    #[error("password hashing is busy")]
    Busy,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The users service.
#[derive(Clone)]
pub struct Users {
    store: Arc<dyn UserStore>,
    hasher: Hasher,
    cache: Arc<TieredCache<User>>,
    sessions: Sessions,
}

/// A user who signed in, with the session epoch their token carries.
#[derive(Debug, Clone)]
pub struct SignedIn {
    pub user: User,
    pub session_epoch: i64,
}

/// Who asks for a change of an account, and the password they gave as proof.
#[derive(Debug, Clone, Copy)]
pub struct ChangedBy<'a> {
    pub user_id: Uuid,
    pub is_admin: bool,
    pub current_password: Option<&'a str>,
}

impl ChangedBy<'_> {
    /// Must a change of `account` prove the account's current password? Yes when
    /// it `changes_secret` (the email or the password), unless an admin changes
    /// someone else's account.
    pub fn must_prove(&self, account: Uuid, changes_secret: bool) -> bool {
        changes_secret && self.is_own(account)
    }

    /// Is the change made by the account's owner (an admin's own account
    /// included)? Only then is a given `current_password` checked.
    fn is_own(&self, account: Uuid) -> bool {
        !(self.is_admin && self.user_id != account)
    }
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Users")
    }
}

fn created_event(user: &User) -> Result<NewEvent, StoreError> {
    NewEvent::typed(
        user.id,
        &UserCreated {
            user_id: user.id,
            email: user.email.as_str().to_owned(),
            name: user.name.as_str().to_owned(),
            role: user.role.as_str().to_owned(),
        },
    )
}

fn updated_event(user: &User, changed: &[&str]) -> Result<NewEvent, StoreError> {
    NewEvent::typed(
        user.id,
        &UserUpdated {
            user_id: user.id,
            email: user.email.as_str().to_owned(),
            name: user.name.as_str().to_owned(),
            role: user.role.as_str().to_owned(),
            changed: changed.iter().map(|c| (*c).to_owned()).collect(),
        },
    )
}

fn conflict_to_taken(error: StoreError) -> UsersError {
    match error {
        StoreError::Conflict(_) => UsersError::EmailTaken,
        other => UsersError::Store(other),
    }
}

impl Users {
    /// With an in-process cache only; see [`Users::with_cache`].
    pub fn new(store: Arc<dyn UserStore>) -> Self {
        let cache = Arc::new(TieredCache::new("users", None, CacheSettings::default()));
        let sessions = Sessions::new(store.clone());
        Self {
            store,
            hasher: Hasher::default(),
            cache,
            sessions,
        }
    }

    /// Uses this cache for the state of sessions (see [`Sessions::with_cache`]).
    pub fn with_sessions_cache(
        mut self,
        cache: Arc<TieredCache<crate::domain::SessionState>>,
    ) -> Self {
        self.sessions = Sessions::with_cache(self.store.clone(), cache);
        self
    }

    /// The sessions: the check behind every token, sign-out, clean-up.
    pub fn sessions(&self) -> Sessions {
        self.sessions.clone()
    }

    /// Uses this cache (e.g. one with a shared Redis tier) for reads by id.
    pub fn with_cache(mut self, cache: Arc<TieredCache<User>>) -> Self {
        self.cache = cache;
        self
    }

    /// Hashes passwords with this hasher (its concurrency and queue wait).
    pub fn with_hasher(mut self, hasher: Hasher) -> Self {
        self.hasher = hasher;
        self
    }

    pub fn cache(&self) -> Arc<TieredCache<User>> {
        self.cache.clone()
    }

    /// A user by id, through the cache (cache-aside); a miss may be read from a
    /// replica (within `consistency`). `fresh_since` (from a consistency token,
    /// µs) bypasses entries whose data may be older.
    pub async fn get_cached(
        &self,
        id: Uuid,
        fresh_since: Option<i64>,
        consistency: Consistency,
    ) -> Result<User, UsersError> {
        let store = self.store.clone();
        let found = self
            .cache
            .get_or_load(&id.to_string(), fresh_since, || async move {
                let (record, as_of) = store.read(id, consistency).await?;
                Ok::<_, StoreError>(Loaded {
                    value: record.map(|r| r.user),
                    as_of_micros: Some(as_of),
                })
            })
            .await
            .map_err(|e| UsersError::Store((*e).clone()))?;
        found
            .map(|user| (*user).clone())
            .ok_or(UsersError::NotFound)
    }

    pub async fn register(&self, new: NewUser) -> Result<User, UsersError> {
        self.create(new, Role::Customer).await
    }

    async fn create(&self, new: NewUser, role: Role) -> Result<User, UsersError> {
        let password_hash = self.hasher.hash(&new.password).await?;
        let now = Utc::now().trunc_subsecs(6);
        let user = User {
            id: Uuid::now_v7(),
            email: new.email,
            name: new.name,
            role,
            created_at: now,
            updated_at: now,
        };
        let record = UserRecord {
            user,
            password_hash,
            session_epoch: 0,
        };
        let event = created_event(&record.user)?;
        self.store
            .insert(&record, &event)
            .await
            .map_err(conflict_to_taken)?;
        Ok(record.user)
    }

    /// The account for these credentials, with its session epoch (read with the
    /// hash, so a password changed meanwhile ends this session too). A wrong
    /// email and a wrong password are the same error and cost the same time.
    pub async fn authenticate(&self, email: &str, password: &str) -> Result<SignedIn, UsersError> {
        let record = match Email::parse(email) {
            Ok(email) => self.store.get_by_email(&email).await?,
            Err(_) => None,
        };
        match record {
            Some(record) => {
                if self.hasher.verify(password, &record.password_hash).await? {
                    Ok(SignedIn {
                        user: record.user,
                        session_epoch: record.session_epoch,
                    })
                } else {
                    Err(UsersError::BadCredentials)
                }
            }
            None => {
                let decoy = self.hasher.decoy().await?;
                let _ = self.hasher.verify(password, &decoy).await?;
                Err(UsersError::BadCredentials)
            }
        }
    }

    pub async fn get(&self, id: Uuid) -> Result<User, UsersError> {
        self.store
            .get(id)
            .await?
            .map(|r| r.user)
            .ok_or(UsersError::NotFound)
    }

    /// Applies a patch; publishes `user.updated` when something changed. A change
    /// of the email or the password proves the current password (see
    /// [`ChangedBy::must_prove`]), and a current password given by the owner is
    /// checked whatever changes; a new password ends every session of the user
    /// issued before it, the one that asked included.
    pub async fn update(
        &self,
        id: Uuid,
        patch: UserPatch,
        by: ChangedBy<'_>,
    ) -> Result<User, UsersError> {
        let mut record = self.store.get(id).await?.ok_or(UsersError::NotFound)?;
        // A given current password must be right, even when the change does not
        // need it (an admin changing another account gives none of theirs).
        let proof = by.current_password.filter(|_| by.is_own(id));
        if proof.is_none() && by.must_prove(id, patch.email.is_some() || patch.password.is_some()) {
            return Err(UsersError::CurrentPasswordRequired);
        }
        // argon2 compares its outputs in constant time.
        if let Some(given) = proof
            && !self.hasher.verify(given, &record.password_hash).await?
        {
            return Err(UsersError::WrongCurrentPassword);
        }
        let new_password = patch.password.is_some();
        let mut changed = Vec::new();
        if let Some(email) = patch.email.filter(|e| *e != record.user.email) {
            record.user.email = email;
            changed.push("email");
        }
        if let Some(name) = patch.name.filter(|n| *n != record.user.name) {
            record.user.name = name;
            changed.push("name");
        }
        if let Some(password) = patch.password {
            record.password_hash = self.hasher.hash(&password).await?;
            changed.push("password");
        }
        if changed.is_empty() {
            return Ok(record.user);
        }
        record.user.updated_at = Utc::now().trunc_subsecs(6).max(record.user.updated_at);
        let event = updated_event(&record.user, &changed)?;
        self.store
            .update(&record, &event)
            .await
            .map_err(conflict_to_taken)?;
        self.cache.invalidate(&id.to_string()).await;
        if new_password {
            self.sessions.forget(id).await;
        }
        Ok(record.user)
    }

    pub async fn search(
        &self,
        text: Option<&str>,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<User>, UsersError> {
        let text = text.map(str::trim).filter(|t| !t.is_empty());
        let records = self.store.search(text, after, limit).await?;
        Ok(records.into_iter().map(|r| r.user).collect())
    }

    /// Makes sure the admin account exists with role admin and this password.
    pub async fn ensure_admin(&self, email: Email, password: Password) -> Result<User, UsersError> {
        match self.store.get_by_email(&email).await? {
            None => {
                let name = UserName::parse("Administrator")
                    .map_err(|e| UsersError::Hashing(e.to_string()))?;
                match self
                    .create(
                        NewUser {
                            email: email.clone(),
                            name,
                            password: password.clone(),
                        },
                        Role::Admin,
                    )
                    .await
                {
                    // Another process won the race: fall through to the update path.
                    Err(UsersError::EmailTaken) => {
                        Box::pin(self.ensure_admin(email, password)).await
                    }
                    other => other,
                }
            }
            Some(mut record) => {
                let password_ok = self
                    .hasher
                    .verify(password.expose(), &record.password_hash)
                    .await?;
                if record.user.role == Role::Admin && password_ok {
                    return Ok(record.user);
                }
                let mut changed = Vec::new();
                if record.user.role != Role::Admin {
                    record.user.role = Role::Admin;
                    changed.push("role");
                }
                if !password_ok {
                    record.password_hash = self.hasher.hash(&password).await?;
                    changed.push("password");
                }
                record.user.updated_at = Utc::now().trunc_subsecs(6).max(record.user.updated_at);
                let event = updated_event(&record.user, &changed)?;
                self.store.update(&record, &event).await?;
                self.cache.invalidate(&record.user.id.to_string()).await;
                self.sessions.forget(record.user.id).await;
                Ok(record.user)
            }
        }
    }
}
