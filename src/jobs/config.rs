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

/// Turns serde's complaint about `config` into a field error.
pub fn config_parse_error(error: serde_json::Error) -> Vec<FieldError> {
    let message = error.to_string();
    let field = message
        .split('`')
        .nth(1)
        .filter(|_| message.starts_with("unknown field"))
        .map(|f| format!("config.{f}"))
        .unwrap_or_else(|| "config".to_string());
    vec![FieldError { field, message }]
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
    pub epochs: Option<i64>,
    pub batch_size: Option<i64>,
    pub learning_rate: Option<f64>,
    pub weight_decay: Option<f64>,
    pub grayscale_probability: Option<f64>,
    pub channel_jitter: Option<f64>,
    pub seed: Option<i64>,
    pub checkpoint_interval_secs: Option<i64>,
    pub max_steps: Option<i64>,
}

/// A pretrain job's configuration, every default filled in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PretrainConfig {
    pub pretext: String,
    pub backbone: Backbone,
    pub image_size: i64,
    pub grid: i64,
    pub tile_size: i64,
    pub num_permutations: i64,
    pub permutation_seed: i64,
    pub epochs: i64,
    pub batch_size: i64,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub grayscale_probability: f64,
    pub channel_jitter: f64,
    pub seed: i64,
    pub checkpoint_interval_secs: i64,
    pub max_steps: Option<i64>,
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
        let pretext = self.pretext.unwrap_or_else(|| "jigsaw".to_string());
        if pretext != "jigsaw" {
            c.errors.push(FieldError::new(
                "pretext",
                format!("unknown pretext task `{pretext}`; use jigsaw"),
            ));
        }
        let backbone = c.backbone(self.backbone.as_deref(), default_backbone(from));
        let image_size = c.int(
            "image_size",
            self.image_size,
            default_image_size(from),
            16,
            512,
        );
        let grid = c.int("grid", self.grid, 3, 2, 4);
        let cell = image_size / grid.max(1);
        let tile_size = c.int(
            "tile_size",
            self.tile_size,
            (cell * 7 / 8).max(4),
            4,
            cell.max(4),
        );
        let max_perms = factorial_capped(grid * grid, 2000);
        let num_permutations = c.int(
            "num_permutations",
            self.num_permutations,
            100.min(max_perms),
            2,
            max_perms,
        );
        let permutation_seed = c.int("permutation_seed", self.permutation_seed, 1, 0, i64::MAX);
        let epochs = c.int("epochs", self.epochs, 10, 1, 1000);
        let batch_size = c.int("batch_size", self.batch_size, 64, 1, 4096);
        let learning_rate = c.float("learning_rate", self.learning_rate, 1e-3, 0.0, 10.0, true);
        let weight_decay = c.float("weight_decay", self.weight_decay, 1e-4, 0.0, 1.0, false);
        let grayscale_probability = c.float(
            "grayscale_probability",
            self.grayscale_probability,
            0.3,
            0.0,
            1.0,
            false,
        );
        let channel_jitter = c.float("channel_jitter", self.channel_jitter, 0.1, 0.0, 1.0, false);
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
            epochs,
            batch_size,
            learning_rate,
            weight_decay,
            grayscale_probability,
            channel_jitter,
            seed,
            checkpoint_interval_secs,
            max_steps,
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
            (64, 3, 18)
        );
        assert_eq!(config.num_permutations, 100);
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
