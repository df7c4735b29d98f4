//! The jigsaw puzzle on whole images (JiGen, Carlucci et al., CVPR 2019):
//! an image's grid cells are shuffled by one permutation of the jigsaw set
//! and put back together into an image of the same size, or, for a share of
//! images, left in order. A linear head on the trunk's features of the whole
//! image says which permutation was used (class `1 + index`) or that the
//! image is in order (class 0).
//!
//! Unlike the tile network, the trunk sees images at the size it is later
//! fine-tuned at, so what it learns about object parts and their layout is
//! learnt at the transfer scale. The cells of a `grid × grid` crop are
//! moved; the pixels outside the crop (when the side is not a multiple of
//! the grid) stay where they are. Each image is flipped left-right at random
//! before it is cut, and the crop's offset is drawn per image, so cell
//! borders do not always fall on the same pixels. With a `cell_gap`, a band
//! along every cell's edges (in every image, in order or not) is filled with
//! the image's mean, so that no cell touches its neighbour: the network
//! cannot tell a permutation by whether edges continue across cells.

use rand::Rng;
use rayon::prelude::*;
use tch::nn::{self, Module};
use tch::Tensor;

use super::jigsaw::JigsawPermutationSet;
use super::ImageBatch;

/// How reassembled puzzles are drawn, beyond the permutation set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReassemblySettings {
    /// Share of images left in order.
    pub ordered_fraction: f64,
    /// Pixels filled with the image's mean along each edge of every cell.
    pub cell_gap: usize,
}

/// How one image is turned into a puzzle.
#[derive(Debug, Clone, PartialEq)]
struct Reassembly {
    flip: bool,
    /// Top-left corner `(y, x)` of the `grid × grid` crop whose cells move.
    offset: (usize, usize),
    /// Index into the permutation set, or `None` for an image left in order.
    permutation: Option<usize>,
}

impl Reassembly {
    /// The class a head must predict: 0 in order, else `1 + permutation`.
    fn label(&self) -> i64 {
        self.permutation.map_or(0, |index| index as i64 + 1)
    }
}

fn draw_reassembly(
    side: usize,
    grid: usize,
    permutations: usize,
    ordered_fraction: f64,
    rng: &mut impl Rng,
) -> Reassembly {
    let crop = side / grid * grid;
    let flip = rng.gen_bool(0.5);
    let offset = (
        rng.gen_range(0..=side - crop),
        rng.gen_range(0..=side - crop),
    );
    let permutation = if rng.gen_bool(ordered_fraction) {
        None
    } else {
        Some(rng.gen_range(0..permutations))
    };
    Reassembly {
        flip,
        offset,
        permutation,
    }
}

/// Writes `image` (uint8 CHW, `side`² per channel) into `out` as `how` says:
/// flipped if drawn, then the crop's cell at position `k` (row-major) taken
/// from cell `order[k]` of the (flipped) image, then `gap` pixels along each
/// edge of every cell of the crop filled with the channel's mean.
fn reassemble(
    out: &mut [u8],
    image: &[u8],
    (side, grid, gap): (usize, usize, usize),
    how: &Reassembly,
    order: Option<&[u8]>,
) {
    let plane = side * side;
    for (out_plane, in_plane) in out.chunks_mut(plane).zip(image.chunks(plane)) {
        for (out_row, in_row) in out_plane.chunks_mut(side).zip(in_plane.chunks(side)) {
            out_row.copy_from_slice(in_row);
            if how.flip {
                out_row.reverse();
            }
        }
    }
    let cell = side / grid;
    let (oy, ox) = how.offset;
    if let Some(order) = order {
        move_cells(out, (side, grid, cell), (oy, ox), order);
    }
    if gap > 0 {
        fill_cell_edges(out, (side, grid, cell, gap), (oy, ox));
    }
}

/// Puts cell `order[k]` of the crop at `(oy, ox)` in cell `k`'s place.
fn move_cells(
    out: &mut [u8],
    (side, grid, cell): (usize, usize, usize),
    (oy, ox): (usize, usize),
    order: &[u8],
) {
    let plane = side * side;
    let source = out.to_vec();
    for (k, &from) in order.iter().enumerate() {
        let (to_y, to_x) = (oy + k / grid * cell, ox + k % grid * cell);
        let from = from as usize;
        let (from_y, from_x) = (oy + from / grid * cell, ox + from % grid * cell);
        for (out_plane, in_plane) in out.chunks_mut(plane).zip(source.chunks(plane)) {
            for row in 0..cell {
                let to = (to_y + row) * side + to_x;
                let from = (from_y + row) * side + from_x;
                out_plane[to..to + cell].copy_from_slice(&in_plane[from..from + cell]);
            }
        }
    }
}

