//! The outermost layer, around the whole router: request ids, the request timeout, the
//! latency histogram by route template, one log line per request (with the cause of
//! any 5xx), and the guarantee that every error answer is a problem document, even
//! those made outside our handlers (the router's 404 and 405, a panic's 500):
//! any error response without a JSON body becomes one. It also sets the request's
//! [`RequestScope`] (the signing keys, the client's address) around every poll of
//! the router's future.
//!
//! A caller's deadline shortens the timeout: a request carrying
//! [`DEADLINE_HEADER`] (milliseconds left to its caller, as another service of the
//! deployment sends it) gets at most that long, so no work goes on past the point
//! where nobody waits for it.
//!
//! Routing is axum's alone: the path is matched once, by the router. The route's
//! template (axum's [`MatchedPath`]) reaches this layer through a small layer the
//! router puts around every route ([`MatchedRoute`]), which hands it out when the
//! route is called. A request no route matched (the router's fallback) hands out
//! nothing and is labelled [`UNMATCHED_ROUTE`].

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use metrics::Histogram;
use parking_lot::Mutex;
use tower::Service;
use uuid::Uuid;

use crate::error::{ApiError, ErrorCode, InternalCause};
use crate::scope::RequestScope;

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Label for requests that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// The time its caller still waits for a request, in milliseconds (sent by the
/// clients between services); it can only shorten the request's timeout.
pub const DEADLINE_HEADER: HeaderName = HeaderName::from_static("x-request-deadline-ms");

/// The time `req` may take: the configured timeout, or less when the caller said
/// it waits less (an unreadable value is ignored).
fn timeout_of(req: &Request, configured: Duration) -> Duration {
    req.headers()
        .get(&DEADLINE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(configured, |ms| configured.min(Duration::from_millis(ms)))
}

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
    /// `scope`: what the handlers find through [`RequestScope`] (the client's
    /// address is added per connection by [`Observe::per_connection`]).
    pub fn new(settings: ObserveSettings, scope: RequestScope) -> Self {
        // Kept for the rest of the process (one per server start, a few kilobytes
        // with its routes' histogram handles), so a request reads it without a
        // reference count: two worker threads bumping one shared count on every
        // request make its cache line travel between cores.
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            settings,
            routes: Mutex::new(Vec::new()),
            unmatched: RouteMetrics::new(UNMATCHED_ROUTE.to_owned()),
        }));
        Self { shared, scope }
    }
}

impl tower::Layer<Router> for ObserveLayer {
    type Service = Observe;

    /// Puts [`MatchedRoute`] around every route of `router` (not around its
    /// fallback: what reaches the fallback matched no route), and this layer
    /// around the router.
    fn layer(&self, router: Router) -> Self::Service {
        let router = if router.has_routes() {
            router.route_layer(MatchedRouteLayer)
        } else {
            router
        };
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
    /// The histogram handles of every route template met so far (one entry per
    /// route of the router: bounded), each kept for the rest of the process.
    routes: Mutex<Vec<&'static RouteMetrics>>,
    unmatched: RouteMetrics,
}

impl Shared {
    /// The handles of `template`, made on its first request.
    fn route(&self, template: &str) -> &'static RouteMetrics {
        let mut routes = self.routes.lock();
        if let Some(found) = routes.iter().find(|r| r.template == template) {
            return found;
        }
        let made: &'static RouteMetrics =
            Box::leak(Box::new(RouteMetrics::new(template.to_owned())));
        routes.push(made);
        made
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

tokio::task_local! {
    /// The template of the route the request being polled matched, once its
    /// route was called: set by [`MatchedRoute`], taken by [`ObserveFuture`]
    /// after each poll.
    static MATCHED: Cell<Option<MatchedPath>>;
}

/// Puts [`MatchedRoute`] around a route.
#[derive(Debug, Clone, Copy)]
struct MatchedRouteLayer;

impl<S> tower::Layer<S> for MatchedRouteLayer {
    type Service = MatchedRoute<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MatchedRoute(inner)
    }
}

/// Around every route, inside the router (so axum's [`MatchedPath`] is set):
/// hands the route's template to [`ObserveFuture`] when the route is called,
/// before any extractor or handler runs, so that an answer the route never
/// gives (a panic's 500, the timeout's 503) is labelled with its route too.
/// The route is called during the first poll of the router's future, inside the
/// observe layer's scope; it adds no future of its own.
#[derive(Debug, Clone)]
struct MatchedRoute<S>(S);

impl<S: Service<Request>> Service<Request> for MatchedRoute<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        if let Some(path) = req.extensions().get::<MatchedPath>() {
            // Outside the observe layer (no scope) there is nobody to tell.
            let _ = MATCHED.try_with(|matched| matched.set(Some(path.clone())));
        }
        self.0.call(req)
    }
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
    /// The connection's own router and route handles (the server clones this
    /// service for every request; the lock is never contended: a connection
    /// sends its requests one after the other).
    connection: Arc<Mutex<Connection>>,
}

