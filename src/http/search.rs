//! `POST /v1/datasets/{id}/search`: the images of a dataset most similar to
//! a query image (one of the dataset's, by id, or one sent in the body), by
//! the cosine similarity of a model's embeddings. The dataset's embeddings
//! are those of the latest embed job that succeeded for this dataset and
//! model; once read they stay in memory (a few indexes, the least recently
//! used dropped first), so a query costs one pass over the matrix.

use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::datasets::{read_manifest, tenant_dataset};
use super::error::ApiError;
use super::extract::{ApiPath, ApiQuery};
use super::labels::labels_at;
use super::models::{find_model, infer};
use super::AppState;
use crate::auth::Tenant;
use crate::data::embeddings::{EmbeddingIndex, Neighbour};
use crate::db::datasets::Dataset;
use crate::db::jobs::latest_embed_job;
use crate::ml::dataset_inference::EMBEDDINGS_FILE;
use crate::ml::inference::{InferenceOutput, InferenceTask};

/// Most neighbours one search returns.
const MAX_K: i64 = 1000;

/// Indexes (and maps) kept in memory at once.
const CACHED_ENTRIES: usize = 4;

/// Something computed from an embed job's outputs, by that job's id.
type CachedEntry<T> = (Uuid, Arc<T>);

/// What was read or computed from embed jobs' outputs (their embedding
/// indexes, their maps), by the embed job, a few at once, most recently
/// used last.
pub struct EmbedJobCache<T>(Arc<Mutex<Vec<CachedEntry<T>>>>);

impl<T> Default for EmbedJobCache<T> {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Vec::new())))
    }
}

impl<T> Clone for EmbedJobCache<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> EmbedJobCache<T> {
    pub(super) fn get(&self, job_id: Uuid) -> Option<Arc<T>> {
        let mut entries = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let position = entries.iter().position(|(id, _)| *id == job_id)?;
        let entry = entries.remove(position);
        let value = entry.1.clone();
        entries.push(entry);
        Some(value)
    }

    pub(super) fn insert(&self, job_id: Uuid, value: Arc<T>) {
        let mut entries = self.0.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|(id, _)| *id != job_id);
        if entries.len() >= CACHED_ENTRIES {
            entries.remove(0);
        }
        entries.push((job_id, value));
    }
}

/// Query of `POST /v1/datasets/{id}/search`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchParams {
    /// The model whose embeddings to compare.
    pub model_id: Uuid,
    /// An image of the dataset to search from; without it, the body's image.
    pub image_id: Option<i64>,
    /// Neighbours to return.
    pub k: Option<i64>,
}

/// One neighbour as returned.
#[derive(Debug, Serialize)]
pub struct Hit {
    pub image_id: usize,
    pub path: String,
    pub label: Option<String>,
    /// Cosine similarity to the query, in [-1, 1].
    pub score: f32,
}

/// The answer of a search.
#[derive(Debug, Serialize)]
pub struct SearchResult {
    pub dataset_id: Uuid,
    pub model_id: Uuid,
    /// The embed job whose embeddings were searched.
    pub embed_job_id: Uuid,
    pub results: Vec<Hit>,
}

/// `POST /v1/datasets/{id}/search?model_id=…&image_id=…&k=10`
pub async fn search(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(params): ApiQuery<SearchParams>,
    request: Request,
) -> Result<Json<SearchResult>, ApiError> {
    let k = match params.k.unwrap_or(10) {
        k @ 1..=MAX_K => k as usize,
        other => {
            return Err(ApiError::field(
                "k",
                format!("must be between 1 and {MAX_K} (got {other})"),
            ))
        }
    };
    let dataset = tenant_dataset(&state, &tenant, id).await?;
    let model = find_model(&state, &tenant, params.model_id).await?;
    let embed_job_id = embedded_by(&state, &tenant, id, model.id, "search").await?;
    let index = embedding_index(&state, embed_job_id).await?;
    let (query, except) = match params.image_id {
        Some(image_id) => {
            let row = usize::try_from(image_id)
                .ok()
                .and_then(|n| index.row(n).map(|row| (n, row.to_vec())))
                .ok_or_else(|| {
                    ApiError::field(
                        "image_id",
                        format!(
                            "dataset {id} has no image {image_id}; its images are numbered 0 to {}",
                            index.len().saturating_sub(1)
                        ),
                    )
                })?;
            (row.1, Some(row.0))
        }
        None => (
            query_embedding(&state, &model, request, index.dim()).await?,
            None,
        ),
    };
    let found = {
        let index = index.clone();
        tokio::task::spawn_blocking(move || index.nearest(&query, k, except))
            .await
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("search thread failed: {e}")))?
    };
    let results = describe_hits(&state, &dataset, found).await?;
    Ok(Json(SearchResult {
        dataset_id: id,
        model_id: model.id,
        embed_job_id,
        results,
    }))
}

