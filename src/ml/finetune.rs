//! Fine-tuning jobs: a classifier made from a pretrained encoder's trunk by
//! the job's transfer method (fine-tuning, a linear probe, kNN, or `auto`'s
//! choice among them, or self-training, which also learns from unlabelled
//! images), or trained from scratch (the baseline), on a stratified,
//! possibly few-label subset of a labelled dataset. This module
//! owns what a job adds to the methods: the validation split, metric
//! reports, checkpoints and the model it keeps.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;

use tch::{nn, Tensor};

use super::checkpoint::CheckpointSchedule;
use super::classifier::Classifier;
use super::classifier::Transfer;
use super::optimizer::AdamW;
use super::self_training::{left_unlabelled, teach};
use super::supervised::{
    evaluate_classifier, train_classifier, LabelledImages, StepDone, SupervisedSettings,
};
use super::training::{
    InputSpec, ModelArtifact, PermanentError, StopReason, TrainingContext, TrainingEvent,
    TrainingOutcome,
};
use super::transfer::{choose_transfer, TransferModel, TransferNetwork, TransferSetup};
use crate::data::labels::LabelSet;
use crate::data::loader::{load_image_set, ImageTensorSet};
use crate::data::split::{apply_budget, stratified_split, LabelBudget};
use crate::jobs::config::FinetuneConfig;

/// Optimizer steps between two metric reports.
const REPORT_EVERY: i64 = 10;

/// The pretrained encoder a fine-tuning job starts from.
pub struct BaseEncoder<'a> {
    pub weights: &'a Path,
    pub input: InputSpec,
}

/// A labelled dataset split into the images trained on and those held out,
/// and the images self-training may pseudo-label.
struct FinetuneData {
    data: ImageTensorSet,
    train: Vec<usize>,
    val: Vec<usize>,
    /// Labelled images the budget left out (their labels unread) and the
    /// unlabelled dataset's images; empty unless self-training.
    unlabelled: Vec<usize>,
}

/// Where a fine-tuning job's images are.
pub struct FinetuneDatasets<'a> {
    /// The labelled dataset (one folder per class).
    pub labelled: &'a Path,
    /// Its images' channels.
    pub channels: u8,
    /// Self-training's extra unlabelled images.
    pub unlabelled: Option<&'a Path>,
    /// The labels sent after the upload to train on, instead of the archive's.
    pub labels: Option<&'a LabelSet>,
}

/// Runs (or resumes) a fine-tuning job on the labelled dataset.
pub fn run_finetune(
    ctx: &TrainingContext,
    config: &FinetuneConfig,
    datasets: &FinetuneDatasets,
    base: Option<BaseEncoder>,
) -> anyhow::Result<TrainingOutcome> {
    let channels = base
        .as_ref()
        .map_or(datasets.channels, |b| b.input.channels);
    let split = load_finetune_data(ctx, config, datasets, channels)?;
    let input = input_spec(config, &split.data, channels, base.as_ref());
    let settings = config.supervised_settings();
    let setup = TransferSetup {
        device: ctx.device,
        backbone: config.backbone,
        encoder_weights: base.as_ref().map(|b| b.weights),
        data: &split.data,
        input: &input,
        supervised: &settings,
        vote: config.vote,
    };
    let mut final_metrics = BTreeMap::new();
    let method = match config.transfer {
        Transfer::Auto | Transfer::SelfTraining => {
            let mut stop = || ctx.stop.requested();
            let Some(choice) = choose_transfer(&setup, &split.train, &mut stop)? else {
                return Ok(stopped(ctx));
            };
            for (candidate, score) in &choice.scores {
                final_metrics.insert(format!("auto_cv_accuracy_{}", candidate.name()), *score);
            }
            choice.method
        }
        method => method,
    };
    let fitted = if config.transfer == Transfer::SelfTraining {
        let mut stop = || ctx.stop.requested();
        let Some(lesson) = teach(
            &setup,
            method,
            &split.train,
            &split.unlabelled,
            &config.pseudo,
            &mut stop,
        )?
        else {
            return Ok(stopped(ctx));
        };
        final_metrics.insert("unlabelled_images".into(), split.unlabelled.len() as f64);
        final_metrics.insert("pseudo_labels".into(), lesson.pseudo.images.len() as f64);
        let confidence = lesson.pseudo.mean_confidence();
        final_metrics.insert("pseudo_label_confidence".into(), confidence);
        let student = FinetuneData {
            data: lesson.data,
            train: lesson.train,
            val: split.val.clone(),
            unlabelled: Vec::new(),
        };
        let student_setup = TransferSetup {
            data: &student.data,
            ..setup
        };
        fit_kept_model(ctx, config, &student_setup, &student, Transfer::FineTune)?
    } else {
        fit_kept_model(ctx, config, &setup, &split, method)?
    };
    let (model, held_out) = match fitted {
        Ok(fitted) => fitted,
        Err(reason) => return Ok(TrainingOutcome::Stopped(reason)),
    };
    final_metrics.extend(held_out);
    let kept = match config.transfer {
        Transfer::SelfTraining => Transfer::SelfTraining,
        _ => method,
    };

    model.save(&ctx.model_weights)?;
    final_metrics.insert("train_labels".to_string(), split.train.len() as f64);
    final_metrics.insert("val_images".to_string(), split.val.len() as f64);
    Ok(TrainingOutcome::Finished(Box::new(ModelArtifact {
        kind: "classifier",
        backbone: config.backbone.name(),
        pretext: None,
        classes: split.data.classes.clone(),
        embedding_dim: config.backbone.feature_dim(),
        input,
        metrics: final_metrics,
        pretext_config: None,
        report: None,
        transfer: Some(kept),
        vote: (kept == Transfer::Knn).then_some(config.vote),
    })))
}

