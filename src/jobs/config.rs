//! Job configurations: what a user may send in `config`, the documented
//! default of every field, and validation that names the offending field.

use serde::{Deserialize, Serialize};

use crate::ml::backbone::Backbone;

/// A field that failed validation, named as in the request (`config.epochs`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: format!("config.{field}"),
            message: message.into(),
        }
    }
}

/// What the dataset and base model contribute to defaults.
#[derive(Debug, Clone, Copy)]
pub struct DefaultsFrom {
    /// Median of the dataset's image sides.
    pub median_side: u32,
    /// The base model's backbone and input size, for fine-tuning.
    pub base: Option<(Backbone, u32)>,
}

fn default_backbone(from: DefaultsFrom) -> Backbone {
    match from.base {
        Some((backbone, _)) => backbone,
        None if from.median_side <= 64 => Backbone::Resnet18Small,
        None => Backbone::Resnet18,
    }
}

fn default_image_size(from: DefaultsFrom) -> i64 {
    match from.base {
        Some((_, size)) => size as i64,
        None if from.median_side <= 64 => 64,
        None => 224,
    }
}

/// Collects validation errors while reading fields.
struct Checker {
    errors: Vec<FieldError>,
}

impl Checker {
    fn int(&mut self, field: &str, value: Option<i64>, default: i64, min: i64, max: i64) -> i64 {
        let value = value.unwrap_or(default);
        if value < min || value > max {
            self.errors.push(FieldError::new(
                field,
                format!("must be between {min} and {max} (got {value})"),
            ));
        }
        value
    }

    fn float(
        &mut self,
        field: &str,
        value: Option<f64>,
        default: f64,
        min: f64,
        max: f64,
        min_exclusive: bool,
    ) -> f64 {
        let value = value.unwrap_or(default);
        let low_ok = if min_exclusive {
            value > min
        } else {
            value >= min
        };
        if !value.is_finite() || !low_ok || value > max {
            let open = if min_exclusive { "(" } else { "[" };
            self.errors.push(FieldError::new(
                field,
                format!("must be in {open}{min}, {max}] (got {value})"),
            ));
        }
        value
    }

    fn backbone(&mut self, value: Option<&str>, default: Backbone) -> Backbone {
        match value {
            None => default,
            Some(name) => Backbone::from_name(name).unwrap_or_else(|| {
                self.errors.push(FieldError::new(
                    "backbone",
                    format!(
                        "unknown backbone `{name}`; use one of {}",
                        Backbone::ALL.join(", ")
                    ),
                ));
                default
            }),
        }
    }

    fn finish<T>(self, value: T) -> Result<T, Vec<FieldError>> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(self.errors)
        }
    }
}

/// Parses a job's `config` object, naming the field serde complains about.
pub fn parse_config_object<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
) -> Result<T, Vec<FieldError>> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let message = error.inner().to_string();
        let unknown = message
            .split('`')
            .nth(1)
            .filter(|_| message.starts_with("unknown field"));
        let field = match (unknown, path.as_str()) {
            (Some(name), _) => format!("config.{name}"),
            (None, ".") => "config".to_string(),
            (None, path) => format!("config.{path}"),
        };
        vec![FieldError { field, message }]
    })
}

/// The pretext tasks a pretrain job can learn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pretext {
    /// Noroozi & Favaro 2016: which permutation shuffled the tiles.
    Jigsaw,
    /// Gidaris et al. 2018: by how many quarter turns the image was rotated.
    Rotation,
    /// Chen et al. 2020: which other view in the batch comes from the same image.
    Simclr,
    /// Doersch et al. 2015: where a patch sits relative to the centre patch.
    RelativePosition,
}

