//! The one supervised training loop: a [`Classifier`] learns labelled images
//! with cross-entropy, the head at the full learning rate and the trunk at a
//! fraction of it, on a warm-up + cosine schedule. Fine-tuning jobs and the
//! label-efficiency evaluation both run it; what differs between them
//! (reports, validation, checkpoints, how a stop is noticed) is the caller's
//! `after_step`.

use std::ops::ControlFlow;

use tch::{Device, Kind, Tensor};

use super::classifier::{Classifier, HEAD_GROUP, TRUNK_GROUP};
use super::device::{channels_last, mixed_precision};
use super::optimizer::AdamW;
use super::training::{cosine_learning_rate, seed_step, InputSpec, RunningMeans, StopReason};
use crate::data::augment::augment;
use crate::data::batches::{epoch_order, step_rng};
use crate::data::loader::{normalise, ImageTensorSet};

/// Images per forward pass when evaluating.
const EVAL_BATCH: usize = 256;

/// How the supervised loop trains.
#[derive(Debug, Clone, PartialEq)]
pub struct SupervisedSettings {
    pub epochs: i64,
    pub batch_size: i64,
    /// The head's peak learning rate.
    pub learning_rate: f64,
    /// The trunk's learning rate as a share of the head's.
    pub trunk_lr_scale: f64,
    pub weight_decay: f64,
    /// Random crops and flips of each batch.
    pub augment: bool,
    pub seed: i64,
    /// The fewest optimizer steps, whatever the epochs.
    pub min_steps: i64,
    /// A cap on the optimizer steps, whatever the epochs (above `min_steps`).
    pub max_steps: Option<i64>,
}

/// The length of a run over `train_images` labelled images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SupervisedPlan {
    pub batch_size: usize,
    pub steps_per_epoch: i64,
    pub total_steps: i64,
}

impl SupervisedPlan {
    /// Epochs the run takes: more than asked when `min_steps` lengthens it,
    /// fewer when `max_steps` cuts it.
    pub fn epochs(&self) -> i64 {
        (self.total_steps + self.steps_per_epoch - 1) / self.steps_per_epoch
    }
}

impl SupervisedSettings {
    /// Steps per epoch (whole batches only) and in all.
    pub fn plan(&self, train_images: usize) -> SupervisedPlan {
        let batch_size = (self.batch_size as usize).min(train_images).max(1);
        let steps_per_epoch = (train_images / batch_size).max(1) as i64;
        let mut total_steps = (self.epochs * steps_per_epoch).max(self.min_steps);
        if let Some(max_steps) = self.max_steps {
            total_steps = total_steps.min(max_steps);
        }
        SupervisedPlan {
            batch_size,
            steps_per_epoch,
            total_steps,
        }
    }
}

/// Labelled images and which of them to train on.
pub struct LabelledImages<'a> {
    pub data: &'a ImageTensorSet,
    /// Indices into `data` of the training images.
    pub train: &'a [usize],
    pub input: &'a InputSpec,
}

/// Where the loop stands after a step, for the caller's `after_step`.
pub struct StepDone<'a> {
    /// Steps done so far (the step just taken is `done - 1`).
    pub done: i64,
    /// The 1-based epoch the step belongs to.
    pub epoch: i64,
    /// The step ended an epoch, or the run.
    pub epoch_end: bool,
    /// Training loss, accuracy, learning rate and images since the last drain.
    pub means: &'a mut RunningMeans,
    pub optimizer: &'a AdamW,
}

