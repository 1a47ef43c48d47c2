//! Bearer tokens: HS256 JWTs with expiry, issuer and audience checked, the
//! algorithm pinned and the signing key named in the `kid` header, and the
//! [`Caller`] extractor that turns a token into a caller or a 401 with
//! `WWW-Authenticate: Bearer`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::ApiError;
use crate::keys::{Keys, RingCell};
use crate::scope::RequestScope;
use crate::sessions::Session;

const ISSUER: &str = "scaleshop";
const AUDIENCE: &str = "scaleshop-api";
/// The audience of service tokens: a user token is never one, and a service token
/// is never a user's.
const SERVICE_AUDIENCE: &str = "scaleshop-internal";
const SERVICE_ROLE: &str = "service";

/// The claims of a service token: which service calls.
#[derive(Debug, Serialize, Deserialize)]
struct ServiceClaims {
    sub: String,
    role: String,
    iat: i64,
    exp: i64,
    iss: String,
    aud: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: Uuid,
    role: String,
    iat: i64,
    exp: i64,
    iss: String,
    aud: String,
    /// The token's id: signing out refuses this id until the token expires.
    jti: Uuid,
    /// The user's session epoch at issue: a password change moves it on.
    sv: i64,
}

/// Issues and verifies session tokens with the keys of a ring.
pub struct TokenKeys {
    ring: Arc<RingCell>,
    validation: Validation,
    service_validation: Validation,
    ttl: Duration,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// A token just issued.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

impl TokenKeys {
    /// Tokens signed by one key from `secret` (what [`Keys::new`] makes of it).
    pub fn new(secret: &[u8], ttl: Duration) -> Self {
        Self::with_ring(RingCell::from_secret(secret), ttl)
    }

    pub(crate) fn with_ring(ring: Arc<RingCell>, ttl: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 5;
        let mut service_validation = validation.clone();
        service_validation.set_audience(&[SERVICE_AUDIENCE]);
        Self {
            ring,
            validation,
            service_validation,
            ttl,
        }
    }

    /// A token with which `service` calls another service's internal routes,
    /// signed by the deployment's current key, valid for `ttl`.
    pub fn issue_service(&self, service: &str, ttl: Duration) -> Result<String, ApiError> {
        let now = Utc::now().timestamp();
        let ttl = i64::try_from(ttl.as_secs()).map_err(ApiError::internal)?;
        let claims = ServiceClaims {
            sub: service.to_owned(),
            role: SERVICE_ROLE.to_owned(),
            iat: now,
            exp: now + ttl,
            iss: ISSUER.to_owned(),
            aud: SERVICE_AUDIENCE.to_owned(),
        };
        let key = self.ring.signing();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(key.kid.to_string());
        jsonwebtoken::encode(&header, &claims, &key.jwt_encoding).map_err(ApiError::internal)
    }

    /// The calling service named by a valid service token.
    pub fn verify_service(&self, token: &str) -> Option<ServiceCaller> {
        let claims = self
            .ring
            .decode_jwt::<ServiceClaims>(token, &self.service_validation)?;
        (claims.role == SERVICE_ROLE).then_some(ServiceCaller {
            service: claims.sub,
        })
    }

    /// A token for this user and role, in the user's current session epoch.
    pub fn issue(
        &self,
        user_id: Uuid,
        admin: bool,
        session_epoch: i64,
    ) -> Result<IssuedToken, ApiError> {
        let now = Utc::now();
        let ttl = chrono::Duration::from_std(self.ttl).map_err(ApiError::internal)?;
        let expires_at = now + ttl;
        let claims = Claims {
            sub: user_id,
            role: if admin { "admin" } else { "customer" }.to_owned(),
            iat: now.timestamp(),
            exp: expires_at.timestamp(),
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            jti: Uuid::now_v7(),
            sv: session_epoch,
        };
        let key = self.ring.signing();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(key.kid.to_string());
        let token = jsonwebtoken::encode(&header, &claims, &key.jwt_encoding)
            .map_err(ApiError::internal)?;
        let expires_at = DateTime::from_timestamp(claims.exp, 0).unwrap_or(expires_at);
        Ok(IssuedToken { token, expires_at })
    }

    /// The caller named by a valid token (signature and claims only: whether its
    /// session is still live is for [`crate::sessions::SessionCheck`]).
    pub fn verify(&self, token: &str) -> Option<Caller> {
        let claims = self.ring.decode_jwt::<Claims>(token, &self.validation)?;
        let is_admin = match claims.role.as_str() {
            "admin" => true,
            "customer" => false,
            _ => return None,
        };
        Some(Caller {
            user_id: claims.sub,
            is_admin,
            session: Session {
                id: claims.jti,
                epoch: claims.sv,
                expires_at: claims.exp,
            },
        })
    }
}

/// The signed-in caller of a request. As an extractor it answers 401 when the
/// `Authorization: Bearer` token is missing, malformed, expired or forged, and
/// when its session is no longer live (signed out, ended by a password change,
/// or the account is gone), as the request scope's
/// [`crate::sessions::SessionCheck`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub user_id: Uuid,
    pub is_admin: bool,
    /// The token's session.
    pub session: Session,
}

impl Caller {
    /// May this caller touch a resource owned by `owner`?
    pub fn may_access(&self, owner: Uuid) -> bool {
        self.is_admin || self.user_id == owner
    }

