//! Decoding image bytes under memory limits, and turning an image into the
//! fixed-size CHW uint8 layout every model consumes (the centre square
//! cropped, then resized to the target).
//!
//! Three bounds keep a hostile image from taking the process down (a failed
//! allocation aborts; no layer can catch it):
//! - a header that claims more than the pixel limit, or an aspect ratio over
//!   [`MAX_ASPECT_RATIO`], is refused before anything is decoded;
//! - every decode reserves its pixel buffer (and as much again for the
//!   decoder's own buffers) from one process-wide [`DecodeBudget`], waiting
//!   while other decodes hold it, so concurrent requests, ingestion and cache
//!   builds together never hold more decoded pixels than the budget;
//! - the crop comes before the resize, so the resized image is never larger
//!   than the target, whatever the shape of the source.

use std::fs::File;
use std::io::{BufRead, BufReader, Cursor, Seek};
use std::path::Path;
use std::sync::{Condvar, Mutex, OnceLock};

use image::{imageops::FilterType, DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

/// Longest side over shorter side an image may have; a 40,000,000×1 strip is
/// refused rather than decoded.
pub const MAX_ASPECT_RATIO: u64 = 100;

/// Bytes of decoded pixels the process holds at most by default.
pub const DEFAULT_DECODE_MEMORY_BYTES: u64 = 1 << 30;

/// Bytes of decoded pixels that every decode in the process shares.
#[derive(Debug)]
pub struct DecodeBudget {
    capacity: u64,
    in_use: Mutex<u64>,
    freed: Condvar,
}

static DECODE_BUDGET: OnceLock<DecodeBudget> = OnceLock::new();

impl DecodeBudget {
    /// Sets the process's budget; only the first call (at start) counts.
    pub fn install(capacity: u64) {
        let _ = DECODE_BUDGET.set(DecodeBudget::new(capacity));
    }

    fn new(capacity: u64) -> Self {
        Self {
            capacity: capacity.max(1 << 20),
            in_use: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    fn global() -> &'static DecodeBudget {
        DECODE_BUDGET.get_or_init(|| DecodeBudget::new(DEFAULT_DECODE_MEMORY_BYTES))
    }

    /// The process's budget, in bytes.
    pub fn capacity() -> u64 {
        Self::global().capacity
    }

    /// Waits until `bytes` are free and holds them until the permit drops.
    fn reserve(&'static self, bytes: u64) -> Result<DecodePermit, String> {
        if bytes > self.capacity {
            return Err(format!(
                "decoding it needs {bytes} bytes, more than the decode budget of {} bytes (PRETEXT_DECODE_MEMORY_BYTES); send a smaller image",
                self.capacity
            ));
        }
        let mut in_use = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
        while *in_use + bytes > self.capacity {
            in_use = self.freed.wait(in_use).unwrap_or_else(|e| e.into_inner());
        }
        *in_use += bytes;
        Ok(DecodePermit {
            budget: self,
            bytes,
        })
    }
}

/// Bytes held from the [`DecodeBudget`] while a decoded image lives.
#[derive(Debug)]
struct DecodePermit {
    budget: &'static DecodeBudget,
    bytes: u64,
}

impl Drop for DecodePermit {
    fn drop(&mut self) {
        let mut in_use = self.budget.in_use.lock().unwrap_or_else(|e| e.into_inner());
        *in_use -= self.bytes;
        self.budget.freed.notify_all();
    }
}

/// A decoded image; its pixels count against the decode budget until it drops.
#[derive(Debug)]
pub struct DecodedImage {
    pub image: DynamicImage,
    pub format: ImageFormat,
    _permit: DecodePermit,
}

impl std::ops::Deref for DecodedImage {
    type Target = DynamicImage;

    fn deref(&self) -> &DynamicImage {
        &self.image
    }
}

/// Decodes an image held in memory under the limits above.
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<DecodedImage, String> {
    decode_from(Cursor::new(bytes), max_pixels)
}

/// Decodes an image file under the limits above, reading it as it goes.
pub fn decode_image_file(path: &Path, max_pixels: u64) -> Result<DecodedImage, String> {
    let file = File::open(path).map_err(|e| format!("unreadable: {e}"))?;
    decode_from(BufReader::new(file), max_pixels)
}

/// Refuses dimensions that are empty, over the pixel limit, or too elongated.
pub fn check_dimensions(width: u32, height: u32, max_pixels: u64) -> Result<(), String> {
    if width == 0 || height == 0 {
        return Err("image has no pixels".to_string());
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(format!(
            "image is {width}×{height} pixels, more than the limit of {max_pixels}"
        ));
    }
    let (long, short) = (width.max(height), width.min(height));
    if u64::from(long) > u64::from(short) * MAX_ASPECT_RATIO {
        return Err(format!(
            "image is {width}×{height} pixels, more elongated than the limit of {MAX_ASPECT_RATIO}:1 between its sides; crop it closer to a square"
        ));
    }
    Ok(())
}

fn decode_from<R: BufRead + Seek>(reader: R, max_pixels: u64) -> Result<DecodedImage, String> {
    let mut reader = ImageReader::new(reader)
        .with_guessed_format()
        .map_err(|e| format!("unreadable: {e}"))?;
    let Some(format) = reader.format() else {
        return Err("not a recognised image format".to_string());
    };
    // The header is read before any pixel: no decoder may allocate more than
    // the largest image the pixel limit allows (16-bit RGBA).
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8).max(1 << 20));
    reader.limits(limits);
    let decoder = reader
        .into_decoder()
        .map_err(|e| format!("unreadable header: {e}"))?;
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height, max_pixels)?;
    // Decoders keep working buffers beside the image (JPEG's component
    // planes, PNG's rows): reserve as much again.
    let permit = DecodeBudget::global().reserve(decoder.total_bytes().saturating_mul(2))?;
    let image = DynamicImage::from_decoder(decoder).map_err(|e| format!("corrupt image: {e}"))?;
    Ok(DecodedImage {
        image,
        format,
        _permit: permit,
    })
}

