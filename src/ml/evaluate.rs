//! Evaluating representations the way the field does: k-nearest-neighbour
//! accuracy and a linear probe on frozen embeddings, and the label-efficiency
//! protocol (fine-tune from the pretrained encoder and from scratch on the
//! same label budgets, same seeds, same epochs, and report the gain).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::backbone::{features, Backbone};
use super::checkpoint::load_vars;
use super::classifier::{is_trunk_variable, NeighbourVote, Transfer};
use super::optimizer::AdamW;
use super::self_training::{left_unlabelled, student_set_size, teach, PseudoLabels};
use super::supervised::SupervisedSettings;
use super::training::{
    cosine_learning_rate, EvaluationReport, InputSpec, PermanentError, StopReason, TrainingContext,
    TrainingEvent, TrainingOutcome,
};
use super::transfer::{
    choose_transfer, trunk_features, NeighbourBank, TransferModel, TransferSetup, AUTO_FOLDS,
};
use crate::data::batches::epoch_order;
use crate::data::labels::LabelSet;
use crate::data::loader::{load_image_set, normalise, ImageTensorSet};
use crate::data::split::{apply_budget, stratified_split, LabelBudget};
use crate::jobs::config::{EvaluateConfig, FrozenProbeSettings, Protocol};

/// Images per forward pass when embedding.
const EMBED_BATCH: i64 = 256;

/// Where the labelled images come from and the settings of each protocol.
#[derive(Debug, Clone)]
pub struct EvaluationData {
    pub dataset_dir: PathBuf,
    /// A separate labelled test set; else `test_fraction` of the dataset, stratified.
    pub test_dataset_dir: Option<PathBuf>,
    pub test_fraction: f64,
    pub seed: i64,
    pub max_image_pixels: u64,
    pub probes: FrozenProbeSettings,
    /// The labels sent after the dataset's upload to use, instead of the archive's.
    pub labels: Option<LabelSet>,
}

/// Which frozen-embedding protocols to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrozenProtocols {
    Knn,
    Linear,
    KnnAndLinear,
}

/// Labelled images split into train and test, labels aligned on one class list.
pub struct LabelledSplit {
    pub data: ImageTensorSet,
    pub train: Vec<usize>,
    pub test: Vec<usize>,
}

/// Loads the evaluation images at the model's input size.
pub fn load_split(evaluation: &EvaluationData, input: &InputSpec) -> anyhow::Result<LabelledSplit> {
    let load = |dir: &Path| {
        load_image_set(
            dir,
            input.image_size,
            input.channels,
            evaluation.max_image_pixels,
        )
        .map_err(|e| PermanentError(format!("the evaluation dataset could not be loaded: {e:#}")))
    };
    let mut data = load(&evaluation.dataset_dir)?;
    if let Some(labels) = &evaluation.labels {
        data.relabel(labels)?;
    }
    if data.classes.is_empty() {
        return Err(PermanentError("the evaluation dataset has no labels".into()).into());
    }
    let num_classes = data.classes.len();
    match &evaluation.test_dataset_dir {
        None => {
            let (train, test) = stratified_split(
                &data.labels,
                num_classes,
                evaluation.test_fraction,
                evaluation.seed as u64,
            );
            if test.is_empty() {
                return Err(PermanentError(
                    "the test split is empty; raise config.test_fraction or give test_dataset_id"
                        .into(),
                )
                .into());
            }
            Ok(LabelledSplit { data, train, test })
        }
        Some(dir) => {
            let test = load(dir)?;
            let mut labels = Vec::with_capacity(test.len());
            for &label in &test.labels {
                let name = &test.classes[label as usize];
                let index = data.classes.iter().position(|c| c == name).ok_or_else(|| {
                    PermanentError(format!(
                        "the test dataset's class `{name}` is not a class of the dataset"
                    ))
                })?;
                labels.push(index as i64);
            }
            let n_train = data.len();
            let train: Vec<usize> = (0..n_train).collect();
            let test_idx: Vec<usize> = (n_train..n_train + test.len()).collect();
            data.images = Tensor::cat(&[&data.images, &test.images], 0);
            data.labels.extend(labels);
            Ok(LabelledSplit {
                data,
                train,
                test: test_idx,
            })
        }
    }
}

