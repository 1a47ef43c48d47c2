//! The secrets of the HTTP layer: a ring of signing keys, each with a key id. From
//! each key's secret come the JWT signing key and the HMAC key for cursors and
//! consistency tokens (separated by purpose, so a cursor can never pass as a token
//! or the reverse). The newest key signs; every key of the ring verifies. What is
//! signed names its key: a JWT in its `kid` header, a cursor or consistency token
//! as `kid.payload.mac`. A value without a key id (made before key ids existed)
//! verifies against the ring's legacy keys.
//!
//! The ring comes from a [`KeySource`] (the key store in the database, shared by
//! every instance) or from one configured secret ([`Keys::new`], key id
//! [`STATIC_KID`]). A value naming a key this process does not know makes it reload
//! the ring ([`Keys::ensure_kid`]) at most once per [`MIN_RELOAD_INTERVAL`], so a
//! forged key id cannot send every request to the database; [`Keys::spawn_refresh`]
//! also reloads on a timer, which is how a rotation elsewhere becomes this
//! process's signing key.
//!
//! Handlers and extractors find the [`Keys`] of the request they serve through
//! [`Keys::current`] (or the [`RequestKeys`] extractor), so they work with any
//! router state: the observe layer sets them for the request's future (see
//! [`crate::scope`]).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use jsonwebtoken::{DecodingKey, EncodingKey, Validation};
use serde::de::DeserializeOwned;
use sha2::Sha256;
use tokio::time::Instant;

use crate::auth::TokenKeys;
use crate::error::ApiError;

type HmacSha256 = Hmac<Sha256>;

/// The key id of a configured secret (`jwt_secret`).
pub const STATIC_KID: &str = "static";
/// Reloads caused by unknown key ids are at least this far apart.
pub const MIN_RELOAD_INTERVAL: Duration = Duration::from_secs(1);
/// Upper bound of one reload from the source.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Key ids are short: `[0-9a-z-]`, at most this long. Anything else is not looked up.
const MAX_KID_LEN: usize = 40;

/// A secret with its key id, as a [`KeySource`] hands it over. Debug never shows
/// the secret.
#[derive(Clone)]
pub struct KeyMaterial {
    pub kid: String,
    pub secret: Vec<u8>,
    /// Verifies values that carry no key id (made before key ids existed).
    pub legacy: bool,
    /// The key that signs (the newest one).
    pub signing: bool,
}

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyMaterial")
            .field("kid", &self.kid)
            .field("legacy", &self.legacy)
            .field("signing", &self.signing)
            .finish_non_exhaustive()
    }
}

/// Where the ring's keys come from (the key store in the database).
pub trait KeySource: Send + Sync + 'static {
    /// Every key that verifies, one of them marked `signing`.
    fn load(&self) -> Pin<Box<dyn Future<Output = Result<Vec<KeyMaterial>, String>> + Send + '_>>;
}

/// Is this a key id worth looking up?
pub fn plausible_kid(kid: &str) -> bool {
    !kid.is_empty()
        && kid.len() <= MAX_KID_LEN
        && kid
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-')
}

/// One key of the ring, with what its secret derives to.
pub(crate) struct RingKey {
    pub(crate) kid: Arc<str>,
    pub(crate) jwt_encoding: EncodingKey,
    jwt_decoding: DecodingKey,
    opaque: Vec<u8>,
}

impl RingKey {
    fn new(kid: &str, secret: &[u8]) -> Self {
        let jwt = derive(secret, "jwt");
        Self {
            kid: Arc::from(kid),
            jwt_encoding: EncodingKey::from_secret(&jwt),
            jwt_decoding: DecodingKey::from_secret(&jwt),
            opaque: derive(secret, "opaque"),
        }
    }

    fn mac(&self, purpose: &str, payload: &[u8]) -> Vec<u8> {
        mac(&self.opaque, purpose, payload)
    }
}

/// The keys known at one time.
struct Ring {
    signing: Arc<RingKey>,
    by_kid: HashMap<Arc<str>, Arc<RingKey>>,
    legacy: Vec<Arc<RingKey>>,
}

