//! The product listing projection, the read side of the catalog (CQRS): one row
//! per product in `product_listing`, with its `available` stock and its images,
//! built only from events by the `product-listing` consumer (in the delivery's
//! transaction, so each event is applied once):
//!
//! - `product.created` / `product.updated`: the product's fields;
//! - `inventory.adjusted`: the `available` it carries; `inventory.reserved` and
//!   `inventory.released`: `available` moved by each line (a sale only settles a
//!   reservation and leaves `available` as it is);
//! - `image.added` / `image.processed`: the product's images as
//!   `GET /v1/images/{id}` shows them, in id order.
//!
//! `GET /v1/products` without search parameters pages through it, and a page of
//! search results is read from it: one read where the command side needs three
//! (products, stock, images). A read first waits (at most `projection_wait`)
//! until the consumer has handled the log up to the head as it is at the read;
//! while it cannot answer (behind, stuck on an event), the command side does. A
//! rebuild fills `product_listing_next` while this table serves, then swaps
//! (see `scaleshop_events::projection`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use scaleshop_contracts::inventory::StockLine;
use scaleshop_contracts::media::variant_url;
use scaleshop_contracts::{
    ImageAdded, ImageProcessed, InventoryAdjusted, InventoryReleased, InventoryReserved,
    ProductCreated, ProductUpdated,
};
use scaleshop_db::sqlx::{self, FromRow, types::Json};
use scaleshop_db::{Consistency, Database, StoreError, Tx, read_with, with_pool, with_tx};
use scaleshop_events::projection::{Table, on_table};
use scaleshop_events::{Consumer, Event, EventSet, HandlerError, Projection};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Listed;
use crate::domain::Product;
use crate::store::ProductRow;

/// The consumer's name: its position, and the `projection` label of
/// `projection_lag`.
pub const CONSUMER: &str = "product-listing";

/// The consumer of a rebuild's new copy.
pub const REBUILD_CONSUMER: &str = "product-listing.rebuild";

/// The projection's table, as `0002_product_listing.sql` makes it: a migration that changes
/// the table changes this too (the rebuild test compares the two).
pub static TABLE: Table = Table {
    name: "product_listing",
    shadow: "product_listing_next",
    sqlite: "CREATE TABLE {table} (id BLOB PRIMARY KEY, sku TEXT NOT NULL, name TEXT NOT NULL, \
             description TEXT NOT NULL, price_cents INTEGER NOT NULL, currency TEXT NOT NULL, \
             initial_stock INTEGER NOT NULL, available INTEGER NOT NULL, images TEXT NOT NULL, \
             created_at TEXT NOT NULL, updated_at TEXT NOT NULL)",
    postgres: "CREATE TABLE {table} (id UUID PRIMARY KEY, sku TEXT NOT NULL, name TEXT NOT NULL, \
               description TEXT NOT NULL, price_cents BIGINT NOT NULL, currency TEXT NOT NULL, \
               initial_stock BIGINT NOT NULL, available BIGINT NOT NULL, images JSONB NOT NULL, \
               created_at TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ NOT NULL)",
    indexes: &[],
};

/// An image as `GET /v1/images/{id}` shows it (the shape of the media service's
/// `ImageView`, built here from its events).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ImageEntry {
    id: Uuid,
    product_id: Uuid,
    status: String,
    variants: Vec<VariantEntry>,
    error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct VariantEntry {
    name: String,
    width: u32,
    height: u32,
    content_type: String,
    url: String,
}

#[derive(Debug, FromRow)]
struct Row {
    #[sqlx(flatten)]
    product: ProductRow,
    available: i64,
    images: Json<Vec<ImageEntry>>,
}

impl TryFrom<Row> for Listed {
    type Error = StoreError;

    fn try_from(row: Row) -> Result<Self, StoreError> {
        let images = row
            .images
            .0
            .into_iter()
            .map(|image| serde_json::to_value(image).map_err(|e| StoreError::Other(e.to_string())))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            product: Product::try_from(row.product)?,
            available: row.available,
            images,
        })
    }
}

const SELECT: &str = "SELECT id, sku, name, description, price_cents, currency, initial_stock, \
                      created_at, updated_at, available, images FROM product_listing";

/// Reads of the projection.
#[derive(Debug, Clone)]
pub struct ProductListing {
    db: Database,
    wait: Duration,
}

impl ProductListing {
    pub fn new(db: Database, wait: Duration) -> Self {
        Self { db, wait }
    }

