//! A dataset's stored embeddings as a search index: the `.npy` matrix an
//! embed job writes (row `i` is image `i` in archive order), held as
//! unit-length rows, and exact k-nearest-neighbour search over them by cosine
//! similarity. Exact search is one pass over the matrix, split across the
//! rayon pool; it runs off the async threads.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::approximate::ApproximateIndex;
use super::npy::read_f32_matrix;
use super::vectors::{dot, unit, Neighbour};

/// Rows scored per rayon task.
const ROWS_PER_TASK: usize = 4096;

/// Unit-length embeddings of a dataset's images.
#[derive(Debug)]
pub struct EmbeddingIndex {
    dim: usize,
    unit_rows: Vec<f32>,
    /// The HNSW graph over the rows, once built (large datasets only).
    approximate: OnceLock<ApproximateIndex>,
}

/// How a search went through the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchMethod {
    /// Every row scored.
    Exact,
    /// The rows the HNSW graph led to.
    Approximate,
}

impl SearchMethod {
    pub fn name(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Approximate => "approximate",
        }
    }
}

/// The best `k` of `scored` (highest score first; ties by lower index).
fn best(mut scored: Vec<Neighbour>, k: usize) -> Vec<Neighbour> {
    let order = |a: &Neighbour, b: &Neighbour| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| a.image.cmp(&b.image))
    };
    if scored.len() > k && k > 0 {
        scored.select_nth_unstable_by(k - 1, order);
    }
    scored.truncate(k);
    scored.sort_by(order);
    scored
}

impl EmbeddingIndex {
    /// The index of an embed job's `embeddings.npy`.
    pub fn from_npy(bytes: &[u8]) -> anyhow::Result<Self> {
        let (_, dim, values) = read_f32_matrix(bytes)?;
        anyhow::ensure!(dim > 0, "the embeddings have no width");
        Ok(Self::from_rows(values, dim))
    }

    /// The index of `values`, `dim` per row.
    pub fn from_rows(mut values: Vec<f32>, dim: usize) -> Self {
        values.par_chunks_mut(dim).for_each(unit);
        Self {
            dim,
            unit_rows: values,
            approximate: OnceLock::new(),
        }
    }

    /// Images indexed.
    pub fn len(&self) -> usize {
        self.unit_rows.len() / self.dim
    }

    /// Whether no image is indexed.
    pub fn is_empty(&self) -> bool {
        self.unit_rows.is_empty()
    }

    /// Width of each embedding.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Bytes held.
    pub fn size_bytes(&self) -> usize {
        self.unit_rows.len() * std::mem::size_of::<f32>()
    }

    /// Every image's unit-length embedding, row after row.
    pub fn rows(&self) -> &[f32] {
        &self.unit_rows
    }

    /// The stored (unit-length) embedding of image `image`.
    pub fn row(&self, image: usize) -> Option<&[f32]> {
        self.unit_rows.chunks_exact(self.dim).nth(image)
    }

    /// Builds the HNSW graph over the rows, unless it is there already;
    /// until it is, searches stay exact. Takes a while: run it off the
    /// async threads.
    pub fn build_approximate(&self) {
        self.approximate
            .get_or_init(|| ApproximateIndex::build(&self.unit_rows, self.dim));
    }

    /// Whether the HNSW graph is built.
    pub fn is_approximate(&self) -> bool {
        self.approximate.get().is_some()
    }

    /// The `k` images most similar to `query`, most similar first, leaving
    /// out `except`: through the HNSW graph once it is built, else exact.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        except: Option<usize>,
    ) -> (Vec<Neighbour>, SearchMethod) {
        match self.approximate.get() {
            Some(graph) => {
                assert_eq!(query.len(), self.dim, "the query has the index's width");
                let mut query = query.to_vec();
                unit(&mut query);
                (graph.nearest(&query, k, except), SearchMethod::Approximate)
            }
            None => (self.nearest(query, k, except), SearchMethod::Exact),
        }
    }

    /// The `k` images most similar to `query` by cosine similarity, most
    /// similar first, leaving out `except` (the query's own image).
    pub fn nearest(&self, query: &[f32], k: usize, except: Option<usize>) -> Vec<Neighbour> {
        assert_eq!(query.len(), self.dim, "the query has the index's width");
        let mut query = query.to_vec();
        unit(&mut query);
        let candidates: Vec<Neighbour> = self
            .unit_rows
            .par_chunks(ROWS_PER_TASK * self.dim)
            .enumerate()
            .flat_map_iter(|(task, rows)| {
                let first = task * ROWS_PER_TASK;
                let scored = rows
                    .chunks_exact(self.dim)
                    .enumerate()
                    .map(|(i, row)| Neighbour {
                        image: first + i,
                        score: dot(row, &query),
                    })
                    .filter(|n| Some(n.image) != except)
                    .collect();
                best(scored, k)
            })
            .collect();
        best(candidates, k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute_force(rows: &[Vec<f32>], query: &[f32], k: usize) -> Vec<usize> {
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let mut scored: Vec<(usize, f32)> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let dot: f32 = r.iter().zip(query).map(|(a, b)| a * b).sum();
                (i, dot / (norm(r) * norm(query)))
            })
            .collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        scored.into_iter().take(k).map(|(i, _)| i).collect()
    }

    #[test]
    fn nearest_matches_a_brute_force_ranking_across_task_boundaries() {
        let dim = 13;
        let count = ROWS_PER_TASK * 2 + 77;
        // A deterministic spread of directions.
        let rows: Vec<Vec<f32>> = (0..count)
            .map(|i| {
                (0..dim)
                    .map(|d| ((i * 31 + d * 17) % 97) as f32 - 48.0)
                    .collect()
            })
            .collect();
        let index = EmbeddingIndex::from_rows(rows.concat(), dim);
        assert_eq!(index.len(), count);
        let query: Vec<f32> = (0..dim).map(|d| (d as f32 * 0.7).sin()).collect();
        let found: Vec<usize> = index
            .nearest(&query, 10, None)
            .iter()
            .map(|n| n.image)
            .collect();
        assert_eq!(found, brute_force(&rows, &query, 10));
    }

    #[test]
    fn an_images_own_row_is_its_nearest_unless_left_out() {
        let rows = [
            [1.0, 0.0, 0.0],
            [0.9, 0.1, 0.0],
            [0.0, 1.0, 0.0],
            [0.0, 0.0, 2.0],
        ];
        let index = EmbeddingIndex::from_rows(rows.concat(), 3);
        let own = index.row(0).unwrap().to_vec();
        let with_self = index.nearest(&own, 2, None);
        assert_eq!(with_self[0].image, 0);
        assert!((with_self[0].score - 1.0).abs() < 1e-6);
        let without_self = index.nearest(&own, 2, Some(0));
        assert_eq!(
            without_self.iter().map(|n| n.image).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(index.nearest(&own, 10, Some(0)).len(), 3);
    }
}
