//! Traces over real OTLP: a receiver built from `opentelemetry-proto` takes the
//! spans the real binary exports (OTLP/HTTP, protobuf), and one order must come
//! out as one connected trace: `POST /v1/orders`, the event it published, the
//! saga's job, the saga's event, the email's job and the email itself; in one
//! process, and in a split deployment of two processes where the trace also
//! crosses the calls between services and the event bus.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use scaleshop_testkit::{Backend, both, fixture};
use serde_json::{Value, json};

use crate::process::{Api, Deployment, Server, eventually};
use crate::saga_crash::{customer, product};

/// One span as the receiver got it.
#[derive(Debug, Clone)]
struct Seen {
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    service: String,
    /// The span's attributes, each value as text.
    attributes: HashMap<String, String>,
}

impl Seen {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// An attribute's value as text.
fn text(value: &AnyValue) -> String {
    match value {
        AnyValue::StringValue(s) => s.clone(),
        AnyValue::IntValue(i) => i.to_string(),
        AnyValue::BoolValue(b) => b.to_string(),
        AnyValue::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// An OTLP/HTTP receiver on a free port of 127.0.0.1.
struct Receiver {
    url: String,
    spans: Arc<Mutex<Vec<Seen>>>,
}

impl Receiver {
    async fn start() -> Self {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new()
            .route("/v1/traces", post(receive))
            .with_state(spans.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, spans }
    }

    fn trace(&self, trace_id: &str) -> Vec<Seen> {
        let spans = self.spans.lock();
        spans
            .iter()
            .filter(|span| span.trace_id == trace_id)
            .cloned()
            .collect()
    }

    fn named(&self, name: &str) -> Vec<Seen> {
        let spans = self.spans.lock();
        spans.iter().filter(|s| s.name == name).cloned().collect()
    }
}

async fn receive(State(spans): State<Arc<Mutex<Vec<Seen>>>>, body: Bytes) -> impl IntoResponse {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, Vec::new()).into_response();
    };
    let mut seen = Vec::new();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|resource| resource.attributes.iter())
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
            .map(text)
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                seen.push(Seen {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    name: span.name,
                    service: service.clone(),
                    attributes: span
                        .attributes
                        .iter()
                        .filter_map(|kv| {
                            Some((kv.key.clone(), text(kv.value.as_ref()?.value.as_ref()?)))
                        })
                        .collect(),
                });
            }
        }
    }
    spans.lock().extend(seen);
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
        .into_response()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn traced(deployment: &mut Deployment, receiver: &Receiver) {
    deployment
        .set("SCALESHOP_OTLP_ENDPOINT", &receiver.url)
        // Export every 100 ms rather than every 5 s.
        .set("OTEL_BSP_SCHEDULE_DELAY", "100")
        .set("SCALESHOP_EVENT_POLL_MS", "100")
        .set("SCALESHOP_JOB_POLL_MS", "100");
}

/// A product (`sku`) and a signed-in customer: (product id, token).
async fn shop(api: &Api, sku: &str) -> (String, String) {
    let admin = api.admin_token().await;
    let item = product(api, &admin, sku, 100).await;
    let token = customer(api, &format!("{}@example.com", sku.to_lowercase())).await;
    (item, token)
}

async fn place(api: &Api, token: &str, product: &str, traceparent: Option<&str>) -> String {
    let mut request = api
        .client
        .post(api.url("/v1/orders"))
        .bearer_auth(token)
        .header("Idempotency-Key", uuid::Uuid::now_v7().to_string())
        .json(&json!({"items": [{"product_id": product, "quantity": 1}], "payment_method": "pm_card_visa"}));
    if let Some(traceparent) = traceparent {
        request = request.header("traceparent", traceparent);
    }
    let r = request.send().await.expect("place");
    assert_eq!(r.status().as_u16(), 202);
    let body: Value = r.json().await.expect("order");
    body["id"].as_str().expect("id").to_owned()
}

/// Places an order (with the client's `traceparent`, if any) and waits until
/// it is `completed`.
async fn order(api: &Api, token: &str, product: &str, traceparent: Option<&str>) {
    let id = place(api, token, product, traceparent).await;
    completed(api, token, &id).await;
}