    /// 403 for a customer on an admin-only route. (A resource of another user is a
    /// 404 instead, decided by the handler: see [`Caller::may_access`].)
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin {
            Ok(())
        } else {
            Err(ApiError::new(crate::ErrorCode::Forbidden).detail("this route is for admins"))
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let keys = Keys::current()?;
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ApiError::unauthenticated().detail("a bearer token is required"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| ApiError::unauthenticated().detail("use the Bearer scheme"))?;
        let token = token.trim();
        keys.ensure_token_kid(token).await;
        let caller = keys
            .tokens
            .verify(token)
            .ok_or_else(|| ApiError::unauthenticated().detail("the token is invalid or expired"))?;
        if let Some(sessions) = RequestScope::current_sessions()?
            && !sessions.is_live(&caller).await?
        {
            return Err(ApiError::unauthenticated().detail("the session has ended"));
        }
        Ok(caller)
    }
}

/// Another service of the deployment calling an internal route. As an extractor it
/// answers 401 unless the request carries a valid service token (a user's token,
/// even an admin's, is refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceCaller {
    pub service: String,
}

impl<S: Send + Sync> FromRequestParts<S> for ServiceCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let keys = Keys::current()?;
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| ApiError::unauthenticated().detail("a service token is required"))?;
        keys.ensure_token_kid(token).await;
        keys.tokens
            .verify_service(token)
            .ok_or_else(|| ApiError::unauthenticated().detail("a valid service token is required"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_tokens_and_user_tokens_never_pass_for_each_other() {
        let keys = TokenKeys::new(b"0123456789abcdef0123456789abcdef", Duration::from_secs(60));
        let service = keys
            .issue_service("orders", Duration::from_secs(60))
            .unwrap();
        assert_eq!(keys.verify_service(&service).unwrap().service, "orders");
        assert!(keys.verify(&service).is_none());
        let admin = keys.issue(Uuid::now_v7(), true, 0).unwrap();
        assert!(keys.verify_service(&admin.token).is_none());
        let other = TokenKeys::new(b"another-secret-another-secret-xx", Duration::from_secs(60));
        assert!(other.verify_service(&service).is_none());
    }

    #[test]
    fn issue_and_verify() {
        let keys = TokenKeys::new(b"0123456789abcdef0123456789abcdef", Duration::from_secs(60));
        let id = Uuid::now_v7();
        let issued = keys.issue(id, true, 7).unwrap();
        let caller = keys.verify(&issued.token).unwrap();
        assert_eq!((caller.user_id, caller.is_admin), (id, true));
        assert_eq!(caller.session.epoch, 7);
        assert_eq!(caller.session.expires_at, issued.expires_at.timestamp());
        let again = keys
            .verify(&keys.issue(id, true, 7).unwrap().token)
            .unwrap();
        assert_ne!(
            again.session.id, caller.session.id,
            "each token has its own id"
        );
        let other = TokenKeys::new(
            b"another secret of some length ...",
            Duration::from_secs(60),
        );
        assert_eq!(other.verify(&issued.token), None);
        let header = jsonwebtoken::decode_header(&issued.token).unwrap();
        assert_eq!(header.kid.as_deref(), Some(crate::keys::STATIC_KID));
    }

    #[test]
    fn expired_and_wrong_algorithm_are_refused() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let keys = TokenKeys::new(secret, Duration::from_secs(60));
        let now = Utc::now().timestamp();
        let claims = Claims {
            sub: Uuid::now_v7(),
            role: "admin".into(),
            iat: now - 100,
            exp: now - 60,
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            jti: Uuid::now_v7(),
            sv: 0,
        };
        let enc = jsonwebtoken::EncodingKey::from_secret(&crate::keys::derive(secret, "jwt"));
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("static".into());
        let fresh = Claims {
            exp: now + 60,
            ..claims
        };
        let valid = jsonwebtoken::encode(&header, &fresh, &enc).unwrap();
        assert!(keys.verify(&valid).is_some(), "the same key verifies");
        let no_kid = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &fresh, &enc).unwrap();
        assert!(
            keys.verify(&no_kid).is_some(),
            "made before key ids: the legacy key"
        );
        let mut unknown = Header::new(Algorithm::HS256);
        unknown.kid = Some("0123456789abcdef".into());
        let unknown = jsonwebtoken::encode(&unknown, &fresh, &enc).unwrap();
        assert_eq!(
            keys.verify(&unknown),
            None,
            "a key id the ring does not hold"
        );
        let claims = Claims {
            exp: now - 60,
            ..fresh
        };
        let expired = jsonwebtoken::encode(&header, &claims, &enc).unwrap();
        assert_eq!(keys.verify(&expired), None);
        let fresh = Claims {
            exp: now + 60,
            ..claims
        };
        let mut hs512 = Header::new(Algorithm::HS512);
        hs512.kid = Some("static".into());
        let hs512 = jsonwebtoken::encode(&hs512, &fresh, &enc).unwrap();
        assert_eq!(keys.verify(&hs512), None, "algorithm is pinned");
        // A token without a session id or epoch (as issued before sessions could
        // end) is refused: it could never be signed out.
        let mut old = serde_json::to_value(&fresh).unwrap();
        old.as_object_mut().unwrap().remove("jti");
        old.as_object_mut().unwrap().remove("sv");
        let old = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &old, &enc).unwrap();
        assert_eq!(keys.verify(&old), None, "no session claims");
        let good = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &fresh, &enc).unwrap();
        assert!(keys.verify(&good).is_some());
    }
}
