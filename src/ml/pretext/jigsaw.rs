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
//!
//! With `assembly: "image"` the shuffled cells are put back together into
//! one image of the input's size instead (JiGen, Carlucci et al., CVPR 2019),
//! and a linear head on the whole image's features says which permutation
//! was used, or that the image is in order; [`super::reassembled`] builds
//! those batches. The trunk then trains on whole images at the scale it is
//! fine-tuned at, not on tiles a third of the size.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::Tensor;

use super::ImageBatch;

use crate::validation::{FieldChecker, FieldError};

/// Jigsaw's settings as sent in a pretrain job's `config`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JigsawConfigRequest {
    pub grid: Option<i64>,
    pub tile_size: Option<i64>,
    pub num_permutations: Option<i64>,
    pub permutation_seed: Option<i64>,
    pub grayscale_probability: Option<f64>,
    pub channel_jitter: Option<f64>,
    pub assembly: Option<JigsawAssembly>,
    pub ordered_fraction: Option<f64>,
    pub cell_gap: Option<i64>,
}

/// The fields of [`JigsawConfigRequest`], as the API names them.
pub const FIELDS: &[&str] = &[
    "grid",
    "tile_size",
    "num_permutations",
    "permutation_seed",
    "grayscale_probability",
    "channel_jitter",
    "assembly",
    "ordered_fraction",
    "cell_gap",
];

/// What the network sees of a puzzle.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum JigsawAssembly {
    /// Each tile on its own, through the shared trunk (Noroozi & Favaro);
    /// what configs stored before the field meant.
    #[default]
    Tiles,
    /// The shuffled cells reassembled into one image (JiGen).
    Image,
}

/// Images of at most this side are reassembled unless the job says
/// otherwise: on a 2-core CPU with 28-px Fashion-MNIST, fine-tuning from
/// reassembled puzzles beat training from scratch by 3.8 points at 10
/// labels per class, from tiles by 1.7 (bench/results/jigsaw_small_images_cpu.md).
pub const REASSEMBLED_UP_TO_SIDE: i64 = 32;

/// Share of reassembled images left in order when the job names none.
pub const DEFAULT_ORDERED_FRACTION: f64 = 0.25;

/// Gap along each cell edge of reassembled puzzles when the job names none
/// (at most what the cell allows): at 28 px on a 2-core CPU, one pixel
/// raised fine-tuning at 10 labels per class from 68.23 % to 70.97 %
/// (bench/results/jigsaw_small_images_cpu.md).
pub const DEFAULT_CELL_GAP: i64 = 1;

/// Jigsaw's settings, every default filled in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JigsawConfig {
    /// Cells per side of the puzzle.
    pub grid: i64,
    /// Side of a tile; smaller than a cell, so tiles have gaps between them.
    pub tile_size: i64,
    /// Size of the permutation set (the number of classes).
    pub num_permutations: i64,
    /// Seed of the permutation set's greedy choice.
    pub permutation_seed: i64,
    /// Chance that a colour puzzle is made grey.
    pub grayscale_probability: f64,
    /// Per-channel scale and shift amplitude.
    pub channel_jitter: f64,
    /// Tiles apart or reassembled into one image (configs stored before
    /// this field read tiles).
    #[serde(default)]
    pub assembly: JigsawAssembly,
    /// With reassembled images, the share left in order (their own class);
    /// always 0 with tiles.
    #[serde(default)]
    pub ordered_fraction: f64,
    /// With reassembled images, the pixels along every cell's edges filled
    /// with the image's mean (so neighbouring cells are twice this apart);
    /// always 0 with tiles, whose gaps come from `tile_size`.
    #[serde(default)]
    pub cell_gap: i64,
}

