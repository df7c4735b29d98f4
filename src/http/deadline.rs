//! Request deadlines: an ordinary `/v1` request gets `--request-timeout-secs`
//! to answer, a dataset upload `--upload-timeout-secs` (an archive of
//! gigabytes takes a while), and the live event stream none. A request over
//! its deadline is dropped and answered 504 problem+json.

use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;

/// The route whose responses are streams that last as long as a job.
const EVENTS_ROUTE: &str = "/v1/jobs/{id}/events";
/// The route that receives archives.
const UPLOAD_ROUTE: &str = "/v1/datasets";

/// The deadline of a request to `route`, or `None` for no deadline.
fn deadline(state: &AppState, method: &Method, route: &str) -> Option<Duration> {
    let secs = match (method, route) {
        (_, EVENTS_ROUTE) => return None,
        (&Method::POST, UPLOAD_ROUTE) => state.config.upload_timeout_secs,
        _ => state.config.request_timeout_secs,
    };
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// Middleware (a route layer, so the matched route is known): runs the
/// request under its deadline.
pub async fn enforce_deadline(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let Some(limit) = deadline(&state, request.method(), &route) else {
        return next.run(request).await;
    };
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let setting = if route == UPLOAD_ROUTE {
                "--upload-timeout-secs (PRETEXT_UPLOAD_TIMEOUT_SECS)"
            } else {
                "--request-timeout-secs (PRETEXT_REQUEST_TIMEOUT_SECS)"
            };
            ApiError::Timeout(format!(
                "the request took longer than {} s and was stopped; send less at once, \
                 or raise the server's {setting}",
                limit.as_secs()
            ))
            .into_response()
        }
    }
}