/// Fills a band `gap` pixels wide along each edge of every cell of the
/// crop at `(oy, ox)` with the mean of its channel plane.
fn fill_cell_edges(
    out: &mut [u8],
    (side, grid, cell, gap): (usize, usize, usize, usize),
    (oy, ox): (usize, usize),
) {
    let plane = side * side;
    for out_plane in out.chunks_mut(plane) {
        let sum: u64 = out_plane.iter().map(|&p| u64::from(p)).sum();
        let mean = (sum / plane.max(1) as u64) as u8;
        for k in 0..grid * grid {
            let (top, left) = (oy + k / grid * cell, ox + k % grid * cell);
            for row in 0..cell {
                let line = &mut out_plane[(top + row) * side + left..][..cell];
                if row < gap || row >= cell - gap {
                    line.fill(mean);
                } else {
                    line[..gap].fill(mean);
                    line[cell - gap..].fill(mean);
                }
            }
        }
    }
}

/// Builds one reassembled puzzle per image of `batch`: uint8 images
/// `[B, C, S, S]` and their classes `[B]` (0 in order, `1 + index` for
/// permutation `index`). A share of images, drawn at random, stays in
/// order; every image gets the cell gaps of `settings`.
pub fn make_reassembled_puzzles(
    batch: &ImageBatch<'_>,
    permutations: &JigsawPermutationSet,
    settings: ReassemblySettings,
    rng: &mut impl Rng,
) -> (Tensor, Tensor) {
    let [channels, side, _] = batch.shape;
    let grid = permutations.grid as usize;
    let draws: Vec<Reassembly> = (0..batch.len())
        .map(|_| {
            draw_reassembly(
                side,
                grid,
                permutations.permutations.len(),
                settings.ordered_fraction,
                rng,
            )
        })
        .collect();
    let image_len = channels * side * side;
    let mut out = vec![0u8; batch.len() * image_len];
    out.par_chunks_mut(image_len.max(1))
        .zip(draws.par_iter().enumerate())
        .for_each(|(image_out, (b, how))| {
            let order = how
                .permutation
                .map(|index| permutations.permutations[index].as_slice());
            let geometry = (side, grid, settings.cell_gap);
            reassemble(image_out, batch.image(b), geometry, how, order);
        });
    let labels: Vec<i64> = draws.iter().map(Reassembly::label).collect();
    let shape = [
        batch.len() as i64,
        channels as i64,
        side as i64,
        side as i64,
    ];
    (
        Tensor::from_slice(&out).view(shape),
        Tensor::from_slice(&labels),
    )
}

/// The linear classifier of reassembled puzzles: `permutations + 1` classes.
#[derive(Debug)]
pub struct ReassembledHead {
    classifier: nn::Linear,
}

impl ReassembledHead {
    /// Builds the head under `p` for a trunk of `feature_dim` features.
    pub fn new(p: &nn::Path, feature_dim: i64, permutations: i64) -> Self {
        Self {
            classifier: nn::linear(
                p / "classifier",
                feature_dim,
                permutations + 1,
                Default::default(),
            ),
        }
    }

    /// Class logits `[B, P + 1]` from trunk features `[B, D]`.
    pub fn forward(&self, features: &Tensor) -> Tensor {
        self.classifier.forward(features)
    }
}