/// The side of a tile and the colour remedies of a tile-based task, read
/// with their defaults: a tile is 7/8 of a cell unless told.
pub(crate) fn resolve_tile_fields(
    c: &mut FieldChecker,
    grid: i64,
    image_size: i64,
    tile_size: Option<i64>,
    grayscale_probability: Option<f64>,
    channel_jitter: Option<f64>,
) -> PuzzleShape {
    let cell = image_size / grid.max(1);
    PuzzleShape {
        grid,
        tile_size: c.int(
            "tile_size",
            tile_size,
            (cell * 7 / 8).max(4),
            4,
            cell.max(4),
        ),
        grayscale_probability: c.float(
            "grayscale_probability",
            grayscale_probability,
            0.3,
            0.0,
            1.0,
            false,
        ),
        channel_jitter: c.float("channel_jitter", channel_jitter, 0.1, 0.0, 1.0, false),
    }
}

fn factorial_capped(n: i64, cap: i64) -> i64 {
    (1..=n)
        .try_fold(1i64, |acc, k| acc.checked_mul(k))
        .unwrap_or(i64::MAX)
        .min(cap)
}

impl JigsawConfigRequest {
    /// Fills defaults for `image_size` pixels and validates.
    pub fn resolve(self, image_size: i64) -> Result<JigsawConfig, Vec<FieldError>> {
        let mut c = FieldChecker::new();
        let grid = c.int("grid", self.grid, 3, 2, 4);
        let cell = (image_size / grid).max(1);
        let assembly = self.assembly.unwrap_or(
            if image_size <= REASSEMBLED_UP_TO_SIDE && self.tile_size.is_none() {
                JigsawAssembly::Image
            } else {
                JigsawAssembly::Tiles
            },
        );
        let reassembled = assembly == JigsawAssembly::Image;
        if let Some(tile_size) = self.tile_size.filter(|t| reassembled && *t != cell) {
            c.reject(
                "tile_size",
                format!(
                    "reassembled puzzles move whole cells of {cell} px (got {tile_size}); \
                     remove tile_size or set assembly to tiles"
                ),
            );
        }
        // A resolved tiles config holds both at 0, and is accepted back.
        for (field, given) in [
            (
                "ordered_fraction",
                self.ordered_fraction.is_some_and(|f| f != 0.0),
            ),
            ("cell_gap", self.cell_gap.is_some_and(|g| g != 0)),
        ] {
            if given && !reassembled {
                c.reject(
                    field,
                    "applies to assembly image only; remove it or set assembly to image",
                );
            }
        }
        let shape = resolve_tile_fields(
            &mut c,
            grid,
            image_size,
            self.tile_size.filter(|_| !reassembled),
            self.grayscale_probability,
            self.channel_jitter,
        );
        let tile_size = if reassembled { cell } else { shape.tile_size };
        let max_permutations = factorial_capped(grid * grid, 2000);
        let num_permutations = c.int(
            "num_permutations",
            self.num_permutations,
            100.min(max_permutations),
            2,
            max_permutations,
        );
        let permutation_seed = c.int("permutation_seed", self.permutation_seed, 1, 0, i64::MAX);
        let ordered_fraction = if reassembled {
            c.float(
                "ordered_fraction",
                self.ordered_fraction,
                DEFAULT_ORDERED_FRACTION,
                0.0,
                0.9,
                false,
            )
        } else {
            0.0
        };
        // At least two pixels of every cell stay.
        let max_gap = ((cell - 2) / 2).max(0);
        let cell_gap = if reassembled {
            let default = DEFAULT_CELL_GAP.min(max_gap);
            c.int("cell_gap", self.cell_gap, default, 0, max_gap)
        } else {
            0
        };
        c.finish(JigsawConfig {
            grid,
            tile_size,
            num_permutations,
            permutation_seed,
            grayscale_probability: shape.grayscale_probability,
            channel_jitter: shape.channel_jitter,
            assembly,
            ordered_fraction,
            cell_gap,
        })
    }
}