/// Pooled trunk features of uint8 images `[N, C, S, S]`, on the CPU, or
/// `None` when `stop` says so between two batches.
pub fn embed_all(
    trunk: &nn::FuncT<'static>,
    images: &Tensor,
    input: &InputSpec,
    device: Device,
    stop: &dyn Fn() -> bool,
) -> Option<Tensor> {
    tch::no_grad(|| {
        let n = images.size()[0];
        let mut chunks = Vec::new();
        for start in (0..n).step_by(EMBED_BATCH as usize) {
            if stop() {
                return None;
            }
            let batch = images.narrow(0, start, EMBED_BATCH.min(n - start));
            let normalised = normalise(&batch, &input.mean, &input.std, device);
            chunks.push(features(trunk, &normalised, false).to_device(Device::Cpu));
        }
        Some(Tensor::cat(&chunks, 0))
    })
}

/// Frozen embeddings of a train and a test split, with their labels.
pub struct LabelledFeatures<'a> {
    pub train: &'a Tensor,
    pub train_labels: &'a Tensor,
    pub test: &'a Tensor,
    pub test_labels: &'a Tensor,
    pub num_classes: i64,
}

/// Weighted k-nearest-neighbour accuracy (cosine similarity, votes weighted
/// by `exp(similarity / temperature)`).
pub fn knn_accuracy(features: &LabelledFeatures, k: i64, temperature: f64) -> f64 {
    let LabelledFeatures {
        train,
        train_labels,
        test,
        test_labels,
        num_classes,
    } = *features;
    let vote = NeighbourVote { k, temperature };
    let bank = NeighbourBank::new(train, train_labels, num_classes, vote);
    let predicted = bank.probabilities(test).argmax(1, false);
    let correct = i64::try_from(predicted.eq_tensor(test_labels).sum(Kind::Int64)).unwrap_or(0);
    correct as f64 / test.size()[0].max(1) as f64
}

/// Test accuracy of a linear classifier trained on frozen features
/// (standardised with the train set's statistics), or `None` when `stop`
/// says so between two steps.
pub fn linear_probe_accuracy(
    features: &LabelledFeatures,
    epochs: i64,
    learning_rate: f64,
    seed: i64,
    stop: &dyn Fn() -> bool,
) -> anyhow::Result<Option<f64>> {
    let LabelledFeatures {
        train,
        train_labels,
        test,
        test_labels,
        num_classes,
    } = *features;
    let mean = train.mean_dim(&[0i64][..], true, Kind::Float);
    let std = train.std_dim(&[0i64][..], false, true).clamp_min(1e-6);
    let train = ((train - &mean) / &std).detach();
    let test = ((test - &mean) / &std).detach();
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let probe = nn::linear(
        vs.root() / "probe",
        train.size()[1],
        num_classes,
        Default::default(),
    );
    let mut optimizer = AdamW::new(&vs, learning_rate, 1e-4)?;
    let n = train.size()[0] as usize;
    let batch = 256.min(n).max(1);
    let steps_per_epoch = n.div_ceil(batch) as i64;
    let total = epochs * steps_per_epoch;
    let mut order = Vec::new();
    for step in 0..total {
        if stop() {
            return Ok(None);
        }
        let within = (step % steps_per_epoch) as usize;
        if within == 0 {
            order = epoch_order(n, seed, step / steps_per_epoch);
        }
        let chunk = &order[within * batch..((within + 1) * batch).min(n)];
        let idx = Tensor::from_slice(chunk);
        let logits = probe.forward(&train.index_select(0, &idx));
        let loss = logits.cross_entropy_for_logits(&train_labels.index_select(0, &idx));
        optimizer.set_lr(cosine_learning_rate(learning_rate, step, total));
        optimizer.backward_step(&loss);
    }
    let accuracy = tch::no_grad(|| probe.forward(&test).accuracy_for_logits(test_labels));
    Ok(Some(f64::try_from(accuracy)?))
}

fn labels_tensor(split: &LabelledSplit, indices: &[usize]) -> Tensor {
    let labels: Vec<i64> = indices.iter().map(|&i| split.data.labels[i]).collect();
    Tensor::from_slice(&labels)
}

fn index_tensor(indices: &[usize]) -> Tensor {
    let idx: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
    Tensor::from_slice(&idx)
}