impl Pretext {
    /// Every pretext task, for validation messages.
    pub const ALL: [&'static str; 4] = ["jigsaw", "rotation", "simclr", "relative_position"];

    /// The name used in the API.
    pub fn name(self) -> &'static str {
        match self {
            Pretext::Jigsaw => "jigsaw",
            Pretext::Rotation => "rotation",
            Pretext::Simclr => "simclr",
            Pretext::RelativePosition => "relative_position",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().position(|n| *n == name).map(|i| {
            [
                Pretext::Jigsaw,
                Pretext::Rotation,
                Pretext::Simclr,
                Pretext::RelativePosition,
            ][i]
        })
    }
}

/// `config` of a pretrain job as sent.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainConfigRequest {
    pub pretext: Option<String>,
    pub backbone: Option<String>,
    pub image_size: Option<i64>,
    pub grid: Option<i64>,
    pub tile_size: Option<i64>,
    pub num_permutations: Option<i64>,
    pub permutation_seed: Option<i64>,
    pub grayscale_probability: Option<f64>,
    pub channel_jitter: Option<f64>,
    pub temperature: Option<f64>,
    pub projection_dim: Option<i64>,
    pub min_crop_scale: Option<f64>,
    pub color_jitter: Option<f64>,
    pub epochs: Option<i64>,
    pub batch_size: Option<i64>,
    pub learning_rate: Option<f64>,
    pub weight_decay: Option<f64>,
    pub seed: Option<i64>,
    pub checkpoint_interval_secs: Option<i64>,
    pub max_steps: Option<i64>,
    pub eval_dataset_id: Option<uuid::Uuid>,
}

/// A pretrain job's configuration, every default filled in. Fields that
/// belong to one pretext task are present only for that task.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PretrainConfig {
    pub pretext: Pretext,
    pub backbone: Backbone,
    pub image_size: i64,
    /// Jigsaw and relative position: cells per side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid: Option<i64>,
    /// Jigsaw and relative position: side of a tile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tile_size: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_permutations: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permutation_seed: Option<i64>,
    /// Jigsaw and relative position: chance that a colour puzzle is made grey.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grayscale_probability: Option<f64>,
    /// Jigsaw and relative position: per-channel scale and shift amplitude.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_jitter: Option<f64>,
    /// SimCLR: NT-Xent temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// SimCLR: output width of the projection head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection_dim: Option<i64>,
    /// SimCLR: smallest area fraction of a random resized crop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_crop_scale: Option<f64>,
    /// SimCLR: colour jitter strength.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color_jitter: Option<f64>,
    pub epochs: i64,
    pub batch_size: i64,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub seed: i64,
    pub checkpoint_interval_secs: i64,
    pub max_steps: Option<i64>,
    /// A labelled dataset to evaluate the encoder on (kNN and linear probe) when training ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_dataset_id: Option<uuid::Uuid>,
}

fn factorial_capped(n: i64, cap: i64) -> i64 {
    (1..=n)
        .try_fold(1i64, |acc, k| acc.checked_mul(k))
        .unwrap_or(i64::MAX)
        .min(cap)
}

