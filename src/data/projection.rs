//! A 2-D map of a dataset's embeddings: principal component analysis by
//! orthogonal (block power) iteration on the centred rows, without forming
//! the covariance matrix, so it costs a few passes over the matrix whatever
//! the embedding width. Deterministic: the same rows give the same map.

use rayon::prelude::*;

/// Rows per rayon task in each pass.
const ROWS_PER_TASK: usize = 2048;

/// Most power iterations.
const MAX_ITERATIONS: usize = 200;

/// Iteration stops once each axis moves less than this (1 − |cos|).
const TOLERANCE: f64 = 1e-10;

/// The first two principal components of a set of rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    /// `(x, y)` of each row, in row order.
    pub coordinates: Vec<[f32; 2]>,
    /// The share of the rows' total variance along each axis.
    pub explained_variance_ratio: [f64; 2],
}

/// `rows` (row after row, `dim` wide) projected on their first two
/// principal components. Fewer than two rows, or rows all alike, project to
/// the origin.
pub fn principal_components(rows: &[f32], dim: usize) -> Projection {
    assert!(
        dim > 0 && rows.len().is_multiple_of(dim),
        "rows are `dim` wide"
    );
    let count = rows.len() / dim;
    let mean = column_means(rows, dim);
    let total_variance = total_variance(rows, &mean, count);
    if count < 2 || total_variance <= f64::EPSILON {
        return Projection {
            coordinates: vec![[0.0, 0.0]; count],
            explained_variance_ratio: [0.0, 0.0],
        };
    }

    // Two axes, started from a fixed spread of directions.
    let mut axes: [Vec<f64>; 2] = [
        (0..dim).map(|d| 1.0 + (d as f64 * 0.37).sin()).collect(),
        (0..dim).map(|d| (d as f64 * 1.91).cos()).collect(),
    ];
    orthonormalise(&mut axes);
    for _ in 0..MAX_ITERATIONS {
        let mut next = covariance_times(rows, dim, &mean, &axes, count);
        orthonormalise(&mut next);
        let settled = axes
            .iter()
            .zip(&next)
            .all(|(old, new)| 1.0 - dot(old, new).abs() < TOLERANCE);
        axes = next;
        if settled {
            break;
        }
    }

    // Each axis's variance is its Rayleigh quotient; the larger comes first.
    let image = covariance_times(rows, dim, &mean, &axes, count);
    let mut variances = [dot(&axes[0], &image[0]), dot(&axes[1], &image[1])];
    if variances[1] > variances[0] {
        axes.swap(0, 1);
        variances.swap(0, 1);
    }
    // A sign convention, so that the map does not flip between runs.
    for axis in &mut axes {
        let largest = axis
            .iter()
            .copied()
            .max_by(|a, b| a.abs().total_cmp(&b.abs()))
            .unwrap_or(0.0);
        if largest < 0.0 {
            axis.iter_mut().for_each(|x| *x = -*x);
        }
    }
    let coordinates = rows
        .par_chunks(dim)
        .map(|row| {
            let centred = |axis: &[f64]| {
                row.iter()
                    .zip(&mean)
                    .zip(axis)
                    .map(|((&x, m), a)| (x as f64 - m) * a)
                    .sum::<f64>() as f32
            };
            [centred(&axes[0]), centred(&axes[1])]
        })
        .collect();
    Projection {
        coordinates,
        explained_variance_ratio: [
            (variances[0] / total_variance).clamp(0.0, 1.0),
            (variances[1] / total_variance).clamp(0.0, 1.0),
        ],
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn column_means(rows: &[f32], dim: usize) -> Vec<f64> {
    let count = (rows.len() / dim).max(1) as f64;
    let sums = rows
        .par_chunks(ROWS_PER_TASK * dim)
        .map(|block| {
            let mut sums = vec![0.0f64; dim];
            for row in block.chunks_exact(dim) {
                sums.iter_mut().zip(row).for_each(|(s, &x)| *s += x as f64);
            }
            sums
        })
        .reduce(|| vec![0.0; dim], add);
    sums.into_iter().map(|s| s / count).collect()
}

/// The mean squared distance of the rows from their mean: the trace of
/// their covariance.
fn total_variance(rows: &[f32], mean: &[f64], count: usize) -> f64 {
    let dim = mean.len();
    let sum: f64 = rows
        .par_chunks(dim)
        .map(|row| {
            row.iter()
                .zip(mean)
                .map(|(&x, m)| (x as f64 - m).powi(2))
                .sum::<f64>()
        })
        .sum();
    sum / count.max(1) as f64
}

fn add(mut a: Vec<f64>, b: Vec<f64>) -> Vec<f64> {
    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
    a
}

/// `C · axis` for each axis, where `C` is the rows' covariance:
/// `Xcᵀ (Xc · axis) / n`, with `Xc` the centred rows.
fn covariance_times(
    rows: &[f32],
    dim: usize,
    mean: &[f64],
    axes: &[Vec<f64>; 2],
    count: usize,
) -> [Vec<f64>; 2] {
    let summed = rows
        .par_chunks(ROWS_PER_TASK * dim)
        .map(|block| {
            let mut out = vec![0.0f64; 2 * dim];
            let mut centred = vec![0.0f64; dim];
            for row in block.chunks_exact(dim) {
                centred
                    .iter_mut()
                    .zip(row.iter().zip(mean))
                    .for_each(|(c, (&x, m))| *c = x as f64 - m);
                let along = [dot(&centred, &axes[0]), dot(&centred, &axes[1])];
                let (first, second) = out.split_at_mut(dim);
                for (d, &c) in centred.iter().enumerate() {
                    first[d] += c * along[0];
                    second[d] += c * along[1];
                }
            }
            out
        })
        .reduce(|| vec![0.0; 2 * dim], add);
    let n = count as f64;
    let (first, second) = summed.split_at(dim);
    [
        first.iter().map(|x| x / n).collect(),
        second.iter().map(|x| x / n).collect(),
    ]
}

/// Gram–Schmidt: the first axis normalised, the second made orthogonal to
/// it and normalised (replaced by another direction when it vanishes).
fn orthonormalise(axes: &mut [Vec<f64>; 2]) {
    normalise(&mut axes[0]);
    let [first, second] = axes;
    let along = dot(first, second);
    second
        .iter_mut()
        .zip(first.iter())
        .for_each(|(s, f)| *s -= along * f);
    if dot(second, second).sqrt() < 1e-12 {
        // Any direction orthogonal to the first will do: take the basis
        // vector least aligned with it.
        let d = first
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .map_or(0, |(d, _)| d);
        second.iter_mut().for_each(|s| *s = 0.0);
        second[d] = 1.0;
        let along = first[d];
        second
            .iter_mut()
            .zip(first.iter())
            .for_each(|(s, f)| *s -= along * f);
    }
    normalise(second);
}

fn normalise(v: &mut [f64]) {
    let norm = dot(v, v).sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points spread widely along `u`, less along `w`, barely elsewhere.
    fn elongated(count: usize, dim: usize) -> (Vec<f32>, Vec<f64>, Vec<f64>) {
        let mut u = vec![0.0; dim];
        let mut w = vec![0.0; dim];
        // Two orthogonal unit directions that are not basis vectors.
        u[0] = 0.6;
        u[1] = 0.8;
        w[0] = -0.8;
        w[1] = 0.6;
        w[2] = 0.0;
        let mut rows = Vec::with_capacity(count * dim);
        for i in 0..count {
            let t = (i as f64 * 0.731).sin() * 10.0;
            let s = (i as f64 * 1.37).cos() * 3.0;
            for d in 0..dim {
                let noise = ((i * 7 + d * 13) % 11) as f64 * 0.01;
                rows.push((5.0 + t * u[d] + s * w[d] + noise) as f32);
            }
        }
        (rows, u, w)
    }

    #[test]
    fn the_axes_follow_the_directions_of_largest_spread() {
        let (rows, u, w) = elongated(500, 6);
        let projection = principal_components(&rows, 6);
        assert_eq!(projection.coordinates.len(), 500);
        let [first, second] = projection.explained_variance_ratio;
        assert!(first > second && second > 0.0, "{first} {second}");
        assert!(first + second > 0.99, "{first} + {second}");
        assert!(first > 0.85, "{first}");

        // Each coordinate is the centred row's component along u (or w).
        let mean: Vec<f64> = (0..6)
            .map(|d| {
                rows.iter()
                    .skip(d)
                    .step_by(6)
                    .map(|&x| x as f64)
                    .sum::<f64>()
                    / 500.0
            })
            .collect();
        let along = |row: usize, axis: &[f64]| -> f64 {
            (0..6)
                .map(|d| (rows[row * 6 + d] as f64 - mean[d]) * axis[d])
                .sum()
        };
        for row in [0, 17, 250, 499] {
            let [x, y] = projection.coordinates[row];
            assert!(
                (x.abs() as f64 - along(row, &u).abs()).abs() < 0.1,
                "row {row}: {x}"
            );
            assert!(
                (y.abs() as f64 - along(row, &w).abs()).abs() < 0.1,
                "row {row}: {y}"
            );
        }
    }

    #[test]
    fn the_map_is_centred_and_the_same_on_every_run() {
        let (rows, _, _) = elongated(300, 9);
        let once = principal_components(&rows, 9);
        assert_eq!(once, principal_components(&rows, 9));
        let mean_x: f32 = once.coordinates.iter().map(|c| c[0]).sum::<f32>() / 300.0;
        let mean_y: f32 = once.coordinates.iter().map(|c| c[1]).sum::<f32>() / 300.0;
        assert!(
            mean_x.abs() < 1e-3 && mean_y.abs() < 1e-3,
            "{mean_x} {mean_y}"
        );
    }

    #[test]
    fn degenerate_rows_map_to_the_origin() {
        let same = vec![1.0f32; 4 * 3];
        let projection = principal_components(&same, 3);
        assert_eq!(projection.coordinates, vec![[0.0, 0.0]; 4]);
        assert_eq!(projection.explained_variance_ratio, [0.0, 0.0]);
        assert_eq!(principal_components(&[1.0, 2.0], 2).coordinates.len(), 1);
        // One-dimensional rows: one axis carries everything.
        let line: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let projection = principal_components(&line, 1);
        assert!((projection.explained_variance_ratio[0] - 1.0).abs() < 1e-9);
        assert_eq!(projection.explained_variance_ratio[1], 0.0);
    }
}
