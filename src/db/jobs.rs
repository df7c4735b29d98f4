//! The `jobs` and `job_metrics` tables, as the API sees them: creating,
//! reading, listing and cancelling jobs, each scoped to one tenant (a job of
//! another tenant reads as missing). The worker's side of the queue
//! (claims, leases, fenced writes) lives in `jobs::queue`.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::PgPool;
use uuid::Uuid;

/// The channel workers LISTEN on for new jobs.
pub const JOBS_CHANNEL: &str = "pretext_jobs";

/// What a job does: the Postgres enum `job_kind`, and the `kind` of the API.
/// Adding a kind is a variant here, a value in a migration, and a
/// [`crate::jobs::spec::JobSpec`] variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "job_kind", rename_all = "snake_case")]
pub enum JobKind {
    /// Trains an encoder on a pretext task.
    Pretrain,
    /// Trains a classifier on labels, from scratch or from an encoder.
    Finetune,
    /// Measures a model on labelled data.
    Evaluate,
    /// Computes the embedding of every image of a dataset with a model.
    Embed,
    /// Classifies every image of a dataset with a classifier.
    Predict,
}

/// Where a job is in its life: the Postgres enum `job_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "job_state", rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobKind {
    /// Every kind, in the order the API lists them.
    pub const ALL: [JobKind; 5] = [
        JobKind::Pretrain,
        JobKind::Finetune,
        JobKind::Evaluate,
        JobKind::Embed,
        JobKind::Predict,
    ];

    /// The name in the API and in Postgres.
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Pretrain => "pretrain",
            JobKind::Finetune => "finetune",
            JobKind::Evaluate => "evaluate",
            JobKind::Embed => "embed",
            JobKind::Predict => "predict",
        }
    }

    /// The kind called `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }
}

impl JobState {
    /// Every state, in the order a job can pass through them.
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The name in the API and in Postgres.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// The state called `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.name() == name)
    }

    /// Whether the job has ended for good (it will not run again).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A job as stored.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub id: Uuid,
    #[serde(skip)]
    pub tenant_id: Uuid,
    pub kind: JobKind,
    pub state: JobState,
    pub dataset_id: Option<Uuid>,
    pub base_model_id: Option<Uuid>,
    pub config: Json<serde_json::Value>,
    pub progress: Json<Progress>,
    pub latest_metrics: Json<serde_json::Value>,
    pub model_id: Option<Uuid>,
    /// Evaluation results (evaluate jobs, and pretrain jobs with an evaluation dataset).
    pub report: Option<Json<serde_json::Value>>,
    pub error: Option<String>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub cancel_requested: bool,
    pub device: Option<String>,
    #[serde(skip)]
    pub lease_owner: Option<Uuid>,
    #[serde(skip)]
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// How far a job has come.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub struct Progress {
    pub epoch: i64,
    pub epochs: i64,
    pub step: i64,
    pub steps: i64,
    /// The step of the last checkpoint written; a retried job resumes there.
    pub checkpoint_step: i64,
}

/// A new job.
pub struct NewJob {
    pub tenant_id: Uuid,
    pub kind: JobKind,
    pub dataset_id: Uuid,
    pub base_model_id: Option<Uuid>,
    pub config: serde_json::Value,
    pub epochs: i64,
    pub max_attempts: i32,
}

/// Why a job could not be created.
#[derive(Debug)]
pub enum CreateJobError {
    DatasetNotFound,
    BaseModelNotFound,
    Database(sqlx::Error),
}

impl From<sqlx::Error> for CreateJobError {
    fn from(e: sqlx::Error) -> Self {
        CreateJobError::Database(e)
    }
}

