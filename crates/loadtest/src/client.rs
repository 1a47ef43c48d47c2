//! The API as a shopper and an admin speak it: seeding products and shoppers,
//! and the requests of each flow, each one measured into the recorder.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::Error;
use crate::recorder::Recorder;
use crate::scenario::{Flow, FlowSettings};

/// Request kinds (one histogram each). The first group are single requests;
/// `order_final` (202 until the order is final) and `buy` (a whole buy, from its
/// scheduled arrival) are derived, and stay out of "all requests".
pub mod kind {
    pub const HEALTH: &str = "healthz";
    pub const PRODUCT: &str = "product";
    pub const SEARCH: &str = "search";
    pub const ORDER_SUBMIT: &str = "order_submit";
    pub const ORDER_POLL: &str = "order_poll";
    pub const SIGNUP: &str = "signup";
    pub const RENAME: &str = "rename";
    pub const SIGN_IN: &str = "sign_in";
    pub const ORDER_FINAL: &str = "order_final";
    pub const BUY: &str = "buy";
    pub const DERIVED: [&str; 2] = [ORDER_FINAL, BUY];
}

/// Words that seeded product names are made of, and searches look for.
const WORDS: [&str; 16] = [
    "lamp", "chair", "table", "kettle", "jacket", "boots", "scarf", "mug", "teapot", "blanket",
    "pillow", "candle", "basket", "mirror", "clock", "vase",
];
const COLOURS: [&str; 8] = [
    "red", "blue", "green", "amber", "slate", "ivory", "coral", "olive",
];

/// How requests are made: the client and its bounds.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The API's base address, without a trailing slash.
    pub url: String,
    /// Requests in flight at once (one pooled connection each).
    pub connections: usize,
    /// Bound of one request.
    pub timeout: Duration,
    /// How often a buy polls its order.
    pub poll_interval: Duration,
    /// How long a buy waits for its order to become final.
    pub order_timeout: Duration,
}

/// A shopper with a session.
#[derive(Debug, Clone)]
pub struct Shopper {
    pub id: String,
    pub token: String,
}

/// What the flows work on: products to read and order, shoppers to order as.
#[derive(Debug, Clone, Default)]
pub struct Fixture {
    pub products: Vec<String>,
    pub words: Vec<String>,
    pub shoppers: Vec<Shopper>,
}

/// How to seed (`--seed`): the admin creates products; shoppers sign up.
#[derive(Debug, Clone)]
pub struct SeedPlan {
    pub admin_email: Option<String>,
    pub admin_password: Option<String>,
    pub products: usize,
    pub shoppers: usize,
    pub create_products: bool,
}

/// The running target: the client, the fixture, the in-flight bound.
#[derive(Debug)]
pub struct Target {
    http: reqwest::Client,
    conn: Connection,
    fixture: Fixture,
    settings: FlowSettings,
    in_flight: Arc<Semaphore>,
    /// Counters that pick products, shoppers, words and payment methods in turn,
    /// and number sign-ups (unique e-mail addresses).
    turn: AtomicU64,
    signups: AtomicU64,
    run_id: String,
}

#[derive(Deserialize)]
struct Page {
    items: Vec<Value>,
    next_cursor: Option<String>,
}

/// The class of a failed request, as counted in the report.
fn transport_class(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "transport"
    }
}

/// One measured answer: status, headers worth keeping, body.
struct Answer {
    status: StatusCode,
    location: Option<String>,
    consistency: Option<String>,
    body: bytes::Bytes,
}

pub fn http_client(conn: &Connection) -> Result<reqwest::Client, Error> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(conn.connections)
        // Under scaleshop's and its gateway's keep-alive timeouts (5 s by
        // default): an idle connection is let go before the server closes it.
        .pool_idle_timeout(Duration::from_secs(4))
        .tcp_nodelay(true)
        .timeout(conn.timeout)
        .connect_timeout(conn.timeout.min(Duration::from_secs(5)))
        .build()
        .map_err(|e| Error::Setup(format!("cannot build the HTTP client: {e}")))
}

impl Target {
    pub fn new(conn: Connection, fixture: Fixture, settings: FlowSettings) -> Result<Self, Error> {
        let http = http_client(&conn)?;
        let in_flight = Arc::new(Semaphore::new(conn.connections.max(1)));
        Ok(Self {
            http,
            conn,
            fixture,
            settings,
            in_flight,
            turn: AtomicU64::new(0),
            signups: AtomicU64::new(0),
            run_id: run_id(),
        })
    }

