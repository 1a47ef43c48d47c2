//! Events of the images service.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::contract;

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
    pub variants: Vec<ImageVariant>,
    pub error: Option<String>,
}
contract!(ImageProcessed, "image.processed", 1);
