//! Augmentation for supervised training (fine-tuning, the label-efficiency
//! protocol): a random crop after padding and a random horizontal flip, per
//! image of a normalised batch, drawn from the step's generator
//! ([`super::batches::step_rng`]).

use rand::Rng;
use tch::Tensor;

/// Pixels of padding for the random-crop augmentation.
const CROP_PADDING: i64 = 4;

/// Random crop (after padding) and horizontal flip, per image.
pub fn augment(batch: &Tensor, rng: &mut impl Rng) -> Tensor {
    let size = batch.size();
    let side = size[2];
    let padded = batch.constant_pad_nd([CROP_PADDING, CROP_PADDING, CROP_PADDING, CROP_PADDING]);
    let images: Vec<Tensor> = (0..size[0])
        .map(|b| {
            let y = rng.gen_range(0..=2 * CROP_PADDING);
            let x = rng.gen_range(0..=2 * CROP_PADDING);
            let crop = padded.get(b).narrow(1, y, side).narrow(2, x, side);
            if rng.gen_bool(0.5) {
                crop.flip([2])
            } else {
                crop
            }
        })
        .collect();
    Tensor::stack(&images, 0)
}