/// kNN and/or linear-probe accuracy of a trunk on a labelled split, or
/// `None` when `stop` says so (checked between embedding batches and
/// probe steps).
pub fn evaluate_frozen(
    trunk: &nn::FuncT<'static>,
    input: &InputSpec,
    device: Device,
    evaluation: &EvaluationData,
    protocols: FrozenProtocols,
    stop: &dyn Fn() -> bool,
) -> anyhow::Result<Option<EvaluationReport>> {
    let split = load_split(evaluation, input)?;
    let num_classes = split.data.classes.len() as i64;
    let Some(embeddings) = embed_all(trunk, &split.data.images, input, device, stop) else {
        return Ok(None);
    };
    let train = embeddings.index_select(0, &index_tensor(&split.train));
    let test = embeddings.index_select(0, &index_tensor(&split.test));
    let (train_labels, test_labels) = (
        labels_tensor(&split, &split.train),
        labels_tensor(&split, &split.test),
    );
    let mut summary = BTreeMap::new();
    let mut row = serde_json::Map::new();
    let mut columns = vec!["train_images".to_string(), "test_images".to_string()];
    row.insert("train_images".into(), split.train.len().into());
    row.insert("test_images".into(), split.test.len().into());
    let labelled = LabelledFeatures {
        train: &train,
        train_labels: &train_labels,
        test: &test,
        test_labels: &test_labels,
        num_classes,
    };
    if protocols != FrozenProtocols::Linear {
        let accuracy = knn_accuracy(
            &labelled,
            evaluation.probes.k,
            evaluation.probes.knn_temperature,
        );
        summary.insert("knn_accuracy".to_string(), accuracy);
        columns.extend(["k".to_string(), "knn_accuracy".to_string()]);
        row.insert("k".into(), evaluation.probes.k.into());
        row.insert("knn_accuracy".into(), accuracy.into());
    }
    if protocols != FrozenProtocols::Knn {
        let Some(accuracy) = linear_probe_accuracy(
            &labelled,
            evaluation.probes.linear_epochs,
            evaluation.probes.linear_learning_rate,
            evaluation.seed,
            stop,
        )?
        else {
            return Ok(None);
        };
        summary.insert("linear_accuracy".to_string(), accuracy);
        columns.push("linear_accuracy".to_string());
        row.insert("linear_accuracy".into(), accuracy.into());
    }
    let protocol = match protocols {
        FrozenProtocols::Knn => "knn",
        FrozenProtocols::Linear => "linear",
        FrozenProtocols::KnnAndLinear => "knn+linear",
    };
    Ok(Some(EvaluationReport {
        protocol: protocol.to_string(),
        columns,
        rows: vec![serde_json::Value::Object(row)],
        summary,
        train_images: split.train.len(),
        test_images: split.test.len(),
        test_images_seen_in_pretraining: false,
        note: None,
    }))
}

/// Labelled images per class the kNN monitor keeps as neighbours, and asks about.
const MONITOR_BANK_PER_CLASS: usize = 100;
const MONITOR_QUERIES_PER_CLASS: usize = 50;

/// The online kNN monitor of a pretraining job: a fixed, class-balanced
/// sample of the evaluation dataset (neighbours from its train split,
/// queries from its test split), embedded by the encoder so far every few
/// epochs, so that users see whether more pretraining still pays.
pub struct KnnMonitor {
    split: LabelledSplit,
    vote: NeighbourVote,
}

impl KnnMonitor {
    /// Loads the sample at the encoder's input size.
    pub fn new(evaluation: &EvaluationData, input: &InputSpec) -> anyhow::Result<Self> {
        let mut split = load_split(evaluation, input)?;
        let num_classes = split.data.classes.len();
        let seed = evaluation.seed as u64;
        let sample = |pool: &[usize], per_class| {
            apply_budget(
                pool,
                &split.data.labels,
                num_classes,
                LabelBudget::PerClass(per_class),
                seed,
            )
        };
        let (train, test) = (
            sample(&split.train, MONITOR_BANK_PER_CLASS),
            sample(&split.test, MONITOR_QUERIES_PER_CLASS),
        );
        (split.train, split.test) = (train, test);
        Ok(Self {
            split,
            vote: NeighbourVote {
                k: evaluation.probes.k,
                temperature: evaluation.probes.knn_temperature,
            },
        })
    }

