//! Pretext tasks: each turns a batch of unlabelled uint8 images into inputs
//! and free targets, and owns the head that sits on the shared trunk during
//! pretraining. Only the trunk survives into the encoder.
//!
//! Building a batch ([`BatchRecipe::build`]) needs only the pixels and a
//! random generator, not the network, so it runs on the CPU away from the
//! training step ([`crate::ml::prefetch`]); the step ([`PretextTask::step`])
//! then only moves the batch to the device and runs the network.

pub mod jigsaw;
pub mod relative_position;
pub mod rotation;
pub mod simclr;

use rand::Rng;
use tch::nn;
use tch::{Device, Kind, Tensor};

use crate::data::loader::normalise;
use crate::jobs::config::{Pretext, PretrainConfig};
use crate::ml::device::{channels_last, mixed_precision, to_device_async};
use jigsaw::{make_puzzles, JigsawHead, JigsawPermutationSet, PuzzleShape};
use relative_position::{make_pairs, RelativePositionHead};
use rotation::{draw_flips, make_rotations, RotationHead};
use simclr::{make_views, nt_xent, ProjectionHead, ViewAugmentation};

/// Some images of a dataset held as CHW uint8 pixels, one image after another.
#[derive(Debug, Clone, Copy)]
pub struct ImageBatch<'a> {
    /// Every image of the dataset.
    pub pixels: &'a [u8],
    /// `[C, S, S]` of one image.
    pub shape: [usize; 3],
    /// The images of the batch, in order.
    pub indices: &'a [i64],
}

impl ImageBatch<'_> {
    /// Number of images in the batch.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// The pixels of the batch's `i`-th image.
    pub fn image(&self, i: usize) -> &[u8] {
        let len = self.shape.iter().product::<usize>();
        let start = self.indices[i] as usize * len;
        &self.pixels[start..start + len]
    }

    /// The batch as one uint8 tensor `[B, C, S, S]`.
    pub fn to_tensor(&self) -> Tensor {
        let gathered: Vec<u8> = (0..self.len())
            .flat_map(|i| self.image(i).iter().copied())
            .collect();
        let [c, h, w] = self.shape.map(|d| d as i64);
        Tensor::from_slice(&gathered).view([self.len() as i64, c, h, w])
    }
}

/// A pretext task's inputs and targets for one step, built on the CPU.
#[derive(Debug)]
pub enum PretextBatch {
    /// Jigsaw puzzles `[B, T, C, t, t]` or context pairs `[B, 2, C, t, t]`
    /// (normalised floats), and their labels `[B]`.
    Tiles { tiles: Tensor, labels: Tensor },
    /// Uint8 images `[B, C, S, S]` and which of them to flip before rotating.
    Rotations { images: Tensor, flips: Tensor },
    /// Two views of every image, `[2B, C, S, S]` floats in [0, 1].
    Views { views: Tensor },
}

impl PretextBatch {
    /// Pins the batch's host memory so that copies to `device` can overlap
    /// with compute; a no-op unless `device` is a GPU.
    pub fn pinned_for(self, device: Device) -> Self {
        if !device.is_cuda() {
            return self;
        }
        match self {
            PretextBatch::Tiles { tiles, labels } => PretextBatch::Tiles {
                tiles: tiles.pin_memory(device),
                labels: labels.pin_memory(device),
            },
            PretextBatch::Rotations { images, flips } => PretextBatch::Rotations {
                images: images.pin_memory(device),
                flips: flips.pin_memory(device),
            },
            PretextBatch::Views { views } => PretextBatch::Views {
                views: views.pin_memory(device),
            },
        }
    }
}

/// What building a task's batches needs: the task's settings without its
/// head, so it can move to the thread that builds batches.
#[derive(Debug, Clone)]
pub enum BatchRecipe {
    Jigsaw {
        permutations: JigsawPermutationSet,
        shape: PuzzleShape,
    },
    Rotation,
    RelativePosition {
        shape: PuzzleShape,
    },
    Simclr {
        augmentation: ViewAugmentation,
    },
}

