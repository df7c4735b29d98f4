//! The `datasets` table. Every query is scoped to one tenant: a dataset of
//! another tenant reads as missing.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::data::archive::{IngestReport, SkippedEntry};

/// A stored dataset.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Dataset {
    pub id: Uuid,
    #[serde(skip)]
    pub tenant_id: Uuid,
    pub name: String,
    pub num_images: i32,
    pub labeled: bool,
    pub channels: i32,
    pub classes: Json<Vec<String>>,
    pub class_counts: Json<serde_json::Value>,
    pub skipped: Json<Vec<SkippedEntryRow>>,
    pub skipped_count: i32,
    pub bytes: i64,
    pub median_side: i32,
    pub created_at: DateTime<Utc>,
}

/// A skipped archive entry as stored.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SkippedEntryRow {
    pub path: String,
    pub reason: String,
}

impl From<&SkippedEntry> for SkippedEntryRow {
    fn from(s: &SkippedEntry) -> Self {
        Self {
            path: s.path.clone(),
            reason: s.reason.clone(),
        }
    }
}

/// Records an ingested dataset.
pub async fn insert_dataset(
    pool: &PgPool,
    tenant_id: Uuid,
    id: Uuid,
    name: &str,
    report: &IngestReport,
) -> sqlx::Result<Dataset> {
    let skipped: Vec<SkippedEntryRow> = report.skipped.iter().map(Into::into).collect();
    sqlx::query_as::<_, Dataset>(
        "insert into datasets (id, name, num_images, labeled, channels, classes, class_counts,
                               skipped, skipped_count, bytes, median_side, tenant_id)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         returning *",
    )
    .bind(id)
    .bind(name)
    .bind(report.num_images as i32)
    .bind(report.labeled)
    .bind(i32::from(report.channels))
    .bind(Json(&report.classes))
    .bind(Json(&report.class_counts))
    .bind(Json(&skipped))
    .bind(report.skipped_count as i32)
    .bind(report.bytes as i64)
    .bind(report.median_side as i32)
    .bind(tenant_id)
    .fetch_one(pool)
    .await
}

/// One of a tenant's datasets by id.
pub async fn get_dataset(
    pool: &PgPool,
    tenant_id: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<Dataset>> {
    sqlx::query_as::<_, Dataset>("select * from datasets where id = $1 and tenant_id = $2")
        .bind(id)
        .bind(tenant_id)
        .fetch_optional(pool)
        .await
}

/// A tenant's datasets, newest first.
pub async fn list_datasets(
    pool: &PgPool,
    tenant_id: Uuid,
    limit: i64,
) -> sqlx::Result<Vec<Dataset>> {
    sqlx::query_as::<_, Dataset>(
        "select * from datasets where tenant_id = $2
         order by created_at desc, id desc limit $1",
    )
    .bind(limit)
    .bind(tenant_id)
    .fetch_all(pool)
    .await
}

/// Which of `ids` have a dataset row, whatever their tenant.
pub async fn recorded_dataset_ids(pool: &PgPool, ids: &[Uuid]) -> sqlx::Result<Vec<Uuid>> {
    let rows: Vec<(Uuid,)> = sqlx::query_as("select id from datasets where id = any($1)")
        .bind(ids)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// Whether any dataset is recorded, in any tenant.
pub async fn any_dataset_recorded(pool: &PgPool) -> sqlx::Result<bool> {
    sqlx::query_scalar("select exists (select 1 from datasets)")
        .fetch_one(pool)
        .await
}

/// What happened to a delete request.
#[derive(Debug, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    NotFound,
    /// A queued or running job uses it.
    InUse,
}

/// Deletes a dataset unless a queued or running job uses it, as its
/// `dataset_id` or as the `eval_dataset_id` or `test_dataset_id` of its
/// config; the row is locked first, so no job can be submitted on it in
/// between.
pub async fn delete_dataset(
    pool: &PgPool,
    tenant_id: Uuid,
    id: Uuid,
) -> sqlx::Result<DeleteOutcome> {
    let mut tx = pool.begin().await?;
    let exists: Option<(Uuid,)> =
        sqlx::query_as("select id from datasets where id = $1 and tenant_id = $2 for update")
            .bind(id)
            .bind(tenant_id)
            .fetch_optional(&mut *tx)
            .await?;
    if exists.is_none() {
        return Ok(DeleteOutcome::NotFound);
    }
    let busy: Option<(Uuid,)> = sqlx::query_as(
        "select id from jobs
         where state in ('queued', 'running')
           and (dataset_id = $1
                or config ->> 'eval_dataset_id' = $1::text
                or config ->> 'test_dataset_id' = $1::text)
         limit 1",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    if busy.is_some() {
        return Ok(DeleteOutcome::InUse);
    }
    sqlx::query("delete from datasets where id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(DeleteOutcome::Deleted)
}
