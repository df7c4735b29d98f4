//! VICReg (Bardes, Ponce & LeCun, ICLR 2022): two random views of every
//! image (SimCLR's augmentations) go through the trunk and an expander MLP,
//! and three terms shape the expanded embeddings: invariance (the two views'
//! embeddings agree, mean squared error), variance (every dimension keeps a
//! standard deviation of at least 1 across the batch, a hinge) and
//! covariance (dimensions are decorrelated). No negatives, no momentum
//! encoder: it learns from small batches, which suits a CPU. The encoder
//! keeps the trunk, not the expander.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, ModuleT};
use tch::{Kind, Tensor};

use super::simclr::ViewAugmentation;
use crate::validation::{FieldChecker, FieldError};

/// VICReg's settings as sent in a pretrain job's `config`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VicregConfigRequest {
    pub invariance_weight: Option<f64>,
    pub variance_weight: Option<f64>,
    pub covariance_weight: Option<f64>,
    pub expander_dim: Option<i64>,
    pub min_crop_scale: Option<f64>,
    pub color_jitter: Option<f64>,
}

/// The fields of [`VicregConfigRequest`], as the API names them.
pub const FIELDS: &[&str] = &[
    "invariance_weight",
    "variance_weight",
    "covariance_weight",
    "expander_dim",
    "min_crop_scale",
    "color_jitter",
];

/// VICReg's settings, every default filled in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VicregConfig {
    /// λ, the weight of the invariance term (the paper's 25).
    pub invariance_weight: f64,
    /// μ, the weight of the variance term (25).
    pub variance_weight: f64,
    /// ν, the weight of the covariance term (1).
    pub covariance_weight: f64,
    /// Width of the expander's three layers (the paper's 8192; 2048 here,
    /// which costs little beside a small trunk).
    pub expander_dim: i64,
    /// Smallest area fraction of a random resized crop.
    pub min_crop_scale: f64,
    /// Colour jitter strength.
    pub color_jitter: f64,
}

/// Batch statistics need a few images; the paper trains with thousands.
pub const DEFAULT_BATCH_SIZE: i64 = 128;
/// The smallest batch whose variance and covariance mean something.
pub const MIN_BATCH_SIZE: i64 = 8;

impl VicregConfigRequest {
    /// Fills defaults for `image_size` pixels (small images get milder
    /// crops and colour jitter, as for SimCLR) and validates.
    pub fn resolve(self, image_size: i64) -> Result<VicregConfig, Vec<FieldError>> {
        let mut c = FieldChecker::new();
        let views =
            ViewAugmentation::resolve(&mut c, (self.min_crop_scale, self.color_jitter), image_size);
        let weight = |c: &mut FieldChecker, field, value, default| {
            c.float(field, value, default, 0.0, 1000.0, false)
        };
        let config = VicregConfig {
            invariance_weight: weight(&mut c, "invariance_weight", self.invariance_weight, 25.0),
            variance_weight: weight(&mut c, "variance_weight", self.variance_weight, 25.0),
            covariance_weight: weight(&mut c, "covariance_weight", self.covariance_weight, 1.0),
            expander_dim: c.int("expander_dim", self.expander_dim, 2048, 8, 16384),
            min_crop_scale: views.min_crop_scale,
            color_jitter: views.color_jitter,
        };
        c.finish(config)
    }
}

impl VicregConfig {
    /// How views are drawn.
    pub fn augmentation(&self) -> ViewAugmentation {
        ViewAugmentation::new(self.min_crop_scale, self.color_jitter)
    }

    /// The loss's three weights.
    pub fn weights(&self) -> VicregWeights {
        VicregWeights {
            invariance: self.invariance_weight,
            variance: self.variance_weight,
            covariance: self.covariance_weight,
        }
    }
}

/// The weights of VICReg's three terms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VicregWeights {
    pub invariance: f64,
    pub variance: f64,
    pub covariance: f64,
}

/// The expander (VICReg) or projector (Barlow Twins): three linear layers,
/// the first two followed by batch norm and ReLU.
#[derive(Debug)]
pub struct Expander {
    first: (nn::Linear, nn::BatchNorm),
    second: (nn::Linear, nn::BatchNorm),
    output: nn::Linear,
}

