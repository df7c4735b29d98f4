//! The worker pool: one worker per device. Each worker is an async task that
//! talks to the queue (claims, heartbeats, progress, fenced finishes) and a
//! dedicated OS thread that owns the device's LibTorch state and runs the
//! training loops; they talk through channels, so tokio's threads never block
//! on LibTorch.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tch::Device;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::config::{FrozenProbeSettings, DEFAULT_TEST_FRACTION};
use super::queue::{
    claim_next_job, finish_evaluated, finish_job, finish_succeeded, finish_with_outputs,
    record_progress, renew_lease, requeue_expired_leases, JobEnd, LeaseStatus,
};
use super::spec::JobSpec;
use crate::data::content_hash::dataset_content_hash;
use crate::data::labels::LabelSet;
use crate::db::datasets::{get_dataset, Dataset};
use crate::db::jobs::{Job, Progress, JOBS_CHANNEL};
use crate::db::label_sets::get_label_set;
use crate::db::models::{get_model, Model};
use crate::ml::backbone::Backbone;
use crate::ml::dataset_inference::{run_embed, run_predict, DatasetPass};
use crate::ml::description::{
    stored_description, JobOrigin, ModelDescription, DESCRIPTION_FORMAT, LIBTORCH_VERSION,
    TCH_VERSION,
};
use crate::ml::device::device_name;
use crate::ml::evaluate::{run_evaluation, EncoderSource, EvaluationData};
use crate::ml::finetune::{run_finetune, BaseEncoder, FinetuneDatasets};
use crate::ml::inference::ModelHandle;
use crate::ml::pretrain::run_pretrain;
use crate::ml::training::{
    is_permanent, EvaluationReport, JobOutputs, ModelArtifact, PermanentError, StopReason,
    StopSignal, TrainingContext, TrainingEvent, TrainingOutcome,
};
use crate::storage::{write_atomic, Storage};

/// Settings shared by every worker.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub lease: Duration,
    pub poll_interval: Duration,
    pub max_image_pixels: u64,
    /// The wait before a job that failed for a passing cause is tried
    /// again; doubled at each further attempt, up to [`MAX_RETRY_BACKOFF`].
    pub retry_backoff: Duration,
}

/// The longest wait between two attempts of a job.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(600);

/// What a claimed job runs on, looked up and fetched before it is handed to
/// the training thread.
struct Prepared {
    spec: JobSpec,
    dataset: Dataset,
    base: Option<Model>,
    /// The base model as an embed or predict job runs it, with its classes.
    dataset_model: Option<(ModelHandle, Vec<String>)>,
    /// The dataset's labels sent after its upload that the job uses.
    labels: Option<LabelSet>,
    /// Labelled images to evaluate on (evaluate jobs; pretrain jobs that name one).
    evaluation: Option<EvaluationData>,
}

/// What the async side of a running job shares: the signal that stops the
/// training thread, and whether the job's lease was found lost.
struct RunControl<'a> {
    stop: &'a StopSignal,
    lease_lost: AtomicBool,
}

impl RunControl<'_> {
    /// The job is no longer this worker's: stop it, and (see `RunEnd`) write
    /// nothing about it and keep no model.
    fn lease_lost(&self, job: &Job) {
        if !self.lease_lost.swap(true, Ordering::SeqCst) {
            tracing::warn!(job_id = %job.id, "lease lost; stopping");
        }
        self.stop.request(StopReason::Release);
    }
}

/// A job handed to a training thread.
struct Assignment {
    spec: JobSpec,
    channels: u8,
    ctx: TrainingContext,
    dataset_dir: PathBuf,
    /// A finetune job's dataset of unlabelled images for self-training.
    unlabelled_dir: Option<PathBuf>,
    /// The base model's backbone, weights and input, for jobs that start from one.
    base: Option<(Model, PathBuf)>,
    /// The base model as an embed or predict job runs it, with its classes.
    dataset_model: Option<(ModelHandle, Vec<String>)>,
    /// Where an embed or predict job writes its files.
    outputs_dir: PathBuf,
    /// The dataset's labels sent after its upload that the job uses
    /// (finetune, embed, predict); without them, the archive's.
    labels: Option<LabelSet>,
    evaluation: Option<EvaluationData>,
    reply: oneshot::Sender<anyhow::Result<TrainingOutcome>>,
}

