//! `/v1/jobs`: submitting jobs of every kind (config validated and completed
//! with defaults up front), reading, listing, cancelling, metrics, reports,
//! and the files embed and predict jobs leave.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use uuid::Uuid;

use super::datasets::list_limit;
use super::error::ApiError;
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::quotas::check_job;
use super::AppState;
use crate::auth::Tenant;
use crate::db::datasets::{get_dataset, Dataset};
use crate::db::jobs::{
    cancel_job, get_job, insert_job, list_jobs, list_metrics, CreateJobError, Job, JobKind,
    JobState, NewJob,
};
use crate::db::models::{get_model, Model};
use crate::jobs::config::{
    DefaultsFrom, EmbedConfigRequest, EvaluateConfigRequest, FinetuneConfigRequest,
    PredictConfigRequest, PretrainConfigRequest,
};
use crate::jobs::spec::JobSpec;
use crate::ml::backbone::Backbone;
use crate::ml::classifier::Transfer;
use crate::ml::training::JobOutputs;
use crate::validation::parse_config_object;

/// Body of `POST /v1/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub kind: String,
    pub dataset_id: Uuid,
    pub base_model_id: Option<Uuid>,
    pub config: Option<serde_json::Value>,
    pub max_attempts: Option<i64>,
}

/// The kind named `name`, or the error naming `field`.
fn parse_kind(field: &str, name: &str) -> Result<JobKind, ApiError> {
    JobKind::from_name(name).ok_or_else(|| {
        let kinds: Vec<&str> = JobKind::ALL.iter().map(|k| k.name()).collect();
        ApiError::field(
            field,
            format!("unknown kind `{name}`; use one of {}", kinds.join(", ")),
        )
    })
}

/// The state named `name`, or the error naming `field`.
fn parse_state(field: &str, name: &str) -> Result<JobState, ApiError> {
    JobState::from_name(name).ok_or_else(|| {
        let states: Vec<&str> = JobState::ALL.iter().map(|s| s.name()).collect();
        ApiError::field(
            field,
            format!("unknown state `{name}`; use one of {}", states.join(", ")),
        )
    })
}

fn parse_config<T: serde::de::DeserializeOwned + Default>(
    config: Option<serde_json::Value>,
) -> Result<T, ApiError> {
    match config {
        None | Some(serde_json::Value::Null) => Ok(T::default()),
        Some(value @ serde_json::Value::Object(_)) => {
            parse_config_object(value).map_err(ApiError::fields)
        }
        Some(_) => Err(ApiError::field("config", "must be a JSON object")),
    }
}

