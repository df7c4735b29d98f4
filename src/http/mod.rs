//! The HTTP layer: the router, shared state, extractors and the problem+json
//! error type. Handlers validate, call `db`, `data` and `ml`, and shape JSON.

pub mod cache;
pub mod dashboard;
pub mod datasets;
pub mod deadline;
pub mod error;
pub mod events;
pub mod extract;
pub mod health;
pub mod images;
pub mod jobs;
pub mod labels;
pub mod map;
pub mod metrics;
pub mod models;
pub mod quotas;
pub mod samples;
pub mod search;
pub mod selections;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRef};
use axum::routing::{get, post};
use axum::Router;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;
use uuid::Uuid;

use crate::auth::middleware::require_key;
use crate::auth::{Auth, AuthState};
use crate::config::ServeConfig;
use crate::data::embeddings::EmbeddingIndex;
use crate::data::labels::LabelSet;
use crate::data::manifest::Manifest;
use crate::data::projection::Projection;
use crate::db::job_events::JobEvents;
use crate::ml::inference::InferenceExecutor;
use crate::storage::Storage;
use cache::RecentlyUsed;
use error::ApiError;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub storage: Storage,
    pub config: Arc<ServeConfig>,
    pub inference: InferenceExecutor,
    /// Training workers running in this process.
    pub workers: usize,
    /// Cancelled at shutdown; ends long-lived responses (event streams).
    pub shutdown: CancellationToken,
    /// Notifications of changed jobs, which wake the event streams.
    pub job_events: JobEvents,
    /// Authentication and rate limiting of `/v1`.
    pub auth: Arc<Auth>,
    /// Dataset embeddings read for similarity search, by embed job.
    pub embeddings: RecentlyUsed<Uuid, EmbeddingIndex>,
    /// 2-D maps of dataset embeddings, for the dashboard, by embed job.
    pub projections: RecentlyUsed<Uuid, Projection>,
    /// Datasets' manifests, by dataset.
    pub manifests: RecentlyUsed<Uuid, Manifest>,
    /// Label-set versions, by dataset and version.
    pub label_sets: RecentlyUsed<(Uuid, i32), LabelSet>,
    /// A classifier's class probabilities over a dataset, by embed job.
    pub probabilities: RecentlyUsed<Uuid, selections::ClassProbabilities>,
}

/// The `/v1` gate's part of the state.
impl FromRef<AppState> for AuthState {
    fn from_ref(state: &AppState) -> Self {
        AuthState {
            pool: state.pool.clone(),
            auth: state.auth.clone(),
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route; see /openapi.yaml".to_string())
}

/// Builds the router: `/v1` behind the key check, the rate limit and the
/// request deadlines; health, metrics, the API description and the
/// dashboard's files open.
pub fn router(state: AppState) -> Router {
    let inference_limit = DefaultBodyLimit::max(state.config.max_inference_bytes);
    let api = Router::new()
        .route(
            "/v1/datasets",
            get(datasets::list)
                .post(datasets::upload)
                .layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/datasets/{id}",
            get(datasets::get).delete(datasets::delete),
        )
        .route("/v1/datasets/{id}/samples/{n}", get(samples::sample))
        .route("/v1/datasets/{id}/images", get(images::list))
        .route(
            "/v1/datasets/{id}/labels",
            get(labels::get)
                .put(labels::put)
                .layer(DefaultBodyLimit::max(labels::MAX_LABEL_FILE_BYTES)),
        )
        .route("/v1/datasets/{id}/images/{image_id}", get(images::get))
        .route("/v1/datasets/{id}/map", get(map::map))
        .route("/v1/datasets/{id}/selections", post(selections::create))
        .route(
            "/v1/datasets/{id}/selections/{selection_id}",
            get(selections::get),
        )
        .route(
            "/v1/datasets/{id}/search",
            post(search::search).layer(inference_limit),
        )
        .route("/v1/jobs", get(jobs::list).post(jobs::create))
        .route("/v1/jobs/{id}", get(jobs::get))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/metrics", get(jobs::metrics))
        .route("/v1/jobs/{id}/report", get(jobs::report))
        .route("/v1/jobs/{id}/events", get(events::stream))
        .route("/v1/jobs/{id}/outputs/{name}", get(jobs::output))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{id}", get(models::get).delete(models::delete))
        .route("/v1/models/{id}/weights", get(models::weights))
        .route("/v1/models/{id}/model.json", get(models::description))
        .route(
            "/v1/models/{id}/embed",
            post(models::embed).layer(inference_limit),
        )
        .route(
            "/v1/models/{id}/classify",
            post(models::classify).layer(inference_limit),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            deadline::enforce_deadline,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_key,
        ))
        .layer(DefaultBodyLimit::max(state.config.max_json_bytes));
    Router::new()
        .route("/", get(dashboard::index))
        .route("/assets/{name}", get(dashboard::asset))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/openapi.yaml", get(health::openapi))
        .route("/metrics", get(metrics::scrape))
        .merge(api)
        .fallback(not_found)
        .layer(CatchPanicLayer::new())
        .layer(axum::middleware::from_fn(metrics::track_requests))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
