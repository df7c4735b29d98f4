//! `POST /v1/datasets/{id}/selections`: which images of a dataset to label
//! next, chosen by a strategy over the embeddings of its latest embed job
//! with a model (and, for the uncertainty strategies, that classifier's
//! probabilities), leaving out the images its latest labels already cover;
//! stored, and read back with `GET /v1/datasets/{id}/selections/{selection_id}`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::datasets::{read_manifest, tenant_dataset};
use super::error::ApiError;
use super::extract::{ApiJson, ApiPath};
use super::labels::labels_at;
use super::models::find_model;
use super::search::{embedded_by, embedding_index};
use super::AppState;
use crate::auth::Tenant;
use crate::data::npy::read_f32_matrix;
use crate::data::selection::{select, SelectionInput, Strategy};
use crate::db::selections::{get_selection, insert_selection, NewSelection, Selection};
use crate::ml::dataset_inference::PROBABILITIES_FILE;

/// Most images one selection chooses.
pub const MAX_BUDGET: i64 = 1000;

/// The strategy of a selection that names none: the best measured at 100
/// labels on Fashion-MNIST (bench/results/selection_cpu.md).
pub const DEFAULT_STRATEGY: &str = "representative";

/// Body of `POST /v1/datasets/{id}/selections`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectionRequest {
    /// Images to choose.
    pub budget: i64,
    /// The model whose embeddings (and, for uncertainty, probabilities) to use.
    pub model_id: Uuid,
    pub strategy: Option<String>,
    pub seed: Option<i64>,
}

/// A selection as returned: the stored row and where each image is.
#[derive(Debug, Serialize)]
pub struct SelectionBody {
    #[serde(flatten)]
    pub selection: Selection,
    pub images: Vec<SelectedImage>,
}

/// One chosen image.
#[derive(Debug, Serialize)]
pub struct SelectedImage {
    pub image_id: i64,
    /// Its path inside the uploaded archive.
    pub path: String,
}

async fn with_paths(state: &AppState, selection: Selection) -> Result<SelectionBody, ApiError> {
    let manifest = read_manifest(state, selection.dataset_id).await?;
    let images = selection
        .image_ids
        .iter()
        .map(|&id| SelectedImage {
            image_id: id,
            path: manifest
                .entries
                .get(id as usize)
                .map_or_else(String::new, |e| e.source.clone()),
        })
        .collect();
    Ok(SelectionBody { selection, images })
}

