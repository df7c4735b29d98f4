//! `GET /v1/datasets/{id}/map`: a 2-D map of a dataset's images, the first
//! two principal components of a model's embeddings (those of the latest
//! embed job that succeeded for the dataset and model), with each image's
//! latest label and, when the model is a classifier, its prediction. The
//! projection is computed once per embed job and kept with the indexes;
//! large datasets are drawn from an even sample of their images.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::datasets::{read_manifest, tenant_dataset};
use super::error::ApiError;
use super::extract::{ApiPath, ApiQuery};
use super::labels::labels_at;
use super::models::find_model;
use super::search::{embedded_by, embedding_index};
use super::selections::read_probabilities;
use super::AppState;
use crate::auth::Tenant;
use crate::data::projection::{principal_components, Projection};

/// Points a map holds when the request names no `limit`.
const DEFAULT_POINTS: i64 = 5000;

/// Most points one map holds.
pub const MAX_POINTS: i64 = 20_000;

/// Query of `GET /v1/datasets/{id}/map`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapParams {
    /// The model whose embeddings to project.
    pub model_id: Uuid,
    /// Most points to return; a larger dataset is sampled evenly.
    pub limit: Option<i64>,
}

/// One image on the map.
#[derive(Debug, Serialize)]
pub struct MapPoint {
    pub image_id: usize,
    pub x: f32,
    pub y: f32,
    /// Its latest label, when it has one.
    pub label: Option<String>,
    /// The classifier's most likely class, when the model is a classifier.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction: Option<String>,
    /// That class's probability.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confidence: Option<f32>,
}

/// A dataset's map.
#[derive(Debug, Serialize)]
pub struct DatasetMap {
    pub dataset_id: Uuid,
    pub model_id: Uuid,
    /// The embed job whose embeddings were projected.
    pub embed_job_id: Uuid,
    /// How the embeddings were projected: `pca`.
    pub method: &'static str,
    /// The share of the embeddings' variance along `x` and along `y`.
    pub explained_variance_ratio: [f64; 2],
    /// The label-set version the labels come from.
    pub label_version: i32,
    /// Images in the dataset; `points` holds all of them or an even sample.
    pub total: usize,
    pub points: Vec<MapPoint>,
}

/// `GET /v1/datasets/{id}/map?model_id=…&limit=5000`
pub async fn map(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(params): ApiQuery<MapParams>,
) -> Result<Json<DatasetMap>, ApiError> {
    let limit =
        ApiError::check_range("limit", params.limit, DEFAULT_POINTS, 1, MAX_POINTS)? as usize;
    let dataset = tenant_dataset(&state, &tenant, id).await?;
    let model = find_model(&state, &tenant, params.model_id).await?;
    let embed_job_id = embedded_by(&state, &tenant, id, model.id, "map it").await?;
    let projection = projection(&state, embed_job_id).await?;
    let probabilities = if model.kind == "classifier" {
        Some(read_probabilities(&state, embed_job_id).await?)
    } else {
        None
    };
    let manifest = read_manifest(&state, id).await?;
    let labels = labels_at(&state, &dataset, &manifest, dataset.label_version).await?;

    let total = projection.coordinates.len();
    let points = evenly_spaced(total, limit)
        .map(|image| {
            let [x, y] = projection.coordinates[image];
            let predicted = probabilities.as_ref().and_then(|p| {
                let row = p.values.get(image * p.classes..(image + 1) * p.classes)?;
                let (class, &p) = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1))?;
                Some((model.classes.get(class)?.clone(), p))
            });
            let (prediction, confidence) = predicted.unzip();
            MapPoint {
                image_id: image,
                x,
                y,
                label: labels.class_of(image).map(str::to_string),
                prediction,
                confidence,
            }
        })
        .collect();
    Ok(Json(DatasetMap {
        dataset_id: id,
        model_id: model.id,
        embed_job_id,
        method: "pca",
        explained_variance_ratio: projection.explained_variance_ratio,
        label_version: dataset.label_version,
        total,
        points,
    }))
}

/// `limit` of `0..total` spread evenly (all of them when `total <= limit`).
fn evenly_spaced(total: usize, limit: usize) -> impl Iterator<Item = usize> {
    let shown = total.min(limit);
    (0..shown).map(move |j| j * total / shown)
}

/// The projection of an embed job's embeddings, from memory or computed.
async fn projection(state: &AppState, embed_job_id: Uuid) -> Result<Arc<Projection>, ApiError> {
    if let Some(projection) = state.projections.get(&embed_job_id) {
        return Ok(projection);
    }
    let index = embedding_index(state, embed_job_id).await?;
    let projection =
        tokio::task::spawn_blocking(move || principal_components(index.rows(), index.dim()))
            .await
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("projection thread failed: {e}")))?;
    let projection = Arc::new(projection);
    state.projections.insert(embed_job_id, projection.clone());
    Ok(projection)
}

#[cfg(test)]
mod tests {
    use super::evenly_spaced;

    #[test]
    fn a_sample_spreads_over_the_whole_dataset() {
        assert_eq!(
            evenly_spaced(5, 10).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4]
        );
        assert_eq!(evenly_spaced(10, 4).collect::<Vec<_>>(), vec![0, 2, 5, 7]);
        let sample: Vec<usize> = evenly_spaced(100_000, 5000).collect();
        assert_eq!(sample.len(), 5000);
        assert!(sample.windows(2).all(|w| w[1] - w[0] == 20));
        assert_eq!(evenly_spaced(0, 3).count(), 0);
    }
}