impl PretrainConfigRequest {
    /// Fills defaults and validates.
    pub fn resolve(self, from: DefaultsFrom) -> Result<PretrainConfig, Vec<FieldError>> {
        let mut c = Checker { errors: Vec::new() };
        let pretext_name = self.pretext.clone().unwrap_or_else(|| "jigsaw".to_string());
        let pretext = Pretext::from_name(&pretext_name).unwrap_or_else(|| {
            c.errors.push(FieldError::new(
                "pretext",
                format!(
                    "unknown pretext task `{pretext_name}`; use one of {}",
                    Pretext::ALL.join(", ")
                ),
            ));
            Pretext::Jigsaw
        });
        let tiles = matches!(pretext, Pretext::Jigsaw | Pretext::RelativePosition);
        let only = |c: &mut Checker, field: &str, given: bool, applies: bool, to: &str| {
            if given && !applies {
                c.errors.push(FieldError::new(
                    field,
                    format!(
                        "applies to {to} only; remove it for pretext {}",
                        pretext.name()
                    ),
                ));
            }
        };
        only(
            &mut c,
            "grid",
            self.grid.is_some(),
            pretext == Pretext::Jigsaw,
            "jigsaw (relative_position uses a 3×3 grid)",
        );
        only(
            &mut c,
            "tile_size",
            self.tile_size.is_some(),
            tiles,
            "jigsaw and relative_position",
        );
        only(
            &mut c,
            "num_permutations",
            self.num_permutations.is_some(),
            pretext == Pretext::Jigsaw,
            "jigsaw",
        );
        only(
            &mut c,
            "permutation_seed",
            self.permutation_seed.is_some(),
            pretext == Pretext::Jigsaw,
            "jigsaw",
        );
        only(
            &mut c,
            "grayscale_probability",
            self.grayscale_probability.is_some(),
            tiles,
            "jigsaw and relative_position",
        );
        only(
            &mut c,
            "channel_jitter",
            self.channel_jitter.is_some(),
            tiles,
            "jigsaw and relative_position",
        );
        for (field, given) in [
            ("temperature", self.temperature.is_some()),
            ("projection_dim", self.projection_dim.is_some()),
            ("min_crop_scale", self.min_crop_scale.is_some()),
            ("color_jitter", self.color_jitter.is_some()),
        ] {
            only(&mut c, field, given, pretext == Pretext::Simclr, "simclr");
        }

        let backbone = c.backbone(self.backbone.as_deref(), default_backbone(from));
        let image_size = c.int(
            "image_size",
            self.image_size,
            default_image_size(from),
            16,
            512,
        );
        let (mut grid, mut tile_size, mut num_permutations, mut permutation_seed) =
            (None, None, None, None);
        let (mut grayscale_probability, mut channel_jitter) = (None, None);
        if tiles {
            let g = if pretext == Pretext::Jigsaw {
                c.int("grid", self.grid, 3, 2, 4)
            } else {
                3
            };
            let cell = image_size / g.max(1);
            tile_size = Some(c.int(
                "tile_size",
                self.tile_size,
                (cell * 7 / 8).max(4),
                4,
                cell.max(4),
            ));
            grid = Some(g);
            grayscale_probability = Some(c.float(
                "grayscale_probability",
                self.grayscale_probability,
                0.3,
                0.0,
                1.0,
                false,
            ));
            channel_jitter =
                Some(c.float("channel_jitter", self.channel_jitter, 0.1, 0.0, 1.0, false));
        }
        if pretext == Pretext::Jigsaw {
            let g = grid.unwrap_or(3);
            let max_perms = factorial_capped(g * g, 2000);
            num_permutations = Some(c.int(
                "num_permutations",
                self.num_permutations,
                100.min(max_perms),
                2,
                max_perms,
            ));
            permutation_seed =
                Some(c.int("permutation_seed", self.permutation_seed, 1, 0, i64::MAX));
        }
        let (mut temperature, mut projection_dim, mut min_crop_scale, mut color_jitter) =
            (None, None, None, None);
        if pretext == Pretext::Simclr {
            temperature = Some(c.float("temperature", self.temperature, 0.5, 0.0, 10.0, true));
            projection_dim = Some(c.int("projection_dim", self.projection_dim, 128, 8, 4096));
            let small = image_size <= 64;
            min_crop_scale = Some(c.float(
                "min_crop_scale",
                self.min_crop_scale,
                if small { 0.2 } else { 0.08 },
                0.0,
                1.0,
                true,
            ));
            color_jitter = Some(c.float(
                "color_jitter",
                self.color_jitter,
                if small { 0.4 } else { 0.8 },
                0.0,
                2.0,
                false,
            ));
        }
        let default_batch = if pretext == Pretext::Simclr { 128 } else { 64 };
        let epochs = c.int("epochs", self.epochs, 10, 1, 1000);
        let batch_size = c.int(
            "batch_size",
            self.batch_size,
            default_batch,
            if pretext == Pretext::Simclr { 2 } else { 1 },
            4096,
        );
        let learning_rate = c.float("learning_rate", self.learning_rate, 1e-3, 0.0, 10.0, true);
        let weight_decay = c.float("weight_decay", self.weight_decay, 1e-4, 0.0, 1.0, false);
        let seed = c.int("seed", self.seed, 0, 0, i64::MAX);
        let checkpoint_interval_secs = c.int(
            "checkpoint_interval_secs",
            self.checkpoint_interval_secs,
            60,
            1,
            86_400,
        );
        let max_steps = self
            .max_steps
            .map(|v| c.int("max_steps", Some(v), 1, 1, i64::MAX));
        c.finish(PretrainConfig {
            pretext,
            backbone,
            image_size,
            grid,
            tile_size,
            num_permutations,
            permutation_seed,
            grayscale_probability,
            channel_jitter,
            temperature,
            projection_dim,
            min_crop_scale,
            color_jitter,
            epochs,
            batch_size,
            learning_rate,
            weight_decay,
            seed,
            checkpoint_interval_secs,
            max_steps,
            eval_dataset_id: self.eval_dataset_id,
        })
    }
}

