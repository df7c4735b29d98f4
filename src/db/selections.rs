//! The `selections` table: the images chosen to be labelled next, with how
//! they were chosen; scoped to a tenant (another tenant's reads as missing).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::PgPool;
use uuid::Uuid;

/// A stored selection.
#[derive(Debug, Clone, Serialize)]
pub struct Selection {
    pub id: Uuid,
    #[serde(skip)]
    pub tenant_id: Uuid,
    pub dataset_id: Uuid,
    pub model_id: Uuid,
    /// The embed job whose embeddings (and probabilities) it read.
    pub embed_job_id: Uuid,
    pub strategy: String,
    pub budget: i32,
    pub seed: i64,
    /// The version of the dataset's labels whose images it left out.
    pub label_version: i32,
    /// The chosen images, in the order chosen.
    pub image_ids: Json<Vec<i64>>,
    pub created_at: DateTime<Utc>,
}

/// What a new selection records.
pub struct NewSelection<'a> {
    pub tenant_id: Uuid,
    pub dataset_id: Uuid,
    pub model_id: Uuid,
    pub embed_job_id: Uuid,
    pub strategy: &'a str,
    pub budget: i32,
    pub seed: i64,
    pub label_version: i32,
    pub image_ids: &'a [i64],
}

/// Records a selection.
pub async fn insert_selection(pool: &PgPool, new: NewSelection<'_>) -> sqlx::Result<Selection> {
    sqlx::query_as!(
        Selection,
        r#"insert into selections (id, tenant_id, dataset_id, model_id, embed_job_id, strategy,
                                 budget, seed, label_version, image_ids)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         returning id, tenant_id, dataset_id, model_id, embed_job_id, strategy, budget, seed,
                   label_version, image_ids as "image_ids: Json<Vec<i64>>", created_at"#,
        Uuid::now_v7(),
        new.tenant_id,
        new.dataset_id,
        new.model_id,
        new.embed_job_id,
        new.strategy,
        new.budget,
        new.seed,
        new.label_version,
        Json(new.image_ids) as _
    )
    .fetch_one(pool)
    .await
}

/// One of a tenant's selections of a dataset.
pub async fn get_selection(
    pool: &PgPool,
    tenant_id: Uuid,
    dataset_id: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<Selection>> {
    sqlx::query_as!(
        Selection,
        r#"select id, tenant_id, dataset_id, model_id, embed_job_id, strategy, budget, seed,
                  label_version, image_ids as "image_ids: Json<Vec<i64>>", created_at
         from selections where id = $1 and dataset_id = $2 and tenant_id = $3"#,
        id,
        dataset_id,
        tenant_id
    )
    .fetch_optional(pool)
    .await
}
