//! A dataset's images one by one: `GET /v1/datasets/{id}/images` (a page of
//! them, in archive order, with each one's archive path and label where
//! known) and `GET /v1/datasets/{id}/images/{image_id}` (one image's stored
//! bytes, or a PNG thumbnail with `?size=`). An image's id is its index in
//! archive order, which never changes: a stored dataset is immutable.

use std::path::PathBuf;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::datasets::{list_limit, read_manifest, tenant_dataset};
use super::error::ApiError;
use super::extract::{ApiPath, ApiQuery};
use super::labels::labels_at;
use super::AppState;
use crate::auth::Tenant;

/// Query of `GET /v1/datasets/{id}/images`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageListParams {
    pub offset: Option<i64>,
    pub limit: Option<i64>,
}

/// One image of a dataset as listed.
#[derive(Debug, Serialize)]
pub struct ImageSummary {
    /// Index in archive order.
    pub id: usize,
    /// The image's path inside the uploaded archive.
    pub path: String,
    /// Its class name, when labelled.
    pub label: Option<String>,
}

/// A page of a dataset's images.
#[derive(Debug, Serialize)]
pub struct ImagePage {
    pub images: Vec<ImageSummary>,
    /// Images in the dataset.
    pub total: usize,
    pub offset: usize,
    /// The `offset` of the next page; absent on the last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<usize>,
}

/// Query of `GET /v1/datasets/{id}/images/{image_id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageParams {
    /// Longest side of a PNG thumbnail; without it, the stored bytes.
    pub size: Option<u32>,
}

/// Bounds of a thumbnail's longest side.
const THUMBNAIL_SIDES: std::ops::RangeInclusive<u32> = 8..=512;

/// `GET /v1/datasets/{id}/images`
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(params): ApiQuery<ImageListParams>,
) -> Result<Json<ImagePage>, ApiError> {
    let limit = list_limit(params.limit)? as usize;
    let offset = match params.offset.unwrap_or(0) {
        o if o >= 0 => o as usize,
        other => {
            return Err(ApiError::field(
                "offset",
                format!("must be 0 or more (got {other})"),
            ))
        }
    };
    let dataset = tenant_dataset(&state, &tenant, id).await?;
    let manifest = read_manifest(&state, id).await?;
    let labels = labels_at(&state, &dataset, &manifest, dataset.label_version).await?;
    let total = manifest.entries.len();
    let images = manifest
        .entries
        .iter()
        .enumerate()
        .skip(offset)
        .take(limit)
        .map(|(n, entry)| ImageSummary {
            id: n,
            path: entry.source.clone(),
            label: labels.class_of(n).map(str::to_string),
        })
        .collect();
    Ok(Json(ImagePage {
        images,
        total,
        offset,
        next_offset: Some(offset + limit).filter(|next| *next < total),
    }))
}

/// `GET /v1/datasets/{id}/images/{image_id}`
pub async fn get(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath((id, image_id)): ApiPath<(Uuid, String)>,
    ApiQuery(params): ApiQuery<ImageParams>,
) -> Result<Response, ApiError> {
    if let Some(size) = params.size.filter(|size| !THUMBNAIL_SIDES.contains(size)) {
        return Err(ApiError::field(
            "size",
            format!(
                "must be between {} and {} pixels (got {size}); leave it out for the stored image",
                THUMBNAIL_SIDES.start(),
                THUMBNAIL_SIDES.end()
            ),
        ));
    }
    let dataset = tenant_dataset(&state, &tenant, id).await?;
    let count = dataset.num_images as usize;
    let n = image_id
        .parse::<usize>()
        .ok()
        .filter(|n| *n < count)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "dataset {id} has no image `{image_id}`; its images are numbered 0 to {}",
                count.saturating_sub(1)
            ))
        })?;
    let path = stored_image_path(&state, id, n).await?;
    match params.size {
        None => stored_image_response(&path).await,
        Some(size) => thumbnail_response(path, size).await,
    }
}

/// Where the `n`-th image (archive order) of dataset `id` is stored.
pub async fn stored_image_path(state: &AppState, id: Uuid, n: usize) -> Result<PathBuf, ApiError> {
    let manifest = read_manifest(state, id).await?;
    let entry = manifest.entries.get(n).ok_or_else(|| {
        ApiError::Internal(anyhow::anyhow!(
            "the manifest of dataset {id} has {} entries, fewer than its {} images",
            manifest.entries.len(),
            n + 1
        ))
    })?;
    Ok(state.storage.dataset_dir(id).join(&entry.file))
}

/// The bytes stored at `path`, with the image type its extension names.
pub async fn stored_image_response(path: &std::path::Path) -> Result<Response, ApiError> {
    let bytes = tokio::fs::read(path).await.map_err(|e| {
        ApiError::Internal(
            anyhow::Error::new(e).context(format!("Failed to read {}", path.display())),
        )
    })?;
    // Stored names carry the extension of the format detected at ingestion.
    let media_type = image::ImageFormat::from_path(path)
        .map(|format| format.to_mime_type())
        .unwrap_or("application/octet-stream");
    Ok(immutable_image(bytes, media_type))
}

/// The image at `path` scaled down (never up) to a longest side of at most
/// `size`, as PNG.
async fn thumbnail_response(path: PathBuf, size: u32) -> Result<Response, ApiError> {
    let png = tokio::task::spawn_blocking(move || {
        let image = image::open(&path)
            .map_err(|e| anyhow::anyhow!("Failed to decode {}: {e}", path.display()))?;
        let image = if image.width().max(image.height()) > size {
            image.thumbnail(size, size)
        } else {
            image
        };
        let mut png = std::io::Cursor::new(Vec::new());
        image.write_to(&mut png, image::ImageFormat::Png)?;
        Ok::<_, anyhow::Error>(png.into_inner())
    })
    .await
    .map_err(|e| ApiError::Internal(anyhow::anyhow!("thumbnail thread failed: {e}")))?
    .map_err(ApiError::Internal)?;
    Ok(immutable_image(png, "image/png"))
}

/// An image body that a client may cache: a dataset's images never change
/// under its id.
fn immutable_image(bytes: Vec<u8>, media_type: &'static str) -> Response {
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(media_type));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=86400, immutable"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}
