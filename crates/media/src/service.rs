//! The media service's use cases: add an image (upload or `source_url`), read
//! images and variants, and process an image (the `images` job's work); the
//! catalog's [`ProductImages`] hook.

use std::collections::HashMap;

use async_trait::async_trait;
use bytes::Bytes;
use scaleshop_catalog::{CatalogError, ProductDirectory, ProductImages};
use scaleshop_contracts::{ImageAdded, ImageProcessed, ImageVariant};
use scaleshop_db::clock::now;
use scaleshop_db::{Database, StoreError, Tx};
use scaleshop_events::NewEvent;
use scaleshop_jobs::{JobError, NewJob};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::consumer::IMAGES_QUEUE;
use crate::domain::{self, Image, ImageStatus, Variant};
use crate::fetch::{self, Fetcher, Refusal};
use crate::process;
use crate::storage::{Storage, StorageError};
use crate::store::{self, MediaStore};
/// The largest upload (and fetched source).
pub const MAX_UPLOAD_BYTES: usize = fetch::MAX_BYTES;
/// Attempts of an image job (storage or database trouble is retried; a bad image
/// or a refused source fails the image at once).
pub const JOB_MAX_ATTEMPTS: u32 = 5;

/// A variant, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VariantView {
    /// `thumb` or `medium`.
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub content_type: String,
    /// Where its bytes are: `/v1/images/{id}/{name}`.
    pub url: String,
}

/// An image, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageView {
    pub id: Uuid,
    pub product_id: Uuid,
    /// `processing`, `ready` or `failed`.
    pub status: String,
    /// Empty until `ready`.
    pub variants: Vec<VariantView>,
    /// Why it failed.
    pub error: Option<String>,
}

