//! Product storage (one SQL text for both backends).

use chrono::{DateTime, Utc};
use scaleshop_db::sqlx::{self, FromRow};
use scaleshop_db::{
    Consistency, Database, Migrations, StoreError, read_with, read_with_as_of, with_pool, with_tx,
};
use scaleshop_events::NewEvent;
use uuid::Uuid;

use crate::domain::{Currency, Description, InitialStock, PriceCents, Product, ProductName, Sku};

pub fn migrations() -> Migrations {
    static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
    static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
    Migrations {
        owner: "catalog",
        sqlite: &SQLITE,
        postgres: &POSTGRES,
    }
}

/// A `products` row (also the product columns of `product_listing`).
#[derive(Debug, FromRow)]
pub(crate) struct ProductRow {
    id: Uuid,
    sku: String,
    name: String,
    description: String,
    price_cents: i64,
    currency: String,
    initial_stock: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<ProductRow> for Product {
    type Error = StoreError;

    fn try_from(row: ProductRow) -> Result<Self, StoreError> {
        let corrupt =
            |what: &str| StoreError::Other(format!("products row {}: bad {what}", row.id));
        Ok(Self {
            id: row.id,
            sku: Sku::parse(&row.sku).map_err(|_| corrupt("sku"))?,
            name: ProductName::parse(&row.name).map_err(|_| corrupt("name"))?,
            description: Description::parse(&row.description)
                .map_err(|_| corrupt("description"))?,
            price_cents: PriceCents::parse(row.price_cents).map_err(|_| corrupt("price"))?,
            currency: row
                .currency
                .parse::<Currency>()
                .map_err(|_| corrupt("currency"))?,
            initial_stock: InitialStock::parse(row.initial_stock)
                .map_err(|_| corrupt("initial stock"))?,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

const INSERT: &str = "INSERT INTO products (id, sku, name, description, price_cents, currency, initial_stock, \
                      created_at, updated_at, search_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";
const UPDATE: &str = "UPDATE products SET name = $3, description = $4, price_cents = $5, updated_at = $9, \
                      search_key = $10 \
                      WHERE id = $1 AND sku = $2 AND currency = $6 AND initial_stock = $7 AND created_at = $8";
const GET: &str = "SELECT id, sku, name, description, price_cents, currency, initial_stock, created_at, updated_at \
                   FROM products WHERE id = $1";
const SEARCH: &str = "SELECT id, sku, name, description, price_cents, currency, initial_stock, created_at, updated_at \
                      FROM products WHERE ($1 IS NULL OR search_key LIKE $1 ESCAPE '\\') AND ($2 IS NULL OR id > $2) \
                      ORDER BY id LIMIT $3";

/// What searches match: name, sku and description, lower-cased in Rust (Unicode on
/// both backends).
fn search_key(p: &Product) -> String {
    format!(
        "{}\u{1f}{}\u{1f}{}",
        p.name.as_str().to_lowercase(),
        p.sku.as_str().to_lowercase(),
        p.description.as_str().to_lowercase()
    )
}

#[derive(Debug, Clone)]
pub struct ProductStore {
    db: Database,
}

impl ProductStore {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    async fn write(
        &self,
        sql: &'static str,
        p: &Product,
        event: &NewEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.begin().await?;
        let done = with_tx!(&mut tx, conn => {
            sqlx::query(sql)
                .bind(p.id)
                .bind(p.sku.as_str())
                .bind(p.name.as_str())
                .bind(p.description.as_str())
                .bind(p.price_cents.get())
                .bind(p.currency.as_str())
                .bind(p.initial_stock.get())
                .bind(p.created_at)
                .bind(p.updated_at)
                .bind(search_key(p))
                .execute(conn)
                .await?
                .rows_affected()
        });
        if done != 1 {
            return Err(StoreError::Other(format!("product {} not written", p.id)));
        }
        scaleshop_events::append(&mut tx, event).await?;
        tx.commit().await
    }

    pub async fn insert(&self, product: &Product, event: &NewEvent) -> Result<(), StoreError> {
        self.write(INSERT, product, event).await
    }

    pub async fn update(&self, product: &Product, event: &NewEvent) -> Result<(), StoreError> {
        self.write(UPDATE, product, event).await
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<Product>, StoreError> {
        let row: Option<ProductRow> =
            with_pool!(self.db, pool => sqlx::query_as(GET).bind(id).fetch_optional(pool).await?);
        row.map(Product::try_from).transpose()
    }

    /// A read that may be served by a replica; also how fresh it is (µs).
    pub async fn read(
        &self,
        id: Uuid,
        consistency: Consistency,
    ) -> Result<(Option<Product>, i64), StoreError> {
        let (row, as_of): (Option<ProductRow>, i64) = read_with_as_of!(self.db, consistency, pool => {
            sqlx::query_as(GET).bind(id).fetch_optional(pool).await?
        })?;
        Ok((row.map(Product::try_from).transpose()?, as_of))
    }

    /// Products by id (those that exist), in one read that may be served by a
    /// replica (within `consistency`).
    pub async fn read_many(
        &self,
        ids: &[Uuid],
        consistency: Consistency,
    ) -> Result<Vec<Product>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // Only numbered placeholders are put into the text; the ids are bound.
        let q = format!(
            "SELECT id, sku, name, description, price_cents, currency, initial_stock, created_at, \
             updated_at FROM products WHERE id IN ({})",
            scaleshop_db::placeholders(1, ids.len())
        );
        let rows: Vec<ProductRow> = read_with!(self.db, consistency, pool => {
            let mut query = sqlx::query_as(sqlx::AssertSqlSafe(q.clone()));
            for id in ids {
                query = query.bind(*id);
            }
            query.fetch_all(pool).await?
        })?;
        rows.into_iter().map(Product::try_from).collect()
    }

    /// May be served by a replica.
    pub async fn search(
        &self,
        text: Option<&str>,
        after: Option<Uuid>,
        limit: i64,
        consistency: Consistency,
    ) -> Result<Vec<Product>, StoreError> {
        let pattern = text.map(scaleshop_db::like_contains);
        let rows: Vec<ProductRow> = read_with!(self.db, consistency, pool => {
            sqlx::query_as(SEARCH).bind(&pattern).bind(after).bind(limit).fetch_all(pool).await?
        })?;
        rows.into_iter().map(Product::try_from).collect()
    }
}