    /// May the projection answer a read? Not while it is being rebuilt;
    /// otherwise once it has handled the log up to its head as it is now (every
    /// write committed before the read), waiting at most `projection_wait`.
    pub async fn usable(&self) -> Result<bool, StoreError> {
        scaleshop_events::projection::serving(&self.db, CONSUMER, self.wait).await
    }

    /// Every product in the order they were made (ids are time-ordered), after
    /// `after`.
    pub async fn page(
        &self,
        after: Option<Uuid>,
        limit: i64,
        consistency: Consistency,
    ) -> Result<Vec<Listed>, StoreError> {
        const Q: &str = "SELECT id, sku, name, description, price_cents, currency, initial_stock, \
                         created_at, updated_at, available, images FROM product_listing \
                         WHERE ($1 IS NULL OR id > $1) ORDER BY id LIMIT $2";
        debug_assert!(Q.starts_with(SELECT));
        let rows: Vec<Row> = read_with!(self.db, consistency, pool => {
            sqlx::query_as(Q).bind(after).bind(limit).fetch_all(pool).await?
        })?;
        rows.into_iter().map(Listed::try_from).collect()
    }

    /// The products of `ids` the view holds, in one read.
    pub async fn read_many(
        &self,
        ids: &[Uuid],
        consistency: Consistency,
    ) -> Result<Vec<Listed>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // Only numbered placeholders are put into the text; the ids are bound.
        let q = format!(
            "{SELECT} WHERE id IN ({})",
            scaleshop_db::placeholders(1, ids.len())
        );
        let rows: Vec<Row> = read_with!(self.db, consistency, pool => {
            let mut query = sqlx::query_as(sqlx::AssertSqlSafe(q.clone()));
            for id in ids {
                query = query.bind(*id);
            }
            query.fetch_all(pool).await?
        })?;
        rows.into_iter().map(Listed::try_from).collect()
    }
}

scaleshop_contracts::event_set! {
    /// The events the projection follows.
    #[derive(Debug)]
    enum Changes {
        Created(ProductCreated),
        Updated(ProductUpdated),
        Adjusted(InventoryAdjusted),
        Reserved(InventoryReserved),
        Released(InventoryReleased),
        ImageAdded(ImageAdded),
        ImageProcessed(ImageProcessed),
    }
}

/// Builds `product_listing` from events (the default instance; its
/// [`Projection::shadow`] builds a rebuild's `product_listing_next`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProductListingProjection {
    shadow: bool,
}

impl ProductListingProjection {
    /// The table this instance writes.
    fn table(&self) -> &'static str {
        TABLE.named(self.shadow)
    }
}

async fn move_stock(
    tx: &mut Tx,
    table: &'static str,
    lines: &[StockLine],
    sign: i64,
) -> Result<(), HandlerError> {
    const Q: &str = "UPDATE {table} SET available = available + $2 WHERE id = $1";
    for line in lines {
        with_tx!(tx, conn => {
            sqlx::query(on_table(Q, table))
                .bind(line.product_id)
                .bind(sign * line.quantity)
                .execute(conn)
                .await
                .map_err(StoreError::from)?;
        });
    }
    Ok(())
}

/// Puts `image` in place of the product's entry with its id (or adds it), unless
/// `only_new` and there is one already (an `image.added` after its
/// `image.processed` cannot happen in the log, but a replay must not undo a
/// settled image either way).
async fn put_image(
    tx: &mut Tx,
    table: &'static str,
    image: ImageEntry,
    only_new: bool,
) -> Result<(), HandlerError> {
    const READ: &str = "SELECT images FROM {table} WHERE id = $1";
    const WRITE: &str = "UPDATE {table} SET images = $2 WHERE id = $1";
    let product = image.product_id;
    let images: Option<Json<Vec<ImageEntry>>> = with_tx!(tx, conn => {
        sqlx::query_scalar(on_table(READ, table)).bind(product).fetch_optional(conn).await.map_err(StoreError::from)?
    });
    // Its `product.created` comes first in the log; an image of a product this
    // view does not hold is not one it can show.
    let Some(Json(mut images)) = images else {
        return Ok(());
    };
    match images.iter_mut().find(|i| i.id == image.id) {
        Some(_) if only_new => return Ok(()),
        Some(known) => *known = image,
        None => {
            images.push(image);
            images.sort_by_key(|i| i.id);
        }
    }
    with_tx!(tx, conn => {
        sqlx::query(on_table(WRITE, table)).bind(product).bind(Json(&images)).execute(conn).await.map_err(StoreError::from)?;
    });
    Ok(())
}