impl BatchRecipe {
    /// Builds one step's batch from `images`; `rng` is the step's generator,
    /// so the batch depends only on the seed and the step.
    pub fn build(&self, images: &ImageBatch<'_>, rng: &mut impl Rng) -> PretextBatch {
        match self {
            BatchRecipe::Jigsaw {
                permutations,
                shape,
            } => {
                let (tiles, labels) = make_puzzles(images, permutations, *shape, rng);
                PretextBatch::Tiles { tiles, labels }
            }
            BatchRecipe::Rotation => PretextBatch::Rotations {
                images: images.to_tensor(),
                flips: Tensor::from_slice(&draw_flips(images.len(), rng)),
            },
            BatchRecipe::RelativePosition { shape } => {
                let (tiles, labels) = make_pairs(images, *shape, rng);
                PretextBatch::Tiles { tiles, labels }
            }
            BatchRecipe::Simclr { augmentation } => PretextBatch::Views {
                views: make_views(&images.to_tensor(), *augmentation, rng),
            },
        }
    }
}

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

    /// What building this task's batches needs.
    pub fn recipe(&self) -> BatchRecipe {
        match self {
            PretextTask::Jigsaw {
                permutations,
                shape,
                ..
            } => BatchRecipe::Jigsaw {
                permutations: permutations.clone(),
                shape: *shape,
            },
            PretextTask::Rotation { .. } => BatchRecipe::Rotation,
            PretextTask::RelativePosition { shape, .. } => {
                BatchRecipe::RelativePosition { shape: *shape }
            }
            PretextTask::Simclr { augmentation, .. } => BatchRecipe::Simclr {
                augmentation: *augmentation,
            },
        }
    }

    /// One forward pass on a batch built by this task's recipe: the loss and
    /// the task's accuracy (both scalars on `device`). On a GPU the forward
    /// pass runs in bfloat16 mixed precision on channels-last inputs.
    pub fn step(
        &self,
        trunk: &nn::FuncT<'static>,
        batch: &PretextBatch,
        input: (&[f64], &[f64]),
        device: Device,
    ) -> (Tensor, Tensor) {
        let features = |xs: &Tensor| nn::ModuleT::forward_t(trunk, &channels_last(xs), true);
        mixed_precision(device, || match (self, batch) {
            (PretextTask::Jigsaw { head, .. }, PretextBatch::Tiles { tiles, labels }) => {
                let tiles = to_device_async(tiles, device);
                let labels = to_device_async(labels, device);
                let d = tiles.size();
                let logits = head.forward_t(
                    &features(&tiles.view([d[0] * d[1], d[2], d[3], d[4]])),
                    true,
                );
                losses(&logits, &labels)
            }
            (PretextTask::Rotation { head }, PretextBatch::Rotations { images, flips }) => {
                let xs = normalise(&to_device_async(images, device), input.0, input.1, device);
                let (rotated, labels) = make_rotations(&xs, &to_device_async(flips, device));
                losses(&head.forward(&features(&rotated)), &labels)
            }
            (
                PretextTask::RelativePosition { head, .. },
                PretextBatch::Tiles {
                    tiles: pairs,
                    labels,
                },
            ) => {
                let pairs = to_device_async(pairs, device);
                let labels = to_device_async(labels, device);
                let d = pairs.size();
                let logits =
                    head.forward_t(&features(&pairs.view([d[0] * 2, d[2], d[3], d[4]])), true);
                losses(&logits, &labels)
            }
            (
                PretextTask::Simclr {
                    head, temperature, ..
                },
                PretextBatch::Views { views },
            ) => {
                let xs =
                    normalise_floats(&to_device_async(views, device), input.0, input.1, device);
                let (loss, accuracy) = nt_xent(&head.forward(&features(&xs)), *temperature);
                (loss.to_kind(Kind::Float), accuracy)
            }
            _ => unreachable!("a batch is always built by its own task's recipe"),
        })
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

/// Cross-entropy and accuracy of logits (in float32, whatever precision the
/// forward pass ran in).
fn losses(logits: &Tensor, labels: &Tensor) -> (Tensor, Tensor) {
    let logits = logits.to_kind(Kind::Float);
    (
        logits.cross_entropy_for_logits(labels),
        logits.accuracy_for_logits(labels),
    )
}
