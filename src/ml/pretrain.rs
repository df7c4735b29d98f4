//! The pretraining loop: a trunk and a pretext head learn a task whose
//! answers come free from the images; the trunk becomes an encoder. When the
//! job names a labelled evaluation dataset, the encoder is evaluated (kNN and
//! linear probe) before the job ends.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use tch::nn;
use tch::{Kind, Tensor};

use super::checkpoint::{save_model_weights, CheckpointSchedule};
use super::device::channels_last_weights;
use super::evaluate::{evaluate_frozen, EvaluationData, FrozenProtocols, KnnMonitor};
use super::optimizer::AdamW;
use super::prefetch::{BatchPlan, BatchPrefetcher};
use super::pretext::{PretextTask, HEAD_PATH};
use super::training::{
    cosine_learning_rate, seed_step, EvaluationReport, InputSpec, ModelArtifact, PermanentError,
    RunningMeans, StopReason, TrainingContext, TrainingEvent, TrainingOutcome,
};
use crate::data::loader::{load_image_set, ImageTensorSet};
use crate::jobs::config::PretrainConfig;

/// Optimizer steps between two metric reports.
const REPORT_EVERY: i64 = 10;

/// Runs (or resumes) a pretraining job on the dataset in `dataset_dir`:
/// build the model, train it on its pretext task, keep its trunk.
pub fn run_pretrain(
    ctx: &TrainingContext,
    config: &PretrainConfig,
    dataset_dir: &Path,
    channels: u8,
    evaluation: Option<EvaluationData>,
) -> anyhow::Result<TrainingOutcome> {
    let data = load_image_set(
        dataset_dir,
        config.image_size as u32,
        channels,
        ctx.max_image_pixels,
    )
    .map_err(|e| PermanentError(format!("the dataset could not be loaded: {e:#}")))?;
    let (mean, std) = data.channel_stats();
    let input = InputSpec {
        image_size: config.image_size as u32,
        channels,
        mean,
        std,
    };

    let (vs, model) = build_pretext_model(ctx, config, channels);
    let mut optimizer = AdamW::new(&vs, config.learning_rate, config.weight_decay)?;

    let batch_size = (config.batch_size as usize).min(data.len()).max(1);
    let monitor = match (&evaluation, config.knn_monitor_epochs) {
        (Some(evaluation), every) if every > 0 => {
            Some((KnnMonitor::new(evaluation, &input)?, every))
        }
        _ => None,
    };
    let final_means = match train_on_pretext(
        ctx,
        config,
        (&vs, &mut optimizer),
        &model,
        (data, &input),
        monitor.as_ref(),
    )? {
        PretextEnd::Trained { last_epoch_means } => last_epoch_means,
        PretextEnd::Stopped(reason) => return Ok(TrainingOutcome::Stopped(reason)),
    };
    let head_prefix = format!("{HEAD_PATH}.");
    save_model_weights(&vs, &ctx.model_weights, |name| {
        !name.starts_with(&head_prefix)
    })?;
    let mut metrics = pretext_metrics(final_means);
    metrics.insert(
        "chance_accuracy".to_string(),
        model.task.chance_accuracy(batch_size),
    );
    let report = match evaluation {
        Some(evaluation) => match evaluate_trained_encoder(ctx, &model, &input, &evaluation)? {
            Some(report) => Some(report),
            None => return Ok(TrainingOutcome::Stopped(StopReason::Cancel)),
        },
        None => None,
    };
    if let Some(report) = &report {
        metrics.extend(report.summary.clone());
    }
    Ok(TrainingOutcome::Finished(Box::new(ModelArtifact {
        kind: "encoder",
        backbone: config.backbone.name(),
        pretext: Some(config.pretext.name().to_string()),
        classes: Vec::new(),
        embedding_dim: config.backbone.feature_dim(),
        input,
        metrics,
        pretext_config: Some(model.task.describe()),
        report,
        transfer: None,
        vote: None,
    })))
}

/// kNN and the linear probe of the trained encoder on the evaluation data;
/// `None` when the job is cancelled meanwhile (only a cancel interrupts it: a
/// release would send the job back to retrain from a checkpoint).
fn evaluate_trained_encoder(
    ctx: &TrainingContext,
    model: &PretextModel,
    input: &InputSpec,
    evaluation: &EvaluationData,
) -> anyhow::Result<Option<EvaluationReport>> {
    let cancelled = || ctx.stop.requested() == Some(StopReason::Cancel);
    evaluate_frozen(
        &model.trunk,
        input,
        ctx.device,
        evaluation,
        FrozenProtocols::KnnAndLinear,
        &cancelled,
    )
}

/// The network being pretrained: the trunk that becomes the encoder, and the
/// pretext task's head.
struct PretextModel {
    trunk: nn::FuncT<'static>,
    task: PretextTask,
}

/// How the pretext loop ended.
enum PretextEnd {
    /// Every step ran; the last epoch's mean metrics.
    Trained {
        last_epoch_means: Vec<(String, f64)>,
    },
    /// Asked to stop (at a checkpoint, for a release) before the last step.
    Stopped(StopReason),
}

/// The trunk and pretext head, initialised from the job's seed (each step
/// reseeds), in the layout the device runs fastest.
fn build_pretext_model(
    ctx: &TrainingContext,
    config: &PretrainConfig,
    channels: u8,
) -> (nn::VarStore, PretextModel) {
    tch::manual_seed(config.seed);
    let vs = nn::VarStore::new(ctx.device);
    let root = vs.root();
    let model = PretextModel {
        trunk: config.backbone.build(&root, channels as i64),
        task: PretextTask::build(
            &(&root / HEAD_PATH),
            &config.pretext,
            config.backbone.feature_dim(),
        ),
    };
    channels_last_weights(&vs);
    (vs, model)
}

