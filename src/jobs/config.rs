//! Job configurations: what a user may send in the `config` of each job
//! kind, the documented default of every field, and validation that names
//! the offending field. A pretext task's own fields are its own
//! ([`crate::ml::pretext`]).

use serde::{Deserialize, Serialize};

use crate::ml::backbone::Backbone;
use crate::ml::classifier::{NeighbourVote, PseudoLabelling, Transfer};
use crate::ml::pretext::PretextConfig;
use crate::validation::{FieldChecker, FieldError};

/// What the dataset and base model contribute to defaults.
#[derive(Debug, Clone, Copy)]
pub struct DefaultsFrom {
    /// Median of the dataset's image sides.
    pub median_side: u32,
    /// The base model's backbone and input size, for fine-tuning.
    pub base: Option<(Backbone, u32)>,
}

/// Images up to this side (MNIST, CIFAR sizes) train at their own size on
/// the backbone built for them: upsampling would cost compute a CPU lacks.
const SMALL_IMAGE_SIDE: u32 = 32;

fn default_backbone(from: DefaultsFrom) -> Backbone {
    match from.base {
        Some((backbone, _)) => backbone,
        None if from.median_side <= SMALL_IMAGE_SIDE => Backbone::Resnet10Narrow,
        None if from.median_side <= 64 => Backbone::Resnet18Small,
        None => Backbone::Resnet18,
    }
}

fn default_image_size(from: DefaultsFrom) -> i64 {
    match from.base {
        Some((_, size)) => size as i64,
        None if from.median_side <= SMALL_IMAGE_SIDE => from.median_side.max(16) as i64,
        None if from.median_side <= 64 => 64,
        None => 224,
    }
}

/// `config` of a pretrain job as sent: the job's own fields, and the rest,
/// which belong to the pretext task ([`PretextConfig::resolve`]).
#[derive(Debug, Default, Deserialize)]
pub struct PretrainConfigRequest {
    pub pretext: Option<String>,
    pub backbone: Option<String>,
    pub image_size: Option<i64>,
    pub epochs: Option<i64>,
    pub batch_size: Option<i64>,
    pub learning_rate: Option<f64>,
    pub weight_decay: Option<f64>,
    pub seed: Option<i64>,
    pub checkpoint_interval_secs: Option<i64>,
    pub max_steps: Option<i64>,
    pub eval_dataset_id: Option<uuid::Uuid>,
    pub knn_monitor_epochs: Option<i64>,
    /// Every other field: the pretext task's.
    #[serde(flatten)]
    pub task_fields: serde_json::Map<String, serde_json::Value>,
}

/// A pretrain job's configuration, every default filled in. Stored flat:
/// the task's fields sit beside the job's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PretrainConfig {
    #[serde(flatten)]
    pub pretext: PretextConfig,
    pub backbone: Backbone,
    pub image_size: i64,
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
    /// Every this many epochs, the kNN accuracy of the encoder so far on a
    /// sample of `eval_dataset_id` (0: never; jobs stored before read 0).
    #[serde(default)]
    pub knn_monitor_epochs: i64,
}

