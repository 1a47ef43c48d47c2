//! The catalog's use cases: create, change, read and search products, with their
//! stock (the inventory's API) and images (the [`ProductImages`] hook), through
//! the product cache.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use chrono::SubsecRound;
use chrono::{DateTime, Utc};
use scaleshop_cache::{CacheSettings, Cached, Loaded, TieredCache};
use scaleshop_contracts::{ProductCreated, ProductUpdated};
use scaleshop_db::{Consistency, Database, StoreError};
use scaleshop_events::NewEvent;
use scaleshop_inventory::Inventory;
use uuid::Uuid;

use crate::domain::{NewProduct, Product, ProductPatch};
use crate::store::ProductStore;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("the sku is taken")]
    SkuTaken,
    #[error("no such product")]
    NotFound,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A product with its current stock and images.
#[derive(Debug, Clone)]
pub struct Listed {
    pub product: Product,
    pub available: i64,
    /// The product's images as the media service shows them (opaque here).
    pub images: Vec<serde_json::Value>,
}

/// The media service's answer to "which images does this product have?", plugged
/// in by the composition root (the catalog does not depend on the media crate).
#[async_trait::async_trait]
pub trait ProductImages: Send + Sync + 'static {
    async fn images_of(&self, product_id: Uuid) -> Result<Vec<serde_json::Value>, StoreError>;

    /// The images of several products at once (a page of search results): an
    /// entry for each product that has images.
    async fn images_of_products(
        &self,
        product_ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Vec<serde_json::Value>>, StoreError>;
}

/// A product.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ProductView {
    pub id: Uuid,
    pub sku: String,
    pub name: String,
    pub description: String,
    pub price_cents: i64,
    pub currency: String,
    /// Stock that can still be ordered.
    pub available: i64,
    /// Images, as `GET /v1/images/{id}` shows them.
    #[schema(value_type = Vec<Object>)]
    pub images: Vec<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<Listed> for ProductView {
    fn from(
        Listed {
            product,
            available,
            images,
        }: Listed,
    ) -> Self {
        Self {
            id: product.id,
            sku: product.sku.as_str().to_owned(),
            name: product.name.as_str().to_owned(),
            description: product.description.as_str().to_owned(),
            price_cents: product.price_cents.get(),
            currency: product.currency.as_str().to_owned(),
            available,
            images,
            created_at: product.created_at,
            updated_at: product.updated_at,
        }
    }
}

/// Whether products exist, and nothing more (see [`Catalog::directory`]).
#[derive(Debug, Clone)]
pub struct ProductDirectory {
    store: ProductStore,
}

impl ProductDirectory {
    pub async fn exists(&self, id: Uuid) -> Result<bool, CatalogError> {
        Ok(self.store.get(id).await?.is_some())
    }
}

/// The catalog's in-process API.
#[derive(Clone)]
pub struct Catalog {
    pub(crate) store: ProductStore,
    inventory: Inventory,
    images: Arc<OnceLock<Arc<dyn ProductImages>>>,
    cache: Arc<TieredCache<ProductView>>,
    /// The search projection, when this process keeps one (`crate::query`).
    pub(crate) search_side: Option<Arc<crate::query::SearchSide>>,
    /// The product listing projection (`crate::listing`), when registered.
    pub(crate) listing: Option<crate::listing::ProductListing>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Catalog")
    }
}

fn created_event(product: &Product) -> Result<NewEvent, StoreError> {
    NewEvent::typed(
        product.id,
        &ProductCreated {
            product_id: product.id,
            sku: product.sku.as_str().to_owned(),
            name: product.name.as_str().to_owned(),
            price_cents: product.price_cents.get(),
            currency: product.currency.as_str().to_owned(),
            initial_stock: product.initial_stock.get(),
            description: Some(product.description.as_str().to_owned()),
            at: Some(product.created_at),
        },
    )
}

fn updated_event(product: &Product, changed: &[&str]) -> Result<NewEvent, StoreError> {
    NewEvent::typed(
        product.id,
        &ProductUpdated {
            product_id: product.id,
            sku: product.sku.as_str().to_owned(),
            name: product.name.as_str().to_owned(),
            price_cents: product.price_cents.get(),
            currency: product.currency.as_str().to_owned(),
            initial_stock: product.initial_stock.get(),
            changed: changed.iter().map(|c| (*c).to_owned()).collect(),
            description: Some(product.description.as_str().to_owned()),
            at: Some(product.updated_at),
        },
    )
}

impl Catalog {
    pub fn new(db: Database, inventory: Inventory) -> Self {
        Self {
            store: ProductStore::new(db),
            inventory,
            images: Arc::new(OnceLock::new()),
            cache: Arc::new(TieredCache::new("products", None, CacheSettings::default())),
            search_side: None,
            listing: None,
        }
    }

    /// Uses this cache (e.g. one with a shared Redis tier) for reads by id.
    pub fn with_cache(mut self, cache: Arc<TieredCache<ProductView>>) -> Self {
        self.cache = cache;
        self
    }

    pub fn cache(&self) -> Arc<TieredCache<ProductView>> {
        self.cache.clone()
    }