impl JigsawConfig {
    /// How puzzles are cut.
    pub fn shape(&self) -> PuzzleShape {
        PuzzleShape {
            grid: self.grid,
            tile_size: self.tile_size,
            grayscale_probability: self.grayscale_probability,
            channel_jitter: self.channel_jitter,
        }
    }
}

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

    /// The set without the identity, for puzzles where an image left in
    /// order is a class of its own.
    pub fn without_identity(mut self) -> Self {
        self.permutations
            .retain(|p| p.iter().enumerate().any(|(i, &k)| i != usize::from(k)));
        self
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

/// Draws where the tiles of one `side`×`side` image are cut: a random
/// `grid × grid` crop, then one randomly shifted `tile_size` tile per cell.
/// Returns each tile's top-left corner `(y, x)`, cells in row-major order.
pub fn draw_tile_corners(side: i64, shape: PuzzleShape, rng: &mut impl Rng) -> Vec<(i64, i64)> {
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
            (y, x)
        })
        .collect()
}

/// The colour shortcuts' remedy drawn for one puzzle of a colour image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ColourDraw {
    /// Every tile of the puzzle turned grey.
    pub grey: bool,
    /// Otherwise each channel is scaled, then shifted.
    pub scale: [f32; 3],
    pub shift: [f32; 3],
}

/// Draws the colour remedy of each of `batch` puzzles: none for grey images;
/// for colour images, first whether each puzzle goes grey, then per puzzle
/// and channel a scale and shift in `1 ± jitter` and `± jitter`.
pub fn draw_colours(
    batch: usize,
    channels: usize,
    shape: PuzzleShape,
    rng: &mut impl Rng,
) -> Vec<Option<ColourDraw>> {
    if channels != 3 {
        return vec![None; batch];
    }
    let grey: Vec<bool> = (0..batch)
        .map(|_| rng.gen_bool(shape.grayscale_probability))
        .collect();
    let jitter = shape.channel_jitter as f32;
    grey.into_iter()
        .map(|grey| {
            let mut draw = ColourDraw {
                grey,
                scale: [1.0; 3],
                shift: [0.0; 3],
            };
            for (scale, shift) in draw.scale.iter_mut().zip(draw.shift.iter_mut()) {
                *scale = 1.0 + rng.gen_range(-1.0..=1.0f32) * jitter;
                *shift = rng.gen_range(-1.0..=1.0f32) * jitter;
            }
            Some(draw)
        })
        .collect()
}

/// One puzzle to cut: which image, the corners of its tiles in output order,
/// and its colour remedy.
#[derive(Debug, Clone)]
pub struct PuzzleCut<'a> {
    pub image: &'a [u8],
    pub corners: Vec<(i64, i64)>,
    pub colour: Option<ColourDraw>,
}

/// Cuts every puzzle's tiles from its uint8 CHW image (`[channels, side,
/// side]`), applies its colour remedy, and normalises every tile by its own
/// mean and standard deviation. Puzzles are built in parallel into one
/// buffer: `[puzzles, tiles, channels, t, t]`, float.
pub fn cut_puzzles(cuts: &[PuzzleCut<'_>], channels: usize, side: usize, tile_size: i64) -> Tensor {
    let t = tile_size as usize;
    let tiles = cuts.first().map_or(0, |c| c.corners.len());
    let tile_len = channels * t * t;
    let mut out = vec![0f32; cuts.len() * tiles * tile_len];
    out.par_chunks_mut((tiles * tile_len).max(1))
        .zip(cuts.par_iter())
        .for_each(|(puzzle, cut)| {
            for (tile, &(y, x)) in puzzle.chunks_mut(tile_len).zip(&cut.corners) {
                write_tile(tile, cut.image, channels, side, (y as usize, x as usize), t);
                if let Some(colour) = cut.colour {
                    apply_colour(tile, colour, t * t);
                }
                normalise_tile(tile);
            }
        });
    Tensor::from_slice(&out).view([
        cuts.len() as i64,
        tiles as i64,
        channels as i64,
        tile_size,
        tile_size,
    ])
}

/// Copies the `t`×`t` window at `(y, x)` of a CHW uint8 image as floats in [0, 1].
fn write_tile(
    tile: &mut [f32],
    image: &[u8],
    channels: usize,
    side: usize,
    (y, x): (usize, usize),
    t: usize,
) {
    for c in 0..channels {
        for row in 0..t {
            let from = c * side * side + (y + row) * side + x;
            let to = (c * t + row) * t;
            for (out, &p) in tile[to..to + t].iter_mut().zip(&image[from..from + t]) {
                *out = f32::from(p) / 255.0;
            }
        }
    }
}

/// Greys a three-channel tile (channel mean) or scales and shifts its channels.
fn apply_colour(tile: &mut [f32], colour: ColourDraw, plane: usize) {
    let (r, rest) = tile.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        if colour.grey {
            let grey = (*r + *g + *b) / 3.0;
            (*r, *g, *b) = (grey, grey, grey);
        } else {
            *r = *r * colour.scale[0] + colour.shift[0];
            *g = *g * colour.scale[1] + colour.shift[1];
            *b = *b * colour.scale[2] + colour.shift[2];
        }
    }
}

