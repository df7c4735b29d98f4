//! `/v1/models`: reading, listing and deleting models, downloading weights,
//! and inference (`/embed`, `/classify`). Images are decoded on the blocking
//! pool; LibTorch runs on the inference executor's thread.

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::datasets::list_limit;
use super::error::ApiError;
use super::extract::{read_images, ApiPath, ApiQuery};
use super::AppState;
use crate::auth::Tenant;
use crate::data::decode::{decode_image, to_chw_u8};
use crate::db::datasets::DeleteOutcome;
use crate::db::models::{delete_model, get_model, list_models, Model};
use crate::ml::description::{stored_description, ModelDescription};
use crate::ml::inference::{InferenceError, InferenceOutput, InferenceTask, ModelHandle};
use crate::ml::training::InputSpec;

/// Query of `GET /v1/models`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelListParams {
    pub kind: Option<String>,
    pub limit: Option<i64>,
}

pub(super) async fn find_model(
    state: &AppState,
    tenant: &Tenant,
    id: Uuid,
) -> Result<Model, ApiError> {
    get_model(&state.pool, tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no model with id {id}")))
}

/// `GET /v1/models`
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiQuery(params): ApiQuery<ModelListParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if let Some(k) = params
        .kind
        .as_deref()
        .filter(|k| !["encoder", "classifier"].contains(k))
    {
        return Err(ApiError::field(
            "kind",
            format!("unknown kind `{k}`; use encoder or classifier"),
        ));
    }
    let models = list_models(
        &state.pool,
        tenant.id,
        params.kind.as_deref(),
        list_limit(params.limit)?,
    )
    .await?;
    Ok(Json(serde_json::json!({ "models": models })))
}

/// The model's `model.json`, or for a model stored before descriptions
/// were written, its description from the database row.
async fn describe(state: &AppState, model: &Model) -> Result<ModelDescription, ApiError> {
    Ok(stored_description(&state.storage, model.id, model.record()).await?)
}

/// `GET /v1/models/{id}`: the model's row and its description.
pub async fn get(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let model = find_model(&state, &tenant, id).await?;
    let description = describe(&state, &model).await?;
    let mut body = serde_json::to_value(&model).context("Failed to serialise the model")?;
    if let Some(fields) = body.as_object_mut() {
        let description =
            serde_json::to_value(&description).context("Failed to serialise the description")?;
        fields.insert("description".to_string(), description);
    }
    Ok(Json(body))
}

