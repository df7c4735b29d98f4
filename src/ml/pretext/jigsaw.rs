//! The jigsaw puzzle pretext task (Noroozi & Favaro, ECCV 2016).
//!
//! An image is cropped, cut into a grid of cells, and one randomly shifted
//! tile is taken from each cell (the gap between tiles stops the network from
//! matching edges). Each tile is normalised by its own mean and standard
//! deviation (no low-level statistics shortcut); colour images are randomly
//! turned grey or have their channels jittered (no chromatic-aberration
//! shortcut). The tiles are shuffled by one permutation of a fixed set chosen
//! greedily for maximal Hamming distance, and a context-free network (a
//! shared trunk per tile, a per-tile fc layer, concatenation, two fc layers)
//! predicts which permutation was used.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// The fixed set of tile permutations a jigsaw network classifies.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JigsawPermutationSet {
    pub grid: i64,
    pub permutations: Vec<Vec<u8>>,
}

/// Above this many candidates, a random sample of permutations is searched.
const MAX_CANDIDATES: usize = 400_000;

fn all_permutations(n: usize) -> Vec<Vec<u8>> {
    // Heap's algorithm, iterative.
    let mut current: Vec<u8> = (0..n as u8).collect();
    let mut out = vec![current.clone()];
    let mut counters = vec![0usize; n];
    let mut i = 0;
    while i < n {
        if counters[i] < i {
            if i % 2 == 0 {
                current.swap(0, i);
            } else {
                current.swap(counters[i], i);
            }
            out.push(current.clone());
            counters[i] += 1;
            i = 0;
        } else {
            counters[i] = 0;
            i += 1;
        }
    }
    out
}

fn hamming(a: &[u8], b: &[u8]) -> u8 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as u8
}

impl JigsawPermutationSet {
    /// Chooses `count` permutations of `grid`² tiles, each new one as far as
    /// possible (in minimum Hamming distance) from those already chosen; ties
    /// are broken by a generator seeded with `seed`, so the set is reproducible.
    pub fn generate(grid: i64, count: usize, seed: u64) -> Self {
        let tiles = (grid * grid) as usize;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let candidates: Vec<Vec<u8>> = if (1..=tiles).product::<usize>() <= MAX_CANDIDATES {
            all_permutations(tiles)
        } else {
            (0..MAX_CANDIDATES)
                .map(|_| {
                    let mut p: Vec<u8> = (0..tiles as u8).collect();
                    p.shuffle(&mut rng);
                    p
                })
                .collect()
        };
        let count = count.min(candidates.len());
        let mut min_distance = vec![u8::MAX; candidates.len()];
        let mut chosen = Vec::with_capacity(count);
        let mut next = rng.gen_range(0..candidates.len());
        while chosen.len() < count {
            let picked = &candidates[next];
            chosen.push(picked.clone());
            let mut best = 0u8;
            let mut ties = 0u32;
            for (i, candidate) in candidates.iter().enumerate() {
                let d = min_distance[i].min(hamming(candidate, picked));
                min_distance[i] = d;
                if d > best {
                    best = d;
                    ties = 1;
                    next = i;
                } else if d == best && d > 0 {
                    ties += 1;
                    if rng.gen_range(0..ties) == 0 {
                        next = i;
                    }
                }
            }
        }
        Self {
            grid,
            permutations: chosen,
        }
    }

    /// Number of tiles per puzzle.
    pub fn tiles(&self) -> i64 {
        self.grid * self.grid
    }

    /// The smallest Hamming distance between two permutations of the set.
    pub fn minimum_distance(&self) -> u8 {
        let mut min = u8::MAX;
        for (i, a) in self.permutations.iter().enumerate() {
            for b in &self.permutations[i + 1..] {
                min = min.min(hamming(a, b));
            }
        }
        min
    }
}

/// How puzzles are cut from images.
#[derive(Debug, Clone, Copy)]
pub struct PuzzleShape {
    pub grid: i64,
    pub tile_size: i64,
    pub grayscale_probability: f64,
    pub channel_jitter: f64,
}

/// Cuts one randomly shifted `tile_size` tile from each cell of a random
/// `grid × grid` crop of `image` (`[C, S, S]`, float), in row-major order.
pub fn cut_tiles(image: &Tensor, shape: PuzzleShape, rng: &mut impl Rng) -> Vec<Tensor> {
    let side = image.size()[1];
    let grid = shape.grid;
    let cell = side / grid;
    let crop = cell * grid;
    let t = shape.tile_size;
    let oy = rng.gen_range(0..=side - crop);
    let ox = rng.gen_range(0..=side - crop);
    (0..grid * grid)
        .map(|k| {
            let (row, col) = (k / grid, k % grid);
            let y = oy + row * cell + rng.gen_range(0..=cell - t);
            let x = ox + col * cell + rng.gen_range(0..=cell - t);
            image.narrow(1, y, t).narrow(2, x, t)
        })
        .collect()
}