/// How the training thread's run of a job ended, as the worker saw it.
struct RunEnd {
    result: anyhow::Result<TrainingOutcome>,
    progress: Progress,
    /// Another worker took the job over while it ran: nothing may be written.
    lease_lost: bool,
}

/// One device's worker: the queue side, and a channel to its training thread.
pub struct Worker {
    id: Uuid,
    device: Device,
    pool: PgPool,
    storage: Storage,
    settings: WorkerSettings,
    trainer: std_mpsc::Sender<Assignment>,
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".to_string())
}

/// Runs one assignment on the training thread.
fn train(assignment: &Assignment) -> anyhow::Result<TrainingOutcome> {
    let ctx = &assignment.ctx;
    let base = assignment.base.as_ref();
    match &assignment.spec {
        JobSpec::Pretrain(config) => run_pretrain(
            ctx,
            config,
            &assignment.dataset_dir,
            assignment.channels,
            assignment.evaluation.clone(),
        ),
        JobSpec::Finetune(config) => {
            let base = base.map(|(model, weights)| BaseEncoder {
                weights,
                input: model.input.0.clone(),
            });
            let datasets = FinetuneDatasets {
                labelled: &assignment.dataset_dir,
                channels: assignment.channels,
                unlabelled: assignment.unlabelled_dir.as_deref(),
                labels: assignment.labels.as_ref(),
            };
            run_finetune(ctx, config, &datasets, base)
        }
        JobSpec::Evaluate(config) => {
            let (model, weights) =
                base.ok_or_else(|| PermanentError("an evaluate job needs base_model_id".into()))?;
            let backbone = Backbone::from_name(&model.backbone)
                .ok_or_else(|| PermanentError(format!("unknown backbone {}", model.backbone)))?;
            let source = EncoderSource {
                backbone,
                weights,
                input: model.input.0.clone(),
            };
            let evaluation = assignment
                .evaluation
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("evaluation data missing"))?;
            run_evaluation(ctx, &source, evaluation, config)
        }
        JobSpec::Embed(config) => {
            let (model, classes) = dataset_model(assignment)?;
            run_embed(ctx, &dataset_pass(assignment, model), classes, config)
        }
        JobSpec::Predict(config) => {
            let (model, classes) = dataset_model(assignment)?;
            run_predict(ctx, &dataset_pass(assignment, model), classes, config)
        }
    }
}

/// The model an embed or predict job runs, with its classes.
fn dataset_model(assignment: &Assignment) -> anyhow::Result<(&ModelHandle, &[String])> {
    let (model, classes) = assignment
        .dataset_model
        .as_ref()
        .ok_or_else(|| PermanentError("the job needs base_model_id".into()))?;
    Ok((model, classes))
}

fn dataset_pass<'a>(assignment: &'a Assignment, model: &'a ModelHandle) -> DatasetPass<'a> {
    DatasetPass {
        model,
        dataset_dir: &assignment.dataset_dir,
        outputs_dir: &assignment.outputs_dir,
        labels: assignment.labels.as_ref(),
    }
}

fn spawn_training_thread(device: Device) -> std::io::Result<std_mpsc::Sender<Assignment>> {
    let (tx, rx) = std_mpsc::channel::<Assignment>();
    std::thread::Builder::new()
        .name(format!("pretext-train-{}", device_name(device)))
        .spawn(move || {
            while let Ok(assignment) = rx.recv() {
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| train(&assignment)))
                    .unwrap_or_else(|payload| {
                        Err(anyhow::anyhow!(
                            "training panicked: {}",
                            panic_message(payload)
                        ))
                    });
                let _ = assignment.reply.send(result);
            }
        })?;
    Ok(tx)
}

/// Explains an error for the job's `error` field, with a hint where one helps.
fn describe_failure(error: &anyhow::Error, spec: &JobSpec) -> JobEnd {
    let message = format!("{error:#}");
    if message.contains("out of memory") {
        let batch = spec.batch_size();
        return JobEnd::Failed(format!(
            "out of memory at batch_size {batch}; lower config.batch_size or config.image_size ({message})"
        ));
    }
    if crate::storage::is_storage_full(error) {
        return JobEnd::Retryable(format!(
            "the server's disk is full (no space left on device); the job is retried while \
             attempts remain, from its last checkpoint, once space is freed ({message})"
        ));
    }
    if is_permanent(error) {
        JobEnd::Failed(message)
    } else {
        JobEnd::Retryable(message)
    }
}

