//! Which images make each training batch, and the generator a step draws its
//! CPU-side randomness from (crops, flips, puzzle permutations, views). Both
//! follow from the job's seed alone, so a resumed job sees the same batches
//! and draws the same numbers as one that never stopped.
//!
//! LibTorch's own generator (dropout, `Tensor::rand*`) is seeded per step by
//! the training loop (`ml::training::seed_step`), not here.

use rand::seq::SliceRandom;
use rand::SeedableRng;

/// The shuffled image order of one epoch, reproducible from the seed.
pub fn epoch_order(len: usize, seed: i64, epoch: i64) -> Vec<i64> {
    let mut order: Vec<i64> = (0..len as i64).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        (seed as u64) ^ (epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    order.shuffle(&mut rng);
    order
}

/// A generator for the randomness of one step, reproducible after a resume.
pub fn step_rng(seed: i64, step: i64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(
        (seed as u64)
            .wrapping_add(step as u64)
            .wrapping_mul(0x2545_f491_4f6c_dd1d),
    )
}
