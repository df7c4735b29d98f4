//! The worker's side of the Postgres job queue.
//!
//! A claim moves one queued job to `running` and stamps it with the worker's
//! lease in a single statement. Every later write about that job is fenced on
//! `lease_owner`: a worker whose lease expired and was taken over changes
//! nothing. Expired leases return jobs to the queue (or fail them once
//! `max_attempts` is spent).

use std::time::Duration;

use sqlx::types::Json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::db::jobs::{notify_workers, Job, JobKind, JobState, Progress};
use crate::db::models::insert_model;
use crate::ml::description::ModelDescription;
use crate::ml::training::{EvaluationReport, JobOutputs};

/// Claims the oldest queued job for `owner`, or returns `None`.
pub async fn claim_next_job(
    pool: &PgPool,
    owner: Uuid,
    device: &str,
    lease: Duration,
) -> sqlx::Result<Option<Job>> {
    sqlx::query_as!(
        Job,
        r#"update jobs set
             state = 'running',
             attempts = attempts + 1,
             lease_owner = $1,
             lease_expires_at = now() + make_interval(secs => $2),
             device = $3,
             started_at = coalesce(started_at, now()),
             error = null,
             retry_after = null
         where id = (
             select id from jobs
             where state = 'queued' and (retry_after is null or retry_after <= now())
             order by created_at, id
             for update skip locked
             limit 1
         )
         returning id, tenant_id, kind as "kind: JobKind", state as "state: JobState", dataset_id,
                base_model_id, config as "config: Json<serde_json::Value>",
                progress as "progress: Json<Progress>",
                latest_metrics as "latest_metrics: Json<serde_json::Value>", model_id,
                report as "report: Json<serde_json::Value>", error, attempts, max_attempts,
                cancel_requested, device, lease_owner, lease_expires_at, created_at,
                started_at, finished_at"#,
        owner,
        lease.as_secs_f64(),
        device
    )
    .fetch_optional(pool)
    .await
}

/// Returns jobs whose lease ran out to the queue, or fails them when their
/// attempts are spent. Returns how many jobs were touched.
pub async fn requeue_expired_leases(pool: &PgPool) -> sqlx::Result<u64> {
    let done = sqlx::query!(
        "update jobs set
             state = case
                 when cancel_requested then 'cancelled'::job_state
                 when attempts >= max_attempts then 'failed'::job_state
                 else 'queued'::job_state end,
             error = case
                 when cancel_requested then null
                 when attempts >= max_attempts then
                     'the worker running this job stopped responding ' || attempts || ' time(s); max_attempts reached'
                 else error end,
             finished_at = case
                 when cancel_requested or attempts >= max_attempts then now()
                 else null end,
             lease_owner = null,
             lease_expires_at = null
         where state = 'running' and lease_expires_at < now()"
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// What a heartbeat learned.
#[derive(Debug, PartialEq, Eq)]
pub enum LeaseStatus {
    Held { cancel_requested: bool },
    Lost,
}

/// Extends the lease of a job this worker holds.
pub async fn renew_lease(
    pool: &PgPool,
    job_id: Uuid,
    owner: Uuid,
    lease: Duration,
) -> sqlx::Result<LeaseStatus> {
    let row = sqlx::query_scalar!(
        "update jobs set lease_expires_at = now() + make_interval(secs => $3)
         where id = $1 and lease_owner = $2 and state = 'running'
         returning cancel_requested",
        job_id,
        owner,
        lease.as_secs_f64()
    )
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        Some(cancel_requested) => LeaseStatus::Held { cancel_requested },
        None => LeaseStatus::Lost,
    })
}