/// Applies the colour shortcuts' remedies to tiles `[B, T, C, t, t]` (each
/// puzzle grey with some probability, else its channels scaled and shifted),
/// then normalises every tile by its own mean and standard deviation.
pub fn colour_and_normalise(tiles: Tensor, shape: PuzzleShape, rng: &mut impl Rng) -> Tensor {
    let size = tiles.size();
    let (batch, channels) = (size[0], size[2]);
    let mut tiles = tiles;
    if channels == 3 {
        let gray_mask: Vec<f32> = (0..batch)
            .map(|_| f32::from(rng.gen_bool(shape.grayscale_probability)))
            .collect();
        let jitter = shape.channel_jitter as f32;
        let mut scale = Vec::with_capacity((batch * 3) as usize);
        let mut shift = Vec::with_capacity((batch * 3) as usize);
        for _ in 0..batch * 3 {
            scale.push(1.0 + rng.gen_range(-1.0..=1.0f32) * jitter);
            shift.push(rng.gen_range(-1.0..=1.0f32) * jitter);
        }
        let device = tiles.device();
        let gray_mask = Tensor::from_slice(&gray_mask)
            .view([batch, 1, 1, 1, 1])
            .to_device(device);
        let scale = Tensor::from_slice(&scale)
            .view([batch, 1, 3, 1, 1])
            .to_device(device);
        let shift = Tensor::from_slice(&shift)
            .view([batch, 1, 3, 1, 1])
            .to_device(device);
        let gray = tiles
            .mean_dim(&[2i64][..], true, Kind::Float)
            .expand_as(&tiles);
        let jittered = &tiles * scale + shift;
        tiles = &gray_mask * gray + (1.0 - &gray_mask) * jittered;
    }
    let mean = tiles.mean_dim(&[2i64, 3, 4][..], true, Kind::Float);
    let std = tiles.std_dim(&[2i64, 3, 4][..], false, true);
    (tiles - mean) / (std + 1e-3)
}

/// Builds a batch of puzzles from uint8 images `[B, C, S, S]`: returns tiles
/// `[B, T, C, t, t]` (float, normalised per tile) and permutation indices `[B]`.
pub fn make_puzzles(
    images: &Tensor,
    permutations: &JigsawPermutationSet,
    shape: PuzzleShape,
    rng: &mut impl Rng,
) -> (Tensor, Tensor) {
    let batch = images.size()[0];
    let pixels = images.to_kind(Kind::Float) / 255.0;
    let mut puzzles = Vec::with_capacity(batch as usize);
    let mut labels = Vec::with_capacity(batch as usize);
    for b in 0..batch {
        let tiles = cut_tiles(&pixels.get(b), shape, rng);
        let label = rng.gen_range(0..permutations.permutations.len());
        let order = &permutations.permutations[label];
        let shuffled: Vec<&Tensor> = order.iter().map(|&k| &tiles[k as usize]).collect();
        puzzles.push(Tensor::stack(&shuffled, 0));
        labels.push(label as i64);
    }
    let tiles = colour_and_normalise(Tensor::stack(&puzzles, 0), shape, rng);
    (tiles, Tensor::from_slice(&labels))
}

/// The context-free network's head: per-tile fc, concatenation, fc, classifier.
#[derive(Debug)]
pub struct JigsawHead {
    tile_fc: nn::Linear,
    joint_fc: nn::Linear,
    classifier: nn::Linear,
    tiles: i64,
}

/// Width of the per-tile fc layer.
const TILE_FC: i64 = 512;
/// Width of the joint fc layer.
const JOINT_FC: i64 = 1024;

impl JigsawHead {
    /// Builds the head under `p` for `tiles` tiles of `feature_dim` features.
    pub fn new(p: &nn::Path, feature_dim: i64, tiles: i64, permutations: i64) -> Self {
        Self {
            tile_fc: nn::linear(p / "tile_fc", feature_dim, TILE_FC, Default::default()),
            joint_fc: nn::linear(
                p / "joint_fc",
                TILE_FC * tiles,
                JOINT_FC,
                Default::default(),
            ),
            classifier: nn::linear(p / "classifier", JOINT_FC, permutations, Default::default()),
            tiles,
        }
    }

    /// Permutation logits `[B, P]` from per-tile features `[B·T, D]`.
    pub fn forward_t(&self, tile_features: &Tensor, train: bool) -> Tensor {
        let per_tile = self.tile_fc.forward(tile_features).relu();
        let batch = per_tile.size()[0] / self.tiles;
        per_tile
            .view([batch, self.tiles * TILE_FC])
            .apply(&self.joint_fc)
            .relu()
            .dropout(0.5, train)
            .apply(&self.classifier)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_sets_are_reproducible_distinct_and_spread() {
        let a = JigsawPermutationSet::generate(3, 100, 1);
        let b = JigsawPermutationSet::generate(3, 100, 1);
        assert_eq!(a, b);
        assert_eq!(a.permutations.len(), 100);
        // Greedy max-min selection over all 9! permutations keeps them far apart.
        assert!(a.minimum_distance() >= 6, "{}", a.minimum_distance());
        let c = JigsawPermutationSet::generate(3, 100, 2);
        assert_ne!(a, c);
    }

    #[test]
    fn small_grids_cap_at_every_permutation() {
        let set = JigsawPermutationSet::generate(2, 100, 0);
        assert_eq!(set.permutations.len(), 24);
        assert_eq!(set.minimum_distance(), 2);
    }

    #[test]
    fn puzzles_have_the_right_shape_and_are_normalised_per_tile() {
        let images = Tensor::randint(256, [4, 3, 32, 32], (Kind::Uint8, tch::Device::Cpu));
        let set = JigsawPermutationSet::generate(3, 10, 0);
        let shape = PuzzleShape {
            grid: 3,
            tile_size: 9,
            grayscale_probability: 0.3,
            channel_jitter: 0.1,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let (tiles, labels) = make_puzzles(&images, &set, shape, &mut rng);
        assert_eq!(tiles.size(), [4, 9, 3, 9, 9]);
        assert_eq!(labels.size(), [4]);
        let means = tiles.mean_dim(&[2i64, 3, 4][..], false, Kind::Float);
        assert!(f64::try_from(means.abs().max()).unwrap() < 1e-4);
    }
}