/// Queues a job and wakes the workers. The dataset and base model rows (the
/// tenant's own) are share-locked so that a concurrent delete waits for (or
/// precedes) this insert.
pub async fn insert_job(pool: &PgPool, job: NewJob) -> Result<Job, CreateJobError> {
    let mut tx = pool.begin().await?;
    let dataset = sqlx::query_scalar!(
        "select id from datasets where id = $1 and tenant_id = $2 for share",
        job.dataset_id,
        job.tenant_id
    )
    .fetch_optional(&mut *tx)
    .await?;
    if dataset.is_none() {
        return Err(CreateJobError::DatasetNotFound);
    }
    if let Some(base) = job.base_model_id {
        let model = sqlx::query_scalar!(
            "select id from models where id = $1 and tenant_id = $2 for share",
            base,
            job.tenant_id
        )
        .fetch_optional(&mut *tx)
        .await?;
        if model.is_none() {
            return Err(CreateJobError::BaseModelNotFound);
        }
    }
    let progress = Progress {
        epochs: job.epochs,
        ..Default::default()
    };
    let row = sqlx::query_as!(
        Job,
        r#"insert into jobs (id, kind, dataset_id, base_model_id, config, progress, max_attempts,
                           tenant_id)
         values ($1, $2, $3, $4, $5, $6, $7, $8)
         returning id, tenant_id, kind as "kind: JobKind", state as "state: JobState", dataset_id,
                base_model_id, config as "config: Json<serde_json::Value>",
                progress as "progress: Json<Progress>",
                latest_metrics as "latest_metrics: Json<serde_json::Value>", model_id,
                report as "report: Json<serde_json::Value>", error, attempts, max_attempts,
                cancel_requested, device, lease_owner, lease_expires_at, created_at,
                started_at, finished_at"#,
        Uuid::now_v7(),
        job.kind as JobKind,
        job.dataset_id,
        job.base_model_id,
        Json(&job.config) as _,
        Json(progress) as _,
        job.max_attempts,
        job.tenant_id
    )
    .fetch_one(&mut *tx)
    .await?;
    notify_workers(&mut *tx, row.id).await?;
    tx.commit().await?;
    Ok(row)
}

/// Wakes the workers LISTENing on [`JOBS_CHANNEL`] for job `id`.
pub async fn notify_workers(executor: impl sqlx::PgExecutor<'_>, id: Uuid) -> sqlx::Result<()> {
    sqlx::query!(
        "select pg_notify($1, $2)::text as notified",
        JOBS_CHANNEL,
        id.to_string()
    )
    .fetch_one(executor)
    .await?;
    Ok(())
}

/// One of a tenant's jobs by id.
pub async fn get_job(pool: &PgPool, tenant_id: Uuid, id: Uuid) -> sqlx::Result<Option<Job>> {
    sqlx::query_as!(
        Job,
        r#"select id, tenant_id, kind as "kind: JobKind", state as "state: JobState", dataset_id,
                base_model_id, config as "config: Json<serde_json::Value>",
                progress as "progress: Json<Progress>",
                latest_metrics as "latest_metrics: Json<serde_json::Value>", model_id,
                report as "report: Json<serde_json::Value>", error, attempts, max_attempts,
                cancel_requested, device, lease_owner, lease_expires_at, created_at,
                started_at, finished_at
         from jobs where id = $1 and tenant_id = $2"#,
        id,
        tenant_id
    )
    .fetch_optional(pool)
    .await
}

/// The latest embed job that succeeded for `dataset_id` with `model_id`:
/// whose embeddings similarity search reads.
pub async fn latest_embed_job(
    pool: &PgPool,
    tenant_id: Uuid,
    dataset_id: Uuid,
    model_id: Uuid,
) -> sqlx::Result<Option<Uuid>> {
    sqlx::query_scalar!(
        "select id from jobs
         where tenant_id = $1 and dataset_id = $2 and base_model_id = $3
               and kind = 'embed' and state = 'succeeded'
         order by finished_at desc limit 1",
        tenant_id,
        dataset_id,
        model_id
    )
    .fetch_optional(pool)
    .await
}