impl PretrainConfigRequest {
    /// Fills defaults and validates.
    pub fn resolve(self, from: DefaultsFrom) -> Result<PretrainConfig, Vec<FieldError>> {
        let mut c = FieldChecker::new();
        let backbone = c.backbone(self.backbone.as_deref(), default_backbone(from));
        let image_size = c.int(
            "image_size",
            self.image_size,
            default_image_size(from),
            16,
            512,
        );
        let pretext =
            match PretextConfig::resolve(self.pretext.as_deref(), self.task_fields, image_size) {
                Ok(pretext) => Some(pretext),
                Err(errors) => {
                    c.absorb(errors);
                    None
                }
            };
        let (default_batch, min_batch) = pretext
            .as_ref()
            .map_or((64, 1), |p| (p.default_batch_size(), p.min_batch_size()));
        let epochs = c.int("epochs", self.epochs, 10, 1, 1000);
        let batch_size = c.int(
            "batch_size",
            self.batch_size,
            default_batch,
            min_batch,
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
        let knn_monitor_epochs = c.int("knn_monitor_epochs", self.knn_monitor_epochs, 1, 0, 1000);
        let Some(pretext) = pretext else {
            return Err(c.into_errors());
        };
        c.finish(PretrainConfig {
            pretext,
            backbone,
            image_size,
            epochs,
            batch_size,
            learning_rate,
            weight_decay,
            seed,
            checkpoint_interval_secs,
            max_steps,
            eval_dataset_id: self.eval_dataset_id,
            knn_monitor_epochs,
        })
    }
}

/// Fewest optimizer steps of a fine-tuning run: with few labels an epoch is
/// one or two batches, and 20 epochs would leave the classifier untrained.
/// Chosen on held-out train images (bench/results/finetune_steps_validation_cpu.md):
/// against 300, 1,500 steps gained 4.4 points at 100 labels per class from
/// a jigsaw encoder, 8.7 (10 per class) and 5.8 (100) from scratch, and
/// cost nothing at 10 from the encoder; 3,000 gained 1.1 more at 100 per
/// class, nothing at 10, for twice the time.
pub const DEFAULT_MIN_STEPS: i64 = 1500;

/// The trunk's learning rate as a share of the head's when fine-tuning from
/// an encoder. Chosen on held-out train images
/// (bench/results/trunk_lr_validation_cpu.md): against 0.1, the head's rate
/// gained 0.7 points at 10 labels per class and 2.6 at 100; 0.3 came within
/// noise of it (+0.3 at 10, -0.5 at 100).
pub const DEFAULT_TRUNK_LR_SCALE: f64 = 1.0;

/// Fine-tuning's epochs, batch size, learning rate, trunk learning-rate
/// scale and weight decay with their defaults: the same for finetune jobs
/// and for the fine-tuning runs of label-efficiency evaluations.
fn fine_tuning_fields(
    c: &mut FieldChecker,
    [epochs, batch_size]: [Option<i64>; 2],
    [learning_rate, trunk_lr_scale, weight_decay]: [Option<f64>; 3],
) -> (i64, i64, f64, f64, f64) {
    (
        c.int("epochs", epochs, 20, 1, 1000),
        c.int("batch_size", batch_size, 64, 1, 4096),
        c.float("learning_rate", learning_rate, 1e-3, 0.0, 10.0, true),
        c.float(
            "trunk_lr_scale",
            trunk_lr_scale,
            DEFAULT_TRUNK_LR_SCALE,
            0.0,
            1.0,
            true,
        ),
        c.float("weight_decay", weight_decay, 1e-4, 0.0, 1.0, false),
    )
}

/// The transfer method of a finetune job: `transfer`, or the older `mode`;
/// by default `auto` from a base model and `fine_tune` from scratch.
fn resolve_transfer(
    c: &mut FieldChecker,
    transfer: Option<&str>,
    mode: Option<&str>,
    from: DefaultsFrom,
) -> Transfer {
    let from_mode = mode.map(|mode| match mode {
        "full" => Some(Transfer::FineTune),
        "linear" => Some(Transfer::LinearProbe),
        other => {
            c.reject(
                "mode",
                format!("unknown mode `{other}`; use full or linear, or config.transfer"),
            );
            None
        }
    });
    let from_transfer = transfer.map(|name| {
        let method = Transfer::from_name(name);
        if method.is_none() {
            c.reject(
                "transfer",
                format!(
                    "unknown transfer `{name}`; use one of {}",
                    Transfer::ALL.join(", ")
                ),
            );
        }
        method
    });
    let method = match (from_transfer, from_mode) {
        (Some(Some(a)), Some(Some(b))) if a != b => {
            c.reject(
                "mode",
                "mode is the older name of transfer; give one of them",
            );
            a
        }
        (Some(Some(method)), _) | (None, Some(Some(method))) => method,
        (Some(None), _) | (None, Some(None)) => Transfer::FineTune,
        (None, None) if from.base.is_some() => Transfer::Auto,
        (None, None) => Transfer::FineTune,
    };
    if from.base.is_none() && matches!(method, Transfer::LinearProbe | Transfer::Knn) {
        let field = if from_transfer.is_some() {
            "transfer"
        } else {
            "mode"
        };
        c.reject(
            field,
            format!(
                "{} keeps a pretrained trunk as it is; give base_model_id or use transfer fine_tune",
                method.name()
            ),
        );
    }
    method
}

fn default_vote() -> NeighbourVote {
    let probes = FrozenProbeSettings::default();
    NeighbourVote {
        k: probes.k,
        temperature: probes.knn_temperature,
    }
}

fn resolve_vote(c: &mut FieldChecker, k: Option<i64>, temperature: Option<f64>) -> NeighbourVote {
    let defaults = default_vote();
    NeighbourVote {
        k: c.int("k", k, defaults.k, 1, 10_000),
        temperature: c.float(
            "knn_temperature",
            temperature,
            defaults.temperature,
            0.0,
            10.0,
            true,
        ),
    }
}

/// `config` of a finetune job as sent.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfigRequest {
    pub backbone: Option<String>,
    pub image_size: Option<i64>,
    pub transfer: Option<String>,
    pub k: Option<i64>,
    pub knn_temperature: Option<f64>,
    /// The older name of `transfer`: `full` is `fine_tune`, `linear` is `linear_probe`.
    pub mode: Option<String>,
    pub epochs: Option<i64>,
    pub min_steps: Option<i64>,
    pub batch_size: Option<i64>,
    pub learning_rate: Option<f64>,
    pub trunk_lr_scale: Option<f64>,
    pub weight_decay: Option<f64>,
    pub label_fraction: Option<f64>,
    pub labels_per_class: Option<i64>,
    pub val_fraction: Option<f64>,
    pub augment: Option<bool>,
    pub seed: Option<i64>,
    pub label_version: Option<i64>,
    pub checkpoint_interval_secs: Option<i64>,
    pub max_steps: Option<i64>,
    pub unlabelled_dataset_id: Option<uuid::Uuid>,
    pub pseudo_labels_per_class: Option<i64>,
    pub pseudo_label_threshold: Option<f64>,
    pub max_unlabelled: Option<i64>,
}

