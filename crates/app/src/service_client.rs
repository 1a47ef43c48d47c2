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

use crate::breaker::Breaker;

/// The header that carries how long the caller still waits, in milliseconds.
pub const DEADLINE_HEADER: &str = "x-request-deadline-ms";
/// How long a service token is valid (each call signs a new one).
const TOKEN_TTL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
pub struct ClientSettings {
    pub timeout: Duration,
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
            .pool_idle_timeout(Duration::from_secs(30))
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
        let started = Instant::now();
        let sent = async {
            let response = request.send().await?;
            let status = response.status();
            let bytes = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, bytes))
        }
        .await;
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
