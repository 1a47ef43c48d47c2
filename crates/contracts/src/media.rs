//! Events of the images service.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::contract;

/// Where the bytes of an image's variant are served (`GET /v1/images/{id}/{name}`).
pub fn variant_url(image_id: Uuid, name: &str) -> String {
    format!("/v1/images/{image_id}/{name}")
}

/// `image.added`: an image of a product was accepted and is `processing`
/// (aggregate: the image).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageAdded {
    pub image_id: Uuid,
    pub product_id: Uuid,
}

contract!(ImageAdded, "image.added", 1);

/// One stored variant of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageVariant {
    /// `thumb` or `medium`.
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub content_type: String,
}

/// `image.processed`: an image is settled, `ready` (with its variants) or `failed`
/// (with the reason).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageProcessed {
    pub image_id: Uuid,
    pub product_id: Uuid,
    /// `ready` or `failed`.
    pub status: String,
    /// In the order the API lists them: smallest first.
    pub variants: Vec<ImageVariant>,
    pub error: Option<String>,
}
contract!(ImageProcessed, "image.processed", 1);
