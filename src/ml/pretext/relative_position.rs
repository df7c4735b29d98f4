//! Context prediction (Doersch, Gupta & Efros, ICCV 2015): a patch and one of
//! its eight neighbours, cut with gaps and jitter from a 3×3 grid, go through
//! the same trunk; a head on both feature vectors says where the neighbour
//! sits. The same shortcut remedies as the jigsaw task apply (gaps, per-patch
//! normalisation, colour dropping).

use rand::Rng;
use tch::nn;
use tch::Tensor;

use super::jigsaw::{cut_labelled_puzzles, PuzzleShape};
use super::ImageBatch;

/// The cells around the centre of a 3×3 grid, in row-major order.
const NEIGHBOURS: [usize; 8] = [0, 1, 2, 3, 5, 6, 7, 8];
const CENTRE: usize = 4;
/// Width of the joint fc layer.
const JOINT_FC: i64 = 512;

/// The eight-way position classifier over a pair of patch features.
#[derive(Debug)]
pub struct RelativePositionHead {
    joint_fc: nn::Linear,
    classifier: nn::Linear,
}

impl RelativePositionHead {
    /// Builds the head under `p`.
    pub fn new(p: &nn::Path, feature_dim: i64) -> Self {
        Self {
            joint_fc: nn::linear(
                p / "joint_fc",
                2 * feature_dim,
                JOINT_FC,
                Default::default(),
            ),
            classifier: nn::linear(p / "classifier", JOINT_FC, 8, Default::default()),
        }
    }

    /// Position logits `[B, 8]` from patch features `[2B, D]` (pairs adjacent).
    pub fn forward_t(&self, features: &Tensor, train: bool) -> Tensor {
        let batch = features.size()[0] / 2;
        features
            .view([batch, -1])
            .apply(&self.joint_fc)
            .relu()
            .dropout(0.5, train)
            .apply(&self.classifier)
    }
}

/// Pairs `[B, 2, C, t, t]` (centre first) and neighbour positions `[B]` from
/// the uint8 images of `batch`.
pub fn make_pairs(
    batch: &ImageBatch<'_>,
    shape: PuzzleShape,
    rng: &mut impl Rng,
) -> (Tensor, Tensor) {
    cut_labelled_puzzles(batch, shape, rng, |corners, rng| {
        let position = rng.gen_range(0..NEIGHBOURS.len());
        let pair = vec![corners[CENTRE], corners[NEIGHBOURS[position]]];
        (position as i64, pair)
    })
}