/// A labelled dataset named in a config, or the error naming the field.
async fn labelled_dataset(
    state: &AppState,
    tenant: &Tenant,
    id: Uuid,
    field: &str,
) -> Result<Dataset, ApiError> {
    let dataset = get_dataset(&state.pool, tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no dataset with id {id} ({field})")))?;
    if !dataset.labeled {
        return Err(ApiError::field(
            field,
            "the dataset is unlabelled; evaluation needs one folder per class",
        ));
    }
    Ok(dataset)
}

/// The version of `dataset`'s labels a job uses: the one asked for, which
/// the dataset must have, else its latest.
fn chosen_label_version(requested: Option<i64>, dataset: &Dataset) -> Result<i64, ApiError> {
    let latest = i64::from(dataset.label_version);
    match requested {
        None => Ok(latest),
        Some(version) if version <= latest => Ok(version),
        Some(version) => Err(ApiError::field(
            "config.label_version",
            format!(
                "dataset {} has label versions 0 to {latest} (got {version}); omit it for the latest",
                dataset.id
            ),
        )),
    }
}

async fn pretrain_config(
    state: &AppState,
    tenant: &Tenant,
    dataset: &Dataset,
    base: Option<&Model>,
    config: Option<serde_json::Value>,
) -> Result<JobSpec, ApiError> {
    if base.is_some() {
        return Err(ApiError::field(
            "base_model_id",
            "pretraining starts from scratch; omit base_model_id (it is for finetune and evaluate jobs)",
        ));
    }
    let from = DefaultsFrom {
        median_side: dataset.median_side as u32,
        base: None,
    };
    let config = parse_config::<PretrainConfigRequest>(config)?
        .resolve(from)
        .map_err(ApiError::fields)?;
    if let Some(id) = config.eval_dataset_id {
        labelled_dataset(state, tenant, id, "config.eval_dataset_id").await?;
    }
    Ok(JobSpec::Pretrain(config))
}

async fn finetune_config(
    state: &AppState,
    tenant: &Tenant,
    dataset: &Dataset,
    base: Option<&Model>,
    config: Option<serde_json::Value>,
) -> Result<JobSpec, ApiError> {
    if !dataset.labeled {
        return Err(ApiError::field(
            "dataset_id",
            "the dataset is unlabelled; fine-tuning needs labels: upload an archive with one folder per class, or send labels with PUT /v1/datasets/{id}/labels",
        ));
    }
    let base_spec = match base {
        Some(model) => Some((model_backbone(model)?, model.input.0.image_size)),
        None => None,
    };
    let from = DefaultsFrom {
        median_side: dataset.median_side as u32,
        base: base_spec,
    };
    let mut config = parse_config::<FinetuneConfigRequest>(config)?
        .resolve(from)
        .map_err(ApiError::fields)?;
    match config.unlabelled_dataset_id {
        Some(id) => {
            get_dataset(&state.pool, tenant.id, id)
                .await?
                .ok_or_else(|| {
                    ApiError::NotFound(format!(
                        "no dataset with id {id} (config.unlabelled_dataset_id)"
                    ))
                })?;
        }
        // Self-training learns from the images the encoder was pretrained
        // on unless told otherwise; the stored config names them.
        None if config.transfer == Transfer::SelfTraining => {
            config.unlabelled_dataset_id = base
                .and_then(|model| model.dataset_id)
                .filter(|&id| id != dataset.id);
        }
        None => {}
    }
    config.label_version = Some(chosen_label_version(config.label_version, dataset)?);
    Ok(JobSpec::Finetune(config))
}

async fn evaluate_config(
    state: &AppState,
    tenant: &Tenant,
    dataset: &Dataset,
    base: Option<&Model>,
    config: Option<serde_json::Value>,
) -> Result<JobSpec, ApiError> {
    if base.is_none() {
        return Err(ApiError::field(
            "base_model_id",
            "name the model to evaluate",
        ));
    }
    if !dataset.labeled {
        return Err(ApiError::field(
            "dataset_id",
            "the dataset is unlabelled; evaluation needs labels: upload an archive with one folder per class, or send labels with PUT /v1/datasets/{id}/labels",
        ));
    }
    let mut config = parse_config::<EvaluateConfigRequest>(config)?
        .resolve()
        .map_err(ApiError::fields)?;
    config.label_version = Some(chosen_label_version(config.label_version, dataset)?);
    if config.test_dataset_id == Some(dataset.id) {
        return Err(ApiError::field(
            "config.test_dataset_id",
            "is dataset_id itself: the probe would be tested on the images it was fitted on; \
             name a separate labelled dataset, or omit it to hold out config.test_fraction \
             of dataset_id",
        ));
    }
    if let Some(id) = config.test_dataset_id {
        labelled_dataset(state, tenant, id, "config.test_dataset_id").await?;
    }
    Ok(JobSpec::Evaluate(config))
}

/// An embed job: any model (a classifier embeds with its trunk).
fn embed_config(
    base: Option<&Model>,
    config: Option<serde_json::Value>,
) -> Result<JobSpec, ApiError> {
    if base.is_none() {
        return Err(ApiError::field(
            "base_model_id",
            "name the model whose embeddings to compute (an encoder or a classifier)",
        ));
    }
    let config = parse_config::<EmbedConfigRequest>(config)?
        .resolve()
        .map_err(ApiError::fields)?;
    Ok(JobSpec::Embed(config))
}

/// A predict job: a classifier's classes for every image.
fn predict_config(
    base: Option<&Model>,
    config: Option<serde_json::Value>,
) -> Result<JobSpec, ApiError> {
    match base {
        None => {
            return Err(ApiError::field(
                "base_model_id",
                "name the classifier to predict with",
            ))
        }
        Some(model) if model.kind != "classifier" => {
            return Err(ApiError::field(
                "base_model_id",
                format!(
                    "model {} is an encoder and has no classes; fine-tune it (kind finetune) and predict with the resulting classifier",
                    model.id
                ),
            ))
        }
        Some(_) => {}
    }
    let config = parse_config::<PredictConfigRequest>(config)?
        .resolve()
        .map_err(ApiError::fields)?;
    Ok(JobSpec::Predict(config))
}

fn model_backbone(model: &Model) -> Result<Backbone, ApiError> {
    Backbone::from_name(&model.backbone).ok_or_else(|| {
        ApiError::Internal(anyhow::anyhow!(
            "model {} has unknown backbone {}",
            model.id,
            model.backbone
        ))
    })
}

/// `POST /v1/jobs`
pub async fn create(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiJson(request): ApiJson<JobRequest>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    let kind = parse_kind("kind", &request.kind)?;
    let max_attempts =
        ApiError::check_range("max_attempts", request.max_attempts, 3, 1, 10)? as i32;
    let dataset = get_dataset(&state.pool, tenant.id, request.dataset_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no dataset with id {}", request.dataset_id)))?;
    check_job(
        &state,
        &tenant,
        matches!(kind, JobKind::Pretrain | JobKind::Finetune),
    )
    .await?;
    let base = match request.base_model_id {
        Some(id) => Some(
            get_model(&state.pool, tenant.id, id)
                .await?
                .ok_or_else(|| {
                    ApiError::NotFound(format!("no model with id {id} (base_model_id)"))
                })?,
        ),
        None => None,
    };
    let spec = match kind {
        JobKind::Pretrain => {
            pretrain_config(&state, &tenant, &dataset, base.as_ref(), request.config).await?
        }
        JobKind::Finetune => {
            finetune_config(&state, &tenant, &dataset, base.as_ref(), request.config).await?
        }
        JobKind::Evaluate => {
            evaluate_config(&state, &tenant, &dataset, base.as_ref(), request.config).await?
        }
        JobKind::Embed => embed_config(base.as_ref(), request.config)?,
        JobKind::Predict => predict_config(base.as_ref(), request.config)?,
    };
    let job = insert_job(
        &state.pool,
        NewJob {
            tenant_id: tenant.id,
            kind: spec.kind(),
            dataset_id: dataset.id,
            base_model_id: request.base_model_id,
            config: spec.config_json(),
            epochs: spec.epochs(),
            max_attempts,
        },
    )
    .await
    .map_err(|e| match e {
        CreateJobError::DatasetNotFound => {
            ApiError::NotFound(format!("no dataset with id {}", request.dataset_id))
        }
        CreateJobError::BaseModelNotFound => {
            ApiError::NotFound("the base model was deleted".to_string())
        }
        CreateJobError::Database(e) => e.into(),
    })?;
    tracing::info!(job_id = %job.id, kind = %job.kind, "job queued");
    Ok((StatusCode::CREATED, Json(job)))
}

/// Query of `GET /v1/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobListParams {
    pub state: Option<String>,
    pub kind: Option<String>,
    pub limit: Option<i64>,
}

/// `GET /v1/jobs`
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiQuery(params): ApiQuery<JobListParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let job_state = params
        .state
        .as_deref()
        .map(|s| parse_state("state", s))
        .transpose()?;
    let kind = params
        .kind
        .as_deref()
        .map(|k| parse_kind("kind", k))
        .transpose()?;
    let jobs = list_jobs(
        &state.pool,
        tenant.id,
        job_state,
        kind,
        list_limit(params.limit)?,
    )
    .await?;
    Ok(Json(serde_json::json!({ "jobs": jobs })))
}