/// The latest embed job that succeeded for `dataset_id` with `model_id`,
/// or the 409 that says how to make one before trying to `what` again.
pub(super) async fn embedded_by(
    state: &AppState,
    tenant: &Tenant,
    dataset_id: Uuid,
    model_id: Uuid,
    what: &str,
) -> Result<Uuid, ApiError> {
    latest_embed_job(&state.pool, tenant.id, dataset_id, model_id)
        .await?
        .ok_or_else(|| {
            ApiError::Conflict(format!(
                "dataset {dataset_id} has no embeddings by model {model_id} yet: submit an embed \
                 job (POST /v1/jobs with kind embed, dataset_id {dataset_id} and base_model_id \
                 {model_id}) and {what} once it has succeeded"
            ))
        })
}

/// The embedding of the one image in the request's body.
async fn query_embedding(
    state: &AppState,
    model: &crate::db::models::Model,
    request: Request,
    dim: usize,
) -> Result<Vec<f32>, ApiError> {
    let (_, output) = infer(state, model, InferenceTask::Embed, request).await?;
    let InferenceOutput::Embeddings(mut rows) = output else {
        return Err(anyhow::anyhow!(
            "the executor answered an embedding request with probabilities"
        )
        .into());
    };
    if rows.len() != 1 {
        return Err(ApiError::field(
            "image_id",
            format!(
                "search from one image: send it as the body (or one multipart file), or name \
                 one of the dataset's with image_id (the body held {})",
                rows.len()
            ),
        ));
    }
    let row = rows.remove(0);
    if row.len() != dim {
        return Err(anyhow::anyhow!(
            "the model embeds in {} dimensions, its stored embeddings have {dim}",
            row.len()
        )
        .into());
    }
    Ok(row)
}

/// The index of an embed job's embeddings, from memory or storage.
pub(super) async fn embedding_index(
    state: &AppState,
    embed_job_id: Uuid,
) -> Result<Arc<EmbeddingIndex>, ApiError> {
    if let Some(index) = state.embeddings.get(embed_job_id) {
        return Ok(index);
    }
    if !state
        .storage
        .fetch_job_output(embed_job_id, EMBEDDINGS_FILE)
        .await?
    {
        return Err(anyhow::anyhow!(
            "embed job {embed_job_id}'s embeddings are missing from storage"
        )
        .into());
    }
    let path = state
        .storage
        .job_outputs_dir(embed_job_id)
        .join(EMBEDDINGS_FILE);
    let index = tokio::task::spawn_blocking(move || {
        let bytes = std::fs::read(&path)?;
        EmbeddingIndex::from_npy(&bytes)
    })
    .await
    .map_err(|e| ApiError::Internal(anyhow::anyhow!("index loading thread failed: {e}")))?
    .map_err(ApiError::Internal)?;
    let index = Arc::new(index);
    state.embeddings.insert(embed_job_id, index.clone());
    Ok(index)
}

/// The neighbours with their archive paths and latest labels.
async fn describe_hits(
    state: &AppState,
    dataset: &Dataset,
    found: Vec<Neighbour>,
) -> Result<Vec<Hit>, ApiError> {
    let manifest = read_manifest(state, dataset.id).await?;
    let labels = labels_at(state, dataset, &manifest, dataset.label_version).await?;
    Ok(found
        .into_iter()
        .filter_map(|n| {
            let entry = manifest.entries.get(n.image)?;
            Some(Hit {
                image_id: n.image,
                path: entry.source.clone(),
                label: labels.class_of(n.image).map(str::to_string),
                score: n.score,
            })
        })
        .collect())
}