/// A fitted classifier and its last validation metrics.
type KeptModel = (TransferModel, Vec<(String, f64)>);

/// Fits the classifier the job keeps by `method` (never `auto`): trained
/// with checkpoints, or a kNN memory; returns it with its last validation
/// metrics, or why it stopped.
fn fit_kept_model(
    ctx: &TrainingContext,
    config: &FinetuneConfig,
    setup: &TransferSetup,
    split: &FinetuneData,
    method: Transfer,
) -> anyhow::Result<Result<KeptModel, StopReason>> {
    let mut model = TransferModel::new(setup, method)?;
    if let TransferNetwork::Linear(classifier) = &model.network {
        let trained = train_with_checkpoints(ctx, config, setup, &model.vs, classifier, split)?;
        return Ok(trained.map(|held_out| (model, held_out)));
    }
    ctx.emit(TrainingEvent::Plan {
        epochs: 1,
        steps: 1,
        start_step: 0,
    });
    model.remember(setup, &split.train);
    let held_out = validate(ctx, &model, split, setup.input);
    ctx.emit(TrainingEvent::Report {
        epoch: 1,
        step: 1,
        metrics: held_out.clone(),
    });
    Ok(Ok((model, held_out)))
}

fn stopped(ctx: &TrainingContext) -> TrainingOutcome {
    TrainingOutcome::Stopped(ctx.stop.requested().unwrap_or(StopReason::Release))
}

/// Trains a classifier with the supervised loop, resuming from the job's
/// checkpoint and writing new ones, reporting every few steps and
/// validating at each epoch's end; returns the last validation metrics, or
/// why it stopped.
fn train_with_checkpoints(
    ctx: &TrainingContext,
    config: &FinetuneConfig,
    setup: &TransferSetup,
    vs: &nn::VarStore,
    classifier: &Classifier,
    split: &FinetuneData,
) -> anyhow::Result<Result<Vec<(String, f64)>, StopReason>> {
    let mut optimizer = AdamW::new(vs, config.learning_rate, config.weight_decay)?;
    let plan = setup.supervised.plan(split.train.len());
    let total_steps = plan.total_steps;
    let mut checkpoints = CheckpointSchedule::new(&ctx.job_dir, config.checkpoint_interval_secs);
    let start_step = checkpoints.resume(vs, &mut optimizer)?;
    // The epochs the steps make, which `min_steps` may lengthen past config.epochs.
    ctx.emit(TrainingEvent::Plan {
        epochs: plan.epochs(),
        steps: total_steps,
        start_step,
    });
    let mut last_held_out = Vec::new();
    let images = LabelledImages {
        data: &split.data,
        train: &split.train,
        input: setup.input,
    };
    let stopped = train_classifier(
        classifier,
        &mut optimizer,
        &images,
        setup.supervised,
        ctx.device,
        start_step,
        &mut |done: StepDone| {
            if done.done % REPORT_EVERY == 0 || done.epoch_end {
                let mut metrics = done.means.drain();
                if done.epoch_end {
                    let (loss, accuracy) = evaluate_held_out(ctx, classifier, split, setup.input);
                    last_held_out = vec![loss, accuracy];
                    metrics.extend(last_held_out.iter().cloned());
                }
                ctx.emit(TrainingEvent::Report {
                    epoch: done.epoch,
                    step: done.done,
                    metrics,
                });
            }
            let stop = checkpoints.after_step(
                ctx,
                vs,
                done.optimizer,
                done.done,
                done.epoch_end,
                total_steps,
            )?;
            Ok(stop.map_or(ControlFlow::Continue(()), ControlFlow::Break))
        },
    )?;
    Ok(match stopped {
        Some(reason) => Err(reason),
        None => Ok(last_held_out),
    })
}

