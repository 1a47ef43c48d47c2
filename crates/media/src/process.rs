//! Decoding with limits, resizing and encoding: pure, synchronous, CPU-bound work
//! (the job runs it in `spawn_blocking`).
//!
//! Against decompression bombs: the format is sniffed from the bytes (PNG, JPEG or
//! WebP only); the dimensions are read from the header and checked (each side at
//! most [`MAX_SIDE`], at most [`MAX_PIXELS`] pixels) before anything is decoded;
//! the decoder itself runs with `image::Limits` (the same sides, and at most
//! [`MAX_ALLOC`] bytes of allocation).
//!
//! Output: a JPEG in gives JPEG variants (quality [`JPEG_QUALITY`]); a PNG in gives
//! PNG variants (alpha kept); a WebP in gives PNG variants when it has an alpha
//! channel, JPEG otherwise (the `image` crate encodes WebP only losslessly, which is
//! large for photographs). The EXIF orientation of JPEG and WebP is applied.

use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, FilterType as PngFilter, PngEncoder};
use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

use crate::domain::{MediaType, VARIANTS, fit};

/// The longest side accepted, in pixels.
pub const MAX_SIDE: u32 = 12_000;
/// The most pixels accepted (40 megapixels).
pub const MAX_PIXELS: u64 = 40_000_000;
/// The most bytes the decoder may allocate.
pub const MAX_ALLOC: u64 = 512 * 1024 * 1024;
/// Quality of JPEG variants.
pub const JPEG_QUALITY: u8 = 85;
/// The resampling filter: Catmull-Rom (bicubic), sharp; Lanczos3 is barely sharper
/// and slower, Triangle faster and softer (see docs/images.md for the figures).
const FILTER: FilterType = FilterType::CatmullRom;

/// Why an image could not be processed; safe to show to clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProcessError(pub String);

/// One variant, encoded.
#[derive(Debug, Clone)]
pub struct Rendition {
    pub name: &'static str,
    pub width: u32,
    pub height: u32,
    pub media_type: MediaType,
    pub bytes: Vec<u8>,
}

/// The result of processing one original.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub source: MediaType,
    pub width: u32,
    pub height: u32,
    /// In the order of [`VARIANTS`].
    pub variants: Vec<Rendition>,
}

/// The format of `bytes`, from their signature; PNG, JPEG and WebP only.
pub fn sniff(bytes: &[u8]) -> Option<MediaType> {
    match image::guess_format(bytes).ok()? {
        ImageFormat::Png => Some(MediaType::Png),
        ImageFormat::Jpeg => Some(MediaType::Jpeg),
        ImageFormat::WebP => Some(MediaType::Webp),
        _ => None,
    }
}

fn limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_ALLOC);
    limits
}

fn format_of(media_type: MediaType) -> ImageFormat {
    match media_type {
        MediaType::Png => ImageFormat::Png,
        MediaType::Jpeg => ImageFormat::Jpeg,
        MediaType::Webp => ImageFormat::WebP,
    }
}

/// Checks the dimensions a header declares.
pub fn check_dimensions(width: u32, height: u32) -> Result<(), ProcessError> {
    if width == 0 || height == 0 {
        return Err(ProcessError(format!(
            "the image declares an empty size ({width}x{height})"
        )));
    }
    if width > MAX_SIDE || height > MAX_SIDE || u64::from(width) * u64::from(height) > MAX_PIXELS {
        return Err(ProcessError(format!(
            "the image is {width}x{height} pixels: over the limit ({MAX_SIDE} pixels a side, {MAX_PIXELS} pixels in all)"
        )));
    }
    Ok(())
}

fn decode_error(error: &image::ImageError) -> ProcessError {
    match error {
        image::ImageError::Limits(limit) => match limit.kind() {
            image::error::LimitErrorKind::DimensionError => ProcessError(format!(
                "the image's dimensions are over the limit ({MAX_SIDE} pixels a side, {MAX_PIXELS} pixels in all)"
            )),
            _ => ProcessError(
                "the image needs more memory to decode than allowed: over the limit".to_owned(),
            ),
        },
        other => ProcessError(format!(
            "the file could not be decoded as an image: {other}"
        )),
    }
}

/// Decodes `bytes` (PNG, JPEG or WebP) within the limits, orientation applied.
pub fn decode(bytes: &[u8]) -> Result<(MediaType, DynamicImage), ProcessError> {
    let media_type = sniff(bytes)
        .ok_or_else(|| ProcessError("the file is not a PNG, JPEG or WebP image".to_owned()))?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format_of(media_type));
    reader.limits(limits());
    // Reads the header only; the limits' side check has run.
    let mut decoder = reader.into_decoder().map_err(|e| decode_error(&e))?;
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height)?;
    let mut budget = limits();
    budget
        .reserve(decoder.total_bytes())
        .map_err(|e| decode_error(&e))?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(&e))?;
    image.apply_orientation(orientation);
    Ok((media_type, image))
}

/// 8 bits per channel, in a layout the encoders take.
fn eight_bit(image: DynamicImage, alpha: bool) -> DynamicImage {
    match image {
        DynamicImage::ImageLuma8(_)
        | DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageRgb8(_)
        | DynamicImage::ImageRgba8(_) => image,
        other if alpha => DynamicImage::ImageRgba8(other.to_rgba8()),
        other => DynamicImage::ImageRgb8(other.to_rgb8()),
    }
}

