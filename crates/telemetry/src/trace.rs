//! Distributed traces: OpenTelemetry spans exported over OTLP/HTTP (protobuf) when
//! `SCALESHOP_OTLP_ENDPOINT` is set, and the W3C `traceparent` that carries a
//! trace from one span to the next across HTTP calls, events and jobs.
//!
//! Spans are ordinary `tracing` spans. The ones that exist only for traces (a
//! query, a cache lookup, an event's publication, a call to another service) use
//! the target [`SPANS`]: the log filter turns that target off, so when no
//! endpoint is configured they are disabled at their call site (one relaxed load
//! each) and nothing is exported, allocated or propagated. The request, event
//! consumer and job spans also serve the logs: they carry `trace_id` once a trace
//! is known, so every log line inside them names its trace.
//!
//! A trace crosses a process boundary as a `traceparent` string: in the HTTP
//! header of a call between services, in the `traceparent` column of an event
//! (and the NATS message header that carries the event), and in the column of a
//! job. The span that starts on the other side takes it as its parent
//! ([`adopt`]), so one order is one trace from `POST /v1/orders` to its email.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracing` target of spans that exist only for traces.
pub const SPANS: &str = "scaleshop_spans";

/// The W3C header (and event and job column) that carries a trace.
pub const TRACEPARENT: &str = "traceparent";

/// How long one export of a batch of spans may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how much to trace.
#[derive(Debug, Clone)]
pub struct TraceSettings {
    /// The collector's OTLP/HTTP base address (`http://host:4318`); spans are
    /// posted to `<endpoint>/v1/traces` unless the address already ends so.
    pub endpoint: String,
    /// The share of new traces recorded, 0.0 to 1.0. A trace that arrives with a
    /// parent follows the parent's decision, so a trace is whole or absent.
    pub sample_ratio: f64,
    /// `service.name` of the spans (`OTEL_SERVICE_NAME` wins when set).
    pub service_name: String,
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether spans are exported by this process.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The exporter and the layer that turns `tracing` spans into OpenTelemetry ones.
pub(crate) fn layer<S>(settings: &TraceSettings) -> Result<OtelLayer<S>, String>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let ratio = settings.sample_ratio;
    if !(0.0..=1.0).contains(&ratio) {
        return Err(format!(
            "otlp_sample_ratio must be between 0 and 1, not {ratio}"
        ));
    }
    let endpoint = settings.endpoint.trim_end_matches('/');
    if !endpoint.starts_with("http://") {
        return Err(format!(
            "otlp_endpoint must be an http:// address (OTLP/HTTP), not {endpoint:?}"
        ));
    }
    let endpoint = if endpoint.ends_with("/v1/traces") {
        endpoint.to_owned()
    } else {
        format!("{endpoint}/v1/traces")
    };
    let http = reqwest::blocking::Client::builder()
        .timeout(EXPORT_TIMEOUT)
        .connect_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| format!("the OTLP client: {e}"))?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .with_http_client(Exporter(http))
        .build()
        .map_err(|e| format!("the OTLP exporter: {e}"))?;
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| settings.service_name.clone());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("scaleshop");
    if PROVIDER.set(provider).is_err() {
        return Err("traces are already set up in this process".to_owned());
    }
    ENABLED.store(true, Ordering::Relaxed);
    Ok(tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_threads(false)
        .with_tracked_inactivity(false))
}

pub(crate) type OtelLayer<S> =
    tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>;

/// Sends the spans still buffered (bounded by the export timeout). Call once,
/// at the end of the process.
pub fn flush() {
    if let Some(provider) = PROVIDER.get()
        && let Err(e) = provider.shutdown_with_timeout(EXPORT_TIMEOUT)
    {
        tracing::warn!(error = %e, "spans not exported at exit");
    }
}

/// Makes `traceparent` (from another process, an event or a job) the parent of
/// `span`, and records the trace's id in the span's `trace_id` field. With no
/// `traceparent` (or a malformed one), `span` keeps the parent it has and starts
/// a new trace if it has none. Call before the span is first entered.
pub fn adopt(span: &tracing::Span, traceparent: Option<&str>) {
    if !enabled() {
        return;
    }
    if let Some(traceparent) = traceparent {
        let carrier = Carrier::one(traceparent);
        let parent = propagator().extract(&carrier);
        if parent.span().span_context().is_valid() {
            // Fails only for a span no layer records; nothing to adopt then.
            drop(span.set_parent(parent));
        }
    }
    record_trace_id(span);
}

