//! The outermost layer, around the whole router: request ids, the request timeout, the
//! latency histogram by route template, one log line per request (with the cause of
//! any 5xx), and the guarantee that every error answer is a problem document, even
//! those made outside our handlers (the router's 404 and 405, a panic's 500):
//! any error response without a JSON body becomes one. It also sets the request's
//! [`RequestScope`] (the signing keys, the client's address) around every poll of
//! the router's future.

use std::convert::Infallible;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use metrics::Histogram;
use parking_lot::Mutex;
use tower::Service;
use uuid::Uuid;

use crate::error::{ApiError, ErrorCode, InternalCause};
use crate::scope::RequestScope;

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Label for requests that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

#[derive(Debug, Clone)]
pub struct ObserveSettings {
    pub request_timeout: Duration,
}

/// The outermost layer, around the whole router (see the module's text).
#[derive(Debug, Clone, Copy)]
pub struct ObserveLayer {
    shared: &'static Shared,
    scope: RequestScope,
}

impl ObserveLayer {
    /// `routes`: the API's routes (template and method router, see
    /// [`crate::routes`]); `others`: the templates of the other routes of the
    /// router the layer wraps (the documentation's), in the router's syntax
    /// (`/v1/products/{id}`). A request that matches none is labelled
    /// [`UNMATCHED_ROUTE`].
    ///
    /// The layer matches every request's path itself, for its label, so no layer
    /// is needed inside every route to report the matched one; and for a route
    /// whose only path parameter is a whole `{id}` segment, or that has none, it
    /// calls the method router itself with the parameter in the request's scope
    /// (read by [`crate::Id`]): the path is matched once, not twice, and no
    /// parameter map is built per request. Other requests (other parameters, the
    /// documentation, anything unmatched) go through the wrapped router.
    ///
    /// `scope`: what the handlers find through [`RequestScope`] (the client's
    /// address is added per connection by [`Observe::per_connection`]).
    pub fn new<I>(
        settings: ObserveSettings,
        routes: Vec<(String, MethodRouter)>,
        others: I,
        scope: RequestScope,
    ) -> Result<Self, String>
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        let mut table = matchit::Router::new();
        let mut direct = Vec::new();
        let others = others.into_iter().map(|t| (t.into(), None));
        for (template, method_router) in routes.into_iter().map(|(t, m)| (t, Some(m))).chain(others)
        {
            let dispatch = match (method_router, id_offset(&template)) {
                (Some(method_router), Some(id_offset)) => {
                    direct.push(method_router);
                    Some(Direct {
                        index: direct.len() - 1,
                        id_offset,
                    })
                }
                _ => None,
            };
            let entry = RouteEntry {
                metrics: RouteMetrics::new(template.clone()),
                direct: dispatch,
            };
            table
                .insert(template.clone(), entry)
                .map_err(|e| format!("route template {template}: {e}"))?;
        }
        // Kept for the rest of the process (one table per server start, a few
        // kilobytes), so a request reads it without a reference count: two worker
        // threads bumping one shared count on every request make its cache line
        // travel between cores.
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            settings,
            routes: table,
            direct,
            unmatched: RouteMetrics::new(UNMATCHED_ROUTE.to_owned()),
        }));
        Ok(Self { shared, scope })
    }
}

/// For a template the layer may dispatch itself: `Some(None)` without path
/// parameters, `Some(Some(offset))` when its one parameter is a whole segment
/// called `id` (`offset`: where it starts, in the template and so in every path
/// the template matches, since what precedes it is literal); `None` otherwise.
fn id_offset(template: &str) -> Option<Option<u16>> {
    if !template.contains(['{', '}']) {
        return Some(None);
    }
    let offset = template.find("/{id}")? + 1;
    let after = template.get(offset + "{id}".len()..)?;
    let whole_segment = after.is_empty() || after.starts_with('/');
    let only_parameter = !template[..offset].contains(['{', '}']) && !after.contains(['{', '}']);
    (whole_segment && only_parameter).then(|| u16::try_from(offset).ok().map(Some))?
}

impl tower::Layer<Router> for ObserveLayer {
    type Service = Observe;

    fn layer(&self, router: Router) -> Self::Service {
        Observe {
            shared: self.shared,
            scope: self.scope,
            connection: Arc::new(Mutex::new(Connection {
                router,
                routes: Vec::new(),
            })),
        }
    }
}