/// One job by id, whatever its tenant: for workers, which run every tenant's jobs.
pub async fn get_any_tenants_job(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<Job>> {
    sqlx::query_as!(
        Job,
        r#"select id, tenant_id, kind as "kind: JobKind", state as "state: JobState", dataset_id,
                base_model_id, config as "config: Json<serde_json::Value>",
                progress as "progress: Json<Progress>",
                latest_metrics as "latest_metrics: Json<serde_json::Value>", model_id,
                report as "report: Json<serde_json::Value>", error, attempts, max_attempts,
                cancel_requested, device, lease_owner, lease_expires_at, created_at,
                started_at, finished_at
         from jobs where id = $1"#,
        id
    )
    .fetch_optional(pool)
    .await
}

/// A tenant's jobs, newest first, optionally filtered.
pub async fn list_jobs(
    pool: &PgPool,
    tenant_id: Uuid,
    state: Option<JobState>,
    kind: Option<JobKind>,
    limit: i64,
) -> sqlx::Result<Vec<Job>> {
    sqlx::query_as!(
        Job,
        r#"select id, tenant_id, kind as "kind: JobKind", state as "state: JobState", dataset_id,
                base_model_id, config as "config: Json<serde_json::Value>",
                progress as "progress: Json<Progress>",
                latest_metrics as "latest_metrics: Json<serde_json::Value>", model_id,
                report as "report: Json<serde_json::Value>", error, attempts, max_attempts,
                cancel_requested, device, lease_owner, lease_expires_at, created_at,
                started_at, finished_at
         from jobs
         where tenant_id = $4 and ($1::job_state is null or state = $1) and ($2::job_kind is null or kind = $2)
         order by created_at desc, id desc limit $3"#,
        state as Option<JobState>,
        kind as Option<JobKind>,
        limit,
        tenant_id
    )
    .fetch_all(pool)
    .await
}

/// Cancels a queued job at once, or flags a running one for its worker.
/// Returns the job as it now stands; a finished job is returned unchanged.
pub async fn cancel_job(pool: &PgPool, tenant_id: Uuid, id: Uuid) -> sqlx::Result<Option<Job>> {
    sqlx::query_as!(
        Job,
        r#"update jobs set
             state = case when state = 'queued' then 'cancelled' else state end,
             finished_at = case when state = 'queued' then now() else finished_at end,
             lease_owner = case when state = 'queued' then null else lease_owner end,
             cancel_requested = cancel_requested or state in ('queued', 'running')
         where id = $1 and tenant_id = $2
         returning id, tenant_id, kind as "kind: JobKind", state as "state: JobState", dataset_id,
                base_model_id, config as "config: Json<serde_json::Value>",
                progress as "progress: Json<Progress>",
                latest_metrics as "latest_metrics: Json<serde_json::Value>", model_id,
                report as "report: Json<serde_json::Value>", error, attempts, max_attempts,
                cancel_requested, device, lease_owner, lease_expires_at, created_at,
                started_at, finished_at"#,
        id,
        tenant_id
    )
    .fetch_optional(pool)
    .await
}

/// A metric value recorded during training.
#[derive(Debug, Clone, Serialize)]
pub struct MetricPoint {
    pub step: i64,
    pub epoch: i32,
    pub name: String,
    pub value: f64,
    pub at: DateTime<Utc>,
}

/// A tenant's job's metric points in step order, optionally of one name.
pub async fn list_metrics(
    pool: &PgPool,
    tenant_id: Uuid,
    job_id: Uuid,
    name: Option<&str>,
) -> sqlx::Result<Vec<MetricPoint>> {
    sqlx::query_as!(
        MetricPoint,
        "select step, epoch, name, value, at from job_metrics
         where job_id = $1 and ($2::text is null or name = $2)
           and job_id in (select id from jobs where id = $1 and tenant_id = $3)
         order by step, id",
        job_id,
        name,
        tenant_id
    )
    .fetch_all(pool)
    .await
}

/// A metric value with its row id, which orders a job's metrics as they were
/// written (the live event stream resumes from it).
#[derive(Debug, Clone, Serialize)]
pub struct NumberedMetric {
    pub id: i64,
    pub step: i64,
    pub epoch: i32,
    pub name: String,
    pub value: f64,
    pub at: DateTime<Utc>,
}

/// Up to `limit` of a tenant's job's metric rows with an id above
/// `after_id`, in id order.
pub async fn list_metrics_after(
    pool: &PgPool,
    tenant_id: Uuid,
    job_id: Uuid,
    after_id: i64,
    limit: i64,
) -> sqlx::Result<Vec<NumberedMetric>> {
    sqlx::query_as!(
        NumberedMetric,
        "select id, step, epoch, name, value, at from job_metrics
         where job_id = $1 and id > $2
           and job_id in (select id from jobs where id = $1 and tenant_id = $4)
         order by id limit $3",
        job_id,
        after_id,
        limit,
        tenant_id
    )
    .fetch_all(pool)
    .await
}

/// How many jobs there are of each state and kind (pairs with none are
/// absent), over every tenant: the Prometheus metrics are the operator's.
pub async fn count_jobs_by_state(pool: &PgPool) -> sqlx::Result<Vec<(JobState, JobKind, i64)>> {
    let rows = sqlx::query!(
        r#"select state as "state: JobState", kind as "kind: JobKind", count(*) as "count!"
         from jobs group by state, kind"#
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.state, row.kind, row.count))
        .collect())
}