impl From<&Image> for ImageView {
    fn from(image: &Image) -> Self {
        let variants = if image.status == ImageStatus::Ready {
            image
                .variants
                .iter()
                .map(|v| VariantView {
                    name: v.name.clone(),
                    width: v.width,
                    height: v.height,
                    content_type: v.content_type.clone(),
                    url: scaleshop_contracts::media::variant_url(image.id, &v.name),
                })
                .collect()
        } else {
            Vec::new()
        };
        Self {
            id: image.id,
            product_id: image.product_id,
            status: image.status.as_str().to_owned(),
            variants,
            error: image.error.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("no such product")]
    ProductNotFound,
    #[error("no such image or variant")]
    NotFound,
    #[error("source_url {0}")]
    Refused(Refusal),
    #[error("the body is empty")]
    Empty,
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<CatalogError> for MediaError {
    fn from(error: CatalogError) -> Self {
        match error {
            CatalogError::NotFound => Self::ProductNotFound,
            CatalogError::Store(e) => Self::Store(e),
            other => Self::Store(StoreError::Other(other.to_string())),
        }
    }
}

/// How a step that could not go on ends the job.
enum Settle {
    /// The image fails with this reason (safe to show).
    Fail(String),
    /// The job is retried (storage or database trouble).
    Retry(JobError),
}

/// The service's in-process API.
#[derive(Debug, Clone)]
pub struct Media {
    store: MediaStore,
    storage: Storage,
    fetcher: Fetcher,
    catalog: ProductDirectory,
}

fn processed_event(
    id: Uuid,
    product_id: Uuid,
    status: ImageStatus,
    variants: &[Variant],
    error: Option<&str>,
) -> Result<NewEvent, StoreError> {
    // In the order the API lists them (smallest first), which readers of the
    // event keep.
    let mut variants: Vec<&Variant> = variants.iter().collect();
    variants.sort_by_key(|v| domain::variant_rank(&v.name));
    let variants = variants
        .into_iter()
        .map(|v| ImageVariant {
            name: v.name.clone(),
            width: v.width,
            height: v.height,
            content_type: v.content_type.clone(),
        })
        .collect();
    NewEvent::typed(
        id,
        &ImageProcessed {
            image_id: id,
            product_id,
            status: status.as_str().to_owned(),
            variants,
            error: error.map(str::to_owned),
        },
    )
}

/// `processing` -> `failed` with the event, in the caller's transaction.
pub(crate) async fn fail_in(tx: &mut Tx, id: Uuid, reason: &str) -> Result<(), StoreError> {
    if let Some(product_id) = store::mark_failed(tx, id, reason, now()).await? {
        let event = processed_event(id, product_id, ImageStatus::Failed, &[], Some(reason))?;
        scaleshop_events::append(tx, &event).await?;
    }
    Ok(())
}

impl Media {
    pub fn new(
        db: Database,
        catalog: ProductDirectory,
        storage: Storage,
        fetcher: Fetcher,
    ) -> Self {
        Self {
            store: MediaStore::new(db),
            storage,
            fetcher,
            catalog,
        }
    }

    async fn require_product(&self, product_id: Uuid) -> Result<(), MediaError> {
        if self.catalog.exists(product_id).await? {
            Ok(())
        } else {
            Err(MediaError::ProductNotFound)
        }
    }

    /// Records a new `processing` image and enqueues its job, in one transaction.
    async fn create(
        &self,
        id: Uuid,
        product_id: Uuid,
        source_url: Option<String>,
    ) -> Result<Image, MediaError> {
        let at = now();
        let image = Image {
            id,
            product_id,
            status: ImageStatus::Processing,
            error: None,
            source_url,
            variants: Vec::new(),
            created_at: at,
            updated_at: at,
        };
        let mut job = NewJob::new(IMAGES_QUEUE, json!({"image_id": id}));
        job.max_attempts = Some(JOB_MAX_ATTEMPTS);
        let added = NewEvent::typed(
            id,
            &ImageAdded {
                image_id: id,
                product_id,
            },
        )?;
        let mut tx = self.store.begin().await?;
        store::insert(&mut tx, &image).await?;
        scaleshop_events::append(&mut tx, &added).await?;
        scaleshop_jobs::enqueue(&mut tx, &job).await?;
        tx.commit().await?;
        Ok(image)
    }

    /// An uploaded file: stored as the original, then processed by the job.
    pub async fn upload(&self, product_id: Uuid, bytes: Bytes) -> Result<Image, MediaError> {
        self.require_product(product_id).await?;
        if bytes.is_empty() {
            return Err(MediaError::Empty);
        }
        let id = Uuid::now_v7();
        self.storage.put(&domain::original_key(id), bytes).await?;
        self.create(id, product_id, None).await
    }

    /// An image to fetch from `raw_url`: refused at once when the URL breaks a rule
    /// that can be checked now (scheme, literal address, what the host resolves to).
    pub async fn upload_from(&self, product_id: Uuid, raw_url: &str) -> Result<Image, MediaError> {
        self.require_product(product_id).await?;
        let url = self
            .fetcher
            .check(raw_url)
            .await
            .map_err(MediaError::Refused)?;
        self.create(Uuid::now_v7(), product_id, Some(url.to_string()))
            .await
    }

    pub async fn get(&self, id: Uuid) -> Result<Image, MediaError> {
        self.store.get(id).await?.ok_or(MediaError::NotFound)
    }

    /// A variant of a `ready` image (its record, not its bytes).
    pub async fn variant(&self, id: Uuid, name: &str) -> Result<Variant, MediaError> {
        self.store
            .ready_variant(id, name)
            .await?
            .ok_or(MediaError::NotFound)
    }

    /// The bytes of a variant.
    pub async fn variant_bytes(&self, variant: &Variant) -> Result<Bytes, MediaError> {
        self.storage.get(&variant.key).await?.ok_or_else(|| {
            MediaError::Storage(StorageError::Failed(format!(
                "variant object {} is missing",
                variant.key
            )))
        })
    }

    async fn fail(&self, id: Uuid, reason: &str) -> Result<(), JobError> {
        tracing::info!(image_id = %id, reason, "image failed");
        let mut tx = self.store.begin().await?;
        fail_in(&mut tx, id, reason).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The original bytes: stored at upload, or fetched (then stored) for a URL.
    async fn original(&self, image: &Image) -> Result<Bytes, Settle> {
        let key = domain::original_key(image.id);
        let retry = |e: StorageError| Settle::Retry(JobError::retry(e.to_string()));
        if let Some(bytes) = self.storage.get(&key).await.map_err(retry)? {
            return Ok(bytes);
        }
        let Some(raw) = &image.source_url else {
            return Err(Settle::Fail(
                "the uploaded file is missing from storage".to_owned(),
            ));
        };
        let url = url::Url::parse(raw)
            .map_err(|_| Settle::Fail("the source URL is not valid".to_owned()))?;
        let fetched = self
            .fetcher
            .fetch(&url)
            .await
            .map_err(|e| Settle::Fail(e.to_string()))?;
        self.storage
            .put(&key, fetched.bytes.clone())
            .await
            .map_err(retry)?;
        Ok(fetched.bytes)
    }

    /// The job: original -> variants -> storage -> `ready` (or `failed`). Safe to run
    /// again: keys are fixed per image and the status change happens once.
    pub async fn process(&self, id: Uuid) -> Result<(), JobError> {
        let Some(image) = self.store.get(id).await? else {
            return Err(JobError::permanent(format!("image {id} does not exist")));
        };
        if image.status != ImageStatus::Processing {
            return Ok(());
        }
        let original = match self.original(&image).await {
            Ok(bytes) => bytes,
            Err(Settle::Fail(reason)) => return self.fail(id, &reason).await,
            Err(Settle::Retry(error)) => return Err(error),
        };
        let rendered = match tokio::task::spawn_blocking(move || process::render(&original)).await {
            Ok(Ok(rendered)) => rendered,
            Ok(Err(e)) => return self.fail(id, &e.0).await,
            Err(join) if join.is_panic() => {
                tracing::error!(image_id = %id, "the image decoder panicked");
                return self.fail(id, "the image could not be processed").await;
            }
            Err(join) => return Err(JobError::retry(format!("image task: {join}"))),
        };
        let mut variants = Vec::with_capacity(rendered.variants.len());
        for rendition in rendered.variants {
            let key = domain::variant_key(id, rendition.name, rendition.media_type);
            let etag = hex::encode(Sha256::digest(&rendition.bytes));
            let size_bytes = rendition.bytes.len() as u64;
            self.storage
                .put(&key, Bytes::from(rendition.bytes))
                .await
                .map_err(|e| JobError::retry(e.to_string()))?;
            variants.push(Variant {
                name: rendition.name.to_owned(),
                width: rendition.width,
                height: rendition.height,
                content_type: rendition.media_type.as_str().to_owned(),
                etag,
                size_bytes,
                key,
            });
        }
        let mut tx = self.store.begin().await?;
        if let Some(product_id) = store::mark_ready(&mut tx, id, &variants, now()).await? {
            let event = processed_event(id, product_id, ImageStatus::Ready, &variants, None)?;
            scaleshop_events::append(&mut tx, &event).await?;
        }
        tx.commit().await?;
        tracing::info!(image_id = %id, width = rendered.width, height = rendered.height, "image ready");
        Ok(())
    }
}

#[async_trait]
impl ProductImages for Media {
    async fn images_of(&self, product_id: Uuid) -> Result<Vec<serde_json::Value>, StoreError> {
        views(&self.store.of_product(product_id).await?)
    }

    async fn images_of_products(
        &self,
        product_ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Vec<serde_json::Value>>, StoreError> {
        self.store
            .of_products(product_ids)
            .await?
            .into_iter()
            .map(|(product_id, images)| Ok((product_id, views(&images)?)))
            .collect()
    }
}

/// Images as `GET /v1/images/{id}` shows them.
fn views(images: &[Image]) -> Result<Vec<serde_json::Value>, StoreError> {
    images
        .iter()
        .map(|image| {
            serde_json::to_value(ImageView::from(image))
                .map_err(|e| StoreError::Other(e.to_string()))
        })
        .collect()
}