async fn completed(api: &Api, token: &str, id: &str) {
    let status = eventually(Duration::from_secs(30), || async {
        let order = api
            .get_json(&format!("/v1/orders/{id}"), Some(token))
            .await?;
        order["status"]
            .as_str()
            .filter(|s| *s != "pending")
            .map(str::to_owned)
    })
    .await;
    assert_eq!(status, "completed");
}

/// The steps an order's trace must hold, each a descendant of the one before:
/// the request, its event, the saga's job, the saga's event, the email's job,
/// the email.
const CHAIN: [&str; 7] = [
    "POST /v1/orders",
    "publish order.created",
    "consume order.created",
    "job orders",
    "publish order.processed",
    "job email",
    "email send (file)",
];

/// Waits until the trace holds every step of [`CHAIN`] on one line of descent
/// and is connected: every span's parent is in the trace, but for its one root
/// (whose parent is `outside`, or none; checked after).
async fn connected_trace(receiver: &Receiver, trace_id: &str, outside: &str) -> Vec<Seen> {
    let spans = eventually(Duration::from_secs(30), || async {
        let spans = receiver.trace(trace_id);
        let by_id: HashMap<&str, &Seen> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
        let email = spans.iter().find(|s| s.name == CHAIN[CHAIN.len() - 1])?;
        // The email's ancestors, nearest first.
        let mut line = vec![email.name.clone()];
        let mut at = email;
        while let Some(parent) = by_id.get(at.parent.as_str()) {
            line.push(parent.name.clone());
            at = parent;
        }
        line.reverse();
        let mut steps = CHAIN.iter();
        let mut want = steps.next();
        for name in &line {
            if Some(&name.as_str()) == want {
                want = steps.next();
            }
        }
        // A span is exported when it ends: a child (an event published while
        // a delivery runs) can be seen before its parent (the delivery). Wait
        // for the parents too: connected, one root.
        let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
        let roots = spans
            .iter()
            .filter(|s| !ids.contains(s.parent.as_str()))
            .count();
        (want.is_none() && roots == 1).then_some(spans)
    })
    .await;
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let roots: Vec<&Seen> = spans
        .iter()
        .filter(|s| !ids.contains(s.parent.as_str()))
        .collect();
    assert_eq!(roots.len(), 1, "one root: {roots:?}");
    assert_eq!(roots[0].parent, outside, "the root's parent");
    assert_eq!(roots[0].name, CHAIN[0]);
    spans
}

/// Its log names the trace: some line inside the trace carries its id.
fn logs_name(server: &Server, trace_id: &str) -> bool {
    let needle = format!("\"trace_id\":\"{trace_id}\"");
    server.log_lines().iter().any(|line| line.contains(&needle))
}

