//! HTTP routes of the users service, exactly as `api.md` lists them.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use chrono::{DateTime, Utc};
use scaleshop_web::page::PageParams;
use scaleshop_web::ratelimit::{KeyedLimit, SharedLimiter};
use scaleshop_web::{
    ApiError, Caller, ConsistencyToken, ErrorCode, Fields, Id, JsonObject, Keys, Page, Paginated,
    Peer, Problem, ReadConsistency, RequestKeys,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::domain::{Email, NewUser, Password, User, UserName, UserPatch};
use crate::service::{ChangedBy, Users, UsersError};

/// Sign-in limits (brute-force protection) and the sign-up limit per address.
#[derive(Debug, Clone, Copy)]
pub struct LoginLimits {
    pub per_address_per_minute: NonZeroU32,
    pub per_email_per_minute: NonZeroU32,
    pub signup_per_address_per_minute: NonZeroU32,
}

#[derive(Clone)]
struct UsersHttp {
    users: Users,
    by_address: Arc<KeyedLimit<IpAddr>>,
    by_email: Arc<KeyedLimit<String>>,
    signup_by_address: Arc<KeyedLimit<IpAddr>>,
}

/// The routes, and a handle that forgets idle rate-limit keys (call it now and then).
/// With `shared`, the limits hold across every process (see `KeyedLimit::shared`).
pub fn router(
    users: Users,
    limits: LoginLimits,
    shared: Option<Arc<dyn SharedLimiter>>,
) -> (OpenApiRouter, impl Fn() + Send + Sync + 'static) {
    let by_address = Arc::new(
        KeyedLimit::per_minute("login_address", limits.per_address_per_minute)
            .shared(shared.clone()),
    );
    let by_email = Arc::new(
        KeyedLimit::per_minute("login_email", limits.per_email_per_minute).shared(shared.clone()),
    );
    let signup_by_address = Arc::new(
        KeyedLimit::per_minute("signup_address", limits.signup_per_address_per_minute)
            .shared(shared),
    );
    let forget = {
        let (a, e, s) = (
            by_address.clone(),
            by_email.clone(),
            signup_by_address.clone(),
        );
        move || {
            a.forget_idle();
            e.forget_idle();
            s.forget_idle();
        }
    };
    let state = UsersHttp {
        users,
        by_address,
        by_email,
        signup_by_address,
    };
    let router = OpenApiRouter::new()
        .routes(routes!(create_user, search_users))
        .routes(routes!(get_user, patch_user))
        .routes(routes!(create_session))
        .routes(routes!(end_session))
        .routes(routes!(me))
        .with_state(state);
    (router, forget)
}

impl From<UsersError> for ApiError {
    fn from(error: UsersError) -> Self {
        match error {
            UsersError::EmailTaken => ApiError::conflict("the email is taken"),
            UsersError::NotFound => ApiError::not_found(),
            UsersError::BadCredentials => {
                ApiError::unauthenticated().detail("wrong email or password")
            }
            UsersError::CurrentPasswordRequired => ApiError::invalid(
                CURRENT_PASSWORD,
                "is required to change the email or the password",
            ),
            UsersError::WrongCurrentPassword => {
                ApiError::invalid(CURRENT_PASSWORD, "is not the current password")
            }
            UsersError::Hashing(cause) => ApiError::internal(cause),
            UsersError::Busy => ApiError::new(ErrorCode::Unavailable)
                .detail("password hashing is busy; try again shortly")
                .retry_after(1),
            UsersError::Store(error) => error.into(),
        }
    }
}

/// A user account (never a password or a hash).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    pub id: Uuid,
    pub email: String,
    pub name: String,
    /// `customer` or `admin`.
    pub role: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<User> for UserView {
    fn from(user: User) -> Self {
        Self {
            id: user.id,
            email: user.email.as_str().to_owned(),
            name: user.name.as_str().to_owned(),
            role: user.role.as_str().to_owned(),
            created_at: user.created_at,
            updated_at: user.updated_at,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code, reason = "documents the body; parsing goes through Fields")]
struct CreateUserRequest {
    /// A valid address, at most 254 characters; stored lower-cased.
    email: String,
    /// 1..=100 characters after trimming; no bidi controls or invisible characters.
    name: String,
    /// 8..=128 characters.
    password: String,
}

/// The body field that proves a change of the email or the password.
const CURRENT_PASSWORD: &str = "current_password";

#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code, reason = "documents the body; parsing goes through Fields")]
struct PatchUserRequest {
    /// A valid address, at most 254 characters; stored lower-cased.
    email: Option<String>,
    /// 1..=100 characters after trimming; no bidi controls or invisible characters.
    name: Option<String>,
    /// 8..=128 characters. Ends every earlier session of the user (this one too).
    password: Option<String>,
    /// The account's current password: required with `email` or `password`
    /// (except for an admin changing another account); a wrong one is a 422 on
    /// this field.
    current_password: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code, reason = "documents the body; parsing goes through Fields")]
struct SessionRequest {
    email: String,
    password: String,
}

/// A session token.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    pub token: String,
    /// Always `Bearer`.
    pub token_type: String,
    pub expires_at: DateTime<Utc>,
    pub user_id: Uuid,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code, reason = "documents the query; read by hand")]