/// Trains from the checkpoint (or step 0) to the last step, reporting as it
/// goes, with the kNN monitor's accuracy every few epochs when there is one.
fn train_on_pretext(
    ctx: &TrainingContext,
    config: &PretrainConfig,
    (vs, optimizer): (&nn::VarStore, &mut AdamW),
    model: &PretextModel,
    (data, input): (ImageTensorSet, &InputSpec),
    monitor: Option<&(KnnMonitor, i64)>,
) -> anyhow::Result<PretextEnd> {
    let batch_size = (config.batch_size as usize).min(data.len()).max(1);
    let steps_per_epoch = (data.len() / batch_size).max(1) as i64;
    let mut total_steps = config.epochs * steps_per_epoch;
    if let Some(max_steps) = config.max_steps {
        total_steps = total_steps.min(max_steps);
    }
    let mut checkpoints = CheckpointSchedule::new(&ctx.job_dir, config.checkpoint_interval_secs);
    let start_step = checkpoints.resume(vs, optimizer)?;
    ctx.emit(TrainingEvent::Plan {
        epochs: config.epochs,
        steps: total_steps,
        start_step,
    });
    let plan = BatchPlan {
        seed: config.seed,
        batch_size,
        steps_per_epoch,
        start_step,
        total_steps,
    };
    let mut batches = BatchPrefetcher::start(data, model.task.recipe(), plan, ctx.device)?;
    let mut means = RunningMeans::default();
    let mut epoch_means = RunningMeans::default();
    // Loss and accuracy stay on the device between reports: reading a value
    // back waits for the device, so it happens once per report, not per step.
    let mut window = DeviceSums::default();
    let mut final_means = Vec::new();
    for step in start_step..total_steps {
        let waiting = Instant::now();
        let batch = batches.next(step)?;
        means.add("batch_wait_ms", waiting.elapsed().as_secs_f64() * 1e3);
        seed_step(config.seed, step);
        let (loss, accuracy) =
            model
                .task
                .step(&model.trunk, &batch, (&input.mean, &input.std), ctx.device);
        let learning_rate = cosine_learning_rate(config.learning_rate, step, total_steps);
        optimizer.set_lr(learning_rate);
        optimizer.backward_step(&loss);
        window.add(&loss, &accuracy);
        means.add("learning_rate", learning_rate);
        means.add_images(batch_size as u64);

        let done = step + 1;
        let epoch_end = done % steps_per_epoch == 0 || done == total_steps;
        if done % REPORT_EVERY == 0 || epoch_end {
            let (loss_sum, accuracy_sum, steps) = window.read()?;
            for means in [&mut means, &mut epoch_means] {
                means.add_sum("loss", loss_sum, steps);
                means.add_sum("pretext_accuracy", accuracy_sum, steps);
            }
            let epoch = step / steps_per_epoch + 1;
            let mut metrics = means.drain();
            let monitor_due = |(_, every): &&(KnnMonitor, i64)| epoch_end && epoch % every == 0;
            if let Some((monitor, _)) = monitor.filter(monitor_due) {
                let accuracy = monitor.accuracy(&model.trunk, input, ctx.device);
                metrics.push(("knn_monitor_accuracy".to_string(), accuracy));
            }
            ctx.emit(TrainingEvent::Report {
                epoch,
                step: done,
                metrics,
            });
        }
        if epoch_end {
            final_means = epoch_means.drain();
        }
        if let Some(reason) =
            checkpoints.after_step(ctx, vs, optimizer, done, epoch_end, total_steps)?
        {
            return Ok(PretextEnd::Stopped(reason));
        }
    }
    Ok(PretextEnd::Trained {
        last_epoch_means: final_means,
    })
}

/// The encoder's metrics from the last epoch's means: the pretext task's
/// accuracy, and its loss as `pretext_loss`.
fn pretext_metrics(final_means: Vec<(String, f64)>) -> BTreeMap<String, f64> {
    final_means
        .into_iter()
        .filter_map(|(name, value)| match name.as_str() {
            "loss" => Some(("pretext_loss".to_string(), value)),
            "pretext_accuracy" => Some((name, value)),
            _ => None,
        })
        .collect()
}

/// Sums of per-step loss and accuracy kept on the device until read.
#[derive(Default)]
struct DeviceSums {
    sums: Option<(Tensor, Tensor)>,
    steps: u64,
}

impl DeviceSums {
    /// Adds one step's loss and accuracy without reading them.
    fn add(&mut self, loss: &Tensor, accuracy: &Tensor) {
        let (loss, accuracy) = (
            loss.detach().to_kind(Kind::Double),
            accuracy.detach().to_kind(Kind::Double),
        );
        self.sums = Some(match self.sums.take() {
            Some((l, a)) => (l + loss, a + accuracy),
            None => (loss, accuracy),
        });
        self.steps += 1;
    }

    /// The sums and the number of steps since the last read; resets.
    fn read(&mut self) -> anyhow::Result<(f64, f64, u64)> {
        let steps = std::mem::take(&mut self.steps);
        match self.sums.take() {
            Some((loss, accuracy)) => Ok((f64::try_from(&loss)?, f64::try_from(&accuracy)?, steps)),
            None => Ok((0.0, 0.0, 0)),
        }
    }
}
