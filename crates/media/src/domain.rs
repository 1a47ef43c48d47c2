//! Media domain types: what an image is, its variants, and the rules on sizes.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// The image formats taken in (and, for variants, given out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaType {
    Png,
    Jpeg,
    Webp,
}

impl MediaType {
    /// `image/png`, `image/jpeg` or `image/webp` (parameters and case ignored).
    pub fn parse(content_type: &str) -> Option<Self> {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "image/png" => Some(Self::Png),
            "image/jpeg" => Some(Self::Jpeg),
            "image/webp" => Some(Self::Webp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Webp => "image/webp",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpg",
            Self::Webp => "webp",
        }
    }
}

/// Where an image is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageStatus {
    Processing,
    Ready,
    Failed,
}

impl ImageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Processing => "processing",
            Self::Ready => "ready",
            Self::Failed => "failed",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "processing" => Some(Self::Processing),
            "ready" => Some(Self::Ready),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

/// A variant the job makes: its name and the length of its longer side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VariantSpec {
    pub name: &'static str,
    pub longer_side: u32,
}

/// Every variant, largest first (smaller ones are made from the larger).
pub const VARIANTS: [VariantSpec; 2] = [
    VariantSpec {
        name: "medium",
        longer_side: 512,
    },
    VariantSpec {
        name: "thumb",
        longer_side: 128,
    },
];

/// Where a variant comes in lists: smallest first (unknown names last).
pub fn variant_rank(name: &str) -> usize {
    VARIANTS
        .iter()
        .rev()
        .position(|spec| spec.name == name)
        .unwrap_or(VARIANTS.len())
}

/// The size of `width` x `height` scaled so that its longer side is `longer_side`,
/// aspect ratio kept (rounded to the nearest pixel, at least 1), never scaled up.
pub fn fit(width: u32, height: u32, longer_side: u32) -> (u32, u32) {
    if width.max(height) <= longer_side || width == 0 || height == 0 {
        return (width, height);
    }
    let scale = |short: u32, long: u32| -> u32 {
        let scaled =
            (u64::from(short) * u64::from(longer_side) + u64::from(long) / 2) / u64::from(long);
        u32::try_from(scaled).unwrap_or(longer_side).max(1)
    };
    if width >= height {
        (longer_side, scale(height, width))
    } else {
        (scale(width, height), longer_side)
    }
}

/// A stored variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variant {
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub content_type: String,
    /// Hex SHA-256 of the bytes (the strong ETag, quoted on the wire).
    pub etag: String,
    pub size_bytes: u64,
    /// Where the bytes are in the object store.
    pub key: String,
}

/// An image of a product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub id: Uuid,
    pub product_id: Uuid,
    pub status: ImageStatus,
    /// Why it failed; safe to show.
    pub error: Option<String>,
    /// The URL it is fetched from, when it was not uploaded.
    pub source_url: Option<String>,
    pub variants: Vec<Variant>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The object-store key of an image's original bytes.
pub fn original_key(id: Uuid) -> String {
    format!("{id}/original")
}

/// The object-store key of a variant.
pub fn variant_key(id: Uuid, name: &str, media_type: MediaType) -> String {
    format!("{id}/{name}.{}", media_type.extension())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_keeps_aspect_and_never_scales_up() {
        assert_eq!(fit(2000, 1000, 128), (128, 64));
        assert_eq!(fit(2000, 1000, 512), (512, 256));
        assert_eq!(fit(1000, 2000, 512), (256, 512));
        assert_eq!(fit(2000, 1500, 512), (512, 384));
        assert_eq!(fit(2000, 1500, 128), (128, 96));
        assert_eq!(fit(100, 50, 128), (100, 50));
        assert_eq!(fit(100, 50, 512), (100, 50));
        assert_eq!(fit(512, 512, 512), (512, 512));
        assert_eq!(fit(10_000, 1, 128), (128, 1));
        assert_eq!(fit(1, 10_000, 128), (1, 128));
        assert_eq!(fit(300, 200, 128), (128, 85));
    }

    #[test]
    fn media_types() {
        assert_eq!(MediaType::parse("image/PNG"), Some(MediaType::Png));
        assert_eq!(
            MediaType::parse("image/jpeg; charset=binary"),
            Some(MediaType::Jpeg)
        );
        assert_eq!(MediaType::parse("image/webp"), Some(MediaType::Webp));
        assert_eq!(MediaType::parse("image/gif"), None);
        assert_eq!(MediaType::parse("text/html"), None);
        assert_eq!(MediaType::parse(""), None);
    }
}
