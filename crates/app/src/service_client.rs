//! The HTTP client one service uses to call another in a split deployment: one
//! pooled connection set per target service, a timeout per try, the caller's
//! remaining time in `x-request-deadline-ms`, a service token signed by the
//! deployment's keys, retries with exponential backoff and jitter only for calls
//! that are safe to repeat (reads, or calls carrying an idempotency key) or that
//! never left this process, a circuit breaker per target service, and the
//! metrics `service_client_requests_total{target,outcome}` and
//! `service_client_request_duration_seconds{target}`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use reqwest::{Method, StatusCode};
use scaleshop_telemetry::names;
use scaleshop_web::Keys;
use serde::Serialize;
use serde::de::DeserializeOwned;

use tracing::Instrument;

use crate::breaker::Breaker;

/// A call's path without its query and with ids folded (`/internal/orders/{id}`),
/// so a span name stays one of few.
fn route_of(path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    path.split('/')
        .map(|segment| {
            if segment.len() >= 32 && segment.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                "{id}"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The header that carries how long the caller still waits, in milliseconds.
pub use scaleshop_web::observe::DEADLINE_HEADER;
/// How long a service token is valid (each call signs a new one).
const TOKEN_TTL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
pub struct ClientSettings {
    pub timeout: Duration,
    /// How long an idle pooled connection is kept. Shorter than the callee's
    /// and the gateway's keep-alive timeouts, so that a connection is never
    /// reused just as the other side closes it (the request would be lost on
    /// the wire, and an unsafe one could not be sent again).
    pub idle: Duration,
    pub retries: u32,
    pub breaker_failures: u32,
    pub breaker_open: Duration,
}

/// May the call be sent again after a try whose outcome is unknown?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repeat {
    /// A read, or a write made idempotent by the service (per order, or an
    /// idempotency key): sending it twice changes nothing twice.
    Safe,
    /// Sent again only when the try never left this process.
    Unsafe,
}

/// Why a call gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("the circuit to {target} is open")]
    OpenCircuit {
        target: &'static str,
        retry_after: Duration,
    },
    /// No connection could be made: the request never left.
    #[error("{0}")]
    Unreachable(String),
    /// Sent, but no answer came (timeout, connection lost): it may have had its effect.
    #[error("{0}")]
    NoAnswer(String),
    #[error("answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("unreadable answer: {0}")]
    Decode(String),
}

impl CallError {
    /// Seconds worth waiting before asking again (for `Retry-After`).
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            Self::OpenCircuit { retry_after, .. } => {
                retry_after.as_secs_f64().ceil().max(1.0) as u64
            }
            _ => 1,
        }
    }

    /// A failure of the target service (as opposed to an answer refusing the call).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Status { status, .. } => *status >= 500,
            Self::Decode(_) => false,
            _ => true,
        }
    }
}

/// A client of one target service.
#[derive(Clone)]
pub struct ServiceClient {
    inner: Arc<Inner>,
}

struct Inner {
    target: &'static str,
    caller: &'static str,
    base: String,
    http: reqwest::Client,
    breaker: Mutex<Breaker>,
    settings: ClientSettings,
    keys: Arc<Keys>,
}

impl std::fmt::Debug for ServiceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceClient")
            .field("target", &self.inner.target)
            .field("base", &self.inner.base)
            .finish_non_exhaustive()
    }
}

/// What one try came to.
enum Try {
    Answer(StatusCode, bytes::Bytes),
    Failed(CallError),
}

