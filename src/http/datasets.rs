//! `/v1/datasets`: archive uploads streamed to disk, then ingested on a
//! blocking thread; listing, reading and deleting datasets.

use std::sync::Arc;

use anyhow::Context;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use super::error::ApiError;
use super::extract::{media_type, ApiPath, ApiQuery};
use super::quotas::{check_stored_dataset, check_upload};
use super::AppState;
use crate::auth::Tenant;
use crate::data::archive::{detect_kind, ingest_archive, ArchiveLimits, IngestError};
use crate::data::manifest::Manifest;
use crate::db::datasets::{
    delete_dataset, get_dataset, insert_dataset, list_datasets, Dataset, DeleteOutcome,
};

/// Query of `POST /v1/datasets`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadParams {
    pub name: Option<String>,
}

/// Query of list endpoints.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    pub limit: Option<i64>,
}

/// Validates a list `limit` (default 100).
pub fn list_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    ApiError::check_range("limit", limit, 100, 1, 1000)
}

const ARCHIVE_TYPES: [&str; 8] = [
    "application/zip",
    "application/x-zip-compressed",
    "application/x-tar",
    "application/gzip",
    "application/x-gzip",
    "application/x-gtar",
    "application/x-compressed-tar",
    "application/octet-stream",
];

/// Streams `body` into `path`, refusing more than `limit` bytes.
async fn stream_to_file<S, E>(
    mut body: S,
    path: &std::path::Path,
    limit: u64,
) -> Result<u64, ApiError>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut file = tokio::fs::File::create(path).await.map_err(|e| {
        ApiError::Internal(anyhow::Error::new(e).context("Failed to create the upload file"))
    })?;
    let mut written = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::BadRequest(format!("the upload was interrupted: {e}")))?;
        written += chunk.len() as u64;
        if written > limit {
            return Err(ApiError::PayloadTooLarge(format!(
                "the upload is larger than {limit} bytes; upload a smaller archive or raise PRETEXT_MAX_UPLOAD_BYTES"
            )));
        }
        file.write_all(&chunk).await.map_err(|e| {
            ApiError::Internal(anyhow::Error::new(e).context("Failed to write the upload"))
        })?;
    }
    file.flush().await.map_err(|e| {
        ApiError::Internal(anyhow::Error::new(e).context("Failed to write the upload"))
    })?;
    Ok(written)
}

/// Receives the archive of a request into `path`; returns the uploaded file's name if known.
async fn receive_archive(
    request: Request,
    path: &std::path::Path,
    limit: u64,
) -> Result<(u64, Option<String>), ApiError> {
    match media_type(&request).as_deref() {
        Some("multipart/form-data") => {
            let mut multipart = Multipart::from_request(request, &())
                .await
                .map_err(|e| ApiError::BadRequest(format!("unreadable multipart body: {}", e.body_text())))?;
            let field = multipart
                .next_field()
                .await
                .map_err(|e| ApiError::BadRequest(format!("unreadable multipart body: {}", e.body_text())))?
                .ok_or_else(|| ApiError::BadRequest("the multipart body has no file part; attach the archive".into()))?;
            let file_name = field.file_name().map(str::to_string);
            let written = stream_to_file(Box::pin(field), path, limit).await?;
            Ok((written, file_name))
        }
        Some(m) if ARCHIVE_TYPES.contains(&m) => {
            let written = stream_to_file(Box::pin(request.into_body().into_data_stream()), path, limit).await?;
            Ok((written, None))
        }
        other => Err(ApiError::UnsupportedMediaType(format!(
            "send a .zip, .tar or .tar.gz archive as application/zip, application/x-tar or application/gzip, \
             or as a file part of multipart/form-data, not `{}`",
            other.unwrap_or("no content type")
        ))),
    }
}

fn dataset_name(requested: Option<String>, file_name: Option<String>) -> Result<String, ApiError> {
    let name = requested
        .or_else(|| {
            file_name.map(|f| {
                let f = f.rsplit(['/', '\\']).next().unwrap_or(&f).to_string();
                ["tar.gz", "tgz", "zip", "tar"]
                    .iter()
                    .find_map(|ext| f.strip_suffix(&format!(".{ext}")).map(str::to_string))
                    .unwrap_or(f)
            })
        })
        .unwrap_or_else(|| "dataset".to_string());
    let name = name.trim().to_string();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::field("name", "must be 1 to 200 characters"));
    }
    Ok(name)
}

impl From<IngestError> for ApiError {
    fn from(error: IngestError) -> Self {
        match error {
            IngestError::NotAnArchive(m) => ApiError::UnsupportedMediaType(m),
            IngestError::TooLarge(m) => ApiError::PayloadTooLarge(m),
            IngestError::NoImages(m) | IngestError::Corrupt(m) => ApiError::Unprocessable {
                detail: m,
                errors: Vec::new(),
            },
            IngestError::Io(e) => ApiError::Internal(e),
        }
    }
}