fn encode(image: &DynamicImage, media_type: MediaType) -> Result<Vec<u8>, ProcessError> {
    let mut out = Vec::new();
    let result =
        match media_type {
            MediaType::Jpeg => {
                let opaque;
                let image = match image {
                    DynamicImage::ImageLuma8(_) | DynamicImage::ImageRgb8(_) => image,
                    other => {
                        opaque = DynamicImage::ImageRgb8(other.to_rgb8());
                        &opaque
                    }
                };
                image.write_with_encoder(JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY))
            }
            MediaType::Png | MediaType::Webp => image.write_with_encoder(
                PngEncoder::new_with_quality(&mut out, CompressionType::Fast, PngFilter::Adaptive),
            ),
        };
    result.map_err(|e| ProcessError(format!("encoding a variant failed: {e}")))?;
    Ok(out)
}

/// The format variants of a `source` image are written in.
pub fn output_type(source: MediaType, has_alpha: bool) -> MediaType {
    match source {
        MediaType::Jpeg => MediaType::Jpeg,
        MediaType::Png => MediaType::Png,
        MediaType::Webp if has_alpha => MediaType::Png,
        MediaType::Webp => MediaType::Jpeg,
    }
}

/// Decodes `bytes` and makes every variant of [`VARIANTS`].
pub fn render(bytes: &[u8]) -> Result<Rendered, ProcessError> {
    let (source, image) = decode(bytes)?;
    let (width, height) = (image.width(), image.height());
    let alpha = image.color().has_alpha();
    let output = output_type(source, alpha);
    let mut current = eight_bit(image, alpha);
    let mut variants = Vec::with_capacity(VARIANTS.len());
    // Largest first: each smaller variant is resampled from the one before.
    for spec in VARIANTS {
        let (w, h) = fit(width, height, spec.longer_side);
        if (w, h) != (current.width(), current.height()) {
            current = current.resize_exact(w, h, FILTER);
        }
        variants.push(Rendition {
            name: spec.name,
            width: w,
            height: h,
            media_type: output,
            bytes: encode(&current, output)?,
        });
    }
    Ok(Rendered {
        source,
        width,
        height,
        variants,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use image::{ImageBuffer, Rgb, Rgba};
    use scaleshop_testkit::images::bomb_png;

    fn encoded(width: u32, height: u32, format: ImageFormat, alpha: bool) -> Vec<u8> {
        let image = if alpha {
            DynamicImage::ImageRgba8(ImageBuffer::from_fn(width, height, |x, y| {
                Rgba([(x % 256) as u8, (y % 256) as u8, 90, 200])
            }))
        } else {
            DynamicImage::ImageRgb8(ImageBuffer::from_fn(width, height, |x, y| {
                Rgb([(x % 256) as u8, (y % 256) as u8, 90])
            }))
        };
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    fn sizes(rendered: &Rendered) -> Vec<(&str, u32, u32, MediaType)> {
        rendered
            .variants
            .iter()
            .map(|v| (v.name, v.width, v.height, v.media_type))
            .collect()
    }

    #[test]
    fn variants_of_each_format() {
        for (format, alpha, out) in [
            (ImageFormat::Png, true, MediaType::Png),
            (ImageFormat::Jpeg, false, MediaType::Jpeg),
            (ImageFormat::WebP, false, MediaType::Jpeg),
            (ImageFormat::WebP, true, MediaType::Png),
        ] {
            let rendered = render(&encoded(2000, 1000, format, alpha)).unwrap();
            assert_eq!(
                sizes(&rendered),
                [("medium", 512, 256, out), ("thumb", 128, 64, out)],
                "{format:?}"
            );
            for variant in &rendered.variants {
                let (media_type, image) = decode(&variant.bytes).unwrap();
                assert_eq!(media_type, out);
                assert_eq!(
                    (image.width(), image.height()),
                    (variant.width, variant.height)
                );
            }
        }
    }

    #[test]
    fn small_images_are_not_scaled_up() {
        let rendered = render(&encoded(100, 50, ImageFormat::Png, false)).unwrap();
        assert_eq!(
            sizes(&rendered),
            [
                ("medium", 100, 50, MediaType::Png),
                ("thumb", 100, 50, MediaType::Png)
            ]
        );
    }

    #[test]
    fn garbage_and_bombs_fail_with_a_reason() {
        let e = render(b"not an image at all").unwrap_err();
        assert!(e.0.contains("not a PNG, JPEG or WebP"), "{e}");
        let mut png = encoded(64, 64, ImageFormat::Png, false);
        png.truncate(60);
        assert!(render(&png).is_err());
        // A PNG header declaring 100000 x 100000 pixels.
        let e = render(&bomb_png(100_000, 100_000)).unwrap_err();
        assert!(e.0.contains("over the limit"), "{e}");
        // Within the side limit but over the pixel count.
        let e = render(&bomb_png(10_000, 10_000)).unwrap_err();
        assert!(e.0.contains("over the limit"), "{e}");
    }
}
