//! Choosing which images to label next, from a dataset's stored embeddings
//! (and a classifier's probabilities): `diversity` (k-center greedy, the
//! coreset of Sener & Savarese: each pick is the image farthest from every
//! labelled or already picked one), `representative` (k-means over the
//! unlabelled images, then the image nearest each centre), `uncertainty`
//! (the smallest margin between a classifier's two most probable classes),
//! and `uncertain_diverse` (a diverse pool ten times the budget, then its
//! most uncertain). Distances are between unit-length embeddings.
//! Deterministic for a seed; runs off the async threads.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// How images are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    Diversity,
    Representative,
    Uncertainty,
    UncertainDiverse,
}

impl Strategy {
    /// Every strategy, as the API names them.
    pub const ALL: [&'static str; 4] = [
        "diversity",
        "representative",
        "uncertainty",
        "uncertain_diverse",
    ];

    /// The strategy called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "diversity" => Some(Self::Diversity),
            "representative" => Some(Self::Representative),
            "uncertainty" => Some(Self::Uncertainty),
            "uncertain_diverse" => Some(Self::UncertainDiverse),
            _ => None,
        }
    }

    /// Whether it needs a classifier's probabilities.
    pub fn needs_probabilities(self) -> bool {
        matches!(self, Self::Uncertainty | Self::UncertainDiverse)
    }
}

/// What a selection chooses from.
pub struct SelectionInput<'a> {
    /// Unit-length embeddings, `dim` per image, in archive order.
    pub embeddings: &'a [f32],
    pub dim: usize,
    /// Class probabilities, `classes` per image (uncertainty strategies).
    pub probabilities: Option<(&'a [f32], usize)>,
    /// Images that already have a label: never chosen, and (diversity)
    /// already covered.
    pub labelled: &'a [bool],
}

/// Rounds of k-means for `representative`.
const KMEANS_ROUNDS: usize = 10;

/// Candidates per pick of `uncertain_diverse`.
const DIVERSE_POOL_FACTOR: usize = 10;

fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

impl SelectionInput<'_> {
    fn count(&self) -> usize {
        self.labelled.len()
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.embeddings[i * self.dim..(i + 1) * self.dim]
    }

    fn unlabelled(&self) -> Vec<usize> {
        (0..self.count()).filter(|&i| !self.labelled[i]).collect()
    }

    /// The margin between the two most probable classes of image `i`
    /// (small: unsure).
    fn margin(&self, i: usize) -> f32 {
        let Some((probabilities, classes)) = self.probabilities else {
            return 1.0;
        };
        let row = &probabilities[i * classes..(i + 1) * classes];
        let (mut first, mut second) = (f32::MIN, f32::MIN);
        for &p in row {
            if p > first {
                second = first;
                first = p;
            } else if p > second {
                second = p;
            }
        }
        if classes < 2 {
            1.0
        } else {
            first - second
        }
    }
}

/// `budget` images of `input` chosen by `strategy` (fewer when fewer are
/// unlabelled), in the order chosen.
pub fn select(input: &SelectionInput, strategy: Strategy, budget: usize, seed: u64) -> Vec<usize> {
    let candidates = input.unlabelled();
    let budget = budget.min(candidates.len());
    match strategy {
        Strategy::Diversity => k_center_greedy(input, &candidates, budget, seed),
        Strategy::Representative => nearest_to_centres(input, &candidates, budget, seed),
        Strategy::Uncertainty => least_margin(input, candidates, budget),
        Strategy::UncertainDiverse => {
            let pool_size = (budget * DIVERSE_POOL_FACTOR).min(candidates.len());
            let pool = k_center_greedy(input, &candidates, pool_size, seed);
            least_margin(input, pool, budget)
        }
    }
}

/// The `budget` candidates with the smallest margins.
fn least_margin(input: &SelectionInput, mut candidates: Vec<usize>, budget: usize) -> Vec<usize> {
    candidates.sort_by(|&a, &b| input.margin(a).total_cmp(&input.margin(b)).then(a.cmp(&b)));
    candidates.truncate(budget);
    candidates
}

