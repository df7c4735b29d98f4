//! The HTTP side of the client: one `reqwest` client bound to the server's
//! URL and key, and the mapping of every failure (nothing listening, a
//! problem+json answer, anything else) onto [`CliError`].

use std::path::{Path, PathBuf};

use anyhow::Context;
use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, RequestBuilder, Response, Url};
use serde::Deserialize;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use super::output;
use super::CliError;

/// Options every client subcommand takes: where the server is, how to
/// authenticate, and how to print.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientOptions {
    /// URL of the pretext server.
    #[arg(
        long,
        env = "PRETEXT_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,

    /// API key, sent as `Authorization: Bearer <key>`.
    #[arg(
        long,
        visible_alias = "api-key",
        env = "PRETEXT_API_KEY",
        hide_env_values = true,
        global = true
    )]
    pub key: Option<String>,

    /// Print the server's raw JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// A field named by a validation error.
#[derive(Debug, Clone, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// An `application/problem+json` answer.
#[derive(Debug, Clone, Deserialize)]
pub struct Problem {
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(default)]
    pub errors: Vec<FieldError>,
}

/// A client of one pretext server.
pub struct ApiClient {
    http: reqwest::Client,
    base: Url,
}

impl ApiClient {
    /// A client for the server and key in `options`.
    pub fn new(options: &ClientOptions) -> Result<Self, CliError> {
        let base = Url::parse(options.url.trim_end_matches('/')).map_err(|e| {
            CliError::Usage(format!(
                "--url {:?} is not a URL ({e}); give one like http://127.0.0.1:8080",
                options.url
            ))
        })?;
        let mut headers = HeaderMap::new();
        if let Some(key) = options.key.as_deref().filter(|k| !k.is_empty()) {
            let mut value = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                CliError::Usage("the API key holds characters a header cannot carry".into())
            })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(std::time::Duration::from_secs(10))
            .user_agent(concat!("pretext-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CliError::Usage(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self { http, base })
    }

    /// The server's URL, as given.
    pub fn base_url(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    /// A request to `path` (which starts with `/`) on the server.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base_url()))
    }

    /// Sends a request; a non-2xx answer becomes an error.
    pub async fn send(&self, request: RequestBuilder) -> Result<Response, CliError> {
        let response = request.send().await.map_err(|e| self.transport_error(e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(error_from_response(response).await)
    }

    /// Sends a request and reads its JSON answer.
    pub async fn send_json(&self, request: RequestBuilder) -> Result<Value, CliError> {
        let response = self.send(request).await?;
        response.json().await.map_err(|e| self.transport_error(e))
    }

    /// `GET path` with a query, as JSON.
    pub async fn get_json(&self, path: &str, query: &[(&str, String)]) -> Result<Value, CliError> {
        self.send_json(self.request(Method::GET, path).query(query))
            .await
    }

    /// `POST path` with a JSON body (or none), as JSON.
    pub async fn post_json(&self, path: &str, body: Option<&Value>) -> Result<Value, CliError> {
        let mut request = self.request(Method::POST, path);
        if let Some(body) = body {
            request = request.json(body);
        }
        self.send_json(request).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Result<(), CliError> {
        self.send(self.request(Method::DELETE, path)).await?;
        Ok(())
    }

    /// Streams `GET path` into `out`, with a progress bar, through a
    /// `.part` file renamed at the end (so an interrupted download leaves no
    /// truncated `out`); returns the bytes written.
    pub async fn download(&self, path: &str, out: &Path) -> Result<u64, CliError> {
        let response = self.send(self.request(Method::GET, path)).await?;
        let bar = output::byte_bar(response.content_length().unwrap_or(0), "downloading");
        let mut part_name = out.as_os_str().to_owned();
        part_name.push(".part");
        let part = PathBuf::from(part_name);
        let written = async {
            let mut file = tokio::fs::File::create(&part)
                .await
                .with_context(|| format!("Failed to create {}", part.display()))?;
            let mut written = 0u64;
            let mut chunks = response.bytes_stream();
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(|e| self.transport_error(e))?;
                file.write_all(&chunk)
                    .await
                    .with_context(|| format!("Failed to write {}", part.display()))?;
                written += chunk.len() as u64;
                bar.inc(chunk.len() as u64);
            }
            file.flush()
                .await
                .with_context(|| format!("Failed to write {}", part.display()))?;
            tokio::fs::rename(&part, out)
                .await
                .with_context(|| format!("Failed to move the download to {}", out.display()))?;
            Ok::<_, CliError>(written)
        }
        .await;
        bar.finish_and_clear();
        if written.is_err() {
            let _ = tokio::fs::remove_file(&part).await;
        }
        written
    }

    /// A transport failure: nothing listening is told apart from the rest.
    pub fn transport_error(&self, error: reqwest::Error) -> CliError {
        let reason = root_cause(&error);
        if error.is_connect() {
            CliError::Unreachable {
                url: self.base_url().to_string(),
                reason,
            }
        } else if error.is_decode() {
            CliError::UnexpectedBody(reason)
        } else {
            CliError::Transport {
                url: self.base_url().to_string(),
                reason,
            }
        }
    }
}

/// The innermost cause of an error: for a refused connection that is
/// "Connection refused", not reqwest's "error sending request".
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// A non-2xx answer: its problem+json, or whatever else the server sent.
async fn error_from_response(response: Response) -> CliError {
    let status = response.status();
    let is_problem = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/problem+json"));
    let body = response.text().await.unwrap_or_default();
    if is_problem {
        if let Ok(problem) = serde_json::from_str::<Problem>(&body) {
            return CliError::Problem(problem);
        }
    }
    let full = body.trim();
    let mut body: String = full.chars().take(500).collect();
    if body.len() < full.len() {
        body.push('…');
    }
    CliError::UnexpectedStatus {
        status: status.to_string(),
        body,
    }
}
