//! The object-storage side of [`Storage`](super::Storage): artifacts published
//! to an `s3://bucket/prefix` when they become whole and fetched into the
//! local folder when a process needs one it does not have.
//!
//! Keys beneath the prefix: `datasets/<id>.tar` (the dataset's manifest and
//! images, packed as one object), `models/<id>/weights.safetensors`,
//! `jobs/<id>/checkpoint.{safetensors,json}`, and `outputs/<job id>/<file>`
//! (an embed or predict job's files). Every put is atomic per object,
//! and every fetch lands in a temporary sibling that is renamed into place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::client::{HttpError, HttpErrorKind};
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ObjectStore, ObjectStoreExt, RetryConfig};
use tokio::io::AsyncWriteExt;

use super::{temporary_sibling, MANIFEST_FILE};

/// A bucket (and prefix) that artifacts are mirrored to.
#[derive(Debug, Clone)]
pub struct ObjectMirror {
    store: Arc<dyn ObjectStore>,
    url: String,
}

/// How long a request to the object store is retried, with exponential
/// backoff, before it fails: `PRETEXT_OBJECT_STORE_RETRY_SECS`.
const RETRY_SECS_VAR: &str = "PRETEXT_OBJECT_STORE_RETRY_SECS";
const DEFAULT_RETRY_SECS: u64 = 60;

/// Whether `error` says the object store could not be reached (refused,
/// cut off or timed out, after the retries), a fault that passes.
pub fn is_unreachable(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.downcast_ref::<HttpError>().is_some_and(|http| {
            matches!(
                http.kind(),
                HttpErrorKind::Connect
                    | HttpErrorKind::Request
                    | HttpErrorKind::Timeout
                    | HttpErrorKind::Interrupted
            )
        })
    })
}

fn retry_config() -> anyhow::Result<RetryConfig> {
    let secs = match std::env::var(RETRY_SECS_VAR) {
        Ok(value) => value.parse::<u64>().with_context(|| {
            format!("{RETRY_SECS_VAR} must be a whole number of seconds, not {value:?}")
        })?,
        Err(_) => DEFAULT_RETRY_SECS,
    };
    Ok(RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 10,
        retry_timeout: std::time::Duration::from_secs(secs),
    })
}

/// What a dataset's packed object holds: the manifest and the images, not
/// any cache derived from them.
const DATASET_ENTRIES: [&str; 2] = [MANIFEST_FILE, "images"];

