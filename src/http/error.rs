//! The API's one error type, rendered as `application/problem+json`
//! (RFC 9457) with a `detail` that tells the client what to change. Server
//! faults are logged here, once, with their whole cause chain.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::validation::FieldError;

/// Every way a request can fail, with the status each maps to.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed (bad JSON syntax, bad id, empty body).
    #[error("{0}")]
    BadRequest(String),
    /// 401: no API key, or one that is unknown or revoked; answered with
    /// `WWW-Authenticate: Bearer realm="pretext"`.
    #[error("{0}")]
    Unauthorized(String),
    /// 404: no such resource (or one of another tenant: the same answer).
    #[error("{0}")]
    NotFound(String),
    /// 409: the resource's state forbids this.
    #[error("{0}")]
    Conflict(String),
    /// 413: over a configured size limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 415: the body is not of a kind this route accepts.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: well-formed but invalid; `errors` names the fields.
    #[error("{detail}")]
    Unprocessable {
        detail: String,
        errors: Vec<FieldError>,
    },
    /// 429: this key's rate is spent; retry after the given seconds.
    #[error("{detail}")]
    TooManyRequests { detail: String, retry_after: u64 },
    /// 503: temporarily unable; retry after the given seconds.
    #[error("{detail}")]
    Unavailable { detail: String, retry_after: u64 },
    /// 507: the server's disk is full; nothing was stored.
    #[error("{0}")]
    InsufficientStorage(String),
    /// 504: the request took longer than the server's deadline for it.
    #[error("{0}")]
    Timeout(String),
    /// 500: a fault on our side.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: String,
    #[serde(skip_serializing_if = "<[FieldError]>::is_empty")]
    errors: &'a [FieldError],
}

impl ApiError {
    /// A 422 for one field.
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        ApiError::Unprocessable {
            detail: format!("{field}: {message}"),
            errors: vec![FieldError {
                field: field.to_string(),
                message,
            }],
        }
    }

    /// `value` (`default` when absent) when it lies in `[min, max]`, else a
    /// 422 naming `field` and its range.
    pub fn check_range(
        field: &str,
        value: Option<i64>,
        default: i64,
        min: i64,
        max: i64,
    ) -> Result<i64, Self> {
        match value.unwrap_or(default) {
            value if (min..=max).contains(&value) => Ok(value),
            other => Err(ApiError::field(
                field,
                format!("must be between {min} and {max} (got {other})"),
            )),
        }
    }

    /// A 422 listing several field errors.
    pub fn fields(errors: Vec<FieldError>) -> Self {
        let detail = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect::<Vec<_>>()
            .join("; ");
        ApiError::Unprocessable { detail, errors }
    }

    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request", "Bad request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict", "Conflict"),
            ApiError::PayloadTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                "Payload too large",
            ),
            ApiError::UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
            ),
            ApiError::Unprocessable { .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation",
                "Invalid request",
            ),
            ApiError::TooManyRequests { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many requests",
            ),
            ApiError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout", "Request timed out"),
            ApiError::InsufficientStorage(_) => (
                StatusCode::INSUFFICIENT_STORAGE,
                "insufficient-storage",
                "Insufficient storage",
            ),
            ApiError::Unavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service unavailable",
            ),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal server error",
            ),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        ApiError::Internal(anyhow::Error::new(error).context("database error"))
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonDataError(e) => ApiError::Unprocessable {
                detail: format!("the JSON body does not match the schema: {}", e.body_text()),
                errors: Vec::new(),
            },
            JsonRejection::JsonSyntaxError(e) => {
                ApiError::BadRequest(format!("the body is not valid JSON: {}", e.body_text()))
            }
            JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType(
                "send the body as JSON with `Content-Type: application/json`".to_string(),
            ),
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::PayloadTooLarge(format!(
                    "the JSON body is too large ({}); send a smaller body",
                    other.body_text()
                ))
            }
            other => ApiError::BadRequest(other.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::BadRequest(format!(
            "the id in the path must be a UUID ({})",
            rejection.body_text()
        ))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::Unprocessable {
            detail: format!("invalid query parameters: {}", rejection.body_text()),
            errors: Vec::new(),
        }
    }
}

/// Seconds a client is asked to wait while the database is unreachable.
const DATABASE_RETRY_AFTER_SECS: u64 = 5;
/// Seconds a client is asked to wait while the object store is unreachable
/// (each request has already been retried for a while).
const OBJECT_STORE_RETRY_AFTER_SECS: u64 = 30;

impl ApiError {
    /// A server fault with a cause that passes is answered as such: a
    /// database or object store that cannot be reached is a 503 to retry, a
    /// full disk a 507.
    fn with_passing_cause(self) -> Self {
        match self {
            ApiError::Internal(error) if crate::db::caused_by_unreachable_database(&error) => {
                tracing::warn!(error = format!("{error:#}"), "the database is unreachable");
                ApiError::Unavailable {
                    detail: format!(
                        "the database is unreachable; retry in {DATABASE_RETRY_AFTER_SECS} s"
                    ),
                    retry_after: DATABASE_RETRY_AFTER_SECS,
                }
            }
            ApiError::Internal(error) if crate::storage::object::is_unreachable(&error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "the object store is unreachable"
                );
                ApiError::Unavailable {
                    detail: format!(
                        "the object store is unreachable, so nothing was changed; retry in \
                         {OBJECT_STORE_RETRY_AFTER_SECS} s"
                    ),
                    retry_after: OBJECT_STORE_RETRY_AFTER_SECS,
                }
            }
            ApiError::Internal(error) if crate::storage::is_storage_full(&error) => {
                tracing::error!(error = format!("{error:#}"), "the disk is full");
                ApiError::InsufficientStorage(
                    "the server's disk is full (no space left on device), so nothing was \
                     stored; retry once its operator has freed space"
                        .to_string(),
                )
            }
            other => other,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let this = self.with_passing_cause();
        let (status, slug, title) = this.parts();
        let (detail, errors) = match &this {
            ApiError::Unprocessable { detail, errors } => (detail.clone(), errors.as_slice()),
            ApiError::Internal(error) => {
                tracing::error!(error = format!("{error:#}"), "request failed");
                (
                    "an internal error occurred; it has been logged".to_string(),
                    &[][..],
                )
            }
            other => (other.to_string(), &[][..]),
        };
        let body = Problem {
            kind: format!("https://pretext.dev/problems/{slug}"),
            title,
            status: status.as_u16(),
            detail,
            errors,
        };
        let mut response = (status, axum::Json(body)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match this {
            ApiError::Unavailable { retry_after, .. }
            | ApiError::TooManyRequests { retry_after, .. } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            }
            ApiError::Unauthorized(_) => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"pretext\""),
                );
            }
            _ => {}
        }
        response
    }
}
