//! The `label_sets` table: the versions of a dataset's labels sent after its
//! upload. Version 0 is the archive's own class folders (in the dataset's
//! manifest, not here); each label file makes the next version, written with
//! the dataset row's summary in one transaction and never changed after.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::data::labels::LabelSet;

/// One stored version, without its per-image labels.
#[derive(Debug, Clone, Serialize)]
pub struct LabelVersion {
    pub version: i32,
    pub labelled: i32,
    /// Images whose label this version set or changed.
    pub changed: i32,
    pub created_at: DateTime<Utc>,
}

/// Why a new version was not written.
#[derive(Debug, thiserror::Error)]
pub enum NewVersionError {
    #[error("no such dataset")]
    DatasetNotFound,
    /// Another label file was applied since `expected` was read.
    #[error("the dataset's labels changed meanwhile (now version {0})")]
    Moved(i32),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// The labels of version `version` (at least 1) of a dataset.
pub async fn get_label_set(
    pool: &PgPool,
    dataset_id: Uuid,
    version: i32,
) -> sqlx::Result<Option<LabelSet>> {
    let row = sqlx::query!(
        r#"select classes as "classes: Json<Vec<String>>", labels as "labels: Json<Vec<Option<u32>>>"
         from label_sets where dataset_id = $1 and version = $2"#,
        dataset_id,
        version
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|row| LabelSet {
        classes: row.classes.0,
        labels: row.labels.0,
    }))
}

/// Every stored version of a dataset's labels, oldest first.
pub async fn list_label_versions(
    pool: &PgPool,
    dataset_id: Uuid,
) -> sqlx::Result<Vec<LabelVersion>> {
    sqlx::query_as!(
        LabelVersion,
        "select version, labelled, changed, created_at from label_sets
         where dataset_id = $1 order by version",
        dataset_id
    )
    .fetch_all(pool)
    .await
}

/// Writes `labels` as the version after `expected` of a tenant's dataset,
/// and makes the dataset row describe it; refused when the dataset's
/// latest version is no longer `expected`. Returns the new version.
pub async fn insert_label_version(
    pool: &PgPool,
    tenant_id: Uuid,
    dataset_id: Uuid,
    expected: i32,
    labels: &LabelSet,
    changed: usize,
) -> Result<i32, NewVersionError> {
    let mut tx = pool.begin().await?;
    let current = sqlx::query_scalar!(
        "select label_version from datasets where id = $1 and tenant_id = $2 for update",
        dataset_id,
        tenant_id
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(NewVersionError::DatasetNotFound)?;
    if current != expected {
        return Err(NewVersionError::Moved(current));
    }
    let version = current + 1;
    let labelled = labels.labelled() as i32;
    sqlx::query!(
        "insert into label_sets (dataset_id, version, classes, labels, labelled, changed)
         values ($1, $2, $3, $4, $5, $6)",
        dataset_id,
        version,
        Json(&labels.classes) as _,
        Json(&labels.labels) as _,
        labelled,
        changed as i32
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "update datasets set label_version = $2, labeled = $3, classes = $4, class_counts = $5
         where id = $1",
        dataset_id,
        version,
        labelled > 0,
        Json(&labels.classes) as _,
        Json(&labels.class_counts()) as _
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(version)
}