    /// The kNN accuracy of `trunk`'s features on the sample.
    pub fn accuracy(&self, trunk: &nn::FuncT<'static>, input: &InputSpec, device: Device) -> f64 {
        let data = &self.split.data;
        let bank = NeighbourBank::new(
            &trunk_features(trunk, data, &self.split.train, input, device),
            &labels_tensor(&self.split, &self.split.train),
            data.classes.len() as i64,
            self.vote,
        );
        let queries = trunk_features(trunk, data, &self.split.test, input, device);
        let predicted = bank.probabilities(&queries).argmax(1, false);
        let correct = predicted
            .eq_tensor(&labels_tensor(&self.split, &self.split.test))
            .sum(Kind::Int64);
        i64::try_from(correct).unwrap_or(0) as f64 / self.split.test.len().max(1) as f64
    }
}

/// Runs an evaluate job's protocol on the encoder `source`: kNN or a linear
/// probe on its frozen embeddings, or the label-efficiency comparison.
pub fn run_evaluation(
    ctx: &TrainingContext,
    source: &EncoderSource,
    evaluation: &EvaluationData,
    config: &EvaluateConfig,
) -> anyhow::Result<TrainingOutcome> {
    ctx.emit(TrainingEvent::Plan {
        epochs: 1,
        steps: 1,
        start_step: 0,
    });
    let protocols = match config.protocol {
        Protocol::Knn => FrozenProtocols::Knn,
        Protocol::Linear => FrozenProtocols::Linear,
        Protocol::LabelEfficiency => return run_label_efficiency(ctx, source, evaluation, config),
    };
    let (_vs, trunk) = load_trunk(source, ctx.device)?;
    let stop = || ctx.stop.requested().is_some();
    let report = evaluate_frozen(
        &trunk,
        &source.input,
        ctx.device,
        evaluation,
        protocols,
        &stop,
    )?;
    Ok(match report {
        Some(report) => TrainingOutcome::Evaluated(report),
        None => TrainingOutcome::Stopped(ctx.stop.requested().unwrap_or(StopReason::Release)),
    })
}

/// The encoder under evaluation.
pub struct EncoderSource<'a> {
    pub backbone: Backbone,
    pub weights: &'a Path,
    pub input: InputSpec,
}

/// Loads an encoder's trunk for frozen evaluation.
pub fn load_trunk(
    source: &EncoderSource,
    device: Device,
) -> anyhow::Result<(nn::VarStore, nn::FuncT<'static>)> {
    let vs = nn::VarStore::new(device);
    let trunk = source
        .backbone
        .build(&vs.root(), source.input.channels as i64);
    load_vars(&vs, source.weights, is_trunk_variable).context("Failed to load the encoder")?;
    Ok((vs, trunk))
}

/// What one budget's runs share: the steps done so far (for progress) and
/// `auto`'s choice, made once and reused by self-training's teacher.
struct BudgetRuns {
    steps_done: i64,
    auto_choice: Option<Transfer>,
}

/// One classifier's test accuracy and how it was made.
struct TestedFit {
    accuracy: f64,
    /// The method used (`auto`'s choice; self-training's teacher).
    used: Transfer,
    /// Self-training's pseudo-labels.
    pseudo: Option<PseudoLabels>,
}