struct SearchParams {
    /// Text matched against name and email (case-insensitive).
    q: Option<String>,
}

type Headers = [(HeaderName, HeaderValue); 1];

async fn written(keys: &Keys) -> Headers {
    [ConsistencyToken::after_commit().await.header(keys)]
}

/// Sign up. Rate limited per client address.
#[utoipa::path(
    post, path = "/v1/users", tag = "users",
    request_body = CreateUserRequest,
    responses(
        (status = 201, description = "Created", body = UserView,
         headers(("Location" = String), ("X-Consistency-Token" = String))),
        (status = 409, description = "Email taken", body = Problem),
        (status = 422, description = "Invalid", body = Problem),
        (status = 429, description = "Too many sign-ups", body = Problem, headers(("Retry-After" = u64))),
        (status = 503, description = "Busy", body = Problem, headers(("Retry-After" = u64))),
    )
)]
async fn create_user(
    State(http): State<UsersHttp>,
    keys: RequestKeys,
    Peer(peer): Peer,
    body: JsonObject,
) -> Result<(StatusCode, [(HeaderName, HeaderValue); 2], Json<UserView>), ApiError> {
    let mut f = Fields::new(body);
    let email = f.required("email", |s: String| Email::parse(&s));
    let name = f.required("name", |s: String| UserName::parse(&s));
    let password = f.required("password", |s: String| Password::parse(&s));
    f.finish()?;
    let (Some(email), Some(name), Some(password)) = (email, name, password) else {
        return Err(ApiError::internal("fields checked but missing"));
    };
    http.signup_by_address.check(&peer.ip()).await?;
    let user = http
        .users
        .register(NewUser {
            email,
            name,
            password,
        })
        .await?;
    let location =
        HeaderValue::from_str(&format!("/v1/users/{}", user.id)).map_err(ApiError::internal)?;
    let [token] = written(&keys).await;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location), token],
        Json(user.into()),
    ))
}

/// Sign in: a bearer token for these credentials. Rate limited per client address
/// and per email.
#[utoipa::path(
    post, path = "/v1/sessions", tag = "users",
    request_body = SessionRequest,
    responses(
        (status = 201, description = "Signed in", body = SessionView),
        (status = 401, description = "Wrong email or password", body = Problem),
        (status = 422, description = "Invalid", body = Problem),
        (status = 429, description = "Too many attempts", body = Problem, headers(("Retry-After" = u64))),
        (status = 503, description = "Busy", body = Problem, headers(("Retry-After" = u64))),
    )
)]
async fn create_session(
    State(http): State<UsersHttp>,
    keys: RequestKeys,
    Peer(peer): Peer,
    body: JsonObject,
) -> Result<(StatusCode, Headers, Json<SessionView>), ApiError> {
    let mut f = Fields::new(body);
    let email = f.required("email", scaleshop_web::body::any::<String>);
    let password = f.required("password", scaleshop_web::body::any::<String>);
    f.finish()?;
    let (Some(email), Some(password)) = (email, password) else {
        return Err(ApiError::internal("fields checked but missing"));
    };
    http.by_address.check(&peer.ip()).await?;
    http.by_email.check(&email.trim().to_lowercase()).await?;
    let signed_in = http.users.authenticate(&email, &password).await?;
    let user = signed_in.user;
    let issued = keys.tokens.issue(
        user.id,
        user.role == crate::domain::Role::Admin,
        signed_in.session_epoch,
    )?;
    let token = ConsistencyToken::at(Utc::now()).header(&keys);
    Ok((
        StatusCode::CREATED,
        [token],
        Json(SessionView {
            token: issued.token,
            token_type: "Bearer".to_owned(),
            expires_at: issued.expires_at,
            user_id: user.id,
        }),
    ))
}