/// Accuracy of always guessing the commonest class.
pub fn chance_accuracy(permutations: usize, ordered_fraction: f64) -> f64 {
    ordered_fraction.max((1.0 - ordered_fraction) / permutations.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn batch_of(pixels: &[u8], shape: [usize; 3], indices: &[i64]) -> (Vec<u8>, [usize; 3]) {
        let len: usize = shape.iter().product();
        let gathered = indices
            .iter()
            .flat_map(|&i| pixels[i as usize * len..(i as usize + 1) * len].to_vec())
            .collect();
        (gathered, shape)
    }

    #[test]
    fn cells_move_as_the_permutation_says_and_the_rest_stays() {
        // A 7×7 image, grid 3: cells of 2 px in a 6×6 crop at (1, 0); the
        // seventh row and the top row outside the crop stay.
        let side = 7;
        let image: Vec<u8> = (0..(side * side) as u8).collect();
        let how = Reassembly {
            flip: false,
            offset: (1, 0),
            permutation: Some(0),
        };
        let order = [8u8, 1, 2, 3, 4, 5, 6, 7, 0];
        let mut out = vec![0u8; side * side];
        reassemble(&mut out, &image, (side, 3, 0), &how, Some(&order));
        let at = |buffer: &[u8], y: usize, x: usize| buffer[y * side + x];
        // Cell 0 (rows 1–2, cols 0–1) now holds cell 8 (rows 5–6, cols 4–5).
        assert_eq!(at(&out, 1, 0), at(&image, 5, 4));
        assert_eq!(at(&out, 2, 1), at(&image, 6, 5));
        // And cell 8 holds cell 0.
        assert_eq!(at(&out, 6, 5), at(&image, 2, 1));
        // A cell that maps to itself, and the pixels outside the crop.
        assert_eq!(at(&out, 3, 2), at(&image, 3, 2));
        assert_eq!(&out[..side], &image[..side]);
        assert_eq!(at(&out, 4, 6), at(&image, 4, 6));
        // Every pixel is still there, once.
        let mut sorted = out.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, image);
    }

    #[test]
    fn cell_gaps_fill_every_cells_edges_with_the_mean_in_order_or_not() {
        // 8×8, grid 2: cells of 4 px; a gap of 1 leaves each cell's 2×2 centre.
        let side = 8;
        let image: Vec<u8> = (0..64u8).map(|p| p * 2).collect();
        let mean = (image.iter().map(|&p| u32::from(p)).sum::<u32>() / 64) as u8;
        for permutation in [None, Some(0)] {
            let how = Reassembly {
                flip: false,
                offset: (0, 0),
                permutation,
            };
            let order = [3u8, 2, 1, 0];
            let mut out = vec![0u8; 64];
            reassemble(
                &mut out,
                &image,
                (side, 2, 1),
                &how,
                permutation.map(|_| &order[..]),
            );
            for y in 0..side {
                for x in 0..side {
                    let (in_cell_y, in_cell_x) = (y % 4, x % 4);
                    let edge = [0, 3].contains(&in_cell_y) || [0, 3].contains(&in_cell_x);
                    let value = out[y * side + x];
                    if edge {
                        assert_eq!(value, mean, "({y}, {x}) of {permutation:?}");
                    } else {
                        // Centres are moved cells: cell k holds cell 3 - k.
                        let (cy, cx) = if permutation.is_some() {
                            (4 - y / 4 * 4 + y % 4, 4 - x / 4 * 4 + x % 4)
                        } else {
                            (y, x)
                        };
                        assert_eq!(
                            value,
                            image[cy * side + cx],
                            "({y}, {x}) of {permutation:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn an_image_left_in_order_is_only_flipped() {
        let side = 4;
        let image: Vec<u8> = (0..(2 * side * side) as u8).collect();
        let how = Reassembly {
            flip: true,
            offset: (0, 0),
            permutation: None,
        };
        let mut out = vec![0u8; image.len()];
        reassemble(&mut out, &image, (side, 2, 0), &how, None);
        for c in 0..2 {
            for y in 0..side {
                for x in 0..side {
                    let plane = c * side * side;
                    assert_eq!(
                        out[plane + y * side + x],
                        image[plane + y * side + side - 1 - x]
                    );
                }
            }
        }
        assert_eq!(how.label(), 0);
    }

    #[test]
    fn batches_hold_the_batch_images_with_their_classes() {
        let shape = [1, 12, 12];
        let pixels: Vec<u8> = (0..3 * 144).map(|i| (i * 7 % 253) as u8).collect();
        let indices = [2, 0];
        let batch = ImageBatch {
            pixels: &pixels,
            shape,
            indices: &indices,
        };
        let set = JigsawPermutationSet::generate(3, 10, 0);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let settings = ReassemblySettings {
            ordered_fraction: 0.0,
            cell_gap: 0,
        };
        let (images, labels) = make_reassembled_puzzles(&batch, &set, settings, &mut rng);
        assert_eq!(images.size(), [2, 1, 12, 12]);
        let labels = Vec::<i64>::try_from(labels).unwrap();
        assert!(labels.iter().all(|&l| (1..=10).contains(&l)), "{labels:?}");
        // The same pixels as the source image, rearranged.
        let (expected, _) = batch_of(&pixels, shape, &indices);
        let got = Vec::<u8>::try_from(images.flatten(0, -1)).unwrap();
        for (got, expected) in got.chunks(144).zip(expected.chunks(144)) {
            let (mut got, mut expected) = (got.to_vec(), expected.to_vec());
            got.sort_unstable();
            expected.sort_unstable();
            assert_eq!(got, expected);
        }
        // With every image in order, every class is 0.
        let settings = ReassemblySettings {
            ordered_fraction: 1.0,
            ..settings
        };
        let (_, ordered) = make_reassembled_puzzles(&batch, &set, settings, &mut rng);
        assert_eq!(Vec::<i64>::try_from(ordered).unwrap(), [0, 0]);
    }

    #[test]
    fn the_ordered_share_is_drawn_at_the_rate_asked() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let ordered = (0..4000)
            .filter(|_| {
                draw_reassembly(28, 3, 30, 0.25, &mut rng)
                    .permutation
                    .is_none()
            })
            .count();
        assert!((850..1150).contains(&ordered), "{ordered}");
        assert!((chance_accuracy(30, 0.25) - 0.25).abs() < 1e-12);
        assert!((chance_accuracy(30, 0.0) - 1.0 / 30.0).abs() < 1e-12);
    }
}
