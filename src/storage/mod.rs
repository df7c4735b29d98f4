//! Files on disk: where datasets, job checkpoints and model weights live, and
//! how they are written so that a crash never leaves a half-written file that
//! is later taken as whole (write to a temporary sibling, fsync, rename).
//!
//! The storage URL picks where artifacts are shared: `file://<folder>` keeps
//! them in the local folder only (one machine, or a shared disk), and
//! `s3://bucket/prefix` also mirrors them to object storage, so that the
//! local folder becomes each process's cache (see [`object`]). The
//! `publish_*`, `fetch_*` and `remove_*` methods are no-ops on the remote side
//! with `file://`.
//!
//! Removing a folder can take a while (a dataset holds thousands of files),
//! so the `remove_*` methods do it on a blocking thread and callers await
//! it without stalling the async runtime.

pub mod object;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use uuid::Uuid;

use self::object::ObjectMirror;

/// The storage root and the layout beneath it.
#[derive(Debug, Clone)]
pub struct Storage {
    root: PathBuf,
    mirror: Option<ObjectMirror>,
}

const CHECKPOINT_WEIGHTS: &str = "checkpoint.safetensors";
const CHECKPOINT_STATE: &str = "checkpoint.json";
const MODEL_WEIGHTS: &str = "weights.safetensors";

impl Storage {
    /// Opens storage from its URL: `file://<folder>` (the default when
    /// `url` is `None` is `file://<data_dir>`) or `s3://bucket/prefix`, with
    /// `data_dir` as the local copy.
    pub fn from_url(url: Option<&str>, data_dir: &Path) -> anyhow::Result<Self> {
        match url {
            None => Self::open(data_dir),
            Some(url) if url.starts_with("file://") => Self::open(&url["file://".len()..]),
            Some(url) if url.starts_with("s3://") => {
                let mut storage = Self::open(data_dir)?;
                storage.mirror = Some(ObjectMirror::s3(url)?);
                Ok(storage)
            }
            Some(url) => anyhow::bail!(
                "unsupported storage URL {url}; use file://<folder> or s3://<bucket>/<prefix>"
            ),
        }
    }

    /// Where artifacts are shared, for logs.
    pub fn url(&self) -> String {
        match &self.mirror {
            Some(mirror) => format!("{} (cached in {})", mirror.url(), self.root.display()),
            None => format!("file://{}", self.root.display()),
        }
    }