/// Sign out: the token of this request is refused from now on (by every process
/// of the deployment, within the staleness bound of the docs).
#[utoipa::path(
    delete, path = "/v1/sessions/current", tag = "users", security(("bearer" = [])),
    responses(
        (status = 204, description = "Signed out", headers(("X-Consistency-Token" = String))),
        (status = 401, description = "Not signed in", body = Problem),
    )
)]
async fn end_session(
    State(http): State<UsersHttp>,
    keys: RequestKeys,
    caller: Caller,
) -> Result<(StatusCode, Headers), ApiError> {
    http.users.sessions().end(&caller).await?;
    Ok((StatusCode::NO_CONTENT, written(&keys).await))
}

/// The signed-in user.
#[utoipa::path(
    get, path = "/v1/me", tag = "users", security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller", body = UserView),
        (status = 401, description = "Not signed in", body = Problem),
    )
)]
async fn me(
    State(http): State<UsersHttp>,
    caller: Caller,
    consistency: ReadConsistency,
) -> Result<Json<UserView>, ApiError> {
    // A valid token for a user that no longer exists is no session.
    let fresh_since = consistency.fresh_since();
    match http
        .users
        .get_cached(caller.user_id, fresh_since, consistency.database())
        .await
    {
        Ok(user) => Ok(Json(user.into())),
        Err(UsersError::NotFound) => Err(ApiError::unauthenticated().detail("the account is gone")),
        Err(other) => Err(other.into()),
    }
}

/// One user (self or admin; anyone else's is a 404).
#[utoipa::path(
    get, path = "/v1/users/{id}", tag = "users", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "User id")),
    responses(
        (status = 200, description = "The user", body = UserView),
        (status = 401, description = "Not signed in", body = Problem),
        (status = 404, description = "No such user", body = Problem),
    )
)]
async fn get_user(
    State(http): State<UsersHttp>,
    caller: Caller,
    Id(id): Id,
    consistency: ReadConsistency,
) -> Result<Json<UserView>, ApiError> {
    if !caller.may_access(id) {
        return Err(ApiError::not_found());
    }
    let user = http
        .users
        .get_cached(id, consistency.fresh_since(), consistency.database())
        .await?;
    Ok(Json(user.into()))
}

/// Change name, email or password (self or admin). Changing the email or the
/// password needs `current_password` (not for an admin changing another
/// account); a new password ends every earlier session of the user.
#[utoipa::path(
    patch, path = "/v1/users/{id}", tag = "users", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "User id")),
    request_body = PatchUserRequest,
    responses(
        (status = 200, description = "Updated", body = UserView, headers(("X-Consistency-Token" = String))),
        (status = 401, description = "Not signed in", body = Problem),
        (status = 404, description = "No such user", body = Problem),
        (status = 409, description = "Email taken", body = Problem),
        (status = 422, description = "Invalid, or a missing or wrong current_password", body = Problem),
    )
)]
async fn patch_user(
    State(http): State<UsersHttp>,
    keys: RequestKeys,
    caller: Caller,
    Id(id): Id,
    body: JsonObject,
) -> Result<(Headers, Json<UserView>), ApiError> {
    if !caller.may_access(id) {
        return Err(ApiError::not_found());
    }
    // Asked for, even when invalid: the answer then lists every broken rule.
    let changes_secret = body.0.contains_key("email") || body.0.contains_key("password");
    let mut f = Fields::new(body);
    let email = f.optional("email", |s: String| Email::parse(&s));
    let name = f.optional("name", |s: String| UserName::parse(&s));
    let password = f.optional("password", |s: String| Password::parse(&s));
    let current_password = f.optional(CURRENT_PASSWORD, scaleshop_web::body::any::<String>);
    let by = |current_password| ChangedBy {
        user_id: caller.user_id,
        is_admin: caller.is_admin,
        current_password,
    };
    if by(None).must_prove(id, changes_secret) && matches!(current_password, Some(None)) {
        f.error(
            CURRENT_PASSWORD,
            "is required to change the email or the password",
        );
    }
    f.finish()?;
    let (Some(email), Some(name), Some(password), Some(current_password)) =
        (email, name, password, current_password)
    else {
        return Err(ApiError::internal("fields checked but missing"));
    };
    let patch = UserPatch {
        email,
        name,
        password,
    };
    let user = http
        .users
        .update(id, patch, by(current_password.as_deref()))
        .await?;
    Ok((written(&keys).await, Json(user.into())))
}

