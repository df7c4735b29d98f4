//! `PUT /v1/datasets/{id}/labels`: a label file (CSV or JSON Lines) applied
//! to a dataset's current labels as their next version, whole or not at all;
//! and `GET /v1/datasets/{id}/labels`: the current labels' summary and every
//! version. Fine-tuning and evaluation use a dataset's latest labels unless
//! their `config.label_version` names another.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::Json;
use serde::Serialize;
use uuid::Uuid;

use super::datasets::{read_manifest, tenant_dataset};
use super::error::ApiError;
use super::extract::{media_type, ApiPath};
use super::AppState;
use crate::auth::Tenant;
use crate::data::labels::{parse_label_file, ImageLookup, LabelFileFormat, LabelSet};
use crate::data::manifest::Manifest;
use crate::db::datasets::Dataset;
use crate::db::label_sets::{
    get_label_set, insert_label_version, list_label_versions, LabelVersion, NewVersionError,
};
use crate::validation::FieldError;

/// Largest label file accepted.
pub const MAX_LABEL_FILE_BYTES: usize = 16 * 1024 * 1024;

/// Offending rows listed in a refusal.
const ROW_ERRORS_SHOWN: usize = 20;

/// A dataset's labels as the API describes them.
#[derive(Debug, Serialize)]
pub struct LabelSummary {
    pub dataset_id: Uuid,
    /// 0: the archive's class folders; then one more per label file.
    pub version: i32,
    pub labelled: usize,
    pub classes: Vec<String>,
    pub class_counts: std::collections::BTreeMap<String, usize>,
    /// Images whose label the file just applied set or changed (PUT only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed: Option<usize>,
    /// Every version sent after the upload (GET only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub versions: Option<Vec<LabelVersion>>,
}

/// The labels of `version` of `dataset`: from its manifest for version 0.
pub async fn labels_at(
    state: &AppState,
    dataset: &Dataset,
    manifest: &Manifest,
    version: i32,
) -> Result<Arc<LabelSet>, ApiError> {
    let key = (dataset.id, version);
    if let Some(labels) = state.label_sets.get(&key) {
        return Ok(labels);
    }
    let labels = if version == 0 {
        LabelSet::from_manifest(manifest)
    } else {
        get_label_set(&state.pool, dataset.id, version)
            .await?
            .ok_or_else(|| {
                ApiError::Internal(anyhow::anyhow!(
                    "dataset {} has no label version {version}",
                    dataset.id
                ))
            })?
    };
    // A label-set version is never changed once written.
    let labels = Arc::new(labels);
    state.label_sets.insert(key, labels.clone());
    Ok(labels)
}

fn label_file_format(request: &Request) -> Result<LabelFileFormat, ApiError> {
    match media_type(request).as_deref() {
        Some("text/csv") => Ok(LabelFileFormat::Csv),
        Some("application/jsonl" | "application/x-ndjson" | "application/json-lines") => {
            Ok(LabelFileFormat::JsonLines)
        }
        other => Err(ApiError::UnsupportedMediaType(format!(
            "send the label file as `text/csv` (a header naming `image_id` or `path`, and \
             `label`) or as `application/jsonl` (one {{\"image_id\" or \"path\", \"label\"}} \
             object per line), not {}",
            other.map_or("a body without Content-Type".to_string(), |m| format!(
                "`{m}`"
            ))
        ))),
    }
}

/// `PUT /v1/datasets/{id}/labels`
pub async fn put(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(id): ApiPath<Uuid>,
    request: Request,
) -> Result<Json<LabelSummary>, ApiError> {
    let format = label_file_format(&request)?;
    let dataset = tenant_dataset(&state, &tenant, id).await?;
    let bytes = axum::body::to_bytes(request.into_body(), MAX_LABEL_FILE_BYTES)
        .await
        .map_err(|e| {
            ApiError::PayloadTooLarge(format!(
                "the label file is larger than {} MiB ({e}); send it in parts, one request each",
                MAX_LABEL_FILE_BYTES >> 20
            ))
        })?;
    let manifest = read_manifest(&state, id).await?;
    let (changes, manifest) = tokio::task::spawn_blocking(move || {
        let changes = parse_label_file(&bytes, format, &ImageLookup::of(&manifest));
        (changes, manifest)
    })
    .await
    .map_err(|e| ApiError::Internal(anyhow::anyhow!("label parsing thread failed: {e}")))?;
    let changes = changes.map_err(|errors| {
        let shown: Vec<FieldError> = errors
            .iter()
            .take(ROW_ERRORS_SHOWN)
            .map(|e| FieldError {
                field: format!("line {}", e.line),
                message: e.message.clone(),
            })
            .collect();
        let first = &shown[0];
        ApiError::Unprocessable {
            detail: format!(
                "{} row(s) of the label file cannot be applied, so none was (the first {} are \
                 in `errors`; first: {}: {}); correct them and send the whole file again",
                errors.len(),
                shown.len(),
                first.field,
                first.message
            ),
            errors: shown,
        }
    })?;
    let current = labels_at(&state, &dataset, &manifest, dataset.label_version).await?;
    let (next, changed) = current.with_changes(&changes);
    let version = insert_label_version(
        &state.pool,
        tenant.id,
        id,
        dataset.label_version,
        &next,
        changed,
    )
    .await
    .map_err(|e| match e {
        NewVersionError::DatasetNotFound => ApiError::NotFound(format!("no dataset with id {id}")),
        NewVersionError::Moved(now) => ApiError::Conflict(format!(
            "another label file was applied to dataset {id} meanwhile (its labels are now \
             version {now}); send yours again to apply it on top"
        )),
        NewVersionError::Database(e) => e.into(),
    })?;
    tracing::info!(dataset_id = %id, version, changed, "labels applied");
    Ok(Json(LabelSummary {
        dataset_id: id,
        version,
        labelled: next.labelled(),
        classes: next.classes.clone(),
        class_counts: next.class_counts(),
        changed: Some(changed),
        versions: None,
    }))
}

/// `GET /v1/datasets/{id}/labels`
pub async fn get(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<LabelSummary>, ApiError> {
    let dataset = tenant_dataset(&state, &tenant, id).await?;
    let manifest = read_manifest(&state, id).await?;
    let labels = labels_at(&state, &dataset, &manifest, dataset.label_version).await?;
    Ok(Json(LabelSummary {
        dataset_id: id,
        version: dataset.label_version,
        labelled: labels.labelled(),
        classes: labels.classes.clone(),
        class_counts: labels.class_counts(),
        changed: None,
        versions: Some(list_label_versions(&state.pool, id).await?),
    }))
}
