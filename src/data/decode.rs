//! Decoding image bytes under memory limits, and turning an image into the
//! fixed-size CHW uint8 layout every model consumes (shorter side resized to
//! the target, then a centre crop).

use std::io::Cursor;

use image::{imageops::FilterType, DynamicImage, ImageReader, Limits};

/// Decodes an image, refusing headers that claim more than `max_pixels`.
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, String> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("unreadable: {e}"))?;
    if reader.format().is_none() {
        return Err("not a recognised image format".to_string());
    }
    let (width, height) = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("unreadable: {e}"))?
        .into_dimensions()
        .map_err(|e| format!("unreadable header: {e}"))?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(format!(
            "image is {width}×{height} pixels, more than the limit of {max_pixels}"
        ));
    }
    if width == 0 || height == 0 {
        return Err("image has no pixels".to_string());
    }
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(16).max(1 << 20));
    let mut reader = reader;
    reader.limits(limits);
    reader.decode().map_err(|e| format!("corrupt image: {e}"))
}

/// Whether the image has a single (grey) colour channel.
pub fn is_grayscale(image: &DynamicImage) -> bool {
    !image.color().has_color()
}

/// Resizes the shorter side to `size`, centre-crops to `size`×`size`, converts
/// to `channels` (1: grey, 3: RGB) and lays the pixels out as CHW.
pub fn to_chw_u8(image: &DynamicImage, size: u32, channels: u8) -> Vec<u8> {
    let (width, height) = (image.width().max(1), image.height().max(1));
    let scale = size as f64 / width.min(height) as f64;
    let new_w = ((width as f64 * scale).round() as u32).max(size);
    let new_h = ((height as f64 * scale).round() as u32).max(size);
    let resized = if new_w == width && new_h == height {
        image.clone()
    } else {
        image.resize_exact(new_w, new_h, FilterType::Triangle)
    };
    let left = (new_w - size) / 2;
    let top = (new_h - size) / 2;
    let cropped = resized.crop_imm(left, top, size, size);
    let plane = (size * size) as usize;
    if channels == 1 {
        cropped.to_luma8().into_raw()
    } else {
        let rgb = cropped.to_rgb8();
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
    use image::{ImageBuffer, Rgb};

    fn png_bytes(width: u32, height: u32) -> Vec<u8> {
        let img = ImageBuffer::from_fn(width, height, |x, _| Rgb([x as u8, 10, 200]));
        let mut out = Vec::new();
        DynamicImage::ImageRgb8(img)
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
    fn refuses_images_over_the_pixel_limit() {
        let err = decode_image(&png_bytes(100, 100), 5_000).unwrap_err();
        assert!(err.contains("more than the limit"), "{err}");
    }

    #[test]
    fn refuses_truncated_images() {
        let bytes = png_bytes(64, 64);
        assert!(decode_image(&bytes[..bytes.len() / 2], 1 << 20).is_err());
    }
}