/// A finetune job's configuration, every default filled in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FinetuneConfig {
    pub backbone: Backbone,
    pub image_size: i64,
    /// How the trunk becomes a classifier (jobs stored with the older
    /// `mode` read as the same method).
    #[serde(alias = "mode")]
    pub transfer: Transfer,
    /// How a kNN classifier votes (transfer `knn`, or `auto` choosing it).
    #[serde(default = "default_vote")]
    pub vote: NeighbourVote,
    pub epochs: i64,
    /// Fewest optimizer steps, whatever the epochs (jobs stored before this
    /// field read 0: their epochs alone).
    #[serde(default)]
    pub min_steps: i64,
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
    /// Self-training's unlabelled images besides the labelled dataset's
    /// unused ones (by default the base model's pretraining dataset).
    #[serde(default)]
    pub unlabelled_dataset_id: Option<uuid::Uuid>,
    /// The version of the dataset's labels used: filled in at submission
    /// (the latest unless given); absent in jobs stored before label
    /// versions, which read the archive's (version 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_version: Option<i64>,
    /// Self-training's choice of pseudo-labels (at the top level of the JSON).
    #[serde(flatten)]
    pub pseudo: PseudoLabelling,
}

impl FinetuneConfigRequest {
    /// Fills defaults and validates; a backbone that differs from the base
    /// model's is an error.
    pub fn resolve(self, from: DefaultsFrom) -> Result<FinetuneConfig, Vec<FieldError>> {
        let mut c = FieldChecker::new();
        let backbone = c.backbone(self.backbone.as_deref(), default_backbone(from));
        if let Some((base_backbone, _)) = from.base {
            if backbone != base_backbone {
                c.reject(
                    "backbone",
                    format!(
                        "the base model is a {}; omit config.backbone or set it to {}",
                        base_backbone.name(),
                        base_backbone.name()
                    ),
                );
            }
        }
        let image_size = c.int(
            "image_size",
            self.image_size,
            default_image_size(from),
            16,
            512,
        );
        let transfer =
            resolve_transfer(&mut c, self.transfer.as_deref(), self.mode.as_deref(), from);
        let (epochs, batch_size, learning_rate, mut trunk_lr_scale, weight_decay) =
            fine_tuning_fields(
                &mut c,
                [self.epochs, self.batch_size],
                [self.learning_rate, self.trunk_lr_scale, self.weight_decay],
            );
        if from.base.is_none() && self.trunk_lr_scale.is_none() {
            // From scratch the trunk is random: it learns at the head's rate.
            trunk_lr_scale = 1.0;
        }
        let label_fraction = self
            .label_fraction
            .map(|v| c.float("label_fraction", Some(v), 1.0, 0.0, 1.0, true));
        let labels_per_class = self
            .labels_per_class
            .map(|v| c.int("labels_per_class", Some(v), 1, 1, 1_000_000));
        if label_fraction.is_some() && labels_per_class.is_some() {
            c.reject(
                "labels_per_class",
                "give label_fraction or labels_per_class, not both",
            );
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
        let vote = resolve_vote(&mut c, self.k, self.knn_temperature);
        let min_steps = c.int("min_steps", self.min_steps, DEFAULT_MIN_STEPS, 0, 1_000_000);
        let pseudo = resolve_pseudo_labelling(
            &mut c,
            self.pseudo_labels_per_class,
            self.pseudo_label_threshold,
            self.max_unlabelled,
        );
        let label_version = resolve_label_version(&mut c, self.label_version);
        c.finish(FinetuneConfig {
            backbone,
            image_size,
            transfer,
            vote,
            min_steps,
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
            unlabelled_dataset_id: self.unlabelled_dataset_id,
            label_version,
            pseudo,
        })
    }
}

/// Self-training's pseudo-label settings, with their defaults.
fn resolve_pseudo_labelling(
    c: &mut FieldChecker,
    per_class: Option<i64>,
    threshold: Option<f64>,
    max_unlabelled: Option<i64>,
) -> PseudoLabelling {
    let defaults = PseudoLabelling::default();
    PseudoLabelling {
        per_class: c.int(
            "pseudo_labels_per_class",
            per_class,
            defaults.per_class,
            0,
            100_000,
        ),
        threshold: c.float(
            "pseudo_label_threshold",
            threshold,
            defaults.threshold,
            0.0,
            1.0,
            false,
        ),
        max_unlabelled: c.int(
            "max_unlabelled",
            max_unlabelled,
            defaults.max_unlabelled,
            1,
            1_000_000,
        ),
    }
}

/// Share of each class held out for testing when no test dataset is named.
pub const DEFAULT_TEST_FRACTION: f64 = 0.2;

/// The settings of the frozen-embedding protocols (kNN and linear probe);
/// [`Default`] holds their documented defaults, the only place they live.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FrozenProbeSettings {
    /// Neighbours that vote in kNN.
    pub k: i64,
    /// Temperature of the kNN vote weights `exp(similarity / t)`.
    pub knn_temperature: f64,
    /// Epochs of the linear probe.
    pub linear_epochs: i64,
    /// Learning rate of the linear probe.
    pub linear_learning_rate: f64,
}