/// `GET /v1/models/{id}/model.json`: the description, to keep beside the
/// downloaded weights.
pub async fn description(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Response, ApiError> {
    let model = find_model(&state, &tenant, id).await?;
    let description = describe(&state, &model).await?;
    let mut response = Json(description).into_response();
    if let Ok(value) = format!("attachment; filename=\"{}.json\"", model.id).parse() {
        response
            .headers_mut()
            .insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}

/// `DELETE /v1/models/{id}`
pub async fn delete(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    match delete_model(&state.pool, tenant.id, id).await? {
        DeleteOutcome::Deleted => {
            state.inference.evict(id);
            state.storage.remove_model(id).await?;
            Ok(StatusCode::NO_CONTENT)
        }
        DeleteOutcome::NotFound => Err(ApiError::NotFound(format!("no model with id {id}"))),
        DeleteOutcome::InUse => Err(ApiError::Conflict(format!(
            "model {id} is the base of a queued or running job; cancel the job or wait for it to finish"
        ))),
    }
}

/// `GET /v1/models/{id}/weights`
pub async fn weights(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Response, ApiError> {
    let model = find_model(&state, &tenant, id).await?;
    state.storage.fetch_model(model.id).await?;
    let path = state.storage.model_weights(model.id);
    let file = tokio::fs::File::open(&path).await.map_err(|e| {
        ApiError::Internal(
            anyhow::Error::new(e).context(format!("Failed to open {}", path.display())),
        )
    })?;
    let length = file.metadata().await.map(|m| m.len()).ok();
    let mut response = Body::from_stream(tokio_util::io::ReaderStream::new(file)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        "application/octet-stream".parse().expect("static header"),
    );
    if let Ok(value) = format!("attachment; filename=\"{}.safetensors\"", model.id).parse() {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    if let Some(length) = length {
        headers.insert(header::CONTENT_LENGTH, length.into());
    }
    Ok(response)
}

/// Decodes request images to the model's input layout, in parallel.
async fn prepare_images(
    state: &AppState,
    input: &InputSpec,
    request: Request,
) -> Result<Vec<Vec<u8>>, ApiError> {
    let parts = read_images(
        request,
        state.config.max_inference_images,
        state.config.max_inference_bytes,
    )
    .await?;
    let size = input.image_size;
    let channels = input.channels;
    let max_pixels = state.config.worker.max_image_pixels;
    tokio::task::spawn_blocking(move || {
        parts
            .par_iter()
            .enumerate()
            .map(|(i, part)| {
                decode_image(&part.bytes, max_pixels)
                    .map(|image| to_chw_u8(&image, size, channels))
                    .map_err(|reason| {
                        ApiError::Unprocessable {
                            detail: format!("image {i} (`{}`) could not be used: {reason}; send a PNG, JPEG, GIF, BMP, WebP or TIFF image", part.name),
                            errors: Vec::new(),
                        }
                    })
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| ApiError::Internal(anyhow::anyhow!("decoding thread failed: {e}")))?
}

/// Runs `task` on the request's images; returns the model's description
/// (which the network was built from) with the outputs.
pub(super) async fn infer(
    state: &AppState,
    model: &Model,
    task: InferenceTask,
    request: Request,
) -> Result<(ModelDescription, InferenceOutput), ApiError> {
    let arrival = match state.inference.announce() {
        Ok(arrival) => arrival,
        Err(error) => {
            discard_body(request, state.config.max_inference_bytes).await;
            return Err(inference_error(error));
        }
    };
    let description = describe(state, model).await?;
    let images = prepare_images(state, &description.input, request).await?;
    let handle = ModelHandle::of(&description, state.storage.model_weights(model.id))?;
    let output = state
        .inference
        .run(handle, task, images, arrival)
        .await
        .map_err(inference_error)?;
    Ok((description, output))
}

/// Reads a refused request's body to its end (at most `limit` bytes), one
/// chunk at a time, keeping none of it: a server that answers before the
/// body is read and closes the connection resets it under the client's
/// unfinished write, and the client never sees the answer.
async fn discard_body(request: Request, limit: usize) {
    use futures_util::StreamExt;
    let mut chunks = request.into_body().into_data_stream();
    let mut read = 0;
    while let Some(Ok(chunk)) = chunks.next().await {
        read += chunk.len();
        if read > limit {
            break;
        }
    }
}

fn inference_error(error: InferenceError) -> ApiError {
    match error {
        InferenceError::Busy => ApiError::Unavailable {
            detail: "the inference queue is full; retry shortly".to_string(),
            retry_after: 1,
        },
        InferenceError::Stopped => ApiError::Unavailable {
            detail: "the inference executor is shutting down".to_string(),
            retry_after: 5,
        },
        InferenceError::Failed(e) => ApiError::Internal(e),
    }
}

/// `POST /v1/models/{id}/embed`
pub async fn embed(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(id): ApiPath<Uuid>,
    request: Request,
) -> Result<Json<serde_json::Value>, ApiError> {
    let model = find_model(&state, &tenant, id).await?;
    let (description, InferenceOutput::Embeddings(embeddings)) =
        infer(&state, &model, InferenceTask::Embed, request).await?
    else {
        return Err(anyhow::anyhow!(
            "the executor answered an embedding request with probabilities"
        )
        .into());
    };
    Ok(Json(serde_json::json!({
        "model_id": model.id,
        "dim": description.embedding_dim,
        "embeddings": embeddings,
    })))
}

/// Query of `/classify`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyParams {
    pub top_k: Option<i64>,
}

/// One label and its probability.
#[derive(Debug, Serialize)]
pub struct Prediction<'a> {
    pub label: &'a str,
    pub score: f32,
}

/// `POST /v1/models/{id}/classify?top_k=5`
pub async fn classify(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(params): ApiQuery<ClassifyParams>,
    request: Request,
) -> Result<Json<serde_json::Value>, ApiError> {
    let top_k = ApiError::check_range("top_k", params.top_k, 5, 1, 1000)? as usize;
    let model = find_model(&state, &tenant, id).await?;
    if model.kind != "classifier" {
        return Err(ApiError::Conflict(format!(
            "model {id} is an encoder and has no classes; fine-tune it on a labelled dataset (POST /v1/jobs with kind finetune) and classify with the resulting model, or use /embed"
        )));
    }
    let (description, InferenceOutput::Probabilities(rows)) =
        infer(&state, &model, InferenceTask::Classify, request).await?
    else {
        return Err(anyhow::anyhow!(
            "the executor answered a classification request with embeddings"
        )
        .into());
    };
    let classes = &description.classes;
    let predictions: Vec<Vec<Prediction>> = rows
        .iter()
        .map(|probabilities| {
            let mut ranked: Vec<(usize, f32)> = probabilities.iter().copied().enumerate().collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
            ranked
                .into_iter()
                .take(top_k)
                .map(|(i, score)| Prediction {
                    label: classes.get(i).map_or("?", String::as_str),
                    score,
                })
                .collect()
        })
        .collect();
    Ok(Json(
        serde_json::json!({ "model_id": model.id, "predictions": predictions }),
    ))
}