impl ServiceClient {
    pub fn new(
        caller: &'static str,
        target: &'static str,
        base: &str,
        settings: ClientSettings,
        keys: Arc<Keys>,
    ) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(settings.timeout)
            .pool_idle_timeout(settings.idle)
            .pool_max_idle_per_host(32)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            inner: Arc::new(Inner {
                target,
                caller,
                base: base.trim_end_matches('/').to_owned(),
                http,
                breaker: Mutex::new(Breaker::new(
                    settings.breaker_failures,
                    settings.breaker_open,
                )),
                settings,
                keys,
            }),
        })
    }

    pub fn target(&self) -> &'static str {
        self.inner.target
    }

    /// GET `path` (with its query), safe to repeat; `None` on 404.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<Option<T>, CallError> {
        self.call(Method::GET, path, None, Repeat::Safe, None).await
    }

    /// POST `body` as JSON to `path`.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        repeat: Repeat,
        idempotency_key: Option<&str>,
    ) -> Result<T, CallError> {
        let body = serde_json::to_vec(body).map_err(|e| CallError::Decode(e.to_string()))?;
        self.call(Method::POST, path, Some(body), repeat, idempotency_key)
            .await?
            .ok_or_else(|| CallError::Status {
                status: 404,
                body: format!("no route {path}"),
            })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        repeat: Repeat,
        idempotency_key: Option<&str>,
    ) -> Result<Option<T>, CallError> {
        let settings = self.inner.settings;
        let deadline = Instant::now() + settings.timeout * (settings.retries + 1);
        let safe = repeat == Repeat::Safe || idempotency_key.is_some();
        let mut attempt = 0u32;
        loop {
            let result = self
                .try_once(&method, path, body.clone(), idempotency_key, deadline)
                .await;
            let error = match result {
                Try::Answer(status, bytes) if status == StatusCode::NOT_FOUND => {
                    let _ = bytes;
                    return Ok(None);
                }
                Try::Answer(status, bytes) if status.is_success() => {
                    return serde_json::from_slice(&bytes)
                        .map(Some)
                        .map_err(|e| CallError::Decode(e.to_string()));
                }
                Try::Answer(status, bytes) => CallError::Status {
                    status: status.as_u16(),
                    body: String::from_utf8_lossy(&bytes).chars().take(500).collect(),
                },
                Try::Failed(error) => error,
            };
            let retryable = match &error {
                CallError::Unreachable(_) => true,
                CallError::NoAnswer(_) => safe,
                CallError::Status { status, .. } => safe && matches!(status, 502..=504),
                CallError::OpenCircuit { .. } | CallError::Decode(_) => false,
            };
            attempt += 1;
            let pause = scaleshop_db::clock::backoff(
                Duration::from_millis(50),
                Duration::from_secs(1),
                attempt,
            );
            if !retryable || attempt > settings.retries || Instant::now() + pause >= deadline {
                return Err(error);
            }
            tracing::debug!(target_service = self.inner.target, attempt, error = %error, "retrying a service call");
            tokio::time::sleep(pause).await;
        }
    }

    async fn try_once(
        &self,
        method: &Method,
        path: &str,
        body: Option<Vec<u8>>,
        idempotency_key: Option<&str>,
        deadline: Instant,
    ) -> Try {
        let inner = &self.inner;
        let target = inner.target;
        if let Err(rejected) = inner.breaker.lock().admit(Instant::now()) {
            metrics::counter!(names::SERVICE_CLIENT_REQUESTS, "target" => target, "outcome" => "open_circuit")
                .increment(1);
            return Try::Failed(CallError::OpenCircuit {
                target,
                retry_after: rejected.retry_after,
            });
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let budget = remaining.min(inner.settings.timeout);
        let token = match inner.keys.tokens.issue_service(inner.caller, TOKEN_TTL) {
            Ok(token) => token,
            Err(e) => {
                return Try::Failed(CallError::Unreachable(format!("service token: {e:?}")));
            }
        };
        let mut request = inner
            .http
            .request(method.clone(), format!("{}{path}", inner.base))
            .timeout(budget)
            .bearer_auth(token)
            .header(DEADLINE_HEADER, remaining.as_millis().to_string());
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        // One client span per try; the callee's request span is its child.
        let span = tracing::info_span!(
            target: scaleshop_telemetry::trace::SPANS,
            "call",
            otel.name = format!("{} {target}{}", method.as_str(), route_of(path)),
            otel.kind = "client",
            peer.service = target,
            http.response.status_code = tracing::field::Empty,
        );
        if let Some(traceparent) = scaleshop_telemetry::trace::traceparent_of(&span) {
            request = request.header(scaleshop_telemetry::trace::TRACEPARENT, traceparent);
        }
        let started = Instant::now();
        let sent = async {
            let response = request.send().await?;
            let status = response.status();
            let bytes = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, bytes))
        }
        .instrument(span.clone())
        .await;
        if let Ok((status, _)) = &sent {
            span.record("http.response.status_code", status.as_u16());
        }
        metrics::histogram!(names::SERVICE_CLIENT_DURATION, "target" => target)
            .record(started.elapsed().as_secs_f64());
        let (outcome, result, failed) = match sent {
            Ok((status, bytes)) if status.is_server_error() => {
                ("error", Try::Answer(status, bytes), true)
            }
            Ok((status, bytes)) => ("ok", Try::Answer(status, bytes), false),
            Err(e) if e.is_timeout() => (
                "timeout",
                Try::Failed(CallError::NoAnswer(format!(
                    "{target}: no answer within {budget:?}"
                ))),
                true,
            ),
            Err(e) if e.is_connect() => (
                "error",
                Try::Failed(CallError::Unreachable(format!("{target}: {e}"))),
                true,
            ),
            Err(e) => (
                "error",
                Try::Failed(CallError::NoAnswer(format!("{target}: {e}"))),
                true,
            ),
        };
        {
            let mut breaker = inner.breaker.lock();
            if failed {
                breaker.failure(Instant::now());
            } else {
                breaker.success();
            }
        }
        metrics::counter!(names::SERVICE_CLIENT_REQUESTS, "target" => target, "outcome" => outcome)
            .increment(1);
        result
    }
}

