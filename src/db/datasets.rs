//! The `datasets` table. Every query is scoped to one tenant: a dataset of
//! another tenant reads as missing.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::data::archive::{IngestReport, SkippedEntry};

/// A stored dataset.
#[derive(Debug, Clone, Serialize)]
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
    /// The version of its labels that `labeled`, `classes` and
    /// `class_counts` describe: 0 for the archive's class folders, then one
    /// more for every label file sent (`db::label_sets`).
    pub label_version: i32,
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
    sqlx::query_as!(
        Dataset,
        r#"insert into datasets (id, name, num_images, labeled, channels, classes, class_counts,
                               skipped, skipped_count, bytes, median_side, tenant_id)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         returning id, tenant_id, name, num_images, labeled, channels,
                classes as "classes: Json<Vec<String>>",
                class_counts as "class_counts: Json<serde_json::Value>",
                skipped as "skipped: Json<Vec<SkippedEntryRow>>", skipped_count, bytes,
                median_side, label_version, created_at"#,
        id,
        name,
        report.num_images as i32,
        report.labeled,
        i32::from(report.channels),
        Json(&report.classes) as _,
        Json(&report.class_counts) as _,
        Json(&skipped) as _,
        report.skipped_count as i32,
        report.bytes as i64,
        report.median_side as i32,
        tenant_id
    )
    .fetch_one(pool)
    .await
}

/// One of a tenant's datasets by id.
pub async fn get_dataset(
    pool: &PgPool,
    tenant_id: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<Dataset>> {
    sqlx::query_as!(
        Dataset,
        r#"select id, tenant_id, name, num_images, labeled, channels,
                classes as "classes: Json<Vec<String>>",
                class_counts as "class_counts: Json<serde_json::Value>",
                skipped as "skipped: Json<Vec<SkippedEntryRow>>", skipped_count, bytes,
                median_side, label_version, created_at
         from datasets where id = $1 and tenant_id = $2"#,
        id,
        tenant_id
    )
    .fetch_optional(pool)
    .await
}

/// A tenant's datasets, newest first.
pub async fn list_datasets(
    pool: &PgPool,
    tenant_id: Uuid,
    limit: i64,
) -> sqlx::Result<Vec<Dataset>> {
    sqlx::query_as!(
        Dataset,
        r#"select id, tenant_id, name, num_images, labeled, channels,
                classes as "classes: Json<Vec<String>>",
                class_counts as "class_counts: Json<serde_json::Value>",
                skipped as "skipped: Json<Vec<SkippedEntryRow>>", skipped_count, bytes,
                median_side, label_version, created_at
         from datasets where tenant_id = $2
         order by created_at desc, id desc limit $1"#,
        limit,
        tenant_id
    )
    .fetch_all(pool)
    .await
}

/// Which of `ids` have a dataset row, whatever their tenant.
pub async fn recorded_dataset_ids(pool: &PgPool, ids: &[Uuid]) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar!("select id from datasets where id = any($1)", ids)
        .fetch_all(pool)
        .await
}

/// Whether any dataset is recorded, in any tenant.
pub async fn any_dataset_recorded(pool: &PgPool) -> sqlx::Result<bool> {
    sqlx::query_scalar!(r#"select exists (select 1 from datasets) as "exists!""#)
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
    let exists = sqlx::query_scalar!(
        "select id from datasets where id = $1 and tenant_id = $2 for update",
        id,
        tenant_id
    )
    .fetch_optional(&mut *tx)
    .await?;
    if exists.is_none() {
        return Ok(DeleteOutcome::NotFound);
    }
    let busy = sqlx::query_scalar!(
        "select id from jobs
         where state in ('queued', 'running')
           and (dataset_id = $1
                or config ->> 'eval_dataset_id' = $1::text
                or config ->> 'test_dataset_id' = $1::text)
         limit 1",
        id
    )
    .fetch_optional(&mut *tx)
    .await?;
    if busy.is_some() {
        return Ok(DeleteOutcome::InUse);
    }
    sqlx::query!("delete from datasets where id = $1", id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(DeleteOutcome::Deleted)
}