    pub fn fixture(&self) -> &Fixture {
        &self.fixture
    }

    fn next(&self) -> usize {
        usize::try_from(self.turn.fetch_add(1, Ordering::Relaxed)).unwrap_or(0)
    }

    /// One request, holding one of the `connections` slots while it runs. The
    /// latency counts from `since`: the scheduled time for a flow's first
    /// request (so queueing behind a slow server shows), else the request's start.
    async fn call(
        &self,
        recorder: &Recorder,
        kind: &'static str,
        since: Instant,
        request: reqwest::RequestBuilder,
        expect: StatusCode,
    ) -> Option<Answer> {
        let permit = self.in_flight.acquire().await.ok()?;
        let result = async {
            let response = request.send().await?;
            let status = response.status();
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let location = header("location");
            let consistency = header("x-consistency-token");
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>(Answer {
                status,
                location,
                consistency,
                body,
            })
        }
        .await;
        drop(permit);
        let latency = since.elapsed();
        match result {
            Ok(answer) if answer.status == expect => {
                recorder.ok(kind, latency);
                Some(answer)
            }
            Ok(answer) => {
                recorder.error(kind, answer.status.as_str(), latency);
                None
            }
            Err(e) => {
                recorder.error(kind, transport_class(&e), latency);
                None
            }
        }
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.conn.url))
    }

    /// Runs one arrival's flow; `at` is its scheduled time.
    pub async fn run_flow(&self, flow: Flow, at: Instant, recorder: &Recorder) {
        match flow {
            Flow::Health => {
                let request = self.request(Method::GET, "/healthz");
                self.call(recorder, kind::HEALTH, at, request, StatusCode::OK)
                    .await;
            }
            Flow::Browse => self.browse(at, recorder).await,
            Flow::Signup => self.signup(at, recorder).await,
            Flow::Buy => self.buy(at, recorder).await,
            Flow::Rename => self.rename(at, recorder).await,
        }
    }

    /// A signed-in account renames itself: one write of a user row and its
    /// event, with no password hash (sharded, on the user's shard).
    async fn rename(&self, at: Instant, recorder: &Recorder) {
        if self.fixture.shoppers.is_empty() {
            return;
        }
        let n = self.next();
        let shopper = &self.fixture.shoppers[n % self.fixture.shoppers.len()];
        let request = self
            .request(Method::PATCH, &format!("/v1/users/{}", shopper.id))
            .bearer_auth(&shopper.token)
            .json(&json!({"name": format!("Renamed {n}")}));
        self.call(recorder, kind::RENAME, at, request, StatusCode::OK)
            .await;
    }

    async fn browse(&self, at: Instant, recorder: &Recorder) {
        let n = self.next();
        let search = u32::try_from(n % 100).unwrap_or(0) < self.settings.search_percent;
        if search && !self.fixture.words.is_empty() {
            let word = &self.fixture.words[n % self.fixture.words.len()];
            let request = self
                .request(Method::GET, "/v1/products")
                .query(&[("q", word.as_str())]);
            self.call(recorder, kind::SEARCH, at, request, StatusCode::OK)
                .await;
        } else if !self.fixture.products.is_empty() {
            let id = &self.fixture.products[n % self.fixture.products.len()];
            let request = self.request(Method::GET, &format!("/v1/products/{id}"));
            self.call(recorder, kind::PRODUCT, at, request, StatusCode::OK)
                .await;
        }
    }

    async fn signup(&self, at: Instant, recorder: &Recorder) {
        let n = self.signups.fetch_add(1, Ordering::Relaxed);
        let body = json!({
            "email": format!("lt-{}-{n}@loadtest.example.com", self.run_id),
            "name": format!("Load Test {n}"),
            "password": "load-test-password-1",
        });
        let request = self.request(Method::POST, "/v1/users").json(&body);
        self.call(recorder, kind::SIGNUP, at, request, StatusCode::CREATED)
            .await;
    }

    async fn buy(&self, at: Instant, recorder: &Recorder) {
        if self.fixture.products.is_empty() || self.fixture.shoppers.is_empty() {
            return;
        }
        let n = self.next();
        let product = &self.fixture.products[n % self.fixture.products.len()];
        let shopper = &self.fixture.shoppers[n % self.fixture.shoppers.len()];
        let methods = &self.settings.payment_methods;
        let method = &methods[n % methods.len()];
        let view = self.request(Method::GET, &format!("/v1/products/{product}"));
        if self
            .call(recorder, kind::PRODUCT, at, view, StatusCode::OK)
            .await
            .is_none()
        {
            return;
        }
        let body = json!({
            "items": [{"product_id": product, "quantity": self.settings.quantity}],
            "payment_method": method,
        });
        let submit = self
            .request(Method::POST, "/v1/orders")
            .bearer_auth(&shopper.token)
            .header("idempotency-key", uuid::Uuid::now_v7().to_string())
            .json(&body);
        let Some(accepted) = self
            .call(
                recorder,
                kind::ORDER_SUBMIT,
                Instant::now(),
                submit,
                StatusCode::ACCEPTED,
            )
            .await
        else {
            return;
        };
        let accepted_at = Instant::now();
        let Some(location) = accepted.location.or_else(|| {
            serde_json::from_slice::<Value>(&accepted.body)
                .ok()
                .and_then(|v| {
                    v.get("id")
                        .and_then(Value::as_str)
                        .map(|id| format!("/v1/orders/{id}"))
                })
        }) else {
            recorder.outcome("order.no_location");
            return;
        };
        let deadline = accepted_at + self.conn.order_timeout;
        loop {
            tokio::time::sleep(self.conn.poll_interval).await;
            let mut poll = self
                .request(Method::GET, &location)
                .bearer_auth(&shopper.token);
            if let Some(token) = &accepted.consistency {
                poll = poll.header("x-consistency-token", token);
            }
            let answer = self
                .call(
                    recorder,
                    kind::ORDER_POLL,
                    Instant::now(),
                    poll,
                    StatusCode::OK,
                )
                .await;
            let status = answer
                .and_then(|a| serde_json::from_slice::<Value>(&a.body).ok())
                .and_then(|order| {
                    let status = order.get("status")?.as_str()?.to_owned();
                    let reason = order
                        .get("failure_reason")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                    Some((status, reason))
                });
            match status {
                Some((status, _)) if status == "pending" => {}
                Some((status, reason)) => {
                    recorder.ok(kind::ORDER_FINAL, accepted_at.elapsed());
                    recorder.ok(kind::BUY, at.elapsed());
                    match reason {
                        Some(reason) => recorder.outcome(&format!("order.{status}.{reason}")),
                        None => recorder.outcome(&format!("order.{status}")),
                    }
                    return;
                }
                None => {}
            }
            if Instant::now() >= deadline {
                recorder.error(kind::ORDER_FINAL, "not_final", accepted_at.elapsed());
                recorder.error(kind::BUY, "not_final", at.elapsed());
                recorder.outcome("order.not_final");
                return;
            }
        }
    }
}

