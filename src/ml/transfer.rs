//! Transfer: how a pretrained trunk becomes a classifier of the user's
//! labels. One method per label budget:
//! - `fine_tune`: the whole classifier trains, the trunk at a fraction of
//!   the head's learning rate;
//! - `linear_probe`: the trunk is frozen and only the linear head learns,
//!   which overfits least when labels are few;
//! - `knn`: nothing trains; an image takes the weighted vote of its nearest
//!   labelled images (cosine similarity of trunk features), which the
//!   classifier keeps beside its trunk;
//! - `auto`: one of the three, chosen by stratified cross-validation on the
//!   labelled training images alone, then fitted on all of them.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;

use anyhow::Context;
use tch::nn;
use tch::{Device, Kind, Tensor};

use super::backbone::{features, Backbone};
use super::checkpoint::{load_vars, save_model_weights_with};
use super::classifier::{is_trunk_variable, Classifier, NeighbourVote, Transfer};
use super::device::channels_last_weights;
use super::optimizer::AdamW;
use super::supervised::{train_classifier, LabelledImages, SupervisedSettings};
use super::training::{InputSpec, StopReason};
use crate::data::loader::{normalise, ImageTensorSet};
use crate::data::split::stratified_folds;

/// Folds of the cross-validation behind `auto`.
pub const AUTO_FOLDS: usize = 3;

/// Tensor names of a kNN classifier's memory in its weights file.
const BANK_FEATURES: &str = "knn.features";
const BANK_LABELS: &str = "knn.labels";
/// Query rows compared at once.
const VOTE_CHUNK: i64 = 1024;
/// Images per forward pass when remembering features.
const EMBED_BATCH: i64 = 256;

fn l2_normalise(x: &Tensor) -> Tensor {
    x / x
        .norm_scalaropt_dim(2, [1i64].as_slice(), true)
        .clamp_min(1e-12)
}

/// The labelled features a kNN classifier compares against.
pub struct NeighbourBank {
    /// `[N, D]`, L2-normalised, float, on the CPU.
    features: Tensor,
    /// `[N]` class indices.
    labels: Tensor,
    num_classes: i64,
    vote: NeighbourVote,
}

impl NeighbourBank {
    /// A bank of `features` (`[N, D]`, any norm) labelled `labels` (`[N]`).
    pub fn new(features: &Tensor, labels: &Tensor, num_classes: i64, vote: NeighbourVote) -> Self {
        let features =
            tch::no_grad(|| l2_normalise(&features.to_kind(Kind::Float))).to_device(Device::Cpu);
        Self {
            features,
            labels: labels.to_kind(Kind::Int64).to_device(Device::Cpu),
            num_classes,
            vote,
        }
    }

    /// Each query's share of the weighted votes per class (rows sum to 1).
    pub fn probabilities(&self, queries: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let queries = l2_normalise(&queries.to_kind(Kind::Float).to_device(Device::Cpu));
            let k = self.vote.k.min(self.features.size()[0]).max(1);
            let n = queries.size()[0];
            let mut chunks = Vec::new();
            for start in (0..n).step_by(VOTE_CHUNK as usize) {
                let rows = VOTE_CHUNK.min(n - start);
                let similarity = queries
                    .narrow(0, start, rows)
                    .matmul(&self.features.transpose(0, 1));
                let (top, indices) = similarity.topk(k, 1, true, true);
                let neighbour_labels = self
                    .labels
                    .index_select(0, &indices.flatten(0, -1))
                    .view([rows, k]);
                // Shifted by the row's best similarity: the same shares, no overflow.
                let best = top.narrow(1, 0, 1);
                let weights = ((top - best) / self.vote.temperature).exp();
                let votes = Tensor::zeros([rows, self.num_classes], (Kind::Float, Device::Cpu))
                    .scatter_add(1, &neighbour_labels, &weights);
                let totals = votes.sum_dim_intlist([1i64].as_slice(), true, Kind::Float);
                chunks.push(votes / totals);
            }
            Tensor::cat(&chunks, 0)
        })
    }

    /// The tensors stored beside the trunk in the classifier's weights.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            (BANK_FEATURES.to_string(), self.features.shallow_clone()),
            (BANK_LABELS.to_string(), self.labels.shallow_clone()),
        ]
    }

    /// The bank stored in a weights file.
    pub fn from_tensors(
        stored: &HashMap<String, Tensor>,
        num_classes: i64,
        vote: NeighbourVote,
    ) -> anyhow::Result<Self> {
        let get = |name: &str| {
            stored
                .get(name)
                .with_context(|| format!("the kNN classifier's weights lack `{name}`"))
        };
        Ok(Self::new(
            get(BANK_FEATURES)?,
            get(BANK_LABELS)?,
            num_classes,
            vote,
        ))
    }
}

