//! Stratified splits: a held-out validation set per class, and label budgets
//! (a fraction of the labels, or a number per class) for few-label training.

use rand::seq::SliceRandom;
use rand::SeedableRng;

/// How many labelled examples a fine-tuning run may use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LabelBudget {
    All,
    Fraction(f64),
    PerClass(usize),
}

fn indices_by_class(labels: &[i64], num_classes: usize) -> Vec<Vec<usize>> {
    let mut by_class = vec![Vec::new(); num_classes];
    for (i, &label) in labels.iter().enumerate() {
        if label >= 0 && (label as usize) < num_classes {
            by_class[label as usize].push(i);
        }
    }
    by_class
}

/// Splits labelled indices into (train, validation), holding out
/// `val_fraction` of each class (at least one image of every class with two or
/// more images, when `val_fraction > 0`).
pub fn stratified_split(
    labels: &[i64],
    num_classes: usize,
    val_fraction: f64,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for mut members in indices_by_class(labels, num_classes) {
        members.shuffle(&mut rng);
        let mut held = (members.len() as f64 * val_fraction).round() as usize;
        if val_fraction > 0.0 && held == 0 && members.len() >= 2 {
            held = 1;
        }
        held = held.min(members.len().saturating_sub(1));
        val.extend_from_slice(&members[..held]);
        train.extend_from_slice(&members[held..]);
    }
    train.sort_unstable();
    val.sort_unstable();
    (train, val)
}

/// Keeps the part of `pool` that `budget` allows, stratified by class.
pub fn apply_budget(
    pool: &[usize],
    labels: &[i64],
    num_classes: usize,
    budget: LabelBudget,
    seed: u64,
) -> Vec<usize> {
    if budget == LabelBudget::All {
        return pool.to_vec();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_1abe1);
    let pool_labels: Vec<i64> = pool.iter().map(|&i| labels[i]).collect();
    let mut kept = Vec::new();
    for mut members in indices_by_class(&pool_labels, num_classes) {
        members.shuffle(&mut rng);
        let take = match budget {
            LabelBudget::All => members.len(),
            LabelBudget::Fraction(f) => ((members.len() as f64 * f).round() as usize).max(1),
            LabelBudget::PerClass(k) => k,
        };
        kept.extend(members.into_iter().take(take).map(|j| pool[j]));
    }
    kept.sort_unstable();
    kept
}

/// Deals `pool` into `folds` parts, each class spread evenly over them, for
/// cross-validation on the labelled images alone.
pub fn stratified_folds(
    pool: &[usize],
    labels: &[i64],
    num_classes: usize,
    folds: usize,
    seed: u64,
) -> Vec<Vec<usize>> {
    let folds = folds.max(1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xf01d_5eed);
    let pool_labels: Vec<i64> = pool.iter().map(|&i| labels[i]).collect();
    let mut parts = vec![Vec::new(); folds];
    let mut next = 0;
    for mut members in indices_by_class(&pool_labels, num_classes) {
        members.shuffle(&mut rng);
        for j in members {
            parts[next % folds].push(pool[j]);
            next += 1;
        }
    }
    for part in &mut parts {
        part.sort_unstable();
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_holds_out_every_class_and_loses_nothing() {
        let labels: Vec<i64> = (0..30).map(|i| i % 3).collect();
        let (train, val) = stratified_split(&labels, 3, 0.2, 7);
        assert_eq!(train.len() + val.len(), 30);
        for class in 0..3 {
            assert_eq!(val.iter().filter(|&&i| labels[i] == class).count(), 2);
        }
    }

    #[test]
    fn budget_per_class_takes_that_many_of_each() {
        let labels: Vec<i64> = (0..40).map(|i| i % 4).collect();
        let pool: Vec<usize> = (0..40).collect();
        let kept = apply_budget(&pool, &labels, 4, LabelBudget::PerClass(3), 1);
        assert_eq!(kept.len(), 12);
        for class in 0..4 {
            assert_eq!(kept.iter().filter(|&&i| labels[i] == class).count(), 3);
        }
    }

    #[test]
    fn folds_cover_the_pool_once_and_spread_every_class() {
        let labels: Vec<i64> = (0..60).map(|i| i % 3).collect();
        let pool: Vec<usize> = (0..60).step_by(2).collect();
        let folds = stratified_folds(&pool, &labels, 3, 3, 4);
        let mut all: Vec<usize> = folds.concat();
        all.sort_unstable();
        assert_eq!(all, pool);
        for fold in &folds {
            for class in 0..3 {
                let n = fold.iter().filter(|&&i| labels[i] == class).count();
                assert!((3..=4).contains(&n), "{n} of class {class} in {fold:?}");
            }
        }
    }
}
