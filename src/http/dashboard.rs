//! The dashboard: one HTML page with its scripts and styles, built into the
//! binary from `web/` so that the service needs no other file on disk and no
//! build step. The page is a client of the same `/v1` API as any other.

use axum::extract::Path;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// The page, served at `/`.
const INDEX_HTML: &str = include_str!("../../web/index.html");

/// One file under `/assets/`.
struct Asset {
    name: &'static str,
    media_type: &'static str,
    body: &'static [u8],
}

/// Every file the page loads, by the name it uses under `/assets/`.
const ASSETS: &[Asset] = &[
    Asset {
        name: "style.css",
        media_type: "text/css; charset=utf-8",
        body: include_bytes!("../../web/style.css"),
    },
    Asset {
        name: "app.js",
        media_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../web/app.js"),
    },
    Asset {
        name: "api.js",
        media_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../web/api.js"),
    },
    Asset {
        name: "dom.js",
        media_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../web/dom.js"),
    },
    Asset {
        name: "charts.js",
        media_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../web/charts.js"),
    },
    Asset {
        name: "datasets.js",
        media_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../web/datasets.js"),
    },
    Asset {
        name: "jobs.js",
        media_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../web/jobs.js"),
    },
    Asset {
        name: "models.js",
        media_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../web/models.js"),
    },
    Asset {
        name: "explore.js",
        media_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../web/explore.js"),
    },
    Asset {
        name: "favicon.svg",
        media_type: "image/svg+xml",
        body: include_bytes!("../../web/favicon.svg"),
    },
];

/// The page loads nothing from another origin and runs no inline script;
/// `blob:` images are the thumbnails and previews it fetches itself.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' blob:; connect-src 'self'; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Headers every dashboard file carries. `no-cache` makes the browser ask
/// again each time, so a new binary's page is never mixed with old scripts.
fn with_headers(media_type: &'static str, body: impl IntoResponse) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(media_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// `GET /`: the dashboard page.
pub async fn index() -> Response {
    let mut response = with_headers("text/html; charset=utf-8", INDEX_HTML);
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    response
}

/// `GET /assets/{name}`: a script, style sheet or icon of the page.
pub async fn asset(Path(name): Path<String>) -> Result<Response, ApiError> {
    ASSETS
        .iter()
        .find(|asset| asset.name == name)
        .map(|asset| with_headers(asset.media_type, asset.body))
        .ok_or_else(|| ApiError::NotFound(format!("the dashboard has no asset `{name}`")))
}
