//! The secrets of the HTTP layer, derived from one configured secret: the JWT signing
//! key and the HMAC key for cursors and consistency tokens (separated by purpose, so
//! a cursor can never pass as a token or the reverse).
//!
//! Handlers and extractors find the [`Keys`] of the request they serve through
//! [`Keys::current`] (or the [`RequestKeys`] extractor), so they work with any
//! router state: the observe layer sets them for the request's future (see
//! [`crate::scope`]).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::auth::TokenKeys;
use crate::error::ApiError;

type HmacSha256 = Hmac<Sha256>;

/// Signs and checks small opaque values (cursors, consistency tokens).
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    pub fn new(secret: &[u8], purpose: &str) -> Self {
        Self {
            key: derive(secret, purpose),
        }
    }

    fn mac(&self, purpose: &str, payload: &[u8]) -> Vec<u8> {
        // new_from_slice accepts keys of any length for HMAC.
        let mut mac = match HmacSha256::new_from_slice(&self.key) {
            Ok(mac) => mac,
            Err(_) => return Vec::new(),
        };
        mac.update(purpose.as_bytes());
        mac.update(&[0]);
        mac.update(payload);
        mac.finalize().into_bytes()[..16].to_vec()
    }

    /// `base64url(payload) "." base64url(mac)`.
    pub fn sign(&self, purpose: &str, payload: &[u8]) -> String {
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(self.mac(purpose, payload))
        )
    }

    /// The payload when the value is intact and was made for `purpose`.
    pub fn verify(&self, purpose: &str, value: &str) -> Option<Vec<u8>> {
        let (payload, mac) = value.split_once('.')?;
        let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let mac = URL_SAFE_NO_PAD.decode(mac).ok()?;
        let expected = self.mac(purpose, &payload);
        // Compared in constant time.
        (mac.len() == expected.len()
            && mac
                .iter()
                .zip(&expected)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0)
            .then_some(payload)
    }
}

fn derive(secret: &[u8], purpose: &str) -> Vec<u8> {
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
#[derive(Debug)]
pub struct Keys {
    pub tokens: TokenKeys,
    pub signer: Signer,
}

impl Keys {
    pub fn new(secret: &[u8], token_ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            tokens: TokenKeys::new(&derive(secret, "jwt"), token_ttl),
            signer: Signer::new(secret, "opaque"),
        })
    }

    /// The keys of the request being served (its [`crate::scope::RequestScope`]).
    pub fn current() -> Result<&'static Self, ApiError> {
        crate::scope::RequestScope::current_keys()
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

/// Serves every request with these keys in scope.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_tamper() {
        let s = Signer::new(b"secret", "x");
        let v = s.sign("cursor", b"hello");
        assert_eq!(s.verify("cursor", &v).as_deref(), Some(&b"hello"[..]));
        assert_eq!(s.verify("token", &v), None, "purpose is bound");
        let mut forged = v.clone();
        forged.replace_range(0..1, if v.starts_with('a') { "b" } else { "a" });
        assert_eq!(s.verify("cursor", &forged), None);
        assert_eq!(Signer::new(b"other", "x").verify("cursor", &v), None);
        assert_eq!(s.verify("cursor", "garbage"), None);
    }
}
