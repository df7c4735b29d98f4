//! SimCLR (Chen et al., ICML 2020): two random views of every image (random
//! resized crop, flip, colour jitter, grey, blur where the image is large
//! enough), a projection MLP, and the NT-Xent loss that asks each view to find
//! its sibling among all others in the batch. The encoder keeps the trunk,
//! not the projection head.

use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::validation::{FieldChecker, FieldError};

/// SimCLR's settings as sent in a pretrain job's `config`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimclrConfigRequest {
    pub temperature: Option<f64>,
    pub projection_dim: Option<i64>,
    pub min_crop_scale: Option<f64>,
    pub color_jitter: Option<f64>,
}

/// The fields of [`SimclrConfigRequest`], as the API names them.
pub const FIELDS: &[&str] = &[
    "temperature",
    "projection_dim",
    "min_crop_scale",
    "color_jitter",
];

/// SimCLR's settings, every default filled in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SimclrConfig {
    /// NT-Xent temperature.
    pub temperature: f64,
    /// Output width of the projection head.
    pub projection_dim: i64,
    /// Smallest area fraction of a random resized crop.
    pub min_crop_scale: f64,
    /// Colour jitter strength.
    pub color_jitter: f64,
}

/// SimCLR compares every view with every other view of the batch, so its
/// batches default larger than the other tasks' and hold at least two images.
pub const DEFAULT_BATCH_SIZE: i64 = 128;
/// The smallest batch with a negative for every view.
pub const MIN_BATCH_SIZE: i64 = 2;

impl SimclrConfigRequest {
    /// Fills defaults for `image_size` pixels (small images get milder
    /// crops and colour jitter) and validates.
    pub fn resolve(self, image_size: i64) -> Result<SimclrConfig, Vec<FieldError>> {
        let mut c = FieldChecker::new();
        let views =
            ViewAugmentation::resolve(&mut c, (self.min_crop_scale, self.color_jitter), image_size);
        let config = SimclrConfig {
            temperature: c.float("temperature", self.temperature, 0.5, 0.0, 10.0, true),
            projection_dim: c.int("projection_dim", self.projection_dim, 128, 8, 4096),
            min_crop_scale: views.min_crop_scale,
            color_jitter: views.color_jitter,
        };
        c.finish(config)
    }
}

impl SimclrConfig {
    /// How views are drawn.
    pub fn augmentation(&self) -> ViewAugmentation {
        ViewAugmentation::new(self.min_crop_scale, self.color_jitter)
    }
}

/// How views are drawn.
#[derive(Debug, Clone, Copy)]
pub struct ViewAugmentation {
    pub min_crop_scale: f64,
    pub color_jitter: f64,
    /// Blur is applied only to images at least this large.
    pub blur_from_size: i64,
}

impl ViewAugmentation {
    /// Views with these crops and colour jitter, blurred from 64 px up.
    pub fn new(min_crop_scale: f64, color_jitter: f64) -> Self {
        Self {
            min_crop_scale,
            color_jitter,
            blur_from_size: 64,
        }
    }

    /// The view settings of a two-view task as sent, with the defaults for
    /// `image_size` pixels: small images get milder crops and colour jitter.
    pub fn resolve(
        c: &mut FieldChecker,
        (min_crop_scale, color_jitter): (Option<f64>, Option<f64>),
        image_size: i64,
    ) -> Self {
        let small = image_size <= 64;
        Self::new(
            c.float(
                "min_crop_scale",
                min_crop_scale,
                if small { 0.2 } else { 0.08 },
                0.0,
                1.0,
                true,
            ),
            c.float(
                "color_jitter",
                color_jitter,
                if small { 0.4 } else { 0.8 },
                0.0,
                2.0,
                false,
            ),
        )
    }
}

/// The projection MLP: Linear, ReLU, Linear.
#[derive(Debug)]
pub struct ProjectionHead {
    hidden: nn::Linear,
    output: nn::Linear,
}

impl ProjectionHead {
    /// Builds the head under `p`.
    pub fn new(p: &nn::Path, feature_dim: i64, projection_dim: i64) -> Self {
        Self {
            hidden: nn::linear(p / "hidden", feature_dim, feature_dim, Default::default()),
            output: nn::linear(
                p / "output",
                feature_dim,
                projection_dim,
                Default::default(),
            ),
        }
    }

    /// Projections `[N, P]` of trunk features `[N, D]`.
    pub fn forward(&self, features: &Tensor) -> Tensor {
        self.output.forward(&self.hidden.forward(features).relu())
    }
}

/// NT-Xent over projections `[2B, P]` where rows `i` and `i + B` are two views
/// of one image. Returns the loss and the fraction of views whose nearest
/// other view is their sibling.
pub fn nt_xent(projections: &Tensor, temperature: f64) -> (Tensor, Tensor) {
    let n = projections.size()[0];
    let half = n / 2;
    let z = projections
        / projections
            .norm_scalaropt_dim(2, [1i64].as_slice(), true)
            .clamp_min(1e-8);
    let eye = Tensor::eye(n, (Kind::Float, z.device()));
    let similarities = z.matmul(&z.transpose(0, 1)) / temperature - eye * 1e9;
    let targets = (Tensor::arange(n, (Kind::Int64, z.device())) + half).remainder(n);
    let loss = similarities.cross_entropy_for_logits(&targets);
    let accuracy = similarities.accuracy_for_logits(&targets);
    (loss, accuracy)
}