    /// A product by id through the cache (cache-aside); `fresh_since` (from a
    /// consistency token, µs) bypasses entries read before it. Entries are dropped
    /// when the product, its stock or its images change.
    pub async fn get_cached(
        &self,
        id: Uuid,
        fresh_since: Option<i64>,
        consistency: Consistency,
    ) -> Result<Arc<Cached<ProductView>>, CatalogError> {
        let mut key = Uuid::encode_buffer();
        let key = id.hyphenated().encode_lower(&mut key);
        let found = self
            .cache
            .get_or_load(key, fresh_since, || async move {
                let (product, as_of) = self.store.read(id, consistency).await?;
                let value = match product {
                    Some(product) => Some(ProductView::from(
                        self.with_stock(vec![product])
                            .await
                            .map_err(|e| match e {
                                CatalogError::Store(e) => e,
                                other => StoreError::Other(other.to_string()),
                            })?
                            .remove(0),
                    )),
                    None => None,
                };
                // Stamped with the replica's freshness, so a consistency token
                // newer than that still bypasses the entry.
                Ok::<_, StoreError>(Loaded {
                    value,
                    as_of_micros: Some(as_of),
                })
            })
            .await
            .map_err(|e| CatalogError::Store((*e).clone()))?;
        found.ok_or(CatalogError::NotFound)
    }

    /// Plugs in the media service (once; later calls are ignored).
    pub fn set_images(&self, images: Arc<dyn ProductImages>) {
        let _ = self.images.set(images);
    }

    /// Whether a product exists (for other services).
    pub async fn exists(&self, id: Uuid) -> Result<bool, CatalogError> {
        Ok(self.store.get(id).await?.is_some())
    }

    /// What a service the catalog itself calls may ask of it (the media service:
    /// does this product exist?), without holding the catalog and its hooks: a
    /// `Catalog` inside the media service would make a cycle of references that
    /// keeps both, and their database pool, alive for ever.
    pub fn directory(&self) -> ProductDirectory {
        ProductDirectory {
            store: self.store.clone(),
        }
    }

    pub async fn create(&self, new: NewProduct) -> Result<Product, CatalogError> {
        let now = Utc::now().trunc_subsecs(6);
        let product = Product {
            id: Uuid::now_v7(),
            sku: new.sku,
            name: new.name,
            description: new.description,
            price_cents: new.price_cents,
            currency: new.currency,
            initial_stock: new.initial_stock,
            created_at: now,
            updated_at: now,
        };
        let event = created_event(&product)?;
        match self.store.insert(&product, &event).await {
            Ok(()) => Ok(product),
            Err(StoreError::Conflict(_)) => Err(CatalogError::SkuTaken),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn update(&self, id: Uuid, patch: ProductPatch) -> Result<Product, CatalogError> {
        let mut product = self.store.get(id).await?.ok_or(CatalogError::NotFound)?;
        let mut changed = Vec::new();
        if let Some(name) = patch.name.filter(|n| *n != product.name) {
            product.name = name;
            changed.push("name");
        }
        if let Some(description) = patch.description.filter(|d| *d != product.description) {
            product.description = description;
            changed.push("description");
        }
        if let Some(price) = patch.price_cents.filter(|p| *p != product.price_cents) {
            product.price_cents = price;
            changed.push("price_cents");
        }
        if changed.is_empty() {
            return Ok(product);
        }
        product.updated_at = Utc::now().trunc_subsecs(6).max(product.updated_at);
        let event = updated_event(&product, &changed)?;
        self.store.update(&product, &event).await?;
        self.cache.invalidate(&product.id.to_string()).await;
        Ok(product)
    }

    /// Products by id (the ones that exist), for other services.
    pub async fn products(&self, ids: &[Uuid]) -> Result<Vec<Product>, CatalogError> {
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(product) = self.store.get(*id).await? {
                found.push(product);
            }
        }
        Ok(found)
    }

    pub async fn get(&self, id: Uuid) -> Result<Listed, CatalogError> {
        let product = self.store.get(id).await?.ok_or(CatalogError::NotFound)?;
        Ok(self.with_stock(vec![product]).await?.remove(0))
    }

    /// May be served by a replica (within `consistency`).
    pub async fn search(
        &self,
        text: Option<&str>,
        after: Option<Uuid>,
        limit: i64,
        consistency: Consistency,
    ) -> Result<Vec<Listed>, CatalogError> {
        let text = text.map(str::trim).filter(|t| !t.is_empty());
        let products = self.store.search(text, after, limit, consistency).await?;
        self.with_stock(products).await
    }

    /// Adds the images and `available`: the inventory's figure, or the initial stock while the
    /// inventory has not made the record yet (nothing can have been reserved then).
    pub(crate) async fn with_stock(
        &self,
        products: Vec<Product>,
    ) -> Result<Vec<Listed>, CatalogError> {
        // One read for the stock and one for the images of the whole page,
        // not one of each per product.
        let ids: Vec<Uuid> = products.iter().map(|p| p.id).collect();
        let levels = self.inventory.levels(&ids).await?;
        let mut images = match self.images.get() {
            Some(media) => media.images_of_products(&ids).await?,
            None => HashMap::new(),
        };
        let mut listed = Vec::with_capacity(products.len());
        for product in products {
            let available = levels
                .get(&product.id)
                .map_or(product.initial_stock.get(), |s| s.available);
            let images = images.remove(&product.id).unwrap_or_default();
            listed.push(Listed {
                product,
                available,
                images,
            });
        }
        Ok(listed)
    }
}
