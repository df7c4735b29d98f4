//! Self-training: the transfer method that also learns from the images
//! nobody labelled. A teacher (the method `auto` chooses, fitted on the
//! labels) predicts the unlabelled images; its surest predictions of each
//! class become pseudo-labels, and a student fine-tuned from the same
//! encoder learns from the labels and the pseudo-labels together (Yarowsky,
//! ACL 1995; Xie et al., "Noisy Student", CVPR 2020, one round, with the
//! student's usual augmentation as its noise). This module owns the choice
//! of pseudo-labels and the student's training set; `ml::transfer` fits
//! teacher and student.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::{Kind, Tensor};

use super::classifier::{PseudoLabelling, Transfer};
use super::training::StopReason;
use super::transfer::{TransferModel, TransferSetup};
use crate::data::loader::ImageTensorSet;

/// The smallest share of the student's training set the labelled images
/// make, as a divisor: with many pseudo-labels, the labelled images are
/// repeated until they are at least a quarter of it.
const LABELLED_SHARE_DIVISOR: usize = 4;

/// Unlabelled images with the class the teacher gave each.
#[derive(Debug, Clone, PartialEq)]
pub struct PseudoLabels {
    /// Indices into the image set, ascending.
    pub images: Vec<usize>,
    /// The teacher's class of each image.
    pub labels: Vec<i64>,
    /// The teacher's probability of that class.
    pub confidence: Vec<f64>,
}

impl PseudoLabels {
    /// Mean teacher confidence of the pseudo-labels (0 when there are none).
    pub fn mean_confidence(&self) -> f64 {
        if self.confidence.is_empty() {
            return 0.0;
        }
        self.confidence.iter().sum::<f64>() / self.confidence.len() as f64
    }

    /// Share of pseudo-labels that equal `labels` (hidden true labels, where
    /// a benchmark knows them), or `None` when there are no pseudo-labels.
    pub fn agreement_with(&self, labels: &[i64]) -> Option<f64> {
        if self.images.is_empty() {
            return None;
        }
        let agreeing = self
            .images
            .iter()
            .zip(&self.labels)
            .filter(|(&image, &label)| labels[image] == label)
            .count();
        Some(agreeing as f64 / self.images.len() as f64)
    }
}

/// Picks the pseudo-labels: for every class, the candidates the teacher
/// assigns to it with at least `threshold` confidence, surest first, at
/// most `per_class` of them. `probabilities` is `[N, classes]`, row `i`
/// for `candidates[i]`.
pub fn pick_pseudo_labels(
    probabilities: &Tensor,
    candidates: &[usize],
    settings: &PseudoLabelling,
) -> PseudoLabels {
    let num_classes = probabilities.size()[1].max(0) as usize;
    let (confidence, predicted) = probabilities.to_kind(Kind::Double).max_dim(1, false);
    let confidence = Vec::<f64>::try_from(confidence).unwrap_or_default();
    let predicted = Vec::<i64>::try_from(predicted).unwrap_or_default();
    let mut by_class: Vec<Vec<(f64, usize)>> = vec![Vec::new(); num_classes];
    for ((&image, &class), &score) in candidates.iter().zip(&predicted).zip(&confidence) {
        if score >= settings.threshold && (class as usize) < num_classes {
            by_class[class as usize].push((score, image));
        }
    }
    let mut picked: Vec<(usize, i64, f64)> = Vec::new();
    for (class, mut members) in by_class.into_iter().enumerate() {
        members.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        members.truncate(settings.per_class.max(0) as usize);
        picked.extend(
            members
                .into_iter()
                .map(|(score, image)| (image, class as i64, score)),
        );
    }
    picked.sort_by_key(|&(image, _, _)| image);
    PseudoLabels {
        images: picked.iter().map(|p| p.0).collect(),
        labels: picked.iter().map(|p| p.1).collect(),
        confidence: picked.iter().map(|p| p.2).collect(),
    }
}

/// The images of `pool` that are not among `labelled`, in pool order: those
/// a label budget left out, whose labels self-training never reads.
pub fn left_unlabelled(pool: &[usize], labelled: &[usize]) -> Vec<usize> {
    let labelled: std::collections::HashSet<usize> = labelled.iter().copied().collect();
    pool.iter()
        .copied()
        .filter(|i| !labelled.contains(i))
        .collect()
}

/// At most `max` images of `pool`, a seeded sample (all of them, in order,
/// when the pool is no larger).
pub fn sample_unlabelled(pool: &[usize], max: usize, seed: u64) -> Vec<usize> {
    if pool.len() <= max {
        return pool.to_vec();
    }
    let mut shuffled = pool.to_vec();
    shuffled.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0x05e1_f7ea));
    shuffled.truncate(max);
    shuffled.sort_unstable();
    shuffled
}

/// The student's training images: the labelled ones, repeated until they
/// are at least a quarter of the set, then the pseudo-labelled ones.
pub fn student_images(train: &[usize], pseudo: &PseudoLabels) -> Vec<usize> {
    let repeats = labelled_repeats(train.len(), pseudo.images.len());
    let mut images = Vec::with_capacity(repeats * train.len() + pseudo.images.len());
    for _ in 0..repeats {
        images.extend_from_slice(train);
    }
    images.extend_from_slice(&pseudo.images);
    images
}

/// How often `labelled` images are repeated beside `pseudo` pseudo-labels.
fn labelled_repeats(labelled: usize, pseudo: usize) -> usize {
    let wanted = pseudo.div_ceil(LABELLED_SHARE_DIVISOR - 1);
    wanted.div_ceil(labelled.max(1)).max(1)
}