/// Whether the image has a single (grey) colour channel.
pub fn is_grayscale(image: &DynamicImage) -> bool {
    !image.color().has_color()
}

/// Crops the centre square, resizes it to `size`×`size`, converts to
/// `channels` (1: grey, 3: RGB) and lays the pixels out as CHW. No
/// intermediate image is larger than the source's square or the target.
pub fn to_chw_u8(image: &DynamicImage, size: u32, channels: u8) -> Vec<u8> {
    let (width, height) = (image.width().max(1), image.height().max(1));
    let side = width.min(height);
    let square = image.crop_imm((width - side) / 2, (height - side) / 2, side, side);
    let resized = if side == size {
        square
    } else {
        square.resize_exact(size, size, FilterType::Triangle)
    };
    let plane = (size * size) as usize;
    if channels == 1 {
        resized.to_luma8().into_raw()
    } else {
        let rgb = resized.to_rgb8();
        let mut chw = vec![0u8; plane * 3];
        for (i, pixel) in rgb.pixels().enumerate() {
            chw[i] = pixel[0];
            chw[plane + i] = pixel[1];
            chw[2 * plane + i] = pixel[2];
        }
        chw
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, ImageBuffer, Luma, Rgb};

    fn png_bytes(width: u32, height: u32) -> Vec<u8> {
        let img = ImageBuffer::from_fn(width, height, |x, _| Rgb([x as u8, 10, 200]));
        let mut out = Vec::new();
        DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    fn grey_png(width: u32, height: u32) -> Vec<u8> {
        let img = GrayImage::from_pixel(width, height, Luma([90]));
        let mut out = Vec::new();
        DynamicImage::ImageLuma8(img)
            .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn decodes_and_lays_out_channels_first() {
        let image = decode_image(&png_bytes(40, 20), 1 << 20).unwrap();
        let chw = to_chw_u8(&image, 10, 3);
        assert_eq!(chw.len(), 300);
        assert!(chw[100..200].iter().all(|&g| g == 10));
        assert!(chw[200..].iter().all(|&b| b == 200));
    }

    #[test]
    fn the_centre_square_is_what_is_kept() {
        // Columns 0..10 dark, 10..30 bright, 30..40 dark: the centre 20×20
        // square is all bright.
        let img = GrayImage::from_fn(40, 20, |x, _| {
            Luma([if (10..30).contains(&x) { 250 } else { 5 }])
        });
        let chw = to_chw_u8(&DynamicImage::ImageLuma8(img), 20, 1);
        assert!(chw.iter().all(|&p| p == 250));
    }

    #[test]
    fn refuses_images_over_the_pixel_limit() {
        let err = decode_image(&png_bytes(100, 100), 5_000).unwrap_err();
        assert!(err.contains("more than the limit"), "{err}");
    }

    #[test]
    fn refuses_truncated_images() {
        let bytes = png_bytes(64, 64);
        assert!(decode_image(&bytes[..bytes.len() / 2], 1 << 20).is_err());
    }

    #[test]
    fn strips_are_refused_by_their_aspect_ratio_before_decoding() {
        for (width, height) in [(40_000_000, 1), (1, 40_000_000), (5_000, 2), (2, 5_000)] {
            let err = decode_image(&grey_png(width, height), 50_000_000).unwrap_err();
            assert!(err.contains("100:1"), "{width}×{height}: {err}");
        }
        assert!(decode_image(&grey_png(1_000, 10), 50_000_000).is_ok());
    }

    #[test]
    fn elongated_images_within_the_ratio_resize_without_growing() {
        // 100:1 and 1:100 are allowed; their 28-px crops come from a 30-px square.
        for (width, height) in [(3_000, 30), (30, 3_000)] {
            let image = decode_image(&grey_png(width, height), 50_000_000).unwrap();
            let chw = to_chw_u8(&image, 28, 3);
            assert_eq!(chw.len(), 3 * 28 * 28);
            assert!(chw.iter().all(|&p| p == 90));
        }
    }

    #[test]
    fn a_decode_larger_than_the_budget_is_refused() {
        let budget: &'static DecodeBudget = Box::leak(Box::new(DecodeBudget::new(4 << 20)));
        assert!(budget.reserve(5 << 20).is_err());
        let first = budget.reserve(3 << 20).unwrap();
        // A second reservation waits for the first to drop.
        let waiter = std::thread::spawn(move || budget.reserve(2 << 20).map(|_| ()));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiter.is_finished());
        drop(first);
        waiter.join().unwrap().unwrap();
        assert_eq!(*budget.in_use.lock().unwrap(), 0);
    }
}
