//! Pretext tasks: each turns a batch of unlabelled uint8 images into inputs
//! and free targets, and owns the head that sits on the shared trunk during
//! pretraining. Only the trunk survives into the encoder.
//!
//! Each task's file owns its settings: the request struct with its fields'
//! defaults and validation, and the resolved config stored with the job and
//! the model. [`PretextConfig`] is their tagged union. Adding a task is one
//! new file here and one variant of [`PretextConfig`] and [`PretextTask`]
//! (the compiler then names every `match` to extend).
//!
//! Building a batch ([`BatchRecipe::build`]) needs only the pixels and a
//! random generator, not the network, so it runs on the CPU away from the
//! training step ([`crate::ml::prefetch`]); the step ([`PretextTask::step`])
//! then only moves the batch to the device and runs the network.

pub mod barlow_twins;
pub mod jigsaw;
pub mod reassembled;
pub mod relative_position;
pub mod rotation;
pub mod simclr;
pub mod vicreg;

use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::nn;
use tch::{Device, Kind, Tensor};

use crate::data::loader::normalise;
use crate::ml::device::{channels_last, mixed_precision, to_device_async};
use crate::validation::{parse_config_object, FieldChecker, FieldError};
use barlow_twins::{barlow_twins_loss, BarlowTwinsConfig, BarlowTwinsConfigRequest};
use jigsaw::{
    make_puzzles, JigsawAssembly, JigsawConfig, JigsawConfigRequest, JigsawHead,
    JigsawPermutationSet, PuzzleShape,
};
use reassembled::{make_reassembled_puzzles, ReassembledHead, ReassemblySettings};
use relative_position::{
    make_pairs, RelativePositionConfig, RelativePositionConfigRequest, RelativePositionHead,
};
use rotation::{draw_flips, make_rotations, RotationConfig, RotationConfigRequest, RotationHead};
use simclr::{
    make_views, nt_xent, sibling_accuracy, ProjectionHead, SimclrConfig, SimclrConfigRequest,
    ViewAugmentation,
};
use vicreg::{vicreg_loss, Expander, VicregConfig, VicregConfigRequest, VicregWeights};

/// A pretext task and its settings, every default filled in. Stored flat in
/// a pretrain job's config: `{"pretext": "jigsaw", "grid": 3, …}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "pretext", rename_all = "snake_case")]
pub enum PretextConfig {
    /// Noroozi & Favaro 2016: which permutation shuffled the tiles.
    Jigsaw(JigsawConfig),
    /// Gidaris et al. 2018: by how many quarter turns the image was rotated.
    Rotation(RotationConfig),
    /// Chen et al. 2020: which other view in the batch comes from the same image.
    Simclr(SimclrConfig),
    /// Doersch et al. 2015: where a patch sits relative to the centre patch.
    RelativePosition(RelativePositionConfig),
    /// Bardes et al. 2022: two views agree, with variance kept and
    /// dimensions decorrelated.
    Vicreg(VicregConfig),
    /// Zbontar et al. 2021: the two views' cross-correlation is the identity.
    BarlowTwins(BarlowTwinsConfig),
}

/// Every task's API name and the config fields it owns.
const TASKS: [(&str, &[&str]); 6] = [
    ("jigsaw", jigsaw::FIELDS),
    ("rotation", rotation::FIELDS),
    ("simclr", simclr::FIELDS),
    ("relative_position", relative_position::FIELDS),
    ("vicreg", vicreg::FIELDS),
    ("barlow_twins", barlow_twins::FIELDS),
];

/// The task a pretrain job learns when its config names none.
pub const DEFAULT_PRETEXT: &str = "jigsaw";