/// Pooled trunk features of the images `indices`, on the CPU (no augmentation).
pub fn trunk_features(
    trunk: &nn::FuncT<'static>,
    data: &ImageTensorSet,
    indices: &[usize],
    input: &InputSpec,
    device: Device,
) -> Tensor {
    let indices: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
    tch::no_grad(|| {
        let chunks: Vec<Tensor> = indices
            .chunks(EMBED_BATCH as usize)
            .map(|chunk| {
                let images = data.images.index_select(0, &Tensor::from_slice(chunk));
                let images = normalise(&images, &input.mean, &input.std, device);
                features(trunk, &images, false).to_device(Device::Cpu)
            })
            .collect();
        Tensor::cat(&chunks, 0)
    })
}

fn labels_of(data: &ImageTensorSet, indices: &[usize]) -> Tensor {
    let labels: Vec<i64> = indices.iter().map(|&i| data.labels[i]).collect();
    Tensor::from_slice(&labels)
}

/// What a transfer starts from and trains with.
pub struct TransferSetup<'a> {
    pub device: Device,
    pub backbone: Backbone,
    /// The pretrained encoder; `None` starts from random weights.
    pub encoder_weights: Option<&'a Path>,
    pub data: &'a ImageTensorSet,
    pub input: &'a InputSpec,
    pub supervised: &'a SupervisedSettings,
    pub vote: NeighbourVote,
}

impl TransferSetup<'_> {
    fn num_classes(&self) -> usize {
        self.data.classes.len()
    }
}

/// The network a transfer method leaves.
pub enum TransferNetwork {
    /// Trunk and linear head (fine-tuned or probed).
    Linear(Classifier),
    /// Trunk and the labelled features it votes with (empty until fitted).
    Neighbours {
        trunk: nn::FuncT<'static>,
        bank: Option<NeighbourBank>,
    },
}

/// A classifier being fitted by one transfer method (never `auto`).
pub struct TransferModel {
    pub vs: nn::VarStore,
    pub network: TransferNetwork,
}

impl TransferModel {
    /// Builds the network of `method`, its trunk copied from the encoder
    /// when the setup names one, frozen for a linear probe.
    pub fn new(setup: &TransferSetup, method: Transfer) -> anyhow::Result<Self> {
        anyhow::ensure!(method != Transfer::Auto, "auto is resolved before fitting");
        tch::manual_seed(setup.supervised.seed);
        let vs = nn::VarStore::new(setup.device);
        let channels = setup.input.channels;
        let network = if method == Transfer::Knn {
            let trunk = setup.backbone.build(&vs.root(), channels as i64);
            TransferNetwork::Neighbours { trunk, bank: None }
        } else {
            let classifier =
                Classifier::new(&vs.root(), setup.backbone, channels, setup.num_classes());
            TransferNetwork::Linear(classifier)
        };
        if let Some(weights) = setup.encoder_weights {
            load_vars(&vs, weights, is_trunk_variable).context("Failed to load the encoder")?;
        }
        channels_last_weights(&vs);
        let mut model = Self { vs, network };
        if let (Transfer::LinearProbe, TransferNetwork::Linear(classifier)) =
            (method, &mut model.network)
        {
            classifier.freeze_trunk(&model.vs);
        }
        Ok(model)
    }

    /// Remembers the features of the labelled images `train` (kNN only).
    pub fn remember(&mut self, setup: &TransferSetup, train: &[usize]) {
        if let TransferNetwork::Neighbours { trunk, bank } = &mut self.network {
            let feats = trunk_features(trunk, setup.data, train, setup.input, setup.device);
            let labels = labels_of(setup.data, train);
            let num_classes = setup.num_classes() as i64;
            *bank = Some(NeighbourBank::new(&feats, &labels, num_classes, setup.vote));
        }
    }

    /// Fits on `train` from scratch to the end; `None` when `stop` says so.
    pub fn fit(
        &mut self,
        setup: &TransferSetup,
        train: &[usize],
        stop: &mut dyn FnMut() -> Option<StopReason>,
    ) -> anyhow::Result<Option<StopReason>> {
        let TransferNetwork::Linear(classifier) = &self.network else {
            self.remember(setup, train);
            return Ok(stop());
        };
        let mut optimizer = AdamW::new(
            &self.vs,
            setup.supervised.learning_rate,
            setup.supervised.weight_decay,
        )?;
        let images = LabelledImages {
            data: setup.data,
            train,
            input: setup.input,
        };
        train_classifier(
            classifier,
            &mut optimizer,
            &images,
            setup.supervised,
            setup.device,
            0,
            &mut |_| Ok(stop().map_or(ControlFlow::Continue(()), ControlFlow::Break)),
        )
    }