/// Makes one classifier from `train` (from the encoder by `method`, or from
/// scratch by fine-tuning when `method` is `None`) and tests it, or `None`
/// when the job was asked to stop. Self-training pseudo-labels the split's
/// other training images, whose labels it never reads.
fn fit_and_test(
    ctx: &TrainingContext,
    source: &EncoderSource,
    method: Option<Transfer>,
    split: &LabelledSplit,
    train: &[usize],
    settings: &EvaluateConfig,
    runs: &mut BudgetRuns,
) -> anyhow::Result<Option<TestedFit>> {
    let supervised = match method {
        Some(_) => settings.supervised_settings(),
        None => settings.scratch_settings(),
    };
    let setup = TransferSetup {
        device: ctx.device,
        backbone: source.backbone,
        encoder_weights: method.is_some().then_some(source.weights),
        data: &split.data,
        input: &source.input,
        supervised: &supervised,
        vote: NeighbourVote {
            k: settings.probes.k,
            temperature: settings.probes.knn_temperature,
        },
    };
    let steps_done = &mut runs.steps_done;
    let mut stop = || {
        *steps_done += 1;
        ctx.stop.requested()
    };
    let requested = method.unwrap_or(Transfer::FineTune);
    let method = match requested {
        Transfer::Auto | Transfer::SelfTraining => match runs.auto_choice {
            Some(choice) => choice,
            None => match choose_transfer(&setup, train, &mut stop)? {
                Some(choice) => *runs.auto_choice.insert(choice.method),
                None => return Ok(None),
            },
        },
        method => method,
    };
    if requested == Transfer::SelfTraining {
        let unlabelled = left_unlabelled(&split.train, train);
        let Some(lesson) = teach(
            &setup,
            method,
            train,
            &unlabelled,
            &settings.pseudo,
            &mut stop,
        )?
        else {
            return Ok(None);
        };
        let student_setup = TransferSetup {
            data: &lesson.data,
            ..setup
        };
        let mut student = TransferModel::new(&student_setup, Transfer::FineTune)?;
        if student
            .fit(&student_setup, &lesson.train, &mut stop)?
            .is_some()
        {
            return Ok(None);
        }
        let accuracy = student.accuracy(&split.data, &split.test, &source.input, ctx.device);
        return Ok(Some(TestedFit {
            accuracy,
            used: method,
            pseudo: Some(lesson.pseudo),
        }));
    }
    let mut model = TransferModel::new(&setup, method)?;
    if model.fit(&setup, train, &mut stop)?.is_some() {
        return Ok(None);
    }
    let accuracy = model.accuracy(&split.data, &split.test, &source.input, ctx.device);
    Ok(Some(TestedFit {
        accuracy,
        used: method,
        pseudo: None,
    }))
}

/// Every budget of the protocol with its name and the training images it
/// draws from the split (a smaller budget's images are among a larger one's).
fn label_budgets(split: &LabelledSplit, settings: &EvaluateConfig) -> Vec<(String, Vec<usize>)> {
    let num_classes = split.data.classes.len();
    let per_class = settings
        .labels_per_class
        .iter()
        .map(|&k| (format!("{k} per class"), LabelBudget::PerClass(k as usize)));
    let fractions = settings.label_fractions.iter().map(|&f| {
        (
            format!("{}%", (f * 100_000.0).round() / 1000.0),
            LabelBudget::Fraction(f),
        )
    });
    per_class
        .chain(fractions)
        .map(|(name, budget)| {
            let seed = settings.seed as u64;
            let subset = apply_budget(&split.train, &split.data.labels, num_classes, budget, seed);
            (name, subset)
        })
        .collect()
}