impl PretextConfig {
    /// The task's name in the API.
    pub fn name(&self) -> &'static str {
        match self {
            PretextConfig::Jigsaw(_) => "jigsaw",
            PretextConfig::Rotation(_) => "rotation",
            PretextConfig::Simclr(_) => "simclr",
            PretextConfig::RelativePosition(_) => "relative_position",
            PretextConfig::Vicreg(_) => "vicreg",
            PretextConfig::BarlowTwins(_) => "barlow_twins",
        }
    }

    /// Resolves the task called `name` (the default task when `None`) from
    /// the config fields that are not the job's own, for `image_size` pixels.
    /// A field of another task is named with the tasks it belongs to.
    pub fn resolve(
        name: Option<&str>,
        mut fields: serde_json::Map<String, serde_json::Value>,
        image_size: i64,
    ) -> Result<Self, Vec<FieldError>> {
        let name = name.unwrap_or(DEFAULT_PRETEXT);
        let mut c = FieldChecker::new();
        let Some(&(_, own)) = TASKS.iter().find(|(task, _)| *task == name) else {
            let names: Vec<&str> = TASKS.iter().map(|(task, _)| *task).collect();
            c.reject(
                "pretext",
                format!(
                    "unknown pretext task `{name}`; use one of {}",
                    names.join(", ")
                ),
            );
            return c.finish(PretextConfig::Rotation(RotationConfig {}));
        };
        fields.retain(|field, _| {
            let owners: Vec<&str> = TASKS
                .iter()
                .filter(|(_, fields)| fields.contains(&field.as_str()))
                .map(|(task, _)| *task)
                .collect();
            if owners.is_empty() || own.contains(&field.as_str()) {
                return true;
            }
            c.reject(
                field,
                format!(
                    "applies to {} only; remove it for pretext {name}",
                    owners.join(" and ")
                ),
            );
            false
        });
        let fields = serde_json::Value::Object(fields);
        let resolved = match name {
            "jigsaw" => parse_config_object::<JigsawConfigRequest>(fields)
                .and_then(|request| request.resolve(image_size))
                .map(PretextConfig::Jigsaw),
            "rotation" => parse_config_object::<RotationConfigRequest>(fields)
                .and_then(|request| request.resolve(image_size))
                .map(PretextConfig::Rotation),
            "simclr" => parse_config_object::<SimclrConfigRequest>(fields)
                .and_then(|request| request.resolve(image_size))
                .map(PretextConfig::Simclr),
            "vicreg" => parse_config_object::<VicregConfigRequest>(fields)
                .and_then(|request| request.resolve(image_size))
                .map(PretextConfig::Vicreg),
            "barlow_twins" => parse_config_object::<BarlowTwinsConfigRequest>(fields)
                .and_then(|request| request.resolve(image_size))
                .map(PretextConfig::BarlowTwins),
            _ => parse_config_object::<RelativePositionConfigRequest>(fields)
                .and_then(|request| request.resolve(image_size))
                .map(PretextConfig::RelativePosition),
        };
        match resolved {
            Ok(config) => c.finish(config),
            Err(errors) => {
                c.absorb(errors);
                c.finish(PretextConfig::Rotation(RotationConfig {}))
            }
        }
    }

    /// Images per step when the job names none.
    pub fn default_batch_size(&self) -> i64 {
        match self {
            PretextConfig::Simclr(_) => simclr::DEFAULT_BATCH_SIZE,
            PretextConfig::Vicreg(_) => vicreg::DEFAULT_BATCH_SIZE,
            PretextConfig::BarlowTwins(_) => barlow_twins::DEFAULT_BATCH_SIZE,
            _ => 64,
        }
    }

    /// The smallest batch the task can learn from.
    pub fn min_batch_size(&self) -> i64 {
        match self {
            PretextConfig::Simclr(_) => simclr::MIN_BATCH_SIZE,
            PretextConfig::Vicreg(_) => vicreg::MIN_BATCH_SIZE,
            PretextConfig::BarlowTwins(_) => barlow_twins::MIN_BATCH_SIZE,
            _ => 1,
        }
    }
}

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
    /// Uint8 images `[B, C, S, S]` and their labels `[B]`.
    Images { images: Tensor, labels: Tensor },
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
            PretextBatch::Images { images, labels } => PretextBatch::Images {
                images: images.pin_memory(device),
                labels: labels.pin_memory(device),
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
    /// Jigsaw puzzles reassembled into whole images.
    ReassembledJigsaw {
        permutations: JigsawPermutationSet,
        settings: ReassemblySettings,
    },
    Rotation,
    RelativePosition {
        shape: PuzzleShape,
    },
    /// Two augmented views of every image (SimCLR, VICReg, Barlow Twins).
    Views {
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
            BatchRecipe::ReassembledJigsaw {
                permutations,
                settings,
            } => {
                let (images, labels) =
                    make_reassembled_puzzles(images, permutations, *settings, rng);
                PretextBatch::Images { images, labels }
            }
            BatchRecipe::Rotation => PretextBatch::Rotations {
                images: images.to_tensor(),
                flips: Tensor::from_slice(&draw_flips(images.len(), rng)),
            },
            BatchRecipe::RelativePosition { shape } => {
                let (tiles, labels) = make_pairs(images, *shape, rng);
                PretextBatch::Tiles { tiles, labels }
            }
            BatchRecipe::Views { augmentation } => PretextBatch::Views {
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
    ReassembledJigsaw {
        head: ReassembledHead,
        permutations: JigsawPermutationSet,
        permutation_seed: i64,
        settings: ReassemblySettings,
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
    Vicreg {
        head: Expander,
        weights: VicregWeights,
        augmentation: ViewAugmentation,
    },
    BarlowTwins {
        head: Expander,
        redundancy_weight: f64,
        augmentation: ViewAugmentation,
    },
}

impl PretextTask {
    /// Builds the task's head under `p` for a trunk of `feature_dim` features.
    pub fn build(p: &nn::Path, config: &PretextConfig, feature_dim: i64) -> Self {
        match config {
            PretextConfig::Jigsaw(jigsaw) => {
                let permutations = JigsawPermutationSet::generate(
                    jigsaw.grid,
                    jigsaw.num_permutations as usize,
                    jigsaw.permutation_seed as u64,
                );
                if jigsaw.assembly == JigsawAssembly::Image {
                    // Class 0 is the image in order, never a permutation.
                    let permutations = permutations.without_identity();
                    return PretextTask::ReassembledJigsaw {
                        head: ReassembledHead::new(
                            p,
                            feature_dim,
                            permutations.permutations.len() as i64,
                        ),
                        permutations,
                        permutation_seed: jigsaw.permutation_seed,
                        settings: ReassemblySettings {
                            ordered_fraction: jigsaw.ordered_fraction,
                            cell_gap: jigsaw.cell_gap as usize,
                        },
                    };
                }
                let head = JigsawHead::new(
                    p,
                    feature_dim,
                    permutations.tiles(),
                    permutations.permutations.len() as i64,
                );
                PretextTask::Jigsaw {
                    head,
                    permutations,
                    permutation_seed: jigsaw.permutation_seed,
                    shape: jigsaw.shape(),
                }
            }
            PretextConfig::Rotation(_) => PretextTask::Rotation {
                head: RotationHead::new(p, feature_dim),
            },
            PretextConfig::RelativePosition(relative) => PretextTask::RelativePosition {
                head: RelativePositionHead::new(p, feature_dim),
                shape: relative.shape(),
            },
            PretextConfig::Simclr(simclr) => PretextTask::Simclr {
                head: ProjectionHead::new(p, feature_dim, simclr.projection_dim),
                temperature: simclr.temperature,
                augmentation: simclr.augmentation(),
            },
            PretextConfig::Vicreg(vicreg) => PretextTask::Vicreg {
                head: Expander::new(p, feature_dim, vicreg.expander_dim),
                weights: vicreg.weights(),
                augmentation: vicreg.augmentation(),
            },
            PretextConfig::BarlowTwins(barlow) => PretextTask::BarlowTwins {
                head: Expander::new(p, feature_dim, barlow.projector_dim),
                redundancy_weight: barlow.redundancy_weight,
                augmentation: barlow.augmentation(),
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
            PretextTask::ReassembledJigsaw {
                permutations,
                settings,
                ..
            } => BatchRecipe::ReassembledJigsaw {
                permutations: permutations.clone(),
                settings: *settings,
            },
            PretextTask::Rotation { .. } => BatchRecipe::Rotation,
            PretextTask::RelativePosition { shape, .. } => {
                BatchRecipe::RelativePosition { shape: *shape }
            }
            PretextTask::Simclr { augmentation, .. }
            | PretextTask::Vicreg { augmentation, .. }
            | PretextTask::BarlowTwins { augmentation, .. } => BatchRecipe::Views {
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
            (
                PretextTask::ReassembledJigsaw { head, .. },
                PretextBatch::Images { images, labels },
            ) => {
                let xs = normalise(&to_device_async(images, device), input.0, input.1, device);
                let labels = to_device_async(labels, device);
                losses(&head.forward(&features(&xs)), &labels)
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
            (PretextTask::Vicreg { head, weights, .. }, PretextBatch::Views { views }) => {
                let xs =
                    normalise_floats(&to_device_async(views, device), input.0, input.1, device);
                let embeddings = head.forward(&features(&xs));
                (
                    vicreg_loss(&embeddings, *weights),
                    sibling_accuracy(&embeddings),
                )
            }
            (
                PretextTask::BarlowTwins {
                    head,
                    redundancy_weight,
                    ..
                },
                PretextBatch::Views { views },
            ) => {
                let xs =
                    normalise_floats(&to_device_async(views, device), input.0, input.1, device);
                let embeddings = head.forward(&features(&xs));
                (
                    barlow_twins_loss(&embeddings, *redundancy_weight),
                    sibling_accuracy(&embeddings),
                )
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
            PretextTask::ReassembledJigsaw {
                permutations,
                settings,
                ..
            } => reassembled::chance_accuracy(
                permutations.permutations.len(),
                settings.ordered_fraction,
            ),
            PretextTask::Rotation { .. } => 0.25,
            PretextTask::RelativePosition { .. } => 0.125,
            PretextTask::Simclr { .. }
            | PretextTask::Vicreg { .. }
            | PretextTask::BarlowTwins { .. } => {
                1.0 / (2 * batch_size).saturating_sub(1).max(1) as f64
            }
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
                "assembly": JigsawAssembly::Tiles,
            }),
            PretextTask::ReassembledJigsaw {
                permutations,
                permutation_seed,
                settings,
                ..
            } => serde_json::json!({
                "grid": permutations.grid,
                "permutation_seed": permutation_seed,
                "num_permutations": permutations.permutations.len(),
                "min_hamming_distance": permutations.minimum_distance(),
                "permutations": permutations.permutations,
                "assembly": JigsawAssembly::Image,
                "ordered_fraction": settings.ordered_fraction,
                "cell_gap": settings.cell_gap,
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
            PretextTask::Vicreg {
                weights,
                augmentation,
                ..
            } => serde_json::json!({
                "invariance_weight": weights.invariance,
                "variance_weight": weights.variance,
                "covariance_weight": weights.covariance,
                "min_crop_scale": augmentation.min_crop_scale,
                "color_jitter": augmentation.color_jitter,
            }),
            PretextTask::BarlowTwins {
                redundancy_weight,
                augmentation,
                ..
            } => serde_json::json!({
                "redundancy_weight": redundancy_weight,
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