/// Greedy k-center: each pick is the candidate farthest from its nearest
/// labelled or picked image; the first, with nothing labelled, is drawn by
/// the seed.
fn k_center_greedy(
    input: &SelectionInput,
    candidates: &[usize],
    budget: usize,
    seed: u64,
) -> Vec<usize> {
    if budget == 0 {
        return Vec::new();
    }
    let labelled: Vec<usize> = (0..input.count()).filter(|&i| input.labelled[i]).collect();
    // Distance of each candidate to its nearest centre so far.
    let mut nearest: Vec<f32> = candidates
        .par_iter()
        .map(|&c| {
            labelled
                .iter()
                .map(|&l| squared_distance(input.row(c), input.row(l)))
                .fold(f32::INFINITY, f32::min)
        })
        .collect();
    let mut picked = Vec::with_capacity(budget);
    let mut first = if labelled.is_empty() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        Some(rng.gen_range(0..candidates.len()))
    } else {
        None
    };
    while picked.len() < budget {
        let choice = first.take().unwrap_or_else(|| {
            (0..candidates.len())
                .max_by(|&a, &b| nearest[a].total_cmp(&nearest[b]).then(b.cmp(&a)))
                .expect("candidates remain")
        });
        let centre = input.row(candidates[choice]);
        picked.push(candidates[choice]);
        nearest
            .par_iter_mut()
            .zip(candidates.par_iter())
            .for_each(|(d, &c)| *d = d.min(squared_distance(input.row(c), centre)));
        nearest[choice] = f32::NEG_INFINITY;
    }
    picked
}