impl Default for FrozenProbeSettings {
    fn default() -> Self {
        Self {
            k: 20,
            knn_temperature: 0.07,
            linear_epochs: 100,
            linear_learning_rate: 0.01,
        }
    }
}

fn resolve_protocol(c: &mut FieldChecker, protocol: Option<&str>) -> Protocol {
    match protocol {
        Some("knn") => Protocol::Knn,
        Some("linear") => Protocol::Linear,
        Some("label_efficiency") => Protocol::LabelEfficiency,
        Some(other) => {
            c.reject(
                "protocol",
                format!("unknown protocol `{other}`; use knn, linear or label_efficiency"),
            );
            Protocol::Knn
        }
        None => {
            c.reject("protocol", "required: knn, linear or label_efficiency");
            Protocol::Knn
        }
    }
}

impl FrozenProbeSettings {
    /// The settings as sent, defaults filled in and bounds checked.
    fn resolve(
        c: &mut FieldChecker,
        (k, knn_temperature): (Option<i64>, Option<f64>),
        (linear_epochs, linear_learning_rate): (Option<i64>, Option<f64>),
    ) -> Self {
        let defaults = Self::default();
        let vote = resolve_vote(c, k, knn_temperature);
        Self {
            k: vote.k,
            knn_temperature: vote.temperature,
            linear_epochs: c.int(
                "linear_epochs",
                linear_epochs,
                defaults.linear_epochs,
                1,
                10_000,
            ),
            linear_learning_rate: c.float(
                "linear_learning_rate",
                linear_learning_rate,
                defaults.linear_learning_rate,
                0.0,
                10.0,
                true,
            ),
        }
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
    pub transfers: Option<Vec<String>>,
    pub epochs: Option<i64>,
    pub min_steps: Option<i64>,
    pub batch_size: Option<i64>,
    pub learning_rate: Option<f64>,
    pub trunk_lr_scale: Option<f64>,
    pub weight_decay: Option<f64>,
    pub seed: Option<i64>,
    pub label_version: Option<i64>,
    pub pseudo_labels_per_class: Option<i64>,
    pub pseudo_label_threshold: Option<f64>,
    pub max_unlabelled: Option<i64>,
}

/// An evaluate job's configuration, every default filled in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvaluateConfig {
    pub protocol: Protocol,
    pub test_dataset_id: Option<uuid::Uuid>,
    /// Share of each class held out for testing when there is no test dataset.
    pub test_fraction: f64,
    /// kNN and linear-probe settings (at the top level of the JSON).
    #[serde(flatten)]
    pub probes: FrozenProbeSettings,
    pub labels_per_class: Vec<i64>,
    pub label_fractions: Vec<f64>,
    /// The transfer methods compared with training from scratch at every
    /// budget (jobs stored before this field compared fine-tuning alone).
    #[serde(default = "default_transfers")]
    pub transfers: Vec<Transfer>,
    /// Fine-tuning epochs of every label-efficiency run.
    pub epochs: i64,
    /// Fewest optimizer steps of every label-efficiency run (jobs stored
    /// before this field read 0).
    #[serde(default)]
    pub min_steps: i64,
    pub batch_size: i64,
    pub learning_rate: f64,
    pub trunk_lr_scale: f64,
    pub weight_decay: f64,
    pub seed: i64,
    /// The version of the dataset's labels used: filled in at submission
    /// (the latest unless given); absent in jobs stored before label
    /// versions, which read the archive's (version 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_version: Option<i64>,
    /// Self-training's choice of pseudo-labels among the training images
    /// left out of a budget (at the top level of the JSON).
    #[serde(flatten)]
    pub pseudo: PseudoLabelling,
}