/// Trains `classifier` from `start_step` to the plan's end, calling
/// `after_step` after every step; returns the reason if `after_step` broke
/// off, `None` when the run ended.
pub fn train_classifier(
    classifier: &Classifier,
    optimizer: &mut AdamW,
    images: &LabelledImages,
    settings: &SupervisedSettings,
    device: Device,
    start_step: i64,
    after_step: &mut dyn FnMut(StepDone) -> anyhow::Result<ControlFlow<StopReason>>,
) -> anyhow::Result<Option<StopReason>> {
    let plan = settings.plan(images.train.len());
    let mut means = RunningMeans::default();
    let mut order: Vec<i64> = Vec::new();
    let mut order_epoch = -1;
    for step in start_step..plan.total_steps {
        let epoch = step / plan.steps_per_epoch;
        if epoch != order_epoch {
            order = epoch_order(images.train.len(), settings.seed, epoch)
                .into_iter()
                .map(|k| images.train[k as usize] as i64)
                .collect();
            order_epoch = epoch;
        }
        let within = (step % plan.steps_per_epoch) as usize;
        let chunk = &order[within * plan.batch_size..(within + 1) * plan.batch_size];
        let (mut batch, labels) = labelled_batch(images.data, chunk, images.input, device);
        if settings.augment {
            batch = augment(&batch, &mut step_rng(settings.seed, step));
        }
        seed_step(settings.seed, step);
        let logits = mixed_precision(device, || classifier.logits(&channels_last(&batch), true))
            .to_kind(Kind::Float);
        let loss = logits.cross_entropy_for_logits(&labels);
        let learning_rate = cosine_learning_rate(settings.learning_rate, step, plan.total_steps);
        optimizer.set_lr_group(HEAD_GROUP, learning_rate);
        optimizer.set_lr_group(TRUNK_GROUP, learning_rate * settings.trunk_lr_scale);
        optimizer.backward_step(&loss);

        means.add("loss", f64::try_from(&loss)?);
        means.add(
            "train_accuracy",
            f64::try_from(logits.accuracy_for_logits(&labels))?,
        );
        means.add("learning_rate", learning_rate);
        means.add_images(plan.batch_size as u64);
        let done = step + 1;
        let flow = after_step(StepDone {
            done,
            epoch: epoch + 1,
            epoch_end: done % plan.steps_per_epoch == 0 || done == plan.total_steps,
            means: &mut means,
            optimizer,
        })?;
        if let ControlFlow::Break(reason) = flow {
            return Ok(Some(reason));
        }
    }
    Ok(None)
}

/// The normalised images of `indices` on `device`, and their labels.
fn labelled_batch(
    data: &ImageTensorSet,
    indices: &[i64],
    input: &InputSpec,
    device: Device,
) -> (Tensor, Tensor) {
    let images = normalise(
        &data.images.index_select(0, &Tensor::from_slice(indices)),
        &input.mean,
        &input.std,
        device,
    );
    let labels: Vec<i64> = indices.iter().map(|&i| data.labels[i as usize]).collect();
    (images, Tensor::from_slice(&labels).to_device(device))
}