    /// Opens (and creates) a local storage root.
    pub fn open(root: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let root = root.into();
        for sub in ["datasets", "models", "jobs", "uploads"] {
            fs::create_dir_all(root.join(sub))
                .with_context(|| format!("Failed to create {}", root.join(sub).display()))?;
        }
        let root = root
            .canonicalize()
            .with_context(|| format!("Failed to resolve {}", root.display()))?;
        Ok(Self { root, mirror: None })
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

    /// Shares a freshly ingested dataset folder.
    pub async fn publish_dataset(&self, id: Uuid) -> anyhow::Result<()> {
        match &self.mirror {
            Some(mirror) => mirror.publish_dataset(id, &self.dataset_dir(id)).await,
            None => Ok(()),
        }
    }

    /// Makes sure a dataset's folder is here, fetching it if it is not.
    pub async fn fetch_dataset(&self, id: Uuid) -> anyhow::Result<()> {
        let dir = self.dataset_dir(id);
        let Some(mirror) = &self.mirror else {
            return Ok(());
        };
        if dir.join(crate::data::manifest::MANIFEST_FILE).exists() {
            return Ok(());
        }
        anyhow::ensure!(
            mirror.fetch_dataset(id, &dir).await?,
            "dataset {id} is not in {}",
            mirror.url()
        );
        Ok(())
    }

    /// Removes a dataset's folder here and its shared copy.
    pub async fn remove_dataset(&self, id: Uuid) -> anyhow::Result<()> {
        self.remove_dir(&self.dataset_dir(id)).await?;
        match &self.mirror {
            Some(mirror) => mirror.delete_dataset(id).await,
            None => Ok(()),
        }
    }

    /// Shares a model's weights once they are written.
    pub async fn publish_model(&self, id: Uuid) -> anyhow::Result<()> {
        match &self.mirror {
            Some(mirror) => {
                mirror
                    .publish_files(&format!("models/{id}"), &[self.model_weights(id)])
                    .await
            }
            None => Ok(()),
        }
    }

    /// Makes sure a model's weights are here, fetching them if they are not.
    pub async fn fetch_model(&self, id: Uuid) -> anyhow::Result<()> {
        let Some(mirror) = &self.mirror else {
            return Ok(());
        };
        if self.model_weights(id).exists() {
            return Ok(());
        }
        anyhow::ensure!(
            mirror
                .fetch_file(&format!("models/{id}"), MODEL_WEIGHTS, &self.model_dir(id))
                .await?,
            "model {id}'s weights are not in {}",
            mirror.url()
        );
        Ok(())
    }

    /// Removes a model's folder here and its shared copy.
    pub async fn remove_model(&self, id: Uuid) -> anyhow::Result<()> {
        self.remove_dir(&self.model_dir(id)).await?;
        match &self.mirror {
            Some(mirror) => mirror.delete_folder(&format!("models/{id}")).await,
            None => Ok(()),
        }
    }

    /// Shares the checkpoint just written in a job's folder.
    pub async fn publish_checkpoint(&self, job_id: Uuid) -> anyhow::Result<()> {
        let Some(mirror) = &self.mirror else {
            return Ok(());
        };
        let dir = self.job_dir(job_id);
        mirror
            .publish_checkpoint(
                &format!("jobs/{job_id}"),
                &dir.join(CHECKPOINT_WEIGHTS),
                &dir.join(CHECKPOINT_STATE),
            )
            .await
    }

    /// Fetches a job's shared checkpoint when it is further along than the
    /// one here (or there is none here).
    pub async fn fetch_checkpoint(&self, job_id: Uuid) -> anyhow::Result<()> {
        let Some(mirror) = &self.mirror else {
            return Ok(());
        };
        let prefix = format!("jobs/{job_id}");
        let Some(remote_state) = mirror.read(&prefix, CHECKPOINT_STATE).await? else {
            return Ok(());
        };
        let dir = self.job_dir(job_id);
        let step = |bytes: &[u8]| {
            serde_json::from_slice::<serde_json::Value>(bytes)
                .ok()
                .and_then(|v| v["step"].as_i64())
        };
        let local_step = fs::read(dir.join(CHECKPOINT_STATE))
            .ok()
            .and_then(|bytes| step(&bytes));
        if local_step.is_some() && local_step >= step(&remote_state) {
            return Ok(());
        }
        // Weights first, then the state: the state never runs ahead of the
        // weights beside it.
        anyhow::ensure!(
            mirror.fetch_file(&prefix, CHECKPOINT_WEIGHTS, &dir).await?,
            "job {job_id}'s checkpoint weights are not in {}",
            mirror.url()
        );
        write_atomic(&dir.join(CHECKPOINT_STATE), &remote_state)
    }

    /// Removes a job's checkpoint here and its shared copy.
    pub async fn remove_checkpoint(&self, job_id: Uuid) -> anyhow::Result<()> {
        self.remove_dir(&self.job_dir(job_id)).await?;
        match &self.mirror {
            Some(mirror) => mirror.delete_folder(&format!("jobs/{job_id}")).await,
            None => Ok(()),
        }
    }

    /// Removes a folder and everything in it, on a blocking thread; a missing
    /// folder is not an error.
    pub async fn remove_dir(&self, dir: &Path) -> anyhow::Result<()> {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || remove_dir_now(&dir))
            .await
            .context("the folder removal thread failed")?
    }
}

/// Removes a folder and everything in it on this thread; a missing folder is
/// not an error. For blocking threads only.
pub fn remove_dir_now(dir: &Path) -> anyhow::Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("Failed to remove {}", dir.display())),
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