    /// Class probabilities of the images `indices`, `[N, classes]` on the CPU.
    pub fn probabilities(
        &self,
        data: &ImageTensorSet,
        indices: &[usize],
        input: &InputSpec,
        device: Device,
    ) -> Tensor {
        match &self.network {
            TransferNetwork::Linear(classifier) => {
                let feats = trunk_features(&classifier.trunk, data, indices, input, device);
                tch::no_grad(|| classifier.probabilities_of_features(&feats.to_device(device)))
                    .to_device(Device::Cpu)
            }
            TransferNetwork::Neighbours { trunk, bank } => {
                let bank = bank
                    .as_ref()
                    .expect("a kNN classifier is fitted before use");
                bank.probabilities(&trunk_features(trunk, data, indices, input, device))
            }
        }
    }

    /// Accuracy on the images `indices`.
    pub fn accuracy(
        &self,
        data: &ImageTensorSet,
        indices: &[usize],
        input: &InputSpec,
        device: Device,
    ) -> f64 {
        if indices.is_empty() {
            return 0.0;
        }
        let predicted = self
            .probabilities(data, indices, input, device)
            .argmax(1, false);
        let correct = predicted
            .eq_tensor(&labels_of(data, indices))
            .sum(Kind::Int64);
        i64::try_from(correct).unwrap_or(0) as f64 / indices.len() as f64
    }

    /// Writes the classifier's weights: trunk and head, or trunk and the
    /// kNN memory.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let extra = match &self.network {
            TransferNetwork::Linear(_) => Vec::new(),
            TransferNetwork::Neighbours { bank, .. } => bank
                .as_ref()
                .map(NeighbourBank::tensors)
                .unwrap_or_default(),
        };
        save_model_weights_with(&self.vs, path, |_| true, extra)
    }
}

/// Mean held-out accuracy of each candidate method over stratified folds of
/// the labelled images `train`, and the best of them.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoChoice {
    pub method: Transfer,
    pub scores: Vec<(Transfer, f64)>,
}

