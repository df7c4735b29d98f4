//! RotNet (Gidaris et al., ICLR 2018): every image is shown at 0°, 90°, 180°
//! and 270°, and a linear head on the trunk's features says which. To tell,
//! the network must know which way up objects go.

use rand::Rng;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

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

/// Every image of a normalised batch `[B, C, S, S]` (randomly flipped
/// left-right first) in its four rotations: inputs `[4B, C, S, S]` and
/// labels `[4B]` (quarter turns).
pub fn make_rotations(images: &Tensor, rng: &mut impl Rng) -> (Tensor, Tensor) {
    let batch = images.size()[0];
    let flips: Vec<Tensor> = (0..batch)
        .map(|b| {
            let image = images.get(b);
            if rng.gen_bool(0.5) {
                image.flip([2])
            } else {
                image
            }
        })
        .collect();
    let images = Tensor::stack(&flips, 0);
    let rotated: Vec<Tensor> = (0..4).map(|k| images.rot90(k, [2, 3])).collect();
    let labels = Tensor::arange(4, (Kind::Int64, images.device()))
        .repeat_interleave_self_int(batch, 0, None);
    (Tensor::cat(&rotated, 0), labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn rotations_come_in_quarter_turns_with_their_labels() {
        let images =
            Tensor::arange(2 * 3 * 4 * 4, (Kind::Float, tch::Device::Cpu)).view([2, 3, 4, 4]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let (inputs, labels) = make_rotations(&images, &mut rng);
        assert_eq!(inputs.size(), [8, 3, 4, 4]);
        assert_eq!(
            Vec::<i64>::try_from(labels).unwrap(),
            [0, 0, 1, 1, 2, 2, 3, 3]
        );
        // Two quarter turns equal a half turn of the unrotated (possibly flipped) image.
        let half = inputs.get(4);
        let twice = inputs.get(0).rot90(2, [1, 2]);
        assert!(half.allclose(&twice, 0.0, 0.0, false));
    }
}
