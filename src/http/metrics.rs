//! `GET /metrics` (Prometheus) and the middleware that counts and times every
//! request. Requests are labelled by their route pattern (`/v1/jobs/{id}`),
//! never by the concrete path, so ids do not multiply the series.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::db::jobs::count_jobs_by_state;
use crate::telemetry;

/// The label of requests that matched no route.
const UNMATCHED_ROUTE: &str = "unmatched";

/// Middleware: counts and times each request by method, route and status.
/// Unusual methods share one label, for the same reason as routes.
pub async fn track_requests(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED_ROUTE.to_string(), |p| p.as_str().to_string());
    let method = match request.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS") => m.to_string(),
        _ => "other".to_string(),
    };
    let start = Instant::now();
    let response = next.run(request).await;
    telemetry::observe_http_request(&method, &route, response.status().as_u16(), start.elapsed());
    response
}

/// `GET /metrics`: the Prometheus text exposition format.
pub async fn scrape(State(state): State<AppState>) -> Result<Response, ApiError> {
    let counts = count_jobs_by_state(&state.pool).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        telemetry::render(&counts),
    )
        .into_response())
}