/// The size of [`student_images`]' set for `labelled` labels and `pseudo`
/// pseudo-labels.
pub fn student_set_size(labelled: usize, pseudo: usize) -> usize {
    labelled_repeats(labelled, pseudo) * labelled + pseudo
}

/// `data` with each pseudo-label written over its image's label.
pub fn relabelled(data: &ImageTensorSet, pseudo: &PseudoLabels) -> ImageTensorSet {
    let mut labels = data.labels.clone();
    for (&image, &label) in pseudo.images.iter().zip(&pseudo.labels) {
        labels[image] = label;
    }
    ImageTensorSet {
        images: data.images.shallow_clone(),
        labels,
        classes: data.classes.clone(),
    }
}

/// What the teacher leaves the student.
pub struct Lesson {
    /// The method that taught.
    pub teacher: Transfer,
    pub pseudo: PseudoLabels,
    /// The images with the pseudo-labels written in.
    pub data: ImageTensorSet,
    /// The student's training images (see [`student_images`]).
    pub train: Vec<usize>,
}

/// Fits the teacher `method` on the labelled images `train` and labels the
/// surest of the `unlabelled` ones; `None` when `stop` says so.
pub fn teach(
    setup: &TransferSetup,
    method: Transfer,
    train: &[usize],
    unlabelled: &[usize],
    settings: &PseudoLabelling,
    stop: &mut dyn FnMut() -> Option<StopReason>,
) -> anyhow::Result<Option<Lesson>> {
    let mut teacher = TransferModel::new(setup, method)?;
    if teacher.fit(setup, train, stop)?.is_some() {
        return Ok(None);
    }
    let max = settings.max_unlabelled.max(0) as usize;
    let candidates = sample_unlabelled(unlabelled, max, setup.supervised.seed as u64);
    let probabilities = teacher.probabilities(setup.data, &candidates, setup.input, setup.device);
    let pseudo = pick_pseudo_labels(&probabilities, &candidates, settings);
    let student_train = student_images(train, &pseudo);
    Ok(Some(Lesson {
        teacher: method,
        data: relabelled(setup.data, &pseudo),
        train: student_train,
        pseudo,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(per_class: i64, threshold: f64) -> PseudoLabelling {
        PseudoLabelling {
            per_class,
            threshold,
            max_unlabelled: 100,
        }
    }

    #[test]
    fn pseudo_labels_are_the_surest_of_each_class_above_the_threshold() {
        // Rows: image 10 → class 0 (0.9), 11 → 0 (0.6), 12 → 1 (0.8),
        // 13 → 1 (0.55), 14 → 0 (0.95).
        let probabilities =
            Tensor::from_slice(&[0.9f32, 0.1, 0.6, 0.4, 0.2, 0.8, 0.45, 0.55, 0.95, 0.05])
                .view([5, 2]);
        let candidates = [10, 11, 12, 13, 14];
        let picked = pick_pseudo_labels(&probabilities, &candidates, &settings(1, 0.0));
        assert_eq!(picked.images, vec![12, 14]);
        assert_eq!(picked.labels, vec![1, 0]);
        let above = pick_pseudo_labels(&probabilities, &candidates, &settings(5, 0.7));
        assert_eq!(above.images, vec![10, 12, 14]);
        assert_eq!(above.labels, vec![0, 1, 0]);
        assert!((above.mean_confidence() - (0.9 + 0.8 + 0.95) / 3.0).abs() < 1e-6);
        let truth = [0i64; 15];
        assert_eq!(above.agreement_with(&truth), Some(2.0 / 3.0));
    }

    #[test]
    fn labelled_images_are_repeated_to_a_quarter_of_the_students_set() {
        let pseudo = PseudoLabels {
            images: (100..130).collect(),
            labels: vec![0; 30],
            confidence: vec![1.0; 30],
        };
        let images = student_images(&[1, 2], &pseudo);
        let labelled = images.iter().filter(|&&i| i < 100).count();
        assert_eq!(labelled, 10);
        assert!(labelled * LABELLED_SHARE_DIVISOR >= images.len());
        assert_eq!(student_set_size(2, 30), images.len());
        let few = PseudoLabels {
            images: vec![100],
            labels: vec![0],
            confidence: vec![1.0],
        };
        assert_eq!(student_images(&[1, 2], &few), vec![1, 2, 100]);
    }

    #[test]
    fn a_sample_is_seeded_sorted_and_never_larger_than_asked() {
        let pool: Vec<usize> = (0..50).collect();
        let a = sample_unlabelled(&pool, 10, 7);
        assert_eq!(a.len(), 10);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(a, sample_unlabelled(&pool, 10, 7));
        assert_ne!(a, sample_unlabelled(&pool, 10, 8));
        assert_eq!(sample_unlabelled(&pool, 60, 7), pool);
    }

    #[test]
    fn relabelling_writes_only_the_pseudo_labels() {
        let data = ImageTensorSet {
            images: Tensor::zeros([3, 1, 2, 2], (Kind::Uint8, tch::Device::Cpu)),
            labels: vec![0, -1, 1],
            classes: vec!["a".into(), "b".into()],
        };
        let pseudo = PseudoLabels {
            images: vec![1],
            labels: vec![1],
            confidence: vec![0.9],
        };
        assert_eq!(relabelled(&data, &pseudo).labels, vec![0, 1, 1]);
    }

    #[test]
    fn the_images_a_budget_left_out_are_the_unlabelled_ones() {
        assert_eq!(left_unlabelled(&[4, 1, 7, 3, 9], &[7, 4]), [1, 3, 9]);
        assert!(left_unlabelled(&[2, 5], &[5, 2]).is_empty());
    }
}