impl Ring {
    fn build(material: &[KeyMaterial]) -> Result<Self, String> {
        let mut by_kid = HashMap::new();
        let mut legacy = Vec::new();
        let mut signing = None;
        for m in material {
            if !plausible_kid(&m.kid) {
                return Err(format!("key id {:?} is not [0-9a-z-]{{1,40}}", m.kid));
            }
            if m.secret.len() < 32 {
                return Err(format!("key {} is shorter than 32 bytes", m.kid));
            }
            let key = Arc::new(RingKey::new(&m.kid, &m.secret));
            if m.legacy {
                legacy.push(key.clone());
            }
            if m.signing {
                signing = Some(key.clone());
            }
            by_kid.insert(key.kid.clone(), key);
        }
        let signing = signing.ok_or("no signing key")?;
        Ok(Self {
            signing,
            by_kid,
            legacy,
        })
    }

    /// A ring of one key (a configured secret): it signs, and verifies values
    /// without a key id too.
    fn single(kid: &str, key: RingKey) -> Self {
        let key = Arc::new(RingKey {
            kid: Arc::from(kid),
            ..key
        });
        Self {
            signing: key.clone(),
            by_kid: HashMap::from([(key.kid.clone(), key.clone())]),
            legacy: vec![key],
        }
    }
}

/// The current ring, swapped whole on a reload; shared by [`Keys`], its
/// [`TokenKeys`] and its [`Signer`].
pub(crate) struct RingCell(ArcSwap<Ring>);

impl RingCell {
    fn new(ring: Ring) -> Arc<Self> {
        Arc::new(Self(ArcSwap::from_pointee(ring)))
    }

    /// One static key from a configured secret (key id [`STATIC_KID`]).
    pub(crate) fn from_secret(secret: &[u8]) -> Arc<Self> {
        Self::new(Ring::single(STATIC_KID, RingKey::new(STATIC_KID, secret)))
    }

    /// The key that signs now.
    pub(crate) fn signing(&self) -> Arc<RingKey> {
        self.0.load().signing.clone()
    }

    fn knows(&self, kid: &str) -> bool {
        self.0.load().by_kid.contains_key(kid)
    }

    /// The claims of a JWT signed by a key of the ring (the one its `kid` names, or
    /// a legacy key when it names none).
    pub(crate) fn decode_jwt<T: DeserializeOwned>(
        &self,
        token: &str,
        validation: &Validation,
    ) -> Option<T> {
        let header = jsonwebtoken::decode_header(token).ok()?;
        let ring = self.0.load();
        let decode = |key: &RingKey| {
            jsonwebtoken::decode::<T>(token, &key.jwt_decoding, validation)
                .ok()
                .map(|data| data.claims)
        };
        match header.kid.as_deref() {
            Some(kid) => decode(ring.by_kid.get(kid)?),
            None => ring.legacy.iter().find_map(|key| decode(key)),
        }
    }
}

fn mac(key: &[u8], purpose: &str, payload: &[u8]) -> Vec<u8> {
    // new_from_slice accepts keys of any length for HMAC.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => return Vec::new(),
    };
    mac.update(purpose.as_bytes());
    mac.update(&[0]);
    mac.update(payload);
    mac.finalize().into_bytes()[..16].to_vec()
}

/// Signs and checks small opaque values (cursors, consistency tokens) with the
/// ring's keys.
#[derive(Clone)]
pub struct Signer {
    ring: Arc<RingCell>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    /// A signer with one key derived from `secret` for `purpose` (key id
    /// [`STATIC_KID`]).
    pub fn new(secret: &[u8], purpose: &str) -> Self {
        let mut key = RingKey::new(STATIC_KID, secret);
        key.opaque = derive(secret, purpose);
        Self {
            ring: RingCell::new(Ring::single(STATIC_KID, key)),
        }
    }

    /// `kid "." base64url(payload) "." base64url(mac)`, signed by the signing key.
    pub fn sign(&self, purpose: &str, payload: &[u8]) -> String {
        let key = self.ring.signing();
        format!(
            "{}.{}.{}",
            key.kid,
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(key.mac(purpose, payload))
        )
    }

