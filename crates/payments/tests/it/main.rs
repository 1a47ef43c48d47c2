//! The payment service's storage on both backends: what it writes as text reads
//! back as the same parsed values, and text that is not a value is refused as a
//! storage error (never a panic, never a guess).

use std::sync::Arc;

use scaleshop_db::sqlx;
use scaleshop_db::{Consistency, Database, StoreError, with_pool};
use scaleshop_payments::{
    Currency, LedgerStatus, PaymentMethod, PaymentResult, Payments, SandboxGateway, migrations,
};
use scaleshop_testkit::fixture;
use uuid::Uuid;

async fn payments(backend: scaleshop_testkit::Backend) -> (Database, Payments) {
    let db =
        scaleshop_testkit::fresh_database(backend, &[scaleshop_events::migrations(), migrations()])
            .await;
    let gateway = Arc::new(SandboxGateway::new(db.clone()));
    (db.clone(), Payments::new(db, gateway))
}

scaleshop_testkit::both!(
    charges_and_ledger_read_back_as_parsed_values,
    |backend| async move {
        let (_db, payments) = payments(backend).await;
        let eur: Currency = "EUR".parse().unwrap();
        let cases = [
            (
                PaymentMethod::CardVisa,
                PaymentResult::Succeeded,
                LedgerStatus::Succeeded,
            ),
            (
                PaymentMethod::CardMastercard,
                PaymentResult::Succeeded,
                LedgerStatus::Succeeded,
            ),
            (
                PaymentMethod::CardChargeDeclined,
                PaymentResult::Declined,
                LedgerStatus::Declined,
            ),
            // The last attempt turns a provider error into the final `error`.
            (
                PaymentMethod::CardProcessingError,
                PaymentResult::Error,
                LedgerStatus::Error,
            ),
        ];
        for (method, result, ledger_status) in cases {
            let order_id = Uuid::now_v7();
            let charged = payments
                .charge(order_id, 1250, &eur, method, true)
                .await
                .unwrap();
            assert_eq!(charged, result, "{method}");
            // Asked again: the recorded outcome, read back from its text.
            let again = payments
                .charge(order_id, 1250, &eur, method, true)
                .await
                .unwrap();
            assert_eq!(again, result, "{method}, second time");
            let ledger = payments
                .ledger(order_id, Consistency::Eventual)
                .await
                .unwrap();
            assert_eq!(ledger.len(), 1, "{method}: one attempt reached the gateway");
            assert_eq!(ledger[0].status, ledger_status);
            assert_eq!(ledger[0].currency, eur);
            assert_eq!(ledger[0].amount_cents, 1250);
            assert_eq!(ledger[0].idempotency_key, format!("order-{order_id}"));
        }
    }
);

scaleshop_testkit::both!(
    a_ledger_row_that_holds_no_currency_is_a_storage_error,
    |backend| async move {
        let (db, payments) = payments(backend).await;
        let order_id = Uuid::now_v7();
        const Q: &str = "INSERT INTO payment_ledger (id, order_id, amount_cents, currency, method, status, \
                         idempotency_key, created_at) VALUES ($1, $2, 100, 'eur', 'pm_card_visa', 'succeeded', \
                         $3, $4)";
        with_pool!(db, pool => {
            sqlx::query(Q)
                .bind(Uuid::now_v7())
                .bind(order_id)
                .bind(format!("order-{order_id}"))
                .bind(scaleshop_db::clock::now())
                .execute(pool)
                .await
                .unwrap();
        });
        match payments.ledger(order_id, Consistency::Eventual).await {
            Err(StoreError::Other(message)) => {
                assert!(message.contains("currency"), "{message}");
            }
            other => panic!("expected a storage error, got {other:?}"),
        }
    }
);