/// `GET /v1/jobs/{id}`
pub async fn get(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Job>, ApiError> {
    get_job(&state.pool, tenant.id, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no job with id {id}")))
}

/// `POST /v1/jobs/{id}/cancel`
pub async fn cancel(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Job>, ApiError> {
    let job = get_job(&state.pool, tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job with id {id}")))?;
    if job.state.is_final() {
        return Err(ApiError::Conflict(format!(
            "job {id} has already ended ({}); nothing to cancel",
            job.state
        )));
    }
    cancel_job(&state.pool, tenant.id, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no job with id {id}")))
}

/// Query of `GET /v1/jobs/{id}/metrics`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricParams {
    pub name: Option<String>,
}

/// `GET /v1/jobs/{id}/metrics`
pub async fn metrics(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(params): ApiQuery<MetricParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if get_job(&state.pool, tenant.id, id).await?.is_none() {
        return Err(ApiError::NotFound(format!("no job with id {id}")));
    }
    let points = list_metrics(&state.pool, tenant.id, id, params.name.as_deref()).await?;
    Ok(Json(serde_json::json!({ "points": points })))
}

/// `GET /v1/jobs/{id}/report`
pub async fn report(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let job = get_job(&state.pool, tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job with id {id}")))?;
    let Some(report) = job.report else {
        let why = match (job.kind, job.state) {
            (JobKind::Evaluate, state) => format!("the evaluation is {state}; its report appears when it succeeds"),
            (JobKind::Pretrain, JobState::Succeeded) => "this pretrain job had no config.eval_dataset_id, so nothing was evaluated; submit an evaluate job".to_string(),
            (JobKind::Pretrain, state) => format!("the job is {state}; a report appears when it succeeds with config.eval_dataset_id"),
            (JobKind::Finetune, _) => "fine-tuning jobs have no report; their metrics are on the model".to_string(),
            (JobKind::Embed | JobKind::Predict, state) => format!("the job is {state}; its report lists the files it wrote once it succeeds"),
        };
        return Err(ApiError::Conflict(why));
    };
    // The model the report is about: the one evaluated or run, else the one trained.
    let model_id = match job.kind {
        JobKind::Evaluate | JobKind::Embed | JobKind::Predict => job.base_model_id,
        JobKind::Pretrain | JobKind::Finetune => job.model_id,
    };
    let mut body = report.0;
    if let Some(object) = body.as_object_mut() {
        object.insert("job_id".into(), serde_json::json!(job.id));
        object.insert("model_id".into(), serde_json::json!(model_id));
        object.insert("dataset_id".into(), serde_json::json!(job.dataset_id));
    }
    Ok(Json(body))
}

/// `GET /v1/jobs/{id}/outputs/{name}`: one file an embed or predict job wrote.
pub async fn output(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath((id, name)): ApiPath<(Uuid, String)>,
) -> Result<Response, ApiError> {
    let job = get_job(&state.pool, tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job with id {id}")))?;
    let outputs = job_outputs(&job)?;
    let file = outputs
        .files
        .iter()
        .find(|file| file.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = outputs.files.iter().map(|f| f.name.as_str()).collect();
            ApiError::NotFound(format!(
                "job {id} wrote no file `{name}`; it wrote {}",
                names.join(", ")
            ))
        })?;
    if !state.storage.fetch_job_output(id, &file.name).await? {
        return Err(ApiError::Internal(anyhow::anyhow!(
            "job {id}'s output {} is missing from storage",
            file.name
        )));
    }
    let path = state.storage.job_outputs_dir(id).join(&file.name);
    let body = tokio::fs::File::open(&path).await.map_err(|e| {
        ApiError::Internal(
            anyhow::Error::new(e).context(format!("Failed to open {}", path.display())),
        )
    })?;
    let mut response = Body::from_stream(tokio_util::io::ReaderStream::new(body)).into_response();
    let headers = response.headers_mut();
    if let Ok(value) = file.media_type.parse() {
        headers.insert(header::CONTENT_TYPE, value);
    }
    if let Ok(value) = format!("attachment; filename=\"{}\"", file.name).parse() {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    headers.insert(header::CONTENT_LENGTH, file.bytes.into());
    Ok(response)
}

/// The files a succeeded embed or predict job wrote, or why there are none.
pub fn job_outputs(job: &Job) -> Result<JobOutputs, ApiError> {
    if !matches!(job.kind, JobKind::Embed | JobKind::Predict) {
        return Err(ApiError::NotFound(format!(
            "job {} is a {} job; only embed and predict jobs write files",
            job.id, job.kind
        )));
    }
    let Some(report) = job
        .report
        .as_ref()
        .filter(|_| job.state == JobState::Succeeded)
    else {
        return Err(ApiError::Conflict(format!(
            "job {} is {}; its files can be downloaded once it succeeds",
            job.id, job.state
        )));
    };
    serde_json::from_value(report.0.clone()).map_err(|e| {
        ApiError::Internal(anyhow::anyhow!(
            "job {}'s report is unreadable: {e}",
            job.id
        ))
    })
}