both!(
    one_order_is_one_connected_trace_from_the_request_to_its_email,
    [sqlite, postgres],
    |backend: Backend| async move {
        let receiver = Receiver::start().await;
        let mut deployment = Deployment::fresh(backend).await;
        traced(&mut deployment, &receiver);
        let server = deployment.start().await;
        let (item, token) = shop(&server, "TRACE-1").await;

        order(&server, &token, &item, None).await;

        let request = eventually(Duration::from_secs(30), || async {
            receiver.named(CHAIN[0]).into_iter().next()
        })
        .await;
        let spans = connected_trace(&receiver, &request.trace_id, "").await;
        // The database shows up inside it.
        assert!(spans.iter().any(|s| s.name == "transaction"), "{spans:?}");
        assert!(spans.iter().all(|s| s.service == "scaleshop"));
        assert!(logs_name(&server, &request.trace_id));
        assert_eq!(request.attribute("route"), Some("/v1/orders"));
        assert_eq!(request.attribute("http.response.status_code"), Some("202"));

        // Reads, each its own trace. The request span is named by the route's
        // template, not by the path, and carries the answer's status (an
        // unknown id is a 404 on the same template); the cache lookup inside
        // says which tier answered: the first read of a new product is loaded
        // from the database, a later one is an L1 hit. (The product's own
        // `product.created` may evict the first load when it reaches the cache's
        // invalidation consumer, so up to 10 reads, 100 ms apart, look for the hit.)
        let admin = server.admin_token().await;
        let fresh = product(&server, &admin, "TRACE-1B", 10).await;
        let path = format!("/v1/products/{fresh}");
        let unknown = format!("/v1/products/{}", uuid::Uuid::now_v7());
        let read = async |n: u128, path: &str, status: u16| {
            let trace_id = format!("{:032x}", 0x7ead_0000_u128 + n);
            let r = server
                .client
                .get(server.url(path))
                .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
                .send()
                .await
                .expect("read");
            assert_eq!(r.status().as_u16(), status);
            // The request span and the tier of its cache lookup.
            eventually(Duration::from_secs(30), || async {
                let spans = receiver.trace(&trace_id);
                let request = spans.iter().find(|s| s.name.starts_with("GET "))?.clone();
                let tier = spans
                    .iter()
                    .find(|s| s.name == "cache products")
                    .and_then(|s| s.attribute("cache.tier"))
                    .map(str::to_owned);
                (status != 200 || tier.is_some()).then_some((request, tier))
            })
            .await
        };
        let (missing, _) = read(0, &unknown, 404).await;
        assert_eq!(missing.name, "GET /v1/products/{id}");
        assert_eq!(missing.attribute("route"), Some("/v1/products/{id}"));
        assert_eq!(missing.attribute("http.response.status_code"), Some("404"));
        let (first, tier) = read(1, &path, 200).await;
        assert_eq!(first.name, "GET /v1/products/{id}");
        assert_eq!(first.attribute("http.response.status_code"), Some("200"));
        assert_eq!(
            tier.as_deref(),
            Some("database"),
            "the first read is loaded"
        );
        let mut tiers = Vec::new();
        for n in 2..12 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (_, tier) = read(n, &path, 200).await;
            tiers.extend(tier);
            if tiers.last().is_some_and(|t| t == "l1") {
                break;
            }
        }
        assert_eq!(
            tiers.last().map(String::as_str),
            Some("l1"),
            "a later read is an L1 hit: {tiers:?}"
        );
    }
);

// Two processes: orders in one, every other service in the other. The trace
// crosses their HTTP calls (`traceparent` header) and the events between them
// (the log's column, or the NATS message's header).
both!(
    an_order_is_one_trace_across_a_split_deployment,
    [postgres, nats],
    |backend: Backend| async move {
        let receiver = Receiver::start().await;
        let mut base = Deployment::fresh(backend).await;
        traced(&mut base, &receiver);
        let rest = base
            .with_target("users,catalog,inventory,payments,notifications,media")
            .start()
            .await;
        let orders = base.orders_calling(&rest.base).start().await;
        let (item, token) = shop(&rest, "TRACE-2").await;

        // The client's own trace goes on through both processes.
        let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
        let client_span = "00f067aa0ba902b7";
        let traceparent = format!("00-{trace_id}-{client_span}-01");
        order(&orders, &token, &item, Some(&traceparent)).await;

        let spans = connected_trace(&receiver, trace_id, client_span).await;
        let services: HashSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
        assert!(services.contains("scaleshop-orders"), "{services:?}");
        assert!(
            services.contains("scaleshop-users+inventory+catalog+payments+notifications+media"),
            "{services:?}"
        );
        // A call between services: the callee's request span is the child of
        // the caller's client span, in the other process.
        let by_id: HashMap<&str, &Seen> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
        let crossed = spans.iter().any(|s| {
            s.name.contains("/internal/")
                && s.service != "scaleshop-orders"
                && by_id
                    .get(s.parent.as_str())
                    .is_some_and(|caller| caller.service == "scaleshop-orders")
        });
        assert!(crossed, "no call between the processes in {spans:?}");
        // The email is sent by the other process, in the order's trace.
        let email = spans.iter().find(|s| s.name == CHAIN[6]).expect("email");
        assert_ne!(email.service, "scaleshop-orders");
        assert!(logs_name(&orders, trace_id));
        assert!(logs_name(&rest, trace_id));
    }
);