/// How much of the network fine-tuning trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinetuneMode {
    /// Trunk frozen, a linear head trained on its features.
    Linear,
    /// Everything trained, the trunk at a lower learning rate.
    Full,
}

/// `config` of a finetune job as sent.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfigRequest {
    pub backbone: Option<String>,
    pub image_size: Option<i64>,
    pub mode: Option<String>,
    pub epochs: Option<i64>,
    pub batch_size: Option<i64>,
    pub learning_rate: Option<f64>,
    pub trunk_lr_scale: Option<f64>,
    pub weight_decay: Option<f64>,
    pub label_fraction: Option<f64>,
    pub labels_per_class: Option<i64>,
    pub val_fraction: Option<f64>,
    pub augment: Option<bool>,
    pub seed: Option<i64>,
    pub checkpoint_interval_secs: Option<i64>,
    pub max_steps: Option<i64>,
}

/// A finetune job's configuration, every default filled in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FinetuneConfig {
    pub backbone: Backbone,
    pub image_size: i64,
    pub mode: FinetuneMode,
    pub epochs: i64,
    pub batch_size: i64,
    pub learning_rate: f64,
    pub trunk_lr_scale: f64,
    pub weight_decay: f64,
    pub label_fraction: Option<f64>,
    pub labels_per_class: Option<i64>,
    pub val_fraction: f64,
    pub augment: bool,
    pub seed: i64,
    pub checkpoint_interval_secs: i64,
    pub max_steps: Option<i64>,
}

impl FinetuneConfigRequest {
    /// Fills defaults and validates; a backbone that differs from the base
    /// model's is an error.
    pub fn resolve(self, from: DefaultsFrom) -> Result<FinetuneConfig, Vec<FieldError>> {
        let mut c = Checker { errors: Vec::new() };
        let backbone = c.backbone(self.backbone.as_deref(), default_backbone(from));
        if let Some((base_backbone, _)) = from.base {
            if backbone != base_backbone {
                c.errors.push(FieldError::new(
                    "backbone",
                    format!(
                        "the base model is a {}; omit config.backbone or set it to {}",
                        base_backbone.name(),
                        base_backbone.name()
                    ),
                ));
            }
        }
        let image_size = c.int(
            "image_size",
            self.image_size,
            default_image_size(from),
            16,
            512,
        );
        let mode = match self.mode.as_deref() {
            None | Some("full") => FinetuneMode::Full,
            Some("linear") => FinetuneMode::Linear,
            Some(other) => {
                c.errors.push(FieldError::new(
                    "mode",
                    format!("unknown mode `{other}`; use full or linear"),
                ));
                FinetuneMode::Full
            }
        };
        if mode == FinetuneMode::Linear && from.base.is_none() {
            c.errors.push(FieldError::new(
                "mode",
                "linear mode trains a head on a frozen pretrained trunk; give base_model_id or use mode full",
            ));
        }
        let epochs = c.int("epochs", self.epochs, 20, 1, 1000);
        let batch_size = c.int("batch_size", self.batch_size, 64, 1, 4096);
        let learning_rate = c.float("learning_rate", self.learning_rate, 1e-3, 0.0, 10.0, true);
        let trunk_lr_scale = c.float("trunk_lr_scale", self.trunk_lr_scale, 0.1, 0.0, 1.0, true);
        let weight_decay = c.float("weight_decay", self.weight_decay, 1e-4, 0.0, 1.0, false);
        let label_fraction = self
            .label_fraction
            .map(|v| c.float("label_fraction", Some(v), 1.0, 0.0, 1.0, true));
        let labels_per_class = self
            .labels_per_class
            .map(|v| c.int("labels_per_class", Some(v), 1, 1, 1_000_000));
        if label_fraction.is_some() && labels_per_class.is_some() {
            c.errors.push(FieldError::new(
                "labels_per_class",
                "give label_fraction or labels_per_class, not both",
            ));
        }
        let val_fraction = c.float("val_fraction", self.val_fraction, 0.1, 0.0, 0.9, false);
        let seed = c.int("seed", self.seed, 0, 0, i64::MAX);
        let checkpoint_interval_secs = c.int(
            "checkpoint_interval_secs",
            self.checkpoint_interval_secs,
            60,
            1,
            86_400,
        );
        let max_steps = self
            .max_steps
            .map(|v| c.int("max_steps", Some(v), 1, 1, i64::MAX));
        c.finish(FinetuneConfig {
            backbone,
            image_size,
            mode,
            epochs,
            batch_size,
            learning_rate,
            trunk_lr_scale,
            weight_decay,
            label_fraction,
            labels_per_class,
            val_fraction,
            augment: self.augment.unwrap_or(true),
            seed,
            checkpoint_interval_secs,
            max_steps,
        })
    }
}

