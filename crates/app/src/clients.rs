//! The adapters behind the order service's ports: the other service's in-process
//! API when it runs in this process, else its HTTP API at its configured address;
//! and the session check of a process that does not run the users service.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use scaleshop_db::StoreError;
use scaleshop_inventory::{InventoryError, Line, Reservation};
use scaleshop_orders::{CatalogPort, InventoryPort, PaymentsPort, PortError, Priced, UsersPort};
use scaleshop_payments::{Currency, PaymentMethod, PaymentResult, PaymentsError};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::service_client::{CallError, ClientSettings, Repeat, ServiceClient};

use crate::local::{LocalCatalog, LocalInventory, LocalPayments, LocalUsers};
use crate::modules::Service;
use crate::registry::{Context, Location, locate};
use crate::server::StartError;

/// What the HTTP clients of this process are made with.
#[derive(Debug, Clone)]
pub struct Clients {
    pub keys: Arc<scaleshop_web::Keys>,
    pub settings: ClientSettings,
}

/// The gateway's keep-alive timeout for idle client connections
/// (`timeout http-keep-alive` in deploy/haproxy/haproxy.cfg.in).
pub const GATEWAY_KEEP_ALIVE_MS: u64 = 5_000;

/// How long a service client keeps an idle connection: four fifths of the
/// shorter of the callees' idle timeout (`http_idle_timeout_ms`, one setting
/// for the deployment) and the gateway's, so this side always lets go first.
pub fn pooled_idle(http_idle_timeout_ms: u64) -> Duration {
    Duration::from_millis((http_idle_timeout_ms.min(GATEWAY_KEEP_ALIVE_MS) * 4 / 5).max(50))
}

impl Clients {
    pub fn new(config: &crate::Config, keys: Arc<scaleshop_web::Keys>) -> Self {
        Self {
            keys,
            settings: ClientSettings {
                timeout: Duration::from_millis(config.service_timeout_ms),
                idle: pooled_idle(config.http_idle_timeout_ms),
                retries: config.service_retries,
                breaker_failures: config.service_breaker_failures,
                breaker_open: Duration::from_millis(config.service_breaker_open_ms),
            },
        }
    }

    fn client(
        &self,
        caller: Service,
        target: Service,
        url: &str,
    ) -> Result<ServiceClient, StartError> {
        ServiceClient::new(
            caller.name(),
            target.name(),
            url,
            self.settings,
            self.keys.clone(),
        )
        .map_err(|e| StartError::Target(format!("client of {target}: {e}")))
    }
}

/// The order service's ports, each bound to an adapter.
pub struct OrderPorts {
    pub users: Arc<dyn UsersPort>,
    pub catalog: Arc<dyn CatalogPort>,
    pub inventory: Arc<dyn InventoryPort>,
    pub payments: Arc<dyn PaymentsPort>,
}

fn here<T: Clone>(handle: &Option<T>, service: Service) -> Result<T, StartError> {
    handle
        .clone()
        .ok_or_else(|| StartError::Target(format!("{service} is not in this process")))
}

pub fn order_ports(cx: &Context<'_>) -> Result<OrderPorts, StartError> {
    let at = |service| locate(cx.target, cx.config, service);
    let users: Arc<dyn UsersPort> = match at(Service::Users) {
        Location::Here => Arc::new(LocalUsers(here(&cx.users, Service::Users)?)),
        Location::At(url) => Arc::new(HttpUsers(cx.clients.client(
            Service::Orders,
            Service::Users,
            &url,
        )?)),
    };
    let catalog: Arc<dyn CatalogPort> = match at(Service::Catalog) {
        Location::Here => Arc::new(LocalCatalog(here(&cx.catalog, Service::Catalog)?)),
        Location::At(url) => Arc::new(HttpCatalog(cx.clients.client(
            Service::Orders,
            Service::Catalog,
            &url,
        )?)),
    };
    let inventory: Arc<dyn InventoryPort> = match at(Service::Inventory) {
        Location::Here => Arc::new(LocalInventory(here(&cx.inventory, Service::Inventory)?)),
        Location::At(url) => Arc::new(HttpInventory(cx.clients.client(
            Service::Orders,
            Service::Inventory,
            &url,
        )?)),
    };
    let payments: Arc<dyn PaymentsPort> = match at(Service::Payments) {
        Location::Here => Arc::new(LocalPayments(here(&cx.payments, Service::Payments)?)),
        Location::At(url) => Arc::new(HttpPayments(cx.clients.client(
            Service::Orders,
            Service::Payments,
            &url,
        )?)),
    };
    Ok(OrderPorts {
        users,
        catalog,
        inventory,
        payments,
    })
}

