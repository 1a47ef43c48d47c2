//! Image records (one SQL text for both backends).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use scaleshop_db::sqlx::{self, FromRow};
use scaleshop_db::{Database, Migrations, StoreError, Tx, with_pool, with_tx};
use uuid::Uuid;

use crate::domain::{Image, ImageStatus, Variant};

pub fn migrations() -> Migrations {
    static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
    static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
    Migrations {
        owner: "media",
        sqlite: &SQLITE,
        postgres: &POSTGRES,
    }
}

#[derive(Debug, FromRow)]
struct ImageRow {
    id: Uuid,
    product_id: Uuid,
    status: String,
    error: Option<String>,
    source_url: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

#[derive(Debug, FromRow)]
struct VariantRow {
    image_id: Uuid,
    name: String,
    width: i32,
    height: i32,
    content_type: String,
    etag: String,
    size_bytes: i64,
    object_key: String,
}

impl TryFrom<VariantRow> for Variant {
    type Error = StoreError;

    fn try_from(row: VariantRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| {
            StoreError::Other(format!(
                "image_variants row {}/{}: bad {what}",
                row.image_id, row.name
            ))
        };
        Ok(Self {
            width: u32::try_from(row.width).map_err(|_| corrupt("width"))?,
            height: u32::try_from(row.height).map_err(|_| corrupt("height"))?,
            size_bytes: u64::try_from(row.size_bytes).map_err(|_| corrupt("size"))?,
            name: row.name,
            content_type: row.content_type,
            etag: row.etag,
            key: row.object_key,
        })
    }
}

fn image(row: ImageRow, variants: Vec<Variant>) -> Result<Image, StoreError> {
    let status = ImageStatus::parse(&row.status)
        .ok_or_else(|| StoreError::Other(format!("images row {}: bad status", row.id)))?;
    Ok(Image {
        id: row.id,
        product_id: row.product_id,
        status,
        error: row.error,
        source_url: row.source_url,
        variants,
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

fn group(rows: Vec<ImageRow>, variant_rows: Vec<VariantRow>) -> Result<Vec<Image>, StoreError> {
    let mut by_image: HashMap<Uuid, Vec<Variant>> = HashMap::new();
    for row in variant_rows {
        by_image
            .entry(row.image_id)
            .or_default()
            .push(Variant::try_from(row)?);
    }
    rows.into_iter()
        .map(|row| {
            let mut variants = by_image.remove(&row.id).unwrap_or_default();
            variants.sort_by_key(|v| crate::domain::variant_rank(&v.name));
            image(row, variants)
        })
        .collect()
}

const INSERT: &str = "INSERT INTO images (id, product_id, status, error, source_url, created_at, updated_at) \
                      VALUES ($1, $2, $3, $4, $5, $6, $7)";
const GET: &str = "SELECT id, product_id, status, error, source_url, created_at, updated_at \
                   FROM images WHERE id = $1";
const OF_PRODUCT: &str = "SELECT id, product_id, status, error, source_url, created_at, updated_at \
                          FROM images WHERE product_id = $1 ORDER BY id";
const VARIANTS_OF: &str = "SELECT image_id, name, width, height, content_type, etag, size_bytes, object_key \
                           FROM image_variants WHERE image_id = $1";
const VARIANTS_OF_PRODUCT: &str = "SELECT v.image_id, v.name, v.width, v.height, v.content_type, v.etag, \
                                   v.size_bytes, v.object_key FROM image_variants v \
                                   JOIN images i ON i.id = v.image_id WHERE i.product_id = $1 \
                                   ORDER BY v.image_id";
const READY_VARIANT: &str = "SELECT v.image_id, v.name, v.width, v.height, v.content_type, v.etag, \
                             v.size_bytes, v.object_key FROM image_variants v \
                             JOIN images i ON i.id = v.image_id \
                             WHERE v.image_id = $1 AND v.name = $2 AND i.status = 'ready'";
const INSERT_VARIANT: &str = "INSERT INTO image_variants (image_id, name, width, height, content_type, etag, \
                              size_bytes, object_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
const MARK_READY: &str = "UPDATE images SET status = 'ready', error = NULL, updated_at = $2 \
                          WHERE id = $1 AND status = 'processing' RETURNING product_id";
const MARK_FAILED: &str = "UPDATE images SET status = 'failed', error = $2, updated_at = $3 \
                           WHERE id = $1 AND status = 'processing' RETURNING product_id";

/// Inserts a new image, in the caller's transaction (which also enqueues its job).
pub async fn insert(tx: &mut Tx, image: &Image) -> Result<(), StoreError> {
    with_tx!(tx, conn => {
        sqlx::query(INSERT)
            .bind(image.id)
            .bind(image.product_id)
            .bind(image.status.as_str())
            .bind(&image.error)
            .bind(&image.source_url)
            .bind(image.created_at)
            .bind(image.updated_at)
            .execute(conn)
            .await?;
    });
    Ok(())
}

/// `processing` -> `ready` with its variants, in the caller's transaction. Returns
/// the product's id when this call made the change (`None`: already settled).
pub async fn mark_ready(
    tx: &mut Tx,
    id: Uuid,
    variants: &[Variant],
    at: DateTime<Utc>,
) -> Result<Option<Uuid>, StoreError> {
    let product_id: Option<Uuid> = with_tx!(&mut *tx, conn => {
        sqlx::query_scalar(MARK_READY).bind(id).bind(at).fetch_optional(conn).await?
    });
    if product_id.is_none() {
        return Ok(None);
    }
    for variant in variants {
        let width = i32::try_from(variant.width)
            .map_err(|_| StoreError::Other("variant width out of range".into()))?;
        let height = i32::try_from(variant.height)
            .map_err(|_| StoreError::Other("variant height out of range".into()))?;
        let size = i64::try_from(variant.size_bytes)
            .map_err(|_| StoreError::Other("variant size out of range".into()))?;
        with_tx!(&mut *tx, conn => {
            sqlx::query(INSERT_VARIANT)
                .bind(id)
                .bind(&variant.name)
                .bind(width)
                .bind(height)
                .bind(&variant.content_type)
                .bind(&variant.etag)
                .bind(size)
                .bind(&variant.key)
                .execute(conn)
                .await?;
        });
    }
    Ok(product_id)
}

/// `processing` -> `failed` with a reason, in the caller's transaction. Returns the
/// product's id when this call made the change.
pub async fn mark_failed(
    tx: &mut Tx,
    id: Uuid,
    reason: &str,
    at: DateTime<Utc>,
) -> Result<Option<Uuid>, StoreError> {
    Ok(with_tx!(tx, conn => {
        sqlx::query_scalar(MARK_FAILED).bind(id).bind(reason).bind(at).fetch_optional(conn).await?
    }))
}

/// Read access to image records.
#[derive(Debug, Clone)]
pub struct MediaStore {
    db: Database,
}

impl MediaStore {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    pub async fn begin(&self) -> Result<Tx, StoreError> {
        self.db.begin().await
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<Image>, StoreError> {
        let row: Option<ImageRow> =
            with_pool!(self.db, pool => sqlx::query_as(GET).bind(id).fetch_optional(pool).await?);
        let Some(row) = row else {
            return Ok(None);
        };
        let variants: Vec<VariantRow> = with_pool!(self.db, pool => {
            sqlx::query_as(VARIANTS_OF).bind(id).fetch_all(pool).await?
        });
        Ok(group(vec![row], variants)?.pop())
    }

    /// A product's images, oldest first.
    pub async fn of_product(&self, product_id: Uuid) -> Result<Vec<Image>, StoreError> {
        let rows: Vec<ImageRow> = with_pool!(self.db, pool => {
            sqlx::query_as(OF_PRODUCT).bind(product_id).fetch_all(pool).await?
        });
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let variants: Vec<VariantRow> = with_pool!(self.db, pool => {
            sqlx::query_as(VARIANTS_OF_PRODUCT).bind(product_id).fetch_all(pool).await?
        });
        group(rows, variants)
    }

    /// The images of several products (oldest first), in two reads whatever
    /// their number; products without images have no entry.
    pub async fn of_products(
        &self,
        product_ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Vec<Image>>, StoreError> {
        if product_ids.is_empty() {
            return Ok(HashMap::new());
        }
        // Only numbered placeholders are put into the texts; the ids are bound.
        let list = scaleshop_db::placeholders(1, product_ids.len());
        let images = format!(
            "SELECT id, product_id, status, error, source_url, created_at, updated_at \
             FROM images WHERE product_id IN ({list}) ORDER BY id"
        );
        let rows: Vec<ImageRow> = with_pool!(self.db, pool => {
            let mut query = sqlx::query_as(sqlx::AssertSqlSafe(images.clone()));
            for id in product_ids {
                query = query.bind(*id);
            }
            query.fetch_all(pool).await?
        });
        if rows.is_empty() {
            return Ok(HashMap::new());
        }
        let variants = format!(
            "SELECT v.image_id, v.name, v.width, v.height, v.content_type, v.etag, v.size_bytes, v.object_key \
             FROM image_variants v JOIN images i ON i.id = v.image_id WHERE i.product_id IN ({list}) \
             ORDER BY v.image_id"
        );
        let variant_rows: Vec<VariantRow> = with_pool!(self.db, pool => {
            let mut query = sqlx::query_as(sqlx::AssertSqlSafe(variants.clone()));
            for id in product_ids {
                query = query.bind(*id);
            }
            query.fetch_all(pool).await?
        });
        let mut by_product: HashMap<Uuid, Vec<ImageRow>> = HashMap::new();
        for row in rows {
            by_product.entry(row.product_id).or_default().push(row);
        }
        let mut variants_by_image: HashMap<Uuid, Vec<VariantRow>> = HashMap::new();
        for row in variant_rows {
            variants_by_image.entry(row.image_id).or_default().push(row);
        }
        by_product
            .into_iter()
            .map(|(product_id, rows)| {
                let variants = rows
                    .iter()
                    .flat_map(|row| variants_by_image.remove(&row.id).unwrap_or_default())
                    .collect();
                Ok((product_id, group(rows, variants)?))
            })
            .collect()
    }

    /// A variant of a `ready` image.
    pub async fn ready_variant(&self, id: Uuid, name: &str) -> Result<Option<Variant>, StoreError> {
        let row: Option<VariantRow> = with_pool!(self.db, pool => {
            sqlx::query_as(READY_VARIANT).bind(id).bind(name).fetch_optional(pool).await?
        });
        row.map(Variant::try_from).transpose()
    }
}