/// The evaluation protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Weighted k-nearest-neighbour accuracy of frozen embeddings.
    Knn,
    /// A linear classifier trained on frozen embeddings.
    Linear,
    /// Fine-tuning from the encoder vs from scratch on label budgets.
    LabelEfficiency,
}

/// `config` of an evaluate job as sent.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateConfigRequest {
    pub protocol: Option<String>,
    pub test_dataset_id: Option<uuid::Uuid>,
    pub test_fraction: Option<f64>,
    pub k: Option<i64>,
    pub knn_temperature: Option<f64>,
    pub linear_epochs: Option<i64>,
    pub linear_learning_rate: Option<f64>,
    pub labels_per_class: Option<Vec<i64>>,
    pub label_fractions: Option<Vec<f64>>,
    pub epochs: Option<i64>,
    pub batch_size: Option<i64>,
    pub learning_rate: Option<f64>,
    pub trunk_lr_scale: Option<f64>,
    pub weight_decay: Option<f64>,
    pub seed: Option<i64>,
}

/// An evaluate job's configuration, every default filled in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvaluateConfig {
    pub protocol: Protocol,
    pub test_dataset_id: Option<uuid::Uuid>,
    /// Share of each class held out for testing when there is no test dataset.
    pub test_fraction: f64,
    pub k: i64,
    pub knn_temperature: f64,
    pub linear_epochs: i64,
    pub linear_learning_rate: f64,
    pub labels_per_class: Vec<i64>,
    pub label_fractions: Vec<f64>,
    /// Fine-tuning epochs of every label-efficiency run.
    pub epochs: i64,
    pub batch_size: i64,
    pub learning_rate: f64,
    pub trunk_lr_scale: f64,
    pub weight_decay: f64,
    pub seed: i64,
}

