//! The classifier every part of the service builds the same way: a
//! backbone's trunk followed by one linear head named `fc`, as in
//! torchvision. Fine-tuning, the label-efficiency evaluation, inference and
//! the weights a classifier leaves behind all go through [`Classifier`], so
//! the head's name, its place in the optimizer's groups and the rule that
//! tells trunk variables from head variables exist once. The ways a trunk
//! becomes a classifier ([`Transfer`]) are named here; `ml::transfer` runs them.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::backbone::{features, Backbone};

/// The head's variable path (torchvision's name for ResNet's last layer).
pub const HEAD_PATH: &str = "fc";
/// Optimizer group of the trunk's variables.
pub const TRUNK_GROUP: usize = 0;
/// Optimizer group of the head's variables.
pub const HEAD_GROUP: usize = 1;

/// Whether a variable of a classifier (or of an encoder's weights) belongs
/// to the trunk rather than the head.
pub fn is_trunk_variable(name: &str) -> bool {
    !name
        .strip_prefix(HEAD_PATH)
        .is_some_and(|rest| rest.starts_with('.'))
}

/// How a trunk is turned into a classifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transfer {
    #[serde(alias = "full")]
    FineTune,
    #[serde(alias = "linear")]
    LinearProbe,
    Knn,
    Auto,
    /// `auto`'s choice teaches: it labels the unlabelled images it is
    /// surest of, and a fine-tuned student learns from both.
    SelfTraining,
}

impl Transfer {
    /// Every method's API name, for validation messages.
    pub const ALL: [&'static str; 5] =
        ["fine_tune", "linear_probe", "knn", "auto", "self_training"];
    /// The methods `auto` chooses among, cheapest first (ties go to the cheaper).
    pub const CANDIDATES: [Transfer; 3] =
        [Transfer::Knn, Transfer::LinearProbe, Transfer::FineTune];

    /// The API name.
    pub fn name(self) -> &'static str {
        match self {
            Transfer::FineTune => "fine_tune",
            Transfer::LinearProbe => "linear_probe",
            Transfer::Knn => "knn",
            Transfer::Auto => "auto",
            Transfer::SelfTraining => "self_training",
        }
    }

    /// Parses an API name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "fine_tune" => Some(Transfer::FineTune),
            "linear_probe" => Some(Transfer::LinearProbe),
            "knn" => Some(Transfer::Knn),
            "auto" => Some(Transfer::Auto),
            "self_training" => Some(Transfer::SelfTraining),
            _ => None,
        }
    }

    /// Whether the method trains with the supervised loop.
    pub fn trains(self) -> bool {
        matches!(
            self,
            Transfer::FineTune | Transfer::LinearProbe | Transfer::SelfTraining
        )
    }
}

/// Which unlabelled images self-training's teacher labels (named as in the
/// API; [`Default`] holds the documented defaults, also for configs stored
/// before self-training existed).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PseudoLabelling {
    /// Most pseudo-labels per class: the teacher's surest predictions of it.
    #[serde(rename = "pseudo_labels_per_class")]
    pub per_class: i64,
    /// Least teacher confidence (probability of its class) a pseudo-label needs.
    #[serde(rename = "pseudo_label_threshold")]
    pub threshold: f64,
    /// Most unlabelled images the teacher looks at (a seeded sample).
    pub max_unlabelled: i64,
}

impl Default for PseudoLabelling {
    fn default() -> Self {
        Self {
            per_class: 200,
            threshold: 0.5,
            max_unlabelled: 20_000,
        }
    }
}

/// How a kNN classifier votes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NeighbourVote {
    /// Neighbours that vote.
    pub k: i64,
    /// Votes are weighted `exp(similarity / temperature)`.
    pub temperature: f64,
}

/// A trunk and a linear head over its pooled features.
pub struct Classifier {
    pub trunk: nn::FuncT<'static>,
    pub head: nn::Linear,
    /// A frozen trunk runs without gradients and in evaluation mode.
    frozen_trunk: bool,
}

impl Classifier {
    /// Builds a classifier under `root`: the trunk's variables in
    /// [`TRUNK_GROUP`], the head's (`fc.weight`, `fc.bias`) in [`HEAD_GROUP`].
    pub fn new(root: &nn::Path, backbone: Backbone, channels: u8, num_classes: usize) -> Self {
        let trunk = backbone.build(&root.set_group(TRUNK_GROUP), channels as i64);
        let head = nn::linear(
            root.set_group(HEAD_GROUP) / HEAD_PATH,
            backbone.feature_dim(),
            num_classes as i64,
            Default::default(),
        );
        Self {
            trunk,
            head,
            frozen_trunk: false,
        }
    }

    /// Stops the trunk's variables from learning (a linear probe): only the
    /// head is trained.
    pub fn freeze_trunk(&mut self, vs: &nn::VarStore) {
        for (name, var) in vs.variables() {
            if is_trunk_variable(&name) {
                let _ = var.set_requires_grad(false);
            }
        }
        self.frozen_trunk = true;
    }

    /// Pooled trunk features of a normalised batch.
    pub fn features(&self, images: &Tensor, train: bool) -> Tensor {
        if self.frozen_trunk {
            tch::no_grad(|| features(&self.trunk, images, false))
        } else {
            features(&self.trunk, images, train)
        }
    }

    /// Class logits of a normalised batch.
    pub fn logits(&self, images: &Tensor, train: bool) -> Tensor {
        self.head.forward(&self.features(images, train))
    }

    /// Class probabilities from features already computed by the trunk.
    pub fn probabilities_of_features(&self, features: &Tensor) -> Tensor {
        self.head.forward(features).softmax(-1, Kind::Float)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trunk_and_head_variables_are_told_apart_by_name() {
        assert!(!is_trunk_variable("fc.weight"));
        assert!(!is_trunk_variable("fc.bias"));
        assert!(is_trunk_variable("conv1.weight"));
        assert!(is_trunk_variable("fcx.weight"));
        assert!(is_trunk_variable("layer1.0.bn1.running_mean"));
    }

    #[test]
    fn a_classifier_names_its_head_fc_and_gives_logits_per_class() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let classifier = Classifier::new(&vs.root(), Backbone::Convnet, 1, 5);
        let names: Vec<String> = vs.variables().into_keys().collect();
        assert!(names.contains(&"fc.weight".to_string()), "{names:?}");
        assert!(names.contains(&"fc.bias".to_string()), "{names:?}");
        let logits = classifier.logits(&Tensor::zeros([3, 1, 28, 28], tch::kind::FLOAT_CPU), false);
        assert_eq!(logits.size(), vec![3, 5]);
    }

    #[test]
    fn a_frozen_trunk_learns_nothing() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let mut classifier = Classifier::new(&vs.root(), Backbone::Convnet, 1, 3);
        classifier.freeze_trunk(&vs);
        for (name, var) in vs.variables() {
            assert_eq!(var.requires_grad(), !is_trunk_variable(&name), "{name}");
        }
        let logits = classifier.logits(&Tensor::ones([2, 1, 28, 28], tch::kind::FLOAT_CPU), true);
        assert!(logits.requires_grad());
    }
}
