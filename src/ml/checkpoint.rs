//! Reading and writing weights as `.safetensors`.
//!
//! A job's checkpoint holds every variable of its network, the optimizer's
//! state and the step it was written at, so a resumed job trains on exactly
//! as one that never stopped; a model's weights hold only what the model keeps (the trunk, plus `fc.*` for a classifier),
//! named like torchvision's so they load in PyTorch, with the
//! `num_batches_tracked` counters torchvision's batch-norm layers expect.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Kind, Tensor};

use super::optimizer::AdamW;
use super::training::{StopReason, TrainingContext, TrainingEvent};
use crate::storage::{write_atomic, write_atomic_with};

/// The variables of `vs` whose names pass `keep`, on the CPU in the
/// standard (row-major) layout whatever their layout on the device.
fn cpu_variables(vs: &VarStore, keep: impl Fn(&str) -> bool) -> Vec<(String, Tensor)> {
    vs.variables()
        .into_iter()
        .filter(|(name, _)| keep(name))
        .map(|(name, t)| (name, t.to_device(tch::Device::Cpu).contiguous()))
        .collect()
}

/// Writes named tensors, sorted by name, atomically.
fn write_named(mut named: Vec<(String, Tensor)>, path: &Path) -> anyhow::Result<()> {
    named.sort_by(|a, b| a.0.cmp(&b.0));
    write_atomic_with(path, |tmp| {
        Tensor::write_safetensors(&named, tmp)
            .with_context(|| format!("Failed to write {}", tmp.display()))
    })
}

/// Saves the variables of `vs` whose names pass `keep`, atomically.
pub fn save_vars(vs: &VarStore, path: &Path, keep: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    write_named(cpu_variables(vs, keep), path)
}

/// Saves model weights: the variables passing `keep`, plus a zero
/// `num_batches_tracked` beside each batch-norm's running mean.
pub fn save_model_weights(
    vs: &VarStore,
    path: &Path,
    keep: impl Fn(&str) -> bool,
) -> anyhow::Result<()> {
    save_model_weights_with(vs, path, keep, Vec::new())
}

/// [`save_model_weights`] with `extra` tensors beside the variables (what a
/// model keeps that is not a parameter, such as a kNN classifier's memory).
pub fn save_model_weights_with(
    vs: &VarStore,
    path: &Path,
    keep: impl Fn(&str) -> bool,
    extra: Vec<(String, Tensor)>,
) -> anyhow::Result<()> {
    let mut named = cpu_variables(vs, keep);
    named.extend(extra);
    let counters: Vec<(String, Tensor)> = named
        .iter()
        .filter_map(|(name, _)| name.strip_suffix("running_mean"))
        .map(|prefix| {
            (
                format!("{prefix}num_batches_tracked"),
                Tensor::zeros([], (Kind::Int64, tch::Device::Cpu)),
            )
        })
        .collect();
    named.extend(counters);
    write_named(named, path)
}

/// Copies tensors from `path` into the variables of `vs` whose names pass
/// `wanted`; each wanted variable must be present with the same shape.
pub fn load_vars(vs: &VarStore, path: &Path, wanted: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    copy_into_vars(vs, &read_named(path)?, path, wanted)
}

/// Every tensor stored in `path`, by name.
/// Every tensor of a weights file, by name.
pub fn read_named(path: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    Ok(Tensor::read_safetensors(path)
        .with_context(|| format!("Failed to read weights {}", path.display()))?
        .into_iter()
        .collect())
}

/// Copies `stored` (read from `path`) into the variables of `vs` whose names
/// pass `wanted`.
pub fn copy_into_vars(
    vs: &VarStore,
    stored: &HashMap<String, Tensor>,
    path: &Path,
    wanted: impl Fn(&str) -> bool,
) -> anyhow::Result<()> {
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            if !wanted(&name) {
                continue;
            }
            let Some(source) = stored.get(&name) else {
                bail!("weights {} lack `{name}`", path.display());
            };
            if source.size() != var.size() {
                bail!(
                    "weights {}: `{name}` has shape {:?}, the network expects {:?}",
                    path.display(),
                    source.size(),
                    var.size()
                );
            }
            var.copy_(&source.to_kind(var.kind()).to_device(var.device()));
        }
        Ok(())
    })
}

/// Prefix of the optimizer's state in a checkpoint's weights file.
const OPTIMIZER_PREFIX: &str = "optimizer.";
/// Name of the step a checkpoint's weights file was written at.
const STEP_KEY: &str = "checkpoint.step";

/// Where a job's training stood when its checkpoint was written.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps completed.
    pub step: i64,
}

/// A job's checkpoint: one file with the network's variables, the
/// optimizer's state and the step, and `checkpoint.json` beside it.
///
/// The optimizer's state travels in the weights file rather than a file of
/// its own so that weights and moments are always replaced together, and so
/// that whatever copies a checkpoint between workers copies both.
pub struct JobCheckpoint<'a> {
    dir: &'a Path,
}

impl<'a> JobCheckpoint<'a> {
    /// The checkpoint kept in a job's folder.
    pub fn in_dir(dir: &'a Path) -> Self {
        Self { dir }
    }

