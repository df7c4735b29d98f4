//! The manifest of a stored dataset: which image file has which label.
//!
//! Stored images are renamed to `images/NNNNNN.ext` at ingestion, so no name
//! taken from an archive ever becomes a path on disk; the manifest keeps the
//! original path for reference.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::storage::{write_atomic, MANIFEST_FILE};

/// Every stored image of a dataset and its class.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Class names, sorted; empty for an unlabelled dataset.
    pub classes: Vec<String>,
    /// Stored images, in archive order.
    pub entries: Vec<ManifestEntry>,
}

/// One stored image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Path relative to the dataset folder.
    pub file: String,
    /// Index into `classes`, when labelled.
    pub label: Option<usize>,
    /// The entry's path inside the uploaded archive.
    pub source: String,
}

impl Manifest {
    /// Reads the manifest of the dataset stored in `dataset_dir`.
    pub fn read(dataset_dir: &Path) -> anyhow::Result<Self> {
        let path = dataset_dir.join(MANIFEST_FILE);
        let bytes =
            std::fs::read(&path).with_context(|| format!("Failed to read {}", path.display()))?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("Failed to parse {}", path.display()))
    }

    /// Writes the manifest atomically into `dataset_dir`.
    pub fn write(&self, dataset_dir: &Path) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(self).context("Failed to serialise the manifest")?;
        write_atomic(&dataset_dir.join(MANIFEST_FILE), &bytes)
    }
}