/// Mean cross-entropy and accuracy of `classifier` on the images `indices`.
pub fn evaluate_classifier(
    classifier: &Classifier,
    data: &ImageTensorSet,
    indices: &[usize],
    input: &InputSpec,
    device: Device,
) -> (f64, f64) {
    let indices: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
    tch::no_grad(|| {
        let (mut loss_sum, mut correct) = (0.0, 0.0);
        for chunk in indices.chunks(EVAL_BATCH) {
            let (images, labels) = labelled_batch(data, chunk, input, device);
            let logits = classifier.logits(&images, false);
            let n = chunk.len() as f64;
            loss_sum +=
                f64::try_from(logits.cross_entropy_for_logits(&labels)).unwrap_or(f64::NAN) * n;
            correct += f64::try_from(logits.accuracy_for_logits(&labels)).unwrap_or(0.0) * n;
        }
        let n = indices.len().max(1) as f64;
        (loss_sum / n, correct / n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::backbone::Backbone;
    use tch::nn;

    /// Two classes told apart by brightness.
    fn bright_and_dark(per_class: usize) -> ImageTensorSet {
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for i in 0..2 * per_class {
            let class = (i % 2) as i64;
            let level = if class == 0 { 40u8 } else { 210u8 };
            pixels.extend(std::iter::repeat_n(
                level.wrapping_add((i % 7) as u8),
                16 * 16,
            ));
            labels.push(class);
        }
        ImageTensorSet {
            images: Tensor::from_slice(&pixels).view([(2 * per_class) as i64, 1, 16, 16]),
            labels,
            classes: vec!["dark".into(), "bright".into()],
        }
    }

    #[test]
    fn a_plan_counts_the_epochs_its_steps_make() {
        let settings = SupervisedSettings {
            epochs: 20,
            batch_size: 64,
            learning_rate: 1e-3,
            trunk_lr_scale: 0.1,
            weight_decay: 0.0,
            augment: false,
            seed: 0,
            min_steps: 300,
            max_steps: None,
        };
        // 90 images: one batch of 64 per epoch, lengthened to 300 steps.
        let plan = settings.plan(90);
        assert_eq!(
            (plan.steps_per_epoch, plan.total_steps, plan.epochs()),
            (1, 300, 300)
        );
        // 6,400 images: 100 steps per epoch, 20 epochs are more than 300 steps.
        assert_eq!(settings.plan(6400).epochs(), 20);
        let capped = SupervisedSettings {
            max_steps: Some(150),
            ..settings
        };
        assert_eq!(capped.plan(6400).epochs(), 2);
    }

    #[test]
    fn the_loop_learns_labelled_images_and_reports_every_step() {
        let data = bright_and_dark(16);
        let input = InputSpec {
            image_size: 16,
            channels: 1,
            mean: vec![128.0 / 255.0],
            std: vec![0.3],
        };
        let train: Vec<usize> = (0..data.len()).collect();
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let classifier = Classifier::new(&vs.root(), Backbone::Convnet, 1, 2);
        let mut optimizer = AdamW::new(&vs, 1e-2, 0.0).unwrap();
        let settings = SupervisedSettings {
            epochs: 8,
            batch_size: 8,
            learning_rate: 1e-2,
            trunk_lr_scale: 1.0,
            weight_decay: 0.0,
            augment: false,
            seed: 0,
            min_steps: 0,
            max_steps: None,
        };
        let before = evaluate_classifier(&classifier, &data, &train, &input, Device::Cpu);
        let mut steps = Vec::new();
        let images = LabelledImages {
            data: &data,
            train: &train,
            input: &input,
        };
        let stopped = train_classifier(
            &classifier,
            &mut optimizer,
            &images,
            &settings,
            Device::Cpu,
            0,
            &mut |done| {
                steps.push(done.done);
                Ok(ControlFlow::Continue(()))
            },
        )
        .unwrap();
        assert_eq!(stopped, None);
        assert_eq!(
            steps,
            (1..=settings.plan(train.len()).total_steps).collect::<Vec<_>>()
        );
        let (loss, accuracy) = evaluate_classifier(&classifier, &data, &train, &input, Device::Cpu);
        assert!(loss < before.0, "loss {} → {loss}", before.0);
        assert_eq!(accuracy, 1.0);
    }

    #[test]
    fn after_step_can_stop_the_loop() {
        let data = bright_and_dark(4);
        let input = InputSpec {
            image_size: 16,
            channels: 1,
            mean: vec![0.5],
            std: vec![0.3],
        };
        let train: Vec<usize> = (0..data.len()).collect();
        let vs = nn::VarStore::new(Device::Cpu);
        let classifier = Classifier::new(&vs.root(), Backbone::Convnet, 1, 2);
        let mut optimizer = AdamW::new(&vs, 1e-3, 0.0).unwrap();
        let settings = SupervisedSettings {
            epochs: 100,
            batch_size: 4,
            learning_rate: 1e-3,
            trunk_lr_scale: 0.1,
            weight_decay: 0.0,
            augment: true,
            seed: 1,
            min_steps: 0,
            max_steps: None,
        };
        let images = LabelledImages {
            data: &data,
            train: &train,
            input: &input,
        };
        let mut calls = 0;
        let stopped = train_classifier(
            &classifier,
            &mut optimizer,
            &images,
            &settings,
            Device::Cpu,
            0,
            &mut |done| {
                calls += 1;
                Ok(if done.done == 3 {
                    ControlFlow::Break(StopReason::Cancel)
                } else {
                    ControlFlow::Continue(())
                })
            },
        )
        .unwrap();
        assert_eq!(stopped, Some(StopReason::Cancel));
        assert_eq!(calls, 3);
    }
}
