//! The images (media) service. An admin adds an image to a product by uploading
//! its bytes (PNG, JPEG or WebP, at most 10 MiB) or by naming a `source_url`; the
//! answer is at once (`processing`), and an `images` job does the work: fetch the
//! source under the SSRF rules ([`fetch`]), decode within limits against
//! decompression bombs ([`process`]), make the `thumb` (longer side 128) and
//! `medium` (512) variants, store them ([`storage`]: a folder under the data folder
//! or an S3-compatible service) and mark the image `ready`, or `failed` with a
//! reason. The change of status and the `image.processed` event commit together.
//!
//! Variants are immutable: served with a strong ETag (the SHA-256 of the bytes) and
//! a year-long `Cache-Control: immutable`. The catalog shows a product's images
//! through [`scaleshop_catalog::ProductImages`], which [`Media`] implements.
//!
//! Layers: [`domain`] (parsed types, no I/O) <- [`service`] (use cases) <-
//! [`http`] (routes); [`consumer`] holds the `images` job's handler. Only
//! [`store`] names sqlx and only [`http`] names axum.

pub mod consumer;
pub mod domain;
pub mod fetch;
pub mod http;
pub mod process;
pub mod service;
pub mod storage;
pub mod store;

pub use consumer::{IMAGES_QUEUE, ImageJob};
pub use domain::{Image, ImageStatus, MediaType, Variant};
pub use fetch::{Fetcher, HostOverrides, Refusal};
pub use service::{ImageView, JOB_MAX_ATTEMPTS, MAX_UPLOAD_BYTES, Media, MediaError, VariantView};
pub use storage::{S3Settings, Storage, StorageError, StorageSettings};
pub use store::{MediaStore, migrations};
