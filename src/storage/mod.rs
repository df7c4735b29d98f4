//! Files on disk: where datasets, job checkpoints, model weights and the
//! files of embed and predict jobs live, and how they are written so that a
//! crash never leaves a half-written file that is later taken as whole
//! (write to a temporary sibling, fsync, rename).
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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use uuid::Uuid;

use self::object::ObjectMirror;

/// The storage root and the layout beneath it.
#[derive(Debug, Clone)]
pub struct Storage {
    root: PathBuf,
    mirror: Option<ObjectMirror>,
}

/// File name of the manifest inside a dataset's folder, beside `images/`;
/// its contents are [`crate::data::manifest`]'s.
pub const MANIFEST_FILE: &str = "manifest.json";
const CHECKPOINT_WEIGHTS: &str = "checkpoint.safetensors";
const CHECKPOINT_STATE: &str = "checkpoint.json";
const MODEL_WEIGHTS: &str = "weights.safetensors";
/// A model's description, beside its weights.
const MODEL_DESCRIPTION: &str = "model.json";
/// The extension of an upload being received.
const UPLOAD_EXTENSION: &str = "part";

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
        self.model_dir(id).join(MODEL_WEIGHTS)
    }

    /// The `model.json` description of a model (absent for models stored
    /// before descriptions were written).
    pub fn model_description(&self, id: Uuid) -> PathBuf {
        self.model_dir(id).join(MODEL_DESCRIPTION)
    }

    /// Folder of one job's checkpoint.
    pub fn job_dir(&self, id: Uuid) -> PathBuf {
        self.root.join("jobs").join(id.to_string())
    }

    /// Folder of the files an embed or predict job wrote.
    pub fn job_outputs_dir(&self, id: Uuid) -> PathBuf {
        self.root.join("outputs").join(id.to_string())
    }

    /// A fresh file for an upload being streamed to disk; it is removed when
    /// the returned guard is, at the latest.
    pub fn new_upload(&self) -> UploadFile {
        UploadFile {
            path: self
                .root
                .join("uploads")
                .join(format!("{}.{UPLOAD_EXTENSION}", Uuid::now_v7())),
            removed: false,
        }
    }

    /// A fresh dataset id and its folder, to be filled before the dataset's
    /// row exists; the folder is removed with the returned guard unless it
    /// is kept.
    pub fn draft_dataset(&self) -> DatasetDraft {
        DatasetDraft {
            storage: self.clone(),
            id: Uuid::now_v7(),
            kept: false,
        }
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
        if dir.join(MANIFEST_FILE).exists() {
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

    /// Shares a model's weights and description once they are written.
    pub async fn publish_model(&self, id: Uuid) -> anyhow::Result<()> {
        match &self.mirror {
            Some(mirror) => {
                let files = [self.model_weights(id), self.model_description(id)];
                mirror.publish_files(&format!("models/{id}"), &files).await
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
        // Models shared before descriptions were written have none.
        mirror
            .fetch_file(
                &format!("models/{id}"),
                MODEL_DESCRIPTION,
                &self.model_dir(id),
            )
            .await?;
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

    /// Shares the files a job wrote in its output folder.
    pub async fn publish_job_outputs(&self, job_id: Uuid, names: &[String]) -> anyhow::Result<()> {
        let Some(mirror) = &self.mirror else {
            return Ok(());
        };
        let dir = self.job_outputs_dir(job_id);
        let files: Vec<PathBuf> = names.iter().map(|name| dir.join(name)).collect();
        mirror
            .publish_files(&format!("outputs/{job_id}"), &files)
            .await
    }

    /// Brings one of a job's output files here when it is not; `false`
    /// when it is nowhere.
    pub async fn fetch_job_output(&self, job_id: Uuid, name: &str) -> anyhow::Result<bool> {
        let dir = self.job_outputs_dir(job_id);
        if dir.join(name).is_file() {
            return Ok(true);
        }
        match &self.mirror {
            Some(mirror) => {
                mirror
                    .fetch_file(&format!("outputs/{job_id}"), name, &dir)
                    .await
            }
            None => Ok(false),
        }
    }

    /// Removes a job's output files here and their shared copies.
    pub async fn remove_job_outputs(&self, job_id: Uuid) -> anyhow::Result<()> {
        self.remove_dir(&self.job_outputs_dir(job_id)).await?;
        match &self.mirror {
            Some(mirror) => mirror.delete_folder(&format!("outputs/{job_id}")).await,
            None => Ok(()),
        }
    }

    /// Upload files and dataset folders here that are older than `min_age`,
    /// as left by a process that stopped mid-upload: uploads by their last
    /// write, dataset folders by the time in their (v7) id. Whether a dataset
    /// has a row is the caller's to tell; folders with other names (a fetch's
    /// temporary siblings) are never listed.
    pub async fn find_leftovers(&self, min_age: Duration) -> anyhow::Result<Leftovers> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || scan_leftovers(&root, min_age, SystemTime::now()))
            .await
            .context("the storage scan thread failed")?
    }

    /// Removes a file left in `uploads/`, on a blocking thread.
    pub async fn remove_upload(&self, path: &Path) -> anyhow::Result<()> {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("Failed to remove {}", path.display()))
            }
            _ => Ok(()),
        })
        .await
        .context("the file removal thread failed")?
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

