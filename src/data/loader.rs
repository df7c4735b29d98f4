//! Loads a stored dataset into memory as one uint8 tensor `[N, C, S, S]` at the
//! training resolution. The first load at a given size and channel count
//! decodes every image in parallel on the rayon pool straight into that
//! tensor (its N·C·S² bytes are allocated once and never copied) and keeps
//! the result in `cache/<size>x<channels>.u8` inside the dataset folder;
//! later loads map that file instead of decoding again.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use tch::{Kind, Tensor};

use super::decode::{decode_image_file, to_chw_u8};
use super::labels::LabelSet;
use super::manifest::Manifest;
use crate::storage::write_atomic_with;

/// A dataset's images as one tensor, with their labels.
pub struct ImageTensorSet {
    /// `[N, C, S, S]`, uint8, contiguous, on the CPU.
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

    /// Takes the classes and per-image labels of `set` (a version of the
    /// dataset's labels sent after its upload) instead of the archive's.
    pub fn relabel(&mut self, set: &LabelSet) -> anyhow::Result<()> {
        anyhow::ensure!(
            set.labels.len() == self.len(),
            "the labels cover {} images, the dataset holds {}",
            set.labels.len(),
            self.len()
        );
        self.labels = set
            .labels
            .iter()
            .map(|label| label.map_or(-1, i64::from))
            .collect();
        self.classes = set.classes.clone();
        Ok(())
    }

    /// `[C, S, S]` of one image.
    pub fn image_shape(&self) -> [usize; 3] {
        let size = self.images.size();
        [size[1] as usize, size[2] as usize, size[3] as usize]
    }

    /// The pixels of every image, CHW after CHW.
    pub fn pixels(&self) -> &[u8] {
        let numel = self.images.numel();
        if numel == 0 {
            return &[];
        }
        assert!(
            self.images.kind() == Kind::Uint8 && self.images.is_contiguous(),
            "images must be a contiguous uint8 tensor"
        );
        // SAFETY: the tensor is a contiguous uint8 CPU tensor owned by `self`
        // and never written to, so its storage holds `numel` initialised bytes
        // for as long as `self` is borrowed.
        unsafe { std::slice::from_raw_parts(self.images.data_ptr() as *const u8, numel) }
    }

    /// Per-channel mean and standard deviation of the pixels, in [0, 1] units.
    pub fn channel_stats(&self) -> (Vec<f64>, Vec<f64>) {
        let [channels, height, width] = self.image_shape();
        let plane = height * width;
        let sums = self
            .pixels()
            .par_chunks(plane.max(1))
            .enumerate()
            .fold(
                || vec![(0u64, 0u64); channels],
                |mut acc, (i, chunk)| {
                    let (sum, squares) = chunk.iter().fold((0u64, 0u64), |(s, q), &p| {
                        (s + u64::from(p), q + u64::from(p) * u64::from(p))
                    });
                    acc[i % channels].0 += sum;
                    acc[i % channels].1 += squares;
                    acc
                },
            )
            .reduce(
                || vec![(0u64, 0u64); channels],
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(b) {
                        x.0 += y.0;
                        x.1 += y.1;
                    }
                    a
                },
            );
        let count = (self.len() * plane).max(1) as f64;
        sums.into_iter()
            .map(|(sum, squares)| {
                let mean = sum as f64 / 255.0 / count;
                let variance = (squares as f64 / 65025.0 / count - mean * mean).max(0.0);
                (mean, variance.sqrt().max(1e-3))
            })
            .unzip()
    }
}

/// Magic bytes and version of a decoded-images cache file.
const CACHE_MAGIC: &[u8; 8] = b"PXTDEC01";
/// Magic, then image count, channels and side as little-endian u64s.
const CACHE_HEADER_LEN: usize = 8 + 3 * 8;

/// Where the decoded images of a dataset at one size and channel count live.
pub fn cache_path(dataset_dir: &Path, size: u32, channels: u8) -> PathBuf {
    dataset_dir
        .join("cache")
        .join(format!("{size}x{channels}.u8"))
}

fn cache_header(count: usize, channels: u8, size: u32) -> [u8; CACHE_HEADER_LEN] {
    let mut header = [0u8; CACHE_HEADER_LEN];
    header[..8].copy_from_slice(CACHE_MAGIC);
    header[8..16].copy_from_slice(&(count as u64).to_le_bytes());
    header[16..24].copy_from_slice(&u64::from(channels).to_le_bytes());
    header[24..32].copy_from_slice(&u64::from(size).to_le_bytes());
    header
}

/// The cached pixels of `count` images, if a whole cache file for exactly
/// this shape exists.
fn read_cache(path: &Path, count: usize, channels: u8, size: u32) -> Option<Tensor> {
    let file = fs::File::open(path).ok()?;
    // SAFETY: cache files are only ever replaced by an atomic rename, never
    // written in place, so the mapped bytes do not change under us.
    let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    let image_len = channels as usize * size as usize * size as usize;
    if map.len() != CACHE_HEADER_LEN + count * image_len
        || map[..CACHE_HEADER_LEN] != cache_header(count, channels, size)
    {
        return None;
    }
    Some(Tensor::from_slice(&map[CACHE_HEADER_LEN..]).view([
        count as i64,
        channels as i64,
        size as i64,
        size as i64,
    ]))
}

fn write_cache(path: &Path, pixels: &[u8], count: usize, channels: u8, size: u32) {
    let written = write_atomic_with(path, |tmp| {
        let mut file = fs::File::create(tmp)?;
        file.write_all(&cache_header(count, channels, size))?;
        file.write_all(pixels)?;
        file.sync_all()?;
        Ok(())
    });
    // A cache that cannot be written only costs a decode next time.
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), "decoded images not cached: {e:#}");
    }
}

