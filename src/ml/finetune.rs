//! The fine-tuning loop: a classifier (trunk + linear `fc` head) trained on a
//! stratified, possibly few-label subset of a labelled dataset, starting from
//! a pretrained encoder's trunk or from scratch (the baseline).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use tch::nn::{self, Module};
use tch::{Device, Tensor};

use super::backbone::features;
use super::checkpoint::{load_vars, save_model_weights, CheckpointSchedule};
use super::optimizer::AdamW;
use super::training::{
    cosine_learning_rate, seed_step, InputSpec, ModelArtifact, PermanentError, RunningMeans,
    TrainingContext, TrainingEvent, TrainingOutcome,
};
use crate::data::augment::augment;
use crate::data::batches::{epoch_order, step_rng};
use crate::data::loader::{load_image_set, normalise, ImageTensorSet};
use crate::data::split::{apply_budget, stratified_split, LabelBudget};
use crate::jobs::config::{FinetuneConfig, FinetuneMode};

/// Optimizer steps between two metric reports.
const REPORT_EVERY: i64 = 10;
/// Images per forward pass when evaluating.
const EVAL_BATCH: usize = 256;

/// The pretrained encoder a fine-tuning job starts from.
pub struct BaseEncoder<'a> {
    pub weights: &'a Path,
    pub input: InputSpec,
}

/// Mean loss and accuracy of the classifier on `indices`.
pub(crate) fn evaluate_classifier(
    classify: &dyn Fn(&Tensor) -> Tensor,
    data: &ImageTensorSet,
    indices: &[i64],
    input: &InputSpec,
    device: Device,
) -> (f64, f64) {
    tch::no_grad(|| {
        let (mut loss_sum, mut correct) = (0.0, 0.0);
        for chunk in indices.chunks(EVAL_BATCH) {
            let idx = Tensor::from_slice(chunk);
            let images = normalise(
                &data.images.index_select(0, &idx),
                &input.mean,
                &input.std,
                device,
            );
            let labels: Vec<i64> = chunk.iter().map(|&i| data.labels[i as usize]).collect();
            let labels = Tensor::from_slice(&labels).to_device(device);
            let logits = classify(&images);
            let n = chunk.len() as f64;
            loss_sum +=
                f64::try_from(logits.cross_entropy_for_logits(&labels)).unwrap_or(f64::NAN) * n;
            correct += f64::try_from(logits.accuracy_for_logits(&labels)).unwrap_or(0.0) * n;
        }
        let n = indices.len().max(1) as f64;
        (loss_sum / n, correct / n)
    })
}