/// [`adopt`] with the `traceparent` of an HTTP request's headers.
pub fn adopt_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    if !enabled() {
        return;
    }
    let traceparent = headers
        .get(TRACEPARENT)
        .and_then(|value| value.to_str().ok());
    adopt(span, traceparent);
}

/// Records the trace's id in the span's `trace_id` field (a field the span must
/// declare, `tracing::field::Empty`).
pub fn record_trace_id(span: &tracing::Span) {
    if !enabled() {
        return;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", span_context.trace_id().to_string());
    }
}

/// Names `span`'s trace span `name`, also after it started (a request's span
/// learns its route only once routed).
pub fn rename(span: &tracing::Span, name: String) {
    if !enabled() {
        return;
    }
    span.context().span().update_name(name);
}

/// Whether a span made now would have a parent: spans of calls made outside any
/// request, event or job (a background poll) would each be a trace of one span.
pub fn in_a_trace() -> bool {
    enabled() && !tracing::Span::current().is_none()
}

/// The `traceparent` of `span`, to carry its trace to the next step: `None` when
/// traces are off or the span is not recorded.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if !enabled() {
        return None;
    }
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = Carrier::default();
    propagator().inject_context(&context, &mut carrier);
    carrier.0.remove(TRACEPARENT)
}

/// The `traceparent` of the current span.
pub fn current_traceparent() -> Option<String> {
    if !enabled() {
        return None;
    }
    traceparent_of(&tracing::Span::current())
}

fn propagator() -> &'static TraceContextPropagator {
    static PROPAGATOR: OnceLock<TraceContextPropagator> = OnceLock::new();
    PROPAGATOR.get_or_init(TraceContextPropagator::new)
}

/// A carrier of one trace context's headers.
#[derive(Default)]
struct Carrier(HashMap<String, String>);

impl Carrier {
    fn one(traceparent: &str) -> Self {
        Self(HashMap::from([(
            TRACEPARENT.to_owned(),
            traceparent.to_owned(),
        )]))
    }
}

impl opentelemetry::propagation::Injector for Carrier {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

impl opentelemetry::propagation::Extractor for Carrier {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The exporter's HTTP client: the workspace's reqwest, blocking, because the
/// batch span processor exports from a thread of its own, outside the runtime.
#[derive(Debug)]
struct Exporter(reqwest::blocking::Client);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Exporter {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let request = reqwest::blocking::Request::try_from(request)?;
        let response = self.0.execute(request)?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes()?;
        let mut answer = http::Response::builder().status(status).body(body)?;
        *answer.headers_mut() = headers;
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_traces_off_nothing_is_carried() {
        let span = tracing::info_span!("request", trace_id = tracing::field::Empty);
        adopt(
            &span,
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        assert_eq!(traceparent_of(&span), None);
        assert_eq!(current_traceparent(), None);
    }

    #[test]
    fn a_traceparent_survives_the_carrier() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = propagator().extract(&Carrier::one(value));
        let span_context = context.span().span_context().clone();
        assert!(span_context.is_valid());
        assert_eq!(
            span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let mut carrier = Carrier::default();
        propagator().inject_context(&context, &mut carrier);
        assert_eq!(carrier.0.get(TRACEPARENT).map(String::as_str), Some(value));
    }

    #[test]
    fn a_bad_ratio_or_endpoint_is_refused() {
        type S = tracing_subscriber::Registry;
        let settings = |endpoint: &str, ratio: f64| TraceSettings {
            endpoint: endpoint.to_owned(),
            sample_ratio: ratio,
            service_name: "scaleshop".to_owned(),
        };
        assert!(layer::<S>(&settings("http://127.0.0.1:4318", 1.5)).is_err());
        assert!(layer::<S>(&settings("https://collector:4318", 1.0)).is_err());
        assert!(layer::<S>(&settings("127.0.0.1:4318", 1.0)).is_err());
    }
}