struct Shared {
    settings: ObserveSettings,
    routes: matchit::Router<RouteEntry>,
    /// The method routers the layer calls itself (each connection clones those
    /// it uses: calling one takes `&mut`).
    direct: Vec<MethodRouter>,
    unmatched: RouteMetrics,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

struct RouteEntry {
    metrics: RouteMetrics,
    direct: Option<Direct>,
}

/// A route the layer calls itself: its method router in [`Shared::direct`], and
/// where its `{id}` starts in the path, if it has one.
#[derive(Debug, Clone, Copy)]
struct Direct {
    index: usize,
    id_offset: Option<u16>,
}

/// Statuses this service answers; their histogram handles are found without a
/// lock (others take the slower path).
const COMMON_STATUSES: [u16; 18] = [
    200, 201, 202, 204, 304, 400, 401, 403, 404, 405, 409, 413, 415, 422, 429, 500, 503, 504,
];
const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "OTHER",
];

/// One route template and its latency histogram handles by method and status,
/// registered on first use (the registry's own lookup builds a key per call).
/// Common statuses are read lock-free (one atomic load, no shared write: two
/// worker threads writing one lock word on every request make its cache line
/// travel between cores); the rest are behind a lock. Bounded: methods and
/// statuses are small finite sets.
#[derive(Debug)]
struct RouteMetrics {
    template: String,
    common: Vec<OnceLock<Histogram>>,
    other: RwLock<Vec<(&'static str, u16, Histogram)>>,
}

impl RouteMetrics {
    fn new(template: String) -> Self {
        Self {
            template,
            common: (0..METHODS.len() * COMMON_STATUSES.len())
                .map(|_| OnceLock::new())
                .collect(),
            other: RwLock::new(Vec::new()),
        }
    }

    fn register(&self, method: &'static str, status: u16) -> Histogram {
        metrics::histogram!(
            scaleshop_telemetry::names::HTTP_REQUEST_DURATION,
            "method" => method,
            "route" => self.template.clone(),
            "status" => status.to_string(),
        )
    }

    fn record(&self, method: &'static str, status: u16, seconds: f64) {
        let m = METHODS.iter().position(|m| *m == method);
        let s = COMMON_STATUSES.iter().position(|s| *s == status);
        if let (Some(m), Some(s)) = (m, s)
            && let Some(slot) = self.common.get(m * COMMON_STATUSES.len() + s)
        {
            slot.get_or_init(|| self.register(method, status))
                .record(seconds);
            return;
        }
        let find = |entries: &[(&'static str, u16, Histogram)]| {
            entries
                .iter()
                .find(|(m, s, _)| *m == method && *s == status)
                .map(|(_, _, h)| h.clone())
        };
        let histogram = match self.other.read().ok().and_then(|e| find(&e)) {
            Some(found) => found,
            None => {
                let histogram = self.register(method, status);
                if let Ok(mut entries) = self.other.write()
                    && find(&entries).is_none()
                {
                    entries.push((method, status, histogram.clone()));
                }
                histogram
            }
        };
        histogram.record(seconds);
    }
}

/// See [`ObserveLayer`].
#[derive(Debug, Clone)]
pub struct Observe {
    shared: &'static Shared,
    scope: RequestScope,
    /// The connection's own router and method routers (the server clones this
    /// service for every request; the lock is never contended: a connection
    /// sends its requests one after the other).
    connection: Arc<Mutex<Connection>>,
}

struct Connection {
    router: Router,
    /// Clones of the method routers this connection has used, by index in
    /// [`Shared::direct`].
    routes: Vec<(usize, MethodRouter)>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("routes", &self.routes.len())
            .finish_non_exhaustive()
    }
}

impl Connection {
    fn call(&mut self, shared: &Shared, direct: Option<Direct>, req: Request) -> RouteFuture {
        let Some(direct) = direct else {
            return self.router.call(req);
        };
        let position = match self.routes.iter().position(|(i, _)| *i == direct.index) {
            Some(position) => position,
            None => match shared.direct.get(direct.index) {
                Some(method_router) => {
                    self.routes.push((direct.index, method_router.clone()));
                    self.routes.len() - 1
                }
                None => return self.router.call(req),
            },
        };
        match self.routes.get_mut(position) {
            Some((_, method_router)) => method_router.call(req),
            None => self.router.call(req),
        }
    }
}

type RouteFuture = axum::routing::future::RouteFuture<Infallible>;

impl Observe {
    /// The service to give `axum::serve`: for each accepted connection, its own
    /// copy of this service, with the client's address in its requests' scope.
    pub fn per_connection(self) -> PerConnection {
        PerConnection(self)
    }

