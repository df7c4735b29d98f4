//! Context prediction (Doersch, Gupta & Efros, ICCV 2015): a patch and one of
//! its eight neighbours, cut with gaps and jitter from a 3×3 grid, go through
//! the same trunk; a head on both feature vectors says where the neighbour
//! sits. The same shortcut remedies as the jigsaw task apply (gaps, per-patch
//! normalisation, colour dropping).

use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::nn;
use tch::Tensor;

use super::jigsaw::{cut_labelled_puzzles, resolve_tile_fields, PuzzleShape};
use super::ImageBatch;
use crate::validation::{FieldChecker, FieldError};

/// Context prediction's settings as sent in a pretrain job's `config`; its
/// grid is always 3×3 (a centre and its eight neighbours).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelativePositionConfigRequest {
    pub tile_size: Option<i64>,
    pub grayscale_probability: Option<f64>,
    pub channel_jitter: Option<f64>,
}

/// The fields of [`RelativePositionConfigRequest`], as the API names them.
pub const FIELDS: &[&str] = &["tile_size", "grayscale_probability", "channel_jitter"];

/// Context prediction's settings, every default filled in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RelativePositionConfig {
    /// Always 3.
    pub grid: i64,
    pub tile_size: i64,
    pub grayscale_probability: f64,
    pub channel_jitter: f64,
}

impl RelativePositionConfigRequest {
    /// Fills defaults for `image_size` pixels and validates.
    pub fn resolve(self, image_size: i64) -> Result<RelativePositionConfig, Vec<FieldError>> {
        let mut c = FieldChecker::new();
        let shape = resolve_tile_fields(
            &mut c,
            3,
            image_size,
            self.tile_size,
            self.grayscale_probability,
            self.channel_jitter,
        );
        c.finish(RelativePositionConfig {
            grid: shape.grid,
            tile_size: shape.tile_size,
            grayscale_probability: shape.grayscale_probability,
            channel_jitter: shape.channel_jitter,
        })
    }
}

impl RelativePositionConfig {
    /// How patch pairs are cut.
    pub fn shape(&self) -> PuzzleShape {
        PuzzleShape {
            grid: self.grid,
            tile_size: self.tile_size,
            grayscale_probability: self.grayscale_probability,
            channel_jitter: self.channel_jitter,
        }
    }
}

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
