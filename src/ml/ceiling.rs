//! The compute ceiling of a pretraining job: the same network's forward
//! pass, backward pass and optimizer step, timed on one batch already built
//! and in memory, in this process. A job's measured images per second over
//! this figure says how much the input pipeline and the service around the
//! step cost (the benchmark reports the ratio).

use std::time::Instant;

use rand::SeedableRng;
use tch::{nn, Device, Kind, Tensor};

use super::device::{channels_last_weights, cpu_mixed_precision};
use super::optimizer::AdamW;
use super::pretext::{ImageBatch, PretextTask, HEAD_PATH};
use super::training::seed_step;
use crate::jobs::config::PretrainConfig;

/// What one ceiling measurement found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepCeiling {
    pub pretext: &'static str,
    pub backbone: &'static str,
    pub image_size: i64,
    pub batch_size: i64,
    pub steps: i64,
    /// Mean wall time of one timed step, in milliseconds.
    pub step_ms: f64,
    /// Images of the dataset a second (a SimCLR step counts its batch, not its views).
    pub images_per_second: f64,
    pub threads: i32,
    /// Whether the forward pass ran in bfloat16 autocast.
    pub bfloat16_autocast: bool,
}

/// Times `steps` optimizer steps (after `warmup` untimed ones) of `config`'s
/// network on one synthetic batch of `channels`-channel images.
pub fn measure_step_ceiling(
    config: &PretrainConfig,
    channels: u8,
    device: Device,
    warmup: i64,
    steps: i64,
) -> anyhow::Result<StepCeiling> {
    tch::manual_seed(config.seed);
    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let trunk = config.backbone.build(&root, channels as i64);
    let feature_dim = config.backbone.feature_dim();
    let task = PretextTask::build(&(&root / HEAD_PATH), &config.pretext, feature_dim);
    channels_last_weights(&vs);
    let mut optimizer = AdamW::new(&vs, config.learning_rate, config.weight_decay)?;

    let side = config.image_size as usize;
    let batch_size = config.batch_size as usize;
    let shape = [channels as usize, side, side];
    let pixels: Vec<u8> = Vec::try_from(Tensor::randint(
        256,
        [(batch_size * shape.iter().product::<usize>()) as i64],
        (Kind::Uint8, Device::Cpu),
    ))?;
    let indices: Vec<i64> = (0..batch_size as i64).collect();
    let images = ImageBatch {
        pixels: &pixels,
        shape,
        indices: &indices,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed as u64);
    let batch = task.recipe().build(&images, &mut rng).pinned_for(device);
    let mean = vec![0.5; channels as usize];
    let std = vec![0.25; channels as usize];

    let mut run = |step: i64| -> anyhow::Result<()> {
        seed_step(config.seed, step);
        let (loss, _) = task.step(&trunk, &batch, (&mean, &std), device);
        optimizer.backward_step(&loss);
        // Reading the loss waits for the device, as a report does.
        f64::try_from(&loss)?;
        Ok(())
    };
    for step in 0..warmup {
        run(step)?;
    }
    let started = Instant::now();
    for step in warmup..warmup + steps {
        run(step)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(StepCeiling {
        pretext: config.pretext.name(),
        backbone: config.backbone.name(),
        image_size: config.image_size,
        batch_size: config.batch_size,
        steps,
        step_ms: seconds * 1e3 / steps.max(1) as f64,
        images_per_second: (steps as usize * batch_size) as f64 / seconds,
        threads: tch::get_num_threads(),
        bfloat16_autocast: device.is_cuda() || cpu_mixed_precision(),
    })
}
