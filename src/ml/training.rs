//! What every training loop shares: the stop signal the async side raises, the
//! events a loop reports, the learning-rate schedule, the seeding of each
//! step, running averages, and what a finished job leaves behind (the
//! description of its model, an evaluation's report, or the files of an
//! embed or predict job).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::Device;

use super::classifier::{NeighbourVote, Transfer};
use uuid::Uuid;

/// Why a running loop was asked to stop before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The user cancelled the job: stop now, keep nothing.
    Cancel,
    /// The worker is shutting down or lost its lease: checkpoint and give the job back.
    Release,
}

/// A flag the async side raises and the training thread polls every step.
#[derive(Debug, Clone, Default)]
pub struct StopSignal(Arc<AtomicU8>);

impl StopSignal {
    /// Asks the loop to stop; a cancel is never downgraded to a release.
    pub fn request(&self, reason: StopReason) {
        let code = match reason {
            StopReason::Release => 1,
            StopReason::Cancel => 2,
        };
        self.0.fetch_max(code, Ordering::SeqCst);
    }

    /// The pending request, if any.
    pub fn requested(&self) -> Option<StopReason> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            1 => Some(StopReason::Release),
            _ => Some(StopReason::Cancel),
        }
    }
}

/// What a training loop tells the worker while it runs.
#[derive(Debug, Clone)]
pub enum TrainingEvent {
    /// The loop knows its length and where it starts (after a resume, not 0).
    Plan {
        epochs: i64,
        steps: i64,
        start_step: i64,
    },
    /// Progress and metric values at a step.
    Report {
        epoch: i64,
        step: i64,
        metrics: Vec<(String, f64)>,
    },
    /// A checkpoint at this step is on disk.
    Checkpoint { step: i64 },
}

/// Everything a loop needs from the worker that runs it.
pub struct TrainingContext {
    pub job_id: Uuid,
    pub device: Device,
    /// Folder for this job's checkpoint.
    pub job_dir: PathBuf,
    /// Where the resulting model's weights go.
    pub model_weights: PathBuf,
    pub stop: StopSignal,
    pub events: tokio::sync::mpsc::UnboundedSender<TrainingEvent>,
    pub max_image_pixels: u64,
}

impl TrainingContext {
    /// Sends an event; a worker that stopped listening is not an error here.
    pub fn emit(&self, event: TrainingEvent) {
        let _ = self.events.send(event);
    }
}

/// How input pixels are prepared for a model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InputSpec {
    pub image_size: u32,
    pub channels: u8,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

/// The model a successful job leaves behind (its weights are already on disk).
#[derive(Debug, Clone)]
pub struct ModelArtifact {
    pub kind: &'static str,
    pub backbone: &'static str,
    pub pretext: Option<String>,
    pub classes: Vec<String>,
    pub embedding_dim: i64,
    pub input: InputSpec,
    pub metrics: BTreeMap<String, f64>,
    pub pretext_config: Option<serde_json::Value>,
    /// Evaluation run at the end of the job, if it asked for one.
    pub report: Option<EvaluationReport>,
    /// How a classifier was made from its trunk (never `auto`: its choice).
    pub transfer: Option<Transfer>,
    /// How a kNN classifier votes.
    pub vote: Option<NeighbourVote>,
}

/// How a loop ended.
#[derive(Debug)]
pub enum TrainingOutcome {
    Finished(Box<ModelArtifact>),
    /// An evaluation job's results (no new model).
    Evaluated(EvaluationReport),
    /// An embed or predict job's files, written whole in its output folder.
    Wrote(JobOutputs),
    Stopped(StopReason),
}

/// What an embed or predict job leaves behind: files, and what they hold.
/// Stored as the job's report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobOutputs {
    /// Images the model ran on: one row (or line) of every file per image,
    /// in the dataset's archive order.
    pub images: usize,
    pub files: Vec<OutputFile>,
    /// Width of each embedding (embed jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_dim: Option<i64>,
    /// The classifier's classes (predict jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<String>>,
}

