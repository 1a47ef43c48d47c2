//! The version rules on a made-up event, `parcel.shipped`, as three builds would
//! see it: the first (v1), a later one that added an optional field to v1
//! (additive, same version), and one after a breaking change (v2, which still
//! reads v1 through its up-conversion).

use scaleshop_contracts::{Contract, DecodeError, EventSet, decode_parts, event_set, upgrade};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

/// The first build: v1 as first published.
mod first {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct ParcelShipped {
        pub parcel_id: Uuid,
        pub weight_grams: i64,
    }

    impl Contract for ParcelShipped {
        const NAME: &'static str = "parcel.shipped";
        const VERSION: u32 = 1;
    }
}

/// A later build: v1 with a new optional field (an additive change).
mod additive {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct ParcelShipped {
        pub parcel_id: Uuid,
        pub weight_grams: i64,
        pub carrier: Option<String>,
    }

    impl Contract for ParcelShipped {
        const NAME: &'static str = "parcel.shipped";
        const VERSION: u32 = 1;
    }
}

/// After a breaking change: the weight became an amount with a unit.
mod second {
    use super::*;

    pub use super::additive::ParcelShipped as ParcelShippedV1;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Weight {
        pub amount: i64,
        pub unit: String,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct ParcelShipped {
        pub parcel_id: Uuid,
        pub weight: Weight,
        pub carrier: Option<String>,
    }

    impl From<ParcelShippedV1> for ParcelShipped {
        fn from(old: ParcelShippedV1) -> Self {
            Self {
                parcel_id: old.parcel_id,
                weight: Weight {
                    amount: old.weight_grams,
                    unit: "g".into(),
                },
                carrier: old.carrier,
            }
        }
    }

    impl Contract for ParcelShipped {
        const NAME: &'static str = "parcel.shipped";
        const VERSION: u32 = 2;

        fn from_older(version: u32, data: &serde_json::Value) -> Result<Self, DecodeError> {
            upgrade::<ParcelShippedV1, Self>(version, data)
        }
    }
}

#[test]
fn an_additive_change_is_read_by_older_and_newer_builds() {
    let parcel = Uuid::now_v7();
    let newer = additive::ParcelShipped {
        parcel_id: parcel,
        weight_grams: 1200,
        carrier: Some("post".into()),
    };
    // The first build ignores the field it does not know.
    let read: first::ParcelShipped =
        decode_parts("parcel.shipped", 1, &newer.encode().unwrap()).unwrap();
    assert_eq!(
        read,
        first::ParcelShipped {
            parcel_id: parcel,
            weight_grams: 1200
        }
    );
    // The later build reads what the first one wrote: the field is absent.
    let older = first::ParcelShipped {
        parcel_id: parcel,
        weight_grams: 800,
    };
    let read: additive::ParcelShipped =
        decode_parts("parcel.shipped", 1, &older.encode().unwrap()).unwrap();
    assert_eq!(read.carrier, None);
    assert_eq!(read.weight_grams, 800);
}

#[test]
fn a_v2_build_reads_v1_through_its_up_conversion() {
    let parcel = Uuid::now_v7();
    let v1 = json!({"parcel_id": parcel, "weight_grams": 1500, "carrier": "post"});
    let read: second::ParcelShipped = decode_parts("parcel.shipped", 1, &v1).unwrap();
    assert_eq!(
        read,
        second::ParcelShipped {
            parcel_id: parcel,
            weight: second::Weight {
                amount: 1500,
                unit: "g".into()
            },
            carrier: Some("post".into()),
        }
    );
    // And v2 as itself.
    let v2 = read.encode().unwrap();
    assert_eq!(v2["weight"], json!({"amount": 1500, "unit": "g"}));
    let again: second::ParcelShipped = decode_parts("parcel.shipped", 2, &v2).unwrap();
    assert_eq!(again, read);
}

#[test]
fn a_v1_build_refuses_v2_with_a_clear_error() {
    let v2 = second::ParcelShipped {
        parcel_id: Uuid::now_v7(),
        weight: second::Weight {
            amount: 2,
            unit: "kg".into(),
        },
        carrier: None,
    }
    .encode()
    .unwrap();
    let error = decode_parts::<first::ParcelShipped>("parcel.shipped", 2, &v2).unwrap_err();
    assert_eq!(
        error,
        DecodeError::TooNew {
            name: "parcel.shipped",
            version: 2,
            reads: 1
        }
    );
    assert_eq!(
        error.to_string(),
        "parcel.shipped v2 is newer than this consumer reads (up to v1): deploy a consumer \
         that reads v2, then redeliver the event"
    );
}

#[test]
fn wrong_name_version_or_shape_are_refused() {
    let data = json!({"parcel_id": Uuid::nil(), "weight_grams": 1});
    assert_eq!(
        decode_parts::<first::ParcelShipped>("parcel.lost", 1, &data).unwrap_err(),
        DecodeError::WrongName {
            expected: "parcel.shipped",
            found: "parcel.lost".into()
        }
    );
    for version in [0, -1, i64::from(u32::MAX) + 1] {
        assert_eq!(
            decode_parts::<first::ParcelShipped>("parcel.shipped", version, &data).unwrap_err(),
            DecodeError::BadVersion {
                name: "parcel.shipped",
                version
            }
        );
    }
    let error = decode_parts::<first::ParcelShipped>(
        "parcel.shipped",
        1,
        &json!({"parcel_id": "not a uuid", "weight_grams": 1}),
    )
    .unwrap_err();
    assert!(
        matches!(&error, DecodeError::Shape { name: "parcel.shipped", version: 1, message } if message.contains("UUID")),
        "{error:?}"
    );
    let error = decode_parts::<first::ParcelShipped>(
        "parcel.shipped",
        1,
        &json!({"parcel_id": Uuid::nil()}),
    )
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "bad parcel.shipped v1 payload: missing field `weight_grams`"
    );
}

