//! The wire form of every contract is the JSON the services published before the
//! contracts existed: same names, same fields, same values (`null` included), so
//! events already in a log and consumers already deployed read them unchanged.
//! Each expected document is written out by hand, as the producers wrote it.

use chrono::{DateTime, TimeZone, Utc};
use scaleshop_contracts::*;
use serde_json::{Value, json};
use uuid::Uuid;

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn at() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 1, 10, 30, 0).unwrap() + chrono::Duration::microseconds(123_456)
}

/// Encodes, compares with the expected document (also as text: the stored bytes),
/// and decodes back to the same value.
fn pins<C: Contract + PartialEq + std::fmt::Debug>(name: &str, payload: &C, expected: Value) {
    assert_eq!(C::NAME, name);
    assert_eq!(C::VERSION, 1, "{name}: every published event is v1");
    let encoded = payload.encode().unwrap();
    assert_eq!(encoded, expected, "{name}");
    assert_eq!(
        serde_json::to_string(&encoded).unwrap(),
        serde_json::to_string(&expected).unwrap(),
        "{name}: same bytes"
    );
    let decoded: C = decode_parts(name, 1, &expected).unwrap();
    assert_eq!(&decoded, payload, "{name}: reads back");
}

#[test]
fn users_events_keep_their_wire_form() {
    pins(
        "user.created",
        &UserCreated {
            user_id: id(1),
            email: "ada@example.com".into(),
            name: "Ada".into(),
            role: "customer".into(),
        },
        json!({"user_id": id(1), "email": "ada@example.com", "name": "Ada", "role": "customer"}),
    );
    pins(
        "user.updated",
        &UserUpdated {
            user_id: id(1),
            email: "ada@example.com".into(),
            name: "Ada L.".into(),
            role: "admin".into(),
            changed: vec!["name".into(), "role".into()],
        },
        json!({"user_id": id(1), "email": "ada@example.com", "name": "Ada L.", "role": "admin",
               "changed": ["name", "role"]}),
    );
    pins(
        "session.ended",
        &SessionEnded {
            user_id: id(1),
            session_id: id(2),
        },
        json!({"user_id": id(1), "session_id": id(2)}),
    );
}

#[test]
fn catalog_events_keep_their_wire_form() {
    pins(
        "product.created",
        &ProductCreated {
            product_id: id(3),
            sku: "MUG-1".into(),
            name: "Mug".into(),
            price_cents: 1250,
            currency: "EUR".into(),
            initial_stock: 7,
            description: Some("Holds tea".into()),
            at: None,
        },
        json!({"product_id": id(3), "sku": "MUG-1", "name": "Mug", "price_cents": 1250,
               "currency": "EUR", "initial_stock": 7, "description": "Holds tea"}),
    );
    // An event from before the description was carried still reads.
    let older: ProductCreated = serde_json::from_value(json!({"product_id": id(3),
        "sku": "MUG-1", "name": "Mug", "price_cents": 1250, "currency": "EUR",
        "initial_stock": 7}))
    .unwrap();
    assert_eq!(older.description, None);
    assert_eq!(older.at, None);
    pins(
        "product.created",
        &ProductCreated {
            product_id: id(3),
            sku: "MUG-1".into(),
            name: "Mug".into(),
            price_cents: 1250,
            currency: "EUR".into(),
            initial_stock: 7,
            description: Some(String::new()),
            at: Some(at()),
        },
        json!({"product_id": id(3), "sku": "MUG-1", "name": "Mug", "price_cents": 1250,
               "currency": "EUR", "initial_stock": 7, "description": "",
               "at": "2026-12-01T10:30:00.123456Z"}),
    );
    pins(
        "product.updated",
        &ProductUpdated {
            product_id: id(3),
            sku: "MUG-1".into(),
            name: "Big mug".into(),
            price_cents: 1400,
            currency: "EUR".into(),
            initial_stock: 7,
            changed: vec!["name".into(), "price_cents".into()],
            description: None,
            at: None,
        },
        json!({"product_id": id(3), "sku": "MUG-1", "name": "Big mug", "price_cents": 1400,
               "currency": "EUR", "initial_stock": 7, "changed": ["name", "price_cents"]}),
    );
}

#[test]
fn inventory_events_keep_their_wire_form() {
    pins(
        "inventory.adjusted",
        &InventoryAdjusted {
            product_id: id(3),
            delta: -2,
            reason: "broken".into(),
            available: 5,
        },
        json!({"product_id": id(3), "delta": -2, "reason": "broken", "available": 5}),
    );
    let items = vec![
        StockLine {
            product_id: id(3),
            quantity: 2,
        },
        StockLine {
            product_id: id(4),
            quantity: 1,
        },
    ];
    let wire_items =
        json!([{"product_id": id(3), "quantity": 2}, {"product_id": id(4), "quantity": 1}]);
    pins(
        "inventory.reserved",
        &InventoryReserved {
            order_id: id(5),
            items: items.clone(),
        },
        json!({"order_id": id(5), "items": wire_items}),
    );
    pins(
        "inventory.released",
        &InventoryReleased {
            order_id: id(5),
            items: items.clone(),
        },
        json!({"order_id": id(5), "items": wire_items}),
    );
    pins(
        "inventory.sold",
        &InventorySold {
            order_id: id(5),
            items,
        },
        json!({"order_id": id(5), "items": wire_items}),
    );
}