/// What [`Storage::find_leftovers`] found.
#[derive(Debug, Default)]
pub struct Leftovers {
    /// Upload files not written to for longer than the age asked for.
    pub uploads: Vec<PathBuf>,
    /// Datasets with a folder here whose id was made longer ago than the age asked for.
    pub datasets: Vec<Uuid>,
}

fn scan_leftovers(root: &Path, min_age: Duration, now: SystemTime) -> anyhow::Result<Leftovers> {
    let old = |at: SystemTime| now.duration_since(at).is_ok_and(|age| age >= min_age);
    let mut found = Leftovers::default();
    let uploads = root.join("uploads");
    for entry in
        fs::read_dir(&uploads).with_context(|| format!("Failed to list {}", uploads.display()))?
    {
        let entry = entry?;
        let path = entry.path();
        let is_upload = path.extension().is_some_and(|e| e == UPLOAD_EXTENSION);
        if is_upload && entry.metadata()?.modified().is_ok_and(old) {
            found.uploads.push(path);
        }
    }
    let datasets = root.join("datasets");
    for entry in
        fs::read_dir(&datasets).with_context(|| format!("Failed to list {}", datasets.display()))?
    {
        let entry = entry?;
        let Some(id) = entry
            .file_name()
            .to_str()
            .and_then(|n| Uuid::parse_str(n).ok())
        else {
            continue;
        };
        let Some(made) = id.get_timestamp() else {
            continue;
        };
        let (secs, nanos) = made.to_unix();
        let made = UNIX_EPOCH + Duration::new(secs, nanos);
        if entry.file_type()?.is_dir() && old(made) {
            found.datasets.push(id);
        }
    }
    Ok(found)
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

/// An archive being received into `uploads/`. [`UploadFile::remove`] removes
/// it once the request is answered; dropped without that (the request ran
/// past its deadline, or its client went away mid-body), it removes the
/// file in the background.
#[derive(Debug)]
pub struct UploadFile {
    path: PathBuf,
    removed: bool,
}

impl UploadFile {
    /// Where the archive is written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file, on a blocking thread (unlinking gigabytes takes a moment).
    pub async fn remove(mut self) {
        self.removed = true;
        let path = self.path.clone();
        let _ = tokio::task::spawn_blocking(move || remove_upload_now(&path)).await;
    }
}

impl Drop for UploadFile {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let path = self.path.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || remove_upload_now(&path))),
            Err(_) => remove_upload_now(&path),
        }
    }
}

fn remove_upload_now(path: &Path) {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(path = %path.display(), error = %e, "upload file not removed");
        }
        _ => {}
    }
}

/// A dataset's folder before its row exists: [`DatasetDraft::keep`] once the
/// row is written, [`DatasetDraft::discard`] when the upload fails. Dropped
/// without either (the request ran past its deadline or lost its client), it
/// removes the folder here and its shared copy in the background, so that no
/// folder outlives a dataset that was never recorded.
#[derive(Debug)]
pub struct DatasetDraft {
    storage: Storage,
    id: Uuid,
    kept: bool,
}