/// k-means (k-means++ seeding, then Lloyd rounds) over the candidates with
/// `budget` centres; the candidate nearest each centre, each at most once.
fn nearest_to_centres(
    input: &SelectionInput,
    candidates: &[usize],
    budget: usize,
    seed: u64,
) -> Vec<usize> {
    if budget == 0 {
        return Vec::new();
    }
    let dim = input.dim;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // k-means++: each new centre drawn with probability ∝ squared distance.
    let mut centres: Vec<f32> = Vec::with_capacity(budget * dim);
    let first = candidates[rng.gen_range(0..candidates.len())];
    centres.extend_from_slice(input.row(first));
    let mut nearest: Vec<f32> = candidates
        .par_iter()
        .map(|&c| squared_distance(input.row(c), input.row(first)))
        .collect();
    while centres.len() < budget * dim {
        let total: f64 = nearest.iter().map(|&d| f64::from(d)).sum();
        let next = if total > 0.0 {
            let mut target = rng.gen::<f64>() * total;
            let mut chosen = candidates.len() - 1;
            for (i, &d) in nearest.iter().enumerate() {
                target -= f64::from(d);
                if target <= 0.0 {
                    chosen = i;
                    break;
                }
            }
            chosen
        } else {
            rng.gen_range(0..candidates.len())
        };
        let centre = input.row(candidates[next]).to_vec();
        nearest
            .par_iter_mut()
            .zip(candidates.par_iter())
            .for_each(|(d, &c)| *d = d.min(squared_distance(input.row(c), &centre)));
        centres.extend_from_slice(&centre);
    }
    let assign = |centres: &[f32]| -> Vec<(usize, f32)> {
        candidates
            .par_iter()
            .map(|&c| {
                centres
                    .chunks_exact(dim)
                    .enumerate()
                    .map(|(k, centre)| (k, squared_distance(input.row(c), centre)))
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .expect("at least one centre")
            })
            .collect()
    };
    for _ in 0..KMEANS_ROUNDS {
        let assignment = assign(&centres);
        let mut sums = vec![0.0f32; budget * dim];
        let mut counts = vec![0usize; budget];
        for (&c, &(k, _)) in candidates.iter().zip(&assignment) {
            counts[k] += 1;
            for (s, x) in sums[k * dim..(k + 1) * dim].iter_mut().zip(input.row(c)) {
                *s += x;
            }
        }
        for k in 0..budget {
            if counts[k] > 0 {
                for (centre, sum) in centres[k * dim..(k + 1) * dim]
                    .iter_mut()
                    .zip(&sums[k * dim..(k + 1) * dim])
                {
                    *centre = sum / counts[k] as f32;
                }
            }
        }
    }
    // The member nearest each centre; an emptied centre takes the nearest
    // candidate not yet picked.
    let assignment = assign(&centres);
    let mut by_centre: Vec<Option<(usize, f32)>> = vec![None; budget];
    for (i, &(k, d)) in assignment.iter().enumerate() {
        if by_centre[k].is_none_or(|(_, best)| d < best) {
            by_centre[k] = Some((i, d));
        }
    }
    let mut taken = vec![false; candidates.len()];
    let mut picked = Vec::with_capacity(budget);
    for (k, best) in by_centre.iter().enumerate() {
        let index = match best {
            Some((i, _)) => *i,
            None => {
                let centre = &centres[k * dim..(k + 1) * dim];
                (0..candidates.len())
                    .filter(|&i| !taken[i])
                    .min_by(|&a, &b| {
                        squared_distance(input.row(candidates[a]), centre)
                            .total_cmp(&squared_distance(input.row(candidates[b]), centre))
                    })
                    .expect("more candidates than centres")
            }
        };
        taken[index] = true;
        picked.push(candidates[index]);
    }
    picked.shuffle(&mut rng);
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Four tight clusters of 25 points on the unit circle's axes.
    fn clusters() -> (Vec<f32>, usize) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let axes = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]];
        let mut rows = Vec::new();
        for axis in axes {
            for _ in 0..25 {
                rows.push(axis[0] + rng.gen_range(-0.05..0.05));
                rows.push(axis[1] + rng.gen_range(-0.05..0.05));
            }
        }
        (rows, 2)
    }

    fn cluster_of(image: usize) -> usize {
        image / 25
    }

    fn distinct_clusters(picked: &[usize]) -> usize {
        let mut clusters: Vec<usize> = picked.iter().map(|&i| cluster_of(i)).collect();
        clusters.sort_unstable();
        clusters.dedup();
        clusters.len()
    }

    #[test]
    fn diverse_and_representative_picks_cover_every_cluster() {
        let (rows, dim) = clusters();
        let labelled = vec![false; 100];
        let input = SelectionInput {
            embeddings: &rows,
            dim,
            probabilities: None,
            labelled: &labelled,
        };
        for strategy in [Strategy::Diversity, Strategy::Representative] {
            for seed in 0..5 {
                let picked = select(&input, strategy, 4, seed);
                assert_eq!(picked.len(), 4);
                assert_eq!(distinct_clusters(&picked), 4, "{strategy:?} {picked:?}");
                assert_eq!(picked, select(&input, strategy, 4, seed), "deterministic");
            }
        }
    }

    #[test]
    fn labelled_images_are_never_picked_and_count_as_covered() {
        let (rows, dim) = clusters();
        let mut labelled = vec![false; 100];
        // The first three clusters have a labelled image each.
        for i in [0, 25, 50] {
            labelled[i] = true;
        }
        let input = SelectionInput {
            embeddings: &rows,
            dim,
            probabilities: None,
            labelled: &labelled,
        };
        let picked = select(&input, Strategy::Diversity, 1, 0);
        assert_eq!(cluster_of(picked[0]), 3, "the uncovered cluster first");
        let all = select(&input, Strategy::Representative, 200, 0);
        assert_eq!(all.len(), 97, "every unlabelled image, once");
        assert!(all.iter().all(|&i| !labelled[i]));
    }

    #[test]
    fn uncertainty_picks_the_smallest_margins_and_can_stay_diverse() {
        let (rows, dim) = clusters();
        let labelled = vec![false; 100];
        // Two classes; the classifier is unsure (margin 0.1) only about the
        // first five images of each cluster.
        let probabilities: Vec<f32> = (0..100)
            .flat_map(|i| {
                if i % 25 < 5 {
                    [0.55, 0.45]
                } else {
                    [0.95, 0.05]
                }
            })
            .collect();
        let input = SelectionInput {
            embeddings: &rows,
            dim,
            probabilities: Some((&probabilities, 2)),
            labelled: &labelled,
        };
        let unsure = select(&input, Strategy::Uncertainty, 4, 0);
        assert_eq!(unsure, [0, 1, 2, 3], "the smallest margins, ties by index");
        let diverse = select(&input, Strategy::UncertainDiverse, 4, 0);
        assert!(diverse.iter().all(|&i| i % 25 < 5), "{diverse:?}");
    }
}