/// Chooses a method for `auto` by cross-validation on `train` alone; `None`
/// when `stop` says so. With fewer images than folds, fine-tuning is chosen
/// without a vote.
pub fn choose_transfer(
    setup: &TransferSetup,
    train: &[usize],
    stop: &mut dyn FnMut() -> Option<StopReason>,
) -> anyhow::Result<Option<AutoChoice>> {
    if train.len() < 2 * AUTO_FOLDS {
        return Ok(Some(AutoChoice {
            method: Transfer::FineTune,
            scores: Vec::new(),
        }));
    }
    let folds = stratified_folds(
        train,
        &setup.data.labels,
        setup.num_classes(),
        AUTO_FOLDS,
        setup.supervised.seed as u64,
    );
    let mut scores = Vec::new();
    for method in Transfer::CANDIDATES {
        let mut total = 0.0;
        for (i, held_out) in folds.iter().enumerate() {
            let fit_on: Vec<usize> = folds
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .flat_map(|(_, fold)| fold.iter().copied())
                .collect();
            let mut model = TransferModel::new(setup, method)?;
            if model.fit(setup, &fit_on, stop)?.is_some() {
                return Ok(None);
            }
            total += model.accuracy(setup.data, held_out, setup.input, setup.device);
        }
        scores.push((method, total / folds.len() as f64));
    }
    let best = scores
        .iter()
        .fold(
            None::<(Transfer, f64)>,
            |best, &(method, score)| match best {
                Some((_, top)) if top >= score => best,
                _ => Some((method, score)),
            },
        )
        .map(|(method, _)| method)
        .unwrap_or(Transfer::FineTune);
    Ok(Some(AutoChoice {
        method: best,
        scores,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two classes told apart by brightness, with a little spread.
    fn bright_and_dark(per_class: usize) -> ImageTensorSet {
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for i in 0..2 * per_class {
            let class = (i % 2) as i64;
            let base = if class == 0 { 30u8 } else { 200u8 };
            for p in 0..16 * 16 {
                pixels.push(base + ((i * 7 + p * 13) % 40) as u8);
            }
            labels.push(class);
        }
        ImageTensorSet {
            images: Tensor::from_slice(&pixels).view([(2 * per_class) as i64, 1, 16, 16]),
            labels,
            classes: vec!["dark".into(), "bright".into()],
        }
    }

    fn settings() -> SupervisedSettings {
        SupervisedSettings {
            epochs: 10,
            batch_size: 8,
            learning_rate: 1e-2,
            trunk_lr_scale: 0.1,
            weight_decay: 0.0,
            augment: false,
            seed: 3,
            min_steps: 0,
            max_steps: None,
        }
    }

    #[test]
    fn votes_go_to_the_nearest_labelled_features() {
        let bank = NeighbourBank::new(
            &Tensor::from_slice(&[1.0f32, 0.0, 0.9, 0.1, 0.0, 1.0]).view([3, 2]),
            &Tensor::from_slice(&[0i64, 0, 1]),
            2,
            NeighbourVote {
                k: 2,
                temperature: 0.1,
            },
        );
        let p = bank.probabilities(&Tensor::from_slice(&[2.0f32, 0.1, 0.0, 3.0]).view([2, 2]));
        assert_eq!(p.size(), vec![2, 2]);
        let p: Vec<Vec<f32>> = Vec::try_from(p).unwrap();
        assert!(p[0][0] > 0.99, "{p:?}");
        assert!(p[1][1] > 0.5, "{p:?}");
        for row in &p {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn every_method_fits_separable_images_and_auto_scores_each_candidate() {
        let data = bright_and_dark(12);
        let input = InputSpec {
            image_size: 16,
            channels: 1,
            mean: vec![0.5],
            std: vec![0.3],
        };
        let supervised = settings();
        let setup = TransferSetup {
            device: Device::Cpu,
            backbone: Backbone::Convnet,
            encoder_weights: None,
            data: &data,
            input: &input,
            supervised: &supervised,
            vote: NeighbourVote {
                k: 3,
                temperature: 0.07,
            },
        };
        let train: Vec<usize> = (0..16).collect();
        let test: Vec<usize> = (16..24).collect();
        for method in [Transfer::Knn, Transfer::LinearProbe, Transfer::FineTune] {
            let mut model = TransferModel::new(&setup, method).unwrap();
            assert_eq!(model.fit(&setup, &train, &mut || None).unwrap(), None);
            let accuracy = model.accuracy(&data, &test, &input, Device::Cpu);
            assert!(accuracy >= 0.75, "{method:?}: {accuracy}");
        }
        let choice = choose_transfer(&setup, &train, &mut || None)
            .unwrap()
            .unwrap();
        let scored: Vec<Transfer> = choice.scores.iter().map(|(m, _)| *m).collect();
        assert_eq!(scored, Transfer::CANDIDATES.to_vec());
        let best = choice.scores.iter().map(|(_, s)| *s).fold(0.0, f64::max);
        let chosen = choice
            .scores
            .iter()
            .find(|(m, _)| *m == choice.method)
            .unwrap()
            .1;
        assert_eq!(chosen, best);
    }

    #[test]
    fn a_knn_classifier_keeps_its_memory_in_its_weights() {
        let data = bright_and_dark(6);
        let input = InputSpec {
            image_size: 16,
            channels: 1,
            mean: vec![0.5],
            std: vec![0.3],
        };
        let supervised = settings();
        let vote = NeighbourVote {
            k: 3,
            temperature: 0.07,
        };
        let setup = TransferSetup {
            device: Device::Cpu,
            backbone: Backbone::Convnet,
            encoder_weights: None,
            data: &data,
            input: &input,
            supervised: &supervised,
            vote,
        };
        let mut model = TransferModel::new(&setup, Transfer::Knn).unwrap();
        let all: Vec<usize> = (0..12).collect();
        model.fit(&setup, &all, &mut || None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights.safetensors");
        model.save(&path).unwrap();
        let stored: HashMap<String, Tensor> = Tensor::read_safetensors(&path)
            .unwrap()
            .into_iter()
            .collect();
        let bank = NeighbourBank::from_tensors(&stored, 2, vote).unwrap();
        let before = model.probabilities(&data, &all, &input, Device::Cpu);
        let TransferNetwork::Neighbours { trunk, .. } = &model.network else {
            panic!("a kNN model keeps a trunk and a bank");
        };
        let after = bank.probabilities(&trunk_features(trunk, &data, &all, &input, Device::Cpu));
        assert!(before.allclose(&after, 1e-5, 1e-6, false));
    }
}
