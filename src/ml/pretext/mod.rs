//! Pretext tasks: each turns a batch of unlabelled uint8 images into inputs
//! and free targets, and owns the head that sits on the shared trunk during
//! pretraining. Only the trunk survives into the encoder.

pub mod jigsaw;
pub mod relative_position;
pub mod rotation;
pub mod simclr;

use rand::Rng;
use tch::nn;
use tch::{Device, Tensor};

use crate::data::loader::normalise;
use crate::jobs::config::{Pretext, PretrainConfig};
use jigsaw::{make_puzzles, JigsawHead, JigsawPermutationSet, PuzzleShape};
use relative_position::{make_pairs, RelativePositionHead};
use rotation::{make_rotations, RotationHead};
use simclr::{make_views, nt_xent, ProjectionHead, ViewAugmentation};

/// Name of the VarStore sub-path holding the pretext head.
pub const HEAD_PATH: &str = "head";

/// A pretext task with its head.
#[derive(Debug)]
pub enum PretextTask {
    Jigsaw {
        head: JigsawHead,
        permutations: JigsawPermutationSet,
        permutation_seed: i64,
        shape: PuzzleShape,
    },
    Rotation {
        head: RotationHead,
    },
    RelativePosition {
        head: RelativePositionHead,
        shape: PuzzleShape,
    },
    Simclr {
        head: ProjectionHead,
        temperature: f64,
        augmentation: ViewAugmentation,
    },
}

/// The tile geometry and colour remedies of the tile-based tasks.
fn puzzle_shape(config: &PretrainConfig) -> PuzzleShape {
    PuzzleShape {
        grid: config.grid.unwrap_or(3),
        tile_size: config.tile_size.unwrap_or(4),
        grayscale_probability: config.grayscale_probability.unwrap_or(0.0),
        channel_jitter: config.channel_jitter.unwrap_or(0.0),
    }
}

impl PretextTask {
    /// Builds the task's head under `p` for a trunk of `feature_dim` features.
    pub fn build(p: &nn::Path, config: &PretrainConfig, feature_dim: i64) -> Self {
        match config.pretext {
            Pretext::Jigsaw => {
                let permutations = JigsawPermutationSet::generate(
                    config.grid.unwrap_or(3),
                    config.num_permutations.unwrap_or(100) as usize,
                    config.permutation_seed.unwrap_or(1) as u64,
                );
                let head = JigsawHead::new(
                    p,
                    feature_dim,
                    permutations.tiles(),
                    permutations.permutations.len() as i64,
                );
                PretextTask::Jigsaw {
                    head,
                    permutations,
                    permutation_seed: config.permutation_seed.unwrap_or(1),
                    shape: puzzle_shape(config),
                }
            }
            Pretext::Rotation => PretextTask::Rotation {
                head: RotationHead::new(p, feature_dim),
            },
            Pretext::RelativePosition => PretextTask::RelativePosition {
                head: RelativePositionHead::new(p, feature_dim),
                shape: puzzle_shape(config),
            },
            Pretext::Simclr => PretextTask::Simclr {
                head: ProjectionHead::new(p, feature_dim, config.projection_dim.unwrap_or(128)),
                temperature: config.temperature.unwrap_or(0.5),
                augmentation: ViewAugmentation {
                    min_crop_scale: config.min_crop_scale.unwrap_or(0.2),
                    color_jitter: config.color_jitter.unwrap_or(0.4),
                    blur_from_size: 64,
                },
            },
        }
    }

    /// One forward pass on uint8 images `[B, C, S, S]`: the loss and the
    /// task's accuracy (both scalars on `device`).
    pub fn step(
        &self,
        trunk: &nn::FuncT<'static>,
        images: &Tensor,
        input: (&[f64], &[f64]),
        device: Device,
        rng: &mut impl Rng,
    ) -> (Tensor, Tensor) {
        let features = |xs: &Tensor| nn::ModuleT::forward_t(trunk, xs, true);
        match self {
            PretextTask::Jigsaw {
                head,
                permutations,
                shape,
                ..
            } => {
                let (tiles, labels) = make_puzzles(images, permutations, *shape, rng);
                let (tiles, labels) = (tiles.to_device(device), labels.to_device(device));
                let d = tiles.size();
                let logits = head.forward_t(
                    &features(&tiles.view([d[0] * d[1], d[2], d[3], d[4]])),
                    true,
                );
                (
                    logits.cross_entropy_for_logits(&labels),
                    logits.accuracy_for_logits(&labels),
                )
            }
            PretextTask::Rotation { head } => {
                let xs = normalise(images, input.0, input.1, device);
                let (rotated, labels) = make_rotations(&xs, rng);
                let logits = head.forward(&features(&rotated));
                (
                    logits.cross_entropy_for_logits(&labels),
                    logits.accuracy_for_logits(&labels),
                )
            }
            PretextTask::RelativePosition { head, shape } => {
                let (pairs, labels) = make_pairs(images, *shape, rng);
                let (pairs, labels) = (pairs.to_device(device), labels.to_device(device));
                let d = pairs.size();
                let logits =
                    head.forward_t(&features(&pairs.view([d[0] * 2, d[2], d[3], d[4]])), true);
                (
                    logits.cross_entropy_for_logits(&labels),
                    logits.accuracy_for_logits(&labels),
                )
            }
            PretextTask::Simclr {
                head,
                temperature,
                augmentation,
            } => {
                let views = make_views(images, *augmentation, rng);
                let xs = normalise_floats(&views, input.0, input.1, device);
                nt_xent(&head.forward(&features(&xs)), *temperature)
            }
        }
    }

    /// Accuracy of guessing.
    pub fn chance_accuracy(&self, batch_size: usize) -> f64 {
        match self {
            PretextTask::Jigsaw { permutations, .. } => {
                1.0 / permutations.permutations.len() as f64
            }
            PretextTask::Rotation { .. } => 0.25,
            PretextTask::RelativePosition { .. } => 0.125,
            PretextTask::Simclr { .. } => 1.0 / (2 * batch_size).saturating_sub(1).max(1) as f64,
        }
    }

    /// What the encoder must remember of its task (stored on the model).
    pub fn describe(&self) -> serde_json::Value {
        match self {
            PretextTask::Jigsaw {
                permutations,
                permutation_seed,
                shape,
                ..
            } => serde_json::json!({
                "grid": shape.grid,
                "permutation_seed": permutation_seed,
                "tile_size": shape.tile_size,
                "num_permutations": permutations.permutations.len(),
                "min_hamming_distance": permutations.minimum_distance(),
                "permutations": permutations.permutations,
            }),
            PretextTask::Rotation { .. } => serde_json::json!({ "rotations": [0, 90, 180, 270] }),
            PretextTask::RelativePosition { shape, .. } => serde_json::json!({
                "grid": shape.grid,
                "tile_size": shape.tile_size,
            }),
            PretextTask::Simclr {
                temperature,
                augmentation,
                ..
            } => serde_json::json!({
                "temperature": temperature,
                "min_crop_scale": augmentation.min_crop_scale,
                "color_jitter": augmentation.color_jitter,
            }),
        }
    }
}

/// Normalises float images in [0, 1] with per-channel mean and std.
fn normalise_floats(images: &Tensor, mean: &[f64], std: &[f64], device: Device) -> Tensor {
    normalise(&(images.to_device(device) * 255.0), mean, std, device)
}