    /// The key id a signed value names, if any.
    pub fn kid_of(value: &str) -> Option<&str> {
        let mut parts = value.splitn(3, '.');
        let kid = parts.next()?;
        parts.next()?;
        parts.next().map(|_| kid)
    }

    /// The payload when the value is intact, was made for `purpose` and is signed by
    /// a key of the ring.
    pub fn verify(&self, purpose: &str, value: &str) -> Option<Vec<u8>> {
        let parts: Vec<&str> = value.split('.').collect();
        let (kid, payload, mac) = match parts[..] {
            [kid, payload, mac] => (Some(kid), payload, mac),
            [payload, mac] => (None, payload, mac),
            _ => return None,
        };
        let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let mac = URL_SAFE_NO_PAD.decode(mac).ok()?;
        let ring = self.ring.0.load();
        let intact = |key: &RingKey| constant_time_eq(&mac, &key.mac(purpose, &payload));
        let verified = match kid {
            Some(kid) => intact(ring.by_kid.get(kid)?),
            None => ring.legacy.iter().any(|key| intact(key)),
        };
        verified.then_some(payload)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn derive(secret: &[u8], purpose: &str) -> Vec<u8> {
    match HmacSha256::new_from_slice(secret) {
        Ok(mut mac) => {
            mac.update(b"scaleshop key derivation\0");
            mac.update(purpose.as_bytes());
            mac.finalize().into_bytes().to_vec()
        }
        Err(_) => secret.to_vec(),
    }
}

/// Every key of the HTTP layer.
pub struct Keys {
    pub tokens: TokenKeys,
    pub signer: Signer,
    ring: Arc<RingCell>,
    source: Option<Arc<dyn KeySource>>,
    /// When the last reload began; held while a reload runs, so reloads queue.
    reload: tokio::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ring = self.ring.0.load();
        let mut kids: Vec<&str> = ring.by_kid.keys().map(|k| &**k).collect();
        kids.sort_unstable();
        f.debug_struct("Keys")
            .field("signing", &&*ring.signing.kid)
            .field("kids", &kids)
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

impl Keys {
    /// One static key from a configured secret (key id [`STATIC_KID`]); it also
    /// verifies values without a key id.
    pub fn new(secret: &[u8], token_ttl: Duration) -> Arc<Self> {
        Arc::new(Self::with_ring(
            RingCell::from_secret(secret),
            None,
            token_ttl,
        ))
    }

    /// The keys of `source`, loaded now and reloaded when a value names an unknown
    /// key ([`Keys::ensure_kid`]) or on a timer ([`Keys::spawn_refresh`]).
    pub async fn from_source(
        source: Arc<dyn KeySource>,
        token_ttl: Duration,
    ) -> Result<Arc<Self>, String> {
        let material = load(source.as_ref()).await?;
        let ring = RingCell::new(Ring::build(&material)?);
        Ok(Arc::new(Self::with_ring(ring, Some(source), token_ttl)))
    }

    fn with_ring(
        ring: Arc<RingCell>,
        source: Option<Arc<dyn KeySource>>,
        token_ttl: Duration,
    ) -> Self {
        Self {
            tokens: TokenKeys::with_ring(ring.clone(), token_ttl),
            signer: Signer { ring: ring.clone() },
            ring,
            source,
            reload: tokio::sync::Mutex::new(None),
        }
    }

    /// The keys of the request being served (its [`crate::scope::RequestScope`]).
    pub fn current() -> Result<&'static Self, ApiError> {
        crate::scope::RequestScope::current_keys()
    }

    /// The id of the key that signs now.
    pub fn signing_kid(&self) -> String {
        self.ring.signing().kid.to_string()
    }

    /// Does the ring hold this key id?
    pub fn knows(&self, kid: &str) -> bool {
        self.ring.knows(kid)
    }

    /// Makes sure the ring knows `kid` if the source has it: an unknown (but
    /// plausible) key id reloads the ring, unless a reload that began after this
    /// call arrived already ran. Reloads are [`MIN_RELOAD_INTERVAL`] apart; a caller
    /// that needs one sooner waits for it (bounded by the request's timeout).
    pub async fn ensure_kid(&self, kid: &str) {
        if self.ring.knows(kid) || !plausible_kid(kid) {
            return;
        }
        let Some(source) = &self.source else {
            return;
        };
        let arrived = Instant::now();
        let mut last = self.reload.lock().await;
        if self.ring.knows(kid) {
            return;
        }
        if let Some(began) = *last {
            if began >= arrived {
                // A reload began after this value arrived and did not find its key.
                return;
            }
            tokio::time::sleep_until(began + MIN_RELOAD_INTERVAL).await;
        }
        *last = Some(Instant::now());
        if let Err(e) = self.reload_from(source.as_ref()).await {
            tracing::warn!(error = %e, "signing keys: reload failed");
        }
    }

    /// The key id a JWT names in its header, made known if the source has it.
    pub async fn ensure_token_kid(&self, token: &str) {
        if let Some(kid) = jsonwebtoken::decode_header(token).ok().and_then(|h| h.kid) {
            self.ensure_kid(&kid).await;
        }
    }

    /// The key id a cursor or consistency token names, made known if the source has
    /// it.
    pub async fn ensure_value_kid(&self, value: &str) {
        if let Some(kid) = Signer::kid_of(value) {
            self.ensure_kid(kid).await;
        }
    }

    /// Reloads the ring from its source now (a no-op for a static key).
    pub async fn refresh(&self) -> Result<(), String> {
        let Some(source) = &self.source else {
            return Ok(());
        };
        let mut last = self.reload.lock().await;
        *last = Some(Instant::now());
        self.reload_from(source.as_ref()).await
    }

    async fn reload_from(&self, source: &dyn KeySource) -> Result<(), String> {
        let material = load(source).await?;
        let ring = Ring::build(&material)?;
        let before = self.ring.signing().kid.clone();
        if before != ring.signing.kid {
            tracing::info!(kid = %ring.signing.kid, previous = %before, "signing keys: a new key signs");
        }
        self.ring.0.store(Arc::new(ring));
        Ok(())
    }

    /// Reloads the ring every `every` until `shutdown` turns true (nothing to do
    /// for a static key).
    pub fn spawn_refresh(
        self: &Arc<Self>,
        every: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        self.source.as_ref()?;
        let keys = self.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = keys.refresh().await {
                            tracing::warn!(error = %e, "signing keys: refresh failed");
                        }
                    }
                    _ = shutdown.changed() => return,
                }
            }
        }))
    }
}

