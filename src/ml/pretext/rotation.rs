//! RotNet (Gidaris et al., ICLR 2018): every image is shown at 0°, 90°, 180°
//! and 270°, and a linear head on the trunk's features says which. To tell,
//! the network must know which way up objects go.

use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::validation::FieldError;

/// Rotation has no settings of its own: every image is shown at all four
/// quarter turns.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationConfigRequest {}

/// The fields of [`RotationConfigRequest`]: none.
pub const FIELDS: &[&str] = &[];

/// Rotation's settings (none).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RotationConfig {}

impl RotationConfigRequest {
    /// Nothing to fill in or check.
    pub fn resolve(self, _image_size: i64) -> Result<RotationConfig, Vec<FieldError>> {
        Ok(RotationConfig {})
    }
}

/// The four-way rotation classifier.
#[derive(Debug)]
pub struct RotationHead {
    classifier: nn::Linear,
}

impl RotationHead {
    /// Builds the head under `p`.
    pub fn new(p: &nn::Path, feature_dim: i64) -> Self {
        Self {
            classifier: nn::linear(p / "classifier", feature_dim, 4, Default::default()),
        }
    }

    /// Rotation logits `[4B, 4]` from trunk features `[4B, D]`.
    pub fn forward(&self, features: &Tensor) -> Tensor {
        self.classifier.forward(features)
    }
}

/// Which images of a batch of `batch` are flipped left-right before rotating.
pub fn draw_flips(batch: usize, rng: &mut impl Rng) -> Vec<bool> {
    (0..batch).map(|_| rng.gen_bool(0.5)).collect()
}

/// Every image of a normalised batch `[B, C, S, S]` (flipped left-right
/// first where `flips` says so) in its four rotations: inputs `[4B, C, S, S]`
/// and labels `[4B]` (quarter turns).
pub fn make_rotations(images: &Tensor, flips: &Tensor) -> (Tensor, Tensor) {
    let batch = images.size()[0];
    let flips = flips.to_device(images.device()).view([batch, 1, 1, 1]);
    let images = images.flip([3]).where_self(&flips, images);
    let rotated: Vec<Tensor> = (0..4).map(|k| images.rot90(k, [2, 3])).collect();
    let labels = Tensor::arange(4, (Kind::Int64, images.device()))
        .repeat_interleave_self_int(batch, 0, None);
    (Tensor::cat(&rotated, 0), labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotations_come_in_quarter_turns_with_their_labels() {
        let images =
            Tensor::arange(2 * 3 * 4 * 4, (Kind::Float, tch::Device::Cpu)).view([2, 3, 4, 4]);
        let flips = Tensor::from_slice(&[true, false]);
        let (inputs, labels) = make_rotations(&images, &flips);
        assert_eq!(inputs.size(), [8, 3, 4, 4]);
        assert_eq!(
            Vec::<i64>::try_from(labels).unwrap(),
            [0, 0, 1, 1, 2, 2, 3, 3]
        );
        // The first image is flipped, the second is not.
        assert!(inputs.get(0).equal(&images.get(0).flip([2])));
        assert!(inputs.get(1).equal(&images.get(1)));
        // Two quarter turns equal a half turn of the unrotated (flipped) image.
        let half = inputs.get(4);
        let twice = inputs.get(0).rot90(2, [1, 2]);
        assert!(half.allclose(&twice, 0.0, 0.0, false));
    }
}