/// A v2 that forgot its up-conversion.
mod unconverted {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct ParcelShipped {
        pub parcel_id: Uuid,
    }

    impl Contract for ParcelShipped {
        const NAME: &'static str = "parcel.shipped";
        const VERSION: u32 = 2;
    }
}

#[test]
fn an_older_version_without_a_conversion_is_refused() {
    let error = decode_parts::<unconverted::ParcelShipped>(
        "parcel.shipped",
        1,
        &json!({"parcel_id": Uuid::nil(), "weight_grams": 1}),
    )
    .unwrap_err();
    assert_eq!(
        error,
        DecodeError::NoUpgrade {
            name: "parcel.shipped",
            version: 1,
            reads: 2
        }
    );
}

event_set! {
    /// What a made-up consumer reacts to.
    #[derive(Debug, PartialEq)]
    enum Reactions {
        Shipped(second::ParcelShipped),
        Cancelled(scaleshop_contracts::OrderCancelled),
    }
}

#[test]
fn an_event_set_reads_its_events_and_passes_over_others() {
    assert_eq!(Reactions::NAMES, ["parcel.shipped", "order.cancelled"]);
    assert!(Reactions::wants("order.cancelled"));
    assert!(!Reactions::wants("order.created"));
    let (order, user) = (Uuid::now_v7(), Uuid::now_v7());
    let read = Reactions::decode_parts(
        "order.cancelled",
        1,
        &json!({"order_id": order, "user_id": user}),
    )
    .unwrap();
    assert_eq!(
        read,
        Some(Reactions::Cancelled(scaleshop_contracts::OrderCancelled {
            order_id: order,
            user_id: user,
            at: None,
        }))
    );
    let read = Reactions::decode_parts(
        "parcel.shipped",
        1,
        &json!({"parcel_id": order, "weight_grams": 3}),
    )
    .unwrap();
    assert!(matches!(read, Some(Reactions::Shipped(s)) if s.weight.amount == 3));
    assert_eq!(
        Reactions::decode_parts("order.created", 1, &json!({})).unwrap(),
        None
    );
    assert!(matches!(
        Reactions::decode_parts("parcel.shipped", 3, &json!({})),
        Err(DecodeError::TooNew {
            version: 3,
            reads: 2,
            ..
        })
    ));
}