/// Runs (or resumes) a fine-tuning job on the labelled dataset in `dataset_dir`.
pub fn run_finetune(
    ctx: &TrainingContext,
    config: &FinetuneConfig,
    dataset_dir: &Path,
    dataset_channels: u8,
    base: Option<BaseEncoder>,
) -> anyhow::Result<TrainingOutcome> {
    let channels = base.as_ref().map_or(dataset_channels, |b| b.input.channels);
    let data = load_image_set(
        dataset_dir,
        config.image_size as u32,
        channels,
        ctx.max_image_pixels,
    )
    .map_err(|e| PermanentError(format!("the dataset could not be loaded: {e:#}")))?;
    let num_classes = data.classes.len();
    if num_classes == 0 {
        return Err(PermanentError(
            "the dataset has no labels; fine-tuning needs one folder per class".into(),
        )
        .into());
    }
    let (pool, val) = stratified_split(
        &data.labels,
        num_classes,
        config.val_fraction,
        config.seed as u64,
    );
    let budget = match (config.label_fraction, config.labels_per_class) {
        (Some(f), _) => LabelBudget::Fraction(f),
        (_, Some(k)) => LabelBudget::PerClass(k as usize),
        _ => LabelBudget::All,
    };
    let train = apply_budget(&pool, &data.labels, num_classes, budget, config.seed as u64);
    if train.is_empty() {
        return Err(PermanentError("no labelled image is left for training after the validation split; lower config.val_fraction".into()).into());
    }
    let input = match &base {
        Some(b) => InputSpec {
            image_size: config.image_size as u32,
            ..b.input.clone()
        },
        None => {
            let (mean, std) = data.channel_stats();
            InputSpec {
                image_size: config.image_size as u32,
                channels,
                mean,
                std,
            }
        }
    };

    // Reproducible initialisation for a given seed.
    tch::manual_seed(config.seed);
    let vs = nn::VarStore::new(ctx.device);
    let root = vs.root();
    let trunk = config.backbone.build(&root.set_group(0), channels as i64);
    let fc = nn::linear(
        root.set_group(1) / "fc",
        config.backbone.feature_dim(),
        num_classes as i64,
        Default::default(),
    );
    let is_trunk = |name: &str| !name.starts_with("fc.");
    if let Some(b) = &base {
        load_vars(&vs, b.weights, is_trunk).context("Failed to load the base model's trunk")?;
    }
    let linear = config.mode == FinetuneMode::Linear;
    if linear {
        for (name, var) in vs.variables() {
            if is_trunk(&name) {
                let _ = var.set_requires_grad(false);
            }
        }
    }
    let mut optimizer = AdamW::new(&vs, config.learning_rate, config.weight_decay)?;
    let classify = |images: &Tensor, train: bool| -> Tensor {
        let feats = if linear {
            tch::no_grad(|| features(&trunk, images, false))
        } else {
            features(&trunk, images, train)
        };
        fc.forward(&feats)
    };

    let batch_size = (config.batch_size as usize).min(train.len()).max(1);
    let steps_per_epoch = (train.len() / batch_size).max(1) as i64;
    let mut total_steps = config.epochs * steps_per_epoch;
    if let Some(max_steps) = config.max_steps {
        total_steps = total_steps.min(max_steps);
    }
    let mut checkpoints = CheckpointSchedule::new(&ctx.job_dir, config.checkpoint_interval_secs);
    let start_step = checkpoints.resume(&vs, &mut optimizer)?;
    ctx.emit(TrainingEvent::Plan {
        epochs: config.epochs,
        steps: total_steps,
        start_step,
    });

    let train_i64: Vec<i64> = train.iter().map(|&i| i as i64).collect();
    let val_i64: Vec<i64> = val.iter().map(|&i| i as i64).collect();
    let mut means = RunningMeans::default();
    let mut order = Vec::new();
    let mut order_epoch = -1;
    let mut final_metrics = BTreeMap::new();
    for step in start_step..total_steps {
        let epoch = step / steps_per_epoch;
        if epoch != order_epoch {
            order = epoch_order(train.len(), config.seed, epoch)
                .into_iter()
                .map(|k| train_i64[k as usize])
                .collect();
            order_epoch = epoch;
        }
        let within = (step % steps_per_epoch) as usize;
        let chunk = &order[within * batch_size..(within + 1) * batch_size];
        let mut images = normalise(
            &data.images.index_select(0, &Tensor::from_slice(chunk)),
            &input.mean,
            &input.std,
            ctx.device,
        );
        if config.augment {
            let mut rng = step_rng(config.seed, step);
            images = augment(&images, &mut rng);
        }
        let labels: Vec<i64> = chunk.iter().map(|&i| data.labels[i as usize]).collect();
        let labels = Tensor::from_slice(&labels).to_device(ctx.device);
        seed_step(config.seed, step);
        let logits = classify(&images, true);
        let loss = logits.cross_entropy_for_logits(&labels);
        let learning_rate = cosine_learning_rate(config.learning_rate, step, total_steps);
        optimizer.set_lr_group(1, learning_rate);
        optimizer.set_lr_group(0, learning_rate * config.trunk_lr_scale);
        optimizer.backward_step(&loss);

        means.add("loss", f64::try_from(&loss)?);
        means.add(
            "train_accuracy",
            f64::try_from(logits.accuracy_for_logits(&labels))?,
        );
        means.add("learning_rate", learning_rate);
        means.add_images(batch_size as u64);

        let done = step + 1;
        let epoch_end = done % steps_per_epoch == 0 || done == total_steps;
        if done % REPORT_EVERY == 0 || epoch_end {
            let mut metrics = means.drain();
            if epoch_end {
                let eval_images = if val_i64.is_empty() {
                    &train_i64
                } else {
                    &val_i64
                };
                let (val_loss, val_accuracy) = evaluate_classifier(
                    &|x| classify(x, false),
                    &data,
                    eval_images,
                    &input,
                    ctx.device,
                );
                let prefix = if val_i64.is_empty() {
                    "train_eval"
                } else {
                    "val"
                };
                metrics.push((format!("{prefix}_loss"), val_loss));
                metrics.push((format!("{prefix}_accuracy"), val_accuracy));
                final_metrics.insert(format!("{prefix}_accuracy"), val_accuracy);
                final_metrics.insert(format!("{prefix}_loss"), val_loss);
            }
            ctx.emit(TrainingEvent::Report {
                epoch: epoch + 1,
                step: done,
                metrics,
            });
        }
        if let Some(reason) =
            checkpoints.after_step(ctx, &vs, &optimizer, done, epoch_end, total_steps)?
        {
            return Ok(TrainingOutcome::Stopped(reason));
        }
    }

    save_model_weights(&vs, &ctx.model_weights, |_| true)?;
    final_metrics.insert("train_labels".to_string(), train.len() as f64);
    final_metrics.insert("val_images".to_string(), val.len() as f64);
    Ok(TrainingOutcome::Finished(ModelArtifact {
        kind: "classifier",
        backbone: config.backbone.name(),
        pretext: None,
        classes: data.classes.clone(),
        embedding_dim: config.backbone.feature_dim(),
        input,
        metrics: final_metrics,
        pretext_config: None,
        report: None,
    }))
}