impl Expander {
    /// Builds the expander under `p`, from `feature_dim` to `width`.
    pub fn new(p: &nn::Path, feature_dim: i64, width: i64) -> Self {
        let layer = |name: &str, from: i64| {
            (
                nn::linear(p / name / "linear", from, width, Default::default()),
                nn::batch_norm1d(p / name / "bn", width, Default::default()),
            )
        };
        Self {
            first: layer("first", feature_dim),
            second: layer("second", width),
            output: nn::linear(p / "output", width, width, Default::default()),
        }
    }

    /// Embeddings `[N, width]` of trunk features `[N, D]` (batch norm in
    /// training mode: the expander only exists while pretraining).
    pub fn forward(&self, features: &Tensor) -> Tensor {
        let hidden = |x: &Tensor, (linear, bn): &(nn::Linear, nn::BatchNorm)| {
            bn.forward_t(&linear.forward(x), true).relu()
        };
        let x = hidden(features, &self.first);
        self.output.forward(&hidden(&x, &self.second))
    }
}

/// The off-diagonal entries of a square matrix, flattened.
pub fn off_diagonal(matrix: &Tensor) -> Tensor {
    let n = matrix.size()[0];
    matrix
        .flatten(0, -1)
        .narrow(0, 0, n * n - 1)
        .view([n - 1, n + 1])
        .narrow(1, 1, n)
        .flatten(0, -1)
}

/// VICReg's loss over embeddings `[2B, E]` where rows `i` and `i + B` are
/// two views of one image.
pub fn vicreg_loss(embeddings: &Tensor, weights: VicregWeights) -> Tensor {
    let embeddings = embeddings.to_kind(Kind::Float);
    let half = embeddings.size()[0] / 2;
    let dim = embeddings.size()[1] as f64;
    let a = embeddings.narrow(0, 0, half);
    let b = embeddings.narrow(0, half, half);
    let invariance = a.mse_loss(&b, tch::Reduction::Mean);
    let variance_and_covariance = |x: &Tensor| {
        let centred = x - x.mean_dim(&[0i64][..], true, Kind::Float);
        let std = (centred.var_dim(&[0i64][..], true, false) + 1e-4).sqrt();
        let variance = (-std + 1.0).relu().mean(Kind::Float);
        let covariance = centred.transpose(0, 1).matmul(&centred) / (half - 1).max(1) as f64;
        let covariance = off_diagonal(&covariance).square().sum(Kind::Float) / dim;
        (variance, covariance)
    };
    let (variance_a, covariance_a) = variance_and_covariance(&a);
    let (variance_b, covariance_b) = variance_and_covariance(&b);
    invariance * weights.invariance
        + (variance_a + variance_b) * (weights.variance / 2.0)
        + (covariance_a + covariance_b) * weights.covariance
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAPER: VicregWeights = VicregWeights {
        invariance: 25.0,
        variance: 25.0,
        covariance: 1.0,
    };

    #[test]
    fn off_diagonal_keeps_every_entry_but_the_diagonal() {
        let m = Tensor::arange(9, (Kind::Float, tch::Device::Cpu)).view([3, 3]);
        let off: Vec<f32> = Vec::try_from(off_diagonal(&m)).unwrap();
        assert_eq!(off, vec![1.0, 2.0, 3.0, 5.0, 6.0, 7.0]);
    }

    #[test]
    fn collapsed_embeddings_cost_more_than_spread_agreeing_ones() {
        tch::manual_seed(0);
        let spread = Tensor::randn([64, 16], (Kind::Float, tch::Device::Cpu)) * 1.5;
        let agreeing = Tensor::cat(&[&spread, &spread], 0);
        let collapsed = Tensor::ones([128, 16], (Kind::Float, tch::Device::Cpu));
        let good = f64::try_from(vicreg_loss(&agreeing, PAPER)).unwrap();
        let bad = f64::try_from(vicreg_loss(&collapsed, PAPER)).unwrap();
        assert!(good < bad, "agreeing {good} against collapsed {bad}");
        let noise = Tensor::randn([128, 16], (Kind::Float, tch::Device::Cpu)) * 1.5;
        let disagreeing = f64::try_from(vicreg_loss(&noise, PAPER)).unwrap();
        assert!(
            good < disagreeing,
            "agreeing {good} against unrelated {disagreeing}"
        );
    }
}