// The split cluster of `scripts/cluster up --split` (one instance of each
// group behind the HAProxy gateway, events over NATS): the client's trace goes
// through the gateway into the orders instance, across the calls between
// services (which also pass the gateway) and the event bus, to the email sent by
// the notifications instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_is_one_trace_across_the_split_cluster_behind_its_gateway() {
    const TEST: &str = "an_order_is_one_trace_across_the_split_cluster_behind_its_gateway";
    if crate::cluster::skip_without_haproxy(TEST) {
        return;
    }
    let receiver = Receiver::start().await;
    let dir = scaleshop_testkit::temp_dir("scaleshop-traced-cluster");
    let _down = crate::cluster::Down(dir.clone());
    let mut expected: Vec<String> = crate::cluster::SPLIT
        .iter()
        .map(|(name, _)| format!("{name}-1"))
        .collect();
    expected.extend(["gateway", "postgres", "redis", "nats"].map(str::to_owned));
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    let (_, env) = crate::cluster::up_with(
        &dir,
        &["--split", "--instances", "1", "--nats"],
        &expected,
        &[
            ("SCALESHOP_OTLP_ENDPOINT", receiver.url.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let gateway = Api::new(env["SCALESHOP_URL"].clone());
    let admin = crate::cluster::cluster_admin(&gateway, &env).await;
    let item = product(&gateway, &admin, "TRACE-4", 100).await;
    let token = customer(&gateway, "trace-4@example.com").await;

    let trace_id = "5cf92f3577b34da6a3ce929d0e0e4737";
    let client_span = "10f067aa0ba902b8";
    let traceparent = format!("00-{trace_id}-{client_span}-01");
    order(&gateway, &token, &item, Some(&traceparent)).await;

    let spans = connected_trace(&receiver, trace_id, client_span).await;
    let service_of = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.service.clone())
            .unwrap_or_default()
    };
    assert_eq!(service_of(CHAIN[0]), "scaleshop-orders", "{spans:?}");
    assert_eq!(service_of(CHAIN[6]), "scaleshop-notifications", "{spans:?}");
    // The saga's calls reach the inventory (in the catalog group) and the
    // payments instance through the gateway, each a child of the orders
    // instance's client span.
    let by_id: HashMap<&str, &Seen> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let callees: HashSet<&str> = spans
        .iter()
        .filter(|s| {
            s.name.contains("/internal/")
                && by_id
                    .get(s.parent.as_str())
                    .is_some_and(|caller| caller.service == "scaleshop-orders")
        })
        .map(|s| s.service.as_str())
        .collect();
    assert!(
        callees.contains("scaleshop-payments"),
        "{callees:?} in {spans:?}"
    );
    assert!(
        callees.iter().any(|s| s.contains("inventory")),
        "{callees:?} in {spans:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// Sampling: with a ratio of 0 no new trace is recorded, but a request that
// arrives with a sampled trace is followed whole (the parent's decision wins).
both!(
    sampling_drops_new_traces_and_follows_a_sampled_parent,
    [sqlite],
    |backend: Backend| async move {
        let receiver = Receiver::start().await;
        let mut deployment = Deployment::fresh(backend).await;
        traced(&mut deployment, &receiver);
        deployment.set("SCALESHOP_OTLP_SAMPLE_RATIO", "0");
        let server = deployment.start().await;
        let (item, token) = shop(&server, "TRACE-3").await;

        order(&server, &token, &item, None).await;
        let trace_id = "0af7651916cd43dd8448eb211c80319c";
        let traceparent = format!("00-{trace_id}-b7ad6b7169203331-01");
        order(&server, &token, &item, Some(&traceparent)).await;

        // The sampled order's trace arrives whole; by then the batch that would
        // hold the other order's spans has long been sent.
        connected_trace(&receiver, trace_id, "b7ad6b7169203331").await;
        let requests = receiver.named(CHAIN[0]);
        assert_eq!(requests.len(), 1, "{requests:?}");
        assert_eq!(requests[0].trace_id, trace_id);
        let spans = receiver.spans.lock();
        assert!(
            spans.iter().all(|span| span.trace_id == trace_id),
            "only the sampled trace: {spans:?}"
        );
    }
);