/// Records progress and metric values (one point per step and name: a value
/// already recorded for the step is kept); `false` if the lease is no longer held.
pub async fn record_progress(
    pool: &PgPool,
    job_id: Uuid,
    owner: Uuid,
    progress: Progress,
    epoch: i64,
    step: i64,
    metrics: &[(String, f64)],
) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let latest: serde_json::Map<String, serde_json::Value> = metrics
        .iter()
        .filter(|(_, v)| v.is_finite())
        .map(|(k, v)| (k.clone(), serde_json::json!(v)))
        .collect();
    let updated = sqlx::query!(
        "update jobs set progress = $3, latest_metrics = latest_metrics || $4
         where id = $1 and lease_owner = $2 and state = 'running'",
        job_id,
        owner,
        Json(progress) as _,
        Json(latest) as _
    )
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 0 {
        return Ok(false);
    }
    // A step trained again after a resume keeps the point recorded the first
    // time: the event stream's ids only grow, so a client never sees a step twice.
    for (name, value) in metrics.iter().filter(|(_, v)| v.is_finite()) {
        sqlx::query!(
            "insert into job_metrics (job_id, step, epoch, name, value) values ($1, $2, $3, $4, $5)
             on conflict (job_id, step, name) do nothing",
            job_id,
            step,
            epoch as i32,
            name,
            value
        )
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// Marks the job succeeded and records its model, in one transaction fenced
/// on the lease. `false` (and nothing written) if the lease was lost.
pub async fn finish_succeeded(
    pool: &PgPool,
    job: &Job,
    owner: Uuid,
    description: &ModelDescription,
    report: Option<&EvaluationReport>,
    progress: Progress,
) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let held = sqlx::query_scalar!(
        "select id from jobs where id = $1 and lease_owner = $2 and state = 'running' for update",
        job.id,
        owner
    )
    .fetch_optional(&mut *tx)
    .await?;
    if held.is_none() {
        return Ok(false);
    }
    insert_model(&mut tx, job.tenant_id, job.id, description).await?;
    sqlx::query!(
        "update jobs set state = 'succeeded', model_id = $2, progress = $3, finished_at = now(),
             lease_owner = null, lease_expires_at = null, error = null,
             latest_metrics = latest_metrics || $4, report = $5
         where id = $1",
        job.id,
        description.id,
        Json(progress) as _,
        Json(&description.metrics) as _,
        report.map(Json) as _
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Marks an evaluate job succeeded with its report, and merges the headline
/// numbers into the evaluated model's metrics; one transaction, fenced.
pub async fn finish_evaluated(
    pool: &PgPool,
    job: &Job,
    owner: Uuid,
    report: &EvaluationReport,
    progress: Progress,
) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let updated = sqlx::query!(
        "update jobs set state = 'succeeded', progress = $3, finished_at = now(),
             lease_owner = null, lease_expires_at = null, error = null,
             latest_metrics = latest_metrics || $4, report = $5
         where id = $1 and lease_owner = $2 and state = 'running'",
        job.id,
        owner,
        Json(progress) as _,
        Json(&report.summary) as _,
        Json(report) as _
    )
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 0 {
        return Ok(false);
    }
    sqlx::query!(
        "update models set metrics = metrics || $2 where id = $1",
        job.base_model_id,
        Json(&report.summary) as _
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Marks an embed or predict job succeeded with the description of its
/// files as its report; fenced on the lease (`false`, nothing written, if
/// it was lost).
pub async fn finish_with_outputs(
    pool: &PgPool,
    job: &Job,
    owner: Uuid,
    outputs: &JobOutputs,
    progress: Progress,
) -> sqlx::Result<bool> {
    let updated = sqlx::query!(
        "update jobs set state = 'succeeded', progress = $3, finished_at = now(),
             lease_owner = null, lease_expires_at = null, error = null, report = $4
         where id = $1 and lease_owner = $2 and state = 'running'",
        job.id,
        owner,
        Json(progress) as _,
        Json(outputs) as _
    )
    .execute(pool)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// How a job ended other than with success.
#[derive(Debug)]
pub enum JobEnd {
    Cancelled,
    /// Permanently failed (bad data, bad config): no retry.
    Failed(String),
    /// Failed for a cause that may pass: retried while attempts remain.
    Retryable(String),
    /// Given back (shutdown): queued again, this attempt not counted.
    Released,
}

/// Ends (or re-queues) a job this worker holds; fenced on the lease. A job
/// queued again after a [`JobEnd::Retryable`] end is not claimed before
/// `retry_in` has passed.
pub async fn finish_job(
    pool: &PgPool,
    job_id: Uuid,
    owner: Uuid,
    end: &JobEnd,
    retry_in: Duration,
) -> sqlx::Result<bool> {
    // The state to set; `None`: back to the queue unless no attempt is left.
    let (state, error, attempts_delta) = match end {
        JobEnd::Cancelled => (Some(JobState::Cancelled), None, 0),
        JobEnd::Failed(e) => (Some(JobState::Failed), Some(e.as_str()), 0),
        JobEnd::Retryable(e) => (None, Some(e.as_str()), 0),
        JobEnd::Released => (Some(JobState::Queued), None, 1),
    };
    let row = sqlx::query_scalar!(
        r#"update jobs set
             state = coalesce($5, case when attempts >= max_attempts then 'failed'::job_state
                                       else 'queued'::job_state end),
             error = $3,
             attempts = attempts - $4,
             finished_at = case
                 when coalesce($5, case when attempts >= max_attempts then 'failed'::job_state
                                        else 'queued'::job_state end) = 'queued' then null
                 else now() end,
             lease_owner = null,
             lease_expires_at = null,
             retry_after = case when $6::float8 > 0 then now() + make_interval(secs => $6::float8) end
         where id = $1 and lease_owner = $2 and state = 'running'
         returning state as "state: JobState""#,
        job_id,
        owner,
        error,
        attempts_delta,
        state as Option<JobState>,
        match end {
            JobEnd::Retryable(_) => retry_in.as_secs_f64(),
            _ => 0.0,
        }
    )
    .fetch_optional(pool)
    .await?;
    if row == Some(JobState::Queued) {
        notify_workers(pool, job_id).await?;
    }
    Ok(row.is_some())
}