/// The images of the dataset stored in `dataset_dir` at `size`×`size` with
/// `channels` channels: from the decoded cache when there is one, otherwise
/// decoded now (and cached for the next load).
pub fn load_image_set(
    dataset_dir: &Path,
    size: u32,
    channels: u8,
    max_pixels: u64,
) -> anyhow::Result<ImageTensorSet> {
    let manifest = Manifest::read(dataset_dir)?;
    let count = manifest.entries.len();
    let cache = cache_path(dataset_dir, size, channels);
    let images = match read_cache(&cache, count, channels, size) {
        Some(images) => images,
        None => {
            let images = Tensor::empty(
                [count as i64, channels as i64, size as i64, size as i64],
                (Kind::Uint8, tch::Device::Cpu),
            );
            let numel = images.numel();
            if numel > 0 {
                // SAFETY: `images` was just allocated, contiguous uint8 on the
                // CPU with `numel` bytes, and nothing else refers to it while
                // this slice lives; every byte is written before it is read.
                let pixels =
                    unsafe { std::slice::from_raw_parts_mut(images.data_ptr() as *mut u8, numel) };
                decode_all_into(pixels, dataset_dir, &manifest, size, channels, max_pixels)?;
                write_cache(&cache, pixels, count, channels, size);
            }
            images
        }
    };
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

/// Decodes every image of the manifest into `flat`, CHW after CHW: the
/// dataset's pixels are allocated once, by the caller, and never copied.
fn decode_all_into(
    flat: &mut [u8],
    dataset_dir: &Path,
    manifest: &Manifest,
    size: u32,
    channels: u8,
    max_pixels: u64,
) -> anyhow::Result<()> {
    let image_len = channels as usize * size as usize * size as usize;
    flat.par_chunks_mut(image_len.max(1))
        .zip(manifest.entries.par_iter())
        .try_for_each(|(out, entry)| {
            let path = dataset_dir.join(&entry.file);
            let image = decode_image_file(&path, max_pixels)
                .map_err(|e| anyhow::anyhow!("{}: {e}", entry.source))?;
            out.copy_from_slice(&to_chw_u8(&image, size, channels));
            Ok::<_, anyhow::Error>(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::manifest::ManifestEntry;
    use image::{DynamicImage, ImageBuffer, Rgb};

    /// A dataset folder of `count` distinct 20×12 PNGs.
    fn dataset(count: u8) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("images")).unwrap();
        let mut entries = Vec::new();
        for i in 0..count {
            let image =
                ImageBuffer::from_fn(20, 12, |x, y| Rgb([x as u8 * 9, y as u8 * 15, i * 40]));
            let file = format!("images/{i:06}.png");
            DynamicImage::ImageRgb8(image)
                .save(dir.path().join(&file))
                .unwrap();
            entries.push(ManifestEntry {
                file,
                label: Some(usize::from(i % 2)),
                source: format!("{i}.png"),
            });
        }
        Manifest {
            classes: vec!["a".into(), "b".into()],
            entries,
        }
        .write(dir.path())
        .unwrap();
        dir
    }

    #[test]
    fn a_second_load_reads_the_decoded_cache_instead_of_the_images() {
        let dir = dataset(3);
        let first = load_image_set(dir.path(), 8, 3, 1 << 20).unwrap();
        assert_eq!(first.images.size(), [3, 3, 8, 8]);
        assert!(cache_path(dir.path(), 8, 3).is_file());

        fs::remove_dir_all(dir.path().join("images")).unwrap();
        let second = load_image_set(dir.path(), 8, 3, 1 << 20).unwrap();
        assert!(second.images.equal(&first.images));
        assert_eq!(second.labels, [0, 1, 0]);
        assert_eq!(second.pixels(), first.pixels());

        // Another size or channel count is not in the cache: the images are needed again.
        assert!(load_image_set(dir.path(), 8, 1, 1 << 20).is_err());
        assert!(load_image_set(dir.path(), 10, 3, 1 << 20).is_err());
    }

    #[test]
    fn a_cache_of_another_shape_is_decoded_again() {
        let dir = dataset(2);
        let path = cache_path(dir.path(), 8, 1);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        // A truncated cache file (one image short) must not be taken as whole.
        let mut stale = cache_header(2, 1, 8).to_vec();
        stale.extend(std::iter::repeat_n(7u8, 64));
        fs::write(&path, &stale).unwrap();
        let set = load_image_set(dir.path(), 8, 1, 1 << 20).unwrap();
        assert_eq!(set.images.size(), [2, 1, 8, 8]);
        assert!(set.pixels().iter().any(|&p| p != 7));
        assert_eq!(
            fs::metadata(&path).unwrap().len() as usize,
            CACHE_HEADER_LEN + 128
        );
    }

    #[test]
    fn channel_statistics_are_per_channel_over_all_pixels() {
        let images = Tensor::from_slice(&[0u8, 255, 0, 255, 51, 51, 51, 51]).view([1, 2, 2, 2]);
        let set = ImageTensorSet {
            images,
            labels: vec![-1],
            classes: Vec::new(),
        };
        let (mean, std) = set.channel_stats();
        assert!((mean[0] - 0.5).abs() < 1e-9 && (std[0] - 0.5).abs() < 1e-9);
        assert!((mean[1] - 0.2).abs() < 1e-9 && (std[1] - 1e-3).abs() < 1e-9);
    }
}
