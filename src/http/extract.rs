//! Extractors whose rejections become the API's problem+json errors, and the
//! reading of image bodies (raw or multipart) for inference.

use axum::extract::{FromRequest, FromRequestParts, Multipart, Request};
use axum::http::header;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;

/// A JSON body with problem+json rejections. Like `axum::Json`, except
/// that a whole number written with a fraction (`5.0`) is read as the
/// integer it is: JSON Schema, and so the OpenAPI description, counts it as
/// an integer.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(mut value) = axum::Json::<Value>::from_request(request, state).await?;
        whole_numbers_as_integers(&mut value);
        serde_path_to_error::deserialize(value)
            .map(ApiJson)
            .map_err(|e| ApiError::Unprocessable {
                detail: format!(
                    "the JSON body does not match the schema: Failed to deserialize the JSON \
                     body into the target type: {e}"
                ),
                errors: Vec::new(),
            })
    }
}

/// Rewrites every float of `value` that is a whole number within `i64`'s
/// range as that integer.
fn whole_numbers_as_integers(value: &mut Value) {
    match value {
        Value::Number(number) if !number.is_i64() && !number.is_u64() => {
            if let Some(float) = number.as_f64() {
                // 2^63: the first whole number past i64::MAX.
                if float.fract() == 0.0 && float.abs() < 9_223_372_036_854_775_808.0 {
                    *value = Value::from(float as i64);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(whole_numbers_as_integers),
        Value::Object(fields) => fields.values_mut().for_each(whole_numbers_as_integers),
        _ => {}
    }
}

/// `axum::extract::Path` with problem+json rejections.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// `axum::extract::Query` with problem+json rejections.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// The media type of a request, lower-cased, without parameters.
pub fn media_type(request: &Request) -> Option<String> {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
}

/// One image of an inference request, with a name for error messages.
pub struct ImagePart {
    pub name: String,
    pub bytes: Bytes,
}

/// Reads the images of an `/embed` or `/classify` request: one raw image, or
/// the file parts of a multipart body.
pub async fn read_images(
    request: Request,
    max_images: usize,
    max_bytes: usize,
) -> Result<Vec<ImagePart>, ApiError> {
    let media = media_type(&request);
    let too_large = |e: &dyn std::fmt::Display| {
        ApiError::PayloadTooLarge(format!(
            "the request body is too large: {e}; send fewer or smaller images"
        ))
    };
    match media.as_deref() {
        Some("multipart/form-data") => {
            let mut multipart = Multipart::from_request(request, &())
                .await
                .map_err(|e| ApiError::BadRequest(format!("unreadable multipart body: {}", e.body_text())))?;
            let mut parts = Vec::new();
            while let Some(field) = multipart.next_field().await.map_err(|e| {
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    too_large(&e)
                } else {
                    ApiError::BadRequest(format!("unreadable multipart body: {}", e.body_text()))
                }
            })? {
                let name = field
                    .file_name()
                    .or(field.name())
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("part {}", parts.len()));
                let bytes = field.bytes().await.map_err(|e| too_large(&e))?;
                parts.push(ImagePart { name, bytes });
                if parts.len() > max_images {
                    return Err(ApiError::PayloadTooLarge(format!(
                        "at most {max_images} images per request; split the request"
                    )));
                }
            }
            if parts.is_empty() {
                return Err(ApiError::BadRequest("the multipart body has no parts; attach images".into()));
            }
            Ok(parts)
        }
        Some(m) if m.starts_with("image/") || m == "application/octet-stream" => {
            let bytes = axum::body::to_bytes(request.into_body(), max_bytes)
                .await
                .map_err(|e| too_large(&e))?;
            if bytes.is_empty() {
                return Err(ApiError::BadRequest("the request body is empty; send an image".into()));
            }
            Ok(vec![ImagePart {
                name: "body".to_string(),
                bytes,
            }])
        }
        other => Err(ApiError::UnsupportedMediaType(format!(
            "send an image (`Content-Type: image/png`, `image/jpeg`, …) or multipart/form-data with image parts, not `{}`",
            other.unwrap_or("no content type")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn whole_floats_become_integers_and_fractions_stay() {
        let mut value = json!({"max_attempts": 5.0, "config": {"epochs": 20.0, "lr": 0.5,
            "sizes": [1.0, 2.5, -3.0], "huge": 1e300, "name": "x"}});
        whole_numbers_as_integers(&mut value);
        assert_eq!(
            value,
            json!({"max_attempts": 5, "config": {"epochs": 20, "lr": 0.5,
                "sizes": [1, 2.5, -3], "huge": 1e300, "name": "x"}})
        );
        assert!(value["max_attempts"].is_i64());
    }
}