impl EvaluateConfigRequest {
    /// Fills defaults and validates.
    pub fn resolve(self) -> Result<EvaluateConfig, Vec<FieldError>> {
        let mut c = Checker { errors: Vec::new() };
        let protocol = match self.protocol.as_deref() {
            Some("knn") => Protocol::Knn,
            Some("linear") => Protocol::Linear,
            Some("label_efficiency") => Protocol::LabelEfficiency,
            Some(other) => {
                c.errors.push(FieldError::new(
                    "protocol",
                    format!("unknown protocol `{other}`; use knn, linear or label_efficiency"),
                ));
                Protocol::Knn
            }
            None => {
                c.errors.push(FieldError::new(
                    "protocol",
                    "required: knn, linear or label_efficiency",
                ));
                Protocol::Knn
            }
        };
        let test_fraction = c.float("test_fraction", self.test_fraction, 0.2, 0.0, 0.9, true);
        let k = c.int("k", self.k, 20, 1, 10_000);
        let knn_temperature = c.float(
            "knn_temperature",
            self.knn_temperature,
            0.07,
            0.0,
            10.0,
            true,
        );
        let linear_epochs = c.int("linear_epochs", self.linear_epochs, 100, 1, 10_000);
        let linear_learning_rate = c.float(
            "linear_learning_rate",
            self.linear_learning_rate,
            0.01,
            0.0,
            10.0,
            true,
        );
        let labels_per_class = self.labels_per_class.unwrap_or_else(|| vec![1, 10, 100]);
        if labels_per_class
            .iter()
            .any(|&k| !(1..=1_000_000).contains(&k))
        {
            c.errors.push(FieldError::new(
                "labels_per_class",
                "every budget must be between 1 and 1000000",
            ));
        }
        let label_fractions = self.label_fractions.unwrap_or_else(|| vec![0.01, 0.1, 1.0]);
        if label_fractions.iter().any(|&f| !(f > 0.0 && f <= 1.0)) {
            c.errors.push(FieldError::new(
                "label_fractions",
                "every fraction must be in (0, 1]",
            ));
        }
        if labels_per_class.is_empty()
            && label_fractions.is_empty()
            && protocol == Protocol::LabelEfficiency
        {
            c.errors.push(FieldError::new(
                "labels_per_class",
                "give at least one label budget",
            ));
        }
        let epochs = c.int("epochs", self.epochs, 20, 1, 1000);
        let batch_size = c.int("batch_size", self.batch_size, 64, 1, 4096);
        let learning_rate = c.float("learning_rate", self.learning_rate, 1e-3, 0.0, 10.0, true);
        let trunk_lr_scale = c.float("trunk_lr_scale", self.trunk_lr_scale, 0.1, 0.0, 1.0, true);
        let weight_decay = c.float("weight_decay", self.weight_decay, 1e-4, 0.0, 1.0, false);
        let seed = c.int("seed", self.seed, 0, 0, i64::MAX);
        c.finish(EvaluateConfig {
            protocol,
            test_dataset_id: self.test_dataset_id,
            test_fraction,
            k,
            knn_temperature,
            linear_epochs,
            linear_learning_rate,
            labels_per_class,
            label_fractions,
            epochs,
            batch_size,
            learning_rate,
            trunk_lr_scale,
            weight_decay,
            seed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: DefaultsFrom = DefaultsFrom {
        median_side: 28,
        base: None,
    };

    #[test]
    fn small_images_get_small_defaults() {
        let config = PretrainConfigRequest::default().resolve(SMALL).unwrap();
        assert_eq!(config.backbone, Backbone::Resnet18Small);
        assert_eq!(
            (config.image_size, config.grid, config.tile_size),
            (64, Some(3), Some(18))
        );
        assert_eq!(config.pretext, Pretext::Jigsaw);
        assert_eq!(config.num_permutations, Some(100));
        assert_eq!(config.temperature, None);
    }

    #[test]
    fn task_specific_fields_belong_to_their_task() {
        let request = PretrainConfigRequest {
            pretext: Some("rotation".into()),
            num_permutations: Some(10),
            ..Default::default()
        };
        let errors = request.resolve(SMALL).unwrap_err();
        assert_eq!(errors[0].field, "config.num_permutations");
        let simclr = PretrainConfigRequest {
            pretext: Some("simclr".into()),
            ..Default::default()
        }
        .resolve(SMALL)
        .unwrap();
        assert_eq!(simclr.temperature, Some(0.5));
        assert_eq!(simclr.grid, None);
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        let request = PretrainConfigRequest {
            epochs: Some(-1),
            batch_size: Some(1 << 40),
            ..Default::default()
        };
        let errors = request.resolve(SMALL).unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["config.epochs", "config.batch_size"]);
    }

    #[test]
    fn finetune_backbone_must_match_the_base() {
        let from = DefaultsFrom {
            median_side: 28,
            base: Some((Backbone::Convnet, 32)),
        };
        let request = FinetuneConfigRequest {
            backbone: Some("resnet18".into()),
            ..Default::default()
        };
        let errors = request.resolve(from).unwrap_err();
        assert_eq!(errors[0].field, "config.backbone");
    }
}
