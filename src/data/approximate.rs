//! Approximate nearest neighbours for large datasets: a hierarchical
//! navigable small-world graph (HNSW, Malkov & Yashunin, from the `hnsw_rs`
//! crate) over an embedding index's unit-length rows, scored by cosine
//! similarity. Built once, in parallel, off the async threads; a query then
//! visits a few thousand rows instead of all of them.

use anndists::dist::Distance;
use hnsw_rs::hnsw::Hnsw;
use rayon::prelude::*;

use super::vectors::{dot, Neighbour};

/// Links per node (HNSW's `M`): 16 is the paper's usual choice.
const LINKS_PER_NODE: usize = 16;

/// Candidates kept while inserting (`ef_construction`).
const BUILD_CANDIDATES: usize = 100;

/// Most layers of the graph.
const MAX_LAYERS: usize = 16;

/// Fewest candidates kept while searching (`ef`); a query for more
/// neighbours keeps twice as many as it asks for.
const MIN_SEARCH_CANDIDATES: usize = 64;

/// `1 − cos` of two unit-length rows, never below 0 (rounding can put the
/// dot product of a row with itself a hair above 1).
#[derive(Debug, Clone, Copy, Default)]
struct UnitCosineDistance;

impl Distance<f32> for UnitCosineDistance {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot(a, b)).max(0.0)
    }
}

/// An HNSW graph over the rows of an embedding index.
pub struct ApproximateIndex {
    graph: Hnsw<'static, f32, UnitCosineDistance>,
}

impl std::fmt::Debug for ApproximateIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApproximateIndex")
            .field("images", &self.graph.get_nb_point())
            .finish()
    }
}

impl ApproximateIndex {
    /// The graph of `unit_rows` (unit-length, `dim` wide; row `i` is image
    /// `i`), built on the rayon pool.
    pub fn build(unit_rows: &[f32], dim: usize) -> Self {
        let count = unit_rows.len() / dim;
        let graph = Hnsw::new(
            LINKS_PER_NODE,
            count.max(1),
            MAX_LAYERS,
            BUILD_CANDIDATES,
            UnitCosineDistance,
        );
        unit_rows
            .par_chunks_exact(dim)
            .enumerate()
            .for_each(|(image, row)| graph.insert_slice((row, image)));
        Self { graph }
    }

    /// About the `k` images most similar to `unit_query` (unit length),
    /// most similar first, leaving out `except`.
    pub fn nearest(&self, unit_query: &[f32], k: usize, except: Option<usize>) -> Vec<Neighbour> {
        let wanted = k + usize::from(except.is_some());
        let candidates = (2 * wanted).max(MIN_SEARCH_CANDIDATES);
        let mut found: Vec<Neighbour> = self
            .graph
            .search(unit_query, wanted, candidates)
            .into_iter()
            .filter(|n| Some(n.d_id) != except)
            .map(|n| Neighbour {
                image: n.d_id,
                score: 1.0 - n.distance,
            })
            .collect();
        found.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| a.image.cmp(&b.image))
        });
        found.truncate(k);
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::vectors::unit;
    use rand::{Rng, SeedableRng};

    /// Clustered random unit-length rows, as embeddings of a few kinds of
    /// image are.
    fn clustered(count: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rows = clustered_raw(count, dim, seed);
        rows.chunks_mut(dim).for_each(unit);
        rows
    }

    fn row(rows: &[f32], dim: usize, i: usize) -> &[f32] {
        &rows[i * dim..(i + 1) * dim]
    }

    /// The `k` most similar rows to row `query` (itself left out), by brute force.
    fn exact(rows: &[f32], dim: usize, query: usize, k: usize) -> Vec<usize> {
        let mut scored: Vec<(usize, f32)> = (0..rows.len() / dim)
            .filter(|&i| i != query)
            .map(|i| (i, dot(row(rows, dim, i), row(rows, dim, query))))
            .collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1));
        scored.into_iter().take(k).map(|(i, _)| i).collect()
    }

    fn clustered_raw(count: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let centres: Vec<Vec<f32>> = (0..20)
            .map(|_| (0..dim).map(|_| rng.gen_range(-1.0..1.0)).collect())
            .collect();
        (0..count)
            .flat_map(|i| {
                let centre = &centres[i % centres.len()];
                centre
                    .iter()
                    .map(|c| c + rng.gen_range(-0.6..0.6))
                    .collect::<Vec<f32>>()
            })
            .collect()
    }

    #[test]
    fn finds_nearly_all_of_the_exact_neighbours() {
        let dim = 32;
        let rows = clustered(5000, dim, 3);
        let graph = ApproximateIndex::build(&rows, dim);
        let (mut found, mut wanted) = (0, 0);
        for query in (0..5000).step_by(50) {
            let exact = exact(&rows, dim, query, 10);
            let approximate = graph.nearest(row(&rows, dim, query), 10, Some(query));
            assert_eq!(approximate.len(), 10);
            assert!(approximate.iter().all(|n| n.image != query));
            assert!(approximate.windows(2).all(|w| w[0].score >= w[1].score));
            found += approximate
                .iter()
                .filter(|n| exact.contains(&n.image))
                .count();
            wanted += exact.len();
        }
        let recall = found as f64 / wanted as f64;
        assert!(recall >= 0.95, "recall@10 {recall:.3}");
    }

    #[test]
    fn scores_are_the_cosine_similarities() {
        let dim = 8;
        let rows = clustered(300, dim, 5);
        let graph = ApproximateIndex::build(&rows, dim);
        let query = row(&rows, dim, 7);
        let own = graph.nearest(query, 1, None);
        assert_eq!(own[0].image, 7);
        assert!((own[0].score - 1.0).abs() < 1e-5);
        for n in graph.nearest(query, 5, Some(7)) {
            let expected = dot(query, row(&rows, dim, n.image));
            assert!((n.score - expected).abs() < 1e-5);
        }
    }
}