#[cfg(test)]
mod tests {
    //! The retry rule, the breaker and the deadline header, against a real HTTP
    //! server on 127.0.0.1 that counts what reaches it.

    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

    use axum::Router;
    use axum::extract::{Path, State};
    use axum::http::HeaderMap;
    use axum::routing::get;

    use super::*;

    #[derive(Default)]
    struct Seen {
        tries: AtomicU32,
        deadline_ms: AtomicU64,
    }

    async fn answer(
        State(seen): State<Arc<Seen>>,
        Path(status): Path<u16>,
        headers: HeaderMap,
    ) -> (StatusCode, &'static str) {
        seen.tries.fetch_add(1, Ordering::SeqCst);
        let deadline = headers
            .get(&DEADLINE_HEADER)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(u64::MAX);
        seen.deadline_ms.store(deadline, Ordering::SeqCst);
        (
            StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
            "{\"ok\":true}",
        )
    }

    async fn slow(State(seen): State<Arc<Seen>>) -> &'static str {
        seen.tries.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(5)).await;
        "{\"ok\":true}"
    }

    /// A server on a free port of 127.0.0.1; what reached it.
    async fn server() -> (String, Arc<Seen>) {
        let seen = Arc::new(Seen::default());
        let app = Router::new()
            .route("/status/{code}", get(answer).post(answer))
            .route("/slow", get(slow).post(slow))
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}"), seen)
    }

    fn client(base: &str, retries: u32, breaker_failures: u32) -> ServiceClient {
        let settings = ClientSettings {
            timeout: Duration::from_millis(300),
            idle: Duration::from_secs(4),
            retries,
            breaker_failures,
            breaker_open: Duration::from_secs(30),
        };
        let keys = Keys::new(b"0123456789abcdef0123456789abcdef", Duration::from_secs(60));
        ServiceClient::new("orders", "inventory", base, settings, keys).unwrap()
    }

    #[derive(Debug, serde::Deserialize)]
    struct Ok {
        #[allow(dead_code, reason = "read only to check the answer parses")]
        ok: bool,
    }

    #[tokio::test]
    async fn safe_calls_are_tried_again_on_a_gateway_error_and_unsafe_ones_are_not() {
        let (base, seen) = server().await;
        let c = client(&base, 2, 100);
        // A read: 1 + 2 tries.
        let e = c.get::<Ok>("/status/503").await.unwrap_err();
        assert!(matches!(e, CallError::Status { status: 503, .. }), "{e}");
        assert_eq!(seen.tries.swap(0, Ordering::SeqCst), 3);
        // A write without an idempotency key: once.
        let e = c
            .post::<_, Ok>("/status/502", &serde_json::json!({}), Repeat::Unsafe, None)
            .await
            .unwrap_err();
        assert!(matches!(e, CallError::Status { status: 502, .. }), "{e}");
        assert_eq!(seen.tries.swap(0, Ordering::SeqCst), 1);
        // The same write with a key: safe to repeat.
        let _ = c
            .post::<_, Ok>(
                "/status/504",
                &serde_json::json!({}),
                Repeat::Unsafe,
                Some("key-1"),
            )
            .await
            .unwrap_err();
        assert_eq!(seen.tries.swap(0, Ordering::SeqCst), 3);
        // An answer that repeating cannot change: once, even for a read.
        for status in [400, 409, 422, 500] {
            let e = c.get::<Ok>(&format!("/status/{status}")).await.unwrap_err();
            assert!(matches!(e, CallError::Status { .. }), "{e}");
            assert_eq!(seen.tries.swap(0, Ordering::SeqCst), 1, "{status}");
        }
        // 404 is an answer (None), 200 a value.
        assert!(c.get::<Ok>("/status/404").await.unwrap().is_none());
        assert!(c.get::<Ok>("/status/200").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_lost_answer_is_asked_again_only_when_safe() {
        let (base, seen) = server().await;
        let c = client(&base, 1, 100);
        let e = c.get::<Ok>("/slow").await.unwrap_err();
        assert!(matches!(e, CallError::NoAnswer(_)), "{e}");
        assert!(e.is_unavailable());
        assert_eq!(seen.tries.swap(0, Ordering::SeqCst), 2);
        let e = c
            .post::<_, Ok>("/slow", &serde_json::json!({}), Repeat::Unsafe, None)
            .await
            .unwrap_err();
        assert!(matches!(e, CallError::NoAnswer(_)), "{e}");
        assert_eq!(seen.tries.swap(0, Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_unreachable_service_is_tried_again_then_the_breaker_opens() {
        // A port nothing listens on.
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let c = client(&format!("http://{closed}"), 1, 3);
        let e = c
            .post::<_, Ok>("/status/200", &serde_json::json!({}), Repeat::Unsafe, None)
            .await
            .unwrap_err();
        // The request never left, so even a write is tried again.
        assert!(matches!(e, CallError::Unreachable(_)), "{e}");
        assert!(e.is_unavailable());
        // Past 3 failures the circuit is open: refused at once, with a wait.
        let _ = c.get::<Ok>("/status/200").await;
        let e = c.get::<Ok>("/status/200").await.unwrap_err();
        assert!(matches!(e, CallError::OpenCircuit { .. }), "{e}");
        assert!(e.retry_after_secs() >= 1);
    }

    #[tokio::test]
    async fn the_callee_is_told_how_long_the_caller_waits() {
        let (base, seen) = server().await;
        let c = client(&base, 2, 100);
        c.get::<Ok>("/status/200").await.unwrap();
        let deadline = seen.deadline_ms.load(Ordering::SeqCst);
        // All the tries' time: at most (1 + retries) x 300 ms, and not nothing.
        assert!(deadline > 0 && deadline <= 900, "{deadline}");
    }
}