/// `POST /v1/datasets?name=`
pub async fn upload(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiQuery(params): ApiQuery<UploadParams>,
    request: Request,
) -> Response {
    match store_upload(&state, &tenant, params, request).await {
        Ok(dataset) => {
            let mut headers = HeaderMap::new();
            if let Ok(location) = HeaderValue::from_str(&format!("/v1/datasets/{}", dataset.id)) {
                headers.insert(header::LOCATION, location);
            }
            (StatusCode::CREATED, headers, Json(dataset)).into_response()
        }
        // A refused upload may be answered before its body was read, and the
        // server then leaves the connection: `Connection: close` tells the
        // client not to send its next request on it.
        Err(error) => {
            let mut response = error.into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}

async fn store_upload(
    state: &AppState,
    tenant: &Tenant,
    params: UploadParams,
    request: Request,
) -> Result<Dataset, ApiError> {
    let declared_length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    check_upload(state, tenant, declared_length).await?;
    // Removed below once answered, or in the background when this future is
    // dropped first (past the deadline, or the client went away).
    let upload = state.storage.new_upload();
    let result = ingest_upload(state, tenant, params, request, upload.path()).await;
    upload.remove().await;
    result
}

async fn ingest_upload(
    state: &AppState,
    tenant: &Tenant,
    params: UploadParams,
    request: Request,
    upload_path: &std::path::Path,
) -> Result<Dataset, ApiError> {
    let (written, file_name) =
        receive_archive(request, upload_path, state.config.max_upload_bytes).await?;
    if written == 0 {
        return Err(ApiError::BadRequest(
            "the request body is empty; send a .zip, .tar or .tar.gz archive".into(),
        ));
    }
    let name = dataset_name(params.name, file_name)?;
    let kind = detect_kind(upload_path)
        .map_err(|e| {
            ApiError::Internal(anyhow::Error::new(e).context("Failed to read the upload"))
        })?
        .ok_or_else(|| {
            ApiError::UnsupportedMediaType(
                "the body is not a zip, tar or tar.gz archive; pack the images with zip or tar"
                    .into(),
            )
        })?;
    // Until its row is written the folder is a draft: discarded on an error,
    // and removed in the background if this future is dropped first.
    let draft = state.storage.draft_dataset();
    let id = draft.id();
    let limits = ArchiveLimits {
        max_entries: state.config.max_archive_entries,
        max_uncompressed_bytes: state.config.max_uncompressed_bytes,
        max_image_pixels: state.config.worker.max_image_pixels,
    };
    let archive = upload_path.to_path_buf();
    let (sender, receiver) = tokio::sync::oneshot::channel();
    tokio::task::spawn_blocking(move || {
        let report = ingest_archive(&archive, kind, &draft.dir(), limits);
        // When the request was abandoned meanwhile, nobody receives this and
        // the draft is dropped here, after the last write into its folder.
        let _ = sender.send((report, draft));
    });
    let (report, draft) = receiver
        .await
        .map_err(|_| ApiError::Internal(anyhow::anyhow!("the ingestion thread failed")))?;
    let stored = async {
        let report = report?;
        check_stored_dataset(state, tenant, report.bytes).await?;
        state
            .storage
            .publish_dataset(id)
            .await
            .context("Failed to share the dataset")?;
        Ok::<_, ApiError>(insert_dataset(&state.pool, tenant.id, id, &name, &report).await?)
    }
    .await;
    match stored {
        Ok(dataset) => {
            draft.keep();
            tracing::info!(dataset_id = %id, images = dataset.num_images, "dataset stored");
            Ok(dataset)
        }
        Err(error) => {
            draft.discard().await;
            Err(error)
        }
    }
}

/// `GET /v1/datasets`
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let datasets = list_datasets(&state.pool, tenant.id, list_limit(params.limit)?).await?;
    Ok(Json(serde_json::json!({ "datasets": datasets })))
}

/// `GET /v1/datasets/{id}`
pub async fn get(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Dataset>, ApiError> {
    get_dataset(&state.pool, tenant.id, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no dataset with id {id}")))
}

/// `DELETE /v1/datasets/{id}`
pub async fn delete(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    match delete_dataset(&state.pool, tenant.id, id).await? {
        DeleteOutcome::Deleted => {
            state.storage.remove_dataset(id).await?;
            Ok(StatusCode::NO_CONTENT)
        }
        DeleteOutcome::NotFound => Err(ApiError::NotFound(format!("no dataset with id {id}"))),
        DeleteOutcome::InUse => Err(ApiError::Conflict(format!(
            "dataset {id} is used by a queued or running job (as its dataset_id, config.eval_dataset_id \
             or config.test_dataset_id); cancel the job or wait for it to finish"
        ))),
    }
}

/// The dataset `id` of `tenant`, or a 404.
pub async fn tenant_dataset(
    state: &AppState,
    tenant: &Tenant,
    id: Uuid,
) -> Result<Dataset, ApiError> {
    get_dataset(&state.pool, tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no dataset with id {id}")))
}

/// The manifest of dataset `id`, fetched from shared storage when needed.
pub async fn read_manifest(state: &AppState, id: Uuid) -> Result<Arc<Manifest>, ApiError> {
    if let Some(manifest) = state.manifests.get(&id) {
        return Ok(manifest);
    }
    state.storage.fetch_dataset(id).await?;
    let dataset_dir = state.storage.dataset_dir(id);
    let manifest = tokio::task::spawn_blocking(move || Manifest::read(&dataset_dir))
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("manifest thread failed: {e}")))?
        .map_err(ApiError::Internal)?;
    // A stored dataset never changes, so neither does its manifest.
    let manifest = Arc::new(manifest);
    state.manifests.insert(id, manifest.clone());
    Ok(manifest)
}