/// The label-efficiency protocol: for every budget, a classifier from
/// scratch and one from the encoder by each transfer method, with the same
/// labels, seeds and settings; reports every test accuracy and the gains.
pub fn run_label_efficiency(
    ctx: &TrainingContext,
    source: &EncoderSource,
    evaluation: &EvaluationData,
    settings: &EvaluateConfig,
) -> anyhow::Result<TrainingOutcome> {
    let split = load_split(evaluation, &source.input)?;
    let subsets = label_budgets(&split, settings);
    let supervised = settings.supervised_settings();
    let planned: i64 = subsets
        .iter()
        .map(|(_, subset)| {
            let classes = split.data.classes.len();
            let unlabelled = split.train.len() - subset.len();
            let student = most_student_images(settings, classes, subset.len(), unlabelled);
            planned_steps(&supervised, &settings.transfers, subset.len(), student)
        })
        .sum();
    ctx.emit(TrainingEvent::Plan {
        epochs: settings.epochs,
        steps: planned,
        start_step: 0,
    });
    let mut rows = Vec::new();
    let mut summary = BTreeMap::new();
    let mut steps_done = 0i64;
    for (name, subset) in &subsets {
        let key = name.replace(' ', "_").replace('%', "pct");
        let mut runs = BudgetRuns {
            steps_done,
            auto_choice: None,
        };
        let mut fit =
            |method| fit_and_test(ctx, source, method, &split, subset, settings, &mut runs);
        let Some(TestedFit {
            accuracy: scratch, ..
        }) = fit(None)?
        else {
            return Ok(stopped(ctx));
        };
        let mut row = serde_json::json!({
            "budget": name,
            "labels": subset.len(),
            "scratch_accuracy": scratch,
        });
        let mut metrics = vec![(format!("scratch_accuracy_{key}"), scratch)];
        for (i, &method) in settings.transfers.iter().enumerate() {
            let Some(TestedFit {
                accuracy,
                used,
                pseudo,
            }) = fit(Some(method))?
            else {
                return Ok(stopped(ctx));
            };
            let m = method.name();
            row[format!("{m}_accuracy")] = accuracy.into();
            row[format!("{m}_gain")] = (accuracy - scratch).into();
            match method {
                Transfer::Auto => row["auto_choice"] = used.name().into(),
                Transfer::SelfTraining => {
                    row["self_training_teacher"] = used.name().into();
                    if let Some(pseudo) = pseudo {
                        row["pseudo_labels"] = pseudo.images.len().into();
                        // The hidden labels only describe the pseudo-labels;
                        // nothing is chosen by them.
                        row["pseudo_label_agreement"] =
                            pseudo.agreement_with(&split.data.labels).into();
                    }
                }
                _ => {}
            }
            if i == 0 {
                row["pretrained_accuracy"] = accuracy.into();
                row["gain"] = (accuracy - scratch).into();
                summary.insert(format!("label_efficiency_gain_{key}"), accuracy - scratch);
                metrics.push((format!("pretrained_accuracy_{key}"), accuracy));
            }
            if settings.transfers.len() > 1 {
                metrics.push((format!("{m}_accuracy_{key}"), accuracy));
            }
        }
        steps_done = runs.steps_done;
        ctx.emit(TrainingEvent::Report {
            epoch: settings.epochs,
            step: steps_done,
            metrics,
        });
        rows.push(row);
    }
    Ok(TrainingOutcome::Evaluated(EvaluationReport {
        protocol: "label_efficiency".to_string(),
        columns: label_efficiency_columns(&settings.transfers),
        rows,
        summary,
        train_images: split.train.len(),
        test_images: split.test.len(),
        test_images_seen_in_pretraining: false,
        note: None,
    }))
}

/// The steps one budget of `images` labels costs: scratch, then each method
/// (kNN one pass, `auto` its cross-validation and a final fit,
/// self-training the same cross-validation unless `auto` made it, a
/// teacher and a student of at most `student_images` images).
fn planned_steps(
    supervised: &SupervisedSettings,
    transfers: &[Transfer],
    images: usize,
    student_images: usize,
) -> i64 {
    let steps = supervised.plan(images).total_steps;
    let fold = supervised.plan(images - images / AUTO_FOLDS).total_steps;
    let cross_validation = AUTO_FOLDS as i64 * (1 + 2 * fold);
    let method_steps = |method: Transfer| match method {
        Transfer::Knn => 1,
        Transfer::Auto => cross_validation + steps,
        Transfer::SelfTraining => {
            let student = supervised.plan(student_images).total_steps;
            let shared = transfers.contains(&Transfer::Auto);
            (if shared { 0 } else { cross_validation }) + steps + student
        }
        _ => steps,
    };
    steps + transfers.iter().map(|&m| method_steps(m)).sum::<i64>()
}

/// The most images self-training's student can train on with `labels`
/// labels and `unlabelled` candidates.
fn most_student_images(
    settings: &EvaluateConfig,
    classes: usize,
    labels: usize,
    unlabelled: usize,
) -> usize {
    let pseudo = settings.pseudo;
    let candidates = unlabelled.min(pseudo.max_unlabelled.max(0) as usize);
    student_set_size(
        labels,
        candidates.min(classes * pseudo.per_class.max(0) as usize),
    )
}

fn stopped(ctx: &TrainingContext) -> TrainingOutcome {
    TrainingOutcome::Stopped(ctx.stop.requested().unwrap_or(StopReason::Release))
}