impl DatasetDraft {
    /// The dataset's id.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The dataset's folder.
    pub fn dir(&self) -> PathBuf {
        self.storage.dataset_dir(self.id)
    }

    /// Keeps the folder: the dataset's row is written.
    pub fn keep(mut self) {
        self.kept = true;
    }

    /// Removes the folder here and its shared copy, now.
    pub async fn discard(mut self) {
        self.kept = true;
        if let Err(error) = self.storage.remove_dataset(self.id).await {
            tracing::warn!(dataset_id = %self.id, error = format!("{error:#}"), "unrecorded dataset not removed");
        }
    }
}

impl Drop for DatasetDraft {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let (storage, id) = (self.storage.clone(), self.id);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(async move {
                if let Err(error) = storage.remove_dataset(id).await {
                    tracing::warn!(dataset_id = %id, error = format!("{error:#}"), "unrecorded dataset not removed");
                }
            })),
            Err(_) => {
                let _ = remove_dir_now(&storage.dataset_dir(id));
            }
        }
    }
}

/// Whether `error` was caused by a full disk (or a spent disk quota), in
/// its chain of causes or, for errors LibTorch reports as text, its message.
pub fn is_storage_full(error: &anyhow::Error) -> bool {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    error.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|io| {
            io.kind() == std::io::ErrorKind::StorageFull
                || matches!(io.raw_os_error(), Some(ENOSPC | EDQUOT))
        }) || cause.to_string().contains("No space left on device")
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_are_old_upload_files_and_old_dataset_folders_named_by_v7_ids() {
        let root = tempfile::tempdir().unwrap();
        let storage = Storage::open(root.path()).unwrap();
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let two_hours_ago = now - 2 * hour;
        let secs = two_hours_ago.duration_since(UNIX_EPOCH).unwrap().as_secs();
        let old_id = Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, secs, 0));

        let old_upload = storage.new_upload();
        let fresh_upload = storage.new_upload();
        let not_an_upload = storage.root().join("uploads/notes.txt");
        for path in [old_upload.path(), fresh_upload.path(), &not_an_upload] {
            fs::write(path, b"bytes").unwrap();
        }
        for path in [old_upload.path(), &not_an_upload] {
            let file = fs::File::options().write(true).open(path).unwrap();
            file.set_modified(two_hours_ago).unwrap();
        }
        let v4_id = Uuid::new_v4();
        for id in [old_id, Uuid::now_v7(), v4_id] {
            fs::create_dir_all(storage.dataset_dir(id)).unwrap();
        }
        let staging = temporary_sibling(&storage.dataset_dir(old_id));
        fs::create_dir_all(&staging).unwrap();

        let found = scan_leftovers(storage.root(), hour, now).unwrap();
        assert_eq!(found.uploads, [old_upload.path().to_path_buf()]);
        assert_eq!(found.datasets, [old_id]);
    }

    #[tokio::test]
    async fn an_upload_file_goes_with_its_guard_and_a_kept_draft_stays() {
        let root = tempfile::tempdir().unwrap();
        let storage = Storage::open(root.path()).unwrap();
        let upload = storage.new_upload();
        let path = upload.path().to_path_buf();
        fs::write(&path, b"half an archive").unwrap();
        drop(upload);
        let (kept, dropped) = (storage.draft_dataset(), storage.draft_dataset());
        let (kept_dir, dropped_dir) = (kept.dir(), dropped.dir());
        for dir in [&kept_dir, &dropped_dir] {
            fs::create_dir_all(dir.join("images")).unwrap();
        }
        kept.keep();
        drop(dropped);
        for _ in 0..100 {
            if !path.exists() && !dropped_dir.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!path.exists(), "the upload file is removed");
        assert!(!dropped_dir.exists(), "a dropped draft's folder is removed");
        assert!(kept_dir.exists(), "a kept draft's folder stays");
    }
}