struct Connection {
    router: Router,
    /// The handles of the routes this connection has used (found without the
    /// shared lock).
    routes: Vec<&'static RouteMetrics>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("routes", &self.routes.len())
            .finish_non_exhaustive()
    }
}

impl Connection {
    fn route(&mut self, shared: &Shared, template: &str) -> &'static RouteMetrics {
        if let Some(found) = self.routes.iter().find(|r| r.template == template) {
            return found;
        }
        let found = shared.route(template);
        self.routes.push(found);
        found
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
        // Routers are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let started = Instant::now();
        let timeout = timeout_of(&req, self.shared.settings.request_timeout);
        let request_id = client_request_id(&req).unwrap_or_else(new_request_id);
        let method = method_label(req.method());
        // The route is known once the router has called it (see `MatchedRoute`).
        let span = tracing::info_span!(
            "request",
            request_id = request_id.to_str().unwrap_or("-"),
            method,
            route = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            otel.kind = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
        );
        if scaleshop_telemetry::trace::enabled() {
            span.record("otel.kind", "server");
            // A caller's trace (another service, a client) goes on here.
            scaleshop_telemetry::trace::adopt_from_headers(&span, req.headers());
        }
        // A panic while routing is caught like one in a handler.
        let (inner, panic) = {
            let _entered = span.enter();
            let mut connection = self.connection.lock();
            match catch_unwind(AssertUnwindSafe(|| connection.router.call(req))) {
                Ok(future) => (Some(future), None),
                Err(panic) => (None, Some(panic)),
            }
        };
        ObserveFuture {
            inner,
            timer: None,
            panic,
            request: Started {
                shared: self.shared,
                scope: self.scope,
                connection: self.connection.clone(),
                started,
                timeout,
                request_id: Some(request_id),
                method,
                matched: None,
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

/// What [`Observe`] learned of a request before handing it on, and after.
struct Started {
    shared: &'static Shared,
    scope: RequestScope,
    connection: Arc<Mutex<Connection>>,
    started: Instant,
    /// The configured request timeout, or the caller's deadline when sooner.
    timeout: Duration,
    request_id: Option<HeaderValue>,
    method: &'static str,
    /// The route's template, once the router has called the route.
    matched: Option<MatchedPath>,
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
                let (polled, matched) = request.scope.enter(|| {
                    MATCHED.sync_scope(Cell::new(None), || {
                        let polled = catch_unwind(AssertUnwindSafe(|| inner.poll(cx)));
                        (polled, MATCHED.try_with(Cell::take).ok().flatten())
                    })
                });
                if matched.is_some() {
                    request.matched = matched;
                }
                match polled {
                    Ok(Poll::Ready(Ok(response))) => response,
                    Ok(Poll::Ready(Err(never))) => match never {},
                    Err(panic) => panicked(&*panic),
                    Ok(Poll::Pending) => {
                        // Boxed: most requests never wait, and they should not
                        // carry (and move) a timer's worth of bytes.
                        let timer = this.timer.get_or_insert_with(|| {
                            let deadline = request.started + request.timeout;
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
    let span = &request.span;
    let route = match request.matched.take() {
        Some(matched) => {
            let route = request
                .connection
                .lock()
                .route(request.shared, matched.as_str());
            span.record("route", route.template.as_str());
            route
        }
        None => {
            span.record("route", UNMATCHED_ROUTE);
            &request.shared.unmatched
        }
    };
    route.record(request.method, status, elapsed.as_secs_f64());
    if scaleshop_telemetry::trace::enabled() {
        scaleshop_telemetry::trace::rename(
            span,
            format!("{} {}", request.method, route.template.as_str()),
        );
        span.record("http.response.status_code", status);
    }
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
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
    use std::collections::BTreeMap;

    use axum::Router;
    use axum::body::Body;
    use axum::extract::Path;
    use axum::http::StatusCode;
    use axum::routing::get;
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

    async fn item(crate::Id(id): crate::Id) -> String {
        format!("item {id}")
    }

    /// Routes with one id at the end, in the middle and under another name, two
    /// parameters, a wildcard, a panic and a slow handler.
    fn router() -> Router {
        Router::new()
            .route("/whoami", get(whoami))
            .route("/items/{id}", get(item).post(|| async { "posted" }))
            .route("/items/{id}/parts", get(item))
            .route("/stock/{product_id}", get(item))
            .route(
                "/pair/{a}/{b}",
                get(|Path((a, b)): Path<(String, String)>| async move { format!("{a}+{b}") }),
            )
            .route("/docs/{*rest}", get(|| async { "docs" }))
            .route(
                "/boom",
                get(|| async {
                    if std::hint::black_box(true) {
                        panic!("the handler broke");
                    }
                    "unreachable"
                }),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "late"
                }),
            )
    }

    fn observe(timeout: Duration, router: Router) -> Observe {
        ObserveLayer::new(
            ObserveSettings {
                request_timeout: timeout,
            },
            scope(),
        )
        .layer(router)
    }

    fn app(timeout: Duration) -> Observe {
        observe(timeout, router())
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

    /// Sends `method path` through `service`, as a connection does.
    async fn send(service: &mut Observe, method: &Method, path: &str) -> Response {
        let request = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .unwrap();
        service.ready().await.unwrap().call(request).await.unwrap()
    }

    const ID: &str = "00000000-0000-0000-0000-00000000000a";
    const ITEM: &str = "/items/00000000-0000-0000-0000-00000000000a";

    async fn text(response: Response) -> String {
        let body = axum::body::to_bytes(response.into_body(), 10_000)
            .await
            .unwrap();
        String::from_utf8(body.to_vec()).unwrap()
    }

    fn content_type(response: &Response) -> &str {
        response.headers()[header::CONTENT_TYPE].to_str().unwrap()
    }

    /// `(method, route, status)` of every `http_request_duration_seconds` series
    /// in a Prometheus rendering, with its count.
    fn counts(rendered: &str) -> BTreeMap<(String, String, u16), u64> {
        let prefix = format!(
            "{}_count{{",
            scaleshop_telemetry::names::HTTP_REQUEST_DURATION
        );
        rendered
            .lines()
            .filter_map(|line| line.strip_prefix(&prefix))
            .map(|line| {
                let (labels, count) = line.rsplit_once("} ").unwrap();
                let mut labels: BTreeMap<&str, &str> = labels
                    .trim_end_matches('"')
                    .split("\",")
                    .map(|pair| pair.split_once("=\"").unwrap())
                    .collect();
                let mut take = |name| labels.remove(name).unwrap().to_owned();
                let key = (
                    take("method"),
                    take("route"),
                    take("status").parse().unwrap(),
                );
                assert!(labels.is_empty(), "{line}");
                (key, count.parse().unwrap())
            })
            .collect()
    }

    /// Each request's label, as the latency histogram shows it: the template of
    /// the route the router matched, whatever the answer (the route's own, an
    /// extractor's 404, the router's 405, a panic's 500, the timeout's 503), and
    /// `unmatched` for what no route matched, with the router's own fallback or
    /// the application's.
    #[test]
    fn every_route_is_labelled_by_its_template() {
        use Method as M;
        let encoded = format!("/items/%30{}", &ID[1..]);
        let requests: Vec<(Method, String, u16, &str)> = vec![
            (M::GET, ITEM.into(), 200, "/items/{id}"),
            (M::GET, encoded, 200, "/items/{id}"),
            (M::GET, "/items/nope".into(), 404, "/items/{id}"),
            (M::GET, "/items/%FF".into(), 404, "/items/{id}"),
            (M::POST, ITEM.into(), 200, "/items/{id}"),
            (M::HEAD, ITEM.into(), 200, "/items/{id}"),
            (M::DELETE, ITEM.into(), 405, "/items/{id}"),
            (M::GET, format!("{ITEM}/parts"), 200, "/items/{id}/parts"),
            (M::PUT, format!("{ITEM}/parts"), 405, "/items/{id}/parts"),
            (M::GET, format!("/stock/{ID}"), 200, "/stock/{product_id}"),
            (M::GET, "/pair/x/y".into(), 200, "/pair/{a}/{b}"),
            (M::GET, "/docs/swagger-ui.css".into(), 200, "/docs/{*rest}"),
            (M::GET, "/boom".into(), 500, "/boom"),
            (M::GET, "/slow".into(), 503, "/slow"),
            (M::GET, "/nowhere".into(), 404, UNMATCHED_ROUTE),
            (M::POST, "/nowhere".into(), 404, UNMATCHED_ROUTE),
            (M::GET, "/items".into(), 404, UNMATCHED_ROUTE),
            (M::GET, format!("{ITEM}/extra"), 404, UNMATCHED_ROUTE),
            (M::DELETE, "/pair/x".into(), 404, UNMATCHED_ROUTE),
        ];
        let fallback = || async { ApiError::not_found().detail("no such route") };
        for router in [router(), router().fallback(fallback)] {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            metrics::with_local_recorder(&recorder, || {
                runtime.block_on(async {
                    // One service for every request, as on one connection, and
                    // each request again on a fresh one.
                    let mut connection = observe(Duration::from_millis(200), router.clone());
                    for (method, path, status, _) in &requests {
                        for service in [
                            &mut connection,
                            &mut observe(Duration::from_millis(200), router.clone()),
                        ] {
                            let response = send(service, method, path).await;
                            assert_eq!(response.status().as_u16(), *status, "{method} {path}");
                            if *status >= 400 {
                                assert_eq!(content_type(&response), "application/problem+json");
                            }
                        }
                    }
                });
            });
            let mut expected = BTreeMap::new();
            for (method, _, status, route) in &requests {
                *expected
                    .entry((method.to_string(), (*route).to_owned(), *status))
                    .or_insert(0) += 2;
            }
            let rendered = handle.render();
            assert_eq!(counts(&rendered), expected, "{rendered}");
            for raw in [ID, "nope", "nowhere", "swagger-ui.css", "/pair/x"] {
                assert!(!rendered.contains(raw), "raw path {raw} in {rendered}");
            }
        }
    }

    /// `Id` reads the route's one parameter, whatever its name and place, and
    /// answers anything but a UUID with the same 404 problem on every route.
    #[tokio::test]
    async fn ids_are_read_and_refused_alike_on_every_route() {
        let mut service = app(Duration::from_secs(5));
        let not_found = text(ApiError::not_found().into_response()).await;
        let bad_ids = ["nope", "%FF", "%2F", "0000", &format!("{ID}0"), &ID[1..]];
        for route in ["/items/{}", "/items/{}/parts", "/stock/{}"] {
            let path = |id: &str| route.replace("{}", id);
            for good in [ID.to_owned(), ID.to_uppercase()] {
                let response = send(&mut service, &Method::GET, &path(&good)).await;
                assert_eq!(response.status(), StatusCode::OK, "{}", path(&good));
                assert_eq!(text(response).await, format!("item {ID}"));
            }
            for bad in bad_ids {
                let response = send(&mut service, &Method::GET, &path(bad)).await;
                assert_eq!(response.status(), StatusCode::NOT_FOUND, "{}", path(bad));
                assert_eq!(content_type(&response), "application/problem+json");
                assert_eq!(text(response).await, not_found, "{}", path(bad));
            }
        }
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_a_500_problem() {
        let response = call("/boom", None).await;
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(content_type(&response), "application/problem+json");
        assert!(response.headers().contains_key(&REQUEST_ID_HEADER));
        let text = text(response).await;
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
    async fn a_callers_deadline_shortens_the_timeout_and_never_lengthens_it() {
        let slow = |deadline: &str| {
            axum::http::Request::get("/slow")
                .header(&DEADLINE_HEADER, deadline)
                .body(Body::empty())
                .unwrap()
        };
        // The caller waits 50 ms of a 10 s timeout: the answer comes at once.
        let started = Instant::now();
        let response = app(Duration::from_secs(10))
            .oneshot(slow("50"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        // A longer deadline than the timeout changes nothing; garbage is ignored.
        for deadline in ["600000", "soon"] {
            let started = Instant::now();
            let response = app(Duration::from_millis(100))
                .oneshot(slow(deadline))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert!(started.elapsed() < Duration::from_secs(4), "{deadline}");
        }
        let configured = Duration::from_secs(15);
        let request = |v: &str| {
            axum::http::Request::get("/")
                .header(&DEADLINE_HEADER, v)
                .body(Body::empty())
                .unwrap()
        };
        assert_eq!(
            timeout_of(&request("250"), configured),
            Duration::from_millis(250)
        );
        assert_eq!(timeout_of(&request("99999999"), configured), configured);
        assert_eq!(timeout_of(&request("-1"), configured), configured);
    }

    #[tokio::test]
    async fn request_ids_are_kept_or_made() {
        let kept = call(ITEM, Some("client-id-1")).await;
        assert_eq!(kept.status(), StatusCode::OK);
        assert_eq!(kept.headers()[&REQUEST_ID_HEADER], "client-id-1");
        // Unusable ids (spaces, too long) are replaced by a UUIDv7.
        for bad in ["has space", &"x".repeat(129)] {
            let made = call(ITEM, Some(bad)).await;
            let id = made.headers()[&REQUEST_ID_HEADER].to_str().unwrap();
            assert_eq!(Uuid::parse_str(id).unwrap().get_version_num(), 7, "{id}");
        }
        let a = call(ITEM, None).await;
        let b = call(ITEM, None).await;
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
            .oneshot(axum::http::Request::put(ITEM).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(content_type(&response), "application/problem+json");
        let allow = response.headers()[header::ALLOW].to_str().unwrap();
        assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
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
}