impl ObjectMirror {
    /// Connects to `s3://bucket/prefix`; endpoint, region and credentials
    /// come from the standard `AWS_*` environment variables, and how long
    /// requests are retried from `PRETEXT_OBJECT_STORE_RETRY_SECS`.
    pub fn s3(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("s3://")
            .context("an object-storage URL starts with s3://")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        anyhow::ensure!(
            !bucket.is_empty(),
            "the storage URL {url} names no bucket; use s3://<bucket>/<prefix>"
        );
        let s3 = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(retry_config()?)
            .build()
            .with_context(|| format!("Failed to configure object storage for {url}"))?;
        let prefix = prefix.trim_matches('/');
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(PrefixStore::new(s3, prefix))
        };
        Ok(Self {
            store,
            url: url.to_string(),
        })
    }

    /// The URL this mirror was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Uploads a local file as one object (multipart when it is large).
    async fn put_file(&self, file: &Path, key: &ObjectPath) -> anyhow::Result<()> {
        let mut source = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("Failed to open {}", file.display()))?;
        let mut writer = BufWriter::new(self.store.clone(), key.clone());
        let copied = tokio::io::copy(&mut source, &mut writer).await;
        if let Err(error) = copied {
            let _ = writer.abort().await;
            return Err(error).with_context(|| format!("Failed to upload {key}"));
        }
        writer
            .shutdown()
            .await
            .with_context(|| format!("Failed to finish uploading {key}"))
    }

    /// Downloads one object into `file` (via a temporary sibling); `false`
    /// when there is no such object.
    async fn get_file(&self, key: &ObjectPath, file: &Path) -> anyhow::Result<bool> {
        let result = match self.store.get(key).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(error) => return Err(error).with_context(|| format!("Failed to fetch {key}")),
        };
        if let Some(parent) = file.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .with_context(|| format!("Failed to create {}", parent.display()))?;
        }
        let tmp = temporary_sibling(file);
        let written = async {
            let mut out = tokio::fs::File::create(&tmp).await?;
            let mut stream = result.into_stream();
            while let Some(chunk) = stream.next().await {
                out.write_all(&chunk?).await?;
            }
            out.sync_all().await?;
            tokio::fs::rename(&tmp, file).await?;
            anyhow::Ok(())
        }
        .await;
        if written.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        written.with_context(|| format!("Failed to fetch {key} into {}", file.display()))?;
        Ok(true)
    }

    async fn get_bytes(&self, key: &ObjectPath) -> anyhow::Result<Option<bytes::Bytes>> {
        match self.store.get(key).await {
            Ok(result) => Ok(Some(
                result
                    .bytes()
                    .await
                    .with_context(|| format!("Failed to fetch {key}"))?,
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(error) => Err(error).with_context(|| format!("Failed to fetch {key}")),
        }
    }

    /// Deletes every object under `prefix`.
    async fn delete_prefix(&self, prefix: &ObjectPath) -> anyhow::Result<()> {
        let mut listing = self.store.list(Some(prefix));
        while let Some(meta) = listing.next().await {
            let meta = meta.with_context(|| format!("Failed to list {prefix}"))?;
            self.delete(&meta.location).await?;
        }
        Ok(())
    }

    async fn delete(&self, key: &ObjectPath) -> anyhow::Result<()> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(error).with_context(|| format!("Failed to delete {key}")),
        }
    }

    fn dataset_key(id: uuid::Uuid) -> ObjectPath {
        ObjectPath::from(format!("datasets/{id}.tar"))
    }

    /// Packs a dataset folder into one tar object.
    pub async fn publish_dataset(&self, id: uuid::Uuid, dir: &Path) -> anyhow::Result<()> {
        let packed = temporary_sibling(&dir.with_extension("tar"));
        let (source, tar_path) = (dir.to_path_buf(), packed.clone());
        let result = async {
            tokio::task::spawn_blocking(move || pack_dataset(&source, &tar_path))
                .await
                .context("the packing thread failed")??;
            self.put_file(&packed, &Self::dataset_key(id)).await
        }
        .await;
        let _ = tokio::fs::remove_file(&packed).await;
        result
    }

    /// Fetches and unpacks a dataset into `dir`; `false` if none is stored.
    pub async fn fetch_dataset(&self, id: uuid::Uuid, dir: &Path) -> anyhow::Result<bool> {
        let packed = temporary_sibling(&dir.with_extension("tar"));
        let result = async {
            if !self.get_file(&Self::dataset_key(id), &packed).await? {
                return Ok(false);
            }
            let (archive, target) = (packed.clone(), dir.to_path_buf());
            tokio::task::spawn_blocking(move || unpack_dataset(&archive, &target))
                .await
                .context("the unpacking thread failed")??;
            anyhow::Ok(true)
        }
        .await;
        let _ = tokio::fs::remove_file(&packed).await;
        result
    }

    /// Deletes a dataset's object.
    pub async fn delete_dataset(&self, id: uuid::Uuid) -> anyhow::Result<()> {
        self.delete(&Self::dataset_key(id)).await
    }

    /// Uploads every file directly in `dir` under `prefix/` (a model's folder).
    pub async fn publish_files(&self, prefix: &str, files: &[PathBuf]) -> anyhow::Result<()> {
        for file in files {
            let name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .context("a published file has a name")?;
            self.put_file(file, &ObjectPath::from(format!("{prefix}/{name}")))
                .await?;
        }
        Ok(())
    }

    /// Downloads `prefix/<name>` into `dir/<name>`; `false` if it is not stored.
    pub async fn fetch_file(&self, prefix: &str, name: &str, dir: &Path) -> anyhow::Result<bool> {
        self.get_file(
            &ObjectPath::from(format!("{prefix}/{name}")),
            &dir.join(name),
        )
        .await
    }

    /// Uploads a checkpoint: the state is read before the weights and put
    /// after them, so the stored state never claims more than the stored
    /// weights hold even while training writes a newer checkpoint.
    pub async fn publish_checkpoint(
        &self,
        prefix: &str,
        weights: &Path,
        state: &Path,
    ) -> anyhow::Result<()> {
        let state_bytes = match tokio::fs::read(state).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("Failed to read {}", state.display())),
        };
        self.publish_files(prefix, &[weights.to_path_buf()]).await?;
        let name = state
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("a checkpoint state file has a name")?;
        let key = ObjectPath::from(format!("{prefix}/{name}"));
        self.store
            .put(&key, state_bytes.into())
            .await
            .with_context(|| format!("Failed to upload {key}"))?;
        Ok(())
    }

    /// The bytes of `prefix/<name>`, if stored.
    pub async fn read(&self, prefix: &str, name: &str) -> anyhow::Result<Option<bytes::Bytes>> {
        self.get_bytes(&ObjectPath::from(format!("{prefix}/{name}")))
            .await
    }

    /// Deletes every object under `prefix/`.
    pub async fn delete_folder(&self, prefix: &str) -> anyhow::Result<()> {
        self.delete_prefix(&ObjectPath::from(prefix)).await
    }
}

/// Writes a dataset folder's manifest and images into a tar file.
fn pack_dataset(dir: &Path, tar_path: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(tar_path)
        .with_context(|| format!("Failed to create {}", tar_path.display()))?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    for entry in DATASET_ENTRIES {
        let path = dir.join(entry);
        if path.is_dir() {
            builder.append_dir_all(entry, &path)
        } else {
            builder.append_path_with_name(&path, entry)
        }
        .with_context(|| format!("Failed to pack {}", path.display()))?;
    }
    let mut out = builder
        .into_inner()
        .context("Failed to finish the dataset archive")?;
    std::io::Write::flush(&mut out)?;
    Ok(())
}

/// Unpacks a dataset tar beside `dir`, then renames it into place; a folder
/// another fetch put there first is kept.
fn unpack_dataset(archive: &Path, dir: &Path) -> anyhow::Result<()> {
    let staging = temporary_sibling(dir);
    let unpacked = (|| {
        let file = std::fs::File::open(archive)?;
        tar::Archive::new(std::io::BufReader::new(file)).unpack(&staging)?;
        anyhow::Ok(())
    })()
    .with_context(|| format!("Failed to unpack {}", archive.display()));
    if let Err(error) = unpacked {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(error);
    }
    if let Err(error) = std::fs::rename(&staging, dir) {
        let _ = std::fs::remove_dir_all(&staging);
        if !dir.join(MANIFEST_FILE).exists() {
            return Err(error).with_context(|| format!("Failed to move into {}", dir.display()));
        }
    }
    Ok(())
}