    fn weights(&self) -> std::path::PathBuf {
        self.dir.join("checkpoint.safetensors")
    }

    fn state(&self) -> std::path::PathBuf {
        self.dir.join("checkpoint.json")
    }

    /// Writes weights (with the optimizer's state) first, then the state:
    /// the state is only ever read beside weights at least as new as itself.
    pub fn save(
        &self,
        vs: &VarStore,
        optimizer: &AdamW,
        state: CheckpointState,
    ) -> anyhow::Result<()> {
        let mut named = cpu_variables(vs, |_| true);
        named.extend(
            optimizer
                .state()
                .into_iter()
                .map(|(name, t)| (format!("{OPTIMIZER_PREFIX}{name}"), t)),
        );
        named.push((STEP_KEY.to_string(), Tensor::from(state.step)));
        write_named(named, &self.weights())?;
        write_atomic(&self.state(), &serde_json::to_vec(&state)?)
    }

    /// Restores the last checkpoint into `vs` and `optimizer`, if there is
    /// one. The weights file carries its own step, and wins: it can be newer
    /// than `checkpoint.json` when a process died between the two writes, or
    /// when a copy paired an older state with newer weights.
    pub fn restore(
        &self,
        vs: &VarStore,
        optimizer: &mut AdamW,
    ) -> anyhow::Result<Option<CheckpointState>> {
        let Ok(bytes) = std::fs::read(self.state()) else {
            return Ok(None);
        };
        let mut state: CheckpointState =
            serde_json::from_slice(&bytes).context("Failed to parse checkpoint.json")?;
        let path = self.weights();
        let stored = read_named(&path)?;
        copy_into_vars(vs, &stored, &path, |_| true)?;
        let optimizer_state: HashMap<String, Tensor> = stored
            .iter()
            .filter_map(|(name, t)| {
                let name = name.strip_prefix(OPTIMIZER_PREFIX)?;
                Some((name.to_string(), t.shallow_clone()))
            })
            .collect();
        if optimizer_state.is_empty() {
            tracing::warn!(
                checkpoint = %path.display(),
                "the checkpoint holds no optimizer state; its moments start again from zero"
            );
        } else {
            optimizer.load_state(&optimizer_state).with_context(|| {
                format!("Failed to restore the optimizer from {}", path.display())
            })?;
        }
        if let Some(step) = stored.get(STEP_KEY) {
            state.step = i64::try_from(step).context("the checkpoint's step is not an integer")?;
        }
        Ok(Some(state))
    }
}

/// When a training loop writes its checkpoint: at the end of its first epoch,
/// at later epoch ends but the last once [`EPOCH_CHECKPOINT_SPACING`] has
/// passed since the previous one, every `interval`, and before stopping
/// early.
pub struct CheckpointSchedule<'a> {
    checkpoint: JobCheckpoint<'a>,
    interval: std::time::Duration,
    last: std::time::Instant,
    written: bool,
}

/// The least time between two checkpoints written because an epoch ended:
/// on a GPU a small dataset's epoch lasts a second or two, and writing the
/// weights at each would take a fifth of the training time.
pub const EPOCH_CHECKPOINT_SPACING: std::time::Duration = std::time::Duration::from_secs(10);

impl<'a> CheckpointSchedule<'a> {
    /// A schedule for the checkpoint kept in `dir`.
    pub fn new(dir: &'a Path, interval_secs: i64) -> Self {
        Self {
            checkpoint: JobCheckpoint::in_dir(dir),
            interval: std::time::Duration::from_secs(interval_secs.max(1) as u64),
            last: std::time::Instant::now(),
            written: false,
        }
    }

    /// Restores the last checkpoint into `vs` and `optimizer`; returns the
    /// step to start at.
    pub fn resume(&self, vs: &VarStore, optimizer: &mut AdamW) -> anyhow::Result<i64> {
        Ok(self
            .checkpoint
            .restore(vs, optimizer)?
            .map_or(0, |s| s.step))
    }

    /// Called after each step (`done` steps completed): checkpoints when due
    /// and returns why the loop must stop, if it must. A cancelled job stops
    /// at once, without a checkpoint.
    pub fn after_step(
        &mut self,
        ctx: &TrainingContext,
        vs: &VarStore,
        optimizer: &AdamW,
        done: i64,
        epoch_end: bool,
        total: i64,
    ) -> anyhow::Result<Option<StopReason>> {
        let stop = ctx.stop.requested();
        if stop == Some(StopReason::Cancel) {
            return Ok(stop);
        }
        let since_last = self.last.elapsed();
        let epoch_due =
            epoch_end && done < total && (!self.written || since_last >= EPOCH_CHECKPOINT_SPACING);
        if epoch_due || since_last >= self.interval || stop.is_some() {
            self.checkpoint
                .save(vs, optimizer, CheckpointState { step: done })?;
            ctx.emit(TrainingEvent::Checkpoint { step: done });
            self.last = std::time::Instant::now();
            self.written = true;
        }
        Ok(stop)
    }
}
