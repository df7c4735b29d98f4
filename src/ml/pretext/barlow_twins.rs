//! Barlow Twins (Zbontar et al., ICML 2021): two random views of every image
//! (SimCLR's augmentations) go through the trunk and a projector MLP; the
//! cross-correlation matrix of the two views' batch-standardised embeddings
//! is pushed towards the identity: each dimension agrees across the views
//! (diagonal 1) and carries different information from the others
//! (off-diagonal 0). Like VICReg it needs no negatives and no momentum
//! encoder. The encoder keeps the trunk, not the projector.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::simclr::ViewAugmentation;
use super::vicreg::off_diagonal;
use crate::validation::{FieldChecker, FieldError};

/// Barlow Twins' settings as sent in a pretrain job's `config`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BarlowTwinsConfigRequest {
    pub redundancy_weight: Option<f64>,
    pub projector_dim: Option<i64>,
    pub min_crop_scale: Option<f64>,
    pub color_jitter: Option<f64>,
}

/// The fields of [`BarlowTwinsConfigRequest`], as the API names them.
pub const FIELDS: &[&str] = &[
    "redundancy_weight",
    "projector_dim",
    "min_crop_scale",
    "color_jitter",
];

/// Barlow Twins' settings, every default filled in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BarlowTwinsConfig {
    /// λ, the weight of the off-diagonal (redundancy) term (the paper's 0.0051).
    pub redundancy_weight: f64,
    /// Width of the projector's three layers (the paper's 8192; 2048 here).
    pub projector_dim: i64,
    /// Smallest area fraction of a random resized crop.
    pub min_crop_scale: f64,
    /// Colour jitter strength.
    pub color_jitter: f64,
}

/// Batch statistics need a few images.
pub const DEFAULT_BATCH_SIZE: i64 = 128;
/// The smallest batch whose standardisation means something.
pub const MIN_BATCH_SIZE: i64 = 8;

impl BarlowTwinsConfigRequest {
    /// Fills defaults for `image_size` pixels (small images get milder
    /// crops and colour jitter, as for SimCLR) and validates.
    pub fn resolve(self, image_size: i64) -> Result<BarlowTwinsConfig, Vec<FieldError>> {
        let mut c = FieldChecker::new();
        let views =
            ViewAugmentation::resolve(&mut c, (self.min_crop_scale, self.color_jitter), image_size);
        let config = BarlowTwinsConfig {
            redundancy_weight: c.float(
                "redundancy_weight",
                self.redundancy_weight,
                0.0051,
                0.0,
                10.0,
                false,
            ),
            projector_dim: c.int("projector_dim", self.projector_dim, 2048, 8, 16384),
            min_crop_scale: views.min_crop_scale,
            color_jitter: views.color_jitter,
        };
        c.finish(config)
    }
}

impl BarlowTwinsConfig {
    /// How views are drawn.
    pub fn augmentation(&self) -> ViewAugmentation {
        ViewAugmentation::new(self.min_crop_scale, self.color_jitter)
    }
}

/// Barlow Twins' loss over embeddings `[2B, E]` where rows `i` and `i + B`
/// are two views of one image, divided by `E` so that its scale does not
/// grow with the projector's width.
pub fn barlow_twins_loss(embeddings: &Tensor, redundancy_weight: f64) -> Tensor {
    let embeddings = embeddings.to_kind(Kind::Float);
    let half = embeddings.size()[0] / 2;
    let dim = embeddings.size()[1] as f64;
    let standardise = |x: &Tensor| {
        let mean = x.mean_dim(&[0i64][..], true, Kind::Float);
        let std = x.std_dim(&[0i64][..], false, true) + 1e-5;
        (x - mean) / std
    };
    let a = standardise(&embeddings.narrow(0, 0, half));
    let b = standardise(&embeddings.narrow(0, half, half));
    let correlation = a.transpose(0, 1).matmul(&b) / half as f64;
    let on_diagonal = (correlation.diagonal(0, 0, 1) - 1.0)
        .square()
        .sum(Kind::Float);
    let off = off_diagonal(&correlation).square().sum(Kind::Float);
    (on_diagonal + off * redundancy_weight) / dim
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreeing_decorrelated_views_cost_less_than_unrelated_ones() {
        tch::manual_seed(1);
        let spread = Tensor::randn([256, 8], (Kind::Float, tch::Device::Cpu));
        let agreeing = Tensor::cat(&[&spread, &spread], 0);
        let unrelated = Tensor::randn([512, 8], (Kind::Float, tch::Device::Cpu));
        let good = f64::try_from(barlow_twins_loss(&agreeing, 0.0051)).unwrap();
        let bad = f64::try_from(barlow_twins_loss(&unrelated, 0.0051)).unwrap();
        assert!(good < 0.01, "{good}");
        assert!(bad > 0.5, "{bad}");
    }
}