#[test]
fn payments_events_keep_their_wire_form() {
    pins(
        "payment.succeeded",
        &PaymentSucceeded {
            order_id: id(5),
            amount_cents: 2500,
            currency: "EUR".into(),
            idempotency_key: format!("order-{}", id(5)),
            reason: None,
        },
        json!({"order_id": id(5), "amount_cents": 2500, "currency": "EUR",
               "idempotency_key": format!("order-{}", id(5)), "reason": null}),
    );
    pins(
        "payment.failed",
        &PaymentFailed {
            order_id: id(5),
            amount_cents: 2500,
            currency: "EUR".into(),
            idempotency_key: format!("order-{}", id(5)),
            reason: "payment_declined".into(),
        },
        json!({"order_id": id(5), "amount_cents": 2500, "currency": "EUR",
               "idempotency_key": format!("order-{}", id(5)), "reason": "payment_declined"}),
    );
}

#[test]
fn orders_events_keep_their_wire_form() {
    let items = vec![OrderItem {
        product_id: id(3),
        quantity: 2,
        unit_price_cents: 1250,
    }];
    let wire_items = json!([{"product_id": id(3), "quantity": 2, "unit_price_cents": 1250}]);
    let order = json!({"order_id": id(5), "user_id": id(1), "items": wire_items,
                       "total_cents": 2500, "currency": "EUR"});
    pins(
        "order.created",
        &OrderCreated {
            order_id: id(5),
            user_id: id(1),
            items: items.clone(),
            total_cents: 2500,
            currency: "EUR".into(),
            at: None,
        },
        order.clone(),
    );
    pins(
        "order.processed",
        &OrderProcessed {
            order_id: id(5),
            user_id: id(1),
            items: items.clone(),
            total_cents: 2500,
            currency: "EUR".into(),
            at: None,
        },
        order.clone(),
    );
    let mut failed = order;
    failed["reason"] = json!("out_of_stock");
    pins(
        "order.failed",
        &OrderFailed {
            order_id: id(5),
            user_id: id(1),
            items,
            total_cents: 2500,
            currency: "EUR".into(),
            reason: "out_of_stock".into(),
            at: None,
        },
        failed,
    );
    pins(
        "order.cancelled",
        &OrderCancelled {
            order_id: id(5),
            user_id: id(1),
            at: None,
        },
        json!({"order_id": id(5), "user_id": id(1)}),
    );
    // The time of the change, when carried, is RFC 3339.
    let at = "2026-12-07T05:26:12.535024Z".parse().unwrap();
    pins(
        "order.cancelled",
        &OrderCancelled {
            order_id: id(5),
            user_id: id(1),
            at: Some(at),
        },
        json!({"order_id": id(5), "user_id": id(1), "at": "2026-12-07T05:26:12.535024Z"}),
    );
}

#[test]
fn notification_and_image_events_keep_their_wire_form() {
    pins(
        "notification.sent",
        &NotificationSent {
            notification_id: id(6),
            user_id: id(1),
            kind: "welcome".into(),
            channel: "email".into(),
            order_id: None,
            sent_at: at(),
        },
        json!({"notification_id": id(6), "user_id": id(1), "kind": "welcome", "channel": "email",
               "order_id": null, "sent_at": at()}),
    );
    assert_eq!(
        NotificationSent {
            notification_id: id(6),
            user_id: id(1),
            kind: "welcome".into(),
            channel: "email".into(),
            order_id: None,
            sent_at: at(),
        }
        .encode()
        .unwrap()["sent_at"],
        "2026-12-01T10:30:00.123456Z"
    );
    pins(
        "image.added",
        &ImageAdded {
            image_id: id(7),
            product_id: id(3),
        },
        json!({"image_id": id(7), "product_id": id(3)}),
    );
    assert_eq!(
        scaleshop_contracts::media::variant_url(id(7), "thumb"),
        format!("/v1/images/{}/thumb", id(7))
    );
    pins(
        "image.processed",
        &ImageProcessed {
            image_id: id(7),
            product_id: id(3),
            status: "ready".into(),
            variants: vec![ImageVariant {
                name: "thumb".into(),
                width: 128,
                height: 96,
                content_type: "image/webp".into(),
            }],
            error: None,
        },
        json!({"image_id": id(7), "product_id": id(3), "status": "ready",
               "variants": [{"name": "thumb", "width": 128, "height": 96, "content_type": "image/webp"}],
               "error": null}),
    );
    pins(
        "image.processed",
        &ImageProcessed {
            image_id: id(7),
            product_id: id(3),
            status: "failed".into(),
            variants: vec![],
            error: Some("not an image".into()),
        },
        json!({"image_id": id(7), "product_id": id(3), "status": "failed", "variants": [],
               "error": "not an image"}),
    );
}