    /// This service's copy for one accepted connection from `peer`: its own
    /// router, and the client's address in its requests' scope.
    pub fn for_peer(&self, peer: std::net::SocketAddr) -> Observe {
        let router = self.connection.lock().router.clone();
        Observe {
            shared: self.shared,
            scope: self.scope.for_peer(peer),
            connection: Arc::new(Mutex::new(Connection {
                router,
                routes: Vec::new(),
            })),
        }
    }
}

/// See [`Observe::per_connection`].
#[derive(Debug, Clone)]
pub struct PerConnection(Observe);

impl tower::Service<axum::serve::IncomingStream<'_, tokio::net::TcpListener>> for PerConnection {
    type Response = Observe;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Observe, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(
        &mut self,
        stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>,
    ) -> Self::Future {
        std::future::ready(Ok(self.0.for_peer(*stream.remote_addr())))
    }
}

impl tower::Service<Request> for Observe {
    type Response = Response;
    type Error = Infallible;
    type Future = ObserveFuture<RouteFuture>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Routers and method routers are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let shared = self.shared;
        let started = Instant::now();
        let request_id = client_request_id(&req).unwrap_or_else(new_request_id);
        let method = method_label(req.method());
        let (route, direct) = match shared.routes.at(req.uri().path()) {
            Ok(found) => (&found.value.metrics, found.value.direct),
            Err(_) => (&shared.unmatched, None),
        };
        let span = tracing::info_span!(
            "request",
            request_id = request_id.to_str().unwrap_or("-"),
            method,
            route = route.template.as_str(),
        );
        let scope = self.scope.with_id_offset(direct.and_then(|d| d.id_offset));
        // A panic while routing is caught like one in a handler.
        let (inner, panic) = {
            let _entered = span.enter();
            let mut connection = self.connection.lock();
            match catch_unwind(AssertUnwindSafe(|| connection.call(shared, direct, req))) {
                Ok(future) => (Some(future), None),
                Err(panic) => (None, Some(panic)),
            }
        };
        ObserveFuture {
            inner,
            timer: None,
            panic,
            request: Started {
                shared,
                scope,
                started,
                request_id: Some(request_id),
                method,
                route,
                span,
            },
        }
    }
}

/// A fresh request id: a UUIDv7. Its random part comes from a small, fast
/// generator per thread, seeded from the thread's secure one: a request id must be
/// unique, not unguessable (it is printed in logs and sent back to the client).
fn new_request_id() -> HeaderValue {
    use rand::{Rng, SeedableRng};

    thread_local! {
        static IDS: std::cell::RefCell<rand::rngs::SmallRng> =
            std::cell::RefCell::new(rand::rngs::SmallRng::from_rng(&mut rand::rng()));
    }
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let random = IDS
        .with(|ids| ids.borrow_mut().random::<u128>())
        .to_le_bytes();
    let mut bits = [0; 10];
    bits.copy_from_slice(&random[..10]);
    let id = uuid::Builder::from_unix_timestamp_millis(millis, &bits).into_uuid();
    let mut buffer = Uuid::encode_buffer();
    HeaderValue::from_str(id.hyphenated().encode_lower(&mut buffer))
        .unwrap_or_else(|_| HeaderValue::from_static("-"))
}

fn client_request_id(req: &Request) -> Option<HeaderValue> {
    req.headers()
        .get(&REQUEST_ID_HEADER)
        .filter(|v| {
            let bytes = v.as_bytes();
            !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(u8::is_ascii_graphic)
        })
        .cloned()
}

/// What [`Observe`] learned of a request before handing it on.
struct Started {
    shared: &'static Shared,
    scope: RequestScope,
    started: Instant,
    request_id: Option<HeaderValue>,
    method: &'static str,
    route: &'static RouteMetrics,
    span: tracing::Span,
}

