//! Liveness, readiness, and the API description.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;

use super::error::ApiError;
use super::AppState;

/// The OpenAPI description, built into the binary.
pub const OPENAPI_YAML: &str = include_str!("../../openapi.yaml");

/// `GET /healthz`: the process answers.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// `GET /readyz`: the database answers; reports how many workers run here.
pub async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    sqlx::query!("select 1 as one")
        .fetch_one(&state.pool)
        .await
        .map_err(|e| ApiError::Unavailable {
            detail: format!("the database is unreachable: {e}"),
            retry_after: 5,
        })?;
    Ok(Json(serde_json::json!({
        "status": "ready",
        "database": "ok",
        "workers": state.workers,
    })))
}

/// `GET /openapi.yaml`
pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI_YAML)
}
