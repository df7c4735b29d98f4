//! The `models` table. The API's queries are scoped to one tenant: a model
//! of another tenant reads as missing. A model belongs to the tenant of the
//! job that made it.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::datasets::DeleteOutcome;
use crate::ml::training::{InputSpec, ModelArtifact};

/// A trained model.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Model {
    pub id: Uuid,
    #[serde(skip)]
    pub tenant_id: Uuid,
    pub kind: String,
    pub backbone: String,
    pub pretext: Option<String>,
    pub job_id: Uuid,
    pub base_model_id: Option<Uuid>,
    pub dataset_id: Option<Uuid>,
    pub classes: Json<Vec<String>>,
    pub embedding_dim: i32,
    pub input: Json<InputSpec>,
    pub metrics: Json<serde_json::Value>,
    pub pretext_config: Option<Json<serde_json::Value>>,
    pub created_at: DateTime<Utc>,
}

/// Where a new model came from.
pub struct ModelOrigin {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub job_id: Uuid,
    pub base_model_id: Option<Uuid>,
    pub dataset_id: Option<Uuid>,
    pub pretext: Option<String>,
}

/// Records a model inside the transaction that finishes its job.
pub async fn insert_model(
    tx: &mut Transaction<'_, Postgres>,
    origin: &ModelOrigin,
    artifact: &ModelArtifact,
) -> sqlx::Result<Model> {
    sqlx::query_as::<_, Model>(
        "insert into models (id, kind, backbone, pretext, job_id, base_model_id, dataset_id,
                             classes, embedding_dim, input, metrics, pretext_config, tenant_id)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
         returning *",
    )
    .bind(origin.id)
    .bind(artifact.kind)
    .bind(artifact.backbone)
    .bind(artifact.pretext.clone().or_else(|| origin.pretext.clone()))
    .bind(origin.job_id)
    .bind(origin.base_model_id)
    .bind(origin.dataset_id)
    .bind(Json(&artifact.classes))
    .bind(artifact.embedding_dim as i32)
    .bind(Json(&artifact.input))
    .bind(Json(&artifact.metrics))
    .bind(artifact.pretext_config.as_ref().map(Json))
    .bind(origin.tenant_id)
    .fetch_one(&mut **tx)
    .await
}

/// One of a tenant's models by id.
pub async fn get_model(pool: &PgPool, tenant_id: Uuid, id: Uuid) -> sqlx::Result<Option<Model>> {
    sqlx::query_as::<_, Model>("select * from models where id = $1 and tenant_id = $2")
        .bind(id)
        .bind(tenant_id)
        .fetch_optional(pool)
        .await
}

/// A tenant's models, newest first, optionally of one kind.
pub async fn list_models(
    pool: &PgPool,
    tenant_id: Uuid,
    kind: Option<&str>,
    limit: i64,
) -> sqlx::Result<Vec<Model>> {
    sqlx::query_as::<_, Model>(
        "select * from models where tenant_id = $3 and ($1::text is null or kind = $1)
         order by created_at desc, id desc limit $2",
    )
    .bind(kind)
    .bind(limit)
    .bind(tenant_id)
    .fetch_all(pool)
    .await
}

/// Deletes a model unless a queued or running job starts from it.
pub async fn delete_model(pool: &PgPool, tenant_id: Uuid, id: Uuid) -> sqlx::Result<DeleteOutcome> {
    let mut tx = pool.begin().await?;
    let exists: Option<(Uuid,)> =
        sqlx::query_as("select id from models where id = $1 and tenant_id = $2 for update")
            .bind(id)
            .bind(tenant_id)
            .fetch_optional(&mut *tx)
            .await?;
    if exists.is_none() {
        return Ok(DeleteOutcome::NotFound);
    }
    let busy: Option<(Uuid,)> = sqlx::query_as(
        "select id from jobs where base_model_id = $1 and state in ('queued', 'running') limit 1",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    if busy.is_some() {
        return Ok(DeleteOutcome::InUse);
    }
    sqlx::query("delete from models where id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(DeleteOutcome::Deleted)
}