/// Loads the labelled images, holds out the validation split and applies
/// the label budget to the rest; for self-training, also gathers the
/// unlabelled images.
fn load_finetune_data(
    ctx: &TrainingContext,
    config: &FinetuneConfig,
    datasets: &FinetuneDatasets,
    channels: u8,
) -> anyhow::Result<FinetuneData> {
    let size = config.image_size as u32;
    let mut data = load_image_set(datasets.labelled, size, channels, ctx.max_image_pixels)
        .map_err(|e| PermanentError(format!("the dataset could not be loaded: {e:#}")))?;
    if let Some(labels) = datasets.labels {
        data.relabel(labels)?;
    }
    let num_classes = data.classes.len();
    if num_classes == 0 {
        return Err(PermanentError(
            "the dataset has no labels; fine-tuning needs one folder per class".into(),
        )
        .into());
    }
    let seed = config.seed as u64;
    let (pool, val) = stratified_split(&data.labels, num_classes, config.val_fraction, seed);
    let budget = match (config.label_fraction, config.labels_per_class) {
        (Some(f), _) => LabelBudget::Fraction(f),
        (_, Some(k)) => LabelBudget::PerClass(k as usize),
        _ => LabelBudget::All,
    };
    let train = apply_budget(&pool, &data.labels, num_classes, budget, seed);
    if train.is_empty() {
        return Err(PermanentError("no labelled image is left for training after the validation split; lower config.val_fraction".into()).into());
    }
    let mut unlabelled = Vec::new();
    if config.transfer == Transfer::SelfTraining {
        unlabelled.extend(left_unlabelled(&pool, &train));
        if let Some(dir) = datasets.unlabelled {
            let extra = load_image_set(dir, size, channels, ctx.max_image_pixels).map_err(|e| {
                PermanentError(format!(
                    "the unlabelled dataset (config.unlabelled_dataset_id) could not be loaded: {e:#}"
                ))
            })?;
            let first = data.len();
            data.images = Tensor::cat(&[&data.images, &extra.images], 0);
            data.labels.extend(std::iter::repeat_n(-1, extra.len()));
            unlabelled.extend(first..data.len());
        }
        if unlabelled.is_empty() {
            return Err(PermanentError(
                "self-training found no unlabelled image: every labelled image is used as a label; \
                 set config.unlabelled_dataset_id, lower config.labels_per_class, or start from a \
                 base model pretrained on unlabelled images"
                    .into(),
            )
            .into());
        }
    }
    Ok(FinetuneData {
        data,
        train,
        val,
        unlabelled,
    })
}

/// The base encoder's normalisation at the job's image size, or the
/// dataset's own statistics when training from scratch.
fn input_spec(
    config: &FinetuneConfig,
    data: &ImageTensorSet,
    channels: u8,
    base: Option<&BaseEncoder>,
) -> InputSpec {
    let image_size = config.image_size as u32;
    match base {
        Some(b) => InputSpec {
            image_size,
            ..b.input.clone()
        },
        None => {
            let (mean, std) = data.channel_stats();
            InputSpec {
                image_size,
                channels,
                mean,
                std,
            }
        }
    }
}

/// The images held out for validation, or the training images (named
/// `train_eval`) when nothing was held out.
fn held_out(split: &FinetuneData) -> (&'static str, &[usize]) {
    if split.val.is_empty() {
        ("train_eval", &split.train)
    } else {
        ("val", &split.val)
    }
}

/// Loss and accuracy of a trained classifier on the held-out images.
fn evaluate_held_out(
    ctx: &TrainingContext,
    classifier: &Classifier,
    split: &FinetuneData,
    input: &InputSpec,
) -> ((String, f64), (String, f64)) {
    let (prefix, images) = held_out(split);
    let (loss, accuracy) = evaluate_classifier(classifier, &split.data, images, input, ctx.device);
    (
        (format!("{prefix}_loss"), loss),
        (format!("{prefix}_accuracy"), accuracy),
    )
}

/// Accuracy of a fitted kNN classifier on the held-out images.
fn validate(
    ctx: &TrainingContext,
    model: &TransferModel,
    split: &FinetuneData,
    input: &InputSpec,
) -> Vec<(String, f64)> {
    let (prefix, images) = held_out(split);
    let accuracy = model.accuracy(&split.data, images, input, ctx.device);
    vec![(format!("{prefix}_accuracy"), accuracy)]
}

impl FinetuneConfig {
    /// The supervised loop's settings of this job.
    pub fn supervised_settings(&self) -> SupervisedSettings {
        SupervisedSettings {
            epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            trunk_lr_scale: self.trunk_lr_scale,
            weight_decay: self.weight_decay,
            augment: self.augment,
            seed: self.seed,
            min_steps: self.min_steps,
            max_steps: self.max_steps,
        }
    }
}