/// `(x - mean) / (std + 1e-3)` over the whole tile (population std).
fn normalise_tile(tile: &mut [f32]) {
    let n = tile.len() as f64;
    let mean = tile.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let squares: f64 = tile.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum();
    let std = (squares / n).sqrt();
    let (mean, scale) = (mean as f32, 1.0 / (std as f32 + 1e-3));
    for v in tile.iter_mut() {
        *v = (*v - mean) * scale;
    }
}

/// Cuts one labelled puzzle from each uint8 image of `batch`: draws the
/// image's tile corners (cells in row-major order), lets `choose` draw its
/// label and pick the corners to cut in output order, then, for the whole
/// batch, the colour remedies. Returns the tiles `[B, T, C, t, t]` (float,
/// normalised per tile) and the labels `[B]`.
pub fn cut_labelled_puzzles<R: Rng>(
    batch: &ImageBatch<'_>,
    shape: PuzzleShape,
    rng: &mut R,
    mut choose: impl FnMut(&[(i64, i64)], &mut R) -> (i64, Vec<(i64, i64)>),
) -> (Tensor, Tensor) {
    let [channels, side, _] = batch.shape;
    let mut cuts = Vec::with_capacity(batch.len());
    let mut labels = Vec::with_capacity(batch.len());
    for b in 0..batch.len() {
        let corners = draw_tile_corners(side as i64, shape, rng);
        let (label, chosen) = choose(&corners, rng);
        cuts.push(PuzzleCut {
            image: batch.image(b),
            corners: chosen,
            colour: None,
        });
        labels.push(label);
    }
    for (cut, colour) in cuts
        .iter_mut()
        .zip(draw_colours(batch.len(), channels, shape, rng))
    {
        cut.colour = colour;
    }
    let tiles = cut_puzzles(&cuts, channels, side, shape.tile_size);
    (tiles, Tensor::from_slice(&labels))
}