impl Worker {
    /// Starts the training thread for `device`.
    pub fn new(
        pool: PgPool,
        storage: Storage,
        device: Device,
        settings: WorkerSettings,
    ) -> anyhow::Result<Self> {
        let trainer = spawn_training_thread(device).context("Failed to start a training thread")?;
        Ok(Self {
            id: Uuid::now_v7(),
            device,
            pool,
            storage,
            settings,
            trainer,
        })
    }

    /// Claims one job and runs it to its end; `Ok(None)` when the queue is empty.
    /// Public so tests can drain the queue deterministically.
    pub async fn try_execute_next_job(
        &self,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Uuid>> {
        requeue_expired_leases(&self.pool)
            .await
            .context("Failed to requeue expired leases")?;
        let Some(job) = claim_next_job(
            &self.pool,
            self.id,
            &device_name(self.device),
            self.settings.lease,
        )
        .await
        .context("Failed to claim a job")?
        else {
            return Ok(None);
        };
        let job_id = job.id;
        tracing::info!(%job_id, kind = %job.kind, attempt = job.attempts, device = %device_name(self.device), "job claimed");
        if let Err(error) = self.execute(job, shutdown).await {
            tracing::error!(%job_id, error = format!("{error:#}"), "job bookkeeping failed");
        }
        if let Ok(Some(job)) = crate::db::jobs::get_any_tenants_job(&self.pool, job_id).await {
            crate::telemetry::observe_job_released(&job);
        }
        Ok(Some(job_id))
    }

    /// Runs a claimed job: prepare its inputs, run it on the training
    /// thread, and settle its end in the database.
    async fn execute(&self, job: Job, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let prepared = match self.prepare(&job).await? {
            Ok(prepared) => prepared,
            Err(end) => {
                self.finish(&job, end).await?;
                return Ok(());
            }
        };
        let model_id = Uuid::now_v7();
        let spec = prepared.spec.clone();
        let base = prepared.base.clone();
        let end = self
            .train_on_thread(&job, prepared, model_id, shutdown)
            .await?;
        if end.lease_lost {
            let _ = self
                .storage
                .remove_dir(&self.storage.model_dir(model_id))
                .await;
            return Ok(());
        }
        self.settle(&job, &spec, base, model_id, end).await
    }

    /// Reads the job's spec and looks up and fetches what it runs on; the
    /// `Err` is how the job ends when something it needs is gone.
    async fn prepare(&self, job: &Job) -> anyhow::Result<Result<Prepared, JobEnd>> {
        let spec = match JobSpec::of(job) {
            Ok(spec) => spec,
            Err(error) => {
                let reason = format!("the stored {} config is unreadable: {error}", job.kind);
                return Ok(Err(JobEnd::Failed(reason)));
            }
        };
        let dataset = match job.dataset_id {
            Some(id) => get_dataset(&self.pool, job.tenant_id, id).await?,
            None => None,
        };
        let Some(dataset) = dataset else {
            let reason = "the job's dataset was deleted".to_string();
            return Ok(Err(JobEnd::Failed(reason)));
        };
        let base = match job.base_model_id {
            Some(id) => match get_model(&self.pool, job.tenant_id, id).await? {
                Some(model) => Some(model),
                None => {
                    let reason = "the job's base model was deleted".to_string();
                    return Ok(Err(JobEnd::Failed(reason)));
                }
            },
            None => None,
        };
        if let Err(error) = self.fetch_inputs(job, &spec, &dataset, base.as_ref()).await {
            tracing::warn!(job_id = %job.id, error = format!("{error:#}"), "inputs unavailable");
            return Ok(Err(JobEnd::Retryable(format!("{error:#}"))));
        }
        let evaluation = match self.evaluation_data(job, &spec, &dataset).await? {
            Ok(evaluation) => evaluation,
            Err(reason) => return Ok(Err(JobEnd::Failed(reason))),
        };
        let label_version = match &spec {
            JobSpec::Finetune(config) => config.label_version.unwrap_or(0),
            JobSpec::Embed(_) | JobSpec::Predict(_) => i64::from(dataset.label_version),
            JobSpec::Pretrain(_) | JobSpec::Evaluate(_) => 0,
        };
        let labels = match self.label_set(&dataset, label_version).await? {
            Ok(labels) => labels,
            Err(reason) => return Ok(Err(JobEnd::Failed(reason))),
        };
        let dataset_model = match (&spec, &base) {
            (JobSpec::Embed(_) | JobSpec::Predict(_), Some(model)) => {
                match self.dataset_model(model).await {
                    Ok(found) => Some(found),
                    Err(error) => return Ok(Err(JobEnd::Retryable(format!("{error:#}")))),
                }
            }
            _ => None,
        };
        Ok(Ok(Prepared {
            spec,
            dataset,
            base,
            dataset_model,
            labels,
            evaluation,
        }))
    }

    /// Version `version` of a dataset's labels, when it is one sent after
    /// the upload (`None` for the archive's, version 0); `Err` says why a
    /// job cannot have it.
    async fn label_set(
        &self,
        dataset: &Dataset,
        version: i64,
    ) -> anyhow::Result<Result<Option<LabelSet>, String>> {
        if version == 0 {
            return Ok(Ok(None));
        }
        let found = get_label_set(&self.pool, dataset.id, version as i32).await?;
        Ok(found.map(Some).ok_or_else(|| {
            format!(
                "version {version} of dataset {}'s labels is missing",
                dataset.id
            )
        }))
    }

    /// A stored model as an embed or predict job runs it, with its classes.
    async fn dataset_model(&self, model: &Model) -> anyhow::Result<(ModelHandle, Vec<String>)> {
        let description = stored_description(&self.storage, model.id, model.record()).await?;
        let weights = self.storage.model_weights(model.id);
        let handle = ModelHandle::of(&description, weights)?;
        Ok((handle, description.classes))
    }

    /// Hands the job to the training thread and, while it trains, records
    /// its events and renews the lease, until the thread answers.
    async fn train_on_thread(
        &self,
        job: &Job,
        prepared: Prepared,
        model_id: Uuid,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<RunEnd> {
        let (events_tx, events) = mpsc::unbounded_channel();
        let stop = StopSignal::default();
        let (reply, outcome) = oneshot::channel();
        let assignment = Assignment {
            ctx: TrainingContext {
                job_id: job.id,
                device: self.device,
                job_dir: self.storage.job_dir(job.id),
                model_weights: self.storage.model_weights(model_id),
                stop: stop.clone(),
                events: events_tx,
                max_image_pixels: self.settings.max_image_pixels,
            },
            dataset_dir: self.storage.dataset_dir(prepared.dataset.id),
            unlabelled_dir: match &prepared.spec {
                JobSpec::Finetune(config) => config
                    .unlabelled_dataset_id
                    .map(|id| self.storage.dataset_dir(id)),
                _ => None,
            },
            channels: prepared.dataset.channels as u8,
            dataset_model: prepared.dataset_model,
            labels: prepared.labels,
            outputs_dir: self.storage.job_outputs_dir(job.id),
            base: prepared.base.map(|model| {
                let weights = self.storage.model_weights(model.id);
                (model, weights)
            }),
            evaluation: prepared.evaluation,
            spec: prepared.spec,
            reply,
        };
        self.trainer
            .send(assignment)
            .map_err(|_| anyhow::anyhow!("the training thread has stopped"))?;
        let control = RunControl {
            stop: &stop,
            lease_lost: AtomicBool::new(false),
        };
        let mut progress = job.progress.0;
        let result = {
            // Checkpoints are published and events recorded in order, beside
            // the heartbeat rather than in its way: a slow upload of a large
            // checkpoint must not let the lease expire.
            let recorder = self.record_events(job, &mut progress, events, &control);
            // The heartbeat is a future of its own, polled beside the
            // recorder: a renewal waits for the row lock of a progress
            // transaction, which commits only while the recorder is polled.
            let renewals = self.renew_lease_while_running(job, &control);
            tokio::pin!(recorder, renewals, outcome);
            let mut recorded = false;
            let mut shutdown_seen = false;
            let result = loop {
                tokio::select! {
                    result = &mut outcome => break result.unwrap_or_else(|_| Err(anyhow::anyhow!("the training thread died"))),
                    // Ends once the training thread lets go of its sender.
                    () = &mut recorder, if !recorded => recorded = true,
                    never = &mut renewals => match never {},
                    _ = shutdown.cancelled(), if !shutdown_seen => {
                        shutdown_seen = true;
                        stop.request(StopReason::Release);
                    }
                }
            };
            // The events sent before the outcome.
            if !recorded {
                recorder.await;
            }
            result
        };
        // Nothing trains here any more, before the job's end is visible.
        crate::telemetry::observe_training_stopped(&device_name(self.device));
        Ok(RunEnd {
            result,
            progress,
            lease_lost: control.lease_lost.load(Ordering::SeqCst),
        })
    }

    /// Records the training thread's events in order until it lets go of
    /// its sender; a write that finds the lease gone stops the job.
    async fn record_events(
        &self,
        job: &Job,
        progress: &mut Progress,
        mut events: mpsc::UnboundedReceiver<TrainingEvent>,
        control: &RunControl<'_>,
    ) {
        while let Some(event) = events.recv().await {
            self.publish_if_checkpoint(job, &event).await;
            match self.record_event(job, progress, event).await {
                Ok(true) => {}
                Ok(false) => control.lease_lost(job),
                // The heartbeat decides whether the job is still ours.
                Err(error) => tracing::warn!(job_id = %job.id, %error, "progress not recorded"),
            }
        }
    }

    /// Renews the lease every third of its length, forever; asks the job to
    /// stop when it is cancelled or the lease is lost.
    async fn renew_lease_while_running(
        &self,
        job: &Job,
        control: &RunControl<'_>,
    ) -> std::convert::Infallible {
        let mut heartbeat = tokio::time::interval(self.settings.lease / 3);
        heartbeat.tick().await;
        loop {
            heartbeat.tick().await;
            match renew_lease(&self.pool, job.id, self.id, self.settings.lease).await {
                Ok(LeaseStatus::Held {
                    cancel_requested: true,
                }) => control.stop.request(StopReason::Cancel),
                Ok(LeaseStatus::Held {
                    cancel_requested: false,
                }) => {}
                Ok(LeaseStatus::Lost) => control.lease_lost(job),
                Err(error) => tracing::warn!(job_id = %job.id, %error, "heartbeat failed"),
            }
        }
    }

    /// Writes how the job ended: its model or report on success, else its
    /// end (cancelled, released, failed or to be retried).
    async fn settle(
        &self,
        job: &Job,
        spec: &JobSpec,
        base: Option<Model>,
        model_id: Uuid,
        end: RunEnd,
    ) -> anyhow::Result<()> {
        // A job that succeeds has done all its steps.
        let done = Progress {
            step: end.progress.steps,
            epoch: end.progress.epochs,
            ..end.progress
        };
        match end.result {
            Ok(TrainingOutcome::Finished(artifact)) => {
                self.settle_model(job, spec, base.as_ref(), model_id, *artifact, done)
                    .await?;
            }
            Ok(TrainingOutcome::Evaluated(mut report)) => {
                if let Some(model) = &base {
                    self.flag_test_images_seen_in_training(job, spec, model, &mut report)
                        .await?;
                }
                if finish_evaluated(&self.pool, job, self.id, &report, done).await? {
                    tracing::info!(job_id = %job.id, "evaluation succeeded");
                }
            }
            Ok(TrainingOutcome::Wrote(outputs)) => {
                self.settle_outputs(job, &outputs, done).await?;
            }
            Ok(TrainingOutcome::Stopped(StopReason::Cancel)) => {
                self.finish(job, JobEnd::Cancelled).await?;
                self.storage.remove_checkpoint(job.id).await?;
                tracing::info!(job_id = %job.id, "job cancelled");
            }
            Ok(TrainingOutcome::Stopped(StopReason::Release)) => {
                self.finish(job, JobEnd::Released).await?;
                tracing::info!(job_id = %job.id, "job released back to the queue");
            }
            Err(error) => {
                let end = describe_failure(&error, spec);
                tracing::warn!(job_id = %job.id, error = format!("{error:#}"), "job failed");
                // A file written before the failure is not served.
                self.storage.remove_job_outputs(job.id).await?;
                self.finish(job, end).await?;
            }
        }
        Ok(())
    }

    /// Shares the files an embed or predict job wrote and records them as
    /// its report; retried when they cannot be shared.
    async fn settle_outputs(
        &self,
        job: &Job,
        outputs: &JobOutputs,
        done: Progress,
    ) -> anyhow::Result<()> {
        let names: Vec<String> = outputs.files.iter().map(|f| f.name.clone()).collect();
        if let Err(error) = self.storage.publish_job_outputs(job.id, &names).await {
            tracing::warn!(job_id = %job.id, error = format!("{error:#}"), "outputs not published");
            self.storage.remove_job_outputs(job.id).await?;
            let end = JobEnd::Retryable(format!("{error:#}"));
            self.finish(job, end).await?;
            return Ok(());
        }
        if finish_with_outputs(&self.pool, job, self.id, outputs, done).await? {
            tracing::info!(job_id = %job.id, images = outputs.images, "outputs written");
        }
        Ok(())
    }

    /// Describes, stores and records the model a job trained; retried when
    /// it cannot be stored, discarded when the lease is gone.
    async fn settle_model(
        &self,
        job: &Job,
        spec: &JobSpec,
        base: Option<&Model>,
        model_id: Uuid,
        mut artifact: ModelArtifact,
        done: Progress,
    ) -> anyhow::Result<()> {
        if let Some(report) = artifact.report.as_mut() {
            flag_pretraining_data_in_online_evaluation(job, spec, report);
        }
        let stored = async {
            let description = self
                .describe_model(job, spec, base, model_id, &artifact)
                .await?;
            self.store_model(&description).await?;
            anyhow::Ok(description)
        };
        let description = match stored.await {
            Ok(description) => description,
            Err(error) => {
                self.storage.remove_model(model_id).await?;
                tracing::warn!(job_id = %job.id, error = format!("{error:#}"), "model not published");
                let end = JobEnd::Retryable(format!("{error:#}"));
                self.finish(job, end).await?;
                return Ok(());
            }
        };
        let written = finish_succeeded(
            &self.pool,
            job,
            self.id,
            &description,
            artifact.report.as_ref(),
            done,
        )
        .await;
        match written {
            Ok(true) => {
                tracing::info!(job_id = %job.id, %model_id, "job succeeded");
                self.storage.remove_checkpoint(job.id).await?;
            }
            other => {
                self.storage.remove_model(model_id).await?;
                other?;
            }
        }
        Ok(())
    }

    /// The description of the model a job just trained: the artifact's
    /// architecture and metrics, the job's config, the dataset's hash, and
    /// for a classifier its base's pretext task (whose settings are the
    /// base's own, `parent_model_id`).
    async fn describe_model(
        &self,
        job: &Job,
        spec: &JobSpec,
        base: Option<&Model>,
        model_id: Uuid,
        artifact: &ModelArtifact,
    ) -> anyhow::Result<ModelDescription> {
        let dataset_hash = match job.dataset_id {
            Some(id) => {
                let dir = self.storage.dataset_dir(id);
                let hash = tokio::task::spawn_blocking(move || dataset_content_hash(&dir))
                    .await
                    .context("the dataset hashing thread failed")??;
                Some(hash)
            }
            None => None,
        };
        Ok(ModelDescription {
            format: DESCRIPTION_FORMAT,
            id: model_id,
            kind: artifact.kind.to_string(),
            backbone: artifact.backbone.to_string(),
            input: artifact.input.clone(),
            embedding_dim: artifact.embedding_dim,
            classes: artifact.classes.clone(),
            pretext: artifact
                .pretext
                .clone()
                .or_else(|| base.and_then(|b| b.pretext.clone())),
            pretext_config: artifact.pretext_config.clone(),
            job: Some(JobOrigin {
                id: job.id,
                kind: job.kind.to_string(),
                config: spec.config_json(),
            }),
            dataset_id: job.dataset_id,
            dataset_hash,
            parent_model_id: job.base_model_id,
            metrics: artifact.metrics.clone(),
            transfer: artifact.transfer,
            vote: artifact.vote,
            tch_version: Some(TCH_VERSION.to_string()),
            libtorch_version: Some(LIBTORCH_VERSION.to_string()),
            created_at: chrono::Utc::now(),
        })
    }

    /// Writes `model.json` beside the weights and shares both.
    async fn store_model(&self, description: &ModelDescription) -> anyhow::Result<()> {
        let bytes =
            serde_json::to_vec_pretty(description).context("Failed to describe the model")?;
        let path = self.storage.model_description(description.id);
        tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
            .await
            .context("the description writing thread failed")??;
        self.storage.publish_model(description.id).await
    }

    /// Brings the job's datasets, base model and last checkpoint into the
    /// local folder when storage is shared through object storage.
    async fn fetch_inputs(
        &self,
        job: &Job,
        spec: &JobSpec,
        dataset: &Dataset,
        base: Option<&Model>,
    ) -> anyhow::Result<()> {
        self.storage.fetch_dataset(dataset.id).await?;
        if let Some(id) = spec.other_dataset() {
            if get_dataset(&self.pool, job.tenant_id, id).await?.is_some() {
                self.storage.fetch_dataset(id).await?;
            }
        }
        if let Some(base) = base {
            self.storage.fetch_model(base.id).await?;
        }
        self.storage.fetch_checkpoint(job.id).await
    }

    /// Flags an evaluate job's report when its test images come from a
    /// dataset the evaluated model, or a model it was fine-tuned from, was
    /// trained on: the test set named, else the dataset split by
    /// `test_fraction`.
    async fn flag_test_images_seen_in_training(
        &self,
        job: &Job,
        spec: &JobSpec,
        model: &Model,
        report: &mut EvaluationReport,
    ) -> anyhow::Result<()> {
        let Some(test_source) = spec.other_dataset().or(job.dataset_id) else {
            return Ok(());
        };
        let mut lineage = Some(model.clone());
        // A fine-tuning chain is short; the bound only guards against a cycle.
        for _ in 0..16 {
            let Some(current) = lineage.take() else {
                break;
            };
            if current.dataset_id == Some(test_source) {
                report.test_images_seen_in_pretraining = true;
                report.note = Some(format!(
                    "the test images come from dataset {test_source}, which model {} was trained \
                     on: its features have seen them, so these accuracies may be optimistic; \
                     for an unbiased number, set config.test_dataset_id to a labelled dataset \
                     the model never trained on",
                    current.id
                ));
                return Ok(());
            }
            if let Some(base_id) = current.base_model_id {
                lineage = get_model(&self.pool, job.tenant_id, base_id).await?;
            }
        }
        Ok(())
    }

    /// Shares a checkpoint the training thread just wrote, before its step is
    /// recorded, so a recorded checkpoint step is one other workers can fetch.
    async fn publish_if_checkpoint(&self, job: &Job, event: &TrainingEvent) {
        if matches!(event, TrainingEvent::Checkpoint { .. }) {
            if let Err(error) = self.storage.publish_checkpoint(job.id).await {
                tracing::warn!(job_id = %job.id, error = format!("{error:#}"), "checkpoint not published");
            }
        }
    }

    /// The labelled data a job evaluates on, or why it cannot run.
    async fn evaluation_data(
        &self,
        job: &Job,
        spec: &JobSpec,
        dataset: &Dataset,
    ) -> anyhow::Result<Result<Option<EvaluationData>, String>> {
        let data =
            |dataset_dir, test_dataset_dir, test_fraction, seed, probes, labels| EvaluationData {
                dataset_dir,
                test_dataset_dir,
                test_fraction,
                seed,
                max_image_pixels: self.settings.max_image_pixels,
                probes,
                labels,
            };
        match spec {
            JobSpec::Pretrain(config) => {
                let Some(id) = config.eval_dataset_id else {
                    return Ok(Ok(None));
                };
                let Some(eval_dataset) = get_dataset(&self.pool, job.tenant_id, id).await? else {
                    return Ok(Err(format!("the evaluation dataset {id} was deleted")));
                };
                // Its latest labels, whichever way they came.
                let version = i64::from(eval_dataset.label_version);
                let labels = match self.label_set(&eval_dataset, version).await? {
                    Ok(labels) => labels,
                    Err(reason) => return Ok(Err(reason)),
                };
                Ok(Ok(Some(data(
                    self.storage.dataset_dir(id),
                    None,
                    DEFAULT_TEST_FRACTION,
                    config.seed,
                    FrozenProbeSettings::default(),
                    labels,
                ))))
            }
            JobSpec::Evaluate(config) => {
                let test_dir = match config.test_dataset_id {
                    Some(id) => {
                        if get_dataset(&self.pool, job.tenant_id, id).await?.is_none() {
                            return Ok(Err(format!("the test dataset {id} was deleted")));
                        }
                        Some(self.storage.dataset_dir(id))
                    }
                    None => None,
                };
                let labels = match self
                    .label_set(dataset, config.label_version.unwrap_or(0))
                    .await?
                {
                    Ok(labels) => labels,
                    Err(reason) => return Ok(Err(reason)),
                };
                Ok(Ok(Some(data(
                    self.storage.dataset_dir(dataset.id),
                    test_dir,
                    config.test_fraction,
                    config.seed,
                    config.probes,
                    labels,
                ))))
            }
            JobSpec::Finetune(_) | JobSpec::Embed(_) | JobSpec::Predict(_) => Ok(Ok(None)),
        }
    }

    /// Ends the job, or queues it again; a retry waits a backoff that
    /// doubles with each attempt, and its error says when it comes.
    async fn finish(&self, job: &Job, end: JobEnd) -> sqlx::Result<bool> {
        let attempt = job.attempts.max(1);
        let retry_in = self
            .settings
            .retry_backoff
            .saturating_mul(1 << (attempt - 1).min(16))
            .min(MAX_RETRY_BACKOFF);
        let end = match end {
            JobEnd::Retryable(reason) if attempt < job.max_attempts => JobEnd::Retryable(format!(
                "{reason}; attempt {attempt} of {}, the next in {} s",
                job.max_attempts,
                retry_in.as_secs()
            )),
            JobEnd::Retryable(reason) => {
                JobEnd::Retryable(format!("{reason}; all {} attempts made", job.max_attempts))
            }
            other => other,
        };
        finish_job(&self.pool, job.id, self.id, &end, retry_in).await
    }

    /// Writes a training event to the database; `false` if the lease is gone.
    async fn record_event(
        &self,
        job: &Job,
        progress: &mut Progress,
        event: TrainingEvent,
    ) -> sqlx::Result<bool> {
        let (epoch, step, metrics) = match event {
            TrainingEvent::Plan {
                epochs,
                steps,
                start_step,
            } => {
                progress.epochs = epochs;
                progress.steps = steps;
                progress.step = start_step;
                progress.checkpoint_step = start_step;
                (progress.epoch, start_step, Vec::new())
            }
            TrainingEvent::Report {
                epoch,
                step,
                metrics,
            } => {
                progress.epoch = epoch;
                progress.step = step;
                (epoch, step, metrics)
            }
            TrainingEvent::Checkpoint { step } => {
                progress.checkpoint_step = step;
                progress.step = progress.step.max(step);
                (progress.epoch, progress.step, Vec::new())
            }
        };
        crate::telemetry::observe_training_report(&device_name(self.device), &metrics);
        // While the database is unreachable the write is retried, for as
        // long as the lease would last, so that an outage loses no event.
        let give_up_at = Instant::now() + self.settings.lease;
        let mut wait = Duration::from_millis(250);
        loop {
            match record_progress(
                &self.pool, job.id, self.id, *progress, epoch, step, &metrics,
            )
            .await
            {
                Err(error)
                    if crate::db::is_unreachable(&error) && Instant::now() + wait < give_up_at =>
                {
                    tracing::warn!(job_id = %job.id, %error, retry_in = ?wait, "the database is unreachable; progress not yet recorded");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                written => return written,
            }
        }
    }

    /// Claims and runs jobs until `shutdown`, waking on notifications and
    /// polling as a fallback.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut listener = match PgListener::connect_with(&self.pool).await {
            Ok(mut listener) => match listener.listen(JOBS_CHANNEL).await {
                Ok(()) => Some(listener),
                Err(error) => {
                    tracing::warn!(%error, "LISTEN failed; polling only");
                    None
                }
            },
            Err(error) => {
                tracing::warn!(%error, "no notification connection; polling only");
                None
            }
        };
        while !shutdown.is_cancelled() {
            match self.try_execute_next_job(&shutdown).await {
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(error) => tracing::warn!(error = format!("{error:#}"), "queue unavailable"),
            }
            let notified = async {
                match listener.as_mut() {
                    Some(l) => {
                        let _ = l.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(self.settings.poll_interval) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }
}

/// Flags the report of a pretrain job evaluated on its own pretraining
/// dataset: accepted, since the encoder never saw the labels, but said.
fn flag_pretraining_data_in_online_evaluation(
    job: &Job,
    spec: &JobSpec,
    report: &mut EvaluationReport,
) {
    if job.dataset_id.is_some() && spec.other_dataset() == job.dataset_id {
        report.test_images_seen_in_pretraining = true;
        report.note = Some(
            "config.eval_dataset_id is the pretraining dataset: the encoder has seen these test \
             images (without their labels) while pretraining, so these accuracies may be \
             optimistic; for an unbiased number, name a labelled dataset it never trained on"
                .to_string(),
        );
    }
}

/// Starts `count` workers over `devices` (round-robin) and returns their tasks.
pub fn spawn_workers(
    pool: &PgPool,
    storage: &Storage,
    devices: &[Device],
    count: usize,
    settings: &WorkerSettings,
    shutdown: &CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let device = devices[i % devices.len()];
        let worker = Worker::new(pool.clone(), storage.clone(), device, settings.clone())?;
        tasks.push(tokio::spawn(worker.run(shutdown.clone())));
    }
    Ok(tasks)
}