impl EvaluateConfigRequest {
    /// Fills defaults and validates.
    pub fn resolve(self) -> Result<EvaluateConfig, Vec<FieldError>> {
        let mut c = FieldChecker::new();
        let protocol = resolve_protocol(&mut c, self.protocol.as_deref());
        let test_fraction = c.float(
            "test_fraction",
            self.test_fraction,
            DEFAULT_TEST_FRACTION,
            0.0,
            0.9,
            true,
        );
        let probes = FrozenProbeSettings::resolve(
            &mut c,
            (self.k, self.knn_temperature),
            (self.linear_epochs, self.linear_learning_rate),
        );
        let labels_per_class = self.labels_per_class.unwrap_or_else(|| vec![1, 10, 100]);
        if labels_per_class
            .iter()
            .any(|&k| !(1..=1_000_000).contains(&k))
        {
            c.reject(
                "labels_per_class",
                "every budget must be between 1 and 1000000",
            );
        }
        let label_fractions = self.label_fractions.unwrap_or_else(|| vec![0.01, 0.1, 1.0]);
        if label_fractions.iter().any(|&f| !(f > 0.0 && f <= 1.0)) {
            c.reject("label_fractions", "every fraction must be in (0, 1]");
        }
        if labels_per_class.is_empty()
            && label_fractions.is_empty()
            && protocol == Protocol::LabelEfficiency
        {
            c.reject("labels_per_class", "give at least one label budget");
        }
        let transfers = resolve_transfers(&mut c, self.transfers);
        let (epochs, batch_size, learning_rate, trunk_lr_scale, weight_decay) = fine_tuning_fields(
            &mut c,
            [self.epochs, self.batch_size],
            [self.learning_rate, self.trunk_lr_scale, self.weight_decay],
        );
        let seed = c.int("seed", self.seed, 0, 0, i64::MAX);
        let min_steps = c.int("min_steps", self.min_steps, DEFAULT_MIN_STEPS, 0, 1_000_000);
        let pseudo = resolve_pseudo_labelling(
            &mut c,
            self.pseudo_labels_per_class,
            self.pseudo_label_threshold,
            self.max_unlabelled,
        );
        let label_version = resolve_label_version(&mut c, self.label_version);
        c.finish(EvaluateConfig {
            protocol,
            test_dataset_id: self.test_dataset_id,
            test_fraction,
            probes,
            labels_per_class,
            label_fractions,
            transfers,
            epochs,
            min_steps,
            batch_size,
            learning_rate,
            trunk_lr_scale,
            weight_decay,
            seed,
            label_version,
            pseudo,
        })
    }
}