/// The session check of a process that does not run the users service: the
/// users service's answer (`GET /internal/users/{id}/sessions`), cached in this
/// process exactly as the users service caches its own (in-process only, dropped
/// through the event log on `user.updated` and `session.ended`, bounded by the
/// cache's TTL). `None` when this process runs the users service.
pub fn remote_session_check(
    cx: &Context<'_>,
) -> Result<Option<Arc<dyn scaleshop_web::SessionCheck>>, StartError> {
    let Location::At(url) = locate(cx.target, cx.config, Service::Users) else {
        return Ok(None);
    };
    let caller = cx.target.services().next().unwrap_or(Service::Users);
    Ok(Some(Arc::new(RemoteSessions {
        client: cx.clients.client(caller, Service::Users, &url)?,
        cache: cx.sessions_cache.clone(),
    })))
}

struct RemoteSessions {
    client: ServiceClient,
    cache: Arc<scaleshop_cache::TieredCache<scaleshop_users::domain::SessionState>>,
}

impl scaleshop_web::SessionCheck for RemoteSessions {
    fn is_live<'a>(
        &'a self,
        caller: &'a scaleshop_web::Caller,
    ) -> scaleshop_web::sessions::SessionFuture<'a> {
        Box::pin(async move {
            let user_id = caller.user_id;
            let client = &self.client;
            let state = self
                .cache
                .get_or_load(&user_id.to_string(), None, || async move {
                    client
                        .get::<scaleshop_users::domain::SessionState>(&format!(
                            "/internal/users/{user_id}/sessions"
                        ))
                        .await
                })
                .await
                .map_err(|error| {
                    tracing::warn!(%error, "the users service did not answer a session check");
                    scaleshop_web::ApiError::unavailable()
                })?;
            Ok(state.is_some_and(|s| s.admits(caller.session.epoch, caller.session.id)))
        })
    }
}

fn port_error(error: CallError, service: &'static str) -> PortError {
    if error.is_unavailable() {
        PortError::Unavailable {
            service,
            retry_after_secs: error.retry_after_secs(),
            reason: error.to_string(),
        }
    } else {
        PortError::Failed {
            service,
            reason: error.to_string(),
        }
    }
}

/// A failure of the inventory service: its database's, as far as the saga cares
/// (not an attempt of the job; the step is kept).
fn inventory_error(error: CallError) -> InventoryError {
    if error.is_unavailable() {
        InventoryError::Store(StoreError::Unavailable)
    } else {
        InventoryError::Store(StoreError::Other(format!("inventory: {error}")))
    }
}

#[derive(Debug)]
struct HttpUsers(ServiceClient);

#[derive(Deserialize)]
struct Exists {
    exists: bool,
}

#[async_trait]
impl UsersPort for HttpUsers {
    async fn user_exists(&self, user_id: Uuid) -> Result<bool, PortError> {
        let answer: Option<Exists> = self
            .0
            .get(&format!("/internal/users/exists?id={user_id}"))
            .await
            .map_err(|e| port_error(e, "users"))?;
        Ok(answer.is_some_and(|a| a.exists))
    }
}

#[derive(Debug)]
struct HttpCatalog(ServiceClient);

#[derive(Deserialize)]
struct ProductAnswer {
    id: Uuid,
    price_cents: i64,
    currency: Currency,
}

#[async_trait]
impl CatalogPort for HttpCatalog {
    /// The public product route, one product at a time (an order has at most 50
    /// lines; a missing product is a 404).
    async fn prices(&self, ids: &[Uuid]) -> Result<Vec<Priced>, PortError> {
        let mut priced = Vec::with_capacity(ids.len());
        for id in ids {
            if priced.iter().any(|p: &Priced| p.id == *id) {
                continue;
            }
            let product: Option<ProductAnswer> = self
                .0
                .get(&format!("/v1/products/{id}"))
                .await
                .map_err(|e| port_error(e, "catalog"))?;
            if let Some(p) = product {
                priced.push(Priced {
                    id: p.id,
                    price_cents: p.price_cents,
                    currency: p.currency,
                });
            }
        }
        Ok(priced)
    }
}

#[derive(Debug)]
struct HttpInventory(ServiceClient);

#[derive(Deserialize)]
struct ReserveAnswer {
    outcome: String,
    product_id: Option<Uuid>,
}

#[derive(Deserialize)]
struct ReleaseAnswer {
    released: bool,
}

