//! Reading and writing weights as `.safetensors`.
//!
//! A job's checkpoint holds every variable of its network; a model's weights
//! hold only what the model keeps (the trunk, plus `fc.*` for a classifier),
//! named like torchvision's so they load in PyTorch, with the
//! `num_batches_tracked` counters torchvision's batch-norm layers expect.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Kind, Tensor};

use crate::storage::{write_atomic, write_atomic_with};

/// Saves the variables of `vs` whose names pass `keep`, atomically.
pub fn save_vars(vs: &VarStore, path: &Path, keep: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(name, _)| keep(name))
        .map(|(name, t)| (name, t.to_device(tch::Device::Cpu)))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    write_atomic_with(path, |tmp| {
        Tensor::write_safetensors(&named, tmp)
            .with_context(|| format!("Failed to write {}", tmp.display()))
    })
}

/// Saves model weights: the variables passing `keep`, plus a zero
/// `num_batches_tracked` beside each batch-norm's running mean.
pub fn save_model_weights(
    vs: &VarStore,
    path: &Path,
    keep: impl Fn(&str) -> bool,
) -> anyhow::Result<()> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(name, _)| keep(name))
        .map(|(name, t)| (name, t.to_device(tch::Device::Cpu)))
        .collect();
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
    named.sort_by(|a, b| a.0.cmp(&b.0));
    write_atomic_with(path, |tmp| {
        Tensor::write_safetensors(&named, tmp)
            .with_context(|| format!("Failed to write {}", tmp.display()))
    })
}

/// Copies tensors from `path` into the variables of `vs` whose names pass
/// `wanted`; each wanted variable must be present with the same shape.
pub fn load_vars(vs: &VarStore, path: &Path, wanted: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    let stored: HashMap<String, Tensor> = Tensor::read_safetensors(path)
        .with_context(|| format!("Failed to read weights {}", path.display()))?
        .into_iter()
        .collect();
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

/// Where a job's training stood when its checkpoint was written.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps completed.
    pub step: i64,
}

/// A job's checkpoint: weights and the state next to them.
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

    /// Writes weights first, then the state: the state is only ever read
    /// beside weights at least as new as itself.
    pub fn save(&self, vs: &VarStore, state: CheckpointState) -> anyhow::Result<()> {
        save_vars(vs, &self.weights(), |_| true)?;
        write_atomic(&self.state(), &serde_json::to_vec(&state)?)
    }

    /// Restores the last checkpoint into `vs`, if there is one.
    pub fn restore(&self, vs: &VarStore) -> anyhow::Result<Option<CheckpointState>> {
        let Ok(bytes) = std::fs::read(self.state()) else {
            return Ok(None);
        };
        let state: CheckpointState =
            serde_json::from_slice(&bytes).context("Failed to parse checkpoint.json")?;
        load_vars(vs, &self.weights(), |_| true)?;
        Ok(Some(state))
    }
}