fn run_id() -> String {
    // A short, unique tag for this run's e-mail addresses and SKUs.
    let id = uuid::Uuid::now_v7().simple().to_string();
    id[id.len() - 10..].to_owned()
}

/// Unmeasured calls for seeding and discovery, with clear errors.
struct Setup<'a> {
    http: &'a reqwest::Client,
    url: &'a str,
}

impl Setup<'_> {
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<(StatusCode, Value), Error> {
        let response = request
            .send()
            .await
            .map_err(|e| Error::Setup(format!("{what}: {} ({e})", self.url)))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| Error::Setup(format!("{what}: {e}")))?;
        let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok((status, value))
    }

    fn problem(what: &str, status: StatusCode, body: &Value) -> Error {
        let detail = body
            .get("detail")
            .or_else(|| body.get("title"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let fields: Vec<String> = body
            .get("errors")
            .and_then(Value::as_array)
            .map(|errors| {
                errors
                    .iter()
                    .map(|e| {
                        format!(
                            "{}: {}",
                            e.get("field").and_then(Value::as_str).unwrap_or("?"),
                            e.get("message").and_then(Value::as_str).unwrap_or("?")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let detail = if fields.is_empty() {
            detail.to_owned()
        } else {
            format!("{detail} ({})", fields.join("; "))
        };
        let hint = if status == StatusCode::TOO_MANY_REQUESTS {
            " (rate limited: raise the server's signup_rate_per_address / login_rate_per_address for load tests)"
        } else {
            ""
        };
        Error::Setup(format!("{what}: {status} {detail}{hint}"))
    }

    async fn sign_in(&self, email: &str, password: &str) -> Result<String, Error> {
        let request = self
            .http
            .post(format!("{}/v1/sessions", self.url))
            .json(&json!({"email": email, "password": password}));
        let (status, body) = self.send(request, "sign-in").await?;
        if status != StatusCode::CREATED {
            return Err(Self::problem(&format!("sign-in as {email}"), status, &body));
        }
        body.get("token")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| Error::Setup("sign-in answered no token".to_owned()))
    }
}

/// Prepares what the scenario needs: products (created with `--seed`, else
/// found in the catalog) and signed-in shoppers (for buys). Sign-ins are
/// measured as `sign_in`.
pub async fn prepare(
    conn: &Connection,
    plan: &SeedPlan,
    needs: &[Flow],
    recorder: &Recorder,
) -> Result<Fixture, Error> {
    let http = http_client(conn)?;
    let setup = Setup {
        http: &http,
        url: &conn.url,
    };
    let tag = run_id();
    let mut fixture = Fixture {
        words: WORDS.iter().map(|w| (*w).to_owned()).collect(),
        ..Fixture::default()
    };
    let wants_products = needs.contains(&Flow::Browse) || needs.contains(&Flow::Buy);
    if wants_products && plan.create_products {
        let (Some(email), Some(password)) = (&plan.admin_email, &plan.admin_password) else {
            return Err(Error::Usage(
                "--seed creates products as the admin: give --admin-email and --admin-password \
                 (or SCALESHOP_ADMIN_EMAIL and SCALESHOP_ADMIN_PASSWORD)"
                    .to_owned(),
            ));
        };
        let token = setup.sign_in(email, password).await?;
        for i in 0..plan.products {
            let word = WORDS[i % WORDS.len()];
            let colour = COLOURS[(i / WORDS.len()) % COLOURS.len()];
            let body = json!({
                "sku": format!("LT-{tag}-{i}"),
                "name": format!("{colour} {word} {i}"),
                "description": format!("A {colour} {word} made for load tests."),
                "price_cents": 100 + (i * 37) % 9900,
                "currency": "EUR",
                "initial_stock": 1_000_000,
            });
            let request = http
                .post(format!("{}/v1/products", conn.url))
                .bearer_auth(&token)
                .json(&body);
            let (status, answer) = setup.send(request, "creating a product").await?;
            if status != StatusCode::CREATED {
                return Err(Setup::problem("creating a product", status, &answer));
            }
            if let Some(id) = answer.get("id").and_then(Value::as_str) {
                fixture.products.push(id.to_owned());
            }
        }
    } else if wants_products {
        // Use the catalog as it is: up to `products` ids, page by page.
        let mut cursor: Option<String> = None;
        while fixture.products.len() < plan.products.max(1) {
            let mut request = http
                .get(format!("{}/v1/products", conn.url))
                .query(&[("limit", "100")]);
            if let Some(c) = &cursor {
                request = request.query(&[("cursor", c.as_str())]);
            }
            let (status, body) = setup.send(request, "listing products").await?;
            if status != StatusCode::OK {
                return Err(Setup::problem("listing products", status, &body));
            }
            let page: Page = serde_json::from_value(body)
                .map_err(|e| Error::Setup(format!("listing products: unexpected answer ({e})")))?;
            fixture.products.extend(
                page.items
                    .iter()
                    .filter_map(|p| p.get("id").and_then(Value::as_str).map(str::to_owned)),
            );
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        fixture.products.truncate(plan.products.max(1));
        if fixture.products.is_empty() {
            return Err(Error::Setup(
                "the catalog is empty: run with --seed (and the admin's credentials) to create products".to_owned(),
            ));
        }
    }
    if needs.contains(&Flow::Buy) || needs.contains(&Flow::Rename) {
        for i in 0..plan.shoppers.max(1) {
            let email = format!("lt-{tag}-shopper-{i}@loadtest.example.com");
            let password = "load-test-password-1";
            let request = http.post(format!("{}/v1/users", conn.url)).json(&json!({
                "email": email, "name": format!("Shopper {i}"), "password": password,
            }));
            let (status, body) = setup.send(request, "signing up a shopper").await?;
            if status != StatusCode::CREATED {
                return Err(Setup::problem("signing up a shopper", status, &body));
            }
            let id = body
                .get("id")
                .and_then(Value::as_str)
                .ok_or_else(|| Error::Setup("a sign-up answered no id".to_owned()))?
                .to_owned();
            let started = Instant::now();
            match setup.sign_in(&email, password).await {
                Ok(token) => {
                    recorder.ok(kind::SIGN_IN, started.elapsed());
                    fixture.shoppers.push(Shopper { id, token });
                }
                Err(e) => {
                    recorder.error(kind::SIGN_IN, "failed", started.elapsed());
                    return Err(e);
                }
            }
        }
    }
    Ok(fixture)
}