pin_project_lite::pin_project! {
    /// The response future of [`Observe`]: the inner future, polled inside the
    /// request's span and scope with panics caught, and a timer made only if the
    /// inner future has to wait (a request answered at once never touches the timer
    /// wheel). It is
    /// one value, not a box of nested futures, so nothing is copied between layers.
    pub struct ObserveFuture<F> {
        #[pin]
        inner: Option<F>,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
        panic: Option<Box<dyn std::any::Any + Send>>,
        request: Started,
    }
}

impl<F> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let request = this.request;
        let response = {
            let _entered = request.span.enter();
            if let Some(panic) = this.panic.take() {
                panicked(&*panic)
            } else if let Some(inner) = this.inner.as_mut().as_pin_mut() {
                let polled = request
                    .scope
                    .enter(|| catch_unwind(AssertUnwindSafe(|| inner.poll(cx))));
                match polled {
                    Ok(Poll::Ready(Ok(response))) => response,
                    Ok(Poll::Ready(Err(never))) => match never {},
                    Err(panic) => panicked(&*panic),
                    Ok(Poll::Pending) => {
                        // Boxed: most requests never wait, and they should not
                        // carry (and move) a timer's worth of bytes.
                        let timer = this.timer.get_or_insert_with(|| {
                            let deadline =
                                request.started + request.shared.settings.request_timeout;
                            Box::pin(tokio::time::sleep_until(deadline.into()))
                        });
                        match timer.as_mut().poll(cx) {
                            Poll::Ready(()) => ApiError::new(ErrorCode::Timeout)
                                .detail("the request took too long")
                                .retry_after(1)
                                .into_response(),
                            Poll::Pending => return Poll::Pending,
                        }
                    }
                }
            } else {
                ApiError::internal("the request's future was polled after it finished")
                    .into_response()
            }
        };
        // Drop the inner future (and whatever it holds) now, not with this one.
        this.inner.set(None);
        *this.timer = None;
        Poll::Ready(Ok(finish(request, response)))
    }
}

/// The response's way out: a problem document for a bare error, the latency
/// histogram, the log line, the request id.
fn finish(request: &mut Started, response: Response) -> Response {
    let mut response = ensure_problem(response);
    let status = response.status().as_u16();
    let elapsed = request.started.elapsed();
    request
        .route
        .record(request.method, status, elapsed.as_secs_f64());
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
    let span = &request.span;
    if let Some(InternalCause(cause)) = response.extensions().get::<InternalCause>() {
        tracing::error!(parent: span, status, latency_ms, cause = %cause, "request failed");
    } else {
        tracing::info!(parent: span, status, latency_ms, "request");
    }
    if let Some(request_id) = request.request_id.take() {
        response.headers_mut().insert(REQUEST_ID_HEADER, request_id);
    }
    response
}

fn panicked(panic: &(dyn std::any::Any + Send)) -> Response {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned());
    ApiError::internal(format!("handler panicked: {message}")).into_response()
}