/// A `label_version` as sent, checked to be a version number; whether the
/// dataset has it is checked where the dataset is known.
fn resolve_label_version(c: &mut FieldChecker, version: Option<i64>) -> Option<i64> {
    version.map(|v| c.int("label_version", Some(v), 0, 0, i64::from(i32::MAX)))
}

/// Images per forward pass of embed and predict jobs, unless told otherwise.
const DEFAULT_INFERENCE_BATCH: i64 = 256;

/// Images per forward pass of a job that runs a model over a dataset.
fn inference_batch_size(c: &mut FieldChecker, value: Option<i64>) -> i64 {
    c.int("batch_size", value, DEFAULT_INFERENCE_BATCH, 1, 4096)
}

/// `config` of an embed job as sent.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedConfigRequest {
    pub batch_size: Option<i64>,
}

/// An embed job's configuration, every default filled in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EmbedConfig {
    /// Images per forward pass.
    pub batch_size: i64,
}

impl EmbedConfigRequest {
    /// Fills defaults and validates.
    pub fn resolve(self) -> Result<EmbedConfig, Vec<FieldError>> {
        let mut c = FieldChecker::new();
        let batch_size = inference_batch_size(&mut c, self.batch_size);
        c.finish(EmbedConfig { batch_size })
    }
}

/// Most classes a prediction lists per image.
pub const MAX_TOP_K: i64 = 100;

/// `config` of a predict job as sent.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictConfigRequest {
    pub batch_size: Option<i64>,
    pub top_k: Option<i64>,
}

/// A predict job's configuration, every default filled in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PredictConfig {
    /// Images per forward pass.
    pub batch_size: i64,
    /// Classes listed per image, most probable first (at most the
    /// classifier's number of classes).
    pub top_k: i64,
}

impl PredictConfigRequest {
    /// Fills defaults and validates.
    pub fn resolve(self) -> Result<PredictConfig, Vec<FieldError>> {
        let mut c = FieldChecker::new();
        let batch_size = inference_batch_size(&mut c, self.batch_size);
        let top_k = c.int("top_k", self.top_k, 5, 1, MAX_TOP_K);
        c.finish(PredictConfig { batch_size, top_k })
    }
}

fn default_transfers() -> Vec<Transfer> {
    vec![Transfer::FineTune]
}

