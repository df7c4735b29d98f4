//! Files on disk: where datasets, job checkpoints and model weights live, and
//! how they are written so that a crash never leaves a half-written file that
//! is later taken as whole (write to a temporary sibling, fsync, rename).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use uuid::Uuid;

/// The storage root and the layout beneath it.
#[derive(Debug, Clone)]
pub struct Storage {
    root: PathBuf,
}

impl Storage {
    /// Opens (and creates) the storage root.
    pub fn open(root: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let root = root.into();
        for sub in ["datasets", "models", "jobs", "uploads"] {
            fs::create_dir_all(root.join(sub))
                .with_context(|| format!("Failed to create {}", root.join(sub).display()))?;
        }
        let root = root
            .canonicalize()
            .with_context(|| format!("Failed to resolve {}", root.display()))?;
        Ok(Self { root })
    }

    /// The storage root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Folder of one dataset's decoded images and manifest.
    pub fn dataset_dir(&self, id: Uuid) -> PathBuf {
        self.root.join("datasets").join(id.to_string())
    }

    /// Folder of one model's weights and description.
    pub fn model_dir(&self, id: Uuid) -> PathBuf {
        self.root.join("models").join(id.to_string())
    }

    /// The `.safetensors` weights of a model.
    pub fn model_weights(&self, id: Uuid) -> PathBuf {
        self.model_dir(id).join("weights.safetensors")
    }

    /// Folder of one job's checkpoint.
    pub fn job_dir(&self, id: Uuid) -> PathBuf {
        self.root.join("jobs").join(id.to_string())
    }

    /// A fresh path for an upload being streamed to disk.
    pub fn new_upload_path(&self) -> PathBuf {
        self.root
            .join("uploads")
            .join(format!("{}.part", Uuid::now_v7()))
    }

    /// Removes a folder and everything in it; a missing folder is not an error.
    pub fn remove_dir(&self, dir: &Path) -> anyhow::Result<()> {
        match fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("Failed to remove {}", dir.display())),
        }
    }
}

/// The temporary sibling a file is written to before it is renamed into place.
pub fn temporary_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", Uuid::new_v4().simple()))
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_atomic_with(path, |tmp| {
        let mut file = fs::File::create(tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        Ok(())
    })
}

/// Lets `write` fill a temporary sibling of `path`, then renames it into place.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("Failed to create {}", parent.display()))?;
    }
    let tmp = temporary_sibling(path);
    let result = write(&tmp).and_then(|()| {
        fs::rename(&tmp, path).with_context(|| format!("Failed to rename into {}", path.display()))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
