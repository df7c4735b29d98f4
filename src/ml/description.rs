//! What a model is, written beside its weights as `model.json`: enough to
//! rebuild and run it (backbone, input size and normalisation, classes),
//! where it came from (pretext task and the job's full resolved config, the
//! dataset and a hash of its content, the parent model) and what it scored,
//! with the library versions that trained it. Inference builds the network
//! from this file; models stored before it existed are described from their
//! database row instead ([`ModelDescription::from_record`]).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::backbone::Backbone;
use super::classifier::{NeighbourVote, Transfer};
use super::training::InputSpec;

/// The version of the description's layout.
pub const DESCRIPTION_FORMAT: u32 = 1;

/// The tch crate the service is built with.
pub const TCH_VERSION: &str = env!("PRETEXT_TCH_VERSION");
/// The LibTorch the service is built against (PyTorch's version string).
pub const LIBTORCH_VERSION: &str = env!("PRETEXT_LIBTORCH_VERSION");

/// A model's own description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDescription {
    /// [`DESCRIPTION_FORMAT`] when written.
    pub format: u32,
    pub id: Uuid,
    /// `encoder` (trunk only) or `classifier` (trunk and `fc` head).
    pub kind: String,
    pub backbone: String,
    /// Input size, channels and per-channel normalisation.
    pub input: InputSpec,
    pub embedding_dim: i64,
    /// Class names in output order (classifiers); empty for encoders.
    pub classes: Vec<String>,
    /// The pretext task the trunk learned (for a classifier, its base's).
    pub pretext: Option<String>,
    /// What the encoder must remember of its task (e.g. the permutations).
    pub pretext_config: Option<serde_json::Value>,
    /// The job that made the model: its id, kind and full resolved config.
    pub job: Option<JobOrigin>,
    pub dataset_id: Option<Uuid>,
    /// `sha256:` of the dataset's stored images and labels.
    pub dataset_hash: Option<String>,
    pub parent_model_id: Option<Uuid>,
    /// Final metrics of the job that made it.
    pub metrics: BTreeMap<String, f64>,
    /// How a classifier was made from its trunk: `fine_tune`,
    /// `linear_probe` or `knn` (what `auto` chose); absent for encoders and
    /// for classifiers stored before transfer methods (fine-tuned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<Transfer>,
    /// How a kNN classifier votes; its labelled features are in its weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vote: Option<NeighbourVote>,
    /// The tch and LibTorch versions that wrote the weights; `None` for a
    /// model described from its database row.
    pub tch_version: Option<String>,
    pub libtorch_version: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// The job a model came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobOrigin {
    pub id: Uuid,
    pub kind: String,
    pub config: serde_json::Value,
}

/// What the stored record of a model says about it, for models stored
/// before descriptions were written.
#[derive(Debug, Clone)]
pub struct ModelRecord<'a> {
    pub id: Uuid,
    pub kind: &'a str,
    pub backbone: &'a str,
    pub input: &'a InputSpec,
    pub embedding_dim: i64,
    pub classes: &'a [String],
    pub pretext: Option<&'a str>,
    pub pretext_config: Option<&'a serde_json::Value>,
    pub job_id: Uuid,
    pub dataset_id: Option<Uuid>,
    pub parent_model_id: Option<Uuid>,
    pub metrics: BTreeMap<String, f64>,
    pub created_at: DateTime<Utc>,
}

impl ModelDescription {
    /// The description of a model stored without one, from its record; the
    /// job's config, the dataset's hash and the versions are unknown.
    pub fn from_record(record: ModelRecord<'_>) -> Self {
        Self {
            format: DESCRIPTION_FORMAT,
            id: record.id,
            kind: record.kind.to_string(),
            backbone: record.backbone.to_string(),
            input: record.input.clone(),
            embedding_dim: record.embedding_dim,
            classes: record.classes.to_vec(),
            pretext: record.pretext.map(str::to_string),
            pretext_config: record.pretext_config.cloned(),
            job: None,
            dataset_id: record.dataset_id,
            dataset_hash: None,
            parent_model_id: record.parent_model_id,
            metrics: record.metrics,
            transfer: None,
            vote: None,
            tch_version: None,
            libtorch_version: None,
            created_at: record.created_at,
        }
    }

    /// The backbone to rebuild, if this build knows it.
    pub fn backbone(&self) -> Option<Backbone> {
        Backbone::from_name(&self.backbone)
    }

    /// Number of classes of a classifier; `None` for an encoder.
    pub fn num_classes(&self) -> Option<usize> {
        (self.kind == "classifier").then_some(self.classes.len())
    }
}

/// The description of stored model `id`: its `model.json`, fetched from
/// shared storage when needed, or for a model stored before descriptions
/// were written, the one its database row (`record`) gives.
pub async fn stored_description(
    storage: &crate::storage::Storage,
    id: uuid::Uuid,
    record: ModelRecord<'_>,
) -> anyhow::Result<ModelDescription> {
    use anyhow::Context;
    storage.fetch_model(id).await?;
    let path = storage.model_description(id);
    match tokio::fs::read(&path).await {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("Failed to parse {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(ModelDescription::from_record(record))
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("Failed to read {}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_knows_its_library_versions() {
        assert_eq!(TCH_VERSION, "0.24.0");
        assert!(LIBTORCH_VERSION.starts_with("2.11.0"), "{LIBTORCH_VERSION}");
    }
}