/// One file a job wrote, downloadable at `/v1/jobs/{id}/outputs/{name}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutputFile {
    pub name: String,
    pub media_type: String,
    pub bytes: u64,
}

/// What an evaluation leaves behind: a protocol's results as a table, plus
/// the headline numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvaluationReport {
    pub protocol: String,
    pub columns: Vec<String>,
    pub rows: Vec<serde_json::Value>,
    /// Headline numbers, merged into the model's and the job's metrics.
    pub summary: BTreeMap<String, f64>,
    pub train_images: usize,
    pub test_images: usize,
    /// The test images come from a dataset the evaluated model (or a model
    /// it was fine-tuned from) was trained on; `note` says which.
    #[serde(default)]
    pub test_images_seen_in_pretraining: bool,
    /// Why the report is flagged and how to get an unbiased number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Linear warm-up then cosine decay to zero.
pub fn cosine_learning_rate(base: f64, step: i64, total: i64) -> f64 {
    let warmup = (total / 20).clamp(0, 200);
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    base * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
}

/// Seeds LibTorch's generators (dropout, `Tensor::rand*`) for one step of
/// a job with `seed`: a step draws the same numbers whether or not the job
/// was stopped and resumed before it.
pub fn seed_step(seed: i64, step: i64) {
    let mixed = (seed as u64)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(step as u64)
        .wrapping_mul(0xbf58_476d_1ce4_e5b9);
    tch::manual_seed((mixed >> 1) as i64);
}

/// Running sums of metric values between two reports.
#[derive(Debug)]
pub struct RunningMeans {
    sums: BTreeMap<&'static str, (f64, u64)>,
    images: u64,
    since: Instant,
}

impl Default for RunningMeans {
    fn default() -> Self {
        Self {
            sums: BTreeMap::new(),
            images: 0,
            since: Instant::now(),
        }
    }
}

impl RunningMeans {
    /// Adds one value of a metric.
    pub fn add(&mut self, name: &'static str, value: f64) {
        let entry = self.sums.entry(name).or_insert((0.0, 0));
        entry.0 += value;
        entry.1 += 1;
    }

    /// Adds `count` values of a metric that sum to `sum`.
    pub fn add_sum(&mut self, name: &'static str, sum: f64, count: u64) {
        let entry = self.sums.entry(name).or_insert((0.0, 0));
        entry.0 += sum;
        entry.1 += count;
    }

    /// Counts images processed, for throughput.
    pub fn add_images(&mut self, n: u64) {
        self.images += n;
    }

    /// The means since the last drain, with images per second; resets.
    pub fn drain(&mut self) -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = self
            .sums
            .iter()
            .filter(|(_, (_, n))| *n > 0)
            .map(|(name, (sum, n))| (name.to_string(), sum / *n as f64))
            .collect();
        let seconds = self.since.elapsed().as_secs_f64();
        if self.images > 0 && seconds > 0.0 {
            out.push((
                "images_per_second".to_string(),
                self.images as f64 / seconds,
            ));
        }
        *self = Self::default();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let total = 1000;
        assert!(cosine_learning_rate(1.0, 0, total) < 0.1);
        let peak = cosine_learning_rate(1.0, 50, total);
        assert!((peak - 1.0).abs() < 1e-9, "{peak}");
        assert!(cosine_learning_rate(1.0, 999, total) < 1e-3);
    }

    #[test]
    fn cancel_is_never_downgraded() {
        let stop = StopSignal::default();
        stop.request(StopReason::Cancel);
        stop.request(StopReason::Release);
        assert_eq!(stop.requested(), Some(StopReason::Cancel));
    }
}

/// An error that retrying cannot fix (bad data, a configuration the data
/// cannot satisfy, memory exhausted at this batch size): the job fails at once.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PermanentError(pub String);

/// Whether `error` (or anything in its chain) is permanent.
pub fn is_permanent(error: &anyhow::Error) -> bool {
    error.chain().any(|e| e.is::<PermanentError>())
}
