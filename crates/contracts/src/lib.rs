//! The contracts of the events: for each event a payload type that says its name,
//! its version and the shape of its data. Producers build their events from these
//! types and consumers read events into them, so a renamed event or a changed field
//! fails to compile on both sides, and the wire (the `type`, `version` and `data` of
//! the envelope) has one definition.
//!
//! This crate knows no service, no storage and no transport: it depends only on
//! serde, serde_json, uuid and chrono. The event log (`scaleshop-events`) turns a
//! contract into an envelope ([`Contract::encode`]) and an envelope back into a
//! contract ([`Contract::decode`], [`EventSet::decode`]).
//!
//! # Versions
//!
//! Every envelope carries the version of its payload (`version`, 1 for every event
//! published so far). The rules:
//!
//! 1. **Additive changes keep the version.** A new field is an `Option` (or has
//!    `#[serde(default)]`), so a consumer built later reads an event written
//!    earlier (the field is absent: `None`). No payload type refuses unknown
//!    fields, so a consumer built earlier reads an event written later (the new
//!    field is ignored). A field is never removed, renamed or retyped in place.
//! 2. **A breaking change makes a new version**: a new type with the same `NAME`
//!    and `VERSION + 1` (the old type stays, renamed `...V1`), which implements
//!    [`Contract::from_older`] with [`upgrade`] and a `From<old>` conversion.
//!    A consumer built with the new type reads every older version through that
//!    up-conversion chain.
//! 3. **A version newer than a consumer knows is never guessed at.** Decoding it
//!    fails with [`DecodeError::TooNew`], which is permanent
//!    ([`DecodeError`] is never worth a retry): the event log parks the event as
//!    dead for that consumer at once, with the error as its reason, and delivery
//!    goes on. Once a consumer that knows the version is deployed, an admin
//!    redelivers the dead event (`POST /v1/events/dead/{consumer}/{id}/redeliver`).
//!    So a producer may publish version N+1 only after every consumer of the event
//!    reads it, or accept that older consumers park those events until upgraded.
//!
//! The crate's tests pin the wire form of every contract and exercise each rule;
//! the event log's tests run a version change through a real log on both SQL
//! backends (a v2 producer with a v1-era consumer, and the reverse).

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub mod catalog;
pub mod inventory;
pub mod media;
pub mod notifications;
pub mod orders;
pub mod payments;
pub mod users;

pub use catalog::{ProductCreated, ProductUpdated};
pub use inventory::{
    InventoryAdjusted, InventoryReleased, InventoryReserved, InventorySold, StockLine,
};
pub use media::{ImageAdded, ImageProcessed, ImageVariant};
pub use notifications::NotificationSent;
pub use orders::{OrderCancelled, OrderCreated, OrderFailed, OrderItem, OrderProcessed};
pub use payments::{PaymentFailed, PaymentSucceeded};
pub use users::{SessionEnded, UserCreated, UserUpdated};

/// The payload of one version of one event.
pub trait Contract: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The event's type on the wire, e.g. `order.created`. Never changes.
    const NAME: &'static str;
    /// The version of the payload this type describes (1, 2, ...).
    const VERSION: u32;

    /// Reads the payload of an older version (`1 <= version < VERSION`) of this
    /// event. The first version has none: the default refuses. A later version
    /// implements it with [`upgrade`].
    fn from_older(version: u32, data: &Value) -> Result<Self, DecodeError> {
        let _ = data;
        Err(DecodeError::NoUpgrade {
            name: Self::NAME,
            version,
            reads: Self::VERSION,
        })
    }

    /// The payload as the JSON the envelope carries.
    fn encode(&self) -> Result<Value, EncodeError> {
        serde_json::to_value(self).map_err(|e| EncodeError {
            name: Self::NAME,
            message: e.to_string(),
        })
    }

    /// Reads an envelope as this contract: its type must be [`Self::NAME`]; its
    /// version this one, or an older one this type up-converts.
    fn decode<E: Envelope + ?Sized>(envelope: &E) -> Result<Self, DecodeError> {
        decode_parts(envelope.name(), envelope.version(), envelope.data())
    }
}

/// What a consumer sees of an envelope (the event log's `Event` implements it).
pub trait Envelope {
    /// The event's type (`order.created`).
    fn name(&self) -> &str;
    /// The version of its payload.
    fn version(&self) -> i64;
    /// Its payload.
    fn data(&self) -> &Value;
}

/// Reads (`name`, `version`, `data`) as the contract `C`.
pub fn decode_parts<C: Contract>(name: &str, version: i64, data: &Value) -> Result<C, DecodeError> {
    if name != C::NAME {
        return Err(DecodeError::WrongName {
            expected: C::NAME,
            found: name.to_owned(),
        });
    }
    let version =
        u32::try_from(version)
            .ok()
            .filter(|v| *v >= 1)
            .ok_or(DecodeError::BadVersion {
                name: C::NAME,
                version,
            })?;
    body::<C>(version, data)
}

/// Reads `data` written as `version` of `C`'s event (whose name was checked).
fn body<C: Contract>(version: u32, data: &Value) -> Result<C, DecodeError> {
    use std::cmp::Ordering;
    match version.cmp(&C::VERSION) {
        Ordering::Equal => C::deserialize(data).map_err(|e| DecodeError::Shape {
            name: C::NAME,
            version,
            message: e.to_string(),
        }),
        Ordering::Less => C::from_older(version, data),
        Ordering::Greater => Err(DecodeError::TooNew {
            name: C::NAME,
            version,
            reads: C::VERSION,
        }),
    }
}

