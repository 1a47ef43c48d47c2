//! Catalog domain types: each holds only valid values.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A price's currency: the payment service's type (one definition of a currency
/// in the whole system).
pub use scaleshop_payments::domain::Currency;

/// Why a value was refused; safe to show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub &'static str);

/// 1..=64 characters of `A-Z a-z 0-9 - _`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sku(String);

impl Sku {
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        if raw.is_empty() || raw.len() > 64 {
            return Err(Invalid("must be 1 to 64 characters"));
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Invalid("may only hold A-Z, a-z, 0-9, - and _"));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A product name: 1..=200 characters after trimming, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductName(String);

impl ProductName {
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        let name = raw.trim();
        match name.chars().count() {
            0 => Err(Invalid("must not be empty")),
            n if n > 200 => Err(Invalid("must be at most 200 characters")),
            _ if name.chars().any(char::is_control) => {
                Err(Invalid("must not contain control characters"))
            }
            _ => Ok(Self(name.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A description: at most 5000 characters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Description(String);

impl Description {
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        if raw.chars().count() > 5000 {
            return Err(Invalid("must be at most 5000 characters"));
        }
        Ok(Self(raw.trim().to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A price in minor units: 0..=100000000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PriceCents(i64);

impl PriceCents {
    pub fn parse(raw: i64) -> Result<Self, Invalid> {
        if (0..=100_000_000).contains(&raw) {
            Ok(Self(raw))
        } else {
            Err(Invalid("must be from 0 to 100000000"))
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

/// Stock a product starts with: 0..=1000000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitialStock(i64);

impl InitialStock {
    pub fn parse(raw: i64) -> Result<Self, Invalid> {
        if (0..=1_000_000).contains(&raw) {
            Ok(Self(raw))
        } else {
            Err(Invalid("must be from 0 to 1000000"))
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    pub id: Uuid,
    pub sku: Sku,
    pub name: ProductName,
    pub description: Description,
    pub price_cents: PriceCents,
    pub currency: Currency,
    pub initial_stock: InitialStock,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct NewProduct {
    pub sku: Sku,
    pub name: ProductName,
    pub description: Description,
    pub price_cents: PriceCents,
    pub currency: Currency,
    pub initial_stock: InitialStock,
}

#[derive(Debug, Clone, Default)]
pub struct ProductPatch {
    pub name: Option<ProductName>,
    pub description: Option<Description>,
    pub price_cents: Option<PriceCents>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        assert!(Sku::parse("ABC-12_x").is_ok());
        for bad in ["", "a b", "é", &"x".repeat(65)] {
            assert!(Sku::parse(bad).is_err(), "{bad}");
        }
        assert!(PriceCents::parse(0).is_ok() && PriceCents::parse(100_000_000).is_ok());
        assert!(PriceCents::parse(-1).is_err() && PriceCents::parse(100_000_001).is_err());
        assert!(InitialStock::parse(1_000_000).is_ok() && InitialStock::parse(1_000_001).is_err());
        assert!("EUR".parse::<Currency>().is_ok());
        for bad in ["eur", "EURO", "E1R", ""] {
            assert!(bad.parse::<Currency>().is_err(), "{bad}");
        }
        assert!(ProductName::parse("  ").is_err());
    }
}