/// `POST /v1/datasets/{id}/selections`
pub async fn create(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(request): ApiJson<SelectionRequest>,
) -> Result<(StatusCode, Json<SelectionBody>), ApiError> {
    ApiError::check_range("budget", Some(request.budget), 0, 1, MAX_BUDGET)?;
    let strategy_name = request.strategy.as_deref().unwrap_or(DEFAULT_STRATEGY);
    let strategy = Strategy::from_name(strategy_name).ok_or_else(|| {
        ApiError::field(
            "strategy",
            format!(
                "unknown strategy `{strategy_name}`; use one of {}",
                Strategy::ALL.join(", ")
            ),
        )
    })?;
    let seed = match request.seed.unwrap_or(0) {
        seed if seed >= 0 => seed,
        other => {
            return Err(ApiError::field(
                "seed",
                format!("must be 0 or more (got {other})"),
            ))
        }
    };
    let dataset = tenant_dataset(&state, &tenant, id).await?;
    let model = find_model(&state, &tenant, request.model_id).await?;
    if strategy.needs_probabilities() && model.kind != "classifier" {
        return Err(ApiError::field(
            "model_id",
            format!(
                "strategy {strategy_name} ranks images by a classifier's uncertainty, and model {} \
                 is an encoder; name a classifier, or use diversity or representative",
                model.id
            ),
        ));
    }
    let embed_job_id = embedded_by(&state, &tenant, id, model.id, "select").await?;
    let index = embedding_index(&state, embed_job_id).await?;
    let probabilities = if strategy.needs_probabilities() {
        Some(read_probabilities(&state, embed_job_id).await?)
    } else {
        None
    };
    let manifest = read_manifest(&state, id).await?;
    let labels = labels_at(&state, &dataset, &manifest, dataset.label_version).await?;
    let labelled: Vec<bool> = labels.labels.iter().map(Option::is_some).collect();
    if labelled.len() != index.len() {
        return Err(ApiError::Internal(anyhow::anyhow!(
            "embed job {embed_job_id} has {} rows for {} images",
            index.len(),
            labelled.len()
        )));
    }
    let budget = request.budget as usize;
    let chosen = tokio::task::spawn_blocking(move || {
        let input = SelectionInput {
            embeddings: index.rows(),
            dim: index.dim(),
            probabilities: probabilities
                .as_ref()
                .map(|p| (p.values.as_slice(), p.classes)),
            labelled: &labelled,
        };
        select(&input, strategy, budget, seed as u64)
    })
    .await
    .map_err(|e| ApiError::Internal(anyhow::anyhow!("selection thread failed: {e}")))?;
    if chosen.is_empty() {
        return Err(ApiError::Conflict(format!(
            "every image of dataset {id} is labelled already; nothing is left to choose"
        )));
    }
    let image_ids: Vec<i64> = chosen.iter().map(|&i| i as i64).collect();
    let selection = insert_selection(
        &state.pool,
        NewSelection {
            tenant_id: tenant.id,
            dataset_id: id,
            model_id: model.id,
            embed_job_id,
            strategy: strategy_name,
            budget: request.budget as i32,
            seed,
            label_version: dataset.label_version,
            image_ids: &image_ids,
        },
    )
    .await?;
    tracing::info!(dataset_id = %id, selection_id = %selection.id, strategy = strategy_name, chosen = image_ids.len(), "images selected");
    Ok((
        StatusCode::CREATED,
        Json(with_paths(&state, selection).await?),
    ))
}

/// A classifier's class probabilities for every image of a dataset, as an
/// embed job wrote them: one row of `classes` values per image.
pub struct ClassProbabilities {
    pub values: Vec<f32>,
    pub classes: usize,
}

/// The probabilities an embed job wrote, read once and then cached.
pub(super) async fn read_probabilities(
    state: &AppState,
    embed_job_id: Uuid,
) -> Result<Arc<ClassProbabilities>, ApiError> {
    if let Some(cached) = state.probabilities.get(&embed_job_id) {
        return Ok(cached);
    }
    if !state
        .storage
        .fetch_job_output(embed_job_id, PROBABILITIES_FILE)
        .await?
    {
        return Err(ApiError::Conflict(format!(
            "embed job {embed_job_id} wrote no class probabilities; run a new embed job with \
             the classifier"
        )));
    }
    let path = state
        .storage
        .job_outputs_dir(embed_job_id)
        .join(PROBABILITIES_FILE);
    let (_, classes, values) = tokio::task::spawn_blocking(move || {
        let bytes = std::fs::read(&path)?;
        read_f32_matrix(&bytes)
    })
    .await
    .map_err(|e| ApiError::Internal(anyhow::anyhow!("probabilities thread failed: {e}")))?
    .map_err(ApiError::Internal)?;
    let probabilities = Arc::new(ClassProbabilities { values, classes });
    state
        .probabilities
        .insert(embed_job_id, probabilities.clone());
    Ok(probabilities)
}

/// `GET /v1/datasets/{id}/selections/{selection_id}`
pub async fn get(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath((id, selection_id)): ApiPath<(Uuid, Uuid)>,
) -> Result<Json<SelectionBody>, ApiError> {
    let selection = get_selection(&state.pool, tenant.id, id, selection_id)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!("dataset {id} has no selection {selection_id}"))
        })?;
    Ok(Json(with_paths(&state, selection).await?))
}
