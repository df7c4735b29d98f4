//! Builds pretraining batches on their own thread, ahead of the training
//! step: while step `i` runs, the batches of the next steps are cut from the
//! dataset's pixels (in parallel on the rayon pool) and wait in a channel of
//! two. Each batch depends only on the seed and its step, so a resumed job
//! sees the same batches as one that never stopped.

use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

use anyhow::Context;
use tch::Device;

use super::device::device_name;
use super::pretext::{BatchRecipe, ImageBatch, PretextBatch};
use crate::data::batches::{epoch_order, step_rng};
use crate::data::loader::ImageTensorSet;

/// Batches built ahead of the step that takes them.
const BATCHES_AHEAD: usize = 2;

/// Which steps to build batches for, and how.
#[derive(Debug, Clone, Copy)]
pub struct BatchPlan {
    pub seed: i64,
    pub batch_size: usize,
    pub steps_per_epoch: i64,
    /// The first step to build (after a resume, not 0).
    pub start_step: i64,
    /// One past the last step.
    pub total_steps: i64,
}

/// The receiving end of the thread that builds batches.
pub struct BatchPrefetcher {
    batches: Option<Receiver<(i64, PretextBatch)>>,
    producer: Option<JoinHandle<()>>,
}

impl BatchPrefetcher {
    /// Starts building the plan's batches from `data` with `recipe`, pinned
    /// for copies to `device`.
    pub fn start(
        data: ImageTensorSet,
        recipe: BatchRecipe,
        plan: BatchPlan,
        device: Device,
    ) -> anyhow::Result<Self> {
        let (tx, rx) = sync_channel(BATCHES_AHEAD);
        let producer = std::thread::Builder::new()
            .name(format!("pretext-batches-{}", device_name(device)))
            .spawn(move || {
                let pixels = data.pixels();
                let shape = data.image_shape();
                let mut order = Vec::new();
                let mut order_epoch = -1;
                for step in plan.start_step..plan.total_steps {
                    let epoch = step / plan.steps_per_epoch;
                    if epoch != order_epoch {
                        order = epoch_order(data.len(), plan.seed, epoch);
                        order_epoch = epoch;
                    }
                    let within = (step % plan.steps_per_epoch) as usize;
                    let images = ImageBatch {
                        pixels,
                        shape,
                        indices: &order[within * plan.batch_size..(within + 1) * plan.batch_size],
                    };
                    let batch = recipe
                        .build(&images, &mut step_rng(plan.seed, step))
                        .pinned_for(device);
                    if tx.send((step, batch)).is_err() {
                        // The training loop stopped early.
                        return;
                    }
                }
            })
            .context("Failed to start the batch-building thread")?;
        Ok(Self {
            batches: Some(rx),
            producer: Some(producer),
        })
    }

    /// The batch of `step`, waiting for it if it is not built yet.
    pub fn next(&mut self, step: i64) -> anyhow::Result<PretextBatch> {
        let received = self.batches.as_ref().and_then(|rx| rx.recv().ok());
        match received {
            Some((built, batch)) if built == step => Ok(batch),
            Some((built, _)) => {
                anyhow::bail!("batches out of order: expected step {step}, got step {built}")
            }
            None => {
                let panic = self
                    .producer
                    .take()
                    .and_then(|producer| producer.join().err())
                    .map(|payload| {
                        payload
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "unknown panic".to_string())
                    });
                anyhow::bail!(
                    "building the batch of step {step} failed: {}",
                    panic.unwrap_or_else(|| "no more batches".to_string())
                )
            }
        }
    }
}

impl Drop for BatchPrefetcher {
    /// Stops the producer (its next send fails) and waits for it, so the
    /// dataset's memory is freed before the job ends.
    fn drop(&mut self) {
        drop(self.batches.take());
        if let Some(producer) = self.producer.take() {
            let _ = producer.join();
        }
    }
}