/// Bounded label values for methods.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Replaces a bare error response (no problem document) with one, keeping the
/// headers that matter (`Allow`, `Retry-After`).
fn ensure_problem(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    // A JSON body is a deliberate answer (a problem document, or a body the
    // contract defines for that status, such as `/readyz`'s 503): keep it.
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(crate::body::is_json_content_type);
    if is_json {
        return response;
    }
    let code = ErrorCode::from_status(status);
    let mut error = ApiError::new(code);
    if code == ErrorCode::Internal {
        error = ApiError::internal(format!("bare {status} response"));
    }
    let mut replacement = error.into_response();
    if code == ErrorCode::Internal {
        // Keep the real status (e.g. 501) when it is not one of ours.
        *replacement.status_mut() = status;
    }
    for name in [header::ALLOW, header::RETRY_AFTER] {
        if let Some(value) = response.headers().get(&name) {
            replacement.headers_mut().insert(name, value.clone());
        }
    }
    replacement
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::Body;
    use axum::http::StatusCode;
    use axum::routing::{any, get};
    use tower::{Layer, ServiceExt};

    use super::*;

    fn scope() -> RequestScope {
        RequestScope::new(crate::keys::Keys::new(
            b"0123456789abcdef0123456789abcdef",
            Duration::from_secs(60),
        ))
    }

    /// Answers the client address its scope holds, after checking it has keys.
    async fn whoami(keys: crate::RequestKeys, peer: crate::Peer) -> String {
        let token = keys.tokens.issue(Uuid::nil(), false, 0);
        format!("{} {}", peer.0, token.is_ok())
    }

    /// Routes the layer calls itself (given to it; the router has stand-ins at
    /// their templates), and two only the router serves: `/ok/{id}` (not given to
    /// the layer) and `/pair/{a}/{b}` (given, but two parameters).
    fn app(timeout: Duration) -> Observe {
        let routes: Vec<(String, MethodRouter)> = vec![
            ("/whoami".into(), get(whoami)),
            (
                "/items/{id}".into(),
                get(|crate::Id(id): crate::Id| async move { format!("item {id}") })
                    .post(|| async { "posted" }),
            ),
            (
                "/pair/{a}/{b}".into(),
                get(
                    |axum::extract::Path((a, b)): axum::extract::Path<(String, String)>| async move {
                        format!("{a}+{b}")
                    },
                ),
            ),
            (
                "/boom".into(),
                get(|| async {
                    if std::hint::black_box(true) {
                        panic!("the handler broke");
                    }
                    "unreachable"
                }),
            ),
            (
                "/slow".into(),
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "late"
                }),
            ),
        ];
        // The router holds the same templates, but its copies of the routes the
        // layer should call itself answer "via the router": a response says
        // which path served it.
        let router = routes
            .iter()
            .fold(Router::new(), |router, (template, route)| {
                if id_offset(template).is_some() {
                    router.route(template, any(|| async { "via the router" }))
                } else {
                    router.route(template, route.clone())
                }
            })
            .route(
                "/ok/{id}",
                get(|crate::Id(id): crate::Id| async move { format!("ok {id}") }),
            );
        ObserveLayer::new(
            ObserveSettings {
                request_timeout: timeout,
            },
            routes,
            ["/ok/{id}"],
            scope(),
        )
        .unwrap()
        .layer(router)
    }

    async fn call(path: &str, request_id: Option<&str>) -> Response {
        let mut request = axum::http::Request::get(path);
        if let Some(id) = request_id {
            request = request.header(&REQUEST_ID_HEADER, id);
        }
        app(Duration::from_millis(200))
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    const ID: &str = "00000000-0000-0000-0000-00000000000a";
    const OK: &str = "/ok/00000000-0000-0000-0000-00000000000a";

    async fn text(response: Response) -> String {
        let body = axum::body::to_bytes(response.into_body(), 10_000)
            .await
            .unwrap();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn routes_are_called_directly_or_through_the_router() {
        // One service answering many requests, as on one connection.
        let mut service = app(Duration::from_secs(5));
        let mut send = async |method: Method, path: &str| {
            let request = axum::http::Request::builder()
                .method(method)
                .uri(path)
                .body(Body::empty())
                .unwrap();
            service.ready().await.unwrap().call(request).await.unwrap()
        };
        for _ in 0..3 {
            let response = send(Method::GET, &format!("/items/{ID}")).await;
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(text(response).await, format!("item {ID}"));
        }
        // Percent-decoded as the router decodes its parameters.
        let encoded = format!("/items/%30{}", &ID[1..]);
        assert_eq!(
            text(send(Method::GET, &encoded).await).await,
            format!("item {ID}")
        );
        for bad in ["/items/nope", "/items/%FF", "/ok/nope"] {
            let response = send(Method::GET, bad).await;
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{bad}");
            assert_eq!(content_type(&response), "application/problem+json");
        }
        let posted = send(Method::POST, &format!("/items/{ID}")).await;
        assert_eq!(text(posted).await, "posted");
        let head = send(Method::HEAD, &format!("/items/{ID}")).await;
        assert_eq!(head.status(), StatusCode::OK);
        let refused = send(Method::DELETE, &format!("/items/{ID}")).await;
        assert_eq!(refused.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(content_type(&refused), "application/problem+json");
        let allow = refused.headers()[header::ALLOW]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
        // Through the router: two parameters, and a route the layer was not given.
        assert_eq!(text(send(Method::GET, "/pair/x/y").await).await, "x+y");
        assert_eq!(text(send(Method::GET, OK).await).await, format!("ok {ID}"));
        let missing = send(Method::GET, "/nowhere").await;
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn only_whole_id_segments_are_dispatched_directly() {
        assert_eq!(id_offset("/v1/products"), Some(None));
        assert_eq!(id_offset("/v1/products/{id}"), Some(Some(13)));
        assert_eq!(id_offset("/v1/products/{id}/images"), Some(Some(13)));
        for other in [
            "/a/{x}",
            "/a/{id}/{b}",
            "/a/{b}/{id}",
            "/a/{id}.json",
            "/a/x{id}",
            "/docs/{*rest}",
            "/a/{{id}}",
        ] {
            assert_eq!(id_offset(other), None, "{other}");
        }
    }

    fn content_type(response: &Response) -> &str {
        response.headers()[header::CONTENT_TYPE].to_str().unwrap()
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_a_500_problem() {
        let response = call("/boom", None).await;
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(content_type(&response), "application/problem+json");
        assert!(response.headers().contains_key(&REQUEST_ID_HEADER));
        let body = axum::body::to_bytes(response.into_body(), 10_000)
            .await
            .unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(!text.contains("the handler broke"), "cause leaked: {text}");
    }

    #[tokio::test]
    async fn a_slow_handler_answers_a_timeout_problem() {
        let response = call("/slow", None).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(content_type(&response), "application/problem+json");
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }

    #[tokio::test]
    async fn request_ids_are_kept_or_made() {
        let kept = call(OK, Some("client-id-1")).await;
        assert_eq!(kept.status(), StatusCode::OK);
        assert_eq!(kept.headers()[&REQUEST_ID_HEADER], "client-id-1");
        // Unusable ids (spaces, too long) are replaced by a UUIDv7.
        for bad in ["has space", &"x".repeat(129)] {
            let made = call(OK, Some(bad)).await;
            let id = made.headers()[&REQUEST_ID_HEADER].to_str().unwrap();
            assert_eq!(Uuid::parse_str(id).unwrap().get_version_num(), 7, "{id}");
        }
        let a = call(OK, None).await;
        let b = call(OK, None).await;
        assert_ne!(
            a.headers()[&REQUEST_ID_HEADER],
            b.headers()[&REQUEST_ID_HEADER]
        );
    }

    #[tokio::test]
    async fn unknown_routes_and_methods_answer_problems() {
        let response = call("/nowhere", None).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(content_type(&response), "application/problem+json");
        let response = app(Duration::from_secs(1))
            .oneshot(axum::http::Request::post(OK).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(content_type(&response), "application/problem+json");
        assert!(response.headers().contains_key(header::ALLOW));
    }

    #[tokio::test]
    async fn handlers_see_the_keys_and_the_client_address() {
        use std::io::{Read, Write};

        // Without a connection there is no client address: a 500, not a guess.
        let response = call("/whoami", None).await;
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app(Duration::from_secs(5)).per_connection()).await
        });
        let (mine, answer) = tokio::task::spawn_blocking(move || {
            let mut client = std::net::TcpStream::connect(addr).unwrap();
            client
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            client
                .write_all(b"GET /whoami HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .unwrap();
            let mut answer = String::new();
            client.read_to_string(&mut answer).unwrap();
            (client.local_addr().unwrap(), answer)
        })
        .await
        .unwrap();
        server.abort();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with(&format!("{mine} true")), "{answer}");
    }

    #[test]
    fn templates_label_requests_without_their_raw_paths() {
        let layer = ObserveLayer::new(
            ObserveSettings {
                request_timeout: Duration::from_secs(1),
            },
            vec![],
            ["/v1/products/{id}", "/docs/{*rest}"],
            scope(),
        )
        .unwrap();
        let label = |path: &str| {
            layer
                .shared
                .routes
                .at(path)
                .map_or(UNMATCHED_ROUTE, |m| m.value.metrics.template.as_str())
                .to_owned()
        };
        assert_eq!(label("/v1/products/abc"), "/v1/products/{id}");
        assert_eq!(label("/docs/swagger-ui.css"), "/docs/{*rest}");
        assert_eq!(label("/v1/products"), UNMATCHED_ROUTE);
        assert_eq!(label("/v1/products/abc/extra"), UNMATCHED_ROUTE);
        assert!(
            ObserveLayer::new(
                ObserveSettings {
                    request_timeout: Duration::from_secs(1),
                },
                vec![],
                ["/a/{x}", "/a/{y}"],
                scope(),
            )
            .is_err(),
            "conflicting templates are refused"
        );
    }
}