/// The label-efficiency protocol's transfer methods: known, none twice.
fn resolve_transfers(c: &mut FieldChecker, names: Option<Vec<String>>) -> Vec<Transfer> {
    let Some(names) = names else {
        return default_transfers();
    };
    let mut methods = Vec::new();
    for name in &names {
        match Transfer::from_name(name) {
            Some(method) if !methods.contains(&method) => methods.push(method),
            Some(_) => c.reject("transfers", format!("`{name}` is listed twice")),
            None => c.reject(
                "transfers",
                format!(
                    "unknown transfer `{name}`; use some of {}",
                    Transfer::ALL.join(", ")
                ),
            ),
        }
    }
    if methods.is_empty() {
        c.reject("transfers", "give at least one transfer method");
    }
    methods
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::pretext::jigsaw::{JigsawAssembly, JigsawConfig};
    use crate::validation::parse_config_object;

    const SMALL: DefaultsFrom = DefaultsFrom {
        median_side: 28,
        base: None,
    };

    fn pretrain(config: serde_json::Value) -> Result<PretrainConfig, Vec<FieldError>> {
        parse_config_object::<PretrainConfigRequest>(config)?.resolve(SMALL)
    }

    #[test]
    fn small_images_get_small_defaults() {
        let config = PretrainConfigRequest::default().resolve(SMALL).unwrap();
        assert_eq!(config.backbone, Backbone::Resnet10Narrow);
        assert_eq!(config.image_size, 28);
        assert_eq!(
            config.pretext,
            PretextConfig::Jigsaw(JigsawConfig {
                grid: 3,
                tile_size: 9,
                num_permutations: 100,
                permutation_seed: 1,
                grayscale_probability: 0.3,
                channel_jitter: 0.1,
                assembly: JigsawAssembly::Image,
                ordered_fraction: 0.25,
                cell_gap: 1,
            })
        );
        assert_eq!(config.batch_size, 64);
    }

    #[test]
    fn task_specific_fields_belong_to_their_task() {
        let errors = pretrain(serde_json::json!({"pretext": "rotation", "num_permutations": 10}))
            .unwrap_err();
        assert_eq!(errors[0].field, "config.num_permutations");
        assert!(errors[0].message.contains("applies to jigsaw only"));
        let simclr = pretrain(serde_json::json!({"pretext": "simclr"})).unwrap();
        let PretextConfig::Simclr(task) = &simclr.pretext else {
            panic!("not simclr: {:?}", simclr.pretext);
        };
        assert_eq!(task.temperature, 0.5);
        assert_eq!(simclr.batch_size, 128);
        let stored = serde_json::to_value(&simclr).unwrap();
        assert_eq!(stored["pretext"], "simclr");
        assert!(stored.as_object().unwrap().get("grid").is_none());
    }

    #[test]
    fn a_resolved_config_is_stored_flat_and_reads_back() {
        let config = pretrain(serde_json::json!({"pretext": "jigsaw", "grid": 2})).unwrap();
        let stored = serde_json::to_value(&config).unwrap();
        assert_eq!(stored["grid"], 2);
        assert_eq!(stored["epochs"], 10);
        let read: PretrainConfig = serde_json::from_value(stored).unwrap();
        assert_eq!(read, config);
    }

    #[test]
    fn unknown_fields_and_tasks_are_named() {
        let errors = pretrain(serde_json::json!({"gird": 3})).unwrap_err();
        assert_eq!(errors[0].field, "config.gird");
        let errors = pretrain(serde_json::json!({"pretext": "sudoku"})).unwrap_err();
        assert_eq!(errors[0].field, "config.pretext");
        assert!(errors[0].message.contains("relative_position"));
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        let errors =
            pretrain(serde_json::json!({"epochs": -1, "batch_size": 1_i64 << 40})).unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["config.epochs", "config.batch_size"]);
    }

    /// Found by the config fuzzer: a grid whose square overflows made the
    /// permutation count's check panic instead of naming the field.
    #[test]
    fn a_grid_whose_square_overflows_is_named_not_a_panic() {
        let errors = pretrain(serde_json::json!({"grid": 3_037_000_500_i64})).unwrap_err();
        assert_eq!(errors[0].field, "config.grid", "{errors:?}");
        assert!(errors[0].message.contains("between 2 and 4"), "{errors:?}");
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

    fn finetune(
        config: serde_json::Value,
        base: Option<(Backbone, u32)>,
    ) -> Result<FinetuneConfig, Vec<FieldError>> {
        let from = DefaultsFrom {
            median_side: 28,
            base,
        };
        parse_config_object::<FinetuneConfigRequest>(config)?.resolve(from)
    }

    #[test]
    fn the_transfer_method_defaults_to_auto_from_a_base_and_fine_tuning_from_scratch() {
        let base = Some((Backbone::Resnet10Narrow, 32));
        let from_base = finetune(serde_json::json!({}), base).unwrap();
        assert_eq!(from_base.transfer, Transfer::Auto);
        assert_eq!(from_base.min_steps, DEFAULT_MIN_STEPS);
        assert_eq!(from_base.trunk_lr_scale, DEFAULT_TRUNK_LR_SCALE);
        let scratch = finetune(serde_json::json!({}), None).unwrap();
        assert_eq!(scratch.transfer, Transfer::FineTune);
        assert_eq!(
            scratch.trunk_lr_scale, 1.0,
            "a random trunk learns at the head's rate"
        );
        let slowed = finetune(serde_json::json!({"trunk_lr_scale": 0.2}), None).unwrap();
        assert_eq!(slowed.trunk_lr_scale, 0.2, "unless the user asks otherwise");
        let older = finetune(serde_json::json!({"mode": "linear"}), base).unwrap();
        assert_eq!(older.transfer, Transfer::LinearProbe);
        let knn = finetune(serde_json::json!({"transfer": "knn", "k": 5}), base).unwrap();
        assert_eq!((knn.transfer, knn.vote.k), (Transfer::Knn, 5));
    }

    #[test]
    fn transfer_methods_that_keep_the_trunk_need_a_base_and_one_name() {
        let errors = finetune(serde_json::json!({"transfer": "knn"}), None).unwrap_err();
        assert_eq!(errors[0].field, "config.transfer");
        let errors = finetune(serde_json::json!({"mode": "linear"}), None).unwrap_err();
        assert_eq!(errors[0].field, "config.mode");
        let base = Some((Backbone::Convnet, 32));
        let errors =
            finetune(serde_json::json!({"mode": "full", "transfer": "knn"}), base).unwrap_err();
        assert_eq!(errors[0].field, "config.mode");
        let errors = finetune(serde_json::json!({"transfer": "nearest"}), base).unwrap_err();
        assert_eq!(errors[0].field, "config.transfer");
        assert!(
            errors[0].message.contains("linear_probe"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn a_finetune_config_stored_with_the_older_mode_reads_as_its_transfer() {
        let mut stored =
            serde_json::to_value(finetune(serde_json::json!({}), None).unwrap()).unwrap();
        let fields = stored.as_object_mut().unwrap();
        fields.remove("transfer");
        fields.remove("vote");
        fields.remove("min_steps");
        fields.insert("mode".into(), "linear".into());
        let read: FinetuneConfig = serde_json::from_value(stored).unwrap();
        assert_eq!(read.transfer, Transfer::LinearProbe);
        assert_eq!(read.min_steps, 0);
        assert_eq!(read.vote.k, FrozenProbeSettings::default().k);
    }

    #[test]
    fn self_training_settings_have_defaults_and_bounds_and_older_configs_read_them() {
        let config = finetune(serde_json::json!({"transfer": "self_training"}), None).unwrap();
        assert_eq!(config.transfer, Transfer::SelfTraining);
        assert_eq!(config.pseudo, PseudoLabelling::default());
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["pseudo_labels_per_class"], 200);
        assert_eq!(json["pseudo_label_threshold"], 0.5);
        let errors = finetune(
            serde_json::json!({"pseudo_label_threshold": 1.5, "max_unlabelled": 0}),
            None,
        )
        .unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["config.pseudo_label_threshold", "config.max_unlabelled"]
        );
        let mut stored = json;
        for field in [
            "pseudo_labels_per_class",
            "pseudo_label_threshold",
            "max_unlabelled",
            "unlabelled_dataset_id",
        ] {
            stored.as_object_mut().unwrap().remove(field);
        }
        let read: FinetuneConfig = serde_json::from_value(stored).unwrap();
        assert_eq!(read.pseudo, PseudoLabelling::default());
        assert_eq!(read.unlabelled_dataset_id, None);
    }
}