#[async_trait]
impl InventoryPort for HttpInventory {
    async fn reserve(&self, order_id: Uuid, lines: &[Line]) -> Result<Reservation, InventoryError> {
        // Idempotent per order: safe to send again.
        let answer: ReserveAnswer = self
            .0
            .post(
                "/internal/inventory/reservations",
                &json!({"order_id": order_id, "lines": lines}),
                Repeat::Safe,
                None,
            )
            .await
            .map_err(inventory_error)?;
        match (answer.outcome.as_str(), answer.product_id) {
            ("reserved", _) => Ok(Reservation::Reserved),
            ("released", _) => Ok(Reservation::Released),
            ("out_of_stock", Some(product_id)) => Ok(Reservation::OutOfStock { product_id }),
            ("unknown_product", Some(product)) => Err(InventoryError::UnknownProduct(product)),
            (other, _) => Err(InventoryError::Store(StoreError::Other(format!(
                "inventory answered the outcome {other:?}"
            )))),
        }
    }

    async fn release(&self, order_id: Uuid) -> Result<bool, InventoryError> {
        let answer: ReleaseAnswer = self
            .0
            .post(
                "/internal/inventory/releases",
                &json!({"order_id": order_id}),
                Repeat::Safe,
                None,
            )
            .await
            .map_err(inventory_error)?;
        Ok(answer.released)
    }
}

#[derive(Debug)]
struct HttpPayments(ServiceClient);

#[derive(Deserialize)]
struct Accepted {
    accepted: bool,
}

#[derive(Deserialize)]
struct ChargeAnswer {
    outcome: String,
    detail: Option<String>,
}

#[async_trait]
impl PaymentsPort for HttpPayments {
    async fn accepts(&self, method: PaymentMethod) -> Result<bool, PortError> {
        let query: String = url_encode(method.as_str());
        let answer: Option<Accepted> = self
            .0
            .get(&format!("/internal/payments/methods?method={query}"))
            .await
            .map_err(|e| port_error(e, "payments"))?;
        Ok(answer.is_some_and(|a| a.accepted))
    }

    async fn charge(
        &self,
        order_id: Uuid,
        amount_cents: i64,
        currency: &Currency,
        method: PaymentMethod,
        last_attempt: bool,
    ) -> Result<PaymentResult, PaymentsError> {
        let key = format!("order-{order_id}");
        let answer: Result<ChargeAnswer, CallError> = self
            .0
            .post(
                "/internal/payments/charges",
                &json!({
                    "order_id": order_id,
                    "amount_cents": amount_cents,
                    "currency": currency,
                    "method": method,
                    "last_attempt": last_attempt,
                }),
                Repeat::Safe,
                Some(&key),
            )
            .await;
        let answer = match answer {
            Ok(answer) => answer,
            // Sent, and no answer: the charge may have been made; ask again later
            // under the same key.
            Err(e @ CallError::NoAnswer(_)) => return Err(PaymentsError::Unknown(e.to_string())),
            // Never sent, or the service is failing: nothing is decided; the order
            // stays where it is and the job tries again without counting it.
            Err(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, "payments unavailable");
                return Err(PaymentsError::Store(StoreError::Unavailable));
            }
            Err(e) => {
                return Err(PaymentsError::Store(StoreError::Other(format!(
                    "payments: {e}"
                ))));
            }
        };
        let detail = answer.detail.unwrap_or_default();
        match answer.outcome.as_str() {
            "succeeded" => Ok(PaymentResult::Succeeded),
            "declined" => Ok(PaymentResult::Declined),
            "error" => Ok(PaymentResult::Error),
            "transient" => Err(PaymentsError::Transient(detail)),
            "unknown" => Err(PaymentsError::Unknown(detail)),
            "invalid" => Err(PaymentsError::Invalid(detail)),
            other => Err(PaymentsError::Store(StoreError::Other(format!(
                "payments answered the outcome {other:?}"
            )))),
        }
    }
}

/// Percent-encodes a query value.
fn url_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod idle_tests {
    use super::*;

    #[test]
    fn a_pooled_connection_is_let_go_before_the_gateway_or_the_callee_closes_it() {
        let template = include_str!("../../../deploy/haproxy/haproxy.cfg.in");
        let line = format!("timeout http-keep-alive {}s", GATEWAY_KEEP_ALIVE_MS / 1000);
        assert!(
            template.contains(&line),
            "the gateway template no longer says `{line}`"
        );
        assert_eq!(pooled_idle(5_000), Duration::from_millis(4_000));
        assert_eq!(pooled_idle(60_000), Duration::from_millis(4_000));
        assert_eq!(pooled_idle(1_000), Duration::from_millis(800));
    }
}