async fn load(source: &dyn KeySource) -> Result<Vec<KeyMaterial>, String> {
    match tokio::time::timeout(RELOAD_TIMEOUT, source.load()).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no answer from the key store in {RELOAD_TIMEOUT:?}"
        )),
    }
}

/// The keys of this request, as an extractor (derefs to [`Keys`]).
#[derive(Debug, Clone)]
pub struct RequestKeys(pub &'static Keys);

impl std::ops::Deref for RequestKeys {
    type Target = Keys;

    fn deref(&self) -> &Keys {
        self.0
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestKeys {
    type Rejection = ApiError;

    async fn from_request_parts(_parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Keys::current().map(Self)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use parking_lot::Mutex;

    use super::*;

    #[test]
    fn sign_verify_and_tamper() {
        let s = Signer::new(b"secret", "x");
        let v = s.sign("cursor", b"hello");
        assert!(v.starts_with("static."), "{v}");
        assert_eq!(s.verify("cursor", &v).as_deref(), Some(&b"hello"[..]));
        assert_eq!(s.verify("token", &v), None, "purpose is bound");
        let mut forged = v.clone();
        let at = "static.".len();
        let flip = if v[at..].starts_with('a') { "b" } else { "a" };
        forged.replace_range(at..at + 1, flip);
        assert_eq!(s.verify("cursor", &forged), None);
        assert_eq!(Signer::new(b"other", "x").verify("cursor", &v), None);
        assert_eq!(s.verify("cursor", "garbage"), None);
        // Without the key id: the legacy form, checked against the legacy key.
        let bare = v.strip_prefix("static.").unwrap();
        assert_eq!(s.verify("cursor", bare).as_deref(), Some(&b"hello"[..]));
        let unknown = format!("other.{bare}");
        assert_eq!(s.verify("cursor", &unknown), None, "unknown key id");
        assert_eq!(Signer::kid_of(&v), Some("static"));
        assert_eq!(Signer::kid_of(bare), None);
    }

    /// A key source in memory that counts its loads.
    struct Memory {
        keys: Mutex<Vec<KeyMaterial>>,
        loads: AtomicUsize,
    }

    impl KeySource for Memory {
        fn load(
            &self,
        ) -> Pin<Box<dyn Future<Output = Result<Vec<KeyMaterial>, String>> + Send + '_>> {
            self.loads.fetch_add(1, Ordering::SeqCst);
            let keys = self.keys.lock().clone();
            Box::pin(async move { Ok(keys) })
        }
    }

    fn material(kid: &str, byte: u8, signing: bool) -> KeyMaterial {
        KeyMaterial {
            kid: kid.to_owned(),
            secret: vec![byte; 32],
            legacy: false,
            signing,
        }
    }

    #[tokio::test]
    async fn an_unknown_kid_reloads_at_most_once_per_interval() {
        let source = Arc::new(Memory {
            keys: Mutex::new(vec![material("one", 1, true)]),
            loads: AtomicUsize::new(0),
        });
        let keys = Keys::from_source(source.clone(), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(source.loads.load(Ordering::SeqCst), 1);
        let old = keys.signer.sign("cursor", b"1");
        assert!(old.starts_with("one."));

        // Another instance rotates: "two" is in the store, unknown here.
        let other = Keys::from_source(
            Arc::new(Memory {
                keys: Mutex::new(vec![material("one", 1, false), material("two", 2, true)]),
                loads: AtomicUsize::new(0),
            }),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        let new = other.signer.sign("cursor", b"2");
        assert_eq!(keys.signer.verify("cursor", &new), None);
        *source.keys.lock() = vec![material("one", 1, false), material("two", 2, true)];
        keys.ensure_value_kid(&new).await;
        assert_eq!(source.loads.load(Ordering::SeqCst), 2);
        assert_eq!(
            keys.signer.verify("cursor", &new).as_deref(),
            Some(&b"2"[..])
        );
        assert_eq!(
            keys.signer.verify("cursor", &old).as_deref(),
            Some(&b"1"[..])
        );
        assert_eq!(keys.signing_kid(), "two");

        // Forged key ids: many at once cost one reload per interval.
        let started = Instant::now();
        let forged: Vec<_> = (0..50)
            .map(|i| {
                let keys = keys.clone();
                tokio::spawn(async move { keys.ensure_kid(&format!("forged{i}")).await })
            })
            .collect();
        for task in forged {
            task.await.unwrap();
        }
        let loads = source.loads.load(Ordering::SeqCst) - 2;
        let elapsed = started.elapsed();
        assert!(loads >= 1, "{loads}");
        assert!(
            loads as u128 <= elapsed.as_millis() / MIN_RELOAD_INTERVAL.as_millis() + 1,
            "{loads} reloads in {elapsed:?}"
        );
        // Implausible key ids never reach the source.
        let before = source.loads.load(Ordering::SeqCst);
        keys.ensure_kid("NOT/a kid").await;
        keys.ensure_kid(&"x".repeat(100)).await;
        assert_eq!(source.loads.load(Ordering::SeqCst), before);
    }

    #[test]
    fn debug_shows_no_secret() {
        let m = material("one", 7, true);
        let text = format!("{m:?}");
        assert!(text.contains("one") && !text.contains('7'), "{text}");
        let keys = Keys::new(&[7u8; 32], Duration::from_secs(1));
        let text = format!("{keys:?}");
        assert!(text.contains("static") && !text.contains("[7"), "{text}");
    }
}