/// The report's columns: the budget, scratch, the first method's accuracy
/// and gain (`pretrained_accuracy`, `gain`), then every method's.
fn label_efficiency_columns(transfers: &[Transfer]) -> Vec<String> {
    let mut columns: Vec<String> = [
        "budget",
        "labels",
        "pretrained_accuracy",
        "scratch_accuracy",
        "gain",
    ]
    .map(String::from)
    .to_vec();
    if transfers.len() > 1 {
        for method in transfers {
            columns.push(format!("{}_accuracy", method.name()));
            columns.push(format!("{}_gain", method.name()));
        }
    }
    if transfers.contains(&Transfer::Auto) {
        columns.push("auto_choice".to_string());
    }
    if transfers.contains(&Transfer::SelfTraining) {
        for column in [
            "self_training_teacher",
            "pseudo_labels",
            "pseudo_label_agreement",
        ] {
            columns.push(column.to_string());
        }
    }
    columns
}

impl EvaluateConfig {
    /// The supervised loop's settings of every label-efficiency run: always
    /// augmented, never capped.
    pub fn supervised_settings(&self) -> SupervisedSettings {
        SupervisedSettings {
            epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            trunk_lr_scale: self.trunk_lr_scale,
            weight_decay: self.weight_decay,
            augment: true,
            seed: self.seed,
            min_steps: self.min_steps,
            max_steps: None,
        }
    }

    /// The settings of a run from scratch: the same, but a random trunk has
    /// nothing to keep, so it learns at the head's rate (slowing it would
    /// handicap the baseline).
    pub fn scratch_settings(&self) -> SupervisedSettings {
        SupervisedSettings {
            trunk_lr_scale: 1.0,
            ..self.supervised_settings()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three well separated clusters with a little noise.
    fn clusters(per_class: i64, seed: i64) -> (Tensor, Tensor) {
        tch::manual_seed(seed);
        let centres =
            Tensor::from_slice(&[5.0f32, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 5.0]).view([3, 3]);
        let labels = Tensor::arange(3, (Kind::Int64, Device::Cpu))
            .repeat_interleave_self_int(per_class, 0, None);
        let points = centres.index_select(0, &labels)
            + Tensor::randn([3 * per_class, 3], (Kind::Float, Device::Cpu));
        (points, labels)
    }

    #[test]
    fn scratch_runs_train_their_random_trunk_at_the_heads_rate() {
        let config =
            crate::validation::parse_config_object::<crate::jobs::config::EvaluateConfigRequest>(
                serde_json::json!({"protocol": "label_efficiency", "trunk_lr_scale": 0.3}),
            )
            .unwrap()
            .resolve()
            .unwrap();
        let from_encoder = config.supervised_settings();
        let scratch = config.scratch_settings();
        assert_eq!(from_encoder.trunk_lr_scale, 0.3);
        assert_eq!(scratch.trunk_lr_scale, 1.0);
        assert_eq!(
            SupervisedSettings {
                trunk_lr_scale: 0.3,
                ..scratch
            },
            from_encoder,
            "everything else is shared"
        );
    }

    #[test]
    fn knn_and_linear_probe_separate_known_clusters() {
        let (train, train_labels) = clusters(30, 1);
        let (test, test_labels) = clusters(20, 2);
        let features = LabelledFeatures {
            train: &train,
            train_labels: &train_labels,
            test: &test,
            test_labels: &test_labels,
            num_classes: 3,
        };
        let knn = knn_accuracy(&features, 5, 0.07);
        assert!(knn > 0.95, "{knn}");
        let linear = linear_probe_accuracy(&features, 50, 0.05, 0, &|| false)
            .unwrap()
            .expect("nothing asked it to stop");
        assert!(linear > 0.95, "{linear}");
        // Asked to stop, the probe answers nothing.
        let stopped = linear_probe_accuracy(&features, 50, 0.05, 0, &|| true).unwrap();
        assert!(stopped.is_none(), "{stopped:?}");
    }

    #[test]
    fn knn_is_at_chance_on_shuffled_labels() {
        let (train, _) = clusters(30, 3);
        let (test, test_labels) = clusters(30, 4);
        let random = Tensor::randint(3, [90], (Kind::Int64, Device::Cpu));
        let features = LabelledFeatures {
            train: &train,
            train_labels: &random,
            test: &test,
            test_labels: &test_labels,
            num_classes: 3,
        };
        let knn = knn_accuracy(&features, 5, 0.07);
        assert!(knn < 0.6, "{knn}");
    }
}
