//! In-process adapters of the order service's ports: the other service runs in
//! this process, so a call is a function call on its API (no HTTP, no token).

use async_trait::async_trait;
use scaleshop_inventory::{Inventory, InventoryError, Line, Reservation};
use scaleshop_orders::{CatalogPort, InventoryPort, PaymentsPort, PortError, Priced, UsersPort};
use scaleshop_payments::{Currency, PaymentMethod, PaymentResult, Payments, PaymentsError};
use uuid::Uuid;

fn failed(service: &'static str, error: impl std::fmt::Display) -> PortError {
    PortError::Failed {
        service,
        reason: error.to_string(),
    }
}

fn store_error(service: &'static str, error: scaleshop_db::StoreError) -> PortError {
    match error {
        scaleshop_db::StoreError::Unavailable => PortError::Unavailable {
            service,
            reason: "database unavailable".to_owned(),
            retry_after_secs: 1,
        },
        other => failed(service, other),
    }
}

#[derive(Clone)]
pub struct LocalUsers(pub scaleshop_users::Users);

impl std::fmt::Debug for LocalUsers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalUsers")
    }
}

#[async_trait]
impl UsersPort for LocalUsers {
    async fn user_exists(&self, user_id: Uuid) -> Result<bool, PortError> {
        use scaleshop_users::service::UsersError;
        match self.0.get(user_id).await {
            Ok(_) => Ok(true),
            Err(UsersError::NotFound) => Ok(false),
            Err(UsersError::Store(e)) => Err(store_error("users", e)),
            Err(e) => Err(failed("users", e)),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LocalCatalog(pub scaleshop_catalog::Catalog);

#[async_trait]
impl CatalogPort for LocalCatalog {
    async fn prices(&self, ids: &[Uuid]) -> Result<Vec<Priced>, PortError> {
        let products = self.0.products(ids).await.map_err(|e| match e {
            scaleshop_catalog::CatalogError::Store(e) => store_error("catalog", e),
            other => failed("catalog", other),
        })?;
        Ok(products
            .into_iter()
            .map(|p| Priced {
                id: p.id,
                price_cents: p.price_cents.get(),
                currency: p.currency,
            })
            .collect())
    }
}

#[derive(Debug, Clone)]
pub struct LocalInventory(pub Inventory);

#[async_trait]
impl InventoryPort for LocalInventory {
    async fn reserve(&self, order_id: Uuid, lines: &[Line]) -> Result<Reservation, InventoryError> {
        self.0.reserve(order_id, lines).await
    }

    async fn release(&self, order_id: Uuid) -> Result<bool, InventoryError> {
        Ok(self.0.release(order_id).await?)
    }
}

#[derive(Clone)]
pub struct LocalPayments(pub Payments);

impl std::fmt::Debug for LocalPayments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalPayments")
    }
}

#[async_trait]
impl PaymentsPort for LocalPayments {
    async fn accepts(&self, method: PaymentMethod) -> Result<bool, PortError> {
        Ok(self.0.accepts(method))
    }

    async fn charge(
        &self,
        order_id: Uuid,
        amount_cents: i64,
        currency: &Currency,
        method: PaymentMethod,
        last_attempt: bool,
    ) -> Result<PaymentResult, PaymentsError> {
        self.0
            .charge(order_id, amount_cents, currency, method, last_attempt)
            .await
    }
}