/// The fraction of views `[2B, P]` (rows `i` and `i + B` siblings) whose
/// most similar other view, by cosine similarity, is their sibling: the
/// pretext accuracy of every two-view task.
pub fn sibling_accuracy(projections: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let projections = projections.to_kind(Kind::Float);
        let n = projections.size()[0];
        let z = &projections
            / projections
                .norm_scalaropt_dim(2, [1i64].as_slice(), true)
                .clamp_min(1e-8);
        let eye = Tensor::eye(n, (Kind::Float, z.device()));
        let similarities = z.matmul(&z.transpose(0, 1)) - eye * 1e9;
        let targets = (Tensor::arange(n, (Kind::Int64, z.device())) + n / 2).remainder(n);
        similarities.accuracy_for_logits(&targets)
    })
}

fn random_resized_crop(image: &Tensor, side: i64, min_scale: f64, rng: &mut impl Rng) -> Tensor {
    let area = (side * side) as f64;
    for _ in 0..10 {
        let scale = rng.gen_range(min_scale..=1.0);
        let log_ratio = rng.gen_range((3.0f64 / 4.0).ln()..=(4.0f64 / 3.0).ln());
        let ratio = log_ratio.exp();
        let w = ((area * scale * ratio).sqrt().round() as i64).max(1);
        let h = ((area * scale / ratio).sqrt().round() as i64).max(1);
        if w <= side && h <= side {
            let y = rng.gen_range(0..=side - h);
            let x = rng.gen_range(0..=side - w);
            let crop = image.narrow(1, y, h).narrow(2, x, w).unsqueeze(0);
            return crop
                .upsample_bilinear2d([side, side], false, None, None)
                .squeeze_dim(0);
        }
    }
    image.shallow_clone()
}

fn grey(image: &Tensor) -> Tensor {
    image
        .mean_dim(&[0i64][..], true, Kind::Float)
        .expand_as(image)
}

fn colour_jitter(image: &Tensor, strength: f64, rng: &mut impl Rng) -> Tensor {
    let s = 0.8 * strength;
    let mut out = image * rng.gen_range((1.0 - s).max(0.0)..=1.0 + s);
    let mean = out.mean(Kind::Float);
    out = (&out - &mean) * rng.gen_range((1.0 - s).max(0.0)..=1.0 + s) + &mean;
    if image.size()[0] == 3 {
        let g = grey(&out);
        out = (&out - &g) * rng.gen_range((1.0 - s).max(0.0)..=1.0 + s) + g;
    }
    out.clamp(0.0, 1.0)
}

fn gaussian_blur(image: &Tensor, side: i64, rng: &mut impl Rng) -> Tensor {
    let kernel = ((side / 10) | 1).max(3);
    let sigma = rng.gen_range(0.1..=2.0f64);
    let half = kernel / 2;
    let weights: Vec<f32> = (-half..=half)
        .map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp() as f32)
        .collect();
    let sum: f32 = weights.iter().sum();
    let weights: Vec<f32> = weights.iter().map(|w| w / sum).collect();
    let channels = image.size()[0];
    let k = Tensor::from_slice(&weights).to_device(image.device());
    let horizontal = k.view([1, 1, 1, kernel]).repeat([channels, 1, 1, 1]);
    let vertical = k.view([1, 1, kernel, 1]).repeat([channels, 1, 1, 1]);
    let x = image.unsqueeze(0);
    let x = x.conv2d(
        &horizontal,
        None::<Tensor>,
        [1, 1],
        [0, half],
        [1, 1],
        channels,
    );
    let x = x.conv2d(
        &vertical,
        None::<Tensor>,
        [1, 1],
        [half, 0],
        [1, 1],
        channels,
    );
    x.squeeze_dim(0)
}

/// One augmented view of a float image `[C, S, S]` in [0, 1].
fn view(image: &Tensor, augmentation: ViewAugmentation, rng: &mut impl Rng) -> Tensor {
    let side = image.size()[1];
    let mut out = random_resized_crop(image, side, augmentation.min_crop_scale, rng);
    if rng.gen_bool(0.5) {
        out = out.flip([2]);
    }
    if augmentation.color_jitter > 0.0 && rng.gen_bool(0.8) {
        out = colour_jitter(&out, augmentation.color_jitter, rng);
    }
    if out.size()[0] == 3 && rng.gen_bool(0.2) {
        out = grey(&out);
    }
    if side >= augmentation.blur_from_size && rng.gen_bool(0.5) {
        out = gaussian_blur(&out, side, rng);
    }
    out
}

/// Two views of every uint8 image `[B, C, S, S]`: `[2B, C, S, S]` floats in
/// [0, 1], first views then second views.
pub fn make_views(images: &Tensor, augmentation: ViewAugmentation, rng: &mut impl Rng) -> Tensor {
    let batch = images.size()[0];
    let pixels = images.to_kind(Kind::Float) / 255.0;
    let mut first = Vec::with_capacity(batch as usize);
    let mut second = Vec::with_capacity(batch as usize);
    for b in 0..batch {
        let image = pixels.get(b);
        first.push(view(&image, augmentation, rng));
        second.push(view(&image, augmentation, rng));
    }
    first.extend(second);
    Tensor::stack(&first, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nt_xent_is_low_when_siblings_match_and_high_when_they_do_not() {
        let base = Tensor::eye(4, (Kind::Float, tch::Device::Cpu));
        let matched = Tensor::cat(&[&base, &base], 0);
        let (loss, accuracy) = nt_xent(&matched, 0.1);
        assert!(f64::try_from(&loss).unwrap() < 0.01);
        assert_eq!(f64::try_from(&accuracy).unwrap(), 1.0);
        let shuffled = Tensor::cat(&[&base, &base.roll([1], [0])], 0);
        let (bad, _) = nt_xent(&shuffled, 0.1);
        assert!(f64::try_from(&bad).unwrap() > 5.0);
    }
}
