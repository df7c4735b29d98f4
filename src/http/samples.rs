//! `GET /v1/datasets/{id}/samples/{n}`: the stored bytes of one of a dataset's
//! first images, so that a client (the dashboard) can show what a dataset
//! holds without downloading it.

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use uuid::Uuid;

use super::error::ApiError;
use super::extract::ApiPath;
use super::AppState;
use crate::auth::Tenant;
use crate::data::manifest::Manifest;
use crate::db::datasets::get_dataset;

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
    let dataset = get_dataset(&state.pool, tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no dataset with id {id}")))?;
    if n >= dataset.num_images as usize {
        return Err(ApiError::NotFound(format!(
            "dataset {id} has {} images; samples are numbered 0 to {}",
            dataset.num_images,
            dataset.num_images - 1
        )));
    }
    state.storage.fetch_dataset(id).await?;
    let dataset_dir = state.storage.dataset_dir(id);
    let path = tokio::task::spawn_blocking(move || {
        let manifest = Manifest::read(&dataset_dir)?;
        let entry = manifest.entries.get(n).ok_or_else(|| {
            anyhow::anyhow!(
                "the manifest of dataset {id} has {} entries, fewer than its {} images",
                manifest.entries.len(),
                n + 1
            )
        })?;
        Ok::<_, anyhow::Error>(dataset_dir.join(&entry.file))
    })
    .await
    .map_err(|e| ApiError::Internal(anyhow::anyhow!("manifest thread failed: {e}")))??;
    let bytes = tokio::fs::read(&path).await.map_err(|e| {
        ApiError::Internal(
            anyhow::Error::new(e).context(format!("Failed to read {}", path.display())),
        )
    })?;
    // Stored names carry the extension of the format detected at ingestion.
    let media_type = image::ImageFormat::from_path(&path)
        .map(|format| format.to_mime_type())
        .unwrap_or("application/octet-stream");
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(media_type));
    // A dataset's images never change under its id.
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=86400, immutable"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    Ok(response)
}