#[derive(Debug, Deserialize)]
struct SearchQuery {
    q: Option<String>,
}

/// Search users by name or email (admin).
#[utoipa::path(
    get, path = "/v1/users", tag = "users", security(("bearer" = [])),
    params(SearchParams, PageParams),
    responses(
        (status = 200, description = "Matching users", body = Paginated<UserView>),
        (status = 400, description = "Bad cursor", body = Problem),
        (status = 401, description = "Not signed in", body = Problem),
        (status = 403, description = "Not an admin", body = Problem),
        (status = 422, description = "Bad limit", body = Problem),
    )
)]
async fn search_users(
    State(http): State<UsersHttp>,
    caller: Caller,
    page: Page,
    Query(query): Query<SearchQuery>,
) -> Result<Json<Paginated<UserView>>, ApiError> {
    caller.require_admin()?;
    let after = page.after::<Uuid>()?;
    let users = http
        .users
        .search(
            scaleshop_web::page::search_text(query.q.as_deref())?.as_deref(),
            after,
            page.fetch(),
        )
        .await?;
    let page = page.finish(users, |u| u.id);
    Ok(Json(Paginated {
        items: page.items.into_iter().map(UserView::from).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// The routes other services of the deployment call (service token only).
pub fn internal_router(users: Users) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(user_exists))
        .routes(routes!(session_state))
        .with_state(users)
}

#[derive(Debug, Deserialize, IntoParams)]
struct ExistsQuery {
    /// The user's id.
    id: Uuid,
}

#[derive(Debug, Serialize, ToSchema)]
struct Exists {
    exists: bool,
}

/// Does the account exist? (Internal: for the order service in another process.)
#[utoipa::path(
    get, path = "/internal/users/exists", tag = "internal", params(ExistsQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "Whether the account exists", body = Exists))
)]
async fn user_exists(
    State(users): State<Users>,
    _caller: scaleshop_web::ServiceCaller,
    Query(query): Query<ExistsQuery>,
) -> Result<Json<Exists>, ApiError> {
    match users.get(query.id).await {
        Ok(_) => Ok(Json(Exists { exists: true })),
        Err(UsersError::NotFound) => Ok(Json(Exists { exists: false })),
        Err(e) => Err(e.into()),
    }
}

/// What decides whether a token of the user is live (see `SessionState`).
#[derive(Debug, Serialize, ToSchema)]
struct SessionStateView {
    /// The user's session epoch: a token of another epoch is refused.
    epoch: i64,
    /// The ids of the user's unexpired tokens that were signed out.
    ended: Vec<Uuid>,
}

/// The state of a user's sessions, 404 when the account does not exist.
/// (Internal: for the other services' processes, which check every token.)
#[utoipa::path(
    get, path = "/internal/users/{id}/sessions", tag = "internal",
    params(("id" = Uuid, Path, description = "The user's id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The state of the user's sessions", body = SessionStateView),
        (status = 404, description = "No such account", body = Problem),
    )
)]
async fn session_state(
    State(users): State<Users>,
    _caller: scaleshop_web::ServiceCaller,
    Id(id): Id,
) -> Result<Json<SessionStateView>, ApiError> {
    match users.sessions().state(id).await.map_err(ApiError::from)? {
        Some(state) => Ok(Json(SessionStateView {
            epoch: state.epoch,
            ended: state.ended,
        })),
        None => Err(ApiError::not_found().detail("no such account")),
    }
}
