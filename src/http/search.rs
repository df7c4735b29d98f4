//! `POST /v1/datasets/{id}/search`: the images of a dataset most similar to
//! a query image (one of the dataset's, by id, or one sent in the body), by
//! the cosine similarity of a model's embeddings. The dataset's embeddings
//! are those of the latest embed job that succeeded for this dataset and
//! model; once read they stay in memory (a few indexes, the least recently
//! used dropped first), so a query costs one pass over the matrix. A dataset
//! of `PRETEXT_ANN_MIN_IMAGES` or more also gets an HNSW graph, built in the
//! background once its embeddings are read; searches go through it once it
//! is there, and say which way they went.

use std::sync::Arc;

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
use crate::data::embeddings::EmbeddingIndex;
use crate::data::vectors::Neighbour;
use crate::db::datasets::Dataset;
use crate::db::jobs::latest_embed_job;
use crate::ml::dataset_inference::EMBEDDINGS_FILE;
use crate::ml::inference::{InferenceOutput, InferenceTask};

/// Most neighbours one search returns.
const MAX_K: i64 = 1000;

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
    /// `exact` (every image scored) or `approximate` (through the HNSW
    /// graph of a large dataset).
    pub method: &'static str,
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
    let k = ApiError::check_range("k", params.k, 10, 1, MAX_K)? as usize;
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
    let (found, method) = {
        let index = index.clone();
        tokio::task::spawn_blocking(move || index.search(&query, k, except))
            .await
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("search thread failed: {e}")))?
    };
    let results = describe_hits(&state, &dataset, found).await?;
    Ok(Json(SearchResult {
        dataset_id: id,
        model_id: model.id,
        embed_job_id,
        method: method.name(),
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
    if let Some(index) = state.embeddings.get(&embed_job_id) {
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
    if index.len() >= state.config.ann_min_images {
        let graph = index.clone();
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            // On threads of its own, so that searches on the shared pool
            // (exact ones meanwhile) do not queue behind the build.
            let threads = std::thread::available_parallelism()
                .map_or(1, |n| n.get().saturating_sub(1).max(1));
            match rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("ann-build-{i}"))
                .build()
            {
                Ok(pool) => pool.install(|| graph.build_approximate()),
                Err(e) => {
                    tracing::warn!(error = %e, "no thread pool for the search graph; building it on the shared one");
                    graph.build_approximate();
                }
            }
            tracing::info!(
                %embed_job_id,
                images = graph.len(),
                seconds = started.elapsed().as_secs_f64(),
                "approximate search graph built"
            );
        });
    }
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
