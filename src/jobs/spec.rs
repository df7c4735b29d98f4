//! A job's validated configuration as one typed value: the HTTP layer
//! resolves a request into a [`JobSpec`] once, its config is stored as JSON
//! in the job row beside the kind, and the worker reads the same type back.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::config::{EmbedConfig, EvaluateConfig, FinetuneConfig, PredictConfig, PretrainConfig};
use crate::db::jobs::{Job, JobKind};

/// What a job runs, one variant per [`JobKind`], every default filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "config", rename_all = "snake_case")]
pub enum JobSpec {
    Pretrain(PretrainConfig),
    Finetune(FinetuneConfig),
    Evaluate(EvaluateConfig),
    Embed(EmbedConfig),
    Predict(PredictConfig),
}

impl JobSpec {
    /// The spec stored in a job row (its `kind` and `config` columns).
    pub fn of(job: &Job) -> Result<Self, serde_json::Error> {
        Self::from_stored(job.kind, &job.config.0)
    }

    /// The spec of a job of `kind` whose stored config is `config`.
    pub fn from_stored(
        kind: JobKind,
        config: &serde_json::Value,
    ) -> Result<Self, serde_json::Error> {
        serde_json::from_value(serde_json::json!({ "kind": kind, "config": config }))
    }

    /// The job's kind.
    pub fn kind(&self) -> JobKind {
        match self {
            JobSpec::Pretrain(_) => JobKind::Pretrain,
            JobSpec::Finetune(_) => JobKind::Finetune,
            JobSpec::Evaluate(_) => JobKind::Evaluate,
            JobSpec::Embed(_) => JobKind::Embed,
            JobSpec::Predict(_) => JobKind::Predict,
        }
    }

    /// The config as stored in the job row.
    pub fn config_json(&self) -> serde_json::Value {
        let value = match self {
            JobSpec::Pretrain(config) => serde_json::to_value(config),
            JobSpec::Finetune(config) => serde_json::to_value(config),
            JobSpec::Evaluate(config) => serde_json::to_value(config),
            JobSpec::Embed(config) => serde_json::to_value(config),
            JobSpec::Predict(config) => serde_json::to_value(config),
        };
        value.expect("a job config serialises: its fields are plain data")
    }

    /// Epochs the job plans (its progress before the first report).
    pub fn epochs(&self) -> i64 {
        match self {
            JobSpec::Pretrain(config) => config.epochs,
            JobSpec::Finetune(config) => config.epochs,
            JobSpec::Evaluate(config) => config.epochs,
            // One pass over the dataset.
            JobSpec::Embed(_) | JobSpec::Predict(_) => 1,
        }
    }

    /// Images per training step (per forward pass for embed and predict jobs).
    pub fn batch_size(&self) -> i64 {
        match self {
            JobSpec::Pretrain(config) => config.batch_size,
            JobSpec::Finetune(config) => config.batch_size,
            JobSpec::Evaluate(config) => config.batch_size,
            JobSpec::Embed(config) => config.batch_size,
            JobSpec::Predict(config) => config.batch_size,
        }
    }

    /// The labelled dataset the job tests on besides its own dataset: a
    /// pretrain job's `eval_dataset_id`, an evaluate job's `test_dataset_id`.
    pub fn other_dataset(&self) -> Option<Uuid> {
        match self {
            JobSpec::Pretrain(config) => config.eval_dataset_id,
            JobSpec::Finetune(config) => config.unlabelled_dataset_id,
            JobSpec::Evaluate(config) => config.test_dataset_id,
            JobSpec::Embed(_) | JobSpec::Predict(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::config::{DefaultsFrom, PretrainConfigRequest};

    #[test]
    fn a_spec_reads_back_from_its_kind_and_stored_config() {
        let from = DefaultsFrom {
            median_side: 28,
            base: None,
        };
        let spec = JobSpec::Pretrain(PretrainConfigRequest::default().resolve(from).unwrap());
        let stored = spec.config_json();
        let fields = stored.as_object().expect("a config is an object");
        assert!(!fields.contains_key("kind"), "the kind has its own column");
        assert_eq!(JobSpec::from_stored(spec.kind(), &stored).unwrap(), spec);
        assert!(JobSpec::from_stored(JobKind::Finetune, &stored).is_err());
    }
}