#[async_trait]
impl Consumer for ProductListingProjection {
    fn name(&self) -> &'static str {
        if self.shadow {
            REBUILD_CONSUMER
        } else {
            CONSUMER
        }
    }

    fn wants(&self, event_type: &str) -> bool {
        Changes::wants(event_type)
    }

    fn is_projection(&self) -> bool {
        true
    }

    async fn handle(&self, event: &Event, tx: &mut Tx) -> Result<(), HandlerError> {
        let Some(change) = Changes::decode(event)? else {
            return Ok(());
        };
        let table = self.table();
        match change {
            Changes::Created(e) => {
                const Q: &str = "INSERT INTO {table} (id, sku, name, description, \
                                 price_cents, currency, initial_stock, available, images, \
                                 created_at, updated_at) \
                                 VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8, $9, $9) \
                                 ON CONFLICT (id) DO NOTHING";
                let at: DateTime<Utc> = e.at.unwrap_or(event.occurred_at);
                with_tx!(tx, conn => {
                    sqlx::query(on_table(Q, table))
                        .bind(e.product_id)
                        .bind(&e.sku)
                        .bind(&e.name)
                        .bind(e.description.as_deref().unwrap_or(""))
                        .bind(e.price_cents)
                        .bind(&e.currency)
                        .bind(e.initial_stock)
                        .bind(Json(Vec::<ImageEntry>::new()))
                        .bind(at)
                        .execute(conn)
                        .await
                        .map_err(StoreError::from)?;
                });
            }
            Changes::Updated(e) => {
                // An older event without the description leaves it as it was.
                const Q: &str = "UPDATE {table} SET name = $2, \
                                 description = COALESCE($3, description), price_cents = $4, \
                                 updated_at = $5 WHERE id = $1";
                with_tx!(tx, conn => {
                    sqlx::query(on_table(Q, table))
                        .bind(e.product_id)
                        .bind(&e.name)
                        .bind(e.description.as_deref())
                        .bind(e.price_cents)
                        .bind(e.at.unwrap_or(event.occurred_at))
                        .execute(conn)
                        .await
                        .map_err(StoreError::from)?;
                });
            }
            Changes::Adjusted(e) => {
                const Q: &str = "UPDATE {table} SET available = $2 WHERE id = $1";
                with_tx!(tx, conn => {
                    sqlx::query(on_table(Q, table))
                        .bind(e.product_id)
                        .bind(e.available)
                        .execute(conn)
                        .await
                        .map_err(StoreError::from)?;
                });
            }
            Changes::Reserved(e) => move_stock(tx, table, &e.items, -1).await?,
            Changes::Released(e) => move_stock(tx, table, &e.items, 1).await?,
            Changes::ImageAdded(e) => {
                let image = ImageEntry {
                    id: e.image_id,
                    product_id: e.product_id,
                    status: "processing".to_owned(),
                    variants: Vec::new(),
                    error: None,
                };
                put_image(tx, table, image, true).await?;
            }
            Changes::ImageProcessed(e) => {
                // Variants are shown once the image is ready.
                let variants = if e.status == "ready" {
                    e.variants
                        .into_iter()
                        .map(|v| VariantEntry {
                            url: variant_url(e.image_id, &v.name),
                            name: v.name,
                            width: v.width,
                            height: v.height,
                            content_type: v.content_type,
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                let image = ImageEntry {
                    id: e.image_id,
                    product_id: e.product_id,
                    status: e.status,
                    variants,
                    error: e.error,
                };
                put_image(tx, table, image, false).await?;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Projection for ProductListingProjection {
    fn tables(&self) -> &'static [Table] {
        std::slice::from_ref(&TABLE)
    }

    fn shadow(&self) -> Arc<dyn Projection> {
        Arc::new(Self { shadow: true })
    }

    async fn digest(&self, db: &Database) -> Result<(u64, String), StoreError> {
        const Q: &str = "SELECT id, sku, name, description, price_cents, currency, initial_stock, \
                         created_at, updated_at, available, images FROM {table} ORDER BY id";
        debug_assert!(Q.starts_with(&SELECT.replace("product_listing", "{table}")));
        let rows: Vec<Row> = with_pool!(db, pool => {
            sqlx::query_as(on_table(Q, self.table())).fetch_all(pool).await?
        });
        let mut digest = scaleshop_events::projection::Digest::default();
        for row in rows {
            digest.row(&Listed::try_from(row)?);
        }
        Ok(digest.finish())
    }
}
