//! `GET /v1/datasets/{id}/samples/{n}`: the stored bytes of one of a dataset's
//! first images, so that a client (the dashboard) can show what a dataset
//! holds without downloading it.

use axum::extract::State;
use axum::response::Response;
use uuid::Uuid;

use super::datasets::tenant_dataset;
use super::error::ApiError;
use super::extract::ApiPath;
use super::images::{stored_image_path, stored_image_response};
use super::AppState;
use crate::auth::Tenant;

/// How many of a dataset's first images are served as samples.
pub const SAMPLE_COUNT: usize = 16;

/// `GET /v1/datasets/{id}/samples/{n}`: the `n`-th stored image (archive
/// order), `n < 16`, with its image content type.
pub async fn sample(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath((id, n)): ApiPath<(Uuid, String)>,
) -> Result<Response, ApiError> {
    let n = n
        .parse::<usize>()
        .ok()
        .filter(|n| *n < SAMPLE_COUNT)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no sample `{n}`; samples are numbered 0 to {}",
                SAMPLE_COUNT - 1
            ))
        })?;
    let dataset = tenant_dataset(&state, &tenant, id).await?;
    if n >= dataset.num_images as usize {
        return Err(ApiError::NotFound(format!(
            "dataset {id} has {} images; samples are numbered 0 to {}",
            dataset.num_images,
            dataset.num_images - 1
        )));
    }
    let path = stored_image_path(&state, id, n).await?;
    stored_image_response(&path).await
}