/// The up-conversion of a new version's [`Contract::from_older`]: reads `data`
/// as `Old` (itself up-converting anything older) and converts it.
///
/// ```
/// # use scaleshop_contracts::{Contract, DecodeError, upgrade};
/// # use serde::{Deserialize, Serialize};
/// #[derive(Serialize, Deserialize)]
/// struct PingV1 { at: String }
/// impl Contract for PingV1 { const NAME: &'static str = "ping"; const VERSION: u32 = 1; }
///
/// #[derive(Serialize, Deserialize)]
/// struct Ping { at_ms: i64, source: String }
/// impl From<PingV1> for Ping {
///     fn from(old: PingV1) -> Self { Ping { at_ms: 0, source: old.at } }
/// }
/// impl Contract for Ping {
///     const NAME: &'static str = "ping";
///     const VERSION: u32 = 2;
///     fn from_older(version: u32, data: &serde_json::Value) -> Result<Self, DecodeError> {
///         upgrade::<PingV1, Self>(version, data)
///     }
/// }
/// ```
pub fn upgrade<Old, New>(version: u32, data: &Value) -> Result<New, DecodeError>
where
    Old: Contract,
    New: Contract + From<Old>,
{
    debug_assert_eq!(Old::NAME, New::NAME, "a version keeps the event's name");
    body::<Old>(version, data).map(New::from)
}

/// A set of contracts a consumer reacts to, read as one enum. Declare it with
/// [`event_set!`].
pub trait EventSet: Sized {
    /// The names of the events in the set.
    const NAMES: &'static [&'static str];

    /// Is an event of this type in the set? (The dispatcher's `wants`.)
    fn wants(name: &str) -> bool {
        Self::NAMES.contains(&name)
    }

    /// Reads (`name`, `version`, `data`): `Ok(None)` for an event outside the set.
    fn decode_parts(name: &str, version: i64, data: &Value) -> Result<Option<Self>, DecodeError>;

    /// Reads an envelope: `Ok(None)` for an event outside the set.
    fn decode<E: Envelope + ?Sized>(envelope: &E) -> Result<Option<Self>, DecodeError> {
        Self::decode_parts(envelope.name(), envelope.version(), envelope.data())
    }
}

#[doc(hidden)]
pub mod __private {
    pub use serde_json::Value;
}

/// Declares an enum of contracts and its [`EventSet`] implementation:
///
/// ```
/// scaleshop_contracts::event_set! {
///     /// What the inventory reacts to.
///     #[derive(Debug)]
///     pub enum Reactions {
///         ProductCreated(scaleshop_contracts::ProductCreated),
///         OrderCancelled(scaleshop_contracts::OrderCancelled),
///     }
/// }
/// use scaleshop_contracts::EventSet;
/// assert!(Reactions::wants("order.cancelled"));
/// assert!(!Reactions::wants("order.created"));
/// ```
#[macro_export]
macro_rules! event_set {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $($variant:ident($ty:ty)),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $($variant($ty)),+
        }

        impl $crate::EventSet for $name {
            const NAMES: &'static [&'static str] = &[$(<$ty as $crate::Contract>::NAME),+];

            fn decode_parts(
                name: &str,
                version: i64,
                data: &$crate::__private::Value,
            ) -> ::std::result::Result<::std::option::Option<Self>, $crate::DecodeError> {
                $(
                    if name == <$ty as $crate::Contract>::NAME {
                        return $crate::decode_parts::<$ty>(name, version, data)
                            .map(|payload| ::std::option::Option::Some(Self::$variant(payload)));
                    }
                )+
                ::std::result::Result::Ok(::std::option::Option::None)
            }
        }
    };
}

/// Declares a payload type's [`Contract`] (name and version; no older version).
macro_rules! contract {
    ($ty:ty, $name:literal, $version:literal) => {
        impl $crate::Contract for $ty {
            const NAME: &'static str = $name;
            const VERSION: u32 = $version;
        }
    };
}
pub(crate) use contract;

/// Why an envelope cannot be read as a contract. Every variant is permanent for
/// the build that met it: the same bytes give the same error on every retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The envelope is another event.
    WrongName {
        expected: &'static str,
        found: String,
    },
    /// The version is not a positive number.
    BadVersion { name: &'static str, version: i64 },
    /// The event was written by a newer contract than this build reads.
    TooNew {
        name: &'static str,
        version: u32,
        reads: u32,
    },
    /// An older version that this build does not up-convert.
    NoUpgrade {
        name: &'static str,
        version: u32,
        reads: u32,
    },
    /// The payload does not have the shape of its version.
    Shape {
        name: &'static str,
        version: u32,
        message: String,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WrongName { expected, found } => {
                write!(f, "expected a {expected} event, got {found}")
            }
            Self::BadVersion { name, version } => {
                write!(f, "{name} event with an invalid version {version}")
            }
            Self::TooNew {
                name,
                version,
                reads,
            } => write!(
                f,
                "{name} v{version} is newer than this consumer reads (up to v{reads}): \
                 deploy a consumer that reads v{version}, then redeliver the event"
            ),
            Self::NoUpgrade {
                name,
                version,
                reads,
            } => write!(
                f,
                "{name} v{version} cannot be read: this consumer reads v{reads} and has no \
                 conversion from v{version}"
            ),
            Self::Shape {
                name,
                version,
                message,
            } => write!(f, "bad {name} v{version} payload: {message}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// A payload that cannot be written as JSON (a serializer refused a value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeError {
    pub name: &'static str,
    pub message: String,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} payload cannot be encoded: {}",
            self.name, self.message
        )
    }
}

impl std::error::Error for EncodeError {}
