//! The `models` table. The API's queries are scoped to one tenant: a model
//! of another tenant reads as missing. A model belongs to the tenant of the
//! job that made it.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::datasets::DeleteOutcome;
use crate::ml::description::{ModelDescription, ModelRecord};
use crate::ml::training::InputSpec;

/// A trained model.
#[derive(Debug, Clone, Serialize)]
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

impl Model {
    /// What the row says about the model, for describing a model stored
    /// before `model.json` was written beside its weights.
    pub fn record(&self) -> ModelRecord<'_> {
        let metrics = self
            .metrics
            .0
            .as_object()
            .map(|metrics| {
                metrics
                    .iter()
                    .filter_map(|(name, value)| Some((name.clone(), value.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default();
        ModelRecord {
            id: self.id,
            kind: &self.kind,
            backbone: &self.backbone,
            input: &self.input.0,
            embedding_dim: self.embedding_dim as i64,
            classes: &self.classes.0,
            pretext: self.pretext.as_deref(),
            pretext_config: self.pretext_config.as_ref().map(|config| &config.0),
            job_id: self.job_id,
            dataset_id: self.dataset_id,
            parent_model_id: self.base_model_id,
            metrics,
            created_at: self.created_at,
        }
    }
}

/// Records the model `description` describes, made by job `job_id` of
/// `tenant_id`, inside the transaction that finishes the job.
pub async fn insert_model(
    tx: &mut Transaction<'_, Postgres>,
    tenant_id: Uuid,
    job_id: Uuid,
    description: &ModelDescription,
) -> sqlx::Result<Model> {
    sqlx::query_as!(
        Model,
        r#"insert into models (id, kind, backbone, pretext, job_id, base_model_id, dataset_id,
                             classes, embedding_dim, input, metrics, pretext_config, tenant_id,
                             created_at)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
         returning id, tenant_id, kind, backbone, pretext, job_id, base_model_id, dataset_id,
                classes as "classes: Json<Vec<String>>", embedding_dim,
                input as "input: Json<InputSpec>", metrics as "metrics: Json<serde_json::Value>",
                pretext_config as "pretext_config: Json<serde_json::Value>", created_at"#,
        description.id,
        &description.kind,
        &description.backbone,
        description.pretext.as_deref(),
        job_id,
        description.parent_model_id,
        description.dataset_id,
        Json(&description.classes) as _,
        description.embedding_dim as i32,
        Json(&description.input) as _,
        Json(&description.metrics) as _,
        description.pretext_config.as_ref().map(Json) as _,
        tenant_id,
        description.created_at
    )
    .fetch_one(&mut **tx)
    .await
}

/// One of a tenant's models by id.
pub async fn get_model(pool: &PgPool, tenant_id: Uuid, id: Uuid) -> sqlx::Result<Option<Model>> {
    sqlx::query_as!(
        Model,
        r#"select id, tenant_id, kind, backbone, pretext, job_id, base_model_id, dataset_id,
                classes as "classes: Json<Vec<String>>", embedding_dim,
                input as "input: Json<InputSpec>", metrics as "metrics: Json<serde_json::Value>",
                pretext_config as "pretext_config: Json<serde_json::Value>", created_at
         from models where id = $1 and tenant_id = $2"#,
        id,
        tenant_id
    )
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
    sqlx::query_as!(
        Model,
        r#"select id, tenant_id, kind, backbone, pretext, job_id, base_model_id, dataset_id,
                classes as "classes: Json<Vec<String>>", embedding_dim,
                input as "input: Json<InputSpec>", metrics as "metrics: Json<serde_json::Value>",
                pretext_config as "pretext_config: Json<serde_json::Value>", created_at
         from models where tenant_id = $3 and ($1::text is null or kind = $1)
         order by created_at desc, id desc limit $2"#,
        kind,
        limit,
        tenant_id
    )
    .fetch_all(pool)
    .await
}

/// Deletes a model unless a queued or running job starts from it.
pub async fn delete_model(pool: &PgPool, tenant_id: Uuid, id: Uuid) -> sqlx::Result<DeleteOutcome> {
    let mut tx = pool.begin().await?;
    let exists = sqlx::query_scalar!(
        "select id from models where id = $1 and tenant_id = $2 for update",
        id,
        tenant_id
    )
    .fetch_optional(&mut *tx)
    .await?;
    if exists.is_none() {
        return Ok(DeleteOutcome::NotFound);
    }
    let busy = sqlx::query_scalar!(
        "select id from jobs where base_model_id = $1 and state in ('queued', 'running') limit 1",
        id
    )
    .fetch_optional(&mut *tx)
    .await?;
    if busy.is_some() {
        return Ok(DeleteOutcome::InUse);
    }
    sqlx::query!("delete from models where id = $1", id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(DeleteOutcome::Deleted)
}
