//! Loads a stored dataset into memory as one uint8 tensor `[N, C, S, S]` at the
//! training resolution, decoding images in parallel on the rayon pool, so
//! epochs never decode files again.

use std::path::Path;

use anyhow::Context;
use rayon::prelude::*;
use tch::{Kind, Tensor};

use super::decode::{decode_image, to_chw_u8};
use super::manifest::Manifest;

/// A dataset's images as one tensor, with their labels.
pub struct ImageTensorSet {
    /// `[N, C, S, S]`, uint8, on the CPU.
    pub images: Tensor,
    /// One label per image; `-1` when unlabelled.
    pub labels: Vec<i64>,
    /// Class names (empty when unlabelled).
    pub classes: Vec<String>,
}

impl ImageTensorSet {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the set holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Per-channel mean and standard deviation of the pixels, in [0, 1] units.
    pub fn channel_stats(&self) -> (Vec<f64>, Vec<f64>) {
        let pixels = self.images.to_kind(Kind::Float) / 255.0;
        let mean = pixels.mean_dim(&[0i64, 2, 3][..], false, Kind::Float);
        let std = pixels.std_dim(&[0i64, 2, 3][..], false, false);
        let to_vec = |t: Tensor| -> Vec<f64> {
            Vec::<f64>::try_from(t.to_kind(Kind::Double)).unwrap_or_default()
        };
        let std = to_vec(std).into_iter().map(|s| s.max(1e-3)).collect();
        (to_vec(mean), std)
    }
}

/// Decodes every image of the dataset stored in `dataset_dir` to `size`×`size`
/// with `channels` channels.
pub fn load_image_set(
    dataset_dir: &Path,
    size: u32,
    channels: u8,
    max_pixels: u64,
) -> anyhow::Result<ImageTensorSet> {
    let manifest = Manifest::read(dataset_dir)?;
    let decoded: Vec<Vec<u8>> = manifest
        .entries
        .par_iter()
        .map(|entry| {
            let path = dataset_dir.join(&entry.file);
            let bytes = std::fs::read(&path)
                .with_context(|| format!("Failed to read {}", path.display()))?;
            let image = decode_image(&bytes, max_pixels)
                .map_err(|e| anyhow::anyhow!("{}: {e}", entry.source))?;
            Ok(to_chw_u8(&image, size, channels))
        })
        .collect::<anyhow::Result<_>>()?;
    let n = decoded.len() as i64;
    let flat: Vec<u8> = decoded.concat();
    let images = Tensor::from_slice(&flat).view([n, channels as i64, size as i64, size as i64]);
    let labels = manifest
        .entries
        .iter()
        .map(|e| e.label.map_or(-1, |l| l as i64))
        .collect();
    Ok(ImageTensorSet {
        images,
        labels,
        classes: manifest.classes,
    })
}

/// Turns a batch of uint8 images into normalised floats on `device`.
pub fn normalise(images: &Tensor, mean: &[f64], std: &[f64], device: tch::Device) -> Tensor {
    let channels = mean.len() as i64;
    let mean = Tensor::from_slice(mean)
        .to_kind(Kind::Float)
        .view([1, channels, 1, 1])
        .to_device(device);
    let std = Tensor::from_slice(std)
        .to_kind(Kind::Float)
        .view([1, channels, 1, 1])
        .to_device(device);
    (images.to_device(device).to_kind(Kind::Float) / 255.0 - mean) / std
}