/// Builds a batch of puzzles from the uint8 images of `batch`: returns tiles
/// `[B, T, C, t, t]` (float, normalised per tile) and permutation indices `[B]`.
pub fn make_puzzles(
    batch: &ImageBatch<'_>,
    permutations: &JigsawPermutationSet,
    shape: PuzzleShape,
    rng: &mut impl Rng,
) -> (Tensor, Tensor) {
    cut_labelled_puzzles(batch, shape, rng, |corners, rng| {
        let label = rng.gen_range(0..permutations.permutations.len());
        let order = &permutations.permutations[label];
        let chosen = order.iter().map(|&k| corners[k as usize]).collect();
        (label as i64, chosen)
    })
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
    use tch::Kind;

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
        // Without the identity, every other permutation stays.
        let moved = set.without_identity();
        assert_eq!(moved.permutations.len(), 23);
        assert!(!moved.permutations.contains(&vec![0, 1, 2, 3]));
    }

    #[test]
    fn reassembled_puzzles_take_whole_cells_and_their_own_defaults() {
        // Small images are reassembled unless told, or unless a tile size is given.
        let config = JigsawConfigRequest::default().resolve(28).unwrap();
        assert_eq!(config.assembly, JigsawAssembly::Image);
        assert_eq!(config.tile_size, 9);
        assert_eq!(config.num_permutations, 100);
        assert_eq!(config.ordered_fraction, DEFAULT_ORDERED_FRACTION);
        assert_eq!(config.cell_gap, DEFAULT_CELL_GAP);
        let tiles = JigsawConfigRequest {
            tile_size: Some(7),
            ..Default::default()
        }
        .resolve(28)
        .unwrap();
        assert_eq!(tiles.assembly, JigsawAssembly::Tiles);
        assert_eq!((tiles.tile_size, tiles.ordered_fraction), (7, 0.0));
        let large = JigsawConfigRequest::default().resolve(64).unwrap();
        assert_eq!(large.assembly, JigsawAssembly::Tiles);
        // A resolved config sent again resolves to itself, tiles or image.
        for (config, side) in [(&large, 64), (&tiles, 28), (&config, 28)] {
            let again = JigsawConfigRequest {
                grid: Some(config.grid),
                tile_size: Some(config.tile_size),
                num_permutations: Some(config.num_permutations),
                permutation_seed: Some(config.permutation_seed),
                grayscale_probability: Some(config.grayscale_probability),
                channel_jitter: Some(config.channel_jitter),
                assembly: Some(config.assembly),
                ordered_fraction: Some(config.ordered_fraction),
                cell_gap: Some(config.cell_gap),
            };
            assert_eq!(&again.resolve(side).unwrap(), config);
        }

        let errors = JigsawConfigRequest {
            assembly: Some(JigsawAssembly::Image),
            tile_size: Some(7),
            ordered_fraction: Some(1.5),
            cell_gap: Some(4),
            ..Default::default()
        }
        .resolve(28)
        .unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "config.tile_size",
                "config.ordered_fraction",
                "config.cell_gap"
            ]
        );
        assert!(errors[2].message.contains("between 0 and 3"), "{errors:?}");
        let errors = JigsawConfigRequest {
            assembly: Some(JigsawAssembly::Tiles),
            ordered_fraction: Some(0.5),
            ..Default::default()
        }
        .resolve(28)
        .unwrap_err();
        assert_eq!(errors[0].field, "config.ordered_fraction");
        assert!(
            errors[0].message.contains("assembly"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn configs_stored_before_assembly_read_as_tiles() {
        let stored = serde_json::json!({
            "grid": 3, "tile_size": 7, "num_permutations": 100, "permutation_seed": 1,
            "grayscale_probability": 0.3, "channel_jitter": 0.1,
        });
        let config: JigsawConfig = serde_json::from_value(stored).unwrap();
        assert_eq!(config.assembly, JigsawAssembly::Tiles);
        assert_eq!(config.ordered_fraction, 0.0);
    }

    fn shape() -> PuzzleShape {
        PuzzleShape {
            grid: 3,
            tile_size: 9,
            grayscale_probability: 0.3,
            channel_jitter: 0.1,
        }
    }

    /// The puzzles written with one tensor op at a time, image by image.
    fn puzzles_with_tensor_ops(
        images: &Tensor,
        permutations: &JigsawPermutationSet,
        shape: PuzzleShape,
        rng: &mut impl Rng,
    ) -> (Tensor, Tensor) {
        let (batch, side) = (images.size()[0], images.size()[2]);
        let pixels = images.to_kind(Kind::Float) / 255.0;
        let mut puzzles = Vec::new();
        let mut labels = Vec::new();
        for b in 0..batch {
            let corners = draw_tile_corners(side, shape, rng);
            let label = rng.gen_range(0..permutations.permutations.len());
            let tiles: Vec<Tensor> = permutations.permutations[label]
                .iter()
                .map(|&k| {
                    let (y, x) = corners[k as usize];
                    pixels
                        .get(b)
                        .narrow(1, y, shape.tile_size)
                        .narrow(2, x, shape.tile_size)
                })
                .collect();
            puzzles.push(Tensor::stack(&tiles, 0));
            labels.push(label as i64);
        }
        let mut tiles = Tensor::stack(&puzzles, 0);
        let colours = draw_colours(batch as usize, 3, shape, rng);
        let mask: Vec<f32> = colours.iter().map(|c| f32::from(c.unwrap().grey)).collect();
        let scale: Vec<f32> = colours.iter().flat_map(|c| c.unwrap().scale).collect();
        let shift: Vec<f32> = colours.iter().flat_map(|c| c.unwrap().shift).collect();
        let mask = Tensor::from_slice(&mask).view([batch, 1, 1, 1, 1]);
        let grey = tiles
            .mean_dim(&[2i64][..], true, Kind::Float)
            .expand_as(&tiles);
        let jittered = &tiles * Tensor::from_slice(&scale).view([batch, 1, 3, 1, 1])
            + Tensor::from_slice(&shift).view([batch, 1, 3, 1, 1]);
        tiles = &mask * grey + (1.0 - &mask) * jittered;
        let mean = tiles.mean_dim(&[2i64, 3, 4][..], true, Kind::Float);
        let std = tiles.std_dim(&[2i64, 3, 4][..], false, true);
        ((tiles - mean) / (std + 1e-3), Tensor::from_slice(&labels))
    }

    #[test]
    fn puzzles_match_the_tensor_op_definition_and_are_normalised_per_tile() {
        let images = Tensor::randint(256, [6, 3, 32, 32], (Kind::Uint8, tch::Device::Cpu));
        let pixels = Vec::<u8>::try_from(images.flatten(0, -1)).unwrap();
        let indices: Vec<i64> = (0..6).collect();
        let batch = ImageBatch {
            pixels: &pixels,
            shape: [3, 32, 32],
            indices: &indices,
        };
        let set = JigsawPermutationSet::generate(3, 10, 0);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (tiles, labels) = make_puzzles(&batch, &set, shape(), &mut rng);
        assert_eq!(tiles.size(), [6, 9, 3, 9, 9]);
        assert_eq!(labels.size(), [6]);
        let means = tiles.mean_dim(&[2i64, 3, 4][..], false, Kind::Float);
        assert!(f64::try_from(means.abs().max()).unwrap() < 1e-4);

        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (expected, expected_labels) = puzzles_with_tensor_ops(&images, &set, shape(), &mut rng);
        assert!(labels.equal(&expected_labels));
        let difference = f64::try_from((tiles - expected).abs().max()).unwrap();
        assert!(difference < 1e-4, "{difference}");
    }

    #[test]
    fn puzzles_come_from_the_batch_images_in_order() {
        // Image 1 of the dataset is constant, image 0 is not: a puzzle cut
        // from a constant image normalises to all zeros.
        let mut pixels: Vec<u8> = (0..2 * 32 * 32).map(|i| (i * 7 % 251) as u8).collect();
        pixels[32 * 32..].fill(90);
        let indices = [1, 0];
        let batch = ImageBatch {
            pixels: &pixels,
            shape: [1, 32, 32],
            indices: &indices,
        };
        let set = JigsawPermutationSet::generate(3, 10, 0);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let (tiles, _) = make_puzzles(&batch, &set, shape(), &mut rng);
        assert_eq!(tiles.size(), [2, 9, 1, 9, 9]);
        assert_eq!(f64::try_from(tiles.get(0).abs().max()).unwrap(), 0.0);
        assert!(f64::try_from(tiles.get(1).abs().max()).unwrap() > 0.5);
    }
}
